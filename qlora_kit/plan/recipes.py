"""Recipes <-> planner: the knobs a recipe fixes as search constraints, and the recipe for a plan's choice."""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path

from qlora_kit.catalog.bundled import resolve
from qlora_kit.errors import UsageError
from qlora_kit.knobs import ALL_LINEAR, double_quant_for
from qlora_kit.plan.search import Constraints, Plan
from qlora_kit.recipe import DataSpec, LoraSpec, ModelSpec, Recipe, TrainSpec


def _targets_spec(targets: str | list[str]) -> str:
    return ",".join(targets) if isinstance(targets, list) else targets


def to_constraints(recipe: Recipe) -> Constraints:
    """Every knob a recipe fixes, as planner constraints (``qlora-kit plan --recipe``)."""
    q, lora, t = recipe.quant, recipe.lora, recipe.train
    return Constraints(
        quant=q.mode,
        double_quant=double_quant_for(q.mode, q.double_quant),
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
        dora=lora.variant == "dora",
        rslora=lora.rslora,
        upcast=q.upcast,
        chunked_loss=t.chunked_loss,
        offload_ckpt=t.offload_ckpt,
        gpus=t.gpus,
        strategy=t.strategy,
        rope_scaling=None if recipe.model.rope_scaling == "none" else recipe.model.rope_scaling,
    )


EVAL_FRACTION = 0.05  # held out by a written recipe, when the data has at least MIN_ROWS_TO_HOLD_OUT rows
MIN_ROWS_TO_HOLD_OUT = 20  # below this one held-out row is a large share of the data and a noisy loss
SAVES_PER_RUN = 4  # checkpoints (and held-out evaluations) over a run of known length
SAVE_STEPS_UNKNOWN = 100  # when the data's size cannot be read without loading it (a hub id, parquet)


def count_rows(path: str) -> int | None:
    """Rows of a local .jsonl or .txt file (or a built-in dataset) without loading it; ``None``
    for anything else."""
    try:
        local = Path(resolve(path, kind="dataset"))
    except UsageError:
        return None
    if local.suffix.lower() not in (".jsonl", ".txt") or not local.is_file():
        return None
    with local.open("rb") as fh:
        return sum(1 for line in fh if line.strip())


def _schedule(data: DataSpec, train: TrainSpec, micro_batch: int, grad_accum: int) -> tuple[DataSpec, int]:
    """The held-out share and the checkpoint interval for a written recipe: 5% held out when the data
    can spare it (or the recipe's own share), and about four checkpoints a run (every 100 steps when
    the run's length cannot be known before the data is tokenized: a hub id, parquet, packing)."""
    rows = count_rows(data.path)
    fraction = data.eval_fraction
    if fraction <= 0 and (rows is None or rows >= MIN_ROWS_TO_HOLD_OUT):
        fraction = EVAL_FRACTION
    data = dataclasses.replace(data, eval_fraction=fraction)
    if train.max_steps:
        steps = train.max_steps
    elif rows is None or data.packing:
        return data, SAVE_STEPS_UNKNOWN
    else:
        train_rows = rows - (max(1, round(rows * fraction)) if fraction > 0 else 0)
        steps = math.ceil(train.epochs * math.ceil(train_rows / micro_batch) / grad_accum)
    return data, max(1, steps // SAVES_PER_RUN)


def from_plan(
    plan: Plan, model_name: str, data: DataSpec | None = None, output_dir: str = "", base: Recipe | None = None
) -> Recipe:
    """The recipe ``train`` runs for a plan's chosen setting: ``base`` (the planned recipe, if any) with
    the plan's knobs, ``data`` in place of its data, holding data out and saving checkpoints where it
    does not (see :func:`_schedule`)."""
    s, best = plan.best.setup, plan.best
    targets: str | list[str] = ALL_LINEAR if best.targets_label == ALL_LINEAR else list(s.targets)
    if base is None:
        slug = model_name.rstrip("/").rsplit("/", 1)[-1].lower()
        base = Recipe(
            model=ModelSpec(name=model_name),
            lora=LoraSpec(alpha=2 * s.rank),
            train=TrainSpec(output_dir=output_dir or f"runs/{slug}"),
        )
    t = base.train
    spec, save_steps = _schedule(data or base.data, t, s.batch_size * best.gpus, best.grad_accum)
    return Recipe(
        model=dataclasses.replace(base.model, rope_scaling=plan.rope_scaling),
        quant=dataclasses.replace(
            base.quant, mode=s.quant, double_quant=s.double_quant, compute_dtype=s.dtype, upcast=s.upcast
        ),
        lora=dataclasses.replace(
            base.lora,
            rank=s.rank,
            dropout=s.lora_dropout,
            targets=targets,
            variant="lora-fa" if s.lora_fa else "dora" if s.dora else "lora",
            kernel="runlora" if s.runlora else "peft",
            rslora=s.rslora,
        ),
        data=dataclasses.replace(spec, max_seq_len=s.seq_len),
        train=dataclasses.replace(
            t,
            micro_batch=s.batch_size,
            grad_accum=best.grad_accum,
            optimizer=s.optimizer,
            grad_ckpt=s.grad_ckpt,
            attn=s.attn,
            chunked_loss=s.chunked_loss,
            offload_ckpt=s.offload_ckpt,
            gpus=best.gpus,
            strategy=best.strategy,
            eval_steps=t.eval_steps or (save_steps if spec.eval_fraction > 0 else 0),
            save_steps=t.save_steps or save_steps,
        ),
    )
