"""Running an evaluation unit (a task on a split, some modalities hidden): samples -> chunks of rollouts
-> MEDS predictions.

Chunks are the unit of resume and of sharding: chunk c holds samples [c S, (c + 1) S) and belongs to
rank c % world_size; each finished chunk is written atomically, and a chunk's randomness depends only on
(seed, chunk), so sharded, resumed and single runs give the same rollouts. A unit's directory holds
`chunks/` (with `settings.json`, the fingerprint a rerun must match), then, merged by rank 0,
`rollouts.parquet`, `labels.parquet` and `predictions.parquet`.

`rollouts.parquet` reports each rollout as ETHOS-ARES does: why it stopped and the token that ended it,
its simulated time to that token beside the real timeline's time to the sample's outcome, whether it
counts in the probability, and with `save_tokens` every generated token.
"""

from __future__ import annotations

import hashlib
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import polars as pl
import pyarrow as pa
import pyarrow.parquet as pq
import torch
from tqdm import tqdm

from mmehr.batch import Batch
from mmehr.config import to_dict
from mmehr.data.timelines import TimelineStore
from mmehr.data.windows import ModalitySource, assemble
from mmehr.distributed import Distributed
from mmehr.evaluate.sampler import (
    STOP_REASONS,
    RolloutRules,
    Rollouts,
    SamplerSettings,
    rollout_probability,
    sample_rollouts,
)
from mmehr.evaluate.tasks import TaskConfig, TaskTokens, task_samples, to_label_table
from mmehr.io import atomic_path, read_json, write_json
from mmehr.model.gpt import GPT

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
    "counted": pl.Boolean,
    "last_token": pl.String,
    "n_tokens": pl.Int32,
    "elapsed_us": pl.Int64,
    "true_outcome": pl.String,
    "true_elapsed_us": pl.Int64,
}
TOKENS_COLUMN = ("tokens", pl.List(pl.String))  # with save_tokens: the generated tokens, the last included


@dataclass
class EvalData:
    """Where contexts come from: the tokenized timelines and the modality embedding stores (or, for a
    finetuned encoder, its events' payloads: the model encodes them, as in training).

    context_tokens: tokens per context, static prefix included (<= the model's block_size); k_max,
    max_tokens and media_retrieval: events per modality, encoder tokens per event, and which events each
    token may see, as in training.
    """

    timelines: Path
    context_tokens: int
    modality_stores: dict[str, ModalitySource] = field(default_factory=dict)
    k_max: int | dict[str, int] = 4
    max_tokens: dict[str, int | None] | None = None
    media_retrieval: str = "window"


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
    save_tokens: bool = False,
    progress: bool = True,
) -> pl.DataFrame:
    """Sample every chunk of a unit this rank owns (skipping finished ones); returns the unit's samples.

    Chunk c holds samples [c S, (c + 1) S) (S = settings.samples_per_batch) and belongs to rank c % world.
    Each finished chunk is written atomically, so an interruption loses at most the chunk in flight.
    `unsafe_leak` builds contexts with the windows' `unsafe_ignore_event_time` (leakage test only);
    `save_tokens` keeps every generated token in the rollout records.
    """
    store = TimelineStore(data.timelines, unit.split)
    samples = task_samples(unit.task, store, max_samples=max_samples)
    d = Distributed.from_env()
    rank, world = d.rank, d.world_size
    fp = _fingerprint(unit, samples, settings, data, fingerprint_extra or {})
    fp_path = unit.directory / "chunks" / "settings.json"
    if rank == 0:
        if fp_path.is_file() and read_json(fp_path) != fp:
            raise ValueError(
                f"{unit.directory} holds chunks of an evaluation with other settings ({fp_path}); use another "
                "--out, or delete that directory to start it again"
            )
        write_json(fp_path, fp)
    d.barrier()
    S = settings.samples_per_batch
    n_chunks = -(-samples.height // S)
    mine = [c for c in range(n_chunks) if c % world == rank and not _chunk_path(unit, c).is_file()]
    rules = RolloutRules.build(
        TaskTokens.resolve(unit.task, store.vocab), store.vocab, model.config.vocab_size, device
    )
    stores = visible_stores(data, unit.hidden)
    todo = sum(min(S, samples.height - c * S) for c in mine)
    bar = tqdm(total=todo, desc=unit.name, unit="sample", disable=not progress or rank != 0)
    t0, generated = time.perf_counter(), 0
    for c in mine:
        part = samples.slice(c * S, S)
        batch = chunk_contexts(store, part, data, stores, unsafe_leak=unsafe_leak)
        out = sample_chunk(model, batch, rules, settings, c, device, trace=save_tokens)
        generated += out.stats["generated_tokens"]
        frame = _rollout_frame(out, part, c * S, store, save_tokens)
        with atomic_path(_chunk_path(unit, c)) as tmp:
            frame.write_parquet(tmp)
        bar.update(part.height)
        bar.set_postfix_str(f"{generated / (time.perf_counter() - t0):,.0f} tok/s")
    bar.close()
    return samples


def visible_stores(data: EvalData, hidden: tuple[str, ...] | list[str]) -> dict[str, ModalitySource]:
    """The modality sources a unit sees: every one of `data` but the hidden ones."""
    return {k: v for k, v in data.modality_stores.items() if k not in hidden}


def chunk_contexts(
    store: TimelineStore,
    part: pl.DataFrame,
    data: EvalData,
    stores: dict[str, ModalitySource],
    *,
    unsafe_leak: bool = False,
) -> Batch:
    """The contexts of a chunk's samples (rows of `task_samples`): the last `data.context_tokens` tokens
    (static prefix included) up to each context end, with the events strictly before each prediction time."""
    spans = [
        (i, max(0, e - (data.context_tokens - store.static_len)), e)
        for i, e in zip(part["subject_index"].to_list(), part["context_end"].to_list())
    ]
    return assemble(
        store,
        spans,
        stores,
        data.k_max,
        last_is_target=False,
        at_times_us=part["prediction_time"].to_list(),
        max_tokens=data.max_tokens,
        unsafe_ignore_event_time=unsafe_leak,
        media_retrieval=data.media_retrieval,
    )


def sample_chunk(
    model: GPT,
    batch: Batch,
    rules: RolloutRules,
    settings: SamplerSettings,
    chunk: int,
    device: torch.device | str = "cpu",
    *,
    trace: bool = False,
    watch: list[int] | None = None,
) -> Rollouts:
    """Chunk `chunk`'s rollouts: its randomness depends only on (settings.seed, chunk), so a rerun of the
    same chunk (a resume, another rank, `mmehr explain`) draws the same futures on the same device.
    `watch`: only these samples of the chunk (indices in it) are wanted (`sample_rollouts`)."""
    generator = torch.Generator(device).manual_seed(settings.seed * 1_000_003 + chunk)
    cuda = torch.device(device).type == "cuda"
    with torch.autocast("cuda", dtype=torch.bfloat16, enabled=cuda):
        return sample_rollouts(
            model,
            batch,
            rules,
            settings,
            trace=trace,
            generator=generator,
            cache_dtype=torch.bfloat16 if cuda else None,
            watch=watch,
        )


def _rollout_frame(
    out, part: pl.DataFrame, first: int, store: TimelineStore, save_tokens: bool
) -> pl.DataFrame:
    """One chunk's rollout records (ROLLOUT_COLUMNS, + `tokens` with save_tokens)."""
    itos = np.asarray([*store.vocab.itos, ""], dtype=object)  # -1 (nothing generated) -> ""
    k = out.sample
    true_outcome = [
        store.vocab.itos[int(store.timeline(i)[0][pos])] if pos >= 0 else ""
        for i, pos in zip(part["subject_index"].to_list(), part["outcome_pos"].to_list())
    ]
    t_pred, t_out = part["prediction_time"].to_numpy(), part["outcome_time"].to_numpy()
    true_elapsed = np.where(part["outcome_pos"].to_numpy() >= 0, t_out - t_pred, -1)
    columns = {
        "sample": first + k,
        "subject_id": part["subject_id"].to_numpy()[k],
        "prediction_time": t_pred[k],
        "rollout": out.rollout,
        "positive": out.positive,
        "stop_reason": np.asarray(STOP_REASONS)[out.reason],
        "counted": out.counted,
        "last_token": itos[out.last_token],
        "n_tokens": out.n_tokens,
        "elapsed_us": out.elapsed_us,
        "true_outcome": np.asarray(true_outcome, dtype=object)[k],
        "true_elapsed_us": true_elapsed[k],
    }
    schema = dict(ROLLOUT_COLUMNS)
    if save_tokens:
        columns[TOKENS_COLUMN[0]] = [list(itos[row[row >= 0]]) for row in out.tokens]
        schema[TOKENS_COLUMN[0]] = TOKENS_COLUMN[1]
    return pl.DataFrame(columns, schema=schema)


def merge_unit(unit: Unit, samples: pl.DataFrame, settings: SamplerSettings) -> pl.DataFrame:
    """Merge a unit's chunks into rollouts.parquet, labels.parquet (the MEDS label schema) and
    samples.parquet (each sample's label with its true outcome token and time, probability and counted
    rollouts); returns the samples with their probability (`predicted_boolean_probability`: the share
    of counted rollouts that reached the outcome; null where none counts), `counted_rollouts` and
    `sample` (the row index, as in rollouts.parquet). Rank 0 only, after every rank finished its chunks."""
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
    n_sampled = rollouts["sample"].n_unique()
    if n_sampled != samples.height:
        raise RuntimeError(f"{unit.directory}: {n_sampled} samples have rollouts, expected {samples.height}")
    sample = rollouts["sample"].to_numpy()
    counted = rollouts["counted"].to_numpy()
    p = rollout_probability(sample, rollouts["positive"].to_numpy(), counted)
    n_counted = np.bincount(sample, weights=counted, minlength=samples.height).astype(np.int32)
    scored = samples.with_columns(
        sample=pl.Series(np.arange(samples.height, dtype=np.int64)),
        predicted_boolean_probability=pl.Series(p, dtype=pl.Float32).fill_nan(None),
        counted_rollouts=pl.Series(n_counted),
    )
    true_outcome = rollouts.group_by("sample").agg(pl.col("true_outcome").first()).sort("sample")
    record = scored.select(
        "subject_id",
        pl.col("prediction_time").cast(pl.Datetime("us")),
        "boolean_value",
        pl.when(pl.col("outcome_pos") >= 0).then(pl.col("outcome_time")).cast(pl.Datetime("us")),
        true_outcome=true_outcome["true_outcome"],
        predicted_boolean_probability="predicted_boolean_probability",
        counted_rollouts="counted_rollouts",
    )
    with atomic_path(unit.directory / "samples.parquet") as tmp:
        record.write_parquet(tmp)
    return scored


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
