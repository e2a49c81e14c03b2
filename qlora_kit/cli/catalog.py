"""``qlora-kit models`` and ``qlora-kit gpus``: the catalog's two tables."""

from __future__ import annotations

import argparse
from typing import Any


def add_parser(sub: Any) -> None:
    for verb, what, takes in (("models", "model catalog", "names --model"), ("gpus", "GPU table", "cards --gpu")):
        sub.add_parser(
            verb, help=f"list the {what}", description=f"List the {what}: the {takes} takes, and their sizes."
        )


def models(args: argparse.Namespace) -> int:
    from qlora_kit import ui
    from qlora_kit.catalog.models import ambiguous_names, catalog_names, lookup, short_names

    names = catalog_names()
    ui.render_models([lookup(n) for n in names], {n: short_names(n) for n in names}, ambiguous_names())
    return 0


def gpus(args: argparse.Namespace) -> int:
    from qlora_kit import ui
    from qlora_kit.catalog.gpus import gpu_table

    ui.render_gpus(gpu_table())
    return 0
