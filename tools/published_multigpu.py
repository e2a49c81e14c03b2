"""The per-GPU planner next to published multi-GPU QLoRA/LoRA measurements, as a markdown table.

    python tools/published_multigpu.py            # print the table
    python tools/published_multigpu.py --write    # refresh it in docs/published.md (between the markers)
    python tools/published_multigpu.py --check    # exit 1 if docs/published.md's table is stale

Rows, exact settings and sources: qlora_kit/resources/published_multigpu.csv. Each row is predicted with
``qlora_kit.plan.multigpu.per_gpu`` in the row's own quantity and unit, with the knobs its implementation
used (below), so the error is the model's.
"""

from __future__ import annotations

import csv
import sys
from importlib import resources

import doc_section

from qlora_kit.catalog.models import lookup
from qlora_kit.knobs import TrainSetup
from qlora_kit.measure.published import UNITS, WEIGHTS, Comparison, gpu_family, markdown_table
from qlora_kit.plan.memory import Estimate
from qlora_kit.plan.multigpu import per_gpu

PAGE = "docs/published.md"
START, END = "<!-- multigpu:start -->", "<!-- multigpu:end -->"


def rows() -> list[dict[str, str]]:
    text = resources.files("qlora_kit").joinpath("resources/published_multigpu.csv").read_text()
    return list(csv.DictReader(text.splitlines()))


def row_setup(row: dict[str, str]) -> TrainSetup:
    """The knobs of a published run. Both stacks keep the unquantized parameters in bf16 (peft's
    sharded-QLoRA path and Answer.AI's script skip k-bit preparation's fp32 upcast): ``upcast="none"``."""
    quant, dq = WEIGHTS[row["weights"]]
    targets = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
    if row["lora_targets"] != "all-linear":
        targets = tuple(row["lora_targets"].split(","))
    return TrainSetup(
        quant=quant,
        double_quant=dq,
        dtype="bf16",
        rank=int(row["lora_rank"]),
        targets=targets,
        optimizer=row["optimizer"],
        batch_size=int(row["micro_batch"]),
        seq_len=int(row["seq_len"]),
        grad_ckpt=row["grad_ckpt"] == "on",
        lora_dropout=0.1,
        upcast="none",
    )


# DeepSpeed ZeRO-3 (deepspeed/runtime/zero/stage3.py, config.py), as accelerate's config-file plugin sets it up: the
# plugin writes no bucket sizes, so DeepSpeed's defaults hold. With ``contiguous_gradients`` (default True) the
# optimizer allocates, at its start and for the whole run, one gradient bucket of ``reduce_bucket_size`` (default
# 5e8) elements per gradient dtype on the GPU: bf16 here (the engine casts the module to bf16 under bf16 mixed
# precision), 1e9 bytes. Its LoRA state comes to FSDP's fp32 figure (a bf16 partition, an fp32 master copy, bf16
# gradients, fp32 Adam moments: 8 B per element over the GPUs).
ZERO3_REDUCE_BUCKET = 500_000_000 * 2


def stack_bytes(row: dict[str, str], est: Estimate) -> int:
    """What the row's stack holds beyond the ``per_gpu`` figure (negative where it holds less)."""
    if "NO_SHARD" in row["implementation"]:  # FSDP's NO_SHARD has no DistributedDataParallel buckets
        return -est.breakdown.get("ddp_buckets", 0)
    if "DeepSpeed ZeRO-3" in row["implementation"]:
        return ZERO3_REDUCE_BUCKET
    return 0


def predict(row: dict[str, str]) -> float:
    # Answer.AI's "bf16" precision keeps the LoRA weights, gradients and Adam state in bf16 (lora_bytes=2)
    lora_bytes = 2 if row["lora_dtype"] == "bf16" else 4
    strategy, gpus = row["strategy"], int(row["gpus"])
    est = per_gpu(lookup(row["model"]), row_setup(row), gpus, strategy, "caching", gpu_family(row["gpu"]), lora_bytes)
    return _quantity(est, row["quantity"], stack_bytes(row, est)) / UNITS[row["unit"]]


def _quantity(est: Estimate, quantity: str, adjust: int) -> int:
    if quantity == "max_memory_allocated":
        return est.peak_allocated_bytes + adjust
    if quantity == "max_memory_reserved":
        return est.peak_reserved_bytes + adjust
    if quantity == "device":
        return est.device_bytes + adjust
    if quantity == "host":
        return est.host_bytes
    raise ValueError(f"unknown quantity {quantity!r}")


def compare() -> list[Comparison]:
    out = []
    for r in rows():
        setting = (
            f"{r['gpus']}x {r['strategy']}, {r['weights']}, r={r['lora_rank']}, b={r['micro_batch']}/GPU, "
            f"seq={r['seq_len']}, {r['gpu']}"
        )
        out.append(Comparison(r["id"], r["model"], setting, r["quantity"], r["unit"], float(r["measured"]), predict(r)))
    return out


def main() -> int:
    return doc_section.main(
        "published_multigpu", PAGE, START, END, lambda: markdown_table(compare()), (__doc__ or "").splitlines()[0]
    )


if __name__ == "__main__":
    sys.exit(main())
