"""A training step as the allocator sees it: the allocations and frees in order, from what the memory model knows.

The tensors are the memory model's own (:mod:`qlora_kit.plan.memory`'s static terms and
:func:`qlora_kit.plan.activations.saved_bytes`' pieces); the order is the step's:

1. load: every quantized weight and its constants, the unquantized parameters, the LoRA parameters, the cuBLAS
   workspace (first matmul);
2. per step: forward block by block (each block's saved pieces; under checkpointing the block's tensors are
   made and dropped, its input kept; the quantized matmuls' dequantized weight made and freed), the head and the
   loss, the two fp32 logits gradients, then backward from the last block (recomputing it under checkpointing,
   the block's input gradient made and the output gradient freed, the LoRA gradients made, the block's pieces
   freed), the optimizer state on the first step, and ``zero_grad(set_to_none=True)`` freeing the gradients.

Two steps run, so the second meets the cache the first left (the steady state ``max_memory_reserved`` reports).
:func:`allocator_slack` is the replay's peak reserved less its peak allocated: the bytes the allocator holds
beyond the tensors, added to the memory model's allocated peak.
"""

from __future__ import annotations

import math
from functools import lru_cache

from qlora_kit.catalog.arch import ArchSpec
from qlora_kit.knobs import TrainSetup
from qlora_kit.plan.activations import loss_rows, saved_bytes, transient_bytes
from qlora_kit.plan.allocator import SMALL_SIZE, Event, replay
from qlora_kit.plan.moments import HEAD

FP32 = 4
CUBLAS_WORKSPACE_BYTES = 32 << 20  # as in qlora_kit.plan.memory


class _Trace:
    """Collects events; :meth:`new` returns the index a later :meth:`drop` frees. Small-pool requests (up to
    1 MiB) are left out unless ``small``: they never share a segment with the large pool, so they cannot change
    its fragmentation, and their own pool packs them into 2 MiB segments with little to lose."""

    def __init__(self, small: bool = False) -> None:
        self.events: list[Event] = []
        self.small = small

    def new(self, nbytes: int) -> int:
        if not self.small and nbytes <= SMALL_SIZE:
            return -1
        self.events.append(("+", max(int(nbytes), 1)))
        return len(self.events) - 1

    def drop(self, index: int) -> None:
        if index >= 0:
            self.events.append(("-", index))

    def scratch(self, nbytes: int) -> None:
        if nbytes:
            self.drop(self.new(nbytes))


def _static(arch: ArchSpec, setup: TrainSetup, t: _Trace) -> None:
    quantized = () if not arch.bnb_quantizable else tuple(s for s in arch.layer_linears if not s.experts)
    for _ in range(arch.num_layers):
        for s in quantized:
            n = s.weight_numel
            if setup.quant == "none":
                t.new(n * setup.dtype_bytes)
            elif setup.quant == "int8":
                t.new(n)
                t.new(s.d_out * 4)
            else:
                t.new((n + 1) // 2)
                blocks = math.ceil(n / 64)
                t.new(blocks if setup.double_quant else blocks * 4)
        for n in arch.layer_norm_sizes:
            t.new(n * (4 if setup.quant != "none" and setup.upcast == "all" else setup.dtype_bytes))
    groups = arch.param_groups()
    width = 4 if setup.quant != "none" and setup.upcast == "all" else setup.dtype_bytes
    for key in ("embedding", "lm_head", "expert_weight"):
        if groups.get(key):
            t.new(groups[key] * width)
    for s in arch.linears_named(setup.targets):
        for _ in range(arch.num_layers):
            t.new(setup.rank * s.d_in * FP32)
            t.new(s.d_out * setup.rank * FP32)
    t.new(CUBLAS_WORKSPACE_BYTES)


def _lora_grads(arch: ArchSpec, setup: TrainSetup, t: _Trace) -> list[int]:
    out = []
    for s in arch.linears_named(setup.targets):
        if not setup.lora_fa:
            out.append(t.new(setup.rank * s.d_in * FP32))
        out.append(t.new(s.d_out * setup.rank * FP32))
    return out


def _optimizer_state(arch: ArchSpec, setup: TrainSetup, t: _Trace) -> None:
    if setup.paged:  # CUDA unified memory: outside torch's allocator
        return
    for s in arch.linears_named(setup.targets):
        sizes = [s.d_out * setup.rank] if setup.lora_fa else [setup.rank * s.d_in, s.d_out * setup.rank]
        for _ in range(arch.num_layers):
            for n in sizes:
                per = n + math.ceil(n / 256) * 4 if setup.optimizer.endswith("8bit") and n >= 4096 else n * FP32
                t.new(per)
                t.new(per)


def _step(arch: ArchSpec, setup: TrainSetup, t: _Trace, first: bool) -> None:
    saved = saved_bytes(arch, setup)
    layers: list[dict[str, int]] = saved["layers"]  # type: ignore[assignment]
    rec: dict[str, int] = saved["recompute"]  # type: ignore[assignment]
    nl: dict[str, int] = saved["nonlayer"]  # type: ignore[assignment]
    transient = transient_bytes(arch, setup)
    hidden = setup.tokens * arch.hidden_size * (4 if setup.quant != "none" else setup.dtype_bytes)
    pre = [t.new(v) for k, v in nl.items() if not k.startswith(HEAD)]
    kept: list[list[int]] = []
    for piece in layers:
        if setup.grad_ckpt:  # the block runs without saving; its tensors come and go
            made = [t.new(v) for v in rec.values()]
            t.scratch(transient)
            for i in made:
                t.drop(i)
        else:
            t.scratch(transient)
        kept.append([t.new(v) for v in piece.values()])
    head = [t.new(v) for k, v in nl.items() if k.startswith(HEAD)]
    rows = loss_rows(setup) * arch.vocab_size
    g1 = t.new(rows * FP32)
    g2 = t.new(rows * FP32)
    t.drop(g1)
    grad_out = t.new(hidden)
    t.drop(g2)
    for i in head:
        t.drop(i)
    grads: list[int] = []
    for piece_ids in reversed(kept):
        made = [t.new(v) for v in rec.values()] if setup.grad_ckpt else []
        t.scratch(transient)
        grad_in = t.new(hidden)
        grads += _lora_grads(arch, setup, t)
        for i in made + piece_ids:
            t.drop(i)
        t.drop(grad_out)
        grad_out = grad_in
    t.drop(grad_out)
    for i in pre:
        t.drop(i)
    if first:
        _optimizer_state(arch, setup, t)
    for i in grads:
        t.drop(i)


def step_events(arch: ArchSpec, setup: TrainSetup, steps: int = 2, small: bool = False) -> list[Event]:
    """The allocations and frees of loading and ``steps`` training steps (module docstring); small-pool
    requests only if ``small``."""
    t = _Trace(small)
    _static(arch, setup, t)
    for k in range(steps):
        _step(arch, setup, t, first=k == 0)
    return t.events


@lru_cache(maxsize=256)
def allocator_slack(arch: ArchSpec, setup: TrainSetup, allocator: str = "expandable") -> int:
    """Peak reserved less peak allocated when the step's events run through the allocator model."""
    r = replay(step_events(arch, setup), expandable=allocator == "expandable")
    return max(0, r.peak_reserved - r.peak_allocated)
