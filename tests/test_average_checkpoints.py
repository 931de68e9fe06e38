"""benchmarks/average_checkpoints.py: the mean of one run's checkpoints, and a refusal of what does not
belong together."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))
from average_checkpoints import main
from mmehr.checkpoint import load_model, read_weights, save_checkpoint, step_checkpoints


def test_the_mean_of_a_runs_checkpoints_loads_and_refuses_other_runs(fast_demo_out: Path, tmp_path: Path):
    runs = fast_demo_out / "experiments" / "runs"
    last = step_checkpoints(runs / "all_three" / "seed0" / "train")[-1]
    model, config = load_model(last)
    with torch.no_grad():  # another state of the same run
        for p in model.parameters():
            p.add_(torch.randn_like(p), alpha=0.01)
    first = save_checkpoint(tmp_path / "other", model, config, vocab_path=last / "vocab.json")
    out = main([str(first), str(last), "--out", str(tmp_path / "mean")])
    model, _ = load_model(out)
    a, b = read_weights(first), read_weights(last)
    assert any(not torch.equal(a[k], b[k]) for k in a)  # two different states
    for name, p in model.state_dict().items():
        key = "lm_head.weight" if name == "transformer.wte.weight" else name  # tied, stored once
        assert torch.allclose(p, (a[key] + b[key]) / 2, atol=1e-7)
    assert model.transformer.wte.weight is model.lm_head.weight
    with pytest.raises(SystemExit):  # nothing is replaced
        main([str(first), str(last), "--out", str(out)])
    other = step_checkpoints(runs / "ehr_only" / "seed0" / "train")[-1]
    with pytest.raises(ValueError, match="hold different parameters"):
        main([str(last), str(other), "--out", str(tmp_path / "mixed")])
    config.run.seed += 1  # the same shapes from another seed: another run
    seeded = save_checkpoint(tmp_path / "seeded", model, config, vocab_path=last / "vocab.json")
    with pytest.raises(ValueError, match=r"other settings: run\.seed"):
        main([str(last), str(seeded), "--out", str(tmp_path / "mixed")])
    assert not (tmp_path / "mixed").exists()
