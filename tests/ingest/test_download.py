"""Downloader against a local ThreadingHTTPServer on 127.0.0.1; no outside network is used."""
from __future__ import annotations

import csv
import time
from pathlib import Path

import pytest
from PIL import Image

from clipposter.ingest.download import DownloadReport, download_posters, safe_filename
from clipposter.records import PosterRecord
from http_stub import FAST, PNG, SLOW_SECONDS, serving


@pytest.fixture
def server():
    with serving() as srv:
        yield srv


def _leftovers(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.name.startswith(".") or p.suffix == ".part")


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
    assert sorted(p.name for p in tmp_path.iterdir()) == ["small.png"]


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
    assert sorted(p.name for p in tmp_path.iterdir()) == ["p.png"]


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
