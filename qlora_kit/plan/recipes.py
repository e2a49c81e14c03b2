"""Recipes <-> planner: the knobs a recipe fixes as search constraints, and the recipe for a plan's choice."""

from __future__ import annotations

import dataclasses

from qlora_kit.knobs import ALL_LINEAR
from qlora_kit.plan.search import Constraints, Plan
from qlora_kit.recipe import DataSpec, LoraSpec, ModelSpec, QuantSpec, Recipe, TrainSpec


def _targets_spec(targets: str | list[str]) -> str:
    return ",".join(targets) if isinstance(targets, list) else targets


def to_constraints(recipe: Recipe) -> Constraints:
    """Every knob a recipe fixes, as planner constraints (``qlora-kit plan --recipe``)."""
    q, lora, t = recipe.quant, recipe.lora, recipe.train
    return Constraints(
        quant=q.mode,
        double_quant=q.double_quant and q.mode in ("nf4", "fp4"),
        rank=lora.rank,
        targets=_targets_spec(lora.targets),
        optimizer=t.optimizer,
        batch_size=t.micro_batch,
        seq_len=recipe.data.max_seq_len,
        grad_ckpt=t.grad_ckpt,
        attn=t.attn,
        dtype=q.compute_dtype,
        effective_batch=t.micro_batch * t.grad_accum * t.gpus,
        lora_dropout=lora.dropout,
        lora_fa=lora.variant == "lora-fa",
        kernel=lora.kernel,
        upcast=q.upcast,
        chunked_loss=t.chunked_loss,
        offload_ckpt=t.offload_ckpt,
        gpus=t.gpus,
        strategy=t.strategy,
        rope_scaling=None if recipe.model.rope_scaling == "none" else recipe.model.rope_scaling,
    )


def from_plan(plan: Plan, model_name: str, data: DataSpec | None = None, output_dir: str = "") -> Recipe:
    """The recipe ``train`` runs for a plan's chosen setting."""
    s, best = plan.best.setup, plan.best
    targets: str | list[str] = ALL_LINEAR if best.targets_label == ALL_LINEAR else list(s.targets)
    data = data or DataSpec()
    slug = model_name.rstrip("/").rsplit("/", 1)[-1].lower()
    return Recipe(
        model=ModelSpec(name=model_name, rope_scaling=plan.rope_scaling),
        quant=QuantSpec(mode=s.quant, double_quant=s.double_quant, compute_dtype=s.dtype, upcast=s.upcast),
        lora=LoraSpec(
            rank=s.rank,
            alpha=2 * s.rank,
            dropout=s.lora_dropout,
            targets=targets,
            variant="lora-fa" if s.lora_fa else "lora",
            kernel="runlora" if s.runlora else "peft",
        ),
        data=dataclasses.replace(data, max_seq_len=s.seq_len),
        train=TrainSpec(
            output_dir=output_dir or f"runs/{slug}",
            micro_batch=s.batch_size,
            grad_accum=best.grad_accum,
            optimizer=s.optimizer,
            grad_ckpt=s.grad_ckpt,
            attn=s.attn,
            chunked_loss=s.chunked_loss,
            offload_ckpt=s.offload_ckpt,
            gpus=best.gpus,
            strategy=best.strategy,
        ),
    )
