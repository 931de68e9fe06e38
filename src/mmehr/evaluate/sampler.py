"""Sampling futures: the batched, KV-cached rollout sampler of zero-shot evaluation.

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
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch
from torch import Tensor

from mmehr.batch import Batch
from mmehr.evaluate.tasks import TaskTokens
from mmehr.model.decoder import kept_on_slide, slide_window
from mmehr.model.fusion import Media
from mmehr.model.gpt import GPT
from mmehr.units import DAY_US

STOP_REASONS = ("outcome", "stop", "timeline_end", "time_limit", "cap")
OUTCOME, STOP, TIMELINE_END, TIME_LIMIT, CAP = range(len(STOP_REASONS))
CAP_WARNING = 0.2  # share of capped rollouts above which a task's probabilities are flagged as underestimated


# ----------------------------------------------------------------------------------------------------
# What a rollout obeys


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


class CachedStepper:
    """Decoding with the model's preallocated KV cache (media keys/values computed once at prefill)."""

    def __init__(self, model: GPT, batch_size: int, max_len: int, dtype: torch.dtype | None = None):
        self.model = model
        self.cache = model.new_cache(batch_size, max_len=max_len, dtype=dtype)

    def prefill(
        self, tokens: Tensor, times: Tensor, lengths: Tensor, prefix: Tensor, media: Media | None
    ) -> Tensor:
        """Fill the cache with (B, T) contexts; logits after each row's last token (B, V)."""
        return self.model.prefill(tokens, times, self.cache, media=media, lengths=lengths, prefix=prefix)

    def keep(self, rows: Tensor) -> None:
        """Keep (and possibly repeat) rows: an index (B',) or a bool mask (B,)."""
        self.cache.keep(rows)

    def step(self, tokens: Tensor, times: Tensor) -> Tensor:
        """Append one token per row (B, 1) at times (B, 1) µs; logits for the next token (B, V)."""
        return self.model.decode(tokens, times, self.cache)[:, -1]


class RecomputeStepper:
    """No cache: every step recomputes the whole held context of every row (as ETHOS samples).

    Holds the same tokens a KV cache would and slides by the same rule (`slide_window`), so its logits
    equal the cached stepper's: the reference for the tests and the baseline of the benchmark.
    """

    def __init__(self, model: GPT, batch_size: int, max_len: int, dtype: torch.dtype | None = None):
        self.model, self.max_len = model, max_len
        self.media: Media | None = None

    def _logits(self) -> Tensor:
        """The whole held context through the model; the head only at each row's last token (B, V)."""
        span = int(self.lengths.max())
        times = self.times[:, :span]
        fusion = self.model.fusion
        ctx = (
            fusion.context(times, media=self.media) if fusion is not None and self.media is not None else None
        )
        x = self.model.hidden(self.tokens[:, :span], torch.arange(span, device=times.device), ctx=ctx)
        return self.model.lm_head(x[torch.arange(x.shape[0], device=x.device), self.lengths - 1])  # (B, V)

    def prefill(
        self, tokens: Tensor, times: Tensor, lengths: Tensor, prefix: Tensor, media: Media | None
    ) -> Tensor:
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
        if int(self.lengths.max()) + 1 > self.max_len:  # the same slide as the KV cache's
            keep = kept_on_slide(self.max_len, 1)
            kept_tokens, kept_times, self.lengths = slide_window(
                self.tokens, self.times, self.lengths, self.prefix, keep
            )
            self.tokens[:, :keep], self.times[:, :keep] = kept_tokens, kept_times
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
    batch: Batch,
    rules: RolloutRules,
    settings: SamplerSettings,
    *,
    recompute: bool = False,
    trace: bool = False,
    generator: torch.Generator | None = None,
    cache_dtype: torch.dtype | None = None,
) -> Rollouts:
    """Sample K futures for every context of `batch` (all S x K rollouts decoded together).

    `batch`: S contexts to continue (`Batch.from_contexts`, or `mmehr.data.windows.assemble` with
    last_is_target=False), with the modality events each may see. The model's media (if any) is
    compressed once per sample and fanned out with the cache. Returns one record per rollout; with
    `trace`, also every generated token and its time.
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
    media = model.encode_media({k: v.to(device) for k, v in batch.modalities.items()}, S)

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
