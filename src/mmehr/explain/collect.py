"""Everything one sample's page shows, gathered in one `Explanation` (the figures and the page only draw it).

For sample n of a `Replay`: its context exactly as the evaluation built it (static prefix, timeline
tokens, the modality events retrieved strictly before the prediction time), the real timeline around it
(stays, what happened after the prediction time, the true outcome), every modality event with its status
and the cross-attention it received, the gates, the risk and K futures replayed from the evaluation's
chunk, and the risk with each modality hidden (the same chunk, the same seed).
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from mmehr.evaluate.sampler import STOP_REASONS
from mmehr.explain.attention import CrossAttention, cross_attention, probabilities
from mmehr.explain.events import ModalityEvent, subject_events
from mmehr.explain.replay import ChunkReplayer, SampleFutures, iso
from mmehr.units import DAY_US, HOUR_US

# Stays shaded on the timeline: (kind, pattern of the token that opens one, pattern of the one that closes it)
STAYS = (
    ("hospital", r"^HOSPITAL_ADMISSION($|//)", r"^HOSPITAL_DISCHARGE($|//)"),
    ("ED", r"^ED_REGISTRATION($|//)", r"^ED_OUT($|//)"),
    ("ICU", r"^ICU_ADMISSION($|//)", r"^ICU_DISCHARGE($|//)"),
)
N_NEXT = 10  # rows of the next-event table
# Events are listed up to this long after the view's end: a discharge summary is written after the discharge.
EVENTS_AFTER_US = 2 * DAY_US


@dataclass
class Explanation:
    """One sample, explained. Times are µs since the epoch; see the module docstring."""

    task: Any
    split: str
    sample: int
    subject_id: int
    prediction_us: int
    label: bool
    outcome_token: str | None
    outcome_us: int | None
    static: list[str]
    context_tokens: list[str]
    context_times: np.ndarray
    after_tokens: list[str]  # the real timeline after the prediction time, to the end of the view
    after_times: np.ndarray
    view_end_us: int
    stays: list[tuple[str, int, int]]
    events: list[ModalityEvent]
    attention: CrossAttention | None
    risk: SampleFutures
    knockout: list[dict[str, Any]]
    next_events: list[dict[str, Any]]
    settings: dict[str, Any]
    modalities: list[str] = field(default_factory=list)  # the model's (the evaluation may hide some)
    recorded_probability: float | None = None
    evaluation: str | None = None
    notes: list[str] = field(default_factory=list)
    vocab: list[str] = field(default_factory=list, repr=False)

    @property
    def event_index(self) -> dict[tuple[str, int], int]:
        """(modality, slot) -> index into `events` of the context's events."""
        return {(e.modality, e.slot): i for i, e in enumerate(self.events) if e.slot is not None}

    def record(self) -> dict[str, Any]:
        """explain.json: every number the page shows (never a note's text)."""
        r, itos = self.risk, self.vocab
        att = self.attention
        return {
            "task": self.task.name,
            "split": self.split,
            "sample": self.sample,
            "subject_id": self.subject_id,
            "prediction_time": iso(self.prediction_us),
            "prediction_time_us": self.prediction_us,
            "label": self.label,
            "outcome": {
                "token": self.outcome_token,
                "time_us": self.outcome_us,
                "hours_after_prediction": None
                if self.outcome_us is None
                else (self.outcome_us - self.prediction_us) / HOUR_US,
            },
            "risk": {
                "probability": _num(r.probability),
                "counted_rollouts": int(r.counted.sum()),
                "rollouts": int(r.counted.size),
                "recorded_probability": self.recorded_probability,
            },
            "evaluation": self.evaluation,
            "settings": self.settings,
            "context": {"static": self.static, "n_tokens": len(self.context_tokens)},
            "modalities": self.modalities,
            "stays": [{"kind": k, "start_us": a, "end_us": b} for k, a, b in self.stays],
            "events": [e.record() for e in self.events],
            "gates": {str(k): list(v) for k, v in (att.gates if att else {}).items()},
            "attention_max_error": att.max_error if att else None,
            "knockout": self.knockout,
            "rollouts": [
                {
                    "stop_reason": STOP_REASONS[int(r.reason[k])],
                    "counted": bool(r.counted[k]),
                    "hours": float(r.elapsed_us[k]) / HOUR_US,
                    "n_tokens": int(r.n_tokens[k]),
                    "last_token": itos[int(r.last_token[k])] if r.last_token[k] >= 0 else None,
                }
                for k in range(r.counted.size)
            ],
            "next_events": self.next_events,
            "notes": self.notes,
        }


def _num(x: float) -> float | None:
    return None if x is None or not math.isfinite(x) else float(x)


def stays_of(itos: list[str], tokens: np.ndarray, times: np.ndarray) -> list[tuple[str, int, int]]:
    """(kind, start µs, end µs) of every stay of a timeline; one still open ends at the timeline's end."""
    out = []
    names = [itos[int(t)] for t in tokens]
    for kind, opens, closes in STAYS:
        start = None
        for name, t in zip(names, times):
            if start is None and re.search(opens, name):
                start = int(t)
            elif start is not None and re.search(closes, name):
                out.append((kind, start, int(t)))
                start = None
        if start is not None:
            out.append((kind, start, int(times[-1])))
    return sorted(out, key=lambda s: s[1])


def explain_sample(
    model, replayer: ChunkReplayer, n: int, *, knockout: bool = True, evaluation: str | None = None
) -> Explanation:
    """Explain sample n of the replayer's evaluation (see the module docstring)."""
    replay, store = replayer.replay, replayer.store
    itos = list(store.vocab.itos) + [f"<id {i}>" for i in range(len(store.vocab), model.config.vocab_size)]
    row = replay.samples.row(n, named=True)
    i, end, t_pred = int(row["subject_index"]), int(row["context_end"]), int(row["prediction_time"])
    batch = replayer.context(n)
    P, length = store.static_len, int(batch.lengths[0])
    tokens, times = batch.tokens[0, :length].numpy(), batch.times[0, :length].numpy()
    att, next_logits = cross_attention(model, batch)

    timeline_tokens, timeline_times = store.timeline(i)
    timeline_times = np.asarray(timeline_times)
    outcome_pos = int(row["outcome_pos"])
    outcome_us = int(row["outcome_time"]) if outcome_pos >= 0 else None
    stays = stays_of(itos, np.asarray(timeline_tokens), timeline_times)
    open_stays = [b for _, a, b in stays if a <= t_pred <= b]
    view_end = max([t_pred, *([outcome_us] if outcome_us is not None else []), *open_stays])
    view_start = int(times[P]) if length > P else t_pred
    events = subject_events(
        replay.data.modality_stores,
        int(row["subject_id"]),
        t_pred,
        replay.data.k_max,
        start_us=view_start,
        end_us=view_end + EVENTS_AFTER_US,
        hidden=replay.hidden,
    )
    view_end = max([view_end, *(e.time for e in events)])
    after = np.flatnonzero((np.arange(len(timeline_times)) >= end) & (timeline_times <= view_end))
    stays = [s for s in stays if s[2] >= min([view_start, *(e.time for e in events)]) and s[1] <= view_end]
    if att is not None:
        index = {(e.modality, e.slot): e for e in events if e.slot is not None}
        for j, key in enumerate(att.events):
            if key in index:
                index[key].attention = {layer: float(w[length - 1, j]) for layer, w in att.weights.items()}
        for e in events:
            if e.status != "hidden" and not e.attention:
                e.attention = dict.fromkeys(att.weights, 0.0)  # not in the context: nothing attends to it

    risk = replayer.futures(n)
    knock = _knockouts(replayer, n, risk, events) if knockout else []
    recorded = replay.recorded()
    recorded_p = None
    if recorded is not None:
        value = recorded.row(n, named=True)["predicted_boolean_probability"]
        recorded_p = None if value is None else float(value)
    notes = []
    if (
        recorded is not None
        and recorded_p is not None
        and not math.isclose(recorded_p, risk.probability, abs_tol=1e-6)
    ):
        notes.append(
            f"the replayed risk {risk.probability:.3f} differs from the evaluation's recorded {recorded_p:.3f} "
            "(another device, thread count or code version draws other futures)"
        )
    allowed = replayer.rules.allowed.cpu().numpy()
    return Explanation(
        task=replay.task,
        split=replay.split,
        sample=n,
        subject_id=int(row["subject_id"]),
        prediction_us=t_pred,
        label=bool(row["boolean_value"]),
        outcome_token=itos[int(timeline_tokens[outcome_pos])] if outcome_pos >= 0 else None,
        outcome_us=outcome_us,
        static=[itos[int(t)] for t in tokens[:P]],
        context_tokens=[itos[int(t)] for t in tokens[P:]],
        context_times=times[P:],
        after_tokens=[itos[int(timeline_tokens[k])] for k in after],
        after_times=timeline_times[after],
        view_end_us=int(view_end),
        stays=stays,
        events=events,
        attention=att,
        risk=risk,
        knockout=knock,
        next_events=_next_events(itos, probabilities(next_logits, allowed[: next_logits.size]), risk),
        settings={**_settings(replay), "sample_chunk": n // replayer.per_chunk},
        modalities=list(replay.data.modality_stores),
        recorded_probability=recorded_p,
        evaluation=evaluation,
        notes=notes,
        vocab=itos,
    )


def _settings(replay) -> dict[str, Any]:
    s = replay.settings
    return {
        "rollouts": s.n_rollouts,
        "temperature": s.temperature,
        "seed": s.seed,
        "max_new_tokens": s.max_new_tokens,
        "batch_rows": s.batch_rows,
        "samples_per_chunk": s.samples_per_batch,
        "context_tokens": replay.data.context_tokens,
        "samples": replay.samples.height,
        "hidden_modalities": list(replay.hidden),
    }


def _knockouts(
    replayer: ChunkReplayer, n: int, full: SampleFutures, events: list[ModalityEvent]
) -> list[dict[str, Any]]:
    """The risk with each modality hidden in turn (one chunk replay each), with how many events of it this
    sample's context held (0: only the random draws changed)."""
    out = []
    for m in replayer.replay.data.modality_stores:
        if m in replayer.replay.hidden:
            continue
        hidden = (m,)
        f = replayer.futures(n, hidden)
        recorded = replayer.replay.recorded(hidden)
        rec = None
        if recorded is not None:
            value = recorded.row(n, named=True)["predicted_boolean_probability"]
            rec = None if value is None else float(value)
        out.append(
            {
                "hidden": list(hidden),
                "probability": _num(f.probability),
                "counted_rollouts": int(f.counted.sum()),
                "change": _num(f.probability - full.probability),
                "events_hidden": sum(e.status == "visible" and e.modality in hidden for e in events),
                "recorded_probability": rec,
            }
        )
    return out


def _next_events(itos: list[str], p_next: np.ndarray, risk: SampleFutures) -> list[dict[str, Any]]:
    """The model's most likely next tokens at the prediction time, beside how often the rollouts drew each
    first and anywhere."""
    K = risk.counted.size
    first = risk.tokens[:, 0] if risk.tokens is not None and risk.tokens.shape[1] else np.zeros(0, np.int64)
    ids = list(np.argsort(-p_next)[:N_NEXT])
    ids += [int(t) for t in np.unique(first[first >= 0]) if int(t) not in ids]
    rows = []
    for t in ids:
        anywhere = sum(bool((risk.tokens[k] == t).any()) for k in range(K)) if risk.tokens is not None else 0
        rows.append(
            {
                "token": itos[int(t)],
                "p_model": float(p_next[t]),
                "first_share": float((first == t).sum() / K) if K else 0.0,
                "anywhere_share": anywhere / K if K else 0.0,
            }
        )
    return sorted(rows, key=lambda r: (-r["p_model"], -r["first_share"]))[: N_NEXT + 5]
