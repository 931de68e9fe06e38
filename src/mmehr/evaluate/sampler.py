"""Sampling futures: the batched, KV-cached rollout sampler of zero-shot evaluation.

For each task sample the model is conditioned on its context (static prefix + the last tokens up to the
task's context end, and the modality events acquired strictly before the prediction time, compressed once)
and K futures are sampled. A rollout stops at the first of:

    outcome       a token matching the task's `positive` patterns (the rollout is positive; a token that
                  matches both a positive and a stop pattern, e.g. DISCHARGE_LOCATION//DIED, is an outcome)
    stop          a token matching the task's `stop` patterns
    timeline_end  TIMELINE_END
    time_limit    the simulated clock passes the task's time limit (or its horizon, if shorter)
    unfinished    a safety cap (`max_new_tokens`, or `max_simulated_days` for a task without a time
                  limit) reached without any of the above: ETHOS has no token cap, so such a rollout
                  is no evidence either way and never counts as negative

The clock starts at the time of the last context token and advances only by the vocabulary's fitted mean
duration of each generated interval token, so it never moves backwards and never precedes the
prediction time. The probability of a sample is the fraction of its counted rollouts that stopped on
`outcome`: unfinished rollouts and those whose reason the task lists in `exclude_from_probability`
(ETHOS leaves TIMELINE_END and time-limit rollouts out for hospital mortality) are not counted.

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
from mmehr.evaluate.tasks import STOP_REASONS, TaskTokens
from mmehr.model.decoder import kept_on_slide, slide_window
from mmehr.model.fusion import Media
from mmehr.model.gpt import GPT
from mmehr.units import DAY_US

OUTCOME, STOP, TIMELINE_END, TIME_LIMIT, UNFINISHED = range(len(STOP_REASONS))
# Share of unfinished rollouts above which a task's summary warns: its probabilities rest on fewer rollouts.
UNFINISHED_WARNING = 0.05


# ----------------------------------------------------------------------------------------------------
# What a rollout obeys


@dataclass
class RolloutRules:
    """A task's stopping rules over the model's vocabulary, as tensors on the sampling device.

    allowed (V,) bool: ids that may be sampled (generatable and inside the tokenizer's vocabulary);
    positive, stop (V,) bool (disjoint: a token matching both is positive); timeline_end: id;
    interval_us (V,) int64: fitted mean duration of each interval token (0 for every other token);
    limit_us: the task's clock limit after the prediction time (None: the task has none);
    counted (len(STOP_REASONS),) bool: which stop reasons enter the probability's denominator.
    """

    allowed: Tensor
    positive: Tensor
    stop: Tensor
    timeline_end: int
    interval_us: Tensor
    limit_us: int | None
    counted: np.ndarray = field(default_factory=lambda: np.ones(len(STOP_REASONS), dtype=bool))

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
        days = min(
            np.inf if task.time_limit_days is None else task.time_limit_days,
            np.inf if task.horizon_days is None else task.horizon_days,
        )
        stop = tt.stop & ~tt.positive  # the outcome wins: DISCHARGE_LOCATION//DIED is a death, not a stop
        stop[vocab.timeline_end_id] = False  # reported as its own reason
        counted = np.array([r not in task.exclude_from_probability for r in STOP_REASONS])
        counted[UNFINISHED] = False
        return cls(
            allowed=pad(vocab.generatable_mask()),
            positive=pad(tt.positive),
            stop=pad(stop),
            timeline_end=int(vocab.timeline_end_id),
            interval_us=pad(interval),
            limit_us=None if np.isinf(days) else int(days * DAY_US),
            counted=counted,
        )


@dataclass
class SamplerSettings:
    """How futures are sampled.

    n_rollouts: K futures per sample. temperature: softmax temperature (0 = greedy argmax).
    max_new_tokens: safety cap per rollout (ETHOS has none; a rollout that reaches it is `unfinished`).
    max_simulated_days: safety cap on the simulated clock for tasks without a time limit (also
    `unfinished`). batch_rows: rollouts decoded together (samples per batch = batch_rows // K).
    retire_below: compact the batch (drop finished rows from the cache) once fewer than this share of
    its rows are still running. seed: of the sampling generator.
    """

    n_rollouts: int = 20
    temperature: float = 1.0
    max_new_tokens: int = 8192
    max_simulated_days: float = 3652.5
    batch_rows: int = 512
    retire_below: float = 0.75
    seed: int = 0

    def __post_init__(self) -> None:
        if self.n_rollouts < 1 or self.max_new_tokens < 1 or self.batch_rows < 1:
            raise ValueError("n_rollouts, max_new_tokens and batch_rows must be >= 1")
        if not self.max_simulated_days > 0:
            raise ValueError(f"max_simulated_days must be > 0, got {self.max_simulated_days}")
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
    int8 index into STOP_REASONS; counted (R,) bool: whether the rollout enters its sample's probability;
    n_tokens (R,) int32 generated tokens (the stopping token included); elapsed_us (R,) int64 simulated
    time from the last context token to the stop; last_token (R,) int32, the token that ended it. With
    tracing: tokens (R, n) int64 (-1 after the stop) and times (R, n) µs, n = the longest rollout.
    """

    sample: np.ndarray
    rollout: np.ndarray
    positive: np.ndarray
    reason: np.ndarray
    counted: np.ndarray
    n_tokens: np.ndarray
    elapsed_us: np.ndarray
    last_token: np.ndarray
    tokens: np.ndarray | None = None
    times: np.ndarray | None = None
    stats: dict = field(default_factory=dict)

    def probabilities(self) -> np.ndarray:
        """(S,) float32: the share of each sample's counted rollouts that reached the outcome; NaN for a
        sample none of whose rollouts counts."""
        return rollout_probability(self.sample, self.positive, self.counted)


def rollout_probability(sample: np.ndarray, positive: np.ndarray, counted: np.ndarray) -> np.ndarray:
    """(S,) float32: per sample index, positive counted rollouts / counted rollouts (NaN if none count)."""
    n = int(sample.max()) + 1 if sample.size else 0
    k = np.bincount(sample, weights=counted, minlength=n)
    hits = np.bincount(sample, weights=positive & counted, minlength=n)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(k > 0, hits / np.maximum(k, 1), np.nan).astype(np.float32)


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
    watch: list[int] | None = None,
) -> Rollouts:
    """Sample K futures for every context of `batch` (all S x K rollouts decoded together).

    `batch`: S contexts to continue (`Batch.from_contexts`, or `mmehr.data.windows.assemble` with
    last_is_target=False), with the modality events each may see. The model's media (if any) is
    compressed once per sample and fanned out with the cache. Returns one record per rollout; with
    `trace`, also every generated token and its time. `watch` (sample indices): stop as soon as those
    samples' rollouts have all ended; theirs are then exactly what a full run draws (a step's draws do not
    depend on later steps), the other samples' are cut short (reported `unfinished`).
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
    # Past the task's time limit a rollout ends by `time_limit`; a task without one still stops at the
    # simulated-time safety cap, as `unfinished`.
    limit = rules.limit_us if rules.limit_us is not None else int(settings.max_simulated_days * DAY_US)
    over_reason = TIME_LIMIT if rules.limit_us is not None else UNFINISHED
    ids = torch.arange(R, device=device)  # stepper row -> rollout
    watched = None if watch is None else torch.isin(fan, torch.as_tensor(watch, device=device))  # (R,)
    running = torch.ones(R, dtype=torch.bool, device=device)  # per stepper row
    reason = torch.full((R,), UNFINISHED, dtype=torch.int8, device=device)
    n_tokens = torch.zeros(R, dtype=torch.int32, device=device)
    elapsed = torch.zeros(R, dtype=torch.long, device=device)
    last = torch.full((R,), -1, dtype=torch.int32, device=device)
    trail: list[tuple[Tensor, Tensor, Tensor]] = []  # with tracing: (rollouts, tokens, times) per step
    steps = 0
    for step in range(n_new):
        nxt = _next_tokens(logits, bias, settings.temperature, generator)  # (B,)
        clock = clock + rules.interval_us[nxt]
        live = ids[running]
        n_tokens[live] += 1
        last[live] = nxt[running].int()
        elapsed[live] = (clock - start)[running]
        if trace:
            trail.append((live, nxt[running], clock[running]))
        why = torch.full(nxt.shape, -1, dtype=torch.long, device=device)
        why = torch.where(rules.stop[nxt], STOP, why)
        why = torch.where(rules.positive[nxt], OUTCOME, why)  # after stop: a positive token always wins
        why = torch.where(nxt == rules.timeline_end, TIMELINE_END, why)
        why = torch.where(clock - start > limit, over_reason, why).to(torch.int8)  # past it, nothing counts
        ended = running & (why >= 0)
        reason[ids[ended]] = why[ended]
        running &= ~ended
        steps += 1
        n_running = int(running.sum())
        if n_running == 0 or step == n_new - 1:
            break  # rows still running keep reason UNFINISHED: the token cap
        if watched is not None and not bool(watched[ids[running]].any()):
            break  # every watched rollout has ended
        if n_running < settings.retire_below * running.numel():
            stepper.keep(running)  # retire finished rollouts: a smaller cache from here on
            ids, clock, start, nxt = ids[running], clock[running], start[running], nxt[running]
            running = torch.ones(n_running, dtype=torch.bool, device=device)
        logits = stepper.step(nxt[:, None], clock[:, None])

    positive = reason == OUTCOME
    reason_np = reason.cpu().numpy()
    out_tokens = out_times = None
    if trace:
        out_tokens = np.full((R, steps), -1, dtype=np.int64)
        out_times = np.full((R, steps), -1, dtype=np.int64)
        for step, (rows, tok, tim) in enumerate(trail):
            out_tokens[rows.cpu().numpy(), step] = tok.cpu().numpy()
            out_times[rows.cpu().numpy(), step] = tim.cpu().numpy()
    out = Rollouts(
        sample=fan.cpu().numpy(),
        rollout=torch.arange(K).repeat(S).numpy(),
        positive=positive.cpu().numpy(),
        reason=reason_np,
        counted=rules.counted[reason_np],
        n_tokens=n_tokens.cpu().numpy(),
        elapsed_us=elapsed.cpu().numpy(),
        last_token=last.cpu().numpy(),
        tokens=out_tokens,
        times=out_times,
        stats={"steps": steps, "generated_tokens": int(n_tokens.sum()), "prefill_tokens": int(lengths.sum())},
    )
    return out
