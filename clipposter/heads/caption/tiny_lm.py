"""A tiny GPT-2 and a byte-level BPE trained on the given texts, saved as a Hugging Face folder.

The stand-in language model when real GPT-2 weights cannot be had (an offline machine): `demo`
trains a caption head on it so every stage still runs, and the tests load it through the same
`from_pretrained` path a real LM takes. Its texts say nothing about GPT-2's quality.
"""
from __future__ import annotations

from pathlib import Path
from typing import Iterable

EOS = "<|endoftext|>"


def build_tiny_lm(folder: str | Path, texts: Iterable[str], vocab_size: int = 700, seed: int = 0,
                  width: int = 64, layers: int = 2, positions: int = 96) -> Path:
    """Train a byte-level BPE on `texts`, build a randomly initialised GPT-2 of `layers` × `width`
    on that vocabulary, and save both into `folder` (config.json, weights, tokenizer files)."""
    import torch
    from tokenizers import ByteLevelBPETokenizer
    from transformers import GPT2Config, GPT2LMHeadModel, PreTrainedTokenizerFast

    bpe = ByteLevelBPETokenizer()
    bpe.train_from_iterator(list(texts), vocab_size=vocab_size, min_frequency=2, special_tokens=[EOS],
                            show_progress=False)
    tok = PreTrainedTokenizerFast(tokenizer_object=bpe._tokenizer, eos_token=EOS, bos_token=EOS, unk_token=EOS)
    eos = tok.convert_tokens_to_ids(EOS)
    config = GPT2Config(vocab_size=len(tok), n_positions=positions, n_embd=width, n_layer=layers,
                        n_head=max(1, width // 32), bos_token_id=eos, eos_token_id=eos,
                        clipposter_random_init=True)  # a head on it records that its LM started random
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = GPT2LMHeadModel(config)
    folder = Path(folder)
    model.save_pretrained(folder)
    tok.save_pretrained(folder)
    return folder
