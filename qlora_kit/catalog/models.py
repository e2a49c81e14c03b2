"""Model architectures as data.

An :class:`ArchSpec` is everything the memory planner needs to know about a causal LM: the linear
layers of one decoder block (the ones bitsandbytes quantizes and LoRA adapts), the embeddings, the
norms and the head. It is derived from a Hugging Face ``config.json`` dict by one small reader per
``model_type`` (a registry, not an if/elif ladder), so the built-in catalog and a user's local
checkpoint go through the same code.

The built-in catalog (``data/models.json``) holds the config dicts of the models in
``shared/reference/model_configs.csv``; their sources are listed in ``docs/catalog.md``. The reader
defaults below are the ``transformers`` 5.x config-class defaults for keys a config may omit.

This module must not import torch: ``qlora-kit plan`` answers without it.
"""

from __future__ import annotations

import difflib
import json
import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from functools import cache
from importlib import resources
from pathlib import Path
from typing import Any

from qlora_kit.errors import UsageError

Config = Mapping[str, Any]


@dataclass(frozen=True)
class LinearSpec:
    """One linear layer inside a decoder block, ``y = x W^T (+ b)`` with W of shape (d_out, d_in).

    ``name`` is the module's leaf name (what peft's ``target_modules`` matches); ``count`` > 1 for
    Mixture-of-Experts weights stored as one 3-D parameter (``experts`` is then True).
    """

    name: str
    d_in: int
    d_out: int
    bias: bool = False
    count: int = 1
    experts: bool = False

    @property
    def weight_numel(self) -> int:
        return self.d_in * self.d_out * self.count

    @property
    def bias_numel(self) -> int:
        return self.d_out * self.count if self.bias else 0


@dataclass(frozen=True)
class ArchSpec:
    """A causal LM's architecture, in the numbers that decide its memory."""

    name: str
    model_type: str
    hidden_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    intermediate_size: int
    vocab_size: int
    max_positions: int | None  # None: no hard limit in the config (ALiBi)
    tie_embeddings: bool
    layer_linears: tuple[LinearSpec, ...]
    norm_kind: str  # "layernorm" (weight + bias) or "rmsnorm" (weight)
    layer_norm_sizes: tuple[int, ...]  # the norms of one block, by width
    final_norm: bool = True
    embed_dim: int = 0  # token-embedding width when it differs from hidden_size (OPT-350m)
    position_rows: int = 0  # rows of a learned position table (OPT, GPT-2)
    extra_linears: tuple[LinearSpec, ...] = ()  # quantizable linears outside the blocks
    extra_norm_sizes: tuple[int, ...] = ()  # norms outside the blocks besides the final one
    lm_head_bias: bool = False
    router_size: int = 0  # per-block MoE router parameters (not an nn.Linear, never quantized)
    mlp_kind: str = "gated"  # "gated" (3 matrices) or "plain" (2 matrices)
    num_experts: int = 0
    experts_per_token: int = 0
    parallel_block: bool = False
    # transformers 5.23's bitsandbytes integration replaces nn.Linear/Conv1D with bnb layers; Falcon's
    # FalconLinear slips through, so a "4-bit" Falcon keeps 16-bit linears (docs/stack-notes.md)
    bnb_quantizable: bool = True
    dtype: str = "bfloat16"
    config: Mapping[str, Any] = field(default_factory=dict, compare=False, repr=False)

    # -- derived counts (parameters, not bytes) -------------------------------------------------
    @property
    def token_embed_width(self) -> int:
        return self.embed_dim or self.hidden_size

    @property
    def q_dim(self) -> int:
        return self.num_heads * self.head_dim

    @property
    def kv_dim(self) -> int:
        return self.num_kv_heads * self.head_dim

    def norm_params(self, size: int) -> int:
        return 2 * size if self.norm_kind == "layernorm" else size

    def param_groups(self) -> dict[str, int]:
        """Parameter counts by what happens to them under quantization.

        ``linear_weight``: weights of the linear layers bitsandbytes quantizes (every nn.Linear
        except the output head); ``expert_weight``: MoE expert tensors (3-D parameters);
        ``linear_bias``; ``embedding`` (tokens + learned positions); ``lm_head`` (0 when tied);
        ``norm``; ``router``.
        """
        layer = self.layer_linears
        linear_weight = self.num_layers * sum(s.weight_numel for s in layer if not s.experts)
        linear_weight += sum(s.weight_numel for s in self.extra_linears)
        expert_weight = self.num_layers * sum(s.weight_numel for s in layer if s.experts)
        linear_bias = self.num_layers * sum(s.bias_numel for s in layer)
        linear_bias += sum(s.bias_numel for s in self.extra_linears)
        embedding = self.vocab_size * self.token_embed_width + self.position_rows * self.hidden_size
        lm_head = 0 if self.tie_embeddings else self.vocab_size * self.token_embed_width
        lm_head += self.vocab_size if self.lm_head_bias else 0
        norm_sizes = list(self.layer_norm_sizes) * self.num_layers + list(self.extra_norm_sizes)
        if self.final_norm:
            norm_sizes.append(self.hidden_size)
        norm = sum(self.norm_params(n) for n in norm_sizes)
        return {
            "linear_weight": linear_weight,
            "expert_weight": expert_weight,
            "linear_bias": linear_bias,
            "embedding": embedding,
            "lm_head": lm_head,
            "norm": norm,
            "router": self.num_layers * self.router_size,
        }

    @property
    def num_params(self) -> int:
        """Unique parameters (a tied head counted once), as ``sum(p.numel())`` reports."""
        return sum(self.param_groups().values())

    def linear_names(self) -> tuple[str, ...]:
        """Leaf names of the adaptable (nn.Linear) layers of a block, in module order."""
        return tuple(s.name for s in self.layer_linears if not s.experts)

    def linears_named(self, names: tuple[str, ...]) -> tuple[LinearSpec, ...]:
        return tuple(s for s in self.layer_linears if s.name in names and not s.experts)

    @property
    def largest_linear(self) -> LinearSpec:
        return max(self.layer_linears + self.extra_linears, key=lambda s: s.d_in * s.d_out)


# -- readers: config dict -> ArchSpec, one per model_type -----------------------------------------

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


# -- the built-in catalog and name resolution -------------------------------------------------------


@cache
def catalog_configs() -> dict[str, dict[str, Any]]:
    """The built-in catalog: hub id -> config dict."""
    text = resources.files("qlora_kit").joinpath("resources/models.json").read_text()
    data: dict[str, dict[str, Any]] = json.loads(text)
    return data


def _key(name: str) -> str:
    """Normalized lookup key: no organisation, lower case, no ``-hf`` suffix or ``meta-`` prefix."""
    key = name.strip().lower().rsplit("/", 1)[-1]
    key = key.removesuffix("-hf")
    return key.removeprefix("meta-")


@cache
def _aliases() -> dict[str, str]:
    return {_key(hf_id): hf_id for hf_id in catalog_configs()}


def catalog_names() -> list[str]:
    return list(catalog_configs())


def lookup(name: str) -> ArchSpec:
    """Resolve a catalog name (case-insensitive, with or without the hub organisation)."""
    hf_id = _aliases().get(_key(name))
    if hf_id is None:
        raise UsageError(f"unknown model {name!r}", _suggest(name))
    return arch_from_config(catalog_configs()[hf_id], hf_id)


def _suggest(name: str) -> str:
    close = difflib.get_close_matches(_key(name), list(_aliases()), n=3, cutoff=0.5)
    if close:
        return "did you mean " + ", ".join(_aliases()[c] for c in close) + "? (`qlora-kit models` lists all)"
    return "`qlora-kit models` lists the catalog; a local directory or config.json path also works"


def _read_config_file(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise UsageError(f"cannot read {path}: {exc}", "pass a valid config.json") from None
    if not isinstance(data, dict):
        raise UsageError(f"{path} is not a JSON object", "pass a Hugging Face config.json")
    return data


def _fetch_hub_config(repo_id: str, timeout_s: float = 5.0) -> dict[str, Any]:
    """Fetch only ``config.json`` of a hub repo (honours HF_ENDPOINT and HF_HUB_OFFLINE)."""
    import urllib.error  # only on this path: it costs a third of the planner's start-up
    import urllib.request

    if os.environ.get("HF_HUB_OFFLINE", "0") not in ("0", "", "false", "False"):
        raise UsageError(
            f"{repo_id!r} is not in the catalog and HF_HUB_OFFLINE is set",
            "pass a local directory or config.json path instead",
        )
    endpoint = os.environ.get("HF_ENDPOINT", "https://huggingface.co").rstrip("/")
    url = f"{endpoint}/{repo_id}/resolve/main/config.json"
    request = urllib.request.Request(url, headers={"User-Agent": "qlora-kit"})
    token = os.environ.get("HF_TOKEN")
    if token:
        request.add_header("Authorization", f"Bearer {token}")
    try:
        with urllib.request.urlopen(request, timeout=timeout_s) as response:
            data = json.loads(response.read().decode())
    except urllib.error.HTTPError as exc:
        raise UsageError(
            f"{repo_id!r} is not in the catalog and the hub answered {exc.code} for its config.json",
            _suggest(repo_id),
        ) from None
    except (urllib.error.URLError, TimeoutError, OSError, json.JSONDecodeError) as exc:
        reason = getattr(exc, "reason", exc)
        raise UsageError(
            f"{repo_id!r} is not in the catalog and its config.json could not be fetched ({reason})",
            "you seem to be offline: pass a local directory or config.json path, or a catalog name",
        ) from None
    if not isinstance(data, dict):
        raise UsageError(f"the hub's config.json for {repo_id!r} is not a JSON object", "pass a local path")
    return data


def resolve_model(name_or_path: str) -> ArchSpec:
    """A catalog name, a local checkpoint directory, a config.json path, or (online) a hub id."""
    path = Path(name_or_path).expanduser()
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise UsageError(f"{path} has no config.json", "pass a Hugging Face model directory")
        return arch_from_config(_read_config_file(path / "config.json"), str(path))
    if path.suffix == ".json" or path.is_file():
        if not path.is_file():
            raise UsageError(f"{path} does not exist", "check the path to config.json")
        return arch_from_config(_read_config_file(path), str(path))
    if _key(name_or_path) in _aliases():
        return lookup(name_or_path)
    if name_or_path.count("/") == 1 and " " not in name_or_path:
        return arch_from_config(_fetch_hub_config(name_or_path), name_or_path)
    raise UsageError(f"unknown model {name_or_path!r}", _suggest(name_or_path))
