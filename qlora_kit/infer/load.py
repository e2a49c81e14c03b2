"""Loading for inference (``generate``, ``eval``): an adapter on its base, loaded the way training
loaded it (:func:`qlora_kit.adapter.load_trained_base`) and checked the way every command checks an
adapter (:mod:`qlora_kit.adapter`), or a plain/merged model; in eval mode with the KV cache on.

torch, transformers and peft are imported inside the functions, so importing this module is cheap.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from qlora_kit.adapter import (
    METADATA_FILE,
    QuantSource,
    adapter_config,
    adapter_weights,
    check_factor_ranks,
    check_fingerprint,
    check_trust,
    load_trained_base,
    quant_source,
    read_metadata,
    resolve_base,
    stored_dtype,
)
from qlora_kit.errors import UsageError
from qlora_kit.model.lora import check_dora_runs


@dataclass(frozen=True)
class LoadedInfo:
    """What :func:`load_for_inference` loaded: the base, how it is quantized, the adapter (if any)."""

    base: str
    quant: QuantSource
    adapter: str | None = None
    recipe: dict[str, Any] | None = None  # the training recipe, from qlora_kit.json


@dataclass(frozen=True)
class Trust:
    """What the user allowed on the command line: remote code, pickle files."""

    remote_code: bool = False
    pickle: bool = False


def load_for_inference(
    adapter: str | None = None,
    model: str | None = None,
    *,
    base: str | None = None,
    quant: str | None = None,
    double_quant: bool | None = None,
    trust_remote_code: bool = False,
    allow_pickle: bool = False,
) -> tuple[Any, Any, LoadedInfo]:
    """(model in eval mode, tokenizer, info) for an adapter on its base, or a plain/merged model.

    An adapter's base is loaded the way training loaded it (:func:`load_trained_base`), then
    ``PeftModel.from_pretrained``; int8 layers run the forward training ran (see
    ``export.verify._reference_model``). A plain model (``model``, e.g. a merged export) is loaded
    unquantized in fp32 on the CPU (16-bit matmuls are slow there), as stored on a GPU.
    """
    if (adapter is None) == (model is None):
        raise UsageError("give exactly one of --adapter and --model", "--adapter DIR (a LoRA run) or --model DIR")
    trust = Trust(trust_remote_code, allow_pickle)
    if model is not None:
        if base or quant or double_quant is not None:
            raise UsageError("--base/--quant/--double-quant go with --adapter", "leave them out with --model")
        return _load_plain(model, trust)
    return _load_adapter(Path(adapter or ""), base, quant, double_quant, trust)


def _device_map() -> Any:
    import torch

    return {"": 0} if torch.cuda.is_available() else None


def _load_plain(model: str, trust: Trust) -> tuple[Any, Any, LoadedInfo]:
    from qlora_kit.catalog.bundled import resolve
    from qlora_kit.model.load import load_base, load_tokenizer
    from qlora_kit.recipe import ModelSpec, QuantSpec

    spec = ModelSpec(name=resolve(model), trust_remote_code=trust.remote_code)
    _check_model_dir(spec.name)
    if Path(spec.name).is_dir():
        check_trust(None, Path(spec.name), trust.remote_code)
    device_map = _device_map()
    plain = QuantSpec("none", False, stored_dtype(Path(spec.name)) if device_map else "fp32")
    loaded = load_base(spec, plain, device_map=device_map)
    info = LoadedInfo(spec.name, QuantSource("none", False, plain.compute_dtype))
    return _for_generation(loaded), load_tokenizer(spec), info


def _load_adapter(
    adapter_path: Path, base: str | None, quant: str | None, double_quant: bool | None, trust: Trust
) -> tuple[Any, Any, LoadedInfo]:
    from qlora_kit.model.load import load_tokenizer
    from qlora_kit.recipe import ModelSpec

    config = adapter_config(adapter_path)
    check_factor_ranks(adapter_weights(adapter_path, trust.pickle), adapter_path)
    metadata = read_metadata(adapter_path)
    if metadata is None and quant is None:
        raise UsageError(
            f"{adapter_path} has no {METADATA_FILE} (not made by qlora-kit), so its base's quantization is unknown",
            "pass --quant nf4|fp4|int8|none (and --double-quant/--no-double-quant for nf4/fp4)",
        )
    qsource = quant_source(metadata, quant, double_quant, None, "dequantized")
    assert qsource is not None  # quant is known: from the metadata or the caller
    base_path = resolve_base(base, metadata, config.get("base_model_name_or_path"), adapter_path)
    check_fingerprint(metadata, base_path)
    check_trust(metadata, base_path, trust.remote_code)
    check_dora_runs(bool(config.get("use_dora")) and qsource.mode == "int8" and _device_map() is None)
    loaded, qsource = load_trained_base(base_path, qsource, metadata, trust.remote_code, _device_map())
    peft_model = _with_adapter(loaded, adapter_path, base_path)
    has_tokenizer = any((adapter_path / f).is_file() for f in ("tokenizer.json", "tokenizer_config.json"))
    source = adapter_path if has_tokenizer else base_path
    tokenizer = load_tokenizer(ModelSpec(name=str(source), trust_remote_code=trust.remote_code))
    info = LoadedInfo(str(base_path), qsource, str(adapter_path), metadata.recipe if metadata else None)
    return _for_generation(peft_model), tokenizer, info


def _with_adapter(loaded: Any, adapter_path: Path, base_path: Path) -> Any:
    from peft import PeftModel

    try:
        return PeftModel.from_pretrained(loaded, adapter_path)
    except (RuntimeError, ValueError, KeyError) as exc:
        lines = [line.strip() for line in str(exc).splitlines() if line.strip()] or [type(exc).__name__]
        first = next((line for line in lines if "size mismatch" in line), lines[0])  # torch: header, then why
        raise UsageError(
            f"the adapter in {adapter_path} does not fit the base {base_path}: {first[:300]}",
            "pass --base with the model the adapter was trained on",
        ) from None


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
