"""`mmehr evaluate --checkpoint RUN --task NAME... --out OUT`: zero-shot evaluation by sampled futures.

See `mmehr.evaluate.pipeline` for what it writes and `mmehr.evaluate.sampler` for how futures are drawn.
"""

from __future__ import annotations

import argparse
import re
import signal
import sys
from pathlib import Path

import torch

from mmehr.checkpoint import check_vocabulary, load_model, resolve_checkpoint
from mmehr.distributed import Distributed, set_threads
from mmehr.evaluate.pipeline import evaluate
from mmehr.evaluate.runner import EvalData
from mmehr.evaluate.sampler import UNFINISHED_WARNING, SamplerSettings
from mmehr.evaluate.scoring import (
    DEFAULT_COHORTS,
    EvalOptions,
    fixed_threshold,
    format_ci,
    unreal_end_warnings,
)
from mmehr.evaluate.tasks import load_task
from mmehr.model.gpt import GPT
from mmehr.runconfig import TrainConfig, modality_stores

ROLLOUT_ROOM = 256  # tokens a rollout generates before the KV cache first slides (default context)


def auto_batch_rows(model: GPT, max_len: int, device: torch.device | str, n_rollouts: int) -> int:
    """Rollout rows per batch that keep the KV cache within a memory budget (CPU 2 GiB, GPU 40% of free)."""
    c = model.config
    per_row = (
        c.n_layer * 2 * max_len * c.n_embd * (2 if torch.device(device).type == "cuda" else 4) + 16 * max_len
    )
    if torch.device(device).type == "cuda":
        budget = 0.4 * torch.cuda.mem_get_info(torch.device(device))[0]
    else:
        budget = 2 * 1024**3
    rows = int(budget // per_row)
    return max(n_rollouts, min(rows - rows % n_rollouts, 64 * n_rollouts))


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--checkpoint", required=True, type=Path, help="training output directory (mmehr train)"
    )
    parser.add_argument(
        "--task", required=True, nargs="+", help="task preset names or YAML files (configs/tasks)"
    )
    parser.add_argument("--out", required=True, type=Path, help="output directory (resumed if it exists)")
    parser.add_argument("--rollouts", type=int, default=20, help="futures sampled per sample (default 20)")
    parser.add_argument("--split", default="held_out", help="split to evaluate (default held_out)")
    parser.add_argument("--max-samples", type=int, default=None, help="at most N samples per task and split")
    parser.add_argument(
        "--tuning-samples",
        type=int,
        default=None,
        help="at most N tuning-split samples for the threshold (default: --max-samples)",
    )
    parser.add_argument("--temperature", type=float, default=1.0, help="sampling temperature (0: greedy)")
    parser.add_argument(
        "--max-new-tokens",
        type=int,
        default=SamplerSettings.max_new_tokens,
        help="safety cap of generated tokens per rollout (ETHOS has none): a rollout that reaches it is "
        f"reported as unfinished and never counted (default {SamplerSettings.max_new_tokens})",
    )
    parser.add_argument(
        "--max-simulated-days",
        type=float,
        default=SamplerSettings.max_simulated_days,
        help="safety cap on a rollout's simulated time for tasks without a time limit (unfinished past it; "
        f"default {SamplerSettings.max_simulated_days})",
    )
    parser.add_argument(
        "--save-tokens", action="store_true", help="keep every generated token in rollouts.parquet"
    )
    parser.add_argument(
        "--batch-size", type=int, default=None, help="rollouts decoded together (default: fit memory)"
    )
    parser.add_argument(
        "--context-tokens",
        type=int,
        default=None,
        help=f"context length, static prefix included (default: block_size - {ROLLOUT_ROOM}, at least block_size/2)",
    )
    parser.add_argument(
        "--hide-modality", nargs="+", default=[], metavar="NAME", help="evaluate with these hidden"
    )
    parser.add_argument(
        "--knockout",
        nargs="*",
        default=None,
        metavar="NAME",
        help="also evaluate with each of these modalities hidden in turn (no names: every enabled modality)",
    )
    parser.add_argument(
        "--threshold-from",
        default="tuning",
        help="decision threshold: 'tuning' (chosen on the tuning split's predictions, evaluated too), "
        "'none' (0.5), or a JSON file {task: threshold} (e.g. an earlier run's thresholds.json)",
    )
    parser.add_argument(
        "--cohort",
        action="append",
        default=None,
        metavar="NAME=REGEX",
        help=f"cohort by a token pattern in the history (repeatable; default {', '.join(DEFAULT_COHORTS)})",
    )
    parser.add_argument(
        "--bootstrap", type=int, default=1000, help="bootstrap draws for the CIs (default 1000)"
    )
    parser.add_argument("--seed", type=int, default=0, help="sampling seed")
    parser.add_argument(
        "--timelines", type=Path, default=None, help="tokenized timelines (default: the training data)"
    )
    parser.add_argument("--device", default="auto", help="torch device (default: cuda if available)")
    parser.add_argument(
        "--threads", type=int, default=None, help="torch threads per process (default: cores / processes)"
    )
    parser.add_argument(
        "--no-reference",
        action="store_true",
        help="skip the supervised references (logistic regression on the same context, fit on train)",
    )
    parser.add_argument("--no-progress", action="store_true", help="hide progress bars")


def _parse_cohorts(items: list[str] | None) -> dict[str, str]:
    if items is None:
        return dict(DEFAULT_COHORTS)
    out = {}
    for item in items:
        name, sep, pattern = item.partition("=")
        if not sep or not name or not pattern:
            raise ValueError(f"--cohort {item!r}: expected NAME=REGEX")
        try:
            re.compile(pattern)
        except re.error as e:
            raise ValueError(f"--cohort {item!r}: bad regex: {e}") from e
        out[name] = pattern
    return out


def default_context_tokens(block_size: int) -> int:
    """Leave room for the rollout before the first slide, but keep at least half the block as context."""
    return max(block_size - ROLLOUT_ROOM, block_size // 2)


def eval_data_from_config(cfg: TrainConfig, args: argparse.Namespace) -> EvalData:
    """The timelines and modality stores a checkpoint was trained on (`--timelines` overrides the former)."""
    block = cfg.model.block_size
    context = args.context_tokens or default_context_tokens(block)
    if not 1 <= context <= block:
        raise ValueError(f"--context-tokens {context} must be in [1, block_size {block}]")
    mods = {name: cfg.data.modalities[name] for name in cfg.model.modalities}
    return EvalData(
        timelines=Path(args.timelines or cfg.data.timelines),
        context_tokens=context,
        modality_stores=modality_stores(cfg),
        k_max={name: m.k_max for name, m in mods.items()},
        max_tokens={name: m.max_tokens for name, m in mods.items()},
        media_retrieval=cfg.data.media_retrieval,
    )


def _check_numbers(args: argparse.Namespace) -> None:
    """Counts and sizes that must be positive, refused before any work."""
    at_least = {"--rollouts": (args.rollouts, 1), "--max-new-tokens": (args.max_new_tokens, 1),
                "--batch-size": (args.batch_size, 1), "--max-samples": (args.max_samples, 1),
                "--tuning-samples": (args.tuning_samples, 1), "--bootstrap": (args.bootstrap, 0),
                "--context-tokens": (args.context_tokens, 1), "--temperature": (args.temperature, 0)}  # fmt: skip
    for flag, (value, low) in at_least.items():
        if value is not None and value < low:
            raise ValueError(f"{flag} {value}: must be at least {low}")


def _sigterm_as_interrupt(signum, frame):
    raise KeyboardInterrupt


def run(args: argparse.Namespace) -> int:
    d = Distributed.from_env()
    set_threads(args.threads, d.local_world_size)
    previous = signal.signal(signal.SIGTERM, _sigterm_as_interrupt)  # stop like Ctrl-C: finished chunks stay
    if args.device == "auto":
        device = f"cuda:{d.local_rank}" if torch.cuda.is_available() else "cpu"
    else:
        device = args.device
    d = Distributed.setup(use_cuda=device.startswith("cuda"), timeout_hours=12)
    try:
        _check_numbers(args)
        checkpoint = resolve_checkpoint(args.checkpoint)
        model, cfg = load_model(checkpoint, device)
        data = eval_data_from_config(cfg, args)
        check_vocabulary(checkpoint, data.timelines)  # ids from another vocabulary mean other codes
        tasks = [load_task(t) for t in args.task]
        if args.threshold_from not in ("tuning", "none"):  # a bad file fails now, not after the rollouts
            for task in tasks:
                fixed_threshold(args.threshold_from, task.name)
        enabled = set(model.config.fusion.modalities)
        unknown = set(args.hide_modality) - enabled
        if unknown:
            raise ValueError(
                f"--hide-modality {sorted(unknown)}: the model's modalities are {sorted(enabled) or 'none'}"
            )
        knockout = (
            sorted(enabled - set(args.hide_modality)) if args.knockout == [] else list(args.knockout or [])
        )
        if set(knockout) - enabled:
            raise ValueError(f"--knockout {sorted(set(knockout) - enabled)}: not modalities of the model")
        batch_rows = args.batch_size or auto_batch_rows(model, model.config.block_size, device, args.rollouts)
        settings = SamplerSettings(
            n_rollouts=args.rollouts,
            temperature=args.temperature,
            max_new_tokens=args.max_new_tokens,
            max_simulated_days=args.max_simulated_days,
            batch_rows=batch_rows,
            seed=args.seed,
        )
        options = EvalOptions(
            split=args.split,
            max_samples=args.max_samples,
            tuning_samples=args.tuning_samples,
            threshold_from=args.threshold_from,
            hidden=tuple(args.hide_modality),
            knockout=tuple(knockout),
            cohorts=_parse_cohorts(args.cohort),
            n_boot=args.bootstrap,
            reference=not args.no_reference,
            save_tokens=args.save_tokens,
        )
        results = evaluate(
            model,
            tasks,
            data,
            settings,
            args.out,
            options,
            device=device,
            progress=not args.no_progress,
            header={"checkpoint": str(Path(args.checkpoint).resolve())},
        )
    finally:
        signal.signal(signal.SIGTERM, previous)
        d.shutdown()
    if d.main:
        for name, r in results.items():
            m, s = r["metrics"], r["stop_reasons"]
            print(
                f"{name}: n={r['n_samples']} ({r['n_positive']} positive, {r['n_without_probability']} without "
                f"a probability)  AUROC {format_ci(m, 'auroc')}  AUPRC {format_ci(m, 'auprc')}  "
                f"F1 {format_ci(m, 'f1_macro')}  rollouts ended by outcome {s['outcome']:.0%}, "
                f"stop {s['stop']:.0%}, timeline end {s['timeline_end']:.0%}, time limit {s['time_limit']:.0%}, "
                f"unfinished {r['rollouts']['unfinished']} ({s['unfinished']:.1%})"
            )
            for w in unreal_end_warnings(name, r["ends"]):
                print(f"  warning: {w} (summary.md: where rollouts ended)", file=sys.stderr)
            if s["unfinished"] > UNFINISHED_WARNING:
                print(
                    f"  warning: {s['unfinished']:.0%} of {name}'s rollouts reached the safety cap of "
                    f"{args.max_new_tokens} tokens unfinished (never counted): raise --max-new-tokens",
                    file=sys.stderr,
                )
        print(
            f"wrote {Path(args.out).resolve()} (summary.md, <task>/predictions.parquet, metrics.json, curves.png)"
        )
    return 0
