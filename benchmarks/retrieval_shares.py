"""How often does a training token see other events than its own K_m most recent ones?

    python benchmarks/retrieval_shares.py --demo demo_out [--windows 400] [--k 4 1]

For the first `--windows` windows of the demo's training plan (seed 0, its block size), per modality and
K_m: the share of timeline tokens whose visible events (those the row carries, acquired strictly before
the token, at most k_visible of them where set) differ from the token's own K_m most recent events
acquired strictly before it, under each `data.media_retrieval`. Under "window" (the paper's retrieval)
a token loses the events that its window's later events push out of the K_m, so what it sees tells of
what follows it; under "token" the share is 0 by construction (tested). docs/experiments.md, "Which events
a token sees".
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np

from mmehr.data.timelines import TimelineStore
from mmehr.data.windows import TrainWindows
from mmehr.modalities.store import EmbeddingStore


def differing_share(windows: TrainWindows, name: str, n_windows: int, chunk: int = 16) -> tuple[float, int]:
    """(share of the windows' timeline tokens that see other events of `name` than their own K_m most
    recent, tokens counted)."""
    store, events = windows.store, windows.modality_stores[name]
    k = int(windows.k_max[name] if isinstance(windows.k_max, dict) else windows.k_max)
    rows = windows.plan(0)[:n_windows]
    P = store.static_len
    differ = tokens = 0
    for start in range(0, len(rows), chunk):
        part = rows[start : start + chunk]
        batch = windows.batch(part)
        m = batch.modalities[name]
        for r, (i, _s, _e) in enumerate(part):
            sid = int(store.subject_ids[i])
            carried = m.event_time[r][m.event_mask[r]].numpy()  # most recent first
            for t in batch.times[r, P : int(batch.lengths[r])].numpy():
                seen = carried[carried < t]
                if m.k_visible is not None:
                    seen = np.sort(seen)[::-1][: m.k_visible]
                own = events.time[events.rows_before(sid, int(t), k)]
                differ += set(seen.tolist()) != set(own.tolist())
                tokens += 1
    return differ / max(tokens, 1), tokens


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--demo", type=Path, required=True, help="a `mmehr demo` output directory")
    ap.add_argument("--windows", type=int, default=400)
    ap.add_argument("--k", type=int, nargs="+", default=[4, 1], help="K_m values to count")
    ap.add_argument("--block-size", type=int, default=256)
    args = ap.parse_args(argv)
    store = TimelineStore(args.demo / "timelines", "train")
    print("| modality | K_m | tokens | other events than their own K_m (window) | (token) |")
    print("|---|---|---|---|---|")
    for name in ("ecg", "cxr", "note"):
        events = EmbeddingStore(args.demo / "stores" / name)
        for k in args.k:
            shares = {}
            for mode in ("window", "token"):
                w = TrainWindows(
                    store, args.block_size, {name: events}, {name: k}, seed=0, media_retrieval=mode
                )
                shares[mode], n = differing_share(w, name, args.windows)
            print(f"| {name} | {k} | {n} | {shares['window']:.1%} | {shares['token']:.1%} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
