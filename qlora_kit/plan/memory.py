"""The memory model: pure arithmetic in bytes, no torch.

Every term is a function of an :class:`~qlora_kit.catalog.arch.ArchSpec` and a :class:`TrainSetup`, with a
docstring that says where its constants come from. :func:`estimate` adds them into the three named
quantities the planner reports:

- ``peak_allocated_bytes``: what ``torch.cuda.max_memory_allocated()`` reports over one optimizer step
  (after the first, so optimizer state exists);
- ``peak_reserved_bytes``: the same plus what the caching allocator holds beyond the tensors
  (``max_memory_reserved``; :func:`slack_bytes`, from the allocator model in :mod:`qlora_kit.plan.allocator`);
- ``device_bytes``: reserved plus the CUDA context, what ``nvidia-smi`` shows and the card must hold.

The model describes the stack qlora-kit trains with: transformers' eager/SDPA attention, bitsandbytes
``Linear4bit``/``Linear8bitLt`` base layers, peft LoRA layers, and peft's
``prepare_model_for_kbit_training`` (which upcasts every non-4-bit 16-bit parameter to fp32).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from qlora_kit.catalog.arch import ArchSpec, LinearSpec
from qlora_kit.knobs import FOUR_BIT, TrainSetup
from qlora_kit.plan.activations import saved_bytes
from qlora_kit.plan.allocator import LARGE_BUFFER, SMALL_BUFFER
from qlora_kit.plan.moments import activation_peak_terms
from qlora_kit.plan.steptrace import allocator_slack

MIB = 1 << 20

# bitsandbytes 4-bit storage (QLoRA paper, arXiv 2305.14314, section 3; checked against real
# Params4bit tensors in tests/test_static_terms.py): two 4-bit codes per uint8, one absmax per
# block of 64 weights (fp32, or uint8 with double quant), a 16-entry fp32 code table per layer;
# double quant adds one fp32 absmax per 256 absmax values, a 256-entry fp32 table and an fp32 offset.
NF4_BLOCK = 64
DQ_BLOCK = 256
NF4_CODE_BYTES = 16 * 4
DQ_CODE_BYTES = 256 * 4 + 4
# bitsandbytes 8-bit optimizers keep tensors under 4096 elements in 32-bit
# (``min_8bit_size`` default) and quantize the rest blockwise: uint8 state plus one fp32 absmax per
# 256 values, per state; the two 256-entry fp32 quantization maps are shared by all parameters.
MIN_8BIT_SIZE = 4096
OPT8_BLOCK = 256
OPT8_QMAP_BYTES = 2 * 256 * 4
# CUDA context: an assumption until measured on a GPU. The documented figures are for a bare context, before a
# training step lazily loads its kernels (CUDA_MODULE_LOADING=LAZY, CUDA 11.7+, torch sets it since 1.13):
# 287,047,680 B lazy vs 666,632,192 B eager (pytorch/pytorch#86509), "around 400MB" with lazy loading
# (pytorch/pytorch#109888, 2023), 426 MiB on an RTX 6000 Ada with torch 2.10 + CUDA 13.0 (unslothai/unsloth-zoo#1053).
# No per-generation figure was found; 512 MiB stays above all of them for the kernels a step loads.
CUDA_CONTEXT_BYTES = 512 * MIB
# One cuBLAS workspace (aten/src/ATen/cuda/CublasHandlePool.cpp, parseChosenWorkspaceSize; CUBLAS_WORKSPACE_CONFIG
# unset): ":4096:8" = 32 MiB on compute capability 9.x, 10.x and 12.x (Hopper, Blackwell), else ":4096:2:16:8" =
# 8 MiB + 128 KiB. Torch keys workspaces by (handle, stream) and handles by thread, and the backward runs on
# autograd's device thread, so a training step holds two (qlora_kit.plan.steptrace). They come from the caching
# allocator, so they count as allocated. The cuBLASLt workspace (1 MiB, CUBLASLT_WORKSPACE_SIZE) is left out.
CUBLAS_WORKSPACE_BYTES = 32 * MIB
CUBLAS_WORKSPACE_SMALL = 4096 * 1024 * 2 + 16 * 1024 * 8
CUBLAS_32MIB_FAMILIES = ("Hopper", "Blackwell")
# Reserved - allocated under ``expandable_segments:True`` (what ``train`` sets): at most one partly used
# page per pool, 20 MiB (large) + 2 MiB (small). The replay of a step (``qlora_kit.plan.steptrace``) stays
# within it (tests/test_allocator.py); free pages beyond it are unmapped before an out-of-memory error.
EXPANDABLE_SLACK = LARGE_BUFFER + SMALL_BUFFER


@dataclass(frozen=True)
class Estimate:
    """A memory estimate: the three reported quantities and the bytes of every term."""

    peak_allocated_bytes: int
    peak_reserved_bytes: int
    device_bytes: int
    paged_bytes: int  # optimizer state in CUDA unified memory: may spill to host RAM
    host_bytes: int = 0  # checkpointed layers' inputs offloaded to host memory (``offload_ckpt``)
    breakdown: dict[str, int] = field(default_factory=dict)


# -- static terms -----------------------------------------------------------------------------------


def _quantized(arch: ArchSpec) -> tuple[LinearSpec, ...]:
    """The linear layers bitsandbytes quantizes: every nn.Linear/Conv1D but the output head.

    MoE experts stored as 3-D parameters (transformers 5 Mixtral) are not nn.Linear and stay 16-bit;
    so do all of an architecture whose linears the integration misses (``ArchSpec.bnb_quantizable``).
    """
    if not arch.bnb_quantizable:
        return ()
    layer = tuple(s for s in arch.layer_linears if not s.experts)
    return layer * arch.num_layers + arch.extra_linears


def linear_weight_bytes(arch: ArchSpec, setup: TrainSetup) -> int:
    """Storage of the quantizable linear weights: the packed data only (constants: ``quant_state_bytes``).

    16-bit: 2 B/weight. LLM.int8 (``Int8Params.CB``): 1 B/weight. NF4/FP4 (``Params4bit``): two
    4-bit codes per byte, ceil(n/2) B per layer.
    """
    layers = _quantized(arch)
    if setup.quant == "none":
        return sum(s.weight_numel for s in layers) * setup.dtype_bytes
    if setup.quant == "int8":
        return sum(s.weight_numel for s in layers)
    return sum((s.weight_numel + 1) // 2 for s in layers)


def quant_state_bytes(arch: ArchSpec, setup: TrainSetup) -> int:
    """Quantization constants of the quantized layers.

    LLM.int8: one fp32 scale per output row (``Int8Params.SCB``, Dettmers et al. 2022).
    NF4/FP4: one fp32 absmax per 64 weights (0.5 bit/param) and a 16-entry fp32 code table per layer;
    double quant: uint8 absmax, one fp32 absmax per 256 blocks, a 256-entry fp32 table and an fp32
    offset per layer, 8/64 + 32/(64*256) ~= 0.127 bit/param (QLoRA paper, section 3).
    """
    total = 0
    for s in _quantized(arch):
        if setup.quant == "int8":
            total += s.d_out * 4
        elif setup.quant in FOUR_BIT:
            blocks = math.ceil(s.weight_numel / NF4_BLOCK)
            total += NF4_CODE_BYTES
            if setup.double_quant:
                total += blocks + math.ceil(blocks / DQ_BLOCK) * 4 + DQ_CODE_BYTES
            else:
                total += blocks * 4
    return total


def other_param_bytes(arch: ArchSpec, setup: TrainSetup) -> int:
    """Parameters that stay unquantized: embeddings, head, norms, biases, router, MoE experts (and the
    linears of an architecture bitsandbytes misses).

    They load in ``dtype``; with a quantized base, peft's ``prepare_model_for_kbit_training`` casts
    every fp16/bf16 parameter that is not ``Params4bit`` to fp32 (peft/utils/other.py), unless the
    setup keeps them (``upcast="none"``); the selective upcast (``qlora_kit.model.savers``) casts the
    ``nn.LayerNorm`` parameters only (the "layernorm" families' norms; RMSNorms stay 16-bit).
    """
    numel = arch.num_params - sum(s.weight_numel for s in _quantized(arch))
    upcast = setup.quant != "none" and setup.upcast == "all"
    if setup.quant != "none" and setup.upcast == "selective" and arch.norm_kind == "layernorm":
        norm = arch.param_groups()["norm"]
        return norm * 4 + (numel - norm) * setup.dtype_bytes
    return numel * (4 if upcast else setup.dtype_bytes)


def lora_targets(arch: ArchSpec, setup: TrainSetup) -> tuple[LinearSpec, ...]:
    return arch.linears_named(setup.targets)


def lora_tensor_sizes(arch: ArchSpec, setup: TrainSetup) -> list[int]:
    """Element counts of every LoRA tensor: A is (r, d_in), B is (d_out, r), per target per layer; DoRA
    adds its magnitude, one fp32 value per output row (peft's ``lora_magnitude_vector``), after them."""
    sizes: list[int] = []
    for s in lora_targets(arch, setup):
        sizes += [setup.rank * s.d_in, s.d_out * setup.rank] * arch.num_layers
    if setup.dora:
        sizes += [s.d_out for s in lora_targets(arch, setup)] * arch.num_layers
    return sizes


def lora_param_bytes(arch: ArchSpec, setup: TrainSetup) -> int:
    """LoRA parameters, r (d_in + d_out) per adapted layer, in fp32: peft's ``get_peft_model``
    upcasts adapter weights of a 16-bit base (``autocast_adapter_dtype=True``); LoRA paper section 4."""
    return sum(lora_tensor_sizes(arch, setup)) * 4


def trained_lora_sizes(arch: ArchSpec, setup: TrainSetup) -> list[int]:
    """Element counts of the LoRA tensors that train: all of them, or only every B under LoRA-FA."""
    sizes = lora_tensor_sizes(arch, setup)
    return sizes[1::2] if setup.lora_fa else sizes


def lora_grad_bytes(arch: ArchSpec, setup: TrainSetup) -> int:
    """Gradients of the trained LoRA parameters, one fp32 value each (the frozen base has none)."""
    return sum(trained_lora_sizes(arch, setup)) * 4


def optimizer_state_bytes(arch: ArchSpec, setup: TrainSetup) -> int:
    """Optimizer state of the LoRA parameters.

    AdamW (torch or bitsandbytes 32-bit): exp_avg and exp_avg_sq in fp32, 8 B/param (torch's ``step``
    scalars live on the host). bitsandbytes 8-bit: for tensors with at least ``min_8bit_size`` = 4096
    elements, two uint8 states plus one fp32 absmax per 256 values each; smaller tensors keep 32-bit
    state; the two 256-entry fp32 maps are shared (bitsandbytes/optim/optimizer.py). Paged variants
    hold the same bytes in CUDA unified memory.
    """
    sizes = trained_lora_sizes(arch, setup)
    if not setup.optimizer.endswith("8bit"):
        return sum(sizes) * 8
    total = OPT8_QMAP_BYTES if any(n >= MIN_8BIT_SIZE for n in sizes) else 0
    for n in sizes:
        if n >= MIN_8BIT_SIZE:
            total += 2 * (n + math.ceil(n / OPT8_BLOCK) * 4)
        else:
            total += n * 8
    return total


def offloaded_bytes(arch: ArchSpec, setup: TrainSetup) -> int:
    """Host memory the offloaded checkpoints take: every checkpointed layer's input (``qlora_kit.model.savers``)."""
    offloaded: int = saved_bytes(arch, setup)["offloaded"]  # type: ignore[assignment]
    return offloaded


def cublas_workspace_bytes(family: str = "") -> int:
    """One cuBLAS workspace on a card of ``family`` (:data:`CUBLAS_WORKSPACE_BYTES`'s note); 32 MiB if unknown."""
    known = family and family not in CUBLAS_32MIB_FAMILIES and not family.startswith("CDNA")
    return CUBLAS_WORKSPACE_SMALL if known else CUBLAS_WORKSPACE_BYTES


def slack_bytes(arch: ArchSpec, setup: TrainSetup, allocator: str = "expandable", family: str = "") -> int:
    """Reserved - allocated at the peak: :data:`EXPANDABLE_SLACK` with expandable segments, else the caching
    allocator's replay of two training steps (:func:`qlora_kit.plan.steptrace.allocator_slack`)."""
    if allocator == "expandable":
        return EXPANDABLE_SLACK
    return allocator_slack(arch, setup, allocator, cublas_workspace_bytes(family))


def estimate(
    arch: ArchSpec, setup: TrainSetup, device: str = "cuda", allocator: str = "expandable", family: str = ""
) -> Estimate:
    """Add the terms into the three reported quantities (see the module docstring); ``allocator`` is
    ``expandable`` (``PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True``, what ``train`` sets) or ``caching``;
    ``family`` is the card's generation (``DeviceSpec.family``: the cuBLAS workspace size), "" if unknown.

    ``device="cpu"`` describes a step on the CPU instead (what ``tools/measure_memory.py`` checks the
    model against): CPU kernels' dtypes in the activation terms, and no cuBLAS workspace, allocator
    slack or CUDA context, so ``peak_allocated_bytes`` is the peak of live tensor bytes.
    """
    cuda = device == "cuda"
    opt = optimizer_state_bytes(arch, setup)
    breakdown = {
        "linear_weights": linear_weight_bytes(arch, setup),
        "quant_state": quant_state_bytes(arch, setup),
        "other_params": other_param_bytes(arch, setup),
        "lora_params": lora_param_bytes(arch, setup),
        "lora_grads": lora_grad_bytes(arch, setup),
        "optimizer_state": 0 if setup.paged else opt,
        **activation_peak_terms(arch, setup, device),
        "cublas_workspace": 2 * cublas_workspace_bytes(family) if cuda else 0,
    }
    allocated = sum(breakdown.values())
    slack = slack_bytes(arch, setup, allocator, family) if cuda else 0
    breakdown["allocator_slack"] = slack
    breakdown["cuda_context"] = CUDA_CONTEXT_BYTES if cuda else 0
    reserved = allocated + slack
    return Estimate(
        peak_allocated_bytes=allocated,
        peak_reserved_bytes=reserved,
        device_bytes=reserved + breakdown["cuda_context"],
        paged_bytes=opt if setup.paged else 0,
        host_bytes=offloaded_bytes(arch, setup) if cuda else 0,
        breakdown=breakdown,
    )
