"""Measure real training steps against the planner, term by term.

Builds a random-init model from a catalog entry, a local directory's config.json (its weights when it
has them) or a config JSON file, loads it with the requested knobs through the code ``qlora-kit train``
uses (load_base -> prepare -> apply_lora), runs a few optimizer steps and prints, next to the
planner's prediction: weights and quantization state, LoRA parameters, gradients and optimizer state
(from the tensors), the bytes saved for backward (saved-tensor hooks and custom functions' ctx), and
the peak of the steady-state step (CPU: live tensor bytes from the profiler's allocation events; CUDA:
max_memory_allocated / max_memory_reserved and the device's used memory).

    python tools/measure_memory.py --config tests/tiny-llama.json --quant nf4 --seq-len 64
    python tools/measure_memory.py --model opt-125m --quant int8 --grad-ckpt on --attn eager --json out.json
    python tools/measure_memory.py --model meta-llama/Llama-2-7b-hf --device cuda --quant nf4 \\
        --batch-size 1 --seq-len 1024 --work-dir /tmp     # real size, random weights, on a GPU

On a GPU the random model is initialized on the device, saved in bf16 to a temporary directory under
``--work-dir`` (a 7B model needs ~14 GB of disk) and loaded back quantized; the directory is removed
afterwards. Exit status: 0, or 1 with ``--max-error`` when a term misses by more than that.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

from qlora_kit.catalog.models import catalog_configs, resolve_model
from qlora_kit.errors import QloraKitError, UsageError
from qlora_kit.knobs import (
    ATTNS,
    DTYPES,
    OPTIMIZERS,
    QUANTS,
    UPCASTS,
    TrainSetup,
    double_quant_for,
    double_quant_refused,
)
from qlora_kit.plan.targets import resolve_targets

LABELS = {
    "linear_weights": "base linear weights",
    "quant_state": "quantization constants",
    "other_params": "embeddings, head, norms, biases",
    "lora_params": "LoRA parameters",
    "lora_grads": "LoRA gradients",
    "optimizer_state": "optimizer state",
    "saved": "saved for backward (after forward)",
    "saved_ctx": "  of which kept on ctx (LLM.int8)",
    "dynamic": "step's peak above its start",
    "peak": "peak of live tensor bytes",
    "peak_allocated": "max_memory_allocated",
    "peak_reserved": "max_memory_reserved",
    "device": "device used memory (nvidia-smi)",
}


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--model", help="catalog name, or a local directory (config.json, weights if present)")
    src.add_argument("--config", help="a config.json-style file for a (tiny) model built from scratch")
    p.add_argument("--quant", choices=QUANTS, default="nf4")
    p.add_argument("--double-quant", action=argparse.BooleanOptionalAction, default=None)
    p.add_argument("--rank", type=int, default=16)
    p.add_argument("--targets", default="all-linear", help="all-linear, default, or comma-separated names")
    p.add_argument("--batch-size", type=int, default=1, help="micro-batch size")
    p.add_argument("--grad-accum", type=int, default=2, help="micro-batches per optimizer step (default 2)")
    p.add_argument("--seq-len", type=int, default=128)
    p.add_argument("--grad-ckpt", choices=["on", "off"], default="off")
    p.add_argument("--attn", choices=ATTNS, default="sdpa")
    p.add_argument("--dtype", choices=list(DTYPES), help="compute dtype (default: fp32 on CPU, bf16 on CUDA)")
    p.add_argument("--lora-dropout", type=float, default=0.05)
    p.add_argument("--optimizer", choices=OPTIMIZERS, default="adamw")
    p.add_argument("--upcast", choices=UPCASTS, default="all", help="k-bit preparation's fp32 upcast (quant.upcast)")
    p.add_argument("--chunked-loss", action="store_true", help="head + loss in chunks (train.chunked_loss)")
    p.add_argument("--offload-ckpt", action="store_true", help="checkpoints in host memory (train.offload_ckpt)")
    p.add_argument("--dora", action="store_true", help="DoRA layers (lora.variant: dora, docs/dora.md)")
    p.add_argument("--steps", type=int, default=3, help="optimizer steps; the last one is measured (>= 2)")
    p.add_argument("--device", default="cpu", help="cpu or cuda[:N]")
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads (default 1)")
    p.add_argument("--work-dir", help="where the random model is written (default: the system temp dir)")
    p.add_argument("--json", metavar="PATH", help="also write the comparison as JSON")
    p.add_argument("--max-error", type=float, help="exit 1 if a dynamic or peak term misses by more (0.05 = 5%%)")
    return p


def _source(args: argparse.Namespace) -> tuple[dict[str, object], str, Path | None]:
    """(config dict, model name, directory with weights to load instead of random ones)."""
    if args.config:
        path = Path(args.config)
        try:
            cfg = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError) as exc:
            raise UsageError(f"cannot read {path}: {exc}", "pass a config.json-style file") from None
        return cfg, path.stem, None
    path = Path(args.model).expanduser()
    if path.is_dir():
        cfg = json.loads((path / "config.json").read_text())
        weights = any(path.glob("*.safetensors")) or any(path.glob("*.bin"))
        return cfg, str(path), path if weights else None
    arch = resolve_model(args.model)  # a catalog name (no download: configs are bundled)
    if arch.name not in catalog_configs():
        raise UsageError(f"{args.model!r} is not in the catalog", "pass a catalog name, a directory or --config")
    return dict(catalog_configs()[arch.name]), arch.name, None


def _setup(args: argparse.Namespace, cfg: dict[str, object]) -> TrainSetup:
    from qlora_kit.catalog.readers import arch_from_config

    arch = arch_from_config(cfg)
    _, targets = resolve_targets(args.targets, arch.model_type, arch.linear_names(), arch.name)
    cuda = args.device.startswith("cuda")
    if double_quant_refused(args.quant, args.double_quant):
        raise UsageError(f"--double-quant contradicts --quant {args.quant}", "double quant is for nf4/fp4")
    dq = double_quant_for(args.quant, args.double_quant)
    if args.steps < 2 or args.grad_accum < 1 or args.batch_size < 1 or args.seq_len < 1 or args.rank < 1:
        raise UsageError("--steps must be >= 2 and sizes positive", "see --help")
    return TrainSetup(
        quant=args.quant,
        double_quant=dq,
        dtype=args.dtype or ("bf16" if cuda else "fp32"),
        rank=args.rank,
        targets=targets,
        optimizer=args.optimizer,
        batch_size=args.batch_size,
        seq_len=args.seq_len,
        grad_ckpt=args.grad_ckpt == "on",
        attn=args.attn,
        lora_dropout=args.lora_dropout,
        upcast=args.upcast,
        chunked_loss=args.chunked_loss,
        offload_ckpt=args.offload_ckpt and args.grad_ckpt == "on",
        dora=args.dora,
    )


def _mib(n: float) -> str:
    return f"{n / (1 << 20):,.3f}"


def render(report: object) -> None:
    from rich.console import Console
    from rich.table import Table

    from qlora_kit.measure.report import Report

    assert isinstance(report, Report)
    console = Console(highlight=False, width=None if sys.stdout.isatty() else 120)
    s = report.setup
    console.print(
        f"[bold]{report.model}[/] on [bold]{report.device}[/]: {s.quant}"
        f"{' + double quant' if s.double_quant else ''}, {s.dtype} compute, r={s.rank} on "
        f"{len(s.targets)} target(s), micro-batch {s.batch_size} x {report.grad_accum}, seq {s.seq_len}, "
        f"checkpointing {'on' if s.grad_ckpt else 'off'}, {s.attn}, {s.optimizer}"
    )
    table = Table(title="measured vs planner (MiB)", title_justify="left")
    table.add_column("term")
    table.add_column("measured", justify="right")
    table.add_column("planner", justify="right")
    table.add_column("error", justify="right")
    for r in report.rows:
        if r.term in ("saved", "dynamic"):
            table.add_section()
        err = "" if not (r.measured or r.predicted) else f"{r.error:+.2%}"
        style = "red" if r.measured and abs(r.error) > 0.05 else ""
        table.add_row(LABELS.get(r.term, r.term), _mib(r.measured), _mib(r.predicted), err, style=style)
    console.print(table)
    m = report.measurement
    console.print(
        f"planner's peak moment: {report.moment}; measured step {m.step_s:.2f} s"
        + (f", peak {m.peak.at_s * 1e3:.0f} ms into it" if m.peak.at_s else "")
        + f"; losses {', '.join(f'{x:.3f}' for x in m.losses)}"
    )


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        cfg, name, weights_dir = _source(args)
        setup = _setup(args, cfg)
        # before torch loads: bitsandbytes' CPU dequantize of odd shapes falls back to torch.compile
        os.environ.setdefault("TORCH_COMPILE_DISABLE", "1")
        import torch

        from qlora_kit.cli.common import quiet_libraries
        from qlora_kit.measure import report as measure

        quiet_libraries()  # bitsandbytes' per-call int8 notes and transformers' loading bars
        torch.set_num_threads(args.threads)
        if args.device.startswith("cuda") and not torch.cuda.is_available():
            raise UsageError("--device cuda but torch sees no GPU", "run on a GPU machine or use --device cpu")
        report = measure.run(
            cfg,
            setup,
            args.device,
            steps=args.steps,
            grad_accum=args.grad_accum,
            model_dir=weights_dir,
            name=name,
            work_dir=args.work_dir,
        )
    except QloraKitError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    render(report)
    if args.json:
        measure.write_json(report, args.json)
    if args.max_error is not None:
        checked = ("saved", "dynamic", "peak", "peak_allocated")
        bad = [r for r in report.rows if r.term in checked and abs(r.error) > args.max_error]
        return 1 if bad else 0
    return 0


if __name__ == "__main__":
    sys.exit(main())
