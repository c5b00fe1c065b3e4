"""`clipposter train backbone`: a small CLIP trained contrastively on posters and their own texts.

Parsing only at import time: torch and open_clip are imported inside the command.
"""
from __future__ import annotations

from clipposter.cli.common import add_device_flag, add_json_flag, add_source_args, emit, load_records, warn
from clipposter.errors import ClipposterError

DEFAULT_ARCH = "clipposter-tiny"


def cmd_train_backbone(args) -> int:
    from clipposter.embedding.contrastive import ContrastiveConfig, parse_text_kinds, train_backbone

    config = ContrastiveConfig(arch=args.arch, epochs=args.epochs, batch_size=args.batch_size, lr=args.lr,
                               weight_decay=args.weight_decay, texts=parse_text_kinds(args.texts),
                               seed=args.seed).check()
    records = load_records(args)
    if not records:
        raise ClipposterError(f"{args.source}: no posters found; check the path and the manifest columns")
    if args.threads is not None:
        if args.threads < 1:
            raise ClipposterError(f"--threads must be at least 1, got {args.threads}")
        import torch

        torch.set_num_threads(args.threads)
    result = train_backbone(records, args.out, config, device=args.device, force=args.force,
                            progress=not args.json, source=args.source)
    if result.skipped:
        first_id, reason = result.skipped[0]
        warn([f"{len(result.skipped)} training posters left out (first: {first_id}: {reason})"])
    h = result.history
    usage = f"--backbone {result.arch} --pretrained {result.path}"
    payload = {**result.to_dict(), "usage": usage}
    text = "\n".join([
        f"trained {result.arch} ({result.parameters / 1e6:.1f}M parameters) on the {result.posters} posters of the "
        f"train split; {result.held_out} posters of other splits held out, not trained on",
        f"{len(h)} epochs in {result.seconds:.1f} s; contrastive loss {h[0]:.3f} (epoch 1) → {h[-1]:.3f} "
        f"(epoch {len(h)})",
        f"saved {result.path} (sha256 {result.sha256[:16]}…) and {result.config_path.name} beside it",
        f"use it: clipposter embed SOURCE --cache DIR {usage}",
    ])
    emit(args, payload, text)
    return 0


def register(sub, train, evaluate) -> None:
    """Add `train backbone`."""
    p = train.add_parser(
        "backbone", help="train a small CLIP contrastively on posters and their texts (offline work)",
        description="Train a small open_clip architecture from scratch with open_clip's ClipLoss (AdamW, seeded) on "
                    "the posters of SOURCE's train split only, each paired with one of its texts per epoch (title, "
                    "tagline, overview or a genre prompt). Saves --out/backbone.safetensors and backbone.json; use it "
                    "with --backbone ARCH --pretrained OUT/backbone.safetensors. For offline work, tests and small "
                    "domain experiments: the product's CLIP stays frozen. See docs/backbone.md.")
    p.add_argument("source", metavar="SOURCE", help="folder, manifest (.csv/.parquet), MovieGenre.csv, or kaggle:DIR")
    p.add_argument("--out", metavar="DIR", required=True, help="folder for backbone.safetensors and backbone.json")
    p.add_argument("--arch", default=DEFAULT_ARCH, help=f"open_clip architecture (default {DEFAULT_ARCH})")
    p.add_argument("--epochs", type=int, default=30, help="passes over the training posters (default 30)")
    p.add_argument("--batch-size", type=int, default=64, help="posters per contrastive batch (default 64)")
    p.add_argument("--lr", type=float, default=2e-3, help="AdamW peak learning rate (default 2e-3)")
    p.add_argument("--weight-decay", type=float, default=0.1, help="AdamW weight decay of the matrices (default 0.1)")
    p.add_argument("--texts", default="title,tagline,genres",
                   help="texts paired with the posters, comma-separated: title, tagline, overview, genres "
                        "(genre prompts); default title,tagline,genres")
    p.add_argument("--force", action="store_true",
                   help="train an architecture above the CPU parameter budget (25M) on a CPU anyway")
    p.add_argument("--threads", type=int, default=None,
                   help="torch CPU threads (default: one per core); 1 is often faster on a machine other jobs share")
    add_device_flag(p)
    add_source_args(p)
    seed = next(a for a in p._actions if a.dest == "seed")
    seed.help = "seed of the split of records without one, and of the training (default 0)"
    add_json_flag(p)
    p.set_defaults(func=cmd_train_backbone)
