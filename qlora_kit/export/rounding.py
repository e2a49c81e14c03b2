"""dequant(quant(W)) as bitsandbytes 0.50 computes it on the CPU, in plain torch, a block of rows at a time.

``export`` merges a QLoRA adapter into the weights it was trained against, so it needs what a 4-bit or
8-bit ``Linear`` multiplied by. Calling bitsandbytes for that costs ~120 MiB of resident imports and
several whole-tensor copies (``quantize_4bit`` then ``dequantize_4bit``); here the same arithmetic runs
on slices of rows, so the merge holds the 16-bit source tensor plus one slice. Every operation is the
one bitsandbytes performs, in the same precision and order, and tests/test_rounding.py checks the
results bit for bit against bitsandbytes itself (NF4/FP4 with and without double quant, LLM.int8;
fp16/bf16/fp32; odd sizes).

What bitsandbytes 0.50 does on the CPU (``backends/default/ops.py``, ``functional.py``, ``csrc``):

- 4-bit: the flattened weight in blocks of 64 (a shorter last block), absmax per block; each value
  times ``1 / absmax`` (divided by it in the last short block), clamped to [-1, 1], goes to the code
  whose midpoint interval holds it (``bucketize``: a value on a midpoint goes down). Dequantized:
  ``code * absmax`` in fp32, cast to the compute dtype.
- Double quant: the absmax vector minus its mean (``offset``) is quantized to the 8-bit dynamic code
  in blocks of 256 by bitsandbytes' C kernel (``cquantize_blockwise_cpu_fp32``). That kernel's
  rounding depends on how it was compiled (values within ~0.5% of a midpoint between two codes can go
  either way, unlike an exact nearest-code search), so it is not reimplemented: it is called through
  ctypes from bitsandbytes' own CPU library, without importing the Python package (whose import pulls
  in torch._dynamo, ~120 MiB). Dequantization is ``code * absmax + offset`` in fp32.
- LLM.int8: per row, ``round(W * (127 / absmax_row))`` of the fp16 weight, and the training forward
  multiplies by ``CB * (SCB / 127)``.
"""

from __future__ import annotations

import ctypes
import functools
import importlib.util
from collections.abc import Iterator
from pathlib import Path

import torch

BLOCK = 64  # Params4bit's default blocksize (transformers 5 passes none)
NESTED_BLOCK = 256  # double quant's blocksize for the absmax values
# NF4: quantiles of N(0, 1) normalized to [-1, 1] (QLoRA, Dettmers et al. 2023, appendix E)
NF4_CODE = (
    -1.0,
    -0.6961928009986877,
    -0.5250730514526367,
    -0.39491748809814453,
    -0.28444138169288635,
    -0.18477343022823334,
    -0.09105003625154495,
    0.0,
    0.07958029955625534,
    0.16093020141124725,
    0.24611230194568634,
    0.33791524171829224,
    0.44070982933044434,
    0.5626170039176941,
    0.7229568362236023,
    1.0,
)
# FP4 (1 sign, 2 exponent, 1 mantissa bits) as bitsandbytes scales it: these magnitudes divided by 12
FP4_MAGNITUDES = (0.0, 0.0625, 8.0, 12.0, 4.0, 6.0, 2.0, 3.0)


def code_4bit(quant_type: str) -> torch.Tensor:
    """The 16 code values in ascending order (fp32)."""
    if quant_type == "nf4":
        return torch.tensor(NF4_CODE, dtype=torch.float32)
    if quant_type == "fp4":
        values = torch.tensor([*FP4_MAGNITUDES, *(-m for m in FP4_MAGNITUDES)], dtype=torch.float32)
        return torch.sort(values.div_(12.0)).values
    raise ValueError(f"unknown 4-bit type {quant_type!r}")


def dynamic_code() -> torch.Tensor:
    """bitsandbytes' signed 8-bit dynamic code (Dettmers 2016, "8-bit approximations"), as its CPU kernel
    uses it: a sign, a run of zero bits marking the exponent 10^-k (k = 0..6), the rest a linear fraction
    in [0.1, 1]; plus 0 and 1; ascending."""
    values: list[float] = []
    for exponent in range(7):
        steps = 2**exponent + 1
        edges = torch.linspace(0.1, 1, steps, dtype=torch.float32)
        mids = (edges[:-1] + edges[1:]) / 2.0
        scale = 10 ** (exponent - 6)
        values += (scale * mids).tolist() + (-scale * mids).tolist()  # products in fp32, as bitsandbytes
    values += [0.0, 1.0]
    return torch.tensor(sorted(values + [0.0] * (256 - len(values))), dtype=torch.float32)


def _absmax_4bit(flat: torch.Tensor, rows: int) -> torch.Tensor:
    """Per-block absmax of a flattened 16/32-bit weight, ``rows`` blocks' worth at a time (fp32)."""
    n = flat.numel()
    full = n - n % BLOCK
    parts = [
        flat[start : min(start + rows * BLOCK, full)].view(-1, BLOCK).abs().amax(-1).float()
        for start in range(0, full, rows * BLOCK)
    ]
    if n % BLOCK:
        parts.append(flat[full:].abs().amax().float().clamp(min=1e-38).reshape(1))
    return torch.cat(parts) if parts else torch.empty(0)


def _quantize_nested(absmax: torch.Tensor) -> torch.Tensor:
    """Double quant: the absmax values as the 8-bit dynamic code stores and restores them."""
    offset = absmax.mean()
    values = (absmax - offset).contiguous()
    code = dynamic_code()
    indices, scale = _quantize_blockwise(values, code)
    restored = code[indices.long()] * scale.repeat_interleave(NESTED_BLOCK)[: values.numel()]
    return restored + offset


def _quantize_blockwise(values: torch.Tensor, code: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """8-bit codes and per-256-block absmax from bitsandbytes' CPU kernel (see the module docstring)."""
    lib = _bnb_cpu_library()
    if lib is None:  # another build of bitsandbytes: its Python API, same kernel behind it
        import bitsandbytes.functional as bnbf

        q, state = bnbf.quantize_blockwise(values, code=code.clone(), blocksize=NESTED_BLOCK)
        return q, state.absmax
    n = values.numel()
    indices = torch.empty(n, dtype=torch.uint8)
    scale = torch.empty(-(-n // NESTED_BLOCK), dtype=torch.float32)
    scratch = code.clone()  # the kernel overwrites the code's first entry
    lib.cquantize_blockwise_cpu_fp32(
        *(ctypes.c_void_p(t.data_ptr()) for t in (scratch, values, scale, indices)),
        ctypes.c_longlong(NESTED_BLOCK),
        ctypes.c_longlong(n),
    )
    return indices, scale


@functools.cache
def _bnb_cpu_library() -> ctypes.CDLL | None:
    spec = importlib.util.find_spec("bitsandbytes")
    for folder in (spec.submodule_search_locations or []) if spec else []:
        for path in sorted(Path(folder).glob("libbitsandbytes_cpu.*")):
            try:
                lib = ctypes.CDLL(str(path))
            except OSError:
                continue
            if hasattr(lib, "cquantize_blockwise_cpu_fp32"):
                return lib
    return None


def roundtrip_4bit(
    weight: torch.Tensor, quant_type: str, double_quant: bool, dtype: torch.dtype, rows_per_piece: int
) -> Iterator[tuple[int, torch.Tensor]]:
    """(first row, fp32 rows) of dequant(quant(weight)) in ``dtype``, upcast exactly to fp32.

    ``weight`` is 2-D, already in the load dtype, and contiguous; slices cover ``rows_per_piece`` rows
    (rounded up so that a slice is whole 64-blocks, except the last).
    """
    rows, cols = weight.shape
    flat = weight.reshape(-1)
    n = flat.numel()
    full = n - n % BLOCK
    absmax = _absmax_4bit(flat, max(1, (1 << 22) // BLOCK))  # what quantization divides by
    stored = _quantize_nested(absmax) if double_quant else absmax  # what dequantization multiplies by
    code = code_4bit(quant_type)
    bounds = (code[:-1] + code[1:]) / 2
    step_rows = max(rows_per_piece, 1)
    while (step_rows * cols) % BLOCK:
        step_rows += 1
    for first in range(0, rows, step_rows):
        last = min(rows, first + step_rows)
        lo, hi = first * cols, last * cols
        pieces = []
        if min(hi, full) > lo:
            blocks = slice(lo // BLOCK, min(hi, full) // BLOCK)
            raw = flat[lo : min(hi, full)].view(-1, BLOCK)  # 16-bit * fp32 computes in fp32: exact upcast
            scaled = (raw * (1.0 / absmax[blocks].clamp(min=1e-38).view(-1, 1))).clamp_(-1, 1)
            pieces.append(
                (code[torch.bucketize(scaled, bounds, out_int32=True)] * stored[blocks].view(-1, 1)).reshape(-1)
            )
        if hi > full:  # the short last block (its absmax was clamped when it was computed)
            scaled = torch.clamp(flat[max(lo, full) : hi].float() / absmax[-1], -1, 1)
            pieces.append(code[torch.bucketize(scaled, bounds, out_int32=True)] * stored[-1])
        out = pieces[0] if len(pieces) == 1 else torch.cat(pieces)
        if dtype != torch.float32:
            out = out.to(dtype).float()
        yield first, out.view(last - first, cols)


def roundtrip_int8(weight: torch.Tensor) -> torch.Tensor:
    """What LLM.int8's CPU training forward multiplies by, in fp32: ``CB * (SCB / 127)`` of the fp16 weight."""
    w = weight.to(torch.float16)
    scb = w.abs().amax(dim=1).float()
    cb = torch.round(w * (127.0 / scb.unsqueeze(-1))).to(torch.int8)
    return cb.to(torch.float32).mul_(scb.unsqueeze(1).mul(1.0 / 127.0))
