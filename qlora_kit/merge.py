"""The tensor math and file formats under ``qlora-kit export``; no transformers, no peft here.

- :func:`trained_weight`: the base weight as the adapter saw it in training, dequant(quant(W)),
  reproduced with bitsandbytes' own functions on the checkpoint tensor;
- :func:`lora_delta`: scale * B @ A in fp32, oriented like the checkpoint tensor;
- :func:`read_adapter`: a peft LoRA adapter directory -> factors, scales and replacement tensors;
- :class:`Checkpoint`: the base's safetensors shards, read one tensor (or one chunk) at a time;
- :func:`plan_export`: every output tensor, where it comes from and what happens to it, and the
  output shards, from the headers alone (shapes are checked before anything is written);
- :func:`write_shards` / :class:`ShardWriter`: safetensors shards written tensor by tensor (the header
  is planned first), so an export never holds more than the tensor it is merging.
"""

from __future__ import annotations

import json
import math
import re
import struct
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO

import torch

from qlora_kit.errors import UsageError

# bitsandbytes' Params4bit default (blocksize=None -> 64 in 0.45-0.50); transformers 5 passes none
NF4_BLOCKSIZE = 64
QUANT_MODES = ("nf4", "fp4", "int8", "none")
LOAD_DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}
PREFIX = "base_model.model."

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


@dataclass(frozen=True)
class QuantSource:
    mode: str  # nf4, fp4, int8, none
    double_quant: bool
    compute_dtype: str  # the dtype the base was loaded in (load_base uses the compute dtype)


# -- what training computed with ----------------------------------------------------------------------


def trained_weight(
    weight: torch.Tensor, mode: str, double_quant: bool, dtype: torch.dtype, conv1d: bool = False
) -> torch.Tensor:
    """dequant(quant(W)) exactly as the training forward multiplied by it, in fp32.

    ``dtype`` is the dtype the base was loaded in, which :func:`qlora_kit.model.load_base` also makes
    the 4-bit compute dtype. transformers 5.23 casts the checkpoint tensor to the load dtype, transposes
    a GPT-2 ``Conv1D`` weight to (out, in), and hands it to ``Params4bit``/``Int8Params``, which
    quantize on ``.to(device)`` (``integrations/bitsandbytes.py``). We call the same bitsandbytes
    functions on the same input:

    - NF4/FP4: ``quantize_4bit(blocksize=64, compress_statistics=double_quant)``, then
      ``dequantize_4bit`` to the compute dtype: ``Linear4bit`` casts its input to the compute dtype and
      bitsandbytes 0.50's 4-bit matmul dequantizes to its input's dtype (``gemm_4bit``).
    - LLM.int8: ``int8_vectorwise_quant`` of the fp16 cast (``Int8Params._quantize``); the weight the CPU
      training forward multiplies by is ``CB * (SCB / 127)`` in the (fp32) activation dtype
      (``MatMul8bitFp``). A GPU training step multiplies int8 activations by int8 weights instead: no
      dequantized weight reproduces that exactly.
    - ``none``: the checkpoint tensor in the load dtype.

    The result has the checkpoint's orientation (a ``Conv1D`` weight comes back as (in, out)).
    """
    w = weight.to(dtype)
    if mode == "none":
        return w.float()
    import bitsandbytes.functional as bnbf

    if conv1d:
        w = w.T
    w = w.contiguous()
    if mode == "int8":
        cb, scb, _ = bnbf.int8_vectorwise_quant(w.to(torch.float16))
        out = cb.to(torch.float32).mul_(scb.unsqueeze(1).mul(1.0 / 127.0))
    elif mode in ("nf4", "fp4"):
        packed, state = bnbf.quantize_4bit(
            w, blocksize=NF4_BLOCKSIZE, compress_statistics=double_quant, quant_type=mode
        )
        state.dtype = dtype  # the compute dtype (already the load dtype: load_base makes them one)
        out = bnbf.dequantize_4bit(packed, state).float()
    else:
        raise ValueError(f"unknown quantization mode {mode!r}")
    return out.T if conv1d else out


# -- LoRA ---------------------------------------------------------------------------------------------


def lora_scale(alpha: float, rank: int, use_rslora: bool) -> float:
    """LoRA's scale: alpha / r, or alpha / sqrt(r) with rsLoRA (peft ``LoraLayer.update_layer``)."""
    return alpha / math.sqrt(rank) if use_rslora else alpha / rank


def pattern_key(patterns: Iterator[str] | list[str], module: str) -> str | None:
    """peft's ``get_pattern_key``: the first pattern that matches a suffix of ``module`` at a dot boundary."""
    for key in patterns:
        if re.match(rf"(.*\.)?({key})$", module):
            return key
    return None


@dataclass
class LoraFactor:
    """One adapted module: delta = scale * B @ A (linear) or (B @ A)^T (embedding)."""

    module: str  # the module's name in the model (no peft prefix)
    a: torch.Tensor
    b: torch.Tensor
    scale: float
    embedding: bool = False

    @property
    def rank(self) -> int:
        return int(self.a.shape[0])

    def delta_shape(self, transpose: bool) -> tuple[int, ...]:
        d_out, d_in = int(self.b.shape[0]), int(self.a.shape[1])
        return (d_in, d_out) if transpose != self.embedding else (d_out, d_in)


def lora_delta(factor: LoraFactor, transpose: bool = False) -> torch.Tensor:
    """scale * B @ A in fp32, in the orientation of the base tensor.

    ``transpose`` is for GPT-2's ``Conv1D``, whose weight is stored (in, out): peft's
    ``transpose(B @ A, fan_in_fan_out)``. An embedding's factors are A (r, num_embeddings) and
    B (dim, r), and its delta is (B @ A)^T (peft ``lora.Embedding.get_delta_weight``).
    """
    delta = (factor.b.float() @ factor.a.float()).mul_(factor.scale)
    return delta.T if transpose != factor.embedding else delta


@dataclass
class Adapter:
    """A peft LoRA adapter, read: its config, factors and the tensors that replace base tensors."""

    path: Path
    config: dict[str, Any]
    factors: dict[str, LoraFactor]  # base weight name (module + ".weight") -> factor
    replacements: dict[str, torch.Tensor] = field(default_factory=dict)  # base tensor name -> tensor

    @property
    def base_name(self) -> str | None:
        return self.config.get("base_model_name_or_path") or None


_UNSUPPORTED = {
    "use_dora": "DoRA adapters (use_dora) are not supported by qlora-kit export yet",
    "lora_bias": "LoRA biases (lora_bias) are not supported by qlora-kit export yet",
    "target_parameters": "LoRA on parameters (target_parameters) is not supported by qlora-kit export yet",
    "trainable_token_indices": "trainable tokens are not supported by qlora-kit export yet",
    "layer_replication": "layer replication changes the architecture; qlora-kit export cannot merge it",
}


def read_adapter(path: Path, allow_pickle: bool = False) -> Adapter:
    """Read a peft LoRA adapter directory (``adapter_config.json`` + ``adapter_model.safetensors``)."""
    config_path = path / "adapter_config.json"
    if not config_path.is_file():
        raise UsageError(
            f"{path} is not a LoRA adapter: adapter_config.json is missing",
            "point --adapter at the directory `qlora-kit train` (or peft's save_pretrained) wrote",
        )
    config = json.loads(config_path.read_text())
    if config.get("peft_type", "LORA") != "LORA":
        raise UsageError(f"{path} holds a {config.get('peft_type')} adapter", "qlora-kit export merges LoRA adapters")
    for key, why in _UNSUPPORTED.items():
        if config.get(key):
            raise UsageError(f"{path}: {why}", "merge it with peft's merge_and_unload instead")
    tensors = _adapter_tensors(path, allow_pickle)
    return Adapter(path, config, *_parse_adapter(tensors, config))


def _adapter_tensors(path: Path, allow_pickle: bool) -> dict[str, torch.Tensor]:
    st, pickled = path / "adapter_model.safetensors", path / "adapter_model.bin"
    if st.is_file():
        from safetensors.torch import load_file

        return load_file(st)
    if pickled.is_file():
        if not allow_pickle:
            raise UsageError(
                f"{pickled} is a pickle file, which can run code when loaded",
                "convert it to safetensors, or pass --allow-pickle if you trust its source",
            )
        return dict(torch.load(pickled, map_location="cpu", weights_only=True))
    raise UsageError(
        f"{path} has adapter_config.json but no adapter_model.safetensors",
        "the adapter is incomplete: re-save it, or point --adapter at a finished run",
    )


def _parse_adapter(
    tensors: Mapping[str, torch.Tensor], config: Mapping[str, Any]
) -> tuple[dict[str, LoraFactor], dict[str, torch.Tensor]]:
    halves: dict[str, dict[str, torch.Tensor]] = {}
    replacements: dict[str, torch.Tensor] = {}
    for key, tensor in tensors.items():
        name = key[len(PREFIX) :] if key.startswith(PREFIX) else key
        m = re.match(r"(.+)\.(lora_A|lora_B)\.weight$", name) or re.match(
            r"(.+)\.(lora_embedding_A|lora_embedding_B)$", name
        )
        if m:
            halves.setdefault(m.group(1), {})[m.group(2)] = tensor
        elif ".lora_" in name:
            raise UsageError(f"adapter tensor {key!r} is not a plain LoRA factor", "qlora-kit export merges plain LoRA")
        else:  # modules_to_save, trained biases, saved embedding layers: they replace the base tensor
            replacements[name.replace(".base_layer.", ".")] = tensor
    alpha_patterns = list(config.get("alpha_pattern") or {})
    factors: dict[str, LoraFactor] = {}
    for module, pair in halves.items():
        embedding = "lora_embedding_A" in pair or "lora_embedding_B" in pair
        a = pair.get("lora_embedding_A" if embedding else "lora_A")
        b = pair.get("lora_embedding_B" if embedding else "lora_B")
        if a is None or b is None:
            raise UsageError(f"adapter module {module!r} has only one of its two LoRA factors", "re-save the adapter")
        key = pattern_key(alpha_patterns, module)
        alpha = config["alpha_pattern"][key] if key is not None else config.get("lora_alpha", 8)
        scale = lora_scale(alpha, int(a.shape[0]), bool(config.get("use_rslora")))
        factors[module + ".weight"] = LoraFactor(module, a, b, scale, embedding)
    return factors, replacements


# -- safetensors, read and written one tensor at a time ----------------------------------------------


def parse_size(size: int | str) -> int:
    """``"5GB"`` -> 5 * 10**9, ``"500MiB"`` -> 500 * 2**20 (transformers' ``max_shard_size`` units)."""
    if isinstance(size, int):
        return size
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]i?B|B)?\s*", size, re.IGNORECASE)
    if not m:
        raise UsageError(f"cannot read the size {size!r}", "write it like 5GB, 500MB or 2GiB")
    unit = (m.group(2) or "B").upper()
    powers = {"B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12}
    powers |= {"KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40}
    return int(float(m.group(1)) * powers[unit])


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
                for name, known in LOAD_DTYPES.items():
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


# -- the plan: every output tensor, where it comes from, what happens to it -------------------------


@dataclass
class Layout:
    """The base model's skeleton, as transformers builds it on the meta device."""

    names: set[str]  # parameter and buffer names, tied ones included
    prefix: str  # base_model_prefix ("model", "transformer")
    quantized: set[str]  # weights bitsandbytes quantizes when the base loads as in training
    conv1d: set[str]  # weights stored (in, out): GPT-2's Conv1D
    ties: list[list[str]]  # parameters that share storage
    config: Any = None

    def model_name(self, key: str) -> str | None:
        """The model's name for a checkpoint key (older checkpoints may lack or add the base prefix)."""
        for candidate in (key, f"{self.prefix}.{key}", key.removeprefix(f"{self.prefix}.")):
            if candidate in self.names:
                return candidate
        return None


@dataclass
class Op:
    """One output tensor: where it comes from and what happens to it."""

    out: PlannedTensor
    shard: int  # the checkpoint file its source tensor is in
    source: str  # the source tensor's checkpoint key
    quantized: bool = False
    conv1d: bool = False
    factor: LoraFactor | None = None
    replacement: torch.Tensor | None = None


@dataclass
class Plan:
    shards: list[list[Op]]  # output shards in order
    total_bytes: int
    merged: int
    largest_bytes: int
    untied: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    quant: QuantSource | None = None
    merge_into: str = "dequantized"


def plan_export(
    checkpoint: Checkpoint,
    layout: Layout,
    adapter: Adapter,
    qsource: QuantSource,
    merge_into: str,
    out_dtype: torch.dtype,
    shard_bytes: int,
) -> Plan:
    """Match every adapter tensor to a checkpoint tensor, check shapes, and lay out the output shards."""
    located: dict[str, tuple[int, str]] = {}  # model name -> (shard, checkpoint key)
    for i, header in enumerate(checkpoint.headers):
        for key in header:
            name = layout.model_name(key)
            if name is not None:
                located[name] = (i, key)
    tie_of = {n: group for group in layout.ties for n in group}
    changed = set(adapter.factors) | set(adapter.replacements)
    for name in changed:
        if name not in located and not any(m in located for m in tie_of.get(name, [])):
            raise UsageError(
                f"the adapter changes {name}, which the base checkpoint does not have",
                "the adapter was trained on a different base: pass the right --base",
            )
    notes: list[str] = []
    untie = [g for g in layout.ties if changed & set(g)]
    for group in untie:
        hit = sorted(changed & set(group))
        notes.append(
            f"the adapter changes {', '.join(hit)}, which is tied to {', '.join(sorted(set(group) - set(hit)))}: "
            "the export unties them (each written separately, tie_word_embeddings=false) so the merged model "
            "computes what the adapter model did"
        )
    ops: list[Op] = []

    def add(name: str, shard: int, key: str, out_name: str) -> None:
        src_dtype, shape = checkpoint.headers[shard][key]
        factor, replacement = adapter.factors.get(name), adapter.replacements.get(name)
        conv1d = name in layout.conv1d
        quantized = merge_into == "dequantized" and name in layout.quantized
        if replacement is not None:
            if quantized:
                raise UsageError(f"the adapter replaces the quantized weight {name}", "qlora-kit cannot merge that")
            if tuple(replacement.shape) != shape:
                raise UsageError(
                    f"the adapter's {name} has shape {tuple(replacement.shape)}, the base's {shape}",
                    "the adapter was trained on a different base (or resized its vocabulary): pass the right --base",
                )
        if factor is not None and factor.delta_shape(conv1d) != shape:
            raise UsageError(
                f"the LoRA factors for {factor.module} (A {tuple(factor.a.shape)}, B {tuple(factor.b.shape)}) "
                f"do not fit the base weight {key} of shape {shape}",
                "the adapter was trained on a different base: pass the right --base",
            )
        out_dtype_here = out_dtype if src_dtype.is_floating_point else src_dtype
        ops.append(
            Op(PlannedTensor(out_name, out_dtype_here, shape), shard, key, quantized, conv1d, factor, replacement)
        )

    for i, header in enumerate(checkpoint.headers):
        for key in header:
            name = layout.model_name(key)
            add(name or key, i, key, key)
            for group in untie:
                if name in group:
                    for member in group:
                        if member not in located:  # the tied copy the checkpoint leaves out
                            add(member, i, key, member)
    merged = sum(1 for op in ops if op.factor is not None)
    shards: list[list[Op]] = [[]]
    size = 0
    for op in ops:
        if shards[-1] and size + op.out.nbytes > shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append(op)
        size += op.out.nbytes
    total = sum(op.out.nbytes for op in ops)
    if merge_into == "dequantized" and qsource.mode != "none" and not layout.quantized:
        notes.append(
            f"transformers quantizes none of this model's weights with {qsource.mode} (its linears are not "
            "nn.Linear): the adapter was trained on the 16-bit weights, which the export merges into"
        )
    return Plan(
        shards,
        total,
        merged,
        max((op.out.nbytes for op in ops), default=0),
        [m for g in untie for m in g],
        notes,
        qsource,
        merge_into,
    )


# -- writing --------------------------------------------------------------------------------------------


def shard_names(count: int) -> list[str]:
    if count == 1:
        return ["model.safetensors"]
    return [f"model-{i + 1:05d}-of-{count:05d}.safetensors" for i in range(count)]


def produce(op: Op, shard: Shard, plan: Plan) -> Iterator[torch.Tensor]:
    """The output tensor of one op as flat pieces: whole when it is merged or quantized, else streamed
    in chunks (a cast is elementwise), so an unmerged embedding never sits in memory whole."""
    q = plan.quant
    assert q is not None
    src_dtype = shard.dtype(op.source)
    if not src_dtype.is_floating_point:
        yield from shard.chunks(op.source)
        return
    load_dtype = LOAD_DTYPES.get(q.compute_dtype, src_dtype)
    if op.replacement is None and not op.quantized and op.factor is None:
        for piece in shard.chunks(op.source):
            # in dequantized mode, what the training forward held: the load dtype (k-bit prep upcasts exactly)
            yield _checked(op, piece.to(load_dtype) if plan.merge_into == "dequantized" else piece)
        return
    if op.replacement is not None:
        weight = op.replacement
    elif op.quantized:
        weight = trained_weight(shard.get(op.source), q.mode, q.double_quant, load_dtype, op.conv1d)
    elif plan.merge_into == "dequantized":
        weight = shard.get(op.source).to(load_dtype)
    else:
        weight = shard.get(op.source)
    if op.factor is not None:
        merged = weight.float()
        if merged is weight and not op.quantized:  # never add into the adapter's or the file's tensor
            merged = merged.clone()
        weight = merged.add_(lora_delta(op.factor, op.conv1d))
    yield _checked(op, weight).reshape(-1)


def _checked(op: Op, weight: torch.Tensor) -> torch.Tensor:
    """Cast to the output dtype; refuse values a narrower dtype turns into inf (fp32 -> fp16 above 65504).
    Non-finite values the base itself holds pass through. (``aminmax`` is 5x faster than ``isfinite``.)"""
    out = weight.to(op.out.dtype)
    limit = torch.finfo(op.out.dtype).max
    if weight.numel() and torch.finfo(weight.dtype).max > limit:
        lo, hi = torch.aminmax(weight)
        top = max(-float(lo), float(hi))
        if math.isfinite(top) and top > limit and not all_finite(out):
            raise UsageError(
                f"{op.out.name} overflows {op.out.dtype} (values up to {top:.4g})", "export with --dtype bf16 or fp32"
            )
    return out


def all_finite(tensor: torch.Tensor, chunk: int = 1 << 18) -> bool:
    """``isfinite(t).all()`` without full-size temporaries."""
    flat = tensor.reshape(-1)
    return all(bool(torch.isfinite(part).all()) for part in flat.split(chunk))


def write_shards(tmp: Path, plan: Plan, checkpoint: Checkpoint, advance: Callable[[int], None]) -> list[str]:
    """Write the planned shards, reading one checkpoint file at a time, and the index when sharded."""
    names = shard_names(len(plan.shards))
    current: tuple[int, Any] | None = None
    try:
        for name, ops in zip(names, plan.shards, strict=True):
            writer = ShardWriter(tmp / name, [op.out for op in ops])
            for op in ops:
                if current is None or current[0] != op.shard:
                    if current is not None:
                        current[1].close()
                    current = (op.shard, checkpoint.open(op.shard))
                writer.write(op.out.name, produce(op, current[1], plan))
                advance(op.out.nbytes)
            writer.close()
    finally:
        if current is not None:
            current[1].close()
    if len(names) > 1:
        index = {
            "metadata": {"total_size": plan.total_bytes},
            "weight_map": {op.out.name: name for name, ops in zip(names, plan.shards, strict=True) for op in ops},
        }
        (tmp / "model.safetensors.index.json").write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")
        names.append("model.safetensors.index.json")
    return names
