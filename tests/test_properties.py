"""Property tests: hypothesis generates the inputs, the test states what must hold for all of them.

- The cache: any sequence of appends, writers killed part-way (the files a SIGKILL leaves: a torn
  .npy tail, a torn SQLite WAL, a stale .npy header) and reopenings leaves every committed row
  exactly once and bit-identical, and nothing uncommitted.
- Manifests: any list of well-formed records round-trips through write_manifest / from_manifest.
- Genre strings: every accepted spelling of one genre list parses to that list.

`HYPOTHESIS_PROFILE=mutation` runs fewer examples (the mutation run repeats these tests per mutant).
"""
from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path

import numpy as np
import pandas as pd
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from clipposter.embedding.backbone import BackboneIdentity
from clipposter.embedding.cache import EmbeddingCache, text_hash
from clipposter.records import SPLITS, PosterRecord, parse_genres
from clipposter.ingest.sources import _metadata_genres, from_manifest, write_manifest

settings.register_profile("default-properties", max_examples=40, deadline=None,
                          suppress_health_check=[HealthCheck.too_slow])
settings.register_profile("mutation", max_examples=12, deadline=None,
                          suppress_health_check=[HealthCheck.too_slow])
PROFILE = os.environ.get("HYPOTHESIS_PROFILE", "default-properties")
if PROFILE not in ("default-properties", "mutation"):
    PROFILE = "default-properties"
settings.load_profile(PROFILE)

# ============================================================================================ cache

DIM = 4
HASHES = [f"h{i}" for i in range(10)]
TEXTS = [f"a poster of genre {i}" for i in range(8)]


def _identity() -> BackboneIdentity:
    return BackboneIdentity(model="m", weights="sha256:aa", image_size=32, mean=(0.5, 0.5, 0.5),
                            std=(0.2, 0.2, 0.2), interpolation="bicubic", resize_mode="shortest", embed_dim=DIM)


def _rows(seed: int, n: int) -> np.ndarray:
    x = np.random.default_rng(seed).normal(size=(n, DIM)).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


class _Encoder:
    """A text encoder of the cache's backbone whose output depends on a seed (so re-encoding a
    known text would give different bytes, and the test sees if a stored row is ever replaced)."""

    def __init__(self, seed: int):
        self.identity = _identity()
        self.seed = seed

    def encode_texts(self, texts, batch_size=256):
        return _rows(self.seed, len(texts))


def _files(root: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in root.iterdir() if p.is_file()}


def _write_files(root: Path, files: dict[str, bytes]) -> None:
    root.mkdir()
    for name, data in files.items():
        (root / name).write_bytes(data)


class CacheModel:
    """What the cache must hold: committed rows in insertion order, and the committed records."""

    def __init__(self, dtype: str):
        self.dtype = np.dtype(dtype)
        self.posters: dict[str, bytes] = {}   # hash -> stored row bytes, insertion order
        self.texts: dict[str, bytes] = {}
        self.records: dict[str, list[str]] = {}

    def add_posters(self, hashes, emb, genres):
        for h, row in zip(hashes, emb):
            if h not in self.posters:
                self.posters[h] = row.astype(self.dtype).tobytes()
        for h in hashes:
            self.records[f"p-{h}"] = genres

    def add_texts(self, texts, emb):
        # The cache encodes and appends new texts in the order of their content hashes.
        for t, row in zip(sorted(set(texts) - set(self.texts), key=text_hash), emb):
            self.texts[t] = row.astype(self.dtype).tobytes()

    def check(self, cache: EmbeddingCache) -> None:
        assert cache.num_posters == len(self.posters)
        assert cache.num_texts == len(self.texts)
        assert np.asarray(cache.image_matrix()).tobytes() == b"".join(self.posters.values())
        row_bytes = DIM * self.dtype.itemsize
        for name, rows in (("images.npy", self.posters), ("texts.npy", self.texts)):
            assert (cache.root / name).stat().st_size == 128 + len(rows) * row_bytes, name
        on_disk = np.load(cache.root / "images.npy")
        assert on_disk.shape == (len(self.posters), DIM) and on_disk.tobytes() == b"".join(self.posters.values())
        texts = np.load(cache.root / "texts.npy")
        assert texts.shape == (len(self.texts), DIM) and texts.tobytes() == b"".join(self.texts.values())
        assert cache.known_hashes(HASHES) == set(self.posters)
        for h, row in self.posters.items():
            got = cache.embedding_for_hash(h)
            assert got.astype(self.dtype).tobytes() == row
        assert {r.id: r.genres for r in cache.records()} == self.records
        if self.texts:
            got = cache.text_embeddings(list(self.texts))  # no backbone: every text must be stored
            assert got.astype(self.dtype).tobytes() == b"".join(self.texts.values())


# An operation is ("append", hash indices, seed), ("texts", text indices, seed), ("reopen",),
# or ("kill", what, phase, fraction): a write killed at `phase` with `fraction` of its bytes on disk.
_append = st.tuples(st.just("append"), st.lists(st.integers(0, len(HASHES) - 1), min_size=1, max_size=4),
                    st.integers(0, 10_000))
_texts = st.tuples(st.just("texts"), st.lists(st.integers(0, len(TEXTS) - 1), min_size=1, max_size=3),
                   st.integers(0, 10_000))
_kill = st.tuples(st.just("kill"), st.one_of(_append, _texts),
                  st.sampled_from(["rows", "commit", "header", "after"]), st.floats(0, 1, exclude_max=True))
_ops = st.lists(st.one_of(_append, _texts, _kill, st.just(("reopen",))), min_size=1, max_size=8)


def _do_write(cache: EmbeddingCache, model: CacheModel | None, op) -> None:
    """Run an append or texts operation on `cache`; with a model, record it as committed."""
    kind, indices, seed = op
    if kind == "append":
        hashes = [HASHES[i] for i in indices]
        emb = _rows(seed, len(hashes))
        genres = [f"g{seed}"]
        cache.add_posters(hashes, emb, [(PosterRecord(id=f"p-{h}", genres=genres), h) for h in hashes])
        if model is not None:
            model.add_posters(hashes, emb, genres)
    else:
        texts = [TEXTS[i] for i in indices]
        new = set(texts) - set(model.texts) if model is not None else set()
        cache.text_embeddings(texts, backbone=_Encoder(seed))
        if model is not None:
            model.add_texts(texts, _rows(seed, len(new)))


def _killed_files(before: dict[str, bytes], after: dict[str, bytes], matrix: str, phase: str,
                  fraction: float) -> tuple[dict[str, bytes], bool]:
    """The files a writer killed during the write from `before` to `after` leaves, and whether its
    rows were committed. The write order is: .npy rows (fsynced), SQLite commit (WAL), .npy header."""
    old, new = before[matrix], after[matrix]
    tail = new[len(old):]  # the appended rows (the header at the front is rewritten last)
    wal = "index.sqlite-wal"
    wal_before, wal_after = before.get(wal, b""), after.get(wal, b"")
    wal_grew = (len(wal_after) > len(wal_before) and wal_after.startswith(wal_before)
                and before.get("index.sqlite") == after.get("index.sqlite"))
    if phase == "commit" and not wal_grew:
        phase = "rows"  # the WAL was restarted or checkpointed: no torn-append state to model
    if phase == "rows":  # killed while writing the rows: part of the tail, index untouched
        files = dict(before)
        files[matrix] = old + tail[:int(fraction * len(tail))]
        return files, False
    if phase == "commit":  # rows on disk, killed while SQLite appended the transaction to its WAL
        files = dict(after)
        files[matrix] = old + tail
        cut = len(wal_before) + int(fraction * (len(wal_after) - len(wal_before)))
        files[wal] = wal_after[:cut]
        return files, False
    if phase == "header":  # committed, killed before the .npy header was rewritten
        files = dict(after)
        files[matrix] = old[:128] + new[128:]
        return files, True
    return dict(after), True  # killed after the write returned: WAL never checkpointed


@given(ops=_ops, dtype=st.sampled_from(["float16", "float32"]))
def test_cache_keeps_every_committed_row_once_through_kills_and_reopens(ops, dtype):
    model = CacheModel(dtype)
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp) / "c0"
        cache = EmbeddingCache.open_v1(root, _identity(), dtype=dtype)
        try:
            for step, op in enumerate(ops):
                if op[0] == "reopen":
                    cache.close()
                    cache = EmbeddingCache.open_v1(root, _identity())
                elif op[0] == "kill":
                    _, write, phase, fraction = op
                    matrix = "images.npy" if write[0] == "append" else "texts.npy"
                    before = _files(root)
                    trial = CacheModel(dtype)
                    trial.posters, trial.texts = dict(model.posters), dict(model.texts)
                    trial.records = dict(model.records)
                    _do_write(cache, trial, write)
                    after = _files(root)
                    cache.close()
                    files, committed = _killed_files(before, after, matrix, phase, fraction)
                    root = Path(tmp) / f"c{step + 1}"
                    _write_files(root, files)
                    cache = EmbeddingCache.open_v1(root, _identity())
                    if committed:
                        model = trial
                else:
                    _do_write(cache, model, op)
                model.check(cache)
            # Whatever happened, the cache still takes new rows after the committed ones.
            _do_write(cache, model, ("append", list(range(len(HASHES))), 99))
            model.check(cache)
        finally:
            cache.close()


def test_killed_write_model_matches_a_real_torn_tail():
    """The kill model itself: a torn .npy tail past the committed rows is what the cache cuts, so a
    `rows` kill drops the write and a `header` kill keeps it (guards the helper, not the cache)."""
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp) / "c"
        with EmbeddingCache.open_v1(root, _identity()) as cache:
            cache.add_posters(["a"], _rows(0, 1))
            before = _files(root)
            cache.add_posters(["b", "c"], _rows(1, 2))
            after = _files(root)
        files, committed = _killed_files(before, after, "images.npy", "rows", 0.5)
        assert not committed and len(files["images.npy"]) == len(before["images.npy"]) + 2 * DIM
        files, committed = _killed_files(before, after, "images.npy", "header", 0.0)
        assert committed and files["images.npy"][:128] == before["images.npy"][:128]
        assert len(files["images.npy"]) == len(after["images.npy"])


# ========================================================================================= manifest

_text_chars = st.characters(blacklist_categories=("Cs", "Cc"), whitelist_characters="\n\t")
_clean_text = st.text(_text_chars, min_size=1, max_size=20).map(str.strip).filter(bool)
_maybe_text = st.none() | _clean_text
# Genre names as real vocabularies spell them: no list separators, no surrounding spaces.
_genre = st.from_regex(r"[A-Za-zé0-9][A-Za-zé0-9'&. \-]{0,12}[A-Za-zé0-9.]|[A-Za-z]", fullmatch=True)
_file_stem = st.from_regex(r"[A-Za-z0-9_][A-Za-z0-9_ .\-]{0,10}[A-Za-z0-9_]", fullmatch=True)


@st.composite
def _manifest_records(draw):
    ids = draw(st.lists(_clean_text, min_size=1, max_size=6, unique=True))
    records = []
    for record_id in ids:
        records.append(dict(
            id=record_id,
            image=draw(st.tuples(st.sampled_from(["inside", "nested", "outside"]), _file_stem)),
            genres=draw(st.lists(_genre, max_size=4, unique=True)),
            tagline=draw(_maybe_text), overview=draw(_maybe_text), title=draw(_maybe_text),
            split=draw(st.sampled_from((None,) + SPLITS))))
    return records


@given(rows=_manifest_records())
def test_manifest_round_trips_well_formed_records(rows):
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp).resolve()
        folder = tmp / "set"
        places = {"inside": folder / "posters", "nested": folder / "posters" / "a" / "b", "outside": tmp / "elsewhere"}
        records = [PosterRecord(**{**r, "image": str(places[r["image"][0]] / f"{r['image'][1]}.jpg")}) for r in rows]
        path = write_manifest(records, folder / "manifest.csv")
        assert from_manifest(path) == records
        # Moving the folder keeps the posters inside it reachable (their paths are relative).
        moved = shutil.move(str(folder), str(tmp / "moved"))
        back = from_manifest(Path(moved) / path.name)
        for old, new in zip(records, back):
            inside = old.image.startswith(str(folder) + os.sep)
            expected = old.image.replace(str(folder), str(tmp / "moved"), 1) if inside else old.image
            assert new.image == expected and new.id == old.id


# =========================================================================================== genres

def _spellings(names: list[str]) -> dict[str, object]:
    """Every form a genre cell takes in the inputs the sources accept."""
    return {
        "pipe (MovieGenre.csv, synthetic manifests)": "|".join(names),
        "pipe with spaces": " | ".join(names),
        "comma": ",".join(names),
        "comma with spaces": ", ".join(names),
        "JSON list": json.dumps(names),
        "JSON list, non-ASCII kept": json.dumps(names, ensure_ascii=False),
        "Python list": str(names),
        "Python list without spaces": "[" + ",".join(repr(n) for n in names) + "]",
        "padded": "  " + "|".join(names) + " \t",
        "list": list(names),
        "tuple": tuple(names),
        "numpy array (Parquet list column)": np.array(names, dtype=object),
    }


@given(names=st.lists(_genre, max_size=5, unique=True))
def test_every_genre_spelling_parses_to_the_same_list(names):
    for form, cell in _spellings(names).items():
        assert parse_genres(cell) == names, form
    # The Movies Dataset (TMDB) cell: a Python list of {'id', 'name'} dicts.
    tmdb = str([{"id": 10 + i, "name": n} for i, n in enumerate(names)])
    assert _metadata_genres(tmdb) == names


@given(names=st.lists(_genre, min_size=1, max_size=4, unique=True), repeat=st.integers(0, 3))
def test_repeated_genres_are_kept_once_in_first_order(names, repeat):
    cell = "|".join(names + names[:repeat])
    assert parse_genres(cell) == names


@settings(max_examples=10)
@given(names=st.lists(_genre, max_size=4, unique=True))
def test_manifest_genre_column_in_every_spelling(names):
    """The same genres written in each spelling into one manifest column come back equal."""
    cells = {k: v for k, v in _spellings(names).items() if isinstance(v, str)}
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "m.csv"
        pd.DataFrame({"id": list(range(len(cells))), "image": [f"{i}.jpg" for i in range(len(cells))],
                      "genres": list(cells.values())}).to_csv(path, index=False)
        got = from_manifest(path)
        assert [r.genres for r in got] == [names] * len(cells)
