"""The shift stage: corrupted copies in the source's layout (folders, manifests, digits),
provenance, reruns and partial outputs, workers, a probe that degrades with severity, and
the CLI end to end (shift, then extract the copy)."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest

import bob_cache.pipelines.shift as shift_module
from bob_cache.data import parse_source
from bob_cache.pipelines.shift import ShiftConfig, ShiftOutputExistsError, shift
from tests.conftest import TINY, write_image_folder


def run(data: str | Path, out: Path, corruptions=("gaussian_noise",), severities=(3,), **kw):
    config = ShiftConfig(
        data=str(data), out=str(out), corruptions=tuple(corruptions),
        severities=tuple(severities), quiet=True, **kw,
    )  # fmt: skip
    return shift(config)


def files(root: Path) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in root.rglob("*") if p.is_file()
            and p.name != "shift.json"}  # fmt: skip


def test_digits_become_split_and_class_folders(tmp_path: Path) -> None:
    summary = run("builtin:digits", tmp_path / "out", limit=20, seed=3)
    [output] = summary.outputs
    assert output["status"] == "written" and output["images_written"] == 60
    root = tmp_path / "out" / "digits-gaussian_noise-3"
    assert output["data"] == str(root)
    clean, copy = parse_source("builtin:digits"), parse_source(str(root))
    assert copy.class_names == clean.class_names
    assert {s: len(rows) for s, rows in copy.splits.items()} == {"test": 20, "train": 20, "val": 20}
    for split, rows in copy.splits.items():
        original = {s.id.split("/")[-1]: s for s in clean.splits[split][:20]}
        for s in rows:  # e.g. train/3/00012.png holds digits/00012, a 3
            source = original[Path(s.id).stem]
            assert s.label == source.label and s.id == f"{split}/{source.label}/{Path(s.id).name}"
            image = np.asarray(copy.open_image(s))
            assert image.shape == (8, 8, 3)
            assert not np.array_equal(image, np.asarray(clean.open_image(source)))
    provenance = json.loads((root / "shift.json").read_text())
    assert provenance["seed"] == 3 and provenance["severity"] == 3
    assert provenance["source"]["fingerprint"] == clean.fingerprint()
    assert provenance["family"] == "noise" and provenance["layout"] == "imagefolder"
    assert {"numpy", "scipy", "pillow", "bob-cache"} <= set(provenance["versions"])
    assert not list((tmp_path / "out").glob(".*"))  # no partial folder left behind


def test_folder_copy_keeps_split_class_folders_and_file_names(tmp_path: Path) -> None:
    photos = write_image_folder(tmp_path / "photos", per_class=2)
    run(photos, tmp_path / "out", corruptions=("motion_blur",), severities=(2,))
    root = tmp_path / "out" / "photos-motion_blur-2"
    clean, copy = parse_source(str(photos)), parse_source(str(root))
    assert copy.class_names == clean.class_names
    for split in ("train", "val"):
        assert [(s.id, s.label) for s in copy.splits[split]] == [
            (s.id, s.label) for s in clean.splits[split]
        ]
    jpeg = next(s for s in copy.splits["train"] if s.id.endswith(".jpg"))
    assert (root / jpeg.id).read_bytes()[:3] == b"\xff\xd8\xff"  # still a JPEG
    png = next(s for s in copy.splits["train"] if s.id.endswith(".png"))
    assert (root / png.id).read_bytes()[:4] == b"\x89PNG"


def test_unreadable_images_are_skipped_and_listed(tmp_path: Path) -> None:
    photos = write_image_folder(tmp_path / "photos", splits=("",), per_class=1)
    (photos / "cat" / "broken.jpg").write_bytes(b"\xff\xd8\xff not a JPEG")
    (photos / "cat" / "grey.bmp").write_bytes((photos / "cat" / "cat_00.png").read_bytes())
    summary = run(photos, tmp_path / "out", corruptions=("contrast",), severities=(1,))
    [output] = summary.outputs
    assert [u["id"] for u in output["unreadable"]] == ["cat/broken.jpg"]
    assert "UnidentifiedImageError" in output["unreadable"][0]["reason"]
    root = Path(output["data"])
    # split by id hash (a class folder without splits): the copy has the split folders
    assert sorted(p.name for p in root.glob("*/cat/*")) == ["cat_00.png", "grey.bmp.png"]
    assert json.loads((root / "shift.json").read_text())["unreadable"] == output["unreadable"]


def test_a_class_folder_without_splits_is_copied_with_its_id_hash_split(tmp_path: Path) -> None:
    photos = write_image_folder(tmp_path / "photos", splits=("",), per_class=5)
    clean = parse_source(str(photos))
    whole = run(photos, tmp_path / "all", corruptions=("contrast",), severities=(1,))
    copy = parse_source(whole.outputs[0]["data"])
    assert copy.split_rule.kind == "distributed"  # the split travels as split folders
    for split, rows in clean.splits.items():
        assert [s.id for s in copy.splits[split]] == [f"{split}/{s.id}" for s in rows]
    test_only = run(photos, tmp_path / "test", corruptions=("contrast",), severities=(1,),
                    split="test")  # fmt: skip
    copy = parse_source(test_only.outputs[0]["data"])  # the same test images, not re-split
    assert {k: [s.id for s in v] for k, v in copy.splits.items()} == {
        "test": [f"test/{s.id}" for s in clean.splits["test"]]
    }


def test_manifest_copy_keeps_ids_labels_and_splits(tmp_path: Path) -> None:
    photos = write_image_folder(tmp_path / "photos", splits=("",), per_class=2)
    images = sorted(photos.rglob("*.*"))
    manifest = tmp_path / "meta" / "pets.csv"
    manifest.parent.mkdir()
    with open(manifest, "w", newline="") as f:
        rows = csv.writer(f)
        rows.writerow(["id", "path", "label", "split"])
        for i, path in enumerate(images):
            label = "" if i == 0 else path.parent.name
            rows.writerow([f"img-{i}", f"../photos/{path.relative_to(photos)}", label,
                           "train" if i % 3 else "test"])  # fmt: skip
    summary = run(manifest, tmp_path / "out", corruptions=("pixelate",), severities=(5,))
    data = Path(summary.outputs[0]["data"])
    assert data == tmp_path / "out" / "pets-pixelate-5" / "pets-pixelate-5.csv"
    clean, copy = parse_source(str(manifest)), parse_source(str(data))
    assert copy.class_names == clean.class_names
    for split in ("train", "test"):
        assert [(s.id, s.label) for s in copy.splits[split]] == [
            (s.id, s.label) for s in clean.splits[split]
        ]
        for a, b in zip(clean.splits[split], copy.splits[split], strict=True):
            assert np.asarray(copy.open_image(b)).shape == np.asarray(clean.open_image(a)).shape
            assert Path(b.location).is_relative_to(data.parent / "images")


def test_rerun_skips_finished_copies(tmp_path: Path) -> None:
    first = run("builtin:digits", tmp_path, limit=5, severities=(1, 5))
    before = {p: p.stat().st_mtime_ns for p in tmp_path.rglob("*.png")}
    again = run("builtin:digits", tmp_path, limit=5, severities=(1, 5))
    assert [o["status"] for o in first.outputs] == ["written", "written"]
    assert [o["status"] for o in again.outputs] == ["done", "done"]
    assert again.images_written == 0
    assert {p: p.stat().st_mtime_ns for p in tmp_path.rglob("*.png")} == before


def test_a_killed_run_is_completed_to_the_same_bytes(tmp_path: Path, monkeypatch) -> None:
    calls = {"n": 0}
    real = shift_module._corrupt_one

    def dies_after_seven(task, source=None):
        calls["n"] += 1
        if calls["n"] > 7:
            raise KeyboardInterrupt
        return real(task, source)

    monkeypatch.setattr(shift_module, "_corrupt_one", dies_after_seven)
    with pytest.raises(KeyboardInterrupt):
        run("builtin:digits", tmp_path / "a", limit=5, corruptions=("snow",))
    monkeypatch.setattr(shift_module, "_corrupt_one", real)
    final = tmp_path / "a" / "digits-snow-3"
    partial = tmp_path / "a" / ".digits-snow-3.partial"
    assert not final.exists() and len(list(partial.rglob("*.png"))) == 7  # never half-visible
    resumed = run("builtin:digits", tmp_path / "a", limit=5, corruptions=("snow",))
    assert resumed.outputs[0]["status"] == "resumed" and resumed.images_written == 8
    fresh = run("builtin:digits", tmp_path / "b", limit=5, corruptions=("snow",))
    assert files(final) == files(tmp_path / "b" / "digits-snow-3")
    assert fresh.images_written == 15 and not partial.exists()


def test_a_partial_copy_with_other_settings_is_rewritten(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setattr(shift_module, "_corrupt_one", _interrupt)
    with pytest.raises(KeyboardInterrupt):
        run("builtin:digits", tmp_path, limit=3, seed=1)
    monkeypatch.undo()
    summary = run("builtin:digits", tmp_path, limit=3, seed=2)
    assert summary.outputs[0]["status"] == "written" and summary.images_written == 9
    assert (
        json.loads((tmp_path / "digits-gaussian_noise-3" / "shift.json").read_text())["seed"] == 2
    )


def _interrupt(task, source=None):
    raise KeyboardInterrupt


def test_other_settings_are_refused_unless_overwrite(tmp_path: Path) -> None:
    run("builtin:digits", tmp_path, limit=3, seed=0)
    with pytest.raises(ShiftOutputExistsError, match="Pass --overwrite to replace it"):
        run("builtin:digits", tmp_path, limit=3, seed=1)
    replaced = run("builtin:digits", tmp_path, limit=3, seed=1, overwrite=True)
    assert replaced.outputs[0]["status"] == "written"
    provenance = json.loads((tmp_path / "digits-gaussian_noise-3" / "shift.json").read_text())
    assert provenance["seed"] == 1
    (tmp_path / "stranger" / "digits-gaussian_noise-3").mkdir(parents=True)
    with pytest.raises(ShiftOutputExistsError, match="Move it away or choose another --out"):
        run("builtin:digits", tmp_path / "stranger", limit=3, overwrite=True)


def test_workers_write_the_same_bytes(tmp_path: Path) -> None:
    run("builtin:digits", tmp_path / "a", limit=4, corruptions=("glass_blur",), workers=2)
    run("builtin:digits", tmp_path / "b", limit=4, corruptions=("glass_blur",))
    a, b = (
        files(tmp_path / "a" / "digits-glass_blur-3"),
        files(tmp_path / "b" / "digits-glass_blur-3"),
    )
    assert len(a) == 12 and a == b


def test_probe_accuracy_drops_more_at_severity_five(tmp_path: Path) -> None:
    """A linear probe on clean digits' pixels loses more on severity-5 copies than on 1."""
    from sklearn.linear_model import LogisticRegression

    clean = parse_source("builtin:digits")

    def pixels(source, split):
        rows = source.splits[split]
        # grey digits: one channel of the RGB rendering is enough for a linear probe
        x = np.stack([np.asarray(source.open_image(s), np.float32)[..., 0].ravel() for s in rows])
        return x / 255.0, np.array([s.label for s in rows])

    probe = LogisticRegression(max_iter=2000).fit(*pixels(clean, "train"))
    clean_acc = probe.score(*pixels(clean, "test"))
    summary = run("builtin:digits", tmp_path, corruptions=("gaussian_noise", "gaussian_blur"),
                  severities=(1, 5), split="test")  # fmt: skip
    accuracy = {
        (o["corruption"], o["severity"]): probe.score(*pixels(parse_source(o["data"]), "test"))
        for o in summary.outputs
    }
    for name in ("gaussian_noise", "gaussian_blur"):
        assert accuracy[name, 5] < accuracy[name, 1] - 0.03, accuracy
        assert accuracy[name, 1] <= clean_acc + 0.02
    assert clean_acc > 0.9


def test_cli_shift_then_extract_the_copy(cli, tmp_path: Path) -> None:
    out, store = tmp_path / "shifted", tmp_path / "store"
    result = cli("shift", "--data", "builtin:digits", "--out", out, "--corruption", "zoom_blur",
                 "--severity", "2", "--limit", "20", "--json")  # fmt: skip
    assert result.exit_code == 0, result.output
    [output] = json.loads(result.stdout)["outputs"]
    assert output["status"] == "written" and output["data"] == str(out / "digits-zoom_blur-2")
    done = cli("extract", "--data", output["data"], "--store", store, "--json", *TINY)
    assert done.exit_code == 0, done.output
    sets = json.loads(done.stdout)["feature_sets"]
    assert sorted(s["split"] for s in sets) == ["test", "train", "val"]
    assert {s["rows"] for s in sets} == {20}
    copy = parse_source(output["data"])
    assert copy.name == "digits-zoom_blur-2" and copy.class_names == [str(d) for d in range(10)]
    again = cli("shift", "--data", "builtin:digits", "--out", out, "--corruption", "zoom_blur",
                "--severity", "2", "--limit", "20")  # fmt: skip
    assert again.exit_code == 0 and "done" in again.stdout


def test_cli_shift_of_a_manifest_with_absolute_paths_prints_sane_paths(cli, tmp_path: Path) -> None:
    photos = write_image_folder(tmp_path / "photos", splits=("",), per_class=1)
    broken = photos / "cat" / "broken.jpg"
    broken.write_bytes(b"\xff\xd8\xff not a JPEG")
    manifest = tmp_path / "meta" / "abs.csv"
    manifest.parent.mkdir()
    with open(manifest, "w", newline="") as f:
        rows = csv.writer(f)
        rows.writerow(["path", "label", "split"])
        for path in [*sorted(photos.rglob("*.png")), broken]:
            rows.writerow([str(path.resolve()), path.parent.name, "val"])
    out = tmp_path / "out"
    result = cli("shift", "--data", manifest, "--out", out, "--corruption", "contrast",
                 "--severity", "1")  # fmt: skip
    assert result.exit_code == 0, result.output
    text = result.output
    assert f"unreadable (val): {broken.resolve()}: UnidentifiedImageError" in text
    assert "//" not in text and f"val/{broken.resolve()}" not in text
    data = out / "abs-contrast-1" / "abs-contrast-1.csv"
    assert f"--data {data}" in text
    with open(data, newline="") as f:
        written = list(csv.DictReader(f))
    assert len(written) == 3  # the three readable images
    for row in written:  # relative to the copy's folder, inside it
        assert not Path(row["path"]).is_absolute() and row["path"].startswith("images/val/")
        assert (data.parent / row["path"]).is_file()


def test_cli_errors_exit_1_with_the_fix(cli, tmp_path: Path) -> None:
    args = ("shift", "--data", "builtin:digits", "--out", tmp_path)
    unknown = cli(*args, "--corruption", "gausian_noise", "--severity", "1")
    assert unknown.exit_code == 1
    text = " ".join(unknown.output.split())
    assert "Did you mean 'gaussian_noise'" in text and "Valid names: gaussian_noise," in text
    for bad in ("0", "6", "1,9"):
        severity = cli(*args, "--corruption", "fog", "--severity", bad)
        assert severity.exit_code == 1
        assert "is outside 1..5" in severity.output and "--severity 1-5" in severity.output
    assert not list(tmp_path.iterdir())  # nothing written before the checks


def test_help_has_an_example_and_corruptions_lists_them(cli) -> None:
    assert "Example: bob-cache shift" in cli("shift", "--help").output
    assert "Example: bob-cache corruptions" in cli("corruptions", "--help").output
    listed = json.loads(cli("corruptions", "--json").stdout)
    assert len(listed) == 18 and listed[0] == {
        "name": "gaussian_noise", "family": "noise", "random": True, "min_side": 1,
    }  # fmt: skip
    blur = cli("corruptions", "--family", "blur")
    assert blur.exit_code == 0 and "zoom_blur" in blur.output and "fog" not in blur.output


class _Killed(BaseException):
    """Stands for SIGKILL: nothing after it runs, no ``except Exception`` catches it."""


def _kill_at(monkeypatch: pytest.MonkeyPatch, step: str) -> None:
    from bob_cache.stores import feature_set as feature_set_module

    def kill(name: str) -> None:
        if name == step:
            raise _Killed(name)

    monkeypatch.setattr(feature_set_module, "crash_point", kill)


def _no_leftovers(out: Path) -> None:
    assert [p.name for p in out.iterdir() if p.name.startswith(".")] == []
    assert not [p for p in out.rglob("*") if ".tmp" in p.name]


@pytest.mark.parametrize("step", ["shift-images", "shift-provenance", "shift-unmark",
                                  "folder-rename"])  # fmt: skip
def test_a_copy_killed_at_any_step_is_finished_by_the_same_command(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, step: str
) -> None:
    fresh = run("builtin:digits", tmp_path / "fresh", limit=2)
    final = tmp_path / "out" / "digits-gaussian_noise-3"
    with monkeypatch.context() as mp, pytest.raises(_Killed):
        _kill_at(mp, step)
        run("builtin:digits", tmp_path / "out", limit=2)
    assert final.exists() == (step == "folder-rename")  # only ever visible whole
    again = run("builtin:digits", tmp_path / "out", limit=2)
    assert again.outputs[0]["status"] == ("done" if step == "folder-rename" else "resumed")
    assert files(final) == files(tmp_path / "fresh" / "digits-gaussian_noise-3")
    key = json.loads((final / "shift.json").read_text())["key"]
    assert fresh.outputs[0]["status"] == "written" and key
    _no_leftovers(tmp_path / "out")


@pytest.mark.parametrize("step", ["shift-unmark", "folder-retire", "folder-rename"])
def test_an_overwrite_killed_at_any_step_keeps_a_whole_copy_and_finishes(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, step: str
) -> None:
    run("builtin:digits", tmp_path / "new", limit=2, seed=1)
    new = files(tmp_path / "new" / "digits-gaussian_noise-3")
    run("builtin:digits", tmp_path / "out", limit=2, seed=0)
    final = tmp_path / "out" / "digits-gaussian_noise-3"
    old = files(final)
    with monkeypatch.context() as mp, pytest.raises(_Killed):
        _kill_at(mp, step)
        run("builtin:digits", tmp_path / "out", limit=2, seed=1, overwrite=True)
    # the old copy whole, the new one whole, or (between the two renames) neither
    assert (files(final) if final.exists() else None) in (old, new, None)
    assert final.exists() or step == "folder-retire"
    run("builtin:digits", tmp_path / "out", limit=2, seed=1, overwrite=True)
    assert files(final) == new
    assert json.loads((final / "shift.json").read_text())["seed"] == 1
    _no_leftovers(tmp_path / "out")


def test_a_full_disk_at_the_provenance_is_finished_by_the_same_command(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import errno

    from bob_cache.errors import StoreFullError

    write_text = shift_module.write_text

    def full_disk(path: Path, text: str) -> None:
        if path.name == shift_module.PROVENANCE:  # every image written, then the disk is full
            raise OSError(errno.ENOSPC, "No space left on device")
        write_text(path, text)

    with (
        monkeypatch.context() as mp,
        pytest.raises(StoreFullError, match="No space left.*rerun the same command"),
    ):
        mp.setattr(shift_module, "write_text", full_disk)
        run("builtin:digits", tmp_path / "out", limit=2)
    assert not (tmp_path / "out" / "digits-gaussian_noise-3").exists()
    again = run("builtin:digits", tmp_path / "out", limit=2)
    assert again.outputs[0]["status"] == "resumed"
    run("builtin:digits", tmp_path / "fresh", limit=2)
    final, fresh = (tmp_path / d / "digits-gaussian_noise-3" for d in ("out", "fresh"))
    assert files(final) == files(fresh)
    _no_leftovers(tmp_path / "out")
