"""Reading poster images safely: every expected failure becomes a one-line `PosterError`.

`load_poster` turns a file path or raw bytes into a fully loaded RGB `PIL.Image.Image`:
first frame only, EXIF orientation applied, transparency flattened onto white, 16-bit and
float images scaled (not clipped) to 8 bits. Oversized images are refused from the header
alone, before any pixel is decoded, and truncated files are refused rather than padded.

Posters inside tar shards are read by a path SHARD.tar#MEMBER (clipposter.ingest.tar_members).
Only regular files are read: a FIFO or a device named like a poster (`a.jpg` → /dev/zero) fails at
once instead of blocking or streaming without end, and no file is read past `max_bytes`.
"""
from __future__ import annotations

import hashlib
import io
import os
import re
import stat
import struct
import zlib
from typing import IO, Iterator, Union

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from clipposter.errors import ConfigError, PosterError
from clipposter.ingest.tar_members import member_location, member_size, read_member

IMAGE_EXTENSIONS: frozenset[str] = frozenset(
    {".jpg", ".jpeg", ".png", ".webp", ".bmp", ".tif", ".tiff", ".gif"}
)

# Pillow's own default for Image.MAX_IMAGE_PIXELS, kept as a constant so that changing the
# global elsewhere does not silently change what this module accepts.
DEFAULT_MAX_PIXELS = 89_478_485
# The largest poster file read, in bytes. Real posters are well under 10 MB; the cap stops a huge or
# endless file from filling memory (downloads use it too).
DEFAULT_MAX_BYTES = 50 * 1024 * 1024

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

# Pixels of a 16-bit or 32-bit image converted at a time: the float temporaries of one strip stay
# near 8 MB whatever the image's size, instead of 8 bytes for every pixel of the whole image.
_STRIP_PIXELS = 1 << 20

# O_NONBLOCK: a FIFO swapped in between the check and the open must not block the open itself.
_OPEN_FLAGS = getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_BINARY", 0)

_FILE_KINDS = ((stat.S_ISDIR, "is a directory"), (stat.S_ISFIFO, "not a regular file (a FIFO)"),
               (stat.S_ISCHR, "not a regular file (a character device)"),
               (stat.S_ISBLK, "not a regular file (a block device)"),
               (stat.S_ISSOCK, "not a regular file (a socket)"))

EMPTY_REASON = "empty file (0 bytes)"
NOT_IMAGE_REASON = "not an image (unrecognised format)"
CORRUPT_REASON = "truncated or corrupt image data"


def is_image_path(path: PathLike) -> bool:
    """True when the file name ends in a known image suffix (case-insensitive)."""
    return os.path.splitext(os.fspath(path))[1].lower() in IMAGE_EXTENSIONS


def content_hash(data: bytes) -> str:
    """Hex SHA-256 of the bytes; the embedding cache keys posters by it."""
    return hashlib.sha256(data).hexdigest()


def check_limits(*, max_pixels: int | None = None, max_bytes: int | None = None,
                 draft_size: int | None = None) -> None:
    """ConfigError naming the first given limit that is not a whole number of at least 1."""
    for field, value in (("max_pixels", max_pixels), ("max_bytes", max_bytes), ("draft_size", draft_size)):
        if value is None:
            continue
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ConfigError(field, f"must be a whole number of at least 1, got {value!r}")


def read_bytes(path: PathLike, max_bytes: int = DEFAULT_MAX_BYTES) -> bytes:
    """All bytes of a poster file, or PosterError if it is missing, unreadable, empty, not a regular
    file, or larger than `max_bytes` (checked while reading, so a file still growing cannot pass)."""
    check_limits(max_bytes=max_bytes)
    with _open_file(path, str(path), max_bytes) as fh:
        try:
            data = fh.read(max_bytes + 1)
        except OSError as exc:  # e.g. an I/O error on a failing disk or network mount
            raise PosterError(path, f"cannot read file: {exc.strerror or exc}") from exc
    if not data:
        raise PosterError(path, EMPTY_REASON)
    if len(data) > max_bytes:
        raise PosterError(path, _too_many_bytes_reason(max_bytes))
    return data


def load_poster(
    source: PosterSource,
    max_pixels: int = DEFAULT_MAX_PIXELS,
    draft_size: int | None = None,
    *,
    name: str | None = None,
    max_bytes: int = DEFAULT_MAX_BYTES,
) -> Image.Image:
    """Decode a poster into an independent, fully loaded RGB image.

    `source` is a path or the file's raw bytes; `name` labels errors (default: the path, or
    "<bytes>"). Images whose width*height exceeds `max_pixels`, and files (or bytes) larger than
    `max_bytes`, are refused before decoding. `draft_size` lets libjpeg decode JPEGs at a reduced
    DCT scale whose shorter side is still at least `draft_size` (other formats ignore it). Raises
    PosterError on any expected failure, ConfigError for a limit below 1.
    """
    check_limits(max_pixels=max_pixels, max_bytes=max_bytes, draft_size=draft_size)

    if isinstance(source, (bytes, bytearray, memoryview)):
        label = name if name is not None else "<bytes>"
        data = bytes(source)
        if not data:
            raise PosterError(label, EMPTY_REASON)
        if len(data) > max_bytes:
            raise PosterError(label, _too_many_bytes_reason(max_bytes))
        with io.BytesIO(data) as fh:
            return _decode(fh, label, max_pixels, draft_size)

    label = name if name is not None else str(source)
    with _open_file(source, label, max_bytes) as fh:
        # The decoder then reads no further than the header's dimensions need, and those are
        # bounded by `max_pixels`.
        return _decode(fh, label, max_pixels, draft_size)


def _open_file(path: PathLike, label: str, max_bytes: int) -> IO[bytes]:
    """The open regular file at `path`, refused when empty or larger than `max_bytes`.

    The kind of file is checked before opening (opening a device can have effects of its own, and a
    FIFO blocks until a writer comes) and again on the open descriptor, which is what is read. A path
    SHARD.tar#MEMBER names a poster inside a tar shard (clipposter.ingest.tar_members): its bytes.
    """
    if member_location(path) is not None:
        size = member_size(path, label)
        if size == 0:
            raise PosterError(label, EMPTY_REASON)
        if size > max_bytes:
            raise PosterError(label, _too_many_bytes_reason(max_bytes))
        return io.BytesIO(read_member(path, label))
    try:
        _require_regular_file(os.stat(path).st_mode, label)
        # builtins.open, not os.fdopen(os.open(...)): one call that tools and tests can watch.
        fh = open(path, "rb", opener=lambda p, flags: os.open(p, flags | _OPEN_FLAGS))
    except (OSError, ValueError) as exc:  # ValueError: embedded NUL in the path
        detail = getattr(exc, "strerror", None) or str(exc)
        raise PosterError(label, f"cannot read file: {detail}") from exc
    try:
        info = os.fstat(fh.fileno())  # the file actually opened: no race with a rename
        _require_regular_file(info.st_mode, label)
        if info.st_size == 0:
            raise PosterError(label, EMPTY_REASON)
        if info.st_size > max_bytes:
            raise PosterError(label, _too_many_bytes_reason(max_bytes))
    except BaseException:
        fh.close()
        raise
    return fh


def _require_regular_file(mode: int, label: str) -> None:
    if stat.S_ISREG(mode):
        return
    kind = next((text for test, text in _FILE_KINDS if test(mode)), "not a regular file")
    raise PosterError(label, f"cannot read file: {kind}")


def _too_many_bytes_reason(max_bytes: int) -> str:
    return f"file too large: more than {max_bytes} bytes; raise `max_bytes` if you trust it"


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
    """Grey levels of an I;16 / I / F image mapped onto 0..255 without clipping to white.

    Worked through in horizontal strips of about `_STRIP_PIXELS` pixels, so that the cost beyond
    the decoded image and the 8-bit result is one strip's temporaries, not 8 bytes per pixel.
    """
    width, height = img.size
    out = np.empty((height, width), dtype=np.uint8)
    if img.mode in _INT16_MODES:
        # round(v / 257) in integers (65535 / 255: full 16-bit range onto full 8-bit range); v / 257
        # never lands on a half, so this is exact.
        for top, rows in _strips(img):
            out[top:top + len(rows)] = (rows.astype(np.uint32) + 128) // 257
        return out

    # I and F: the range first (NaN and infinities count as 0 and do not widen it), then the mapping.
    low, high, finite_seen = np.inf, -np.inf, False
    for _, rows in _strips(img):
        finite = rows[np.isfinite(rows)] if img.mode == "F" else rows
        if finite.size:
            finite_seen = True
            low, high = min(low, float(finite.min())), max(high, float(finite.max()))
    if not finite_seen:
        low = high = 0.0
    if img.mode == "I" and low >= 0 and high <= 65535:
        # Older Pillow opens 16-bit PNGs as "I"; keep their absolute brightness.
        offset, scale = 0.0, 1 / 257.0
    elif img.mode == "F" and low >= 0 and high <= 1:
        offset, scale = 0.0, 255.0  # the usual normalised-float convention
    elif high > low:
        # Arbitrary range (signed 32-bit, HDR floats): stretch what is there.
        offset, scale = low, 255.0 / (high - low)
    else:
        offset, scale = 0.0, 0.0  # a flat image with no usable range
    for top, rows in _strips(img):
        values = rows.astype(np.float64)
        values[~np.isfinite(values)] = 0.0
        values -= offset
        values *= scale
        np.rint(values, out=values)
        np.clip(values, 0, 255, out=values)
        out[top:top + len(rows)] = values
    return out


def _strips(img: Image.Image) -> Iterator[tuple[int, np.ndarray]]:
    """(first row, pixel rows as an array) of `img`, a few rows at a time."""
    width, height = img.size
    step = max(1, _STRIP_PIXELS // max(1, width))
    for top in range(0, height, step):
        yield top, np.asarray(img.crop((0, top, width, min(height, top + step))))
