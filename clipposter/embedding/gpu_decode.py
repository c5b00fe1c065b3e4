"""JPEG posters decoded in batches by torchvision on the backbone's device (nvjpeg on a CUDA GPU),
and the backbone's preprocessing done there on tensors.

At thousands of posters per second the CPU path's Pillow decode is the wall, not the model. Here
CPU threads only read each file (regular files only, at most `max_bytes`, as everywhere) and look
at its header; `torchvision.io.decode_jpeg(list_of_byte_tensors, device=...)` decodes a whole batch
at once, and open_clip's eval transform is applied to the decoded tensors, a stack of same-sized
posters per call: resize of the shorter side with antialiased bicubic (bilinear where the backbone
says so), center crop, scale to [0, 1], normalise with the model's mean and std.

Only what this path decodes as the Pillow path would is given to it: a baseline or progressive
JPEG in RGB or greyscale, that ends with its end-of-image marker (a truncated file goes to Pillow,
which refuses it), within `max_pixels`, with no EXIF rotation. Everything else — PNG, WebP, CMYK,
a rotated phone photo, a file the device decoder fails on — takes the CPU path per file (same
decode and preprocessing as `decode="cpu"`) and is counted in `DecodeStats.fallback`.

What differs from the CPU path (cosine >= 0.99 on the tests' tiny backbone): the JPEG decoder
(nvjpeg or torchvision's libjpeg instead of Pillow's libjpeg-turbo, and a full-size decode where
Pillow decodes at a reduced DCT scale that still covers the model's input), and the resize
(torch's antialiased bicubic on tensors instead of Pillow's). Embeddings from the two paths are
close, not equal; a cache's rows keep whichever path wrote them.

`torch` and `torchvision` are imported inside the functions that need them: importing this module
is light.
"""
from __future__ import annotations

import contextlib
import logging
import threading
import warnings
from collections import Counter, deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Callable, Iterator, Sequence

from PIL import Image

from clipposter.errors import ConfigError, PosterError
from clipposter.ingest.images import read_bytes

if TYPE_CHECKING:
    import torch

    from clipposter.embedding.identity import BackboneIdentity

log = logging.getLogger(__name__)

DECODE_CHOICES = ("cpu", "gpu", "auto")
# Device types the tensor decoder is used on when `decode="gpu"` asks for it. Only CUDA has a batched
# JPEG decoder in torchvision; tests add "cpu" to run this path's code where there is no GPU.
GPU_DEVICE_TYPES: tuple[str, ...] = ("cuda",)

_RESIZE_MODES = ("shortest", "squash")
_JPEG_MODES = frozenset({"RGB", "L"})
_ORIENTATION_TAG = 0x0112
_SOI, _EOI = b"\xff\xd8\xff", b"\xff\xd9"


@dataclass
class DecodeStats:
    """Where the posters of one run were decoded."""

    tensor: int = 0  # decoded and preprocessed on the device
    fallback: int = 0  # handed to the CPU path instead (not a JPEG this path takes, or its decode failed)
    reasons: Counter = field(default_factory=Counter)  # why, per fallback

    def to_dict(self) -> dict:
        return {"tensor": self.tensor, "fallback": self.fallback, "fallback_reasons": dict(self.reasons)}


def check_decode(decode: str) -> None:
    """ConfigError unless `decode` is a known choice and, for "gpu", a device to decode on exists —
    checked before any file is read."""
    if decode not in DECODE_CHOICES:
        raise ConfigError("decode", f"must be one of {', '.join(DECODE_CHOICES)}, got {decode!r}")
    if decode == "gpu" and not any(_available(kind) for kind in GPU_DEVICE_TYPES):
        raise ConfigError("decode", "is 'gpu', but CUDA is not available on this machine; use 'cpu' (or 'auto', "
                                    "which decodes on the GPU when there is one)")


def _available(kind: str) -> bool:
    if kind == "cpu":
        return True
    import torch

    return kind == "cuda" and torch.cuda.is_available()


def unsupported(identity: BackboneIdentity) -> str | None:
    """Why the tensor preprocessing cannot reproduce this backbone's transform, or None."""
    if identity.resize_mode not in _RESIZE_MODES:
        return f"its resize mode {identity.resize_mode!r} (supported: {', '.join(_RESIZE_MODES)})"
    if len(identity.mean) != 3 or len(identity.std) != 3:
        return "it records no per-channel mean and std"
    return None


def use_tensor_decoder(decode: str, identity: BackboneIdentity, device: torch.device) -> bool:
    """Whether the posters of a run on `device` are decoded here (True) or by the CPU path.

    "cpu": never; "auto": on a CUDA device when the backbone's transform is supported; "gpu": always,
    or a ConfigError naming `decode` when the backbone is not on a GPU or its transform unsupported."""
    check_decode(decode)
    if decode == "cpu":
        return False
    why = unsupported(identity)
    if decode == "auto":
        return device.type == "cuda" and why is None
    if device.type not in GPU_DEVICE_TYPES:
        raise ConfigError("decode", f"is 'gpu', but the backbone runs on {device.type}; put it on a CUDA device or "
                                    f"use 'cpu'")
    if why is not None:
        raise ConfigError("decode", f"is 'gpu', but the GPU preprocessing cannot reproduce backbone "
                                    f"{identity.model}'s transform ({why}); use 'cpu'")
    return True


class TensorPreprocess:
    """open_clip's eval transform of `identity` on uint8 image tensors, a batch per call."""

    def __init__(self, identity: BackboneIdentity, device: torch.device | str):
        import torch
        from torchvision.transforms import InterpolationMode

        why = unsupported(identity)
        if why is not None:
            raise ConfigError("decode", f"cannot preprocess on tensors for backbone {identity.model}: {why}")
        self.size = int(identity.image_size)
        self.resize_mode = identity.resize_mode
        # open_clip: bilinear when the config says so, bicubic otherwise.
        self.interpolation = (InterpolationMode.BILINEAR if identity.interpolation == "bilinear"
                              else InterpolationMode.BICUBIC)
        self.device = torch.device(device)
        self.mean = torch.tensor(identity.mean, dtype=torch.float32, device=self.device).view(1, 3, 1, 1)
        self.std = torch.tensor(identity.std, dtype=torch.float32, device=self.device).view(1, 3, 1, 1)

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        """(N, 3, H, W) uint8 → (N, 3, S, S) float32 normalised pixels, as the backbone's preprocess
        gives for the same pixels as PIL images."""
        from torchvision.transforms.v2 import functional as F

        images = images.to(self.device)
        if self.resize_mode == "shortest":
            # The same size rule as torchvision's Resize(int) on a PIL image: shorter side to S, the
            # other scaled and truncated; then the same crop offsets.
            out = F.resize(images, [self.size], interpolation=self.interpolation, antialias=True)
            out = F.center_crop(out, [self.size, self.size])
        else:  # squash
            out = F.resize(images, [self.size, self.size], interpolation=self.interpolation, antialias=True)
        # Resizing uint8 rounds and clamps to uint8, as Pillow's resize of an 8-bit image does.
        return (out.float().div_(255.0) - self.mean) / self.std

    def batch(self, images: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        """Decoded images of any sizes → preprocessed (3, S, S) tensors, in order; one call per size."""
        import torch

        by_shape: dict[tuple, list[int]] = {}
        for i, img in enumerate(images):
            by_shape.setdefault(tuple(img.shape), []).append(i)
        out: list = [None] * len(images)
        for idx in by_shape.values():
            pixels = self(torch.stack([images[i] for i in idx]))
            for i, p in zip(idx, pixels):
                out[i] = p
        return out


# Start-of-frame markers of baseline (C0), extended (C1) and progressive (C2) Huffman JPEGs: what
# nvjpeg and Pillow both decode. Lossless, hierarchical and arithmetic-coded frames go to Pillow.
_DEVICE_FRAMES = frozenset({0xC0, 0xC1, 0xC2})
_OTHER_FRAMES = frozenset({0xC3, 0xC5, 0xC6, 0xC7, 0xC9, 0xCA, 0xCB, 0xCD, 0xCE, 0xCF})


def tensor_decodable(data: bytes, max_pixels: int) -> str | None:
    """None when the tensor decoder may take these bytes, else why the CPU path decodes them.

    Walks the JPEG's marker segments up to the scan (a few dozen bytes of Python per file; Pillow's
    header parser costs ten times that, which at thousands of posters per second is the reading
    threads' whole share of the interpreter)."""
    if not data.startswith(_SOI):
        return "not a JPEG"
    if not data.rstrip(b"\x00\r\n ").endswith(_EOI):
        return "no end-of-image marker"
    pos, size, frame = 2, len(data), None
    while pos + 4 <= size:
        if data[pos] != 0xFF:
            return "unreadable header"
        marker = data[pos + 1]
        if marker == 0xFF:  # fill byte
            pos += 1
            continue
        if marker == 0x01 or 0xD0 <= marker <= 0xD7:  # markers without a length
            pos += 2
            continue
        length = int.from_bytes(data[pos + 2:pos + 4], "big")
        segment = data[pos + 4:pos + 2 + length]
        if marker in _OTHER_FRAMES:
            return "lossless, hierarchical or arithmetic-coded JPEG"
        if marker in _DEVICE_FRAMES and len(segment) >= 6:
            frame = (int.from_bytes(segment[1:3], "big"), int.from_bytes(segment[3:5], "big"), segment[5])
        elif marker == 0xE1 and segment.startswith(b"Exif\x00\x00") and _exif_rotates(segment[6:]):
            return "EXIF orientation"
        elif marker == 0xEE and segment.startswith(b"Adobe"):
            return "Adobe JPEG"  # its colour transform flag (RGB or YCCK) is Pillow's to read
        elif marker == 0xDA:  # start of scan: the header is over
            break
        pos += 2 + length
    if frame is None:
        return "unreadable header"
    height, width, components = frame
    if components not in (1, 3):
        return f"{components}-channel JPEG"
    if width * height > max_pixels:
        return "over max_pixels"
    return None


def _exif_rotates(tiff: bytes) -> bool:
    """Whether an EXIF block's Orientation tag asks for a turn or a flip."""
    exif = Image.Exif()
    try:
        exif.load(tiff)
        return exif.get(_ORIENTATION_TAG, 1) not in (0, 1)
    except Exception:  # noqa: BLE001 - malformed EXIF: let the CPU path, which copes, decide
        return True


@dataclass
class _Jpeg:
    data: bytes


@dataclass
class _Pixels:
    tensor: object  # preprocessed on the CPU path


def _quiet_torchvision() -> None:
    # torchvision 0.29 marks its image decoders deprecated in favour of TorchCodec, warning on every
    # call; the decoders work, and the warning says nothing a user can act on.
    warnings.filterwarnings("ignore", message="The image decoding and encoding capabilities of TorchVision",
                            category=DeprecationWarning)


class TensorDecoder:
    """Decodes posters for one run: file reads and header checks in CPU threads, JPEG decoding and
    preprocessing in batches on `preprocess.device`, the CPU path (`cpu_load(data, name)`, raising
    PosterError) for the rest."""

    def __init__(self, preprocess: TensorPreprocess, cpu_load: Callable, *, max_pixels: int, max_bytes: int):
        self.preprocess = preprocess
        self.cpu_load = cpu_load
        self.max_pixels = max_pixels
        self.max_bytes = max_bytes
        self.stats = DecodeStats()
        self._lock = threading.Lock()  # fallbacks are counted from the reading threads
        _quiet_torchvision()

    def _prepare(self, path: str):
        """In a worker thread: the file's bytes for the device, the CPU path's pixels, or PosterError."""
        try:
            data = read_bytes(path, max_bytes=self.max_bytes)
            why = tensor_decodable(data, self.max_pixels)
            if why is None:
                return _Jpeg(data)
            return self._fallback(data, path, why)
        except PosterError as exc:
            return exc

    def _fallback(self, data: bytes, path: str, why: str):
        with self._lock:
            self.stats.fallback += 1
            self.stats.reasons[why] += 1
        return _Pixels(self.cpu_load(data, name=path))

    def _decode_jpegs(self, items: list[tuple[str, bytes]]) -> list:
        """Decoded uint8 (3, H, W) tensors on the device, or PosterError / _Pixels per item."""
        import torch
        from torchvision.io import ImageReadMode, decode_jpeg

        device = self.preprocess.device
        raw = [torch.frombuffer(bytearray(data), dtype=torch.uint8) for _, data in items]
        # One bad file fails the whole batch: then retry one by one, so that only that one falls back.
        with contextlib.suppress(RuntimeError):
            return list(decode_jpeg(raw, mode=ImageReadMode.RGB, device=device))
        out = []
        for (path, data), tensor in zip(items, raw):
            try:
                out.append(decode_jpeg(tensor, mode=ImageReadMode.RGB, device=device))
            except RuntimeError:
                try:
                    out.append(self._fallback(data, path, "device decode failed"))
                except PosterError as exc:
                    out.append(exc)
        return out

    def _finish(self, chunk: list[tuple[str, str, object]]) -> list[tuple[str, str, object]]:
        """Prepared chunk → (hash, path, preprocessed pixels on the device or PosterError), in order."""
        jpeg_at = [i for i, (_, _, r) in enumerate(chunk) if isinstance(r, _Jpeg)]
        results: list = [r for _, _, r in chunk]
        if jpeg_at:
            decoded = self._decode_jpegs([(chunk[i][1], chunk[i][2].data) for i in jpeg_at])
            images = [(i, d) for i, d in zip(jpeg_at, decoded) if not isinstance(d, (PosterError, _Pixels))]
            for i, d in zip(jpeg_at, decoded):
                if isinstance(d, (PosterError, _Pixels)):
                    results[i] = d
            if images:
                for (i, _), pixels in zip(images, self.preprocess.batch([d for _, d in images])):
                    results[i] = pixels
                self.stats.tensor += len(images)
        device = self.preprocess.device
        return [(h, path, r.tensor.to(device) if isinstance(r, _Pixels) else r)
                for (h, path, _), r in zip(chunk, results)]

    def decoded(self, todo: Sequence[tuple[str, str]], workers: int, batch_size: int) -> Iterator[tuple]:
        """(hash, path, pixels or PosterError) for each (hash, path) of `todo`, in order, like the CPU
        path's iterator. Files are read `workers` at a time (inline with 0) about two batches ahead;
        one further thread decodes the next batch on the device while the caller encodes this one."""
        items = iter(todo)

        def next_chunk(pool) -> list:
            chunk = []
            for h, path in items:
                chunk.append((h, path, pool.submit(self._prepare, path) if pool else self._prepare(path)))
                if len(chunk) == batch_size:
                    break
            return chunk

        def resolve(chunk) -> list:
            return [(h, p, r.result() if hasattr(r, "result") else r) for h, p, r in chunk]

        pool = ThreadPoolExecutor(max_workers=workers) if workers > 0 else None
        device_stage = ThreadPoolExecutor(max_workers=1)
        try:
            reading = deque(c for c in (next_chunk(pool), next_chunk(pool)) if c)
            finishing: deque = deque()
            while reading or finishing:
                while reading and len(finishing) < 2:
                    finishing.append(device_stage.submit(self._finish, resolve(reading.popleft())))
                    chunk = next_chunk(pool)
                    if chunk:
                        reading.append(chunk)
                yield from finishing.popleft().result()
        finally:
            device_stage.shutdown(wait=True, cancel_futures=True)
            if pool is not None:
                pool.shutdown(wait=True, cancel_futures=True)
