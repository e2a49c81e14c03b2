"""``qlora-kit export``: an adapter -> merged into its base -> a transformers checkpoint or one GGUF file."""

from __future__ import annotations

import argparse
from typing import Any

from qlora_kit.cli.common import double_quant_arg, pickle_arg, quiet_libraries, trust_arg
from qlora_kit.knobs import FOUR_BIT


def add_parser(sub: Any) -> None:
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
        choices=[*FOUR_BIT, "int8", "none"],
        help="quantization the adapter was trained against (plain peft adapters)",
    )
    double_quant_arg(e)
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
    pickle_arg(e, "adapters and base checkpoints")
    trust_arg(e)


def run(args: argparse.Namespace) -> int:
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
