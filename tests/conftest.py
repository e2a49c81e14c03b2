"""Shared test fixtures.

Nothing here imports torch at collection time: the planner tests must stay fast. The tiny-model
fixture imports torch/transformers lazily, on first use.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import pytest

# On CPU, bitsandbytes' dequantize of odd shapes falls back to torch.compile (7-13 s on the first
# call): keep torch.compile off in tests. Must be set before torch is imported.
os.environ.setdefault("TORCH_COMPILE_DISABLE", "1")
# LLM.int8 on CPU logs "MatMul8bitLt: inputs will be cast..." on every call.
logging.getLogger("bitsandbytes").setLevel(logging.ERROR)


# the llama-style config several test files build: GQA, untied head, small enough for CPU steps
TINY_LLAMA = {
    "model_type": "llama",
    "hidden_size": 128,
    "intermediate_size": 256,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "vocab_size": 256,
    "tie_word_embeddings": False,
    "max_position_embeddings": 128,
}


def build_tiny_model(config: Mapping[str, Any], path: Path, dtype: str = "bfloat16", seed: int = 0) -> Path:
    """Build a random-init causal LM from a Hugging Face config dict and ``save_pretrained`` it to ``path``.

    ``config`` is a plain config dict with a ``model_type`` (what ``config.json`` holds); ``dtype`` is the
    torch dtype name the weights are saved in. Returns ``path``.
    """
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    cfg = AutoConfig.for_model(**dict(config))
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(cfg, dtype=getattr(torch, dtype))
    path.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(path)
    return path


TinyModelFactory = Callable[..., Path]


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory: pytest.TempPathFactory) -> TinyModelFactory:
    """A function ``(config_dict, dtype="bfloat16", seed=0) -> Path`` of a saved tiny random-init model.

    Each distinct (config, dtype, seed) is built and saved once per test session; load it back with
    ``AutoModelForCausalLM.from_pretrained(path, ...)``. Treat the directory as read-only.
    """
    cache: dict[str, Path] = {}

    def get(config: Mapping[str, Any], dtype: str = "bfloat16", seed: int = 0) -> Path:
        key = json.dumps([dict(config), dtype, seed], sort_keys=True)
        if key not in cache:
            path = tmp_path_factory.mktemp(f"tiny-{config['model_type']}-{dtype}")
            cache[key] = build_tiny_model(config, path, dtype, seed)
        return cache[key]

    return get


@pytest.fixture(scope="session")
def demo_adapter(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A finished `qlora-kit train` run of the CPU demo recipe (8 steps, NF4 double quant, fp32 compute,
    5% held out): the adapter directory, with qlora_kit.json and its random-init base inside. Read-only."""
    from test_train import Quiet, demo_recipe

    from qlora_kit.train.loop import train

    run = tmp_path_factory.mktemp("demo-run") / "run"
    train(demo_recipe(run, max_steps=8), Quiet())
    return run


@pytest.fixture()
def quiet_hf() -> None:
    """transformers' loading bars and warnings off (use with ``pytest.mark.usefixtures``)."""
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    hf_logging.set_verbosity_error()


@pytest.fixture(scope="module")
def llama(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The export tests' tiny llama (``test_export.LLAMA``), saved once per module."""
    from test_export import LLAMA

    return build_tiny_model(LLAMA, tmp_path_factory.mktemp("llama"))


@pytest.fixture(scope="module")
def llama_adapter(llama: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A peft LoRA adapter with random A and B on :func:`llama`."""
    from test_export import make_adapter

    return make_adapter(llama, tmp_path_factory.mktemp("llama-adapter"))


@pytest.fixture(scope="module")
def loaded(demo_adapter: Path) -> Any:
    """The demo adapter loaded for inference: (model, tokenizer, info)."""
    from qlora_kit.infer.load import load_for_inference

    return load_for_inference(adapter=str(demo_adapter))
