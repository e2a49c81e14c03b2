"""``qlora-kit export --format gguf``: the merged model as one GGUF file, for llama.cpp, Ollama, LM Studio.

The merge is the HF export's (:mod:`qlora_kit.export.merge`: dequant(quant(W)) + scale * B @ A, fp32,
a slice of rows at a time); this module only changes what the merged pieces become: GGUF tensor
names, llama.cpp's row order for Llama's query/key projections, and the GGUF types ``f16``, ``bf16``
or ``q8_0`` (1-D tensors stay f32, as llama.cpp keeps them). The file is written with the ``gguf``
package one tensor at a time into a hidden file next to the output, verified by loading it back with
transformers (which dequantizes GGUF to float) against the adapter model, then renamed into place.

q8_0 follows ggml's block layout: 32 consecutive values of a row share one fp16 scale
d = max|x| / 127, stored first, then the 32 values round(x / d) as int8 (34 bytes per block).
"""

from __future__ import annotations

import dataclasses
import os
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from qlora_kit.adapter import QuantSource
from qlora_kit.errors import UsageError
from qlora_kit.export import run
from qlora_kit.export.gguf_vocab import Vocab, add_vocab, read_vocab
from qlora_kit.export.merge import Op, Plan, plan_export, produce
from qlora_kit.export.report import ExportReporter, SilentReporter
from qlora_kit.export.shards import Checkpoint
from qlora_kit.export.verify import verification_skipped, verify_export
from qlora_kit.host import peak_rss_bytes

GGUF_TYPES = ("f16", "bf16", "q8_0")
Q8_BLOCK, Q8_BYTES = 32, 34
# model_type -> (GGUF architecture, whether llama.cpp reorders the query/key rows for its rotary layout)
ARCHITECTURES = {
    "llama": ("llama", True),
    "mistral": ("llama", True),
    "qwen2": ("qwen2", False),
    "qwen3": ("qwen3", False),
}
_FILE_TYPE = {"f16": 1, "q8_0": 7, "bf16": 32}  # gguf.LlamaFileType: MOSTLY_F16, MOSTLY_Q8_0, MOSTLY_BF16
_SKIPPED = ("rotary_emb.inv_freq",)


def _gguf() -> Any:
    try:
        import gguf
    except ImportError:
        raise UsageError(
            "the GGUF export needs the gguf package, which is not installed", "pip install 'qlora-kit[gguf]'"
        ) from None
    return gguf


# -- q8_0 and the other types -----------------------------------------------------------------------------


def quantize_q8_0(values: torch.Tensor) -> torch.Tensor:
    """Flat fp32 values (a multiple of 32) -> q8_0 blocks as uint8, bit for bit what ggml's reference
    ``quantize_row_q8_0`` (and gguf-py's ``quants.Q8_0``) produce: the scale computed in fp32, the
    quotient rounded half away from zero, the scale stored as fp16."""
    blocks = values.float().reshape(-1, Q8_BLOCK)
    d = blocks.abs().amax(dim=1, keepdim=True) / 127
    inv = torch.where(d == 0, torch.zeros_like(d), 1 / d)
    x = blocks * inv
    a = x.abs()
    floored = a.floor()
    q = torch.sign(x) * (floored + (2 * (a - floored)).floor())
    out = torch.empty(blocks.shape[0], Q8_BYTES, dtype=torch.uint8)
    out[:, :2] = d.to(torch.float16).view(torch.uint8)
    out[:, 2:] = q.to(torch.int8).view(torch.uint8)
    return out.reshape(-1)


def dequantize_q8_0(blocks: torch.Tensor) -> torch.Tensor:
    b = blocks.reshape(-1, Q8_BYTES)
    return (b[:, 2:].contiguous().view(torch.int8).float() * b[:, :2].contiguous().view(torch.float16).float()).reshape(
        -1
    )


@dataclass(frozen=True)
class TensorOut:
    """One GGUF tensor: its name, GGML type and size, and how the op's pieces become its bytes."""

    name: str
    ggml: str  # F32, F16, BF16, Q8_0
    shape: tuple[int, ...]
    permute_heads: int = 0  # llama.cpp's query/key row order for this many heads (0: none)

    @property
    def nbytes(self) -> int:
        n = int(np.prod(self.shape))
        return n // Q8_BLOCK * Q8_BYTES if self.ggml == "Q8_0" else n * (4 if self.ggml == "F32" else 2)


def tensor_type(shape: tuple[int, ...], gguf_type: str) -> str:
    if len(shape) < 2:
        return "F32"
    if gguf_type == "q8_0":
        return "Q8_0" if shape[-1] % Q8_BLOCK == 0 else "F16"
    return gguf_type.upper()


def encode(pieces: Iterator[torch.Tensor], t: TensorOut) -> torch.Tensor:
    """The tensor's bytes in its GGUF type, from flat fp32 pieces; memory: the output tensor plus one piece."""
    out = torch.empty(t.nbytes, dtype=torch.uint8)
    at, carry = 0, torch.empty(0)
    for piece in pieces:
        if t.ggml == "Q8_0":
            piece = torch.cat([carry, piece.float()]) if carry.numel() else piece.float()
            whole = piece.numel() // Q8_BLOCK * Q8_BLOCK
            carry = piece[whole:]
            raw = quantize_q8_0(piece[:whole])
        else:
            raw = _cast(piece, t).view(torch.uint8)
        out[at : at + raw.numel()] = raw
        at += raw.numel()
    if at != t.nbytes or carry.numel():
        raise RuntimeError(f"{t.name}: wrote {at} bytes of {t.nbytes}")
    if t.permute_heads:
        rows = t.shape[0]
        view = out.view(t.permute_heads, 2, rows // t.permute_heads // 2, -1)
        out = view.transpose(1, 2).reshape(-1).contiguous()
    return out


def _cast(piece: torch.Tensor, t: TensorOut) -> torch.Tensor:
    dtype = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16}[t.ggml]
    out = piece.to(dtype)
    if dtype == torch.float16 and not bool(torch.isfinite(out).all()) and bool(torch.isfinite(piece).all()):
        top = float(piece.abs().max())
        raise UsageError(f"{t.name} overflows f16 (values up to {top:.4g})", "export with --gguf-type bf16")
    return out


# -- names and metadata -------------------------------------------------------------------------------------


def gguf_arch(config: Any) -> tuple[str, bool]:
    model_type = getattr(config, "model_type", None)
    if model_type not in ARCHITECTURES:
        raise UsageError(
            f"the GGUF export supports {', '.join(sorted(ARCHITECTURES))} models, not {model_type}",
            "export with --format hf and convert with llama.cpp's convert_hf_to_gguf.py",
        )
    rope = getattr(config, "rope_parameters", None) or getattr(config, "rope_scaling", None) or {}
    if rope.get("rope_type", rope.get("type", "default")) != "default":
        raise UsageError(
            f"the model scales its rotary embedding ({rope.get('rope_type', rope.get('type'))}), which the GGUF "
            "export does not write yet",
            "export with --format hf and convert with llama.cpp's convert_hf_to_gguf.py",
        )
    return ARCHITECTURES[model_type]


def tensor_outs(plan: Plan, config: Any, gguf_type: str) -> list[tuple[Op, TensorOut]]:
    """Every op of the plan with its GGUF tensor (rotary buffers dropped, as llama.cpp computes them)."""
    gguf = _gguf()
    arch, permute = gguf_arch(config)
    arch_id = next(k for k, v in gguf.MODEL_ARCH_NAMES.items() if v == arch)
    names = gguf.get_tensor_name_map(arch_id, config.num_hidden_layers)
    heads, kv_heads = config.num_attention_heads, getattr(config, "num_key_value_heads", None)
    out: list[tuple[Op, TensorOut]] = []
    for op in (op for ops in plan.shards for op in ops):
        if op.out.name.endswith(_SKIPPED):
            continue
        module, dot, suffix = op.out.name.rpartition(".")
        name = names.get_name(module)
        if name is None or not dot:
            raise UsageError(
                f"{op.out.name} has no GGUF name for the {arch} architecture",
                "export with --format hf and convert with llama.cpp's convert_hf_to_gguf.py",
            )
        shape = tuple(op.out.shape)
        rows = 0
        if permute and module.endswith("self_attn.q_proj"):
            rows = heads
        elif permute and module.endswith("self_attn.k_proj"):
            rows = kv_heads or heads
        out.append((op, TensorOut(f"{name}.{suffix}", tensor_type(shape, gguf_type), shape, rows)))
    return out


def add_metadata(writer: Any, config: Any, name: str, gguf_type: str) -> None:
    """Architecture keys (the ones convert_hf_to_gguf.py writes for these families) and the file type."""
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    rope = getattr(config, "rope_parameters", None) or {}
    theta = rope.get("rope_theta", getattr(config, "rope_theta", 10000.0))
    writer.add_name(name)
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_block_count(config.num_hidden_layers)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_head_count(config.num_attention_heads)
    writer.add_head_count_kv(getattr(config, "num_key_value_heads", None) or config.num_attention_heads)
    writer.add_rope_dimension_count(head_dim)
    writer.add_rope_freq_base(float(theta))
    writer.add_layer_norm_rms_eps(float(config.rms_norm_eps))
    writer.add_key_length(head_dim)
    writer.add_value_length(head_dim)
    writer.add_vocab_size(config.vocab_size)
    writer.add_file_type(_FILE_TYPE[gguf_type])
    writer.add_quantization_version(2)


def write_gguf(
    path: Path, plan: Plan, checkpoint: Checkpoint, config: Any, vocab: Vocab, gguf_type: str, advance: Any
) -> int:
    """Write the GGUF file at ``path``: header and metadata from the plan, then tensor by tensor."""
    gguf = _gguf()
    outs = tensor_outs(plan, config, gguf_type)
    arch, _ = gguf_arch(config)
    writer = gguf.GGUFWriter(path, arch)
    add_metadata(writer, config, path.stem.split(".qlora-kit")[0].lstrip("."), gguf_type)
    add_vocab(writer, vocab)
    for _, t in outs:
        raw = getattr(gguf.GGMLQuantizationType, t.ggml)
        writer.add_tensor_info(t.name, _byte_shape(t), np.dtype(np.uint8), t.nbytes, raw_dtype=raw)
    writer.write_header_to_file(path)
    writer.write_kv_data_to_file()
    writer.write_ti_data_to_file()
    current: tuple[int, Any] | None = None
    try:
        for op, t in outs:
            if current is None or current[0] != op.shard:
                if current is not None:
                    current[1].close()
                current = (op.shard, checkpoint.open(op.shard))
            writer.write_tensor_data(encode(produce(op, current[1], plan), t).numpy())
            advance(op.out.nbytes)
    finally:
        if current is not None:
            current[1].close()
        writer.close()
    return sum(t.nbytes for _, t in outs)


def _byte_shape(t: TensorOut) -> list[int]:
    """The shape ``gguf`` wants for raw bytes: the last dimension counted in bytes."""
    shape = list(t.shape)
    shape[-1] = t.nbytes // max(1, int(np.prod(shape[:-1])))
    return shape


# -- the command ------------------------------------------------------------------------------------------


def export_gguf(
    adapter_dir: str | os.PathLike[str],
    out_dir: str | os.PathLike[str],
    *,
    gguf_type: str = "f16",
    base: str | None = None,
    quant: str | None = None,
    double_quant: bool | None = None,
    compute_dtype: str | None = None,
    merge_into: str = "dequantized",
    verify: bool | None = None,
    force: bool = False,
    allow_pickle: bool = False,
    trust_remote_code: bool = False,
    reporter: ExportReporter | None = None,
) -> dict[str, Any]:
    """Merge the adapter as :func:`qlora_kit.export.run.export` does and write ``out_dir/model-<type>.gguf``
    plus a model card. Returns the export summary (``format: gguf``, ``gguf_type``, file, verification)."""
    started = time.perf_counter()
    reporter = reporter or SilentReporter()
    _gguf()
    if gguf_type not in GGUF_TYPES:
        raise UsageError(f"--gguf-type must be one of {', '.join(GGUF_TYPES)}, got {gguf_type!r}", "")
    inputs = run.read_inputs(
        adapter_dir,
        out_dir,
        base,
        quant,
        double_quant,
        compute_dtype,
        merge_into,
        force,
        allow_pickle,
        trust_remote_code,
    )
    layout, adapter_path, base_path, out = inputs.layout, inputs.adapter.path, inputs.base_path, inputs.out
    gguf_arch(layout.config)
    if inputs.rope is not None:
        raise UsageError(
            f"the adapter was trained with RoPE stretched ({inputs.rope.get('rope_type')}, factor "
            f"{inputs.rope.get('factor')}), which the GGUF export does not write yet",
            "export with --format hf (its config.json carries the scaling)",
        )
    plan = plan_export(inputs.checkpoint, layout, inputs.adapter, inputs.qsource, merge_into, torch.float32, 1 << 62)
    for note in plan.notes:
        reporter.message(note)
    tokenizer_dir = adapter_path if (adapter_path / "tokenizer.json").is_file() else base_path
    vocab = read_vocab(tokenizer_dir, layout.config.vocab_size)
    job = Job(adapter_path, base_path, tokenizer_dir, out, inputs.qsource, merge_into, gguf_type, plan, layout, vocab)
    job = dataclasses.replace(job, trust_remote_code=trust_remote_code)
    summary = _write_and_verify(job, inputs.checkpoint, verify, reporter)
    summary["elapsed_s"] = round(time.perf_counter() - started, 2)
    summary["files"] = sorted(p.name for p in out.iterdir())
    return summary


@dataclass
class Job:
    adapter: Path
    base: Path
    tokenizer: Path
    out: Path
    qsource: QuantSource
    merge_into: str
    gguf_type: str
    plan: Plan
    layout: Any
    vocab: Vocab
    trust_remote_code: bool = False

    @property
    def file_name(self) -> str:
        return f"model-{self.gguf_type}.gguf"


def _write_and_verify(job: Job, checkpoint: Checkpoint, verify: bool | None, reporter: Any) -> dict[str, Any]:
    """Write into a hidden directory next to ``job.out``, verify, write the card, rename into place."""
    out, plan = job.out, job.plan
    outs = tensor_outs(plan, job.layout.config, job.gguf_type)
    run.check_disk(out, sum(t.nbytes for _, t in outs) + 2**20)
    with run.staged(out) as tmp:
        reporter.start("merge", plan.total_bytes)
        written = write_gguf(
            tmp / job.file_name, plan, checkpoint, job.layout.config, job.vocab, job.gguf_type, reporter.advance
        )
        merge_rss = peak_rss_bytes()
        verification, skipped = None, verification_skipped(plan, verify)
        if skipped:
            reporter.message(f"verification skipped: {skipped}")
        else:
            dtype = "fp16" if job.gguf_type == "f16" else job.gguf_type
            args = (tmp, job.base, job.adapter, job.qsource, job.merge_into, dtype, job.layout, reporter)
            verification = verify_export(*args, job.trust_remote_code, gguf_file=job.file_name)
            verification["tokenizer"] = check_tokenizer(tmp, job.file_name, job.tokenizer)
        summary = {
            "format": "gguf",
            "out_dir": str(out),
            "adapter": str(job.adapter),
            "base": str(job.base),
            "merge_into": job.merge_into,
            "dtype": job.gguf_type,
            "gguf_type": job.gguf_type,
            "gguf_file": job.file_name,
            "quant": None if job.qsource.mode == "none" else dataclasses.asdict(job.qsource),
            "shards": 1,
            "total_bytes": written,
            "tensors": len(outs),
            "merged_tensors": plan.merged,
            "verification": verification,
            "verification_skipped": skipped,
            "notes": plan.notes,
            "peak_rss_bytes_merge": merge_rss,
            "peak_rss_bytes": peak_rss_bytes(),
        }
        (tmp / "README.md").write_text(gguf_card(summary, job.vocab))
    return summary


SAMPLE_TEXT = "Hello world! The 3 quick brown foxes jumped over 12 lazy dogs.\n  Indented: ünïcode, 中文."


def check_tokenizer(export_dir: Path, file_name: str, tokenizer_dir: Path) -> dict[str, Any]:
    """The tokenizer transformers builds from the GGUF against the original one, on a sample text."""
    from transformers import AutoTokenizer

    original = AutoTokenizer.from_pretrained(tokenizer_dir)
    loaded = AutoTokenizer.from_pretrained(export_dir, gguf_file=file_name)
    want, got = original(SAMPLE_TEXT).input_ids, loaded(SAMPLE_TEXT).input_ids
    result = {"same_ids": want == got, "tokens": len(want)}
    if want != got:
        raise UsageError(
            f"the tokenizer read back from the GGUF encodes a sample text differently ({got[:8]}... vs {want[:8]}...)",
            "export with --format hf; report the tokenizer as unsupported",
        )
    return result


def gguf_card(summary: dict[str, Any], vocab: Vocab) -> str:
    card = run.model_card(summary).replace("library_name: transformers", "library_name: gguf")
    card = card.replace(
        f"saved as {summary['dtype']} safetensors. Loads with plain transformers; no peft or bitsandbytes needed.",
        f"saved as one GGUF file (`{summary['gguf_file']}`, {summary['gguf_type']}; 1-D tensors f32) for "
        "llama.cpp, Ollama and LM Studio; transformers also reads it (`gguf_file=`).",
    )
    card = card.replace(f"{summary['shards']} shard(s)", "1 file")
    tok = (summary.get("verification") or {}).get("tokenizer")
    card += f"- tokenizer: {vocab.model} ({len(vocab.tokens)} tokens, {len(vocab.merges)} merges)"
    card += "; chat template included" if vocab.chat_template else ""
    card += f"; read back by transformers: same ids on a {tok['tokens']}-token sample\n" if tok else "\n"
    return card
