"""The built-in model catalog and name resolution: a name, path or hub id -> :class:`ArchSpec`.

Besides a hub id, each entry answers to its key (``llama-3.1-8b``) and to the short forms of
:mod:`qlora_kit.catalog.shortnames` (``mistral-7b``, ``qwen-7b``) that name it alone.

The built-in catalog (``resources/models.json``) holds the config dicts of the models in
``shared/reference/model_configs.csv``; their sources are listed in ``docs/catalog.md``. Each goes
through the same reader (:func:`qlora_kit.catalog.arch.arch_from_config`) as a user's checkpoint.

This module must not import torch: ``qlora-kit plan`` answers without it.
"""

from __future__ import annotations

import difflib
import json
import os
from functools import cache
from importlib import resources
from pathlib import Path
from typing import Any

from qlora_kit.catalog import shortnames
from qlora_kit.catalog.arch import ArchSpec
from qlora_kit.catalog.readers import arch_from_config
from qlora_kit.errors import UsageError


@cache
def catalog_configs() -> dict[str, dict[str, Any]]:
    """The built-in catalog: hub id -> config dict."""
    text = resources.files("qlora_kit").joinpath("resources/models.json").read_text()
    data: dict[str, dict[str, Any]] = json.loads(text)
    return data


def _key(name: str) -> str:
    """Normalized lookup key: no organisation, lower case, no ``-hf`` suffix or ``meta-`` prefix."""
    key = name.strip().lower().rsplit("/", 1)[-1]
    key = key.removesuffix("-hf")
    return key.removeprefix("meta-")


@cache
def _names() -> shortnames.ShortNames:
    return shortnames.build((_key(hf_id), hf_id) for hf_id in catalog_configs())


def catalog_names() -> list[str]:
    return list(catalog_configs())


def short_names(hf_id: str) -> tuple[str, ...]:
    """The names a catalog entry answers to besides its hub id: its key, then its short forms."""
    return (_key(hf_id), *_names().shown.get(hf_id, ()))


def ambiguous_names() -> dict[str, tuple[str, ...]]:
    """Short forms several entries share (``llama-8b``) -> the keys of those entries."""
    return {form: tuple(_key(h) for h in ids) for form, ids in _names().ambiguous.items()}


def _find(name: str) -> str | None:
    """The hub id a catalog name means; ``None`` if it means none; one line if it could mean several."""
    org = name.strip().rpartition("/")[0]
    ids = _names().candidates(_key(name), org)
    if len(ids) > 1:
        raise UsageError(
            f"model {name.strip()!r} could mean {len(ids)} catalog models: {', '.join(ids)}",
            "name the version: " + " or ".join(_key(h) for h in ids),
        )
    return ids[0] if ids else None


def lookup(name: str) -> ArchSpec:
    """Resolve a catalog name: a hub id or its key (case-insensitive), or a short form naming one entry."""
    hf_id = _find(name)
    if hf_id is None:
        raise UsageError(f"unknown model {name!r}", _suggest(name))
    return arch_from_config(catalog_configs()[hf_id], hf_id)


def _suggest(name: str) -> str:
    keys = {_key(hf_id): hf_id for hf_id in catalog_configs()}
    close = difflib.get_close_matches(_key(name), list(keys), n=3, cutoff=0.5)
    if close:
        return "did you mean " + ", ".join(keys[c] for c in close) + "? (`qlora-kit models` lists all)"
    return "`qlora-kit models` lists the catalog; a local directory or config.json path also works"


def _read_config_file(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise UsageError(f"cannot read {path}: {exc}", "pass a valid config.json") from None
    if not isinstance(data, dict):
        raise UsageError(f"{path} is not a JSON object", "pass a Hugging Face config.json")
    return data


def _fetch_hub_config(repo_id: str, timeout_s: float = 5.0) -> dict[str, Any]:
    """Fetch only ``config.json`` of a hub repo (honours HF_ENDPOINT and HF_HUB_OFFLINE)."""
    import urllib.error  # only on this path: it costs a third of the planner's start-up
    import urllib.request

    if os.environ.get("HF_HUB_OFFLINE", "0") not in ("0", "", "false", "False"):
        raise UsageError(
            f"{repo_id!r} is not in the catalog and HF_HUB_OFFLINE is set",
            "pass a local directory or config.json path instead",
        )
    endpoint = os.environ.get("HF_ENDPOINT", "https://huggingface.co").rstrip("/")
    url = f"{endpoint}/{repo_id}/resolve/main/config.json"
    request = urllib.request.Request(url, headers={"User-Agent": "qlora-kit"})
    token = os.environ.get("HF_TOKEN")
    if token:
        request.add_header("Authorization", f"Bearer {token}")
    try:
        with urllib.request.urlopen(request, timeout=timeout_s) as response:
            data = json.loads(response.read().decode())
    except urllib.error.HTTPError as exc:
        raise UsageError(
            f"{repo_id!r} is not in the catalog and the hub answered {exc.code} for its config.json",
            _suggest(repo_id),
        ) from None
    except (urllib.error.URLError, TimeoutError, OSError, json.JSONDecodeError) as exc:
        reason = getattr(exc, "reason", exc)
        raise UsageError(
            f"{repo_id!r} is not in the catalog and its config.json could not be fetched ({reason})",
            "you seem to be offline: pass a local directory or config.json path, or a catalog name",
        ) from None
    if not isinstance(data, dict):
        raise UsageError(f"the hub's config.json for {repo_id!r} is not a JSON object", "pass a local path")
    return data


def resolve_model(name_or_path: str) -> ArchSpec:
    """A catalog name, a local checkpoint directory, a config.json path, or (online) a hub id."""
    path = Path(name_or_path).expanduser()
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise UsageError(f"{path} has no config.json", "pass a Hugging Face model directory")
        return arch_from_config(_read_config_file(path / "config.json"), str(path))
    if path.suffix == ".json" or path.is_file():
        if not path.is_file():
            raise UsageError(f"{path} does not exist", "check the path to config.json")
        return arch_from_config(_read_config_file(path), str(path))
    if _find(name_or_path) is not None:
        return lookup(name_or_path)
    if name_or_path.count("/") == 1 and " " not in name_or_path:
        return arch_from_config(_fetch_hub_config(name_or_path), name_or_path)
    raise UsageError(f"unknown model {name_or_path!r}", _suggest(name_or_path))
