"""benchmarks/probe_states.py: the probes recover what is planted, and the states are the ones rollouts
start from (a context's last token, whatever the batch's padding)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))
from mmehr.checkpoint import load_model
from mmehr.data.timelines import TimelineStore
from mmehr.evaluate.cli import eval_data_from_config
from mmehr.evaluate.runner import chunk_contexts
from mmehr.evaluate.tasks import load_task
from probe_states import (
    context_states,
    latest_event_latents,
    markdown,
    probe_auroc,
    probe_auroc_within,
    probe_r2,
)


def test_probes_recover_a_planted_signal_and_give_nothing_without_one():
    rng = np.random.default_rng(0)
    n, d = 1200, 16
    t = rng.normal(size=n)
    x = rng.normal(size=(n, d))
    x[:, 3] += t  # one coordinate carries the target, with noise of its own size
    tr, ev = slice(0, 800), slice(800, n)
    g = np.arange(800) // 2  # subjects of two samples each
    assert abs(probe_r2(x[tr], t[tr], x[ev], t[ev]) - 0.5) < 0.1  # var(t | x3) = 1/2 of var(t)
    assert probe_r2(rng.normal(size=(n, d))[tr], t[tr], rng.normal(size=(n, d))[ev], t[ev]) < 0.05
    y = rng.random(n) < 1 / (1 + np.exp(-2 * x[:, 3]))
    assert probe_auroc(x[tr], y[tr], g, x[ev], y[ev]) > 0.75
    assert (
        abs(probe_auroc(rng.normal(size=(n, d))[tr], y[tr], g, rng.normal(size=(n, d))[ev], y[ev]) - 0.5)
        < 0.08
    )
    # out of fold within one split: the same signal, read the same way
    assert abs(probe_auroc_within(x[tr], y[tr], g) - probe_auroc(x[tr], y[tr], g, x[ev], y[ev])) < 0.06
    # a state that holds the train samples' own outcomes (memorised) reads them within train only
    mem = rng.normal(size=(n, d))
    mem[tr, 5] += 3 * y[tr]
    assert (
        probe_auroc_within(mem[tr], y[tr], g) > 0.9 and probe_auroc(mem[tr], y[tr], g, mem[ev], y[ev]) < 0.6
    )
    few = np.zeros(800, bool)
    few[:4] = True  # 4 positives: too few to cross-validate
    assert np.isnan(probe_auroc(x[tr], few, g, x[ev], y[ev])) and np.isnan(probe_auroc_within(x[tr], few, g))


@pytest.fixture(scope="module")
def run(fast_demo_out: Path):
    model, cfg = load_model(fast_demo_out / "experiments" / "runs" / "all_three" / "seed0" / "train", "cpu")
    data = eval_data_from_config(cfg, argparse.Namespace(context_tokens=None, timelines=None))
    return model, data, load_task("hospital_mortality")


def test_each_state_is_its_context_alone_and_the_logits_forward_reads(run):
    model, data, task = run
    x, samples = context_states(model, data, task, "held_out", max_samples=12, batch_size=12)
    alone, _ = context_states(model, data, task, "held_out", max_samples=12, batch_size=1)
    assert x.shape == (samples.height, model.config.n_embd) and samples.height > 1
    np.testing.assert_allclose(x, alone, rtol=1e-4, atol=1e-4)  # right padding does not reach the state
    # the state is what forward's logits at the context's last token read
    store = TimelineStore(data.timelines, "held_out")
    batch = chunk_contexts(store, samples, data, data.modality_stores)
    with torch.no_grad():
        logits, _ = model(batch.tokens, batch.times, batch.modalities or None)
        last = logits[torch.arange(len(batch)), batch.lengths - 1]
        torch.testing.assert_close(model.lm_head(torch.from_numpy(x)), last, rtol=1e-4, atol=1e-4)


def test_hiding_every_modality_changes_the_states_of_samples_with_events(run):
    model, data, task = run
    seen, _ = context_states(model, data, task, "held_out", max_samples=12)
    blind, _ = context_states(
        model, data, task, "held_out", max_samples=12, hidden=tuple(data.modality_stores)
    )
    assert (np.abs(seen - blind).max(axis=1) > 1e-4).any()  # some contexts have media before them


def test_the_stages_are_each_samples_own_latents_and_cross_attention_output(run):
    model, data, task = run
    stages, alone = {}, {}
    x, samples = context_states(model, data, task, "held_out", max_samples=12, batch_size=12, stages=stages)
    context_states(model, data, task, "held_out", max_samples=12, batch_size=1, stages=alone)
    layers = [f"xattn:{i}" for i in model.fusion.xattn]
    assert sorted(stages) == sorted([*layers, *(f"latents:{m}" for m in model.fusion.compressors)])
    for key in stages:  # the batch's other rows and its padding do not reach a sample's stage
        np.testing.assert_allclose(np.concatenate(stages[key]), np.concatenate(alone[key]), atol=1e-4)
    xattn = np.concatenate(stages[layers[0]])
    assert xattn.shape == x.shape and np.abs(xattn).max() > 0
    # a row's latents are its latest present event compressed alone; a row without one gets zeros
    batch = chunk_contexts(TimelineStore(data.timelines, "held_out"), samples, data, data.modality_stores)
    for name, latents in latest_event_latents(model, batch.modalities).items():
        inp = batch.modalities[name]
        present = (inp.event_mask & inp.token_mask.any(-1)).numpy()
        assert (latents[~present.any(1)] == 0).all()
        for row in np.flatnonzero(present.any(1))[:2]:
            k = max(np.flatnonzero(present[row]), key=lambda j: int(inp.event_time[row, j]))
            with torch.no_grad():
                z, _ = model.fusion.compressors[name](inp.emb[row, k][None], inp.token_mask[row, k][None])
            np.testing.assert_allclose(latents[row], z.flatten().numpy(), atol=1e-5)
    blind = {}
    context_states(
        model, data, task, "held_out", max_samples=12, hidden=tuple(data.modality_stores), stages=blind
    )
    assert not any(k.startswith("latents:") for k in blind)  # nothing to compress


def test_an_ehr_only_run_has_no_stages(fast_demo_out: Path):
    model, cfg = load_model(fast_demo_out / "experiments" / "runs" / "ehr_only" / "seed0" / "train", "cpu")
    data = eval_data_from_config(cfg, argparse.Namespace(context_tokens=None, timelines=None))
    stages = {}
    x, _ = context_states(
        model, data, load_task("hospital_mortality"), "held_out", max_samples=4, stages=stages
    )
    assert model.fusion is None and stages == {} and len(x) > 0


def test_the_table_has_a_cell_under_every_heading():
    record = {"run": "r", "hidden": [], "n_train": 8, "n_eval": 2, "outcome": 0.7, "outcome_train": 0.8,
              "ehr_part_r2": 0.5, "af": 0.9, "opacity": 0.5, "symptom": 0.5, "zero_shot": 0.6}  # fmt: skip
    head, rule, row = markdown([record], "icu_admission").splitlines()[2:]
    assert head.count("|") == rule.count("|") == row.count("|")
    assert "| 0.600 | 0.700 | 0.800 | 0.500 | 0.900 |" in row  # zero-shot, held out, train, R², AF
    record["stages"] = {"latents:ecg": {"af": 0.95}, "xattn:1": {"af": 0.6, "opacity": 0.5, "symptom": 0.7}}
    staged = markdown([record], "icu_admission").split("along the fusion")[1].splitlines()
    rows = [line for line in staged if line.startswith("| r |")]
    assert len(rows) == 3 and "| af | 0.950 | 0.600 | 0.900 |" in rows[0]  # latents, cross-attention, state
    assert "| symptom | nan | 0.700 | 0.500 |" in rows[2]  # no note latents in this record
