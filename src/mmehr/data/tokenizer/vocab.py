"""The vocabulary: token strings in id order with their kinds, saved as vocab.json."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np

from mmehr.data.tokenizer.tokens import INTERVAL_TOKENS, KINDS, PAD, QUANTILES, TIMELINE_END, UNK
from mmehr.io import read_json


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
        d = read_json(path)
        try:
            return cls.from_dict(d)
        except (KeyError, TypeError, ValueError) as e:
            raise ValueError(f"{path}: not an mmehr vocabulary ({type(e).__name__}: {e})") from None
