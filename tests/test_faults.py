"""Fault and bad-input trials, one row per fault class, as a hostile but fair new user would try them.

Every stage runs here through the real `mmehr` command line on one small synthetic cohort (20 subjects:
MEDS, WFDB ECGs, note CSVs), its timelines, events, embedding stores and a tiny trained run. Each row of
FAULTS names a fault class and the verdict it must get:

    refused    a clear error (exit 1) naming the file and the problem; nothing of the user's is lost
    counted    the run goes on, skipping or flagging the bad part, and says how many (stderr, manifest)
    recovered  the stage works around the damage and says so (a damaged checkpoint, a moved run)
    accepted   what looks risky but is legitimate still works (a stage replacing its own output)

Add a row for each new fault class; the count of classes tried is the length of FAULTS.
"""

from __future__ import annotations

import contextlib
import gzip
import hashlib
import io
import json
import os
import shutil
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import polars as pl
import pytest
import torch
import yaml
from safetensors.torch import load, load_file

from mmehr.checkpoint import check_vocabulary, load_config_of, resolve_checkpoint
from mmehr.cli import main
from mmehr.data.tokenizer import UNK, UNK_SUFFIX, Vocab
from mmehr.evaluate.scoring import fixed_threshold
from mmehr.io import is_complete, read_json, write_json
from mmehr.modalities.encode import encode_events
from mmehr.modalities.encoders import get_encoder
from mmehr.runconfig import modality_stores

CONFIGS = Path(__file__).resolve().parent.parent / "configs"
EVAL = ("--task", "icu_mortality", "--rollouts", "2", "--max-samples", "2", "--no-progress", "--threads", "1")


# ----------------------------------------------------------------------------------------------------
# The world every trial starts from, and helpers


@dataclass
class World:
    synth: Path  # `mmehr synth` output: meds/, ecg/, note/, cxr/
    timelines: Path
    events: dict[str, Path]  # note, ecg
    stores: dict[str, Path]  # note (note-hash), ecg (ecg-patch): both 128 wide
    run: Path  # a finished tiny training run on the note store: checkpoints step-4, step-8


def cli(*args: object) -> tuple[int, str, str]:
    """`mmehr ARGS` in this process: (exit code, stdout, stderr)."""
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        rc = main([str(a) for a in args])
    return rc, out.getvalue(), err.getvalue()


def ok(*args: object) -> tuple[str, str]:
    rc, out, err = cli(*args)
    assert rc == 0, err[-3000:]
    return out, err


def refused(result: tuple[int, str, str], *needles: object) -> str:
    """The command failed with exit 1 and one error line holding every needle (paths, the problem)."""
    rc, _, err = result
    assert rc == 1, err[-3000:]
    assert "error:" in err and "Traceback" not in err, err[-3000:]
    for needle in needles:
        assert str(needle) in err, f"{needle!r} not in {err[-2000:]!r}"
    return err


def snapshot(root: Path) -> dict[str, str]:
    """sha256 of every file under root (hidden ones too), by relative path."""
    return {
        str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
        if p.is_file()
    }


def user_folder(path: Path) -> Path:
    path.mkdir(parents=True)
    (path / "thesis.tex").write_text("three years of work")
    return path


def run_config(w: World, path: Path, **modalities: Path) -> Path:
    """A tiny run config (2 layers x 32, context 48, 8 steps) with the given stores per modality slot."""
    cfg = {
        "data": {"timelines": str(w.timelines), "modalities": {m: {"store": str(s), "k_max": 2} for m, s in modalities.items()}},
        "model": {"n_layer": 2, "n_head": 2, "n_embd": 32, "block_size": 48,
                  "fusion": {"modalities": {m: {"compression": "latent", "n_latents": 4, "n_latent_layers": 1} for m in modalities}}},
        "optim": {"lr": 3e-3, "min_lr": 3e-4, "warmup_steps": 2, "max_steps": 8, "batch_size": 4, "grad_accum": 1},
        "run": {"seed": 0, "threads": 1, "log_every": 2, "eval_every": 4, "val_windows": 4, "checkpoint_every": 4,
                "keep_checkpoints": 2},
    }  # fmt: skip
    path.write_text(yaml.safe_dump(cfg))
    return path


def copy_run(w: World, to: Path) -> Path:
    shutil.copytree(w.run, to)
    return to


def edit_configs(run: Path, edit: Callable[[dict], None]) -> None:
    """Apply `edit` to every config.yaml of a run (the run's and each checkpoint's)."""
    for path in run.rglob("config.yaml"):
        cfg = yaml.safe_load(path.read_text())
        edit(cfg)
        path.write_text(yaml.safe_dump(cfg, sort_keys=False))


def final_weights(run: Path) -> Path:
    return run / read_json(run / "manifest.json")["final_checkpoint"] / "model.safetensors"


def evaluated_weights(run: Path) -> Path:
    """The weights `mmehr evaluate --checkpoint RUN` loads (the best validated checkpoint)."""
    return resolve_checkpoint(run) / "model.safetensors"


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> World:
    root = tmp_path_factory.mktemp("faults")
    synth, timelines = root / "synth", root / "timelines"
    ok("synth", "--out", synth, "--subjects", "20", "--seed", "0")
    ok("tokenize", "--meds", synth / "meds", "--out", timelines, "--no-progress")
    events = {m: root / "events" / m for m in ("note", "ecg")}
    stores = {m: root / "stores" / m for m in ("note", "ecg")}
    for m, encoder in (("note", "note-hash"), ("ecg", "ecg-patch")):
        ok("index", "--source", m, "--root", synth / m, "--out", events[m])
        ok("encode", "--events", events[m], "--encoder", encoder, "--out", stores[m], "--workers", "0")
    w = World(synth, timelines, events, stores, root / "run")
    ok(
        "train",
        "--config",
        run_config(w, root / "run.yaml", note=stores["note"]),
        "--out",
        w.run,
        "--no-progress",
    )
    return w


# ----------------------------------------------------------------------------------------------------
# Outputs that would destroy or mix with what is there (issue items 1-3)


def tokenize_out_is_its_meds_input(w: World, tmp: Path, request) -> None:
    meds = shutil.copytree(w.synth / "meds", tmp / "meds")
    before = snapshot(meds)
    refused(cli("tokenize", "--meds", meds, "--out", meds), f"--out {meds} is the input {meds}")
    assert snapshot(meds) == before


def index_out_is_its_source_root(w: World, tmp: Path, request) -> None:
    root = shutil.copytree(w.synth / "ecg", tmp / "ecg")
    before = snapshot(root)
    refused(cli("index", "--source", "ecg", "--root", root, "--out", root), "is the input")
    assert snapshot(root) == before


def index_out_inside_its_source_root(w: World, tmp: Path, request) -> None:
    root = shutil.copytree(w.synth / "ecg", tmp / "ecg")
    refused(
        cli("index", "--source", "ecg", "--root", root, "--out", root / "events"), "lies inside the input"
    )
    assert not (root / "events").exists()


def tokenize_out_contains_its_meds_input(w: World, tmp: Path, request) -> None:
    synth = shutil.copytree(w.synth, tmp / "synth")
    before = snapshot(synth)
    refused(cli("tokenize", "--meds", synth / "meds", "--out", synth), "contains the input")
    assert snapshot(synth) == before


def tokenize_out_is_a_users_folder(w: World, tmp: Path, request) -> None:
    folder = user_folder(tmp / "mine")
    refused(
        cli("tokenize", "--meds", w.synth / "meds", "--out", folder),
        folder, "already holds 1 entry that mmehr did not write (thesis.tex)",
    )  # fmt: skip
    assert (folder / "thesis.tex").read_text() == "three years of work"


def synth_out_is_a_users_folder(w: World, tmp: Path, request) -> None:
    folder = user_folder(tmp / "mine")
    refused(cli("synth", "--out", folder, "--subjects", "4"), "did not write (thesis.tex)")
    assert sorted(p.name for p in folder.iterdir()) == ["thesis.tex"]


def tokenize_out_is_a_trained_run(w: World, tmp: Path, request) -> None:
    run = copy_run(w, tmp / "run")
    before = snapshot(run)
    refused(
        cli("tokenize", "--meds", w.synth / "meds", "--out", run),
        "already holds a complete `mmehr train` output",
    )
    assert snapshot(run) == before


def train_out_is_its_timelines(w: World, tmp: Path, request) -> None:
    before = snapshot(w.timelines)
    config = run_config(w, tmp / "run.yaml")
    refused(cli("train", "--config", config, "--out", w.timelines, "--no-progress"), "is the input")
    assert snapshot(w.timelines) == before


def encode_out_is_its_events(w: World, tmp: Path, request) -> None:
    events = shutil.copytree(w.events["note"], tmp / "events")
    before = snapshot(events)
    refused(cli("encode", "--events", events, "--encoder", "note-hash", "--out", events), "is the input")
    assert snapshot(events) == before
    ok("encode", "--events", events, "--encoder", "note-hash", "--out", tmp / "store", "--workers", "0")
    assert read_json(tmp / "store" / "manifest.json")["counts"]["events"] > 0  # the events still encode


def evaluate_out_is_the_run(w: World, tmp: Path, request) -> None:
    run = copy_run(w, tmp / "run")
    before = snapshot(run)
    refused(cli("evaluate", "--checkpoint", run, "--out", run, *EVAL), "is the input")
    assert snapshot(run) == before and resolve_checkpoint(run).is_dir()  # still a run that evaluates


def ablate_and_demo_out_is_a_users_folder(w: World, tmp: Path, request) -> None:
    folder = user_folder(tmp / "mine")
    grid = tmp / "grid.yaml"
    grid.write_text(yaml.safe_dump({"base": str(CONFIGS / "demo.yaml"), "runs": {"a": []}}))
    refused(cli("ablate", "--grid", grid, "--out", folder), "did not write (thesis.tex)")
    refused(cli("demo", "--out", folder, "--fast"), "did not write (thesis.tex)")
    assert sorted(p.name for p in folder.iterdir()) == ["thesis.tex"]


def report_over_a_users_report(w: World, tmp: Path, request) -> None:
    run = copy_run(w, tmp / "run")
    (run / "report.md").write_text("# My own notes\n")
    refused(cli("report", run), run / "report.md", "is not an mmehr report")
    assert (run / "report.md").read_text() == "# My own notes\n"


def a_stage_replaces_its_own_output(w: World, tmp: Path, request) -> None:
    timelines = shutil.copytree(w.timelines, tmp / "timelines")
    (timelines / "stale.txt").write_text("left by an older tokenize")
    ok("tokenize", "--meds", w.synth / "meds", "--out", timelines, "--no-progress")
    assert not (timelines / "stale.txt").exists() and is_complete(timelines)


# ----------------------------------------------------------------------------------------------------
# Artifacts that do not belong together (issue items 4-7)


def evaluate_with_another_vocabulary(w: World, tmp: Path, request) -> None:
    other = tmp / "other"
    ok("tokenize", "--meds", w.synth / "meds", "--out", other, "--min-code-count", "200", "--no-progress")
    assert len(Vocab.load(other)) < len(Vocab.load(w.timelines))  # smaller: every id is a valid index
    refused(
        cli("evaluate", "--checkpoint", w.run, "--timelines", other, "--out", tmp / "eval", *EVAL),
        f"{other / 'vocab.json'} is not the vocabulary",
    )
    assert not (tmp / "eval").exists()
    same = tmp / "same"  # the training vocabulary reused on the same data: accepted
    ok("tokenize", "--meds", w.synth / "meds", "--out", same, "--vocab-from", w.timelines, "--no-progress")
    check_vocabulary(resolve_checkpoint(w.run), same)


def train_slot_given_another_modalitys_store(w: World, tmp: Path, request) -> None:
    config = run_config(w, tmp / "run.yaml", ecg=w.stores["note"])
    refused(
        cli("train", "--config", config, "--out", tmp / "run", "--no-progress"),
        "data.modalities.ecg takes ecg embeddings but", "holds note embeddings of 'note-hash'",
    )  # fmt: skip


def train_store_is_an_events_directory(w: World, tmp: Path, request) -> None:
    config = run_config(w, tmp / "run.yaml", note=w.events["note"])
    refused(
        cli("train", "--config", config, "--out", tmp / "run", "--no-progress"),
        f"{w.events['note']} is a `mmehr index` output, not an embedding store",
    )


def train_store_without_events(w: World, tmp: Path, request) -> None:
    store = shutil.copytree(w.stores["note"], tmp / "store")  # as an older mmehr finished a store of nothing
    manifest = read_json(store / "manifest.json")
    write_json(store / "manifest.json", {**manifest, "counts": {**manifest["counts"], "events": 0}})
    config = run_config(w, tmp / "run.yaml", note=store)
    refused(
        cli("train", "--config", config, "--out", tmp / "run", "--no-progress"),
        f"{store}: the embedding store holds no events",
    )


def evaluate_store_replaced_by_another_modality(w: World, tmp: Path, request) -> None:
    run = copy_run(w, tmp / "run")  # as if the store were deleted and re-encoded from ECGs, same width
    edit_configs(run, lambda c: c["data"]["modalities"]["note"].update(store=str(w.stores["ecg"])))
    refused(
        cli("evaluate", "--checkpoint", run, "--out", tmp / "eval", *EVAL),
        "takes note embeddings but", "holds ecg embeddings of 'ecg-patch'",
    )  # fmt: skip


def evaluate_store_reencoded_with_other_weights(w: World, tmp: Path, request) -> None:
    other = tmp / "store"
    encode_events(w.events["note"], get_encoder("note-hash", seed=3), other, workers=0, progress=False)
    run = copy_run(w, tmp / "run")
    edit_configs(run, lambda c: c["data"]["modalities"]["note"].update(store=str(other)))
    refused(cli("evaluate", "--checkpoint", run, "--out", tmp / "eval", *EVAL), "encoded with other settings")


def old_run_without_recorded_store_fields(w: World, tmp: Path, request) -> None:
    run = copy_run(w, tmp / "run")  # runs trained before stores were recorded still evaluate
    recorded = yaml.safe_load((run / "config.yaml").read_text())["data"]["modalities"]["note"]
    assert (recorded["modality"], recorded["encoder"]) == ("note", "note-hash") and recorded[
        "settings_sha256"
    ]
    edit_configs(
        run, lambda c: c["data"]["modalities"]["note"].update(modality="", encoder="", settings_sha256="")
    )
    assert set(modality_stores(load_config_of(resolve_checkpoint(run)))) == {"note"}


def encode_events_of_another_modality(w: World, tmp: Path, request) -> None:
    n = pl.read_parquet(w.events["note"] / "events.parquet").height
    refused(
        cli("encode", "--events", w.events["note"], "--encoder", "ecg-patch", "--out", tmp / "store"),
        f"{w.events['note']} holds no ecg events ({n} note)",
    )
    assert not (tmp / "store").exists()


def encode_where_every_payload_fails(w: World, tmp: Path, request) -> None:
    def unreadable(events_dir, row):
        raise OSError("disk error")

    with pytest.raises(
        ValueError, match=r"none of the \d+ events could be encoded \(\d+x OSError: disk error\)"
    ):
        encode_events(w.events["note"], get_encoder("note-hash"), tmp / "store", load_payload=unreadable, progress=False)  # fmt: skip
    assert not is_complete(tmp / "store")  # never trusted by train or evaluate


def evaluate_bit_flipped_weights(w: World, tmp: Path, request) -> None:
    run = copy_run(w, tmp / "run")
    weights = evaluated_weights(run)
    data = bytearray(weights.read_bytes())
    data[-3] ^= 0x10  # one bit of one parameter: still a well-formed safetensors file
    weights.write_bytes(bytes(data))
    assert load_file(str(weights))  # loads fine: only the checksum tells
    refused(cli("evaluate", "--checkpoint", run, "--out", tmp / "eval", *EVAL), weights, "is damaged")


# ----------------------------------------------------------------------------------------------------
# Damaged or wrong files: clear errors naming them, or a counted skip, or a recovery


def note_csv_with_a_non_utf8_byte(w: World, tmp: Path, request) -> None:
    notes = shutil.copytree(w.synth / "note", tmp / "note")
    raw = gzip.decompress((notes / "discharge.csv.gz").read_bytes())
    at = raw.index(b',"', raw.index(b"\n")) + 2  # inside the first note's text
    (notes / "discharge.csv.gz").write_bytes(gzip.compress(raw[:at] + b"\xff" + raw[at:]))
    _, err = ok("index", "--source", "note", "--root", notes, "--out", tmp / "events")
    assert f"{notes / 'discharge.csv.gz'}: 1 row(s) hold bytes that are not UTF-8 (data row 1)" in err
    manifest = read_json(tmp / "events" / "manifest.json")
    assert manifest["counts"]["skipped_by_reason"].get("not UTF-8") == 1
    original = read_json(w.events["note"] / "manifest.json")["counts"]["events"]
    assert manifest["counts"]["events"] == original - 1
    text = raw[at : at + 200].decode("utf-8", "ignore").split('"')[0].strip()
    assert text and text[:40] not in err  # the note's text is never printed


def resume_with_a_truncated_latest_checkpoint(w: World, tmp: Path, request) -> None:
    run = copy_run(w, tmp / "run")
    latest = final_weights(run)
    expected = load(latest.read_bytes())  # a copy: load_file maps the file that is truncated next
    latest.write_bytes(latest.read_bytes()[: latest.stat().st_size // 2])
    _, err = ok("train", "--out", run, "--resume", "--no-progress")
    assert f"{latest.parent} is damaged" in err and f"resuming {run} from step-0000004 (step 4)" in err
    assert (run / "checkpoints" / f"damaged-{latest.parent.name}").is_dir()  # kept, out of the way
    again = load_file(str(final_weights(run)))
    assert all(torch.equal(again[k], expected[k]) for k in expected)  # steps 5-8 trained again, exactly


def evaluate_truncated_or_empty_weights(w: World, tmp: Path, request) -> None:
    run = copy_run(w, tmp / "run")
    weights = evaluated_weights(run)
    weights.write_bytes(weights.read_bytes()[:1000])
    refused(cli("evaluate", "--checkpoint", run, "--out", tmp / "eval", *EVAL), weights, "is damaged")
    weights.write_bytes(b"")  # and a checkpoint written before checksums were recorded
    manifest = read_json(weights.parent / "manifest.json")
    write_json(weights.parent / "manifest.json", {k: v for k, v in manifest.items() if k != "weights_sha256"})
    refused(
        cli("evaluate", "--checkpoint", run, "--out", tmp / "eval", *EVAL),
        weights,
        "not a readable safetensors",
    )


def encoder_weights_that_are_random_bytes(w: World, tmp: Path, request) -> None:
    weights = tmp / "model.safetensors"
    weights.write_bytes(np.random.default_rng(0).bytes(4096))
    refused(
        cli(
            "encode",
            "--events",
            w.events["ecg"],
            "--encoder",
            "csfm",
            "--weights",
            weights,
            "--out",
            tmp / "s",
        ),
        f"{weights}: not a readable safetensors file",
    )


def evaluate_checkpoint_that_is_not_a_run(w: World, tmp: Path, request) -> None:
    refused(
        cli("evaluate", "--checkpoint", w.timelines, "--out", tmp / "eval", *EVAL),
        f"{w.timelines} is a `mmehr tokenize` output, not a training run",
    )


def evaluate_zero_rollouts(w: World, tmp: Path, request) -> None:
    args = [a if a != "2" else "0" for a in EVAL]
    refused(
        cli("evaluate", "--checkpoint", w.run, "--out", tmp / "eval", *args),
        "--rollouts 0: must be at least 1",
    )


def two_encodes_into_one_store(w: World, tmp: Path, request) -> None:
    store = tmp / "store"
    holder = subprocess.Popen(  # another `mmehr encode` writing this store right now
        [sys.executable, "-c", "import sys, time; from mmehr.io import OutputLock; lock = OutputLock(sys.argv[1], 'encode');"
         "print('held', flush=True); time.sleep(120)", str(store)],
        stdout=subprocess.PIPE, text=True, env={**os.environ, "PYTHONPATH": str(Path(__file__).parents[1] / "src")},
    )  # fmt: skip
    try:
        assert holder.stdout.readline().strip() == "held"
        args = (
            "encode",
            "--events",
            w.events["note"],
            "--encoder",
            "note-hash",
            "--out",
            store,
            "--workers",
            "0",
        )
        refused(cli(*args), f"{store} is being written by `mmehr encode` (pid {holder.pid} ")
    finally:
        holder.kill()
        holder.wait()
    ok(*args)  # the lock dies with its holder
    assert is_complete(store)


def undecodable_vocab_json(w: World, tmp: Path, request) -> None:
    timelines = shutil.copytree(w.timelines, tmp / "timelines")
    (timelines / "vocab.json").write_bytes(b"\x89PNG\r\n\x1a\n\xff\xfe")
    refused(
        cli(
            "tokenize",
            "--meds",
            w.synth / "meds",
            "--vocab-from",
            timelines,
            "--out",
            tmp / "t",
            "--no-progress",
        ),
        f"{timelines / 'vocab.json'}: not a JSON text file",
    )


def undecodable_threshold_json(w: World, tmp: Path, request) -> None:
    bad = tmp / "thresholds.json"
    bad.write_bytes(b"\xff\xfe{}")
    refused(
        cli("evaluate", "--checkpoint", w.run, "--out", tmp / "eval", "--threshold-from", bad, *EVAL),
        f"{bad}: not a JSON text file",
    )
    bad.write_text('{"icu_mortality": 0.3}')
    assert fixed_threshold(str(bad), "icu_mortality") == 0.3


def binary_config_file(w: World, tmp: Path, request) -> None:
    config = tmp / "config.yaml"
    config.write_bytes(b"\x7fELF\x02\x01\x01\x00\xff\xfe\x00")
    refused(cli("train", "--config", config, "--out", tmp / "run"), f"{config}: not a YAML text file")


def infinite_numeric_values(w: World, tmp: Path, request) -> None:
    meds = shutil.copytree(w.synth / "meds", tmp / "meds")
    shard = meds / "data" / "train" / "0.parquet"
    df = pl.read_parquet(shard)
    rows = df.with_row_index("i").filter(pl.col("numeric_value").is_not_null())["i"].head(2).to_list()
    value = pl.Series([float("inf"), float("-inf")], dtype=df.schema["numeric_value"])
    df.with_columns(df["numeric_value"].scatter(rows, value)).write_parquet(shard)
    _, err = ok("tokenize", "--meds", meds, "--out", tmp / "t", "--no-progress")
    assert "warning: 2 row(s) with numeric_value +-inf" in err
    splits = read_json(tmp / "t" / "manifest.json")["splits"]
    assert {s: v["infinite_values"] for s, v in splits.items()} == {"train": 2, "tuning": 0, "held_out": 0}


def vocab_from_another_datasets_tokenizer(w: World, tmp: Path, request) -> None:
    other = request.getfixturevalue("demo_timelines")  # the real MIMIC-IV demo's vocabulary
    out = tmp / "t"
    _, err = ok("tokenize", "--meds", w.synth / "meds", "--vocab-from", other, "--out", out, "--no-progress")
    vocab = Vocab.load(out)
    unknown = [i for i, t in enumerate(vocab.itos) if t == UNK or t.endswith(UNK_SUFFIX)]
    splits = read_json(out / "manifest.json")["splits"]
    for split, s in splits.items():
        for key, name in (("unknown_tokens", "tokens.npy"), ("unknown_static", "static_tokens.npy")):
            tokens = np.concatenate([np.load(d / name) for d in (out / split).glob("shard-*")])
            assert s[key] == int(np.isin(tokens, unknown).sum())
    total = sum(s["unknown_tokens"] for s in splits.values())
    assert total > 0 and f"{total:,} of" in err and "codes its vocabulary lacks" in err


def resume_a_moved_run(w: World, tmp: Path, request) -> None:
    before = snapshot(w.run)
    moved = copy_run(w, tmp / "elsewhere" / "run")
    out, err = ok("train", "--config", moved / "config.yaml", "--resume", "--no-progress")
    assert f"resuming {moved} from step-0000008" in err and f"wrote {moved}" in out
    assert snapshot(w.run) == before  # the run it was copied from is untouched
    assert is_complete(moved)


# ----------------------------------------------------------------------------------------------------
# The table


@dataclass(frozen=True)
class Fault:
    name: str
    verdict: str  # refused | counted | recovered | accepted
    trial: Callable[[World, Path, pytest.FixtureRequest], None]


FAULTS = [
    Fault("tokenize --out is its --meds", "refused", tokenize_out_is_its_meds_input),
    Fault("index --out is its --root", "refused", index_out_is_its_source_root),
    Fault("index --out inside its --root", "refused", index_out_inside_its_source_root),
    Fault("tokenize --out contains its --meds", "refused", tokenize_out_contains_its_meds_input),
    Fault("tokenize --out is a user's folder", "refused", tokenize_out_is_a_users_folder),
    Fault("synth --out is a user's folder", "refused", synth_out_is_a_users_folder),
    Fault("tokenize --out is a trained run", "refused", tokenize_out_is_a_trained_run),
    Fault("train --out is its timelines", "refused", train_out_is_its_timelines),
    Fault("encode --out is its --events", "refused", encode_out_is_its_events),
    Fault("evaluate --out is the run", "refused", evaluate_out_is_the_run),
    Fault("ablate / demo --out is a user's folder", "refused", ablate_and_demo_out_is_a_users_folder),
    Fault("report over a user's report.md", "refused", report_over_a_users_report),
    Fault("a stage replaces its own output", "accepted", a_stage_replaces_its_own_output),
    Fault("evaluate --timelines of another vocabulary", "refused", evaluate_with_another_vocabulary),
    Fault("train slot given another modality's store", "refused", train_slot_given_another_modalitys_store),
    Fault("train store is an events directory", "refused", train_store_is_an_events_directory),
    Fault("train store without events", "refused", train_store_without_events),
    Fault(
        "evaluate store replaced by another modality's",
        "refused",
        evaluate_store_replaced_by_another_modality,
    ),
    Fault(
        "evaluate store re-encoded with other weights", "refused", evaluate_store_reencoded_with_other_weights
    ),
    Fault("old run without recorded store fields", "accepted", old_run_without_recorded_store_fields),
    Fault("encode events of another modality", "refused", encode_events_of_another_modality),
    Fault("encode where every payload fails", "refused", encode_where_every_payload_fails),
    Fault("evaluate bit-flipped weights", "refused", evaluate_bit_flipped_weights),
    Fault("note CSV with a non-UTF-8 byte", "counted", note_csv_with_a_non_utf8_byte),
    Fault(
        "resume with a truncated latest checkpoint", "recovered", resume_with_a_truncated_latest_checkpoint
    ),
    Fault("evaluate truncated or empty weights", "refused", evaluate_truncated_or_empty_weights),
    Fault("encoder --weights of random bytes", "refused", encoder_weights_that_are_random_bytes),
    Fault("evaluate --checkpoint that is not a run", "refused", evaluate_checkpoint_that_is_not_a_run),
    Fault("evaluate --rollouts 0", "refused", evaluate_zero_rollouts),
    Fault("two encodes into one store", "refused", two_encodes_into_one_store),
    Fault("undecodable vocab.json", "refused", undecodable_vocab_json),
    Fault("undecodable --threshold-from JSON", "refused", undecodable_threshold_json),
    Fault("binary --config", "refused", binary_config_file),
    Fault("+-inf in numeric_value", "counted", infinite_numeric_values),
    Fault("--vocab-from another dataset's tokenizer", "counted", vocab_from_another_datasets_tokenizer),
    Fault("resume a moved run", "recovered", resume_a_moved_run),
]


@pytest.mark.parametrize("fault", FAULTS, ids=[f.name for f in FAULTS])
def test_fault(fault: Fault, world: World, tmp_path: Path, request: pytest.FixtureRequest) -> None:
    fault.trial(world, tmp_path, request)


def test_the_table_names_each_class_once_with_a_verdict() -> None:
    assert len({f.name for f in FAULTS}) == len(FAULTS) >= 36
    assert {f.verdict for f in FAULTS} <= {"refused", "counted", "recovered", "accepted"}
    assert len({f.trial for f in FAULTS}) == len(FAULTS)
    print(
        json.dumps(
            {v: sum(f.verdict == v for f in FAULTS) for v in ("refused", "counted", "recovered", "accepted")}
        )
    )
