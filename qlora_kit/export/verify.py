"""Verification of an export: the merged model's logits against the adapter model's, on a fixed batch.

The export is loaded with plain transformers (fp32, no peft, no bitsandbytes). The reference is the
adapter model: the base loaded through :func:`model.load_base` as in training, k-bit prepared (fp32
outside the quantized weights), plus ``PeftModel.from_pretrained``. The two are loaded one after the
other, each whole, ~6 bytes per parameter measured (tools/bench_export.py), so by default verification
runs only when that fits in the memory available.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import gc
import io
import math
from pathlib import Path
from typing import Any

import torch

from qlora_kit.adapter import QuantSource
from qlora_kit.errors import QloraKitError
from qlora_kit.export.layout import Layout
from qlora_kit.export.merge import Plan
from qlora_kit.export.report import ExportReporter
from qlora_kit.model.load import TORCH_DTYPES

# Verification passes when max|logits_export - logits_adapter| <= TOLERANCE_ULPS * u * max(1, max|logits_adapter|),
# u the unit roundoff of the output dtype (fp16 2^-11, bf16 2^-8; fp32 is held to 2^-20, the noise of
# computing x(W + sBA)^T instead of xW^T + s(xA^T)B^T). Measured on CPU: rounding every weight to fp16
# moves the logits by 0.6-1.2 u of their scale on the 2-layer test models and 1.9-2.6 u on the
# 12-layer bench models (tools/bench_export.py); merging into the wrong base (W instead of dequant(quant(W)))
# moves them by ~30 u (int8) to ~370 u (NF4). In bf16 the int8 rounding is as small as bf16's own, so
# a bf16 export cannot tell an int8 base from the 16-bit one.
TOLERANCE_ULPS = 16
# A GGUF q8_0 weight is off by at most half a step of its 32-value block, amax/254 (2^-8 of the block's
# largest value): its "unit" is 2^-8 like bf16's, but relative to the block, not to each value.
UNIT_ROUNDOFF = {"fp16": 2.0**-11, "bf16": 2.0**-8, "fp32": 2.0**-20, "q8_0": 2.0**-8}
VERIFY_BATCH = (2, 32)
VERIFY_MEMORY_SHARE = 0.8  # of the memory available, for the fp32 models verification loads


class VerificationError(QloraKitError):
    """The merged model does not compute what the adapter model computes."""


def size_text(n: float) -> str:
    return f"{n / 2**30:.2f} GiB" if n >= 2**30 else f"{n / 2**20:.1f} MiB"


def verification_skipped(plan: Plan, verify: bool | None) -> str | None:
    """Why verification will not run (``None``: it will). It loads the adapter model and then the export,
    each in fp32 (about 4 bytes per parameter); by default it runs only when that fits in the memory
    available now, so that a 70B export does not end in the out-of-memory killer."""
    if verify is False:
        return "--no-verify"
    needed = verification_bytes(plan)
    available = _available_memory_bytes()
    if verify is None and available is not None and needed > VERIFY_MEMORY_SHARE * available:
        return (
            f"it loads the model twice in fp32 (~{size_text(needed)}) and {size_text(available)} of memory "
            "is available; pass --verify to run it anyway"
        )
    return None


def verification_bytes(plan: Plan) -> int:
    """Memory verification needs: 7 bytes per parameter. Each model is held in fp32 with its load-time
    copies; measured above the imports, 6.0 bytes per parameter on the 419 MiB base of
    tools/bench_export.py (peak RSS 1,708 MiB for 220M parameters)."""
    return sum(7 * math.prod(op.out.shape) for ops in plan.shards for op in ops)


def _available_memory_bytes() -> int | None:
    try:
        import psutil  # accelerate's dependency
    except ImportError:
        return None
    return int(psutil.virtual_memory().available)


def verify_export(
    export_dir: Path,
    base_path: Path,
    adapter_path: Path,
    qsource: QuantSource,
    merge_into: str,
    dtype: str,
    layout: Layout,
    reporter: ExportReporter,
    trust_remote_code: bool = False,
    gguf_file: str | None = None,
) -> dict[str, Any]:
    """Logits of the export (plain transformers, fp32) against the adapter model's on a fixed batch.

    The reference for ``dequantized`` is the base quantized as in training (on the CPU) plus the
    adapter, computed in fp32 like a k-bit prepared model: 4-bit layers multiply by their weight
    dequantized to the compute dtype, as in training, but in an fp32 matmul; int8 layers run their
    training forward, which multiplies by the dequantized weight, not the eval forward, which also
    quantizes the activations. For ``original`` (or an adapter trained on a 16-bit base) it is the
    16-bit base, upcast to fp32, plus the adapter. The export itself is loaded in fp32, so the
    difference is the rounding of the merged weights to the output dtype, plus summation order.
    """
    reporter.start("verify", 2)
    ids = _verify_batch(layout.config)
    with torch.no_grad():
        reference = _reference_model(base_path, adapter_path, qsource, merge_into, trust_remote_code)
        expected = reference(input_ids=ids).logits.float()
        del reference
        release_memory()
        reporter.advance(1)
        from transformers import AutoModelForCausalLM

        load = {"gguf_file": gguf_file} if gguf_file else {}  # transformers dequantizes a GGUF to fp32
        # its GGUF reader draws a plain tqdm bar that disable_progress_bar does not reach: ours shows progress
        with contextlib.redirect_stderr(io.StringIO()) if gguf_file else contextlib.nullcontext():
            exported = AutoModelForCausalLM.from_pretrained(
                export_dir, dtype=torch.float32, trust_remote_code=trust_remote_code, **load
            )
        got = exported(input_ids=ids).logits.float()
        del exported
        release_memory()
        reporter.advance(1)
    scale = float(expected.abs().max())
    max_abs_diff = float((got - expected).abs().max())
    log_p = torch.log_softmax(expected.double(), -1)
    log_q = torch.log_softmax(got.double(), -1)
    kl = float((log_p.exp() * (log_p - log_q)).sum(-1).mean())
    tolerance = TOLERANCE_ULPS * UNIT_ROUNDOFF[dtype] * max(scale, 1.0)
    result = {
        "reference": "adapter on the 16-bit base"
        if qsource.mode == "none" or merge_into == "original"
        else f"adapter on the {qsource.mode}{' double-quant' if qsource.double_quant else ''} base",
        "max_abs_diff": max_abs_diff,
        "kl": kl,
        "logit_scale": scale,
        "tolerance": tolerance,
        "passed": bool(max_abs_diff <= tolerance and torch.isfinite(got).all()),
        "batch": list(ids.shape),
    }
    reporter.message(
        f"verification: max |logit diff| {max_abs_diff:.3g} (tolerance {tolerance:.3g}, logit scale "
        f"{scale:.3g}), KL {kl:.3g} against the {result['reference']}"
    )
    if not result["passed"]:
        raise VerificationError(
            f"the merged model's logits differ from the adapter model's by up to {max_abs_diff:.4g} "
            f"(tolerance {tolerance:.4g}); nothing was written",
            "check --base/--quant match how the adapter was trained; report a bug if they do",
        )
    return result


def release_memory() -> None:
    """Collect, then hand freed heap pages back to the OS (glibc keeps them otherwise): without it the
    export, loaded after the adapter model, would stack on its freed memory."""
    gc.collect()
    libc = ctypes.util.find_library("c")
    if libc:
        trim = getattr(ctypes.CDLL(libc), "malloc_trim", None)
        if trim is not None:
            trim(0)


def _verify_batch(config: Any) -> torch.Tensor:
    vocab = int(getattr(config, "vocab_size", 0) or config.get_text_config().vocab_size)
    positions = getattr(config, "max_position_embeddings", None) or getattr(config, "n_positions", None) or 1024
    batch, seq = VERIFY_BATCH
    return torch.randint(0, vocab, (batch, min(seq, int(positions))), generator=torch.Generator().manual_seed(0))


def _dequantized_linear(module: Any) -> torch.nn.Linear:
    """An fp32 ``nn.Linear`` holding exactly the weight a ``Linear4bit`` multiplies by: dequantized to
    the compute dtype, as bitsandbytes 0.50's ``gemm_4bit`` does, then upcast (exact). The reference then
    computes the trained model without the noise of a bf16 matmul."""
    import copy

    import bitsandbytes.functional as bnbf

    state = copy.copy(module.weight.quant_state or module.quant_state)
    state.dtype = module.compute_dtype or state.dtype
    weight = bnbf.dequantize_4bit(module.weight.data, state).float()
    linear = torch.nn.Linear(module.in_features, module.out_features, bias=module.bias is not None)
    linear.weight = torch.nn.Parameter(weight, requires_grad=False)
    if module.bias is not None:
        linear.bias = torch.nn.Parameter(module.bias.detach().float(), requires_grad=False)
    return linear


def _reference_model(
    base_path: Path, adapter_path: Path, qsource: QuantSource, merge_into: str, trust_remote_code: bool
) -> Any:
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from qlora_kit.adapter import load_trained_base, read_metadata, trained_spec
    from qlora_kit.model.load import stretched_config

    metadata = read_metadata(adapter_path)
    if merge_into == "original" or qsource.mode == "none":
        base, seq_len = trained_spec(base_path, metadata, trust_remote_code)  # RoPE as trained
        load = TORCH_DTYPES[qsource.compute_dtype] if merge_into == "dequantized" else "auto"
        stretched = stretched_config(base, seq_len)
        kwargs = {"config": stretched} if stretched is not None else {}
        model = AutoModelForCausalLM.from_pretrained(
            base_path, dtype=load, trust_remote_code=trust_remote_code, **kwargs
        )
        model = model.float()
    else:
        import bitsandbytes as bnb

        # the base exactly as inference and training load it, then computed in fp32: every 16-bit
        # parameter upcast (what peft's k-bit preparation does; a selective-upcast recipe kept some 16-bit)
        model, _ = load_trained_base(base_path, qsource, metadata, trust_remote_code, {"": "cpu"})
        for param in model.parameters():
            if param.dtype in (torch.float16, torch.bfloat16) and type(param).__name__ != "Params4bit":
                param.data = param.data.float()
        for name, module in list(model.named_modules()):
            if isinstance(module, bnb.nn.Linear4bit):
                parent, _, leaf = name.rpartition(".")
                setattr(model.get_submodule(parent), leaf, _dequantized_linear(module))
    model = PeftModel.from_pretrained(model, adapter_path).eval()
    for module in model.modules():
        if type(module).__name__ == "Linear8bitLt" and type(module).__module__.startswith("bitsandbytes"):
            module.train()  # CPU: MatMul8bitFp, dequantize + fp32 matmul, the forward training used
    return model
