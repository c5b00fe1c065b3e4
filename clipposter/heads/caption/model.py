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

A saved head is a folder:

    config.json          head settings, backbone identity and spec, training record (written last)
    mapper.safetensors   the prefix mapper
    lm/                  the language model and its tokenizer (save_pretrained)

Training writes a complete head per epoch under `OUT/checkpoints/epoch-NNNN/` together with the
optimizer state, scheduler state and data-order seed, so `--resume` continues bit-for-bit.
"""
from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import shutil
import time
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

from clipposter.embedding.backbone import BackboneIdentity, resolve_device
from clipposter.errors import ClipposterError
from clipposter.records import clean_text
from clipposter.heads.caption.decoding import DecodingConfig, generate_kwargs, postprocess, word_start_table

log = logging.getLogger(__name__)

FORMAT_VERSION = 1
HEAD_KIND = "caption"
CONFIG_FILE = "config.json"
MAPPER_FILE = "mapper.safetensors"
LM_DIR = "lm"
CHECKPOINTS = "checkpoints"
LATEST = "latest.json"
TARGETS = ("tagline", "overview")
MODES = ("joint", "prefix")
MAPPERS = ("mlp", "transformer")
DEFAULT_LM = "gpt2"


# ----------------------------------------------------------------------------- loading LMs

@contextlib.contextmanager
def quiet_transformers():
    """Hide transformers' per-file progress bars (a checkpoint per epoch would print two each) and
    its notes that repetition/n-gram rules skip the prompt: our prompt is vectors, not tokens."""
    import warnings

    from transformers.utils import logging as hf_logging

    enabled = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=r"Passing `(repetition_penalty|no_repeat_ngram_size)` with "
                                                      r"`inputs_embeds`")
            yield
    finally:
        if enabled:
            hf_logging.enable_progress_bar()


def _offline() -> bool:
    return any(os.environ.get(v, "").strip().lower() in ("1", "true", "yes", "on")
               for v in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"))


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return (text.splitlines()[0][:200] if text else type(exc).__name__)


# A lower-case ASCII text every byte-level or word-piece tokenizer of a causal LM encodes and decodes back.
_PROBE_TEXT = "a poster"


def _tokenizer_problem(tok) -> str | None:
    """Why a loaded tokenizer cannot be the one its files describe, or None.

    transformers 5 answers a local-only load whose HF cache holds the model's config.json but no
    tokenizer files with an empty tokenizer (one entry, every text encodes to []) instead of
    raising; a tokenizer must encode a known text to tokens that decode back to it."""
    try:
        ids = tok.encode(_PROBE_TEXT, add_special_tokens=False)
        back = tok.decode(ids, skip_special_tokens=True) if ids else ""
    except Exception as exc:  # a broken tokenizer file fails in many ways; all mean "unusable"
        return f"it cannot encode text ({_first_line(exc)})"
    if not ids:
        return f"it encodes {_PROBE_TEXT!r} to no tokens ({len(tok)} entries: its vocabulary files are missing)"
    if back.strip() != _PROBE_TEXT:
        return f"it encodes {_PROBE_TEXT!r} to tokens that decode to {back!r}"
    return None


def _model_problem(loaded) -> str | None:
    """Why a model loaded with output_loading_info cannot be the one asked for, or None: weights that
    were not in the files found would be random."""
    _, info = loaded
    missing = sorted(info.get("missing_keys") or ())
    if missing:
        return f"{len(missing)} of its weights are not in the files found (first: {missing[0]})"
    return None


def _from_pretrained(loader, name: str, check=None, **kw):
    """Local folder → load it; a hub name → the local HF cache first, the hub only when `hub` and not offline.

    Trying the local cache first makes the common offline case fail (or succeed) in a second
    instead of after the hub client's retries. What a local-first load returns is checked with
    `check` (returns why it is unusable, or None): a cache holding some of a repository's files can
    load "successfully" into something empty, and then the hub must be asked for the rest."""
    hub = kw.pop("hub", True)

    def checked(result, where: str):
        problem = check(result) if check else None
        if problem:
            raise OSError(f"{where} {name} is incomplete: {problem}")
        return result

    if Path(name).expanduser().is_dir():
        return checked(loader(str(Path(name).expanduser()), **kw), "the folder")
    if name.startswith((".", "/", "~")) or name.count("/") > 1:
        # Clearly a path (a hub id is NAME or ORG/NAME): do not ask the hub about it.
        raise OSError(f"no folder {name}")
    try:
        return checked(loader(name, local_files_only=True, **kw), "the local HF cache's copy of")
    except (OSError, ValueError):
        if _offline() or not hub:
            raise
    return checked(loader(name, **kw), "the hub's copy of")


def load_language_model(name_or_path: str = DEFAULT_LM, tokenizer: str | None = None, hub: bool = True):
    """A Hugging Face causal LM and its tokenizer, by hub name or local folder.

    hub=False loads a hub name from the local HF cache only (the caller knows the hub is unreachable).
    Anything that cannot be loaded (no network, no such folder, not a causal LM) becomes one
    ClipposterError line that says how to point at a local copy."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    try:
        with quiet_transformers():
            lm, _ = _from_pretrained(AutoModelForCausalLM.from_pretrained, name_or_path, _model_problem,
                                     output_loading_info=True, hub=hub)
    except Exception as exc:  # OSError, ValueError, HF validation errors: all mean "cannot load"
        raise ClipposterError(
            f"cannot load language model {name_or_path!r} offline ({_first_line(exc)}); pass --lm "
            f"/path/to/local/folder with config.json and weights") from None
    tok_source = tokenizer or name_or_path
    try:
        tok = _from_pretrained(AutoTokenizer.from_pretrained, tok_source, _tokenizer_problem, hub=hub)
    except Exception as exc:
        raise ClipposterError(
            f"cannot load the tokenizer {tok_source!r} ({_first_line(exc)}); pass --tokenizer "
            f"/path/to/folder with tokenizer files (tokenizer.json or vocab.json + merges.txt)") from None
    if tok.eos_token_id is None:
        raise ClipposterError(f"the tokenizer {tok_source!r} has no end-of-text token; captions could never "
                              f"stop. Use a tokenizer with eos_token set")
    vocab = lm.get_input_embeddings().num_embeddings
    if len(tok) > vocab:
        raise ClipposterError(f"the tokenizer {tok_source!r} has {len(tok)} tokens but the language model "
                              f"{name_or_path!r} only {vocab}; use the tokenizer the LM was trained with")
    return lm, tok


def _max_positions(lm) -> int | None:
    cfg = lm.config
    for name in ("n_positions", "max_position_embeddings", "n_ctx"):
        value = getattr(cfg, name, None)
        if isinstance(value, int) and value > 0:
            return value
    return None


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

    def __post_init__(self) -> None:
        if self.mapper not in MAPPERS:
            raise ClipposterError(f"--mapper must be one of {', '.join(MAPPERS)}, got {self.mapper!r}")
        if self.target not in TARGETS:
            raise ClipposterError(f"--target must be one of {', '.join(TARGETS)}, got {self.target!r}")
        if self.mode not in MODES:
            raise ClipposterError(f"--mode must be one of {', '.join(MODES)}, got {self.mode!r}")
        if self.prefix_length < 1:
            raise ClipposterError(f"--prefix-length must be at least 1, got {self.prefix_length}")
        if self.max_tokens < 2:
            raise ClipposterError(f"--max-tokens must be at least 2, got {self.max_tokens}")
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
        limit = _max_positions(lm)
        if limit is not None and config.prefix_length + config.max_tokens > limit:
            raise ClipposterError(f"prefix length {config.prefix_length} + --max-tokens {config.max_tokens} exceeds "
                                  f"the language model's {limit} positions; lower --max-tokens")
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
                raise ValueError("pass the tokenizer object together with a model object")
            model, tok, lm_source = lm, tokenizer, getattr(lm, "name_or_path", "") or "in-memory"
        cfg = CaptionHeadConfig(clip_dim=identity.embed_dim, lm_dim=model.get_input_embeddings().embedding_dim,
                                prefix_length=prefix_length, mapper=mapper, mapper_hidden=mapper_hidden,
                                mapper_layers=mapper_layers, target=target, max_tokens=max_tokens, mode=mode,
                                center=center, lm_source=lm_source)
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
        limit = _max_positions(self.lm)
        if limit is not None and self.config.prefix_length + max_new > limit:
            raise ClipposterError(f"--max-new-tokens {max_new} plus the prefix ({self.config.prefix_length}) exceeds "
                                  f"the language model's {limit} positions")
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
        """Refuse embeddings from a backbone other than the one the head was trained on."""
        identity.check_same(self.identity, what)

    def config_dict(self) -> dict:
        return {"format_version": FORMAT_VERSION, "kind": HEAD_KIND, "head": self.config.to_dict(),
                "backbone": self.identity.to_dict(), "backbone_spec": self.backbone_spec,
                "training": self.training_record}

    def save(self, path: str | os.PathLike) -> Path:
        """Write the head folder. config.json goes last, so a folder without it is incomplete."""
        from safetensors.torch import save_file

        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        (path / CONFIG_FILE).unlink(missing_ok=True)
        state = {k: v.detach().cpu().contiguous() for k, v in self.mapper.state_dict().items()}
        tmp = path / (MAPPER_FILE + ".tmp")
        save_file(state, str(tmp), metadata={"format_version": str(FORMAT_VERSION)})
        os.replace(tmp, path / MAPPER_FILE)
        lm_tmp = path / (LM_DIR + ".tmp")
        shutil.rmtree(lm_tmp, ignore_errors=True)
        with quiet_transformers():
            self.lm.save_pretrained(lm_tmp)
            self.tokenizer.save_pretrained(lm_tmp)
        shutil.rmtree(path / LM_DIR, ignore_errors=True)
        os.replace(lm_tmp, path / LM_DIR)
        _write_json(path / CONFIG_FILE, self.config_dict())
        return path

    @classmethod
    def load(cls, path: str | os.PathLike, device: str = "cpu") -> "CaptionHead":
        """Load a head folder written by `save` (or a training checkpoint)."""
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        path = Path(path)
        meta = read_head_config(path)
        try:
            cfg = CaptionHeadConfig.from_dict(meta["head"])
            identity = BackboneIdentity.from_dict(meta["backbone"])
        except (KeyError, TypeError) as exc:
            raise ClipposterError(f"{path / CONFIG_FILE}: missing or malformed field {exc}; "
                                  f"retrain the head with `clipposter train captions`") from None
        if not (path / MAPPER_FILE).is_file():
            raise ClipposterError(f"{path / MAPPER_FILE}: missing; the head folder is incomplete, retrain or copy it again")
        if not (path / LM_DIR).is_dir():
            raise ClipposterError(f"{path / LM_DIR}: missing; the head folder is incomplete, retrain or copy it again")
        lm, tok = load_language_model(str(path / LM_DIR))
        head = cls(cfg, lm, tok, identity, meta.get("backbone_spec"))
        try:
            state = load_file(str(path / MAPPER_FILE))
            head.mapper.load_state_dict(state)
        except (SafetensorError, RuntimeError, OSError) as exc:
            raise ClipposterError(f"{path / MAPPER_FILE}: does not fit the mapper described in config.json "
                                  f"({_first_line(exc)}); retrain the head") from None
        head.training_record = meta.get("training", {})
        return head.to(resolve_device(device)).eval()


def read_head_config(path: Path) -> dict:
    cfg_path = path / CONFIG_FILE
    if not cfg_path.is_file():
        raise ClipposterError(f"{path}: not a caption head (no {CONFIG_FILE}); train one with "
                              f"`clipposter train captions --cache DIR --out {path}`")
    try:
        meta = json.loads(cfg_path.read_text())
    except (OSError, ValueError) as exc:
        raise ClipposterError(f"{cfg_path}: unreadable ({_first_line(exc)}); retrain the head") from None
    if meta.get("kind") != HEAD_KIND:
        raise ClipposterError(f"{cfg_path}: kind is {meta.get('kind')!r}, not a caption head; pass the folder "
                              f"written by `clipposter train captions`")
    if meta.get("format_version") != FORMAT_VERSION:
        raise ClipposterError(f"{cfg_path}: head format {meta.get('format_version')} is not {FORMAT_VERSION}; "
                              f"retrain the head with this version")
    return meta


def _write_json(path: Path, data: dict) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(data, indent=2, default=str))
    os.replace(tmp, path)


# ----------------------------------------------------------------------------- training

@dataclass
class TrainConfig:
    epochs: int = 10
    batch_size: int = 16  # the paper's best
    accumulate: int = 1  # optimizer step every `accumulate` batches
    lr: float = 2e-5  # the paper's best for joint training of GPT-2
    warmup_steps: int | None = None  # None: 10 % of all optimizer steps, at most ClipCap's 5000
    weight_decay: float = 0.0
    max_grad_norm: float = 1.0
    seed: int = 0
    device: str = "auto"

    def validate(self) -> "TrainConfig":
        for name in ("epochs", "batch_size", "accumulate"):
            if getattr(self, name) < 1:
                raise ClipposterError(f"--{name.replace('_', '-')} must be at least 1, got {getattr(self, name)}")
        if self.lr <= 0:
            raise ClipposterError(f"--lr must be positive, got {self.lr}")
        if self.warmup_steps is not None and self.warmup_steps < 0:
            raise ClipposterError(f"--warmup-steps must be 0 or more, got {self.warmup_steps}")
        return self


@dataclass
class TrainSummary:
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
def validation_loss(head: CaptionHead, emb: np.ndarray, ids: list[list[int]], batch_size: int = 64) -> float | None:
    """Mean cross-entropy per text token (nats), or None with no examples."""
    if not ids:
        return None
    was = head.training
    head.eval()
    total, count = 0.0, 0
    for start in range(0, len(ids), batch_size):
        loss, n = head.loss(torch.from_numpy(emb[start:start + batch_size]), head.batch(ids[start:start + batch_size]))
        total += float(loss)
        count += n
    head.train(was)
    return total / max(1, count)


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
        name = json.loads(pointer.read_text())["checkpoint"]
    except (OSError, ValueError, KeyError) as exc:
        raise ClipposterError(f"{pointer}: unreadable ({_first_line(exc)}); delete {out / CHECKPOINTS} "
                              f"and train from scratch") from None
    path = out / CHECKPOINTS / name
    if not (path / CONFIG_FILE).is_file():
        raise ClipposterError(f"{path}: the checkpoint named by {pointer} is incomplete; delete it and train again")
    return path


def _save_checkpoint(head: CaptionHead, out: Path, epoch: int, optimizer, scheduler, state: dict) -> Path:
    """A complete head plus optimizer/scheduler state; the pointer moves only once it is whole."""
    root = out / CHECKPOINTS
    path = root / f"epoch-{epoch:04d}"
    shutil.rmtree(path, ignore_errors=True)
    head.save(path)
    # Optimizer moments are tensors: torch.save of a plain state dict, read back with weights_only.
    torch.save(optimizer.state_dict(), path / "optimizer.pt")
    _write_json(path / "trainer_state.json", {**state, "scheduler": scheduler.state_dict()})
    _write_json(root / LATEST, {"checkpoint": path.name, "epoch": epoch})
    for old in root.glob("epoch-*"):
        if old != path:
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
    shutil.copy2(checkpoint / CONFIG_FILE, out / (CONFIG_FILE + ".tmp"))
    os.replace(out / (CONFIG_FILE + ".tmp"), out / CONFIG_FILE)


def train_caption_head(cache, out: str | os.PathLike, *, lm: str | Any = DEFAULT_LM, tokenizer: str | Any | None = None,
                       target: str = "tagline", mode: str = "joint", mapper: str = "mlp", prefix_length: int = 10,
                       mapper_hidden: int = 0, mapper_layers: int = 8, max_tokens: int = 40, center: bool = True,
                       train: TrainConfig | None = None, resume: bool = False, progress: bool = True) -> TrainSummary:
    """Train a caption head on the cache's train split and write it to `out`.

    A checkpoint is written after every epoch; `resume=True` continues from the last one (with
    `train.epochs` the new total). Validation loss is reported per epoch when the cache has a
    validation split."""
    from tqdm.auto import tqdm

    cfg = (train or TrainConfig()).validate()
    out = Path(out)
    device = resolve_device(cfg.device)
    started = time.perf_counter()
    checkpoint = _latest_checkpoint(out) if resume else None
    if not resume and ((out / CONFIG_FILE).exists() or (out / CHECKPOINTS / LATEST).exists()):
        raise ClipposterError(f"{out}: already holds a caption head or checkpoints; pass --resume to continue "
                              f"training it, or choose another --out")
    if resume and checkpoint is None:
        raise ClipposterError(f"{out}: no checkpoint to resume from ({out / CHECKPOINTS / LATEST} is missing); "
                              f"drop --resume to start training")

    state: dict = {}
    if checkpoint is not None:
        head = CaptionHead.load(checkpoint, device="cpu")
        state = json.loads((checkpoint / "trainer_state.json").read_text())
        want = {"target": target, "mode": mode}
        for key, value in want.items():
            if getattr(head.config, key) != value:
                raise ClipposterError(f"{checkpoint}: was trained with --{key} {getattr(head.config, key)}, not "
                                      f"{value}; resume with the same --{key} or train into a new --out")
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
            raise ClipposterError(f"{checkpoint}: already trained for {first_epoch} epochs; pass --epochs larger "
                                  f"than {first_epoch} to train further")

    autocast, scaler = _autocast(device)
    emb_t = torch.from_numpy(np.ascontiguousarray(emb, dtype=np.float32))
    tokens_seen, train_seconds = 0, 0.0
    step = int(state.get("step", 0))
    devices = [device] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        for epoch in range(first_epoch, cfg.epochs):
            # Data order and dropout depend only on (seed, epoch): a resumed run matches an
            # uninterrupted one.
            torch.manual_seed(cfg.seed * 100_003 + epoch)
            order = torch.randperm(len(ids), generator=torch.Generator().manual_seed(cfg.seed * 100_003 + epoch))
            _set_train_mode(head)
            t0 = time.perf_counter()
            epoch_loss, epoch_tokens = 0.0, 0
            bar = tqdm(range(batches_per_epoch), desc=f"epoch {epoch + 1}/{cfg.epochs}", unit="batch",
                       disable=not progress, leave=False)
            optimizer.zero_grad(set_to_none=True)
            for b in bar:
                if b % cfg.accumulate == 0:
                    # The accumulated batch's token count, so the summed losses average over all of it.
                    window = order[b * cfg.batch_size:(b + cfg.accumulate) * cfg.batch_size]
                    window_tokens = sum(len(ids[i]) for i in window.tolist())
                rows = order[b * cfg.batch_size:(b + 1) * cfg.batch_size].tolist()
                labels = head.batch([ids[i] for i in rows])
                with autocast:
                    loss_sum, n_tokens = head.loss(emb_t[rows], labels)
                loss = loss_sum / window_tokens
                (scaler.scale(loss) if scaler else loss).backward()
                epoch_loss += float(loss_sum.detach())
                epoch_tokens += n_tokens
                if (b + 1) % cfg.accumulate == 0 or b + 1 == batches_per_epoch:
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
            bar.close()
            seconds = time.perf_counter() - t0
            tokens_seen += epoch_tokens
            train_seconds += seconds
            val = validation_loss(head, val_emb, val_ids)
            record = {"epoch": epoch + 1, "train_loss": round(epoch_loss / max(1, epoch_tokens), 5),
                      "validation_loss": None if val is None else round(val, 5), "seconds": round(seconds, 3),
                      "tokens_per_second": round(epoch_tokens / max(seconds, 1e-9), 1)}
            history.append(record)
            if progress:
                tqdm.write(f"epoch {epoch + 1}: train loss {record['train_loss']:.4f}"
                           + (f", validation loss {val:.4f}" if val is not None else ""))
            head.training_record = {"epochs": epoch + 1, "steps": step, "lr": cfg.lr, "batch_size": cfg.batch_size,
                                    "accumulate": cfg.accumulate, "warmup_steps": warmup, "history": history,
                                    "train_examples": len(ids), "cache": str(cache.root)}
            latest = _save_checkpoint(head, out, epoch + 1, optimizer, scheduler,
                                      {"epoch": epoch + 1, "step": step, "seed": cfg.seed,
                                       "batch_size": cfg.batch_size, "history": history})
    _export(latest, out)
    return TrainSummary(out=str(out), target=head.config.target, mode=head.config.mode, epochs=cfg.epochs,
                        resumed_from_epoch=first_epoch, steps=step, train_examples=len(ids),
                        validation_examples=len(val_ids),
                        skipped={"train": skipped, "validation": val_skipped},
                        truncated={"train": truncated, "validation": val_truncated}, history=history,
                        seconds=round(time.perf_counter() - started, 3),
                        tokens_per_second=round(tokens_seen / max(train_seconds, 1e-9), 1))

