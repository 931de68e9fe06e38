"""Mean vs latent compression on the same data and seed: what reaches the compressor, what the latents do.

    python benchmarks/diagnose_compression.py --data demo_out --compression latent --out diag/latent.json
    python benchmarks/diagnose_compression.py --data demo_out --compression latent --latent-std 0.02 \
        --out diag/latent_002.json
    python benchmarks/diagnose_compression.py --data demo_out --compression mean --out diag/mean.json

`--data` is a `make demo` output (its `timelines/` and `stores/`). Trains `configs/demo.yaml` with the
notes only for `--steps` steps and logs every 25 steps: the loss, the gradient norms reaching the
compressor and the cross-attention block (before clipping), the gates, the latents' attention over the
media tokens (entropy / log N: 1 is uniform), the k compressed tokens' mean pairwise cosine (1: k copies
of one), and how much the compressed tokens vary across events (0: the media are ignored). Then the
validation loss. This is how the latents' initialisation was chosen (docs/architecture.md).
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

import torch

from mmehr.config import apply_overrides, load_yaml
from mmehr.data.windows import iterate_micro_batches
from mmehr.runconfig import resolve_config
from mmehr.train import Trainer

ROOT = Path(__file__).resolve().parents[1]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", type=Path, required=True, help="a make demo output directory")
    ap.add_argument("--compression", choices=["mean", "latent"], required=True)
    ap.add_argument("--out", type=Path, required=True, help="JSON log; its stem names the run directory")
    ap.add_argument("--steps", type=int, default=500)
    ap.add_argument(
        "--latent-std", type=float, help="re-initialise the latents at this std (default: as built)"
    )
    ap.add_argument("overrides", nargs="*", help="extra key=value config overrides")
    args = ap.parse_args(argv)
    torch.set_num_threads(1)

    raw = load_yaml(ROOT / "configs" / "demo.yaml")
    apply_overrides(
        raw,
        [
            f"data.timelines={args.data / 'timelines'}",
            *(f"data.modalities.{m}.store={args.data / 'stores' / m}" for m in ("ecg", "cxr", "note")),
            "data.modalities.ecg.enabled=false",
            "data.modalities.cxr.enabled=false",
            f"model.fusion.modalities.note.compression={args.compression}",
            f"optim.max_steps={args.steps}",
            "run.eval_every=0",
            "run.checkpoint_every=0",
            *args.overrides,
        ],
    )
    cfg = resolve_config(raw)
    run_dir = args.out.with_suffix("")
    if run_dir.exists():
        sys.exit(f"{run_dir} exists: choose another --out (this script never overwrites a run)")
    trainer = Trainer(cfg, run_dir, progress=False)
    model = trainer.raw
    comp = model.fusion.compressors["note"]
    block = next(iter(model.fusion.xattn.values()))
    if args.latent_std is not None:
        with torch.no_grad():
            comp.latents.normal_(0.0, args.latent_std)

    stats: dict[str, float] = {}

    def perceiver_attention(mod, inputs, _output) -> None:
        """Recompute the latents' attention over [media, latents] from the layer's inputs."""
        latents, media, mask = inputs
        with torch.no_grad():
            E, k, D = latents.shape
            nh, hs = mod.n_head, D // mod.n_head
            lat = mod.ln(latents)
            q = mod.q(lat).view(E, k, nh, hs).transpose(1, 2) / math.sqrt(hs)
            lat_k = mod.kv(lat).view(E, k, 2, nh, hs).permute(2, 0, 3, 1, 4)[0]
            on_media = media.scores(q).masked_fill(~mask[:, None, None, :], float("-inf"))
            p = torch.cat([on_media, q @ lat_k.transpose(-1, -2)], -1).softmax(-1)[..., : on_media.shape[-1]]
            stats["media_mass"] = p.sum(-1).mean().item()
            p = p / p.sum(-1, keepdim=True).clamp(min=1e-9)
            entropy = -(p * (p + 1e-12).log()).sum(-1)
            stats["entropy_ratio"] = (
                (entropy / mask.sum(-1).float().clamp(min=2).log()[:, None, None]).mean().item()
            )

    def compressed(_mod, _inputs, output) -> None:
        x = output[0].detach().float()
        flat = x.reshape(-1, x.shape[-2], x.shape[-1])  # (events, k, D)
        if flat.shape[1] > 1:
            unit = torch.nn.functional.normalize(flat, dim=-1)
            k = flat.shape[1]
            stats["pairwise_cos"] = (
                (((unit @ unit.transpose(-1, -2)).sum((-1, -2)) - k) / (k * (k - 1))).mean().item()
            )
        stats["across_event_std"] = flat.std(0).mean().item()

    if args.compression == "latent":
        for attn, _ in comp.layers:
            attn.register_forward_hook(perceiver_attention)
    comp.register_forward_hook(compressed)

    def norm(module: torch.nn.Module) -> float:
        return math.sqrt(sum(float(p.grad.norm()) ** 2 for p in module.parameters() if p.grad is not None))

    clip = torch.nn.utils.clip_grad_norm_

    def recording_clip(params, max_norm, *a, **kw):
        stats["grad_compressor"], stats["grad_xattn"] = norm(comp), norm(block)
        return clip(params, max_norm, *a, **kw)

    torch.nn.utils.clip_grad_norm_ = recording_clip
    o = cfg.optim
    batches = iterate_micro_batches(trainer.train_windows, o.batch_size, o.grad_accum, 0)
    trainer.module.train()
    log, t0 = [], time.time()
    for step in range(args.steps):
        loss = trainer.train_step(batches)
        if step % 25 == 0 or step == args.steps - 1:
            gates = list(model.gate_values().values())
            row = {"step": step, "loss": round(loss, 4), **{k: round(v, 5) for k, v in stats.items()}}
            row |= {"gates": [round(g, 4) for g in gates], "seconds": round(time.time() - t0, 1)}
            log.append(row)
            print(json.dumps(row), flush=True)
    val = trainer.validate()
    print("validation loss", val)
    args.out.write_text(json.dumps({"log": log, "val": val, "args": sys.argv[1:]}, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
