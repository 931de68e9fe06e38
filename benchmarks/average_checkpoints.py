"""A checkpoint whose weights are the mean of several checkpoints of one run: does averaging a run's last
checkpoints make its predictions follow the notes more?

    python benchmarks/average_checkpoints.py RUN/train/checkpoints/step-0002500 \
        RUN/train/checkpoints/step-0003000 --out DIR
    mmehr evaluate --checkpoint DIR ...

Every checkpoint must hold the same parameters (names and shapes), the same vocabulary and the same
training config but for the step count; the mean is taken in float64 and stored in each tensor's own
dtype. DIR must not exist (nothing is replaced); it is written atomically, weights and config only (it
cannot be resumed). Tied tensors (the token embedding and the output head) are stored once and stay tied.
docs/experiments.md, "Rollouts and the notes' following": what it gave on the demo's 3,000-step runs.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

from mmehr.checkpoint import load_config_of, load_model, read_weights, save_checkpoint
from mmehr.config import to_dict
from mmehr.io import read_json
from mmehr.runconfig import config_differences


def averaged_weights(checkpoints: list[Path]) -> dict[str, torch.Tensor]:
    """The mean of the checkpoints' stored tensors; refuses checkpoints that do not belong together."""
    first = read_json(checkpoints[0] / "manifest.json")
    first_config = to_dict(load_config_of(checkpoints[0]))
    weights = [read_weights(c) for c in checkpoints]
    for c, w in zip(checkpoints[1:], weights[1:]):
        if read_json(c / "manifest.json")["vocab_sha256"] != first["vocab_sha256"]:
            raise ValueError(f"{c} and {checkpoints[0]} were trained on different vocabularies")
        shapes = {k: tuple(v.shape) for k, v in w.items()}
        if shapes != {k: tuple(v.shape) for k, v in weights[0].items()}:
            raise ValueError(f"{c} and {checkpoints[0]} hold different parameters")
        config = to_dict(load_config_of(c))
        differing = [d for d in config_differences(config, first_config) if d != "optim.max_steps"]
        if differing:
            raise ValueError(
                f"{c} and {checkpoints[0]} were trained with other settings: {', '.join(differing)}"
            )
    return {
        k: torch.stack([w[k].double() for w in weights]).mean(0).to(weights[0][k].dtype) for k in weights[0]
    }


def main(argv: list[str] | None = None) -> Path:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("checkpoints", nargs="+", type=Path, help="checkpoint directories of one run")
    parser.add_argument("--out", type=Path, required=True, help="the new checkpoint (must not exist)")
    args = parser.parse_args(argv)
    if len(args.checkpoints) < 2:
        parser.error("give two checkpoints or more")
    if args.out.exists():
        parser.error(f"{args.out} exists; refusing to replace it")
    model, config = load_model(args.checkpoints[0])
    mean = averaged_weights(args.checkpoints)
    missing, unexpected = model.load_state_dict(mean, strict=False)
    tied = {"transformer.wte.weight"}  # stored once, as lm_head.weight
    if set(missing) - tied or unexpected:
        raise ValueError(f"the averaged weights do not fit the model: {missing} / {unexpected}")
    info = {"averaged_from": [str(c.resolve()) for c in args.checkpoints]}
    save_checkpoint(args.out, model, config, vocab_path=args.checkpoints[0] / "vocab.json", info=info)
    print(f"wrote {args.out}: the mean of {len(args.checkpoints)} checkpoints' weights")
    return args.out


if __name__ == "__main__":
    main()
