"""`evaluate`: every task of an evaluation, each on its split (and the tuning split for the threshold),
with and without knocked-out modalities, into one output directory:

    OUT/<task>/predictions.parquet  MEDS prediction schema (meds-evaluation's PredictionSchema); the
                                    predicted value uses the threshold chosen on the tuning split; a
                                    sample none of whose rollouts counts (all unfinished, or left out
                                    by the task's rule) has no probability and is left out here
    OUT/<task>/labels.parquet       MEDS label table (true labels read off the real timelines)
    OUT/<task>/samples.parquet      every sample: label, true outcome token and time (outcome_time),
                                    probability (null: no counted rollout), counted rollouts
    OUT/<task>/rollouts.parquet     one row per rollout: stop reason, ending token, tokens generated,
                                    simulated vs true time to the outcome (+ the tokens: --save-tokens)
    OUT/<task>/metrics.json         bootstrap CIs over subjects, stop-reason shares, cohorts, knock-outs
    OUT/<task>/curves.png           ROC, precision-recall and calibration
    OUT/<task>/tuning/              the tuning split's evaluation (the threshold's source)
    OUT/<task>/without_<m>/         with --knockout: the same checkpoint with modality m hidden
    OUT/<task>/chunks/              finished chunks of rollouts: the unit of resume (Ctrl-C, SIGTERM)
    OUT/thresholds.json, OUT/summary.md, OUT/manifest.json (written last)

Contexts are built by `mmehr.data.windows.assemble`, exactly as training windows. Under torchrun each
rank samples its chunks (`mmehr.evaluate.runner`) and rank 0 merges and scores.
"""

from __future__ import annotations

import datetime
import time
from pathlib import Path

import polars as pl
import torch

from mmehr.config import to_dict
from mmehr.data.timelines import TimelineStore
from mmehr.distributed import Distributed
from mmehr.evaluate.metrics import (
    bootstrap_metrics,
    choose_threshold,
    paired_auroc_difference,
    plot_task_curves,
)
from mmehr.evaluate.reference import ReferenceData, score_references
from mmehr.evaluate.runner import EvalData, Unit, merge_unit, run_unit, write_predictions
from mmehr.evaluate.sampler import SamplerSettings
from mmehr.evaluate.scoring import (
    EvalOptions,
    clean_json,
    cohort_members,
    conclusive,
    fixed_threshold,
    summary_markdown,
    unit_summary,
)
from mmehr.evaluate.tasks import TaskConfig
from mmehr.io import MANIFEST, OutputLock, atomic_path, check_output, mark_output, write_json
from mmehr.modalities.payloads import EventPayloads
from mmehr.model.gpt import GPT


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
    extra = {**(fingerprint_extra or {}), "save_tokens": options.save_tokens}
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
            fingerprint_extra=extra,
            unsafe_leak=options.unsafe_leak,
            save_tokens=options.save_tokens,
        )
        for key, u in units.items()
    }
    d = Distributed.from_env()
    d.barrier()
    if not d.main:
        return None
    if samples[variants[0], options.split].height == 0:
        raise ValueError(f"task {task.name}: no samples in split {options.split!r} of {data.timelines}")
    scored = {key: merge_unit(u, samples[key], settings) for key, u in units.items()}
    rollouts = {key: pl.read_parquet(u.directory / "rollouts.parquet") for key, u in units.items()}
    results: dict[tuple, dict] = {}
    for hidden in variants:
        main = scored[hidden, options.split]
        if options.threshold_from == "tuning":
            tuning = conclusive(scored[hidden, "tuning"])  # the main unit itself on the tuning split
            threshold = choose_threshold(
                tuning["boolean_value"].to_numpy(), tuning["predicted_boolean_probability"].to_numpy()
            )
        else:
            threshold = fixed_threshold(options.threshold_from, task.name)
        for split in {options.split, "tuning"} & {s for h, s in units if h == hidden}:
            write_predictions(
                units[hidden, split].directory / "predictions.parquet",
                conclusive(scored[hidden, split]),
                threshold,
            )
        result = unit_summary(main, rollouts[hidden, options.split], threshold, options.n_boot)
        result["threshold"] = {"value": threshold, "source": options.threshold_from}
        if (hidden, "tuning") in units and options.split != "tuning":
            t = unit_summary(scored[hidden, "tuning"], rollouts[hidden, "tuning"], threshold, 0)
            result["tuning"] = {k: t[k] for k in ("n_samples", "n_positive", "prevalence", "stop_reasons")}
        results[hidden] = result

    full = results[variants[0]]
    main = conclusive(scored[variants[0], options.split])
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
        both = scored[variants[0], options.split].join(
            scored[hidden, options.split].select("sample", q="predicted_boolean_probability"),
            on="sample",
        )
        both = conclusive(both).drop_nulls("q")  # paired: samples with a probability in both runs
        q = scored[hidden, options.split]["predicted_boolean_probability"].drop_nulls().to_numpy()
        full["knockout"][hidden[-1]] = {
            "metrics": results[hidden]["metrics"],
            "stop_reasons": results[hidden]["stop_reasons"],
            "threshold": results[hidden]["threshold"],
            "auroc_difference": paired_auroc_difference(
                both["boolean_value"].to_numpy(),
                both["predicted_boolean_probability"].to_numpy(),
                both["q"].to_numpy(),
                groups=both["subject_id"].to_numpy(),
                n_boot=options.n_boot,
            ),
        }
        curves.append(
            (
                f"without {hidden[-1]}",
                conclusive(scored[hidden, options.split])["boolean_value"].to_numpy(),
                q,
            )
        )
    if options.reference and options.split != "train":
        reference_data = ReferenceData(
            context_tokens=data.context_tokens,
            # a finetuned modality's reference reads the stored (frozen-encoder) embeddings of its events
            modality_stores={
                m: s.store if isinstance(s, EventPayloads) else s
                for m, s in data.modality_stores.items()
                if m not in options.hidden
            },
            k_max=data.k_max
            if isinstance(data.k_max, dict)
            else dict.fromkeys(data.modality_stores, data.k_max),
            max_tokens=data.max_tokens or {},
            max_train_samples=options.reference_train_samples,
        )
        tuning_unit = (variants[0], "tuning")
        full["reference"], per_sample = score_references(
            task,
            TimelineStore(data.timelines, "train"),
            main,
            store,
            p,
            reference_data,
            tuning=(TimelineStore(data.timelines, "tuning"), scored[tuning_unit])
            if tuning_unit in scored
            else None,
            n_boot=options.n_boot,
        )
        with atomic_path(base / "reference.parquet") as tmp:
            per_sample.write_parquet(tmp)
        name = full["reference"]["matched"]
        curves.append((f"reference ({name})", y, per_sample[f"p_{name}"].to_numpy()))
    full = {"task": task.name, "split": options.split, "hidden_modalities": list(options.hidden), **full}
    with atomic_path(base / "curves.png") as tmp:
        plot_task_curves(
            curves,
            f"{task.name} ({options.split}, n={len(y)}, {int(y.sum())} positive)",
            tmp.with_suffix(".png"),
        )
        tmp.with_suffix(".png").rename(tmp)
    write_json(base / "metrics.json", clean_json(full))
    return full


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
    d = Distributed.from_env()
    header = {"checkpoint": "(in memory)", **(header or {})}
    checkpoint = Path(header["checkpoint"])
    inputs = [data.timelines, *(s.root for s in data.modality_stores.values())]
    check_output(out, "evaluate", inputs=[*inputs, *([checkpoint] if checkpoint.exists() else [])])
    d.barrier()  # every rank has checked `out` before rank 0 marks it
    lock = None
    if d.main:  # held to the end: a second evaluation into `out` fails, naming this one
        mark_output(out, "evaluate")
        lock = OutputLock(out, "evaluate")
        (out / MANIFEST).unlink(missing_ok=True)
    try:
        return _evaluate(
            model, tasks, data, settings, out, options, device=device, progress=progress, header=header
        )
    finally:
        if lock is not None:
            lock.release()


def _evaluate(
    model: GPT,
    tasks: list[TaskConfig],
    data: EvalData,
    settings: SamplerSettings,
    out: Path,
    options: EvalOptions,
    *,
    device: torch.device | str,
    progress: bool,
    header: dict,
) -> dict[str, dict]:
    """evaluate's work, with `out` checked and locked."""
    d = Distributed.from_env()
    rank, world = d.rank, d.world_size
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
        "safety cap (tokens per rollout)": settings.max_new_tokens,
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
            "max_samples": options.max_samples,
            "tuning_samples": options.tuning_samples,
            "bootstrap": options.n_boot,
            "reference": options.reference,
            "processes": world,
            "seconds": round(seconds, 3),
        },
    )
    return results
