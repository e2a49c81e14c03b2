"""Readers: a Hugging Face ``config.json`` dict -> :class:`~qlora_kit.catalog.arch.ArchSpec`.

One small reader per ``model_type`` (a registry, not an if/elif ladder), so the built-in catalog and
a user's local checkpoint go through the same code. The reader defaults below are the
``transformers`` 5.x config-class defaults for keys a config may omit.

This module must not import torch: ``qlora-kit plan`` answers without it.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

from qlora_kit.catalog.arch import ArchSpec, LinearSpec
from qlora_kit.errors import UsageError

Config = Mapping[str, Any]


Reader = Callable[[str, Config], ArchSpec]
_READERS: dict[str, Reader] = {}
# Default LoRA targets per model_type: the attention projections the classic recipes adapt
# (the same choice as peft's per-architecture defaults; a test checks them against peft).
DEFAULT_TARGETS: dict[str, tuple[str, ...]] = {}


def _reader(*model_types: str, targets: tuple[str, ...]) -> Callable[[Reader], Reader]:
    def register(fn: Reader) -> Reader:
        for mt in model_types:
            _READERS[mt] = fn
            DEFAULT_TARGETS[mt] = targets
        return fn

    return register


def _get(cfg: Config, *keys: str, default: Any = None) -> Any:
    """The first of ``keys`` the config sets (gpt2/bloom-style configs use other names)."""
    for key in keys:
        if cfg.get(key) is not None:
            return cfg[key]
    return default


def _require(cfg: Config, name: str, *keys: str) -> int:
    value = _get(cfg, *keys)
    if value is None:
        raise UsageError(
            f"config of {name!r} has no {keys[0]!r}",
            "pass a complete Hugging Face config.json",
        )
    return int(value)


# transformers 5 config-class defaults that differ from "MHA, head_dim = hidden / heads"
_KV_HEADS_DEFAULT = {"mistral": 8, "ministral": 8, "mixtral": 8, "gemma": 16, "gemma2": 4}
_HEAD_DIM_DEFAULT = {"gemma": 256, "gemma2": 256, "qwen3": 128}


def _common(name: str, cfg: Config, *, tie_default: bool) -> dict[str, Any]:
    hidden = _require(cfg, name, "hidden_size", "n_embd", "n_embed", "d_model")
    heads = _require(cfg, name, "num_attention_heads", "n_head", "num_heads")
    mt = str(cfg["model_type"])
    kv_default = _KV_HEADS_DEFAULT.get(mt, heads)
    kv_heads = int(_get(cfg, "num_key_value_heads", "num_kv_heads", default=kv_default))
    return {
        "name": name,
        "model_type": str(cfg["model_type"]),
        "hidden_size": hidden,
        "num_layers": _require(cfg, name, "num_hidden_layers", "n_layer", "num_layers"),
        "num_heads": heads,
        "num_kv_heads": kv_heads,
        "head_dim": int(_get(cfg, "head_dim", default=_HEAD_DIM_DEFAULT.get(mt, hidden // heads))),
        "vocab_size": _require(cfg, name, "vocab_size"),
        "tie_embeddings": bool(_get(cfg, "tie_word_embeddings", default=tie_default)),
        "dtype": str(_get(cfg, "torch_dtype", "dtype", default="float32")),
        "config": dict(cfg),
    }


def _attention(c: dict[str, Any], qkv_bias: bool, o_bias: bool, o_name: str) -> list[LinearSpec]:
    h, q, kv = c["hidden_size"], c["num_heads"] * c["head_dim"], c["num_kv_heads"] * c["head_dim"]
    return [
        LinearSpec("q_proj", h, q, qkv_bias),
        LinearSpec("k_proj", h, kv, qkv_bias),
        LinearSpec("v_proj", h, kv, qkv_bias),
        LinearSpec(o_name, q, h, o_bias),
    ]


@_reader(
    "llama",
    "mistral",
    "qwen2",
    "qwen3",
    "gemma",
    "gemma2",
    "stablelm",
    "mixtral",
    "ministral",
    targets=("q_proj", "v_proj"),
)
def _llama_like(name: str, cfg: Config) -> ArchSpec:
    """Llama-style blocks: separate q/k/v/o, gated MLP (or MoE experts), RMSNorm (LayerNorm: StableLM)."""
    mt = cfg["model_type"]
    c = _common(name, cfg, tie_default=mt in ("gemma", "gemma2"))
    h, inter = c["hidden_size"], _require(cfg, name, "intermediate_size")
    qkv_bias = mt == "qwen2" or bool(_get(cfg, "attention_bias", "use_qkv_bias", default=False))
    o_bias = mt != "qwen2" and bool(_get(cfg, "attention_bias", default=False))
    mlp_bias = bool(_get(cfg, "mlp_bias", default=False))
    linears = _attention(c, qkv_bias, o_bias, "o_proj")
    norms: tuple[int, ...] = (h, h)
    router = experts = per_tok = 0
    if mt == "mixtral":
        experts = int(_get(cfg, "num_local_experts", default=8))
        per_tok = int(_get(cfg, "num_experts_per_tok", default=2))
        router = experts * h
        linears += [
            LinearSpec("gate_up_proj", h, 2 * inter, False, experts, experts=True),
            LinearSpec("down_proj", inter, h, False, experts, experts=True),
        ]
    else:
        linears += [
            LinearSpec("gate_proj", h, inter, mlp_bias),
            LinearSpec("up_proj", h, inter, mlp_bias),
            LinearSpec("down_proj", inter, h, mlp_bias),
        ]
    if mt == "gemma2":
        norms = (h, h, h, h)  # sandwich norms around attention and MLP
    elif mt == "qwen3":
        norms = (h, h, c["head_dim"], c["head_dim"])  # per-head q_norm / k_norm
    return ArchSpec(
        **c,
        intermediate_size=inter,
        max_positions=_get(cfg, "max_position_embeddings", default=2048),
        layer_linears=tuple(linears),
        norm_kind="layernorm" if mt == "stablelm" else "rmsnorm",
        layer_norm_sizes=norms,
        router_size=router,
        num_experts=experts,
        experts_per_token=per_tok,
    )


@_reader("phi3", targets=("qkv_proj",))
def _phi3(name: str, cfg: Config) -> ArchSpec:
    """Phi-3: fused qkv_proj and gate_up_proj, RMSNorm."""
    c = _common(name, cfg, tie_default=False)
    h, inter = c["hidden_size"], _require(cfg, name, "intermediate_size")
    qkv = (c["num_heads"] + 2 * c["num_kv_heads"]) * c["head_dim"]
    linears = (
        LinearSpec("qkv_proj", h, qkv),
        LinearSpec("o_proj", c["num_heads"] * c["head_dim"], h),
        LinearSpec("gate_up_proj", h, 2 * inter),
        LinearSpec("down_proj", inter, h),
    )
    return ArchSpec(
        **c,
        intermediate_size=inter,
        max_positions=_get(cfg, "max_position_embeddings", default=4096),
        layer_linears=linears,
        norm_kind="rmsnorm",
        layer_norm_sizes=(h, h),
    )


@_reader("phi", targets=("q_proj", "v_proj", "fc1", "fc2"))
def _phi(name: str, cfg: Config) -> ArchSpec:
    """Phi-1/1.5/2: parallel attention and MLP behind one shared LayerNorm, biased linears and head."""
    c = _common(name, cfg, tie_default=False)
    h, inter = c["hidden_size"], _require(cfg, name, "intermediate_size")
    linears = [
        *_attention(c, True, True, "dense"),
        LinearSpec("fc1", h, inter, True),
        LinearSpec("fc2", inter, h, True),
    ]
    return ArchSpec(
        **c,
        intermediate_size=inter,
        max_positions=_get(cfg, "max_position_embeddings", default=2048),
        layer_linears=tuple(linears),
        norm_kind="layernorm",
        layer_norm_sizes=(h,),
        lm_head_bias=True,
        mlp_kind="plain",
        parallel_block=True,
    )


@_reader("opt", targets=("q_proj", "v_proj"))
def _opt(name: str, cfg: Config) -> ArchSpec:
    """OPT: learned positions (max + 2 offset rows), biased linears, ReLU MLP, tied head.

    OPT-350m embeds at ``word_embed_proj_dim`` = 512 with project_in/out and is post-LN (no final norm).
    """
    c = _common(name, cfg, tie_default=True)
    h = c["hidden_size"]
    inter = _require(cfg, name, "ffn_dim", "intermediate_size")
    bias = bool(_get(cfg, "enable_bias", default=True))
    embed = int(_get(cfg, "word_embed_proj_dim", default=h))
    max_pos = int(_get(cfg, "max_position_embeddings", default=2048))
    extra: tuple[LinearSpec, ...] = ()
    if embed != h:
        extra = (LinearSpec("project_out", h, embed), LinearSpec("project_in", embed, h))
    pre_ln = bool(_get(cfg, "do_layer_norm_before", default=True))
    final = pre_ln and not bool(_get(cfg, "_remove_final_layer_norm", default=False))
    linears = [
        *_attention(c, bias, bias, "out_proj"),
        LinearSpec("fc1", h, inter, bias),
        LinearSpec("fc2", inter, h, bias),
    ]
    return ArchSpec(
        **c,
        intermediate_size=inter,
        max_positions=max_pos,
        layer_linears=tuple(linears),
        norm_kind="layernorm",
        layer_norm_sizes=(h, h),
        final_norm=final,
        embed_dim=embed if embed != h else 0,
        position_rows=max_pos + 2,
        extra_linears=extra,
        mlp_kind="plain",
    )


def _fused_qkv_block(c: dict[str, Any], qkv_out: int, inter: int, bias: bool) -> tuple[LinearSpec, ...]:
    h = c["hidden_size"]
    return (
        LinearSpec("query_key_value", h, qkv_out, bias),
        LinearSpec("dense", c["num_heads"] * c["head_dim"], h, bias),
        LinearSpec("dense_h_to_4h", h, inter, bias),
        LinearSpec("dense_4h_to_h", inter, h, bias),
    )


@_reader("bloom", targets=("query_key_value",))
def _bloom(name: str, cfg: Config) -> ArchSpec:
    """BLOOM: fused qkv, ALiBi (no position parameters, no length limit), LayerNorm on embeddings."""
    c = _common(name, cfg, tie_default=True)
    h = c["hidden_size"]
    return ArchSpec(
        **c,
        intermediate_size=4 * h,
        max_positions=None,
        layer_linears=_fused_qkv_block(c, 3 * h, 4 * h, True),
        norm_kind="layernorm",
        layer_norm_sizes=(h, h),
        extra_norm_sizes=(h,),
        mlp_kind="plain",
    )


@_reader("gpt_neox", targets=("query_key_value",))
def _gpt_neox(name: str, cfg: Config) -> ArchSpec:
    """GPT-NeoX / Pythia: fused qkv with bias, untied embed_out, two LayerNorms per block."""
    c = _common(name, cfg, tie_default=False)
    h = c["hidden_size"]
    inter = int(_get(cfg, "intermediate_size", default=4 * h))
    return ArchSpec(
        **c,
        intermediate_size=inter,
        max_positions=_get(cfg, "max_position_embeddings", default=2048),
        layer_linears=_fused_qkv_block(c, 3 * h, inter, bool(_get(cfg, "attention_bias", default=True))),
        norm_kind="layernorm",
        layer_norm_sizes=(h, h),
        mlp_kind="plain",
        parallel_block=bool(_get(cfg, "use_parallel_residual", default=True)),
    )


@_reader("falcon", targets=("query_key_value",))
def _falcon(name: str, cfg: Config) -> ArchSpec:
    """Falcon: fused qkv with multi-query (1 KV head) or grouped KV (new decoder architecture)."""
    c = _common(name, cfg, tie_default=True)
    h = c["hidden_size"]
    new_arch = bool(_get(cfg, "new_decoder_architecture", default=False))
    if new_arch:
        kv = int(_get(cfg, "num_kv_heads", default=c["num_heads"]))
    else:
        kv = 1 if _get(cfg, "multi_query", default=True) else c["num_heads"]
    c["num_kv_heads"] = kv
    inter = int(_get(cfg, "ffn_hidden_size", default=4 * h))
    parallel = bool(_get(cfg, "parallel_attn", default=True))
    norms = (h, h) if new_arch or not parallel else (h,)
    qkv = (c["num_heads"] + 2 * kv) * c["head_dim"]
    return ArchSpec(
        **c,
        intermediate_size=inter,
        max_positions=None if _get(cfg, "alibi", default=False) else _get(cfg, "max_position_embeddings", default=2048),
        layer_linears=_fused_qkv_block(c, qkv, inter, bool(_get(cfg, "bias", default=False))),
        norm_kind="layernorm",
        layer_norm_sizes=norms,
        mlp_kind="plain",
        parallel_block=parallel,
        bnb_quantizable=False,
    )


@_reader("gpt2", targets=("c_attn",))
def _gpt2(name: str, cfg: Config) -> ArchSpec:
    """GPT-2: Conv1D layers (weights stored transposed; bitsandbytes and peft handle them as linears)."""
    c = _common(name, cfg, tie_default=True)
    h = c["hidden_size"]
    inter = int(_get(cfg, "n_inner", default=4 * h))
    n_pos = int(_get(cfg, "n_positions", "max_position_embeddings", default=1024))
    linears = (
        LinearSpec("c_attn", h, 3 * h, True),
        LinearSpec("attn.c_proj", h, h, True),
        LinearSpec("c_fc", h, inter, True),
        LinearSpec("mlp.c_proj", inter, h, True),
    )
    return ArchSpec(
        **c,
        intermediate_size=inter,
        max_positions=n_pos,
        layer_linears=linears,
        norm_kind="layernorm",
        layer_norm_sizes=(h, h),
        position_rows=n_pos,
        mlp_kind="plain",
    )


def supported_model_types() -> tuple[str, ...]:
    return tuple(sorted(_READERS))


def arch_from_config(cfg: Config, name: str = "") -> ArchSpec:
    """Derive an :class:`ArchSpec` from a Hugging Face config dict."""
    mt = cfg.get("model_type")
    if mt not in _READERS:
        raise UsageError(
            f"model_type {mt!r} of {name or 'this config'} is not supported",
            f"supported model types: {', '.join(supported_model_types())}",
        )
    return _READERS[str(mt)](name or str(cfg.get("_name_or_path") or mt), cfg)
