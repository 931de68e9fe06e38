"""Zero-shot tasks as data (configs/tasks/*.yaml) and their samples and labels from real timelines.

A task names, as regular expressions over token strings (so any MEDS code generation works):
- `start`: the event a prediction is made at (e.g. `^ICU_ADMISSION$`);
- `context_extra`: detail tokens right after the start token that still belong to the context (the
  admission type, the ICU unit, ...); the context ends after them, and the prediction time is the time
  of the last context token;
- `positive`: outcome tokens; `stop`: tokens that end the episode without the outcome;
- `horizon_days`: an outcome later than this after the prediction time counts as negative (null: none);
- `exclude_same_time`: skip a start whose timestamp also carries a token matching this (e.g. a death at
  the discharge that would start a readmission task);
- `first_after`: keep only the first start after each token matching this (and before the next one),
  e.g. ETHOS's ICU readmission: the first ICU discharge of each hospital stay;
- `require_followup`: drop negatives whose real timeline ends (TIMELINE_END) before the horizon, ETHOS's
  "reduced" 30-day readmission;
- `time_limit_days`: a rollout whose simulated clock passes this ends by `time_limit` (ETHOS: 2 years;
  null: none, the sampler's safety cap applies);
- `exclude_from_probability`: rollout stop reasons left out of the probability's denominator (ETHOS
  leaves out TIMELINE_END and time-limit rollouts for hospital mortality); `unfinished` always is.

The label of a sample is read off the real timeline the same way a rollout is scored: walk forward from
the context end to the first token matching `positive` or `stop` (TIMELINE_END always stops; a token
matching both is positive); the label is True iff that token is a positive one within the horizon.
"""

from __future__ import annotations

import importlib.resources
import re
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import polars as pl

from mmehr.config import from_dict, load_yaml
from mmehr.units import DAY_US

TASKS_DIR = Path(__file__).resolve().parents[3] / "configs" / "tasks"
# How a rollout can end (mmehr.evaluate.sampler): the outcome, a stop token, TIMELINE_END, the task's
# time limit, or a safety cap (unfinished: never counted).
STOP_REASONS = ("outcome", "stop", "timeline_end", "time_limit", "unfinished")


@dataclass
class TaskConfig:
    name: str
    description: str = ""
    start: str = ""
    context_extra: str | None = None
    positive: list[str] = field(default_factory=list)
    stop: list[str] = field(default_factory=list)
    horizon_days: float | None = None
    exclude_same_time: str | None = None
    first_after: str | None = None
    require_followup: bool = False
    # Rollouts that run this long (simulated time) without a positive or stop token end by `time_limit`.
    time_limit_days: float | None = 730.0
    exclude_from_probability: list[str] = field(default_factory=list)


def task_dirs() -> list[Path]:
    """Where task YAMLs are looked up: the repo's configs/tasks, then the installed package's copy."""
    dirs = [TASKS_DIR]
    packaged = Path(str(importlib.resources.files("mmehr") / "presets" / "tasks"))
    if packaged.is_dir():
        dirs.append(packaged)
    return [d for d in dirs if d.is_dir()]


def list_tasks() -> list[str]:
    return sorted({p.stem for d in task_dirs() for p in d.glob("*.yaml")})


def load_task(name_or_path: str | Path) -> TaskConfig:
    """A task by preset name (configs/tasks/NAME.yaml) or by path to a YAML file."""
    path = Path(name_or_path)
    if not path.is_file():
        for d in task_dirs():
            if (d / f"{name_or_path}.yaml").is_file():
                path = d / f"{name_or_path}.yaml"
                break
        else:
            raise FileNotFoundError(
                f"unknown task {name_or_path!r}: not a file, and not one of {list_tasks()}"
            )
    task = from_dict(TaskConfig, load_yaml(path), where=str(path))
    patterns = [task.start, task.context_extra, task.exclude_same_time, task.first_after]
    for pattern in [*patterns, *task.positive, *task.stop]:
        if pattern is not None:
            try:
                re.compile(pattern)
            except re.error as e:
                raise ValueError(f"{path}: bad pattern {pattern!r}: {e}") from e
    if not task.start or not task.positive:
        raise ValueError(f"{path}: a task needs `start` and `positive` patterns")
    unknown = set(task.exclude_from_probability) - set(STOP_REASONS)
    if unknown:
        raise ValueError(f"{path}: exclude_from_probability {sorted(unknown)}: not one of {STOP_REASONS}")
    if task.require_followup and task.horizon_days is None:
        raise ValueError(f"{path}: require_followup needs a horizon_days")
    return task


@dataclass
class TaskTokens:
    """A task's patterns resolved to token-id masks over one vocabulary."""

    task: TaskConfig
    start: np.ndarray  # bool (V,)
    context_extra: np.ndarray
    positive: np.ndarray
    stop: np.ndarray  # includes TIMELINE_END
    exclude: np.ndarray
    first_after: np.ndarray

    @classmethod
    def resolve(cls, task: TaskConfig, vocab) -> TaskTokens:
        def mask(patterns) -> np.ndarray:
            m = np.zeros(len(vocab), dtype=bool)
            for p in [patterns] if isinstance(patterns, str) else patterns or []:
                m[vocab.ids_matching(p)] = True
            return m

        stop = mask(task.stop)
        stop[vocab.timeline_end_id] = True
        start = mask(task.start)
        if not start.any():
            raise ValueError(
                f"task {task.name}: start pattern {task.start!r} matches no token of the vocabulary"
            )
        if not mask(task.positive).any():
            raise ValueError(f"task {task.name}: positive patterns {task.positive} match no token")
        return cls(
            task,
            start,
            mask(task.context_extra),
            mask(task.positive),
            stop,
            mask(task.exclude_same_time),
            mask(task.first_after),
        )

    @property
    def outcome(self) -> np.ndarray:
        return self.positive | self.stop


def label_from(
    tt: TaskTokens, tokens: np.ndarray, times: np.ndarray, begin: int, prediction_time: int
) -> tuple[bool, int, int]:
    """Scan tokens[begin:] for the first positive-or-stop token: (label, position, time); -1 if none.
    A token matching both a positive and a stop pattern (DISCHARGE_LOCATION//DIED) is positive."""
    hits = np.flatnonzero(tt.outcome[tokens[begin:]])
    if hits.size == 0:
        return False, -1, -1
    pos = begin + int(hits[0])
    label = bool(tt.positive[tokens[pos]])
    if label and tt.task.horizon_days is not None:
        label = times[pos] - prediction_time <= tt.task.horizon_days * DAY_US
    return label, pos, int(times[pos])


def task_samples(task: TaskConfig, store, max_samples: int | None = None) -> pl.DataFrame:
    """Every sample of `task` in a TimelineStore split, with its true label from the real timeline.

    Columns: subject_id, subject_index, start_pos, context_end (exclusive end of the context, an index
    into the subject's timeline), prediction_time (µs; time of the last context token), boolean_value,
    outcome_pos (-1 if the timeline ends first), outcome_time (µs; of the first positive or stop token,
    TIMELINE_END included: the true time to set beside a rollout's simulated one).
    """
    tt = TaskTokens.resolve(task, store.vocab)
    rows = []
    for i in range(len(store)):
        tokens, times = store.timeline(i)
        tokens = np.asarray(tokens)
        times = np.asarray(times)
        starts = np.flatnonzero(tt.start[tokens])
        if tt.first_after.any():
            starts = _first_after(starts, np.flatnonzero(tt.first_after[tokens]))
        for s in starts:
            if tt.exclude.any():
                same = times == times[s]
                if tt.exclude[tokens[same]].any():
                    continue
            end = int(s) + 1
            while end < tokens.size and tt.context_extra[tokens[end]]:
                end += 1
            if end >= tokens.size:
                continue
            t_pred = int(times[end - 1])
            label, pos, t_out = label_from(tt, tokens, times, end, t_pred)
            if task.require_followup and not label and t_out - t_pred < task.horizon_days * DAY_US:
                continue  # a negative followed for less than the horizon: unknown, not negative
            rows.append((int(store.subject_ids[i]), i, int(s), end, t_pred, label, pos, t_out))
    schema = {
        "subject_id": pl.Int64,
        "subject_index": pl.Int64,
        "start_pos": pl.Int64,
        "context_end": pl.Int64,
        "prediction_time": pl.Int64,
        "boolean_value": pl.Boolean,
        "outcome_pos": pl.Int64,
        "outcome_time": pl.Int64,
    }
    df = pl.DataFrame(rows, schema=schema, orient="row")
    if max_samples is not None and df.height > max_samples:
        df = df.sample(n=max_samples, seed=0).sort("subject_index", "start_pos")
    return df


def _first_after(starts: np.ndarray, anchors: np.ndarray) -> np.ndarray:
    """The first of sorted positions `starts` after each anchor position (and before the next anchor)."""
    if anchors.size == 0 or starts.size == 0:
        return starts[:0]
    k = np.searchsorted(starts, anchors, side="right")  # first start after each anchor
    nxt = np.append(anchors[1:], np.iinfo(np.int64).max)
    ok = (k < starts.size) & (starts[np.minimum(k, starts.size - 1)] < nxt)
    return np.unique(starts[k[ok]])


def to_label_table(samples: pl.DataFrame) -> pl.DataFrame:
    """The MEDS label schema: subject_id, prediction_time (timestamp[us]), boolean_value."""
    return samples.select(
        "subject_id",
        pl.col("prediction_time").cast(pl.Datetime("us")),
        "boolean_value",
    )
