"""Training's promises under attack and accident: checkpoints never run code, a corrupt or mismatched
checkpoint gets one line, and Ctrl-C at any moment resumes exactly."""

from __future__ import annotations

import json
import os
import pickle
import signal
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from test_train import Quiet, demo_recipe, losses

from qlora_kit.errors import UsageError


class Plant:
    """A pickle whose loading would create ``marker``: the payload of a hostile checkpoint file."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def _run(out: Path, **kw):
    from qlora_kit.train.loop import train

    return train(demo_recipe(out, max_steps=4, grad_accum=2, **kw.pop("train", {})), Quiet(), **kw)


@pytest.fixture(scope="module")
def interrupted(tmp_path_factory) -> Path:
    """A run with a checkpoint at step 2 of 4: copied fresh for each test."""
    out = tmp_path_factory.mktemp("ckpt") / "run"
    _run(out, train={"save_steps": 2})
    (out / "qlora_kit.json").unlink()
    return out


def _copy(src: Path, dst: Path) -> Path:
    import shutil

    shutil.copytree(src, dst)
    return dst


def _ckpt(out: Path) -> Path:
    (path,) = (out / "checkpoints").iterdir()
    return path


def test_checkpoints_hold_no_pickle_that_needs_code(interrupted):
    ckpt = _ckpt(interrupted)
    assert not (ckpt / "rng.pt").exists()
    json.loads((ckpt / "rng.json").read_text())
    for name in ("optimizer.pt", "scheduler.pt"):
        torch.load(ckpt / name, weights_only=True)  # the safe unpickler reads them whole


@pytest.mark.parametrize("name", ["optimizer.pt", "scheduler.pt"])
def test_a_planted_pickle_in_a_checkpoint_does_not_run(interrupted, tmp_path, name):
    out = _copy(interrupted, tmp_path / "run")
    marker = tmp_path / "pwned"
    with (_ckpt(out) / name).open("wb") as fh:
        pickle.dump({"state": Plant(marker)}, fh)
    with pytest.raises(UsageError, match=f"{name} holds objects other than tensors"):
        _run(out, resume=True)
    assert not marker.exists()


def test_an_old_pickled_rng_file_is_refused_not_read(interrupted, tmp_path):
    out = _copy(interrupted, tmp_path / "run")
    marker = tmp_path / "pwned"
    ckpt = _ckpt(out)
    (ckpt / "rng.json").unlink()
    with (ckpt / "rng.pt").open("wb") as fh:
        pickle.dump(Plant(marker), fh)
    with pytest.raises(UsageError, match=r"rng\.pt"):
        _run(out, resume=True)
    assert not marker.exists()


@pytest.mark.parametrize(
    ("name", "content", "fragment"),
    [
        ("state.json", b'{"step": 2, "data"', "state.json is unreadable"),
        ("state.json", b"[1, 2]", "state.json is unreadable"),
        ("state.json", b"\xff\xfe\x00", "state.json is unreadable"),
        ("optimizer.pt", b"PK\x03\x04 truncated", "optimizer.pt is unreadable"),
        ("optimizer.pt", b"", "optimizer.pt is unreadable"),
        ("scheduler.pt", b"garbage", "scheduler.pt"),
        ("rng.json", b'{"python": [3, [1, 2], null], "numpy": [], "torch": []}', "rng.json is unreadable"),
        ("adapter_model.safetensors", b"\x08\x00\x00\x00\x00\x00\x00\x00{}", "adapter_model.safetensors"),
    ],
)
def test_corrupt_checkpoint_files_get_one_line(interrupted, tmp_path, name, content, fragment):
    out = _copy(interrupted, tmp_path / "run")
    (_ckpt(out) / name).write_bytes(content)
    with pytest.raises(UsageError, match=fragment) as info:
        _run(out, resume=True)
    assert "\n" not in str(info.value)


def test_a_truncated_adapter_in_a_checkpoint_gets_one_line(interrupted, tmp_path):
    out = _copy(interrupted, tmp_path / "run")
    path = _ckpt(out) / "adapter_model.safetensors"
    path.write_bytes(path.read_bytes()[:-100])
    with pytest.raises(UsageError, match=r"adapter_model\.safetensors is unreadable"):
        _run(out, resume=True)


def test_a_torn_last_metrics_line_is_dropped_and_a_corrupt_one_refused(interrupted, tmp_path):
    out = _copy(interrupted, tmp_path / "torn")
    with (out / "metrics.jsonl").open("a") as fh:
        fh.write('{"step": 3, "lo')
    _run(out, resume=True)
    assert sorted(losses(out)) == [1, 2, 3, 4]

    bad = _copy(interrupted, tmp_path / "bad")
    lines = (bad / "metrics.jsonl").read_text().splitlines()
    (bad / "metrics.jsonl").write_text("\n".join(["not json", *lines]) + "\n")
    with pytest.raises(UsageError, match="line 1 is not a metrics record"):
        _run(bad, resume=True)


@pytest.mark.parametrize(("key", "value"), [("lora.rank", 4), ("train.micro_batch", 2), ("data.max_seq_len", 48)])
def test_resume_refuses_a_recipe_that_changed_what_was_trained(interrupted, tmp_path, key, value):
    out = _copy(interrupted, tmp_path / "run")
    section, name = key.split(".")
    kw = {"train": {name: value}} if section == "train" else {"train": {key: value}}
    with pytest.raises(UsageError, match=f"{key} is {value}") as info:
        _run(out, resume=True, **kw)
    assert f"--set {key}=" in info.value.hint


class _SignalAt:
    """Send SIGINT to this process at the ``at``-th occurrence of ``moment`` during training."""

    def __init__(self, monkeypatch, moment: str, at: int) -> None:
        self.moment, self.at, self.seen = moment, at, 0
        from qlora_kit.model import savers
        from qlora_kit.train import optim

        real_loss, real_opt = savers.causal_lm_loss, optim.make_optimizer

        def loss(*args, **kw):
            self._tick("forward")
            value = real_loss(*args, **kw)
            self._tick("after-forward")
            return value

        def optimizer(*args, **kw):
            opt = real_opt(*args, **kw)
            real_step = type(opt).step

            def step(this, *a, **k):
                self._tick("before-step")
                result = real_step(this, *a, **k)
                self._tick("after-step")
                return result

            monkeypatch.setattr(type(opt), "step", step)  # on the class: the scheduler wraps the bound method
            return opt

        monkeypatch.setattr(savers, "causal_lm_loss", loss)
        monkeypatch.setattr(optim, "make_optimizer", optimizer)

    def _tick(self, moment: str) -> None:
        if moment == self.moment:
            self.seen += 1
            if self.seen == self.at:
                os.kill(os.getpid(), signal.SIGINT)


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("full") / "run"
    _run(out)
    return out


@pytest.mark.parametrize(
    ("moment", "at"),
    [
        ("forward", 1),  # the first micro-batch of step 1
        ("forward", 4),  # the second micro-batch of step 2 (mid-accumulation)
        ("after-forward", 5),  # between forward and backward, step 3
        ("before-step", 2),  # gradients complete, weights not yet updated
        ("after-step", 3),  # weights updated, the scheduler not yet
    ],
)
def test_ctrl_c_at_any_moment_resumes_exactly(uninterrupted, tmp_path, monkeypatch, moment, at):
    from qlora_kit.train.loop import Interrupted

    out = tmp_path / "run"
    with monkeypatch.context() as m:
        _SignalAt(m, moment, at)
        with pytest.raises(Interrupted, match="checkpoint saved"):
            _run(out)
    assert not (out / "qlora_kit.json").exists()
    _run(out, resume=True)
    assert losses(out) == losses(uninterrupted)
    a = load_file(str(uninterrupted / "adapter_model.safetensors"))
    b = load_file(str(out / "adapter_model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_a_second_ctrl_c_stops_at_once_without_saving(tmp_path, monkeypatch):
    from qlora_kit.train.loop import Interrupted

    out = tmp_path / "run"

    class Twice(_SignalAt):
        def _tick(self, moment: str) -> None:
            if moment == "forward":
                self.seen += 1
                if self.seen == 3:
                    os.kill(os.getpid(), signal.SIGINT)
                    os.kill(os.getpid(), signal.SIGINT)

    with monkeypatch.context() as m:
        Twice(m, "forward", 0)
        with pytest.raises(Interrupted, match="nothing saved"):
            _run(out)
    assert not (out / "checkpoints").exists() or not list((out / "checkpoints").iterdir())
