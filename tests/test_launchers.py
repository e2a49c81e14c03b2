"""The launchers people already use, for real on the CPU (gloo), and the flags that reach torchrun.

Every distributed run here trains the tiny demo with NF4 QLoRA for a few steps on two processes with
micro-batch 2 each, and must log the losses one process logs with micro-batch 4 (the same global
batch): two torchrun invocations as two "machines" on 127.0.0.1, ``qlora-kit train --nnodes 2`` the
same way, and ``accelerate launch`` with a 2-process ``MULTI_GPU`` config. accelerate's
``MULTI_CPU`` type without MPI starts one plain process: qlora-kit must refuse it.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
from test_distributed import sets as distributed_sets

from qlora_kit.errors import UsageError
from qlora_kit.train.distributed import (
    Nodes,
    launch_command,
    needs_launch,
    refuse_lost_processes,
    refuse_unread_settings,
)

ROOT = Path(__file__).resolve().parent.parent
DEMO = str(ROOT / "recipes" / "tiny" / "cpu_demo.yaml")
STEPS = 4
TIMEOUT = 300
LAUNCH_VARS = ("WORLD_SIZE", "RANK", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT", "PMI_SIZE", "OMPI_COMM_WORLD_SIZE")


def sets(base: Path, out: Path, micro_batch: int) -> list[str]:
    return distributed_sets(base, out, micro_batch, **{"train.save_steps": 0})


def train_args(base: Path, out: Path, micro_batch: int) -> list[str]:
    return ["train", DEMO, *[x for s in sets(base, out, micro_batch) for x in ("--set", s)]]


def losses(out: Path) -> list[float]:
    return [json.loads(line)["loss"] for line in (out / "metrics.jsonl").read_text().splitlines()]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def clean_env() -> dict[str, str]:
    """This environment without any launcher's variables, the worktree's package first."""
    env = {k: v for k, v in os.environ.items() if k not in LAUNCH_VARS and not k.startswith("ACCELERATE_")}
    return {**env, "OMP_NUM_THREADS": "1", "TORCH_COMPILE_DISABLE": "1", "PYTHONPATH": str(ROOT)}


def run_all(*cmds: list[str], env: dict[str, str] | None = None) -> list[subprocess.CompletedProcess[str]]:
    """Start every command at once (one per "machine"), wait for all."""
    procs = [
        subprocess.Popen(c, cwd=ROOT, env=env or clean_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        for c in cmds
    ]
    done = []
    try:
        for cmd, p in zip(cmds, procs, strict=True):
            out, err = p.communicate(timeout=TIMEOUT)
            done.append(subprocess.CompletedProcess(cmd, p.returncode, out, err))
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    return done


@pytest.fixture(scope="module")
def base(tmp_path_factory) -> Path:
    from qlora_kit.model.load import materialize_random_init, resolve_model_spec
    from qlora_kit.recipe import load_recipe

    demo = load_recipe(DEMO)
    root = tmp_path_factory.mktemp("launch")
    materialize_random_init(resolve_model_spec(demo.model), root / "base", demo.train.seed)
    return root / "base"


@pytest.fixture(scope="module")
def one_process(base) -> list[float]:
    """The reference: one process, micro-batch 4."""
    from qlora_kit.recipe import load_recipe
    from qlora_kit.train.loop import SilentReporter, train

    out = base.parent / "one"
    train(load_recipe(DEMO, sets(base, out, 4)), SilentReporter())
    result = losses(out)
    assert len(result) == STEPS and result[-1] < result[0]  # it trained
    return result


def assert_same_run(out: Path, reference: list[float], procs: list[subprocess.CompletedProcess[str]]) -> None:
    for p in procs:
        assert p.returncode == 0, p.stderr[-4000:]
    assert losses(out) == pytest.approx(reference, rel=1e-4, abs=1e-5), (reference, losses(out))
    assert not list(out.glob(".tmp*"))  # one writer, nothing half-written
    assert json.loads((out / "qlora_kit.json").read_text())["summary"]["steps"] == STEPS


def test_torchrun_on_two_machines_matches_one_process(base, one_process):
    out, port = base.parent / "torchrun", free_port()
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--nnodes=2", "--nproc-per-node=1"]
    at = ["--master-addr=127.0.0.1", f"--master-port={port}"]
    cmds = [[*torchrun, f"--node-rank={k}", *at, "-m", "qlora_kit", *train_args(base, out, 2)] for k in (0, 1)]
    assert_same_run(out, one_process, run_all(*cmds))


def test_train_nnodes_flags_start_the_same_run_on_each_machine(base, one_process):
    out, port = base.parent / "flags", free_port()
    qlora = [sys.executable, "-m", "qlora_kit", *train_args(base, out, 2)]
    at = ["--nnodes", "2", "--master-addr", "127.0.0.1", "--master-port", str(port)]
    assert_same_run(out, one_process, run_all(*[[*qlora, *at, "--node-rank", str(k)] for k in (0, 1)]))


def accelerate_config(path: Path, kind: str, port: int) -> Path:
    path.write_text(
        "compute_environment: LOCAL_MACHINE\n"
        f"distributed_type: {kind}\n"
        "num_processes: 2\nnum_machines: 1\nmachine_rank: 0\n"
        "mixed_precision: 'no'\n"
        f"main_process_port: {port}\n" + ("use_cpu: true\n" if kind == "MULTI_CPU" else "gpu_ids: all\n")
    )
    return path


def accelerate_launch(config: Path, args: list[str], *flags: str) -> list[str]:
    launch = [sys.executable, "-m", "accelerate.commands.launch", *flags, "--config_file", str(config)]
    return [*launch, "-m", "qlora_kit", *args]


def test_accelerate_launch_with_a_multi_gpu_config_matches_one_process(base, one_process):
    """MULTI_GPU runs torchrun; on a machine without CUDA its two processes train on the CPU with gloo."""
    out = base.parent / "accelerate"
    config = accelerate_config(base.parent / "multi_gpu.yaml", "MULTI_GPU", free_port())
    assert_same_run(out, one_process, run_all(accelerate_launch(config, train_args(base, out, 2))))


def test_accelerate_multi_cpu_without_mpi_is_refused_in_one_line(base):
    out = base.parent / "multi-cpu"
    config = accelerate_config(base.parent / "multi_cpu.yaml", "MULTI_CPU", free_port())
    # --quiet: without it accelerate adds its own traceback of the failed child (repeating its stderr)
    (proc,) = run_all(accelerate_launch(config, train_args(base, out, 2), "--quiet"))
    assert proc.returncode != 0, proc.stderr
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "MULTI_CPU" in errors[0] and "MULTI_GPU" in errors[0], proc.stderr
    assert "Traceback" not in proc.stderr
    assert not out.exists()  # refused before anything was written


# what `accelerate launch` (1.16) leaves a process it starts from a 2-process MULTI_CPU config, no MPI
MULTI_CPU_ENV = {
    "ACCELERATE_DYNAMO_BACKEND": "NO",
    "ACCELERATE_DYNAMO_MODE": "default",
    "ACCELERATE_DYNAMO_USE_FULLGRAPH": "False",
    "ACCELERATE_DYNAMO_USE_REGIONAL_COMPILATION": "False",
    "ACCELERATE_MIXED_PRECISION": "no",
    "ACCELERATE_USE_CPU": "True",
    "KMP_AFFINITY": "granularity=fine,compact,1,0",
    "KMP_BLOCKTIME": "1",
    "MASTER_ADDR": "127.0.0.1",
    "MASTER_PORT": "29500",
    "OMP_NUM_THREADS": "1",
}


def test_the_silent_single_process_is_told_from_a_real_one():
    with pytest.raises(UsageError, match="started only this one"):
        refuse_lost_processes(MULTI_CPU_ENV)
    one = {k: v for k, v in MULTI_CPU_ENV.items() if not k.startswith("MASTER_")}  # num_processes: 1
    refuse_lost_processes(one)
    refuse_lost_processes({})  # qlora-kit train, no launcher
    with pytest.raises(UsageError, match="one of 4 processes"):
        refuse_lost_processes({**MULTI_CPU_ENV, "OMPI_COMM_WORLD_SIZE": "4"})  # under mpirun


def test_accelerate_settings_qlora_kit_does_not_read_are_refused():
    with pytest.raises(UsageError, match="DeepSpeed"):
        refuse_unread_settings({"ACCELERATE_USE_DEEPSPEED": "true"}, "ddp")
    with pytest.raises(UsageError, match="--strategy fsdp"):
        refuse_unread_settings({"ACCELERATE_USE_FSDP": "true"}, "ddp")
    refuse_unread_settings({"ACCELERATE_USE_FSDP": "true"}, "fsdp-offload")  # what the recipe does anyway
    refuse_unread_settings(MULTI_CPU_ENV, "ddp")


def test_launched_world_refuses_the_multi_cpu_environment(monkeypatch):
    from qlora_kit.train.distributed import launched_world

    for name in LAUNCH_VARS:
        monkeypatch.delenv(name, raising=False)
    for name, value in MULTI_CPU_ENV.items():
        monkeypatch.setenv(name, value)
    with pytest.raises(UsageError, match="MULTI_CPU"):
        launched_world()
    monkeypatch.setenv("WORLD_SIZE", "2")  # torchrun-style: a real member of a 2-process run
    assert launched_world() == 2


def test_the_flags_become_torchrun_arguments():
    head = [sys.executable, "-m", "torch.distributed.run"]
    assert launch_command(2, ["train", "r.yaml"]) == [
        *head,
        "--standalone",
        "--nproc_per_node=2",
        *["-m", "qlora_kit", "train", "r.yaml"],
    ]
    nodes = Nodes(count=2, rank=1, addr="10.0.0.5", port=29400)
    assert launch_command(4, ["train", "r.yaml"], nodes)[3:8] == [
        "--nnodes=2",
        "--node-rank=1",
        "--master-addr=10.0.0.5",
        "--master-port=29400",
        "--nproc_per_node=4",
    ]


@pytest.mark.parametrize(
    ("nodes", "gpus", "problem"),
    [
        (Nodes(count=2, rank=2, addr="h"), 1, "node ranks run 0..1"),
        (Nodes(count=2, rank=-1, addr="h"), 1, "node ranks run 0..1"),
        (Nodes(count=0), 1, "at least one machine"),
        (Nodes(count=2, addr="h", port=70000), 1, "not a TCP port"),
        (Nodes(count=2, addr="h", port=0), 1, "not a TCP port"),
        (Nodes(count=2), 1, "needs --master-addr"),
        (Nodes(count=2, addr="a b"), 1, "not a host name"),
        (Nodes(port=29500), 1, "a one-process run starts no launcher"),
    ],
)
def test_bad_launch_flags_are_refused(monkeypatch, nodes, gpus, problem):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    with pytest.raises(UsageError, match=problem):
        needs_launch(gpus, nodes)


def test_whether_train_relaunches(monkeypatch):
    for name in LAUNCH_VARS:
        monkeypatch.delenv(name, raising=False)
    assert not needs_launch(1, Nodes())
    assert needs_launch(2, Nodes())
    assert needs_launch(1, Nodes(count=2, addr="h"))  # one GPU on each of two machines
    assert needs_launch(2, Nodes(port=29500))  # this machine's GPUs, a chosen port instead of --standalone
    monkeypatch.setenv("WORLD_SIZE", "2")  # already launched: each process trains
    assert not needs_launch(2, Nodes())
    with pytest.raises(UsageError, match="give them to that launcher"):
        needs_launch(1, Nodes(count=2, addr="h"))


def test_train_refuses_a_bad_node_rank_in_one_line(tmp_path):
    flags = ["--nnodes", "2", "--node-rank", "2", "--master-addr", "127.0.0.1"]
    proc = subprocess.run(
        [sys.executable, "-m", "qlora_kit", "train", DEMO, "--set", f"train.output_dir={tmp_path / 'run'}", *flags],
        cwd=ROOT,
        env=clean_env(),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 2
    assert proc.stderr.count("\n") == 1 and "--node-rank 2 with --nnodes 2" in proc.stderr, proc.stderr
    assert not (tmp_path / "run").exists()
