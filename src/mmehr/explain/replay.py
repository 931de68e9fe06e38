"""Which sample to explain, and its evaluation replayed exactly.

`mmehr evaluate` samples a task's samples in chunks of `SamplerSettings.samples_per_batch`, chunk c with a
generator seeded by (seed, c) (`mmehr.evaluate.runner.sample_chunk`): the futures of one sample depend on
every other sample of its chunk. So a sample's risk is replayed by re-running its whole chunk with the
same samples, settings and seed, through the same functions: `Replay` says how the evaluation drew its
samples (read from an evaluation directory's fingerprint, or the settings `mmehr evaluate` would use),
and `ChunkReplayer` re-runs chunks, with modalities hidden for the knock-outs, once each.
"""

from __future__ import annotations

import dataclasses
import hashlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import polars as pl
import torch

from mmehr.batch import Batch
from mmehr.checkpoint import resolve_checkpoint
from mmehr.config import from_dict
from mmehr.data.timelines import TimelineStore
from mmehr.evaluate.runner import EvalData, chunk_contexts, sample_chunk, visible_stores
from mmehr.evaluate.sampler import RolloutRules, Rollouts, SamplerSettings, rollout_probability
from mmehr.evaluate.tasks import TaskConfig, TaskTokens, task_samples
from mmehr.io import read_json
from mmehr.model.gpt import GPT


@dataclass
class Replay:
    """How an evaluation drew and sampled one task's samples.

    samples: `task_samples` rows in the evaluation's order (row n is its sample n); hidden: the
    modalities it hid; unit_dir: the evaluation's `<task>` directory when replaying a recorded one.
    """

    task: TaskConfig
    split: str
    samples: pl.DataFrame
    settings: SamplerSettings
    data: EvalData
    hidden: tuple[str, ...] = ()
    unit_dir: Path | None = None

    def recorded(self, hidden: tuple[str, ...] = ()) -> pl.DataFrame | None:
        """The evaluation's own samples.parquet for `hidden` extra modalities hidden (a knock-out
        `without_<m>` unit), with its `sample` index; None when it has none."""
        if self.unit_dir is None:
            return None
        d = self.unit_dir if not hidden else self.unit_dir / f"without_{hidden[-1]}"
        if len(hidden) > 1 or not (d / "samples.parquet").is_file():
            return None
        return pl.read_parquet(d / "samples.parquet").with_row_index("sample")


def samples_sha256(samples: pl.DataFrame) -> str:
    """The digest `mmehr evaluate` records of its samples (`mmehr.evaluate.runner._fingerprint`)."""
    return hashlib.sha256(samples.select("subject_id", "context_end").write_ipc(None).getvalue()).hexdigest()


def replay_of_evaluation(eval_dir: Path, task_name: str, checkpoint: Path, data: EvalData) -> Replay:
    """The replay of task `task_name` of the `mmehr evaluate` output `eval_dir`, which must have been made
    from `checkpoint`; its samples are drawn again and checked against the evaluation's digest."""
    unit = Path(eval_dir) / task_name
    fp_path = unit / "chunks" / "settings.json"
    if not fp_path.is_file():
        tasks = sorted(p.parent.parent.name for p in Path(eval_dir).glob("*/chunks/settings.json"))
        raise FileNotFoundError(
            f"{eval_dir} holds no evaluation of task {task_name!r} ({fp_path} is missing); it has "
            f"{tasks or 'none'}"
        )
    fp = read_json(fp_path)
    if fp.get("unsafe_leak"):
        raise ValueError(f"{eval_dir} is a leakage-test evaluation (unsafe_leak): it cannot be explained")
    made_from = Path(fp["checkpoint"])
    if made_from.exists() and resolve_checkpoint(made_from) != resolve_checkpoint(checkpoint):
        raise ValueError(f"{eval_dir} was evaluated from {made_from}, not from --checkpoint {checkpoint}")
    task = from_dict(TaskConfig, fp["task"], where=str(fp_path))
    settings = from_dict(SamplerSettings, fp["sampler"], where=str(fp_path))
    data = dataclasses.replace(data, context_tokens=int(fp["context_tokens"]))
    store = TimelineStore(data.timelines, fp["split"])
    samples = task_samples(task, store, max_samples=int(fp["samples"]))
    if samples_sha256(samples) != fp["samples_sha256"]:
        raise ValueError(
            f"the samples of {task_name} drawn from {data.timelines} are not those {eval_dir} evaluated "
            "(other timelines or task definition): it cannot be replayed"
        )
    return Replay(task, fp["split"], samples, settings, data, tuple(fp["hidden_modalities"]), unit)


def parse_time_us(text: str) -> int:
    """A time given as µs since the epoch, or as an ISO date-time (UTC) such as 2150-03-01T14:30."""
    try:
        return int(text)
    except ValueError:
        pass
    try:
        return int(np.datetime64(text.rstrip("Z"), "us").astype(np.int64))
    except ValueError:
        raise ValueError(f"--prediction-time {text!r}: not µs since the epoch nor an ISO date-time") from None


def iso(time_us: int) -> str:
    """µs since the epoch -> 'YYYY-MM-DD HH:MM' (UTC)."""
    return str(np.datetime64(int(time_us), "us").astype("datetime64[m]")).replace("T", " ")


def find_sample(
    replay: Replay, *, sample: int | None = None, subject: int | None = None, at_us: int | None = None
) -> tuple[int, str | None]:
    """The index of the sample to explain: `sample` itself, or the sample of `subject` (at prediction time
    `at_us`; the first one when not given). Returns (index, a note when a choice was made)."""
    samples, name = replay.samples, replay.task.name
    if sample is not None:
        if not 0 <= sample < samples.height:
            raise ValueError(f"--sample {sample}: task {name} has samples 0..{samples.height - 1} here")
        return sample, None
    rows = samples.with_row_index("n").filter(pl.col("subject_id") == subject)
    if rows.height == 0:
        store = TimelineStore(replay.data.timelines, replay.split)
        if subject not in set(store.subject_ids.tolist()):
            raise ValueError(f"subject {subject} is not in split {replay.split!r} of {replay.data.timelines}")
        among = f"the {samples.height} samples evaluated" if replay.unit_dir else "its samples"
        raise ValueError(f"subject {subject} has no sample of task {name} among {among}")
    times = rows["prediction_time"].to_list()
    if at_us is None:
        note = None
        if rows.height > 1:
            note = (
                f"subject {subject} has {rows.height} samples of {name} (prediction times "
                f"{', '.join(iso(t) for t in times)}); explaining the first, choose with --prediction-time"
            )
        return int(rows["n"][0]), note
    hit = rows.filter(pl.col("prediction_time") == at_us)
    if hit.height == 0:
        raise ValueError(
            f"subject {subject} has no sample of {name} at {iso(at_us)}; its prediction times: "
            f"{', '.join(f'{iso(t)} ({t})' for t in times)}"
        )
    return int(hit["n"][0]), None


@dataclass
class SampleFutures:
    """One sample's K rollouts from a replayed chunk: probability (NaN if none counts), and per rollout
    reason (K,) index into STOP_REASONS, counted, n_tokens, elapsed_us, last_token, and with tracing
    tokens / times (K, n) (-1 after the stop)."""

    probability: float
    counted: np.ndarray
    reason: np.ndarray
    n_tokens: np.ndarray
    elapsed_us: np.ndarray
    last_token: np.ndarray
    tokens: np.ndarray | None
    times: np.ndarray | None


class ChunkReplayer:
    """Re-runs the chunks of a `Replay` (each (chunk, hidden) once) and hands out one sample's futures.

    A chunk's run stops once the rollouts of every sample wanted from it have ended (`sample_rollouts`'
    `watch`): those are exactly the evaluation's, the rest of the chunk is never needed. `want` names
    every sample that will be asked for, so that one run serves them all.
    """

    def __init__(self, model: GPT, replay: Replay, device: torch.device | str = "cpu"):
        self.model, self.replay, self.device = model, replay, device
        self.store = TimelineStore(replay.data.timelines, replay.split)
        tt = TaskTokens.resolve(replay.task, self.store.vocab)
        self.rules = RolloutRules.build(tt, self.store.vocab, model.config.vocab_size, device)
        self._runs: dict[tuple[int, tuple[str, ...]], tuple[Rollouts, set[int]]] = {}
        self._wanted: set[int] = set()

    @property
    def per_chunk(self) -> int:
        return self.replay.settings.samples_per_batch

    def want(self, samples: list[int]) -> None:
        """Samples that will be asked for (their chunks' runs wait for all of them)."""
        self._wanted |= {int(n) for n in samples}

    def context(self, n: int, hidden: tuple[str, ...] = ()) -> Batch:
        """Sample n's context alone (B = 1), built as its chunk builds it."""
        part = self.replay.samples.slice(n, 1)
        stores = visible_stores(self.replay.data, (*self.replay.hidden, *hidden))
        return chunk_contexts(self.store, part, self.replay.data, stores)

    def futures(self, n: int, hidden: tuple[str, ...] = ()) -> SampleFutures:
        """Sample n's rollouts, with `hidden` modalities hidden beside the evaluation's own (traced, i.e.
        with every generated token, when none is)."""
        S = self.per_chunk
        c, j = divmod(n, S)
        key = (c, tuple(hidden))
        if key not in self._runs or j not in self._runs[key][1]:
            watch = {j} | {m - c * S for m in self._wanted if m // S == c}
            part = self.replay.samples.slice(c * S, S)
            stores = visible_stores(self.replay.data, (*self.replay.hidden, *hidden))
            batch = chunk_contexts(self.store, part, self.replay.data, stores)
            out = sample_chunk(
                self.model, batch, self.rules, self.replay.settings, c, self.device,
                trace=not hidden, watch=sorted(watch),
            )  # fmt: skip
            self._runs[key] = (out, watch)
        out = self._runs[key][0]
        rows = np.flatnonzero(out.sample == j)
        p = rollout_probability(np.zeros(rows.size, dtype=np.int64), out.positive[rows], out.counted[rows])
        tokens = times = None
        if out.tokens is not None:
            width = int(out.n_tokens[rows].max(initial=0))
            tokens, times = out.tokens[rows, :width], out.times[rows, :width]
        return SampleFutures(
            probability=float(p[0]) if p.size else float("nan"),
            counted=out.counted[rows],
            reason=out.reason[rows],
            n_tokens=out.n_tokens[rows],
            elapsed_us=out.elapsed_us[rows],
            last_token=out.last_token[rows],
            tokens=tokens,
            times=times,
        )
