"""The FLOP model behind :mod:`qlora_kit.model.runlora`: pure arithmetic, no torch (the planner imports it).

A LoRA linear ``y = base(x) + s (x A^T) B^T`` over n rows (batch x tokens), d_in -> d_out, rank r has
equivalent computation orders (RunLoRA, Cherniuk et al., arXiv 2312.03415); this counts each one's
FLOPs and picks the cheapest for the layer's shapes.
"""

from __future__ import annotations

from dataclasses import dataclass

FORWARDS = ("split", "merged")
BACKWARDS = ("split", "merged")


@dataclass(frozen=True)
class Order:
    """One computation order of a LoRA linear: how forward and the input gradient are computed."""

    forward: str = "split"
    backward: str = "split"


PEFT_ORDER = Order("split", "split")  # what peft's layer computes


def flops(order: Order, n: int, d_in: int, d_out: int, r: int, train_a: bool = True) -> int:
    """FLOPs of one forward and backward of the layer (a multiply-add counts 2, an elementwise op 1);
    ``n`` rows (batch x tokens). The input gradient is always counted (a layer's input needs one)."""
    base = 2 * n * d_in * d_out
    merge = 2 * d_out * r * d_in + d_out * d_in  # B A, then W + s B A
    xa = 2 * n * d_in * r
    f = base
    if order.forward == "split":
        f += xa + 2 * n * r * d_out + 2 * n * d_out  # x A^T, (x A^T) B^T, scale and add
    else:
        f += merge + (0 if train_a else xa)  # LoRA-FA keeps x A^T, not x: computed in forward
    b = 2 * n * d_out * r  # dB = s dy^T (x A^T)
    if order.forward == "merged" and train_a:
        b += xa  # x A^T recomputed from the saved x
    dyb = train_a or order.backward == "split"
    b += 2 * n * d_out * r if dyb else 0  # dy B
    b += 2 * n * r * d_in if train_a else 0  # dA = s (dy B)^T x
    if order.backward == "split":
        b += base + 2 * n * r * d_in + n * d_in  # dy W + s (dy B) A
    else:
        b += merge + base  # dy (W + s B A)
    return f + b


def saved_elements(order: Order, n: int, d_in: int, r: int, train_a: bool = True) -> int:
    """Elements the order keeps for backward (besides the weights): x for A's gradient when A trains,
    x A^T when forward computed it."""
    keep_x = n * d_in if train_a else 0
    keep_xa = n * r if (order.forward == "split" or not train_a) else 0
    return keep_x + keep_xa


def feasible(dropout: bool) -> list[Order]:
    """Orders that compute the same function: with dropout active the branch sees dropout(x), not x, so
    W and B A cannot share one matmul."""
    if dropout:
        return [PEFT_ORDER]
    return [Order(f, b) for f in FORWARDS for b in BACKWARDS]


MIN_GAIN = 0.01  # leave peft's order only for at least 1% fewer FLOPs


def choose(n: int, d_in: int, d_out: int, r: int, train_a: bool = True, dropout: bool = False) -> Order:
    """The cheapest feasible order by FLOPs (ties: fewer saved elements), or peft's order when no order
    saves at least ``MIN_GAIN`` of its FLOPs: a near-tie is noise in the model, while a merged order
    always pays for a weight-sized temporary (measured: 1.05x peft's time at a 0.0% predicted gain)."""
    best = min(
        feasible(dropout),
        key=lambda o: (flops(o, n, d_in, d_out, r, train_a), saved_elements(o, n, d_in, r, train_a), o != PEFT_ORDER),
    )
    if flops(best, n, d_in, d_out, r, train_a) > (1 - MIN_GAIN) * flops(PEFT_ORDER, n, d_in, d_out, r, train_a):
        return PEFT_ORDER
    return best
