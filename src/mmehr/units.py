"""Time units. Every time in mmehr is an int64 count of microseconds since the Unix epoch (µs)."""

from __future__ import annotations

MINUTE_US = 60_000_000
HOUR_US = 60 * MINUTE_US
DAY_US = 24 * HOUR_US
YEAR_US = DAY_US * 365.25  # a mean year (float): ages and month lengths, never calendar arithmetic
MONTH_US = YEAR_US / 12
SIX_MONTHS_US = int(6 * MONTH_US)
