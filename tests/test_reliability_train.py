"""Training never destroys earlier work: ``--force`` validates first and keeps the previous run until the
new one has a checkpoint, a full disk gets one line and leaves nothing half-written, and a recipe that
would train nothing is refused before anything is touched."""

from __future__ import annotations

import errno
import hashlib
import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from test_train import DEMO, Quiet, _cli, demo_recipe, losses

from qlora_kit.errors import WriteFailed, writing


def _tree(root: Path) -> dict[str, str]:
    """Every file under ``root`` (relative path -> sha256): what a failed command must leave as it was."""
    return {
        str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
        if p.is_file()
    }


def _error_lines(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if line.startswith("error:")]


@pytest.fixture(scope="module")
def previous(tmp_path_factory) -> Path:
    """A completed run (2 steps, a checkpoint after step 1): copied fresh for each test."""
    from qlora_kit.train.loop import train

    out = tmp_path_factory.mktemp("previous") / "run"
    train(demo_recipe(out, max_steps=2, save_steps=1), Quiet())
    assert (out / "qlora_kit.json").is_file() and (out / "checkpoints" / "step-000001").is_dir()
    return out


def _copy(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


@pytest.mark.parametrize(
    ("sets", "fragment"),
    [
        (["data.path=/no/such/data.jsonl"], "/no/such/data.jsonl"),
        (["model.name=/no/such/model", "model.random_init=false"], "/no/such/model"),
        (["train.max_steps=0", "train.epochs=0"], "train.max_steps and train.epochs are both 0"),
    ],
)
def test_force_with_bad_inputs_leaves_the_previous_run_intact(previous, tmp_path, sets, fragment):
    out = _copy(previous, tmp_path / "run")
    before = _tree(out)
    args = ["train", str(DEMO), "--force", "--set", f"train.output_dir={out}"]
    for s in sets:
        args += ["--set", s]
    proc = _cli(*args)
    assert proc.returncode == 2, proc.stderr
    (line,) = _error_lines(proc.stderr)
    assert fragment in line and "Traceback" not in proc.stderr, proc.stderr
    assert _tree(out) == before  # qlora_kit.json, checkpoints/, metrics.jsonl: byte for byte


def _fail_at_forward(monkeypatch, at: int, exc: BaseException) -> None:
    from qlora_kit.model import savers

    real, calls = savers.causal_lm_loss, [0]

    def loss(*args, **kw):
        calls[0] += 1
        if calls[0] == at:
            raise exc
        return real(*args, **kw)

    monkeypatch.setattr(savers, "causal_lm_loss", loss)


@pytest.mark.parametrize("exc", [RuntimeError("boom"), KeyboardInterrupt()])
def test_force_puts_the_previous_run_back_when_the_new_one_fails_before_a_checkpoint(
    previous, tmp_path, monkeypatch, exc
):
    from qlora_kit.train.loop import train

    out = _copy(previous, tmp_path / "run")
    before = _tree(out)
    _fail_at_forward(monkeypatch, 2, exc)  # step 2 of a run whose first checkpoint is after step 2
    with pytest.raises((type(exc), Exception)):
        train(demo_recipe(out, max_steps=4, save_steps=2, lr=0.02), Quiet(), force=True)
    assert _tree(out) == before
    assert [p.name for p in out.iterdir() if p.name.startswith(".")] == []  # nothing left aside


def test_force_with_another_seed_keeps_the_random_init_base_the_old_adapter_was_trained_on(
    previous, tmp_path, monkeypatch
):
    """The new seed writes a new random-init base; if the new run fails, the old run's base comes back."""
    from qlora_kit.train.loop import train

    out = _copy(previous, tmp_path / "run")
    before = _tree(out)
    _fail_at_forward(monkeypatch, 2, RuntimeError("boom"))
    with pytest.raises(RuntimeError, match="boom"):
        train(demo_recipe(out, max_steps=4, save_steps=2, seed=7), Quiet(), force=True)
    assert _tree(out) == before  # random-init-base/ included, byte for byte


def test_force_drops_the_previous_run_once_the_new_one_has_a_checkpoint(previous, tmp_path, monkeypatch):
    from qlora_kit.train.loop import train

    out = _copy(previous, tmp_path / "run")
    _fail_at_forward(monkeypatch, 4, RuntimeError("boom"))  # after the new run's checkpoint at step 2
    with pytest.raises(RuntimeError, match="boom"):
        train(demo_recipe(out, max_steps=4, save_steps=2, lr=0.02), Quiet(), force=True)
    assert not (out / "qlora_kit.json").exists()  # the old run's: it no longer describes this directory
    assert [p.name for p in (out / "checkpoints").iterdir()] == ["step-000002"]
    assert sorted(losses(out)) == [1, 2, 3]  # the new run's log only
    assert [p.name for p in out.iterdir() if p.name.startswith(".")] == []


def test_a_completed_force_run_replaces_the_previous_one(previous, tmp_path):
    from qlora_kit.train.loop import train

    out = _copy(previous, tmp_path / "run")
    old = json.loads((out / "qlora_kit.json").read_text())
    train(demo_recipe(out, max_steps=3, save_steps=0, lr=0.02), Quiet(), force=True)
    new = json.loads((out / "qlora_kit.json").read_text())
    assert old["summary"]["steps"] == 2 and new["summary"]["steps"] == 3
    assert not (out / "checkpoints").exists() or list((out / "checkpoints").iterdir()) == []
    assert sorted(losses(out)) == [1, 2, 3]
    assert [p.name for p in out.iterdir() if p.name.startswith(".")] == []


def test_a_recipe_that_trains_nothing_is_refused_before_anything_is_written(tmp_path):
    out = tmp_path / "run"
    proc = _cli(
        "train", str(DEMO), "--set", f"train.output_dir={out}", "--set", "train.max_steps=0", "--set", "train.epochs=0"
    )
    assert proc.returncode == 2, proc.stderr
    (line,) = _error_lines(proc.stderr)
    assert "train.max_steps and train.epochs are both 0" in line and "set one of them" in line
    assert not out.exists()


# -- a full disk ------------------------------------------------------------------------------------


def test_library_write_failures_become_one_line(tmp_path):
    # the message torch.save raised on a full tmpfs (it never names ENOSPC); the tmpfs tests below are the real thing
    failed = pytest.raises(WriteFailed, match=r"could not write a state to .*: the write stopped short")
    with failed as info, writing(tmp_path, "a state"):
        raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 576 vs 534")
    assert "\n" not in str(info.value)
    with pytest.raises(WriteFailed, match="No space left on device"), writing(tmp_path, "a file"):
        raise OSError(errno.ENOSPC, "No space left on device")
    with pytest.raises(ValueError, match="not a write"), writing(tmp_path, "a file"):  # others pass through
        raise ValueError("not a write")


def test_a_failed_metrics_write_leaves_no_torn_line(tmp_path, monkeypatch):
    import os

    from qlora_kit.train import outputs

    path = tmp_path / "metrics.jsonl"
    outputs.append_jsonl(path, {"step": 1, "loss": 2.0})
    before = path.read_bytes()
    real_write = os.write

    def short_write(fd, data):  # the disk fills part-way through the line
        real_write(fd, data[:7])
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "write", short_write)
    with pytest.raises(WriteFailed, match=r"metrics\.jsonl"):
        outputs.append_jsonl(path, {"step": 2, "loss": 1.5})
    monkeypatch.undo()
    assert path.read_bytes() == before


def _tmpfs_available() -> bool:
    probe = "mkdir -p /tmp/.qk-probe && mount -t tmpfs -o size=1m tmpfs /tmp/.qk-probe"
    try:
        return subprocess.run(["unshare", "-rm", "sh", "-c", probe], capture_output=True, timeout=30).returncode == 0
    except (OSError, subprocess.SubprocessError):
        return False


def _train_on_small_disk(tmp_path: Path, size: str, sets: list[str], then: str = "") -> tuple[int, str, list[str]]:
    """``train`` with its output on a private tmpfs of ``size`` (a real full disk, in a mount namespace
    that vanishes with the command): exit code, stderr, and the files left on that disk."""
    mnt, listing, err = tmp_path / "disk", tmp_path / "listing.txt", tmp_path / "stderr.txt"
    mnt.mkdir()
    cmd = [sys.executable, "-m", "qlora_kit", "train", str(DEMO), "--set", f"train.output_dir={mnt}/run"]
    cmd += [x for s in ["train.max_steps=6", "data.max_seq_len=32", "train.micro_batch=4", *sets] for x in ("--set", s)]
    script = (
        f"mount -t tmpfs -o size={size} tmpfs {mnt} || exit 99; "
        f"{subprocess.list2cmdline(cmd)} 2>{err} >/dev/null; rc=$?; {then} "
        f"(cd {mnt} && find . -mindepth 1 | sort) > {listing}; exit $rc"
    )
    proc = subprocess.run(["unshare", "-rm", "sh", "-c", script], capture_output=True, text=True, timeout=600)
    assert proc.returncode != 99, proc.stderr
    return proc.returncode, err.read_text(), listing.read_text().split()


pytestmark_tmpfs = pytest.mark.skipif(not _tmpfs_available(), reason="needs `unshare -rm` and tmpfs mounts")


@pytestmark_tmpfs
@pytest.mark.parametrize(
    ("size", "sets", "what"),
    [
        ("5m", [], "the random-init base"),  # the 13 MiB base does not fit
        ("15m", ["train.save_steps=2"], "checkpoint step-000002"),  # its adapter fits, its optimizer not
        ("14m", ["train.save_steps=0"], "the adapter"),  # training done, the final adapter does not fit
    ],
)
def test_a_full_disk_gets_one_line_and_leaves_nothing_half_written(tmp_path, size, sets, what):
    rc, err, files = _train_on_small_disk(tmp_path, size, sets)
    assert rc == 1, err
    (line,) = _error_lines(err)
    assert f"could not write {what}" in line and "Traceback" not in err, err
    assert "No space left on device" in line or "full disk" in line, line
    assert [f for f in files if "/.tmp" in f or ".previous-run" in f] == []
    assert "./run/qlora_kit.json" not in files  # nothing claims to be complete
    steps = [f for f in files if f.count("/") == 3 and f.startswith("./run/checkpoints/step-")]
    assert all(f"{s}/state.json" in files for s in steps)  # every checkpoint left is whole


@pytestmark_tmpfs
@pytest.mark.slow
def test_after_a_full_disk_the_run_resumes_exactly(tmp_path):
    """Disk full at the second checkpoint; space is freed (the tmpfs grows) and ``--resume`` ends where
    an uninterrupted run ends: the same losses, the same adapter."""
    mnt, sets = tmp_path / "disk", ["train.save_steps=2", "train.logging_steps=1"]
    base = [sys.executable, "-m", "qlora_kit", "train", str(DEMO)]
    base += [
        x for s in ["train.max_steps=6", "data.max_seq_len=32", "train.micro_batch=4", *sets] for x in ("--set", s)
    ]
    resume = subprocess.list2cmdline([*base, "--resume", "--set", f"train.output_dir={mnt}/run"])
    full = subprocess.list2cmdline([*base, "--set", f"train.output_dir={mnt}/full"])
    then = (
        f"mount -o remount,size=100m {mnt} && {resume} >/dev/null 2>{tmp_path}/resume.txt && "
        f"{full} >/dev/null 2>&1 && mkdir {tmp_path}/run {tmp_path}/full && "
        f"cp {mnt}/run/metrics.jsonl {mnt}/run/adapter_model.safetensors {tmp_path}/run && "
        f"cp {mnt}/full/metrics.jsonl {mnt}/full/adapter_model.safetensors {tmp_path}/full;"
    )
    rc, err, files = _train_on_small_disk(tmp_path, "18m", sets, then)
    assert rc == 1 and "could not write checkpoint step-000004" in err and "--resume" in err, err
    assert "./run/qlora_kit.json" in files, (tmp_path / "resume.txt").read_text()
    assert sorted(losses(tmp_path / "run")) == [1, 2, 3, 4, 5, 6]
    assert losses(tmp_path / "run") == losses(tmp_path / "full")
    a = (tmp_path / "run" / "adapter_model.safetensors").read_bytes()
    assert a == (tmp_path / "full" / "adapter_model.safetensors").read_bytes()


# -- remote code ------------------------------------------------------------------------------------


@pytest.mark.parametrize("how", ["recipe", "set"])
def test_a_recipe_cannot_turn_on_remote_code(tmp_path, how):
    """Only the user's --trust-remote-code flag lets a model's own code run, never the recipe file."""
    recipe = tmp_path / "r.yaml"
    text = DEMO.read_text()
    if how == "recipe":
        assert "\nmodel:\n" in text
        text = text.replace("\nmodel:\n", "\nmodel:\n  trust_remote_code: true\n", 1)
    recipe.write_text(text)
    out = tmp_path / "run"
    args = ["train", str(recipe), "--set", f"train.output_dir={out}"]
    args += ["--set", "model.trust_remote_code=true"] if how == "set" else []
    proc = _cli(*args)
    assert proc.returncode == 2, proc.stderr
    (line,) = _error_lines(proc.stderr)
    assert "model.trust_remote_code" in line and "--trust-remote-code" in line and "Traceback" not in proc.stderr
    assert not out.exists()


# -- kill -9 ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("after_line", [3, pytest.param(5, marks=pytest.mark.slow)])  # past the step-2 checkpoint
def test_a_killed_run_resumes_to_the_uninterrupted_losses_and_adapter(tmp_path, after_line):
    """SIGKILL (no handler runs) at whatever moment follows the Nth metrics line, then --resume: the losses
    and the final adapter equal an uninterrupted run's exactly."""
    import os
    import signal
    import time

    from safetensors.torch import load_file

    sets = ["train.max_steps=6", "train.save_steps=2", "train.logging_steps=1", "data.max_seq_len=32"]
    sets += ["train.micro_batch=4", "train.eval_steps=0"]
    flags = [x for s in sets for x in ("--set", s)]
    whole, killed = tmp_path / "whole", tmp_path / "killed"
    assert _cli("train", str(DEMO), *flags, "--set", f"train.output_dir={whole}").returncode == 0
    cmd = [sys.executable, "-m", "qlora_kit", "train", str(DEMO), *flags, "--set", f"train.output_dir={killed}"]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    metrics, deadline = killed / "metrics.jsonl", time.monotonic() + 240
    while time.monotonic() < deadline and proc.poll() is None:
        if metrics.exists() and len(metrics.read_text().splitlines()) >= after_line:
            break
        time.sleep(0.01)
    assert proc.poll() is None, "the run ended before it could be killed"
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert not (killed / "qlora_kit.json").exists()  # nothing claims the run is complete
    resumed = _cli("train", str(DEMO), *flags, "--set", f"train.output_dir={killed}", "--resume")
    assert resumed.returncode == 0, resumed.stderr
    assert losses(killed) == losses(whole)
    a, b = load_file(whole / "adapter_model.safetensors"), load_file(killed / "adapter_model.safetensors")
    assert a.keys() == b.keys() and all(a[k].equal(b[k]) for k in a)
