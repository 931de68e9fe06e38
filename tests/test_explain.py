"""`mmehr explain`: one sample's page, its attention read off the model, its replayed risk and knock-outs,
and the report's patients section."""

from __future__ import annotations

import contextlib
import io
import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import polars as pl
import pytest
import torch

from mmehr.batch import Batch
from mmehr.cli import main
from mmehr.explain.attention import cross_attention
from mmehr.model.config import FusionConfig, ModalityConfig, ModelConfig
from mmehr.model.gpt import GPT

HOUR = 3_600_000_000
T0 = 1_600_000_000_000_000
TASK = "icu_admission"
# The evaluation options of the demo's --fast evaluations (mmehr.demo.FAST): `evaluate` reruns match them.
FAST_EVAL = ["--rollouts", "4", "--max-samples", "12", "--max-new-tokens", "64"]
SECTIONS = ("1. Timeline", "2. Modality events", "3. Attention", "4. Futures")


def mmehr(*args) -> subprocess.CompletedProcess:
    """`mmehr explain ...` in this process (one interpreter start for the module), its output captured."""
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = main([str(a) for a in args])
    return subprocess.CompletedProcess(args, code, out.getvalue(), err.getvalue())


def evaluate(*args) -> subprocess.CompletedProcess:
    """`mmehr evaluate ...` as the user runs it."""
    cmd = [sys.executable, "-m", "mmehr.cli", "evaluate", *map(str, args)]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=600)


# ----------------------------------------------------------------------------------------------------
# Attention, on a tiny model (no demo needed)


def tiny(compression: str, time_bias: bool = False, n_layer: int = 2) -> GPT:
    torch.manual_seed(0)
    mods = {
        "ecg": ModalityConfig(d_enc=6, compression="mean"),
        "note": ModalityConfig(d_enc=12, compression=compression, n_latents=3, n_latent_layers=1),
    }
    fusion = FusionConfig(modalities=mods, xattn_every=1, gate_init=1.0, time_bias=time_bias)
    m = GPT(ModelConfig(vocab_size=30, n_layer=n_layer, n_head=2, n_embd=16, block_size=32, fusion=fusion))
    if time_bias:  # a learned-looking bias, so that the additive float mask path is exercised
        torch.nn.init.normal_(m.fusion.time_bias.table, std=1.0)
    return m.eval()


def context() -> Batch:
    """One row of 12 tokens an hour apart. Note events at 2.5 h, 6 h (exactly a token's time) and 20 h
    (after every token: present in the batch only to test the mask); one ECG at 4.5 h, one empty slot."""
    from mmehr.batch import ModalityInputs

    g = torch.Generator().manual_seed(0)
    tokens = torch.randint(1, 30, (12,), generator=g).numpy()
    times = (T0 + np.arange(12) * HOUR).astype(np.int64)
    note = ModalityInputs(
        torch.randn(1, 3, 5, 12, generator=g),
        torch.ones(1, 3, 5, dtype=torch.bool),
        T0 + (torch.tensor([[20.0, 6.0, 2.5]], dtype=torch.float64) * HOUR).long(),
        torch.ones(1, 3, dtype=torch.bool),
    )
    ecg = ModalityInputs(
        torch.randn(1, 2, 4, 6, generator=g),
        torch.tensor([[[True] * 4, [False] * 4]]),
        T0 + (torch.tensor([[4.5, 0.0]], dtype=torch.float64) * HOUR).long(),
        torch.tensor([[True, False]]),
    )
    return Batch.from_contexts([(tokens, times)], [1], {"ecg": ecg, "note": note})


@pytest.mark.parametrize("compression,time_bias", [("latent", False), ("none", False), ("mean", True)])
def test_attention_is_zero_on_every_event_a_token_may_not_see(compression, time_bias):
    m = tiny(compression, time_bias)
    batch = context()
    att, logits = cross_attention(m, batch)
    with torch.no_grad():
        full = m(batch.tokens, batch.times, batch.modalities)[0][0, -1]
    np.testing.assert_allclose(logits, full.numpy(), atol=1e-5)  # the hooks change nothing
    assert att.events == [("ecg", 0), ("note", 0), ("note", 1), ("note", 2)]  # the empty ECG slot is absent
    np.testing.assert_array_equal(att.event_time, T0 + np.array([4.5, 20.0, 6.0, 2.5]) * HOUR)
    assert sorted(att.weights) == [0, 1] and att.max_error < 1e-5  # the weights reproduce each block
    times = batch.times[0].numpy()
    may_see = att.event_time[None, :] < times[:, None]  # (T, E), strict: the 6 h note is hidden at 6 h
    assert may_see[7, 2] and not may_see[6, 2] and not may_see[:, 1].any()
    for w in att.weights.values():
        assert (w[~may_see] == 0).all()  # exactly zero, not small
        assert (w[may_see] > 0).all()
        np.testing.assert_allclose(w.sum(1), may_see.any(1).astype(float), atol=1e-6)
    np.testing.assert_array_equal(att.has_any, may_see.any(1))
    assert not att.has_any[:3].any()  # before the first event (2.5 h): no attention at all


def test_an_ehr_only_model_has_no_attention_to_explain():
    torch.manual_seed(0)
    m = GPT(ModelConfig(vocab_size=30, n_layer=1, n_head=2, n_embd=16, block_size=32)).eval()
    batch = Batch.from_contexts([(np.arange(1, 6), T0 + np.arange(5) * HOUR)], [1])
    att, logits = cross_attention(m, batch)
    assert att is None and logits.shape == (30,)


# ----------------------------------------------------------------------------------------------------
# Pages of the demo's multimodal run


@pytest.fixture(scope="module")
def run(fast_demo_out: Path) -> Path:
    return fast_demo_out / "experiments" / "runs" / "all_three" / "seed0"


@pytest.fixture(scope="module")
def sample(fast_demo_out: Path, run: Path) -> int:
    """A held-out sample of the evaluation whose subject has a note acquired after the prediction time
    (within a month) and one before: the page must show the former masked."""
    samples = pl.read_parquet(run / "eval" / TASK / "samples.parquet").with_row_index("n")
    notes = pl.read_parquet(
        fast_demo_out / "events" / "note" / "events.parquet", columns=["subject_id", "time"]
    )
    for r in samples.with_columns(pl.col("prediction_time").cast(pl.Int64)).iter_rows(named=True):
        t = notes.filter(pl.col("subject_id") == r["subject_id"])["time"].to_numpy()
        if ((t >= r["prediction_time"]) & (t < r["prediction_time"] + 30 * 24 * HOUR)).any() and (
            t < r["prediction_time"]
        ).any():
            return int(r["n"])
    pytest.fail("no demo sample has a note after its prediction time")


@pytest.fixture(scope="module")
def page(run: Path, sample: int, tmp_path_factory) -> tuple[Path, str]:
    out = tmp_path_factory.mktemp("explain") / "page"
    result = mmehr(
        "explain", "--checkpoint", run / "train", "--task", TASK, "--sample", sample,
        "--eval", run / "eval", "--out", out, "--heat-strip",
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    return out, result.stdout + result.stderr


def _record(page_dir: Path) -> dict:
    return json.loads((page_dir / "explain.json").read_text())


def test_the_page_has_every_section_and_its_pictures(page, sample):
    out, _ = page
    html = (out / "index.html").read_text()
    for section in SECTIONS:
        assert f"<h2>{section}</h2>" in html
    images = re.findall(r'<img src="([^"]+)"', html)
    for name in ("timeline.png", "attention.png", "heat_strip.png", "knockout.png", "futures.png"):
        assert name in images
    assert any(i.endswith("-ecg.png") for i in images) and any(i.endswith("-cxr.png") for i in images)
    for name in images:  # every picture is a local PNG: the page opens offline
        assert (out / name).read_bytes()[:4] == b"\x89PNG"
    assert not re.search(r"(src|href)=\"(https?:|//)", html) and "<script" not in html
    r = _record(out)
    assert r["sample"] == sample and r["task"] == TASK
    assert len(r["context"]["static"]) == 5  # the demo's static context, shown apart
    assert {s["kind"] for s in r["stays"]} >= {"hospital"}
    assert r["gates"] and all(0 < g < 1 for gates in r["gates"].values() for g in gates)
    assert len(r["rollouts"]) == 4 and r["next_events"]
    assert (out / "manifest.json").is_file()


def test_the_risk_is_the_one_the_evaluation_recorded(page, run, sample):
    r = _record(page[0])
    recorded = pl.read_parquet(run / "eval" / TASK / "samples.parquet")["predicted_boolean_probability"][
        sample
    ]
    assert r["risk"]["probability"] == pytest.approx(recorded, abs=1e-6)
    assert r["risk"]["recorded_probability"] == pytest.approx(recorded, abs=1e-6) and not r["notes"]
    counted = [x for x in r["rollouts"] if x["counted"]]
    hits = sum(x["stop_reason"] == "outcome" for x in counted)
    assert r["risk"]["probability"] == pytest.approx(hits / len(counted))


def test_an_event_after_the_prediction_time_is_masked_and_gets_no_attention(page):
    out, _ = page
    r = _record(out)
    t = r["prediction_time_us"]
    later = [e for e in r["events"] if e["time_us"] >= t]
    assert later and any(e["modality"] == "note" for e in later)
    for e in later:
        assert e["status"] == "masked" and e["slot"] is None
        assert set(e["attention"].values()) == {0.0}
    visible = [e for e in r["events"] if e["status"] == "visible"]
    assert visible and all(e["time_us"] < t for e in visible)
    for layer in r["gates"]:  # the prediction-time token's attention is spread over what it sees
        assert sum(e["attention"][layer] for e in visible) == pytest.approx(1.0, abs=1e-5)
    html = (out / "index.html").read_text()
    for e in later:
        row = html[html.index(e["event_id"]) :].split("</tr>")[0]
        assert "class='masked'" in row and "0.000" in row


def test_note_text_only_with_show_text_and_never_in_the_output(page, fast_demo_out, run, sample, tmp_path):
    out, log = page
    r = _record(out)
    notes = pl.read_parquet(fast_demo_out / "events" / "note" / "events.parquet")
    texts = [
        notes.filter(pl.col("event_id") == e["event_id"])["text"][0]
        for e in r["events"]
        if e["modality"] == "note"
    ]
    html = (out / "index.html").read_text()
    assert texts and not any(t[:40] in html or t[:40] in log for t in texts)
    assert all(e["characters"] > 0 and e["note_type"] for e in r["events"] if e["modality"] == "note")
    shown = tmp_path / "shown"
    result = mmehr(
        "explain", "--checkpoint", run / "train", "--task", TASK, "--sample", sample,
        "--eval", run / "eval", "--out", shown, "--show-text", "--no-knockout",
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-2000:]
    html = (shown / "index.html").read_text()
    import html as html_lib

    assert all(html_lib.escape(t[:40], quote=True) in html for t in texts)
    assert not any(t[:40] in result.stdout + result.stderr for t in texts)
    assert "text" not in json.dumps(_record(shown)["events"])


def test_knockout_risks_match_evaluate_with_the_modality_hidden(page, run, sample, tmp_path):
    r = _record(page[0])
    knock = {tuple(k["hidden"]): k["probability"] for k in r["knockout"]}
    assert set(knock) == {("ecg",), ("cxr",), ("note",)}
    hide = ("note",)
    result = evaluate(
        "--checkpoint", run / "train", "--task", TASK, *FAST_EVAL, "--hide-modality", *hide,
        "--threshold-from", "none", "--no-reference", "--bootstrap", "0", "--no-progress", "--out", tmp_path / "ev",
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-2000:]
    evaluated = pl.read_parquet(tmp_path / "ev" / TASK / "samples.parquet")["predicted_boolean_probability"]
    assert knock[hide] == pytest.approx(evaluated[sample], abs=1e-6)


def test_explain_by_subject_with_evaluate_options_replays_the_same_futures(page, run, sample, tmp_path):
    # Without --eval, explain samples as `mmehr evaluate` with the same options: the same risk and knock-outs.
    r = _record(page[0])
    out = tmp_path / "by_subject"
    at = str(r["prediction_time_us"])
    result = mmehr(
        "explain", "--checkpoint", run / "train", "--task", TASK, "--subject", r["subject_id"],
        "--prediction-time", at, *FAST_EVAL, "--out", out,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-2000:]
    again = _record(out)
    assert again["sample"] == sample and again["risk"]["probability"] == r["risk"]["probability"]
    assert again["knockout"] == [{**k, "recorded_probability": None} for k in r["knockout"]]
    visible = sum(e["status"] == "visible" for e in r["events"])
    assert sum(k["events_hidden"] for k in r["knockout"]) == visible > 0
    assert re.search(r"wrote .*index\.html in \d+\.\d s", result.stdout)


@pytest.mark.parametrize(
    "args,message",
    [
        (["--subject", "1"], "subject 1 is not in split 'held_out'"),
        (["--sample", "999"], "--sample 999: task icu_admission has samples 0..11"),
        (["--sample", "0", "--rollouts", "3"], "--rollouts: --eval replays that evaluation's own settings"),
        (
            ["--subject", "{subject}", "--prediction-time", "2000-01-01T00:00"],
            "has no sample of icu_admission at",
        ),
        (["--sample", "0", "--prediction-time", "0"], "--prediction-time goes with --subject"),
    ],
)
def test_bad_input_fails_naming_the_problem(args, message, run, page, tmp_path):
    subject = str(_record(page[0])["subject_id"])
    args = [a.replace("{subject}", subject) for a in args]
    result = mmehr(
        "explain",
        "--checkpoint",
        run / "train",
        "--task",
        TASK,
        "--eval",
        run / "eval",
        *args,
        "--out",
        tmp_path / "x",
    )
    assert result.returncode == 1 and message in result.stderr, result.stderr[-2000:]
    assert not (tmp_path / "x").exists()


def test_explain_refuses_a_directory_it_did_not_write(run, tmp_path):
    (tmp_path / "mine.txt").write_text("keep me")
    result = mmehr(
        "explain", "--checkpoint", run / "train", "--task", TASK, "--sample", "0",
        "--eval", run / "eval", "--out", tmp_path, "--no-knockout",
    )  # fmt: skip
    assert result.returncode == 1 and "replaces only its own output" in result.stderr
    assert (tmp_path / "mine.txt").read_text() == "keep me"


def test_the_report_links_the_highest_and_lowest_risk_patients(fast_demo_out):
    report = (fast_demo_out / "report.md").read_text()
    section = re.split(r"\n(?:## |<details)", report[report.index("## Patients") :])[0]
    rows = [line for line in section.splitlines() if line.startswith("| ") and not line.startswith("| which")]
    whichs = [row.split("|")[1].strip() for row in rows]
    assert set(whichs) <= {
        "highest-risk positive",
        "lowest-risk positive",
        "highest-risk negative",
        "lowest-risk negative",
    }
    assert len(rows) >= 3
    risks = {w: float(row.split("|")[6]) for w, row in zip(whichs, rows, strict=True)}
    if "highest-risk positive" in risks and "lowest-risk positive" in risks:
        assert risks["highest-risk positive"] >= risks["lowest-risk positive"]
    for link in re.findall(r"\]\((patients/[^)]+/index\.html)\)", section):
        page = fast_demo_out / link
        assert page.is_file() and "<h2>4. Futures</h2>" in page.read_text()
        record = json.loads((page.parent / "explain.json").read_text())
        assert record["risk"]["probability"] == pytest.approx(
            record["risk"]["recorded_probability"], abs=1e-6
        )
    assert 'href="patients/' in (fast_demo_out / "report.html").read_text()


@pytest.mark.slow
@pytest.mark.skipif(shutil.which("chromium") is None, reason="needs chromium (apt-get install chromium)")
def test_the_page_renders_in_headless_chromium_without_console_errors(page, tmp_path):
    out, _ = page
    shot = tmp_path / "page.png"
    result = subprocess.run(
        ["chromium", "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
         "--disable-component-update", "--no-first-run", "--enable-logging=stderr", "--v=0",
         f"--screenshot={shot}", "--window-size=1400,3000", (out / "index.html").as_uri()],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-2000:]
    assert "CONSOLE" not in result.stderr, result.stderr  # any console message would be an error here
    from PIL import Image

    image = np.asarray(Image.open(shot).convert("L"))
    assert image.shape == (3000, 1400) and image.std() > 20  # a rendered page, not a blank one


def test_an_ehr_only_run_gets_a_page_without_attention_or_knockouts(fast_demo_out, tmp_path):
    run = fast_demo_out / "experiments" / "runs" / "ehr_only" / "seed0"
    result = mmehr(
        "explain", "--checkpoint", run / "train", "--task", TASK, "--sample", "0", "--eval", run / "eval",
        "--out", tmp_path / "page",
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-2000:]
    r = _record(tmp_path / "page")
    assert r["modalities"] == [] and r["events"] == [] and r["knockout"] == [] and r["gates"] == {}
    html = (tmp_path / "page" / "index.html").read_text()
    assert all(f"<h2>{s}</h2>" in html for s in SECTIONS) and "An EHR-only model" in html
    assert "futures.png" in html and "attention.png" not in html
