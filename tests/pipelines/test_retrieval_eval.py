"""retrieval-eval: class-based and Revisited-Oxford-style protocols, results rows, bad input."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from bob_cache.errors import GroundTruthError, SpecError
from bob_cache.pipelines.retrieval_eval import RetrievalEvalConfig, retrieval_eval
from bob_cache.stores.results import ResultsTable
from tests.conftest import blobs, run_cli, write_feature_sets


def cfg(tmp_path: Path, **kw: object) -> RetrievalEvalConfig:
    return RetrievalEvalConfig(
        str(tmp_path / "s"), "toy", "model", results=str(tmp_path / "res"), **kw
    )


def test_separable_classes_score_one_and_shuffled_labels_score_chance(tmp_path: Path) -> None:
    x, y = blobs(1000, classes=5, dim=16, spread=0.3)
    write_feature_sets(tmp_path / "s", {"train": (x, y)})
    s = retrieval_eval(cfg(tmp_path))
    m = s.metrics["classes"]
    assert m["map"] == pytest.approx(1.0) and m["precision@10"] == 1.0 and m["mrr"] == 1.0
    assert s.queries["classes"] == 200 and s.database_rows == 800  # 20% of each class
    assert m["recall@10"] == pytest.approx(10 / 160)
    rows = ResultsTable.open(tmp_path / "res").read(stage="retrieval")
    assert set(rows["metric"]) >= {"map", "precision@1", "recall@5", "mrr"}
    assert set(rows["setting"]) == {"0.2-queries"}
    again = retrieval_eval(cfg(tmp_path))
    assert again.skipped and again.metrics["classes"]["map"] == pytest.approx(1.0)
    assert len(ResultsTable.open(tmp_path / "res").read()) == len(rows)
    shuffled = np.random.default_rng(0).permutation(y)
    write_feature_sets(tmp_path / "s2", {"train": (x, shuffled)})
    chance = retrieval_eval(
        RetrievalEvalConfig(str(tmp_path / "s2"), "toy", "model", results=str(tmp_path / "r2"))
    )
    assert abs(chance.metrics["classes"]["map"] - 0.2) < 0.05


def test_gnd_protocols_use_easy_hard_and_junk(tmp_path: Path) -> None:
    # 1-d features on a line: the query at 0 ranks rows by distance 1, 2, 3, ...
    positions = np.array([0.0, 1, 2, 3, 4, 5, 100])
    x = np.stack([np.cos(positions / 200), np.sin(positions / 200)], 1).astype(np.float32)
    write_feature_sets(tmp_path / "s", {"train": (x, np.zeros(7, np.int64))})
    # ids are train/00000 ... ; imlist names rows 1..5 by stem, row 6 is a distractor
    truth = {
        "imlist": [f"{i:05d}" for i in range(1, 6)],
        "qimlist": ["train/00000"],
        "gnd": [{"easy": [0], "hard": [2], "junk": [1]}],
    }
    (tmp_path / "gnd.json").write_text(json.dumps(truth))
    s = retrieval_eval(cfg(tmp_path, protocol="gnd", gnd=str(tmp_path / "gnd.json")))
    # ranking after the query itself is dropped: rows 1, 2(junk), 3, 4, 5, 6
    assert s.metrics["gnd-easy"]["map"] == pytest.approx(1.0)  # row 1 first; hard+junk ignored
    assert s.metrics["gnd-medium"]["map"] == pytest.approx(1.0)  # rows 1, 3 first once junk goes
    assert s.metrics["gnd-hard"]["map"] == pytest.approx(1.0)  # row 3 first without easy, junk
    assert s.queries == {"gnd-easy": 1, "gnd-medium": 1, "gnd-hard": 1}
    truth["gnd"] = [{"easy": [4], "hard": [], "junk": []}]
    (tmp_path / "gnd2.json").write_text(json.dumps(truth))
    s = retrieval_eval(cfg(tmp_path, protocol="gnd", gnd=str(tmp_path / "gnd2.json")))
    # one positive at 0-based rank 4: (precision before it 0/4 + at it 1/5) / 2
    assert s.metrics["gnd-easy"]["map"] == pytest.approx((0 / 4 + 1 / 5) / 2)
    assert s.queries_skipped["gnd-hard"] == 1  # no hard positives: left out, as revisitop does


def test_bad_protocol_input_is_refused(tmp_path: Path) -> None:
    x, y = blobs(100, classes=4, dim=8)
    write_feature_sets(tmp_path / "s", {"train": (x, y)})
    with pytest.raises(SpecError, match="needs --gnd FILE"):
        cfg(tmp_path, protocol="gnd")
    with pytest.raises(SpecError, match="Unknown --protocol"):
        cfg(tmp_path, protocol="oxford")
    (tmp_path / "g.json").write_text(
        json.dumps({"imlist": ["nothere"], "qimlist": ["train/00000"], "gnd": [{"easy": [0]}]})
    )
    with pytest.raises(GroundTruthError, match="1 of 1 imlist images .* not valid rows"):
        retrieval_eval(cfg(tmp_path, protocol="gnd", gnd=str(tmp_path / "g.json")))
    write_feature_sets(tmp_path / "one", {"train": (x, np.zeros(100, np.int64))})
    with pytest.raises(SpecError, match="needs at least two"):
        retrieval_eval(RetrievalEvalConfig(str(tmp_path / "one"), "toy", "model"))


def test_index_and_retrieval_eval_cli(tmp_path: Path) -> None:
    x, y = blobs(600, classes=3, dim=8, spread=0.5)
    write_feature_sets(tmp_path / "s", {"train": (x, y)})
    sel = ["--store", tmp_path / "s", "--dataset", "toy", "--backbone", "model"]
    built = run_cli("index", "build", *sel, "--kind", "ivf", "--target-recall", "0.9", "--json")
    assert built.returncode == 0, built.stderr
    record = json.loads(built.stdout)["record"]
    assert record["kind"] == "ivf" and record["recall"] >= 0.9
    listed = run_cli("index", "ls", tmp_path / "s", "--json")
    assert [r["name"] for r in json.loads(listed.stdout)] == ["ivf"]
    over = run_cli("index", "build", *sel, "--kind", "hnsw", "--max-memory", "1KB")
    assert over.returncode == 1 and "Raise --max-memory" in over.stderr
    evaluated = run_cli("retrieval-eval", *sel, "--results", tmp_path / "r", "--json")
    assert evaluated.returncode == 0, evaluated.stderr
    assert json.loads(evaluated.stdout)["metrics"]["classes"]["map"] > 0.9
    bad = run_cli("retrieval-eval", *sel, "--protocol", "gnd", "--gnd", tmp_path / "no.json")
    assert bad.returncode == 1 and "does not exist" in bad.stderr
