"""Signal and image preprocessing of the encoders, each written to reproduce its upstream's arithmetic:

| function               | reproduces                                                                        |
|------------------------|-----------------------------------------------------------------------------------|
| `resample_linear`      | fairseq-signals `scripts/preprocess/ecg/preprocess.py::resample` (ECG-FM)         |
| `standardize_leads`    | fairseq-signals `preprocess_mat` standardize, constant_lead_strategy "zero"       |
| `resample_fft`         | CSFM `utils/preprocess.py::preprocess_ecg` (`scipy.signal.resample`)              |
| `open_clip_image`      | open_clip's eval transform (torchvision Resize + CenterCrop on a PIL image)       |
| `vit_processor_image`  | transformers' `ViTImageProcessor` (PIL resize, rescale, normalise)                |

`resample` (polyphase), `zscore_leads` and `fit_length` serve the weight-free baselines, which have no
upstream. Signals are (leads, samples) arrays in mV; sampling rates in Hz.
"""

from __future__ import annotations

from collections.abc import Sequence
from fractions import Fraction

import numpy as np
import torch


def resample(signal: np.ndarray, fs: float, target_fs: float) -> np.ndarray:
    """Polyphase resampling of (L, n) from fs to target_fs Hz along time (the baselines' resampler)."""
    if abs(fs - target_fs) < 1e-6:
        return signal
    from scipy.signal import resample_poly

    ratio = Fraction(target_fs / fs).limit_denominator(1000)
    return resample_poly(signal, ratio.numerator, ratio.denominator, axis=1).astype(np.float32)


def resample_linear(signal: np.ndarray, fs: float, target_fs: float) -> np.ndarray:
    """fairseq-signals' resampler, float64: int(n * target_fs / fs) samples by linear interpolation, the n
    input samples placed on linspace(0, size - 1, n) (so the first and last samples are kept)."""
    x = np.asarray(signal, dtype=np.float64)
    if fs == target_fs:
        return x
    size = int(x.shape[-1] * (target_fs / fs))
    grid = np.linspace(0, size - 1, x.shape[-1])
    out = np.arange(size)
    return np.stack([np.interp(out, grid, lead) for lead in x])  # = scipy interp1d(kind="linear")


def standardize_leads(x: np.ndarray) -> np.ndarray:
    """fairseq-signals' per-lead standardisation, float64: mean removed, divided by the (population) std;
    a lead whose std is exactly 0 becomes 0 (its default constant_lead_strategy "zero")."""
    x = np.asarray(x, dtype=np.float64)
    x = x - x.mean(axis=1, keepdims=True)
    std = x.std(axis=1, keepdims=True)
    return np.where(std == 0, 0.0, x / np.where(std == 0, 1.0, std))


def resample_fft(signal: np.ndarray, fs: float, target_fs: float) -> np.ndarray:
    """CSFM's resampler, float64: `scipy.signal.resample(x, int(n * target_fs / fs), axis=1)` (FFT)."""
    x = np.asarray(signal, dtype=np.float64)
    if fs == target_fs:
        return x
    from scipy.signal import resample as fft_resample

    return fft_resample(x, int(x.shape[1] * target_fs / fs), axis=1)


def zscore_leads(x: np.ndarray, eps: float = 1e-6) -> np.ndarray:
    """Per-lead z-score of (L, n); a constant (flat or missing) lead becomes 0 (the baselines' rule)."""
    mean = x.mean(axis=1, keepdims=True)
    std = x.std(axis=1, keepdims=True)
    return np.where(std > eps, (x - mean) / np.maximum(std, eps), 0.0).astype(np.float32)


def fit_length(x: np.ndarray, n: int) -> np.ndarray:
    """First n samples of (L, m); zero-padded at the end if shorter."""
    if x.shape[1] >= n:
        return x[:, :n]
    return np.pad(x, ((0, 0), (0, n - x.shape[1])))


def _to_tensor_normalised(grey: np.ndarray, mean: Sequence[float], std: Sequence[float]) -> torch.Tensor:
    """uint8 (H, W) grey -> (3, H, W) float32 as torchvision's ToTensor (/255) then Normalize(mean, std)."""
    x = torch.from_numpy(np.ascontiguousarray(grey)).float().div(255)
    x = x.expand(3, *x.shape)
    m = torch.tensor(mean, dtype=torch.float32)[:, None, None]
    s = torch.tensor(std, dtype=torch.float32)[:, None, None]
    return (x - m) / s


def open_clip_image(
    img: np.ndarray, *, size: int, mean: Sequence[float], std: Sequence[float]
) -> torch.Tensor:
    """open_clip's eval transform (BiomedCLIP): uint8 (H, W) grey -> (3, size, size) float32.

    torchvision's Resize(size, bicubic) on the PIL image: the short side becomes `size`, the long side
    int(size * long / short) (truncated); PIL's bicubic filter on uint8. Then CenterCrop(size) with offsets
    round((h - size) / 2) (Python's rounding; the resized image is never smaller
    than the crop), RGB, /255, Normalize.
    """
    from PIL import Image

    pil = Image.fromarray(np.ascontiguousarray(img), mode="L")
    w, h = pil.size
    short, long = (w, h) if w <= h else (h, w)
    new_short, new_long = size, int(size * long / short)
    new_w, new_h = (new_short, new_long) if w <= h else (new_long, new_short)
    if (new_w, new_h) != (w, h):
        pil = pil.resize((new_w, new_h), Image.Resampling.BICUBIC)
    x = np.array(pil)  # a writable copy
    top, left = (
        round((x.shape[0] - size) / 2.0),
        round((x.shape[1] - size) / 2.0),
    )  # Python's round, as torchvision
    return _to_tensor_normalised(x[top : top + size, left : left + size], mean, std)


# PIL resampling filters by the integer code transformers stores in preprocessor_config.json.
PIL_FILTERS = {0: "NEAREST", 1: "LANCZOS", 2: "BILINEAR", 3: "BICUBIC", 4: "BOX", 5: "HAMMING"}


def vit_processor_image(
    img: np.ndarray,
    *,
    height: int,
    width: int,
    resample: int,
    mean: Sequence[float],
    std: Sequence[float],
    do_resize: bool = True,
    rescale_factor: float = 1 / 255,
    do_rescale: bool = True,
    do_normalize: bool = True,
) -> torch.Tensor:
    """transformers' ViTImageProcessor on a grey image given as RGB: uint8 (H, W) -> (3, height, width).

    PIL resize of the uint8 image to (width, height) with filter `resample` (PIL code), then x *
    rescale_factor (in float64, cast to float32, as transformers' `rescale`), then (x - mean) / std.
    """
    from PIL import Image

    if resample not in PIL_FILTERS:
        raise ValueError(f"unknown PIL resample filter {resample}; known: {PIL_FILTERS}")
    x = np.ascontiguousarray(img)
    if do_resize and x.shape != (height, width):
        pil = Image.fromarray(x, mode="L").convert("RGB")  # transformers resizes the RGB image
        x = np.asarray(pil.resize((width, height), Image.Resampling[PIL_FILTERS[resample]]))[..., 0]
    y = x.astype(np.float64) * rescale_factor if do_rescale else x.astype(np.float64)
    t = torch.from_numpy(y.astype(np.float32)).expand(3, *y.shape)
    if not do_normalize:
        return t.clone()
    m = torch.tensor(mean, dtype=torch.float32)[:, None, None]
    s = torch.tensor(std, dtype=torch.float32)[:, None, None]
    return (t - m) / s
