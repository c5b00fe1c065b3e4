"""Downloader against a local ThreadingHTTPServer on 127.0.0.1; no outside network is used."""
from __future__ import annotations

import csv
import inspect
import json
import time
from pathlib import Path

import pytest
from PIL import Image

from clipposter.errors import ConfigError
from clipposter.ingest.download import (DEADLINE_TIMEOUTS, STAMP_NAME, DownloadReport, download_posters,
                                        safe_filename)
from clipposter.ingest.images import DEFAULT_MAX_BYTES, DEFAULT_MAX_PIXELS
from clipposter.records import PosterRecord
from helpers import count_opens
from http_stub import CUT_JPEG, FAST, NOISE_JPEG, PNG, SLOW_SECONDS, bomb_png, serving


@pytest.fixture
def server():
    with serving() as srv:
        yield srv


def _leftovers(folder: Path) -> list[str]:
    """Temporary files left behind (the stamp file is not one)."""
    return sorted(p.name for p in folder.iterdir()
                  if p.name != STAMP_NAME and (p.name.startswith(".") or p.suffix == ".part"))


def _posters(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.name != STAMP_NAME)


def test_downloads_png_and_jpeg_with_suffix_from_format(server, tmp_path):
    records = [PosterRecord(id="tt0000001", url=server.url("/png/1")),
               PosterRecord(id="tt0000002", url=server.url("/jpeg/2"))]
    out = tmp_path / "posters"
    report = download_posters(records, out, **FAST)
    assert (report.downloaded, report.skipped_existing, report.failed) == (2, 0, [])
    assert records[0].image == str(out / "tt0000001.png")
    assert records[1].image == str(out / "tt0000002.jpg")
    assert Image.open(records[1].image).format == "JPEG"
    assert _leftovers(out) == []


def test_404_fails_without_retry(server, tmp_path):
    records = [PosterRecord(id="gone", url=server.url("/missing"))]
    report = download_posters(records, tmp_path, timeout=1.0, retries=3, backoff=0.01, progress=False)
    assert report.failed == [("gone", server.url("/missing"), "HTTP 404 Not Found")]
    assert server.hits["/missing"] == 1
    assert records[0].image is None


def test_slow_response_times_out_quickly(server, tmp_path):
    records = [PosterRecord(id="slow", url=server.url("/slow"))]
    start = time.monotonic()
    report = download_posters(records, tmp_path, **FAST)
    elapsed = time.monotonic() - start
    assert len(report.failed) == 1 and "timeout" in report.failed[0][2]
    assert "2 attempts" in report.failed[0][2]
    assert server.hits["/slow"] == 2
    assert elapsed < 2 * SLOW_SECONDS
    assert records[0].image is None and _leftovers(tmp_path) == []


def test_flaky_503_then_success_thanks_to_retry(server, tmp_path):
    records = [PosterRecord(id="flaky", url=server.url("/flaky"))]
    report = download_posters(records, tmp_path, **FAST)
    assert report.downloaded == 1 and report.failed == []
    assert server.hits["/flaky"] == 2
    assert records[0].image == str(tmp_path / "flaky.jpg")


def test_persistent_5xx_gives_up_after_retries(server, tmp_path):
    records = [PosterRecord(id="err", url=server.url("/error"))]
    report = download_posters(records, tmp_path, timeout=1.0, retries=2, backoff=0.01, progress=False)
    assert report.failed[0][2] == "HTTP 500 Internal Server Error (3 attempts)"
    assert server.hits["/error"] == 3


def test_html_page_is_not_an_image(server, tmp_path):
    records = [PosterRecord(id="html", url=server.url("/html"))]
    report = download_posters(records, tmp_path, **FAST)
    assert report.failed == [("html", server.url("/html"), "not an image: content-type text/html")]
    assert list(tmp_path.iterdir()) == []


def test_image_content_type_with_non_image_body_fails(server, tmp_path):
    records = [PosterRecord(id="fake", url=server.url("/fake.jpg"))]
    report = download_posters(records, tmp_path, **FAST)
    assert report.downloaded == 0
    assert report.failed[0][2].startswith("not an image: body does not decode")
    assert list(tmp_path.iterdir()) == []  # the temp file is gone and no final file was written


def test_image_format_without_a_poster_suffix_fails(server, tmp_path):
    records = [PosterRecord(id="ppm", url=server.url("/ppm"))]
    report = download_posters(records, tmp_path, **FAST)
    assert report.failed[0][2].startswith("unsupported image format PPM")
    assert list(tmp_path.iterdir()) == []


def test_oversized_bodies_are_rejected(server, tmp_path):
    records = [PosterRecord(id="big", url=server.url("/big")),
               PosterRecord(id="stream", url=server.url("/big-stream")),
               PosterRecord(id="small", url=server.url("/png/small"))]
    report = download_posters(records, tmp_path, max_bytes=len(PNG) + 100, **FAST)
    reasons = {i: r for i, _, r in report.failed}
    assert reasons["big"].startswith("too large: Content-Length")
    assert reasons["stream"].startswith("too large: body exceeds max_bytes")
    assert report.downloaded == 1 and records[2].image == str(tmp_path / "small.png")
    assert _posters(tmp_path) == ["small.png"]


def test_resume_makes_no_requests(server, tmp_path):
    def fresh() -> list[PosterRecord]:
        return [PosterRecord(id=f"tt{i:07d}", url=server.url(f"/png/{i}")) for i in range(5)]

    first = download_posters(fresh(), tmp_path, workers=4, **FAST)
    assert first.downloaded == 5
    before = sum(server.hits.values())

    again = fresh()
    second = download_posters(again, tmp_path, workers=4, **FAST)
    assert sum(server.hits.values()) == before
    assert (second.downloaded, second.skipped_existing, second.failed) == (0, 5, [])
    assert all(r.image == str(tmp_path / f"{r.id}.png") for r in again)


def test_broken_existing_file_is_downloaded_again(server, tmp_path):
    (tmp_path / "p.jpg").write_bytes(b"truncated")
    records = [PosterRecord(id="p", url=server.url("/png/p"))]
    report = download_posters(records, tmp_path, **FAST)
    assert report.downloaded == 1 and server.hits["/png/p"] == 1
    assert _posters(tmp_path) == ["p.png"]


def test_records_with_images_or_without_urls_are_left_alone(server, tmp_path):
    local = tmp_path / "local.png"
    local.write_bytes(PNG)
    records = [PosterRecord(id="local", image=str(local), url=server.url("/png/local")),
               PosterRecord(id="nourl"),
               PosterRecord(id="stale", image=str(tmp_path / "moved.png"), url=server.url("/png/stale"))]
    report = download_posters(records, tmp_path / "out", **FAST)
    assert server.hits["/png/local"] == 0
    assert records[0].image == str(local) and records[1].image is None
    assert records[2].image == str(tmp_path / "out" / "stale.png") and report.downloaded == 1


def test_unsafe_ids_and_schemes(server, tmp_path):
    assert safe_filename("tt0114709") == "tt0114709"
    assert safe_filename("drama/a b") != safe_filename("drama_a_b")
    assert "/" not in safe_filename("../../etc/passwd")
    secret = tmp_path / "secret.png"
    secret.write_bytes(PNG)
    records = [PosterRecord(id="../evil", url=server.url("/png/evil")),
               PosterRecord(id="local", url=secret.as_uri())]
    out = tmp_path / "out"
    report = download_posters(records, out, **FAST)
    assert Path(records[0].image).parent == out
    assert report.failed == [("local", secret.as_uri(), "unsupported URL scheme 'file'; only http and https")]


def test_failure_report_csv_and_dict(server, tmp_path):
    records = [PosterRecord(id="ok", url=server.url("/png/ok")),
               PosterRecord(id="gone", url=server.url("/missing")),
               PosterRecord(id="html", url=server.url("/html"))]
    report = download_posters(records, tmp_path / "out", progress=True, timeout=1.0, retries=0)
    path = report.write_failures(tmp_path / "reports" / "failures.csv")
    with path.open(newline="", encoding="utf-8") as fh:
        rows = list(csv.DictReader(fh))
    assert rows == [
        {"id": "gone", "url": server.url("/missing"), "reason": "HTTP 404 Not Found"},
        {"id": "html", "url": server.url("/html"), "reason": "not an image: content-type text/html"},
    ]
    data = report.to_dict()
    assert data["downloaded"] == 1 and data["skipped_existing"] == 0 and len(data["failed"]) == 2
    assert report.summary() == "downloaded 1, already present 0, failed 2"

    empty = DownloadReport().write_failures(tmp_path / "none.csv")
    assert empty.read_text().splitlines() == ["id,url,reason"]


# ------------------------------------------------------------------------------------------------
# bodies cut short: never saved, never counted, never trusted on resume
# ------------------------------------------------------------------------------------------------
def _decodes(path: Path) -> bool:
    with Image.open(path) as img:
        img.load()
    return True


def test_body_shorter_than_content_length_is_not_saved(server, tmp_path):
    records = [PosterRecord(id="short", url=server.url("/short"))]
    report = download_posters(records, tmp_path, **FAST)
    assert report.downloaded == 0 and records[0].image is None
    assert len(report.failed) == 1
    assert report.failed[0][2].startswith(f"connection closed after {len(CUT_JPEG)} of {len(NOISE_JPEG)} bytes")
    assert server.hits["/short"] == 2  # a cut transfer is worth another try
    assert list(tmp_path.iterdir()) == []


def test_body_cut_without_content_length_is_caught_by_a_full_decode(server, tmp_path):
    records = [PosterRecord(id="cut", url=server.url("/cut"))]
    report = download_posters(records, tmp_path, **FAST)
    assert report.downloaded == 0 and records[0].image is None
    assert "truncated" in report.failed[0][2] and server.hits["/cut"] == 2
    assert list(tmp_path.iterdir()) == []


def test_body_cut_once_is_fetched_again(server, tmp_path):
    records = [PosterRecord(id="cut", url=server.url("/cut-once"))]
    report = download_posters(records, tmp_path, **FAST)
    assert (report.downloaded, report.failed) == (1, [])
    assert (tmp_path / "cut.jpg").read_bytes() == NOISE_JPEG


def test_truncated_file_from_an_older_run_is_downloaded_again(server, tmp_path):
    # Headers whole, scan data cut: Pillow's verify() accepts it, only decoding the pixels refuses it.
    (tmp_path / "p.jpg").write_bytes(CUT_JPEG)
    records = [PosterRecord(id="p", url=server.url("/noise/p"))]
    report = download_posters(records, tmp_path, **FAST)
    assert (report.downloaded, report.skipped_existing, report.failed) == (1, 0, [])
    assert server.hits["/noise/p"] == 1
    assert (tmp_path / "p.jpg").read_bytes() == NOISE_JPEG and _decodes(tmp_path / "p.jpg")


def test_resume_decodes_each_file_once_then_trusts_its_stamp(server, tmp_path, monkeypatch):
    def fresh() -> list[PosterRecord]:
        return [PosterRecord(id=f"tt{i:07d}", url=server.url(f"/png/{i}")) for i in range(3)]

    assert download_posters(fresh(), tmp_path, **FAST).downloaded == 3
    files = [tmp_path / f"tt{i:07d}.png" for i in range(3)]
    stamp = tmp_path / STAMP_NAME
    assert stamp.is_file()

    # Downloaded and fully decoded in this folder already: a rerun opens no poster.
    opens = count_opens(monkeypatch, files)
    second = download_posters(fresh(), tmp_path, **FAST)
    assert (second.downloaded, second.skipped_existing) == (0, 3)
    assert list(opens.values()) == [0, 0, 0]

    # Without the stamp (files from an older version): each file is decoded once, then trusted.
    stamp.unlink()
    third = download_posters(fresh(), tmp_path, **FAST)
    assert third.skipped_existing == 3 and list(opens.values()) == [1, 1, 1]
    fourth = download_posters(fresh(), tmp_path, **FAST)
    assert fourth.skipped_existing == 3 and list(opens.values()) == [1, 1, 1]
    assert sum(server.hits.values()) == 3


def test_a_file_changed_since_its_stamp_is_checked_again(server, tmp_path):
    records = [PosterRecord(id="p", url=server.url("/jpeg/p"))]
    assert download_posters(records, tmp_path, **FAST).downloaded == 1
    (tmp_path / "p.jpg").write_bytes(CUT_JPEG)  # another size: the stamp no longer vouches for it
    again = [PosterRecord(id="p", url=server.url("/jpeg/p"))]
    report = download_posters(again, tmp_path, **FAST)
    assert (report.downloaded, report.skipped_existing) == (1, 0)
    assert _decodes(tmp_path / "p.jpg") and server.hits["/jpeg/p"] == 2


def test_a_damaged_stamp_file_only_costs_a_decode(server, tmp_path):
    records = [PosterRecord(id="p", url=server.url("/png/p"))]
    download_posters(records, tmp_path, **FAST)
    (tmp_path / STAMP_NAME).write_text("{not json")
    report = download_posters([PosterRecord(id="p", url=server.url("/png/p"))], tmp_path, **FAST)
    assert (report.downloaded, report.skipped_existing, report.failed) == (0, 1, [])
    assert json.loads((tmp_path / STAMP_NAME).read_text())["files"]["p.png"][0] == len(PNG)


# ------------------------------------------------------------------------------------------------
# posters already present are counted, wherever the records found them
# ------------------------------------------------------------------------------------------------
def test_posters_the_records_already_point_to_are_counted_present(server, tmp_path):
    out = tmp_path / "posters"
    out.mkdir()
    elsewhere = tmp_path / "elsewhere.png"
    elsewhere.write_bytes(PNG)
    (out / "inside.png").write_bytes(PNG)
    records = [PosterRecord(id="inside", image=str(out / "inside.png"), url=server.url("/png/inside")),
               PosterRecord(id="elsewhere", image=str(elsewhere), url=server.url("/png/elsewhere")),
               PosterRecord(id="new", url=server.url("/png/new"))]
    report = download_posters(records, out, **FAST)
    assert (report.downloaded, report.skipped_existing, report.failed) == (1, 2, [])
    assert report.summary() == "downloaded 1, already present 2, failed 0"
    assert server.hits["/png/inside"] == server.hits["/png/elsewhere"] == 0
    assert records[0].image == str(out / "inside.png") and records[1].image == str(elsewhere)


def test_a_truncated_poster_the_record_points_to_in_the_folder_is_replaced(server, tmp_path):
    (tmp_path / "p.jpg").write_bytes(CUT_JPEG)
    records = [PosterRecord(id="p", image=str(tmp_path / "p.jpg"), url=server.url("/png/p"))]
    report = download_posters(records, tmp_path, **FAST)
    assert (report.downloaded, report.skipped_existing) == (1, 0)
    assert records[0].image == str(tmp_path / "p.png")
    assert _posters(tmp_path) == ["p.png"]


# ------------------------------------------------------------------------------------------------
# redirects, deadlines, bombs, byte caps, settings
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("target, scheme", [("ftp://127.0.0.1:9/poster.jpg", "ftp"),
                                            ("file:///etc/hostname", "file")])
def test_a_redirect_may_only_lead_to_http(server, tmp_path, target, scheme):
    url = server.url(f"/redirect-to?{target}")
    records = [PosterRecord(id="away", url=url)]
    report = download_posters(records, tmp_path, **FAST)
    assert report.failed == [("away", url, f"redirect to unsupported URL scheme {scheme!r}; only http and https")]
    assert server.hits["/redirect-to"] == 1  # refused at once, not retried
    assert list(tmp_path.iterdir()) == []


def test_a_redirect_to_http_is_followed(server, tmp_path):
    records = [PosterRecord(id="moved", url=server.url("/redirect/png/moved"))]
    report = download_posters(records, tmp_path, **FAST)
    assert (report.downloaded, report.failed) == (1, [])
    assert server.hits["/png/moved"] == 1 and records[0].image == str(tmp_path / "moved.png")


def test_a_trickling_server_is_cut_off_at_the_deadline(server, tmp_path):
    records = [PosterRecord(id="drip", url=server.url("/trickle"))]
    start = time.monotonic()
    report = download_posters(records, tmp_path, timeout=0.3, retries=2, backoff=0.01, deadline=0.6,
                              progress=False)
    elapsed = time.monotonic() - start
    assert report.failed[0][2].startswith("deadline of 0.6s passed")
    assert elapsed < 0.6 + 0.3 + 1.0  # the deadline, one read timeout past it, and slack
    assert server.hits["/trickle"] == 1  # the deadline is for the URL: no retry after it
    assert list(tmp_path.iterdir()) == []


def test_the_default_deadline_is_a_multiple_of_the_timeout(server, tmp_path):
    records = [PosterRecord(id="drip", url=server.url("/trickle"))]
    start = time.monotonic()
    report = download_posters(records, tmp_path, timeout=0.2, retries=0, progress=False)
    elapsed = time.monotonic() - start
    assert report.failed[0][2].startswith(f"deadline of {DEADLINE_TIMEOUTS * 0.2:g}s passed")
    assert elapsed < DEADLINE_TIMEOUTS * 0.2 + 1.5


def test_a_decompression_bomb_is_named(server, tmp_path):
    bomb_png()  # built (about a second) before the server must answer within the timeout
    records = [PosterRecord(id="bomb", url=server.url("/bomb"))]
    report = download_posters(records, tmp_path, **FAST)
    reason = report.failed[0][2]
    assert reason.startswith(f"image larger than the pixel limit ({DEFAULT_MAX_PIXELS} pixels)")
    assert reason.endswith("a decompression bomb?") and "900000000 pixels" in reason
    assert list(tmp_path.iterdir()) == []


def test_the_pixel_limit_is_a_setting(server, tmp_path):
    records = [PosterRecord(id="p", url=server.url("/png/p"))]
    report = download_posters(records, tmp_path, max_pixels=16 * 24 - 1, **FAST)
    assert report.failed[0][2] == "image larger than the pixel limit (383 pixels): 16×24, a decompression bomb?"
    assert download_posters(records, tmp_path, max_pixels=16 * 24, **FAST).downloaded == 1


def test_an_endless_body_is_refused_while_reading(server, tmp_path):
    records = [PosterRecord(id="endless", url=server.url("/endless"))]
    start = time.monotonic()
    report = download_posters(records, tmp_path, max_bytes=1_000_000, timeout=2.0, retries=0, progress=False)
    assert report.failed[0][2] == "too large: body exceeds max_bytes 1000000"
    assert time.monotonic() - start < 5.0
    assert list(tmp_path.iterdir()) == []


def test_the_default_byte_cap_is_the_shared_one():
    assert inspect.signature(download_posters).parameters["max_bytes"].default == DEFAULT_MAX_BYTES == 50 * 1024 ** 2


@pytest.mark.parametrize("setting, value", [("workers", 0), ("timeout", 0), ("timeout", -1.0),
                                            ("timeout", float("nan")), ("retries", -1), ("deadline", 0),
                                            ("deadline", float("inf")), ("max_bytes", 0), ("max_pixels", 0),
                                            ("backoff", -0.5)])
def test_settings_that_cannot_work_are_refused_by_name(tmp_path, setting, value):
    with pytest.raises(ConfigError) as caught:
        download_posters([PosterRecord(id="p", url="http://127.0.0.1:9/p.png")], tmp_path, progress=False,
                         **{setting: value})
    assert caught.value.field == setting
    assert not (tmp_path / STAMP_NAME).exists()
