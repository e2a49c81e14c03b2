"""The trainable-parameter line counts weights, not bytes: packed 4-bit storage holds two weights a byte."""

from __future__ import annotations

import pytest
from conftest import TINY_LLAMA

from qlora_kit.recipe import LoraSpec, QuantSpec


@pytest.mark.parametrize("mode", ["nf4", "int8", "none"])
def test_counts_match_the_unquantized_model(tiny_model_dir, mode):
    from transformers import AutoModelForCausalLM

    from qlora_kit.model.load import load_base
    from qlora_kit.model.lora import apply_lora, count_parameters, prepare
    from qlora_kit.recipe import ModelSpec

    path = tiny_model_dir(TINY_LLAMA, "float32")
    plain = sum(p.numel() for p in AutoModelForCausalLM.from_pretrained(path).parameters())
    quant = QuantSpec(mode=mode, double_quant=mode != "int8", compute_dtype="fp32")
    base = load_base(ModelSpec(name=str(path)), quant)
    assert count_parameters(base)[1] == plain
    model = apply_lora(prepare(base, quant, False), LoraSpec(rank=8))
    trainable, total = count_parameters(model)
    lora = sum(p.numel() for n, p in model.named_parameters() if ".lora_" in n)
    assert trainable == lora > 0
    assert total == plain + lora
    if mode == "nf4":  # what a plain numel sum reports: the packed bytes
        assert sum(p.numel() for p in model.parameters()) < total
