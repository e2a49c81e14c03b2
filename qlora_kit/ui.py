"""Rendering with rich: tables, panels and error lines. One Console each for stdout and stderr; no logic."""

from __future__ import annotations

import sys

from rich.console import Console
from rich.table import Table

from qlora_kit.catalog import ArchSpec
from qlora_kit.devices import GIB, DeviceSpec
from qlora_kit.planner import Plan

# Piped output (a file, a CI log) is not squeezed into 80 columns.
console = Console(highlight=False, width=None if sys.stdout.isatty() else 120)
err_console = Console(stderr=True, highlight=False, width=None if sys.stderr.isatty() else 200)

TERM_LABELS = {
    "linear_weights": "base linear weights",
    "quant_state": "quantization constants",
    "other_params": "embeddings, head, norms, biases",
    "lora_params": "LoRA parameters (fp32)",
    "lora_grads": "LoRA gradients (fp32)",
    "optimizer_state": "optimizer state",
    "activations": "activations kept for backward",
    "logits_loss": "logits and loss",
    "transient": "dequantized weight (transient)",
    "cublas_workspace": "cuBLAS workspace",
    "allocator_slack": "allocator slack (reserved - allocated)",
    "cuda_context": "CUDA context",
}


def gib(n: float) -> str:
    return f"{n / GIB:,.2f} GiB"


def print_error(message: str) -> None:
    err_console.print(f"[bold red]error:[/] {message}", soft_wrap=True)


def render_plan(p: Plan) -> None:
    est = p.best.estimate
    verdict = "[green]fits[/]" if p.fits else "[red]does not fit[/]"
    console.print(
        f"[bold]{p.arch.name}[/] on [bold]{p.device.name}[/] ({gib(p.device.memory_bytes)}; "
        f"{gib(p.limit_bytes)} usable after 5% headroom): {verdict}"
    )
    table = Table(title="memory at the peak of one optimizer step", title_justify="left")
    table.add_column("term")
    table.add_column("GiB", justify="right")
    for key, value in est.breakdown.items():
        if value:
            table.add_row(TERM_LABELS.get(key, key), f"{value / GIB:,.2f}")
    table.add_section()
    table.add_row("peak allocated (max_memory_allocated)", f"{est.peak_allocated_bytes / GIB:,.2f}")
    table.add_row("peak reserved (max_memory_reserved)", f"{est.peak_reserved_bytes / GIB:,.2f}")
    table.add_row("[bold]on the device (nvidia-smi)[/]", f"[bold]{est.device_bytes / GIB:,.2f}[/]")
    if est.paged_bytes:
        table.add_row("paged optimizer state (may spill to host)", f"{est.paged_bytes / GIB:,.2f}")
    console.print(table)
    title = "chosen settings" if p.fits else "smallest setting"
    choice = ", ".join(f"{k}={v}" for k, v in p.best.choice().items())
    console.print(f"[bold]{title}:[/] {choice}")
    for reason in p.reasons:
        console.print(f"  - {reason}")
    for line in p.advice:
        console.print(f"  - {line}")
    if p.runners_up:
        alt = Table(title="runners-up", title_justify="left")
        for col in ("quant", "grad_ckpt", "targets", "batch x accum", "optimizer", "device GiB"):
            alt.add_column(col)
        for x in p.runners_up:
            alt.add_row(
                x.setup.quant + ("+dq" if x.setup.double_quant else ""),
                str(x.setup.grad_ckpt),
                x.targets_label,
                f"{x.setup.batch_size} x {x.grad_accum}",
                x.setup.optimizer,
                f"{x.estimate.device_bytes / GIB:,.2f}",
            )
        console.print(alt)


def render_models(archs: list[ArchSpec]) -> None:
    table = Table(title=f"{len(archs)} models in the catalog", title_justify="left")
    for col in ("name", "type", "params", "layers", "hidden", "heads/kv", "vocab", "context"):
        table.add_column(col, justify="left" if col in ("name", "type") else "right", no_wrap=col == "name")
    for a in archs:
        table.add_row(
            a.name,
            a.model_type,
            f"{a.num_params / 1e9:.2f}B",
            str(a.num_layers),
            str(a.hidden_size),
            f"{a.num_heads}/{a.num_kv_heads}",
            f"{a.vocab_size:,}",
            str(a.max_positions or "-"),
        )
    console.print(table)


def render_gpus(devices: tuple[DeviceSpec, ...]) -> None:
    table = Table(title=f"{len(devices)} GPUs (memory in GiB; any size also works: --gpu 24GB)", title_justify="left")
    for col in ("name", "GiB", "bf16", "family"):
        table.add_column(col)
    for d in devices:
        table.add_row(d.name, f"{d.memory_gib:g}", "yes" if d.bf16 else "no (fp16)", d.family)
    console.print(table)


class RichReporter:
    """Training progress on the terminal: one live bar with step, loss, lr, tokens/s, memory and ETA."""

    def __init__(self) -> None:
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

        self.progress = Progress(
            TextColumn("[bold]train[/]"),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn("{task.fields[info]}"),
            TimeRemainingColumn(),
            console=console,
            transient=False,
        )
        self.task: int | None = None

    def message(self, text: str) -> None:
        console.print(text)

    def start(self, total_steps: int, start_step: int) -> None:
        self.progress.start()
        self.task = self.progress.add_task("train", total=total_steps, completed=start_step, info="")

    def step(self, m: dict[str, object]) -> None:
        info = (
            f"loss {m['loss']:.4f}  lr {m['lr']:.2e}  {m['tokens_per_s']:,.0f} tok/s  "
            f"mem {float(m['memory_bytes']) / GIB:.2f} GiB"
        )  # type: ignore[arg-type]
        if "eval_loss" in m:
            info += f"  eval {m['eval_loss']:.4f}"
        if self.task is not None:
            self.progress.update(self.task, completed=m["step"], info=info)  # type: ignore[arg-type]

    def finish(self, summary: dict[str, object]) -> None:
        self.close()
        line = f"done: {summary['steps']} steps, final loss {summary['final_loss']:.4f}"  # type: ignore[str-format]
        if summary.get("eval_loss") is not None:
            line += f", eval loss {summary['eval_loss']:.4f} (perplexity {summary['eval_ppl']:.2f})"
        console.print(line)
        console.print(f"adapter: {summary['output_dir']}")

    def close(self) -> None:
        if self.progress.live.is_started:  # stopping a bar that never started prints a blank line
            self.progress.stop()


class ExportReporter:
    """Export progress: a bar per phase (bytes merged and written, then models verified)."""

    def __init__(self) -> None:
        from rich.progress import BarColumn, DownloadColumn, Progress, TextColumn, TimeRemainingColumn

        self.progress = Progress(
            TextColumn("[bold]{task.description}[/]"),
            BarColumn(),
            DownloadColumn(),
            TimeRemainingColumn(),
            console=console,
        )
        self.task: int | None = None

    def message(self, text: str) -> None:
        console.print(text)

    def start(self, phase: str, total: int) -> None:
        if self.task is None:
            self.progress.start()
        else:
            self.progress.update(self.task, completed=self.progress.tasks[-1].total)
        self.task = self.progress.add_task(phase, total=total)

    def advance(self, amount: int) -> None:
        if self.task is not None:
            self.progress.advance(self.task, amount)

    def close(self) -> None:
        if self.progress.live.is_started:  # stopping a bar that never started prints a blank line
            self.progress.stop()


def render_export(summary: dict[str, object]) -> None:
    console.print(
        f"merged {summary['merged_tensors']} tensors ({summary['merge_into']}) into {summary['shards']} "
        f"shard(s), {float(summary['total_bytes']) / GIB:.2f} GiB of {summary['dtype']}: "  # type: ignore[arg-type]
        f"{summary['out_dir']}"
    )
    check = summary.get("verification")
    if isinstance(check, dict):
        console.print(
            f"verified against the adapter model: max |logit diff| {check.get('max_abs_diff'):.3g}, "
            f"KL {check.get('kl'):.3g}"
        )
    else:
        console.print("not verified (--no-verify)")
