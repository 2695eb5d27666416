"""Image-processing building blocks of the corruptions, on numpy and scipy only.

Hendrycks & Dietterich's reference code (``make_imagenet_c.py``) leans on OpenCV, Wand
(ImageMagick) and old scikit-image; these are the same operations rebuilt so that the
corruptions need no compiled image library: OpenCV's ``GaussianBlur``, ``filter2D``,
``Canny``, ``equalizeHist`` and ``warpAffine``, ImageMagick's motion blur, scikit-image's
``gaussian``. Every random draw comes from the ``numpy.random.Generator`` passed in.
Float images are ``H × W`` or ``H × W × C`` arrays in [0, 1] unless a function says otherwise.
"""

from __future__ import annotations

import math

import numpy as np
from scipy import ndimage, signal

from bob_cache.extras import require

_TAN_22_5 = math.tan(math.pi / 8)


def gaussian(x: np.ndarray, sigma: float, *, mode: str = "nearest", truncate: float = 4.0):
    """scikit-image's ``gaussian`` (spatial axes only): a Gaussian blur per channel."""
    sigmas = (sigma, sigma) + (0,) * (x.ndim - 2)
    return ndimage.gaussian_filter(
        np.asarray(x, dtype=np.float64), sigmas, mode=mode, truncate=truncate
    )


def cv_gaussian_kernel(size: int, sigma: float) -> np.ndarray:
    """OpenCV's ``getGaussianKernel`` for ``sigma > 0``: ``size`` normalized taps."""
    taps = np.exp(-((np.arange(size) - (size - 1) / 2) ** 2) / (2 * sigma**2))
    return taps / taps.sum()


def disk_kernel(radius: float, alias_blur: float) -> np.ndarray:
    """The reference's antialiased disk: at least 17 × 17, smoothed by a 3- or 5-tap Gaussian."""
    half, ksize = (8, 3) if radius <= 8 else (int(radius), 5)
    grid = np.arange(-half, half + 1)
    xx, yy = np.meshgrid(grid, grid)
    disk = ((xx**2 + yy**2) <= radius**2).astype(np.float32)
    disk /= disk.sum()
    taps = cv_gaussian_kernel(ksize, alias_blur)
    for axis in (0, 1):  # GaussianBlur's default border is reflect-101 ("mirror")
        disk = ndimage.correlate1d(disk, taps, axis=axis, mode="mirror")
    return disk


def filter2d(x: np.ndarray, kernel: np.ndarray) -> np.ndarray:
    """OpenCV's ``filter2D`` (reflect-101 border) for a symmetric kernel, per channel, by FFT."""
    ph, pw = kernel.shape[0] // 2, kernel.shape[1] // 2
    pad = [(ph, ph), (pw, pw)] + [(0, 0)] * (x.ndim - 2)
    padded = np.pad(x, pad, mode="reflect")
    k = kernel.reshape(kernel.shape + (1,) * (x.ndim - 2))
    return signal.fftconvolve(padded, k, mode="valid", axes=(0, 1))


def box3(x: np.ndarray) -> np.ndarray:
    """OpenCV's ``blur(x, (3, 3))`` on floats (reflect-101 border)."""
    return ndimage.uniform_filter(np.asarray(x, dtype=np.float64), size=3, mode="mirror")


def clipped_zoom(x: np.ndarray, factor: float) -> np.ndarray:
    """Zoom into the centre by ``factor`` (≥ 1), keeping the shape (bilinear, centred crop)."""
    h, w = x.shape[:2]
    ch, cw = math.ceil(h / factor), math.ceil(w / factor)
    top, left = (h - ch) // 2, (w - cw) // 2
    zoomed = ndimage.zoom(
        x[top : top + ch, left : left + cw], (factor, factor) + (1,) * (x.ndim - 2), order=1
    )
    if zoomed.shape[0] < h or zoomed.shape[1] < w:  # float rounding: never short of the size
        grow = [(0, max(0, h - zoomed.shape[0])), (0, max(0, w - zoomed.shape[1]))]
        zoomed = np.pad(zoomed, grow + [(0, 0)] * (x.ndim - 2), mode="edge")
    trim_top, trim_left = (zoomed.shape[0] - h) // 2, (zoomed.shape[1] - w) // 2
    return zoomed[trim_top : trim_top + h, trim_left : trim_left + w]


def motion_blur(x: np.ndarray, radius: int, sigma: float, angle: float) -> np.ndarray:
    """ImageMagick's ``-motion-blur radius x sigma + angle``: a one-sided line kernel.

    ``2 * radius + 1`` taps weighted by a half-Gaussian, each a copy of the image shifted
    one step further along ``angle`` (degrees); pixels beyond the border repeat the edge
    (ImageMagick's default virtual pixels), so the kernel never loses weight.
    """
    width = 2 * radius + 1
    taps = np.exp(-(np.arange(width) ** 2) / (2 * sigma**2))
    taps /= taps.sum()
    sin, cos = math.sin(math.radians(angle)), math.cos(math.radians(angle))
    h, w = x.shape[:2]
    rows, cols = np.arange(h), np.arange(w)
    out = np.zeros(x.shape, dtype=np.float64)
    for i, tap in enumerate(taps):
        dy, dx = -math.ceil(i * sin - 0.5), -math.ceil(i * cos - 0.5)
        src_rows, src_cols = np.clip(rows - dy, 0, h - 1), np.clip(cols - dx, 0, w - 1)
        out += tap * x[src_rows][:, src_cols]
    return out


def plasma_fractal(size: int, decay: float, rng: np.random.Generator) -> np.ndarray:
    """A ``size × size`` diamond-square height map in [0, 1] (``size`` a power of two)."""
    grid = np.zeros((size, size), dtype=np.float64)
    step, wibble = size, 100.0

    def wibbled_mean(a: np.ndarray) -> np.ndarray:
        return a / 4 + wibble * rng.uniform(-wibble, wibble, a.shape)

    while step >= 2:
        half = step // 2
        corners = grid[0:size:step, 0:size:step]
        squares = corners + np.roll(corners, -1, axis=0)
        squares += np.roll(squares, -1, axis=1)
        grid[half:size:step, half:size:step] = wibbled_mean(squares)
        centres = grid[half:size:step, half:size:step]
        corners = grid[0:size:step, 0:size:step]
        left = centres + np.roll(centres, 1, axis=0) + corners + np.roll(corners, -1, axis=1)
        grid[0:size:step, half:size:step] = wibbled_mean(left)
        top = centres + np.roll(centres, 1, axis=1) + corners + np.roll(corners, -1, axis=0)
        grid[half:size:step, 0:size:step] = wibbled_mean(top)
        step //= 2
        wibble /= decay
    grid -= grid.min()
    return grid / grid.max()


def next_power_of_2(n: int) -> int:
    return 1 if n <= 1 else 2 ** (n - 1).bit_length()


def rgb_to_gray(x: np.ndarray) -> np.ndarray:
    """OpenCV's ``RGB2GRAY`` weights: ``H × W × 3`` → ``H × W``."""
    return x[..., 0] * 0.299 + x[..., 1] * 0.587 + x[..., 2] * 0.114


def canny(image: np.ndarray, low: float, high: float) -> np.ndarray:
    """OpenCV's ``Canny`` (3 × 3 Sobel, L1 magnitude) on a uint8 image: a bool edge map."""
    img = image.astype(np.float64)
    sobel = np.array([[-1.0, 0.0, 1.0], [-2.0, 0.0, 2.0], [-1.0, 0.0, 1.0]])
    dx = ndimage.correlate(img, sobel, mode="nearest")
    dy = ndimage.correlate(img, sobel.T, mode="nearest")
    mag = np.abs(dx) + np.abs(dy)
    p = np.pad(mag, 1)  # outside the image the magnitude is 0

    def at(oy: int, ox: int) -> np.ndarray:
        return p[1 + oy : 1 + oy + mag.shape[0], 1 + ox : 1 + ox + mag.shape[1]]

    ax, ay = np.abs(dx), np.abs(dy)
    horizontal = ay < ax * _TAN_22_5
    vertical = ay > ax * (_TAN_22_5 + 2)
    s = np.where(dx * dy < 0, -1, 1)
    diag_a = np.where(s < 0, at(-1, 1), at(-1, -1))
    diag_b = np.where(s < 0, at(1, -1), at(1, 1))
    peak = np.where(
        horizontal,
        (mag > at(0, -1)) & (mag >= at(0, 1)),
        np.where(vertical, (mag > at(-1, 0)) & (mag >= at(1, 0)), (mag > diag_a) & (mag > diag_b)),
    )
    weak = peak & (mag > low)
    labels, n = ndimage.label(weak, structure=np.ones((3, 3)))
    if n == 0:
        return np.zeros(mag.shape, dtype=bool)
    strong = np.zeros(n + 1, dtype=bool)
    strong[np.unique(labels[weak & (mag > high)])] = True
    strong[0] = False
    return strong[labels]


def equalize_hist(image: np.ndarray) -> np.ndarray:
    """OpenCV's ``equalizeHist`` on a uint8 image."""
    hist = np.bincount(image.ravel(), minlength=256)
    first = int(np.flatnonzero(hist)[0])
    total = image.size
    if hist[first] == total:
        return np.full_like(image, first)
    cum = np.cumsum(hist) - hist[first]
    lut = np.clip(np.rint(cum * (255.0 / (total - hist[first]))), 0, 255).astype(np.uint8)
    lut[: first + 1] = 0
    return lut[image]


def warp_affine(x: np.ndarray, src: np.ndarray, dst: np.ndarray) -> np.ndarray:
    """OpenCV's ``warpAffine`` with the transform taking points ``src`` to ``dst`` (3 × 2,
    ``(x, y)``), bilinear, reflect-101 border, per channel."""
    src_h = np.hstack([src, np.ones((3, 1))])
    forward = np.vstack([np.linalg.solve(src_h, dst).T, [0.0, 0.0, 1.0]])
    inverse = np.linalg.inv(forward)
    h, w = x.shape[:2]
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float64)
    sx = inverse[0, 0] * xx + inverse[0, 1] * yy + inverse[0, 2]
    sy = inverse[1, 0] * xx + inverse[1, 1] * yy + inverse[1, 2]
    return map_channels(x, sy, sx, mode="mirror")


def map_channels(x: np.ndarray, rows: np.ndarray, cols: np.ndarray, *, mode: str) -> np.ndarray:
    """Sample every channel of ``x`` at ``(rows, cols)`` (bilinear)."""
    if x.ndim == 2:
        return ndimage.map_coordinates(x, [rows, cols], order=1, mode=mode)
    return np.stack(
        [
            ndimage.map_coordinates(x[..., c], [rows, cols], order=1, mode=mode)
            for c in range(x.shape[2])
        ],
        axis=-1,
    )


def rgb_to_hsv(x: np.ndarray) -> np.ndarray:
    require("report", "The HSV conversion of the brightness and saturate corruptions")
    from matplotlib.colors import rgb_to_hsv as convert  # same formulas as scikit-image's

    return convert(np.clip(x, 0, 1))


def hsv_to_rgb(x: np.ndarray) -> np.ndarray:
    from matplotlib.colors import hsv_to_rgb as convert

    return convert(x)
