"""The ETHOS-style tokenizer: normalisation presets, vocabulary, deciles, interval tokens, unknown codes,
and the proof that everything fitted comes from the train split only."""

from __future__ import annotations

import json
import shutil
from datetime import datetime, timedelta

import numpy as np
import polars as pl
import pyarrow.parquet as pq
import pytest

from mmehr.config import ConfigError
from mmehr.data.meds import open_meds, read_shard, write_data_shard, write_metadata
from mmehr.data.tokenize import tokenize
from mmehr.data.tokenizer import (
    EVENT_TOKENS,
    INTERVAL_BINS,
    INTERVAL_TOKENS,
    LONG_GAP_US,
    Normalizer,
    Tokenizer,
    Vocab,
    list_presets,
    load_preset,
    needed_columns,
    static_columns,
)
from mmehr.data.tokenizer.tokens import _gap_pieces
from mmehr.units import DAY_US

T0 = datetime(2150, 3, 1, 8, 0)
MIN = timedelta(minutes=1)
COLUMNS = {
    "subject_id": pl.Int64,
    "time": pl.Datetime("us"),
    "code": pl.String,
    "numeric_value": pl.Float32,
    "text_value": pl.String,
    "race": pl.String,
    "marital_status": pl.String,
}


def ev(sid, code, at=None, value=None, text=None, race=None, marital=None) -> dict:
    return dict(
        subject_id=sid,
        time=at,
        code=code,
        numeric_value=value,
        text_value=text,
        race=race,
        marital_status=marital,
    )


def write_dataset(root, rows: list[dict], splits: dict[int, str], shards: list[list[int]] | None = None):
    """A MEDS root from row dicts (in MEDS order), one shard per subject group, with a split file."""
    df = pl.DataFrame(rows, schema=COLUMNS)
    for k, sids in enumerate(shards or [list(splits)]):
        write_data_shard(df.filter(pl.col("subject_id").is_in(sids)), root / "data" / f"{k}.parquet")
    split_df = pl.DataFrame({"subject_id": list(splits), "split": list(splits.values())})
    write_metadata(root, sorted(set(df["code"])), {"dataset_name": "tiny"}, split_df)
    return root


def tiny_rows() -> list[dict]:
    """Two train subjects and one held-out subject, with every case the tokenizer must handle."""
    t1 = T0 + timedelta(days=400)
    return [
        # subject 1: admission, labs 3 min and 2 h apart, discharge and death at one time (death last)
        ev(1, "GENDER//F"),
        ev(1, "MEDS_BIRTH", datetime(2100, 1, 1)),
        ev(1, "HOSPITAL_ADMISSION//EW EMER.//EMERGENCY ROOM", T0, race="WHITE", marital="MARRIED"),
        ev(1, "LAB//50912//mg/dL", T0 + 3 * MIN, 1.0),
        ev(1, "LAB//50912//mg/dL", T0 + 123 * MIN, 9.0),
        ev(1, "HOSPITAL_DISCHARGE//DIED", T0 + timedelta(days=1)),
        ev(1, "MEDS_DEATH", T0 + timedelta(days=1)),
        # subject 2: labs 2..8, then a year and 10 minutes later a new admission with a new marital status
        ev(2, "GENDER//M"),
        ev(2, "MEDS_BIRTH", datetime(2080, 6, 1)),
        ev(2, "HOSPITAL_ADMISSION//ELECTIVE//EMERGENCY ROOM", t1, race="WHITE", marital="SINGLE"),
        *(
            ev(2, "LAB//50912//mg/dL", t1 + 10 * i * MIN, float(v))
            for i, v in enumerate(range(2, 9), start=1)
        ),
        ev(2, "LAB//50912//mg/dL", t1 + 70 * MIN, float("nan")),
        ev(2, "BMI (kg/m2)", t1 + 70 * MIN, text="24.5"),
        ev(
            2,
            "HOSPITAL_ADMISSION//ELECTIVE//EMERGENCY ROOM",
            t1 + 70 * MIN + timedelta(days=365.25, minutes=10),
            race="WHITE",
            marital="MARRIED",
        ),
        # subject 3 (held out): a code, an admission type and a race never seen in train
        ev(3, "GENDER//F"),
        ev(3, "HOSPITAL_ADMISSION//BRAND NEW//EMERGENCY ROOM", T0, race="MARTIAN"),
        ev(3, "LAB//99999//mg/dL", T0 + 30 * MIN, 4.0),
        ev(3, "LAB//50912//mg/dL", T0 + 40 * MIN, 100.0),
    ]


SPLITS = {1: "train", 2: "train", 3: "held_out"}


@pytest.fixture
def tiny(tmp_path):
    return write_dataset(tmp_path / "meds", tiny_rows(), SPLITS)


def fit(root, preset="mimic_iv_legacy", **kw) -> Tokenizer:
    return Tokenizer.fit(open_meds(root), load_preset(preset), progress=False, **kw)


def timeline_of(tok: Tokenizer, root, sid: int) -> tuple[list[str], np.ndarray]:
    ds = open_meds(root)
    for shard in ds.shards:
        ts = tok.transform(read_shard(shard, needed_columns(tok.preset), static_columns(tok.preset)))
        if sid in ts.subject_ids:
            i = int(np.nonzero(ts.subject_ids == sid)[0][0])
            a, b = ts.offsets[i], ts.offsets[i + 1]
            return tok.vocab.decode(ts.tokens[a:b]), ts.times[a:b]
    raise KeyError(sid)


def us(dt: datetime) -> int:
    return int((dt - datetime(1970, 1, 1)) / timedelta(microseconds=1))


# ---------------------------------------------------------------------------------------------------
# the timeline itself


def test_timeline_tokens_follow_ethos_rules_exactly(tiny):
    tok = fit(tiny, min_code_count=1)
    tokens, times = timeline_of(tok, tiny, 1)
    assert tokens == [
        "HOSPITAL_ADMISSION",
        "ADMISSION_TYPE//EW EMER.",
        "ADMISSION_LOCATION//EMERGENCY ROOM",
        "LAB//50912//mg/dL",  # 3 minutes later: below 5 min, no interval token
        "Q1",
        "INTERVAL//2h-3h",
        "LAB//50912//mg/dL",
        "Q8",  # above all 7 distinct train breaks (2..8)
        "INTERVAL//18h-1d",
        "MEDS_DEATH",  # moved before the discharge recorded at the same time
        "HOSPITAL_DISCHARGE",
        "DISCHARGE_LOCATION//DIED",
        "TIMELINE_END",
    ]
    day = T0 + timedelta(days=1)
    expected = [T0] * 3 + [T0 + 3 * MIN] * 2 + [T0 + 123 * MIN] * 3 + [day] * 5
    assert times.tolist() == [us(t) for t in expected]


def test_long_gaps_are_rounded_six_month_tokens_without_a_remainder(tiny):
    tok = fit(tiny, min_code_count=1)
    tokens, times = timeline_of(tok, tiny, 2)
    i = tokens.index("INTERVAL//6mt")
    # a year and 10 minutes = round(365.25 / 180) = 2 six-month tokens, and no bin for the rest (ETHOS)
    assert tokens[i : i + 3] == ["INTERVAL//6mt", "INTERVAL//6mt", "HOSPITAL_ADMISSION"]
    last, gap = times[i - 1], times[i + 2] - times[i - 1]
    assert times[i] == last + gap // 2 and times[i + 1] == times[i + 2]  # spread over the gap, in order
    assert np.all(np.diff(times) >= 0)


@pytest.mark.parametrize(
    ("days", "expected"),
    [
        (170, ["INTERVAL//2mt-6mt"]),
        (180, ["INTERVAL//6mt"]),
        (250, ["INTERVAL//6mt"]),  # 1.39 x 6 months: one token, not one plus a 70-day remainder
        (300, ["INTERVAL//6mt"] * 2),  # 1.67: rounds up
        (1000, ["INTERVAL//6mt"] * 6),  # 5.56
    ],
)
def test_gap_tokens_round_like_ethos(days, expected):
    n_long, bins = _gap_pieces(np.array([days * DAY_US]))
    got = ["INTERVAL//6mt"] * int(n_long[0]) + ([INTERVAL_TOKENS[bins[0]]] if bins[0] >= 0 else [])
    assert got == expected


def test_values_get_train_deciles_and_missing_values_get_none(tiny):
    tok = fit(tiny, min_code_count=1)
    # train values of LAB//50912 are 1..9: deciles (nearest) 2, 3, 3, 4, 5, 6, 7, 7, 8, duplicates removed
    assert tok.stats["value_edges"]["LAB//50912//mg/dL"] == [2.0, 3.0, 4.0, 5.0, 6.0, 7.0, 8.0]
    tokens, _ = timeline_of(tok, tiny, 2)
    labs = [tokens[i + 1] for i, t in enumerate(tokens) if t == "LAB//50912//mg/dL"]
    # values 2..8 each equal a break: each goes to the lower bin (Q1..Q7); then NaN -> no value token
    assert labs == ["Q1", "Q2", "Q3", "Q4", "Q5", "Q6", "Q7", "BMI (kg/m2)"]
    held, _ = timeline_of(tok, tiny, 3)
    assert held[held.index("LAB//50912//mg/dL") + 1] == "Q8"  # beyond the last break


def test_a_discrete_lab_fills_consecutive_bins(tmp_path):
    # 50% ones, 30% twos, 20% threes: breaks 1, 2, 3 once each; ones -> Q1, twos -> Q2, threes -> Q3
    # (with duplicate breaks kept and ties going up they would skip to Q5, Q9, Q10).
    values = [1.0] * 50 + [2.0] * 30 + [3.0] * 20
    rows = [ev(1, "GENDER//F")] + [ev(1, "LAB//1//x", T0 + i * MIN, v) for i, v in enumerate(values)]
    root = write_dataset(tmp_path / "meds", rows, {1: "train"})
    tok = fit(root, min_code_count=1)
    assert tok.stats["value_edges"]["LAB//1//x"] == [1.0, 2.0, 3.0]
    tokens, _ = timeline_of(tok, root, 1)
    q = [tokens[i + 1] for i, t in enumerate(tokens) if t == "LAB//1//x"]
    assert q == ["Q1"] * 50 + ["Q2"] * 30 + ["Q3"] * 20


def test_numbers_kept_as_text_get_value_tokens_when_the_rule_says_so(tiny):
    tok = fit(tiny, min_code_count=1)
    tokens, _ = timeline_of(tok, tiny, 2)
    assert tokens[tokens.index("BMI (kg/m2)") + 1] in {f"Q{i}" for i in range(1, 11)}
    assert tok.stats["value_counts"]["BMI (kg/m2)"] == 1


def test_codes_unseen_in_train_become_unknown_without_crashing(tiny):
    tok = fit(tiny, min_code_count=1)
    tokens, _ = timeline_of(tok, tiny, 3)
    assert tokens[:3] == ["HOSPITAL_ADMISSION", "ADMISSION_TYPE//<UNK>", "ADMISSION_LOCATION//EMERGENCY ROOM"]
    assert "<UNK>" in tokens and "LAB//99999//mg/dL" not in tok.vocab.stoi
    assert not tokens[tokens.index("<UNK>") + 1].startswith("Q")  # unknown code: no deciles, no value token
    assert tok.decode_codes([tok.vocab.encode(t) for t in tokens])[:2] == [
        "HOSPITAL_ADMISSION//<UNK>//EMERGENCY ROOM",
        "<UNK>",
    ]


def test_codes_rarer_than_min_count_become_unknown(tiny):
    tok = fit(tiny, min_code_count=2)
    assert "ADMISSION_TYPE//EW EMER." not in tok.vocab.stoi  # once in train
    assert "ADMISSION_TYPE//ELECTIVE" in tok.vocab.stoi  # twice in train
    assert tok.stats["code_counts"]["ADMISSION_TYPE//EW EMER."] == 1
    tokens, _ = timeline_of(tok, tiny, 1)
    assert tokens[1] == "ADMISSION_TYPE//<UNK>"
    assert "LAB//50912//mg/dL" in tokens


def test_every_preset_has_the_bare_event_tokens(tiny):
    assert set(list_presets()) >= {"generic", "mimic_iv", "mimic_iv_legacy"}
    for name in list_presets():
        vocab = fit(tiny, preset=name).vocab
        for token in (*EVENT_TOKENS, "TIMELINE_END"):
            assert len(vocab.ids_matching(f"^{token}$")) == 1, (name, token)


# ---------------------------------------------------------------------------------------------------
# normalisation rules


def test_presets_split_map_drop_and_route_static_codes():
    legacy = Normalizer(load_preset("mimic_iv_legacy"))
    assert legacy.normalize("HOSPITAL_ADMISSION//EW EMER.//EMERGENCY ROOM").tokens == (
        "HOSPITAL_ADMISSION",
        "ADMISSION_TYPE//EW EMER.",
        "ADMISSION_LOCATION//EMERGENCY ROOM",
    )
    assert legacy.normalize("ICU_DISCHARGE//Trauma SICU (TSICU)").tokens == (
        "ICU_DISCHARGE",
        "ICU_UNIT//Trauma SICU (TSICU)",
    )
    assert legacy.normalize("HOSPITAL_DISCHARGE").tokens == (
        "HOSPITAL_DISCHARGE",
    )  # fewer parts: fewer tokens
    assert legacy.normalize("MEDS_BIRTH").tokens == ()
    assert legacy.normalize("GENDER//F").static_field == 0
    assert legacy.normalize("MEDS_DEATH").rank < legacy.normalize("HOSPITAL_DISCHARGE//HOME").rank
    assert legacy.normalize("DIAGNOSIS//ICD//10//I10").value_key is None
    current = Normalizer(load_preset("mimic_iv"))
    lab = current.normalize("LAB//RESULT//50912//mg/dL")
    assert lab.tokens == ("LAB//50912//mg/dL",) and lab.value_key == "LAB//50912//mg/dL"
    assert current.normalize("LAB//SPECIMEN_COLLECTED//50912//mg/dL").tokens == ()
    assert current.normalize("ED_REGISTRATION").tokens == ("ED_REGISTRATION",)
    generic = Normalizer(load_preset("generic"))
    assert generic.normalize("TRANSFER_TO//ED//Emergency Department").tokens == (
        "TRANSFER_TO//ED//Emergency Department",
    )


def test_extra_parts_join_the_last_part():
    preset = load_preset("mimic_iv_legacy")
    assert Normalizer(preset).normalize("HOSPITAL_DISCHARGE//A//B").tokens == (
        "HOSPITAL_DISCHARGE",
        "DISCHARGE_LOCATION//A//B",
    )


@pytest.mark.parametrize(
    "rules, message",
    [
        ([{"match": "(", "action": "keep"}], "invalid regex"),
        ([{"match": "^A", "action": "split"}], "names no parts"),
        ([{"match": "^A", "action": "map"}], "has no `to`"),
        ([{"match": "^A", "action": "explode"}], "not one of"),
        ([{"match": "^A", "action": "transform", "transform": "icd11"}], r"transform 'icd11' is not one of"),
        ([{"match": "^A", "value_range": [1]}], r"value_range must be \[low, high\]"),
    ],
)
def test_bad_presets_fail_naming_the_file_and_problem(tmp_path, rules, message):
    path = tmp_path / "bad.yaml"
    path.write_text(json.dumps({"name": "bad", "rules": rules}))
    with pytest.raises(ConfigError, match=message) as e:
        load_preset(path)
    assert str(path) in str(e.value)


def test_unknown_preset_name_lists_the_presets():
    with pytest.raises(ConfigError, match="mimic_iv_legacy"):
        load_preset("no-such-preset")


# ---------------------------------------------------------------------------------------------------
# vocabulary


def test_vocab_contract(tiny, tmp_path):
    vocab = fit(tiny, min_code_count=1).vocab
    assert vocab.pad_id == 0 and vocab.itos[vocab.pad_id] == "<PAD>"
    assert vocab.decode([vocab.encode("MEDS_DEATH")]) == ["MEDS_DEATH"]
    assert vocab.encode("never seen") == vocab.unk_id
    assert vocab.itos[vocab.timeline_end_id] == "TIMELINE_END"
    assert vocab.dtype == np.uint16
    assert vocab.ids_matching("^INTERVAL//").tolist() == vocab.interval_ids.tolist()
    assert len(vocab.ids_matching("^Q([1-9]|10)$")) == 10
    mask = vocab.generatable_mask()
    assert mask.dtype == bool and mask.shape == (len(vocab),)
    assert not mask[vocab.pad_id] and mask[vocab.timeline_end_id] and mask[vocab.encode("MEDS_DEATH")]
    static = [
        vocab.encode(t) for t in ("GENDER//F", "RACE//WHITE", "AGE_DECADE//5", "AGE_YEAR//0", "RACE//<UNK>")
    ]
    assert not mask[static].any()
    assert set(np.nonzero(~mask)[0]) == {vocab.pad_id, *np.nonzero(vocab.kinds == 3)[0]}
    (tmp_path / "v").mkdir()
    (tmp_path / "v" / "vocab.json").write_text(json.dumps(vocab.to_dict()))
    again = Vocab.load(tmp_path / "v")
    assert again.itos == vocab.itos and again.interval_mean_us == vocab.interval_mean_us


def test_interval_means_are_fitted_on_train_gaps(tiny):
    tok = fit(tiny, min_code_count=1)
    means = tok.vocab.interval_mean_us
    assert sorted(means) == tok.vocab.interval_ids.tolist()
    by_name = {tok.vocab.itos[i]: m for i, m in means.items()}
    assert by_name["INTERVAL//2h-3h"] == 120 * 60e6  # the one train gap in that bin: exactly 2 h
    # the one long train gap (a year and 10 minutes) is 2 six-month tokens: each stands for half of it
    assert by_name["INTERVAL//6mt"] == timedelta(days=365.25, minutes=10) / 2 / timedelta(microseconds=1)
    edges = [lo for _, lo in INTERVAL_BINS] + [LONG_GAP_US]
    for j, token in enumerate(INTERVAL_TOKENS[:-1]):  # fitted or midpoint: always inside the bin
        assert edges[j] <= by_name[token] < edges[j + 1]


# ---------------------------------------------------------------------------------------------------
# fitted on train only


def test_stats_come_from_train_only_in_a_mixed_shard(tmp_path):
    rows = tiny_rows()
    a = write_dataset(tmp_path / "a", rows, SPLITS)
    changed = [
        {**r, "numeric_value": 1e6, "code": r["code"].replace("50912", "77777")}
        if r["subject_id"] == 3
        else r
        for r in rows
    ]
    b = write_dataset(tmp_path / "b", changed, SPLITS)
    ta, tb = fit(a, min_code_count=1), fit(b, min_code_count=1)
    assert ta.stats == tb.stats and ta.vocab.itos == tb.vocab.itos
    assert "LAB//77777//mg/dL" not in tb.vocab.stoi


@pytest.mark.parametrize("preset", ["mimic_iv_legacy", "ethos"])
def test_stats_come_from_train_only_on_the_mimic_demo(preset, mimic_demo_root, tmp_path):
    """Rewrite the demo's held-out shard (new codes, scaled values, shifted times) and refit: every
    fitted statistic and the vocabulary stay byte-identical."""
    copy = tmp_path / "demo"
    shutil.copytree(mimic_demo_root, copy)
    held = copy / "data" / "held_out" / "0.parquet"
    df = pl.read_parquet(held)
    df = df.with_columns(
        pl.col("code").str.replace("^LAB//", "LAB//HELD_OUT_ONLY//"),
        pl.col("numeric_value") * 10 + 3,
        pl.col("time") + pl.duration(days=17, minutes=3),
    )
    pq.write_table(df.to_arrow().cast(pq.read_schema(held)), held)
    tokenize(mimic_demo_root, tmp_path / "a", preset=preset, progress=False)
    tokenize(copy, tmp_path / "b", preset=preset, progress=False)
    for name in ("vocab.json", "stats.json", "tokenizer.yaml"):
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes(), name
    vocab = Vocab.load(tmp_path / "b")
    assert not vocab.ids_matching("HELD_OUT_ONLY").size
    held_tokens = np.load(tmp_path / "b" / "held_out" / "shard-0" / "tokens.npy")
    if preset == "ethos":  # labs outside the train vocabulary are dropped, as ETHOS does
        assert not np.isin(held_tokens, vocab.ids_matching("^LAB//")).any()
    else:
        assert (held_tokens == vocab.unk_id).sum() >= df["code"].str.starts_with("LAB//HELD_OUT_ONLY//").sum()


def test_value_sampling_is_bounded_deterministic_and_close(tmp_path):
    rng = np.random.default_rng(0)
    rows = [ev(1, "GENDER//F")]
    values = rng.uniform(0, 100, 3000)
    rows += [ev(1, "LAB//1//u", T0 + i * MIN, float(v)) for i, v in enumerate(values)]
    root = write_dataset(tmp_path / "m", rows, {1: "train"})
    a = fit(root, max_values_per_code=300).stats["value_edges"]["LAB//1//u"]
    b = fit(root, max_values_per_code=300).stats["value_edges"]["LAB//1//u"]
    exact = fit(root, max_values_per_code=10_000).stats["value_edges"]["LAB//1//u"]
    assert a == b
    np.testing.assert_allclose(
        exact, np.quantile(values.astype(np.float32), np.arange(1, 10) / 10, method="nearest"), rtol=1e-6
    )
    np.testing.assert_allclose(a, exact, atol=8.0)  # a 300-value sample of U(0, 100)
    assert a != exact
