"""One decoder block per family: which tensors it keeps for backward (see ``qlora_kit.plan.saved``).

``rg_in`` says whether the block's input requires grad: false for the first block when the embedding
output does not (no gradient checkpointing and no ``enable_input_require_grads``).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from qlora_kit.plan.saved import Acc, Ctx


# ====================================================================================================
def layer_llama(c: Ctx, rg_in: bool, gemma: bool = False) -> Acc:
    """LlamaDecoderLayer (also Mistral, Qwen2; Gemma2 with gemma=True)."""
    d = c.d
    bs = d.b * d.s
    acc = Acc()
    t = c.targets
    c.rmsnorm(acc, "input_norm", rg_in, gemma)
    c.quant_input(acc, "norm1_out", d.h, c.e_h, rg_in)
    for m, dout in (("q_proj", d.q_dim), ("k_proj", d.kv_dim), ("v_proj", d.kv_dim)):
        c.lora(acc, m, d.h, dout, c.e_h, rg_in, "norm1_out")
    q_rg = rg_in or "q_proj" in t
    k_rg = rg_in or "k_proj" in t
    v_rg = rg_in or "v_proj" in t
    c.attn_core(acc, q_rg, k_rg, v_rg, k_heads=d.nkv, eager_softmax="fp32", pre_softmax_tanh=gemma)
    attn_rg = q_rg or k_rg or v_rg
    o_rg = c.attn_out(acc, attn_rg, "o_proj", d.q_dim, None)
    if gemma:
        c.rmsnorm(acc, "post_attention_norm", o_rg, True)
    res_rg = rg_in or o_rg
    c.rmsnorm(acc, "pre_mlp_norm", res_rg, gemma)
    c.quant_input(acc, "norm2_out", d.h, c.e_h, res_rg)
    for m in ("gate_proj", "up_proj"):
        c.lora(acc, m, d.h, d.inter, c.e_h, res_rg, "norm2_out")
    g_rg = res_rg or "gate_proj" in t
    u_rg = res_rg or "up_proj" in t
    acc.add("mlp.gate_out(act input)", bs * d.inter * c.e_m, g_rg)
    acc.add("mlp.act_out", bs * d.inter * c.e_m, u_rg)
    acc.add("mlp.up_out", bs * d.inter * c.e_m, g_rg)
    prod_rg = g_rg or u_rg
    c.quant_input(acc, "down_in", d.inter, c.e_m, prod_rg)
    c.lora(acc, "down_proj", d.inter, d.h, c.e_m, prod_rg, "down_in")
    if gemma:
        c.rmsnorm(acc, "post_mlp_norm", prod_rg or "down_proj" in t, True)
    return acc


def layer_opt(c: Ctx, rg_in: bool) -> Acc:
    d = c.d
    bs = d.b * d.s
    acc = Acc()
    t = c.targets
    c.layernorm(acc, "self_attn_layer_norm", rg_in)
    c.quant_input(acc, "ln1_out", d.h, c.e_h, rg_in)
    for m in ("q_proj", "k_proj", "v_proj"):
        c.lora(acc, m, d.h, d.h, c.e_h, rg_in, "ln1_out")
    q_rg, k_rg, v_rg = (rg_in or m in t for m in ("q_proj", "k_proj", "v_proj"))
    c.attn_core(acc, q_rg, k_rg, v_rg, k_heads=d.nh, eager_softmax="fp32")
    attn_rg = q_rg or k_rg or v_rg
    o_rg = c.attn_out(acc, attn_rg, "out_proj", d.h, "resid_dropout1.mask")
    res_rg = rg_in or o_rg
    c.layernorm(acc, "final_layer_norm", res_rg)
    c.quant_input(acc, "ln2_out", d.h, c.e_h, res_rg)
    c.lora(acc, "fc1", d.h, d.inter, c.e_h, res_rg, "ln2_out")
    f_rg = res_rg or "fc1" in t
    acc.add("mlp.relu_out", bs * d.inter * c.e_m, f_rg)
    if f_rg:
        acc._keys.add("fc2_in")  # relu saves its output, which is also fc2's (LoRA) input
    c.quant_input(acc, "fc2_in", d.inter, c.e_m, f_rg)
    c.lora(acc, "fc2", d.inter, d.h, c.e_m, f_rg, "fc2_in")
    f2_rg = f_rg or "fc2" in t
    acc.add("resid_dropout2.mask", bs * d.h * c.mask_bytes(c.lin_out(c.e_m)), c.p_resid > 0 and f2_rg)
    return acc


def layer_gpt_neox(c: Ctx, rg_in: bool) -> Acc:
    """use_parallel_residual=True (pythia default): x + attn(ln1(x)) + mlp(ln2(x))."""
    d = c.d
    acc = Acc()
    t = c.targets
    c.layernorm(acc, "input_layernorm", rg_in)
    c.quant_input(acc, "ln1_out", d.h, c.e_h, rg_in)
    c.lora(acc, "query_key_value", d.h, 3 * d.h, c.e_h, rg_in, "ln1_out")
    qkv_rg = rg_in or "query_key_value" in t
    # q,k: rope output (new tensors); v: view into the fused qkv projection output (3*h wide)
    c.attn_core(acc, qkv_rg, qkv_rg, qkv_rg, k_heads=d.nh, v_storage=3 * d.h, eager_softmax="fp32", out_is_o_in=False)
    c.attn_out(acc, qkv_rg, "dense", d.h, "attn_dropout.mask")
    c.layernorm(acc, "post_attention_layernorm", rg_in, input_shared=True)
    c.quant_input(acc, "ln2_out", d.h, c.e_h, rg_in)
    c.mlp(acc, rg_in, "ln2_out", "dense_h_to_4h", "dense_4h_to_h", "mlp.gelu_input", 1, "mlp_dropout.mask")
    return acc


def layer_phi(c: Ctx, rg_in: bool) -> Acc:
    """PhiDecoderLayer: x + resid_dropout(attn(ln(x))) + resid_dropout(mlp(ln(x)))"""
    d = c.d
    acc = Acc()
    t = c.targets
    c.layernorm(acc, "input_layernorm", rg_in)
    c.quant_input(acc, "ln_out", d.h, c.e_h, rg_in)
    for m, dout in (("q_proj", d.q_dim), ("k_proj", d.kv_dim), ("v_proj", d.kv_dim)):
        c.lora(acc, m, d.h, dout, c.e_h, rg_in, "ln_out")
    q_rg, k_rg, v_rg = (rg_in or m in t for m in ("q_proj", "k_proj", "v_proj"))
    c.attn_core(acc, q_rg, k_rg, v_rg, k_heads=d.nkv, eager_softmax="fp32", out_is_o_in=False)
    attn_rg = q_rg or k_rg or v_rg
    c.attn_out(acc, attn_rg, "dense", d.q_dim, "resid_dropout_attn.mask")
    # NewGELUActivation (python): saves x, tanh(..), 0.5*x, 1+tanh(..)
    c.mlp(acc, rg_in, "ln_out", "fc1", "fc2", "mlp.activation", c.o.act_saved, "resid_dropout_mlp.mask")
    return acc


def layer_falcon(c: Ctx, rg_in: bool, new_arch: bool = False) -> Acc:
    """Falcon parallel_attn.  Old arch (falcon-7b): multi_query (1 kv head), one LN.  New arch (40b/180b):
    ln_attn + ln_mlp, kv heads broadcast to nh before the kernel.  Falcon always builds a 4D mask."""
    d = c.d
    bs = d.b * d.s
    acc = Acc()
    t = c.targets
    if new_arch:
        c.layernorm(acc, "ln_attn", rg_in)
        c.layernorm(acc, "ln_mlp", rg_in, input_shared=True)
    else:
        c.layernorm(acc, "input_layernorm", rg_in)
    qkv_out = d.q_dim + 2 * (d.kv_dim if new_arch else d.hd)
    c.quant_input(acc, "ln_out", d.h, c.e_h, rg_in)
    c.lora(acc, "query_key_value", d.h, qkv_out, c.e_h, rg_in, "ln_out")
    qkv_rg = rg_in or "query_key_value" in t
    acc.add("attn.index_tensors(int64)", 16, qkv_rg)
    if new_arch:
        c.attn_core(acc, qkv_rg, qkv_rg, qkv_rg, k_heads=d.nh, mask_to_sdpa=True, eager_softmax="hidden")
    else:
        c.attn_core(
            acc, qkv_rg, qkv_rg, qkv_rg, k_heads=1, gqa_capable=False, mask_to_sdpa=True, eager_softmax="hidden"
        )
    c.attn_out(acc, qkv_rg, "dense", d.q_dim, None)
    c.quant_input(acc, "ln_out" if not new_arch else "ln_mlp_out", d.h, c.e_h, rg_in)
    mlp_in = "ln_out" if not new_arch else "ln_mlp_out"
    mlp_rg = c.mlp(acc, rg_in, mlp_in, "dense_h_to_4h", "dense_4h_to_h", "mlp.gelu_input", 1, None)
    out_rg = mlp_rg or qkv_rg or "dense" in t
    # output = dropout_add(mlp_out + attn_out, residual, hidden_dropout)
    acc.add("hidden_dropout.mask", bs * d.h * c.mask_bytes(c.lin_out(c.e_m)), c.p_resid > 0 and out_rg)
    return acc


def layer_bloom(c: Ctx, rg_in: bool) -> Acc:
    d = c.d
    acc = Acc()
    t = c.targets
    c.layernorm(acc, "input_layernorm", rg_in)
    c.quant_input(acc, "ln1_out", d.h, c.e_h, rg_in)
    c.lora(acc, "query_key_value", d.h, 3 * d.h, c.e_h, rg_in, "ln1_out")
    qkv_rg = rg_in or "query_key_value" in t
    c.attn_core(acc, qkv_rg, qkv_rg, qkv_rg, k_heads=d.nh, eager_softmax="fp32")  # eager only (alibi baddbmm)
    o_rg = c.attn_out(acc, qkv_rg, "dense", d.h, "hidden_dropout1.mask")
    res_rg = rg_in or o_rg
    c.layernorm(acc, "post_attention_layernorm", res_rg)
    c.quant_input(acc, "ln2_out", d.h, c.e_h, res_rg)
    c.mlp(acc, res_rg, "ln2_out", "dense_h_to_4h", "dense_4h_to_h", "mlp.bloom_gelu_input", 1, "hidden_dropout2.mask")
    return acc


def layer_gpt2(c: Ctx, rg_in: bool) -> Acc:
    d = c.d
    acc = Acc()
    t = c.targets
    c.layernorm(acc, "ln_1", rg_in)
    c.quant_input(acc, "ln1_out", d.h, c.e_h, rg_in)
    c.lora(acc, "c_attn", d.h, 3 * d.h, c.e_h, rg_in, "ln1_out")
    qkv_rg = rg_in or "c_attn" in t
    # sdpa: q,k,v are views of the fused c_attn output (one 3h storage); eager: softmax in scores dtype
    c.attn_core(acc, qkv_rg, qkv_rg, qkv_rg, k_heads=d.nh, qkv_shared_storage=3 * d.h, eager_softmax="same")
    o_rg = c.attn_out(acc, qkv_rg, "attn.c_proj", d.h, "resid_dropout.mask")
    res_rg = rg_in or o_rg
    c.layernorm(acc, "ln_2", res_rg)
    c.quant_input(acc, "ln2_out", d.h, c.e_h, res_rg)
    c.mlp(acc, res_rg, "ln2_out", "c_fc", "mlp.c_proj", "mlp.activation", c.o.act_saved, "mlp_dropout.mask")
    return acc


LAYER: dict[str, Callable[[Ctx, bool], Acc]] = {
    "llama": layer_llama,
    "mistral": layer_llama,
    "qwen2": layer_llama,
    "gemma2": lambda c, rg: layer_llama(c, rg, gemma=True),
    "opt": layer_opt,
    "gpt_neox": layer_gpt_neox,
    "phi": layer_phi,
    "falcon": layer_falcon,
    "falcon_new": lambda c, rg: layer_falcon(c, rg, new_arch=True),
    "bloom": layer_bloom,
    "gpt2": layer_gpt2,
}
ROPE = {"llama", "mistral", "qwen2", "gemma2", "gpt_neox", "phi", "falcon", "falcon_new"}
LN_FINAL = {"opt", "gpt_neox", "phi", "falcon", "falcon_new", "bloom", "gpt2"}


@dataclass(frozen=True)
class MlpShape:
    """How a family's MLP runs around its output linear, where the peaks outside backward's start sit.

    ``last``: the output linear (as large as any, and the last of the block: its dequantized weight is the
    forward's transient when nearly every block's tensors are saved); ``gated``: act(gate(x)) * up(x), three
    intermediate-wide tensors meet in its backward (two for act(fc1(x))); ``input_alive``: the MLP's input
    stays referenced while it runs (an argument of an MLP module's ``forward``; OPT's decoder layer
    reassigns it); ``act_saves_output``: the activation keeps its output, the output linear's input (ReLU);
    ``in_key``/``last_key``: the storage keys of the MLP's and the output linear's inputs (``Acc.saved``);
    ``after``: prefixes of pieces the block saves after the output linear; ``out_dropout``: the mask piece
    of the residual dropout on the MLP's output; ``embeddings``: embedding outputs the model's forward
    holds until it returns (token and learned-position embeddings); ``embedding_is_input``: the token
    embedding's output is the first block's input (else, when ``enable_input_require_grads`` makes it a
    leaf that requires grad, autograd holds it apart until backward ends).
    """

    last: str
    gated: bool
    input_alive: bool
    act_saves_output: bool
    in_key: str
    last_key: str
    after: tuple[str, ...] = ()
    out_dropout: str = ""
    embeddings: int = 1
    embedding_is_input: bool = True


_LLAMA_MLP = MlpShape("down_proj", True, True, False, "norm2_out", "down_in")
MLP: dict[str, MlpShape] = {
    "llama": _LLAMA_MLP,
    "mistral": _LLAMA_MLP,
    "qwen2": _LLAMA_MLP,
    "gemma2": MlpShape("down_proj", True, True, False, "norm2_out", "down_in", after=("post_mlp_norm.",)),
    "opt": MlpShape(
        "fc2",
        False,
        False,
        True,
        "ln2_out",
        "fc2_in",
        ("resid_dropout2.",),
        "resid_dropout2.mask",
        embeddings=2,
        embedding_is_input=False,
    ),
    "gpt_neox": MlpShape(
        "dense_4h_to_h", False, True, False, "ln2_out", "f2_in", ("mlp_dropout.",), "mlp_dropout.mask"
    ),
    "phi": MlpShape("fc2", False, True, False, "ln_out", "f2_in", ("resid_dropout_mlp.",), "resid_dropout_mlp.mask"),
    "falcon": MlpShape(
        "dense_4h_to_h", False, True, False, "ln_out", "f2_in", ("hidden_dropout.",), "hidden_dropout.mask"
    ),
    "falcon_new": MlpShape(
        "dense_4h_to_h", False, True, False, "ln_mlp_out", "f2_in", ("hidden_dropout.",), "hidden_dropout.mask"
    ),
    "bloom": MlpShape(
        "dense_4h_to_h",
        False,
        True,
        False,
        "ln2_out",
        "f2_in",
        ("hidden_dropout2.",),
        "hidden_dropout2.mask",
        embedding_is_input=False,
    ),
    "gpt2": MlpShape(
        "mlp.c_proj",
        False,
        True,
        False,
        "ln2_out",
        "f2_in",
        ("mlp_dropout.",),
        "mlp_dropout.mask",
        embeddings=2,
        embedding_is_input=False,
    ),
}
