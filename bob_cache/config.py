"""Stage configurations: plain dataclasses built by the CLI or by Python callers.

``parse_*`` helpers validate loose option strings once, at the boundary.
"""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass, field
from typing import Any, TypeVar

from bob_cache.errors import SpecError

C = TypeVar("C")
GRID = "grid"  # the pooling that keeps every position (dense features, --dense)

DEFAULT_STORE = "bob-store"


# What ``--decode`` names (the id is recorded in the feature spec, so each has its own key).
DECODE_MODES = {
    "pil": "PIL.Image.convert('RGB')",
    "torch": "torchvision.io.decode_jpeg + torchvision Resize/CenterCrop on tensors",
}


@dataclass
class ExtractConfig:
    """Options of ``bob-cache extract`` (see ``bob-cache extract --help``)."""

    data: str
    backbone: str
    store: str = DEFAULT_STORE
    name: str | None = None
    split: str = "all"
    split_fractions: Any = None  # SplitFractions, or its "0.6,0.2,0.2" text (parsed once)
    weights: str | None = None
    random_init: bool = False
    seed: int = 0
    layers: tuple[str, ...] = ("final",)
    pool: str = "default"
    image_size: int | None = None
    dtype: str = "float16"
    precision: str = "auto"
    device: str = "auto"
    batch_size: int = 64
    workers: int | None = None
    decode: str = "pil"
    limit: int | None = None
    strict: bool = False
    chunk_rows: int | None = None
    shard_rows: int | None = None
    compression: str = "zstd:3"
    part: tuple[int, int] | None = None
    scheduler: str | None = None  # a running Dask cluster spreads the shards over its workers
    local_cluster: int | None = None  # ... or a LocalCluster of this many processes
    parts: int | None = None  # parts the shards are split into on a cluster (default 2/worker)
    overwrite: bool = False
    allow_mixed: bool = False
    quiet: bool = False
    storage_options: dict[str, Any] = field(default_factory=dict)
    command: str | None = None

    def __post_init__(self) -> None:
        from bob_cache.data.splits import parse_split_fractions

        self.split_fractions = parse_split_fractions(self.split_fractions)
        if self.batch_size < 1:
            raise SpecError(f"--batch-size must be at least 1, got {self.batch_size}.")
        if self.limit is not None and self.limit < 1:
            raise SpecError(f"--limit must be at least 1, got {self.limit}.")
        if self.workers is not None and self.workers < 0:
            raise SpecError(f"--workers must be 0 or more, got {self.workers}.")
        if self.decode not in DECODE_MODES:
            raise SpecError(
                f"Unknown --decode '{self.decode}'. Expected {' or '.join(DECODE_MODES)}."
            )
        if (self.scheduler or self.local_cluster) and self.part is not None:
            raise SpecError(
                "--part cannot be combined with --scheduler/--local-cluster: the cluster runs "
                "every part itself. Drop --part (or --parts N to choose how many)."
            )
        if self.scheduler and self.local_cluster:
            raise SpecError("Pass --scheduler or --local-cluster, not both.")
        for option, value in (("--local-cluster", self.local_cluster), ("--parts", self.parts)):
            if value is not None and value < 1:
                raise SpecError(f"{option} must be at least 1, got {value}.")
        if self.part is not None and self.overwrite:
            raise SpecError(
                "--overwrite cannot be combined with --part: it would delete shards other "
                "parts wrote. Overwrite once without --part, then run the parts."
            )

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def request(self) -> dict[str, Any]:
        """What was asked for, canonically (recorded in each set; the battle finds done
        extractions by it): every option that changes the numbers, as given."""
        from bob_cache.backbones.weights import parse_weights_file

        weights = parse_weights_file(self.weights).sha256 if self.weights else None
        return {
            "backbone": self.backbone, "weights": weights, "random_init": self.random_init,
            "seed": self.seed if self.random_init else None, "layers": list(self.layers),
            "pool": self.pool, "image_size": self.image_size, "dtype": self.dtype,
            "precision": self.precision, "decode": self.decode, "limit": self.limit,
        }  # fmt: skip


def parse_layers(text: str) -> tuple[str, ...]:
    """``final,-2,layer3`` → ``('final', '-2', 'layer3')``."""
    layers = tuple(p.strip() for p in text.split(",") if p.strip())
    if not layers:
        raise SpecError(
            "--layers is empty. Pass 'final' or a comma-separated list such as final,-2."
        )
    return layers


def parse_part(text: str | None) -> tuple[int, int] | None:
    """``K/N`` → ``(K, N)`` with ``0 <= K < N``."""
    if text is None:
        return None
    k, sep, n = text.partition("/")
    try:
        part = (int(k), int(n))
    except ValueError:
        part = None
    if not sep or part is None or not 0 <= part[0] < part[1]:
        raise SpecError(f"--part '{text}' is not K/N with 0 <= K < N (e.g. --part 0/4).")
    return part


def resolve_workers(workers: int | None, device: str = "cpu") -> int:
    """Default loader processes: one per spare core; at most 8 unless the model runs on a GPU.

    On a CPU the model's own threads need the cores. On a GPU, decoding on the host is the
    limit (an H100 runs resnet50 at bf16 5-10× faster than 15 cores decode JPEGs), so every
    spare core decodes: on a 16-core machine 15 workers fed 2,160 img/s where 8 fed 1,200.
    """
    if workers is not None:
        return workers
    spare = max(1, (os.cpu_count() or 2) - 1)
    return spare if device.startswith("cuda") else min(8, spare)


def without_loaders_in_daemon(config: C) -> C:
    """``config`` with ``workers=0`` when this process is daemonic (a Dask worker by default),
    which cannot start loader processes: images are then decoded in-process. Start workers with
    ``DASK_DISTRIBUTED__WORKER__DAEMON=False`` to decode in parallel."""
    import multiprocessing
    from dataclasses import replace

    if multiprocessing.current_process().daemon and getattr(config, "workers", 0) != 0:
        return replace(config, workers=0)
    return config


def parse_numbers(text: str | None, kind: type, option: str) -> tuple:
    """``"1,5,10"`` → ``(1, 5, 10)`` of ``kind`` (int or float); empty or None → ``()``."""
    if not text:
        return ()
    try:
        return tuple(kind(p) for p in text.split(",") if p.strip())
    except ValueError:
        name = "integers" if kind is int else "numbers"
        raise SpecError(
            f"{option} '{text}' is not a comma-separated list of {name} (e.g. 1,5,10)."
        ) from None
