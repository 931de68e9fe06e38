"""A subject's modality events around one prediction, and what the model could see of each.

At the prediction time t, an event of an enabled modality is
    visible        one of the K_m most recent acquired strictly before t: in the context, attended to;
    masked         acquired at or after t: never retrieved, never attended to (the strict time mask);
    not retrieved  acquired before t but older than the K_m most recent;
    hidden         of a modality the evaluation hid.
Events come from each modality's embedding store (its index: subject, time, event_id), their metadata and
payloads from the `mmehr index` directory the store was encoded from. A note's text is read only to
measure it, and kept only for a page written with --show-text: it is never logged.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import polars as pl

from mmehr.data.windows import ModalitySource
from mmehr.modalities.payloads import EventPayloads
from mmehr.modalities.sources import load_payload
from mmehr.modalities.store import EmbeddingStore

STATUSES = ("visible", "masked", "not retrieved", "hidden")
MAX_EVENTS = 40  # listed per page: every visible one, then those nearest the prediction time


@dataclass
class ModalityEvent:
    """One event as the page shows it. slot: its place among the context's events of its modality (0 =
    most recent), None when not in the context; attention: {layer: mass at the prediction-time token}."""

    modality: str
    event_id: str
    time: int
    status: str
    slot: int | None = None
    meta: dict[str, Any] = field(default_factory=dict)
    attention: dict[int, float] = field(default_factory=dict)
    payload: Any = None  # ECG (signal (12, n), fs), CXR image (H, W) uint8, note text; never serialised
    payload_error: str | None = None

    def record(self) -> dict[str, Any]:
        """What explain.json keeps of it (no payload, never a note's text)."""
        return {
            "modality": self.modality,
            "event_id": self.event_id,
            "time_us": self.time,
            "status": self.status,
            "slot": self.slot,
            "attention": {str(k): v for k, v in self.attention.items()},
            **self.meta,
            **({"payload_error": self.payload_error} if self.payload_error else {}),
        }


def _store_of(source: ModalitySource) -> EmbeddingStore:
    return source.store if isinstance(source, EventPayloads) else source


def events_dir_of(source: ModalitySource, configured: str | None = None) -> Path | None:
    """The `mmehr index` directory a store was encoded from (the run's config may name another)."""
    if isinstance(source, EventPayloads):
        return source.events_dir
    where = configured or _store_of(source).manifest.get("events_dir")
    return Path(where) if where and Path(where).is_dir() else None


def subject_events(
    sources: dict[str, ModalitySource],
    subject_id: int,
    prediction_us: int,
    k_max: dict[str, int] | int,
    *,
    start_us: int,
    end_us: int,
    hidden: tuple[str, ...] = (),
    events_dirs: dict[str, str] | None = None,
) -> list[ModalityEvent]:
    """The subject's events of every modality in `sources` acquired in [start_us, end_us], and every
    event the context retrieved (whenever acquired), each with its status at `prediction_us`."""
    out: list[ModalityEvent] = []
    for name, source in sources.items():
        store = _store_of(source)
        k = int(k_max[name] if isinstance(k_max, dict) else k_max)
        index = pl.read_parquet(store.root / "index.parquet", columns=["subject_id", "time", "event_id"])
        index = index.sort("subject_id", "time", maintain_order=True)  # row numbers as the store's
        retrieved = [] if name in hidden else store.rows_before(subject_id, prediction_us, k).tolist()
        slot_of = {int(r): s for s, r in enumerate(retrieved)}
        rows = index.with_row_index("row").filter(pl.col("subject_id") == subject_id)
        for r in rows.iter_rows(named=True):
            t, row = int(r["time"]), int(r["row"])
            if row not in slot_of and not start_us <= t <= end_us:
                continue
            if name in hidden:
                status = "hidden"
            elif row in slot_of:
                status = "visible"
            elif t >= prediction_us:
                status = "masked"
            else:
                status = "not retrieved"
            out.append(ModalityEvent(name, r["event_id"], t, status, slot_of.get(row)))
        _attach_payloads(out, name, events_dir_of(source, (events_dirs or {}).get(name)))
    out.sort(key=lambda e: (e.time, e.modality, e.event_id))
    if len(out) > MAX_EVENTS:
        keep = sorted(out, key=lambda e: (e.status != "visible", abs(e.time - prediction_us)))[:MAX_EVENTS]
        out = sorted(keep, key=lambda e: (e.time, e.modality, e.event_id))
    return out


def _attach_payloads(events: list[ModalityEvent], modality: str, events_dir: Path | None) -> None:
    """Metadata and payload of each event of `modality` from its events directory (where there is one)."""
    mine = [e for e in events if e.modality == modality]
    if not mine:
        return
    if events_dir is None or not (events_dir / "events.parquet").is_file():
        for e in mine:
            e.payload_error = "its events directory (mmehr index) is not at hand"
        return
    table = pl.read_parquet(events_dir / "events.parquet").filter(
        pl.col("event_id").is_in([e.event_id for e in mine])
    )
    rows = {r["event_id"]: r for r in table.iter_rows(named=True)}
    for e in mine:
        row = rows.get(e.event_id)
        if row is None:
            e.payload_error = f"not in {events_dir / 'events.parquet'}"
            continue
        try:
            e.payload = load_payload(events_dir, row)
        except (OSError, ValueError, KeyError) as err:  # a moved or damaged file: say so on the page
            e.payload_error = f"{type(err).__name__}: {err}"
        e.meta = _meta(modality, row, e.payload)


def _meta(modality: str, row: dict[str, Any], payload: Any) -> dict[str, Any]:
    if modality == "ecg":
        return {"fs": row.get("fs"), "n_samples": row.get("n_samples")}
    if modality == "cxr":
        return {
            "view_position": row.get("view_position"),
            "rows": row.get("rows"),
            "columns": row.get("columns"),
        }
    if modality == "note":
        text = payload if isinstance(payload, str) else ""
        return {
            "note_type": row.get("note_type"),
            "characters": len(text),
            "words": len(re.findall(r"\S+", text)),
        }
    return {}


def lead_ii(payload: Any) -> tuple[np.ndarray, float] | None:
    """An ECG payload's lead II (canonical order I, II, III, ...) and its sampling rate."""
    if not isinstance(payload, tuple) or len(payload) != 2:
        return None
    signal, fs = payload
    signal = np.asarray(signal)
    return (signal[1], float(fs)) if signal.ndim == 2 and signal.shape[0] >= 2 else None
