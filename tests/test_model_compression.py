"""Compression of one modality event (N x d_enc encoder tokens) into decoder-width tokens."""

from __future__ import annotations

import pytest
import torch
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

from mmehr.model.compression import MeanPool, NoCompression, PerceiverResampler, build_compressor
from mmehr.model.config import ModalityConfig

D_ENC, D, HEADS = 12, 16, 2


def compressor(mode: str, k: int = 3, layers: int = 2, seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    return build_compressor(ModalityConfig(D_ENC, mode, n_latents=k, n_latent_layers=layers), D, HEADS).eval()


def events(B: int = 2, K: int = 3, N: int = 7, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    emb = torch.randn(B, K, N, D_ENC, generator=g)
    mask = torch.ones(B, K, N, dtype=torch.bool)
    mask[0, 1, 4:] = False  # a shorter event (padded encoder tokens)
    mask[1, 2] = False  # an event with no valid token at all
    return emb, mask


@pytest.mark.parametrize(("mode", "n_out"), [("none", 7), ("mean", 1), ("latent", 3)])
def test_shapes_and_masks_for_any_leading_dims(mode, n_out):
    c = compressor(mode)
    emb, mask = events()
    out, out_mask = c(emb, mask)
    assert out.shape == (2, 3, n_out, D) and out_mask.shape == (2, 3, n_out)
    assert c.n_out(7) == n_out
    flat, flat_mask = c(emb.flatten(0, 1), mask.flatten(0, 1))  # (E, N, d_enc) events
    torch.testing.assert_close(flat, out.flatten(0, 1))
    assert torch.equal(flat_mask, out_mask.flatten(0, 1))
    assert torch.isfinite(out).all()


def test_none_projects_every_token_and_passes_the_mask_through():
    c = compressor("none")
    assert isinstance(c, NoCompression)
    emb, mask = events()
    out, out_mask = c(emb, mask)
    assert torch.equal(out_mask, mask)
    torch.testing.assert_close(out[0, 0, 2], c.ln(c.proj(emb[0, 0, 2])))


def test_mean_pool_honours_the_token_mask():
    c = compressor("mean")
    assert isinstance(c, MeanPool)
    emb, mask = events()
    out, out_mask = c(emb, mask)
    expected = c.ln(c.proj(emb[0, 1, :4].mean(0)))  # only the 4 valid tokens
    torch.testing.assert_close(out[0, 1, 0], expected, rtol=1e-5, atol=1e-5)
    noisy = emb.clone()
    noisy[~mask] = 1e3  # padding values are never read
    torch.testing.assert_close(c(noisy, mask)[0], out, rtol=0, atol=0)
    assert out_mask[:, :, 0].tolist() == [[True, True, True], [True, True, False]]


def test_latent_resampler_ignores_padding_and_reads_real_tokens():
    c = compressor("latent")
    assert isinstance(c, PerceiverResampler)
    emb, mask = events()
    out, out_mask = c(emb, mask)
    assert out_mask.all()  # latents always exist; event availability is the model's mask
    noisy = emb.clone()
    noisy[~mask] = 1e3
    torch.testing.assert_close(c(noisy, mask)[0], out, rtol=1e-6, atol=1e-6)
    real = emb.clone()
    real[0, 1, 0] += 1.0  # a valid token of event (0, 1)
    changed = (c(real, mask)[0] - out).abs().amax(dim=(-1, -2))  # (B, K)
    assert changed[0, 1] > 1e-3
    changed[0, 1] = 0
    assert changed.max() == 0  # events are resampled independently


def test_latents_are_random_learned_parameters():
    c = compressor("latent", k=8)
    assert c.latents.requires_grad and c.latents.shape == (8, D)
    assert 0.8 < c.latents.std().item() < 1.2  # random noise at Flamingo's scale, not zeros or copies
    assert torch.pdist(c.latents).min() > 1e-3
    emb, mask = events()
    c(emb, mask)[0].sum().backward()
    assert c.latents.grad.abs().sum() > 0


def test_half_precision_embeddings_are_accepted():
    emb, mask = events()
    for mode in ("none", "mean", "latent"):
        c = compressor(mode)
        out = c(emb.half(), mask)[0]
        assert out.dtype == torch.float32
        torch.testing.assert_close(out, c(emb.half().float(), mask)[0])


def counted_flops(c: torch.nn.Module, N: int, E: int = 2) -> int:
    emb = torch.randn(E, N, D_ENC)
    with sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter:
        c(emb, torch.ones(E, N, dtype=torch.bool))
    return counter.get_total_flops()


@pytest.mark.parametrize(
    ("mode", "fold"), [("none", None), ("mean", None), ("latent", False), ("latent", True)]
)
def test_cost_is_linear_in_encoder_tokens(mode, fold):
    c = compressor(mode, k=8, layers=4)
    if fold is not None:
        c.fold_media_kv = fold
    f = {N: counted_flops(c, N) for N in (16, 32, 64, 128)}
    assert all(f[N] == 2 * c.flops(N) for N in f)  # the analytic count is the counted one
    # f(N) = a + b N: every doubling adds twice what the previous one added.
    assert f[128] - f[64] == 2 * (f[64] - f[32]) == 4 * (f[32] - f[16]) > 0


def test_unknown_compression_is_rejected():
    with pytest.raises(ValueError, match=r"compression must be none\|mean\|latent, got 'max'"):
        build_compressor(ModalityConfig(8, "max"), D, HEADS)  # type: ignore[arg-type]


def test_folded_media_keys_values_give_the_same_latents_and_gradients():
    """Folding the media key/value projection into the queries is a speed choice only: same outputs and
    same gradients (to float rounding) as projecting every media token, padding included."""
    torch.manual_seed(0)
    c = PerceiverResampler(D_ENC, 64, 4, n_latents=2, n_latent_layers=2)
    assert c.fold_media_kv  # 2 * 4 * 2 = 16 < 64 + 4: the sizes choose the folded path
    emb, mask = events(N=9)
    weights = torch.randn(2, 3, 2, 64, generator=torch.Generator().manual_seed(1))  # a fixed linear loss
    results = {}
    for fold in (True, False):
        c.fold_media_kv = fold
        c.zero_grad()
        out, _ = c(emb, mask)
        (out * weights).sum().backward()
        results[fold] = out, {n: p.grad.clone() for n, p in c.named_parameters()}
    torch.testing.assert_close(results[True][0], results[False][0], rtol=1e-5, atol=1e-5)
    for name, grad in results[False][1].items():  # float32 rounding, relative to each gradient's scale
        assert (results[True][1][name] - grad).abs().max() <= 1e-4 * grad.abs().max(), name
    assert results[True][1]["media_kv.weight"].abs().sum() > 0


def test_the_cheaper_media_path_is_chosen_by_the_sizes():
    assert PerceiverResampler(768, 768, 12, 8, 4).fold_media_kv  # the paper's sizes: 384 < 800
    assert not PerceiverResampler(768, 64, 4, 16, 4).fold_media_kv  # 256 > 128: project once


def test_latent_init_std_sets_the_latents_start_and_is_validated():
    torch.manual_seed(0)
    flamingo = build_compressor(ModalityConfig(D_ENC, "latent", n_latents=64), D, HEADS)  # the default
    torch.manual_seed(0)
    small = build_compressor(ModalityConfig(D_ENC, "latent", n_latents=64, latent_init_std=0.02), D, HEADS)
    assert abs(flamingo.latents.std().item() - 1.0) < 0.1
    assert abs(small.latents.std().item() - 0.02) < 0.003
    torch.testing.assert_close(flamingo.latents * 0.02, small.latents)  # the same draw, scaled
    with pytest.raises(ValueError, match="latent_init_std"):
        ModalityConfig(D_ENC, "latent", latent_init_std=0.0)
