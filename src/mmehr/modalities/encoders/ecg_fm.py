"""ECG-FM: wav2vec 2.0-style (fairseq-signals), pure PyTorch; loads the fairseq-signals checkpoint."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from mmehr.modalities.encoders.base import ECG_LEADS, FrozenEncoder, _config
from mmehr.modalities.encoders.preprocess import fit_length, resample, zscore_leads
from mmehr.modalities.encoders.weights import (
    _load_into,
    _resolve_file,
    _sha256_files,
    _sha256_module,
    _strip_prefix,
    load_checkpoint,
)


@dataclasses.dataclass
class ECGFMConfig:
    """ECG-FM defaults (REFERENCE.md §7): 4 x (256 ch, k=2, s=2) convs, 12-layer post-LN transformer."""

    fs: float = 500.0
    segment: int = 2500  # samples per 5-s segment
    max_segments: int = 2  # 10 s -> 2 x 156 tokens
    conv_dim: int = 256
    conv_layers: int = 4
    conv_kernel: int = 2
    conv_stride: int = 2
    extractor_mode: str = "default"  # "default": GroupNorm after the first conv; "layer_norm": LN after each
    conv_bias: bool = False
    dim: int = 768
    depth: int = 12
    heads: int = 12
    ffn_dim: int = 3072
    conv_pos: int = 128
    conv_pos_groups: int = 16


class TransposeLast(nn.Module):
    def forward(self, x):
        return x.transpose(-2, -1)


class ConvFeatureExtractor(nn.Module):
    """(B, 12, n) -> (B, conv_dim, T). Module indices mirror fairseq-signals (`conv_layers.i.0` = conv)."""

    def __init__(self, cfg: ECGFMConfig):
        super().__init__()
        layers, c_in = [], 12
        for i in range(cfg.conv_layers):
            conv = nn.Conv1d(c_in, cfg.conv_dim, cfg.conv_kernel, stride=cfg.conv_stride, bias=cfg.conv_bias)
            if cfg.extractor_mode == "layer_norm":
                norm = nn.Sequential(TransposeLast(), nn.LayerNorm(cfg.conv_dim), TransposeLast())
                layers.append(nn.Sequential(conv, nn.Identity(), norm, nn.GELU()))
            elif i == 0:
                layers.append(
                    nn.Sequential(conv, nn.Identity(), nn.GroupNorm(cfg.conv_dim, cfg.conv_dim), nn.GELU())
                )
            else:
                layers.append(nn.Sequential(conv, nn.Identity(), nn.GELU()))
            c_in = cfg.conv_dim
        self.conv_layers = nn.ModuleList(layers)

    def forward(self, x):
        for layer in self.conv_layers:
            x = layer(x)
        return x


class FairseqAttention(nn.Module):
    def __init__(self, dim: int, heads: int):
        super().__init__()
        self.heads = heads
        self.q_proj, self.k_proj, self.v_proj = nn.Linear(dim, dim), nn.Linear(dim, dim), nn.Linear(dim, dim)
        self.out_proj = nn.Linear(dim, dim)

    def forward(self, x):
        B, T, C = x.shape
        q, k, v = (
            p(x).view(B, T, self.heads, C // self.heads).transpose(1, 2)
            for p in (self.q_proj, self.k_proj, self.v_proj)
        )
        y = F.scaled_dot_product_attention(q, k, v)  # (B, nh, T, hs)
        return self.out_proj(y.transpose(1, 2).reshape(B, T, C))


class PostLNLayer(nn.Module):
    """fairseq's TransformerEncoderLayer with layer_norm_first=False."""

    def __init__(self, cfg: ECGFMConfig):
        super().__init__()
        self.self_attn = FairseqAttention(cfg.dim, cfg.heads)
        self.self_attn_layer_norm = nn.LayerNorm(cfg.dim)
        self.fc1, self.fc2 = nn.Linear(cfg.dim, cfg.ffn_dim), nn.Linear(cfg.ffn_dim, cfg.dim)
        self.final_layer_norm = nn.LayerNorm(cfg.dim)

    def forward(self, x):
        x = self.self_attn_layer_norm(x + self.self_attn(x))
        return self.final_layer_norm(x + self.fc2(F.gelu(self.fc1(x))))


class ECGFMEncoder(nn.Module):
    """Conv positional encoding (k, groups, 'same' length, GELU), LayerNorm, post-LN layers."""

    def __init__(self, cfg: ECGFMConfig):
        super().__init__()
        self.k = cfg.conv_pos
        self.pos_conv = nn.Conv1d(
            cfg.dim, cfg.dim, cfg.conv_pos, padding=cfg.conv_pos // 2, groups=cfg.conv_pos_groups
        )
        self.layer_norm = nn.LayerNorm(cfg.dim)
        self.layers = nn.ModuleList([PostLNLayer(cfg) for _ in range(cfg.depth)])

    def forward(self, x):
        pos = self.pos_conv(x.transpose(1, 2))
        if self.k % 2 == 0:  # fairseq's SamePad drops the extra step of an even kernel
            pos = pos[:, :, :-1]
        x = self.layer_norm(x + F.gelu(pos).transpose(1, 2))
        for layer in self.layers:
            x = layer(x)
        return x


class ECGFM(nn.Module):
    """ECG-FM: one segment (S, 12, 2500) -> (S, 156, 768). forward() handles a batch of segments:

    segments (B, n_seg, 12, segment), segment_mask (B, n_seg) -> (emb (B, n_seg * T, D), mask (B, n_seg * T)).
    """

    def __init__(self, cfg: ECGFMConfig):
        super().__init__()
        self.feature_extractor = ConvFeatureExtractor(cfg)
        self.layer_norm = nn.LayerNorm(cfg.conv_dim)
        self.post_extract_proj = nn.Linear(cfg.conv_dim, cfg.dim)
        self.encoder = ECGFMEncoder(cfg)

    def encode_segments(self, x):
        f = self.feature_extractor(x).transpose(1, 2)  # (S, T, conv_dim)
        return self.encoder(self.post_extract_proj(self.layer_norm(f)))  # (S, T, D)

    def forward(self, segments, segment_mask):
        B, S = segment_mask.shape
        out = self.encode_segments(segments[segment_mask])  # only real segments
        T, D = out.shape[1:]
        emb = out.new_zeros(B, S, T, D)
        emb[segment_mask] = out
        return emb.view(B, S * T, D), segment_mask[:, :, None].expand(B, S, T).reshape(B, S * T)


def _weight_norm(g: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """fairseq's weight_norm(dim=2): weight[:, :, k] = g[k] * v[:, :, k] / ||v[:, :, k]||."""
    return v * (g / v.norm(dim=(0, 1), keepdim=True))


def map_fairseq_ecg_state(state: dict[str, torch.Tensor], path: Path) -> dict[str, torch.Tensor]:
    """fairseq-signals wav2vec2 / ecg_transformer keys -> `ECGFM` keys.

    Handles any wrapping prefix (fine-tuned `encoder.`, `w2v_encoder.w2v_model.`), the positional conv
    in either place (`encoder.pos_conv.0.*` or `conv_pos.pos_conv.0.*`) and either weight-norm form
    (`weight_g`/`weight_v` or `parametrizations.weight.original0/1`); mmehr's own `ECGFM.state_dict()`
    loads as is. Pretraining heads are dropped.
    """
    state = _strip_prefix(state, "feature_extractor.conv_layers.0.0.weight", path)
    out = {
        k: v
        for k, v in state.items()
        if k.split(".")[0] in ("feature_extractor", "layer_norm", "post_extract_proj")
    }
    out |= {
        k: v
        for k, v in state.items()
        if k.startswith(("encoder.layers.", "encoder.layer_norm.", "encoder.pos_conv."))
    }
    for base in ("encoder.pos_conv.0.", "conv_pos.pos_conv.0."):
        if base + "bias" not in state:
            continue
        out["encoder.pos_conv.bias"] = state[base + "bias"]
        if base + "weight_g" in state:
            out["encoder.pos_conv.weight"] = _weight_norm(state[base + "weight_g"], state[base + "weight_v"])
        elif base + "parametrizations.weight.original0" in state:
            g, v = (
                state[base + "parametrizations.weight.original0"],
                state[base + "parametrizations.weight.original1"],
            )
            out["encoder.pos_conv.weight"] = _weight_norm(g, v)
        elif base + "weight" in state:
            out["encoder.pos_conv.weight"] = state[base + "weight"]
    return out


def _infer_ecg_fm(state: dict[str, torch.Tensor] | None) -> dict[str, Any]:
    """Architecture sizes read off a (mapped) ECG-FM state dict; heads assume 64 per head."""
    needed = {"feature_extractor.conv_layers.0.0.weight", "post_extract_proj.weight", "encoder.layers.0.fc1.weight",
              "encoder.pos_conv.weight"}  # fmt: skip
    if state is None or not needed <= set(state):
        return {}  # loading will name what is missing
    conv = state["feature_extractor.conv_layers.0.0.weight"]  # (conv_dim, 12, kernel)
    dim, ffn = state["post_extract_proj.weight"].shape[0], state["encoder.layers.0.fc1.weight"].shape[0]
    pos = state["encoder.pos_conv.weight"]  # (dim, dim / groups, conv_pos)
    return {
        "conv_dim": conv.shape[0], "conv_kernel": conv.shape[2], "conv_bias": "feature_extractor.conv_layers.0.0.bias" in state,
        "conv_layers": len({k.split(".")[2] for k in state if k.startswith("feature_extractor.conv_layers.")}),
        "extractor_mode": "layer_norm" if "feature_extractor.conv_layers.0.2.1.weight" in state else "default",
        "dim": dim, "ffn_dim": ffn, "depth": len({k.split(".")[2] for k in state if k.startswith("encoder.layers.")}),
        "conv_pos": pos.shape[2], "conv_pos_groups": dim // pos.shape[1], "heads": max(1, dim // 64),
    }  # fmt: skip


def _ecg_fm_prepare(cfg: ECGFMConfig) -> Callable[[list], dict[str, torch.Tensor]]:
    def prepare(payloads: list) -> dict[str, torch.Tensor]:
        B, S = len(payloads), cfg.max_segments
        segments = np.zeros((B, S, 12, cfg.segment), dtype=np.float32)
        mask = np.zeros((B, S), dtype=bool)
        for i, (signal, fs) in enumerate(payloads):
            x = zscore_leads(resample(signal, fs, cfg.fs))
            n = int(np.clip(x.shape[1] // cfg.segment, 1, S))  # whole segments; a short record is zero-padded
            x = fit_length(x, n * cfg.segment)
            segments[i, :n] = x.reshape(12, n, cfg.segment).transpose(1, 0, 2)
            mask[i, :n] = True
        return {"segments": torch.from_numpy(segments), "segment_mask": torch.from_numpy(mask)}

    return prepare


def _build_ecg_fm(weights=None, *, random_init: bool = False, **overrides) -> FrozenEncoder:
    path = None
    if not random_init:
        how = (
            "Pass `--weights /path/to/mimic_iv_ecg_physionet_pretrained.pt` (ECG-FM's pretrained checkpoint from "
            "the Hugging Face repo wanglab/ecg-fm; fairseq-signals is not needed), or put that repo in the Hugging "
            "Face cache."
        )
        path = _resolve_file(
            "ecg-fm", weights, ("mimic_iv_ecg_physionet_pretrained.pt",), "wanglab/ecg-fm", how
        )
    state = None if random_init else map_fairseq_ecg_state(load_checkpoint(path), path)
    cfg = _config(ECGFMConfig, {**_infer_ecg_fm(state), **overrides}, "ecg-fm")
    torch.manual_seed(0)
    model = ECGFM(cfg)
    if random_init:
        checksum = _sha256_module(model, "random-init")
    else:
        _load_into(model, state, path)
        checksum = _sha256_files([path])
    T = cfg.segment
    for _ in range(cfg.conv_layers):
        T = (T - cfg.conv_kernel) // cfg.conv_stride + 1
    pre = {
        "leads": list(ECG_LEADS), "fs_hz": cfg.fs, "resample": "polyphase", "normalise": "per-lead z-score, flat lead -> 0",
        "segment_samples": cfg.segment, "max_segments": cfg.max_segments,
        "segments": "consecutive whole segments from the start; a shorter record is zero-padded to one",
        "tokens_per_segment": T, "output": "transformer output per segment, concatenated in time order",
    }  # fmt: skip
    return FrozenEncoder(
        name="ecg-fm", modality="ecg", model=model, prepare=_ecg_fm_prepare(cfg), d_enc=cfg.dim,
        max_tokens=cfg.max_segments * T, preprocessing=pre, weights_checksum=checksum, n_prefix=0,
    )  # fmt: skip
