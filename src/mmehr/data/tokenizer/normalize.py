"""The Normalizer: what a preset turns one source code into (tokens, value key, static field, rank)."""

from __future__ import annotations

import functools
import re
from dataclasses import dataclass

from mmehr.data.tokenizer.presets import Preset


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
