"""What an adapter directory says about its base: ``qlora_kit.json`` (written last by ``train``), the
quantization the adapter was trained against, where the base is, and whether it is the same base.

Shared by ``export``, ``generate`` and ``eval``, so that every command finds and checks the base
the same way.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

from qlora_kit.errors import UsageError
from qlora_kit.merge import LOAD_DTYPES, QUANT_MODES, Adapter, QuantSource

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
    from qlora_kit.bundled import resolve

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
