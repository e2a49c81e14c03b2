"""DoRA's memory on top of a LoRA branch: pure arithmetic, no torch.

peft 0.21's ``DoraLinearLayer.forward`` (``lora.variant: dora``) computes, for every adapted linear,

    out = base(x) + (m / ||W' + s BA|| - 1) * base_out + (m / ||W' + s BA||) * B(A(x)) * s

with W' the dequantized base weight and the row norm detached. What that adds to a LoRA step, read off
peft and measured against real CPU steps in ``tests/test_dora_stages.py``:

- kept for backward (:func:`saved_pieces`): both products keep their tensor operand, ``base_out`` and
  B(A(x)) (b x s x d_out each), and three d_out vectors (the norm, m / norm, and m / norm - 1 when
  ``base_out`` requires grad). With LoRA dropout active peft cannot reuse the base layer's output (it saw
  x, not dropout(x)), so it computes ``F.linear(dropout(x), W')`` itself, and that matmul keeps W' for
  the input's gradient: a dequantized copy of every adapted weight, alive until backward;
- a transient in every DoRA layer's forward (:func:`norm_transient_bytes`): B A built as
  ``lora_B(lora_A(I))`` from a d_in x d_in identity (peft avoids ``B @ A`` for FSDP's sake), W' (cast to
  the branch's dtype), s BA and W' + s BA, all d_out x d_in, before the norm reduces them to d_out.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from qlora_kit.plan.saved import Acc, Ctx

FP32 = 4


def saved_pieces(c: Ctx, acc: Acc, name: str, d_in: int, d_out: int, x_bytes: int, x_rg: bool, xl: int) -> None:
    """What DoRA keeps for backward in the linear ``name`` beyond its LoRA branch; ``xl`` is the dtype
    (bytes) of the branch's input after peft's cast, ``x_bytes`` of the layer's input."""
    bs = c.d.b * c.d.s
    if c.p > 0:  # F.linear(dropout(x), W'.to(x.dtype)): keeps W' (autocast: its 16-bit copy)
        e_w = 2 if c.ac else xl
        the_parameter = not c.quant and c.e_np == e_w  # a 16-bit base's own weight, already in that dtype
        acc.add(f"dora.{name}.weight_copy", d_out * d_in * e_w, x_rg and not the_parameter)
        e_base = e_w
    else:
        e_base = c.lin_out(x_bytes)  # the base layer's output itself
    acc.add(f"dora.{name}.base_out", bs * d_out * e_base)
    acc.add(f"dora.{name}.lora_out", bs * d_out * (2 if c.ac else FP32))
    acc.add(f"dora.{name}.row_norm", d_out * xl)
    acc.add(f"dora.{name}.scale", d_out * FP32)
    acc.add(f"dora.{name}.scale_minus_1", d_out * FP32, x_rg)


def branch_dtype(c: Ctx) -> int:
    """Bytes per element of the LoRA branch's input after peft's cast (see ``Ctx.lora``)."""
    sees = c.cuda if c.o.peft_sees_autocast is None else c.o.peft_sees_autocast
    return FP32 if (not c.quant) or not (c.ac and sees) else c.e_h


def norm_transient_bytes(c: Ctx, shapes: Iterable[tuple[int, int]]) -> int:
    """The largest, over the adapted linears' ``(d_in, d_out)``, of what is alive at once while peft computes
    one layer's row norm ||W' + s BA||: the identity and A's output (kept by the graph of BA, which the
    forward drops afterwards), and d_out x d_in matrices in the branch's dtype: BA, W' (a copy unless it is
    a 16-bit base's own weight in that dtype), s BA and their sum."""
    xl, r = branch_dtype(c), c.d.r
    matrices = 3 if not c.quant and c.e_np == xl else 4
    eye = FP32
    a_out = 2 if c.ac else FP32
    return max((d_in * (d_in * eye + r * a_out + matrices * d_out * xl) for d_in, d_out in shapes), default=0)
