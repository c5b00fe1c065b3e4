"""Tests for clipposter.ingest.images. Every image is built in tmp_path; nothing is shipped."""
from __future__ import annotations

import hashlib
import io
import os
import time
import warnings
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageFile, JpegImagePlugin

import clipposter.ingest.images as images
from clipposter.errors import PosterError
from clipposter.ingest.images import (
    DEFAULT_MAX_PIXELS,
    IMAGE_EXTENSIONS,
    content_hash,
    is_image_path,
    load_poster,
    read_bytes,
)

RED = (255, 0, 0)
WHITE = (255, 255, 255)


def save(img: Image.Image, path: Path, **kwargs) -> Path:
    img.save(path, **kwargs)
    return path


def encode(img: Image.Image, fmt: str, **kwargs) -> bytes:
    buf = io.BytesIO()
    img.save(buf, fmt, **kwargs)
    return buf.getvalue()


def assert_close(actual, expected, tol: int = 0) -> None:
    assert all(abs(a - e) <= tol for a, e in zip(actual, expected)), (actual, expected)


def noisy_rgb(width: int, height: int, seed: int = 0) -> Image.Image:
    # Noise defeats compression, so half the file really is half the pixel data.
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8))


def poster_error(source, **kwargs) -> PosterError:
    with pytest.raises(PosterError) as info:
        load_poster(source, **kwargs)
    return info.value


# --- formats ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    "suffix, kwargs, tol",
    [
        (".jpg", {}, 6),
        (".JPEG", {}, 6),
        (".png", {}, 0),
        (".webp", {"lossless": True}, 0),
        (".webp", {"quality": 90}, 6),
        (".bmp", {}, 0),
        (".tif", {}, 0),
        (".tiff", {"compression": "tiff_lzw"}, 0),
        (".gif", {}, 0),
    ],
)
def test_each_format_loads_as_rgb(tmp_path, suffix, kwargs, tol):
    colour = (200, 40, 60)
    path = save(Image.new("RGB", (24, 16), colour), tmp_path / f"poster{suffix}", **kwargs)
    img = load_poster(path)
    assert img.mode == "RGB"
    assert img.size == (24, 16)
    assert_close(img.getpixel((12, 8)), colour, tol)


def test_multi_picture_jpeg_gives_first_picture_and_drafts(tmp_path):
    # Phone cameras write MPO; Pillow's JPEG opener reports it as its own format.
    pictures = [Image.new("RGB", (800, 600), c) for c in (RED, (0, 0, 255))]
    path = tmp_path / "phone.jpg"
    pictures[0].save(path, "MPO", save_all=True, append_images=pictures[1:])
    with Image.open(path) as check:
        assert check.format == "MPO"
    assert_close(load_poster(path).getpixel((5, 5)), RED, 6)
    assert load_poster(path, draft_size=100).size == (200, 150)


def test_str_path_is_accepted(tmp_path):
    path = save(Image.new("RGB", (4, 4), RED), tmp_path / "p.png")
    assert load_poster(str(path)).getpixel((0, 0)) == RED


@pytest.mark.parametrize("suffix", [".gif", ".webp", ".png"])
def test_animated_images_give_first_frame(tmp_path, suffix):
    frames = [Image.new("RGB", (16, 16), c) for c in (RED, (0, 255, 0), (0, 0, 255))]
    path = tmp_path / f"anim{suffix}"
    extra = {"lossless": True} if suffix == ".webp" else {}
    frames[0].save(path, save_all=True, append_images=frames[1:], duration=100, loop=0, **extra)
    with Image.open(path) as check:
        assert getattr(check, "n_frames", 1) == 3  # really animated
    img = load_poster(path)
    assert img.mode == "RGB"
    assert img.getpixel((8, 8)) == RED


# --- modes -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    "mode, colour, expected",
    [
        ("1", 1, WHITE),
        ("1", 0, (0, 0, 0)),
        ("L", 100, (100, 100, 100)),
        ("LA", (100, 0), WHITE),
        ("LA", (0, 255), (0, 0, 0)),
        ("RGBA", (10, 20, 30, 0), WHITE),
        ("RGBA", (10, 20, 30, 255), (10, 20, 30)),
    ],
)
def test_simple_modes_via_png(tmp_path, mode, colour, expected):
    path = save(Image.new(mode, (8, 8), colour), tmp_path / "m.png")
    with Image.open(path) as check:
        assert check.mode == mode
    img = load_poster(path)
    assert img.mode == "RGB"
    assert img.getpixel((3, 3)) == expected


def test_rgba_transparent_pixel_becomes_white_and_partial_alpha_blends(tmp_path):
    rgba = Image.new("RGBA", (4, 1))
    rgba.putdata([(0, 0, 0, 0), (0, 0, 0, 128), (200, 0, 0, 255), (50, 60, 70, 0)])
    img = load_poster(save(rgba, tmp_path / "a.png"))
    assert img.getpixel((0, 0)) == WHITE
    assert_close(img.getpixel((1, 0)), (127, 127, 127), 1)
    assert img.getpixel((2, 0)) == (200, 0, 0)
    assert img.getpixel((3, 0)) == WHITE  # hidden colour must not leak through


def test_rgba_webp_transparency_composited_white(tmp_path):
    rgba = Image.new("RGBA", (8, 8), (0, 0, 255, 0))
    rgba.paste((0, 0, 255, 255), (0, 0, 4, 8))
    img = load_poster(save(rgba, tmp_path / "a.webp", lossless=True))
    assert img.getpixel((6, 4)) == WHITE
    assert img.getpixel((1, 4)) == (0, 0, 255)


def _palette_image() -> Image.Image:
    pal = Image.new("P", (4, 1))
    pal.putpalette([0, 0, 0, 255, 0, 0, 0, 255, 0] + [0] * (256 * 3 - 9))
    pal.putdata([0, 1, 2, 1])
    return pal


@pytest.mark.parametrize("suffix", [".png", ".gif"])
def test_palette_without_transparency(tmp_path, suffix):
    img = load_poster(save(_palette_image(), tmp_path / f"p{suffix}"))
    assert [img.getpixel((x, 0)) for x in range(4)] == [(0, 0, 0), RED, (0, 255, 0), RED]


@pytest.mark.parametrize("suffix", [".png", ".gif"])
def test_palette_with_transparency_composited_white(tmp_path, suffix):
    path = save(_palette_image(), tmp_path / f"p{suffix}", transparency=0)
    with Image.open(path) as check:
        assert check.mode == "P" and "transparency" in check.info
    img = load_poster(path)
    assert [img.getpixel((x, 0)) for x in range(4)] == [WHITE, RED, (0, 255, 0), RED]


def test_palette_alpha_mode_composited_white():
    # No file format writes PA, so exercise the conversion step directly.
    pa = _palette_image().convert("PA")
    pa.putpixel((1, 0), (1, 0))
    rgb = images._to_rgb(pa)
    assert rgb.getpixel((1, 0)) == WHITE
    assert rgb.getpixel((2, 0)) == (0, 255, 0)


@pytest.mark.parametrize("mode, key", [("RGB", (1, 2, 3)), ("L", 7)])
def test_transparent_colour_key_composited_white(tmp_path, mode, key):
    base = Image.new(mode, (2, 1), key)
    base.putpixel((1, 0), (9, 9, 9) if mode == "RGB" else 9)
    img = load_poster(save(base, tmp_path / "k.png", transparency=key))
    assert img.getpixel((0, 0)) == WHITE
    assert img.getpixel((1, 0)) == (9, 9, 9)


@pytest.mark.parametrize("suffix", [".jpg", ".tif"])
def test_cmyk_becomes_plausible_rgb(tmp_path, suffix):
    cmyk = Image.new("CMYK", (16, 8), (0, 255, 255, 0))  # pure red ink
    cmyk.paste((0, 0, 0, 0), (8, 0, 16, 8))  # no ink: paper white
    path = save(cmyk, tmp_path / f"c{suffix}")
    with Image.open(path) as check:
        assert check.mode == "CMYK"
    img = load_poster(path)
    assert img.mode == "RGB"
    assert_close(img.getpixel((2, 4)), RED, 8)
    assert_close(img.getpixel((13, 4)), WHITE, 8)


def _gradient16() -> np.ndarray:
    return np.tile(np.linspace(0, 65535, 256).round().astype(np.uint16), (4, 1))


def _assert_full_gradient(img: Image.Image) -> None:
    row = np.asarray(img)[0, :, 0].astype(int)
    assert img.mode == "RGB"
    assert row.min() <= 1 and row.max() >= 254  # spans the range, not clipped to white
    assert np.all(np.diff(row) >= 0)  # still a monotone gradient
    assert len(np.unique(row)) > 200  # and not posterised into a few steps


@pytest.mark.parametrize("suffix", [".png", ".tif"])
def test_16bit_gradient_scaled_to_8bit(tmp_path, suffix):
    path = save(Image.fromarray(_gradient16()), tmp_path / f"g16{suffix}")
    with Image.open(path) as check:
        assert check.mode.startswith("I")
    img = load_poster(path)
    _assert_full_gradient(img)
    assert_close(img.getpixel((128, 0)), (128, 128, 128), 1)  # mid-grey stays mid-grey


def test_32bit_int_in_16bit_range_scaled(tmp_path):
    path = save(Image.fromarray(_gradient16().astype(np.int32)), tmp_path / "g32.tif")
    with Image.open(path) as check:
        assert check.mode == "I"
    _assert_full_gradient(load_poster(path))


def test_32bit_int_outside_16bit_range_stretched(tmp_path):
    values = np.tile(np.linspace(-1_000_000, 5_000_000, 256).astype(np.int32), (4, 1))
    _assert_full_gradient(load_poster(save(Image.fromarray(values), tmp_path / "wide.tif")))


@pytest.mark.parametrize("low, high", [(0.0, 1.0), (-5.0, 5.0)])
def test_float_image_scaled(tmp_path, low, high):
    values = np.tile(np.linspace(low, high, 256, dtype=np.float32), (4, 1))
    path = save(Image.fromarray(values), tmp_path / "f.tif")
    with Image.open(path) as check:
        assert check.mode == "F"
    _assert_full_gradient(load_poster(path))


def test_float_image_with_nan_and_flat_images_do_not_crash():
    values = np.full((4, 4), np.nan, dtype=np.float32)
    assert images._to_rgb(Image.fromarray(values)).getpixel((0, 0)) == (0, 0, 0)
    flat = Image.fromarray(np.full((4, 4), 70_000, dtype=np.int32))
    assert images._to_rgb(flat).mode == "RGB"


# --- orientation -----------------------------------------------------------------------


def _sideways_jpeg(path: Path, size: tuple[int, int]) -> Path:
    width, height = size
    img = Image.new("RGB", size, (0, 0, 255))
    img.paste(RED, (0, 0, width // 2, height))  # left half red
    exif = Image.Exif()
    exif[0x0112] = 6  # camera held rotated: display after turning 90° clockwise
    return save(img, path, exif=exif, quality=95)


def test_exif_orientation_applied(tmp_path):
    img = load_poster(_sideways_jpeg(tmp_path / "phone.jpg", (20, 10)))
    assert img.size == (10, 20)
    assert_close(img.getpixel((5, 2)), RED, 40)  # stored left half is now on top
    assert_close(img.getpixel((5, 17)), (0, 0, 255), 40)


def test_exif_orientation_with_draft(tmp_path):
    img = load_poster(_sideways_jpeg(tmp_path / "phone.jpg", (400, 200)), draft_size=50)
    assert img.size == (50, 100)  # decoded at 1/4 scale, then turned upright
    assert_close(img.getpixel((25, 10)), RED, 40)


# --- draft -----------------------------------------------------------------------------


def test_draft_size_reduces_jpeg_but_not_below_request(tmp_path):
    path = save(Image.new("RGB", (2000, 3000), (90, 120, 150)), tmp_path / "big.jpg")
    img = load_poster(path, draft_size=224)
    assert 224 <= min(img.size) < 2000
    assert img.size == (250, 375)  # 1/8 scale is the smallest that keeps >= 224
    assert_close(img.getpixel((100, 100)), (90, 120, 150), 6)


@pytest.mark.parametrize(
    "size, expected",
    [
        ((300, 200), (300, 200)),  # shorter side already below the request: untouched
        ((450, 450), (225, 225)),  # 1/2 scale gives 225, still >= 224
        ((447, 900), (447, 900)),  # halving would leave 223.5 < 224: full size
    ],
)
def test_draft_never_undershoots(tmp_path, size, expected):
    path = save(Image.new("RGB", size, RED), tmp_path / "d.jpg")
    img = load_poster(path, draft_size=224)
    assert min(img.size) >= min(224, min(size))
    assert img.size == expected


def test_draft_ignored_for_non_jpeg(tmp_path):
    path = save(Image.new("RGB", (800, 600), RED), tmp_path / "p.png")
    assert load_poster(path, draft_size=100).size == (800, 600)


def test_draft_that_undershoots_falls_back_to_full_decode(tmp_path, monkeypatch):
    path = save(Image.new("RGB", (800, 1200), RED), tmp_path / "d.jpg")
    original = JpegImagePlugin.JpegImageFile.draft

    def too_eager(self, mode, size):
        return original(self, mode, (1, 1))  # forces 1/8 scale: 100 px, below 150

    monkeypatch.setattr(JpegImagePlugin.JpegImageFile, "draft", too_eager)
    assert load_poster(path, draft_size=150).size == (800, 1200)


# --- failures --------------------------------------------------------------------------


@pytest.mark.parametrize("suffix", [".jpg", ".png"])
def test_truncated_file_rejected(tmp_path, suffix):
    data = encode(noisy_rgb(128, 128), "JPEG" if suffix == ".jpg" else "PNG")
    path = tmp_path / f"cut{suffix}"
    path.write_bytes(data[: len(data) // 2])
    err = poster_error(path)
    assert "truncated" in err.reason
    assert str(path) in str(err)
    assert ImageFile.LOAD_TRUNCATED_IMAGES is False  # rejected under the strict default


def test_header_only_fragment_rejected(tmp_path):
    path = tmp_path / "stub.jpg"
    path.write_bytes(encode(noisy_rgb(32, 32), "JPEG")[:20])
    err = poster_error(path)
    assert str(path) in str(err)


def test_zero_byte_file(tmp_path):
    path = tmp_path / "empty.jpg"
    path.touch()
    err = poster_error(path)
    assert err.reason == "empty file (0 bytes)"
    assert str(path) in str(err)


def test_text_file_named_jpg(tmp_path):
    path = tmp_path / "notes.jpg"
    path.write_text("this is not a poster\n")
    err = poster_error(path)
    assert err.reason == "not an image (unrecognised format)"
    assert str(path) in str(err)


def test_formats_outside_the_list_are_refused(tmp_path):
    # Pillow can read PPM, but posters are restricted to the listed decoders.
    path = save(Image.new("RGB", (4, 4), RED), tmp_path / "p.ppm")
    assert "not an image" in poster_error(path).reason


def test_missing_path(tmp_path):
    path = tmp_path / "nope.png"
    err = poster_error(path)
    assert err.reason.startswith("cannot read file:")
    assert str(path) in str(err)


def test_directory(tmp_path):
    path = tmp_path / "folder.jpg"
    path.mkdir()
    err = poster_error(path)
    assert err.reason.startswith("cannot read file:")
    assert str(path) in str(err)


def test_decompression_bomb_refused_before_decoding(tmp_path, monkeypatch):
    path = save(Image.new("1", (3000, 3000)), tmp_path / "bomb.png")

    def no_decoding(self):
        raise AssertionError("pixels were decoded")

    monkeypatch.setattr(ImageFile.ImageFile, "load", no_decoding)
    start = time.perf_counter()
    err = poster_error(path, max_pixels=1_000_000)
    assert time.perf_counter() - start < 0.5
    assert "too large" in err.reason
    assert "3000×3000" in err.reason and "1000000" in err.reason
    assert "`max_pixels`" in err.reason
    assert str(path) in str(err)


def test_pixel_limit_is_inclusive(tmp_path):
    path = save(Image.new("L", (100, 100)), tmp_path / "edge.png")
    assert load_poster(path, max_pixels=10_000).size == (100, 100)
    assert "too large" in poster_error(path, max_pixels=9_999).reason


def test_pillow_own_bomb_error_becomes_poster_error(tmp_path, monkeypatch):
    path = save(Image.new("L", (100, 100)), tmp_path / "b.png")
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1_000)  # Pillow refuses above 2_000
    err = poster_error(path)
    assert "too large" in err.reason and "10000 pixels" in err.reason
    err = poster_error(path, max_pixels=50_000)  # our limit allows it; Pillow's does not
    assert "Pillow" in err.reason


def test_pillow_bomb_warning_as_error_becomes_poster_error(tmp_path, monkeypatch):
    path = save(Image.new("L", (100, 100)), tmp_path / "w.png")
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 6_000)  # warns only (10_000 < 12_000)
    with warnings.catch_warnings():
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        err = poster_error(path, max_pixels=50_000)
    assert "too large" in err.reason


def test_global_pillow_state_untouched(tmp_path):
    before = (Image.MAX_IMAGE_PIXELS, ImageFile.LOAD_TRUNCATED_IMAGES)
    path = save(Image.new("RGB", (50, 50), RED), tmp_path / "x.jpg")
    load_poster(path, max_pixels=10_000_000_000, draft_size=10)
    poster_error(path, max_pixels=10)
    assert (Image.MAX_IMAGE_PIXELS, ImageFile.LOAD_TRUNCATED_IMAGES) == before
    assert DEFAULT_MAX_PIXELS == 89_478_485


def test_bad_arguments_are_programming_errors(tmp_path):
    with pytest.raises(ValueError):
        load_poster(b"x", max_pixels=0)
    with pytest.raises(ValueError):
        load_poster(b"x", draft_size=0)


# --- bytes input and resource handling -------------------------------------------------


def test_bytes_input(tmp_path):
    data = encode(Image.new("RGBA", (6, 4), (0, 0, 0, 0)), "PNG")
    for source in (data, bytearray(data), memoryview(data)):
        img = load_poster(source)
        assert img.mode == "RGB" and img.size == (6, 4)
        assert img.getpixel((0, 0)) == WHITE


def test_bytes_errors_use_label():
    assert str(poster_error(b"")) == "<bytes>: empty file (0 bytes)"
    assert str(poster_error(b"hello")) == "<bytes>: not an image (unrecognised format)"
    err = poster_error(b"hello", name="https://example.org/p.jpg")
    assert str(err).startswith("https://example.org/p.jpg: ")


def test_result_is_independent_and_file_closed(tmp_path):
    path = save(Image.new("RGB", (8, 8), RED), tmp_path / "p.png")
    fd_dir = Path("/proc/self/fd")
    before = len(os.listdir(fd_dir)) if fd_dir.exists() else None
    img = load_poster(path)
    if before is not None:
        assert len(os.listdir(fd_dir)) == before
    path.unlink()
    assert getattr(img, "fp", None) is None
    img.putpixel((0, 0), (0, 0, 0))  # writable, already in memory
    assert img.getpixel((1, 1)) == RED


# --- helpers ---------------------------------------------------------------------------


def test_content_hash():
    assert content_hash(b"poster") == hashlib.sha256(b"poster").hexdigest()
    assert len(content_hash(b"")) == 64


def test_read_bytes(tmp_path):
    path = tmp_path / "p.bin"
    path.write_bytes(b"\x89PNG data")
    assert read_bytes(path) == b"\x89PNG data"
    assert read_bytes(str(path)) == b"\x89PNG data"


@pytest.mark.parametrize("kind", ["missing", "directory", "empty"])
def test_read_bytes_failures(tmp_path, kind):
    path = tmp_path / f"{kind}.jpg"
    if kind == "directory":
        path.mkdir()
    elif kind == "empty":
        path.touch()
    with pytest.raises(PosterError) as info:
        read_bytes(path)
    assert str(path) in str(info.value)
    expected = "empty file (0 bytes)" if kind == "empty" else "cannot read file:"
    assert info.value.reason.startswith(expected)


def test_is_image_path():
    assert is_image_path("a/b/poster.JPG")
    assert is_image_path(Path("x.tiff"))
    assert is_image_path("x.WebP")
    assert not is_image_path("notes.txt")
    assert not is_image_path("jpg")
    assert not is_image_path("archive.jpg.zip")
    assert IMAGE_EXTENSIONS == frozenset(
        {".jpg", ".jpeg", ".png", ".webp", ".bmp", ".tif", ".tiff", ".gif"}
    )
    assert all(ext == ext.lower() for ext in IMAGE_EXTENSIONS)
