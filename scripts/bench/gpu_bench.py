"""GPU figures in one run: embedding from JPEG files, genre-head training, caption training, taglines.

Every stage goes through the library's own entry points and prints one table (`--json`: the same
as JSON):

  embedding        `embed_records` from JPEG files into a fresh cache, fp16 autocast on CUDA, batch
                   256: (a) the model alone on preprocessed tensors (the ceiling), (b) Pillow decoding
                   in N CPU threads (`decode="cpu"`), (c) JPEGs decoded in batches on the GPU with the
                   preprocessing there too (`decode="gpu"`, embedding/gpu_decode.py). Rates count the
                   decode + encode + commit of the new posters; "end to end" adds the hashing pass.
                   Median of `--rounds`; the posters' files are in the page cache after the first read.
  genre training   `fit_decoder`, the default ML-Decoder (width 768, MLP 512, batch 256) on 35,000
                   random unit vectors × 25 genres with a 3,500-row validation pass per epoch; the
                   genre trainer runs on the CPU (its device is the CPU whatever --device says).
  caption training `train_caption_head` on the embedding stage's cache (taglines of the synthetic
                   posters), joint mode, bf16/fp16 autocast on CUDA: text tokens/s of the last epoch.
  taglines         `CaptionHead.generate` of the trained head, 4 beams, a fixed number of new tokens
                   (end-of-text suppressed), all posters in one batch: taglines/s, best of 2 after a
                   warm-up.

Weights: ViT-B-32 with random weights unless `--pretrained PATH` (speed does not depend on the
weights; the table says which). The caption LM is `--lm DIR` (a Hugging Face folder such as GPT-2)
or, offline, a GPT-2-shaped model (12 layers × 768) with random weights on a byte-level BPE trained
on the posters' texts, its output layer padded to GPT-2's 50,257 rows so that a token costs what it
costs in GPT-2 124M (its 24 heads of 32 against GPT-2's 12 of 64 aside). `--quick` shrinks everything (tiny CLIP, tiny LM, a
few posters) so that the script runs in seconds on a CPU: a check that it works, not a figure.

    python scripts/bench/gpu_bench.py [--work DIR] [--pretrained PATH] [--lm DIR] [--device auto|cuda|cpu]
                                      [--quick] [--json]
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

FULL = {"backbone": "ViT-B-32", "posters": 4096, "size": "512x768", "batch_size": 256, "rounds": 3,
        "genre_posters": 35_000, "genre_validation": 3_500, "genre_epochs": 3, "caption_epochs": 2,
        "caption_batch": 64, "lm_layers": 12, "lm_width": 768, "lm_vocab": 8192, "lm_rows": 50_257, "generate": 256,
        "beams": 4, "new_tokens": 24}
QUICK = {"backbone": "clipposter-tiny", "posters": 24, "size": "200x300", "batch_size": 8, "rounds": 1,
         "genre_posters": 600, "genre_validation": 100, "genre_epochs": 1, "caption_epochs": 1,
         "caption_batch": 8, "lm_layers": 2, "lm_width": 64, "lm_vocab": 400, "lm_rows": 1000, "generate": 4,
         "beams": 2, "new_tokens": 6}


def _synth_part(args: tuple[str, int, int, tuple[int, int]]) -> list[dict]:
    from clipposter.ingest.synthetic import generate_posters

    folder, n, seed, size = args
    return [r.to_dict() for r in generate_posters(folder, n=n, seed=seed, size=size)]


def make_posters(work: Path, n: int, size: tuple[int, int], processes: int) -> tuple[list, float]:
    """n distinct synthetic JPEG posters under work/posters (kept for the next run), generated in
    `processes` parts in parallel; ids carry the part so that they stay unique."""
    from clipposter.records import PosterRecord

    started = time.perf_counter()
    parts = max(1, min(processes, n))
    counts = [n // parts + (i < n % parts) for i in range(parts)]
    jobs = [(str(work / "posters" / f"part-{i:02d}-{size[0]}x{size[1]}"), c, 1000 + i, size)
            for i, c in enumerate(counts)]
    with ProcessPoolExecutor(max_workers=parts) as pool:
        done = list(pool.map(_synth_part, jobs))
    records = []
    for i, part in enumerate(done):
        for d in part:
            d["id"] = f"p{i:02d}-{d['id']}"
            records.append(PosterRecord.from_dict(d))
    return records, time.perf_counter() - started


def bench_model(backbone, records, batch_size: int, seconds: float = 3.0) -> float:
    """Posters/s of the model alone on one batch of preprocessed tensors, repeated (already on the device)."""
    import torch

    from clipposter.embedding.embed import make_loader

    load = make_loader(backbone)
    pixels = torch.stack([load(r.image) for r in (records * (batch_size // max(1, len(records)) + 1))[:batch_size]])
    pixels = pixels.to(backbone.device)
    backbone.encode_image_tensors(pixels)  # warm-up; the call returns numpy, so each call is synchronised
    n, started = 0, time.perf_counter()
    while time.perf_counter() - started < seconds or n < 3:
        backbone.encode_image_tensors(pixels)
        n += 1
    return n * batch_size / (time.perf_counter() - started)


def bench_embed(backbone, records, root: Path, batch_size: int, workers: int, decode: str,
                tokens: bool = False) -> dict:
    from clipposter.embedding.cache import EmbeddingCache
    from clipposter.embedding.embed import embed_records

    cache = EmbeddingCache.open(root, backbone.identity)
    try:
        s = embed_records(records, cache, backbone, batch_size=batch_size, workers=workers, progress=False,
                          decode=decode, tokens=tokens)
    finally:
        cache.close()
    if s.encoded != len(records):
        raise SystemExit(f"error: the {decode} decode path encoded {s.encoded} of {len(records)} posters: "
                         f"{s.skipped_files[:3]}")
    return {"posters_per_second": s.encoded / s.encode_seconds, "end_to_end": s.encoded / s.seconds,
            "fallbacks": s.decode_fallbacks, "decode": s.decode}


def embedding_stage(args, cfg, records, work: Path, device: str) -> tuple[dict, object]:
    from clipposter.embedding import gpu_decode
    from clipposter.embedding.backbone import load_backbone

    backbone = load_backbone(cfg["backbone"], args.pretrained, device=device)
    if backbone.device.type != "cuda":
        # No GPU: the device decoder's code runs on the CPU (torchvision's libjpeg + the tensor
        # transform) so that the script is checked end to end; its rate is then no GPU figure.
        gpu_decode.GPU_DEVICE_TYPES = (*gpu_decode.GPU_DEVICE_TYPES, backbone.device.type)
    bs, workers = cfg["batch_size"], args.cpu_workers
    warm = records[: min(len(records), 2 * bs)]
    bench_embed(backbone, warm, work / "caches" / "warm-cpu", bs, workers, "cpu")  # allocators, kernels
    bench_embed(backbone, warm, work / "caches" / "warm-gpu", bs, workers, "gpu")  # nvjpeg handles
    runs: dict[str, list[dict]] = {"cpu": [], "gpu": []}
    for r in range(cfg["rounds"]):  # interleaved, so a busy spell hits both alike
        for decode in ("cpu", "gpu"):
            runs[decode].append(bench_embed(backbone, records, work / "caches" / f"{decode}-{r}", bs, workers,
                                            decode))
    # One run that also stores every poster's token sequence (embed --tokens: ViT-B-32 50 × 512 fp16,
    # 50 KB a poster written to the cache's shards).
    with_tokens = bench_embed(backbone, records, work / "caches" / "gpu-tokens", bs, workers, "gpu", tokens=True)
    model = bench_model(backbone, records, bs, seconds=0.5 if args.quick else 3.0)

    def median(decode, key):
        return statistics.median(run[key] for run in runs[decode])

    cpu, gpu = median("cpu", "posters_per_second"), median("gpu", "posters_per_second")
    result = {
        "backbone": cfg["backbone"], "weights": args.pretrained or "random (speed does not depend on the weights)",
        "precision": backbone.precision, "device": str(backbone.device), "posters": len(records),
        "poster_size": cfg["size"], "batch_size": bs, "cpu_workers": workers, "rounds": cfg["rounds"],
        "model_alone_posters_per_second": round(model, 1),
        "cpu_decode_posters_per_second": round(cpu, 1),
        "cpu_decode_end_to_end": round(median("cpu", "end_to_end"), 1),
        "gpu_decode_posters_per_second": round(gpu, 1),
        "gpu_decode_end_to_end": round(median("gpu", "end_to_end"), 1),
        "gpu_decode_fallbacks": max(run["fallbacks"] for run in runs["gpu"]),
        "gpu_decode_device": str(backbone.device),
        "gpu_over_cpu_decode": round(gpu / cpu, 3), "gpu_decode_over_model": round(gpu / model, 3),
        "gpu_decode_tokens_posters_per_second": round(with_tokens["posters_per_second"], 1),
        "tokens_over_pooled": round(with_tokens["posters_per_second"] / gpu, 3),
        "target_posters_per_second": 5000,
    }
    return result, backbone


def genre_stage(cfg, dim: int, seed: int = 0) -> dict:
    import torch

    from clipposter.heads.genre.config import DecoderConfig, TrainConfig
    from clipposter.heads.genre.model import MLDecoder
    from clipposter.heads.genre.train import fit_decoder

    n, nv, genres, epochs = cfg["genre_posters"], cfg["genre_validation"], 25, cfg["genre_epochs"]
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((n + nv, dim)).astype(np.float32)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    freq = np.clip(np.sort(rng.dirichlet(np.full(genres, 0.7)))[::-1] * 2.3, 0.005, 0.6)  # ~2.3 labels each
    y = (rng.random((n + nv, genres)) < freq).astype(np.int8)
    text = rng.standard_normal((genres, dim)).astype(np.float32)
    text /= np.linalg.norm(text, axis=1, keepdims=True)
    torch.manual_seed(seed)
    module = MLDecoder(DecoderConfig(embed_dim=dim, num_genres=genres), text)
    module.set_input_stats(x[:n])
    module.set_prior(y[:n].mean(0))
    options = TrainConfig(epochs=epochs, batch_size=256, patience=epochs + 1, lr_patience=epochs + 1, seed=seed)
    started = time.perf_counter()
    history = fit_decoder(module, x[:n], y[:n], x[n:], y[n:], options, progress=False)
    seconds = time.perf_counter() - started
    return {"posters": n, "validation": nv, "genres": genres, "dim": dim, "epochs": len(history),
            "seconds_per_epoch": round(seconds / len(history), 3), "seconds": round(seconds, 2),
            "device": "cpu", "torch_threads": torch.get_num_threads()}


def caption_stage(args, cfg, cache_dir: Path, work: Path, device: str) -> dict:
    from clipposter.embedding.cache import EmbeddingCache
    from clipposter.heads.caption.config import DecodingConfig
    from clipposter.heads.caption.model import CaptionHead
    from clipposter.heads.caption.tiny_lm import build_tiny_lm
    from clipposter.heads.caption.train import TrainConfig, train_caption_head

    with EmbeddingCache.open(cache_dir, mode="r") as cache:
        records = cache.records()
    if args.lm:
        lm, lm_label = args.lm, f"{args.lm} (given)"
    else:
        texts = [t for r in records for t in (r.tagline, r.overview) if t]
        lm = build_tiny_lm(work / "lm", texts, vocab_size=cfg["lm_vocab"], width=cfg["lm_width"],
                           layers=cfg["lm_layers"], positions=128)
        from transformers import AutoModelForCausalLM, AutoTokenizer

        vocab = len(AutoTokenizer.from_pretrained(lm))
        # The output layer padded to GPT-2's 50,257 rows: the same work per token as GPT-2 (ids past
        # the BPE's own decode to nothing, which does not matter to a speed figure).
        model = AutoModelForCausalLM.from_pretrained(lm)
        model.resize_token_embeddings(max(vocab, cfg["lm_rows"]), mean_resizing=False)
        model.save_pretrained(lm)
        lm_label = (f"random GPT-2-shaped LM, {cfg['lm_layers']} layers × {cfg['lm_width']}, "
                    f"{model.config.vocab_size:,} output rows ({vocab:,}-token BPE)")
    out = work / "caption-head"
    if out.exists():
        import shutil

        shutil.rmtree(out)
    with EmbeddingCache.open(cache_dir, mode="r") as cache:
        result = train_caption_head(cache, out, lm=lm, train=TrainConfig(
            epochs=cfg["caption_epochs"], batch_size=cfg["caption_batch"], device=device, keep_checkpoints=0),
            progress=False)
        emb = cache.embeddings_for_ids([r.id for r in records[: cfg["generate"]]])
    last = result.history[-1]
    head = CaptionHead.from_pretrained(out, device=device)  # device: resolved by main ("cuda", "cpu")
    steps = cfg["new_tokens"]
    decoding = DecodingConfig(strategy="beam", num_beams=cfg["beams"], max_new_tokens=steps, min_new_tokens=steps)
    head.generate(emb[:2], decoding, batch_size=2)  # warm-up
    times = []
    for _ in range(2):
        started = time.perf_counter()
        captions = head.generate(emb, decoding, batch_size=len(emb))
        times.append(time.perf_counter() - started)
    assert len(captions) == len(emb)
    return {
        "caption_training": {"lm": lm_label, "train_examples": result.train_examples, "epochs": len(result.history),
                             "batch_size": cfg["caption_batch"], "device": str(head.device),
                             "tokens_per_second": last["tokens_per_second"],
                             "seconds_per_epoch": last["seconds"]},
        "tagline_generation": {"posters": len(emb), "beams": cfg["beams"], "new_tokens": steps,
                               "taglines_per_second": round(len(emb) / min(times), 2),
                               "seconds": round(min(times), 3)},
    }


def table(result: dict) -> str:
    e, g, c, t = (result[k] for k in ("embedding", "genre_training", "caption_training", "tagline_generation"))
    rows = [
        ("embedding: model alone", f"{e['model_alone_posters_per_second']:,.0f} posters/s",
         f"{e['backbone']} {e['precision']}, batch {e['batch_size']}, preprocessed tensors on {e['device']}"),
        (f"embedding: CPU decode ({e['cpu_workers']} threads)", f"{e['cpu_decode_posters_per_second']:,.0f} posters/s",
         f"Pillow; end to end with hashing {e['cpu_decode_end_to_end']:,.0f}/s"),
        (f"embedding: GPU decode ({e['gpu_decode_device']})", f"{e['gpu_decode_posters_per_second']:,.0f} posters/s",
         f"{e['gpu_over_cpu_decode']:.2f} × CPU decode, {e['gpu_decode_over_model']:.2f} × model; end to end "
         f"{e['gpu_decode_end_to_end']:,.0f}/s; {e['gpu_decode_fallbacks']} fallbacks; target 5,000"),
        ("embedding: GPU decode + tokens", f"{e['gpu_decode_tokens_posters_per_second']:,.0f} posters/s",
         f"embed --tokens (one run): {e['tokens_over_pooled']:.2f} × the pooled cache's rate")
        if "tokens_over_pooled" in e else None,  # absent from results written before the row existed
        ("genre head training", f"{g['seconds_per_epoch']:.2f} s/epoch",
         f"{g['posters']:,} × {g['dim']}, {g['genres']} genres, batch 256, CPU ({g['torch_threads']} threads)"),
        ("caption training", f"{c['tokens_per_second']:,.0f} tokens/s",
         f"{c['lm']}, batch {c['batch_size']}, {c['device']}"),
        ("tagline generation", f"{t['taglines_per_second']:,.1f} taglines/s",
         f"{t['posters']} posters in one batch, {t['beams']} beams, {t['new_tokens']} new tokens"),
    ]
    rows = [r for r in rows if r is not None]
    head = (f"{result['gpu']} · {e['posters']:,} posters of {e['poster_size']} · weights: {e['weights']} · "
            f"{result['seconds_total']:.0f} s in all")
    w0, w1 = max(len(r[0]) for r in rows), max(len(r[1]) for r in rows)
    return "\n".join([head] + [f"{a:<{w0}}  {b:>{w1}}  {c}" for a, b, c in rows])


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--work", type=Path, default=None,
                    help="folder for the posters (kept and reused), caches and the caption head (default: a temporary one)")
    ap.add_argument("--pretrained", default=None, help="backbone checkpoint file (default: random weights)")
    ap.add_argument("--lm", default=None, help="Hugging Face folder of the caption LM (default: a random GPT-2-shaped one)")
    ap.add_argument("--device", default="auto", choices=["auto", "cuda", "cpu"])
    ap.add_argument("--cpu-workers", type=int, default=min(16, os.cpu_count() or 1),
                    help="decode threads of the CPU path and file readers of the GPU path")
    ap.add_argument("--posters", type=int, default=None, help="posters to embed (default 4096; --quick 24)")
    ap.add_argument("--quick", action="store_true", help="tiny models and sizes: a check that the script runs")
    ap.add_argument("--synth-only", action="store_true", help="only generate the posters into --work")
    ap.add_argument("--json", action="store_true")
    ap.add_argument("--table", type=Path, default=None, metavar="JSON",
                    help="print the table of a result this script wrote with --json, and stop")
    args = ap.parse_args(argv)
    if args.table:
        print(table(json.loads(args.table.read_text())))
        return 0
    cfg = dict(QUICK if args.quick else FULL)
    if args.posters:
        cfg["posters"] = args.posters
    if args.pretrained and args.quick:
        ap.error("--pretrained is for the full run's ViT-B-32; --quick uses the tiny test backbone")
    started = time.perf_counter()
    tmp = tempfile.TemporaryDirectory(prefix="clipposter-gpu-bench-") if args.work is None else None
    work = Path(tmp.name) if tmp else args.work
    work.mkdir(parents=True, exist_ok=True)
    try:
        size = tuple(int(v) for v in cfg["size"].split("x"))
        records, synth_s = make_posters(work, cfg["posters"], size, os.cpu_count() or 1)
        if args.synth_only:
            print(f"{len(records)} posters of {cfg['size']} under {work / 'posters'} ({synth_s:.1f} s)")
            return 0
        import torch

        from clipposter.embedding.backbone import resolve_device

        device = str(resolve_device(args.device))
        gpu = torch.cuda.get_device_name(0) if device.startswith("cuda") else f"no GPU ({device})"
        embedding, backbone = embedding_stage(args, cfg, records, work, device)
        dim = backbone.embed_dim
        del backbone
        if device.startswith("cuda"):
            torch.cuda.empty_cache()
        genre = genre_stage(cfg, dim)
        captions = caption_stage(args, cfg, work / "caches" / f"cpu-{cfg['rounds'] - 1}", work, device)
        result = {"gpu": gpu, "device": device, "quick": args.quick, "synth_seconds": round(synth_s, 1),
                  "embedding": embedding, "genre_training": genre, **captions,
                  "seconds_total": round(time.perf_counter() - started, 1)}
    finally:
        if tmp:
            tmp.cleanup()
    print(json.dumps(result, indent=2) if args.json else table(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
