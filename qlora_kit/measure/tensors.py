"""Counting the bytes of a training step's tensors: storages, static terms, saved tensors, the peak.

Each storage is counted once. ``saved``: every tensor packed by ``torch.autograd.graph.saved_tensors_hooks``
plus the tensors custom autograd functions keep as plain ``ctx`` attributes (LLM.int8 keeps its input that
way). ``peak``: on CPU the bytes alive at the start of the step plus the running sum of the torch profiler's
allocation events; on CUDA ``torch.cuda.max_memory_allocated`` and ``max_memory_reserved``.

torch is imported here: this module is for the measurement tools and the tests, never for the planner.
"""

from __future__ import annotations

import contextlib
import gc
import weakref
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any

import torch

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
    parameters and other persistent tensors), as weak references: a graph freed during the forward (peft's
    DoRA builds one for its weight norm and drops it) frees its saved tensors, and a later tensor may reuse
    the address. Read the records with :func:`alive_records` once the forward is done."""
    recs: dict[int, Any] = {}

    def pack(t: Any) -> Any:
        try:
            ptr = t.untyped_storage().data_ptr()
        except (RuntimeError, NotImplementedError):
            return t
        if ptr not in exclude and (ptr not in recs or recs[ptr]() is None):
            recs[ptr] = weakref.ref(t)
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        yield recs


def alive_records(recs: Mapping[int, Any]) -> list[Any]:
    """The recorded saved tensors still alive (held by the graph backward will run)."""
    gc.collect()
    return [t for t in (ref() for ref in recs.values()) if t is not None]


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
