"""Weights on disk: locating them (a path given, else the local Hugging Face cache; mmehr never
downloads), loading checkpoints safely (no code from the file runs), state-dict helpers, checksums."""

from __future__ import annotations

import hashlib
import pickle
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from mmehr.modalities.encoders.base import MissingWeightsError


def _missing(name: str, what: str, how: str) -> MissingWeightsError:
    # Deferred: the registry imports the encoder modules, which import this one.
    from mmehr.modalities.encoders.registry import REGISTRY

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


def read_checkpoint(path: str | Path) -> Any:
    """The whole object a checkpoint file holds (CPU), without running code from the file.

    `.safetensors` gives its tensors; otherwise `torch.load(weights_only=True)`. A checkpoint that also
    pickles Python objects (fairseq's `args` Namespace, an omegaconf cfg) is read with those classes
    replaced by inert stand-ins (their pickled state kept as `_state`), still under the weights-only
    unpickler.
    """
    path = Path(path)
    if path.suffix == ".safetensors":
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        try:
            return load_file(str(path))
        except SafetensorError as e:
            raise ValueError(f"{path}: not a readable safetensors file ({e})") from None
    try:
        try:
            return torch.load(path, map_location="cpu", weights_only=True)
        except pickle.UnpicklingError:
            names = torch.serialization.get_unsafe_globals_in_checkpoint(str(path))
            stubs = [(type(n.rsplit(".", 1)[-1], (_Inert,), {}), n) for n in names]
            with torch.serialization.safe_globals(stubs):
                return torch.load(path, map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, ValueError, EOFError, OSError) as e:
        raise ValueError(f"{path}: not a readable PyTorch checkpoint ({e})") from e


def state_dict_of(obj: Any, path: str | Path) -> dict[str, torch.Tensor]:
    """The state dict of tensors inside a checkpoint object (under `model`, `state_dict`, ... if nested)."""
    state = _find_state_dict(obj)
    if state is None:
        top = list(obj)[:10] if isinstance(obj, dict) else type(obj).__name__
        raise ValueError(f"{path}: no state dict of tensors found (top level: {top})")
    return state


def load_checkpoint(path: str | Path) -> dict[str, torch.Tensor]:
    """Read a checkpoint's state dict on CPU without running code from the file (see `read_checkpoint`)."""
    return state_dict_of(read_checkpoint(path), path)


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


def _load_into(
    module: nn.Module, state: dict[str, torch.Tensor], path: Path, dropped: Sequence[str] = ()
) -> None:
    """Load `state` into `module` strictly: every tensor of the architecture must be there with its shape,
    and every tensor of `state` must be used, except those matching a `dropped` regex (the heads an
    encoder leaves out on purpose, e.g. pretraining-only modules). Failures name the tensors."""
    own = module.state_dict()
    missing = sorted(k for k in own if k not in state)
    if missing:
        raise ValueError(
            f"{path}: checkpoint lacks {len(missing)} tensor(s) of this architecture: {_names(missing)}"
        )
    keep = re.compile("|".join(f"(?:{p})" for p in dropped)) if dropped else None
    unexpected = sorted(k for k in state if k not in own and not (keep and keep.fullmatch(k)))
    if unexpected:
        raise ValueError(
            f"{path}: checkpoint has {len(unexpected)} tensor(s) this architecture does not use: "
            f"{_names(unexpected)}; is it the right checkpoint, or are the sizes right?"
        )
    for k, v in own.items():
        if tuple(state[k].shape) != tuple(v.shape):
            raise ValueError(
                f"{path}: parameter {k} has shape {tuple(state[k].shape)} but the architecture expects "
                f"{tuple(v.shape)}; pass the checkpoint's sizes as overrides"
            )
    module.load_state_dict({k: state[k].float() for k in own}, strict=True)


def _names(keys: Sequence[str], limit: int = 12) -> str:
    shown = ", ".join(keys[:limit])
    return shown + (f", ... ({len(keys) - limit} more)" if len(keys) > limit else "")


def _hf_from_pretrained(
    model_cls: Any, path: Path, dropped: Sequence[str], **kwargs: Any
) -> tuple[nn.Module, dict[str, list[str]]]:
    """`model_cls.from_pretrained(path)` made strict: a tensor of the architecture missing from the
    checkpoint (transformers would leave it randomly initialised), a tensor of the wrong shape, or a
    checkpoint tensor the architecture does not use (other than a `dropped` regex: the heads left out on
    purpose) fails, naming the tensors. Returns the model and the names that were dropped."""
    model, info = model_cls.from_pretrained(path, local_files_only=True, output_loading_info=True, **kwargs)
    keep = re.compile("|".join(f"(?:{p})" for p in dropped)) if dropped else None
    missing = sorted(info.get("missing_keys") or [])
    unexpected = sorted(k for k in info.get("unexpected_keys") or [] if not (keep and keep.fullmatch(k)))
    mismatched = sorted(str(m) for m in info.get("mismatched_keys") or [])
    if missing:
        raise ValueError(
            f"{path}: checkpoint lacks {len(missing)} tensor(s) of this architecture: {_names(missing)}"
        )
    if mismatched:
        raise ValueError(f"{path}: tensor(s) of the wrong shape: {_names(mismatched)}")
    if unexpected:
        raise ValueError(
            f"{path}: checkpoint has {len(unexpected)} tensor(s) this architecture does not use: "
            f"{_names(unexpected)}; is it the right checkpoint?"
        )
    kept = sorted(set(info.get("unexpected_keys") or []) - set(unexpected))
    return model, {"dropped": kept}
