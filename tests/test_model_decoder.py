"""The EHR-only GPT decoder: config, init, causality, loss masking, and the preallocated KV cache."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

from mmehr.config import ConfigError, from_dict, load_config
from mmehr.model.accounting import forward_flops, num_parameters, train_flops_per_token
from mmehr.model.config import FusionConfig, ModalityConfig, ModelConfig
from mmehr.model.decoder import KVCache, next_token_loss
from mmehr.model.gpt import GPT

V = 40


def tiny(**kw) -> ModelConfig:
    base = dict(vocab_size=V, n_layer=2, n_head=2, n_embd=16, block_size=32)
    return ModelConfig(**{**base, **kw})


def model(seed: int = 0, **kw) -> GPT:
    torch.manual_seed(seed)
    return GPT(tiny(**kw)).eval()


def full_logits(m: GPT, seq: list[int]) -> torch.Tensor:
    """Logits (len, V) of one sequence by a full, uncached forward."""
    return m(torch.tensor([seq]))[0][0]


def test_config_loads_from_yaml_with_modalities(tmp_path):
    path = tmp_path / "model.yaml"
    path.write_text(
        "vocab_size: 100\nn_layer: 4\nn_head: 2\nn_embd: 32\nblock_size: 64\n"
        "fusion:\n  xattn_every: 2\n  gate: tanh\n  modalities:\n"
        "    ecg: {d_enc: 768, compression: latent, n_latents: 8, n_latent_layers: 4}\n"
        "    note: {d_enc: 384, compression: mean}\n"
    )
    cfg = load_config(ModelConfig, path, overrides=["fusion.modalities.note.compression=none"])
    assert cfg.modalities["ecg"] == ModalityConfig(
        d_enc=768, compression="latent", n_latents=8, n_latent_layers=4
    )
    assert cfg.modalities["note"].compression == "none"
    assert cfg.fusion.gate == "tanh"
    assert cfg.xattn_layers == [1, 3]
    assert tiny().xattn_layers == []  # EHR-only: no cross-attention blocks


def test_config_rejects_inconsistent_values():
    with pytest.raises(ValueError, match="divisible"):
        tiny(n_embd=15, n_head=2)
    with pytest.raises(ConfigError, match="compression"):
        from_dict(ModelConfig, {"fusion": {"modalities": {"ecg": {"d_enc": 8, "compression": "max"}}}})
    with pytest.raises(ConfigError, match="unknown key"):
        from_dict(ModelConfig, {"n_layers": 3})
    with pytest.raises(ValueError, match="modality_dropout"):
        tiny(fusion=FusionConfig(modality_dropout=1.5))
    with pytest.raises(ValueError, match="media_noise"):
        tiny(fusion=FusionConfig(media_noise=-0.1))
    with pytest.raises(ValueError, match="no cross-attention block"):
        tiny(n_layer=2, fusion=FusionConfig(xattn_every=3, modalities={"ecg": ModalityConfig(d_enc=8)}))


def test_weights_are_tied_and_parameters_counted():
    m = model()
    D, L = 16, 2
    assert m.lm_head.weight is m.transformer.wte.weight
    per_block = 12 * D * D + 13 * D  # qkv, proj, mlp (weights + biases), two LayerNorms
    expected = V * D + 32 * D + L * per_block + 2 * D
    assert num_parameters(m, non_embedding=False) == expected
    assert num_parameters(m) == expected - 32 * D


def test_init_scales_residual_projections_like_gpt2():
    torch.manual_seed(0)
    m = GPT(tiny(n_embd=64, n_layer=4, n_head=4))
    std = m.transformer.h[0].mlp.c_proj.weight.std().item()
    assert std == pytest.approx(0.02 / math.sqrt(2 * 4), rel=0.05)
    assert m.transformer.h[0].mlp.c_fc.weight.std().item() == pytest.approx(0.02, rel=0.05)
    assert torch.count_nonzero(m.transformer.h[0].mlp.c_fc.bias) == 0


def test_perturbing_token_j_changes_nothing_before_j():
    m = model()
    tokens = torch.randint(1, V, (2, 20))
    base = m(tokens)[0]
    for j in (0, 7, 19):
        perturbed = tokens.clone()
        perturbed[:, j] = (perturbed[:, j] + 5) % V
        out = m(perturbed)[0]
        torch.testing.assert_close(out[:, :j], base[:, :j], rtol=0, atol=1e-6)
        assert (out[:, j] - base[:, j]).abs().max() > 1e-3


def test_loss_counts_only_positions_in_the_loss_mask():
    torch.manual_seed(0)
    logits = torch.randn(2, 6, V)
    targets = torch.randint(0, V, (2, 6))
    mask = torch.tensor([[False, False, True, True, True, False], [False, True, True, True, True, True]])
    loss = next_token_loss(logits, targets, mask)
    manual = F.cross_entropy(logits[mask], targets[mask])
    assert loss.item() == pytest.approx(manual.item(), rel=1e-6)
    changed = targets.clone()
    changed[~mask] = (changed[~mask] + 1) % V
    changed[0, 0] = -1  # never read: masked targets may be anything, even out of range
    assert next_token_loss(logits, changed, mask).item() == loss.item()
    changed[0, 2] = (changed[0, 2] + 1) % V
    assert next_token_loss(logits, changed, mask).item() != loss.item()
    none = next_token_loss(logits, targets, torch.zeros_like(mask))
    assert none.item() == 0.0


def test_forward_returns_masked_loss():
    m = model()
    tokens = torch.randint(1, V, (2, 10))
    mask = torch.ones(2, 10, dtype=torch.bool)
    mask[:, :3] = False  # static context
    logits, loss = m(tokens, targets=tokens.roll(-1, 1), loss_mask=mask)
    assert loss.item() == pytest.approx(next_token_loss(logits, tokens.roll(-1, 1), mask).item())
    assert m(tokens)[1] is None


def test_sequence_longer_than_block_size_is_rejected():
    with pytest.raises(ValueError, match="block_size"):
        model()(torch.zeros(1, 33, dtype=torch.long))


def test_prefill_and_one_token_decoding_equal_full_recomputation():
    m = model()
    torch.manual_seed(1)
    lengths = torch.tensor([5, 9, 12])
    rows = [torch.randint(1, V, (int(n),)).tolist() for n in lengths]
    tokens = torch.zeros(3, 12, dtype=torch.long)
    for b, seq in enumerate(rows):
        tokens[b, : len(seq)] = torch.tensor(seq)
    cache = m.new_cache(3)
    with torch.no_grad():
        last = m.prefill(tokens, None, cache, lengths=lengths)
        for b, seq in enumerate(rows):
            torch.testing.assert_close(last[b], full_logits(m, seq)[-1], rtol=1e-5, atol=1e-5)
        for _ in range(6):
            new = torch.randint(1, V, (3, 1))
            out = m.decode(new, None, cache)  # (3, 1, V)
            for b in range(3):
                rows[b].append(int(new[b, 0]))
                torch.testing.assert_close(out[b, 0], full_logits(m, rows[b])[-1], rtol=1e-5, atol=1e-5)
    assert cache.lengths.tolist() == [11, 15, 18]


def test_few_token_decode_steps_equal_full_recomputation():
    m = model()
    seq = torch.randint(1, V, (1, 10))
    cache = m.new_cache(1)
    with torch.no_grad():
        m.prefill(seq[:, :4], None, cache)
        out = m.decode(seq[:, 4:7], None, cache)  # three tokens in one step
        torch.testing.assert_close(out[0], full_logits(m, seq[0].tolist())[4:7], rtol=1e-5, atol=1e-5)


def test_keep_retires_rows_and_fans_out_rows():
    m = model()
    rows = [torch.randint(1, V, (6,)).tolist() for _ in range(3)]
    cache = m.new_cache(3)
    with torch.no_grad():
        m.prefill(torch.tensor(rows), None, cache)
        cache.keep(torch.tensor([True, False, True]))  # row 1 finished
        rows = [rows[0], rows[2]]
        cache.keep(torch.tensor([1, 0, 0]))  # reorder and fan row 0 out into two rollouts
        rows = [rows[1], rows[0], list(rows[0])]
        assert cache.batch_size == 3 and cache.k.shape[1] == 3
        for _ in range(3):
            new = torch.randint(1, V, (3, 1))
            out = m.decode(new, None, cache)
            for b in range(3):
                rows[b].append(int(new[b, 0]))
                torch.testing.assert_close(out[b, 0], full_logits(m, rows[b])[-1], rtol=1e-5, atol=1e-5)


def test_cache_is_preallocated_and_never_grows():
    m = model()
    cache = m.new_cache(2, max_len=20)
    ptr, shape = cache.k.data_ptr(), cache.k.shape
    with torch.no_grad():
        m.prefill(torch.randint(1, V, (2, 5)), None, cache)
        for _ in range(10):
            m.decode(torch.randint(1, V, (2, 1)), None, cache)
    assert cache.k.data_ptr() == ptr and cache.k.shape == shape == (2, 2, 2, 20, 8)
    with pytest.raises(ValueError, match="max_len"):
        KVCache(tiny(), 1, max_len=33)
    with pytest.raises(ValueError, match="KV cache full"):
        cache.begin(20)


def test_sliding_window_equals_recomputation_on_the_kept_window():
    m = model()
    max_len, prefix = 16, 3
    keep = max_len * 3 // 4
    rows = [torch.randint(1, V, (n,)).tolist() for n in (14, 10)]
    tokens = torch.zeros(2, 14, dtype=torch.long)
    for b, seq in enumerate(rows):
        tokens[b, : len(seq)] = torch.tensor(seq)
    times = torch.arange(14).expand(2, 14) * 1_000_000
    cache = m.new_cache(2, max_len=max_len)
    slid = False
    with torch.no_grad():
        m.prefill(tokens, times, cache, lengths=torch.tensor([14, 10]), prefix=prefix)
        for step in range(12):
            if max(len(r) for r in rows) + 1 > max_len:  # the model slides every row at once
                rows = [r[:prefix] + r[len(r) - (keep - prefix) :] if len(r) > keep else r for r in rows]
                slid = True
            new = torch.randint(1, V, (2, 1))
            out = m.decode(new, torch.full((2, 1), 20 + step) * 1_000_000, cache)
            for b in range(2):
                rows[b].append(int(new[b, 0]))
                torch.testing.assert_close(out[b, 0], full_logits(m, rows[b])[-1], rtol=1e-5, atol=1e-5)
    assert slid
    assert cache.tokens[0, :prefix].tolist() == tokens[0, :prefix].tolist()  # static context survives


def test_estimate_flops_matches_counted_flops():
    m = model()
    B, T = 2, 24
    with sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter:
        m(torch.randint(1, V, (B, T)))
    assert counter.get_total_flops() == B * forward_flops(m, T)["decoder"]
    assert train_flops_per_token(m, T) == 3 * forward_flops(m, T)["decoder"] / T


def test_attention_dropout_follows_dropout_unless_set_apart(monkeypatch):
    from mmehr.model import decoder

    seen: list[float] = []
    real = decoder.attention

    def spy(q, k, v, **kwargs):
        seen.append(kwargs["dropout_p"])
        return real(q, k, v, **kwargs)

    monkeypatch.setattr(decoder, "attention", spy)
    x = torch.randn(2, 5, 16)
    for attn_dropout, expected in ((None, 0.3), (0.0, 0.0), (0.1, 0.1)):
        attention = decoder.CausalSelfAttention(tiny(dropout=0.3, attn_dropout=attn_dropout))
        seen.clear()
        attention.train()(x)
        attention.eval()(x)
        assert seen == [expected, 0.0]  # never at evaluation
    with pytest.raises(ValueError, match="attn_dropout"):
        tiny(attn_dropout=1.0)


def test_cpu_dropout_is_inverted_dropout_with_its_rate():
    from mmehr.model.decoder import Dropout, dropout

    x = torch.ones(200_000, requires_grad=True)
    y = dropout(x, 0.3, training=True)
    kept = y != 0
    assert abs(1 - kept.float().mean().item() - 0.3) < 0.005  # the rate
    torch.testing.assert_close(y[kept], torch.full_like(y[kept], 1 / 0.7))  # survivors scaled by 1/(1-p)
    y.sum().backward()
    torch.testing.assert_close(x.grad, y.detach())  # the gradient goes through the same mask
    assert dropout(x, 0.3, training=False) is x and dropout(x, 0.0, training=True) is x
    assert Dropout(0.3).eval()(x) is x


@pytest.mark.parametrize("p", [0.3, 0.1, 0.5, 1e-7, 0.9999999])
def test_keep_mask_is_exactly_rand_ge_p_and_leaves_the_generator_where_rand_does(p):
    from mmehr.model.decoder import dropout, keep_mask

    for shape in [(1,), (7,), (16,), (17,), (3, 5, 33), (2, 4, 64, 64)]:
        torch.manual_seed(11)
        expected, after = torch.rand(shape) >= p, torch.rand(5)
        torch.manual_seed(11)
        got = keep_mask(shape, p)
        assert torch.equal(got, expected), shape
        assert torch.equal(torch.rand(5), after), shape  # the same draws were taken
    # so `dropout` computes what it computed with rand_like's mask, to the bit
    x = torch.randn(4, 32, 16)
    torch.manual_seed(3)
    old = x * ((torch.rand_like(x) >= p) * (1.0 / (1.0 - p)))
    torch.manual_seed(3)
    assert torch.equal(dropout(x, p, training=True), old)


def test_attention_with_dropout_computes_what_the_masked_fill_form_computed_to_the_bit():
    """The causal mask as an additive bias and the masks from keep_mask: the outputs and gradients of the
    earlier form (masked_fill, rand_like's masks scaled in one step), bit for bit."""
    from mmehr.model.decoder import attention

    def before(q, k, v, p):
        scores = (q @ k.transpose(-2, -1)) * (1.0 / math.sqrt(q.shape[-1]))
        T, S = scores.shape[-2:]
        scores = scores.masked_fill(torch.ones(T, S, dtype=torch.bool).triu(1), float("-inf"))
        probs = torch.softmax(scores, dim=-1)
        return (probs * ((torch.rand_like(probs) >= p) * (1.0 / (1.0 - p)))) @ v

    torch.manual_seed(0)
    leaves = [torch.randn(3, 2, 37, 8, requires_grad=True) for _ in range(3)]
    grad_out = torch.randn(3, 2, 37, 8)
    results = []
    for f in (
        lambda q, k, v: attention(q, k, v, is_causal=True, dropout_p=0.3),
        lambda q, k, v: before(q, k, v, 0.3),
    ):
        torch.manual_seed(5)
        y = f(*leaves)
        grads = torch.autograd.grad(y, leaves, grad_out)
        results.append((y.detach(), grads))
    assert torch.equal(results[0][0], results[1][0])
    assert all(torch.equal(a, b) for a, b in zip(results[0][1], results[1][1]))


def test_attention_with_dropout_is_sdpa_in_expectation_and_stays_causal():
    from mmehr.model.decoder import attention

    torch.manual_seed(0)
    q, k, v = (torch.randn(1, 2, 6, 8) for _ in range(3))
    exact = F.scaled_dot_product_attention(q, k, v, is_causal=True)
    torch.testing.assert_close(attention(q, k, v, is_causal=True), exact)
    mean = torch.stack([attention(q, k, v, is_causal=True, dropout_p=0.3) for _ in range(4000)]).mean(0)
    torch.testing.assert_close(mean, exact, atol=0.05, rtol=0)
    mask = torch.rand(1, 1, 6, 6) < 0.6  # an attention mask (each row keeps its first key)
    mask[..., 0] = True
    exact = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    mean = torch.stack([attention(q, k, v, attn_mask=mask, dropout_p=0.3) for _ in range(4000)]).mean(0)
    torch.testing.assert_close(mean, exact, atol=0.05, rtol=0)
    # Position t never sees a later token: changing the last key and value leaves earlier outputs as they were.
    k2, v2 = k.clone(), v.clone()
    k2[..., -1, :], v2[..., -1, :] = 10.0, -10.0
    torch.manual_seed(1)
    a = attention(q, k, v, is_causal=True, dropout_p=0.3)
    torch.manual_seed(1)
    b = attention(q, k2, v2, is_causal=True, dropout_p=0.3)
    torch.testing.assert_close(a[..., :-1, :], b[..., :-1, :])
