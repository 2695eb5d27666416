"""Hugging Face datasets on disk: Hub parquet shards and save_to_disk folders, written here in
the exact layout ``datasets`` writes (HF features in the schema metadata, Arrow IPC stream
files, state.json / dataset_info.json / dataset_dict.json), read back and compared with a
direct pyarrow read of the same files; then extracted end to end."""

from __future__ import annotations

import io
import json
import logging
import pickle
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from bob_cache.config import ExtractConfig
from bob_cache.data import parquet, parse_source
from bob_cache.data.parquet import ParquetSource
from bob_cache.errors import DataNotFoundError, DataSourceError
from bob_cache.pipelines.extract import extract
from bob_cache.stores import open_store

NAMES = ["airplane", "automobile", "bird"]
IMAGE = pa.struct([("bytes", pa.binary()), ("path", pa.string())])


def png(seed: int, size: int = 12) -> bytes:
    pixels = np.random.default_rng(seed).integers(0, 256, (size, size, 3), dtype=np.uint8)
    out = io.BytesIO()
    Image.fromarray(pixels).save(out, format="PNG")
    return out.getvalue()


def hf_metadata(features: dict) -> dict[str, str]:
    """The schema metadata ``datasets`` writes into every parquet and Arrow file."""
    return {"huggingface": json.dumps({"info": {"features": features}})}


FEATURES = {"img": {"_type": "Image"}, "label": {"names": NAMES, "_type": "ClassLabel"}}


def image_table(seeds: list[int], labels: list[int | None], *, paths: bool = False) -> pa.Table:
    images = [{"bytes": png(s), "path": f"{s:04d}.png" if paths else None} for s in seeds]
    table = pa.table({"img": pa.array(images, type=IMAGE), "label": pa.array(labels, pa.int64())})
    return table.replace_schema_metadata(hf_metadata(FEATURES))


def write_hub_parquet(root: Path) -> dict[str, list[Path]]:
    """``data/train-0000{0,1}-of-00002.parquet`` and ``data/validation-00000-of-00001``
    (row groups of 2 rows, so reading crosses row groups)."""
    (root / "data").mkdir(parents=True)
    layout = {"train": [[0, 1, 2, 0, 1], [2, 2, 0]], "validation": [[1, 0, 2, 1]]}
    files: dict[str, list[Path]] = {}
    seed = 0
    for split, shards in layout.items():
        for k, labels in enumerate(shards):
            path = root / "data" / f"{split}-{k:05d}-of-{len(shards):05d}.parquet"
            table = image_table(list(range(seed, seed + len(labels))), labels)
            pq.write_table(table, path, row_group_size=2)
            files.setdefault(split, []).append(path)
            seed += len(labels)
    return files


def write_arrow_stream(path: Path, table: pa.Table, *, batch: int = 2) -> None:
    """An Arrow IPC stream file, as ``Dataset.save_to_disk`` writes its data files."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with pa.OSFile(str(path), "wb") as sink, pa.ipc.new_stream(sink, table.schema) as writer:
        for part in table.to_batches(max_chunksize=batch):
            writer.write_batch(part)


def write_saved_dataset(folder: Path, table: pa.Table, *, split: str | None) -> None:
    """One ``Dataset.save_to_disk`` folder: data file, dataset_info.json, state.json."""
    write_arrow_stream(folder / "data-00000-of-00001.arrow", table)
    info = {"citation": "", "description": "", "features": FEATURES, "homepage": "", "license": ""}
    (folder / "dataset_info.json").write_text(json.dumps(info))
    state = {"_data_files": [{"filename": "data-00000-of-00001.arrow"}], "_fingerprint": "f00d",
             "_format_columns": None, "_format_kwargs": {}, "_format_type": None,
             "_output_all_columns": False, "_split": split}  # fmt: skip
    (folder / "state.json").write_text(json.dumps(state))


def write_dataset_dict(root: Path) -> dict[str, pa.Table]:
    """``DatasetDict.save_to_disk``: dataset_dict.json and train/ and test/ folders; the test
    split holds image paths (no bytes) and two rows without a label."""
    tables = {
        "train": image_table([10, 11, 12, 13, 14], [0, 1, 2, 1, 0]),
        "test": image_table([20, 21, 22, 23], [2, None, 0, None], paths=True),
    }
    images = root / "test"
    images.mkdir(parents=True)
    for s in (20, 21, 22, 23):  # the image struct's paths, relative to the split folder
        (images / f"{s:04d}.png").write_bytes(png(s))
    bare = tables["test"].column("img").combine_chunks()
    no_bytes = pa.StructArray.from_arrays(
        [pa.nulls(len(bare), pa.binary()), bare.field("path")], fields=list(IMAGE)
    )
    tables["test"] = tables["test"].set_column(0, "img", no_bytes)
    for split, table in tables.items():
        write_saved_dataset(root / split, table, split=split)
    (root / "dataset_dict.json").write_text(json.dumps({"splits": list(tables)}))
    return tables


def direct(paths: list[Path]) -> pa.Table:
    return pa.concat_tables([pq.read_table(p) for p in paths])


def test_hub_parquet_shards_equal_a_direct_read(tmp_path: Path) -> None:
    files = write_hub_parquet(tmp_path / "cifar-tiny")
    src = parse_source(str(tmp_path / "cifar-tiny"))  # recognised without the hf: prefix
    assert isinstance(src, ParquetSource) and src.kind == "parquet"
    assert src.name == "cifar-tiny" and src.class_names == NAMES
    assert {k: len(v) for k, v in src.splits.items()} == {"train": 8, "val": 4}  # validation
    assert src.split_rule.kind == "distributed" and src.image_column == "img"
    for split, hf_split in (("train", "train"), ("val", "validation")):
        table = direct(files[hf_split])
        rows = src.splits[split]
        assert [s.label for s in rows] == table.column("label").to_pylist()
        expected = [b["bytes"] for b in table.column("img").to_pylist()]
        assert [src.read_bytes(s) for s in rows] == expected
    assert len(parquet._cache) <= parquet._CACHE_SIZE  # row groups read, not whole tables
    shard = str(files["validation"][0])
    assert {key[:2] for key in parquet._cache} == {(shard, 0), (shard, 1)}  # the last read
    assert src.splits["train"][6].id == "data/train-00001-of-00002.parquet#1"
    copy = pickle.loads(pickle.dumps(src))  # as loader workers receive it
    assert copy.read_bytes(copy.splits["val"][3]) == expected[3]
    assert src.splits["train"][6].location == (1, 0, 1)  # second shard, first row group
    image, digest = src.load(src.splits["val"][3])
    assert image.size == (12, 12) and digest == src.digest(src.splits["val"][3])
    again = parse_source(src.origin)
    assert again.origin == src.origin and again.fingerprint() == src.fingerprint()
    one = parse_source(str(files["validation"][0]))  # one shard: its split from its name
    assert list(one.splits) == ["val"] and one.name == "cifar-tiny"


def test_split_folders_of_the_hub_parquet_conversion(tmp_path: Path) -> None:
    """``refs/convert/parquet``: ``CONFIG/SPLIT/0000.parquet``, ``partial-SPLIT`` when cut."""
    for split, seeds in (("train", [1, 2, 3]), ("partial-validation", [4, 5])):
        (tmp_path / "default" / split).mkdir(parents=True)
        table = image_table(seeds, [0] * len(seeds))
        pq.write_table(table, tmp_path / "default" / split / "0000.parquet")
    src = parse_source(f"hf:{tmp_path}")
    assert {k: len(v) for k, v in src.splits.items()} == {"train": 3, "val": 2}
    assert src.splits["val"][1].id == "default/partial-validation/0000.parquet#1"


def test_dataset_dict_saved_to_disk_with_paths_and_unlabeled_rows(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    tables = write_dataset_dict(tmp_path / "saved")
    with caplog.at_level(logging.WARNING, logger="bob_cache.data.parquet"):
        src = parse_source(str(tmp_path / "saved"))
    assert list(src.splits) == ["train", "test"] and src.class_names == NAMES
    assert "test: 2 of 4" in caplog.text and "unlabeled rows (-1)" in caplog.text
    assert [s.label for s in src.splits["test"]] == [2, -1, 0, -1]
    assert [s.label for s in src.splits["train"]] == tables["train"].column("label").to_pylist()
    assert [s.id for s in src.splits["test"]] == ["0020.png", "0021.png", "0022.png", "0023.png"]
    assert src.read_bytes(src.splits["test"][2]) == png(22)  # read from the path, beside it
    assert [src.read_bytes(s) for s in src.splits["train"]] == [png(s) for s in range(10, 15)]
    assert src.splits["train"][0].id == "train/data-00000-of-00001.arrow#0"


def test_a_saved_dataset_without_split_is_split_by_id_hash_with_info_features(
    tmp_path: Path,
) -> None:
    table = image_table(list(range(12)), [0, 1, 2] * 4).replace_schema_metadata(None)
    write_saved_dataset(tmp_path / "one", table, split=None)
    src = parse_source(f"hf:{tmp_path / 'one'}")
    assert src.class_names == NAMES  # from dataset_info.json: the Arrow file has no metadata
    assert src.split_rule.kind == "id-hash" and sum(map(len, src.splits.values())) == 12
    write_saved_dataset(tmp_path / "named", table, split="train")
    assert list(parse_source(str(tmp_path / "named")).splits) == ["train"]


def test_column_options_string_labels_and_an_id_column(tmp_path: Path) -> None:
    table = pa.table({
        "id": [f"img-{i}" for i in range(6)],
        "thumb": [png(100 + i, 4) for i in range(6)],
        "picture": [png(i) for i in range(6)],
        "coarse_label": [0, 0, 1, 1, 0, 1],
        "fine_label": ["oak", "elm", "oak", "fir", None, "elm"],
    })  # fmt: skip
    path = tmp_path / "trees" / "train-00000-of-00001.parquet"
    path.parent.mkdir()
    pq.write_table(table, path)
    with pytest.raises(DataSourceError, match=r"several \(thumb, picture\).*\?image=COLUMN"):
        parse_source(str(tmp_path / "trees"))
    src = parse_source(f"hf:{tmp_path / 'trees'}?image=picture&label=fine_label")
    assert src.class_names == ["elm", "fir", "oak"]
    assert [s.label for s in src.splits["train"]] == [2, 0, 2, 1, -1, 0]
    assert [s.id for s in src.splits["train"]] == [f"img-{i}" for i in range(6)]
    assert src.read_bytes(src.splits["train"][3]) == png(3)
    assert src.origin.endswith("?image=picture&label=fine_label")
    assert parse_source(src.origin).splits == src.splits
    with pytest.raises(DataSourceError, match="Did you mean 'picture'"):
        parse_source(f"hf:{tmp_path / 'trees'}?image=pictures")
    with pytest.raises(DataSourceError, match="Did you mean 'label'.*image=COLUMN and label="):
        parse_source(f"hf:{tmp_path / 'trees'}?lable=fine_label")


def test_ambiguous_or_bad_label_columns_are_refused_with_the_fix(tmp_path: Path) -> None:
    features = {"img": {"_type": "Image"},
                "fine_label": {"names": ["oak", "elm"], "_type": "ClassLabel"},
                "coarse_label": {"names": ["tree"], "_type": "ClassLabel"}}  # fmt: skip
    base = image_table([1, 2], [0, 1])
    table = pa.table({"img": base.column("img"), "fine_label": [1, 0], "coarse_label": [0, 0]})
    (tmp_path / "c100").mkdir()
    pq.write_table(table.replace_schema_metadata(hf_metadata(features)),
                   tmp_path / "c100" / "train-00000-of-00001.parquet")  # fmt: skip
    with pytest.raises(DataSourceError, match=r"several label columns \(fine_label, coarse_label"
                       r"\)\. Name one: hf:.*\?label=fine_label"):  # fmt: skip
        parse_source(str(tmp_path / "c100"))
    src = parse_source(f"hf:{tmp_path / 'c100'}?label=fine_label")
    assert src.class_names == ["oak", "elm"] and [s.label for s in src.splits["train"]] == [1, 0]
    beyond = base.set_column(1, "label", pa.array([0, 7], pa.int64()))
    pq.write_table(beyond, tmp_path / "beyond.parquet")
    with pytest.raises(DataSourceError, match="Label 7 of column 'label' is beyond its 3"):
        parse_source(str(tmp_path / "beyond.parquet"))
    multi = base.set_column(1, "label", pa.array([[0, 1], [2]]))
    pq.write_table(multi, tmp_path / "multi.parquet")
    with pytest.raises(DataSourceError, match="one integer class index.*use a .jsonl manifest"):
        parse_source(str(tmp_path / "multi.parquet"))


def test_missing_files_are_named_with_the_fix(tmp_path: Path) -> None:
    write_dataset_dict(tmp_path / "saved")
    (tmp_path / "saved" / "test" / "state.json").unlink()
    with pytest.raises(DataNotFoundError, match=r"test' is missing state.json.*whole folder"):
        parse_source(str(tmp_path / "saved"))
    write_saved_dataset(tmp_path / "one", image_table([1], [0]), split="train")
    (tmp_path / "one" / "data-00000-of-00001.arrow").unlink()
    with pytest.raises(DataNotFoundError, match=r"data-00000-of-00001.arrow' is missing"):
        parse_source(str(tmp_path / "one"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataNotFoundError, match="holds no parquet file.*train-00000-of-00001"):
        parse_source(f"hf:{tmp_path / 'empty'}")
    mixed = tmp_path / "mixed"
    mixed.mkdir()
    pq.write_table(image_table([1], [0]), mixed / "train-00000-of-00001.parquet")
    pq.write_table(image_table([2], [0]), mixed / "extra.parquet")
    with pytest.raises(DataSourceError, match="which split 'extra.parquet'.*SPLIT-00000-of"):
        parse_source(str(mixed))
    (mixed / "extra.parquet").unlink()
    other = image_table([3], [0]).rename_columns(["image", "label"])
    pq.write_table(other, mixed / "test-00000-of-00001.parquet")
    with pytest.raises(DataSourceError, match="mixes datasets.*point --data at one of them"):
        parse_source(str(mixed))
    (tmp_path / "saved" / "dataset_dict.json").write_text("{not json")
    with pytest.raises(DataSourceError, match="not readable JSON.*Copy it again"):
        parse_source(str(tmp_path / "saved"))


def test_extracted_parquet_rows_keep_ids_labels_and_class_names(tmp_path: Path) -> None:
    write_hub_parquet(tmp_path / "cifar-tiny")
    src = parse_source(str(tmp_path / "cifar-tiny"))
    config = ExtractConfig(data=str(tmp_path / "cifar-tiny"), store=str(tmp_path / "s"),
                           backbone="test_resnet", random_init=True, image_size=32, workers=0,
                           batch_size=3, quiet=True)  # fmt: skip
    extract(config)
    sets = {fs.attrs["split"]: fs for fs in open_store(tmp_path / "s").feature_sets()}
    assert {k: fs.n_rows for k, fs in sets.items()} == {"train": 8, "val": 4}
    for split, fs in sets.items():
        assert fs.array("ids")[:].tolist() == [s.id for s in src.splits[split]]
        assert fs.array("labels")[:].tolist() == [s.label for s in src.splits[split]]
        assert fs.attrs["dataset"]["class_names"] == NAMES and fs.n_invalid == 0
        assert fs.attrs["dataset"]["kind"] == "parquet"
