"""LoRA on a loaded base: k-bit preparation, gradient checkpointing and peft's ``LoraConfig``.

peft does the work; this module only maps a recipe's ``lora`` section (and the architecture's default
targets) onto it, in the order the memory planner models.
"""

from __future__ import annotations

from typing import Any

from qlora_kit.errors import UsageError
from qlora_kit.knobs import ALL_LINEAR
from qlora_kit.plan.targets import resolve_targets
from qlora_kit.recipe import LoraSpec, QuantSpec


def target_modules(spec: LoraSpec, model_type: str, model: str = "") -> str | list[str]:
    """peft's ``target_modules`` for ``lora.targets``, resolved as the planner does: "all-linear" stays
    peft's (it finds the loaded model's linear layers), "default" and module names become names."""
    label, names = resolve_targets(spec.targets, model_type, model=model, flag="lora.targets")
    return ALL_LINEAR if label == ALL_LINEAR else list(names)


def prepare(model: Any, quant: QuantSpec, grad_ckpt: bool, offload_ckpt: bool = False) -> Any:
    """Freeze the base; for a quantized base run peft's k-bit preparation (fp32 upcast of the
    unquantized parameters; ``quant.upcast: selective``: of the LayerNorms only, ``qlora_kit.model.savers``); turn on
    non-reentrant gradient checkpointing when asked, its saved inputs in host memory with ``offload_ckpt``."""
    from peft import prepare_model_for_kbit_training

    from qlora_kit.model import savers

    ckpt_kwargs = {"use_reentrant": False}
    if quant.mode != "none" and quant.upcast == "selective":
        return savers.prepare_selective(model, grad_ckpt, offload_ckpt)
    if quant.mode != "none":
        model = prepare_model_for_kbit_training(
            model, use_gradient_checkpointing=grad_ckpt, gradient_checkpointing_kwargs=ckpt_kwargs
        )
    else:
        for param in model.parameters():
            param.requires_grad_(False)
        if grad_ckpt:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=ckpt_kwargs)
            model.enable_input_require_grads()
    if grad_ckpt and offload_ckpt:
        savers.enable_checkpointing(model, offload=True)
    return model


def apply_lora(model: Any, spec: LoraSpec) -> Any:
    """Wrap the (prepared) base in a peft ``PeftModel`` with LoRA adapters; DoRA and rsLoRA are peft's
    ``use_dora``/``use_rslora``; LoRA-FA freezes every ``lora_A`` at its initialization; the ``runlora``
    kernel switches the LoRA linears to :mod:`qlora_kit.model.runlora`'s order-choosing forward (same
    parameters, same saved adapter)."""
    from peft import LoraConfig, get_peft_model

    if spec.variant == "dora":
        check_dora_runs(any(type(p).__name__ == "Int8Params" and p.device.type == "cpu" for p in model.parameters()))
    targets = target_modules(spec, model.config.model_type, model.config.name_or_path)
    if targets != ALL_LINEAR:
        check_targets(targets, model)
    config = LoraConfig(
        r=spec.rank,
        lora_alpha=spec.alpha,
        lora_dropout=spec.dropout,
        target_modules=targets,
        bias=spec.bias,
        use_dora=spec.variant == "dora",
        use_rslora=spec.rslora,
        task_type="CAUSAL_LM",
    )
    model = get_peft_model(model, config)
    if spec.variant == "lora-fa":
        freeze_lora_a(model)
    if spec.kernel == "runlora":
        from qlora_kit.model import runlora

        runlora.install(model)
    return model


def check_targets(names: list[str], model: Any) -> None:
    """Refuse, in one line, target names that match no module of the loaded model (peft matches a name
    against the end of each module's dotted name, and would raise its own error with a traceback)."""
    modules = [n for n, _ in model.named_modules()]
    unknown = [t for t in names if not any(m == t or m.endswith("." + t) for m in modules)]
    if unknown:
        linear = sorted({n.rsplit(".", 1)[-1] for n, m in model.named_modules() if _is_linear(m)} - {"lm_head"})
        raise UsageError(
            f"lora.targets: {', '.join(unknown)} is not a module of {model.config.name_or_path}",
            f"choose from {', '.join(linear)}, or all-linear",
        )


def _is_linear(module: Any) -> bool:
    import torch
    from transformers.pytorch_utils import Conv1D

    return isinstance(module, (torch.nn.Linear, Conv1D))


def check_dora_runs(int8_on_cpu: bool) -> None:
    """DoRA on an LLM.int8 base runs one forward on the CPU, then fails: peft 0.21's DoRA dequantizes the
    weight with ``module.weight = module.weight.to("cpu")``, which bitsandbytes 0.50 answers with an
    ``Int8Params`` whose row scales are gone (the next forward's ``MatMul8bitFp`` finds ``SCB`` None)."""
    if int8_on_cpu:
        raise UsageError(
            "DoRA on an int8 base fails on the CPU after its first forward (peft 0.21 drops the int8 row scales)",
            "use quant.mode: nf4 or fp4 for DoRA on the CPU, or run it on a GPU",
        )


def freeze_lora_a(model: Any) -> int:
    """LoRA-FA: A stays at its random initialization, only B trains; autograd then keeps no layer input
    for A's gradient. (peft's ``create_lorafa_optimizer`` freezes A the same way and adds a projected
    AdamW for B; qlora-kit keeps the recipe's optimizer, which sees B only.) Returns the frozen count."""
    frozen = 0
    for name, param in model.named_parameters():
        if ".lora_A." in name:
            param.requires_grad_(False)
            frozen += 1
    return frozen


def count_parameters(model: Any) -> tuple[int, int]:
    """(trainable, total) weights. A packed 4-bit parameter (bitsandbytes ``Params4bit``: two weights a byte,
    or more in a wider storage dtype) counts as the weights it holds, from its quantization state's shape."""
    trainable = total = 0
    for param in model.parameters():
        state = getattr(param, "quant_state", None)
        n = int(state.shape.numel()) if state is not None and hasattr(state, "shape") else param.numel()
        total += n
        trainable += n if param.requires_grad else 0
    return trainable, total
