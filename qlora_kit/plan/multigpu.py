"""Memory per GPU when training runs on several: what is sharded, what is replicated, what goes to host.

Pure arithmetic on top of :func:`qlora_kit.plan.memory.estimate` (no torch). Every quantity is per GPU,
under the same keys as one GPU's estimate, so "is the 48 GB per GPU or in total?" has one answer:
per GPU. ``host_bytes`` is the host RAM the whole machine needs for offloaded state (all ranks).

- ``ddp`` (``DistributedDataParallel``): every GPU holds the whole model, its LoRA gradients and
  optimizer state; DDP adds its gradient buckets, a second fp32 copy of the trainable gradients
  (``gradient_as_bucket_view=False``, torch's default).
- ``fsdp`` (FSDP2 ``fully_shard`` per decoder layer + the root, ``qlora_kit.train.distributed``): parameters
  (the 4-bit weights stored as a float dtype, the unquantized ones, LoRA), LoRA gradients and optimizer
  state are split evenly over the GPUs. Replicated on every GPU: the activations, logits and loss
  (each GPU runs its own micro-batch), the transient dequantized weight, the 4-bit quantization
  constants (bitsandbytes keeps them in the layer's ``quant_state``, not in a parameter FSDP shards),
  cuBLAS workspace and CUDA context. Gathered while computing: the root module's parameters
  (embeddings, head, final norm: FSDP2 keeps the root unsharded from forward through backward) and
  ``GATHERED_LAYERS`` decoder layers at full size (the one computing and the one prefetched).
- ``fsdp-offload``: as ``fsdp``, but the sharded parameters, gradients and optimizer state live in
  host RAM (``CPUOffloadPolicy``); the GPU keeps the replicated and gathered bytes only.

Every multi-GPU strategy also holds NCCL's ring buffers, outside torch's allocator (so in ``device_bytes``,
not in reserved): :func:`nccl_buffer_bytes`.

DeepSpeed ZeRO-3 shards the same things as FSDP; the published ZeRO-3 measurement is compared with
the ``fsdp`` figures plus DeepSpeed's own gradient bucket (``tools/published_multigpu.py``). Not modelled:
the all-gather of the next layer overlapping the current one beyond ``GATHERED_LAYERS``; NCCL's tree
connections (FSDP's all-gathers and reduce-scatters run on the ring; NCCL 2.22+ connects an algorithm's
channels only when a collective first uses it) and NVLink SHARP (NVLS) buffers.
"""

from __future__ import annotations

import dataclasses
import math

from qlora_kit.catalog.arch import ArchSpec
from qlora_kit.knobs import STRATEGIES, TrainSetup
from qlora_kit.plan.memory import Estimate, cublas_workspace_bytes, estimate

SHARDED = ("linear_weights", "other_params", "lora_params", "lora_grads", "optimizer_state")
GATHERED_LAYERS = 2

# NCCL's per-connection buffers (src/init.cc DEFAULT_*BUFFSIZE, src/include/device.h): LL 8 lines x 512 threads x
# NCCL_STEPS 8 x 16 B, LL128 120 elements x 640 threads x 8 steps x 8 B, Simple 4 MiB (NCCL_BUFFSIZE). The P2P
# transport (src/transport/p2p.cc) puts all three on the receiving side of a connection (the Simple one on the
# sending side under P2P read, the same total) next to the ncclRecvMem/ncclSendMem headers, each side rounded up
# to CUDA_IPC_MIN (2 MiB). A ring channel gives each rank one receiving and one sending connection.
CUDA_IPC_MIN = 2 << 20
NCCL_LL, NCCL_LL128, NCCL_SIMPLE = 8 * 512 * 8 * 16, 120 * 640 * 8 * 8, 4 << 20
NCCL_HEADER = 4096  # ncclSendMem / ncclRecvMem (src/include/comm.h): padded to MEM_ALIGN, 4 KiB
# The fewest ring channels NCCL builds: one found by its topology search (PCIe; NVLink finds more), doubled by
# ncclTopoPostset (src/graph/connect.cc). An NVLink pair gets more (NCCL's search on an A100 NVSwitch pair: 6 at
# 40 GB/s, duplicated to 12 by ncclTopoDupChannels, 24 after ncclTopoPostset); the card's links are not known.
NCCL_RING_CHANNELS = 2


def _ipc_round(n: int) -> int:
    return -(-n // CUDA_IPC_MIN) * CUDA_IPC_MIN


def nccl_buffer_bytes(gpus: int, channels: int = NCCL_RING_CHANNELS) -> int:
    """NCCL's device buffers of one rank's ring (0 on one GPU): per channel a receiving connection with the LL, LL128
    and Simple buffers and a sending one, each rounded up to 2 MiB (12 MiB a channel at NCCL's defaults)."""
    if gpus <= 1:
        return 0
    per_channel = _ipc_round(NCCL_HEADER + NCCL_LL + NCCL_LL128 + NCCL_SIMPLE) + _ipc_round(NCCL_HEADER)
    return channels * per_channel


def root_param_bytes(arch: ArchSpec, est: Estimate) -> int:
    """Bytes of the parameters outside the decoder layers (embeddings, head, final norm), at the
    average width of the unquantized parameters."""
    groups = arch.param_groups()
    other_numel = sum(n for k, n in groups.items() if k not in ("linear_weight",)) or 1
    root_numel = groups.get("embedding", 0) + groups.get("lm_head", 0) + (arch.hidden_size if arch.final_norm else 0)
    return est.breakdown["other_params"] * root_numel // other_numel


def gathered_bytes(arch: ArchSpec, est: Estimate) -> int:
    """Full-size parameters alive at once under FSDP: the root's and ``GATHERED_LAYERS`` layers'."""
    b = est.breakdown
    root = root_param_bytes(arch, est)
    per_layer = (b["linear_weights"] + b["other_params"] - root + b["lora_params"]) / max(arch.num_layers, 1)
    return root + math.ceil(GATHERED_LAYERS * per_layer)


def per_gpu(
    arch: ArchSpec,
    setup: TrainSetup,
    gpus: int = 1,
    strategy: str = "ddp",
    allocator: str = "expandable",
    family: str = "",
    lora_bytes: int = 4,
) -> Estimate:
    """The memory of one GPU out of ``gpus`` training with ``strategy``; ``gpus == 1`` is one GPU's
    estimate unchanged. ``setup.batch_size`` is the micro-batch of each GPU; ``family`` the card's generation;
    ``lora_bytes`` the width of the LoRA weights, gradients and Adam state (2: kept in bf16, as Answer.AI's
    script does). The allocator slack: with ``caching`` under FSDP, the replay of FSDP1's wrap and steps
    (:mod:`qlora_kit.plan.fsdptrace`); with ``expandable``, one partly used page per pool of each stream FSDP
    allocates on; under DDP, the one-GPU step's (each GPU runs the same step on its own micro-batch)."""
    if strategy not in STRATEGIES:
        raise ValueError(f"strategy must be one of {', '.join(STRATEGIES)}, got {strategy!r}")
    single = estimate(arch, setup, allocator=allocator, family=family)
    if gpus <= 1:
        return single
    b = dict(single.breakdown)
    if lora_bytes != 4:
        for k in ("lora_params", "lora_grads", "optimizer_state"):
            b[k] = b[k] * lora_bytes // 4
    host = single.host_bytes * gpus  # offloaded activation checkpoints, every GPU's
    if strategy == "ddp":
        b["ddp_buckets"] = b["lora_grads"]
        b["fsdp_gathered"] = 0
    else:
        full = {k: b[k] for k in SHARDED}
        b["fsdp_gathered"] = gathered_bytes(arch, single)
        b["ddp_buckets"] = 0
        for k, v in full.items():
            b[k] = 0 if strategy == "fsdp-offload" else math.ceil(v / gpus)
        if strategy == "fsdp-offload":
            host += sum(full.values()) + single.paged_bytes
    cuda_context = b.pop("cuda_context")
    slack = b.pop("allocator_slack")
    if strategy != "ddp":
        offload = strategy == "fsdp-offload"
        if allocator == "caching":
            from qlora_kit.plan.fsdptrace import fsdp_slack  # only caching plans replay: keep `plan`'s start light

            slack = fsdp_slack(arch, setup, gpus, offload, lora_bytes, cublas_workspace_bytes(family))
        else:  # the compute, unshard and post-backward streams, and the pre-unshard one under offload
            slack *= 4 if offload else 3
    allocated = sum(b.values())
    b["allocator_slack"] = slack
    b["cuda_context"] = cuda_context
    b["nccl_buffers"] = nccl_buffer_bytes(gpus)
    paged = 0 if strategy == "fsdp-offload" else math.ceil(single.paged_bytes / (1 if strategy == "ddp" else gpus))
    return dataclasses.replace(
        single,
        peak_allocated_bytes=allocated,
        peak_reserved_bytes=allocated + slack,
        device_bytes=allocated + slack + cuda_context + b["nccl_buffers"],
        paged_bytes=paged,
        breakdown=b,
        host_bytes=host,
    )


def placement(est: Estimate, gpus: int, strategy: str) -> dict[str, list[str]]:
    """Which terms are sharded over the GPUs, held whole by every GPU, or kept in host RAM."""
    split = list(SHARDED) if gpus > 1 and strategy != "ddp" else []
    return {
        "sharded": split if strategy == "fsdp" else [],
        "replicated": [k for k, v in est.breakdown.items() if v and k not in split],
        "host": split if strategy == "fsdp-offload" else [],
    }


def placements(gpus: int, strategy: str | None) -> list[tuple[int, str]]:
    """(GPUs, strategy) pairs the planner tries, best first: data-parallel on all ``gpus`` (fastest:
    nothing gathered), then FSDP on the fewest GPUs that fit, then FSDP with CPU offload likewise."""
    if gpus <= 1:
        return [(1, "ddp")]
    counts = sorted({g for g in (2, 4, 8) if g < gpus} | {gpus})
    order: list[tuple[int, str]] = []
    for s in (strategy,) if strategy else STRATEGIES:
        order += [(gpus, s)] if s == "ddp" else [(g, s) for g in counts]
    return order


def bases(gpus: int, strategy: str | None, quants: list[str]) -> list[tuple[int, str, str]]:
    """(GPUs, strategy, base precision) in the planner's order: on GPUs that each hold the whole
    model (one GPU, or DDP), the base precisions in their usual order; sharded, QLoRA on the fewest
    GPUs first, a 16-bit base only after every 4-bit placement (it needs 4x the GPUs or host RAM)."""
    order = placements(gpus, strategy)
    whole = [(g, s, q) for g, s in order if s == "ddp" for q in quants]
    sharded = [(g, s) for g, s in order if s != "ddp"]
    ranked = sorted(quants, key=lambda q: q == "none")  # stable: 4-bit before 16-bit
    return whole + [(g, s, q) for q in ranked for g, s in sharded]


def fewest_gpus(
    arch: ArchSpec,
    setup: TrainSetup,
    limit_bytes: int,
    above: int = 1,
    allocator: str = "expandable",
    family: str = "",
) -> tuple[int, str] | None:
    """The fewest GPUs (more than ``above``, up to 64) of generation ``family`` on which ``setup`` fits per GPU:
    FSDP, else with offload."""
    for strategy in ("fsdp", "fsdp-offload"):
        for gpus in (2, 4, 8, 16, 32, 64):
            if gpus > above and per_gpu(arch, setup, gpus, strategy, allocator, family).device_bytes <= limit_bytes:
                return gpus, strategy
    return None


def reasons(est: Estimate, available: int, gpus: int, strategy: str) -> list[str]:
    """Why this many GPUs and this strategy, in the plan's words (nothing for a one-GPU plan)."""
    if available <= 1:
        return []
    gib = 1 << 30
    if strategy == "ddp":
        return [
            f"{gpus} GPUs, data-parallel (DDP): the model fits one GPU, so each holds all of it "
            f"({est.device_bytes / gib:.2f} GiB per GPU) and runs its own micro-batch"
        ]
    line = (
        f"{gpus} of {available} GPUs, {strategy}: the fewest that fit with the weights, LoRA gradients and "
        f"optimizer state sharded; activations are replicated ({est.device_bytes / gib:.2f} GiB per GPU)"
    )
    if strategy == "fsdp-offload":
        line += f"; {est.host_bytes / gib:.1f} GiB of host RAM for the offloaded state"
    return [line]
