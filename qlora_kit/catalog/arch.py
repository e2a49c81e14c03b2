"""Model architectures as data.

An :class:`ArchSpec` is everything the memory planner needs to know about a causal LM: the linear
layers of one decoder block (the ones bitsandbytes quantizes and LoRA adapts), the embeddings, the
norms and the head. It is derived from a Hugging Face ``config.json`` dict by :mod:`qlora_kit.catalog.readers`; the
built-in catalog and name resolution are in :mod:`qlora_kit.catalog.models`.

This module must not import torch: ``qlora-kit plan`` answers without it.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any


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
