"""`benchmarks/bench_peers.py`: its ratios favour mmehr above 1 whichever way a measure points, and mmehr's
side of the comparison measures real tokens on the tokenized MIMIC-IV demo. (The peer's side needs its
own 1.6 GB virtualenv: `python benchmarks/bench_peers.py --out DIR` runs both.)"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))
import bench_peers


def test_ratios_are_above_one_when_mmehr_is_better():
    rate = bench_peers.pair("train", {"tokens_per_s": 300.0}, {"tokens_per_s": 100.0}, "tokens_per_s")
    assert rate["ratio_in_mmehrs_favour"] == pytest.approx(3.0)
    for cost in ("wall_s", "cpu_s", "peak_rss_mb"):
        row = bench_peers.pair("prep", {cost: 2.0}, {cost: 10.0}, cost)
        assert row["ratio_in_mmehrs_favour"] == pytest.approx(5.0)
    assert "ratio_in_mmehrs_favour" not in bench_peers.pair(
        "n", {"tokens": 5}, {"tokens": 7}, "tokens", ratio=False
    )


def test_mmehrs_side_trains_and_generates_on_the_demo(demo_timelines):
    train = bench_peers.mmehr_side(
        "train", demo_timelines, {"threads": 1, "batch": 2, "context": 32, "steps": 1}
    )
    assert train["tokens_per_step"] == 2 * 32 and train["vocab_size"] == 2588 and train["tokens_per_s"] > 0
    wider = bench_peers.mmehr_side(
        "train", demo_timelines, {"threads": 1, "batch": 2, "context": 32, "steps": 1, "vocab": 5000}
    )
    assert wider["vocab_size"] == 5000 and wider["parameters"] > train["parameters"] + (5000 - 2588) * 128 - 1
    gen = bench_peers.mmehr_side(
        "generate", demo_timelines, {"threads": 1, "batch": 3, "context": 16, "new": 5}
    )
    assert gen["generated_tokens"] == 3 * 5 and gen["context_tokens"] == 16 and gen["generated_tok_per_s"] > 0
