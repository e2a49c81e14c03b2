"""GPUs as data, and free-form memory sizes.

Unit convention: GPU makers label memory in binary units (a "24 GB" RTX 4090 holds 24 GiB =
25,769,803,776 bytes), so qlora-kit reads ``GB``, ``G`` and ``GiB`` alike as 2**30 bytes, and ``MB``,
``M``, ``MiB`` as 2**20. A bare number is GiB. Every size qlora-kit prints is in GiB.

This module must not import torch.
"""

from __future__ import annotations

import csv
import difflib
import re
from dataclasses import dataclass
from functools import cache
from importlib import resources

from qlora_kit.errors import UsageError

GIB = 1 << 30
MIB = 1 << 20
HEADROOM = 0.05  # the share of a card the planner leaves free: a setting fits within the rest (fit_limit)

_UNITS = {
    "": GIB,
    "t": 1 << 40,
    "tb": 1 << 40,
    "tib": 1 << 40,
    "g": GIB,
    "gb": GIB,
    "gib": GIB,
    "m": MIB,
    "mb": MIB,
    "mib": MIB,
}
_SIZE = re.compile(r"^\s*([0-9]*\.?[0-9]+)\s*([a-z]*)\s*$", re.IGNORECASE)


@dataclass(frozen=True)
class DeviceSpec:
    """A GPU: its name, memory in bytes, and whether it computes in bf16 (compute capability >= 8.0)."""

    name: str
    memory_bytes: int
    bf16: bool = True
    family: str = ""

    @property
    def memory_gib(self) -> float:
        return self.memory_bytes / GIB

    @property
    def fit_limit(self) -> int:
        """The bytes a training setting may take on this card: its memory less :data:`HEADROOM`."""
        return int(self.memory_bytes * (1 - HEADROOM))


# NVIDIA generations by CUDA compute capability (NVIDIA's "CUDA GPUs - Compute Capability" table):
# 6.x Pascal, 7.0/7.2 Volta, 7.5 Turing, 8.0/8.6/8.7 Ampere, 8.9 Ada, 9.0 Hopper, 10.x/12.x Blackwell
_FAMILIES = {
    (6, None): "Pascal",
    (7, 0): "Volta",
    (7, 2): "Volta",
    (7, 5): "Turing",
    (8, 9): "Ada",
    (9, None): "Hopper",
}
_FAMILIES.update({(8, None): "Ampere", (10, None): "Blackwell", (12, None): "Blackwell"})


def family_of_capability(major: int, minor: int) -> str:
    """The GPU generation (the ``family`` column of the GPU table) of a CUDA compute capability; "" if unknown."""
    return _FAMILIES.get((major, minor)) or _FAMILIES.get((major, None), "")


def parse_binary_bytes(text: str) -> int:
    """A GPU memory size -> bytes, in binary units as on GPU labels: ``24GB`` = ``24 GiB`` = ``24G`` =
    ``24`` = 24 * 2**30, ``24576MiB`` = ``24576MB`` = 24576 * 2**20 (see the module doc; export's shard
    sizes read GB as 10**9 instead: :func:`qlora_kit.export.shards.parse_decimal_bytes`)."""
    match = _SIZE.match(text)
    unit = match.group(2).lower() if match else ""
    if match is None or unit not in _UNITS:
        raise UsageError(
            f"cannot read memory size {text!r}",
            "write it like 24GB, 24 GiB, 24576MiB or 80G (GB means GiB, as on GPU labels)",
        )
    size = int(float(match.group(1)) * _UNITS[unit])
    if size < 256 * MIB:
        raise UsageError(f"memory size {text!r} is too small for a GPU", "give the card's memory, e.g. 24GB")
    return size


@cache
def _gpu_rows() -> tuple[tuple[DeviceSpec, tuple[str, ...]], ...]:
    """The GPU table, read once: each card with the names it answers to."""
    text = resources.files("qlora_kit").joinpath("resources/gpus.csv").read_text()
    return tuple(
        (
            DeviceSpec(row["name"], int(float(row["memory_gib"]) * GIB), row["bf16"] == "true", row["family"]),
            (row["name"], *filter(None, row["aliases"].split("|"))),
        )
        for row in csv.DictReader(text.splitlines())
    )


def gpu_table() -> tuple[DeviceSpec, ...]:
    return tuple(spec for spec, _ in _gpu_rows())


def _norm(name: str) -> str:
    name = name.lower().replace("nvidia", "").replace("geforce", "").replace("tesla", "")
    return re.sub(r"[\s_-]+", "", name)


@cache
def _gpu_index() -> dict[str, DeviceSpec]:
    index: dict[str, DeviceSpec] = {}
    for spec, names in _gpu_rows():
        for alias in names:
            index.setdefault(_norm(alias), spec)
    return index


def resolve_gpu(text: str) -> DeviceSpec:
    """A card name from the table (``rtx4090``, ``A100 80GB``) or a size (``24GB``)."""
    spec = _gpu_index().get(_norm(text))
    if spec is not None:
        return spec
    if _SIZE.match(text):
        size = parse_binary_bytes(text)
        return DeviceSpec(f"{size / GIB:g} GiB GPU", size)
    close = difflib.get_close_matches(_norm(text), list(_gpu_index()), n=3, cutoff=0.6)
    hint = "give a size such as 24GB or a card name (`qlora-kit gpus` lists them)"
    if close:
        hint = "did you mean " + ", ".join(_gpu_index()[c].name for c in close) + "? or " + hint
    raise UsageError(f"unknown GPU {text!r}", hint)
