"""EmbeddingCache.iter_embeddings: the chunked reader that builds a search index without mapping the whole file."""
from __future__ import annotations

import numpy as np
import pytest

from clipposter.embedding.backbone import BackboneIdentity
from clipposter.embedding.cache import EmbeddingCache
from clipposter.records import PosterRecord


def _cache(root, vectors) -> EmbeddingCache:
    identity = BackboneIdentity(model="test-vectors", weights="none", image_size=0, mean=(), std=(),
                                interpolation="none", resize_mode="none", embed_dim=vectors.shape[1])
    cache = EmbeddingCache.open(root, identity, dtype="float16")
    hashes = [f"h{i}" for i in range(len(vectors))]
    cache.add_posters(hashes, vectors, [(PosterRecord(id=f"p{i}"), h) for i, h in enumerate(hashes)])
    return cache


@pytest.mark.parametrize("chunk, start, stop", [(7, 0, None), (1000, 0, None), (5, 3, 41), (4, 12, 12)])
def test_chunks_cover_exactly_the_rows_asked_for_in_the_stored_dtype(tmp_path, chunk, start, stop):
    rng = np.random.default_rng(0)
    cache = _cache(tmp_path / "c", rng.standard_normal((50, 8)).astype(np.float32))
    whole = np.asarray(cache.image_matrix())
    starts, parts = [], []
    for s, block in cache.iter_embeddings(chunk, start, stop):
        assert block.dtype == np.float16 and 0 < len(block) <= chunk
        assert not isinstance(block, np.memmap)  # a copy: the map is released before the next chunk
        starts.append(s)
        parts.append(block)
    end = 50 if stop is None else stop
    assert starts == list(range(start, end, chunk))
    got = np.concatenate(parts) if parts else np.zeros((0, 8), np.float16)
    np.testing.assert_array_equal(got, whole[start:end])


def test_a_failed_append_whose_cut_also_fails_still_reports_the_full_disk_in_one_line(tmp_path, monkeypatch):
    """A full disk fails the append; cutting the partial rows may then fail too (the disk is still full).
    The user gets the append's one-line error, and the next writer's open cuts the tail."""
    import builtins
    import errno

    import numpy as np

    from clipposter.embedding.cache_matrix import Matrix
    from clipposter.errors import ClipposterError

    m = Matrix(tmp_path, "images.npy", 4, np.float16)
    m.create()
    m.append(0, np.ones((2, 4), np.float16))
    real_open = builtins.open

    def full(path, *args, **kwargs):
        if str(path) == str(m.path):
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_open(path, *args, **kwargs)

    monkeypatch.setattr(builtins, "open", full)
    with pytest.raises(ClipposterError) as err:
        m.append(2, np.ones((3, 4), np.float16))
    monkeypatch.undo()
    assert str(err.value).startswith(f"disk full while writing {tmp_path}: images.npy")
    assert "the cache keeps its 2 committed rows" in str(err.value) and "\n" not in str(err.value)
