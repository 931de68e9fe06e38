"""What a zero-shot model ranks by, against the synthetic cohort's planted truth.

    python benchmarks/diagnose_zero_shot.py --synth demo_out/synth --task icu_mortality \
        demo_out/experiments/runs/ehr_only/seed0/eval demo_out/experiments/runs/all_three/seed0/eval

Joins each evaluated sample (`<eval>/<task>/predictions.parquet` and the references' `reference.parquet`)
to its stay in `<synth>/truth.parquet` (`mmehr.report.join_stays`: the stay admitted last at or before
the prediction time, while it lasts) and
prints, per evaluation, the AUROC of the zero-shot probability, of each supervised reference, and of two
oracles made from the planted risk: the EHR part (ehr_strength x (0.5 frailty + acute), plus icu_triage x
the deterioration before the ICU admission for ICU mortality) and the EHR part plus the hidden conditions'
part. Then the Spearman correlation of the zero-shot and the EHR reference with the EHR part and with the
deterioration; for the mortality tasks the same AUROCs with the deaths split by how soon after the
prediction time they come (each group against all survivors: labs worsen over the 36 h before a death);
and how well each prediction follows each hidden condition (AUROC of the prediction for the
condition; 0.5: not at all), beside the oracles' (the EHR part plus the whole hidden part, or plus one
condition's share: what a model that weighs the conditions it sees as planted would show); then how much
each prediction weighs each part (its log-odds fitted by least squares on the EHR part and the three
conditions: each condition's weight in units of the EHR part's, beside the planted ratio, and the share of
the log-odds the planted parts explain: a model can weigh a condition as planted and still rank worse if
it reads the EHR part less or adds noise: how the ECG run's ICU-admission loss was traced, README, Table
2), the following again on a subject's first stay and on its later ones apart, with how much each
prediction weighs an earlier stay's condition beside this stay's (the generator draws the conditions per
stay: an earlier stay's ECG, X-ray or note says nothing of this stay's risk, and a model that cannot tell
the events' stays apart reads it as this stay's), and whether the zero-shot's unexplained part (that fit's residual) predicts the outcome beside the
planted parts (out-of-fold AUROC with and without it: noise, or a signal the planted parts do not name)
and goes with each supervised reference's own (the inputs' noise, which any model of them reads, or the
zero-shot model's own);
last, how the rollouts ended (by the token they stopped on) beside how the real timelines did. This
is how the ICU-mortality gap was traced (README, "What the demo shows"), and how multimodal rollouts
were found to leave the ICU without an ICU discharge (docs/experiments.md, "Media after the prediction
time").

With `--ensemble`, after the evaluations, the same for their mean zero-shot probability on the samples
they share (runs of several seeds: what remains of the unexplained part once each run's own noise averages
out; docs/experiments.md, "Rollouts and the notes' following").

With `--condition-effects` (evaluations optional) it first prints, per split of the cohort, how strongly
each hidden condition alone ranks the task's outcome over all the split's stays (AUROC with a bootstrap
95% CI): what a modality's condition can add on the held-out split, beside the same in the train split.
"""

from __future__ import annotations

import argparse
import json
import warnings
from pathlib import Path

import numpy as np
import polars as pl
from scipy.stats import spearmanr

from mmehr.config import load_yaml
from mmehr.data.timelines import TimelineStore
from mmehr.evaluate.metrics import auroc
from mmehr.evaluate.scoring import ending_shares
from mmehr.evaluate.tasks import load_task, task_samples
from mmehr.report import CONDITION_OF, join_stays

CONDITIONS = tuple(CONDITION_OF.values())  # af, opacity, symptom: the ECG's, the CXR's, the notes'
# Each task's outcome in the truth table, and the stays it is asked of (ICU mortality: the ICU stays). The
# truth table's ICU admission is the admission alone (the task also counts a death before it).
OUTCOMES = {
    "hospital_mortality": ("hospital_death", None),
    "icu_mortality": ("icu_death", "first_icu_us"),
    "icu_admission": ("icu_admitted", None),
    "icu_readmission": ("icu_readmitted", "first_icu_us"),
}


def condition_effects(truth: pl.DataFrame, task: str, n_boot: int = 1000, seed: int = 0) -> list[dict]:
    """Per split: the stays, the positives, and each hidden condition's AUROC for the task's outcome
    (value, lo, hi: bootstrap 95% CI over stays)."""
    outcome, among = OUTCOMES[task]
    rng = np.random.default_rng(seed)
    rows = []
    for (split,), s in truth.group_by("split", maintain_order=True):
        if among is not None:
            s = s.filter(pl.col(among).is_not_null())
        y = s[outcome].fill_null(False).to_numpy().astype(bool)
        row: dict = {"split": split, "n": len(y), "positive": int(y.sum())}
        draws = [rng.integers(0, len(y), len(y)) for _ in range(n_boot)]
        for c in CONDITIONS:
            x = s[c].cast(pl.Float64).to_numpy()
            boot = [auroc(y[i], x[i]) for i in draws if 0 < y[i].sum() < len(i)]
            lo, hi = np.percentile(boot, [2.5, 97.5]) if boot else (np.nan, np.nan)
            row[c] = (auroc(y, x), float(lo), float(hi))
        rows.append(row)
    return sorted(rows, key=lambda r: r["split"])


def samples_with_truth(eval_dir: Path, task: str, truth: pl.DataFrame) -> pl.DataFrame:
    """The task's evaluated samples, their reference probabilities (p_*) and their stay's truth row."""
    pred = pl.read_parquet(eval_dir / task / "predictions.parquet").select(
        "subject_id",
        pl.col("prediction_time").cast(pl.Int64),
        "boolean_value",
        pl.col("predicted_boolean_probability").alias("zero_shot"),
    )
    ref = eval_dir / task / "reference.parquet"
    if ref.is_file():
        pred = pred.join(pl.read_parquet(ref).drop("boolean_value"), on=["subject_id", "prediction_time"])
    return join_stays(pred, truth, time_col="prediction_time")


def rollout_ends(eval_dir: Path, task: str) -> tuple[dict[str, float], dict[str, float]]:
    """How the task's rollouts ended, and how the real timelines did (`mmehr.evaluate.scoring.ending_shares`,
    which `mmehr evaluate` writes to metrics.json and summary.md): beside the real ends it shows
    trajectories the data never has, e.g. an ICU stay left through a hospital discharge without an ICU
    discharge."""
    ends = ending_shares(pl.read_parquet(eval_dir / task / "rollouts.parquet"))
    return ends["rollouts"], ends["real"]


def auroc_by_rollouts(eval_dir: Path, task: str, ks: tuple[int, ...] = (5, 10, 20), draws: int = 200) -> dict:
    """The zero-shot AUROC had each sample's probability come from k of its rollouts (a random subset per
    draw, of those that count; mean over draws): how much more rollouts would add, read off the slope.
    Row i of `samples.parquet` is the rollouts' sample i."""
    r = pl.read_parquet(eval_dir / task / "rollouts.parquet")
    labels = pl.read_parquet(eval_dir / task / "samples.parquet")["boolean_value"].to_numpy()
    k_max = int(r["rollout"].max()) + 1
    hits = np.full((len(labels), k_max), np.nan)  # 1 / 0 per counted rollout, NaN where it does not count
    counted = r.filter(pl.col("counted"))
    hits[counted["sample"].to_numpy(), counted["rollout"].to_numpy()] = counted["positive"].to_numpy()
    rng = np.random.default_rng(0)
    out = {}
    for k in (k for k in ks if k <= k_max):
        values = []
        for _ in range(1 if k == k_max else draws):
            with np.errstate(invalid="ignore"), warnings.catch_warnings():
                warnings.simplefilter("ignore", RuntimeWarning)  # a sample none of whose k rollouts counts
                p = np.nanmean(hits[:, rng.permutation(k_max)[:k]], axis=1)
            keep = ~np.isnan(p)
            values.append(auroc(labels[keep], p[keep]))
        out[k] = float(np.mean(values))
    return out


def _first_and_last(tokens: list[str], code: str) -> tuple[str, float]:
    """The token right after the first `code` in a continuation (a lab's quantile; "(none)" if `code` is
    absent), and the quantile number (Q<n>) after its last one (NaN if that is not a quantile)."""
    at = [i for i, t in enumerate(tokens) if t == code]
    if not at:
        return "(none)", np.nan
    first = tokens[at[0] + 1] if at[0] + 1 < len(tokens) else "(last)"
    last = tokens[at[-1] + 1] if at[-1] + 1 < len(tokens) else ""
    return first, float(last[1:]) if last[:1] == "Q" and last[1:].isdigit() else np.nan


def decided_by(
    eval_dir: Path, task: str, store: TimelineStore, code: str, *, evaluated_only: bool = True
) -> pl.DataFrame:
    """What the rollouts' outcome rides on: rollouts and real continuations (from the context end to the
    outcome, on the evaluated samples) grouped by the token that follows the first `code` in them (e.g. a
    vital sign's first quantile after the prediction time), with each group's share, outcome rate, and
    mean quantile of the code's last value before the outcome ("last"; NaN where not a quantile).
    Rollouts far more certain than the real stays with the same first value commit to what they sampled
    early (a noisy draw then decides the rollout, not the context); a last value that stays where the
    first was, where real stays come back, shows futures that do not recover. Needs the rollouts' tokens
    (`mmehr evaluate --save-tokens`). `evaluated_only=False`: the real side is every task sample of
    `store`'s split (e.g. the train split's, many more stays than an evaluation's)."""
    r = pl.read_parquet(eval_dir / task / "rollouts.parquet")
    if "tokens" not in r.columns:
        raise SystemExit(f"{eval_dir / task / 'rollouts.parquet'} has no tokens: evaluate with --save-tokens")
    r = r.filter(pl.col("counted"))
    schema = {"value": pl.String, "last": pl.Float64, "y": pl.Boolean}
    gen = [(*_first_and_last(list(t), code), y) for t, y in zip(r["tokens"].to_list(), r["positive"])]
    gen = pl.DataFrame(gen, schema=schema, orient="row")
    evaluated = pl.read_parquet(eval_dir / task / "samples.parquet").select(
        "subject_id", pl.col("prediction_time").cast(pl.Int64)
    )
    s = task_samples(load_task(task), store)
    if evaluated_only:
        s = s.join(evaluated, on=["subject_id", "prediction_time"])
    itos = store.vocab.itos
    real = []
    for i, e, o, y in s.select("subject_index", "context_end", "outcome_pos", "boolean_value").iter_rows():
        tokens, _ = store.timeline(i)
        real.append((*_first_and_last([itos[t] for t in tokens[e : (o + 1 if o >= 0 else None)]], code), y))
    real = pl.DataFrame(real, schema=schema, orient="row")

    def groups(d: pl.DataFrame, name: str) -> pl.DataFrame:
        return d.group_by("value").agg(
            (pl.len() / d.height).alias(f"{name} share"),
            pl.col("y").mean().alias(f"{name} outcome"),
            pl.col("last").fill_nan(None).mean().alias(f"{name} last"),
        )

    out = groups(gen, "rollouts").join(groups(real, "real"), on="value", how="full", coalesce=True)
    return out.sort(pl.col("value").str.replace(r"^Q(\d)$", "Q0$1"))


STRENGTHS = dict(zip(CONDITIONS, ("ecg_strength", "cxr_strength", "note_strength"), strict=True))


def log_odds(p: np.ndarray, rollouts: int | None) -> np.ndarray:
    """A probability's log-odds; from `rollouts` sampled futures (p = hits / rollouts), the empirical
    logit log((hits + 1/2) / (misses + 1/2)), finite at 0 and 1; else clipped to [1e-4, 1 - 1e-4]."""
    if rollouts:
        return np.log((p * rollouts + 0.5) / ((1 - p) * rollouts + 0.5))
    p = np.clip(p, 1e-4, 1 - 1e-4)
    return np.log(p / (1 - p))


def planted_design(ehr: np.ndarray, d: pl.DataFrame) -> np.ndarray:
    """The columns 1, EHR part, af, opacity, symptom of a least-squares fit on the planted parts."""
    return np.column_stack([np.ones_like(ehr), ehr, *(d[c].cast(pl.Float64).to_numpy() for c in CONDITIONS)])


def planted_weights(z: np.ndarray, ehr: np.ndarray, d: pl.DataFrame, cfg: dict) -> dict:
    """Least squares z ~ 1 + EHR part + af + opacity + symptom. Returns the EHR part's weight, each
    condition's weight divided by it beside the planted ratio (its strength: the EHR part is in planted
    log-odds already), and R^2 (the share of z's variance the planted parts explain)."""
    x = planted_design(ehr, d)
    beta = np.linalg.lstsq(x, z, rcond=None)[0]
    r2 = 1 - float(((z - x @ beta) ** 2).sum() / ((z - z.mean()) ** 2).sum())
    out = {"EHR part": float(beta[1]), "r2": r2}
    for c, b in zip(CONDITIONS, beta[2:], strict=True):
        out[c] = (float(b / beta[1]) if beta[1] else np.nan, float(cfg.get(STRENGTHS[c], np.nan)))
    return out


def planted_residual(z: np.ndarray, ehr: np.ndarray, d: pl.DataFrame) -> np.ndarray:
    """What of log-odds `z` the planted parts leave unexplained: the residual of `planted_weights`' fit."""
    x = planted_design(ehr, d)
    return z - x @ np.linalg.lstsq(x, z, rcond=None)[0]


def with_earlier_conditions(truth: pl.DataFrame) -> pl.DataFrame:
    """truth plus `earlier_<condition>` per hidden condition: whether an earlier stay of the same subject
    had it. The generator draws the conditions per stay, so an earlier stay's ECG, X-ray or note (in the
    context of every later stay) says nothing of this stay's risk."""
    ordered = truth.sort("subject_id", "stay_index")
    return ordered.with_columns(
        ((pl.col(c).cast(pl.Int32).cum_sum().over("subject_id") - pl.col(c).cast(pl.Int32)) > 0).alias(
            f"earlier_{c}"
        )
        for c in CONDITIONS
    )


def earlier_weights(z: np.ndarray, ehr: np.ndarray, d: pl.DataFrame) -> dict:
    """Least squares z ~ 1 + EHR part + the three conditions + later stay + the three earlier-stay
    conditions (`with_earlier_conditions`). Per condition: (this stay's weight, an earlier stay's weight),
    both in units of the EHR part's. A model that reads each event's stay weighs the earlier one at 0."""
    later = (d["stay_index"].to_numpy() > 0).astype(float)
    earlier = [d[f"earlier_{c}"].cast(pl.Float64).to_numpy() for c in CONDITIONS]
    x = np.column_stack([planted_design(ehr, d), later, *earlier])
    beta = np.linalg.lstsq(x, z, rcond=None)[0]
    if not beta[1]:
        return {c: (np.nan, np.nan) for c in CONDITIONS}
    return {c: (float(beta[2 + i] / beta[1]), float(beta[6 + i] / beta[1])) for i, c in enumerate(CONDITIONS)}


def residual_signal(
    residual: np.ndarray, ehr: np.ndarray, d: pl.DataFrame, y: np.ndarray, folds: int = 10
) -> dict:
    """Does the part of a prediction's log-odds that the planted parts leave unexplained (`residual`, from
    `planted_residual`) predict the outcome? Out-of-fold AUROCs of a logistic regression of `y` on the
    planted parts (EHR part, the three conditions), on those and the residual, and on the residual alone.
    The first two equal: the residual is noise beside the planted risk; the second higher: the prediction
    reads a real signal the planted parts do not name."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.model_selection import StratifiedKFold, cross_val_predict

    planted = planted_design(ehr, d)[:, 1:]
    if min(y.sum(), (~y).sum()) < folds:
        return {}
    cv = StratifiedKFold(folds, shuffle=True, random_state=0)
    out = {}
    for name, x in (
        ("planted parts", planted),
        ("planted parts + residual", np.column_stack([planted, residual])),
        ("residual alone", residual[:, None]),
    ):
        p = cross_val_predict(LogisticRegression(max_iter=1000), x, y, cv=cv, method="predict_proba")[:, 1]
        out[name] = auroc(y, p)
    return out


def diagnose(d: pl.DataFrame, task: str, cfg: dict, rollouts: int | None = None) -> dict:
    """AUROCs, rank correlations, condition-following and planted weights of one task's samples
    (`samples_with_truth`); cfg: the synth manifest's config (the planted strengths); rollouts: the
    evaluation's K (the zero-shot probability's resolution, for its log-odds)."""
    y = d["boolean_value"].to_numpy()
    ehr = cfg["ehr_strength"] * d["visible_risk"].to_numpy()
    det = None
    if task == "icu_mortality" and "first_icu_deterioration" in d.columns:
        first = (d["prediction_time"] == d["first_icu_us"]).to_numpy()
        d, y, ehr = d.filter(pl.Series(first)), y[first], ehr[first]  # the deterioration is the first stay's
        det = d["first_icu_deterioration"].fill_null(0.0).to_numpy()
        ehr = ehr + cfg.get("icu_triage", 0.0) * det
    preds = {c: d[c].to_numpy() for c in d.columns if c == "zero_shot" or c.startswith("p_")}
    out: dict = {"n": len(d), "positive": int(y.sum())}
    out["auroc"] = {k: auroc(y, v) for k, v in preds.items()}
    out["auroc"]["oracle: EHR part"] = auroc(y, ehr)
    out["auroc"]["oracle: EHR + hidden"] = auroc(y, ehr + d["hidden_risk"].to_numpy())
    for name in ("zero_shot", "p_ehr"):
        if name in preds:
            out[f"spearman {name} ~ EHR part"] = spearmanr(preds[name], ehr)[0]
            if det is not None:
                out[f"spearman {name} ~ deterioration"] = spearmanr(preds[name], det)[0]
    if task.endswith("mortality"):  # positives by how soon they die, each group against all negatives
        hours = ((d["death_us"] - d["prediction_time"]) / 3.6e9).fill_null(np.inf).to_numpy()
        scores = {**preds, "oracle: EHR part": ehr}
        for name, lo, hi in (
            ("death < 24 h", 0, 24),
            ("death 24-48 h", 24, 48),
            ("death >= 48 h", 48, np.inf),
        ):
            keep = ~y | ((hours >= lo) & (hours < hi))
            if y[keep].any():
                out[f"auroc, {name} ({int(y[keep].sum())})"] = {
                    k: auroc(y[keep], v[keep]) for k, v in scores.items()
                }
    # An oracle's own following is the most a model that weighs each condition as planted can show: with
    # every condition (an all-modality run), or with one (a run that sees that modality alone).
    oracle = {**preds, "oracle: EHR + hidden": ehr + d["hidden_risk"].to_numpy()}
    for c, strength in STRENGTHS.items():
        if strength in cfg:
            oracle[f"oracle: EHR + {c}"] = ehr + cfg[strength] * d[c].cast(pl.Float64).to_numpy()
    out["follows"] = {f"{k} ~ {c}": auroc(d[c].to_numpy(), v) for c in CONDITIONS for k, v in oracle.items()}
    out["weights"] = {
        k: planted_weights(log_odds(v, rollouts if k == "zero_shot" else None), ehr, d, cfg)
        for k, v in preds.items()
    }
    if "earlier_symptom" in d.columns:  # the same on a subject's first stay and on its later ones
        later = d["stay_index"].to_numpy() > 0
        out["stays"] = {"first": int((~later).sum()), "later": int(later.sum())}
        out["follows by stay"] = {
            f"{k} ~ {c}": tuple(auroc(d[c].to_numpy()[m], v[m]) for m in (~later, later))
            for c in CONDITIONS
            for k, v in preds.items()
        }
        out["earlier"] = {
            k: earlier_weights(log_odds(v, rollouts if k == "zero_shot" else None), ehr, d)
            for k, v in preds.items()
        }
    if "zero_shot" in preds:
        mine = planted_residual(log_odds(preds["zero_shot"], rollouts), ehr, d)
        out["residual"] = residual_signal(mine, ehr, d, y.astype(bool))
        # Is it the inputs' (a supervised reference reading the same context deviates alike) or the model's?
        for k in (k for k in preds if k.startswith("p_")):
            theirs = planted_residual(log_odds(preds[k], None), ehr, d)
            out["residual"][f"correlation with {k}'s"] = float(np.corrcoef(mine, theirs)[0, 1])
    return out


def ensemble(members: list[tuple[pl.DataFrame, int | None]]) -> tuple[pl.DataFrame, int | None]:
    """The evaluations' zero-shot probabilities averaged on the samples they share (`samples_with_truth`
    frames, each with its K): an ensemble of the runs, as if one model had drawn all their rollouts. Its K
    is the sum of theirs (None if one is unknown); the references are the first evaluation's (a supervised
    reference does not depend on the training seed)."""
    keys = ["subject_id", "prediction_time"]
    first = members[0][0]
    probs = [m.select(*keys, pl.col("zero_shot").alias(f"z{i}")) for i, (m, _) in enumerate(members)]
    joined = probs[0]
    for p in probs[1:]:
        joined = joined.join(p, on=keys)
    mean = joined.select(*keys, pl.mean_horizontal(pl.exclude(keys)).alias("zero_shot"))
    samples = first.drop("zero_shot").join(mean, on=keys)
    ks = [k for _, k in members]
    return samples, (None if None in ks else sum(ks))


def print_diagnosis(title: str, r: dict, task: str) -> None:
    print(f"\n## {title} ({task}: n = {r['n']}, {r['positive']} positive)")
    print(" | ".join(f"{k} {v:.3f}" for k, v in r["auroc"].items()))
    print(" | ".join(f"{k} {v:.3f}" for k, v in r.items() if k.startswith("spearman")))
    for key in (k for k in r if k.startswith("auroc, ")):
        print(f"{key[7:]}: " + " | ".join(f"{k} {v:.3f}" for k, v in r[key].items()))
    print("follows: " + " | ".join(f"{k} {v:.2f}" for k, v in r["follows"].items() if not np.isnan(v)))
    for k, w in r["weights"].items():
        cells = " | ".join(f"{c} {w[c][0]:+.2f} x EHR (planted {w[c][1]:.1f})" for c in CONDITIONS)
        print(f"weighs ({k} log-odds): EHR part {w['EHR part']:.3f} | {cells} | R2 {w['r2']:.2f}")
    if "follows by stay" in r:
        first, later = r["stays"]["first"], r["stays"]["later"]
        cells = " | ".join(f"{k} {a:.2f} / {b:.2f}" for k, (a, b) in r["follows by stay"].items())
        print(f"follows, a subject's first stay ({first}) / a later one ({later}): {cells}")
        for k, w in r["earlier"].items():
            cells = " | ".join(f"{c} {w[c][0]:+.2f} / {w[c][1]:+.2f}" for c in CONDITIONS)
            print(f"weighs ({k}) this stay's condition / an earlier stay's, x EHR: {cells}")
    if r.get("residual"):
        cells = " | ".join(f"{k} {v:.3f}" for k, v in r["residual"].items())
        print(
            "the outcome from the planted parts and the zero-shot's residual (10-fold AUROC), and that "
            f"residual's correlation with each reference's: {cells}"
        )


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--synth", type=Path, required=True, help="the `mmehr synth` output (truth.parquet)")
    ap.add_argument("--task", required=True)
    ap.add_argument(
        "--condition-effects",
        action="store_true",
        help="first, per split, each hidden condition's AUROC alone for the task's outcome",
    )
    ap.add_argument(
        "--decided-by",
        metavar="CODE",
        help="also group rollouts and real continuations by the value after the first CODE token in them "
        "(e.g. LAB//220045//bpm; needs `mmehr evaluate --save-tokens`)",
    )
    ap.add_argument(
        "--timelines", type=Path, help="for --decided-by: the tokenized timelines (default: the checkpoint's)"
    )
    ap.add_argument(
        "--real-split",
        help="for --decided-by: the real stays of this split, all of them (default: the evaluated samples)",
    )
    ap.add_argument(
        "--ensemble",
        action="store_true",
        help="last, the same for the evaluations' mean zero-shot probability on the samples they share "
        "(runs of several seeds: does their following grow when their own noise averages out?)",
    )
    ap.add_argument("evals", nargs="*", type=Path, help="`mmehr evaluate` output directories")
    args = ap.parse_args(argv)
    truth = with_earlier_conditions(pl.read_parquet(args.synth / "truth.parquet"))
    cfg = json.loads((args.synth / "manifest.json").read_text())["config"]
    if args.condition_effects:
        print(
            f"## each hidden condition alone, {args.task} (AUROC [bootstrap 95% CI] over the split's stays)"
        )
        for r in condition_effects(truth, args.task):
            cells = " | ".join(
                f"{c} {v:.3f} [{lo:.3f}, {hi:.3f}]" for c, (v, lo, hi) in ((c, r[c]) for c in CONDITIONS)
            )
            print(f"{r['split']} ({r['n']} stays, {r['positive']} positive): {cells}")
    elif not args.evals:
        ap.error("give evaluation directories, --condition-effects, or both")
    if args.ensemble and len(args.evals) < 2:
        ap.error("--ensemble needs two evaluations or more")
    members = []
    for eval_dir in args.evals:
        manifest = (
            json.loads((eval_dir / "manifest.json").read_text())
            if (eval_dir / "manifest.json").is_file()
            else {}
        )
        rollouts = manifest.get("sampler", {}).get("n_rollouts")
        samples = samples_with_truth(eval_dir, args.task, truth)
        members.append((samples, rollouts))
        print_diagnosis(f"{eval_dir}", diagnose(samples, args.task, cfg, rollouts), args.task)
        if (eval_dir / args.task / "rollouts.parquet").is_file():
            ends, real = rollout_ends(eval_dir, args.task)
            print("rollouts ended: " + " | ".join(f"{k} {v:.1%}" for k, v in ends.items()))
            print("real timelines ended: " + " | ".join(f"{k} {v:.1%}" for k, v in real.items()))
            by_k = auroc_by_rollouts(eval_dir, args.task)
            print(
                "zero-shot AUROC from K of the rollouts (all the task's samples): "
                + " | ".join(f"K = {k} {v:.3f}" for k, v in by_k.items())
            )
        if args.decided_by:
            timelines = args.timelines or Path(
                load_yaml(Path(manifest["checkpoint"]) / "config.yaml")["data"]["timelines"]
            )
            split = args.real_split or manifest.get("split", "held_out")
            store = TimelineStore(timelines, split)
            table = decided_by(
                eval_dir, args.task, store, args.decided_by, evaluated_only=not args.real_split
            )
            real = f"all {split} stays" if args.real_split else "the evaluated samples"
            print(
                f"by the value after the first {args.decided_by}: share of rollouts / of real stays ({real})"
                " → outcome rate, mean quantile of its last value"
            )
            for row in table.iter_rows(named=True):
                cells = " | ".join(
                    "n/a"
                    if row[f"{k} share"] is None
                    else f"{k} {row[f'{k} share']:.1%} → {row[f'{k} outcome']:.2f}, last "
                    + ("n/a" if row[f"{k} last"] is None else f"Q{row[f'{k} last']:.1f}")
                    for k in ("rollouts", "real")
                )
                print(f"  {row['value']}: {cells}")
    if args.ensemble:
        samples, rollouts = ensemble(members)
        title = f"ensemble of {len(members)} evaluations (mean zero-shot probability)"
        print_diagnosis(title, diagnose(samples, args.task, cfg, rollouts), args.task)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
