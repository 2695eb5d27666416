"""Revisited Oxford end to end: extract a revisitop copy (queries cropped to their boxes) with a
tiny random-init model, then ``retrieval-eval --protocol gnd`` with the ground truth and the
query split the source recorded, checked against revisitop's own ``compute_map``."""

from __future__ import annotations

import pickle
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from bob_cache.backbones import create_backbone
from bob_cache.config import ExtractConfig
from bob_cache.errors import GroundTruthError
from bob_cache.pipelines.extract import extract
from bob_cache.pipelines.retrieval_eval import RetrievalEvalConfig, config_hash, retrieval_eval
from bob_cache.stores import open_store
from bob_cache.stores.results import ResultsTable
from tests.bob_cache.test_retrieval_metrics import revisitop_compute_map
from tests.bob_cache.test_source_revisitop import BOXES, write_revisitop

SIZE = 32


@pytest.fixture(scope="module")
def extracted(tmp_path_factory: pytest.TempPathFactory) -> dict[str, object]:
    root = tmp_path_factory.mktemp("revisitop")
    write_revisitop(root / "roxford")
    options = {"backbone": "test_resnet", "random_init": True, "image_size": SIZE,
               "workers": 0, "batch_size": 8, "quiet": True}  # fmt: skip
    data = f"revisitop:roxford5k:{root / 'roxford'}"
    summary = extract(ExtractConfig(data=data, store=str(root / "store"), **options))
    store = open_store(root / "store")
    sets = {f["split"]: store.get(f["group"]) for f in summary.feature_sets}
    return {"root": root, "sets": sets}


def gnd_config(root: Path, **kw: object) -> RetrievalEvalConfig:
    kw = {"results": str(root / "results"), "protocol": "gnd", **kw}
    return RetrievalEvalConfig(str(root / "store"), "roxford5k", "test_resnet", **kw)


def test_query_rows_hold_the_features_of_the_pil_crop(extracted: dict) -> None:
    sets, root = extracted["sets"], extracted["root"]
    assert {k: fs.n_rows for k, fs in sets.items()} == {"train": 12, "query": 3}
    query = sets["query"]
    ids = [str(i) for i in query.array("ids")[:]]
    assert ids == ["jpg/astronaut_000004.jpg", "jpg/coffee_000004.jpg", "jpg/chelsea_000004.jpg"]
    assert query.array("labels")[:].tolist() == [-1, -1, -1]
    bb = create_backbone("test_resnet", random_init=True, image_size=SIZE)
    crops = []
    for i, bbx in zip(ids, BOXES, strict=True):
        with Image.open(root / "roxford" / i) as im:
            crops.append(bb.preprocess(im.convert("RGB").crop(bbx)))
    with torch.no_grad():
        expected = bb(torch.cat(crops))["final"].numpy()
    stored = query.features[:].astype(np.float32)
    np.testing.assert_allclose(stored, expected, rtol=2e-3, atol=2e-3)
    with Image.open(root / "roxford" / ids[0]) as im, torch.no_grad():  # the whole image
        whole = bb(bb.preprocess(im.convert("RGB")))["final"].numpy()
    assert not np.allclose(stored[0], whole[0], rtol=2e-3, atol=2e-3)
    dataset = query.attrs["dataset"]
    assert dataset["retrieval"]["query_crop"].startswith("bbx from gnd_roxford5k.pkl")
    assert dataset["retrieval"]["query_bbx"][ids[1]] == BOXES[1]
    assert dataset["catalog"] == "roxford5k"


def test_gnd_map_equals_revisitops_compute_map(extracted: dict) -> None:
    sets, root = extracted["sets"], extracted["root"]
    config = gnd_config(root)  # no --gnd, no --query-split: both from the provenance
    summary = retrieval_eval(config)
    assert summary.database_rows == 12 and summary.queries["gnd-medium"] == 3

    def unit(x: np.ndarray) -> np.ndarray:
        x = x.astype(np.float64)
        return x / np.linalg.norm(x, axis=1, keepdims=True)

    db, q = unit(sets["train"].features[:]), unit(sets["query"].features[:])
    ranks = np.argsort(-(db @ q.T), axis=0, kind="stable")  # revisitop: db_size × queries
    truth = pickle.loads((root / "roxford" / "gnd_roxford5k.pkl").read_bytes())["gnd"]
    for protocol, ok, junk in (
        ("easy", ("easy",), ("junk", "hard")),
        ("medium", ("easy", "hard"), ("junk",)),
        ("hard", ("hard",), ("junk", "easy")),
    ):
        gnd = [{"ok": np.concatenate([np.asarray(g[k], dtype=np.int64) for k in ok]),
                "junk": np.concatenate([np.asarray(g[k], dtype=np.int64) for k in junk])}
               for g in truth]  # fmt: skip
        aps, _ = revisitop_compute_map(ranks, gnd, (1, 5, 10))
        assert summary.metrics[f"gnd-{protocol}"]["map"] == pytest.approx(np.nanmean(aps))
    rows = ResultsTable.open(root / "results").read(stage="retrieval")
    key = sets["train"].key
    assert set(rows["config_hash"]) == {config_hash(config, key)}  # the battle's done check
    assert set(rows["split"]) == {"train"} and set(rows["setting"]) == {"gnd"}


def test_a_changed_ground_truth_is_refused_until_named(extracted: dict, tmp_path: Path) -> None:
    root = extracted["root"]
    gnd = root / "roxford" / "gnd_roxford5k.pkl"
    original = gnd.read_bytes()
    truth = pickle.loads(original)
    truth["gnd"][0]["junk"] = []
    try:
        gnd.write_bytes(pickle.dumps(truth, protocol=2))
        with pytest.raises(GroundTruthError, match="changed since .*Fix: extract the dataset"):
            retrieval_eval(gnd_config(root, results=str(tmp_path / "r")))
        named = retrieval_eval(gnd_config(root, gnd=str(gnd), results=str(tmp_path / "r")))
        assert named.queries["gnd-medium"] == 3  # --gnd FILE: that file, the recorded queries
    finally:
        gnd.write_bytes(original)
