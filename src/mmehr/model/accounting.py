"""Parameter and FLOP accounting of a `GPT`, in one place (nanoGPT's estimate_mfu, for this model).

FLOPs count the forward pass's matmuls as `torch.utils.flop_counter` does (attention computed densely);
training is 3 x forward. Model FLOP/s = these FLOPs / measured seconds; divided by the hardware's peak
it is the MFU that `mmehr train` and the benchmarks report.
"""

from __future__ import annotations

from torch import nn

from mmehr.batch import Batch
from mmehr.model.gpt import GPT


def _count(module: nn.Module | None) -> int:
    return sum(p.numel() for p in module.parameters()) if module is not None else 0


def parameter_counts(model: GPT) -> dict[str, int]:
    """Parameters of the decoder (embeddings included; the LM head is tied to the token embedding), the
    compressors, the cross-attention blocks, the finetuned encoders, and in total."""
    fusion = model.fusion
    parts = {
        "decoder": _count(model.transformer),
        "compression": _count(fusion.compressors) + _count(fusion.modality_embedding) if fusion else 0,
        "cross_attention": _count(fusion.xattn) + _count(fusion.time_bias) if fusion else 0,
        "encoders": _count(fusion.encoders) if fusion else 0,
    }
    parts["total"] = _count(model)
    return parts


def num_parameters(model: GPT, non_embedding: bool = True) -> int:
    """All parameters; without the position embeddings by default (nanoGPT's convention)."""
    n = _count(model)
    return n - model.transformer.wpe.weight.numel() if non_embedding else n


def forward_flops(model: GPT, T: int, events: dict[str, tuple[float, int]] | None = None) -> dict[str, float]:
    """Forward matmul FLOPs of one sequence of T tokens with `events`: modality -> (K_m, N) present events
    of N encoder tokens each.

    decoder: O(T D^2 + T^2 D). compression: per event (none: O(N d_enc D); latent: O(N D (d_enc + D)) for
    the media, plus the latent layers). cross_attention per block: O(T D^2 + M D^2 + T M D) with M media
    tokens (K_m N for `none`, K_m n_latents for `latent`): `none` grows with N T, `latent` does not.
    """
    c = model.config
    D = c.n_embd
    decoder = c.n_layer * (24 * T * D * D + 4 * T * T * D) + 2 * T * D * c.vocab_size
    flops = {"decoder": float(decoder)}
    if model.fusion is None:
        return flops
    f = c.fusion.xattn_ff_mult
    compression, M = 0.0, 0.0
    for name, (K, N) in (events or {}).items():
        compressor = model.fusion.compressors[name]
        compression += K * compressor.flops(N)
        M += K * compressor.n_out(N)
    per_block = T * (4 + 4 * f) * D * D + 4 * M * D * D + 4 * T * M * D if M else 0.0
    flops["compression"] = float(compression)
    flops["cross_attention"] = float(len(model.fusion.xattn) * per_block)
    return flops


def train_flops_per_token(
    model: GPT, T: int | None = None, events: dict[str, tuple[float, int]] | None = None
) -> float:
    """Training (3 x forward) model FLOPs per token at context T (default block_size)."""
    T = T or model.config.block_size
    return 3.0 * sum(forward_flops(model, T, events).values()) / T


def batch_train_flops(model: GPT, batch: Batch) -> float:
    """Training FLOPs of one micro-batch: its rows at its length, with the events it actually carries
    (present events per row, encoder tokens per event)."""
    B, T = batch.tokens.shape
    events = {
        name: (float(m.event_mask.sum()) / B, _tokens_per_event(model, name, m))
        for name, m in batch.modalities.items()
    }
    return 3.0 * sum(forward_flops(model, T, events).values()) * B


def _tokens_per_event(model: GPT, name: str, m) -> int:
    """N of a modality's events: the stored embeddings' width, or a finetuned encoder's `max_tokens` (its
    own FLOPs are not counted: model FLOP/s then covers the decoder, compression and cross-attention)."""
    if m.emb is not None:
        return m.emb.shape[2]
    return int(getattr(model.fusion.encoders[name], "max_tokens", 1))
