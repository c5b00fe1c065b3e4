"""PosterAnalyzer.analyze_files: cached posters by content, new ones encoded, each upload read once.

The heads are stand-ins (the analyzer only routes embeddings to them); the cache, the index and the
backbone are real."""
from __future__ import annotations

import os
from types import SimpleNamespace

import numpy as np
import pytest

from clipposter.analysis import PosterAnalyzer
from clipposter.embedding.cache import EmbeddingCache
from clipposter.embedding.embed import embed_records, make_loader
from clipposter.errors import ClipposterError
from clipposter.records import PosterRecord
from clipposter.search.index import PosterIndex
from helpers import count_opens


class StandInGenreHead:
    genres = ["Drama", "Comedy"]

    def check_backbone(self, identity, what):
        pass

    def predict_proba(self, vectors):
        self.seen = np.array(vectors)
        return np.full((len(vectors), 2), 0.5, np.float32)

    def describe_predictions(self, paths, probs, sources, threshold):
        return [SimpleNamespace(probabilities=dict(zip(self.genres, p)), predicted=list(self.genres)) for p in probs]


class StandInCaptionHead:
    def check_backbone(self, identity, what):
        pass

    def generate(self, vectors, decoding):
        return [[SimpleNamespace(text=f"poster {i}")] for i in range(len(vectors))]


@pytest.fixture(scope="module")
def analyzed_cache(tmp_path_factory, synthetic_set, tiny_backbone):
    _, records = synthetic_set
    root = tmp_path_factory.mktemp("analysis")
    cache = EmbeddingCache.open(root / "cache", tiny_backbone.identity, backbone_spec=tiny_backbone.spec)
    copy = PosterRecord(id="copy-of-0", image=records[0].image, genres=list(records[0].genres))
    embed_records([PosterRecord.from_dict(r.to_dict()) for r in records[:12]] + [copy], cache, tiny_backbone,
                  progress=False)
    return cache, records


def analyzer(cache, backbone=None) -> PosterAnalyzer:
    return PosterAnalyzer(cache, StandInGenreHead(), StandInCaptionHead(),
                          PosterIndex.build(cache, kind="exact", progress=False), backbone=backbone)


def test_each_upload_is_read_once_and_cached_ones_use_the_cache(analyzed_cache, tiny_backbone, monkeypatch):
    cache, records = analyzed_cache
    a = analyzer(cache, backbone=tiny_backbone)
    uploads = [records[0].image, records[20].image]
    opens = count_opens(monkeypatch, uploads)
    before = tiny_backbone.image_forward_passes
    cached, fresh = a.analyze_files(uploads, k=3)
    monkeypatch.undo()
    assert opens == {os.path.abspath(p): 1 for p in uploads}
    assert tiny_backbone.image_forward_passes - before == 1  # only the new poster went through the model
    assert (cached.source, fresh.source) == ("cache", "encoded")
    # the cached file takes its record, and its neighbours leave out every id with that content
    assert cached.id in (records[0].id, "copy-of-0") and cached.genres == list(records[0].genres)
    assert not {h.id for h in cached.neighbours} & {records[0].id, "copy-of-0"}
    assert fresh.id is None and fresh.genres == [] and len(fresh.neighbours) == 3
    direct = tiny_backbone.encode_image_tensors(make_loader(tiny_backbone)(records[20].image)[None])[0]
    np.testing.assert_allclose(a.genre_head.seen[1], direct, atol=1e-5)
    np.testing.assert_array_equal(a.genre_head.seen[0], cache.embeddings_for_ids([records[0].id])[0])


def test_cached_uploads_never_load_the_backbone_and_bad_files_are_one_line(analyzed_cache, tmp_path):
    cache, records = analyzed_cache
    a = analyzer(cache)
    [result] = a.analyze_files([records[5].image], k=0)
    assert result.source == "cache" and result.id == records[5].id and a._backbone is None
    bad = tmp_path / "upload.png"
    bad.write_bytes(b"")
    with pytest.raises(ClipposterError, match=r"upload\.png: empty file .*; upload a JPEG, PNG or WebP poster"):
        a.analyze_files([records[5].image, bad])
    assert a._backbone is None


class StandInTokenGenreHead(StandInGenreHead):
    memory = "tokens"


def test_a_token_genre_head_is_given_token_sequences_from_the_cache_or_the_file(tmp_path, synthetic_set,
                                                                                tiny_backbone):
    from clipposter.errors import ConfigError

    _, records = synthetic_set
    cache = EmbeddingCache.open(tmp_path / "t", tiny_backbone.identity, backbone_spec=tiny_backbone.spec)
    embed_records([PosterRecord.from_dict(r.to_dict()) for r in records[:6]], cache, tiny_backbone,
                  progress=False, tokens=True)
    head = StandInTokenGenreHead()
    a = PosterAnalyzer(cache, head, StandInCaptionHead(), PosterIndex.build(cache, kind="exact", progress=False),
                       backbone=tiny_backbone)
    a.analyze_ids([records[1].id, records[4].id], k=0)
    np.testing.assert_array_equal(head.seen, cache.tokens_for_ids([records[1].id, records[4].id]))
    # a cached file and a new one: the cache's tokens, and the new file's encoded ones
    result = a.analyze_files([records[2].image, records[7].image], k=0)
    assert [r.source for r in result] == ["cache", "encoded"]
    assert head.seen.shape == (2, 65, 64)
    np.testing.assert_allclose(head.seen[0], cache.tokens_for_ids([records[2].id])[0].astype(np.float32))
    load = make_loader(tiny_backbone)
    import torch

    _, ref = tiny_backbone.encode_image_tokens(torch.stack([load(records[7].image)]))
    np.testing.assert_allclose(head.seen[1], ref[0], atol=1e-5)
    # On a cache without token sequences the analyzer refuses at once, in one line naming the memory.
    plain = EmbeddingCache.open(tmp_path / "p", tiny_backbone.identity, backbone_spec=tiny_backbone.spec)
    embed_records([PosterRecord.from_dict(r.to_dict()) for r in records[:3]], plain, tiny_backbone, progress=False)
    with pytest.raises(ConfigError) as err:
        PosterAnalyzer(plain, StandInTokenGenreHead(), StandInCaptionHead(),
                       PosterIndex.build(plain, kind="exact", progress=False))
    assert err.value.field == "memory" and "\n" not in str(err.value)
