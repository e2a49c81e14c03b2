"""Choosing the knobs: search the settings a user left open and pick the best that fits the card.

Pure: no torch, no I/O. The preference order (documented in docs/planner.md and tested) is
lexicographic, most important first:

1. base precision: a 16-bit base if it fits, else NF4 with double quant (QLoRA: matches 16-bit LoRA
   quality in less memory). LLM.int8 and FP4 are used only when asked for: NF4 + double quant takes
   less memory than int8 at equal quality, and int8 matmuls are slower;
2. speed: gradient checkpointing off (it recomputes the forward pass, roughly a third more compute);
3. capacity: LoRA on all linear layers (the QLoRA paper's finding) before attention-only targets;
4. throughput: the largest micro-batch up to the effective batch;
5. optimizer: AdamW (LoRA state is small), then paged AdamW (spills to host on spikes), then paged
   8-bit AdamW.

A setting "fits" when its ``device_bytes`` plus a headroom of 5% of the card stays within the card.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any, cast

from qlora_kit.catalog import context
from qlora_kit.catalog.arch import ArchSpec
from qlora_kit.catalog.gpus import GIB, DeviceSpec, gpu_table
from qlora_kit.errors import UsageError
from qlora_kit.knobs import (
    ALL_LINEAR,
    ATTNS,
    DTYPES,
    OPTIMIZERS,
    QUANTS,
    STRATEGIES,
    UPCASTS,
    TrainSetup,
    double_quant_for,
    double_quant_refused,
)
from qlora_kit.plan import multigpu
from qlora_kit.plan.allocator import ALLOCATORS
from qlora_kit.plan.memory import Estimate
from qlora_kit.plan.targets import resolve_targets

MAX_MICRO_BATCH = 16


@dataclass(frozen=True)
class Constraints:
    """What the user fixed; ``None`` leaves a knob to the search."""

    quant: str | None = None
    double_quant: bool | None = None
    rank: int | None = None
    targets: str | None = None  # "all-linear", "default", or comma-separated leaf names
    optimizer: str | None = None
    batch_size: int | None = None
    seq_len: int | None = None
    grad_ckpt: bool | None = None
    attn: str = "sdpa"
    dtype: str | None = None
    effective_batch: int = 16
    lora_dropout: float = 0.05
    lora_fa: bool = False
    kernel: str = "peft"  # peft | runlora
    dora: bool = False  # lora.variant: dora (qlora_kit.plan.dora)
    rslora: bool = False  # lora.rslora: the scale only, no memory term
    upcast: str | None = None  # all | selective (qlora_kit.model.savers); None: searched (SAVERS)
    chunked_loss: bool | None = None  # None: searched (SAVERS)
    offload_ckpt: bool | None = None  # needs grad_ckpt; None: searched (SAVERS)
    gpus: int = 1  # GPUs available; the search prefers the fewest that fit (qlora_kit.plan.multigpu)
    strategy: str | None = None  # ddp | fsdp | fsdp-offload; None: searched
    allocator: str = "expandable"  # expandable (what train sets) | caching (qlora_kit.plan.allocator)
    rope_scaling: str | None = None  # linear | dynamic | yarn: a seq_len past the native context (catalog.context)


@dataclass(frozen=True)
class Candidate:
    setup: TrainSetup
    grad_accum: int
    targets_label: str
    estimate: Estimate  # per GPU
    fits: bool
    gpus: int = 1
    strategy: str = "ddp"

    def choice(self) -> dict[str, object]:
        s = self.setup
        return {
            "quant": s.quant,
            "double_quant": s.double_quant,
            "rank": s.rank,
            "targets": self.targets_label,
            "optimizer": s.optimizer,
            "batch_size": s.batch_size,
            "grad_accum": self.grad_accum,
            "seq_len": s.seq_len,
            "grad_ckpt": s.grad_ckpt,
            "attn": s.attn,
            "dtype": s.dtype,
        }

    def switches(self) -> dict[str, object]:
        """The LoRA variant and memory-saver switches (recipe keys lora.variant/kernel, quant.upcast,
        train.chunked_loss/offload_ckpt)."""
        s = self.setup
        return {
            "lora_fa": s.lora_fa,
            "kernel": "runlora" if s.runlora else "peft",
            "dora": s.dora,
            "rslora": s.rslora,
            "upcast": s.upcast,
            "chunked_loss": s.chunked_loss,
            "offload_ckpt": s.offload_ckpt,
        }


@dataclass(frozen=True)
class Plan:
    arch: ArchSpec
    device: DeviceSpec
    best: Candidate  # the chosen setting, or the smallest footprint when nothing fits
    fits: bool
    runners_up: list[Candidate] = field(default_factory=list)
    reasons: list[str] = field(default_factory=list)
    advice: list[str] = field(default_factory=list)
    allocator: str = "expandable"
    rope_scaling: str = "none"  # what the recipe's model.rope_scaling says: set only when the context is stretched

    @property
    def limit_bytes(self) -> int:
        return self.device.fit_limit


def _gib(n: float) -> str:
    return f"{n / GIB:.2f} GiB"


def _validate(arch: ArchSpec, c: Constraints, device: DeviceSpec) -> None:
    problems: list[str] = []
    if c.gpus < 1:
        problems.append(f"--gpus must be a positive integer, got {c.gpus}")
    if c.strategy is not None and c.strategy not in STRATEGIES:
        problems.append(f"--strategy must be one of {', '.join(STRATEGIES)}")
    if c.quant is not None and c.quant not in QUANTS:
        problems.append(f"--quant must be one of auto, {', '.join(QUANTS)}")
    if c.optimizer is not None and c.optimizer not in OPTIMIZERS:
        problems.append(f"--optimizer must be one of auto, {', '.join(OPTIMIZERS)}")
    if c.dtype is not None and c.dtype not in DTYPES:
        problems.append(f"--dtype must be one of {', '.join(DTYPES)}")
    if c.attn not in ATTNS:
        problems.append(f"--attn must be one of {', '.join(ATTNS)}")
    for name, value in (
        ("--rank", c.rank),
        ("--batch-size", c.batch_size),
        ("--seq-len", c.seq_len),
        ("--effective-batch", c.effective_batch),
    ):
        if value is not None and value < 1:
            problems.append(f"{name} must be a positive integer, got {value}")
    if double_quant_refused(c.quant, c.double_quant):
        problems.append(f"--double-quant applies to 4-bit bases only, not --quant {c.quant}")
    if c.dtype == "bf16" and not device.bf16:
        problems.append(f"{device.name} has no bf16 support; use --dtype fp16")
    if not 0 <= c.lora_dropout < 1:
        problems.append("--lora-dropout must be in [0, 1)")
    if c.allocator not in ALLOCATORS:
        problems.append(f"--allocator must be one of {', '.join(ALLOCATORS)}")
    if c.upcast is not None and c.upcast not in UPCASTS:
        problems.append(f"--upcast must be one of {', '.join(UPCASTS)}")
    if c.offload_ckpt and c.grad_ckpt is False:
        problems.append("--offload-ckpt offloads gradient checkpoints: it needs --grad-ckpt")
    if problems:
        raise UsageError("; ".join(problems), "see `qlora-kit plan --help`")
    context.check_context(
        context.of_arch(arch), c.seq_len or default_seq_len(arch), c.rope_scaling, "--seq-len", "--rope-scaling"
    )


def default_seq_len(arch: ArchSpec) -> int:
    return min(2048, arch.max_positions or 2048)


def _options(arch: ArchSpec, c: Constraints, device: DeviceSpec) -> dict[str, list[object]]:
    """Every knob's candidate values, best first (the module docstring's order)."""
    quants = [c.quant] if c.quant else ["none", "nf4"]
    target_specs: list[object] = [c.targets] if c.targets else [ALL_LINEAR, "default"]
    largest = min(MAX_MICRO_BATCH, c.effective_batch)
    batches = [c.batch_size] if c.batch_size else [b for b in (16, 8, 4, 2, 1) if b <= largest] or [1]
    return {
        "base": list(multigpu.bases(c.gpus, c.strategy, quants)),  # (GPUs, strategy, quant): fewest GPUs first
        "grad_ckpt": [c.grad_ckpt] if c.grad_ckpt is not None else [True] if c.offload_ckpt else [False, True],
        "targets": target_specs,
        "batch_size": list(batches),
        "optimizer": [c.optimizer] if c.optimizer else ["adamw", "paged_adamw", "paged_adamw8bit"],
    }


def _candidate(arch: ArchSpec, c: Constraints, device: DeviceSpec, knobs: dict[str, object]) -> Candidate:
    gpus, strategy, quant = cast(tuple[int, str, str], knobs["base"])
    double_quant = double_quant_for(quant, c.double_quant)
    spec = cast(str | None, knobs["targets"])
    label, names = resolve_targets(spec, arch.model_type, arch.linear_names(), arch.name)
    batch = int(knobs["batch_size"])  # type: ignore[call-overload]
    setup = TrainSetup(
        quant=quant,
        double_quant=double_quant,
        dtype=c.dtype or ("bf16" if device.bf16 else "fp16"),
        rank=c.rank or 16,
        targets=names,
        optimizer=str(knobs["optimizer"]),
        batch_size=batch,
        seq_len=c.seq_len or default_seq_len(arch),
        grad_ckpt=bool(knobs["grad_ckpt"]),
        attn=c.attn,
        lora_dropout=c.lora_dropout,
        lora_fa=c.lora_fa,
        runlora=c.kernel == "runlora",
        dora=c.dora,
        rslora=c.rslora,
        upcast=c.upcast or "all",
        chunked_loss=bool(c.chunked_loss),
        offload_ckpt=bool(c.offload_ckpt),
    )
    est = multigpu.per_gpu(arch, setup, gpus, strategy, c.allocator, device.family)
    # micro-batch per GPU: the GPUs together make up the effective batch
    accum = max(1, math.ceil(c.effective_batch / (batch * gpus)))
    return Candidate(setup, accum, label, est, est.device_bytes <= device.fit_limit, gpus, strategy)


def candidates(arch: ArchSpec, c: Constraints, device: DeviceSpec) -> list[Candidate]:
    """All settings in preference order (lexicographic over the knobs in ``_options`` order)."""
    opts = _options(arch, c, device)
    combos: list[dict[str, object]] = [{}]
    for knob, values in opts.items():
        combos = [{**combo, knob: v} for combo in combos for v in values]
    return [_candidate(arch, c, device, k) for k in combos]


# The memory savers, cheapest in speed first: the bf16 training-step table of ``tools/bench_train.py``
# (README): selective upcast 0.67x of peft + Trainer's step time (no slower than qlora-kit's own 0.75x),
# offloaded checkpoints 0.79x, chunked loss 0.93x. Each is turned on, cumulatively, only when no setting
# fits without it: a saver is the least preferred knob, so it never costs speed where the card holds the
# step without it. ``--upcast all``, ``--no-offload-ckpt``, ``--no-chunked-loss`` pin them off.
SAVERS: tuple[tuple[str, object, str], ...] = (
    ("upcast", "selective", "--upcast selective (embeddings and head stay 16-bit)"),
    ("offload_ckpt", True, "--offload-ckpt (checkpointed inputs in host memory)"),
    ("chunked_loss", True, "--chunked-loss (the loss 1024 rows at a time: no full logits)"),
)


def saver_steps(c: Constraints) -> list[tuple[Constraints, list[str]]]:
    """The constraints to search in turn: as given, then each unpinned saver added (with the reasons)."""
    steps: list[tuple[Constraints, list[str]]] = [(c, [])]
    on: list[str] = []
    for name, value, why in SAVERS:
        if getattr(c, name) is not None or (name == "offload_ckpt" and c.grad_ckpt is False):
            continue
        on.append(why)
        c = dataclasses.replace(c, **cast(dict[str, Any], {name: value}))
        steps.append((c, list(on)))
    return steps


def plan(arch: ArchSpec, device: DeviceSpec, c: Constraints) -> Plan:
    """Pick the best setting that fits, explain why, and say what would help when none does."""
    _validate(arch, c, device)
    for step, savers in saver_steps(c):
        cands = candidates(arch, step, device)
        fitting = [x for x in cands if x.fits]
        if fitting:
            best = fitting[0]
            runners = _runners_up(best, fitting[1:])
            reasons = multigpu.reasons(best.estimate, c.gpus, best.gpus, best.strategy)
            if savers:
                reasons.append("memory savers: nothing fits without " + "; ".join(savers))
            why = reasons + _reasons(arch, best, cands, device, step, c) + _context_reasons(arch, best.setup.seq_len, c)
            return Plan(arch, device, best, True, runners, why, [], c.allocator, _rope(arch, best.setup.seq_len, c))
    c = step
    smallest = min(cands, key=lambda x: x.estimate.device_bytes)
    return Plan(
        arch,
        device,
        smallest,
        False,
        [],
        [],
        _notes(arch, smallest.setup) + _advice(arch, c, device, smallest),
        c.allocator,
        _rope(arch, smallest.setup.seq_len, c),
    )


def _rope(arch: ArchSpec, seq_len: int, c: Constraints) -> str:
    """The RoPE scaling a plan trains with: the asked-for kind when the sequence is past the native context."""
    native = arch.max_positions
    return c.rope_scaling if c.rope_scaling and native and seq_len > native else "none"


def _context_reasons(arch: ArchSpec, seq_len: int, c: Constraints) -> list[str]:
    native = arch.max_positions
    if not c.rope_scaling or not native:
        return []
    if seq_len <= native:
        return [f"--rope-scaling {c.rope_scaling} not applied: {seq_len} tokens are within the native {native}"]
    factor = context.rope_factor(seq_len, native)
    return [f"context {seq_len} tokens: {c.rope_scaling} RoPE scaling, factor {factor:.2f} over the native {native}"]


def _runners_up(best: Candidate, rest: list[Candidate], n: int = 3) -> list[Candidate]:
    """Fitting alternatives that differ from the choice in a knob a user cares about."""
    picked: list[Candidate] = []
    seen = {(best.setup.quant, best.setup.grad_ckpt, best.targets_label)}
    for x in rest:
        key = (x.setup.quant, x.setup.grad_ckpt, x.targets_label)
        if key not in seen:
            seen.add(key)
            picked.append(x)
        if len(picked) == n:
            break
    return picked


def _notes(arch: ArchSpec, s: TrainSetup) -> list[str]:
    """Surprises of the stack that change what a setting means."""
    if s.quant != "none" and not arch.bnb_quantizable:
        return [
            "note: transformers' bitsandbytes integration does not quantize this architecture's linear "
            "layers; they stay 16-bit (fp32 after k-bit preparation)"
        ]
    return []


def _ckpt_reason(best: Candidate, cands: list[Candidate], c: Constraints, user: Constraints) -> str:
    """Why gradient checkpointing is on or off; ``c`` is the searched constraints (savers added), ``user`` the
    constraints as given, so a saver the search turned on is told apart from a flag."""
    s = best.setup
    if not s.grad_ckpt:
        if c.grad_ckpt is False:
            return "gradient checkpointing off: fixed by --grad-ckpt off"
        return "gradient checkpointing off: it fits without recomputing the forward pass (faster)"
    if c.grad_ckpt:
        return "gradient checkpointing on: fixed by --grad-ckpt on"
    if c.offload_ckpt:
        cause = "--offload-ckpt" if user.offload_ckpt else "the offloaded-checkpoints saver"
        return f"gradient checkpointing on: {cause} offloads the checkpointed inputs, so it needs checkpointing"
    no_ckpt = [
        x.estimate.device_bytes
        for x in cands
        if x.setup.quant == s.quant and not x.setup.grad_ckpt and (x.gpus, x.strategy) == (best.gpus, best.strategy)
    ]
    return f"gradient checkpointing on: without it the smallest setting needs {_gib(min(no_ckpt, default=0))}"


def _reasons(
    arch: ArchSpec, best: Candidate, cands: list[Candidate], device: DeviceSpec, c: Constraints, user: Constraints
) -> list[str]:
    s, limit = best.setup, device.fit_limit
    reasons: list[str] = []
    reasons += _notes(arch, s)
    if s.quant == "none":
        reasons.append(
            f"16-bit base: the unquantized model fits ({_gib(best.estimate.device_bytes)} of "
            f"{_gib(limit)} usable), so no quantization error"
        )
    else:
        same = [x for x in cands if (x.gpus, x.strategy) == (best.gpus, best.strategy)]
        need = min((x.estimate.device_bytes for x in same if x.setup.quant == "none"), default=0)
        if c.quant is None and best.gpus > 1 and best.strategy != "ddp":
            reasons.append(f"{s.quant.upper()} base: sharded, QLoRA comes before a 16-bit base (4x the bytes to move)")
        elif c.quant is None:
            reasons.append(
                f"{s.quant.upper()}{' + double quant' if s.double_quant else ''} base: a 16-bit "
                f"base needs at least {_gib(need)}, more than the {_gib(limit)} usable"
            )
        else:
            reasons.append(f"{s.quant} base: fixed by --quant")
    reasons.append(_ckpt_reason(best, cands, c, user))
    reasons.append(
        f"LoRA r={s.rank} on {best.targets_label}"
        + (" (all linear layers, as QLoRA recommends)" if best.targets_label == ALL_LINEAR else "")
    )
    reasons.append(
        f"micro-batch {s.batch_size} x {best.grad_accum} accumulation steps: the largest micro-batch "
        f"that fits for an effective batch of {s.batch_size * best.grad_accum}"
    )
    opt = best.estimate.paged_bytes or best.estimate.breakdown["optimizer_state"]
    if best.strategy == "fsdp-offload" and best.gpus > 1:
        reasons.append(f"optimizer {s.optimizer}: its state is offloaded to host RAM with the shards")
    else:
        where = "per GPU" if best.gpus > 1 else "on the GPU"
        reasons.append(f"optimizer {s.optimizer}: its state is {opt / (1 << 20):.0f} MiB {where}")
    return reasons


def _advice(arch: ArchSpec, c: Constraints, device: DeviceSpec, smallest: Candidate) -> list[str]:
    limit = device.fit_limit
    need = smallest.estimate.device_bytes
    advice = [
        f"nothing fits: the smallest setting needs {_gib(need)}, {_gib(need - limit)} more than the "
        f"{_gib(limit)} usable on {device.name}"
    ]
    # the longest sequence that fits with the smallest setting
    lo, hi = 0, smallest.setup.seq_len
    while lo < hi:
        mid = (lo + hi + 1) // 2
        shorter = smallest.setup.with_(seq_len=mid)
        est = multigpu.per_gpu(arch, shorter, smallest.gpus, smallest.strategy, c.allocator, device.family)
        if est.device_bytes <= limit:
            lo = mid
        else:
            hi = mid - 1
    if lo >= 64:
        advice.append(f"a shorter sequence: --seq-len {lo} fits with the smallest setting")
    bigger = sorted((d for d in gpu_table() if d.fit_limit >= need), key=lambda d: d.memory_bytes)
    if bigger:
        advice.append(f"a bigger card: {bigger[0].name} ({bigger[0].memory_gib:.0f} GiB) or larger")
    more = multigpu.fewest_gpus(arch, smallest.setup, limit, c.gpus, c.allocator, device.family)
    if more:
        advice.append(
            f"more GPUs: {more[0]} x {device.name} with {more[1]} (`--gpus {more[0]}`; activations are not sharded)"
        )
    return advice


def plan_json(p: Plan) -> dict[str, object]:
    """The ``plan --json`` object (schema in docs/planner.md)."""
    est = p.best.estimate
    return {
        "model": p.arch.name,
        "gpu": p.device.name,
        "gpu_bytes": p.device.memory_bytes,
        "limit_bytes": p.limit_bytes,
        "fits": p.fits,
        "peak_allocated_bytes": est.peak_allocated_bytes,
        "peak_reserved_bytes": est.peak_reserved_bytes,
        "device_bytes": est.device_bytes,
        "paged_bytes": est.paged_bytes,
        "host_bytes": est.host_bytes,
        "gpus": p.best.gpus,
        "strategy": p.best.strategy,
        "allocator": p.allocator,
        "rope_scaling": p.rope_scaling,
        "placement": multigpu.placement(est, p.best.gpus, p.best.strategy),
        "choice": {**p.best.choice(), **p.best.switches()},
        "breakdown": dict(est.breakdown),
        "reasons": list(p.reasons),
        "advice": list(p.advice),
        "runners_up": [
            {"choice": {**x.choice(), **x.switches()}, "device_bytes": x.estimate.device_bytes} for x in p.runners_up
        ],
    }
