"""ImageNet-C corruptions: the registry, every corruption at every severity, determinism,
tiny images, the reference parameters, and the errors."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from bob_cache.data.corruptions import (
    FAMILIES,
    SeverityError,
    UnknownCorruptionError,
    apply_corruption,
    corruption_rng,
    get_corruption,
    list_corruptions,
    parse_corruptions,
    parse_severities,
)

NAMES = list_corruptions()
RANDOM = [n for n in NAMES if get_corruption(n).random]


@pytest.fixture(scope="module")
def photo() -> np.ndarray:
    """A 64 × 64 crop of a real photo (face, textures, flat areas)."""
    import skimage.data

    return np.ascontiguousarray(skimage.data.astronaut()[40:232:3, 140:332:3])


def rng(seed: int = 0, name: str = "x", severity: int = 1) -> np.random.Generator:
    return corruption_rng(seed, name, severity, "train/img.png")


def test_registry_has_imagenet_c_without_frost_plus_the_four_extras() -> None:
    assert list_corruptions("noise") == ["gaussian_noise", "shot_noise", "impulse_noise"]
    assert list_corruptions("blur") == ["defocus_blur", "glass_blur", "motion_blur", "zoom_blur"]
    assert list_corruptions("weather") == ["snow", "fog", "brightness"]
    assert list_corruptions("digital") == [
        "contrast", "elastic_transform", "pixelate", "jpeg_compression",
    ]  # fmt: skip
    assert list_corruptions("extra") == ["speckle_noise", "gaussian_blur", "spatter", "saturate"]
    assert len(NAMES) == 18 and "frost" not in NAMES
    assert set(RANDOM) == {
        "gaussian_noise", "shot_noise", "impulse_noise", "glass_blur", "motion_blur", "snow",
        "fog", "elastic_transform", "speckle_noise", "spatter",
    }  # fmt: skip


@pytest.mark.parametrize("name", NAMES)
def test_every_severity_changes_the_image_deterministically(name: str, photo) -> None:
    for severity in range(1, 6):
        out = apply_corruption(photo, name, severity, rng(0, name, severity))
        assert out.shape == photo.shape and out.dtype == np.uint8
        assert np.abs(out.astype(int) - photo).mean() > 0.5, (name, severity)
        again = apply_corruption(photo, name, severity, rng(0, name, severity))
        assert again.tobytes() == out.tobytes()
        other = apply_corruption(photo, name, severity, rng(1, name, severity))
        assert (other.tobytes() != out.tobytes()) == (name in RANDOM)


@pytest.mark.parametrize("name", NAMES)
def test_tiny_odd_grey_and_rgba_images(name: str, photo) -> None:
    """8 × 8 digits, odd shapes, greyscale and RGBA inputs: RGB uint8 of the same size."""
    digit = np.asarray(Image.fromarray(photo).resize((8, 8)))
    inputs = [
        digit,
        photo[:5, :13],
        photo[:1, :1],
        Image.fromarray(photo[:20, :40]).convert("L"),
        Image.fromarray(photo[:33, :31]).convert("RGBA"),
        photo[:16, :16, 0],
    ]
    for image in inputs:
        h, w = np.asarray(image).shape[:2]
        for severity in (1, 5):
            out = apply_corruption(image, name, severity, rng(0, name, severity))
            assert out.shape == (h, w, 3) and out.dtype == np.uint8
    assert not np.array_equal(apply_corruption(digit, name, 5, rng(0, name, 5)), digit)


def test_reference_parameters(photo) -> None:
    """Gaussian noise has the reference's σ per severity; contrast and JPEG follow theirs."""
    grey = np.full((128, 128, 3), 128, np.uint8)
    for severity, sigma in zip((1, 2, 3), (0.08, 0.12, 0.18), strict=True):
        out = apply_corruption(grey, "gaussian_noise", severity, rng())
        assert abs(out.astype(float).std() / 255 - sigma) < 0.01
    out = apply_corruption(photo, "contrast", 5, rng()).astype(float)
    x = photo / 255.0
    mean = x.mean(axis=(0, 1))
    expected = np.clip((x - mean) * 0.05 + mean, 0, 1) * 255
    assert np.abs(out - expected.astype(np.uint8)).max() == 0
    jpeg = apply_corruption(photo, "jpeg_compression", 5, rng())
    import io

    buf = io.BytesIO()
    Image.fromarray(photo).save(buf, format="JPEG", quality=7)
    assert np.array_equal(jpeg, np.asarray(Image.open(buf).convert("RGB")))


@pytest.mark.parametrize("name", ["gaussian_noise", "impulse_noise", "gaussian_blur", "contrast"])
def test_severity_five_is_stronger_than_one(name: str, photo) -> None:
    change = [np.abs(apply_corruption(photo, name, s, rng()).astype(int) - photo).mean()
              for s in (1, 5)]  # fmt: skip
    assert change[1] > 1.5 * change[0]


def test_draws_depend_only_on_seed_corruption_severity_and_id(photo) -> None:
    first = apply_corruption(photo, "snow", 3, corruption_rng(7, "snow", 3, "a"))
    apply_corruption(photo, "snow", 3, corruption_rng(7, "snow", 3, "b"))  # another image first
    assert apply_corruption(photo, "snow", 3, corruption_rng(7, "snow", 3, "a")).tobytes() == (
        first.tobytes()
    )
    for other in (corruption_rng(8, "snow", 3, "a"), corruption_rng(7, "snow", 4, "a"),
                  corruption_rng(7, "fog", 3, "a"), corruption_rng(7, "snow", 3, "c")):  # fmt: skip
        assert other.random() != corruption_rng(7, "snow", 3, "a").random()


def test_selectors_families_and_severity_forms() -> None:
    assert parse_corruptions("gaussian_noise, noise") == (
        "gaussian_noise", "shot_noise", "impulse_noise",
    )  # fmt: skip
    assert len(parse_corruptions("common")) == 14 and len(parse_corruptions("all")) == 18
    assert set(parse_corruptions(FAMILIES)) == set(NAMES)
    assert parse_severities("3") == (3,)
    assert parse_severities("5,1,1") == (1, 5)
    assert parse_severities("2-4") == parse_severities("2..4") == (2, 3, 4)
    assert parse_severities("all") == (1, 2, 3, 4, 5)
    assert parse_severities(4) == (4,)


def test_unknown_name_lists_valid_names_and_suggests() -> None:
    with pytest.raises(UnknownCorruptionError) as info:
        parse_corruptions("gausian_noise")
    message = str(info.value)
    assert "Did you mean 'gaussian_noise'" in message
    assert "Valid names: gaussian_noise, shot_noise" in message and "`bob-cache corruptions`" in (
        message
    )
    with pytest.raises(KeyError):  # also the builtin it resembles
        apply_corruption(np.zeros((8, 8, 3), np.uint8), "frost", 1, rng())
    with pytest.raises(UnknownCorruptionError, match="Families: noise, blur"):
        list_corruptions("weathr")
    with pytest.raises(UnknownCorruptionError, match="No corruption given"):
        parse_corruptions(" , ")


@pytest.mark.parametrize("text", ["0", "6", "1,7", "-1", "x", "1-9", ""])
def test_bad_severity_says_the_range_and_the_fix(text: str) -> None:
    with pytest.raises(SeverityError, match=r"outside 1\.\.5|is not a severity") as info:
        parse_severities(text)
    assert "--severity 1-5" in str(info.value)
    assert isinstance(info.value, ValueError)


def test_apply_checks_severity_and_image() -> None:
    image = np.zeros((8, 8, 3), np.uint8)
    for bad in (0, 6, True):
        with pytest.raises(SeverityError, match="outside 1..5"):
            apply_corruption(image, "contrast", bad, rng())
    with pytest.raises(ValueError, match="uint8 image"):
        apply_corruption(image.astype(np.float32), "contrast", 1, rng())
