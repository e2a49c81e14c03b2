"""LoRA targets: a spec ("all-linear", "default" or module names) -> the leaf names adapted, for the
planner and for training alike (``qlora_kit.model.lora`` hands the names to peft).

No torch here: the planner imports this.
"""

from __future__ import annotations

from collections.abc import Sequence

from qlora_kit.catalog.readers import DEFAULT_TARGETS
from qlora_kit.errors import UsageError
from qlora_kit.knobs import ALL_LINEAR

# "default" for a model type the catalog has no reader for (training such a model needs no planner)
FALLBACK_TARGETS = ("q_proj", "v_proj")


def resolve_targets(
    spec: str | Sequence[str] | None,
    model_type: str,
    linear_names: tuple[str, ...] | None = None,
    model: str = "",
    flag: str = "--targets",
) -> tuple[str, tuple[str, ...]]:
    """("label", leaf names) for "all-linear" (also ``None``), "default" (the architecture's attention
    projections), or module names: a list or one comma-separated string.

    ``linear_names`` are the architecture's adaptable layers (``ArchSpec.linear_names``) when known:
    "all-linear" resolves to them and other names are refused. Without them (training a loaded model)
    "all-linear" resolves to no names, left to peft, and names are not checked here (peft checks them).
    ``flag`` and ``model`` name the setting and the model in the error."""
    if spec is None or spec == ALL_LINEAR:
        return ALL_LINEAR, linear_names or ()
    if spec == "default":
        names = DEFAULT_TARGETS.get(model_type, FALLBACK_TARGETS)
        return ",".join(names), names
    parts = spec.split(",") if isinstance(spec, str) else spec
    names = tuple(n.strip() for n in parts if n.strip())
    unknown = [n for n in names if linear_names is not None and n not in linear_names]
    if unknown or not names:
        fix = f"choose from {', '.join(linear_names)}, or all-linear" if linear_names else "name them, or all-linear"
        raise UsageError(f"{flag} {spec!r}: {', '.join(unknown) or 'no names'} not a linear layer of {model}", fix)
    return ",".join(names), names
