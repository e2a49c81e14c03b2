"""``qlora-kit generate``: an adapter on its base (or a merged model) completes a prompt, streamed."""

from __future__ import annotations

import argparse
from typing import Any

from qlora_kit.cli.common import load_model, model_args


def add_parser(sub: Any) -> None:
    g = sub.add_parser(
        "generate",
        help="complete a prompt with an adapter (or a merged model), streaming the text",
        description="Load the base as training did plus the adapter (or a merged export) and complete a prompt.",
    )
    model_args(g)
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


def run(args: argparse.Namespace) -> int:
    from qlora_kit import ui
    from qlora_kit.infer.generate import GenerateSpec, check_spec, compare, generate, prompt_ids, uses_chat_template

    spec = GenerateSpec(args.max_new_tokens, args.temperature, args.top_p, args.seed)
    check_spec(spec)
    text = ui.read_prompt(args.prompt, args.prompt_file)
    model, tokenizer, info = load_model(args)
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
