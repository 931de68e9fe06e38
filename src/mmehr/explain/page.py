"""One sample's page: `index.html` beside its PNGs and `explain.json` (every number the page shows).

The page is plain HTML with relative links to its pictures: no script, no web font, nothing fetched, so
it opens offline from the file system. A note's text appears only with `show_text` (escaped, folded);
otherwise the page gives a note's type and length.
"""

from __future__ import annotations

import datetime
import html
from pathlib import Path

import numpy as np

from mmehr.evaluate.sampler import OUTCOME, STOP_REASONS
from mmehr.explain import figures
from mmehr.explain.collect import Explanation
from mmehr.explain.events import STATUSES
from mmehr.explain.replay import iso
from mmehr.io import MANIFEST, atomic_path, write_json
from mmehr.units import HOUR_US

STYLE = (
    "body{font-family:system-ui,sans-serif;max-width:1400px;margin:1.5em auto;padding:0 1em;color:#222}"
    "table{border-collapse:collapse;margin:.5em 0}td,th{border:1px solid #ccc;padding:3px 8px;font-size:13px;"
    "vertical-align:middle}th{background:#f0f3f7;text-align:left}img{max-width:100%}"
    ".visible{color:#1b5e1b;font-weight:600}.masked{color:#d62728;font-weight:600}.hidden,.not-retrieved{color:#777}"
    ".note{background:#fff6dd;padding:6px 10px;border-left:4px solid #e0b000}pre{white-space:pre-wrap;"
    "background:#f6f6f6;padding:8px;font-size:12px}summary{cursor:pointer}.num{text-align:right}"
)


def _e(x) -> str:
    return html.escape(str(x), quote=True)


def _pct(p) -> str:
    return "n/a" if p is None or not np.isfinite(p) else f"{p:.2f}"


def _rel(ex: Explanation, t: int) -> str:
    return figures._hours_label((t - ex.prediction_us) / HOUR_US)


def _table(head: list[str], rows: list[list[str]]) -> str:
    """Rows of already-escaped HTML cells."""
    out = ["<table><tr>" + "".join(f"<th>{_e(h)}</th>" for h in head) + "</tr>"]
    out += ["<tr>" + "".join(f"<td>{c}</td>" for c in row) + "</tr>" for row in rows]
    return "\n".join(out) + "</table>"


def write_page(
    ex: Explanation, out: str | Path, *, show_text: bool = False, heat_strip: bool = False
) -> Path:
    """Write the page of `ex` into directory `out` (replacing an earlier explain page there); returns
    the path of its index.html."""
    out = Path(out)
    with atomic_path(out, stage="explain") as tmp:
        tmp.mkdir(parents=True)
        body = _body(ex, tmp, show_text=show_text, heat_strip=heat_strip)
        title = f"mmehr explain: {ex.task.name}, subject {ex.subject_id}"
        (tmp / "index.html").write_text(
            f"<!doctype html><html lang='en'><head><meta charset='utf-8'><title>{_e(title)}</title>"
            f"<style>{STYLE}</style></head><body>\n{body}\n</body></html>\n"
        )
        write_json(tmp / "explain.json", ex.record())
        write_json(
            tmp / MANIFEST,
            {
                "stage": "explain",
                "created_at": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
                "task": ex.task.name,
                "split": ex.split,
                "sample": ex.sample,
                "subject_id": ex.subject_id,
                "prediction_time_us": ex.prediction_us,
                "evaluation": ex.evaluation,
                "show_text": show_text,
            },
        )
    return out / "index.html"


def _img(path: Path | None, alt: str) -> str:
    return f'<img src="{_e(path.name)}" alt="{_e(alt)}">' if path is not None else ""


def _body(ex: Explanation, d: Path, *, show_text: bool, heat_strip: bool) -> str:
    r = ex.risk
    parts = [f"<h1>{_e(ex.task.name)}: subject {ex.subject_id}, sample {ex.sample} ({_e(ex.split)})</h1>"]
    outcome = "none before the timeline ends"
    if ex.outcome_token is not None:
        outcome = f"{_e(ex.outcome_token)} at {iso(ex.outcome_us)} ({_rel(ex, ex.outcome_us)})"
    summary = [
        ["task", _e(ex.task.description or ex.task.name)],
        ["prediction time", _e(iso(ex.prediction_us))],
        ["true label", "<b>positive</b>" if ex.label else "negative"],
        ["real outcome (first positive or stop token)", outcome],
        [
            "predicted risk",
            f"<b>{_pct(r.probability)}</b> ({int((r.counted & (r.reason == OUTCOME)).sum())} of "
            f"{int(r.counted.sum())} counted rollouts reached the outcome; {r.counted.size} sampled)",
        ],
    ]
    if ex.evaluation:
        rec = _pct(ex.recorded_probability)
        summary.append(["evaluation replayed", f"{_e(ex.evaluation)} (its recorded risk: {rec})"])
    s = ex.settings
    summary.append(
        [
            "sampling",
            _e(
                f"K = {s['rollouts']}, temperature {s['temperature']}, seed {s['seed']}, chunk {s['sample_chunk']} "
                f"of {s['samples_per_chunk']} samples, context {s['context_tokens']} tokens, safety cap "
                f"{s['max_new_tokens']} tokens"
            ),
        ]
    )
    parts.append(_table(["", ""], summary))
    parts += [f"<p class='note'>{_e(n)}</p>" for n in ex.notes]

    parts.append("<h2>1. Timeline</h2>")
    parts.append(
        "<p>The context's tokens (dark) on a real time axis, the real timeline after the prediction time "
        "(grey: the model never saw it), hospital, ED and ICU stays shaded, modality events by status, the "
        "prediction time (black line) and the true outcome (star). Value (Q1..Q10) and interval tokens are "
        "not drawn.</p>"
    )
    parts.append(_img(figures.timeline(ex, d / "timeline.png"), "timeline"))
    parts.append("<h3>Static context (prepended to the context, as of its first token)</h3>")
    parts.append(_table(["static token"], [[_e(t)] for t in ex.static]))
    stays = [[_e(k), _e(iso(a)), _e(iso(b)), f"{(b - a) / HOUR_US:.1f} h"] for k, a, b in ex.stays]
    if stays:
        parts.append(_table(["stay", "start", "end", "length"], stays))
    rows = [[_e(iso(t)), _e(_rel(ex, t)), _e(tok)] for tok, t in zip(ex.context_tokens, ex.context_times)]
    parts.append(
        f"<details><summary>the context's {len(rows)} timeline tokens</summary>"
        + _table(["time", "relative", "token"], rows)
        + "</details>"
    )

    parts.append("<h2>2. Modality events</h2>")
    parts.append(_events(ex, d, show_text))

    parts.append("<h2>3. Attention</h2>")
    parts.append(_attention(ex, d, heat_strip))

    parts.append("<h2>4. Futures</h2>")
    parts.append(_futures(ex, d))
    return "\n".join(p for p in parts if p)


def _events(ex: Explanation, d: Path, show_text: bool) -> str:
    if not ex.modalities:
        return "<p>An EHR-only model: it is conditioned on no modality event.</p>"
    if not ex.events:
        return f"<p>No {'/'.join(ex.modalities)} event of this subject in view.</p>"
    layers = sorted(ex.attention.weights) if ex.attention else []
    head = ["time", "relative", "modality", "event", "status", "picture / note"]
    head += [f"attention, block before layer {layer}" for layer in layers]
    rows = []
    for k, e in enumerate(ex.events):
        picture = ""
        if e.payload_error:
            picture = f"<span class='hidden'>payload not shown: {_e(e.payload_error)}</span>"
        elif e.modality == "ecg":
            picture = _img(figures.ecg_strip(e.payload, d / f"event-{k:02d}-ecg.png"), "ECG lead II")
            picture += f"<br><small>lead II, {e.meta.get('fs') or '?'} Hz</small>"
        elif e.modality == "cxr":
            picture = _img(figures.cxr_thumbnail(e.payload, d / f"event-{k:02d}-cxr.png"), "chest X-ray")
            picture += f"<br><small>{_e(e.meta.get('view_position') or '')}</small>"
        elif e.modality == "note":
            picture = (
                f"note type {_e(e.meta.get('note_type'))}, {e.meta.get('characters', 0):,} characters, "
                f"{e.meta.get('words', 0):,} words"
            )
            if show_text and isinstance(e.payload, str):
                picture += f"<details><summary>text</summary><pre>{_e(e.payload)}</pre></details>"
        status = f"<span class='{e.status.replace(' ', '-')}'>{_e(e.status)}</span>"
        if e.slot is not None:
            status += f"<br><small>slot {e.slot + 1} of its modality</small>"
        cells = [_e(iso(e.time)), _e(_rel(ex, e.time)), _e(e.modality), _e(e.event_id), status, picture]
        cells += ["—" if layer not in e.attention else f"{e.attention[layer]:.3f}" for layer in layers]
        rows.append(cells)
    counts = {s: sum(e.status == s for e in ex.events) for s in STATUSES}
    legend = ", ".join(f"{n} {s}" for s, n in counts.items() if n)
    return (
        f"<p>{legend}. At the prediction time the model sees an event only if it was acquired strictly "
        "before it and is one of the K_m most recent of its modality; the attention columns give the mass "
        "the prediction-time token puts on each event (0 for every event it cannot see).</p>"
        + _table(head, rows)
    )


def _attention(ex: Explanation, d: Path, heat_strip: bool) -> str:
    att = ex.attention
    parts = []
    if att is None:
        what = "An EHR-only model has" if not ex.modalities else "This context has"
        parts.append(f"<p>{what} no modality event to attend to.</p>")
    else:
        parts.append(
            "<p>The cross-attention mass the prediction-time token puts on each event it sees, per gated "
            "cross-attention block (mean over heads; an event's latent tokens summed). The gate scales the "
            "whole update of the block: a closed gate (near 0) means the modalities barely reach the "
            f"decoder whatever the attention. Recomputed weights reproduce the blocks' outputs to "
            f"{att.max_error:.1e}.</p>"
        )
        parts.append(_img(figures.attention(ex, d / "attention.png"), "attention per event"))
        if heat_strip:
            parts.append(
                _img(figures.heat_strip(ex, d / "heat_strip.png"), "attention of every context token")
            )
    if ex.knockout:
        r = ex.risk
        k_counted = int(r.counted.sum())
        p = r.probability if np.isfinite(r.probability) else 0.0
        noise = 2 * np.sqrt(p * (1 - p) / k_counted) if k_counted else float("nan")
        parts.append(
            "<h3>Knock-out: the risk with each modality hidden</h3><p>The same chunk of samples re-sampled "
            "with the same seed, with the modality's events left out of every context (as "
            "<code>mmehr evaluate --hide-modality</code> does). A risk is a share of "
            f"{k_counted} counted rollouts: a change smaller than about ±{noise:.2f} (two binomial standard "
            "errors) is within sampling noise. Hiding a modality also changes the other samples of the chunk, "
            "and so the random draws: a knock-out moves the risk even of a context that held no event of "
            "that modality.</p>"
        )
        rows = [
            ["all modalities", _pct(r.probability), "", str(k_counted), "", _pct(ex.recorded_probability)]
        ]
        for k in ex.knockout:
            change = "n/a" if k["change"] is None else f"{k['change']:+.2f}"
            rows.append(
                [
                    _e("without " + " + ".join(k["hidden"])),
                    _pct(k["probability"]),
                    change,
                    str(k["counted_rollouts"]),
                    str(k["events_hidden"]),
                    _pct(k["recorded_probability"]),
                ]
            )
        head = ["condition", "risk", "change", "counted rollouts", "events hidden from this context"]
        parts.append(_table([*head, "evaluation's recorded risk"], rows))
        parts.append(_img(figures.knockout(ex, d / "knockout.png"), "knock-out"))
    return "\n".join(p for p in parts if p)


def _futures(ex: Explanation, d: Path) -> str:
    r = ex.risk
    parts = [_img(figures.futures(ex, d / "futures.png"), "futures")]
    counts = {reason: int((r.reason == k).sum()) for k, reason in enumerate(STOP_REASONS)}
    parts.append(
        "<p>How the rollouts ended: "
        + ", ".join(f"{reason} {n}" for reason, n in counts.items() if n)
        + f". Counted in the risk: {int(r.counted.sum())} (the task leaves out "
        + _e(", ".join(ex.task.exclude_from_probability) or "none")
        + "; unfinished ones never count).</p>"
    )
    rows = []
    for k in np.argsort(r.elapsed_us, kind="stable"):
        last = ex.vocab[int(r.last_token[k])] if r.last_token[k] >= 0 else ""
        rows.append(
            [
                str(int(k)),
                _e(STOP_REASONS[int(r.reason[k])]),
                "yes" if r.counted[k] else "no",
                _e(last),
                _e(figures._hours_label(r.elapsed_us[k] / HOUR_US)),
                str(int(r.n_tokens[k])),
            ]
        )
    parts.append(
        "<details><summary>every rollout</summary>"
        + _table(["rollout", "ended by", "counted", "last token", "simulated time", "tokens"], rows)
        + "</details>"
    )
    parts.append("<h3>Most frequent next events</h3>")
    rows = [
        [_e(n["token"]), f"{n['p_model']:.3f}", f"{n['first_share']:.2f}", f"{n['anywhere_share']:.2f}"]
        for n in ex.next_events
    ]
    parts.append(
        _table(
            [
                "token",
                "model's probability of coming next",
                "share of rollouts drawing it first",
                "share of rollouts with it",
            ],
            rows,
        )
    )
    return "\n".join(parts)
