"""What several verbs share: the one-line argparse, the flags they have in common, and quieting the
libraries (the one place their log levels and warnings are set) before a verb loads a model."""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from qlora_kit.errors import UsageError
from qlora_kit.knobs import FOUR_BIT

if TYPE_CHECKING:
    from qlora_kit.infer.load import LoadedInfo


class Parser(argparse.ArgumentParser):
    """argparse that reports a bad option as one line (exit 2) instead of usage + error."""

    def error(self, message: str) -> None:  # type: ignore[override]
        raise UsageError(f"{self.prog}: {message}", f"see `{self.prog} --help`")


def auto(choices: Sequence[str]) -> list[str]:
    return ["auto", *choices]


def trust_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--trust-remote-code",
        action="store_true",
        help="run the model's own Python code (auto_map); only ever from this flag, never from a file",
    )


def double_quant_arg(p: argparse.ArgumentParser, text: str = "for plain peft adapters: the base's") -> None:
    p.add_argument("--double-quant", action=argparse.BooleanOptionalAction, default=None, help=text)


def pickle_arg(p: argparse.ArgumentParser, what: str) -> None:
    p.add_argument("--allow-pickle", action="store_true", help=f"read pickle .bin {what} (unsafe: can run code)")


def quiet_libraries() -> None:
    """Our progress display replaces transformers' loading bars; its deprecation chatter is not the user's.

    Called by the verbs that load a model, just before they import the libraries (``plan`` never does,
    so it stays torch- and transformers-free); no library module sets a log level when imported."""
    import logging
    import warnings

    from transformers.utils import logging as hf_logging

    # bitsandbytes warns on import that an optional CPU kernel package is missing, and logs
    # "MatMul8bitLt: inputs will be cast ..." on every int8 call (STACK.md)
    logging.getLogger("bitsandbytes").setLevel(logging.ERROR)
    hf_logging.disable_progress_bar()
    hf_logging.set_verbosity_error()
    warnings.filterwarnings("ignore", category=FutureWarning)
    warnings.filterwarnings("ignore", category=UserWarning, module="torch")


def model_args(p: argparse.ArgumentParser) -> None:
    """``--adapter`` or ``--model`` and how to load it: the flags ``generate`` and ``eval`` share."""
    which = p.add_mutually_exclusive_group(required=True)
    which.add_argument("--adapter", help="adapter directory (from qlora-kit train, or plain peft)")
    which.add_argument("--model", help="a merged export or any causal LM directory (plain transformers)")
    p.add_argument("--base", help="base model path (default: from the adapter's metadata)")
    p.add_argument("--quant", choices=[*FOUR_BIT, "int8", "none"], help="for plain peft adapters: the base's")
    double_quant_arg(p)
    pickle_arg(p, "adapters")
    trust_arg(p)


def load_model(args: argparse.Namespace) -> tuple[Any, Any, LoadedInfo]:
    """(model, tokenizer, info) as :func:`model_args` describe them, loaded as training did."""
    quiet_libraries()
    from qlora_kit.infer.load import load_for_inference

    return load_for_inference(
        args.adapter,
        args.model,
        base=args.base,
        quant=args.quant,
        double_quant=args.double_quant,
        trust_remote_code=args.trust_remote_code,
        allow_pickle=args.allow_pickle,
    )
