"""What extraction checks before it adds shards to a set that already has committed ones.

Resuming must not mix numbers that differ: shards computed by other library versions or on
another device type are refused unless the user allows it (each shard's commit record says
who wrote it, so ``bob-cache info`` shows the mix), and committed rows whose image bytes
changed since (same size, new content) are refused outright.
"""

from __future__ import annotations

import shlex
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import numpy as np

from bob_cache.data import DataSource, Sample
from bob_cache.errors import DataChangedError, MixedEnvironmentError
from bob_cache.progress import progress_bar
from bob_cache.provenance import library_versions
from bob_cache.stores import FeatureSet

WRITER_LIBRARIES = ("torch", "timm")


def writer_identity(device_type: str) -> dict[str, str]:
    """What a shard's commit record says about the environment that computed it."""
    versions = library_versions()
    return {"device": device_type, **{name: versions[name] for name in WRITER_LIBRARIES}}


def check_writers(fs: FeatureSet, current: dict[str, str], *, allow_mixed: bool) -> None:
    """Refuse to add shards computed in another environment than the committed ones."""
    others = [
        w for w in fs.writers() if {k: w.get(k) for k in current} != current and w.get("device")
    ]
    if not others or allow_mixed:
        return
    w = others[0]
    was = ", ".join(f"{k} {w.get(k)}" for k in current)
    now = ", ".join(f"{k} {v}" for k, v in current.items())
    raise MixedEnvironmentError(
        f"Feature set '{fs.path}' has {len(w['shards'])} shard(s) computed with {was}; this run "
        f"has {now}. Resuming would mix numbers from both in one set. Nothing was written. Fix: "
        "run where the set was started, pass --overwrite to recompute it all, or pass "
        "--allow-mixed to accept the mix (each shard records who computed it; "
        "`bob-cache info` lists them)."
    )


def check_content(
    fs: FeatureSet,
    source: DataSource,
    samples: Sequence[Sample],
    *,
    workers: int = 8,
    quiet: bool = True,
) -> None:
    """Re-read the images of committed rows and compare their digests with the stored ones.

    Raises:
        DataChangedError: some committed row's image has other bytes now.
    """
    shards = fs.committed_shards()
    if not shards:
        return
    rows = np.concatenate([np.arange(*fs.layout.shard_bounds(s, fs.n_rows)) for s in shards])
    stored = np.concatenate([_stored_digests(fs, s) for s in shards])
    with (
        ThreadPoolExecutor(max_workers=max(1, workers)) as pool,
        progress_bar(len(rows), desc=f"check {fs.path}", quiet=quiet) as bar,
    ):
        now = []
        for digest in pool.map(lambda r: _digest(source, samples[r]), rows.tolist()):
            now.append(digest)
            bar.update(1)
    changed = np.flatnonzero(np.array(now, dtype=object) != stored)
    if len(changed):
        example = samples[int(rows[changed[0]])].id
        raise DataChangedError(
            f"{len(changed)} image(s) of '{fs.path}' changed since their features were stored "
            f"(e.g. '{example}': other bytes, same size). Resuming would mix features of old "
            "and new images. Nothing was written. Fix: restore the original images, or rerun "
            "with --overwrite to recompute the whole set."
        )


def command_without_part(command: str | None) -> str | None:
    """The command to record: ``--part K/N`` dropped, so rerunning it finishes the whole set."""
    if not command:
        return command
    words, out, skip = shlex.split(command), [], False
    for word in words:
        if skip:
            skip = False
        elif word == "--part":
            skip = True
        elif not word.startswith("--part="):
            out.append(word)
    return shlex.join(out)


def _stored_digests(fs: FeatureSet, shard: int) -> np.ndarray:
    start, stop = fs.layout.shard_bounds(shard, fs.n_rows)
    return np.array([str(d) for d in fs.array("digest")[start:stop]], dtype=object)


def _digest(source: DataSource, sample: Sample) -> Any:
    try:
        return source.digest(sample)
    except Exception:  # unreadable now: '' (what an unreadable row stored)
        return ""
