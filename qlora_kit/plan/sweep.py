"""``qlora-kit plan --sweep KNOB=V1,V2,...``: one plan per value of one knob, for a side-by-side table.

Pure: no torch, no I/O. Each value replaces that knob in the user's constraints and the planner picks the
rest as usual, so a row shows what the value costs (or saves) and what else had to give.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, replace

from qlora_kit.catalog.arch import ArchSpec
from qlora_kit.catalog.gpus import DeviceSpec
from qlora_kit.errors import UsageError
from qlora_kit.knobs import ATTNS, DTYPES, OPTIMIZERS, QUANTS, UPCASTS
from qlora_kit.plan.search import Constraints, Plan, plan, plan_json

_BOOLS = {"on": True, "true": True, "yes": True, "1": True, "off": False, "false": False, "no": False, "0": False}


def _int(text: str) -> object:
    value = int(text)
    if value < 1:
        raise ValueError(text)
    return value


def _bool(text: str) -> object:
    return _BOOLS[text.lower()]


def _choice(*choices: str) -> Callable[[str], object]:
    def parse(text: str) -> object:
        if text not in choices:
            raise ValueError(text)
        return text

    parse.__doc__ = ", ".join(choices)
    return parse


# knob name -> (Constraints field, parser, what its values are); aliases share a row
KNOBS: dict[str, tuple[str, Callable[[str], object], str]] = {
    "rank": ("rank", _int, "positive integers"),
    "batch": ("batch_size", _int, "positive integers"),
    "seq": ("seq_len", _int, "positive integers"),
    "quant": ("quant", _choice(*QUANTS), ", ".join(QUANTS)),
    "optimizer": ("optimizer", _choice(*OPTIMIZERS), ", ".join(OPTIMIZERS)),
    "dtype": ("dtype", _choice(*DTYPES), ", ".join(DTYPES)),
    "attn": ("attn", _choice(*ATTNS), ", ".join(ATTNS)),
    "grad-ckpt": ("grad_ckpt", _bool, "on, off"),
    "lora-fa": ("lora_fa", _bool, "on, off"),
    "kernel": ("kernel", _choice("peft", "runlora"), "peft, runlora"),
    "dora": ("dora", _bool, "on, off"),
    "upcast": ("upcast", _choice(*UPCASTS), ", ".join(UPCASTS)),
    "chunked-loss": ("chunked_loss", _bool, "on, off"),
    "offload-ckpt": ("offload_ckpt", _bool, "on, off"),
}
ALIASES = {"batch-size": "batch", "batch_size": "batch", "seq-len": "seq", "seq_len": "seq", "r": "rank"}


@dataclass(frozen=True)
class Sweep:
    knob: str  # the knob's name as KNOBS spells it
    values: tuple[object, ...]  # parsed, in the order given
    labels: tuple[str, ...]  # as the user wrote them


@dataclass(frozen=True)
class SweepResult:
    sweep: Sweep
    plans: tuple[Plan, ...]  # one per value


def parse_sweep(spec: str) -> Sweep:
    """``KNOB=V1,V2,...`` -> a :class:`Sweep`; a bad spec raises one :class:`UsageError`."""
    fix = f"e.g. --sweep rank=4,8,16,32,64; knobs: {', '.join(KNOBS)}"
    name, sep, raw = spec.partition("=")
    name = ALIASES.get(name.strip().lower(), name.strip().lower())
    if not sep or not name:
        raise UsageError(f"--sweep {spec!r} is not KNOB=V1,V2,...", fix)
    if name not in KNOBS:
        raise UsageError(f"--sweep: unknown knob {name!r}", fix)
    labels = tuple(v.strip() for v in raw.split(","))
    if not raw.strip() or not all(labels):
        raise UsageError(f"--sweep {spec!r}: give one or more comma-separated values", fix)
    if len(set(labels)) != len(labels):
        raise UsageError(f"--sweep {spec!r}: a value repeats", "list each value once")
    _, parse, what = KNOBS[name]
    values = []
    for label in labels:
        try:
            values.append(parse(label))
        except (ValueError, KeyError):
            raise UsageError(f"--sweep {name}: {label!r} is not valid ({name} takes {what})", fix) from None
    return Sweep(name, tuple(values), labels)


def run_sweep(arch: ArchSpec, device: DeviceSpec, base: Constraints, sweep: Sweep) -> SweepResult:
    """One plan per value, the value replacing that knob of ``base`` (offloading checkpoints turns
    gradient checkpointing on, which it needs)."""
    field = KNOBS[sweep.knob][0]
    plans = []
    for value in sweep.values:
        c = replace(base, **{field: value})  # type: ignore[arg-type]  # parsed for this field by KNOBS
        if c.offload_ckpt and c.grad_ckpt is None:
            c = replace(c, grad_ckpt=True)
        plans.append(plan(arch, device, c))
    return SweepResult(sweep, tuple(plans))


def sweep_json(result: SweepResult) -> dict[str, object]:
    """The ``plan --sweep --json`` object: the knob, and per value its label and its plan's JSON."""
    return {
        "sweep": result.sweep.knob,
        "rows": [{"value": label, **plan_json(p)} for label, p in zip(result.sweep.labels, result.plans, strict=True)],
    }
