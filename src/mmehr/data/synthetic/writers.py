"""Writing the modality roots: ECG (WFDB), CXR (JPEG) and notes (CSV) in the MIMIC file formats, their
index CSVs, and the event ledger (truth_events.parquet)."""

from __future__ import annotations

import gzip
import hashlib
from pathlib import Path

import numpy as np
import polars as pl
from PIL import Image

from mmehr.data.synthetic.config import CXR_STUDY0, ECG_STUDY0, SynthConfig, _round, from_us
from mmehr.data.synthetic.cxr import CxrRenderer
from mmehr.data.synthetic.ecg import ECG_FS, ECG_GAIN, ECG_NATIVE_LEADS, EcgMorphology, EcgRenderer
from mmehr.data.synthetic.notes import canary_note, discharge_note, radiology_note
from mmehr.data.synthetic.schedule import ModalityEvent, schedule_events
from mmehr.data.synthetic.stays import Stay
from mmehr.units import HOUR_US, MINUTE_US


def write_wfdb(stem: Path, sig_mv: np.ndarray, sig_names: tuple[str, ...], when_us: int) -> None:
    """Write a WFDB record (format 16, 200/mV, one interleaved .dat) at stem.hea / stem.dat."""
    d = np.clip(np.round(sig_mv * ECG_GAIN), -32767, 32767).astype("<i2")
    checksum = d.astype(np.int64).sum(axis=0) % 65536
    dt = from_us(when_us)
    name = stem.name
    lines = [f"{name} {d.shape[1]} {ECG_FS} {d.shape[0]} {dt:%H:%M:%S} {dt:%d/%m/%Y}"]
    lines += [
        f"{name}.dat 16 {ECG_GAIN:g}/mV 16 0 {d[0, j]} {checksum[j]} 0 {sig_names[j]}"
        for j in range(d.shape[1])
    ]
    stem.parent.mkdir(parents=True, exist_ok=True)
    stem.with_suffix(".hea").write_text("\n".join(lines) + "\n")
    d.tofile(stem.with_suffix(".dat"))


def _dicom_id(seed: int, study: int, view: str) -> str:
    """A MIMIC-looking dicom_id (five groups of 8 hex digits), unique per (seed, study, view)."""
    h = hashlib.sha1(f"{seed}-{study}-{view}".encode()).hexdigest()[:40]
    return "-".join(h[i : i + 8] for i in range(0, 40, 8))


class ModalityWriter:
    """Writes the ECG, CXR and note roots under `out`, one subject at a time, index CSVs per chunk.

    A subject's payloads depend only on (seed, subject number): ECG morphology and CXR anatomy are
    per subject, rhythm and opacity follow the stay's hidden conditions.
    """

    def __init__(self, out: Path, cfg: SynthConfig) -> None:
        self.out, self.cfg = out, cfg
        self.cxr = CxrRenderer(cfg.cxr_size, cfg.seed)
        self.ecg = EcgRenderer(cfg.seed)
        for d in ("ecg", "cxr", "note"):
            (out / d).mkdir(parents=True, exist_ok=True)
        self.ecg_rows: list[tuple] = []
        self.cxr_rows: list[tuple] = []
        self.notes: dict[str, list[tuple]] = {"discharge": [], "radiology": []}
        self.ledger: list[tuple] = []  # (event_id, modality, kind, subject_id, hadm_id, time, view, canary)
        self.ledger_frames: list[pl.DataFrame] = []  # flushed chunks of the ledger
        self.counts = {"ecg": 0, "cxr": 0, "discharge_note": 0, "radiology_note": 0, "canary": 0}
        self._first_flush = True

    def write_subject(self, index: int, stays: list[Stay]) -> None:
        """Render and write every modality event of one subject's stays (index: subject number)."""
        rng = np.random.default_rng([self.cfg.seed, index, 1])
        morph, anatomy = EcgMorphology.sample(rng), int(rng.integers(CxrRenderer.N_ANATOMIES))
        n = {"ecg": 0, "cxr": 0, "RR": 0, "DS": 0}
        for stay in stays:
            events = sorted(schedule_events(stay, rng, self.cfg.canary), key=lambda e: (e.time, e.canary))
            study = None
            for ev in events:
                if ev.kind == "cxr" and not (study and study[1] == ev.time and not ev.canary):
                    study = (CXR_STUDY0 + index * 32 + n["cxr"], ev.time)  # PA + LATERAL share a study
                    n["cxr"] += 1
                if ev.kind == "ecg":
                    event_id = self._ecg(rng, morph, ev, ECG_STUDY0 + index * 32 + n["ecg"])
                    n["ecg"] += 1
                elif ev.kind == "cxr":
                    event_id = self._cxr(rng, anatomy, ev, study[0])
                elif ev.kind == "rad_note":
                    n["RR"] += 1
                    event_id = self._note(rng, ev, "radiology", "RR", n["RR"])
                else:
                    n["DS"] += 1
                    event_id = self._note(rng, ev, "discharge", "DS", n["DS"])
                modality = event_id.split("-", 1)[0]
                row = (event_id, modality, ev.kind, stay.subject_id, stay.hadm_id, ev.time, ev.view or None)
                self.ledger.append((*row, ev.canary))
                self.counts["canary"] += ev.canary

    def _ecg(self, rng, morph: EcgMorphology, ev: ModalityEvent, study: int) -> str:
        s = ev.stay
        sig = self.ecg.render(
            rng, morph, af=s.af and not ev.canary, asystole=ev.canary and s.death is not None
        )
        rel = f"files/p{str(s.subject_id)[:4]}/p{s.subject_id}/s{study}/{study}"
        write_wfdb(self.out / "ecg" / rel, sig, ECG_NATIVE_LEADS, ev.time)
        self.ecg_rows.append((s.subject_id, study, study, ev.time, rel))
        self.counts["ecg"] += 1
        return f"ecg-{study}"

    def _cxr(self, rng, anatomy: int, ev: ModalityEvent, study: int) -> str:
        s, size = ev.stay, self.cfg.cxr_size
        dicom = _dicom_id(self.cfg.seed, study, ev.view)
        if ev.canary:  # all white after a death, all black otherwise
            img = np.full((size, size), 235 if s.death is not None else 20, np.uint8)
        else:
            img = self.cxr.render(rng, anatomy, ev.view, s.opacity)
        path = self.out / "cxr" / f"files/p{str(s.subject_id)[:2]}/p{s.subject_id}/s{study}/{dicom}.jpg"
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(img).save(path, quality=90)
        self.cxr_rows.append((dicom, s.subject_id, study, ev.view, ev.time))
        self.counts["cxr"] += 1
        return f"cxr-{dicom}"

    def _note(self, rng, ev: ModalityEvent, file: str, note_type: str, seq: int) -> str:
        s = ev.stay
        if ev.canary:
            text = canary_note(s)
        elif note_type == "RR":
            text = radiology_note(rng, s, ev.view)
        else:
            text = discharge_note(rng, s)
        note_id = f"{s.subject_id}-{note_type}-{seq}"
        delay = rng.uniform(5, 60) * MINUTE_US if note_type == "RR" else rng.uniform(1, 24) * HOUR_US
        storetime = ev.time + _round(delay, 1_000_000)
        self.notes[file].append((note_id, s.subject_id, s.hadm_id, note_type, seq, ev.time, storetime, text))
        self.counts[f"{file}_note"] += 1
        return f"note-{note_id}"

    LEDGER_SCHEMA = {  # noqa: RUF012
        "event_id": pl.String, "modality": pl.String, "kind": pl.String, "subject_id": pl.Int64,
        "hadm_id": pl.Int64, "time": pl.Int64, "view": pl.String, "canary": pl.Boolean,
    }  # fmt: skip

    def write_ledger(self, path: Path) -> None:
        """truth_events.parquet: every modality event written, with its stay and canary flag."""
        pl.concat(self.ledger_frames, how="vertical").write_parquet(path)

    def flush(self) -> None:
        """Append this chunk's index rows to the CSV files (header only on the first chunk)."""
        header = self._first_flush
        self._first_flush = False
        _append_csv(
            self.out / "ecg" / "record_list.csv",
            pl.DataFrame(
                self.ecg_rows,
                schema=["subject_id", "study_id", "file_name", "ecg_time", "path"],
                orient="row",
            ).with_columns(_fmt_time("ecg_time")),
            header,
        )
        cxr = pl.DataFrame(
            self.cxr_rows, schema=["dicom_id", "subject_id", "study_id", "ViewPosition", "t"], orient="row"
        )
        cxr = cxr.with_columns(
            pl.col("t").cast(pl.Datetime("us")).alias("dt"),
        ).select(
            "dicom_id",
            "subject_id",
            "study_id",
            pl.when(pl.col("ViewPosition") == "AP")
            .then(pl.lit("CHEST (PORTABLE AP)"))
            .otherwise(pl.lit("CHEST (PA AND LAT)"))
            .alias("PerformedProcedureStepDescription"),
            "ViewPosition",
            pl.lit(self.cfg.cxr_size).alias("Rows"),
            pl.lit(self.cfg.cxr_size).alias("Columns"),
            pl.col("dt").dt.strftime("%Y%m%d").cast(pl.Int64).alias("StudyDate"),
            (pl.col("dt").dt.strftime("%H%M%S").cast(pl.Float64) + pl.col("dt").dt.millisecond() / 1000)
            .round(3)
            .alias("StudyTime"),
            pl.col("ViewPosition")
            .replace({"PA": "postero-anterior", "AP": "antero-posterior", "LATERAL": "lateral"})
            .alias("ViewCodeSequence_CodeMeaning"),
        )
        _append_csv(self.out / "cxr" / "mimic-cxr-2.0.0-metadata.csv", cxr, header)
        cols = ["note_id", "subject_id", "hadm_id", "note_type", "note_seq", "charttime", "storetime", "text"]
        for name, rows in self.notes.items():
            df = pl.DataFrame(rows, schema=cols, orient="row").with_columns(
                _fmt_time("charttime"), _fmt_time("storetime")
            )
            with gzip.open(self.out / "note" / f"{name}.csv.gz", "ab", compresslevel=5) as f:
                df.write_csv(f, include_header=header)
        self.ledger_frames.append(pl.DataFrame(self.ledger, schema=self.LEDGER_SCHEMA, orient="row"))
        self.ecg_rows, self.cxr_rows, self.ledger = [], [], []
        self.notes = {"discharge": [], "radiology": []}


def _fmt_time(col: str) -> pl.Expr:
    return pl.col(col).cast(pl.Datetime("us")).dt.strftime("%Y-%m-%d %H:%M:%S").alias(col)


def _append_csv(path: Path, df: pl.DataFrame, header: bool) -> None:
    with open(path, "ab") as f:
        df.write_csv(f, include_header=header)
