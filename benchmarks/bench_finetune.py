"""Cost of finetuning an encoder: one training step with the real MiniLM on notes, frozen vs last_n vs lora.

Data: a synthetic demo cohort (`mmehr synth`, as `mmehr demo` makes it, `SUBJECTS` subjects), tokenized,
its notes indexed and encoded once with the real all-MiniLM-L6-v2 (the frozen case reads that store; the
finetuned cases read the same events' text and run MiniLM inside the model). Model and batch: the demo
config (configs/demo.yaml: 2 x 128 decoder, batch 16 windows of 256 tokens, K_m = 4 notes of <= 256 MiniLM
tokens per row), notes only.

Each case runs in its own process (its peak RSS is its own) on `THREADS` thread(s), with the trainer's own
pieces. Figures per case: `step_s`, the median of a few optimizer steps (forward, backward, AdamW) on one
batch, the one of the first few micro-batches carrying the most notes, and `step_cpu_s`, the CPU time of
those steps (on one thread, the work itself: on a shared machine it varies less than the wall time); `loader_batch_s`, building one
micro-batch (a fresh one each time: for a finetuned case, reading and tokenising its notes the first time);
`peak_rss_mb` of the process; trainable parameters of the whole model and of the encoder.
"""

from __future__ import annotations

import json
import resource
import statistics
import sys
import tempfile
import time
from pathlib import Path

from common import run_cases_in_subprocesses

THREADS = 1
SUBJECTS = 300
ROOT = Path(__file__).resolve().parent.parent
CASES = ["frozen", "last_n:2", "lora:8"]


def prepare(work: Path, quick: bool) -> dict[str, str]:
    """The demo cohort's timelines and MiniLM note store (reused when already complete)."""
    from mmehr.demo import SYNTH
    from mmehr.experiments import run_stage
    from mmehr.io import is_complete

    subjects = 60 if quick else SUBJECTS
    synth, timelines = work / "synth", work / "timelines"
    events, store = work / "events" / "note", work / "stores" / "note"
    stages = [
        (synth, ["synth", "--out", str(synth), "--subjects", str(subjects), "--seed", "0", *SYNTH]),
        (timelines, ["tokenize", "--meds", str(synth / "meds"), "--out", str(timelines)]),
        (events, ["index", "--source", "note", "--root", str(synth / "note"), "--out", str(events)]),
        (store, ["encode", "--events", str(events), "--encoder", "minilm", "--out", str(store)]),
    ]
    for done, args in stages:
        if not is_complete(done):
            run_stage(*args)
    return {"timelines": str(timelines), "store": str(store)}


def run_case(case: str, paths: dict[str, str], quick: bool) -> dict:
    import torch

    from mmehr.config import apply_overrides, load_yaml
    from mmehr.runconfig import resolve_config
    from mmehr.train import Trainer

    raw = load_yaml(ROOT / "configs" / "demo.yaml")
    overrides = [f"data.timelines={paths['timelines']}", f"run.threads={THREADS}", "data.workers=0",
                 f"data.modalities.note.store={paths['store']}", "data.modalities.ecg.enabled=false",
                 "data.modalities.cxr.enabled=false", f"model.fusion.modalities.note.finetune={case}"]  # fmt: skip
    if quick:
        overrides += ["model.block_size=64", "optim.batch_size=4"]
    apply_overrides(raw, overrides)
    for m in ("ecg", "cxr"):  # no stores for these here
        raw["data"]["modalities"].pop(m)
        raw["model"]["fusion"]["modalities"].pop(m)
    config = resolve_config(raw, "configs/demo.yaml")
    with tempfile.TemporaryDirectory() as out:
        trainer = Trainer(config, out, progress=False)
        windows, B = trainer.train_windows, config.optim.batch_size
        n_loader = 3 if quick else 10
        notes, t0 = {}, time.perf_counter()
        for m in range(n_loader):
            notes[m] = int(windows.micro_batch(m, B).modalities["note"].event_mask.sum())
        loader_s = (time.perf_counter() - t0) / n_loader
        batch = windows.micro_batch(max(notes, key=notes.get), B)
        trainer.train_step(iter([batch]))  # warm-up: allocations, optimizer state
        seconds, cpu = [], []
        for _ in range(2 if quick else 4):
            t0, c0 = time.perf_counter(), time.process_time()
            trainer.train_step(iter([batch]))
            seconds.append(time.perf_counter() - t0)
            cpu.append(time.process_time() - c0)
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        encoder = dict(trainer.raw.fusion.encoders.items()).get("note")
    return {
        "threads": THREADS,
        "batch_windows": B,
        "block_size": config.model.block_size,
        "notes_in_batch": int(batch.modalities["note"].event_mask.sum()),
        "step_s": statistics.median(seconds),
        "step_cpu_s": statistics.median(cpu),
        "loader_batch_s": loader_s,
        "peak_rss_mb": peak,
        "trainable_params": sum(p.numel() for p in trainer.trainable),
        "encoder_trainable_params": sum(p.numel() for p in encoder.parameters() if p.requires_grad)
        if encoder
        else 0,
        "torch_threads": torch.get_num_threads(),
    }


def run(quick: bool) -> list[dict]:
    work = Path(tempfile.gettempdir()) / f"mmehr-bench-finetune{'-quick' if quick else ''}"
    work.mkdir(exist_ok=True)
    paths = prepare(work, quick)
    rows = run_cases_in_subprocesses(__file__, CASES, [json.dumps(paths), str(quick)], THREADS)
    base, base_cpu = rows[0]["step_s"], rows[0]["step_cpu_s"]
    for r in rows:
        r["step_vs_frozen"] = r["step_s"] / base
        r["cpu_vs_frozen"] = r["step_cpu_s"] / base_cpu
    return rows


if __name__ == "__main__":
    print(json.dumps(run_case(sys.argv[1], json.loads(sys.argv[2]), sys.argv[3] == "True")))
