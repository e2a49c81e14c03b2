"""What a training run writes besides checkpoints, and how: the metrics log, the final adapter with
``qlora_kit.json`` (written last: its presence means the run completed), the loss plot, and a previous
run kept aside while ``--force`` starts over."""

from __future__ import annotations

import errno
import json
import os
import shutil
from pathlib import Path
from typing import Any, Protocol

import torch

from qlora_kit.adapter import METADATA_FILE, config_fingerprint
from qlora_kit.errors import UsageError, writing
from qlora_kit.recipe import Recipe
from qlora_kit.train import checkpoint

METRICS_FILE = "metrics.jsonl"
LOG_DIR = "logs"  # the trackers' files (qlora_kit.train.tracking)


class Reporter(Protocol):
    def message(self, text: str) -> None: ...
    def start(self, total_steps: int, start_step: int) -> None: ...
    def step(self, metrics: dict[str, Any]) -> None: ...
    def finish(self, summary: dict[str, Any]) -> None: ...


class SilentReporter:
    """Reports nothing: ranks other than 0, and callers that want only the result."""

    def message(self, text: str) -> None: ...
    def start(self, total_steps: int, start_step: int) -> None: ...
    def step(self, metrics: dict[str, Any]) -> None: ...
    def finish(self, summary: dict[str, Any]) -> None: ...


def prepare_output(output_dir: Path, resume: bool, force: bool) -> tuple[Path | None, bool]:
    """The checkpoint to resume from, and whether a previous run is there (refused unless ``force``).

    Nothing is deleted here: a previous run is moved aside only once the new one is ready to write."""
    if resume:
        found = checkpoint.latest(output_dir)
        if found is None:
            raise UsageError(
                f"--resume: no complete checkpoint in {output_dir / 'checkpoints'}", "start without --resume"
            )
        return found, False
    previous = bool(checkpoint.latest(output_dir)) or (output_dir / METADATA_FILE).exists()
    if previous and not force:
        raise UsageError(
            f"{output_dir} holds a previous run",
            "pass --resume to continue it, --force to start over, or --set train.output_dir=NEW",
        )
    return None, previous


RANDOM_INIT_DIR = "random-init-base"  # a random-init recipe's base, inside the run's directory


class PreviousRun:
    """A previous run's checkpoints, metrics, tracker logs and metadata, moved aside while ``--force`` starts over.

    They come back if the new run fails before it has a checkpoint of its own, and are deleted once
    it has one (or completes): a failed command never destroys earlier work."""

    NAMES = ("checkpoints", METADATA_FILE, METRICS_FILE, RANDOM_INIT_DIR, LOG_DIR)  # the base its adapter trained on

    def __init__(self, output_dir: Path) -> None:
        self.output_dir, self.aside = output_dir, output_dir / ".previous-run"
        shutil.rmtree(self.aside, ignore_errors=True)
        self.aside.mkdir()
        for name in self.NAMES:
            if (output_dir / name).exists():
                os.replace(output_dir / name, self.aside / name)

    def restore(self) -> None:
        if not self.aside.exists():
            return
        for name in self.NAMES:
            if (self.aside / name).exists():
                target = self.output_dir / name
                shutil.rmtree(target, ignore_errors=True) if target.is_dir() else target.unlink(missing_ok=True)
                os.replace(self.aside / name, target)
        shutil.rmtree(self.aside, ignore_errors=True)

    def drop(self) -> None:
        shutil.rmtree(self.aside, ignore_errors=True)


def append_jsonl(path: Path, record: dict[str, Any]) -> None:
    """One whole line or none: a failed write (a full disk) is cut back off the file."""
    data = (json.dumps(record) + "\n").encode()
    with writing(path.parent, path.name):
        fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        try:
            size = os.fstat(fd).st_size
            try:
                if os.write(fd, data) != len(data):
                    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
            except OSError:
                os.ftruncate(fd, size)
                raise
        finally:
            os.close(fd)


def truncate_metrics(path: Path, step: int) -> None:
    """Drop metrics logged after the checkpoint a run resumes from (they will be logged again).

    A torn last line (the process died mid-write) is dropped; any other unreadable line is refused."""
    if not path.exists():
        return
    try:
        lines = [line for line in path.read_text().splitlines() if line.strip()]
    except (OSError, UnicodeDecodeError) as exc:
        raise UsageError(f"{path} is unreadable ({exc})", f"delete {path} (it is only the log) and resume") from None
    kept = []
    for number, line in enumerate(lines, 1):
        try:
            row = json.loads(line)
            row_step = int(row["step"])
        except (ValueError, KeyError, TypeError):
            if number == len(lines):
                break
            raise UsageError(
                f"{path}: line {number} is not a metrics record", f"delete that line (or {path}) and resume"
            ) from None
        if row_step <= step:
            kept.append(line)
    path.write_text("".join(line + "\n" for line in kept))


def write_final(
    output_dir: Path,
    model: Any,
    tokenizer: Any,
    recipe: Recipe,
    base: str,
    summary: dict[str, Any],
    adapter: dict[str, Any] | None = None,
) -> None:
    """Adapter and tokenizer into place, then ``qlora_kit.json`` last: it marks the run complete."""
    import peft
    import transformers

    tmp = output_dir / ".tmp-final"
    shutil.rmtree(tmp, ignore_errors=True)
    with writing(output_dir, "the adapter"):
        try:
            model.save_pretrained(tmp, state_dict=adapter)  # adapter: the full LoRA weights of an FSDP run
            tokenizer.save_pretrained(tmp)
        except BaseException:  # a full disk, Ctrl-C: no half-written adapter stays behind
            shutil.rmtree(tmp, ignore_errors=True)
            raise
    for item in tmp.iterdir():
        os.replace(item, output_dir / item.name)
    tmp.rmdir()
    metadata = {
        "base_model": base,
        "base_config_sha256": config_fingerprint(base),
        "quant": {
            "mode": recipe.quant.mode,
            "double_quant": recipe.quant.double_quant,
            "compute_dtype": recipe.quant.compute_dtype,
        },
        "recipe": recipe.to_dict(),
        "summary": summary,
        "versions": {"torch": torch.__version__, "transformers": transformers.__version__, "peft": peft.__version__},
    }
    from qlora_kit.files import write_atomic

    with writing(output_dir, METADATA_FILE):
        write_atomic(output_dir / METADATA_FILE, json.dumps(metadata, indent=2))


def plot_losses(output_dir: Path) -> str | None:
    """loss_curve.png from metrics.jsonl, when matplotlib is installed (the ``plot`` extra)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    rows = [json.loads(line) for line in (output_dir / METRICS_FILE).read_text().splitlines() if line]
    fig, ax = plt.subplots(figsize=(6, 3.5))
    ax.plot([r["step"] for r in rows], [r["loss"] for r in rows], label="train loss")
    evals = [r for r in rows if "eval_loss" in r]
    if evals:
        ax.plot([r["step"] for r in evals], [r["eval_loss"] for r in evals], "o-", label="eval loss")
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.legend()
    fig.tight_layout()
    path = output_dir / "loss_curve.png"
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return str(path)
