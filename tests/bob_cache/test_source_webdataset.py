"""WebDataset tar shards as a data source: listing, labels, ids, splits, reads in place (local
and S3), and the bad inputs (a pattern matching nothing, keys without image, missing labels).

Shards are written here in the img2dataset/LAION convention: ``KEY.jpg`` beside ``KEY.cls``,
``KEY.json`` and ``KEY.txt`` members, keys ``SSSSSIIII`` (shard, index).
"""

from __future__ import annotations

import io
import json
import logging
import tarfile
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image

from bob_cache.data import parse_source
from bob_cache.data.images import decode_sample
from bob_cache.data.shard_files import expand_braces, read_range
from bob_cache.data.webdataset import WebDatasetSource
from bob_cache.errors import AnnotationError, DataNotFoundError, DataSourceError

Member = dict[str, bytes | str]


def jpeg(seed: int, size: int = 40) -> bytes:
    """A JPEG crop of one of scikit-image's photos (real image statistics, a few KB)."""
    import skimage.data

    photo = [skimage.data.chelsea, skimage.data.coffee, skimage.data.astronaut][seed % 3]()
    rng = np.random.default_rng(seed)
    y, x = rng.integers(0, photo.shape[0] - size), rng.integers(0, photo.shape[1] - size)
    out = io.BytesIO()
    Image.fromarray(photo[y : y + size, x : x + size]).save(out, format="JPEG", quality=90)
    return out.getvalue()


def write_shard(path: Path, samples: list[tuple[str, Member]]) -> Path:
    """A tar with ``KEY.EXT`` members, in order."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with tarfile.open(path, "w") as tar:
        for key, members in samples:
            for ext, data in members.items():
                raw = data.encode() if isinstance(data, str) else data
                info = tarfile.TarInfo(f"{key}.{ext}")
                info.size = len(raw)
                tar.addfile(info, io.BytesIO(raw))
    return path


def laion_sample(shard: int, i: int, *, classes: int = 3) -> tuple[str, Member]:
    """One sample: image, class index, metadata JSON and caption."""
    key = f"{shard:05d}{i:04d}"
    label = (shard + i) % classes
    meta = {"key": key, "label": label, "caption": f"photo {key}", "width": 40}
    return key, {"jpg": jpeg(shard * 100 + i), "cls": str(label), "json": json.dumps(meta),
                 "txt": f"photo {key}"}  # fmt: skip


def write_shards(root: Path, *, n_shards: int = 3, per_shard: int = 6) -> Path:
    for s in range(n_shards):
        write_shard(root / f"{s:05d}.tar", [laion_sample(s, i) for i in range(per_shard)])
    return root


def direct_read(shards: list[Path]) -> list[dict[str, Any]]:
    """Every sample as tarfile reads it: key, image bytes, .cls label."""
    rows: dict[str, dict[str, Any]] = {}
    for path in shards:
        with tarfile.open(path) as tar:
            for info in tar:
                key, ext = info.name.split(".", 1)
                rows.setdefault(key, {"key": key})[ext] = tar.extractfile(info).read()  # type: ignore[union-attr]
    return list(rows.values())


def all_rows(source: Any) -> list[Any]:
    return [s for rows in source.splits.values() for s in rows]


@pytest.fixture
def shards(tmp_path: Path) -> Path:
    return write_shards(tmp_path / "shards")


def test_rows_labels_and_ids_equal_a_direct_read_of_the_tars(shards: Path) -> None:
    source = parse_source(f"{shards}/{{00000..00002}}.tar?split=train")
    assert isinstance(source, WebDatasetSource) and source.kind == "webdataset"
    expected = direct_read(sorted(shards.glob("*.tar")))
    rows = source.splits["train"]
    assert [s.id for s in rows] == [e["key"] for e in expected]  # tar order, key as id
    assert [s.label for s in rows] == [int(e["cls"]) for e in expected]
    assert [source.read_bytes(s) for s in rows] == [e["jpg"] for e in expected]
    assert source.class_names == ["0", "1", "2"]
    assert source.open_image(rows[0]).size == (40, 40)
    assert source.describe()["shards"] == 3 and source.describe()["unlabeled"] == 0
    assert source.name == "shards" and source.split_rule.kind == "distributed"
    again = parse_source(source.origin)  # workers and the search page re-parse the origin
    assert again.fingerprint() == source.fingerprint()


def test_brace_ranges_keep_zero_padding_and_lists_expand() -> None:
    assert expand_braces("s/{0008..0011}.tar") == [f"s/{i:04d}.tar" for i in range(8, 12)]
    assert expand_braces("{a,b}-{1..2}.tar") == ["a-1.tar", "a-2.tar", "b-1.tar", "b-2.tar"]
    assert expand_braces("plain.tar") == ["plain.tar"]


def test_a_glob_lists_the_same_samples_as_the_brace_range(shards: Path) -> None:
    braces = parse_source(f"wds:{shards}/{{00000..00002}}.tar")
    globbed = parse_source(f"{shards}/*.tar")
    assert [s.id for s in all_rows(globbed)] == [s.id for s in all_rows(braces)]
    # labelled, without split names: the project's id-hash rule makes train/val/test
    assert braces.split_rule.kind == "id-hash" and set(braces.splits) == {"train", "val", "test"}


def test_json_field_txt_names_and_a_class_list(tmp_path: Path) -> None:
    names = ["cat", "dog", "eel"]
    samples = [
        (f"k{i}", {"jpg": jpeg(i), "json": json.dumps({"meta": {"y": names[i % 3]}}),
                   "txt": names[(i + 1) % 3]})
        for i in range(6)
    ]  # fmt: skip
    write_shard(tmp_path / "a.tar", samples)
    by_json = parse_source(f"{tmp_path}/a.tar?label=json:meta.y&split=train")
    assert by_json.class_names == names  # sorted names
    assert [by_json.class_names[s.label] for s in by_json.splits["train"]] == [
        names[i % 3] for i in range(6)
    ]
    (tmp_path / "classes.txt").write_text("eel\ndog\ncat\n")
    by_txt = parse_source(f"{tmp_path}/a.tar?label=txt&split=train&classes={tmp_path}/classes.txt")
    assert by_txt.class_names == ["eel", "dog", "cat"]  # the list's order
    assert [by_txt.class_names[s.label] for s in by_txt.splits["train"]] == [
        names[(i + 1) % 3] for i in range(6)
    ]
    assert by_json.fingerprint() != by_txt.fingerprint()


def test_laion_shards_without_class_labels_stay_one_unlabeled_split(tmp_path: Path) -> None:
    samples = [(f"{i:09d}", {"jpg": jpeg(i), "json": json.dumps({"caption": "a"}),
                             "txt": "a caption"}) for i in range(4)]  # fmt: skip
    write_shard(tmp_path / "laion" / "00000.tar", samples)
    source = parse_source(str(tmp_path / "laion" / "00000.tar"))
    assert list(source.splits) == ["train"] and source.split_rule.kind == "whole"
    assert {s.label for s in source.splits["train"]} == {-1} and source.class_names == []
    assert parse_source(str(tmp_path / "laion" / "00000.tar"), split="test").splits.keys() == {
        "test"
    }


def test_samples_missing_a_label_are_unlabeled_rows_counted_and_logged(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    samples = [laion_sample(0, i) for i in range(6)]
    for _key, members in samples[::3]:
        del members["cls"]
    write_shard(tmp_path / "00000.tar", samples)
    with caplog.at_level(logging.WARNING, logger="bob_cache.data.webdataset"):
        source = parse_source(f"{tmp_path}/00000.tar?split=train")
    labels = [s.label for s in source.splits["train"]]
    assert labels[0] == -1 and labels[3] == -1 and all(v >= 0 for v in labels[1:3] + labels[4:])
    assert source.describe()["unlabeled"] == 2
    assert "2 of 6 samples" in caplog.text and "unlabeled" in caplog.text


def test_a_key_without_an_image_member_is_skipped_and_counted(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    samples = [laion_sample(0, i) for i in range(4)]
    del samples[1][1]["jpg"]  # .cls/.json/.txt but no image
    write_shard(tmp_path / "00000.tar", samples)
    with caplog.at_level(logging.WARNING, logger="bob_cache.data.webdataset"):
        source = parse_source(f"{tmp_path}/00000.tar?split=train")
    assert [s.id for s in source.splits["train"]] == [samples[i][0] for i in (0, 2, 3)]
    assert source.describe()["keys_without_image"] == 1
    assert "1 sample key(s)" in caplog.text and "skipped" in caplog.text


def test_shards_without_any_image_member_say_which_extension_to_name(tmp_path: Path) -> None:
    write_shard(tmp_path / "0.tar", [(f"k{i}", {"ppx": b"raw", "cls": "0"}) for i in range(3)])
    with pytest.raises(DataSourceError, match=r"no image members.*\?image=EXT"):
        parse_source(f"{tmp_path}/0.tar")
    write_shard(tmp_path / "1.tar", [(f"k{i}", {"image.jpg": jpeg(i)}) for i in range(3)])
    assert len(all_rows(parse_source(f"{tmp_path}/1.tar?image=image.jpg&split=train"))) == 3


def test_a_pattern_matching_nothing_says_how_to_write_the_range(shards: Path) -> None:
    with pytest.raises(DataNotFoundError, match=r"2 of the 4 shards.*zero padding"):
        parse_source(f"{shards}/{{00001..00004}}.tar")
    with pytest.raises(DataNotFoundError, match=r"matches no file.*\{00000\.\.00127\}"):
        parse_source(f"{shards}/nothing-*.tar")
    with pytest.raises(DataNotFoundError, match="do not exist"):
        parse_source(f"{shards}/{{0..2}}.tar")  # unpadded range against padded names


def test_bad_options_and_labels_name_the_fix(shards: Path, tmp_path: Path) -> None:
    with pytest.raises(DataSourceError, match=r"Unknown WebDataset option 'lable'.*label"):
        parse_source(f"{shards}/00000.tar?lable=cls")
    with pytest.raises(DataSourceError, match=r"Unknown label 'class'.*json:FIELD"):
        parse_source(f"{shards}/00000.tar?label=class")
    with pytest.raises(DataSourceError, match=r"uncompressed.*gunzip"):
        parse_source(f"{shards}/00000.tar.gz")
    write_shard(tmp_path / "named.tar", [("a", {"jpg": jpeg(0), "cls": "cat"})])
    with pytest.raises(AnnotationError, match=r"expected an integer.*\?label=txt"):
        parse_source(f"{tmp_path}/named.tar")
    (tmp_path / "html.tar").write_bytes(b"<html>" * 200)  # a failed download
    with pytest.raises(DataSourceError, match=r"not a readable tar.*re-download"):
        parse_source(f"{tmp_path}/html.tar")


def test_splits_come_from_folders_file_names_or_the_option(shards: Path, tmp_path: Path) -> None:
    write_shard(tmp_path / "ds" / "train" / "0.tar", [laion_sample(0, i) for i in range(4)])
    write_shard(tmp_path / "ds" / "val" / "0.tar", [laion_sample(1, i) for i in range(2)])
    by_folder = parse_source(f"{tmp_path}/ds/*/0.tar")
    assert {k: len(v) for k, v in by_folder.splits.items()} == {"train": 4, "val": 2}
    assert by_folder.split_rule.kind == "distributed" and by_folder.name == "ds"
    write_shard(tmp_path / "in" / "imagenet-validation-000.tar", [laion_sample(2, 0)])
    assert list(parse_source(f"{tmp_path}/in/imagenet-*.tar").splits) == ["val"]
    assert list(parse_source(f"{shards}/*.tar?split=test").splits) == ["test"]
    write_shard(tmp_path / "ds" / "extra" / "0.tar", [laion_sample(3, 0)])
    with pytest.raises(DataSourceError, match=r"others do not.*\?split=NAME"):
        parse_source(f"{tmp_path}/ds/*/0.tar")


def test_keys_repeated_across_shards_are_qualified_by_their_shard(tmp_path: Path) -> None:
    for name in ("a", "b"):
        write_shard(tmp_path / f"{name}.tar", [(f"{i:03d}", {"jpg": jpeg(i), "cls": "0"})
                                               for i in range(2)])  # fmt: skip
    source = parse_source(f"{tmp_path}/{{a,b}}.tar?split=train")
    assert [s.id for s in source.splits["train"]] == ["a/000", "a/001", "b/000", "b/001"]


def test_a_changed_shard_gives_a_new_fingerprint(shards: Path) -> None:
    spec = f"{shards}/{{00000..00002}}.tar"
    before = parse_source(spec).fingerprint()
    assert parse_source(spec).fingerprint() == before
    samples = [laion_sample(1, i) for i in range(6)]
    samples[2][1]["jpg"] = jpeg(999, size=48)  # another image in one shard
    write_shard(shards / "00001.tar", samples)
    assert parse_source(spec).fingerprint() != before


def test_a_corrupt_member_lists_but_decodes_as_an_invalid_row(tmp_path: Path) -> None:
    samples = [laion_sample(0, i) for i in range(3)]
    samples[1][1]["jpg"] = jpeg(5)[:200]  # a truncated JPEG
    samples[2][1]["jpg"] = b"<html>not found</html>"  # not an image at all
    write_shard(tmp_path / "0.tar", samples)
    source = parse_source(f"{tmp_path}/0.tar?split=train")
    rows = source.splits["train"]
    image, digest, error = decode_sample(source, rows[1])
    assert image is None and digest and "Truncated" in error  # recorded, not raised
    image, _, error = decode_sample(source, rows[2])
    assert image is None and "cannot identify image file '000000002'" in error  # its key
    assert decode_sample(source, rows[0])[0] is not None
    url, offset, _ = rows[2].location
    with pytest.raises(OSError, match="cut short"):
        read_range(url, offset, 10**9)


def test_s3_shards_read_in_place_equal_the_local_ones(shards: Path, s3_env: str) -> None:
    import s3fs

    fs = s3fs.S3FileSystem()
    for path in sorted(shards.glob("*.tar")):
        fs.put_file(str(path), f"{s3_env}/shards/{path.name}")
    remote = parse_source(f"{s3_env}/shards/{{00000..00002}}.tar?split=train")
    local = parse_source(f"{shards}/{{00000..00002}}.tar?split=train")
    rows, expected = remote.splits["train"], local.splits["train"]
    assert [(s.id, s.label) for s in rows] == [(s.id, s.label) for s in expected]
    assert rows[0].location[0].startswith("s3://bob/")
    assert [remote.read_bytes(s) for s in rows] == [local.read_bytes(s) for s in expected]
    assert remote.fingerprint() == local.fingerprint()  # same names, sizes, rows
    assert remote.origin.startswith("wds:s3://") and parse_source(remote.origin).splits.keys() == {
        "train"
    }
    globbed = parse_source(f"{s3_env}/shards/*.tar?split=train")
    assert [s.id for s in globbed.splits["train"]] == [s.id for s in rows]
    with pytest.raises(DataNotFoundError, match="1 of the 4 shards"):
        parse_source(f"{s3_env}/shards/{{00000..00003}}.tar")


@pytest.mark.parametrize("fmt", [tarfile.GNU_FORMAT, tarfile.PAX_FORMAT])
def test_long_names_and_pax_headers_list_as_tarfile_reads_them(tmp_path: Path, fmt: int) -> None:
    long_key = "d" * 60 + "/" + "k" * 120  # beyond ustar's 100-byte name: GNU 'L' or pax path
    samples = [("short", {"jpg": jpeg(0), "cls": "1"}), (long_key, {"jpg": jpeg(1), "cls": "2"}),
               ("naïve", {"jpg": jpeg(2), "cls": "0"})]  # fmt: skip
    with tarfile.open(tmp_path / "0.tar", "w", format=fmt) as tar:
        for key, members in samples:
            for ext, data in members.items():
                raw = data.encode() if isinstance(data, str) else data
                info = tarfile.TarInfo(f"{key}.{ext}")
                info.size = len(raw)
                tar.addfile(info, io.BytesIO(raw))
    source = parse_source(f"{tmp_path}/0.tar?split=train")
    rows = source.splits["train"]
    assert [(s.id, s.label) for s in rows] == [("short", 1), (long_key, 2), ("naïve", 0)]
    assert [source.read_bytes(s) for s in rows] == [m["jpg"] for _, m in samples]
