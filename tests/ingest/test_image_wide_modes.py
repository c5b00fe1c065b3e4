"""16-bit and 32-bit (integer and float) posters convert to 8 bits at a bounded memory cost, and right.

The cost is measured as the rise of the peak resident memory (Linux's VmHWM) of a fresh interpreter
across one `load_poster` call. Converting the whole image in float64, as an earlier version did, cost
32 to 37 bytes per pixel: 1168 MB for the 6000×6000 16-bit PNG below, 320 MB for each 3000×3000
32-bit TIFF. Converting in strips costs the decoded image, the 8-bit result and the RGB copy: 245 MB
(7 bytes per pixel) and 90 MB (10.5). The bound, 16 bytes per pixel, sits between the two.
"""
from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from clipposter.ingest.images import load_poster

BYTES_PER_PIXEL_BOUND = 16

MEASURE = textwrap.dedent("""
    import json, sys
    import numpy as np
    from clipposter.ingest.images import load_poster

    def status(key):  # kB, from the kernel's view of this process
        with open("/proc/self/status") as fh:
            return next(int(line.split()[1]) for line in fh if line.startswith(key + ":"))

    load_poster(sys.argv[2])  # a small image first: imports and first-call setup are not the cost
    with open("/proc/self/clear_refs", "w") as fh:
        fh.write("5")  # the peak (VmHWM) starts again from the present size
    before = status("VmRSS")
    img = load_poster(sys.argv[1])
    extra = (status("VmHWM") - before) * 1024
    row = np.asarray(img)[img.height // 2]
    print(json.dumps({"extra": extra, "size": img.size, "mode": img.mode,
                      "grey": bool((row == row[:, :1]).all()), "row": row[:, 0].tolist()}))
""")


def measure(path: Path, tmp_path: Path) -> dict:
    """The peak memory a fresh interpreter adds while loading `path` (not `ru_maxrss`, which a child
    inherits from the test process across fork and exec)."""
    small = tmp_path / "small.png"
    Image.new("RGB", (8, 8)).save(small)
    proc = subprocess.run([sys.executable, "-c", MEASURE, str(path), str(small)], capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout)


def gradient(width: int, height: int, values: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(np.broadcast_to(values, (height, width)))


CASES = {
    # name: (width, height, one row of values, suffix, the 8-bit row expected)
    "16-bit PNG": (6000, 6000, lambda w: (np.arange(w, dtype=np.uint32) * 65535 // (w - 1)).astype(np.uint16),
                   ".png", lambda v: np.rint(v / 257.0)),
    "float TIFF in 0..1": (3000, 3000, lambda w: np.linspace(0, 1, w, dtype=np.float32),
                           ".tif", lambda v: np.rint(v.astype(np.float64) * 255.0)),
    "32-bit TIFF, wide range": (3000, 3000, lambda w: np.linspace(-1_000_000, 5_000_000, w).astype(np.int32),
                                ".tif", lambda v: np.rint((v - v.min()) * (255.0 / (v.max() - v.min())))),
}


@pytest.mark.skipif(not Path("/proc/self/clear_refs").exists(), reason="needs Linux's per-process peak memory")
@pytest.mark.parametrize("case", list(CASES))
def test_wide_images_convert_in_bounded_memory_and_keep_their_gradient(tmp_path, case):
    width, height, make_row, suffix, expected = CASES[case]
    row = make_row(width)
    path = tmp_path / f"wide{suffix}"
    Image.fromarray(gradient(width, height, row)).save(path, **({"compress_level": 1} if suffix == ".png" else {}))
    with Image.open(path) as check:
        assert check.mode in ("I;16", "I", "F")

    got = measure(path, tmp_path)

    assert got["size"] == [width, height] and got["mode"] == "RGB" and got["grey"]
    assert got["row"] == expected(row.astype(np.float64)).astype(int).tolist()
    bound = BYTES_PER_PIXEL_BOUND * width * height
    assert got["extra"] < bound, f"{case}: {got['extra'] / 2**20:.0f} MB extra, bound {bound / 2**20:.0f} MB"


def test_strips_join_without_seams(tmp_path):
    """A 16-bit image whose every pixel differs converts exactly, whichever strip a row falls in."""
    rng = np.random.default_rng(0)
    values = rng.integers(0, 65536, (1100, 1000), dtype=np.uint16)  # more rows than one strip holds
    path = tmp_path / "noise.png"
    Image.fromarray(values).save(path)
    got = np.asarray(load_poster(path))
    assert np.array_equal(got[..., 0], np.rint(values / 257.0).astype(np.uint8))


def test_float_image_with_non_finite_pixels_keeps_the_range_of_the_finite_ones():
    values = np.tile(np.linspace(-5.0, 5.0, 256, dtype=np.float32), (3, 1))
    values[1, 7], values[1, 8], values[2, 9] = np.nan, np.inf, -np.inf
    got = np.asarray(load_poster(_tiff_bytes(values)))[..., 0]
    expected = np.rint((values.astype(np.float64) + 5.0) * 25.5)
    assert np.array_equal(got[0], expected[0])
    # a non-finite pixel counts as 0.0, the middle of this range
    assert got[1, 7] == got[1, 8] == got[2, 9] == np.rint(5.0 * 25.5)


def _tiff_bytes(values: np.ndarray) -> bytes:
    import io

    buf = io.BytesIO()
    Image.fromarray(values).save(buf, "TIFF")
    return buf.getvalue()
