"""The planner next to published GPU memory measurements (``data/published_peaks.csv``).

Each row is a real training run someone measured and published (sources in the CSV's ``source``
column: litgpt's resource tables and config hub, peft's method-comparison benchmark, the QLoRA
paper). :func:`compare` predicts each row in the row's own quantity and unit with the knobs the row's
implementation used, so the error is the planner's, not a unit mix-up. Pure: no torch.
"""

from __future__ import annotations

import csv
import dataclasses
import statistics
from dataclasses import dataclass
from functools import cache
from importlib import resources

from qlora_kit.catalog.gpus import resolve_gpu
from qlora_kit.catalog.models import lookup
from qlora_kit.errors import UsageError
from qlora_kit.knobs import TrainSetup
from qlora_kit.plan.memory import Estimate, estimate

UNITS = {"GB": 1e9, "GiB": float(1 << 30), "MB": 1e6, "MiB": float(1 << 20)}
WEIGHTS = {"nf4": ("nf4", False), "nf4-dq": ("nf4", True), "bf16": ("none", False), "fp16": ("none", False)}


@dataclass(frozen=True)
class Comparison:
    row_id: str
    model: str
    setting: str
    quantity: str
    unit: str
    measured: float
    predicted: float

    @property
    def error(self) -> float:
        """Signed relative error of the prediction."""
        return (self.predicted - self.measured) / self.measured


@cache
def published_rows() -> list[dict[str, str]]:
    text = resources.files("qlora_kit").joinpath("resources/published_peaks.csv").read_text()
    return list(csv.DictReader(text.splitlines()))


# What the publishing stacks did differently from qlora-kit's (sources: litgpt finetune/lora.py and
# lightning's BitsandbytesPrecision at the commits the tables name, bitsandbytes 0.41.1/0.42.0
# autograd/_functions.py, peft method_comparison/MetaMathQA run.py; see docs/planner.md):
# - litgpt and peft's benchmark load the base in bf16 and never upcast the unquantized parameters to fp32
#   the way peft's prepare_model_for_kbit_training does (upcast="none");
# - Lightning Fabric converts the model output to fp32 and holds it through backward (4 B per logit);
# - bitsandbytes 0.41/0.42's 4-bit matmul kept its input for backward; the 2023 tables peak in the first
#   iteration (the longest sample is forced first), the 2024 loop also holds the previous step's inputs;
# - litgpt's own model code computes GELU with torch's native tanh kernel (transformers' phi uses the
#   pointwise-op "gelu_new", which keeps four tensors instead of one).
LITGPT_2023 = {"c1", "c2", "c3", "c4", "c5", "c6", "c7", "c8", "c9"}
LITGPT_2024 = {"c10", "c11", "c12", "c13", "c14", "c15"}
PEFT_BENCH_NO_DROPOUT = {"c16"}  # the stored adapter config of that run has lora_dropout 0.0


def row_setup(row: dict[str, str]) -> TrainSetup:
    """The knobs of a published run, as its implementation set them (see the notes above)."""
    quant, dq = WEIGHTS[row["weights"]]
    targets = tuple(t for t in row["lora_targets"].split(",") if t) or ("q_proj", "v_proj")
    return TrainSetup(
        quant=quant,
        double_quant=dq,
        dtype="bf16",
        rank=int(row["lora_rank"] or 8),
        targets=targets,
        optimizer=row["optimizer"] or "adamw",
        batch_size=int(row["micro_batch"] or 1),
        seq_len=int(row["seq_len"] or 1),
        grad_ckpt=row["grad_ckpt"] == "on",
        attn="sdpa",
        lora_dropout=0.0 if row["id"] in PEFT_BENCH_NO_DROPOUT else 0.05,
        upcast="none",
        kbit_kept_inputs=1 if row["id"] in LITGPT_2023 else 2 if row["id"] in LITGPT_2024 else 0,
        held_logits_bytes=4 if row["id"] in LITGPT_2023 | LITGPT_2024 else 0,
    )


def _quantity(est: Estimate, quantity: str) -> int:
    if quantity == "max_memory_allocated":
        return est.peak_allocated_bytes
    if quantity == "max_memory_reserved":
        return est.peak_reserved_bytes
    if quantity == "weights only":
        b = est.breakdown
        return b["linear_weights"] + b["quant_state"] + b["other_params"]
    raise ValueError(f"unknown quantity {quantity!r}")


def gpu_family(name: str) -> str:
    """The generation of the card a row names ("A100-40GB", "2x RTX 3090"), "" when none is named or known."""
    try:
        return resolve_gpu(name.split("x ", 1)[-1]).family if name else ""
    except UsageError:
        return ""


def compare() -> list[Comparison]:
    out = []
    for row in published_rows():
        setup = row_setup(row)
        arch = lookup(row["model"])
        if row["id"] in LITGPT_2023 | LITGPT_2024:
            arch = dataclasses.replace(arch, config={**arch.config, "hidden_act": "gelu_pytorch_tanh"})
        # measured with torch's default allocator, on the row's card (its generation sets the cuBLAS workspace)
        est = estimate(arch, setup, allocator="caching", family=gpu_family(row["gpu"]))
        predicted = _quantity(est, row["quantity"]) / UNITS[row["unit"]]
        setting = (
            f"{row['weights']}, r={row['lora_rank'] or '-'}, b={row['micro_batch'] or '-'}, "
            f"seq={row['seq_len'] or '-'}, {row['gpu'] or ''}"
        ).rstrip(", ")
        out.append(
            Comparison(
                row["id"], row["model"], setting, row["quantity"], row["unit"], float(row["measured"]), predicted
            )
        )
    return out


def median_abs_error(rows: list[Comparison]) -> float:
    return statistics.median(abs(r.error) for r in rows)


def markdown_table(rows: list[Comparison]) -> str:
    """The README table: each row's measurement, the planner's figure and the signed error."""
    lines = ["| id | model | setting | quantity | measured | planner | error |", "|---|---|---|---|---:|---:|---:|"]
    for r in rows:
        lines.append(
            f"| {r.row_id} | {r.model} | {r.setting} | {r.quantity} | {r.measured:g} {r.unit} | "
            f"{r.predicted:.2f} {r.unit} | {r.error:+.1%} |"
        )
    lines.append(f"\nMedian absolute error over {len(rows)} rows: **{median_abs_error(rows):.1%}**.")
    return "\n".join(lines)
