"""What extraction checks before it adds shards to a set that already has committed ones.

Resuming must not mix numbers that differ: shards computed by other library versions or on
another device type are refused unless the user allows it (each shard's commit record says
who wrote it, so ``bob-cache info`` shows the mix), and committed rows whose image bytes
changed since (same size, new content) are refused outright. An image that cannot be read
now (a timeout, a 403, a permission) says nothing about its content: it stops the run with
the file and the reason, and nothing is written, but it is never taken for a change.
"""

from __future__ import annotations

import shlex
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np

from bob_cache.data import DataSource, Sample
from bob_cache.data.images import error_reason, sample_name
from bob_cache.errors import DataChangedError, DataSourceError, MixedEnvironmentError
from bob_cache.progress import progress_bar
from bob_cache.provenance import library_versions
from bob_cache.stores import FeatureSet
from bob_cache.stores.checksums import array_digest

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
        DamagedDataError: a committed shard's stored digests are damaged (verify --repair).
        DataSourceError: some committed row's image, readable when it was stored, cannot be
            read now (its content is unknown, so nothing is concluded about it).
        DataChangedError: some committed row's image has other bytes now.
    """
    shards = fs.committed_shards()
    if not shards:
        return
    rows = np.concatenate([np.arange(*fs.layout.shard_bounds(s, fs.n_rows)) for s in shards])
    records = fs.commits()
    stored = np.concatenate([_stored_digests(fs, s, records[s]) for s in shards])
    with (
        ThreadPoolExecutor(max_workers=max(1, workers)) as pool,
        progress_bar(len(rows), desc=f"check {fs.path}", quiet=quiet) as bar,
    ):
        now = []
        for digest in pool.map(lambda r: _digest(source, samples[r]), rows.tolist()):
            now.append(digest)
            bar.update(1)
    # a row unreadable when stored kept '' as its digest: unreadable again is no news
    failed = [(f, d) for f, d in zip(now, stored, strict=True) if isinstance(f, _ReadFailure)]
    _raise_read_failures(fs, [f for f, was in failed if was != ""])
    now = ["" if isinstance(f, _ReadFailure) else f for f in now]
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


def _stored_digests(fs: FeatureSet, shard: int, record: dict | None = None) -> np.ndarray:
    """The image digests a committed shard stored, checked against its commit record's
    digest of them: a mismatch is damage to the store, not a change of images."""
    start, stop = fs.layout.shard_bounds(shard, fs.n_rows)
    values = fs.array("digest")[start:stop]  # a failed checksum raises DamagedDataError
    expected = ((record or {}).get("arrays") or {}).get("digest")
    if expected is not None and array_digest(values) != expected:
        raise fs.damage([shard], "its stored image digests differ from their commit record's")
    return np.array([str(d) for d in values], dtype=object)


@dataclass(frozen=True)
class _ReadFailure:
    """A committed row's image that could not be read for the check."""

    name: str
    reason: str


def _digest(source: DataSource, sample: Sample) -> str | _ReadFailure:
    try:
        return source.digest(sample)
    except Exception as exc:  # any reader's failure (OSError, a timeout, a client's 403)
        return _ReadFailure(sample_name(sample), error_reason(exc))


def _raise_read_failures(fs: FeatureSet, failures: list[_ReadFailure]) -> None:
    if not failures:
        return
    first = failures[0]
    raise DataSourceError(
        f"Cannot read {len(failures)} image(s) of '{fs.path}' to check that they are the ones "
        f"its stored features were computed from (e.g. {first.name}: {first.reason}). Their "
        "content is unknown, not changed. Nothing was written. Fix: check that the images "
        "can be read from here (permissions, credentials, network), then rerun the same "
        "command; it resumes where it stopped."
    )
