"""`mmehr encode`: encode every event of one modality once with a frozen encoder into an embedding store.

`mmehr encode --events DIR --encoder NAME --out DIR` writes one store per (modality, encoder); its
layout, its reader (`EmbeddingStore`) and its size on full MIMIC are in `mmehr.modalities.store`.

Encoding is resumable: an interrupted run (exception, Ctrl-C, SIGKILL) leaves finished shards and at
most one unfinished `.partial` file; a rerun deletes the unfinished file, skips every event of a
finished shard and encodes the rest into new shards, so no event is lost or stored twice. A rerun
after new events were indexed encodes only the new ones. Memory stays bounded by one batch plus the
index rows of one shard. Only valid tokens are stored (N_event <= N), optionally stride-pooled
(`--stride-pool S`: mean of S consecutive tokens, summary tokens such as CLS kept apart) and
truncated (`--max-tokens N`).
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import polars as pl
import torch
import yaml
from tqdm.auto import tqdm

from mmehr.io import (
    MANIFEST,
    OutputLock,
    atomic_path,
    check_output,
    is_complete,
    mark_output,
    read_json,
    read_manifest,
    stage_of,
    write_json,
)
from mmehr.modalities import sources
from mmehr.modalities.encoders import REGISTRY, FrozenEncoder, check_payload, get_encoder
from mmehr.modalities.store import INDEX_SCHEMA, _part_path, _shard_path

REQUIRED_EVENT_COLUMNS = ("subject_id", "time", "modality", "event_id", "payload")


# --------------------------------------------------------------------------------------------------
# Events in, payloads


def read_events(
    events_dir: str | Path, modality: str, only_subjects: Iterable[int] | None = None
) -> pl.DataFrame:
    """The modality events of `events_dir/events.parquet` (a finished `mmehr index` output), sorted by
    (subject_id, time, event_id); optionally only those of `only_subjects`."""
    events_dir = Path(events_dir)
    read_manifest(events_dir)  # fails clearly if the index stage never finished
    if stage_of(events_dir) not in (None, "index"):
        raise ValueError(
            f"{events_dir} is a `mmehr {stage_of(events_dir)}` output, not modality events (`mmehr index`)"
        )
    path = events_dir / "events.parquet"
    if not path.is_file():
        raise FileNotFoundError(f"{path} does not exist; run `mmehr index` to write it")
    events = pl.read_parquet(path)
    missing = [c for c in REQUIRED_EVENT_COLUMNS if c not in events.columns]
    if missing:
        raise ValueError(
            f"{path}: missing column(s) {missing}; expected at least {list(REQUIRED_EVENT_COLUMNS)}"
        )
    if events.schema["time"] != pl.Int64:
        if not isinstance(events.schema["time"], pl.Datetime):
            raise ValueError(f"{path}: column time must be int64 µs since epoch, got {events.schema['time']}")
        events = events.with_columns(pl.col("time").dt.epoch("us"))
    events = events.with_columns(pl.col("subject_id").cast(pl.Int64), pl.col("event_id").cast(pl.String))
    events = events.filter(pl.col("modality") == modality)
    nulls = [c for c in ("subject_id", "time", "event_id") if events[c].null_count()]
    if nulls:
        raise ValueError(
            f"{path}: {modality} events with empty {nulls}; every event needs a subject, a time and an id"
        )
    if only_subjects is not None:
        events = events.filter(pl.col("subject_id").is_in(list(only_subjects)))
    dup = events.filter(pl.col("event_id").is_duplicated())
    if dup.height:
        raise ValueError(
            f"{path}: event_id must be unique; {dup.height} rows share ids, e.g. {dup['event_id'][0]!r}"
        )
    return events.sort("subject_id", "time", "event_id")


def load_event_payload(events_dir: Path, row: dict[str, Any]) -> Any:
    """A note whose text is in the events table (`text` column) is used as is; anything else goes
    through `mmehr.modalities.sources.load_payload(events_dir, row)`."""
    if row.get("modality") == "note" and isinstance(row.get("text"), str):
        return row["text"]
    return sources.load_payload(events_dir, row)


def read_subject_list(path: str | Path) -> list[int]:
    """Subject ids from a parquet file (column subject_id) or a text file (one id per line, # comments)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"--only-subjects: {path} does not exist")
    if path.suffix == ".parquet":
        df = pl.read_parquet(path)
        if "subject_id" not in df.columns:
            raise ValueError(f"{path}: needs a subject_id column")
        return df["subject_id"].cast(pl.Int64).to_list()
    ids = []
    for n, line in enumerate(path.read_text().splitlines(), 1):
        line = line.split("#")[0].strip()
        if line:
            try:
                ids.append(int(line))
            except ValueError:
                raise ValueError(f"{path}:{n}: not a subject id: {line!r}") from None
    return ids


# --------------------------------------------------------------------------------------------------
# Writing


def pool_tokens(emb: np.ndarray, stride: int, n_prefix: int = 0) -> np.ndarray:
    """(n, d) -> (n_prefix + ceil((n - n_prefix) / stride), d): means of `stride` consecutive tokens;
    the first `n_prefix` (summary) tokens are kept as they are; the last window may be shorter."""
    if stride <= 1 or len(emb) <= n_prefix:
        return emb
    head, body = emb[:n_prefix], emb[n_prefix:].astype(np.float32)
    starts = np.arange(0, len(body), stride)
    counts = np.diff(np.append(starts, len(body)))[:, None]
    pooled = np.add.reduceat(body, starts, axis=0) / counts
    return np.concatenate([head.astype(np.float32), pooled]).astype(emb.dtype)


class ShardWriter:
    """Appends fp16 token blocks of events to shard K; on a clean exit renames it into place and writes
    its index part last. An exception inside the `with` block leaves nothing that a rerun would trust."""

    def __init__(self, root: Path, k: int, d: int, *, encoder: str, modality: str):
        self.root, self.k, self.d, self.encoder, self.modality = root, k, d, encoder, modality
        self.path = _shard_path(root, k)
        self.partial = self.path.with_name(f".{self.path.name}.partial")
        self.rows: list[dict[str, Any]] = []
        self.offset = 0

    def __enter__(self) -> ShardWriter:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.file = open(self.partial, "wb")
        return self

    def add(self, event: dict[str, Any], emb: np.ndarray) -> None:
        """Append one event's tokens, emb (n, d)."""
        assert emb.ndim == 2 and emb.shape[1] == self.d and len(emb) > 0, emb.shape
        self.file.write(np.ascontiguousarray(emb, dtype=np.float16).tobytes())
        self.rows.append(self._row(event, self.offset, len(emb), None))
        self.offset += len(emb)

    def skip(self, event: dict[str, Any], reason: str) -> None:
        self.rows.append(self._row(event, 0, 0, reason))

    def _row(self, event: dict[str, Any], offset: int, length: int, reason: str | None) -> dict[str, Any]:
        return {
            "subject_id": event["subject_id"], "time": event["time"], "event_id": event["event_id"],
            "modality": self.modality, "encoder": self.encoder, "shard": self.k, "offset": offset,
            "length": length, "skip_reason": reason,
        }  # fmt: skip

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is not None:  # nothing of this shard may be trusted
            self.file.close()
            self.partial.unlink(missing_ok=True)
            return
        self.file.flush()
        os.fsync(self.file.fileno())
        self.file.close()
        os.replace(self.partial, self.path)
        with atomic_path(_part_path(self.root, self.k)) as tmp:  # the commit record, written last
            pl.DataFrame(self.rows, schema=INDEX_SCHEMA).write_parquet(tmp)


def _recover(root: Path, d: int) -> tuple[pl.DataFrame, int]:
    """Drop what an interrupted run left unfinished; return the finished parts' rows and the next shard id."""
    for stale in list(root.glob("shards/.*")) + list(root.glob("parts/.*")):
        stale.unlink()
    parts = []
    shard_ids = set()
    for part in sorted(root.glob("parts/part-*.parquet")):
        k = int(part.stem.split("-")[1])
        rows = pl.read_parquet(part)
        data = _shard_path(root, k)
        if not data.is_file() or data.stat().st_size != int(rows["length"].sum()) * d * 2:
            print(
                f"warning: {data} is missing or truncated; re-encoding its {rows.height} events",
                file=sys.stderr,
            )
            part.unlink()
            data.unlink(missing_ok=True)
            continue
        parts.append(rows)
        shard_ids.add(k)
    for data in root.glob("shards/shard-*.f16"):
        if int(data.stem.split("-")[1]) not in shard_ids:  # renamed, but its part was never written
            data.unlink()
    done = pl.concat(parts) if parts else pl.DataFrame(schema=INDEX_SCHEMA)
    return done, max(shard_ids, default=-1) + 1


def _settings(encoder: FrozenEncoder, stride_pool: int, max_tokens: int | None) -> dict[str, Any]:
    body = encoder.max_tokens - encoder.n_prefix
    bound = encoder.n_prefix + -(-body // max(stride_pool, 1))
    return {
        "encoder": encoder.name,
        "modality": encoder.modality,
        "weights_checksum": encoder.weights_checksum,
        "preprocessing": encoder.preprocessing,
        "d_enc": encoder.d_enc,
        "n_prefix": encoder.n_prefix,
        "dtype": "float16",
        "stride_pool": stride_pool,
        "token_limit": max_tokens,
        "max_tokens": min(bound, max_tokens) if max_tokens else bound,
    }


def _check_settings(root: Path, settings: dict[str, Any]) -> None:
    path = root / "settings.json"
    if path.is_file():
        old = read_json(path)
        diff = sorted(k for k in set(old) | set(settings) if old.get(k) != settings.get(k))
        if diff:
            raise ValueError(
                f"{root} holds a store made with other settings (differs in {diff}); "
                "choose another --out, or delete that directory to start over"
            )
    else:
        write_json(path, settings)


def encode_events(
    events_dir: str | Path,
    encoder: FrozenEncoder,
    out: str | Path,
    *,
    batch_size: int = 32,
    max_tokens: int | None = None,
    stride_pool: int = 1,
    only_subjects: Iterable[int] | None = None,
    shard_events: int = 1024,
    workers: int = 4,
    load_payload: Callable[[Path, dict[str, Any]], Any] | None = None,
    progress: bool = True,
) -> dict[str, Any]:
    """Encode every `encoder.modality` event of `events_dir` not yet in the store at `out`; return the manifest.

    `load_payload(events_dir, row)` reads one payload (default: `load_event_payload`); a payload that
    fails to load (OSError/ValueError/KeyError) or validate is recorded in skipped.parquet, not fatal,
    and is not retried by a rerun (delete the store to retry). It runs in `workers` threads at once, so
    it must be thread-safe: `np.load` is not on CPython before 3.11.8 / 3.12.1 (its header parse,
    `ast.literal_eval`, can raise SystemError under threads: python/cpython#106905); there, pass
    `workers=0` or read .npy payloads another way.
    """
    if batch_size < 1 or shard_events < 1 or stride_pool < 1 or (max_tokens is not None and max_tokens < 1):
        raise ValueError("batch_size, shard_events, stride_pool and max_tokens must be positive")
    events_dir, root = Path(events_dir), Path(out)
    check_output(root, "encode", inputs=[events_dir, sources.source_root(events_dir)])
    events = read_events(events_dir, encoder.modality, only_subjects)
    if events.is_empty():
        raise ValueError(_nothing_to_encode(events_dir, encoder, only_subjects))
    settings = _settings(encoder, stride_pool, max_tokens)
    with OutputLock(root, "encode"):  # a second encode into this store fails, naming this one
        mark_output(root, "encode")
        _check_settings(root, settings)
        return _encode_into(
            root, events_dir, events, encoder, settings, batch_size=batch_size, max_tokens=max_tokens,
            stride_pool=stride_pool, shard_events=shard_events, workers=workers, load_payload=load_payload,
            progress=progress,
        )  # fmt: skip


def _nothing_to_encode(events_dir: Path, encoder: FrozenEncoder, only_subjects: Iterable[int] | None) -> str:
    if only_subjects is not None:
        return f"{events_dir}: none of the subjects of --only-subjects has a {encoder.modality} event; nothing to encode"
    held = pl.read_parquet(events_dir / "events.parquet", columns=["modality"])["modality"].value_counts()
    held = ", ".join(f"{n} {m}" for m, n in held.sort("modality").iter_rows()) or "no events at all"
    return (
        f"{events_dir} holds no {encoder.modality} events ({held}); encoder {encoder.name} encodes "
        f"{encoder.modality} events: give it the events of `mmehr index --source {encoder.modality}`"
    )


def _encode_into(
    root: Path,
    events_dir: Path,
    events: pl.DataFrame,
    encoder: FrozenEncoder,
    settings: dict[str, Any],
    *,
    batch_size: int,
    max_tokens: int | None,
    stride_pool: int,
    shard_events: int,
    workers: int,
    load_payload: Callable[[Path, dict[str, Any]], Any] | None,
    progress: bool,
) -> dict[str, Any]:
    """encode_events' work, with the store locked and its settings checked."""
    done, k = _recover(root, encoder.d_enc)
    todo = events.join(done.select("event_id"), on="event_id", how="anti").sort(
        "subject_id", "time", "event_id"
    )
    if todo.is_empty() and is_complete(root):
        print(f"{root}: all {events.height} {encoder.modality} events already encoded with {encoder.name}")
        return read_manifest(root)
    (root / MANIFEST).unlink(missing_ok=True)  # the store is changing: not trustworthy until finalised

    load = load_payload or load_event_payload
    # the encoder's own check (e.g. ECG-FM: a whole segment); stand-in encoders only have the modality's
    check = getattr(encoder, "check_payload", None) or (lambda p: check_payload(encoder.modality, p))

    def load_one(row: dict[str, Any]) -> Any:
        try:
            return check(load(events_dir, row))
        except (OSError, ValueError, KeyError) as e:  # unreadable, corrupt or missing payload: skip it
            return e

    t0, n_new = time.perf_counter(), 0
    bar = tqdm(total=events.height, initial=events.height - todo.height, unit="event", desc=f"encode {encoder.name}",
               disable=not progress)  # fmt: skip
    with ThreadPoolExecutor(max(workers, 1)) as pool:
        for start in range(0, todo.height, shard_events):
            with ShardWriter(
                root, k, encoder.d_enc, encoder=encoder.name, modality=encoder.modality
            ) as shard:
                for rows, payloads in _batches(todo.slice(start, shard_events), encoder, load_one, pool,
                                               batch_size, workers):  # fmt: skip
                    _encode_batch(encoder, rows, payloads, shard, stride_pool, max_tokens)
                    n_new += len(rows)
                    bar.update(len(rows))
                    bar.set_postfix(events_per_s=f"{n_new / (time.perf_counter() - t0):.1f}")
            k += 1
    bar.close()
    manifest = finalise_store(root, settings, events_dir=events_dir)
    rate = n_new / max(time.perf_counter() - t0, 1e-9)
    c = manifest["counts"]
    print(f"encoded {n_new} events at {rate:.1f} events/s; store: {c['events']} events, {c['skipped']} skipped, "
          f"{c['tokens']} tokens, {c['bytes'] / 1e6:.1f} MB -> {root}")  # fmt: skip
    return manifest


def _batches(
    chunk: pl.DataFrame,
    encoder: FrozenEncoder,
    load_one: Callable,
    pool: ThreadPoolExecutor,
    batch_size: int,
    workers: int,
) -> Iterator[tuple[list[dict[str, Any]], list[Any]]]:
    """(rows, payloads) batches of one shard's events. Texts are loaded for the whole shard and batched in
    length order, so that a batch pads to similar lengths (MiniLM on the demo's notes: about 2x faster);
    waveforms and images are loaded batch by batch (a shard of them would be hundreds of MB)."""
    load = (
        (lambda rows: list(pool.map(load_one, rows)))
        if workers > 0
        else (lambda rows: [load_one(r) for r in rows])
    )
    if encoder.modality != "note":
        for batch in chunk.iter_slices(batch_size):
            rows = batch.to_dicts()
            yield rows, load(rows)
        return
    rows = chunk.to_dicts()
    payloads = load(rows)
    order = sorted(
        range(len(rows)), key=lambda i: 0 if isinstance(payloads[i], Exception) else len(payloads[i])
    )
    for b in range(0, len(order), batch_size):
        batch = order[b : b + batch_size]
        yield [rows[i] for i in batch], [payloads[i] for i in batch]


def _encode_batch(
    encoder, rows, payloads, shard: ShardWriter, stride_pool: int, max_tokens: int | None
) -> None:
    good = [i for i, p in enumerate(payloads) if not isinstance(p, Exception)]
    for row, p in zip(rows, payloads, strict=True):
        if isinstance(p, Exception):
            shard.skip(row, f"{type(p).__name__}: {p}")
    if not good:
        return
    emb, mask = encoder.encode([payloads[i] for i in good])
    emb, mask = emb.cpu().numpy(), mask.cpu().numpy()
    for j, i in enumerate(good):
        n = int(mask[j].sum())
        if not mask[j, :n].all():
            raise RuntimeError(
                f"encoder {encoder.name} returned a token mask whose valid tokens are not first"
            )
        tokens = pool_tokens(emb[j, :n], stride_pool, encoder.n_prefix)[:max_tokens]
        if len(tokens) == 0:
            shard.skip(rows[i], "the encoder produced no tokens")
        else:
            shard.add(rows[i], tokens)


def finalise_store(root: Path, settings: dict[str, Any], **extra: Any) -> dict[str, Any]:
    """Merge the finished parts into index.parquet / skipped.parquet and write manifest.json last (and
    settings.json, which runs check a store against, when the writer has not written it yet)."""
    _check_settings(root, settings)
    parts = sorted(root.glob("parts/part-*.parquet"))
    rows = pl.concat([pl.read_parquet(p) for p in parts]) if parts else pl.DataFrame(schema=INDEX_SCHEMA)
    index = (
        rows.filter(pl.col("skip_reason").is_null())
        .drop("skip_reason")
        .sort("subject_id", "time", "event_id")
    )
    skipped = rows.filter(pl.col("skip_reason").is_not_null()).select(
        "subject_id", "time", "event_id", "skip_reason"
    )
    skipped = skipped.sort("subject_id", "time", "event_id")
    with atomic_path(root / "index.parquet") as tmp:
        index.write_parquet(tmp)
    with atomic_path(root / "skipped.parquet") as tmp:
        skipped.write_parquet(tmp)
    if index.height == 0:  # a store without events would train and evaluate as if the modality were absent
        reasons = skipped["skip_reason"].value_counts(sort=True).head(3).rows()
        raise ValueError(
            f"{root}: none of the {skipped.height} events could be encoded ({', '.join(f'{n}x {r}' for r, n in reasons)}); "
            f"the store is left incomplete: see {root / 'skipped.parquet'}, fix the payloads and encode into a new --out"
        )
    tokens = int(index["length"].sum())
    manifest = {
        "stage": "encode",
        **settings,
        **{k: str(Path(v).resolve()) if isinstance(v, Path) else v for k, v in extra.items()},
        "counts": {
            "events": index.height,
            "skipped": skipped.height,
            "subjects": index["subject_id"].n_unique() if index.height else 0,
            "tokens": tokens,
            "shards": len(parts),
            "bytes": tokens * settings["d_enc"] * 2,
        },
    }
    write_json(root / MANIFEST, manifest)
    return manifest


# --------------------------------------------------------------------------------------------------
# `mmehr encode`


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--events", required=True, help="directory written by `mmehr index` (events.parquet)")
    parser.add_argument("--encoder", required=True, choices=list(REGISTRY), help="frozen encoder name")
    parser.add_argument("--out", required=True, help="store directory (resumed if it exists)")
    parser.add_argument("--weights", help="local weights file or directory of a pretrained encoder")
    parser.add_argument("--set", dest="options", nargs="+", action="extend", default=[], metavar="KEY=VALUE",
                        help="encoder options (YAML values), e.g. --set heads=12 layer_norm_first=true for an ECG-FM "
                             "checkpoint without its cfg")  # fmt: skip
    parser.add_argument("--batch-size", type=int, default=32, help="events per encoder call (default 32)")
    parser.add_argument("--max-tokens", type=int, help="keep at most N tokens per event (after pooling)")
    parser.add_argument(
        "--stride-pool", type=int, default=1, help="mean-pool S consecutive tokens (default 1: off)"
    )
    parser.add_argument(
        "--only-subjects", help="file of subject ids (text, one per line, or parquet subject_id)"
    )
    parser.add_argument("--shard-events", type=int, default=1024, help="events per shard, the unit of resume")
    parser.add_argument("--workers", type=int, default=4, help="threads reading payloads (default 4)")
    parser.add_argument(
        "--device", default="auto", help="torch device for the encoder (default: cuda if available)"
    )


def parse_options(items: list[str]) -> dict[str, Any]:
    """`KEY=VALUE` encoder options, values parsed as YAML (true, 12, 0.5, "[(256, 2, 2)] * 4")."""
    options = {}
    for item in items:
        key, sep, raw = item.partition("=")
        if not sep or not key:
            raise ValueError(f"--set {item!r}: expected KEY=VALUE")
        options[key] = yaml.safe_load(raw)
    return options


def run(args: argparse.Namespace) -> int:
    read_manifest(args.events)  # a missing/unfinished events directory fails before any work
    only = read_subject_list(args.only_subjects) if args.only_subjects else None
    options = parse_options(args.options)
    encoder = get_encoder(
        args.encoder, weights=args.weights, **options
    )  # missing weights fail before any work
    device = ("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto" else args.device
    encoder.to(device)
    encode_events(
        args.events, encoder, args.out, batch_size=args.batch_size, max_tokens=args.max_tokens,
        stride_pool=args.stride_pool, only_subjects=only, shard_events=args.shard_events, workers=args.workers,
    )  # fmt: skip
    print(f"wrote {Path(args.out) / MANIFEST}")
    return 0
