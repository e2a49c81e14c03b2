"""The tensor math and file formats under ``qlora-kit export``; no transformers, no peft here.

- :func:`trained_rows`: the base weight as the adapter saw it in training, dequant(quant(W)), a slice
  of rows at a time (:mod:`qlora_kit.export.rounding` repeats bitsandbytes' arithmetic bit for bit);
- :func:`lora_delta`: scale * B @ A in fp32, oriented like the checkpoint tensor;
- :func:`plan_export`: every output tensor, where it comes from and what happens to it, and the
  output shards, from the headers alone (shapes are checked before anything is written);
- :func:`write_shards`: the output shards, tensor by tensor (file formats: :mod:`qlora_kit.export.shards`), so
  an export never holds more than the tensor it is merging.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from qlora_kit.adapter import QuantSource
from qlora_kit.errors import UsageError
from qlora_kit.export import rounding
from qlora_kit.export.layout import Adapter, Layout, LoraFactor
from qlora_kit.export.shards import Checkpoint, PlannedTensor, Shard, ShardWriter, shard_names
from qlora_kit.knobs import FOUR_BIT
from qlora_kit.model.load import TORCH_DTYPES

# -- what training computed with ----------------------------------------------------------------------


def trained_rows(
    weight: torch.Tensor, mode: str, double_quant: bool, dtype: torch.dtype, rows_per_piece: int = 1 << 30
) -> Iterator[tuple[int, torch.Tensor]]:
    """dequant(quant(W)) exactly as the training forward multiplied by it, in fp32, a slice of rows at a
    time: (first row, rows).

    ``weight`` is the checkpoint tensor in (out, in) orientation; ``dtype`` is the dtype the base was
    loaded in, which :func:`qlora_kit.model.load.load_base` also makes the 4-bit compute dtype. transformers 5.23
    casts the checkpoint tensor to the load dtype and hands it to ``Params4bit``/``Int8Params``, which
    quantize on ``.to(device)``; :mod:`qlora_kit.export.rounding` repeats bitsandbytes' arithmetic on it:

    - NF4/FP4 (+ double quant): the 4-bit codes dequantized to the compute dtype, which is what
      bitsandbytes 0.50's 4-bit matmul multiplies by (it dequantizes to its input's dtype, and
      ``Linear4bit`` casts its input to the compute dtype).
    - LLM.int8: ``CB * (SCB / 127)`` of the fp16 cast, what the CPU training forward (``MatMul8bitFp``)
      multiplies by. A GPU training step multiplies int8 activations by int8 weights instead: no
      dequantized weight reproduces that exactly.
    - ``none``: the checkpoint tensor in the load dtype.
    """
    w = weight.to(dtype).contiguous()
    if mode in FOUR_BIT:
        yield from rounding.roundtrip_4bit(w, mode, double_quant, dtype, rows_per_piece)
        return
    for first in range(0, w.shape[0], rows_per_piece):
        rows = w[first : first + rows_per_piece]
        if mode == "int8":
            yield first, rounding.roundtrip_int8(rows)
        elif mode == "none":
            yield first, rows.float()
        else:
            raise ValueError(f"unknown quantization mode {mode!r}")


def trained_weight(
    weight: torch.Tensor, mode: str, double_quant: bool, dtype: torch.dtype, conv1d: bool = False
) -> torch.Tensor:
    """:func:`trained_rows` whole, in the checkpoint's orientation (a GPT-2 ``Conv1D`` weight is stored
    (in, out) and quantized transposed)."""
    w = weight.T if conv1d else weight
    out = torch.cat([rows for _, rows in trained_rows(w, mode, double_quant, dtype)])
    return out.T if conv1d else out


# -- LoRA ---------------------------------------------------------------------------------------------


def lora_delta(factor: LoraFactor, transpose: bool = False) -> torch.Tensor:
    """scale * B @ A in fp32, in the orientation of the base tensor.

    ``transpose`` is for GPT-2's ``Conv1D``, whose weight is stored (in, out): peft's
    ``transpose(B @ A, fan_in_fan_out)``. An embedding's factors are A (r, num_embeddings) and
    B (dim, r), and its delta is (B @ A)^T (peft ``lora.Embedding.get_delta_weight``).
    """
    delta = (factor.b.float() @ factor.a.float()).mul_(factor.scale)
    return delta.T if transpose != factor.embedding else delta


def lora_delta_rows(factor: LoraFactor, first: int, last: int) -> torch.Tensor:
    """Rows ``first:last`` of a linear layer's delta, scale * B[first:last] @ A, in fp32."""
    return (factor.b[first:last].float() @ factor.a.float()).mul_(factor.scale)


# -- the plan: every output tensor, where it comes from, what happens to it -------------------------


@dataclass
class Op:
    """One output tensor: where it comes from and what happens to it."""

    out: PlannedTensor
    shard: int  # the checkpoint file its source tensor is in
    source: str  # the source tensor's checkpoint key
    quantized: bool = False
    conv1d: bool = False
    factor: LoraFactor | None = None
    replacement: torch.Tensor | None = None


@dataclass
class Plan:
    shards: list[list[Op]]  # output shards in order
    total_bytes: int
    merged: int
    largest_bytes: int
    untied: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    quant: QuantSource | None = None
    merge_into: str = "dequantized"


def plan_export(
    checkpoint: Checkpoint,
    layout: Layout,
    adapter: Adapter,
    qsource: QuantSource,
    merge_into: str,
    out_dtype: torch.dtype,
    shard_bytes: int,
) -> Plan:
    """Match every adapter tensor to a checkpoint tensor, check shapes, and lay out the output shards."""
    located = _locate(checkpoint, layout, adapter)
    changed = set(adapter.factors) | set(adapter.replacements)
    untie = [g for g in layout.ties if changed & set(g)]
    notes = [_untie_note(changed, group) for group in untie]
    ops: list[Op] = []
    for i, header in enumerate(checkpoint.headers):
        for key in header:
            name = layout.model_name(key)
            ops.append(_op(checkpoint, layout, adapter, merge_into, out_dtype, name or key, i, key, key))
            for group in untie:
                if name in group:
                    for member in group:
                        if member not in located:  # the tied copy the checkpoint leaves out
                            ops.append(_op(checkpoint, layout, adapter, merge_into, out_dtype, member, i, key, member))
    if merge_into == "dequantized" and qsource.mode != "none" and not layout.quantized:
        notes.append(
            f"transformers quantizes none of this model's weights with {qsource.mode} (its linears are not "
            "nn.Linear): the adapter was trained on the 16-bit weights, which the export merges into"
        )
    return Plan(
        _pack(ops, shard_bytes),
        sum(op.out.nbytes for op in ops),
        sum(1 for op in ops if op.factor is not None),
        max((op.out.nbytes for op in ops), default=0),
        [m for g in untie for m in g],
        notes,
        qsource,
        merge_into,
    )


def _locate(checkpoint: Checkpoint, layout: Layout, adapter: Adapter) -> dict[str, tuple[int, str]]:
    """model name -> (shard, checkpoint key); every tensor the adapter changes must be there (or tied)."""
    located: dict[str, tuple[int, str]] = {}
    for i, header in enumerate(checkpoint.headers):
        for key in header:
            name = layout.model_name(key)
            if name is not None:
                located[name] = (i, key)
    tie_of = {n: group for group in layout.ties for n in group}
    for name in set(adapter.factors) | set(adapter.replacements):
        if name not in located and not any(m in located for m in tie_of.get(name, [])):
            raise UsageError(
                f"the adapter changes {name}, which the base checkpoint does not have",
                "the adapter was trained on a different base: pass the right --base",
            )
    return located


def _untie_note(changed: set[str], group: list[str]) -> str:
    hit = sorted(changed & set(group))
    return (
        f"the adapter changes {', '.join(hit)}, which is tied to {', '.join(sorted(set(group) - set(hit)))}: "
        "the export unties them (each written separately, tie_word_embeddings=false) so the merged model "
        "computes what the adapter model did"
    )


def _op(
    checkpoint: Checkpoint,
    layout: Layout,
    adapter: Adapter,
    merge_into: str,
    out_dtype: torch.dtype,
    name: str,
    shard: int,
    key: str,
    out_name: str,
) -> Op:
    """One output tensor, its shapes checked against the adapter's factor or replacement."""
    src_dtype, shape = checkpoint.headers[shard][key]
    factor, replacement = adapter.factors.get(name), adapter.replacements.get(name)
    conv1d = name in layout.conv1d
    quantized = merge_into == "dequantized" and name in layout.quantized
    if replacement is not None:
        if quantized:
            raise UsageError(f"the adapter replaces the quantized weight {name}", "qlora-kit cannot merge that")
        if tuple(replacement.shape) != shape:
            raise UsageError(
                f"the adapter's {name} has shape {tuple(replacement.shape)}, the base's {shape}",
                "the adapter was trained on a different base (or resized its vocabulary): pass the right --base",
            )
    if factor is not None and factor.delta_shape(conv1d) != shape:
        raise UsageError(
            f"the LoRA factors for {factor.module} (A {tuple(factor.a.shape)}, B {tuple(factor.b.shape)}) "
            f"do not fit the base weight {key} of shape {shape}",
            "the adapter was trained on a different base: pass the right --base",
        )
    out_dtype_here = out_dtype if src_dtype.is_floating_point else src_dtype
    return Op(PlannedTensor(out_name, out_dtype_here, shape), shard, key, quantized, conv1d, factor, replacement)


def _pack(ops: list[Op], shard_bytes: int) -> list[list[Op]]:
    """Output shards in order, each up to ``shard_bytes`` (a larger tensor gets a shard of its own)."""
    shards: list[list[Op]] = [[]]
    size = 0
    for op in ops:
        if shards[-1] and size + op.out.nbytes > shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append(op)
        size += op.out.nbytes
    return shards


# -- writing --------------------------------------------------------------------------------------------


PIECE_ELEMENTS = 1 << 20  # elements per merged slice (4 MiB in fp32)


def produce(op: Op, shard: Shard, plan: Plan) -> Iterator[torch.Tensor]:
    """The output tensor of one op as flat pieces: a linear weight that is quantized or merged a slice
    of rows at a time, any other tensor streamed in chunks (a cast is elementwise), so neither an
    unmerged embedding nor an fp32 copy of a merged weight sits in memory whole (GPT-2's Conv1D and
    LoRA on embeddings are merged whole)."""
    q = plan.quant
    assert q is not None
    src_dtype = shard.dtype(op.source)
    if not src_dtype.is_floating_point:
        yield from shard.chunks(op.source)
        return
    load_dtype = TORCH_DTYPES.get(q.compute_dtype, src_dtype)
    if op.replacement is None and not op.quantized and op.factor is None:
        for piece in shard.chunks(op.source):
            # in dequantized mode, what the training forward held: the load dtype (k-bit prep upcasts exactly)
            yield _checked(op, piece.to(load_dtype) if plan.merge_into == "dequantized" else piece)
        return
    linear_factor = op.factor is not None and not op.factor.embedding
    if (op.quantized or linear_factor) and not op.conv1d and op.replacement is None:
        # a slice of rows at a time: the merge holds the 16-bit source plus one slice, not fp32 copies
        rows_per_piece = max(1, PIECE_ELEMENTS // max(1, shard.shape(op.source)[-1]))
        mode = q.mode if op.quantized else "none"
        dtype = load_dtype if op.quantized or plan.merge_into == "dequantized" else src_dtype
        for first, rows in trained_rows(shard.get(op.source), mode, q.double_quant, dtype, rows_per_piece):
            if op.factor is not None:
                last = first + rows.shape[0]
                rows.add_(lora_delta_rows(op.factor, first, last))
                if op.factor.magnitude is not None:
                    rows.mul_(dora_factor(op.factor.magnitude[first:last], rows, dim=1).unsqueeze(1))
            yield _checked(op, rows).reshape(-1)
        return
    if op.replacement is not None:
        weight = op.replacement
    elif op.quantized:
        weight = trained_weight(shard.get(op.source), q.mode, q.double_quant, load_dtype, op.conv1d)
    elif plan.merge_into == "dequantized":
        weight = shard.get(op.source).to(load_dtype)
    else:
        weight = shard.get(op.source)
    if op.factor is not None:
        merged = weight.float()
        if merged is weight and not op.quantized:  # never add into the adapter's or the file's tensor
            merged = merged.clone()
        weight = merged.add_(lora_delta(op.factor, op.conv1d))
        if op.factor.magnitude is not None:  # a Conv1D weight is (in, out): its output rows are columns
            factor = dora_factor(op.factor.magnitude, weight, dim=0 if op.conv1d else 1)
            weight.mul_(factor.unsqueeze(0) if op.conv1d else factor.unsqueeze(1))
    yield _checked(op, weight).reshape(-1)


def dora_factor(magnitude: torch.Tensor, merged: torch.Tensor, dim: int) -> torch.Tensor:
    """DoRA: m / ||W' + s B A|| per output row, the norm taken of the merged fp32 rows, W' the weight the
    adapter model computed with (dequant(quant(W)) for a quantized base), as peft's
    ``DoraLinearLayer.get_weight_norm`` does in the forward and in ``merge``."""
    return magnitude.float() / torch.linalg.norm(merged, dim=dim)


def _checked(op: Op, weight: torch.Tensor) -> torch.Tensor:
    """Cast to the output dtype; refuse values a narrower dtype turns into inf (fp32 -> fp16 above 65504).
    Non-finite values the base itself holds pass through. (``aminmax`` is 5x faster than ``isfinite``.)"""
    out = weight.to(op.out.dtype)
    limit = torch.finfo(op.out.dtype).max
    if weight.numel() and torch.finfo(weight.dtype).max > limit:
        lo, hi = torch.aminmax(weight)
        top = max(-float(lo), float(hi))
        if math.isfinite(top) and top > limit and not all_finite(out):
            raise UsageError(
                f"{op.out.name} overflows {op.out.dtype} (values up to {top:.4g})", "export with --dtype bf16 or fp32"
            )
    return out


def all_finite(tensor: torch.Tensor, chunk: int = 1 << 18) -> bool:
    """``isfinite(t).all()`` without full-size temporaries."""
    flat = tensor.reshape(-1)
    return all(bool(torch.isfinite(part).all()) for part in flat.split(chunk))


def write_shards(tmp: Path, plan: Plan, checkpoint: Checkpoint, advance: Callable[[int], None]) -> list[str]:
    """Write the planned shards, reading one checkpoint file at a time, and the index when sharded."""
    names = shard_names(len(plan.shards))
    current: tuple[int, Any] | None = None
    try:
        for name, ops in zip(names, plan.shards, strict=True):
            writer = ShardWriter(tmp / name, [op.out for op in ops])
            for op in ops:
                if current is None or current[0] != op.shard:
                    if current is not None:
                        current[1].close()
                    current = (op.shard, checkpoint.open(op.shard))
                writer.write(op.out.name, produce(op, current[1], plan))
                advance(op.out.nbytes)
            writer.close()
    finally:
        if current is not None:
            current[1].close()
    if len(names) > 1:
        index = {
            "metadata": {"total_size": plan.total_bytes},
            "weight_map": {op.out.name: name for name, ops in zip(names, plan.shards, strict=True) for op in ops},
        }
        (tmp / "model.safetensors.index.json").write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")
        names.append("model.safetensors.index.json")
    return names
