"""The pretrained encoders give the features their authors' code gives, or fail clearly.

Against fixtures made by the upstream code itself (tests/fixtures/encoders/README.md): ECG-FM (pre-LN and
post-LN fairseq-signals checkpoints), CSFM (the authors' model and preprocessing) and a BiomedCLIP-style
open_clip model; ViT-MAE's preprocessing against transformers' own image processor. Every loader is strict:
a tensor removed from, or added to, any checkpoint fails loading with its name.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import polars as pl
import pytest
import torch

from mmehr.io import read_manifest, write_json
from mmehr.modalities.encode import encode_events
from mmehr.modalities.encoders import get_encoder
from mmehr.modalities.encoders.preprocess import (
    resample_fft,
    resample_linear,
    standardize_leads,
    vit_processor_image,
)
from mmehr.modalities.encoders.text import _minilm_dir

FIX = Path(__file__).parent / "fixtures" / "encoders"
CLIP_HEADS = 4  # not readable from the tensors; the fixture's timm ViT has 4 (the real BiomedCLIP: 12)


def npz(name: str) -> dict[str, np.ndarray]:
    with np.load(FIX / name) as f:
        return dict(f)


def assert_close(actual, expected, atol: float) -> None:
    a, e = np.asarray(actual, dtype=np.float64), np.asarray(expected, dtype=np.float64)
    assert a.shape == e.shape, (a.shape, e.shape)
    diff = float(np.abs(a - e).max())
    assert diff <= atol, f"max abs difference {diff:.3g} > {atol:g}"


# --------------------------------------------------------------------------------------------------
# ECG-FM: architecture from the checkpoint's cfg, both LayerNorm placements


@pytest.mark.parametrize("variant, heads, pre_ln", [("postln", 4, False), ("preln", 8, True)])
def test_ecg_fm_reads_its_architecture_from_cfg_and_matches_fairseq_signals(variant, heads, pre_ln):
    ref = npz("ecgfm_tiny.npz")
    cfg_model = json.loads((FIX / f"ecgfm_tiny_{variant}.cfg.json").read_text())["checkpoint_cfg_model"]
    assert (cfg_model["encoder_attention_heads"], cfg_model["layer_norm_first"]) == (heads, pre_ln)
    enc = get_encoder("ecg-fm", weights=FIX / f"ecgfm_tiny_{variant}.pt")  # no overrides at all
    arch = enc.preprocessing["architecture"]
    assert (arch["heads"], arch["layer_norm_first"]) == (heads, pre_ln)
    assert enc.preprocessing["architecture_from"] == "the checkpoint's cfg['model']"
    source = torch.from_numpy(ref["source"])
    model = enc.model
    with torch.no_grad():
        front = model.post_extract_proj(model.layer_norm(model.feature_extractor(source).transpose(1, 2)))
        tokens = model.encode_segments(source)
    assert_close(front, ref[f"{variant}_post_extract_proj"], 1e-5)
    assert_close(tokens, ref[f"{variant}_x"], 1e-5)
    emb, mask = enc.encode([(ref["source"][0], 500.0)])  # one 5-s segment: re-standardising is idempotent
    assert mask[0].sum() == 156
    assert_close(emb[0, :156], ref[f"{variant}_x"][0], 1e-5)


def test_the_two_ecg_fm_checkpoints_differ_only_in_cfg_and_their_features_differ():
    post, pre = (get_encoder("ecg-fm", weights=FIX / f"ecgfm_tiny_{v}.pt") for v in ("postln", "preln"))
    assert set(post.model.state_dict()) == set(pre.model.state_dict())
    x = npz("ecgfm_tiny.npz")["source"][0]
    a, b = post.encode([(x, 500.0)])[0], pre.encode([(x, 500.0)])[0]
    assert torch.nn.functional.cosine_similarity(a[0, :156], b[0, :156], dim=-1).mean() < 0.9


def _without_cfg(src: Path, dst: Path, drop: str | None = None, add: dict | None = None) -> Path:
    obj = torch.load(src, map_location="cpu", weights_only=True)
    model = {k: v for k, v in obj["model"].items() if k != drop} | (add or {})
    torch.save({"model": model}, dst)
    return dst


def test_ecg_fm_without_cfg_says_which_values_to_pass_and_loads_with_them(tmp_path):
    bare = _without_cfg(FIX / "ecgfm_tiny_preln.pt", tmp_path / "bare.pt")
    with pytest.raises(ValueError) as err:
        get_encoder("ecg-fm", weights=bare)
    msg = str(err.value)
    assert "bare.pt" in msg and "layer_norm_first" in msg and "encoder_attention_heads" in msg
    assert "heads=" in msg and "--set" in msg
    enc = get_encoder(
        "ecg-fm", weights=bare, layer_norm_first=True, heads=8, conv_feature_layers="[(32, 2, 2)] * 4"
    )
    ref = npz("ecgfm_tiny.npz")
    with torch.no_grad():
        assert_close(enc.model.encode_segments(torch.from_numpy(ref["source"])), ref["preln_x"], 1e-5)


def test_ecg_fm_option_that_contradicts_the_cfg_is_refused():
    with pytest.raises(ValueError, match=r"heads=12 but the checkpoint says 4"):
        get_encoder("ecg-fm", weights=FIX / "ecgfm_tiny_postln.pt", heads=12)


def test_ecg_fm_legacy_weight_norm_names_load_identically(tmp_path):
    obj = torch.load(FIX / "ecgfm_tiny_postln.pt", map_location="cpu", weights_only=True)
    rename = {
        "parametrizations.weight.original0": "weight_g",
        "parametrizations.weight.original1": "weight_v",
    }
    legacy = {}
    for k, v in obj["model"].items():
        for new, old in rename.items():
            k = k.replace(new, old)
        legacy[k] = v
    torch.save({"cfg": obj["cfg"], "model": legacy}, tmp_path / "legacy.pt")
    a = get_encoder("ecg-fm", weights=FIX / "ecgfm_tiny_postln.pt").model.state_dict()
    b = get_encoder("ecg-fm", weights=tmp_path / "legacy.pt").model.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_ecg_fm_preprocessing_is_fairseq_signals():
    r = npz("ecg_resample.npz")
    assert_close(resample_linear(r["x250"], 250, 500), r["fairseq_resample_500"], 1e-5)
    enc = get_encoder("ecg-fm", weights=FIX / "ecgfm_tiny_postln.pt")
    segments = enc.prepare([(r["x250"], 250.0)])  # 10 s at 250 Hz -> 5,000 samples at 500 Hz -> 2 segments
    expected = standardize_leads(r["fairseq_resample_500"].astype(np.float64))  # whole record, then cut
    assert segments["segment_mask"].tolist() == [[True, True]]
    assert_close(segments["segments"][0, 0], expected[:, :2500], 1e-5)
    assert_close(segments["segments"][0, 1], expected[:, 2500:], 1e-5)
    assert "linear interpolation" in enc.preprocessing["resample"]


def test_ecg_fm_standardisation_zeroes_only_exactly_constant_leads():
    x = np.random.default_rng(0).standard_normal((12, 3000))
    x[2] = 0.7  # constant: 0, as fairseq-signals' constant_lead_strategy "zero"
    x[3] = 1e-9 * np.arange(3000)  # tiny but not constant: scaled to unit std, not zeroed
    z = standardize_leads(x)
    assert np.all(z[2] == 0) and z[3].std() == pytest.approx(1.0) and z[0].std() == pytest.approx(1.0)


def test_ecg_fm_record_shorter_than_a_segment_is_skipped_with_the_reason(tmp_path):
    enc = get_encoder("ecg-fm", weights=FIX / "ecgfm_tiny_postln.pt")
    rng = np.random.default_rng(0)
    short = (rng.standard_normal((12, 1200)).astype(np.float32), 250.0)  # 4.8 s
    with pytest.raises(ValueError, match=r"2400 samples at 500 Hz, shorter than one 2500-sample segment"):
        enc.encode([short])
    events = tmp_path / "events"
    events.mkdir()
    signals = {"long": rng.standard_normal((12, 5000)).astype(np.float32), "short": short[0]}
    pl.DataFrame([{"subject_id": 1, "time": t, "modality": "ecg", "event_id": k, "payload": k}
                  for t, k in enumerate(signals)]).write_parquet(events / "events.parquet")  # fmt: skip
    write_json(events / "manifest.json", {"source": "test"})
    fs = {"long": 500.0, "short": 250.0}
    manifest = encode_events(
        events, enc, tmp_path / "store", load_payload=lambda _, row: (signals[row["event_id"]], fs[row["event_id"]]),
        progress=False, workers=0,
    )  # fmt: skip
    skipped = pl.read_parquet(tmp_path / "store" / "skipped.parquet")
    assert manifest["counts"]["events"] == 1 and skipped["event_id"].to_list() == ["short"]
    assert "shorter than one 2500-sample segment" in skipped["skip_reason"][0]
    # the store's manifest records the preprocessing, so a store made otherwise is told apart later
    assert read_manifest(tmp_path / "store")["preprocessing"] == enc.preprocessing


# --------------------------------------------------------------------------------------------------
# CSFM and BiomedCLIP


def test_csfm_tokens_and_preprocessing_match_the_authors_code():
    ref, r = npz("csfm_tiny.npz"), npz("ecg_resample.npz")
    enc = get_encoder("csfm", weights=FIX / "csfm_tiny.pth")  # sizes from the tensors, heads = inner / 64
    with torch.no_grad():
        tokens, _ = enc.model(torch.from_numpy(ref["source"]))
    assert_close(tokens, ref["tokens"], 1e-5)
    assert_close(enc.prepare([(r["x250"], 250.0)])["signal"], ref["source"], 1e-5)  # neurokit2 clean on
    assert_close(enc.encode([(r["x250"], 250.0)])[0], ref["tokens"], 1e-4)
    assert_close(resample_fft(r["x250"], 250, 500), r["csfm_resample_500"], 1e-5)  # its FFT resampler


def test_biomedclip_tokens_and_open_clip_transform_match():
    ref, img = npz("biomedclip_tiny.npz"), np.load(FIX / "biomedclip_image.npy")
    enc = get_encoder("biomedclip", weights=FIX / "open_clip_pytorch_model.bin", heads=CLIP_HEADS)
    with torch.no_grad():
        tokens, _ = enc.model(torch.from_numpy(ref["pixels"]))
    assert_close(tokens, ref["tokens"], 1e-5)
    assert_close(
        enc.prepare([img])["pixels"], ref["pixels"], 1e-5
    )  # resize 258 x 224 (truncated), crop top 17
    assert_close(enc.encode([img])[0], ref["tokens"], 1e-4)


@pytest.mark.parametrize("shape", [(300, 260), (260, 300), (301, 301), (97, 333), (224, 500)])
def test_open_clip_resize_and_crop_arithmetic(shape):
    """torchvision's Resize(224) truncates the long side; CenterCrop rounds the offset with Python's round."""
    from mmehr.modalities.encoders.preprocess import open_clip_image

    img = np.random.default_rng(1).integers(0, 256, shape, dtype=np.uint8)
    h, w = shape
    short, long = min(h, w), max(h, w)
    new = (224, int(224 * long / short)) if h <= w else (int(224 * long / short), 224)
    from PIL import Image

    resized = np.asarray(Image.fromarray(img).resize((new[1], new[0]), Image.Resampling.BICUBIC))
    top, left = round((new[0] - 224) / 2), round((new[1] - 224) / 2)
    expected = resized[top : top + 224, left : left + 224] / 255.0
    out = open_clip_image(img, size=224, mean=(0.0,) * 3, std=(1.0,) * 3)
    assert out.shape == (3, 224, 224)
    assert_close(out[1], expected, 1e-6)


# --------------------------------------------------------------------------------------------------
# ViT-MAE preprocessing: transformers' ViTImageProcessor, filter from preprocessor_config.json


@pytest.mark.parametrize("resample", [2, 3])
def test_vit_mae_preprocessing_is_transformers_image_processor_with_its_filter(resample, tmp_path):
    from PIL import Image
    from transformers import ViTMAEConfig, ViTMAEModel

    try:
        from transformers import ViTImageProcessorPil as Processor  # transformers 5 without torchvision
    except ImportError:
        from transformers import ViTImageProcessor as Processor
    config = {"size": {"height": 32, "width": 32}, "resample": resample, "image_mean": [0.5, 0.4, 0.3],
              "image_std": [0.2, 0.25, 0.3], "do_normalize": True, "do_rescale": True, "do_resize": True}  # fmt: skip
    torch.manual_seed(0)
    cfg = ViTMAEConfig(image_size=32, patch_size=8, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                       intermediate_size=32)  # fmt: skip
    ViTMAEModel(cfg).save_pretrained(tmp_path / "mae")
    (tmp_path / "mae" / "preprocessor_config.json").write_text(json.dumps(config))
    enc = get_encoder("vit-mae", weights=tmp_path / "mae")
    images = [np.random.default_rng(s).integers(0, 256, shape, dtype=np.uint8) for s, shape in [(0, (90, 120)), (1, (300, 260))]]  # fmt: skip
    processor = Processor(**config)
    expected = processor([Image.fromarray(im).convert("RGB") for im in images], return_tensors="np")[
        "pixel_values"
    ]
    assert_close(enc.prepare(images)["pixels"], expected, 1e-6)
    other = vit_processor_image(images[1], height=32, width=32, resample=5 - resample, mean=config["image_mean"],
                                std=config["image_std"])  # fmt: skip
    assert float(np.abs(other.numpy() - expected[1]).max()) > 1e-2  # the filter matters
    assert enc.preprocessing["resize"].endswith({2: "bilinear", 3: "bicubic"}[resample])


def test_vit_mae_directory_without_its_preprocessor_config_is_refused(tmp_path):
    from transformers import ViTMAEConfig, ViTMAEModel

    ViTMAEModel(ViTMAEConfig(image_size=32, patch_size=8, hidden_size=16, num_hidden_layers=1,
                             num_attention_heads=2, intermediate_size=32)).save_pretrained(tmp_path)  # fmt: skip
    with pytest.raises(ValueError, match=r"preprocessor_config.json is missing"):
        get_encoder("vit-mae", weights=tmp_path)


# --------------------------------------------------------------------------------------------------
# Strict loading: a removed or an unknown tensor fails, naming it


def _torch_fixture(name: str, tmp_path: Path, drop: str | None = None, add: dict | None = None) -> Path:
    obj = torch.load(FIX / name, map_location="cpu", weights_only=True)
    if "model" in obj:  # fairseq: the tensors under "model", the cfg beside them
        obj["model"] = {k: v for k, v in obj["model"].items() if k != drop} | (add or {})
    else:
        obj = {k: v for k, v in obj.items() if k != drop} | (add or {})
    torch.save(obj, tmp_path / name)
    return tmp_path / name


TORCH_CASES = {  # encoder: (fixture, a tensor to remove and the name it has in the error, options)
    "ecg-fm": ("ecgfm_tiny_preln.pt", "encoder.layers.1.fc2.bias", "encoder.layers.1.fc2.bias", {}),
    "csfm": ("csfm_tiny.pth", "encoder.transformer.layers.0.0.to_qkv.weight", "transformer.layers.0.0.to_qkv.weight", {}),
    "biomedclip": ("open_clip_pytorch_model.bin", "visual.trunk.blocks.1.norm2.weight", "blocks.1.norm2.weight",
                   {"heads": CLIP_HEADS}),
}  # fmt: skip


@pytest.mark.parametrize("name", list(TORCH_CASES))
def test_a_tensor_removed_from_a_torch_checkpoint_fails_with_its_name(name, tmp_path):
    fixture, key, shown, options = TORCH_CASES[name]
    path = _torch_fixture(fixture, tmp_path, drop=key)
    with pytest.raises(
        ValueError, match=rf"{re.escape(fixture)}: checkpoint lacks 1 tensor\(s\).*: {re.escape(shown)}$"
    ):
        get_encoder(name, weights=path, **options)


@pytest.mark.parametrize("name", list(TORCH_CASES))
def test_an_unknown_tensor_in_a_torch_checkpoint_fails_with_its_name(name, tmp_path):
    fixture, key, _, options = TORCH_CASES[name]
    extra = key.rsplit(".", 2)[0] + ".adapter.weight"
    path = _torch_fixture(fixture, tmp_path, add={extra: torch.zeros(3)})
    with pytest.raises(ValueError, match=r"1 tensor\(s\) this architecture does not use: \S*adapter\.weight"):
        get_encoder(name, weights=path, **options)


def _tiny_transformers_dir(kind: str, path: Path) -> Path:
    from transformers import AutoTokenizer, BertConfig, BertForMaskedLM, ViTMAEConfig, ViTMAEForPreTraining

    torch.manual_seed(0)
    if kind == "vit-mae":  # saved as facebook/vit-mae-base is: with its pixel decoder (dropped on purpose)
        cfg = ViTMAEConfig(image_size=32, patch_size=8, hidden_size=16, num_hidden_layers=2, num_attention_heads=2,
                           intermediate_size=32, decoder_hidden_size=8, decoder_num_hidden_layers=1,
                           decoder_num_attention_heads=2, decoder_intermediate_size=16)  # fmt: skip
        ViTMAEForPreTraining(cfg).save_pretrained(path)
        (path / "preprocessor_config.json").write_text('{"size": 32, "resample": 3}')
    else:  # a BERT with its masked-LM head, as bert-base-uncased and BiomedBERT are saved
        tok = AutoTokenizer.from_pretrained(_minilm_dir(), local_files_only=True)
        cfg = BertConfig(vocab_size=tok.vocab_size, hidden_size=16, num_hidden_layers=2, num_attention_heads=2,
                         intermediate_size=32)  # fmt: skip
        BertForMaskedLM(cfg).save_pretrained(path)
        tok.save_pretrained(path)
    return path


@pytest.mark.parametrize("name", ["vit-mae", "bert", "biomedbert", "minilm"])
def test_transformers_checkpoints_load_strictly(name, tmp_path):
    from safetensors.torch import load_file, save_file

    path = _tiny_transformers_dir(name, tmp_path / "ok")
    get_encoder(name, weights=path)  # the heads left out on purpose (decoder, cls) do not fail
    file = path / "model.safetensors"
    tensors = load_file(str(file))
    layer1 = sorted(
        k for k in tensors if re.search(r"layer\.1\..*output\.dense\.bias$", k) and "decoder" not in k
    )
    assert layer1, sorted(tensors)[:10]
    save_file({k: v for k, v in tensors.items() if k != layer1[0]}, str(file), metadata={"format": "pt"})
    with pytest.raises(
        ValueError, match=r"checkpoint lacks 1 tensor\(s\) of this architecture: \S*\.1\.\S*bias$"
    ):
        get_encoder(name, weights=path)
    save_file(tensors | {"encoder.adapter.weight": torch.zeros(2)}, str(file), metadata={"format": "pt"})
    with pytest.raises(ValueError, match=r"does not use: \S*adapter\.weight"):
        get_encoder(name, weights=path)


def test_encode_options_are_parsed_as_yaml_values():
    from mmehr.modalities.encode import parse_options

    assert parse_options(
        ["heads=12", "layer_norm_first=true", 'conv_feature_layers="[(256, 2, 2)] * 4"']
    ) == {
        "heads": 12,
        "layer_norm_first": True,
        "conv_feature_layers": "[(256, 2, 2)] * 4",
    }
    with pytest.raises(ValueError, match="KEY=VALUE"):
        parse_options(["heads"])


def test_a_store_made_with_other_preprocessing_is_told_apart(tmp_path):
    rng = np.random.default_rng(0)
    events = tmp_path / "events"
    events.mkdir()
    pl.DataFrame(
        [{"subject_id": 1, "time": 0, "modality": "ecg", "event_id": "e", "payload": "e"}]
    ).write_parquet(events / "events.parquet")
    write_json(events / "manifest.json", {"source": "test"})
    signal = (rng.standard_normal((12, 2500)).astype(np.float32), 250.0)
    tiny = dict(dim=16, depth=1, heads=1, dim_head=16, mlp_dim=32)
    kw = dict(load_payload=lambda *_: signal, progress=False, workers=0)
    raw = get_encoder("csfm", random_init=True, clean=False, **tiny)
    encode_events(events, raw, tmp_path / "store", **kw)
    cleaned = get_encoder("csfm", random_init=True, clean=True, **tiny)
    assert cleaned.weights_checksum == raw.weights_checksum  # same weights, other preprocessing
    with pytest.raises(ValueError, match=r"other settings \(differs in \['preprocessing'\]\)"):
        encode_events(events, cleaned, tmp_path / "store", **kw)
