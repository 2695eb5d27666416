"""retrieval-eval: class-based and Revisited-Oxford-style protocols, results rows, bad input."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import xarray as xr
from sklearn.metrics import average_precision_score

from bob_cache.errors import GroundTruthError, SpecError
from bob_cache.hashing import stable_hash
from bob_cache.pipelines.retrieval_eval import RetrievalEvalConfig, retrieval_eval
from bob_cache.probes import holdout
from bob_cache.stores import open_store
from bob_cache.stores.results import ResultsTable
from tests.bob_cache.test_retrieval_metrics import revisitop_compute_map
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
    assert s.metrics_definition == "revisitop"  # the gnd protocol's own definitions by default
    (protocol,) = set(ResultsTable.open(tmp_path / "res").read(stage="retrieval")["protocol"])
    assert "ground truth" in protocol and "metrics revisitop (compute_map" in protocol
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
        retrieval_eval(cfg(tmp_path, protocol="gnd"))  # the set records no ground truth
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


def test_metrics_definition_defaults_per_protocol_and_is_checked(tmp_path: Path) -> None:
    assert cfg(tmp_path).metrics_definition == "sklearn"  # today's classes numbers
    assert cfg(tmp_path, protocol="gnd", gnd="g.json").metrics_definition == "revisitop"
    assert cfg(tmp_path, metrics_definition="revisitop").metrics_definition == "revisitop"
    with pytest.raises(SpecError, match="Did you mean 'sklearn'"):
        cfg(tmp_path, metrics_definition="sklarn")


def test_each_metrics_definition_writes_its_own_rows_matching_references(tmp_path: Path) -> None:
    # overlapping clusters of 40 ... 5 rows: AP below 1, and the small classes' queries (1
    # query, 4 or 5 database positives) often rank every positive within their top 10
    rng = np.random.default_rng(2)
    y = np.repeat(np.arange(6), [40, 25, 15, 10, 6, 5])
    x = (rng.normal(size=(6, 8))[y] + rng.normal(0, 0.6, size=(len(y), 8))).astype(np.float32)
    write_feature_sets(tmp_path / "s", {"train": (x, y)})
    sel = ["--store", tmp_path / "s", "--dataset", "toy", "--backbone", "model"]
    sel += ["--results", tmp_path / "r", "--json"]
    out = {}
    for name in ("sklearn", "revisitop"):
        done = run_cli("retrieval-eval", *sel, "--metrics-definition", name)
        assert done.returncode == 0, done.stderr
        out[name] = json.loads(done.stdout)
        assert out[name]["metrics_definition"] == name and not out[name]["skipped"]
    again = run_cli("retrieval-eval", *sel)  # the default is sklearn: already in the table
    assert json.loads(again.stdout)["skipped"]
    rows = ResultsTable.open(tmp_path / "r").read(stage="retrieval")
    assert len(rows) == 2 * len(out["sklearn"]["metrics"]["classes"])  # nothing rewritten
    by = {name: rows[rows["protocol"].str.contains(f"metrics {name}", regex=False)] for name in out}
    assert [len(set(by[n]["config_hash"])) for n in out] == [1, 1]
    assert set(by["sklearn"]["config_hash"]).isdisjoint(by["revisitop"]["config_hash"])
    assert set(by["sklearn"]["protocol"]).isdisjoint(by["revisitop"]["protocol"])
    key = rows["feature_key"].iloc[0]
    legacy = {"stage": "retrieval", "feature_key": key, "protocol": "classes", "split": "train"}
    legacy |= {"metric": "cosine", "queries": [0.2, 0]}  # the identity before the option
    assert set(by["sklearn"]["config_hash"]) == {stable_hash(legacy)}

    # references from the stored (float16) features, the protocol's query draw, and
    # scikit-learn's AP or the port of revisitop's compute_map
    fs = open_store(tmp_path / "s").get(key, split="train")
    ds = xr.open_zarr(tmp_path / "s", group=fs.path)
    stored = ds["features"].values.astype(np.float32)
    stored /= np.linalg.norm(stored, axis=1, keepdims=True)
    labels, ids = ds["labels"].values, ds["ids"].values.tolist()
    db, queries = holdout(labels, ids, 0.2, seed=0)
    scores = stored[queries] @ stored[db].T
    relevant = labels[db][None, :] == labels[queries][:, None]
    top = np.take_along_axis(relevant, np.argsort(-scores, axis=1), axis=1)
    aps, prs = revisitop_compute_map(
        np.argsort(-scores.T, axis=0), [{"ok": np.flatnonzero(r)} for r in relevant], (1, 5, 10)
    )
    want = {
        "sklearn": {
            "map": np.mean(
                [average_precision_score(r, s) for r, s in zip(relevant, scores, strict=True)]
            ),
            **{f"precision@{k}": top[:, :k].sum(1).mean() / k for k in (1, 5, 10)},
        },
        "revisitop": {
            "map": aps.mean(),
            **{f"precision@{k}": prs[:, j].mean() for j, k in enumerate((1, 5, 10))},
        },
    }
    for name, metrics in want.items():
        got = dict(zip(by[name]["metric"], by[name]["value"], strict=True))
        for metric, value in metrics.items():
            assert got[metric] == pytest.approx(value, rel=1e-6), (name, metric)
            assert out[name]["metrics"]["classes"][metric] == got[metric]
        recall = top[:, :10].sum(1) / relevant.sum(1)
        assert got["recall@10"] == pytest.approx(recall.mean(), rel=1e-6)
    sk, rv = (out[n]["metrics"]["classes"] for n in ("sklearn", "revisitop"))
    assert rv["map"] < sk["map"]  # each trapezoid's left side j/r is at most (j+1)/(r+1)
    assert rv["precision@10"] > sk["precision@10"]  # k capped where all positives come early
    assert rv["recall@10"] == sk["recall@10"] and rv["mrr"] == sk["mrr"]
