"""Training the genre head: `fit_decoder` (the loop) and `train_genre_head` (a head of any kind from a
cache, thresholds calibrated, returned as a `TrainResult`).

Adam at 1e-4 (1e-3 under the small-data rule of config.py), learning rate halved when the validation
loss stalls, early stopping on the validation loss (the best epoch's weights are kept), seeded. After
training, per-genre and global thresholds are calibrated on the validation split by the rule of
`genre_calibrate_thresholds` and saved with the head.

Under `accelerate launch` or `torchrun` the ML-Decoder trains data-parallel (heads/distributed.py):
`batch_size` stays the global batch, each rank trains on its share and validates its share of the
validation split, and the sums are reduced so that every rank takes the same schedule and early-stopping
decisions. The other kinds fit whole in every process.
"""
from __future__ import annotations

import copy
import logging
import math
import time
from dataclasses import asdict, dataclass
from typing import Mapping, Sequence

import numpy as np
import torch
from torch import nn

from clipposter.embedding.prompts import DEFAULT_TEMPLATES
from clipposter.errors import ClipposterError, ConfigError
from clipposter.heads import distributed
from clipposter.heads.genre.baselines import fit_linear_probe
from clipposter.heads.genre.config import KINDS, DecoderConfig, TrainConfig, small_data_settings, train_config
from clipposter.heads.genre.data import (GenreData, genre_text_embeddings, load_genre_data, memory_inputs,
                                         require_tokens)
from clipposter.heads.genre.head import GenreHead
from clipposter.heads.genre.metrics import (CALIBRATION_MIN_SUPPORT, CALIBRATION_SHRINKAGE, genre_calibrate_thresholds,
                                            genre_prf)
from clipposter.heads.genre.model import INFER_BATCH, MLDecoder, ZeroShotClassifier, make_loss, positive_weights

log = logging.getLogger(__name__)

SMALL_VALIDATION = 200  # fewer validation posters than this: the calibration warning says the split is small


@dataclass
class EpochLog:
    epoch: int
    train_loss: float
    val_loss: float
    val_f1: float  # micro-F1 at 0.5
    lr: float
    seconds: float

    def to_dict(self) -> dict:
        return asdict(self)



@torch.no_grad()
def _evaluate_loss(module: nn.Module, x: torch.Tensor, y: torch.Tensor, loss_fn,
                   ranks: distributed.Ranks = distributed.Ranks()) -> tuple[float, np.ndarray]:
    module.eval()
    if ranks.active:  # each rank scores its share; the loss sums and the probabilities are gathered
        share = torch.tensor_split(torch.arange(x.shape[0]), ranks.world_size)[ranks.rank]
        x, y = x[share], y[share]
    total, logits = 0.0, []
    for start in range(0, x.shape[0], INFER_BATCH):
        out = module(x[start:start + INFER_BATCH])
        total += float(loss_fn(out, y[start:start + INFER_BATCH])) * out.shape[0]
        logits.append(out)
    probs = torch.sigmoid(torch.cat(logits)).numpy() if logits else np.zeros((0, y.shape[1]), np.float32)
    if ranks.active:
        total, count = distributed.all_sums([total, x.shape[0]], ranks)
        return total / max(1, count), distributed.gather_rows(probs, ranks)
    return total / max(1, x.shape[0]), probs


def _input_tensor(x: np.ndarray) -> torch.Tensor:
    """Inputs as a tensor; float16 stays float16 (token sequences: half the memory), the module
    computes in float32 batch by batch."""
    x = np.asarray(x)
    if x.dtype not in (np.float16, np.float32):
        x = x.astype(np.float32)
    return torch.from_numpy(np.ascontiguousarray(x))


def fit_decoder(module: MLDecoder, train_x: np.ndarray, train_y: np.ndarray, val_x: np.ndarray, val_y: np.ndarray,
                options: TrainConfig, progress: bool = True) -> list[EpochLog]:
    """Train `module` in place (Adam, lr halved on a validation-loss plateau, early stopping that
    keeps the best epoch's weights). Deterministic for a given seed and thread count.

    Launched in several processes, each trains on its share of every global batch of `batch_size`
    (see heads/distributed.py); only rank 0 shows the progress bar."""
    from tqdm.auto import tqdm

    options.validate()
    if len(train_x) == 0:
        raise ClipposterError("no labelled training posters: nothing to train on")
    if len(val_x) == 0:
        raise ClipposterError("no labelled validation posters: early stopping, the learning-rate schedule and "
                              "threshold calibration need a validation split")
    xt = _input_tensor(train_x)
    yt = torch.from_numpy(np.ascontiguousarray(train_y, dtype=np.float32))
    xv = _input_tensor(val_x)
    yv = torch.from_numpy(np.ascontiguousarray(val_y, dtype=np.float32))
    loss_fn = make_loss(options, positive_weights(train_y, options.pos_weight))
    generator = torch.Generator().manual_seed(options.seed)  # the same data order on every rank
    ranks = distributed.setup()
    model = distributed.wrap_module(module, ranks)
    if ranks.rank:
        torch.manual_seed(options.seed + ranks.rank)  # other ranks' rows get dropout masks of their own
    try:
        # The fused CPU kernel updates all parameters in one pass: ~6× faster than the loop version,
        # which is a tenth of a training step for this small model.
        optimizer = torch.optim.Adam(module.parameters(), lr=options.lr, weight_decay=options.weight_decay,
                                     fused=True)
    except (RuntimeError, TypeError):
        optimizer = torch.optim.Adam(module.parameters(), lr=options.lr, weight_decay=options.weight_decay)
    scheduler = torch.optim.lr_scheduler.ReduceLROnPlateau(optimizer, mode="min", factor=options.lr_factor,
                                                           patience=options.lr_patience)
    history: list[EpochLog] = []
    best_loss, best_state, stale = math.inf, copy.deepcopy(module.state_dict()), 0
    n = xt.shape[0]
    bar = tqdm(range(1, options.epochs + 1), desc="training genre head", unit="epoch",
               disable=not (progress and ranks.is_main))
    for epoch in bar:
        started = time.perf_counter()
        module.train()
        perm = torch.randperm(n, generator=generator)
        running, seen = 0.0, 0
        for start in range(0, n, options.batch_size):
            idx = perm[start:start + options.batch_size]
            rows, own = distributed.shard(idx, ranks)
            loss = loss_fn(model(xt[rows]), yt[rows])
            value = loss.item()
            if ranks.active:
                # The global batch's mean loss, and this rank's weight in it: DDP averages the ranks'
                # gradients, so each back-propagates (own rows × world / global rows) × its mean.
                value = distributed.all_sums([value * own if own else 0.0], ranks)[0] / idx.shape[0]
                loss = loss * (own * ranks.world_size / idx.shape[0])
            if not math.isfinite(value):
                raise ClipposterError(f"training diverged at epoch {epoch} (loss {value}); lower lr "
                                      f"(now {optimizer.param_groups[0]['lr']:g}) or use loss='bce'")
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            running += value * idx.shape[0]
            seen += idx.shape[0]
        val_loss, val_probs = _evaluate_loss(module, xv, yv, loss_fn, ranks)
        val_f1 = genre_prf(val_y, val_probs >= 0.5)["micro"]["f1"]
        lr = optimizer.param_groups[0]["lr"]
        history.append(EpochLog(epoch, running / max(1, seen), val_loss, val_f1, lr, time.perf_counter() - started))
        bar.set_postfix(loss=f"{running / max(1, seen):.4f}", val_loss=f"{val_loss:.4f}", val_f1=f"{val_f1:.3f}",
                        lr=f"{lr:.1e}")
        scheduler.step(val_loss)
        if val_loss < best_loss - 1e-6:
            best_loss, best_state, stale = val_loss, copy.deepcopy(module.state_dict()), 0
        else:
            stale += 1
            if stale >= options.patience:
                log.info("early stop at epoch %d: validation loss has not improved for %d epochs", epoch, stale)
                break
    bar.close()
    module.load_state_dict(best_state)
    module.eval()
    return history


@dataclass
class TrainResult:
    head: GenreHead
    data: GenreData
    history: list[EpochLog]
    seconds: float
    warnings: list[str]
    small_data: dict | None = None  # the small-data settings applied (see config.small_data_settings)

    @property
    def best_epoch(self) -> int | None:
        if not self.history:
            return None
        return min(self.history, key=lambda e: e.val_loss).epoch

    def to_dict(self) -> dict:
        return {"kind": self.head.kind, "genres": self.head.genres, "data": self.data.summary(),
                "epochs_run": len(self.history), "best_epoch": self.best_epoch,
                "history": [e.to_dict() for e in self.history], "seconds": round(self.seconds, 3),
                "thresholds": self.head.thresholds, "metrics": self.head.metrics, "warnings": self.warnings,
                "small_data": self.small_data,
                "backbone": self.head.identity.to_dict()}


def _validation_metrics(head: GenreHead, x: np.ndarray, y: np.ndarray) -> dict:
    probs = head.predict_proba(x)
    out = {}
    for name, t in (("0.5", np.full(len(head.genres), 0.5)), ("calibrated", head.thresholds_for())):
        prf = genre_prf(y, probs >= t[None, :])
        out[name] = {avg: {k: round(v, 4) for k, v in d.items()} for avg, d in prf.items()}
    return {"validation": out}


def _calibration_warnings(calibrated: dict, genres: Sequence[str], validation_posters: int) -> list[str]:
    """Say when the validation split is too small to place every genre's threshold on its own."""
    few = calibrated["fallback_genres"]
    if not few:
        return []
    if validation_posters < SMALL_VALIDATION or len(few) == len(genres):
        return [f"the validation split is small ({validation_posters} posters): {len(few)} of {len(genres)} genres "
                f"have fewer than {CALIBRATION_MIN_SUPPORT} validation positives and use the global threshold, the "
                f"others' thresholds are pulled toward it; more validation posters give each genre its own"]
    names = ", ".join(genres[i] for i in few)
    return [f"fewer than {CALIBRATION_MIN_SUPPORT} validation posters are labelled {names}: their thresholds are the "
            f"global one"]


def train_genre_head(cache, *, kind: str = "ml-decoder", genres: Sequence[str] | None = None,
                     genres_from_data: bool = False, templates: Sequence[str] = DEFAULT_TEMPLATES,
                     architecture: Mapping | None = None, options: TrainConfig | Mapping | None = None,
                     small_data: bool | str = "auto", backbone=None, pretrained: str | None = None,
                     device: str = "auto", progress: bool = True) -> TrainResult:
    """Train a genre head of `kind` on the cache's train split, calibrate its thresholds on the
    validation split, and return it (unsaved) with the data summary and the epoch history.

    architecture: DecoderConfig fields to override (width, mlp_hidden, num_layers, num_heads,
    dropout, num_groups, self_attention, memory). options: a TrainConfig (every training option),
    or a mapping of TrainConfig fields to override. small_data: "auto" gives an ML-Decoder trained
    on fewer than SMALL_DATA_POSTERS labelled posters the small-data settings (config.py) for every
    field not set in `architecture` or `options`; True always, False never. Prompts missing from the
    cache are encoded with `backbone` (or the cache's backbone, loaded from its spec; `pretrained`
    overrides its path).
    """
    started = time.perf_counter()
    progress = progress and distributed.is_main_process()  # one bar, rank 0's, under a launcher
    train_config(options)  # bad settings are refused before any data is read
    small_data_settings(0, small_data)
    if kind not in KINDS:
        raise ConfigError("kind", f"must be one of {', '.join(KINDS)}, got {kind!r}")
    architecture = dict(architecture or {})
    memory = architecture.get("memory", "pooled")
    if memory == "tokens":
        if kind != "ml-decoder":
            raise ConfigError("memory", f"'tokens' is a memory of the ML-Decoder; a {kind} head reads pooled "
                                        f"embeddings")
        require_tokens(cache)  # refused before any data is read
    data = load_genre_data(cache, genres, genres_from_data)
    train, val = data.splits["train"], data.splits["validation"]
    if not data.genres:
        raise ClipposterError(f"the cache {cache.root} has no genre labels in its training split; embed a source "
                              f"with a genres column, or give the vocabulary in genres")
    if len(train.ids) == 0:
        why = (f" ({data.unlabelled['train']} training posters have no genre label)" if data.unlabelled["train"]
               else "")
        raise ClipposterError(f"the cache {cache.root} has no labelled training posters{why}; embed posters with "
                              f"genres and a train split (the default 80/10/10 split assigns one)")
    if len(val.ids) == 0:
        raise ClipposterError(f"the cache {cache.root} has no labelled validation posters; training needs them for "
                              f"early stopping and threshold calibration — embed more posters or give a split column")
    warnings = data.warnings()
    applied = None
    small = small_data_settings(len(train.ids), small_data) if kind == "ml-decoder" else None
    if small is not None:
        given = {} if isinstance(options, TrainConfig) else dict(options or {})
        applied = {**small, "architecture": {k: v for k, v in small["architecture"].items() if k not in architecture},
                   "options": ({} if isinstance(options, TrainConfig)
                               else {k: v for k, v in small["options"].items() if k not in given})}
        architecture = {**applied["architecture"], **architecture}
        if not applied["architecture"] and not applied["options"]:
            applied = None  # every setting of the rule was given explicitly
    options = train_config(options, applied["options"] if applied else None)
    genre_text = genre_text_embeddings(cache, data.genres, templates, backbone, pretrained, device)
    history: list[EpochLog] = []
    with torch.random.fork_rng(devices=[]):
        # Seeded init and dropout without disturbing the caller's global RNG.
        torch.manual_seed(options.seed)
        if kind == "ml-decoder":
            cfg = DecoderConfig(embed_dim=cache.dim, num_genres=len(data.genres), text_dim=genre_text.shape[1],
                                **architecture)
            module = MLDecoder(cfg, genre_text)
            train_x, val_x = memory_inputs(cache, train, memory), memory_inputs(cache, val, memory)
            module.set_input_stats(train_x)
            module.set_prior(train.labels.mean(0))
            history = fit_decoder(module, train_x, train.labels, val_x, val.labels, options, progress)
            config = cfg.to_dict()
        elif kind == "linear-probe":
            module, probe_warnings = fit_linear_probe(train.embeddings, train.labels, c=options.probe_c,
                                                      seed=options.seed, progress=progress, genres=data.genres)
            warnings += probe_warnings
            config = {"embed_dim": cache.dim, "num_genres": len(data.genres), "C": options.probe_c}
        else:
            module = ZeroShotClassifier(genre_text)
            config = {"embed_dim": cache.dim, "num_genres": len(data.genres), "logit_scale": module.logit_scale}
    head = GenreHead(kind, data.genres, module, identity=cache.identity, backbone_spec=cache.backbone_spec,
                     templates=templates, genre_text=genre_text, config=config,
                     training={**options.to_dict(), "cache": str(cache.root), "small_data": applied is not None},
                     data=data.summary())
    val_x = memory_inputs(cache, val, head.memory)
    calibrated = genre_calibrate_thresholds(val.labels, head.predict_proba(val_x),
                                            train_frequency=train.labels.mean(0))
    head.thresholds = {"mode": options.threshold_mode,
                       **{k: calibrated[k] for k in ("per_genre", "global", "fallback_genres")}}
    warnings += _calibration_warnings(calibrated, data.genres, len(val.ids))
    head.metrics = _validation_metrics(head, val_x, val.labels)
    head.metrics["calibration"] = {
        "validation_posters": len(val.ids), "min_support": CALIBRATION_MIN_SUPPORT,
        "shrinkage": CALIBRATION_SHRINKAGE,
        "global_threshold_genres": [data.genres[i] for i in calibrated["fallback_genres"]],
        "capped_genres": [data.genres[i] for i in calibrated["capped_genres"]]}
    if history:
        head.metrics["epochs_run"] = len(history)
        head.metrics["best_epoch"] = min(history, key=lambda e: e.val_loss).epoch
    return TrainResult(head=head, data=data, history=history, seconds=time.perf_counter() - started,
                       warnings=warnings, small_data=applied)

