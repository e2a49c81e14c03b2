"""Training checkpoints: written atomically, the last K kept, the latest complete one found on resume.

A checkpoint is a directory ``<output_dir>/checkpoints/step-NNNNNN`` holding the adapter (peft
format), the optimizer and scheduler state, the RNG states and ``state.json`` (step, data position,
the loss history so far). It is written under a temporary name and renamed into place when complete,
so a crash never leaves a checkpoint that claims to be whole: only directories with ``state.json``
count.
"""

from __future__ import annotations

import json
import os
import random
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch

from qlora_kit.errors import UsageError

STATE_FILE = "state.json"
PREFIX = "step-"


def checkpoint_dir(output_dir: Path) -> Path:
    return output_dir / "checkpoints"


def rng_state() -> dict[str, Any]:
    state: dict[str, Any] = {
        "python": random.getstate(),
        "numpy": np.random.get_state(),
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save(
    output_dir: Path,
    step: int,
    model: Any,
    optimizer: Any,
    scheduler: Any,
    rng: dict[str, Any],
    state: dict[str, Any],
    keep: int,
    model_state: dict[str, Any] | None = None,
    optimizer_state: dict[str, Any] | None = None,
) -> Path:
    """Write checkpoint ``step`` atomically, then drop all but the newest ``keep``.

    ``model_state`` / ``optimizer_state``: full states gathered from a sharded (FSDP) run, written in
    place of the model's and optimizer's own (``qlora_kit.train.distributed``)."""
    root = checkpoint_dir(output_dir)
    root.mkdir(parents=True, exist_ok=True)
    final = root / f"{PREFIX}{step:06d}"
    tmp = root / f".tmp-{PREFIX}{step:06d}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    model.save_pretrained(tmp, state_dict=model_state)
    torch.save(optimizer.state_dict() if optimizer_state is None else optimizer_state, tmp / "optimizer.pt")
    torch.save(scheduler.state_dict(), tmp / "scheduler.pt")
    torch.save(rng, tmp / "rng.pt")
    (tmp / STATE_FILE).write_text(json.dumps({"step": step, **state}, indent=1))
    if final.exists():
        shutil.rmtree(final)
    os.replace(tmp, final)
    for old in complete(output_dir)[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def complete(output_dir: Path) -> list[Path]:
    """Complete checkpoints, oldest first."""
    root = checkpoint_dir(output_dir)
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if p.name.startswith(PREFIX) and (p / STATE_FILE).is_file()]
    return sorted(found, key=lambda p: int(p.name[len(PREFIX) :]))


def latest(output_dir: Path) -> Path | None:
    found = complete(output_dir)
    return found[-1] if found else None


def load(path: Path, model: Any, optimizer: Any, scheduler: Any) -> dict[str, Any]:
    """Restore adapter weights, optimizer, scheduler and RNG from ``path``; return its state."""
    from peft import set_peft_model_state_dict
    from safetensors.torch import load_file

    optim = torch.load(path / "optimizer.pt", weights_only=False)
    if any(isinstance(k, str) for k in optim.get("state", {})):  # keyed by parameter name: FSDP's
        raise UsageError(
            f"{path} was written by an FSDP run; a one-GPU or DDP run cannot resume it",
            "resume with the strategy that wrote it (--set train.strategy=fsdp --gpus N)",
        )
    set_peft_model_state_dict(model, load_file(str(path / "adapter_model.safetensors")))
    optimizer.load_state_dict(optim)
    scheduler.load_state_dict(torch.load(path / "scheduler.pt", weights_only=False))
    set_rng_state(torch.load(path / "rng.pt", weights_only=False))
    state: dict[str, Any] = json.loads((path / STATE_FILE).read_text())
    return state
