"""Zero-shot evaluation: the KV-cached rollout sampler, `mmehr evaluate`, MEDS predictions, resumption, and
the task labels on the real MIMIC-IV demo."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import polars as pl
import pyarrow.parquet as pq
import pytest
import torch

from mmehr.batch import Batch, ModalityInputs
from mmehr.data.timelines import TimelineStore
from mmehr.data.tokenizer import INTERVAL_EDGES_US, INTERVAL_TOKENS, QUANTILES, Vocab
from mmehr.evaluate.sampler import (
    OUTCOME,
    STOP,
    STOP_REASONS,
    TIME_LIMIT,
    UNFINISHED,
    CachedStepper,
    RecomputeStepper,
    RolloutRules,
    SamplerSettings,
    sample_rollouts,
)
from mmehr.evaluate.scoring import cohort_members, ending_shares, unreal_end_warnings
from mmehr.evaluate.tasks import TaskTokens, load_task, task_samples
from mmehr.model.config import FusionConfig, ModalityConfig, ModelConfig
from mmehr.model.gpt import GPT
from mmehr.units import DAY_US

HOUR = 3_600_000_000
T0 = 1_600_000_000_000_000  # µs since the epoch
CODES = (
    "HOSPITAL_ADMISSION",
    "ICU_ADMISSION",
    "ICU_UNIT//MICU",
    "ICU_DISCHARGE",
    "HOSPITAL_DISCHARGE",
    "DISCHARGE_LOCATION//HOME",
    "DISCHARGE_LOCATION//DIED",
    "MEDS_DEATH",
    "LAB//1",
    "LAB//2",
    "LAB//3",
)
SPLITS = ("train", "tuning", "held_out")


def tiny_vocab() -> Vocab:
    """special, Q1..Q10, the 19 interval bins (mean = 1.5 x the bin's lower edge), 2 static tokens, codes."""
    itos = [
        "<PAD>",
        "<UNK>",
        "TIMELINE_END",
        *QUANTILES,
        *INTERVAL_TOKENS,
        "GENDER//F",
        "AGE_DECADE//5",
        *CODES,
    ]
    kinds = ["special"] * 3 + ["quantile"] * 10 + ["interval"] * 19 + ["static"] * 2 + ["code"] * len(CODES)
    first = 3 + len(QUANTILES)
    means = {first + k: 1.5 * float(edge) for k, edge in enumerate(INTERVAL_EDGES_US)}
    return Vocab(itos, kinds, means, ["gender"])


VOCAB = tiny_vocab()
V = len(VOCAB) + 3  # the model's vocabulary may be padded beyond the tokenizer's


def gpt(block_size: int = 40, seed: int = 0) -> GPT:
    torch.manual_seed(seed)
    return GPT(ModelConfig(vocab_size=V, n_layer=2, n_head=2, n_embd=16, block_size=block_size)).eval()


def multimodal(block_size: int = 40, seed: int = 0) -> GPT:
    torch.manual_seed(seed)
    note = ModalityConfig(d_enc=12, compression="latent", n_latents=3, n_latent_layers=1)
    cfg = ModelConfig(
        vocab_size=V,
        n_layer=2,
        n_head=2,
        n_embd=16,
        block_size=block_size,
        fusion=FusionConfig(modalities={"note": note}),
    )
    m = GPT(cfg).eval()
    for block in m.fusion.xattn.values():
        block.gate.data.fill_(2.0)  # open: the media visibly changes the logits
    return m


def contexts(lengths=(5, 9, 14), seed: int = 0, with_media: bool = False) -> Batch:
    """Contexts starting with the 2 static tokens, tokens 1 h apart; notes at T0 + 1.5 h and T0 + 3.5 h."""
    g = np.random.default_rng(seed)
    rows = []
    for n in lengths:
        tokens = g.integers(VOCAB.stoi["HOSPITAL_ADMISSION"], len(VOCAB), n)
        tokens[:2] = VOCAB.stoi["GENDER//F"], VOCAB.stoi["AGE_DECADE//5"]
        rows.append((tokens, T0 + np.arange(n) * HOUR))
    mods = None
    if with_media:
        S, K, N = len(lengths), 2, 4
        gen = torch.Generator().manual_seed(seed)
        note = ModalityInputs(
            torch.randn(S, K, N, 12, generator=gen),
            torch.ones(S, K, N, dtype=torch.bool),
            (T0 + torch.tensor([3.5, 1.5]) * HOUR).long().expand(S, K).clone(),
            torch.ones(S, K, dtype=torch.bool),
        )
        mods = {"note": note}
    return Batch.from_contexts(rows, [2] * len(lengths), mods)


def rules(task: str = "icu_mortality") -> RolloutRules:
    return RolloutRules.build(TaskTokens.resolve(load_task(task), VOCAB), VOCAB, V)


def rig(model: GPT, preferred: dict[int, float]) -> GPT:
    """Make every position's logits `preferred[id]` for the given ids and ~0 elsewhere (ln_f outputs a
    constant vector b; the tied head row of a preferred id is scaled along b)."""
    with torch.no_grad():
        b = torch.randn(model.config.n_embd)
        model.transformer.ln_f.weight.zero_()
        model.transformer.ln_f.bias.copy_(b)
        W = model.lm_head.weight
        W.mul_(0.01)
        for i, logit in preferred.items():
            W[i] = logit * b / b.dot(b)
    return model


# ----------------------------------------------------------------------------------------------------
# The sampler


def test_cached_logits_equal_full_recomputation_through_fan_out_retirement_and_slides():
    m = multimodal(block_size=20)
    batch = contexts(with_media=True)
    media = m.encode_media(batch.modalities)
    cached, full = CachedStepper(m, 3, max_len=20), RecomputeStepper(m, 3, max_len=20)
    with torch.no_grad():
        a = cached.prefill(batch.tokens, batch.times, batch.lengths, batch.prefix, media)
        b = full.prefill(batch.tokens, batch.times, batch.lengths, batch.prefix, media)
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
        fan = torch.tensor([0, 0, 1, 1, 2, 2])
        for s in (cached, full):
            s.keep(fan)
        g = torch.Generator().manual_seed(0)
        rows = 6
        for step in range(16):  # the 14-token context slides (max_len 20) and slides again
            if step == 5:
                keep = torch.tensor([True, False, True, True, False, True])  # retire two rollouts
                for s in (cached, full):
                    s.keep(keep)
                rows = 4
            tok = torch.randint(3, len(VOCAB), (rows, 1), generator=g)
            tim = torch.full((rows, 1), T0 + (20 + step) * HOUR)
            torch.testing.assert_close(cached.step(tok, tim), full.step(tok, tim), rtol=1e-5, atol=1e-5)
    assert int(cached.cache.lengths.max()) < 14 + 16  # it slid
    assert cached.cache.tokens[:, :2].tolist() == [[batch.tokens[0, 0].item(), batch.tokens[0, 1].item()]] * 4


@pytest.mark.parametrize("temperature", [0.0, 1.0])
def test_rollouts_are_identical_with_and_without_the_cache(temperature):
    # Slides (block 24 < 14 + 30) and retirement of finished rows happen in both; greedy or sampled with
    # the same generator, the cached sampler must produce exactly the recomputing sampler's rollouts.
    m = multimodal(block_size=24)
    batch = contexts(with_media=True)
    s = SamplerSettings(n_rollouts=4, temperature=temperature, max_new_tokens=30, retire_below=0.9)
    r = rules()
    a = sample_rollouts(m, batch, r, s, trace=True, generator=torch.Generator().manual_seed(1))
    b = sample_rollouts(
        m, batch, r, s, trace=True, recompute=True, generator=torch.Generator().manual_seed(1)
    )
    np.testing.assert_array_equal(a.tokens, b.tokens)
    np.testing.assert_array_equal(a.times, b.times)
    np.testing.assert_array_equal(a.reason, b.reason)
    assert a.n_tokens.max() + 14 > 24  # a row outgrew the context limit


def test_watching_samples_stops_early_with_exactly_their_full_run_rollouts():
    # `mmehr explain` replays one sample's chunk: once the watched samples' rollouts have all ended, the
    # run may stop, and those rollouts are the ones a full run draws (retirement included).
    m = multimodal(block_size=24)
    batch = contexts(with_media=True)
    s = SamplerSettings(n_rollouts=4, temperature=1.0, max_new_tokens=30, retire_below=0.9)
    r = rules()
    full = sample_rollouts(m, batch, r, s, trace=True, generator=torch.Generator().manual_seed(3))
    for watch in ([0], [1, 2]):
        part = sample_rollouts(
            m, batch, r, s, trace=True, generator=torch.Generator().manual_seed(3), watch=watch
        )
        rows = np.isin(full.sample, watch)
        for name in ("reason", "n_tokens", "elapsed_us", "last_token", "positive", "counted"):
            np.testing.assert_array_equal(getattr(part, name)[rows], getattr(full, name)[rows])
        width = int(full.n_tokens[rows].max())
        np.testing.assert_array_equal(part.tokens[rows, :width], full.tokens[rows, :width])
        assert part.stats["steps"] == width <= full.stats["steps"]
    assert full.stats["steps"] > int(full.n_tokens[full.sample == 0].max())  # sample 0 alone stops early


def test_sampling_never_emits_padding_or_static_ids():
    # The rigged model puts nearly all probability on <PAD> and the static tokens (ETHOS-ARES sampled
    # padding in 69% of its rollouts); masked, they are never drawn.
    banned = [VOCAB.pad_id, VOCAB.stoi["GENDER//F"], VOCAB.stoi["AGE_DECADE//5"], V - 1]
    m = rig(gpt(), {i: 12.0 for i in banned})
    batch = contexts()
    with torch.no_grad():
        assert m(batch.tokens)[0][0, -1].argmax().item() in banned
    s = SamplerSettings(n_rollouts=8, temperature=1.0, max_new_tokens=25)
    out = sample_rollouts(m, batch, rules(), s, trace=True, generator=torch.Generator().manual_seed(0))
    emitted = out.tokens[out.tokens >= 0]
    assert emitted.size > 100
    assert not np.isin(emitted, banned).any()
    assert VOCAB.generatable_mask()[emitted].all()


def test_generated_times_start_at_the_prediction_time_and_only_move_forward():
    m = gpt()
    batch = contexts()
    s = SamplerSettings(n_rollouts=6, temperature=1.0, max_new_tokens=40)
    out = sample_rollouts(m, batch, rules(), s, trace=True, generator=torch.Generator().manual_seed(0))
    last = batch.times[torch.arange(3), batch.lengths - 1].numpy()[out.sample]  # the prediction times
    intervals = np.zeros(V, dtype=np.int64)
    for i, mean in VOCAB.interval_mean_us.items():
        intervals[i] = round(mean)
    steps = 0
    for r in range(len(out.sample)):
        n = out.n_tokens[r]
        tokens, times = out.tokens[r, :n], out.times[r, :n]
        assert times[0] >= last[r]
        clock = np.r_[last[r], times]
        np.testing.assert_array_equal(np.diff(clock), intervals[tokens])  # only interval tokens move it
        assert (np.diff(clock) >= 0).all()
        assert out.elapsed_us[r] == times[-1] - last[r]
        steps += int((intervals[tokens] > 0).sum())
    assert steps > 20  # the clock did move


def test_probabilities_are_the_fraction_of_counted_rollouts_reaching_the_outcome():
    m = gpt(seed=3)
    death = VOCAB.stoi["MEDS_DEATH"]
    with torch.no_grad():
        m.lm_head.weight[death] *= 40  # make deaths common enough to give varied fractions
    K = 7
    out = sample_rollouts(
        m,
        contexts(),
        rules(),
        SamplerSettings(n_rollouts=K, max_new_tokens=30),
        generator=torch.Generator().manual_seed(0),
    )
    p = out.probabilities()
    counts = np.bincount(out.sample, weights=out.reason == OUTCOME, minlength=3)
    # icu_mortality counts rollouts that ended on the outcome or a stop token (ETHOS): not TIMELINE_END,
    # the time limit, or the safety cap (unfinished).
    counted = np.isin(out.reason, [OUTCOME, STOP])
    np.testing.assert_array_equal(out.counted, counted)
    assert (~counted).any()  # some are left out, so the two denominators differ
    np.testing.assert_allclose(p * np.bincount(out.sample, weights=counted, minlength=3), counts, atol=1e-5)
    np.testing.assert_array_equal(out.positive, out.reason == OUTCOME)
    assert len(set(np.round(p * K).astype(int))) > 1 or 0 < p[0] < 1
    died = VOCAB.stoi["DISCHARGE_LOCATION//DIED"]
    assert np.isin(out.last_token[out.positive], [death, died]).all()


def test_without_a_time_limit_the_simulated_time_safety_cap_leaves_rollouts_unfinished():
    # A task with no time limit: a model that only generates 6-month gaps would never stop; past the
    # simulated-time safety cap its rollouts are unfinished (never negative), not `time_limit`.
    from dataclasses import replace

    task = replace(load_task("icu_mortality"), time_limit_days=None)
    r = RolloutRules.build(TaskTokens.resolve(task, VOCAB), VOCAB, V)
    assert r.limit_us is None
    six_months = VOCAB.stoi["INTERVAL//6mt"]
    s = SamplerSettings(n_rollouts=2, max_new_tokens=500, max_simulated_days=3 * 365.25)
    out = sample_rollouts(rig(gpt(), {six_months: 15.0}), contexts(), r, s)
    step = round(VOCAB.interval_mean_us[six_months])
    assert (out.reason == UNFINISHED).all() and not out.counted.any()
    assert (out.n_tokens == int(3 * 365.25 * DAY_US) // step + 1).all()


@pytest.mark.parametrize("task", ["hospital_mortality", "icu_mortality", "icu_admission"])
def test_a_generated_discharge_to_died_is_a_death_not_a_stop(task):
    # DISCHARGE_LOCATION//DIED matches a positive pattern and the stop pattern ^DISCHARGE_LOCATION//: the
    # label calls it positive, so a rollout that generates it must count as reaching the outcome.
    died, home = VOCAB.stoi["DISCHARGE_LOCATION//DIED"], VOCAB.stoi["DISCHARGE_LOCATION//HOME"]
    s = SamplerSettings(n_rollouts=4, max_new_tokens=5)
    out = sample_rollouts(rig(gpt(), {died: 15.0}), contexts(), rules(task), s)
    assert (out.reason == OUTCOME).all() and (out.last_token == died).all()
    assert (out.probabilities() == 1).all()
    out = sample_rollouts(rig(gpt(), {home: 15.0}), contexts(), rules(task), s)
    assert (out.reason == STOP).all() and (out.probabilities() == 0).all()


def test_a_rollout_stops_at_the_outcome_the_time_limit_or_the_safety_cap():
    death, lab, six_months = VOCAB.stoi["MEDS_DEATH"], VOCAB.stoi["LAB//1"], VOCAB.stoi["INTERVAL//6mt"]
    batch, s = contexts(), SamplerSettings(n_rollouts=3, max_new_tokens=12)
    out = sample_rollouts(rig(gpt(), {death: 15.0}), batch, rules(), s)
    assert (out.reason == OUTCOME).all() and (out.n_tokens == 1).all() and (out.probabilities() == 1).all()
    out = sample_rollouts(rig(gpt(), {lab: 15.0}), batch, rules(), s)
    # The safety cap: unfinished, never counted; with no counted rollout a sample has no probability.
    assert (out.reason == UNFINISHED).all() and (out.n_tokens == 12).all() and not out.counted.any()
    assert np.isnan(out.probabilities()).all()
    out = sample_rollouts(rig(gpt(), {six_months: 15.0}), batch, rules(), s)
    step = round(VOCAB.interval_mean_us[six_months])
    limit = load_task("icu_mortality").time_limit_days * DAY_US
    assert (out.reason == TIME_LIMIT).all()
    assert (out.n_tokens == limit // step + 1).all() and (out.elapsed_us > limit).all()
    # readmission_30d: the 30-day horizon (shorter than its time limit) ends rollouts at 30 days.
    r30 = rules("readmission_30d")
    assert r30.limit_us == 30 * DAY_US
    out = sample_rollouts(rig(gpt(), {VOCAB.stoi["INTERVAL//4d-7d"]: 15.0}), batch, r30, s)
    assert (out.reason == TIME_LIMIT).all() and (out.elapsed_us > 30 * DAY_US).all()


# ----------------------------------------------------------------------------------------------------
# `mmehr evaluate` end to end on the tokenized MIMIC-IV demo


def mmehr(*args: str, **kw) -> subprocess.CompletedProcess:
    exe = Path(sys.executable).with_name("mmehr")
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run([str(exe), *args], capture_output=True, text=True, env=env, **kw)


@pytest.fixture(scope="module")
def checkpoint(demo_timelines: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny model trained for a few steps on the demo (the real trainer and checkpoint format)."""
    from mmehr.runconfig import resolve_config
    from mmehr.train import train

    raw = {
        "data": {"timelines": str(demo_timelines)},
        "model": {"n_layer": 1, "n_head": 2, "n_embd": 32, "block_size": 96},
        "optim": {"max_steps": 3, "batch_size": 4, "warmup_steps": 1},
        "run": {"eval_every": 0, "val_windows": 4, "log_every": 1, "threads": 1},
    }
    out = tmp_path_factory.mktemp("rollout_ckpt") / "run"
    train(resolve_config(raw), out, progress=False)
    return out


EVAL_ARGS = (
    "--rollouts",
    "5",
    "--max-new-tokens",
    "48",
    "--bootstrap",
    "50",
    "--no-progress",
    "--threads",
    "1",
)


def test_evaluate_writes_meds_predictions_that_meds_evaluation_accepts(checkpoint, demo_timelines, tmp_path):
    out = tmp_path / "eval"
    proc = mmehr(
        "evaluate", "--checkpoint", str(checkpoint), "--task", "icu_mortality", "--out", str(out), *EVAL_ARGS,
        "--tuning-samples", "4", "--max-new-tokens", "600",  # most rollouts of the untrained model finish
        "--save-tokens",
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    assert str(out.resolve()) in proc.stdout
    task = out / "icu_mortality"
    table = pq.read_table(task / "predictions.parquet")
    assert [(f.name, str(f.type)) for f in table.schema] == [
        ("subject_id", "int64"),
        ("prediction_time", "timestamp[us]"),
        ("boolean_value", "bool"),
        ("predicted_boolean_value", "bool"),
        ("predicted_boolean_probability", "float"),
    ]
    pred = pl.read_parquet(task / "predictions.parquet")
    truth = task_samples(load_task("icu_mortality"), TimelineStore(demo_timelines, "held_out"))
    labels = pl.read_parquet(task / "labels.parquet")
    assert labels["subject_id"].to_list() == truth["subject_id"].to_list()
    assert labels["boolean_value"].to_list() == truth["boolean_value"].to_list()
    # Predictions: the samples with at least one counted rollout, with their true labels.
    rollouts = pl.read_parquet(task / "rollouts.parquet")
    assert rollouts.height == 5 * labels.height and set(rollouts["stop_reason"]) <= set(STOP_REASONS)
    counted = rollouts.group_by("sample").agg(pl.col("counted").sum()).sort("sample")["counted"].to_numpy()
    assert pred.height == int((counted > 0).sum()) > 0
    assert pred.select("subject_id", "prediction_time", "boolean_value").equals(
        labels.filter(pl.Series(counted > 0))
    )
    p = pred["predicted_boolean_probability"].to_numpy()
    k = counted[counted > 0]
    np.testing.assert_allclose(p * k, np.round(p * k), atol=1e-5)  # fractions of the counted rollouts
    # ETHOS's per-rollout report: the ending token, simulated beside true time to the outcome.
    assert {"last_token", "elapsed_us", "true_outcome", "true_elapsed_us", "counted"} <= set(rollouts.columns)
    record = pl.read_parquet(task / "samples.parquet")  # labels with their true outcome and time
    assert record["boolean_value"].to_list() == labels["boolean_value"].to_list()
    assert (record["outcome_time"].cast(pl.Int64) == truth["outcome_time"]).all()
    assert (
        record["boolean_value"] == record["true_outcome"].is_in(["MEDS_DEATH", "DISCHARGE_LOCATION//DIED"])
    ).all()
    # --save-tokens: every generated token, the ending one last
    assert (rollouts["tokens"].list.len() == rollouts["n_tokens"]).all()
    assert (rollouts["tokens"].list.last() == rollouts["last_token"]).all()
    ended = rollouts.filter(pl.col("stop_reason") == "outcome")
    assert set(ended["last_token"]) <= {"MEDS_DEATH", "DISCHARGE_LOCATION//DIED"}
    assert (rollouts["counted"] == rollouts["stop_reason"].is_in(["outcome", "stop"])).all()
    metrics = json.loads((task / "metrics.json").read_text())
    threshold = json.loads((out / "thresholds.json").read_text())["icu_mortality"]
    assert metrics["threshold"] == {"value": threshold, "source": "tuning"}
    assert (pred["predicted_boolean_value"].to_numpy() == (p >= threshold)).all()
    assert sum(metrics["stop_reasons"].values()) == pytest.approx(1.0)
    assert metrics["n_without_probability"] == labels.height - pred.height
    assert metrics["rollouts"]["unfinished"] == (rollouts["stop_reason"] == "unfinished").sum()
    assert "unfinished (n)" in (out / "summary.md").read_text()
    # Where the rollouts ended, beside the real endings of the same samples (one per sample).
    ends, real = metrics["ends"]["rollouts"], metrics["ends"]["real"]
    assert metrics["ends"]["samples"] == labels.height
    assert sum(ends.values()) == pytest.approx(1.0) and sum(real.values()) == pytest.approx(1.0)
    by_outcome = sum(v for k, v in ends.items() if k.startswith("outcome: "))
    assert by_outcome == pytest.approx((rollouts["stop_reason"] == "outcome").mean())
    deaths = real.get("MEDS_DEATH", 0.0) + real.get("DISCHARGE_LOCATION//DIED", 0.0)
    assert deaths == pytest.approx(labels["boolean_value"].mean())
    assert "Where rollouts ended" in (out / "summary.md").read_text()
    assert (
        metrics["tuning"]["n_samples"] == 4 and (task / "tuning" / "predictions.parquet").is_file()
    )  # of 15
    assert set(metrics["cohorts"]) == {"cardiac", "pulmonary"}
    assert (task / "curves.png").stat().st_size > 10_000 and (out / "summary.md").is_file()
    assert json.loads((out / "manifest.json").read_text())["tasks"] == ["icu_mortality"]

    result = tmp_path / "meds_eval.json"
    cli = Path(sys.executable).with_name("meds-evaluation-cli")
    proc = subprocess.run(
        [str(cli), f"predictions_path={task / 'predictions.parquet'}", f"output_file={result}"],
        capture_output=True,
        text=True,
        cwd=tmp_path,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    theirs = json.loads(result.read_text())["samples_equally_weighted"]
    assert theirs["roc_auc_score"] == pytest.approx(metrics["metrics"]["auroc"]["value"], abs=1e-6)
    assert theirs["brier_score"] == pytest.approx(metrics["metrics"]["brier"]["value"], abs=1e-6)


def test_an_interrupted_evaluation_resumes_without_redoing_finished_chunks(checkpoint, tmp_path):
    out = tmp_path / "eval"
    args = [
        "evaluate",
        "--checkpoint",
        str(checkpoint),
        "--task",
        "hospital_mortality",
        "--out",
        str(out),
        "--rollouts",
        "20",
        "--batch-size",
        "20",
        "--max-new-tokens",
        "96",
        "--max-samples",
        "8",
        "--threshold-from",
        "none",
        "--bootstrap",
        "20",
        "--no-progress",
        "--threads",
        "1",
    ]
    chunks = out / "hospital_mortality" / "chunks"
    exe = Path(sys.executable).with_name("mmehr")
    proc = subprocess.Popen(
        [str(exe), *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    deadline = time.monotonic() + 60
    while not list(chunks.glob("chunk-*.parquet")) and time.monotonic() < deadline:
        time.sleep(0.01)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 130, err
    assert "rerun to resume" in err
    done = {p.name: p.read_bytes() for p in chunks.glob("chunk-*.parquet")}
    assert 0 < len(done) < 8  # some chunks finished, not all
    assert (
        not (out / "manifest.json").exists()
        and not (out / "hospital_mortality" / "predictions.parquet").exists()
    )
    assert not list(chunks.glob(".*tmp*"))  # nothing half-written left behind

    proc = mmehr(*args)
    assert proc.returncode == 0, proc.stderr
    assert len(list(chunks.glob("chunk-*.parquet"))) == 8
    assert all((chunks / name).read_bytes() == data for name, data in done.items())  # reused, not redone
    assert pl.read_parquet(out / "hospital_mortality" / "predictions.parquet").height == 8
    assert (out / "manifest.json").is_file()

    changed = mmehr(*[a if a != "96" else "64" for a in args])  # other settings: refuse to mix chunks
    assert changed.returncode == 1 and "other settings" in changed.stderr


def test_hiding_a_modality_the_model_lacks_fails_clearly(checkpoint, tmp_path, capsys):
    from mmehr.cli import main

    args = ["--checkpoint", str(checkpoint), "--task", "icu_mortality", "--out", str(tmp_path)]
    assert main(["evaluate", *args, "--hide-modality", "ecg", *EVAL_ARGS]) == 1
    err = capsys.readouterr().err
    assert "--hide-modality ['ecg']" in err and "modalities are none" in err
    assert main(["evaluate", *args, "--cohort", "broken", *EVAL_ARGS]) == 1
    assert "expected NAME=REGEX" in capsys.readouterr().err


def test_torchrun_shards_the_samples_and_rank_0_merges_what_one_process_computes(checkpoint, tmp_path):
    args = [
        "evaluate",
        "--checkpoint",
        str(checkpoint),
        "--task",
        "hospital_mortality",
        "--batch-size",
        "20",
        "--threshold-from",
        "none",
        "--cohort",
        "afib=^DIAGNOSIS//ICD//9//42731",
        *EVAL_ARGS,
    ]
    torchrun = Path(sys.executable).with_name("torchrun")
    exe = Path(sys.executable).with_name("mmehr")
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(
        [str(torchrun), "--nproc-per-node", "2", str(exe), *args, "--out", str(tmp_path / "two")],
        capture_output=True,
        text=True,
        env=env,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert json.loads((tmp_path / "two" / "manifest.json").read_text())["processes"] == 2
    assert mmehr(*args, "--out", str(tmp_path / "one")).returncode == 0
    two, one = (
        pl.read_parquet(tmp_path / d / "hospital_mortality" / "rollouts.parquet") for d in ("two", "one")
    )
    assert two.height == 20 * 5 and two.equals(
        one
    )  # chunks 0, 2 on rank 0 and 1 on rank 1: the same rollouts
    metrics = json.loads((tmp_path / "two" / "hospital_mortality" / "metrics.json").read_text())
    assert set(metrics["cohorts"]) == {"afib"} and metrics["threshold"] == {"value": 0.5, "source": "none"}


# ----------------------------------------------------------------------------------------------------
# Labels and cohorts on the real MIMIC-IV demo


def _samples(root: Path, task: str) -> pl.DataFrame:
    return pl.concat([task_samples(load_task(task), TimelineStore(root, s)) for s in SPLITS])


def test_icu_mortality_labels_agree_with_the_demos_own_icu_mortality_task(demo_timelines, mimic_demo_root):
    # The demo ships `ICU Mortality first 24h` (prediction 24 h after ICU admission, stays that end within
    # the first 48 h excluded). Each of its 74 rows is one of our 140 ICU stays, with the same label.
    ours = _samples(demo_timelines, "icu_mortality")
    assert ours.height == 140
    theirs = pl.read_parquet(mimic_demo_root / "tasks" / "ICU Mortality first 24h.parquet")
    theirs = theirs.select(
        "subject_id",
        (pl.col("prediction_time").cast(pl.Int64) - DAY_US).alias("admitted"),
        pl.col("boolean_value").alias("theirs"),
    )
    both = theirs.join(ours, left_on=["subject_id", "admitted"], right_on=["subject_id", "prediction_time"])
    assert both.height == theirs.height == 74
    assert (both["theirs"] == both["boolean_value"]).all()
    assert both["theirs"].sum() == 9
    rest = ours.join(
        theirs, left_on=["subject_id", "prediction_time"], right_on=["subject_id", "admitted"], how="anti"
    )
    assert ((rest["outcome_time"] - rest["prediction_time"]) < 48 * HOUR).all()


def test_cohort_members_have_a_matching_diagnosis_before_the_prediction_time(demo_timelines):
    store = TimelineStore(demo_timelines, "train")
    samples = task_samples(load_task("hospital_mortality"), store)
    pattern = r"^DIAGNOSIS//ICD//(9//427|10//I4[89])"  # atrial fibrillation / flutter and other arrhythmias
    member = cohort_members(samples, store, pattern)
    assert 0 < member.sum() < samples.height
    ids = store.vocab.ids_matching(pattern)
    for (i, end), m in zip(samples.select("subject_index", "context_end").iter_rows(), member):
        tokens, _ = store.timeline(i)
        assert m == bool(np.isin(np.asarray(tokens[:end]), ids).any())


ACES_CONFIGS = {
    # The same definitions as configs/tasks, in ACES: trigger, then the window to the first episode end;
    # label = a death (MEDS_DEATH, or a hospital discharge to DIED) in it, events at its end included.
    "icu_mortality": ("^ICU_ADMISSION//", "or(icu_discharge, hosp_discharge, meds_death)"),
    "hospital_mortality": ("^HOSPITAL_ADMISSION//", "or(hosp_discharge, meds_death)"),
}


@pytest.mark.parametrize("timelines", ["demo_timelines", "ethos_timelines"])
@pytest.mark.parametrize("task", list(ACES_CONFIGS))
def test_mortality_labels_agree_with_aces(task, timelines, request, mimic_demo_root, tmp_path):
    demo_timelines = request.getfixturevalue(timelines)  # the default preset, and ETHOS's
    aces = pytest.importorskip("aces", reason="es-aces is not installed")
    from aces import config, predicates, query
    from omegaconf import DictConfig

    trigger, end = ACES_CONFIGS[task]
    (tmp_path / "task.yaml").write_text(
        "predicates:\n"
        f"  start: {{code: {{regex: '{trigger}'}}}}\n"
        "  icu_discharge: {code: {regex: '^ICU_DISCHARGE//'}}\n"
        "  hosp_discharge: {code: {regex: '^HOSPITAL_DISCHARGE//'}}\n"
        "  died_discharge: {code: {regex: '^HOSPITAL_DISCHARGE//DIED$'}}\n"
        "  meds_death: {code: MEDS_DEATH}\n"
        "  death: {expr: 'or(meds_death, died_discharge)'}\n"
        f"  episode_end: {{expr: '{end}'}}\n"
        "trigger: start\n"
        "windows:\n"
        "  target: {start: trigger, end: start -> episode_end, start_inclusive: false, end_inclusive: true,"
        " label: death, index_timestamp: start}\n"
    )
    data = pl.concat(
        [
            pl.read_parquet(f, columns=["subject_id", "time", "code", "numeric_value"])
            for f in sorted((mimic_demo_root / "data").rglob("*.parquet"))
        ]
    )
    data.write_parquet(tmp_path / "data.parquet")
    cfg = config.TaskExtractorConfig.load(config_path=str(tmp_path / "task.yaml"))
    preds = predicates.get_predicates_df(
        cfg, DictConfig({"path": str(tmp_path / "data.parquet"), "standard": "meds"})
    )
    labels = query.query(cfg, preds).select(
        "subject_id", pl.col("trigger").cast(pl.Int64), (pl.col("label") > 0).alias("aces")
    )
    ours = _samples(demo_timelines, task).with_columns(start_time=pl.col("prediction_time"))
    both = ours.join(
        labels, left_on=["subject_id", "start_time"], right_on=["subject_id", "trigger"], how="full"
    )
    # Every sample is an ACES row and the reverse (ACES drops a trigger without any episode end: none here).
    assert both["aces"].null_count() == 0 and both["boolean_value"].null_count() == 0
    assert both.height == {"icu_mortality": 140, "hospital_mortality": 275}[task]
    assert (both["aces"] == both["boolean_value"]).all()
    assert aces.__name__ == "aces"


def test_rollouts_do_not_depend_on_the_thread_count():
    # A grid evaluates a run on however many cores are free when its evaluation starts (CoreShare).
    torch.manual_seed(0)
    m = GPT(ModelConfig(vocab_size=V, n_layer=2, n_head=4, n_embd=128, block_size=64)).eval()
    batch = contexts(lengths=tuple(range(5, 45)))
    s = SamplerSettings(n_rollouts=20, max_new_tokens=20)
    threads = torch.get_num_threads()
    out = []
    try:
        for n in (1, 2):
            torch.set_num_threads(n)
            gen = torch.Generator().manual_seed(0)
            out.append(sample_rollouts(m, batch, rules(), s, trace=True, generator=gen))
    finally:
        torch.set_num_threads(threads)
    np.testing.assert_array_equal(out[0].tokens, out[1].tokens)
    np.testing.assert_array_equal(out[0].reason, out[1].reason)


def test_an_ending_no_real_timeline_has_is_flagged():
    # 100 ICU-mortality samples, 2 rollouts each: the real stays end in an ICU discharge or a death, and 15
    # rollouts (7.5 %) leave the ICU through a hospital discharge, a trajectory the data never has.
    n = 100
    stop = ["stop"] * 150 + ["outcome"] * 35 + ["stop"] * 15
    last = ["ICU_DISCHARGE"] * 150 + ["MEDS_DEATH"] * 35 + ["DISCHARGE_LOCATION//HOME"] * 15
    rollouts = pl.DataFrame(
        {
            "sample": np.repeat(np.arange(n), 2),
            "stop_reason": stop,
            "last_token": last,
            "true_outcome": np.repeat(["ICU_DISCHARGE"] * 60 + ["MEDS_DEATH"] * 40, 2),
        }
    )
    ends = ending_shares(rollouts)
    assert ends["real"] == {"ICU_DISCHARGE": 0.6, "MEDS_DEATH": 0.4} and ends["samples"] == n  # per sample
    assert ends["rollouts"]["stop: DISCHARGE_LOCATION//HOME"] == pytest.approx(0.075)
    (warning,) = unreal_end_warnings("icu_mortality", ends)
    assert warning.startswith("8% of icu_mortality's rollouts end on DISCHARGE_LOCATION//HOME")
    # Where the rollouts' share predicts fewer than 5 such real endings, a small sample may lack a real
    # one by chance: 3 of 40 rollouts (7.5 %) on 20 samples predict 1.5, and are not flagged.
    small = rollouts.head(40).with_columns(
        pl.Series("last_token", ["ICU_DISCHARGE"] * 37 + ["DISCHARGE_LOCATION//HOME"] * 3)
    )
    assert ending_shares(small)["rollouts"]["stop: DISCHARGE_LOCATION//HOME"] == pytest.approx(0.075)
    assert unreal_end_warnings("icu_mortality", ending_shares(small)) == []
    # An outcome the samples happen not to have is a prediction, not a made-up trajectory.
    no_deaths = rollouts.with_columns(pl.lit("ICU_DISCHARGE").alias("true_outcome"))
    assert all("MEDS_DEATH" not in w for w in unreal_end_warnings("icu_mortality", ending_shares(no_deaths)))
    # An evaluation written before the samples were counted (3de4120) has nothing to judge by: a report
    # over a study whose older runs have it renders without the warning, as it did for them then.
    assert unreal_end_warnings("icu_mortality", {k: v for k, v in ends.items() if k != "samples"}) == []
