"""The frozen encoder: one modality event's payload -> a sequence of N x d_enc embeddings.

An encoder is frozen (eval mode, no gradients, run under `torch.inference_mode`) and records its
preprocessing and a checksum of its weights, so an embedding store says exactly how it was made.
Payloads are what `mmehr.modalities.sources.load_payload` returns:

- ecg:  `(signal, fs)`: signal float32 (12, n_samples) in lead order I, II, III, aVR, aVL, aVF, V1..V6
        (mV), fs the sampling rate in Hz;
- cxr:  uint8 (H, W) grayscale image;
- note: str.

`encode(payloads) -> (emb (B, N, d_enc) float32, mask (B, N) bool)`. Valid tokens always come first
(mask is a prefix); the first `n_prefix` tokens are summary tokens (CLS) that pooling keeps apart.
"""

from __future__ import annotations

import dataclasses
import json
import math
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import torch
from torch import nn

MODALITIES = ("ecg", "cxr", "note")
ECG_LEADS = ("I", "II", "III", "aVR", "aVL", "aVF", "V1", "V2", "V3", "V4", "V5", "V6")


class FrozenEncoder:
    """A frozen encoder: `prepare` turns payloads into tensors, `model(**tensors) -> (emb, mask)`.

    Attributes: `name`, `modality`, `d_enc`, `max_tokens` (largest N), `n_prefix` (leading summary
    tokens), `preprocessing` (JSON-able), `weights_checksum` (sha256 of the weight files, or of the
    generated parameters of a weight-free encoder).

    For finetuning (`mmehr.modalities.finetune`): `blocks` is the dotted path in `model` of the ModuleList of
    transformer blocks ("" for encoders without any), `after_blocks` the modules that run after the last
    block (a final LayerNorm), and `payload_pad` the padding value of each prepared tensor that varies in
    length between payloads (token ids: the tokenizer's pad id; anything not named pads with 0).
    """

    def __init__(
        self,
        *,
        name: str,
        modality: str,
        model: nn.Module,
        prepare: Callable[[list], dict[str, torch.Tensor]],
        d_enc: int,
        max_tokens: int,
        preprocessing: dict[str, Any],
        weights_checksum: str,
        n_prefix: int = 0,
        check: Callable[[Any], Any] | None = None,
        blocks: str = "",
        after_blocks: tuple[str, ...] = (),
        payload_pad: dict[str, int | float] | None = None,
    ):
        assert modality in MODALITIES
        self.name, self.modality, self.d_enc, self.max_tokens = name, modality, d_enc, max_tokens
        self.n_prefix = n_prefix
        self._check = check
        self.blocks, self.after_blocks, self.payload_pad = (
            blocks,
            tuple(after_blocks),
            dict(payload_pad or {}),
        )
        self.preprocessing = json.loads(json.dumps(preprocessing))  # JSON-able, detached
        self.weights_checksum = weights_checksum
        self.model = model.eval().requires_grad_(False)
        self.prepare = prepare
        self.device = torch.device("cpu")

    def to(self, device: str | torch.device) -> FrozenEncoder:
        self.device = torch.device(device)
        self.model.to(self.device)
        return self

    def encode(self, payloads: Sequence) -> tuple[torch.Tensor, torch.Tensor]:
        """Payloads -> (emb (B, N, d_enc) float32, mask (B, N) bool, valid tokens first)."""
        if len(payloads) == 0:
            raise ValueError(f"encoder {self.name}: encode() needs at least one payload")
        payloads = [self.check_payload(p) for p in payloads]
        self.model.eval()
        with torch.inference_mode():
            inputs = {k: v.to(self.device) for k, v in self.prepare(payloads).items()}
            emb, mask = self.model(**inputs)
        return emb.float(), mask.bool()

    def check_payload(self, payload: Any) -> Any:
        """`check_payload(modality, payload)`, then what this encoder needs of it (e.g. ECG-FM: at least one
        whole segment); raises ValueError saying why a payload cannot be encoded."""
        payload = check_payload(self.modality, payload)
        return self._check(payload) if self._check is not None else payload

    def __repr__(self) -> str:
        return f"FrozenEncoder({self.name}, {self.modality}, N<={self.max_tokens}, d={self.d_enc})"


def check_payload(modality: str, payload: Any) -> Any:
    """Validate one payload of `modality`; return it normalised, or raise ValueError saying why."""
    if modality == "note":
        if not isinstance(payload, str):
            raise ValueError(f"note payload must be str, got {type(payload).__name__}")
        return payload
    if modality == "cxr":
        img = np.asarray(payload)
        if img.ndim != 2 or img.dtype != np.uint8 or min(img.shape) < 1:
            raise ValueError(
                f"cxr payload must be a uint8 (H, W) grayscale array, got {img.dtype} {img.shape}"
            )
        return img
    if not (isinstance(payload, tuple | list) and len(payload) == 2):
        raise ValueError("ecg payload must be a tuple (signal (12, n_samples), fs)")
    signal, fs = np.asarray(payload[0], dtype=np.float32), float(payload[1])
    if signal.ndim != 2 or signal.shape[0] != 12 or signal.shape[1] < 2:
        raise ValueError(f"ecg signal must be (12, n_samples) in lead order {ECG_LEADS}, got {signal.shape}")
    if not math.isfinite(fs) or fs <= 0:
        raise ValueError(f"ecg sampling rate must be positive, got {fs}")
    return np.nan_to_num(signal, nan=0.0, posinf=0.0, neginf=0.0), fs


class MissingWeightsError(FileNotFoundError):
    """A pretrained encoder's weights are not on this machine; the message says what to supply."""


def _config(cls: type, overrides: dict[str, Any], name: str) -> Any:
    fields = {f.name for f in dataclasses.fields(cls)}
    unknown = set(overrides) - fields
    if unknown:
        raise ValueError(f"encoder '{name}': unknown option(s) {sorted(unknown)}; known: {sorted(fields)}")
    return cls(**overrides)
