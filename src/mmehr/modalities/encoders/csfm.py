"""CSFM: ViT over 12 leads x 100 patches at 250 Hz (parameter names of the authors' `CSFM` module)."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from mmehr.modalities.encoders.base import ECG_LEADS, FrozenEncoder, _config
from mmehr.modalities.encoders.preprocess import fit_length, resample_fft
from mmehr.modalities.encoders.weights import (
    _load_into,
    _resolve_file,
    _sha256_files,
    _sha256_module,
    _strip_prefix,
    load_checkpoint,
)


@dataclasses.dataclass
class CSFMConfig:
    """CSFM-Base: 250 Hz, 2500 samples, patch 25, 12 layers x 12 heads x 64, MLP 3072."""

    fs: float = 250.0
    samples: int = 2500
    patch: int = 25
    dim: int = 768
    depth: int = 12
    heads: int = 12
    dim_head: int = 64
    mlp_dim: int = 3072
    channel_types: int = 13  # 12 ECG leads + PPG in the authors' model
    clean: bool = True  # neurokit2.ecg_clean per lead before the z-score, as the authors do


class CSFMAttention(nn.Module):
    def __init__(self, cfg: CSFMConfig):
        super().__init__()
        inner = cfg.heads * cfg.dim_head
        self.heads = cfg.heads
        self.norm = nn.LayerNorm(cfg.dim)
        self.to_qkv = nn.Linear(cfg.dim, 3 * inner, bias=False)
        self.to_out = nn.Sequential(nn.Linear(inner, cfg.dim), nn.Identity())

    def forward(self, x):
        B, T, _ = x.shape
        q, k, v = (
            self.to_qkv(self.norm(x)).view(B, T, 3, self.heads, -1).permute(2, 0, 3, 1, 4)
        )  # (B, nh, T, hs)
        y = F.scaled_dot_product_attention(q, k, v)
        return self.to_out(y.transpose(1, 2).reshape(B, T, -1))


class CSFMFeedForward(nn.Module):
    def __init__(self, cfg: CSFMConfig):
        super().__init__()
        self.net = nn.Sequential(
            nn.LayerNorm(cfg.dim), nn.Linear(cfg.dim, cfg.mlp_dim), nn.GELU(), nn.Identity(),
            nn.Linear(cfg.mlp_dim, cfg.dim), nn.Identity(),
        )  # fmt: skip

    def forward(self, x):
        return self.net(x)


class CSFMTransformer(nn.Module):
    def __init__(self, cfg: CSFMConfig):
        super().__init__()
        self.norm = nn.LayerNorm(cfg.dim)
        self.layers = nn.ModuleList(
            [nn.ModuleList([CSFMAttention(cfg), CSFMFeedForward(cfg)]) for _ in range(cfg.depth)]
        )

    def forward(self, x):
        for attn, ff in self.layers:
            x = x + attn(x)
            x = x + ff(x)
        return self.norm(x)


class CSFM(nn.Module):
    """signal (B, 12, samples) -> (tokens (B, 1 + 12 * samples/patch, D), mask); CLS first, then lead-major."""

    def __init__(self, cfg: CSFMConfig):
        super().__init__()
        self.patch = cfg.patch
        n = cfg.samples // cfg.patch
        self.ts_to_patch_embedding = nn.Sequential(
            nn.Identity(), nn.LayerNorm(cfg.patch), nn.Linear(cfg.patch, cfg.dim), nn.LayerNorm(cfg.dim)
        )
        self.cls_token = nn.Parameter(torch.randn(1, 1, cfg.dim))
        self.ts_channel_type_embedding = nn.Parameter(torch.randn(1, cfg.channel_types, cfg.dim))
        self.ts_pos_embedding = nn.Parameter(torch.randn(1, n, cfg.dim))
        self.transformer = CSFMTransformer(cfg)
        self.register_buffer("channels", torch.arange(12), persistent=False)  # lead i -> channel type i

    def forward(self, signal):
        B, C, _ = signal.shape
        x = self.ts_to_patch_embedding(signal.view(B, C, -1, self.patch))  # (B, C, n, D)
        x = (
            x
            + self.ts_channel_type_embedding[0, self.channels][None, :, None]
            + self.ts_pos_embedding[:, None]
        )
        x = torch.cat([self.cls_token.expand(B, -1, -1), x.flatten(1, 2)], dim=1)  # (B, 1 + C*n, D)
        x = self.transformer(x)
        return x, torch.ones(x.shape[:2], dtype=torch.bool, device=x.device)


def _infer_csfm(state: dict[str, torch.Tensor] | None) -> dict[str, Any]:
    """Architecture sizes read off a CSFM state dict (64 per head, as the authors' default dim_head); each
    size from whichever layer holds it, so that one missing tensor is reported by name, not as a wrong size."""
    if state is None or not {"ts_pos_embedding", "ts_to_patch_embedding.2.weight"} <= set(state):
        return {}  # loading will name what is missing
    _, n, dim = state["ts_pos_embedding"].shape
    patch = state["ts_to_patch_embedding.2.weight"].shape[1]
    sizes = {"dim": dim, "patch": patch, "samples": n * patch,
             "depth": len({k.split(".")[2] for k in state if k.startswith("transformer.layers.")})}  # fmt: skip
    if "ts_channel_type_embedding" in state:
        sizes["channel_types"] = state["ts_channel_type_embedding"].shape[1]
    qkv = next((v for k, v in state.items() if k.endswith(".0.to_qkv.weight")), None)
    if qkv is not None:
        inner = qkv.shape[0] // 3
        sizes |= {"heads": max(1, inner // 64), "dim_head": inner // max(1, inner // 64)}
    mlp = next((v for k, v in state.items() if k.endswith(".1.net.1.weight")), None)
    if mlp is not None:
        sizes["mlp_dim"] = mlp.shape[0]
    return sizes


def _csfm_prepare(cfg: CSFMConfig) -> Callable[[list], dict[str, torch.Tensor]]:
    """The authors' `utils/preprocess.py::preprocess_ecg`, float64: FFT resampling to 250 Hz (only when the
    rate differs), neurokit2.ecg_clean per lead, the length fitted to `samples` (zero-padded at the end if
    shorter; if longer, the authors crop a random window, mmehr the first one), then per lead
    (x - mean) / (std + 1e-8)."""

    def prepare(payloads: list) -> dict[str, torch.Tensor]:
        out = np.zeros((len(payloads), 12, cfg.samples), dtype=np.float32)
        for i, (signal, fs) in enumerate(payloads):
            x = resample_fft(signal, fs, cfg.fs)
            if cfg.clean:
                import neurokit2 as nk

                x = np.stack([nk.ecg_clean(lead, sampling_rate=int(cfg.fs)) for lead in x])
            x = fit_length(x, cfg.samples)
            out[i] = (x - x.mean(axis=1, keepdims=True)) / (x.std(axis=1, keepdims=True) + 1e-8)
        return {"signal": torch.from_numpy(out)}

    return prepare


# Tensors of the authors' checkpoint that the ECG token features do not use: the text tower and the
# classification head (their README loads with these left out). Anything else unused fails loading.
CSFM_DROPPED = (r"text_.*", r"mlp_head\..*")


def _build_csfm(weights=None, *, random_init: bool = False, **overrides) -> FrozenEncoder:
    path = None
    if not random_init:
        how = (
            "CSFM's weights are released on request (github.com/guxiao0822/Cardiac-Sensing-FM, Academic Access "
            "Agreement); pass the checkpoint you received with `--weights /path/to/csfm_checkpoint.pth`."
        )
        path = _resolve_file("csfm", weights, ("CSFM_Base.pth", "csfm_base.pth", "checkpoint.pth"), None, how)
    state = None if random_init else _strip_prefix(load_checkpoint(path), "ts_channel_type_embedding", path)
    inferred = _infer_csfm(state)
    if "heads" in overrides and "dim_head" in inferred:  # the checkpoint fixes heads x dim_head
        inferred["dim_head"] = inferred["heads"] * inferred["dim_head"] // overrides["heads"]
    cfg = _config(CSFMConfig, {**inferred, **overrides}, "csfm")
    torch.manual_seed(0)
    model = CSFM(cfg)
    if random_init:
        checksum = _sha256_module(model, "random-init")
    else:
        _load_into(model, state, path, dropped=CSFM_DROPPED)
        checksum = _sha256_files([path])
    n = cfg.samples // cfg.patch
    pre = {
        "reproduces": "the authors' utils/preprocess.py::preprocess_ecg (fs_target 250, signal_length 2500)",
        "leads": list(ECG_LEADS), "fs_hz": cfg.fs, "resample": "scipy.signal.resample (FFT), float64, only if fs differs",
        "clean": "neurokit2.ecg_clean per lead" if cfg.clean else None, "samples": cfg.samples,
        "length": "zero-padded at the end if shorter; if longer the first window (the authors: a random one)",
        "normalise": "per lead (x - mean) / (std + 1e-8)",
        "patch": cfg.patch, "channel_type_ids": list(range(12)), "output": f"CLS + 12 x {n} patch tokens, lead-major",
        "architecture": {"dim": cfg.dim, "depth": cfg.depth, "heads": cfg.heads, "dim_head": cfg.dim_head},
    }  # fmt: skip
    return FrozenEncoder(
        name="csfm", modality="ecg", model=model, prepare=_csfm_prepare(cfg), d_enc=cfg.dim, max_tokens=1 + 12 * n,
        preprocessing=pre, weights_checksum=checksum, n_prefix=1, blocks="transformer.layers",
        after_blocks=("transformer.norm",),
    )  # fmt: skip
