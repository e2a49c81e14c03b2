"""Measure real training steps term by term, next to the planner's prediction.

The model is loaded exactly the way ``qlora-kit train`` loads it (:func:`qlora_kit.model.load.load_base`,
:func:`qlora_kit.model.lora.prepare`, :func:`qlora_kit.model.lora.apply_lora`, from recipe specs) and stepped the
way train steps it (:func:`train_step`). Then, for each term of :func:`qlora_kit.plan.memory.estimate`
(counted by :mod:`qlora_kit.measure.tensors`; :mod:`qlora_kit.measure.report` sets them beside the planner's):

- static terms (weights, quantization state, other parameters, LoRA parameters, their gradients,
  optimizer state): the bytes of the tensors themselves, each storage counted once;
- ``saved``: the bytes autograd keeps for backward after the forward pass: every tensor packed by
  ``torch.autograd.graph.saved_tensors_hooks`` plus the tensors custom autograd functions keep as
  plain ``ctx`` attributes (LLM.int8 keeps its input that way), deduplicated by storage, parameters,
  buffers and quantization state left out;
- ``peak``: the peak of live tensor bytes over one steady-state step (forward, backward, optimizer
  step; optimizer state already exists). On CPU: the bytes alive at the start of the step (parameters,
  buffers, quantization state, optimizer state, the batch) plus the running sum of the torch
  profiler's allocation events; on CUDA: ``torch.cuda.max_memory_allocated`` and
  ``max_memory_reserved``.

torch, transformers, peft and bitsandbytes are imported here: this module is for
``tools/measure_memory.py`` and the tests, never for the planner.
"""

from __future__ import annotations

import contextlib
import gc
import time
import warnings
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from qlora_kit.knobs import TrainSetup
from qlora_kit.measure.tensors import (
    Peak,
    alive_records,
    cpu_step_peak,
    ctx_tensors,
    cuda_step_peak,
    nbytes_by_storage,
    optimizer_tensors,
    persistent_tensors,
    quant_state_tensors,
    saved_tensor_recorder,
    static_bytes,
    storage_bytes,
)
from qlora_kit.model.load import load_base, torch_dtype
from qlora_kit.model.lora import apply_lora, prepare
from qlora_kit.recipe import LoraSpec, ModelSpec, QuantSpec
from qlora_kit.train.optim import make_optimizer

MAX_GRAD_NORM = 1.0  # TrainSpec.max_grad_norm's default
STATIC = ("linear_weights", "quant_state", "other_params", "lora_params", "lora_grads", "optimizer_state")


# -- building and loading -------------------------------------------------------------------------------


def save_random_model(
    config: Mapping[str, Any], path: str | Path, dtype: str = "fp32", device: str = "cpu", seed: int = 0
) -> Path:
    """Build a random-init causal LM from a config dict (``config.json``'s content) on ``device`` and
    ``save_pretrained`` it to ``path`` in ``dtype``.

    On a GPU the weights are initialized there (a 7B model in bf16 takes ~13.5 GB and seconds), then
    written to disk shard by shard; the model is freed before returning so loading it quantized
    starts from an empty card.
    """
    from transformers import AutoConfig, AutoModelForCausalLM

    cfg = AutoConfig.for_model(**dict(config))
    torch.manual_seed(seed)
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(cfg, dtype=torch_dtype(dtype))
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(path)
    del model
    gc.collect()
    if device.startswith("cuda"):
        torch.cuda.empty_cache()
    return path


def quant_spec(setup: TrainSetup) -> QuantSpec:
    upcast = "selective" if setup.upcast == "selective" else "all"
    return QuantSpec(mode=setup.quant, double_quant=setup.double_quant, compute_dtype=setup.dtype, upcast=upcast)


def lora_spec(setup: TrainSetup) -> LoraSpec:
    return LoraSpec(
        rank=setup.rank,
        alpha=2 * setup.rank,
        dropout=setup.lora_dropout,
        targets=list(setup.targets),
        bias="none",
        variant="lora-fa" if setup.lora_fa else "dora" if setup.dora else "lora",
        kernel="runlora" if setup.runlora else "peft",
        rslora=setup.rslora,
    )


def load_for_training(path: str | Path, setup: TrainSetup, device: str = "cpu") -> Any:
    """The peft model ``train`` would build from a recipe with these knobs: load (quantized), prepare,
    LoRA. ``setup.dtype`` is the recipe's ``quant.compute_dtype`` (the dtype the base loads in)."""
    device_map = {"": "cpu"} if device == "cpu" else {"": torch.device(device).index or 0}
    quant = quant_spec(setup)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = load_base(ModelSpec(name=str(path)), quant, attn=setup.attn, device_map=device_map)
        model = prepare(model, quant, setup.grad_ckpt, setup.offload_ckpt)
        model = apply_lora(model, lora_spec(setup))
    model.train()
    return model


def uses_autocast(setup: TrainSetup) -> bool:
    """A k-bit-prepared base runs its forward under autocast in a 16-bit compute dtype (what the planner
    assumes: ``activations.opts_for``); a 16-bit base runs in its own dtype."""
    return setup.quant != "none" and setup.upcast != "none" and setup.dtype != "fp32"


def random_batch(vocab_size: int, setup: TrainSetup, device: str = "cpu", seed: int = 0) -> dict[str, Any]:
    """A packed batch (no padding, so no attention mask), labels = inputs."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, vocab_size, (setup.batch_size, setup.seq_len), generator=g).to(device)
    return {"input_ids": ids, "labels": ids}


def forward_loss(
    model: Any, batch: Mapping[str, Any], autocast_dtype: torch.dtype | None, device: str, chunked: bool = False
) -> Any:
    """The forward half of a step: the loss only (the outputs, logits included, are dropped here);
    ``chunked``: ``train.chunked_loss`` (``qlora_kit.model.savers.causal_lm_loss``)."""
    from qlora_kit.model.savers import causal_lm_loss

    ctx = torch.autocast(device.split(":")[0], dtype=autocast_dtype) if autocast_dtype else contextlib.nullcontext()
    with ctx:
        return causal_lm_loss(model, batch, chunked)


def train_step(
    model: Any,
    batches: list[Mapping[str, Any]],
    optimizer: Any,
    autocast_dtype: torch.dtype | None,
    device: str,
    chunked: bool = False,
) -> float:
    """One optimizer step as ``train`` runs it (``qlora_kit.train.loop``): per micro-batch, forward (autocast
    for a k-bit base in 16-bit compute), loss, drop the outputs, backward (gradients accumulate); then
    gradient clipping (the recipe's default ``max_grad_norm`` 1.0), step and
    ``zero_grad(set_to_none=True)``. Returns the mean loss."""
    total = 0.0
    for batch in batches:
        loss = forward_loss(model, batch, autocast_dtype, device, chunked)
        (loss / len(batches)).backward()
        total += float(loss.detach())
        del loss
    params = [p for group in optimizer.param_groups for p in group["params"]]
    torch.nn.utils.clip_grad_norm_(params, MAX_GRAD_NORM)
    optimizer_step(optimizer)
    return total / len(batches)


def optimizer_step(optimizer: Any) -> None:
    """``step()`` then ``zero_grad(set_to_none=True)`` (paged optimizers on CPU warn that they fall back
    to unpaged state; that is expected here)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        optimizer.step()
    optimizer.zero_grad(set_to_none=True)


# -- saved for backward and one measurement -----------------------------------------------------------


def forward_saved(
    model: Any,
    batch: Mapping[str, Any],
    autocast_dtype: torch.dtype | None,
    device: str,
    persistent: list[Any],
    chunked: bool = False,
) -> tuple[Any, dict[int, int], dict[int, int]]:
    """A forward pass that records what it keeps for backward: (the loss, bytes per storage packed by the
    saved-tensor hooks, bytes per storage custom functions keep on ``ctx`` and nothing packs), leaving out
    the ``persistent`` tensors (parameters, buffers, quantization and optimizer state, the batch)."""
    exclude = {t.untyped_storage().data_ptr() for t in persistent}
    with saved_tensor_recorder(exclude) as recs:
        loss = forward_loss(model, batch, autocast_dtype, device, chunked)
    hooked = nbytes_by_storage(alive_records(recs), exclude)
    kept = nbytes_by_storage(ctx_tensors(loss), exclude | set(hooked))
    return loss, hooked, kept


def saved_after_forward(model: Any, setup: TrainSetup, vocab_size: int, device: str = "cpu", seed: int = 0) -> int:
    """Bytes kept for backward by one forward pass on a random batch (no optimizer step)."""
    batch = random_batch(vocab_size, setup, device, seed)
    ac = torch_dtype(setup.dtype) if uses_autocast(setup) else None
    persistent = [*model.parameters(), *model.buffers(), *quant_state_tensors(model), *batch.values()]
    loss, hooked, kept = forward_saved(model, batch, ac, device, persistent, setup.chunked_loss)
    del loss
    return sum(hooked.values()) + sum(kept.values())


@dataclass
class Measurement:
    """What one run measured, in bytes (see the module docstring)."""

    terms: dict[str, int]  # the static terms, keyed like memory.estimate's breakdown
    saved_hooks_bytes: int  # packed by saved_tensors_hooks
    saved_ctx_bytes: int  # kept on ctx by custom functions, not also packed
    peak: Peak
    losses: list[float] = field(default_factory=list)
    step_s: float = 0.0

    @property
    def saved_bytes(self) -> int:
        return self.saved_hooks_bytes + self.saved_ctx_bytes


def measure_model(
    model: Any,
    setup: TrainSetup,
    vocab_size: int,
    device: str = "cpu",
    steps: int = 2,
    grad_accum: int = 2,
    seed: int = 0,
) -> Measurement:
    """Step a loaded model ``steps`` (>= 2) optimizer steps of ``grad_accum`` micro-batches each.

    The first micro-batch of the first step records what autograd saves, its backward the gradients,
    and the first optimizer step the optimizer state; the last step is the steady-state step whose peak
    counts. With ``grad_accum`` >= 2 (train's default recipe accumulates 16) the LoRA gradients of the
    earlier micro-batches are alive through the later ones, as the planner's peak assumes.
    """
    if steps < 2:
        raise ValueError("measure at least 2 steps: the peak is taken once optimizer state exists")
    dev = device.split(":")[0]
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = make_optimizer(setup.optimizer, trainable)
    ac = torch_dtype(setup.dtype) if uses_autocast(setup) else None
    terms = static_bytes(model)
    counter = iter(range(seed, seed + 1_000_000))

    def micro_batches() -> list[dict[str, Any]]:
        return [random_batch(vocab_size, setup, device, next(counter)) for _ in range(grad_accum)]

    # step 1: saved tensors (first micro-batch), gradients, optimizer state
    batches = micro_batches()
    persistent = persistent_tensors(model, optimizer, batches[0])
    loss, hooked, kept = forward_saved(model, batches[0], ac, device, persistent, setup.chunked_loss)
    (loss / grad_accum).backward()
    terms["lora_grads"] = storage_bytes(p.grad for p in trainable)
    losses = [float(loss.detach())]
    del loss
    for batch in batches[1:]:
        loss = forward_loss(model, batch, ac, device, setup.chunked_loss)
        (loss / grad_accum).backward()
        del loss
    torch.nn.utils.clip_grad_norm_(trainable, MAX_GRAD_NORM)
    optimizer_step(optimizer)
    terms["optimizer_state"] = storage_bytes(optimizer_tensors(optimizer))

    for _ in range(1, steps - 1):
        losses.append(train_step(model, micro_batches(), optimizer, ac, device, setup.chunked_loss))

    batches = micro_batches()
    result: list[float] = []

    def step() -> None:
        result.append(train_step(model, batches, optimizer, ac, device, setup.chunked_loss))

    t0 = time.perf_counter()
    if dev == "cuda":
        peak = cuda_step_peak(step, device)
    else:
        persistent = [t for b in batches[1:] for t in b.values()] + persistent_tensors(model, optimizer, batches[0])
        peak = cpu_step_peak(step, storage_bytes(persistent))
    step_s = time.perf_counter() - t0
    losses += result
    return Measurement(terms, sum(hooked.values()), sum(kept.values()), peak, losses, step_s)
