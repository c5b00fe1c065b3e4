"""ClipCap-style caption head: a CLIP poster embedding → a prefix of LM input vectors → a causal LM.

The seed paper's setup: a three-layer tanh MLP maps a ViT-B-32 embedding to 10 GPT-2 input
vectors, and mapper and GPT-2 are trained jointly with cross-entropy on taglines. This module keeps
that shape and avoids the pitfalls ClipCap's users hit (see docs/captions.md):

* padding never uses a real token id: padded text positions hold -100 in the label tensor, their
  input vectors are zeros, and the attention mask hides them; prefix positions are -100 too;
* every embedding is L2-normalised and centred on the training mean inside `prefix()`, the single
  path both training and inference take (the centre is saved with the mapper), so a caller cannot
  feed the mapper differently prepared vectors at inference;
* the mapper's widths come from the CLIP width the cache records and from the LM's hidden size,
  and a head refuses a cache or backbone of another identity with a message naming both;
* generation is batched over posters and uses the LM's key/value cache (see decoding.py).

A saved head is a folder (`save_pretrained` writes it, `from_pretrained` reads it):

    config.json          head settings, backbone identity and spec, training record (written last)
    mapper.safetensors   the prefix mapper
    lm/                  the language model and its tokenizer (save_pretrained)

Training (train.py) writes such a folder per epoch as its checkpoint.
"""
from __future__ import annotations

import os
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

from clipposter.embedding.backbone import BackboneIdentity, resolve_device
from clipposter.errors import ClipposterError, ConfigError
from clipposter.files import atomic_path, read_json, replace_dir, write_json
from clipposter.records import clean_text
from clipposter.heads.caption.config import DEFAULT_LM, MAPPERS, MODES, TARGETS, DecodingConfig, one_of
from clipposter.heads.caption.decoding import generate_kwargs, postprocess, word_start_table
from clipposter.heads.caption.lm import first_line, load_language_model, max_positions, quiet_transformers
from clipposter.heads.weights import check_finite

__all__ = ["FORMAT_VERSION", "HEAD_KIND", "CONFIG_FILE", "MAPPER_FILE", "LM_DIR", "MLPMapper", "TransformerMapper",
           "CaptionHeadConfig", "Caption", "CaptionHead", "read_head_config", "write_head_json"]

FORMAT_VERSION = 1
HEAD_KIND = "caption"
CONFIG_FILE = "config.json"
MAPPER_FILE = "mapper.safetensors"
LM_DIR = "lm"


# ----------------------------------------------------------------------------- mappers

class _Mapper(nn.Module):
    """Holds the embedding normalisation both mappers share.

    CLIP embeddings of posters crowd into a narrow cone (mean pairwise cosine ~0.9 for the tiny test
    backbone, well above 0.5 for real ones), so the differences that matter are small next to the
    shared direction. The training-set mean is stored as `center` and subtracted after
    L2-normalising, then the result is L2-normalised again: inputs spread over the sphere. The
    centre is saved with the mapper weights, so inference applies exactly what training did."""

    def __init__(self, clip_dim: int):
        super().__init__()
        self.register_buffer("center", torch.zeros(clip_dim))

    def normalise(self, x: torch.Tensor) -> torch.Tensor:
        x = F.normalize(x, dim=-1)
        return F.normalize(x - self.center, dim=-1)


class MLPMapper(_Mapper):
    """Three Linear layers with tanh between them: CLIP width → hidden → hidden → prefix × LM width."""

    def __init__(self, clip_dim: int, lm_dim: int, prefix_length: int, hidden: int):
        super().__init__(clip_dim)
        self.prefix_length, self.lm_dim = prefix_length, lm_dim
        self.net = nn.Sequential(
            nn.Linear(clip_dim, hidden), nn.Tanh(),
            nn.Linear(hidden, hidden), nn.Tanh(),
            nn.Linear(hidden, prefix_length * lm_dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x).view(x.shape[0], self.prefix_length, self.lm_dim)


class TransformerMapper(_Mapper):
    """ClipCap's transformer option: the embedding is projected to `prefix_length` tokens, learned
    query tokens are appended, and an encoder stack lets the queries read them; the queries'
    outputs are the prefix."""

    def __init__(self, clip_dim: int, lm_dim: int, prefix_length: int, layers: int):
        super().__init__(clip_dim)
        self.prefix_length, self.lm_dim = prefix_length, lm_dim
        heads = next(h for h in (8, 4, 2, 1) if lm_dim % h == 0)
        self.project = nn.Linear(clip_dim, prefix_length * lm_dim)
        self.queries = nn.Parameter(torch.randn(prefix_length, lm_dim) * 0.02)
        layer = nn.TransformerEncoderLayer(lm_dim, heads, dim_feedforward=2 * lm_dim, dropout=0.0,
                                           batch_first=True, norm_first=True)
        self.encoder = nn.TransformerEncoder(layer, layers, enable_nested_tensor=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        tokens = self.project(x).view(x.shape[0], self.prefix_length, self.lm_dim)
        queries = self.queries.unsqueeze(0).expand(x.shape[0], -1, -1)
        return self.encoder(torch.cat([tokens, queries], dim=1))[:, self.prefix_length:]


@dataclass
class CaptionHeadConfig:
    """Everything needed to rebuild the head's modules; saved as part of config.json."""

    clip_dim: int
    lm_dim: int
    prefix_length: int = 10
    mapper: str = "mlp"
    mapper_hidden: int = 0  # MLP width; 0 → (LM width × prefix length) / 2, ClipCap's choice
    mapper_layers: int = 8  # transformer mapper depth (ClipCap's 8)
    target: str = "tagline"
    max_tokens: int = 40  # text tokens per training example, end-of-text included
    mode: str = "joint"
    center: bool = True  # subtract the training embeddings' mean before the mapper (see _Mapper)
    lm_source: str = DEFAULT_LM  # where the LM was first loaded from (informational)
    lm_random_init: bool = False  # the LM started from random weights (tiny_lm), not trained ones

    def __post_init__(self) -> None:
        one_of("mapper", self.mapper, MAPPERS)
        one_of("target", self.target, TARGETS)
        one_of("mode", self.mode, MODES)
        if self.prefix_length < 1:
            raise ConfigError("prefix_length", f"must be at least 1, got {self.prefix_length}")
        if self.max_tokens < 2:
            raise ConfigError("max_tokens", f"must be at least 2, got {self.max_tokens}")
        if self.mapper_hidden <= 0:
            self.mapper_hidden = max(self.clip_dim, self.lm_dim * self.prefix_length // 2)

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> "CaptionHeadConfig":
        names = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in names})


@dataclass
class Caption:
    """One generated text: cleaned text, raw decoded text and how many tokens were generated."""

    text: str
    raw: str
    tokens: int


# ----------------------------------------------------------------------------- the head

class CaptionHead(nn.Module):
    """Prefix mapper + causal LM + tokenizer, tied to one backbone identity."""

    def __init__(self, config: CaptionHeadConfig, lm, tokenizer, identity: BackboneIdentity,
                 backbone_spec: dict | None = None):
        super().__init__()
        if identity.embed_dim != config.clip_dim:
            raise ClipposterError(f"the head expects {config.clip_dim}-wide embeddings but the backbone "
                                  f"{identity.describe()} gives {identity.embed_dim}")
        lm_dim = lm.get_input_embeddings().embedding_dim
        if lm_dim != config.lm_dim:
            raise ClipposterError(f"the head's mapper was built for an LM of width {config.lm_dim}, "
                                  f"but the language model has width {lm_dim}")
        limit = max_positions(lm)
        if limit is not None and config.prefix_length + config.max_tokens > limit:
            raise ConfigError("max_tokens", f"is {config.max_tokens}, but with the prefix ({config.prefix_length}) "
                                            f"that exceeds the language model's {limit} positions; lower it")
        self.config = config
        self.identity = identity
        self.backbone_spec = backbone_spec
        self.lm = lm
        self.tokenizer = tokenizer
        if config.mapper == "mlp":
            self.mapper: nn.Module = MLPMapper(config.clip_dim, lm_dim, config.prefix_length, config.mapper_hidden)
        else:
            self.mapper = TransformerMapper(config.clip_dim, lm_dim, config.prefix_length, config.mapper_layers)
        self.training_record: dict = {}
        self._word_starts: torch.Tensor | None = None

    # ----- construction ----------------------------------------------------------------------
    @classmethod
    def create(cls, identity: BackboneIdentity, *, lm: str | Any = DEFAULT_LM, tokenizer: str | Any | None = None,
               backbone_spec: dict | None = None, prefix_length: int = 10, mapper: str = "mlp",
               mapper_hidden: int = 0, mapper_layers: int = 8, target: str = "tagline", max_tokens: int = 40,
               mode: str = "joint", center: bool = True, seed: int = 0) -> "CaptionHead":
        """A new head. `lm` is a hub name or local folder (or an already built model, with
        `tokenizer` then the tokenizer object); the mapper is seeded with `seed`."""
        if isinstance(lm, (str, os.PathLike)):
            lm_source = str(lm)
            model, tok = load_language_model(lm_source, tokenizer if isinstance(tokenizer, (str, os.PathLike))
                                             else None)
            if tokenizer is not None and not isinstance(tokenizer, (str, os.PathLike)):
                tok = tokenizer
        else:
            if tokenizer is None or isinstance(tokenizer, (str, os.PathLike)):
                raise ConfigError("tokenizer", "must be the tokenizer object when lm is a model object")
            model, tok, lm_source = lm, tokenizer, getattr(lm, "name_or_path", "") or "in-memory"
        cfg = CaptionHeadConfig(clip_dim=identity.embed_dim, lm_dim=model.get_input_embeddings().embedding_dim,
                                prefix_length=prefix_length, mapper=mapper, mapper_hidden=mapper_hidden,
                                mapper_layers=mapper_layers, target=target, max_tokens=max_tokens, mode=mode,
                                center=center, lm_source=lm_source,
                                lm_random_init=bool(getattr(model.config, "clipposter_random_init", False)))
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            head = cls(cfg, model, tok, identity, backbone_spec)
        return head

    @property
    def device(self) -> torch.device:
        return next(self.mapper.parameters()).device

    @property
    def eos_id(self) -> int:
        return int(self.tokenizer.eos_token_id)

    @property
    def pad_id(self) -> int:
        # Generation needs some id to fill finished rows with; GPT-2 has no pad token, so the
        # end-of-text id is used there only. Training never pads with a token id (see `batch`).
        pad = self.tokenizer.pad_token_id
        return int(pad) if pad is not None else self.eos_id

    # ----- forward ---------------------------------------------------------------------------
    def prefix(self, embeddings: torch.Tensor) -> torch.Tensor:
        """(B, clip_dim) embeddings → (B, prefix_length, lm_dim) LM input vectors.

        The one place embeddings enter the head: always L2-normalised here, in training and at
        inference, so the scale the mapper sees never depends on the caller."""
        x = self.mapper.normalise(embeddings.to(self.device, torch.float32))
        dtype = self.lm.get_input_embeddings().weight.dtype
        return self.mapper(x).to(dtype)

    def fit_center(self, embeddings: np.ndarray) -> None:
        """Set the normalisation centre from training embeddings (see `_Mapper`); a head made with
        center=False keeps the zero centre, i.e. plain L2 normalisation."""
        if self.config.center and len(embeddings):
            unit = F.normalize(torch.as_tensor(np.asarray(embeddings, dtype=np.float32)), dim=-1)
            self.mapper.center.copy_(unit.mean(dim=0).to(self.mapper.center.device))

    def loss(self, embeddings: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, int]:
        """Summed cross-entropy over the real text tokens, and how many there were.

        labels: (B, T) token ids with -100 at padding. Returned as a sum so gradient accumulation
        can divide by the token count of the whole accumulated batch."""
        labels = labels.to(self.device)
        prefix = self.prefix(embeddings)
        batch, plen = prefix.shape[:2]
        mask = labels != -100
        text = self.lm.get_input_embeddings()(labels.clamp_min(0)) * mask.unsqueeze(-1).to(prefix.dtype)
        inputs = torch.cat([prefix, text], dim=1)
        attention = torch.cat([torch.ones(batch, plen, dtype=torch.long, device=self.device), mask.long()], dim=1)
        # Full-length labels: the prefix and the padding are -100, so they never count in the loss.
        full = torch.cat([torch.full((batch, plen), -100, dtype=labels.dtype, device=self.device), labels], dim=1)
        # Position t predicts token t+1; only the last T+1 positions' logits are ever needed.
        keep = labels.shape[1] + 1
        logits = self.lm(inputs_embeds=inputs, attention_mask=attention, logits_to_keep=keep).logits
        targets = full[:, -keep + 1:]
        loss = F.cross_entropy(logits[:, :-1].float().reshape(-1, logits.shape[-1]), targets.reshape(-1),
                               ignore_index=-100, reduction="sum")
        return loss, int(mask.sum())

    # ----- text preparation ------------------------------------------------------------------
    def encode_targets(self, texts: Sequence[str | None]) -> tuple[list[list[int] | None], int, int]:
        """Token ids per text (None for an unusable one), truncated to `max_tokens`.

        A text that fits gets the end-of-text token appended, so the head learns where to stop; a
        truncated one does not, since its real ending was cut. Returns (ids, skipped, truncated)."""
        limit = self.config.max_tokens
        out: list[list[int] | None] = []
        skipped = truncated = 0
        for value in texts:
            text = clean_text(value)
            if text is None:
                out.append(None)
                skipped += 1
                continue
            ids = self.tokenizer(text, add_special_tokens=False)["input_ids"]
            if not ids:
                out.append(None)
                skipped += 1
                continue
            if len(ids) >= limit:
                truncated += len(ids) > limit
                ids = ids[:limit]
            else:
                ids = ids + [self.eos_id]
            out.append(ids)
        return out, skipped, truncated

    @staticmethod
    def batch(ids: Sequence[Sequence[int]]) -> torch.Tensor:
        """Right-padded label tensor with -100 (never a real token id) at the padding."""
        width = max(len(x) for x in ids)
        out = torch.full((len(ids), width), -100, dtype=torch.long)
        for i, x in enumerate(ids):
            out[i, :len(x)] = torch.tensor(x, dtype=torch.long)
        return out

    # ----- generation ------------------------------------------------------------------------
    def word_starts(self) -> torch.Tensor:
        if self._word_starts is None:
            self._word_starts = word_start_table(self.tokenizer, self.lm.get_output_embeddings().weight.shape[0])
        return self._word_starts

    @torch.inference_mode()
    def generate(self, embeddings: np.ndarray | torch.Tensor, decoding: DecodingConfig | None = None,
                 batch_size: int = 32, progress: bool = False) -> list[list[Caption]]:
        """Captions for each embedding: a list of `decoding.num_return` candidates per poster."""
        from tqdm.auto import tqdm

        cfg = (decoding or DecodingConfig()).validate()
        emb = torch.as_tensor(np.asarray(embeddings, dtype=np.float32) if not torch.is_tensor(embeddings)
                              else embeddings.float())
        if emb.ndim != 2 or emb.shape[1] != self.config.clip_dim:
            raise ClipposterError(f"expected embeddings of shape (N, {self.config.clip_dim}), got {tuple(emb.shape)}")
        max_new = cfg.max_new_tokens or self.config.max_tokens
        limit = max_positions(self.lm)
        if limit is not None and self.config.prefix_length + max_new > limit:
            raise ConfigError("max_new_tokens", f"is {max_new}, but with the prefix ({self.config.prefix_length}) "
                                                f"that exceeds the language model's {limit} positions")
        kwargs = generate_kwargs(cfg, max_new, self.eos_id, self.pad_id,
                                 self.word_starts() if cfg.strategy == "lstm" else None)
        was_training = self.training
        self.eval()
        results: list[list[Caption]] = []
        devices = [self.device] if self.device.type == "cuda" else []
        try:
            with torch.random.fork_rng(devices=devices):
                bar = tqdm(range(0, len(emb), batch_size), desc="generating", unit="batch", disable=not progress)
                for n, start in enumerate(bar):
                    # Seeded per batch: sampled outputs are reproducible and independent of how
                    # many batches ran before in this process.
                    torch.manual_seed(cfg.seed + n)
                    prefix = self.prefix(emb[start:start + batch_size])
                    attention = torch.ones(prefix.shape[:2], dtype=torch.long, device=self.device)
                    with quiet_transformers():
                        ids = self.lm.generate(inputs_embeds=prefix, attention_mask=attention, **kwargs)
                    results.extend(self._decode(ids, cfg))
        finally:
            self.train(was_training)
        return results

    def _decode(self, ids: torch.Tensor, cfg: DecodingConfig) -> list[list[Caption]]:
        ids = ids.cpu()
        out: list[list[Caption]] = []
        for row in range(0, ids.shape[0], cfg.num_return):
            group = []
            for seq in ids[row:row + cfg.num_return].tolist():
                if self.eos_id in seq:
                    seq = seq[:seq.index(self.eos_id)]
                raw = self.tokenizer.decode(seq, skip_special_tokens=True)
                group.append(Caption(text=postprocess(raw, cfg.cut_partial), raw=raw, tokens=len(seq)))
            out.append(group)
        return out

    # ----- saving and loading ----------------------------------------------------------------
    def check_backbone(self, identity: BackboneIdentity, what: str) -> None:
        """Refuse embeddings from a backbone other than the one the head was trained on. `identity` is
        the backbone of `what` (the cache or backbone the embeddings come from)."""
        if identity.key != self.identity.key:
            raise ClipposterError(f"{what} was made with backbone {identity.describe()}, but the caption head was "
                                  f"trained on {self.identity.describe()}; use embeddings of the head's backbone, "
                                  f"or train a caption head on these")

    def config_dict(self) -> dict:
        return {"format_version": FORMAT_VERSION, "kind": HEAD_KIND, "head": self.config.to_dict(),
                "backbone": self.identity.to_dict(), "backbone_spec": self.backbone_spec,
                "training": self.training_record}

    def save_pretrained(self, path: str | os.PathLike) -> Path:
        """Write the head folder. config.json goes last, so a folder without it is incomplete."""
        from safetensors.torch import save_file

        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        (path / CONFIG_FILE).unlink(missing_ok=True)
        state = {k: v.detach().cpu().contiguous() for k, v in self.mapper.state_dict().items()}
        with atomic_path(path / MAPPER_FILE) as tmp:
            save_file(state, str(tmp), metadata={"format_version": str(FORMAT_VERSION)})

        def write_lm(folder: Path) -> None:
            with quiet_transformers():
                self.lm.save_pretrained(folder)
                self.tokenizer.save_pretrained(folder)

        replace_dir(write_lm, path / LM_DIR)
        write_head_json(path / CONFIG_FILE, self.config_dict())
        return path

    @classmethod
    def from_pretrained(cls, path: str | os.PathLike, device: str = "cpu") -> "CaptionHead":
        """Load a head folder written by `save_pretrained` (or a training checkpoint)."""
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        path = Path(path)
        meta = read_head_config(path)
        try:
            cfg = CaptionHeadConfig.from_dict(meta["head"])
            identity = BackboneIdentity.from_dict(meta["backbone"])
        except (KeyError, TypeError) as exc:
            raise ClipposterError(f"{path / CONFIG_FILE}: missing or malformed field {exc}; "
                                  f"retrain the head") from None
        if not (path / MAPPER_FILE).is_file():
            raise ClipposterError(f"{path / MAPPER_FILE}: missing; the head folder is incomplete, retrain or copy it again")
        if not (path / LM_DIR).is_dir():
            raise ClipposterError(f"{path / LM_DIR}: missing; the head folder is incomplete, retrain or copy it again")
        try:
            lm, tok = load_language_model(str(path / LM_DIR))
        except ConfigError as exc:  # the saved LM is part of the head: no setting to change, the folder is bad
            raise ClipposterError(f"{path / LM_DIR}: {exc.problem}; the head folder is incomplete, retrain or copy "
                                  f"it again") from None
        _check_lm_files(path / LM_DIR)
        head = cls(cfg, lm, tok, identity, meta.get("backbone_spec"))
        try:
            state = load_file(str(path / MAPPER_FILE))
            check_finite(state, path / MAPPER_FILE)
            head.mapper.load_state_dict(state)
        except (SafetensorError, RuntimeError, OSError) as exc:
            raise ClipposterError(f"{path / MAPPER_FILE}: does not fit the mapper described in config.json "
                                  f"({first_line(exc)}); retrain the head") from None
        head.training_record = meta.get("training", {})
        return head.to(resolve_device(device)).eval()

    # The short names, kept for callers written before the save_pretrained/from_pretrained convention.
    save = save_pretrained
    load = from_pretrained


def _check_lm_files(folder: Path) -> None:
    """Refuse a saved LM holding NaN or infinite weights, naming its file and tensor. The files are
    read one tensor at a time: a sharded LM is never held twice in memory."""
    from safetensors import safe_open

    for file in sorted(folder.glob("*.safetensors")):
        with safe_open(str(file), framework="pt") as f:
            for name in f.keys():
                check_finite({name: f.get_tensor(name)}, file)


def read_head_config(path: Path) -> dict:
    cfg_path = path / CONFIG_FILE
    if not cfg_path.is_file():
        raise ClipposterError(f"{path}: not a caption head (no {CONFIG_FILE}); train one into this folder, or "
                              f"pass the folder caption training wrote")
    try:
        meta = read_json(cfg_path)
    except (OSError, ValueError) as exc:
        raise ClipposterError(f"{cfg_path}: unreadable ({first_line(exc)}); retrain the head") from None
    if meta.get("kind") != HEAD_KIND:
        raise ClipposterError(f"{cfg_path}: kind is {meta.get('kind')!r}, not a caption head; pass the folder "
                              f"caption training wrote")
    if meta.get("format_version") != FORMAT_VERSION:
        raise ClipposterError(f"{cfg_path}: head format {meta.get('format_version')} is not {FORMAT_VERSION}; "
                              f"retrain the head with this version")
    return meta


def write_head_json(path: Path, data: dict) -> None:
    """config.json and the trainer state, written atomically; the NaN losses of a diverged run are kept."""
    write_json(path, data, allow_nan=True, default=str)
