"""Training windows: token windows of the timelines with their static context and retrieved modality events.

One row of a batch is built the same way for training and for evaluation (`assemble`):

    tokens   = static context (as of the first kept timeline token) + timeline tokens [start, stop)
    times    = the first kept token's time at the static positions, then each token's own time (µs)
    targets  = the next token at each position; loss_mask is False at static and padding positions
    modalities: per enabled modality, the up to K_m most recent events of the subject acquired STRICTLY
                before the row's retrieval time (training: the time of the last input token; evaluation:
                the prediction time), most recent first, from its `EmbeddingStore` (stored embeddings) or,
                for a finetuned encoder, its `EventPayloads` (the same events as raw prepared payloads)

Retrieval only chooses which events a row carries; the model's per-token strict mask
(`event_time < t_i`) then decides what each position sees, so a token never sees an event acquired at or
after its own time. But with the K_m cap at the row's retrieval time (`media_retrieval="window"`, the
paper's retrieval and the default), WHICH earlier events a token sees depends on the events after it: an
event the row's later events push out of the K_m is invisible to every token of the row, so in training a
token's visible events tell of what follows it in its window (the ones a rollout's generated tokens see
never do). `media_retrieval="token"` gives each token its own K_m most recent events acquired before it:
the row carries its K_m events before its first timeline token and every event after that up to the
retrieval time, and `ModalityInputs.k_visible = K_m` tells the model to keep, per token, the K_m most
recent it may see (`mmehr.model.fusion`). A token's visible events then depend on its own time alone.

Training (`TrainWindows`): an epoch is a plan of windows over one split, a pure function of (seed, epoch):
`random` draws ceil((L - 1) / (W - 1)) window starts per timeline of L tokens uniformly (W = block_size -
static_len + 1 timeline tokens, the last one only a target) and shuffles all windows; `stride` tiles every
timeline from its start every `stride` tokens (the last window ends at the timeline's end). Micro-batch m
(counted across epochs, `batch_size` windows each) is the m-th slice of consecutive plans, so the position
in the data is just m: `--resume` continues the same order, and DDP rank r takes the micro-batches of each
optimizer step with index j % world_size == r. Every row is numpy slicing of memory maps.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Iterator, Mapping, Sequence
from typing import Literal

import numpy as np
import torch

from mmehr.batch import Batch, ModalityInputs
from mmehr.data.timelines import TimelineStore
from mmehr.modalities.payloads import EventPayloads
from mmehr.modalities.store import EmbeddingStore

ModalitySource = EmbeddingStore | EventPayloads  # stored embeddings, or payloads for a finetuned encoder

NEVER = np.iinfo(np.int64).max  # a retrieval time after every event (unsafe_ignore_event_time)


def _k_for(k_max: int | Mapping[str, int], name: str) -> int:
    return int(k_max[name] if isinstance(k_max, Mapping) else k_max)


def assemble(
    store: TimelineStore,
    spans: Sequence[tuple[int, int, int]],
    modality_stores: Mapping[str, ModalitySource] | None = None,
    k_max: int | Mapping[str, int] = 4,
    *,
    last_is_target: bool,
    at_times_us: Sequence[int] | None = None,
    max_tokens: Mapping[str, int | None] | None = None,
    pad_to: int | None = None,
    unsafe_ignore_event_time: bool = False,
    media_retrieval: Literal["window", "token"] = "window",
) -> Batch:
    """Build a batch from spans (subject index, start, stop) of `store`'s timelines.

    last_is_target: the span's last token is only a target (training windows: B rows of static_len +
    stop - start - 1 inputs) or an input too (contexts to continue: its target is padding, not counted).
    Events of each modality are the up to k_max (int, or per modality) most recent strictly before
    `at_times_us[b]` (default: the time of row b's last input token), truncated to max_tokens[name] encoder
    tokens. media_retrieval "token": also every event from the row's first timeline token's time up to the
    retrieval time, with k_visible = k_max (module docstring). `unsafe_ignore_event_time=True` retrieves
    the most recent events whatever their time, future ones included: it exists ONLY for the evaluation's
    leakage test. Never set it otherwise.
    """
    P = store.static_len
    pad = store.vocab.pad_id
    drop = 1 if last_is_target else 0
    rows = []
    for i, start, stop in spans:
        tokens, times = store.timeline(int(i))
        if not 0 <= start < stop <= len(tokens) or stop - start <= drop:
            raise ValueError(
                f"span [{start}, {stop}) of subject index {i} is empty or outside its {len(tokens)} tokens"
            )
        rows.append((int(i), tokens[start:stop], times[start:stop]))
    lengths = np.array([P + len(t) - drop for _, t, _ in rows], dtype=np.int64)
    T = max(int(lengths.max(initial=1)), pad_to or 0)
    B = len(rows)
    tok = np.full((B, T + 1), pad, dtype=np.int64)  # one extra column: the target of the last input
    tim = np.zeros((B, T), dtype=np.int64)
    mask = np.zeros((B, T), dtype=bool)
    for b, (i, tokens, times) in enumerate(rows):
        n = len(tokens)
        tok[b, :P] = store.static_context(i, int(times[0]))
        tok[b, P : P + n] = tokens
        tim[b, :P] = times[0]
        tim[b, P : P + n - drop] = times[: n - drop]
        tim[b, P + n - drop :] = times[n - 1 - drop]  # padding carries the last real time
        mask[b, P : P + n - 1] = True  # position j predicts token j + 1: only timeline -> timeline counts
    subject_ids = store.subject_ids[[i for i, _, _ in rows]].astype(np.int64)
    retrieve_at = lengths - 1
    at = tim[np.arange(B), retrieve_at] if at_times_us is None else np.asarray(at_times_us, dtype=np.int64)
    if unsafe_ignore_event_time:  # leakage test only: events at and after the prediction time come too
        at = np.full(B, NEVER, dtype=np.int64)
    if media_retrieval not in ("window", "token"):
        raise ValueError(f"media_retrieval must be 'window' or 'token', got {media_retrieval!r}")
    first = tim[:, P]  # each row's first timeline token's time
    modalities = {}
    for name, ms in (modality_stores or {}).items():
        k = k_visible = _k_for(k_max, name)
        carried = None  # per row, how many of its fetched events it carries (token retrieval)
        if media_retrieval == "token":  # + the events within the row's span: each token its own K_m
            index = ms.store if isinstance(ms, EventPayloads) else ms
            within = [index.count_between(int(s), int(f), int(a)) for s, f, a in zip(subject_ids, first, at)]
            carried = torch.tensor(within, dtype=torch.int64) + k
            k += max(within, default=0)
        else:
            k_visible = None
        if isinstance(ms, EventPayloads):  # a finetuned encoder: raw payloads, encoded inside the model
            inputs = ms.fetch(subject_ids, at, k)
            if carried is not None:  # a row's older events past its own K_m + span no token ever sees
                inputs.event_mask &= torch.arange(k)[None, :] < carried[:, None]
            modalities[name] = dataclasses.replace(inputs, k_visible=k_visible)
            continue
        n_tokens = (max_tokens or {}).get(name)
        emb, token_mask, event_time, event_mask = ms.fetch(subject_ids, at, k, n_tokens)
        if carried is not None:
            event_mask &= np.arange(k)[None, :] < carried.numpy()[:, None]
        modalities[name] = ModalityInputs(
            torch.from_numpy(emb),
            torch.from_numpy(token_mask),
            torch.from_numpy(event_time),
            torch.from_numpy(event_mask),
            k_visible=k_visible,
        )
    inputs = tok[:, :T].copy()
    inputs[np.arange(T)[None, :] >= lengths[:, None]] = pad  # a shorter row's last target is not an input
    return Batch(
        tokens=torch.from_numpy(inputs),
        times=torch.from_numpy(tim),
        targets=torch.from_numpy(np.ascontiguousarray(tok[:, 1:])),
        loss_mask=torch.from_numpy(mask),
        lengths=torch.from_numpy(lengths),
        prefix=torch.full((B,), P, dtype=torch.int64),
        subject_ids=torch.from_numpy(subject_ids),
        modalities=modalities,
    )


def context_batch(
    store: TimelineStore,
    subject_index: int,
    end: int,
    max_len: int,
    modality_stores: Mapping[str, ModalitySource] | None = None,
    k_max: int | Mapping[str, int] = 4,
    at_time_us: int | None = None,
    *,
    max_tokens: Mapping[str, int | None] | None = None,
    unsafe_ignore_event_time: bool = False,
    media_retrieval: Literal["window", "token"] = "window",
) -> Batch:
    """ONE context to continue (B = 1): the static prefix as of the first kept token, then the last
    `max_len - static_len` timeline tokens before position `end` (exclusive), and per modality the up to
    k_max most recent events strictly before `at_time_us` (default: the last kept token's time).

    The row has lengths[0] = static_len + kept tokens <= max_len and prefix[0] = static_len; its last
    position's target is padding (loss_mask False). Built by `assemble`, exactly as training rows are.
    """
    keep = max_len - store.static_len
    if keep < 1:
        raise ValueError(f"max_len {max_len} leaves no room after the {store.static_len} static tokens")
    if not 0 < end <= int(store.lengths[subject_index]):
        raise ValueError(
            f"end {end} outside subject index {subject_index}'s {int(store.lengths[subject_index])} tokens"
        )
    at = None if at_time_us is None else [at_time_us]
    return assemble(store, [(subject_index, max(0, end - keep), end)], modality_stores, k_max, last_is_target=False,
                    at_times_us=at, max_tokens=max_tokens, unsafe_ignore_event_time=unsafe_ignore_event_time,
                    media_retrieval=media_retrieval)  # fmt: skip


# ----------------------------------------------------------------------------------------------------
# Plans of training windows


class TrainWindows:
    """The windows of one split for training or validation, and the micro-batches they make.

    block_size: model context (static prefix included); each window covers W = block_size - static_len + 1
    timeline tokens. Timelines shorter than 2 tokens have nothing to predict and are skipped.
    media_retrieval: which events each token may see (`assemble`; module docstring).
    """

    def __init__(
        self,
        store: TimelineStore,
        block_size: int,
        modality_stores: Mapping[str, ModalitySource] | None = None,
        k_max: int | Mapping[str, int] = 4,
        *,
        max_tokens: Mapping[str, int | None] | None = None,
        sampling: Literal["random", "stride"] = "random",
        stride: int = 0,
        seed: int = 0,
        pad_to_block: bool = False,
        media_retrieval: Literal["window", "token"] = "window",
    ):
        self.store, self.block_size = store, block_size
        self.modality_stores = dict(modality_stores or {})
        self.k_max, self.max_tokens = k_max, dict(max_tokens or {})
        self.media_retrieval = media_retrieval
        self.window = block_size - store.static_len + 1
        if self.window < 2:
            raise ValueError(f"block_size {block_size} leaves no room after {store.static_len} static tokens")
        if sampling not in ("random", "stride"):
            raise ValueError(f"sampling must be 'random' or 'stride', got {sampling!r}")
        self.sampling, self.seed = sampling, seed
        self.stride = stride or self.window - 1
        if self.stride < 1:
            raise ValueError(f"stride must be >= 1, got {stride}")
        self.pad_to = block_size if pad_to_block else None
        self._subjects = np.flatnonzero(store.lengths >= 2)
        self.windows_per_epoch = len(self.plan(0))
        if self.windows_per_epoch == 0:
            raise ValueError(
                f"{store.root} split {store.split!r}: no timeline has 2 or more tokens to train on"
            )

    @functools.lru_cache(maxsize=2)  # noqa: B019 (a few small plans, kept for the object's life)
    def plan(self, epoch: int) -> np.ndarray:
        """(n_windows, 3) int64 rows (subject index, start, stop) in epoch order; a function of (seed, epoch)."""
        L = self.store.lengths[self._subjects].astype(np.int64)
        W = self.window
        if self.sampling == "random":
            counts = np.maximum(1, -(-(L - 1) // (W - 1)))
            subj = np.repeat(self._subjects, counts)
            span = np.repeat(np.maximum(L - W, 0), counts)
            rng = np.random.default_rng([self.seed, epoch])
            start = (rng.random(len(subj)) * (span + 1)).astype(np.int64)
            order = rng.permutation(len(subj))
        else:
            counts = np.maximum(1, -(-(L - W) // self.stride) + 1)
            subj = np.repeat(self._subjects, counts)
            first = np.repeat(np.cumsum(counts) - counts, counts)
            start = np.minimum(
                (np.arange(len(subj)) - first) * self.stride, np.repeat(np.maximum(L - W, 0), counts)
            )
            order = np.random.default_rng([self.seed, epoch]).permutation(len(subj))
        stop = np.minimum(start + W, self.store.lengths[subj])
        return np.stack([subj, start, stop], axis=1)[order]

    def batch(self, rows: np.ndarray) -> Batch:
        """Rows (n, 3) of a plan -> a training batch."""
        return assemble(self.store, rows.tolist(), self.modality_stores, self.k_max, last_is_target=True,
                        max_tokens=self.max_tokens, pad_to=self.pad_to,
                        media_retrieval=self.media_retrieval)  # fmt: skip

    def micro_batch(self, m: int, batch_size: int) -> Batch:
        """Micro-batch m (counted from the first epoch): windows [m B, (m + 1) B) of the concatenated plans,
        each epoch's incomplete last micro-batch dropped."""
        per_epoch = self.windows_per_epoch // batch_size
        if per_epoch == 0:
            raise ValueError(
                f"batch_size {batch_size} exceeds the {self.windows_per_epoch} windows of an epoch"
            )
        epoch, j = divmod(m, per_epoch)
        return self.batch(self.plan(epoch)[j * batch_size : (j + 1) * batch_size])


class _MicroBatches(torch.utils.data.Dataset):
    """Map-style view for a torch DataLoader: item m is micro-batch m."""

    def __init__(self, windows: TrainWindows, batch_size: int):
        self.windows, self.batch_size = windows, batch_size

    def __getitem__(self, m: int) -> Batch:
        return self.windows.micro_batch(m, self.batch_size)


def rank_micro_batches(step: int, grad_accum: int, rank: int = 0, world_size: int = 1) -> list[int]:
    """Global micro-batch numbers that rank `rank` computes at optimizer step `step`."""
    return [step * grad_accum + j for j in range(rank, grad_accum, world_size)]


def iterate_micro_batches(
    windows: TrainWindows,
    batch_size: int,
    grad_accum: int,
    start_step: int = 0,
    *,
    rank: int = 0,
    world_size: int = 1,
    workers: int = 0,
) -> Iterator[Batch]:
    """This rank's micro-batches from optimizer step `start_step` on, forever (grad_accum // world_size per
    step, in order). With workers > 0 a torch DataLoader builds them in background processes, same order."""
    if grad_accum % world_size:
        raise ValueError(
            f"grad_accum {grad_accum} must be a multiple of the number of processes {world_size}"
        )

    def numbers() -> Iterator[int]:
        step = start_step
        while True:
            yield from rank_micro_batches(step, grad_accum, rank, world_size)
            step += 1

    if workers <= 0:
        for m in numbers():
            yield windows.micro_batch(m, batch_size)
        return
    loader = torch.utils.data.DataLoader(
        _MicroBatches(windows, batch_size), batch_size=None, sampler=numbers(), num_workers=workers,
        prefetch_factor=4, persistent_workers=False,
    )  # fmt: skip
    yield from loader
