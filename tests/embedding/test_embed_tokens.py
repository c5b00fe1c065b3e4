"""`embed` with token sequences: stored beside the pooled embedding, one choice per cache, and served
(or encoded) by the resolver that `predict` uses."""
import numpy as np
import pytest
import torch

from clipposter.embedding.cache import EmbeddingCache
from clipposter.embedding.embed import embed_records, make_loader, resolve_posters, resolve_tokens
from clipposter.errors import ClipposterError, ConfigError
from clipposter.records import PosterRecord

pytestmark = pytest.mark.usefixtures("single_torch_thread")


def copies(records, start, stop):
    return [PosterRecord.from_dict(r.to_dict()) for r in records[start:stop]]


def reference(backbone, records):
    """Pooled embeddings and token sequences of the posters' files, by embed's own decode path."""
    load = make_loader(backbone)
    return backbone.encode_image_tokens(torch.stack([load(r.image) for r in records]))


def test_embed_with_tokens_stores_the_backbone_token_sequence_of_every_poster(tmp_path, tiny_backbone, synthetic_set):
    _, records = synthetic_set
    recs = copies(records, 0, 21)
    cache = EmbeddingCache.open(tmp_path / "c", tiny_backbone.identity)
    summary = embed_records(recs, cache, tiny_backbone, batch_size=8, progress=False, tokens=True)
    assert summary.encoded == 21 and summary.tokens and summary.to_dict()["tokens"] is True
    assert cache.token_shape == (65, 64)
    pooled, seqs = reference(tiny_backbone, recs)
    ids = [r.id for r in recs]
    stored = cache.tokens_for_ids(ids)
    assert stored.shape == (21, 65, 64) and stored.dtype == np.float16
    np.testing.assert_allclose(stored.astype(np.float32), seqs, atol=2e-3)
    # The pooled embeddings are the ones an embed run without tokens stores.
    plain = EmbeddingCache.open(tmp_path / "p", tiny_backbone.identity)
    embed_records(copies(records, 0, 21), plain, tiny_backbone, batch_size=8, progress=False)
    np.testing.assert_array_equal(cache.embeddings_for_ids(ids), plain.embeddings_for_ids(ids))
    assert plain.token_shape is None
    # Reopened from disk, the tokens are still there.
    cache.close()
    with EmbeddingCache.open(tmp_path / "c", mode="r") as again:
        np.testing.assert_array_equal(again.tokens_for_ids(ids[::-1]), stored[::-1])


def test_a_cache_keeps_one_token_choice_for_all_its_posters(tmp_path, tiny_backbone, synthetic_set):
    _, records = synthetic_set
    tok = EmbeddingCache.open(tmp_path / "t", tiny_backbone.identity)
    assert resolve_tokens(tok, None) is False  # an empty cache: none unless asked
    embed_records(copies(records, 0, 10), tok, tiny_backbone, progress=False, tokens=True)
    # A later run that does not say follows the cache: the new posters get tokens too.
    later = embed_records(copies(records, 10, 16), tok, tiny_backbone, progress=False)
    assert later.tokens and tok.token_shape == (65, 64)
    assert tok.tokens_for_ids([r.id for r in records[:16]]).shape == (16, 65, 64)
    with pytest.raises(ConfigError) as off:
        embed_records(copies(records, 16, 18), tok, tiny_backbone, progress=False, tokens=False)
    assert off.value.field == "tokens" and "stores a token sequence" in str(off.value)

    plain = EmbeddingCache.open(tmp_path / "p", tiny_backbone.identity)
    embed_records(copies(records, 0, 5), plain, tiny_backbone, progress=False)
    with pytest.raises(ConfigError) as on:
        embed_records(copies(records, 5, 8), plain, tiny_backbone, progress=False, tokens=True)
    assert on.value.field == "tokens" and "into a new cache" in str(on.value) and "\n" not in str(on.value)
    assert plain.num_posters == 5 and plain.token_shape is None  # nothing was written by the refused runs
    assert tok.num_posters == 16


def test_resolving_with_tokens_reads_the_cache_or_encodes_the_file(tmp_path, tiny_backbone, synthetic_set):
    _, records = synthetic_set
    cache = EmbeddingCache.open(tmp_path / "t", tiny_backbone.identity)
    embed_records(copies(records, 0, 6), cache, tiny_backbone, progress=False, tokens=True)
    files = [r.image for r in records[:8]]  # 6 cached, 2 new
    passes = tiny_backbone.image_forward_passes
    got = resolve_posters(files, cache=cache, backbone=tiny_backbone, tokens=True)
    assert [p.source for p in got] == ["cache"] * 6 + ["encoded"] * 2
    assert tiny_backbone.image_forward_passes == passes + 1  # the two new files only, in one batch
    seqs = got.token_sequences()
    pooled, ref = reference(tiny_backbone, records[:8])
    assert seqs.shape == (8, 65, 64) and seqs.dtype == np.float32
    np.testing.assert_allclose(seqs, ref, atol=2e-3)
    np.testing.assert_allclose(got.embeddings(), pooled, atol=2e-3)

    # A cache without tokens serves no poster: files are encoded, a bare id fails with its reason.
    plain = EmbeddingCache.open(tmp_path / "p", tiny_backbone.identity)
    embed_records(copies(records, 0, 3), plain, tiny_backbone, progress=False)
    mixed = resolve_posters([records[0].image, records[1].id], cache=plain, backbone=tiny_backbone, ids=True,
                            tokens=True)
    assert mixed[0].source == "encoded" and mixed[0].tokens.shape == (65, 64)
    assert not mixed[1].ok and "no token sequence" in mixed[1].error
    # Without tokens, the same cache serves both.
    assert [p.source for p in resolve_posters([records[0].image, records[1].id], cache=plain, ids=True)] == \
        ["cache", "cache"]


def test_token_sequences_are_written_before_they_pass_the_memory_limit(tmp_path, tiny_backbone, synthetic_set,
                                                                       monkeypatch):
    import clipposter.embedding.embed as embed_module
    from clipposter.embedding import shard_files as sf

    _, records = synthetic_set
    # clipposter-tiny: 65 × 64 × 2 = 8,320 bytes a poster; a limit of 3 posters' worth writes a shard
    # after every batch of 4 (the batch that passes it), not one at the end.
    monkeypatch.setattr(embed_module, "TOKEN_FLUSH_BYTES", 3 * 8320)
    cache = EmbeddingCache.open(tmp_path / "t", tiny_backbone.identity)
    embed_records(copies(records, 0, 12), cache, tiny_backbone, batch_size=4, progress=False, tokens=True)
    assert len([e for e in sf.read_index(cache.root) if e.posters]) == 3
    plain = EmbeddingCache.open(tmp_path / "p", tiny_backbone.identity)
    embed_records(copies(records, 0, 12), plain, tiny_backbone, batch_size=4, progress=False)
    assert len([e for e in sf.read_index(plain.root) if e.posters]) == 1


def test_the_first_run_records_the_choice_so_a_run_killed_before_its_first_shard_keeps_it(
        tmp_path, tiny_backbone, synthetic_set, monkeypatch):
    _, records = synthetic_set
    cache = EmbeddingCache.open(tmp_path / "t", tiny_backbone.identity)
    assert cache.stores_tokens is None

    def killed(*args, **kwargs):
        raise KeyboardInterrupt  # the run dies while encoding, long before its first shard is written

    monkeypatch.setattr(tiny_backbone, "encode_image_tokens", killed)
    with pytest.raises(KeyboardInterrupt):
        embed_records(copies(records, 0, 4), cache, tiny_backbone, progress=False, tokens=True)
    monkeypatch.undo()
    cache.close()
    again = EmbeddingCache.open(tmp_path / "t")
    assert again.num_posters == 0 and again.stores_tokens is True
    with pytest.raises(ConfigError, match="is off, but the cache"):
        embed_records(copies(records, 0, 4), again, tiny_backbone, progress=False, tokens=False)
    summary = embed_records(copies(records, 0, 4), again, tiny_backbone, progress=False)  # follows the record
    assert summary.tokens and again.token_shape == (65, 64)

    plain = EmbeddingCache.open(tmp_path / "p", tiny_backbone.identity)
    embed_records(copies(records, 0, 2), plain, tiny_backbone, progress=False)
    assert plain.stores_tokens is False
    empty = EmbeddingCache.open(tmp_path / "e", tiny_backbone.identity)
    empty.record_tokens(False)
    with pytest.raises(ConfigError) as err:
        embed_records(copies(records, 0, 2), empty, tiny_backbone, progress=False, tokens=True)
    assert "records that its posters are stored without token sequences" in str(err.value)
    with pytest.raises(ConfigError, match="records that its posters are stored without"):
        empty.record_tokens(True)


def test_a_cache_made_before_the_choice_was_recorded_follows_its_posters(tmp_path, tiny_backbone, synthetic_set):
    from clipposter.embedding.shards import ShardedCache, create_meta

    _, records = synthetic_set
    create_meta(tmp_path / "old", tiny_backbone.identity, "float16", tiny_backbone.spec)
    old = ShardedCache(tmp_path / "old", tiny_backbone.identity, "float16", tiny_backbone.spec)
    pooled, seqs = reference(tiny_backbone, records[:3])
    old.add_posters(["h0", "h1", "h2"], pooled, [(r, f"h{i}") for i, r in enumerate(copies(records, 0, 3))],
                    tokens=seqs)
    assert old.stores_tokens is None and resolve_tokens(old, None) is True
    summary = embed_records(copies(records, 3, 5), old, tiny_backbone, progress=False)
    assert summary.tokens and old.stores_tokens is True and old.token_shape == (65, 64)


def test_a_tower_without_token_sequences_is_refused_before_any_file_is_read(tmp_path, tiny_backbone, synthetic_set):
    from clipposter.embedding.backbone import Backbone

    class NoTokens(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.visual = torch.nn.Linear(3, 64)

    other = Backbone(NoTokens(), tiny_backbone.preprocess, None, tiny_backbone.identity, torch.device("cpu"))
    cache = EmbeddingCache.open(tmp_path / "t", tiny_backbone.identity)
    recs = copies(records_of(synthetic_set), 0, 3)
    for r in recs:
        r.image = str(tmp_path / "missing.jpg")  # read before the refusal, it would stop the strict run first
    with pytest.raises(ClipposterError, match="no ViT token sequence") as err:
        embed_records(recs, cache, other, progress=False, tokens=True, strict=True)
    assert "\n" not in str(err.value)
    assert cache.num_records == 0 and cache.stores_tokens is None


def records_of(synthetic_set):
    return synthetic_set[1]
