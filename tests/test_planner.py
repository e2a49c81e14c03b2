"""The knob search: preference order, fixed knobs, bad input, and advice when nothing fits."""

from __future__ import annotations

import pytest

from qlora_kit.catalog.gpus import GIB, resolve_gpu
from qlora_kit.catalog.models import lookup
from qlora_kit.errors import UsageError
from qlora_kit.knobs import ALL_LINEAR, TrainSetup
from qlora_kit.plan.memory import estimate
from qlora_kit.plan.search import Constraints, candidates, plan, plan_json, saver_steps


def _key(c):
    """The documented preference as a sortable key (smaller is better)."""
    s = c.setup
    quant = {"none": 0, "nf4": 1}.get(s.quant, 2)
    targets = 0 if c.targets_label == ALL_LINEAR else 1
    opt = ["adamw", "paged_adamw", "paged_adamw8bit"].index(s.optimizer)
    return (quant, s.grad_ckpt, targets, -s.batch_size, opt)


@pytest.mark.parametrize(
    ("model", "gpu"),
    [
        ("opt-6.7b", "24GB"),
        ("llama-2-7b", "16GB"),
        ("Llama-3.1-8B", "T4"),
        ("Mistral-7B-v0.1", "80GB"),
        ("Qwen2.5-0.5B", "8GB"),
    ],
)
def test_choice_is_the_most_preferred_fitting_candidate(model, gpu):
    arch, device = lookup(model), resolve_gpu(gpu)
    cands = candidates(arch, Constraints(), device)
    assert [_key(c) for c in cands] == sorted(_key(c) for c in cands), "candidates not in preference order"
    p = plan(arch, device, Constraints())
    fitting = [c for c in cands if c.estimate.device_bytes <= device.fit_limit]
    if fitting:
        assert p.fits and p.best.choice() == min(fitting, key=_key).choice()
        assert p.best.estimate.device_bytes <= device.fit_limit
        assert p.reasons
    else:
        assert not p.fits and p.advice


def test_sixteen_bit_base_is_preferred_when_it_fits_and_quantized_when_not():
    arch = lookup("opt-1.3b")
    assert plan(arch, resolve_gpu("80GB"), Constraints()).best.setup.quant == "none"
    small = plan(lookup("llama-2-13b"), resolve_gpu("16GB"), Constraints(seq_len=512))
    assert small.fits and small.best.setup.quant == "nf4" and small.best.setup.double_quant
    assert "16-bit base needs at least" in small.reasons[0]


@pytest.mark.parametrize(
    ("gpu", "constraints", "said"),
    [
        # 8 GB needs the offloaded-checkpoints saver, which turns checkpointing on by itself
        ("8GB", Constraints(), "on: the offloaded-checkpoints saver offloads the checkpointed inputs"),
        ("12GB", Constraints(offload_ckpt=True), "on: --offload-ckpt offloads the checkpointed inputs"),
        ("12GB", Constraints(grad_ckpt=True), "on: fixed by --grad-ckpt on"),
        ("12GB", Constraints(), "on: without it the smallest setting needs"),
        ("80GB", Constraints(grad_ckpt=False), "off: fixed by --grad-ckpt off"),
        ("80GB", Constraints(), "off: it fits without recomputing"),
    ],
)
def test_the_checkpointing_reason_names_its_true_cause(gpu, constraints, said):
    p = plan(lookup("llama-3.1-8b"), resolve_gpu(gpu), constraints)
    (line,) = [r for r in p.reasons if r.startswith("gradient checkpointing")]
    assert line.startswith("gradient checkpointing " + said), line
    assert p.best.setup.grad_ckpt == said.startswith("on")


def test_fixed_knobs_are_respected():
    c = Constraints(
        quant="int8",
        rank=32,
        targets="q_proj,v_proj",
        optimizer="paged_adamw8bit",
        batch_size=2,
        seq_len=256,
        grad_ckpt=True,
        attn="eager",
        dtype="fp16",
    )
    s = plan(lookup("opt-6.7b"), resolve_gpu("24GB"), c).best.setup
    assert (s.quant, s.rank, s.targets, s.optimizer, s.batch_size, s.seq_len, s.grad_ckpt, s.attn, s.dtype) == (
        "int8",
        32,
        ("q_proj", "v_proj"),
        "paged_adamw8bit",
        2,
        256,
        True,
        "eager",
        "fp16",
    )


def test_grad_accum_reaches_the_effective_batch():
    p = plan(lookup("opt-125m"), resolve_gpu("24GB"), Constraints(effective_batch=32, seq_len=512))
    assert p.best.setup.batch_size * p.best.grad_accum == 32


def test_nothing_fits_says_by_how_much_and_what_would_help():
    arch, device = lookup("Llama-2-70b-hf"), resolve_gpu("24GB")
    p = plan(arch, device, Constraints(seq_len=4096))
    assert not p.fits
    every_saver = saver_steps(Constraints(seq_len=4096))[-1][0]  # the last searched: all savers on
    smallest = min(candidates(arch, every_saver, device), key=lambda c: c.estimate.device_bytes)
    assert p.best.estimate.device_bytes == smallest.estimate.device_bytes
    assert "nothing fits" in p.advice[0] and "more than" in p.advice[0]
    assert any("bigger card" in a for a in p.advice)
    assert any("GPUs" in a for a in p.advice)


def test_shorter_sequence_advice_really_fits():
    arch, device = lookup("Llama-3.1-8B"), resolve_gpu("12GB")
    p = plan(arch, device, Constraints(seq_len=8192, upcast="all", chunked_loss=False, offload_ckpt=False))
    line = next(a for a in p.advice if "--seq-len" in a)
    seq = int(line.split("--seq-len ")[1].split()[0])
    fam = device.family
    assert estimate(arch, p.best.setup.with_(seq_len=seq), family=fam).device_bytes <= device.fit_limit
    assert estimate(arch, p.best.setup.with_(seq_len=seq + 1), family=fam).device_bytes > device.fit_limit


@pytest.mark.parametrize(
    ("constraints", "fragment"),
    [
        (Constraints(rank=-4), "--rank must be a positive integer"),
        (Constraints(seq_len=100_000), "longer than"),
        (Constraints(quant="int8", double_quant=True), "4-bit bases only"),
        (Constraints(targets="q_proj,nope"), "nope"),
        (Constraints(quant="int4"), "--quant must be one of"),
        (Constraints(dtype="bf16"), "no bf16"),
    ],
)
def test_bad_constraints_raise_one_clear_error(constraints, fragment):
    gpu = "T4" if constraints.dtype == "bf16" else "24GB"
    with pytest.raises(UsageError, match=fragment.replace("-", r"\-")):
        plan(lookup("opt-1.3b"), resolve_gpu(gpu), constraints)


def test_json_schema_has_the_documented_keys():
    out = plan_json(plan(lookup("opt-6.7b"), resolve_gpu("24GB"), Constraints()))
    for key in (
        "peak_allocated_bytes",
        "peak_reserved_bytes",
        "device_bytes",
        "gpu_bytes",
        "fits",
        "choice",
        "breakdown",
    ):
        assert key in out
    assert set(out["choice"]) == {
        "quant",
        "double_quant",
        "rank",
        "targets",
        "optimizer",
        "batch_size",
        "grad_accum",
        "seq_len",
        "grad_ckpt",
        "attn",
        "dtype",
        "lora_fa",
        "kernel",
        "dora",
        "rslora",
        "upcast",
        "chunked_loss",
        "offload_ckpt",
    }
    assert out["gpu_bytes"] == 24 * GIB
    assert out["peak_allocated_bytes"] <= out["peak_reserved_bytes"] <= out["device_bytes"]


def test_memory_grows_with_batch_sequence_and_precision():
    arch = lookup("llama-2-7b")
    base = TrainSetup(quant="nf4", seq_len=512, batch_size=1)
    e = estimate(arch, base).peak_allocated_bytes
    assert estimate(arch, base.with_(batch_size=2)).peak_allocated_bytes > e
    assert estimate(arch, base.with_(seq_len=1024)).peak_allocated_bytes > e
    assert estimate(arch, base.with_(grad_ckpt=True)).peak_allocated_bytes < e
    assert estimate(arch, base.with_(quant="int8")).peak_allocated_bytes > e
    assert estimate(arch, base.with_(double_quant=False)).peak_allocated_bytes > e
    paged = estimate(arch, base.with_(optimizer="paged_adamw"))
    assert paged.paged_bytes > 0 and paged.breakdown["optimizer_state"] == 0
