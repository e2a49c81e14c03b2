"""A model's context: its native length, whether RoPE scaling can stretch it, and by how much.

``--rope-scaling linear|dynamic|yarn`` (recipe ``model.rope_scaling``) trains sequences longer than the
native context (``max_position_embeddings``); the factor is the sequence length over the native one.
What each kind does (transformers 5, ``modeling_rope_utils``):

- ``linear``: position interpolation, every rotary frequency divided by the factor;
- ``dynamic``: NTK-aware, the rotary base raised for sequences past the native length, recomputed per
  forward pass (shorter sequences keep the original frequencies);
- ``yarn``: frequencies interpolated by band plus an attention temperature; needs the native length
  as ``original_max_position_embeddings``.

Only models with rotary position embeddings can be stretched this way; a learned position table (OPT,
GPT-2) has no row past its end. A model whose config already scales RoPE (Llama 3.1's ``llama3``) is
planned and trained at its own, already long, context.

No torch here: the planner checks the context too.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from qlora_kit.catalog.arch import ArchSpec
from qlora_kit.errors import UsageError
from qlora_kit.knobs import ROPE_SCALINGS

# config keys that hold the native context, by family (gpt2: n_positions; falcon: max_sequence_length ...)
CONTEXT_KEYS = ("max_position_embeddings", "n_positions", "max_sequence_length", "seq_length", "n_ctx")


def text_config(config: Mapping[str, Any]) -> Mapping[str, Any]:
    """The language model's part of a config (multimodal configs nest it as ``text_config``)."""
    inner = config.get("text_config")
    return inner if isinstance(inner, Mapping) else config


def native_context(config: Mapping[str, Any]) -> tuple[str, int] | None:
    """(the key, the native context) a config states, or ``None`` when it states none."""
    config = text_config(config)
    for key in CONTEXT_KEYS:
        value = config.get(key)
        if isinstance(value, int) and not isinstance(value, bool) and value > 0:
            return key, value
    return None


def own_rope_scaling(config: Mapping[str, Any]) -> str | None:
    """The RoPE scaling a config already has (``llama3``, ``yarn``), or ``None`` for plain RoPE."""
    config = text_config(config)
    for key in ("rope_parameters", "rope_scaling"):  # transformers 5 writes the first, older configs the second
        params = config.get(key)
        if isinstance(params, Mapping):
            kind = params.get("rope_type", params.get("type"))
            if kind not in (None, "default"):
                return str(kind)
    return None


# model types whose positions are not rotary: a learned table (opt, gpt2, gpt_bigcode) or ALiBi (bloom, mpt)
NOT_ROPE = ("opt", "gpt2", "gpt_bigcode", "bloom", "mpt")


@dataclass(frozen=True)
class Context:
    """What decides whether a sequence length fits a model."""

    name: str
    native: int | None  # None: the config states no limit (ALiBi)
    rope: bool  # rotary positions, which RoPE scaling can stretch
    own_scaling: str | None  # the RoPE scaling the config already has


def of_arch(arch: ArchSpec) -> Context:
    """The planner's view: a learned position table or no stated limit means no RoPE."""
    rope = arch.position_rows == 0 and arch.max_positions is not None
    return Context(arch.name, arch.max_positions, rope, own_rope_scaling(arch.config))


def of_config(config: Mapping[str, Any], name: str) -> Context:
    """A checkpoint's config.json, for ``train`` (any model type, planned or not)."""
    found = native_context(config)
    rope = text_config(config).get("model_type") not in NOT_ROPE and not text_config(config).get("alibi")
    return Context(name, found[1] if found else None, rope, own_rope_scaling(config))


def rope_factor(seq_len: int, native: int) -> float:
    """How far a sequence stretches the native context; 1.0 (no scaling) when it fits within it."""
    return max(1.0, seq_len / native)


def check_context(ctx: Context, seq_len: int, rope: str | None, seq_flag: str, rope_flag: str) -> None:
    """Refuse a sequence the model cannot take, naming the flags that fix it (``--seq-len`` and
    ``--rope-scaling`` for ``plan``, ``data.max_seq_len`` and ``model.rope_scaling`` for a recipe)."""
    native = ctx.native
    if rope not in (None, "none") and rope not in ROPE_SCALINGS:
        raise UsageError(f"{rope_flag}={rope} is not a RoPE scaling", f"use one of {', '.join(ROPE_SCALINGS)}")
    if native is None or seq_len <= native:
        return
    shorter = f"use {seq_flag}={native} or less"
    if rope in (None, "none"):
        stretch = f"{rope_flag}={'|'.join(ROPE_SCALINGS)}"
        raise UsageError(
            f"{seq_flag}={seq_len} is longer than {ctx.name} allows ({native}), the model's context",
            f"{shorter}, or stretch the context {rope_factor(seq_len, native):.2f}x with {stretch}"
            if ctx.rope
            else f"{shorter} (its positions are learned, so {rope_flag} cannot stretch them)",
        )
    if not ctx.rope:
        raise UsageError(f"{rope_flag}={rope}: {ctx.name} has learned or ALiBi positions, not RoPE", shorter)
    if ctx.own_scaling is not None:
        raise UsageError(
            f"{rope_flag}={rope}: {ctx.name} already scales RoPE ({ctx.own_scaling}) to its {native} tokens", shorter
        )


def rope_parameters(kind: str, seq_len: int, native: int, current: Mapping[str, Any] | None) -> dict[str, Any]:
    """The ``config.rope_parameters`` transformers 5 reads for ``kind`` stretched to ``seq_len``: the model's
    own entries (``rope_theta``, ``partial_rotary_factor``) kept, ``rope_type`` and ``factor`` set, and for
    yarn the native length as ``original_max_position_embeddings``."""
    params = {k: v for k, v in (current or {}).items() if k in ("rope_theta", "partial_rotary_factor")}
    params.update(rope_type=kind, factor=rope_factor(seq_len, native))
    if kind == "yarn":
        params["original_max_position_embeddings"] = native
    return params
