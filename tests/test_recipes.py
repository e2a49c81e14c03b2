"""Every recipe shipped under recipes/ loads, validates and plans."""

from __future__ import annotations

from pathlib import Path

import pytest

from qlora_kit.catalog.bundled import resolve
from qlora_kit.catalog.gpus import resolve_gpu
from qlora_kit.catalog.models import resolve_model
from qlora_kit.plan.recipes import to_constraints
from qlora_kit.plan.search import plan
from qlora_kit.recipe import load_recipe

# recipes whose model is a directory a tool writes (tools/real_model.py): planned from the catalog's config
WRITTEN_BY_TOOLS = {"./models/smollm2-135m": "HuggingFaceTB/SmolLM2-135M-Instruct"}
RECIPES = sorted((Path(__file__).resolve().parent.parent / "recipes").rglob("*.yaml"))


def test_there_are_recipes():
    assert len(RECIPES) >= 5


@pytest.mark.parametrize("path", RECIPES, ids=[p.relative_to(p.parents[1]).as_posix() for p in RECIPES])
def test_recipe_loads_validates_and_plans(path):
    recipe = load_recipe(path)
    text = path.read_text()
    assert text.startswith("#") and "qlora-kit train " in text, "header comment with the exact command"
    name = recipe.model.name
    arch = resolve_model(WRITTEN_BY_TOOLS[name] if name in WRITTEN_BY_TOOLS else resolve(name))
    result = plan(arch, resolve_gpu("24GB"), to_constraints(recipe))
    assert result.best.setup.seq_len == recipe.data.max_seq_len
    assert result.fits, f"{path.name} does not fit a 24 GB card by the planner's estimate"
