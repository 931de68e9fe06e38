"""ETHOS-style tokenizer: normalisation rules as data, a vocabulary and value/interval statistics fitted
on the train split only, and a vectorised transform of MEDS rows into one token timeline per subject.

A subject's timeline is its timed events in order. Each event becomes its code token(s) (a `split` rule
turns `HOSPITAL_ADMISSION//EW EMER.//ER` into `HOSPITAL_ADMISSION`, `ADMISSION_TYPE//EW EMER.`,
`ADMISSION_LOCATION//ER`), then a decile token Q1..Q10 of its numeric value when the code has deciles
fitted on train. Before an event that follows a gap of at least 5 minutes come interval tokens: one
`INTERVAL//6mt` per whole 6 months of gap, then the ETHOS bin holding the rest (if >= 5 min). Events at
one timestamp keep their source order except for the preset's `order` ranks (MEDS_DEATH before a
discharge). `TIMELINE_END` closes every timeline. Every token carries a time (int64 µs since epoch): its
event's time; the k-th 6-month token sits at previous time + k x 6 months.

Static context (gender, race, marital status, age as decade + year tokens) is kept apart from the
timeline; `mmehr.data.timelines.TimelineStore.static_context` builds it as of any time.

Codes below `min_code_count` on train, or never seen in train, become `<UNK>` (a rare part of a split
code becomes `{LABEL}//<UNK>`): transforming any split or another dataset never fails on an unseen code.
"""

from __future__ import annotations

import functools
import hashlib
import importlib.resources
import itertools
import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import numpy as np
import polars as pl
import pyarrow as pa
import yaml
from tqdm import tqdm

from mmehr.config import ConfigError, from_dict, load_yaml, to_dict
from mmehr.data.meds import NULL_TIME, MedsDataset, ShardRows, read_shard

PAD, UNK, TIMELINE_END = "<PAD>", "<UNK>", "TIMELINE_END"
UNK_SUFFIX = "//<UNK>"
QUANTILES = tuple(f"Q{i}" for i in range(1, 11))
# Bare event tokens that exist in every vocabulary, so task patterns work on any MEDS code generation.
EVENT_TOKENS = (
    "HOSPITAL_ADMISSION",
    "HOSPITAL_DISCHARGE",
    "ICU_ADMISSION",
    "ICU_DISCHARGE",
    "ED_REGISTRATION",
    "ED_OUT",
    "MEDS_DEATH",
)

MINUTE_US = 60_000_000
HOUR_US = 60 * MINUTE_US
DAY_US = 24 * HOUR_US
MONTH_US = DAY_US * 365.25 / 12
SIX_MONTHS_US = int(6 * MONTH_US)
YEAR_US = DAY_US * 365.25
# ETHOS's 19 interval bins: (name, lower edge in µs); a bin spans [its edge, the next edge).
INTERVAL_BINS = (
    ("5m-15m", 5 * MINUTE_US),
    ("15m-45m", 15 * MINUTE_US),
    ("45m-1h15m", 45 * MINUTE_US),
    ("1h15m-2h", 75 * MINUTE_US),
    ("2h-3h", 2 * HOUR_US),
    ("3h-5h", 3 * HOUR_US),
    ("5h-8h", 5 * HOUR_US),
    ("8h-12h", 8 * HOUR_US),
    ("12h-18h", 12 * HOUR_US),
    ("18h-1d", 18 * HOUR_US),
    ("1d-2d", DAY_US),
    ("2d-4d", 2 * DAY_US),
    ("4d-7d", 4 * DAY_US),
    ("7d-12d", 7 * DAY_US),
    ("12d-20d", 12 * DAY_US),
    ("20d-30d", 20 * DAY_US),
    ("30d-2mt", 30 * DAY_US),
    ("2mt-6mt", int(2 * MONTH_US)),
    ("6mt", SIX_MONTHS_US),  # repeated once per whole 6 months of a gap
)
INTERVAL_TOKENS = tuple(f"INTERVAL//{name}" for name, _ in INTERVAL_BINS)
INTERVAL_EDGES_US = np.array([lo for _, lo in INTERVAL_BINS], dtype=np.int64)
MAX_AGE_DECADE = 11  # ages are clamped to 0..119 years
AGE_DECADE, AGE_YEAR = "AGE_DECADE", "AGE_YEAR"
NO_TIME = NULL_TIME  # time of a timeless static row (e.g. GENDER//F), or of an unknown birth

KINDS = ("special", "quantile", "interval", "static", "code")


# ----------------------------------------------------------------------------------------------------
# Normalisation presets (YAML): per code prefix keep, drop, split into parts, or map.


@dataclass
class Rule:
    """One normalisation rule; the first rule whose `match` (regex, searched) fits a code applies.

    keep: the code is one token. drop: no token. split: `A//b//c` -> `A`, `{parts[0]}//b`,
    `{parts[1]}//c` (extra parts join the last). map: rewrite with `re.sub(match, to)` and continue with
    the following rules. `values`: whether numeric values get decile tokens; `numeric_from_text` also
    parses a number from text_value when numeric_value is null (older ETLs keep OMR values as text).
    """

    match: str
    action: Literal["keep", "drop", "split", "map"] = "keep"
    parts: list[str] = field(default_factory=list)
    to: str = ""
    values: Literal["quantile", "none"] = "quantile"
    numeric_from_text: bool = False


@dataclass
class StaticField:
    """A static-context field: from codes matching `codes` (token = the code) or a data `column`."""

    field: str
    codes: str = ""
    column: str = ""

    @property
    def prefix(self) -> str:
        return self.field.upper()


@dataclass
class OrderRule:
    """Events sharing a timestamp are sorted by rank (default 0), stably otherwise."""

    match: str
    rank: int


@dataclass
class Preset:
    name: str
    description: str = ""
    birth_code: str = "MEDS_BIRTH"
    static: list[StaticField] = field(default_factory=list)
    order: list[OrderRule] = field(default_factory=list)
    rules: list[Rule] = field(default_factory=list)


def list_presets() -> list[str]:
    """Names of the presets shipped in mmehr/presets/."""
    root = importlib.resources.files("mmehr") / "presets"
    return sorted(p.name.removesuffix(".yaml") for p in root.iterdir() if p.name.endswith(".yaml"))


def load_preset(name_or_path: str | Path) -> Preset:
    """Load a preset by name (see `list_presets`) or from a YAML file, validating regexes and rules."""
    path = Path(name_or_path)
    if not path.is_file():
        if str(name_or_path) not in list_presets():
            raise ConfigError(f"unknown preset {name_or_path!r}: not a file, and not one of {list_presets()}")
        path = Path(str(importlib.resources.files("mmehr") / "presets" / f"{name_or_path}.yaml"))
    return preset_from_dict(load_yaml(path), where=str(path))


def preset_from_dict(data: dict, where: str = "preset") -> Preset:
    preset = from_dict(Preset, data, where=where)
    for i, rule in enumerate(preset.rules):
        _compile(rule.match, f"{where}: rules[{i}].match")
        if rule.action == "split" and not rule.parts:
            raise ConfigError(f"{where}: rules[{i}] splits {rule.match!r} but names no parts")
        if rule.action == "map" and not rule.to:
            raise ConfigError(f"{where}: rules[{i}] maps {rule.match!r} but has no `to`")
    for i, o in enumerate(preset.order):
        _compile(o.match, f"{where}: order[{i}].match")
    for i, s in enumerate(preset.static):
        if bool(s.codes) == bool(s.column):
            raise ConfigError(f"{where}: static[{i}] ({s.field}) needs exactly one of `codes` or `column`")
        if s.codes:
            _compile(s.codes, f"{where}: static[{i}].codes")
    return preset


def _compile(pattern: str, where: str) -> re.Pattern:
    try:
        return re.compile(pattern)
    except re.error as e:
        raise ConfigError(f"{where}: invalid regex {pattern!r}: {e}") from e


@dataclass(frozen=True)
class Normalized:
    """What one source code becomes. tokens[0] is the whole-code token, tokens[1:] split parts."""

    tokens: tuple[str, ...]  # () when dropped or static
    value_key: str | None  # the code whose deciles tokenise this code's values (None: no value token)
    numeric_from_text: bool
    static_field: int  # index into preset.static, or -1
    rank: int


class Normalizer:
    """Applies a preset to codes; memoised, since a dataset has far fewer codes than rows."""

    def __init__(self, preset: Preset):
        self.preset = preset
        self._rules = [(re.compile(r.match), r) for r in preset.rules]
        self._order = [(re.compile(o.match), o.rank) for o in preset.order]
        self._static = [(i, re.compile(s.codes)) for i, s in enumerate(preset.static) if s.codes]
        self.part_labels = sorted({p for r in preset.rules if r.action == "split" for p in r.parts})
        self.normalize = functools.lru_cache(maxsize=None)(self._normalize)

    def _normalize(self, code: str) -> Normalized:
        for i, pattern in self._static:
            if pattern.search(code):
                return Normalized((), None, False, i, 0)
        if code == self.preset.birth_code:
            return Normalized((), None, False, -1, 0)
        for pattern, rule in self._rules:
            if not pattern.search(code):
                continue
            if rule.action == "map":
                code = pattern.sub(rule.to, code, count=1)
                continue
            if rule.action == "drop":
                return Normalized((), None, False, -1, 0)
            tokens = (code,) if rule.action == "keep" else _split(code, rule.parts)
            value_key = code if rule.values == "quantile" else None
            return Normalized(tokens, value_key, rule.numeric_from_text, -1, self._rank(code))
        return Normalized((code,), code, False, -1, self._rank(code))

    def _rank(self, code: str) -> int:
        return next((rank for pattern, rank in self._order if pattern.search(code)), 0)


def _split(code: str, labels: list[str]) -> tuple[str, ...]:
    head, *rest = code.split("//")
    if len(rest) > len(labels):
        rest = [*rest[: len(labels) - 1], "//".join(rest[len(labels) - 1 :])]
    return (head, *(f"{label}//{value}" for label, value in zip(labels, rest)))


# ----------------------------------------------------------------------------------------------------
# Vocabulary


class Vocab:
    """Token strings in id order with their kinds; special ids pad_id = 0, unk_id, timeline_end_id.

    Kinds: special (<PAD>, <UNK>, TIMELINE_END), quantile (Q1..Q10), interval (the 19 INTERVAL// bins),
    static (static-context tokens, never generated), code (everything else).
    """

    def __init__(
        self,
        itos: list[str],
        kinds: list[str],
        interval_mean_us: dict[int, float],
        static_fields: list[str],
    ):
        if len(itos) != len(kinds) or len(set(itos)) != len(itos):
            raise ValueError("vocab: itos must be unique and aligned with kinds")
        self.itos = list(itos)
        self.kinds = np.array([KINDS.index(k) for k in kinds], dtype=np.int8)
        self.stoi = {s: i for i, s in enumerate(self.itos)}
        self.pad_id, self.unk_id, self.timeline_end_id = (self.stoi[s] for s in (PAD, UNK, TIMELINE_END))
        if self.pad_id != 0:
            raise ValueError("vocab: <PAD> must have id 0")
        self.interval_mean_us = {int(k): float(v) for k, v in interval_mean_us.items()}
        self.static_fields = list(static_fields)
        self.quantile_ids = np.array([self.stoi[q] for q in QUANTILES], dtype=np.int64)
        self.interval_ids = np.array([self.stoi[t] for t in INTERVAL_TOKENS], dtype=np.int64)

    def __len__(self) -> int:
        return len(self.itos)

    @property
    def dtype(self) -> np.dtype:
        """Storage dtype of token ids: uint16 while the vocab fits, else int32."""
        return np.dtype(np.uint16 if len(self) < 65536 else np.int32)

    def encode(self, token: str) -> int:
        return self.stoi.get(token, self.unk_id)

    def decode(self, ids) -> list[str]:
        return [self.itos[int(i)] for i in np.asarray(ids).ravel()]

    def kind(self, token_id: int) -> str:
        return KINDS[self.kinds[int(token_id)]]

    def ids_matching(self, pattern: str) -> np.ndarray:
        """Sorted int64 ids of tokens in which the regex `pattern` is found (`re.search`)."""
        regex = re.compile(pattern)
        return np.array([i for i, s in enumerate(self.itos) if regex.search(s)], dtype=np.int64)

    def generatable_mask(self) -> np.ndarray:
        """bool (len(vocab),): False for <PAD> and static-context tokens, which sampling must not emit."""
        mask = self.kinds != KINDS.index("static")
        mask[self.pad_id] = False
        return mask

    def to_dict(self) -> dict:
        return {
            "itos": self.itos,
            "kinds": [KINDS[k] for k in self.kinds],
            "pad_id": self.pad_id,
            "unk_id": self.unk_id,
            "timeline_end_id": self.timeline_end_id,
            "token_dtype": self.dtype.name,
            "static_fields": self.static_fields,
            "interval_mean_us": {str(k): v for k, v in self.interval_mean_us.items()},
        }

    @classmethod
    def from_dict(cls, d: dict) -> Vocab:
        return cls(d["itos"], d["kinds"], d["interval_mean_us"], d["static_fields"])

    @classmethod
    def load(cls, path: str | Path) -> Vocab:
        """Load `vocab.json` (or the directory holding it)."""
        path = Path(path)
        path = path / "vocab.json" if path.is_dir() else path
        if not path.is_file():
            raise FileNotFoundError(f"{path}: no vocab.json (run `mmehr tokenize` first)")
        return cls.from_dict(json.loads(path.read_text()))


# ----------------------------------------------------------------------------------------------------
# Fitted tokenizer

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


def _values(rows: ShardRows, r: np.ndarray, from_text: np.ndarray) -> np.ndarray:
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

    def add(self, rows: ShardRows, sel: np.ndarray | None) -> None:
        """Count one shard's rows; `sel` (bool, n) picks the train rows when the shard mixes splits."""
        code_index = rows.code_index if sel is None else rows.code_index[sel]
        self.n_rows += len(code_index)
        norms = [self.normalizer.normalize(c) for c in rows.codes]
        for code, norm, n in zip(rows.codes, norms, np.bincount(code_index, minlength=len(norms))):
            if n == 0:  # in the shard's dictionary through other splits' rows only
                continue
            if norm.static_field >= 0:  # the static token is the code itself, e.g. GENDER//F
                self.static_counts[code] = self.static_counts.get(code, 0) + int(n)
            for tok in norm.tokens:
                self.code_counts[tok] = self.code_counts.get(tok, 0) + int(n)
        for sf in self.preset.static:
            if sf.column and sf.column in rows.extra.column_names:
                idx, values = rows.categories(sf.column)
                idx = idx if sel is None else idx[sel]
                for value, n in zip(values, np.bincount(idx[idx >= 0], minlength=len(values))):
                    if n:
                        tok = f"{sf.prefix}//{value}"
                        self.static_counts[tok] = self.static_counts.get(tok, 0) + int(n)

        kept = np.array([bool(n.tokens) for n in norms], dtype=bool)
        on_timeline = rows.timed & kept[rows.code_index]
        if sel is not None:
            on_timeline &= sel
        self._add_values(rows, on_timeline, norms)
        self._add_gaps(rows.subject[on_timeline], rows.time[on_timeline])

    def _add_values(self, rows: ShardRows, on_timeline: np.ndarray, norms: list[Normalized]) -> None:
        keys = self.value_keys
        vkey = np.array(
            [keys.setdefault(n.value_key, len(keys)) if n.value_key else -1 for n in norms], np.int64
        )
        self.value_counts = np.pad(self.value_counts, (0, len(keys) - len(self.value_counts)))
        r = np.flatnonzero(on_timeline & (vkey[rows.code_index] >= 0))
        v = _values(rows, r, np.array([n.numeric_from_text for n in norms], dtype=bool))
        r, v = r[np.isfinite(v)], v[np.isfinite(v)]
        k = vkey[rows.code_index[r]]
        self.value_counts += np.bincount(k, minlength=len(self.value_counts))
        # hash the key's name, not its index: the index depends on the order codes were met
        key_hash = np.array([_name_hash(name) for name in keys], dtype=np.int64)
        h = _mix64(rows.subject[r], rows.time[r], key_hash[k], v)
        new = pl.DataFrame({"k": k.astype(np.uint32), "v": v, "h": h})
        self.samples = _bottom_k(
            new if self.samples is None else pl.concat([self.samples, new]), self.max_values_per_code
        )

    def _add_gaps(self, subject: np.ndarray, time: np.ndarray) -> None:
        dt = np.diff(time)
        n_long, rem, bins = _gap_pieces(dt[(subject[1:] == subject[:-1]) & (dt > 0)])
        self.gap_n[-1] += n_long.sum()
        self.gap_sum[-1] += n_long.sum() * float(SIX_MONTHS_US)
        ok = bins >= 0
        self.gap_n += np.bincount(bins[ok], minlength=len(INTERVAL_BINS))
        self.gap_sum += np.bincount(
            bins[ok], weights=rem[ok].astype(np.float64), minlength=len(INTERVAL_BINS)
        )

    def stats(self, n_subjects: int, min_code_count: int) -> dict:
        names = list(self.value_keys)
        return {
            "fitted_on": {"split": "train", "subjects": n_subjects, "rows": self.n_rows},
            "min_code_count": min_code_count,
            "max_values_per_code": self.max_values_per_code,
            "code_counts": dict(sorted(self.code_counts.items(), key=lambda kv: (-kv[1], kv[0]))),
            "static_counts": dict(sorted(self.static_counts.items(), key=lambda kv: (-kv[1], kv[0]))),
            "value_counts": dict(sorted((names[i], int(n)) for i, n in enumerate(self.value_counts) if n)),
            "value_edges": _deciles(self.samples, names, self.value_counts, min_code_count),
            "intervals": _interval_stats(self.gap_sum, self.gap_n),
        }


class Tokenizer:
    """A preset plus what was fitted on train: the vocab, decile edges per code, interval means."""

    def __init__(self, preset: Preset, vocab: Vocab, stats: dict):
        self.preset, self.vocab, self.stats = preset, vocab, stats
        self.normalizer = Normalizer(preset)
        self.value_keys = sorted(stats["value_edges"])
        self._value_index = {k: i for i, k in enumerate(self.value_keys)}
        self._edges = np.array([stats["value_edges"][k] for k in self.value_keys], dtype=np.float64)
        self._edges = self._edges.reshape(len(self.value_keys), len(QUANTILES) - 1)
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
            fitter.add(rows, rows.rows_of(train_ids) if mixed else None)
            del rows  # before the next shard is read
        stats = fitter.stats(len(train_ids), min_code_count)
        vocab = _build_vocab(preset, fitter.normalizer, stats, min_code_count)
        return cls(preset, vocab, stats)

    # -- transforming --------------------------------------------------------------------------------

    def _code_entry(self, code: str) -> tuple:
        """(token ids, value index or -1, numeric_from_text, static field or -1, rank) of one code."""
        entry = self._code_cache.get(code)
        if entry is None:
            norm = self.normalizer.normalize(code)
            if norm.static_field >= 0:
                sf = self.preset.static[norm.static_field]
                ids = [self.vocab.stoi.get(code, self.vocab.stoi[sf.prefix + UNK_SUFFIX])]
            else:
                ids = [self.vocab.encode(norm.tokens[0])] if norm.tokens else []
                for tok in norm.tokens[1:]:
                    label = tok.split("//", 1)[0]
                    ids.append(self.vocab.stoi.get(tok, self.vocab.stoi[label + UNK_SUFFIX]))
            vidx = self._value_index.get(norm.value_key, -1) if norm.value_key else -1
            entry = (ids, vidx, norm.numeric_from_text, norm.static_field, norm.rank)
            self._code_cache[code] = entry
        return entry

    def transform(self, rows: ShardRows) -> TokenizedShard:
        """Tokenise one shard's validated rows (from `read_shard`) into timelines of its subjects.

        Vectorised: each distinct code is normalised once; numpy gathers each row's token ids from
        that per-code table and scatters all tokens into place, a chunk of subjects at a time.
        Subjects without timed events get no timeline (they are left out).
        """
        entries = [self._code_entry(c) for c in rows.codes]
        ids = _Ragged(
            np.fromiter((i for e in entries for i in e[0]), dtype=np.int64),
            np.array([len(e[0]) for e in entries], dtype=np.int64),
        )
        vidx = np.array([e[1] for e in entries], dtype=np.int64)
        from_text = np.array([e[2] for e in entries], dtype=bool)
        sfield = np.array([e[3] for e in entries], dtype=np.int64)
        rank = np.array([e[4] for e in entries], dtype=np.int64)

        cidx = rows.code_index
        r = np.nonzero(rows.timed & (ids.lengths[cidx] > 0) & (sfield[cidx] < 0))[0]
        r = _order_within_time(r, rows.subject[r], rows.time[r], rank[cidx[r]])
        value = _values(rows, r, from_text)
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
            **self._static_entries(rows, ids, sfield, subject_ids),
            birth_us=self._birth(rows, subject_ids),
        )

    def _assemble(self, sid, t, cidx, v, ids: _Ragged, vidx_of_code) -> tuple[np.ndarray, ...]:
        """Tokens of time-ordered rows of whole subjects: (tokens, times, tokens per subject, subject ids).

        Per row: interval tokens (if a gap >= 5 min precedes it), code token(s), value token, and
        after a subject's last row TIMELINE_END. Positions come from a cumulative sum of counts.
        """
        n = len(sid)
        n_code = ids.lengths[cidx]
        vidx = vidx_of_code[cidx]
        has_q = (vidx >= 0) & ~np.isnan(v)
        q_rows = np.nonzero(has_q)[0]
        q = (v[q_rows, None] >= self._edges[vidx[q_rows]]).sum(axis=1)  # Q index: edges <= value

        first = np.ones(n, dtype=bool)
        first[1:] = sid[1:] != sid[:-1]
        last = np.ones(n, dtype=bool)
        last[:-1] = first[1:]
        gap = np.zeros(n, dtype=np.int64)
        gap[1:] = t[1:] - t[:-1]
        gap[first] = 0
        n_long, _rem, rem_bin = _gap_pieces(gap)
        n_int = n_long + (rem_bin >= 0)

        count = n_int + n_code + has_q + last
        start = np.cumsum(count) - count
        total = int(count.sum())
        tokens = np.empty(total, dtype=self.vocab.dtype)
        times = np.empty(total, dtype=np.int64)

        r = np.nonzero(n_int)[0]  # interval tokens: n_long x 6mt, then the remainder's bin
        pos = _ranges(start[r], n_int[r])
        row = np.repeat(r, n_int[r])
        j = pos - start[row]
        is_long = j < n_long[row]
        tokens[pos] = np.where(is_long, self.vocab.interval_ids[-1], self.vocab.interval_ids[rem_bin[row]])
        times[pos] = np.where(is_long, t[row] - gap[row] + (j + 1) * SIX_MONTHS_US, t[row])

        pos = _ranges(start + n_int, n_code)  # code tokens
        tokens[pos] = ids.gather(cidx)
        times[pos] = np.repeat(t, n_code)

        pos = start[q_rows] + n_int[q_rows] + n_code[q_rows]  # value tokens
        tokens[pos] = self.vocab.quantile_ids[q]
        times[pos] = t[q_rows]

        pos = start[last] + count[last] - 1  # TIMELINE_END
        tokens[pos] = self.vocab.timeline_end_id
        times[pos] = t[last]

        subject_start = start[first]
        lengths = np.diff(np.append(subject_start, total))
        return tokens, times, lengths, sid[first]

    def _static_entries(self, rows: ShardRows, ids: _Ragged, sfield, subject_ids) -> dict[str, np.ndarray]:
        """Each subject's static values over time, one entry per change, ordered by (field, time)."""
        r = np.nonzero(sfield[rows.code_index] >= 0)[0]
        subj, times = [rows.subject[r]], [rows.time[r]]
        fields, tokens = [sfield[rows.code_index[r]]], [ids.flat[ids.starts[rows.code_index[r]]]]
        for i, sf in enumerate(self.preset.static):
            if sf.column and sf.column in rows.extra.column_names:
                idx, values = rows.categories(sf.column)
                unk = self.vocab.stoi[sf.prefix + UNK_SUFFIX]
                token_of = np.array(
                    [self.vocab.stoi.get(f"{sf.prefix}//{v}", unk) for v in values], dtype=np.int64
                )
                r = np.nonzero(idx >= 0)[0]
                subj.append(rows.subject[r])
                times.append(rows.time[r])
                fields.append(np.full(len(r), i))
                tokens.append(token_of[idx[r]])
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
        stats = json.loads((directory / "stats.json").read_text())
        return cls(preset, Vocab.load(directory / "vocab.json"), stats)


# ----------------------------------------------------------------------------------------------------
# helpers


def static_columns(preset: Preset) -> list[str]:
    """Data columns holding static-context values (read dictionary-encoded: few distinct values)."""
    return [s.column for s in preset.static if s.column]


def needed_columns(preset: Preset) -> list[str]:
    """MEDS columns a preset reads besides subject_id, time and code."""
    cols = ["numeric_value", *(s.column for s in preset.static if s.column)]
    if any(r.numeric_from_text for r in preset.rules):
        cols.append("text_value")
    return cols


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
    keep = [i for i, n in enumerate(counts) if n >= min_count]
    if samples is None or not keep:
        return {}
    qs = [i / 10 for i in range(1, 10)]
    edges = (
        samples.filter(pl.col("k").is_in(keep))
        .group_by("k")
        .agg([pl.col("v").quantile(q, interpolation="linear").alias(f"e{i}") for i, q in enumerate(qs)])
    )
    out = {names[row[0]]: [float(x) for x in row[1:]] for row in edges.iter_rows()}
    return dict(sorted(out.items()))


def _gap_pieces(gaps: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Split gaps (µs) into whole 6-month pieces and a remainder; bin of the remainder or -1 (< 5 min)."""
    n_long = gaps // SIX_MONTHS_US
    rem = gaps - n_long * SIX_MONTHS_US
    bins = np.searchsorted(INTERVAL_EDGES_US, rem, side="right") - 1
    return n_long, rem, bins


def _interval_stats(gap_sum: np.ndarray, gap_n: np.ndarray) -> list[dict]:
    out = []
    for j, (_name, lo) in enumerate(INTERVAL_BINS):
        hi = INTERVAL_BINS[j + 1][1] if j + 1 < len(INTERVAL_BINS) else SIX_MONTHS_US
        fallback = (lo + hi) / 2 if j + 1 < len(INTERVAL_BINS) else float(SIX_MONTHS_US)
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
    static += [tok for tok, n in stats["static_counts"].items() if n >= min_count and tok not in static]
    itos += static
    kinds += ["static"] * len(static)
    codes = list(EVENT_TOKENS) + [label + UNK_SUFFIX for label in normalizer.part_labels]
    seen = set(itos) | set(codes)
    codes += [tok for tok, n in stats["code_counts"].items() if n >= min_count and tok not in seen]
    itos += codes
    kinds += ["code"] * len(codes)
    ids = {s: i for i, s in enumerate(itos)}
    interval_mean = {ids[b["token"]]: b["mean_us"] for b in stats["intervals"]}
    return Vocab(itos, kinds, interval_mean, [sf.field for sf in preset.static])


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
