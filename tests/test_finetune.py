"""Finetuned encoders: model.fusion.modalities.<m>.finetune = last_n:N | lora:R runs the encoder inside the
model on raw payloads of the same events the embedding store holds.

An untrained finetuned model computes what the frozen one computes; the strict time mask and the zero
update for rows without events hold; gradients reach exactly the trainable encoder parameters of every
architecture; a run trains, checkpoints the encoder, resumes bit for bit after SIGKILL and evaluates.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import polars as pl
import pytest
import torch
import yaml
from safetensors.torch import load_file

from mmehr.batch import ModalityInputs
from mmehr.checkpoint import load_model
from mmehr.config import ConfigError
from mmehr.data.timelines import TimelineStore
from mmehr.data.windows import TrainWindows, assemble
from mmehr.io import read_json, write_json
from mmehr.modalities.encode import encode_events
from mmehr.modalities.encoders import get_encoder
from mmehr.modalities.finetune import TrainableEncoder, pool_tokens
from mmehr.modalities.payloads import EventPayloads
from mmehr.modalities.store import EmbeddingStore
from mmehr.model.config import ModalityConfig, ModelConfig, parse_finetune
from mmehr.model.gpt import GPT
from mmehr.runconfig import finetune_encoders, modality_stores, resolve_config

BIN = Path(sys.executable).parent
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1"}
# A tiny BERT with MiniLM's tokenizer (the real MiniLM is the demo's; see README, finetuning).
TEXT = {"random_init": True, "hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 2,
        "intermediate_size": 64, "max_length": 24}  # fmt: skip
TINY = {  # every architecture, tiny (as tests/test_encoders.py)
    "bert": dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64),
    "minilm": dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64),
    "biomedclip": dict(image_size=32, patch_size=8, dim=32, depth=2, heads=2),
    "vit-mae": dict(image_size=32, patch_size=8, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                    intermediate_size=64),
    "ecg-fm": dict(conv_feature_layers="[(16, 2, 2)] * 4", dim=32, depth=2, heads=2, ffn_dim=64, conv_pos=16,
                   conv_pos_groups=4, layer_norm_first=True),
    "csfm": dict(dim=32, depth=2, heads=2, dim_head=16, mlp_dim=64, clean=False),
}  # fmt: skip


@pytest.fixture(scope="module")
def notes(demo_timelines, tmp_path_factory) -> Path:
    """Note events (text in the events table) at token times over every split, and their store made with
    the tiny text encoder; returns the store (its manifest names the events directory)."""
    root = tmp_path_factory.mktemp("finetune_notes")
    words = ["fever", "rigors", "sepsis", "stable", "improving", "pressors", "intubated", "discharged"]
    rows = []
    for split in ("train", "tuning", "held_out"):
        store = TimelineStore(demo_timelines, split)
        for i in range(len(store)):
            _, times = store.timeline(i)
            sid = int(store.subject_ids[i])
            for j, q in enumerate(np.linspace(0, len(times) - 1, 6).astype(int)):
                text = " ".join(words[(sid + j * k) % len(words)] for k in range(1 + (sid + j) % 9))
                rows.append({"subject_id": sid, "time": int(times[q]), "modality": "note",
                             "event_id": f"{sid}-{j}", "payload": "-", "text": text})  # fmt: skip
    (root / "events").mkdir()
    pl.DataFrame(rows).write_parquet(root / "events" / "events.parquet")
    write_json(root / "events" / "manifest.json", {"source": "test"})
    encode_events(root / "events", get_encoder("minilm", **TEXT), root / "store", progress=False)
    return root / "store"


def raw_config(timelines: Path, store: Path, finetune: str = "lora:2", **sections) -> dict:
    cfg = {
        "data": {"timelines": str(timelines),
                 "modalities": {"note": {"store": str(store), "k_max": 2, "encoder_options": TEXT}}},
        "model": {"n_layer": 2, "n_head": 2, "n_embd": 32, "block_size": 40, "dropout": 0.1,
                  "fusion": {"xattn_every": 1, "gate_init": 0.0,
                             "modalities": {"note": {"compression": "latent", "n_latents": 2, "n_latent_layers": 1,
                                                     "finetune": finetune, "finetune_lr_scale": 1.0,
                                                     "latent_init_std": 0.02}}}},  # media-sensitive at init
        "optim": {"lr": 3e-3, "min_lr": 3e-4, "warmup_steps": 2, "max_steps": 12, "batch_size": 4, "grad_accum": 2},
        "run": {"seed": 0, "threads": 1, "log_every": 3, "eval_every": 6, "val_windows": 4, "checkpoint_every": 3},
    }  # fmt: skip
    for section, values in sections.items():
        cfg[section] = {**cfg.get(section, {}), **values}
    return cfg


# --------------------------------------------------------------------------------------------------
# The option


def test_finetune_option_spellings_and_errors(notes, demo_timelines, tmp_path):
    assert parse_finetune("frozen") == ("frozen", 0)
    assert parse_finetune("last_n:2") == parse_finetune({"last_n": 2}) == ("last_n", 2)
    assert parse_finetune({"lora": "8"}) == ("lora", 8)
    assert ModalityConfig(d_enc=8, finetune={"lora": 4}).finetune == "lora:4"
    for bad in ("lora", "last_n:0", "frozen:2", "adapters:4", {"lora": "x"}):
        with pytest.raises(ValueError, match="finetune"):
            parse_finetune(bad)
    with pytest.raises(ConfigError, match=r"model.fusion.modalities.note: finetune"):
        resolve_config(raw_config(demo_timelines, notes, finetune="lora:zero"))
    # a store that does not record its events directory needs data.modalities.note.events
    store = tmp_path / "store"
    store.mkdir()
    for f in ("index.parquet", "settings.json"):
        (store / f).write_bytes((notes / f).read_bytes())
    write_json(
        store / "manifest.json",
        {k: v for k, v in read_json(notes / "manifest.json").items() if k != "events_dir"},
    )
    with pytest.raises(ConfigError, match=r"data.modalities.note.events"):
        resolve_config(raw_config(demo_timelines, store))
    # the encoder must be the store's: other options give another checksum
    cfg = resolve_config(raw_config(demo_timelines, notes))
    cfg.data.modalities["note"].encoder_options = {**TEXT, "num_hidden_layers": 1}
    with pytest.raises(ValueError, match=r"not the one .* was encoded with \(weights checksum"):
        finetune_encoders(cfg)


# --------------------------------------------------------------------------------------------------
# Same events, same function at step 0; time mask; zero update


def _batches(config, demo_timelines, notes):
    store = TimelineStore(demo_timelines, "train")
    frozen = TrainWindows(store, 40, {"note": EmbeddingStore(notes)}, 2).micro_batch(0, 6)
    payloads = TrainWindows(store, 40, modality_stores(config), 2).micro_batch(0, 6)
    return frozen, payloads


@pytest.mark.parametrize("finetune", ["lora:2", "last_n:1"])
def test_an_untrained_finetuned_model_computes_the_frozen_one(finetune, notes, demo_timelines):
    config = resolve_config(raw_config(demo_timelines, notes, finetune=finetune))
    frozen_config = resolve_config(raw_config(demo_timelines, notes, finetune="frozen"))
    frozen_batch, batch = _batches(config, demo_timelines, notes)
    f, p = frozen_batch.modalities["note"], batch.modalities["note"]
    assert p.emb is None and set(p.payload) == {"input_ids", "attention_mask", "token_type_ids"}
    assert torch.equal(f.event_time, p.event_time) and torch.equal(f.event_mask, p.event_mask)  # same events
    assert int(p.event_mask.sum()) >= 4
    encoders = finetune_encoders(config)
    torch.manual_seed(0)
    tuned = GPT(config.model, encoders=encoders).eval()
    torch.manual_seed(0)
    plain = GPT(frozen_config.model).eval()
    assert set(tuned.state_dict()) - set(plain.state_dict()) == {
        k for k in tuned.state_dict() if k.startswith("fusion.encoders.")
    }
    with torch.no_grad():
        a, _ = tuned(batch.tokens, batch.times, batch.modalities)
        b, _ = plain(frozen_batch.tokens, frozen_batch.times, frozen_batch.modalities)
    torch.testing.assert_close(a, b, atol=2e-3, rtol=0)  # the store holds fp16
    assert not torch.equal(a, plain(batch.tokens, batch.times)[0])  # the notes do change the output


@pytest.fixture(scope="module")
def tuned(notes, demo_timelines):
    config = resolve_config(raw_config(demo_timelines, notes))
    encoders = finetune_encoders(config)  # built first, as the trainer does: they do not move the init
    torch.manual_seed(0)
    model = GPT(config.model, encoders=encoders).eval()
    with torch.no_grad():  # LoRA starts as the identity; move it so that the adapters take part
        for name, p in model.fusion.encoders.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.5)
    store = TimelineStore(demo_timelines, "train")
    spans = []  # windows around each subject's 3rd note (notes sit at token positions linspace(0, L - 1, 6))
    for i in range(4):
        q = int(np.linspace(0, int(store.lengths[i]) - 1, 6).astype(int)[2])
        spans.append((i, max(0, q - 15), min(int(store.lengths[i]), q + 15)))
    batch = assemble(store, spans, modality_stores(config), 2, last_is_target=True)
    return config, model, batch


def test_a_changed_note_changes_nothing_at_or_before_its_time(tuned):
    _, model, batch = tuned
    p = batch.modalities["note"]
    inside = [  # an event acquired inside its row's window: tokens before and after it
        (int(b), int(j)) for b, j in torch.nonzero(p.event_mask)
        if batch.times[b, 0] <= p.event_time[b, j] < batch.times[b, batch.lengths[b] - 1]
    ]  # fmt: skip
    assert inside
    b, j = inside[0]
    changed = {k: v.clone() for k, v in p.payload.items()}
    n = int(changed["attention_mask"][b, j].sum())
    changed["input_ids"][b, j, 1 : n - 1] = 2000 + torch.arange(n - 2)  # other words, same length
    other = {"note": ModalityInputs(None, None, p.event_time, p.event_mask, changed)}
    with torch.no_grad():
        base, _ = model(batch.tokens, batch.times, batch.modalities)
        alt, _ = model(batch.tokens, batch.times, other)
    t = p.event_time[b, j]
    before = batch.times[b] <= t
    assert before.any() and (~before).any()
    assert torch.equal(base[b, before], alt[b, before])  # the strict mask: equal times see nothing
    assert (base[b, ~before] - alt[b, ~before]).abs().max() > 1e-4
    others = torch.arange(len(batch)) != b
    assert torch.equal(base[others], alt[others])


def test_a_row_without_events_gets_exactly_the_ehr_only_output(tuned):
    config, model, batch = tuned
    p = batch.modalities["note"]
    mask = p.event_mask.clone()
    mask[0] = False
    hidden = {"note": ModalityInputs(None, None, p.event_time, mask, p.payload)}
    torch.manual_seed(0)
    ehr_only = GPT(ModelConfig(**{**config.model.__dict__, "fusion": {}})).eval()
    with torch.no_grad():
        out, _ = model(batch.tokens, batch.times, hidden)
        ref, _ = ehr_only(batch.tokens, batch.times)
    assert torch.equal(out[0], ref[0]) and not torch.equal(out[1:], ref[1:])


# --------------------------------------------------------------------------------------------------
# Every architecture: what trains, and the step-0 features


def _payloads(name: str) -> list:
    rng = np.random.default_rng(0)
    if name in ("biomedclip", "vit-mae"):
        return [rng.integers(0, 256, shape, dtype=np.uint8) for shape in [(40, 36), (32, 32)]]
    if name in ("ecg-fm", "csfm"):
        return [(rng.standard_normal((12, 5000)).astype(np.float32), 500.0),
                (rng.standard_normal((12, 2600)).astype(np.float32), 250.0)]  # fmt: skip
    return ["sepsis and shock", "stable, improving " * 4]


@pytest.mark.parametrize("mode", ["last_n:1", "lora:2"])
@pytest.mark.parametrize("name", list(TINY))
def test_gradients_reach_exactly_the_trainable_encoder_parameters(name, mode):
    frozen = get_encoder(name, random_init=True, **TINY[name])
    payloads = _payloads(name)
    ref, ref_mask = frozen.encode(payloads)
    m, n = parse_finetune(mode)
    enc = TrainableEncoder(get_encoder(name, random_init=True, **TINY[name]), m, n, seed=0)
    inputs = frozen.prepare(payloads)
    enc.train()
    assert not enc.model.training  # dropout stays off
    emb, mask = enc(**inputs)
    torch.testing.assert_close(emb.detach(), ref, atol=1e-5, rtol=1e-5)  # step 0: the frozen features
    assert torch.equal(mask, ref_mask)
    (emb * torch.randn_like(emb)).sum().backward()
    grads = {k for k, p in enc.named_parameters() if p.grad is not None}
    nonzero = {k for k, p in enc.named_parameters() if p.grad is not None and p.grad.abs().sum() > 0}
    trainable = {k for k, p in enc.named_parameters() if p.requires_grad}
    assert grads == trainable and trainable
    # LoRA's B starts at 0, so only B gets a gradient at step 0 (A's is B^T-scaled); last_n: every one
    assert nonzero == ({k for k in trainable if "lora_B" in k} if m == "lora" else trainable)
    blocks = frozen.blocks.split(".")[-1]
    if m == "lora":
        assert all("lora_" in k for k in trainable) and all(f".{blocks}." in k for k in trainable)
    else:
        last = len([k for k in dict(frozen.model.named_modules()) if k.count(".") == frozen.blocks.count(".") + 1 and k.startswith(frozen.blocks + ".")]) - 1  # fmt: skip
        after = tuple(f"model.{a}." for a in frozen.after_blocks)
        assert all(k.startswith(f"model.{frozen.blocks}.{last}.") or k.startswith(after) for k in trainable)
        assert any(k.startswith(f"model.{frozen.blocks}.{last}.") for k in trainable)
    # inside a model: payload tensors (B, K, ...) for two rows, one event each
    modality = {"d_enc": frozen.d_enc, "compression": "mean", "finetune": mode}
    fusion = {"xattn_every": 1, "gate_init": 0.0, "modalities": {"m": modality}}
    config = ModelConfig(n_layer=1, n_head=2, n_embd=16, block_size=8, vocab_size=20, fusion=fusion)
    model = GPT(config, encoders={"m": enc})
    payload = {k: v[:, None] for k, v in inputs.items()}
    media = ModalityInputs(
        None, None, torch.zeros(2, 1, dtype=torch.long), torch.ones(2, 1, dtype=torch.bool), payload
    )
    tokens = torch.randint(1, 20, (2, 8))
    _, loss = model(
        tokens,
        torch.ones(2, 8, dtype=torch.long),
        {"m": media},
        targets=tokens,
        loss_mask=torch.ones(2, 8, dtype=torch.bool),
    )
    loss.backward()
    assert all(p.grad is not None for p in enc.parameters() if p.requires_grad)


def test_pooling_matches_the_stores_pooling():
    from mmehr.modalities.encode import pool_tokens as store_pool

    emb = torch.randn(2, 11, 4)
    mask = torch.tensor([[True] * 11, [True] * 6 + [False] * 5])
    pooled, pmask = pool_tokens(emb, mask, 3, n_prefix=1)
    for e in range(2):
        n = int(mask[e].sum())
        ref = store_pool(emb[e, :n].numpy(), 3, 1)
        assert int(pmask[e].sum()) == len(ref)
        np.testing.assert_allclose(pooled[e, : len(ref)].numpy(), ref, atol=1e-6)


def test_event_payloads_prepare_each_event_once(notes):
    enc = get_encoder("minilm", **TEXT)
    calls = []
    prepare = enc.prepare
    enc.prepare = lambda texts: calls.append(len(texts)) or prepare(texts)
    source = EventPayloads(notes, enc)
    store = EmbeddingStore(notes)
    sid, t = int(store.subject[10]), int(store.time[10]) + 1
    first = source.fetch([sid, sid], [t, t], 3)
    again = source.fetch([sid], [t], 3)
    assert len(calls) == int(first.event_mask[0].sum())  # each event prepared once, then cached
    assert torch.equal(again.payload["input_ids"][0], first.payload["input_ids"][0])
    _, _, times, present = store.fetch([sid], [t], 3)
    assert np.array_equal(first.event_time[0].numpy(), times[0]) and np.array_equal(
        first.event_mask[0].numpy(), present[0]
    )
    text = source.rows.row(int(store.rows_before(sid, t, 1)[0]), named=True)["text"]
    ids = enc.prepare([text])["input_ids"][0]
    assert torch.equal(first.payload["input_ids"][0, 0, : len(ids)], ids)


# --------------------------------------------------------------------------------------------------
# A run: trains, checkpoints the encoder, resumes bit for bit after SIGKILL, evaluates


def test_a_finetuned_run_resumes_after_sigkill_and_evaluates(notes, demo_timelines, tmp_path):
    cfg = tmp_path / "c.yaml"
    cfg.write_text(yaml.safe_dump(raw_config(demo_timelines, notes)))
    mmehr = str(BIN / "mmehr")
    run = lambda *a: subprocess.run([mmehr, *a], env=ENV, capture_output=True, text=True)  # noqa: E731
    full = run("train", "--config", str(cfg), "--out", str(tmp_path / "a"), "--no-progress")
    assert full.returncode == 0, full.stderr[-3000:]

    proc = subprocess.Popen([mmehr, "train", "--config", str(cfg), "--out", str(tmp_path / "b"), "--no-progress"],
                            env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)  # fmt: skip
    first = tmp_path / "b" / "checkpoints" / "step-0000003" / "manifest.json"
    deadline = time.monotonic() + 300
    while not first.exists() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.002)
    assert proc.poll() is None, "the run ended before it could be killed"
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (tmp_path / "b" / "manifest.json").exists()
    resumed = run("train", "--config", str(cfg), "--out", str(tmp_path / "b"), "--resume", "--no-progress")
    assert resumed.returncode == 0 and "resuming" in resumed.stderr, resumed.stderr[-3000:]

    final = read_json(tmp_path / "a" / "manifest.json")["final_checkpoint"]
    a, b = (load_file(str(tmp_path / r / final / "model.safetensors")) for r in ("a", "b"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)  # bit for bit
    lora = [k for k in a if k.startswith("fusion.encoders.note.") and "lora_B" in k]
    assert lora and all(a[k].abs().max() > 0 for k in lora)  # the adapters trained (they start at 0)
    base = [k for k in a if k.startswith("fusion.encoders.note.") and "lora_" not in k]
    initial = finetune_encoders(resolve_config(raw_config(demo_timelines, notes)))["note"].state_dict()
    assert all(
        torch.equal(a[k], initial[k.removeprefix("fusion.encoders.note.")]) for k in base
    )  # frozen base
    manifest = read_json(tmp_path / "a" / "manifest.json")
    counts = manifest["parameters"]
    adapters = sum(v.numel() for k, v in a.items() if k.startswith("fusion.encoders.") and "lora_" in k)
    assert counts["encoders"] > adapters > 0  # of the encoder, only the adapters train
    assert manifest["trainable_parameters"] == counts["total"] - counts["encoders"] + adapters

    model, config = load_model(tmp_path / "a", which="final")
    assert config.model.modalities["note"].finetune == "lora:2"
    assert all(torch.equal(model.state_dict()[k], v) for k, v in a.items())

    out = tmp_path / "eval"
    proc = run("evaluate", "--checkpoint", str(tmp_path / "a"), "--task", "icu_mortality", "--out", str(out),
               "--rollouts", "2", "--max-new-tokens", "256", "--max-samples", "4", "--tuning-samples", "3",
               "--bootstrap", "10", "--no-progress", "--threads", "1")  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert pl.read_parquet(out / "icu_mortality" / "samples.parquet").height == 4
    pred = pl.read_parquet(out / "icu_mortality" / "predictions.parquet")  # samples with a counted rollout
    assert 1 <= pred.height <= 4 and pred["predicted_boolean_probability"].is_between(0, 1).all()


def test_ecg_payloads_reach_a_finetuned_ecg_fm_inside_the_model(tmp_path):
    """Waveform events: the store's events come back as ECG-FM segments (B, K, S, 12, 2500) with their
    segment mask, and the model trains through the encoder on them."""
    rng = np.random.default_rng(0)
    signals = {
        f"e{i}": rng.standard_normal((12, n)).astype(np.float32) for i, n in enumerate([5000, 2600, 5000])
    }
    rows = [{"subject_id": 7, "time": 1000 * (i + 1), "modality": "ecg", "event_id": k, "payload": k}
            for i, k in enumerate(signals)]  # fmt: skip
    (tmp_path / "events").mkdir()
    pl.DataFrame(rows).write_parquet(tmp_path / "events" / "events.parquet")
    write_json(tmp_path / "events" / "manifest.json", {"source": "test"})
    load = lambda _, row: (signals[row["payload"]], 500.0)  # noqa: E731
    enc = get_encoder("ecg-fm", random_init=True, **TINY["ecg-fm"])
    encode_events(tmp_path / "events", enc, tmp_path / "store", load_payload=load, progress=False, workers=0)
    source = EventPayloads(tmp_path / "store", enc, load_payload=load)
    inputs = source.fetch([7, 7, 8], [1500, 3500, 3500], 2)  # subject 8 has no ECG
    assert inputs.event_mask.tolist() == [[True, False], [True, True], [False, False]]
    assert inputs.payload["segments"].shape == (3, 2, 2, 12, 2500)
    assert inputs.payload["segment_mask"][1].tolist() == [[True, True], [True, False]]  # 5.2 s: one segment
    ref = enc.prepare([(signals["e2"], 500.0)])["segments"][0]
    assert torch.equal(inputs.payload["segments"][1, 0], ref)  # most recent first
    stored, _, _, _ = EmbeddingStore(tmp_path / "store").fetch([7], [3500], 2)
    trainable = TrainableEncoder(get_encoder("ecg-fm", random_init=True, **TINY["ecg-fm"]), "last_n", 1)
    emb, mask = trainable(**{k: v[1] for k, v in inputs.payload.items()})
    n = int(mask[0].sum())
    assert n == 312 and int(mask[1].sum()) == 156
    np.testing.assert_allclose(emb[0, :n].detach().numpy(), stored[0, 0, :n].astype(np.float32), atol=5e-3)
