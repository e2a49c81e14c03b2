"""``qlora-kit eval``: loss and perplexity of an adapter and its base on held-out data."""

from __future__ import annotations

import argparse
import json
from typing import Any

from qlora_kit.cli.common import load_model, model_args


def add_parser(sub: Any) -> None:
    v = sub.add_parser(
        "eval",
        help="loss and perplexity of an adapter and its base on held-out data",
        description="Loss and perplexity with the recipe's formatting and masking; the base's figures beside.",
    )
    model_args(v)
    v.add_argument("--data", help="data file or hub id (default: the adapter's training data, its held-out split)")
    v.add_argument("--split", help="dataset split (default: the recipe's)")
    v.add_argument("--recipe", help="score the data (and held-out split) of this recipe, e.g. for a merged --model")
    v.add_argument("--max-samples", type=int, help="score the first N samples")
    v.add_argument("--batch-size", type=int, help="micro-batch (default: the recipe's)")
    v.add_argument("--json", action="store_true", help="print one JSON object")


def run(args: argparse.Namespace) -> int:
    from qlora_kit import ui
    from qlora_kit.infer.evaluate import check_counts, eval_data, score

    check_counts(args.max_samples, args.batch_size)
    recipe = None
    if args.recipe:
        from qlora_kit.recipe import load_recipe

        recipe = load_recipe(args.recipe).to_dict()
    model, tokenizer, info = load_model(args)

    result = score(
        model, tokenizer, info, eval_data(info, args.data, args.split, recipe), args.max_samples, args.batch_size
    )
    if args.json:
        print(json.dumps(result, indent=2))
    else:
        ui.render_scores(result)
    return 0
