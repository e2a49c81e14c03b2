"""What an adapter directory says about its base: ``qlora_kit.json`` (written last by ``train``), the
quantization the adapter was trained against, where the base is, whether it is the same base, and
loading that base the way training loaded it.

Shared by ``export``, ``generate`` and ``eval``, so that every command reads an adapter's files, finds
and checks the base, and refuses unsafe or broken files the same way. Loading an adapter (or a merged
model) for ``generate`` and ``eval`` is :mod:`qlora_kit.infer.load`.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import pickle
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from qlora_kit.errors import UsageError
from qlora_kit.knobs import DTYPES, FOUR_BIT, QUANTS, double_quant_for, double_quant_refused

METADATA_FILE = "qlora_kit.json"  # what `qlora-kit train` writes last (train.METADATA_FILE)
QUANT_MODES = QUANTS
LOAD_DTYPES = tuple(DTYPES)
TRUST_FLAG = "--trust-remote-code"
PICKLE_FIX = "convert it to safetensors, or pass --allow-pickle if you trust its source"


@dataclass(frozen=True)
class QuantSource:
    mode: str  # nf4, fp4, int8, none
    double_quant: bool
    compute_dtype: str  # the dtype the base was loaded in (load_base uses the compute dtype)


def read_json_object(path: Path, fix: str) -> dict[str, Any]:
    """A JSON file that must hold one object: a broken or non-object file is one line naming it."""
    try:
        data = json.loads(path.read_bytes())
    except (ValueError, UnicodeDecodeError) as exc:
        raise UsageError(f"{path} is not valid JSON ({str(exc)[:120]})", fix) from None
    if not isinstance(data, dict):
        raise UsageError(f"{path} holds a JSON {type(data).__name__}, not an object", fix)
    return data


# -- qlora_kit.json ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class RunMetadata:
    """``qlora_kit.json``, parsed once. ``raw`` keeps every key, those this version does not read too."""

    base_model: str | None
    base_config_sha256: str | None
    quant: dict[str, Any]
    recipe: dict[str, Any] | None
    summary: dict[str, Any]
    raw: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def from_dict(cls, data: dict[str, Any], path: Path) -> RunMetadata:
        sections = {k: data.get(k) for k in ("quant", "recipe", "summary")}
        for key, value in sections.items():
            if value is not None and not isinstance(value, dict):
                raise UsageError(f"{path}: {key!r} is a {type(value).__name__}, not an object", _METADATA_FIX)
        for key in ("base_model", "base_config_sha256"):
            if data.get(key) is not None and not isinstance(data[key], str):
                raise UsageError(f"{path}: {key!r} is not a string", _METADATA_FIX)
        return cls(
            data.get("base_model") or None,
            data.get("base_config_sha256") or None,
            sections["quant"] or {},
            sections["recipe"],
            sections["summary"] or {},
            dict(data),
        )

    def recipe_section(self, name: str) -> dict[str, Any]:
        section = (self.recipe or {}).get(name)
        return section if isinstance(section, dict) else {}

    @property
    def trust_remote_code(self) -> bool:
        """Whether the run's recipe loaded its base with remote code (never acted on without the flag)."""
        return bool(self.recipe_section("model").get("trust_remote_code"))


_METADATA_FIX = f"re-run training, or delete {METADATA_FILE} and pass --base/--quant"


def read_metadata(adapter_path: Path) -> RunMetadata | None:
    path = adapter_path / METADATA_FILE
    return RunMetadata.from_dict(read_json_object(path, _METADATA_FIX), path) if path.is_file() else None


def check_trust(metadata: RunMetadata | None, base_path: Path | None, trust_remote_code: bool) -> None:
    """Remote code runs only from the user's own flag: a file that asks for it is refused without it."""
    if trust_remote_code:
        return
    if metadata is not None and metadata.trust_remote_code:
        raise UsageError(
            f"the adapter's {METADATA_FILE} says its base needs remote code (trust_remote_code), "
            "which qlora-kit never runs because a file asks",
            f"pass {TRUST_FLAG} if you trust the base's code",
        )
    config = base_path / "config.json" if base_path is not None else None
    if config is not None and config.is_file() and "auto_map" in read_json_object(config, "re-download the base"):
        raise UsageError(
            f"the base at {base_path} uses custom code (auto_map in its config.json)",
            f"pass {TRUST_FLAG} if you trust that code",
        )


# -- the adapter's weights: one reader, one pickle rule ------------------------------------------------


def adapter_config(path: Path) -> dict[str, Any]:
    config_path = path / "adapter_config.json"
    if not config_path.is_file():
        what = f"adapter directory {path} does not exist" if not path.exists() else None
        raise UsageError(
            what or f"{path} is not a LoRA adapter: adapter_config.json is missing",
            "point --adapter at the directory `qlora-kit train` (or peft's save_pretrained) wrote",
        )
    return read_json_object(config_path, "re-save the adapter, or point --adapter at a finished run")


def adapter_weights(path: Path, allow_pickle: bool) -> dict[str, Any]:
    """The adapter's tensors. Pickle (``adapter_model.bin``) only with ``allow_pickle``, and even then
    through ``torch.load(weights_only=True)``: a file that would run code is one line, never run."""
    import torch

    st, pickled = path / "adapter_model.safetensors", path / "adapter_model.bin"
    if st.is_file():
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        try:
            return load_file(st)
        except (SafetensorError, OSError, ValueError) as exc:
            raise UsageError(f"{st} is truncated or corrupt ({str(exc)[:120]})", "re-save the adapter") from None
    if pickled.is_file():
        if not allow_pickle:
            raise UsageError(f"{pickled} is a pickle file, which can run code when loaded", PICKLE_FIX)
        try:
            return dict(torch.load(pickled, map_location="cpu", weights_only=True))
        except (pickle.UnpicklingError, RuntimeError, EOFError, ValueError, TypeError) as exc:
            refused = re.search(r"GLOBAL ([\w.]+)", str(exc))  # torch names the callable it would not call
            why = f"it would call {refused.group(1)}" if refused else type(exc).__name__
            raise UsageError(
                f"{pickled} is not a plain tensor file; refused to load it ({why})",
                "convert it to safetensors from a trusted source",
            ) from None
    raise UsageError(
        f"{path} has adapter_config.json but no adapter_model.safetensors",
        "the adapter is incomplete: re-save it, or point --adapter at a finished run",
    )


def check_factor_ranks(tensors: dict[str, Any], path: Path) -> None:
    """Every LoRA A/B pair agrees on its rank (A is (r, in), B is (out, r); embeddings alike)."""
    halves: dict[str, dict[str, Any]] = {}
    for key, tensor in tensors.items():
        m = re.match(r"(.+)\.lora_(A|B)\.weight$", key) or re.match(r"(.+)\.lora_embedding_(A|B)$", key)
        if m:
            halves.setdefault(m.group(1), {})[m.group(2)] = tensor
    for module, pair in halves.items():
        a, b = pair.get("A"), pair.get("B")
        if a is not None and b is not None and a.dim() == b.dim() == 2 and a.shape[0] != b.shape[1]:
            raise UsageError(
                f"{path}: the LoRA factors of {module} disagree on the rank (A has {a.shape[0]} rows, "
                f"B {b.shape[1]} columns)",
                "the adapter is corrupt: re-save it",
            )


# -- the base: how it was quantized, where it is, whether it is the same one ----------------------------


def quant_source(
    metadata: RunMetadata | None,
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
        return _recorded_quant(metadata, quant, double_quant, compute_dtype)
    if quant is None:
        if merge_into == "original":
            return None
        raise UsageError(
            f"the adapter has no {METADATA_FILE} (not made by qlora-kit), so its base's quantization is unknown",
            "pass --quant nf4|fp4|int8|none (and --double-quant/--no-double-quant for nf4/fp4), "
            "or --merge-into original",
        )
    if quant in FOUR_BIT and double_quant is None:
        raise UsageError(
            f"--quant {quant} needs --double-quant or --no-double-quant: it changes the rounding of the base",
            "pass the bnb_4bit_use_double_quant the adapter was trained with",
        )
    if double_quant_refused(quant, double_quant):
        raise UsageError(f"double quant is for nf4/fp4, not {quant}", "leave out --double-quant")
    return QuantSource(quant, bool(double_quant), compute_dtype or "")


def _recorded_quant(
    metadata: RunMetadata, quant: str | None, double_quant: bool | None, compute_dtype: str | None
) -> QuantSource:
    q = metadata.quant
    if q.get("mode") not in QUANT_MODES:
        raise UsageError(f"the adapter's {METADATA_FILE} does not say how its base was quantized", "re-run training")
    dq = double_quant_for(q["mode"], bool(q.get("double_quant")))
    recorded_dtype = q.get("compute_dtype")
    if recorded_dtype is not None and recorded_dtype not in LOAD_DTYPES:
        raise UsageError(f"the adapter's {METADATA_FILE} records an unknown compute_dtype", _METADATA_FIX)
    known = QuantSource(q["mode"], dq, recorded_dtype or compute_dtype or "")
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


def resolve_base(base: str | None, metadata: RunMetadata | None, config_base: str | None, adapter_path: Path) -> Path:
    """The base's directory: ``--base``, else qlora_kit.json's, else adapter_config.json's
    ``base_model_name_or_path`` (``config_base``), looked for next to the adapter and in the hub cache."""
    from qlora_kit.catalog.bundled import resolve

    name = base or (metadata.base_model if metadata else None) or config_base
    if not name or not isinstance(name, str):
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
    data = read_json_object(path, "re-download or re-save the base")
    for volatile in ("_name_or_path", "transformers_version", "torch_dtype", "dtype", "quantization_config"):
        data.pop(volatile, None)
    return hashlib.sha256(json.dumps(data, sort_keys=True).encode()).hexdigest()


def check_fingerprint(metadata: RunMetadata | None, base_path: Path) -> None:
    recorded = metadata.base_config_sha256 if metadata else None
    if recorded and config_fingerprint(str(base_path)) != recorded:
        raise UsageError(
            f"the base at {base_path} is not the model the adapter was trained on (its config.json differs "
            f"from the one {METADATA_FILE} recorded)",
            f"pass --base with the model recorded in {METADATA_FILE} ({metadata.base_model if metadata else None})",
        )


# -- the base as training loaded it (inference, export) -----------------------------------------------


def load_trained_base(
    base_path: Path, qsource: QuantSource, metadata: RunMetadata | None, trust_remote_code: bool, device_map: Any
) -> tuple[Any, QuantSource]:
    """The base as training loaded it: ``load_base`` with the recorded quantization and the recipe's
    k-bit preparation choices (which parameters go fp32); returns it and its exact quantization."""
    from qlora_kit.model.load import load_base
    from qlora_kit.model.lora import prepare
    from qlora_kit.recipe import QuantSpec

    recorded = metadata.recipe_section("quant") if metadata else {}
    known = {f.name for f in dataclasses.fields(QuantSpec)}
    qspec = QuantSpec(
        **{
            **{k: v for k, v in recorded.items() if k in known},
            "mode": qsource.mode,
            "double_quant": qsource.double_quant,
            "compute_dtype": qsource.compute_dtype or stored_dtype(base_path),
        }
    )
    spec, seq_len = trained_spec(base_path, metadata, trust_remote_code)
    base = load_base(spec, qspec, device_map=device_map, seq_len=seq_len)
    loaded = prepare(base, qspec, False)
    return loaded, QuantSource(qspec.mode, qspec.double_quant, qspec.compute_dtype)


def trained_spec(base_path: Path, metadata: RunMetadata | None, trust_remote_code: bool) -> tuple[Any, int | None]:
    """The base's ``ModelSpec`` and sequence length as training saw them: RoPE stretched as the recipe
    stretched it (``model.rope_scaling`` to ``data.max_seq_len``), since other rotary frequencies would make
    another model. ``model.load.stretched_config(*trained_spec(...))`` is that model's config."""
    from qlora_kit.knobs import ROPE_SCALINGS
    from qlora_kit.recipe import ModelSpec

    rope = metadata.recipe_section("model").get("rope_scaling") if metadata else None
    seq_len = metadata.recipe_section("data").get("max_seq_len") if metadata else None
    spec = ModelSpec(
        name=str(base_path), trust_remote_code=trust_remote_code, rope_scaling=rope if rope in ROPE_SCALINGS else "none"
    )
    return spec, seq_len if isinstance(seq_len, int) else None


def stored_dtype(model_dir: Path) -> str:
    """The checkpoint's float dtype name (what transformers 5 loads by default): fp16/bf16/fp32."""
    path = model_dir / "config.json"
    config = read_json_object(path, "re-download or re-save the model") if path.is_file() else {}
    stored = str(config.get("dtype") or config.get("torch_dtype") or "float32")
    return {"float16": "fp16", "bfloat16": "bf16"}.get(stored, "fp32")
