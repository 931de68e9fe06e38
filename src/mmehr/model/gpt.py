"""The model: a GPT-2 decoder over EHR tokens, with gated cross-attention to modality events beside it.

    model = GPT(ModelConfig(...))                      # EHR-only when config.fusion.modalities is empty
    model = GPT(config, encoders={"note": module})      # a finetuned modality's encoder runs inside
    logits, loss = model(tokens, times, modalities, targets=targets, loss_mask=loss_mask)    # training
    h = model.states(tokens, times, modalities)     # the final hidden states the logits read (probes)

    cache = model.new_cache(B, max_len)                                                    # generation
    last = model.prefill(tokens, times, cache, modalities=modalities, lengths=lengths, prefix=n_static)
    cache.keep(rows)                     # fan rows out into rollouts, or retire finished ones
    logits = model.decode(next_tokens, next_times, cache)                                 # (B, t, V)

The media (each event compressed once) and its cross-attention keys/values are computed once, at
prefill, and kept in the cache. Shapes: B rows, T tokens, D = n_embd, V = vocab_size; times (B, T)
int64 µs; modalities: name -> `mmehr.batch.ModalityInputs`.
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import torch
import torch.nn as nn
from torch import Tensor

from mmehr.batch import ModalityInputs
from mmehr.model.config import ModelConfig
from mmehr.model.decoder import Block, Dropout, KVCache, kept_on_slide, next_token_loss
from mmehr.model.fusion import CrossContext, Fusion, GatedCrossAttentionBlock, Media


class GPT(nn.Module):
    """Token + learned position embeddings, pre-LN blocks, tied LM head; `fusion` (None when EHR-only)
    adds a gated cross-attention block before chosen layers."""

    def __init__(self, config: ModelConfig, encoders: Mapping[str, nn.Module] | None = None):
        super().__init__()
        self.config = config
        self.transformer = nn.ModuleDict(
            dict(
                wte=nn.Embedding(config.vocab_size, config.n_embd),
                wpe=nn.Embedding(config.block_size, config.n_embd),
                drop=Dropout(config.dropout),
                h=nn.ModuleList([Block(config) for _ in range(config.n_layer)]),
                ln_f=nn.LayerNorm(config.n_embd, bias=config.bias),
            )
        )
        self.lm_head = nn.Linear(config.n_embd, config.vocab_size, bias=False)
        self.transformer.wte.weight = self.lm_head.weight  # weight tying
        self._init(self)
        # Built after the decoder is initialised: a seed gives the same decoder with or without modalities.
        self.fusion = Fusion(config, config.fusion) if config.fusion.modalities else None
        if self.fusion is not None:
            self._init(self.fusion)
            # Attached after the init: an encoder keeps its pretrained weights (contract: Fusion.attach_encoders).
            self.fusion.attach_encoders(encoders or {})
        elif encoders:
            raise ValueError(f"encoders {sorted(encoders)} given to a model without modalities")

    def _init(self, root: nn.Module) -> None:
        """GPT-2 init: N(0, 0.02) weights, zero biases; residual projections N(0, 0.02 / sqrt(2 n_layer))."""
        for module in root.modules():
            if isinstance(module, nn.Linear | nn.Embedding):
                nn.init.normal_(module.weight, mean=0.0, std=0.02)
            if isinstance(module, nn.Linear) and module.bias is not None:
                nn.init.zeros_(module.bias)
        for name, p in root.named_parameters():
            if name.endswith("c_proj.weight"):
                nn.init.normal_(p, mean=0.0, std=0.02 / math.sqrt(2 * self.config.n_layer))

    # -- the forward pass --
    def hidden(
        self, tokens: Tensor, pos: Tensor, *, cache: KVCache | None = None, ctx: CrossContext | None = None
    ) -> Tensor:
        """(B, T) tokens at positions pos ((T,) or (B, T)) -> final hidden states (B, T, D)."""
        x = self.transformer.drop(self.transformer.wte(tokens) + self.transformer.wpe(pos))  # (B, T, D)
        for i, block in enumerate(self.transformer.h):
            if self.fusion is not None:
                x = self.fusion(i, x, ctx)  # gated cross-attention to the media (identity if none here)
            x = block(x, cache, i)
        return self.transformer.ln_f(x)  # (B, T, D)

    def encode_media(
        self, modalities: dict[str, ModalityInputs] | None, batch_size: int | None = None
    ) -> Media | None:
        """Compress every present modality event once: Media (B, M, D), or None (EHR-only, or no event)."""
        return self.fusion.encode_media(modalities, batch_size) if self.fusion is not None else None

    def forward(
        self,
        tokens: Tensor,
        times: Tensor | None = None,
        modalities: dict[str, ModalityInputs] | None = None,
        *,
        targets: Tensor | None = None,
        loss_mask: Tensor | None = None,
        media: Media | None = None,
    ) -> tuple[Tensor, Tensor | None]:
        """tokens, times (B, T) -> (logits (B, T, V), loss or None).

        targets (B, T): the next token at each position; loss_mask (B, T): positions that count (False at
        padding and static context); see `next_token_loss`. `media` (from encode_media) replaces
        `modalities` when the same media serve several calls.
        """
        logits = self.lm_head(self.states(tokens, times, modalities, media=media))  # (B, T, V)
        loss = None if targets is None else next_token_loss(logits, targets, loss_mask)
        return logits, loss

    def states(
        self,
        tokens: Tensor,
        times: Tensor | None = None,
        modalities: dict[str, ModalityInputs] | None = None,
        *,
        media: Media | None = None,
    ) -> Tensor:
        """tokens, times (B, T) -> the final hidden states (B, T, D) that `forward`'s logits read."""
        B, T = tokens.shape
        if self.config.block_size < T:
            raise ValueError(f"sequence of {T} tokens exceeds block_size {self.config.block_size}")
        ctx = None
        if self.fusion is not None:
            media = media if media is not None else self.encode_media(modalities, B)
            if media is not None and times is not None and times.shape != tokens.shape:
                raise ValueError(f"times {tuple(times.shape)} must match tokens {tuple(tokens.shape)}")
            cutoff = self.fusion.draw_cutoff(times) if media is not None and times is not None else None
            ctx = self.fusion.context(times, media=media, cutoff=cutoff)
        elif modalities:
            raise ValueError(f"modalities {sorted(modalities)} given to a model without modalities")
        return self.hidden(tokens, torch.arange(T, device=tokens.device), ctx=ctx)

    # -- generation --
    def new_cache(
        self, batch_size: int, max_len: int | None = None, dtype: torch.dtype | None = None
    ) -> KVCache:
        """An empty cache on the model's device; pass dtype=torch.bfloat16 when decoding under bf16 autocast."""
        p = self.lm_head.weight
        return KVCache(self.config, batch_size, max_len=max_len, device=p.device, dtype=dtype or p.dtype)

    def _step(self, tokens: Tensor, times: Tensor | None, cache: KVCache) -> Tensor:
        """Run t new tokens per row (B, t) through the cache; returns hidden states (B, t, D)."""
        if tokens.shape[0] != cache.batch_size:
            raise ValueError(f"batch of {tokens.shape[0]} rows but the cache holds {cache.batch_size}")
        ctx = self.fusion.context(times, cache=cache.media) if cache.media is not None else None
        pos = cache.begin(tokens.shape[1])
        x = self.hidden(tokens, pos, cache=cache, ctx=ctx)
        cache.end(tokens, torch.zeros_like(tokens) if times is None else times)
        return x

    def _fill(self, tokens: Tensor, times: Tensor | None, cache: KVCache, lengths, prefix) -> Tensor:
        """Reset the cache's rows (not its media) and fill them; logits after each row's last token (B, V)."""
        B, T = tokens.shape
        cache.reset()
        x = self._step(tokens, times, cache)  # (B, T, D)
        if lengths is not None:
            lengths = torch.as_tensor(lengths, device=tokens.device)
            if int(lengths.min()) < 1 or int(lengths.max()) > T:
                raise ValueError(f"prefill lengths must be in [1, {T}]")
            cache.lengths.copy_(lengths)
            cache.span = int(lengths.max())
        if prefix is not None:
            cache.prefix.copy_(torch.as_tensor(prefix, device=tokens.device).expand(B))
        last = cache.lengths - 1  # (B,)
        return self.lm_head(x[torch.arange(B, device=x.device), last])  # (B, V)

    def prefill(
        self,
        tokens: Tensor,
        times: Tensor | None,
        cache: KVCache,
        *,
        modalities: dict[str, ModalityInputs] | None = None,
        media: Media | None = None,
        lengths: Tensor | None = None,
        prefix: int | Tensor | None = None,
    ) -> Tensor:
        """Reset `cache` and fill it with a (B, T) context, right-padded, row b holding lengths[b] tokens
        (default T). `prefix` (int or (B,)) tokens at the start of each row survive sliding-window
        re-prefills (the static context). The media (from `modalities`, or given) is compressed and its
        cross-attention keys/values computed once, into the cache. Returns the logits after each row's
        last token: (B, V)."""
        B = tokens.shape[0]
        if media is None:
            media = self.encode_media(modalities, B)
        if media is not None and media.tokens.shape[0] != cache.batch_size:
            raise ValueError(f"media has {media.tokens.shape[0]} rows but the cache holds {cache.batch_size}")
        cache.media = self.fusion.cache_media(media) if self.fusion is not None else None
        return self._fill(tokens, times, cache, lengths, prefix)

    def decode(self, tokens: Tensor, times: Tensor | None, cache: KVCache) -> Tensor:
        """Append t tokens (B, t) (times (B, t) µs) to every row; returns their logits (B, t, V).

        At the context limit the cache slides: each row keeps its prefix and its most recent tokens
        (`kept_on_slide`), re-prefilled at positions from 0, as a full recomputation on that window would.
        """
        t = tokens.shape[1]
        if not cache.fits(t):
            w_tokens, w_times, w_lengths = cache.window(kept_on_slide(cache.max_len, t))
            self._fill(w_tokens, w_times, cache, w_lengths, cache.prefix.clone())
        return self.lm_head(self._step(tokens, times, cache))

    # -- training helpers --
    def gate_values(self) -> dict[str, float]:
        """Current gate of every cross-attention block ({} when EHR-only)."""
        return self.fusion.gate_values() if self.fusion is not None else {}

    def param_groups(self, weight_decay: float) -> list[dict]:
        """AdamW groups: Linear weights decay; biases, norms, embeddings, latents, time-bias table do not;
        gate scalars form their own group without decay; the fusion's other parameters (compressors,
        cross-attention) form their own decay / no-decay pair when fusion.lr_scale != 1; a finetuned
        encoder's trainable parameters form their own groups (its Linear weights decay) at its modality's
        finetune_lr_scale. Every group has an `lr_scale` (gates: fusion.gate_lr_scale, the rest of the
        fusion: fusion.lr_scale) that the trainer multiplies into the learning rate."""
        decay, no_decay, gates, seen = [], [], [], set()
        fusion_decay, fusion_no_decay = [], []
        fusion_ids = set()
        if self.fusion is not None:
            encoder_ids = {id(p) for p in self.fusion.encoders.parameters()}
            fusion_ids = {id(p) for p in self.fusion.parameters() if id(p) not in encoder_ids}
        encoder_groups = []
        for name, encoder in self.fusion.encoders.items() if self.fusion is not None else []:
            scale = self.config.fusion.modalities[name].finetune_lr_scale
            enc_decay, enc_no_decay = [], []
            for module in encoder.modules():
                for pname, p in module.named_parameters(recurse=False):
                    if id(p) in seen or not p.requires_grad:
                        continue
                    seen.add(id(p))
                    (
                        enc_decay if isinstance(module, nn.Linear) and pname == "weight" else enc_no_decay
                    ).append(p)
            encoder_groups += [
                {"params": enc_decay, "weight_decay": weight_decay, "lr_scale": scale},
                {"params": enc_no_decay, "weight_decay": 0.0, "lr_scale": scale},
            ]
        for module in self.modules():
            for pname, p in module.named_parameters(recurse=False):
                if id(p) in seen or not p.requires_grad:
                    continue
                seen.add(id(p))
                in_fusion = id(p) in fusion_ids
                if isinstance(module, GatedCrossAttentionBlock) and pname == "gate":
                    gates.append(p)
                elif isinstance(module, nn.Linear) and pname == "weight":
                    (fusion_decay if in_fusion else decay).append(p)
                else:
                    (fusion_no_decay if in_fusion else no_decay).append(p)
        fusion_scale = self.config.fusion.lr_scale
        if fusion_scale == 1.0:  # the layout (and so the optimizer state) of runs from before lr_scale
            decay, no_decay = decay + fusion_decay, no_decay + fusion_no_decay
            fusion_decay, fusion_no_decay = [], []
        groups = [
            {"params": decay, "weight_decay": weight_decay, "lr_scale": 1.0},
            {"params": no_decay, "weight_decay": 0.0, "lr_scale": 1.0},
            {"params": fusion_decay, "weight_decay": weight_decay, "lr_scale": fusion_scale},
            {"params": fusion_no_decay, "weight_decay": 0.0, "lr_scale": fusion_scale},
            {"params": gates, "weight_decay": 0.0, "lr_scale": self.config.fusion.gate_lr_scale},
        ]
        return [g for g in groups + encoder_groups if g["params"]]
