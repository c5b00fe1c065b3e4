"""What `read_bytes` and `load_poster` agree to read: regular files only, never more than `max_bytes`.

A FIFO or a device named like a poster must fail at once (never block, never stream without end),
and a file larger than the byte cap is refused as a bad poster, like any other bad file.
"""
from __future__ import annotations

import io
import os
import stat
import tracemalloc
from pathlib import Path

import pytest
from PIL import Image

import clipposter.ingest.images as images
from clipposter.errors import ConfigError, PosterError
from clipposter.ingest.images import DEFAULT_MAX_BYTES, load_poster, read_bytes

# The endless device, spelled from the platform's own null device rather than written out.
ZERO_DEVICE = os.path.join(os.path.dirname(os.devnull), "zero")


def png_bytes(size=(8, 8), colour=(200, 40, 60)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", size, colour).save(buf, "PNG")
    return buf.getvalue()


@pytest.fixture
def fifo(tmp_path) -> Path:
    if not hasattr(os, "mkfifo"):
        pytest.skip("no FIFOs on this platform")
    path = tmp_path / "a.jpg"
    os.mkfifo(path)
    return path


@pytest.mark.timeout(20)
@pytest.mark.parametrize("reader", [read_bytes, load_poster], ids=["read_bytes", "load_poster"])
def test_a_fifo_named_like_a_poster_fails_at_once_instead_of_blocking(fifo, reader):
    with pytest.raises(PosterError) as info:
        reader(fifo)
    assert info.value.path == str(fifo)
    assert info.value.reason == "cannot read file: not a regular file (a FIFO)"


@pytest.mark.timeout(20)
@pytest.mark.skipif(not os.path.exists(ZERO_DEVICE), reason="no zero device on this platform")
@pytest.mark.parametrize("reader", [read_bytes, load_poster], ids=["read_bytes", "load_poster"])
def test_an_endless_device_is_refused_before_any_byte_is_read(reader):
    with pytest.raises(PosterError) as info:
        reader(ZERO_DEVICE)
    assert info.value.reason == "cannot read file: not a regular file (a character device)"


@pytest.mark.timeout(20)
def test_a_symlink_to_a_device_is_judged_by_what_it_points_to(tmp_path):
    if not os.path.exists(ZERO_DEVICE):
        pytest.skip("no zero device on this platform")
    link = tmp_path / "poster.jpg"
    link.symlink_to(ZERO_DEVICE)
    with pytest.raises(PosterError, match="not a regular file"):
        read_bytes(link)


def test_the_default_cap_is_fifty_megabytes():
    assert DEFAULT_MAX_BYTES == 50 * 1024 * 1024


def test_a_file_over_the_byte_cap_is_a_bad_poster_and_the_cap_is_inclusive(tmp_path):
    data = png_bytes()
    path = tmp_path / "p.png"
    path.write_bytes(data)
    assert read_bytes(path, max_bytes=len(data)) == data
    assert load_poster(path, max_bytes=len(data)).size == (8, 8)
    for reader in (read_bytes, load_poster):
        with pytest.raises(PosterError) as info:
            reader(path, max_bytes=len(data) - 1)
        assert info.value.reason == (f"file too large: more than {len(data) - 1} bytes; "
                                     "raise `max_bytes` if you trust it")


def test_bytes_over_the_cap_are_refused_too():
    data = png_bytes()
    assert load_poster(data, max_bytes=len(data)).size == (8, 8)
    with pytest.raises(PosterError, match="file too large"):
        load_poster(data, max_bytes=len(data) - 1)


def test_the_cap_holds_while_reading_even_when_the_file_grows(tmp_path, monkeypatch):
    """The size seen by stat can be stale (a file still being written): the read itself stops at the
    cap instead of trusting it."""
    path = tmp_path / "growing.jpg"
    with open(path, "wb") as fh:  # sparse: 64 MB on paper, nothing on disk
        fh.truncate(64 * 1024 * 1024)
    real_fstat = os.fstat

    def stale_fstat(fd):
        st = real_fstat(fd)
        return os.stat_result((st.st_mode, st.st_ino, st.st_dev, st.st_nlink, st.st_uid, st.st_gid, 10,
                               st.st_atime, st.st_mtime, st.st_ctime))

    monkeypatch.setattr(images.os, "fstat", stale_fstat)
    assert stat.S_ISREG(os.stat(path).st_mode)
    tracemalloc.start()
    try:
        with pytest.raises(PosterError, match="file too large: more than 100 bytes"):
            read_bytes(path, max_bytes=100)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 1024 * 1024, f"read {peak} bytes of a file capped at 100"


@pytest.mark.parametrize("field, kwargs", [
    ("max_bytes", {"max_bytes": 0}), ("max_bytes", {"max_bytes": -5}),
    ("max_pixels", {"max_pixels": 0}), ("max_pixels", {"max_pixels": -1}),
])
def test_limits_below_one_are_config_errors_naming_the_parameter(tmp_path, field, kwargs):
    path = tmp_path / "p.png"
    path.write_bytes(png_bytes())
    readers = [load_poster] + ([read_bytes] if field == "max_bytes" else [])
    for reader in readers:
        with pytest.raises(ConfigError) as info:
            reader(path, **kwargs)
        assert info.value.field == field
    with pytest.raises(ConfigError):
        images.check_limits(**kwargs)


def test_a_regular_file_is_still_read_whole(tmp_path):
    data = png_bytes((40, 30))
    path = tmp_path / "p.png"
    path.write_bytes(data)
    assert read_bytes(path) == data
    assert load_poster(path).size == (40, 30)
