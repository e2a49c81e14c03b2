"""``qlora-kit plan``: the knob flags or a recipe -> constraints -> one plan (or a sweep, or the longest
context that fits) -> a table or JSON, and optionally the recipe ``train`` runs.

torch-free: everything it imports is on the planner's side (tests/test_architecture.py)."""

from __future__ import annotations

import argparse
import json
from typing import Any

from qlora_kit.cli.common import auto, double_quant_arg
from qlora_kit.errors import UsageError


def add_parser(sub: Any) -> None:
    from qlora_kit.knobs import ATTNS, DTYPES, OPTIMIZERS, QUANTS, ROPE_SCALINGS

    p = sub.add_parser(
        "plan",
        help="estimate GPU memory and pick settings that fit a card",
        description="Estimate GPU memory for QLoRA/LoRA training and pick the settings that fit.",
    )
    p.add_argument("--model", help="catalog name (opt-6.7b), hub id, local directory or config.json")
    p.add_argument("--gpu", default="24GB", help="card name (rtx4090, A100-80GB) or size (24GB = 24 GiB)")
    p.add_argument("--recipe", help="plan exactly this recipe (its knobs are fixed)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a recipe key")
    p.add_argument("--quant", choices=auto(QUANTS), default="auto", help="base weights' quantization (searched)")
    double_quant_arg(p, "quantize the 4-bit constants too (default: on with nf4/fp4)")
    p.add_argument("--rank", type=int, help="LoRA rank r (default: 16)")
    p.add_argument("--targets", help="all-linear, default, or comma-separated module names")
    p.add_argument("--batch-size", type=int, help="micro-batch size")
    p.add_argument("--effective-batch", type=int, default=16, help="micro-batch x accumulation (default 16)")
    p.add_argument("--seq-len", type=int, help="tokens per sequence (default: the model's context, up to 2048)")
    p.add_argument(
        "--rope-scaling",
        choices=list(ROPE_SCALINGS),
        help="stretch RoPE to a --seq-len past the model's context (factor: --seq-len / native length)",
    )
    p.add_argument("--grad-ckpt", choices=["auto", "on", "off"], default="auto", help="gradient checkpointing")
    p.add_argument("--optimizer", choices=auto(OPTIMIZERS), default="auto", help="optimizer (default: searched)")
    p.add_argument("--attn", choices=ATTNS, default="sdpa", help="attention implementation (default: sdpa)")
    p.add_argument("--dtype", choices=list(DTYPES), help="compute dtype (default: bf16 where the card has it)")
    p.add_argument("--lora-dropout", type=float, default=0.05, help="LoRA dropout (default: 0.05)")
    p.add_argument("--gpus", type=int, help="GPUs available (default 1); figures are per GPU, the fewest that fit win")
    p.add_argument("--strategy", choices=["ddp", "fsdp", "fsdp-offload"], help="multi-GPU strategy (default: searched)")
    p.add_argument("--lora-fa", action="store_true", help="LoRA-FA: lora_A frozen at init, only lora_B trained")
    p.add_argument("--kernel", choices=["peft", "runlora"], default="peft", help="LoRA layer implementation")
    p.add_argument("--dora", action="store_true", help="DoRA: a trained magnitude per output row (docs/dora.md)")
    p.add_argument("--rslora", action="store_true", help="rsLoRA: scale alpha/sqrt(rank) (no memory change)")
    p.add_argument("--upcast", choices=["all", "selective"], help="fp32 in k-bit prep: all 16-bit params or norms only")
    p.add_argument(
        "--chunked-loss", action=argparse.BooleanOptionalAction, help="head + loss in chunks (default: searched)"
    )
    p.add_argument(
        "--offload-ckpt", action=argparse.BooleanOptionalAction, help="checkpoints in host memory (default: searched)"
    )
    p.add_argument(
        "--allocator",
        choices=["expandable", "caching"],
        default="expandable",
        help="torch's CUDA allocator to plan for: expandable segments (what train sets) or the default caching",
    )
    p.add_argument(
        "--max-seq", action="store_true", help="plan the longest --seq-len that fits the card with the other knobs"
    )
    p.add_argument("--sweep", metavar="KNOB=V1,V2", help="one plan per value side by side (e.g. rank=4,8,16,32,64)")
    p.add_argument("--json", action="store_true", help="print one JSON object (schema: docs/planner.md)")
    p.add_argument("--write-recipe", metavar="PATH", help="write the recipe `qlora-kit train` runs")
    p.add_argument("--data", help="dataset for the written recipe (default: the bundled quotes)")


def run(args: argparse.Namespace) -> int:
    from qlora_kit.catalog.bundled import resolve
    from qlora_kit.catalog.gpus import resolve_gpu
    from qlora_kit.catalog.models import resolve_model
    from qlora_kit.plan.search import plan, plan_json

    device = resolve_gpu(args.gpu)
    model_name, constraints, data = _plan_inputs(args)
    arch = resolve_model(resolve(model_name))
    if args.sweep and not args.max_seq:
        return _sweep(args, arch, device, constraints)
    extra: dict[str, object] = {}
    if args.max_seq:
        from qlora_kit.plan.maxseq import longest_context, max_seq_json

        found = longest_context(arch, device, _open_seq(args, constraints))
        result, extra = found.plan, {"max_seq": max_seq_json(found)}
    else:
        result = plan(arch, device, constraints)
    if args.json:
        print(json.dumps({**plan_json(result), **extra}, indent=2))
    else:
        from qlora_kit import ui

        ui.render_plan(result)
    if args.write_recipe:  # after the plan, so a refusal follows the advice that explains it
        _write_plan_recipe(args, result, model_name, data)
    return 0 if result.fits else 3


def _plan_inputs(args: argparse.Namespace) -> tuple[str, Any, Any]:
    """(model name, constraints, the recipe's data section or None) from ``--recipe`` or the knob flags."""
    if args.recipe:
        model_name, constraints, data = _recipe_constraints(args)
    else:
        model_name, constraints, data = args.model, _flag_constraints(args), None
    if args.gpus is not None or args.strategy or args.allocator != "expandable":
        import dataclasses

        constraints = dataclasses.replace(
            constraints,
            gpus=constraints.gpus if args.gpus is None else args.gpus,
            strategy=args.strategy or constraints.strategy,
            allocator=args.allocator,
        )
    return model_name, constraints, data


def _open_seq(args: argparse.Namespace, constraints: Any) -> Any:
    """``--max-seq`` searches the sequence length: a recipe's is dropped, a ``--seq-len`` contradicts it."""
    import dataclasses

    if args.sweep:
        raise UsageError("--max-seq makes one plan, --sweep several", "drop one of them")
    if args.seq_len is not None:
        raise UsageError("--max-seq searches the sequence length, --seq-len sets it", "drop one of them")
    return dataclasses.replace(constraints, seq_len=None)


def _recipe_constraints(args: argparse.Namespace) -> tuple[str, Any, Any]:
    from qlora_kit import recipe as recipes
    from qlora_kit.plan.recipes import to_constraints

    fixed = [
        f
        for f in ("model", "quant", "rank", "targets", "batch_size", "seq_len", "optimizer", "dtype", "rope_scaling")
        if getattr(args, f) not in (None, "auto")
    ]
    if fixed or args.grad_ckpt != "auto" or args.double_quant is not None:
        flag = (fixed or ["grad-ckpt"])[0].replace("_", "-")
        raise UsageError(
            f"--recipe fixes every knob; options like --{flag} contradict it",
            "change the recipe or use --set section.key=value",
        )
    rec = recipes.load_recipe(args.recipe, args.set)
    return rec.model.name, to_constraints(rec), rec.data


def _flag_constraints(args: argparse.Namespace) -> Any:
    from qlora_kit.knobs import double_quant_refused
    from qlora_kit.plan.search import Constraints

    if not args.model:
        raise UsageError("plan needs --model (or --recipe)", "e.g. qlora-kit plan --model opt-6.7b --gpu 24GB")
    if args.set:
        raise UsageError("--set overrides recipe keys", "use it with --recipe")
    if args.dora and (args.lora_fa or args.kernel == "runlora"):
        raise UsageError("--dora does not combine with --lora-fa or --kernel runlora", "choose one LoRA variant")
    if double_quant_refused(args.quant, args.double_quant):
        raise UsageError(f"--double-quant contradicts --quant {args.quant}", "double quant is for nf4/fp4")
    return Constraints(
        quant=None if args.quant == "auto" else args.quant,
        double_quant=args.double_quant,
        rank=args.rank,
        targets=args.targets,
        optimizer=None if args.optimizer == "auto" else args.optimizer,
        batch_size=args.batch_size,
        seq_len=args.seq_len,
        grad_ckpt={"auto": None, "on": True, "off": False}[args.grad_ckpt],
        attn=args.attn,
        dtype=args.dtype,
        effective_batch=args.effective_batch,
        lora_dropout=args.lora_dropout,
        lora_fa=args.lora_fa,
        kernel=args.kernel,
        dora=args.dora,
        rslora=args.rslora,
        upcast=args.upcast,
        chunked_loss=args.chunked_loss,
        offload_ckpt=args.offload_ckpt,
        rope_scaling=args.rope_scaling,
    )


def _write_plan_recipe(args: argparse.Namespace, result: Any, model_name: str, data: Any) -> None:
    """Write the recipe ``train`` runs for this plan (atomically), with a header saying how it was made.

    A plan that does not fit writes nothing and says so: its recipe would only run out of memory (and
    ``train`` refuses it without ``--force``), and an earlier file at the path is left as it was."""
    from qlora_kit import recipe as recipes
    from qlora_kit.files import write_atomic
    from qlora_kit.plan.recipes import from_plan

    if not result.fits:  # one line after the plan; the exit status is the plan's: 3, nothing fits
        from qlora_kit.ui import print_error

        fix = result.advice[1] if len(result.advice) > 1 else "a bigger --gpu"
        print_error(
            f"{result.arch.name} does not fit on {result.device.name}, so no recipe was written to "
            f"{args.write_recipe}; make the plan fit first ({fix}), then --write-recipe again"
        )
        return
    if args.data:
        data = recipes.DataSpec(path=args.data)
    base = recipes.load_recipe(args.recipe, args.set) if args.recipe else None  # keeps what plan does not choose
    written = from_plan(result, result.arch.name, data or recipes.DEFAULT_DATA, base=base)
    source = (
        f"--recipe {args.recipe}" + "".join(f" --set {x}" for x in args.set) if args.recipe else f"--model {model_name}"
    )
    header = (
        f"qlora-kit recipe for {result.arch.name} on {result.device.name} (fits), written by\n"
        f"  qlora-kit plan {source} --gpu {args.gpu} --write-recipe {args.write_recipe}\n"
        f"train it with: qlora-kit train {args.write_recipe}"
        + ("" if data else "\n(data: the bundled quotes; point data.path at your dataset)")
    )
    write_atomic(args.write_recipe, recipes.dump_recipe(written, header))
    if not args.json:  # --json keeps stdout one object
        from qlora_kit import ui

        ui.console.print(f"recipe written to {args.write_recipe}")


def _sweep(args: argparse.Namespace, arch: Any, device: Any, constraints: Any) -> int:
    from qlora_kit.plan.sweep import parse_sweep, run_sweep, sweep_json

    if args.write_recipe:
        raise UsageError("--write-recipe writes one plan's recipe, --sweep makes several", "drop one of them")
    result = run_sweep(arch, device, constraints, parse_sweep(args.sweep))
    if args.json:
        print(json.dumps(sweep_json(result), indent=2))
    else:
        from qlora_kit import ui

        ui.render_sweep(result)
    return 0 if any(p.fits for p in result.plans) else 3
