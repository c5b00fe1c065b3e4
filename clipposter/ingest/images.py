"""Reading poster images safely: every expected failure becomes a one-line `PosterError`.

`load_poster` turns a file path or raw bytes into a fully loaded RGB `PIL.Image.Image`:
first frame only, EXIF orientation applied, transparency flattened onto white, 16-bit and
float images scaled (not clipped) to 8 bits. Oversized images are refused from the header
alone, before any pixel is decoded, and truncated files are refused rather than padded.
"""
from __future__ import annotations

import hashlib
import io
import os
import re
import struct
import zlib
from typing import IO, Union

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from clipposter.errors import PosterError

IMAGE_EXTENSIONS: frozenset[str] = frozenset(
    {".jpg", ".jpeg", ".png", ".webp", ".bmp", ".tif", ".tiff", ".gif"}
)

# Pillow's own default for Image.MAX_IMAGE_PIXELS, kept as a constant so that changing the
# global elsewhere does not silently change what this module accepts.
DEFAULT_MAX_PIXELS = 89_478_485

PathLike = Union[str, "os.PathLike[str]"]
PosterSource = Union[PathLike, bytes, bytearray, memoryview]

# Only the decoders posters need. Restricting Image.open also keeps exotic plugins out of
# reach (EPS, for one, would run Ghostscript on untrusted input).
_PIL_FORMATS = ("JPEG", "PNG", "WEBP", "BMP", "TIFF", "GIF")
# The JPEG opener reports many phone-camera JPEGs as MPO; both decode through libjpeg.
_JPEG_FORMATS = frozenset({"JPEG", "MPO"})

# What Pillow's decoders raise on damaged data. TypeError/KeyError/IndexError come from
# plugins indexing into malformed headers; they are only caught around Pillow calls.
_DECODE_ERRORS: tuple[type[BaseException], ...] = (
    OSError,
    SyntaxError,
    ValueError,
    EOFError,
    IndexError,
    KeyError,
    TypeError,
    struct.error,
    zlib.error,
)

_BOMB_ERRORS = (Image.DecompressionBombError, Image.DecompressionBombWarning)

_ALPHA_MODES = frozenset({"RGBA", "RGBa", "LA", "La", "PA"})
_INT16_MODES = frozenset({"I;16", "I;16L", "I;16B", "I;16N"})
_WIDE_MODES = _INT16_MODES | {"I", "F"}

_ORIENTATION_TAG = 0x0112

EMPTY_REASON = "empty file (0 bytes)"
NOT_IMAGE_REASON = "not an image (unrecognised format)"
CORRUPT_REASON = "truncated or corrupt image data"


def is_image_path(path: PathLike) -> bool:
    """True when the file name ends in a known image suffix (case-insensitive)."""
    return os.path.splitext(os.fspath(path))[1].lower() in IMAGE_EXTENSIONS


def content_hash(data: bytes) -> str:
    """Hex SHA-256 of the bytes; the embedding cache keys posters by it."""
    return hashlib.sha256(data).hexdigest()


def read_bytes(path: PathLike) -> bytes:
    """All bytes of a poster file, or PosterError if it is missing, unreadable or empty."""
    with _open_file(path, str(path)) as fh:
        try:
            data = fh.read()
        except OSError as exc:  # e.g. an I/O error on a failing disk or network mount
            raise PosterError(path, f"cannot read file: {exc.strerror or exc}") from exc
    if not data:
        raise PosterError(path, EMPTY_REASON)
    return data


def load_poster(
    source: PosterSource,
    max_pixels: int = DEFAULT_MAX_PIXELS,
    draft_size: int | None = None,
    *,
    name: str | None = None,
) -> Image.Image:
    """Decode a poster into an independent, fully loaded RGB image.

    `source` is a path or the file's raw bytes; `name` labels errors (default: the path, or
    "<bytes>"). Images whose width*height exceeds `max_pixels` are refused before decoding.
    `draft_size` lets libjpeg decode JPEGs at a reduced DCT scale whose shorter side is
    still at least `draft_size` (other formats ignore it). Raises PosterError on any
    expected failure.
    """
    if max_pixels < 1:
        raise ValueError(f"max_pixels must be positive, got {max_pixels}")
    if draft_size is not None and draft_size < 1:
        raise ValueError(f"draft_size must be positive, got {draft_size}")

    if isinstance(source, (bytes, bytearray, memoryview)):
        label = name if name is not None else "<bytes>"
        data = bytes(source)
        if not data:
            raise PosterError(label, EMPTY_REASON)
        with io.BytesIO(data) as fh:
            return _decode(fh, label, max_pixels, draft_size)

    label = name if name is not None else str(source)
    with _open_file(source, label) as fh:
        # fstat rather than a separate stat() call: same file, no race with a rename.
        if os.fstat(fh.fileno()).st_size == 0:
            raise PosterError(label, EMPTY_REASON)
        return _decode(fh, label, max_pixels, draft_size)


def _open_file(path: PathLike, label: str) -> IO[bytes]:
    # Checked explicitly because Windows reports a directory as "Permission denied".
    if os.path.isdir(path):
        raise PosterError(label, "cannot read file: is a directory")
    try:
        return open(path, "rb")
    except (OSError, ValueError) as exc:  # ValueError: embedded NUL in the path
        detail = getattr(exc, "strerror", None) or str(exc)
        raise PosterError(label, f"cannot read file: {detail}") from exc


def _decode(fh: IO[bytes], label: str, max_pixels: int, draft_size: int | None) -> Image.Image:
    try:
        # Lazy: parses the header only, so the size check below runs before any decoding.
        opened = Image.open(fh, formats=_PIL_FORMATS)
    except UnidentifiedImageError as exc:
        raise PosterError(label, NOT_IMAGE_REASON) from exc
    except _BOMB_ERRORS as exc:
        raise PosterError(label, _pillow_bomb_reason(exc, max_pixels)) from exc
    except _DECODE_ERRORS as exc:
        raise PosterError(label, f"unsupported or corrupt image: {exc}") from exc

    with opened as img:
        width, height = img.size
        if width * height > max_pixels:
            raise PosterError(label, _too_large_reason(width, height, max_pixels))

        if draft_size is not None and img.format in _JPEG_FORMATS:
            # Must precede load(): draft only rewrites the pending decoder configuration.
            img.draft("RGB", (draft_size, draft_size))
            if min(img.size) < min(draft_size, width, height):
                # Never hand back less than was asked for: decode again at full scale.
                fh.seek(0)
                return _decode(fh, label, max_pixels, None)

        try:
            # Strict by default: with ImageFile.LOAD_TRUNCATED_IMAGES False (Pillow's
            # default, never changed here) a short file raises instead of being grey-padded.
            img.load()
        except _BOMB_ERRORS as exc:
            raise PosterError(label, _pillow_bomb_reason(exc, max_pixels)) from exc
        except MemoryError as exc:
            reason = f"not enough memory to decode {width}×{height} image"
            raise PosterError(label, reason) from exc
        except _DECODE_ERRORS as exc:
            raise PosterError(label, CORRUPT_REASON) from exc

        upright = _apply_orientation(img)
        try:
            # Always a new image, so nothing returned refers to the file or to `opened`.
            return _to_rgb(upright)
        except ValueError as exc:
            raise PosterError(label, f"unsupported image mode {upright.mode}") from exc


def _too_large_reason(width: int, height: int, max_pixels: int) -> str:
    return (
        f"image too large: {width}×{height} pixels exceeds the limit of {max_pixels}; "
        "raise `max_pixels` if you trust it"
    )


def _pillow_bomb_reason(exc: BaseException, max_pixels: int) -> str:
    # Pillow refuses on its own above 2 × Image.MAX_IMAGE_PIXELS (its warning at 1 × is an
    # exception under `-W error`), and some plugins check frame sizes during load. Its
    # message carries the pixel count but not the dimensions.
    match = re.search(r"\((\d+) pixels\)", str(exc))
    pixels = int(match.group(1)) if match else None
    if pixels is not None and pixels <= max_pixels:
        factor = 1 if isinstance(exc, Warning) else 2
        pillow_limit = factor * (Image.MAX_IMAGE_PIXELS or 0)
        return (
            f"image too large: {pixels} pixels exceeds Pillow's own safety limit of "
            f"{pillow_limit} (PIL.Image.MAX_IMAGE_PIXELS)"
        )
    count = f"{pixels} pixels" if pixels is not None else "pixel count"
    return (
        f"image too large: {count} exceeds the limit of {max_pixels}; "
        "raise `max_pixels` if you trust it"
    )


def _apply_orientation(img: Image.Image) -> Image.Image:
    """The image turned upright per its EXIF Orientation tag (the same image if none)."""
    try:
        orientation = img.getexif().get(_ORIENTATION_TAG, 1)
        # Checked first because exif_transpose copies the whole image even when upright.
        if orientation in range(2, 9):
            return ImageOps.exif_transpose(img)
    except _DECODE_ERRORS:
        # Malformed EXIF says nothing reliable about orientation; the pixels are still good.
        return img
    return img


def _to_rgb(img: Image.Image) -> Image.Image:
    """A new RGB image: alpha flattened onto white, high bit depths scaled to 8 bits."""
    if img.mode in _WIDE_MODES:
        return Image.fromarray(_scale_to_uint8(img)).convert("RGB")
    # "transparency" covers palette, L and RGB images with a tRNS / GIF transparent colour.
    if img.mode in _ALPHA_MODES or "transparency" in img.info:
        rgba = img.convert("RGBA")
        white = Image.new("RGBA", img.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, rgba).convert("RGB")
    # 1, L, P, RGB, CMYK, YCbCr; convert() returns a copy even when already RGB.
    return img.convert("RGB")


def _scale_to_uint8(img: Image.Image) -> np.ndarray:
    """Grey levels of an I;16 / I / F image mapped onto 0..255 without clipping to white."""
    values = np.asarray(img, dtype=np.float64)
    if img.mode in _INT16_MODES:
        scaled = values / 257.0  # 65535 / 255: full 16-bit range onto full 8-bit range
    else:
        finite = np.isfinite(values)
        values = np.where(finite, values, 0.0)
        low = float(values[finite].min()) if finite.any() else 0.0
        high = float(values[finite].max()) if finite.any() else 0.0
        if img.mode == "I" and low >= 0 and high <= 65535:
            # Older Pillow opens 16-bit PNGs as "I"; keep their absolute brightness.
            scaled = values / 257.0
        elif img.mode == "F" and low >= 0 and high <= 1:
            scaled = values * 255.0  # the usual normalised-float convention
        elif high > low:
            # Arbitrary range (signed 32-bit, HDR floats): stretch what is there.
            scaled = (values - low) * (255.0 / (high - low))
        else:
            scaled = np.zeros_like(values)  # a flat image with no usable range
    return np.clip(np.rint(scaled), 0, 255).astype(np.uint8)
