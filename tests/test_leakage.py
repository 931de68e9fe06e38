"""The leakage test: the strict time mask is what keeps an outcome-revealing note out of an evaluation.

A synthetic cohort is generated with `--canary`: just after each stay ends, a note states how it ended
("... expired", "... was admitted to the intensive care unit"). The modality strengths are 0, so no other
note carries outcome information. Two models are trained identically on the real pipeline (synth,
tokenize, index notes, encode with the weight-free `note-hash` encoder, train), except that the second is
the deliberately unmasked variant: its windows retrieve events whatever their time
(`unsafe_ignore_event_time`) and its cross-attention ignores acquisition times (the test replaces
`mmehr.model.fusion.visible_media`, the strict mask, by "every valid event"). Each is evaluated on ICU admission (predicted at hospital admission, which
the canary reveals) with and without the note modality (the same checkpoint, notes hidden):

- masked: the notes add no AUROC (the paired difference's 95% CI reaches 0 or below);
- unmasked: the notes add a lot (the CI is far above 0), so the test would catch a broken mask.
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import pytest
import torch

from conftest import run_mmehr as mmehr
from mmehr.checkpoint import load_model
from mmehr.data.windows import TrainWindows, assemble
from mmehr.evaluate.pipeline import evaluate
from mmehr.evaluate.runner import EvalData
from mmehr.evaluate.sampler import SamplerSettings
from mmehr.evaluate.scoring import EvalOptions
from mmehr.evaluate.tasks import load_task
from mmehr.modalities.store import EmbeddingStore
from mmehr.model import fusion
from mmehr.runconfig import resolve_config
from mmehr.train import Trainer


class LeakyWindows(TrainWindows):
    """Training windows that carry each subject's latest notes, future ones included (test only)."""

    def batch(self, rows):
        return assemble(
            self.store,
            rows.tolist(),
            self.modality_stores,
            self.k_max,
            last_is_target=True,
            max_tokens=self.max_tokens,
            pad_to=self.pad_to,
            unsafe_ignore_event_time=True,
        )


@pytest.fixture(scope="module")
def cohort(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("leakage")
    mmehr(
        "synth",
        "--out",
        str(root / "synth"),
        "--subjects",
        "800",
        "--seed",
        "0",
        "--canary",
        "--ecg-strength",
        "0",
        "--cxr-strength",
        "0",
        "--note-strength",
        "0",
        "--cxr-size",
        "32",
    )
    mmehr(
        "tokenize", "--meds", str(root / "synth" / "meds"), "--out", str(root / "timelines"), "--no-progress"
    )
    mmehr("index", "--source", "note", "--root", str(root / "synth" / "note"), "--out", str(root / "events"))
    mmehr("encode", "--events", str(root / "events"), "--encoder", "note-hash", "--out", str(root / "notes"))
    return root


def see_every_event(times, media_time, media_valid):
    """The unmasked variant of `mmehr.model.fusion.visible_media`: every valid event, whatever its time."""
    return media_valid[:, None, :].expand(-1, times.shape[1], -1)


def train_and_evaluate(root: Path, leaky: bool) -> dict:
    """Train one model (1,000 steps, ~2M tokens) and evaluate ICU admission with and without notes."""
    with pytest.MonkeyPatch.context() as patch:
        if leaky:
            patch.setattr(fusion, "visible_media", see_every_event)
        return _train_and_evaluate(root, leaky)


def _train_and_evaluate(root: Path, leaky: bool) -> dict:
    torch.set_num_threads(1)
    raw = {
        "data": {
            "timelines": str(root / "timelines"),
            "modalities": {"note": {"store": str(root / "notes"), "k_max": 4, "max_tokens": 64}},
        },
        "model": {
            "n_layer": 2,
            "n_head": 2,
            "n_embd": 64,
            "block_size": 128,
            "fusion": {"gate": "tanh", "xattn_every": 1, "modalities": {"note": {"compression": "mean"}}},
        },
        "optim": {"max_steps": 1000, "batch_size": 16, "warmup_steps": 20, "lr": 3e-3, "min_lr": 2e-4},
        "run": {"eval_every": 0, "val_windows": 16, "log_every": 100, "threads": 1, "seed": 0},
    }
    name = "leaky" if leaky else "masked"
    trainer = Trainer(resolve_config(raw), root / f"train_{name}", progress=False)
    if leaky:
        w = trainer.train_windows
        trainer.train_windows = LeakyWindows(
            w.store, w.block_size, w.modality_stores, w.k_max, max_tokens=w.max_tokens, seed=0
        )
    trainer.fit()

    model, _ = load_model(root / f"train_{name}")
    data = EvalData(
        root / "timelines", 120, {"note": EmbeddingStore(root / "notes")}, {"note": 4}, {"note": 64}
    )
    # a rollout past the safety cap is unfinished, not negative: leave room for most rollouts to finish
    settings = SamplerSettings(n_rollouts=10, max_new_tokens=500, batch_rows=400)
    options = EvalOptions(threshold_from="none", knockout=("note",), unsafe_leak=leaky, n_boot=300)
    # The leak is measured on ICU admission alone (the preset also counts deaths, which dilute the
    # canary's ICU signal): the target this test was calibrated on.
    task = replace(
        load_task("icu_admission"),
        positive=["^ICU_ADMISSION$"],
        stop=["^HOSPITAL_DISCHARGE$", "^MEDS_DEATH$"],
    )
    results = evaluate(model, [task], data, settings, root / f"eval_{name}", options, progress=False)
    return results["icu_admission"]


def test_masked_notes_gain_nothing_while_unmasked_notes_leak_the_outcome(cohort):
    masked = train_and_evaluate(cohort, leaky=False)
    leaky = train_and_evaluate(cohort, leaky=True)
    assert masked["n_samples"] == leaky["n_samples"] > 100 and masked["n_positive"] > 30

    gain = masked["knockout"]["note"]["auroc_difference"]
    assert gain["lo"] <= 0.0, f"the masked model gains AUROC from notes: {gain}"

    # The positive control: the unmasked variant exploits the canary. At 500 steps it was on the edge of
    # learning it (AUROC 0.79 and 0.73 on two tokenizations differing in 65 of 205k tokens; 0.69, a leak
    # of +0.16 [+0.04, +0.29], on another CPU); at 1,000 steps 0.86 and +0.25 [+0.12, +0.38] on that CPU.
    # The bounds ask for a clear leak, not for one run's size.
    leak = leaky["knockout"]["note"]["auroc_difference"]
    assert leak["lo"] > 0.05, f"the unmasked variant should exploit the canary: {leak}"
    assert leaky["metrics"]["auroc"]["lo"] > masked["metrics"]["auroc"]["hi"]
    assert leaky["metrics"]["auroc"]["value"] > 0.7
