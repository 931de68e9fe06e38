"""The trainer: `mmehr train --config FILE [--set key=value ...] [--resume] [--out DIR]`.

One config file describes one model (one row of the paper's tables): the timelines, which modalities are
on and from which embedding store (hence which frozen encoder), the model and how it is trained. It runs
unchanged in one process or under `torchrun --nproc-per-node N` (DDP: NCCL on GPUs, gloo on CPU; rank 0
writes), and `--resume` continues bit-for-bit from the latest checkpoint.

Determinism: the model is initialised from `run.seed`; the data order is a function of (seed, epoch)
(`mmehr.data.windows`); and before every micro-batch the torch RNG (dropout, modality dropout) is reseeded
from (seed, optimizer step, global micro-batch number). So the randomness of a step does not depend on
what ran before it in this process: a resumed run repeats an uninterrupted one exactly, and N processes
compute the same micro-batches, with the same dropout masks, as one process accumulating them.

Global batch = optim.batch_size windows x optim.grad_accum micro-batches, whatever the number of processes:
each of N processes computes grad_accum / N of them. Each micro-batch's loss is its mean next-token
cross-entropy; a step's gradient is the mean over its micro-batches.

Output directory:

    config.yaml            the resolved config (absolute paths, vocab size, encoder widths)
    metrics.jsonl          one record per log step: step, loss, lr, tokens_per_s, gates; val_loss on eval steps
    checkpoints/step-N/    the latest `run.keep_checkpoints` checkpoints (`mmehr.checkpoint`)
    checkpoints/best/      lowest validation loss so far
    manifest.json          written last: final and best checkpoints, throughput, FLOP/s
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import json
import math
import os
import shutil
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm import tqdm

from mmehr.batch import Batch
from mmehr.checkpoint import (
    CONFIG,
    latest_intact_checkpoint,
    load_config_of,
    load_state,
    load_weights,
    read_weights,
    resolve_checkpoint,
    save_checkpoint,
    sha256_file,
    step_checkpoints,
)
from mmehr.config import save_config, to_dict
from mmehr.data.timelines import TimelineStore
from mmehr.data.windows import TrainWindows, iterate_micro_batches, rank_micro_batches
from mmehr.distributed import Distributed, set_threads
from mmehr.io import MANIFEST, OutputLock, check_output, mark_output, read_manifest, write_json
from mmehr.model.accounting import batch_train_flops, parameter_counts
from mmehr.model.gpt import GPT
from mmehr.runconfig import (
    OptimConfig,
    TrainConfig,
    config_differences,
    finetune_encoders,
    load_train_config,
    modality_stores,
)

# ----------------------------------------------------------------------------------------------------
# Pieces of the trainer


def lr_at(step: int, o: OptimConfig) -> float:
    """Linear warmup over warmup_steps, then cosine from lr to min_lr at max_steps."""
    if step < o.warmup_steps:
        return o.lr * (step + 1) / o.warmup_steps
    progress = (step - o.warmup_steps) / max(1, o.max_steps - o.warmup_steps)
    return o.min_lr + 0.5 * (1.0 + math.cos(math.pi * min(progress, 1.0))) * (o.lr - o.min_lr)


def micro_seed(seed: int, step: int, micro: int) -> int:
    """The torch seed of one micro-batch: a function of (seed, step, global micro-batch number) only."""
    return int(np.random.SeedSequence([seed, step, micro]).generate_state(1, np.uint64)[0] >> 1)


def make_windows(config: TrainConfig, split: str, sampling: str, seed: int) -> TrainWindows:
    d = config.data
    mods = {n: d.modalities[n] for n in config.model.modalities}
    return TrainWindows(
        TimelineStore(d.timelines, split), config.model.block_size, modality_stores(config),
        {n: m.k_max for n, m in mods.items()}, max_tokens={n: m.max_tokens for n, m in mods.items()},
        sampling=sampling, stride=d.stride, seed=seed, pad_to_block=config.run.compile,
        media_retrieval=d.media_retrieval,
    )  # fmt: skip


def init_from(model: GPT, source: str, vocab_sha256: str) -> list[str]:
    """Copy every weight of checkpoint `source` that the model has (same name and shape); the decoder must
    be complete and the vocabularies identical. Returns the names copied."""
    directory = resolve_checkpoint(source, "auto")
    manifest = read_manifest(directory)
    if manifest.get("vocab_sha256") != vocab_sha256:
        raise ValueError(f"train.init_from {directory}: trained on another vocabulary than data.timelines")
    own = model.state_dict()
    weights = {k: v for k, v in read_weights(directory).items() if k in own and own[k].shape == v.shape}
    decoder = {k for k in own if k.startswith("transformer.")} - {"transformer.wte.weight"}
    missing = sorted(decoder - set(weights))
    if not {"transformer.wte.weight", "lm_head.weight"} & set(weights):  # tied: either name holds both
        missing.append("transformer.wte.weight")
    if missing:
        raise ValueError(
            f"train.init_from {directory}: lacks decoder weights of this model, e.g. {missing[:3]}"
        )
    model.load_state_dict(weights, strict=False)
    return sorted(weights)


def freeze_decoder(model: GPT) -> None:
    """Only compression and cross-attention train: the decoder (embeddings, blocks, head) is frozen."""
    for p in [*model.transformer.parameters(), *model.lm_head.parameters()]:
        p.requires_grad_(False)


# ----------------------------------------------------------------------------------------------------
# The trainer


class Trainer:
    """Holds the model, optimizer, data and bookkeeping of one run; `fit()` trains to optim.max_steps."""

    def __init__(self, config: TrainConfig, out: str | Path, *, resume: bool = False, progress: bool = True):
        self.config, self.out, self.progress = config, Path(out).resolve(), progress
        config.run.out = str(self.out)
        r = config.run
        use_cuda = torch.cuda.is_available() and r.device in ("auto", "cuda")
        self.dist = Distributed.setup(use_cuda)
        self.threads = set_threads(r.threads, self.dist.local_world_size)
        self.device = torch.device(
            f"cuda:{self.dist.local_rank}" if use_cuda else r.device if r.device != "auto" else "cpu"
        )
        self.autocast = (
            torch.autocast("cuda", dtype=torch.bfloat16)
            if self.device.type == "cuda" and r.dtype == "bf16"
            else contextlib.nullcontext()
        )
        if config.optim.grad_accum % self.dist.world_size:
            raise ValueError(
                f"optim.grad_accum {config.optim.grad_accum} must be a multiple of the {self.dist.world_size} processes"
            )
        self.vocab_path = Path(config.data.timelines) / "vocab.json"
        self.vocab_sha256 = sha256_file(self.vocab_path)

        encoders = finetune_encoders(config)  # built first: they must not move the model's initialisation
        torch.manual_seed(r.seed)
        self.raw = GPT(config.model, encoders=encoders)
        self.initialised_from: list[str] = []  # names of the tensors copied from train.init_from
        if config.train.init_from:
            self.initialised_from = init_from(self.raw, config.train.init_from, self.vocab_sha256)
        if config.train.freeze_decoder:
            freeze_decoder(self.raw)
        self.raw.to(self.device)
        self.trainable = [p for p in self.raw.parameters() if p.requires_grad]
        o = config.optim
        groups = [g for g in self.raw.param_groups(o.weight_decay) if g["params"]]
        self.optimizer = torch.optim.AdamW(groups, lr=o.lr, betas=(o.beta1, o.beta2))

        self.step, self.tokens_seen, self.train_seconds, self.flops = 0, 0, 0.0, 0.0
        self.best_val, self.best_step, self.bad_evals, self.last_val = math.inf, -1, 0, None
        self.window = [0.0, 0]  # loss sum and steps since the last log record (kept across a resume)
        self.train_windows = make_windows(config, config.data.train_split, config.data.sampling, r.seed)
        self.val_rows, self.val_windows = None, None
        if config.data.val_split:
            self.val_windows = make_windows(config, config.data.val_split, "stride", r.seed)
            self.val_rows = self.val_windows.plan(0)[: r.val_windows]
        self._prepare_out(resume)

        model: torch.nn.Module = torch.compile(self.raw) if r.compile else self.raw
        self.module = model
        if self.dist.enabled:
            # Rows without visible media skip the cross-attention, so parameters may go unused in a step.
            find_unused = self.raw.fusion is not None
            model = torch.nn.parallel.DistributedDataParallel(
                model,
                device_ids=[self.dist.local_rank] if use_cuda else None,
                find_unused_parameters=find_unused,
            )
        self.model = model

    # -- output directory and resume --
    def _prepare_out(self, resume: bool) -> None:
        out, main, d = self.out, self.dist.main, self.config.data
        inputs = [d.timelines, self.config.train.init_from, *(m.store for m in d.modalities.values())]
        check_output(out, "train", inputs=inputs)
        self.dist.barrier()  # every rank has checked `out` before rank 0 marks it
        if main:  # the lock is held until this process ends: a second trainer here fails, naming this one
            mark_output(out, "train")
            self.lock = OutputLock(out, "train")
        latest = next(reversed(step_checkpoints(out)), None)
        if not resume and (latest is not None or (out / MANIFEST).is_file()):
            raise ValueError(
                f"{out} already holds a training run: pass --resume to continue it, or choose another --out"
            )
        latest = latest_intact_checkpoint(out, move_damaged=main) if resume else None
        if latest is not None:
            saved = to_dict(load_config_of(latest))
            diff = config_differences(saved, to_dict(self.config))
            if diff:
                raise ValueError(
                    f"--resume: the config differs from the run's in {diff}; resume with the same config"
                )
            if read_manifest(latest).get("vocab_sha256", self.vocab_sha256) != self.vocab_sha256:
                raise ValueError(
                    f"--resume: {self.vocab_path} is not the vocabulary {latest} was trained with "
                    "(were the timelines tokenized again?)"
                )
            self._restore(latest)
            if main:
                print(f"resuming {out} from {latest.name} (step {self.step})", file=sys.stderr)
        elif resume and main:
            print(f"--resume: {out} has no complete checkpoint; starting from step 0", file=sys.stderr)
        if main:
            for stale in (out / "checkpoints").glob(".*"):  # a checkpoint write cut by a kill
                shutil.rmtree(stale, ignore_errors=True)
            (out / MANIFEST).unlink(missing_ok=True)  # the run is changing: incomplete until the end
            save_config(self.config, out / CONFIG)
            self._truncate_metrics(self.step)
        self.dist.barrier()

    def _restore(self, directory: Path) -> None:
        load_weights(self.raw, directory)
        state = load_state(directory)
        self.optimizer.load_state_dict(state["optimizer"])
        if state["data"]["windows_per_epoch"] != self.train_windows.windows_per_epoch:
            raise ValueError(
                f"--resume: {directory} was trained on other windows than data.timelines now makes"
            )
        self.step, self.tokens_seen, self.flops = (
            int(state["step"]),
            int(state["tokens_seen"]),
            float(state["flops"]),
        )
        self.train_seconds, self.last_val, self.window = (
            float(state["train_seconds"]),
            state["last_val"],
            state["log_window"],
        )
        self.best_val, self.best_step, self.bad_evals = (
            state["best_val"],
            state["best_step"],
            state["bad_evals"],
        )
        torch.set_rng_state(state["rng"]["torch"])

    def _truncate_metrics(self, step: int) -> None:
        path = self.out / "metrics.jsonl"
        if not path.is_file():
            return
        lines = [ln for ln in path.read_text().splitlines() if ln.strip()]
        kept = []
        for ln in lines:
            try:
                if json.loads(ln)["step"] <= step:
                    kept.append(ln)
            except (ValueError, KeyError):  # a line cut by a kill
                continue
        tmp = path.with_name(f".{path.name}.tmp")
        tmp.write_text("".join(f"{ln}\n" for ln in kept))
        os.replace(tmp, path)

    # -- one optimizer step --
    def train_step(self, batches) -> float:
        """Run this process's micro-batches of the current step, then one optimizer step. Returns the step's
        mean loss over all processes, and counts its tokens and FLOPs (all processes)."""
        o, model = self.config.optim, self.model
        lr = lr_at(self.step, o)
        for g in self.optimizer.param_groups:
            g["lr"] = lr * g["lr_scale"]
        micro = rank_micro_batches(self.step, o.grad_accum, self.dist.rank, self.dist.world_size)
        total, tokens, flops = torch.zeros((), device=self.device), 0, 0.0
        for j, m in enumerate(micro):
            batch: Batch = next(batches)
            tokens, flops = tokens + batch.n_tokens, flops + batch_train_flops(self.raw, batch)
            batch = batch.to(self.device, non_blocking=True)
            torch.manual_seed(micro_seed(self.config.run.seed, self.step, m))
            # Without unused-parameter search, skip the gradient all-reduce until the last micro-batch.
            sync = j == len(micro) - 1 or not self.dist.enabled or model.find_unused_parameters
            with contextlib.nullcontext() if sync else model.no_sync():
                with self.autocast:
                    _, loss = model(
                        batch.tokens,
                        batch.times,
                        batch.modalities,
                        targets=batch.targets,
                        loss_mask=batch.loss_mask,
                    )
                (loss / len(micro)).backward()
            total += loss.detach()
        for p in self.trainable:  # a parameter this step never used still counts (as DDP treats it)
            if p.grad is None:
                p.grad = torch.zeros_like(p)
        if o.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(self.trainable, o.grad_clip)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.step += 1
        loss, tokens, flops = self.dist.all_sum([float(total) / len(micro), tokens, flops], self.device)
        self.tokens_seen, self.flops = self.tokens_seen + int(tokens), self.flops + flops
        return loss / self.dist.world_size

    @torch.no_grad()
    def validate(self) -> float | None:
        """Token-weighted mean loss over the fixed validation windows (split across processes)."""
        if self.val_rows is None or len(self.val_rows) == 0:
            return None
        self.module.eval()
        B, loss_sum, count = self.config.optim.batch_size, 0.0, 0.0
        for k in range(self.dist.rank, -(-len(self.val_rows) // B), self.dist.world_size):
            batch = self.val_windows.batch(self.val_rows[k * B : (k + 1) * B]).to(self.device)
            with self.autocast:
                _, loss = self.module(
                    batch.tokens,
                    batch.times,
                    batch.modalities,
                    targets=batch.targets,
                    loss_mask=batch.loss_mask,
                )
            n = float(batch.loss_mask.sum())
            loss_sum, count = loss_sum + float(loss) * n, count + n
        self.module.train()
        loss_sum, count = self.dist.all_sum([loss_sum, count], self.device)
        return loss_sum / max(count, 1.0)

    # -- checkpoints --
    def save(self, name: str) -> Path:
        """Write checkpoints/<name> (rank 0; every process waits for it)."""
        path = self.out / "checkpoints" / name
        if self.dist.main:
            state = {
                "step": self.step,
                "optimizer": self.optimizer.state_dict(),
                "data": {
                    "next_micro_batch": self.step * self.config.optim.grad_accum,
                    "windows_per_epoch": self.train_windows.windows_per_epoch,
                },
                "rng": {"torch": torch.get_rng_state()},
                "tokens_seen": self.tokens_seen,
                "train_seconds": self.train_seconds,
                "flops": self.flops,
                "best_val": self.best_val,
                "best_step": self.best_step,
                "bad_evals": self.bad_evals,
                "last_val": self.last_val,
                "log_window": list(self.window),
            }
            info = {"step": self.step, "val_loss": self.last_val, "timelines": self.config.data.timelines}
            save_checkpoint(path, self.raw, self.config, vocab_path=self.vocab_path, state=state, info=info)
            for old in step_checkpoints(self.out)[: -max(self.config.run.keep_checkpoints, 1)]:
                shutil.rmtree(old, ignore_errors=True)
        self.dist.barrier()
        return path

    def log(self, record: dict[str, Any]) -> None:
        if self.dist.main:
            with open(self.out / "metrics.jsonl", "a") as f:
                f.write(json.dumps(record) + "\n")

    # -- the loop --
    def fit(self) -> dict[str, Any]:
        c, r = self.config, self.config.run
        o = c.optim
        batches = iterate_micro_batches(
            self.train_windows, o.batch_size, o.grad_accum, self.step, rank=self.dist.rank,
            world_size=self.dist.world_size, workers=c.data.workers,
        )  # fmt: skip
        self.module.train()
        bar = tqdm(
            total=o.max_steps,
            initial=self.step,
            unit="step",
            desc="train",
            disable=not (self.progress and self.dist.main),
        )
        window_tokens, window_t = self.tokens_seen, time.perf_counter()
        stopped = None
        while self.step < o.max_steps and stopped is None:
            t0 = time.perf_counter()
            loss = self.train_step(batches)
            if self.device.type == "cuda":
                torch.cuda.synchronize(self.device)
            self.train_seconds += time.perf_counter() - t0
            self.window = [self.window[0] + loss, self.window[1] + 1]
            last = self.step == o.max_steps
            log_now = self.step % r.log_every == 0 or last
            eval_now = (r.eval_every > 0 and self.step % r.eval_every == 0) or last
            if log_now or eval_now:
                record: dict[str, Any] = {"step": self.step}
                if log_now:
                    dt = time.perf_counter() - window_t
                    record |= {"loss": self.window[0] / self.window[1], "lr": lr_at(self.step - 1, o),
                               "tokens_per_s": (self.tokens_seen - window_tokens) / dt, "gates": self.raw.gate_values()}  # fmt: skip
                    self.window, window_tokens, window_t = [0.0, 0], self.tokens_seen, time.perf_counter()
                    bar.set_postfix(loss=f"{record['loss']:.4f}", tok_s=f"{record['tokens_per_s']:,.0f}")
                if eval_now:
                    stopped = self._evaluate(record)
                self.log(record)
            if last or stopped or (r.checkpoint_every and self.step % r.checkpoint_every == 0):
                self.save(f"step-{self.step:07d}")
            bar.update(1)
        bar.close()
        batches.close()
        return self._finish(stopped)

    def _evaluate(self, record: dict[str, Any]) -> str | None:
        """Validate, keep the best checkpoint, and decide on early stopping (same decision on every rank)."""
        val = self.validate()
        if val is None:
            return None
        self.last_val = record["val_loss"] = val
        if val < self.best_val:
            self.best_val, self.best_step, self.bad_evals = val, self.step, 0
            self.save("best")
        else:
            self.bad_evals += 1
        patience = self.config.run.early_stop_patience
        if patience and self.bad_evals >= patience:
            return f"early stop: no validation improvement in {patience} evaluations (best {self.best_val:.4f} at step {self.best_step})"
        return None

    def _finish(self, stopped: str | None) -> dict[str, Any]:
        r = self.config.run
        tokens_per_s = self.tokens_seen / max(self.train_seconds, 1e-9)
        flops_per_s = self.flops / max(self.train_seconds, 1e-9)
        final = step_checkpoints(self.out)[-1].relative_to(self.out) if step_checkpoints(self.out) else None
        best = Path("checkpoints/best") if self.best_step >= 0 else None
        summary = {
            "stage": "train",
            "created_at": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
            "steps": self.step,
            "stopped": stopped or "max_steps",
            "final_checkpoint": str(final),
            "best_checkpoint": str(best) if best else None,
            "best_val_loss": self.best_val if best else None,
            "best_step": self.best_step if best else None,
            "processes": self.dist.world_size,
            "device": str(self.device),
            "threads_per_process": self.threads,
            "tokens": self.tokens_seen,
            "train_seconds": round(self.train_seconds, 3),
            "tokens_per_s": tokens_per_s,
            "model_flops_per_s": flops_per_s,
            "mfu": flops_per_s / (r.peak_tflops * 1e12) if r.peak_tflops > 0 else None,
            "gates": self.raw.gate_values(),
            "parameters": parameter_counts(self.raw),
            "trainable_parameters": sum(p.numel() for p in self.trainable),
            "initialised_from": self.config.train.init_from or None,
            "initialised_tensors": len(self.initialised_from),
        }
        if self.dist.main:
            write_json(self.out / MANIFEST, summary)
            mfu = (
                f", MFU {summary['mfu']:.1%} of {r.peak_tflops:g} TFLOP/s"
                if summary["mfu"] is not None
                else ""
            )
            val = f", best val loss {self.best_val:.4f} (step {self.best_step})" if best else ""
            print(f"{summary['stopped']}: {self.step} steps, {self.tokens_seen:,} tokens in {self.train_seconds:.1f} s: "
                  f"{tokens_per_s:,.0f} tokens/s, {flops_per_s / 1e9:,.2f} GFLOP/s model{mfu}{val}")  # fmt: skip
        self.dist.barrier()
        return summary


def train(
    config: TrainConfig, out: str | Path | None = None, *, resume: bool = False, progress: bool = True
) -> dict[str, Any]:
    """Train to config.optim.max_steps (or an early stop); returns the run summary (also OUT/manifest.json)."""
    trainer = Trainer(config, out or config.run.out, resume=resume, progress=progress)
    return trainer.fit()


# ----------------------------------------------------------------------------------------------------
# command line


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--config", type=Path, help="YAML run config (with --resume: default OUT/config.yaml)"
    )
    parser.add_argument("--set", dest="overrides", nargs="+", action="extend", default=[], metavar="KEY=VALUE",
                        help="override config values, e.g. --set optim.lr=3e-4 data.modalities.cxr.enabled=false")  # fmt: skip
    parser.add_argument("--out", type=Path, help="run directory (default: run.out of the config)")
    parser.add_argument(
        "--resume", action="store_true", help="continue the run in OUT from its latest checkpoint"
    )
    parser.add_argument("--no-progress", action="store_true", help="hide the progress bar")


def run(args: argparse.Namespace) -> int:
    path = args.config
    if path is None:
        if not (args.resume and args.out and (args.out / CONFIG).is_file()):
            raise ValueError("--config is required (or --resume with an --out that holds config.yaml)")
        path = args.out / CONFIG
    config = load_train_config(path, args.overrides)
    # A run's own config.yaml resumes the run it lives in, wherever the run was moved since (its run.out
    # still names where it was trained).
    own = path.name == CONFIG and (path.parent / "checkpoints").is_dir()
    out = Path(args.out or (path.parent if args.resume and own else config.run.out))
    train(config, out, resume=args.resume, progress=not args.no_progress)
    if int(os.environ.get("RANK", 0)) == 0:
        print(f"wrote {out.resolve()} (metrics.jsonl, checkpoints/, manifest.json)")
    return 0
