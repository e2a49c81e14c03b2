"""What an adapter directory says about its base: ``qlora_kit.json`` (written last by ``train``), the
quantization the adapter was trained against, where the base is, and whether it is the same base.

Shared by ``export``, ``generate`` and ``eval``, so that every command finds and checks the base
the same way.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from qlora_kit.errors import UsageError
from qlora_kit.export.merge import LOAD_DTYPES, QUANT_MODES, Adapter, QuantSource

METADATA_FILE = "qlora_kit.json"  # what `qlora-kit train` writes last (train.METADATA_FILE)


def read_metadata(adapter_path: Path) -> dict[str, Any] | None:
    path = adapter_path / METADATA_FILE
    return json.loads(path.read_text()) if path.is_file() else None


def quant_source(
    metadata: dict[str, Any] | None,
    quant: str | None,
    double_quant: bool | None,
    compute_dtype: str | None,
    merge_into: str,
) -> QuantSource | None:
    """How the base was quantized in training: qlora_kit.json, else the caller's options."""
    if quant is not None and quant not in QUANT_MODES:
        raise UsageError(f"quant must be one of {', '.join(QUANT_MODES)}, got {quant!r}", "")
    if compute_dtype is not None and compute_dtype not in LOAD_DTYPES:
        raise UsageError(f"compute_dtype must be one of {', '.join(LOAD_DTYPES)}, got {compute_dtype!r}", "")
    if metadata is not None:
        q = metadata.get("quant") or {}
        if q.get("mode") not in QUANT_MODES:
            raise UsageError(
                f"the adapter's {METADATA_FILE} does not say how its base was quantized", "re-run training"
            )
        dq = bool(q.get("double_quant")) and q["mode"] in ("nf4", "fp4")
        known = QuantSource(q["mode"], dq, q.get("compute_dtype") or compute_dtype or "")
        for name, given, recorded in (
            ("quant", quant, known.mode),
            ("double_quant", double_quant, known.double_quant),
            ("compute_dtype", compute_dtype, known.compute_dtype or None),
        ):
            if given is not None and given != recorded:
                raise UsageError(
                    f"{name}={given} contradicts the adapter's {METADATA_FILE}, which records {recorded}",
                    "leave it out: qlora-kit adapters record how their base was quantized",
                )
        return known
    if quant is None:
        if merge_into == "original":
            return None
        raise UsageError(
            f"the adapter has no {METADATA_FILE} (not made by qlora-kit), so its base's quantization is unknown",
            "pass --quant nf4|fp4|int8|none (and --double-quant/--no-double-quant for nf4/fp4), "
            "or --merge-into original",
        )
    if quant in ("nf4", "fp4") and double_quant is None:
        raise UsageError(
            f"--quant {quant} needs --double-quant or --no-double-quant: it changes the rounding of the base",
            "pass the bnb_4bit_use_double_quant the adapter was trained with",
        )
    if quant not in ("nf4", "fp4") and double_quant:
        raise UsageError(f"double quant is for nf4/fp4, not {quant}", "leave out --double-quant")
    return QuantSource(quant, bool(double_quant), compute_dtype or "")


def resolve_base(base: str | None, metadata: dict[str, Any] | None, adapter: Adapter, adapter_path: Path) -> Path:
    from qlora_kit.catalog.bundled import resolve

    name = base or (metadata or {}).get("base_model") or adapter.base_name
    if not name:
        raise UsageError(f"{adapter_path} does not say which base model it adapts", "pass --base PATH")
    name = resolve(name)
    candidates = [Path(name)]
    if not Path(name).is_absolute() and base is None:
        candidates += [adapter_path / name, adapter_path.parent / name]
    if base is None:  # a run directory moved together with its random-init base
        candidates.append(adapter_path / Path(name).name)
    for candidate in candidates:
        if (candidate / "config.json").is_file():
            return candidate
    try:  # a hub id already in the local cache (no network)
        from huggingface_hub import snapshot_download

        cached = Path(snapshot_download(name, local_files_only=True))
        if (cached / "config.json").is_file():
            return cached
    except Exception:  # not a hub id, or not cached: the UsageError below says what to do
        pass
    raise UsageError(f"cannot find the base model {name!r} (no config.json there)", "pass --base with its local path")


def config_fingerprint(model_dir: str) -> str:
    """sha256 of the base's config.json, canonicalized: export checks the adapter meets the same base."""
    path = Path(model_dir) / "config.json"
    if not path.is_file():
        return ""
    data = json.loads(path.read_text())
    for volatile in ("_name_or_path", "transformers_version", "torch_dtype", "dtype", "quantization_config"):
        data.pop(volatile, None)
    return hashlib.sha256(json.dumps(data, sort_keys=True).encode()).hexdigest()


def check_fingerprint(metadata: dict[str, Any] | None, base_path: Path) -> None:
    recorded = (metadata or {}).get("base_config_sha256")
    if recorded and config_fingerprint(str(base_path)) != recorded:
        raise UsageError(
            f"the base at {base_path} is not the model the adapter was trained on (its config.json differs "
            f"from the one {METADATA_FILE} recorded)",
            f"pass --base with the model recorded in {METADATA_FILE} ({(metadata or {}).get('base_model')})",
        )


# -- loading for inference (generate, eval) -----------------------------------------------------------


@dataclass(frozen=True)
class LoadedInfo:
    """What :func:`load_for_inference` loaded: the base, how it is quantized, the adapter (if any)."""

    base: str
    quant: QuantSource
    adapter: str | None = None
    recipe: dict[str, Any] | None = None  # the training recipe, from qlora_kit.json


def load_for_inference(
    adapter: str | None = None,
    model: str | None = None,
    *,
    base: str | None = None,
    quant: str | None = None,
    double_quant: bool | None = None,
) -> tuple[Any, Any, LoadedInfo]:
    """(model in eval mode, tokenizer, info) for an adapter on its base, or a plain/merged model.

    An adapter's base is loaded the way training loaded it: ``load_base`` with the recorded
    quantization, the same k-bit preparation, then ``PeftModel.from_pretrained``; int8 layers run the
    forward training ran (see ``export._reference_model``). A plain model (``model``, e.g. a merged
    export) is loaded unquantized in fp32 on the CPU (16-bit matmuls are slow there), as stored on a GPU.
    """
    import torch

    from qlora_kit.model.load import load_base, load_tokenizer
    from qlora_kit.model.lora import prepare
    from qlora_kit.recipe import ModelSpec, QuantSpec

    device_map = {"": 0} if torch.cuda.is_available() else None
    if (adapter is None) == (model is None):
        raise UsageError("give exactly one of --adapter and --model", "--adapter DIR (a LoRA run) or --model DIR")
    if model is not None:
        if base or quant or double_quant is not None:
            raise UsageError("--base/--quant/--double-quant go with --adapter", "leave them out with --model")
        from qlora_kit.catalog.bundled import resolve

        spec = ModelSpec(name=resolve(model))
        _check_model_dir(spec.name)
        plain = QuantSpec("none", False, _stored_dtype(Path(spec.name)) if device_map else "fp32")
        loaded = load_base(spec, plain, device_map=device_map)
        info = LoadedInfo(spec.name, QuantSource("none", False, plain.compute_dtype))
        return _for_generation(loaded), load_tokenizer(spec), info
    adapter_path = Path(adapter or "")
    if not (adapter_path / "adapter_config.json").is_file():
        what = "does not exist" if not adapter_path.exists() else "has no adapter_config.json"
        raise UsageError(f"adapter directory {adapter_path} {what}", "pass the output_dir of a training run")
    config = json.loads((adapter_path / "adapter_config.json").read_text())
    metadata = read_metadata(adapter_path)
    if metadata is None and quant is None:
        raise UsageError(
            f"{adapter_path} has no {METADATA_FILE} (not made by qlora-kit), so its base's quantization is unknown",
            "pass --quant nf4|fp4|int8|none (and --double-quant/--no-double-quant for nf4/fp4)",
        )
    qsource = quant_source(metadata, quant, double_quant, None, "dequantized")
    assert qsource is not None  # quant is known: from the metadata or the caller
    base_path = resolve_base(base, metadata, Adapter(adapter_path, config, {}), adapter_path)
    check_fingerprint(metadata, base_path)
    # the recipe's quant section also holds k-bit preparation choices (which parameters go fp32)
    recorded = ((metadata or {}).get("recipe") or {}).get("quant") or {}
    known = {f.name for f in dataclasses.fields(QuantSpec)}
    qspec = QuantSpec(
        **{
            **{k: v for k, v in recorded.items() if k in known},
            "mode": qsource.mode,
            "double_quant": qsource.double_quant,
            "compute_dtype": qsource.compute_dtype or _stored_dtype(base_path),
        }
    )
    loaded = prepare(load_base(ModelSpec(name=str(base_path)), qspec, device_map=device_map), qspec, False)
    from peft import PeftModel

    try:
        peft_model = PeftModel.from_pretrained(loaded, adapter_path)
    except (RuntimeError, ValueError, KeyError) as exc:
        lines = [line.strip() for line in str(exc).splitlines() if line.strip()] or [type(exc).__name__]
        first = next((line for line in lines if "size mismatch" in line), lines[0])  # torch: header, then why
        raise UsageError(
            f"the adapter in {adapter_path} does not fit the base {base_path}: {first[:300]}",
            "pass --base with the model the adapter was trained on",
        ) from None
    has_tokenizer = any((adapter_path / f).is_file() for f in ("tokenizer.json", "tokenizer_config.json"))
    tokenizer = load_tokenizer(ModelSpec(name=str(adapter_path if has_tokenizer else base_path)))
    info = LoadedInfo(
        str(base_path),
        QuantSource(qspec.mode, qspec.double_quant, qspec.compute_dtype),
        str(adapter_path),
        (metadata or {}).get("recipe"),
    )
    return _for_generation(peft_model), tokenizer, info


def _stored_dtype(model_dir: Path) -> str:
    """The checkpoint's float dtype name (what transformers 5 loads by default): fp16/bf16/fp32."""
    path = model_dir / "config.json"
    config = json.loads(path.read_text()) if path.is_file() else {}
    stored = str(config.get("dtype") or config.get("torch_dtype") or "float32")
    return {"float16": "fp16", "bfloat16": "bf16"}.get(stored, "fp32")


def _check_model_dir(name: str) -> None:
    path = Path(name).expanduser()
    if name.startswith(("/", "./", "../", "~")) and not path.is_dir():
        raise UsageError(f"model directory {name} does not exist", "pass --model with a merged export's directory")
    if path.is_dir() and not (path / "config.json").is_file():
        raise UsageError(f"{name} is not a model directory (no config.json)", "pass --model with a saved model")


def _for_generation(model: Any) -> Any:
    """Eval mode with the KV cache on (``load_base`` turns it off for training). On the CPU, LLM.int8
    layers keep their training forward (dequantize + fp32 matmul), as export's verification does: the
    eval forward also quantizes the activations (logits 7e-3 off the merged export on a tiny model)."""
    import torch

    model.eval()
    if not torch.cuda.is_available():
        for module in model.modules():
            if type(module).__name__ == "Linear8bitLt" and type(module).__module__.startswith("bitsandbytes"):
                module.train()
    model.config.use_cache = True
    return model
