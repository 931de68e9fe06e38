"""Training step (forward + backward + AdamW) of the multimodal model against the EHR-only decoder.

Cases: EHR-only, and one modality with K_m events per row compressed by `none`, `mean` or `latent`
(k=8, l=4), at N encoder tokens per event and context T, with the default layout (a gated cross-attention
block every `xattn_every` = 2 layers, FF x4, gates open), plus `latent_ff1` (the same with FF x1) to show
what the cross-attention block costs.

The machine is shared, so steps are timed in CPU seconds of this process on one thread (time spent
descheduled by other users' work does not count; wall seconds are reported beside), all cases of one T
are built in ONE process and stepped round-robin, and each case's time is its fastest step. A square
fp32 matmul is timed the same way between rounds; its best FLOP/s is the practical limit that achieved
model FLOP/s (the 3 x forward convention of `mmehr.model.accounting`) is divided by.
Peak memory is measured per case in a fresh process (peak RSS, and its growth during one step).

Targets (issue 5): `latent` adds <= 30% to an EHR-only step at N=512, and is >= 3x cheaper than `none`
at N=2048. Both are checked per T and reported as rows with `met`.
"""

from __future__ import annotations

import json
import resource
import subprocess
import sys
import time
from pathlib import Path

from tqdm import tqdm

from common import matmul_flops

THREADS = 1  # more threads than free cores stall on OpenMP barriers on a shared machine
MODEL = dict(n_layer=4, n_head=4, n_embd=256, vocab_size=4096, batch=2, K=4, d_enc=768, xattn_every=2)
FULL = dict(MODEL, Ns=(128, 512, 2048), Ts=(512, 2048), rounds=4)
QUICK = dict(MODEL, n_layer=2, n_embd=64, vocab_size=512, d_enc=96, K=2, Ns=(32, 128), Ts=(64, 128), rounds=3)


def _build(case: dict):
    """Model, optimizer and batch of one case -> (step function, model FLOPs per step)."""
    import torch

    from mmehr.batch import ModalityInputs
    from mmehr.model.accounting import train_flops_per_token
    from mmehr.model.config import FusionConfig, ModalityConfig, ModelConfig
    from mmehr.model.gpt import GPT

    torch.manual_seed(0)
    B, T, K, N, d_enc = case["batch"], case["T"], case["K"], case["N"], case["d_enc"]
    modalities = {}
    if case["mode"] != "ehr_only":
        compression = case["mode"].removesuffix("_ff1")
        modalities["ecg"] = ModalityConfig(
            d_enc=d_enc, compression=compression, n_latents=8, n_latent_layers=4
        )
    fusion = FusionConfig(modalities=modalities, gate="tanh", xattn_every=case["xattn_every"],
                          xattn_ff_mult=1 if case["mode"].endswith("_ff1") else 4)  # fmt: skip
    cfg = ModelConfig(
        vocab_size=case["vocab_size"], n_layer=case["n_layer"], n_head=case["n_head"], n_embd=case["n_embd"],
        block_size=T, fusion=fusion,
    )  # fmt: skip
    model = GPT(cfg).train()
    for block in model.fusion.xattn.values() if model.fusion else []:
        block.gate.data.fill_(0.5)  # open gates: the media path is really computed and differentiated
    opt = torch.optim.AdamW(model.param_groups(0.1), lr=1e-4)
    tokens = torch.randint(1, cfg.vocab_size, (B, T))
    times = 1_600_000_000_000_000 + torch.arange(T).expand(B, T) * 60_000_000
    mods = None
    if modalities:
        emb = torch.randn(B, K, N, d_enc).half()  # the embedding store's dtype
        event_time = times[:, :1] + torch.linspace(0, T * 60_000_000, K).long().expand(B, K)
        present = torch.ones(B, K, dtype=torch.bool)
        mods = {"ecg": ModalityInputs(emb, torch.ones(B, K, N, dtype=torch.bool), event_time, present)}
    mask = torch.ones(B, T, dtype=torch.bool)

    def step() -> None:
        _, loss = model(tokens, times, mods, targets=tokens.roll(-1, 1), loss_mask=mask)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    step.model = model  # for the fold A/B (benchmarks/ab_fold.py)
    events = {"ecg": (K, N)} if modalities else None
    return step, train_flops_per_token(model, T, events=events) * B * T


def time_cases(cases: list[dict], rounds: int) -> list[dict]:
    """Step every case round-robin in this process; each case's fastest step and the best matmul rate."""
    import torch

    torch.set_num_threads(THREADS)
    built = [_build(c) for c in cases]
    for step, _ in built:
        step()  # warm-up: allocations, kernel selection
    cpu, wall = [float("inf")] * len(cases), [float("inf")] * len(cases)
    matmul = matmul_flops(clock=time.process_time)
    for _ in range(rounds):
        for i, (step, _) in enumerate(built):
            c0, w0 = time.process_time(), time.perf_counter()
            step()
            cpu[i] = min(cpu[i], time.process_time() - c0)
            wall[i] = min(wall[i], time.perf_counter() - w0)
        matmul = max(matmul, matmul_flops(clock=time.process_time))
    return [
        {"step_s": s, "wall_step_s": w, "model_gflop_per_step": f / 1e9, "achieved_gflop_per_s": f / s / 1e9,
         "matmul_gflop_per_s": matmul / 1e9, "fraction_of_matmul": f / s / matmul}
        for s, w, (_, f) in zip(cpu, wall, built)
    ]  # fmt: skip


def memory_case(case: dict) -> dict:
    """Peak RSS of a fresh process that builds one case and runs one step, and its growth in that step."""
    import torch

    torch.set_num_threads(THREADS)
    step, _ = _build(case)
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    step()
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return {"peak_rss_mb": peak, "step_rss_growth_mb": peak - before}


def _child(kind: str, payload) -> object:
    out = subprocess.run(
        [sys.executable, str(Path(__file__).resolve()), kind, json.dumps(payload)],
        capture_output=True,
        text=True,
    )
    if out.returncode != 0:
        raise RuntimeError(f"bench_model {kind} {payload} failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def run(quick: bool) -> list[dict]:
    spec = QUICK if quick else FULL
    base = {k: v for k, v in spec.items() if k not in ("Ns", "Ts", "rounds")}
    mid = _mid(spec)
    rows = []
    for T in tqdm(spec["Ts"], desc="bench_model contexts"):
        cases = [dict(base, mode="ehr_only", T=T, N=0)]
        cases += [dict(base, mode=m, T=T, N=N) for N in spec["Ns"] for m in ("none", "mean", "latent")]
        cases.append(dict(base, mode="latent_ff1", T=T, N=mid))
        timings = _child("time", {"cases": cases, "rounds": spec["rounds"]})
        ehr = timings[0]["step_s"]
        for case, timing in zip(cases, timings):
            name = case["mode"] if case["mode"] == "ehr_only" else f"{case['mode']} N={case['N']}"
            rows.append(
                {"case": f"{name} T={T}", "mode": case["mode"], "N": case["N"], "T": T, "batch": case["batch"],
                 "K_m": case["K"] if case["N"] else 0, **timing, "ratio_to_ehr_only": timing["step_s"] / ehr,
                 **_child("memory", case)}
            )  # fmt: skip
    return rows + _targets(rows, spec)


def _mid(spec: dict) -> int:
    return 512 if 512 in spec["Ns"] else spec["Ns"][0]


def _targets(rows: list[dict], spec: dict) -> list[dict]:
    """The issue's two targets per T, plus two informative figures."""
    step = {(r["mode"], r["N"], r["T"]): r["step_s"] for r in rows}
    mid, top = _mid(spec), spec["Ns"][-1]
    out = []
    for T in spec["Ts"]:
        ehr = step["ehr_only", 0, T]
        figures = [
            (f"target: latent N={mid} T={T} adds <= 30% to EHR-only", step["latent", mid, T] / ehr - 1, "<=", 0.30),
            (f"(info) same with xattn_ff_mult=1, N={mid} T={T}", step["latent_ff1", mid, T] / ehr - 1, "<=", 0.30),
            (f"target: latent step >= 3x cheaper than none, N={top} T={T}",
             step["none", top, T] / step["latent", top, T], ">=", 3.0),
            (f"(info) none's added cost / latent's added cost, N={top} T={T}",
             (step["none", top, T] - ehr) / (step["latent", top, T] - ehr), ">=", 3.0),
        ]  # fmt: skip
        for case, value, op, bound in figures:
            out.append(
                {
                    "case": case,
                    "T": T,
                    "value": value,
                    "met": value <= bound if op == "<=" else value >= bound,
                }
            )
    return out


if __name__ == "__main__":
    kind, payload = sys.argv[1], json.loads(sys.argv[2])
    if kind == "time":
        print(json.dumps(time_cases(payload["cases"], payload["rounds"])))
    else:
        print(json.dumps(memory_case(payload)))
