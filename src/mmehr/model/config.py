"""The model's configuration: the GPT decoder's sizes, and the multimodal fusion beside it.

In a run config (YAML) these are the `model:` section and its `fusion:` subsection:

    model:
      n_layer: 2, n_head: 4, n_embd: 128, block_size: 256, ...      # DecoderConfig
      fusion:                                                        # FusionConfig (empty: EHR-only)
        xattn_every: 2
        modalities:
          note: {compression: latent, n_latents: 8, n_latent_layers: 1}   # ModalityConfig (d_enc: filled)
          # finetune: frozen (default) | last_n:N | lora:R  (docs/finetuning.md)
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

COMPRESSIONS = ("none", "mean", "latent")
FINETUNE_MODES = ("frozen", "last_n", "lora")


def parse_finetune(value: Any) -> tuple[str, int]:
    """A finetune option -> (mode, n): "frozen" -> ("frozen", 0); "last_n:2" or {"last_n": 2} -> ("last_n",
    2), the last 2 encoder blocks train; "lora:8" or {"lora": 8} -> ("lora", 8), LoRA adapters of rank 8."""
    if isinstance(value, dict) and len(value) == 1:
        (mode, n), text = next(iter(value.items())), str(value)
    elif isinstance(value, str):
        mode, _, n = value.partition(":")
        mode, n, text = mode.strip(), n.strip() or "0", value
    else:
        raise ValueError(f"finetune must be frozen, last_n:N or lora:R, got {value!r}")
    try:
        n = int(n)
    except (TypeError, ValueError):
        raise ValueError(f"finetune {text!r}: {n!r} is not an integer") from None
    if mode not in FINETUNE_MODES or (mode == "frozen") != (n == 0) or n < 0:
        raise ValueError(f"finetune must be frozen, last_n:N or lora:R with N, R >= 1, got {text!r}")
    return mode, n


@dataclass
class ModalityConfig:
    """One enabled modality: its frozen encoder's width and how each of its events is compressed.

    compression: `none` keeps all N encoder tokens (projected to n_embd), `mean` pools them into one token,
    `latent` resamples them into `n_latents` tokens (the paper's k) with `n_latent_layers` (the paper's l)
    Perceiver layers. d_enc is filled from the modality's embedding store. latent_init_std: the std of the
    latents' random start (1, Flamingo's and IDEFICS's; at 0.02, the decoder's embedding scale, the k
    latents end as near copies on the demo cohort: docs/architecture.md measures both).

    finetune: `frozen` reads the embedding store; `last_n:N` trains the encoder's last N blocks and `lora:R`
    trains LoRA adapters of rank R in all its blocks' linear layers: the encoder then runs inside the model
    on raw payloads (the model is given its module, `GPT(config, encoders=...)`). finetune_lr_scale
    multiplies the learning rate of the encoder's trainable parameters.

    media_noise: this modality's train-time noise on its stored tokens (FusionConfig.media_noise; None:
    the fusion's), e.g. noise on the ECG alone in a run with every modality.
    """

    d_enc: int
    compression: Literal["none", "mean", "latent"] = "latent"
    n_latents: int = 8
    n_latent_layers: int = 4
    latent_init_std: float = 1.0
    finetune: str | dict[str, int] = "frozen"
    finetune_lr_scale: float = 0.1
    media_noise: float | None = None

    def __post_init__(self) -> None:
        mode, n = parse_finetune(self.finetune)
        self.finetune = mode if mode == "frozen" else f"{mode}:{n}"  # one spelling, saved with the run
        if self.finetune_lr_scale <= 0:
            raise ValueError(f"finetune_lr_scale must be > 0, got {self.finetune_lr_scale}")
        if self.compression not in COMPRESSIONS:
            raise ValueError(f"compression must be none|mean|latent, got {self.compression!r}")
        if self.d_enc < 1 or self.n_latents < 1 or self.n_latent_layers < 1:
            raise ValueError("d_enc, n_latents and n_latent_layers must be >= 1")
        if not self.latent_init_std > 0:
            raise ValueError(f"latent_init_std must be > 0, got {self.latent_init_std}")
        if self.media_noise is not None and self.media_noise < 0:
            raise ValueError(f"media_noise must be >= 0 or null, got {self.media_noise}")


@dataclass
class FusionConfig:
    """How modality events reach the decoder (all unused when `modalities` is empty: EHR-only).

    xattn_every: a gated cross-attention block sits before decoder layer i when (i + 1) % xattn_every == 0
    (2: before layers 1, 3, 5 of 6). xattn_ff_mult: width multiplier of the block's own feed-forward.
    gate: `sigmoid` (the paper: g = sigmoid(beta), beta starting at `gate_init`) or `tanh` (Flamingo:
    g = tanh(alpha), alpha starting at 0, an exact identity at init; `gate_init` is then ignored). Each
    block has two gates, attention and feed-forward. gate_lr_scale: learning-rate multiplier of the gate
    scalars. lr_scale: learning-rate multiplier of everything else the fusion adds to the decoder
    (compressors, cross-attention blocks, modality embeddings, time bias); a finetuned encoder keeps its
    finetune_lr_scale. modality_dropout: at train time, drop each available event with this probability.
    media_noise: at train time, add Gaussian noise to each stored event's encoder tokens before they are
    compressed, its std this many times the std of the event's token array (padding slots included; a
    finetuned encoder's events are left as they are): an event's exact embedding, unique to its stay,
    then cannot key the stay's training outcomes (docs/experiments.md, "Noise on the stored ECG tokens");
    a modality's own `media_noise` overrides it.
    media_cutoff: at train time, with this probability per row, a random token of the window becomes a
    simulated prediction time: the tokens after it see only the media acquired before it, as a rollout's
    generated tokens do (no event after the prediction time exists for them). Without it, a token late in
    an ICU stay always sees that stay's ICU X-ray and note, which a rollout from the ICU admission never
    has (docs/experiments.md, "Media after the prediction time").
    dropout: the cross-attention blocks' dropout (attention probabilities, residual updates, feed-forward);
    None: the decoder's (`dropout`, and `attn_dropout` for the attention probabilities).
    modality_embedding: add a learned vector per modality to its compressed tokens. time_bias: a learned
    per-head cross-attention bias on log-spaced buckets of an event's age at each query token.
    """

    modalities: dict[str, ModalityConfig] = field(default_factory=dict)
    xattn_every: int = 2
    xattn_ff_mult: int = 4
    gate: Literal["sigmoid", "tanh"] = "sigmoid"
    gate_init: float = -4.0
    gate_lr_scale: float = 30.0
    lr_scale: float = 1.0
    modality_dropout: float = 0.0
    media_noise: float = 0.0
    media_cutoff: float = 0.0
    dropout: float | None = None
    modality_embedding: bool = True
    time_bias: bool = False

    def __post_init__(self) -> None:
        for name, m in self.modalities.items():
            if isinstance(m, dict):  # built in code from plain mappings
                self.modalities[name] = ModalityConfig(**m)
        if self.xattn_every < 1 or self.xattn_ff_mult < 1:
            raise ValueError("xattn_every and xattn_ff_mult must be >= 1")
        if self.gate not in ("sigmoid", "tanh"):
            raise ValueError(f"gate must be 'sigmoid' or 'tanh', got {self.gate!r}")
        if self.gate_lr_scale <= 0 or self.lr_scale <= 0:
            raise ValueError(
                f"gate_lr_scale and lr_scale must be > 0, got {self.gate_lr_scale}, {self.lr_scale}"
            )
        if not 0.0 <= self.modality_dropout <= 1.0:
            raise ValueError(f"modality_dropout must be in [0, 1], got {self.modality_dropout}")
        if self.media_noise < 0:
            raise ValueError(f"media_noise must be >= 0, got {self.media_noise}")
        if not 0.0 <= self.media_cutoff <= 1.0:
            raise ValueError(f"media_cutoff must be in [0, 1], got {self.media_cutoff}")
        if self.dropout is not None and not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"fusion dropout must be in [0, 1) or null, got {self.dropout}")

    def finetuned(self) -> list[str]:
        """The modalities whose encoder runs inside the model (finetune other than `frozen`)."""
        return [name for name, m in self.modalities.items() if m.finetune != "frozen"]

    def xattn_layers(self, n_layer: int) -> list[int]:
        """Decoder layers preceded by a gated cross-attention block (none without modalities)."""
        if not self.modalities:
            return []
        return [i for i in range(n_layer) if (i + 1) % self.xattn_every == 0]


@dataclass
class DecoderConfig:
    """The GPT-2 decoder (nanoGPT's GPTConfig): vocabulary, depth, heads, width, context, dropout.

    `dropout` drops embeddings, residual branches and MLP outputs, and, unless `attn_dropout` says
    otherwise, the attention probabilities (GPT-2's embd/resid/attn_pdrop, all ETHOS's 0.3). On a CPU the
    attention-probability dropout is most of dropout's cost (no fused attention kernel takes it): at the
    demo's size an EHR-only step takes 1.29x as long as without dropout, 1.01x with `attn_dropout: 0`
    (`benchmarks/bench_train.py`), but the demo keeps it: without it, EHR-only lost 0.07-0.10 AUROC on
    two of three tasks (docs/experiments.md).
    """

    vocab_size: int = 4096
    n_layer: int = 6
    n_head: int = 12
    n_embd: int = 768
    block_size: int = 2048
    dropout: float = 0.0
    attn_dropout: float | None = None  # None: `dropout`
    bias: bool = True

    @property
    def attention_dropout(self) -> float:
        """The dropout of the attention probabilities (self- and cross-attention)."""
        return self.dropout if self.attn_dropout is None else self.attn_dropout

    def __post_init__(self) -> None:
        for name in ("vocab_size", "n_layer", "n_head", "n_embd", "block_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.n_embd % self.n_head:
            raise ValueError(f"n_embd ({self.n_embd}) must be divisible by n_head ({self.n_head})")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {self.dropout}")
        if self.attn_dropout is not None and not 0.0 <= self.attn_dropout < 1.0:
            raise ValueError(f"attn_dropout must be in [0, 1) or null, got {self.attn_dropout}")


@dataclass
class ModelConfig(DecoderConfig):
    """The whole model: the decoder's fields plus `fusion` (EHR-only when fusion.modalities is empty)."""

    fusion: FusionConfig = field(default_factory=FusionConfig)

    def __post_init__(self) -> None:
        super().__post_init__()
        if isinstance(self.fusion, dict):
            self.fusion = FusionConfig(**self.fusion)
        if self.fusion.modalities and not self.xattn_layers:
            raise ValueError(
                f"fusion.xattn_every={self.fusion.xattn_every} > n_layer={self.n_layer}: no cross-attention "
                "block would read the modalities"
            )

    @property
    def modalities(self) -> dict[str, ModalityConfig]:
        """The enabled modalities (fusion.modalities)."""
        return self.fusion.modalities

    @property
    def xattn_layers(self) -> list[int]:
        return self.fusion.xattn_layers(self.n_layer)
