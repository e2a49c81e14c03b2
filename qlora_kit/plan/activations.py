"""Activations, logits/loss and transients of one training step: pure arithmetic, no torch.

Maps an :class:`~qlora_kit.catalog.arch.ArchSpec` and a :class:`~qlora_kit.knobs.TrainSetup` onto the
block model of :mod:`qlora_kit.plan.blocks` (what each block keeps for backward); :mod:`qlora_kit.plan.moments`
assembles the peak from it.

The stack qlora-kit trains with: a 16-bit base is loaded in its dtype and trained without autocast;
a quantized base goes through peft's ``prepare_model_for_kbit_training`` (``upcast="all"``) and runs
under ``torch.autocast`` in the compute dtype, as transformers' Trainer does with ``bf16=True``.
"""

from __future__ import annotations

from qlora_kit.catalog.arch import ArchSpec
from qlora_kit.knobs import LOSS_CHUNK_TOKENS, TrainSetup
from qlora_kit.plan.blocks import LAYER, LN_FINAL, ROPE
from qlora_kit.plan.saved import Acc, Ctx, Dims, Opts

# model_type -> the block model that describes it. Families marked approximate were not measured:
# they borrow the nearest measured block (documented in docs/planner.md).
FAMILY = {
    "llama": "llama",
    "mistral": "mistral",
    "qwen2": "qwen2",
    "gemma2": "gemma2",
    "opt": "opt",
    "gpt_neox": "gpt_neox",
    "phi": "phi",
    "bloom": "bloom",
    "gpt2": "gpt2",
    "falcon": "falcon",
    # approximate
    "ministral": "llama",
    "qwen3": "llama",
    "mixtral": "llama",
    "stablelm": "llama",
    "phi3": "llama",
    "gemma": "llama",
}
MEASURED = {"llama", "mistral", "qwen2", "gemma2", "opt", "gpt_neox", "phi", "bloom", "gpt2", "falcon"}
EAGER_ONLY = {"gemma2", "bloom"}  # transformers refuses sdpa for these
# (config key, transformers default) of the attention-probability, residual and embedding dropouts
DROPOUTS: dict[str, tuple[tuple[str, float], tuple[str, float], tuple[str, float]]] = {
    "opt": (("attention_dropout", 0.0), ("dropout", 0.1), ("", 0.0)),
    "gpt2": (("attn_pdrop", 0.1), ("resid_pdrop", 0.1), ("embd_pdrop", 0.1)),
    "gpt_neox": (("attention_dropout", 0.0), ("hidden_dropout", 0.0), ("", 0.0)),
    "phi": (("attention_dropout", 0.0), ("resid_pdrop", 0.0), ("embd_pdrop", 0.0)),
    "bloom": (("attention_dropout", 0.0), ("hidden_dropout", 0.0), ("", 0.0)),
    "falcon": (("attention_dropout", 0.0), ("hidden_dropout", 0.0), ("", 0.0)),
}
ROTARY_FRACTION = {
    "gpt_neox": ("rotary_pct", 0.25),
    "phi": ("partial_rotary_factor", 0.5),
    "stablelm": ("partial_rotary_factor", 0.25),
}
# fused Phi-3 layers, described by the separate layers of the llama block
UNFUSED = {"qkv_proj": ("q_proj", "k_proj", "v_proj"), "gate_up_proj": ("gate_proj", "up_proj")}
FP32 = 4
# tensors the activation of a plain (phi, gpt2) MLP keeps: transformers' NewGELUActivation ("gelu_new")
# is written in pointwise ops and keeps four; torch's native kernels keep their input only
ACT_SAVED = {"gelu_new": 4}


def family_of(arch: ArchSpec) -> str:
    family = FAMILY.get(arch.model_type, "llama")
    if family == "falcon" and arch.config.get("new_decoder_architecture"):
        return "falcon_new"
    return family


def _dims(arch: ArchSpec, setup: TrainSetup) -> Dims:
    inter = arch.intermediate_size * max(1, arch.experts_per_token)
    rot = None
    if arch.model_type in ROTARY_FRACTION:
        key, default = ROTARY_FRACTION[arch.model_type]
        rot = int(arch.head_dim * float(arch.config.get(key, default)))
    return Dims(
        b=setup.batch_size,
        s=setup.seq_len,
        h=arch.hidden_size,
        nh=arch.num_heads,
        nkv=arch.num_kv_heads,
        hd=arch.head_dim,
        inter=inter,
        V=arch.vocab_size,
        L=arch.num_layers,
        r=setup.rank,
        rot=rot,
    )


def _config_float(arch: ArchSpec, key: str, default: float) -> float:
    value = arch.config.get(key) if key else None
    return float(value) if value is not None else default


def opts_for(arch: ArchSpec, setup: TrainSetup, device: str = "cuda") -> Opts:
    """The block model's options for a setup, on the device the step runs on."""
    kbit = setup.quant != "none" and setup.upcast == "all"
    # the selective upcast (qlora_kit.model.savers) keeps the step 16-bit and still trains under autocast
    selective = setup.quant != "none" and setup.upcast == "selective"
    targets = tuple(name for t in setup.targets for name in UNFUSED.get(t, (t,)))
    (ak, ad), (rk, rd), (ek, ed) = DROPOUTS.get(FAMILY.get(arch.model_type, ""), (("", 0.0),) * 3)
    return Opts(
        dtype=setup.dtype,
        quant=setup.quant,
        kbit_prep=kbit,
        autocast=(kbit or selective) and setup.dtype != "fp32",
        ln_fp32=selective,
        loss_chunk=loss_rows(setup) if setup.chunked_loss else 0,
        attn="eager" if family_of(arch) in EAGER_ONLY else setup.attn,
        device=device,
        mask="pad" if setup.padded else "none",
        targets=targets,
        lora_dropout=setup.lora_dropout,
        act_saved=ACT_SAVED.get(str(arch.config.get("hidden_act") or arch.config.get("activation_function")), 1),
        gc=setup.grad_ckpt,
        attn_dropout=_config_float(arch, ak, ad),
        resid_dropout=_config_float(arch, rk, rd),
        embd_dropout=_config_float(arch, ek, ed),
        lora_fa=setup.lora_fa,
        runlora=setup.runlora,
        dora=setup.dora,
        runlora_all=setup.runlora and setup.lora_dropout == 0 and set(targets) >= set(arch.linear_names()),
    )


def _older_stack_kept_inputs(arch: ArchSpec, setup: TrainSetup, c: Ctx) -> int:
    """Inputs 4-bit layers of older stacks kept on ``ctx`` (``TrainSetup.kbit_kept_inputs`` steps' worth;
    bitsandbytes 0.41-0.42's ``MatMul4Bit``), once per distinct input: attention input and output, MLP
    input and hidden. Those stacks are not transformers + peft, so no storage is assumed shared."""
    copies = max(1, setup.kbit_kept_inputs) if setup.quant == "int8" else setup.kbit_kept_inputs
    if setup.quant == "none" or copies == 0:
        return 0
    d = c.d
    widths = [d.h, d.q_dim, d.inter] if arch.parallel_block else [d.h, d.q_dim, d.h, d.inter]
    return copies * d.b * d.s * sum(widths) * c.e_h


def _int8_kept_inputs(acc: Acc, checkpointed: bool) -> int:
    """qlora-kit's LLM.int8 (bitsandbytes 0.50): every quantized linear whose input requires grad keeps
    that input as ``ctx.A``, alive until the graph is freed after backward (a ``ctx`` attribute is not a
    saved tensor that backward releases node by node). Without checkpointing an input autograd saves
    anyway costs nothing more; under checkpointing saved tensors are dropped but ``ctx`` attributes are
    not, so every block keeps all of them."""
    return sum(nb for key, (nb, rg) in acc.quant_inputs.items() if rg and (checkpointed or not acc.saved(key)))


def _kept_inputs(arch: ArchSpec, setup: TrainSetup, c: Ctx, acc: Acc, checkpointed: bool) -> int:
    if setup.kbit_kept_inputs:
        return 0 if checkpointed else _older_stack_kept_inputs(arch, setup, c)
    if setup.quant == "int8":
        return _int8_kept_inputs(acc, checkpointed)
    return 0


def nonlayer(c: Ctx) -> Acc:
    """Outside the blocks: embedding-side norms and dropouts, rotary tables, the final norm, the
    head's weight copy under autocast, and the loss (transformers' ``ForCausalLMLoss``: fp32
    log-softmax over all b x s positions, int64 targets)."""
    d, o, f = c.d, c.o, c.f
    bs = d.b * d.s
    acc = Acc()
    ig = c.input_grads
    if f == "bloom":
        c.layernorm(acc, "word_embeddings_layernorm", ig)
    if f in ("gpt2", "phi"):
        acc.add("embd_dropout.mask", bs * d.h * c.mask_bytes(c.e_h), ig and c.p_embd > 0)
    if f == "gpt_neox":  # its embedding dropout is the hidden dropout
        acc.add("embd_dropout.mask", bs * d.h * c.mask_bytes(c.e_h), ig and c.p_resid > 0)
    if f in ROPE and not o.gc:  # cos/sin shared by all blocks (held by closures under checkpointing)
        acc.add("rope.cos+sin", 2 * d.s * (d.rot or d.hd) * c.e_h)
    if f in LN_FINAL:
        c.layernorm(acc, "final_norm", True)
    else:
        c.rmsnorm(acc, "final_norm", True, gemma=f == "gemma2")
    if c.ac and c.e_np == FP32:  # autocast keeps a bf16 copy of the fp32 (upcast) head weight
        acc.add("lm_head.weight_bf16_copy", d.V * d.h * 2)
    if o.loss_chunk:  # chunked loss (qlora_kit.model.savers): its checkpointed chunks keep their inputs only
        acc.add("loss.chunked.hidden", bs * d.h * c.e_h)
        acc.add("loss.chunked.labels_int64", bs * 8)
        acc.add("loss.chunked.count_int64", 8)  # the mean's divisor
        return acc
    e_logits = 2 if c.ac else c.e_np
    if f == "gemma2":  # final logit softcapping keeps its tanh
        acc.add("logits_softcap_tanh", bs * d.V * e_logits)
    acc.add("loss.log_softmax_fp32", bs * d.V * FP32)
    acc.add("loss.target_int64", bs * 8 if d.b > 1 else (d.s + 1) * 8)
    acc.add("loss.total_weight", 4)
    return acc


def ctx_for(arch: ArchSpec, setup: TrainSetup, device: str) -> Ctx:
    return Ctx(family_of(arch), _dims(arch, setup), opts_for(arch, setup, device))


def saved_bytes(arch: ArchSpec, setup: TrainSetup, device: str = "cuda") -> dict[str, object]:
    """Everything autograd keeps for backward after the forward pass, block by block.

    Returns ``layers`` (one dict of named pieces per block), ``nonlayer``, ``recompute`` (one block
    recomputed under checkpointing), ``total`` and ``offloaded``. Under checkpointing a block keeps its input
    (and LLM.int8's ``ctx`` inputs, which checkpointing does not drop); with ``offload_ckpt`` the inputs are
    packed to host memory (``qlora_kit.model.savers``): ``offloaded``, not in ``total``.
    """
    c = ctx_for(arch, setup, device)
    d = c.d
    full = LAYER[c.f](c, True)  # a block whose input requires grad
    first = full if c.input_grads else LAYER[c.f](c, False)  # the first block, fed by the embedding
    layers = []
    offload = setup.grad_ckpt and setup.offload_ckpt
    for i in range(d.L):
        acc = first if i == 0 else full
        if setup.grad_ckpt:
            piece = {} if offload else {"checkpoint.layer_input": d.b * d.s * d.h * c.e_h}
            kept = _kept_inputs(arch, setup, c, full, True)
        else:
            piece, kept = dict(acc.p), _kept_inputs(arch, setup, c, acc, False)
        piece["quant.kept_inputs"] = kept
        layers.append(piece)
    recompute = dict(full.p)
    if setup.grad_ckpt and setup.kbit_kept_inputs:  # older stacks: the recomputed block's inputs
        recompute["quant.kept_inputs"] = _older_stack_kept_inputs(arch, setup, c)
    nl = nonlayer(c).p
    total = sum(sum(p.values()) for p in layers) + sum(nl.values())
    offloaded = d.L * d.b * d.s * d.h * c.e_h if offload else 0
    return {"layers": layers, "nonlayer": nl, "recompute": recompute, "total": total, "offloaded": offloaded}


def loss_rows(setup: TrainSetup) -> int:
    """Rows of logits alive at once: every token's, or one chunk's with the chunked loss."""
    return min(LOSS_CHUNK_TOKENS, setup.tokens) if setup.chunked_loss else setup.tokens


def logits_grad_bytes(arch: ArchSpec, setup: TrainSetup) -> int:
    """At the start of backward: nll_loss's gradient and log_softmax's input gradient, fp32, b x s x vocab
    (plus logits the training loop still holds, ``TrainSetup.held_logits_bytes`` each); with the chunked
    loss, of one chunk's rows (its recomputation also makes the chunk's log-softmax again)."""
    return (2 * FP32 + setup.held_logits_bytes) * arch.vocab_size * loss_rows(setup)


def transient_bytes(arch: ArchSpec, setup: TrainSetup) -> int:
    """The dequantized weight of the largest quantized layer, materialized for each training matmul:
    bitsandbytes' 4-bit ``gemm_4bit`` (forward) and ``MatMul4Bit`` backward dequantize to the compute
    dtype; LLM.int8 (``MatMul8bitFp`` on CPU, ``MatMul8bitLt``'s backward on CUDA) to its input's dtype,
    fp32 after k-bit preparation."""
    if setup.quant == "none" or not arch.bnb_quantizable:
        return 0
    s = arch.largest_linear
    if setup.quant == "int8":
        return s.d_in * s.d_out * (FP32 if setup.upcast == "all" else setup.dtype_bytes)
    return s.d_in * s.d_out * setup.dtype_bytes
