"""``qlora-kit plan --max-seq``: the longest context that fits the card with the knobs the user fixed.

Pure: no torch, no I/O. A bisection over the sequence length, in steps of :data:`STEP` tokens, on the
memory model. The test at each length is cheap: the knobs left open take their leanest values (gradient
checkpointing on, micro-batch 1, every memory saver not pinned off), so only the base (GPUs, strategy,
quantization), the LoRA targets and the optimizer are searched. Memory grows with the sequence, so the
longest fitting length is where that test turns false. The answer is then planned as usual, the knobs
chosen at that length with the documented preference order.

The search stops at the model's native context, or with ``--rope-scaling`` at :data:`ROPE_MAX_FACTOR`
times it; a model with no stated context (ALiBi) stops at :data:`NO_LIMIT` tokens.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from qlora_kit.catalog import context
from qlora_kit.catalog.arch import ArchSpec
from qlora_kit.catalog.gpus import DeviceSpec
from qlora_kit.errors import UsageError
from qlora_kit.plan.search import Constraints, Plan, candidates, plan, saver_steps

STEP = 64  # tokens: the answer is a multiple of this (or the cap itself)
ROPE_MAX_FACTOR = 32  # how far --max-seq stretches RoPE at most
NO_LIMIT = 1 << 20  # tokens, for a model with no stated context


@dataclass(frozen=True)
class MaxSeq:
    plan: Plan  # planned at ``seq_len``, with a first reason saying how it was found
    seq_len: int  # the longest context that fits; the smallest tried when nothing fits
    cap: int  # the search's upper end
    capped: bool  # the cap itself fits: the card could take more than the search looked at


def _lean(c: Constraints, seq_len: int) -> Constraints:
    """The constraints with every open knob at its leanest value (each pinned knob kept)."""
    lean = saver_steps(c)[-1][0]  # every unpinned saver on
    return dataclasses.replace(
        lean,
        seq_len=seq_len,
        grad_ckpt=True if c.grad_ckpt is None else c.grad_ckpt,
        batch_size=c.batch_size or 1,
    )


def fits_at(arch: ArchSpec, device: DeviceSpec, c: Constraints, seq_len: int) -> bool:
    """Does some setting with the fixed knobs fit ``seq_len`` tokens?"""
    return any(x.fits for x in candidates(arch, _lean(c, seq_len), device))


def cap_of(arch: ArchSpec, c: Constraints) -> int:
    """The longest sequence the search tries (a RoPE scaling on a model without RoPE is refused here)."""
    native = arch.max_positions
    if native is None:
        return NO_LIMIT
    if c.rope_scaling:
        context.check_context(context.of_arch(arch), native + 1, c.rope_scaling, "--seq-len", "--rope-scaling")
        return native * ROPE_MAX_FACTOR
    return native


def longest_context(arch: ArchSpec, device: DeviceSpec, c: Constraints) -> MaxSeq:
    """The longest sequence (a multiple of :data:`STEP`, or the cap) that fits, planned."""
    if c.seq_len is not None:
        raise UsageError("--max-seq searches the sequence length, --seq-len fixes it", "drop one of them")
    cap = cap_of(arch, c)
    if fits_at(arch, device, c, cap):
        best, capped = cap, True
    else:
        lo, hi = 0, (cap - 1) // STEP  # in steps: lo fits (0: nothing yet), hi + 1 is known not to
        while lo < hi:
            mid = (lo + hi + 1) // 2
            lo, hi = (mid, hi) if fits_at(arch, device, c, mid * STEP) else (lo, mid - 1)
        best, capped = max(lo, 1) * STEP, False
    # the lean settings are among those the full search tries, so where they fit the plan fits
    found = plan(arch, device, dataclasses.replace(c, seq_len=best))
    why = _why(arch, c, best, cap, capped, found)
    return MaxSeq(dataclasses.replace(found, reasons=[why, *found.reasons]), best, cap, capped)


def _why(arch: ArchSpec, c: Constraints, best: int, cap: int, capped: bool, found: Plan) -> str:
    if not found.fits:
        return f"--max-seq: nothing fits even at {best} tokens"
    if not capped:
        return f"--max-seq: {best} tokens is the longest context that fits ({best + STEP} does not)"
    if arch.max_positions is None:
        return f"--max-seq: {best} tokens fit, the most the search tries (the model states no context limit)"
    if c.rope_scaling:
        return f"--max-seq: {best} tokens fit, {ROPE_MAX_FACTOR}x the native context, the most the search stretches it"
    more = "; --rope-scaling linear|dynamic|yarn searches past it" if context.of_arch(arch).rope else ""
    return f"--max-seq: the whole native context of {best} tokens fits{more}"


def max_seq_json(m: MaxSeq) -> dict[str, object]:
    return {"seq_len": m.seq_len, "step": STEP, "cap": m.cap, "capped": m.capped}
