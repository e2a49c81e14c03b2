"""Training on several processes: launch, data slices, DDP / FSDP2 wrapping, rank-0 saving.

qlora-kit builds no distribution of its own. ``torchrun`` (``torch.distributed.run``) starts one
process per GPU; each runs the ordinary training loop with a :class:`Dist` that says which rank it is.
Models that fit one card train data-parallel (PyTorch ``DistributedDataParallel``); models that do not
are sharded with PyTorch's FSDP2 ``fully_shard`` per decoder layer, with the 4-bit weights stored in
the compute dtype (``bnb_4bit_quant_storage``) so they shard like any float tensor, and optionally
offloaded to host memory. FSDP1 (``FullyShardedDataParallel``) refuses a k-bit-prepared model: it
flattens parameters and needs one dtype, while peft's preparation leaves fp32 norms next to 16-bit
weights (docs/stack-notes.md).

Semantics the tests check: a run on N processes with micro-batch m sees exactly the micro-batches a
one-process run with micro-batch N*m sees (rank r takes rows r*m .. (r+1)*m of each), so their losses
agree; one checkpoint format (rank 0 writes, every rank reads); one PEFT adapter, saved once.

``train --gpus N`` relaunches under ``torchrun`` (``--nnodes/--node-rank/--master-*`` pass through to
it for several machines). Any launcher that starts torchrun-style processes (RANK, WORLD_SIZE) works:
torchrun itself, ``accelerate launch`` with a ``MULTI_GPU`` config (which runs torchrun). One that asks
for several processes but starts a single plain one (accelerate's ``MULTI_CPU`` without MPI) is refused
(:func:`refuse_lost_processes`). docs/several-machines.md.
"""

from __future__ import annotations

import atexit
import contextlib
import dataclasses
import os
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from qlora_kit.errors import UsageError
from qlora_kit.recipe import Recipe


@dataclass(frozen=True)
class Dist:
    """This process's place in the run: ``world == 1`` is the ordinary one-process path."""

    rank: int = 0
    world: int = 1
    strategy: str = "ddp"

    @property
    def main(self) -> bool:
        return self.rank == 0

    @property
    def active(self) -> bool:
        return self.world > 1

    @property
    def sharded(self) -> bool:
        return self.active and self.strategy.startswith("fsdp")


def launched_world() -> int:
    """How many processes torchrun started (1 when it did not); refuses a launcher that asked for
    several processes but started this one alone (:func:`refuse_lost_processes`)."""
    if "WORLD_SIZE" in os.environ:
        return int(os.environ["WORLD_SIZE"])
    refuse_lost_processes(os.environ)
    return 1


# the world sizes MPI launchers set (what accelerate reads under mpirun)
MPI_SIZES = ("PMI_SIZE", "OMPI_COMM_WORLD_SIZE", "MV2_COMM_WORLD_SIZE")


def refuse_lost_processes(env: Mapping[str, str]) -> None:
    """A process started without torchrun's ``WORLD_SIZE`` by a launcher that asked for more.

    ``accelerate launch`` with ``distributed_type: MULTI_CPU`` (or ``--cpu --num_processes N``) and no
    MPI starts ONE plain process: it sets ``ACCELERATE_USE_CPU`` as always, and ``MASTER_ADDR`` /
    ``MASTER_PORT`` only because more than one process or machine was asked for. Trained as it is,
    that run would quietly have 1/N of the global batch. Under mpirun the MPI world size says it.
    """
    mpi = max((int(v) for k in MPI_SIZES if (v := env.get(k, "")).isdigit()), default=1)
    if mpi > 1:
        raise UsageError(
            f"started by an MPI launcher as one of {mpi} processes, but qlora-kit joins only torchrun-style "
            "runs (RANK, WORLD_SIZE); these processes would each train alone",
            "launch with torchrun, or accelerate launch with a distributed_type: MULTI_GPU config "
            "(docs/several-machines.md)",
        )
    if "ACCELERATE_USE_CPU" in env and ("MASTER_ADDR" in env or "MASTER_PORT" in env):
        raise UsageError(
            "accelerate launch asked for several processes but started only this one, without RANK or "
            "WORLD_SIZE (its MULTI_CPU type needs MPI): it would train alone on part of the global batch",
            "use an accelerate config with distributed_type: MULTI_GPU (gloo on a CPU) or torchrun "
            "--nproc-per-node N -m qlora_kit train ...; for one process run qlora-kit train itself",
        )


def setup(strategy: str, device_kind: str) -> Dist:
    """Join the process group torchrun prepared (gloo on CPU, nccl on CUDA); one process: nothing."""
    import torch.distributed as dist

    world = launched_world()
    refuse_unread_settings(os.environ, strategy)
    if world == 1:
        return Dist(strategy=strategy)
    if not dist.is_initialized():
        if device_kind == "cuda":
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        dist.init_process_group("nccl" if device_kind == "cuda" else "gloo")
        atexit.register(lambda: dist.is_initialized() and dist.destroy_process_group())
    return Dist(dist.get_rank(), dist.get_world_size(), strategy)


def as_launched(recipe: Recipe, d: Dist) -> Recipe:
    """The recipe with ``train.gpus`` set to the processes actually running (torchrun run by hand)."""
    if not d.active or recipe.train.gpus == d.world:
        return recipe
    return dataclasses.replace(recipe, train=dataclasses.replace(recipe.train, gpus=d.world))


def device_map(d: Dist, device_kind: str) -> Any:
    """Where ``load_base`` puts the model: this rank's GPU, or the CPU."""
    if device_kind != "cuda":
        return None
    return {"": int(os.environ.get("LOCAL_RANK", "0")) if d.active else 0}


def quant_storage(d: Dist, compute_dtype: str) -> str | None:
    """FSDP shards 4-bit weights stored in a float dtype (the compute dtype, as peft's FSDP guide does)."""
    return compute_dtype if d.sharded else None


def global_micro_batch(micro_batch: int, d: Dist) -> int:
    """The batch all ranks draw one micro-batch each from: the one-process run's micro-batch."""
    return micro_batch * d.world


def rank_slice(batch: dict[str, torch.Tensor], d: Dist) -> tuple[dict[str, torch.Tensor], float]:
    """This rank's rows of a global micro-batch, and the weight of its loss.

    The last batch of an epoch may have fewer rows than ranks x micro-batch; a rank left with no rows
    computes on the batch's first row with weight 0, so every rank still joins the gradient all-reduce.
    """
    if not d.active:
        return batch, 1.0
    rows = next(iter(batch.values())).shape[0]
    per = -(-rows // d.world)
    lo, hi = d.rank * per, min((d.rank + 1) * per, rows)
    if lo >= hi:
        return {k: v[:1] for k, v in batch.items()}, 0.0
    return {k: v[lo:hi] for k, v in batch.items()}, 1.0


def mean(value: float, d: Dist) -> float:
    """The mean of a per-rank number over all ranks (the loss rank 0 logs)."""
    if not d.active:
        return value
    import torch.distributed as dist

    t = torch.tensor([value], dtype=torch.float64)
    dist.all_reduce(t)
    return float(t) / d.world


def barrier(d: Dist) -> None:
    if d.active:
        import torch.distributed as dist

        dist.barrier()


def decoder_layers(model: Any) -> list[torch.nn.Module]:
    """The repeated blocks FSDP shards one at a time (whatever transformers calls them)."""
    inner = unwrap(model)
    names: set[str] = set()
    for module in inner.modules():
        names |= set(getattr(module, "_no_split_modules", None) or ())
    return [m for m in inner.modules() if type(m).__name__ in names]


def wrap(model: Any, d: Dist, device_kind: str) -> Any:
    """DDP for ``ddp``; FSDP2 per decoder layer and at the root for ``fsdp`` / ``fsdp-offload``."""
    if not d.active:
        return model
    _same_start(model)
    if d.strategy == "ddp":
        from torch.nn.parallel import DistributedDataParallel

        ids = [torch.cuda.current_device()] if device_kind == "cuda" else None
        return DistributedDataParallel(model, device_ids=ids)
    from torch.distributed.fsdp import CPUOffloadPolicy, OffloadPolicy, fully_shard

    # on a CPU the parameters already live in host memory: offloading is a no-op there
    offload = CPUOffloadPolicy() if d.strategy == "fsdp-offload" and device_kind == "cuda" else OffloadPolicy()
    layers = decoder_layers(model)
    if not layers:
        raise UsageError("FSDP found no decoder layers to shard in this model", "use --set train.strategy=ddp")
    for layer in layers:
        fully_shard(layer, offload_policy=offload)
    fully_shard(model, offload_policy=offload)
    return model


def _same_start(model: Any) -> None:
    """Every rank starts from rank 0's LoRA initialization and random state.

    Ranks can reach this point with different random states (only rank 0 builds a random-init base),
    and FSDP, unlike DDP, does not broadcast parameters: without this each rank would initialize its
    shard of lora_A differently. The same random state on every rank is also what a resume restores.
    """
    import torch.distributed as dist

    from qlora_kit.train import checkpoint

    with torch.no_grad():
        for param in model.parameters():
            if param.requires_grad:
                dist.broadcast(param.data, src=0)
    state = [checkpoint.rng_state()]
    dist.broadcast_object_list(state, src=0)
    checkpoint.set_rng_state(state[0])


def unwrap(model: Any) -> Any:
    """The PeftModel inside a DDP wrapper (FSDP2 shards in place: nothing to unwrap)."""
    return getattr(model, "module", model) if type(model).__name__ == "DistributedDataParallel" else model


def no_sync(model: Any, d: Dist, last: bool) -> contextlib.AbstractContextManager[Any]:
    """Skip DDP's gradient all-reduce on all but the last micro-batch of an accumulation step."""
    if d.active and d.strategy == "ddp" and not last:
        return model.no_sync()  # type: ignore[no-any-return]
    if d.sharded and hasattr(model, "set_requires_gradient_sync"):
        model.set_requires_gradient_sync(last)
    return contextlib.nullcontext()


def clip_grad_norm(model: Any, params: list[torch.nn.Parameter], max_norm: float, d: Dist) -> None:
    """Clip by the global norm: DDP's gradients are already averaged; FSDP's are DTensor shards."""
    if d.sharded:
        norm = torch.nn.utils.get_total_norm([p.grad for p in params if p.grad is not None])
        if hasattr(norm, "full_tensor"):
            norm = norm.full_tensor()
        torch.nn.utils.clip_grads_with_norm_(params, max_norm, norm)
    else:
        torch.nn.utils.clip_grad_norm_(params, max_norm)


# -- checkpoints and the final adapter --------------------------------------------------------------


def adapter_state(model: Any, d: Dist) -> dict[str, Any] | None:
    """The trainable (LoRA) weights as full tensors; a collective under FSDP, ``None`` otherwise
    (peft then reads the model's own state dict)."""
    if not d.sharded:
        return None
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    options = StateDictOptions(full_state_dict=True, cpu_offload=True, ignore_frozen_params=True)
    return get_model_state_dict(model, options=options)


def optimizer_state(model: Any, optimizer: Any, d: Dist) -> dict[str, Any] | None:
    """FSDP: the full optimizer state keyed by parameter name (a collective); else ``None``."""
    if not d.sharded:
        return None
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

    return get_optimizer_state_dict(model, optimizer, options=StateDictOptions(full_state_dict=True, cpu_offload=True))


def load_sharded(path: Path, model: Any, optimizer: Any, scheduler: Any) -> dict[str, Any]:
    """Resume an FSDP run: full adapter and optimizer state from ``path`` into this rank's shards."""
    from torch.distributed.checkpoint.state_dict import (
        StateDictOptions,
        set_model_state_dict,
        set_optimizer_state_dict,
    )

    from qlora_kit.train import checkpoint

    state = checkpoint.read_state(path)
    optim, sched = checkpoint.read_torch(path, "optimizer.pt"), checkpoint.read_torch(path, "scheduler.pt")
    rng = checkpoint.read_rng(path)
    if not isinstance(optim, dict) or not all(isinstance(k, str) for k in optim.get("state", {})):
        raise UsageError(
            f"{path} was written by a one-GPU or DDP run; an FSDP run resumes only its own checkpoints",
            "resume with the strategy that wrote it (--set train.strategy=ddp)",
        )
    saved = checkpoint.read_adapter(path)
    adapter = unwrap(model).active_adapter
    # peft saves names without the adapter's name: lora_A.default.weight -> lora_A.weight
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    weights: dict[str, Any] = {n: saved[n.replace(f".{adapter}.", ".")] for n in names}
    options = StateDictOptions(full_state_dict=True, strict=False)
    set_model_state_dict(model, weights, options=options)
    set_optimizer_state_dict(model, optimizer, optim, options=StateDictOptions(full_state_dict=True))
    scheduler.load_state_dict(sched)
    checkpoint.restore_rng(path, rng)
    return state


def refuse_unread_settings(env: Mapping[str, str], strategy: str) -> None:
    """An ``accelerate launch`` config asking for FSDP or DeepSpeed: qlora-kit reads neither (the recipe's
    ``train.strategy`` decides), so a run that silently did something else is refused."""
    if env.get("ACCELERATE_USE_DEEPSPEED") == "true":
        raise UsageError(
            "the accelerate config asks for DeepSpeed, which qlora-kit does not use",
            "use distributed_type: MULTI_GPU and the recipe's train.strategy (ddp, fsdp, fsdp-offload)",
        )
    if env.get("ACCELERATE_USE_FSDP") == "true" and not strategy.startswith("fsdp"):
        raise UsageError(
            f"the accelerate config asks for FSDP but the recipe trains with train.strategy={strategy} "
            "(qlora-kit reads no fsdp_config)",
            "pass --strategy fsdp (or fsdp-offload), or use distributed_type: MULTI_GPU",
        )


# -- launching --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Nodes:
    """This machine's place among several (torchrun's ``--nnodes/--node-rank/--master-addr/--master-port``)."""

    count: int = 1
    rank: int = 0
    addr: str | None = None
    port: int | None = None

    @property
    def given(self) -> bool:
        return self != Nodes()

    def check(self, gpus: int) -> None:
        """One line on values torchrun would reject late, or that would be silently ignored."""
        n, k = self.count, self.rank
        if n < 1:
            raise UsageError(f"--nnodes {n}: a run needs at least one machine", "use --nnodes 1 or more")
        if not 0 <= k < n:
            raise UsageError(f"--node-rank {k} with --nnodes {n}: node ranks run 0..{n - 1}", _ONE_EACH)
        if self.port is not None and not 1 <= self.port <= 65535:
            raise UsageError(f"--master-port {self.port}: not a TCP port", "use a free port from 1 to 65535")
        if self.addr is not None and (not self.addr or any(c.isspace() for c in self.addr)):
            raise UsageError(f"--master-addr {self.addr!r}: not a host name or address", _MASTER)
        if n > 1 and self.addr is None:
            raise UsageError(f"--nnodes {n} needs --master-addr", _MASTER)
        if n == 1 and gpus == 1 and (self.addr is not None or self.port is not None):
            raise UsageError("--master-addr/--master-port: a one-process run starts no launcher", _SEVERAL)

    def torchrun_args(self) -> list[str]:
        if self.count == 1 and self.addr is None and self.port is None:
            return ["--standalone"]  # one machine: torchrun picks a free port itself
        addr, port = self.addr or "127.0.0.1", self.port or 29500
        return [f"--nnodes={self.count}", f"--node-rank={self.rank}", f"--master-addr={addr}", f"--master-port={port}"]


_ONE_EACH = "give each machine its own --node-rank, 0 on the one --master-addr names"
_SEVERAL = "add --gpus N or --nnodes N, or leave them out"
_MASTER = "pass --master-addr HOST of the --node-rank 0 machine, the same on every machine"


def needs_launch(gpus: int, nodes: Nodes) -> bool:
    """Whether ``train`` relaunches itself under torchrun: several processes asked for, none started yet."""
    world = launched_world()
    if world > 1 and nodes.given:
        raise UsageError(
            f"--nnodes/--node-rank/--master-*: this is already one of {world} processes a launcher started",
            "give them to that launcher (torchrun --nnodes ...), not to qlora-kit train",
        )
    nodes.check(gpus)
    return world == 1 and (gpus > 1 or nodes.count > 1)


def launch_command(gpus: int, argv: Sequence[str], nodes: Nodes = Nodes()) -> list[str]:
    """The torchrun command that runs ``qlora-kit <argv>`` on ``gpus`` processes of this machine."""
    return [
        sys.executable,
        "-m",
        "torch.distributed.run",
        *nodes.torchrun_args(),
        f"--nproc_per_node={gpus}",
        "-m",
        "qlora_kit",
        *argv,
    ]


def relaunch(gpus: int, argv: Sequence[str], nodes: Nodes = Nodes()) -> int:
    """Run ``qlora-kit <argv>`` under torchrun on ``gpus`` processes of this machine (of
    ``nodes.count`` machines in all); their exit status."""
    import subprocess

    if gpus > 1 and torch.cuda.is_available() and torch.cuda.device_count() < gpus:
        raise UsageError(
            f"--gpus {gpus}: this machine has {torch.cuda.device_count()} CUDA GPU(s)",
            f"use --gpus {torch.cuda.device_count()} or fewer",
        )
    return subprocess.call(launch_command(gpus, argv, nodes))
