"""`mmehr report DIR`: one markdown + HTML report of everything under an output directory.

It gathers what the stages left there: the synthetic cohort's manifest (planted signals), training runs
(`metrics.jsonl`: loss curves and gate values), evaluations (`<task>/metrics.json`, predictions), and
ablation tables (`tables.md`). Several evaluations of the same tasks are compared side by side, with the
paired subject-bootstrap AUROC difference against the EHR-only run when there is one, and every zero-shot
AUROC stands beside its supervised reference (`mmehr.evaluate.reference`). On a synthetic cohort, the
report also asks per modality whether the stored embeddings carry the planted condition (a supervised
probe) and whether the model's predictions follow it. A "patients" section explains a few samples, each
on its own page (`mmehr.explain.patients`; `--no-patients` skips it).
"""

from __future__ import annotations

import argparse
import html
import json
import re
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import polars as pl

from mmehr.ablation_tables import read_predictions
from mmehr.evaluate.metrics import (
    auroc,
    paired_auroc_difference,
    plot_task_curves,
    recorded_sampled_auroc,
    sampled_auroc,
)
from mmehr.evaluate.scoring import unreal_end_warnings
from mmehr.io import atomic_path, is_complete

if TYPE_CHECKING:
    from mmehr.modalities.store import EmbeddingStore

COLUMNS = ("auroc", "auprc", "f1_macro", "f1_pos", "brier")
HEADERS = ("AUROC", "AUPRC", "F1 (macro)", "F1 (positive)", "Brier")
PLANTED = {"af": "AF (ECG)", "opacity": "opacity (CXR)", "symptom": "symptoms (notes)"}
CONDITION_OF = {"ecg": "af", "cxr": "opacity", "note": "symptom"}


def _fmt(m: dict | None) -> str:
    if not m or m.get("value") is None or not np.isfinite(m["value"]):
        return "n/a"
    lo, hi = m.get("lo"), m.get("hi")
    if lo is None or hi is None or not (np.isfinite(lo) and np.isfinite(hi)):
        return f"{m['value']:.3f}"
    return f"{m['value']:.3f} [{lo:.3f}, {hi:.3f}]"


def _fmt_signed(m: dict | None) -> str:
    if not m or m.get("value") is None or not np.isfinite(m["value"]):
        return "n/a"
    lo, hi = m.get("lo"), m.get("hi")
    if lo is None or hi is None or not (np.isfinite(lo) and np.isfinite(hi)):
        return f"{m['value']:+.3f}"
    return f"{m['value']:+.3f} [{lo:+.3f}, {hi:+.3f}]"


def _label(path: Path, root: Path) -> str:
    """A short run name from a directory path: runs/multimodal/seed0/eval -> multimodal/seed0."""
    parts = [p for p in path.relative_to(root).parts if p not in ("runs", "eval", "train", "experiments")]
    return "/".join(parts) or path.name


def find_evaluations(root: Path) -> list[Path]:
    return sorted(p.parent for p in root.rglob("thresholds.json") if is_complete(p.parent))


def find_training_runs(root: Path) -> list[Path]:
    return sorted(p.parent for p in root.rglob("metrics.jsonl"))


def training_plot(run_dir: Path, out_png: Path) -> Path | None:
    """Training / validation loss and every cross-attention gate over steps."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    records = [
        json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()
    ]
    if not records:
        return None
    steps = [r["step"] for r in records if "loss" in r]
    fig, axes = plt.subplots(1, 2, figsize=(11, 3.6))
    axes[0].plot(steps, [r["loss"] for r in records if "loss" in r], label="train")
    val = [(r["step"], r["val_loss"]) for r in records if r.get("val_loss") is not None]
    if val:
        axes[0].plot(*zip(*val), marker="o", label="validation (tuning split)")
    axes[0].set(xlabel="step", ylabel="next-token loss", title="loss")
    axes[0].legend()
    gates = {}
    for r in records:
        for k, v in (r.get("gates") or {}).items():
            gates.setdefault(k, []).append((r["step"], v))
    for k, pts in gates.items():
        axes[1].plot(*zip(*pts), label=k)
    axes[1].set(xlabel="step", ylabel="gate value", title="cross-attention gates")
    if gates:
        axes[1].legend(fontsize=7)
    else:
        axes[1].text(0.5, 0.5, "EHR only: no gates", ha="center", va="center", transform=axes[1].transAxes)
    fig.tight_layout()
    out_png.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out_png, dpi=100)
    plt.close(fig)
    return out_png


def _training_summary(run_dir: Path) -> str:
    manifest = run_dir / "manifest.json"
    if not manifest.is_file():
        return "unfinished"
    m = json.loads(manifest.read_text())
    bits = []
    for key in ("steps", "best_val_loss", "best_step", "tokens_per_s", "train_seconds", "mfu"):
        if m.get(key) is not None:
            v = m[key]
            bits.append(f"{key} {v:.4g}" if isinstance(v, float) else f"{key} {v}")
    return ", ".join(bits) or "finished"


def _verdict(name: str, baseline: str, d: dict) -> str:
    """One honest sentence on a paired AUROC difference and its 95% CI."""
    if d["value"] is None or not np.isfinite(d["value"]) or not np.isfinite(d.get("lo", np.nan)):
        return f"- {name} vs {baseline}: no AUROC difference can be computed (a single class in the samples)."
    if d["lo"] > 0:
        word = "better than"
    elif d["hi"] < 0:
        word = "worse than"
    else:
        word = "not distinguishable from"
    return (
        f"- **{name}** is {word} {baseline} here: AUROC difference {d['value']:+.3f} "
        f"(95% CI {d['lo']:+.3f} to {d['hi']:+.3f})."
    )


def comparison(evals: dict[str, Path], root: Path, plots: Path) -> list[str]:
    """Per task: one row per evaluation, the paired AUROC difference to EHR-only, one joint figure."""
    lines: list[str] = []
    tasks = sorted({p.parent.name for d in evals.values() for p in d.glob("*/metrics.json")})
    baseline = next((name for name in evals if "ehr_only" in name), None)
    for task in tasks:
        lines += [f"### {task}", ""]
        header = (
            "| run | n | positive | " + " | ".join(HEADERS) + " | reference AUROC | zero-shot - reference |"
        )
        if baseline:
            header += f" AUROC - {baseline} |"
        lines += [header, "|---|---|---|" + "---|" * (len(HEADERS) + 2 + (1 if baseline else 0))]
        curves, verdicts, made_up = [], [], []
        base_pred = read_predictions(evals[baseline], task) if baseline else None
        for name, d in evals.items():
            path = d / task / "metrics.json"
            if not path.is_file():
                continue
            r = json.loads(path.read_text())
            cells = " | ".join(_fmt(r["metrics"].get(c)) for c in COLUMNS)
            ref = r.get("reference") or {}
            if ref:
                matched = ref[ref["matched"]]
                sampled = recorded_sampled_auroc(matched)
                at_rollouts = f"; sampled like zero-shot {sampled['value']:.3f}" if sampled else ""
                cells += f" | {_fmt(matched['metrics']['auroc'])} ({ref['matched']}{at_rollouts})"
                cells += f" | {_fmt_signed(matched['zero_shot_minus_reference'])}"
            else:
                cells += " | — | —"
            row = f"| {name} | {r['n_samples']} | {r['n_positive']} | {cells} |"
            made_up += [
                f"- Warning: {w} (its evaluation details: where rollouts ended)."
                for w in unreal_end_warnings(name, r.get("ends"))
            ]
            pred = read_predictions(d, task)
            if baseline:
                diff = "—"
                if name != baseline and pred is not None and base_pred is not None:
                    keys = ["subject_id", "prediction_time"]
                    j = pred.join(base_pred, on=keys, suffix="_base")
                    if j.height:
                        dd = paired_auroc_difference(
                            j["boolean_value"].to_numpy(),
                            j["predicted_boolean_probability"].to_numpy(),
                            j["predicted_boolean_probability_base"].to_numpy(),
                            groups=j["subject_id"].to_numpy(),
                        )
                        diff = _fmt(dd)
                        verdicts.append(_verdict(name, baseline, dd))
                row += f" {diff} |"
            lines.append(row)
            if pred is not None and pred.height:
                curves.append(
                    (name, pred["boolean_value"].to_numpy(), pred["predicted_boolean_probability"].to_numpy())
                )
        if verdicts:
            lines += ["", *verdicts]
        if made_up:
            lines += ["", *made_up]
        if curves:
            png = plot_task_curves(curves, task, plots / f"compare_{task}.png")
            lines += ["", f"![{task}]({png.relative_to(root).as_posix()})"]
        lines.append("")
    return lines


def task_signal(evals: dict[str, Path]) -> list[str]:
    """How much signal each task holds: every supervised reference of the evaluation that has the most."""
    best: dict[str, dict] = {}
    for d in evals.values():
        for path in sorted(d.glob("*/metrics.json")):
            r = json.loads(path.read_text())
            ref = r.get("reference") or {}
            if len(ref) > len(best.get(path.parent.name, {})):
                best[path.parent.name] = {k: v for k, v in ref.items() if k != "matched"}
    if not best:
        return []
    names = sorted({n for ref in best.values() for n in ref}, key=lambda n: (n != "ehr", n == "ehr+all", n))
    lines = [
        "## How much signal does each task hold?",
        "",
        "Supervised references: logistic regression fit on the train split's task samples, scored on the "
        "held-out samples the rollouts scored (AUROC, 95% CI). `ehr` sees the context as a bag of codes; "
        "`ehr+<m>` adds the mean-pooled stored embeddings of modality m's events before the prediction time.",
        "",
        "| task | " + " | ".join(names) + " |",
        "|---|" + "---|" * len(names),
    ]
    for task, ref in best.items():
        lines.append(
            f"| {task} | "
            + " | ".join(_fmt(ref[n]["metrics"]["auroc"]) if n in ref else "—" for n in names)
            + " |"
        )
    return [*lines, ""]


def stored_events_with_truth(
    store: EmbeddingStore, truth: pl.DataFrame, truth_events_path: Path
) -> pl.DataFrame:
    """The store's events (`row` in the store, `event_id`) that belong to a stay of the synthetic cohort's
    truth table (by `truth_events.parquet`, canaries left out), with that stay's `truth` columns."""
    events = pl.read_parquet(truth_events_path).filter(~pl.col("canary")).select("event_id", "hadm_id")
    index = pl.DataFrame({"row": np.arange(len(store)), "event_id": store.event_ids})
    return index.join(events, on="event_id").join(truth, on="hadm_id")


def condition_probes(stores: dict[str, Path], truth_path: Path, truth_events_path: Path) -> dict[str, float]:
    """Per modality: the held-out AUROC of a logistic-regression probe that predicts its planted condition
    (`CONDITION_OF`) from each event's mean-pooled stored embedding, fit on the train split's events.
    High: the encoder's embeddings carry the condition. Near 0.5: they do not."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    from mmehr.modalities.store import EmbeddingStore

    truth = pl.read_parquet(truth_path).select("hadm_id", "split", *PLANTED)
    out = {}
    for modality, root in stores.items():
        condition = CONDITION_OF.get(modality)
        if condition is None or not is_complete(root):
            continue
        store = EmbeddingStore(root)
        index = stored_events_with_truth(store, truth, truth_events_path)
        if index.height < 20:
            continue
        x = np.stack([store.embedding(int(i)).astype(np.float32).mean(0) for i in index["row"].to_list()])
        y = index[condition].to_numpy().astype(int)
        train = index["split"].to_numpy() == "train"
        if y[train].min() == y[train].max() or y[~train].min() == y[~train].max():
            continue
        probe = make_pipeline(StandardScaler(), LogisticRegression(C=0.1, max_iter=2000)).fit(
            x[train], y[train]
        )
        out[modality] = auroc(y[~train], probe.predict_proba(x[~train])[:, 1])
    return out


def _stores_of(root: Path) -> dict[str, Path]:
    """The embedding store of each modality that a training run under root used (its resolved config)."""
    import yaml

    stores: dict[str, Path] = {}
    for config in sorted(root.rglob("train/config.yaml")):
        data = yaml.safe_load(config.read_text()).get("data", {})
        for m, spec in (data.get("modalities") or {}).items():
            if isinstance(spec, dict) and spec.get("store") and spec.get("enabled", True):
                stores.setdefault(m, Path(spec["store"]))
    return stores


def join_stays(pred: pl.DataFrame, truth: pl.DataFrame, time_col: str = "t") -> pl.DataFrame:
    """Each prediction (subject_id, `time_col` in µs) with its hospital stay's truth row: the stay of that
    subject admitted last at or before the prediction time, kept only while the stay has not ended."""
    j = pred.sort(time_col).join_asof(
        truth.sort("admit_us"),
        left_on=time_col,
        right_on="admit_us",
        by="subject_id",
        strategy="backward",
        check_sortedness=False,  # both sides are sorted on the times; polars cannot check it per subject
    )
    return j.filter(pl.col("admit_us").is_not_null() & (pl.col(time_col) <= pl.col("end_us")))


def _following_cells(j: pl.DataFrame, p_col: str, rollouts: int | None = None) -> list[str]:
    """One table row's cells: the AUROC of `p_col` for each planted condition, then its Spearman
    correlation with the EHR-visible risk. With `rollouts` (a reference's row), after each AUROC: the one
    it gets with its probabilities estimated from that many sampled futures (`sampled_auroc`), what a
    zero-shot run exactly as good as the reference could show."""
    p = j[p_col].to_numpy().astype(float)
    cells = []
    for c in PLANTED:
        y = j[c].to_numpy().astype(int)
        cell = f"{auroc(y, p):.3f}"
        if rollouts:
            sampled = sampled_auroc(y, p, rollouts)["value"]
            cell += f"; {sampled:.3f}" if np.isfinite(sampled) else ""
        cells.append(cell)
    rank = j.select(pl.corr(p_col, "visible_risk", method="spearman")).item()
    cells.append("—" if rank is None or not np.isfinite(rank) else f"{rank:+.3f}")
    return cells


def planted_signal(evals: dict[str, Path], truth_path: Path) -> list[str]:
    """Which planted condition each run's predicted risk follows, from the synthetic cohort's truth table.

    Each prediction is matched to its hospital stay (the stay of that subject admitted last at or before the
    prediction time). Per condition: the AUROC with which the predicted risk separates stays with the
    condition from stays without (0.5: the prediction ignores it); and the rank correlation (Spearman) of
    the predicted risk with the EHR-visible risk. Below the runs, the same for each supervised reference
    (`reference.parquet` of the first evaluation that has it, per task): how far a model fit on those
    inputs follows each condition, the yardstick for the runs' numbers.
    """
    truth = pl.read_parquet(truth_path).select("subject_id", "admit_us", "end_us", *PLANTED, "visible_risk")
    head = "| run | task | n | " + " | ".join(PLANTED.values()) + " | EHR-visible risk (Spearman) |"
    rows, references, rollouts = [], {}, {}
    for name, d in evals.items():
        manifest = d / "manifest.json"  # its rollouts per sample: how the references' rows are sampled
        k = (
            json.loads(manifest.read_text()).get("sampler", {}).get("n_rollouts")
            if manifest.is_file()
            else None
        )
        for path in sorted(d.glob("*/predictions.parquet")):
            task = path.parent.name
            pred = pl.read_parquet(path).with_columns(t=pl.col("prediction_time").cast(pl.Int64))
            j = join_stays(pred, truth)
            if j.height < 2:
                continue
            cells = _following_cells(j, "predicted_boolean_probability")
            rows.append(f"| {name} | {task} | {j.height} | " + " | ".join(cells) + " |")
            ref_path = path.with_name("reference.parquet")
            if ref_path.is_file():
                ref = pl.read_parquet(ref_path).with_columns(t=pl.col("prediction_time").cast(pl.Int64))
                for col in ref.columns:
                    if col.startswith("p_") and (task, col) not in references:
                        references[task, col] = join_stays(ref.select("subject_id", "t", col), truth)
                        rollouts[task, col] = k
    for (task, col), j in sorted(references.items(), key=lambda item: item[0][0]):  # columns in file order
        if j.height >= 2:
            cells = _following_cells(j, col, rollouts[task, col])
            rows.append(f"| reference ({col[2:]}) | {task} | {j.height} | " + " | ".join(cells) + " |")
    if not rows:
        return []
    return [
        "## Which planted signal do the predictions follow?",
        "",
        "AUROC of each run's predicted risk for each hidden condition of the stay (0.5: the prediction "
        "ignores it; each condition raises the odds of every outcome, so a model that uses a modality "
        "should score above 0.5 on that modality's condition), from the generator's truth table. The "
        "'reference' rows are the supervised references on the same samples (EHR, EHR + each modality): "
        "how far a model fit on those inputs follows each condition, what to read a run's numbers against; "
        "after the ';', the same had its probabilities been estimated from as many sampled futures as the "
        "runs' (K rollouts): how far a zero-shot run exactly as good as the reference could show it.",
        "",
        head,
        "|---|---|---|" + "---|" * (len(PLANTED) + 1),
        *rows,
        "",
    ]


def probes_section(root: Path, truth_path: Path) -> list[str]:
    """Per modality: do the stored embeddings carry the condition (probe), as the reader's first question
    when the predictions do not follow it (then the fusion, not the encoder, is what misses it)."""
    truth_events = truth_path.with_name("truth_events.parquet")
    stores = _stores_of(root)
    if not stores or not truth_events.is_file():
        return []
    probes = condition_probes(stores, truth_path, truth_events)
    if not probes:
        return []
    lines = [
        "### Do the encoders' embeddings carry the condition?",
        "",
        "A logistic-regression probe predicts each modality's planted condition from an event's mean-pooled "
        "stored embedding (fit on the train split's events, AUROC on the others). A high probe AUROC with a "
        "prediction that does not follow the condition (table above) means the fusion does not use what the "
        "encoder delivers; a probe near 0.5 means the encoder's embeddings do not carry it.",
        "",
        "| modality | store | condition | probe AUROC |",
        "|---|---|---|---|",
    ]
    for m, a in probes.items():
        lines.append(f"| {m} | {stores[m].name} | {PLANTED[CONDITION_OF[m]]} | {a:.3f} |")
    return [*lines, ""]


def _check_own_report(root: Path) -> None:
    """The report replaces only an earlier mmehr report: a user's report.md / report.html is refused."""
    for name, mark in (("report.md", "# mmehr report"), ("report.html", "<title>mmehr report")):
        path = root / name
        if path.is_file() and mark.encode() not in path.read_bytes()[:2000]:
            raise ValueError(f"{path} exists and is not an mmehr report; refusing to overwrite it")


def build_report(root: str | Path, *, patient_pages: bool = True) -> Path:
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"{root} is not a directory")
    _check_own_report(root)
    plots = root / "report_plots"
    lines = [f"# mmehr report: {root.resolve().name}", ""]

    demo = root / "demo.json"
    if demo.is_file():
        info = json.loads(demo.read_text())
        lines += ["## What ran", ""]
        lines += [f"- {k}: {v}" for k, v in info.items() if not isinstance(v, dict)]
        for k, v in info.items():
            if isinstance(v, dict):
                lines.append(
                    f"- {k}: "
                    + ", ".join(
                        f"{a} {b:.1f} s" if isinstance(b, float) else f"{a} {b}" for a, b in v.items()
                    )
                )
        lines.append("")
    synth = root / "synth" / "manifest.json"
    if synth.is_file():
        m = json.loads(synth.read_text())
        cfg = m.get("config", {})
        lines += ["## Data: synthetic cohort with planted signal", ""]
        keep = {k: v for k, v in cfg.items() if not isinstance(v, dict | list)}
        lines += [f"- {k}: {v}" for k, v in keep.items()]
        lines += ["", "See `mmehr.data.synthetic` for the generative model.", ""]

    evals = {_label(d, root): d for d in find_evaluations(root)}
    if evals:
        lines += ["## Zero-shot evaluation", ""]
        lines += [
            "Values are point estimates with 95% bootstrap CIs over subjects; F1 uses the threshold chosen on "
            "the tuning split. 'AUROC - baseline' is the paired difference on the same samples. The reference "
            "is the supervised one that sees what the run sees; 'sampled like zero-shot' is its AUROC had its "
            "probabilities been estimated from as many sampled futures as the run's: what the rollouts alone cost.",
            "",
        ]
        lines += comparison(evals, root, plots)
        lines += task_signal(evals)
        truth = root / "synth" / "truth.parquet"
        if truth.is_file():
            lines += planted_signal(evals, truth)
            lines += probes_section(root, truth)
        if patient_pages:
            from mmehr.explain.patients import report_section

            lines += report_section(root, evals)
        for name, d in evals.items():
            summary = d / "summary.md"
            if summary.is_file():
                body = summary.read_text().split("\n", 1)[1]
                body = re.sub(r"^## ", "#### ", body, flags=re.M)
                lines += [
                    f"<details><summary>evaluation details: {name}</summary>",
                    "",
                    body,
                    "</details>",
                    "",
                ]

    tables = sorted(root.rglob("tables.md"))
    for t in tables:
        lines += [f"## Ablation tables ({_label(t.parent, root) or '.'})", ""]
        text = t.read_text()
        rel = t.parent.relative_to(root).as_posix()
        if rel != ".":
            text = text.replace("](plots/", f"]({rel}/plots/")
        lines += [text, ""]

    runs = find_training_runs(root)
    if runs:
        lines += ["## Training", ""]
        for run in runs:
            name = _label(run, root)
            png = training_plot(run, plots / f"train_{name.replace('/', '_')}.png")
            lines += [f"### {name}", "", _training_summary(run), ""]
            if png is not None:
                lines += [f"![training {name}]({png.relative_to(root).as_posix()})", ""]

    if len(lines) <= 2:
        raise FileNotFoundError(f"{root}: no evaluations, training runs or tables found to report on")
    md = "\n".join(lines) + "\n"
    with atomic_path(root / "report.md") as tmp:
        tmp.write_text(md)
    with atomic_path(root / "report.html") as tmp:
        tmp.write_text(markdown_to_html(md, title=f"mmehr report: {root.resolve().name}"))
    return root / "report.md"


def _inline(text: str) -> str:
    text = html.escape(text, quote=False)
    text = re.sub(r"!\[([^\]]*)\]\(([^)]+)\)", r'<img alt="\1" src="\2">', text)
    text = re.sub(r"\[([^\]]+)\]\(([^)]+)\)", r'<a href="\2">\1</a>', text)
    text = re.sub(r"`([^`]+)`", r"<code>\1</code>", text)
    return re.sub(r"\*\*([^*]+)\*\*", r"<b>\1</b>", text)


def markdown_to_html(md: str, title: str = "mmehr report") -> str:
    """Enough markdown for the report: headings, tables, lists, images, code, details blocks."""
    out, i, lines = [], 0, md.splitlines()
    while i < len(lines):
        line = lines[i]
        if line.startswith("|"):
            rows = []
            while i < len(lines) and lines[i].startswith("|"):
                rows.append([c.strip() for c in lines[i].strip().strip("|").split("|")])
                i += 1
            out.append("<table>")
            for k, row in enumerate(r for r in rows if not all(set(c) <= set("-: ") for c in r)):
                tag = "th" if k == 0 else "td"
                out.append("<tr>" + "".join(f"<{tag}>{_inline(c)}</{tag}>" for c in row) + "</tr>")
            out.append("</table>")
            continue
        if line.startswith("```"):
            block = []
            i += 1
            while i < len(lines) and not lines[i].startswith("```"):
                block.append(html.escape(lines[i]))
                i += 1
            out.append("<pre>" + "\n".join(block) + "</pre>")
        elif m := re.match(r"^(#{1,6}) (.*)", line):
            n = len(m.group(1))
            out.append(f"<h{n}>{_inline(m.group(2))}</h{n}>")
        elif line.startswith("- "):
            items = []
            while i < len(lines) and lines[i].startswith("- "):
                items.append(f"<li>{_inline(lines[i][2:])}</li>")
                i += 1
            out.append("<ul>" + "".join(items) + "</ul>")
            continue
        elif line.startswith(("<details", "</details")):
            out.append(line)
        elif line.strip():
            out.append(f"<p>{_inline(line)}</p>")
        i += 1
    style = (
        "body{font-family:system-ui,sans-serif;max-width:1100px;margin:2em auto;padding:0 1em;color:#222}"
        "table{border-collapse:collapse;margin:.5em 0}td,th{border:1px solid #ccc;padding:3px 8px;font-size:13px}"
        "th{background:#f0f3f7}img{max-width:100%}code,pre{background:#f6f6f6}summary{cursor:pointer}"
    )
    body = "\n".join(out)
    return f"<!doctype html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title><style>{style}</style></head><body>\n{body}\n</body></html>\n"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("dir", help="an output directory of mmehr demo / ablate / evaluate / train")
    parser.add_argument(
        "--no-patients", action="store_true", help="skip the patients section (its explain pages)"
    )


def run(args: argparse.Namespace) -> int:
    path = build_report(args.dir, patient_pages=not args.no_patients)
    print(f"wrote {path.resolve()} and {path.with_suffix('.html').resolve()}")
    return 0
