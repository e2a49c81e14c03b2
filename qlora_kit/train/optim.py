"""The optimizer a recipe's ``train.optimizer`` names, for training and for the measurement tool alike
(what the planner's optimizer-state term counts), and peft's LoRA-FA optimizer."""

from __future__ import annotations

from typing import Any

import torch

from qlora_kit.recipe import LoraSpec


def make_optimizer(name: str, params: list[torch.nn.Parameter], lr: float = 1e-4, weight_decay: float = 0.01) -> Any:
    """torch's AdamW or one of bitsandbytes' (8-bit, paged); ``weight_decay`` defaults to both libraries'
    own default. The paged ones fall back to unpaged on the CPU (bitsandbytes does that)."""
    if name == "adamw":
        return torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)
    import bitsandbytes as bnb

    cls = {
        "adamw8bit": bnb.optim.AdamW8bit,
        "paged_adamw": bnb.optim.PagedAdamW,
        "paged_adamw8bit": bnb.optim.PagedAdamW8bit,
    }[name]
    return cls(params, lr=lr, weight_decay=weight_decay)


def lorafa_optimizer(peft_model: Any, lora: LoraSpec, lr: float, weight_decay: float) -> Any:
    """peft's LoRA-FA optimizer: AdamW on B with B's gradient projected by ``(A A^T)^-1 / s^2`` (the paper's
    closed-form correction); it keeps state for B (and any other trainable parameter) only."""
    from peft.optimizers import create_lorafa_optimizer

    return create_lorafa_optimizer(peft_model, r=lora.rank, lora_alpha=lora.alpha, lr=lr, weight_decay=weight_decay)
