"""Gated, time-aligned cross-attention from EHR tokens to compressed modality events.

`Fusion` is everything the multimodal model adds beside the GPT decoder (`mmehr.model.gpt.GPT` holds
one when modalities are configured): per modality a compressor (`mmehr.model.compression`), before
every `xattn_every`-th decoder layer a gated cross-attention block, and for a finetuned modality its
encoder (`attach_encoders`), run on the events' raw payloads inside `encode_media`.

Temporal alignment: token i (time t_i) sees media token j (of event e) only if event e is available
(event_mask, and not dropped by modality dropout) and its acquisition time s_e < t_i, STRICTLY (an event
at the same microsecond is invisible), and, for a modality whose inputs set `k_visible` (per-token
retrieval, `mmehr.data.windows`), e is among the k_visible most recent such events (`Cap`). A token
with no visible media token gets an exactly zero update from the whole block: its attention row is never
softmaxed into uniform attention (the Flamingo trap), and never NaN. So with every gate closed, or no
visible events, the model computes the EHR-only decoder.

Shapes: B rows, T tokens, D = n_embd, nh heads, hs = D // nh; per modality K_m events of N encoder
tokens (d_enc wide), each compressed to n_out tokens; M = the media tokens of a row, all modalities.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import torch
import torch.nn as nn
from torch import Tensor

from mmehr.batch import ModalityInputs
from mmehr.model.compression import build_compressor
from mmehr.model.config import DecoderConfig, FusionConfig
from mmehr.model.decoder import MLP, Dropout, attention


@dataclass
class Cap:
    """A modality whose tokens see at most `k` of their row's events (`ModalityInputs.k_visible`): its
    media tokens are [start, start + K n_out) of the Media, event by event; time and present (B, K) are
    its events' acquisition times and presence."""

    start: int
    n_out: int
    k: int
    time: Tensor
    present: Tensor

    def select(self, rows: Tensor) -> Cap:
        return Cap(self.start, self.n_out, self.k, self.time[rows], self.present[rows])

    def keep(self, seen_before: Tensor) -> Tensor:
        """(B, T, K n_out) bool: per token (its visibility time, (B, T)), the media tokens of its k most
        recent events acquired strictly before it. An event's rank is the number of visible events newer
        than it (at equal times, those before it in the row's order: the stores fetch most recent first)."""
        visible = self.present[:, None, :] & (self.time[:, None, :] < seen_before[:, :, None])  # (B, T, K)
        t = self.time
        K = t.shape[1]
        earlier_slot = torch.ones(K, K, dtype=torch.bool, device=t.device).tril(-1)  # [j, j']: j' < j
        newer_than = (t[:, None, :] > t[:, :, None]) | ((t[:, None, :] == t[:, :, None]) & earlier_slot)
        rank = (visible[:, :, None, :] & newer_than[:, None, :, :]).sum(-1)  # (B, T, K): newer visible events
        return (visible & (rank < self.k)).repeat_interleave(self.n_out, dim=-1)


@dataclass
class Media:
    """The compressed tokens of every modality event of a batch, concatenated over modalities.

    tokens (B, M, D); valid (B, M) bool (event present and token real); time (B, M) int64 µs, the
    acquisition time of each token's event; caps: the modalities whose tokens see only their k most recent
    events (`Cap`). Computed once per batch by `Fusion.encode_media`.
    """

    tokens: Tensor
    valid: Tensor
    time: Tensor
    caps: tuple[Cap, ...] = ()

    def select(self, rows: Tensor) -> Media:
        """Rows (bool mask or index, repeats allowed: e.g. one row per rollout)."""
        caps = tuple(c.select(rows) for c in self.caps)
        return Media(self.tokens[rows], self.valid[rows], self.time[rows], caps)


def capped_visibility(seen_before: Tensor, time: Tensor, valid: Tensor, caps: tuple[Cap, ...]) -> Tensor:
    """(B, T, M) bool: what tokens whose visibility times are `seen_before` (B, T) may attend: the media
    acquired strictly before them (`visible_media`), of a capped modality only its k most recent events."""
    visible = visible_media(seen_before, time, valid)
    for cap in caps:
        keep = cap.keep(seen_before)
        visible[:, :, cap.start : cap.start + keep.shape[-1]] &= keep
    return visible


@dataclass
class MediaCache:
    """What generation keeps per row beside the decoder's KV cache: the media's validity and time
    (B, M), each cross-attention block's keys/values {layer: ((B, nh, M, hs), (B, nh, M, hs))}, and the
    media's caps."""

    valid: Tensor
    time: Tensor
    kv: dict[int, tuple[Tensor, Tensor]]
    caps: tuple[Cap, ...] = ()

    def select(self, rows: Tensor) -> MediaCache:
        kv = {layer: (k[rows], v[rows]) for layer, (k, v) in self.kv.items()}
        return MediaCache(self.valid[rows], self.time[rows], kv, tuple(c.select(rows) for c in self.caps))


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
    resid_dropout / attn_dropout: the rates of the output's and the attention probabilities' dropout.
    """

    def __init__(self, config: DecoderConfig, resid_dropout: float = 0.0, attn_dropout: float = 0.0):
        super().__init__()
        D = config.n_embd
        self.ln = nn.LayerNorm(D, bias=config.bias)
        self.q = nn.Linear(D, D, bias=config.bias)
        self.kv = nn.Linear(D, 2 * D, bias=config.bias)
        self.c_proj = nn.Linear(D, D, bias=config.bias)
        self.resid_dropout = Dropout(resid_dropout)
        self.n_head = config.n_head
        self.attn_dropout = attn_dropout

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
        p = self.attn_dropout if self.training else 0.0
        y = attention(q, k.to(q.dtype), v.to(q.dtype), attn_mask=mask, dropout_p=p)
        y = self.resid_dropout(self.c_proj(y.transpose(1, 2).reshape(B, T, D)))
        return torch.where(has_any[..., None], y, 0.0)


class GatedCrossAttentionBlock(nn.Module):
    """x + g_attn * xattn(LN(x), media), then + g_ff * FF(LN(x)); both updates are zero on rows with no
    visible media, so the whole block is the identity there.

    Gates (2,) multiply the whole residual updates: g = sigmoid(beta) with beta starting at
    fusion.gate_init (-4 -> 0.018), or g = tanh(alpha) with alpha starting at 0 (exact identity).
    """

    def __init__(self, config: DecoderConfig, fusion: FusionConfig):
        super().__init__()
        own = fusion.dropout  # None: the decoder's
        p, p_attn = (config.dropout, config.attention_dropout) if own is None else (own, own)
        self.attn = MaskedCrossAttention(config, resid_dropout=p, attn_dropout=p_attn)
        self.ln_ff = nn.LayerNorm(config.n_embd, bias=config.bias)
        self.ff = MLP(config.n_embd, fusion.xattn_ff_mult, config.bias, p)
        self.gate_fn = torch.sigmoid if fusion.gate == "sigmoid" else torch.tanh
        init = fusion.gate_init if fusion.gate == "sigmoid" else 0.0
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


class Fusion(nn.Module):
    """Per-modality compression + gated, time-masked cross-attention blocks, beside a GPT decoder.

    encode_media(modalities) -> Media, once per batch; context(times, media | cache) -> CrossContext, once
    per call; forward(layer, x, ctx) -> x updated before decoder layer `layer` (identity where no block).
    """

    def __init__(self, config: DecoderConfig, fusion: FusionConfig):
        super().__init__()
        self.fusion = fusion
        D = config.n_embd
        self.compressors = nn.ModuleDict(
            {
                name: build_compressor(m, D, config.n_head, config.bias)
                for name, m in fusion.modalities.items()
            }
        )
        self.modality_embedding = (
            nn.Embedding(len(fusion.modalities), D) if fusion.modality_embedding else None
        )
        layers = fusion.xattn_layers(config.n_layer)
        self.xattn = nn.ModuleDict({str(i): GatedCrossAttentionBlock(config, fusion) for i in layers})
        self.time_bias = RelativeTimeBias(config.n_head) if fusion.time_bias else None
        self.encoders = nn.ModuleDict()  # finetuned modalities' encoders (attach_encoders)

    def attach_encoders(self, encoders: Mapping[str, nn.Module]) -> None:
        """Give every finetuned modality its encoder module (built by the layer above: mmehr.runconfig).

        Contract: encoder(**payload) with the tensors of `ModalityInputs.payload` flattened to (E, ...) over
        the E present events -> (emb (E, N, d_enc) float, mask (E, N) bool, valid tokens first). The module's
        own parameters say what trains (requires_grad); its weights become part of the model's state dict.
        """
        wanted = set(self.fusion.finetuned())
        if set(encoders) != wanted:
            raise ValueError(
                f"finetuned modalities {sorted(wanted)} need exactly their encoders; got {sorted(encoders)}"
            )
        for name in sorted(encoders):
            self.encoders[name] = encoders[name]

    # -- media: once per batch --
    def encode_media(
        self, modalities: dict[str, ModalityInputs] | None, batch_size: int | None = None
    ) -> Media | None:
        """Compress every available event of every enabled modality: -> Media (B, M, D), or None if none.

        Only present events (event_mask and at least one valid token) are compressed. At train time each
        is dropped with probability fusion.modality_dropout, and a stored one's tokens get its modality's
        media_noise (default: fusion.media_noise).
        batch_size, when given, is checked.
        """
        if not modalities:
            return None
        unknown = set(modalities) - set(self.compressors)
        if unknown:
            raise ValueError(
                f"modalities {sorted(unknown)} are not enabled in the model config "
                f"(enabled: {sorted(self.compressors) or 'none'})"
            )
        parts, caps, offset = [], [], 0
        for index, (name, compressor) in enumerate(self.compressors.items()):
            inp = modalities.get(name)
            if inp is None:
                continue
            self._check_inputs(name, inp, batch_size)
            present = inp.event_mask if inp.payload is not None else inp.event_mask & inp.token_mask.any(-1)
            if self.training and self.fusion.modality_dropout > 0:  # present: (B, K_m)
                keep = torch.rand(present.shape, device=present.device) >= self.fusion.modality_dropout
                present = present & keep
            if not bool(present.any()):
                continue
            B, K = present.shape
            if inp.payload is not None:  # finetuned: the encoder runs here, on the present events only
                emb, token_mask = self._run_encoder(name, {k: v[present] for k, v in inp.payload.items()})
            else:
                emb, token_mask = inp.emb[present], inp.token_mask[present]
                noise = self.fusion.modalities[name].media_noise
                noise = self.fusion.media_noise if noise is None else noise
                if self.training and noise > 0:  # (E, N, d_enc), each event its own scale
                    scale = emb.float().std(dim=(1, 2), keepdim=True).to(emb.dtype)
                    emb = emb + noise * scale * torch.randn_like(emb)
            out, mask = compressor(emb, token_mask)  # (E, n_out, D), (E, n_out)
            n_out = out.shape[1]
            tokens = out.new_zeros(B, K, n_out, out.shape[2]).index_put((present,), out)  # (B, K_m, n_out, D)
            valid = mask.new_zeros(B, K, n_out).index_put((present,), mask)  # (B, K_m, n_out)
            if self.modality_embedding is not None:
                tokens = tokens + self.modality_embedding.weight[index].to(tokens.dtype)
            time = inp.event_time[:, :, None].expand(B, K, n_out)
            parts.append((tokens.flatten(1, 2), valid.flatten(1, 2), time.flatten(1, 2)))  # M += K_m n_out
            if inp.k_visible is not None and inp.k_visible < K:  # per-token retrieval: each token its k
                caps.append(Cap(offset, n_out, inp.k_visible, inp.event_time, present))
            offset += K * n_out
        if not parts:
            return None
        return Media(*(torch.cat(p, dim=1) for p in zip(*parts)), caps=tuple(caps))

    def _run_encoder(self, name: str, payload: dict[str, Tensor]) -> tuple[Tensor, Tensor]:
        emb, mask = self.encoders[name](**payload)  # (E, N, d_enc), (E, N)
        d_enc = self.fusion.modalities[name].d_enc
        if emb.ndim != 3 or emb.shape[-1] != d_enc or mask.shape != emb.shape[:2]:
            raise ValueError(
                f"modality {name!r}: its encoder returned {tuple(emb.shape)} / mask {tuple(mask.shape)}, "
                f"expected (E, N, {d_enc}) / (E, N)"
            )
        return emb, mask.bool()

    def _check_inputs(self, name: str, inp: ModalityInputs, batch_size: int | None) -> None:
        d_enc = self.fusion.modalities[name].d_enc
        finetuned = name in self.encoders
        if finetuned != (inp.payload is not None):
            raise ValueError(
                f"modality {name!r} is {'finetuned: it takes raw payloads' if finetuned else 'frozen: it takes stored embeddings'}"
                f", got {'stored embeddings' if finetuned else 'payloads'}"
            )
        rows_events = inp.event_mask.shape
        if batch_size is not None and rows_events[0] != batch_size:
            raise ValueError(f"modality {name!r}: {rows_events[0]} rows but the token batch has {batch_size}")
        expected = {"event_mask": (rows_events, torch.bool), "event_time": (rows_events, torch.int64)}
        if finetuned:
            for key, t in inp.payload.items():
                if t.shape[:2] != rows_events:
                    raise ValueError(
                        f"modality {name!r}: payload {key} must start with (B, K_m) = {tuple(rows_events)}, "
                        f"got {tuple(t.shape)}"
                    )
        else:
            e = inp.emb
            if e.ndim != 4 or e.shape[-1] != d_enc or e.shape[:2] != rows_events:
                raise ValueError(f"modality {name!r}: emb must be (B, K_m, N, {d_enc}), got {tuple(e.shape)}")
            expected["token_mask"] = (e.shape[:3], torch.bool)
        for field_name, (shape, dtype) in expected.items():
            t = getattr(inp, field_name)
            if t.shape != shape or t.dtype != dtype:
                raise ValueError(
                    f"modality {name!r}: {field_name} must be {dtype} {tuple(shape)}, got {t.dtype} {tuple(t.shape)}"
                )

    def cache_media(self, media: Media | None) -> MediaCache | None:
        """The per-row state a KVCache keeps for generation: each block's media keys/values, once."""
        if media is None or not self.xattn or media.tokens.shape[1] == 0:
            return None
        kv = {int(i): block.attn.media_kv(media.tokens) for i, block in self.xattn.items()}
        return MediaCache(media.valid, media.time, kv, media.caps)

    # -- per call: who sees what --
    def draw_cutoff(self, times: Tensor) -> Tensor | None:
        """At train time, per row with probability fusion.media_cutoff, the time of a uniformly drawn token
        of the row (a simulated prediction time); int64 max elsewhere. None when off (eval, or 0)."""
        p = self.fusion.media_cutoff
        if not self.training or p <= 0:
            return None
        B, T = times.shape
        cut = times.gather(1, torch.randint(0, T, (B, 1), device=times.device)).squeeze(1)
        drawn = torch.rand(B, device=times.device) < p
        return torch.where(drawn, cut, torch.iinfo(torch.int64).max)

    def context(
        self,
        times: Tensor | None,
        media: Media | None = None,
        cache: MediaCache | None = None,
        cutoff: Tensor | None = None,
    ) -> CrossContext | None:
        """The visibility mask of tokens at `times` (B, T) int64 µs over the media (or the cached media).

        cutoff (B,) int64 µs (`draw_cutoff`): a token sees only media acquired strictly before
        min(its own time, cutoff); the time bias still reads each event's age at the token's own time.
        """
        if cache is not None:
            valid, media_time, tokens, kv, caps = cache.valid, cache.time, None, cache.kv, cache.caps
        elif media is not None and media.tokens.shape[1] > 0:
            valid, media_time, tokens, kv, caps = media.valid, media.time, media.tokens, None, media.caps
        else:
            return None
        if times is None or times.ndim != 2 or times.shape[0] != valid.shape[0] or times.dtype != torch.int64:
            raise ValueError(f"times must be int64 µs (B, T) matching the media's {valid.shape[0]} rows")
        seen_before = times if cutoff is None else torch.minimum(times, cutoff[:, None])
        visible = capped_visibility(seen_before, media_time, valid, caps)  # (B, T, M)
        has_any = visible.any(-1)  # (B, T)
        mask = (visible | ~has_any[..., None]).unsqueeze(1)  # (B, 1, T, M): no fully masked row, no NaN
        if self.time_bias is not None:
            mask = self.time_bias(times, media_time).masked_fill(~mask, float("-inf"))  # (B, nh, T, M)
        return CrossContext(mask=mask, has_any=has_any, media=tokens, kv=kv)

    def forward(self, layer: int, x: Tensor, ctx: CrossContext | None) -> Tensor:
        """x (B, T, D) before decoder layer `layer`: + the gated cross-attention block there, if any."""
        if ctx is None or str(layer) not in self.xattn:
            return x
        block = self.xattn[str(layer)]
        kv = ctx.kv[layer] if ctx.kv is not None else block.attn.media_kv(ctx.media)
        return block(x, kv, mask=ctx.mask, has_any=ctx.has_any)

    def gate_values(self) -> dict[str, float]:
        """Current gate of every block: {"xattn.{layer}.attn": g, "xattn.{layer}.ff": g}."""
        out = {}
        for i, block in self.xattn.items():
            g = block.gates().detach().float().cpu()
            out[f"xattn.{i}.attn"], out[f"xattn.{i}.ff"] = float(g[0]), float(g[1])
        return out
