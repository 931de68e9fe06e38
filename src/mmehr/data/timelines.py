"""Memory-mapped token timelines, as `mmehr tokenize` (`mmehr.data.tokenize`) writes them, and
`TimelineStore` that reads them.

Layout (docs/interfaces.md):

    OUT/vocab.json, stats.json, tokenizer.yaml   fitted on train only (or copied from --vocab-from)
    OUT/subject_splits.parquet                   the splits used (the dataset's own, or generated)
    OUT/{split}/shard-{k}/                       one directory per split per input shard k:
        tokens.npy (uint16 | int32), times.npy (int64 µs), offsets.npy (int64, n+1), subject_ids.npy,
        static_tokens.npy, static_times.npy, static_fields.npy, static_offsets.npy (n+1), birth_us.npy
    OUT/manifest.json                            written last; without it the output is not trusted
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from mmehr.data.tokenizer import AGE_DECADE, AGE_YEAR, MAX_AGE_DECADE, NO_TIME, UNK_SUFFIX, Vocab
from mmehr.io import read_manifest
from mmehr.units import YEAR_US

ARRAYS = (
    "tokens",
    "times",
    "offsets",
    "subject_ids",
    "static_tokens",
    "static_times",
    "static_fields",
    "static_offsets",
    "birth_us",
)
MEMMAPPED = ("tokens", "times")  # large; the rest is per subject and loaded whole


class TimelineStore:
    """One split of a tokenised dataset. Subjects are indexed 0..len-1 in shard order.

    `timeline(i)` and `window(i, start, end)` return views (tokens in the vocab dtype, times int64 µs)
    into memory-mapped arrays: nothing is copied until the caller asks.
    """

    def __init__(self, root: str | Path, split: str = "train"):
        self.root = Path(root)
        self.manifest = read_manifest(self.root)
        if split not in self.manifest["splits"]:
            raise ValueError(f"{self.root}: no split {split!r}; it has {sorted(self.manifest['splits'])}")
        self.split = split
        self.vocab = Vocab.load(self.root / "vocab.json")
        self._shards = [
            self._open_shard(self.root / split / s) for s in self.manifest["splits"][split]["shards"]
        ]
        counts = [len(sh["subject_ids"]) for sh in self._shards]
        self._first = np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)
        self.subject_ids = np.concatenate(
            [sh["subject_ids"] for sh in self._shards] or [np.zeros(0, np.int64)]
        )
        self.lengths = np.concatenate(
            [np.diff(sh["offsets"]) for sh in self._shards] or [np.zeros(0, np.int64)]
        )
        self._index = {int(s): i for i, s in enumerate(self.subject_ids)}
        v = self.vocab
        self._field_unk = np.array([v.stoi[f.upper() + UNK_SUFFIX] for f in v.static_fields], dtype=np.int64)
        self._decade_ids = np.array([v.stoi[f"{AGE_DECADE}//{d}"] for d in range(MAX_AGE_DECADE + 1)])
        self._year_ids = np.array([v.stoi[f"{AGE_YEAR}//{y}"] for y in range(10)])
        self._age_unk = (v.stoi[AGE_DECADE + UNK_SUFFIX], v.stoi[AGE_YEAR + UNK_SUFFIX])

    @staticmethod
    def _open_shard(directory: Path) -> dict[str, np.ndarray]:
        return {
            name: np.load(directory / f"{name}.npy", mmap_mode="r" if name in MEMMAPPED else None)
            for name in ARRAYS
        }

    def __len__(self) -> int:
        return len(self.subject_ids)

    @property
    def n_tokens(self) -> int:
        return int(self.lengths.sum())

    @property
    def static_len(self) -> int:
        """Length of every static context: one token per static field, then age decade and year."""
        return len(self._field_unk) + 2

    def index_of(self, subject_id: int) -> int:
        try:
            return self._index[int(subject_id)]
        except KeyError:
            raise KeyError(f"subject {subject_id} is not in split {self.split!r} of {self.root}") from None

    def _locate(self, i: int) -> tuple[dict[str, np.ndarray], int]:
        if not 0 <= i < len(self):
            raise IndexError(f"subject index {i} out of range for {len(self)} subjects")
        k = int(np.searchsorted(self._first, i, side="right") - 1)
        return self._shards[k], int(i - self._first[k])

    def timeline(self, i: int) -> tuple[np.ndarray, np.ndarray]:
        """Subject i's whole timeline: (tokens (L,), times (L,) int64 µs), views into the store."""
        sh, j = self._locate(i)
        a, b = int(sh["offsets"][j]), int(sh["offsets"][j + 1])
        return sh["tokens"][a:b], sh["times"][a:b]

    def window(self, i: int, start: int, end: int) -> tuple[np.ndarray, np.ndarray]:
        """Token positions [start, end) of subject i's timeline (views); 0 <= start <= end <= length."""
        n = int(self.lengths[i]) if 0 <= i < len(self) else -1
        if not 0 <= start <= end <= n:
            raise IndexError(f"window [{start}, {end}) outside subject {i}'s timeline of {n} tokens")
        tokens, times = self.timeline(i)
        return tokens[start:end], times[start:end]

    def static_context(self, i: int, at_time_us: int) -> np.ndarray:
        """Static tokens (static_len,) int64 as of `at_time_us`: per field the most recent value at or
        before that time, else the field's unknown token (as ETHOS: a later value would reveal a future
        admission), then the age in whole years as AGE_DECADE and AGE_YEAR tokens (unknown tokens
        without a birth time). Timeless values (e.g. GENDER//F) hold at any time.
        """
        sh, j = self._locate(i)
        a, b = int(sh["static_offsets"][j]), int(sh["static_offsets"][j + 1])
        fields, times, tokens = sh["static_fields"][a:b], sh["static_times"][a:b], sh["static_tokens"][a:b]
        out = np.empty(self.static_len, dtype=np.int64)
        for f in range(len(self._field_unk)):
            m = fields == f
            if not m.any():
                out[f] = self._field_unk[f]
                continue
            k = int(np.searchsorted(times[m], at_time_us, side="right")) - 1
            out[f] = tokens[m][k] if k >= 0 else self._field_unk[f]
        birth = int(sh["birth_us"][j])
        if birth == NO_TIME:
            out[-2:] = self._age_unk
        else:
            age = min(max(int((at_time_us - birth) // YEAR_US), 0), 10 * MAX_AGE_DECADE + 9)
            out[-2], out[-1] = self._decade_ids[age // 10], self._year_ids[age % 10]
        return out

    def birth_us(self, i: int) -> int | None:
        sh, j = self._locate(i)
        b = int(sh["birth_us"][j])
        return None if b == NO_TIME else b
