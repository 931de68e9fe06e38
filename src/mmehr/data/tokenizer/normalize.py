"""The Normalizer: what a preset turns one source code into (tokens, value keys, static field, rank)."""

from __future__ import annotations

import functools
import re
from dataclasses import dataclass

from mmehr.data.tokenizer.codes import TRANSFORMS, token_label
from mmehr.data.tokenizer.presets import Preset

NO_RANGE = (float("-inf"), float("inf"))


@dataclass(frozen=True)
class Normalized:
    """What one source code becomes. tokens[0] is the whole-code token, tokens[1:] split parts (or the
    further tokens of a transform); labels[j]: the label of tokens[j]'s unknown form `{label}//<UNK>`
    ("" for plain <UNK>)."""

    tokens: tuple[str, ...]  # () when dropped or static only
    value_keys: tuple[str, ...]  # whose deciles tokenise the values, one per value token (() : none)
    numeric_from_text: bool
    static_field: int  # index into preset.static, or -1
    rank: int
    labels: tuple[str, ...] = ()
    text_values: bool = False  # the values are the numbers of text_value split on "/", one per key
    rule: int = -1  # index of the rule that produced the tokens (-1: none, the default keep)
    require_value: bool = False
    value_range: tuple[float, float] = NO_RANGE

    @property
    def value_key(self) -> str | None:
        return self.value_keys[0] if self.value_keys else None


class Normalizer:
    """Applies a preset to codes; memoised, since a dataset has far fewer codes than rows."""

    def __init__(self, preset: Preset):
        self.preset = preset
        self._rules = [(re.compile(r.match), r) for r in preset.rules]
        self._order = [(re.compile(o.match), o.rank) for o in preset.order]
        self._static = [(i, re.compile(s.codes)) for i, s in enumerate(preset.static) if s.codes]
        self.part_labels = sorted({p for r in preset.rules if r.action == "split" for p in r.parts})
        transform_labels = {
            lab for r in preset.rules if r.action == "transform" for lab in TRANSFORMS[r.transform][1]
        }
        # every label with an unknown token `{label}//<UNK>` in the vocabulary
        self.unk_labels = sorted(set(self.part_labels) | transform_labels)
        self.normalize = functools.lru_cache(maxsize=None)(self._normalize)

    def _normalize(self, code: str) -> Normalized:
        field = -1
        for i, pattern in self._static:
            if pattern.search(code):
                if not self.preset.static[i].on_timeline:
                    return Normalized((), (), False, i, 0)
                field = i
                break
        if code == self.preset.birth_code:
            return Normalized((), (), False, -1, 0)
        for k, (pattern, rule) in enumerate(self._rules):
            if not pattern.search(code):
                continue
            if rule.action == "map":
                code = pattern.sub(rule.to, code, count=1)
                continue
            if rule.action == "drop":
                return Normalized((), (), False, -1, 0)
            if rule.action == "transform":
                tokens = TRANSFORMS[rule.transform][0](code)
                labels = tuple(token_label(t) for t in tokens)
            elif rule.action == "keep":
                tokens, labels = (code,), ("",)
            else:
                tokens = _split(code, rule.parts)
                labels = ("", *(t.split("//", 1)[0] for t in tokens[1:]))
            if rule.values != "quantile" or not tokens:
                keys: tuple[str, ...] = ()
            elif rule.text_values:
                keys = tuple(f"{code}//{name}" for name in rule.text_values)
            else:
                keys = (code,)
            return Normalized(
                tokens,
                keys,
                rule.numeric_from_text,
                field,
                self._rank(code),
                labels,
                text_values=bool(rule.text_values),
                rule=k,
                require_value=rule.require_value or bool(rule.value_range),
                value_range=tuple(rule.value_range) if rule.value_range else NO_RANGE,
            )
        return Normalized((code,), (code,), False, field, self._rank(code), ("",))

    def _rank(self, code: str) -> int:
        return next((rank for pattern, rank in self._order if pattern.search(code)), 0)


def _split(code: str, labels: list[str]) -> tuple[str, ...]:
    head, *rest = code.split("//")
    if len(rest) > len(labels):
        rest = [*rest[: len(labels) - 1], "//".join(rest[len(labels) - 1 :])]
    return (head, *(f"{label}//{value}" for label, value in zip(labels, rest)))
