"""Frozen encoders: registry, missing-weights messages, tiny architectures, checkpoint round trips,
and what the weight-free baselines keep."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch

from mmehr.modalities import encoders as E
from mmehr.modalities.encoders import MissingWeightsError, check_payload, get_encoder, list_encoders
from mmehr.modalities.encoders.text import _minilm_dir

# Tiny sizes for every pretrained architecture; geometry (segments, patches, image size) stays real
# where it is cheap, so token counts are the real ones.
TINY = {
    "bert": dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64),
    "biomedbert": dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64),
    "minilm": dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64),
    "biomedclip": dict(dim=32, depth=2, heads=2),
    "vit-mae": dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64),
    "ecg-fm": dict(
        conv_feature_layers="[(16, 2, 2)] * 4",
        dim=32,
        depth=2,
        heads=2,
        ffn_dim=64,
        conv_pos=16,
        conv_pos_groups=4,
        layer_norm_first=False,
    ),
    "csfm": dict(dim=32, depth=2, heads=2, dim_head=16, mlp_dim=64, clean=False),
}
REAL_TOKENS = {"biomedclip": 197, "vit-mae": 197, "ecg-fm": 312, "csfm": 1201}


def payloads(modality: str) -> list:
    rng = np.random.default_rng(0)
    if modality == "ecg":  # 10 s at 500 Hz, 6 s at 250 Hz (one ECG-FM segment), 10 s at 1 kHz
        return [
            (rng.standard_normal((12, n)).astype(np.float32), fs)
            for n, fs in [(5000, 500.0), (1500, 250.0), (10000, 1000.0)]
        ]
    if modality == "cxr":
        return [rng.integers(0, 256, shape, dtype=np.uint8) for shape in [(300, 260), (90, 120), (224, 224)]]
    return ["Chest pain, troponin elevated.", "Sepsis with septic shock; started norepinephrine. " * 30, ""]


def tiny(name: str, **kw) -> E.FrozenEncoder:
    return (
        get_encoder(name, random_init=True, **TINY[name], **kw) if name in TINY else get_encoder(name, **kw)
    )


# --------------------------------------------------------------------------------------------------
# Registry and failures


def test_registry_names_every_encoder_by_modality():
    by_modality = {m: sorted(e.name for e in list_encoders() if e.modality == m) for m in E.MODALITIES}
    assert by_modality == {
        "ecg": ["csfm", "ecg-fm", "ecg-patch"],
        "cxr": ["biomedclip", "cxr-patch", "vit-mae"],
        "note": ["bert", "biomedbert", "minilm", "note-hash"],
    }
    assert {e.name for e in list_encoders() if not e.needs_weights} == {
        "minilm",
        "ecg-patch",
        "cxr-patch",
        "note-hash",
    }


def test_unknown_encoder_and_unknown_option_are_rejected():
    with pytest.raises(ValueError, match=r"unknown encoder 'resnet'.*ecg-fm"):
        get_encoder("resnet")
    with pytest.raises(ValueError, match=r"unknown option\(s\) \['depthh'\].*depth"):
        get_encoder("ecg-fm", random_init=True, depthh=2)
    with pytest.raises(ValueError, match="weight-free"):
        get_encoder("note-hash", weights="/some/file.pt")


@pytest.mark.parametrize(
    "name, expected",
    [
        ("bert", "bert-base-uncased"),
        ("biomedbert", "BiomedNLP-BiomedBERT-base-uncased-abstract-fulltext"),
        ("vit-mae", "vit-mae-base"),
        ("biomedclip", "open_clip_pytorch_model.bin"),
        ("ecg-fm", "mimic_iv_ecg_physionet_pretrained.pt"),
        ("csfm", "Cardiac-Sensing-FM"),
    ],
)
def test_missing_weights_fail_before_any_work_saying_what_to_supply(name, expected, tmp_path, monkeypatch):
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "empty-cache"))
    with pytest.raises(MissingWeightsError) as err:
        get_encoder(name)
    msg = str(err.value)
    assert expected in msg and "--weights" in msg and "never downloads" in msg
    with pytest.raises(MissingWeightsError, match=str(tmp_path / "nowhere")):
        get_encoder(name, weights=tmp_path / "nowhere")


def test_payloads_are_validated_with_a_reason():
    with pytest.raises(ValueError, match=r"\(12, n_samples\)"):
        check_payload("ecg", (np.zeros((8, 100), np.float32), 500.0))
    with pytest.raises(ValueError, match="sampling rate"):
        check_payload("ecg", (np.zeros((12, 100), np.float32), 0))
    with pytest.raises(ValueError, match="uint8 \\(H, W\\)"):
        check_payload("cxr", np.zeros((10, 10, 3), np.uint8))
    with pytest.raises(ValueError, match="note payload must be str"):
        check_payload("note", b"bytes")
    signal, _ = check_payload("ecg", (np.full((12, 100), np.nan, np.float32), 500))
    assert np.all(signal == 0)  # missing samples become 0, not NaN embeddings


# --------------------------------------------------------------------------------------------------
# Every architecture from a tiny random config: shapes, masks, determinism, frozen


@pytest.mark.parametrize("name", list(E.REGISTRY))
def test_tiny_architecture_shapes_masks_determinism_and_frozen(name):
    enc = tiny(name)
    batch = payloads(enc.modality)
    emb, mask = enc.encode(batch)
    B, N, d = emb.shape
    assert (B, d) == (len(batch), enc.d_enc) and mask.shape == (B, N) and enc.max_tokens >= N
    assert emb.dtype == torch.float32 and mask.dtype == torch.bool and torch.isfinite(emb).all()
    n = mask.sum(1)
    assert (n >= 1).all() and all(mask[i, : n[i]].all() for i in range(B))  # valid tokens first
    if name in REAL_TOKENS:
        assert enc.max_tokens == REAL_TOKENS[name]
    # frozen: eval mode, no parameter wants a gradient, outputs carry none
    assert not enc.model.training and not any(p.requires_grad for p in enc.model.parameters())
    assert not emb.requires_grad
    # deterministic, and an event's tokens do not depend on what else is in the batch
    emb2, mask2 = enc.encode(batch)
    assert torch.equal(emb, emb2) and torch.equal(mask, mask2)
    alone, mask_alone = enc.encode(batch[:1])
    k = int(mask_alone[0].sum())
    assert k == n[0]
    torch.testing.assert_close(alone[0, :k], emb[0, :k], atol=1e-4, rtol=1e-4)
    assert enc.preprocessing and enc.weights_checksum.count("sha256:") == 1


def test_ecg_fm_segments_follow_record_length():
    enc = tiny("ecg-fm")
    rng = np.random.default_rng(1)
    ten_s_250hz = (rng.standard_normal((12, 2500)).astype(np.float32), 250.0)
    five_s_500hz = (rng.standard_normal((12, 2500)).astype(np.float32), 500.0)
    _, mask = enc.encode([ten_s_250hz, five_s_500hz])
    assert mask.shape == (2, 312) and mask.sum(1).tolist() == [312, 156]  # 2 x 156 tokens per 5-s segment


def test_constant_leads_are_zero_after_per_lead_zscore():
    x = np.random.default_rng(0).standard_normal((12, 500)).astype(np.float32)
    x[3] = 7.0
    z = E.zscore_leads(x)
    assert (
        np.all(z[3] == 0) and np.allclose(z[0].mean(), 0, atol=1e-5) and np.allclose(z[0].std(), 1, atol=1e-4)
    )


# --------------------------------------------------------------------------------------------------
# Real-weight loading paths, on checkpoints the tests write themselves


def _save_tiny_bert(path):
    from transformers import AutoTokenizer, BertConfig, BertModel

    tok = AutoTokenizer.from_pretrained(_minilm_dir(), local_files_only=True)
    torch.manual_seed(3)
    model = BertModel(BertConfig(vocab_size=tok.vocab_size, **TINY["bert"]), add_pooling_layer=False).eval()
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return model, tok


@pytest.mark.parametrize("name", ["bert", "biomedbert"])
def test_bert_loads_a_saved_checkpoint_directory(name, tmp_path):
    model, tok = _save_tiny_bert(tmp_path / "ckpt")
    enc = get_encoder(name, weights=tmp_path / "ckpt")
    texts = ["no acute distress", "septic shock on pressors " * 200]
    emb, mask = enc.encode(texts)
    batch = tok(texts, padding=True, truncation=True, max_length=512, return_tensors="pt")
    with torch.no_grad():
        ref = model(**batch).last_hidden_state
    assert emb.shape == ref.shape and emb.shape[1] == 512  # truncated at 512
    assert torch.equal(mask, batch["attention_mask"].bool())
    torch.testing.assert_close(emb, ref)
    assert enc.weights_checksum == get_encoder(name, weights=tmp_path / "ckpt").weights_checksum
    assert enc.weights_checksum.startswith("sha256:")


def test_minilm_real_weights_place_similar_notes_together():
    enc = get_encoder("minilm")
    assert (enc.d_enc, enc.max_tokens) == (384, 256)
    emb, mask = enc.encode(
        [
            "The patient has pneumonia.",
            "Pneumonia was diagnosed in this patient.",
            "The stock market rose today.",
        ]
    )
    m = mask[..., None].float()
    pooled = torch.nn.functional.normalize((emb * m).sum(1) / m.sum(1), dim=-1)
    sim = pooled @ pooled.T
    assert sim[0, 1] > sim[0, 2] + 0.2


def test_vit_mae_keeps_every_patch_in_order(tmp_path):
    from transformers import ViTMAEConfig, ViTMAEModel

    cfg = ViTMAEConfig(
        image_size=32, patch_size=8, mask_ratio=0.75, **TINY["vit-mae"]
    )  # saved WITH masking on
    torch.manual_seed(0)
    ViTMAEModel(cfg).save_pretrained(tmp_path / "mae")
    (tmp_path / "mae" / "preprocessor_config.json").write_text(
        '{"image_mean": [0.5, 0.5, 0.5], "image_std": [0.25, 0.25, 0.25], "size": {"height": 32, "width": 32}}'
    )
    enc = get_encoder("vit-mae", weights=tmp_path / "mae")
    assert enc.preprocessing["mean"] == [0.5, 0.5, 0.5] and enc.max_tokens == 17
    images = payloads("cxr")[:2]
    emb, mask = enc.encode(images)
    assert emb.shape == (2, 17, 32) and mask.all()
    # the reference: the same model run with no masking step at all, patches in raster order
    mae = enc.model.model
    pixels = enc.prepare(images)["pixels"]
    with torch.no_grad():
        pos = mae.embeddings.position_embeddings
        x = mae.embeddings.patch_embeddings(pixels) + pos[:, 1:]
        x = torch.cat([(mae.embeddings.cls_token + pos[:, :1]).expand(2, -1, -1), x], dim=1)
        if hasattr(mae, "encoder"):  # transformers 4
            x = mae.encoder(x).last_hidden_state
        else:  # transformers 5
            for layer in mae.layers:
                x = layer(x, None)
        ref = mae.layernorm(x)
        shuffled = mae(pixel_values=pixels).last_hidden_state  # transformers' default: random order
    torch.testing.assert_close(emb, ref)
    assert shuffled.shape == ref.shape and not torch.allclose(shuffled, ref, atol=1e-3)


def test_vit_mae_is_found_in_the_hf_cache(tmp_path, monkeypatch):
    import huggingface_hub.constants
    from transformers import ViTMAEConfig, ViTMAEModel

    snapshot = tmp_path / "hub" / "models--facebook--vit-mae-base" / "snapshots" / "abc123"
    ViTMAEModel(ViTMAEConfig(image_size=32, patch_size=8, **TINY["vit-mae"])).save_pretrained(snapshot)
    (snapshot / "preprocessor_config.json").write_text('{"size": 32, "resample": 3}')
    (snapshot.parents[1] / "refs").mkdir()
    (snapshot.parents[1] / "refs" / "main").write_text("abc123")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    assert get_encoder("vit-mae").d_enc == 32


def test_vit_uses_timm_parameter_names():
    model = E.ViT(E.ViTConfig(image_size=32, patch_size=8, dim=16, depth=1, heads=2))
    block = [
        f"blocks.0.{m}.{p}"
        for m in ("norm1", "attn.qkv", "attn.proj", "norm2", "mlp.fc1", "mlp.fc2")
        for p in ("weight", "bias")
    ]
    assert set(model.state_dict()) == {
        "cls_token", "pos_embed", "patch_embed.proj.weight", "patch_embed.proj.bias", "norm.weight", "norm.bias", *block
    }  # fmt: skip


@pytest.mark.parametrize("as_dir", [False, True])
def test_biomedclip_loads_the_vision_trunk_of_an_open_clip_checkpoint(as_dir, tmp_path):
    cfg = E.ViTConfig(**TINY["biomedclip"])
    torch.manual_seed(5)
    source = E.ViT(cfg).eval()
    state = {f"visual.trunk.{k}": v for k, v in source.state_dict().items()}
    state |= {"visual.head.proj.weight": torch.randn(8, 32), "text.transformer.embeddings.word_embeddings.weight": torch.randn(10, 8),
              "logit_scale": torch.tensor(4.6)}  # fmt: skip
    torch.save(state, tmp_path / "open_clip_pytorch_model.bin")
    # sizes are read off the checkpoint; only the head count (not in any shape) is given
    enc = get_encoder(
        "biomedclip", weights=tmp_path if as_dir else tmp_path / "open_clip_pytorch_model.bin", heads=2
    )
    images = payloads("cxr")
    emb, _ = enc.encode(images)
    with torch.no_grad():
        ref = source.forward_features(enc.prepare(images)["pixels"])
    assert emb.shape == (3, 197, 32)
    torch.testing.assert_close(emb, ref)


@dataclasses.dataclass
class FairseqLikeCfg:  # stands for the omegaconf config that fairseq pickles into its checkpoints
    normalize: bool = False
    layers: tuple = ((256, 2, 2),) * 4


@pytest.mark.parametrize(
    "form", ["weight_g/weight_v", "parametrizations", "finetuned-prefix", "layer_norm-extractor"]
)
def test_ecg_fm_loads_a_fairseq_signals_checkpoint(form, tmp_path):
    extractor = dict(extractor_mode="layer_norm", conv_bias=True) if form == "layer_norm-extractor" else {}
    cfg = E.ECGFMConfig(**TINY["ecg-fm"], **extractor)
    torch.manual_seed(7)
    source = E.ECGFM(cfg).eval()
    # the positional conv as fairseq holds it: weight-normed over dim 2, made by PyTorch itself
    conv = torch.nn.Conv1d(
        cfg.dim, cfg.dim, cfg.conv_pos, padding=cfg.conv_pos // 2, groups=cfg.conv_pos_groups
    )
    conv = torch.nn.utils.parametrizations.weight_norm(conv, name="weight", dim=2)
    with torch.no_grad():
        conv.parametrizations.weight.original1.normal_()
        conv.parametrizations.weight.original0.uniform_(0.5, 2.0)
        source.encoder.pos_conv.weight.copy_(conv.weight)
        source.encoder.pos_conv.bias.copy_(conv.bias)
    g, v = conv.parametrizations.weight.original0.detach(), conv.parametrizations.weight.original1.detach()
    model = {k: v for k, v in source.state_dict().items() if not k.startswith("encoder.pos_conv")}
    if form == "parametrizations":
        model |= {"conv_pos.pos_conv.0.parametrizations.weight.original0": g,
                  "conv_pos.pos_conv.0.parametrizations.weight.original1": v, "conv_pos.pos_conv.0.bias": conv.bias.detach()}  # fmt: skip
    else:
        model |= {
            "encoder.pos_conv.0.weight_g": g,
            "encoder.pos_conv.0.weight_v": v,
            "encoder.pos_conv.0.bias": conv.bias.detach(),
        }
    model |= {
        "mask_emb": torch.rand(cfg.dim),
        "quantizer.vars": torch.rand(1, 640, 128),
        "final_proj.weight": torch.rand(8, cfg.dim),
    }
    if form == "finetuned-prefix":
        model = {f"w2v_encoder.w2v_model.{k}": v for k, v in model.items()} | {
            "proj.weight": torch.rand(2, cfg.dim)
        }
    torch.save(
        {"model": model, "cfg": FairseqLikeCfg(), "optimizer_history": [{"lr": 1e-4}]}, tmp_path / "ecg.pt"
    )

    # no cfg["model"] in this checkpoint: heads, LayerNorm placement and conv strides are given, the rest
    # read off the tensors
    given = {k: TINY["ecg-fm"][k] for k in ("heads", "layer_norm_first", "conv_feature_layers")}
    enc = get_encoder("ecg-fm", weights=tmp_path / "ecg.pt", **given)
    batch = payloads("ecg")
    emb, mask = enc.encode(batch)
    with torch.no_grad():
        ref, ref_mask = source(**enc.prepare(batch))
    torch.testing.assert_close(emb, ref)
    assert torch.equal(mask, ref_mask) and emb.shape[1] == 312


def test_checkpoint_that_does_not_fit_the_architecture_is_refused_clearly(tmp_path):
    state = E.ECGFM(E.ECGFMConfig(**TINY["ecg-fm"])).state_dict()
    torch.save({"model": {k: v for k, v in state.items() if "layers.1." not in k}}, tmp_path / "partial.pt")
    with pytest.raises(ValueError, match=r"partial.pt: checkpoint lacks .*encoder.layers.1"):
        get_encoder("ecg-fm", weights=tmp_path / "partial.pt", **TINY["ecg-fm"])
    torch.save({"model": state}, tmp_path / "tiny.pt")
    with pytest.raises(ValueError, match=r"tiny.pt: parameter .* has shape .* pass the checkpoint's sizes"):
        get_encoder("ecg-fm", weights=tmp_path / "tiny.pt", **{**TINY["ecg-fm"], "ffn_dim": 128})
    (tmp_path / "junk.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match=r"junk\.pt"):
        get_encoder("ecg-fm", weights=tmp_path / "junk.pt", **TINY["ecg-fm"])


def test_csfm_loads_the_authors_parameter_names(tmp_path):
    cfg = E.CSFMConfig(**TINY["csfm"])
    torch.manual_seed(11)
    source = E.CSFM(cfg).eval()
    names = set(source.state_dict())
    assert {"cls_token", "ts_channel_type_embedding", "ts_pos_embedding", "ts_to_patch_embedding.2.weight",
            "transformer.layers.0.0.to_qkv.weight", "transformer.layers.0.0.to_out.0.bias",
            "transformer.layers.1.1.net.4.weight", "transformer.norm.weight"} <= names  # fmt: skip
    extra = {"text_to_embedding.0.weight": torch.rand(30, cfg.dim), "mlp_head.weight": torch.rand(1, cfg.dim)}
    torch.save(
        {"state_dict": {f"module.{k}": v for k, v in (source.state_dict() | extra).items()}},
        tmp_path / "csfm.pth",
    )
    enc = get_encoder(
        "csfm", weights=tmp_path / "csfm.pth", heads=2, clean=False
    )  # sizes from the checkpoint
    batch = payloads("ecg")
    emb, _ = enc.encode(batch)
    with torch.no_grad():
        ref, _ = source(**enc.prepare(batch))
    assert emb.shape == (3, 1201, cfg.dim)
    torch.testing.assert_close(emb, ref)


# --------------------------------------------------------------------------------------------------
# What the weight-free baselines keep


@pytest.fixture(scope="module")
def simulated_ecgs():
    import neurokit2 as nk

    def sim(hr, hr_std, seed):
        x = nk.ecg_simulate(
            duration=10,
            sampling_rate=500,
            method="multileads",
            heart_rate=hr,
            heart_rate_std=hr_std,
            random_state=seed,
        )
        return x.to_numpy().T.astype(np.float32), 500.0

    return {"60": sim(60, 1, 0), "120": sim(120, 1, 1), "irregular": sim(80, 20, 2)}


def test_ecg_patch_keeps_rate_irregularity_and_amplitude(simulated_ecgs):
    enc = get_encoder("ecg-patch")
    s60, s120, irr = simulated_ecgs["60"], simulated_ecgs["120"], simulated_ecgs["irregular"]
    emb, mask = enc.encode([s60, s120, irr, (s60[0] * 3, 500.0)])
    assert emb.shape == (4, 10, 128) and mask.all()
    stats = emb[:, 0, -E.N_ECG_STATS :].numpy()  # heart rate/100, rr cv, successive diff, log amplitude, ...
    assert abs(stats[0, 0] * 100 - 60) < 6 and abs(stats[1, 0] * 100 - 120) < 12
    assert stats[2, 1] > 3 * max(stats[0, 1], stats[1, 1])  # irregular rhythm
    assert stats[3, 3] > stats[0, 3] + 0.5  # three times the voltage
    torch.testing.assert_close(
        emb[3, :, : -E.N_ECG_STATS], emb[0, :, : -E.N_ECG_STATS], atol=1e-4, rtol=1e-4
    )  # shape, not scale


def test_ecg_patch_masks_patches_after_a_short_record():
    short = (np.random.default_rng(0).standard_normal((12, 1250)).astype(np.float32), 500.0)  # 2.5 s
    _, mask = get_encoder("ecg-patch").encode([short])
    assert mask[0].tolist() == [True] * 3 + [False] * 7


def test_cxr_patch_shows_a_large_bright_region_where_it_is():
    rng = np.random.default_rng(0)
    img = rng.integers(40, 90, (800, 640), dtype=np.uint8)
    img[:400, :320] = 230  # bright top-left quadrant (an opacity)
    enc = get_encoder("cxr-patch")
    emb, mask = enc.encode([img, img[::2, ::2].copy()])
    assert emb.shape == (2, 64, 128) and mask.all()
    mean = emb[0, :, 128 - E.N_CXR_STATS].view(8, 8)  # patch brightness on the 8 x 8 grid
    assert mean[:4, :4].min() > mean[4:, 4:].max() + 0.5
    torch.testing.assert_close(
        emb[0, :, -E.N_CXR_STATS :], emb[1, :, -E.N_CXR_STATS :], atol=0.02, rtol=0
    )  # size-invariant


def test_note_hash_keeps_word_identity():
    enc = get_encoder("note-hash")
    emb, mask = enc.encode(["Sepsis and SHOCK", "shock", "x " * 1000])
    assert mask.sum(1).tolist() == [4, 2, 257]  # document token + words, capped at 256 words
    assert torch.equal(emb[0, 3], emb[1, 1])  # the same word, any case, same vector
    cos = torch.nn.functional.cosine_similarity(emb[0, 1], emb[0, 3], dim=0)
    assert abs(cos) < 0.4
    assert torch.equal(emb[0, 0], emb[1, 0])  # document token


@pytest.mark.parametrize("name", ["ecg-patch", "cxr-patch", "note-hash"])
def test_weight_free_encoders_are_identical_across_builds(name):
    a, b = get_encoder(name), get_encoder(name)
    assert a.weights_checksum == b.weights_checksum
    assert get_encoder(name, seed=1).weights_checksum != a.weights_checksum
    batch = payloads(a.modality)
    torch.testing.assert_close(a.encode(batch)[0], b.encode(batch)[0], atol=0, rtol=0)
