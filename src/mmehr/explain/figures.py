"""The pictures of an explanation page, drawn with matplotlib (Agg) into PNG files.

Time axes are hours relative to the prediction time (0), labelled in hours or days: the overview on a
symmetric log scale (years of history and the hours around the prediction both readable), the stay on a
linear one.
"""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import numpy as np
from matplotlib.ticker import FuncFormatter

from mmehr.evaluate.sampler import STOP_REASONS
from mmehr.explain.collect import Explanation
from mmehr.explain.events import lead_ii
from mmehr.units import DAY_US, HOUR_US

STAY_COLORS = {"hospital": "#dbe9f6", "ED": "#fde6cc", "ICU": "#f8d0d0"}
STATUS_STYLE = {  # marker face, edge, label
    "visible": ("#2ca02c", "#1b5e1b", "visible (in the context)"),
    "masked": ("white", "#d62728", "masked (at/after the prediction)"),
    "not retrieved": ("white", "#7f7f7f", "not retrieved (older than the K_m most recent)"),
    "hidden": ("#cccccc", "#999999", "hidden by the evaluation"),
}
REASON_COLORS = dict(zip(STOP_REASONS, ("#d62728", "#1f77b4", "#7f7f7f", "#ff7f0e", "#bcbd22"), strict=True))
N_ROWS = 8  # token categories on the timeline; the rest is "other"


def _hours_label(h: float, _pos=None) -> str:
    """Hours relative to the prediction as a short label: 0, +30 min, −5 h, +3.4 d, −250 d."""
    if h == 0:
        return "0"
    sign = "+" if h > 0 else "−"
    a = abs(h)
    if a >= 48:
        days = a / 24
        return f"{sign}{days:.1f} d" if days < 10 else f"{sign}{days:.0f} d"
    return f"{sign}{a:.0f} h" if a >= 1 else f"{sign}{a * 60:.0f} min"


def _category(token: str) -> str | None:
    """The timeline row of a token: its code's prefix; values (Q1..Q10) and intervals are not drawn."""
    if token.startswith("INTERVAL//") or (token[:1] == "Q" and token[1:].isdigit()):
        return None
    return token.split("//")[0]


def _save(fig, path: Path) -> Path:
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def timeline(ex: Explanation, path: Path) -> Path:
    """The context and the real timeline after it, the stays, the modality events, the prediction time and
    the true outcome: an overview of the whole context and a linear view of the current stay."""
    t0 = ex.prediction_us
    rel = lambda t: (np.asarray(t, dtype=np.float64) - t0) / HOUR_US  # noqa: E731
    names = ex.context_tokens + ex.after_tokens
    cats = [_category(t) for t in names]
    counts = Counter(c for c in cats if c)
    top = [c for c, _ in counts.most_common(N_ROWS)]
    rows = top + (["other"] if len(counts) > len(top) else [])
    modalities = sorted({e.modality for e in ex.events})
    labels = ["outcome", *rows, *[m.upper() for m in modalities]]
    y = {name: k for k, name in enumerate(labels)}
    times = np.concatenate([ex.context_times, ex.after_times]).astype(np.float64)
    seen = np.r_[np.ones(len(ex.context_tokens), bool), np.zeros(len(ex.after_tokens), bool)]

    stay = [s for s in ex.stays if s[1] <= t0 <= s[2]]
    lo = min([t0 - 24 * HOUR_US, *(s[1] for s in stay)])
    zoom = (rel(max(lo, times.min() if times.size else lo)) - 1, rel(ex.view_end_us) + 1)
    fig, axes = plt.subplots(2, 1, figsize=(13, 2.2 + 0.42 * len(labels) * 2), sharey=True)
    for ax, scale in zip(axes, ("symlog", "linear"), strict=True):
        for kind, a, b in ex.stays:
            ax.axvspan(
                rel(a), rel(b), color=STAY_COLORS.get(kind, "#eeeeee"), alpha=0.8, lw=0, label=f"{kind} stay"
            )
        keep = [c is not None for c in cats]
        ys = [y.get(c, y.get("other", 0)) for c in cats]
        ys = np.asarray(ys, dtype=float)
        for mask, color, label in (
            (seen, "#1f4e79", "context token"),
            (~seen, "#bbbbbb", "after the prediction (unseen)"),
        ):
            m = mask & np.asarray(keep, bool)
            ax.scatter(rel(times[m]), ys[m], s=14, marker="|", color=color, lw=1.4, label=label)
        for e in ex.events:
            face, edge, label = STATUS_STYLE[e.status]
            ax.scatter(
                rel(e.time),
                y[e.modality.upper()],
                s=60,
                marker="o",
                facecolor=face,
                edgecolor=edge,
                lw=1.5,
                label=label,
                zorder=3,
            )
        ax.axvline(0, color="black", lw=1.2, label="prediction time")
        if ex.outcome_us is not None:
            color = "#d62728" if ex.label else "#1f77b4"
            ax.scatter(
                rel(ex.outcome_us),
                y["outcome"],
                marker="*",
                s=160,
                color=color,
                zorder=4,
                label=f"true outcome: {ex.outcome_token}",
            )
        ax.set_xscale(scale, **({"linthresh": 1.0} if scale == "symlog" else {}))
        ax.xaxis.set_major_formatter(FuncFormatter(_hours_label))
        ax.set_yticks(range(len(labels)), labels, fontsize=8)
        ax.set_ylim(len(labels) - 0.5, -0.5)
        ax.grid(axis="x", color="#dddddd", lw=0.6)
    first = min([t0, *times.tolist(), *(e.time for e in ex.events)])
    span = rel([first, ex.view_end_us])
    axes[0].set_xlim(min(span[0], -1) * 1.2, max(span[1], 1) * 1.2)
    axes[0].set_title("whole context (time relative to the prediction, symmetric log scale)", fontsize=10)
    axes[1].set_xlim(*zoom)
    axes[1].set_title("around the prediction (linear)", fontsize=10)
    handles, labels_ = axes[0].get_legend_handles_labels()
    unique = dict(zip(labels_, handles, strict=True))
    fig.legend(unique.values(), unique.keys(), loc="lower center", ncol=4, fontsize=8, frameon=False)
    fig.tight_layout(rect=(0, 0.09, 1, 1))
    return _save(fig, path)


def ecg_strip(payload, path: Path) -> Path | None:
    """A lead-II strip of an ECG payload (the first 10 s)."""
    lead = lead_ii(payload)
    if lead is None:
        return None
    signal, fs = lead
    n = min(signal.size, int(10 * fs))
    fig, ax = plt.subplots(figsize=(3.2, 0.8))
    ax.plot(np.arange(n) / fs, signal[:n], color="#b22222", lw=0.6)
    ax.set_axis_off()
    ax.set_xlim(0, n / fs)
    fig.subplots_adjust(0, 0, 1, 1)
    return _save(fig, path)


def cxr_thumbnail(payload, path: Path, size: int = 128) -> Path | None:
    """A small copy of a CXR image."""
    from PIL import Image

    if not isinstance(payload, np.ndarray) or payload.ndim != 2:
        return None
    image = Image.fromarray(payload.astype(np.uint8))
    image.thumbnail((size, size))
    image.save(path, format="PNG")
    return path


def _event_label(ex: Explanation, e) -> str:
    h = (e.time - ex.prediction_us) / HOUR_US
    return f"{e.modality} {e.slot + 1 if e.slot is not None else ''} ({_hours_label(h)})"


def attention(ex: Explanation, path: Path) -> Path | None:
    """Per cross-attention block: the attention mass each context event receives from the prediction-time
    token, with the block's gates."""
    att = ex.attention
    if att is None:
        return None
    events = [e for e in ex.events if e.slot is not None]
    fig, axes = plt.subplots(
        1, len(att.weights), figsize=(5.5 * len(att.weights), 0.5 + 0.32 * max(len(events), 2)), squeeze=False
    )
    for ax, (layer, _) in zip(axes[0], sorted(att.weights.items()), strict=True):
        mass = [e.attention.get(layer, 0.0) for e in events]
        ax.barh(range(len(events)), mass, color=["#2ca02c" if m > 0 else "#cccccc" for m in mass])
        ax.set_yticks(range(len(events)), [_event_label(ex, e) for e in events], fontsize=8)
        ax.invert_yaxis()
        ax.set_xlim(0, 1)
        g_attn, g_ff = att.gates[layer]
        ax.set_title(
            f"block before layer {layer}: gate {g_attn:.3f} (attention), {g_ff:.3f} (FF)", fontsize=9
        )
        ax.set_xlabel("attention mass (mean over heads)")
    fig.tight_layout()
    return _save(fig, path)


def heat_strip(ex: Explanation, path: Path) -> Path | None:
    """Every context token's attention mass on each context event, per block; cells the strict time mask
    closes (event acquired at or after the token's time) are hatched."""
    att = ex.attention
    if att is None:
        return None
    P = len(ex.static)
    rows = [e for e in ex.events if e.slot is not None]  # in time order, as the bar chart
    column = {key: j for j, key in enumerate(att.events)}
    cols = [column[(e.modality, e.slot)] for e in rows]
    height = 0.9 + (0.3 * len(cols) + 0.4) * len(att.weights)
    fig, axes = plt.subplots(len(att.weights), 1, figsize=(13, height), squeeze=False)
    token_times = ex.context_times
    for ax, (layer, w) in zip(axes[:, 0], sorted(att.weights.items()), strict=True):
        m = w[P:, cols].T  # (E, T)
        masked = att.event_time[cols][:, None] >= token_times[None, :]
        top = max(float(m.max(initial=0.0)), 1e-6)
        im = ax.imshow(np.ma.masked_where(masked, m), aspect="auto", cmap="viridis", vmin=0, vmax=top,
                       interpolation="nearest")  # fmt: skip
        ax.imshow(np.where(masked, 1.0, np.nan), aspect="auto", cmap="Greys", vmin=0, vmax=3,
                  interpolation="nearest")  # fmt: skip
        ax.set_yticks(range(len(cols)), [_event_label(ex, e) for e in rows], fontsize=7)
        ticks = np.unique(np.linspace(0, len(token_times) - 1, min(10, len(token_times))).astype(int))
        labels = [_hours_label((token_times[t] - ex.prediction_us) / HOUR_US) for t in ticks]
        ax.set_xticks(
            ticks, [f"#{t + P}\n{label}" for t, label in zip(ticks, labels, strict=True)], fontsize=7
        )
        ax.set_title(
            f"block before layer {layer}: each context token (x: position, time) on each event (grey: masked)",
            fontsize=9,
        )
        fig.colorbar(im, ax=ax, fraction=0.02, pad=0.01, label="attention mass")
    fig.tight_layout()
    return _save(fig, path)


def knockout(ex: Explanation, path: Path) -> Path | None:
    """The predicted risk with every modality, and with each hidden."""
    if not ex.knockout:
        return None
    names = ["all modalities"] + ["without " + "+".join(k["hidden"]) for k in ex.knockout]
    values = [ex.risk.probability] + [
        k["probability"] if k["probability"] is not None else np.nan for k in ex.knockout
    ]
    fig, ax = plt.subplots(figsize=(6.5, 0.6 + 0.35 * len(names)))
    ax.barh(range(len(names)), np.nan_to_num(values), color=["#1f4e79"] + ["#8fb3d9"] * len(ex.knockout))
    for k, v in enumerate(values):
        ax.text(
            min(np.nan_to_num(v), 0.9) + 0.01,
            k,
            "n/a" if np.isnan(v) else f"{v:.2f}",
            va="center",
            fontsize=8,
        )
    ax.set_yticks(range(len(names)), names, fontsize=8)
    ax.invert_yaxis()
    ax.set_xlim(0, 1)
    ax.set_xlabel("predicted risk (share of counted rollouts reaching the outcome)")
    fig.tight_layout()
    return _save(fig, path)


def futures(ex: Explanation, path: Path) -> Path:
    """The K rollouts as a fan over simulated time, and the share of them reaching the outcome over time."""
    r = ex.risk
    fig, (fan, cum) = plt.subplots(1, 2, figsize=(13, 3.8))
    K = r.counted.size
    limit_days = [d for d in (ex.task.horizon_days, ex.task.time_limit_days) if d is not None]
    for k in range(K):
        n = int(r.n_tokens[k])
        color = REASON_COLORS[STOP_REASONS[int(r.reason[k])]]
        if r.times is not None and n:
            h = (r.times[k, :n] - ex.prediction_us) / HOUR_US
            fan.plot(h, np.arange(1, n + 1), color=color, lw=0.9, alpha=0.8)
            fan.scatter(h[-1], n, color=color, s=18, zorder=3)
    for reason in STOP_REASONS:
        if (np.asarray([STOP_REASONS[int(x)] for x in r.reason]) == reason).any():
            fan.plot([], [], color=REASON_COLORS[reason], label=f"ended: {reason}")
    for ax in (fan, cum):
        if ex.outcome_us is not None:
            ax.axvline(
                (ex.outcome_us - ex.prediction_us) / HOUR_US,
                color="black",
                ls=":",
                lw=1,
                label=f"real {ex.outcome_token}",
            )
        if limit_days:
            ax.axvline(
                min(limit_days) * DAY_US / HOUR_US,
                color="#ff7f0e",
                ls="--",
                lw=1,
                label="horizon / time limit",
            )
        ax.set_xscale("symlog", linthresh=1.0)
        ax.xaxis.set_major_formatter(FuncFormatter(_hours_label))
        ax.set_xlabel("simulated time after the prediction")
    fan.set_ylabel("tokens generated")
    fan.set_title(f"{K} sampled futures", fontsize=10)
    fan.legend(fontsize=7, loc="upper left")
    counted = r.counted.astype(bool)
    hits = np.sort(r.elapsed_us[counted & (r.reason == STOP_REASONS.index("outcome"))] / HOUR_US)
    n_counted = int(counted.sum())
    if n_counted:
        end = max([1.0, *(r.elapsed_us / HOUR_US), *(d * 24 for d in limit_days[:1])])
        x = np.r_[0, hits, end]
        y = np.r_[0, np.arange(1, hits.size + 1), hits.size] / n_counted
        cum.step(x, y, where="post", color="#d62728", label="share reaching the outcome")
        cum.axhline(ex.risk.probability, color="#d62728", lw=0.6, ls="--")
    cum.set_ylim(0, 1.02)
    cum.set_ylabel(f"share of the {n_counted} counted rollouts")
    cum.set_title("cumulative share reaching the outcome", fontsize=10)
    cum.legend(fontsize=7, loc="upper left")
    fig.tight_layout()
    return _save(fig, path)
