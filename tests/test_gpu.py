"""What only a CUDA device can show: bf16 autocast, the CUDA SDPA kernels under the strict time mask, the
KV cache in bf16, torch.compile with inductor, NCCL, and the trainer and sampler on the device.

Marked `gpu` and skipped without CUDA (`pytest -m gpu tests/test_gpu.py`; `benchmarks/gpu_check.py` runs
them). MMEHR_GPU_TEST_DEVICE=cpu runs the same checks on CPU under CPU bf16 autocast, to develop them.
bf16 carries ~3 significant digits: tolerances are relative to each output's scale; a leak or a broken
mask moves outputs by far more (each test also shows that its perturbation is seen where it should be).
"""

from __future__ import annotations

import dataclasses
import os
import socket

import numpy as np
import pytest
import torch

from mmehr.batch import Batch, ModalityInputs
from mmehr.model.config import FusionConfig, ModalityConfig, ModelConfig
from mmehr.model.gpt import GPT

DEVICE = os.environ.get("MMEHR_GPU_TEST_DEVICE", "cuda")
pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(
        DEVICE.startswith("cuda") and not torch.cuda.is_available(), reason="needs a CUDA device"
    ),
]
V, HOUR, T0 = 512, 3_600_000_000, 1_600_000_000_000_000


def autocast():
    return torch.autocast(torch.device(DEVICE).type, dtype=torch.bfloat16)


def model(compression: str = "latent", *, block: int = 96, gate: float = 0.0, n_layer: int = 4) -> GPT:
    """4 x 128 GPT, a cross-attention block before every layer, ECG-like and note-like modalities.

    The latents start at std 0.02, not the default 1: at std 1 the Perceiver's layers (output projections
    at std 0.02) barely move them at initialisation, so what the media hold hardly reaches the decoder and
    a perturbation of the media is not seen (measured on an H200: 5x the tolerance, not 10x). These tests
    are about masks and numerics, which need the media to be read."""
    mods = {
        name: ModalityConfig(
            d_enc=64, compression=compression, n_latents=8, n_latent_layers=2, latent_init_std=0.02
        )
        for name in ("ecg", "note")
    }
    fusion = FusionConfig(modalities=mods, xattn_every=1, gate="tanh")
    torch.manual_seed(0)
    m = GPT(ModelConfig(vocab_size=V, n_layer=n_layer, n_head=4, n_embd=128, block_size=block, fusion=fusion))
    for b in m.fusion.xattn.values():
        b.gate.data.fill_(gate)
    return m.to(DEVICE).eval()


def ehr_only(m: GPT) -> GPT:
    ehr = GPT(dataclasses.replace(m.config, fusion=FusionConfig()))
    ehr.load_state_dict(m.state_dict(), strict=False)
    return ehr.to(DEVICE).eval()


def inputs(B: int = 3, T: int = 64, seed: int = 0, event_hours=(5.5, 20.0, 40.0)):
    """Tokens one hour apart; per modality events at `event_hours` (row 2 has none: it sees nothing)."""
    g = torch.Generator().manual_seed(seed)
    tokens = torch.randint(1, V, (B, T), generator=g)
    times = T0 + torch.arange(T).expand(B, T) * HOUR
    K = len(event_hours)
    mods = {}
    for name, N in (("ecg", 24), ("note", 40)):
        event_time = T0 + (torch.tensor(event_hours, dtype=torch.float64) * HOUR).long().expand(B, K).clone()
        present = torch.ones(B, K, dtype=torch.bool)
        present[2] = False
        token_mask = torch.ones(B, K, N, dtype=torch.bool)
        token_mask[0, 0, N // 2 :] = False
        emb = torch.randn(B, K, N, 64, generator=g).half()
        mods[name] = ModalityInputs(emb, token_mask, event_time, present)
    return tokens.to(DEVICE), times.to(DEVICE), {k: v.to(DEVICE) for k, v in mods.items()}


def scale(x: torch.Tensor) -> float:
    return float(x.detach().float().abs().max())


def logits_of(m: GPT, tokens, times, mods) -> torch.Tensor:
    with torch.no_grad(), autocast():
        return m(tokens, times, mods)[0].float()


@pytest.mark.parametrize("compression", ["none", "mean", "latent"])
def test_perturbing_events_at_or_after_a_token_changes_nothing_before_it_in_bf16(compression):
    m = model(compression, gate=1.0)
    tokens, times, mods = inputs()
    base = logits_of(m, tokens, times, mods)
    later = {}
    for name, x in mods.items():  # the events at 20 h and 40 h: tokens 0..20 must not see them
        emb = x.emb.clone()
        emb[:, 1:] = 100 * torch.randn_like(emb[:, 1:].float()).half()
        later[name] = ModalityInputs(emb, x.token_mask, x.event_time, x.event_mask)
    out = logits_of(m, tokens, times, later)
    tol = 1e-3 * scale(base)
    assert (out[:, :21] - base[:, :21]).abs().max() <= tol  # token 20 is at exactly 20 h: strict mask
    assert (out[:2, 21:] - base[:2, 21:]).abs().max() > 10 * tol  # after the event it is seen
    torch.testing.assert_close(out[2], base[2], rtol=0, atol=tol)  # row 2 has no events at all


@pytest.mark.parametrize("compression", ["none", "latent"])
def test_rows_without_visible_media_and_closed_gates_compute_the_ehr_only_decoder_in_bf16(compression):
    m = model(compression, gate=1.0)
    tokens, times, mods = inputs()
    ehr = logits_of(ehr_only(m), tokens, times, None)
    mm = logits_of(m, tokens, times, mods)
    tol = 1e-3 * scale(ehr)
    assert (mm[:, :6] - ehr[:, :6]).abs().max() <= tol  # before the first event (5.5 h): a zero update
    assert (mm[2] - ehr[2]).abs().max() <= tol  # a row without events
    assert (mm[:2, 6:] - ehr[:2, 6:]).abs().max() > 10 * tol  # open gates, visible events: it differs
    closed = model(compression, gate=0.0)  # tanh(0) = 0: every gate closed
    torch.testing.assert_close(logits_of(closed, tokens, times, mods), ehr, rtol=0, atol=tol)


def test_bf16_kv_cache_decoding_matches_recomputation_through_fan_out_and_slides():
    from mmehr.evaluate.sampler import CachedStepper, RecomputeStepper

    m = model("latent", gate=1.0, block=64)
    tokens, times, mods = inputs(T=48)
    lengths = torch.tensor([48, 40, 33], device=DEVICE)
    prefix = torch.full((3,), 4, device=DEVICE)
    with torch.no_grad(), autocast():
        media = m.encode_media(mods, 3)
        cached = CachedStepper(m, 3, max_len=64, dtype=torch.bfloat16)
        full = RecomputeStepper(m, 3, max_len=64)
        a = cached.prefill(tokens, times, lengths, prefix, media).float()
        b = full.prefill(tokens, times, lengths, prefix, media).float()
        worst = (a - b).abs().max() / scale(b)
        fan = torch.tensor([0, 0, 1, 2, 2], device=DEVICE)
        cached.keep(fan)
        full.keep(fan)
        g = torch.Generator().manual_seed(0)
        for step in range(30):  # row 0 (48 + 30 > 64) slides
            tok = torch.randint(1, V, (5, 1), generator=g).to(DEVICE)
            tim = torch.full((5, 1), T0 + (60 + step) * HOUR, device=DEVICE)
            a, b = cached.step(tok, tim).float(), full.step(tok, tim).float()
            worst = max(worst, float((a - b).abs().max()) / scale(b))
    assert int(cached.cache.lengths.max()) < 48 + 30  # it slid
    assert worst < 0.05, f"bf16 cache vs recomputation: max relative difference {worst:.3g}"


def test_torch_compile_matches_eager_and_trains():
    m = model("latent", gate=1.0).train()
    tokens, times, mods = inputs()
    backend = "inductor" if DEVICE.startswith("cuda") else "aot_eager"
    compiled = torch.compile(m, backend=backend)
    with autocast():
        eager_logits, eager_loss = m(tokens, times, mods, targets=tokens.roll(-1, 1))
        logits, loss = compiled(tokens, times, mods, targets=tokens.roll(-1, 1))
    assert (logits.float() - eager_logits.float()).abs().max() <= 0.02 * scale(eager_logits)
    loss.backward()
    grads = [p.grad for p in m.parameters() if p.requires_grad]
    assert all(g is not None and torch.isfinite(g).all() for g in grads)
    assert abs(float(loss) - float(eager_loss)) < 0.01 * float(eager_loss)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_one_process_nccl_ddp_step_equals_the_plain_step():
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel

    backend = "nccl" if DEVICE.startswith("cuda") else "gloo"
    dist.init_process_group(backend, init_method=f"tcp://127.0.0.1:{free_port()}", rank=0, world_size=1)
    try:
        plain, wrapped = model("latent", gate=1.0).train(), model("latent", gate=1.0).train()
        ddp = DistributedDataParallel(wrapped, device_ids=[torch.device(DEVICE).index or 0] if backend == "nccl" else None,
                                      find_unused_parameters=True)  # fmt: skip
        tokens, times, mods = inputs()
        for net in (plain, ddp):
            with autocast():
                _, loss = net(tokens, times, mods, targets=tokens.roll(-1, 1))
            loss.backward()
        for (name, p), q in zip(plain.named_parameters(), wrapped.parameters()):
            torch.testing.assert_close(q.grad, p.grad, rtol=1e-4, atol=1e-6, msg=name)
        total = torch.tensor([1.5, 2.0], device=DEVICE)
        dist.all_reduce(total)
        assert total.tolist() == [1.5, 2.0]
    finally:
        dist.destroy_process_group()


def test_rollouts_in_bf16_never_emit_banned_ids_and_count_every_token():
    from mmehr.evaluate.sampler import RolloutRules, SamplerSettings, sample_rollouts

    m = model("latent", gate=1.0, block=64)
    tokens, times, mods = inputs(T=48)
    rows = [(tokens[i].cpu().numpy(), times[i].cpu().numpy()) for i in range(3)]
    batch = Batch.from_contexts(rows, [4] * 3, modalities={k: v.to("cpu") for k, v in mods.items()})
    allowed = torch.ones(V, dtype=torch.bool, device=DEVICE)
    allowed[:10] = False
    none = torch.zeros(V, dtype=torch.bool, device=DEVICE)
    rules = RolloutRules(
        allowed, none, none.clone(), -1, torch.zeros(V, dtype=torch.long, device=DEVICE), 2**62
    )
    settings = SamplerSettings(n_rollouts=5, max_new_tokens=24, batch_rows=15)
    with torch.no_grad(), autocast():
        out = sample_rollouts(m, batch, rules, settings, trace=True, cache_dtype=torch.bfloat16,
                              generator=torch.Generator(DEVICE).manual_seed(0))  # fmt: skip
    assert out.stats["generated_tokens"] == 3 * 5 * 24
    assert out.tokens.min() >= 10 and out.tokens.max() < V
    assert len(np.unique(out.tokens)) > 50  # sampled, not stuck


def test_trainer_trains_on_the_device_in_bf16(demo_timelines, tmp_path):
    from mmehr.runconfig import resolve_config
    from mmehr.train import train

    cfg = {
        "data": {"timelines": str(demo_timelines)},
        "model": {"n_layer": 2, "n_head": 2, "n_embd": 64, "block_size": 64},
        "optim": {"lr": 3e-3, "min_lr": 3e-4, "warmup_steps": 2, "max_steps": 30, "batch_size": 8},
        "run": {"seed": 0, "device": DEVICE, "dtype": "bf16", "log_every": 10, "eval_every": 15, "val_windows": 16,
                "checkpoint_every": 15},
    }  # fmt: skip
    summary = train(resolve_config(cfg), tmp_path / "run", progress=False)
    assert summary["device"].startswith(torch.device(DEVICE).type)
    import json

    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    losses = [r["loss"] for r in rows if "loss" in r]
    assert np.isfinite(losses).all() and losses[-1] < losses[0] - 1.0
