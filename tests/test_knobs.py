"""One rule set for the knobs: the 4-bit types and "double quant only with a 4-bit base", applied alike by
the planner, the recipe validator and the exporter's quantization source."""

from __future__ import annotations

import pytest

from qlora_kit.adapter import quant_source
from qlora_kit.catalog.gpus import resolve_gpu
from qlora_kit.catalog.models import lookup
from qlora_kit.errors import UsageError
from qlora_kit.knobs import FOUR_BIT, QUANTS, double_quant_for, double_quant_refused
from qlora_kit.plan.recipes import to_constraints
from qlora_kit.plan.search import Constraints, plan
from qlora_kit.recipe import load_recipe

CASES = [(q, asked) for q in QUANTS for asked in (None, True, False)]


def test_four_bit_types_are_the_bitsandbytes_ones() -> None:
    assert FOUR_BIT == ("nf4", "fp4")
    assert set(QUANTS) == {"none", "int8", *FOUR_BIT}


@pytest.mark.parametrize(("quant", "asked"), CASES)
def test_the_rule(quant: str, asked: bool | None) -> None:
    assert double_quant_for(quant, asked) is (quant in FOUR_BIT and asked is not False)
    assert double_quant_refused(quant, asked) is (quant in ("none", "int8") and asked is True)


def test_an_open_or_unknown_quant_is_not_refused() -> None:
    assert not double_quant_refused(None, True)  # the planner still searches the base type
    assert not double_quant_refused("int4", True)  # an unknown type gets its own error


@pytest.mark.parametrize(("quant", "asked"), CASES)
def test_planner_recipe_and_export_apply_the_same_rule(tmp_path, quant: str, asked: bool | None) -> None:
    refused = double_quant_refused(quant, asked)
    arch, gpu = lookup("opt-125m"), resolve_gpu("80GB")
    try:
        p = plan(arch, gpu, Constraints(quant=quant, double_quant=asked))
        assert not refused and p.best.setup.double_quant is double_quant_for(quant, asked)
    except UsageError as e:
        assert refused and "4-bit bases only" in e.message

    dq = "" if asked is None else f"  double_quant: {str(asked).lower()}\n"
    path = tmp_path / "r.yaml"
    path.write_text(f"model:\n  name: opt-125m\nquant:\n  mode: {quant}\n{dq}")
    try:
        rec = load_recipe(path)
        assert not refused and to_constraints(rec).double_quant is double_quant_for(quant, asked)
    except UsageError as e:
        assert refused and "applies to nf4/fp4 only" in e.message

    try:
        source = quant_source(None, quant, asked, "fp32", "rounded")
        assert not refused and source is not None and source.double_quant is bool(asked)
    except UsageError as e:
        assert refused == ("double quant is for" in e.message)
        assert refused or (quant in FOUR_BIT and asked is None)  # 4-bit needs the choice said
