"""Weight-free baselines: ecg-patch, cxr-patch and note-hash.

The three weight-free baselines are the demo's encoders and the "weak encoder" of the ablations.
They are deterministic across machines (numpy's frozen `RandomState` stream) and fast on a CPU, and
each keeps coarse information a downstream model can learn from:

- `ecg-patch`: 1-s patches of all 12 z-scored leads at 100 Hz through a fixed random projection
  (morphology), plus 8 statistics per token: heart rate, RR irregularity (coefficient of variation and
  mean successive difference), global and per-patch amplitude in mV (lost by z-scoring otherwise),
  beats in the patch, patch position, and the fraction of flat leads.
- `cxr-patch`: the image box-averaged to 64x64, an 8x8 grid of 8x8-pixel patches; the mean-removed
  pixels through a fixed random projection (texture/edges) plus 8 statistics per patch: brightness,
  contrast, brightness relative to the image, row/column position, image mean and contrast, and the
  fraction of bright pixels, so a large bright region (an opacity) shows in the tokens that cover it.
- `note-hash`: lower-cased words hashed (crc32, seeded) into 2^16 buckets of a fixed random table; a
  leading document token; word identity survives (up to rare collisions), word order only as token
  position. The first 256 words are kept.
"""

from __future__ import annotations

import dataclasses
import math
import re
import zlib
from collections.abc import Callable
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from mmehr.modalities.encoders.base import ECG_LEADS, FrozenEncoder, _config
from mmehr.modalities.encoders.preprocess import fit_length, resample, zscore_leads
from mmehr.modalities.encoders.weights import _sha256_module


def _no_weights(name: str, weights: Any) -> None:
    if weights is not None:
        raise ValueError(f"encoder '{name}' is weight-free; it takes no weights (got {weights})")


def _projection(seed: int, n_in: int, n_out: int) -> torch.Tensor:
    """A fixed Gaussian projection, identical on every machine (numpy's frozen RandomState stream)."""
    w = np.random.RandomState(seed).standard_normal((n_in, n_out)) / math.sqrt(n_in)
    return torch.from_numpy(w.astype(np.float32))


class PatchProjection(nn.Module):
    """patches (B, N, P) @ W (P, d - S) concatenated with statistics (B, N, S) -> (B, N, d)."""

    def __init__(self, weight: torch.Tensor):
        super().__init__()
        self.register_buffer("weight", weight)

    def forward(self, patches, stats, mask):
        return torch.cat([patches @ self.weight, stats], dim=-1), mask


# --------------------------------------------------------------------------------------------------
# ecg-patch


@dataclasses.dataclass
class ECGPatchConfig:
    fs: float = 100.0
    seconds: float = 10.0
    patch_seconds: float = 1.0
    d: int = 128
    seed: int = 0


N_ECG_STATS = 8


def r_peaks(z: np.ndarray, fs: float) -> np.ndarray:
    """R-peak sample indices of z-scored leads (12, n): peaks of the summed absolute slope."""
    from scipy.signal import find_peaks

    env = np.convolve(np.abs(np.diff(z, axis=1)).sum(axis=0), np.ones(3) / 3, mode="same")
    if env.max() <= 0:
        return np.zeros(0, dtype=int)
    peaks, _ = find_peaks(env, height=0.4 * np.percentile(env, 99.5), distance=max(1, int(0.25 * fs)))
    return peaks


def _ecg_patch_prepare(cfg: ECGPatchConfig) -> Callable[[list], dict[str, torch.Tensor]]:
    n, p = int(cfg.seconds * cfg.fs), int(cfg.patch_seconds * cfg.fs)
    P = n // p

    def features(signal: np.ndarray, fs: float):
        x = resample(signal, fs, cfg.fs)
        valid = int(np.clip(math.ceil(x.shape[1] / p), 1, P))
        x = fit_length(x, n)
        amp = np.percentile(x, 99, axis=1) - np.percentile(x, 1, axis=1)  # per lead, mV
        z = zscore_leads(x)
        peaks = r_peaks(z[:, : valid * p], cfg.fs)
        rr = np.diff(peaks) / cfg.fs
        hr = 60.0 / np.median(rr) if len(rr) >= 1 else 0.0
        cv = rr.std() / rr.mean() if len(rr) >= 2 else 0.0
        sd = np.abs(np.diff(rr)).mean() / rr.mean() if len(rr) >= 3 else 0.0
        patches = z.reshape(12, P, p).transpose(1, 0, 2).reshape(P, 12 * p)
        raw = x.reshape(12, P, p)
        stats = np.zeros((P, N_ECG_STATS), dtype=np.float32)
        stats[:, 0], stats[:, 1], stats[:, 2] = hr / 100.0, cv, sd
        stats[:, 3] = np.log1p(amp.mean())
        stats[:, 4] = np.log1p((raw.max(axis=2) - raw.min(axis=2)).mean(axis=0))
        stats[:, 5] = np.bincount(peaks // p, minlength=P)[:P] / (2.0 * cfg.patch_seconds)
        stats[:, 6] = np.arange(P) / max(P - 1, 1)
        stats[:, 7] = (x.std(axis=1) < 1e-6).mean()
        mask = np.arange(P) < valid
        return patches, stats, mask

    def prepare(payloads: list) -> dict[str, torch.Tensor]:
        parts = [features(signal, fs) for signal, fs in payloads]
        return {
            k: torch.from_numpy(np.stack([f[i] for f in parts]))
            for i, k in enumerate(("patches", "stats", "mask"))
        }

    return prepare


def _build_ecg_patch(weights=None, **overrides) -> FrozenEncoder:
    _no_weights("ecg-patch", weights)
    cfg = _config(ECGPatchConfig, overrides, "ecg-patch")
    p, P = int(cfg.patch_seconds * cfg.fs), int(cfg.seconds * cfg.fs) // int(cfg.patch_seconds * cfg.fs)
    model = PatchProjection(_projection(cfg.seed, 12 * p, cfg.d - N_ECG_STATS))
    pre = {
        "leads": list(ECG_LEADS), "fs_hz": cfg.fs, "seconds": cfg.seconds, "patch_seconds": cfg.patch_seconds,
        "normalise": "per-lead z-score (flat lead -> 0)", "projection": f"fixed Gaussian, seed {cfg.seed}",
        "stats": ["heart_rate/100", "rr_cv", "rr_successive_diff/mean_rr", "log1p(amplitude_mv)",
                  "log1p(patch_amplitude_mv)", "beats_in_patch/2", "patch_position", "flat_lead_fraction"],
    }  # fmt: skip
    return FrozenEncoder(
        name="ecg-patch", modality="ecg", model=model, prepare=_ecg_patch_prepare(cfg), d_enc=cfg.d, max_tokens=P,
        preprocessing=pre, weights_checksum=_sha256_module(model, "weight-free"), n_prefix=0,
    )  # fmt: skip


# --------------------------------------------------------------------------------------------------
# cxr-patch


@dataclasses.dataclass
class CXRPatchConfig:
    grid: int = 8  # grid x grid tokens
    patch: int = 8  # pixels per patch side after box-averaging to grid * patch
    d: int = 128
    seed: int = 0


N_CXR_STATS = 8


def _cxr_patch_prepare(cfg: CXRPatchConfig) -> Callable[[list], dict[str, torch.Tensor]]:
    side = cfg.grid * cfg.patch
    rows, cols = torch.meshgrid(torch.arange(cfg.grid), torch.arange(cfg.grid), indexing="ij")
    pos = torch.stack([rows.flatten(), cols.flatten()], -1).float() / max(cfg.grid - 1, 1)  # (N, 2)

    def prepare(images: list[np.ndarray]) -> dict[str, torch.Tensor]:
        from PIL import Image

        boxed = [
            np.asarray(Image.fromarray(np.ascontiguousarray(im)).resize((side, side), Image.BOX))
            for im in images
        ]
        small = (
            torch.from_numpy(np.stack(boxed)).float().div_(255.0)[:, None]
        )  # (B, 1, side, side), area-averaged
        patches = F.unfold(small, cfg.patch, stride=cfg.patch).transpose(1, 2)  # (B, N, patch^2)
        g_mean, g_std = small.mean(dim=(1, 2, 3))[:, None], small.std(dim=(1, 2, 3))[:, None]  # (B, 1)
        mean, std = patches.mean(-1), patches.std(-1)  # (B, N)
        bright = (patches > (g_mean + g_std)[..., None]).float().mean(-1)
        B, N = mean.shape
        stats = torch.stack(
            [mean, std, mean - g_mean, pos[:, 0].expand(B, N), pos[:, 1].expand(B, N), g_mean.expand(B, N),
             g_std.expand(B, N), bright], dim=-1,
        )  # fmt: skip
        return {
            "patches": patches - mean[..., None],
            "stats": stats,
            "mask": torch.ones(B, N, dtype=torch.bool),
        }

    return prepare


def _build_cxr_patch(weights=None, **overrides) -> FrozenEncoder:
    _no_weights("cxr-patch", weights)
    cfg = _config(CXRPatchConfig, overrides, "cxr-patch")
    model = PatchProjection(_projection(cfg.seed, cfg.patch**2, cfg.d - N_CXR_STATS))
    pre = {
        "image": "uint8 grayscale -> [0, 1]", "resize": f"box average to {cfg.grid * cfg.patch}x{cfg.grid * cfg.patch}",
        "tokens": f"{cfg.grid}x{cfg.grid} patches of {cfg.patch}x{cfg.patch}, row-major",
        "projection": f"mean-removed pixels, fixed Gaussian, seed {cfg.seed}",
        "stats": ["patch_mean", "patch_std", "patch_mean - image_mean", "row", "col", "image_mean", "image_std",
                  "bright_fraction (> image mean + 1 sd)"],
    }  # fmt: skip
    return FrozenEncoder(
        name="cxr-patch", modality="cxr", model=model, prepare=_cxr_patch_prepare(cfg), d_enc=cfg.d,
        max_tokens=cfg.grid**2, preprocessing=pre, weights_checksum=_sha256_module(model, "weight-free"), n_prefix=0,
    )  # fmt: skip


# --------------------------------------------------------------------------------------------------
# note-hash


@dataclasses.dataclass
class NoteHashConfig:
    buckets: int = 1 << 16
    d: int = 128
    max_words: int = 256
    seed: int = 0


WORD = re.compile(r"[a-z0-9]+")


class HashedEmbedding(nn.Module):
    """ids (B, N) -> table rows (B, N, d); id 0 is the document token."""

    def __init__(self, table: torch.Tensor):
        super().__init__()
        self.register_buffer("table", table)

    def forward(self, ids, mask):
        return self.table[ids], mask


def _build_note_hash(weights=None, **overrides) -> FrozenEncoder:
    _no_weights("note-hash", weights)
    cfg = _config(NoteHashConfig, overrides, "note-hash")
    table = np.random.RandomState(cfg.seed).standard_normal((cfg.buckets, cfg.d)).astype(np.float32)
    model = HashedEmbedding(torch.from_numpy(table))

    def prepare(texts: list[str]) -> dict[str, torch.Tensor]:
        rows = [
            [0]
            + [
                1 + zlib.crc32(w.encode(), cfg.seed) % (cfg.buckets - 1)
                for w in WORD.findall(t.lower())[: cfg.max_words]
            ]
            for t in texts
        ]
        N = max(len(r) for r in rows)
        ids = torch.zeros(len(rows), N, dtype=torch.long)
        mask = torch.zeros(len(rows), N, dtype=torch.bool)
        for i, r in enumerate(rows):
            ids[i, : len(r)], mask[i, : len(r)] = torch.tensor(r), True
        return {"ids": ids, "mask": mask}

    pre = {
        "tokenize": "lower-case, words [a-z0-9]+", "max_words": cfg.max_words, "hash": f"crc32 seeded {cfg.seed}",
        "buckets": cfg.buckets, "table": f"fixed Gaussian, seed {cfg.seed}", "prefix": "one document token",
    }  # fmt: skip
    return FrozenEncoder(
        name="note-hash", modality="note", model=model, prepare=prepare, d_enc=cfg.d, max_tokens=1 + cfg.max_words,
        preprocessing=pre, weights_checksum=_sha256_module(model, "weight-free"), n_prefix=1,
    )  # fmt: skip
