"""The embedding store: every modality event encoded once by a frozen encoder, kept as fp16 on disk.

It is written by `mmehr encode` (`mmehr.modalities.encode`), one store per (modality, encoder):

```
OUT/
  settings.json          encoder, weights checksum, preprocessing, pooling: a rerun must match them
  shards/shard-K.f16     fp16 tokens of many events back to back, (n_tokens, d_enc) row-major
  parts/part-K.parquet   index rows of shard K, written after the shard is renamed into place: a shard
                         counts as done only once its part exists (its commit record)
  index.parquet          subject_id, time (µs), event_id, modality, encoder, shard, offset, length
                         (offset/length in tokens), sorted by subject_id, time
  skipped.parquet        events whose payload could not be read or encoded, with the reason
  manifest.json          written last: encoder, preprocessing, weights checksum, d_enc, counts
```

Readers never load the store: `EmbeddingStore(dir)` memory-maps the shards and keeps a per-subject
time-sorted index; `events_before(subject, t, k)` and the batched `fetch` return the most recent k
events strictly before t.

Size math for full MIMIC (fp16, d_enc = 768, so 1,536 bytes per token):

| modality / encoder          | events   | tokens per event     | store     | with --stride-pool 4    |
|-----------------------------|----------|----------------------|-----------|-------------------------|
| ECG, ECG-FM (2 x 5 s)       | ~800k    | 312                  | ~383 GB   | ~96 GB                  |
| ECG, CSFM                   | ~800k    | 1,201                | ~1.48 TB  | ~370 GB (S=10: ~149 GB) |
| CXR, BiomedCLIP / ViT-MAE   | ~377k    | 197                  | ~114 GB   | ~29 GB                  |
| notes, discharge (BERT)     | ~332k    | 512 (truncated)      | ~261 GB   | ~65 GB                  |
| notes, radiology (BERT)     | ~2.32M   | ~200 on average      | ~713 GB   | ~182 GB                 |

The weight-free baselines (d_enc = 128, 256 B per token) are small: ecg-patch 10 tokens (~2 GB for
all ECGs), cxr-patch 64 tokens (~6 GB for all CXRs), note-hash <= 257 tokens (<= ~175 GB for all notes).

So: encode only the cohort's events (`--only-subjects`, the subjects of the training/evaluation
windows), pool (`--stride-pool`) and cap tokens (`--max-tokens`) where the disk is small, or encode on
the fly where compute is cheaper than disk. A training batch of 16 windows x 3 modalities x K_m = 4
events reads at most 16 x 4 x (312 + 197 + 512) x 1,536 B ~ 100 MB from the page cache (~25 MB pooled
4x); `benchmarks/bench_encode.py` measures it.
"""

from __future__ import annotations

import functools
import hashlib
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import polars as pl

from mmehr.io import read_json, read_manifest, stage_of

INDEX_SCHEMA = {
    "subject_id": pl.Int64,
    "time": pl.Int64,
    "event_id": pl.String,
    "modality": pl.String,
    "encoder": pl.String,
    "shard": pl.Int32,
    "offset": pl.Int64,
    "length": pl.Int32,
    "skip_reason": pl.String,
}


# --------------------------------------------------------------------------------------------------
# Layout


def _shard_path(root: Path, k: int) -> Path:
    return root / "shards" / f"shard-{k:05d}.f16"


def _part_path(root: Path, k: int) -> Path:
    return root / "parts" / f"part-{k:05d}.parquet"


# --------------------------------------------------------------------------------------------------
# Reading


def read_store_manifest(root: str | Path) -> dict[str, Any]:
    """A finished store's manifest; a directory that is not a store, or a store without events, fails
    with an error naming it (a store of no events would read as if the modality were never there)."""
    root = Path(root)
    manifest = read_manifest(root)
    if stage_of(root) != "encode":
        what = f"a `mmehr {stage_of(root)}` output" if stage_of(root) else "not an `mmehr encode` output"
        hint = f"; encode it first: `mmehr encode --events {root} --encoder NAME --out STORE`"
        raise ValueError(
            f"{root} is {what}, not an embedding store{hint if stage_of(root) == 'index' else ''}"
        )
    if not manifest.get("counts", {}).get("events"):
        raise ValueError(f"{root}: the embedding store holds no events ({root / 'skipped.parquet'} says why)")
    return manifest


def settings_sha256(root: str | Path) -> str:
    """Checksum of a store's settings (encoder, its weights, preprocessing, pooling, width): two stores
    with the same checksum hold embeddings that mean the same."""
    path = Path(root) / "settings.json"
    if not path.is_file():
        raise ValueError(
            f"{root}: no settings.json, so what its embeddings mean is unknown (a store written before "
            "stores recorded their encoder settings, or not a store): encode it again with `mmehr encode`"
        )
    settings = read_json(path)
    return hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()


class EmbeddingStore:
    """Read side of a finished store: memory-mapped shards plus a per-subject, time-sorted index.

    `events_before(subject_id, time_us, k)` -> [(time_us, emb (N, d_enc) float16 view)], most recent
    first, strictly before `time_us`. `fetch(...)` does the same for a batch and pads.
    """

    def __init__(self, root: str | Path):
        self.root = Path(root)
        self.manifest = read_store_manifest(self.root)
        self.encoder, self.modality = self.manifest["encoder"], self.manifest["modality"]
        self.d_enc, self.n_prefix = int(self.manifest["d_enc"]), int(self.manifest["n_prefix"])
        idx = pl.read_parquet(
            self.root / "index.parquet", columns=["subject_id", "time", "shard", "offset", "length"]
        )
        idx = idx.sort("subject_id", "time", maintain_order=True)
        self.subject = idx["subject_id"].to_numpy()
        self.time = idx["time"].to_numpy()
        self.shard = idx["shard"].to_numpy()
        self.offset = idx["offset"].to_numpy()
        self.length = idx["length"].to_numpy()
        self.subject_ids, self._start = np.unique(self.subject, return_index=True)
        self._end = np.append(self._start[1:], len(self.subject))
        self._maps: dict[int, np.memmap] = {}

    def __len__(self) -> int:
        return len(self.subject)

    @functools.cached_property
    def event_ids(self) -> np.ndarray:
        """(len(self),) the event id of each row, in the store's (subject, time) order (read on first use)."""
        idx = pl.read_parquet(self.root / "index.parquet", columns=["subject_id", "time", "event_id"])
        return idx.sort("subject_id", "time", maintain_order=True)["event_id"].to_numpy()

    def _tokens(self, k: int) -> np.memmap:
        if k not in self._maps:
            self._maps[k] = np.memmap(_shard_path(self.root, k), dtype=np.float16, mode="r").reshape(
                -1, self.d_enc
            )
        return self._maps[k]

    def embedding(self, i: int) -> np.ndarray:
        """Tokens of index row i: (length, d_enc) float16, a view into the memory map."""
        o = self.offset[i]
        return self._tokens(int(self.shard[i]))[o : o + self.length[i]]

    def rows_before(self, subject_id: int, time_us: int, k: int) -> np.ndarray:
        """Index rows of the subject's last k events acquired strictly before time_us, most recent first."""
        s = np.searchsorted(self.subject_ids, subject_id)
        if s == len(self.subject_ids) or self.subject_ids[s] != subject_id or k <= 0:
            return np.zeros(0, dtype=np.int64)
        lo, hi = self._start[s], self._end[s]
        j = lo + np.searchsorted(self.time[lo:hi], time_us, side="left")  # equal times are not before
        return np.arange(j - 1, max(lo, j - k) - 1, -1)

    def count_between(self, subject_id: int, lo_us: int, hi_us: int) -> int:
        """How many of the subject's events were acquired at or after lo_us and strictly before hi_us."""
        s = np.searchsorted(self.subject_ids, subject_id)
        if s == len(self.subject_ids) or self.subject_ids[s] != subject_id or hi_us <= lo_us:
            return 0
        times = self.time[self._start[s] : self._end[s]]
        return int(np.searchsorted(times, hi_us, side="left") - np.searchsorted(times, lo_us, side="left"))

    def events_before(self, subject_id: int, time_us: int, k: int) -> list[tuple[int, np.ndarray]]:
        return [(int(self.time[i]), self.embedding(i)) for i in self.rows_before(subject_id, time_us, k)]

    def fetch(
        self, subject_ids: Sequence[int], times_us: Sequence[int], k: int, n_tokens: int | None = None
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """For each (subject, time): its last k events strictly before time, most recent first, padded.

        Returns emb (B, k, N, d_enc) float16, token_mask (B, k, N) bool, event_time (B, k) int64 µs,
        event_mask (B, k) bool. N = the longest event fetched, at most `n_tokens` (longer events truncated):
        a batch is never padded past its longest event, since every reader masks padding out (the demo's
        notes have up to 256 tokens, 95 on average)."""
        rows = [self.rows_before(int(s), int(t), k) for s, t in zip(subject_ids, times_us, strict=True)]
        longest = max((int(self.length[r].max()) for r in rows if len(r)), default=1)
        N = min(n_tokens, longest) if n_tokens else longest
        B = len(rows)
        emb = np.zeros((B, k, N, self.d_enc), dtype=np.float16)
        token_mask = np.zeros((B, k, N), dtype=bool)
        event_time = np.zeros((B, k), dtype=np.int64)
        event_mask = np.zeros((B, k), dtype=bool)
        for b, rr in enumerate(rows):
            for j, i in enumerate(rr):
                n = min(int(self.length[i]), N)
                emb[b, j, :n] = self.embedding(i)[:n]
                token_mask[b, j, :n] = True
                event_time[b, j] = self.time[i]
                event_mask[b, j] = True
        return emb, token_mask, event_time, event_mask
