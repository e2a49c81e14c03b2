"""Recipes: YAML <-> frozen, typed specs, validated once at the edge.

A recipe has five sections (``model``, ``quant``, ``lora``, ``data``, ``train``); each is a frozen
dataclass whose fields are the only keys allowed. :func:`load_recipe` reports every problem at once:
unknown keys (with their line and the closest valid key), wrong types, values outside their choices.
``--set section.key=value`` overrides are applied before validation, so they are checked the same way.

No torch here: ``qlora-kit plan --recipe`` reads recipes too.
"""

from __future__ import annotations

import dataclasses
import difflib
import types
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Union, get_args, get_origin, get_type_hints

import yaml

from qlora_kit.errors import UsageError
from qlora_kit.knobs import (
    ATTNS,
    DTYPES,
    LORA_VARIANTS,
    OPTIMIZERS,
    QUANTS,
    ROPE_SCALINGS,
    STRATEGIES,
    UPCASTS,
    double_quant_refused,
)


def _choices(*values: str) -> dict[str, Any]:
    return {"choices": values}


@dataclass(frozen=True)
class ModelSpec:
    name: str = ""  # catalog name, hub id or local directory
    revision: str = "main"
    trust_remote_code: bool = False
    random_init: bool = False  # build weights from the config (seeded by train.seed): demos and tests
    # RoPE stretched to data.max_seq_len when that is past the native context (qlora_kit.catalog.context)
    rope_scaling: str = field(default="none", metadata=_choices("none", *ROPE_SCALINGS))


@dataclass(frozen=True)
class QuantSpec:
    mode: str = field(default="nf4", metadata=_choices(*QUANTS))
    double_quant: bool = True
    compute_dtype: str = field(default="bf16", metadata=_choices(*DTYPES))
    upcast: str = field(default="all", metadata=_choices(*UPCASTS))  # selective: LayerNorms only (model/savers)


@dataclass(frozen=True)
class LoraSpec:
    rank: int = 16
    alpha: int = 32
    dropout: float = 0.05
    targets: str | list[str] = "all-linear"  # "all-linear", "default", or module names
    bias: str = field(default="none", metadata=_choices("none", "all", "lora_only"))
    # lora-fa: A frozen, B trained; dora: weight-decomposed LoRA, a trained magnitude per output row (docs/dora.md)
    variant: str = field(default="lora", metadata=_choices(*LORA_VARIANTS))
    kernel: str = field(default="peft", metadata=_choices("peft", "runlora"))  # runlora: qlora_kit.model.runlora
    fa_correction: bool = False  # lora-fa: peft's LoRA-FA optimizer (B's gradient projected by (A A^T)^-1 / s^2)
    rslora: bool = False  # rank-stabilized scale alpha / sqrt(rank) instead of alpha / rank (peft use_rslora)


@dataclass(frozen=True)
class DataSpec:
    path: str = ""  # local jsonl/json/csv/parquet/txt file, or a hub dataset id
    format: str = field(default="text", metadata=_choices("text", "prompt_response", "chat"))
    text_field: str = "text"
    prompt_field: str = "prompt"
    response_field: str = "response"
    messages_field: str = "messages"
    max_seq_len: int = 512
    packing: bool = False
    too_long: str = field(default="truncate", metadata=_choices("truncate", "drop"))
    eval_fraction: float = 0.0
    split: str = "train"


# the data a written recipe trains on when the user names none: the bundled quotes
DEFAULT_DATA = DataSpec(path="builtin:quotes", text_field="quote")


@dataclass(frozen=True)
class TrainSpec:
    output_dir: str = "runs/qlora"
    micro_batch: int = 1
    grad_accum: int = 16
    lr: float = 2e-4
    schedule: str = field(default="cosine", metadata=_choices("cosine", "linear", "constant"))
    warmup_steps: int = 0
    max_steps: int = 0  # 0: run `epochs` epochs
    epochs: float = 1.0
    optimizer: str = field(default="adamw", metadata=_choices(*OPTIMIZERS))
    weight_decay: float = 0.0
    max_grad_norm: float = 1.0
    grad_ckpt: bool = False
    attn: str = field(default="sdpa", metadata=_choices(*ATTNS))
    chunked_loss: bool = False  # head + loss in chunks of rows: never the full logits (qlora_kit.model.savers)
    offload_ckpt: bool = False  # checkpointed layers' inputs in host memory; needs grad_ckpt
    seed: int = 42
    gpus: int = 1  # processes (GPUs) to train on; >1 relaunches under torchrun (qlora_kit.train.distributed)
    strategy: str = field(default="ddp", metadata=_choices(*STRATEGIES))  # how the GPUs share the model
    logging_steps: int = 1
    eval_steps: int = 0
    save_steps: int = 0
    save_total_limit: int = 2
    report_to: str | list[str] = field(default_factory=list)  # trackers (qlora_kit.train.tracking); a comma list


# what train.report_to may name; qlora_kit.train.tracking has a backend for each
TRACKERS = ("tensorboard", "wandb")


def report_targets(value: str | list[str]) -> list[str]:
    """``train.report_to`` as a list of names: a comma list (``--set train.report_to=tensorboard,wandb``),
    a YAML list, or empty / ``none`` for no tracker."""
    items = value.split(",") if isinstance(value, str) else value
    return [n for n in (item.strip() for item in items) if n and n != "none"]


@dataclass(frozen=True)
class Recipe:
    model: ModelSpec = field(default_factory=ModelSpec)
    quant: QuantSpec = field(default_factory=QuantSpec)
    lora: LoraSpec = field(default_factory=LoraSpec)
    data: DataSpec = field(default_factory=DataSpec)
    train: TrainSpec = field(default_factory=TrainSpec)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


SECTIONS: dict[str, type] = {
    "model": ModelSpec,
    "quant": QuantSpec,
    "lora": LoraSpec,
    "data": DataSpec,
    "train": TrainSpec,
}
_POSITIVE = {
    "lora.rank",
    "lora.alpha",
    "data.max_seq_len",
    "train.micro_batch",
    "train.grad_accum",
    "train.gpus",
    "train.logging_steps",
    "train.save_total_limit",
}
_NON_NEGATIVE = {
    "train.warmup_steps",
    "train.max_steps",
    "train.eval_steps",
    "train.save_steps",
    "train.weight_decay",
    "train.epochs",
    "train.lr",
    "train.max_grad_norm",
}


# -- YAML with line numbers -------------------------------------------------------------------------


def _lines(node: yaml.Node, prefix: str = "") -> dict[str, int]:
    """Dotted key -> 1-based line of every mapping key in a composed YAML document."""
    out: dict[str, int] = {}
    if isinstance(node, yaml.MappingNode):
        for key_node, value_node in node.value:
            key = f"{prefix}{key_node.value}"
            out[key] = key_node.start_mark.line + 1
            out.update(_lines(value_node, key + "."))
    return out


def _type_ok(value: Any, hint: Any) -> bool:
    origin = get_origin(hint)
    if origin in (Union, types.UnionType):
        return any(_type_ok(value, h) for h in get_args(hint))
    if origin is list:
        (inner,) = get_args(hint)
        return isinstance(value, list) and all(_type_ok(v, inner) for v in value)
    if hint is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if hint is int:
        return isinstance(value, int) and not isinstance(value, bool)
    return isinstance(value, hint)


def _type_name(hint: Any) -> str:
    if get_origin(hint) in (Union, types.UnionType):
        return " or ".join(_type_name(h) for h in get_args(hint))
    if get_origin(hint) is list:
        return f"a list of {_type_name(get_args(hint)[0])}"
    return {int: "an integer", float: "a number", bool: "true or false", str: "a string"}.get(hint, str(hint))


def _yaml11_float(value: Any) -> Any:
    """PyYAML reads ``1e-4`` (no dot) as a string under YAML 1.1; take it as the number it means."""
    if isinstance(value, str):
        try:
            return float(value)
        except ValueError:
            return value
    return value


MAX_RECIPE_BYTES = 1 << 20  # a recipe is a page of YAML; a bigger file is refused before parsing
MAX_QUOTED = 80  # characters of a bad value quoted back in a message


def _short(value: Any) -> str:
    """``repr(value)`` cut to a readable length (a message must never quote a huge value whole)."""
    text = repr(value)
    return text if len(text) <= MAX_QUOTED else text[: MAX_QUOTED - 3] + "..."


def _no_aliases(text: str, source: str) -> None:
    """Refuse YAML anchors and aliases: recipes never need them, and nested aliases expand
    exponentially (a 1 KB "billion laughs" document is 10^9 values)."""
    for event in yaml.parse(text, Loader=yaml.SafeLoader):
        if isinstance(event, yaml.AliasEvent) or getattr(event, "anchor", None):
            line = event.start_mark.line + 1 if event.start_mark else 0
            raise UsageError(
                f"{source} uses a YAML anchor or alias (&/*) at line {line}; recipes may not",
                "write each value out in full",
            )


def _at(lines: Mapping[str, int], key: str) -> str:
    line = lines.get(key)
    return f" (line {line})" if line else ""


def build_recipe(data: Mapping[str, Any], lines: Mapping[str, int] | None = None, source: str = "recipe") -> Recipe:
    """Validate a recipe dict into a :class:`Recipe`, reporting every problem at once."""
    lines = lines or {}
    problems: list[str] = []
    sections: dict[str, Any] = {}
    if not isinstance(data, Mapping):
        raise UsageError(f"{source} is not a YAML mapping", "start from `qlora-kit plan --write-recipe`")
    for name, value in data.items():
        if name not in SECTIONS:
            close = difflib.get_close_matches(str(name), list(SECTIONS), n=1)
            hint = f"; did you mean {close[0]!r}?" if close else f"; sections are {', '.join(SECTIONS)}"
            problems.append(f"unknown section {_short(name)}{_at(lines, str(name))}{hint}")
            continue
        if value is None:
            value = {}
        if not isinstance(value, Mapping):
            problems.append(f"{name}{_at(lines, name)} must be a mapping of keys")
            continue
        spec_type = SECTIONS[name]
        hints = get_type_hints(spec_type)
        known = {f.name: f for f in fields(spec_type)}
        kwargs: dict[str, Any] = {}
        for key, v in value.items():
            dotted = f"{name}.{key}"
            if key not in known:
                close = difflib.get_close_matches(str(key), list(known), n=1)
                hint = f"; did you mean {name}.{close[0]}?" if close else f"; valid keys: {', '.join(known)}"
                problems.append(f"unknown key {_short(dotted)}{_at(lines, dotted)}{hint}")
                continue
            v = _yaml11_float(v) if hints[key] is float else v
            if not _type_ok(v, hints[key]):
                problems.append(f"{dotted}{_at(lines, dotted)} must be {_type_name(hints[key])}, got {_short(v)}")
                continue
            choices = known[key].metadata.get("choices")
            if choices and v not in choices:
                problems.append(f"{dotted}{_at(lines, dotted)} must be one of {', '.join(choices)}, got {_short(v)}")
                continue
            if (dotted in _POSITIVE and v <= 0) or (dotted in _NON_NEGATIVE and v < 0):
                kind = "positive" if dotted in _POSITIVE else "zero or more"
                problems.append(f"{dotted}{_at(lines, dotted)} must be {kind}, got {_short(v)}")
                continue
            kwargs[key] = float(v) if hints[key] is float else v
        sections[name] = spec_type(**kwargs)
    recipe = Recipe(**sections)
    if not recipe.model.name:
        problems.append("model.name is required (a catalog name, hub id or local directory)")
    if not 0 <= recipe.lora.dropout < 1:
        problems.append(f"lora.dropout{_at(lines, 'lora.dropout')} must be in [0, 1), got {recipe.lora.dropout}")
    if not 0 <= recipe.data.eval_fraction < 1:
        problems.append(f"data.eval_fraction{_at(lines, 'data.eval_fraction')} must be in [0, 1)")
    if double_quant_refused(recipe.quant.mode, recipe.quant.double_quant) and "quant.double_quant" in lines:
        problems.append(f"quant.double_quant{_at(lines, 'quant.double_quant')} applies to nf4/fp4 only")
    if recipe.train.max_steps == 0 and recipe.train.epochs == 0:
        problems.append("train.max_steps and train.epochs are both 0: nothing to train (set one of them)")
    if recipe.train.offload_ckpt and not recipe.train.grad_ckpt:
        problems.append(f"train.offload_ckpt{_at(lines, 'train.offload_ckpt')} needs train.grad_ckpt: true")
    problems += _fa_correction_problems(recipe, lines)
    unknown = [n for n in report_targets(recipe.train.report_to) if n not in TRACKERS]
    if unknown:
        at = _at(lines, "train.report_to")
        problems.append(
            f"train.report_to{at}: unknown tracker {', '.join(map(_short, unknown))} (trackers: {', '.join(TRACKERS)})"
        )
    if recipe.lora.variant == "dora" and recipe.lora.kernel == "runlora":
        at = _at(lines, "lora.kernel")
        problems.append(f"lora.kernel{at}: runlora has no DoRA layer (set lora.kernel: peft for lora.variant: dora)")
    if problems:
        plural = "s" if len(problems) > 1 else ""
        raise UsageError(
            f"{source}: {len(problems)} problem{plural}: " + "; ".join(problems),
            "fix the recipe (or the --set override) and run again",
        )
    targets = report_targets(recipe.train.report_to)
    return dataclasses.replace(recipe, train=dataclasses.replace(recipe.train, report_to=list(dict.fromkeys(targets))))


def _fa_correction_problems(recipe: Recipe, lines: Mapping[str, int]) -> list[str]:
    """``lora.fa_correction`` is peft's LoRA-FA optimizer: it needs A frozen, replaces the recipe's AdamW and
    pairs each A with its B by parameter name, which an FSDP-flattened model no longer has."""
    if not recipe.lora.fa_correction:
        return []
    at = _at(lines, "lora.fa_correction")
    out = []
    if recipe.lora.variant != "lora-fa":
        out.append(f"lora.fa_correction{at} needs lora.variant: lora-fa")
    if recipe.train.optimizer != "adamw":
        out.append(f"lora.fa_correction{at} is its own AdamW: it needs train.optimizer: adamw")
    if recipe.train.strategy != "ddp" and recipe.train.gpus > 1:
        out.append(f"lora.fa_correction{at} works with train.strategy: ddp only")
    return out


def apply_overrides(data: dict[str, Any], overrides: Iterable[str]) -> dict[str, Any]:
    """Apply ``section.key=value`` overrides (values parsed as YAML) to a recipe dict."""
    for item in overrides:
        key, sep, raw = item.partition("=")
        parts = key.strip().split(".")
        if not sep or len(parts) != 2 or not all(parts):
            raise UsageError(f"--set {_short(item)} is not section.key=value", "e.g. --set train.max_steps=50")
        section = data.setdefault(parts[0], {})
        if not isinstance(section, dict):
            raise UsageError(f"--set {_short(item)}: {parts[0]} is not a mapping", "fix the recipe")
        _no_aliases(raw, f"--set {key.strip()}")
        section[parts[1]] = yaml.safe_load(raw) if raw.strip() else ""
    return data


def load_recipe(path: str | Path, overrides: Iterable[str] = ()) -> Recipe:
    """Read, override and validate a recipe file."""
    path = Path(path)
    try:
        if path.stat().st_size > MAX_RECIPE_BYTES:
            raise UsageError(f"recipe {path} is over {MAX_RECIPE_BYTES >> 20} MiB", "a recipe is a short YAML file")
        text = path.read_text()
    except OSError as exc:
        raise UsageError(f"cannot read recipe {path}: {exc.strerror or exc}", "check the path") from None
    except UnicodeDecodeError:
        raise UsageError(f"recipe {path} is not UTF-8 text", "a recipe is a YAML text file") from None
    try:
        _no_aliases(text, str(path))
        node = yaml.compose(text)
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}" if mark else ""
        raise UsageError(f"{path} is not valid YAML{where}: {getattr(exc, 'problem', exc)}", "fix the syntax") from None
    data = data if data is not None else {}
    lines = _lines(node) if node is not None else {}
    if isinstance(data, dict):
        data = apply_overrides(data, overrides)
    return build_recipe(data, lines, str(path))


def dump_recipe(recipe: Recipe, header: str = "") -> str:
    """The recipe as YAML in block style, one key a line, as recipes/ is written; ``header`` as comments."""
    body = yaml.safe_dump(recipe.to_dict(), sort_keys=False, default_flow_style=False)
    comment = "".join(f"# {line}\n" if line else "#\n" for line in header.splitlines())
    return comment + body
