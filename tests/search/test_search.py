"""PosterIndex and the `search` / `duplicates` commands.

Engine tests use caches filled with chosen vectors (fast, and the true answer is known from numpy);
poster tests embed synthetic posters with the tiny backbone.
"""
from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
from PIL import Image

from clipposter.embedding.backbone import BackboneIdentity
from clipposter.embedding.cache import EmbeddingCache
from helpers import run_cli
from clipposter.embedding.embed import embed_records, make_loader
from clipposter.errors import ClipposterError, ConfigError
from clipposter.records import PosterRecord
from clipposter.search.index import GenrePredictions, PosterIndex, resolve_kind


# ------------------------------------------------------------------------------------------------
# helpers
# ------------------------------------------------------------------------------------------------
def unit(x: np.ndarray) -> np.ndarray:
    x = np.asarray(x, dtype=np.float32)
    return x / np.linalg.norm(x, axis=-1, keepdims=True)


def vector_cache(root, vectors, genres=None, start=0, dtype="float16") -> EmbeddingCache:
    """A cache holding the given vectors as posters v<row> (hashes made up, no images)."""
    identity = BackboneIdentity(model="test-vectors", weights="none", image_size=0, mean=(), std=(),
                                interpolation="none", resize_mode="none", embed_dim=vectors.shape[1])
    cache = EmbeddingCache.open(root, identity, dtype=dtype)
    add_vectors(cache, vectors, genres, start)
    return cache


def add_vectors(cache, vectors, genres=None, start=0) -> None:
    hashes = [f"hash{i:08d}" for i in range(start, start + len(vectors))]
    recs = [(PosterRecord(id=f"v{i:05d}", genres=list(genres[i - start]) if genres else []), h)
            for i, h in zip(range(start, start + len(vectors)), hashes)]
    cache.add_posters(hashes, vectors, recs)


def clustered(rng, n, dim, clusters=40, spread=0.35) -> np.ndarray:
    centres = rng.standard_normal((clusters, dim))
    return unit(centres[rng.integers(0, clusters, n)] + spread * rng.standard_normal((n, dim)))


def stored(cache) -> np.ndarray:
    """The vectors as the cache holds them (float16), in float32: what exact search must agree with."""
    return np.asarray(cache.image_matrix(), dtype=np.float32)


def true_topk(cache, queries, k):
    scores = unit(queries) @ stored(cache).T
    order = np.argsort(-scores, axis=1, kind="stable")[:, :k]
    return order, np.take_along_axis(scores, order, axis=1)


def recall(hits, truth) -> float:
    k = truth.shape[1]
    return float(np.mean([len({h.row for h in hs[:k]} & set(t.tolist())) / k for hs, t in zip(hits, truth)]))


# ------------------------------------------------------------------------------------------------
# engines on known vectors
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", ["float16", "float32"])
def test_exact_search_returns_true_topk_single_and_batched(tmp_path, dtype):
    rng = np.random.default_rng(0)
    cache = vector_cache(tmp_path / "c", unit(rng.standard_normal((700, 32))), dtype=dtype)
    index = PosterIndex.build(cache, kind="exact", progress=False)
    assert index.kind == "exact"
    queries = rng.standard_normal((40, 32)).astype(np.float32)
    truth, truth_scores = true_topk(cache, queries, 7)
    # 3 queries take the fused faiss scan, 40 the blocked float32 products: both must be exact.
    for batch in (queries[:3], queries):
        hits = index.search(batch, k=7)
        for hs, t, ts in zip(hits, truth, truth_scores):
            assert [h.row for h in hs] == t.tolist()
            assert [h.id for h in hs] == [f"v{r:05d}" for r in t]
            np.testing.assert_allclose([h.score for h in hs], ts, atol=1e-5)
            scores = [h.score for h in hs]
            assert scores == sorted(scores, reverse=True)


def test_search_by_id_excludes_itself_unless_asked(tmp_path):
    rng = np.random.default_rng(1)
    cache = vector_cache(tmp_path / "c", unit(rng.standard_normal((300, 16))))
    index = PosterIndex.build(cache, kind="exact", progress=False)
    without = index.search_ids(["v00042"], k=5)[0]
    assert "v00042" not in [h.id for h in without] and len(without) == 5
    with_self = index.search_ids(["v00042"], k=5, include_self=True)[0]
    assert with_self[0].id == "v00042" and with_self[0].score == pytest.approx(1.0, abs=1e-3)
    assert [h.id for h in with_self[1:]] == [h.id for h in without[:4]]
    truth, _ = true_topk(cache, stored(cache)[42:43], 6)
    assert [h.row for h in without] == truth[0, 1:].tolist()


def test_auto_kind_is_exact_below_threshold_and_faiss_above(tmp_path):
    rng = np.random.default_rng(2)
    cache = vector_cache(tmp_path / "c", unit(rng.standard_normal((400, 16))))
    assert PosterIndex.build(cache, kind="auto", threshold=1000, progress=False).kind == "exact"
    above = PosterIndex.build(cache, kind="auto", threshold=100, progress=False)
    assert above.kind == "ivfpq" and above.engine.base.ntotal == 400  # a faiss index holds the rows
    assert resolve_kind("auto", 99, 100) == "exact" and resolve_kind("auto", 100, 100) == "ivfpq"
    assert resolve_kind("hnsw", 5, 100) == "hnsw"
    with pytest.raises(ConfigError, match="^kind must be one of auto, exact, hnsw, ivfpq") as err:
        resolve_kind("annoy", 5)
    assert err.value.field == "kind"  # the parameter; the command line names its flag instead


@pytest.mark.parametrize("kind, options, dim", [("hnsw", {}, 32), ("ivfpq", {}, 32), ("ivfpq", {"nlist": 16}, 256)])
def test_approximate_engines_reach_high_recall_on_clustered_data(tmp_path, kind, options, dim):
    rng = np.random.default_rng(3)
    # IVF needs CLIP-like width: in 32 dimensions a far-off query's noise swamps the cluster signal,
    # so no small set of lists holds its neighbours (and the index rightly probes them all).
    vectors = clustered(rng, 3000, dim)
    cache = vector_cache(tmp_path / "c", vectors)
    index = PosterIndex.build(cache, kind=kind, progress=False, **options)
    assert index.kind == kind
    # New queries near existing posters, not the posters themselves.
    queries = unit(vectors[rng.choice(3000, 100)] + 0.1 * rng.standard_normal((100, dim)) / np.sqrt(dim / 32))
    truth, _ = true_topk(cache, queries, 10)
    assert recall(index.search(queries, k=10), truth) >= 0.95
    assert index.meta["tuned_recall_at_10"] >= 0.95
    if options.get("nlist"):
        # clustered data: the IVF partition is kept and only a few lists are probed
        assert index.engine.params["nlist"] == 16 and index.engine.params["nprobe"] < 16


def test_sharded_codes_give_the_same_answers_as_one_shard(tmp_path):
    rng = np.random.default_rng(10)
    vectors = clustered(rng, 2000, 32)
    cache = vector_cache(tmp_path / "c", vectors)
    one = PosterIndex.build(cache, kind="ivfpq", shards=1, progress=False)
    two = PosterIndex.build(cache, kind="ivfpq", shards=2, progress=False)
    assert len(two.engine.parts()) == 2 and two.ntotal == 2000
    queries = unit(vectors[rng.choice(2000, 50)] + 0.1 * rng.standard_normal((50, 32)))
    # The merged PQ candidates of two shards are those of one index (up to ties in quantised scores).
    c1, c2 = one.engine.candidates(queries, 300), two.engine.candidates(queries, 300)
    assert np.mean([len(set(a) & set(b)) / 300 for a, b in zip(c1, c2)]) >= 0.99
    truth, _ = true_topk(cache, queries, 10)
    for batch in (slice(0, 1), slice(None)):  # one query: shards in parallel; a batch: shards in turn
        assert recall(two.search(queries[batch], k=10), truth[batch]) >= \
            recall(one.search(queries[batch], k=10), truth[batch]) - 0.01


def test_ivf_is_dropped_on_data_without_cluster_structure(tmp_path):
    rng = np.random.default_rng(4)
    cache = vector_cache(tmp_path / "c", unit(rng.standard_normal((25_000, 128))))
    index = PosterIndex.build(cache, kind="ivfpq", progress=False)
    assert index.engine.params["nlist"] == 1
    assert any("no cluster structure" in note for note in index.engine.notes)


def test_raw_embedding_queries_are_normalised_and_checked(tmp_path):
    rng = np.random.default_rng(5)
    cache = vector_cache(tmp_path / "c", unit(rng.standard_normal((50, 8))))
    index = PosterIndex.build(cache, kind="exact", progress=False)
    v = stored(cache)[3]
    assert index.search(v * 7.0, k=1)[0][0].id == "v00003"
    with pytest.raises(ClipposterError, match="width 8"):
        index.search(np.ones(9), k=1)
    with pytest.raises(ClipposterError, match="zero"):
        index.search(np.zeros(8), k=1)
    with pytest.raises(ClipposterError, match="k must be"):
        index.search(v, k=0)


def test_genre_filter_by_labels_and_by_predictions(tmp_path):
    rng = np.random.default_rng(6)
    n = 600
    genres = [["Horror"] if i % 5 == 0 else ["Comedy", "Drama"] if i % 2 else ["Drama"] for i in range(n)]
    cache = vector_cache(tmp_path / "c", clustered(rng, n, 16), genres)
    queries = rng.standard_normal((4, 16))
    for kind in ("exact", "hnsw", "ivfpq"):
        index = PosterIndex.build(cache, kind=kind, progress=False)
        for hits in index.search(queries, k=12, genres=["Horror"]):
            assert len(hits) == 12 and all(h.genres == ["Horror"] for h in hits)
        # several genres: all required; the exact answer among allowed rows
        both = index.search(queries[:1], k=5, genres=["comedy", "Drama"])[0]
        allowed = np.array([i for i in range(n) if "Comedy" in genres[i]])
        scores = unit(queries[:1]) @ stored(cache)[allowed].T
        best = allowed[np.argsort(-scores[0])[:5]]
        assert [h.row for h in both] == best.tolist()
    # predicted genres (e.g. from a genre head) instead of labels: Sci-Fi predicted on rows 0..99
    probs = np.zeros((n, 2), np.float32)
    probs[:100, 0] = 0.9
    probs[:, 1] = 0.8
    predicted = GenrePredictions(probs, ["Sci-Fi", "Drama"], threshold=0.5)
    hits = index.search(queries[:1], k=10, genres=["Sci-Fi"], predicted=predicted)[0]
    assert len(hits) == 10 and all(h.row < 100 and h.predicted_genres == ["Drama", "Sci-Fi"] for h in hits)
    with pytest.raises(ClipposterError, match="Western"):
        index.search(queries[:1], k=3, genres=["Western"])
    # Genres belong to ids, not rows: a second id on poster 5's row (same file) labelled Western.
    cache.upsert_records([(PosterRecord(id="twin-of-5", genres=["Western"]), "hash00000005")])
    twin = PosterIndex.build(cache, kind="exact", progress=False)
    western = twin.search(queries[:1], k=5, genres=["Western"])[0]
    assert [h.id for h in western] == ["twin-of-5"] and western[0].row == 5
    horror = twin.search(stored(cache)[5], k=3, genres=["Horror"])[0]
    assert horror[0].id == "v00005" and "twin-of-5" not in [h.id for h in horror]
    with pytest.raises(ClipposterError, match="rows"):
        index.search(queries[:1], k=3, genres=["Drama"], predicted=GenrePredictions(probs[:10], ["Sci-Fi", "Drama"]))


@pytest.mark.parametrize("kind, options", [("exact", {}), ("hnsw", {}), ("ivfpq", {}), ("ivfpq", {"shards": 2})])
def test_saved_index_reloads_and_extends_with_new_posters(tmp_path, kind, options):
    rng = np.random.default_rng(7)
    vectors = clustered(rng, 1200, 16)
    cache = vector_cache(tmp_path / "c", vectors[:1000])
    first = PosterIndex.open(cache, kind=kind, progress=False, **options)
    assert (tmp_path / "c" / "index" / "index.json").exists()
    probe = first.search(vectors[:3], k=5)
    again = PosterIndex.load(cache, progress=False)
    assert again is not None and again.kind == kind and again.ntotal == 1000
    assert [[h.id for h in hs] for hs in again.search(vectors[:3], k=5)] == [[h.id for h in hs] for hs in probe]

    add_vectors(cache, vectors[1000:], start=1000)
    grown = PosterIndex.open(cache, kind=kind, progress=False)
    assert grown.kind == kind and grown.ntotal == 1200 and grown.meta["added_rows"] == 200
    hit = grown.search(stored(cache)[1100], k=1)[0][0]
    assert hit.id == "v01100"
    if kind == "ivfpq":
        assert any("no retraining" in note for note in grown.engine.notes)
        # new rows go to the last shard, so row ids stay successive across shards
        sizes = [p.ntotal for p in grown.engine.parts()]
        assert len(sizes) == options.get("shards", 1) and sizes[-1] == 1200 - sum(sizes[:-1])
    state = json.loads((tmp_path / "c" / "index" / "index.json").read_text())
    assert state["posters"] == 1200
    # the saved state now covers the new rows: a further open adds nothing
    assert PosterIndex.open(cache, kind=kind, progress=False).meta.get("added_rows", 0) == 0


def test_index_is_rebuilt_when_the_cache_changed_or_the_kind_does(tmp_path):
    rng = np.random.default_rng(8)
    cache_a = vector_cache(tmp_path / "a", unit(rng.standard_normal((500, 16))))
    PosterIndex.open(cache_a, kind="hnsw", progress=False)
    # The same index files beside another cache with other vectors: the fingerprint no longer matches.
    cache_b = vector_cache(tmp_path / "b", unit(rng.standard_normal((500, 16))))
    shutil.copytree(tmp_path / "a" / "index", tmp_path / "b" / "index")
    assert PosterIndex.load(cache_b, progress=False) is None
    rebuilt = PosterIndex.open(cache_b, kind="hnsw", progress=False)
    assert rebuilt.search(stored(cache_b)[7], k=1)[0][0].id == "v00007"
    assert "loaded_from" not in rebuilt.meta
    # Asking for another kind rebuilds; a damaged faiss file is rebuilt rather than trusted.
    assert PosterIndex.open(cache_b, kind="exact", progress=False).kind == "exact"
    PosterIndex.open(cache_b, kind="ivfpq", progress=False)
    (tmp_path / "b" / "index" / "rows.0.faiss").write_bytes(b"garbage")
    assert PosterIndex.open(cache_b, kind="ivfpq", progress=False).ntotal == 500


def test_duplicates_exact_and_through_the_index_agree(tmp_path):
    rng = np.random.default_rng(9)
    vectors = clustered(rng, 800, 32, clusters=80, spread=0.6)
    vectors[10] = unit(vectors[3] + 0.02 * rng.standard_normal(32))  # a near copy of v00003
    cache = vector_cache(tmp_path / "c", vectors)
    exact = PosterIndex.build(cache, kind="exact", progress=False).duplicates(0.98, progress=False)
    s = stored(cache)
    sims = s @ s.T
    want = {(f"v{a:05d}", f"v{b:05d}") for a, b in zip(*np.nonzero(np.triu(sims >= 0.98, 1)))}
    assert {(p.id_a, p.id_b) for p in exact} == want and ("v00003", "v00010") in want
    for kind in ("hnsw", "ivfpq"):
        ann = PosterIndex.build(cache, kind=kind, progress=False).duplicates(0.98, exact=False, progress=False)
        assert {(p.id_a, p.id_b) for p in ann} == want
        for p in ann:
            assert p.score == pytest.approx(sims[int(p.id_a[1:]), int(p.id_b[1:])], abs=1e-5)
    with pytest.raises(ClipposterError, match="threshold"):
        PosterIndex.build(cache, kind="exact", progress=False).duplicates(1.5)


def test_exact_search_works_without_faiss_and_the_rest_says_what_is_missing(tmp_path, monkeypatch):
    import sys

    rng = np.random.default_rng(11)
    cache = vector_cache(tmp_path / "c", unit(rng.standard_normal((200, 16))))
    monkeypatch.setitem(sys.modules, "faiss", None)  # faiss is an optional extra: import now fails
    index = PosterIndex.open(cache, progress=False).warm()
    assert index.kind == "exact"
    queries = rng.standard_normal((2, 16))
    truth, _ = true_topk(cache, queries, 3)
    assert [[h.row for h in hs] for hs in index.search(queries, k=3)] == truth.tolist()
    assert index.search_ids(["v00005"], k=2, genres=None)[0][0].id != "v00005"
    with pytest.raises(ClipposterError, match="faiss"):
        PosterIndex.build(cache, kind="ivfpq", progress=False)


def test_empty_cache_is_a_clear_error(tmp_path):
    cache = vector_cache(tmp_path / "c", np.zeros((0, 8), np.float32))
    with pytest.raises(ClipposterError, match="no posters"):
        PosterIndex.build(cache, progress=False)


# ------------------------------------------------------------------------------------------------
# real posters through the tiny backbone
# ------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def poster_cache(tmp_path_factory, synthetic_set, tiny_backbone):
    """The synthetic posters plus an exact copy (same file, another id) and a re-encoded JPEG copy,
    embedded with the tiny backbone; the last 20 synthetic posters are held back for extension tests."""
    src, records = synthetic_set
    root = tmp_path_factory.mktemp("search")
    near = root / "near-copy.jpg"
    Image.open(records[1].image).save(near, format="JPEG", quality=75)  # new bytes, same picture
    extra = [PosterRecord(id="copy-of-0", image=records[0].image, genres=list(records[0].genres)),
             PosterRecord(id="near-copy-of-1", image=str(near), genres=list(records[1].genres))]
    cache = EmbeddingCache.open(root / "cache", tiny_backbone.identity, backbone_spec=tiny_backbone.spec)
    summary = embed_records(records[:100] + extra, cache, tiny_backbone, progress=False)
    assert summary.skipped == 0
    return cache, records, root


def test_duplicates_find_exact_and_near_copies_of_real_posters(poster_cache):
    cache, records, _ = poster_cache
    index = PosterIndex.build(cache, kind="exact", progress=False)
    s = stored(cache)
    sims = s @ s.T
    orig, near = index.row_of(records[1].id), index.row_of("near-copy-of-1")
    # The tiny random-weight backbone puts all synthetic posters close together (median cosine ~0.95,
    # the closest unrelated pair ~0.9998), so only a very high threshold separates the re-encoded
    # JPEG (cosine ~0.99999 to its original) from unrelated posters.
    threshold = 0.9999
    assert sims[orig, near] >= threshold
    unrelated = sims.copy()
    np.fill_diagonal(unrelated, -1)
    unrelated[orig, near] = unrelated[near, orig] = -1
    assert unrelated.max() < threshold
    pairs = index.duplicates(threshold, progress=False)
    assert [(p.id_a, p.id_b) for p in pairs] == [tuple(sorted((records[0].id, "copy-of-0"))),
                                                 tuple(sorted((records[1].id, "near-copy-of-1")))]
    # same content → one row, score 1.0 by definition; the re-encoded copy is its own row
    assert pairs[0].score == 1.0 and index.row_of(records[0].id) == index.row_of("copy-of-0")
    assert pairs[1].score >= threshold and orig != near


def test_text_query_with_tiny_backbone(poster_cache, tiny_backbone):
    cache, _, _ = poster_cache
    index = PosterIndex.build(cache, kind="exact", progress=False)
    hits = index.search_text(["a dark horror movie", "a bright comedy"], k=5, backbone=tiny_backbone)
    assert [len(h) for h in hits] == [5, 5]
    text = tiny_backbone.encode_texts(["a dark horror movie"])[0]
    truth = np.argsort(-(stored(cache) @ text))
    rows = [h.row for h in hits[0]]
    # rows in score order; ids on one row (the exact copy) are listed once each
    assert rows == sorted(rows, key=lambda r: -(stored(cache)[r] @ text))
    assert rows[0] == truth[0]
    with pytest.raises(ClipposterError, match="empty"):
        index.search_text([" "], backbone=tiny_backbone)


def test_image_query_of_cached_and_uncached_posters(poster_cache, tiny_backbone, tmp_path):
    cache, records, _ = poster_cache
    index = PosterIndex.build(cache, kind="exact", progress=False)
    before = tiny_backbone.image_forward_passes
    own = index.search_image([records[5].image], k=3, include_self=True, backbone=tiny_backbone)[0]
    assert own[0].id == records[5].id and own[0].score == pytest.approx(1.0, abs=1e-3)
    assert tiny_backbone.image_forward_passes == before  # cached by content: no model work
    # Without self-inclusion, every id with exactly that content is left out (the copy of poster 0 too).
    others = index.search_image([records[0].image], k=3, backbone=tiny_backbone)[0]
    assert not {h.id for h in others} & {records[0].id, "copy-of-0"}

    # An uncached poster (one held back from the cache) is encoded on the fly, here through the
    # backbone recorded in the cache (load_backbone_like), and matches encoding it directly.
    outsider = records[110].image
    vecs, same, cached = index.embed_images([outsider])
    assert cached == [False] and same == [[]]
    direct = tiny_backbone.encode_image_tensors(make_loader(tiny_backbone)(outsider)[None])[0]
    np.testing.assert_allclose(vecs[0], direct, atol=1e-5)
    hits = index.search_image([outsider], k=4)[0]
    assert len(hits) == 4
    np.testing.assert_allclose([h.score for h in hits], [float(stored(cache)[h.row] @ direct) for h in hits],
                               atol=2e-3)
    with pytest.raises(ClipposterError, match="nope.jpg"):
        index.search_image([str(tmp_path / "nope.jpg")], backbone=tiny_backbone)


def test_index_extends_after_more_posters_are_embedded(poster_cache, tiny_backbone, tmp_path):
    cache, records, root = poster_cache
    work = tmp_path / "cache"
    shutil.copytree(cache.root, work)  # the module's cache stays as it is for the other tests
    copy = EmbeddingCache.open(work)
    first = PosterIndex.open(copy, kind="auto", threshold=50, progress=False)
    assert first.kind == "ivfpq" and first.ntotal == 101
    embed_records(records[100:], copy, tiny_backbone, progress=False)
    grown = PosterIndex.open(copy, kind="auto", threshold=50, progress=False)
    assert grown.ntotal == 121 and grown.meta["added_rows"] == 20 and "loaded_from" in grown.meta
    assert grown.search_ids([records[115].id], k=1, include_self=True)[0][0].id == records[115].id


# ------------------------------------------------------------------------------------------------
# command line
# ------------------------------------------------------------------------------------------------
def test_cli_bad_exact_threshold_names_its_flag(poster_cache, capsys):
    cache, records, _ = poster_cache
    for command in (["search", "--id", records[0].id], ["duplicates"]):
        code, out, err = run_cli(capsys, *command, "--cache", cache.root, "--exact-threshold", "-1")
        assert code == 2 and out == ""
        assert err.startswith("error: --exact-threshold must be a non-negative number of posters"), err


def test_cli_search_and_duplicates_json(poster_cache, capsys):
    cache, records, _ = poster_cache
    code, out, _ = run_cli(capsys, "search", "--cache", cache.root, "--id", records[2].id, "-k", "4", "--json")
    assert code == 0
    payload = json.loads(out)
    assert payload["query"] == {"type": "id", "value": records[2].id} and payload["index"]["kind"] == "exact"
    scores = [r["score"] for r in payload["results"]]
    assert len(scores) == 4 and scores == sorted(scores, reverse=True)
    assert records[2].id not in [r["id"] for r in payload["results"]]

    code, out, _ = run_cli(capsys, "search", "--cache", cache.root, "--image", records[2].image, "-k", "2",
                           "--include-self", "--json")
    assert code == 0 and json.loads(out)["results"][0]["id"] == records[2].id

    code, out, _ = run_cli(capsys, "search", "--cache", cache.root, "--text", "a western", "-k", "3",
                           "--genre", records[3].genres[0], "--json")
    assert code == 0
    results = json.loads(out)["results"]
    assert len(results) == 3 and all(records[3].genres[0] in r["genres"] for r in results)

    code, out, _ = run_cli(capsys, "search", "--cache", cache.root, "--id", records[2].id, "-k", "2")
    assert code == 0 and out.splitlines()[1].lstrip().startswith("1  ")

    code, out, _ = run_cli(capsys, "duplicates", "--cache", cache.root, "--threshold", "0.9999", "--json")
    assert code == 0
    payload = json.loads(out)
    pairs = [(p["id_a"], p["id_b"]) for p in payload["pairs"]]
    assert pairs == [tuple(sorted((records[0].id, "copy-of-0"))), tuple(sorted((records[1].id, "near-copy-of-1")))]
    assert payload["pairs_found"] == 2 and payload["pairs"][0]["score"] == 1.0
    code, out, _ = run_cli(capsys, "duplicates", "--cache", cache.root, "--threshold", "0.9999")
    assert code == 0 and out.startswith("2 pairs") and "(same file)" in out


@pytest.mark.parametrize("argv, needle", [
    (["search", "--id", "no-such-poster"], "no-such-poster"),
    (["search"], "no query given"),
    (["search", "--id", "x", "--text", "y"], "give one query"),
    (["search", "--text", "t", "-k", "0"], "-k must be"),
    (["search", "--text", "t", "--genre", "Noir"], "Noir"),
    (["duplicates", "--threshold", "1.5"], "--threshold"),
    (["duplicates", "--threshold", "abc"], "--threshold"),
    (["duplicates", "--threshold", "0"], "--threshold"),
])
def test_cli_errors_are_one_line(poster_cache, capsys, argv, needle):
    cache, _, _ = poster_cache
    code, out, err = run_cli(capsys, argv[0], "--cache", cache.root, *argv[1:])
    assert code == 2 and out == ""
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error:") and needle in lines[0]


def test_cli_missing_cache_is_one_line(tmp_path, capsys):
    code, _, err = run_cli(capsys, "search", "--cache", tmp_path / "none", "--text", "x")
    assert code == 2 and err.strip().startswith("error:") and len(err.strip().splitlines()) == 1


# ------------------------------------------------------------------------------------------------
# text search returns posters of the queried genre
# ------------------------------------------------------------------------------------------------
GENRE_SHARES = {"Drama": 0.40, "Comedy": 0.25, "Horror": 0.15, "Western": 0.12, "Sci-Fi": 0.08}


def genre_prompt(genre: str) -> str:
    return f"a {genre} movie poster"


@pytest.fixture(scope="module")
def genre_aligned_cache(tmp_path_factory, tiny_backbone):
    """The tiny backbone is random, so text and images are not aligned; here the answer is made known:
    each poster's embedding is the backbone's text embedding of "a <its genre> movie poster" plus
    noise. Genres are unbalanced (Drama 40 % … Sci-Fi 8 %), so a search blind to the query would
    return posters of the queried genre at about the genre's share."""
    rng = np.random.default_rng(11)
    n = 250
    names = list(GENRE_SHARES)
    labels = rng.permutation(np.repeat(names, [round(GENRE_SHARES[g] * n) for g in names]))
    prompts = tiny_backbone.encode_texts([genre_prompt(g) for g in names])
    # The prompt embeddings of the random backbone are close (cosine up to ~0.97), so the noise
    # (norm ~0.2) is smaller than the gaps between them, yet every poster is a different vector.
    vectors = unit(prompts[[names.index(g) for g in labels]] + 0.025 * rng.standard_normal((n, prompts.shape[1])))
    cache = EmbeddingCache.open(tmp_path_factory.mktemp("aligned") / "cache", tiny_backbone.identity,
                                backbone_spec=tiny_backbone.spec)
    hashes = [f"aligned{i:06d}" for i in range(n)]
    cache.add_posters(hashes, vectors, [(PosterRecord(id=f"p{i:03d}", genres=[g]), h)
                                        for i, (g, h) in enumerate(zip(labels, hashes))])
    shares = {g: float(np.mean(labels == g)) for g in names}
    return cache, shares


def precision_at_10(genre: str, genres_of_hits: list[list[str]]) -> float:
    assert len(genres_of_hits) == 10
    return sum(genre in gs for gs in genres_of_hits) / 10


def test_text_search_returns_posters_of_the_queried_genre(genre_aligned_cache, tiny_backbone):
    cache, shares = genre_aligned_cache
    index = PosterIndex.build(cache, kind="exact", progress=False)
    genres = list(shares)
    hits = index.search_text([genre_prompt(g) for g in genres], k=10, backbone=tiny_backbone)
    for genre, hs in zip(genres, hits):
        p = precision_at_10(genre, [h.genres for h in hs])
        # a ranking blind to the query scores the genre's share (8 % to 40 %) on average
        assert p >= 0.9 and p >= shares[genre] + 0.5, (genre, p, shares[genre])


def test_cli_text_search_returns_posters_of_the_queried_genre(genre_aligned_cache, capsys):
    cache, shares = genre_aligned_cache
    for genre in shares:
        code, out, err = run_cli(capsys, "search", "--cache", cache.root, "--text", genre_prompt(genre),
                                 "-k", "10", "--device", "cpu", "--json")
        assert code == 0, err
        results = json.loads(out)["results"]
        p = precision_at_10(genre, [r["genres"] for r in results])
        assert p >= 0.9 and p >= shares[genre] + 0.5, (genre, p, shares[genre])


def test_cli_duplicates_shows_50_pairs_by_default_with_titles(poster_cache, capsys):
    """Thousands of pairs are not a screenful: 50 by default, --limit 0 for all, and each id beside the
    title the cache's record gives it (in the table and in --json)."""
    cache, records, _ = poster_cache
    titles = {r.id: r.title for r in records}
    code, out, _ = run_cli(capsys, "duplicates", "--cache", cache.root, "--threshold", "0.9", "--limit", "0",
                           "--json")
    assert code == 0
    payload = json.loads(out)
    every = payload["pairs"]
    assert payload["pairs_found"] == len(every) > 50
    for p in every:
        assert (p["title_a"], p["title_b"]) == (titles.get(p["id_a"]), titles.get(p["id_b"]))
    assert sum(p["title_a"] is not None for p in every) > 50  # synthetic posters have titles

    code, out, _ = run_cli(capsys, "duplicates", "--cache", cache.root, "--threshold", "0.9")
    assert code == 0
    lines = out.splitlines()
    assert lines[0].startswith(f"{len(every)} pairs at cosine ≥ 0.9")
    rows = [line for line in lines[1:] if not line.lstrip().startswith("...")]
    assert len(rows) == 50
    assert lines[-1] == f"  ... {len(every) - 50} more pairs (--limit 0 shows all)"
    for row, p in zip(rows, every):
        assert row.split()[0] == f"{p['score']:.4f}"
        for pid in (p["id_a"], p["id_b"]):
            assert pid in row and (titles.get(pid) is None or titles[pid] in row)

    code, out, _ = run_cli(capsys, "duplicates", "--cache", cache.root, "--threshold", "0.9", "--json")
    assert code == 0
    default = json.loads(out)
    assert default["pairs"] == every[:50] and default["pairs_found"] == len(every)

    code, out, _ = run_cli(capsys, "duplicates", "--cache", cache.root, "--threshold", "0.9", "--limit", "3")
    assert code == 0 and len(out.splitlines()) == 1 + 3 + 1
