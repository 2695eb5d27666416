"""A deterministic synthetic detection and segmentation dataset: coloured shapes on textures.

``write_synth_shapes`` writes ``train/`` and ``val/`` folders of RGB images and semantic masks
(0 background, k = class k, 255 a 1-px ignore band on each shape's visible outline), a COCO
instances file per split, and ``classes.json`` last of all: its presence means complete.

Each image has 1 to 4 shapes (circle, square, triangle), each a polygon (the circle has
``CIRCLE_VERTICES``), so the COCO polygon and the mask agree. Image ``i`` is the same for any
``n``: its layout comes from a generator seeded by (seed, i) alone, so both styles share every
layout and annotation, its pixels from one seeded by (seed, style, i). Styles are registered:
``a`` light noise or stripes with saturated colours, ``b`` a cross-domain target
(checkerboards or gradients, darker, pastel colours).
"""

from __future__ import annotations

import io
import json
import math
import os
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageDraw

from bob_cache.errors import DataSourceError, SpecError, did_you_mean
from bob_cache.hashing import stable_hash
from bob_cache.progress import progress_bar
from bob_cache.registry import Registry

# Bump when any image, mask or annotation changes: it names the generator in each COCO "info".
SYNTH_VERSION = 1
SYNTH_CLASSES = ("circle", "square", "triangle")
IGNORE_INDEX = 255
BACKGROUND = 0
SPLITS = ("train", "val")
CIRCLE_VERTICES = 32
MAX_SHAPES = 4
MIN_RADIUS = 8.0  # circumradius: a triangle of radius 8 is 12 px tall, a circle 16 px wide
PLACE_TRIES = 20
MIN_SIZE, MAX_SIZE = 32, 2048
CLASSES_FILE = "classes.json"
_VERTICES = {"circle": CIRCLE_VERTICES, "square": 4, "triangle": 3}
_PNG = re.compile(r"^\d{6}\.png$")
_TMP = re.compile(r"^\..*\.tmp$")  # a temporary file of an interrupted write

TextureFn = Callable[[int, np.ndarray, np.random.Generator], np.ndarray]
Colour = tuple[int, int, int]


@dataclass(frozen=True)
class SynthStyle:
    """How a style paints: ``texture(size, base colour, rng)`` gives a float H × W × 3 image."""

    name: str
    description: str
    base: tuple[float, float]  # range of the background's base level, per channel
    textures: tuple[TextureFn, ...]
    palette: tuple[Colour, ...]  # at least MAX_SHAPES: the shapes of an image differ
    grain: float  # std of the per-pixel noise over the finished image


@dataclass(frozen=True)
class SynthShape:
    """One shape: its class id (1..3) and its polygon ``(x1, y1, x2, y2, ...)`` in pixels."""

    category_id: int
    polygon: tuple[float, ...]

    def area(self) -> float:
        """The polygon's area (shoelace), rounded to 2 decimals."""
        x, y = np.asarray(self.polygon[::2]), np.asarray(self.polygon[1::2])
        return round(0.5 * abs(float(np.dot(x, np.roll(y, 1)) - np.dot(y, np.roll(x, 1)))), 2)

    def bbox(self, size: int) -> list[float]:
        """The polygon's tight ``[x, y, w, h]``, clipped to a ``size`` × ``size`` image."""
        x = np.clip(self.polygon[::2], 0, size)
        y = np.clip(self.polygon[1::2], 0, size)
        x0, y0 = float(x.min()), float(y.min())
        return [round(x0, 2), round(y0, 2), round(x.max() - x0, 2), round(y.max() - y0, 2)]


@dataclass(frozen=True)
class SynthImage:
    """A rendered image (uint8 H × W × 3), its semantic mask (uint8 H × W) and its shapes."""

    image: np.ndarray = field(repr=False)
    mask: np.ndarray = field(repr=False)
    shapes: tuple[SynthShape, ...]


@dataclass(frozen=True)
class SynthShapesOptions:
    """Everything that decides a synth-shapes folder's content (validated on creation).

    Raises:
        SpecError: ``n`` under 2, ``image_size`` outside 32..2048, ``val_fraction`` outside
            (0, 1), a split left empty, or an unknown style.
    """

    out: Path
    n: int
    seed: int = 0
    style: str = "a"
    image_size: int = 128
    val_fraction: float = 0.25

    def __post_init__(self) -> None:
        object.__setattr__(self, "out", Path(self.out).expanduser())
        _check_int("n", self.n, low=2, fix="use --n 2 or more (a train and a val image)")
        _check_int("seed", self.seed, low=0, fix="use --seed 0 or another non-negative integer")
        _check_int(
            "image_size", self.image_size, low=MIN_SIZE, high=MAX_SIZE, fix="use --image-size 128"
        )
        vf = self.val_fraction
        if isinstance(vf, bool) or not isinstance(vf, (int, float)) or not 0 < vf < 1:
            raise SpecError(
                f"val_fraction must be a number strictly between 0 and 1, got {vf!r}. "
                "Fix: use --val-fraction 0.25."
            )
        get_synth_style(self.style)
        if self.n_train >= self.n:
            raise SpecError(
                f"val_fraction {vf} of n={self.n} images leaves the val split empty (train takes "
                f"ceil(n * (1 - val_fraction)) = {self.n_train}). Use a larger --n or a larger "
                "--val-fraction."
            )

    @property
    def n_train(self) -> int:
        """Train takes the first ceil(n * (1 - val_fraction)) images, val the rest."""
        return math.ceil(round(self.n * (1 - self.val_fraction), 9))

    def split_indices(self) -> dict[str, range]:
        return {"train": range(self.n_train), "val": range(self.n_train, self.n)}

    def classes_record(self) -> dict[str, Any]:
        """The content of ``classes.json``: the contract's keys, then ``val_fraction``."""
        return {
            "classes": list(SYNTH_CLASSES),
            "ignore_index": IGNORE_INDEX,
            "background": BACKGROUND,
            "style": self.style,
            "seed": self.seed,
            "n": self.n,
            "image_size": self.image_size,
            "val_fraction": self.val_fraction,
        }


def _check_int(name: str, value: Any, *, low: int, high: int | None = None, fix: str) -> None:
    ok = isinstance(value, int) and not isinstance(value, bool) and value >= low
    if not ok or (high is not None and value > high):
        wanted = f"an integer from {low} to {high}" if high else f"an integer of at least {low}"
        raise SpecError(f"{name} must be {wanted}, got {value!r}. Fix: {fix}.")


# --- styles -------------------------------------------------------------------------------------

STYLES: Registry[SynthStyle] = Registry("synth-shapes style", error=SpecError)


def register_synth_style(style: SynthStyle) -> SynthStyle:
    """Add ``style`` to the registry under its name."""
    return STYLES.register(style.name, style)


def list_synth_styles() -> list[str]:
    return sorted(STYLES)


def get_synth_style(name: str) -> SynthStyle:
    """The registered style ``name``.

    Raises:
        SpecError: no style of that name (the message lists the known ones).
    """
    try:
        return STYLES.get(name)
    except (SpecError, TypeError):
        known = ", ".join(f"'{s}'" for s in list_synth_styles())
        hint = did_you_mean(str(name), STYLES)
        raise SpecError(
            f"Unknown synth-shapes style {name!r}.{hint} Known styles: {known}; "
            f"use e.g. --style {list_synth_styles()[0]}."
        ) from None


def _grid(size: int) -> tuple[np.ndarray, np.ndarray]:
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float64) + 0.5
    return xx, yy


def _noise(size: int, base: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    return base + rng.normal(0.0, rng.uniform(8.0, 16.0), (size, size, 3))


def _stripes(size: int, base: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    angle, period = rng.uniform(0.0, math.pi), rng.uniform(6.0, 16.0)
    phase, amplitude = rng.uniform(0.0, 2 * math.pi), rng.uniform(12.0, 24.0)
    xx, yy = _grid(size)
    wave = np.sin(2 * math.pi * (xx * math.cos(angle) + yy * math.sin(angle)) / period + phase)
    return base + amplitude * wave[..., None]


def _checkerboard(size: int, base: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    cell = int(rng.integers(4, 17))
    ox, oy = rng.integers(0, cell, 2)
    contrast = rng.uniform(15.0, 30.0)
    xx, yy = _grid(size)
    board = ((xx + ox) // cell + (yy + oy) // cell) % 2 * 2 - 1
    return base + contrast * board[..., None]


def _gradient(size: int, base: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    angle = rng.uniform(0.0, 2 * math.pi)
    other = base + rng.uniform(-40.0, 40.0, 3)
    xx, yy = _grid(size)
    t = ((xx - size / 2) * math.cos(angle) + (yy - size / 2) * math.sin(angle)) / size + 0.5
    return base + (other - base) * np.clip(t, 0.0, 1.0)[..., None]


# Saturated primaries (style a) and pastels (style b); at least MAX_SHAPES colours each.
_PRIMARIES = ((220, 20, 20), (20, 160, 30), (25, 50, 220), (235, 200, 0), (200, 0, 200), (0, 170, 200), (240, 120, 0))  # fmt: skip  # noqa: E501
_PASTELS = ((255, 179, 186), (255, 223, 186), (255, 255, 186), (186, 255, 201), (186, 225, 255), (215, 190, 255))  # fmt: skip  # noqa: E501

register_synth_style(
    SynthStyle(
        name="a",
        description="light noise or stripe backgrounds, saturated primary colours",
        base=(185.0, 235.0),
        textures=(_noise, _stripes),
        palette=_PRIMARIES,
        grain=4.0,
    )
)
register_synth_style(
    SynthStyle(
        name="b",
        description="darker checkerboard or gradient backgrounds, pastel colours",
        base=(35.0, 85.0),
        textures=(_checkerboard, _gradient),
        palette=_PASTELS,
        grain=6.0,
    )
)


# --- rendering ----------------------------------------------------------------------------------


def synth_rng(*key: Any) -> np.random.Generator:
    """A generator seeded by a hash of ``key`` (e.g. ("layout", seed, index))."""
    return np.random.default_rng(int(stable_hash(["synth-shapes", *key]), 16))


def sample_layout(index: int, *, seed: int, image_size: int) -> tuple[SynthShape, ...]:
    """The shapes of image ``index``: 1..4, inside the image, no centre under another shape's.

    A shape that finds no free place in ``PLACE_TRIES`` draws is left out (never the first).
    """
    rng = synth_rng("layout", seed, index)
    r_lo = max(MIN_RADIUS, 0.1 * image_size)
    r_hi = max(r_lo, 0.25 * image_size)
    placed: list[tuple[float, float, float]] = []
    shapes: list[SynthShape] = []
    for _ in range(int(rng.integers(1, MAX_SHAPES + 1))):
        for _try in range(PLACE_TRIES):
            k = int(rng.integers(1, len(SYNTH_CLASSES) + 1))
            r = float(rng.uniform(r_lo, r_hi))
            cx, cy = (float(v) for v in rng.uniform(r, image_size - r, 2))
            angle = float(rng.uniform(0.0, 2 * math.pi))
            if all(math.hypot(cx - x, cy - y) >= max(r, pr) for x, y, pr in placed):
                placed.append((cx, cy, r))
                shapes.append(_regular_polygon(k, cx, cy, r, angle, image_size))
                break
    return tuple(shapes)


def _regular_polygon(k: int, cx: float, cy: float, r: float, angle: float, size: int) -> SynthShape:
    count = _VERTICES[SYNTH_CLASSES[k - 1]]
    theta = angle + np.arange(count) * (2 * math.pi / count)
    xy = np.stack([cx + r * np.cos(theta), cy + r * np.sin(theta)], axis=1)
    xy = np.round(np.clip(xy, 0.0, float(size)), 2) + 0.0  # + 0.0: no "-0.0" in the JSON
    return SynthShape(category_id=k, polygon=tuple(float(v) for v in xy.ravel()))


def render_synth_image(index: int, *, seed: int, style: str, image_size: int) -> SynthImage:
    """Image ``index`` of a synth-shapes dataset, with its mask and shapes (no files written)."""
    shapes = sample_layout(index, seed=seed, image_size=image_size)
    look = get_synth_style(style)
    rng = synth_rng("pixels", seed, style, index)
    base = rng.uniform(*look.base, 3)
    texture = look.textures[int(rng.integers(len(look.textures)))]
    background = np.clip(texture(image_size, base, rng), 0, 255).astype(np.uint8)
    canvas = Image.fromarray(background)
    mask = Image.new("L", (image_size, image_size), BACKGROUND)
    paint, label = ImageDraw.Draw(canvas), ImageDraw.Draw(mask)
    picks = rng.choice(len(look.palette), size=len(shapes), replace=False)  # distinct colours
    for shape, pick in zip(shapes, picks, strict=True):  # later on top, covering outlines
        colour = np.asarray(look.palette[int(pick)], dtype=float)
        fill = tuple(int(v) for v in np.clip(colour + rng.normal(0.0, 8.0, 3), 0, 255))
        paint.polygon(shape.polygon, fill=fill)
        label.polygon(shape.polygon, fill=shape.category_id)
        label.polygon(shape.polygon, outline=IGNORE_INDEX, width=1)
    pixels = np.asarray(canvas, dtype=np.float64) + rng.normal(0.0, look.grain, background.shape)
    image = np.clip(np.round(pixels), 0, 255).astype(np.uint8)
    return SynthImage(image=image, mask=np.asarray(mask, dtype=np.uint8), shapes=shapes)


# --- writing ------------------------------------------------------------------------------------


def write_synth_shapes(
    out: str | Path,
    *,
    n: int,
    seed: int = 0,
    style: str = "a",
    image_size: int = 128,
    val_fraction: float = 0.25,
    quiet: bool = True,
) -> dict[str, Any]:
    """Write a synth-shapes dataset to ``out``; returns a summary (paths, counts per split).

    A folder that already holds the same dataset is left as it is (status ``skipped``); a
    partial one (no ``classes.json`` yet) is completed. Files are replaced atomically:
    images and masks first, then the COCO files, then ``classes.json``.

    Raises:
        SpecError: an option value out of range, or an unknown style.
        DataSourceError: ``out`` holds other files, or a dataset written with other options.
    """
    options = SynthShapesOptions(out, n, seed, style, image_size, val_fraction)
    if _is_complete(options):
        return _summary(options, status="skipped")
    (options.out / CLASSES_FILE).unlink(missing_ok=True)  # its presence means complete
    _remove_stale(options)
    cocos = {split: _coco_head(options, split) for split in SPLITS}
    with progress_bar(options.n, desc="synth-shapes", quiet=quiet) as bar:
        for split, indices in options.split_indices().items():
            for index in indices:
                _write_one(options, split, index, cocos[split])
                bar.update(1)
    for split in SPLITS:
        _write_bytes(options.out / f"{split}.json", (json.dumps(cocos[split]) + "\n").encode())
    record = json.dumps(options.classes_record(), indent=2) + "\n"
    _write_bytes(options.out / CLASSES_FILE, record.encode())
    return _summary(options, status="written")


def _is_complete(options: SynthShapesOptions) -> bool:
    """True when ``out`` holds this exact dataset, whole; raise when it holds anything else."""
    out = options.out
    if out.exists() and not out.is_dir():
        raise DataSourceError(
            f"--out '{out}' is a file, expected a folder for the synth-shapes dataset. "
            "Use --out with another folder, or delete the file."
        )
    classes = out / CLASSES_FILE
    if not classes.is_file():
        _refuse_foreign(out)
        return False
    try:
        found = json.loads(classes.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        found = None
    expected = options.classes_record()
    if found != expected:
        raise DataSourceError(
            f"'{out}' already holds a synth-shapes dataset written with other options: its "
            f"{CLASSES_FILE} is {_short(found)}, these options give {_short(expected)}. Use --out "
            f"with another folder, or delete '{out}' to write this one there."
        )
    return all(p.is_file() for p in _expected_files(options))


def _refuse_foreign(out: Path) -> None:
    """Refuse a folder with files that a partial synth-shapes run would not have left."""
    if not out.is_dir():
        return
    ours = {*SPLITS, *(f"{s}.json" for s in SPLITS)}
    foreign = sorted(p.name for p in out.iterdir() if p.name not in ours and not _TMP.match(p.name))
    if foreign:
        listed = ", ".join(f"'{name}'" for name in foreign[:5])
        raise DataSourceError(
            f"--out '{out}' is not empty and holds no synth-shapes dataset (no {CLASSES_FILE}); "
            f"found {listed}. Use --out with a new or empty folder, or delete '{out}'."
        )


def _short(record: Any) -> str:
    keys = ("style", "seed", "n", "image_size", "val_fraction")
    items = ", ".join(f"{k}={record.get(k)!r}" for k in keys) if isinstance(record, dict) else ""
    return "{" + items + "}" if items else "unreadable"


def _expected_files(options: SynthShapesOptions) -> list[Path]:
    files = [options.out / f"{split}.json" for split in SPLITS]
    for split, indices in options.split_indices().items():
        for kind in ("images", "masks"):
            files += [options.out / split / kind / f"{i:06d}.png" for i in indices]
    return files


def _remove_stale(options: SynthShapesOptions) -> None:
    """Delete leftovers of a partial run with other options: PNGs these options do not write."""
    expected = set(_expected_files(options))
    for split in SPLITS:
        for kind in ("images", "masks"):
            folder = options.out / split / kind
            if not folder.is_dir():
                continue
            for path in folder.iterdir():
                stale = _PNG.match(path.name) and path not in expected
                if stale or _TMP.match(path.name):
                    path.unlink()


def _coco_head(options: SynthShapesOptions, split: str) -> dict[str, Any]:
    info = {
        "description": f"bob-cache synth-shapes, {split} split",
        "version": str(SYNTH_VERSION),
        "style": options.style,
        "seed": options.seed,
    }
    categories = [
        {"id": k, "name": c, "supercategory": "shape"} for k, c in enumerate(SYNTH_CLASSES, 1)
    ]
    return {"info": info, "images": [], "annotations": [], "categories": categories}


def _write_one(options: SynthShapesOptions, split: str, index: int, coco: dict) -> None:
    """Render image ``index``, write its PNGs, and append its COCO records to ``coco``."""
    size = options.image_size
    sample = render_synth_image(index, seed=options.seed, style=options.style, image_size=size)
    name = f"{index:06d}.png"
    _write_png(options.out / split / "images" / name, sample.image)
    _write_png(options.out / split / "masks" / name, sample.mask)
    image_id = index + 1
    coco["images"].append(
        {"id": image_id, "file_name": f"{split}/images/{name}", "width": size, "height": size}
    )
    for shape in sample.shapes:
        coco["annotations"].append(
            {
                "id": len(coco["annotations"]) + 1,
                "image_id": image_id,
                "category_id": shape.category_id,
                "bbox": shape.bbox(size),
                "area": shape.area(),
                "segmentation": [list(shape.polygon)],
                "iscrowd": 0,
            }
        )


def _write_png(path: Path, pixels: np.ndarray) -> None:
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG")
    _write_bytes(path, buffer.getvalue())


def _write_bytes(path: Path, data: bytes) -> None:
    """Write to a temporary file beside ``path``, then rename it over ``path``."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_bytes(data)
    os.replace(tmp, path)


def _summary(options: SynthShapesOptions, *, status: str) -> dict[str, Any]:
    """Paths and counts; instance counts come from the layouts (cheap, no rendering)."""
    splits: dict[str, Any] = {}
    for split, indices in options.split_indices().items():
        layouts = (
            sample_layout(i, seed=options.seed, image_size=options.image_size) for i in indices
        )
        splits[split] = {
            "images": len(indices),
            "instances": sum(map(len, layouts)),
            "annotations": str(options.out / f"{split}.json"),
            "folder": str(options.out / split),
        }
    return {
        "out": str(options.out),
        "status": status,
        **{k: v for k, v in options.classes_record().items() if k != "classes"},
        "classes": list(SYNTH_CLASSES),
        "classes_file": str(options.out / CLASSES_FILE),
        "splits": splits,
        "instances": sum(s["instances"] for s in splits.values()),
    }
