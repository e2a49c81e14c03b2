"""Training on two processes for real: torchrun, gloo on the CPU, the tiny demo with NF4 QLoRA.

One torchrun launch runs every distributed case (``python tests/test_distributed.py CASE OUT``), so
the imports are paid once: DDP from scratch with a checkpoint, DDP resumed from that checkpoint, and
FSDP2 (which runs on the CPU with gloo in torch 2.13: measured, docs/stack-notes.md). The
one-process references run in this process. Same global batch: one process with micro-batch 4,
two with micro-batch 2 each.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
DEMO = ROOT / "recipes" / "tiny" / "cpu_demo.yaml"
STEPS = 4


def recipe(out: Path, micro_batch: int, **extra: object):
    from qlora_kit.recipe import load_recipe

    return load_recipe(DEMO, sets(out.parent / "base", out, micro_batch, **extra))  # ``base`` below


def sets(base: Path, out: Path, micro_batch: int, **extra: object) -> list[str]:
    """The ``--set`` overrides of the demo recipe every distributed test trains: one random-init base for
    every run, checkpoints every 2 steps unless ``extra`` says otherwise."""
    overrides = {
        "model.name": str(base),
        "model.random_init": False,
        "train.output_dir": str(out),
        "train.max_steps": STEPS,
        "train.micro_batch": micro_batch,
        "train.grad_accum": 2,
        "train.save_steps": 2,
        "train.logging_steps": 1,
        "train.eval_steps": 0,
        "train.warmup_steps": 0,
        "train.lr": 0.01,
        "data.max_seq_len": 32,
        "data.eval_fraction": 0.0,
        "lora.dropout": 0.0,  # dropout masks depend on how rows are split across ranks
        **extra,
    }
    return [f"{k}={v}" for k, v in overrides.items()]


def losses(out: Path) -> list[float]:
    return [json.loads(line)["loss"] for line in (out / "metrics.jsonl").read_text().splitlines()]


def adapter(out: Path):
    from safetensors.torch import load_file

    return load_file(str(out / "adapter_model.safetensors"))


def worker(root: Path) -> None:
    """Run under torchrun: the distributed cases, each writing under ``root``."""
    import torch.distributed as dist

    from qlora_kit.train.loop import SilentReporter, train

    def resume(source: str, target: str, **extra: object) -> None:
        """A fresh output dir holding only ``source``'s step-2 checkpoint; every rank reads it."""
        if int(os.environ["RANK"]) == 0:
            ckpt = Path("checkpoints") / "step-000002"
            shutil.copytree(root / source / ckpt, root / target / ckpt)
            lines = (root / source / "metrics.jsonl").read_text().splitlines()[:2]
            (root / target / "metrics.jsonl").write_text("".join(line + "\n" for line in lines))
        dist.barrier()
        train(recipe(root / target, 2, **extra), SilentReporter(), resume=True)

    train(recipe(root / "ddp", 2), SilentReporter())
    resume("ddp", "resumed")
    fsdp = {"train.strategy": "fsdp"}
    sharded = train(recipe(root / "fsdp", 2, **fsdp), SilentReporter()).model
    # what this rank really holds of the parameters, for the planner's sharding model
    local = sum(p.to_local().nbytes if hasattr(p, "to_local") else p.nbytes for p in sharded.parameters())
    (root / f"fsdp-rank{os.environ['RANK']}.json").write_text(json.dumps({"param_bytes": local}))
    resume("fsdp", "fsdp-resumed", **fsdp)


def base(root: Path) -> None:
    """The demo's random-init base, written once: each run would otherwise build and save its own."""
    from qlora_kit.model.load import materialize_random_init, resolve_model_spec
    from qlora_kit.recipe import load_recipe

    demo = load_recipe(DEMO)
    materialize_random_init(resolve_model_spec(demo.model), root / "base", demo.train.seed)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("dist")
    base(root)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TORCH_COMPILE_DISABLE": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", __file__, str(root)]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-4000:]
    from qlora_kit.train.loop import SilentReporter, train

    train(recipe(root / "single", 4), SilentReporter())
    return root


def test_ddp_on_two_processes_matches_one_process_with_the_same_global_batch(runs):
    import torch

    one, two = losses(runs / "single"), losses(runs / "ddp")
    assert len(one) == len(two) == STEPS
    assert one[-1] < one[0]  # it trained
    assert two == pytest.approx(one, rel=1e-4, abs=1e-5), (one, two)
    a, b = adapter(runs / "single"), adapter(runs / "ddp")
    assert a.keys() == b.keys() and a
    for name in a:
        # Adam's normalized steps turn float-order noise in near-zero gradients into ~1e-4 differences
        torch.testing.assert_close(b[name], a[name], rtol=0, atol=5e-4, msg=name)


def test_one_adapter_written_once_in_peft_format(runs):
    out = runs / "ddp"
    for name in ("adapter_config.json", "adapter_model.safetensors", "qlora_kit.json"):
        assert (out / name).is_file(), name
    assert not list(out.glob(".tmp*"))  # rank 1 wrote nothing half-way
    assert len((out / "metrics.jsonl").read_text().splitlines()) == STEPS  # logged by rank 0 only
    assert json.loads((out / "qlora_kit.json").read_text())["summary"]["steps"] == STEPS


@pytest.mark.parametrize("run", ["ddp", "fsdp"])
def test_resuming_a_distributed_checkpoint_continues_the_same_run(runs, run):
    import torch

    full, resumed = losses(runs / run), losses(runs / ("resumed" if run == "ddp" else "fsdp-resumed"))
    assert resumed == pytest.approx(full, rel=1e-5, abs=1e-6)
    a, b = adapter(runs / run), adapter(runs / ("resumed" if run == "ddp" else "fsdp-resumed"))
    for name in a:
        torch.testing.assert_close(b[name], a[name], rtol=1e-4, atol=1e-6, msg=name)


def test_fsdp_on_two_processes_matches_one_process(runs):
    """FSDP2 shards the 4-bit weights (stored as the compute dtype) and the LoRA weights; the run
    must still compute what one process computes, and save one full adapter."""
    import torch

    one, sharded = losses(runs / "single"), losses(runs / "fsdp")
    assert sharded == pytest.approx(one, rel=1e-4, abs=1e-5), (one, sharded)
    a, b = adapter(runs / "single"), adapter(runs / "fsdp")
    assert a.keys() == b.keys()
    for name in a:
        assert b[name].shape == a[name].shape  # gathered, not a shard
        # Adam's normalized steps turn float-order noise in near-zero gradients into ~1e-4 differences
        torch.testing.assert_close(b[name], a[name], rtol=0, atol=5e-4, msg=name)
    ckpt = runs / "fsdp" / "checkpoints" / "step-000002" / "optimizer.pt"
    assert all(isinstance(k, str) for k in torch.load(ckpt, weights_only=False)["state"])  # full, by name


def test_rank_slices_cover_the_global_batch_once():
    import torch

    from qlora_kit.train.distributed import Dist, rank_slice

    batch = {"input_ids": torch.arange(10).view(5, 2)}
    parts = [rank_slice(batch, Dist(r, 2)) for r in range(2)]
    assert torch.equal(torch.cat([p["input_ids"] for p, _ in parts]), batch["input_ids"])
    assert [w for _, w in parts] == [1.0, 1.0]
    small = {"input_ids": torch.arange(2).view(1, 2)}
    (_, w0), (rows1, w1) = rank_slice(small, Dist(0, 2)), rank_slice(small, Dist(1, 2))
    assert (w0, w1) == (1.0, 0.0) and rows1["input_ids"].shape[0] == 1  # an empty rank still joins, weight 0


if __name__ == "__main__":
    worker(Path(sys.argv[1]))


def test_the_planner_predicts_what_each_fsdp_rank_holds(runs):
    """The real FSDP2 run's local parameter bytes on each rank against ``multigpu.per_gpu``'s sharded
    parameter terms for the same architecture and knobs."""
    from qlora_kit.catalog.models import resolve_model
    from qlora_kit.knobs import TrainSetup
    from qlora_kit.plan.multigpu import per_gpu

    arch = resolve_model(str(runs / "base"))
    setup = TrainSetup(quant="nf4", double_quant=True, dtype="fp32", rank=16, targets=arch.linear_names(), seq_len=32)
    one, two = per_gpu(arch, setup, 1), per_gpu(arch, setup, 2, "fsdp")
    terms = ("linear_weights", "other_params", "lora_params")
    predicted = sum(two.breakdown[k] for k in terms)
    assert predicted == pytest.approx(sum(one.breakdown[k] for k in terms) / 2, abs=len(terms))
    for rank in (0, 1):
        held = json.loads((runs / f"fsdp-rank{rank}.json").read_text())["param_bytes"]
        assert held == pytest.approx(predicted, rel=0.02), (rank, held, predicted)


def test_export_takes_the_adapter_of_a_sharded_run_unchanged(runs, tmp_path):
    """The FSDP run's adapter merges and verifies against its base like a one-GPU adapter."""
    from qlora_kit.export.run import export

    summary = export(runs / "fsdp", tmp_path / "merged")
    v = summary["verification"]
    assert v["passed"] and v["max_abs_diff"] <= v["tolerance"], v
    assert summary["merged_tensors"] == len(adapter(runs / "fsdp")) // 2  # one merge per lora_A/lora_B pair


def test_a_one_gpu_run_refuses_an_fsdp_checkpoint_in_one_line(tmp_path):
    import torch

    from qlora_kit.errors import UsageError
    from qlora_kit.train import checkpoint

    path = tmp_path / "checkpoint-000002"
    path.mkdir()
    # FSDP's optimizer state is keyed by parameter name, a plain optimizer's by index
    torch.save({"state": {"base_model.model.lora_A.weight": {}}, "param_groups": []}, path / "optimizer.pt")
    with pytest.raises(UsageError, match="written by an FSDP run"):
        checkpoint.load(path, model=None, optimizer=None, scheduler=None)
