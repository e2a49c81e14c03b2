"""safetensors files read and written one tensor (or one chunk) at a time, for ``qlora-kit export``.

- :class:`Checkpoint` / :class:`Shard`: the base's weight files; tensors are read with ``readinto``
  into fresh tensors, never memory-mapped, so the resident set holds one tensor, not one file;
- :class:`ShardWriter`: an output shard whose header is planned first, its tensors then streamed in.
"""

from __future__ import annotations

import json
import math
import re
import struct
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

import torch

from qlora_kit.errors import UsageError
from qlora_kit.model.load import TORCH_DTYPES

_ST_DTYPES = {
    torch.float64: "F64",
    torch.float32: "F32",
    torch.float16: "F16",
    torch.bfloat16: "BF16",
    torch.int64: "I64",
    torch.int32: "I32",
    torch.int16: "I16",
    torch.int8: "I8",
    torch.uint8: "U8",
    torch.bool: "BOOL",
    torch.float8_e4m3fn: "F8_E4M3",
    torch.float8_e5m2: "F8_E5M2",
}
ST_DTYPE_TO_TORCH = {v: k for k, v in _ST_DTYPES.items()}


def parse_decimal_bytes(size: int | str) -> int:
    """A shard size -> bytes, in transformers' ``max_shard_size`` units: KB, MB, GB, TB are decimal
    (``"5GB"`` = 5 * 10**9), KiB, MiB, GiB, TiB binary (``"500MiB"`` = 500 * 2**20), a bare number or an
    int is bytes. (GPU sizes read GB as 2**30: :func:`qlora_kit.catalog.gpus.parse_binary_bytes`.)"""
    fix = "write it like 5GB, 500MB or 2GiB (more than zero)"
    if isinstance(size, int):
        if size <= 0:
            raise UsageError(f"--max-shard-size must be more than zero, got {size}", fix)
        return size
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]i?B|B)?\s*", size, re.IGNORECASE)
    if not m:
        raise UsageError(f"cannot read the size {size[:40]!r}", fix)
    unit = (m.group(2) or "B").upper()
    powers = {"B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12}
    powers |= {"KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40}
    value = int(float(m.group(1)) * powers[unit])
    if value <= 0:
        raise UsageError(f"--max-shard-size must be more than zero, got {size!r}", fix)
    return value


def st_dtype(dtype: torch.dtype) -> str:
    return _ST_DTYPES[dtype]


@dataclass
class PlannedTensor:
    name: str
    dtype: torch.dtype
    shape: tuple[int, ...]

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * torch.empty((), dtype=self.dtype).element_size()


class ShardWriter:
    """Writes one safetensors file whose tensors (names, dtypes, shapes) are known in advance.

    The format is an 8-byte little-endian header length, a JSON header with every tensor's byte range,
    then the raw little-endian bytes in that order; knowing the layout up front lets us stream the
    tensors in one by one instead of collecting a shard's worth in memory as ``save_file`` needs.
    """

    def __init__(self, path: Path, tensors: list[PlannedTensor], metadata: Mapping[str, str] | None = None) -> None:
        header: dict[str, Any] = {"__metadata__": dict(metadata or {"format": "pt"})}
        offset = 0
        for t in tensors:
            header[t.name] = {
                "dtype": st_dtype(t.dtype),
                "shape": list(t.shape),
                "data_offsets": [offset, offset + t.nbytes],
            }
            offset += t.nbytes
        raw = json.dumps(header, separators=(",", ":")).encode()
        raw += b" " * (-len(raw) % 8)  # safetensors aligns the data to 8 bytes
        self.path = path
        self.expected = list(tensors)
        self.fh: BinaryIO = path.open("wb")
        self.fh.write(struct.pack("<Q", len(raw)) + raw)

    def write(self, name: str, pieces: Iterable[torch.Tensor]) -> None:
        """Append the next planned tensor, given as consecutive pieces of its flattened data."""
        want = self.expected.pop(0)
        written = 0
        for piece in pieces:
            if name != want.name or piece.dtype != want.dtype:
                raise RuntimeError(f"shard writer: got {name} {piece.dtype}, planned {want}")
            flat = piece.detach().contiguous().reshape(-1).view(torch.uint8)
            if flat.numel():
                self.fh.write(memoryview(flat.numpy()))
            written += flat.numel()
        if written != want.nbytes:
            raise RuntimeError(f"shard writer: {name} got {written} bytes, planned {want.nbytes}")

    def close(self) -> None:
        if self.expected:
            raise RuntimeError(f"shard writer: {len(self.expected)} planned tensors were never written")
        self.fh.flush()
        self.fh.close()


# -- the base checkpoint --------------------------------------------------------------------------------


class Checkpoint:
    """The base's weight files and their headers; :meth:`open` maps one file at a time."""

    def __init__(self, files: list[Path], pickled: bool) -> None:
        self.files, self.pickled = files, pickled
        self.headers: list[dict[str, tuple[torch.dtype, tuple[int, ...]]]] = []
        for i in range(len(files)):
            shard = self.open(i)
            self.headers.append({k: (shard.dtype(k), shard.shape(k)) for k in shard.names()})
            shard.close()

    def open(self, index: int) -> Shard:
        return Shard(self.files[index], self.pickled)

    def float_dtype_name(self) -> str:
        """The checkpoint's floating-point dtype (what transformers 5 loads it in by default)."""
        for header in self.headers:
            for dt, _ in header.values():
                for name, known in TORCH_DTYPES.items():
                    if dt == known:
                        return name
        return "fp32"


class Shard:
    """One weight file. safetensors tensors are read with ``readinto`` into fresh tensors, not mapped:
    pages of a mapped file count in the resident set until it is closed, which would make the peak one
    base shard (5 GB by default) instead of one tensor."""

    def __init__(self, path: Path, pickled: bool) -> None:
        self._sd: dict[str, torch.Tensor] | None = None
        self._fh: BinaryIO | None = None
        if pickled:
            self._sd = torch.load(path, map_location="cpu", mmap=True, weights_only=True)
            return
        self._fh = path.open("rb")
        (length,) = struct.unpack("<Q", self._fh.read(8))
        header = json.loads(self._fh.read(length))
        header.pop("__metadata__", None)
        self._start = 8 + length
        self._entries: dict[str, Any] = header

    def names(self) -> list[str]:
        return sorted(self._sd if self._sd is not None else self._entries)

    def dtype(self, key: str) -> torch.dtype:
        if self._sd is not None:
            return self._sd[key].dtype
        return ST_DTYPE_TO_TORCH[self._entries[key]["dtype"]]

    def shape(self, key: str) -> tuple[int, ...]:
        if self._sd is not None:
            return tuple(self._sd[key].shape)
        return tuple(self._entries[key]["shape"])

    def get(self, key: str) -> torch.Tensor:
        if self._sd is not None:
            return self._sd[key]
        begin, end = self._entries[key]["data_offsets"]
        raw = torch.empty(end - begin, dtype=torch.uint8)
        self._read(key, begin, raw)
        return raw.view(self.dtype(key)).reshape(self.shape(key))

    def chunks(self, key: str, chunk_bytes: int = 1 << 24) -> Iterator[torch.Tensor]:
        """The tensor's flattened data, ``chunk_bytes`` at a time."""
        if self._sd is not None:
            flat = self._sd[key].reshape(-1)
            yield from flat.split(max(1, chunk_bytes // flat.element_size()))
            return
        assert self._fh is not None
        begin, end = self._entries[key]["data_offsets"]
        dtype = self.dtype(key)
        size = torch.empty((), dtype=dtype).element_size()
        step = max(size, chunk_bytes // size * size)
        for at in range(begin, end, step):
            raw = torch.empty(min(step, end - at), dtype=torch.uint8)
            self._read(key, at, raw)
            yield raw.view(dtype)

    def _read(self, key: str, at: int, raw: torch.Tensor) -> None:
        assert self._fh is not None
        view = memoryview(raw.numpy())
        self._fh.seek(self._start + at)
        done = 0
        while done < len(view):
            n = self._fh.readinto(view[done:])
            if not n:
                raise UsageError(f"{self._fh.name} is truncated (tensor {key})", "re-download or re-save the base")
            done += n

    def close(self) -> None:
        if self._fh is not None:
            self._fh.close()
        self._sd = self._fh = None


def open_checkpoint(base_path: Path, allow_pickle: bool) -> Checkpoint:
    for index, single, pickled in (
        ("model.safetensors.index.json", "model.safetensors", False),
        ("pytorch_model.bin.index.json", "pytorch_model.bin", True),
    ):
        if (base_path / index).is_file():
            weight_map = json.loads((base_path / index).read_text())["weight_map"]
            files = [base_path / f for f in sorted(set(weight_map.values()))]
        elif (base_path / single).is_file():
            files = [base_path / single]
        else:
            continue
        if pickled and not allow_pickle:
            raise UsageError(
                f"the base at {base_path} is a pickle checkpoint ({files[0].name}), which can run code when loaded",
                "convert it to safetensors, or pass --allow-pickle if you trust its source",
            )
        return Checkpoint(files, pickled)
    raise UsageError(f"no model weights in {base_path}", "the base needs model.safetensors (or sharded safetensors)")


def shard_names(count: int) -> list[str]:
    if count == 1:
        return ["model.safetensors"]
    return [f"model-{i + 1:05d}-of-{count:05d}.safetensors" for i in range(count)]
