"""``qlora-kit export``: merge a LoRA adapter into its base and write a plain Hugging Face checkpoint.

The adapter was trained against dequant(quant(W)), not W, so the default (``merge_into="dequantized"``)
merges into exactly that, bitsandbytes' rounding repeated bit for bit (:mod:`qlora_kit.export.rounding`);
``"original"`` merges into the 16-bit checkpoint weights instead. The delta ``scale * B @ A`` is
computed in fp32 and the sum cast once to the output dtype.

The export streams: it reads the base one safetensors shard and one tensor at a time, merges a linear
weight a slice of rows at a time, and writes the output shards tensor by tensor (their layout is
planned from the headers first), so its memory is one 16-bit source tensor plus a few slices, never one
model. Everything is written to a hidden directory next to ``out``, verified (:mod:`qlora_kit.export.verify`),
then renamed into place: an interrupted or failed export leaves nothing at ``out``.
"""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import json
import os
import shutil
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

from qlora_kit.adapter import (
    QuantSource,
    check_fingerprint,
    check_trust,
    quant_source,
    read_metadata,
    resolve_base,
    trained_spec,
)
from qlora_kit.errors import UsageError
from qlora_kit.export.layout import Adapter, Layout, read_adapter
from qlora_kit.export.merge import Plan, plan_export, write_shards
from qlora_kit.export.report import ExportReporter, SilentReporter
from qlora_kit.export.shards import Checkpoint, open_checkpoint, parse_decimal_bytes
from qlora_kit.export.verify import size_text, verification_skipped, verify_export
from qlora_kit.files import staged_dir
from qlora_kit.host import peak_rss_bytes
from qlora_kit.knobs import FOUR_BIT
from qlora_kit.model.load import TORCH_DTYPES, stretched_config

MERGE_MODES = ("dequantized", "original")
TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
    "tokenizer.model",
    "spiece.model",
    "vocab.json",
    "vocab.txt",
    "merges.txt",
    "chat_template.jinja",
    "chat_template.json",
)


def export(
    adapter_dir: str | os.PathLike[str],
    out_dir: str | os.PathLike[str],
    *,
    base: str | None = None,
    quant: str | None = None,
    double_quant: bool | None = None,
    compute_dtype: str | None = None,
    merge_into: str = "dequantized",
    dtype: str = "fp16",
    max_shard_size: int | str = "5GB",
    verify: bool | None = None,
    force: bool = False,
    allow_pickle: bool = False,
    trust_remote_code: bool = False,
    reporter: ExportReporter | None = None,
) -> dict[str, Any]:
    """Merge the LoRA adapter in ``adapter_dir`` into its base and write a checkpoint to ``out_dir``.

    Base and quantization come from the adapter's ``qlora_kit.json``; for adapters other tools made,
    ``base`` (else ``adapter_config.json``'s ``base_model_name_or_path``), ``quant`` and
    ``double_quant`` supply them, and ``compute_dtype`` the dtype the base was loaded in (default: the
    checkpoint's, what transformers 5 loads by default). ``verify=None`` verifies when the two fp32
    models it loads fit in the memory available now, and otherwise says so and skips; ``True`` always
    verifies, ``False`` never. Returns a summary: files, merge mode, verification (max abs diff, KL,
    tolerance, or why it was skipped) and peak memory. Raises :class:`UsageError` for bad
    input and :class:`VerificationError` when the merged model does not match.
    """
    started = time.perf_counter()
    reporter = reporter or SilentReporter()
    if dtype not in TORCH_DTYPES:
        raise UsageError(f"dtype must be one of {', '.join(TORCH_DTYPES)}, got {dtype!r}", "")
    shard_bytes = parse_decimal_bytes(max_shard_size)
    inputs = read_inputs(
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
    plan = plan_export(
        inputs.checkpoint, inputs.layout, inputs.adapter, inputs.qsource, merge_into, TORCH_DTYPES[dtype], shard_bytes
    )
    for note in plan.notes:
        reporter.message(note)
    job = _Job(
        inputs.adapter,
        inputs.base_path,
        inputs.out,
        inputs.qsource,
        merge_into,
        dtype,
        inputs.layout,
        plan,
        trust_remote_code,
        inputs.rope,
    )
    summary = _write(job, inputs.checkpoint, verify, reporter)
    summary["elapsed_s"] = round(time.perf_counter() - started, 2)
    summary["files"] = sorted(p.name for p in inputs.out.iterdir())
    return summary


@dataclasses.dataclass(frozen=True)
class Inputs:
    """An export's checked inputs, shared by the HF and the GGUF writer."""

    adapter: Adapter
    base_path: Path
    out: Path
    qsource: QuantSource
    checkpoint: Checkpoint
    layout: Layout
    rope: dict[str, Any] | None  # the rotary parameters training stretched the base to, else None


def read_inputs(
    adapter_dir: str | os.PathLike[str],
    out_dir: str | os.PathLike[str],
    base: str | None,
    quant: str | None,
    double_quant: bool | None,
    compute_dtype: str | None,
    merge_into: str,
    force: bool,
    allow_pickle: bool,
    trust_remote_code: bool,
) -> Inputs:
    """Check everything an export reads before it writes anything (:class:`UsageError` on bad input)."""
    if merge_into not in MERGE_MODES:
        raise UsageError(f"merge_into must be one of {', '.join(MERGE_MODES)}, got {merge_into!r}", "")
    adapter_path, out = Path(adapter_dir), Path(out_dir)
    if not adapter_path.is_dir():
        raise UsageError(f"adapter directory {adapter_path} does not exist", "pass the output_dir of a training run")
    adapter = read_adapter(adapter_path, allow_pickle)
    metadata = read_metadata(adapter_path)
    qsource = quant_source(metadata, quant, double_quant, compute_dtype, merge_into)
    base_path = resolve_base(base, metadata, adapter.base_name, adapter_path)
    check_fingerprint(metadata, base_path)
    check_trust(metadata, base_path, trust_remote_code)
    _check_out(out, force, adapter_path, base_path)
    checkpoint = open_checkpoint(base_path, allow_pickle)
    if qsource is None:  # original mode, plain peft adapter
        qsource = QuantSource("none", False, "")
    if not qsource.compute_dtype:  # transformers 5 loads in the checkpoint's dtype unless told otherwise
        qsource = QuantSource(qsource.mode, qsource.double_quant, checkpoint.float_dtype_name())
    layout = model_layout(base_path, qsource if merge_into == "dequantized" else None, trust_remote_code)
    stretched = stretched_config(*trained_spec(base_path, metadata, trust_remote_code))
    rope = dict(stretched.get_text_config().rope_parameters) if stretched is not None else None
    return Inputs(adapter, base_path, out, qsource, checkpoint, layout, rope)


@dataclasses.dataclass(frozen=True)
class _Job:
    """An export whose inputs are all checked: what :func:`_write` writes and verifies."""

    adapter: Adapter
    base_path: Path
    out: Path
    qsource: QuantSource
    merge_into: str
    dtype: str
    layout: Layout
    plan: Plan
    trust_remote_code: bool
    rope: dict[str, Any] | None


def _write(job: _Job, checkpoint: Checkpoint, verify: bool | None, reporter: ExportReporter) -> dict[str, Any]:
    """Write the export to a hidden directory next to ``out``, verify it, rename it into place."""
    adapter_path, plan, out = job.adapter.path, job.plan, job.out
    extra_files = _extra_files(adapter_path, job.base_path)
    needed = plan.total_bytes + sum(p.stat().st_size for p in extra_files.values()) + 2**20
    check_disk(out, needed)
    with staged(out) as tmp:
        reporter.start("merge", plan.total_bytes)
        write_shards(tmp, plan, checkpoint, reporter.advance)
        _write_config(tmp, job.base_path, plan, job.dtype, job.rope)
        for name, src in extra_files.items():
            shutil.copy2(src, tmp / name)
        merge_rss = peak_rss_bytes()
        verification, skipped = None, verification_skipped(plan, verify)
        if skipped:
            reporter.message(f"verification skipped: {skipped}")
        else:
            verification = verify_export(
                tmp,
                job.base_path,
                adapter_path,
                job.qsource,
                job.merge_into,
                job.dtype,
                job.layout,
                reporter,
                job.trust_remote_code,
            )
        summary = _summary(job, verification, skipped, merge_rss)
        (tmp / "README.md").write_text(model_card(summary))
    return summary


def _summary(job: _Job, verification: dict[str, Any] | None, skipped: str | None, merge_rss: int) -> dict[str, Any]:
    plan = job.plan
    return {
        "out_dir": str(job.out),
        "adapter": str(job.adapter.path),
        "base": str(job.base_path),
        "merge_into": job.merge_into,
        "dtype": job.dtype,
        "quant": None if job.qsource.mode == "none" else dataclasses.asdict(job.qsource),
        "shards": len(plan.shards),
        "total_bytes": plan.total_bytes,
        "tensors": sum(len(s) for s in plan.shards),
        "merged_tensors": plan.merged,
        "largest_tensor_bytes": plan.largest_bytes,
        "verification": verification,
        "verification_skipped": skipped,
        "notes": plan.notes,
        "peak_rss_bytes_merge": merge_rss,
        "peak_rss_bytes": peak_rss_bytes(),
    }


# -- inputs -------------------------------------------------------------------------------------------


def _check_out(out: Path, force: bool, adapter_path: Path, base_path: Path) -> None:
    """``out`` may not be the adapter or the base, lie inside the adapter, or hold either: refused even
    with ``force`` (replacing it would destroy them)."""
    resolved = out.resolve()
    adapter, base = adapter_path.resolve(), base_path.resolve()
    if resolved.is_relative_to(adapter):
        raise UsageError(
            f"--out {out} would overwrite files inside the adapter directory {adapter_path}",
            "choose a directory outside it",
        )
    for p, what in ((adapter, "adapter"), (base, "base model")):
        if p.is_relative_to(resolved):
            raise UsageError(f"--out {out} would overwrite the {what} at {p}, which it holds", "choose another --out")
    if out.exists() and not out.is_dir():
        raise UsageError(f"{out} exists and is not a directory", "choose another --out")
    if out.is_dir() and any(out.iterdir()) and not force:
        raise UsageError(f"{out} exists and is not empty", "choose another --out, or pass --force to replace it")


def check_disk(out: Path, needed: int) -> None:
    parent = out.resolve().parent
    while not parent.exists():
        parent = parent.parent
    free = shutil.disk_usage(parent).free
    if needed > free:
        raise UsageError(
            f"not enough free disk space at {parent}: the export needs about {size_text(needed)}, "
            f"{size_text(free)} free",
            "free some space, choose another --out, or export with a smaller --dtype",
        )


def _extra_files(adapter_path: Path, base_path: Path) -> dict[str, Path]:
    """Tokenizer files (the adapter's own, else the base's) and the base's generation config."""
    files: dict[str, Path] = {}
    for source in (adapter_path, base_path):
        found = [p for p in source.iterdir() if p.is_file() and (p.name in TOKENIZER_FILES or p.suffix == ".tiktoken")]
        if found:
            files = {p.name: p for p in found}
            break
    if (base_path / "generation_config.json").is_file():
        files["generation_config.json"] = base_path / "generation_config.json"
    return files


# -- what transformers makes of the checkpoint -------------------------------------------------------


def model_layout(base_path: Path, qsource: QuantSource | None, trust_remote_code: bool = False) -> Layout:
    """Build the model on the meta device: its parameter names, ties, GPT-2 ``Conv1D`` weights, and the
    weights transformers' bitsandbytes integration quantizes (every nn.Linear/Conv1D but the head and
    other skipped modules; not Falcon's FalconLinear, not transformers 5's 3-D MoE experts)."""
    from transformers import AutoConfig, AutoModelForCausalLM
    from transformers.pytorch_utils import Conv1D

    trust = trust_remote_code  # the user's flag only, never a file's say-so (adapter.check_trust)
    try:
        config = AutoConfig.from_pretrained(base_path, trust_remote_code=trust)
        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(config, trust_remote_code=trust)
    except (OSError, ValueError, KeyError) as exc:
        raise UsageError(f"transformers cannot build the base at {base_path}: {exc}", "check its config.json") from None
    groups: dict[int, list[str]] = {}
    for name, param in model.named_parameters(remove_duplicate=False):
        groups.setdefault(id(param), []).append(name)
    names = {n for group in groups.values() for n in group} | {n for n, _ in model.named_buffers()}
    conv1d = {f"{n}.weight" for n, m in model.named_modules() if isinstance(m, Conv1D)}
    quantized: set[str] = set()
    if qsource is not None and qsource.mode in (*FOUR_BIT, "int8"):
        quantized = _bnb_replaced(model)
    return Layout(names, model.base_model_prefix, quantized, conv1d, [g for g in groups.values() if len(g) > 1], config)


def _bnb_replaced(model: Any) -> set[str]:
    """The weights transformers' bitsandbytes integration replaces, by its own rule, without importing
    bitsandbytes (its import costs ~120 MiB): every module that is exactly ``nn.Linear`` or a ``Conv1D``,
    minus the quantizer's ``modules_to_not_convert`` (the output head and tied modules, and the model's
    ``_keep_in_fp32_modules``) as ``should_convert_module`` matches them (transformers 5.23,
    ``integrations/bitsandbytes.replace_with_bnb_linear``). tests/test_rounding.py checks it against the
    real replacement."""
    from transformers.pytorch_utils import Conv1D
    from transformers.quantizers.base import HfQuantizer
    from transformers.quantizers.quantizers_utils import should_convert_module

    skip = HfQuantizer.get_modules_to_not_convert(model, None, getattr(model, "_keep_in_fp32_modules", None))
    return {
        f"{name}.weight"
        for name, module in model.named_modules()
        if (type(module) is torch.nn.Linear or isinstance(module, Conv1D)) and should_convert_module(name, skip)
    }


def _write_config(tmp: Path, base_path: Path, plan: Plan, dtype: str, rope: dict[str, Any] | None) -> None:
    """The base's config.json, with the output dtype, no quantization_config, ties broken if needed, and RoPE
    stretched as training stretched it (``rope``: transformers 5's ``rope_parameters``)."""
    config = json.loads((base_path / "config.json").read_text())
    if rope is not None:
        text = config["text_config"] if isinstance(config.get("text_config"), dict) else config
        text.pop("rope_scaling", None)  # the pre-5 spelling, which would contradict it
        text["rope_parameters"] = rope
    torch_name = str(TORCH_DTYPES[dtype]).removeprefix("torch.")
    config.pop("quantization_config", None)
    config.pop("_name_or_path", None)
    config["dtype"] = torch_name
    if "torch_dtype" in config:
        config["torch_dtype"] = torch_name
    if plan.untied:
        config["tie_word_embeddings"] = False
        for sub in config.values():
            if isinstance(sub, dict) and "tie_word_embeddings" in sub:
                sub["tie_word_embeddings"] = False
    (tmp / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")


@contextlib.contextmanager
def staged(out: Path) -> Iterator[Path]:
    """A hidden directory next to ``out`` to write into; renamed to ``out`` when the block completes,
    removed when it raises (a full disk becomes one line)."""
    try:
        with staged_dir(out, f".{out.name}.qlora-kit-partial") as tmp:
            yield tmp
    except OSError as exc:
        if exc.errno == errno.ENOSPC:
            raise UsageError(
                f"the disk filled up while writing next to {out}; nothing was written",
                "free some space or choose another --out",
            ) from None
        raise


# -- the model card -------------------------------------------------------------------------------------


def model_card(summary: dict[str, Any]) -> str:
    v = summary["verification"]
    q = summary["quant"]
    quant = "a 16-bit base" if q is None else f"an {q['mode']}{' double-quant' if q['double_quant'] else ''} base"
    into = (
        "dequant(quant(W)), the weights the adapter was trained against"
        if summary["merge_into"] == "dequantized"
        else "the original 16-bit weights W"
    )
    lines = [
        "---",
        "library_name: transformers",
        "tags: [qlora-kit, lora, merged]",
        "---",
        "",
        "# Merged LoRA checkpoint",
        "",
        f"Written by `qlora-kit export` ({time.strftime('%Y-%m-%d')}): a LoRA adapter trained on {quant}, "
        f"merged into {into}, saved as {summary['dtype']} safetensors. Loads with plain transformers; "
        "no peft or bitsandbytes needed.",
        "",
        f"- base: `{summary['base']}`",
        f"- adapter: `{summary['adapter']}`",
        f"- merge mode: `{summary['merge_into']}`; {summary['merged_tensors']} weights merged",
        f"- dtype: `{summary['dtype']}`; {summary['shards']} shard(s), {summary['total_bytes'] / 2**20:,.1f} MiB",
    ]
    if v is None:
        lines.append(f"- verification: skipped ({summary.get('verification_skipped') or 'not run'})")
    else:
        lines.append(
            f"- verification: {'passed' if v['passed'] else 'FAILED'} against the {v['reference']} "
            f"(batch {v['batch'][0]}x{v['batch'][1]} fixed token ids): max |logit diff| {v['max_abs_diff']:.4g} "
            f"(tolerance {v['tolerance']:.4g}, logit scale {v['logit_scale']:.4g}), KL {v['kl']:.4g}"
        )
    lines += [f"- note: {n}" for n in summary["notes"]]
    return "\n".join(lines) + "\n"
