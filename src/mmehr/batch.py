"""The batch contract between the data side (`mmehr.data`, `mmehr.modalities`) and the model.

Both sides import this module and nothing of each other: the loaders build `Batch`es, the model reads
`ModalityInputs`. Shapes: B rows, T tokens, K_m events of one modality, N encoder tokens per event,
d_enc the encoder's width. Times are int64 µs since the epoch.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import Tensor


@dataclass
class ModalityInputs:
    """Up to K_m events of one modality per row, most recent first, in one of two forms.

    Stored embeddings (a frozen encoder): emb (B, K_m, N, d_enc) float encoder tokens (fp16 from the store
    is fine; padding must be finite) and token_mask (B, K_m, N) bool, valid encoder tokens.
    Raw payloads (a finetuned encoder, run inside the model): payload, name -> tensor (B, K_m, ...), the
    encoder's prepared inputs per event (token ids, pixels, waveform segments); emb and token_mask are None.
    Both: event_time (B, K_m) int64 µs, acquisition time; event_mask (B, K_m) bool, event present (False =
    padding / absent). k_visible: each token sees at most this many of its row's events, the most recent
    ones acquired before it (per-token retrieval: the row then carries more events than any token sees);
    None: a token sees every event of its row acquired before it.
    """

    emb: Tensor | None
    token_mask: Tensor | None
    event_time: Tensor
    event_mask: Tensor
    payload: dict[str, Tensor] | None = None
    k_visible: int | None = None

    def _map(self, fn) -> ModalityInputs:
        return ModalityInputs(
            None if self.emb is None else fn(self.emb),
            None if self.token_mask is None else fn(self.token_mask),
            fn(self.event_time),
            fn(self.event_mask),
            None if self.payload is None else {k: fn(v) for k, v in self.payload.items()},
            self.k_visible,
        )

    def to(self, device: torch.device | str, non_blocking: bool = False) -> ModalityInputs:
        return self._map(lambda t: t.to(device, non_blocking=non_blocking))

    def select(self, rows: Tensor) -> ModalityInputs:
        """Rows (bool mask or index, repeats allowed)."""
        return self._map(lambda t: t[rows])


@dataclass
class Batch:
    """One model batch, right-padded with the vocabulary's pad id (docs/interfaces.md).

    tokens, targets (B, T) int64; times (B, T) int64 µs (padding carries the last real time); loss_mask
    (B, T) bool, True where the next-token target counts (False at static and padding positions); lengths
    (B,) real tokens per row; prefix (B,) static-context tokens at the start of each row (they survive a
    KV-cache slide); subject_ids (B,); modalities: name -> ModalityInputs, the events each row may see.

    Training rows and the contexts that rollouts continue are the same type: a context's last position
    has a padding target and loss_mask False.
    """

    tokens: Tensor
    times: Tensor
    targets: Tensor
    loss_mask: Tensor
    lengths: Tensor
    prefix: Tensor
    subject_ids: Tensor
    modalities: dict[str, ModalityInputs] = field(default_factory=dict)

    def __len__(self) -> int:
        return self.tokens.shape[0]

    @property
    def n_tokens(self) -> int:
        """Real (non-padding) input tokens."""
        return int(self.lengths.sum())

    def to(self, device: torch.device | str, non_blocking: bool = False) -> Batch:
        moved = (
            t.to(device, non_blocking=non_blocking)
            for t in (self.tokens, self.times, self.targets, self.loss_mask, self.lengths, self.prefix)
        )
        mods = {name: m.to(device, non_blocking) for name, m in self.modalities.items()}
        return Batch(*moved, self.subject_ids, mods)

    @classmethod
    def from_contexts(
        cls,
        rows: Sequence[tuple[np.ndarray, np.ndarray]],
        prefix: Sequence[int] | np.ndarray,
        modalities: dict[str, ModalityInputs] | None = None,
        pad_id: int = 0,
    ) -> Batch:
        """Contexts to continue from per-row (tokens (n,), times (n,) µs), right-padded: every target is
        padding and no position counts for a loss. `prefix[b]` static tokens start row b."""
        if not rows:
            raise ValueError("a context batch needs at least one row")
        lengths = torch.tensor([len(t) for t, _ in rows], dtype=torch.long)
        if int(lengths.min()) < 1:
            raise ValueError("every context needs at least one token")
        B, T = len(rows), int(lengths.max())
        tokens = torch.full((B, T), pad_id, dtype=torch.long)
        times = torch.zeros(B, T, dtype=torch.long)
        for b, (tok, tim) in enumerate(rows):
            n = len(tok)
            tokens[b, :n] = torch.as_tensor(np.asarray(tok, dtype=np.int64))
            times[b, :n] = torch.as_tensor(np.asarray(tim, dtype=np.int64))
            times[b, n:] = times[b, n - 1]
        return cls(
            tokens=tokens,
            times=times,
            targets=torch.full((B, T), pad_id, dtype=torch.long),
            loss_mask=torch.zeros(B, T, dtype=torch.bool),
            lengths=lengths,
            prefix=torch.as_tensor(np.asarray(prefix), dtype=torch.long).expand(B).clone(),
            subject_ids=torch.zeros(B, dtype=torch.long),
            modalities=dict(modalities or {}),
        )
