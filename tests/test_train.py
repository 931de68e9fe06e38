"""The trainer on the tokenized MIMIC-IV demo with a small note store: loss goes down, SIGKILL + --resume
is bit-for-bit, 2-process gloo DDP equals one process, freeze_decoder freezes, checkpoints never unpickle."""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import polars as pl
import pytest
import torch
import yaml
from safetensors.torch import load_file

from mmehr.checkpoint import STATE, load_model, load_state, read_weights, resolve_checkpoint
from mmehr.cli import main
from mmehr.config import ConfigError
from mmehr.data.timelines import TimelineStore
from mmehr.data.windows import TrainWindows
from mmehr.io import read_json, write_json
from mmehr.modalities.encode import encode_events
from mmehr.modalities.encoders import get_encoder
from mmehr.modalities.store import EmbeddingStore
from mmehr.model.gpt import GPT
from mmehr.runconfig import OptimConfig, resolve_config
from mmehr.train import lr_at, train

BIN = Path(sys.executable).parent
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1"}


@pytest.fixture(scope="module")
def note_store(demo_timelines, tmp_path_factory) -> Path:
    """Notes (weight-free note-hash encoder, d=16) at token times spread over every train/tuning timeline."""
    root = tmp_path_factory.mktemp("train_notes")
    rows = []
    for split in ("train", "tuning"):
        store = TimelineStore(demo_timelines, split)
        for i in range(len(store)):
            _, times = store.timeline(i)
            sid = int(store.subject_ids[i])
            for j, q in enumerate(np.linspace(0, len(times) - 1, 8).astype(int)):
                rows.append({"subject_id": sid, "time": int(times[q]), "modality": "note", "event_id": f"{sid}-{j}",
                             "payload": "-", "text": f"note {j} fever rigors {sid % 7}"})  # fmt: skip
    (root / "events").mkdir()
    pl.DataFrame(rows).write_parquet(root / "events" / "events.parquet")
    write_json(root / "events" / "manifest.json", {"source": "test"})
    encode_events(root / "events", get_encoder("note-hash", d=16), root / "store", progress=False)
    return root / "store"


def raw_config(timelines: Path, store: Path | None, **sections) -> dict:
    """A tiny run: 2 layers x 32, context 48, 4 windows x 2 micro-batches per step, dropouts on."""
    cfg = {
        "data": {"timelines": str(timelines), "modalities": {"note": {"store": str(store), "k_max": 3}} if store else {}},
        "model": {"n_layer": 2, "n_head": 2, "n_embd": 32, "block_size": 48, "dropout": 0.1,
                  "fusion": {"xattn_every": 1, "modality_dropout": 0.2,
                             "modalities": {"note": {"compression": "latent", "n_latents": 4, "n_latent_layers": 1}} if store else {}}},
        "optim": {"lr": 3e-3, "min_lr": 3e-4, "warmup_steps": 2, "max_steps": 8, "batch_size": 4, "grad_accum": 2},
        "run": {"seed": 0, "threads": 1, "log_every": 2, "eval_every": 4, "val_windows": 8, "checkpoint_every": 4},
    }  # fmt: skip
    for section, values in sections.items():
        cfg[section] = {**cfg.get(section, {}), **values}
    return cfg


def write_config(path: Path, cfg: dict) -> Path:
    path.write_text(yaml.safe_dump(cfg))
    return path


def metrics(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def final_weights(run: Path) -> dict[str, torch.Tensor]:
    return load_file(str(run / read_json(run / "manifest.json")["final_checkpoint"] / "model.safetensors"))


@pytest.fixture(scope="module")
def ehr_run(demo_timelines, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("ehr") / "run"
    train(resolve_config(raw_config(demo_timelines, None)), out, progress=False)
    return out


def test_short_training_lowers_the_loss_and_logs_everything(demo_timelines, note_store, tmp_path):
    cfg = raw_config(
        demo_timelines,
        note_store,
        optim={"max_steps": 24, "warmup_steps": 3},
        run={"log_every": 4, "eval_every": 8},
    )
    summary = train(resolve_config(cfg), tmp_path / "run", progress=False)
    rows = metrics(tmp_path / "run")
    losses = [r["loss"] for r in rows if "loss" in r]
    vals = [r["val_loss"] for r in rows if "val_loss" in r]
    assert [r["step"] for r in rows] == [4, 8, 12, 16, 20, 24] and len(vals) == 3
    assert losses[0] > math.log(2588) - 1.0 > losses[-1]  # from about uniform over the vocab to well below
    assert vals[-1] < vals[0] - 0.5
    assert set(rows[-1]["gates"]) == {"xattn.0.attn", "xattn.0.ff", "xattn.1.attn", "xattn.1.ff"}
    assert all(0 < g < 1 for g in rows[-1]["gates"].values()) and rows[-1]["tokens_per_s"] > 0
    assert rows[0]["lr"] == pytest.approx(3e-3) and rows[-1]["lr"] < rows[0]["lr"]
    manifest = read_json(tmp_path / "run" / "manifest.json")
    assert manifest == json.loads(json.dumps(summary)) and manifest["steps"] == 24
    assert manifest["final_checkpoint"] == "checkpoints/step-0000024" and manifest["best_val_loss"] == min(
        vals
    )
    assert manifest["tokens"] == 24 * 2 * 4 * 48 and manifest["model_flops_per_s"] > 0
    kept = sorted(p.name for p in (tmp_path / "run" / "checkpoints").iterdir())
    assert kept == ["best", "step-0000020", "step-0000024"]  # keep_checkpoints = 2, plus the best
    # The checkpoint reloads into the same function: same logits on a training batch.
    model, config = load_model(tmp_path / "run", which="final")
    assert (
        config.data.modalities["note"].store == str(note_store.resolve())
        and config.data.modalities["note"].k_max == 3
    )
    assert config.model.vocab_size == 2588 and config.model.modalities["note"].d_enc == 16
    windows = TrainWindows(
        TimelineStore(demo_timelines, "train"), 48, {"note": EmbeddingStore(note_store)}, 3
    )
    batch = windows.micro_batch(0, 4)
    _, loss = model(
        batch.tokens, batch.times, batch.modalities, targets=batch.targets, loss_mask=batch.loss_mask
    )
    assert loss.item() < losses[0]
    best, _ = load_model(tmp_path / "run")  # a run directory loads its best checkpoint
    assert resolve_checkpoint(tmp_path / "run").name == "best"
    assert manifest["best_step"] == next(r["step"] for r in rows if r.get("val_loss") == min(vals))
    stored = read_weights(tmp_path / "run" / "checkpoints" / "best")
    assert all(torch.equal(best.state_dict()[k], v) for k, v in stored.items())


def test_sigkill_mid_run_then_resume_reaches_the_same_weights(demo_timelines, note_store, tmp_path, capsys):
    cfg = write_config(tmp_path / "c.yaml", raw_config(demo_timelines, note_store, optim={"max_steps": 40},
                                                          run={"checkpoint_every": 5, "eval_every": 10}))  # fmt: skip
    assert main(["train", "--config", str(cfg), "--out", str(tmp_path / "a"), "--no-progress"]) == 0
    out = capsys.readouterr().out
    assert f"wrote {tmp_path / 'a'}" in out and "tokens/s" in out and "GFLOP/s" in out

    proc = subprocess.Popen([str(BIN / "mmehr"), "train", "--config", str(cfg), "--out", str(tmp_path / "b"), "--no-progress"],
                            env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)  # fmt: skip
    first = tmp_path / "b" / "checkpoints" / "step-0000005" / "manifest.json"
    deadline = time.monotonic() + 120
    while not first.exists() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.002)
    assert proc.poll() is None, "the run ended before it could be killed"
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL
    assert not (tmp_path / "b" / "manifest.json").exists()  # killed mid-run: the run never finished

    assert (
        main(["train", "--config", str(cfg), "--out", str(tmp_path / "b"), "--resume", "--no-progress"]) == 0
    )
    assert "resuming" in capsys.readouterr().err
    a, b = final_weights(tmp_path / "a"), final_weights(tmp_path / "b")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)  # bit for bit
    same = [{k: v for k, v in r.items() if k != "tokens_per_s"} for r in metrics(tmp_path / "a")]
    assert same == [{k: v for k, v in r.items() if k != "tokens_per_s"} for r in metrics(tmp_path / "b")]
    sa, sb = (load_state(tmp_path / run / "checkpoints" / "step-0000040") for run in ("a", "b"))
    assert all(
        torch.equal(x, y)
        for x, y in zip(sa["optimizer"]["state"][0].values(), sb["optimizer"]["state"][0].values())
    )
    # A different config is refused, naming what changed; so is a second run into the same directory.
    assert (
        main(
            ["train", "--config", str(cfg), "--out", str(tmp_path / "b"), "--resume", "--set", "optim.lr=0.1"]
        )
        == 1
    )
    assert "optim.lr" in capsys.readouterr().err
    assert main(["train", "--config", str(cfg), "--out", str(tmp_path / "b")]) == 1
    assert "--resume" in capsys.readouterr().err
    # --resume without --config reuses the run's own; a finished run stays as it is.
    assert main(["train", "--out", str(tmp_path / "b"), "--resume", "--no-progress"]) == 0
    assert all(torch.equal(a[k], v) for k, v in final_weights(tmp_path / "b").items())


def test_two_gloo_processes_match_one_process_on_the_same_global_batch(demo_timelines, note_store, tmp_path):
    cfg = write_config(tmp_path / "c.yaml", raw_config(demo_timelines, note_store, optim={"max_steps": 6}))
    assert main(["train", "--config", str(cfg), "--out", str(tmp_path / "one"), "--no-progress"]) == 0
    two = subprocess.run(
        [str(BIN / "torchrun"), "--nproc-per-node", "2", "--standalone", "-m", "mmehr.cli", "train",
         "--config", str(cfg), "--out", str(tmp_path / "two"), "--no-progress"],
        env=ENV, capture_output=True, text=True,
    )  # fmt: skip
    assert two.returncode == 0, two.stderr[-3000:]
    assert read_json(tmp_path / "two" / "manifest.json")["processes"] == 2
    a, b = final_weights(tmp_path / "one"), final_weights(tmp_path / "two")
    for k in a:
        torch.testing.assert_close(b[k], a[k], rtol=1e-5, atol=1e-6)
    ma, mb = metrics(tmp_path / "one"), metrics(tmp_path / "two")
    assert [r["step"] for r in ma] == [r["step"] for r in mb]
    for ra, rb in zip(ma, mb):
        for key in ("loss", "val_loss"):
            if key in ra:
                assert rb[key] == pytest.approx(ra[key], rel=1e-5)


def test_freeze_decoder_trains_only_compression_and_cross_attention(
    demo_timelines, note_store, ehr_run, tmp_path
):
    cfg = raw_config(
        demo_timelines,
        note_store,
        train={"init_from": str(ehr_run), "freeze_decoder": True},
        optim={"max_steps": 6},
    )
    summary = train(resolve_config(cfg), tmp_path / "frozen", progress=False)
    before, after = read_weights(resolve_checkpoint(ehr_run)), final_weights(tmp_path / "frozen")
    decoder = [k for k in after if k.startswith(("transformer.", "lm_head."))]
    assert decoder and all(torch.equal(after[k], before[k]) for k in decoder if k in before)
    assert (
        summary["trainable_parameters"]
        == summary["parameters"]["compression"] + summary["parameters"]["cross_attention"]
    )
    torch.manual_seed(0)  # the trainer's seed: the multimodal parts' initial values
    init = GPT(resolve_config(cfg).model).state_dict()
    multimodal = [k for k in after if k.startswith(("fusion.compressors.", "fusion.xattn."))]
    assert multimodal and all(
        not torch.equal(after[k], init[k]) for k in multimodal if k.endswith(("weight", "gate"))
    )
    # Without freezing, init_from only starts the decoder: it moves.
    cfg["train"]["freeze_decoder"] = False
    train(resolve_config(cfg), tmp_path / "unfrozen", progress=False)
    moved = final_weights(tmp_path / "unfrozen")
    assert not torch.equal(
        moved["transformer.h.0.attn.c_attn.weight"], before["transformer.h.0.attn.c_attn.weight"]
    )


def test_checkpoint_loading_never_unpickles(ehr_run, tmp_path):
    ckpt = resolve_checkpoint(ehr_run, "final")
    state = load_state(ckpt)
    assert state["step"] == 8 and set(state["optimizer"]) == {"state", "param_groups"}
    marker = tmp_path / "pwned"

    class Payload:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    import shutil

    evil = tmp_path / "evil"
    shutil.copytree(ckpt, evil)
    torch.save({"step": 8, "x": Payload()}, evil / STATE)
    with pytest.raises(ValueError, match=r"trainer_state\.pt is damaged: its sha256 differs"):
        load_state(evil)  # the recorded checksum catches the swap first
    manifest = read_json(evil / "manifest.json")
    write_json(evil / "manifest.json", {**manifest, "state_sha256": None})  # as an attacker would
    with pytest.raises(ValueError, match="refused to load"):
        load_state(evil)
    assert not marker.exists()
    weights = read_weights(evil)  # weights are safetensors: plain tensors by construction
    assert all(isinstance(v, torch.Tensor) for v in weights.values())


def test_config_resolution_fills_sizes_and_fails_clearly(demo_timelines, note_store, tmp_path):
    config = resolve_config(raw_config(demo_timelines, note_store))
    assert config.model.vocab_size == 2588 and config.model.modalities["note"].d_enc == 16
    assert Path(config.data.timelines).is_absolute()
    off = raw_config(demo_timelines, note_store)
    off["data"]["modalities"]["note"]["enabled"] = False
    assert resolve_config(off).model.modalities == {}
    wrong = raw_config(demo_timelines, note_store)
    wrong["data"]["modalities"]["note"]["encoder"] = "biomedbert"
    with pytest.raises(ConfigError, match="note-hash"):
        resolve_config(wrong)
    orphan = raw_config(demo_timelines, None)
    orphan["model"]["fusion"] = {"modalities": {"ecg": {"compression": "mean"}}}
    with pytest.raises(ConfigError, match="ecg"):
        resolve_config(orphan)
    with pytest.raises(FileNotFoundError, match="manifest"):
        resolve_config(raw_config(tmp_path / "nowhere", None))
    with pytest.raises(ConfigError, match="unknown key"):
        resolve_config(raw_config(demo_timelines, None, optim={"learning_rate": 1.0}))


def test_lr_warms_up_linearly_then_decays_by_cosine():
    o = OptimConfig(lr=1.0, min_lr=0.1, warmup_steps=10, max_steps=110)
    assert lr_at(0, o) == pytest.approx(0.1) and lr_at(9, o) == pytest.approx(1.0)
    assert (
        lr_at(60, o) == pytest.approx(0.55)
        and lr_at(110, o) == pytest.approx(0.1)
        and lr_at(500, o) == pytest.approx(0.1)
    )


def test_early_stopping_stops_when_validation_stops_improving(demo_timelines, tmp_path):
    cfg = raw_config(
        demo_timelines,
        None,
        optim={"lr": 0.0, "min_lr": 0.0, "max_steps": 40},
        run={"eval_every": 2, "early_stop_patience": 2},
    )
    summary = train(resolve_config(cfg), tmp_path / "run", progress=False)
    assert summary["stopped"].startswith("early stop") and summary["steps"] == 6 and summary["best_step"] == 2


@pytest.mark.parametrize("name", ["demo", "mimic-iv"])
def test_shipped_configs_resolve(name, demo_timelines, note_store):
    """configs/*.yaml are valid TrainConfigs once their data paths exist (here: the test data)."""
    from mmehr.config import apply_overrides, load_yaml

    raw = load_yaml(Path(__file__).resolve().parent.parent / "configs" / f"{name}.yaml")
    overrides = [f"data.timelines={demo_timelines}"]
    for modality in raw["data"]["modalities"]:
        overrides += [
            f"data.modalities.{modality}.store={note_store}",
            f"data.modalities.{modality}.encoder=",
            f"data.modalities.{modality}.modality=note",  # a note store in every slot, said explicitly
        ]
    config = resolve_config(apply_overrides(raw, overrides))
    assert set(config.model.modalities) == {"ecg", "cxr", "note"}
    assert config.model.vocab_size == 2588 and all(m.d_enc == 16 for m in config.model.modalities.values())
    if name == "mimic-iv":  # the paper's sizes
        m, o = config.model, config.optim
        assert (m.n_layer, m.n_head, m.n_embd, m.block_size, m.dropout) == (6, 12, 768, 2048, 0.3)
        assert (o.lr, o.min_lr) == (6e-4, 6e-5) and config.run.dtype == "bf16"
    else:  # small enough to train in minutes on 2 CPU cores (README: the demo)
        assert (config.model.n_layer, config.model.n_embd, config.model.block_size) == (2, 128, 256)
        assert config.model.fusion.gate_init == 0.0 and config.optim.max_steps == 2000
