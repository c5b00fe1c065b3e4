"""The genre head's torch modules: the ML-Decoder whose queries are genre prompts, its losses, and the
modules of the two baselines (linear probe, zero-shot CLIP).

Architecture (`MLDecoder`). Genres are defined by text: each query is the CLIP text embedding of
the genre's prompts ("This is an image of a {genre} movie poster", several templates averaged),
frozen, centred on the genres' mean (so queries differ by what is genre-specific rather than by the
shared "movie poster" component) and projected to the decoder width by a learnable linear map.
The memory is the poster's image embedding, standardised with the training split's statistics.
Each decoder layer does (as ML-Decoder, self-attention optional and off by default):

    t = LayerNorm(t + Dropout(SelfAttention(t)))              # only with self_attention=True
    t = LayerNorm(t + Dropout(CrossAttention(t, memory)))
    t = t + W2 · Dropout(ReLU(W1 · t + b1)) + b2                # MLP, hidden width `mlp_hidden`

(the MLP's dropout mask is drawn once per poster and shared by its queries: see `hidden_dropout`)

and group decoding turns the query tokens into logits: `num_groups` queries, each a linear map to
ceil(G / num_groups) genre logits (default one query per genre). Unlike ML-Decoder the MLP output is
not renormalised and not dropped out before the classifier: the classifier is then linear in the
MLP's output, which lets the pooled case below fold W2 into it (see `_pooled_logits`).

Memory: pooled vs tokens. The cache stores one pooled embedding per poster, so memory is a single
token (T = 1). Cross-attention over one key gives every query the same attention weight (1) and
hence the same attended vector: the layer's output is the affine map W_o (W_v m + b_v) + b_o of the
memory, whatever the query. The head then reduces to query-specific nonlinear read-outs of that one
vector (each genre query shifts it before the LayerNorm and MLP), which is still a per-genre
classifier but no longer "looks at" different parts of the poster. The pooled decoder therefore
stores that affine map directly (`value`: Linear(D, W), the product of the memory projection and the
value and output projections, same function class), and a one-layer pooled decoder computes its
logits in a factorised form that never materialises the (batch × genres × width) tensor, ~8× less
work per step; 10 epochs on 35,000 posters then take about a minute of one CPU core
(scripts/bench/genres.py). With a ViT token sequence as memory (T > 1, `memory="tokens"`) each
layer uses real multi-head cross-attention (torch.nn.MultiheadAttention), so each genre query
attends to its own patches, as ML-Decoder intends. Its memory is the backbone's projected token
sequence (`Backbone.encode_image_tokens`: the pooled embedding, then one token per patch, all in the
text space the queries come from), read from a cache embedded with tokens.

Losses: BCE by default (optionally pos_weight per genre), focal and asymmetric (ASL) as options,
all mean-reduced and computed from log-sigmoids so extreme logits stay finite.

Baseline modules: `ZeroShotClassifier` (cosine between the poster and each genre's prompt
embedding, ×100; the head applies a softmax over genres, as CLIP's zero-shot classifier does) and
`LinearProbe` (standardised embeddings times per-genre logistic-regression weights, fitted by
`clipposter.heads.genre.baselines.fit_linear_probe`).
"""
from __future__ import annotations

import math
import threading
from typing import Callable, Mapping, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from clipposter.errors import ClipposterError, ConfigError
from clipposter.heads.genre.config import KINDS, LOSSES, DecoderConfig, TrainConfig, parse_pos_weight

# Largest batch pushed through a head at inference: bounds the (genres × batch × hidden) tensor.
INFER_BATCH = 1024
CLIP_LOGIT_SCALE = 100.0  # CLIP's learned temperature saturates at 100; zero-shot classifiers use it

# ===================================================================================== losses ==

def genre_loss(logits: torch.Tensor, targets: torch.Tensor, kind: str = "bce",
               pos_weight: torch.Tensor | None = None, *, focal_gamma: float = 2.0,
               asl_gamma_neg: float = 4.0, asl_gamma_pos: float = 0.0, asl_clip: float = 0.05) -> torch.Tensor:
    """Mean multi-label loss over all (poster, genre) pairs.

    bce:   -[w·y·log p + (1-y)·log(1-p)]
    focal: -[w·y·(1-p)^γ·log p + (1-y)·p^γ·log(1-p)]
    asl:   -[w·y·(1-p)^γ+·log p + (1-y)·p_m^γ-·log(1-p_m)],  p_m = max(p - clip, 0)
    w is the per-genre pos_weight (1 when None). Log-probabilities come from log-sigmoid, never from
    log(sigmoid), so ±1e4 logits give finite losses and gradients; every term is ≥ 0, so the loss
    is too (the reference ASL returns a negative sum, which users found hard to read and to tune).
    """
    x = logits.float()
    y = targets.to(x.dtype)
    log_p = F.logsigmoid(x)
    log_q = F.logsigmoid(-x)  # log(1 - p)
    w = 1.0 if pos_weight is None else pos_weight.to(x.dtype)
    if kind == "bce":
        pos, neg = log_p, log_q
    elif kind == "focal":
        pos = torch.exp(focal_gamma * log_q) * log_p  # (1-p)^γ computed in log space
        neg = torch.exp(focal_gamma * log_p) * log_q
    elif kind == "asl":
        pos = torch.exp(asl_gamma_pos * log_q) * log_p
        if asl_clip > 0:
            p = torch.sigmoid(x)
            # 1 - p_m = min(1 - p + clip, 1) ≥ clip: its log is always finite.
            log_q_m = torch.log(torch.clamp(torch.sigmoid(-x) + asl_clip, max=1.0))
            # Clamped away from 0 so that pow's derivative stays finite where p < clip (gradient 0 there).
            p_m = torch.clamp(p - asl_clip, min=1e-12)
            weight = p_m.pow(asl_gamma_neg) if asl_gamma_neg > 0 else torch.ones_like(p_m)
            neg = weight * log_q_m
        else:
            neg = torch.exp(asl_gamma_neg * log_p) * log_q
    else:
        raise ConfigError("kind", f"must be one of {', '.join(LOSSES)}, got {kind!r}")
    return -(w * y * pos + (1 - y) * neg).mean()


def positive_weights(y: np.ndarray, setting: str | float) -> torch.Tensor | None:
    """The per-genre pos_weight of a `TrainConfig.pos_weight` setting on training labels `y`."""
    setting = parse_pos_weight(setting)
    if setting == "none":
        return None
    if setting == "auto":
        pos = y.sum(0).astype(np.float64)
        neg = y.shape[0] - pos
        # Genres with no positive get 1 (the weight multiplies nothing); the clip keeps rare genres
        # from dominating the loss.
        w = np.where(pos > 0, neg / np.maximum(pos, 1), 1.0)
        return torch.from_numpy(np.clip(w, 1.0, 100.0)).float()
    return torch.full((y.shape[1],), float(setting))


def make_loss(config: TrainConfig, pos_weight: torch.Tensor | None) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
    """loss(logits, targets) with the loss and its parameters chosen in `config`."""
    def loss(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        return genre_loss(logits, targets, config.loss, pos_weight, focal_gamma=config.focal_gamma,
                          asl_gamma_neg=config.asl_gamma_neg, asl_gamma_pos=config.asl_gamma_pos,
                          asl_clip=config.asl_clip)
    return loss


# ==================================================================================== modules ==

def _group_queries(genre_text: torch.Tensor, num_groups: int) -> torch.Tensor:
    """One query per group: the renormalised mean of its genres' text embeddings (identity when
    every genre has its own query)."""
    g = genre_text.shape[0]
    if num_groups == g:
        return genre_text
    k = math.ceil(g / num_groups)
    rows = [genre_text[i * k:(i + 1) * k].mean(0) for i in range(num_groups)]
    return F.normalize(torch.stack(rows), dim=-1)


_workspace = threading.local()


def _backward_workspace(shape: Sequence[int], dtype: torch.dtype) -> torch.Tensor:
    """A per-thread scratch tensor for `_HiddenReadout.backward`, reused across steps.

    Its big temporary is written into freshly allocated memory otherwise, and on CPU the page faults
    of a new 13 MB tensor cost ten times the arithmetic done in it. Nothing returned by backward
    refers to this memory, and one thread runs one backward at a time, so reuse is safe.
    """
    numel = math.prod(shape)
    buf = getattr(_workspace, "buf", None)
    if buf is None or buf.dtype != dtype or buf.numel() < numel:
        buf = torch.empty(numel, dtype=dtype)
        _workspace.buf = buf
    return buf[:numel].view(tuple(shape))


class _HiddenReadout(torch.autograd.Function):
    """out[q, b] = V[q] · (keep[b] ⊙ ReLU((P[q] + R[b]) · inv[q, b] + c)), fused for CPU speed.

    The (queries × batch × hidden) tensor is the only large one in the pooled decoder, and autograd
    would keep and re-read several copies of it (sum, scaled sum, activation, mask). This keeps one
    (the masked activation h) and derives what the backward pass needs from it and from the small
    output: where h > 0 the unit was kept and active, so dL/dpre = scale · dL/dh there and 0
    elsewhere, and Σ_h dL/dpre · pre = Σ_k dL/dout · out (see backward). Checked against autograd by
    gradcheck in the tests.
    P: (Q, H), R: (B, H), inv: (Q, B), c: (H,), V: (Q, k, H), keep: (1, B, H) of {0, scale} or None.
    """

    @staticmethod
    def forward(ctx, p_q, r_b, inv, c, v, keep, scale: float):
        h = p_q[:, None, :] + r_b[None, :, :]
        torch.addcmul(c, h, inv[:, :, None], out=h)
        h.clamp_min_(0.0)
        if keep is not None:
            h.mul_(keep)
        out = torch.bmm(h, v.transpose(1, 2))
        ctx.save_for_backward(h, inv, c, v, out)
        ctx.scale = scale
        return out

    @staticmethod
    def backward(ctx, g_out):
        h, inv, c, v, out = ctx.saved_tensors
        g_out = g_out.contiguous()
        q, b, hid = h.shape
        g_v = torch.bmm(g_out.transpose(1, 2), h)
        # Σ_h dL/dpre · pre = Σ_h dL/dh · h = Σ_k dL/dout · out: no pass over the big tensor needed.
        g_dot_pre = (g_out * out).sum(-1)  # (Q, B)
        # g := dL/d(P + R) = inv · scale · [h > 0] · dL/dh, built in the reused workspace.
        g = _backward_workspace(h.shape, h.dtype)
        weight = g_out * (inv * ctx.scale)[:, :, None]  # (Q, B, k)
        if v.shape[1] == 1:
            torch.mul(weight, v, out=g)  # an outer product per query: a broadcast multiply, not a matmul
        else:
            torch.bmm(weight, v, out=g)
        torch.ops.aten.threshold_backward.grad_input(g, h, 0.0, grad_input=g)
        flat = g.view(q * b, hid)
        inv_flat = inv.reshape(q * b)
        # pre = (P + R) · inv + c, so dL/dpre = g / inv:
        g_c = (1.0 / inv_flat) @ flat  # Σ_{q,b} dL/dpre
        g_dot_c = (flat @ c).view(q, b) / inv  # Σ_h dL/dpre · c
        # Σ_h dL/dpre · (P + R) = (Σ_h dL/dpre · pre − Σ_h dL/dpre · c) / inv
        g_inv = (g_dot_pre - g_dot_c) / inv
        return g.sum(1), g.sum(0), g_inv, g_c, g_v, None, None


def _dropout_mask(shape: Sequence[int], p: float, dtype: torch.dtype) -> torch.Tensor:
    """Inverted-dropout mask of {0, 1/(1-p)}; uniform-and-compare is ~2.5× faster than bernoulli_ on CPU."""
    return (torch.rand(tuple(shape)) >= p).to(dtype).mul_(1.0 / (1.0 - p))


class DecoderLayer(nn.Module):
    """One ML-Decoder layer: (self-attention), cross-attention to memory, MLP."""

    def __init__(self, cfg: DecoderConfig):
        super().__init__()
        w = cfg.width
        self.self_attn = (nn.MultiheadAttention(w, cfg.num_heads, batch_first=True)
                          if cfg.self_attention else None)
        self.norm0 = nn.LayerNorm(w) if cfg.self_attention else None
        if cfg.memory == "pooled":
            # Cross-attention over one memory token = an affine map of that token (see module doc).
            self.value = nn.Linear(cfg.embed_dim, w)
            self.cross_attn = None
        else:
            self.value = None
            self.cross_attn = nn.MultiheadAttention(w, cfg.num_heads, batch_first=True)
        self.norm1 = nn.LayerNorm(w)
        self.mlp1 = nn.Linear(w, cfg.mlp_hidden)
        self.mlp2 = nn.Linear(cfg.mlp_hidden, w)
        self.dropout = nn.Dropout(cfg.dropout)

    def hidden_dropout(self, h: torch.Tensor, query_dim: int) -> torch.Tensor:
        """Dropout on the MLP's hidden units with one mask per poster, shared by all its queries.

        Each (poster, genre) pair sees ordinary dropout at rate p; only the masks of one poster's
        genres are the same. Drawing one mask per pair instead costs as much as the rest of a
        training step on CPU (25× more random numbers than per poster).
        """
        p = self.dropout.p
        if not self.training or p == 0.0:
            return h
        shape = list(h.shape)
        shape[query_dim] = 1
        return h * _dropout_mask(shape, p, h.dtype)

    def output_dropout(self, t: torch.Tensor) -> torch.Tensor:
        """Dropout on an attention output (the layer's `dropout`, with the faster mask)."""
        p = self.dropout.p
        if not self.training or p == 0.0:
            return t
        return t * _dropout_mask(t.shape, p, t.dtype)

    def attend_self(self, t: torch.Tensor) -> torch.Tensor:
        if self.self_attn is None:
            return t
        out, _ = self.self_attn(t, t, t, need_weights=False)
        return self.norm0(t + self.output_dropout(out))

    def forward(self, t: torch.Tensor, x: torch.Tensor, memory: torch.Tensor | None) -> torch.Tensor:
        """t: (B, Q, W) query tokens; x: (B, D) standardised embedding (pooled) or memory (B, T, W)."""
        t = self.attend_self(t)
        if self.cross_attn is None:
            attended = self.output_dropout(self.value(x))[:, None, :]  # one vector for every query
        else:
            out, _ = self.cross_attn(t, memory, memory, need_weights=False)
            attended = self.output_dropout(out)
        t = self.norm1(t + attended)
        return t + self.mlp2(self.hidden_dropout(F.relu(self.mlp1(t)), query_dim=1))


class MLDecoder(nn.Module):
    """ML-Decoder with CLIP text embeddings of genre prompts as its queries.

    forward(x) → logits (B, G); x is (B, D) pooled embeddings or (B, T, D) token sequences
    (T = 1 allowed in either mode).
    """

    def __init__(self, cfg: DecoderConfig, genre_text: torch.Tensor | np.ndarray | None = None):
        super().__init__()
        cfg.validate()
        self.cfg = cfg
        text = torch.zeros(cfg.num_genres, cfg.text_dim) if genre_text is None else torch.as_tensor(
            np.asarray(genre_text, dtype=np.float32))
        if tuple(text.shape) != (cfg.num_genres, cfg.text_dim):
            raise ClipposterError(f"genre text embeddings have shape {tuple(text.shape)}, expected "
                                  f"({cfg.num_genres}, {cfg.text_dim})")
        self.register_buffer("genre_text", text.clone())
        q = _group_queries(text, cfg.num_groups)
        center = q.mean(0) if q.shape[0] > 1 else torch.zeros_like(q[0])
        spread = (q - center).norm(dim=-1).mean() if q.shape[0] > 1 else torch.tensor(1.0)
        # Prompt embeddings share a large "movie poster" component; centring keeps what tells genres
        # apart, and the scale makes the centred queries unit-sized on average.
        self.register_buffer("query_center", center.clone())
        self.register_buffer("query_scale", 1.0 / torch.clamp(torch.as_tensor(spread, dtype=torch.float32), min=1e-6))
        self.register_buffer("input_mean", torch.zeros(cfg.embed_dim))
        self.register_buffer("input_std", torch.ones(cfg.embed_dim))
        self.query_proj = nn.Linear(cfg.text_dim, cfg.width)
        self.memory_proj = nn.Linear(cfg.embed_dim, cfg.width) if cfg.memory == "tokens" else None
        self.layers = nn.ModuleList(DecoderLayer(cfg) for _ in range(cfg.num_layers))
        k = cfg.genres_per_group
        self.group_weight = nn.Parameter(torch.randn(cfg.num_groups, k, cfg.width) / math.sqrt(cfg.width))
        self.group_bias = nn.Parameter(torch.zeros(cfg.num_groups * k))
        # Set by tests and the bench to check the factorised pooled path against the plain one.
        self.force_general = False

    # ----- setup from data -----------------------------------------------------------------------
    def set_input_stats(self, embeddings: np.ndarray) -> None:
        """Standardise memory with training statistics: CLIP embeddings share a large common direction
        (mean cosine ~0.5 between posters), which otherwise slows Adam at lr 1e-4."""
        x = np.asarray(embeddings).reshape(-1, self.cfg.embed_dim)  # token sequences: every token counts
        if x.shape[0] == 0:
            return
        # Sums in float64, in chunks: token sequences of 35K posters are ~1.8 GB as float16.
        total, squares = np.zeros(x.shape[1]), np.zeros(x.shape[1])
        for start in range(0, x.shape[0], 65_536):
            chunk = x[start:start + 65_536].astype(np.float64)
            total += chunk.sum(0)
        mean = total / x.shape[0]
        for start in range(0, x.shape[0], 65_536):
            chunk = x[start:start + 65_536].astype(np.float64) - mean
            squares += (chunk * chunk).sum(0)
        std = np.sqrt(squares / x.shape[0])
        self.input_mean.copy_(torch.from_numpy(mean).float())
        self.input_std.copy_(torch.from_numpy(np.clip(std, 1e-6, None)).float())

    def set_prior(self, frequency: np.ndarray) -> None:
        """Start each genre's bias at the logit of its training frequency, so the first epochs learn
        what distinguishes posters rather than how common each genre is."""
        p = np.clip(np.asarray(frequency, dtype=np.float64), 1e-4, 1 - 1e-4)
        with torch.no_grad():
            self.group_bias.zero_()
            self.group_bias[:len(p)] = torch.from_numpy(np.log(p / (1 - p))).float()

    # ----- forward -------------------------------------------------------------------------------
    def queries(self) -> torch.Tensor:
        q = _group_queries(self.genre_text, self.cfg.num_groups)
        return self.query_proj((q - self.query_center) * self.query_scale)  # (Q, W)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        cfg = self.cfg
        if x.dim() == 3 and cfg.memory == "pooled":
            if x.shape[1] != 1:
                raise ClipposterError(f"this head was trained on pooled embeddings and cannot read token "
                                      f"sequences of length {x.shape[1]}")
            x = x[:, 0]
        if x.shape[-1] != cfg.embed_dim:
            raise ClipposterError(f"embeddings of width {x.shape[-1]} given to a head of width {cfg.embed_dim}")
        x = (x.float() - self.input_mean) / self.input_std
        if cfg.memory == "pooled" and cfg.num_layers == 1 and not self.force_general:
            logits = self._pooled_logits(x)
        else:
            logits = self._general_logits(x)
        return logits[:, :cfg.num_genres]

    def _general_logits(self, x: torch.Tensor) -> torch.Tensor:
        cfg = self.cfg
        memory = None
        if cfg.memory == "tokens":
            if x.dim() == 2:
                x = x[:, None, :]  # a pooled embedding is a one-token sequence
            memory = self.memory_proj(x)
        t = self.queries()[None].expand(x.shape[0], -1, -1)
        for layer in self.layers:
            t = layer(t, x, memory)
        # Group decoding: query q produces k logits through its own (k, W) matrix.
        logits = torch.einsum("bqw,qkw->bqk", t, self.group_weight)
        return logits.reshape(x.shape[0], -1) + self.group_bias

    def _pooled_logits(self, x: torch.Tensor) -> torch.Tensor:
        """The one-layer pooled decoder, computed without materialising (B, Q, W) tensors.

        Every query token is LayerNorm(t_q + a_b) with a_b the attended vector of poster b. Writing
        LN(t + a) = (t̃ + ã)/σ ⊙ γ + β (t̃, ã centred; σ² = (|t̃|² + 2 t̃·ã + |ã|²)/W + eps) turns
        the MLP's first matrix into two small products, W1(γ⊙t̃_q) and W1(γ⊙ã_b), and because the
        classifier w is linear in the MLP output, w·W2·h = (W2ᵀw)·h folds W2 into the classifier.
        The work per (poster, genre) pair drops from ~2·W·H multiply-adds to ~H. Exact: the tests
        check it against `_general_logits`.
        """
        cfg = self.cfg
        layer = self.layers[0]
        b, w = x.shape[0], cfg.width
        t = layer.attend_self(self.queries()[None])[0]  # (Q, W); input-independent, so once per batch
        a = layer.output_dropout(layer.value(x))  # (B, W)
        tc = t - t.mean(-1, keepdim=True)
        ac = a - a.mean(-1, keepdim=True)
        var = ((tc * tc).sum(-1)[None, :] + 2.0 * (ac @ tc.T) + (ac * ac).sum(-1)[:, None]) / w
        inv = torch.rsqrt(var.clamp(min=0.0) + layer.norm1.eps)  # (B, Q); clamp: rounding below 0
        gamma, beta = layer.norm1.weight, layer.norm1.bias
        w1 = layer.mlp1.weight  # (H, W)
        p_q = (tc * gamma) @ w1.T  # (Q, H)
        r_b = (ac * gamma) @ w1.T  # (B, H)
        c = w1 @ beta + layer.mlp1.bias  # (H,)
        gw = self.group_weight  # (Q, k, W)
        q, k = gw.shape[0], gw.shape[1]
        v = gw @ layer.mlp2.weight  # (Q, k, H): W2ᵀ w for every output
        p = layer.dropout.p
        keep = None
        if self.training and p > 0:
            # One mask per poster, shared by its queries (as `hidden_dropout`).
            keep = _dropout_mask((1, b, p_q.shape[1]), p, x.dtype)
        # (Q, B, H) layout inside, so that the per-query classifier is one batched matmul.
        hv = _HiddenReadout.apply(p_q, r_b, inv.T.contiguous(), c, v, keep,
                                  1.0 / (1.0 - p) if keep is not None else 1.0).permute(1, 0, 2)  # (B, Q, k)
        gwg = gw * gamma  # (Q, k, W)
        z_t = (gwg * tc[:, None, :]).sum(-1)  # (Q, k)
        z_a = (ac @ gwg.reshape(q * k, w).T).view(b, q, k)  # (B, Q, k)
        const = gw @ (beta + layer.mlp2.bias)  # (Q, k): w·β + w·b2
        logits = (z_t[None] + z_a) * inv[:, :, None] + hv + const[None]
        return logits.reshape(b, q * k) + self.group_bias



class ZeroShotClassifier(nn.Module):
    """logits = scale · cos(poster, genre prompt); the head applies a softmax over genres."""

    def __init__(self, genre_text: np.ndarray | torch.Tensor | None, logit_scale: float = CLIP_LOGIT_SCALE):
        super().__init__()
        text = torch.as_tensor(np.asarray(genre_text, dtype=np.float32))
        self.register_buffer("genre_text", F.normalize(text, dim=-1))
        self.logit_scale = float(logit_scale)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() == 3:
            x = x.mean(1)
        return self.logit_scale * F.normalize(x.float(), dim=-1) @ self.genre_text.T


class LinearProbe(nn.Module):
    """logits = ((x - mean) / scale) · Wᵀ + b, with W, b from per-genre logistic regressions."""

    def __init__(self, embed_dim: int, num_genres: int):
        super().__init__()
        self.register_buffer("mean", torch.zeros(embed_dim))
        self.register_buffer("scale", torch.ones(embed_dim))
        self.register_buffer("weight", torch.zeros(num_genres, embed_dim))
        self.register_buffer("bias", torch.zeros(num_genres))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() == 3:
            x = x.mean(1)
        return ((x.float() - self.mean) / self.scale) @ self.weight.T + self.bias


def build_module(kind: str, config: Mapping, genre_text: np.ndarray | None) -> nn.Module:
    """The torch module of a head of `kind`, with the shapes in `config` (weights not loaded)."""
    if kind == "ml-decoder":
        return MLDecoder(DecoderConfig.from_dict(config), genre_text)
    if kind == "linear-probe":
        return LinearProbe(int(config["embed_dim"]), int(config["num_genres"]))
    if kind == "zero-shot":
        return ZeroShotClassifier(genre_text, float(config.get("logit_scale", CLIP_LOGIT_SCALE)))
    raise ConfigError("kind", f"must be one of {', '.join(KINDS)}, got {kind!r}")
