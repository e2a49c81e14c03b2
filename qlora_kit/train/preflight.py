"""What ``train`` checks before it loads a weight: the device and the fit, and that a resumed run
continues the run its checkpoint came from."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from qlora_kit.catalog.gpus import DeviceSpec, family_of_capability
from qlora_kit.errors import UsageError
from qlora_kit.recipe import Recipe
from qlora_kit.train import checkpoint
from qlora_kit.train.outputs import Reporter


@dataclass(frozen=True)
class Device:
    """Where training runs: ``gpu`` is the first CUDA card as the planner describes one (name, memory,
    bf16, generation: :class:`DeviceSpec`, with its fit limit), ``None`` on the CPU."""

    gpu: DeviceSpec | None = None

    @property
    def kind(self) -> str:
        """The torch device type the run uses: "cuda" or "cpu"."""
        return "cpu" if self.gpu is None else "cuda"


def detect_device() -> Device:
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        family = family_of_capability(props.major, props.minor)
        return Device(DeviceSpec(props.name, props.total_memory, torch.cuda.is_bf16_supported(), family))
    return Device()


def check_fits(recipe: Recipe, model_dir: str, device: Device, reporter: Reporter, force: bool) -> None:
    """Plan the recipe on the detected GPU before any weights load; refuse when it will not fit."""
    from qlora_kit.catalog.models import resolve_model
    from qlora_kit.plan.recipes import to_constraints
    from qlora_kit.plan.search import plan

    gpu = device.gpu
    if gpu is None:
        reporter.message("no CUDA GPU found: training on the CPU (fine for the tiny demo, slow for real models)")
        return
    arch = resolve_model(model_dir)
    result = plan(arch, gpu, to_constraints(recipe))
    est = result.best.estimate
    reporter.message(
        f"plan: {est.device_bytes / 2**30:.2f} GiB of {gpu.memory_gib:.2f} GiB on "
        f"{gpu.name} (peak allocated {est.peak_allocated_bytes / 2**30:.2f} GiB)"
    )
    if not result.fits and not force:
        raise UsageError(
            f"the recipe needs about {est.device_bytes / 2**30:.1f} GiB on {gpu.name}, which has "
            f"{gpu.memory_gib:.1f} GiB",
            "run `qlora-kit plan --recipe` for settings that fit, or pass --force to try anyway",
        )


# what a resumed run must share with the checkpoint it continues: the model, its quantization, the
# adapter's shape, the data and its order, and how a step is made of micro-batches
RESUME_KEYS = (
    "model.",
    "quant.",
    "lora.",
    "data.",
    "train.micro_batch",
    "train.grad_accum",
    "train.optimizer",
    "train.seed",
    "train.gpus",
    "train.strategy",
)


def _flat(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in d.items():
        out.update(_flat(v, f"{prefix}{k}.") if isinstance(v, dict) else {f"{prefix}{k}": v})
    return out


def check_resumable(recipe: Recipe, path: Path) -> None:
    """Refuse to resume ``path`` with a recipe that changed what the checkpoint was trained with."""
    saved = checkpoint.read_state(path).get("recipe")
    if not isinstance(saved, dict):
        return  # written before checkpoints kept their recipe
    now, then = _flat(recipe.to_dict()), _flat(saved)
    for key in sorted(now):
        if key.startswith(RESUME_KEYS) and key in then and now[key] != then[key]:
            raise UsageError(
                f"--resume: {key} is {now[key]!r} in the recipe but the checkpoint {path.name} was trained with "
                f"{then[key]!r}",
                f"resume with --set {key}={then[key]}, or start a new run (--force, or another train.output_dir)",
            )


def check_context(recipe: Recipe, model_dir: str) -> None:
    """Refuse ``data.max_seq_len`` beyond the model's context unless ``model.rope_scaling`` stretches its
    RoPE (when its config.json is at hand; loading checks again: ``qlora_kit.model.load``)."""
    from qlora_kit.catalog import context
    from qlora_kit.model.load import read_config

    path = Path(model_dir) / "config.json"
    if not path.is_file():
        return
    ctx = context.of_config(read_config(path), str(path.parent))
    context.check_context(
        ctx, recipe.data.max_seq_len, recipe.model.rope_scaling, "data.max_seq_len", "model.rope_scaling"
    )


def check_eval_split(recipe: Recipe, examples: list[Any], pad_id: int) -> None:
    """The held-out split must make at least one batch, checked before the model loads."""
    from qlora_kit.data.batches import BatchStream

    d, t = recipe.data, recipe.train
    try:
        BatchStream(examples, t.micro_batch, d.max_seq_len, d.packing, pad_id, t.seed)
    except UsageError as exc:
        tokens = sum(len(e["input_ids"]) for e in examples)
        raise UsageError(
            f"the held-out split (data.eval_fraction={d.eval_fraction}: {len(examples)} samples, {tokens} tokens) "
            f"makes no batch: {exc.message}",
            "raise data.eval_fraction, lower data.max_seq_len, or turn data.packing off",
        ) from None
