"""What a trained decoder's state holds at each prediction time, read by linear probes.

    python benchmarks/probe_states.py --synth demo_out/synth --task icu_admission --out probes.json \
        demo_out/experiments/runs/ehr_only/seed0 demo_out/experiments/runs/ecg_patch/seed0

For each RUN (its `train/` checkpoint), the task's samples are built as `mmehr evaluate` builds them
(the same contexts: the held-out split's first `--max-samples`, the context length the evaluation
defaults to, the modality events strictly before each prediction time) and the decoder's final hidden
state at each context's last token (the state every rollout starts from) is read. Probes fit on the train
split's samples (`--train-samples`) and scored on the held-out ones: a logistic probe of the task's
outcome (AUROC; and out of fold within the train samples: above the held-out figure, the state holds the
training outcomes themselves) and of each hidden condition (AF, opacity, symptom: AUROC), and a ridge
probe of the planted EHR part (ehr_strength x (0.5 frailty + acute); R^2), on the standardised states.
The logistic probes are fit as the supervised reference is (C by subject-grouped CV), the ridge's alpha
by leave-one-out CV. `--hide MOD` hides a modality, as `mmehr evaluate --hide-modality` does.

Beside the run's zero-shot AUROC (the same held-out samples, from `RUN/eval`) the outcome probe tells what
the state holds from what the rollouts make of it: a probe above the zero-shot means information is in
the state that sampling the future does not use. A condition probe at 0.5 means the modality's condition
never reached the decoder; the EHR part's R^2 says how well the state reads the EHR. Writes JSON
(`--out`) and prints a markdown table. This is how the ECG run was found to learn its training stays'
outcomes through their ECGs (docs/experiments.md, "What the decoder's state holds").

`--stages` follows each condition along the fusion, to say where a run that does not weigh it loses it:
the compressor's latents of the modality's most recent event before the prediction time (the encoder's
stored embeddings carry every condition at AUROC 1.000: the report's probe), the first cross-attention
block's output at the prediction token (before its gate), and the state.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import polars as pl
import torch
from sklearn.linear_model import RidgeCV
from sklearn.model_selection import GroupKFold

from mmehr.checkpoint import load_model
from mmehr.data.timelines import TimelineStore
from mmehr.evaluate.cli import eval_data_from_config
from mmehr.evaluate.metrics import auroc
from mmehr.evaluate.reference import fit_predict
from mmehr.evaluate.runner import EvalData, chunk_contexts, visible_stores
from mmehr.evaluate.tasks import TaskConfig, load_task, task_samples
from mmehr.model.gpt import GPT
from mmehr.report import CONDITION_OF, join_stays

CONDITIONS = tuple(CONDITION_OF.values())  # af, opacity, symptom: the ECG's, the CXR's, the notes'


@torch.no_grad()
def context_states(
    model: GPT,
    data: EvalData,
    task: TaskConfig,
    split: str,
    *,
    hidden: tuple[str, ...] = (),
    max_samples: int | None = None,
    batch_size: int = 32,
    stages: dict[str, list[np.ndarray]] | None = None,
) -> tuple[np.ndarray, pl.DataFrame]:
    """The task's samples on `split` (`task_samples`, as the evaluation draws them) and the model's final
    hidden state at each context's last token, (N, D) float32, row i for sample i.

    `stages`, when given, is filled with the fusion's intermediate outputs, row i for sample i (one array
    per batch; `np.concatenate` them): `latents:<m>`, the compressor's output for modality m's most recent
    event before the prediction time, flattened (zeros where the context has none), and `xattn:<layer>`,
    that cross-attention block's attention output at the context's last token, before its gate."""
    model.eval()
    store = TimelineStore(data.timelines, split)
    samples = task_samples(task, store, max_samples=max_samples)
    stores = visible_stores(data, hidden)
    blocks = model.fusion.xattn.items() if stages is not None and model.fusion is not None else ()
    seen: dict[str, torch.Tensor] = {}
    hooks = [
        b.attn.register_forward_hook(lambda _m, _i, o, key=f"xattn:{i}": seen.__setitem__(key, o))
        for i, b in blocks
    ]
    out = []
    try:
        for start in range(0, samples.height, batch_size):
            batch = chunk_contexts(store, samples.slice(start, batch_size), data, stores)
            seen.clear()
            h = model.states(batch.tokens, batch.times, batch.modalities or None)  # right-padded rows
            last = torch.arange(len(batch)), batch.lengths - 1
            out.append(h[last].float().numpy())
            if stages is None:
                continue
            for i, _ in blocks:  # a block skipped (no media in the batch) added nothing
                o = seen.get(f"xattn:{i}")
                stages.setdefault(f"xattn:{i}", []).append(
                    o[last].float().numpy() if o is not None else np.zeros_like(out[-1])
                )
            for name, latents in latest_event_latents(model, batch.modalities or {}).items():
                stages.setdefault(f"latents:{name}", []).append(latents)
    finally:
        for hook in hooks:
            hook.remove()
    d = model.config.n_embd
    return (np.concatenate(out) if out else np.zeros((0, d), np.float32)), samples


@torch.no_grad()
def latest_event_latents(model: GPT, modalities: dict) -> dict[str, np.ndarray]:
    """Per enabled modality, each row's most recent present event compressed (as `Fusion.encode_media`
    compresses a stored one at evaluation), flattened to (B, n_out * D); zeros where a row has none. An
    EHR-only model has none."""
    out: dict[str, np.ndarray] = {}
    for name, compressor in model.fusion.compressors.items() if model.fusion is not None else ():
        inp = modalities.get(name)
        if inp is None or inp.emb is None:
            continue
        present = inp.event_mask & inp.token_mask.any(-1)  # (B, K)
        has = present.any(1)
        rows = torch.arange(present.shape[0])[has]
        latest = torch.where(present, inp.event_time, torch.iinfo(torch.int64).min).argmax(1)[has]
        z, _ = compressor(inp.emb[rows, latest], inp.token_mask[rows, latest])  # (E, n_out, D)
        flat = np.zeros((present.shape[0], z[0].numel()), np.float32)
        flat[has.numpy()] = z.flatten(1).float().numpy()
        out[name] = flat
    return out


def probe_auroc(
    x_train: np.ndarray, y_train: np.ndarray, groups: np.ndarray, x_eval: np.ndarray, y_eval: np.ndarray
) -> float:
    """AUROC on the eval rows of a logistic probe fit on the train rows as the supervised reference is
    (`mmehr.evaluate.reference.fit_predict`: L2, C by subject-grouped CV); NaN when a class has fewer than
    5 train rows or the eval rows hold one class."""
    y_train, y_eval = np.asarray(y_train, bool), np.asarray(y_eval, bool)
    if min(y_train.sum(), (~y_train).sum()) < 5 or y_eval.all() or not y_eval.any():
        return float("nan")
    return auroc(y_eval, fit_predict(x_train, y_train.astype(int), groups, x_eval)[0])


def probe_auroc_within(x: np.ndarray, y: np.ndarray, groups: np.ndarray, folds: int = 5) -> float:
    """AUROC of the same probe out of fold within one split (subject-grouped folds, each fit on the
    others): on train samples, what the state holds of outcomes the model was trained on. Above the
    held-out probe, the state carries the training outcomes themselves (memorised), not only what
    predicts them."""
    y = np.asarray(y, bool)
    if min(y.sum(), (~y).sum()) < 2 * folds:
        return float("nan")
    p = np.zeros(len(y))
    for tr, ev in GroupKFold(n_splits=folds).split(x, y, groups):
        if y[tr].all() or not y[tr].any():
            return float("nan")
        p[ev] = fit_predict(x[tr], y[tr].astype(int), groups[tr], x[ev])[0]
    return auroc(y, p)


def probe_r2(x_train: np.ndarray, t_train: np.ndarray, x_eval: np.ndarray, t_eval: np.ndarray) -> float:
    """R^2 on the eval rows of a ridge probe fit on the train rows (alpha by leave-one-out CV)."""
    pred = RidgeCV(alphas=np.logspace(-1, 5, 13)).fit(x_train, t_train).predict(x_eval)
    return float(1 - ((t_eval - pred) ** 2).sum() / ((t_eval - t_eval.mean()) ** 2).sum())


def _with_truth(samples: pl.DataFrame, truth: pl.DataFrame) -> pl.DataFrame:
    """Each sample with its stay's truth row; `row` is the sample's index (samples outside a stay drop)."""
    s = samples.with_row_index("row").with_columns(pl.col("prediction_time").cast(pl.Int64))
    return join_stays(s, truth, time_col="prediction_time").sort("row")


def _standardised(train: np.ndarray, held_out: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Both scaled by the train rows' per-feature mean and standard deviation."""
    mu, sd = train.mean(0), train.std(0) + 1e-6
    return (train - mu) / sd, (held_out - mu) / sd


def probe_run(
    run: Path, task: TaskConfig, truth: pl.DataFrame, cfg: dict, *, hidden: tuple[str, ...] = (),
    train_samples: int = 800, max_samples: int = 200, stages: bool = False,
) -> dict:  # fmt: skip
    """Every probe of one run (`RUN/train`), beside its zero-shot AUROC on the same held-out samples."""
    model, train_cfg = load_model(run / "train", "cpu")
    data = eval_data_from_config(train_cfg, argparse.Namespace(context_tokens=None, timelines=None))
    parts, staged = {}, {}
    for split, n in (("train", train_samples), ("held_out", max_samples)):
        kept: dict[str, list[np.ndarray]] | None = {} if stages else None
        x, samples = context_states(model, data, task, split, hidden=hidden, max_samples=n, stages=kept)
        d = _with_truth(samples, truth)
        rows = d["row"].to_numpy()
        parts[split] = (x[rows], d)
        staged[split] = {k: np.concatenate(v)[rows] for k, v in (kept or {}).items()}
    (x_tr, d_tr), (x_ev, d_ev) = parts["train"], parts["held_out"]
    x_tr, x_ev = _standardised(x_tr, x_ev)
    ehr = {k: cfg["ehr_strength"] * d["visible_risk"].to_numpy() for k, (_, d) in parts.items()}
    groups = d_tr["subject_id"].to_numpy()
    out = {
        "run": str(run),
        "hidden": list(hidden),
        "n_train": d_tr.height,
        "n_eval": d_ev.height,
        "outcome": probe_auroc(x_tr, d_tr["boolean_value"], groups, x_ev, d_ev["boolean_value"]),
        "outcome_train": probe_auroc_within(x_tr, d_tr["boolean_value"].to_numpy(), groups),
        "ehr_part_r2": probe_r2(x_tr, ehr["train"], x_ev, ehr["held_out"]),
    }
    for c in CONDITIONS:
        out[c] = probe_auroc(x_tr, d_tr[c].to_numpy(), groups, x_ev, d_ev[c].to_numpy())
    if stages:  # where each condition is lost: the latents, the cross-attention, the state
        out["stages"] = {}
        for key in sorted(staged["train"]):
            s_tr, s_ev = _standardised(staged["train"][key], staged["held_out"][key])
            name = key.split(":", 1)[1]
            conds = [CONDITION_OF[name]] if key.startswith("latents:") else list(CONDITIONS)
            out["stages"][key] = {
                c: probe_auroc(s_tr, d_tr[c].to_numpy(), groups, s_ev, d_ev[c].to_numpy()) for c in conds
            }
    pred = run / "eval" / task.name / "predictions.parquet"
    if pred.is_file() and not hidden:  # the rollouts' AUROC on the same samples
        p = pl.read_parquet(pred).with_columns(pl.col("prediction_time").cast(pl.Int64))
        j = d_ev.join(p.select("subject_id", "prediction_time", "predicted_boolean_probability"),
                      on=["subject_id", "prediction_time"])  # fmt: skip
        out["zero_shot"] = auroc(j["boolean_value"].to_numpy(), j["predicted_boolean_probability"].to_numpy())
    return out


def _run_name(record: dict) -> str:
    return record["run"] + (f" (without {'+'.join(record['hidden'])})" if record["hidden"] else "")


def markdown(records: list[dict], task: str) -> str:
    head = (
        "| run | n (train / eval) | zero-shot | probe: outcome | outcome, train out of fold | EHR part R² | "
    )
    head += " | ".join(CONDITIONS)
    lines = [
        f"Probes of the state at the prediction time, {task} (AUROC; R² for the EHR part)",
        "",
        head + " |",
    ]
    lines.append("|---" * (6 + len(CONDITIONS)) + "|")
    for r in records:
        name = _run_name(r)
        cells = [
            f"{r.get(k, float('nan')):.3f}"
            for k in ("zero_shot", "outcome", "outcome_train", "ehr_part_r2", *CONDITIONS)
        ]
        lines.append(f"| {name} | {r['n_train']} / {r['n_eval']} | " + " | ".join(cells) + " |")
    staged = [r for r in records if r.get("stages")]
    if staged:  # each condition along the fusion: latents -> cross-attention output -> state
        lines += ["", f"Each condition along the fusion, {task} (probe AUROC; `--stages`)", ""]
        lines += [
            "| run | condition | latents (its modality's latest event) | cross-attention output | state |"
        ]
        lines.append("|---|---|---|---|---|")
        for r in staged:
            name = _run_name(r)
            xattn = [v for k, v in sorted(r["stages"].items()) if k.startswith("xattn:")]
            for modality, c in CONDITION_OF.items():
                latent = r["stages"].get(f"latents:{modality}", {}).get(c, float("nan"))
                cells = [latent, *(x.get(c, float("nan")) for x in xattn[:1] or [{}]), r.get(c, float("nan"))]
                lines.append(f"| {name} | {c} | " + " | ".join(f"{v:.3f}" for v in cells) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--synth", type=Path, required=True, help="the `mmehr synth` output (truth.parquet)")
    ap.add_argument("--task", required=True)
    ap.add_argument("--hide", nargs="*", default=[], help="modalities to hide, as --hide-modality")
    ap.add_argument("--train-samples", type=int, default=800, help="train-split samples the probes fit on")
    ap.add_argument("--max-samples", type=int, default=200, help="held-out samples, as `mmehr evaluate`'s")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument(
        "--stages", action="store_true",
        help="also probe each condition in the compressor's latents and the cross-attention's output",
    )  # fmt: skip
    ap.add_argument("--out", type=Path, help="write the records as JSON here")
    ap.add_argument("runs", nargs="+", type=Path, help="run directories (RUN/train holds the checkpoint)")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    truth = pl.read_parquet(args.synth / "truth.parquet")
    cfg = json.loads((args.synth / "manifest.json").read_text())["config"]
    task = load_task(args.task)
    records = []
    for run in args.runs:
        records.append(probe_run(run, task, truth, cfg, hidden=tuple(args.hide), train_samples=args.train_samples,
                                 max_samples=args.max_samples, stages=args.stages))  # fmt: skip
        print(json.dumps(records[-1]), flush=True)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(records, indent=1))
    print(markdown(records, task.name))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
