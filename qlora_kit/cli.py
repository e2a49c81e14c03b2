"""The ``qlora-kit`` command: parse -> one library call -> render.

Heavy modules (torch, transformers, bitsandbytes) are imported inside the commands that need them,
so ``plan``, ``models``, ``gpus`` and ``--help`` answer without them. Domain errors become one line
on stderr and a non-zero exit, here and nowhere else.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Sequence
from typing import Any

from qlora_kit import __version__
from qlora_kit.errors import QloraKitError, UsageError


class _Parser(argparse.ArgumentParser):
    """argparse that reports a bad option as one line (exit 2) instead of usage + error."""

    def error(self, message: str) -> None:  # type: ignore[override]
        raise UsageError(f"{self.prog}: {message}", f"see `{self.prog} --help`")


def _auto(choices: Sequence[str]) -> list[str]:
    return ["auto", *choices]


def _build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="qlora-kit", description="Plan, train and export QLoRA fine-tunes on one GPU.")
    parser.add_argument("--version", action="version", version=f"qlora-kit {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)
    for add in (_plan_parser, _train_parser, _export_parser, _generate_parser, _eval_parser):
        add(sub)
    for verb, what, takes in (("models", "model catalog", "names --model"), ("gpus", "GPU table", "cards --gpu")):
        sub.add_parser(
            verb, help=f"list the {what}", description=f"List the {what}: the {takes} takes, and their sizes."
        )
    return parser


def _plan_parser(sub: Any) -> None:
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
    p.add_argument("--quant", choices=_auto(QUANTS), default="auto", help="base weights' quantization (searched)")
    _double_quant_arg(p, "quantize the 4-bit constants too (default: on with nf4/fp4)")
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
    p.add_argument("--optimizer", choices=_auto(OPTIMIZERS), default="auto", help="optimizer (default: searched)")
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


def _train_parser(sub: Any) -> None:
    t = sub.add_parser(
        "train", help="train a LoRA adapter from a recipe", description="Train a (Q)LoRA adapter as a recipe describes."
    )
    t.add_argument("recipe", help="recipe YAML (see recipes/)")
    t.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a recipe key")
    t.add_argument("--resume", action="store_true", help="continue from the latest checkpoint")
    t.add_argument("--force", action="store_true", help="train even if the plan does not fit; overwrite a previous run")
    t.add_argument("--gpus", type=int, help="train on N GPUs of this machine (relaunches under torchrun; train.gpus)")
    t.add_argument("--strategy", choices=["ddp", "fsdp", "fsdp-offload"], help="how N GPUs share the model")
    t.add_argument("--nnodes", type=int, default=1, metavar="N", help="machines in the run (same command on each)")
    t.add_argument("--node-rank", type=int, default=0, metavar="K", help="this machine's number, 0..N-1 (0 writes)")
    t.add_argument("--master-addr", metavar="HOST", help="address of the --node-rank 0 machine (needed with --nnodes)")
    t.add_argument("--master-port", type=int, metavar="PORT", help="free TCP port on that machine (default 29500)")
    _trust_arg(t)


def _trust_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--trust-remote-code",
        action="store_true",
        help="run the model's own Python code (auto_map); only ever from this flag, never from a file",
    )


def _double_quant_arg(p: argparse.ArgumentParser, text: str = "for plain peft adapters: the base's") -> None:
    p.add_argument("--double-quant", action=argparse.BooleanOptionalAction, default=None, help=text)


def _pickle_arg(p: argparse.ArgumentParser, what: str) -> None:
    p.add_argument("--allow-pickle", action="store_true", help=f"read pickle .bin {what} (unsafe: can run code)")


def _export_parser(sub: Any) -> None:
    e = sub.add_parser(
        "export",
        help="merge an adapter into its base and write an fp16 checkpoint",
        description="Dequantize the base, merge the adapter, write a plain transformers checkpoint.",
    )
    e.add_argument("--adapter", required=True, help="adapter directory (from qlora-kit train, or plain peft)")
    e.add_argument("--out", required=True, help="output directory (refused if not empty, unless --force)")
    e.add_argument("--base", help="base model path or id (default: from the adapter's metadata)")
    e.add_argument(
        "--quant",
        choices=["nf4", "fp4", "int8", "none"],
        help="quantization the adapter was trained against (plain peft adapters)",
    )
    _double_quant_arg(e)
    merge = "into the rounded 4-bit base the adapter trained on, or the 16-bit weights"
    e.add_argument("--merge-into", choices=["dequantized", "original"], default="dequantized", help=merge)
    e.add_argument("--dtype", choices=["fp16", "bf16", "fp32"], default="fp16", help="dtype of the merged weights")
    e.add_argument("--max-shard-size", default="5GB", help="largest safetensors shard (default: 5GB)")
    e.add_argument("--format", choices=["hf", "gguf"], default="hf", help="hf: safetensors; gguf: one llama.cpp file")
    e.add_argument("--gguf-type", choices=["f16", "bf16", "q8_0"], default="f16", help="tensor type of --format gguf")
    e.add_argument(
        "--verify",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="compare logits with the adapter model (default: when both fit in available memory)",
    )
    e.add_argument("--force", action="store_true", help="overwrite a non-empty --out")
    _pickle_arg(e, "adapters and base checkpoints")
    _trust_arg(e)


def _generate_parser(sub: Any) -> None:
    g = sub.add_parser(
        "generate",
        help="complete a prompt with an adapter (or a merged model), streaming the text",
        description="Load the base as training did plus the adapter (or a merged export) and complete a prompt.",
    )
    _model_args(g)
    g.add_argument("--prompt", help="the text to complete")
    g.add_argument("--prompt-file", metavar="FILE", help="read the prompt from a file")
    g.add_argument("--max-new-tokens", type=int, default=128, help="most tokens to generate (default: 128)")
    g.add_argument("--temperature", type=float, default=0.0, help="0 (default): greedy; above 0: sampling")
    g.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling (with --temperature > 0)")
    g.add_argument("--seed", type=int, default=0, help="sampling seed")
    g.add_argument("--compare-base", action="store_true", help="also print the base model's completion")
    g.add_argument(
        "--chat",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="use the tokenizer's chat template (default: if trained on chat data or a chat/instruct model)",
    )


def _eval_parser(sub: Any) -> None:
    v = sub.add_parser(
        "eval",
        help="loss and perplexity of an adapter and its base on held-out data",
        description="Loss and perplexity with the recipe's formatting and masking; the base's figures beside.",
    )
    _model_args(v)
    v.add_argument("--data", help="data file or hub id (default: the adapter's training data, its held-out split)")
    v.add_argument("--split", help="dataset split (default: the recipe's)")
    v.add_argument("--recipe", help="score the data (and held-out split) of this recipe, e.g. for a merged --model")
    v.add_argument("--max-samples", type=int, help="score the first N samples")
    v.add_argument("--batch-size", type=int, help="micro-batch (default: the recipe's)")
    v.add_argument("--json", action="store_true", help="print one JSON object")


def _model_args(p: argparse.ArgumentParser) -> None:
    which = p.add_mutually_exclusive_group(required=True)
    which.add_argument("--adapter", help="adapter directory (from qlora-kit train, or plain peft)")
    which.add_argument("--model", help="a merged export or any causal LM directory (plain transformers)")
    p.add_argument("--base", help="base model path (default: from the adapter's metadata)")
    p.add_argument("--quant", choices=["nf4", "fp4", "int8", "none"], help="for plain peft adapters: the base's")
    _double_quant_arg(p)
    _pickle_arg(p, "adapters")
    _trust_arg(p)


def _plan(args: argparse.Namespace) -> int:
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
    from qlora_kit.plan.search import Constraints

    if not args.model:
        raise UsageError("plan needs --model (or --recipe)", "e.g. qlora-kit plan --model opt-6.7b --gpu 24GB")
    if args.set:
        raise UsageError("--set overrides recipe keys", "use it with --recipe")
    if args.dora and (args.lora_fa or args.kernel == "runlora"):
        raise UsageError("--dora does not combine with --lora-fa or --kernel runlora", "choose one LoRA variant")
    if args.quant in ("none", "int8") and args.double_quant:
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
    recipes.write_atomic(args.write_recipe, recipes.dump_recipe(written, header))
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


def _models(args: argparse.Namespace) -> int:
    from qlora_kit import ui
    from qlora_kit.catalog.models import ambiguous_names, catalog_names, lookup, short_names

    names = catalog_names()
    ui.render_models([lookup(n) for n in names], {n: short_names(n) for n in names}, ambiguous_names())
    return 0


def _gpus(args: argparse.Namespace) -> int:
    from qlora_kit import ui
    from qlora_kit.catalog.gpus import gpu_table

    ui.render_gpus(gpu_table())
    return 0


def quiet_libraries() -> None:
    """Our progress display replaces transformers' loading bars; its deprecation chatter is not the user's."""
    import logging
    import warnings

    from transformers.utils import logging as hf_logging

    # bitsandbytes warns on import that an optional CPU kernel package is missing, and on every int8 call
    logging.getLogger("bitsandbytes").setLevel(logging.ERROR)
    hf_logging.disable_progress_bar()
    hf_logging.set_verbosity_error()
    warnings.filterwarnings("ignore", category=FutureWarning)
    warnings.filterwarnings("ignore", category=UserWarning, module="torch")


def _train(args: argparse.Namespace) -> int:
    import dataclasses

    from qlora_kit import ui
    from qlora_kit.recipe import load_recipe
    from qlora_kit.train import distributed

    sets = [*args.set, *([f"train.gpus={args.gpus}"] if args.gpus is not None else [])]
    sets += [f"train.strategy={args.strategy}"] if args.strategy else []
    recipe = load_recipe(args.recipe, sets)
    if recipe.model.trust_remote_code and not args.trust_remote_code:  # the flag is the only source
        raise UsageError(
            "the recipe sets model.trust_remote_code, but only the command line may let the model's own code run",
            "pass --trust-remote-code if you trust that code, or remove the key",
        )
    if args.trust_remote_code:
        recipe = dataclasses.replace(recipe, model=dataclasses.replace(recipe.model, trust_remote_code=True))
    nodes = distributed.Nodes(args.nnodes, args.node_rank, args.master_addr, args.master_port)
    if distributed.needs_launch(recipe.train.gpus, nodes):  # one process per GPU, each back here
        argv = ["train", args.recipe, *[x for s in sets for x in ("--set", s)]]
        argv += ["--trust-remote-code"] * args.trust_remote_code
        argv += ["--resume"] * args.resume + ["--force"] * args.force
        return distributed.relaunch(recipe.train.gpus, argv, nodes)
    quiet_libraries()
    from qlora_kit.train.loop import train

    reporter = ui.RichReporter()
    try:
        train(recipe, reporter, resume=args.resume, force=args.force)
    finally:
        reporter.close()
    return 0


def _export(args: argparse.Namespace) -> int:
    from qlora_kit import ui

    quiet_libraries()
    from qlora_kit.export.run import export

    reporter = ui.ExportReporter()
    common = {"base": args.base, "quant": args.quant, "double_quant": args.double_quant, "merge_into": args.merge_into}
    common.update(verify=args.verify, force=args.force, allow_pickle=args.allow_pickle, reporter=reporter)
    common.update(trust_remote_code=args.trust_remote_code)
    try:
        if args.format == "gguf":
            from qlora_kit.export.gguf import export_gguf

            summary = export_gguf(args.adapter, args.out, gguf_type=args.gguf_type, **common)
        else:
            summary = export(args.adapter, args.out, dtype=args.dtype, max_shard_size=args.max_shard_size, **common)
    except KeyboardInterrupt:  # export removes its hidden partial directory on the way out
        reporter.close()
        ui.print_error(f"export interrupted, nothing written to {args.out}")
        return 130
    finally:
        reporter.close()
    ui.render_export(summary)
    return 0


def _load(args: argparse.Namespace) -> tuple:
    quiet_libraries()
    from qlora_kit.adapter import load_for_inference

    return load_for_inference(
        args.adapter,
        args.model,
        base=args.base,
        quant=args.quant,
        double_quant=args.double_quant,
        trust_remote_code=args.trust_remote_code,
        allow_pickle=args.allow_pickle,
    )


def _generate(args: argparse.Namespace) -> int:
    from qlora_kit import ui
    from qlora_kit.infer.generate import GenerateSpec, check_spec, compare, generate, prompt_ids, uses_chat_template

    spec = GenerateSpec(args.max_new_tokens, args.temperature, args.top_p, args.seed)
    check_spec(spec)
    text = ui.read_prompt(args.prompt, args.prompt_file)
    model, tokenizer, info = _load(args)
    chat = uses_chat_template(tokenizer, info, args.chat)
    ids = prompt_ids(tokenizer, text, chat)
    printer = ui.StreamPrinter(text, chat)
    if args.compare_base:
        completions = compare(model, tokenizer, ids, spec, printer.labelled)
    else:
        label = "adapter" if info.adapter else "model"
        printer.labelled(label, "")
        completions = {label: generate(model, tokenizer, ids, spec, lambda piece: printer.labelled(label, piece))}
    printer.finish(completions)
    return 0


def _eval(args: argparse.Namespace) -> int:
    from qlora_kit import ui
    from qlora_kit.infer.evaluate import check_counts, eval_data, score

    check_counts(args.max_samples, args.batch_size)
    recipe = None
    if args.recipe:
        from qlora_kit.recipe import load_recipe

        recipe = load_recipe(args.recipe).to_dict()
    model, tokenizer, info = _load(args)

    result = score(
        model, tokenizer, info, eval_data(info, args.data, args.split, recipe), args.max_samples, args.batch_size
    )
    if args.json:
        print(json.dumps(result, indent=2))
    else:
        ui.render_scores(result)
    return 0


COMMANDS = {
    "plan": _plan,
    "train": _train,
    "export": _export,
    "generate": _generate,
    "eval": _eval,
    "models": _models,
    "gpus": _gpus,
}


def main(argv: Sequence[str] | None = None) -> int:
    try:
        args = _build_parser().parse_args(argv)
        status = COMMANDS[args.command](args)
        sys.stdout.flush()  # a closed pipe shows here, not in the interpreter's flush at exit
        return status
    except BrokenPipeError:  # `qlora-kit plan | head -1`: the reader has all it wanted
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # so the flush at exit says nothing
        return 0
    except QloraKitError as exc:
        from qlora_kit.ui import print_error

        print_error(str(exc))
        return exc.exit_code
    except OSError as exc:  # an unwritable output path, a full disk: the OS said why
        from qlora_kit.ui import print_error

        where = f" ({exc.filename})" if exc.filename else ""
        print_error(f"{exc.strerror or exc}{where}; check the path, its permissions and free space")
        return 1
    except KeyboardInterrupt:
        return 130
