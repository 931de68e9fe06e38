"""Statistics fitted on the train split, shard by shard in bounded memory: code and static counts,
decile edges per code (from a deterministic bottom-k sample of values), interval-bin means, and the
vocabulary built from them."""

from __future__ import annotations

import hashlib

import numpy as np
import polars as pl

from mmehr.data.meds import ShardRows
from mmehr.data.tokenizer.normalize import Normalized, Normalizer
from mmehr.data.tokenizer.presets import Preset
from mmehr.data.tokenizer.rows import CodeTable, row_values, static_value_tokens
from mmehr.data.tokenizer.tokens import (
    AGE_DECADE,
    AGE_YEAR,
    EVENT_TOKENS,
    INTERVAL_BINS,
    INTERVAL_TOKENS,
    LONG_GAP_US,
    MAX_AGE_DECADE,
    PAD,
    QUANTILES,
    TIMELINE_END,
    UNK,
    UNK_SUFFIX,
    _gap_pieces,
)
from mmehr.data.tokenizer.vocab import Vocab


class _Fitter:
    """Train statistics accumulated shard by shard: code and static counts, a bounded sample of values
    per code, and interval sums. `add` keeps nothing per row once it returns."""

    def __init__(self, preset: Preset, max_values_per_code: int):
        self.preset, self.max_values_per_code = preset, max_values_per_code
        self.normalizer = Normalizer(preset)
        self.code_counts: dict[str, int] = {}
        self.static_counts: dict[str, int] = {}
        self.value_keys: dict[str, int] = {}  # value key -> its index in value_counts / samples
        self.value_counts = np.zeros(0, dtype=np.int64)
        self.samples: pl.DataFrame | None = None
        self.gap_sum = np.zeros(len(INTERVAL_BINS))
        self.gap_n = np.zeros(len(INTERVAL_BINS), dtype=np.int64)
        self.n_rows = 0
        self.rule_heads: dict[int, dict[str, int]] = {}  # keep_top rule -> its head tokens' counts

    def add(self, rows: ShardRows, sel: np.ndarray | None) -> None:
        """Count one shard's rows (derived rows included); `sel` (bool, n) picks the train rows when the
        shard mixes splits."""
        norms = [self.normalizer.normalize(c) for c in rows.codes]
        table = CodeTable(norms)
        use = table.kept_rows(rows) if sel is None else table.kept_rows(rows) & sel
        code_index = rows.code_index[use]
        self.n_rows += len(code_index)
        for code, norm, n in zip(rows.codes, norms, np.bincount(code_index, minlength=len(norms))):
            if n == 0:  # in the shard's dictionary through other splits' rows only
                continue
            sf = self.preset.static[norm.static_field] if norm.static_field >= 0 else None
            if sf is not None and not sf.quantile:  # the static token is the code itself, e.g. GENDER//F
                self.static_counts[code] = self.static_counts.get(code, 0) + int(n)
            for tok in norm.tokens:
                self.code_counts[tok] = self.code_counts.get(tok, 0) + int(n)
            if norm.tokens and norm.rule >= 0 and self.preset.rules[norm.rule].keep_top:
                heads = self.rule_heads.setdefault(norm.rule, {})
                heads[norm.tokens[0]] = heads.get(norm.tokens[0], 0) + int(n)
        for sf in self.preset.static:
            if sf.column and sf.column in rows.extra.column_names:
                idx, values = rows.categories(sf.column)
                idx = idx if sel is None else idx[sel]
                names = static_value_tokens(sf, values)
                for tok, n in zip(names, np.bincount(idx[idx >= 0], minlength=len(values))):
                    if n:
                        self.static_counts[tok] = self.static_counts.get(tok, 0) + int(n)

        on_timeline = rows.timed & table.has_tokens[rows.code_index] & use
        self._add_values(rows, on_timeline, norms, table)
        self._add_gaps(rows.subject[on_timeline], rows.time[on_timeline])

    def _add_values(
        self, rows: ShardRows, on_timeline: np.ndarray, norms: list[Normalized], table: CodeTable
    ) -> None:
        keys = self.value_keys
        vkey = np.full((len(norms), table.slots), -1, dtype=np.int64)  # per code and value slot
        for c, n in enumerate(norms):
            for j, key in enumerate(n.value_keys):
                vkey[c, j] = keys.setdefault(key, len(keys))
        self.value_counts = np.pad(self.value_counts, (0, len(keys) - len(self.value_counts)))
        r = np.flatnonzero(on_timeline & (vkey[rows.code_index] >= 0).any(axis=1))
        values = row_values(rows, r, table.from_text, table.text_split, table.slots)
        # hash the key's name, not its index: the index depends on the order codes were met
        key_hash = np.array([_name_hash(name) for name in keys], dtype=np.int64)
        for j in range(table.slots):
            k, v = vkey[rows.code_index[r], j], values[:, j]
            ok = (k >= 0) & np.isfinite(v)
            rj, k, v = r[ok], k[ok], v[ok]
            self.value_counts += np.bincount(k, minlength=len(self.value_counts))
            h = _mix64(rows.subject[rj], rows.time[rj], key_hash[k], v)
            new = pl.DataFrame({"k": k.astype(np.uint32), "v": v, "h": h})
            self.samples = _bottom_k(
                new if self.samples is None else pl.concat([self.samples, new]), self.max_values_per_code
            )

    def _add_gaps(self, subject: np.ndarray, time: np.ndarray) -> None:
        dt = np.diff(time)
        gaps = dt[(subject[1:] == subject[:-1]) & (dt > 0)]
        n_long, bins = _gap_pieces(gaps)
        # a long gap's n tokens share it: each stands for gap / n (ETHOS's estimate of a 6mt token)
        self.gap_n[-1] += n_long.sum()
        self.gap_sum[-1] += gaps[n_long > 0].astype(np.float64).sum()
        ok = bins >= 0
        self.gap_n += np.bincount(bins[ok], minlength=len(INTERVAL_BINS))
        self.gap_sum += np.bincount(
            bins[ok], weights=gaps[ok].astype(np.float64), minlength=len(INTERVAL_BINS)
        )

    def stats(self, n_subjects: int, min_code_count: int) -> dict:
        names = list(self.value_keys)
        dropped: set[str] = set()  # beyond a keep_top rule's N most frequent codes
        for k, heads in self.rule_heads.items():
            ranked = sorted(heads, key=lambda t: (-heads[t], t))
            dropped |= set(ranked[self.preset.rules[k].keep_top :])
        return {
            "fitted_on": {"split": "train", "subjects": n_subjects, "rows": self.n_rows},
            "min_code_count": min_code_count,
            "max_values_per_code": self.max_values_per_code,
            "code_counts": dict(
                sorted(
                    ((t, n) for t, n in self.code_counts.items() if t not in dropped),
                    key=lambda kv: (-kv[1], kv[0]),
                )
            ),
            "dropped_beyond_keep_top": sorted(dropped),
            "static_counts": dict(sorted(self.static_counts.items(), key=lambda kv: (-kv[1], kv[0]))),
            "value_counts": dict(sorted((names[i], int(n)) for i, n in enumerate(self.value_counts) if n)),
            "value_edges": _deciles(self.samples, names, self.value_counts, min_code_count),
            "intervals": _interval_stats(self.gap_sum, self.gap_n),
        }


def _mix64(*columns: np.ndarray) -> np.ndarray:
    """A deterministic 64-bit hash per row of int/float columns (splitmix64 finaliser)."""
    h = np.zeros(len(columns[0]), dtype=np.uint64)
    for c in columns:
        x = (
            np.ascontiguousarray(c).view(np.uint64)
            if c.dtype.itemsize == 8
            else c.astype(np.int64).view(np.uint64)
        )
        h = (h ^ x) * np.uint64(0x9E3779B97F4A7C15)
        h ^= h >> np.uint64(31)
    h ^= h >> np.uint64(30)
    h *= np.uint64(0xBF58476D1CE4E5B9)
    h ^= h >> np.uint64(27)
    h *= np.uint64(0x94D049BB133111EB)
    return h ^ (h >> np.uint64(31))


def _name_hash(name: str) -> int:
    return int.from_bytes(hashlib.blake2b(name.encode(), digest_size=8).digest(), "little", signed=True)


def _bottom_k(values: pl.DataFrame, k: int) -> pl.DataFrame:
    """Keep, per value key `k`, the rows with the smallest hash `h`: a uniform, mergeable sample."""
    if values.is_empty() or values.group_by("k").len()["len"].max() <= k:
        return values
    return (
        values.group_by("k").agg(pl.struct("v", "h").bottom_k_by("h", k).alias("s")).explode("s").unnest("s")
    )


def _deciles(
    samples: pl.DataFrame | None, names: list[str], counts: np.ndarray, min_count: int
) -> dict[str, list[float]]:
    """Per code, ETHOS's decile breaks: the 0.1..0.9 quantiles (polars' default `nearest`), duplicates
    removed, ascending (so a discrete lab has fewer breaks, and its values fill consecutive bins)."""
    keep = [i for i, n in enumerate(counts) if n >= min_count]
    if samples is None or not keep:
        return {}
    qs = [i / 10 for i in range(1, 10)]
    edges = (
        samples.filter(pl.col("k").is_in(keep))
        .group_by("k")
        .agg([pl.col("v").quantile(q, interpolation="nearest").alias(f"e{i}") for i, q in enumerate(qs)])
    )
    out = {names[row[0]]: sorted({float(x) for x in row[1:]}) for row in edges.iter_rows()}
    return dict(sorted(out.items()))


def _interval_stats(gap_sum: np.ndarray, gap_n: np.ndarray) -> list[dict]:
    out = []
    for j, (_name, lo) in enumerate(INTERVAL_BINS):
        hi = INTERVAL_BINS[j + 1][1] if j + 1 < len(INTERVAL_BINS) else LONG_GAP_US
        fallback = (lo + hi) / 2 if j + 1 < len(INTERVAL_BINS) else float(LONG_GAP_US)
        mean = gap_sum[j] / gap_n[j] if gap_n[j] else fallback
        out.append(
            {"token": INTERVAL_TOKENS[j], "lower_us": lo, "count": int(gap_n[j]), "mean_us": float(mean)}
        )
    return out


def _build_vocab(preset: Preset, normalizer: Normalizer, stats: dict, min_count: int) -> Vocab:
    itos = [PAD, UNK, TIMELINE_END]
    kinds = ["special"] * 3
    itos += QUANTILES
    kinds += ["quantile"] * len(QUANTILES)
    itos += INTERVAL_TOKENS
    kinds += ["interval"] * len(INTERVAL_TOKENS)
    static = [f"{AGE_DECADE}//{d}" for d in range(MAX_AGE_DECADE + 1)] + [f"{AGE_DECADE}{UNK_SUFFIX}"]
    static += [f"{AGE_YEAR}//{y}" for y in range(10)] + [f"{AGE_YEAR}{UNK_SUFFIX}"]
    static += [sf.prefix + UNK_SUFFIX for sf in preset.static]
    static += [f"{sf.prefix}//{q}" for sf in preset.static if sf.quantile for q in QUANTILES]
    static += [tok for tok, n in stats["static_counts"].items() if n >= min_count and tok not in static]
    itos += static
    kinds += ["static"] * len(static)
    codes = list(EVENT_TOKENS) + [label + UNK_SUFFIX for label in normalizer.unk_labels]
    seen = set(itos) | set(codes)
    codes += [tok for tok, n in stats["code_counts"].items() if n >= min_count and tok not in seen]
    itos += codes
    kinds += ["code"] * len(codes)
    ids = {s: i for i, s in enumerate(itos)}
    interval_mean = {ids[b["token"]]: b["mean_us"] for b in stats["intervals"]}
    return Vocab(itos, kinds, interval_mean, [sf.field for sf in preset.static])
