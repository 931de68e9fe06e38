"""The Perceiver's media keys/values projected once vs folded into the latents' queries, side by side.

    python benchmarks/ab_fold.py [T]      (default T=512)

bench_model's cases (4 x 256 decoder, batch 2, one modality with K_m = 4 events of N tokens, k = 8, l = 4):
EHR-only, latent at N = 512 and 2048 with `fold_media_kv` off and on, and `none` at N = 2048, all built in
ONE process and stepped round-robin on one thread; each case's fastest step in CPU seconds.
"""

from __future__ import annotations

import sys
import time

import torch

import bench_model as bm
from mmehr.model.compression import PerceiverResampler


def main(T: int) -> None:
    torch.set_num_threads(1)
    cases = [("ehr_only", 0, None), ("latent", 512, False), ("latent", 512, True), ("latent", 2048, False),
             ("latent", 2048, True), ("none", 2048, None)]  # fmt: skip
    steps = []
    for mode, N, fold in cases:
        step, _ = bm._build(dict(bm.MODEL, mode=mode, T=T, N=N))
        for m in step.model.modules():
            if isinstance(m, PerceiverResampler) and fold is not None:
                m.fold_media_kv = fold
        step()
        steps.append(step)
    best = [float("inf")] * len(cases)
    for _ in range(4):
        for i, step in enumerate(steps):
            t0 = time.process_time()
            step()
            best[i] = min(best[i], time.process_time() - t0)
    ehr = best[0]
    for (mode, N, fold), b in zip(cases, best):
        print(f"T={T} {mode:8s} N={N:4d} fold={fold!s:5s} step {b:.3f} s  x{b / ehr:.3f} of EHR-only")
    for i, label in ((3, "projected"), (4, "folded")):
        print(
            f"N=2048, {label}: none/latent step {best[5] / best[i]:.2f}x, added cost {(best[5] - ehr) / (best[i] - ehr):.2f}x"
        )


if __name__ == "__main__":
    main(int(sys.argv[1]) if len(sys.argv) > 1 else 512)
