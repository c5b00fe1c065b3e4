"""Caption generation and training speed, GPT-2 124M architecture with random weights.

Prints taglines/s for the same 32 poster prefixes, 4 beams, exactly 32 new tokens each, decoded by
  1. the project's batched generation (CaptionHead.generate: one generate call over all posters,
     key/value cache on),
  2. transformers' own batched generate with beam search on the same prefix vectors (what the
     project wraps: the wrapper should cost nothing), and
  3. a naive reference loop written like ClipCap's predict: one poster at a time, its beams in one
     batch, the whole sequence re-run through the model at every step (no cache, logits for every
     position),
and training tokens/s of joint training (mapper + LM) at batch 16.

The weights are random: output text is meaningless, but the amount of work per token is that of
the real model. Each figure is the fastest of repeated identical runs (the two batched decoders are
timed in alternating rounds; the naive loop's posters each do identical work and are timed one by
one): on a shared machine other jobs only ever add time, so the minimum is the best estimate. Every decoder is forced to produce exactly --new-tokens tokens (end-of-text is
suppressed), so all three do the same number of steps. The best sequences of (1) and (3) are
compared as a check that the naive loop is a real beam search.

Usage: .venv/bin/python scripts/bench/captions.py [--tokenizer gpt2 | --tokenizer DIR] [--threads N]

The GPT-2 tokenizer comes from the hub name `gpt2` by default (the local Hugging Face cache first,
then the hub); offline, pass --tokenizer DIR, a folder with GPT-2's tokenizer files.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

DEFAULT_TOKENIZER = "gpt2"


def naive_beam_search(lm, prefix: torch.Tensor, beams: int, steps: int, eos: int) -> list[int]:
    """ClipCap-style beam search for one poster: re-runs prefix + everything generated each step."""
    wte = lm.get_input_embeddings()
    embeds = prefix  # (1, P, H)
    seqs = torch.zeros(1, 0, dtype=torch.long)
    scores = torch.zeros(1)
    for _ in range(steps):
        logits = lm(inputs_embeds=embeds, use_cache=False).logits[:, -1]
        logp = torch.log_softmax(logits.float(), dim=-1)
        logp[:, eos] = float("-inf")  # fixed length, as for the batched decoders
        vocab = logp.shape[-1]
        top = (scores[:, None] + logp).view(-1).topk(beams)
        src, tok = top.indices // vocab, top.indices % vocab
        seqs = torch.cat([seqs[src], tok[:, None]], dim=1)
        scores = top.values
        embeds = torch.cat([embeds[src], wte(tok)[:, None]], dim=1)
    return seqs[0].tolist()


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tokenizer", default=DEFAULT_TOKENIZER,
                    help="hub name or folder of the GPT-2 tokenizer (default gpt2: the local HF cache, then the hub)")
    ap.add_argument("--posters", type=int, default=32)
    ap.add_argument("--beams", type=int, default=4)
    ap.add_argument("--new-tokens", type=int, default=32)
    ap.add_argument("--naive-posters", type=int, default=4,
                    help="posters timed in the naive loop (default 4 of the 32, to keep the run to minutes); it "
                         "decodes one poster at a time, so its rate per poster does not depend on how many")
    ap.add_argument("--rounds", type=int, default=3, help="alternating timed rounds of the batched decoders")
    ap.add_argument("--train-steps", type=int, default=3)
    ap.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()

    if args.threads:
        torch.set_num_threads(args.threads)

    from transformers import AutoTokenizer, GPT2Config, GPT2LMHeadModel

    from clipposter.embedding.backbone import BackboneIdentity
    from clipposter.heads.caption.lm import first_line
    from clipposter.heads.caption.model import CaptionHead
    from clipposter.heads.caption.decoding import DecodingConfig

    try:
        tok = AutoTokenizer.from_pretrained(args.tokenizer)
    except (OSError, ValueError) as exc:
        print(f"error: the GPT-2 tokenizer {args.tokenizer!r} cannot be loaded ({first_line(exc)}); pass "
              f"--tokenizer DIR, a folder with GPT-2's vocab.json + merges.txt (or tokenizer.json)", file=sys.stderr)
        return 2
    if len(tok) != GPT2Config().vocab_size:
        print(f"error: {args.tokenizer!r} has {len(tok)} tokens, not GPT-2's {GPT2Config().vocab_size}; pass "
              f"--tokenizer DIR with GPT-2's tokenizer files", file=sys.stderr)
        return 2
    torch.manual_seed(0)
    lm = GPT2LMHeadModel(GPT2Config()).eval()  # GPT-2 124M: 12 layers, width 768, vocab 50257
    identity = BackboneIdentity(model="ViT-B-32", weights="random-bench", image_size=224, mean=(0.5,) * 3,
                                std=(0.5,) * 3, interpolation="bicubic", resize_mode="shortest", embed_dim=512)
    head = CaptionHead.create(identity, lm=lm, tokenizer=tok, max_tokens=args.new_tokens).eval()
    emb = torch.nn.functional.normalize(torch.randn(args.posters, 512, generator=torch.Generator().manual_seed(1)),
                                        dim=-1)
    eos = tok.eos_token_id
    with torch.inference_mode():
        prefix = head.prefix(emb)
    attention = torch.ones(prefix.shape[:2], dtype=torch.long)
    n, steps = args.posters, args.new_tokens
    load = os.getloadavg()[0]

    decoding = DecodingConfig(strategy="beam", num_beams=args.beams, max_new_tokens=steps, min_new_tokens=steps)
    hf_kwargs = dict(num_beams=args.beams, max_new_tokens=steps, min_new_tokens=steps, length_penalty=1.0,
                     early_stopping=True, do_sample=False, eos_token_id=eos, pad_token_id=eos, use_cache=True)

    def project():
        return head.generate(emb, decoding, batch_size=n)

    def plain():
        with torch.inference_mode():
            return lm.generate(inputs_embeds=prefix, attention_mask=attention, **hf_kwargs)

    naive_n = max(1, min(args.naive_posters, n))

    # Warm-up: first calls allocate and pick kernels.
    with torch.inference_mode():
        head.generate(emb[:2], DecodingConfig(strategy="beam", num_beams=args.beams, max_new_tokens=4,
                                              min_new_tokens=4), batch_size=2)
        naive_beam_search(lm, prefix[:1], args.beams, 2, eos)
    results: dict = {"posters": n, "beams": args.beams, "new_tokens": steps, "threads": torch.get_num_threads(),
                     "load_average_1min": round(load, 2)}
    times: dict[str, list[float]] = {"project_batched": [], "transformers_generate": []}
    decoders = {"project_batched": project, "transformers_generate": plain}
    outputs: dict = {}
    for r in range(max(1, args.rounds)):
        order = list(decoders) if r % 2 == 0 else list(reversed(decoders))
        for name in order:
            start = time.perf_counter()
            outputs[name] = decoders[name]()
            times[name].append(time.perf_counter() - start)
    naive_times, naive_out = [], []
    with torch.inference_mode():
        for i in range(naive_n):
            start = time.perf_counter()
            naive_out.append(naive_beam_search(lm, prefix[i:i + 1], args.beams, steps, eos))
            naive_times.append(time.perf_counter() - start)
    t_project, t_plain = min(times["project_batched"]), min(times["transformers_generate"])
    t_naive = min(naive_times)  # seconds per poster
    out_project, plain_ids = outputs["project_batched"], outputs["transformers_generate"].tolist()
    same_as_plain = sum(tok.decode(a) == out_project[i][0].raw for i, a in enumerate(plain_ids))
    same_as_naive = sum(tok.decode(a) == tok.decode(naive_out[i]) for i, a in enumerate(plain_ids[:naive_n]))
    rates = {"project_batched": n / t_project, "transformers_generate": n / t_plain, "naive_loop": 1 / t_naive}
    results.update({
        "taglines_per_second": {k: round(v, 3) for k, v in rates.items()},
        "seconds": {k: [round(t, 2) for t in v] for k, v in times.items()}
        | {"naive_loop_per_poster": [round(t, 2) for t in naive_times]},
        "speedup_vs_naive": round(rates["project_batched"] / rates["naive_loop"], 1),
        "project_vs_generate": round(rates["project_batched"] / rates["transformers_generate"], 3),
        "same_output_as_generate": f"{same_as_plain}/{n}",
        "same_best_beam_as_naive": f"{same_as_naive}/{naive_n}",
        "within_length_limit": all(c.tokens <= steps for cands in out_project for c in cands),
    })

    # Training throughput: joint mode, batch 16, 20-token texts, AdamW.
    head.train()
    opt = torch.optim.AdamW(head.parameters(), lr=2e-5)
    g = torch.Generator().manual_seed(2)
    batch_emb = torch.nn.functional.normalize(torch.randn(16, 512, generator=g), dim=-1)
    labels = torch.randint(0, len(tok) - 1, (16, 20), generator=g)

    def train_step():
        loss, count = head.loss(batch_emb, labels)
        (loss / count).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return count

    train_step()  # warm-up
    start = time.perf_counter()
    tokens = sum(train_step() for _ in range(args.train_steps))
    train_seconds = time.perf_counter() - start
    results["training_tokens_per_second"] = round(tokens / train_seconds, 1)
    results["training_seconds_per_step"] = round(train_seconds / args.train_steps, 3)

    results["load_average_1min_end"] = round(os.getloadavg()[0], 2)
    if args.json:
        print(json.dumps(results, indent=2))
    else:
        r = results["taglines_per_second"]
        print(f"GPT-2 124M (random weights), {n} posters, {args.beams} beams, {steps} new tokens, "
              f"{results['threads']} threads, load average {load:.2f} -> {results['load_average_1min_end']:.2f}")
        print(f"  project batched generate   {r['project_batched']:8.3f} taglines/s  (best of "
              f"{len(times['project_batched'])}: {t_project:.1f} s for {n})")
        print(f"  transformers generate      {r['transformers_generate']:8.3f} taglines/s  (best of "
              f"{len(times['transformers_generate'])}: {t_plain:.1f} s for {n})")
        print(f"  naive loop (ClipCap-style) {r['naive_loop']:8.3f} taglines/s  (best of {naive_n} posters: "
              f"{t_naive:.1f} s each)")
        print(f"  speed-up over naive {results['speedup_vs_naive']}x; project / generate "
              f"{results['project_vs_generate']}")
        print(f"  same text as generate: {results['same_output_as_generate']}; same best beam as naive: "
              f"{results['same_best_beam_as_naive']}")
        print(f"training (joint, batch 16, 20-token texts): {results['training_tokens_per_second']:.0f} tokens/s "
              f"({results['training_seconds_per_step']:.2f} s/step)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
