"""Activation, logits/loss and transient memory of one training step: pure arithmetic, no torch.

What autograd keeps between forward and backward is read off the code qlora-kit trains with
(transformers 5 decoder blocks, peft LoRA layers, bitsandbytes base layers) and checked against the
bytes saved for backward that ``torch.autograd.graph.saved_tensors_hooks`` sees on tiny models
(tests/test_activations.py). Per decoder block, for n = batch x tokens rows:

- a frozen base linear keeps nothing: its weight gradient is not needed and the input gradient needs
  only the weight (bitsandbytes ``MatMul4Bit`` keeps the packed weight on ``ctx``). LLM.int8
  ``MatMul8bitLt`` is the exception: it keeps its input on ``ctx`` for the backward matmul;
- a LoRA branch keeps the input of A in fp32 (peft casts it to the adapter dtype; with dropout, the
  dropped copy plus a 1-byte mask) and A's output (n x r, fp32) for B;
- RMSNorm keeps an fp32 copy of its input and the fp32 reciprocal RMS per row; LayerNorm keeps its
  input plus fp32 mean and rstd per row;
- SDPA (flash / memory-efficient kernels) keeps q, k, v, the output and an fp32 logsumexp per head;
  eager attention keeps q and the repeated k and v, the fp32 softmax and the probabilities in the
  activation dtype (one tensor when that is fp32);
- a gated MLP keeps the gate output, the activation output and the up output; a plain MLP keeps
  what its activation function needs.

The activation dtype is the compute dtype, except after peft's k-bit preparation upcasts the
embeddings and norms to fp32: from then on the residual stream and every base layer's output are fp32
(bitsandbytes casts its output back to the input dtype), so activations take 4 bytes per value.
"""

from __future__ import annotations

from qlora_kit.catalog import ArchSpec, LinearSpec
from qlora_kit.knobs import TrainSetup

FP32 = 4
MASK = 1  # torch's dropout keeps a bool mask
# Values an activation function keeps per element of its input (torch's native kernels keep one
# tensor; transformers' NewGELUActivation for gelu_new is built from pointwise ops and keeps more).
ACT_SAVED = {"gelu_new": 4, "gelu_fast": 3, "gelu_pytorch_tanh": 1}


def activation_dtype_bytes(setup: TrainSetup) -> int:
    """Bytes per activation value: fp32 once k-bit preparation upcasts embeddings and norms."""
    if setup.quant != "none" and setup.upcast == "all":
        return FP32
    return setup.dtype_bytes


def _act_saved(arch: ArchSpec) -> int:
    act = str(
        arch.config.get("hidden_act")
        or arch.config.get("hidden_activation")
        or arch.config.get("activation_function")
        or "silu"
    )
    return ACT_SAVED.get(act, 1)


def _input_groups(arch: ArchSpec) -> dict[str, str]:
    """Which linears of a block read the same tensor (q/k/v read one norm output, gate/up another)."""
    shared = {
        "q_proj": "attn_in",
        "k_proj": "attn_in",
        "v_proj": "attn_in",
        "qkv_proj": "attn_in",
        "query_key_value": "attn_in",
        "c_attn": "attn_in",
        "gate_proj": "mlp_in",
        "up_proj": "mlp_in",
        "gate_up_proj": "mlp_in",
        "fc1": "mlp_in",
        "c_fc": "mlp_in",
        "dense_h_to_4h": "mlp_in",
    }
    groups = {s.name: shared.get(s.name, s.name) for s in arch.layer_linears}
    if arch.parallel_block:  # attention and MLP read the same normed input
        groups = {k: "attn_in" if v == "mlp_in" else v for k, v in groups.items()}
    return groups


def _lora_saved_per_token(arch: ArchSpec, setup: TrainSetup, e: int) -> int:
    """LoRA branches: A's input in fp32 (shared by targets reading one fp32 tensor when there is
    no dropout; a copy per target otherwise) and A's output for B."""
    targets = arch.linears_named(setup.targets)
    total = sum(FP32 * setup.rank for _ in targets)
    groups = _input_groups(arch)
    seen: set[str] = set()
    for s in targets:
        if setup.lora_dropout > 0:
            total += (FP32 + MASK) * s.d_in
        elif e == FP32:
            if groups[s.name] not in seen:
                total += FP32 * s.d_in
            seen.add(groups[s.name])
        else:
            total += FP32 * s.d_in
    return total


def _int8_inputs_per_token(arch: ArchSpec, e: int) -> int:
    """LLM.int8 layers keep their input on ``ctx`` (bitsandbytes ``MatMul8bitLt``), once per input."""
    groups = _input_groups(arch)
    widths: dict[str, int] = {}
    for s in arch.layer_linears:
        if not s.experts:
            widths[groups[s.name]] = s.d_in
    return e * sum(widths.values())


def _norm_per_token(arch: ArchSpec, width: int, e: int, rows: int = 1) -> int:
    if arch.norm_kind == "rmsnorm":
        return FP32 * width + FP32 * rows
    return e * width + 2 * FP32 * rows


def _attention_per_token(arch: ArchSpec, setup: TrainSetup, e: int) -> int:
    """SDPA keeps q, k, v, out (GQA without repeating k/v: no padding mask) and a logsumexp.
    Eager keeps q, repeated k and v, and per query row the softmax (fp32) and the probabilities."""
    q, kv, h = arch.q_dim, arch.kv_dim, arch.num_heads
    if setup.attn == "sdpa":
        return e * (2 * q + 2 * kv) + FP32 * h
    probs = FP32 + (0 if e == FP32 else e)
    return e * 3 * q + probs * h * setup.seq_len


def _mlp_per_token(arch: ArchSpec, e: int) -> int:
    inter = arch.intermediate_size
    if arch.num_experts:
        inter *= arch.experts_per_token
    if arch.mlp_kind == "gated":
        return 3 * e * inter
    return _act_saved(arch) * e * inter


def layer_saved_bytes(arch: ArchSpec, setup: TrainSetup) -> int:
    """Bytes one decoder block keeps for backward, for the whole micro-batch (no checkpointing)."""
    e = activation_dtype_bytes(setup)
    per_token = sum(_norm_per_token(arch, w, e) for w in arch.layer_norm_sizes)
    per_token += _attention_per_token(arch, setup, e)
    per_token += _mlp_per_token(arch, e)
    per_token += _lora_saved_per_token(arch, setup, e)
    if setup.quant == "int8":
        per_token += _int8_inputs_per_token(arch, e)
    if arch.model_type == "opt":
        dropout = float(arch.config.get("dropout", 0.1))
        per_token += 2 * MASK * arch.hidden_size if dropout > 0 else 0
    return per_token * setup.tokens


def _logits_width_bytes(arch: ArchSpec, setup: TrainSetup) -> int:
    return activation_dtype_bytes(setup)


def logits_loss_bytes(arch: ArchSpec, setup: TrainSetup) -> int:
    """The loss peak, at the start of backward: log_softmax's fp32 output (kept for backward), the
    incoming fp32 gradient from nll_loss and log_softmax's fp32 input gradient, b x s x vocab each.

    transformers' ``ForCausalLMLoss`` upcasts the logits to fp32 and computes the loss over all
    b x s positions (labels are shifted by padding, not by slicing). The forward peak (logits, their
    fp32 copy and the log_softmax output) is smaller whenever the logits are 16-bit or dropped.
    """
    return 3 * FP32 * arch.vocab_size * setup.tokens


def final_saved_bytes(arch: ArchSpec, setup: TrainSetup) -> int:
    """Outside the blocks: the final norm's saved input."""
    e = activation_dtype_bytes(setup)
    return _norm_per_token(arch, arch.hidden_size, e) * setup.tokens if arch.final_norm else 0


def checkpoint_bytes(arch: ArchSpec, setup: TrainSetup) -> int:
    """With gradient checkpointing each block keeps only its input hidden states."""
    return activation_dtype_bytes(setup) * arch.hidden_size * setup.tokens * arch.num_layers


def _largest(arch: ArchSpec) -> LinearSpec:
    return arch.largest_linear


def transient_bytes(arch: ArchSpec, setup: TrainSetup) -> int:
    """Short-lived tensors at the peak: the dequantized weight of the largest 4-bit/8-bit layer
    (bitsandbytes materializes it in the compute dtype for each training matmul)."""
    if setup.quant == "none":
        return 0
    s = _largest(arch)
    return s.d_in * s.d_out * setup.dtype_bytes


def activation_peak_terms(arch: ArchSpec, setup: TrainSetup) -> dict[str, int]:
    """The dynamic part of the peak, split into named terms that add up to it.

    Without checkpointing the peak is at the start of backward: every block's saved tensors plus the
    loss peak. With checkpointing it is the larger of that moment (block inputs only) and the
    recomputation of one block during backward.
    """
    layer = layer_saved_bytes(arch, setup)
    final = final_saved_bytes(arch, setup)
    loss = logits_loss_bytes(arch, setup)
    if not setup.grad_ckpt:
        return {
            "activations": layer * arch.num_layers + final,
            "logits_loss": loss,
            "transient": transient_bytes(arch, setup),
        }
    ckpt = checkpoint_bytes(arch, setup)
    if final + loss >= layer:
        return {"activations": ckpt + final, "logits_loss": loss, "transient": transient_bytes(arch, setup)}
    return {"activations": ckpt + layer, "logits_loss": 0, "transient": transient_bytes(arch, setup)}
