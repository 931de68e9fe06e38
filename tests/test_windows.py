"""Training windows on the tokenized MIMIC-IV demo: static prefix, loss mask, strict modality retrieval,
deterministic and resumable order, DDP sharding, the evaluation's context batch."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import polars as pl
import pytest
import torch

from mmehr.data.timelines import TimelineStore
from mmehr.data.windows import (
    TrainWindows,
    assemble,
    context_batch,
    iterate_micro_batches,
    rank_micro_batches,
)
from mmehr.io import write_json
from mmehr.modalities.encode import encode_events
from mmehr.modalities.encoders import get_encoder
from mmehr.modalities.store import EmbeddingStore

K = 3


def write_note_store(timelines: Path, out: Path, per_subject: int = 6) -> Path:
    """A note store (weight-free `note-hash` encoder, d=16) for every subject of the demo: events placed
    EXACTLY at token times spread over each timeline, so that equal-time strictness is exercised."""
    rows = []
    for split in ("train", "tuning"):
        store = TimelineStore(timelines, split)
        for i in range(len(store)):
            _, times = store.timeline(i)
            for j, q in enumerate(np.linspace(0, len(times) - 1, per_subject).astype(int)):
                sid = int(store.subject_ids[i])
                rows.append({"subject_id": sid, "time": int(times[q]), "modality": "note", "event_id": f"{sid}-{j}",
                             "payload": f"{sid}-{j}", "text": f"note {j} of {sid}: fever rigors " * (1 + j % 3)})  # fmt: skip
    events = out.parent / f"{out.name}-events"
    events.mkdir(parents=True, exist_ok=True)
    pl.DataFrame(rows).write_parquet(events / "events.parquet")
    write_json(events / "manifest.json", {"source": "test"})
    encode_events(events, get_encoder("note-hash", d=16), out, progress=False)
    return out


@pytest.fixture(scope="module")
def train_store(demo_timelines) -> TimelineStore:
    return TimelineStore(demo_timelines, "train")


@pytest.fixture(scope="module")
def notes(demo_timelines, tmp_path_factory) -> EmbeddingStore:
    return EmbeddingStore(write_note_store(demo_timelines, tmp_path_factory.mktemp("notes") / "store"))


def test_a_window_is_static_context_then_timeline_tokens_with_next_token_targets(train_store):
    w = TrainWindows(train_store, block_size=64, seed=1)
    rows = w.plan(0)[:5]
    batch = w.batch(rows)
    P = train_store.static_len
    assert (
        batch.tokens.shape == (5, 64) and batch.targets.shape == (5, 64) and batch.prefix.tolist() == [P] * 5
    )
    for b, (i, start, stop) in enumerate(rows):
        tokens, times = train_store.timeline(int(i))
        assert stop - start == 64 - P + 1 == w.window
        static = train_store.static_context(int(i), int(times[start]))
        assert batch.tokens[b, :P].tolist() == static.tolist()
        assert batch.tokens[b, P:].tolist() == tokens[start : stop - 1].tolist()
        assert batch.targets[b, :-1].tolist() == batch.tokens[b, 1:].tolist()
        assert batch.targets[b, -1] == tokens[stop - 1]  # the window's last token is only a target
        assert (batch.times[b, :P] == int(times[start])).all()
        assert batch.times[b, P:].tolist() == times[start : stop - 1].tolist()


def test_loss_mask_excludes_static_context_and_padding(train_store):
    P = train_store.static_len
    short = int(np.argmin(train_store.lengths))
    n = int(train_store.lengths[short])
    batch = assemble(train_store, [(short, 0, n), (0, 0, 40)], last_is_target=True)
    T = P + n - 1
    assert batch.tokens.shape[1] == T and batch.lengths.tolist() == [T, P + 39]
    assert not batch.loss_mask[:, :P].any()  # static positions (including the one predicting token 0)
    assert batch.loss_mask[0, P:].all() and int(batch.loss_mask[0].sum()) == n - 1
    assert int(batch.loss_mask[1].sum()) == 39 and not batch.loss_mask[1, P + 39 :].any()
    pad = batch.tokens[1, P + 39 :]
    assert (pad == train_store.vocab.pad_id).all()
    last_time = int(train_store.timeline(0)[1][38])
    assert (batch.times[1, P + 38 :] == last_time).all()  # padding carries the last real time
    padded = TrainWindows(train_store, block_size=n + 200)  # every window of the shortest timeline is padded
    (row,) = [r for r in padded.plan(0) if r[0] == short]
    assert row.tolist() == [short, 0, n]


def test_events_are_the_k_most_recent_strictly_before_the_last_input_token(train_store, notes):
    w = TrainWindows(train_store, 64, {"note": notes}, K, seed=3)
    rows = w.plan(0)[:64]
    batch = w.batch(rows)
    m = batch.modalities["note"]
    assert m.emb.shape[:2] == (64, K) and m.emb.dtype == torch.float16 and m.emb.shape[3] == 16
    for b, (i, _start, stop) in enumerate(rows):
        sid = int(train_store.subject_ids[i])
        at = int(train_store.timeline(int(i))[1][stop - 2])  # the last INPUT token (stop - 1 is a target)
        assert int(batch.times[b, batch.lengths[b] - 1]) == at
        mine = np.sort(notes.time[notes.subject == sid])
        expected = mine[mine < at][::-1][:K]
        got = m.event_time[b][m.event_mask[b]].tolist()
        assert got == expected.tolist()
        assert not (m.event_time[b][m.event_mask[b]] >= at).any()
        for j, t in enumerate(got):
            (e,) = [e for tt, e in notes.events_before(sid, at, K) if tt == t]
            n = int(m.token_mask[b, j].sum())
            assert n == len(e) and torch.equal(m.emb[b, j, :n], torch.from_numpy(np.array(e)))
    assert m.event_mask.any() and not m.event_mask.all()  # both cases occur in the batch


def test_token_retrieval_carries_every_event_a_token_of_the_row_may_see(train_store, notes):
    """media_retrieval="token": a row carries its K most recent events before its first timeline token and
    every event from then until its last input token, with k_visible = K; a token's own K most recent
    events are then all in the row. "window" (the default) keeps K in all, k_visible None."""
    windows = {
        r: TrainWindows(train_store, 64, {"note": notes}, K, seed=3, media_retrieval=r)
        for r in ("window", "token")
    }
    rows = windows["token"].plan(0)[:64]
    by_token, by_window = (windows[r].batch(rows).modalities["note"] for r in ("token", "window"))
    assert by_window.k_visible is None and by_window.event_mask.shape[1] == K
    assert by_token.k_visible == K and by_token.event_mask.shape[1] > K
    batch = windows["token"].batch(rows)
    P = train_store.static_len
    for b, (i, _start, stop) in enumerate(rows):
        sid = int(train_store.subject_ids[i])
        first, at = int(batch.times[b, P]), int(train_store.timeline(int(i))[1][stop - 2])
        mine = np.sort(notes.time[notes.subject == sid])
        expected = np.concatenate([mine[(mine >= first) & (mine < at)], mine[mine < first][-K:]])
        got = by_token.event_time[b][by_token.event_mask[b]].tolist()
        assert got == np.sort(expected)[::-1].tolist()  # most recent first
        for t in batch.times[b, : batch.lengths[b]].tolist():  # each token's own K most recent are there
            assert set(mine[mine < t][-K:].tolist()) <= set(got)
    with pytest.raises(ValueError, match="media_retrieval"):
        assemble(train_store, [(0, 0, 10)], {"note": notes}, K, last_is_target=True, media_retrieval="all")


def test_an_event_at_exactly_the_last_token_time_is_not_retrieved(train_store, notes):
    sid = int(train_store.subject_ids[0])
    t_event = int(np.sort(notes.time[notes.subject == sid])[2])  # an event placed at a token's time
    _, times = train_store.timeline(0)
    q = int(np.searchsorted(times, t_event, side="right"))  # the first token after every token at t_event
    at_equal = context_batch(train_store, 0, q, 32, {"note": notes}, K)  # last kept token is at t_event
    assert int(at_equal.times[0, at_equal.lengths[0] - 1]) == t_event
    assert (
        t_event
        not in at_equal.modalities["note"].event_time[0][at_equal.modalities["note"].event_mask[0]].tolist()
    )
    later = context_batch(train_store, 0, q, 32, {"note": notes}, K, at_time_us=t_event + 1)
    assert later.modalities["note"].event_time[0, 0] == t_event  # one microsecond later it is the most recent


def test_unsafe_ignore_event_time_retrieves_future_events(train_store, notes):
    sid = int(train_store.subject_ids[0])
    latest = int(notes.time[notes.subject == sid].max())
    safe = context_batch(train_store, 0, 50, 32, {"note": notes}, K)
    unsafe = context_batch(train_store, 0, 50, 32, {"note": notes}, K, unsafe_ignore_event_time=True)
    at = int(safe.times[0, -1])
    assert (safe.modalities["note"].event_time[0][safe.modalities["note"].event_mask[0]] < at).all()
    assert unsafe.modalities["note"].event_time[0, 0] == latest > at
    assert torch.equal(unsafe.tokens, safe.tokens)  # only retrieval changes


def test_context_batch_is_the_static_prefix_and_the_last_tokens_before_end(train_store, notes):
    P, end, max_len = train_store.static_len, 300, 40
    tokens, times = train_store.timeline(2)
    c = context_batch(train_store, 2, end, max_len, {"note": notes}, {"note": 2}, at_time_us=int(times[end]))
    keep = max_len - P
    assert c.tokens.shape == (1, max_len) and c.lengths.tolist() == [max_len] and c.prefix.tolist() == [P]
    assert c.tokens[0, :P].tolist() == train_store.static_context(2, int(times[end - keep])).tolist()
    assert c.tokens[0, P:].tolist() == tokens[end - keep : end].tolist()
    assert c.times[0, P:].tolist() == times[end - keep : end].tolist()
    assert not c.loss_mask[0, -1]  # the last token's next one is what generation produces
    assert c.modalities["note"].emb.shape[1] == 2
    sid = int(train_store.subject_ids[2])
    expected = [t for t, _ in notes.events_before(sid, int(times[end]), 2)]
    assert c.modalities["note"].event_time[0][c.modalities["note"].event_mask[0]].tolist() == expected
    # Near the start of a timeline the context is just shorter; the same rows as a training window.
    short = context_batch(train_store, 2, 10, max_len)
    assert short.lengths.tolist() == [P + 10] and short.tokens[0, P:].tolist() == tokens[:10].tolist()
    with pytest.raises(ValueError, match="outside"):
        context_batch(train_store, 2, int(train_store.lengths[2]) + 1, max_len)
    with pytest.raises(ValueError, match="no room"):
        context_batch(train_store, 2, 10, P)


def test_plans_are_deterministic_per_seed_and_epoch(train_store):
    a, b = TrainWindows(train_store, 128, seed=7), TrainWindows(train_store, 128, seed=7)
    assert np.array_equal(a.plan(0), b.plan(0)) and np.array_equal(a.plan(3), b.plan(3))
    assert not np.array_equal(a.plan(0), a.plan(1))
    assert not np.array_equal(a.plan(0), TrainWindows(train_store, 128, seed=8).plan(0))
    plan = a.plan(0)
    L = train_store.lengths[plan[:, 0]]
    assert (plan[:, 1] >= 0).all() and (plan[:, 2] <= L).all() and (plan[:, 2] - plan[:, 1] == a.window).all()
    # About one window per (window - 1) tokens of each timeline.
    W = a.window
    assert len(plan) == int(np.maximum(1, -(-(train_store.lengths - 1) // (W - 1))).sum())


def test_stride_windows_cover_every_token_of_every_timeline(train_store):
    w = TrainWindows(train_store, 256, sampling="stride", stride=200)
    plan = w.plan(0)
    for i in range(len(train_store)):
        mine = plan[plan[:, 0] == i]
        covered = np.zeros(int(train_store.lengths[i]), dtype=bool)
        for _, s, e in mine:
            covered[s:e] = True
        assert covered.all()
        starts = np.sort(mine[:, 1])
        assert starts[0] == 0 and mine[:, 2].max() == train_store.lengths[i]
        assert (np.diff(starts)[:-1] == 200).all()


def test_resumed_iteration_continues_the_same_order(train_store):
    w = TrainWindows(train_store, 64, seed=5)
    B, A = 4, 2
    per_epoch = w.windows_per_epoch // B
    full = iterate_micro_batches(w, B, A, 0)
    batches = [next(full) for _ in range(2 * 5)]
    resumed = iterate_micro_batches(w, B, A, start_step=3)
    for k in range(3 * A, 5 * A):
        assert torch.equal(next(resumed).tokens, batches[k].tokens)
    # Across an epoch boundary the next epoch's plan starts.
    crossing = w.micro_batch(per_epoch, B)
    assert torch.equal(crossing.tokens, w.batch(w.plan(1)[:B]).tokens)


def test_ranks_split_each_step_into_disjoint_micro_batches(train_store):
    assert rank_micro_batches(5, 4, 0, 2) == [20, 22] and rank_micro_batches(5, 4, 1, 2) == [21, 23]
    assert sorted(rank_micro_batches(5, 4, 0, 2) + rank_micro_batches(5, 4, 1, 2)) == rank_micro_batches(5, 4)
    w = TrainWindows(train_store, 64, seed=5)
    r0, r1 = (iterate_micro_batches(w, 4, 2, 1, rank=r, world_size=2) for r in (0, 1))
    single = iterate_micro_batches(w, 4, 2, 1)
    for _ in range(2):
        assert torch.equal(next(r0).tokens, next(single).tokens)
        assert torch.equal(next(r1).tokens, next(single).tokens)
    with pytest.raises(ValueError, match="multiple"):
        next(iterate_micro_batches(w, 4, 3, 0, world_size=2))


def test_dataloader_workers_give_the_same_batches(train_store, notes):
    w = TrainWindows(train_store, 64, {"note": notes}, K, seed=2)
    local = iterate_micro_batches(w, 4, 1, 2)
    workers = iterate_micro_batches(w, 4, 1, 2, workers=1)
    for _ in range(3):
        a, b = next(local), next(workers)
        assert torch.equal(a.tokens, b.tokens) and torch.equal(a.loss_mask, b.loss_mask)
        assert torch.equal(a.modalities["note"].emb, b.modalities["note"].emb)
    workers.close()


def test_bad_spans_and_sizes_fail_clearly(train_store):
    n = int(train_store.lengths[0])
    with pytest.raises(ValueError, match="outside"):
        assemble(train_store, [(0, n - 5, n + 1)], last_is_target=True)
    with pytest.raises(ValueError, match="empty"):
        assemble(train_store, [(0, 3, 4)], last_is_target=True)  # one token: nothing to predict
    with pytest.raises(ValueError, match="no room"):
        TrainWindows(train_store, block_size=train_store.static_len)
    with pytest.raises(ValueError, match="exceeds"):
        TrainWindows(train_store, 64).micro_batch(0, 10**7)


def test_under_token_retrieval_every_token_sees_its_own_k_most_recent_events(train_store, notes):
    """benchmarks/retrieval_shares.py: under "window" some tokens of the demo's windows see other notes
    than their own K most recent (their window's later notes pushed them out); under "token" none does."""
    import sys

    sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))
    from retrieval_shares import differing_share

    shares = {
        mode: differing_share(
            TrainWindows(train_store, 64, {"note": notes}, 2, seed=0, media_retrieval=mode), "note", 48
        )
        for mode in ("window", "token")
    }
    assert shares["window"][0] > 0.0 and shares["token"][0] == 0.0
    assert shares["window"][1] == shares["token"][1] > 1000
