"""Memory savers for a training step: selective fp32 upcast, chunked cross-entropy, offloaded checkpoints.

Each is a recipe switch (``quant.upcast``, ``train.chunked_loss``, ``train.offload_ckpt``) that the planner
models (``memory.other_param_bytes``, ``activations``); the defaults keep peft's and transformers' behaviour.

- Selective upcast (:func:`prepare_selective`): peft's ``prepare_model_for_kbit_training`` casts every
  fp16/bf16 parameter that is not 4-bit to fp32. For a frozen parameter that adds no information (a 16-bit
  value is exact in fp32); it changes the dtype the step computes in, at 2 extra bytes per parameter of
  the embeddings and head (about 2 GiB on Llama-3-8B), a 16-bit copy of the head under autocast, and an
  fp32 residual stream. What numerics need in fp32 is the trainable LoRA weights (peft keeps them fp32),
  the loss (computed from fp32 logits either way) and the normalizations' statistics. RMSNorms in
  transformers already compute theirs in fp32 (``hidden.to(float32)``) and must keep a 16-bit weight: an
  fp32 one promotes their output, and with it the residual stream, to fp32. ``nn.LayerNorm``'s kernel takes
  fp32 parameters with a 16-bit input, computes in fp32 and returns the input's dtype: those are cast. So
  the selective upcast casts the LayerNorm parameters only (a few KiB) and the step runs in 16 bits.
- Chunked cross-entropy (:func:`causal_lm_loss`): transformers' loss upcasts the b x s x vocab logits to
  fp32 and keeps a log-softmax of them for backward, plus two gradients of that size at the start of
  backward. Here the head and the loss run on ``LOSS_CHUNK_TOKENS`` rows at a time under (non-reentrant)
  checkpointing, so only one chunk's logits exist at once, in forward and in backward.
- Offloaded checkpoints (:func:`enable_checkpointing`): every checkpointed layer's saved inputs are packed
  to host memory (``torch.autograd.graph.save_on_cpu``) and copied back for the recomputation. A GPU
  effect: on a CPU the "offloaded" copy lives in the same memory.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch.utils.checkpoint import checkpoint

from qlora_kit.errors import UsageError
from qlora_kit.knobs import LOSS_CHUNK_TOKENS

IGNORE_INDEX = -100
# config keys of causal LMs that rescale the head's output (Cohere, Granite): refused by the chunked loss
LOGIT_SCALES = ("logit_scale", "logits_scaling")
_CKPT_KWARGS = {"use_reentrant": False}


# -- selective upcast -----------------------------------------------------------------------------------


def upcast_layernorms(model: torch.nn.Module) -> int:
    """Cast the 16-bit parameters of every ``nn.LayerNorm`` to fp32; returns how many were cast."""
    cast = 0
    for module in model.modules():
        if not isinstance(module, torch.nn.LayerNorm):
            continue
        for param in module.parameters(recurse=False):
            if param.dtype in (torch.float16, torch.bfloat16):
                param.data = param.data.to(torch.float32)
                cast += 1
    return cast


def prepare_selective(model: Any, grad_ckpt: bool, offload_ckpt: bool = False) -> Any:
    """k-bit preparation with the selective upcast: what peft's ``prepare_model_for_kbit_training`` does
    (freeze the base, non-reentrant gradient checkpointing with input gradients) but only the LayerNorms
    go to fp32; embeddings, head, RMSNorms and biases keep the dtype the base was loaded in."""
    for param in model.parameters():
        param.requires_grad_(False)
    upcast_layernorms(model)
    if grad_ckpt:
        enable_checkpointing(model, offload_ckpt)
    return model


# -- checkpointing --------------------------------------------------------------------------------------


def enable_checkpointing(model: Any, offload: bool) -> None:
    """Non-reentrant gradient checkpointing of every decoder layer (this also makes the embeddings' output
    require grad, so the checkpointed layers' LoRA weights get gradients); with ``offload`` each layer's
    checkpoint runs under :func:`offloaded_checkpoint`.

    transformers' own ``activation_checkpointing_enable(offload=True)`` does the same with pinned buffers
    always, which raises on a machine without an accelerator (docs/stack-notes.md); the layer's
    checkpointing function is the hook transformers provides for exactly this (``gradient_checkpointing_func``).
    """
    model.activation_checkpointing_enable(activation_checkpointing_kwargs=dict(_CKPT_KWARGS))
    if offload:
        model._set_gradient_checkpointing(enable=True, gradient_checkpointing_func=offloaded_checkpoint)


def offloaded_checkpoint(function: Any, *args: Any, **kwargs: Any) -> Any:
    """``torch.utils.checkpoint`` of one layer whose saved inputs go to host memory: non-reentrant
    checkpointing saves the layer's inputs through the saved-tensor hooks, so ``save_on_cpu`` packs them
    there (pinned, for asynchronous copies, when CUDA is available) and backward copies them back for the
    recomputation. The tensors saved inside the layer are the checkpoint's own (dropped, recomputed)."""
    with torch.autograd.graph.save_on_cpu(pin_memory=torch.cuda.is_available()):
        return checkpoint(function, *args, **{**_CKPT_KWARGS, **kwargs})


# -- chunked cross-entropy ------------------------------------------------------------------------------


def _causal_lm(model: Any) -> Any:
    """The transformers ``...ForCausalLM`` inside a peft model (or the model itself)."""
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def last_hidden_state(model: Any, batch: Mapping[str, Any]) -> torch.Tensor:
    """The decoder's final hidden state (after its final norm), without the head: the ``base_model``
    of a ``...ForCausalLM`` is its decoder stack (``model``, ``transformer``, ``gpt_neox``...).

    ``logits_to_keep`` does not serve here: it keeps the logits of the last positions only (generation),
    while the loss needs every position's.
    """
    decoder = _causal_lm(model).base_model
    inputs = {k: v for k, v in batch.items() if k != "labels"}
    return decoder(**inputs, use_cache=False).last_hidden_state


def _chunk_loss(
    head: torch.nn.Module, softcap: float | None, hidden: torch.Tensor, labels: torch.Tensor
) -> torch.Tensor:
    """Summed token loss of one chunk of rows: head, (softcapping), fp32 cross-entropy."""
    logits = head(hidden).float()
    if softcap:
        logits = torch.tanh(logits / softcap) * softcap
    return torch.nn.functional.cross_entropy(logits, labels, ignore_index=IGNORE_INDEX, reduction="sum")


def causal_lm_loss(model: Any, batch: Mapping[str, Any], chunked: bool, chunk_tokens: int = LOSS_CHUNK_TOKENS) -> Any:
    """The mean next-token loss of a batch, what ``model(**batch).loss`` returns; with ``chunked`` the
    full logits are never materialized (module docstring).

    Labels shift left by one as in transformers' ``ForCausalLMLoss``; positions labelled -100 count
    neither in the sum nor in the mean.
    """
    if not chunked:
        return model(**batch).loss
    causal = _causal_lm(model)
    head = causal.get_output_embeddings()
    softcap = getattr(causal.config, "final_logit_softcapping", None)
    scaled = [k for k in LOGIT_SCALES if getattr(causal.config, k, None) not in (None, 1, 1.0)]
    if scaled:  # the causal LM scales its logits after the head: the chunks would compute another loss
        raise UsageError(
            f"train.chunked_loss: {causal.config.model_type} scales its logits ({scaled[0]}), which the chunked "
            "loss does not reproduce",
            "set train.chunked_loss: false for this model",
        )
    hidden = last_hidden_state(model, batch)
    labels = batch["labels"].to(hidden.device)
    shifted = torch.nn.functional.pad(labels[:, 1:], (0, 1), value=IGNORE_INDEX).reshape(-1)
    # every row, masked ones too (as transformers does): selecting the unmasked rows would copy them
    rows = hidden.reshape(-1, hidden.shape[-1])
    total = rows.new_zeros((), dtype=torch.float32)
    for start in range(0, rows.shape[0], chunk_tokens):
        part = slice(start, start + chunk_tokens)
        total = total + checkpoint(_chunk_loss, head, softcap, rows[part], shifted[part], **_CKPT_KWARGS)
    return total / (shifted != IGNORE_INDEX).sum().clamp(min=1)
