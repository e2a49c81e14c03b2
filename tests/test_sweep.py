"""``qlora-kit plan --sweep KNOB=V1,V2,...``: one plan per value, side by side; bad specs get one line."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from qlora_kit.catalog.gpus import resolve_gpu
from qlora_kit.catalog.models import resolve_model
from qlora_kit.errors import UsageError
from qlora_kit.plan.memory import estimate
from qlora_kit.plan.search import Constraints
from qlora_kit.plan.sweep import parse_sweep, run_sweep

LLAMA = "meta-llama/Llama-2-7b-hf"


def run(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "qlora_kit", *args], capture_output=True, text=True, timeout=60)


def test_parse_sweep_reads_values_and_aliases():
    s = parse_sweep("rank=4,8,16")
    assert (s.knob, s.values, s.labels) == ("rank", (4, 8, 16), ("4", "8", "16"))
    assert parse_sweep("seq-len=512,1024").knob == "seq"
    assert parse_sweep("grad-ckpt=off,on").values == (False, True)
    assert parse_sweep("upcast=all,selective").values == ("all", "selective")


@pytest.mark.parametrize(
    ("spec", "words"),
    [
        ("rank", "not KNOB=V1"),
        ("rnk=4,8", "unknown knob 'rnk'"),
        ("rank=", "one or more"),
        ("rank=4,,8", "one or more"),
        ("rank=4,x", "'x' is not valid"),
        ("rank=0", "'0' is not valid"),
        ("quant=nf5", "'nf5' is not valid"),
        ("chunked-loss=maybe", "'maybe' is not valid"),
        ("rank=4,4", "repeats"),
    ],
)
def test_bad_sweep_specs_raise_one_usage_error(spec, words):
    with pytest.raises(UsageError) as err:
        parse_sweep(spec)
    assert words in str(err.value)


def test_each_row_is_the_plan_of_that_value():
    """A row equals planning with the value fixed by hand; memory grows with the rank (LoRA terms)."""
    arch, gpu = resolve_model(LLAMA), resolve_gpu("24GB")
    base = Constraints(quant="nf4", grad_ckpt=True, batch_size=1, seq_len=1024)
    result = run_sweep(arch, gpu, base, parse_sweep("rank=4,16,64"))
    peaks = [p.best.estimate.peak_allocated_bytes for p in result.plans]
    assert [p.best.setup.rank for p in result.plans] == [4, 16, 64]
    assert peaks == sorted(peaks) and len(set(peaks)) == 3
    alone = estimate(arch, result.plans[1].best.setup)
    assert alone.peak_allocated_bytes == peaks[1]


@pytest.mark.parametrize(
    ("knob", "grad_ckpt"),
    [("chunked-loss=off,on", False), ("upcast=all,selective", False), ("offload-ckpt=off,on", True)],
)
def test_savers_sweep_shows_their_savings(knob, grad_ckpt):
    """Each saver lowers the device bytes of an otherwise equal setting where its term decides the peak
    (the logits at backward's start without checkpointing; the checkpoints with it)."""
    arch, gpu = resolve_model(LLAMA), resolve_gpu("80GB")
    base = Constraints(
        quant="nf4", grad_ckpt=grad_ckpt, batch_size=4, seq_len=2048, optimizer="adamw", targets="default"
    )
    off, on = run_sweep(arch, gpu, base, parse_sweep(knob)).plans
    assert on.best.setup == off.best.setup.with_(
        **{k: getattr(on.best.setup, k) for k in ("upcast", "chunked_loss", "offload_ckpt")}
    )
    assert on.best.estimate.device_bytes < off.best.estimate.device_bytes
    assert off.best.estimate.host_bytes == 0
    if knob.startswith("offload"):  # every layer's input, fp32 after peft's upcast
        assert on.best.estimate.host_bytes == arch.num_layers * 4 * 2048 * arch.hidden_size * 4


def test_cli_sweep_table_and_json():
    out = run("plan", "--model", LLAMA, "--gpu", "24GB", "--quant", "nf4", "--sweep", "rank=4,8,16,32,64")
    assert out.returncode == 0, out.stderr
    assert "sweeping rank" in out.stdout and "device GiB" in out.stdout
    assert all(f"│ {r:>4} │" in out.stdout for r in (4, 8, 16, 32, 64))
    out = run("plan", "--model", LLAMA, "--gpu", "24GB", "--sweep", "batch=1,2", "--json")
    data = json.loads(out.stdout)
    assert data["sweep"] == "batch" and [r["value"] for r in data["rows"]] == ["1", "2"]
    assert [r["choice"]["batch_size"] for r in data["rows"]] == [1, 2]
    assert all({"fits", "device_bytes", "peak_allocated_bytes", "host_bytes"} <= set(r) for r in data["rows"])


def test_cli_bad_sweep_is_one_line():
    out = run("plan", "--model", LLAMA, "--gpu", "24GB", "--sweep", "rank=4,x")
    assert out.returncode != 0 and "Traceback" not in out.stderr
    assert len(out.stderr.strip().splitlines()) == 1 and "--sweep rank" in out.stderr


def test_cli_saver_flags_change_the_plan():
    """--chunked-loss, --upcast selective and --offload-ckpt reach the planner; offloading without
    checkpointing is one line."""
    base = ["plan", "--model", LLAMA, "--gpu", "80GB", "--quant", "nf4", "--batch-size", "4", "--json"]
    plain = json.loads(run(*base, "--grad-ckpt", "off").stdout)
    chunked = json.loads(run(*base, "--grad-ckpt", "off", "--chunked-loss").stdout)
    assert chunked["breakdown"]["logits_loss"] < plain["breakdown"]["logits_loss"]
    selective = json.loads(run(*base, "--grad-ckpt", "off", "--upcast", "selective").stdout)
    assert selective["breakdown"]["other_params"] * 2 == plain["breakdown"]["other_params"]
    offload = json.loads(run(*base, "--grad-ckpt", "on", "--offload-ckpt").stdout)
    assert offload["host_bytes"] > 0
    out = run(*base, "--grad-ckpt", "off", "--offload-ckpt")
    assert out.returncode != 0 and len(out.stderr.strip().splitlines()) == 1 and "--grad-ckpt" in out.stderr
