"""ETHOS-style tokenizer: normalisation rules as data, a vocabulary and value/interval statistics fitted
on the train split only, and a vectorised transform of MEDS rows into one token timeline per subject.

A subject's timeline is its timed events in order. Each event becomes its code token(s) (a `split` rule
turns `HOSPITAL_ADMISSION//EW EMER.//ER` into `HOSPITAL_ADMISSION`, `ADMISSION_TYPE//EW EMER.`,
`ADMISSION_LOCATION//ER`), then a decile token Q1..Q10 of its numeric value when the code has deciles
fitted on train (ETHOS's breaks: duplicates removed, a value equal to a break in the lower bin). Before
an event that follows a gap of at least 5 minutes come interval tokens, as ETHOS: a gap of 6 months (180
days) or more is round(gap / 6 months) `INTERVAL//6mt` tokens, a shorter one the ETHOS bin holding it.
Events at one timestamp keep their source order except for the preset's `order` ranks (MEDS_DEATH before
a discharge). `TIMELINE_END` closes every timeline. Every token carries a time (int64 µs since epoch):
its event's time; the k-th of n 6-month tokens sits at previous time + k/n of the gap.

Static context (gender, race, marital status, age as decade + year tokens) is kept apart from the
timeline; `mmehr.data.timelines.TimelineStore.static_context` builds it as of any time.

Codes below `min_code_count` on train, or never seen in train, become `<UNK>` (a rare part of a split
code becomes `{LABEL}//<UNK>`): transforming any split or another dataset never fails on an unseen code.

Modules, each importing only those above it:

    tokens.py     special tokens, quantile tokens, interval bins, age tokens, token kinds
    codes.py      named code transforms: ICD-9 -> ICD-10 (GEMs), ICD-10-CM / -PCS parts, drugs -> ATC
    presets.py    Rule, StaticField, DerivedRow, OrderRule, Preset; load_preset / list_presets (presets/*.yaml)
    normalize.py  Normalizer: what a preset turns one source code into
    rows.py       row-level steps: derived rows, values per row (e.g. "120/80"), rows dropped by value
    vocab.py      Vocab (vocab.json)
    fit.py        statistics fitted on train (counts, deciles, interval means) and the vocab built on them
    transform.py  Tokenizer (fit, transform, decode, save, load) and TokenizedShard

Time units (MINUTE_US ... YEAR_US) live in `mmehr.units`.
"""

from mmehr.data.tokenizer.normalize import Normalized, Normalizer
from mmehr.data.tokenizer.presets import (
    OrderRule,
    Preset,
    Rule,
    StaticField,
    list_presets,
    load_preset,
    needed_columns,
    preset_from_dict,
    static_columns,
)
from mmehr.data.tokenizer.tokens import (
    AGE_DECADE,
    AGE_YEAR,
    EVENT_TOKENS,
    INTERVAL_BINS,
    INTERVAL_EDGES_US,
    INTERVAL_TOKENS,
    KINDS,
    LONG_GAP_US,
    MAX_AGE_DECADE,
    NO_TIME,
    PAD,
    QUANTILES,
    TIMELINE_END,
    UNK,
    UNK_SUFFIX,
)
from mmehr.data.tokenizer.transform import CHUNK_ROWS, TokenizedShard, Tokenizer
from mmehr.data.tokenizer.vocab import Vocab

__all__ = [
    "AGE_DECADE",
    "AGE_YEAR",
    "CHUNK_ROWS",
    "EVENT_TOKENS",
    "INTERVAL_BINS",
    "INTERVAL_EDGES_US",
    "INTERVAL_TOKENS",
    "KINDS",
    "LONG_GAP_US",
    "MAX_AGE_DECADE",
    "NO_TIME",
    "PAD",
    "QUANTILES",
    "TIMELINE_END",
    "UNK",
    "UNK_SUFFIX",
    "Normalized",
    "Normalizer",
    "OrderRule",
    "Preset",
    "Rule",
    "StaticField",
    "TokenizedShard",
    "Tokenizer",
    "Vocab",
    "list_presets",
    "load_preset",
    "needed_columns",
    "preset_from_dict",
    "static_columns",
]
