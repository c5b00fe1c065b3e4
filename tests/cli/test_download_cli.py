"""`clipposter download` against a local HTTP server on 127.0.0.1: what it prints, what it exits with,
and how it refuses flags that cannot work. No outside network is used."""
from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest

from clipposter.ingest.download import DEADLINE_TIMEOUTS, STAMP_NAME
from clipposter.ingest.images import DEFAULT_MAX_BYTES, DEFAULT_MAX_PIXELS
from helpers import run_cli
from http_stub import CUT_JPEG, NOISE_JPEG, serving


@pytest.fixture
def server():
    with serving() as srv:
        yield srv


def url_manifest(path: Path, urls: dict[str, str]) -> Path:
    with path.open("w", newline="", encoding="utf-8") as fh:
        writer = csv.writer(fh)
        writer.writerow(["id", "url", "genres"])
        writer.writerows([poster_id, url, "Drama"] for poster_id, url in urls.items())
    return path


def kaggle_folder(folder: Path, server, n: int) -> Path:
    """MovieGenre.csv of `n` movies whose poster URLs the server answers with a PNG."""
    folder.mkdir()
    with (folder / "MovieGenre.csv").open("w", newline="", encoding="latin-1") as fh:
        writer = csv.writer(fh)
        writer.writerow(["imdbId", "Imdb Link", "Title", "IMDB Score", "Genre", "Poster"])
        for i in range(1, n + 1):
            writer.writerow([i, f"http://www.imdb.com/title/tt{i:07d}", f"Movie {i}", 7.0, "Drama|Comedy",
                             server.url(f"/png/{i}")])
    return folder


def test_rerun_counts_the_posters_already_present(tmp_path, capsys, server):
    # kaggle:DIR finds DIR/posters on the rerun and hands download records that point into --out.
    folder = kaggle_folder(tmp_path / "kaggle", server, 4)
    out = folder / "posters"
    code, stdout, _ = run_cli(capsys, "download", f"kaggle:{folder}", "--out", out, "--retries", 0)
    assert (code, stdout.strip()) == (0, "4 downloaded, 0 already present, 0 failed")

    code, stdout, _ = run_cli(capsys, "download", f"kaggle:{folder}", "--out", out, "--retries", 0)
    assert (code, stdout.strip()) == (0, "0 downloaded, 4 already present, 0 failed")
    code, stdout, _ = run_cli(capsys, "download", f"kaggle:{folder}", "--out", out, "--json")
    payload = json.loads(stdout)
    assert code == 0 and (payload["downloaded"], payload["skipped_existing"], payload["failed"]) == (0, 4, [])
    assert sum(server.hits.values()) == 4


def test_a_truncated_body_is_an_error_not_a_poster(tmp_path, capsys, server):
    out = tmp_path / "out"
    manifest = url_manifest(tmp_path / "urls.csv", {"cut": server.url("/short")})
    code, stdout, err = run_cli(capsys, "download", manifest, "--out", out, "--retries", 0, "--timeout", 2)
    assert code == 2
    assert stdout.strip() == f"0 downloaded, 0 already present, 1 failed (see {out / 'failures.csv'})"
    assert err.splitlines()[-1] == f"error: none of the 1 posters could be downloaded; see {out / 'failures.csv'}"
    assert "Traceback" not in err
    reason = f"connection closed after {len(CUT_JPEG)} of {len(NOISE_JPEG)} bytes (1 attempt)"
    with (out / "failures.csv").open(newline="", encoding="utf-8") as fh:
        assert list(csv.DictReader(fh)) == [{"id": "cut", "url": server.url("/short"), "reason": reason}]
    assert sorted(p.name for p in out.iterdir()) == ["failures.csv"]


def test_some_failures_warn_and_exit_zero(tmp_path, capsys, server):
    out = tmp_path / "out"
    manifest = url_manifest(tmp_path / "urls.csv", {"a": server.url("/png/a"), "b": server.url("/jpeg/b"),
                                                    "gone": server.url("/missing")})
    code, stdout, err = run_cli(capsys, "download", manifest, "--out", out, "--retries", 0, "--json")
    assert code == 0
    assert json.loads(stdout)["downloaded"] == 2
    assert err.strip() == f"warning: 1 of 3 posters could not be downloaded; see {out / 'failures.csv'}"
    assert (out / "failures.csv").is_file()

    # Once the missing poster is dropped, the old report no longer describes the folder: it goes.
    url_manifest(manifest, {"a": server.url("/png/a"), "b": server.url("/jpeg/b")})
    code, stdout, err = run_cli(capsys, "download", manifest, "--out", out)
    assert (code, stdout.strip()) == (0, "0 downloaded, 2 already present, 0 failed")
    assert "warning" not in err
    assert sorted(p.name for p in out.iterdir()) == [STAMP_NAME, "a.png", "b.jpg"]


def test_a_manifest_without_urls_is_an_error(tmp_path, capsys):
    (tmp_path / "p.png").write_bytes(b"x")
    manifest = tmp_path / "local.csv"
    manifest.write_text("id,image\np,p.png\n", encoding="utf-8")
    code, stdout, err = run_cli(capsys, "download", manifest, "--out", tmp_path / "out")
    assert (code, stdout) == (2, "")
    assert err.strip() == f"error: {manifest}: no poster URLs to download (no url column, or every url is empty)"
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("flag, value, message", [
    ("--workers", "0", "must be a whole number of at least 1, got 0"),
    ("--timeout", "-1", "must be a number of seconds above 0, got -1.0"),
    ("--timeout", "0", "must be a number of seconds above 0, got 0.0"),
    ("--retries", "-1", "must be a whole number of 0 or more, got -1"),
    ("--deadline", "0", "must be a number of seconds above 0, got 0.0"),
    ("--max-bytes", "0", "must be a whole number of at least 1, got 0"),
    ("--max-pixels", "-5", "must be a whole number of at least 1, got -5"),
])
def test_flags_that_cannot_work_are_one_error_line(tmp_path, capsys, server, flag, value, message):
    manifest = url_manifest(tmp_path / "urls.csv", {"a": server.url("/png/a")})
    code, stdout, err = run_cli(capsys, "download", manifest, "--out", tmp_path / "out", f"{flag}={value}")
    assert (code, stdout) == (2, "")
    assert err.splitlines() == [f"error: {flag} {message}"]
    assert sum(server.hits.values()) == 0 and not (tmp_path / "out").exists()


def test_the_max_bytes_flag_reaches_the_download(tmp_path, capsys, server):
    manifest = url_manifest(tmp_path / "urls.csv", {"big": server.url("/big-stream"), "ok": server.url("/png/ok")})
    code, stdout, _ = run_cli(capsys, "download", manifest, "--out", tmp_path / "out", "--max-bytes", 1000, "--json")
    assert code == 0
    report = json.loads(stdout)
    assert report["downloaded"] == 1
    # No Content-Length: the cap cuts the body while it is read.
    assert report["failed"] == [{"id": "big", "url": server.url("/big-stream"),
                                 "reason": "too large: body exceeds max_bytes 1000"}]


def test_the_deadline_flag_reaches_the_download(tmp_path, capsys, server):
    manifest = url_manifest(tmp_path / "urls.csv", {"drip": server.url("/trickle")})
    code, stdout, err = run_cli(capsys, "download", manifest, "--out", tmp_path / "out", "--deadline", 0.5,
                                "--timeout", 0.4, "--json")
    assert code == 2 and err.splitlines() == [
        f"error: none of the 1 posters could be downloaded; see {tmp_path / 'out' / 'failures.csv'}"]
    assert json.loads(stdout)["failed"][0]["reason"].startswith("deadline of 0.5s passed while reading")


def test_help_documents_the_deadline_and_the_caps(capsys):
    with pytest.raises(SystemExit):
        run_cli(capsys, "download", "--help")
    text = " ".join(capsys.readouterr().out.split())
    assert f"default: {DEADLINE_TIMEOUTS} × --timeout" in text
    max_bytes_mb = DEFAULT_MAX_BYTES // 2**20
    assert f"--max-bytes MAX_BYTES largest poster body, refused while reading (default {max_bytes_mb} MB" in text
    assert f"--max-pixels MAX_PIXELS decompression-bomb limit per poster (default {DEFAULT_MAX_PIXELS}" in text
    assert "exits 2 when no poster could be had" in text
