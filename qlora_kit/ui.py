"""Rendering with rich: tables, panels and error lines. One Console each for stdout and stderr; no logic."""

from __future__ import annotations

import sys
from typing import Any

from rich.console import Console
from rich.table import Table

from qlora_kit.catalog.arch import ArchSpec
from qlora_kit.catalog.gpus import GIB, HEADROOM, DeviceSpec
from qlora_kit.plan.search import Plan
from qlora_kit.plan.sweep import SweepResult


class _Console(Console):
    """rich's Console, but a closed pipe (``qlora-kit plan | head -1``) raises BrokenPipeError for the
    CLI to end quietly with status 0, where rich would exit with status 1."""

    def on_broken_pipe(self) -> None:
        self.quiet = True
        raise BrokenPipeError


# Piped output (a file, a CI log) is not squeezed into 80 columns.
console = _Console(highlight=False, width=None if sys.stdout.isatty() else 120)
err_console = _Console(stderr=True, highlight=False, width=None if sys.stderr.isatty() else 200)

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
    "ddp_buckets": "DDP gradient buckets",
    "fsdp_gathered": "FSDP gathered layers (full size)",
    "nccl_buffers": "NCCL ring buffers (outside torch's allocator)",
}


def gib(n: float) -> str:
    return f"{n / GIB:,.2f} GiB"


def print_error(message: str) -> None:
    from rich.markup import escape  # an error names paths and extras like qlora-kit[gguf]: not markup

    err_console.print(f"[bold red]error:[/] {escape(message)}", soft_wrap=True)


def render_plan(p: Plan) -> None:
    est = p.best.estimate
    verdict = "[green]fits[/]" if p.fits else "[red]does not fit[/]"
    console.print(
        f"[bold]{p.arch.name}[/] on [bold]{p.device.name}[/] ({gib(p.device.memory_bytes)}; "
        f"{gib(p.limit_bytes)} usable after {HEADROOM:.0%} headroom): {verdict}"
    )
    per_gpu = f", per GPU of {p.best.gpus} ({p.best.strategy})" if p.best.gpus > 1 else ""
    table = Table(title=f"memory at the peak of one optimizer step{per_gpu}", title_justify="left")
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
    if est.host_bytes:
        table.add_row("host memory (offloaded, all GPUs)", f"{est.host_bytes / GIB:,.2f}")
    console.print(table)
    title = "chosen settings" if p.fits else "smallest setting"
    defaults = {
        "lora_fa": False,
        "kernel": "peft",
        "dora": False,
        "rslora": False,
        "upcast": "all",
        "chunked_loss": False,
        "offload_ckpt": False,
    }
    switches = {k: v for k, v in p.best.switches().items() if defaults.get(k) != v}
    choice = ", ".join(f"{k}={v}" for k, v in {**p.best.choice(), **switches}.items())
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


SWEPT = {"quant": "quant", "grad-ckpt": "grad_ckpt", "optimizer": "optimizer"}  # sweep knob -> its chosen column


def render_sweep(result: SweepResult) -> None:
    """One row per swept value: its plan's peak, device bytes, fit, and the knobs the planner chose."""
    first = result.plans[0]
    console.print(
        f"[bold]{first.arch.name}[/] on [bold]{first.device.name}[/] ({gib(first.limit_bytes)} usable), "
        f"sweeping [bold]{result.sweep.knob}[/]"
    )
    knob = result.sweep.knob
    host = any(p.best.estimate.host_bytes for p in result.plans)
    table = Table(title_justify="left")
    for col in (knob, "peak allocated GiB", "device GiB", *(["host GiB"] if host else []), "fits"):
        table.add_column(col, justify="right")
    chosen = [c for c in ("quant", "targets", "grad_ckpt", "batch x accum", "optimizer") if c != SWEPT.get(knob)]
    for col in chosen:  # the knobs the planner chose, less the swept one: its column is the first
        table.add_column(col)
    for label, p in zip(result.sweep.labels, result.plans, strict=True):
        est, s = p.best.estimate, p.best.setup
        cells = {
            "quant": s.quant + ("+dq" if s.double_quant else ""),
            "targets": p.best.targets_label,
            "grad_ckpt": str(s.grad_ckpt),
            "batch x accum": f"{s.batch_size} x {p.best.grad_accum}",
            "optimizer": s.optimizer,
        }
        table.add_row(
            cells["quant"] if knob == "quant" else label,  # the swept quant with the double quant chosen
            f"{est.peak_allocated_bytes / GIB:,.2f}",
            f"{est.device_bytes / GIB:,.2f}",
            *([f"{est.host_bytes / GIB:,.2f}"] if host else []),
            "[green]yes[/]" if p.fits else "[red]no[/]",
            *(cells[c] for c in chosen),
        )
    console.print(table)


def render_models(
    archs: list[ArchSpec], names: dict[str, tuple[str, ...]], ambiguous: dict[str, tuple[str, ...]]
) -> None:
    """The catalog with each entry's short names (``names``: hub id -> its key, then its short forms), and the
    short forms that could mean several (``ambiguous``: form -> the keys to choose from)."""
    title = f"{len(archs)} models in the catalog (--model takes the name, the short name, or the name without its org)"
    table = Table(title=title, title_justify="left")
    cols = ("name", "short name", "params", "layers", "heads/kv", "vocab", "context")  # fits 120 columns
    for col in cols:
        table.add_column(col, justify="right" if col in cols[2:] else "left", no_wrap=col in cols[:2])
    for a in archs:
        key, *forms = names.get(a.name, ("",))
        table.add_row(
            a.name,
            ", ".join(forms) or key,
            f"{a.num_params / 1e9:.2f}B",
            str(a.num_layers),
            f"{a.num_heads}/{a.num_kv_heads}",
            f"{a.vocab_size:,}",
            str(a.max_positions or "-"),
        )
    console.print(table)
    if ambiguous:
        forms = "; ".join(f"{form} ({' or '.join(keys)})" for form, keys in ambiguous.items())
        console.print(f"ambiguous, name the version: {forms}")


def render_gpus(devices: tuple[DeviceSpec, ...]) -> None:
    table = Table(title=f"{len(devices)} GPUs", title_justify="left")  # a title wraps at the table's width
    for col in ("name", "GiB", "bf16", "family"):
        table.add_column(col)
    for d in devices:
        table.add_row(d.name, f"{d.memory_gib:g}", "yes" if d.bf16 else "no (fp16)", d.family)
    console.print(table)
    console.print("memory in GiB; --gpu also takes any size, e.g. --gpu 24GB")


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
    """Export progress: a bar per phase (bytes merged and written, then models verified). A line said
    while the bars are on screen waits until they are done, so it never lands among them."""

    def __init__(self) -> None:
        from rich.progress import BarColumn, DownloadColumn, Progress, TextColumn, TimeRemainingColumn
        from rich.text import Text

        class Amount(DownloadColumn):
            """Bytes for the merge, a count of models for verification."""

            def render(self, task: Any) -> Text:
                if task.description == "merge":
                    return super().render(task)
                return Text(f"{task.completed:.0f}/{task.total:.0f} models", style="progress.download")

        self.progress = Progress(
            TextColumn("[bold]{task.description}[/]"),
            BarColumn(),
            Amount(),
            TimeRemainingColumn(),
            console=console,
        )
        self.task: int | None = None
        self.held: list[str] = []

    def message(self, text: str) -> None:
        if self.progress.live.is_started:
            self.held.append(text)
        else:
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
        for text in self.held:
            console.print(text)
        self.held.clear()


def render_export(summary: dict[str, object]) -> None:
    """The export's last line: what was written where. Verification (or why it was skipped) is the
    reporter's line above it, said once."""
    gguf = summary.get("gguf_file")
    into = "one GGUF file" if gguf else f"{summary['shards']} shard(s)"
    console.print(
        f"merged {summary['merged_tensors']} tensors ({summary['merge_into']}) into {into}, "
        f"{float(summary['total_bytes']) / GIB:.2f} GiB of {summary['dtype']}: "  # type: ignore[arg-type]
        f"{summary['out_dir']}{f'/{gguf}' if gguf else ''}"
    )


def read_prompt(prompt: str | None, prompt_file: str | None) -> str:
    """--prompt or --prompt-file (exactly one)."""
    from pathlib import Path

    from qlora_kit.errors import UsageError

    if (prompt is None) == (prompt_file is None):
        raise UsageError("give exactly one of --prompt and --prompt-file", 'e.g. --prompt "Two things are infinite: "')
    if prompt_file is None:
        return str(prompt)
    path = Path(prompt_file)
    if not path.is_file():
        raise UsageError(f"prompt file {prompt_file} does not exist", "check the path")
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise UsageError(
            f"prompt file {prompt_file} is not UTF-8 text (byte {exc.start})", "save it as UTF-8"
        ) from None


class StreamPrinter:
    """Generated text on stdout as it arrives, one labelled block per model: the prompt, dimmed, then
    the completion. A completion continues its prompt on the same line; a chat reply is a message of
    its own, so it starts on the next line. A block's header waits for its first text (or the next
    block, or the end), so a refused prompt prints nothing."""

    def __init__(self, prompt: str, chat: bool = False) -> None:
        self.prompt = prompt.rstrip("\n") + "\n" if chat else prompt
        self.label: str | None = None  # the block on screen
        self.pending: str | None = None  # announced, not yet on screen

    def labelled(self, label: str, piece: str) -> None:
        if label not in (self.label, self.pending):
            self._open()
            self.pending = label
        if piece:
            self._open()
            console.print(piece, end="", markup=False, emoji=False, highlight=False, soft_wrap=True)
            console.file.flush()

    def _open(self) -> None:
        if self.pending is None:
            return
        if self.label is not None:
            console.print()
        console.print(f"[bold cyan]{self.pending}[/]")
        console.print(self.prompt, style="dim", end="", markup=False, emoji=False, highlight=False, soft_wrap=True)
        self.label, self.pending = self.pending, None

    def finish(self, completions: dict[str, object]) -> None:
        self._open()
        console.print()
        for label, completion in completions.items():
            for note in getattr(completion, "notes", []):
                console.print(f"[dim]{label}: {note}[/]")


def render_scores(result: dict[str, object]) -> None:
    split = "held-out split" if result["held_out"] else f"split {result['split']}"
    console.print(f"{result['data']} ({split}): {result['samples']} samples, {result['tokens']:,} scored tokens")
    table = Table()
    for col in ("model", "loss", "perplexity"):
        table.add_column(col, justify="left" if col == "model" else "right")
    models = result["models"]
    assert isinstance(models, dict)
    for name, figures in models.items():
        table.add_row(name, f"{figures['loss']:.4f}", f"{figures['perplexity']:,.2f}")
    console.print(table)
    if "base" in models and "adapter" in models:
        change = models["adapter"]["loss"] - models["base"]["loss"]
        console.print(f"the adapter {'lowers' if change < 0 else 'raises'} the loss by {abs(change):.4f}")
    for note in result.get("notes") or []:  # type: ignore[attr-defined]
        console.print(f"  - {note}")
