"""Contrastive training of a small CLIP on posters and their own texts, for offline work.

The product's CLIP stays frozen; this trains a *small* open_clip architecture (`clipposter-tiny` by
default) from scratch so that its image and text towers are aligned when no pretrained weights can be
had: zero-shot genres and text→poster search then mean something on the posters' domain. It uses
open_clip's model and its own `ClipLoss` with AdamW, seeded, on the **train split only** of the
records (the validation and test posters stay unseen). Each poster is paired, every epoch, with one
of its texts drawn at random: its title, its tagline, its overview, or a genre prompt
("a poster of a {genre} movie", the zero-shot templates) for one of its genres.

The result is what open_clip loads as a local checkpoint: `backbone.safetensors` (the state dict)
and `backbone.json` beside it (the architecture name, the settings and the loss history), so
`load_backbone("clipposter-tiny", "DIR/backbone.safetensors")` loads it through the normal path and
names it by the sha256 of the weights.

`synthetic_backbone` is the demo's offline fallback: a tiny CLIP trained once on synthetic posters
drawn with their own seed, kept in the user cache (`$CLIPPOSTER_CACHE/backbones/`, else
`$XDG_CACHE_HOME/clipposter/backbones/` or `~/.cache/clipposter/backbones/`) under a key of the
poster seed, the poster count and the training settings. See docs/backbone.md.
"""
from __future__ import annotations

import hashlib
import json
import os
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Sequence

import numpy as np
import torch

from clipposter.embedding.backbone import (TINY_MODEL, Backbone, file_sha256, load_backbone, register_model_configs,
                                           resolve_device)
from clipposter.embedding.prompts import DEFAULT_TEMPLATES
from clipposter.errors import ClipposterError, ConfigError, PosterError
from clipposter.files import atomic_path, directory_lock, read_json, replace_dir, write_json
from clipposter.ingest.images import load_poster
from clipposter.records import PosterRecord

TEXT_KINDS = ("title", "tagline", "overview", "genres")
DEFAULT_TEXTS = ("title", "tagline", "genres")
# Above this many parameters, training on a CPU needs `force`: this is for tiny models (tests, offline
# work, small domain experiments), not for fine-tuning the product's frozen CLIP (ViT-B-32 has 151M).
CPU_PARAMETER_BUDGET = 25_000_000
WEIGHTS_FILE = "backbone.safetensors"
CONFIG_FILE = "backbone.json"
# Bump when the training recipe changes in a way the settings do not show, so cached backbones retrain.
RECIPE_VERSION = 1


@dataclass(frozen=True)
class ContrastiveConfig:
    """How to train: architecture, schedule and which texts pair with each poster."""

    arch: str = TINY_MODEL
    epochs: int = 30
    batch_size: int = 64
    lr: float = 2e-3
    weight_decay: float = 0.1
    warmup: float = 0.1  # fraction of the steps with a linear warm-up, then cosine decay to 0
    texts: tuple[str, ...] = DEFAULT_TEXTS
    seed: int = 0

    def check(self) -> "ContrastiveConfig":
        if self.epochs < 1:
            raise ConfigError("epochs", f"must be at least 1, got {self.epochs}")
        if self.batch_size < 2:
            raise ConfigError("batch_size", f"must be at least 2 (a contrastive batch needs negatives), "
                                            f"got {self.batch_size}")
        if not self.lr > 0:
            raise ConfigError("lr", f"must be positive, got {self.lr}")
        if self.weight_decay < 0:
            raise ConfigError("weight_decay", f"must be >= 0, got {self.weight_decay}")
        if not 0 <= self.warmup < 1:
            raise ConfigError("warmup", f"must be in [0, 1), got {self.warmup}")
        parse_text_kinds(self.texts)
        return self

    def to_dict(self) -> dict:
        d = asdict(self)
        d["texts"] = list(self.texts)
        return d


def parse_text_kinds(spec: str | Sequence[str]) -> tuple[str, ...]:
    """`title,tagline,genres` (or a sequence of kinds) → the kinds, checked against TEXT_KINDS."""
    items = [s.strip() for s in spec.split(",")] if isinstance(spec, str) else [str(s).strip() for s in spec]
    kinds = tuple(dict.fromkeys(s for s in items if s))
    unknown = [k for k in kinds if k not in TEXT_KINDS]
    if unknown or not kinds:
        raise ConfigError("texts", f"must name some of {', '.join(TEXT_KINDS)} (comma-separated), got "
                                   f"{unknown[0] if unknown else 'nothing'}")
    return kinds


@dataclass
class TrainedBackbone:
    """What one training run did and where it saved the weights."""

    path: Path  # the .safetensors file
    arch: str
    sha256: str
    parameters: int
    posters: int  # training posters used
    held_out: int  # records of other splits, not trained on
    skipped: list[tuple[str, str]] = field(default_factory=list)  # (poster, reason): unreadable or without texts
    history: list[float] = field(default_factory=list)  # mean training loss per epoch
    seconds: float = 0.0
    settings: dict = field(default_factory=dict)
    source: str | None = None

    @property
    def config_path(self) -> Path:
        return self.path.with_name(CONFIG_FILE)

    def to_dict(self) -> dict:
        return {"path": str(self.path), "config": str(self.config_path), "arch": self.arch, "sha256": self.sha256,
                "parameters": self.parameters, "posters": self.posters, "held_out": self.held_out,
                "skipped": [list(s) for s in self.skipped], "history": [round(x, 5) for x in self.history],
                "seconds": round(self.seconds, 2), "settings": self.settings, "source": self.source}


# ------------------------------------------------------------------------------------ the model

def count_parameters(arch: str) -> int:
    """Parameters of an open_clip architecture, counted on the meta device (no memory, no weights)."""
    import open_clip

    register_model_configs()
    if arch not in open_clip.list_models():
        raise ConfigError("arch", f"unknown open_clip architecture {arch!r} (for example {TINY_MODEL}, "
                                  f"ViT-B-32)")
    model = open_clip.create_model(arch, pretrained=None, device="meta")
    return sum(p.numel() for p in model.parameters())


def _new_model(arch: str, seed: int, device: torch.device):
    import open_clip

    register_model_configs()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model, _, preprocess = open_clip.create_model_and_transforms(arch, pretrained=None, device=device)
    return model, preprocess, open_clip.get_tokenizer(arch)


def _check_budget(arch: str, device: torch.device, force: bool) -> int:
    params = count_parameters(arch)
    if device.type == "cpu" and params > CPU_PARAMETER_BUDGET and not force:
        raise ClipposterError(
            f"{arch} has {params / 1e6:.0f}M parameters, above the {CPU_PARAMETER_BUDGET / 1e6:.0f}M meant for "
            f"training on a CPU (this trains small CLIPs for offline work and experiments; the product's CLIP "
            f"stays frozen); pass `force` to train it anyway, or use a GPU (`device`)")
    return params


# ------------------------------------------------------------------------------- posters, texts

def _poster_texts(record: PosterRecord, kinds: Sequence[str]) -> list[list[str]]:
    """The record's candidate texts, one list per kind that it has."""
    out = []
    for kind in kinds:
        if kind == "genres":
            texts = [t.format(genre=g) for g in record.genres for t in DEFAULT_TEMPLATES]
        else:
            value = getattr(record, kind)
            texts = [value.strip()] if value and value.strip() else []
        if texts:
            out.append(texts)
    return out


class _Pairs:
    """Posters as preprocessed pixels, and for each its candidate texts as rows of one token table."""

    def __init__(self, records: Sequence[PosterRecord], kinds: Sequence[str], preprocess, tokenizer, image_size: int):
        self.skipped: list[tuple[str, str]] = []
        pixels, choices, table = [], [], {}
        for r in records:
            candidates = _poster_texts(r, kinds)
            if not candidates:
                self.skipped.append((r.id, f"no text among {', '.join(kinds)}"))
                continue
            if not r.image:
                self.skipped.append((r.id, "no local image"))
                continue
            try:
                image = load_poster(r.image, draft_size=image_size)
            except PosterError as exc:
                self.skipped.append((r.id, str(exc)))
                continue
            pixels.append(preprocess(image))
            choices.append([[table.setdefault(t, len(table)) for t in texts] for texts in candidates])
        self.choices = choices
        self.pixels = torch.stack(pixels) if pixels else torch.zeros(0)
        self.tokens = tokenizer(list(table)) if table else torch.zeros(0, dtype=torch.long)

    def __len__(self) -> int:
        return len(self.choices)

    def draw(self, indices: Sequence[int], rng: np.random.Generator) -> torch.Tensor:
        """One text per poster: a kind it has, then one text of that kind, uniformly."""
        rows = []
        for i in indices:
            kinds = self.choices[i]
            texts = kinds[rng.integers(len(kinds))]
            rows.append(texts[rng.integers(len(texts))])
        return self.tokens[rows]


def _batches(n: int, batch_size: int, generator: torch.Generator | None) -> list[torch.Tensor]:
    """Full batches only (one batch of all posters when there are fewer): a smaller last batch has fewer
    negatives and so a lower loss, which would blur the epoch means. The order changes every epoch, so
    the posters left over differ from epoch to epoch."""
    order = torch.randperm(n, generator=generator) if generator is not None else torch.arange(n)
    batches = list(order.split(batch_size))
    if len(batches) > 1 and len(batches[-1]) < batch_size:
        batches.pop()
    return batches


def _clip_loss(model, pixels: torch.Tensor, tokens: torch.Tensor, loss_fn) -> torch.Tensor:
    image = model.encode_image(pixels, normalize=True)
    text = model.encode_text(tokens, normalize=True)
    return loss_fn(image, text, model.logit_scale.exp())


# ------------------------------------------------------------------------------------- training

def train_backbone(records: Sequence[PosterRecord], out: str | os.PathLike, config: ContrastiveConfig | None = None,
                   *, device: str = "auto", force: bool = False, progress: bool = True,
                   source: str | None = None) -> TrainedBackbone:
    """Train `config.arch` contrastively on the train split of `records` and save it into the folder `out`.

    Only records whose split is "train" are used; the others are counted as held out. `force` trains an
    architecture above CPU_PARAMETER_BUDGET on a CPU. `source` is recorded in backbone.json.
    """
    from open_clip.loss import ClipLoss
    from safetensors.torch import save_file
    from tqdm.auto import tqdm

    config = (config or ContrastiveConfig()).check()
    started = time.perf_counter()
    train = [r for r in records if r.split == "train"]
    if not train:
        raise ClipposterError(f"none of the {len(records)} posters is in the train split: the backbone trains on "
                              f"the train split only (the others stay held out)")
    dev = resolve_device(device)
    params = _check_budget(config.arch, dev, force)
    folder = Path(out)
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except (FileExistsError, NotADirectoryError):
        raise ConfigError("out", f"{folder} is a file, not a folder") from None
    except OSError as exc:
        raise ClipposterError(f"{folder}: cannot create the output folder ({exc.strerror or exc})") from None
    model, preprocess, tokenizer = _new_model(config.arch, config.seed, dev)
    size = model.visual.image_size
    pairs = _Pairs(train, config.texts, preprocess, tokenizer, size[0] if isinstance(size, (tuple, list)) else size)
    if len(pairs) < 2:
        raise ClipposterError(f"only {len(pairs)} of the {len(train)} training posters have an image and a text "
                              f"among {', '.join(config.texts)}; contrastive training needs at least 2 "
                              f"(choose other `texts`)")

    model.train()
    decay = [p for n, p in model.named_parameters() if p.ndim >= 2 and "logit_scale" not in n]
    rest = [p for n, p in model.named_parameters() if not (p.ndim >= 2 and "logit_scale" not in n)]
    optimizer = torch.optim.AdamW([{"params": decay, "weight_decay": config.weight_decay},
                                   {"params": rest, "weight_decay": 0.0}], lr=config.lr,
                                  fused=dev.type in ("cpu", "cuda"))  # fused: 3x faster steps on a CPU
    generator = torch.Generator().manual_seed(config.seed)
    rng = np.random.default_rng(config.seed)
    steps_per_epoch = len(_batches(len(pairs), config.batch_size, None))
    total = steps_per_epoch * config.epochs
    warmup = int(config.warmup * total)
    scheduler = torch.optim.lr_scheduler.SequentialLR(optimizer, [
        torch.optim.lr_scheduler.LinearLR(optimizer, start_factor=1 / (warmup + 1), total_iters=max(warmup, 1)),
        torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=max(total - warmup, 1))], milestones=[warmup])
    loss_fn = ClipLoss()
    max_scale = float(np.log(100.0))  # CLIP's cap on the learned temperature
    history: list[float] = []
    bar = tqdm(total=total, desc=f"training {config.arch}", unit="step", disable=not progress, leave=False)
    try:
        for epoch in range(config.epochs):
            losses = []
            for batch in _batches(len(pairs), config.batch_size, generator):
                tokens = pairs.draw(batch.tolist(), rng).to(dev)
                loss = _clip_loss(model, pairs.pixels[batch].to(dev), tokens, loss_fn)
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                scheduler.step()
                with torch.no_grad():
                    model.logit_scale.clamp_(0, max_scale)
                losses.append(loss.item())
                bar.update(1)
                bar.set_postfix(epoch=epoch + 1, loss=f"{losses[-1]:.3f}")
            history.append(float(np.mean(losses)))
    finally:
        bar.close()
    model.eval()

    weights = folder / WEIGHTS_FILE
    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    with atomic_path(weights) as tmp:
        save_file(state, str(tmp))
    result = TrainedBackbone(path=weights, arch=config.arch, sha256=file_sha256(weights), parameters=params,
                             posters=len(pairs), held_out=len(records) - len(train), skipped=pairs.skipped,
                             history=history, seconds=time.perf_counter() - started, settings=config.to_dict(),
                             source=source)
    info = result.to_dict()
    write_json(folder / CONFIG_FILE, {"model": config.arch, "weights": WEIGHTS_FILE, "split": "train",
                                      **{k: v for k, v in info.items() if k not in ("path", "config", "arch")}})
    return result


def read_trained_config(path: str | os.PathLike) -> tuple[dict, Path]:
    """backbone.json of a trained backbone (its folder, the .safetensors file or the .json) and the weights' path."""
    path = Path(path)
    config_path = path / CONFIG_FILE if path.is_dir() else path.with_suffix(".json")
    try:
        info = read_json(config_path)
    except FileNotFoundError:
        raise ClipposterError(f"{path}: no {config_path.name} beside it; pass the folder written by "
                              f"`clipposter train backbone`") from None
    except (OSError, ValueError) as exc:
        raise ClipposterError(f"{config_path}: cannot read it ({exc})") from None
    if not isinstance(info, dict) or not isinstance(info.get("model"), str):
        raise ClipposterError(f"{config_path}: not a trained backbone's config (no architecture name)")
    return info, config_path.parent / str(info.get("weights", WEIGHTS_FILE))


def load_trained_backbone(path: str | os.PathLike, device: str = "auto") -> Backbone:
    """A backbone written by train_backbone (its folder or its .safetensors file), frozen, through
    load_backbone's local-checkpoint path: its identity's weights are `sha256:<the file's hash>`."""
    info, weights = read_trained_config(path)
    if not weights.is_file():
        raise ClipposterError(f"{weights}: the trained backbone's weights are missing")
    return load_backbone(info["model"], str(weights), device=device)


@torch.inference_mode()
def contrastive_loss(backbone: Backbone, records: Sequence[PosterRecord], texts: Sequence[str] = DEFAULT_TEXTS,
                     batch_size: int = 64, seed: int = 0) -> float:
    """Mean ClipLoss of a (frozen) backbone over `records` in full batches of `batch_size` (shuffled with
    `seed`), each poster paired with one of its texts drawn with `seed`: the training objective,
    measured on any posters."""
    from open_clip.loss import ClipLoss

    pairs = _Pairs(records, parse_text_kinds(texts), backbone.preprocess, backbone.tokenizer, backbone.image_size)
    if len(pairs) < 2:
        raise ClipposterError(f"only {len(pairs)} posters with an image and a text: a contrastive loss needs 2")
    rng = np.random.default_rng(seed)
    loss_fn = ClipLoss()
    losses = []
    for batch in _batches(len(pairs), batch_size, torch.Generator().manual_seed(seed)):
        tokens = pairs.draw(batch.tolist(), rng).to(backbone.device)
        losses.append(float(_clip_loss(backbone.model, pairs.pixels[batch].to(backbone.device), tokens, loss_fn)))
    return float(np.mean(losses))


# ------------------------------------------------------------------- the demo's offline backbone

SYNTHETIC_POSTERS = 600
SYNTHETIC_SEED = 1000


def backbone_cache_root() -> Path:
    """Where trained backbones are kept: $CLIPPOSTER_CACHE/backbones, else the user cache directory."""
    base = os.environ.get("CLIPPOSTER_CACHE")
    if base:
        return Path(base) / "backbones"
    xdg = os.environ.get("XDG_CACHE_HOME")
    return Path(xdg or Path.home() / ".cache") / "clipposter" / "backbones"


@dataclass
class SyntheticBackbone:
    backbone: Backbone
    folder: Path
    posters: int
    seed: int
    trained_now: bool
    seconds: float  # of training (and drawing the posters) in this call; 0 when it was cached

    def describe(self) -> str:
        return (f"{self.backbone.identity.model}, a tiny CLIP trained on {self.posters} synthetic posters, "
                f"not CLIP's weights")


def _current(folder: Path) -> bool:
    """The folder holds a finished backbone whose weights are the ones its config names."""
    try:
        info, weights = read_trained_config(folder)
        return weights.is_file() and file_sha256(weights) == info.get("sha256")
    except ClipposterError:
        return False


def synthetic_backbone(posters: int = SYNTHETIC_POSTERS, seed: int = SYNTHETIC_SEED,
                       config: ContrastiveConfig | None = None, *, device: str = "auto", progress: bool = False,
                       root: str | os.PathLike | None = None) -> SyntheticBackbone:
    """A small CLIP trained on `posters` synthetic posters drawn with `seed` (all of them: none of these
    posters is evaluated on), trained once and then reused from `root` (default backbone_cache_root()).

    The cache key holds the poster count, the seed, the settings and RECIPE_VERSION; the folder is
    written atomically, and a lock keeps two processes from training the same key at once."""
    config = (config or ContrastiveConfig()).check()
    if posters < 2:
        raise ConfigError("posters", f"must be at least 2, got {posters}")
    root = Path(root) if root is not None else backbone_cache_root()
    key = hashlib.sha256(json.dumps({"posters": posters, "seed": seed, "settings": config.to_dict(),
                                     "recipe": RECIPE_VERSION}, sort_keys=True).encode()).hexdigest()[:16]
    folder = root / f"{config.arch}-synthetic-{key}"
    started = time.perf_counter()
    with directory_lock(root, f".{key}.lock"):
        trained = not _current(folder)
        if trained:
            def build(tmp: Path) -> None:
                from clipposter.ingest.synthetic import generate_posters

                with tempfile.TemporaryDirectory(dir=root, prefix=".posters-") as scratch:
                    records = generate_posters(scratch, n=posters, seed=seed, progress=progress)
                    for r in records:
                        r.split = "train"
                    train_backbone(records, tmp, config, device=device, progress=progress,
                                   source=f"synthetic ({posters} posters, seed {seed})")

            replace_dir(build, folder)
        backbone = load_trained_backbone(folder, device=device)
    return SyntheticBackbone(backbone, folder, posters, seed, trained,
                             time.perf_counter() - started if trained else 0.0)
