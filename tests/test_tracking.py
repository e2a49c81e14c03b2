"""train.report_to: TensorBoard event files and W&B offline runs hold the series metrics.jsonl holds.

Tiny CPU runs of the demo recipe (NF4, real bitsandbytes); the event files are read back with
TensorBoard's own reader, the W&B run file with the record format it is written in. No network: W&B
runs with WANDB_MODE=offline, and the refusal test points it at a closed port on the loopback."""

from __future__ import annotations

import json
import os
import struct
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from test_train import DEMO, Quiet, demo_recipe

ROOT = Path(__file__).resolve().parent.parent


def jsonl(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def tb_scalars(out: Path) -> dict[str, list[tuple[int, float]]]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(out / "logs" / "tensorboard"), size_guidance={"scalars": 0})
    acc.Reload()
    return {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}


def f32(x: float) -> float:
    return float(np.float32(x))  # TensorBoard keeps a scalar as a float32


def test_report_to_takes_a_comma_list_and_refuses_unknown_names():
    from qlora_kit.errors import UsageError
    from qlora_kit.recipe import load_recipe

    assert load_recipe(DEMO).train.report_to == []
    assert load_recipe(DEMO, ["train.report_to=tensorboard,wandb"]).train.report_to == ["tensorboard", "wandb"]
    assert load_recipe(DEMO, ["train.report_to=[wandb]"]).train.report_to == ["wandb"]
    assert load_recipe(DEMO, ["train.report_to=none"]).train.report_to == []
    with pytest.raises(UsageError, match=r"unknown tracker 'mlflow' \(trackers: tensorboard, wandb\)"):
        load_recipe(DEMO, ["train.report_to=tensorboard,mlflow"])


def test_tensorboard_events_hold_the_metrics_series_and_the_recipe(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    from tensorboard.plugins.hparams import plugin_data_pb2

    from qlora_kit.train.loop import train

    out = tmp_path / "run"
    recipe = demo_recipe(out, max_steps=6, eval_steps=3, report_to="tensorboard", **{"data.eval_fraction": 0.2})
    train(recipe, Quiet())
    rows, events = jsonl(out), tb_scalars(out)
    assert [r["step"] for r in rows] == [1, 2, 3, 4, 5, 6]
    for key in ("loss", "lr", "tokens_per_s", "memory_bytes", "epoch"):
        assert events[f"train/{key}"] == [(r["step"], f32(r[key])) for r in rows], key
    evals = [r for r in rows if "eval_loss" in r]
    assert [r["step"] for r in evals] == [3, 6]
    assert events["eval/loss"] == [(r["step"], f32(r["eval_loss"])) for r in evals]
    assert events["eval/ppl"] == [(r["step"], f32(r["eval_ppl"])) for r in evals]

    acc = EventAccumulator(str(out / "logs" / "tensorboard"))
    acc.Reload()
    content = acc.SummaryMetadata("_hparams_/session_start_info").plugin_data.content
    hparams = plugin_data_pb2.HParamsPluginData.FromString(content).session_start_info.hparams
    assert hparams["lora.rank"].number_value == recipe.lora.rank
    assert hparams["quant.mode"].string_value == "nf4"
    assert hparams["train.report_to"].string_value == "tensorboard"


def test_a_resumed_run_continues_the_same_event_files(tmp_path):
    """Resumed from step 3 of 6, steps 4-6 are trained and logged again: TensorBoard shows each step once,
    with the values metrics.jsonl ends with, from event files in the one log directory."""
    from qlora_kit.train.loop import train

    out = tmp_path / "run"
    recipe = demo_recipe(out, max_steps=6, save_steps=3, report_to="tensorboard")
    train(recipe, Quiet())
    train(recipe, Quiet(), resume=True)
    assert len(list((out / "logs" / "tensorboard").glob("events.out.tfevents.*"))) == 2
    rows = jsonl(out)
    assert [r["step"] for r in rows] == [1, 2, 3, 4, 5, 6]
    assert tb_scalars(out)["train/loss"] == [(r["step"], f32(r["loss"])) for r in rows]


def test_trackers_are_closed_on_errors_and_ctrl_c(tmp_path, monkeypatch):
    from qlora_kit.train import tracking

    closed = []

    class Recorder:
        def __init__(self, log_dir, recipe, start_step):
            pass

        def log(self, metrics):
            pass

        def close(self, ok):
            closed.append(ok)

    monkeypatch.setitem(tracking.BACKENDS, "tensorboard", Recorder)
    recipe = demo_recipe(tmp_path / "run", report_to="tensorboard")
    for error in (RuntimeError, KeyboardInterrupt):
        with pytest.raises(error), tracking.open_trackers(recipe, tmp_path / "run", 0, main=True):
            raise error
    with tracking.open_trackers(recipe, tmp_path / "run", 0, main=True) as trackers:
        trackers.log({"step": 1, "loss": 1.0})
    with tracking.open_trackers(recipe, tmp_path / "run", 0, main=False) as trackers:
        assert trackers.trackers == []  # rank 0 writes for the run
    assert closed == [False, False, True]


def test_ctrl_c_mid_step_leaves_every_logged_step_in_the_event_file(tmp_path, monkeypatch):
    """A second Ctrl-C (KeyboardInterrupt inside a step) ends the run at once, saving nothing: the steps
    logged before it are in the event file all the same."""
    from qlora_kit.train import loop

    real, calls = loop._step, []

    def step_then_ctrl_c(run):
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt
        return real(run)

    out = tmp_path / "run"
    monkeypatch.setattr(loop, "_step", step_then_ctrl_c)
    with pytest.raises(loop.Interrupted, match="nothing saved"):
        loop.train(demo_recipe(out, max_steps=6, report_to="tensorboard"), Quiet())
    rows = jsonl(out)
    assert [r["step"] for r in rows] == [1, 2]
    assert tb_scalars(out)["train/loss"] == [(r["step"], f32(r["loss"])) for r in rows]


def test_force_moves_the_old_logs_aside_and_a_failed_force_restores_them(tmp_path, monkeypatch):
    from qlora_kit.train import loop

    out = tmp_path / "run"
    recipe = demo_recipe(out, max_steps=2, report_to="tensorboard")
    loop.train(recipe, Quiet())
    first = sorted(p.name for p in (out / "logs" / "tensorboard").iterdir())

    def broken(run):
        raise RuntimeError("the model did not load")

    with monkeypatch.context() as patch:
        patch.setattr(loop, "_build_model", broken)
        with pytest.raises(RuntimeError, match="did not load"):
            loop.train(recipe, Quiet(), force=True)
    assert sorted(p.name for p in (out / "logs" / "tensorboard").iterdir()) == first
    assert not (out / ".previous-run").exists()

    loop.train(recipe, Quiet(), force=True)
    (second,) = sorted(p.name for p in (out / "logs" / "tensorboard").iterdir())
    assert second not in first and len(tb_scalars(out)["train/loss"]) == 2


def _train_cli(out: Path, *sets: str, env: dict[str, str] | None = None, hide: str = "") -> subprocess.CompletedProcess:
    """``qlora-kit train`` of the demo recipe in a fresh process; ``hide`` a package as if not installed."""
    args = ["train", str(DEMO), "--set", f"train.output_dir={out}"]
    for s in (
        "train.max_steps=3",
        "train.micro_batch=4",
        "data.max_seq_len=32",
        "train.save_steps=0",
        "train.logging_steps=1",
        *sets,
    ):
        args += ["--set", s]
    code = f"import sys; sys.modules[{hide!r}] = None\n" if hide else ""
    code += f"from qlora_kit.cli import main; raise SystemExit(main({args!r}))"
    full_env = {**os.environ, "PYTHONPATH": str(ROOT), **(env or {})}
    return subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=300, env=full_env, cwd=out.parent
    )


@pytest.mark.parametrize("name", ["tensorboard", "wandb"])
def test_a_missing_tracker_package_is_one_line_before_anything_loads(tmp_path, name):
    out = tmp_path / "run"
    result = _train_cli(out, f"train.report_to={name}", hide=name)
    assert result.returncode == 2, result.stderr
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and f"pip install 'qlora-kit[{name}]'" in lines[0], result.stderr
    assert "Traceback" not in result.stderr and not out.exists()  # refused before the data or model loaded


def _wandb_env(tmp_path: Path, mode: str) -> dict[str, str]:
    home = tmp_path / "home"
    home.mkdir(exist_ok=True)
    return {
        "WANDB_MODE": mode,
        "WANDB_API_KEY": "",
        "HOME": str(home),  # no ~/.netrc key, no settings of the user's
        "WANDB_CONFIG_DIR": str(home / "config"),
        "WANDB_CACHE_DIR": str(home / "cache"),
        "WANDB_DATA_DIR": str(home / "data"),
        "WANDB_BASE_URL": "http://127.0.0.1:9",  # were anything to connect, it would be refused locally
    }


def wandb_records(path: Path) -> list[bytes]:
    """The records of a ``.wandb`` run file: a 7-byte header (":W&B", id, version), then LevelDB-log
    blocks of 32 KiB holding chunks (4-byte checksum, 2-byte length, 1-byte type: full/first/middle/last)."""
    data = path.read_bytes()
    assert data[:4] == b":W&B"
    block, pos, records, pending = 32768, 7, [], b""
    while pos + 7 <= len(data):
        left = block - pos % block
        if left < 7:  # a block's tail too short for a chunk header is padding
            pos += left
            continue
        length, kind = struct.unpack("<HB", data[pos + 4 : pos + 7])
        pending += data[pos + 7 : pos + 7 + length]
        pos += 7 + length
        if kind in (1, 4):
            records.append(pending)
            pending = b""
    return records


def test_wandb_offline_run_holds_the_metrics_series_and_the_recipe(tmp_path):
    pytest.importorskip("wandb")
    from wandb.proto import wandb_internal_pb2

    out = tmp_path / "run"
    result = _train_cli(out, "train.report_to=tensorboard,wandb", env=_wandb_env(tmp_path, "offline"))
    assert result.returncode == 0, result.stderr
    (run_file,) = (out / "logs" / "wandb").glob("offline-run-*/run-*.wandb")
    history, config = {}, {}
    for raw in wandb_records(run_file):
        record = wandb_internal_pb2.Record.FromString(raw)
        if record.WhichOneof("record_type") == "history":
            items = {item.key or "/".join(item.nested_key): json.loads(item.value_json) for item in record.history.item}
            history[items["_step"]] = items
        elif record.WhichOneof("record_type") == "run":
            config.update({item.key: json.loads(item.value_json) for item in record.run.config.update})
    rows = jsonl(out)
    assert sorted(history) == [r["step"] for r in rows] == [1, 2, 3]
    for r in rows:
        assert history[r["step"]]["train/loss"] == r["loss"] and history[r["step"]]["train/lr"] == r["lr"]
    assert config["lora"]["rank"] == 16 and config["train"]["report_to"] == ["tensorboard", "wandb"]
    assert (out / "logs" / "wandb-run-id").read_text() == run_file.stem.removeprefix("run-")
    assert tb_scalars(out)["train/loss"] == [(r["step"], f32(r["loss"])) for r in rows]


def test_wandb_without_a_login_is_one_line_before_the_model_loads(tmp_path):
    pytest.importorskip("wandb")
    out = tmp_path / "run"
    result = _train_cli(out, "train.report_to=wandb", env=_wandb_env(tmp_path, "online"))
    assert result.returncode == 2, result.stderr
    lines = [line for line in result.stderr.splitlines() if line.strip() and not line.startswith("wandb:")]
    assert len(lines) == 1 and "W&B could not start a run" in lines[0] and "WANDB_MODE=offline" in lines[0], lines
    assert "trainable parameters" not in result.stdout + result.stderr and not (out / "checkpoints").exists()
