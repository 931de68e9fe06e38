"""Signal and image preprocessing shared by the encoders: resampling, per-lead z-score, length
fitting (ECG) and normalised image tensors (CXR)."""

from __future__ import annotations

from collections.abc import Sequence
from fractions import Fraction

import numpy as np
import torch
import torch.nn.functional as F


def resample(signal: np.ndarray, fs: float, target_fs: float) -> np.ndarray:
    """Polyphase resampling of (L, n) from fs to target_fs Hz along time."""
    if abs(fs - target_fs) < 1e-6:
        return signal
    from scipy.signal import resample_poly

    ratio = Fraction(target_fs / fs).limit_denominator(1000)
    return resample_poly(signal, ratio.numerator, ratio.denominator, axis=1).astype(np.float32)


def zscore_leads(x: np.ndarray, eps: float = 1e-6) -> np.ndarray:
    """Per-lead z-score of (L, n); a constant (flat or missing) lead becomes 0."""
    mean = x.mean(axis=1, keepdims=True)
    std = x.std(axis=1, keepdims=True)
    return np.where(std > eps, (x - mean) / np.maximum(std, eps), 0.0).astype(np.float32)


def fit_length(x: np.ndarray, n: int) -> np.ndarray:
    """First n samples of (L, m); zero-padded at the end if shorter."""
    if x.shape[1] >= n:
        return x[:, :n]
    return np.pad(x, ((0, 0), (0, n - x.shape[1])))


def image_tensor(
    img: np.ndarray, *, size: int, mean: Sequence[float], std: Sequence[float], crop: bool
) -> torch.Tensor:
    """uint8 (H, W) -> normalised float (3, size, size), grayscale replicated to RGB.

    crop=True: shortest side to `size` (bicubic) then a centre crop (CLIP/open_clip style);
    crop=False: both sides to `size` (transformers' ViT image processor style).
    """
    x = torch.from_numpy(np.ascontiguousarray(img)).float().div_(255.0)[None, None]  # (1, 1, H, W)
    h, w = x.shape[-2:]
    if crop:
        scale = size / min(h, w)
        hh, ww = max(size, round(h * scale)), max(size, round(w * scale))
    else:
        hh, ww = size, size
    x = F.interpolate(x, size=(hh, ww), mode="bicubic", align_corners=False, antialias=True).clamp_(0, 1)
    top, left = (hh - size) // 2, (ww - size) // 2
    x = x[0, :, top : top + size, left : left + size].expand(3, size, size)
    m = torch.tensor(mean, dtype=torch.float32)[:, None, None]
    s = torch.tensor(std, dtype=torch.float32)[:, None, None]
    return (x - m) / s
