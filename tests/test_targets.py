"""One LoRA target resolver: the planner and training turn ``lora.targets`` into the same module names."""

from __future__ import annotations

import pytest

from qlora_kit.catalog.gpus import resolve_gpu
from qlora_kit.catalog.models import lookup
from qlora_kit.catalog.readers import DEFAULT_TARGETS
from qlora_kit.errors import UsageError
from qlora_kit.knobs import ALL_LINEAR
from qlora_kit.model.lora import target_modules
from qlora_kit.plan.recipes import to_constraints
from qlora_kit.plan.search import Constraints, candidates
from qlora_kit.plan.targets import FALLBACK_TARGETS, resolve_targets
from qlora_kit.recipe import LoraSpec, load_recipe


@pytest.mark.parametrize(
    ("targets", "expected"),
    [
        ("default", ("q_proj", "v_proj")),
        ("q_proj,v_proj", ("q_proj", "v_proj")),
        (" k_proj , o_proj,", ("k_proj", "o_proj")),
        (["gate_proj", "down_proj"], ("gate_proj", "down_proj")),
        ("up_proj", ("up_proj",)),
    ],
)
def test_planner_and_training_adapt_the_same_names(tmp_path, targets, expected) -> None:
    path = tmp_path / "r.yaml"
    path.write_text(f"model:\n  name: llama-2-7b\nlora:\n  targets: {targets!r}\n".replace("'", '"'))
    rec = load_recipe(path)
    arch = lookup("llama-2-7b")
    planned = candidates(arch, to_constraints(rec), resolve_gpu("80GB"))
    assert {c.setup.targets for c in planned} == {expected}
    assert target_modules(rec.lora, arch.model_type) == list(expected)


def test_all_linear_is_the_catalog_layers_for_the_planner_and_peft_s_for_training() -> None:
    arch = lookup("llama-2-7b")
    assert resolve_targets(ALL_LINEAR, arch.model_type, arch.linear_names()) == (ALL_LINEAR, arch.linear_names())
    assert resolve_targets(None, arch.model_type, arch.linear_names())[1] == arch.linear_names()
    assert target_modules(LoraSpec(targets=ALL_LINEAR), arch.model_type) == ALL_LINEAR


def test_default_targets_per_architecture_and_a_fallback_for_unknown_types() -> None:
    assert target_modules(LoraSpec(targets="default"), "gpt2") == list(DEFAULT_TARGETS["gpt2"])
    assert target_modules(LoraSpec(targets="default"), "no-such-type") == list(FALLBACK_TARGETS)


def test_the_planner_refuses_names_that_are_not_linear_layers() -> None:
    arch = lookup("llama-2-7b")
    with pytest.raises(UsageError, match="nope not a linear layer of"):
        resolve_targets("q_proj,nope", arch.model_type, arch.linear_names(), arch.name)
    with pytest.raises(UsageError, match="no names"):
        candidates(arch, Constraints(targets=","), resolve_gpu("80GB"))


@pytest.mark.parametrize("targets", [",", [], [" "]])
def test_training_refuses_an_empty_target_list_before_peft(targets) -> None:
    with pytest.raises(UsageError, match=r"lora\.targets .*no names"):
        target_modules(LoraSpec(targets=targets), "llama")


def test_a_comma_separated_string_adapts_those_layers_in_peft(tmp_path) -> None:
    from conftest import TINY_LLAMA, build_tiny_model
    from transformers import AutoModelForCausalLM

    from qlora_kit.model.lora import apply_lora

    model = AutoModelForCausalLM.from_pretrained(build_tiny_model(TINY_LLAMA, tmp_path / "llama"))
    model = apply_lora(model, LoraSpec(rank=4, targets="q_proj, o_proj"))
    assert set(model.peft_config["default"].target_modules) == {"q_proj", "o_proj"}
    adapted = {n.split(".")[-1] for n, m in model.named_modules() if hasattr(m, "lora_A")}
    assert adapted == {"q_proj", "o_proj"}


def test_a_target_the_loaded_model_lacks_is_one_line_naming_the_layers_it_has(tiny_model_dir) -> None:
    """peft would raise NoMatchingPeftModuleError with a traceback; training refuses first, in one line."""
    from conftest import TINY_LLAMA
    from transformers import AutoModelForCausalLM

    from qlora_kit.model.lora import apply_lora

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir(TINY_LLAMA))
    with pytest.raises(UsageError) as info:
        apply_lora(model, LoraSpec(targets="q_proj,foo_proj"))
    assert "foo_proj" in info.value.message and "q_proj" not in info.value.message
    assert "q_proj" in info.value.hint and "v_proj" in info.value.hint and "lm_head" not in info.value.hint
    assert apply_lora(model, LoraSpec(targets="self_attn.q_proj")) is not None  # peft's dotted suffixes match
