"""Does mmehr work on this GPU, and how fast? One command: `python benchmarks/gpu_check.py --out DIR`.

On random weights and synthetic batches at the paper's sizes (GPT-2 decoder 6 x 768, context 2,048; ECG 312,
CXR 197 and note 512 encoder tokens of width 768, K_m = 4 events per modality; latent k = 8, l = 4), in
this order, each case timed with the device synchronised and each failure recorded without stopping the run:

1. environment and the card's measured bf16 matmul FLOP/s (the limit model FLOP/s is divided by);
2. training steps (forward, backward, AdamW) under bf16 autocast: EHR-only and each compression mode
   (none / mean / latent, all three modalities): tokens/s, model FLOP/s (`mmehr.model.accounting`) as a
   fraction of the matmul's, peak memory;
3. rollouts at context 2,048 (the paper's window: the KV cache slides once), K = 20, bf16 KV cache, all
   rollouts of S samples in one batch: generated tokens/s, against ETHOS's reported ~1,200 tokens/s on
   one H100 (goal: 50x) and against recomputing the context at every step (ETHOS's way) on this card;
4. each pretrained encoder architecture (random weights, real sizes) encoding a batch: events/s, end to
   end (CPU preprocessing included) and the model alone;
5. the CUDA tests (`pytest -m gpu tests/test_gpu.py`): KV cache vs recomputation and the masks in bf16,
   torch.compile, a one-process NCCL DDP step, the trainer and the rollout sampler on CUDA;
6. training steps under `torch.compile` (EHR-only and latent): the same figures, and the compile time.

Results go to DIR/gpu_check.json and DIR/gpu_check.md, rewritten after every case, so a run cut short
still leaves what it measured. `--budget-s` (default 450) skips what would start after that many seconds.
The exit status is 1 if any case failed.

Without CUDA (or with `--device cpu`) the same code runs at tiny sizes in under a minute (`make test`
runs it), so it cannot rot while no GPU is at hand; its figures then mean nothing, and of the CUDA tests
only the mask tests run (under CPU bf16 autocast). On a GPU machine
without this project's virtualenv: `PYTHONPATH=src python3 benchmarks/gpu_check.py --out DIR`, after
installing the wheels that `benchmarks/gpu_wheels.sh` fetches (the packages the image lacks).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import resource
import subprocess
import sys
import time
import traceback
import xml.etree.ElementTree as ET
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path[:0] = [str(ROOT / "src"), str(HERE)]  # this checkout's mmehr, and the benchmarks' helpers

import torch  # noqa: E402

from run import markdown_table  # noqa: E402

ETHOS_H100_TOK_PER_S = 1200.0  # ETHOS-ARES, no KV cache, one H100 (REFERENCE.md section 2)
US_PER_MIN = 60_000_000
T0_US = 1_600_000_000_000_000

PAPER = dict(
    n_layer=6, n_head=12, n_embd=768, block=2048, vocab=4096, batch=8, d_enc=768, K_m=4, k=8, l=4,
    tokens={"ecg": 312, "cxr": 197, "note": 512}, steps=5, warmup=2,
    rollout=dict(context=2048, K=20, samples=(1, 8, 32), new=256, recompute_steps=16, mm_samples=8),
    encoders=dict(batch=32, sizes={}), compile_backend="inductor", compile_modes=("ehr_only", "latent"),
)  # fmt: skip
TINY = dict(
    n_layer=2, n_head=2, n_embd=32, block=64, vocab=128, batch=2, d_enc=24, K_m=2, k=4, l=2,
    tokens={"ecg": 12, "cxr": 8, "note": 16}, steps=2, warmup=1,
    rollout=dict(context=64, K=4, samples=(1, 2), new=8, recompute_steps=4, mm_samples=2),
    encoders=dict(batch=2, sizes={
        "bert": dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64),
        "vit-mae": dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64),
        "biomedclip": dict(dim=32, depth=2, heads=2),
        "ecg-fm": dict(conv_feature_layers="[(16, 2, 2)] * 4", dim=32, depth=2, heads=2, ffn_dim=64, conv_pos=16, conv_pos_groups=4),
        "csfm": dict(dim=32, depth=2, heads=2, dim_head=16, mlp_dim=64, clean=False),
    }),
    compile_backend="aot_eager", compile_modes=("ehr_only", "latent"),
)  # fmt: skip
MODES = ("ehr_only", "none", "mean", "latent")
ENCODERS = {"bert": "note", "vit-mae": "cxr", "biomedclip": "cxr", "ecg-fm": "ecg", "csfm": "ecg"}


class Check:
    """The rows measured so far, the device, the time budget; writes DIR/gpu_check.{json,md} after each case."""

    def __init__(self, out: Path, device: torch.device, size: str, budget_s: float):
        self.out, self.device, self.size, self.budget_s = out, device, size, budget_s
        self.spec = PAPER if size == "paper" else TINY
        self.cuda = device.type == "cuda"
        self.t0 = time.perf_counter()
        self.rows: list[dict] = []
        self.meta: dict = {}
        self.matmul_flops = float("nan")

    def elapsed(self) -> float:
        return time.perf_counter() - self.t0

    def autocast(self):
        """bf16 autocast on CUDA (as `mmehr train` and `mmehr evaluate` run there); CPU computes in fp32."""
        return torch.autocast("cuda", dtype=torch.bfloat16) if self.cuda else contextlib.nullcontext()

    def sync(self) -> None:
        if self.cuda:
            torch.cuda.synchronize(self.device)

    def reset_peak(self) -> None:
        if self.cuda:
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats(self.device)

    def peak_mb(self) -> float:
        """Peak device memory since `reset_peak` (CUDA); on CPU the process's peak RSS so far."""
        if self.cuda:
            return torch.cuda.max_memory_allocated(self.device) / 2**20
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024

    def case(self, section: str, name: str, fn, *, needs_s: float = 0.0) -> dict:
        """Run one case: its row (status ok / failed: why / skipped: why), appended and written out."""
        row = {"benchmark": section, "case": name}
        if self.elapsed() + needs_s > self.budget_s:
            row["status"] = f"skipped: {self.elapsed():.0f} s of the {self.budget_s:.0f} s budget used"
        else:
            t0 = time.perf_counter()
            try:
                row.update(fn())
                row.setdefault("status", "ok")
            except ModuleNotFoundError as e:  # an optional package this machine lacks: not a failure of mmehr
                row["status"] = f"not run: {e} (see benchmarks/gpu_wheels.sh)"
            except Exception as e:  # recorded, and the run goes on: one broken case must not hide the rest
                row["status"] = (
                    f"failed: {type(e).__name__}: {str(e).splitlines()[0][:300] if str(e) else ''}"
                )
                row["traceback"] = traceback.format_exc()[-3000:]
            row["case_s"] = time.perf_counter() - t0
        self.rows.append(row)
        self.write()
        print(f"[{self.elapsed():6.1f} s] {section} / {name}: {row['status']}", flush=True)
        return row

    def write(self) -> None:
        self.out.mkdir(parents=True, exist_ok=True)
        meta = {**self.meta, "elapsed_s": round(self.elapsed(), 1)}
        for name, text in (
            ("gpu_check.json", json.dumps({"meta": meta, "rows": self.rows}, indent=2, default=str)),
            ("gpu_check.md", report(meta, self.rows)),
        ):
            tmp = self.out / f".{name}.tmp"
            tmp.write_text(text)
            os.replace(tmp, self.out / name)


def report(meta: dict, rows: list[dict]) -> str:
    shown = [{k: v for k, v in r.items() if k != "traceback"} for r in rows]
    head = ", ".join(f"{k}: {v}" for k, v in meta.items())
    failed = [
        f"- {r['benchmark']} / {r['case']}: {r['status']}" for r in rows if r["status"].startswith("failed")
    ]
    return f"# mmehr GPU check\n\n{head}\n\n" + markdown_table(shown) + "\n" + "\n".join(failed) + "\n"


# ----------------------------------------------------------------------------------------------------
# 1. environment and matmul


def environment(check: Check) -> dict:
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True)
    meta = {"size": check.size, "device": str(check.device), "torch": torch.__version__,
            "python": platform.python_version(), "commit": commit.stdout.strip() or "unknown"}  # fmt: skip
    if check.cuda:
        p = torch.cuda.get_device_properties(check.device)
        meta.update(gpu=p.name, capability=f"{p.major}.{p.minor}", gpu_memory_gb=round(p.total_memory / 1e9, 1),
                    cuda=torch.version.cuda, nccl=str(torch.cuda.nccl.version()))  # fmt: skip
    else:
        meta.update(gpu="none (CPU run at tiny sizes: its figures only show that the code runs)")
    check.meta = meta
    return dict(meta)


def matmul(check: Check) -> dict:
    """The card's practical limit: a square bf16 matmul on CUDA (8192^3), an fp32 one on CPU (512^3)."""
    n, reps = (8192, 10) if check.cuda else (512, 5)
    dtype = torch.bfloat16 if check.cuda else torch.float32
    a, b = (torch.randn(n, n, device=check.device, dtype=dtype) for _ in range(2))
    for _ in range(3):
        a @ b
    check.sync()
    t0 = time.perf_counter()
    for _ in range(reps):
        a @ b
    check.sync()
    check.matmul_flops = 2 * n**3 * reps / (time.perf_counter() - t0)
    return {"n": n, "dtype": str(dtype).removeprefix("torch."), "tflop_per_s": check.matmul_flops / 1e12}


# ----------------------------------------------------------------------------------------------------
# 2. and 6. training steps


def build_model(check: Check, mode: str):
    """A GPT with all three modalities compressed by `mode` (or EHR-only), gates open, on the device."""
    from mmehr.model.config import FusionConfig, ModalityConfig, ModelConfig
    from mmehr.model.gpt import GPT

    s = check.spec
    mods = {}
    if mode != "ehr_only":
        mods = {name: ModalityConfig(d_enc=s["d_enc"], compression=mode, n_latents=s["k"], n_latent_layers=s["l"])
                for name in s["tokens"]}  # fmt: skip
    cfg = ModelConfig(vocab_size=s["vocab"], n_layer=s["n_layer"], n_head=s["n_head"], n_embd=s["n_embd"],
                      block_size=s["block"], fusion=FusionConfig(modalities=mods, gate_init=0.0))  # fmt: skip
    torch.manual_seed(0)
    return GPT(cfg).to(check.device)


def synthetic_batch(check: Check, rows: int, T: int, multimodal: bool, seed: int = 0):
    """tokens, times (rows, T) one minute apart, and K_m events per modality spread over the window (fp16
    embeddings, as the store holds them)."""
    from mmehr.batch import ModalityInputs

    s, dev = check.spec, check.device
    g = torch.Generator().manual_seed(seed)
    tokens = torch.randint(1, s["vocab"], (rows, T), generator=g)
    times = T0_US + torch.arange(T).expand(rows, T) * US_PER_MIN
    mods = {}
    if multimodal:
        K = s["K_m"]
        for name, N in s["tokens"].items():
            event_time = T0_US + torch.linspace(0, T * US_PER_MIN, K).long().expand(rows, K)
            emb = torch.randn(rows, K, N, s["d_enc"], generator=g).half()
            ones = torch.ones(rows, K, N, dtype=torch.bool)
            mods[name] = ModalityInputs(emb, ones, event_time, torch.ones(rows, K, dtype=torch.bool)).to(dev)
    return tokens.to(dev), times.to(dev), mods


def train_step(check: Check, mode: str, compiled: bool = False, fold: bool | None = None):
    """-> (model, step, losses): `step()` runs one training step (forward, backward, AdamW) of `mode` on a
    synthetic batch and appends its loss. fold: force the Perceiver's `fold_media_kv` (None: by size)."""
    s = check.spec
    model = build_model(check, mode).train()
    if fold is not None:
        for m in model.modules():
            if hasattr(m, "fold_media_kv"):
                m.fold_media_kv = fold
    opt = torch.optim.AdamW(model.param_groups(0.1), lr=1e-4)
    tokens, times, mods = synthetic_batch(check, s["batch"], s["block"], mode != "ehr_only")
    targets, mask = tokens.roll(-1, 1), torch.ones_like(tokens, dtype=torch.bool)
    run = torch.compile(model, backend=s["compile_backend"]) if compiled else model
    losses = []

    def step() -> None:
        with check.autocast():
            _, loss = run(tokens, times, mods, targets=targets, loss_mask=mask)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(loss.detach())

    return model, step, losses


def train_case(check: Check, mode: str, compiled: bool) -> dict:
    from mmehr.model.accounting import train_flops_per_token

    s = check.spec
    B, T = s["batch"], s["block"]
    check.reset_peak()
    model, step, losses = train_step(check, mode, compiled)
    t0 = time.perf_counter()
    step()  # the first step compiles
    check.sync()
    first_s = time.perf_counter() - t0
    for _ in range(s["warmup"] - 1):
        step()
    check.sync()
    t0 = time.perf_counter()
    for _ in range(s["steps"]):
        step()
    check.sync()
    step_s = (time.perf_counter() - t0) / s["steps"]
    events = {name: (s["K_m"], N) for name, N in s["tokens"].items()} if mode != "ehr_only" else None
    flops = train_flops_per_token(model, T, events) * B * T
    if not all(torch.isfinite(x).item() for x in losses):
        raise FloatingPointError(f"non-finite training loss: {[float(x) for x in losses]}")
    return {"mode": mode, "compiled": compiled, "batch": B, "T": T, "step_s": step_s, "tokens_per_s": B * T / step_s,
            "model_tflop_per_s": flops / step_s / 1e12, "fraction_of_matmul": flops / step_s / check.matmul_flops,
            "peak_mem_mb": check.peak_mb(), "first_step_s": first_s, "loss": float(losses[-1])}  # fmt: skip


# ----------------------------------------------------------------------------------------------------
# 3. rollouts


def rollout_case(check: Check, mode: str, samples: int, recompute: bool = False) -> dict:
    from mmehr.batch import Batch
    from mmehr.evaluate.sampler import RolloutRules, SamplerSettings, sample_rollouts

    r, s = check.spec["rollout"], check.spec
    K = r["K"]
    new = r["recompute_steps"] if recompute else r["new"]
    check.reset_peak()
    model = build_model(check, mode).eval()
    tokens, times, mods = synthetic_batch(check, samples, r["context"], mode != "ehr_only", seed=1)
    rows = [(tokens[i].cpu().numpy(), times[i].cpu().numpy()) for i in range(samples)]
    batch = Batch.from_contexts(rows, [6] * samples, modalities={k: v for k, v in mods.items()})
    V = s["vocab"]
    allowed = torch.ones(V, dtype=torch.bool, device=check.device)
    allowed[0] = False  # padding is never sampled; nothing else stops a rollout before `new` tokens
    none = torch.zeros(V, dtype=torch.bool, device=check.device)
    rules = RolloutRules(
        allowed, none, none.clone(), -1, torch.zeros(V, dtype=torch.long, device=check.device), 2**62
    )
    settings = SamplerSettings(n_rollouts=K, max_new_tokens=new, batch_rows=samples * K)
    dtype = torch.bfloat16 if check.cuda else None

    def sample():
        with torch.no_grad(), check.autocast():
            return sample_rollouts(model, batch, rules, settings, recompute=recompute, cache_dtype=dtype,
                                   generator=torch.Generator(check.device).manual_seed(0))  # fmt: skip

    sample()  # warm-up: allocator, kernels; the recomputing sampler too, so that both are timed warm
    check.sync()
    t0 = time.perf_counter()
    out = sample()
    check.sync()
    seconds = time.perf_counter() - t0
    generated = out.stats["generated_tokens"]
    if generated != samples * K * new:
        raise AssertionError(
            f"{generated} tokens generated, expected {samples * K * new}: a rollout stopped early"
        )
    row = {"mode": mode, "context": r["context"], "rollouts_in_batch": samples * K, "new_tokens": new,
           "kv_cache": not recompute, "seconds": seconds, "generated_tok_per_s": generated / seconds,
           "peak_mem_mb": check.peak_mb()}  # fmt: skip
    if check.cuda:
        row["vs_ethos_h100_reported"] = row["generated_tok_per_s"] / ETHOS_H100_TOK_PER_S
    return row


# ----------------------------------------------------------------------------------------------------
# 4. encoders


def encoder_payloads(modality: str, n: int) -> list:
    import numpy as np

    rng = np.random.default_rng(0)
    if modality == "ecg":  # 10 s, 12 leads, 500 Hz
        return [(rng.standard_normal((12, 5000)).astype(np.float32), 500.0) for _ in range(n)]
    if modality == "cxr":  # a downsized chest X-ray (MIMIC-CXR-JPG is ~2500 x 3000; resizing is CPU work)
        return [rng.integers(0, 256, (512, 512), dtype=np.uint8) for _ in range(n)]
    words = [
        "patient",
        "admitted",
        "chest",
        "pain",
        "troponin",
        "elevated",
        "sinus",
        "rhythm",
        "lungs",
        "clear",
    ]
    return [" ".join(rng.choice(words, size=600)) for _ in range(n)]  # > 512 tokens: truncated


def encoder_case(check: Check, name: str) -> dict:
    from mmehr.modalities.encoders import get_encoder

    n = check.spec["encoders"]["batch"]
    check.reset_peak()
    enc = get_encoder(name, random_init=True, **check.spec["encoders"]["sizes"].get(name, {})).to(
        check.device
    )
    payloads = encoder_payloads(ENCODERS[name], n)
    with check.autocast():
        enc.encode(payloads[:2])  # warm-up
        check.sync()
        t0 = time.perf_counter()
        emb, mask = enc.encode(payloads)
        check.sync()
        end_to_end = time.perf_counter() - t0
        inputs = {k: v.to(check.device) for k, v in enc.prepare(payloads).items()}
        with torch.inference_mode():
            enc.model(**inputs)
            check.sync()
            t0 = time.perf_counter()
            enc.model(**inputs)
            check.sync()
            model_s = time.perf_counter() - t0
    if not torch.isfinite(emb[mask]).all():
        raise FloatingPointError(f"{name}: non-finite embeddings")
    return {"modality": ENCODERS[name], "events": n, "tokens_per_event": float(mask.sum(1).float().mean()),
            "d_enc": emb.shape[-1], "events_per_s": n / end_to_end, "model_events_per_s": n / model_s,
            "peak_mem_mb": check.peak_mb()}  # fmt: skip


# ----------------------------------------------------------------------------------------------------
# 5. the CUDA tests


# On CPU the mask tests run under CPU bf16 autocast (MMEHR_GPU_TEST_DEVICE=cpu), so that `make test` keeps
# them true to the model while no GPU is at hand (one did rot: its random-init latents stopped reading the
# media, which only the first GPU run showed); the rest are seconds-to-a-minute each on CPU and need CUDA
# to mean anything.
CPU_TESTS = "perturbing or without_visible_media"


def gpu_tests(check: Check) -> dict:
    junit = check.out / "gpu_tests.xml"
    cmd = [sys.executable, "-m", "pytest", "-m", "gpu", "-q", "-p", "no:cacheprovider", "--junitxml", str(junit),
           str(ROOT / "tests" / "test_gpu.py")]  # fmt: skip
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT / "src"), os.environ.get("PYTHONPATH", "")])}
    if not check.cuda:
        cmd += ["-k", CPU_TESTS]
        env["MMEHR_GPU_TEST_DEVICE"] = "cpu"
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, env=env)
    suite = ET.parse(junit).getroot()
    suite = suite if suite.tag == "testsuite" else suite.find("testsuite")
    counts = {k: int(suite.get(k, 0)) for k in ("tests", "failures", "errors", "skipped")}
    failed = [
        c.get("name")
        for c in suite.iter("testcase")
        if c.find("failure") is not None or c.find("error") is not None
    ]
    row = {**counts, "passed": counts["tests"] - counts["failures"] - counts["errors"] - counts["skipped"],
           "exit_code": proc.returncode, "failed_tests": ", ".join(failed)}  # fmt: skip
    if failed or proc.returncode not in (0, 5):
        row["status"] = f"failed: {', '.join(failed) or proc.stdout[-300:]}"
        row["traceback"] = proc.stdout[-3000:]
    elif counts["skipped"] == counts["tests"]:
        row["status"] = "ok (all skipped)"
    elif not check.cuda:
        row["status"] = f"ok (on CPU: the mask tests only, -k '{CPU_TESTS}')"
    return row


# ----------------------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--out", required=True, help="directory for gpu_check.json, gpu_check.md, gpu_tests.xml"
    )
    parser.add_argument("--device", default="auto", help="auto (cuda if available), cuda, cuda:N or cpu")
    parser.add_argument("--size", choices=("auto", "paper", "tiny"), default="auto",
                        help="auto: paper sizes on CUDA, tiny on CPU")  # fmt: skip
    parser.add_argument(
        "--budget-s", type=float, default=450.0, help="skip cases that would start after this"
    )
    parser.add_argument(
        "--skip", nargs="*", default=[], choices=("train", "rollout", "encoders", "tests", "compile")
    )
    args = parser.parse_args(argv)

    device = torch.device("cuda" if args.device == "auto" and torch.cuda.is_available() else
                          "cpu" if args.device == "auto" else args.device)  # fmt: skip
    if device.type == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: this torch sees no CUDA device")
    if device.type == "cuda" and device.index is None:  # set_device and memory stats need the index
        device = torch.device("cuda", torch.cuda.current_device())
    size = args.size if args.size != "auto" else "paper" if device.type == "cuda" else "tiny"
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    check = Check(out, device, size, args.budget_s)
    if device.type == "cuda":
        torch.cuda.set_device(device)
        torch.backends.cuda.matmul.allow_tf32 = True  # fp32 leftovers (optimizer, norms) on tensor cores
    else:
        torch.set_num_threads(min(2, torch.get_num_threads()))
    s = check.spec
    check.case("environment", "versions", lambda: environment(check))
    check.case("matmul", "square matmul", lambda: matmul(check))
    if "train" not in args.skip:
        for mode in MODES:
            check.case("train", f"{mode} eager", lambda m=mode: train_case(check, m, compiled=False))
    if "rollout" not in args.skip:
        for S in s["rollout"]["samples"]:
            check.case(
                "rollout", f"ehr_only, {S} samples x K", lambda n=S: rollout_case(check, "ehr_only", n)
            )
        S = s["rollout"]["mm_samples"]
        check.case(
            "rollout", f"latent, 3 modalities, {S} samples x K", lambda: rollout_case(check, "latent", S)
        )
        check.case("rollout", "ehr_only, 1 sample x K, recompute (ETHOS's way)",
                   lambda: rollout_case(check, "ehr_only", 1, recompute=True))  # fmt: skip
    if "encoders" not in args.skip:
        for name in ENCODERS:
            check.case("encoders", name, lambda n=name: encoder_case(check, n))
    if "tests" not in args.skip:
        check.case("tests", "pytest -m gpu tests/test_gpu.py", lambda: gpu_tests(check))
    if "compile" not in args.skip:
        for mode in s["compile_modes"]:
            check.case("train", f"{mode} torch.compile ({s['compile_backend']})",
                       lambda m=mode: train_case(check, m, compiled=True), needs_s=60 if check.cuda else 0)  # fmt: skip
    failed = [r for r in check.rows if r["status"].startswith("failed")]
    print(
        f"wrote {out / 'gpu_check.json'} and {out / 'gpu_check.md'} ({check.elapsed():.0f} s, {len(failed)} failed)"
    )
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
