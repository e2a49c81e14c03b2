"""A LoRA linear that picks its computation order per layer from a FLOP model (after RunLoRA).

``y = base(x) + s * (x A^T) B^T`` can be computed in equivalent orders. Forward: ``split`` (the base
matmul, then the rank-r branch, as peft does) or ``merged`` (``x (W + s B A)^T``: one big matmul after
a d_out x r x d_in product). Backward, the input gradient: ``split`` (``dy W + s (dy B) A``) or ``merged``
(``dy (W + s B A)``). :func:`choose` counts the FLOPs of each feasible pair over the layer's actual
shapes (tokens, d_in, d_out, r) and whether A trains (LoRA-FA freezes it) and takes the cheapest.

The autograd function saves only what the chosen order needs: the branch input x when A trains (for
A's gradient), ``x A^T`` (n x r) when it was computed anyway or A is frozen; never a dequantized weight
(bitsandbytes' 4-bit and 8-bit weights are dequantized again in backward, as bitsandbytes itself does).
With LoRA-FA a layer keeps only ``x A^T``.

It is installed on a peft model after ``get_peft_model`` by switching each peft LoRA linear's class to a
subclass whose ``forward`` takes this path when it applies (one active unmerged adapter, gradients on,
no DoRA, LoRA bias or active dropout: with dropout the branch sees dropout(x), so only peft's order is
equivalent and peft's layer runs) and defers to peft's otherwise: the module tree and state-dict keys are peft's,
so the saved adapter is standard peft format.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

from qlora_kit.plan.flops import PEFT_ORDER, Order, choose, flops, saved_elements

__all__ = ["PEFT_ORDER", "Order", "choose", "chosen_orders", "flops", "install", "saved_elements"]


# -- the base layer's weight ---------------------------------------------------------------------------


def base_kind(base: Any) -> str | None:
    """ "4bit", "8bit", "linear", or None for a base this module does not handle."""
    import bitsandbytes as bnb

    if isinstance(base, bnb.nn.Linear4bit):
        return "4bit"
    if isinstance(base, bnb.nn.Linear8bitLt):
        return "8bit"
    if type(base) is torch.nn.Linear:
        return "linear"
    return None


def dense_weight(base: Any, kind: str, dtype: torch.dtype) -> torch.Tensor:
    """The base weight (d_out x d_in) in ``dtype``, dequantized the way bitsandbytes' own autograd
    functions dequantize it on CPU (``MatMul4Bit``, ``MatMul8bitFp``)."""
    if kind == "4bit":
        import bitsandbytes.functional as bnbf

        return bnbf.dequantize_4bit(base.weight.data, base.weight.quant_state).to(dtype)
    if kind == "8bit":
        state = base.state
        if base.weight.CB is not None:
            base.init_8bit_state()  # what Linear8bitLt.forward does first: move CB/SCB to its state
        cb = state.CB if state.CB is not None else base.weight.data
        return cb.to(dtype).mul_(state.SCB.unsqueeze(1).mul(1.0 / 127.0))
    return base.weight.to(dtype)


def base_compute_dtype(base: Any, kind: str, x: torch.Tensor, autocast: torch.dtype | None) -> torch.dtype:
    """The dtype the base matmul runs in: a 4-bit layer's compute dtype, else autocast's or x's."""
    if kind == "4bit" and base.compute_dtype is not None:
        return base.compute_dtype
    return autocast or (x.dtype if kind == "8bit" else base.weight.dtype)


def _merged(w: torch.Tensor, a: torch.Tensor, b: torch.Tensor, s: float) -> torch.Tensor:
    """W + s B A in W's dtype, with one new d_out x d_in tensor when the dtypes agree."""
    if w.dtype == a.dtype:
        return torch.addmm(w, b, a, alpha=s)
    return w + (b @ a).mul_(s).to(w.dtype)


class _LoraLinear(torch.autograd.Function):
    """y = base(x) + s (x A^T) B^T in a chosen :class:`Order`."""

    @staticmethod
    def forward(ctx: Any, x: Any, a: Any, b: Any, bias: Any, layer: Any) -> Any:
        base, kind, order, s, cd, ld = layer
        train_a = a.requires_grad
        x2 = x.reshape(-1, x.shape[-1])
        xl = x2.to(ld)  # the branch's input in its dtype (x itself unless autocast or a 16-bit residual)
        a_l, b_l = a.to(ld), b.to(ld)
        xa = None
        if order.forward == "split":  # a quantized base's own forward (no graph is recorded in here)
            if kind == "linear":
                bias_c = None if bias is None else bias.to(cd)
                y = F.linear(x2.to(cd), base.weight.to(cd), bias_c).to(x.dtype)
            else:
                y = base(x2).to(x.dtype)
            xa = xl @ a_l.t()
            y = y + ((xa @ b_l.t()) * s).to(x.dtype)
        else:
            w = _merged(dense_weight(base, kind, cd), a_l, b_l, s)
            y = F.linear(x2.to(cd), w, None if bias is None else bias.to(cd)).to(x.dtype)
            del w
            if not train_a:  # LoRA-FA keeps x A^T (n x r) rather than x (n x d_in)
                xa = xl @ a_l.t()
        ctx.layer, ctx.train_a = layer, train_a
        ctx.save_for_backward(xl if train_a else None, xa, a, b)
        return y.reshape(*x.shape[:-1], y.shape[-1])

    @staticmethod
    def backward(ctx: Any, dy: Any) -> Any:
        base, kind, order, s, cd, ld = ctx.layer
        xl, xa, a, b = ctx.saved_tensors
        dy2 = dy.reshape(-1, dy.shape[-1])
        dy_l, a_l, b_l = dy2.to(ld), a.to(ld), b.to(ld)
        if xa is None:  # merged forward with A training: x A^T again, from the saved x
            xa = xl @ a_l.t()
        db = (dy_l.t() @ xa) * s if ctx.needs_input_grad[2] else None
        dyb = dy_l @ b_l if (ctx.train_a or order.backward == "split") else None
        da = (dyb.t() @ xl) * s if ctx.train_a else None
        dx = None
        if ctx.needs_input_grad[0]:
            w = dense_weight(base, kind, cd)
            if order.backward == "merged":
                w = _merged(w, a_l, b_l, s)
            dx = (dy2.to(cd) @ w).to(dy.dtype)
            del w
            if order.backward == "split":
                dx.add_(((dyb * s) @ a_l).to(dy.dtype))
            dx = dx.reshape(*dy.shape[:-1], dx.shape[-1])
        da = None if da is None else da.to(a.dtype)
        db = None if db is None else db.to(b.dtype)
        return dx, da, db, None, None


# -- installing it on a peft model ---------------------------------------------------------------------


def _autocast_dtype(x: torch.Tensor) -> torch.dtype | None:
    dev = x.device.type
    return torch.get_autocast_dtype(dev) if torch.is_autocast_enabled(dev) else None


class RunLoraMixin:
    """Mixed into peft's LoRA linear classes: ``forward`` takes the order-choosing path when it applies."""

    runlora_order: Order | None = None  # the order of the last call (for reports and tests)
    runlora_force: Order | None = None  # tests: compute in this order instead of the FLOP model's choice

    def _runlora_adapter(self, x: torch.Tensor, args: tuple[Any, ...], kwargs: dict[str, Any]) -> str | None:
        lora: Any = self
        names = lora.active_adapters
        if args or kwargs or not torch.is_grad_enabled() or lora.disable_adapters or lora.merged or len(names) != 1:
            return None
        name = names[0]
        if name not in lora.lora_A or lora.use_dora.get(name, False):
            return None
        base = lora.get_base_layer()
        if base_kind(base) is None or base.weight.requires_grad:
            return None
        if base.bias is not None and base.bias.requires_grad:
            return None
        if lora.lora_A[name].bias is not None or lora.lora_B[name].bias is not None:
            return None
        drop = lora.lora_dropout[name]
        if lora.training and isinstance(drop, torch.nn.Dropout) and drop.p > 0:
            return None  # the branch sees dropout(x), not x: only peft's order applies, so take peft's layer
        return name

    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        lora: Any = self
        name = self._runlora_adapter(x, args, kwargs)
        if name is None:
            return super().forward(x, *args, **kwargs)  # type: ignore[misc]
        base = lora.get_base_layer()
        kind = base_kind(base)
        a, b = lora.lora_A[name].weight, lora.lora_B[name].weight
        n = x.numel() // x.shape[-1]
        order = self.runlora_force or choose(n, a.shape[1], b.shape[0], a.shape[0], a.requires_grad)
        self.runlora_order = order
        if order == PEFT_ORDER and a.requires_grad and kind != "8bit" and self.runlora_force is None:
            # the same computation and saved tensors as peft's layer: run it, without a Python autograd node
            return super().forward(x, *args, **kwargs)  # type: ignore[misc]
        ac = _autocast_dtype(x)
        cd = base_compute_dtype(base, str(kind), x, ac)
        ld = ac or a.dtype  # the branch's dtype: peft's (autocast's, else the adapter's, fp32)
        layer = (base, kind, order, float(lora.scaling[name]), cd, ld)
        with torch.autocast(x.device.type, enabled=False):
            return _LoraLinear.apply(x, a, b, base.bias, layer)


_CLASSES: dict[type, type] = {}


def _lora_linear_classes() -> tuple[type, ...]:
    from peft.tuners.lora import Linear
    from peft.tuners.lora.bnb import Linear4bit, Linear8bitLt

    return (Linear, Linear4bit, Linear8bitLt)


def install(model: Any) -> int:
    """Switch every peft LoRA linear of ``model`` over to the order-choosing forward (in place); returns
    how many layers it took. Parameters, buffers and state-dict keys stay as peft made them."""
    kinds = _lora_linear_classes()
    count = 0
    for module in model.modules():
        cls = type(module)
        if isinstance(module, RunLoraMixin) or cls not in kinds:
            continue
        if base_kind(module.get_base_layer()) is None:
            continue
        if cls not in _CLASSES:
            _CLASSES[cls] = type(f"RunLora{cls.__name__}", (RunLoraMixin, cls), {})
        module.__class__ = _CLASSES[cls]
        count += 1
    return count


def chosen_orders(model: Any) -> dict[str, Order]:
    """The order each installed layer used in its last forward, by module name."""
    return {
        name: m.runlora_order
        for name, m in model.named_modules()
        if isinstance(m, RunLoraMixin) and m.runlora_order is not None
    }
