"""Normalisation presets (YAML, shipped in mmehr/presets/): per code prefix keep, drop, split into parts,
map, or transform (a named code transform, e.g. ICD-9 -> ICD-10); which codes or columns are static
context; rows derived from other rows; how events at one timestamp are ordered."""

from __future__ import annotations

import importlib.resources
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from mmehr.config import ConfigError, from_dict, load_yaml
from mmehr.data.tokenizer.codes import TRANSFORMS


@dataclass
class Rule:
    """One normalisation rule; the first rule whose `match` (regex, searched) fits a code applies.

    keep: the code is one token. drop: no token. split: `A//b//c` -> `A`, `{parts[0]}//b`,
    `{parts[1]}//c` (extra parts join the last). map: rewrite with `re.sub(match, to)` and continue with
    the following rules. transform: the tokens of a named code transform (`mmehr.data.tokenizer.codes`,
    e.g. `icd_cm`: ICD-9 -> ICD-10-CM -> category, characters 3-6, suffix); no tokens drops the code.
    `values`: whether numeric values get decile tokens; `numeric_from_text` also parses a number from
    text_value when numeric_value is null (older ETLs keep OMR values as text); `text_values` names the
    numbers of a text like "120/80" (split on "/"), each with its own deciles and value token (e.g.
    [SBP, DBP]). `require_value`: drop rows without a value (or outside `value_range` [lo, hi]).
    `keep_top`: keep only the N codes of this rule most frequent on train; the others are dropped.
    """

    match: str
    action: Literal["keep", "drop", "split", "map", "transform"] = "keep"
    parts: list[str] = field(default_factory=list)
    to: str = ""
    transform: str = ""
    values: Literal["quantile", "none"] = "quantile"
    numeric_from_text: bool = False
    text_values: list[str] = field(default_factory=list)
    require_value: bool = False
    value_range: list[float] = field(default_factory=list)
    keep_top: int | None = None


@dataclass
class StaticField:
    """A static-context field: from codes matching `codes` (token = the code) or a data `column` (token =
    `{PREFIX}//{value}`).

    values: [[regex, replacement], ...]: a column value becomes the replacement (`re.sub`) of the first
    regex it matches (ETHOS's race groups). single: one value per subject, recorded at its first time:
    the first value not in `last_resort`, else the first in `last_resort` order (ETHOS's single race).
    quantile: the token is `{PREFIX}//Q{k}`, k the decile of the code's value (ETHOS's BMI); with
    on_timeline the code is also a timeline event, tokenized by the rules.
    """

    field: str
    codes: str = ""
    column: str = ""
    values: list[list[str]] = field(default_factory=list)
    single: bool = False
    last_resort: list[str] = field(default_factory=list)
    quantile: bool = False
    on_timeline: bool = False

    @property
    def prefix(self) -> str:
        return self.field.upper()


@dataclass
class DerivedRow:
    """A row added right after each row whose code matches `after` (same subject and time): its code is
    `code` with `{column}` replaced by that row's value of the column (UNKNOWN if null), unless a row at
    the same time matches `unless_same_time`. ETHOS's INSURANCE//{insurance} after an admission, and
    DRG//UNKNOWN after a discharge without a DRG."""

    after: str
    code: str
    unless_same_time: str = ""


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
    derived: list[DerivedRow] = field(default_factory=list)
    # train count below which a code is <UNK>, unless the caller sets one (None: mmehr's default, 10)
    min_code_count: int | None = None


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
        if rule.action == "transform" and rule.transform not in TRANSFORMS:
            raise ConfigError(
                f"{where}: rules[{i}] transform {rule.transform!r} is not one of {sorted(TRANSFORMS)}"
            )
        if rule.value_range and len(rule.value_range) != 2:
            raise ConfigError(f"{where}: rules[{i}] value_range must be [low, high]")
    for i, o in enumerate(preset.order):
        _compile(o.match, f"{where}: order[{i}].match")
    for i, s in enumerate(preset.static):
        if bool(s.codes) == bool(s.column):
            raise ConfigError(f"{where}: static[{i}] ({s.field}) needs exactly one of `codes` or `column`")
        if s.codes:
            _compile(s.codes, f"{where}: static[{i}].codes")
        for j, pair in enumerate(s.values):
            if len(pair) != 2:
                raise ConfigError(f"{where}: static[{i}].values[{j}] must be [regex, replacement]")
            _compile(pair[0], f"{where}: static[{i}].values[{j}]")
        if (s.quantile or s.on_timeline) and not s.codes:
            raise ConfigError(f"{where}: static[{i}] ({s.field}): quantile / on_timeline need `codes`")
    for i, d in enumerate(preset.derived):
        _compile(d.after, f"{where}: derived[{i}].after")
        if d.unless_same_time:
            _compile(d.unless_same_time, f"{where}: derived[{i}].unless_same_time")
    return preset


def _compile(pattern: str, where: str) -> re.Pattern:
    try:
        return re.compile(pattern)
    except re.error as e:
        raise ConfigError(f"{where}: invalid regex {pattern!r}: {e}") from e


def static_columns(preset: Preset) -> list[str]:
    """Data columns holding static-context or derived-row values (read dictionary-encoded: few values)."""
    return [s.column for s in preset.static if s.column] + derived_columns(preset)


def derived_columns(preset: Preset) -> list[str]:
    """Data columns named in derived rows' code templates (`{insurance}`)."""
    return sorted({c for d in preset.derived for c in re.findall(r"\{(\w+)\}", d.code)})


def needed_columns(preset: Preset) -> list[str]:
    """MEDS columns a preset reads besides subject_id, time and code."""
    cols = ["numeric_value", *(s.column for s in preset.static if s.column), *derived_columns(preset)]
    if any(r.numeric_from_text or r.text_values for r in preset.rules):
        cols.append("text_value")
    return cols
