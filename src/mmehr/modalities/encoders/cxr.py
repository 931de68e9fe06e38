"""CXR: a timm-style ViT (BiomedCLIP's vision tower, biomedclip) and transformers' ViT-MAE (vit-mae)."""

from __future__ import annotations

import dataclasses
import json
import math
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from mmehr.modalities.encoders.base import FrozenEncoder, _config
from mmehr.modalities.encoders.preprocess import PIL_FILTERS, open_clip_image, vit_processor_image
from mmehr.modalities.encoders.text import _hf_blocks, _quiet_transformers
from mmehr.modalities.encoders.weights import (
    _hf_from_pretrained,
    _load_into,
    _resolve_dir,
    _resolve_file,
    _sha256_files,
    _sha256_module,
    _strip_prefix,
    load_checkpoint,
)


@dataclasses.dataclass
class ViTConfig:
    """timm `vit_base_patch16_224` by default (BiomedCLIP's vision trunk)."""

    image_size: int = 224
    patch_size: int = 16
    dim: int = 768
    depth: int = 12
    heads: int = 12
    mlp_ratio: float = 4.0
    eps: float = 1e-6
    mean: tuple[float, float, float] = (0.48145466, 0.4578275, 0.40821073)  # open_clip / BiomedCLIP
    std: tuple[float, float, float] = (0.26862954, 0.26130258, 0.27577711)


class ViTAttention(nn.Module):
    def __init__(self, dim: int, heads: int):
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x):
        B, T, C = x.shape
        q, k, v = (
            self.qkv(x).view(B, T, 3, self.heads, C // self.heads).permute(2, 0, 3, 1, 4)
        )  # (B, nh, T, hs)
        y = F.scaled_dot_product_attention(q, k, v)
        return self.proj(y.transpose(1, 2).reshape(B, T, C))


class ViTMlp(nn.Module):
    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.fc1, self.act, self.fc2 = nn.Linear(dim, hidden), nn.GELU(), nn.Linear(hidden, dim)

    def forward(self, x):
        return self.fc2(self.act(self.fc1(x)))


class ViTBlock(nn.Module):
    def __init__(self, cfg: ViTConfig):
        super().__init__()
        self.norm1 = nn.LayerNorm(cfg.dim, eps=cfg.eps)
        self.attn = ViTAttention(cfg.dim, cfg.heads)
        self.norm2 = nn.LayerNorm(cfg.dim, eps=cfg.eps)
        self.mlp = ViTMlp(cfg.dim, int(cfg.dim * cfg.mlp_ratio))

    def forward(self, x):
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class PatchEmbed(nn.Module):
    def __init__(self, cfg: ViTConfig):
        super().__init__()
        self.proj = nn.Conv2d(3, cfg.dim, cfg.patch_size, stride=cfg.patch_size)

    def forward(self, x):
        return self.proj(x).flatten(2).transpose(1, 2)  # (B, L, D)


class ViT(nn.Module):
    """A timm VisionTransformer with timm's parameter names, so `visual.trunk.*` of open_clip loads.

    forward(pixels (B, 3, S, S)) -> (tokens (B, 1 + L, D) = timm's forward_features, mask (B, 1 + L)).
    """

    def __init__(self, cfg: ViTConfig):
        super().__init__()
        n_patches = (cfg.image_size // cfg.patch_size) ** 2
        self.patch_embed = PatchEmbed(cfg)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, cfg.dim))
        self.pos_embed = nn.Parameter(torch.randn(1, 1 + n_patches, cfg.dim) * 0.02)
        self.blocks = nn.ModuleList([ViTBlock(cfg) for _ in range(cfg.depth)])
        self.norm = nn.LayerNorm(cfg.dim, eps=cfg.eps)

    def forward_features(self, pixels):
        x = self.patch_embed(pixels)
        x = torch.cat([self.cls_token.expand(x.shape[0], -1, -1), x], dim=1) + self.pos_embed  # (B, 1+L, D)
        for block in self.blocks:
            x = block(x)
        return self.norm(x)

    def forward(self, pixels):
        x = self.forward_features(pixels)
        return x, torch.ones(x.shape[:2], dtype=torch.bool, device=x.device)


def _open_clip_prepare(size: int, mean, std) -> Callable[[list], dict[str, torch.Tensor]]:
    def prepare(images: list[np.ndarray]) -> dict[str, torch.Tensor]:
        return {"pixels": torch.stack([open_clip_image(im, size=size, mean=mean, std=std) for im in images])}

    return prepare


def _infer_vit(state: dict[str, torch.Tensor] | None) -> dict[str, Any]:
    """Architecture sizes read off a timm ViT state dict (heads: 64 per head, as in every ViT-B)."""
    if state is None or not {"patch_embed.proj.weight", "pos_embed", "blocks.0.mlp.fc1.weight"} <= set(state):
        return {}  # loading will name what is missing
    dim, _, patch, _ = state["patch_embed.proj.weight"].shape
    side = round(math.sqrt(state["pos_embed"].shape[1] - 1)) * patch
    depth = len({k.split(".")[1] for k in state if k.startswith("blocks.")})
    mlp = state["blocks.0.mlp.fc1.weight"].shape[0] / dim
    return {
        "dim": dim,
        "patch_size": patch,
        "image_size": side,
        "depth": depth,
        "mlp_ratio": mlp,
        "heads": max(1, dim // 64),
    }


# Tensors of an open_clip checkpoint that BiomedCLIP's token features do not use: the text tower, the
# contrastive temperature/bias, the vision tower's projection head (pooled embedding) and a timm
# classifier head. Anything else that the ViT does not use fails loading.
BIOMEDCLIP_DROPPED = (r"text\..*", r"logit_scale", r"logit_bias", r"visual\.head\..*", r"head\..*")


def _build_biomedclip(weights=None, *, random_init: bool = False, **overrides) -> FrozenEncoder:
    repo = "microsoft/BiomedCLIP-PubMedBERT_256-vit_base_patch16_224"
    files = ("open_clip_pytorch_model.bin", "open_clip_model.safetensors")
    path = None
    if not random_init:
        how = (
            f"Pass `--weights /path/to/open_clip_pytorch_model.bin` (from the Hugging Face repo {repo}; its "
            "`visual.trunk.*` weights load into mmehr's own ViT, so open_clip/timm are not needed), or put the "
            "repo in the Hugging Face cache."
        )
        path = _resolve_file("biomedclip", weights, files, repo, how)
    state = None
    if not random_init:
        state = load_checkpoint(path)
        if any(k.startswith("visual.trunk.") for k in state):  # open_clip: the trunk, and what is left out
            state = {k.removeprefix("visual.trunk."): v for k, v in state.items()}
        else:  # a bare timm ViT state dict (any wrapping prefix)
            state = _strip_prefix(state, "patch_embed.proj.weight", path)
    cfg = _config(ViTConfig, {**_infer_vit(state), **overrides}, "biomedclip")
    torch.manual_seed(0)
    model = ViT(cfg)
    if random_init:
        checksum = _sha256_module(model, "random-init")
    else:
        _load_into(model, state, path, dropped=BIOMEDCLIP_DROPPED)
        checksum = _sha256_files([path])
    n = (cfg.image_size // cfg.patch_size) ** 2 + 1
    pre = {
        "reproduces": "open_clip eval transform (torchvision Resize + CenterCrop on a PIL image)",
        "image": "uint8 grey PIL image (mode L)",
        "resize": f"short side {cfg.image_size}, long side int({cfg.image_size} * long / short); PIL bicubic on uint8",
        "crop": f"centre {cfg.image_size}, offsets int(round((side - {cfg.image_size}) / 2))",
        "to_tensor": "/255, grey copied to 3 channels", "mean": list(cfg.mean), "std": list(cfg.std),
        "architecture": {"dim": cfg.dim, "depth": cfg.depth, "heads": cfg.heads, "patch": cfg.patch_size},
        "output": "ViT forward_features: CLS + patch tokens (not the pooled embedding)",
    }  # fmt: skip
    return FrozenEncoder(
        name="biomedclip", modality="cxr", model=model, prepare=_open_clip_prepare(cfg.image_size, cfg.mean, cfg.std),
        d_enc=cfg.dim, max_tokens=n, preprocessing=pre, weights_checksum=checksum, n_prefix=1, blocks="blocks",
        after_blocks=("norm",),
    )  # fmt: skip


# --------------------------------------------------------------------------------------------------
# ViT-MAE (transformers), masking off


class MAEUnmasked(nn.Module):
    """transformers' ViTMAEModel with masking off AND patch order kept: noise = arange(L)."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, pixels):
        B = pixels.shape[0]
        L = self.model.embeddings.patch_embeddings.num_patches
        noise = torch.arange(L, device=pixels.device, dtype=torch.float32).expand(B, L)  # argsort -> identity
        x = self.model(pixel_values=pixels, noise=noise).last_hidden_state  # (B, 1 + L, D)
        return x, torch.ones(x.shape[:2], dtype=torch.bool, device=x.device)


@dataclasses.dataclass
class MAESizes:
    image_size: int = 224
    patch_size: int = 16
    hidden_size: int = 768
    num_hidden_layers: int = 12
    num_attention_heads: int = 12
    intermediate_size: int = 3072


# ViTImageProcessor's settings as facebook/vit-mae-base's preprocessor_config.json gives them; used only by
# random_init (a real checkpoint directory must carry its own preprocessor_config.json).
MAE_PROCESSOR = {"do_resize": True, "size": {"height": 224, "width": 224}, "resample": 3, "do_rescale": True,
                 "rescale_factor": 1 / 255, "do_normalize": True, "image_mean": [0.485, 0.456, 0.406],
                 "image_std": [0.229, 0.224, 0.225]}  # fmt: skip
MAE_DROPPED = (r"decoder\..*",)  # ViTMAEForPreTraining's pixel decoder: pretraining only


def _processor_settings(path: Path | None) -> dict[str, Any]:
    """ViTImageProcessor's settings from `path/preprocessor_config.json`, with its class defaults for what
    the file leaves out; fails if the file is missing or asks for something ViTImageProcessor cannot do."""
    if path is None:
        return dict(MAE_PROCESSOR)
    file = path / "preprocessor_config.json"
    if not file.is_file():
        raise ValueError(
            f"vit-mae: {file} is missing; mmehr reads the resize filter and normalisation from it (copy it from "
            "the model's Hugging Face repo next to config.json)"
        )
    raw = json.loads(file.read_text())
    # ViTImageProcessor's own defaults (transformers), for keys the file does not set.
    cfg = {"do_resize": True, "size": 224, "resample": 2, "do_rescale": True, "rescale_factor": 1 / 255,
           "do_normalize": True, "image_mean": [0.5, 0.5, 0.5], "image_std": [0.5, 0.5, 0.5]}  # fmt: skip
    cfg |= {k: raw[k] for k in cfg if k in raw}
    size = cfg["size"]
    if isinstance(size, int):
        size = {"height": size, "width": size}
    if not (isinstance(size, dict) and {"height", "width"} <= set(size)):
        raise ValueError(
            f"{file}: size must be an int or {{height, width}} (ViTImageProcessor), got {size!r}"
        )
    if cfg["resample"] not in PIL_FILTERS:
        raise ValueError(f"{file}: unknown resample filter {cfg['resample']!r}; known: {PIL_FILTERS}")
    cfg["size"] = {"height": int(size["height"]), "width": int(size["width"])}
    return cfg


def _vit_processor_prepare(p: dict[str, Any]) -> Callable[[list], dict[str, torch.Tensor]]:
    def prepare(images: list[np.ndarray]) -> dict[str, torch.Tensor]:
        return {
            "pixels": torch.stack([
                vit_processor_image(
                    im, height=p["size"]["height"], width=p["size"]["width"], resample=p["resample"],
                    mean=p["image_mean"], std=p["image_std"], do_resize=p["do_resize"],
                    rescale_factor=p["rescale_factor"], do_rescale=p["do_rescale"], do_normalize=p["do_normalize"],
                )
                for im in images
            ])
        }  # fmt: skip

    return prepare


def _build_vit_mae(weights=None, *, random_init: bool = False, **sizes) -> FrozenEncoder:
    repo = "facebook/vit-mae-base"
    path = None
    if not random_init:  # find the weights before importing or building anything
        if sizes:
            raise ValueError(
                f"encoder 'vit-mae': a checkpoint fixes the architecture; {sorted(sizes)} apply only with random_init"
            )
        how = (
            f"Pass `--weights /path/to/vit-mae-base` (a directory with config.json, preprocessor_config.json and "
            f"the weights, e.g. from `huggingface-cli download {repo} --local-dir DIR` on a machine with internet), "
            f"or put {repo} in the Hugging Face cache (HF_HOME)."
        )
        path = _resolve_dir("vit-mae", weights, repo, how)
    from transformers import ViTMAEConfig, ViTMAEModel

    processor = _processor_settings(path)
    with _quiet_transformers():
        if random_init:
            config = ViTMAEConfig(mask_ratio=0.0, **dataclasses.asdict(_config(MAESizes, sizes, "vit-mae")))
            torch.manual_seed(0)
            mae = ViTMAEModel(config)
            checksum = _sha256_module(mae, "random-init")
        else:
            mae, _ = _hf_from_pretrained(ViTMAEModel, path, MAE_DROPPED, mask_ratio=0.0)
            checksum = _sha256_files([p for p in path.iterdir() if p.suffix in (".safetensors", ".bin")])
    if random_init:
        processor["size"] = {"height": mae.config.image_size, "width": mae.config.image_size}
    n = (mae.config.image_size // mae.config.patch_size) ** 2 + 1
    pre = {
        "reproduces": "transformers ViTImageProcessor (PIL resize of the RGB image, rescale, normalise)",
        "image": "uint8 grey -> RGB (3 equal channels)",
        "resize": f"{processor['size']['height']}x{processor['size']['width']}, PIL {PIL_FILTERS[processor['resample']].lower()}"
        if processor["do_resize"] else None,
        "rescale_factor": processor["rescale_factor"] if processor["do_rescale"] else None,
        "mean": list(processor["image_mean"]) if processor["do_normalize"] else None,
        "std": list(processor["image_std"]) if processor["do_normalize"] else None,
        "mask_ratio": 0.0, "patch_order": "identity (noise = arange(L))", "output": "last_hidden_state: CLS + patch tokens",
    }  # fmt: skip
    return FrozenEncoder(
        name="vit-mae", modality="cxr", model=MAEUnmasked(mae), prepare=_vit_processor_prepare(processor),
        d_enc=mae.config.hidden_size, max_tokens=n, preprocessing=pre, weights_checksum=checksum, n_prefix=1,
        blocks="model." + _hf_blocks(mae), after_blocks=("model.layernorm",),
    )  # fmt: skip
