import contextlib
import shutil
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from clipposter.embedding import shard_files as sf
from clipposter.embedding.cache import EmbeddingCache
from clipposter.embedding.embed import embed_records
from clipposter.errors import ClipposterError
from clipposter.records import PosterRecord
from clipposter.ingest.sources import from_folder
from clipposter.ingest.synthetic import generate_posters


def copy_records(records, n=None):
    return [PosterRecord.from_dict(r.to_dict()) for r in records[:n]]


def test_second_run_does_no_model_work(tmp_path, tiny_backbone, synthetic_set):
    _, records = synthetic_set
    cache = EmbeddingCache.open(tmp_path / "c", tiny_backbone.identity)
    first = embed_records(copy_records(records, 40), cache, tiny_backbone, batch_size=16, progress=False)
    assert first.encoded == 40 and first.cached == 0
    before = tiny_backbone.image_forward_passes
    second = embed_records(copy_records(records, 40), cache, tiny_backbone, batch_size=16, progress=False)
    assert tiny_backbone.image_forward_passes == before
    assert second.encoded == 0 and second.cached == 40
    assert cache.num_posters == 40 and cache.num_records == 40


def test_adding_posters_encodes_only_new_ones(tmp_path, tiny_backbone, synthetic_set):
    _, records = synthetic_set
    cache = EmbeddingCache.open(tmp_path / "c", tiny_backbone.identity)
    embed_records(copy_records(records, 30), cache, tiny_backbone, batch_size=8, progress=False)
    old = np.array(cache.image_matrix())
    s = embed_records(copy_records(records, 50), cache, tiny_backbone, batch_size=8, progress=False)
    assert s.encoded == 20 and s.cached == 30
    np.testing.assert_array_equal(np.array(cache.image_matrix())[:30], old)  # old rows untouched
    # Stored rows match a direct encode through the same loader (float16 rounding aside), and the
    # reduced-scale JPEG decode stays close to a full-size decode.
    from clipposter.embedding.embed import make_loader
    from clipposter.ingest.images import load_poster

    stored = cache.embeddings_for_ids([records[45].id])[0]
    same_path = tiny_backbone.encode_image_tensors(make_loader(tiny_backbone)(records[45].image)[None])[0]
    np.testing.assert_allclose(stored, same_path, atol=1e-3)
    full = tiny_backbone.encode_images([load_poster(records[45].image)])[0]
    assert float(stored @ full) > 0.995


def test_identical_posters_are_encoded_once(tmp_path, tiny_backbone, synthetic_set):
    _, records = synthetic_set
    a = copy_records(records, 1)[0]
    b = PosterRecord(id="copy", image=a.image, genres=["Drama"])
    cache = EmbeddingCache.open(tmp_path / "c", tiny_backbone.identity)
    s = embed_records([a, b], cache, tiny_backbone, progress=False)
    assert s.encoded == 1 and s.cached == 1 and cache.num_posters == 1 and cache.num_records == 2
    np.testing.assert_array_equal(cache.embeddings_for_ids(["copy"]), cache.embeddings_for_ids([a.id]))


@pytest.fixture
def messy_folder(tmp_path, synthetic_set):
    src, records = synthetic_set
    root = tmp_path / "posters"
    root.mkdir()
    for r in records[:6]:
        shutil.copy(r.image, root / (r.id + ".jpg"))
    good = (root / "syn-00000.jpg").read_bytes()
    (root / "truncated.jpg").write_bytes(good[: len(good) // 2])
    (root / "empty.png").write_bytes(b"")
    (root / "notes.jpg").write_text("this is not an image")
    return root


def test_bad_posters_are_skipped_and_counted(tmp_path, tiny_backbone, messy_folder, caplog):
    cache = EmbeddingCache.open(tmp_path / "c", tiny_backbone.identity)
    s = embed_records(from_folder(messy_folder), cache, tiny_backbone, progress=False)
    assert s.encoded == 6 and s.skipped == 3
    reasons = {p.split("/")[-1]: r for p, r in s.skipped_files}
    assert "truncated" in reasons["truncated.jpg"] and "empty" in reasons["empty.png"]
    assert "not an image" in reasons["notes.jpg"]
    warnings = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert len(warnings) == 3 and all("\n" not in w for w in warnings)


def test_strict_makes_a_bad_poster_fatal(tmp_path, tiny_backbone, messy_folder):
    cache = EmbeddingCache.open(tmp_path / "c", tiny_backbone.identity)
    with pytest.raises(ClipposterError, match="`strict`"):
        embed_records(from_folder(messy_folder), cache, tiny_backbone, strict=True, progress=False)


def test_embed_refuses_cache_of_other_backbone(tmp_path, tiny_backbone, synthetic_set):
    from clipposter.embedding.backbone import TINY_MODEL, load_backbone

    cache = EmbeddingCache.open(tmp_path / "c", tiny_backbone.identity)
    other = load_backbone(TINY_MODEL, None, device="cpu")
    with pytest.raises(ClipposterError, match="was made with backbone"):
        embed_records(copy_records(synthetic_set[1], 2), cache, other, progress=False)


@pytest.mark.slow
def test_killed_embed_run_resumes_without_loss_or_duplicates(tmp_path, tiny_checkpoint):
    src = tmp_path / "posters"
    records = generate_posters(src, n=400, seed=11)
    cache_dir = tmp_path / "cache"
    cmd = [sys.executable, "-m", "clipposter.cli.main", "embed", str(src / "manifest.csv"), "--cache", str(cache_dir),
           "--backbone", "clipposter-tiny", "--pretrained", str(tiny_checkpoint), "--batch-size", "4",
           "--workers", "1", "--no-texts", "--json"]
    # The killed run writes a shard every 8 posters, so it is killed with several shards listed.
    flushing = [sys.executable, "-c", "import sys; from clipposter.embedding import embed; embed.FLUSH_ROWS = 8; "
                "from clipposter.cli.main import main; sys.exit(main(sys.argv[1:]))", *cmd[3:]]
    proc = subprocess.Popen(flushing, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    committed = 0
    deadline = time.time() + 120
    while time.time() < deadline and proc.poll() is None:
        with contextlib.suppress(ClipposterError):
            committed = sum(e.posters for e in sf.read_index(cache_dir))
        if committed >= 16:
            break
        time.sleep(0.005)
    assert proc.poll() is None, "embed finished before it could be killed; the test needs a slower run"
    proc.send_signal(signal.SIGKILL)
    proc.wait()

    rerun = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert rerun.returncode == 0, rerun.stderr
    with EmbeddingCache.open(cache_dir) as cache:
        assert cache.num_posters == 400 and cache.num_records == 400
        ids = [r.id for r in cache.records()]
        assert sorted(ids) == sorted(r.id for r in records)
        matrix = np.asarray(cache.image_matrix(), dtype=np.float32)
        np.testing.assert_allclose(np.linalg.norm(matrix, axis=1), 1.0, atol=1e-2)  # no garbage row
        assert len(set(cache.poster_hashes())) == len(cache.poster_hashes()) == 400  # each poster once
        assert sorted(cache.id_rows().values()) == list(range(400))
        assert 2 <= len(cache.shard_names) < 400 // 8  # what the killed run listed, then the rest as one shard
    assert {p.name for p in (cache_dir / sf.SHARDS).iterdir()} == {e.name for e in sf.read_index(cache_dir)}


# ------------------------------------------------------------------ the backbone loads only for work
def refusing_factory(calls: list):
    def factory():
        calls.append(1)
        raise AssertionError("the backbone was loaded although nothing needed encoding")
    return factory


def test_a_fully_cached_rerun_calls_no_backbone_factory(tmp_path, tiny_backbone, synthetic_set):
    from clipposter.embedding.embed import embed_texts, reference_and_prompt_texts

    records = copy_records(synthetic_set[1], 12)
    cache = EmbeddingCache.open(tmp_path / "c", tiny_backbone.identity)
    embed_records(records, cache, tiny_backbone, progress=False)
    texts = reference_and_prompt_texts(records)
    embed_texts(cache, tiny_backbone, texts)
    calls: list = []
    again = embed_records(copy_records(synthetic_set[1], 12), cache, refusing_factory(calls), progress=False)
    assert calls == [] and again.encoded == 0 and again.cached == 12
    assert again.posters_per_second is None and again.to_dict()["posters_per_second"] is None
    assert embed_texts(cache, refusing_factory(calls), texts) == len({t for t in texts if t})
    assert calls == []


def test_a_backbone_factory_is_called_once_when_there_is_work(tmp_path, tiny_backbone, synthetic_set):
    from clipposter.embedding.embed import embed_texts

    cache = EmbeddingCache.open(tmp_path / "c", tiny_backbone.identity)
    embed_records(copy_records(synthetic_set[1], 5), cache, tiny_backbone, progress=False)
    calls: list = []

    def factory():
        calls.append(1)
        return tiny_backbone

    s = embed_records(copy_records(synthetic_set[1], 9), cache, factory, batch_size=2, progress=False)
    assert calls == [1] and s.encoded == 4 and s.cached == 5 and s.posters_per_second > 0
    assert embed_texts(cache, factory, ["a brand new tagline", "another one"]) == 2
    assert calls == [1, 1] and cache.missing_texts(["a brand new tagline", "another one"]) == []


def test_a_factory_of_another_backbone_is_refused_when_loaded(tmp_path, tiny_backbone, synthetic_set):
    from clipposter.embedding.backbone import TINY_MODEL, load_backbone

    cache = EmbeddingCache.open(tmp_path / "c", tiny_backbone.identity)
    with pytest.raises(ClipposterError, match="was made with backbone"):
        embed_records(copy_records(synthetic_set[1], 2), cache, lambda: load_backbone(TINY_MODEL, None, device="cpu"),
                      progress=False)
    assert cache.num_posters == 0


def test_texts_are_committed_batch_by_batch(tmp_path, tiny_backbone, monkeypatch):
    """A run killed while encoding texts keeps the batches it finished."""
    from clipposter.embedding.embed import embed_texts

    cache = EmbeddingCache.open(tmp_path / "c", tiny_backbone.identity)
    texts = [f"tagline number {i}" for i in range(10)]
    real = tiny_backbone.encode_texts
    seen: list[int] = []

    def encode_then_die(batch, batch_size=256):
        if seen:
            raise KeyboardInterrupt
        seen.append(len(batch))
        return real(batch, batch_size=batch_size)

    monkeypatch.setattr(tiny_backbone, "encode_texts", encode_then_die)
    with pytest.raises(KeyboardInterrupt):
        embed_texts(cache, tiny_backbone, texts, batch_size=4)
    monkeypatch.undo()
    assert seen == [4] and len(cache.missing_texts(texts)) == 6


def test_the_backbone_choice_is_checked_against_a_cache_without_loading(tiny_backbone, tiny_checkpoint):
    from clipposter.embedding.backbone import TINY_MODEL, check_choice, weights_of

    ident = tiny_backbone.identity
    assert weights_of(TINY_MODEL, str(tiny_checkpoint)) == ident.weights
    assert weights_of(TINY_MODEL, None).startswith("random") and weights_of("hf-hub:org/x", None) == "hf-hub"
    check_choice(ident, TINY_MODEL, str(tiny_checkpoint), "the cache C")  # the same: no error
    with pytest.raises(ClipposterError, match="the cache C was made with backbone clipposter-tiny .* asked for is "
                                              "ViT-B-32 \\(openai\\)"):
        check_choice(ident, "ViT-B-32", "openai", "the cache C")
    with pytest.raises(ClipposterError, match="random-seed"):
        check_choice(ident, TINY_MODEL, None, "the cache C")


def test_a_cache_without_a_recorded_spec_reloads_its_pretrained_tag(monkeypatch, tiny_backbone):
    """Caches written before the spec was recorded name their tag only in the identity."""
    import dataclasses

    import clipposter.embedding.backbone as bb

    tagged = dataclasses.replace(tiny_backbone.identity, weights="openai")
    asked = []

    def fake_load(model, pretrained, device="auto", precision="auto"):
        asked.append((model, pretrained))
        return type("B", (), {"identity": tagged})()

    monkeypatch.setattr(bb, "load_backbone", fake_load)
    bb.load_backbone_like(tagged, None)
    assert asked == [("clipposter-tiny", "openai")]
    random = dataclasses.replace(tagged, weights="random-seed0")
    monkeypatch.setattr(bb, "load_backbone", lambda model, pretrained, **kw: asked.append((model, pretrained))
                        or type("B", (), {"identity": random})())
    bb.load_backbone_like(random, None)  # random weights stay random
    assert asked[-1] == ("clipposter-tiny", None)
    assert random.is_random and not tagged.is_random
