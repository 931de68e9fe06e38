"""The one `mmehr` command. Each subcommand lives in the module that owns its concept.

A subcommand module exposes `add_arguments(parser)` and `run(args) -> int`; only the chosen
module is imported, so `mmehr --help` is instant and a missing optional dependency of one stage
never breaks another.
"""

from __future__ import annotations

import argparse
import importlib
import sys

# name -> (module, one-line help). Order is the order of the pipeline.
COMMANDS: dict[str, tuple[str, str]] = {
    "demo": ("mmehr.demo", "run every stage on a generated synthetic cohort and write a report"),
    "synth": (
        "mmehr.data.synthetic.cli",
        "write a synthetic multimodal MEDS cohort with planted ground truth",
    ),
    "tokenize": ("mmehr.data.tokenize", "tokenize a MEDS dataset into memory-mapped timelines"),
    "index": ("mmehr.modalities.sources", "index ECG / CXR / note sources into modality events"),
    "encode": ("mmehr.modalities.encode", "encode modality events once with a frozen encoder"),
    "train": ("mmehr.train", "train a model from a YAML config"),
    "evaluate": ("mmehr.evaluate.cli", "zero-shot evaluation of tasks by sampled rollouts"),
    "ablate": ("mmehr.experiments", "run an ablation grid and write the paper's tables"),
    "explain": ("mmehr.explain.cli", "one sample's page: what the model saw, attended to and drew"),
    "report": ("mmehr.report", "write the markdown/HTML report for an output directory"),
}


def _top_parser() -> argparse.ArgumentParser:
    lines = "\n".join(f"  {name:<10} {help_}" for name, (_, help_) in COMMANDS.items())
    parser = argparse.ArgumentParser(
        prog="mmehr",
        description="Autoregressive EHR foundation models with multimodal inputs.",
        epilog=f"commands:\n{lines}\n\nRun `mmehr COMMAND --help` for a command's options.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("command", choices=list(COMMANDS), metavar="COMMAND")
    parser.add_argument("--version", action="version", version=_version())
    return parser


def _version() -> str:
    from mmehr import __version__

    return f"mmehr {__version__}"


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    top = _top_parser()
    if not argv or argv[0] not in COMMANDS:
        top.parse_args(argv[:1] or ["--help"])
        return 2
    name, rest = argv[0], argv[1:]
    module = importlib.import_module(COMMANDS[name][0])
    parser = argparse.ArgumentParser(prog=f"mmehr {name}", description=COMMANDS[name][1])
    module.add_arguments(parser)
    args = parser.parse_args(rest)
    try:
        return int(module.run(args) or 0)
    except KeyboardInterrupt:
        print(f"mmehr {name}: interrupted; completed outputs are kept, rerun to resume.", file=sys.stderr)
        return 130
    except (FileNotFoundError, ValueError, RuntimeError) as e:
        # Errors raised on purpose carry an actionable message; a traceback would hide it (MMEHR_DEBUG=1
        # shows it).
        if __debug_enabled():
            raise
        print(f"mmehr {name}: error: {e}", file=sys.stderr)
        return 1


def __debug_enabled() -> bool:
    import os

    return os.environ.get("MMEHR_DEBUG", "") not in ("", "0")


if __name__ == "__main__":
    sys.exit(main())
