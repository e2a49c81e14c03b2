"""What export reads: a peft LoRA adapter directory (its factors, scales and replacement tensors) and
the base model's skeleton as transformers builds it; no tensor math here.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from qlora_kit.adapter import adapter_config, adapter_weights, check_factor_ranks
from qlora_kit.errors import UsageError

PREFIX = "base_model.model."


def lora_scale(alpha: float, rank: int, use_rslora: bool) -> float:
    """LoRA's scale: alpha / r, or alpha / sqrt(r) with rsLoRA (peft ``LoraLayer.update_layer``)."""
    return alpha / math.sqrt(rank) if use_rslora else alpha / rank


def pattern_key(patterns: Iterator[str] | list[str], module: str) -> str | None:
    """peft's ``get_pattern_key``: the first pattern that matches a suffix of ``module`` at a dot boundary."""
    for key in patterns:
        if re.match(rf"(.*\.)?({key})$", module):
            return key
    return None


@dataclass
class LoraFactor:
    """One adapted module: delta = scale * B @ A (linear) or (B @ A)^T (embedding)."""

    module: str  # the module's name in the model (no peft prefix)
    a: torch.Tensor
    b: torch.Tensor
    scale: float
    embedding: bool = False
    magnitude: torch.Tensor | None = None  # DoRA's per-output-row magnitude m (peft lora_magnitude_vector)

    @property
    def rank(self) -> int:
        return int(self.a.shape[0])

    def delta_shape(self, transpose: bool) -> tuple[int, ...]:
        d_out, d_in = int(self.b.shape[0]), int(self.a.shape[1])
        return (d_in, d_out) if transpose != self.embedding else (d_out, d_in)


@dataclass
class Adapter:
    """A peft LoRA adapter, read: its config, factors and the tensors that replace base tensors."""

    path: Path
    config: dict[str, Any]
    factors: dict[str, LoraFactor]  # base weight name (module + ".weight") -> factor
    replacements: dict[str, torch.Tensor] = field(default_factory=dict)  # base tensor name -> tensor

    @property
    def base_name(self) -> str | None:
        return self.config.get("base_model_name_or_path") or None


_UNSUPPORTED = {
    "lora_bias": "LoRA biases (lora_bias) are not supported by qlora-kit export yet",
    "target_parameters": "LoRA on parameters (target_parameters) is not supported by qlora-kit export yet",
    "trainable_token_indices": "trainable tokens are not supported by qlora-kit export yet",
    "layer_replication": "layer replication changes the architecture; qlora-kit export cannot merge it",
}


def read_adapter(path: Path, allow_pickle: bool = False) -> Adapter:
    """Read a peft LoRA adapter directory (``adapter_config.json`` + ``adapter_model.safetensors``)."""
    config = adapter_config(path)
    if config.get("peft_type", "LORA") != "LORA":
        raise UsageError(f"{path} holds a {config.get('peft_type')} adapter", "qlora-kit export merges LoRA adapters")
    for key, why in _UNSUPPORTED.items():
        if config.get(key):
            raise UsageError(f"{path}: {why}", "merge it with peft's merge_and_unload instead")
    tensors = adapter_weights(path, allow_pickle)
    check_factor_ranks(tensors, path)
    return Adapter(path, config, *_parse_adapter(tensors, config))


def _parse_adapter(
    tensors: Mapping[str, torch.Tensor], config: Mapping[str, Any]
) -> tuple[dict[str, LoraFactor], dict[str, torch.Tensor]]:
    halves: dict[str, dict[str, torch.Tensor]] = {}
    replacements: dict[str, torch.Tensor] = {}
    for key, tensor in tensors.items():
        name = key[len(PREFIX) :] if key.startswith(PREFIX) else key
        m = (
            re.match(r"(.+)\.(lora_A|lora_B)\.weight$", name)
            or re.match(r"(.+)\.(lora_embedding_A|lora_embedding_B)$", name)
            or re.match(r"(.+)\.(lora_magnitude_vector)(?:\.weight)?$", name)
        )
        if m:
            halves.setdefault(m.group(1), {})[m.group(2)] = tensor
        elif ".lora_" in name:
            raise UsageError(f"adapter tensor {key!r} is not a plain LoRA factor", "qlora-kit export merges plain LoRA")
        else:  # modules_to_save, trained biases, saved embedding layers: they replace the base tensor
            replacements[name.replace(".base_layer.", ".")] = tensor
    alpha_patterns = list(config.get("alpha_pattern") or {})
    factors: dict[str, LoraFactor] = {}
    for module, pair in halves.items():
        embedding = "lora_embedding_A" in pair or "lora_embedding_B" in pair
        a = pair.get("lora_embedding_A" if embedding else "lora_A")
        b = pair.get("lora_embedding_B" if embedding else "lora_B")
        if a is None or b is None:
            raise UsageError(f"adapter module {module!r} has only one of its two LoRA factors", "re-save the adapter")
        magnitude = pair.get("lora_magnitude_vector")
        if magnitude is not None and embedding:
            raise UsageError(f"{module}: DoRA on an embedding is not supported by qlora-kit export", "")
        key = pattern_key(alpha_patterns, module)
        alpha = config["alpha_pattern"][key] if key is not None else config.get("lora_alpha", 8)
        scale = lora_scale(alpha, int(a.shape[0]), bool(config.get("use_rslora")))
        factors[module + ".weight"] = LoraFactor(module, a, b, scale, embedding, magnitude)
    return factors, replacements


@dataclass
class Layout:
    """The base model's skeleton, as transformers builds it on the meta device."""

    names: set[str]  # parameter and buffer names, tied ones included
    prefix: str  # base_model_prefix ("model", "transformer")
    quantized: set[str]  # weights bitsandbytes quantizes when the base loads as in training
    conv1d: set[str]  # weights stored (in, out): GPT-2's Conv1D
    ties: list[list[str]]  # parameters that share storage
    config: Any = None

    def model_name(self, key: str) -> str | None:
        """The model's name for a checkpoint key (older checkpoints may lack or add the base prefix)."""
        for candidate in (key, f"{self.prefix}.{key}", key.removeprefix(f"{self.prefix}.")):
            if candidate in self.names:
                return candidate
        return None
