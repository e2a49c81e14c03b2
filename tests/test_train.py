"""qlora-kit train end to end on CPU with real bitsandbytes 4-bit and 8-bit bases."""

from __future__ import annotations

import json
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from qlora_kit.train.outputs import SilentReporter

ROOT = Path(__file__).resolve().parent.parent
Quiet = SilentReporter
DEMO = ROOT / "recipes" / "tiny" / "cpu_demo.yaml"


def demo_recipe(out: Path, **train):
    from qlora_kit.recipe import load_recipe

    overrides = {
        "train.output_dir": str(out),
        "train.max_steps": 12,
        "train.micro_batch": 4,
        "train.logging_steps": 1,
        "train.save_steps": 0,
        "train.eval_steps": 0,
        "train.warmup_steps": 0,
        "data.max_seq_len": 32,
        "train.lr": 0.01,
    }
    overrides.update({k if "." in k else f"train.{k}": v for k, v in train.items()})
    return load_recipe(DEMO, [f"{k}={v}" for k, v in overrides.items()])


def losses(out: Path) -> dict[int, float]:
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["loss"] for r in rows}


@pytest.mark.parametrize("quant", ["nf4", "int8"])
def test_training_lowers_the_loss_and_the_adapter_reloads_with_peft(tmp_path, quant):
    import torch
    from peft import PeftModel

    from qlora_kit.model.load import load_base
    from qlora_kit.recipe import ModelSpec, QuantSpec
    from qlora_kit.train.loop import train

    recipe = demo_recipe(tmp_path / "run", **{"quant.mode": quant, "quant.double_quant": quant == "nf4"})
    result = train(recipe, Quiet())
    out = tmp_path / "run"
    curve = losses(out)
    assert len(curve) == 12 and all(
        set(json.loads(line)) >= {"step", "loss", "lr"} for line in (out / "metrics.jsonl").read_text().splitlines()
    )
    first, last = sum(curve[s] for s in (1, 2, 3)) / 3, sum(curve[s] for s in (10, 11, 12)) / 3
    assert last < first - 0.2, curve
    for name in ("adapter_config.json", "adapter_model.safetensors", "qlora_kit.json", "tokenizer.json"):
        assert (out / name).is_file(), name
    meta = json.loads((out / "qlora_kit.json").read_text())
    assert meta["quant"]["mode"] == quant and len(meta["base_config_sha256"]) == 64
    # a plain peft user reloads it: base quantized the same way + PeftModel.from_pretrained
    base = load_base(ModelSpec(name=meta["base_model"]), QuantSpec(mode=quant, compute_dtype="fp32"))
    reloaded = PeftModel.from_pretrained(base, out).eval()
    trained = result.model.eval()
    ids = torch.randint(0, 512, (2, 24), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected, got = trained(input_ids=ids).logits, reloaded(input_ids=ids).logits
        plain = base.get_base_model()(input_ids=ids).logits if hasattr(base, "get_base_model") else None
    assert torch.allclose(expected, got, atol=1e-5), (expected - got).abs().max()
    del plain


def test_resumed_run_reproduces_the_uninterrupted_losses(tmp_path):
    from qlora_kit.train.loop import train

    full = tmp_path / "full"
    train(demo_recipe(full, max_steps=6, save_steps=3), Quiet())
    resumed = tmp_path / "resumed"
    shutil.copytree(full, resumed)
    for path in resumed.iterdir():  # keep only what a run interrupted after step 3 would have
        if path.name not in ("checkpoints", "metrics.jsonl", "random-init-base"):
            path.unlink() if path.is_file() else shutil.rmtree(path)
    assert [p.name for p in (resumed / "checkpoints").iterdir()] == ["step-000003"]
    train(demo_recipe(resumed, max_steps=6, save_steps=3), Quiet(), resume=True)
    a, b = losses(full), losses(resumed)
    assert sorted(b) == [1, 2, 3, 4, 5, 6]
    for step in (4, 5, 6):
        assert abs(a[step] - b[step]) <= 1e-6, (step, a[step], b[step])


def _cli(*args, **kw):
    return subprocess.run([sys.executable, "-m", "qlora_kit", *args], capture_output=True, text=True, timeout=300, **kw)


def test_ctrl_c_saves_a_checkpoint_and_exits_cleanly(tmp_path):
    out = tmp_path / "run"
    cmd = [
        sys.executable,
        "-m",
        "qlora_kit",
        "train",
        str(DEMO),
        "--set",
        f"train.output_dir={out}",
        "--set",
        "train.max_steps=5000",
        "--set",
        "train.save_steps=0",
        "--set",
        "train.logging_steps=1",
        "--set",
        "data.max_seq_len=32",
        "--set",
        "train.micro_batch=4",
    ]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 240
    while time.time() < deadline:
        metrics = out / "metrics.jsonl"
        if metrics.exists() and len(metrics.read_text().splitlines()) >= 3:
            break
        time.sleep(0.2)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err
    assert "Traceback" not in err and "interrupted after step" in err and "--resume" in err
    (ckpt,) = list((out / "checkpoints").iterdir())
    state = json.loads((ckpt / "state.json").read_text())
    assert state["step"] >= 3 and (ckpt / "adapter_model.safetensors").is_file()
    assert not (out / "qlora_kit.json").exists(), "an interrupted run must not look complete"


@pytest.mark.parametrize(
    ("sets", "fragment"),
    [
        (["data.path=/no/such/file.jsonl"], "/no/such/file.jsonl"),
        (["data.text_field=body"], "body"),
        (["lora.rnak=4"], "did you mean lora.rank"),
        (["quant.mode=int3"], "quant.mode"),
    ],
)
def test_bad_recipes_and_data_get_one_line(tmp_path, sets, fragment):
    args = ["train", str(DEMO), "--set", f"train.output_dir={tmp_path / 'run'}"]
    for s in sets:
        args += ["--set", s]
    out = _cli(*args)
    assert out.returncode == 2, out.stderr
    lines = [line for line in out.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and fragment in lines[0] and "Traceback" not in out.stderr, out.stderr


def test_resume_needs_a_checkpoint_and_a_rerun_needs_consent(tmp_path):
    from qlora_kit.errors import UsageError
    from qlora_kit.train.loop import train

    out = tmp_path / "run"
    with pytest.raises(UsageError, match="no complete checkpoint"):
        train(demo_recipe(out, max_steps=2), Quiet(), resume=True)
    train(demo_recipe(out, max_steps=2), Quiet())
    with pytest.raises(UsageError, match="holds a previous run"):
        train(demo_recipe(out, max_steps=2), Quiet())


def test_only_the_last_k_checkpoints_are_kept(tmp_path):
    from qlora_kit.train.loop import train

    out = tmp_path / "run"
    train(demo_recipe(out, max_steps=6, save_steps=1, save_total_limit=2), Quiet())
    kept = sorted(p.name for p in (out / "checkpoints").iterdir())
    assert kept == ["step-000004", "step-000005"], kept  # the final step is the adapter itself
