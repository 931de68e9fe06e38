"""ECG-FM: wav2vec 2.0-style (fairseq-signals), pure PyTorch; loads the fairseq-signals checkpoint."""

from __future__ import annotations

import ast
import dataclasses
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from mmehr.modalities.encoders.base import ECG_LEADS, FrozenEncoder, _config
from mmehr.modalities.encoders.preprocess import resample_linear, standardize_leads
from mmehr.modalities.encoders.weights import (
    _load_into,
    _resolve_file,
    _sha256_files,
    _sha256_module,
    _strip_prefix,
    read_checkpoint,
    state_dict_of,
)


@dataclasses.dataclass
class ECGFMConfig:
    """ECG-FM (REFERENCE.md §7). Field <- fairseq-signals `cfg["model"]` key: conv_feature_layers <- same,
    extractor_mode, conv_bias, conv_pos, conv_pos_groups, layer_norm_first <- same; dim <- encoder_embed_dim,
    depth <- encoder_layers, heads <- encoder_attention_heads, ffn_dim <- encoder_ffn_embed_dim."""

    fs: float = 500.0
    segment: int = 2500  # samples per 5-s segment
    max_segments: int = 2  # 10 s -> 2 x 156 tokens
    conv_feature_layers: str = "[(256, 2, 2)] * 4"  # fairseq's own string: [(channels, kernel, stride), ...]
    extractor_mode: str = "default"  # "default": GroupNorm after the first conv; "layer_norm": LN after each
    conv_bias: bool = False
    dim: int = 768
    depth: int = 12
    heads: int = 12
    ffn_dim: int = 3072
    conv_pos: int = 128
    conv_pos_groups: int = 16
    layer_norm_first: bool = False  # pre-LN layers and a final LayerNorm (True) or post-LN (False)

    @property
    def conv_layers(self) -> list[tuple[int, int, int]]:
        return parse_conv_layers(self.conv_feature_layers)


def parse_conv_layers(spec: str) -> list[tuple[int, int, int]]:
    """fairseq's `conv_feature_layers` string (a Python list expression, e.g. "[(256, 2, 2)] * 4" or
    "[(512, 10, 5)] + [(512, 3, 2)] * 4") -> [(channels, kernel, stride), ...], without eval."""

    def value(node: ast.AST):
        if isinstance(node, ast.Constant) and isinstance(node.value, int):
            return node.value
        if isinstance(node, ast.List | ast.Tuple):
            items = [value(e) for e in node.elts]
            return items if isinstance(node, ast.List) else tuple(items)
        if isinstance(node, ast.BinOp) and isinstance(node.op, ast.Mult | ast.Add):
            a, b = value(node.left), value(node.right)
            return a * b if isinstance(node.op, ast.Mult) else a + b
        raise ValueError(
            f"conv_feature_layers {spec!r}: only lists of (channels, kernel, stride), + and * are read"
        )

    try:
        layers = value(ast.parse(spec, mode="eval").body)
    except SyntaxError as e:
        raise ValueError(f"conv_feature_layers {spec!r} is not a Python list expression") from e
    if not (
        isinstance(layers, list) and layers and all(isinstance(t, tuple) and len(t) == 3 for t in layers)
    ):
        raise ValueError(
            f"conv_feature_layers {spec!r} must be a non-empty list of (channels, kernel, stride)"
        )
    return layers


class TransposeLast(nn.Module):
    def forward(self, x):
        return x.transpose(-2, -1)


class ConvFeatureExtractor(nn.Module):
    """(B, 12, n) -> (B, channels, T). Module indices mirror fairseq-signals (`conv_layers.i.0` = conv)."""

    def __init__(self, cfg: ECGFMConfig):
        super().__init__()
        layers, c_in = [], 12
        for i, (dim, kernel, stride) in enumerate(cfg.conv_layers):
            conv = nn.Conv1d(c_in, dim, kernel, stride=stride, bias=cfg.conv_bias)
            if cfg.extractor_mode == "layer_norm":
                norm = nn.Sequential(TransposeLast(), nn.LayerNorm(dim), TransposeLast())
                layers.append(nn.Sequential(conv, nn.Identity(), norm, nn.GELU()))
            elif i == 0:
                layers.append(nn.Sequential(conv, nn.Identity(), nn.GroupNorm(dim, dim), nn.GELU()))
            else:
                layers.append(nn.Sequential(conv, nn.Identity(), nn.GELU()))
            c_in = dim
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


class ECGFMLayer(nn.Module):
    """fairseq-signals' TransformerEncoderLayer: post-LN (LN after each residual add) or, with
    layer_norm_first, pre-LN (LN before attention and before the feed-forward)."""

    def __init__(self, cfg: ECGFMConfig):
        super().__init__()
        self.layer_norm_first = cfg.layer_norm_first
        self.self_attn = FairseqAttention(cfg.dim, cfg.heads)
        self.self_attn_layer_norm = nn.LayerNorm(cfg.dim)
        self.fc1, self.fc2 = nn.Linear(cfg.dim, cfg.ffn_dim), nn.Linear(cfg.ffn_dim, cfg.dim)
        self.final_layer_norm = nn.LayerNorm(cfg.dim)

    def forward(self, x):
        if self.layer_norm_first:
            x = x + self.self_attn(self.self_attn_layer_norm(x))
            return x + self.fc2(F.gelu(self.fc1(self.final_layer_norm(x))))
        x = self.self_attn_layer_norm(x + self.self_attn(x))
        return self.final_layer_norm(x + self.fc2(F.gelu(self.fc1(x))))


class ECGFMEncoder(nn.Module):
    """x + GELU(conv positional encoding (k, groups, 'same' length)), then the layers; the LayerNorm comes
    before the layers (post-LN model) or after them (pre-LN model), as in fairseq-signals."""

    def __init__(self, cfg: ECGFMConfig):
        super().__init__()
        self.k, self.layer_norm_first = cfg.conv_pos, cfg.layer_norm_first
        self.pos_conv = nn.Conv1d(
            cfg.dim, cfg.dim, cfg.conv_pos, padding=cfg.conv_pos // 2, groups=cfg.conv_pos_groups
        )
        self.layer_norm = nn.LayerNorm(cfg.dim)
        self.layers = nn.ModuleList([ECGFMLayer(cfg) for _ in range(cfg.depth)])

    def forward(self, x):
        pos = self.pos_conv(x.transpose(1, 2))
        if self.k % 2 == 0:  # fairseq's SamePad drops the extra step of an even kernel
            pos = pos[:, :, :-1]
        x = x + F.gelu(pos).transpose(1, 2)
        if not self.layer_norm_first:
            x = self.layer_norm(x)
        for layer in self.layers:
            x = layer(x)
        return self.layer_norm(x) if self.layer_norm_first else x


class ECGFM(nn.Module):
    """ECG-FM: one segment (S, 12, 2500) -> (S, 156, 768). forward() handles a batch of segments:

    segments (B, n_seg, 12, segment), segment_mask (B, n_seg) -> (emb (B, n_seg * T, D), mask (B, n_seg * T)).
    """

    def __init__(self, cfg: ECGFMConfig):
        super().__init__()
        conv_dim = cfg.conv_layers[-1][0]
        self.feature_extractor = ConvFeatureExtractor(cfg)
        self.layer_norm = nn.LayerNorm(conv_dim)
        # fairseq-signals has no projection when the conv features are already encoder-wide
        self.post_extract_proj = nn.Linear(conv_dim, cfg.dim) if conv_dim != cfg.dim else nn.Identity()
        self.encoder = ECGFMEncoder(cfg)

    def encode_segments(self, x):
        f = self.feature_extractor(x).transpose(1, 2)  # (S, T, conv_dim)
        return self.encoder(self.post_extract_proj(self.layer_norm(f)))  # (S, T, D)

    def forward(self, segments, segment_mask):
        B, S = segment_mask.shape
        out = self.encode_segments(segments[segment_mask])  # only real segments
        T, D = out.shape[1:]
        emb = out.new_zeros(B, S, T, D).index_put((segment_mask,), out)
        return emb.view(B, S * T, D), segment_mask[:, :, None].expand(B, S, T).reshape(B, S * T)


def _weight_norm(g: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """fairseq's weight_norm(dim=2): weight[:, :, k] = g[k] * v[:, :, k] / ||v[:, :, k]||."""
    return v * (g / v.norm(dim=(0, 1), keepdim=True))


# Pretraining-only tensors of a wav2vec 2.0 / CMSC checkpoint (masking, quantiser, contrastive heads):
# dropped on purpose. Any other tensor the encoder does not use fails loading.
ECGFM_DROPPED = (r"mask_emb", r"quantizer\..*", r"input_quantizer\..*", r"project_q\..*", r"project_inp\..*",
                 r"final_proj\..*", r"target_glu\..*")  # fmt: skip
# fairseq-signals cfg["model"] key -> ECGFMConfig field. The two marked REQUIRED are not readable from the
# tensors: a checkpoint without them needs them passed explicitly.
CFG_FIELDS = {"conv_feature_layers": "conv_feature_layers", "extractor_mode": "extractor_mode",
              "conv_bias": "conv_bias", "encoder_embed_dim": "dim", "encoder_layers": "depth",
              "encoder_attention_heads": "heads", "encoder_ffn_embed_dim": "ffn_dim", "conv_pos": "conv_pos",
              "conv_pos_groups": "conv_pos_groups", "layer_norm_first": "layer_norm_first"}  # fmt: skip
REQUIRED = {"layer_norm_first": "layer_norm_first", "heads": "encoder_attention_heads"}


def map_fairseq_ecg_state(state: dict[str, torch.Tensor], path: Path) -> dict[str, torch.Tensor]:
    """fairseq-signals wav2vec2 / ecg_transformer keys -> `ECGFM` keys.

    Handles any wrapping prefix (fine-tuned `encoder.`, `w2v_encoder.w2v_model.`: tensors outside it, the
    fine-tuning head, are left out), the positional conv in either place (`encoder.pos_conv.0.*` or
    `conv_pos.pos_conv.0.*`) and either weight-norm form (`weight_g`/`weight_v` or
    `parametrizations.weight.original0/1`); mmehr's own `ECGFM.state_dict()` loads as is. Every other key
    is kept as it is, so that loading can refuse what it does not know.
    """
    state = dict(_strip_prefix(state, "feature_extractor.conv_layers.0.0.weight", path))
    for base in ("encoder.pos_conv.0.", "conv_pos.pos_conv.0."):
        if base + "bias" not in state:
            continue
        state["encoder.pos_conv.bias"] = state.pop(base + "bias")
        if base + "weight_g" in state:
            g, v = state.pop(base + "weight_g"), state.pop(base + "weight_v")
            state["encoder.pos_conv.weight"] = _weight_norm(g, v)
        elif base + "parametrizations.weight.original0" in state:
            g = state.pop(base + "parametrizations.weight.original0")
            v = state.pop(base + "parametrizations.weight.original1")
            state["encoder.pos_conv.weight"] = _weight_norm(g, v)
        elif base + "weight" in state:
            state["encoder.pos_conv.weight"] = state.pop(base + "weight")
    return state


def checkpoint_model_cfg(obj: Any) -> dict[str, Any] | None:
    """The model config a fairseq(-signals) checkpoint was built from: `cfg["model"]` (a plain dict since
    fairseq's hydra era), else the legacy `args` Namespace's fields; None if neither is there."""
    if not isinstance(obj, dict):
        return None
    cfg = obj.get("cfg")
    if isinstance(cfg, dict) and isinstance(cfg.get("model"), dict):
        return cfg["model"]
    args = obj.get("args")
    state = getattr(args, "__dict__", {}).get("_state") if args is not None else None  # inert stand-in
    if isinstance(state, dict) and "encoder_embed_dim" in state:
        return state
    return None


def _from_cfg(model_cfg: dict[str, Any] | None, path: Path) -> dict[str, Any]:
    """ECGFMConfig values from a checkpoint's model cfg."""
    if model_cfg is None:
        return {}
    in_d = model_cfg.get("in_d", 12)
    if in_d != 12:
        raise ValueError(
            f"{path}: the checkpoint's model takes in_d={in_d} input leads; ECG-FM in mmehr takes 12"
        )
    return {field: model_cfg[key] for key, field in CFG_FIELDS.items() if key in model_cfg}


def _infer_ecg_fm(state: dict[str, torch.Tensor]) -> dict[str, Any]:
    """Sizes readable off a (mapped) ECG-FM state dict (not heads, LayerNorm placement or conv strides)."""
    needed = {
        "feature_extractor.conv_layers.0.0.weight",
        "encoder.layers.0.fc1.weight",
        "encoder.pos_conv.weight",
    }
    if not needed <= set(state):
        return {}  # loading will name what is missing
    dim, ffn = state["encoder.layers.0.fc1.weight"].shape[1], state["encoder.layers.0.fc1.weight"].shape[0]
    pos = state["encoder.pos_conv.weight"]  # (dim, dim / groups, conv_pos)
    return {
        "conv_bias": "feature_extractor.conv_layers.0.0.bias" in state,
        "extractor_mode": "layer_norm" if "feature_extractor.conv_layers.0.2.1.weight" in state else "default",
        "dim": dim, "ffn_dim": ffn, "depth": len({k.split(".")[2] for k in state if k.startswith("encoder.layers.")}),
        "conv_pos": pos.shape[2], "conv_pos_groups": dim // pos.shape[1],
    }  # fmt: skip


def _ecg_fm_check(cfg: ECGFMConfig) -> Callable[[Any], Any]:
    def check(payload):
        signal, fs = payload
        n = int(signal.shape[1] * (cfg.fs / fs))
        if n < cfg.segment:
            raise ValueError(
                f"ecg-fm: the record has {n} samples at {cfg.fs:g} Hz, shorter than one {cfg.segment}-sample "
                "segment; fairseq-signals keeps only whole segments, so it has no ECG-FM features"
            )
        return payload

    return check


def _ecg_fm_prepare(cfg: ECGFMConfig) -> Callable[[list], dict[str, torch.Tensor]]:
    def prepare(payloads: list) -> dict[str, torch.Tensor]:
        B, S = len(payloads), cfg.max_segments
        segments = np.zeros((B, S, 12, cfg.segment), dtype=np.float32)
        mask = np.zeros((B, S), dtype=bool)
        for i, (signal, fs) in enumerate(payloads):
            x = standardize_leads(resample_linear(signal, fs, cfg.fs))  # whole record, float64
            n = min(x.shape[1] // cfg.segment, S)  # whole segments from the start; check() ensures n >= 1
            segments[i, :n] = x[:, : n * cfg.segment].reshape(12, n, cfg.segment).transpose(1, 0, 2)
            mask[i, :n] = True
        return {"segments": torch.from_numpy(segments), "segment_mask": torch.from_numpy(mask)}

    return prepare


def _build_ecg_fm(weights=None, *, random_init: bool = False, **overrides) -> FrozenEncoder:
    path, state, source = None, None, "random_init and its options"
    values = dict(overrides)
    if not random_init:
        how = (
            "Pass `--weights /path/to/mimic_iv_ecg_physionet_pretrained.pt` (ECG-FM's pretrained checkpoint from "
            "the Hugging Face repo wanglab/ecg-fm; fairseq-signals is not needed), or put that repo in the Hugging "
            "Face cache."
        )
        path = _resolve_file(
            "ecg-fm", weights, ("mimic_iv_ecg_physionet_pretrained.pt",), "wanglab/ecg-fm", how
        )
        obj = read_checkpoint(path)
        state = map_fairseq_ecg_state(state_dict_of(obj, path), path)
        from_cfg = _from_cfg(checkpoint_model_cfg(obj), path)
        clash = {k: (v, from_cfg[k]) for k, v in overrides.items() if k in from_cfg and from_cfg[k] != v}
        if clash:
            raise ValueError(
                f"{path}: option(s) contradict the checkpoint's cfg['model']: "
                + ", ".join(f"{k}={v!r} but the checkpoint says {c!r}" for k, (v, c) in clash.items())
            )
        lacking = [f for f in REQUIRED if f not in from_cfg and f not in overrides]
        if lacking:
            raise ValueError(
                f"{path}: the checkpoint has no cfg['model'] with {', '.join(REQUIRED[f] for f in lacking)}, "
                "which fairseq-signals stores there and which cannot be read from the tensors. Pass them: "
                "get_encoder('ecg-fm', weights=..., layer_norm_first=True|False, heads=N), or "
                "`mmehr encode --encoder ecg-fm --set layer_norm_first=true heads=12`, and conv_feature_layers "
                "if it is not ECG-FM's '[(256, 2, 2)] * 4' (strides are not in the tensors either)"
            )
        values = {**_infer_ecg_fm(state), **from_cfg, **overrides}
        source = "the checkpoint's cfg['model']" if from_cfg else "options given with the checkpoint"
    cfg = _config(ECGFMConfig, values, "ecg-fm")
    torch.manual_seed(0)
    model = ECGFM(cfg)
    if random_init:
        checksum = _sha256_module(model, "random-init")
    else:
        _load_into(model, state, path, dropped=ECGFM_DROPPED)
        checksum = _sha256_files([path])
    T = cfg.segment
    for _, kernel, stride in cfg.conv_layers:
        T = (T - kernel) // stride + 1
    pre = {
        "reproduces": "fairseq-signals scripts/preprocess/ecg/preprocess.py: resample, standardize, segment",
        "leads": list(ECG_LEADS), "fs_hz": cfg.fs, "resample": "linear interpolation (fairseq-signals resample), float64",
        "normalise": "per lead over the whole record: mean removed, / population std; std == 0 -> 0",
        "segment_samples": cfg.segment, "max_segments": cfg.max_segments,
        "segments": "whole segments from the start (the remainder dropped), at most max_segments; a record shorter "
                    "than one segment has no features (skipped)",
        "tokens_per_segment": T, "output": "transformer output per segment, concatenated in time order",
        "architecture": {k: getattr(cfg, k) for k in ("layer_norm_first", "heads", "dim", "depth", "ffn_dim",
                                                      "conv_feature_layers", "conv_pos", "conv_pos_groups")},
        "architecture_from": source,
    }  # fmt: skip
    return FrozenEncoder(
        name="ecg-fm", modality="ecg", model=model, prepare=_ecg_fm_prepare(cfg), d_enc=cfg.dim,
        max_tokens=cfg.max_segments * T, preprocessing=pre, weights_checksum=checksum, n_prefix=0,
        check=_ecg_fm_check(cfg), blocks="encoder.layers",
        after_blocks=("encoder.layer_norm",) if cfg.layer_norm_first else (),
    )  # fmt: skip
