"""The demo's CPU dropout before and after `decoder.keep_mask` and the additive causal mask, side by side.

    python benchmarks/ab_dropout.py [--steps N] [--demo DEMO_OUT] [--out DIR]

bench_train's data (the MIMIC-IV demo timelines, random stores of the paper's encoder shapes), or with
--demo the output of `mmehr demo` (its timelines and stores, as its runs read them), and the demo config, EHR-only and all three modalities: each run's trainer takes optimizer steps on one batch on one
thread, alternating (ABBA) between mmehr's dropout as it is and as it was ("uniform": masks from
`rand_like(x) >= p` scaled in one step, the causal mask by masked_fill; `bench_train.use_uniform_dropout`).
Both compute the same numbers to the bit (tests/test_model_decoder.py); only the time differs. Per run:
the median step of each and the median of the paired ratios (as it was / as it is), the figure to read on
a noisy machine. Writes ab_dropout.json and ab_dropout.md to DIR.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_train as bt  # benchmarks/ is not a package

RUNS = ["ehr_only", "all_three"]


def trainer_for(run: str, paths: dict[str, str], demo: bool):
    from mmehr.config import apply_overrides, load_yaml
    from mmehr.runconfig import resolve_config
    from mmehr.train import Trainer

    raw = load_yaml(bt.ROOT / "configs" / "demo.yaml")
    overrides = [f"data.timelines={paths['timelines']}", "run.threads=1", "data.workers=0"]
    for name in bt.SHAPES:
        overrides += [
            f"data.modalities.{name}.store={paths[name]}",
            f"data.modalities.{name}.enabled={run == 'all_three'}",
        ]
        overrides += [] if demo else [f"data.modalities.{name}.max_tokens=null"]  # fmt: skip
    apply_overrides(raw, overrides)
    out = tempfile.mkdtemp(prefix="mmehr-ab-dropout-")
    return Trainer(resolve_config(raw, "configs/demo.yaml"), out, progress=False)


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--steps", type=int, default=12, help="paired steps per run (default 12)")
    parser.add_argument(
        "--demo", type=Path, help="the output of `mmehr demo`: its data instead of bench_train's"
    )
    parser.add_argument("--out", type=Path, help="write ab_dropout.json and ab_dropout.md here")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    from mmehr.model import decoder, fusion

    now = (decoder.dropout, decoder.attention)
    bt.use_uniform_dropout()
    before = (decoder.dropout, decoder.attention)

    def use(pieces) -> None:
        decoder.dropout = pieces[0]
        decoder.attention = fusion.attention = pieces[1]

    rows = []
    with tempfile.TemporaryDirectory(prefix="mmehr-ab-dropout-") as tmp:
        if args.demo:
            demo = args.demo.resolve()
            paths = {"timelines": str(demo / "timelines")} | {m: str(demo / "stores" / m) for m in bt.SHAPES}
        else:
            paths = bt.prepare(Path(tmp), quick=False)
        for run in RUNS:
            trainer = trainer_for(run, paths, demo=bool(args.demo))
            batch = trainer.train_windows.micro_batch(0, trainer.config.optim.batch_size)
            for pieces in (now, before):  # warm-up: allocations, kernel choice, optimizer state
                use(pieces)
                trainer.train_step(iter([batch]))
            seconds: dict[str, list[float]] = {"now": [], "before": []}
            for i in range(args.steps):
                order = [("now", now), ("before", before)]
                for name, pieces in order if i % 2 == 0 else order[::-1]:
                    use(pieces)
                    t0 = time.perf_counter()
                    trainer.train_step(iter([batch]))
                    seconds[name].append(time.perf_counter() - t0)
            ratios = [b / a for a, b in zip(seconds["now"], seconds["before"])]
            row = {
                "run": run,
                "data": str(args.demo) if args.demo else "bench_train",
                "step_s_now": statistics.median(seconds["now"]),
                "step_s_before": statistics.median(seconds["before"]),
                "paired_ratio_before_over_now": statistics.median(ratios),
                "ratio_spread": [min(ratios), max(ratios)],
                "steps": args.steps,
                "threads": 1,
            }
            rows.append(row)
            print(json.dumps(row), flush=True)
    use(now)
    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "ab_dropout.json").write_text(json.dumps(rows, indent=1) + "\n")
        lines = [
            f"data: {rows[0]['data']}; {args.steps} paired steps per run, one thread",
            "",
            "| run | step now (s) | step before (s) | before / now (median of pairs) | range |",
            "|---|---|---|---|---|",
        ]
        lines += [
            f"| {r['run']} | {r['step_s_now']:.3f} | {r['step_s_before']:.3f} | {r['paired_ratio_before_over_now']:.2f}x "
            f"| {r['ratio_spread'][0]:.2f}-{r['ratio_spread'][1]:.2f} |"
            for r in rows
        ]
        (args.out / "ab_dropout.md").write_text("\n".join(lines) + "\n")
    return rows


if __name__ == "__main__":
    main()
