"""The embedding store: encode once, exact round trip, strict-before retrieval, pooling, resume after a
real interruption (exception and SIGKILL), and the `mmehr encode` command."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import polars as pl
import pytest

from mmehr.cli import main
from mmehr.io import write_json
from mmehr.modalities.encode import encode_events, pool_tokens, read_subject_list
from mmehr.modalities.encoders import get_encoder
from mmehr.modalities.store import EmbeddingStore

HOUR = 3_600_000_000  # µs
T0 = 1_700_000_000_000_000
WORDS = [
    "sepsis",
    "shock",
    "pneumonia",
    "stable",
    "afebrile",
    "troponin",
    "edema",
    "discharged",
    "icu",
    "fever",
]


def note_text(s: int, j: int) -> str:
    rng = np.random.default_rng(1000 * s + j)
    return " ".join(rng.choice(WORDS, size=3 + (7 * s + 3 * j) % 17))


def make_events(root: Path, subjects: int = 4, per_subject: int = 6, extra: list[dict] | None = None) -> Path:
    """An events directory as `mmehr index` writes it, notes carrying their text in the table."""
    rows = [
        {"subject_id": 10 + s, "time": T0 + j * HOUR + s, "modality": "note", "event_id": f"note-{s}-{j}",
         "payload": f"note-{s}-{j}", "note_type": "RR", "text": note_text(s, j)}
        for s in range(subjects) for j in range(per_subject)
    ]  # fmt: skip
    rows.append({"subject_id": 10, "time": T0, "modality": "ecg", "event_id": "ecg-0", "payload": "x.npy",
                 "note_type": None, "text": None})  # fmt: skip
    rows += extra or []
    root.mkdir(parents=True, exist_ok=True)
    pl.DataFrame(rows).write_parquet(root / "events.parquet")
    write_json(root / "manifest.json", {"source": "test", "counts": {"events": len(rows)}})
    return root


def read_all(store: EmbeddingStore) -> dict[str, np.ndarray]:
    index = pl.read_parquet(store.root / "index.parquet")
    rows = {(s, t): i for i, (s, t) in enumerate(zip(store.subject, store.time, strict=True))}
    return {
        e: np.array(store.embedding(rows[(s, t)]))
        for e, s, t in index.select("event_id", "subject_id", "time").iter_rows()
    }


@pytest.fixture
def events(tmp_path):
    return make_events(tmp_path / "events")


@pytest.fixture(scope="module")
def enc():
    return get_encoder("note-hash", d=32)


def test_store_round_trips_each_event_once_as_fp16(events, enc, tmp_path):
    manifest = encode_events(events, enc, tmp_path / "store", batch_size=5, shard_events=7, progress=False)
    index = pl.read_parquet(tmp_path / "store" / "index.parquet")
    assert index.columns == [
        "subject_id",
        "time",
        "event_id",
        "modality",
        "encoder",
        "shard",
        "offset",
        "length",
    ]
    assert index.height == 24 and index["event_id"].n_unique() == 24 and set(index["modality"]) == {"note"}
    assert manifest["encoder"] == "note-hash" and manifest["d_enc"] == 32 and manifest["dtype"] == "float16"
    assert (
        manifest["weights_checksum"] == enc.weights_checksum
        and manifest["preprocessing"] == enc.preprocessing
    )
    assert manifest["counts"]["events"] == 24 and manifest["counts"]["shards"] == 4  # ceil(24 / 7)
    store = EmbeddingStore(tmp_path / "store")
    stored = read_all(store)
    for s in range(4):
        for j in range(6):
            emb, mask = enc.encode([note_text(s, j)])
            expected = emb[0, : int(mask[0].sum())].numpy().astype(np.float16)
            np.testing.assert_array_equal(stored[f"note-{s}-{j}"], expected)
    assert manifest["counts"]["tokens"] == int(index["length"].sum())
    assert (
        sum(p.stat().st_size for p in (tmp_path / "store" / "shards").iterdir())
        == manifest["counts"]["bytes"]
    )


def test_notes_are_batched_in_length_order_with_the_same_embeddings(events, tmp_path):
    """Texts of a shard are encoded shortest first (less padding); a padding-sensitive real architecture
    (MiniLM's, tiny and random) must store what it gives each note encoded alone."""
    enc = get_encoder("minilm", random_init=True, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                      intermediate_size=64)  # fmt: skip
    lengths: list[list[int]] = []
    encode = enc.encode
    enc.encode = lambda texts: (lengths.append([len(t) for t in texts]), encode(texts))[1]
    encode_events(events, enc, tmp_path / "store", batch_size=5, shard_events=12, progress=False)
    enc.encode = encode
    flat = [n for batch in lengths for n in batch]
    assert flat[:12] == sorted(flat[:12]) and flat[12:] == sorted(flat[12:]) and flat != sorted(flat)
    stored = read_all(EmbeddingStore(tmp_path / "store"))
    for s in range(4):
        for j in range(6):
            emb, mask = enc.encode([note_text(s, j)])
            expected = emb[0, : int(mask[0].sum())].numpy()
            np.testing.assert_allclose(
                stored[f"note-{s}-{j}"].astype(np.float32), expected, atol=2e-3, rtol=2e-3
            )


def test_events_before_is_strict_and_most_recent_first(events, enc, tmp_path):
    encode_events(events, enc, tmp_path / "store", progress=False)
    store = EmbeddingStore(tmp_path / "store")
    subject, t3 = 11, T0 + 3 * HOUR + 1  # the exact time of subject 11's 4th note
    got = store.events_before(subject, t3, k=2)
    assert [t for t, _ in got] == [T0 + 2 * HOUR + 1, T0 + 1 * HOUR + 1]  # equal time excluded
    assert store.events_before(subject, t3 + 1, k=1)[0][0] == t3
    assert len(store.events_before(subject, t3, k=10)) == 3
    assert (
        store.events_before(subject, T0, k=4) == [] and store.events_before(999, T0 + 100 * HOUR, k=4) == []
    )
    assert got[0][1].dtype == np.float16 and got[0][1].shape[1] == 32
    assert (
        isinstance(got[0][1].base, np.memmap | np.ndarray) and not got[0][1].flags.owndata
    )  # a view, not a copy


def test_fetch_pads_a_training_batch(events, enc, tmp_path):
    encode_events(events, enc, tmp_path / "store", progress=False)
    store = EmbeddingStore(tmp_path / "store")
    subjects, times = [10, 12, 999], [T0 + 10 * HOUR, T0 + 1 * HOUR + 2, T0]  # 12: exactly its 2nd note
    emb, token_mask, event_time, event_mask = store.fetch(subjects, times, k=4)
    lengths = [
        [len(e) for _, e in store.events_before(s, t, 4)] for s, t in zip(subjects, times, strict=True)
    ]
    N = max(max(x, default=0) for x in lengths)
    assert emb.shape == (3, 4, N, 32) and emb.dtype == np.float16
    assert event_mask.tolist() == [[True] * 4, [True, False, False, False], [False] * 4]
    assert event_time[1, 0] == T0 + 2 and (event_time[0, :-1] > event_time[0, 1:]).all()
    for b, ls in enumerate(lengths):
        for j, n in enumerate(ls):
            assert token_mask[b, j].sum() == n
            np.testing.assert_array_equal(emb[b, j, :n], store.events_before(subjects[b], times[b], 4)[j][1])
    assert not emb[~token_mask].any() and not token_mask[2].any()
    emb8, mask8, _, _ = store.fetch(subjects, times, k=4, n_tokens=8)
    assert emb8.shape[2] == min(8, N) and mask8.sum(-1).max() <= 8
    np.testing.assert_array_equal(emb8, emb[:, :, : min(8, N)])  # truncation keeps each event's first tokens
    emb_wide, _, _, _ = store.fetch(subjects, times, k=4, n_tokens=N + 50)
    assert emb_wide.shape[2] == N  # never padded past the longest event fetched


def test_pool_tokens_keeps_summary_tokens_and_averages_windows():
    x = np.arange(8 * 2, dtype=np.float16).reshape(8, 2)  # 1 summary token + 7 tokens
    pooled = pool_tokens(x, stride=3, n_prefix=1)
    assert pooled.shape == (4, 2) and pooled.dtype == np.float16
    np.testing.assert_array_equal(pooled[0], x[0])
    np.testing.assert_allclose(pooled[1:], [x[1:4].astype(float).mean(0), x[4:7].astype(float).mean(0), x[7]])
    assert pool_tokens(x, 1) is x


def test_stride_pool_and_max_tokens_bound_the_store(events, enc, tmp_path):
    manifest = encode_events(events, enc, tmp_path / "store", stride_pool=2, max_tokens=5, progress=False)
    index = pl.read_parquet(tmp_path / "store" / "index.parquet")
    assert index["length"].max() <= 5 and manifest["max_tokens"] == 5 and manifest["stride_pool"] == 2
    emb, mask = enc.encode([note_text(0, 0)])
    expected = pool_tokens(emb[0, : int(mask[0].sum())].numpy(), 2, 1)[:5].astype(np.float16)
    np.testing.assert_array_equal(
        EmbeddingStore(tmp_path / "store").events_before(10, T0 + 1, 1)[0][1], expected
    )


def test_rerun_skips_done_events_and_encodes_only_new_ones(events, enc, tmp_path, capsys):
    store_dir = tmp_path / "store"
    encode_events(events, enc, store_dir, shard_events=10, progress=False)
    first = {p.name: p.stat().st_mtime_ns for p in (store_dir / "shards").iterdir()}
    encode_events(events, enc, store_dir, shard_events=10, progress=False)
    assert "already encoded" in capsys.readouterr().out
    new = [{"subject_id": 99, "time": T0 + 5, "modality": "note", "event_id": "late", "payload": "late",
            "note_type": "DS", "text": "pneumonia and fever"}]  # fmt: skip
    make_events(events, extra=new)
    manifest = encode_events(events, enc, store_dir, shard_events=10, progress=False)
    after = {p.name: p.stat().st_mtime_ns for p in (store_dir / "shards").iterdir()}
    assert manifest["counts"]["events"] == 25 and len(after) == len(first) + 1
    assert all(after[name] == mtime for name, mtime in first.items())  # finished shards untouched
    assert EmbeddingStore(store_dir).events_before(99, T0 + 6, 1)[0][1].shape == (4, 32)


def test_other_settings_on_an_existing_store_are_refused(events, enc, tmp_path):
    encode_events(events, enc, tmp_path / "store", progress=False)
    with pytest.raises(ValueError, match=r"other settings .*stride_pool"):
        encode_events(events, enc, tmp_path / "store", stride_pool=4, progress=False)
    with pytest.raises(ValueError, match=r"other settings .*weights_checksum"):
        encode_events(events, get_encoder("note-hash", d=32, seed=3), tmp_path / "store", progress=False)


class CrashAfter:
    """The real encoder, but the process 'dies' (raises) on its n-th call, like a crash mid-run."""

    def __init__(self, encoder, n: int):
        self.__dict__.update(encoder.__dict__)
        self._encoder, self._left = encoder, n

    def encode(self, payloads):
        self._left -= 1
        if self._left == 0:
            raise KeyboardInterrupt
        return self._encoder.encode(payloads)


def test_interrupted_run_resumes_without_losing_or_duplicating_events(events, enc, tmp_path):
    encode_events(events, enc, tmp_path / "ref", progress=False)
    reference = read_all(EmbeddingStore(tmp_path / "ref"))
    store_dir = tmp_path / "store"
    with pytest.raises(KeyboardInterrupt):
        encode_events(events, CrashAfter(enc, 5), store_dir, batch_size=2, shard_events=4, progress=False)
    assert not (store_dir / "manifest.json").exists()  # an interrupted store is never trusted
    assert len(list((store_dir / "parts").glob("part-*.parquet"))) == 2  # shards of batches 1-2 and 3-4
    assert not list((store_dir / "shards").glob(".*"))
    encode_events(events, enc, store_dir, batch_size=2, shard_events=4, progress=False)
    index = pl.read_parquet(store_dir / "index.parquet")
    assert index.height == 24 and index["event_id"].n_unique() == 24
    resumed = read_all(EmbeddingStore(store_dir))
    assert resumed.keys() == reference.keys()
    for k, v in reference.items():
        np.testing.assert_array_equal(resumed[k], v)


KILLED_RUN = """
import sys, time
from mmehr.modalities.encoders import get_encoder
from mmehr.modalities.encode import encode_events, load_event_payload

def slow_load(events_dir, row):
    time.sleep(0.05)
    return load_event_payload(events_dir, row)

encode_events(sys.argv[1], get_encoder("note-hash", d=32), sys.argv[2], batch_size=2, shard_events=4,
              workers=0, load_payload=slow_load, progress=False)
"""


def test_sigkill_mid_run_then_rerun_completes_exactly_once(events, enc, tmp_path):
    store_dir = tmp_path / "store"
    proc = subprocess.Popen([sys.executable, "-c", textwrap.dedent(KILLED_RUN), str(events), str(store_dir)])
    try:
        deadline = time.monotonic() + 60
        while len(list(store_dir.glob("parts/part-*.parquet"))) < 2:
            assert proc.poll() is None, "the run ended before it could be killed"
            assert time.monotonic() < deadline
            time.sleep(0.01)
        time.sleep(0.07)  # into the next shard
        os.kill(proc.pid, signal.SIGKILL)
    finally:
        proc.wait()
    assert proc.returncode == -signal.SIGKILL and not (store_dir / "manifest.json").exists()
    done_before = pl.concat([pl.read_parquet(p) for p in store_dir.glob("parts/part-*.parquet")])
    assert 8 <= done_before.height < 24
    manifest = encode_events(events, enc, store_dir, batch_size=2, shard_events=4, progress=False)
    index = pl.read_parquet(store_dir / "index.parquet")
    assert manifest["counts"]["events"] == 24 and index["event_id"].n_unique() == 24
    assert not list(store_dir.glob("shards/.*"))
    encode_events(events, enc, tmp_path / "ref", progress=False)
    reference = read_all(EmbeddingStore(tmp_path / "ref"))
    resumed = read_all(EmbeddingStore(store_dir))
    for k, v in reference.items():
        np.testing.assert_array_equal(resumed[k], v)


def test_unreadable_payloads_are_skipped_with_the_reason(events, tmp_path):
    def load(events_dir, row):
        if row["event_id"].endswith("-2"):
            raise OSError(f"cannot read {row['payload']}")
        return row["text"]

    manifest = encode_events(
        events, get_encoder("note-hash", d=32), tmp_path / "store", load_payload=load, progress=False
    )
    skipped = pl.read_parquet(tmp_path / "store" / "skipped.parquet")
    assert manifest["counts"] == {**manifest["counts"], "events": 20, "skipped": 4}
    assert skipped["event_id"].to_list() == [f"note-{s}-2" for s in range(4)]
    assert skipped["skip_reason"][0] == "OSError: cannot read note-0-2"


def test_ecg_events_through_a_payload_loader(tmp_path):
    rng = np.random.default_rng(0)
    (tmp_path / "ecg").mkdir()
    rows, signals = [], {}
    for i in range(5):
        signals[f"ecg/{i}.npy"] = rng.standard_normal((12, 5000)).astype(np.float32)
        np.save(tmp_path / "ecg" / f"{i}.npy", signals[f"ecg/{i}.npy"])
        rows.append({"subject_id": 1 + i % 2, "time": T0 + i * HOUR, "modality": "ecg", "event_id": f"e{i}",
                     "payload": f"ecg/{i}.npy", "fs": 500.0})  # fmt: skip
    pl.DataFrame(rows).write_parquet(tmp_path / "events.parquet")
    write_json(tmp_path / "manifest.json", {"source": "test"})
    enc = get_encoder("ecg-patch")
    manifest = encode_events(
        tmp_path,  # the store beside the events, not inside them
        enc,
        tmp_path.with_name(tmp_path.name + "-store"),
        # np.load itself is not thread-safe on CPython 3.11.7 (python/cpython#106905): CI's python
        # once raised SystemError here; the loader's threads read the arrays already in memory
        load_payload=lambda d, r: (signals[r["payload"]].copy(), r["fs"]),
        progress=False,
    )
    assert manifest["counts"]["events"] == 5 and manifest["max_tokens"] == 10
    got = EmbeddingStore(tmp_path.with_name(tmp_path.name + "-store")).events_before(1, T0 + 10 * HOUR, 1)[0][
        1
    ]
    emb, _ = enc.encode([(np.load(tmp_path / "ecg" / "4.npy"), 500.0)])
    # Encoded in a batch vs alone: float32 results may differ in their last bits (the matmul splits work
    # by thread count and batch), which can move the stored fp16 value by one step, never more.
    one_step = np.spacing(np.abs(got)).astype(np.float32)
    assert np.all(np.abs(got.astype(np.float32) - emb[0].numpy()) <= one_step)


def test_only_subjects_and_bad_inputs(events, enc, tmp_path):
    (tmp_path / "ids.txt").write_text("# cohort\n11\n13\n")
    assert read_subject_list(tmp_path / "ids.txt") == [11, 13]
    manifest = encode_events(events, enc, tmp_path / "store", only_subjects=[11, 13], progress=False)
    assert manifest["counts"]["subjects"] == 2 and manifest["counts"]["events"] == 12
    (tmp_path / "bad.txt").write_text("11\neleven\n")
    with pytest.raises(ValueError, match=r"bad.txt:2: not a subject id"):
        read_subject_list(tmp_path / "bad.txt")
    (events / "manifest.json").unlink()
    with pytest.raises(FileNotFoundError, match=r"manifest\.json"):
        encode_events(events, enc, tmp_path / "other", progress=False)
    dup = make_events(tmp_path / "dup", extra=[{"subject_id": 1, "time": T0, "modality": "note", "event_id": "note-0-0",
                                                "payload": "p", "note_type": None, "text": "x"}])  # fmt: skip
    with pytest.raises(ValueError, match=r"events.parquet: event_id must be unique.*note-0-0"):
        encode_events(dup, enc, tmp_path / "other", progress=False)


def test_mmehr_encode_command(events, tmp_path, capsys):
    out = tmp_path / "store"
    assert (
        main(
            [
                "encode",
                "--events",
                str(events),
                "--encoder",
                "note-hash",
                "--out",
                str(out),
                "--batch-size",
                "8",
                "--stride-pool",
                "2",
            ]
        )
        == 0
    )
    printed = capsys.readouterr().out
    assert f"wrote {out / 'manifest.json'}" in printed and "events/s" in printed
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["counts"]["events"] == 24 and manifest["stride_pool"] == 2
    assert len(EmbeddingStore(out)) == 24


def test_mmehr_encode_without_weights_fails_before_any_work(events, tmp_path, capsys, monkeypatch):
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "empty-cache"))
    out = tmp_path / "store"
    assert main(["encode", "--events", str(events), "--encoder", "biomedbert", "--out", str(out)]) == 1
    err = capsys.readouterr().err
    assert "--weights" in err and "BiomedNLP-BiomedBERT" in err
    assert not out.exists()


def test_events_indexed_by_mmehr_index_encode_through_load_payload(tmp_path):
    """The real path: MIMIC-format ECG (WFDB, native lead order) and CXR (JPEG) roots, `mmehr index`'s
    build_index, then encode_events with the default payload loader."""
    import wfdb
    from PIL import Image

    from mmehr.modalities.sources import build_index

    rng = np.random.default_rng(0)
    native = ["I", "II", "III", "aVR", "aVF", "aVL", "V1", "V2", "V3", "V4", "V5", "V6"]  # aVL/aVF swapped
    ecg_root, rows, signals = tmp_path / "ecg-root", [], {}
    for i, (sid, study) in enumerate([(10000032, 40689238), (10000032, 40689239), (10000117, 41000001)]):
        rel = f"files/p1000/p{sid}/s{study}/{study}"
        (ecg_root / rel).parent.mkdir(parents=True)
        canonical = (rng.standard_normal((12, 5000)) * 0.3).astype(np.float32)
        order = [
            ["I", "II", "III", "aVR", "aVL", "aVF", "V1", "V2", "V3", "V4", "V5", "V6"].index(n)
            for n in native
        ]
        wfdb.wrsamp(str(study), fs=500, units=["mV"] * 12, sig_name=native, p_signal=canonical[order].T.astype(np.float64),
                    fmt=["16"] * 12, adc_gain=[1000.0] * 12, baseline=[0] * 12, write_dir=str((ecg_root / rel).parent))  # fmt: skip
        rows.append(
            {
                "subject_id": sid,
                "study_id": study,
                "file_name": str(study),
                "ecg_time": f"2180-07-2{i} 08:44:00",
                "path": rel,
            }
        )
        signals[f"ecg-{study}"] = np.round(canonical * 1000) / 1000  # stored at 1 µV resolution
    pl.DataFrame(rows).write_csv(ecg_root / "record_list.csv")

    cxr_root = tmp_path / "cxr-root"
    meta, images = [], {}
    for i, dicom in enumerate(["d0", "d1"]):
        rel = f"files/p10/p10000032/s5000000{i}/{dicom}.jpg"
        (cxr_root / rel).parent.mkdir(parents=True)
        img = rng.integers(0, 256, (300, 240), dtype=np.uint8)
        Image.fromarray(img).save(cxr_root / rel, quality=95)
        images[f"cxr-{dicom}"] = np.asarray(Image.open(cxr_root / rel).convert("L"))
        meta.append({"dicom_id": dicom, "subject_id": 10000032, "study_id": 50000000 + i, "ViewPosition": "PA",
                     "StudyDate": "21800723", "StudyTime": f"08441{i}.5"})  # fmt: skip
    pl.DataFrame(meta).write_csv(cxr_root / "mimic-cxr-2.0.0-metadata.csv")

    for name, root, truth in [("ecg-patch", ecg_root, signals), ("cxr-patch", cxr_root, images)]:
        enc = get_encoder(name)
        events = build_index(enc.modality, root, tmp_path / f"events-{enc.modality}")
        manifest = encode_events(events, enc, tmp_path / f"store-{name}", progress=False)
        assert manifest["counts"]["events"] == len(truth) and manifest["counts"]["skipped"] == 0
        store = EmbeddingStore(tmp_path / f"store-{name}")
        stored = read_all(store)
        for event_id, payload in truth.items():
            emb, _ = enc.encode([(payload, 500.0) if enc.modality == "ecg" else payload])
            np.testing.assert_allclose(
                stored[event_id].astype(np.float32), emb[0].numpy(), atol=2e-3, rtol=2e-3
            )


def test_a_store_without_settings_is_refused_with_what_to_do(tmp_path):
    """A store from before stores recorded their encoder settings (or a stray directory) is not silently
    matched against a run: the error names it and says to encode again."""
    from mmehr.modalities.store import settings_sha256

    (tmp_path / "old-store").mkdir()
    with pytest.raises(ValueError, match=r"old-store: no settings\.json.*encode it again"):
        settings_sha256(tmp_path / "old-store")
