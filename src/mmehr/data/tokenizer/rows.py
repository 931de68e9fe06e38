"""Row-level steps shared by fitting and transforming: rows a preset derives from others (ETHOS's
INSURANCE//{insurance} after an admission, DRG//UNKNOWN after a discharge without a DRG), the values
of each row (one per value token), and the rows a preset drops for their value."""

from __future__ import annotations

import re

import numpy as np
import polars as pl
import pyarrow as pa

from mmehr.data.meds import ShardRows
from mmehr.data.tokenizer.normalize import Normalized
from mmehr.data.tokenizer.presets import Preset, StaticField


class CodeTable:
    """Per-code arrays of one shard's code dictionary, from the codes' Normalized forms.

    has_tokens (n_codes,) bool: the code is a timeline event; from_text, text_split, require (bool),
    low, high (float64: the value range of `require`); slots: most value tokens of any code.
    """

    def __init__(self, norms: list[Normalized]):
        self.has_tokens = np.array([bool(n.tokens) for n in norms], dtype=bool)
        self.from_text = np.array([n.numeric_from_text for n in norms], dtype=bool)
        self.text_split = np.array([n.text_values for n in norms], dtype=bool)
        self.require = np.array([n.require_value for n in norms], dtype=bool)
        self.low = np.array([n.value_range[0] for n in norms], dtype=np.float64)
        self.high = np.array([n.value_range[1] for n in norms], dtype=np.float64)
        self.slots = max([len(n.value_keys) for n in norms] + [1])

    def kept_rows(self, rows: ShardRows) -> np.ndarray:
        """bool (n,): the rows the preset keeps (those of `require_value` codes need a value in range)."""
        keep = np.ones(len(rows), dtype=bool)
        need = np.nonzero(self.require[rows.code_index])[0]
        if len(need):
            v0 = numeric_values(rows, need, self.from_text)
            c = rows.code_index[need]
            keep[need] = kept_by_value(v0, self.require[c], self.low[c], self.high[c])
        return keep


def static_value_tokens(sf: StaticField, values: list[str]) -> list[str]:
    """The static tokens `{PREFIX}//{value}` of a column field's distinct values, through its `values` map."""
    rules = [(re.compile(a), b) for a, b in sf.values]
    out = []
    for v in values:
        for pattern, to in rules:
            if pattern.search(v):
                v = pattern.sub(to, v, count=1)
                break
        out.append(f"{sf.prefix}//{v}")
    return out


def derive_rows(rows: ShardRows, preset: Preset) -> ShardRows:
    """`rows` with each preset.derived row inserted right after its anchor row (same subject and time;
    null numeric value and extra columns). Subjects stay contiguous and times in order."""
    if not preset.derived or len(rows) == 0:
        return rows
    codes = list(rows.codes)
    anchors, new_codes, order = [], [], []
    for k, d in enumerate(preset.derived):
        after = re.compile(d.after)
        is_anchor = np.array([bool(after.search(c)) for c in codes], dtype=bool)
        a = np.nonzero(is_anchor[rows.code_index] & rows.timed)[0]
        if d.unless_same_time and len(a):
            unless = re.compile(d.unless_same_time)
            is_unless = np.array([bool(unless.search(c)) for c in codes], dtype=bool)
            u = np.nonzero(is_unless[rows.code_index] & rows.timed)[0]
            present = set(zip(rows.subject[u].tolist(), rows.time[u].tolist()))
            a = a[[(s, t) not in present for s, t in zip(rows.subject[a].tolist(), rows.time[a].tolist())]]
        columns = re.findall(r"\{(\w+)\}", d.code)
        if columns:
            fills = {}
            for c in columns:
                if c in rows.extra.column_names:
                    idx, values = rows.categories(c)
                    names = np.array([*values, "UNKNOWN"], dtype=object)
                    fills[c] = names[np.where(idx[a] >= 0, idx[a], len(values))]
                else:
                    fills[c] = np.full(len(a), "UNKNOWN", dtype=object)
            made = [d.code.format(**{c: fills[c][j] for c in columns}) for j in range(len(a))]
        else:
            made = [d.code] * len(a)
        index = {c: i for i, c in enumerate(codes)}
        for c in dict.fromkeys(made):
            if c not in index:
                index[c] = len(codes)
                codes.append(c)
        anchors.append(a)
        new_codes.append(np.array([index[c] for c in made], dtype=np.int32))
        order.append(np.full(len(a), k + 1))
    a, c, o = np.concatenate(anchors), np.concatenate(new_codes), np.concatenate(order)
    if len(a) == 0:
        return rows
    n = len(rows)
    # original row i sorts at (i, 0), a derived row at (its anchor, 1 + its rule's index)
    perm = np.lexsort((np.concatenate([np.zeros(n, np.int64), o]), np.concatenate([np.arange(n), a])))
    source = np.concatenate([np.arange(n), a])[perm]  # the row each output row copies subject/time from
    derived = perm >= n
    take = pa.array(np.where(derived, 0, source), mask=derived)  # null index -> null extra values
    return ShardRows(
        shard=rows.shard,
        subject=rows.subject[source],
        time=rows.time[source],
        timed=rows.timed[source],
        code_index=np.concatenate([rows.code_index, c])[perm].astype(np.int32),
        codes=codes,
        numeric_value=np.where(derived, np.nan, rows.numeric_value[source]).astype(np.float32),
        extra=rows.extra.take(take),
    )


def numeric_values(rows: ShardRows, r: np.ndarray, from_text: np.ndarray) -> np.ndarray:
    """float64 values of rows `r` (NaN = none): numeric_value, or the number in text_value where the
    code's rule asks (`from_text`, per code) and numeric_value is null.
    """
    v = rows.numeric_value[r].astype(np.float64)
    if "text_value" in rows.extra.column_names and from_text.any():
        need = np.nonzero(from_text[rows.code_index[r]] & np.isnan(v))[0]
        if len(need):
            text = pl.from_arrow(rows.extra.column("text_value").take(pa.array(r[need])))
            parsed = text.str.strip_chars().cast(pl.Float64, strict=False).fill_null(np.nan)
            v[need] = parsed.to_numpy()
    return v


def row_values(
    rows: ShardRows, r: np.ndarray, from_text: np.ndarray, text_split: np.ndarray, slots: int
) -> np.ndarray:
    """(len(r), slots) float64 values (NaN = none): slot 0 the numeric value; for codes whose rule has
    `text_values` (`text_split`, per code), the numbers of text_value split on "/" ("120/80")."""
    v = np.full((len(r), max(slots, 1)), np.nan)
    v[:, 0] = numeric_values(rows, r, from_text)
    split = text_split[rows.code_index[r]]
    if split.any() and "text_value" in rows.extra.column_names:
        need = np.nonzero(split)[0]
        text = pl.from_arrow(rows.extra.column("text_value").take(pa.array(r[need])))
        parts = text.str.split("/")
        for j in range(v.shape[1]):
            number = parts.list.get(j, null_on_oob=True).str.strip_chars().cast(pl.Float64, strict=False)
            v[need, j] = number.fill_null(np.nan).to_numpy()
    return v


def kept_by_value(v0: np.ndarray, require: np.ndarray, low: np.ndarray, high: np.ndarray) -> np.ndarray:
    """bool mask of rows a preset keeps: rows of a `require_value` rule need a first value in its range."""
    inside = (v0 >= low) & (v0 <= high)  # False for NaN
    return ~require | inside
