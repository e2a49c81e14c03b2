"""LoRA-FA (``lora.variant: lora-fa``): A frozen at its initialization, only B trained; the recipe key,
the plan flag, and the planner's static terms. (What autograd stops saving is checked byte by byte on the
calibration grid in ``tests/test_activations.py``.)"""

from __future__ import annotations

import json

import pytest
from conftest import TINY_LLAMA as TINY

from qlora_kit.catalog.readers import arch_from_config
from qlora_kit.cli import main
from qlora_kit.errors import UsageError
from qlora_kit.knobs import TrainSetup
from qlora_kit.plan.memory import estimate
from qlora_kit.plan.recipes import to_constraints
from qlora_kit.recipe import build_recipe


def test_lora_fa_trains_b_only_and_keeps_a_at_its_initialization(tiny_model_dir, tmp_path):
    import torch
    from safetensors.torch import load_file

    from qlora_kit.measure import steps as measure

    arch = arch_from_config(TINY, "tiny")
    setup = TrainSetup(quant="nf4", dtype="fp32", rank=8, targets=arch.linear_names(), lora_fa=True, seq_len=32)
    model = measure.load_for_training(tiny_model_dir(TINY, "float32"), setup, "cpu")
    params = dict(model.named_parameters())
    a_names = [n for n in params if ".lora_A." in n]
    b_names = [n for n in params if ".lora_B." in n]
    assert len(a_names) == len(b_names) == 2 * 7
    assert [n for n, p in params.items() if p.requires_grad] == b_names
    a0 = {n: params[n].detach().clone() for n in a_names}
    b0 = {n: params[n].detach().clone() for n in b_names}
    opt = measure.make_optimizer("adamw", [p for p in model.parameters() if p.requires_grad], lr=1e-2)
    batch = measure.random_batch(TINY["vocab_size"], setup)
    losses = [measure.train_step(model, [batch], opt, None, "cpu") for _ in range(4)]
    assert losses[-1] < losses[0]
    assert all(torch.equal(params[n], a0[n]) for n in a_names)
    assert all(not torch.equal(params[n], b0[n]) for n in b_names)
    # the saved adapter is plain peft: A (its initialization) and B
    model.save_pretrained(tmp_path / "adapter")
    saved = load_file(tmp_path / "adapter" / "adapter_model.safetensors")
    assert len(saved) == 4 * 7
    a_saved = {k: v for k, v in saved.items() if ".lora_A." in k}
    assert sorted(v.sum().item() for v in a_saved.values()) == sorted(v.sum().item() for v in a0.values())


def test_planner_counts_gradients_and_optimizer_state_of_b_only():
    arch = arch_from_config(TINY, "tiny")
    lora = TrainSetup(quant="nf4", rank=8, targets=arch.linear_names(), seq_len=64, optimizer="adamw")
    fa = lora.with_(lora_fa=True)
    b_elems = sum(s.d_out * 8 for s in arch.linears_named(arch.linear_names())) * arch.num_layers
    e_lora, e_fa = estimate(arch, lora, "cpu"), estimate(arch, fa, "cpu")
    assert e_fa.breakdown["lora_params"] == e_lora.breakdown["lora_params"]  # A is still there
    assert e_fa.breakdown["lora_grads"] == b_elems * 4
    assert e_fa.breakdown["optimizer_state"] == b_elems * 8
    assert e_fa.breakdown["activations"] < e_lora.breakdown["activations"]  # no layer inputs kept for A


def test_recipe_keys_reach_the_planner():
    recipe = build_recipe({"model": {"name": "opt-125m"}, "lora": {"variant": "lora-fa", "kernel": "runlora"}})
    assert recipe.lora.variant == "lora-fa" and recipe.lora.kernel == "runlora"
    c = to_constraints(recipe)
    assert c.lora_fa is True and c.kernel == "runlora"
    default = build_recipe({"model": {"name": "opt-125m"}})
    assert (default.lora.variant, default.lora.kernel) == ("lora", "peft")
    with pytest.raises(UsageError) as err:
        build_recipe({"model": {"name": "opt-125m"}, "lora": {"variant": "lorafa", "kernel": "fast"}})
    assert "lora.variant" in str(err.value) and "lora.kernel" in str(err.value)


def test_plan_flag_lowers_the_plan_and_lands_in_the_recipe(tmp_path, capsys):
    from qlora_kit.recipe import load_recipe

    def plan(*extra: str) -> dict:
        args = ["plan", "--model", "opt-1.3b", "--gpu", "24GB", "--quant", "nf4", "--batch-size", "4", "--json"]
        assert main([*args, "--grad-ckpt", "off", "--seq-len", "1024", *extra]) == 0
        return json.loads(capsys.readouterr().out)

    lora, fa = plan(), plan("--lora-fa")
    assert fa["peak_allocated_bytes"] < lora["peak_allocated_bytes"]
    assert fa["breakdown"]["lora_grads"] * 2 <= lora["breakdown"]["lora_grads"]  # B only: half of OPT's LoRA
    path = tmp_path / "fa.yaml"
    assert main(["plan", "--model", "opt-1.3b", "--gpu", "24GB", "--lora-fa", "--write-recipe", str(path)]) == 0
    capsys.readouterr()
    assert load_recipe(path).lora.variant == "lora-fa"


def test_fa_correction_needs_lora_fa_and_adamw():
    with pytest.raises(UsageError) as err:
        build_recipe(
            {"model": {"name": "opt-125m"}, "lora": {"fa_correction": True}, "train": {"optimizer": "adamw8bit"}}
        )
    assert "needs lora.variant: lora-fa" in str(err.value) and "train.optimizer: adamw" in str(err.value)
    ok = build_recipe({"model": {"name": "opt-125m"}, "lora": {"variant": "lora-fa", "fa_correction": True}})
    assert ok.lora.fa_correction is True


def test_fa_correction_projects_b_gradient_by_the_inverse_gram_of_a(tmp_path):
    """One step of peft's LoRA-FA optimizer as the train loop builds it: Adam's first moment of B is
    (1 - beta1) * grad_B (A A^T)^-1 / s^2, A untouched, every other parameter without state."""
    import torch
    from test_train import demo_recipe

    from qlora_kit.model.load import load_base, materialize_random_init, resolve_model_spec
    from qlora_kit.model.lora import apply_lora, prepare
    from qlora_kit.train.optim import lorafa_optimizer

    recipe = demo_recipe(tmp_path / "run", **{"lora.variant": "lora-fa", "lora.fa_correction": "true"})
    spec = materialize_random_init(resolve_model_spec(recipe.model), tmp_path / "base", 0)
    model = apply_lora(prepare(load_base(spec, recipe.quant), recipe.quant, False), recipe.lora)
    optimizer = lorafa_optimizer(model, recipe.lora, lr=1e-3, weight_decay=0.0)
    ids = torch.randint(0, model.config.vocab_size, (2, 16))
    model(input_ids=ids, labels=ids).loss.backward()
    layer = model.base_model.model.model.layers[0].self_attn.q_proj
    a, b = layer.lora_A["default"].weight, layer.lora_B["default"].weight
    a0, grad_b = a.detach().clone(), b.grad.detach().clone()
    assert a.grad is None and grad_b.abs().sum() > 0
    optimizer.step()
    s = layer.scaling["default"]
    expected = 0.1 * grad_b @ torch.linalg.inv(a0 @ a0.T) / s**2
    name = next(n for n, p in model.named_parameters() if p is b)
    got = optimizer.state[name[: name.find("lora")] + "lora"]["exp_avg_B"]
    # peft computes the projection under bf16 autocast where bf16 is available (the CPU included)
    assert torch.allclose(got, expected, rtol=2e-2, atol=1e-3 * expected.abs().max().item())
    assert not torch.allclose(got, 0.1 * grad_b, rtol=0.1)  # the correction really changes the direction
    assert torch.equal(a, a0)
