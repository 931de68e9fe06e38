"""The cross-attention a context pays to each modality event, read off the model without changing it.

The blocks attend with `F.scaled_dot_product_attention`, which returns no weights. Forward hooks on each
block's `MaskedCrossAttention` recompute them from the block's own queries, keys and mask (the strict
time mask: token i at t_i sees an event only if it was acquired strictly before t_i; a row that sees
nothing gets no weight at all), and check that the weights reproduce the block's output. Hooks on the
compressors record how many media tokens each modality's events became, so every media token can be
traced back to its event (media tokens are ordered modality by modality, each event's tokens together,
events most recent first, as `Fusion.encode_media` concatenates them).

Shapes: T context tokens, M media tokens, E events of the context (all modalities).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from mmehr.batch import Batch
from mmehr.model.gpt import GPT


@dataclass
class CrossAttention:
    """One context's cross-attention, per cross-attention block (keyed by the decoder layer it precedes).

    events: (modality, slot) of each of the E present events (slot k: the k-th most recent of its
    modality in the context's retrieval), with event_time (E,) µs; weights[layer]: (T, E) attention mass
    (mean over heads, summed over an event's media tokens) of each context token on each event: a row
    sums to 1 where the token sees an event (has_any (T,)), to 0 elsewhere. gates: {layer: (attention
    gate, feed-forward gate)}. max_error: the largest difference between the block's output and the one
    the recomputed weights give (float rounding: the weights are the block's own).
    """

    events: list[tuple[str, int]]
    event_time: np.ndarray
    weights: dict[int, np.ndarray]
    has_any: np.ndarray
    gates: dict[int, tuple[float, float]]
    max_error: float


@torch.no_grad()
def cross_attention(model: GPT, batch: Batch) -> tuple[CrossAttention | None, np.ndarray]:
    """Run the model once on a one-row context batch. Returns its cross-attention (None for a model
    without modalities, or a context with no event) and the next-token logits after its last token (V,)."""
    if len(batch) != 1:
        raise ValueError(f"cross_attention explains one context at a time, got {len(batch)} rows")
    model.eval()
    device = model.lm_head.weight.device
    n = int(batch.lengths[0])
    tokens, times = batch.tokens[:, :n].to(device), batch.times[:, :n].to(device)
    mods = {k: v.to(device) for k, v in batch.modalities.items()}
    fusion = model.fusion
    if fusion is None:
        logits, _ = model(tokens, times)
        return None, logits[0, -1].float().cpu().numpy()

    n_out: list[tuple[str, int]] = []
    recorded: dict[int, tuple[torch.Tensor, torch.Tensor, float]] = {}
    hooks = []
    for name, compressor in fusion.compressors.items():
        hooks.append(
            compressor.register_forward_hook(
                lambda m, a, out, name=name: n_out.append((name, out[0].shape[1]))
            )
        )
    for layer, block in fusion.xattn.items():
        hooks.append(block.attn.register_forward_hook(_weights_hook(int(layer), recorded), with_kwargs=True))
    try:
        logits, _ = model(tokens, times, mods)
    finally:
        for h in hooks:
            h.remove()
    next_logits = logits[0, -1].float().cpu().numpy()
    if not recorded:
        return None, next_logits

    # media token -> event: modality by modality (those with a present event), K_m slots of n_out tokens
    owner, events, event_time = [], [], []
    for name, width in n_out:
        inp = mods[name]
        for k in range(inp.event_mask.shape[1]):
            present = bool(inp.event_mask[0, k]) and (
                inp.payload is not None or bool(inp.token_mask[0, k].any())
            )
            e = len(events) if present else -1
            if present:
                events.append((name, k))
                event_time.append(int(inp.event_time[0, k]))
            owner += [e] * width
    owner = np.asarray(owner)
    weights, has_any, gates, error = {}, None, {}, 0.0
    for layer, (w, any_row, err) in sorted(recorded.items()):
        w = w[0].mean(0).float().cpu().numpy()  # (T, M): mean over heads
        if w.shape[1] != owner.size:
            raise RuntimeError(
                f"layer {layer}: {w.shape[1]} media tokens, but the events account for {owner.size}"
            )
        per_event = np.zeros((w.shape[0], len(events)))
        for e in range(len(events)):
            per_event[:, e] = w[:, owner == e].sum(1)
        weights[layer] = per_event
        has_any = any_row[0].cpu().numpy()
        g = fusion.xattn[str(layer)].gates().float().cpu().numpy()
        gates[layer] = (float(g[0]), float(g[1]))
        error = max(error, err)
    return CrossAttention(
        events, np.asarray(event_time, dtype=np.int64), weights, has_any, gates, error
    ), next_logits


def _weights_hook(layer: int, recorded: dict):
    """A forward hook on a MaskedCrossAttention: its attention weights (B, nh, T, M), recomputed."""

    def hook(module, args, kwargs, output):
        x, (k, v) = args
        mask, has_any = kwargs["mask"], kwargs["has_any"]
        B, T, D = x.shape
        nh = module.n_head
        q = module.q(module.ln(x)).view(B, T, nh, D // nh).transpose(1, 2)  # (B, nh, T, hs)
        scores = (q.float() @ k.float().transpose(-1, -2)) / math.sqrt(D // nh)  # (B, nh, T, M)
        if mask.is_floating_point():
            scores = scores + mask.float()  # the relative-time bias, -inf where masked
        else:
            scores = scores.masked_fill(~mask, float("-inf"))
        w = torch.softmax(scores, dim=-1)
        w = torch.where(has_any[:, None, :, None], w, 0.0)  # a row that sees nothing attends to nothing
        y = (w @ v.float()).transpose(1, 2).reshape(B, T, D)
        y = torch.where(has_any[..., None], module.c_proj(y.to(x.dtype)), 0.0)
        err = float((y.float() - output.float()).abs().max()) if y.numel() else 0.0
        recorded[layer] = (w, has_any, err)

    return hook


def event_mass(att: CrossAttention, position: int) -> dict[int, np.ndarray]:
    """{layer: (E,) attention mass on each event} of the context token at `position`."""
    return {layer: w[position] for layer, w in att.weights.items()}


def visible(att: CrossAttention, token_times: np.ndarray) -> np.ndarray:
    """(T, E) bool: which event each context token may see under the strict time mask."""
    return att.event_time[None, :] < np.asarray(token_times)[:, None]


def probabilities(logits: np.ndarray, allowed: np.ndarray) -> np.ndarray:
    """Next-token probabilities over the ids the sampler may draw (V,)."""
    z = torch.as_tensor(logits, dtype=torch.float64).masked_fill(~torch.as_tensor(allowed), float("-inf"))
    return F.softmax(z, dim=-1).numpy()
