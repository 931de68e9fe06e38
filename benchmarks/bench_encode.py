"""Encoding throughput per frozen encoder (events/s on this machine's CPU) and embedding-store read
latency for one training batch.

Encoders: minilm with its real weights; the weight-free baselines; the pretrained architectures at
their real sizes with random weights (throughput does not depend on the weight values), a few events
each. `store ...` rows time the whole `encode_events` pipeline (payload, encode, fp16 shards, index).
`read ...` rows time `EmbeddingStore.fetch` for 16 windows x K_m = 4 events per modality from stores
of real token shapes (d_enc 768) held in the page cache.
"""

from __future__ import annotations

import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import polars as pl
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import Timer
from mmehr.io import write_json
from mmehr.modalities.encode import ShardWriter, encode_events, finalise_store
from mmehr.modalities.encoders import get_encoder
from mmehr.modalities.store import EmbeddingStore

WORDS = [
    "patient",
    "admitted",
    "with",
    "chest",
    "pain",
    "troponin",
    "elevated",
    "ecg",
    "shows",
    "sinus",
    "rhythm",
    "no",
    "acute",
    "distress",
    "lungs",
    "clear",
]


def notes(n: int, words: int, seed: int = 0) -> list[str]:
    rng = np.random.default_rng(seed)
    return [" ".join(rng.choice(WORDS, size=words)) for _ in range(n)]


def ecgs(n: int, seed: int = 0) -> list[tuple[np.ndarray, float]]:
    """10-s 12-lead ECGs at 500 Hz: a few neurokit2 simulations, repeated with noise."""
    import neurokit2 as nk

    rng = np.random.default_rng(seed)
    base = [nk.ecg_simulate(duration=10, sampling_rate=500, method="multileads", heart_rate=hr, random_state=i)
            .to_numpy().T.astype(np.float32) for i, hr in enumerate((60, 95, 130))]  # fmt: skip
    return [
        (base[i % 3] + 0.02 * rng.standard_normal(base[0].shape).astype(np.float32), 500.0) for i in range(n)
    ]


def cxrs(n: int, shape=(2500, 2000), seed: int = 0) -> list[np.ndarray]:
    """Chest-X-ray-sized grayscale images (MIMIC-CXR-JPG is ~2500 x 3000)."""
    rng = np.random.default_rng(seed)
    return [rng.integers(0, 256, shape, dtype=np.uint8) for _ in range(n)]


def throughput(name: str, payloads: list, batch_size: int, **kw) -> dict:
    with Timer() as build:
        enc = get_encoder(name, **kw)
    enc.encode(payloads[:1])  # warm-up (lazy imports, allocator)
    tokens = 0
    with Timer() as t:
        for i in range(0, len(payloads), batch_size):
            _, mask = enc.encode(payloads[i : i + batch_size])
            tokens += int(mask.sum())
    n = len(payloads)
    return {
        "case": f"encode {name}" + (" (real size, random weights)" if kw.get("random_init") else ""),
        "events": n, "batch": batch_size, "events_per_s": n / t.seconds, "ms_per_event": 1000 * t.seconds / n,
        "tokens_per_event": tokens / n, "d_enc": enc.d_enc, "fp16_kb_per_event": tokens / n * enc.d_enc * 2 / 1024,
        "build_s": build.seconds, "torch_threads": torch.get_num_threads(),
    }  # fmt: skip


def store_pipeline(tmp: Path, name: str, texts: list[str]) -> dict:
    """The whole `encode_events` pipeline on note events that carry their text."""
    events = tmp / f"events-{name}"
    events.mkdir()
    pl.DataFrame({
        "subject_id": np.arange(len(texts)) // 10, "time": 1_700_000_000_000_000 + np.arange(len(texts)) * 1_000_000,
        "modality": "note", "event_id": [f"n{i}" for i in range(len(texts))], "payload": "-", "text": texts,
    }).write_parquet(events / "events.parquet")  # fmt: skip
    write_json(events / "manifest.json", {"source": "bench"})
    enc = get_encoder(name)
    with Timer() as t:
        m = encode_events(events, enc, tmp / f"store-{name}", batch_size=64, progress=False)
    return {"case": f"store encode_events {name}", "events": len(texts), "events_per_s": len(texts) / t.seconds,
            "fp16_kb_per_event": m["counts"]["bytes"] / len(texts) / 1024}  # fmt: skip


def synthetic_store(
    root: Path, subjects: int, per_subject: int, lengths: tuple[int, int], d: int = 768
) -> None:
    """A store of random fp16 embeddings with real token shapes, written by the real shard writer."""
    rng = np.random.default_rng(0)
    settings = {"encoder": "synthetic", "modality": "x", "weights_checksum": "-", "preprocessing": {}, "d_enc": d,
                "n_prefix": 0, "dtype": "float16", "stride_pool": 1, "token_limit": None, "max_tokens": lengths[1]}  # fmt: skip
    root.mkdir(parents=True)
    with ShardWriter(root, 0, d, encoder="synthetic", modality="x") as shard:
        for s in range(subjects):
            for j in range(per_subject):
                n = int(rng.integers(lengths[0], lengths[1] + 1))
                event = {"subject_id": s, "time": j * 3_600_000_000, "event_id": f"{s}-{j}"}
                shard.add(event, rng.standard_normal((n, d)).astype(np.float16))
    finalise_store(root, settings)


def read_latency(tmp: Path, quick: bool) -> list[dict]:
    shapes = {"ecg (ECG-FM 312)": (312, 312), "cxr (ViT 197)": (197, 197), "note (BERT 64-512)": (64, 512)}
    subjects, per_subject, B, k = (24, 6, 16, 4) if quick else (64, 8, 16, 4)
    stores = {}
    for i, (name, lengths) in enumerate(shapes.items()):
        synthetic_store(tmp / f"read-{i}", subjects, per_subject, lengths)
        stores[name] = EmbeddingStore(tmp / f"read-{i}")
    rng = np.random.default_rng(1)
    rows, total = [], np.zeros(0)
    reps = 10 if quick else 50
    for name, store in stores.items():
        times, mb = [], 0.0
        for r in range(reps + 2):
            sids = rng.choice(subjects, size=B, replace=False)
            at = rng.integers(per_subject // 2, per_subject + 1, size=B) * 3_600_000_000
            t0 = time.perf_counter()
            emb, *_ = store.fetch(sids, at, k)
            if r >= 2:  # the first batches fault the pages in
                times.append(time.perf_counter() - t0)
                mb = max(mb, emb.nbytes / 1e6)
        times = np.array(times)
        total = times if total.size == 0 else total + times
        rows.append({"case": f"read fetch {name}", "windows": B, "k": k, "ms_median": 1000 * np.median(times),
                     "ms_p95": 1000 * np.percentile(times, 95), "batch_mb": mb})  # fmt: skip
    rows.append({"case": "read fetch 3 modalities", "windows": B, "k": k, "ms_median": 1000 * np.median(total),
                 "ms_p95": 1000 * np.percentile(total, 95)})  # fmt: skip
    return rows


def run(quick: bool) -> list[dict]:
    n_small = 64 if quick else 512
    rows = [
        throughput("note-hash", notes(4 * n_small, 150), 64),
        throughput("ecg-patch", ecgs(n_small), 64),
        throughput("cxr-patch", cxrs(n_small // 8), 32),
        throughput("minilm", notes(32 if quick else 128, 150), 32),
    ]
    few = 2 if quick else 4
    rows += [
        throughput("bert", notes(few, 600), few, random_init=True),  # biomedbert: the same architecture
        throughput("vit-mae", cxrs(few), few, random_init=True),
        throughput("biomedclip", cxrs(few), few, random_init=True),
        throughput("ecg-fm", ecgs(few), few, random_init=True),
        throughput("csfm", ecgs(few), few, random_init=True),
    ]
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        rows.append(store_pipeline(tmp, "note-hash", notes(4 * n_small, 150)))
        rows += read_latency(tmp, quick)
    return rows
