"""Benchmark qlora-kit's training switches against the plain peft path most tutorials use.

Usage:
    python tools/bench_train.py                  # CPU, a few minutes: the table on stdout
    python tools/bench_train.py --write          # ... and into docs/benchmarks.md between the bench-train markers
    python tools/bench_train.py --layers         # only the runlora layer microbenchmark
    python tools/bench_train.py --quality        # LoRA-FA's loss curve next to LoRA's on the tiny demo
    python tools/bench_train.py --device cuda    # on a GPU (peaks from max_memory_allocated)
    python tools/bench_train.py --compute bf16   # 4-bit compute in bf16, both sides under bf16 autocast

The same model (a llama-style decoder built from a config, random weights, NF4 base, vocabulary 32000 so
the logits matter), the same batches and the same knobs go through (a) ``prepare_model_for_kbit_training``
+ ``get_peft_model`` + transformers' ``Trainer`` and (b) qlora-kit's loading and training step
(``qlora_kit.measure.steps``, what ``qlora-kit train`` runs) with each switch, the settings alternating, each run
repeated. Per setting: the median step time and the peak of live tensor bytes of one steady-state step
(CPU: the torch profiler's memory events, as ``qlora_kit.measure.tensors``; CUDA: ``max_memory_allocated``),
both as ratios to (a); the bytes autograd keeps for backward after one forward; the loss at step N.
``--compute bf16``: the 4-bit layers compute in bf16, the checkpoint is bf16, and both sides run under bf16
autocast (the Trainer with ``bf16=True``; the run checks that the head's output is bf16 on both sides).
``--write`` keeps one table per device, compute dtype and checkpoint dtype, and one layer table per device,
each with the command that produced it, between the bench-train markers of docs/benchmarks.md.
The layer microbenchmark times forward + backward of peft's LoRA layer and qlora-kit's runlora layer over
the same NF4 base, per shape, alternating.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import logging
import os
import re
import shlex
import statistics
import sys
import tempfile
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import doc_section

os.environ.setdefault("TORCH_COMPILE_DISABLE", "1")
ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
PAGE = "docs/benchmarks.md"  # relative to ROOT
START, END = "<!-- bench-train:start -->", "<!-- bench-train:end -->"

CONFIG = {
    "model_type": "llama",
    "hidden_size": 256,
    "intermediate_size": 704,
    "num_hidden_layers": 4,
    "num_attention_heads": 4,
    "num_key_value_heads": 4,
    "vocab_size": 32000,
    "tie_word_embeddings": False,
    "max_position_embeddings": 1024,
}
RANK, LR = 16, 1e-3

# name -> (TrainSetup changes, what it shows); every qlora-kit setting checkpoints like peft's default
SWITCHES: dict[str, dict[str, Any]] = {
    "qlora-kit": {},
    "lora-fa": {"lora_fa": True},
    "runlora": {"runlora": True},
    "selective upcast": {"upcast": "selective"},
    "chunked loss": {"chunked_loss": True},
    "offload ckpt": {"offload_ckpt": True},
    "all": {"lora_fa": True, "runlora": True, "upcast": "selective", "chunked_loss": True, "offload_ckpt": True},
}
PEFT = "peft + Trainer"


@dataclass
class Run:
    step_s: list[float] = field(default_factory=list)
    peak_bytes: list[int] = field(default_factory=list)
    saved_bytes: int = 0
    loss_n: float = 0.0
    head_dtypes: set[str] = field(default_factory=set)  # the head's output dtypes during training steps


def quiet() -> None:
    logging.getLogger("bitsandbytes").setLevel(logging.ERROR)
    logging.getLogger("transformers").setLevel(logging.ERROR)
    warnings.filterwarnings("ignore")
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")


def batches(n: int, batch: int, seq: int, vocab: int, device: str) -> list[dict[str, Any]]:
    """Learnable, deterministic batches: each sequence repeats a random 16-token motif."""
    import torch

    g = torch.Generator().manual_seed(1234)
    out = []
    for _ in range(n):
        motif = torch.randint(0, vocab, (batch, 16), generator=g)
        ids = motif.repeat(1, seq // 16).to(device)
        out.append({"input_ids": ids, "labels": ids.clone()})
    return out


def _profiled_peak(prof: Any, baseline: int) -> int:
    """Baseline plus the highest running sum of the profiler's CPU allocation events (``tensors.cpu_step_peak``
    takes a callable; the Trainer's step is only reachable from callbacks, so the sum is taken here)."""
    events = sorted(
        (e.start_ns(), i, e.nbytes())
        for i, e in enumerate(prof.profiler.kineto_results.events())
        if e.name() == "[memory]" and str(e.device_type()) == "DeviceType.CPU"
    )
    live = top = 0
    for _, _, nbytes in events:
        live += nbytes
        top = max(top, live)
    return baseline + top


@contextlib.contextmanager
def peak_meter(device: str, baseline: int) -> Any:
    """Yields a list that receives the step's peak live tensor bytes when the block ends."""
    import torch

    out: list[int] = []
    gc.collect()
    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        yield out
        torch.cuda.synchronize()
        out.append(torch.cuda.max_memory_allocated())
        return
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        yield out
    out.append(_profiled_peak(prof, baseline))


def _autocast_dtype(compute: str) -> Any:
    """The dtype both sides autocast to (``None``: no autocast, fp32 compute)."""
    import torch

    return {"fp32": None, "bf16": torch.bfloat16}[compute]


def _watch_head(model: Any, run: Run) -> Any:
    """Record the dtype of the head's output (an fp32 ``nn.Linear`` after k-bit preparation: bf16 only under
    autocast), so a run shows whether it really computed under autocast."""

    def hook(module: Any, args: Any, out: Any) -> None:
        run.head_dtypes.add(str(out.dtype).removeprefix("torch."))

    return model.get_output_embeddings().register_forward_hook(hook)


def _baseline(model: Any, optimizer: Any, batch: dict[str, Any]) -> int:
    from qlora_kit.measure import tensors

    return tensors.storage_bytes(tensors.persistent_tensors(model, optimizer, batch))


def _saved(model: Any, batch: dict[str, Any], device: str, chunked: bool, autocast: Any) -> int:
    from qlora_kit.measure import steps as measure
    from qlora_kit.measure.tensors import quant_state_tensors

    persistent = [*model.parameters(), *model.buffers(), *quant_state_tensors(model), *batch.values()]
    loss, hooked, kept = measure.forward_saved(model, batch, autocast, device, persistent, chunked)
    del loss
    return sum(hooked.values()) + sum(kept.values())


def run_peft(path: Path, data: list[dict[str, Any]], device: str, compute: str = "fp32", seed: int = 0) -> Run:
    """(a): transformers + bitsandbytes loading, ``prepare_model_for_kbit_training`` (its default: gradient
    checkpointing on), ``get_peft_model``, ``Trainer`` with AdamW at a constant rate (``bf16=True`` for bf16
    compute: accelerate's autocast, on the CPU too); N+1 steps, the last one measured for its peak."""
    import torch
    from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training
    from transformers import (
        AutoModelForCausalLM,
        BitsAndBytesConfig,
        PrinterCallback,
        Trainer,
        TrainerCallback,
        TrainingArguments,
    )

    from qlora_kit.model.load import torch_dtype

    quant = BitsAndBytesConfig(
        load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch_dtype(compute)
    )
    model = AutoModelForCausalLM.from_pretrained(path, quantization_config=quant, device_map={"": device})
    model = prepare_model_for_kbit_training(model, gradient_checkpointing_kwargs={"use_reentrant": False})
    torch.manual_seed(seed)
    config = LoraConfig(
        r=RANK, lora_alpha=2 * RANK, lora_dropout=0.0, target_modules="all-linear", task_type="CAUSAL_LM"
    )
    model = get_peft_model(model, config)
    model.train()  # as Trainer will (checkpointing acts in training mode only)
    run = Run(saved_bytes=_saved(model, data[0], device, False, _autocast_dtype(compute)))
    _watch_head(model, run)

    class Data(torch.utils.data.IterableDataset):  # in order: the same batches as (b)
        def __iter__(self) -> Any:
            for b in data:
                yield from ({k: v[i].cpu() for k, v in b.items()} for i in range(len(b["input_ids"])))

    class Meter(TrainerCallback):
        def on_step_begin(self, args: Any, state: Any, control: Any, **kw: Any) -> None:
            self.t0 = time.perf_counter()
            if state.global_step == len(data) - 1:
                self.meter = peak_meter(device, _baseline(model, kw["optimizer"], data[0]))
                self.out = self.meter.__enter__()

        def on_step_end(self, args: Any, state: Any, control: Any, **kw: Any) -> None:
            if state.global_step == len(data):
                self.meter.__exit__(None, None, None)
                run.peak_bytes.append(self.out[0])
            elif state.global_step > 1:
                run.step_s.append(time.perf_counter() - self.t0)

    args = TrainingArguments(
        output_dir=tempfile.mkdtemp(prefix="bench-peft-"),
        use_cpu=device == "cpu",
        per_device_train_batch_size=len(data[0]["input_ids"]),
        max_steps=len(data),
        learning_rate=LR,
        lr_scheduler_type="constant",
        weight_decay=0.0,
        optim="adamw_torch",
        logging_steps=1,
        report_to="none",
        save_strategy="no",
        disable_tqdm=True,
        seed=seed,
        bf16=compute == "bf16",
        gradient_checkpointing=True,
        gradient_checkpointing_kwargs={"use_reentrant": False},
    )
    trainer = Trainer(model=model, args=args, train_dataset=Data(), callbacks=[Meter()])
    trainer.remove_callback(PrinterCallback)  # its log dicts would land in the tables' stdout
    trainer.train()
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    run.loss_n = losses[len(data) - 2]  # step N (the measured step N+1 is not counted)
    return run


def run_kit(
    path: Path, data: list[dict[str, Any]], device: str, changes: dict[str, Any], compute: str = "fp32", seed: int = 0
) -> Run:
    """(b): the model as ``qlora-kit train`` builds it for these knobs, stepped as it steps it."""
    import torch

    from qlora_kit.catalog.readers import arch_from_config
    from qlora_kit.knobs import TrainSetup
    from qlora_kit.measure import steps as measure

    arch = arch_from_config(CONFIG, "bench")
    b, s = data[0]["input_ids"].shape
    setup = TrainSetup(
        quant="nf4",
        double_quant=False,
        dtype=compute,
        rank=RANK,
        targets=arch.linear_names(),
        batch_size=b,
        seq_len=s,
        grad_ckpt=True,
        lora_dropout=0.0,
    ).with_(**changes)
    torch.manual_seed(seed)
    model = measure.load_for_training(path, setup, device)
    autocast = _autocast_dtype(compute)
    run = Run(saved_bytes=_saved(model, data[0], device, setup.chunked_loss, autocast))
    _watch_head(model, run)
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=LR, weight_decay=0.0)
    for i, batch in enumerate(data):
        if i == len(data) - 1:
            with peak_meter(device, _baseline(model, optimizer, batch)) as out:
                measure.train_step(model, [batch], optimizer, autocast, device, setup.chunked_loss)
            run.peak_bytes.append(out[0])
            break
        t0 = time.perf_counter()
        loss = measure.train_step(model, [batch], optimizer, autocast, device, setup.chunked_loss)
        if i > 0:
            run.step_s.append(time.perf_counter() - t0)
        run.loss_n = loss
    return run


def bench(
    device: str, steps: int, repeats: int, batch: int, seq: int, dtype: str, compute: str, command: str
) -> tuple[dict[str, Run], str]:
    from qlora_kit.measure import steps as measure

    names = [PEFT, *SWITCHES]
    runs = {n: Run() for n in names}
    data = batches(steps + 1, batch, seq, CONFIG["vocab_size"], device)
    with tempfile.TemporaryDirectory() as tmp:
        path = measure.save_random_model(CONFIG, Path(tmp) / "model", dtype)
        for rep in range(repeats):
            for name in names if rep % 2 == 0 else names[::-1]:  # alternate, and alternate the order
                if name == PEFT:
                    one = run_peft(path, data, device, compute)
                else:
                    one = run_kit(path, data, device, SWITCHES[name], compute)
                want = {"fp32": "float32", "bf16": "bfloat16"}[compute]
                if one.head_dtypes != {want}:
                    raise RuntimeError(f"{name}: the head computed in {sorted(one.head_dtypes)}, not {want}")
                agg = runs[name]
                agg.head_dtypes |= one.head_dtypes
                agg.step_s += one.step_s
                agg.peak_bytes += one.peak_bytes
                agg.saved_bytes, agg.loss_n = one.saved_bytes, one.loss_n
                t, mib = statistics.median(one.step_s), one.peak_bytes[0] / 2**20
                print(
                    f"  {name:18s} step {t:.3f}s  peak {mib:8.1f} MiB"
                    f"  saved {one.saved_bytes / 2**20:7.1f} MiB  loss@{steps} {one.loss_n:.4f}"
                    f"  head {'/'.join(sorted(one.head_dtypes))}",
                    file=sys.stderr,
                )
                gc.collect()
    return runs, train_table(runs, device, steps, repeats, batch, seq, dtype, compute, command)


def train_table(
    runs: dict[str, Run],
    device: str,
    steps: int,
    repeats: int,
    batch: int,
    seq: int,
    dtype: str,
    compute: str,
    command: str,
) -> str:
    base = runs[PEFT]
    t0, p0 = statistics.median(base.step_s), statistics.median(base.peak_bytes)
    if compute == "fp32":
        how = "fp32 compute (no autocast)"
    else:
        how = (
            f"4-bit compute dtype {compute}, both sides under {device.upper()} {compute} autocast "
            f"(the Trainer with `{compute}=True`; the head's output was {compute} in every run)"
        )
    lines = [
        f"Training step, {device.upper()}, **{compute} compute**: llama-style 4 x 256 (vocab 32000) saved in {dtype}, "
        f"NF4 base, {how}, LoRA r={RANK} on "
        f"all linears, no LoRA dropout, gradient checkpointing, batch {batch} x {seq} tokens, AdamW at a constant "
        f"rate; {steps} steps per run, {repeats} runs per setting alternating (`{command}`).",
        "",
        "| setting | step time | peak live tensors | ratio | saved for backward | loss at step N |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for name, r in runs.items():
        t, p = statistics.median(r.step_s), statistics.median(r.peak_bytes)
        lines.append(
            f"| {name} | {t:.2f} s ({t / t0:.2f}x) | {p / 2**20:.1f} MiB | {p / p0:.2f}x | "
            f"{r.saved_bytes / 2**20:.1f} MiB | {r.loss_n:.4f} |"
        )
    return "\n".join(lines)


# -- the runlora layer against peft's, per shape ----------------------------------------------------------

SHAPES = [  # (tokens, d_in, d_out, rank)
    (64, 2048, 2048, 16),
    (512, 512, 1408, 16),
    (1024, 1024, 1024, 16),
    (4096, 1024, 1024, 16),
    (4096, 512, 512, 64),
    (2048, 1408, 512, 16),
]


def _time_once(model: Any, x: Any, g: Any, device: str) -> float:
    import torch

    if device == "cuda":
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    model(x).backward(g)
    if device == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - t0


def layer_bench(repeats: int, device: str, command: str) -> str:
    import copy

    import bitsandbytes as bnb
    import torch
    from peft import LoraConfig, get_peft_model

    from qlora_kit.model import runlora

    lines = [
        f"LoRA layer forward + backward, {device.upper()}, NF4 base, fp32 compute: qlora-kit's runlora layer "
        f"(order chosen by the FLOP model) against peft's, median of {repeats} alternating timings "
        f"(`{command}`).",
        "",
        "| tokens x d_in -> d_out, r | A | chosen order | FLOPs ratio (model) | time ratio (measured) |",
        "|---|---|---|---:|---:|",
    ]
    for n, d_in, d_out, r in SHAPES:
        for lora_fa in (False, True):
            torch.manual_seed(0)
            base = bnb.nn.Linear4bit(d_in, d_out, bias=False, compute_dtype=torch.float32, quant_type="nf4")
            base.weight = bnb.nn.Params4bit(torch.randn(d_out, d_in) * 0.02, requires_grad=False, quant_type="nf4")
            holder = torch.nn.Sequential()
            holder.add_module("proj", base.to(device))
            holder.requires_grad_(False)
            ref = get_peft_model(holder, LoraConfig(r=r, lora_alpha=2 * r, target_modules=["proj"], lora_dropout=0.0))
            if lora_fa:
                ref.base_model.model.proj.lora_A["default"].weight.requires_grad_(False)
            new = copy.deepcopy(ref)
            runlora.install(new)
            x = torch.randn(n, d_in, device=device, requires_grad=True)
            g = torch.randn(n, d_out, device=device)
            times: dict[int, list[float]] = {0: [], 1: []}

            for i in range(repeats + 1):
                for k in (0, 1) if i % 2 == 0 else (1, 0):
                    t = _time_once((ref, new)[k], x, g, device)
                    if i > 0:  # the first round warms up
                        times[k].append(t)
            order = new.base_model.model.proj.runlora_order
            flop_ratio = runlora.flops(order, n, d_in, d_out, r, not lora_fa) / runlora.flops(
                runlora.PEFT_ORDER, n, d_in, d_out, r, not lora_fa
            )
            ratio = statistics.median(times[1]) / statistics.median(times[0])
            a_state = "frozen" if lora_fa else "trained"
            lines.append(
                f"| {n} x {d_in} -> {d_out}, {r} | {a_state} | "
                f"{order.forward}/{order.backward} | {flop_ratio:.3f} | {ratio:.3f} |"
            )
            # progress, not a table row: stderr shown after stdout (or its tail) would repeat the table's rows
            print(f"  layer {n} x {d_in} -> {d_out} r{r} A {a_state}: time ratio {ratio:.3f}", file=sys.stderr)
    return "\n".join(lines)


# -- LoRA-FA's quality on the tiny demo --------------------------------------------------------------------


class _Losses:
    def __init__(self) -> None:
        self.rows: list[dict[str, Any]] = []

    def message(self, text: str) -> None:
        pass

    def start(self, total_steps: int, start_step: int) -> None:
        pass

    def step(self, metrics: dict[str, Any]) -> None:
        self.rows.append(metrics)

    def finish(self, summary: dict[str, Any]) -> None:
        self.summary = summary


def quality(steps: int) -> str:
    """Train recipes/tiny/cpu_demo.yaml with LoRA and with LoRA-FA (``qlora_kit.train.loop``), same seed."""
    from qlora_kit.recipe import load_recipe
    from qlora_kit.train.loop import train

    curves: dict[str, _Losses] = {}
    with tempfile.TemporaryDirectory() as tmp:
        for variant in ("lora", "lora-fa"):
            sets = [f"lora.variant={variant}", f"train.output_dir={tmp}/{variant}", f"train.max_steps={steps}"]
            recipe = load_recipe(ROOT / "recipes/tiny/cpu_demo.yaml", sets)
            curves[variant] = _Losses()
            t0 = time.perf_counter()
            train(recipe, curves[variant])
            print(f"  {variant}: {time.perf_counter() - t0:.0f} s", file=sys.stderr)
    lora, fa = curves["lora"].rows, curves["lora-fa"].rows
    lines = [
        f"`python tools/bench_train.py --quality --write` ({steps} steps each):",
        "",
        "| step | LoRA train loss | LoRA-FA train loss | LoRA eval loss | LoRA-FA eval loss |",
        "|---:|---:|---:|---:|---:|",
    ]
    for a, b in zip(lora, fa, strict=True):
        ea, eb = a.get("eval_loss"), b.get("eval_loss")
        if a["step"] % 10 and a["step"] != 1 and ea is None:
            continue  # every tenth step, the first, and every evaluation
        lines.append(
            f"| {a['step']} | {a['loss']:.4f} | {b['loss']:.4f} | "
            f"{'' if ea is None else f'{ea:.4f}'} | {'' if eb is None else f'{eb:.4f}'} |"
        )
    return "\n".join(lines)


PART = re.compile(r"<!-- bench-train:((?:train|layers)-[\w-]+) -->\n")


def _part_order(name: str) -> tuple[Any, ...]:
    """Training tables first (CPU first, fp32 compute first, fp32 checkpoint first), then the layer tables."""
    kind, device, *dtypes = name.split("-")
    return (kind != "train", device != "cpu", device, *(d != "fp32" for d in dtypes))


def write_section(parts: dict[str, str]) -> int:
    """Replace the named parts between the bench-train markers of ``PAGE``, keeping the other parts there: one
    part per ``train-DEVICE-COMPUTE-CHECKPOINT`` and per ``layers-DEVICE``, each after its own marker comment
    (text between the markers that belongs to no part, from before parts existed, is dropped)."""
    found = doc_section.between(PAGE, START, END)
    if found is None:
        print(f"{PAGE} has no {START} ... {END} markers: put them back where the tables belong")
        return 1
    head, body, tail = found
    pieces = PART.split(body)
    kept = {name: text.strip() for name, text in zip(pieces[1::2], pieces[2::2], strict=True)}
    kept.update(parts)
    text = "\n\n".join(f"<!-- bench-train:{name} -->\n{kept[name]}" for name in sorted(kept, key=_part_order))
    doc_section.write(PAGE, f"{head}{START}\n{text}\n{END}{tail}")
    return 0


def main() -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    parser.add_argument("--steps", type=int, default=4, help="N: training steps per run (one more is measured)")
    parser.add_argument("--repeats", type=int, default=2, help="runs per setting, alternating")
    parser.add_argument("--batch", type=int, default=3, help="3 x 512 tokens: more rows than one loss chunk")
    parser.add_argument("--seq", type=int, default=512)
    parser.add_argument("--layer-repeats", type=int, default=7)
    parser.add_argument(
        "--dtype",
        choices=["fp32", "bf16"],
        default=None,
        help="the checkpoint's dtype (bf16: what upcasting costs); default: the compute dtype",
    )
    parser.add_argument(
        "--compute",
        choices=["fp32", "bf16"],
        default="fp32",
        help="the 4-bit compute dtype; bf16: both sides under bf16 autocast, bf16 checkpoint",
    )
    parser.add_argument("--layers", action="store_true", help="only the runlora layer microbenchmark")
    parser.add_argument("--quality", action="store_true", help="LoRA-FA vs LoRA loss curves -> docs/lora-fa.md")
    parser.add_argument("--quality-steps", type=int, default=150)
    parser.add_argument("--write", action="store_true", help=f"write the tables into {PAGE} between the markers")
    args = parser.parse_args()
    args.dtype = args.dtype or args.compute
    if args.compute == "bf16" and args.dtype != "bf16":
        parser.error("--compute bf16 trains a bf16 checkpoint: leave out --dtype or pass --dtype bf16")
    command = shlex.join(["python", "tools/bench_train.py", *sys.argv[1:]])
    quiet()
    import torch

    if args.device == "cuda" and not torch.cuda.is_available():
        print("no CUDA device: run without --device cuda")
        return 1
    if args.quality:
        table = quality(args.quality_steps)
        print(table)
        if args.write:
            doc = ROOT / "docs/lora-fa.md"
            head = doc.read_text().split("<!-- curves -->")[0] if doc.exists() else ""
            tmp = doc.with_suffix(".md.tmp")
            tmp.write_text(f"{head}<!-- curves -->\n{table}\n")
            tmp.replace(doc)
        return 0
    parts: dict[str, str] = {}
    if not args.layers:
        _, parts[f"train-{args.device}-{args.compute}-{args.dtype}"] = bench(
            args.device, args.steps, args.repeats, args.batch, args.seq, args.dtype, args.compute, command
        )
    parts[f"layers-{args.device}"] = layer_bench(args.layer_repeats, args.device, command)
    print("\n\n".join(parts.values()), flush=True)
    return write_section(parts) if args.write else 0


if __name__ == "__main__":
    raise SystemExit(main())
