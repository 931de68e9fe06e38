"""Normalisation presets (YAML, shipped in mmehr/presets/): per code prefix keep, drop, split into parts,
or map; which codes or columns are static context; how events at one timestamp are ordered."""

from __future__ import annotations

import importlib.resources
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from mmehr.config import ConfigError, from_dict, load_yaml


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


def static_columns(preset: Preset) -> list[str]:
    """Data columns holding static-context values (read dictionary-encoded: few distinct values)."""
    return [s.column for s in preset.static if s.column]


def needed_columns(preset: Preset) -> list[str]:
    """MEDS columns a preset reads besides subject_id, time and code."""
    cols = ["numeric_value", *(s.column for s in preset.static if s.column)]
    if any(r.numeric_from_text for r in preset.rules):
        cols.append("text_value")
    return cols
