"""Frozen modality encoders: one modality event's payload -> a sequence of N x d_enc embeddings.

One concept per module:

- `base.py`: `FrozenEncoder`, `check_payload`, `MODALITIES`, `ECG_LEADS`, `MissingWeightsError`;
  the payload formats and the `encode` contract.
- `weights.py`: finding weights on disk (never downloading), safe checkpoint loading, state-dict
  helpers, checksums.
- `preprocess.py`: each encoder's preprocessing, reproducing its upstream's arithmetic (resampling,
  standardisation, segmenting for ECG; resize/crop/normalise for CXR).
- `text.py`: notes through transformers (bert, biomedbert, minilm).
- `cxr.py`: the timm-style ViT of BiomedCLIP (biomedclip) and transformers' ViT-MAE (vit-mae).
- `ecg_fm.py`: ECG-FM (wav2vec 2.0-style, fairseq-signals checkpoints).
- `csfm.py`: CSFM (ViT over 12 leads x 100 patches).
- `baselines.py`: the weight-free ecg-patch, cxr-patch and note-hash.
- `registry.py`: `EncoderInfo`, `REGISTRY`, `list_encoders`, `get_encoder`, and the table of encoders.

The names used elsewhere are re-exported here: `from mmehr.modalities.encoders import get_encoder`.
"""

from __future__ import annotations

from mmehr.modalities.encoders.base import (
    ECG_LEADS,
    MODALITIES,
    FrozenEncoder,
    MissingWeightsError,
    check_payload,
)
from mmehr.modalities.encoders.baselines import N_CXR_STATS, N_ECG_STATS, r_peaks
from mmehr.modalities.encoders.csfm import CSFM, CSFMConfig
from mmehr.modalities.encoders.cxr import ViT, ViTConfig
from mmehr.modalities.encoders.ecg_fm import ECGFM, ECGFMConfig, map_fairseq_ecg_state
from mmehr.modalities.encoders.preprocess import (
    fit_length,
    open_clip_image,
    resample,
    resample_fft,
    resample_linear,
    standardize_leads,
    vit_processor_image,
    zscore_leads,
)
from mmehr.modalities.encoders.registry import REGISTRY, EncoderInfo, get_encoder, list_encoders
from mmehr.modalities.encoders.weights import load_checkpoint

__all__ = [
    "CSFM",
    "ECGFM",
    "ECG_LEADS",
    "MODALITIES",
    "N_CXR_STATS",
    "N_ECG_STATS",
    "REGISTRY",
    "CSFMConfig",
    "ECGFMConfig",
    "EncoderInfo",
    "FrozenEncoder",
    "MissingWeightsError",
    "ViT",
    "ViTConfig",
    "check_payload",
    "fit_length",
    "get_encoder",
    "list_encoders",
    "load_checkpoint",
    "map_fairseq_ecg_state",
    "open_clip_image",
    "r_peaks",
    "resample",
    "resample_fft",
    "resample_linear",
    "standardize_leads",
    "vit_processor_image",
    "zscore_leads",
]
