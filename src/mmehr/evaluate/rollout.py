"""Zero-shot evaluation by sampled futures: the batched, KV-cached rollout sampler.

For each task sample the model is conditioned on its context (static prefix + the last tokens up to the
task's context end, and the modality events acquired strictly before the prediction time, compressed once)
and K futures are sampled. A rollout stops at the first of:

    outcome       a token matching the task's `positive` patterns (the rollout is positive)
    stop          a token matching the task's `stop` patterns
    timeline_end  TIMELINE_END
    time_limit    the simulated clock passes the task's time limit (or its horizon, if shorter)
    cap           `max_new_tokens` generated without any of the above

The clock starts at the time of the last context token and advances only by the vocabulary's fitted mean
duration of each generated interval token, so it never moves backwards and never precedes the
prediction time. The probability of a sample is the fraction of its K rollouts that stopped on `outcome`.

All K rollouts of a batch of samples run as one batch: each context is prefilled once into a
preallocated KV cache and fanned out K times; finished rollouts are retired by compacting the cache
when enough of them are done; at the context limit the cache slides (the static prefix is kept and the
most recent tokens re-prefilled). `RecomputeStepper` is the cache-free reference (the way ETHOS samples:
the whole context is recomputed at every step) used by the tests and the benchmark.

`mmehr evaluate --checkpoint DIR --task NAME... --out OUT` runs it on a split's task samples (contexts
built by `mmehr.data.windows.assemble`, exactly as training windows) and writes:

    OUT/<task>/predictions.parquet  MEDS prediction schema (meds-evaluation's PredictionSchema); the
                                    predicted value uses the threshold chosen on the tuning split
    OUT/<task>/labels.parquet       MEDS label table (true labels read off the real timelines)
    OUT/<task>/rollouts.parquet     one row per rollout: stop reason, tokens generated, simulated time
    OUT/<task>/metrics.json         bootstrap CIs over subjects, stop-reason shares, cohorts, knock-outs
    OUT/<task>/curves.png           ROC, precision-recall and calibration
    OUT/<task>/tuning/              the tuning split's evaluation (the threshold's source)
    OUT/<task>/without_<m>/         with --knockout: the same checkpoint with modality m hidden
    OUT/<task>/chunks/              finished chunks of rollouts: the unit of resume (Ctrl-C, SIGTERM)
    OUT/thresholds.json, OUT/summary.md, OUT/manifest.json (written last)

Under torchrun each rank samples every world_size-th chunk and rank 0 merges; a chunk's randomness
depends only on (seed, chunk), so sharded, resumed and single runs give the same rollouts.
"""

from __future__ import annotations

import argparse
import datetime
import hashlib
import os
import re
import signal
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import polars as pl
import pyarrow as pa
import pyarrow.parquet as pq
import torch
from torch import Tensor
from tqdm import tqdm

from mmehr.config import to_dict
from mmehr.data.timelines import TimelineStore
from mmehr.data.windows import assemble
from mmehr.evaluate.metrics import (
    bootstrap_metrics,
    choose_threshold,
    paired_auroc_difference,
    plot_task_curves,
)
from mmehr.evaluate.tasks import DAY_US, TaskConfig, TaskTokens, load_task, task_samples, to_label_table
from mmehr.io import MANIFEST, atomic_path, read_json, write_json
from mmehr.modalities.store import EmbeddingStore
from mmehr.model.decoder import GPT

STOP_REASONS = ("outcome", "stop", "timeline_end", "time_limit", "cap")
OUTCOME, STOP, TIMELINE_END, TIME_LIMIT, CAP = range(len(STOP_REASONS))
CAP_WARNING = 0.2  # share of capped rollouts above which a task's probabilities are flagged as underestimated


# ----------------------------------------------------------------------------------------------------
# What a rollout starts from and what it obeys


@dataclass
class ContextBatch:
    """The contexts of S task samples, right-padded (`mmehr.data.windows.Batch` has the same fields).

    tokens (S, T) int64 (static prefix first, padding = 0 after each row's end); times (S, T) int64 µs
    (padding repeats the row's last time); lengths (S,) real tokens per row; prefix (S,) static tokens
    at the start of each row (kept by every sliding window); modalities: name -> ModalityInputs with
    S rows (events acquired strictly before each row's prediction time), or None.
    """

    tokens: Tensor
    times: Tensor
    lengths: Tensor
    prefix: Tensor
    modalities: dict | None = None

    def __len__(self) -> int:
        return self.tokens.shape[0]

    @classmethod
    def from_rows(
        cls,
        rows: list[tuple[np.ndarray, np.ndarray]],
        prefix: list[int] | np.ndarray,
        modalities: dict | None = None,
    ) -> ContextBatch:
        """Pad per-sample (tokens (n,), times (n,) µs) into a batch."""
        if not rows:
            raise ValueError("a context batch needs at least one row")
        lengths = torch.tensor([len(t) for t, _ in rows], dtype=torch.long)
        if int(lengths.min()) < 1:
            raise ValueError("every context needs at least one token")
        T = int(lengths.max())
        tokens = torch.zeros(len(rows), T, dtype=torch.long)
        times = torch.zeros(len(rows), T, dtype=torch.long)
        for b, (tok, tim) in enumerate(rows):
            n = len(tok)
            tokens[b, :n] = torch.as_tensor(np.asarray(tok, dtype=np.int64))
            times[b, :n] = torch.as_tensor(np.asarray(tim, dtype=np.int64))
            times[b, n:] = times[b, n - 1]
        return cls(tokens, times, lengths, torch.as_tensor(np.asarray(prefix), dtype=torch.long), modalities)


@dataclass
class RolloutRules:
    """A task's stopping rules over the model's vocabulary, as tensors on the sampling device.

    allowed (V,) bool: ids that may be sampled (generatable and inside the tokenizer's vocabulary);
    positive, stop (V,) bool; timeline_end: id; interval_us (V,) int64: fitted mean duration of each
    interval token (0 for every other token); limit_us: the clock limit after the prediction time.
    """

    allowed: Tensor
    positive: Tensor
    stop: Tensor
    timeline_end: int
    interval_us: Tensor
    limit_us: int

    @classmethod
    def build(
        cls, tt: TaskTokens, vocab, vocab_size: int, device: torch.device | str = "cpu"
    ) -> RolloutRules:
        """From resolved task tokens and the tokenizer's vocabulary; `vocab_size` is the model's (>= len(vocab))."""
        n = len(vocab)
        if vocab_size < n:
            raise ValueError(
                f"the model's vocab_size {vocab_size} is smaller than the vocabulary ({n} tokens)"
            )

        def pad(a: np.ndarray) -> Tensor:
            out = np.zeros(vocab_size, dtype=a.dtype)
            out[:n] = a
            return torch.as_tensor(out, device=device)

        interval = np.zeros(n, dtype=np.int64)
        for i, mean_us in vocab.interval_mean_us.items():
            interval[int(i)] = max(round(mean_us), 0)  # a duration never moves the clock back
        task = tt.task
        days = min(task.time_limit_days, task.horizon_days if task.horizon_days is not None else np.inf)
        stop = tt.stop.copy()
        stop[vocab.timeline_end_id] = False  # reported as its own reason
        return cls(
            allowed=pad(vocab.generatable_mask()),
            positive=pad(tt.positive),
            stop=pad(stop),
            timeline_end=int(vocab.timeline_end_id),
            interval_us=pad(interval),
            limit_us=int(days * DAY_US),
        )


@dataclass
class SamplerSettings:
    """How futures are sampled.

    n_rollouts: K futures per sample. temperature: softmax temperature (0 = greedy argmax).
    max_new_tokens: cap per rollout. batch_rows: rollouts decoded together (samples per batch =
    batch_rows // K). retire_below: compact the batch (drop finished rows from the cache) once fewer
    than this share of its rows are still running. seed: of the sampling generator.
    """

    n_rollouts: int = 20
    temperature: float = 1.0
    max_new_tokens: int = 256
    batch_rows: int = 512
    retire_below: float = 0.75
    seed: int = 0

    def __post_init__(self) -> None:
        if self.n_rollouts < 1 or self.max_new_tokens < 1 or self.batch_rows < 1:
            raise ValueError("n_rollouts, max_new_tokens and batch_rows must be >= 1")
        if self.temperature < 0:
            raise ValueError(f"temperature must be >= 0, got {self.temperature}")
        if not 0.0 < self.retire_below <= 1.0:
            raise ValueError(f"retire_below must be in (0, 1], got {self.retire_below}")

    @property
    def samples_per_batch(self) -> int:
        return max(1, self.batch_rows // self.n_rollouts)


@dataclass
class Rollouts:
    """Per-rollout records of S samples x K rollouts, rollout r = sample * K + k (numpy).

    sample (R,) int64 index into the context batch; rollout (R,) k; positive (R,) bool; reason (R,)
    int8 index into STOP_REASONS; n_tokens (R,) int32 generated tokens (the stopping token included);
    elapsed_us (R,) int64 simulated time from the last context token to the stop; last_token (R,) int32.
    With tracing: tokens (R, max_new_tokens) int64 (-1 after the stop) and times (R, max_new_tokens) µs.
    """

    sample: np.ndarray
    rollout: np.ndarray
    positive: np.ndarray
    reason: np.ndarray
    n_tokens: np.ndarray
    elapsed_us: np.ndarray
    last_token: np.ndarray
    tokens: np.ndarray | None = None
    times: np.ndarray | None = None
    stats: dict = field(default_factory=dict)

    def probabilities(self) -> np.ndarray:
        """(S,) float32: the fraction of each sample's K rollouts that reached the outcome."""
        n = int(self.sample.max()) + 1 if self.sample.size else 0
        k = np.bincount(self.sample, minlength=n)
        return (np.bincount(self.sample, weights=self.positive, minlength=n) / np.maximum(k, 1)).astype(
            np.float32
        )


# ----------------------------------------------------------------------------------------------------
# Steppers: one decoding step of a batch of rows, with the KV cache or by recomputation


def _prefill_args(model: GPT, media) -> dict:
    return {"media": media} if hasattr(model, "encode_media") else {}


class CachedStepper:
    """Decoding with the model's preallocated KV cache (media keys/values computed once at prefill)."""

    def __init__(self, model: GPT, batch_size: int, max_len: int, dtype: torch.dtype | None = None):
        self.model = model
        self.cache = model.new_cache(batch_size, max_len=max_len, dtype=dtype)

    def prefill(self, tokens: Tensor, times: Tensor, lengths: Tensor, prefix: Tensor, media) -> Tensor:
        """Fill the cache with (B, T) contexts; logits after each row's last token (B, V)."""
        return self.model.prefill(
            tokens, times, self.cache, lengths=lengths, prefix=prefix, **_prefill_args(self.model, media)
        )

    def keep(self, rows: Tensor) -> None:
        """Keep (and possibly repeat) rows: an index (B',) or a bool mask (B,)."""
        self.cache.keep(rows)

    def step(self, tokens: Tensor, times: Tensor) -> Tensor:
        """Append one token per row (B, 1) at times (B, 1) µs; logits for the next token (B, V)."""
        return self.model.decode(tokens, times, self.cache)[:, -1]


class RecomputeStepper:
    """No cache: every step recomputes the whole held context of every row (as ETHOS samples).

    Holds the same tokens a KV cache would, with the same sliding rule (slide all rows to 3/4 of max_len
    when the longest would overflow, keeping each row's static prefix), so its logits equal the cached
    stepper's: the reference for the tests and the baseline of the benchmark.
    """

    def __init__(self, model: GPT, batch_size: int, max_len: int, dtype: torch.dtype | None = None):
        self.model, self.max_len = model, max_len
        self.media = None

    def _logits(self) -> Tensor:
        """The whole held context through the model; the head only at each row's last token (B, V)."""
        span = int(self.lengths.max())
        times = self.times[:, :span]
        ctx = self.model.cross_context(times, media=self.media) if self.media is not None else None
        x = self.model.hidden(
            self.tokens[:, :span], torch.arange(span, device=times.device), ctx=ctx
        )  # (B, span, D)
        return self.model.lm_head(x[torch.arange(x.shape[0], device=x.device), self.lengths - 1])

    def prefill(self, tokens: Tensor, times: Tensor, lengths: Tensor, prefix: Tensor, media) -> Tensor:
        B, T = tokens.shape
        self.tokens = tokens.new_zeros(B, self.max_len)
        self.times = times.new_zeros(B, self.max_len)
        self.tokens[:, :T], self.times[:, :T] = tokens, times
        self.times[:, T:] = times[:, -1:]
        self.lengths, self.prefix, self.media = lengths.clone(), prefix.clone(), media
        return self._logits()

    def keep(self, rows: Tensor) -> None:
        if rows.dtype == torch.bool:
            rows = rows.nonzero().squeeze(1)
        self.tokens, self.times = self.tokens[rows], self.times[rows]
        self.lengths, self.prefix = self.lengths[rows], self.prefix[rows]
        if self.media is not None:
            self.media = self.media.select(rows)

    def step(self, tokens: Tensor, times: Tensor) -> Tensor:
        if int(self.lengths.max()) + 1 > self.max_len:  # the same slide as KVCache.window
            keep = min(self.max_len * 3 // 4, self.max_len - 1)
            j = torch.arange(keep, device=tokens.device)[None, :]
            shift = (self.lengths[:, None] - keep).clamp(min=0)
            idx = torch.where(j < self.prefix[:, None], j, j + shift).clamp(max=self.max_len - 1)
            self.tokens[:, :keep] = self.tokens.gather(1, idx)
            self.times[:, :keep] = self.times.gather(1, idx)
            self.lengths = self.lengths.clamp(max=keep)
        rows = torch.arange(tokens.shape[0], device=tokens.device)
        self.tokens[rows, self.lengths] = tokens[:, 0]
        self.times[rows, self.lengths] = times[:, 0]
        self.lengths = self.lengths + 1
        return self._logits()


# ----------------------------------------------------------------------------------------------------
# The sampler


def _next_tokens(
    logits: Tensor, bias: Tensor, temperature: float, generator: torch.Generator | None
) -> Tensor:
    """(B, V) logits -> (B,) ids. `bias` (V,) is -inf at ids that must never be drawn, 0 elsewhere."""
    logits = logits.float() + bias  # a new tensor: -inf where banned
    if temperature == 0:
        return logits.argmax(-1)
    if temperature != 1:
        logits /= temperature
    # Inverse-CDF draw: one uniform per row (torch.multinomial draws one exponential per id, ~25x slower).
    # The first id whose cumulative probability exceeds u: a zero-probability id never is.
    cdf = torch.softmax(logits, dim=-1).cumsum(-1)  # (B, V)
    u = torch.rand(cdf.shape[0], 1, device=cdf.device, generator=generator) * cdf[:, -1:]
    ids = torch.searchsorted(cdf, u, right=True).squeeze(1)
    return ids.clamp(max=cdf.shape[1] - 1)


@torch.no_grad()
def sample_rollouts(
    model: GPT,
    batch: ContextBatch,
    rules: RolloutRules,
    settings: SamplerSettings,
    *,
    recompute: bool = False,
    trace: bool = False,
    generator: torch.Generator | None = None,
    cache_dtype: torch.dtype | None = None,
) -> Rollouts:
    """Sample K futures for every context of `batch` (all S x K rollouts decoded together).

    The model's media (if any) is compressed once per sample and fanned out with the cache. Returns one
    record per rollout; with `trace`, also every generated token and its time.
    """
    model.eval()
    device = rules.allowed.device
    bias = torch.zeros(rules.allowed.shape, device=device).masked_fill(~rules.allowed, float("-inf"))
    S, K, n_new = len(batch), settings.n_rollouts, settings.max_new_tokens
    tokens, times = batch.tokens.to(device), batch.times.to(device)
    lengths, prefix = batch.lengths.to(device), batch.prefix.to(device)
    T = tokens.shape[1]
    max_len = min(model.config.block_size, T + n_new)
    if model.config.block_size < T:
        raise ValueError(f"contexts of {T} tokens exceed the model's block_size {model.config.block_size}")
    media = None
    if batch.modalities and hasattr(model, "encode_media"):
        media = model.encode_media({k: v.to(device) for k, v in batch.modalities.items()}, batch_size=S)

    stepper = (RecomputeStepper if recompute else CachedStepper)(model, S, max_len, dtype=cache_dtype)
    logits = stepper.prefill(tokens, times, lengths, prefix, media)  # (S, V)
    fan = torch.arange(S, device=device).repeat_interleave(K)  # rollout r -> its sample
    stepper.keep(fan)
    logits = logits[fan]

    R = S * K
    start = times[torch.arange(S, device=device), lengths - 1][fan]  # (R,) µs: the last context token's time
    clock = start.clone()
    ids = torch.arange(R, device=device)  # stepper row -> rollout
    running = torch.ones(R, dtype=torch.bool, device=device)  # per stepper row
    reason = torch.full((R,), CAP, dtype=torch.int8, device=device)
    n_tokens = torch.zeros(R, dtype=torch.int32, device=device)
    elapsed = torch.zeros(R, dtype=torch.long, device=device)
    last = torch.full((R,), -1, dtype=torch.int32, device=device)
    out_tokens = torch.full((R, n_new), -1, dtype=torch.long, device=device) if trace else None
    out_times = torch.full((R, n_new), -1, dtype=torch.long, device=device) if trace else None
    steps = 0
    for step in range(n_new):
        nxt = _next_tokens(logits, bias, settings.temperature, generator)  # (B,)
        clock = clock + rules.interval_us[nxt]
        live = ids[running]
        n_tokens[live] += 1
        last[live] = nxt[running].int()
        elapsed[live] = (clock - start)[running]
        if trace:
            out_tokens[live, step] = nxt[running]
            out_times[live, step] = clock[running]
        over = clock - start > rules.limit_us
        why = torch.full(nxt.shape, -1, dtype=torch.long, device=device)
        why = torch.where(rules.positive[nxt], OUTCOME, why)
        why = torch.where(rules.stop[nxt], STOP, why)
        why = torch.where(nxt == rules.timeline_end, TIMELINE_END, why)
        why = torch.where(over, TIME_LIMIT, why).to(torch.int8)  # past the limit, nothing counts
        ended = running & (why >= 0)
        reason[ids[ended]] = why[ended]
        running &= ~ended
        steps += 1
        n_running = int(running.sum())
        if n_running == 0 or step == n_new - 1:
            break
        if n_running < settings.retire_below * running.numel():
            stepper.keep(running)  # retire finished rollouts: a smaller cache from here on
            ids, clock, start, nxt = ids[running], clock[running], start[running], nxt[running]
            running = torch.ones(n_running, dtype=torch.bool, device=device)
        logits = stepper.step(nxt[:, None], clock[:, None])

    positive = reason == OUTCOME
    out = Rollouts(
        sample=fan.cpu().numpy(),
        rollout=torch.arange(K).repeat(S).numpy(),
        positive=positive.cpu().numpy(),
        reason=reason.cpu().numpy(),
        n_tokens=n_tokens.cpu().numpy(),
        elapsed_us=elapsed.cpu().numpy(),
        last_token=last.cpu().numpy(),
        tokens=out_tokens.cpu().numpy() if trace else None,
        times=out_times.cpu().numpy() if trace else None,
        stats={"steps": steps, "generated_tokens": int(n_tokens.sum()), "prefill_tokens": int(lengths.sum())},
    )
    return out


# ----------------------------------------------------------------------------------------------------
# Evaluating one task: samples -> chunks of rollouts (the unit of resume) -> MEDS predictions


PREDICTION_SCHEMA = pa.schema(
    [
        ("subject_id", pa.int64()),
        ("prediction_time", pa.timestamp("us")),
        ("boolean_value", pa.bool_()),
        ("predicted_boolean_value", pa.bool_()),
        ("predicted_boolean_probability", pa.float32()),
    ]
)
ROLLOUT_COLUMNS = {
    "sample": pl.Int64,
    "subject_id": pl.Int64,
    "prediction_time": pl.Int64,
    "rollout": pl.Int32,
    "positive": pl.Boolean,
    "stop_reason": pl.String,
    "n_tokens": pl.Int32,
    "elapsed_us": pl.Int64,
    "last_token": pl.String,
}


@dataclass
class EvalData:
    """Where contexts come from: the tokenized timelines and the modality embedding stores.

    context_tokens: tokens per context, static prefix included (<= the model's block_size); k_max and
    max_tokens: events per modality and encoder tokens per event, as in training.
    """

    timelines: Path
    context_tokens: int
    modality_stores: dict[str, EmbeddingStore] = field(default_factory=dict)
    k_max: int | dict[str, int] = 4
    max_tokens: dict[str, int | None] | None = None


@dataclass
class Unit:
    """One evaluation: a task on a split, with some modalities hidden; its outputs live in `directory`."""

    task: TaskConfig
    split: str
    hidden: tuple[str, ...]
    directory: Path

    @property
    def name(self) -> str:
        hidden = f" without {'+'.join(self.hidden)}" if self.hidden else ""
        return f"{self.task.name} [{self.split}{hidden}]"


def _dist_info() -> tuple[int, int]:
    """(rank, world size) under torchrun, else (0, 1)."""
    return int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))


def _barrier() -> None:
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.barrier()


def _fingerprint(
    unit: Unit, samples: pl.DataFrame, settings: SamplerSettings, data: EvalData, extra: dict
) -> dict:
    """What a unit's chunks depend on: a rerun with a different fingerprint must not reuse them."""
    digest = hashlib.sha256(
        samples.select("subject_id", "context_end").write_ipc(None).getvalue()
    ).hexdigest()
    return {
        "task": to_dict(unit.task),
        "split": unit.split,
        "hidden_modalities": list(unit.hidden),
        "samples": samples.height,
        "samples_sha256": digest,
        "sampler": to_dict(settings),
        "context_tokens": data.context_tokens,
        "modalities": sorted(set(data.modality_stores) - set(unit.hidden)),
        **extra,
    }


def _chunk_path(unit: Unit, c: int) -> Path:
    return unit.directory / "chunks" / f"chunk-{c:06d}.parquet"


def run_unit(
    model: GPT,
    unit: Unit,
    data: EvalData,
    settings: SamplerSettings,
    *,
    max_samples: int | None = None,
    device: torch.device | str = "cpu",
    fingerprint_extra: dict | None = None,
    unsafe_leak: bool = False,
    progress: bool = True,
) -> pl.DataFrame:
    """Sample every chunk of a unit this rank owns (skipping finished ones); returns the unit's samples.

    Chunk c holds samples [c S, (c + 1) S) (S = settings.samples_per_batch) and belongs to rank c % world.
    Each finished chunk is written atomically, so an interruption loses at most the chunk in flight.
    `unsafe_leak` builds contexts with the windows' `unsafe_ignore_event_time` (leakage test only).
    """
    store = TimelineStore(data.timelines, unit.split)
    samples = task_samples(unit.task, store, max_samples=max_samples)
    rank, world = _dist_info()
    fp = _fingerprint(unit, samples, settings, data, fingerprint_extra or {})
    fp_path = unit.directory / "chunks" / "settings.json"
    if rank == 0:
        if fp_path.is_file() and read_json(fp_path) != fp:
            raise ValueError(
                f"{unit.directory} holds chunks of an evaluation with other settings ({fp_path}); use another "
                "--out, or delete that directory to start it again"
            )
        write_json(fp_path, fp)
    _barrier()
    S = settings.samples_per_batch
    n_chunks = -(-samples.height // S)
    mine = [c for c in range(n_chunks) if c % world == rank and not _chunk_path(unit, c).is_file()]
    rules = RolloutRules.build(
        TaskTokens.resolve(unit.task, store.vocab), store.vocab, model.config.vocab_size, device
    )
    stores = {k: v for k, v in data.modality_stores.items() if k not in unit.hidden}
    cuda = torch.device(device).type == "cuda"
    todo = sum(min(S, samples.height - c * S) for c in mine)
    bar = tqdm(total=todo, desc=unit.name, unit="sample", disable=not progress or rank != 0)
    t0, generated = time.perf_counter(), 0
    for c in mine:
        part = samples.slice(c * S, S)
        spans = [
            (i, max(0, e - (data.context_tokens - store.static_len)), e)
            for i, e in zip(part["subject_index"].to_list(), part["context_end"].to_list())
        ]
        batch = assemble(
            store,
            spans,
            stores,
            data.k_max,
            last_is_target=False,
            at_times_us=part["prediction_time"].to_list(),
            max_tokens=data.max_tokens,
            unsafe_ignore_event_time=unsafe_leak,
        )
        generator = torch.Generator(device).manual_seed(settings.seed * 1_000_003 + c)
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=cuda):
            out = sample_rollouts(
                model,
                batch,
                rules,
                settings,
                generator=generator,
                cache_dtype=torch.bfloat16 if cuda else None,
            )
        generated += out.stats["generated_tokens"]
        k = out.sample
        frame = pl.DataFrame(
            {
                "sample": c * S + k,
                "subject_id": part["subject_id"].to_numpy()[k],
                "prediction_time": part["prediction_time"].to_numpy()[k],
                "rollout": out.rollout,
                "positive": out.positive,
                "stop_reason": np.asarray(STOP_REASONS)[out.reason],
                "n_tokens": out.n_tokens,
                "elapsed_us": out.elapsed_us,
                "last_token": [
                    store.vocab.itos[t] if 0 <= t < len(store.vocab) else "" for t in out.last_token
                ],
            },
            schema=ROLLOUT_COLUMNS,
        )
        with atomic_path(_chunk_path(unit, c)) as tmp:
            frame.write_parquet(tmp)
        bar.update(part.height)
        bar.set_postfix_str(f"{generated / (time.perf_counter() - t0):,.0f} tok/s")
    bar.close()
    return samples


def merge_unit(unit: Unit, samples: pl.DataFrame, settings: SamplerSettings) -> pl.DataFrame:
    """Merge a unit's chunks into rollouts.parquet and labels.parquet; returns the samples with their
    probability (`predicted_boolean_probability`). Rank 0 only, after every rank finished its chunks."""
    S = settings.samples_per_batch
    n_chunks = -(-samples.height // S)
    missing = [c for c in range(n_chunks) if not _chunk_path(unit, c).is_file()]
    if missing:
        raise RuntimeError(f"{unit.directory}: chunks {missing[:5]} are missing; rerun to finish them")
    rollouts = (
        pl.concat([pl.read_parquet(_chunk_path(unit, c)) for c in range(n_chunks)])
        if n_chunks
        else (pl.DataFrame(schema=ROLLOUT_COLUMNS))
    )
    with atomic_path(unit.directory / "rollouts.parquet") as tmp:
        rollouts.write_parquet(tmp)
    with atomic_path(unit.directory / "labels.parquet") as tmp:
        to_label_table(samples).write_parquet(tmp)
    prob = (
        rollouts.group_by("sample").agg(pl.col("positive").mean().cast(pl.Float32).alias("p")).sort("sample")
    )
    if prob.height != samples.height:
        raise RuntimeError(
            f"{unit.directory}: {prob.height} samples have rollouts, expected {samples.height}"
        )
    return samples.with_columns(predicted_boolean_probability=prob["p"])


def write_predictions(path: Path, scored: pl.DataFrame, threshold: float) -> Path:
    """The MEDS prediction table (meds-evaluation's PredictionSchema), predicted value = p >= threshold."""
    p = scored["predicted_boolean_probability"].to_numpy()
    table = pa.table(
        {
            "subject_id": pa.array(scored["subject_id"].to_numpy(), pa.int64()),
            "prediction_time": pa.array(scored["prediction_time"].to_numpy(), pa.int64()).cast(
                pa.timestamp("us")
            ),
            "boolean_value": pa.array(scored["boolean_value"].to_numpy(), pa.bool_()),
            "predicted_boolean_value": pa.array(p >= threshold, pa.bool_()),
            "predicted_boolean_probability": pa.array(p, pa.float32()),
        },
        schema=PREDICTION_SCHEMA,
    )
    with atomic_path(path) as tmp:
        pq.write_table(table, tmp)
    return path


# ----------------------------------------------------------------------------------------------------
# Metrics of a task: threshold from tuning, bootstrap CIs, stop reasons, cohorts, knock-outs, curves


# Cohorts by codes in the history before the prediction time (ICD-9 and ICD-10 diagnosis tokens): where
# the paper expects ECG (arrhythmia / ischaemia) and CXR (pulmonary) to matter most.
DEFAULT_COHORTS = {
    "cardiac": r"^DIAGNOSIS//ICD//(9//(41[0-4]|427)|10//I(2[0-5]|4[7-9]))",
    "pulmonary": r"^DIAGNOSIS//ICD//(9//(4[6-9]\d|5[01]\d)|10//J)",
}


def cohort_members(samples: pl.DataFrame, store: TimelineStore, pattern: str) -> np.ndarray:
    """(n,) bool: samples whose timeline before the context end holds a token matching `pattern`."""
    ids = np.zeros(len(store.vocab), dtype=bool)
    ids[store.vocab.ids_matching(pattern)] = True
    out = np.zeros(samples.height, dtype=bool)
    for j, (i, end) in enumerate(zip(samples["subject_index"].to_list(), samples["context_end"].to_list())):
        tokens, _ = store.timeline(int(i))
        out[j] = bool(ids[np.asarray(tokens[:end])].any())
    return out


def stop_reason_fractions(rollouts: pl.DataFrame) -> dict[str, float]:
    """Share of rollouts that ended by each reason (outcome, stop, timeline_end, time_limit, cap)."""
    n = max(rollouts.height, 1)
    counts = dict(rollouts.group_by("stop_reason").len().iter_rows())
    return {r: counts.get(r, 0) / n for r in STOP_REASONS}


def _clean(obj):
    """NaN -> None, so metrics.json is strict JSON."""
    if isinstance(obj, dict):
        return {k: _clean(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_clean(v) for v in obj]
    if isinstance(obj, float) and not np.isfinite(obj):
        return None
    return obj


def unit_summary(scored: pl.DataFrame, rollouts: pl.DataFrame, threshold: float, n_boot: int) -> dict:
    """Bootstrap metrics (subjects resampled) and rollout statistics of one scored unit."""
    y = scored["boolean_value"].to_numpy()
    p = scored["predicted_boolean_probability"].to_numpy()
    n_tok = rollouts["n_tokens"].to_numpy()
    return {
        "n_samples": scored.height,
        "n_subjects": scored["subject_id"].n_unique(),
        "n_positive": int(y.sum()),
        "prevalence": float(y.mean()) if y.size else float("nan"),
        "metrics": bootstrap_metrics(
            y, p, groups=scored["subject_id"].to_numpy(), threshold=threshold, n_boot=n_boot
        ),
        "stop_reasons": stop_reason_fractions(rollouts),
        "rollouts": {
            "n": rollouts.height,
            "mean_tokens": float(n_tok.mean()) if n_tok.size else 0.0,
            "mean_elapsed_days": float(rollouts["elapsed_us"].mean() or 0.0) / DAY_US,
        },
    }


@dataclass
class EvalOptions:
    """What to evaluate besides the sampler: the split, the threshold's source, hidden modalities,
    knock-outs (each also hidden in turn), cohorts (name -> token regex), bootstrap draws."""

    split: str = "held_out"
    max_samples: int | None = None
    threshold_from: str = "tuning"  # "tuning", "none" (0.5), or a JSON file {task: threshold}
    tuning_samples: int | None = None  # cap on the tuning split's samples (default: max_samples)
    hidden: tuple[str, ...] = ()
    knockout: tuple[str, ...] = ()
    cohorts: dict[str, str] = field(default_factory=lambda: dict(DEFAULT_COHORTS))
    n_boot: int = 1000
    unsafe_leak: bool = False


def _fixed_threshold(source: str, task: str) -> float:
    if source == "none":
        return 0.5
    path = Path(source)
    if not path.is_file():
        raise FileNotFoundError(f"--threshold-from {source}: not 'tuning', 'none', or an existing JSON file")
    data = read_json(path)
    value = data if isinstance(data, int | float) else data.get(task) if isinstance(data, dict) else None
    if not isinstance(value, int | float):
        raise ValueError(f"{path}: no threshold for task {task!r} (expected a number or {{task: number}})")
    return float(value)


def evaluate_task(
    model: GPT,
    task: TaskConfig,
    data: EvalData,
    settings: SamplerSettings,
    out: Path,
    options: EvalOptions,
    *,
    device: torch.device | str = "cpu",
    progress: bool = True,
    fingerprint_extra: dict | None = None,
) -> dict | None:
    """Evaluate one task into `out/<task>/`; returns its metrics.json content (None on ranks > 0)."""
    base = out / task.name
    variants = [tuple(options.hidden)] + [(*tuple(options.hidden), m) for m in options.knockout]
    units: dict[tuple, Unit] = {}
    for hidden in variants:
        d = base if hidden == variants[0] else base / f"without_{hidden[-1]}"
        units[hidden, options.split] = Unit(task, options.split, hidden, d)
        if options.threshold_from == "tuning" and options.split != "tuning":
            units[hidden, "tuning"] = Unit(task, "tuning", hidden, d / "tuning")
    samples = {
        key: run_unit(
            model,
            u,
            data,
            settings,
            max_samples=options.tuning_samples  # the threshold's tuning unit, beside the evaluated split
            if key[1] != options.split and options.tuning_samples
            else options.max_samples,
            device=device,
            progress=progress,
            fingerprint_extra=fingerprint_extra,
            unsafe_leak=options.unsafe_leak,
        )
        for key, u in units.items()
    }
    _barrier()
    if _dist_info()[0] != 0:
        return None
    if samples[variants[0], options.split].height == 0:
        raise ValueError(f"task {task.name}: no samples in split {options.split!r} of {data.timelines}")
    scored = {key: merge_unit(u, samples[key], settings) for key, u in units.items()}
    rollouts = {key: pl.read_parquet(u.directory / "rollouts.parquet") for key, u in units.items()}
    results: dict[tuple, dict] = {}
    for hidden in variants:
        main = scored[hidden, options.split]
        if options.threshold_from == "tuning":
            tuning = scored[hidden, "tuning"]  # the main unit itself when evaluating the tuning split
            threshold = choose_threshold(
                tuning["boolean_value"].to_numpy(), tuning["predicted_boolean_probability"].to_numpy()
            )
        else:
            threshold = _fixed_threshold(options.threshold_from, task.name)
        for split in {options.split, "tuning"} & {s for h, s in units if h == hidden}:
            write_predictions(
                units[hidden, split].directory / "predictions.parquet", scored[hidden, split], threshold
            )
        result = unit_summary(main, rollouts[hidden, options.split], threshold, options.n_boot)
        result["threshold"] = {"value": threshold, "source": options.threshold_from}
        if (hidden, "tuning") in units and options.split != "tuning":
            t = unit_summary(scored[hidden, "tuning"], rollouts[hidden, "tuning"], threshold, 0)
            result["tuning"] = {k: t[k] for k in ("n_samples", "n_positive", "prevalence", "stop_reasons")}
        results[hidden] = result

    full = results[variants[0]]
    main = scored[variants[0], options.split]
    y = main["boolean_value"].to_numpy()
    p = main["predicted_boolean_probability"].to_numpy()
    groups = main["subject_id"].to_numpy()
    store = TimelineStore(data.timelines, options.split)
    full["cohorts"] = {}
    for name, pattern in options.cohorts.items():
        m = cohort_members(main, store, pattern)
        full["cohorts"][name] = {
            "pattern": pattern,
            "n_samples": int(m.sum()),
            "n_positive": int(y[m].sum()),
            "metrics": bootstrap_metrics(
                y[m], p[m], groups=groups[m], threshold=full["threshold"]["value"], n_boot=options.n_boot
            )
            if m.any()
            else None,
        }
    full["knockout"] = {}
    curves = [("model" if not options.hidden else f"without {'+'.join(options.hidden)}", y, p)]
    for hidden in variants[1:]:
        q = scored[hidden, options.split]["predicted_boolean_probability"].to_numpy()
        full["knockout"][hidden[-1]] = {
            "metrics": results[hidden]["metrics"],
            "stop_reasons": results[hidden]["stop_reasons"],
            "threshold": results[hidden]["threshold"],
            "auroc_difference": paired_auroc_difference(y, p, q, groups=groups, n_boot=options.n_boot),
        }
        curves.append((f"without {hidden[-1]}", y, q))
    full = {"task": task.name, "split": options.split, "hidden_modalities": list(options.hidden), **full}
    with atomic_path(base / "curves.png") as tmp:
        plot_task_curves(
            curves,
            f"{task.name} ({options.split}, n={len(y)}, {int(y.sum())} positive)",
            tmp.with_suffix(".png"),
        )
        tmp.with_suffix(".png").rename(tmp)
    write_json(base / "metrics.json", _clean(full))
    return full


def _ci(m: dict | None, key: str) -> str:
    if not m or m.get(key) is None or m[key]["value"] is None or not np.isfinite(m[key]["value"]):
        return "n/a"
    v = m[key]
    lo, hi = v.get("lo"), v.get("hi")
    ci = (
        f" [{lo:.3f}, {hi:.3f}]"
        if lo is not None and hi is not None and np.isfinite(lo) and np.isfinite(hi)
        else ""
    )
    return f"{v['value']:.3f}{ci}"


def summary_markdown(results: dict[str, dict], header: dict) -> str:
    """The run's summary.md: one row per task, then stop reasons, cohorts and knock-outs."""
    lines = [f"# mmehr evaluate: {header['checkpoint']}", ""]
    lines += [f"- {k}: {v}" for k, v in header.items() if k != "checkpoint"]
    lines += ["", "## Metrics (95% bootstrap CI over subjects; F1 at the threshold chosen on tuning)", ""]
    cols = ("auroc", "auprc", "f1_macro", "f1_pos", "brier", "ece")
    lines.append("| task | n | positive | threshold | " + " | ".join(cols) + " |")
    lines.append("|---|---|---|---|" + "---|" * len(cols))
    for name, r in results.items():
        cells = " | ".join(_ci(r["metrics"], c) for c in cols)
        lines.append(
            f"| {name} | {r['n_samples']} | {r['n_positive']} | {r['threshold']['value']:.3f} | {cells} |"
        )
    lines += ["", "## How rollouts ended (share of rollouts)", ""]
    lines.append("| task | " + " | ".join(STOP_REASONS) + " | mean tokens | mean simulated days |")
    lines.append("|---|" + "---|" * (len(STOP_REASONS) + 2))
    for name, r in results.items():
        fr = " | ".join(f"{r['stop_reasons'][s]:.1%}" for s in STOP_REASONS)
        lines.append(
            f"| {name} | {fr} | {r['rollouts']['mean_tokens']:.1f} | {r['rollouts']['mean_elapsed_days']:.2f} |"
        )
    capped = [name for name, r in results.items() if r["stop_reasons"]["cap"] > CAP_WARNING]
    if capped:
        lines += [
            "",
            f"Warning: over {CAP_WARNING:.0%} of the rollouts of {', '.join(capped)} hit the token cap and "
            "count as negative: raise --max-new-tokens.",
        ]
    if any(r["cohorts"] for r in results.values()):
        lines += ["", "## Cohorts (codes in the history before the prediction time)", ""]
        lines += ["| task | cohort | n | positive | AUROC | AUPRC |", "|---|---|---|---|---|---|"]
        for name, r in results.items():
            for cohort, c in r["cohorts"].items():
                row = f"| {name} | {cohort} | {c['n_samples']} | {c['n_positive']} | {_ci(c['metrics'], 'auroc')} |"
                lines.append(f"{row} {_ci(c['metrics'], 'auprc')} |")
    if any(r["knockout"] for r in results.values()):
        lines += ["", "## Modality knock-out (the same checkpoint with one modality hidden)", ""]
        lines += ["| task | hidden | AUROC | AUROC(full) - AUROC(hidden) |", "|---|---|---|---|"]
        for name, r in results.items():
            for m, k in r["knockout"].items():
                d = k["auroc_difference"]
                lines.append(f"| {name} | {m} | {_ci(k['metrics'], 'auroc')} | {_ci({'d': d}, 'd')} |")
    return "\n".join(lines) + "\n"


def auto_batch_rows(model: GPT, max_len: int, device: torch.device | str, n_rollouts: int) -> int:
    """Rollout rows per batch that keep the KV cache within a memory budget (CPU 2 GiB, GPU 40% of free)."""
    c = model.config
    per_row = (
        c.n_layer * 2 * max_len * c.n_embd * (2 if torch.device(device).type == "cuda" else 4) + 16 * max_len
    )
    if torch.device(device).type == "cuda":
        budget = 0.4 * torch.cuda.mem_get_info(torch.device(device))[0]
    else:
        budget = 2 * 1024**3
    rows = int(budget // per_row)
    return max(n_rollouts, min(rows - rows % n_rollouts, 64 * n_rollouts))


def evaluate(
    model: GPT,
    tasks: list[TaskConfig],
    data: EvalData,
    settings: SamplerSettings,
    out: str | Path,
    options: EvalOptions | None = None,
    *,
    device: torch.device | str = "cpu",
    progress: bool = True,
    header: dict | None = None,
) -> dict[str, dict]:
    """Evaluate `tasks` into `out` (see `mmehr evaluate --help`); returns {task: metrics} on rank 0.

    Finished chunks of an earlier, interrupted run with the same settings are reused. The manifest is
    removed at the start and written last, so `out` is trusted only once every task is done.
    """
    options = options or EvalOptions()
    out = Path(out)
    rank, world = _dist_info()
    if rank == 0 and (out / MANIFEST).is_file():
        (out / MANIFEST).unlink()
    header = {"checkpoint": "(in memory)", **(header or {})}
    extra = {"checkpoint": header["checkpoint"], "unsafe_leak": options.unsafe_leak}
    t0 = time.perf_counter()
    results = {}
    for task in tasks:
        r = evaluate_task(
            model,
            task,
            data,
            settings,
            out,
            options,
            device=device,
            progress=progress,
            fingerprint_extra=extra,
        )
        if r is not None:
            results[task.name] = r
    if rank != 0:
        return {}
    seconds = time.perf_counter() - t0
    write_json(out / "thresholds.json", {name: r["threshold"]["value"] for name, r in results.items()})
    header = {
        **header,
        "split": options.split,
        "rollouts per sample": settings.n_rollouts,
        "temperature": settings.temperature,
        "max new tokens": settings.max_new_tokens,
        "context tokens": data.context_tokens,
        "hidden modalities": ", ".join(options.hidden) or "none",
        "threshold from": options.threshold_from,
    }
    with atomic_path(out / "summary.md") as tmp:
        tmp.write_text(summary_markdown(results, header))
    write_json(
        out / MANIFEST,
        {
            "stage": "evaluate",
            "created_at": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
            "checkpoint": header["checkpoint"],
            "tasks": list(results),
            "split": options.split,
            "sampler": to_dict(settings),
            "context_tokens": data.context_tokens,
            "hidden_modalities": list(options.hidden),
            "knockout": list(options.knockout),
            "threshold_from": options.threshold_from,
            "processes": world,
            "seconds": round(seconds, 3),
        },
    )
    return results


# ----------------------------------------------------------------------------------------------------
# `mmehr evaluate`


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--checkpoint", required=True, type=Path, help="training output directory (mmehr train)"
    )
    parser.add_argument(
        "--task", required=True, nargs="+", help="task preset names or YAML files (configs/tasks)"
    )
    parser.add_argument("--out", required=True, type=Path, help="output directory (resumed if it exists)")
    parser.add_argument("--rollouts", type=int, default=20, help="futures sampled per sample (default 20)")
    parser.add_argument("--split", default="held_out", help="split to evaluate (default held_out)")
    parser.add_argument("--max-samples", type=int, default=None, help="at most N samples per task and split")
    parser.add_argument(
        "--tuning-samples",
        type=int,
        default=None,
        help="at most N tuning-split samples for the threshold (default: --max-samples)",
    )
    parser.add_argument("--temperature", type=float, default=1.0, help="sampling temperature (0: greedy)")
    parser.add_argument("--max-new-tokens", type=int, default=256, help="cap of generated tokens per rollout")
    parser.add_argument(
        "--batch-size", type=int, default=None, help="rollouts decoded together (default: fit memory)"
    )
    parser.add_argument(
        "--context-tokens",
        type=int,
        default=None,
        help="context length, static prefix included (default: block_size - max_new_tokens, at least block_size/2)",
    )
    parser.add_argument(
        "--hide-modality", nargs="+", default=[], metavar="NAME", help="evaluate with these hidden"
    )
    parser.add_argument(
        "--knockout",
        nargs="*",
        default=None,
        metavar="NAME",
        help="also evaluate with each of these modalities hidden in turn (no names: every enabled modality)",
    )
    parser.add_argument(
        "--threshold-from",
        default="tuning",
        help="decision threshold: 'tuning' (chosen on the tuning split's predictions, evaluated too), "
        "'none' (0.5), or a JSON file {task: threshold} (e.g. an earlier run's thresholds.json)",
    )
    parser.add_argument(
        "--cohort",
        action="append",
        default=None,
        metavar="NAME=REGEX",
        help=f"cohort by a token pattern in the history (repeatable; default {', '.join(DEFAULT_COHORTS)})",
    )
    parser.add_argument(
        "--bootstrap", type=int, default=1000, help="bootstrap draws for the CIs (default 1000)"
    )
    parser.add_argument("--seed", type=int, default=0, help="sampling seed")
    parser.add_argument(
        "--timelines", type=Path, default=None, help="tokenized timelines (default: the training data)"
    )
    parser.add_argument("--device", default="auto", help="torch device (default: cuda if available)")
    parser.add_argument(
        "--threads", type=int, default=None, help="torch threads per process (default: cores / processes)"
    )
    parser.add_argument("--no-progress", action="store_true", help="hide progress bars")


def set_threads(threads: int | None) -> int:
    """Split the machine's cores between the processes of this node, unless told otherwise."""
    if threads is None:
        if os.environ.get("OMP_NUM_THREADS"):
            threads = int(os.environ["OMP_NUM_THREADS"])
        else:
            local = int(os.environ.get("LOCAL_WORLD_SIZE", 1))
            threads = max(1, len(os.sched_getaffinity(0)) // local)
    torch.set_num_threads(threads)
    return threads


def _parse_cohorts(items: list[str] | None) -> dict[str, str]:
    if items is None:
        return dict(DEFAULT_COHORTS)
    out = {}
    for item in items:
        name, sep, pattern = item.partition("=")
        if not sep or not name or not pattern:
            raise ValueError(f"--cohort {item!r}: expected NAME=REGEX")
        try:
            re.compile(pattern)
        except re.error as e:
            raise ValueError(f"--cohort {item!r}: bad regex: {e}") from e
        out[name] = pattern
    return out


def default_context_tokens(block_size: int, max_new_tokens: int) -> int:
    """Leave room for the rollout before the first slide, but keep at least half the block as context."""
    return max(block_size - max_new_tokens, block_size // 2)


def eval_data_from_config(cfg, args: argparse.Namespace) -> EvalData:
    """The timelines and modality stores a checkpoint was trained on (`--timelines` overrides the former)."""
    from mmehr.train import open_modality_stores

    block = cfg.model.block_size
    context = args.context_tokens or default_context_tokens(block, args.max_new_tokens)
    if not 1 <= context <= block:
        raise ValueError(f"--context-tokens {context} must be in [1, block_size {block}]")
    mods = {name: cfg.data.modalities[name] for name in cfg.model.modalities}
    return EvalData(
        timelines=Path(args.timelines or cfg.data.timelines),
        context_tokens=context,
        modality_stores=open_modality_stores(cfg),
        k_max={name: m.k_max for name, m in mods.items()},
        max_tokens={name: m.max_tokens for name, m in mods.items()},
    )


def _sigterm_as_interrupt(signum, frame):
    raise KeyboardInterrupt


def run(args: argparse.Namespace) -> int:
    from mmehr.checkpoint import load_model

    set_threads(args.threads)
    previous = signal.signal(signal.SIGTERM, _sigterm_as_interrupt)  # stop like Ctrl-C: finished chunks stay
    rank, world = _dist_info()
    if args.device == "auto":
        device = f"cuda:{int(os.environ.get('LOCAL_RANK', 0))}" if torch.cuda.is_available() else "cpu"
    else:
        device = args.device
    if world > 1 and not torch.distributed.is_initialized():
        backend = "nccl" if device.startswith("cuda") else "gloo"
        torch.distributed.init_process_group(backend, timeout=datetime.timedelta(hours=12))
    try:
        model, cfg = load_model(args.checkpoint, device)
        data = eval_data_from_config(cfg, args)
        tasks = [load_task(t) for t in args.task]
        enabled = set(getattr(model.config, "modalities", {}) or {})
        unknown = set(args.hide_modality) - enabled
        if unknown:
            raise ValueError(
                f"--hide-modality {sorted(unknown)}: the model's modalities are {sorted(enabled) or 'none'}"
            )
        knockout = (
            sorted(enabled - set(args.hide_modality)) if args.knockout == [] else list(args.knockout or [])
        )
        if set(knockout) - enabled:
            raise ValueError(f"--knockout {sorted(set(knockout) - enabled)}: not modalities of the model")
        batch_rows = args.batch_size or auto_batch_rows(model, model.config.block_size, device, args.rollouts)
        settings = SamplerSettings(
            n_rollouts=args.rollouts,
            temperature=args.temperature,
            max_new_tokens=args.max_new_tokens,
            batch_rows=batch_rows,
            seed=args.seed,
        )
        options = EvalOptions(
            split=args.split,
            max_samples=args.max_samples,
            tuning_samples=args.tuning_samples,
            threshold_from=args.threshold_from,
            hidden=tuple(args.hide_modality),
            knockout=tuple(knockout),
            cohorts=_parse_cohorts(args.cohort),
            n_boot=args.bootstrap,
        )
        results = evaluate(
            model,
            tasks,
            data,
            settings,
            args.out,
            options,
            device=device,
            progress=not args.no_progress,
            header={"checkpoint": str(Path(args.checkpoint).resolve())},
        )
    finally:
        signal.signal(signal.SIGTERM, previous)
        if world > 1 and torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()
    if rank == 0:
        for name, r in results.items():
            m, s = r["metrics"], r["stop_reasons"]
            print(
                f"{name}: n={r['n_samples']} ({r['n_positive']} positive)  AUROC {_ci(m, 'auroc')}  "
                f"AUPRC {_ci(m, 'auprc')}  F1 {_ci(m, 'f1_macro')}  rollouts ended by outcome {s['outcome']:.0%}, "
                f"stop {s['stop']:.0%}, time limit {s['time_limit']:.0%}, cap {s['cap']:.0%}"
            )
            if s["cap"] > CAP_WARNING:
                print(
                    f"  warning: {s['cap']:.0%} of {name}'s rollouts hit the cap of {args.max_new_tokens} tokens "
                    "(counted as negative): raise --max-new-tokens",
                    file=sys.stderr,
                )
        print(
            f"wrote {Path(args.out).resolve()} (summary.md, <task>/predictions.parquet, metrics.json, curves.png)"
        )
    return 0
