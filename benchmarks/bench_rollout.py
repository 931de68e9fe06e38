"""Rollout throughput: the KV-cached sampler vs recomputing the whole context at every step (ETHOS).

Both samplers run the same model on the same contexts, side by side in one process, with every rollout
forced to its full length (no stop token ends it early), prefill included:

- context 512 and 2048 tokens, K = 20 rollouts of one sample, 256 generated tokens per rollout;
- the peers' configuration (2-layer, 128-wide GPT, context 512): batch 1 (ETHOS-ARES: no cache, about
  180 generated tokens/s on this machine, in a separate run: it is not on the package registry) and
  batch 32 (MEDS_EIC_AR is measured side by side, in one run, by `bench_peers.py`).

The model is the peers' 2-layer, 128-wide GPT (vocabulary 4,096, block = context + 256). Recomputation
at long contexts is slow, so it runs only `steps` decoding steps (prefill included) and its throughput is
that of those steps: an upper bound for the full 256 (later steps recompute longer contexts), so the
reported speed-ups are conservative. One torch thread unless MMEHR_BENCH_THREADS says otherwise.
"""

from __future__ import annotations

import os
import time

import numpy as np
import torch

from mmehr.batch import Batch
from mmehr.evaluate.sampler import RolloutRules, SamplerSettings, sample_rollouts
from mmehr.model.config import ModelConfig
from mmehr.model.gpt import GPT

VOCAB = 4096
NEW = 256
PEERS = {"ethos_ares_b1_tok_per_s": 180.0}  # a separate run (ETHOS-ARES is not on the package registry)


def model(context: int, n_layer: int = 2, n_embd: int = 128, n_head: int = 4) -> GPT:
    torch.manual_seed(0)
    cfg = ModelConfig(
        vocab_size=VOCAB, n_layer=n_layer, n_head=n_head, n_embd=n_embd, block_size=context + NEW
    )
    return GPT(cfg).eval()


def endless_rules() -> RolloutRules:
    """Nothing stops a rollout before the cap; padding (id 0) is still never sampled."""
    allowed = torch.ones(VOCAB, dtype=torch.bool)
    allowed[0] = False
    none = torch.zeros(VOCAB, dtype=torch.bool)
    return RolloutRules(allowed, none, none.clone(), -1, torch.zeros(VOCAB, dtype=torch.long), 2**62)


def contexts(n: int, context: int, seed: int = 0) -> Batch:
    rng = np.random.default_rng(seed)
    rows = [
        (rng.integers(1, VOCAB, context), np.arange(context, dtype=np.int64) * 60_000_000) for _ in range(n)
    ]
    return Batch.from_contexts(rows, [6] * n)


def measure(m: GPT, batch: Batch, k: int, steps: int, recompute: bool) -> dict:
    settings = SamplerSettings(n_rollouts=k, temperature=1.0, max_new_tokens=steps, batch_rows=len(batch) * k)
    t0 = time.perf_counter()
    out = sample_rollouts(
        m, batch, endless_rules(), settings, recompute=recompute, generator=torch.Generator().manual_seed(0)
    )
    seconds = time.perf_counter() - t0
    generated = out.stats["generated_tokens"]
    assert generated == len(batch) * k * steps, "a rollout stopped early"
    return {
        "generated_tokens": generated,
        "seconds": seconds,
        "generated_tok_per_s": generated / seconds,
        # a sample = its K rollouts; at the measured pace, for the full 256 tokens
        "samples_per_s": len(batch) / (seconds * NEW / steps),
    }


def side_by_side(context: int, k: int, n_samples: int, recompute_steps: int, label: str) -> list[dict]:
    m, batch = model(context), contexts(n_samples, context)
    measure(m, contexts(1, 32), 2, 4, False)  # warm up allocator and kernels
    cached = measure(m, batch, k, NEW, recompute=False)
    full = measure(m, batch, k, recompute_steps, recompute=True) if recompute_steps else None
    rows = [
        {
            "case": f"{label}: KV cache",
            "context": context,
            "rollouts_in_batch": n_samples * k,
            "steps": NEW,
            **cached,
        }
    ]
    if full:
        rows.append(
            {
                "case": f"{label}: recompute (ETHOS)",
                "context": context,
                "rollouts_in_batch": n_samples * k,
                "steps": recompute_steps,
                **full,
            }
        )
        rows[0]["speedup_vs_recompute"] = cached["generated_tok_per_s"] / full["generated_tok_per_s"]
    return rows


def run(quick: bool) -> list[dict]:
    threads = int(os.environ.get("MMEHR_BENCH_THREADS", "1"))
    torch.set_num_threads(threads)
    rows: list[dict] = []
    with torch.no_grad():
        if quick:
            rows += side_by_side(128, 4, 1, 8, "quick K=4")
        else:
            rows += side_by_side(512, 20, 1, 32, "K=20")
            rows += side_by_side(2048, 20, 1, 8, "K=20")
            peer = side_by_side(512, 1, 1, NEW, "peer size, batch 1")
            peer[0]["vs_ethos_ares"] = peer[0]["generated_tok_per_s"] / PEERS["ethos_ares_b1_tok_per_s"]
            rows += peer
            rows += side_by_side(512, 1, 32, 0, "peer size, batch 32")
    for r in rows:
        r["threads"] = threads
    return rows
