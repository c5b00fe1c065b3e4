"""`synth`, `download` and `embed --download-dir` run end to end through the command line, against a
local HTTP server on 127.0.0.1 (the one tests/ingest/test_download.py uses); no outside network is used."""
from __future__ import annotations

import csv
import json
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from clipposter.embedding.cache import EmbeddingCache
from clipposter.embedding.embed import make_loader
from clipposter.ingest.download import STAMP_NAME
from helpers import installed_script, run_cli, tiny_args
from http_stub import serving


def read_csv(path: Path) -> list[dict]:
    with path.open(newline="", encoding="utf-8") as fh:
        return list(csv.DictReader(fh))


def url_manifest(path: Path, server, records, missing_id: str = "lost-poster") -> dict[str, Path]:
    """A manifest whose posters only have URLs: the given synthetic posters served from /files/, plus
    one URL the server answers with 404. Returns id → the original file of each served poster."""
    originals = {r.id: Path(r.image) for r in records}
    with path.open("w", newline="", encoding="utf-8") as fh:
        writer = csv.writer(fh)
        writer.writerow(["id", "url", "genres", "tagline"])
        for r in records:
            writer.writerow([r.id, server.url(f"/files/{Path(r.image).name}"), "|".join(r.genres), r.tagline])
        writer.writerow([missing_id, server.url("/files/no-such-poster.jpg"), "Drama", "Gone."])
    return originals


# ------------------------------------------------------------------------------------------------
# synth → embed
# ------------------------------------------------------------------------------------------------
def test_synth_writes_posters_and_a_manifest_that_embed_reads(tmp_path, capsys, tiny_checkpoint):
    out = tmp_path / "synthetic"
    code, stdout, _ = run_cli(capsys, "synth", "--out", out, "-n", 12, "--seed", 7, "--json")
    assert code == 0
    assert json.loads(stdout) == {"posters": 12, "manifest": str(out / "manifest.csv")}
    rows = read_csv(out / "manifest.csv")
    assert len(rows) == 12 and len({r["id"] for r in rows}) == 12
    for row in rows:
        with Image.open(out / row["image"]) as img:
            assert img.format == "JPEG" and img.size == (200, 300)
        assert row["genres"] and row["tagline"] and row["split"] in ("train", "validation", "test")
    assert sorted(p.name for p in (out / "posters").iterdir()) == sorted(Path(r["image"]).name for r in rows)

    code, stdout, _ = run_cli(capsys, "embed", out / "manifest.csv", "--cache", tmp_path / "cache",
                              *tiny_args(tiny_checkpoint), "--json")
    assert code == 0
    summary = json.loads(stdout)["summary"]
    assert (summary["records"], summary["encoded"], summary["skipped"]) == (12, 12, 0)
    with EmbeddingCache.open(tmp_path / "cache") as cache:
        cached = {r.id: r for r in cache.records()}
        assert sorted(cached) == sorted(r["id"] for r in rows)
        assert all(cached[r["id"]].tagline == r["tagline"] and cached[r["id"]].split == r["split"] for r in rows)


# ------------------------------------------------------------------------------------------------
# download
# ------------------------------------------------------------------------------------------------
def check_downloaded(folder: Path, originals: dict[str, Path]) -> None:
    """Every served poster saved as <id>.jpg with the original bytes, and nothing else but the report
    and the stamp file of the posters that decoded."""
    for poster_id, original in originals.items():
        assert (folder / f"{poster_id}.jpg").read_bytes() == original.read_bytes()
    assert sorted(p.name for p in folder.iterdir()) == sorted([f"{i}.jpg" for i in originals]
                                                              + ["failures.csv", STAMP_NAME])


def test_download_command_writes_images_and_a_failure_report(tmp_path, capsys, synthetic_set):
    src, records = synthetic_set
    out = tmp_path / "downloaded"
    with serving(files=src / "posters") as server:
        originals = url_manifest(tmp_path / "urls.csv", server, records[:5])
        lost_url = server.url("/files/no-such-poster.jpg")
        code, stdout, _ = run_cli(capsys, "download", tmp_path / "urls.csv", "--out", out, "--timeout", 10,
                                  "--retries", 0, "--json")
        assert code == 0
        payload = json.loads(stdout)
        assert payload.pop("source")["rows_read"] == 6  # what the manifest held, beside what came of it
        assert payload == {"downloaded": 5, "skipped_existing": 0, "failed": [
            {"id": "lost-poster", "url": lost_url, "reason": "HTTP 404 Not Found"}]}
        check_downloaded(out, originals)
        assert read_csv(out / "failures.csv") == [{"id": "lost-poster", "url": lost_url,
                                                   "reason": "HTTP 404 Not Found"}]
        assert all(server.hits[f"/files/{p.name}"] == 1 for p in originals.values())

        # The table form says the same, and a second run resumes: present posters cost no request.
        code, stdout, _ = run_cli(capsys, "download", tmp_path / "urls.csv", "--out", out, "--retries", 0)
        assert code == 0
        assert stdout.strip() == f"0 downloaded, 5 already present, 1 failed (see {out / 'failures.csv'})"
        assert all(server.hits[f"/files/{p.name}"] == 1 for p in originals.values())
        assert server.hits["/files/no-such-poster.jpg"] == 2


@pytest.mark.slow  # an interpreter start that imports torch (several seconds on a busy machine)
def test_installed_script_downloads(tmp_path, synthetic_set):
    src, records = synthetic_set
    out = tmp_path / "downloaded"
    with serving(files=src / "posters") as server:
        originals = url_manifest(tmp_path / "urls.csv", server, records[10:13])
        proc = subprocess.run([str(installed_script()), "download", str(tmp_path / "urls.csv"), "--out", str(out),
                               "--retries", "0", "--json"], capture_output=True, text=True, timeout=300)
        assert proc.returncode == 0, proc.stderr[-2000:]
        report = json.loads(proc.stdout)
        assert (report["downloaded"], report["skipped_existing"]) == (3, 0)
        assert [(f["id"], f["reason"]) for f in report["failed"]] == [("lost-poster", "HTTP 404 Not Found")]
        check_downloaded(out, originals)


# ------------------------------------------------------------------------------------------------
# embed --download-dir
# ------------------------------------------------------------------------------------------------
def test_embed_download_dir_fetches_urls_and_embeds_them(tmp_path, capsys, synthetic_set, tiny_checkpoint,
                                                         tiny_backbone):
    src, records = synthetic_set
    folder = tmp_path / "downloaded"
    with serving(files=src / "posters") as server:
        originals = url_manifest(tmp_path / "urls.csv", server, records[20:26])
        code, stdout, err = run_cli(capsys, "embed", tmp_path / "urls.csv", "--cache", tmp_path / "cache",
                                    "--download-dir", folder, *tiny_args(tiny_checkpoint), "--json")
    assert code == 0, err
    payload = json.loads(stdout)
    summary = payload["summary"]
    assert (summary["records"], summary["encoded"], summary["skipped"]) == (7, 6, 1)
    assert "lost-poster" in summary["skipped_files"][0]["reason"]
    assert payload["cache"]["posters"] == 6 and payload["texts"] > 0
    assert "could not be downloaded" in err and str(folder / "failures.csv") in err
    assert [r["id"] for r in read_csv(folder / "failures.csv")] == ["lost-poster"]
    check_downloaded(folder, originals)

    # What the cache holds for each id is the backbone's embedding of that id's original poster.
    ids = list(originals)
    load = make_loader(tiny_backbone)
    expected = tiny_backbone.encode_image_tensors(torch.stack([load(str(originals[i])) for i in ids]))
    with EmbeddingCache.open(tmp_path / "cache") as cache:
        assert sorted(r.id for r in cache.records()) == sorted(ids)
        np.testing.assert_allclose(cache.embeddings_for_ids(ids), expected, atol=2e-3)
        by_id = {r.id: r for r in cache.records()}
        assert all(by_id[r.id].tagline == r.tagline for r in records[20:26])
