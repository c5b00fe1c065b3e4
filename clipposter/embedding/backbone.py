"""The frozen CLIP backbone: open_clip loading, preprocessing and encoding.

One place decides how a backbone is named (`ViT-B-32` + pretrained tag, a local checkpoint file,
or `hf-hub:ORG/NAME`), and every encoder output leaves here L2-normalised as float32 numpy.
The backbone's identity (architecture, weights, preprocessing) keys the cache and every head.
"""
from __future__ import annotations

import contextlib
import logging
import os
from pathlib import Path
from typing import Sequence

import numpy as np
import torch

from clipposter.embedding.identity import BackboneIdentity
# weights_of and check_choice need no torch; they live in a light module and are used from here too
from clipposter.embedding.weights import RANDOM_SEED, check_choice, file_sha256, weights_of  # noqa: F401
from clipposter.errors import ClipposterError, ConfigError, cause_line
from clipposter.files import atomic_path

TINY_MODEL = "clipposter-tiny"
_CONFIG_DIR = Path(__file__).parents[1] / "model_configs"
_configs_registered = False


def _register_configs() -> None:
    """Make the package's own architectures (the tiny test model) known to open_clip."""
    global _configs_registered
    if not _configs_registered:
        import open_clip

        open_clip.add_model_config(_CONFIG_DIR)
        _configs_registered = True


def register_model_configs() -> None:
    """Make the package's own architectures known to open_clip, for code that builds one to train
    (clipposter.embedding.contrastive)."""
    _register_configs()


def resolve_device(device: str = "auto") -> torch.device:
    if device == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError("device", f"{device!r} was asked for but CUDA is not available; use 'cpu'")
    if device == "mps" and not (getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()):
        raise ConfigError("device", "'mps' was asked for but MPS is not available; use 'cpu'")
    return torch.device(device)


_PRECISIONS = {"fp32": None, "fp16": torch.float16, "bf16": torch.bfloat16}


class Backbone:
    """A frozen open_clip model with its preprocessing and tokenizer.

    `image_forward_passes` and `text_forward_passes` count model calls so that callers (and tests)
    can check that cached posters cost no model work.
    """

    def __init__(self, model, preprocess, tokenizer, identity: BackboneIdentity, device: torch.device,
                 precision: str = "fp32", spec: dict | None = None):
        self.model = model.eval().requires_grad_(False)
        # How to load this backbone again (model name and pretrained tag or path), kept beside caches
        # and heads so that `predict` can encode posters outside the cache.
        self.spec = spec or {"model": identity.model, "pretrained": None}
        self.preprocess = preprocess
        self.tokenizer = tokenizer
        self.identity = identity
        self.device = device
        if precision not in _PRECISIONS:
            raise ConfigError("precision", f"must be one of {sorted(_PRECISIONS)}, got {precision!r}")
        if precision != "fp32" and device.type == "cpu":
            # Half-precision autocast on CPU is slow or unsupported for many ops; CPU keeps fp32.
            logging.getLogger(__name__).info("precision %s ignored on CPU; using fp32", precision)
            precision = "fp32"
        self.precision = precision
        self.image_forward_passes = 0
        self.text_forward_passes = 0

    @property
    def embed_dim(self) -> int:
        return self.identity.embed_dim

    @property
    def image_size(self) -> int:
        return self.identity.image_size

    def _autocast(self):
        dtype = _PRECISIONS[self.precision]
        if dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(device_type=self.device.type, dtype=dtype)

    @torch.inference_mode()
    def encode_image_tensors(self, pixels: torch.Tensor) -> np.ndarray:
        """Preprocessed pixels (N, 3, H, W) → L2-normalised float32 embeddings (N, D)."""
        self.image_forward_passes += 1
        with self._autocast():
            feats = self.model.encode_image(pixels.to(self.device, non_blocking=True))
        feats = torch.nn.functional.normalize(feats.float(), dim=-1)
        return feats.cpu().numpy()

    @property
    def token_shape(self) -> tuple[int, int]:
        """(T, D) of `encode_image_tokens`: the pooled token and one per patch, at the embedding width."""
        visual = _token_tower(self.model, self.identity)
        grid = visual.grid_size
        return int(grid[0]) * int(grid[1]) + 1, self.embed_dim

    @torch.inference_mode()
    def encode_image_tokens(self, pixels: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
        """Preprocessed pixels (N, 3, H, W) → (pooled (N, D), tokens (N, T, D)), float32.

        `pooled` is exactly what `encode_image_tensors` returns. `tokens` is the ViT's final token
        sequence in the joint image–text space: row 0 is the pooled embedding, rows 1.. are the patch
        tokens (row-major over the patch grid) after the same final LayerNorm and projection as the
        pooled token. Projected tokens share the space of the CLIP text embeddings that a genre
        head's queries are made of, and are 2/3 the size of the 768-wide ViT-B-32 residual stream.
        Every row is L2-normalised, as the pooled embedding is.
        """
        visual = _token_tower(self.model, self.identity)
        self.image_forward_passes += 1
        with self._autocast():
            out = visual.forward_intermediates(pixels.to(self.device, non_blocking=True), indices=1,
                                               normalize_intermediates=True, output_fmt="NLC",
                                               output_extra_tokens=True)
            patches = out["image_intermediates"][0] @ visual.proj
        pooled = out["image_features"].float()
        tokens = torch.cat([pooled[:, None, :], patches.float()], dim=1)
        pooled = torch.nn.functional.normalize(pooled, dim=-1)
        tokens = torch.nn.functional.normalize(tokens, dim=-1)
        return pooled.cpu().numpy(), tokens.cpu().numpy()

    def encode_images(self, images: Sequence, batch_size: int = 64, tokens: bool = False):
        """PIL images → L2-normalised float32 embeddings (N, D); with `tokens`, the pair
        (embeddings (N, D), token sequences (N, T, D)) of `encode_image_tokens`."""
        out, seqs = [], []
        for start in range(0, len(images), batch_size):
            batch = torch.stack([self.preprocess(im) for im in images[start:start + batch_size]])
            if tokens:
                pooled, seq = self.encode_image_tokens(batch)
                out.append(pooled)
                seqs.append(seq)
            else:
                out.append(self.encode_image_tensors(batch))
        pooled = np.concatenate(out) if out else np.zeros((0, self.embed_dim), np.float32)
        if not tokens:
            return pooled
        return pooled, (np.concatenate(seqs) if seqs else np.zeros((0, *self.token_shape), np.float32))

    @torch.inference_mode()
    def encode_texts(self, texts: Sequence[str], batch_size: int = 256) -> np.ndarray:
        """Texts → L2-normalised float32 embeddings (N, D). Texts longer than the context are cut."""
        out = []
        for start in range(0, len(texts), batch_size):
            tokens = self.tokenizer(list(texts[start:start + batch_size])).to(self.device)
            self.text_forward_passes += 1
            with self._autocast():
                feats = self.model.encode_text(tokens)
            out.append(torch.nn.functional.normalize(feats.float(), dim=-1).cpu().numpy())
        return np.concatenate(out) if out else np.zeros((0, self.embed_dim), np.float32)


def _token_tower(model, identity: BackboneIdentity):
    """The open_clip VisionTransformer whose token sequence `encode_image_tokens` reads, or a one-line
    error for towers without one (ResNets, timm towers, attention-pooled CoCa towers)."""
    visual = getattr(model, "visual", None)
    if (visual is None or not hasattr(visual, "forward_intermediates") or not hasattr(visual, "grid_size")
            or getattr(visual, "attn_pool", None) is not None or getattr(visual, "proj", None) is None):
        raise ClipposterError(f"backbone {identity.describe()} has no ViT token sequence to read: token "
                              f"sequences need an open_clip VisionTransformer with a projection")
    return visual


def token_shape(identity_or_backbone) -> tuple[int, int]:
    """(T, D) of the token sequences a backbone (or the backbone an identity names) gives: T = patch
    grid² + 1 (ViT-B-32: 7² + 1 = 50), D = the embedding width (512)."""
    if isinstance(identity_or_backbone, Backbone):
        return identity_or_backbone.token_shape
    identity = identity_or_backbone
    import open_clip

    _register_configs()
    config = open_clip.get_model_config(identity.model)
    vision = (config or {}).get("vision_cfg") or {}
    patch = vision.get("patch_size")
    if not patch or vision.get("timm_model_name") or isinstance(vision.get("layers"), (list, tuple)):
        raise ClipposterError(f"backbone {identity.describe()}: its token sequence length is not known without "
                              f"loading it; load the backbone and pass it instead")
    patch = patch[0] if isinstance(patch, (tuple, list)) else patch
    side = identity.image_size // int(patch)
    return side * side + 1, identity.embed_dim


def token_bytes_per_poster(identity_or_backbone, itemsize: int = 2) -> int:
    """Bytes one poster's token sequence takes at `itemsize` bytes a number (2: float16):
    T × D × itemsize; ViT-B-32: 50 × 512 × 2 = 51,200 (35,000 posters: 1.8 GB)."""
    t, d = token_shape(identity_or_backbone)
    return t * d * int(itemsize)


def _embed_dim(model) -> int:
    """The joint embedding width, read from the model rather than assumed (512 for B-32, 768 for L-14)."""
    proj = getattr(model, "text_projection", None)
    if isinstance(proj, torch.Tensor):
        return int(proj.shape[-1])
    if isinstance(proj, torch.nn.Linear):
        return int(proj.out_features)
    size = getattr(model.visual, "image_size", 32)
    size = size[0] if isinstance(size, (tuple, list)) else size
    with torch.inference_mode():
        return int(model.encode_image(torch.zeros(1, 3, size, size)).shape[-1])


def _preprocess_identity(model, preprocess) -> dict:
    cfg = getattr(model.visual, "preprocess_cfg", None) or {}
    size = cfg.get("size", getattr(model.visual, "image_size", None))
    size = size[0] if isinstance(size, (tuple, list)) else size
    return {
        "image_size": int(size),
        "mean": tuple(float(x) for x in cfg.get("mean", ())),
        "std": tuple(float(x) for x in cfg.get("std", ())),
        "interpolation": str(cfg.get("interpolation", "bicubic")),
        "resize_mode": str(cfg.get("resize_mode", "shortest")),
    }


def load_backbone(model_name: str = "ViT-B-32", pretrained: str | None = "openai", device: str = "auto",
                  precision: str = "auto") -> Backbone:
    """Load a frozen open_clip backbone.

    model_name: an open_clip architecture (`ViT-B-32`, `clipposter-tiny`) or `hf-hub:ORG/NAME`.
    pretrained: an open_clip tag (`openai`, `laion2b_s34b_b79k`), a local checkpoint file, or None
    for random weights (speed benchmarks only).
    """
    import open_clip

    _register_configs()
    dev = resolve_device(device)
    if precision == "auto":
        precision = "fp16" if dev.type == "cuda" else "fp32"
    weights = weights_of(model_name, pretrained)
    if model_name.startswith("hf-hub:"):
        tag = None
    elif pretrained and os.path.isfile(pretrained):
        tag = pretrained
    elif pretrained:
        known = open_clip.list_pretrained_tags_by_model(model_name)
        if model_name not in open_clip.list_models():
            raise ClipposterError(f"unknown backbone {model_name!r}: use an open_clip architecture such as "
                                  f"ViT-B-32, or hf-hub:ORG/NAME")
        if pretrained not in known:
            raise ConfigError(
                "pretrained", f"{pretrained!r} is neither a file nor a tag open_clip knows for {model_name} "
                              f"(known tags: {', '.join(known) or 'none'}); pass a tag or the path of a local "
                              f"checkpoint")
        tag = pretrained
    else:
        if model_name not in open_clip.list_models():
            raise ClipposterError(f"unknown backbone {model_name!r}: use an open_clip architecture such as ViT-B-32")
        tag = None
    try:
        with torch.random.fork_rng(devices=[]):
            # Random weights are seeded so that their identity names reproducible embeddings.
            torch.manual_seed(RANDOM_SEED)
            # A tag's weights were trained with the activation its pretrained config names: OpenAI's
            # with QuickGELU, which plain `ViT-B-32` does not use (open_clip only warns).
            quick_gelu = bool(tag and open_clip.get_pretrained_cfg(model_name, tag).get("quick_gelu"))
            model, _, preprocess = open_clip.create_model_and_transforms(model_name, pretrained=tag, device=dev,
                                                                         force_quick_gelu=quick_gelu)
    except ClipposterError:
        raise
    except Exception as exc:  # open_clip raises RuntimeError/OSError for failed downloads and bad files
        first = cause_line(exc)
        if tag and os.path.isfile(tag):
            raise ClipposterError(f"cannot load checkpoint {tag} into {model_name}: {first}") from None
        raise ClipposterError(
            f"cannot fetch pretrained weights {model_name}/{weights} ({first}); download the checkpoint "
            f"elsewhere and pass its path as `pretrained` (.safetensors, .bin or .pt)") from None
    tokenizer = open_clip.get_tokenizer(model_name)
    model.eval()  # open_clip returns the model in train mode
    identity = BackboneIdentity(model=model_name, weights=weights, embed_dim=_embed_dim(model),
                                **_preprocess_identity(model, preprocess))
    spec = {"model": model_name, "pretrained": str(Path(tag).resolve()) if tag and os.path.isfile(tag) else tag}
    return Backbone(model, preprocess, tokenizer, identity, dev, precision, spec=spec)


def load_backbone_like(identity: BackboneIdentity, spec: dict | None, pretrained: str | None = None,
                       device: str = "auto", precision: str = "auto") -> Backbone:
    """Load the backbone a cache or head was made with, from its recorded spec (or `pretrained`,
    when the checkpoint has moved), and check that it really is the same one."""
    spec = dict(spec or {})
    model = spec.get("model", identity.model)
    weights = pretrained if pretrained is not None else spec.get("pretrained")
    if weights is None and not (identity.is_random or identity.weights.startswith(("sha256:", "hf-hub"))):
        weights = identity.weights  # no spec recorded: the identity names the pretrained tag
    if weights is None and identity.weights.startswith("sha256:"):
        raise ClipposterError(f"backbone {identity.describe()} came from a local checkpoint whose path is not "
                              f"recorded; pass that checkpoint's path as `pretrained`")
    if weights and not os.path.exists(weights) and identity.weights.startswith("sha256:"):
        raise ClipposterError(f"the backbone checkpoint {weights} is gone; pass its new path as `pretrained`")
    backbone = load_backbone(model, weights, device=device, precision=precision)
    backbone.identity.check_same(identity, "the head or cache")
    return backbone


def save_tiny_backbone(path: str | os.PathLike, seed: int = 0) -> Path:
    """Build the tiny test architecture with seeded random weights and save it as safetensors.

    Loading it back goes through the same local-checkpoint path a real checkpoint takes:
    `load_backbone("clipposter-tiny", pretrained=path)`.
    """
    import open_clip
    from safetensors.torch import save_file

    _register_configs()
    torch.manual_seed(seed)
    model = open_clip.create_model(TINY_MODEL, pretrained=None)
    path = Path(path)
    state = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
    with atomic_path(path) as tmp:
        save_file(state, str(tmp))
    return path
