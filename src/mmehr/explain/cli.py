"""`mmehr explain --checkpoint RUN --task TASK (--subject ID [--prediction-time T] | --sample N) --out DIR`.

Writes one sample's page (`mmehr.explain.page`): what the model saw, what it attended to, what futures
it drew. With `--eval DIR` (a `mmehr evaluate` output of the same checkpoint) the sample is one of that
evaluation's and its chunk is replayed with the evaluation's own settings, so the page's risk is the one
the evaluation recorded; otherwise the sampling options below are those of `mmehr evaluate` and the page
matches `mmehr evaluate` run with the same options.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch

from mmehr.checkpoint import check_vocabulary, load_model, resolve_checkpoint
from mmehr.data.timelines import TimelineStore
from mmehr.distributed import set_threads
from mmehr.evaluate.cli import auto_batch_rows, eval_data_from_config
from mmehr.evaluate.sampler import SamplerSettings
from mmehr.evaluate.tasks import load_task, task_samples
from mmehr.explain.collect import explain_sample
from mmehr.explain.page import write_page
from mmehr.explain.replay import ChunkReplayer, Replay, find_sample, iso, parse_time_us, replay_of_evaluation
from mmehr.io import check_output

SAMPLING = (
    "rollouts",
    "temperature",
    "max_new_tokens",
    "seed",
    "batch_size",
    "max_samples",
    "context_tokens",
)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--checkpoint", required=True, type=Path, help="training output directory (mmehr train)"
    )
    parser.add_argument("--task", required=True, help="task preset name or YAML file (configs/tasks)")
    which = parser.add_mutually_exclusive_group(required=True)
    which.add_argument("--subject", type=int, help="subject id: its sample of the task")
    which.add_argument("--sample", type=int, help="sample index (as in an evaluation's rollouts.parquet)")
    parser.add_argument(
        "--prediction-time",
        help="with --subject: which of its samples (µs since the epoch or ISO date-time; default: the first)",
    )
    parser.add_argument("--out", required=True, type=Path, help="output directory for the page")
    parser.add_argument(
        "--eval",
        type=Path,
        default=None,
        help="a `mmehr evaluate` output of this checkpoint to replay exactly",
    )
    parser.add_argument("--split", default=None, help="split (default held_out; with --eval: its split)")
    parser.add_argument(
        "--show-text", action="store_true", help="put the notes' text in the page (never in logs)"
    )
    parser.add_argument("--heat-strip", action="store_true", help="also every context token's attention")
    parser.add_argument(
        "--no-knockout", action="store_true", help="skip re-sampling with each modality hidden"
    )
    group = parser.add_argument_group("sampling, as `mmehr evaluate` (not with --eval, which has its own)")
    group.add_argument("--rollouts", type=int, default=None, help="futures sampled (default 20)")
    group.add_argument("--temperature", type=float, default=None, help="sampling temperature (default 1)")
    group.add_argument(
        "--max-new-tokens", type=int, default=None, help="safety cap per rollout (default 8192)"
    )
    group.add_argument("--seed", type=int, default=None, help="sampling seed (default 0)")
    group.add_argument(
        "--batch-size", type=int, default=None, help="rollouts decoded together (default: fit memory)"
    )
    group.add_argument(
        "--max-samples", type=int, default=None, help="the task's samples drawn, as evaluate's"
    )
    group.add_argument(
        "--context-tokens", type=int, default=None, help="context length, static prefix included"
    )
    parser.add_argument(
        "--timelines", type=Path, default=None, help="tokenized timelines (default: the training data)"
    )
    parser.add_argument("--device", default="auto", help="torch device (default: cuda if available)")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: all cores)")


def build_replay(args: argparse.Namespace, model, cfg, checkpoint: Path, device: str) -> Replay:
    """The evaluation to replay: `--eval`'s, or one with `mmehr evaluate`'s options."""
    data = eval_data_from_config(cfg, args)
    if args.eval is not None:
        given = [f"--{k.replace('_', '-')}" for k in SAMPLING if getattr(args, k) is not None]
        if given:
            raise ValueError(f"{', '.join(given)}: --eval replays that evaluation's own settings; drop them")
        replay = replay_of_evaluation(args.eval, load_task(args.task).name, checkpoint, data)
        if args.split is not None and args.split != replay.split:
            raise ValueError(f"--split {args.split}: {args.eval} evaluated split {replay.split!r}")
        return replay
    for flag, value, low in (("--rollouts", args.rollouts, 1), ("--max-new-tokens", args.max_new_tokens, 1),
                             ("--batch-size", args.batch_size, 1), ("--max-samples", args.max_samples, 1),
                             ("--temperature", args.temperature, 0)):  # fmt: skip
        if value is not None and value < low:
            raise ValueError(f"{flag} {value}: must be at least {low}")
    task = load_task(args.task)
    rollouts = args.rollouts or SamplerSettings.n_rollouts
    settings = SamplerSettings(
        n_rollouts=rollouts,
        temperature=SamplerSettings.temperature if args.temperature is None else args.temperature,
        max_new_tokens=args.max_new_tokens or SamplerSettings.max_new_tokens,
        batch_rows=args.batch_size or auto_batch_rows(model, model.config.block_size, device, rollouts),
        seed=args.seed or 0,
    )
    split = args.split or "held_out"
    samples = task_samples(task, TimelineStore(data.timelines, split), max_samples=args.max_samples)
    return Replay(task, split, samples, settings, data)


def run(args: argparse.Namespace) -> int:
    t0 = time.perf_counter()
    if args.sample is not None and args.prediction_time is not None:
        raise ValueError("--prediction-time goes with --subject, not with --sample")
    check_output(args.out, "explain", inputs=[args.checkpoint, args.eval])  # before any work
    set_threads(args.threads, 1)
    device = args.device if args.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu")
    checkpoint = resolve_checkpoint(args.checkpoint)
    model, cfg = load_model(checkpoint, device)
    replay = build_replay(args, model, cfg, args.checkpoint, device)
    check_vocabulary(checkpoint, replay.data.timelines)
    at = parse_time_us(args.prediction_time) if args.prediction_time is not None else None
    n, note = find_sample(replay, sample=args.sample, subject=args.subject, at_us=at)
    if note:
        print(note)
    replayer = ChunkReplayer(model, replay, device)
    ex = explain_sample(
        model, replayer, n, knockout=not args.no_knockout, evaluation=str(args.eval) if args.eval else None
    )
    page = write_page(ex, args.out, show_text=args.show_text, heat_strip=args.heat_strip)
    knock = ", ".join(
        f"without {'+'.join(k['hidden'])} {k['probability']:.2f}"
        for k in ex.knockout
        if k["probability"] is not None
    )
    print(
        f"{ex.task.name} sample {n} (subject {ex.subject_id}, {iso(ex.prediction_us)}): label "
        f"{'positive' if ex.label else 'negative'}, risk {ex.risk.probability:.2f}"
        + (f" ({knock})" if knock else "")
    )
    for line in ex.notes:
        print(f"note: {line}")
    print(f"wrote {page.resolve()} in {time.perf_counter() - t0:.1f} s")
    return 0
