"""Activations, logits/loss and transients of one training step: pure arithmetic, no torch.

Maps an :class:`~qlora_kit.catalog.ArchSpec` and a :class:`~qlora_kit.knobs.TrainSetup` onto the
block model of :mod:`qlora_kit.blocks` (what each block keeps for backward) and assembles the peak.

The stack qlora-kit trains with: a 16-bit base is loaded in its dtype and trained without autocast;
a quantized base goes through peft's ``prepare_model_for_kbit_training`` (``upcast="all"``) and runs
under ``torch.autocast`` in the compute dtype, as transformers' Trainer does with ``bf16=True``.

The peak of a step without checkpointing is at the start of backward: every block's saved tensors,
the loss's saved log-softmax, and the two fp32 b x s x vocab gradients nll_loss and log_softmax
produce. With checkpointing it is the larger of that moment (block inputs only) and the
recomputation of one block during backward.
"""

from __future__ import annotations

from qlora_kit.blocks import LAYER, LN_FINAL, ROPE
from qlora_kit.catalog import ArchSpec
from qlora_kit.knobs import TrainSetup
from qlora_kit.saved import Acc, Ctx, Dims, Opts

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
    targets = tuple(name for t in setup.targets for name in UNFUSED.get(t, (t,)))
    (ak, ad), (rk, rd), (ek, ed) = DROPOUTS.get(FAMILY.get(arch.model_type, ""), (("", 0.0),) * 3)
    return Opts(
        dtype=setup.dtype,
        quant=setup.quant,
        kbit_prep=kbit,
        autocast=kbit and setup.dtype != "fp32",
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
    )


def _kept_inputs(arch: ArchSpec, setup: TrainSetup, c: Ctx) -> int:
    """Inputs quantized layers keep on ``ctx`` for backward (not saved tensors, alive all the same),
    once per distinct input: attention input and output, MLP input and hidden. LLM.int8's
    ``MatMul8bitLt`` always does; 4-bit layers only in older stacks (``TrainSetup.kbit_kept_inputs``)."""
    copies = max(1, setup.kbit_kept_inputs) if setup.quant == "int8" else setup.kbit_kept_inputs
    if setup.quant == "none" or copies == 0:
        return 0
    d = c.d
    widths = [d.h, d.q_dim, d.inter] if arch.parallel_block else [d.h, d.q_dim, d.h, d.inter]
    return copies * d.b * d.s * sum(widths) * c.e_h


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
    e_logits = 2 if c.ac else c.e_np
    if f == "gemma2":  # final logit softcapping keeps its tanh
        acc.add("logits_softcap_tanh", bs * d.V * e_logits)
    acc.add("loss.log_softmax_fp32", bs * d.V * FP32)
    acc.add("loss.target_int64", bs * 8 if d.b > 1 else (d.s + 1) * 8)
    acc.add("loss.total_weight", 4)
    return acc


def saved_bytes(arch: ArchSpec, setup: TrainSetup, device: str = "cuda") -> dict[str, object]:
    """Everything autograd keeps for backward after the forward pass, block by block.

    Returns ``layers`` (one dict of named pieces per block), ``nonlayer``, ``recompute`` (one block
    recomputed under checkpointing) and ``total``.
    """
    c = Ctx(family_of(arch), _dims(arch, setup), opts_for(arch, setup, device))
    d = c.d
    layers = []
    for i in range(d.L):
        if setup.grad_ckpt:
            layers.append({"checkpoint.layer_input": d.b * d.s * d.h * c.e_h})
        else:
            piece = LAYER[c.f](c, c.input_grads or i > 0).p
            piece["quant.kept_inputs"] = _kept_inputs(arch, setup, c)
            layers.append(piece)
    recompute = LAYER[c.f](c, True).p
    recompute["quant.kept_inputs"] = _kept_inputs(arch, setup, c)
    nl = nonlayer(c).p
    total = sum(sum(p.values()) for p in layers) + sum(nl.values())
    return {"layers": layers, "nonlayer": nl, "recompute": recompute, "total": total}


def logits_grad_bytes(arch: ArchSpec, setup: TrainSetup) -> int:
    """At the start of backward: nll_loss's gradient and log_softmax's input gradient, fp32, b x s x vocab
    (plus logits the training loop still holds, ``TrainSetup.held_logits_bytes`` each)."""
    return (2 * FP32 + setup.held_logits_bytes) * arch.vocab_size * setup.tokens


def transient_bytes(arch: ArchSpec, setup: TrainSetup) -> int:
    """The dequantized weight of the largest quantized layer, materialized in the compute dtype for
    each training matmul (bitsandbytes ``MatMul4Bit``/``MatMul8bitLt`` backward)."""
    if setup.quant == "none":
        return 0
    s = arch.largest_linear
    return s.d_in * s.d_out * setup.dtype_bytes


def activation_peak_terms(arch: ArchSpec, setup: TrainSetup, device: str = "cuda") -> dict[str, int]:
    """The dynamic part of the peak as named terms that add up to it (see the module docstring)."""
    saved = saved_bytes(arch, setup, device)
    nl: dict[str, int] = saved["nonlayer"]  # type: ignore[assignment]
    layers: list[dict[str, int]] = saved["layers"]  # type: ignore[assignment]
    loss = nl["loss.log_softmax_fp32"] + logits_grad_bytes(arch, setup)
    blocks = sum(sum(p.values()) for p in layers)
    rest = sum(nl.values()) - nl["loss.log_softmax_fp32"]
    transient = transient_bytes(arch, setup)
    if setup.grad_ckpt:
        recompute = sum(saved["recompute"].values())  # type: ignore[attr-defined]
        if recompute > rest + loss:  # recomputing a block (loss and head freed by then) is the peak
            return {"activations": blocks + recompute, "logits_loss": 0, "transient": transient}
    return {"activations": blocks + rest, "logits_loss": loss, "transient": transient}
