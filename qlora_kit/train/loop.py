"""``qlora-kit train``: one explicit training loop from a validated recipe to a PEFT adapter.

Order of work: plan the recipe on the detected device (refuse when it will not fit), read and
tokenize the data, load the base quantized, prepare it and add LoRA, then train with gradient
accumulation, logging, evaluation and atomic checkpoints. Ctrl-C takes effect at the next
optimizer-step boundary and saves a checkpoint of exactly that state. Checks before loading live in
:mod:`qlora_kit.train.preflight`; the metrics log, the final adapter and ``qlora_kit.json`` in
:mod:`qlora_kit.train.outputs`; the optimizers in :mod:`qlora_kit.train.optim`.

This module reports through a :class:`Reporter` and never prints.
"""

from __future__ import annotations

import math
import os
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from qlora_kit.errors import QloraKitError, UsageError, WriteFailed
from qlora_kit.host import peak_rss_bytes
from qlora_kit.recipe import Recipe
from qlora_kit.train import checkpoint, distributed, optim, tracking
from qlora_kit.train.outputs import (
    METRICS_FILE,
    RANDOM_INIT_DIR,
    PreviousRun,
    Reporter,
    SilentReporter,
    append_jsonl,
    plot_losses,
    prepare_output,
    truncate_metrics,
    write_final,
)
from qlora_kit.train.preflight import (
    Device,
    check_context,
    check_eval_split,
    check_fits,
    check_resumable,
    detect_device,
)


class Interrupted(QloraKitError):
    """Ctrl-C: a checkpoint was saved; ``--resume`` continues."""

    exit_code = 130


def _to(batch: dict[str, Any], device: str) -> dict[str, Any]:
    return {k: v.to(device) for k, v in batch.items() if v is not None}


def _autocast(recipe: Recipe, device: Device) -> Any:
    """16-bit autocast for a k-bit-prepared base on a GPU (what the planner models)."""
    from contextlib import nullcontext

    from qlora_kit.model.load import TORCH_DTYPES

    dtype = recipe.quant.compute_dtype
    if device.kind == "cuda" and recipe.quant.mode != "none" and dtype in ("bf16", "fp16"):
        return torch.autocast("cuda", dtype=TORCH_DTYPES[dtype])
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


class StepBoundaryInterrupt:
    """Ctrl-C takes effect between two optimizer steps, never inside one.

    The first SIGINT only sets a flag; the loop checks it after each optimizer step and saves a
    checkpoint of exactly that state (weights, optimizer, scheduler, data position, RNG). A second
    SIGINT stops at once without saving. Outside the main thread (no signal handlers) Ctrl-C is
    Python's KeyboardInterrupt as usual."""

    def __init__(self) -> None:
        self.requested = False
        self._previous: Any = None

    def __enter__(self) -> StepBoundaryInterrupt:
        import signal
        import threading

        if threading.current_thread() is threading.main_thread():
            self._previous = signal.signal(signal.SIGINT, self._handle)
        return self

    def _handle(self, signum: int, frame: Any) -> None:
        if self.requested:
            raise KeyboardInterrupt
        self.requested = True

    def __exit__(self, *exc: object) -> None:
        import signal

        if self._previous is not None:
            signal.signal(signal.SIGINT, self._previous)


@dataclass
class TrainResult:
    summary: dict[str, Any]  # steps, final and eval loss, output directory, loss curve
    model: Any  # the trained PeftModel, still in memory


@dataclass
class Run:
    """Everything the loop needs, set up and checked."""

    recipe: Recipe
    reporter: Reporter
    output_dir: Path
    device: Device
    dist: Any
    model_name: str
    tokenizer: Any
    tokenized: Any
    stream: Any
    peft_model: Any = None
    model: Any = None
    params: list[torch.nn.Parameter] | None = None
    optimizer: Any = None
    scheduler: Any = None
    total: int = 0
    tracker: tracking.Trackers = tracking.NO_TRACKERS


def train(recipe: Recipe, reporter: Reporter, *, resume: bool = False, force: bool = False) -> TrainResult:
    """Run a recipe to the end (or to Ctrl-C, raising :class:`Interrupted`)."""
    output_dir = Path(recipe.train.output_dir)
    resume_from, previous = prepare_output(output_dir, resume, force)
    if resume_from is not None:
        check_resumable(recipe, resume_from)
    run = _prepare_inputs(recipe, reporter, output_dir, force)
    aside = PreviousRun(output_dir) if previous and run.dist.main else None
    start = checkpoint.read_state(resume_from)["step"] if resume_from is not None else 0
    if resume_from is None and run.dist.main:
        truncate_metrics(output_dir / METRICS_FILE, 0)  # a failed attempt's rows (no checkpoint: not a run)
    try:
        with tracking.open_trackers(recipe, output_dir, start, run.dist.main) as run.tracker:
            _materialize_base(run)
            _build_model(run)
            step, history = _resume(run, resume_from) if resume_from is not None else (0, [])
            result = _loop(run, step, history, aside)
    except BaseException as exc:
        restored = aside is not None and aside.aside.exists()
        if aside is not None:
            aside.restore()
        if isinstance(exc, WriteFailed):
            raise WriteFailed(exc.message, _after_write_failure(output_dir, restored)) from None
        raise
    if aside is not None:
        aside.drop()
    return result


def _after_write_failure(output_dir: Path, restored: bool) -> str:
    """What to do after a write failed mid-run (a full disk): nothing half-written was left."""
    if restored:
        return f"free some space and run the command again (the previous run in {output_dir} was put back)"
    last = checkpoint.latest(output_dir)
    if last is not None:
        return f"free some space, then continue from {last.name} with: qlora-kit train RECIPE --resume"
    return "free some space (or set train.output_dir on another disk) and run the command again"


def _prepare_inputs(recipe: Recipe, reporter: Reporter, output_dir: Path, force: bool) -> Run:
    """Everything that can be checked before a weight loads: the data, the tokenizer, the fit."""
    from qlora_kit.data import load as datalib
    from qlora_kit.data.batches import BatchStream
    from qlora_kit.model.load import load_tokenizer, resolve_model_spec

    t = recipe.train
    tracking.check(recipe)  # a missing tracker package: one line now, not after the model loads
    if not (os.environ.get("PYTORCH_ALLOC_CONF") or os.environ.get("PYTORCH_CUDA_ALLOC_CONF")):  # before CUDA starts
        os.environ["PYTORCH_CUDA_ALLOC_CONF"] = "expandable_segments:True"  # what the planner plans for
    device = detect_device()
    dist = distributed.setup(t.strategy, device.kind)  # one process: Dist(world=1), nothing changes
    if dist.active and t.chunked_loss:
        raise UsageError(
            "train.chunked_loss works on one GPU only (it calls the head outside the wrapped model's forward)",
            "set train.chunked_loss=false to train on several GPUs",
        )
    if not dist.main:
        reporter = SilentReporter()  # rank 0 reports for the run

    # data problems surface before anything heavy happens
    model_spec = resolve_model_spec(recipe.model)
    check_context(recipe, model_spec.name)
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
    if tokenized.eval:
        check_eval_split(recipe, tokenized.eval, tokenizer.pad_token_id)
    check_fits(distributed.as_launched(recipe, dist), model_spec.name, device, reporter, force)  # per GPU
    return Run(recipe, reporter, output_dir, device, dist, model_spec.name, tokenizer, tokenized, stream)


def _materialize_base(run: Run) -> None:
    """A random-init recipe's base, written into the run's directory (after an old run moved aside)."""
    from qlora_kit.model.load import materialize_random_init, resolve_model_spec

    if not run.recipe.model.random_init:
        return
    if not run.dist.main:
        distributed.barrier(run.dist)  # rank 0 writes the random-init base, the others then reuse it
    spec = resolve_model_spec(run.recipe.model)
    run.model_name = materialize_random_init(spec, run.output_dir / RANDOM_INIT_DIR, run.recipe.train.seed).name
    if run.dist.main:
        distributed.barrier(run.dist)


def _build_model(run: Run) -> None:
    """Load the base quantized, prepare it, add LoRA; the optimizer and schedule over the LoRA weights."""
    import dataclasses as dc

    from transformers import get_scheduler

    from qlora_kit.model.load import load_base
    from qlora_kit.model.lora import apply_lora, count_parameters, prepare

    recipe, t, dist = run.recipe, run.recipe.train, run.dist
    run.output_dir.mkdir(parents=True, exist_ok=True)  # only once inputs have been checked
    torch.manual_seed(t.seed)  # the LoRA init: the same whatever ran before in this process
    storage = distributed.quant_storage(dist, recipe.quant.compute_dtype)
    spec = dc.replace(recipe.model, name=run.model_name, random_init=False)
    device_map = distributed.device_map(dist, run.device.kind)
    model = load_base(spec, recipe.quant, t.attn, device_map, storage, recipe.data.max_seq_len)
    model = apply_lora(prepare(model, recipe.quant, t.grad_ckpt, t.offload_ckpt), recipe.lora)
    trainable, total_params = count_parameters(model)  # packed 4-bit storage counted as its weights
    run.reporter.message(
        f"trainable parameters: {trainable:,} of {total_params:,} ({100 * trainable / total_params:.3f}%)"
    )
    run.total = _total_steps(recipe, run.stream.epoch_batches)
    run.peft_model, run.model = model, distributed.wrap(model, dist, run.device.kind)  # FSDP: before the optimizer
    run.params = [p for p in run.model.parameters() if p.requires_grad]
    run.optimizer = (
        optim.lorafa_optimizer(model, recipe.lora, t.lr, t.weight_decay)
        if recipe.lora.fa_correction
        else optim.make_optimizer(t.optimizer, run.params, t.lr, t.weight_decay)
    )
    run.scheduler = get_scheduler(
        t.schedule, run.optimizer, num_warmup_steps=t.warmup_steps, num_training_steps=run.total
    )


def _resume(run: Run, path: Path) -> tuple[int, list[float]]:
    if run.dist.sharded:
        state = distributed.load_sharded(path, run.model, run.optimizer, run.scheduler)
    else:
        state = checkpoint.load(path, run.peft_model, run.optimizer, run.scheduler)
    try:
        run.stream.load_state_dict(state["data"])
    except (KeyError, TypeError, ValueError) as exc:
        raise UsageError(
            f"checkpoint {path}: its data position does not fit this data ({exc})",
            f"resume with the data it was trained on, or delete {path}",
        ) from None
    if run.dist.main:  # one writer: another rank reading while rank 0 rewrites would see an empty file
        truncate_metrics(run.output_dir / METRICS_FILE, state["step"])
    run.reporter.message(f"resumed from {path} at step {state['step']}")
    return state["step"], list(state["history"])


def _eval_loss(run: Run) -> float | None:
    """Mean token loss over one pass of the eval split, always the same batches."""
    from qlora_kit.data.batches import BatchStream

    if not run.tokenized.eval:
        return None
    r, t = run.recipe, run.recipe.train
    fresh = BatchStream(
        run.tokenized.eval, t.micro_batch, r.data.max_seq_len, r.data.packing, run.tokenizer.pad_token_id, t.seed
    )
    return evaluate(run.model, fresh, fresh.epoch_batches, run.device.kind, t.chunked_loss)


def _save(run: Run, at_step: int, history: list[float]) -> Path:
    """A checkpoint of the state between optimizer steps ``at_step`` and ``at_step + 1``."""
    state = {"data": run.stream.state_dict(), "history": history[:at_step], "recipe": run.recipe.to_dict()}
    rng = checkpoint.rng_state()
    full = (
        distributed.adapter_state(run.model, run.dist),
        distributed.optimizer_state(run.model, run.optimizer, run.dist),
    )
    if not run.dist.main:
        return checkpoint.checkpoint_dir(run.output_dir) / f"{checkpoint.PREFIX}{at_step:06d}"
    return checkpoint.save(
        run.output_dir,
        at_step,
        run.peft_model,
        run.optimizer,
        run.scheduler,
        rng,
        state,
        run.recipe.train.save_total_limit,
        *full,
    )


def _step(run: Run) -> tuple[float, int]:
    """One optimizer step over ``grad_accum`` micro-batches: its mean loss and the tokens it read."""
    from qlora_kit.model.savers import causal_lm_loss

    t, dist, loss_sum, tokens = run.recipe.train, run.dist, 0.0, 0
    for micro_step in range(t.grad_accum):
        batch = _to(next(run.stream), run.device.kind)
        tokens += int(batch["input_ids"].numel())
        batch, weight = distributed.rank_slice(batch, dist)
        with distributed.no_sync(run.model, dist, micro_step == t.grad_accum - 1):
            with _autocast(run.recipe, run.device):
                loss = causal_lm_loss(run.model, batch, t.chunked_loss)  # chunked: never the full logits
            (loss * weight / t.grad_accum).backward()
        loss_sum += distributed.mean(float(loss.detach()), dist)
    if t.max_grad_norm > 0:
        distributed.clip_grad_norm(run.model, run.params or [], t.max_grad_norm, dist)
    run.optimizer.step()
    run.scheduler.step()
    run.optimizer.zero_grad(set_to_none=True)
    return loss_sum / t.grad_accum, tokens


def _loop(run: Run, step: int, history: list[float], aside: PreviousRun | None) -> TrainResult:
    t, dist, output_dir = run.recipe.train, run.dist, run.output_dir
    run.model.train()
    run.reporter.start(run.total, step)
    started, tokens_seen = time.perf_counter(), 0
    with StepBoundaryInterrupt() as interrupt:
        try:
            while step < run.total:
                loss, tokens = _step(run)
                step, tokens_seen = step + 1, tokens_seen + tokens
                history.append(loss)
                lr = run.scheduler.get_last_lr()[0]
                metrics = _metrics(step, run.total, loss, lr, tokens_seen, started, run.stream, run.device)
                if run.tokenized.eval and t.eval_steps and step % t.eval_steps == 0:
                    metrics["eval_loss"] = _eval_loss(run)
                    metrics["eval_ppl"] = math.exp(min(metrics["eval_loss"], 50))
                if dist.main and (step % t.logging_steps == 0 or step == run.total or "eval_loss" in metrics):
                    append_jsonl(output_dir / METRICS_FILE, metrics)
                    run.tracker.log(metrics)
                run.reporter.step(metrics)
                stop = distributed.mean(float(interrupt.requested), dist) > 0  # every rank stops together
                if stop or (t.save_steps and step % t.save_steps == 0 and step < run.total):
                    path = _save(run, step, history)
                    if aside is not None:
                        aside.drop()  # the new run has a checkpoint of its own now
                    if stop:
                        raise Interrupted(
                            f"interrupted after step {step}; checkpoint saved to {path}",
                            f"continue with: qlora-kit train RECIPE --resume (output dir {output_dir})",
                        )
        except KeyboardInterrupt:  # a second Ctrl-C, or no signal handler: stop now, save nothing
            last = checkpoint.latest(output_dir)
            raise Interrupted(
                f"interrupted during step {step + 1}; nothing saved"
                + (f" (the latest checkpoint is {last})" if last else ""),
                "continue with: qlora-kit train RECIPE --resume" if last else "run the command again",
            ) from None
    return _finish(run, step, history)


def _finish(run: Run, step: int, history: list[float]) -> TrainResult:
    summary: dict[str, Any] = {
        "steps": step,
        "final_loss": history[-1] if history else None,
        "output_dir": str(run.output_dir),
    }
    if run.tokenized.eval:
        summary["eval_loss"] = _eval_loss(run)
        summary["eval_ppl"] = math.exp(min(summary["eval_loss"], 50))
    adapter = distributed.adapter_state(run.model, run.dist)  # FSDP: gathered on every rank, written by rank 0
    if run.dist.main:
        write_final(run.output_dir, run.peft_model, run.tokenizer, run.recipe, run.model_name, summary, adapter)
    distributed.barrier(run.dist)
    summary["loss_curve"] = plot_losses(run.output_dir) if run.dist.main else None
    run.reporter.finish(summary)
    return TrainResult(summary, run.peft_model)


def _metrics(
    step: int, total: int, loss: float, lr: float, tokens: int, started: float, stream: Any, device: Device
) -> dict[str, Any]:
    elapsed = time.perf_counter() - started
    memory = torch.cuda.max_memory_allocated() if device.kind == "cuda" else peak_rss_bytes()
    return {
        "step": step,
        "loss": loss,
        "lr": lr,
        "epoch": round(stream.epoch_float, 4),
        "tokens_per_s": tokens / elapsed if elapsed else 0.0,
        "memory_bytes": memory,
        "elapsed_s": round(elapsed, 3),
    }
