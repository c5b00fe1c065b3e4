"""`GenreHead`: a trained genre classifier with its genres, thresholds and backbone identity, and how
it predicts, saves and loads.

A head wraps one torch module of `clipposter.heads.genre.model` (the ML-Decoder or a baseline's). A
saved head is a folder: config.json (architecture, training settings, genres, prompt templates,
thresholds, backbone identity and spec, metrics), model.safetensors, genres.txt. No pickles.
`save_pretrained(dir)` writes it, each file written then renamed; `from_pretrained(dir)` reads it
back, refusing a head of another backbone when given the one in use, and weights holding NaN or
infinite values.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Mapping, Sequence

import numpy as np
import torch
from torch import nn

from clipposter.embedding.identity import BackboneIdentity
from clipposter.embedding.prompts import DEFAULT_TEMPLATES
from clipposter.errors import ClipposterError, ConfigError
from clipposter.files import atomic_path, atomic_write_text, read_json, write_json
from clipposter.heads.genre.config import KINDS
from clipposter.heads.genre.metrics import genre_predictions
from clipposter.heads.genre.model import INFER_BATCH, build_module
from clipposter.heads.weights import check_finite

FORMAT_VERSION = 1
CONFIG_FILE, WEIGHTS_FILE, GENRES_FILE = "config.json", "model.safetensors", "genres.txt"


@dataclass
class PosterPrediction:
    """Genres of one poster: every probability, the genres above threshold, the ranked top."""

    path: str
    probabilities: dict[str, float]
    predicted: list[str]
    top: list[tuple[str, float]]
    source: str  # "cache" or "encoded"

    def to_dict(self) -> dict:
        return {"path": self.path, "source": self.source, "predicted": self.predicted,
                "top": [{"genre": g, "probability": p} for g, p in self.top],
                "probabilities": self.probabilities}


@dataclass
class PredictResult:
    predictions: list[PosterPrediction] = field(default_factory=list)
    failed: list[tuple[str, str]] = field(default_factory=list)  # (path, reason)
    encoded: int = 0
    from_cache: int = 0


def check_head_folder(directory: str | os.PathLike, overwrite: bool = False) -> bool:
    """Refuse to train into `directory` when it already holds a genre head, unless `overwrite`
    (the caption head's rule). Returns whether a head is there to be replaced."""
    out = Path(directory)
    if out.exists() and not out.is_dir():
        raise ConfigError("out", f"{out} is a file; give a folder for the head")
    holds = any((out / name).exists() for name in (CONFIG_FILE, WEIGHTS_FILE))
    if holds and not overwrite:
        raise ConfigError("overwrite", f"is off, but {out} already holds a genre head; turn it on to replace it, or "
                                       f"train into another out folder")
    return holds


class GenreHead:
    """A trained genre classifier over one backbone's embeddings, with its genres and thresholds.

    kind: "ml-decoder" (sigmoid per genre), "linear-probe" (sigmoid per genre) or "zero-shot"
    (softmax over the genres of CLIP cosine × 100, as CLIP's zero-shot classifier).
    """

    def __init__(self, kind: str, genres: Sequence[str], module: nn.Module, *, identity: BackboneIdentity,
                 backbone_spec: dict | None, templates: Sequence[str] = DEFAULT_TEMPLATES,
                 genre_text: np.ndarray | None = None, config: Mapping | None = None,
                 training: Mapping | None = None, thresholds: Mapping | None = None,
                 metrics: Mapping | None = None, data: Mapping | None = None):
        if kind not in KINDS:
            raise ConfigError("kind", f"must be one of {', '.join(KINDS)}, got {kind!r}")
        self.kind = kind
        self.genres = list(genres)
        self.module = module.eval()
        self.identity = identity
        self.backbone_spec = dict(backbone_spec) if backbone_spec else None
        self.templates = list(templates)
        self.genre_text = None if genre_text is None else np.asarray(genre_text, dtype=np.float32)
        self.config = dict(config or {})
        self.training = dict(training or {})
        g = len(self.genres)
        th = dict(thresholds or {})
        self.thresholds = {"mode": th.get("mode", "per-genre"),
                           "per_genre": [float(t) for t in th.get("per_genre", [0.5] * g)],
                           "global": float(th.get("global", 0.5)),
                           "fallback_genres": list(th.get("fallback_genres", []))}
        if len(self.thresholds["per_genre"]) != g:
            raise ConfigError("thresholds", f"must hold one per-genre value per genre: "
                                            f"{len(self.thresholds['per_genre'])} thresholds for {g} genres")
        self.metrics = dict(metrics or {})
        self.data = dict(data or {})
        self.source: Path | None = None

    @property
    def activation(self) -> str:
        return "softmax" if self.kind == "zero-shot" else "sigmoid"

    @property
    def memory(self) -> str:
        return self.config.get("memory", "pooled")

    # ----- inference -----------------------------------------------------------------------------
    @torch.inference_mode()
    def predict_proba(self, embeddings: np.ndarray, batch_size: int = INFER_BATCH) -> np.ndarray:
        """(N, D) embeddings (or (N, T, D) for a token-memory head) → (N, G) float32 probabilities."""
        x = np.asarray(embeddings)
        if x.dtype not in (np.float16, np.float32):
            x = x.astype(np.float32)  # float16 token sequences are widened batch by batch, in the module
        if x.ndim not in (2, 3):
            raise ClipposterError(f"embeddings must be (N, D) or (N, T, D), got shape {x.shape}")
        if x.ndim == 2 and self.memory == "tokens":  # it would read each as a one-token sequence: wrong, silently
            raise ClipposterError(f"this genre head attends over ViT token sequences (memory 'tokens') but was given "
                                  f"one pooled embedding per poster, shape {x.shape}; give it (N, T, D) token "
                                  f"sequences, from a cache embedded with tokens")
        if x.shape[-1] != self.identity.embed_dim:
            raise ClipposterError(f"embeddings of width {x.shape[-1]} given to a head trained on width "
                                  f"{self.identity.embed_dim} ({self.identity.describe()})")
        self.module.eval()
        out = []
        for start in range(0, x.shape[0], batch_size):
            logits = self.module(torch.from_numpy(x[start:start + batch_size]))
            probs = torch.softmax(logits, -1) if self.activation == "softmax" else torch.sigmoid(logits)
            out.append(probs.float().numpy())
        return np.concatenate(out) if out else np.zeros((0, len(self.genres)), np.float32)

    def thresholds_for(self, threshold: str | float | None = None) -> np.ndarray:
        """Thresholds per genre: None or "calibrated" → the saved mode; "per-genre"; "global"; a number."""
        g = len(self.genres)
        if threshold is None or threshold == "calibrated":
            threshold = self.thresholds["mode"]
        if threshold == "per-genre":
            return np.asarray(self.thresholds["per_genre"], dtype=np.float64)
        if threshold == "global":
            return np.full(g, self.thresholds["global"])
        try:
            value = float(threshold)
        except (TypeError, ValueError):
            raise ConfigError("threshold", f"must be calibrated, per-genre, global or a number in (0, 1), "
                                           f"got {threshold!r}") from None
        if not 0 < value < 1:
            raise ConfigError("threshold", f"must be in (0, 1), got {value}")
        return np.full(g, value)

    def predict(self, embeddings: np.ndarray, threshold: str | float | None = None) -> np.ndarray:
        """(N, G) 0/1 predictions at the chosen thresholds (default: the calibrated ones)."""
        return genre_predictions(self.predict_proba(embeddings), self.thresholds_for(threshold))

    def describe_predictions(self, paths: Sequence[str], probs: np.ndarray, sources: Sequence[str],
                             threshold: str | float | None = None, top_k: int | None = None) -> list[PosterPrediction]:
        t = self.thresholds_for(threshold)
        out = []
        for path, p, src in zip(paths, probs, sources):
            order = np.argsort(-p, kind="stable")
            k = len(self.genres) if top_k is None else max(0, min(top_k, len(self.genres)))
            out.append(PosterPrediction(
                path=str(path), source=src,
                probabilities={g: round(float(v), 6) for g, v in zip(self.genres, p)},
                predicted=[self.genres[i] for i in order if p[i] >= t[i]],
                top=[(self.genres[i], round(float(p[i]), 6)) for i in order[:k]]))
        return out

    def predict_posters(self, paths: Sequence[str], *, cache=None, backbone=None, pretrained: str | None = None,
                        device: str = "auto", threshold: str | float | None = None, top_k: int | None = None,
                        batch_size: int = 64, progress: bool = False) -> PredictResult:
        """Genres of poster files. Posters whose bytes are in `cache` use the cached embedding; the
        rest are encoded through the head's backbone (`backbone`, or loaded from the head's recorded
        spec, with `pretrained` overriding the checkpoint path), by the same decode path as `embed`.
        Unreadable posters are collected in `failed`, not raised."""
        from clipposter.embedding.embed import resolve_posters

        if cache is not None:
            self.check_backbone(cache.identity, f"the cache {cache.root}")

        def head_backbone():  # loaded (or checked) only when some poster is not in the cache
            if backbone is None:
                from clipposter.embedding.backbone import load_backbone_like

                return load_backbone_like(self.identity, self.backbone_spec, pretrained=pretrained, device=device)
            self.check_backbone(backbone.identity, "the backbone given")
            return backbone

        # A token-memory head reads each poster's token sequence: from a cache that stores them, else
        # the file is encoded (one forward pass gives the pooled embedding and the tokens).
        by_tokens = self.memory == "tokens"
        resolved = resolve_posters(paths, cache=cache, backbone=head_backbone, batch_size=batch_size,
                                   progress=progress, tokens=by_tokens)
        result = PredictResult(failed=resolved.failed, encoded=resolved.encoded, from_cache=resolved.from_cache)
        usable = resolved.usable
        if usable:
            result.predictions = self.describe_predictions([p.poster for p in usable],
                                                           self.predict_proba(resolved.token_sequences() if by_tokens
                                                                              else resolved.embeddings()),
                                                           [p.source for p in usable], threshold, top_k)
        return result

    # ----- identity ------------------------------------------------------------------------------
    def check_backbone(self, identity: BackboneIdentity, what: str) -> None:
        """Refuse embeddings from a backbone other than the one this head was trained on."""
        if identity.key != self.identity.key:
            where = f" ({self.source})" if self.source else ""
            raise ClipposterError(
                f"the genre head{where} was trained on backbone {self.identity.describe()} but {what} uses "
                f"{identity.describe()}; use a cache or backbone of the head's backbone, or train a head on this one")

    # ----- persistence ---------------------------------------------------------------------------
    def to_config(self) -> dict:
        return {
            "format_version": FORMAT_VERSION,
            "kind": self.kind,
            "activation": self.activation,
            "genres": self.genres,
            "templates": self.templates,
            "architecture": self.config,
            "training": self.training,
            "thresholds": self.thresholds,
            "backbone": self.identity.to_dict(),
            "backbone_key": self.identity.key,
            "backbone_spec": self.backbone_spec,
            "metrics": self.metrics,
            "data": self.data,
        }

    def save_pretrained(self, directory: str | os.PathLike) -> Path:
        """Write config.json, model.safetensors and genres.txt (each written then renamed)."""
        from safetensors.torch import save_file

        out = Path(directory)
        out.mkdir(parents=True, exist_ok=True)
        state = {k: v.detach().cpu().contiguous() for k, v in self.module.state_dict().items()}
        if self.genre_text is not None:
            state["head.genre_text"] = torch.from_numpy(np.ascontiguousarray(self.genre_text))
        with atomic_path(out / WEIGHTS_FILE) as tmp:
            save_file(state, str(tmp), metadata={"format": "pt", "kind": self.kind})
        atomic_write_text(out / GENRES_FILE, "\n".join(self.genres) + "\n")
        write_json(out / CONFIG_FILE, self.to_config())
        self.source = out
        return out

    @classmethod
    def from_pretrained(cls, directory: str | os.PathLike, identity: BackboneIdentity | None = None,
                        what: str = "the backbone in use") -> "GenreHead":
        """Load a saved head; with `identity`, refuse it unless it was trained on that backbone."""
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        root = Path(directory)
        config_path = root / CONFIG_FILE
        if not config_path.exists():
            raise ClipposterError(f"{root}: no genre head here (no {CONFIG_FILE}); "
                                  f"train one (`clipposter train genres`) and save it there")
        try:
            cfg = read_json(config_path)
            kind = cfg["kind"]
            genres = list(cfg["genres"])
            head_identity = BackboneIdentity.from_dict(cfg["backbone"])
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise ClipposterError(f"{config_path}: unreadable genre head description ({exc}); "
                                  f"retrain the head into a new folder") from None
        if cfg.get("format_version") != FORMAT_VERSION:
            raise ClipposterError(f"{config_path}: head format {cfg.get('format_version')} is not {FORMAT_VERSION}; "
                                  f"retrain the head")
        try:
            state = load_file(str(root / WEIGHTS_FILE))
        except (OSError, SafetensorError) as exc:
            raise ClipposterError(f"{root / WEIGHTS_FILE}: cannot read the head's weights ({exc}); "
                                  f"retrain the head") from None
        check_finite(state, root / WEIGHTS_FILE)
        genre_text = state.pop("head.genre_text", None)
        genre_text_np = None if genre_text is None else genre_text.numpy()
        module = build_module(kind, cfg.get("architecture", {}), genre_text_np)
        try:
            module.load_state_dict(state, strict=True)
        except RuntimeError as exc:
            first = str(exc).splitlines()[0]
            raise ClipposterError(f"{root / WEIGHTS_FILE}: weights do not fit the architecture in "
                                  f"{CONFIG_FILE} ({first}); retrain the head") from None
        head = cls(kind, genres, module, identity=head_identity, backbone_spec=cfg.get("backbone_spec"),
                   templates=cfg.get("templates", DEFAULT_TEMPLATES), genre_text=genre_text_np,
                   config=cfg.get("architecture"), training=cfg.get("training"),
                   thresholds=cfg.get("thresholds"), metrics=cfg.get("metrics"), data=cfg.get("data"))
        head.source = root
        if identity is not None:
            head.check_backbone(identity, what)
        return head
