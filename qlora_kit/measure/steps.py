"""Measure real training steps term by term, next to the planner's prediction.

The model is loaded exactly the way ``qlora-kit train`` loads it (:func:`qlora_kit.model.load.load_base`,
:func:`qlora_kit.model.lora.prepare`, :func:`qlora_kit.model.lora.apply_lora`, from recipe specs) and stepped the
way train steps it (:func:`train_step`). Then, for each term of :func:`qlora_kit.plan.memory.estimate`:

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
import json
import logging
import tempfile
import time
import warnings
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from qlora_kit.catalog.models import ArchSpec, arch_from_config
from qlora_kit.knobs import TrainSetup
from qlora_kit.model.load import load_base, torch_dtype
from qlora_kit.model.lora import apply_lora, prepare
from qlora_kit.plan import memory
from qlora_kit.plan.activations import peak_moment, saved_bytes
from qlora_kit.recipe import LoraSpec, ModelSpec, QuantSpec

logging.getLogger("bitsandbytes").setLevel(logging.ERROR)

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
        variant="lora-fa" if setup.lora_fa else "lora",
        kernel="runlora" if setup.runlora else "peft",
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


def make_optimizer(name: str, params: list[Any], lr: float = 1e-4) -> Any:
    """The optimizer a recipe's ``train.optimizer`` names (the paged ones fall back to unpaged on CPU)."""
    if name == "adamw":
        return torch.optim.AdamW(params, lr=lr)
    import bitsandbytes as bnb

    cls = {
        "adamw8bit": bnb.optim.AdamW8bit,
        "paged_adamw": bnb.optim.PagedAdamW,
        "paged_adamw8bit": bnb.optim.PagedAdamW8bit,
    }[name]
    return cls(params, lr=lr)


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


# -- counting bytes -------------------------------------------------------------------------------------


def storage_bytes(tensors: Iterable[Any]) -> int:
    """Bytes of the storages behind ``tensors``, each storage counted once."""
    seen: dict[int, int] = {}
    for t in tensors:
        if isinstance(t, torch.Tensor):
            s = t.untyped_storage()
            seen[s.data_ptr()] = s.nbytes()
    return sum(seen.values())


def _is_lora(name: str) -> bool:
    return ".lora_" in name


def _linear_kinds() -> tuple[type, ...]:
    import bitsandbytes as bnb
    from transformers.pytorch_utils import Conv1D

    return (torch.nn.Linear, Conv1D, bnb.nn.Linear4bit, bnb.nn.Linear8bitLt)


def quantizable_weights(model: Any) -> list[Any]:
    """Weights of the linears the planner calls linear weights: every nn.Linear/Conv1D (or their
    bitsandbytes replacements) but the output head and the LoRA adapters."""
    skip = {"lm_head", "embed_out", "lora_A", "lora_B"}
    return [
        module.weight
        for name, module in model.named_modules()
        if isinstance(module, _linear_kinds()) and not skip.intersection(name.split("."))
    ]


def quant_state_tensors(model: Any) -> list[Any]:
    """Quantization constants beside the packed weights: 4-bit absmax/code (+ nested state), LLM.int8's
    row scales (``Int8Params.SCB``; after the first forward ``Linear8bitLt`` moves them to its
    ``state``)."""
    tensors: list[Any] = []
    for name, module in model.named_modules():
        if "lora_" in name or not isinstance(module, _linear_kinds()):
            continue
        w = module.weight
        qs = getattr(w, "quant_state", None)
        if qs is not None:
            tensors += [qs.absmax, qs.code]
            if qs.nested:
                tensors += [qs.offset, qs.state2.absmax, qs.state2.code]
        tensors += [getattr(w, "SCB", None), getattr(getattr(module, "state", None), "SCB", None)]
    return [t for t in tensors if isinstance(t, torch.Tensor)]


def optimizer_tensors(optimizer: Any, with_step: bool = False) -> list[Any]:
    """Tensors in ``optimizer.state`` (torch's 0-d ``step`` counters only when asked: the planner leaves
    them out, 4 B per tensor)."""
    return [
        v
        for s in optimizer.state.values()
        for k, v in s.items()
        if isinstance(v, torch.Tensor) and (with_step or k != "step")
    ]


def static_bytes(model: Any) -> dict[str, int]:
    """Bytes of the weights, quantization state, other parameters and LoRA parameters, from the tensors."""
    params = dict(model.named_parameters())
    lora = [p for n, p in params.items() if _is_lora(n)]
    weights = quantizable_weights(model)
    taken = {t.untyped_storage().data_ptr() for t in weights + lora}
    others = [p for p in params.values() if p.untyped_storage().data_ptr() not in taken]
    return {
        "linear_weights": storage_bytes(weights),
        "quant_state": storage_bytes(quant_state_tensors(model)),
        "other_params": storage_bytes(others),
        "lora_params": storage_bytes(lora),
    }


def persistent_tensors(model: Any, optimizer: Any, batch: Mapping[str, Any]) -> list[Any]:
    """Everything alive between steps: parameters, buffers, quantization state, optimizer state, the batch."""
    return [
        *model.parameters(),
        *model.buffers(),
        *quant_state_tensors(model),
        *optimizer_tensors(optimizer, with_step=True),
        *[v for v in batch.values() if isinstance(v, torch.Tensor)],
    ]


# -- saved for backward ---------------------------------------------------------------------------------


@contextlib.contextmanager
def saved_tensor_recorder(exclude: set[int]) -> Iterator[dict[int, Any]]:
    """Record every tensor autograd packs for backward, by storage (``exclude``: storage pointers of
    parameters and other persistent tensors). The records hold references: drop them before backward."""
    recs: dict[int, Any] = {}

    def pack(t: Any) -> Any:
        try:
            ptr = t.untyped_storage().data_ptr()
        except (RuntimeError, NotImplementedError):
            return t
        if ptr not in exclude and ptr not in recs:
            recs[ptr] = t
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        yield recs


def ctx_tensors(loss: Any) -> list[Any]:
    """Tensors custom autograd functions keep as plain ``ctx`` attributes (not saved tensors, alive until
    backward all the same): walk the graph from the loss. LLM.int8's ``MatMul8bitFp``/``MatMul8bitLt``
    keep their input this way."""
    out: list[Any] = []
    seen: set[int] = set()
    todo = [loss.grad_fn]
    while todo:
        node = todo.pop()
        if node is None or id(node) in seen:
            continue
        seen.add(id(node))
        attrs = getattr(node, "__dict__", None) or {}
        for v in attrs.values():
            items = v if isinstance(v, (tuple, list)) else (v,)
            out += [x for x in items if isinstance(x, torch.Tensor)]
        todo += [f for f, _ in node.next_functions]
    return out


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
    hooked = nbytes_by_storage(recs.values(), exclude)
    kept = nbytes_by_storage(ctx_tensors(loss), exclude | set(hooked))
    recs.clear()  # the records hold references: release them before backward
    return loss, hooked, kept


def saved_after_forward(model: Any, setup: TrainSetup, vocab_size: int, device: str = "cpu", seed: int = 0) -> int:
    """Bytes kept for backward by one forward pass on a random batch (no optimizer step)."""
    batch = random_batch(vocab_size, setup, device, seed)
    ac = torch_dtype(setup.dtype) if uses_autocast(setup) else None
    persistent = [*model.parameters(), *model.buffers(), *quant_state_tensors(model), *batch.values()]
    loss, hooked, kept = forward_saved(model, batch, ac, device, persistent, setup.chunked_loss)
    del loss
    return sum(hooked.values()) + sum(kept.values())


def nbytes_by_storage(tensors: Iterable[Any], exclude: set[int]) -> dict[int, int]:
    out: dict[int, int] = {}
    for t in tensors:
        s = t.untyped_storage()
        if s.data_ptr() not in exclude and s.nbytes() > 0:
            out[s.data_ptr()] = s.nbytes()
    return out


# -- the live-bytes peak --------------------------------------------------------------------------------


@dataclass
class Peak:
    baseline_bytes: int  # alive at the start of the step
    peak_bytes: int  # the most alive at any moment of the step
    reserved_bytes: int = 0  # CUDA: max_memory_reserved
    device_bytes: int = 0  # CUDA: the device's used memory after the step (total - free, as nvidia-smi)
    at_s: float = 0.0  # seconds into the step when the peak was reached (CPU)


def cpu_step_peak(step: Any, baseline_bytes: int) -> Peak:
    """Run ``step()`` under the torch profiler's memory events; the peak of ``baseline_bytes`` plus the
    running sum of allocations minus frees."""
    from torch.profiler import ProfilerActivity, profile

    gc.collect()
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        step()
    events = sorted(
        (e.start_ns(), i, e.nbytes())
        for i, e in enumerate(prof.profiler.kineto_results.events())  # type: ignore[union-attr]
        if e.name() == "[memory]" and str(e.device_type()) == "DeviceType.CPU"
    )
    live = top = 0
    t0 = t_top = events[0][0] if events else 0
    for ts, _, nbytes in events:
        live += nbytes
        if live > top:
            top, t_top = live, ts
    return Peak(baseline_bytes, baseline_bytes + top, at_s=(t_top - t0) / 1e9)


def cuda_step_peak(step: Any, device: str) -> Peak:
    torch.cuda.synchronize(device)
    gc.collect()
    torch.cuda.reset_peak_memory_stats(device)
    baseline = torch.cuda.memory_allocated(device)
    step()
    torch.cuda.synchronize(device)
    free, total = torch.cuda.mem_get_info(device)
    return Peak(
        baseline,
        torch.cuda.max_memory_allocated(device),
        torch.cuda.max_memory_reserved(device),
        device_bytes=total - free,
    )


# -- one measurement ------------------------------------------------------------------------------------


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


# -- the planner's side and the comparison --------------------------------------------------------------


def predict(arch: ArchSpec, setup: TrainSetup, device: str = "cpu") -> dict[str, int]:
    """The planner's numbers for the measured quantities, on ``device``'s semantics.

    ``optimizer_state`` is the bytes of the state tensors, paged or not; on CPU paged optimizers fall
    back to unpaged ones, so their state counts in the peak there (on CUDA it lives in unified memory,
    outside ``max_memory_allocated``). ``dynamic`` is what the step adds to what is alive when it starts:
    the LoRA gradients (alive across accumulated micro-batches) and the activation peak terms.
    """
    dev = device.split(":")[0]
    est = memory.estimate(arch, setup, device=dev)
    b = est.breakdown
    out = {k: b[k] for k in STATIC}
    out["optimizer_state"] = memory.optimizer_state_bytes(arch, setup)
    saved = saved_bytes(arch, setup, dev)
    layers: list[dict[str, int]] = saved["layers"]  # type: ignore[assignment]
    out["saved"] = int(saved["total"])  # type: ignore[call-overload]
    out["saved_ctx"] = sum(p.get("quant.kept_inputs", 0) for p in layers)
    for k in ("activations", "logits_loss", "transient"):
        out[k] = b[k]
    out["dynamic"] = b["lora_grads"] + b["activations"] + b["logits_loss"] + b["transient"]
    if dev == "cuda":
        out["peak_allocated"] = est.peak_allocated_bytes
        out["peak_reserved"] = est.peak_reserved_bytes
        out["device"] = est.device_bytes
    else:
        out["peak"] = sum(out[k] for k in STATIC if k != "lora_grads") + out["dynamic"]
    return out


@dataclass(frozen=True)
class Row:
    term: str
    measured: int
    predicted: int

    @property
    def error(self) -> float:
        """Signed relative error of the prediction (0 when both are 0)."""
        if not self.measured:
            return 0.0 if not self.predicted else float("inf")
        return (self.predicted - self.measured) / self.measured


def compare(m: Measurement, predicted: Mapping[str, int]) -> list[Row]:
    """Measured next to predicted, term by term: the static terms, ``saved`` (everything kept for
    backward; ``saved_ctx`` the part custom functions keep on ``ctx``), ``dynamic`` (the peak above what
    is alive when the step starts) and the peak itself (CPU: live tensor bytes; CUDA: allocated,
    reserved, and the device's used memory)."""
    rows = [Row(k, m.terms[k], predicted[k]) for k in STATIC]
    rows.append(Row("saved", m.saved_bytes, predicted["saved"]))
    rows.append(Row("saved_ctx", m.saved_ctx_bytes, predicted["saved_ctx"]))
    rows.append(Row("dynamic", m.peak.peak_bytes - m.peak.baseline_bytes, predicted["dynamic"]))
    if "peak_allocated" in predicted:
        rows.append(Row("peak_allocated", m.peak.peak_bytes, predicted["peak_allocated"]))
        rows.append(Row("peak_reserved", m.peak.reserved_bytes, predicted["peak_reserved"]))
        rows.append(Row("device", m.peak.device_bytes, predicted["device"]))
    else:
        rows.append(Row("peak", m.peak.peak_bytes, predicted["peak"]))
    return rows


@dataclass
class Report:
    """One measurement next to the planner: what ``tools/measure_memory.py`` prints and writes."""

    model: str
    device: str
    setup: TrainSetup
    grad_accum: int
    rows: list[Row]
    measurement: Measurement
    predicted: dict[str, int]
    moment: str  # where the planner puts the peak

    def row(self, term: str) -> Row:
        return next(r for r in self.rows if r.term == term)

    def to_json(self) -> dict[str, Any]:
        setup = {k: (list(v) if isinstance(v, tuple) else v) for k, v in asdict(self.setup).items()}
        return {
            "model": self.model,
            "device": self.device,
            "setup": setup,
            "grad_accum": self.grad_accum,
            "planner_peak_moment": self.moment,
            "terms": [{**asdict(r), "error": r.error} for r in self.rows],
            "predicted": self.predicted,
            "peak": asdict(self.measurement.peak),
            "losses": self.measurement.losses,
            "step_s": self.measurement.step_s,
        }


def measure_and_compare(
    model: Any,
    arch: ArchSpec,
    setup: TrainSetup,
    device: str = "cpu",
    steps: int = 2,
    grad_accum: int = 2,
    seed: int = 0,
) -> Report:
    """Step a model loaded by :func:`load_for_training` and compare with the planner."""
    m = measure_model(model, setup, arch.vocab_size, device, steps, grad_accum, seed)
    predicted = predict(arch, setup, device)
    moment = peak_moment(arch, setup, device.split(":")[0])
    return Report(arch.name, device, setup, grad_accum, compare(m, predicted), m, predicted, moment)


def run(
    config: Mapping[str, Any],
    setup: TrainSetup,
    device: str = "cpu",
    steps: int = 2,
    grad_accum: int = 2,
    model_dir: str | Path | None = None,
    name: str = "",
    work_dir: str | Path | None = None,
) -> Report:
    """Build a random-init model from ``config`` (or load ``model_dir``, a checkpoint with weights), load
    it the way ``train`` does, step it and compare: the whole of ``tools/measure_memory.py``. The random
    model is written to a temporary directory (under ``work_dir``) that is removed afterwards."""
    arch = arch_from_config(config, name or str(config.get("model_type")))
    with contextlib.ExitStack() as stack:
        if model_dir is None:
            tmp = stack.enter_context(tempfile.TemporaryDirectory(prefix="qlora-kit-measure-", dir=work_dir))
            # 16-bit weights on a GPU (a 7B checkpoint is 13.5 GB); fp32 for the tiny CPU models
            save_dtype = "fp32" if device == "cpu" else "bf16"
            model_dir = save_random_model(config, tmp, save_dtype, device)
        model = load_for_training(model_dir, setup, device)
        report = measure_and_compare(model, arch, setup, device, steps, grad_accum)
        del model
        gc.collect()
    return report


def write_json(report: Report, path: str | Path) -> None:
    Path(path).write_text(json.dumps(report.to_json(), indent=1) + "\n")
