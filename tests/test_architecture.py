"""The package's rooms import only downwards (docs/architecture.md): data flows one way, and the planner's
side (errors, knobs, recipe, catalog, plan) never imports torch or the libraries built on it."""

from __future__ import annotations

import ast
from pathlib import Path

import qlora_kit

ROOT = Path(qlora_kit.__file__).parent
# a room may import rooms of a lower layer only (and itself)
LAYERS = {
    "errors": 0, "knobs": 0, "host": 0, "files": 0,
    "recipe": 1, "catalog": 1,
    "plan": 2,
    "hub": 2,
    "data": 3, "model": 3,
    "adapter": 4,
    "train": 5, "export": 5, "infer": 5,
    "measure": 6, "ui": 6,
    "cli": 7, "__main__": 8, "__init__": 8,
}  # fmt: skip
# inside cli/: one module per verb; a verb may share only what cli/common.py holds, and only the
# package's __init__ (main) knows every verb
CLI_SHARED = ("qlora_kit.cli.common",)
TORCH_FREE = ("errors", "knobs", "host", "files", "recipe", "catalog", "plan")
HEAVY = ("torch", "transformers", "peft", "bitsandbytes", "accelerate", "datasets")


def _imports() -> list[tuple[str, str, str]]:
    """(room, file, imported module) for every import anywhere in the package, top-level or in a function."""
    found = []
    for path in sorted(ROOT.rglob("*.py")):
        parts = path.relative_to(ROOT).with_suffix("").parts
        room = parts[0]
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                found.append((room, str(path.relative_to(ROOT)), node.module))
            elif isinstance(node, ast.Import):
                found += [(room, str(path.relative_to(ROOT)), a.name) for a in node.names]
    return found


def test_every_room_has_a_layer() -> None:
    rooms = {p.relative_to(ROOT).with_suffix("").parts[0] for p in ROOT.rglob("*.py")}
    assert rooms - {"resources"} <= set(LAYERS), sorted(rooms - set(LAYERS))


def test_rooms_import_only_downwards() -> None:
    bad = []
    for room, file, module in _imports():
        if module.startswith("qlora_kit."):
            target = module.split(".")[1]
            if target != room and LAYERS[target] >= LAYERS[room]:
                bad.append(f"{file} imports {module}")
    assert bad == []


def test_the_planner_side_never_imports_torch() -> None:
    bad = [f"{file} imports {m}" for room, file, m in _imports() if room in TORCH_FREE and m.split(".")[0] in HEAVY]
    assert bad == []


def test_cli_verbs_import_no_other_verb() -> None:
    bad = [
        f"{file} imports {m}"
        for room, file, m in _imports()
        if room == "cli" and file != "cli/__init__.py" and m.startswith("qlora_kit.cli") and m not in CLI_SHARED
    ]
    assert bad == []
