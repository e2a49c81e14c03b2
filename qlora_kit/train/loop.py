"""``qlora-kit train``: one explicit training loop from a validated recipe to a PEFT adapter.

Order of work: plan the recipe on the detected device (refuse when it will not fit), read and
tokenize the data, load the base quantized, prepare it and add LoRA, then train with gradient
accumulation, logging, evaluation and atomic checkpoints. Ctrl-C saves a checkpoint at the last
finished step. The final adapter is written in peft's format with ``qlora_kit.json`` (what
``export`` needs), which is written last: its presence means the run completed.

This module reports through a :class:`Reporter` and never prints.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import torch

from qlora_kit.adapter import METADATA_FILE, config_fingerprint
from qlora_kit.errors import QloraKitError, UsageError
from qlora_kit.recipe import Recipe
from qlora_kit.train import checkpoint, distributed

METRICS_FILE = "metrics.jsonl"


class Reporter(Protocol):
    def message(self, text: str) -> None: ...
    def start(self, total_steps: int, start_step: int) -> None: ...
    def step(self, metrics: dict[str, Any]) -> None: ...
    def finish(self, summary: dict[str, Any]) -> None: ...


class Interrupted(QloraKitError):
    """Ctrl-C: a checkpoint was saved; ``--resume`` continues."""

    exit_code = 130


@dataclass
class Device:
    kind: str  # "cuda" or "cpu"
    name: str
    memory_bytes: int


def detect_device() -> Device:
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        return Device("cuda", props.name, props.total_memory)
    return Device("cpu", "CPU", 0)


def check_fits(recipe: Recipe, model_dir: str, device: Device, reporter: Reporter, force: bool) -> None:
    """Plan the recipe on the detected GPU before any weights load; refuse when it will not fit."""
    from qlora_kit.catalog.gpus import DeviceSpec
    from qlora_kit.catalog.models import resolve_model
    from qlora_kit.plan.recipes import to_constraints
    from qlora_kit.plan.search import plan

    if device.kind != "cuda":
        reporter.message("no CUDA GPU found: training on the CPU (fine for the tiny demo, slow for real models)")
        return
    arch = resolve_model(model_dir)
    spec = DeviceSpec(device.name, device.memory_bytes, torch.cuda.is_bf16_supported())
    result = plan(arch, spec, to_constraints(recipe))
    est = result.best.estimate
    reporter.message(
        f"plan: {est.device_bytes / 2**30:.2f} GiB of {device.memory_bytes / 2**30:.2f} GiB on "
        f"{device.name} (peak allocated {est.peak_allocated_bytes / 2**30:.2f} GiB)"
    )
    if not result.fits and not force:
        raise UsageError(
            f"the recipe needs about {est.device_bytes / 2**30:.1f} GiB on {device.name}, which has "
            f"{device.memory_bytes / 2**30:.1f} GiB",
            "run `qlora-kit plan --recipe` for settings that fit, or pass --force to try anyway",
        )


def _optimizer(name: str, params: list[torch.nn.Parameter], lr: float, weight_decay: float) -> Any:
    if name == "adamw":
        return torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)
    import bitsandbytes as bnb

    cls = {
        "adamw8bit": bnb.optim.AdamW8bit,
        "paged_adamw": bnb.optim.PagedAdamW,
        "paged_adamw8bit": bnb.optim.PagedAdamW8bit,
    }[name]
    return cls(params, lr=lr, weight_decay=weight_decay)


def _to(batch: dict[str, Any], device: str) -> dict[str, Any]:
    return {k: v.to(device) for k, v in batch.items() if v is not None}


def _autocast(recipe: Recipe, device: Device) -> Any:
    """16-bit autocast for a k-bit-prepared base on a GPU (what the planner models)."""
    from contextlib import nullcontext

    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(recipe.quant.compute_dtype)
    if device.kind == "cuda" and recipe.quant.mode != "none" and dtype is not None:
        return torch.autocast("cuda", dtype=dtype)
    return nullcontext()


def evaluate(
    model: Any, batches: Iterator[dict[str, Any]], n_batches: int, device: str, chunked: bool = False
) -> float:
    """Mean token loss over ``n_batches`` batches (token-weighted); ``chunked`` as in training, so an
    evaluation never holds the full logits a chunked-loss run was planned without."""
    from qlora_kit.model.savers import causal_lm_loss

    model.eval()
    total, tokens = 0.0, 0
    with torch.no_grad():
        for _ in range(n_batches):
            batch = _to(next(batches), device)
            n = int((batch["labels"][:, 1:] != -100).sum())
            total += float(causal_lm_loss(model, batch, chunked)) * n
            tokens += n
    model.train()
    return total / max(tokens, 1)


def _total_steps(recipe: Recipe, epoch_batches: int) -> int:
    t = recipe.train
    if t.max_steps:
        return t.max_steps
    return max(1, math.ceil(t.epochs * epoch_batches / t.grad_accum))


def _prepare_output(output_dir: Path, resume: bool, force: bool) -> Path | None:
    """The checkpoint to resume from; refuse to overwrite a previous run by accident."""
    if resume:
        found = checkpoint.latest(output_dir)
        if found is None:
            raise UsageError(
                f"--resume: no complete checkpoint in {output_dir / 'checkpoints'}", "start without --resume"
            )
        return found
    previous = checkpoint.latest(output_dir) or (output_dir / METADATA_FILE).exists()
    if previous and not force:
        raise UsageError(
            f"{output_dir} holds a previous run",
            "pass --resume to continue it, --force to start over, or --set train.output_dir=NEW",
        )
    if previous:
        shutil.rmtree(checkpoint.checkpoint_dir(output_dir), ignore_errors=True)
        for name in (METADATA_FILE, METRICS_FILE):
            (output_dir / name).unlink(missing_ok=True)
    return None


class SilentReporter:
    """Reports nothing: ranks other than 0, and callers that want only the result."""

    def message(self, text: str) -> None: ...
    def start(self, total_steps: int, start_step: int) -> None: ...
    def step(self, metrics: dict[str, Any]) -> None: ...
    def finish(self, summary: dict[str, Any]) -> None: ...


@dataclass
class TrainResult:
    summary: dict[str, Any]  # steps, final and eval loss, output directory, loss curve
    model: Any  # the trained PeftModel, still in memory


def train(recipe: Recipe, reporter: Reporter, *, resume: bool = False, force: bool = False) -> TrainResult:
    """Run a recipe to the end (or to Ctrl-C, raising :class:`Interrupted`)."""
    from qlora_kit.data import load as datalib
    from qlora_kit.data.batches import BatchStream
    from qlora_kit.model.load import load_base, load_tokenizer, materialize_random_init, resolve_model_spec
    from qlora_kit.model.lora import apply_lora, prepare
    from qlora_kit.model.savers import causal_lm_loss

    t, output_dir = recipe.train, Path(recipe.train.output_dir)
    resume_from = _prepare_output(output_dir, resume, force)
    device = detect_device()
    dist = distributed.setup(t.strategy, device.kind)  # one process: Dist(world=1), nothing changes
    if dist.active and t.chunked_loss:
        raise UsageError(
            "train.chunked_loss works on one GPU only (it calls the head outside the wrapped model's forward)",
            "set train.chunked_loss=false to train on several GPUs",
        )
    if not dist.main:
        reporter = SilentReporter()  # rank 0 reports for the run
    torch.manual_seed(t.seed)

    # data problems surface before anything heavy happens
    model_spec = resolve_model_spec(recipe.model)
    raw = datalib.load_raw(recipe.data)
    tokenizer = load_tokenizer(model_spec)
    tokenized = datalib.tokenize(recipe.data, raw, tokenizer, seed=t.seed)
    reporter.message(
        f"data: {tokenized.samples:,} samples, {tokenized.tokens:,} tokens"
        + (f", {len(tokenized.eval):,} held out for eval" if tokenized.eval else "")
        + (f"; {tokenized.truncated:,} truncated to {recipe.data.max_seq_len} tokens" if tokenized.truncated else "")
        + (f"; {tokenized.dropped:,} dropped" if tokenized.dropped else "")
    )
    micro = distributed.global_micro_batch(t.micro_batch, dist)  # each rank takes its rows of it
    stream = BatchStream(
        tokenized.train, micro, recipe.data.max_seq_len, recipe.data.packing, tokenizer.pad_token_id, t.seed
    )

    if recipe.model.random_init:
        if not dist.main:
            distributed.barrier(dist)  # rank 0 writes the random-init base, the others then reuse it
        model_spec = materialize_random_init(model_spec, output_dir / "random-init-base", t.seed)
        if dist.main:
            distributed.barrier(dist)
    check_fits(distributed.as_launched(recipe, dist), model_spec.name, device, reporter, force)  # per GPU
    output_dir.mkdir(parents=True, exist_ok=True)  # only once inputs have been checked
    storage = distributed.quant_storage(dist, recipe.quant.compute_dtype)
    model = load_base(model_spec, recipe.quant, t.attn, distributed.device_map(dist, device.kind), storage)
    model = apply_lora(prepare(model, recipe.quant, t.grad_ckpt, t.offload_ckpt), recipe.lora)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total_params = sum(p.numel() for p in model.parameters())
    reporter.message(f"trainable parameters: {trainable:,} of {total_params:,} ({100 * trainable / total_params:.3f}%)")

    from transformers import get_scheduler

    total = _total_steps(recipe, stream.epoch_batches)
    peft_model, model = model, distributed.wrap(model, dist, device.kind)  # FSDP: before the optimizer
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = _optimizer(t.optimizer, params, t.lr, t.weight_decay)
    scheduler = get_scheduler(t.schedule, optimizer, num_warmup_steps=t.warmup_steps, num_training_steps=total)

    step, history = 0, []
    if resume_from is not None:
        if dist.sharded:
            state = distributed.load_sharded(resume_from, model, optimizer, scheduler)
        else:
            state = checkpoint.load(resume_from, peft_model, optimizer, scheduler)
        step, history = state["step"], state["history"]
        stream.load_state_dict(state["data"])
        if dist.main:  # one writer: another rank reading while rank 0 rewrites would see an empty file
            _truncate_metrics(output_dir / METRICS_FILE, step)
        reporter.message(f"resumed from {resume_from} at step {step}")

    def eval_loss() -> float | None:
        """Mean token loss over one pass of the eval split, always the same batches."""
        if not tokenized.eval:
            return None
        fresh = BatchStream(
            tokenized.eval, t.micro_batch, recipe.data.max_seq_len, recipe.data.packing, tokenizer.pad_token_id, t.seed
        )
        return evaluate(model, fresh, fresh.epoch_batches, device.kind, t.chunked_loss)

    def save_checkpoint(at_step: int, data_state: dict[str, Any], rng: dict[str, Any]) -> Path:
        state = {"data": data_state, "history": history[:at_step]}
        full = distributed.adapter_state(model, dist), distributed.optimizer_state(model, optimizer, dist)
        if not dist.main:
            return checkpoint.checkpoint_dir(output_dir) / f"{checkpoint.PREFIX}{at_step:06d}"
        return checkpoint.save(
            output_dir, at_step, peft_model, optimizer, scheduler, rng, state, t.save_total_limit, *full
        )

    model.train()
    reporter.start(total, step)
    started, tokens_seen = time.perf_counter(), 0
    data_state, rng = stream.state_dict(), checkpoint.rng_state()
    try:
        while step < total:
            data_state, rng = stream.state_dict(), checkpoint.rng_state()  # the state a resume needs
            loss_sum = 0.0
            for micro_step in range(t.grad_accum):
                batch = _to(next(stream), device.kind)
                tokens_seen += int(batch["input_ids"].numel())
                batch, weight = distributed.rank_slice(batch, dist)
                with distributed.no_sync(model, dist, micro_step == t.grad_accum - 1):
                    with _autocast(recipe, device):
                        loss = causal_lm_loss(model, batch, t.chunked_loss)  # chunked: never the full logits
                    (loss * weight / t.grad_accum).backward()
                loss_sum += distributed.mean(float(loss.detach()), dist)
            if t.max_grad_norm > 0:
                distributed.clip_grad_norm(model, params, t.max_grad_norm, dist)
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            step += 1
            history.append(loss_sum / t.grad_accum)
            metrics = _metrics(
                step, total, history[-1], scheduler.get_last_lr()[0], tokens_seen, started, stream, device
            )
            if tokenized.eval and t.eval_steps and step % t.eval_steps == 0:
                metrics["eval_loss"] = eval_loss()
                metrics["eval_ppl"] = math.exp(min(metrics["eval_loss"], 50))
            if dist.main and (step % t.logging_steps == 0 or step == total or "eval_loss" in metrics):
                _append_jsonl(output_dir / METRICS_FILE, metrics)
            reporter.step(metrics)
            if t.save_steps and step % t.save_steps == 0 and step < total:
                save_checkpoint(step, stream.state_dict(), checkpoint.rng_state())
    except KeyboardInterrupt:
        # the step in flight is discarded: the checkpoint holds the last finished one
        path = save_checkpoint(step, data_state, rng) if step else None
        raise Interrupted(
            f"interrupted at step {step}" + (f"; checkpoint saved to {path}" if path else ""),
            f"continue with: qlora-kit train RECIPE --resume (output dir {output_dir})",
        ) from None

    summary: dict[str, Any] = {
        "steps": step,
        "final_loss": history[-1] if history else None,
        "output_dir": str(output_dir),
    }
    if tokenized.eval:
        summary["eval_loss"] = eval_loss()
        summary["eval_ppl"] = math.exp(min(summary["eval_loss"], 50))
    adapter = distributed.adapter_state(model, dist)  # FSDP: gathered on every rank, written by rank 0
    if dist.main:
        _write_final(output_dir, peft_model, tokenizer, recipe, model_spec.name, summary, adapter)
    distributed.barrier(dist)
    summary["loss_curve"] = _plot(output_dir) if dist.main else None
    reporter.finish(summary)
    return TrainResult(summary, peft_model)


def _metrics(
    step: int, total: int, loss: float, lr: float, tokens: int, started: float, stream: Any, device: Device
) -> dict[str, Any]:
    elapsed = time.perf_counter() - started
    memory = torch.cuda.max_memory_allocated() if device.kind == "cuda" else _rss_bytes()
    return {
        "step": step,
        "loss": loss,
        "lr": lr,
        "epoch": round(stream.epoch_float, 4),
        "tokens_per_s": tokens / elapsed if elapsed else 0.0,
        "memory_bytes": memory,
        "elapsed_s": round(elapsed, 3),
    }


def _rss_bytes() -> int:
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def _append_jsonl(path: Path, record: dict[str, Any]) -> None:
    with path.open("a") as fh:
        fh.write(json.dumps(record) + "\n")


def _truncate_metrics(path: Path, step: int) -> None:
    """Drop metrics logged after the checkpoint a run resumes from (they will be logged again)."""
    if path.exists():
        kept = [line for line in path.read_text().splitlines() if line and json.loads(line)["step"] <= step]
        path.write_text("".join(line + "\n" for line in kept))


def _write_final(
    output_dir: Path,
    model: Any,
    tokenizer: Any,
    recipe: Recipe,
    base: str,
    summary: dict[str, Any],
    adapter: dict[str, Any] | None = None,
) -> None:
    """Adapter and tokenizer into place, then ``qlora_kit.json`` last: it marks the run complete."""
    import peft
    import transformers

    tmp = output_dir / ".tmp-final"
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp, state_dict=adapter)  # adapter: the full LoRA weights of an FSDP run
    tokenizer.save_pretrained(tmp)
    for item in tmp.iterdir():
        os.replace(item, output_dir / item.name)
    tmp.rmdir()
    metadata = {
        "base_model": base,
        "base_config_sha256": config_fingerprint(base),
        "quant": {
            "mode": recipe.quant.mode,
            "double_quant": recipe.quant.double_quant,
            "compute_dtype": recipe.quant.compute_dtype,
        },
        "recipe": recipe.to_dict(),
        "summary": summary,
        "versions": {"torch": torch.__version__, "transformers": transformers.__version__, "peft": peft.__version__},
    }
    from qlora_kit.recipe import write_atomic

    write_atomic(output_dir / METADATA_FILE, json.dumps(metadata, indent=2))


def _plot(output_dir: Path) -> str | None:
    """loss_curve.png from metrics.jsonl, when matplotlib is installed (the ``plot`` extra)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    rows = [json.loads(line) for line in (output_dir / METRICS_FILE).read_text().splitlines() if line]
    fig, ax = plt.subplots(figsize=(6, 3.5))
    ax.plot([r["step"] for r in rows], [r["loss"] for r in rows], label="train loss")
    evals = [r for r in rows if "eval_loss" in r]
    if evals:
        ax.plot([r["step"] for r in evals], [r["eval_loss"] for r in evals], "o-", label="eval loss")
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.legend()
    fig.tight_layout()
    path = output_dir / "loss_curve.png"
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return str(path)
