"""Contexts past the native one: --rope-scaling in the planner, the recipe, loading and training; --max-seq."""

from __future__ import annotations

import dataclasses
import json
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import TINY_LLAMA

from qlora_kit.catalog import context
from qlora_kit.catalog.gpus import resolve_gpu
from qlora_kit.catalog.models import lookup
from qlora_kit.catalog.readers import arch_from_config
from qlora_kit.errors import UsageError
from qlora_kit.plan.maxseq import STEP, longest_context
from qlora_kit.plan.recipes import from_plan, to_constraints
from qlora_kit.plan.search import Constraints, plan, plan_json
from qlora_kit.recipe import DEFAULT_DATA, build_recipe, dump_recipe, load_recipe

ROOT = Path(__file__).resolve().parent.parent
TINY_DEMO = ROOT / "qlora_kit" / "resources" / "tiny-demo"
TINY_GPT2 = {"model_type": "gpt2", "n_embd": 64, "n_layer": 1, "n_head": 2, "vocab_size": 256, "n_positions": 64}


def cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "qlora_kit", *args], capture_output=True, text=True, timeout=120)


# -- the planner ---------------------------------------------------------------------------------------


def test_a_sequence_past_the_context_is_refused_naming_the_flag() -> None:
    with pytest.raises(UsageError) as info:
        plan(lookup("llama-3-8b"), resolve_gpu("24GB"), Constraints(seq_len=16384))
    assert "8192" in info.value.message and "--rope-scaling" in info.value.hint and "2.00x" in info.value.hint
    out = cli("plan", "--model", "llama-3-8b", "--seq-len", "16384")
    assert out.returncode == 2 and out.stdout == ""
    assert len(out.stderr.strip().splitlines()) == 1 and "--rope-scaling=linear|dynamic|yarn" in out.stderr


def test_learned_positions_cannot_be_stretched() -> None:
    with pytest.raises(UsageError) as info:
        plan(lookup("opt-1.3b"), resolve_gpu("24GB"), Constraints(seq_len=4096))
    assert "--rope-scaling" not in info.value.hint.split("(")[0] and "learned" in info.value.hint
    with pytest.raises(UsageError, match="not RoPE"):
        plan(lookup("opt-1.3b"), resolve_gpu("24GB"), Constraints(seq_len=4096, rope_scaling="linear"))


def test_a_model_that_already_scales_rope_is_not_stretched_again() -> None:
    config = {
        **lookup("llama-3.1-8b").config,
        "max_position_embeddings": 8192,
        "rope_scaling": {"rope_type": "llama3", "factor": 8.0, "original_max_position_embeddings": 8192},
    }
    arch = arch_from_config(config, "scaled")
    with pytest.raises(UsageError, match=r"already scales RoPE \(llama3\)"):
        plan(arch, resolve_gpu("80GB"), Constraints(seq_len=16384, rope_scaling="yarn"))


@pytest.mark.parametrize("kind", ["linear", "dynamic", "yarn"])
def test_rope_scaling_plans_the_longer_context_and_writes_it_into_the_recipe(kind: str) -> None:
    arch, device = lookup("llama-3-8b"), resolve_gpu("80GB")
    p = plan(arch, device, Constraints(seq_len=16384, rope_scaling=kind))
    assert p.fits and p.best.setup.seq_len == 16384 and p.rope_scaling == kind
    assert f"context 16384 tokens: {kind} RoPE scaling, factor 2.00 over the native 8192" in p.reasons
    assert plan_json(p)["rope_scaling"] == kind
    rec = from_plan(p, "llama-3-8b", DEFAULT_DATA)
    assert rec.model.rope_scaling == kind and rec.data.max_seq_len == 16384
    back = to_constraints(rec)
    assert (back.rope_scaling, back.seq_len) == (kind, 16384)
    again = plan(arch, device, back)
    assert again.best.estimate.device_bytes == p.best.estimate.device_bytes


def test_within_the_native_context_the_scaling_is_not_applied() -> None:
    p = plan(lookup("llama-3-8b"), resolve_gpu("80GB"), Constraints(seq_len=4096, rope_scaling="yarn"))
    assert p.rope_scaling == "none"
    assert any("not applied" in r for r in p.reasons)


def test_the_recipe_key_is_checked_and_round_trips(tmp_path: Path) -> None:
    with pytest.raises(UsageError, match=r"model\.rope_scaling must be one of none, linear, dynamic, yarn"):
        build_recipe({"model": {"name": "x", "rope_scaling": "ntk"}})
    rec = build_recipe({"model": {"name": "x", "rope_scaling": "yarn"}, "data": {"max_seq_len": 4096}})
    path = tmp_path / "r.yaml"
    path.write_text(dump_recipe(rec))
    assert load_recipe(path).model.rope_scaling == "yarn"
    assert build_recipe({"model": {"name": "x"}}).model.rope_scaling == "none"


def test_rope_parameters_carry_the_keys_transformers_reads() -> None:
    current = {"rope_theta": 5e5, "partial_rotary_factor": 0.5, "rope_type": "default"}
    assert context.rope_parameters("linear", 4096, 1024, current) == {
        "rope_theta": 5e5,
        "partial_rotary_factor": 0.5,
        "rope_type": "linear",
        "factor": 4.0,
    }
    yarn = context.rope_parameters("yarn", 3000, 2048, {"rope_theta": 1e4})
    assert yarn == {
        "rope_theta": 1e4,
        "rope_type": "yarn",
        "factor": 3000 / 2048,
        "original_max_position_embeddings": 2048,
    }
    assert context.rope_factor(100, 2048) == 1.0


# -- --max-seq -----------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("model", "gpu", "constraints"),
    [
        ("llama-3.1-8b", "12GB", Constraints()),
        ("llama-3.1-8b", "24GB", Constraints(batch_size=4, grad_ckpt=False)),
        ("llama-3-8b", "24GB", Constraints(rope_scaling="yarn")),
        ("mistral-7b", "16GB", Constraints(quant="nf4", targets="all-linear", chunked_loss=False)),
        ("bloom-560m", "8GB", Constraints()),
    ],
)
def test_max_seq_fits_and_one_step_more_does_not(model: str, gpu: str, constraints: Constraints) -> None:
    arch, device = lookup(model), resolve_gpu(gpu)
    found = longest_context(arch, device, constraints)
    assert not found.capped and found.seq_len % STEP == 0 and found.seq_len > STEP
    assert found.plan.fits and found.plan.best.setup.seq_len == found.seq_len
    longer = plan(arch, device, dataclasses.replace(constraints, seq_len=found.seq_len + STEP))
    assert not longer.fits
    assert found.plan.reasons[0].startswith(f"--max-seq: {found.seq_len} tokens is the longest context")
    for knob in ("batch_size", "grad_ckpt", "quant", "targets", "chunked_loss"):
        fixed = getattr(constraints, knob)
        if fixed is not None:
            chosen = found.plan.best.targets_label if knob == "targets" else getattr(found.plan.best.setup, knob)
            assert chosen == fixed, knob


def test_max_seq_stops_at_the_native_context_when_it_all_fits() -> None:
    found = longest_context(lookup("opt-1.3b"), resolve_gpu("80GB"), Constraints())
    assert found.capped and found.seq_len == 2048 and found.plan.fits
    assert "whole native context" in found.plan.reasons[0] and "--rope-scaling" not in found.plan.reasons[0]


def test_max_seq_when_nothing_fits_says_so() -> None:
    found = longest_context(lookup("llama-2-70b"), resolve_gpu("8GB"), Constraints())
    assert not found.plan.fits and found.seq_len == STEP and "nothing fits" in found.plan.reasons[0]


def test_max_seq_on_the_command_line() -> None:
    out = cli("plan", "--model", "llama-3-8b", "--gpu", "24GB", "--max-seq", "--rope-scaling", "yarn", "--json")
    assert out.returncode == 0, out.stderr
    data = json.loads(out.stdout)
    assert data["max_seq"]["seq_len"] == data["choice"]["seq_len"] > 8192 and data["rope_scaling"] == "yarn"
    for args, fragment in (
        (("--max-seq", "--seq-len", "512"), "--seq-len sets it"),
        (("--max-seq", "--sweep", "rank=4,8"), "--sweep several"),
    ):
        bad = cli("plan", "--model", "opt-1.3b", *args)
        assert bad.returncode == 2 and len(bad.stderr.strip().splitlines()) == 1 and fragment in bad.stderr


# -- loading and training ------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["linear", "dynamic", "yarn"])
def test_the_loaded_model_carries_the_scaling_and_runs_past_the_native_context(tiny_model_dir, kind: str) -> None:
    import torch

    from qlora_kit.model.load import load_base
    from qlora_kit.recipe import ModelSpec, QuantSpec

    path = tiny_model_dir(TINY_LLAMA)  # native context 128
    plain = QuantSpec(mode="none", double_quant=False, compute_dtype="fp32")
    default = load_base(ModelSpec(name=str(path)), plain, seq_len=256)
    model = load_base(ModelSpec(name=str(path), rope_scaling=kind), plain, seq_len=256)
    params = model.config.rope_parameters
    assert params["rope_type"] == kind and params["factor"] == 2.0
    assert params.get("original_max_position_embeddings") == (128 if kind == "yarn" else None)
    assert model.config.max_position_embeddings == 128  # the native length: dynamic scaling reads it
    assert default.config.rope_parameters["rope_type"] == "default"
    rotary, base_rotary = model.model.rotary_emb, default.model.rotary_emb
    assert rotary.rope_type == kind
    if kind == "linear":
        assert torch.allclose(rotary.inv_freq, base_rotary.inv_freq / 2)
    ids = torch.randint(0, 256, (1, 256), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.isfinite(model(input_ids=ids).logits).all()
    within = load_base(ModelSpec(name=str(path), rope_scaling=kind), plain, seq_len=128)
    assert within.config.rope_parameters["rope_type"] == "default"  # nothing to stretch


def test_loading_refuses_what_cannot_be_stretched(tiny_model_dir, tmp_path: Path) -> None:
    from qlora_kit.model.load import stretched_config
    from qlora_kit.recipe import ModelSpec

    gpt2 = tiny_model_dir(TINY_GPT2)
    with pytest.raises(UsageError, match="no rotary position embeddings"):
        stretched_config(ModelSpec(name=str(gpt2), rope_scaling="yarn"), 128)
    scaled = tmp_path / "scaled"
    scaled.mkdir()
    llama = json.loads((tiny_model_dir(TINY_LLAMA) / "config.json").read_text())
    llama["rope_parameters"] = {"rope_type": "linear", "factor": 2.0, "rope_theta": 10000.0}
    (scaled / "config.json").write_text(json.dumps(llama))
    with pytest.raises(UsageError, match=r"already scales RoPE \(linear\)"):
        stretched_config(ModelSpec(name=str(scaled), rope_scaling="yarn"), 256)


def test_train_preflight_names_the_recipe_keys(tiny_model_dir) -> None:
    from qlora_kit.train.preflight import check_context

    def recipe(rope: str, seq: int):
        return build_recipe({"model": {"name": "x", "rope_scaling": rope}, "data": {"max_seq_len": seq}})

    llama, gpt2 = str(tiny_model_dir(TINY_LLAMA)), str(tiny_model_dir(TINY_GPT2))
    with pytest.raises(UsageError) as info:
        check_context(recipe("none", 256), llama)
    assert "data.max_seq_len=256" in info.value.message and "model.rope_scaling=" in info.value.hint
    check_context(recipe("yarn", 256), llama)
    with pytest.raises(UsageError, match="not RoPE"):
        check_context(recipe("linear", 128), gpt2)


def test_training_past_the_native_context_with_yarn(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A tiny llama whose native context is 32 trains on packed 64-token rows with yarn: the model that
    trains carries the scaling, and its rotary embedding sees positions past 32."""
    import qlora_kit.model.load as load
    from qlora_kit.train.loop import train
    from qlora_kit.train.outputs import SilentReporter

    base = tmp_path / "base"
    base.mkdir()
    for f in TINY_DEMO.iterdir():
        (base / f.name).write_bytes(f.read_bytes())
    config = json.loads((TINY_DEMO / "config.json").read_text())
    (base / "config.json").write_text(json.dumps({**config, "max_position_embeddings": 32}))
    seen: list[int] = []
    real_load = load.load_base

    def load_and_watch(*args, **kwargs):
        model = real_load(*args, **kwargs)

        def watch(module, args, kwargs, out):
            positions = kwargs.get("position_ids", args[1] if len(args) > 1 else None)
            seen.append(int(positions.max()) + 1)

        model.model.rotary_emb.register_forward_hook(watch, with_kwargs=True)
        return model

    monkeypatch.setattr(load, "load_base", load_and_watch)
    sets = {
        "model.name": str(base),
        "model.random_init": True,
        "model.rope_scaling": "yarn",
        "quant.mode": "nf4",
        "quant.compute_dtype": "fp32",
        "data.path": "builtin:quotes",
        "data.text_field": "quote",
        "data.packing": True,
        "data.max_seq_len": 64,
        "train.output_dir": str(tmp_path / "run"),
        "train.max_steps": 2,
        "train.micro_batch": 2,
        "train.grad_accum": 1,
    }
    sections = ("model", "quant", "data", "train")
    recipe = build_recipe({s: {k.split(".")[1]: v for k, v in sets.items() if k.startswith(s + ".")} for s in sections})
    result = train(recipe, SilentReporter())
    params = result.model.get_base_model().config.rope_parameters
    assert params["rope_type"] == "yarn" and params["factor"] == 2.0
    assert params["original_max_position_embeddings"] == 32
    assert max(seen) == 64  # positions 0..63 went through the stretched rotary embedding
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert len(rows) == 2 and all(r["loss"] == r["loss"] and r["loss"] < 100 for r in rows)
    _generate_loads_the_stretched_base(tmp_path / "run", result.model)
    _the_export_carries_the_stretch(tmp_path / "run", result.model, tmp_path)


def _generate_loads_the_stretched_base(run: Path, trained) -> None:
    """generate/eval load the adapter's base stretched as training did: the same logits at every position;
    the base loaded unstretched gives others (so the comparison can fail)."""
    import torch
    from peft import PeftModel

    from qlora_kit.adapter import read_metadata
    from qlora_kit.infer.load import load_for_inference
    from qlora_kit.model.load import load_base
    from qlora_kit.recipe import ModelSpec, QuantSpec

    loaded, _, _ = load_for_inference(adapter=str(run))
    ids = torch.randint(3, 512, (1, 64), generator=torch.Generator().manual_seed(0))
    meta = read_metadata(run)
    assert meta is not None and meta.recipe_section("model")["rope_scaling"] == "yarn"
    plain = PeftModel.from_pretrained(
        load_base(ModelSpec(name=str(meta.base_model)), QuantSpec(mode="nf4", compute_dtype="fp32")), run
    ).eval()
    with torch.no_grad():
        expected = trained.eval()(input_ids=ids).logits
        got, unstretched = loaded(input_ids=ids).logits, plain(input_ids=ids).logits
    assert torch.allclose(expected, got, atol=1e-4), (expected - got).abs().max()
    assert not torch.allclose(expected, unstretched, atol=1e-3)


def _the_export_carries_the_stretch(run: Path, trained, tmp_path: Path) -> None:
    """The merged export's config.json stretches RoPE as training did, so plain transformers computes the
    trained model's logits at positions past the native context; the GGUF export refuses in one line."""
    import torch
    from transformers import AutoModelForCausalLM

    from qlora_kit.export.gguf import export_gguf
    from qlora_kit.export.run import export

    summary = export(run, tmp_path / "merged", dtype="fp32")
    config = json.loads((tmp_path / "merged" / "config.json").read_text())
    assert config["rope_parameters"]["rope_type"] == "yarn" and config["rope_parameters"]["factor"] == 2.0
    assert config["rope_parameters"]["original_max_position_embeddings"] == 32 and "rope_scaling" not in config
    assert summary["verification"]["max_abs_diff"] < 1e-3, summary["verification"]
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "merged", dtype=torch.float32).eval()
    ids = torch.randint(3, 512, (1, 64), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected, got = trained.eval()(input_ids=ids).logits, merged(input_ids=ids).logits
    assert torch.allclose(expected, got, atol=1e-3), (expected - got).abs().max()
    with pytest.raises(UsageError, match=r"RoPE stretched \(yarn, factor 2.0\).*GGUF"):
        export_gguf(run, tmp_path / "model.gguf")
    assert not (tmp_path / "model.gguf").exists()
