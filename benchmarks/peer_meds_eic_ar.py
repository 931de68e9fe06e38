"""MEDS_EIC_AR's side of `bench_peers.py`: run by the peer's own virtualenv (it imports MEDS_EIC_AR and
meds_torchdata, never mmehr). Prints one JSON line.

    python peer_meds_eic_ar.py train    DATA_DIR '{"threads": 1, "batch": 16, "context": 512, ...}'
    python peer_meds_eic_ar.py generate DATA_DIR '{"threads": 1, "batch": 32, "context": 512, "new": 256}'
    python peer_meds_eic_ar.py count    INTERMEDIATE_DIR '{}'

DATA_DIR is `MEICAR_process_data`'s output. The model is the peer's own `MEDS_EIC_AR.model.Model` (a
Llama decoder from transformers) at 2 layers, 4 heads x 32 = 128 wide, FFN 512, fp32 ("32-true", as its
CPU configs use); batches come from its own `MEDSPytorchDataset` loader.
- train: the fastest of `steps` optimizer steps (its forward with its loss, backward, AdamW) on one
  batch of `batch` windows of up to `context` tokens (its pretraining sampling; real = non-padding tokens);
- generate: its `Model.generate` (HF `generate` with a KV cache, untruncated sampling) continuing the last
  `context` tokens of `batch` training subjects (left-padded, as its generation config does) by `new`
  tokens; `min_new_tokens` keeps every row generating to the end, as mmehr's side forces too.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path


def model(vocab: int, eos: int, positions: int):
    from MEDS_EIC_AR.model import Model

    kwargs = {"num_hidden_layers": 2, "num_attention_heads": 4, "hidden_size": 128, "intermediate_size": 512,
              "max_position_embeddings": positions, "vocab_size": vocab, "eos_token_id": eos}  # fmt: skip
    return Model(kwargs, precision="32-true")


def dataset(data: str, context: int, strategy: str, padding: str):
    from meds_torchdata import MEDSPytorchDataset, MEDSTorchDataConfig

    cfg = MEDSTorchDataConfig(tensorized_cohort_dir=data, max_seq_len=context, seq_sampling_strategy=strategy,
                              padding_side=padding, static_inclusion_mode="omit")  # fmt: skip
    return MEDSPytorchDataset(cfg, "train")


def train(data: str, p: dict) -> dict:
    import torch
    from MEDS_EIC_AR.generation.utils import get_timeline_end_token_idx

    torch.manual_seed(0)
    ds = dataset(data, p["context"], "random", "right")
    loader = torch.utils.data.DataLoader(ds, batch_size=p["batch"], shuffle=True, collate_fn=ds.collate,
                                         generator=torch.Generator().manual_seed(0))  # fmt: skip
    batches = [b for _, b in zip(range(8), loader)]
    batch = max(batches, key=lambda b: int((b.code != b.PAD_INDEX).sum()))  # the fullest, as mmehr's side
    m = model(ds.config.vocab_size, get_timeline_end_token_idx(ds.config), p["context"]).train()
    opt = torch.optim.AdamW(m.parameters(), lr=1e-3)

    def step() -> None:
        loss, _ = m(batch)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    step()
    seconds = []
    for _ in range(p["steps"]):
        t0 = time.perf_counter()
        step()
        seconds.append(time.perf_counter() - t0)
    tokens = int((batch.code != batch.PAD_INDEX).sum())
    return {"tokens_per_step": tokens, "padded_tokens_per_step": batch.code.numel(), "step_s": min(seconds),
            "tokens_per_s": tokens / min(seconds), "vocab_size": ds.config.vocab_size,
            "parameters": sum(q.numel() for q in m.parameters())}  # fmt: skip


def generate(data: str, p: dict) -> dict:
    import torch
    from MEDS_EIC_AR.generation.utils import get_timeline_end_token_idx

    torch.manual_seed(0)
    ds = dataset(data, p["context"], "to_end", "left")
    batch = ds.collate([ds[i] for i in range(p["batch"])])
    m = model(ds.config.vocab_size, get_timeline_end_token_idx(ds.config), p["context"] + p["new"]).eval()
    L = batch.code.shape[1]
    with torch.no_grad():
        m.generate(batch, do_sample=True, min_new_tokens=m.max_seq_len - L)  # warm-up
        best = float("inf")
        for _ in range(p.get("rounds", 2)):
            t0 = time.perf_counter()
            out = m.generate(batch, do_sample=True, min_new_tokens=m.max_seq_len - L)
            best = min(best, time.perf_counter() - t0)
    if out.shape != (p["batch"], m.max_seq_len - L):
        raise AssertionError(f"generated {tuple(out.shape)}, expected ({p['batch']}, {m.max_seq_len - L})")
    return {
        "context_tokens": L,
        "generated_tokens": out.numel(),
        "seconds": best,
        "generated_tok_per_s": out.numel() / best,
    }


def count(intermediate: str, p: dict) -> dict:
    """Tokens of the processed demo: one per timed measurement of the pipeline's final MEDS data."""
    import polars as pl

    files = sorted(Path(intermediate, "data").glob("*/*.parquet"))
    df = pl.concat([pl.read_parquet(f, columns=["subject_id", "time"]) for f in files])
    return {"tokens": df.filter(pl.col("time").is_not_null()).height, "subjects": df["subject_id"].n_unique()}


if __name__ == "__main__":
    kind, path, params = sys.argv[1], sys.argv[2], json.loads(sys.argv[3])
    import torch

    torch.set_num_threads(params.get("threads", 1))
    print(json.dumps({"train": train, "generate": generate, "count": count}[kind](path, params)))
