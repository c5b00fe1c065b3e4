"""The source flags of the CLI (--encoding, --join, --max-bytes, --max-pixels) and what `embed` says about
a source: special files skipped and counted, notes and warnings on stderr, counts in --json, and
one-line errors that leave no cache behind."""
from __future__ import annotations

import json
import os
from pathlib import Path

import pandas as pd
import pytest
from PIL import Image

from helpers import run_cli, tiny_args

pytestmark = pytest.mark.usefixtures("single_torch_thread")


def poster(path: Path, colour=(200, 40, 60)) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (32, 48), colour).save(path)
    return path


def embed(capsys, tiny_checkpoint, source, cache, *flags):
    return run_cli(capsys, "embed", source, "--cache", cache, *tiny_args(tiny_checkpoint), "--no-texts", "--workers",
                   "0", *flags)


@pytest.mark.timeout(60)
def test_a_fifo_among_the_posters_is_skipped_and_counted_not_waited_on(tmp_path, capsys, tiny_checkpoint):
    if not hasattr(os, "mkfifo"):
        pytest.skip("no FIFOs on this platform")
    folder = tmp_path / "posters"
    poster(folder / "good.png")
    os.mkfifo(folder / "a.jpg")
    code, out, err = embed(capsys, tiny_checkpoint, folder, tmp_path / "cache", "--json")
    assert code == 0, err
    summary = json.loads(out)["summary"]
    assert (summary["encoded"], summary["skipped"]) == (1, 1)
    assert summary["skipped_files"] == [{"path": str(folder / "a.jpg"),
                                         "reason": f"{folder / 'a.jpg'}: cannot read file: not a regular file (a FIFO)"}]


def test_a_poster_over_max_bytes_is_skipped_and_the_flag_is_named(tmp_path, capsys, tiny_checkpoint):
    folder = tmp_path / "posters"
    small = poster(folder / "small.png")
    big = folder / "big.png"
    Image.effect_noise((64, 64), 80).save(big)
    cap = (small.stat().st_size + big.stat().st_size) // 2
    assert small.stat().st_size <= cap < big.stat().st_size
    code, out, err = embed(capsys, tiny_checkpoint, folder, tmp_path / "cache", "--max-bytes", cap, "--json")
    assert code == 0, err
    summary = json.loads(out)["summary"]
    assert (summary["encoded"], summary["skipped"]) == (1, 1)
    assert summary["skipped_files"][0]["reason"].endswith(f"file too large: more than {cap} bytes; "
                                                          f"raise `max_bytes` if you trust it")


@pytest.mark.parametrize("flag, value", [("--max-pixels", "0"), ("--max-pixels", "-3"), ("--max-bytes", "0"),
                                         ("--max-bytes", "-1")])
def test_a_limit_below_one_is_one_line_naming_the_flag_and_makes_no_cache(tmp_path, capsys, tiny_checkpoint, flag,
                                                                          value):
    poster(tmp_path / "posters" / "a.png")
    code, out, err = embed(capsys, tiny_checkpoint, tmp_path / "posters", tmp_path / "cache", flag, value)
    assert code == 2 and out == ""
    assert err == f"error: {flag} must be a whole number of at least 1, got {value}\n"
    assert not (tmp_path / "cache").exists()


def test_an_encoding_note_and_a_wrong_encoding_error_name_the_flag(tmp_path, capsys, tiny_checkpoint):
    poster(tmp_path / "a.png")
    manifest = tmp_path / "m.csv"
    manifest.write_bytes("id,image,tagline\na,a.png,\u201cRun\u201d\n".encode("cp1252"))
    code, out, err = embed(capsys, tiny_checkpoint, manifest, tmp_path / "cache", "--json")
    assert code == 0, err
    assert f"note: {manifest}: read as cp1252 (Windows) since it is not valid UTF-8; pass --encoding if the text " \
           f"looks wrong\n" in err
    assert json.loads(out)["source"]["notes"] == [f"{manifest}: read as cp1252 (Windows) since it is not valid "
                                                  f"UTF-8; pass `encoding` if the text looks wrong"]

    code, out, err = embed(capsys, tiny_checkpoint, manifest, tmp_path / "other", "--encoding", "utf-8")
    assert code == 2 and out == ""
    assert err == f"error: {manifest}: not readable as utf-8 (byte 0x93 on line 2); pass the right --encoding\n"
    assert not (tmp_path / "other").exists()


def kaggle_folder(tmp_path: Path, labelled: int = 5, with_metadata: int = 3,
                  url: str = "https://images.example/") -> Path:
    folder = tmp_path / "kaggle"
    folder.mkdir()
    ids = [100000 + i for i in range(labelled)]
    pd.DataFrame({"imdbId": ids, "Title": [f"Film {i}" for i in ids], "Genre": ["Drama"] * labelled,
                  "Poster": [f"{url}{i}.jpg" for i in ids]}).to_csv(folder / "MovieGenre.csv", index=False)
    pd.DataFrame({"imdb_id": [f"tt0{i}" for i in ids[:with_metadata]],
                  "genres": ["[{'id': 18, 'name': 'Drama'}]"] * with_metadata,
                  "tagline": ["A tagline"] * with_metadata}).to_csv(folder / "movies_metadata.csv", index=False)
    return folder


@pytest.mark.parametrize("join, kept", [(None, 5), ("left", 5), ("inner", 3)])
def test_kaggle_counts_are_printed_and_in_json(tmp_path, capsys, tiny_checkpoint, join, kept):
    folder = kaggle_folder(tmp_path)
    for i in range(5):
        poster(folder / "posters" / f"tt0{100000 + i}.jpg", (40 * i, 0, 0))
    flags = ["--join", join] if join else []
    code, out, err = embed(capsys, tiny_checkpoint, f"kaggle:{folder}", tmp_path / "cache", "--json", *flags)
    assert code == 0, err
    payload = json.loads(out)
    assert payload["source"]["join"] == {"join": join or "left", "labelled": 5, "with_metadata": 3, "kept": kept}
    assert payload["summary"]["records"] == kept
    assert f"note: MovieGenre.csv: 5 labelled posters, 3 with metadata in movies_metadata.csv; kept {kept} (" in err
    if join == "inner":
        assert "--join left keeps them" in err


def test_kaggle_with_an_empty_poster_folder_says_where_it_looked_and_makes_no_cache(tmp_path, capsys,
                                                                                     tiny_checkpoint):
    folder = kaggle_folder(tmp_path)
    (folder / "posters").mkdir()
    code, out, err = embed(capsys, tiny_checkpoint, f"kaggle:{folder}", tmp_path / "cache")
    assert code == 2 and out == ""
    lines = err.splitlines()
    assert lines[-1] == (f"error: kaggle:{folder}: none of the 5 posters has an image file in {folder / 'posters'} "
                         f"(looked for <imdb id>.jpg, e.g. tt0100000.jpg); fetch them with `clipposter download "
                         f"kaggle:{folder} --out {folder / 'posters'}`, or pass --download-dir")
    assert all(line.startswith(("note: ", "warning: ")) for line in lines[:-1])
    assert not (tmp_path / "cache").exists()


def test_warnings_of_a_folder_are_printed_one_per_line(tmp_path, capsys, tiny_checkpoint, monkeypatch):
    folder = tmp_path / "posters"
    poster(folder / "a.png")
    locked = folder / "locked"
    poster(locked / "b.png")
    real_scandir = os.scandir

    def scandir(path="."):
        if os.fspath(path) == str(locked):
            raise PermissionError(13, "Permission denied", str(locked))
        return real_scandir(path)

    monkeypatch.setattr(os, "scandir", scandir)
    code, out, err = embed(capsys, tiny_checkpoint, folder, tmp_path / "cache", "--json")
    assert code == 0, err
    assert f"warning: cannot read folder {locked}: Permission denied; its posters are left out\n" in err
    assert f"warning: {folder}: read 2 rows, skipped 1 (unreadable folder: 1)\n" in err
    assert json.loads(out)["source"]["reasons"] == {"unreadable folder": 1}


def test_download_takes_the_source_flags_and_reports_the_join(tmp_path, capsys):
    # every URL points at a closed local port: the counts come before any download, the failures after
    folder = kaggle_folder(tmp_path, url="http://127.0.0.1:9/")
    code, out, err = run_cli(capsys, "download", f"kaggle:{folder}", "--out", tmp_path / "out", "--join", "inner",
                             "--retries", "0", "--timeout", "0.2", "--json")
    assert code == 2  # no poster could be had
    payload = json.loads(out)
    assert payload["source"]["join"] == {"join": "inner", "labelled": 5, "with_metadata": 3, "kept": 3}
    assert len(payload["failed"]) == 3
    assert "note: MovieGenre.csv: 5 labelled posters, 3 with metadata" in err


def test_the_parser_default_byte_cap_is_the_library_default():
    from clipposter.cli.common import DEFAULT_MAX_BYTES as cli_default
    from clipposter.ingest.images import DEFAULT_MAX_BYTES

    assert cli_default == DEFAULT_MAX_BYTES
