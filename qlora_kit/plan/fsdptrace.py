"""FSDP1 as the caching allocator sees it: the flat parameters' wrap, all-gathers, reduce-scatters and offload copies.

The published multi-GPU runs (Answer.AI's ``train.py``, peft + accelerate) use FSDP1 (``FullyShardedDataParallel``,
``use_orig_params=False``, ``limit_all_gathers=True``, ``sync_module_states=True`` from a model on the CPU of rank 0,
``BACKWARD_PRE`` prefetch) with one unit per decoder layer, one per LoRA ``nn.Linear`` (their wrap policies wrap
every leaf module whose weight trains) and the root (embeddings, head, final norm). What it allocates, from
``torch/distributed/fsdp/_init_utils.py``, ``_flat_param.py``, ``_runtime_utils.py`` and ``_limiter_utils.py``
(facts only, no code taken), as :class:`FsdpHooks` adds it to :mod:`qlora_kit.plan.steptrace`'s step:

- wrap, per unit in post-order (a layer's LoRA units, the layer, ..., the root), on the default stream: the unit's
  parameters moved to the GPU one by one (``_move_module_to_device``); ``sync_module_states`` broadcasts them in
  buckets of at least 250 MiB (``PARAM_BROADCAST_BUCKET_SIZE``; a bucket of several tensors is flattened into a
  copy); the flat parameter (``torch.cat`` of them); its shard (a copy, ``_get_shard``); then the originals and the
  flat parameter are freed, and with CPU offload the shard moves to the host. Nothing empties the cache after the
  wrap, and the training loop resets the peak statistics there (Answer.AI: ``reset_peak_memory_stats``), so the
  step's peaks start from what the wrap left reserved;
- each unshard allocates the unit's padded full flat parameter on the *unshard stream* (a pool of its own), after
  copying the shard to the GPU on the pre-unshard stream under CPU offload (freed at the reshard);
- a reshard frees it with ``record_stream`` on the compute stream: ``allocated`` drops at once but the block is
  reusable only once the compute stream passes that point; the rate limiter lets at most two such frees be
  outstanding, waiting for the oldest before each all-gather; ``loss.item()`` at the end of a step waits for all;
- the root is not resharded after forward (it is the root), layers are; in backward the layer is unsharded again
  and the next one prefetched (``BACKWARD_PRE``);
- each LoRA unit's gradient is made whole on the compute stream, reduce-scattered into a shard allocated on the
  post-backward stream (kept until ``zero_grad``; copied to the host and freed under offload), the whole one freed;
- Adam's state is two shards per LoRA unit on the GPU, none under offload (the step runs on the host).

Left out: the LoRA units' own all-gathers (a few MiB at most, mostly the small pool), NCCL's buffers (outside
torch's allocator: :func:`qlora_kit.plan.multigpu.nccl_buffer_bytes` adds them to the device figure), the cuBLASLt
workspace (1 MiB).
"""

from __future__ import annotations

import math
from collections import deque
from functools import lru_cache

from qlora_kit.catalog.arch import ArchSpec
from qlora_kit.knobs import TrainSetup
from qlora_kit.plan.allocator import MIB, replay
from qlora_kit.plan.steptrace import (
    DEFAULT_WORKSPACE,
    Hooks,
    _Trace,
    constant_bytes,
    norm_width,
    quantized_linears,
    step_events,
    weight_bytes,
)

BROADCAST_BUCKET = 250 * MIB  # torch.distributed.fsdp._init_utils.PARAM_BROADCAST_BUCKET_SIZE
INFLIGHT_ALL_GATHERS = 2  # _FreeEventQueue's limit under limit_all_gathers=True
UNSHARD, PRE_UNSHARD, POST_BACKWARD = 1, 2, 3  # FSDP1's streams (0 is the compute stream)


class FsdpHooks(Hooks):
    """FSDP1 on ``gpus`` GPUs (rank 0's view), optionally with ``CPUOffload(offload_params=True)``; LoRA weights,
    gradients and Adam state ``lora_bytes`` per element (4: fp32, 2: Answer.AI's bf16 precision)."""

    def __init__(
        self, arch: ArchSpec, setup: TrainSetup, workspace: int, gpus: int, offload: bool, lora_bytes: int = 4
    ) -> None:
        super().__init__(arch, setup, workspace)
        self.gpus, self.offload, self.lora_bytes = gpus, offload, lora_bytes
        self.layer_tensors = [weight_bytes(setup, s.weight_numel) for s in quantized_linears(arch)]
        self.layer_tensors += [n * norm_width(setup) for n in arch.layer_norm_sizes]
        groups = arch.param_groups()
        root = [groups.get(k, 0) for k in ("embedding", "lm_head")] + [arch.hidden_size if arch.final_norm else 0]
        self.root_tensors = [n * norm_width(setup) for n in root if n]
        self._gathered: dict[int, tuple[int, int]] = {}  # layer -> (gather, device shard copy)
        self._freeing: deque[int] = deque()  # reshards whose record_stream frees are outstanding
        self._root: tuple[int, int] = (-1, -1)
        self._opt_shards: list[int] = []

    def shard(self, nbytes: int) -> int:
        return math.ceil(nbytes / self.gpus)

    def _wrap(self, t: _Trace, tensors: list[int]) -> int:
        """One unit's wrap; returns the kept shard's handle (-1 under offload: it moved to the host)."""
        moved = [t.new(n) for n in tensors]
        bucket: list[int] = []
        for n in [*tensors, 0]:
            if n:
                bucket.append(n)
            if bucket and (not n or sum(bucket) >= BROADCAST_BUCKET):
                if len(bucket) > 1:
                    t.scratch(sum(bucket))
                bucket = []
        flat = t.new(sum(tensors))
        shard = t.new(self.shard(sum(tensors)))
        for i in [*moved, flat]:
            t.drop(i)
        if self.offload:
            t.drop(shard)
            return -1
        return shard

    def load(self, t: _Trace) -> None:
        arch, setup = self.arch, self.setup
        for _ in range(arch.num_layers):  # bitsandbytes' constants: quantized on the GPU while loading, not flat
            for s in quantized_linears(arch):
                t.new(constant_bytes(setup, s))
        for _ in range(arch.num_layers):
            for n in self.lora_sizes():
                self._opt_shards.append(self.shard(n * self.lora_bytes))
                self._wrap(t, [n * self.lora_bytes])
            self._wrap(t, self.layer_tensors)
        self._wrap(t, self.root_tensors)
        t.events.append(("r", 0))
        t.new(self.workspace)
        t.new(self.workspace)

    def _unshard(self, t: _Trace, tensors: list[int]) -> tuple[int, int]:
        if len(self._freeing) >= INFLIGHT_ALL_GATHERS:
            t.drop(self._freeing.popleft())
        copy = t.new(self.shard(sum(tensors)), PRE_UNSHARD) if self.offload else -1
        return t.new(self.shard(sum(tensors)) * self.gpus, UNSHARD), copy

    def _reshard(self, t: _Trace, layer: int) -> None:
        gather, copy = self._gathered.pop(layer)
        t.defer(gather)
        self._freeing.append(gather)
        t.drop(copy)

    def root_forward(self, t: _Trace) -> None:
        self._root = self._unshard(t, self.root_tensors)

    def pre_forward(self, t: _Trace, layer: int) -> None:
        self._gathered[layer] = self._unshard(t, self.layer_tensors)

    def post_forward(self, t: _Trace, layer: int) -> None:
        self._reshard(t, layer)

    def pre_backward(self, t: _Trace, layer: int) -> None:
        for i in (layer, layer - 1):  # this layer, and the next one backward prefetches
            if i >= 0 and i not in self._gathered:
                self._gathered[i] = self._unshard(t, self.layer_tensors)

    def post_backward(self, t: _Trace, layer: int) -> None:
        self._reshard(t, layer)

    def layer_grads(self, t: _Trace) -> list[int]:
        kept = []
        for n in self.lora_sizes():
            whole = t.new(n * self.lora_bytes)
            shard = t.new(self.shard(n * self.lora_bytes), POST_BACKWARD)
            t.drop(whole)
            if self.offload:
                t.drop(shard)
            else:
                kept.append(shard)
        return kept

    def root_backward(self, t: _Trace) -> None:
        gather, copy = self._root
        t.defer(gather)
        self._freeing.append(gather)
        t.drop(copy)

    def optimizer(self, t: _Trace) -> None:
        if self.offload or self.setup.paged:
            return
        for n in self._opt_shards:
            t.new(n)
            t.new(n)

    def end_step(self, t: _Trace) -> None:
        while self._freeing:
            t.drop(self._freeing.popleft())


@lru_cache(maxsize=256)
def fsdp_slack(
    arch: ArchSpec,
    setup: TrainSetup,
    gpus: int,
    offload: bool,
    lora_bytes: int = 4,
    workspace: int = DEFAULT_WORKSPACE,
) -> int:
    """Peak reserved less peak allocated of two FSDP1 steps on the caching allocator (rank 0, after the wrap)."""
    hooks = FsdpHooks(arch, setup, workspace, gpus, offload, lora_bytes)
    r = replay(step_events(arch, setup, hooks=hooks))
    return max(0, r.peak_reserved - r.peak_allocated)
