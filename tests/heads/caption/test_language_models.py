"""Where the caption head's language model comes from: a GGUF file (how many small LMs ship), loaded
with the tokenizer it embeds, checked against the same model saved the usual way, and stored in the
head as a plain Hugging Face folder so the head never needs the file again."""
from __future__ import annotations

import shutil

import numpy as np
import pytest
import torch

import lm_fixtures
from clipposter.embedding.cache import EmbeddingCache
from clipposter.errors import ConfigError
from clipposter.heads.caption.config import DecodingConfig
from clipposter.heads.caption.lm import load_language_model
from clipposter.heads.caption.model import CaptionHead

pytest.importorskip("gguf", reason="GGUF files need the gguf package: pip install -e '.[gguf]'")
pytest.importorskip("accelerate", reason="transformers loads GGUF files only with accelerate: pip install -e '.[gguf]'")

pytestmark = pytest.mark.usefixtures("single_torch_thread")

TEXTS = ["The night is young.", "In space no one can hear you scream.", "One last job."]


@pytest.fixture(scope="module")
def gguf_lm(tmp_path_factory):
    return lm_fixtures.tiny_gguf(tmp_path_factory)


def test_a_gguf_file_loads_as_the_model_and_tokenizer_it_was_written_from(gguf_lm):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path, reference = gguf_lm
    model, tok = load_language_model(str(path))
    ref_model, ref_tok = AutoModelForCausalLM.from_pretrained(reference).eval(), AutoTokenizer.from_pretrained(reference)
    # The embedded tokenizer encodes and decodes like the one the file was written from.
    for text in TEXTS:
        ids = tok.encode(text, add_special_tokens=False)
        assert ids == ref_tok.encode(text, add_special_tokens=False)
        assert tok.decode(ids) == text
    assert tok.eos_token_id == ref_tok.eos_token_id
    # The weights are the reference's: the same logits, in float32 (trainable, saveable).
    assert next(model.parameters()).dtype == torch.float32 and not getattr(model, "is_quantized", False)
    ids = torch.tensor([ref_tok.encode(" ".join(TEXTS), add_special_tokens=False)])
    with torch.no_grad():
        torch.testing.assert_close(model.eval()(ids).logits, ref_model(ids).logits, rtol=0, atol=1e-5)


def test_a_head_on_a_gguf_lm_is_saved_as_a_plain_folder_and_reloads_without_the_file(gguf_lm, caption_cache_dir,
                                                                                      tmp_path):
    path, _ = gguf_lm
    copy = tmp_path / "model.gguf"
    shutil.copy(path, copy)
    with EmbeddingCache.open(caption_cache_dir) as cache:
        head = CaptionHead.create(cache.identity, lm=str(copy), prefix_length=4, max_tokens=12)
        emb = cache.embeddings_for_ids([r.id for r in cache.records("test")[:4]])
    assert head.config.lm_source == str(copy)
    greedy = DecodingConfig(strategy="greedy")
    before = [c[0].raw for c in head.generate(emb, greedy)]
    head.save_pretrained(tmp_path / "head")
    copy.unlink()  # the head must not need the GGUF any more
    lm_files = {p.name for p in (tmp_path / "head" / "lm").iterdir()}
    assert {"config.json", "model.safetensors", "tokenizer.json"} <= lm_files and not any(
        name.endswith(".gguf") for name in lm_files)
    again = CaptionHead.from_pretrained(tmp_path / "head")
    assert [c[0].raw for c in again.generate(emb, greedy)] == before
    assert again.lm.config.model_type == "llama"


def test_a_gguf_lm_trains_a_head(gguf_lm, caption_cache_dir, tmp_path):
    from clipposter.heads.caption.train import TrainConfig, train_caption_head

    path, _ = gguf_lm
    with EmbeddingCache.open(caption_cache_dir) as cache:
        summary = train_caption_head(cache, tmp_path / "head", lm=str(path), prefix_length=4, max_tokens=12,
                                     train=TrainConfig(epochs=2, lr=3e-3, batch_size=32, warmup_steps=2),
                                     progress=False)
    assert summary.history[-1]["train_loss"] < summary.history[0]["train_loss"]
    head = CaptionHead.from_pretrained(tmp_path / "head")
    assert np.isfinite(head.mapper.center.numpy()).all() and head.config.lm_source == str(path)


def test_a_missing_or_broken_gguf_file_is_named_without_blaming_the_network(tmp_path):
    with pytest.raises(ConfigError) as err:
        load_language_model(str(tmp_path / "missing.gguf"))
    msg = str(err.value)
    assert err.value.field == "lm" and "no such file" in msg and "offline" not in msg and "\n" not in msg
    bad = tmp_path / "broken.gguf"
    bad.write_bytes(b"GGUF this is not a model")
    with pytest.raises(ConfigError) as err:
        load_language_model(str(bad))
    msg = str(err.value)
    assert err.value.field == "lm" and "GGUF" in msg and "offline" not in msg and "\n" not in msg
    # A folder that is not a model is not an offline problem either.
    (tmp_path / "empty").mkdir()
    with pytest.raises(ConfigError) as err:
        load_language_model(str(tmp_path / "empty"))
    assert "offline" not in str(err.value) and ".gguf" in str(err.value)


def test_the_caption_benchmark_without_a_gpt2_tokenizer_says_what_to_pass(tmp_path):
    """The suite runs offline with an empty Hugging Face cache: the default `gpt2` cannot be had, and a
    folder that is not GPT-2's tokenizer is refused before any model is built."""
    import subprocess
    import sys
    from pathlib import Path

    script = Path(__file__).resolve().parents[3] / "scripts" / "bench" / "captions.py"
    for extra, needle in (([], "the GPT-2 tokenizer 'gpt2' cannot be loaded"),
                          (["--tokenizer", str(tmp_path / "missing")], "cannot be loaded")):
        proc = subprocess.run([sys.executable, str(script), *extra], capture_output=True, text=True, timeout=300)
        lines = proc.stderr.strip().splitlines()
        assert proc.returncode == 2 and len(lines) == 1, proc.stderr[-2000:]
        assert lines[0].startswith("error: ") and needle in lines[0] and "pass --tokenizer DIR" in lines[0]
