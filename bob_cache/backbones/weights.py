"""Local weights files: safe loading, unwrapping and fitting to an architecture."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from bob_cache.errors import WeightsError
from bob_cache.hashing import file_sha256


class _PickledClassName:
    """Stands in for a class that old training checkpoints pickle by name only (as a dict key
    of their callback states); it is never instantiated, so loading runs no foreign code."""


# PyTorch Lightning checkpoints (Stable Diffusion's sd-v1-4.ckpt) key callback states by class.
_NAME_ONLY_GLOBALS = [
    (_PickledClassName, "pytorch_lightning.callbacks.model_checkpoint.ModelCheckpoint")
]

_WRAPPER_KEYS = ("state_dict", "model", "model_state", "module", "teacher", "model_ema")
_PREFIXES = ("", "module.", "model.", "backbone.", "encoder.", "teacher.backbone.", "visual.")


@dataclass(frozen=True)
class WeightsFile:
    """A local checkpoint: its path and content hash (the hash goes into the feature key)."""

    path: Path
    sha256: str

    @property
    def tag(self) -> str:
        return f"file-{self.sha256[:8]}"


def parse_weights_file(path: str | Path) -> WeightsFile:
    """Check that ``path`` is a readable file and hash it."""
    p = Path(path).expanduser()
    if not p.is_file():
        raise WeightsError(
            f"Weights file '{path}' does not exist or is not a file. "
            "Pass the path of a .safetensors, .pth or .pt checkpoint with --weights."
        )
    try:
        return WeightsFile(path=p.resolve(), sha256=file_sha256(p))
    except OSError as exc:
        raise WeightsError(f"Cannot read weights file '{path}': {exc.strerror}.") from exc


def load_state_dict(weights: WeightsFile) -> dict[str, torch.Tensor]:
    """Read a checkpoint without executing pickled code (``weights_only=True``)."""
    path = weights.path
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            obj = load_file(str(path), device="cpu")
        else:
            with torch.serialization.safe_globals(_NAME_ONLY_GLOBALS):
                obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # the unpickler fails on garbage with arbitrary exception types
        first_line = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise WeightsError(
            f"Cannot read weights file '{path}' as a PyTorch or safetensors checkpoint "
            f"({first_line}). Expected a state dict saved with torch.save or safetensors; "
            "files that need arbitrary pickled code are refused (weights_only=True): "
            "re-save just the state_dict from a trusted session."
        ) from exc
    return _unwrap(obj, path)


def fit_state_dict(
    model: nn.Module,
    state: dict[str, torch.Tensor],
    *,
    name: str,
    optional_prefixes: Iterable[str] = (),
) -> None:
    """Load ``state`` into ``model`` strictly, tolerating only missing head parameters.

    Args:
        model: the freshly built architecture.
        state: tensors from :func:`load_state_dict`.
        name: architecture name for messages.
        optional_prefixes: parameter-name prefixes (the classifier head) that may be missing.
    """
    expected = model.state_dict()
    state = _strip_best_prefix(state, expected.keys())
    optional = tuple(optional_prefixes)
    missing = [k for k in expected if k not in state and not k.startswith(optional)]
    unexpected = [k for k in state if k not in expected]
    wrong_shape = [
        f"{k}: file {tuple(state[k].shape)} vs model {tuple(expected[k].shape)}"
        for k in expected
        if k in state and state[k].shape != expected[k].shape
    ]
    if missing or unexpected or wrong_shape:
        details = describe_mismatch(missing, unexpected, wrong_shape)
        raise WeightsError(
            f"The weights file does not fit architecture '{name}': {details}. "
            "Check that --backbone names the architecture the checkpoint was trained with "
            "(and --image-size, for ViTs with fixed position embeddings)."
        )
    model.load_state_dict({k: v for k, v in state.items() if k in expected}, strict=False)


def describe_mismatch(missing: list[str], unexpected: list[str], wrong_shape: list[str]) -> str:
    """``missing (2): a, b; unexpected (1): c`` — the first three keys of each non-empty list."""
    return "; ".join(
        f"{label} ({len(items)}): {', '.join(items[:3])}{' ...' if len(items) > 3 else ''}"
        for label, items in (
            ("missing", missing),
            ("unexpected", unexpected),
            ("wrong shape", wrong_shape),
        )
        if items
    )


def _unwrap(obj: object, path: Path) -> dict[str, torch.Tensor]:
    for _ in range(3):
        if isinstance(obj, dict) and obj and all(isinstance(v, torch.Tensor) for v in obj.values()):
            return dict(obj)
        if isinstance(obj, dict):
            inner = next((obj[k] for k in _WRAPPER_KEYS if isinstance(obj.get(k), dict)), None)
            if inner is not None:
                obj = inner
                continue
            tensors = {k: v for k, v in obj.items() if isinstance(v, torch.Tensor)}
            if tensors:
                return tensors
        break
    raise WeightsError(
        f"Weights file '{path}' holds no tensors (got {type(obj).__name__}). Expected a "
        f"state dict, possibly nested under one of {', '.join(_WRAPPER_KEYS)}."
    )


def _strip_best_prefix(
    state: dict[str, torch.Tensor], expected: Iterable[str]
) -> dict[str, torch.Tensor]:
    expected = set(expected)

    def stripped(prefix: str) -> dict[str, torch.Tensor]:
        return {k[len(prefix) :]: v for k, v in state.items() if k.startswith(prefix)}

    best = max(_PREFIXES, key=lambda p: len(expected & stripped(p).keys()))
    return stripped(best)
