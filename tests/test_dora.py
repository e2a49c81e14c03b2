"""DoRA adapters made by plain peft on quantized bases: the export merges m * (W' + sBA) / ||W' + sBA||
with W' = dequant(quant(W)), and its fp32 output computes the peft model's logits within fp32 noise."""

from __future__ import annotations

from pathlib import Path

import pytest
from conftest import TINY_LLAMA
from test_export import write_metadata


@pytest.fixture(autouse=True)
def _quiet(quiet_hf):
    pass


def dora_adapter(base: Path, out: Path, mode: str, double_quant: bool, rslora: bool = False) -> Path:
    """peft's DoRA on ``base`` loaded quantized (CPU, fp32 compute), with random B and magnitudes moved
    off their initial norms, so neither the LoRA delta nor the DoRA rescaling is a no-op."""
    import torch
    from peft import LoraConfig, get_peft_model

    from qlora_kit.model.load import load_base
    from qlora_kit.recipe import ModelSpec, QuantSpec

    model = load_base(ModelSpec(name=str(base)), QuantSpec(mode, double_quant, "fp32"), device_map={"": "cpu"})
    config = LoraConfig(r=8, lora_alpha=16, target_modules="all-linear", use_dora=True, use_rslora=rslora)
    peft_model = get_peft_model(model, config)
    gen = torch.Generator().manual_seed(3)
    for name, param in peft_model.named_parameters():
        if "lora_B" in name:
            param.data = torch.randn(param.shape, generator=gen) * 0.05
        if "lora_magnitude_vector" in name:
            param.data = param.data * (1 + 0.2 * torch.randn(param.shape, generator=gen))
    peft_model.save_pretrained(out)
    return write_metadata(out, base, mode, double_quant, "fp32")


@pytest.mark.parametrize(("mode", "dq"), [("nf4", True), ("fp4", False), ("int8", False)])
def test_dora_on_a_quantized_base_exports_the_peft_models_logits(tmp_path, tiny_model_dir, mode, dq):
    from qlora_kit.export.run import export

    base = tiny_model_dir(TINY_LLAMA, "float32")
    adapter = dora_adapter(base, tmp_path / "adapter", mode, dq, rslora=mode == "nf4")
    summary = export(adapter, tmp_path / "out", dtype="fp32", verify=True)
    v = summary["verification"]
    assert v["passed"] and v["reference"].startswith(f"adapter on the {mode}")
    assert v["max_abs_diff"] <= 16 * 2.0**-20 * max(1.0, v["logit_scale"])
    assert summary["merged_tensors"] == 14


def test_dora_without_its_rescaling_fails_verification(tmp_path, tiny_model_dir, monkeypatch):
    """The magnitude matters: merging the plain LoRA delta of the same adapter misses the peft model."""
    import torch

    from qlora_kit.export import merge
    from qlora_kit.export.run import export
    from qlora_kit.export.verify import VerificationError

    base = tiny_model_dir(TINY_LLAMA, "float32")
    adapter = dora_adapter(base, tmp_path / "adapter", "nf4", True)
    monkeypatch.setattr(merge, "dora_factor", lambda m, merged, dim: torch.ones_like(m, dtype=torch.float32))
    with pytest.raises(VerificationError):
        export(adapter, tmp_path / "out", dtype="fp32", verify=True)
    assert not (tmp_path / "out").exists()


def test_dora_exports_to_gguf(tmp_path, tiny_model_dir):
    import shutil

    pytest.importorskip("gguf")
    from qlora_kit.export.gguf import export_gguf

    base = tmp_path / "base"
    shutil.copytree(tiny_model_dir({**TINY_LLAMA, "vocab_size": 512}, "float32"), base)
    demo = Path(__file__).resolve().parents[1] / "qlora_kit" / "resources" / "tiny-demo"
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        shutil.copy(demo / name, base / name)
    adapter = dora_adapter(base, tmp_path / "adapter", "nf4", True)
    assert export_gguf(adapter, tmp_path / "out", gguf_type="f16", verify=True)["verification"]["passed"]
