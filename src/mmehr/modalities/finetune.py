"""Finetuned encoders: a pretrained encoder that runs inside the model's forward pass and trains with it.

`TrainableEncoder(encoder, mode, n)` wraps a `FrozenEncoder`'s module so that the model
(`mmehr.model.fusion.Fusion.attach_encoders`) can call it on raw payloads:

    encoder(**payload)  with payload tensors (E, ...) for E events (token ids + attention mask, pixels,
                        waveform segments: what `FrozenEncoder.prepare` makes)
      -> (emb (E, N, d_enc) float32, mask (E, N) bool, valid tokens first)

What trains:
- `last_n`, N: the encoder's last N transformer blocks (`FrozenEncoder.blocks`) and what runs after them
  (`after_blocks`, e.g. a final LayerNorm); everything before stays frozen, so autograd keeps no
  activations for it.
- `lora`, R: LoRA adapters (PEFT, rank R, alpha R, no dropout) on every nn.Linear inside the blocks; the
  pretrained weights stay frozen. LoRA's B matrices start at zero, so at step 0 the features are exactly
  the frozen encoder's.

The wrapped module stays in eval mode even while the model trains (dropout off), so an untrained finetuned
encoder gives the features the embedding store holds; its output is then stride-pooled and truncated as
the store was (`stride_pool`, `n_prefix`, `max_tokens`), so frozen and finetuned runs see the same tokens.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from mmehr.modalities.encoders import FrozenEncoder


def submodule(root: nn.Module, path: str) -> nn.Module:
    """root's module at a dotted path ("model.encoder.layer"); ValueError naming the path if absent."""
    module = root
    for part in path.split("."):
        if not hasattr(module, part):
            raise ValueError(f"{type(root).__name__} has no module {path!r}")
        module = getattr(module, part)
    return module


class TrainableEncoder(nn.Module):
    """A FrozenEncoder's module made (partly) trainable; see the module docstring for the contract."""

    def __init__(
        self,
        encoder: FrozenEncoder,
        mode: str,
        n: int,
        *,
        stride_pool: int = 1,
        max_tokens: int | None = None,
        seed: int = 0,
    ):
        super().__init__()
        if mode not in ("last_n", "lora") or n < 1:
            raise ValueError(f"encoder {encoder.name}: finetune must be last_n:N or lora:R with N, R >= 1")
        if not encoder.blocks:
            raise ValueError(f"encoder {encoder.name} has no transformer blocks to finetune")
        self.name, self.mode, self.n = encoder.name, mode, n
        self.d_enc, self.n_prefix = encoder.d_enc, encoder.n_prefix
        self.stride_pool, self.token_limit = stride_pool, max_tokens
        body = encoder.max_tokens - encoder.n_prefix
        bound = encoder.n_prefix + -(-body // max(stride_pool, 1))
        self.max_tokens = min(bound, max_tokens) if max_tokens else bound  # largest N this returns
        model = encoder.model.requires_grad_(False)
        blocks = submodule(model, encoder.blocks)
        if not isinstance(blocks, nn.ModuleList):
            raise ValueError(f"encoder {encoder.name}: {encoder.blocks!r} is not a ModuleList of blocks")
        if mode == "last_n" and n > len(blocks):
            raise ValueError(
                f"encoder {encoder.name}: last_n:{n} but it has {len(blocks)} blocks at {encoder.blocks!r}"
            )
        if mode == "last_n":
            for block in list(blocks)[-n:]:
                block.requires_grad_(True)
            for path in encoder.after_blocks:
                submodule(model, path).requires_grad_(True)
        else:
            model = _add_lora(model, encoder.blocks, n, seed)
        self.model = model.eval()

    def train(self, mode: bool = True) -> TrainableEncoder:
        super().train(mode)
        self.model.eval()  # dropout stays off: an untrained finetuned encoder gives the stored features
        return self

    def forward(self, **payload: Tensor) -> tuple[Tensor, Tensor]:
        emb, mask = self.model(**payload)  # (E, N, d_enc), (E, N)
        emb, mask = pool_tokens(emb.float(), mask.bool(), self.stride_pool, self.n_prefix)
        if self.token_limit:
            emb, mask = emb[:, : self.token_limit], mask[:, : self.token_limit]
        return emb, mask

    def extra_repr(self) -> str:
        return f"{self.name}, {self.mode}:{self.n}, stride_pool={self.stride_pool}, max_tokens={self.token_limit}"


def _add_lora(model: nn.Module, blocks: str, r: int, seed: int) -> nn.Module:
    """LoRA (PEFT) on every nn.Linear under `blocks`, in place; adapters initialised from `seed`."""
    from peft import LoraConfig, inject_adapter_in_model

    prefix = blocks + "."
    targets = [
        name for name, m in model.named_modules() if name.startswith(prefix) and isinstance(m, nn.Linear)
    ]
    if not targets:
        raise ValueError(f"no nn.Linear under {blocks!r} to put LoRA adapters on")
    config = LoraConfig(r=r, lora_alpha=r, lora_dropout=0.0, target_modules=targets, bias="none")
    with torch.random.fork_rng(devices=[]):  # the adapters' init does not move the caller's RNG
        torch.manual_seed(seed)
        return inject_adapter_in_model(config, model)


def pool_tokens(emb: Tensor, mask: Tensor, stride: int, n_prefix: int = 0) -> tuple[Tensor, Tensor]:
    """Torch twin of `mmehr.modalities.encode.pool_tokens` on a padded batch: (E, N, d), (E, N) ->
    (E, n_prefix + ceil((N - n_prefix) / stride), d): means of `stride` consecutive valid tokens, summary
    tokens kept apart; a window with no valid token is masked."""
    if stride <= 1 or emb.shape[1] <= n_prefix:
        return emb, mask
    E, N, d = emb.shape
    head, body, body_mask = emb[:, :n_prefix], emb[:, n_prefix:], mask[:, n_prefix:]
    G = -(-(N - n_prefix) // stride)
    pad = G * stride - (N - n_prefix)
    body = nn.functional.pad(body * body_mask[..., None], (0, 0, 0, pad)).view(E, G, stride, d)
    counts = nn.functional.pad(body_mask.float(), (0, pad)).view(E, G, stride).sum(-1)  # (E, G)
    pooled = body.sum(2) / counts.clamp(min=1)[..., None]
    return torch.cat([head, pooled], dim=1), torch.cat([mask[:, :n_prefix], counts > 0], dim=1)


def trainable_summary(module: nn.Module) -> dict[str, Any]:
    """Parameter counts of an encoder: total and trainable (for logs and docs)."""
    total = sum(p.numel() for p in module.parameters())
    trainable = sum(p.numel() for p in module.parameters() if p.requires_grad)
    return {"parameters": total, "trainable": trainable}
