"""The multimodal model: strict temporal masks, gates, zero updates, cached generation, shapes, cost."""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

from mmehr.batch import ModalityInputs
from mmehr.model import fusion
from mmehr.model.accounting import forward_flops, parameter_counts, train_flops_per_token
from mmehr.model.config import FusionConfig, ModalityConfig, ModelConfig
from mmehr.model.fusion import GatedCrossAttentionBlock, MaskedCrossAttention
from mmehr.model.gpt import GPT

V, D = 40, 16
HOUR = 3_600_000_000
T0 = 1_600_000_000_000_000  # µs since epoch
MODES = ["none", "mean", "latent"]
GATES = ["sigmoid", "tanh"]


def config(compression: str = "latent", gate: str = "sigmoid", n_layer: int = 2, **fusion_kw) -> ModelConfig:
    # Latents at the embedding scale: at Flamingo's std 1 (the default) this 16-wide model's output moves
    # only ~1e-5 with a media event at init, too close to float noise for the leak checks below.
    modality = ModalityConfig(
        d_enc=12, compression=compression, n_latents=3, n_latent_layers=2, latent_init_std=0.02
    )
    fusion_cfg = FusionConfig(
        **{"modalities": {"note": modality}, "gate": gate, "xattn_every": 1, **fusion_kw}
    )
    return ModelConfig(vocab_size=V, n_layer=n_layer, n_head=2, n_embd=D, block_size=48, fusion=fusion_cfg)


def model(compression: str = "latent", gate: str = "sigmoid", opened: bool = True, **kw) -> GPT:
    torch.manual_seed(0)
    m = GPT(config(compression, gate, **kw)).eval()
    if opened:
        set_gates(m, 2.0 if gate == "sigmoid" else 1.0)
    return m


def set_gates(m: GPT, value: float) -> None:
    for block in m.fusion.xattn.values():
        block.gate.data.fill_(value)


def ehr_only(m: GPT) -> GPT:
    """The EHR-only decoder with the multimodal model's own decoder weights."""
    ehr = GPT(dataclasses.replace(m.config, fusion=FusionConfig())).eval()
    missing, unexpected = ehr.load_state_dict(m.state_dict(), strict=False)
    assert not missing
    assert all(k.split(".")[0] == "fusion" for k in unexpected)
    return ehr


def batch(B: int = 2, T: int = 16, K: int = 3, N: int = 5, seed: int = 0):
    """Tokens one hour apart (tokens 8 and 9 share a time); note events at 2.5 h, exactly 6 h, 11.5 h."""
    g = torch.Generator().manual_seed(seed)
    tokens = torch.randint(1, V, (B, T), generator=g)
    hours = torch.arange(T)
    hours[9] = 8
    times = T0 + hours.expand(B, T) * HOUR
    event_time = T0 + (torch.tensor([2.5, 6.0, 11.5])[:K] * HOUR).long().expand(B, K)
    token_mask = torch.ones(B, K, N, dtype=torch.bool)
    token_mask[0, 0, 3:] = False
    note = ModalityInputs(
        torch.randn(B, K, N, 12, generator=g),
        token_mask,
        event_time.clone(),
        torch.ones(B, K, dtype=torch.bool),
    )
    return tokens, times, {"note": note}


def perturb_event(mods: dict, e: int, scale: float = 3.0) -> dict:
    note = mods["note"]
    emb = note.emb.clone()
    emb[:, e] += scale * torch.randn_like(emb[:, e])
    return {"note": ModalityInputs(emb, note.token_mask, note.event_time, note.event_mask)}


@pytest.mark.parametrize("gate", GATES)
@pytest.mark.parametrize("compression", MODES)
def test_perturbing_an_event_changes_nothing_at_or_before_its_time(compression, gate):
    m = model(compression, gate)
    tokens, times, mods = batch()
    base = m(tokens, times, mods)[0]
    for e in range(3):
        out = m(tokens, times, perturb_event(mods, e))[0]
        seen_before = times <= mods["note"].event_time[:, e : e + 1]  # (B, T): includes the equal time
        torch.testing.assert_close(out[seen_before], base[seen_before], rtol=0, atol=1e-6)
        assert (out[~seen_before] - base[~seen_before]).abs().max() > 1e-4


def test_an_event_at_exactly_a_token_time_is_invisible_to_that_token():
    m = model()
    tokens, times, mods = batch()
    assert times[0, 6] == mods["note"].event_time[0, 1]  # the 6 h event and token 6 share a time
    base = m(tokens, times, mods)[0]
    out = m(tokens, times, perturb_event(mods, 1))[0]
    assert torch.equal(out[:, 6], base[:, 6])
    assert (out[:, 7] - base[:, 7]).abs().max() > 1e-4


def test_time_mask_is_what_prevents_leakage(monkeypatch):
    m = model()
    tokens, times, mods = batch()
    # Without the mask (every valid event visible to every token):
    monkeypatch.setattr(
        fusion, "visible_media", lambda times, _, valid: valid[:, None, :].expand(-1, times.shape[1], -1)
    )
    base = m(tokens, times, mods)[0]
    out = m(tokens, times, perturb_event(mods, 2))[0]  # the 11.5 h event now reaches token 0
    assert (out[:, 0] - base[:, 0]).abs().max() > 1e-4


@pytest.mark.parametrize("compression", MODES)
def test_perturbing_token_j_changes_nothing_before_j(compression):
    m = model(compression)
    tokens, times, mods = batch()
    base = m(tokens, times, mods)[0]
    for j in (0, 5, 12):
        perturbed = tokens.clone()
        perturbed[:, j] = (perturbed[:, j] + 7) % V
        out = m(perturbed, times, mods)[0]
        torch.testing.assert_close(out[:, :j], base[:, :j], rtol=0, atol=1e-6)
        assert (out[:, j] - base[:, j]).abs().max() > 1e-3


@pytest.mark.parametrize("gate", GATES)
@pytest.mark.parametrize("compression", MODES)
def test_closed_gates_compute_the_ehr_only_decoder(compression, gate):
    m = model(compression, gate)
    set_gates(m, float("-inf") if gate == "sigmoid" else 0.0)
    tokens, times, mods = batch()
    torch.testing.assert_close(m(tokens, times, mods)[0], ehr_only(m)(tokens)[0], rtol=0, atol=1e-6)


def test_tanh_gates_start_as_the_exact_identity_and_sigmoid_gates_start_small():
    tokens, times, mods = batch()
    m = model(gate="tanh", opened=False)
    assert set(m.gate_values().values()) == {0.0}
    torch.testing.assert_close(m(tokens, times, mods)[0], ehr_only(m)(tokens)[0], rtol=0, atol=1e-6)
    s = model(gate="sigmoid", opened=False)
    assert s.gate_values() == pytest.approx({k: 1 / (1 + math.exp(4)) for k in s.gate_values()})
    assert (s(tokens, times, mods)[0] - ehr_only(s)(tokens)[0]).abs().max() > 0  # small, not identity


@pytest.mark.parametrize("compression", MODES)
def test_no_visible_event_gives_the_ehr_only_output(compression):
    m = model(compression)
    tokens, times, mods = batch()
    expected = ehr_only(m)(tokens)[0]
    note = mods["note"]
    late = ModalityInputs(note.emb, note.token_mask, note.event_time + 100 * HOUR, note.event_mask)
    absent = ModalityInputs(note.emb, note.token_mask, note.event_time, torch.zeros_like(note.event_mask))
    empty = ModalityInputs(note.emb, torch.zeros_like(note.token_mask), note.event_time, note.event_mask)
    for mods_ in (None, {}, {"note": late}, {"note": absent}, {"note": empty}):
        torch.testing.assert_close(m(tokens, times, mods_)[0], expected, rtol=0, atol=1e-6)


def test_rows_without_visible_media_get_an_exact_zero_update_and_finite_gradients():
    torch.manual_seed(0)
    cfg = config()
    attn = MaskedCrossAttention(cfg)
    x = torch.randn(2, 4, D, requires_grad=True)
    media = torch.randn(2, 3, D, requires_grad=True)
    visible = torch.ones(2, 4, 3, dtype=torch.bool)
    visible[0, :2] = False  # the first two tokens of row 0 see nothing
    visible[1, :, 1:] = False  # row 1 sees only media token 0
    has_any = visible.any(-1)
    mask = (visible | ~has_any[..., None]).unsqueeze(1)
    y = attn(x, attn.media_kv(media), mask=mask, has_any=has_any)
    assert torch.equal(y[0, :2], torch.zeros(2, D))  # exact zero, projection bias included
    assert y[0, 2:].abs().min() > 0 and torch.isfinite(y).all()
    y.square().sum().backward()
    assert torch.isfinite(x.grad).all() and torch.isfinite(media.grad).all()
    assert torch.equal(x.grad[0, :2], torch.zeros(2, D))
    assert torch.equal(media.grad[1, 1:], torch.zeros(2, D))  # invisible media receive no gradient
    block = GatedCrossAttentionBlock(cfg, cfg.fusion)
    block.gate.data.fill_(3.0)
    out = block(x, attn.media_kv(media), mask=mask, has_any=has_any)
    assert torch.equal(out[0, :2], x[0, :2])  # the whole block (attention and FF) is the identity there


def test_training_backward_is_finite_with_rows_that_see_nothing():
    m = model()
    m.train()
    tokens, times, mods = batch()
    _, loss = m(
        tokens, times, mods, targets=tokens.roll(-1, 1), loss_mask=torch.ones_like(tokens, dtype=torch.bool)
    )
    loss.backward()
    assert all(torch.isfinite(p.grad).all() for p in m.parameters() if p.grad is not None)
    assert all(block.gate.grad.abs().min() > 0 for block in m.fusion.xattn.values())


def test_loss_ignores_targets_at_masked_positions():
    m = model()
    tokens, times, mods = batch()
    targets = tokens.roll(-1, 1)
    mask = torch.ones_like(tokens, dtype=torch.bool)
    mask[:, :3] = False  # static context
    mask[1, -4:] = False  # padding
    loss = m(tokens, times, mods, targets=targets, loss_mask=mask)[1]
    changed = targets.clone()
    changed[~mask] = 0
    assert m(tokens, times, mods, targets=changed, loss_mask=mask)[1].item() == loss.item()
    changed[0, 5] = (changed[0, 5] + 1) % V
    assert m(tokens, times, mods, targets=changed, loss_mask=mask)[1].item() != loss.item()


def test_gate_scales_the_modality_contribution():
    m = model()
    tokens, times, mods = batch()
    ehr = ehr_only(m)(tokens)[0]
    effect = {}
    for beta in (-6.0, -10.0):
        set_gates(m, beta)
        effect[beta] = (m(tokens, times, mods)[0] - ehr).abs().max().item()
    ratio = effect[-6.0] / effect[-10.0]
    assert ratio == pytest.approx(1 / (1 + math.exp(6)) / (1 / (1 + math.exp(10))), rel=0.05)


def three_modalities():
    """ecg (latent, K=3), cxr (mean, K=2), note (none, K=1), each with its own d_enc; rows hold 0..K_m events."""
    mods_cfg = {
        "ecg": ModalityConfig(d_enc=12, compression="latent", n_latents=4, n_latent_layers=2),
        "cxr": ModalityConfig(d_enc=20, compression="mean"),
        "note": ModalityConfig(d_enc=9, compression="none"),
    }
    fusion_cfg = FusionConfig(modalities=mods_cfg, gate="tanh", xattn_every=1)
    cfg = ModelConfig(vocab_size=V, n_layer=3, n_head=2, n_embd=D, block_size=48, fusion=fusion_cfg)
    torch.manual_seed(0)
    m = GPT(cfg).eval()
    set_gates(m, 1.0)
    B, T = 4, 12
    g = torch.Generator().manual_seed(3)
    tokens = torch.randint(1, V, (B, T), generator=g)
    times = T0 + torch.arange(T).expand(B, T) * HOUR
    counts = {"ecg": [0, 3, 1, 3], "cxr": [0, 0, 1, 2], "note": [0, 0, 1, 1]}
    mods = {}
    for name, (K, N) in {"ecg": (3, 7), "cxr": (2, 4), "note": (1, 6)}.items():
        event_mask = torch.arange(K)[None, :] < torch.tensor(counts[name])[:, None]
        emb = torch.randn(B, K, N, mods_cfg[name].d_enc, generator=g) * event_mask[..., None, None]
        token_mask = event_mask[..., None].expand(B, K, N).clone()
        event_time = T0 + torch.randint(0, (T - 2) * HOUR, (B, K), generator=g)
        mods[name] = ModalityInputs(emb, token_mask, event_time, event_mask)
    return m, tokens, times, mods


def test_batch_mixing_event_counts_and_three_modalities_with_different_widths():
    m, tokens, times, mods = three_modalities()
    media = m.encode_media(mods, batch_size=4)
    assert media.tokens.shape == (4, 3 * 4 + 2 * 1 + 1 * 6, D)
    assert media.valid.sum(1).tolist() == [0, 3 * 4, 4 + 1 + 6, 3 * 4 + 2 + 6]
    logits = m(tokens, times, mods)[0]
    assert logits.shape == (4, 12, V) and torch.isfinite(logits).all()
    torch.testing.assert_close(logits[0], ehr_only(m)(tokens[:1])[0][0], rtol=0, atol=1e-6)  # no events
    for b in range(4):  # padding never leaks across rows: each row alone gives the same logits
        alone = {
            k: ModalityInputs(
                v.emb[b : b + 1], v.token_mask[b : b + 1], v.event_time[b : b + 1], v.event_mask[b : b + 1]
            )
            for k, v in mods.items()
        }
        torch.testing.assert_close(
            m(tokens[b : b + 1], times[b : b + 1], alone)[0][0], logits[b], rtol=1e-5, atol=1e-5
        )
    only_ecg = m(tokens, times, {"ecg": mods["ecg"]})[0]
    assert (only_ecg[3] - logits[3]).abs().max() > 1e-4  # the other modalities contribute too


def test_bad_modality_inputs_fail_clearly():
    m = model()
    tokens, times, mods = batch()
    note = mods["note"]
    with pytest.raises(ValueError, match=r"'note'.*\(B, K_m, N, 12\)"):
        m(
            tokens,
            times,
            {"note": ModalityInputs(note.emb[..., :8], note.token_mask, note.event_time, note.event_mask)},
        )
    with pytest.raises(ValueError, match="not enabled"):
        m(tokens, times, {"ecg": note})
    with pytest.raises(ValueError, match=r"event_time must be torch\.int64"):
        m(
            tokens,
            times,
            {"note": ModalityInputs(note.emb, note.token_mask, note.event_time.double(), note.event_mask)},
        )
    with pytest.raises(ValueError, match="times"):
        m(tokens, None, mods)
    with pytest.raises(ValueError, match="rows"):
        m(tokens[:1], times[:1], mods)


def test_modality_dropout_drops_events_only_at_train_time():
    m = model(modality_dropout=1.0)
    tokens, times, mods = batch()
    ehr = ehr_only(m)(tokens)[0]
    m.train()
    torch.testing.assert_close(m(tokens, times, mods)[0], ehr, rtol=0, atol=1e-6)  # every event dropped
    m.eval()
    assert (m(tokens, times, mods)[0] - ehr).abs().max() > 1e-4
    half = model("mean", modality_dropout=0.5).train()
    torch.manual_seed(1)
    emb = torch.randn(2, 400, 3, 12)
    many = ModalityInputs(
        emb,
        torch.ones(2, 400, 3, dtype=torch.bool),
        torch.zeros(2, 400, dtype=torch.long),
        torch.ones(2, 400, dtype=torch.bool),
    )
    kept = half.encode_media({"note": many}).valid.float().mean().item()
    assert 0.43 < kept < 0.57


def test_media_noise_perturbs_stored_events_at_train_time_only_at_their_own_scale():
    m = model("mean", media_noise=0.5)
    *_, mods = batch()
    clean = model("mean")  # the same weights without noise
    torch.testing.assert_close(m.encode_media(mods).tokens, clean.encode_media(mods).tokens)  # eval: none
    m.train()
    clean.train()
    torch.manual_seed(0)
    # one event of 3,000 identical tokens at scale 100: mean-pooled, its noise (std 50 per token) averages
    # to about 1 per dimension, so the compressed event is its clean self to about 1 %
    emb = (100 * torch.randn(12)).expand(1, 1, 3000, 12)
    one = ModalityInputs(emb, torch.ones(1, 1, 3000, dtype=torch.bool), torch.zeros(1, 1, dtype=torch.long),
                         torch.ones(1, 1, dtype=torch.bool))  # fmt: skip
    noisy = [m.encode_media({"note": one}).tokens for _ in range(2)]
    assert (noisy[0] - noisy[1]).abs().max() > 1e-3  # fresh noise every call
    torch.testing.assert_close(noisy[0], clean.encode_media({"note": one}).tokens, rtol=0.1, atol=0.1)
    # A modality's own media_noise overrides the fusion's: 0 there silences it, > 0 adds it alone.
    for fusion_noise, own, expect_noise in ((0.5, 0.0, False), (0.0, 0.5, True), (0.5, None, True)):
        cfg = config("mean", media_noise=fusion_noise)
        cfg.fusion.modalities["note"].media_noise = own
        torch.manual_seed(0)
        g = GPT(cfg).train()
        a, b = (g.encode_media({"note": one}).tokens for _ in range(2))
        assert ((a - b).abs().max() > 1e-3) == expect_noise
    with pytest.raises(ValueError, match="media_noise"):
        ModalityConfig(d_enc=4, media_noise=-1.0)


def test_media_cutoff_trains_a_row_as_a_rollout_from_a_random_token_sees_it():
    """A row cut at a drawn token's time computes what the model computes with no event acquired at or
    after that time (a rollout's view); only at train time, and only when asked."""
    m = model("latent", media_cutoff=1.0).train()
    tokens, times, mods = batch(seed=1)
    note = mods["note"]
    torch.manual_seed(3)
    cut = m.fusion.draw_cutoff(times)
    torch.manual_seed(3)
    out = m(tokens, times, mods)[0]
    m.eval()
    assert m.fusion.draw_cutoff(times) is None
    before_cut = note.event_mask & (note.event_time < cut[:, None])
    assert (before_cut != note.event_mask).any()  # the draw hides an event from some row
    as_rollout = ModalityInputs(note.emb, note.token_mask, note.event_time, before_cut)
    torch.testing.assert_close(out, m(tokens, times, {"note": as_rollout})[0], rtol=0, atol=1e-6)
    assert (out - m(tokens, times, mods)[0]).abs().max() > 1e-4  # eval: every event, no cut
    never = model("latent").train()
    assert never.fusion.draw_cutoff(times) is None
    half = model("latent", media_cutoff=0.5).train()
    torch.manual_seed(0)
    drawn = half.fusion.draw_cutoff(T0 + torch.arange(16).expand(4000, 16) * HOUR)
    assert 0.46 < (drawn < torch.iinfo(torch.int64).max).float().mean().item() < 0.54
    with pytest.raises(ValueError, match="media_cutoff"):
        FusionConfig(media_cutoff=1.5)


def test_fusion_dropout_follows_the_decoder_unless_set_apart():
    def rates(cfg: ModelConfig) -> tuple[float, float, float]:
        block = GatedCrossAttentionBlock(cfg, cfg.fusion)
        return block.attn.resid_dropout.p, block.attn.attn_dropout, block.ff.dropout.p

    decoder = {"dropout": 0.3, "attn_dropout": 0.1}
    assert rates(dataclasses.replace(config(), **decoder)) == (0.3, 0.1, 0.3)  # the decoder's rates
    for own in (0.0, 0.2):
        assert rates(dataclasses.replace(config(dropout=own), **decoder)) == (own, own, own)
    torch.manual_seed(0)
    x, media = torch.randn(2, 5, D), torch.randn(2, 3, D)
    mask, has_any = torch.ones(2, 1, 5, 3, dtype=torch.bool), torch.ones(2, 5, dtype=torch.bool)
    for own, deterministic in ((0.0, True), (None, False)):  # training, under the decoder's dropout 0.3
        cfg = dataclasses.replace(config(dropout=own), dropout=0.3)
        block = GatedCrossAttentionBlock(cfg, cfg.fusion).train()
        kv = block.attn.media_kv(media)
        a, b = (block(x, kv, mask=mask, has_any=has_any) for _ in range(2))
        assert torch.equal(a, b) == deterministic
    with pytest.raises(ValueError, match="fusion dropout"):
        FusionConfig(dropout=1.0)


def test_time_bias_keeps_the_strict_mask():
    m = model(time_bias=True)
    torch.nn.init.normal_(m.fusion.time_bias.table, std=1.0)
    tokens, times, mods = batch()
    base = m(tokens, times, mods)[0]
    out = m(tokens, times, perturb_event(mods, 1))[0]
    seen_before = times <= mods["note"].event_time[:, 1:2]
    torch.testing.assert_close(out[seen_before], base[seen_before], rtol=0, atol=1e-6)
    m.fusion.time_bias.table.data.zero_()  # the initial state: a zero table is no bias at all
    no_bias = m(tokens, times, mods)[0]
    m.fusion.time_bias = None
    torch.testing.assert_close(m(tokens, times, mods)[0], no_bias, rtol=1e-6, atol=1e-6)


def row(m, tokens, times, media, b, n):
    """Full-recomputation logits of row b's first n tokens."""
    return m(tokens[b : b + 1, :n], times[b : b + 1, :n], media=media.select(torch.tensor([b])))[0][0]


def test_a_capped_modality_shows_each_token_its_own_k_most_recent_events():
    """k_visible = 1 (per-token retrieval): each token's cross-attention sees only the latest event acquired
    strictly before it, as if its row carried that event alone; so what a token computes never depends on
    an event after it, though that event pushes the earlier one out for the tokens after it."""
    m = model()
    tokens, times, mods = batch()  # events at 2.5 h, 6 h, 11.5 h; tokens hourly (8 and 9 both at 8 h)
    note = mods["note"]
    capped = dataclasses.replace(note, k_visible=1)
    mask = m.fusion.context(times, m.encode_media({"note": capped})).mask
    hours = (times - T0) / HOUR
    for e, (lo, hi) in enumerate([(2.5, 6.0), (6.0, 11.5), (11.5, math.inf)]):
        alone = dataclasses.replace(note, event_mask=note.event_mask & (torch.arange(3) == e))
        seen = (hours > lo) & (hours <= hi)
        assert torch.equal(
            mask[:, 0][seen], m.fusion.context(times, m.encode_media({"note": alone})).mask[:, 0][seen]
        )
    out = m(tokens, times, {"note": capped})[0]
    without_last = dataclasses.replace(capped, event_mask=note.event_mask & (torch.arange(3) < 2))
    before = hours <= 11.5
    torch.testing.assert_close(
        m(tokens, times, {"note": without_last})[0][before], out[before], rtol=0, atol=1e-6
    )
    uncapped = m(tokens, times, mods)[0]
    torch.testing.assert_close(out[hours <= 6.0], uncapped[hours <= 6.0], rtol=0, atol=1e-6)
    assert not torch.allclose(out[hours > 6.0], uncapped[hours > 6.0])  # there they see 2 or 3 events


@pytest.mark.parametrize("k_visible", [None, 1])
@pytest.mark.parametrize("time_bias", [False, True])
@pytest.mark.parametrize("compression", MODES)
def test_cached_decoding_with_media_equals_full_recomputation(compression, time_bias, k_visible):
    m = model(compression, time_bias=time_bias)
    if time_bias:
        torch.nn.init.normal_(m.fusion.time_bias.table, std=1.0)
    tokens, times, mods = batch(B=3, T=16)
    mods = {"note": dataclasses.replace(mods["note"], k_visible=k_visible)}  # 1: each token its latest event
    media = m.encode_media(mods)
    kv_calls = []
    for block in m.fusion.xattn.values():
        block.attn.kv.register_forward_hook(lambda *_: kv_calls.append(1))
    lengths = torch.tensor([3, 6, 9])  # short contexts: events become visible while decoding
    cache = m.new_cache(3)
    with torch.no_grad():
        last = m.prefill(tokens[:, :9], times[:, :9], cache, media=media, lengths=lengths)
        assert len(kv_calls) == len(m.fusion.xattn)  # media keys/values: once per block per sequence
        for b in range(3):
            torch.testing.assert_close(
                last[b], row(m, tokens, times, media, b, int(lengths[b]))[-1], rtol=1e-5, atol=1e-5
            )
        seqs = [(tokens[b, : lengths[b]].tolist(), times[b, : lengths[b]].tolist()) for b in range(3)]
        for step in range(6):
            t = 2 if step == 3 else 1  # one few-token step
            new_tokens = torch.randint(1, V, (cache.batch_size, t))
            new_times = torch.stack([torch.tensor(s[1][-1]) + HOUR * torch.arange(1, t + 1) for s in seqs])
            if step == 4:  # retire row 1
                cache.keep(torch.tensor([0, 2]))
                seqs = [seqs[0], seqs[2]]
                media = media.select(torch.tensor([0, 2]))
                new_tokens, new_times = new_tokens[[0, 2]], new_times[[0, 2]]
            calls = len(kv_calls)
            out = m.decode(new_tokens, new_times, cache)
            assert len(kv_calls) == calls  # decoding never recomputes the media keys/values
            for b, (seq_tokens, seq_times) in enumerate(seqs):
                seq_tokens += new_tokens[b].tolist()
                seq_times += new_times[b].tolist()
                full = m(
                    torch.tensor([seq_tokens]),
                    torch.tensor([seq_times]),
                    media=media.select(torch.tensor([b])),
                )[0][0]
                torch.testing.assert_close(out[b], full[-t:], rtol=1e-5, atol=1e-5)


def test_sliding_window_with_media_equals_recomputation_on_the_window():
    m = model("latent")
    tokens, times, mods = batch(B=1, T=16)
    media = m.encode_media(mods)
    cache = m.new_cache(1, max_len=12)
    seq_tokens, seq_times = tokens[0, :10].tolist(), times[0, :10].tolist()
    with torch.no_grad():
        m.prefill(tokens[:, :10], times[:, :10], cache, media=media, prefix=2)
        for _ in range(6):
            if len(seq_tokens) + 1 > 12:
                seq_tokens, seq_times = seq_tokens[:2] + seq_tokens[-7:], seq_times[:2] + seq_times[-7:]
            new_token, new_time = torch.randint(1, V, (1, 1)), torch.tensor([[seq_times[-1] + HOUR]])
            out = m.decode(new_token, new_time, cache)
            seq_tokens.append(int(new_token))
            seq_times.append(int(new_time))
            full = m(torch.tensor([seq_tokens]), torch.tensor([seq_times]), media=media)[0][0]
            torch.testing.assert_close(out[0, 0], full[-1], rtol=1e-5, atol=1e-5)
    assert len(seq_tokens) < 16  # it slid


def test_param_groups_keep_gates_norms_biases_and_embeddings_out_of_weight_decay():
    m = model(time_bias=True)
    decay, no_decay, gates = m.param_groups(0.1)
    ids = lambda g: {id(p) for p in g["params"]}  # noqa: E731
    assert ids(gates) == {id(b.gate) for b in m.fusion.xattn.values()}
    assert gates["weight_decay"] == 0.0 and gates["lr_scale"] == m.config.fusion.gate_lr_scale
    assert decay["weight_decay"] == 0.1 and no_decay["weight_decay"] == 0.0
    every = [id(p) for g in (decay, no_decay, gates) for p in g["params"]]
    assert sorted(every) == sorted(id(p) for p in m.parameters())  # each parameter exactly once
    for p in (
        m.transformer.wte.weight,
        m.transformer.wpe.weight,
        m.fusion.compressors["note"].latents,
        m.fusion.time_bias.table,
        m.fusion.modality_embedding.weight,
        m.transformer.h[0].ln_1.weight,
        m.transformer.h[0].attn.c_attn.bias,
    ):
        assert id(p) in ids(no_decay)
    assert id(m.fusion.xattn["0"].attn.c_proj.weight) in ids(decay)
    assert id(m.fusion.compressors["note"].proj.weight) in ids(decay)
    opt = torch.optim.AdamW(m.param_groups(0.1), lr=1e-3)
    assert opt.param_groups[2]["lr_scale"] == m.config.fusion.gate_lr_scale


def test_fusion_lr_scale_gives_the_fusion_its_own_groups_and_keeps_the_default_layout():
    m = model(time_bias=True, lr_scale=3.0)
    decay, no_decay, fusion_decay, fusion_no_decay, gates = m.param_groups(0.1)
    ids = lambda g: {id(p) for p in g["params"]}  # noqa: E731
    fusion = {id(p) for p in m.fusion.parameters()} - ids(gates)
    assert ids(fusion_decay) | ids(fusion_no_decay) == fusion
    assert not (ids(decay) | ids(no_decay)) & fusion  # the decoder keeps the base learning rate
    assert fusion_decay["lr_scale"] == fusion_no_decay["lr_scale"] == 3.0 and decay["lr_scale"] == 1.0
    assert fusion_decay["weight_decay"] == 0.1 and fusion_no_decay["weight_decay"] == 0.0
    assert id(m.fusion.compressors["note"].latents) in ids(fusion_no_decay)
    assert id(m.fusion.xattn["0"].attn.q.weight) in ids(fusion_decay)
    # lr_scale 1 (every run before it existed): the same 3 groups, parameters in the same order
    plain = model(time_bias=True)
    before = [[id(p) for p in g["params"]] for g in plain.param_groups(0.1)]
    assert len(before) == 3 and before[0][-1] == id(plain.fusion.xattn["1"].ff.c_proj.weight)
    with pytest.raises(ValueError, match="lr_scale"):
        config(lr_scale=0.0)


def test_gate_values_name_every_block():
    torch.manual_seed(0)
    m = GPT(config(n_layer=4, xattn_every=2))
    assert sorted(m.gate_values()) == ["xattn.1.attn", "xattn.1.ff", "xattn.3.attn", "xattn.3.ff"]
    plain = GPT(dataclasses.replace(config(), fusion=FusionConfig()))
    assert plain.gate_values() == {} and len(plain.param_groups(0.1)) == 2
    counts = parameter_counts(m)
    assert counts["total"] == counts["decoder"] + counts["compression"] + counts["cross_attention"]


def counted_forward_flops(m: GPT, T: int, N: int, K: int = 2) -> int:
    B = 1
    tokens = torch.randint(1, V, (B, T))
    times = T0 + torch.arange(T).expand(B, T) * HOUR
    note = ModalityInputs(
        torch.randn(B, K, N, 12),
        torch.ones(B, K, N, dtype=torch.bool),
        torch.full((B, K), T0),
        torch.ones(B, K, dtype=torch.bool),
    )
    with sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter:
        m(tokens, times, {"note": note})
    assert counter.get_total_flops() == sum(forward_flops(m, T, {"note": (K, N)}).values())
    return counter.get_total_flops()


@pytest.mark.parametrize("compression", MODES)
def test_cost_scaling_in_encoder_tokens_and_context(compression):
    m = model(compression, opened=False)
    f = {(N, T): counted_forward_flops(m, T, N) for N in (8, 16, 32) for T in (8, 16)}
    # linear in N at fixed T
    assert f[32, 8] - f[16, 8] == 2 * (f[16, 8] - f[8, 8]) > 0
    interaction = f[16, 16] - f[16, 8] - f[8, 16] + f[8, 8]  # the N x T term
    if compression == "none":  # cross-attention over all K N tokens from each of T queries
        assert interaction == len(m.fusion.xattn) * 4 * D * 2 * (16 - 8) * (16 - 8)
    else:  # latent/mean: cross-attention sees K k tokens whatever N is
        assert interaction == 0
    assert train_flops_per_token(m, 16, events={"note": (2, 16)}) == 3 * f[16, 16] / 16
