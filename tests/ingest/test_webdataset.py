"""WebDataset shards as a source (`wds:`) and as an export: img2dataset's layout read into records, posters
read from inside shards like files, bad samples skipped and counted, and the export's shards read back
(by our reader and by the WebDataset library itself) with the same ids, texts and bytes."""
from __future__ import annotations

import gzip
import io
import json
import os
import tarfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from clipposter.errors import ClipposterError, ConfigError, PosterError
from clipposter.ingest.images import load_poster, read_bytes
from clipposter.ingest.sources import SourceStats, load_source
from clipposter.ingest.webdataset import EXPORT_INDEX, export_webdataset, shard_urls
from clipposter.records import PosterRecord


def jpeg(colour=(200, 30, 60), size=(24, 36)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", size, colour).save(buf, format="JPEG", quality=95)
    return buf.getvalue()


def write_tar(path: Path, members: list[tuple[str, bytes]]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    with tarfile.open(path, "w") as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return path


def img2dataset_sample(key: str, caption: str, colour=(200, 30, 60), **extra) -> list[tuple[str, bytes]]:
    """The three members img2dataset writes per image: KEY.jpg, KEY.json (key, caption, url, …), KEY.txt."""
    meta = {"key": key, "caption": caption, "url": f"https://example.org/{key}.jpg", "status": "success",
            "width": 24, "height": 36, **extra}
    return [(f"{key}.jpg", jpeg(colour)), (f"{key}.json", json.dumps(meta).encode()), (f"{key}.txt", caption.encode())]


@pytest.fixture
def shards(tmp_path):
    """Two shards of two samples each, named 000.tar and 001.tar."""
    write_tar(tmp_path / "000.tar", img2dataset_sample("000000000", "A lone rider", (10, 200, 10))
              + img2dataset_sample("000000001", "Space is cold", (10, 10, 200), genres=["Sci-Fi", "Drama"]))
    write_tar(tmp_path / "001.tar", img2dataset_sample("000010000", "Love in Paris", (220, 220, 10), split="val")
              + img2dataset_sample("000010001", "The heist", (90, 90, 90), tagline="One last job", title="Heist"))
    return tmp_path


def test_img2dataset_shards_become_records_keyed_by_the_tar_key(shards):
    stats = SourceStats()
    records = load_source(f"wds:{shards}/{{000..001}}.tar", stats=stats)
    assert [r.id for r in records] == ["000000000", "000000001", "000010000", "000010001"]
    by_id = {r.id: r for r in records}
    assert by_id["000000000"].tagline == "A lone rider"  # img2dataset's caption fills the tagline
    assert by_id["000000000"].url == "https://example.org/000000000.jpg"
    assert by_id["000000001"].genres == ["Sci-Fi", "Drama"]
    assert by_id["000010000"].split == "validation"  # split names read like a manifest's
    assert (by_id["000010001"].tagline, by_id["000010001"].title) == ("One last job", "Heist")
    assert by_id["000010001"].image == f"{shards / '001.tar'}#000010001.jpg"
    assert stats.rows_read == 4 and stats.rows_skipped == 0
    # the poster inside the shard reads like a file: the member's exact bytes, decoded like any poster
    members = dict(img2dataset_sample("000010001", "The heist", (90, 90, 90)))
    assert read_bytes(by_id["000010001"].image) == members["000010001.jpg"]
    pixel = np.asarray(load_poster(by_id["000000001"].image))[18, 12]
    assert np.abs(pixel.astype(int) - (10, 10, 200)).max() <= 3


def test_the_tagline_is_the_json_tagline_else_its_caption_else_the_txt_member(tmp_path):
    write_tar(tmp_path / "s.tar", [
        ("a.jpg", jpeg()), ("a.json", b'{"tagline": "T", "caption": "C"}'), ("a.txt", b"X"),
        ("b.jpg", jpeg()), ("b.json", b'{"caption": "C"}'), ("b.txt", b"X"),
        ("c.jpg", jpeg()), ("c.json", b'{"tagline": null}'), ("c.txt", b"X"),
        ("d.jpg", jpeg()), ("d.json", b'{"caption": "  "}')])
    assert [(r.id, r.tagline) for r in load_source(f"wds:{tmp_path}/s.tar")] == [
        ("a", "T"), ("b", "C"), ("c", "X"), ("d", None)]


def test_a_folder_spec_reads_its_tar_files_in_order_and_ids_are_stable(shards):
    assert shard_urls(f"wds:{shards}") == [str(shards / "000.tar"), str(shards / "001.tar")]
    first = load_source(f"wds:{shards}")
    again = load_source(f"wds:{shards}/{{000..001}}.tar")
    assert [r.to_dict() for r in first] == [r.to_dict() for r in again]


def test_a_pipe_shard_is_copied_into_download_dir_once_and_read_like_a_local_one(shards, tmp_path):
    local = load_source(f"wds:{shards}/001.tar")
    copies = tmp_path / "copies"
    piped = load_source(f"wds:pipe:cat {shards}/001.tar", download_dir=copies)
    assert [(r.id, r.tagline, r.genres, r.split) for r in piped] == [(r.id, r.tagline, r.genres, r.split) for r in local]
    copy = next(copies.glob("*.tar"))
    assert copy.name.startswith("001-") and copy.read_bytes() == (shards / "001.tar").read_bytes()
    assert [read_bytes(r.image) for r in piped] == [read_bytes(r.image) for r in local]
    # a second read reuses the copy: the command is not run again
    (shards / "001.tar").unlink()
    assert [r.id for r in load_source(f"wds:pipe:cat {shards}/001.tar", download_dir=copies)] == [r.id for r in local]


def test_pipe_without_download_dir_and_a_failing_command_are_one_line_errors(shards, tmp_path):
    with pytest.raises(ClipposterError, match="pipe: shard can be read only once; pass `download_dir`"):
        load_source(f"wds:pipe:cat {shards}/000.tar")
    with pytest.raises(ClipposterError, match=r"exited with status 1: .*No such file"):
        load_source(f"wds:pipe:cat {tmp_path}/absent.tar", download_dir=tmp_path / "copies")
    assert not list((tmp_path / "copies").glob("*.tar"))  # no half copy left to be reused


def test_missing_shards_and_remote_urls_are_refused_with_what_to_do(shards):
    with pytest.raises(ClipposterError, match=r"1 of 3 shards not found: .*002\.tar; check the pattern"):
        shard_urls(f"wds:{shards}/{{000..002}}.tar")
    with pytest.raises(ClipposterError, match="use e.g. pipe:curl -fsSL https://host/0.tar"):
        shard_urls("wds:https://host/0.tar")


def test_bad_samples_are_skipped_and_counted_and_the_rest_is_read(tmp_path):
    members = (img2dataset_sample("a", "good")
               + [("b.json", b'{"caption": "no image"}')]  # no image member
               + [("c.jpg", jpeg()), ("c.json", b"{not json")]  # unreadable json
               + [("d.jpg", jpeg())]  # no json at all: kept, without labels
               + img2dataset_sample("e", "odd split", split="holdout")
               + [("__meta__.json", b"{}"), ("README", b"no suffix")])  # neither is a sample
    write_tar(tmp_path / "s.tar", members)
    stats = SourceStats()
    records = load_source(f"wds:{tmp_path}/s.tar", stats=stats)
    assert [r.id for r in records] == ["a", "d"]
    assert stats.reasons == {"no image member": 1, "json member not a JSON object": 1, "unknown split": 1}
    assert stats.rows_read == 5 and stats.rows_skipped == 3
    assert any("sample 'b': no image member" in w for w in stats.warnings)
    assert any("1 samples have no json member" in n for n in stats.notes)


def test_a_truncated_shard_keeps_the_samples_before_the_damage(tmp_path):
    full = write_tar(tmp_path / "full.tar", img2dataset_sample("a", "first") + img2dataset_sample("b", "second"))
    data = full.read_bytes()
    cut = tmp_path / "cut.tar"
    cut.write_bytes(data[: data.index(b"b.jpg") + 700])  # inside b's image
    stats = SourceStats()
    records = load_source(f"wds:{cut}", stats=stats)
    assert [r.id for r in records] == ["a"]
    assert stats.reasons == {"truncated shard": 1}
    assert "truncated or damaged after 1 samples" in stats.warnings[0]
    # a path to the cut member (kept by a cache made before the damage) is refused, never read short
    with pytest.raises(PosterError, match="truncated"):
        read_bytes(f"{cut}#b.jpg")
    assert read_bytes(f"{cut}#a.jpg") == read_bytes(f"{full}#a.jpg")


def test_a_compressed_or_foreign_file_is_skipped_with_a_warning(tmp_path):
    full = write_tar(tmp_path / "plain.tar", img2dataset_sample("a", "first"))
    (tmp_path / "gz.tar").write_bytes(gzip.compress(full.read_bytes()))
    stats = SourceStats()
    records = load_source(f"wds:{tmp_path}/{{plain,gz}}.tar", stats=stats)
    assert [r.id for r in records] == ["a"]
    assert stats.reasons == {"unreadable shard": 1}
    assert "gzip-compressed: decompress it with gunzip" in stats.warnings[0]


def test_a_repeated_id_keeps_the_first_sample(shards, tmp_path):
    stats = SourceStats()
    records = load_source(f"wds:{shards}/{{000,001,000}}.tar", stats=stats)
    assert [r.id for r in records] == ["000000000", "000000001", "000010000", "000010001"]
    assert stats.reasons == {"duplicate id": 2}


def test_member_paths_respect_max_bytes_and_name_a_missing_member(shards):
    member = f"{shards / '000.tar'}#000000000.jpg"
    size = len(read_bytes(member))
    with pytest.raises(PosterError, match=f"more than {size - 1} bytes"):
        read_bytes(member, max_bytes=size - 1)
    with pytest.raises(PosterError, match=f"more than {size - 1} bytes"):
        load_poster(member, max_bytes=size - 1)
    with pytest.raises(PosterError, match="no member 'zzz.jpg' in shard"):
        read_bytes(f"{shards / '000.tar'}#zzz.jpg")
    with pytest.raises(PosterError, match="cannot read file"):
        read_bytes(f"{shards / 'absent.tar'}#a.jpg")


def test_a_real_file_named_like_a_member_path_is_read_as_that_file(tmp_path):
    write_tar(tmp_path / "x.tar", [("a.jpg", jpeg((0, 0, 255)))])
    odd = tmp_path / "x.tar#a.jpg"
    odd.write_bytes(jpeg((255, 0, 0)))
    assert read_bytes(str(odd)) == odd.read_bytes()


# ------------------------------------------------------------------------------------------ export

def poster_records(folder: Path, n: int) -> list[PosterRecord]:
    records = []
    for i in range(n):
        path = folder / f"p{i}.png"
        folder.mkdir(parents=True, exist_ok=True)
        Image.new("RGB", (16, 24), (i * 20 % 255, 50, 100)).save(path)
        records.append(PosterRecord(id=f"poster.{i}/x", image=str(path), genres=["Drama"] if i % 2 else [],
                                    tagline=f"tagline {i}" if i % 3 else None, overview="ov" if i == 1 else None,
                                    split=("train", "validation", "test")[i % 3], title=f"T{i}"))
    return records


def test_export_then_read_gives_the_same_records_and_bytes(tmp_path):
    records = poster_records(tmp_path / "posters", 7)
    summary = export_webdataset(records, tmp_path / "out", shard_size=3)
    assert summary.shards == ["000000.tar", "000001.tar", "000002.tar"] and summary.written == 7
    back = load_source(f"wds:{tmp_path}/out/{{000000..000002}}.tar")
    strip = [{**r.to_dict(), "image": None} for r in records]
    assert [{**r.to_dict(), "image": None} for r in back] == strip
    assert [read_bytes(r.image) for r in back] == [Path(r.image).read_bytes() for r in records]


def test_shards_export_again_into_other_shard_sizes_unchanged(tmp_path):
    records = poster_records(tmp_path / "posters", 5)
    export_webdataset(records, tmp_path / "a", shard_size=3)
    export_webdataset(load_source(f"wds:{tmp_path}/a"), tmp_path / "b", shard_size=2)
    back = load_source(f"wds:{tmp_path}/b")
    assert len(list((tmp_path / "b").glob("*.tar"))) == 3
    assert [{**r.to_dict(), "image": None} for r in back] == [{**r.to_dict(), "image": None} for r in records]
    assert [read_bytes(r.image) for r in back] == [Path(r.image).read_bytes() for r in records]


def test_the_webdataset_library_reads_the_exported_shards(tmp_path):
    import webdataset as wds  # the reference reader (the test extra installs it)
    records = poster_records(tmp_path / "posters", 5)
    export_webdataset(records, tmp_path / "out", shard_size=2)
    samples = list(wds.WebDataset(f"{tmp_path}/out/{{000000..000002}}.tar", shardshuffle=False))
    assert [s["__key__"] for s in samples] == [f"{i:09d}" for i in range(5)]
    assert [json.loads(s["json"])["id"] for s in samples] == [r.id for r in records]
    assert [s["png"] for s in samples] == [Path(r.image).read_bytes() for r in records]
    assert [s.get("txt", b"").decode() for s in samples] == [r.tagline or "" for r in records]


def test_a_killed_export_resumes_at_the_shard_it_was_writing(tmp_path):
    records = poster_records(tmp_path / "posters", 7)
    out = tmp_path / "out"
    export_webdataset(records, out, shard_size=3)
    first = {p.name: p.read_bytes() for p in out.glob("*.tar")}
    # a kill while writing shard 1: its temporary file is left, the shard itself is not there
    (out / "000001.tar").rename(out / ".000001.tar.999-1.tmp")
    summary = export_webdataset(records, out, shard_size=3)
    assert (summary.reused_shards, summary.written, summary.reused) == (2, 3, 4)
    assert {p.name: p.read_bytes() for p in out.glob("*.tar")} == first  # byte-identical
    assert not list(out.glob(".*.tmp"))


def test_a_changed_source_rewrites_the_shards_it_changes_and_removes_extra_ones(tmp_path):
    records = poster_records(tmp_path / "posters", 7)
    out = tmp_path / "out"
    export_webdataset(records, out, shard_size=3)
    summary = export_webdataset(records[:3] + records[4:6], out, shard_size=3)  # one gone, the last gone
    assert summary.reused_shards == 1 and summary.removed_shards == ["000002.tar"]
    assert sorted(p.name for p in out.glob("*.tar")) == ["000000.tar", "000001.tar"]
    assert [r.id for r in load_source(f"wds:{out}")] == [r.id for r in records[:3] + records[4:6]]
    assert json.loads((out / EXPORT_INDEX).read_text())["records"] == 5


def test_export_skips_and_counts_posters_it_cannot_read(tmp_path):
    records = poster_records(tmp_path / "posters", 3)
    os.remove(records[1].image)
    (tmp_path / "notes.txt").write_text("not a poster")
    records.append(PosterRecord(id="text", image=str(tmp_path / "notes.txt")))
    summary = export_webdataset(records, tmp_path / "out", shard_size=10)
    assert summary.written == 2 and summary.skipped == 2
    assert [reason for _, reason in summary.skipped_files] == [
        "cannot read file: No such file or directory", "not an image (unrecognised format)"]
    with pytest.raises(ConfigError, match="shard_size"):
        export_webdataset(records, tmp_path / "out2", shard_size=0)
