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

The cuBLAS workspaces are ``workspace`` bytes each, two of them: torch keys a workspace by (cuBLAS handle,
stream) and hands out handles per thread (``CublasHandlePool.cpp``, ``DeviceThreadHandlePool``), and autograd
runs the CUDA backward on its own device thread (``torch/csrc/autograd/engine.cpp``), so the backward's first
matmul allocates a second one. :class:`Hooks` is where a wrapper (FSDP: :mod:`qlora_kit.plan.fsdptrace`)
puts its own allocations around the step's; the plain hooks are one GPU's.
"""

from __future__ import annotations

import math
from functools import lru_cache

from qlora_kit.catalog.arch import ArchSpec, LinearSpec
from qlora_kit.knobs import TrainSetup
from qlora_kit.plan.activations import loss_rows, saved_bytes, transient_bytes
from qlora_kit.plan.allocator import SMALL_SIZE, Event, replay
from qlora_kit.plan.moments import HEAD

FP32 = 4
DEFAULT_WORKSPACE = 32 << 20  # one cuBLAS workspace on a card of unknown generation (qlora_kit.plan.memory)


class _Trace:
    """Collects events; :meth:`new` returns the index a later :meth:`drop` frees. Small-pool requests (up to
    1 MiB) are left out unless ``small``: they never share a segment with the large pool, so they cannot change
    its fragmentation, and their own pool packs them into 2 MiB segments with little to lose."""

    def __init__(self, small: bool = False) -> None:
        self.events: list[Event] = []
        self.small = small

    def new(self, nbytes: int, stream: int = 0) -> int:
        if not self.small and nbytes <= SMALL_SIZE:
            return -1
        self.events.append(("+", max(int(nbytes), 1), stream) if stream else ("+", max(int(nbytes), 1)))
        return len(self.events) - 1

    def drop(self, index: int) -> None:
        if index >= 0:
            self.events.append(("-", index))

    def defer(self, index: int) -> None:
        """Free, but the block stays out of the cache until a later :meth:`drop` (another stream used it)."""
        if index >= 0:
            self.events.append(("~", index))

    def scratch(self, nbytes: int) -> None:
        if nbytes:
            self.drop(self.new(nbytes))


def norm_width(setup: TrainSetup) -> int:
    """Bytes per element of the unquantized parameters (fp32 after k-bit preparation's upcast)."""
    return 4 if setup.quant != "none" and setup.upcast == "all" else setup.dtype_bytes


def quantized_linears(arch: ArchSpec) -> tuple[LinearSpec, ...]:
    return () if not arch.bnb_quantizable else tuple(s for s in arch.layer_linears if not s.experts)


def weight_bytes(setup: TrainSetup, n: int) -> int:
    """Storage of one quantizable weight of ``n`` elements (the packed data; constants: :func:`constant_bytes`)."""
    return n * setup.dtype_bytes if setup.quant == "none" else n if setup.quant == "int8" else (n + 1) // 2


def constant_bytes(setup: TrainSetup, s: LinearSpec) -> int:
    """The quantization constants of one quantized weight (int8: a scale per row; 4-bit: an absmax per 64)."""
    if setup.quant == "int8":
        return s.d_out * 4
    blocks = math.ceil(s.weight_numel / 64)
    return 0 if setup.quant == "none" else blocks if setup.double_quant else blocks * 4


class Hooks:
    """One GPU: the model loads whole, the LoRA gradients stay whole, no communication."""

    def __init__(self, arch: ArchSpec, setup: TrainSetup, workspace: int) -> None:
        self.arch, self.setup, self.workspace = arch, setup, workspace

    def load(self, t: _Trace) -> None:
        arch, setup = self.arch, self.setup
        for _ in range(arch.num_layers):
            for s in quantized_linears(arch):
                t.new(weight_bytes(setup, s.weight_numel))
                t.new(constant_bytes(setup, s))
            for n in arch.layer_norm_sizes:
                t.new(n * norm_width(setup))
        groups = arch.param_groups()
        for key in ("embedding", "lm_head", "expert_weight"):
            if groups.get(key):
                t.new(groups[key] * norm_width(setup))
        for s in arch.linears_named(setup.targets):
            for _ in range(arch.num_layers):
                t.new(setup.rank * s.d_in * FP32)
                t.new(s.d_out * setup.rank * FP32)
        t.new(self.workspace)
        t.new(self.workspace)

    def layer_grads(self, t: _Trace) -> list[int]:
        """The LoRA gradients one layer's backward makes, kept until ``zero_grad``."""
        return [t.new(n * FP32) for n in self.lora_sizes()]

    def lora_sizes(self) -> list[int]:
        """Element counts of one layer's trained LoRA tensors."""
        out = []
        for s in self.arch.linears_named(self.setup.targets):
            out += (
                [s.d_out * self.setup.rank]
                if self.setup.lora_fa
                else [self.setup.rank * s.d_in, s.d_out * self.setup.rank]
            )
        return out

    def optimizer(self, t: _Trace) -> None:
        if self.setup.paged:  # CUDA unified memory: outside torch's allocator
            return
        for _ in range(self.arch.num_layers):
            for n in self.lora_sizes():
                eight = self.setup.optimizer.endswith("8bit") and n >= 4096
                per = n + math.ceil(n / 256) * 4 if eight else n * FP32
                t.new(per)
                t.new(per)

    # the wrapper's points in the step; one GPU does nothing there
    def root_forward(self, t: _Trace) -> None: ...
    def pre_forward(self, t: _Trace, layer: int) -> None: ...
    def post_forward(self, t: _Trace, layer: int) -> None: ...
    def pre_backward(self, t: _Trace, layer: int) -> None: ...
    def post_backward(self, t: _Trace, layer: int) -> None: ...
    def root_backward(self, t: _Trace) -> None: ...
    def end_step(self, t: _Trace) -> None: ...


def _step(arch: ArchSpec, setup: TrainSetup, t: _Trace, first: bool, hooks: Hooks) -> None:
    saved = saved_bytes(arch, setup)
    layers: list[dict[str, int]] = saved["layers"]  # type: ignore[assignment]
    rec: dict[str, int] = saved["recompute"]  # type: ignore[assignment]
    nl: dict[str, int] = saved["nonlayer"]  # type: ignore[assignment]
    transient = transient_bytes(arch, setup)
    hidden = setup.tokens * arch.hidden_size * (4 if setup.quant != "none" else setup.dtype_bytes)
    hooks.root_forward(t)
    pre = [t.new(v) for k, v in nl.items() if not k.startswith(HEAD)]
    kept: list[list[int]] = []
    for layer, piece in enumerate(layers):
        hooks.pre_forward(t, layer)
        if setup.grad_ckpt:  # the block runs without saving; its tensors come and go
            made = [t.new(v) for v in rec.values()]
            t.scratch(transient)
            for i in made:
                t.drop(i)
        else:
            t.scratch(transient)
        kept.append([t.new(v) for v in piece.values()])
        hooks.post_forward(t, layer)
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
    for layer in reversed(range(len(kept))):
        hooks.pre_backward(t, layer)
        made = [t.new(v) for v in rec.values()] if setup.grad_ckpt else []
        t.scratch(transient)
        grad_in = t.new(hidden)
        grads += hooks.layer_grads(t)
        for i in made + kept[layer]:
            t.drop(i)
        t.drop(grad_out)
        grad_out = grad_in
        hooks.post_backward(t, layer)
    t.drop(grad_out)
    for i in pre:
        t.drop(i)
    hooks.root_backward(t)
    if first:
        hooks.optimizer(t)
    for i in grads:
        t.drop(i)
    hooks.end_step(t)


def step_events(
    arch: ArchSpec,
    setup: TrainSetup,
    steps: int = 2,
    small: bool = False,
    workspace: int = DEFAULT_WORKSPACE,
    hooks: Hooks | None = None,
) -> list[Event]:
    """The allocations and frees of loading and ``steps`` training steps (module docstring); small-pool
    requests only if ``small``; ``hooks`` (default: one GPU's) add a wrapper's own."""
    t = _Trace(small)
    hooks = hooks or Hooks(arch, setup, workspace)
    hooks.load(t)
    for k in range(steps):
        _step(arch, setup, t, k == 0, hooks)
    return t.events


@lru_cache(maxsize=256)
def allocator_slack(
    arch: ArchSpec, setup: TrainSetup, allocator: str = "expandable", workspace: int = DEFAULT_WORKSPACE
) -> int:
    """Peak reserved less peak allocated when the step's events run through the allocator model."""
    r = replay(step_events(arch, setup, workspace=workspace), expandable=allocator == "expandable")
    return max(0, r.peak_reserved - r.peak_allocated)
