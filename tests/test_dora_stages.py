"""DoRA (``lora.variant: dora``) and rsLoRA (``lora.rslora``) at every stage: the recipe keys and what they
refuse, ``plan --dora/--rslora``, DoRA's memory terms against real CPU steps (the calibration grid's
measurement, ``qlora_kit.measure``), and a DoRA run trained, exported in fp32, and loaded for inference."""

from __future__ import annotations

import json
from typing import Any, NamedTuple

import pytest
from conftest import TINY_LLAMA
from test_activations import GEOMETRIES, TOLERANCE

from qlora_kit.catalog.readers import arch_from_config
from qlora_kit.cli import main
from qlora_kit.errors import UsageError
from qlora_kit.knobs import TrainSetup
from qlora_kit.plan.memory import estimate
from qlora_kit.plan.recipes import to_constraints
from qlora_kit.recipe import build_recipe, load_recipe

# -- recipes and the planner's flags (no torch) ---------------------------------------------------------


def test_recipe_keys_reach_the_planner_and_refuse_what_peft_cannot_do():
    recipe = build_recipe({"model": {"name": "opt-125m"}, "lora": {"variant": "dora", "rslora": True}})
    assert (recipe.lora.variant, recipe.lora.rslora) == ("dora", True)
    c = to_constraints(recipe)
    assert c.dora is True and c.rslora is True and c.lora_fa is False
    plain = to_constraints(build_recipe({"model": {"name": "opt-125m"}}))
    assert plain.dora is False and plain.rslora is False
    with pytest.raises(UsageError) as err:  # the runlora layer skips DoRA layers: it would silently do nothing
        build_recipe({"model": {"name": "opt-125m"}, "lora": {"variant": "dora", "kernel": "runlora"}})
    assert "lora.kernel" in str(err.value) and "lora.kernel: peft" in str(err.value)
    with pytest.raises(UsageError) as err:
        build_recipe({"model": {"name": "opt-125m"}, "lora": {"variant": "dora", "rslora": "yes"}})
    assert "lora.rslora" in str(err.value) and "true or false" in str(err.value)


def _plan(capsys: Any, *extra: str) -> dict[str, Any]:
    args = ["plan", "--model", "llama-2-7b", "--gpu", "80GB", "--quant", "nf4", "--batch-size", "1", "--json"]
    assert main([*args, "--seq-len", "512", "--grad-ckpt", "off", "--targets", "all-linear", *extra]) == 0
    return json.loads(capsys.readouterr().out)


def test_plan_flags_model_dora_and_leave_rslora_free(capsys, tmp_path):
    lora, dora, rs = _plan(capsys), _plan(capsys, "--dora"), _plan(capsys, "--rslora")
    magnitude = dora["breakdown"]["lora_params"] - lora["breakdown"]["lora_params"]
    # one fp32 magnitude per output row of every adapted linear: 32 layers x (4 x 4096 + 2 x 11008 + 4096)
    assert magnitude == 32 * (4 * 4096 + 2 * 11008 + 4096) * 4
    assert dora["breakdown"]["lora_grads"] - lora["breakdown"]["lora_grads"] == magnitude
    assert dora["breakdown"]["optimizer_state"] - lora["breakdown"]["optimizer_state"] == 2 * magnitude
    assert dora["breakdown"]["activations"] > lora["breakdown"]["activations"]  # base and BA outputs kept
    assert dora["choice"]["dora"] is True and lora["choice"]["dora"] is False
    assert rs["breakdown"] == lora["breakdown"] and rs["device_bytes"] == lora["device_bytes"]
    assert rs["choice"]["rslora"] is True and lora["choice"]["rslora"] is False
    path = tmp_path / "dora.yaml"
    args = ["plan", "--model", "opt-1.3b", "--gpu", "24GB", "--dora", "--rslora", "--write-recipe", str(path)]
    assert main(args) == 0
    written = load_recipe(path)
    assert (written.lora.variant, written.lora.rslora, written.lora.kernel) == ("dora", True, "peft")


def test_plan_refuses_dora_with_another_variant(capsys):
    assert main(["plan", "--model", "opt-1.3b", "--gpu", "24GB", "--dora", "--lora-fa"]) == 2
    err = capsys.readouterr().err
    assert "--dora" in err and "Traceback" not in err and len(err.strip().splitlines()) <= 2


def test_dora_with_dropout_keeps_a_dequantized_copy_of_every_adapted_weight():
    """peft computes base(dropout(x)) itself when dropout is on, and that matmul keeps W' for backward:
    the planner says so, in the autocast dtype (2 bytes per weight on a GPU). (Measured on the CPU grid.)"""
    arch = arch_from_config(GEOMETRIES["llama-256"], "llama-256")
    names = arch.linear_names()
    setup = TrainSetup(quant="nf4", dtype="bf16", rank=8, targets=names, batch_size=1, seq_len=64, dora=True)
    no_dropout = setup.with_(lora_dropout=0.0)
    per_layer = sum(s.weight_numel for s in arch.linears_named(names))
    copies = [sum(v for k, v in layer.items() if k.endswith(".weight_copy")) for layer in _layers(arch, setup)]
    assert copies[1] == 2 * per_layer  # (the first block's q/k/v see an input that needs no gradient)
    assert not [k for layer in _layers(arch, no_dropout) for k in layer if k.endswith(".weight_copy")]
    assert estimate(arch, setup).peak_allocated_bytes > estimate(arch, no_dropout).peak_allocated_bytes


def _layers(arch: Any, setup: TrainSetup) -> list[dict[str, int]]:
    from qlora_kit.plan.activations import saved_bytes

    layers: list[dict[str, int]] = saved_bytes(arch, setup)["layers"]  # type: ignore[assignment]
    return layers


# -- the CPU grid: DoRA steps measured against the planner ------------------------------------------------


class Case(NamedTuple):
    geometry: str
    quant: str  # none | nf4 | nf4-dq
    dropout: float
    targets: str  # "qv" or "all-linear"
    dtype: str
    grad_ckpt: bool
    shape: tuple[int, int]


# small batches, where the row norm's transient decides the peak, and larger ones, where backward's start
# does; dropout on and off (on: the weight copies); 16-bit and 4-bit bases; fp32 and bf16 (autocast)
CASES = [
    Case("llama-256", "nf4-dq", 0.0, "all-linear", "fp32", False, (1, 16)),
    Case("llama-256", "nf4-dq", 0.05, "all-linear", "fp32", False, (1, 16)),
    Case("llama-128", "nf4-dq", 0.0, "all-linear", "fp32", False, (3, 32)),
    Case("llama-256", "nf4-dq", 0.0, "all-linear", "fp32", True, (1, 16)),
    Case("llama-128", "nf4-dq", 0.05, "all-linear", "fp32", True, (2, 64)),
    Case("opt-256", "nf4-dq", 0.0, "all-linear", "fp32", True, (2, 32)),
    Case("opt-128", "nf4", 0.05, "qv", "fp32", False, (4, 32)),
    Case("llama-128", "none", 0.05, "all-linear", "fp32", False, (2, 64)),
    Case("opt-128", "none", 0.05, "all-linear", "bf16", False, (2, 32)),
    Case("llama-256", "nf4-dq", 0.05, "all-linear", "bf16", False, (2, 64)),
    Case("llama-128", "nf4", 0.0, "qv", "bf16", False, (1, 32)),
]


def _setup(case: Case) -> TrainSetup:
    arch = arch_from_config(GEOMETRIES[case.geometry], case.geometry)
    b, s = case.shape
    return TrainSetup(
        quant=case.quant.removesuffix("-dq"),
        double_quant=case.quant.endswith("-dq"),
        dtype=case.dtype,
        rank=8,
        targets=arch.linear_names() if case.targets == "all-linear" else ("q_proj", "v_proj"),
        batch_size=b,
        seq_len=s,
        grad_ckpt=case.grad_ckpt,
        lora_dropout=case.dropout,
        dora=True,
    )


def _id(case: Case) -> str:
    gc = "gc" if case.grad_ckpt else "nogc"
    b, s = case.shape
    return f"{case.geometry}-{case.quant}-p{case.dropout}-{case.targets}-{case.dtype}-{gc}-b{b}s{s}"


@pytest.fixture(scope="module")
def _one_thread() -> Any:
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.mark.usefixtures("quiet_hf", "_one_thread")
@pytest.mark.parametrize("case", CASES, ids=[_id(c) for c in CASES])
def test_dora_step_matches_the_planner(tiny_model_dir, case):
    from qlora_kit.measure import report as measure
    from qlora_kit.measure import steps

    arch = arch_from_config(GEOMETRIES[case.geometry], case.geometry)
    setup = _setup(case)
    model = steps.load_for_training(tiny_model_dir(GEOMETRIES[case.geometry], "float32"), setup, "cpu")
    assert sum("lora_magnitude_vector" in n for n, p in model.named_parameters() if p.requires_grad) > 0
    rep = measure.measure_and_compare(model, arch, setup, "cpu", steps=2)
    why = f"{rep.moment}; " + "; ".join(f"{r.term} {r.measured} vs {r.predicted} ({r.error:+.2%})" for r in rep.rows)
    for term in ("linear_weights", "quant_state", "other_params", "lora_params", "lora_grads", "optimizer_state"):
        assert rep.row(term).measured == rep.row(term).predicted, why
    assert abs(rep.row("saved").error) <= TOLERANCE, why
    assert abs(rep.row("dynamic").error) <= TOLERANCE, why
    assert abs(rep.row("peak").error) <= TOLERANCE, why
    # the DoRA terms are real: the same step planned as plain LoRA falls short of the measured peak
    lora = measure.predict(arch, setup.with_(dora=False), "cpu")
    assert lora["peak"] < rep.row("peak").measured
    assert lora["saved"] < rep.row("saved").measured or case.grad_ckpt  # (checkpointed: block inputs only)


def test_the_grid_exercises_the_dora_moments():
    from qlora_kit.plan.moments import peak_moment

    moments = set()
    for case in CASES:
        arch = arch_from_config(GEOMETRIES[case.geometry], case.geometry)
        moments.add(peak_moment(arch, _setup(case), "cpu"))
    assert {"forward, last DoRA norm", "backward, recomputing the last DoRA norm", "backward start"} <= moments


# -- training, export and inference ------------------------------------------------------------------------


@pytest.mark.usefixtures("quiet_hf")
def test_int8_dora_is_refused_on_the_cpu(tiny_model_dir):
    from qlora_kit.measure import steps

    setup = TrainSetup(quant="int8", double_quant=False, dtype="fp32", rank=8, targets=("q_proj",), dora=True)
    with pytest.raises(UsageError) as err:
        steps.load_for_training(tiny_model_dir(TINY_LLAMA, "float32"), setup, "cpu")
    assert "int8" in str(err.value) and "nf4" in err.value.hint


@pytest.fixture(scope="module")
def dora_run(tmp_path_factory: pytest.TempPathFactory) -> Any:
    """The CPU demo recipe trained 6 steps as DoRA with rsLoRA on its NF4 base."""
    from test_train import Quiet, demo_recipe

    from qlora_kit.train.loop import train

    run = tmp_path_factory.mktemp("dora-run") / "run"
    recipe = demo_recipe(run, max_steps=6, **{"lora.variant": "dora", "lora.rslora": "true", "lora.dropout": 0.0})
    train(recipe, Quiet())
    return run


@pytest.mark.usefixtures("quiet_hf")
def test_a_trained_dora_adapter_is_peft_dora_with_trained_magnitudes(dora_run):
    import torch
    from safetensors.torch import load_file

    config = json.loads((dora_run / "adapter_config.json").read_text())
    assert config["use_dora"] is True and config["use_rslora"] is True
    tensors = load_file(dora_run / "adapter_model.safetensors")
    magnitudes = {k: v for k, v in tensors.items() if "lora_magnitude_vector" in k}
    assert len(magnitudes) == 4 * 7  # every linear of the four blocks
    # peft initializes m to the row norms of W' + s BA = W' (B starts at zero); training moved them
    from qlora_kit.infer.load import load_for_inference

    model, _, _ = load_for_inference(adapter=str(dora_run))
    layer = model.base_model.model.model.layers[0].self_attn.q_proj
    from peft.utils.integrations import dequantize_module_weight

    norms = torch.linalg.norm(dequantize_module_weight(layer.base_layer).float(), dim=1)
    m = layer.lora_magnitude_vector["default"].weight.detach()
    assert not torch.allclose(m, norms, rtol=0, atol=1e-6)
    assert layer.scaling["default"] == pytest.approx(32 / 16**0.5)  # rsLoRA: alpha / sqrt(rank)


@pytest.mark.usefixtures("quiet_hf")
def test_dora_run_exports_in_fp32_and_generates_what_its_adapter_does(dora_run, tmp_path):
    import torch

    from qlora_kit.export.run import export
    from qlora_kit.infer.generate import GenerateSpec, generate
    from qlora_kit.infer.load import load_for_inference

    summary = export(dora_run, tmp_path / "merged", dtype="fp32", verify=True)
    v = summary["verification"]
    assert v["passed"] and v["reference"].startswith("adapter on the nf4")
    assert v["max_abs_diff"] <= 16 * 2.0**-20 * max(1.0, v["logit_scale"])
    adapted, tokenizer, _ = load_for_inference(adapter=str(dora_run))
    merged, _, _ = load_for_inference(model=str(tmp_path / "merged"))
    ids = tokenizer("Two things are infinite: ", return_tensors="pt").input_ids
    with torch.no_grad():
        a, m = adapted(ids).logits, merged(ids).logits
    assert (a - m).abs().max().item() <= 16 * 2.0**-20 * max(1.0, a.abs().max().item())
    spec = GenerateSpec(max_new_tokens=8, temperature=0.0)
    prompt = ids[0].tolist()
    assert generate(adapted, tokenizer, prompt, spec).token_ids == generate(merged, tokenizer, prompt, spec).token_ids
