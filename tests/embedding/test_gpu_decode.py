"""Decoding JPEGs in batches on the backbone's device (embedding/gpu_decode.py), tested on the CPU.

torchvision's `decode_jpeg(..., device="cpu")` and the same tensor preprocessing stand in for nvjpeg:
everything but the CUDA decoder itself runs here. `GPU_DEVICE_TYPES` gets "cpu" added for the tests
that drive `embed_records(decode="gpu")` on a machine without a GPU.
"""
from __future__ import annotations

import os
import shutil

import numpy as np
import pytest
import torch
from PIL import Image

from clipposter.embedding import gpu_decode
from clipposter.embedding.cache import EmbeddingCache
from clipposter.embedding.embed import embed_records, make_loader
from clipposter.embedding.gpu_decode import (TensorDecoder, TensorPreprocess, check_decode, tensor_decodable,
                                             use_tensor_decoder)
from clipposter.errors import ConfigError, PosterError
from clipposter.ingest.sources import from_folder
from clipposter.records import PosterRecord

from helpers import count_opens, run_cli, tiny_args

no_cuda = pytest.mark.skipif(torch.cuda.is_available(), reason="the refusal is for machines without CUDA")


@pytest.fixture
def cpu_as_gpu(monkeypatch):
    monkeypatch.setattr(gpu_decode, "GPU_DEVICE_TYPES", ("cuda", "cpu"))


def smooth_image(width: int, height: int, seed: int = 0) -> Image.Image:
    """Gradients plus a little noise: like a poster, unlike white noise, which no resize keeps."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width]
    base = np.stack([x * 255 / width, y * 255 / height, (x + y) * 127 / (width + height)], -1)
    return Image.fromarray(np.clip(base + rng.normal(0, 8, base.shape), 0, 255).astype(np.uint8))


def as_tensor(img: Image.Image) -> torch.Tensor:
    return torch.from_numpy(np.asarray(img.convert("RGB")).copy()).permute(2, 0, 1)


# ----- the tensor preprocessing against open_clip's transform on the same pixels ----------------
@pytest.mark.parametrize("size", [(64, 64), (64, 97), (101, 64)])
def test_without_resizing_the_tensor_transform_is_open_clips_exactly(tiny_backbone, size):
    # Shorter side already the model's 64 px: crop, scale and normalise only, which must agree exactly.
    img = smooth_image(*size)
    want = tiny_backbone.preprocess(img)
    got = TensorPreprocess(tiny_backbone.identity, "cpu")(as_tensor(img)[None])[0]
    assert got.shape == want.shape == (3, 64, 64)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=0)


def test_resizing_differs_from_pillow_only_by_the_resampling(tiny_backbone):
    # Same pixels in, a 200×300 image to 64 px: Pillow's bicubic and torch's antialiased bicubic
    # agree to one grey level (normalised units: 1 grey level ≈ 0.015), nearly all pixels exactly.
    img = smooth_image(200, 300, seed=1)
    want = tiny_backbone.preprocess(img)
    got = TensorPreprocess(tiny_backbone.identity, "cpu")(as_tensor(img)[None])[0]
    diff = (got - want).abs()
    assert float(diff.mean()) < 1e-3 and float(diff.max()) < 0.02


def test_images_of_several_sizes_come_back_in_order(tiny_backbone):
    pre = TensorPreprocess(tiny_backbone.identity, "cpu")
    images = [smooth_image(*s, seed=i) for i, s in enumerate([(64, 90), (80, 64), (64, 90), (64, 64)])]
    out = pre.batch([as_tensor(im) for im in images])
    for im, got in zip(images, out):
        torch.testing.assert_close(got, pre(as_tensor(im)[None])[0])


# ----- the embed path with decode="gpu" -------------------------------------------------------
def cosines(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    a, b = a.astype(np.float64), b.astype(np.float64)
    return (a * b).sum(1) / np.linalg.norm(a, axis=1) / np.linalg.norm(b, axis=1)


def test_decoding_on_the_device_gives_the_pil_paths_embeddings(tmp_path, tiny_backbone, synthetic_set, cpu_as_gpu):
    # The residual difference: another JPEG decoder (and a full-size decode where Pillow decodes at a
    # reduced DCT scale) and torch's resize antialiasing instead of Pillow's.
    records = [PosterRecord.from_dict(r.to_dict()) for r in synthetic_set[1][:40]]
    ids = [r.id for r in records]
    pil = EmbeddingCache.open(tmp_path / "pil", tiny_backbone.identity)
    s_pil = embed_records(records, pil, tiny_backbone, batch_size=16, progress=False)
    dev = EmbeddingCache.open(tmp_path / "dev", tiny_backbone.identity)
    s_dev = embed_records(records, dev, tiny_backbone, batch_size=16, workers=2, progress=False, decode="gpu")
    assert (s_pil.decode, s_dev.decode) == ("cpu", "gpu")
    assert s_dev.encoded == 40 and s_dev.decode_fallbacks == 0 and s_dev.to_dict()["decode_fallbacks"] == 0
    cos = cosines(pil.embeddings_for_ids(ids), dev.embeddings_for_ids(ids))
    assert cos.min() >= 0.99
    # …and each row is what torchvision's decoder and the tensor transform give for its file.
    from torchvision.io import ImageReadMode, decode_jpeg

    pre = TensorPreprocess(tiny_backbone.identity, "cpu")
    raw = torch.frombuffer(bytearray(open(records[7].image, "rb").read()), dtype=torch.uint8)
    direct = tiny_backbone.encode_image_tensors(pre(decode_jpeg(raw, mode=ImageReadMode.RGB)[None]))[0]
    np.testing.assert_allclose(dev.embeddings_for_ids([ids[7]])[0], direct, atol=2e-3)


def odd_posters(root, synthetic_set):
    """A folder of one plain JPEG each and the files the device path must hand to the CPU path."""
    root.mkdir()
    src = synthetic_set[1][0].image
    shutil.copy(src, root / "plain.jpg")
    img = Image.open(src).convert("RGB")
    img.convert("L").save(root / "grey.jpg", quality=90)  # greyscale: still the device's
    img.save(root / "poster.png")
    img.convert("CMYK").save(root / "cmyk.jpg", quality=90)
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90° on display
    smooth_image(200, 300, seed=4).save(root / "rotated.jpg", exif=exif, quality=90)
    exif[0x0112] = 1  # upright: nothing to turn
    smooth_image(200, 300, seed=5).save(root / "upright.jpg", exif=exif, quality=90, progressive=True)
    good = open(src, "rb").read()
    (root / "truncated.jpg").write_bytes(good[: len(good) // 2])
    return root


def test_files_the_device_decoder_cannot_take_go_through_the_cpu_path(tmp_path, tiny_backbone, synthetic_set,
                                                                     cpu_as_gpu):
    folder = odd_posters(tmp_path / "odd", synthetic_set)
    pil = EmbeddingCache.open(tmp_path / "pil", tiny_backbone.identity)
    s_pil = embed_records(from_folder(folder), pil, tiny_backbone, progress=False)
    dev = EmbeddingCache.open(tmp_path / "dev", tiny_backbone.identity)
    s_dev = embed_records(from_folder(folder), dev, tiny_backbone, workers=2, progress=False, decode="gpu")
    # png, cmyk, rotated and the truncated file (which the CPU path then refuses, as without --decode)
    assert s_dev.decode_fallbacks == 4
    assert s_dev.encoded == s_pil.encoded == 6
    assert s_dev.skipped_files == s_pil.skipped_files and len(s_dev.skipped_files) == 1
    assert "truncated" in s_dev.skipped_files[0][1]
    # Posters the CPU path decoded are its embeddings exactly; the rotated one is upright in both.
    for name in ("poster", "cmyk", "rotated"):
        np.testing.assert_array_equal(dev.embeddings_for_ids([name]), pil.embeddings_for_ids([name]))
    on_device = ["plain", "grey", "upright"]  # upright: a progressive JPEG with an EXIF block
    assert cosines(dev.embeddings_for_ids(on_device), pil.embeddings_for_ids(on_device)).min() > 0.99


@pytest.mark.parametrize("name,why", [("poster.png", "not a JPEG"), ("cmyk.jpg", "Adobe JPEG"),
                                      ("rotated.jpg", "EXIF orientation"), ("truncated.jpg", "no end-of-image marker"),
                                      ("plain.jpg", None), ("grey.jpg", None), ("upright.jpg", None)])
def test_which_files_the_device_decoder_takes(tmp_path, synthetic_set, name, why):
    folder = odd_posters(tmp_path / "odd", synthetic_set)
    assert tensor_decodable((folder / name).read_bytes(), 89_478_485) == why
    assert tensor_decodable((folder / "plain.jpg").read_bytes(), 200 * 300 - 1) == "over max_pixels"


def without_segment(data: bytes, marker: int) -> bytes:
    at = data.index(bytes([0xFF, marker]))
    return data[:at] + data[at + 2 + int.from_bytes(data[at + 2:at + 4], "big"):]


def test_frames_the_device_decoder_does_not_take(tmp_path, synthetic_set):
    folder = odd_posters(tmp_path / "odd", synthetic_set)
    cmyk = without_segment((folder / "cmyk.jpg").read_bytes(), 0xEE)  # no Adobe segment: four channels remain
    assert tensor_decodable(cmyk, 10**8) == "4-channel JPEG"
    plain = (folder / "plain.jpg").read_bytes()
    sof = plain.index(b"\xff\xc0")
    lossless = plain[:sof + 1] + b"\xc3" + plain[sof + 2:]
    assert tensor_decodable(lossless, 10**8) == "lossless, hierarchical or arithmetic-coded JPEG"
    assert tensor_decodable(without_segment(plain, 0xC0), 10**8) == "unreadable header"  # no frame at all


def test_a_batch_the_device_decoder_fails_is_retried_file_by_file(tmp_path, tiny_backbone, synthetic_set,
                                                                  monkeypatch):
    import torchvision.io

    records = synthetic_set[1][:6]
    bad = open(records[2].image, "rb").read()
    real = torchvision.io.decode_jpeg

    def failing(data, *args, **kwargs):  # the device decoder chokes on one file (and so on its batch)
        items = data if isinstance(data, list) else [data]
        if any(bytes(t.numpy()) == bad for t in items):
            raise RuntimeError("nvjpeg: bitstream error")
        return real(data, *args, **kwargs)

    monkeypatch.setattr(torchvision.io, "decode_jpeg", failing)
    load = make_loader(tiny_backbone)
    decoder = TensorDecoder(TensorPreprocess(tiny_backbone.identity, "cpu"), load, max_pixels=10**8,
                            max_bytes=10**7)
    out = list(decoder.decoded([(str(i), r.image) for i, r in enumerate(records)], workers=0, batch_size=4))
    assert [h for h, _, _ in out] == [str(i) for i in range(6)]
    assert decoder.stats.to_dict() == {"tensor": 5, "fallback": 1, "fallback_reasons": {"device decode failed": 1}}
    torch.testing.assert_close(out[2][2], load(records[2].image))  # the CPU path's pixels, exactly


def test_only_regular_files_within_max_bytes_are_read(tmp_path, tiny_backbone, synthetic_set):
    src = synthetic_set[1][0].image
    big = tmp_path / "big.jpg"
    shutil.copy(src, big)
    fifo = tmp_path / "pipe.jpg"
    os.mkfifo(fifo)
    decoder = TensorDecoder(TensorPreprocess(tiny_backbone.identity, "cpu"), make_loader(tiny_backbone),
                            max_pixels=10**8, max_bytes=os.path.getsize(src) - 1)
    out = list(decoder.decoded([("a", str(big)), ("b", str(fifo))], workers=2, batch_size=4))
    assert all(isinstance(r, PosterError) for _, _, r in out)
    assert "file too large" in str(out[0][2]) and "FIFO" in str(out[1][2])
    assert decoder.stats.tensor == 0


# ----- choosing the path, and refusing ---------------------------------------------------------
def test_choice_of_decoder(tiny_backbone, cpu_as_gpu):
    cpu = torch.device("cpu")
    assert use_tensor_decoder("cpu", tiny_backbone.identity, cpu) is False
    assert use_tensor_decoder("auto", tiny_backbone.identity, cpu) is False  # auto: CUDA only
    assert use_tensor_decoder("gpu", tiny_backbone.identity, cpu) is True
    assert use_tensor_decoder("auto", tiny_backbone.identity, torch.device("cuda")) is True
    from dataclasses import replace

    longest = replace(tiny_backbone.identity, resize_mode="longest")
    assert use_tensor_decoder("auto", longest, torch.device("cuda")) is False
    with pytest.raises(ConfigError, match="resize mode 'longest'") as err:
        use_tensor_decoder("gpu", longest, cpu)
    assert err.value.field == "decode"


def test_gpu_decoding_on_a_cpu_backbone_is_refused(tiny_backbone, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)  # a GPU machine, the backbone on its CPU
    with pytest.raises(ConfigError, match="runs on cpu") as err:
        use_tensor_decoder("gpu", tiny_backbone.identity, torch.device("cpu"))
    assert err.value.field == "decode"
    with pytest.raises(ConfigError, match="must be one of cpu, gpu, auto"):
        check_decode("nvjpeg")


@no_cuda
def test_gpu_decoding_without_cuda_is_refused_before_any_file_is_read(tmp_path, tiny_backbone, synthetic_set,
                                                                      monkeypatch):
    records = synthetic_set[1][:3]
    cache = EmbeddingCache.open(tmp_path / "c", tiny_backbone.identity)
    opens = count_opens(monkeypatch, [r.image for r in records])
    with pytest.raises(ConfigError, match="CUDA is not available") as err:
        embed_records(records, cache, tiny_backbone, progress=False, decode="gpu")
    assert err.value.field == "decode" and cache.num_posters == 0
    assert sum(opens.values()) == 0


@no_cuda
def test_cli_decode_gpu_without_cuda_is_one_line_naming_the_flag(tmp_path, capsys, tiny_checkpoint, synthetic_set):
    src, _ = synthetic_set
    code, out, err = run_cli(capsys, "embed", src / "manifest.csv", "--cache", tmp_path / "c",
                             *tiny_args(tiny_checkpoint), "--decode", "gpu", "--no-texts")
    assert code == 2 and out == ""
    assert err.startswith("error: --decode is 'gpu', but CUDA is not available") and err.count("\n") == 1
    assert not (tmp_path / "c").exists()
