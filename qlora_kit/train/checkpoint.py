"""Training checkpoints: written atomically, the last K kept, the latest complete one found on resume.

A checkpoint is a directory ``<output_dir>/checkpoints/step-NNNNNN`` holding the adapter (peft
format), the optimizer and scheduler state, the RNG states and ``state.json`` (step, data position,
the loss history so far, the recipe). It is written under a temporary name and renamed into place
when complete, so a crash never leaves a checkpoint that claims to be whole: only directories with
``state.json`` count.

Nothing read back can run code: the adapter is safetensors, the RNG states and ``state.json`` are
JSON, and the optimizer and scheduler states are read with ``torch.load(weights_only=True)``, whose
unpickler builds only tensors and plain containers and refuses every other global.
"""

from __future__ import annotations

import json
import random
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch

from qlora_kit.errors import UsageError, writing
from qlora_kit.files import staged_dir

STATE_FILE = "state.json"
PREFIX = "step-"


def checkpoint_dir(output_dir: Path) -> Path:
    return output_dir / "checkpoints"


RNG_FILE = "rng.json"
TORCH_FILES = ("optimizer.pt", "scheduler.pt")


def rng_state() -> dict[str, Any]:
    """Every random state a step draws from, as JSON-ready lists of ints (no pickle)."""
    version, words, gauss = random.getstate()
    name, keys, pos, has_gauss, cached = np.random.get_state()
    state: dict[str, Any] = {
        "python": [version, list(words), gauss],
        "numpy": [name, [int(k) for k in keys], int(pos), int(has_gauss), float(cached)],
        "torch": torch.get_rng_state().tolist(),
    }
    if torch.cuda.is_available():
        state["cuda"] = [s.tolist() for s in torch.cuda.get_rng_state_all()]
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    version, words, gauss = state["python"]
    random.setstate((version, tuple(words), gauss))
    name, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((name, np.array(keys, dtype=np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(torch.tensor(state["torch"], dtype=torch.uint8))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all([torch.tensor(s, dtype=torch.uint8) for s in state["cuda"]])


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
    with writing(root, f"checkpoint {final.name}"), staged_dir(final, f".tmp-{PREFIX}{step:06d}") as tmp:
        model.save_pretrained(tmp, state_dict=model_state)
        torch.save(optimizer.state_dict() if optimizer_state is None else optimizer_state, tmp / "optimizer.pt")
        torch.save(scheduler.state_dict(), tmp / "scheduler.pt")
        (tmp / RNG_FILE).write_text(json.dumps(rng))
        (tmp / STATE_FILE).write_text(json.dumps({"step": step, **state}, indent=1))
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


def _corrupt(path: Path, name: str, why: object) -> UsageError:
    reason = str(why).splitlines()[0][:160] if str(why) else type(why).__name__
    return UsageError(
        f"checkpoint {path}: {name} is unreadable ({reason})",
        f"delete {path} to resume from the checkpoint before it, or start over with --force",
    )


def read_state(path: Path) -> dict[str, Any]:
    """``state.json``: the step, data position, loss history and recipe of a checkpoint."""
    try:
        state = json.loads((path / STATE_FILE).read_text())
        if not isinstance(state, dict) or not isinstance(state.get("step"), int):
            raise ValueError("not a checkpoint state object")
        if "data" not in state or not isinstance(state.get("history"), list):
            raise ValueError("no data position or loss history")
    except (OSError, UnicodeDecodeError, ValueError, KeyError) as exc:
        raise _corrupt(path, STATE_FILE, exc) from None
    return state


def read_torch(path: Path, name: str) -> Any:
    """An optimizer or scheduler state, read with the weights-only unpickler (tensors and containers only)."""
    import pickle

    if not (path / name).is_file():
        raise _corrupt(path, name, "missing")
    try:
        return torch.load(path / name, weights_only=True, map_location="cpu")
    except pickle.UnpicklingError:
        raise UsageError(
            f"checkpoint {path}: {name} holds objects other than tensors (refused: unpickling them could run code)",
            f"delete {path}, or start over with --force; checkpoints qlora-kit writes hold tensors only",
        ) from None
    except (OSError, RuntimeError, EOFError, ValueError) as exc:
        raise _corrupt(path, name, exc) from None


def read_rng(path: Path) -> dict[str, Any]:
    if not (path / RNG_FILE).is_file() and (path / "rng.pt").is_file():
        raise UsageError(
            f"checkpoint {path} keeps its RNG state in rng.pt (a pickle, written by an older qlora-kit); "
            "it is not read, since unpickling can run code",
            "start over with --force, or resume with the qlora-kit version that wrote it",
        )
    try:
        state = json.loads((path / RNG_FILE).read_text())
        if not isinstance(state, dict) or not {"python", "numpy", "torch"} <= state.keys():
            raise ValueError("not an RNG state object")
    except (OSError, UnicodeDecodeError, ValueError) as exc:
        raise _corrupt(path, RNG_FILE, exc) from None
    return state


def restore_rng(path: Path, state: dict[str, Any]) -> None:
    try:
        set_rng_state(state)
    except (TypeError, ValueError, RuntimeError, IndexError) as exc:
        raise _corrupt(path, RNG_FILE, exc) from None


def load(path: Path, model: Any, optimizer: Any, scheduler: Any) -> dict[str, Any]:
    """Restore adapter weights, optimizer, scheduler and RNG from ``path``; return its state.

    Every file is read and checked before anything is restored, so a corrupt checkpoint changes nothing."""
    from peft import set_peft_model_state_dict

    optim = read_torch(path, "optimizer.pt")
    if not isinstance(optim, dict):
        raise _corrupt(path, "optimizer.pt", "not a state dict")
    if any(isinstance(k, str) for k in optim.get("state", {})):  # keyed by parameter name: FSDP's
        raise UsageError(
            f"{path} was written by an FSDP run; a one-GPU or DDP run cannot resume it",
            "resume with the strategy that wrote it (--set train.strategy=fsdp --gpus N)",
        )
    state, sched, rng = read_state(path), read_torch(path, "scheduler.pt"), read_rng(path)
    if not isinstance(sched, dict):
        raise _corrupt(path, "scheduler.pt", "not a state dict")
    weights = read_adapter(path)
    try:
        set_peft_model_state_dict(model, weights)
        optimizer.load_state_dict(optim)
        scheduler.load_state_dict(sched)
    except (RuntimeError, ValueError, KeyError, TypeError) as exc:
        raise _corrupt(path, "the adapter or optimizer state (does it match this recipe?)", exc) from None
    restore_rng(path, rng)
    return state


def read_adapter(path: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    try:
        return load_file(str(path / "adapter_model.safetensors"))
    except Exception as exc:  # OSError, or safetensors' SafetensorError for a truncated header or data
        raise _corrupt(path, "adapter_model.safetensors", exc) from None
