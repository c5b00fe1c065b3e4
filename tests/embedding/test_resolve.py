"""resolve_posters: the one "cached embedding, or encode the file" path, checked against encoding
each file directly and against the cache's own rows."""
from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from clipposter.embedding.cache import EmbeddingCache
from clipposter.embedding.embed import embed_records, make_loader, resolve_posters
from clipposter.errors import ClipposterError, ConfigError, PosterError
from clipposter.records import PosterRecord
from helpers import count_opens


@pytest.fixture(scope="module")
def small_cache(tmp_path_factory, synthetic_set, tiny_backbone):
    """The first 10 synthetic posters embedded; poster 10 on is never cached."""
    _, records = synthetic_set
    cache = EmbeddingCache.open(tmp_path_factory.mktemp("resolve") / "cache", tiny_backbone.identity,
                                backbone_spec=tiny_backbone.spec)
    embed_records([PosterRecord.from_dict(r.to_dict()) for r in records[:10]], cache, tiny_backbone,
                  progress=False)
    return cache, records


def encoded_directly(backbone, path) -> np.ndarray:
    return backbone.encode_image_tensors(make_loader(backbone)(path)[None])[0]


def test_cached_posters_come_from_the_cache_and_new_ones_are_encoded(small_cache, tiny_backbone, tmp_path,
                                                                     monkeypatch):
    cache, records = small_cache
    bad = tmp_path / "broken.jpg"
    bad.write_bytes(b"\xff\xd8 not a jpeg")
    posters = [records[3].image, records[12].image, str(bad), str(tmp_path / "missing.jpg"), records[0].image,
               records[13].image]
    opens = count_opens(monkeypatch, posters)
    before = tiny_backbone.image_forward_passes
    got = resolve_posters(posters, cache=cache, backbone=tiny_backbone, batch_size=4)
    assert [p.source for p in got] == ["cache", "encoded", "", "", "cache", "encoded"]
    assert (got.from_cache, got.encoded) == (2, 2)
    # the two uncached posters went through the model in one batch each (batches of 4 arguments)
    assert tiny_backbone.image_forward_passes - before == 2
    # every file was opened exactly once: read, hashed and (when new) decoded from the same bytes
    assert all(n == 1 for p, n in opens.items() if not p.endswith("missing.jpg")), opens
    monkeypatch.undo()

    rows = cache.rows_for_ids([records[3].id, records[0].id])
    np.testing.assert_array_equal(got[0].embedding, np.asarray(cache.image_matrix()[rows[0]], np.float32))
    np.testing.assert_array_equal(got[4].embedding, np.asarray(cache.image_matrix()[rows[1]], np.float32))
    assert (got[0].row, got[4].row) == tuple(rows.tolist())
    for i, n in ((1, 12), (5, 13)):
        assert got[i].row is None and got[i].embedding.dtype == np.float32
        np.testing.assert_allclose(got[i].embedding, encoded_directly(tiny_backbone, records[n].image), atol=1e-5)
    assert [p for p, _ in got.failed] == [str(bad), str(tmp_path / "missing.jpg")]
    assert "corrupt" in got[2].error or "not an image" in got[2].error
    assert "cannot read file" in got[3].error
    np.testing.assert_array_equal(got.embeddings(), np.stack([got[i].embedding for i in (0, 1, 4, 5)]))
    with pytest.raises(PosterError, match="broken.jpg"):
        got.raise_first_failure()


def test_the_backbone_is_loaded_only_when_a_poster_needs_it(small_cache, tiny_backbone):
    cache, records = small_cache
    loads = []

    def load():
        loads.append(1)
        return tiny_backbone

    got = resolve_posters([r.image for r in records[:4]], cache=cache, backbone=load)
    assert loads == [] and got.from_cache == 4
    got = resolve_posters([records[1].image, records[20].image, records[21].image], cache=cache, backbone=load)
    assert loads == [1] and [p.source for p in got] == ["cache", "encoded", "encoded"]
    # no backbone at all: uncached posters fail one by one, cached ones still resolve
    got = resolve_posters([records[1].image, records[20].image], cache=cache)
    assert [p.source for p in got] == ["cache", ""] and "no backbone" in got[1].error


def test_poster_ids_resolve_through_the_cache_when_asked(small_cache, tiny_backbone):
    cache, records = small_cache
    got = resolve_posters([records[2].id, records[2].image, "no-such-id"], cache=cache, backbone=tiny_backbone,
                          ids=True)
    assert [p.source for p in got] == ["cache", "cache", ""]
    np.testing.assert_array_equal(got[0].embedding, got[1].embedding)
    assert got[2].error == "not an image file nor a poster id in the cache"
    # without ids=True an id is just a missing file
    got = resolve_posters([records[2].id], cache=cache, backbone=tiny_backbone)
    assert "cannot read file" in got[0].error
    # no cache: files are encoded, anything else is not an image file
    got = resolve_posters([records[2].image, "no-such-id"], backbone=tiny_backbone, ids=True)
    assert [p.source for p in got] == ["encoded", ""] and got.dim == tiny_backbone.embed_dim
    np.testing.assert_allclose(got[0].embedding, resolve_posters([records[2].id], cache=cache, ids=True)[0].embedding,
                               atol=2e-3)  # the cache stores float16


def test_a_backbone_of_another_identity_or_bad_settings_are_refused(small_cache, tiny_backbone):
    cache, records = small_cache

    class Other:
        identity = dataclasses.replace(tiny_backbone.identity, weights="sha256:" + "0" * 64)

        def encode_image_tensors(self, pixels):
            raise AssertionError("never called")

    with pytest.raises(ClipposterError, match="backbone"):
        resolve_posters([records[0].image], cache=cache, backbone=Other())
    # a lazily loaded backbone is checked when it is loaded
    with pytest.raises(ClipposterError, match="backbone"):
        resolve_posters([records[30].image], cache=cache, backbone=Other)
    with pytest.raises(ConfigError, match="^batch_size must be at least 1") as err:
        resolve_posters([records[0].image], cache=cache, batch_size=0)
    assert err.value.field == "batch_size"
    with pytest.raises(ConfigError) as err:
        resolve_posters([records[0].image])
    assert err.value.field == "backbone"
    assert len(resolve_posters([], cache=cache)) == 0 and resolve_posters([], cache=cache).embeddings().shape == (
        0, cache.dim)
