"""``qlora-kit train``: a recipe (plus ``--set`` overrides) -> the training loop, relaunched under torchrun
once per GPU when the run has several."""

from __future__ import annotations

import argparse
from typing import Any

from qlora_kit.cli.common import quiet_libraries, trust_arg
from qlora_kit.errors import UsageError


def add_parser(sub: Any) -> None:
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
    trust_arg(t)


def run(args: argparse.Namespace) -> int:
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
