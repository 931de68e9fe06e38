"""Raw payloads of a store's events, for encoders that run inside the model (finetuning).

`EventPayloads(store_dir, encoder)` serves the same events as the `EmbeddingStore` at `store_dir`, retrieved
by the same rule (`EmbeddingStore.rows_before`: a subject's K most recent events strictly before a time),
but as the encoder's prepared inputs instead of stored embeddings:

    fetch(subject_ids, times_us, k) -> ModalityInputs(emb=None, token_mask=None, event_time (B, k),
                                                       event_mask (B, k), payload: name -> (B, k, ...))

Payloads come from the events directory the store was encoded from (its manifest's `events_dir`, or the
one given): note text from `events.parquet`, ECG and CXR files through `load_payload` (as `mmehr encode`
reads them; another reader can be given, with `encode_events`' signature). Each event is read
and prepared (`encoder.check_payload`, then `encoder.prepare([payload])`: token ids, pixels, segments)
once, on first use, and kept in an in-memory cache of at most `cache_bytes`, least recently used out first:
note token ids take a few hundred bytes each, so a cohort's notes stay cached; a 224 x 224 CXR takes 600 kB
and an ECG-FM record 240 kB. Prepared tensors that differ in length between events (token ids) are padded
to the longest of the batch with the encoder's pad values (`FrozenEncoder.payload_pad`), absent slots too.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import polars as pl
import torch

from mmehr.batch import ModalityInputs
from mmehr.modalities.encode import load_event_payload, read_events
from mmehr.modalities.encoders import FrozenEncoder
from mmehr.modalities.store import EmbeddingStore


class EventPayloads:
    """Prepared payloads of the events of the embedding store at `store_dir` (see the module docstring)."""

    def __init__(
        self,
        store_dir: str | Path,
        encoder: FrozenEncoder,
        events_dir: str | Path | None = None,
        *,
        cache_bytes: int = 2 << 30,
        load_payload: Callable[[Path, dict[str, Any]], Any] | None = None,
    ):
        self.store = EmbeddingStore(store_dir)
        self.root, self.encoder, self.modality = self.store.root, encoder, encoder.modality
        if self.store.modality != encoder.modality:
            raise ValueError(f"{self.root} holds {self.store.modality} events, not {encoder.modality}")
        where = events_dir or self.store.manifest.get("events_dir")
        if not where:
            raise ValueError(
                f"{self.root}/manifest.json does not say which events directory it was encoded from; give it "
                "(data.modalities.<m>.events) to read the payloads of a finetuned encoder"
            )
        self.events_dir = Path(where)
        index = pl.read_parquet(self.root / "index.parquet", columns=["subject_id", "time", "event_id"])
        index = index.sort("subject_id", "time", maintain_order=True)  # the EmbeddingStore's row order
        if not (
            np.array_equal(index["subject_id"].to_numpy(), self.store.subject)
            and np.array_equal(index["time"].to_numpy(), self.store.time)
        ):
            raise ValueError(f"{self.root}/index.parquet changed while it was read")
        events = read_events(self.events_dir, encoder.modality).with_row_index("_row")
        rows = index.select("event_id").join(events, on="event_id", how="left", maintain_order="left")
        lost = rows.filter(pl.col("_row").is_null())["event_id"]
        if len(lost):
            raise ValueError(
                f"{self.events_dir}/events.parquet lacks {len(lost)} event(s) of the store {self.root}, e.g. "
                f"{lost[:3].to_list()}; was the store encoded from another events directory?"
            )
        self.rows = rows.drop("_row")
        self.cache_bytes, self.load_payload = cache_bytes, load_payload or load_event_payload
        self._cache: OrderedDict[int, dict[str, np.ndarray]] = OrderedDict()
        self._cached_bytes = 0

    def __len__(self) -> int:
        return len(self.store)

    def prepared(self, i: int) -> dict[str, np.ndarray]:
        """Event i's prepared tensors, without the batch dimension (cached)."""
        hit = self._cache.get(i)
        if hit is not None:
            self._cache.move_to_end(i)
            return hit
        row = self.rows.row(i, named=True)
        try:
            payload = self.encoder.check_payload(self.load_payload(self.events_dir, row))
        except (OSError, ValueError, KeyError) as e:
            raise ValueError(
                f"{self.events_dir}: event {row['event_id']} (in store {self.root}) cannot be read for the "
                f"finetuned encoder {self.encoder.name}: {e}"
            ) from e
        tensors = {k: v[0].numpy() for k, v in self.encoder.prepare([payload]).items()}
        size = sum(a.nbytes for a in tensors.values())
        if size <= self.cache_bytes:
            self._cache[i] = tensors
            self._cached_bytes += size
            while self._cached_bytes > self.cache_bytes:
                _, old = self._cache.popitem(last=False)
                self._cached_bytes -= sum(a.nbytes for a in old.values())
        return tensors

    def fetch(self, subject_ids: Sequence[int], times_us: Sequence[int], k: int) -> ModalityInputs:
        """For each (subject, time): its last k events strictly before time, most recent first, as
        `ModalityInputs` with `payload` (B, k, ...) tensors; absent slots are padding, event_mask False."""
        rows = [self.store.rows_before(int(s), int(t), k) for s, t in zip(subject_ids, times_us, strict=True)]
        B = len(rows)
        event_time = np.zeros((B, k), dtype=np.int64)
        event_mask = np.zeros((B, k), dtype=bool)
        items: dict[tuple[int, int], dict[str, np.ndarray]] = {}
        for b, rr in enumerate(rows):
            for j, i in enumerate(rr):
                items[b, j] = self.prepared(int(i))
                event_time[b, j], event_mask[b, j] = self.store.time[i], True
        if not items:  # no event in the whole batch: one template gives the shapes
            items[0, 0] = self.prepared(0) if len(self) else {}
        payload = {}
        for key in next(iter(items.values())):
            arrays = [t[key] for t in items.values()]
            shape = tuple(max(a.shape[d] for a in arrays) for d in range(arrays[0].ndim))
            out = np.full((B, k, *shape), self.encoder.payload_pad.get(key, 0), dtype=arrays[0].dtype)
            for (b, j), t in items.items():
                if event_mask[b, j]:
                    out[(b, j, *(slice(0, n) for n in t[key].shape))] = t[key]
            payload[key] = torch.from_numpy(out)
        return ModalityInputs(
            emb=None,
            token_mask=None,
            event_time=torch.from_numpy(event_time),
            event_mask=torch.from_numpy(event_mask),
            payload=payload,
        )
