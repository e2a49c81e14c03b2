"""Surprises of the stack the planner depends on, checked on the real libraries (CPU)."""

from __future__ import annotations

import pytest

from qlora_kit.catalog.readers import arch_from_config
from qlora_kit.knobs import TrainSetup
from qlora_kit.plan.memory import linear_weight_bytes, other_param_bytes, quant_state_bytes

FALCON = {
    "model_type": "falcon",
    "hidden_size": 128,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "vocab_size": 512,
    "multi_query": True,
    "parallel_attn": True,
    "bias": False,
}
MIXTRAL = {
    "model_type": "mixtral",
    "hidden_size": 128,
    "intermediate_size": 256,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "vocab_size": 512,
    "num_local_experts": 4,
    "num_experts_per_tok": 2,
}


def _load_4bit(path):
    import torch
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    bnb = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_compute_dtype=torch.float32)
    return AutoModelForCausalLM.from_pretrained(path, quantization_config=bnb, dtype=torch.bfloat16)


def _bytes(tensors):
    seen, total = set(), 0
    for t in tensors:
        ptr = t.untyped_storage().data_ptr()
        if ptr not in seen:
            seen.add(ptr)
            total += t.untyped_storage().nbytes()
    return total


@pytest.mark.parametrize("config", [FALCON, MIXTRAL], ids=["falcon", "mixtral"])
def test_what_bitsandbytes_leaves_unquantized_is_what_the_planner_counts(tiny_model_dir, config):
    """transformers 5's bitsandbytes integration skips FalconLinear and Mixtral's 3-D expert tensors."""
    from peft import prepare_model_for_kbit_training

    model = _load_4bit(tiny_model_dir(config))
    arch = arch_from_config(config)
    setup = TrainSetup(quant="nf4", double_quant=False, dtype="bf16")
    packed = [p for p in model.parameters() if type(p).__name__ == "Params4bit"]
    assert _bytes(packed) == linear_weight_bytes(arch, setup)
    if config is FALCON:
        assert not packed and quant_state_bytes(arch, setup) == 0
    model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)
    rest = [p for p in model.parameters() if type(p).__name__ != "Params4bit"]
    assert _bytes(rest) == other_param_bytes(arch, setup)
