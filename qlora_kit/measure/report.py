"""A measurement next to the planner's prediction, term by term: what ``tools/measure_memory.py`` reports.

torch is imported (through :mod:`qlora_kit.measure.steps`): never for the planner.
"""

from __future__ import annotations

import contextlib
import gc
import json
import tempfile
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from qlora_kit.catalog.arch import ArchSpec
from qlora_kit.catalog.readers import arch_from_config
from qlora_kit.knobs import TrainSetup
from qlora_kit.measure.steps import STATIC, Measurement, load_for_training, measure_model, save_random_model
from qlora_kit.plan import memory
from qlora_kit.plan.activations import saved_bytes
from qlora_kit.plan.moments import peak_moment


def predict(arch: ArchSpec, setup: TrainSetup, device: str = "cpu") -> dict[str, int]:
    """The planner's numbers for the measured quantities, on ``device``'s semantics.

    ``optimizer_state`` is the bytes of the state tensors, paged or not; on CPU paged optimizers fall
    back to unpaged ones, so their state counts in the peak there (on CUDA it lives in unified memory,
    outside ``max_memory_allocated``). ``dynamic`` is what the step adds to what is alive when it starts:
    the LoRA gradients (alive across accumulated micro-batches) and the activation peak terms.
    """
    dev = device.split(":")[0]
    est = memory.estimate(arch, setup, device=dev)
    b = est.breakdown
    out = {k: b[k] for k in STATIC}
    out["optimizer_state"] = memory.optimizer_state_bytes(arch, setup)
    saved = saved_bytes(arch, setup, dev)
    layers: list[dict[str, int]] = saved["layers"]  # type: ignore[assignment]
    out["saved"] = int(saved["total"])  # type: ignore[call-overload]
    out["saved_ctx"] = sum(p.get("quant.kept_inputs", 0) for p in layers)
    for k in ("activations", "logits_loss", "transient"):
        out[k] = b[k]
    out["dynamic"] = b["lora_grads"] + b["activations"] + b["logits_loss"] + b["transient"]
    if dev == "cuda":
        out["peak_allocated"] = est.peak_allocated_bytes
        out["peak_reserved"] = est.peak_reserved_bytes
        out["device"] = est.device_bytes
    else:
        out["peak"] = sum(out[k] for k in STATIC if k != "lora_grads") + out["dynamic"]
    return out


@dataclass(frozen=True)
class Row:
    term: str
    measured: int
    predicted: int

    @property
    def error(self) -> float:
        """Signed relative error of the prediction (0 when both are 0)."""
        if not self.measured:
            return 0.0 if not self.predicted else float("inf")
        return (self.predicted - self.measured) / self.measured


def compare(m: Measurement, predicted: Mapping[str, int]) -> list[Row]:
    """Measured next to predicted, term by term: the static terms, ``saved`` (everything kept for
    backward; ``saved_ctx`` the part custom functions keep on ``ctx``), ``dynamic`` (the peak above what
    is alive when the step starts) and the peak itself (CPU: live tensor bytes; CUDA: allocated,
    reserved, and the device's used memory)."""
    rows = [Row(k, m.terms[k], predicted[k]) for k in STATIC]
    rows.append(Row("saved", m.saved_bytes, predicted["saved"]))
    rows.append(Row("saved_ctx", m.saved_ctx_bytes, predicted["saved_ctx"]))
    rows.append(Row("dynamic", m.peak.peak_bytes - m.peak.baseline_bytes, predicted["dynamic"]))
    if "peak_allocated" in predicted:
        rows.append(Row("peak_allocated", m.peak.peak_bytes, predicted["peak_allocated"]))
        rows.append(Row("peak_reserved", m.peak.reserved_bytes, predicted["peak_reserved"]))
        rows.append(Row("device", m.peak.device_bytes, predicted["device"]))
    else:
        rows.append(Row("peak", m.peak.peak_bytes, predicted["peak"]))
    return rows


@dataclass
class Report:
    """One measurement next to the planner: what ``tools/measure_memory.py`` prints and writes."""

    model: str
    device: str
    setup: TrainSetup
    grad_accum: int
    rows: list[Row]
    measurement: Measurement
    predicted: dict[str, int]
    moment: str  # where the planner puts the peak

    def row(self, term: str) -> Row:
        return next(r for r in self.rows if r.term == term)

    def to_json(self) -> dict[str, Any]:
        setup = {k: (list(v) if isinstance(v, tuple) else v) for k, v in asdict(self.setup).items()}
        return {
            "model": self.model,
            "device": self.device,
            "setup": setup,
            "grad_accum": self.grad_accum,
            "planner_peak_moment": self.moment,
            "terms": [{**asdict(r), "error": r.error} for r in self.rows],
            "predicted": self.predicted,
            "peak": asdict(self.measurement.peak),
            "losses": self.measurement.losses,
            "step_s": self.measurement.step_s,
        }


def measure_and_compare(
    model: Any,
    arch: ArchSpec,
    setup: TrainSetup,
    device: str = "cpu",
    steps: int = 2,
    grad_accum: int = 2,
    seed: int = 0,
) -> Report:
    """Step a model loaded by :func:`load_for_training` and compare with the planner."""
    m = measure_model(model, setup, arch.vocab_size, device, steps, grad_accum, seed)
    predicted = predict(arch, setup, device)
    moment = peak_moment(arch, setup, device.split(":")[0])
    return Report(arch.name, device, setup, grad_accum, compare(m, predicted), m, predicted, moment)


def run(
    config: Mapping[str, Any],
    setup: TrainSetup,
    device: str = "cpu",
    steps: int = 2,
    grad_accum: int = 2,
    model_dir: str | Path | None = None,
    name: str = "",
    work_dir: str | Path | None = None,
) -> Report:
    """Build a random-init model from ``config`` (or load ``model_dir``, a checkpoint with weights), load
    it the way ``train`` does, step it and compare: the whole of ``tools/measure_memory.py``. The random
    model is written to a temporary directory (under ``work_dir``) that is removed afterwards."""
    arch = arch_from_config(config, name or str(config.get("model_type")))
    with contextlib.ExitStack() as stack:
        if model_dir is None:
            tmp = stack.enter_context(tempfile.TemporaryDirectory(prefix="qlora-kit-measure-", dir=work_dir))
            # 16-bit weights on a GPU (a 7B checkpoint is 13.5 GB); fp32 for the tiny CPU models
            save_dtype = "fp32" if device == "cpu" else "bf16"
            model_dir = save_random_model(config, tmp, save_dtype, device)
        model = load_for_training(model_dir, setup, device)
        report = measure_and_compare(model, arch, setup, device, steps, grad_accum)
        del model
        gc.collect()
    return report


def write_json(report: Report, path: str | Path) -> None:
    Path(path).write_text(json.dumps(report.to_json(), indent=1) + "\n")
