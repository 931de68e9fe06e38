"""GPT-2 decoder over EHR tokens (nanoGPT style) and a preallocated KV cache for generation.

`GPT` is the EHR-only model. `mmehr.model.fusion.MultimodalGPT` subclasses it and adds gated
cross-attention to compressed modality events before chosen layers, through two hooks that are the
identity here: `cross_context` (built once per call) and `cross` (applied before each block).

Shapes: B batch, T tokens, D = n_embd, nh = n_head, hs = D // nh, V = vocab_size, L cache length.
Times are int64 microseconds since the epoch; the decoder itself never reads them.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor


@dataclass
class ModalityConfig:
    """One enabled modality: its frozen encoder's width and how each of its events is compressed.

    compression: `none` keeps all N encoder tokens (projected to D), `mean` pools them into one token,
    `latent` resamples them into `n_latents` (k) tokens with `n_latent_layers` (l) Perceiver layers.
    """

    d_enc: int
    compression: Literal["none", "mean", "latent"] = "latent"
    n_latents: int = 8
    n_latent_layers: int = 4


@dataclass
class ModelConfig:
    """Decoder size plus the multimodal fields (all unused when `modalities` is empty: EHR-only).

    xattn_every: a gated cross-attention block sits before decoder layer i when (i + 1) % xattn_every == 0
    (default 2: layers 1, 3, 5 of 6; a block costs about as much as a decoder layer, see bench_model).
    xattn_ff_mult: width multiplier of the cross-attention block's own (gated) feed-forward.
    gate: `sigmoid` (the paper: g = sigmoid(beta), beta starts at `gate_init`, default -4 so g = 0.018,
    near but not exactly the identity) or `tanh` (Flamingo: g = tanh(alpha), alpha starts at 0, an exact
    identity at init; `gate_init` is ignored). Each block has two gates: attention and feed-forward.
    gate_lr_scale: learning-rate multiplier for the gate scalars (`param_groups`): with Adam a scalar moves
    about lr per step, so at lr 6e-4 a sigmoid gate needs thousands of steps to open without it.
    modality_dropout: at train time, drop each available modality event with this probability.
    modality_embedding: add a learned per-modality vector to that modality's compressed tokens.
    time_bias: add a learned per-head cross-attention bias on log-spaced buckets of the event's age
    (t_i - s_j, in hours) at each query token; zero at init.
    """

    vocab_size: int = 4096
    n_layer: int = 6
    n_head: int = 12
    n_embd: int = 768
    block_size: int = 2048
    dropout: float = 0.0
    bias: bool = True
    modalities: dict[str, ModalityConfig] = field(default_factory=dict)
    xattn_every: int = 2
    gate: Literal["sigmoid", "tanh"] = "sigmoid"
    gate_init: float = -4.0
    gate_lr_scale: float = 30.0
    xattn_ff_mult: int = 4
    modality_dropout: float = 0.0
    modality_embedding: bool = True
    time_bias: bool = False

    def __post_init__(self) -> None:
        if self.n_embd % self.n_head:
            raise ValueError(f"n_embd ({self.n_embd}) must be divisible by n_head ({self.n_head})")
        for name in (
            "vocab_size",
            "n_layer",
            "n_head",
            "n_embd",
            "block_size",
            "xattn_every",
            "xattn_ff_mult",
        ):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.gate not in ("sigmoid", "tanh"):
            raise ValueError(f"gate must be 'sigmoid' or 'tanh', got {self.gate!r}")
        if not 0.0 <= self.modality_dropout <= 1.0 or not 0.0 <= self.dropout < 1.0:
            raise ValueError("dropout must be in [0, 1) and modality_dropout in [0, 1]")
        for name, m in self.modalities.items():
            if isinstance(m, dict):  # built in code from plain mappings
                m = self.modalities[name] = ModalityConfig(**m)
            if m.compression not in ("none", "mean", "latent"):
                raise ValueError(
                    f"modality {name}: compression must be none|mean|latent, got {m.compression!r}"
                )
            if m.d_enc < 1 or m.n_latents < 1 or m.n_latent_layers < 1:
                raise ValueError(f"modality {name}: d_enc, n_latents and n_latent_layers must be >= 1")
        if self.modalities and not self.xattn_layers:
            raise ValueError(
                f"xattn_every={self.xattn_every} > n_layer={self.n_layer}: no cross-attention block would "
                "read the modalities"
            )

    @property
    def xattn_layers(self) -> list[int]:
        """Decoder layers preceded by a gated cross-attention block (none without modalities)."""
        if not self.modalities:
            return []
        return [i for i in range(self.n_layer) if (i + 1) % self.xattn_every == 0]


class CausalSelfAttention(nn.Module):
    """Multi-head causal self-attention; with a `KVCache` it attends to the cached keys too."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.c_attn = nn.Linear(config.n_embd, 3 * config.n_embd, bias=config.bias)
        self.c_proj = nn.Linear(config.n_embd, config.n_embd, bias=config.bias)
        self.resid_dropout = nn.Dropout(config.dropout)
        self.n_head = config.n_head
        self.dropout = config.dropout

    def forward(self, x: Tensor, cache: KVCache | None = None, layer: int = 0) -> Tensor:
        B, T, C = x.shape
        q, k, v = self.c_attn(x).split(C, dim=2)
        q, k, v = (
            t.view(B, T, self.n_head, C // self.n_head).transpose(1, 2) for t in (q, k, v)
        )  # (B, nh, T, hs)
        if cache is None:
            p = self.dropout if self.training else 0.0
            y = F.scaled_dot_product_attention(q, k, v, is_causal=True, dropout_p=p)
        else:
            k, v, mask = cache.update(layer, k, v)  # (B, nh, span, hs), (B, 1, T, span)
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        y = y.transpose(1, 2).contiguous().view(B, T, C)  # (B, T, D)
        return self.resid_dropout(self.c_proj(y))


class MLP(nn.Module):
    def __init__(self, n_embd: int, mult: int, bias: bool, dropout: float):
        super().__init__()
        self.c_fc = nn.Linear(n_embd, mult * n_embd, bias=bias)
        self.gelu = nn.GELU()
        self.c_proj = nn.Linear(mult * n_embd, n_embd, bias=bias)
        self.dropout = nn.Dropout(dropout)

    def forward(self, x: Tensor) -> Tensor:
        return self.dropout(self.c_proj(self.gelu(self.c_fc(x))))


class Block(nn.Module):
    """Pre-LN transformer block: x + attn(LN(x)), then x + mlp(LN(x))."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.ln_1 = nn.LayerNorm(config.n_embd, bias=config.bias)
        self.attn = CausalSelfAttention(config)
        self.ln_2 = nn.LayerNorm(config.n_embd, bias=config.bias)
        self.mlp = MLP(config.n_embd, 4, config.bias, config.dropout)

    def forward(self, x: Tensor, cache: KVCache | None = None, layer: int = 0) -> Tensor:
        x = x + self.attn(self.ln_1(x), cache, layer)
        return x + self.mlp(self.ln_2(x))


class KVCache:
    """Preallocated keys/values of every layer for batched incremental decoding (never grows).

    k, v: (n_layer, B, nh, L, hs). Each row b holds `lengths[b]` tokens (rows may differ: right-padded
    prefill), and its next tokens go to positions lengths[b], lengths[b] + 1, ... The held tokens and
    times (B, L) are kept so that a sliding window can be re-prefilled at the context limit; the first
    `prefix[b]` tokens of a row (its static context) survive every slide. `media` holds per-row tensors
    computed once per sequence (the multimodal model's cross-attention keys/values and masks).
    """

    def __init__(
        self,
        config: ModelConfig,
        batch_size: int,
        *,
        max_len: int | None = None,
        device: torch.device | str | None = None,
        dtype: torch.dtype = torch.float32,
    ):
        L = max_len or config.block_size
        if config.block_size < L:
            raise ValueError(f"max_len {L} exceeds the model's block_size {config.block_size}")
        hs = config.n_embd // config.n_head
        shape = (config.n_layer, batch_size, config.n_head, L, hs)
        self.k = torch.zeros(shape, device=device, dtype=dtype)
        self.v = torch.zeros(shape, device=device, dtype=dtype)
        self.tokens = torch.zeros(batch_size, L, dtype=torch.long, device=device)
        self.times = torch.zeros(batch_size, L, dtype=torch.long, device=device)
        self.lengths = torch.zeros(batch_size, dtype=torch.long, device=device)
        self.prefix = torch.zeros(batch_size, dtype=torch.long, device=device)
        self.media: dict[str, Tensor] = {}
        self.span = 0  # max(lengths), kept on the host to avoid a device sync per layer
        self._pos: Tensor | None = None
        self._mask: Tensor | None = None

    @property
    def batch_size(self) -> int:
        return self.k.shape[1]

    @property
    def max_len(self) -> int:
        return self.k.shape[3]

    def fits(self, t: int) -> bool:
        """Whether every row can take t more tokens without a slide."""
        return self.span + t <= self.max_len

    def reset(self) -> None:
        """Forget every row's tokens (keys/values are overwritten, not freed); media is kept."""
        self.lengths.zero_()
        self.prefix.zero_()
        self.span = 0

    def keep(self, rows: Tensor) -> None:
        """Keep only `rows` (bool (B,) mask or index (B',)): retire finished rollouts.

        An index may repeat rows, which fans one prefilled context out into several rollouts.
        """
        if rows.dtype == torch.bool:
            rows = rows.nonzero().squeeze(1)
        rows = rows.to(self.lengths.device)
        self.k, self.v = self.k[:, rows], self.v[:, rows]
        self.tokens, self.times = self.tokens[rows], self.times[rows]
        self.lengths, self.prefix = self.lengths[rows], self.prefix[rows]
        self.media = {name: t[rows] for name, t in self.media.items()}
        self.span = int(self.lengths.max()) if len(rows) else 0

    # The three calls below make one step; the model calls them (begin, update per layer, end).
    def begin(self, t: int) -> Tensor:
        """Positions (B, t) of the next t tokens of every row; builds the step's attention mask."""
        if not self.fits(t):
            raise ValueError(f"KV cache full: {self.span} + {t} tokens > max_len {self.max_len}; slide first")
        pos = self.lengths[:, None] + torch.arange(t, device=self.lengths.device)  # (B, t)
        span = self.span + t
        keys = torch.arange(span, device=pos.device)
        self._pos = pos
        self._mask = (keys[None, None, :] <= pos[:, :, None]).unsqueeze(1)  # (B, 1, t, span)
        return pos

    def update(self, layer: int, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """Write this step's k, v (B, nh, t, hs) of `layer`; return all keys/values so far and the mask."""
        idx = self._pos[:, None, :, None].expand(-1, k.shape[1], -1, k.shape[3])
        self.k[layer].scatter_(2, idx, k.to(self.k.dtype))
        self.v[layer].scatter_(2, idx, v.to(self.v.dtype))
        span = self._mask.shape[-1]
        return self.k[layer, :, :, :span].to(k.dtype), self.v[layer, :, :, :span].to(v.dtype), self._mask

    def end(self, tokens: Tensor, times: Tensor) -> None:
        """Record the step's tokens and times (B, t) and advance every row."""
        self.tokens.scatter_(1, self._pos, tokens)
        self.times.scatter_(1, self._pos, times)
        self.lengths += tokens.shape[1]
        self.span += tokens.shape[1]
        self._pos = self._mask = None

    def window(self, keep: int) -> tuple[Tensor, Tensor, Tensor]:
        """Each row's prefix plus its most recent tokens, at most `keep` in all: (tokens, times) (B, keep)
        right-padded, and the new lengths (B,). This is what a sliding window re-prefills."""
        if self.batch_size and keep <= int(self.prefix.max()):
            raise ValueError(f"cannot slide: the static prefix fills the whole kept window ({keep} tokens)")
        j = torch.arange(keep, device=self.lengths.device)[None, :]  # (1, keep)
        n, p = self.lengths[:, None], self.prefix[:, None]
        shift = (n - keep).clamp(min=0)  # tokens dropped after the prefix
        idx = torch.where(j < p, j, j + shift).clamp(max=self.max_len - 1)
        return self.tokens.gather(1, idx), self.times.gather(1, idx), self.lengths.clamp(max=keep)


def next_token_loss(logits: Tensor, targets: Tensor, loss_mask: Tensor | None = None) -> Tensor:
    """Mean next-token cross-entropy over positions where loss_mask (B, T) is True.

    logits (B, T, V); targets (B, T) hold the token that follows each position. Targets at masked
    positions are never read (they may be padding or anything else). No counted position -> 0.
    """
    if loss_mask is None:
        loss_mask = torch.ones_like(targets, dtype=torch.bool)
    targets = targets.masked_fill(~loss_mask, -100)
    ce = F.cross_entropy(logits.flatten(0, 1).float(), targets.flatten(), ignore_index=-100, reduction="sum")
    return ce / loss_mask.sum().clamp(min=1)


class GPT(nn.Module):
    """The EHR-only decoder: token + learned position embeddings, pre-LN blocks, tied LM head."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.config = config
        self.transformer = nn.ModuleDict(
            dict(
                wte=nn.Embedding(config.vocab_size, config.n_embd),
                wpe=nn.Embedding(config.block_size, config.n_embd),
                drop=nn.Dropout(config.dropout),
                h=nn.ModuleList([Block(config) for _ in range(config.n_layer)]),
                ln_f=nn.LayerNorm(config.n_embd, bias=config.bias),
            )
        )
        self.lm_head = nn.Linear(config.n_embd, config.vocab_size, bias=False)
        self.transformer.wte.weight = self.lm_head.weight  # weight tying
        self.apply(self._init_weights)
        self._scale_residual_projections(self)

    def _init_weights(self, module: nn.Module) -> None:
        if isinstance(module, nn.Linear):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)

    def _scale_residual_projections(self, root: nn.Module) -> None:
        # GPT-2: projections into the residual stream get std 0.02 / sqrt(2 * n_layer).
        for name, p in root.named_parameters():
            if name.endswith("c_proj.weight"):
                nn.init.normal_(p, mean=0.0, std=0.02 / math.sqrt(2 * self.config.n_layer))

    def num_parameters(self, non_embedding: bool = True) -> int:
        """Parameter count; position embeddings excluded by default (token embeddings are tied to the head)."""
        n = sum(p.numel() for p in self.parameters())
        return n - self.transformer.wpe.weight.numel() if non_embedding else n

    # -- the multimodal hooks (identity in the EHR-only model) --
    def cross_context(self, times: Tensor | None, cache: KVCache | None = None, media: Any = None) -> Any:
        """Per-call state for `cross` (the multimodal model's visibility mask and media)."""
        return None

    def cross(self, layer: int, x: Tensor, ctx: Any) -> Tensor:
        """Update of the residual stream x (B, T, D) before decoder layer `layer`."""
        return x

    def hidden(self, tokens: Tensor, pos: Tensor, *, cache: KVCache | None = None, ctx: Any = None) -> Tensor:
        """(B, T) tokens at positions pos ((T,) or (B, T)) -> final hidden states (B, T, D)."""
        x = self.transformer.drop(self.transformer.wte(tokens) + self.transformer.wpe(pos))  # (B, T, D)
        for i, block in enumerate(self.transformer.h):
            x = self.cross(i, x, ctx)
            x = block(x, cache, i)
        return self.transformer.ln_f(x)

    def _forward(self, tokens: Tensor, ctx: Any, targets: Tensor | None, loss_mask: Tensor | None):
        T = tokens.shape[1]
        if self.config.block_size < T:
            raise ValueError(f"sequence of {T} tokens exceeds block_size {self.config.block_size}")
        x = self.hidden(tokens, torch.arange(T, device=tokens.device), ctx=ctx)
        logits = self.lm_head(x)  # (B, T, V)
        loss = None if targets is None else next_token_loss(logits, targets, loss_mask)
        return logits, loss

    def forward(
        self,
        tokens: Tensor,
        times: Tensor | None = None,
        *,
        targets: Tensor | None = None,
        loss_mask: Tensor | None = None,
    ) -> tuple[Tensor, Tensor | None]:
        """tokens (B, T) -> (logits (B, T, V), loss or None); see `next_token_loss` for the loss."""
        return self._forward(tokens, None, targets, loss_mask)

    # -- generation --
    def new_cache(
        self, batch_size: int, max_len: int | None = None, dtype: torch.dtype | None = None
    ) -> KVCache:
        """An empty cache on the model's device; pass dtype=torch.bfloat16 when decoding under bf16 autocast."""
        p = self.lm_head.weight
        return KVCache(self.config, batch_size, max_len=max_len, device=p.device, dtype=dtype or p.dtype)

    def _step(self, tokens: Tensor, times: Tensor | None, cache: KVCache) -> Tensor:
        """Run t new tokens per row through the cache; returns hidden states (B, t, D)."""
        if tokens.shape[0] != cache.batch_size:
            raise ValueError(f"batch of {tokens.shape[0]} rows but the cache holds {cache.batch_size}")
        ctx = self.cross_context(times, cache=cache)
        pos = cache.begin(tokens.shape[1])
        x = self.hidden(tokens, pos, cache=cache, ctx=ctx)
        cache.end(tokens, torch.zeros_like(tokens) if times is None else times)
        return x

    def _prefill(self, tokens: Tensor, times: Tensor | None, cache: KVCache, lengths, prefix) -> Tensor:
        B, T = tokens.shape
        cache.reset()
        x = self._step(tokens, times, cache)  # (B, T, D)
        if lengths is not None:
            lengths = torch.as_tensor(lengths, device=tokens.device)
            if int(lengths.min()) < 1 or int(lengths.max()) > T:
                raise ValueError(f"prefill lengths must be in [1, {T}]")
            cache.lengths.copy_(lengths)
            cache.span = int(lengths.max())
        if prefix is not None:
            cache.prefix.copy_(torch.as_tensor(prefix, device=tokens.device).expand(B))
        last = cache.lengths - 1  # (B,)
        return self.lm_head(x[torch.arange(B, device=x.device), last])  # (B, V)

    def prefill(
        self,
        tokens: Tensor,
        times: Tensor | None,
        cache: KVCache,
        *,
        lengths: Tensor | None = None,
        prefix: int | Tensor | None = None,
    ) -> Tensor:
        """Reset `cache` and fill it with a (B, T) context, right-padded, row b holding lengths[b] tokens
        (default T). `prefix` (int or (B,)) tokens at the start of each row survive sliding-window
        re-prefills (the static context). Returns the logits after each row's last token: (B, V)."""
        return self._prefill(tokens, times, cache, lengths, prefix)

    def decode(self, tokens: Tensor, times: Tensor | None, cache: KVCache) -> Tensor:
        """Append t tokens (B, t) (times (B, t) µs) to every row; returns their logits (B, t, V).

        At the context limit the cache slides: each row keeps its prefix and its most recent tokens
        (3/4 of the cache), re-prefilled at positions from 0, as a full recomputation on that window would.
        """
        t = tokens.shape[1]
        if not cache.fits(t):
            keep = min(cache.max_len * 3 // 4, cache.max_len - t)
            w_tokens, w_times, w_lengths = cache.window(keep)
            self._prefill(w_tokens, w_times, cache, w_lengths, cache.prefix.clone())
        return self.lm_head(self._step(tokens, times, cache))

    def estimate_flops(self, T: int) -> dict[str, float]:
        """Forward matmul FLOPs of one sequence of T tokens, as `torch.utils.flop_counter` counts them
        (attention computed densely over T x T)."""
        c = self.config
        D = c.n_embd
        per_layer = 24 * T * D * D + 4 * T * T * D
        return {"decoder": float(c.n_layer * per_layer + 2 * T * D * c.vocab_size)}

    def estimate_flops_per_token(self, T: int | None = None, **kwargs: Any) -> float:
        """Training (forward + backward = 3 x forward) model FLOPs per token at context T (default
        block_size): multiply by tokens/s and divide by the hardware's peak FLOP/s for MFU."""
        T = T or self.config.block_size
        return 3.0 * sum(self.estimate_flops(T, **kwargs).values()) / T
