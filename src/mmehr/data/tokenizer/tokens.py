"""Token names every vocabulary shares: special tokens, the quantile tokens Q1..Q10, ETHOS's interval
bins, the static-context age tokens, and token kinds."""

from __future__ import annotations

import numpy as np

from mmehr.data.meds import NULL_TIME
from mmehr.units import DAY_US, HOUR_US, MINUTE_US

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

# ETHOS's 19 interval bins: (name, lower edge in µs); a bin spans [its edge, the next edge). ETHOS's
# months are whole days (2mt = 60 days, 6mt = 180 days).
LONG_GAP_US = 180 * DAY_US  # the "6mt" token's length
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
    ("2mt-6mt", 60 * DAY_US),
    ("6mt", LONG_GAP_US),  # a gap of >= 6 months: round(gap / 6 months) of these, no remainder
)
INTERVAL_TOKENS = tuple(f"INTERVAL//{name}" for name, _ in INTERVAL_BINS)
INTERVAL_EDGES_US = np.array([lo for _, lo in INTERVAL_BINS], dtype=np.int64)
MAX_AGE_DECADE = 11  # ages are clamped to 0..119 years
AGE_DECADE, AGE_YEAR = "AGE_DECADE", "AGE_YEAR"
NO_TIME = NULL_TIME  # time of a timeless static row (e.g. GENDER//F), or of an unknown birth

KINDS = ("special", "quantile", "interval", "static", "code")


def _gap_pieces(gaps: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Interval tokens of gaps (µs), as ETHOS: a gap of at least 6 months is round(gap / 6 months) `6mt`
    tokens and nothing else; a shorter one is one bin (-1 below 5 min). Returns (n_long, bin) per gap."""
    long = gaps >= LONG_GAP_US
    n_long = np.where(long, np.rint(gaps / LONG_GAP_US), 0).astype(np.int64)
    bins = np.where(long, -1, np.searchsorted(INTERVAL_EDGES_US, gaps, side="right") - 1)
    return n_long, bins
