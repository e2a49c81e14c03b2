"""Run tracking: the scalars of ``metrics.jsonl`` and the recipe, sent to TensorBoard and Weights & Biases.

``train.report_to`` names the trackers. :func:`check` runs before anything loads (a missing package is one
line naming the extra to install); :func:`open_trackers` opens them on rank 0 only, under
``OUTPUT_DIR/logs/``, and closes them however the run ends. A resumed run continues its run: TensorBoard
writes to the same log directory and hides what was logged past the checkpoint's step (those steps are
trained and logged again, as ``metrics.jsonl`` is truncated); W&B reopens the run whose id the log
directory keeps.

Scalars are tagged ``train/<key>`` and ``eval/<key>`` from the keys of a ``metrics.jsonl`` record
(``loss`` -> ``train/loss``, ``eval_loss`` -> ``eval/loss``), at that record's ``step``.
"""

from __future__ import annotations

import importlib
import os
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Protocol

from qlora_kit.errors import UsageError
from qlora_kit.recipe import Recipe, report_targets
from qlora_kit.train.outputs import LOG_DIR

WANDB_ID_FILE = "wandb-run-id"  # in the log directory: the W&B run a resumed run continues


class Tracker(Protocol):
    def log(self, metrics: dict[str, Any]) -> None: ...
    def close(self, ok: bool) -> None: ...


def scalars(metrics: dict[str, Any]) -> dict[str, float]:
    """A ``metrics.jsonl`` record as tagged scalars (its ``step`` is where they are logged)."""
    out = {}
    for key, value in metrics.items():
        if key != "step" and isinstance(value, (int, float)) and not isinstance(value, bool):
            out[f"eval/{key[5:]}" if key.startswith("eval_") else f"train/{key}"] = float(value)
    return out


def hyperparameters(recipe: Recipe) -> dict[str, Any]:
    """The recipe flattened to ``section.key`` -> a number, bool or string (lists comma-joined)."""
    out: dict[str, Any] = {}
    for section, values in recipe.to_dict().items():
        for key, value in values.items():
            out[f"{section}.{key}"] = ",".join(map(str, value)) if isinstance(value, list) else value
    return out


def _import(module: str, name: str) -> Any:
    try:
        return importlib.import_module(module)
    except ImportError:
        raise UsageError(
            f"train.report_to names {name}, but its package is not installed",
            f"pip install 'qlora-kit[{name}]', or drop {name} from train.report_to",
        ) from None


def check(recipe: Recipe) -> None:
    """Every tracker's package importable, before the data or the model load."""
    for name in report_targets(recipe.train.report_to):
        if name == "tensorboard":
            _import("tensorboard", name)
            _import("torch.utils.tensorboard", name)
        else:
            _import(name, name)


class TensorBoard:
    """Event files in ``logs/tensorboard``, through ``torch.utils.tensorboard``; the recipe as hparams."""

    def __init__(self, log_dir: Path, recipe: Recipe, start_step: int) -> None:
        from torch.utils.tensorboard import SummaryWriter
        from torch.utils.tensorboard.summary import hparams

        # hides what an earlier attempt logged past ``start_step``: a resumed run logs those steps again
        self.writer = SummaryWriter(str(log_dir / "tensorboard"), purge_step=start_step + 1, flush_secs=10)
        if not start_step:
            file_writer = self.writer.file_writer  # set by the constructor
            assert file_writer is not None
            for summary in hparams(hyperparameters(recipe), {"train/loss": 0.0, "eval/loss": 0.0}):
                file_writer.add_summary(summary)

    def log(self, metrics: dict[str, Any]) -> None:
        for tag, value in scalars(metrics).items():
            self.writer.add_scalar(tag, value, metrics["step"])

    def close(self, ok: bool) -> None:
        self.writer.close()


class WandB:
    """A W&B run (``WANDB_MODE=offline`` logs to ``logs/wandb`` without network; ``wandb sync`` uploads it)."""

    def __init__(self, log_dir: Path, recipe: Recipe, start_step: int) -> None:
        import wandb

        id_file = log_dir / WANDB_ID_FILE
        run_id = id_file.read_text().strip() if start_step and id_file.is_file() else None
        try:
            self.run = wandb.init(
                project=os.environ.get("WANDB_PROJECT", "qlora-kit"),
                name=Path(recipe.train.output_dir).name,
                dir=str(log_dir),
                config=recipe.to_dict(),
                id=run_id,
                resume="allow" if run_id else None,
            )
        except Exception as exc:  # no API key, no network, a bad setting: wandb says which
            first = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:200]
            raise UsageError(
                f"W&B could not start a run: {first}",
                "run `wandb login` (or set WANDB_API_KEY), set WANDB_MODE=offline to log without network, "
                "or drop wandb from train.report_to",
            ) from None
        id_file.write_text(self.run.id)

    def log(self, metrics: dict[str, Any]) -> None:
        self.run.log(scalars(metrics), step=metrics["step"])

    def close(self, ok: bool) -> None:
        self.run.finish(exit_code=0 if ok else 1)


BACKENDS: dict[str, Callable[[Path, Recipe, int], Tracker]] = {"tensorboard": TensorBoard, "wandb": WandB}


class Trackers:
    """The recipe's trackers as one; none at all on ranks other than 0."""

    def __init__(self, trackers: list[Tracker]) -> None:
        self.trackers = trackers

    def log(self, metrics: dict[str, Any]) -> None:
        for tracker in self.trackers:
            tracker.log(metrics)

    def close(self, ok: bool) -> None:
        while self.trackers:
            self.trackers.pop().close(ok)


NO_TRACKERS = Trackers([])


@contextmanager
def open_trackers(recipe: Recipe, output_dir: Path, start_step: int, main: bool) -> Iterator[Trackers]:
    """The trackers of ``train.report_to``, closed at the end, on an error and on Ctrl-C alike."""
    names = report_targets(recipe.train.report_to) if main else []
    trackers = Trackers([])
    try:
        if names:
            (output_dir / LOG_DIR).mkdir(parents=True, exist_ok=True)
        for name in names:
            trackers.trackers.append(BACKENDS[name](output_dir / LOG_DIR, recipe, start_step))
        yield trackers
    except BaseException:
        trackers.close(ok=False)
        raise
    trackers.close(ok=True)
