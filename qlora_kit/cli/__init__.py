"""The ``qlora-kit`` command: parse -> one library call -> render.

One module per verb holds its flags (``add_parser``) and its handler (``run``); :mod:`.common` has
what several share. Heavy modules (torch, transformers, bitsandbytes) are imported inside the
handlers that need them, so ``plan``, ``models``, ``gpus`` and ``--help`` answer without them. Domain
errors become one line on stderr and a non-zero exit, here and nowhere else.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Callable, Sequence

from qlora_kit import __version__
from qlora_kit.cli import catalog, evaluate, export, generate, plan, train
from qlora_kit.cli.common import Parser
from qlora_kit.errors import QloraKitError

COMMANDS: dict[str, Callable[[argparse.Namespace], int]] = {
    "plan": plan.run,
    "train": train.run,
    "export": export.run,
    "generate": generate.run,
    "eval": evaluate.run,
    "models": catalog.models,
    "gpus": catalog.gpus,
}


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(prog="qlora-kit", description="Plan, train and export QLoRA fine-tunes on one GPU.")
    parser.add_argument("--version", action="version", version=f"qlora-kit {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=Parser)
    for verb in (plan, train, export, generate, evaluate, catalog):  # the order --help lists them in
        verb.add_parser(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    try:
        args = build_parser().parse_args(argv)
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
