"""Builders for the caption tests: a tiny byte-level BPE tokenizer trained on synthetic taglines and
overviews, a tiny GPT-2 (2 layers, width 64) saved with save_pretrained, and an embedding cache of
synthetic posters encoded with the tiny CLIP backbone, and a tiny Llama written as a GGUF file the
way llama.cpp's converter writes one. Nothing comes from a shared folder or a hub.

Each builder runs once per test session (the results are kept here, keyed by the session's
temporary root), so both caption test files share them without a second build."""
from __future__ import annotations

import contextlib
import json
from pathlib import Path

import numpy as np
import torch

from clipposter.embedding.cache import EmbeddingCache
from clipposter.embedding.embed import embed_records
from clipposter.heads.caption.tiny_lm import build_tiny_lm
from clipposter.records import assign_splits
from clipposter.ingest.synthetic import generate_posters

N_POSTERS = 600
SPLIT_FRACTIONS = (0.7, 0.15, 0.15)
_built: dict[tuple[str, str], object] = {}


def _once(factory, key: str, build):
    root = str(factory.getbasetemp())
    if (root, key) not in _built:
        with single_thread():
            _built[(root, key)] = build()
    return _built[(root, key)]


@contextlib.contextmanager
def single_thread():
    """One intra-op thread while tiny models run: they gain nothing from more, and on a busy
    2-core machine two spinning OpenMP threads made a tiny training step 50x slower."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def caption_posters(factory):
    """600 synthetic posters (more than the shared 120), split 70/15/15 so the scored split has
    ~75 posters: metrics on a dozen posters would be too noisy to test against baselines."""
    def build():
        out = factory.mktemp("caption_posters")
        records = generate_posters(out, n=N_POSTERS, seed=11, progress=False)
        return out, assign_splits(records, seed=11, fractions=SPLIT_FRACTIONS, overwrite=True)
    return _once(factory, "posters", build)


def caption_cache(factory, backbone):
    """The posters above embedded with the tiny backbone; its spec records the checkpoint path."""
    def build():
        _, records = caption_posters(factory)
        root = factory.mktemp("caption_cache") / "cache"
        cache = EmbeddingCache.open(root, backbone.identity, backbone_spec=backbone.spec)
        embed_records(records, cache, backbone, batch_size=64, progress=False)
        cache.close()
        return root
    return _once(factory, "cache", build)


def tiny_lm(factory):
    """A tiny LM folder whose tokenizer was trained on the synthetic texts."""
    def build():
        _, records = caption_posters(factory)
        texts = [r.tagline for r in records if r.tagline] + [r.overview for r in records if r.overview]
        return build_tiny_lm(factory.mktemp("tiny_lm"), texts)
    return _once(factory, "lm", build)


TRAIN_SETTINGS = dict(epochs=20, lr=3e-3, batch_size=16, warmup_steps=10)
MAX_TOKENS = 24

# How far a trained head's margin must clear an image-blind system's (the shuffled-embedding control,
# the chance baseline). Measured over training seeds 0-5 with each margin pooled over the validation
# and test splits: trained heads 0.040-0.050 (default decoding alone 0.046-0.069), shuffled-embedding
# controls -0.003 to +0.003 (default decoding -0.008 to +0.005), chance +0.005. Half the smallest gap.
MARGIN_GAP = 0.02
SCORED_SPLITS = ("validation", "test")  # never trained on; ~180 posters, half the noise of one split


def trained_head(factory, backbone):
    """A joint-mode head trained on the synthetic taglines (about 10 s on one CPU core)."""
    def build():
        from clipposter.heads.caption.train import TrainConfig, train_caption_head

        out = factory.mktemp("caption_head") / "head"
        with EmbeddingCache.open(caption_cache(factory, backbone)) as cache:
            summary = train_caption_head(cache, out, lm=str(tiny_lm(factory)), max_tokens=MAX_TOKENS,
                                         train=TrainConfig(**TRAIN_SETTINGS), progress=False)
        return out, summary
    return _once(factory, "head", build)


class ShuffledEmbeddings:
    """A cache as a head blind to its posters sees it: each poster reads the embedding of another
    poster of the same split, by a fixed seeded permutation without fixed points; records, texts
    and everything else are the cache's own. Training on it is the control that cannot learn
    which text belongs to which picture."""

    def __init__(self, cache, seed: int = 0):
        self._cache = cache
        self._source: dict[str, str] = {}
        rng = np.random.default_rng(seed)
        for split in ("train", "validation", "test"):
            ids = [r.id for r in cache.records(split)]
            cycle = [ids[i] for i in rng.permutation(len(ids))]
            # Each poster takes the next one's embedding along a random cycle: nobody keeps its own.
            self._source.update(zip(cycle, cycle[1:] + cycle[:1]))

    def __getattr__(self, name):
        return getattr(self._cache, name)

    def embeddings_for_ids(self, ids, dtype=np.float32):
        return self._cache.embeddings_for_ids([self._source.get(i, i) for i in ids], dtype)


def seeded_head(factory, backbone, seed: int, shuffled: bool = False):
    """A head trained like `trained_head` with data-order and initialisation seed `seed`; with
    `shuffled`, trained on the same posters and texts but fed other posters' embeddings."""
    if seed == 0 and not shuffled:
        return trained_head(factory, backbone)  # the same run: TrainConfig's seed is 0

    def build():
        from clipposter.heads.caption.train import TrainConfig, train_caption_head

        out = factory.mktemp(f"caption_head_{'shuffled' if shuffled else 'real'}_{seed}") / "head"
        with EmbeddingCache.open(caption_cache(factory, backbone)) as cache:
            source = ShuffledEmbeddings(cache, seed) if shuffled else cache
            summary = train_caption_head(source, out, lm=str(tiny_lm(factory)), max_tokens=MAX_TOKENS,
                                         train=TrainConfig(**TRAIN_SETTINGS, seed=seed), progress=False)
        return out, summary
    return _once(factory, f"head-{'shuffled' if shuffled else 'real'}-{seed}", build)


def _llama_cpp_permute(weight: np.ndarray, heads: int) -> np.ndarray:
    """llama.cpp's converter reorders the rows of the query and key projections (rotary halves
    interleaved per head); transformers' GGUF loader undoes it."""
    return (weight.reshape(heads, 2, weight.shape[0] // heads // 2, *weight.shape[1:])
            .swapaxes(1, 2).reshape(weight.shape))


def write_llama_gguf(model, tokenizer, path: Path) -> Path:
    """Write a Llama model and its byte-level BPE tokenizer as one float32 GGUF file: the metadata
    keys, tensor names and Q/K row order of llama.cpp's convert_hf_to_gguf.py, the tokenizer as
    llama.cpp's "gpt2" (byte-level BPE) vocabulary, merges and special ids."""
    import gguf

    cfg = model.config
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_name("tiny-llama")
    writer.add_context_length(cfg.max_position_embeddings)
    writer.add_embedding_length(cfg.hidden_size)
    writer.add_block_count(cfg.num_hidden_layers)
    writer.add_feed_forward_length(cfg.intermediate_size)
    writer.add_head_count(cfg.num_attention_heads)
    writer.add_head_count_kv(cfg.num_key_value_heads)
    writer.add_rope_dimension_count(cfg.hidden_size // cfg.num_attention_heads)
    writer.add_rope_freq_base(float(cfg.rope_parameters["rope_theta"]))
    writer.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    writer.add_vocab_size(cfg.vocab_size)
    writer.add_file_type(gguf.LlamaFileType.ALL_F32)

    vocab = tokenizer.get_vocab()
    tokens = sorted(vocab, key=vocab.get)
    special = set(tokenizer.all_special_tokens)
    merges = json.loads(tokenizer.backend_tokenizer.to_str())["model"]["merges"]
    writer.add_tokenizer_model("gpt2")
    writer.add_token_list(tokens)
    writer.add_token_types([gguf.TokenType.CONTROL if t in special else gguf.TokenType.NORMAL for t in tokens])
    writer.add_token_merges([m if isinstance(m, str) else " ".join(m) for m in merges])
    writer.add_bos_token_id(tokenizer.bos_token_id)
    writer.add_eos_token_id(tokenizer.eos_token_id)

    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, cfg.num_hidden_layers)
    for key, tensor in model.state_dict().items():
        module, suffix = key.rsplit(".", 1)
        weight = tensor.detach().float().numpy()
        if key.endswith("q_proj.weight"):
            weight = _llama_cpp_permute(weight, cfg.num_attention_heads)
        elif key.endswith("k_proj.weight"):
            weight = _llama_cpp_permute(weight, cfg.num_key_value_heads)
        writer.add_tensor(f"{names.get_name(module)}.{suffix}", np.ascontiguousarray(weight))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def tiny_gguf(factory) -> tuple[Path, Path]:
    """A tiny Llama (2 layers, width 64, grouped-query attention) on the tiny LM's tokenizer, as
    (GGUF file, the same model and tokenizer saved with save_pretrained for reference)."""
    def build():
        from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

        tok = AutoTokenizer.from_pretrained(tiny_lm(factory))
        config = LlamaConfig(vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                             num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=96,
                             bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                             tie_word_embeddings=False)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(0)
            model = LlamaForCausalLM(config).eval()
        root = factory.mktemp("tiny_gguf")
        reference = root / "reference"
        model.save_pretrained(reference)
        tok.save_pretrained(reference)
        (root / "gguf").mkdir()
        return write_llama_gguf(model, tok, root / "gguf" / "tiny-llama-f32.gguf"), reference
    return _once(factory, "gguf", build)
