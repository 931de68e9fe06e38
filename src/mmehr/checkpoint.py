"""Checkpoints: written atomically, loaded without ever unpickling arbitrary objects.

A checkpoint is one directory:

    model.safetensors   the model's weights (fp32; the tied LM head stored once), finetuned encoders included
                        (`fusion.encoders.<modality>.*`)
    trainer_state.pt    optimizer state, step, data position, RNG state, validation bookkeeping: plain
                        tensors, numbers and strings, read back with torch.load(weights_only=True)
    config.yaml         the resolved run config (`mmehr.runconfig.TrainConfig`): model sizes, the timelines
                        directory and, per modality, the embedding store and k_max
    vocab.json          a copy of the vocabulary the model was trained with (its sha256 is in the manifest,
                        with the timelines directory it came from)
    manifest.json       written last: step, validation loss, checksums (sha256) of the vocabulary, the
                        weights and the trainer state; without it the checkpoint is incomplete and never
                        loaded, and weights whose checksum differs (bit flips, truncation) are refused

A training run directory holds `checkpoints/step-NNNNNNN/` (the latest few), `checkpoints/best/` (lowest
validation loss) and a `manifest.json` naming its final and best checkpoints; `load_model` accepts either
a checkpoint or a run directory.
"""

from __future__ import annotations

import datetime
import hashlib
import pickle
import shutil
import sys
from pathlib import Path
from typing import Any

import safetensors.torch
import torch

from mmehr.config import load_config, save_config
from mmehr.io import MANIFEST, atomic_path, is_complete, read_json, read_manifest, stage_of, write_json
from mmehr.model.gpt import GPT
from mmehr.runconfig import TrainConfig, finetune_encoders

WEIGHTS, STATE, CONFIG, VOCAB = "model.safetensors", "trainer_state.pt", "config.yaml", "vocab.json"


def sha256_file(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def save_checkpoint(
    directory: str | Path,
    model: torch.nn.Module,
    config: Any,
    *,
    vocab_path: str | Path,
    state: dict[str, Any] | None = None,
    info: dict[str, Any] | None = None,
) -> Path:
    """Write a checkpoint directory atomically (it appears complete, or not at all).

    model: the bare module (not DDP- or compile-wrapped); config: the resolved TrainConfig; state:
    tensors/numbers/strings only (anything else fails here, not at load); info: extra manifest fields.
    """
    directory = Path(directory)
    with atomic_path(directory, stage="checkpoint") as tmp:
        tmp.mkdir(parents=True)
        safetensors.torch.save_model(model, str(tmp / WEIGHTS))
        if state is not None:
            torch.save(state, tmp / STATE)
        save_config(config, tmp / CONFIG)
        shutil.copyfile(vocab_path, tmp / VOCAB)
        manifest = {
            "stage": "checkpoint",
            "created_at": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
            "vocab_sha256": sha256_file(tmp / VOCAB),
            "weights_sha256": sha256_file(tmp / WEIGHTS),
            "state_sha256": sha256_file(tmp / STATE) if state is not None else None,
            "vocab_from": str(Path(vocab_path).resolve()),
            "parameters": sum(p.numel() for p in model.parameters()),
            **(info or {}),
        }
        write_json(tmp / MANIFEST, manifest)
    return directory


def _checked(directory: str | Path, name: str) -> Path:
    """`directory/name`, after comparing it with the checksum its manifest records (if it records one)."""
    directory = Path(directory)
    path = directory / name
    if not path.is_file():
        raise FileNotFoundError(f"{path} does not exist")
    key = {WEIGHTS: "weights_sha256", STATE: "state_sha256"}[name]
    want = read_json(directory / MANIFEST).get(key) if (directory / MANIFEST).is_file() else None
    if want and sha256_file(path) != want:
        raise ValueError(
            f"{path} is damaged: its sha256 differs from the one recorded in {directory / MANIFEST} when it "
            "was written (truncated, bit flips, or replaced); use another checkpoint of the run"
        )
    return path


def load_state(directory: str | Path) -> dict[str, Any]:
    """The trainer state of a checkpoint, read with weights_only=True: no code from the file ever runs."""
    path = Path(directory) / STATE
    if not path.is_file():
        raise FileNotFoundError(
            f"{path} does not exist: this checkpoint holds weights only and cannot be resumed"
        )
    _checked(directory, STATE)
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        raise ValueError(
            f"{path}: refused to load: it holds objects other than tensors, numbers and strings "
            f"(loading never unpickles arbitrary objects): {str(e).splitlines()[0]}"
        ) from None
    except (RuntimeError, EOFError, OSError) as e:
        raise ValueError(f"{path}: not a readable trainer state ({type(e).__name__}: {e})") from None


def load_weights(model: torch.nn.Module, directory: str | Path) -> None:
    """Load a checkpoint's weights into `model` in place; every parameter must match by name and shape."""
    path = _checked(directory, WEIGHTS)
    try:
        missing, unexpected = safetensors.torch.load_model(model, str(path), strict=False)
    except safetensors.SafetensorError as e:
        raise ValueError(f"{path}: not a readable safetensors file ({e})") from None
    if missing or unexpected:
        raise ValueError(
            f"{path} does not fit the model: missing {sorted(missing)[:5]}, unexpected {sorted(unexpected)[:5]}"
        )


def read_weights(directory: str | Path) -> dict[str, torch.Tensor]:
    """A checkpoint's tensors by name (CPU), as stored."""
    path = _checked(directory, WEIGHTS)
    try:
        return safetensors.torch.load_file(str(path))
    except safetensors.SafetensorError as e:
        raise ValueError(f"{path}: not a readable safetensors file ({e})") from None


def verify_checkpoint(directory: str | Path) -> None:
    """Raise ValueError/OSError unless a checkpoint's manifest, weights and trainer state are intact:
    their recorded checksums, or for a checkpoint written before checksums, that they can be read."""
    directory = Path(directory)
    manifest = read_json(directory / MANIFEST)
    if manifest.get("weights_sha256"):
        _checked(directory, WEIGHTS)
    else:
        read_weights(directory)
    if manifest.get("state_sha256"):
        _checked(directory, STATE)
    else:
        load_state(directory)


def check_vocabulary(checkpoint_dir: str | Path, timelines: str | Path) -> None:
    """Refuse timelines whose vocabulary is not the one the checkpoint was trained with: token ids would
    not mean what the model learned, whatever the vocabulary's size."""
    manifest = read_manifest(checkpoint_dir)
    vocab = Path(timelines) / VOCAB
    want, got = manifest.get("vocab_sha256"), sha256_file(vocab) if vocab.is_file() else None
    if want and got and got != want:
        source = (
            Path(manifest["vocab_from"]).parent if manifest.get("vocab_from") else "the training timelines"
        )
        raise ValueError(
            f"{vocab} is not the vocabulary {checkpoint_dir} was trained with (sha256 {got[:12]}... != "
            f"{want[:12]}...): its token ids mean other codes. Evaluate timelines tokenized with the training "
            f"vocabulary: `mmehr tokenize --vocab-from {source} ...`"
        )


def step_checkpoints(run_dir: str | Path) -> list[Path]:
    """Complete `checkpoints/step-*` directories of a run, oldest first."""
    root = Path(run_dir) / "checkpoints"
    return sorted(p for p in root.glob("step-*") if p.is_dir() and is_complete(p))


def latest_intact_checkpoint(run_dir: str | Path, *, move_damaged: bool = True) -> Path | None:
    """The latest step checkpoint of a run whose files are intact (`verify_checkpoint`), or None.

    A damaged one (bit flips, a write cut short where atomic renames do not hold) is skipped with a
    warning and, with move_damaged, moved aside to checkpoints/damaged-step-N (kept for inspection), so
    that training again through its step writes a fresh one."""
    for c in reversed(step_checkpoints(run_dir)):
        try:
            verify_checkpoint(c)
            return c
        except (ValueError, OSError) as e:
            if move_damaged:
                c.rename(c.with_name(f"damaged-{c.name}"))
                print(f"warning: {c} is damaged ({e}); moved it to damaged-{c.name} and use the checkpoint "
                      "before it", file=sys.stderr)  # fmt: skip
    return None


def resolve_checkpoint(path: str | Path, which: str = "auto") -> Path:
    """A checkpoint directory from a checkpoint or run directory.

    which: `best` (lowest validation loss), `final` (the last step), or `auto`: best when the run
    validated, else final; an unfinished run gives its latest complete step checkpoint.
    """
    path = Path(path)
    if (path / WEIGHTS).is_file():
        read_manifest(path)  # an incomplete checkpoint fails clearly
        return path
    if which not in ("auto", "best", "final"):
        raise ValueError(f"which must be auto, best or final, got {which!r}")
    if not path.is_dir():
        raise FileNotFoundError(f"{path}: no such training run or checkpoint directory")
    if is_complete(path):
        manifest = read_json(path / MANIFEST)
        if stage_of(path) != "train" or not manifest.get("final_checkpoint"):
            what = f"a `mmehr {stage_of(path)}` output" if stage_of(path) else "not a `mmehr train` output"
            raise ValueError(
                f"{path} is {what}, not a training run or checkpoint (no {WEIGHTS}, no final_checkpoint)"
            )
        name = manifest.get("best_checkpoint") if which in ("auto", "best") else None
        if which == "best" and not name:
            raise FileNotFoundError(f"{path}: the run kept no best checkpoint (it never validated)")
        return path / (name or manifest["final_checkpoint"])
    steps = step_checkpoints(path)
    if which == "best" and is_complete(path / "checkpoints" / "best"):
        return path / "checkpoints" / "best"
    if steps and which != "best":
        return steps[-1]
    raise FileNotFoundError(
        f"{path}: neither a checkpoint (no {WEIGHTS}) nor a run with a complete checkpoint"
    )


def load_config_of(checkpoint_dir: str | Path) -> TrainConfig:
    """The resolved run config saved in a checkpoint."""
    return load_config(TrainConfig, Path(checkpoint_dir) / CONFIG)


def load_model(
    checkpoint_dir: str | Path, device: str | torch.device = "cpu", which: str = "auto"
) -> tuple[GPT, TrainConfig]:
    """The trained model (eval mode, on `device`) and its resolved TrainConfig.

    `checkpoint_dir`: a checkpoint, or a run directory (see `resolve_checkpoint` for `which`). The config
    names the timelines directory (`config.data.timelines`) and, per enabled modality, its embedding store
    and k_max (`config.data.modalities[name].store / .k_max`).
    """
    directory = resolve_checkpoint(checkpoint_dir, which)
    config = load_config_of(directory)
    model = GPT(
        config.model, encoders=finetune_encoders(config)
    )  # a finetuned encoder's weights are in the file
    load_weights(model, directory)
    return model.to(device).eval(), config
