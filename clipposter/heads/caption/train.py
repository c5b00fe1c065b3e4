"""Training the caption head: `TrainConfig` (the optimiser settings), the loop, per-epoch checkpoints
and resuming, and the `TrainResult` a run returns.

Training writes a complete head per epoch under `OUT/checkpoints/epoch-NNNN/` together with the
optimizer state, scheduler state and data-order seed, so `resume=True` continues bit-for-bit; when the
last epoch is done, OUT itself becomes the finished head (hard links to the last checkpoint's files).
Only the last `keep_checkpoints` checkpoints stay on disk (one by default: with GPT-2 a checkpoint is
~1.5 GB, two thirds of it optimizer state); 0 removes them once the finished head is written.

Under `accelerate launch` or `torchrun` the head trains data-parallel (heads/distributed.py): `batch_size`
stays the global batch, each rank back-propagates its share of it weighted by the global batch's token
count, the validation loss is summed over the ranks' shares, and only rank 0 writes checkpoints, the
head and the progress output.
"""
from __future__ import annotations

import contextlib
import logging
import math
import os
import shutil
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from clipposter.embedding.backbone import resolve_device
from clipposter.errors import ClipposterError, ConfigError
from clipposter.files import atomic_path, read_json
from clipposter.heads import distributed
from clipposter.heads.caption.config import DEFAULT_LM
from clipposter.heads.caption.lm import first_line
from clipposter.heads.caption.model import CONFIG_FILE, LM_DIR, MAPPER_FILE, CaptionHead, write_head_json

__all__ = ["CHECKPOINTS", "LATEST", "TrainConfig", "TrainResult", "time_estimate", "train_caption_head",
           "validation_loss"]

log = logging.getLogger(__name__)

CHECKPOINTS = "checkpoints"
LATEST = "latest.json"
TRAINER_STATE = "trainer_state.json"
# The time estimate is printed once the first epoch has run this many batches or seconds, whichever
# comes first: enough to be past the first steps' allocations, early enough to decide to stop.
ESTIMATE_AFTER_BATCHES = 20
ESTIMATE_AFTER_SECONDS = 10.0


@dataclass
class TrainConfig:
    """How to train: the optimiser, schedule, seed and device (the head's shape is set by the
    arguments of `train_caption_head`)."""

    epochs: int = 10
    batch_size: int = 16  # the paper's best
    accumulate: int = 1  # optimizer step every `accumulate` batches
    lr: float = 2e-5  # the paper's best for joint training of GPT-2
    warmup_steps: int | None = None  # None: 10 % of all optimizer steps, at most ClipCap's 5000
    weight_decay: float = 0.0
    max_grad_norm: float = 1.0
    seed: int = 0
    device: str = "auto"
    keep_checkpoints: int = 1  # checkpoints left on disk; 0: none once the finished head is written

    def validate(self) -> "TrainConfig":
        for name in ("epochs", "batch_size", "accumulate"):
            if getattr(self, name) < 1:
                raise ConfigError(name, f"must be at least 1, got {getattr(self, name)}")
        if self.lr <= 0:
            raise ConfigError("lr", f"must be positive, got {self.lr}")
        if self.warmup_steps is not None and self.warmup_steps < 0:
            raise ConfigError("warmup_steps", f"must be 0 or more, got {self.warmup_steps}")
        if self.keep_checkpoints < 0:
            raise ConfigError("keep_checkpoints", f"must be 0 or more, got {self.keep_checkpoints}")
        return self


@dataclass
class TrainResult:
    """What a training run did: where the head is, the per-epoch history and the throughput."""

    out: str
    target: str
    mode: str
    epochs: int
    resumed_from_epoch: int
    steps: int
    train_examples: int
    validation_examples: int
    skipped: dict
    truncated: dict
    history: list = field(default_factory=list)
    seconds: float = 0.0
    tokens_per_second: float = 0.0

    def to_dict(self) -> dict:
        return asdict(self)


def _duration(seconds: float) -> str:
    if seconds < 90:
        return f"{max(1, round(seconds))} s"
    if seconds < 90 * 60:
        return f"{round(seconds / 60)} min"
    return f"{seconds / 3600:.1f} h"


def time_estimate(seconds_per_batch: float, batches_per_epoch: int, epochs: int) -> str:
    """"≈ 3 min/epoch, ≈ 12 min in all" for `epochs` epochs still to run (validation not included)."""
    per_epoch = seconds_per_batch * batches_per_epoch
    text = f"≈ {_duration(per_epoch)}/epoch"
    return text + (f", ≈ {_duration(per_epoch * epochs)} in all" if epochs > 1 else "")


def _examples(cache, split: str, head: CaptionHead) -> tuple[np.ndarray, list[list[int]], int, int]:
    records = cache.records(split)
    ids, skipped, truncated = head.encode_targets([getattr(r, head.config.target) for r in records])
    keep = [i for i, x in enumerate(ids) if x is not None]
    emb = cache.embeddings_for_ids([records[i].id for i in keep]) if keep else np.zeros((0, cache.dim), np.float32)
    return emb, [ids[i] for i in keep], skipped, truncated


def _lr_lambda(warmup: int, total: int):
    def fn(step: int) -> float:
        # Linear warmup, then linear decay to zero (ClipCap's schedule).
        if step < warmup:
            return (step + 1) / (warmup + 1)
        return max(0.0, (total - step) / max(1, total - warmup))
    return fn


def _autocast(device: torch.device):
    if device.type != "cuda":
        return contextlib.nullcontext(), None
    dtype = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    scaler = torch.amp.GradScaler("cuda") if dtype == torch.float16 else None
    return torch.autocast("cuda", dtype=dtype), scaler


@torch.no_grad()
def _validation_sums(head: CaptionHead, emb: np.ndarray, ids: list[list[int]], batch_size: int = 64) -> tuple[float, int]:
    """Summed cross-entropy over the text tokens of `ids` and their number."""
    was = head.training
    head.eval()
    total, count = 0.0, 0
    for start in range(0, len(ids), batch_size):
        loss, n = head.loss(torch.from_numpy(emb[start:start + batch_size]), head.batch(ids[start:start + batch_size]))
        total += float(loss)
        count += n
    head.train(was)
    return total, count


def validation_loss(head: CaptionHead, emb: np.ndarray, ids: list[list[int]], batch_size: int = 64) -> float | None:
    """Mean cross-entropy per text token (nats), or None with no examples."""
    if not ids:
        return None
    total, count = _validation_sums(head, emb, ids, batch_size)
    return total / max(1, count)


def _shared_validation_loss(head: CaptionHead, emb: np.ndarray, ids: list[list[int]],
                            ranks: distributed.Ranks) -> float | None:
    """`validation_loss` with each rank scoring its share of the examples and the sums reduced."""
    if not ranks.active:
        return validation_loss(head, emb, ids)
    if not ids:
        return None
    share = torch.tensor_split(torch.arange(len(ids)), ranks.world_size)[ranks.rank].tolist()
    total, count = distributed.all_sums(_validation_sums(head, emb[share], [ids[i] for i in share]), ranks)
    return total / max(1, count)


class _LossModule(torch.nn.Module):
    """The head's training loss as a forward pass, the call DistributedDataParallel synchronises."""

    def __init__(self, head: CaptionHead):
        super().__init__()
        self.head = head

    def forward(self, emb: torch.Tensor, labels):
        return self.head.loss(emb, labels)


def _set_train_mode(head: CaptionHead) -> None:
    head.train()
    if head.config.mode == "prefix":
        # Frozen LM: no dropout inside it either, as ClipCap's prefix-only model does.
        head.lm.eval()


def _latest_checkpoint(out: Path) -> Path | None:
    pointer = out / CHECKPOINTS / LATEST
    if not pointer.is_file():
        return None
    try:
        name = read_json(pointer)["checkpoint"]
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise ClipposterError(f"{pointer}: unreadable ({first_line(exc)}); delete {out / CHECKPOINTS} "
                              f"and train from scratch") from None
    path = out / CHECKPOINTS / name
    if not (path / CONFIG_FILE).is_file():
        raise ClipposterError(f"{path}: the checkpoint named by {pointer} is incomplete; delete it and train again")
    return path


def _save_checkpoint(head: CaptionHead, out: Path, epoch: int, optimizer, scheduler, state: dict,
                     keep: int = 1) -> Path:
    """A complete head plus optimizer/scheduler state; the pointer moves only once it is whole. Then
    all but the last `keep` checkpoints (at least this one, which resuming and the export need) go."""
    root = out / CHECKPOINTS
    path = root / f"epoch-{epoch:04d}"
    shutil.rmtree(path, ignore_errors=True)
    head.save_pretrained(path)
    # Optimizer moments are tensors: torch.save of a plain state dict, read back with weights_only.
    torch.save(optimizer.state_dict(), path / "optimizer.pt")
    write_head_json(path / TRAINER_STATE, {**state, "scheduler": scheduler.state_dict()})
    write_head_json(root / LATEST, {"checkpoint": path.name, "epoch": epoch})
    # Zero-padded names sort by epoch; one numbered past this epoch is a leftover and goes too.
    kept = sorted(p for p in root.glob("epoch-*") if p.name <= path.name)[-max(1, keep):]
    for old in root.glob("epoch-*"):
        if old not in kept:
            shutil.rmtree(old, ignore_errors=True)
    return path


def _export(checkpoint: Path, out: Path) -> None:
    """Make OUT itself the finished head: hard links to the last checkpoint's files (no copy)."""
    (out / CONFIG_FILE).unlink(missing_ok=True)

    def link(src: str, dst: str) -> None:
        try:
            os.link(src, dst)
        except OSError:
            shutil.copy2(src, dst)

    shutil.rmtree(out / LM_DIR, ignore_errors=True)
    shutil.copytree(checkpoint / LM_DIR, out / LM_DIR, copy_function=link)
    (out / MAPPER_FILE).unlink(missing_ok=True)
    link(str(checkpoint / MAPPER_FILE), str(out / MAPPER_FILE))
    with atomic_path(out / CONFIG_FILE) as tmp:  # last: the folder is a head only once it is whole
        shutil.copy2(checkpoint / CONFIG_FILE, tmp)


def train_caption_head(cache, out: str | os.PathLike, *, lm: str | Any = DEFAULT_LM, tokenizer: str | Any | None = None,
                       target: str = "tagline", mode: str = "joint", mapper: str = "mlp", prefix_length: int = 10,
                       mapper_hidden: int = 0, mapper_layers: int = 8, max_tokens: int = 40, center: bool = True,
                       train: TrainConfig | None = None, resume: bool = False, progress: bool = True) -> TrainResult:
    """Train a caption head on the cache's train split and write it to `out`.

    A checkpoint is written after every epoch; `resume=True` continues from the last one (with
    `train.epochs` the new total). Validation loss is reported per epoch when the cache has a
    validation split. With `progress`, a bar, a time estimate after the first steps and each epoch's
    losses are printed on stderr (stdout is left to the caller's results)."""
    from tqdm.auto import tqdm

    cfg = (train or TrainConfig()).validate()
    out = Path(out)
    device = resolve_device(cfg.device)
    ranks = distributed.launched()
    if ranks.active and device.type == "cuda" and device.index is None:
        device = torch.device("cuda", ranks.local_rank)  # one device per launched process
    progress = progress and ranks.is_main
    started = time.perf_counter()
    checkpoint = _latest_checkpoint(out) if resume else None
    if not resume and ((out / CONFIG_FILE).exists() or (out / CHECKPOINTS / LATEST).exists()):
        raise ConfigError("resume", f"is off, but {out} already holds a caption head or checkpoints; turn it on to "
                                    f"continue training them, or train into another out folder")
    if resume and checkpoint is None:
        raise ConfigError("resume", f"is on, but {out} has no checkpoint to resume from "
                                    f"({out / CHECKPOINTS / LATEST} is missing); turn it off to start training")

    state: dict = {}
    if checkpoint is not None:
        head = CaptionHead.from_pretrained(checkpoint, device="cpu")
        state = read_json(checkpoint / TRAINER_STATE)
        want = {"target": target, "mode": mode}
        for key, value in want.items():
            if getattr(head.config, key) != value:
                raise ConfigError(key, f"is {value}, but the checkpoint {checkpoint} was trained with "
                                       f"{getattr(head.config, key)}; resume with the same {key} or train into "
                                       f"another out folder")
    else:
        head = CaptionHead.create(cache.identity, lm=lm, tokenizer=tokenizer, backbone_spec=cache.backbone_spec,
                                  prefix_length=prefix_length, mapper=mapper, mapper_hidden=mapper_hidden,
                                  mapper_layers=mapper_layers, target=target, max_tokens=max_tokens, mode=mode,
                                  center=center, seed=cfg.seed)
    head.check_backbone(cache.identity, f"the cache {cache.root}")
    head.to(device)

    emb, ids, skipped, truncated = _examples(cache, "train", head)
    if not ids:
        raise ClipposterError(f"the cache {cache.root} has no train-split posters with a {target}; "
                              f"embed posters with {target}s (the manifest's {target} column) first")
    val_emb, val_ids, val_skipped, val_truncated = _examples(cache, "validation", head)
    if checkpoint is None:
        head.fit_center(emb)

    if head.config.mode == "prefix":
        head.lm.requires_grad_(False)
        params = list(head.mapper.parameters())
    else:
        params = list(head.parameters())
    optimizer = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    batches_per_epoch = math.ceil(len(ids) / cfg.batch_size)
    steps_per_epoch = math.ceil(batches_per_epoch / cfg.accumulate)
    total_steps = steps_per_epoch * cfg.epochs
    warmup = cfg.warmup_steps if cfg.warmup_steps is not None else min(5000, total_steps // 10)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, _lr_lambda(warmup, total_steps))
    first_epoch = 0
    history: list = []
    if checkpoint is not None:
        optimizer.load_state_dict(torch.load(checkpoint / "optimizer.pt", map_location=device, weights_only=True))
        scheduler.load_state_dict(state["scheduler"])
        first_epoch = int(state["epoch"])
        history = list(state.get("history", []))
        if state.get("batch_size") != cfg.batch_size or state.get("seed") != cfg.seed:
            log.warning("resuming with batch size %s / seed %s (checkpoint: %s / %s): the data order differs "
                        "from an uninterrupted run", cfg.batch_size, cfg.seed, state.get("batch_size"), state.get("seed"))
        if first_epoch >= cfg.epochs:
            raise ConfigError("epochs", f"is {cfg.epochs}, but {checkpoint} is already trained for {first_epoch} "
                                        f"epochs; set it larger than {first_epoch} to train further")

    distributed.setup(device)
    if device.type == "cuda" and ranks.active:
        torch.cuda.set_device(device)
    forward = distributed.wrap_module(_LossModule(head), ranks, device) if ranks.active else head.loss
    autocast, scaler = _autocast(device)
    emb_t = torch.from_numpy(np.ascontiguousarray(emb, dtype=np.float32))
    tokens_seen, train_seconds = 0, 0.0
    step = int(state.get("step", 0))
    devices = [device] if device.type == "cuda" else []
    estimate_due = progress
    with torch.random.fork_rng(devices=devices):
        for epoch in range(first_epoch, cfg.epochs):
            # Data order and dropout depend only on (seed, epoch): a resumed run matches an
            # uninterrupted one.
            # Ranks past 0 draw dropout masks of their own.
            torch.manual_seed(cfg.seed * 100_003 + epoch + 1_000_003 * ranks.rank)
            order = torch.randperm(len(ids), generator=torch.Generator().manual_seed(cfg.seed * 100_003 + epoch))
            _set_train_mode(head)
            t0 = time.perf_counter()
            epoch_loss, epoch_tokens = 0.0, 0
            bar = tqdm(range(batches_per_epoch), desc=f"epoch {epoch + 1}/{cfg.epochs}", unit="batch",
                       disable=not progress, leave=False, file=sys.stderr)
            optimizer.zero_grad(set_to_none=True)
            for b in bar:
                if b % cfg.accumulate == 0:
                    # The accumulated batch's token count, so the summed losses average over all of it.
                    window = order[b * cfg.batch_size:(b + cfg.accumulate) * cfg.batch_size]
                    window_tokens = sum(len(ids[i]) for i in window.tolist())
                rows, own = distributed.shard(order[b * cfg.batch_size:(b + 1) * cfg.batch_size], ranks)
                rows = rows.tolist()
                labels = head.batch([ids[i] for i in rows])
                stepping = (b + 1) % cfg.accumulate == 0 or b + 1 == batches_per_epoch
                # Gradients are averaged over the ranks only at the batch that steps.
                with (forward.no_sync() if ranks.active and not stepping else contextlib.nullcontext()):
                    with autocast:
                        loss_sum, n_tokens = forward(emb_t[rows], labels)
                    loss = loss_sum / window_tokens
                    if ranks.active:
                        # DDP averages the ranks' gradients: × world makes it the global window's sum
                        # over its tokens; a rank with no rows of this batch adds nothing.
                        loss = loss * (ranks.world_size if own else 0.0)
                    (scaler.scale(loss) if scaler else loss).backward()
                if own:
                    epoch_loss += float(loss_sum.detach())
                    epoch_tokens += n_tokens
                if stepping:
                    if scaler:
                        scaler.unscale_(optimizer)
                    if cfg.max_grad_norm:
                        torch.nn.utils.clip_grad_norm_(params, cfg.max_grad_norm)
                    if scaler:
                        scaler.step(optimizer)
                        scaler.update()
                    else:
                        optimizer.step()
                    scheduler.step()
                    optimizer.zero_grad(set_to_none=True)
                    step += 1
                bar.set_postfix(loss=f"{epoch_loss / max(1, epoch_tokens):.3f}", lr=f"{scheduler.get_last_lr()[0]:.1e}")
                if estimate_due:
                    done, elapsed = b + 1, time.perf_counter() - t0
                    if (done >= ESTIMATE_AFTER_BATCHES or elapsed >= ESTIMATE_AFTER_SECONDS
                            or (done == batches_per_epoch and epoch + 1 < cfg.epochs)):
                        tqdm.write(time_estimate(elapsed / done, batches_per_epoch, cfg.epochs - epoch),
                                   file=sys.stderr)
                        estimate_due = False
            bar.close()
            if ranks.active:
                epoch_loss, epoch_tokens = distributed.all_sums([epoch_loss, epoch_tokens], ranks)
                epoch_tokens = int(epoch_tokens)
            seconds = time.perf_counter() - t0
            tokens_seen += epoch_tokens
            train_seconds += seconds
            val = _shared_validation_loss(head, val_emb, val_ids, ranks)
            record = {"epoch": epoch + 1, "train_loss": round(epoch_loss / max(1, epoch_tokens), 5),
                      "validation_loss": None if val is None else round(val, 5), "seconds": round(seconds, 3),
                      "tokens_per_second": round(epoch_tokens / max(seconds, 1e-9), 1)}
            history.append(record)
            if progress:
                tqdm.write(f"epoch {epoch + 1}: train loss {record['train_loss']:.4f}"
                           + (f", validation loss {val:.4f}" if val is not None else ""), file=sys.stderr)
            head.training_record = {"epochs": epoch + 1, "steps": step, "lr": cfg.lr, "batch_size": cfg.batch_size,
                                    "accumulate": cfg.accumulate, "warmup_steps": warmup, "history": history,
                                    "train_examples": len(ids), "cache": str(cache.root)}
            if ranks.is_main:
                latest = _save_checkpoint(head, out, epoch + 1, optimizer, scheduler,
                                          {"epoch": epoch + 1, "step": step, "seed": cfg.seed,
                                           "batch_size": cfg.batch_size, "history": history}, cfg.keep_checkpoints)
    if ranks.is_main:
        _export(latest, out)
        if cfg.keep_checkpoints == 0:
            shutil.rmtree(out / CHECKPOINTS, ignore_errors=True)  # OUT's files are links of their own
    distributed.barrier(ranks)  # every process returns once the head is whole
    return TrainResult(out=str(out), target=head.config.target, mode=head.config.mode, epochs=cfg.epochs,
                        resumed_from_epoch=first_epoch, steps=step, train_examples=len(ids),
                        validation_examples=len(val_ids),
                        skipped={"train": skipped, "validation": val_skipped},
                        truncated={"train": truncated, "validation": val_truncated}, history=history,
                        seconds=round(time.perf_counter() - started, 3),
                        tokens_per_second=round(tokens_seen / max(train_seconds, 1e-9), 1))


