"""qlora_kit.export.rounding against bitsandbytes itself: dequant(quant(W)) bit for bit, and the export's
light-weight rule for which weights transformers quantizes against the real replacement."""

from __future__ import annotations

import itertools

import pytest
import torch

from qlora_kit.export import rounding

SHAPES = [(64, 64), (96, 130), (33, 17), (300, 301), (1, 5), (257, 1024)]
DTYPES = [torch.float16, torch.bfloat16, torch.float32]


def bnb_roundtrip(w: torch.Tensor, quant_type: str, double_quant: bool) -> torch.Tensor:
    import bitsandbytes.functional as bnbf

    packed, state = bnbf.quantize_4bit(w, blocksize=64, compress_statistics=double_quant, quant_type=quant_type)
    state.dtype = w.dtype
    return bnbf.dequantize_4bit(packed, state).float()


def sample(shape: tuple[int, int], dtype: torch.dtype, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(shape, generator=g) * 0.02
    w[0, : min(3, shape[1])] = 0  # zeros, and for narrow shapes a whole zero block
    w.view(-1)[-1] = 0.3  # an outlier in the last (possibly short) block
    return w.to(dtype)


@pytest.mark.parametrize(("quant_type", "double_quant"), list(itertools.product(("nf4", "fp4"), (False, True))))
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_4bit_roundtrip_is_bit_exact(quant_type: str, double_quant: bool, dtype: torch.dtype) -> None:
    for i, shape in enumerate(SHAPES):
        w = sample(shape, dtype, i)
        want = bnb_roundtrip(w, quant_type, double_quant)
        for rows_per_piece in (1, 7, shape[0]):  # slices must not change a bit
            pieces = list(rounding.roundtrip_4bit(w, quant_type, double_quant, dtype, rows_per_piece))
            got = torch.cat([p for _, p in pieces])
            assert torch.equal(got, want), (shape, rows_per_piece, int((got != want).sum()))
            assert [first for first, _ in pieces] == sorted({first for first, _ in pieces})


def test_double_quant_needs_the_c_kernel_not_a_nearest_code_search() -> None:
    """A plain nearest-code search differs from bitsandbytes' CPU kernel on values near a midpoint:
    the reason rounding.py calls the kernel. If this starts failing, the kernel became exact."""
    code = rounding.dynamic_code()
    g = torch.Generator().manual_seed(0)
    values = torch.rand(200_000, generator=g) * 2 - 1
    values[::256] = 1.0  # every block's absmax is 1: the kernel sees the values themselves
    kernel, _ = rounding._quantize_blockwise(values, code)
    nearest = (values.unsqueeze(-1) - code).abs().argmin(-1)
    assert 0 < int((kernel.long() != nearest).sum()) < 200_000 // 100


def test_the_python_api_fallback_gives_the_same_codes(monkeypatch: pytest.MonkeyPatch) -> None:
    w = sample((300, 301), torch.float16, 3)
    direct = torch.cat([p for _, p in rounding.roundtrip_4bit(w, "nf4", True, torch.float16, 64)])
    monkeypatch.setattr(rounding, "_bnb_cpu_library", lambda: None)
    fallback = torch.cat([p for _, p in rounding.roundtrip_4bit(w, "nf4", True, torch.float16, 64)])
    assert torch.equal(direct, fallback)


def test_dynamic_code_is_bitsandbytes() -> None:
    import bitsandbytes.functional as bnbf

    assert torch.equal(rounding.dynamic_code(), bnbf.create_dynamic_map())


@pytest.mark.parametrize("shape", SHAPES)
def test_int8_roundtrip_is_bit_exact(shape: tuple[int, int]) -> None:
    import bitsandbytes.functional as bnbf

    w = sample(shape, torch.float16, 7)
    cb, scb, _ = bnbf.int8_vectorwise_quant(w)
    assert torch.equal(rounding.roundtrip_int8(w), cb.float().mul_(scb.unsqueeze(1).mul(1.0 / 127.0)))


def test_rounding_does_not_import_bitsandbytes() -> None:
    import subprocess
    import sys

    code = (
        "import sys, torch; from qlora_kit.export import merge; "
        "list(merge.trained_rows(torch.randn(64, 128).half(), 'nf4', True, torch.float16, 16)); "
        "print('bitsandbytes' in sys.modules)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "False"


# -- which weights transformers quantizes ----------------------------------------------------------------

LAYOUT_MODELS = [
    "facebook/opt-125m",
    "meta-llama/Llama-3.2-1B",  # tied head
    "openai-community/gpt2",  # Conv1D
    "tiiuae/falcon-7b",  # FalconLinear: not replaced
    "microsoft/phi-1_5",
    "bigscience/bloom-560m",
    "google/gemma-2-2b",
    "mistralai/Mixtral-8x7B-v0.1",  # 3-D experts: not replaced
    "Qwen/Qwen3-8B",
]


@pytest.mark.parametrize("name", LAYOUT_MODELS)
@pytest.mark.parametrize("mode", ["nf4", "int8"])
def test_export_layout_matches_the_real_bitsandbytes_replacement(name: str, mode: str) -> None:
    import bitsandbytes as bnb
    from test_catalog import build_meta, catalog_configs
    from transformers.quantizers import AutoHfQuantizer

    from qlora_kit.export.run import _bnb_replaced
    from qlora_kit.model.load import bnb_config
    from qlora_kit.recipe import QuantSpec

    configs = catalog_configs()
    model = build_meta(configs[name])
    ours = _bnb_replaced(model)
    quantizer = AutoHfQuantizer.from_config(bnb_config(QuantSpec(mode, True, "bf16")), pre_quantized=False)
    quantizer.preprocess_model(model=model, dtype=torch.bfloat16, device_map={"": "cpu"})
    real = {f"{n}.weight" for n, m in model.named_modules() if isinstance(m, (bnb.nn.Linear4bit, bnb.nn.Linear8bitLt))}
    assert ours == real
