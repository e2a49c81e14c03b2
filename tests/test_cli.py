"""The qlora-kit command end to end, in a subprocess, as a user runs it."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from qlora_kit.recipe import load_recipe

DEMO = str(Path(__file__).resolve().parent.parent / "recipes" / "tiny" / "cpu_demo.yaml")


def run(*args: str, cwd=None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "qlora_kit", *args], capture_output=True, text=True, cwd=cwd, timeout=60
    )


def test_plan_prints_breakdown_choice_and_reasons():
    out = run("plan", "--model", "opt-6.7b", "--gpu", "24GB")
    assert out.returncode == 0, out.stderr
    for text in (
        "facebook/opt-6.7b",
        "activations kept for backward",
        "on the device",
        "chosen settings",
        "runners-up",
    ):
        assert text in out.stdout


def test_plan_json_is_one_object_with_the_schema():
    out = run("plan", "--model", "facebook/opt-6.7b", "--gpu", "rtx4090", "--quant", "nf4", "--json")
    data = json.loads(out.stdout)
    assert data["choice"]["quant"] == "nf4" and data["fits"] is True
    assert data["device_bytes"] == data["peak_reserved_bytes"] + data["breakdown"]["cuda_context"]
    assert data["peak_allocated_bytes"] == sum(
        v for k, v in data["breakdown"].items() if k not in ("allocator_slack", "cuda_context")
    )


def test_plan_does_not_import_torch_transformers_or_bitsandbytes():
    code = (
        "import sys; from qlora_kit.cli import main; rc = main(['plan', '--model', 'opt-6.7b', '--gpu', '24GB',"
        " '--json']); heavy = [m for m in ('torch', 'transformers', 'bitsandbytes', 'peft', 'datasets',"
        " 'accelerate') if m in sys.modules]; print('HEAVY', heavy); sys.exit(rc)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert "HEAVY []" in out.stdout


def test_write_recipe_writes_a_valid_recipe(tmp_path):
    path = tmp_path / "r" / "opt.yaml"
    out = run("plan", "--model", "opt-1.3b", "--gpu", "24GB", "--write-recipe", str(path), "--data", "quotes.jsonl")
    assert out.returncode == 0, out.stderr
    recipe = load_recipe(path)
    assert recipe.model.name == "facebook/opt-1.3b" and recipe.data.path == "quotes.jsonl"
    assert path.read_text().startswith("# qlora-kit recipe")
    assert [p.name for p in path.parent.iterdir()] == ["opt.yaml"]  # no temporary file left behind
    replan = run("plan", "--recipe", str(path), "--gpu", "24GB", "--json")
    assert json.loads(replan.stdout)["choice"]["batch_size"] == recipe.train.micro_batch


def test_models_and_gpus_list_the_tables():
    models = run("models")
    assert models.returncode == 0 and "facebook/opt-6.7b" in models.stdout and "Qwen/Qwen3-8B" in models.stdout
    gpus = run("gpus")
    assert gpus.returncode == 0 and "RTX 4090" in gpus.stdout and "H100" in gpus.stdout


def test_nothing_fits_exits_non_zero_with_advice():
    out = run("plan", "--model", "Llama-2-70b-hf", "--gpu", "8GB")
    assert out.returncode == 3
    assert "nothing fits" in out.stdout and "bigger card" in out.stdout


@pytest.mark.parametrize(
    ("args", "fragment"),
    [
        (["plan", "--model", "opt-6.8b"], "did you mean facebook/opt-6.7b"),
        (["plan", "--model", "opt-6.7b", "--gpu", "24XB"], "cannot read memory size"),
        (["plan", "--model", "opt-6.7b", "--rank", "-4"], "--rank must be a positive integer"),
        (["plan", "--model", "opt-6.7b", "--seq-len", "9000"], "longer than facebook/opt-6.7b allows (2048)"),
        (["plan", "--model", "opt-6.7b", "--quant", "int8", "--double-quant"], "contradicts"),
        (["plan", "--model", "opt-6.7b", "--quant", "int3"], "invalid choice"),
        (["plan", "--model", "opt-6.7b", "--rank", "many"], "invalid int value"),
        (["plan", "--gpu", "24GB"], "plan needs --model"),
        (["plan", "--recipe", "missing.yaml"], "cannot read recipe"),
        (["plan", "--model", "no/such-model-here"], "could not be fetched"),
        (["frobnicate"], "invalid choice"),
        (["plan", "--model", "opt-125m", "--write-recipe", "/proc/no/such/dir/r.yaml"], "check the path"),
        (
            [
                "train",
                DEMO,
                "--set",
                "model.name=/no/such/model",
                "--set",
                "model.random_init=false",
                "--set",
                "train.output_dir=/tmp/qlora-kit-test-never-written",
            ],
            "model directory /no/such/model does not exist",
        ),
        (["export", "--adapter", "/no/such/adapter", "--out", "/tmp/never-written"], "does not exist"),
        (["train", DEMO, "--resume", "--set", "train.output_dir=/no/such/run"], "no complete checkpoint"),
    ],
)
def test_bad_input_gets_one_line_and_non_zero_exit(args, fragment, monkeypatch):
    monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:9")  # discard port: nothing listens, no network
    out = run(*args)
    assert out.returncode != 0
    assert "Traceback" not in out.stderr
    lines = [line for line in out.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, out.stderr
    assert fragment in lines[0]


def test_bad_recipe_reports_every_problem_with_lines(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("model:\n  name: opt-125m\nlora:\n  rnak: 8\n  dropout: high\ntrain:\n  micro_batch: 0\n")
    out = run("plan", "--recipe", str(path))
    assert out.returncode == 2 and "Traceback" not in out.stderr
    msg = out.stderr
    assert "3 problems" in msg and "lora.rnak" in msg and "line 4" in msg and "did you mean lora.rank" in msg
    assert "lora.dropout (line 5) must be a number" in msg and "train.micro_batch (line 7) must be positive" in msg
