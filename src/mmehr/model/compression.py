"""Compression of one modality event's encoder tokens into a few decoder-width tokens.

Every compressor maps emb (..., N, d_enc) with token_mask (..., N) (True = a real encoder token) to
tokens (..., n_out, D) with mask (..., n_out), for any leading dims (e.g. (B, K_m) or (E,) events):

- `none`   project each encoder token d_enc -> D: n_out = N, the mask passes through.
- `mean`   masked mean over the N tokens (padding ignored), then project: n_out = 1.
- `latent` Perceiver resampler: n_latents learned latents (the paper's k; randomly initialised) refined
           by n_latent_layers (the paper's l) layers of attention to concat(media tokens, latents) plus a
           feed-forward, residual, final LayerNorm: n_out = n_latents. The media keys/values are computed
           once per event and shared by the layers. Cost linear in N, and the decoder then cross-attends
           to n_latents tokens per event, not N.

Every output ends with a LayerNorm, so the cross-attention sees media on one scale whatever the mode.
Padded encoder tokens must be finite (zeros): they are masked, never read as values.
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn
from torch import Tensor

from mmehr.model.config import ModalityConfig
from mmehr.model.decoder import MLP


class NoCompression(nn.Module):
    """Keep every encoder token: (..., N, d_enc) -> (..., N, D)."""

    def __init__(self, d_enc: int, n_embd: int, bias: bool = True):
        super().__init__()
        self.proj = nn.Linear(d_enc, n_embd, bias=bias)
        self.ln = nn.LayerNorm(n_embd, bias=bias)

    def n_out(self, n_tokens: int) -> int:
        return n_tokens

    def flops(self, n_tokens: int) -> float:
        """Forward matmul FLOPs of one event of n_tokens encoder tokens."""
        return 2.0 * n_tokens * self.proj.in_features * self.proj.out_features

    def forward(self, emb: Tensor, token_mask: Tensor) -> tuple[Tensor, Tensor]:
        return self.ln(self.proj(emb.to(self.proj.weight.dtype))), token_mask


class MeanPool(nn.Module):
    """Masked mean over the N encoder tokens, then project: (..., N, d_enc) -> (..., 1, D).

    An event with no valid token yields a zero mean and mask False.
    """

    def __init__(self, d_enc: int, n_embd: int, bias: bool = True):
        super().__init__()
        self.proj = nn.Linear(d_enc, n_embd, bias=bias)
        self.ln = nn.LayerNorm(n_embd, bias=bias)

    def n_out(self, n_tokens: int) -> int:
        return 1

    def flops(self, n_tokens: int) -> float:
        d_enc, D = self.proj.in_features, self.proj.out_features
        return 2.0 * n_tokens * d_enc + 2.0 * d_enc * D

    def forward(self, emb: Tensor, token_mask: Tensor) -> tuple[Tensor, Tensor]:
        emb = emb.to(self.proj.weight.dtype)
        w = token_mask.to(emb.dtype)
        w = w / w.sum(-1, keepdim=True).clamp(min=1)  # (..., N) weights of a masked mean
        pooled = torch.einsum("...n,...nd->...d", w, emb)  # (..., d_enc), a batched matmul: no masked copy
        return self.ln(self.proj(pooled)).unsqueeze(-2), token_mask.any(-1, keepdim=True)


class ProjectedMedia:
    """Media keys/values projected once per event: k, v (E, nh, N, hs). Costs O(N D^2) once."""

    def __init__(self, k: Tensor, v: Tensor):
        self.k, self.v = k, v

    def scores(self, q: Tensor) -> Tensor:
        """q (E, nh, n_q, hs) -> q . k (E, nh, n_q, N)."""
        return q @ self.k.transpose(-1, -2)

    def mix(self, p: Tensor) -> Tensor:
        """Attention weights p (E, nh, n_q, N) -> sum_j p_j v_j (E, nh, n_q, hs)."""
        return p @ self.v


class FoldedMedia:
    """The same keys/values, never formed: each head's projection is moved to the queries' side.

    For head h with key projection (W_h (hs, D), b_h): q . (W_h m_j + b_h) = (W_h^T q) . m_j + q . b_h, and
    sum_j p_j (V_h m_j + c_h) = V_h (sum_j p_j m_j) + (sum_j p_j) c_h. The media m (E, N, D) are read
    directly, so a layer costs O(nh n_q N D) instead of projecting all N tokens (O(N D^2)): cheaper while
    n_latent_layers * nh * n_latents < D + n_latent_layers * n_latents. Same outputs to float rounding.
    """

    def __init__(self, media: Tensor, weight: Tensor, bias: Tensor | None, n_head: int):
        D = media.shape[-1]
        self.media, self.n_head, self.hs = media, n_head, D // n_head  # media (E, N, D)
        w_k, w_v = weight.view(2, n_head, self.hs, D)  # each (nh, hs, D)
        self.w_k, self.w_v = w_k, w_v
        self.b_k, self.b_v = bias.view(2, n_head, self.hs) if bias is not None else (None, None)  # (nh, hs)

    def scores(self, q: Tensor) -> Tensor:
        E, nh, n_q, _ = q.shape
        qk = torch.einsum("ehqc,hcd->ehqd", q, self.w_k)  # (E, nh, n_q, D): W_h^T q
        s = (qk.reshape(E, nh * n_q, -1) @ self.media.transpose(1, 2)).view(E, nh, n_q, -1)  # (E, nh, n_q, N)
        return s if self.b_k is None else s + (q * self.b_k[:, None, :]).sum(-1, keepdim=True)

    def mix(self, p: Tensor) -> Tensor:
        E, nh, n_q, N = p.shape
        pm = (p.reshape(E, nh * n_q, N) @ self.media).view(E, nh, n_q, -1)  # (E, nh, n_q, D): sum_j p_j m_j
        y = torch.einsum("ehqd,hcd->ehqc", pm, self.w_v)  # (E, nh, n_q, hs)
        return y if self.b_v is None else y + p.sum(-1, keepdim=True) * self.b_v[:, None, :]


class PerceiverAttention(nn.Module):
    """Latents (E, n_latents, D) attend to concat(media, latents): the media's keys/values (`ProjectedMedia`
    or `FoldedMedia`, made once per event and shared by every layer) are given, the latents' own are
    computed here. Padded media tokens are masked; the latents are always visible, so no row is ever
    fully masked."""

    def __init__(self, n_embd: int, n_head: int, bias: bool = True):
        super().__init__()
        self.ln = nn.LayerNorm(n_embd, bias=bias)
        self.q = nn.Linear(n_embd, n_embd, bias=bias)
        self.kv = nn.Linear(n_embd, 2 * n_embd, bias=bias)
        self.c_proj = nn.Linear(n_embd, n_embd, bias=bias)
        self.n_head = n_head

    def forward(self, latents: Tensor, media: ProjectedMedia | FoldedMedia, media_mask: Tensor) -> Tensor:
        E, n_latents, D = latents.shape
        nh, hs = self.n_head, D // self.n_head
        lat = self.ln(latents)
        q = self.q(lat).view(E, n_latents, nh, hs).transpose(1, 2) / math.sqrt(hs)  # (E, nh, n_latents, hs)
        lat_k, lat_v = (
            self.kv(lat).view(E, n_latents, 2, nh, hs).permute(2, 0, 3, 1, 4)
        )  # (E, nh, n_latents, hs)
        # Few queries: explicit attention over [media, latents] without copying the N media keys/values.
        scores_media = media.scores(q).masked_fill(~media_mask[:, None, None, :], float("-inf"))
        scores = torch.cat(
            [scores_media, q @ lat_k.transpose(-1, -2)], dim=-1
        )  # (E, nh, n_latents, N + n_latents)
        p = scores.softmax(dim=-1)  # never a fully masked row: the latents are always there
        N = scores_media.shape[-1]
        y = media.mix(p[..., :N]) + p[..., N:] @ lat_v  # (E, nh, n_latents, hs)
        return self.c_proj(y.transpose(1, 2).reshape(E, n_latents, D))


class PerceiverResampler(nn.Module):
    """(..., N, d_enc) encoder tokens -> (..., n_latents, D) latents, after n_latent_layers Perceiver layers.

    The media are projected to D and normalised ONCE per event, and one key/value projection of them is
    shared by every layer (besides each layer's keys/values of the latents). So the cost is O(N d_enc D)
    for the media plus, whichever is cheaper (`fold_media_kv`, fixed by the sizes): the media keys/values
    once, O(N D^2), and O(n_latent_layers N n_latents D) for attention; or the projection folded into the
    queries (`FoldedMedia`), O(n_latent_layers n_head n_latents N D). Not O(n_latent_layers N D^2) as with
    Flamingo's per-layer media projections. With one layer (l = 1, the demo's; the paper chose l = 4) the
    two are the same computation; with l > 1 they differ, not measured for quality (docs/architecture.md).
    """

    def __init__(
        self,
        d_enc: int,
        n_embd: int,
        n_head: int,
        n_latents: int,
        n_latent_layers: int,
        bias: bool = True,
        init_std: float = 1.0,
    ):
        super().__init__()
        self.proj = nn.Linear(d_enc, n_embd, bias=bias)
        self.ln_media = nn.LayerNorm(n_embd, bias=bias)
        self.media_kv = nn.Linear(n_embd, 2 * n_embd, bias=bias)
        # Random noise, by default at std 1 as Flamingo starts them. At the decoder's embedding scale (GPT-2:
        # std 0.02) the k latents end as near copies of one another on the demo cohort and keep one choice of
        # what to read (docs/architecture.md, "Where the notes' condition is lost").
        self.latents = nn.Parameter(init_std * torch.randn(n_latents, n_embd))  # (n_latents, D)
        self.layers = nn.ModuleList(
            nn.ModuleList(
                [
                    PerceiverAttention(n_embd, n_head, bias),
                    nn.Sequential(nn.LayerNorm(n_embd, bias=bias), MLP(n_embd, 4, bias, 0.0)),
                ]
            )
            for _ in range(n_latent_layers)
        )
        self.ln = nn.LayerNorm(n_embd, bias=bias)
        self.n_head = n_head
        # A pure speed choice (outputs agree to float rounding; tests check both ways): fold the media
        # keys/values into the queries when that touches the N media tokens less. It counts FLOPs, not
        # kernels: on one H200 at the paper's sizes the unfolded path trained faster (88.8 vs 99.7 ms per
        # step, host-bound; README "On a GPU").
        self.fold_media_kv = n_latent_layers * n_head * n_latents < n_embd + n_latent_layers * n_latents

    def n_out(self, n_tokens: int) -> int:
        return self.latents.shape[0]

    def flops(self, n_tokens: int) -> float:
        """Linear in N: the media's projection, then the layers over the latents (keys/values as chosen)."""
        (n_latents, D), N, nh, L = self.latents.shape, n_tokens, self.n_head, len(self.layers)
        per_layer = (
            24 * n_latents * D * D + 4 * n_latents * n_latents * D
        )  # q, kv, proj, MLP; latents' scores
        if self.fold_media_kv:  # W^T q and W (sum p m) per head, then scores and mix over the N media
            media = L * (4 * n_latents * D * D + 4 * nh * n_latents * N * D)
        else:  # the media keys/values once, then scores and mix over them per layer
            media = 4 * N * D * D + L * 4 * n_latents * N * D
        return 2.0 * N * self.proj.in_features * D + media + L * per_layer

    def forward(self, emb: Tensor, token_mask: Tensor) -> tuple[Tensor, Tensor]:
        lead, (N, d_enc) = emb.shape[:-2], emb.shape[-2:]
        media = self.ln_media(self.proj(emb.reshape(-1, N, d_enc).to(self.proj.weight.dtype)))  # (E, N, D)
        E, D = media.shape[0], media.shape[2]
        if self.fold_media_kv:
            shared = FoldedMedia(media, self.media_kv.weight, self.media_kv.bias, self.n_head)
        else:
            kv = self.media_kv(media).view(E, N, 2, self.n_head, D // self.n_head).permute(2, 0, 3, 1, 4)
            shared = ProjectedMedia(kv[0].contiguous(), kv[1].contiguous())  # each (E, nh, N, hs)
        mask = token_mask.reshape(-1, N)
        x = self.latents.expand(E, -1, -1)  # (E, n_latents, D)
        for attn, ff in self.layers:
            x = x + attn(x, shared, mask)
            x = x + ff(x)
        x = self.ln(x)
        n_latents = x.shape[1]
        return x.view(*lead, n_latents, D), torch.ones(*lead, n_latents, dtype=torch.bool, device=x.device)


def build_compressor(m: ModalityConfig, n_embd: int, n_head: int, bias: bool = True) -> nn.Module:
    """The compressor named by `m.compression`, mapping m.d_enc-wide encoder tokens to width n_embd."""
    if m.compression == "none":
        return NoCompression(m.d_enc, n_embd, bias)
    if m.compression == "mean":
        return MeanPool(m.d_enc, n_embd, bias)
    if m.compression == "latent":
        return PerceiverResampler(
            m.d_enc, n_embd, n_head, m.n_latents, m.n_latent_layers, bias, init_std=m.latent_init_std
        )
    raise ValueError(f"unknown compression {m.compression!r}; expected none, mean or latent")
