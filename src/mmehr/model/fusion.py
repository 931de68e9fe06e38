"""Gated, time-aligned cross-attention from EHR tokens to compressed modality events: the full model.

`MultimodalGPT` = the EHR-only `GPT` decoder, unchanged, plus per modality a compressor
(`mmehr.model.compression`) and, before every `xattn_every`-th decoder layer, a gated cross-attention block.

Temporal alignment: token i (time t_i) sees media token j (of event e) only if event e is available
(event_mask, and not dropped by modality dropout) and its acquisition time s_e < t_i, STRICTLY (an event
at the same microsecond is invisible). A token with no visible media token gets an exactly zero update
from the whole block: its attention row is never softmaxed into uniform attention (the Flamingo trap),
and never NaN. So with every gate closed, or no visible events, the model computes the EHR-only decoder.

Batch layout (docs/interfaces.md): tokens, times (B, T) int64 µs; modalities: name -> ModalityInputs.
With no modalities configured, `MultimodalGPT` is the EHR-only model (no extra parameters).

    logits, loss = model(tokens, times, modalities, targets, loss_mask)      # training
    media = model.encode_media(modalities)                                    # generation: once
    cache = model.new_cache(B, max_len)
    last = model.prefill(tokens, times, cache, media=media, lengths=lengths, prefix=n_static)  # (B, V)
    cache.keep(rows)                       # fan rows out into rollouts, or retire finished ones
    logits = model.decode(next_tokens, next_times, cache)                    # (B, t, V)
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

from mmehr.model.compression import build_compressor
from mmehr.model.decoder import GPT, MLP, KVCache, ModelConfig


@dataclass
class ModalityInputs:
    """Up to K_m events of one modality per row.

    emb (B, K_m, N, d_enc) float encoder tokens (fp16 from the store is fine; padding must be finite),
    token_mask (B, K_m, N) bool valid encoder tokens, event_time (B, K_m) int64 µs acquisition time,
    event_mask (B, K_m) bool event present (False = padding / absent).
    """

    emb: Tensor
    token_mask: Tensor
    event_time: Tensor
    event_mask: Tensor

    def to(self, device: torch.device | str) -> ModalityInputs:
        return ModalityInputs(
            *(t.to(device) for t in (self.emb, self.token_mask, self.event_time, self.event_mask))
        )


@dataclass
class Media:
    """The compressed tokens of every modality event of a batch, concatenated over modalities.

    tokens (B, M, D); valid (B, M) bool (event present and token real); time (B, M) int64 µs, the
    acquisition time of each token's event. Compute once with `MultimodalGPT.encode_media` and reuse.
    """

    tokens: Tensor
    valid: Tensor
    time: Tensor

    def select(self, rows: Tensor) -> Media:
        """Rows (bool mask or index, repeats allowed: e.g. one row per rollout)."""
        return Media(self.tokens[rows], self.valid[rows], self.time[rows])


def visible_media(times: Tensor, media_time: Tensor, media_valid: Tensor) -> Tensor:
    """(B, T, M) bool: token i (time times[b, i]) may attend media token j iff valid and time[j] < times[i]."""
    return media_valid[:, None, :] & (media_time[:, None, :] < times[:, :, None])


class RelativeTimeBias(nn.Module):
    """Learned per-head additive cross-attention bias on the age of a media token's event at each query.

    Age t_i - s_j in hours falls in bucket floor(2 log2(1 + hours)) (32 buckets; the last holds ages of
    more than ~5 years). Zero at init: no effect until learned. Age never crosses the strict time mask.
    """

    def __init__(self, n_head: int, n_buckets: int = 32):
        super().__init__()
        self.table = nn.Parameter(torch.zeros(n_buckets, n_head))

    def forward(self, times: Tensor, media_time: Tensor) -> Tensor:
        age_h = (times[:, :, None] - media_time[:, None, :]).clamp(min=0).double() / 3.6e9  # (B, T, M)
        bucket = (2 * torch.log2(1 + age_h)).long().clamp(max=self.table.shape[0] - 1)
        return self.table[bucket].permute(0, 3, 1, 2)  # (B, nh, T, M)


class MaskedCrossAttention(nn.Module):
    """Queries LN(x) (B, T, D) attend to media keys/values (B, nh, M, hs) under mask (B, 1|nh, T, M).

    Rows whose has_any (B, T) is False get an exactly zero output, bias of the projection included.
    """

    def __init__(self, config: ModelConfig):
        super().__init__()
        D = config.n_embd
        self.ln = nn.LayerNorm(D, bias=config.bias)
        self.q = nn.Linear(D, D, bias=config.bias)
        self.kv = nn.Linear(D, 2 * D, bias=config.bias)
        self.c_proj = nn.Linear(D, D, bias=config.bias)
        self.resid_dropout = nn.Dropout(config.dropout)
        self.n_head = config.n_head
        self.dropout = config.dropout

    def media_kv(self, media: Tensor) -> tuple[Tensor, Tensor]:
        """media tokens (B, M, D) -> keys, values (B, nh, M, hs); computed once per sequence."""
        B, M, D = media.shape
        k, v = self.kv(media).view(B, M, 2, self.n_head, D // self.n_head).permute(2, 0, 3, 1, 4)
        return k, v

    def forward(self, x: Tensor, kv: tuple[Tensor, Tensor], *, mask: Tensor, has_any: Tensor) -> Tensor:
        B, T, D = x.shape
        q = self.q(self.ln(x)).view(B, T, self.n_head, D // self.n_head).transpose(1, 2)  # (B, nh, T, hs)
        k, v = kv
        mask = mask.to(q.dtype) if mask.is_floating_point() else mask  # additive time bias under autocast
        p = self.dropout if self.training else 0.0
        y = F.scaled_dot_product_attention(q, k.to(q.dtype), v.to(q.dtype), attn_mask=mask, dropout_p=p)
        y = self.resid_dropout(self.c_proj(y.transpose(1, 2).reshape(B, T, D)))
        return torch.where(has_any[..., None], y, 0.0)


class GatedCrossAttentionBlock(nn.Module):
    """x + g_attn * xattn(LN(x), media), then + g_ff * FF(LN(x)); both updates are zero on rows with no
    visible media, so the whole block is the identity there.

    Gates (2,) multiply the whole residual updates: g = sigmoid(beta) with beta starting at
    config.gate_init (-4 -> 0.018), or g = tanh(alpha) with alpha starting at 0 (exact identity).
    """

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.attn = MaskedCrossAttention(config)
        self.ln_ff = nn.LayerNorm(config.n_embd, bias=config.bias)
        self.ff = MLP(config.n_embd, config.xattn_ff_mult, config.bias, config.dropout)
        self.gate_fn = torch.sigmoid if config.gate == "sigmoid" else torch.tanh
        init = config.gate_init if config.gate == "sigmoid" else 0.0
        self.gate = nn.Parameter(torch.full((2,), float(init)))

    def gates(self) -> Tensor:
        """(2,): the attention gate and the feed-forward gate."""
        return self.gate_fn(self.gate)

    def forward(self, x: Tensor, kv: tuple[Tensor, Tensor], *, mask: Tensor, has_any: Tensor) -> Tensor:
        g = self.gates().to(x.dtype)
        x = x + g[0] * self.attn(x, kv, mask=mask, has_any=has_any)
        return x + g[1] * torch.where(has_any[..., None], self.ff(self.ln_ff(x)), 0.0)


@dataclass
class CrossContext:
    """What every cross-attention block of one call shares.

    mask (B, 1|nh, T, M): bool or additive float, never fully masked (rows with no visible media are
    unmasked and then zeroed by has_any (B, T)). Keys/values come from `kv` (cached, per layer) or are
    computed by each block from `media` (B, M, D).
    """

    mask: Tensor
    has_any: Tensor
    media: Tensor | None = None
    kv: dict[int, tuple[Tensor, Tensor]] | None = None


class MultimodalGPT(GPT):
    """GPT decoder + per-modality compression + gated, time-masked cross-attention.

    forward(tokens, times, modalities) trains; encode_media + prefill/decode generate (the media's
    cross-attention keys/values are computed once, at prefill, and kept in the KVCache).
    `unsafe_disable_time_mask` (default False) lets events be seen regardless of time: it exists ONLY for
    the leakage test that shows the time mask is what prevents leakage. Never set it otherwise.
    """

    def __init__(self, config: ModelConfig):
        super().__init__(config)
        D = config.n_embd
        self.compressors = nn.ModuleDict(
            {
                name: build_compressor(m, D, config.n_head, config.bias)
                for name, m in config.modalities.items()
            }
        )
        self.modality_embedding = (
            nn.Embedding(len(config.modalities), D)
            if config.modality_embedding and config.modalities
            else None
        )
        self.xattn = nn.ModuleDict({str(i): GatedCrossAttentionBlock(config) for i in config.xattn_layers})
        self.time_bias = RelativeTimeBias(config.n_head) if config.time_bias and config.modalities else None
        for part in (self.compressors, self.xattn):
            part.apply(self._init_weights)
            self._scale_residual_projections(part)
        if self.modality_embedding is not None:
            self._init_weights(self.modality_embedding)
        self.unsafe_disable_time_mask = False

    # -- media --
    def encode_media(
        self, modalities: dict[str, ModalityInputs] | None, batch_size: int | None = None
    ) -> Media | None:
        """Compress every available event of every enabled modality: -> Media (B, M, D), or None if none.

        Only present events (event_mask and at least one valid token) are compressed. At train time each
        is dropped with probability config.modality_dropout.
        """
        if not modalities:
            return None
        unknown = set(modalities) - set(self.compressors)
        if unknown:
            raise ValueError(
                f"modalities {sorted(unknown)} are not enabled in the model config "
                f"(enabled: {sorted(self.compressors) or 'none'})"
            )
        parts = []
        for index, (name, compressor) in enumerate(self.compressors.items()):
            inp = modalities.get(name)
            if inp is None:
                continue
            self._check_inputs(name, inp, batch_size)
            present = inp.event_mask & inp.token_mask.any(-1)  # (B, K)
            if self.training and self.config.modality_dropout > 0:
                present = present & (
                    torch.rand(present.shape, device=present.device) >= self.config.modality_dropout
                )
            if not bool(present.any()):
                continue
            B, K = present.shape
            out, mask = compressor(inp.emb[present], inp.token_mask[present])  # (E, n, D), (E, n)
            n = out.shape[1]
            tokens = out.new_zeros(B, K, n, out.shape[2]).index_put((present,), out)  # (B, K, n, D)
            valid = mask.new_zeros(B, K, n).index_put((present,), mask)
            if self.modality_embedding is not None:
                tokens = tokens + self.modality_embedding.weight[index].to(tokens.dtype)
            time = inp.event_time[:, :, None].expand(B, K, n)
            parts.append((tokens.flatten(1, 2), valid.flatten(1, 2), time.flatten(1, 2)))
        if not parts:
            return None
        return Media(*(torch.cat(p, dim=1) for p in zip(*parts)))

    def _check_inputs(self, name: str, inp: ModalityInputs, batch_size: int | None) -> None:
        d_enc = self.config.modalities[name].d_enc
        e = inp.emb
        if e.ndim != 4 or e.shape[-1] != d_enc:
            raise ValueError(f"modality {name!r}: emb must be (B, K_m, N, {d_enc}), got {tuple(e.shape)}")
        if batch_size is not None and e.shape[0] != batch_size:
            raise ValueError(f"modality {name!r}: {e.shape[0]} rows but the token batch has {batch_size}")
        expected = {"token_mask": (e.shape[:3], torch.bool), "event_mask": (e.shape[:2], torch.bool)}
        expected["event_time"] = (e.shape[:2], torch.int64)
        for field_name, (shape, dtype) in expected.items():
            t = getattr(inp, field_name)
            if t.shape != shape or t.dtype != dtype:
                raise ValueError(
                    f"modality {name!r}: {field_name} must be {dtype} {tuple(shape)}, got {t.dtype} {tuple(t.shape)}"
                )

    def media_state(self, media: Media | None) -> dict[str, Tensor]:
        """Per-row tensors a KVCache keeps for generation: media validity/time and each block's keys/values."""
        if media is None or not self.xattn or media.tokens.shape[1] == 0:
            return {}
        state = {"valid": media.valid, "time": media.time}
        for i, block in self.xattn.items():
            state[f"k{i}"], state[f"v{i}"] = block.attn.media_kv(media.tokens)
        return state

    # -- the hooks of GPT --
    def cross_context(self, times: Tensor | None, cache: KVCache | None = None, media: Media | None = None):
        if not self.xattn:
            return None
        if cache is not None:
            if not cache.media:
                return None
            valid, media_time, tokens = cache.media["valid"], cache.media["time"], None
            kv = {int(i): (cache.media[f"k{i}"], cache.media[f"v{i}"]) for i in self.xattn}
        elif media is not None and media.tokens.shape[1] > 0:
            valid, media_time, tokens, kv = media.valid, media.time, media.tokens, None
        else:
            return None
        if times is None or times.ndim != 2 or times.shape[0] != valid.shape[0] or times.dtype != torch.int64:
            raise ValueError(f"times must be int64 µs (B, T) matching the media's {valid.shape[0]} rows")
        if self.unsafe_disable_time_mask:  # leakage test only: ignores acquisition times
            visible = valid[:, None, :].expand(-1, times.shape[1], -1)
        else:
            visible = visible_media(times, media_time, valid)  # (B, T, M)
        has_any = visible.any(-1)  # (B, T)
        mask = (visible | ~has_any[..., None]).unsqueeze(1)  # (B, 1, T, M): no fully masked row, no NaN
        if self.time_bias is not None:
            mask = self.time_bias(times, media_time).masked_fill(~mask, float("-inf"))  # (B, nh, T, M)
        return CrossContext(mask=mask, has_any=has_any, media=tokens, kv=kv)

    def cross(self, layer: int, x: Tensor, ctx: CrossContext | None) -> Tensor:
        if ctx is None or str(layer) not in self.xattn:
            return x
        block = self.xattn[str(layer)]
        kv = ctx.kv[layer] if ctx.kv is not None else block.attn.media_kv(ctx.media)
        return block(x, kv, mask=ctx.mask, has_any=ctx.has_any)

    # -- training and generation --
    def forward(
        self,
        tokens: Tensor,
        times: Tensor | None = None,
        modalities: dict[str, ModalityInputs] | None = None,
        targets: Tensor | None = None,
        loss_mask: Tensor | None = None,
        *,
        media: Media | None = None,
    ) -> tuple[Tensor, Tensor | None]:
        """tokens, times (B, T) -> (logits (B, T, V), loss or None).

        targets (B, T): the next token at each position; loss_mask (B, T): positions that count (False at
        padding and static context). Pass `media` (from encode_media) instead of `modalities` to reuse it.
        """
        if media is None:
            media = self.encode_media(modalities, batch_size=tokens.shape[0])
        if media is not None and times is not None and times.shape != tokens.shape:
            raise ValueError(f"times {tuple(times.shape)} must match tokens {tuple(tokens.shape)}")
        return self._forward(tokens, self.cross_context(times, media=media), targets, loss_mask)

    def prefill(
        self,
        tokens: Tensor,
        times: Tensor | None,
        cache: KVCache,
        *,
        media: Media | None = None,
        lengths: Tensor | None = None,
        prefix: int | Tensor | None = None,
    ) -> Tensor:
        """As GPT.prefill, and computes the media's cross-attention keys/values once into the cache."""
        if media is not None and media.tokens.shape[0] != cache.batch_size:
            raise ValueError(f"media has {media.tokens.shape[0]} rows but the cache holds {cache.batch_size}")
        cache.media = self.media_state(media)
        return self._prefill(tokens, times, cache, lengths, prefix)

    # -- reporting and optimisation --
    def gate_values(self) -> dict[str, float]:
        """Current gate of every cross-attention block: {"xattn.{layer}.attn": g, "xattn.{layer}.ff": g}."""
        out = {}
        for i, block in self.xattn.items():
            g = block.gates().detach().float().cpu()
            out[f"xattn.{i}.attn"], out[f"xattn.{i}.ff"] = float(g[0]), float(g[1])
        return out

    def param_groups(self, weight_decay: float) -> list[dict]:
        """AdamW groups: Linear weights decay; biases, norms, embeddings, latents, time-bias table do not;
        gate scalars form their own group without decay. Every group has an `lr_scale` (gates:
        config.gate_lr_scale) that the trainer multiplies into the learning rate."""
        decay, no_decay, gates, seen = [], [], [], set()
        for module in self.modules():
            for pname, p in module.named_parameters(recurse=False):
                if id(p) in seen or not p.requires_grad:
                    continue
                seen.add(id(p))
                if isinstance(module, GatedCrossAttentionBlock) and pname == "gate":
                    gates.append(p)
                elif isinstance(module, nn.Linear) and pname == "weight":
                    decay.append(p)
                else:
                    no_decay.append(p)
        groups = [
            {"params": decay, "weight_decay": weight_decay, "lr_scale": 1.0},
            {"params": no_decay, "weight_decay": 0.0, "lr_scale": 1.0},
        ]
        if gates:
            groups.append({"params": gates, "weight_decay": 0.0, "lr_scale": self.config.gate_lr_scale})
        return groups

    def parameter_counts(self) -> dict[str, int]:
        """Parameters of the decoder, the compressors and the cross-attention blocks (embeddings included)."""

        def count(m: nn.Module | None) -> int:
            return sum(p.numel() for p in m.parameters()) if m is not None else 0

        parts = {
            "decoder": count(self.transformer),  # lm_head is tied to the token embedding
            "compression": count(self.compressors) + count(self.modality_embedding),
            "cross_attention": count(self.xattn) + count(self.time_bias),
        }
        parts["total"] = sum(p.numel() for p in self.parameters())
        return parts

    def estimate_flops(self, T: int, events: dict[str, tuple[int, int]] | None = None) -> dict[str, float]:
        """Forward matmul FLOPs of one sequence of T tokens with `events`: modality -> (K_m, N), all present.

        decoder: O(T D^2 + T^2 D); compression: sum over events (none: O(N d_enc D); latent: O(N D (d_enc
        + l D))); cross_attention: O(T D^2 + M D^2 + T M D) per block with M media tokens (M = K_m N for
        `none`, K_m k for `latent`): `none` grows with N T, `latent` does not depend on N.
        """
        flops = super().estimate_flops(T)
        D, f = self.config.n_embd, self.config.xattn_ff_mult
        compression, M = 0.0, 0
        for name, (K, N) in (events or {}).items():
            compressor = self.compressors[name]
            compression += K * compressor.flops(N)
            M += K * compressor.n_out(N)
        per_block = T * (4 + 4 * f) * D * D + 4 * M * D * D + 4 * T * M * D if M else 0.0
        flops["compression"] = float(compression)
        flops["cross_attention"] = float(len(self.xattn) * per_block)
        return flops
