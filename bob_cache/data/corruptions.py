"""ImageNet-C's common corruptions (Hendrycks & Dietterich, ICLR 2019) on numpy and scipy.

Eighteen corruptions, five severities each, with the parameters of the reference code
(``make_imagenet_c.py``): the noise, blur, weather and digital families of ImageNet-C
without frost (its texture photos are not ours to ship), plus the four held-out
corruptions of the paper (family ``extra``: speckle noise, Gaussian blur, spatter,
saturate). The maintained package (imagecorruptions 1.1.2) was not used: on numpy 2 and
scikit-image ≥ 0.19 its fog, glass blur and Gaussian blur raise, it refuses images under
32 px, draws from numpy's global random state, and pulls OpenCV.

Any image size works. Parameters are in pixels as calibrated for 224-px images (as in
imagecorruptions), except elastic transform's, which the reference defines relative to the
image (scaled here by the shorter side / 224). Corruptions with spatial structure (blurs,
weather, elastic) run on images of at least ``MIN_SIDE`` px per side: a smaller image is
upscaled by an integer factor (nearest), corrupted, and averaged back down to its size, so
an 8 × 8 digit gets the corruption a 32 × 32 one would. Pixel-wise corruptions (noise,
brightness, contrast, saturate, JPEG, pixelate) run at the native size.

Every random draw comes from the ``numpy.random.Generator`` passed to
:func:`apply_corruption`; :func:`corruption_rng` seeds one from (seed, corruption, severity,
sample id), so an image gets the same corruption in any order and any process.
"""

from __future__ import annotations

import io
import math
import re
from collections.abc import Callable, Iterable
from dataclasses import dataclass

import numpy as np
from PIL import Image

from bob_cache.data import corruption_filters as F
from bob_cache.errors import BobCacheError, did_you_mean
from bob_cache.hashing import stable_hash
from bob_cache.registry import Registry

# Bump when any corruption's output changes: it is part of a shifted copy's identity.
CORRUPTIONS_VERSION = 1
SEVERITIES = (1, 2, 3, 4, 5)
MIN_SIDE = 32
FAMILIES = ("noise", "blur", "weather", "digital", "extra")
# Selectors besides names and families.
ALL, COMMON = "all", "common"

CorruptionFn = Callable[[np.ndarray, int, np.random.Generator], np.ndarray]


class UnknownCorruptionError(BobCacheError, KeyError):
    """A corruption name that is neither registered nor a family."""

    def __str__(self) -> str:
        return str(self.args[0]) if self.args else ""


class SeverityError(BobCacheError, ValueError):
    """A severity outside 1..5 (or text that is not one)."""


@dataclass(frozen=True)
class Corruption:
    """A registered corruption: ``fn(uint8 H × W × 3, severity, rng)`` → float in [0, 255]."""

    name: str
    family: str
    fn: CorruptionFn
    random: bool
    min_side: int

    def to_dict(self) -> dict[str, object]:
        return {
            "name": self.name,
            "family": self.family,
            "random": self.random,
            "min_side": self.min_side,
        }


CORRUPTIONS: Registry[Corruption] = Registry(
    "corruption", hint="See `bob-cache corruptions`.", error=UnknownCorruptionError
)


def register_corruption(
    name: str, family: str, *, random: bool = True, min_side: int = 1
) -> Callable[[CorruptionFn], CorruptionFn]:
    """Decorator: register ``fn(image, severity, rng)`` under ``name`` in ``family``.

    Args:
        name: the corruption's name (``--corruption``).
        family: noise, blur, weather, digital or extra.
        random: whether it draws from the generator (deterministic ones ignore it).
        min_side: smaller images are upscaled to at least this many pixels per side.
    """
    if family not in FAMILIES:
        raise ValueError(f"family must be one of {FAMILIES}, not {family!r}")

    def wrap(fn: CorruptionFn) -> CorruptionFn:
        CORRUPTIONS.register(name, Corruption(name, family, fn, random, min_side))
        return fn

    return wrap


def list_corruptions(family: str | None = None) -> list[str]:
    """Registered names in ImageNet-C's order (family by family), optionally of one family."""
    if family is not None and family not in FAMILIES:
        raise UnknownCorruptionError(
            f"Unknown corruption family '{family}'.{did_you_mean(family, FAMILIES)} "
            f"Families: {', '.join(FAMILIES)}."
        )
    ordered = sorted(CORRUPTIONS.values(), key=lambda c: FAMILIES.index(c.family))
    return [c.name for c in ordered if family is None or c.family == family]


def get_corruption(name: str) -> Corruption:
    """The corruption called ``name``."""
    if name not in CORRUPTIONS:  # the message also names families, common and all
        raise UnknownCorruptionError(
            f"Unknown corruption '{name}'.{did_you_mean(name, _selectors())} Valid names: "
            f"{', '.join(list_corruptions())}; or a family ({', '.join(FAMILIES)}), '{COMMON}' or "
            f"'{ALL}'. See `bob-cache corruptions`."
        )
    return CORRUPTIONS.get(name)


def parse_corruptions(text: str | Iterable[str]) -> tuple[str, ...]:
    """``"gaussian_noise,blur"`` → names, expanding families, ``common`` and ``all``."""
    parts = text.split(",") if isinstance(text, str) else list(text)
    names: list[str] = []
    for part in (p.strip() for p in parts):
        if not part:
            continue
        if part == ALL:
            chosen = list_corruptions()
        elif part == COMMON:
            chosen = [n for f in FAMILIES[:-1] for n in list_corruptions(f)]
        elif part in FAMILIES:
            chosen = list_corruptions(part)
        else:
            chosen = [get_corruption(part).name]
        names += [n for n in chosen if n not in names]
    if not names:
        raise UnknownCorruptionError(
            f"No corruption given. Pass --corruption with names ({', '.join(list_corruptions())}), "
            f"families ({', '.join(FAMILIES)}), '{COMMON}' or '{ALL}'."
        )
    return tuple(names)


def parse_severities(text: str | int | Iterable[int]) -> tuple[int, ...]:
    """``"3"``, ``"1,5"``, ``"1-5"``, ``"1..5"`` or ``"all"`` → severities in 1..5."""
    if isinstance(text, int):
        values = [text]
    elif not isinstance(text, str):
        values = list(text)
    elif text.strip() == ALL:
        values = list(SEVERITIES)
    else:
        values = []
        for part in (p.strip() for p in text.split(",") if p.strip()):
            bounds = re.fullmatch(r"(-?\d+)\s*(?:-|\.\.)\s*(-?\d+)", part)
            if bounds:
                values += range(int(bounds[1]), int(bounds[2]) + 1)
            elif re.fullmatch(r"-?\d+", part):
                values.append(int(part))
            else:
                raise SeverityError(_severity_message(f"'{text}' is not a severity"))
    bad = [v for v in values if v not in SEVERITIES]
    if bad or not values:
        shown = bad[0] if bad else repr(text)
        raise SeverityError(_severity_message(f"Severity {shown} is outside 1..5"))
    return tuple(sorted(set(values)))


def _severity_message(what: str) -> str:
    return (
        f"{what}. ImageNet-C defines severities 1 (mild) to 5 (strong): pass e.g. "
        "--severity 3, --severity 1,5, --severity 1-5 or --severity all."
    )


def _selectors() -> list[str]:
    return [*CORRUPTIONS, *FAMILIES, COMMON, ALL]


def corruption_rng(seed: int, name: str, severity: int, sample_id: str) -> np.random.Generator:
    """The generator for one image: seeded by a hash of all four, independent of order."""
    return np.random.default_rng(int(stable_hash([seed, name, severity, sample_id]), 16))


def apply_corruption(
    image: Image.Image | np.ndarray, name: str, severity: int, rng: np.random.Generator
) -> np.ndarray:
    """Corrupt ``image`` (PIL, or uint8 ``H × W``/``H × W × 1|3|4``): a uint8 ``H × W × 3``.

    Raises:
        UnknownCorruptionError: ``name`` is not registered.
        SeverityError: ``severity`` is not in 1..5.
    """
    corruption = get_corruption(name)
    if isinstance(severity, bool) or severity not in SEVERITIES:
        raise SeverityError(_severity_message(f"Severity {severity!r} is outside 1..5"))
    x = _as_rgb(image)
    h, w = x.shape[:2]
    factor = math.ceil(corruption.min_side / min(h, w)) if min(h, w) < corruption.min_side else 1
    if factor > 1:
        x = np.repeat(np.repeat(x, factor, axis=0), factor, axis=1)
    out = np.clip(corruption.fn(x, severity, rng), 0, 255).astype(np.uint8)  # as the reference
    if factor > 1:
        out = np.rint(out.reshape(h, factor, w, factor, 3).mean(axis=(1, 3))).astype(np.uint8)
    return out


def _as_rgb(image: Image.Image | np.ndarray) -> np.ndarray:
    if isinstance(image, Image.Image):
        return np.asarray(image.convert("RGB"), dtype=np.uint8).copy()
    x = np.asarray(image)
    if x.dtype != np.uint8 or x.ndim not in (2, 3) or (x.ndim == 3 and x.shape[2] not in (1, 3, 4)):
        raise ValueError(
            f"Expected a uint8 image of shape H × W or H × W × 1/3/4, got {x.dtype} {x.shape}."
        )
    if x.ndim == 2 or x.shape[2] == 1:
        x = np.repeat(x.reshape(x.shape[0], x.shape[1], 1), 3, axis=2)
    return np.ascontiguousarray(x[..., :3])


# Noise ----------------------------------------------------------------------------------


@register_corruption("gaussian_noise", "noise")
def gaussian_noise(x: np.ndarray, severity: int, rng: np.random.Generator) -> np.ndarray:
    c = (0.08, 0.12, 0.18, 0.26, 0.38)[severity - 1]
    x = x / 255.0
    return np.clip(x + rng.normal(size=x.shape, scale=c), 0, 1) * 255


@register_corruption("shot_noise", "noise")
def shot_noise(x: np.ndarray, severity: int, rng: np.random.Generator) -> np.ndarray:
    c = (60, 25, 12, 5, 3)[severity - 1]
    x = x / 255.0
    return np.clip(rng.poisson(x * c) / c, 0, 1) * 255


@register_corruption("impulse_noise", "noise")
def impulse_noise(x: np.ndarray, severity: int, rng: np.random.Generator) -> np.ndarray:
    """Salt and pepper, per channel (scikit-image's ``random_noise(mode="s&p")``)."""
    c = (0.03, 0.06, 0.09, 0.17, 0.27)[severity - 1]
    x = x / 255.0
    flipped = rng.random(x.shape) <= c
    salted = rng.random(x.shape) <= 0.5
    x[flipped & salted], x[flipped & ~salted] = 1.0, 0.0
    return x * 255


@register_corruption("speckle_noise", "extra")
def speckle_noise(x: np.ndarray, severity: int, rng: np.random.Generator) -> np.ndarray:
    c = (0.15, 0.2, 0.35, 0.45, 0.6)[severity - 1]
    x = x / 255.0
    return np.clip(x + x * rng.normal(size=x.shape, scale=c), 0, 1) * 255


# Blur -----------------------------------------------------------------------------------


@register_corruption("defocus_blur", "blur", random=False, min_side=MIN_SIDE)
def defocus_blur(x: np.ndarray, severity: int, rng: np.random.Generator) -> np.ndarray:
    radius, alias = ((3, 0.1), (4, 0.5), (6, 0.5), (8, 0.5), (10, 0.5))[severity - 1]
    return np.clip(F.filter2d(x / 255.0, F.disk_kernel(radius, alias)), 0, 1) * 255


@register_corruption("glass_blur", "blur", min_side=MIN_SIDE)
def glass_blur(x: np.ndarray, severity: int, rng: np.random.Generator) -> np.ndarray:
    """Blur, swap every pixel with a random neighbour (sequentially, as the reference), blur."""
    sigma, delta, iterations = ((0.7, 1, 2), (0.9, 2, 1), (1, 2, 3), (1.1, 3, 2), (1.5, 4, 2))[
        severity - 1
    ]
    x = (F.gaussian(x / 255.0, sigma) * 255).astype(np.uint8)
    h, w = x.shape[:2]
    rows = np.arange(h - delta, delta, -1)
    cols = np.arange(w - delta, delta, -1)
    here = (rows[:, None] * w + cols[None, :]).ravel()
    order = list(range(h * w))  # order[p]: the original pixel now at position p
    for _ in range(iterations):
        dxy = rng.integers(-delta, delta, size=(here.size, 2))  # (dx, dy) per pixel
        there = here + dxy[:, 1] * w + dxy[:, 0]
        for a, b in zip(here.tolist(), there.tolist(), strict=True):
            order[a], order[b] = order[b], order[a]
    x = x.reshape(h * w, -1)[order].reshape(h, w, -1)
    return np.clip(F.gaussian(x / 255.0, sigma), 0, 1) * 255


@register_corruption("motion_blur", "blur", min_side=MIN_SIDE)
def motion_blur(x: np.ndarray, severity: int, rng: np.random.Generator) -> np.ndarray:
    radius, sigma = ((10, 3), (15, 5), (15, 8), (15, 12), (20, 15))[severity - 1]
    return np.clip(F.motion_blur(x.astype(np.float64), radius, sigma, rng.uniform(-45, 45)), 0, 255)


@register_corruption("zoom_blur", "blur", random=False, min_side=MIN_SIDE)
def zoom_blur(x: np.ndarray, severity: int, rng: np.random.Generator) -> np.ndarray:
    start, stop, step = (
        (1, 1.11, 0.01),
        (1, 1.16, 0.01),
        (1, 1.21, 0.02),
        (1, 1.26, 0.02),
        (1, 1.31, 0.03),
    )[severity - 1]
    x = (x / 255.0).astype(np.float32)
    factors = np.arange(start, stop, step)
    out = np.zeros_like(x)
    for factor in factors:
        out += F.clipped_zoom(x, factor)
    return np.clip((x + out) / (len(factors) + 1), 0, 1) * 255


@register_corruption("gaussian_blur", "extra", random=False, min_side=MIN_SIDE)
def gaussian_blur(x: np.ndarray, severity: int, rng: np.random.Generator) -> np.ndarray:
    sigma = (1, 2, 3, 4, 6)[severity - 1]
    return np.clip(F.gaussian(x / 255.0, sigma), 0, 1) * 255


# Weather --------------------------------------------------------------------------------


@register_corruption("snow", "weather", min_side=MIN_SIDE)
def snow(x: np.ndarray, severity: int, rng: np.random.Generator) -> np.ndarray:
    loc, scale, zoom, cut, radius, sigma, keep = (
        (0.1, 0.3, 3, 0.5, 10, 4, 0.8),
        (0.2, 0.3, 2, 0.5, 12, 4, 0.7),
        (0.55, 0.3, 4, 0.9, 12, 8, 0.7),
        (0.55, 0.3, 4.5, 0.85, 12, 8, 0.65),
        (0.55, 0.3, 2.5, 0.85, 12, 12, 0.55),
    )[severity - 1]
    x = x.astype(np.float32) / 255.0
    layer = rng.normal(size=x.shape[:2], loc=loc, scale=scale)
    layer = F.clipped_zoom(layer[..., None], zoom)[..., 0]
    layer[layer < cut] = 0
    layer = np.floor(np.clip(layer, 0, 1) * 255)  # the reference blurs an 8-bit layer
    layer = F.motion_blur(layer, radius, sigma, rng.uniform(-135, -45))
    layer = (np.round(np.clip(layer, 0, 255)) / 255.0)[..., None]
    x = keep * x + (1 - keep) * np.maximum(x, F.rgb_to_gray(x)[..., None] * 1.5 + 0.5)
    return np.clip(x + layer + np.rot90(layer, k=2), 0, 1) * 255


@register_corruption("fog", "weather", min_side=MIN_SIDE)
def fog(x: np.ndarray, severity: int, rng: np.random.Generator) -> np.ndarray:
    strength, decay = ((1.5, 2), (2.0, 2), (2.5, 1.7), (2.5, 1.5), (3.0, 1.4))[severity - 1]
    h, w = x.shape[:2]
    x = x / 255.0
    top = x.max()
    fractal = F.plasma_fractal(F.next_power_of_2(max(h, w)), decay, rng)[:h, :w]
    x = x + strength * fractal[..., None]
    return np.clip(x * top / (top + strength), 0, 1) * 255


@register_corruption("brightness", "weather", random=False)
def brightness(x: np.ndarray, severity: int, rng: np.random.Generator) -> np.ndarray:
    c = (0.1, 0.2, 0.3, 0.4, 0.5)[severity - 1]
    hsv = F.rgb_to_hsv(x / 255.0)
    hsv[..., 2] = np.clip(hsv[..., 2] + c, 0, 1)
    return np.clip(F.hsv_to_rgb(hsv), 0, 1) * 255


@register_corruption("spatter", "extra", min_side=MIN_SIDE)
def spatter(x: np.ndarray, severity: int, rng: np.random.Generator) -> np.ndarray:
    """Water drops (severities 1-3) or mud (4-5) from a thresholded blurred noise layer."""
    loc, scale, sigma, cut, weight, mud = (
        (0.65, 0.3, 4, 0.69, 0.6, 0),
        (0.65, 0.3, 3, 0.68, 0.6, 0),
        (0.65, 0.3, 2, 0.68, 0.5, 0),
        (0.65, 0.3, 1, 0.65, 1.5, 1),
        (0.67, 0.4, 1, 0.65, 1.5, 1),
    )[severity - 1]
    x = x.astype(np.float32) / 255.0
    liquid = F.gaussian(rng.normal(size=x.shape[:2], loc=loc, scale=scale), sigma)
    liquid[liquid < cut] = 0
    if mud:
        m = F.gaussian((liquid > cut).astype(np.float32), weight)
        m[m < 0.8] = 0
        color = np.array([63, 42, 20]) / 255.0 * m[..., None]
        return np.clip(x * (1 - m[..., None]) + color, 0, 1) * 255
    liquid8 = (liquid * 255).astype(np.uint8)
    dist = _drop_shading(liquid8)
    m = liquid8 * dist
    m = m / m.max() * weight if m.max() > 0 else m
    color = np.array([175, 238, 238]) / 255.0  # pale turquoise
    return np.clip(x + m[..., None] * color, 0, 1) * 255


def _drop_shading(liquid8: np.ndarray) -> np.ndarray:
    """The reference's OpenCV chain: distance to the drops' edges, equalized, embossed."""
    from scipy import ndimage

    not_edge = ~F.canny(liquid8, 50, 150)
    dist = np.minimum(ndimage.distance_transform_edt(not_edge), 20)
    dist = F.equalize_hist(F.box3(dist).astype(np.uint8))
    emboss = np.array([[-2, -1, 0], [-1, 1, 1], [0, 1, 2]], dtype=np.float64)
    dist = np.clip(
        np.rint(ndimage.correlate(dist.astype(np.float64), emboss, mode="mirror")), 0, 255
    )
    return np.rint(F.box3(dist)).astype(np.float32)


# Digital --------------------------------------------------------------------------------


@register_corruption("contrast", "digital", random=False)
def contrast(x: np.ndarray, severity: int, rng: np.random.Generator) -> np.ndarray:
    c = (0.4, 0.3, 0.2, 0.1, 0.05)[severity - 1]
    x = x / 255.0
    means = x.mean(axis=(0, 1), keepdims=True)
    return np.clip((x - means) * c + means, 0, 1) * 255


@register_corruption("elastic_transform", "digital", min_side=MIN_SIDE)
def elastic_transform(x: np.ndarray, severity: int, rng: np.random.Generator) -> np.ndarray:
    """A random affine warp, then a smooth random displacement field (ImageNet-C's version)."""
    alpha, sigma, shift = (
        (2, 0.7, 0.1),
        (2, 0.08, 0.2),
        (0.05, 0.01, 0.02),
        (0.07, 0.01, 0.02),
        (0.12, 0.01, 0.02),
    )[severity - 1]
    h, w = x.shape[:2]
    size = 244 * min(h, w) / 224  # the reference's 244 (for 224-px images) scaled to this image
    alpha, sigma, shift = alpha * size, sigma * size, shift * size
    x = x.astype(np.float32) / 255.0
    centre = np.array([w // 2, h // 2], dtype=np.float64)
    square = min(h, w) // 3
    src = np.array([centre + square, [centre[0] + square, centre[1] - square], centre - square])
    dst = src + rng.uniform(-shift, shift, size=src.shape)
    x = F.warp_affine(x, src, dst)
    dx = F.gaussian(rng.uniform(-1, 1, size=(h, w)), sigma, mode="reflect", truncate=3) * alpha
    dy = F.gaussian(rng.uniform(-1, 1, size=(h, w)), sigma, mode="reflect", truncate=3) * alpha
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float64)
    return np.clip(F.map_channels(x, yy + dy, xx + dx, mode="reflect"), 0, 1) * 255


@register_corruption("pixelate", "digital", random=False)
def pixelate(x: np.ndarray, severity: int, rng: np.random.Generator) -> np.ndarray:
    c = (0.6, 0.5, 0.4, 0.3, 0.25)[severity - 1]
    h, w = x.shape[:2]
    small = Image.fromarray(x).resize((max(1, int(w * c)), max(1, int(h * c))), Image.BOX)
    return np.asarray(small.resize((w, h), Image.BOX), dtype=np.float64)


@register_corruption("jpeg_compression", "digital", random=False)
def jpeg_compression(x: np.ndarray, severity: int, rng: np.random.Generator) -> np.ndarray:
    quality = (25, 18, 15, 10, 7)[severity - 1]
    buffer = io.BytesIO()
    Image.fromarray(x).save(buffer, format="JPEG", quality=quality)
    buffer.seek(0)
    with Image.open(buffer) as decoded:
        return np.asarray(decoded.convert("RGB"), dtype=np.float64)


@register_corruption("saturate", "extra", random=False)
def saturate(x: np.ndarray, severity: int, rng: np.random.Generator) -> np.ndarray:
    scale, offset = ((0.3, 0), (0.1, 0), (2, 0), (5, 0.1), (20, 0.2))[severity - 1]
    hsv = F.rgb_to_hsv(x / 255.0)
    hsv[..., 1] = np.clip(hsv[..., 1] * scale + offset, 0, 1)
    return np.clip(F.hsv_to_rgb(hsv), 0, 1) * 255
