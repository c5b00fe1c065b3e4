"""`clipposter export wds` and `embed wds:`: a source exported to shards and embedded from them gives the
same ids, records and embeddings as embedding the source itself, through local paths and `pipe:`
commands; bad members are skipped and counted; expected failures are one `error:` line."""
from __future__ import annotations

import csv
import io
import json
import tarfile

import numpy as np
import pytest

from clipposter.embedding.cache import EmbeddingCache
from helpers import run_cli, tiny_args

pytestmark = pytest.mark.usefixtures("single_torch_thread")


def small_manifest(path, synthetic_set, n: int = 12):
    """A manifest of the first n synthetic posters (absolute image paths) with their labels and texts."""
    src, _ = synthetic_set
    with open(src / "manifest.csv", newline="", encoding="utf-8") as fh:
        rows = list(csv.DictReader(fh))[:n]
    for row in rows:
        row["image"] = str(src / row["image"])
    with open(path, "w", newline="", encoding="utf-8") as fh:
        writer = csv.DictWriter(fh, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    return path


def cache_contents(path):
    """id → (record without its image path, embedding) of a cache."""
    with EmbeddingCache.open(path, mode="r") as cache:
        records = cache.records()
        ids = [r.id for r in records]
        emb = cache.embeddings_for_ids(ids)
    return {r.id: ({**r.to_dict(), "image": None}, e) for r, e in zip(records, emb)}


def embed(capsys, source, cache, ckpt, *extra):
    code, out, err = run_cli(capsys, "embed", source, "--cache", cache, *tiny_args(ckpt), "--no-texts", "--workers",
                             "0", "--json", *extra)
    assert code == 0, err
    return json.loads(out)


@pytest.mark.slow
def test_folder_to_shards_to_cache_equals_embedding_the_folder(tmp_path, capsys, tiny_checkpoint, synthetic_set):
    manifest = small_manifest(tmp_path / "m.csv", synthetic_set)
    embed(capsys, manifest, tmp_path / "direct", tiny_checkpoint)

    code, out, err = run_cli(capsys, "export", "wds", manifest, "--out", tmp_path / "shards", "--shard-size", 5)
    assert code == 0, err
    assert "12 posters: 12 in 3 shards of up to 5 (12 written, 0 kept from an earlier run), 0 skipped" in out

    summary = embed(capsys, f"wds:{tmp_path}/shards/{{000000..000002}}.tar", tmp_path / "via", tiny_checkpoint)
    assert (summary["summary"]["encoded"], summary["summary"]["skipped"]) == (12, 0)
    direct, via = cache_contents(tmp_path / "direct"), cache_contents(tmp_path / "via")
    assert sorted(via) == sorted(direct)
    for pid, (record, emb) in direct.items():
        assert via[pid][0] == record
        np.testing.assert_array_equal(via[pid][1], emb)

    # the same bytes under the same ids: the cache of the folder already holds every poster of the shards
    again = embed(capsys, f"wds:{tmp_path}/shards", tmp_path / "direct", tiny_checkpoint)
    assert (again["summary"]["encoded"], again["summary"]["cached"]) == (0, 12)
    assert again["cache"]["records"] == 12


@pytest.mark.slow
def test_embed_reads_pipe_shards_through_download_dir(tmp_path, capsys, tiny_checkpoint, synthetic_set):
    manifest = small_manifest(tmp_path / "m.csv", synthetic_set, n=6)
    assert run_cli(capsys, "export", "wds", manifest, "--out", tmp_path / "shards", "--shard-size", 4)[0] == 0
    spec = f"wds:pipe:cat {tmp_path}/shards/{{000000..000001}}.tar"
    code, _, err = run_cli(capsys, "embed", spec, "--cache", tmp_path / "c", *tiny_args(tiny_checkpoint))
    assert code == 2
    assert err.strip().splitlines()[-1].endswith("pass --download-dir, a folder to copy the shards into "
                                                 "(copies already there are reused)")
    summary = embed(capsys, spec, tmp_path / "c", tiny_checkpoint, "--download-dir", tmp_path / "copies")
    assert summary["summary"]["encoded"] == 6
    assert len(list((tmp_path / "copies").glob("*.tar"))) == 2
    ids = [row["id"] for row in csv.DictReader(open(manifest, encoding="utf-8"))]
    assert sorted(cache_contents(tmp_path / "c")) == sorted(ids)


@pytest.mark.slow
def test_a_corrupt_image_member_is_skipped_and_counted_by_embed(tmp_path, capsys, tiny_checkpoint, synthetic_set):
    src, _ = synthetic_set
    good = sorted((src / "posters").glob("*.jpg"))[:2]
    with tarfile.open(tmp_path / "s.tar", "w") as tar:
        for key, data in (("a", good[0].read_bytes()), ("b", good[1].read_bytes()[:400]), ("c", b"")):
            for name, payload in ((f"{key}.jpg", data), (f"{key}.json", json.dumps({"caption": key}).encode())):
                info = tarfile.TarInfo(name)
                info.size = len(payload)
                tar.addfile(info, io.BytesIO(payload))
    summary = embed(capsys, f"wds:{tmp_path}/s.tar", tmp_path / "c", tiny_checkpoint)["summary"]
    assert (summary["records"], summary["encoded"], summary["skipped"]) == (3, 1, 2)
    b, c = f"{tmp_path}/s.tar#b.jpg", f"{tmp_path}/s.tar#c.jpg"
    assert {f["path"]: f["reason"] for f in summary["skipped_files"]} == {
        b: f"{b}: unsupported or corrupt image: Truncated File Read", c: f"{c}: empty file (0 bytes)"}


def test_export_failures_are_one_error_line(tmp_path, capsys, synthetic_set):
    manifest = small_manifest(tmp_path / "m.csv", synthetic_set, n=3)
    (tmp_path / "file").write_text("x")
    for argv, message in [
        (["--out", tmp_path / "file"], f"error: {tmp_path}/file: not a folder; --out names the folder the shards go to"),
        (["--out", tmp_path / "o", "--shard-size", "0"], "error: --shard-size must be a whole number of at least 1, got 0"),
        (["--out", tmp_path / "o", "--max-bytes", "10"], f"error: {manifest}: none of the 3 posters could be read"),
    ]:
        code, _, err = run_cli(capsys, "export", "wds", manifest, *argv)
        assert code == 2 and err.strip().splitlines()[-1] == message, err
        assert "Traceback" not in err
    code, _, err = run_cli(capsys, "export", "wds", f"wds:{tmp_path}/none/{{0..1}}.tar", "--out", tmp_path / "o")
    assert code == 2 and err.strip().startswith(f"error: wds:{tmp_path}/none/{{0..1}}.tar: 2 of 2 shards not found")


def test_export_skips_unreadable_posters_with_a_warning_and_exits_0(tmp_path, capsys, synthetic_set):
    manifest = small_manifest(tmp_path / "m.csv", synthetic_set, n=3)
    rows = list(csv.DictReader(open(manifest, encoding="utf-8")))
    broken = tmp_path / "broken.jpg"
    broken.write_bytes(b"")
    rows[1]["image"] = str(broken)
    with open(manifest, "w", newline="", encoding="utf-8") as fh:
        writer = csv.DictWriter(fh, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    code, out, err = run_cli(capsys, "export", "wds", manifest, "--out", tmp_path / "o", "--json")
    assert code == 0
    assert f"warning: skipped {broken}: empty file (0 bytes)" in err
    payload = json.loads(out)
    assert (payload["written"], payload["skipped"], payload["shards"]) == (2, 1, ["000000.tar"])
