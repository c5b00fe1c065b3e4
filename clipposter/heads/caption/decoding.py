"""Decoding strategies for the caption head, and the clean-up applied to every generated text.

Every strategy runs through transformers' `generate(inputs_embeds=prefix)`, batched over posters,
with the key/value cache on: ClipCap's own predict re-ran the whole sequence at every step for one
image at a time, which is what made its beam search slow. For decoder-only models, `generate` with
`inputs_embeds` returns only the new tokens, so nothing has to be cut off the front.

Strategies (all take `num_return`, `repetition_penalty` and the length limit):
  greedy       the most likely token each step
  beam         beam search (`num_beams`, `length_penalty`, `no_repeat_ngram_size`)
  poster2plot  Poster2Plot's beam settings: 4 beams, no repeated 3-grams, length penalty 2.0
  sample       top-k / top-p / temperature sampling
  lstm         the Inception-LSTM seed's schedule: sample among the top 4 tokens for the first
               4 words, the top 2 up to word 7, then greedy
"""
from __future__ import annotations

import re
from typing import Any

import torch

# The settings live in config.py (no torch there); they are part of this module's API too.
from clipposter.heads.caption.config import (DEFAULT_STRATEGY, PRESETS, STRATEGIES, DecodingConfig,
                                             decoding_preset)

__all__ = ["DEFAULT_STRATEGY", "PRESETS", "STRATEGIES", "DecodingConfig", "decoding_preset", "LSTM_SCHEDULE",
           "postprocess", "word_start_table", "WordScheduledTopN", "generate_kwargs"]

# The seed LSTM's schedule as (words begun so far < limit → sample among top n); then greedy.
LSTM_SCHEDULE: tuple[tuple[int, int], ...] = ((4, 4), (7, 2))


# ----------------------------------------------------------------------------- post-processing

_STOP_RUN = re.compile(r"\.{2,}|…")
# A sentence end: terminal punctuation with any closing quotes/brackets, then a space or the end.
_SENTENCE_END = re.compile(r"[.!?][\"')\]]*(?=\s|$)")


def postprocess(text: str, cut_partial: bool = False) -> str:
    """Collapse whitespace, cut at the first run of two or more full stops (Poster2Plot's rule;
    one full stop is kept), and optionally drop a trailing sentence that was cut off mid-way."""
    text = " ".join(text.split())
    run = _STOP_RUN.search(text)
    if run:
        head = text[:run.start()].rstrip()
        text = head + "." if head else ""
    if cut_partial and text:
        ends = [m.end() for m in _SENTENCE_END.finditer(text)]
        # Only cut when something complete is left: a text with no sentence end stays as it is.
        if ends and ends[-1] < len(text):
            text = text[:ends[-1]].rstrip()
    return text


# ----------------------------------------------------------------------------- LSTM schedule

def word_start_table(tokenizer, vocab_size: int) -> torch.Tensor:
    """A (vocab_size,) bool tensor: does this token begin a new word (carries a leading space)?

    Byte-level BPE marks a leading space with 'Ġ' (newline 'Ċ'), SentencePiece with '▁'; other
    tokenizers are decoded token by token."""
    n = min(len(tokenizer), vocab_size)
    pieces = tokenizer.convert_ids_to_tokens(list(range(n)))
    marks = ("Ġ", "▁", "Ċ")
    table = torch.zeros(vocab_size, dtype=torch.bool)
    if any(isinstance(p, str) and p[:1] in marks for p in pieces):
        flags = [isinstance(p, str) and p[:1] in marks for p in pieces]
    else:
        flags = [tokenizer.decode([i])[:1].isspace() for i in range(n)]
    table[:n] = torch.tensor(flags, dtype=torch.bool)
    return table


class WordScheduledTopN:
    """Logits processor for the seed LSTM's schedule, adapted from words to sub-word tokens.

    The LSTM chose whole words: among the top 4 for the first 4 words, the top 2 up to word 7, then
    greedily. A BPE word is a word-start token (leading space) plus continuation pieces, so here the
    choice is sampled only where a word begins - the step's most likely token starts a word (or
    nothing has been generated yet) - among the top n tokens, n from the number of words begun so
    far; continuation pieces, punctuation and end-of-text are taken greedily. Sampling inside words
    would splice pieces of different words together ("silen ride"), which the LSTM never could.

    Words are counted from the generated tokens: the first token starts word 1, and every later
    token with a leading space starts the next."""

    def __init__(self, word_starts: torch.Tensor, schedule: tuple[tuple[int, int], ...] = LSTM_SCHEDULE):
        self.word_starts = word_starts
        self.schedule = schedule

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        batch, length = input_ids.shape
        table = self.word_starts.to(scores.device)
        if length == 0:
            words = torch.zeros(batch, dtype=torch.long, device=scores.device)
        else:
            starts = table[input_ids.to(scores.device).clamp(0, len(table) - 1)]
            words = 1 + starts[:, 1:].sum(dim=1)
        n = torch.ones(batch, dtype=torch.long, device=scores.device)
        for limit, top in reversed(self.schedule):
            n = torch.where(words < limit, torch.full_like(n, top), n)
        best = scores.argmax(dim=-1).clamp(max=len(table) - 1)
        at_word_start = table[best] | (length == 0)
        n = torch.where(at_word_start, n, torch.ones_like(n))
        kth = scores.topk(int(n.max()), dim=-1).values.gather(1, (n - 1).unsqueeze(1))
        return scores.masked_fill(scores < kth, float("-inf"))


# ----------------------------------------------------------------------------- generation

def generate_kwargs(cfg: DecodingConfig, max_new_tokens: int, eos_id: int, pad_id: int,
                    word_starts: torch.Tensor | None = None) -> dict[str, Any]:
    """Arguments for `model.generate` that implement `cfg` (every sampling knob set explicitly,
    so a generation_config.json saved with the LM cannot change the strategy behind our back)."""
    from transformers import LogitsProcessorList

    kw: dict[str, Any] = {
        "max_new_tokens": max_new_tokens,
        "min_new_tokens": cfg.min_new_tokens or None,
        "eos_token_id": eos_id,
        "pad_token_id": pad_id,
        "use_cache": True,
        "num_return_sequences": cfg.num_return,
        "repetition_penalty": cfg.repetition_penalty if cfg.repetition_penalty != 1.0 else None,
        "no_repeat_ngram_size": cfg.no_repeat_ngram_size or None,
        "do_sample": False,
        "num_beams": 1,
        "top_k": None,
        "top_p": None,
        "temperature": None,
    }
    if cfg.strategy in ("beam", "poster2plot"):
        kw.update(num_beams=cfg.num_beams, length_penalty=cfg.length_penalty, early_stopping=True)
    elif cfg.strategy == "sample":
        kw.update(do_sample=True, top_k=cfg.top_k or None, top_p=cfg.top_p if cfg.top_p < 1 else None,
                  temperature=cfg.temperature)
    elif cfg.strategy == "lstm":
        if word_starts is None:
            raise ValueError("the lstm strategy needs the tokenizer's word-start table")
        kw.update(do_sample=True, temperature=cfg.temperature,
                  logits_processor=LogitsProcessorList([WordScheduledTopN(word_starts)]))
    return kw
