"""The run configuration: one YAML file describes one model (one row of the paper's tables).

    data:   the timelines (`mmehr tokenize`), and per modality its embedding store (`mmehr encode`), k_max
    model:  the decoder's sizes and `fusion` (compression, cross-attention, gates): `mmehr.model.config`
    optim:  AdamW, schedule, batch
    train:  what is trained (init_from, freeze_decoder)
    run:    output, seed, device, logging, checkpoints

`resolve_config` validates a raw mapping and fills what the data determines (absolute paths, vocab size,
each modality's encoder width, and what each store holds: modality, encoder, settings checksum);
`modality_stores` opens the stores a resolved config names (for a finetuned modality, the payloads of the
store's events) and `finetune_encoders` builds the encoders that run inside the model. Training
(`mmehr.train`) and evaluation (`mmehr.evaluate`) both read a run through this module, never each other.
"""

from __future__ import annotations

import copy
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch

from mmehr.config import ConfigError, apply_overrides, from_dict, load_yaml
from mmehr.io import read_manifest
from mmehr.modalities.encoders import FrozenEncoder, get_encoder
from mmehr.modalities.payloads import EventPayloads
from mmehr.modalities.sources import SOURCES
from mmehr.modalities.store import EmbeddingStore, read_store_manifest, settings_sha256
from mmehr.model.config import ModelConfig, parse_finetune


@dataclass
class ModalityData:
    """One modality's events: the embedding store of one (modality, frozen encoder) and how many a window carries.

    max_tokens: truncate each event to this many encoder tokens (None: the longest in the batch); enabled:
    false switches it off. What the store must hold ("" accepts any; resolving fills each from the store,
    so a run records them and evaluation refuses a store that changed): modality (a slot named ecg, cxr
    or note holds that modality), encoder, and settings_sha256 (the store's encoder weights,
    preprocessing and pooling: `mmehr.modalities.store.settings_sha256`).

    Used only when the model finetunes this modality's encoder (model.fusion.modalities.<m>.finetune):
    events, the `mmehr index` directory the store was encoded from (default: the one its manifest names);
    weights and encoder_options, how to build the same encoder as the store's (as `mmehr encode --weights
    ... --set ...`); its weights checksum and preprocessing must equal the store's.
    """

    store: str
    k_max: int = 4
    max_tokens: int | None = None
    encoder: str = ""
    enabled: bool = True
    modality: str = ""
    settings_sha256: str = ""
    events: str = ""
    weights: str = ""
    encoder_options: dict[str, Any] = field(default_factory=dict)


@dataclass
class DataConfig:
    """Where the windows come from. val_split "" turns validation off."""

    timelines: str = ""
    train_split: str = "train"
    val_split: str = "tuning"
    sampling: Literal["random", "stride"] = "random"
    stride: int = 0  # stride sampling: tokens between window starts (0: the window length)
    modalities: dict[str, ModalityData] = field(default_factory=dict)
    workers: int = 0  # DataLoader worker processes building batches (0: in the training process)
    # which events a token sees: "window", each modality's k_max most recent before the window's last token
    # (the paper's; a token's visible events then depend on the events after it in its window), or
    # "token", each token its own k_max most recent before it (mmehr.data.windows)
    media_retrieval: Literal["window", "token"] = "window"


@dataclass
class OptimConfig:
    """AdamW with linear warmup then cosine decay to min_lr at max_steps; grad_clip 0 turns clipping off."""

    lr: float = 6e-4
    min_lr: float = 6e-5
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.95
    grad_clip: float = 1.0
    warmup_steps: int = 100
    max_steps: int = 2000
    batch_size: int = 8  # windows per micro-batch (per process)
    grad_accum: int = 1  # micro-batches per optimizer step, all processes together


@dataclass
class TrainableConfig:
    """What is trained. Frozen encoders never are (their outputs are stored); a finetuned one trains as its
    model.fusion.modalities.<m>.finetune says. freeze_decoder trains only compression + cross-attention
    (and finetuned encoders), Flamingo-style, normally starting from an EHR-only run via init_from."""

    init_from: str = ""  # a checkpoint, or a run directory (its best checkpoint, else its final one)
    freeze_decoder: bool = False


@dataclass
class RunConfig:
    out: str = "runs/train"
    seed: int = 1337
    device: str = "auto"  # auto: cuda when available
    dtype: Literal["bf16", "fp32"] = "bf16"  # autocast dtype on CUDA; CPU always computes in fp32
    compile: bool = False
    threads: int = 0  # torch threads per process (0: the cores this process may use / processes per node)
    log_every: int = 10
    eval_every: int = 200  # steps between validations (0: only at the end)
    val_windows: int = 64
    early_stop_patience: int = 0  # stop after this many validations without improvement (0: never)
    checkpoint_every: int = 500
    keep_checkpoints: int = 2
    peak_tflops: float = 0.0  # the hardware's peak, for MFU in the summary (0: not reported)


@dataclass
class TrainConfig:
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainableConfig = field(default_factory=TrainableConfig)
    run: RunConfig = field(default_factory=RunConfig)


def resolve_config(raw: dict[str, Any], where: str = "config") -> TrainConfig:
    """Validate a raw config and fill what the data determines: absolute paths, model.vocab_size from the
    timelines' vocab, each enabled modality's d_enc from its store (only enabled modalities reach the model:
    model.fusion.modalities holds exactly the data.modalities that are enabled)."""
    raw = copy.deepcopy(raw)
    data, model = raw.setdefault("data", {}), raw.setdefault("model", {})
    if not data.get("timelines"):
        raise ConfigError(f"{where}: data.timelines (a `mmehr tokenize` output directory) is required")
    timelines = Path(data["timelines"]).resolve()
    manifest = read_manifest(timelines)
    data["timelines"] = str(timelines)
    if model.setdefault("vocab_size", manifest["vocab_size"]) != manifest["vocab_size"]:
        raise ConfigError(
            f"{where}: model.vocab_size {model['vocab_size']} != {manifest['vocab_size']} of {timelines}"
        )
    fusion = model.setdefault("fusion", {})
    if not isinstance(fusion, dict):
        raise ConfigError(f"{where}: model.fusion must be a mapping")
    model_mods = fusion.get("modalities") or {}
    enabled = {}
    for name, m in (data.get("modalities") or {}).items():
        if not isinstance(m, dict) or "store" not in m:
            raise ConfigError(
                f"{where}: data.modalities.{name} needs a `store` (an embedding store directory)"
            )
        m["store"] = str(Path(m["store"]).resolve())
        if str(m.get("enabled", True)).lower() in ("false", "0", "no"):
            continue
        try:
            store = read_store_manifest(m["store"])
        except ValueError as e:
            raise ConfigError(f"{where}: data.modalities.{name}: {e}") from None
        _check_store(m, name, store, settings_sha256(m["store"]), where)
        m.update(
            modality=store["modality"], encoder=store["encoder"], settings_sha256=settings_sha256(m["store"])
        )
        spec = dict(model_mods.get(name) or {})
        try:
            finetuned = parse_finetune(spec.get("finetune", "frozen"))[0] != "frozen"
        except ValueError as e:
            raise ConfigError(f"{where}: model.fusion.modalities.{name}: {e}") from None
        for key in ("events", "weights"):
            if m.get(key):
                m[key] = str(Path(m[key]).resolve())
        if finetuned and not (m.get("events") or store.get("events_dir")):
            raise ConfigError(
                f"{where}: model.fusion.modalities.{name} is finetuned, but {m['store']} does not say which events "
                f"directory it was encoded from: set data.modalities.{name}.events"
            )
        if spec.setdefault("d_enc", store["d_enc"]) != store["d_enc"]:
            raise ConfigError(
                f"{where}: model.fusion.modalities.{name}.d_enc {spec['d_enc']} != {store['d_enc']} of {m['store']}"
            )
        enabled[name] = spec
    extra = set(model_mods) - set(data.get("modalities") or {})
    if extra:
        raise ConfigError(
            f"{where}: model.fusion.modalities {sorted(extra)} have no data.modalities entry (no store)"
        )
    fusion["modalities"] = enabled
    if raw.get("train", {}).get("init_from"):
        raw["train"]["init_from"] = str(Path(raw["train"]["init_from"]).resolve())
    try:
        config = from_dict(TrainConfig, raw, where)
    except ValueError as e:  # ModelConfig's own checks
        raise ConfigError(f"{where}: {e}") from e
    o = config.optim
    if o.batch_size < 1 or o.grad_accum < 1 or o.max_steps < 1 or o.warmup_steps < 0:
        raise ConfigError(
            f"{where}: optim.batch_size, grad_accum and max_steps must be >= 1, warmup_steps >= 0"
        )
    if config.train.freeze_decoder and not config.model.modalities:
        raise ConfigError(f"{where}: train.freeze_decoder with no enabled modality leaves nothing to train")
    return config


def _check_store(m: dict[str, Any], name: str, store: dict[str, Any], checksum: str, where: str) -> None:
    """A modality slot's store must hold what the slot (and a run trained with it) says."""
    modality = m.get("modality") or (name if name in SOURCES else "")
    held = f"{m['store']} holds {store['modality']} embeddings of {store['encoder']!r}"
    if modality and store["modality"] != modality:
        raise ConfigError(f"{where}: data.modalities.{name} takes {modality} embeddings but {held}")
    if m.get("encoder") and m["encoder"] != store["encoder"]:
        raise ConfigError(f"{where}: data.modalities.{name}.encoder is {m['encoder']!r} but {held}")
    if m.get("settings_sha256") and m["settings_sha256"] != checksum:
        raise ConfigError(
            f"{where}: data.modalities.{name}: {m['store']} was encoded with other settings (encoder weights, "
            "preprocessing or pooling) than the run recorded"
        )


def load_train_config(path: str | Path | None, overrides: list[str] | None = None) -> TrainConfig:
    raw = load_yaml(path) if path is not None else {}
    apply_overrides(raw, overrides or [])
    return resolve_config(raw, str(path) if path else "config")


def modality_stores(config: TrainConfig) -> dict[str, EmbeddingStore | EventPayloads]:
    """The source of every enabled modality's events: its embedding store, checked against what the run
    recorded (modality, encoder, settings and width; a run resolved before these were recorded checks the
    width only), or for a finetuned modality the payloads of that store's events (`EventPayloads`)."""
    stores: dict[str, EmbeddingStore | EventPayloads] = {}
    for name, m in config.model.fusion.modalities.items():
        data = config.data.modalities[name]
        recorded = {"store": data.store, "modality": data.modality, "encoder": data.encoder,
                    "settings_sha256": data.settings_sha256}  # fmt: skip
        if m.finetune != "frozen":
            _check_store(
                recorded,
                name,
                read_store_manifest(data.store),
                settings_sha256(Path(data.store)),
                "the run's config",
            )
            stores[name] = EventPayloads(data.store, _store_encoder(config, name), data.events or None)
            continue
        store = stores[name] = EmbeddingStore(data.store)
        _check_store(recorded, name, store.manifest, settings_sha256(store.root), "the run's config")
        if store.d_enc != m.d_enc:
            raise ValueError(f"{store.root}: d_enc {store.d_enc} != the model's {m.d_enc}")
    return stores


# Not compared at --resume: where the run lives (it may have been moved), and what a run resolved before
# they were recorded left empty (modality, encoder, settings_sha256: filled now from the same stores).
_NOT_COMPARED = ("run.out",)
_RECORDED_LATER = ("modality", "encoder", "settings_sha256")


def config_differences(saved: Any, current: Any, prefix: str = "") -> list[str]:
    """Dotted keys where a run's saved config and the current one (both `to_dict`) differ in what the
    run computes."""
    if isinstance(saved, dict) and isinstance(current, dict):
        keys = sorted(set(saved) | set(current))
        return [d for k in keys for d in config_differences(saved.get(k), current.get(k), f"{prefix}{k}.")]
    key = prefix.rstrip(".")
    if key in _NOT_COMPARED or (key.rsplit(".", 1)[-1] in _RECORDED_LATER and saved in ("", None)):
        return []
    return [] if saved == current else [key]


def finetune_encoders(config: TrainConfig) -> dict[str, torch.nn.Module]:
    """A fresh `TrainableEncoder` for every finetuned modality (for `GPT(config.model, encoders=...)`): the
    store's encoder, pooled and truncated as the store and data.modalities.<m>.max_tokens are, with the
    LoRA adapters initialised from run.seed."""
    from mmehr.modalities.finetune import TrainableEncoder

    encoders = {}
    for name in config.model.fusion.finetuned():
        data, settings = config.data.modalities[name], read_manifest(config.data.modalities[name].store)
        limits = [n for n in (settings.get("token_limit"), data.max_tokens) if n]
        mode, n = parse_finetune(config.model.fusion.modalities[name].finetune)
        encoders[name] = TrainableEncoder(
            _build_encoder(config, name, settings), mode, n, stride_pool=int(settings.get("stride_pool", 1)),
            max_tokens=min(limits) if limits else None, seed=config.run.seed,
        )  # fmt: skip
    return encoders


def _build_encoder(config: TrainConfig, name: str, settings: dict[str, Any]) -> FrozenEncoder:
    """The store's encoder, built again from data.modalities.<name> (weights, encoder_options): it must be
    the same one (weights checksum) with the same preprocessing as the store, or this fails saying so."""
    data = config.data.modalities[name]
    encoder = get_encoder(settings["encoder"], weights=data.weights or None, **data.encoder_options)
    where = f"data.modalities.{name}"
    if encoder.weights_checksum != settings["weights_checksum"]:
        raise ValueError(
            f"{where}: the {encoder.name} encoder built from weights={data.weights or '(default)'} and "
            f"encoder_options={data.encoder_options} is not the one {data.store} was encoded with "
            f"(weights checksum {encoder.weights_checksum} != {settings['weights_checksum']}); give the same "
            "weights and options as `mmehr encode` had"
        )
    if encoder.preprocessing != settings["preprocessing"]:
        diff = sorted(
            k
            for k in set(encoder.preprocessing) | set(settings["preprocessing"])
            if encoder.preprocessing.get(k) != settings["preprocessing"].get(k)
        )
        raise ValueError(
            f"{where}: {data.store} was encoded with other preprocessing than {encoder.name} now does (differs in "
            f"{diff}); encode the store again so that frozen and finetuned runs see the same inputs"
        )
    return encoder


_STORE_ENCODERS: dict[str, FrozenEncoder] = {}  # built once per process; used only for `prepare`


def _store_encoder(config: TrainConfig, name: str) -> FrozenEncoder:
    """The encoder whose preprocessing makes a finetuned modality's payloads; one per (store, weights,
    options) in a process (it serves only `prepare`: the model's encoder is a separate, fresh module)."""
    data = config.data.modalities[name]
    key = json.dumps([data.store, data.weights, data.encoder_options], sort_keys=True, default=str)
    if key not in _STORE_ENCODERS:
        if len(_STORE_ENCODERS) >= 8:
            _STORE_ENCODERS.clear()
        _STORE_ENCODERS[key] = _build_encoder(config, name, read_manifest(data.store))
    return _STORE_ENCODERS[key]
