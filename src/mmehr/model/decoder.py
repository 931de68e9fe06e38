"""The GPT-2 decoder's building blocks (nanoGPT style) and a preallocated KV cache for generation.

`mmehr.model.gpt.GPT` stacks these blocks; the multimodal additions (`mmehr.model.fusion`) sit beside
them, before chosen layers. Shapes: B batch, T tokens, D = n_embd, nh = n_head, hs = D // nh,
V = vocab_size, L cache length. Times are int64 µs since the epoch; the decoder itself never reads them.
"""

from __future__ import annotations

import math
from typing import Protocol

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

from mmehr.model.config import DecoderConfig


class RowState(Protocol):
    """Per-row state a cache carries beside its keys/values (e.g. the fusion's MediaCache)."""

    def select(self, rows: Tensor) -> RowState: ...


def dropout(x: Tensor, p: float, training: bool) -> Tensor:
    """Inverted dropout (F.dropout's function). On a CPU its mask is `rand_like(x) >= p`: uniform draws,
    which torch makes about 3x faster than the bernoulli_ F.dropout uses there (at dropout 0.3 those
    draws were the largest single cost of a CPU training step; README: design choices). For float32 the
    same mask comes from `keep_mask`, about twice as fast."""
    if not training or p == 0.0:
        return x
    if x.device.type != "cpu":
        return F.dropout(x, p, training=True)
    if x.dtype != torch.float32:
        return x * ((torch.rand_like(x) >= p) * (1.0 / (1.0 - p)))
    return x * keep_mask(x.shape, p).to(x.dtype).mul_(1.0 / (1.0 - p))


def keep_mask(shape: torch.Size | tuple[int, ...], p: float) -> Tensor:
    """(shape) bool on the CPU: exactly `torch.rand(shape) >= p` (float32), the default generator left in
    the same state, at about half the cost.

    torch's float32 uniform on a CPU takes one 32-bit draw per element, in order, and keeps its low 24
    bits k (u = k / 2^24, exact); an int32 `random_()` takes the same draws (keeping 31 bits). So
    u >= p (p rounded to float32, as torch compares) iff k >= ceil(float32(p) * 2^24), with no float
    tensor made (tested against rand on many shapes)."""
    threshold = math.ceil(float(torch.tensor(p, dtype=torch.float32)) * 2**24)
    bits = torch.empty(shape, dtype=torch.int32).random_()
    return bits.bitwise_and_(0xFFFFFF) >= threshold


class Dropout(nn.Module):
    """nn.Dropout with `dropout`'s mask."""

    def __init__(self, p: float):
        super().__init__()
        self.p = p

    def forward(self, x: Tensor) -> Tensor:
        return dropout(x, self.p, self.training)

    def extra_repr(self) -> str:
        return f"p={self.p}"


def attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    *,
    attn_mask: Tensor | None = None,
    is_causal: bool = False,
    dropout_p: float = 0.0,
) -> Tensor:
    """F.scaled_dot_product_attention (same arguments), except with dropout on a CPU: no fused kernel takes
    dropout there, so it is computed explicitly, as torch's math path does, with `dropout`'s faster mask
    on the attention probabilities. Every query row must see at least one key (else its softmax is NaN)."""
    if dropout_p == 0.0 or q.device.type != "cpu":
        return F.scaled_dot_product_attention(
            q, k, v, attn_mask=attn_mask, is_causal=is_causal, dropout_p=dropout_p
        )
    scores = (q @ k.transpose(-2, -1)) * (1.0 / math.sqrt(q.shape[-1]))
    if is_causal:
        # + a (T, S) bias of 0 and -inf: the masked_fill's scores, but about 3x cheaper forward, and the
        # backward passes the gradient through instead of filling a copy (softmax's is 0 there already)
        T, S = scores.shape[-2:]
        future = torch.ones(T, S, dtype=torch.bool, device=q.device).triu(1)
        scores = scores + torch.zeros(T, S, dtype=scores.dtype, device=q.device).masked_fill(
            future, float("-inf")
        )
    if attn_mask is not None:
        scores = (
            scores.masked_fill(~attn_mask, float("-inf"))
            if attn_mask.dtype == torch.bool
            else scores + attn_mask
        )
    return dropout(torch.softmax(scores, dim=-1), dropout_p, training=True) @ v


class CausalSelfAttention(nn.Module):
    """Multi-head causal self-attention; with a `KVCache` it attends to the cached keys too."""

    def __init__(self, config: DecoderConfig):
        super().__init__()
        self.c_attn = nn.Linear(config.n_embd, 3 * config.n_embd, bias=config.bias)
        self.c_proj = nn.Linear(config.n_embd, config.n_embd, bias=config.bias)
        self.resid_dropout = Dropout(config.dropout)
        self.n_head = config.n_head
        self.attn_dropout = config.attention_dropout

    def forward(self, x: Tensor, cache: KVCache | None = None, layer: int = 0) -> Tensor:
        B, T, C = x.shape
        q, k, v = self.c_attn(x).split(C, dim=2)
        q, k, v = (
            t.view(B, T, self.n_head, C // self.n_head).transpose(1, 2) for t in (q, k, v)
        )  # (B, nh, T, hs)
        if cache is None:
            y = attention(q, k, v, is_causal=True, dropout_p=self.attn_dropout if self.training else 0.0)
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
        self.dropout = Dropout(dropout)

    def forward(self, x: Tensor) -> Tensor:
        return self.dropout(self.c_proj(self.gelu(self.c_fc(x))))


class Block(nn.Module):
    """Pre-LN transformer block: x + attn(LN(x)), then x + mlp(LN(x))."""

    def __init__(self, config: DecoderConfig):
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
    `prefix[b]` tokens of a row (its static context) survive every slide. `media` holds per-row state
    computed once per sequence (the fusion's `MediaCache`: cross-attention keys/values, event times).
    """

    def __init__(
        self,
        config: DecoderConfig,
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
        self.media: RowState | None = None
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
        self.media = self.media.select(rows) if self.media is not None else None
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
        """What a sliding window re-prefills: see `slide_window`."""
        return slide_window(self.tokens, self.times, self.lengths, self.prefix, keep)


def kept_on_slide(max_len: int, t: int) -> int:
    """Tokens a row keeps when a context of max_len must slide to take t more: 3/4 of the context."""
    return min(max_len * 3 // 4, max_len - t)


def slide_window(
    tokens: Tensor, times: Tensor, lengths: Tensor, prefix: Tensor, keep: int
) -> tuple[Tensor, Tensor, Tensor]:
    """The sliding-window rule: each row keeps its static prefix and its most recent tokens, `keep` in all.

    tokens, times (B, L) held per row (row b holds lengths[b], the first prefix[b] static) -> the kept
    (tokens, times) (B, keep), right-padded, and the new lengths (B,).
    """
    if len(prefix) and keep <= int(prefix.max()):
        raise ValueError(f"cannot slide: the static prefix fills the whole kept window ({keep} tokens)")
    j = torch.arange(keep, device=lengths.device)[None, :]  # (1, keep)
    shift = (lengths[:, None] - keep).clamp(min=0)  # tokens dropped after the prefix
    idx = torch.where(j < prefix[:, None], j, j + shift).clamp(max=tokens.shape[1] - 1)
    return tokens.gather(1, idx), times.gather(1, idx), lengths.clamp(max=keep)


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
