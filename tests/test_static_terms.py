"""The planner's static memory terms against the bytes of real tensors, exactly.

Tiny random-init models of two families (a gated-MLP Llama and an OPT) are saved to disk and loaded back
the way qlora-kit trains them: 16-bit, LLM.int8, NF4, NF4 with double quant and FP4 (bitsandbytes'
``BitsAndBytesConfig``), then prepared with peft's ``prepare_model_for_kbit_training``, wrapped with
``get_peft_model`` and stepped once with each optimizer. Every term of ``qlora_kit.plan.memory`` that does not
depend on the batch must equal the bytes the real tensors hold, to the byte.

Bytes are counted per storage (``untyped_storage().nbytes()``), each storage once, so a tensor shared
between layers (or a tied head) is counted once, as the allocator sees it.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import pytest
from conftest import TINY_LLAMA

from qlora_kit.catalog.arch import ArchSpec
from qlora_kit.catalog.readers import arch_from_config
from qlora_kit.knobs import OPTIMIZERS, TrainSetup
from qlora_kit.plan import memory

LLAMA = {**TINY_LLAMA, "vocab_size": 512}
OPT = {
    "model_type": "opt",
    "hidden_size": 128,
    "ffn_dim": 256,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "vocab_size": 512,
    "word_embed_proj_dim": 128,
    "max_position_embeddings": 128,
}
# Wide enough that LoRA tensors straddle bitsandbytes' ``min_8bit_size`` = 4096 elements: at rank 8,
# q_proj's A is 8 x 256 = 2048 (32-bit state), gate_proj's B 512 x 8 = 4096 and down_proj's A
# 8 x 512 = 4096 (8-bit, exactly at the limit); at rank 32, q_proj's A is 32 x 256 = 8192 (8-bit).
LLAMA_WIDE = {**LLAMA, "hidden_size": 256, "intermediate_size": 512}
FAMILIES = {"llama": LLAMA, "opt": OPT, "llama-wide": LLAMA_WIDE}


@dataclass(frozen=True)
class Quant:
    """How a model is saved and loaded, and the TrainSetup fields that describe it."""

    quant: str  # TrainSetup.quant
    double_quant: bool
    dtype: str  # TrainSetup.dtype: what the checkpoint is saved in and the unquantized params load in

    @property
    def torch_dtype_name(self) -> str:
        return {"bf16": "bfloat16", "fp32": "float32"}[self.dtype]

    def setup(self, **changes: Any) -> TrainSetup:
        return TrainSetup(quant=self.quant, double_quant=self.double_quant, dtype=self.dtype).with_(**changes)


QUANTS = {
    "bf16": Quant("none", False, "bf16"),
    "fp32": Quant("none", False, "fp32"),
    "int8": Quant("int8", False, "bf16"),
    "nf4": Quant("nf4", False, "bf16"),
    "nf4-dq": Quant("nf4", True, "bf16"),
    "fp4": Quant("fp4", False, "bf16"),
    "fp4-dq": Quant("fp4", True, "bf16"),
}
BASE_CASES = [(f, q) for f in ("llama", "opt") for q in QUANTS] + [("llama-wide", "nf4-dq")]

QV = ("q_proj", "v_proj")
ALL = "all"  # arch.linear_names()
# (family, quant, rank, targets)
LORA_CASES = [(f, q, 8, t) for f, q in BASE_CASES if f != "llama-wide" for t in (QV, ALL)] + [
    ("llama-wide", "nf4-dq", r, t) for r in (8, 32) for t in (QV, ALL)
]

SEQ_LEN = 16


@contextmanager
def one_thread() -> Iterator[None]:
    """Run tiny-model work on one thread: two OpenMP threads on a busy 2-core machine spin-wait for
    seconds per forward."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def arch(family: str) -> ArchSpec:
    return arch_from_config(FAMILIES[family])


def resolve_targets(family: str, targets: tuple[str, ...] | str) -> tuple[str, ...]:
    return arch(family).linear_names() if targets == ALL else tuple(targets)


def storage_bytes(tensors: Iterable[Any]) -> int:
    """Bytes of the storages behind ``tensors``, each storage counted once."""
    seen: dict[int, int] = {}
    for t in tensors:
        s = t.untyped_storage()
        seen[s.data_ptr()] = s.nbytes()
    return sum(seen.values())


# -- loading and measuring (cached per case: every test of a case reads the same numbers) ---------------


def load(path: Any, q: Quant) -> Any:
    import torch
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    kwargs: dict[str, Any] = {"dtype": getattr(torch, q.torch_dtype_name), "device_map": "cpu"}
    if q.quant == "int8":
        kwargs["quantization_config"] = BitsAndBytesConfig(load_in_8bit=True)
    elif q.quant in ("nf4", "fp4"):
        kwargs["quantization_config"] = BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type=q.quant,
            bnb_4bit_use_double_quant=q.double_quant,
            bnb_4bit_compute_dtype=torch.float32,  # bf16 compute is ~27x slower on CPU
        )
    return AutoModelForCausalLM.from_pretrained(path, **kwargs)


def quantized_weights(model: Any, q: Quant) -> list[Any]:
    """The weights the planner calls linear weights: bnb Linear4bit/Linear8bitLt weights, or (16-bit)
    every nn.Linear weight except the output head."""
    import bitsandbytes as bnb
    import torch

    if q.quant == "none":
        return [m.weight for n, m in model.named_modules() if isinstance(m, torch.nn.Linear) and n != "lm_head"]
    kinds = (bnb.nn.Linear4bit,) if q.quant in ("nf4", "fp4") else (bnb.nn.Linear8bitLt,)
    layers = [m for m in model.modules() if isinstance(m, kinds)]
    assert layers, f"no {kinds[0].__name__} in the loaded model"
    return [m.weight for m in layers]


def quant_state_tensors(model: Any, q: Quant) -> list[Any]:
    """The quantization constants bitsandbytes keeps beside the packed weights.

    NF4/FP4 (``Params4bit.quant_state``, a ``QuantState``):
      - ``absmax``: one scale per 64-weight block, fp32; with double quant uint8 (the 8-bit-quantized,
        mean-centred absmax);
      - ``code``: the 16-entry fp32 lookup table of the 4-bit data type (NF4 or FP4 values);
      - ``offset`` (double quant): the fp32 mean subtracted from absmax before its 8-bit quantization;
      - ``state2.absmax`` (double quant): one fp32 scale per 256 absmax values;
      - ``state2.code`` (double quant): the 256-entry fp32 dynamic map the absmax is quantized with.
    LLM.int8 (``Int8Params.SCB``): one fp32 absmax scale per output row (the int8 data itself, ``CB``,
    is the weight's own storage and counted as a linear weight).
    """
    tensors: list[Any] = []
    if q.quant == "none":
        return tensors
    for w in quantized_weights(model, q):
        if q.quant == "int8":
            assert w.CB is None or w.CB.untyped_storage().data_ptr() == w.untyped_storage().data_ptr()
            tensors.append(w.SCB)
            continue
        qs = w.quant_state
        tensors += [qs.absmax, qs.code]
        if qs.nested:
            tensors += [qs.offset, qs.state2.absmax, qs.state2.code]
    return tensors


_BASE: dict[tuple[str, str], dict[str, Any]] = {}
_LORA: dict[tuple[str, str, int, tuple[str, ...]], dict[str, int]] = {}


def measure_base(tiny_model_dir: Any, family: str, quant: str) -> dict[str, Any]:
    """Bytes of the linear weights and quant state as loaded, and of the other parameters after k-bit
    preparation (16-bit: as loaded)."""
    key = (family, quant)
    if key in _BASE:
        return _BASE[key]
    from peft import prepare_model_for_kbit_training

    q = QUANTS[quant]
    with one_thread():
        model = load(tiny_model_dir(FAMILIES[family], q.torch_dtype_name), q)
        weights = quantized_weights(model, q)
        out: dict[str, Any] = {
            "linear_weights": storage_bytes(weights),
            "quant_state": storage_bytes(quant_state_tensors(model, q)),
        }
        if q.quant != "none":
            model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)
        weight_ptrs = {w.untyped_storage().data_ptr() for w in weights}
        others = [p for p in model.parameters() if p.untyped_storage().data_ptr() not in weight_ptrs]
        out["other_params"] = storage_bytes(others)
        out["other_params_dtypes"] = sorted({str(p.dtype) for p in others})
    _BASE[key] = out
    return out


def torch_step_bytes(opt: Any) -> int:
    """Bytes of torch's per-parameter ``step`` counters (a 0-d fp32 tensor each, 4 B per LoRA tensor,
    kept on the host unless ``capturable``/``fused``): left out of the comparison, see memory.py."""
    return sum(
        s["step"].untyped_storage().nbytes()
        for s in opt.state.values()
        if "step" in s and hasattr(s["step"], "untyped_storage")
    )


def optimizer_state_tensors(opt: Any) -> list[Any]:
    """Every tensor in ``optimizer.state`` but the ``step`` counters (bitsandbytes keeps a Python int).

    torch AdamW: ``exp_avg``, ``exp_avg_sq`` (fp32, like the param). bitsandbytes 32-bit state (every
    tensor of PagedAdamW, tensors under ``min_8bit_size`` of the 8-bit ones): ``state1``, ``state2`` fp32.
    bitsandbytes 8-bit: ``state1``/``state2`` uint8, ``absmax1``/``absmax2`` fp32 per 256-block, and
    ``qmap1``/``qmap2`` (the signed and unsigned 256-entry fp32 dynamic maps, one pair shared by all params).
    """
    import torch

    return [v for s in opt.state.values() for k, v in s.items() if k != "step" and isinstance(v, torch.Tensor)]


def make_optimizer(name: str, params: list[Any]) -> Any:
    import bitsandbytes as bnb
    import torch

    cls = {
        "adamw": torch.optim.AdamW,
        "adamw8bit": bnb.optim.AdamW8bit,
        "paged_adamw": bnb.optim.PagedAdamW,
        "paged_adamw8bit": bnb.optim.PagedAdamW8bit,
    }[name]
    return cls(params, lr=1e-3)


def measure_lora(tiny_model_dir: Any, family: str, quant: str, rank: int, targets: tuple[str, ...]) -> dict[str, int]:
    """Bytes of the LoRA params after ``get_peft_model``, of their grads after one forward/backward, and of
    each optimizer's state after one step."""
    key = (family, quant, rank, targets)
    if key in _LORA:
        return _LORA[key]
    import warnings

    import torch
    from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training

    q = QUANTS[quant]
    with one_thread():
        model = load(tiny_model_dir(FAMILIES[family], q.torch_dtype_name), q)
        if q.quant != "none":
            model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)
        model = get_peft_model(model, LoraConfig(r=rank, target_modules=list(targets), task_type="CAUSAL_LM"))
        lora = [p for n, p in model.named_parameters() if ".lora_A." in n or ".lora_B." in n]
        trainable = [p for p in model.parameters() if p.requires_grad]
        assert {id(p) for p in trainable} == {id(p) for p in lora}, "trainable params other than LoRA A/B"
        out = {"lora_params": storage_bytes(lora), "lora_tensors": len(lora)}

        torch.manual_seed(0)
        ids = torch.randint(0, arch(family).vocab_size, (2, SEQ_LEN))
        model(input_ids=ids, labels=ids).loss.backward()
        assert all(p.grad is not None for p in trainable)
        out["lora_grads"] = storage_bytes(p.grad for p in trainable)

        for name in OPTIMIZERS:
            opt = make_optimizer(name, trainable)
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # paged optimizers warn and fall back to non-paged on CPU
                opt.step()
            out[f"opt:{name}"] = storage_bytes(optimizer_state_tensors(opt))
            out[f"step:{name}"] = torch_step_bytes(opt)
    _LORA[key] = out
    return out


# -- the tests ------------------------------------------------------------------------------------------


def _id(case: tuple[Any, ...]) -> str:
    parts = []
    for c in case:
        if isinstance(c, tuple):
            parts.append("qv" if c == QV else "+".join(c))
        elif isinstance(c, int):
            parts.append(f"r{c}")
        else:
            parts.append(str(c))
    return "-".join(parts)


@pytest.mark.parametrize(("family", "quant"), BASE_CASES, ids=[_id(c) for c in BASE_CASES])
def test_linear_weight_bytes(tiny_model_dir, family, quant):
    measured = measure_base(tiny_model_dir, family, quant)["linear_weights"]
    assert memory.linear_weight_bytes(arch(family), QUANTS[quant].setup()) == measured


@pytest.mark.parametrize(("family", "quant"), BASE_CASES, ids=[_id(c) for c in BASE_CASES])
def test_quant_state_bytes(tiny_model_dir, family, quant):
    measured = measure_base(tiny_model_dir, family, quant)["quant_state"]
    assert memory.quant_state_bytes(arch(family), QUANTS[quant].setup()) == measured


@pytest.mark.parametrize(("family", "quant"), BASE_CASES, ids=[_id(c) for c in BASE_CASES])
def test_other_param_bytes(tiny_model_dir, family, quant):
    base = measure_base(tiny_model_dir, family, quant)
    q = QUANTS[quant]
    # prepare_model_for_kbit_training upcasts every fp16/bf16 parameter but Params4bit to fp32 (int8
    # weights are int8 and stay); the 16-bit models are measured as loaded
    expected_dtypes = ["torch.float32"] if q.quant != "none" or q.dtype == "fp32" else ["torch.bfloat16"]
    assert base["other_params_dtypes"] == expected_dtypes
    assert memory.other_param_bytes(arch(family), q.setup()) == base["other_params"]


def _lora_case(tiny_model_dir, family, quant, rank, targets):
    targets = resolve_targets(family, targets)
    measured = measure_lora(tiny_model_dir, family, quant, rank, targets)
    setup = QUANTS[quant].setup(rank=rank, targets=targets)
    return arch(family), setup, measured


LORA_IDS = [_id(c) for c in LORA_CASES]


@pytest.mark.parametrize(("family", "quant", "rank", "targets"), LORA_CASES, ids=LORA_IDS)
def test_lora_param_bytes(tiny_model_dir, family, quant, rank, targets):
    a, setup, measured = _lora_case(tiny_model_dir, family, quant, rank, targets)
    assert len(memory.lora_tensor_sizes(a, setup)) == measured["lora_tensors"]
    assert memory.lora_param_bytes(a, setup) == measured["lora_params"]


@pytest.mark.parametrize(("family", "quant", "rank", "targets"), LORA_CASES, ids=LORA_IDS)
def test_lora_grad_bytes(tiny_model_dir, family, quant, rank, targets):
    a, setup, measured = _lora_case(tiny_model_dir, family, quant, rank, targets)
    assert memory.lora_grad_bytes(a, setup) == measured["lora_grads"]


OPT_CASES = [(*c, o) for c in LORA_CASES for o in OPTIMIZERS]


@pytest.mark.parametrize(
    ("family", "quant", "rank", "targets", "optimizer"), OPT_CASES, ids=[_id(c) for c in OPT_CASES]
)
def test_optimizer_state_bytes(tiny_model_dir, family, quant, rank, targets, optimizer):
    a, setup, measured = _lora_case(tiny_model_dir, family, quant, rank, targets)
    setup = setup.with_(optimizer=optimizer)
    assert memory.optimizer_state_bytes(a, setup) == measured[f"opt:{optimizer}"]
    # torch.optim.AdamW also keeps a 0-d fp32 ``step`` tensor per LoRA tensor, 4 B each and host-side (not in
    # the planner): 32 B for q/v on these 2-layer models, 112 B (llama) / 96 B (opt) for all linears.
    # bitsandbytes keeps ``step`` as a Python int.
    steps = 4 * len(memory.lora_tensor_sizes(a, setup)) if optimizer == "adamw" else 0
    assert measured[f"step:{optimizer}"] == steps


def test_wide_cases_straddle_min_8bit_size():
    """The wide Llama cases exercise both sides of bitsandbytes' 4096-element rule, and its edge."""
    a = arch("llama-wide")
    r8 = memory.lora_tensor_sizes(a, TrainSetup(rank=8, targets=a.linear_names()))
    r32 = memory.lora_tensor_sizes(a, TrainSetup(rank=32, targets=a.linear_names()))
    # one model with 32-bit state (under 4096 elements) and 8-bit state exactly at the limit
    assert min(r8) < memory.MIN_8BIT_SIZE
    assert memory.MIN_8BIT_SIZE in r8
    assert max(r32) > memory.MIN_8BIT_SIZE
    assert ("llama-wide", "nf4-dq", 8, ALL) in LORA_CASES and ("llama-wide", "nf4-dq", 32, ALL) in LORA_CASES
