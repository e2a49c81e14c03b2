"""The training knobs the memory model and the planner work on, and their allowed values.

No torch here: the planner imports this.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

FOUR_BIT = ("nf4", "fp4")  # the bitsandbytes 4-bit types: the only bases with double quant
QUANTS = ("none", "int8", *FOUR_BIT)
OPTIMIZERS = ("adamw", "adamw8bit", "paged_adamw", "paged_adamw8bit")
DTYPES = {"bf16": 2, "fp16": 2, "fp32": 4}
ATTNS = ("sdpa", "eager")
STRATEGIES = ("ddp", "fsdp", "fsdp-offload")  # how several GPUs share the model (qlora_kit.plan.multigpu)
ALL_LINEAR = "all-linear"  # the LoRA target spec for every linear layer but the head
LORA_VARIANTS = ("lora", "lora-fa", "dora")  # recipe ``lora.variant``
UPCASTS = ("all", "selective")  # what k-bit preparation casts to fp32 (recipe ``quant.upcast``)
ROPE_SCALINGS = ("linear", "dynamic", "yarn")  # stretching RoPE past the native context (qlora_kit.catalog.context)
# rows of the head + cross-entropy computed at once by the chunked loss (``qlora_kit.model.savers``)
LOSS_CHUNK_TOKENS = 1024


def double_quant_for(quant: str, asked: bool | None) -> bool:
    """Whether a ``quant`` base gets double quant: 4-bit bases only, on unless ``asked`` is False."""
    return quant in FOUR_BIT and asked is not False


def double_quant_refused(quant: str | None, asked: bool | None) -> bool:
    """Double quant asked for a known base type without it (16-bit or int8); ``None``: the type is still open."""
    return bool(asked) and quant in QUANTS and quant not in FOUR_BIT


@dataclass(frozen=True)
class TrainSetup:
    """The knobs the memory of a training step depends on.

    ``targets`` are leaf module names (resolved from "all-linear" or the defaults by the planner);
    ``upcast`` is what k-bit preparation does to the parameters that stay unquantized: ``"all"`` is
    peft's ``prepare_model_for_kbit_training`` (every 16-bit parameter to fp32), ``"selective"`` casts
    nn.LayerNorm parameters only (``qlora_kit.model.savers``), ``"none"`` keeps them in ``dtype``.
    """

    quant: str = "nf4"
    double_quant: bool = True
    dtype: str = "bf16"
    rank: int = 16
    targets: tuple[str, ...] = ("q_proj", "v_proj")
    optimizer: str = "adamw"
    batch_size: int = 1
    seq_len: int = 512
    grad_ckpt: bool = False
    attn: str = "sdpa"
    lora_dropout: float = 0.05
    upcast: str = "all"  # "selective": only LayerNorm parameters to fp32 (qlora_kit.model.savers)
    chunked_loss: bool = False  # head + loss LOSS_CHUNK_TOKENS rows at a time, never the full logits
    offload_ckpt: bool = False  # checkpointed layers' saved inputs in host memory (needs grad_ckpt)
    lora_fa: bool = False  # LoRA-FA: lora_A frozen at its initialization, only lora_B trained
    runlora: bool = False  # qlora_kit.model.runlora's layer: computation order chosen per layer by FLOPs
    dora: bool = False  # DoRA (peft use_dora): a magnitude per output row, the weight's row norm every forward
    rslora: bool = False  # rank-stabilized scale (peft use_rslora): the scale only, no memory of its own
    padded: bool = False  # batches padded to a common length (an attention mask) rather than packed
    # Behaviours of other training stacks, for comparing with their published measurements:
    # steps' worth of 4-bit layer inputs alive at the peak (bitsandbytes 0.41-0.42's MatMul4Bit kept its
    # input for backward: 1; litgpt's 2024 loop also kept the previous step's until the next forward: 2;
    # qlora-kit's stack, bitsandbytes 0.50: 0), and bytes per logit the loop holds through backward
    # (Lightning Fabric converts outputs to fp32: 4; qlora-kit drops them before backward: 0).
    kbit_kept_inputs: int = 0
    held_logits_bytes: int = 0

    @property
    def tokens(self) -> int:
        return self.batch_size * self.seq_len

    @property
    def dtype_bytes(self) -> int:
        return DTYPES[self.dtype]

    @property
    def paged(self) -> bool:
        return self.optimizer.startswith("paged")

    def with_(self, **changes: object) -> TrainSetup:
        return replace(self, **changes)  # type: ignore[arg-type]
