"""The fitted Tokenizer (a preset plus its train statistics: fit, save, load) and its vectorised
transform of one shard's MEDS rows into token timelines (TokenizedShard)."""

from __future__ import annotations

import itertools
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import yaml
from tqdm import tqdm

from mmehr.config import load_yaml, to_dict
from mmehr.data.meds import MedsDataset, ShardRows, read_shard
from mmehr.data.tokenizer.fit import _build_vocab, _Fitter
from mmehr.data.tokenizer.normalize import Normalizer
from mmehr.data.tokenizer.presets import Preset, needed_columns, preset_from_dict, static_columns
from mmehr.data.tokenizer.rows import CodeTable, derive_rows, row_values, static_value_tokens
from mmehr.data.tokenizer.tokens import NO_TIME, QUANTILES, UNK, UNK_SUFFIX, _gap_pieces
from mmehr.data.tokenizer.vocab import Vocab
from mmehr.io import read_json

CHUNK_ROWS = 1 << 20  # rows assembled at a time, so working memory does not grow with shard size


class _Ragged:
    """Variable-length int64 lists stored flat: list i is flat[starts[i] : starts[i] + lengths[i]]."""

    def __init__(self, flat: np.ndarray, lengths: np.ndarray):
        self.flat, self.lengths = flat, lengths
        self.starts = np.cumsum(lengths) - lengths

    def gather(self, rows: np.ndarray) -> np.ndarray:
        """Concatenation of lists `rows`, in order."""
        return self.flat[_ranges(self.starts[rows], self.lengths[rows])]


def _ranges(starts: np.ndarray, lengths: np.ndarray) -> np.ndarray:
    """Concatenation of arange(s, s + n) for each (s, n): the positions of ragged segments."""
    within = np.arange(lengths.sum()) - np.repeat(np.cumsum(lengths) - lengths, lengths)
    return np.repeat(starts, lengths) + within


@dataclass
class TokenizedShard:
    """Timelines of whole subjects from one input shard (numpy arrays, ready to write).

    tokens (n_tok,) vocab dtype; times (n_tok,) int64 µs; offsets (n+1,) int64 into tokens;
    subject_ids (n,) int64 in input order; static_tokens/static_times/static_fields (n_static,) with
    static_offsets (n+1,): each subject's static entries, by field then time (NO_TIME for timeless);
    birth_us (n,) int64 (NO_TIME if unknown).
    """

    tokens: np.ndarray
    times: np.ndarray
    offsets: np.ndarray
    subject_ids: np.ndarray
    static_tokens: np.ndarray
    static_times: np.ndarray
    static_fields: np.ndarray
    static_offsets: np.ndarray
    birth_us: np.ndarray

    def select(self, keep: np.ndarray) -> TokenizedShard:
        """The subjects where the bool mask `keep` (n,) is True, in the same order."""
        if keep.all():
            return self
        idx = np.nonzero(keep)[0]
        n_tok = np.diff(self.offsets)[idx]
        n_static = np.diff(self.static_offsets)[idx]
        tok = _ranges(self.offsets[idx], n_tok)
        st = _ranges(self.static_offsets[idx], n_static)
        return TokenizedShard(
            tokens=self.tokens[tok],
            times=self.times[tok],
            offsets=np.concatenate([[0], np.cumsum(n_tok)]).astype(np.int64),
            subject_ids=self.subject_ids[idx],
            static_tokens=self.static_tokens[st],
            static_times=self.static_times[st],
            static_fields=self.static_fields[st],
            static_offsets=np.concatenate([[0], np.cumsum(n_static)]).astype(np.int64),
            birth_us=self.birth_us[idx],
        )


class Tokenizer:
    """A preset plus what was fitted on train: the vocab, decile edges per code, interval means."""

    def __init__(self, preset: Preset, vocab: Vocab, stats: dict):
        self.preset, self.vocab, self.stats = preset, vocab, stats
        self.normalizer = Normalizer(preset)
        self.value_keys = sorted(stats["value_edges"])
        self._value_index = {k: i for i, k in enumerate(self.value_keys)}
        # breaks padded with +inf: codes with duplicate deciles removed have fewer than 9
        self._edges = np.full((len(self.value_keys), len(QUANTILES) - 1), np.inf)
        for i, k in enumerate(self.value_keys):
            self._edges[i, : len(stats["value_edges"][k])] = stats["value_edges"][k]
        self._code_cache: dict[str, tuple] = {}

    # -- fitting -------------------------------------------------------------------------------------

    @classmethod
    def fit(
        cls,
        dataset: MedsDataset,
        preset: Preset,
        min_code_count: int = 10,
        max_values_per_code: int = 10_000,
        progress: bool = True,
    ) -> Tokenizer:
        """Fit vocab, decile edges and interval means on the train split of `dataset`, shard by shard.

        Tokens (and static values) seen fewer than `min_code_count` times on train stay out of the
        vocab, so they read as unknown. Deciles come from a uniform sample of at most
        `max_values_per_code` train values per code (bottom-k by a hash of the row, so the sample is
        deterministic and merges across shards in bounded memory); codes with fewer than
        `min_code_count` values get no value tokens.
        """
        if min_code_count < 1:
            raise ValueError(f"min_code_count must be >= 1, got {min_code_count}")
        train_ids = dataset.subjects("train")
        if len(train_ids) == 0:
            raise ValueError(f"{dataset.root}: no train subjects to fit on (use --vocab-from)")
        fitter = _Fitter(preset, max_values_per_code)
        for shard in tqdm(
            dataset.shards_with("train"), desc="fit on train", unit="shard", disable=not progress
        ):
            mixed = not np.isin(dataset.shard_subjects[shard.index], train_ids).all()
            rows = read_shard(shard, needed_columns(preset), categorical=static_columns(preset))
            rows = derive_rows(rows, preset)
            fitter.add(rows, rows.rows_of(train_ids) if mixed else None)
            del rows  # before the next shard is read
        stats = fitter.stats(len(train_ids), min_code_count)
        vocab = _build_vocab(preset, fitter.normalizer, stats, min_code_count)
        return cls(preset, vocab, stats)

    # -- transforming --------------------------------------------------------------------------------

    def _code_entry(self, code: str) -> tuple:
        """(timeline token ids, value indices per slot (-1: none), static token id, rank) of one code.

        The static token id is -1 for a code outside the static context and -2 for a `quantile` field
        (its token comes from the row's value). An unseen token becomes its label's unknown token, or
        <UNK>; a code beyond its `keep_top` rule's most frequent ones has no tokens (dropped, as ETHOS).
        """
        entry = self._code_cache.get(code)
        if entry is None:
            norm = self.normalizer.normalize(code)
            static_id = -1
            if norm.static_field >= 0:
                sf = self.preset.static[norm.static_field]
                static_id = (
                    -2 if sf.quantile else self.vocab.stoi.get(code, self.vocab.stoi[sf.prefix + UNK_SUFFIX])
                )
            rule = self.preset.rules[norm.rule] if norm.rule >= 0 else None
            ids = []
            if not (rule is not None and rule.keep_top and norm.tokens[0] not in self.vocab.stoi):
                for tok, label in zip(norm.tokens, norm.labels):
                    fallback = (
                        self.vocab.stoi.get(label + UNK_SUFFIX, self.vocab.unk_id)
                        if label
                        else self.vocab.unk_id
                    )
                    ids.append(self.vocab.stoi.get(tok, fallback))
            vidx = tuple(self._value_index.get(k, -1) for k in norm.value_keys)
            entry = (ids, vidx, static_id, norm.rank)
            self._code_cache[code] = entry
        return entry

    def transform(self, rows: ShardRows) -> TokenizedShard:
        """Tokenise one shard's validated rows (from `read_shard`) into timelines of its subjects.

        Vectorised: each distinct code is normalised once; numpy gathers each row's token ids from
        that per-code table and scatters all tokens into place, a chunk of subjects at a time.
        Subjects without timed events get no timeline (they are left out).
        """
        rows = derive_rows(rows, self.preset)
        norms = [self.normalizer.normalize(c) for c in rows.codes]
        table = CodeTable(norms)
        entries = [self._code_entry(c) for c in rows.codes]
        ids = _Ragged(
            np.fromiter((i for e in entries for i in e[0]), dtype=np.int64),
            np.array([len(e[0]) for e in entries], dtype=np.int64),
        )
        vidx = np.full((len(entries), table.slots), -1, dtype=np.int64)
        for c, e in enumerate(entries):
            vidx[c, : len(e[1])] = e[1]
        static_id = np.array([e[2] for e in entries], dtype=np.int64)
        rank = np.array([e[3] for e in entries], dtype=np.int64)

        cidx = rows.code_index
        kept = table.kept_rows(rows)
        r = np.nonzero(rows.timed & (ids.lengths[cidx] > 0) & kept)[0]
        r = _order_within_time(r, rows.subject[r], rows.time[r], rank[cidx[r]])
        value = row_values(rows, r, table.from_text, table.text_split, table.slots)
        parts = []
        for a, b in _subject_chunks(rows.subject[r], CHUNK_ROWS):
            rr = r[a:b]
            parts.append(self._assemble(rows.subject[rr], rows.time[rr], cidx[rr], value[a:b], ids, vidx))
        tokens = np.concatenate([p[0] for p in parts] or [np.zeros(0, self.vocab.dtype)])
        times = np.concatenate([p[1] for p in parts] or [np.zeros(0, np.int64)])
        lengths = np.concatenate([p[2] for p in parts] or [np.zeros(0, np.int64)])
        subject_ids = np.concatenate([p[3] for p in parts] or [np.zeros(0, np.int64)])
        return TokenizedShard(
            tokens=tokens,
            times=times,
            offsets=np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64),
            subject_ids=subject_ids,
            **self._static_entries(rows, static_id, table, kept, vidx, subject_ids),
            birth_us=self._birth(rows, subject_ids),
        )

    def _assemble(self, sid, t, cidx, v, ids: _Ragged, vidx_of_code) -> tuple[np.ndarray, ...]:
        """Tokens of time-ordered rows of whole subjects: (tokens, times, tokens per subject, subject ids).

        Per row: interval tokens (if a gap >= 5 min precedes it), code token(s), value token(s) (one
        per value slot with a value: `v` (n, slots), `vidx_of_code` (n_codes, slots)), and after a
        subject's last row TIMELINE_END. Positions come from a cumulative sum of counts.
        """
        n = len(sid)
        n_code = ids.lengths[cidx]
        vidx = vidx_of_code[cidx]  # (n, slots)
        has_q = (vidx >= 0) & ~np.isnan(v)
        n_q = has_q.sum(axis=1)

        first = np.ones(n, dtype=bool)
        first[1:] = sid[1:] != sid[:-1]
        last = np.ones(n, dtype=bool)
        last[:-1] = first[1:]
        gap = np.zeros(n, dtype=np.int64)
        gap[1:] = t[1:] - t[:-1]
        gap[first] = 0
        n_long, rem_bin = _gap_pieces(gap)
        n_int = n_long + (rem_bin >= 0)

        count = n_int + n_code + n_q + last
        start = np.cumsum(count) - count
        total = int(count.sum())
        tokens = np.empty(total, dtype=self.vocab.dtype)
        times = np.empty(total, dtype=np.int64)

        r = np.nonzero(n_int)[0]  # interval tokens: n_long x 6mt, or one bin
        pos = _ranges(start[r], n_int[r])
        row = np.repeat(r, n_int[r])
        j = pos - start[row]
        is_long = n_long[row] > 0
        tokens[pos] = np.where(is_long, self.vocab.interval_ids[-1], self.vocab.interval_ids[rem_bin[row]])
        # the k-th of n 6mt tokens at previous time + k/n of the gap: the last at the event's own time
        step = gap[row] // np.maximum(n_long[row], 1)
        times[pos] = np.where(is_long & (j + 1 < n_long[row]), t[row] - gap[row] + (j + 1) * step, t[row])

        pos = _ranges(start + n_int, n_code)  # code tokens
        tokens[pos] = ids.gather(cidx)
        times[pos] = np.repeat(t, n_code)

        before = np.cumsum(has_q, axis=1) - has_q  # value tokens of earlier slots in the same row
        for j in range(v.shape[1]):  # value tokens, slot by slot
            q_rows = np.nonzero(has_q[:, j])[0]
            k = vidx[q_rows, j]
            q = (v[q_rows, j, None] > self._edges[k]).sum(axis=1)  # ETHOS: a value on a break goes below
            pos = start[q_rows] + n_int[q_rows] + n_code[q_rows] + before[q_rows, j]
            tokens[pos] = self.vocab.quantile_ids[q]
            times[pos] = t[q_rows]

        pos = start[last] + count[last] - 1  # TIMELINE_END
        tokens[pos] = self.vocab.timeline_end_id
        times[pos] = t[last]

        subject_start = start[first]
        lengths = np.diff(np.append(subject_start, total))
        return tokens, times, lengths, sid[first]

    def _static_entries(
        self, rows: ShardRows, static_id, table: CodeTable, kept, vidx, subject_ids
    ) -> dict[str, np.ndarray]:
        """Each subject's static values over time, one entry per change, ordered by (field, time)."""
        normalize = self.normalizer.normalize
        sfield = np.array([normalize(c).static_field for c in rows.codes], dtype=np.int64)
        r = np.nonzero((static_id[rows.code_index] >= 0) & kept)[0]
        subj, times = [rows.subject[r]], [rows.time[r]]
        fields, tokens = [sfield[rows.code_index[r]]], [static_id[rows.code_index[r]]]
        r = np.nonzero((static_id[rows.code_index] == -2) & kept)[0]  # quantile fields (ETHOS's BMI)
        if len(r):
            c = rows.code_index[r]
            v = row_values(rows, r, table.from_text, table.text_split, 1)[:, 0]
            ok = (vidx[c, 0] >= 0) & ~np.isnan(v)
            r, c, v = r[ok], c[ok], v[ok]
            q = (v[:, None] > self._edges[vidx[c, 0]]).sum(axis=1)
            prefix_ids = np.array(
                [
                    [self.vocab.stoi[f"{sf.prefix}//{t}"] for t in QUANTILES] if sf.quantile else [-1] * 10
                    for sf in self.preset.static
                ]
            )
            subj.append(rows.subject[r])
            times.append(rows.time[r])
            fields.append(sfield[c])
            tokens.append(prefix_ids[sfield[c], q])
        for i, sf in enumerate(self.preset.static):
            if sf.column and sf.column in rows.extra.column_names:
                idx, values = rows.categories(sf.column)
                unk = self.vocab.stoi[sf.prefix + UNK_SUFFIX]
                token_of = np.array(
                    [self.vocab.stoi.get(t, unk) for t in static_value_tokens(sf, values)], dtype=np.int64
                )
                r = np.nonzero(idx >= 0)[0]
                tok = token_of[idx[r]]
                if sf.single:
                    r, tok = _single_value(rows.subject[r], rows.time[r], r, tok, sf, self.vocab)
                subj.append(rows.subject[r])
                times.append(rows.time[r])
                fields.append(np.full(len(r), i))
                tokens.append(tok)
        subj, times, fields, tokens = (np.concatenate(x) for x in (subj, times, fields, tokens))
        pos = _align(subject_ids, np.arange(len(subject_ids)), subj, fill=-1)  # subject position or -1
        order = np.lexsort((times, fields, pos))
        order = order[pos[order] >= 0]
        pos, times, fields, tokens = pos[order], times[order], fields[order], tokens[order]
        changed = np.ones(len(pos), dtype=bool)  # keep one entry per change of value
        changed[1:] = (pos[1:] != pos[:-1]) | (fields[1:] != fields[:-1]) | (tokens[1:] != tokens[:-1])
        pos, times, fields, tokens = pos[changed], times[changed], fields[changed], tokens[changed]
        return {
            "static_tokens": tokens.astype(self.vocab.dtype),
            "static_times": times.astype(np.int64),
            "static_fields": fields.astype(np.uint8),
            "static_offsets": np.searchsorted(pos, np.arange(len(subject_ids) + 1)).astype(np.int64),
        }

    def _birth(self, rows: ShardRows, subject_ids: np.ndarray) -> np.ndarray:
        """Earliest birth_code time per subject (int64 µs, NO_TIME if none)."""
        birth = [i for i, c in enumerate(rows.codes) if c == self.preset.birth_code]
        r = np.nonzero(np.isin(rows.code_index, birth) & rows.timed)[0]
        order = np.lexsort((-rows.time[r], rows.subject[r]))  # per subject, earliest last: it wins below
        return _align(rows.subject[r][order], rows.time[r][order], subject_ids, fill=NO_TIME)

    # -- decoding ------------------------------------------------------------------------------------

    def decode_codes(self, ids) -> list[str]:
        """Rebuild (normalised) source codes from token ids: split parts rejoin their head code with
        `//`; interval, value, static and special tokens are skipped (<UNK> stays as a code).
        """
        labels = set(self.normalizer.part_labels)
        out: list[str] = []
        open_code = False
        for i in np.asarray(ids).ravel():
            tok, kind = self.vocab.itos[int(i)], self.vocab.kind(int(i))
            if kind != "code" and tok != UNK:
                open_code = False
                continue
            label, sep, value = tok.partition("//")
            if sep and label in labels and open_code:
                out[-1] += "//" + value
            else:
                out.append(tok)
                open_code = True
        return out

    # -- persistence ---------------------------------------------------------------------------------

    def save(self, directory: str | Path) -> None:
        """Write vocab.json, stats.json and tokenizer.yaml (the resolved preset) into `directory`."""
        from mmehr.io import atomic_path, write_json

        directory = Path(directory)
        write_json(directory / "vocab.json", self.vocab.to_dict())
        write_json(directory / "stats.json", self.stats)
        with atomic_path(directory / "tokenizer.yaml") as tmp:
            tmp.write_text(yaml.safe_dump(to_dict(self.preset), sort_keys=False, allow_unicode=True))

    @classmethod
    def load(cls, directory: str | Path) -> Tokenizer:
        directory = Path(directory)
        for name in ("vocab.json", "stats.json", "tokenizer.yaml"):
            if not (directory / name).is_file():
                raise FileNotFoundError(
                    f"{directory / name}: missing; is {directory} a `mmehr tokenize` output?"
                )
        preset = preset_from_dict(
            load_yaml(directory / "tokenizer.yaml"), where=str(directory / "tokenizer.yaml")
        )
        stats = read_json(directory / "stats.json")
        return cls(preset, Vocab.load(directory / "vocab.json"), stats)


def _single_value(subject, time, r, tok, sf, vocab) -> tuple[np.ndarray, np.ndarray]:
    """One entry per subject, at its first time: the first value not in `sf.last_resort`, else the first
    by `last_resort` order (ETHOS keeps one race per patient, preferring a known one)."""
    resort = {vocab.stoi.get(f"{sf.prefix}//{v}", -1): k + 1 for k, v in enumerate(sf.last_resort)}
    priority = np.array([resort.get(int(t), 0) for t in tok], dtype=np.int64)
    order = np.lexsort((time, priority, subject))  # per subject: best priority, then earliest
    first = np.ones(len(order), dtype=bool)
    first[1:] = subject[order][1:] != subject[order][:-1]
    chosen = order[first]
    earliest = np.lexsort((time, subject))
    start = np.ones(len(earliest), dtype=bool)
    start[1:] = subject[earliest][1:] != subject[earliest][:-1]
    at = earliest[start]  # each subject's earliest row: the value is known from then on
    return r[at], tok[chosen]


def _order_within_time(r: np.ndarray, subject: np.ndarray, time: np.ndarray, rank: np.ndarray) -> np.ndarray:
    """Reorder row indices `r` (in subject, time order) so equal-time rows go by rank, stably."""
    new = np.ones(len(r), dtype=bool)
    new[1:] = (subject[1:] != subject[:-1]) | (time[1:] != time[:-1])
    if not (~new[1:] & (rank[1:] < rank[:-1])).any():
        return r
    key = np.cumsum(new) * (rank.max() - rank.min() + 1) + (rank - rank.min())
    return r[np.argsort(key, kind="stable")]  # nearly sorted: timsort is close to linear


def _subject_chunks(subject: np.ndarray, size: int) -> list[tuple[int, int]]:
    """[a, b) row ranges of about `size` rows that never cut a subject."""
    n = len(subject)
    if n <= size:
        return [(0, n)] if n else []
    starts = np.nonzero(np.concatenate([[True], subject[1:] != subject[:-1]]))[0]
    cuts = np.unique(starts[np.clip(np.searchsorted(starts, np.arange(size, n, size)), 0, len(starts) - 1)])
    bounds = [0, *(int(c) for c in cuts if c > 0), n]
    return list(itertools.pairwise(bounds))


def _align(src_keys: np.ndarray, src_values: np.ndarray, keys: np.ndarray, fill: int) -> np.ndarray:
    """int64 value of each of `keys` in the mapping src_keys -> src_values (last wins); `fill` if absent."""
    out = np.full(len(keys), fill, dtype=np.int64)
    if len(src_keys):
        order = np.argsort(src_keys, kind="stable")
        sk, sv = src_keys[order], src_values[order]
        pos = np.searchsorted(sk, keys, side="right") - 1
        hit = (pos >= 0) & (sk[np.maximum(pos, 0)] == keys)
        out[hit] = sv[pos[hit]]
    return out
