"""The planner's activation and peak terms against real training steps: the CPU calibration grid.

Tiny random-init models of two families, a Llama (gated MLP, grouped KV heads, RMSNorm, rotary) and an
OPT (ReLU MLP, LayerNorm, learned positions, residual dropout 0.1), are saved to disk and loaded the way
``qlora-kit train`` loads them (``qlora_kit.model.load.load_base``, ``lora.prepare``, ``lora.apply_lora``)
with every base precision (16-bit, LLM.int8, NF4, NF4 + double quant), gradient checkpointing on and
off, eager and SDPA attention, two widths, two ranks, attention-only and all-linear LoRA targets, every
optimizer, and several batch sizes and sequence lengths. Each grid point runs real optimizer steps of two
accumulated micro-batches (``qlora_kit.measure.steps``) and compares, term by term:

- static terms (weights, quantization constants, other parameters, LoRA parameters, gradients,
  optimizer state): exactly;
- the bytes kept for backward after forward (saved-tensor hooks plus LLM.int8's ``ctx`` inputs) and the
  peak of live tensor bytes of the steady-state step (all of it, and the part the step adds): within 5%.

CPU semantics differ from CUDA (dropout masks, LayerNorm statistics, SDPA kernels, peft's autocast
check), so the planner is asked with ``device="cpu"``. Compute is fp32, plus eight points in bf16
(autocast for the k-bit base, the GPU's regime) without checkpointing: bf16 is ~27x slower here, and with
checkpointing bf16 CPU steps allocate more than the model accounts for (up to ~15% of the step's part
on these tiny shapes; CPU bf16 matmuls take scratch buffers, and not all of it is attributed yet).
A second set of tests measures what forward keeps across batch sizes and sequence lengths: linear in
batch and tokens, quadratic in sequence length for eager attention, as the planner says.
"""

from __future__ import annotations

import itertools
from typing import Any, NamedTuple

import pytest

from qlora_kit.catalog.arch import ArchSpec
from qlora_kit.catalog.readers import arch_from_config
from qlora_kit.knobs import OPTIMIZERS, TrainSetup

TOLERANCE = 0.05

GEOMETRIES: dict[str, dict[str, Any]] = {
    "llama-128": {
        "model_type": "llama",
        "hidden_size": 128,
        "intermediate_size": 384,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "vocab_size": 1024,
        "tie_word_embeddings": False,
        "max_position_embeddings": 512,
    },
    "llama-256": {
        "model_type": "llama",
        "hidden_size": 256,
        "intermediate_size": 512,
        "num_hidden_layers": 2,
        "num_attention_heads": 8,
        "num_key_value_heads": 2,
        "vocab_size": 1024,
        "tie_word_embeddings": False,
        "max_position_embeddings": 512,
    },
    "opt-128": {
        "model_type": "opt",
        "hidden_size": 128,
        "ffn_dim": 512,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "vocab_size": 1024,
        "word_embed_proj_dim": 128,
        "max_position_embeddings": 512,
    },
    "opt-256": {
        "model_type": "opt",
        "hidden_size": 256,
        "ffn_dim": 768,
        "num_hidden_layers": 2,
        "num_attention_heads": 8,
        "vocab_size": 1024,
        "word_embed_proj_dim": 256,
        "max_position_embeddings": 512,
    },
}
# (TrainSetup.quant, double_quant)
QUANTS = {"none": ("none", False), "int8": ("int8", False), "nf4": ("nf4", False), "nf4-dq": ("nf4", True)}
# (batch, sequence) pairs, cycled through the model cases: small ones where the dequantized weight and
# the last block's backward decide the peak, long ones where eager attention's s^2 terms do
SHAPES = [((1, 16), (2, 64)), ((4, 32), (1, 128)), ((2, 48), (1, 256)), ((3, 16), (2, 96))]


class Case(NamedTuple):
    geometry: str
    quant: str
    grad_ckpt: bool
    attn: str
    rank: int
    targets: str  # "qv" or "all-linear"
    lora_dropout: float
    optimizer: str
    shape: tuple[int, int]  # (batch, sequence)
    dtype: str = "fp32"  # compute dtype (k-bit bases run under autocast when it is 16-bit)
    lora_fa: bool = False  # lora_A frozen (LoRA-FA)
    runlora: bool = False  # qlora_kit.model.runlora's layer instead of peft's
    savers: tuple[str, ...] = ()  # qlora_kit.model.savers' switches: "selective", "chunked", "offload"


def _cases() -> list[Case]:
    """Every family x quant x checkpointing x attention in fp32, the other knobs cycled across them; and
    a few points in bf16 compute (autocast for the k-bit bases: the GPU's regime), no checkpointing."""
    out = []
    combos = itertools.product(("llama", "opt"), QUANTS, (False, True), ("sdpa", "eager"))
    for i, (family, quant, ckpt, attn) in enumerate(combos):
        # mixed radices, so that no two knobs move together
        geometry = f"{family}-{(128, 256)[(i + i // 4) % 2]}"
        rank = (8, 16)[(i // 2 + i // 8) % 2]
        targets = ("qv", "all-linear")[(i + i // 2 + i // 8) % 2]
        dropout = 0.0 if i % 5 == 4 else 0.05
        optimizer = OPTIMIZERS[(i + i // 8) % len(OPTIMIZERS)]
        for shape in SHAPES[(i + i // 4) % len(SHAPES)]:
            out.append(Case(geometry, quant, ckpt, attn, rank, targets, dropout, optimizer, shape))
    for i, (geometry, quant, targets) in enumerate(
        itertools.product(GEOMETRIES, ("nf4-dq", "none"), ("qv", "all-linear"))
    ):
        if i % 2 == 0:  # half of them, alternating
            continue
        out.append(Case(geometry, quant, False, "sdpa", 16, targets, 0.05, "adamw", (2, 64), "bf16"))
    # LoRA-FA and the runlora layer, alone and together, on every base precision, with and without dropout
    # and checkpointing
    for i, (quant, (fa, rl)) in enumerate(itertools.product(QUANTS, ((True, False), (False, True), (True, True)))):
        if i % 2 == 1 and quant != "int8":
            continue
        geometry = ("llama-128", "opt-128")[i % 2]
        dropout = (0.0, 0.05)[(i // 2) % 2]
        gc = i % 3 == 2
        out.append(Case(geometry, quant, gc, "sdpa", 8, "all-linear", dropout, "adamw", (2, 64), "fp32", fa, rl))
    # the memory savers: the chunked loss over more tokens than one chunk (1024), the selective upcast in bf16
    # (fp32 leaves nothing to upcast), offloaded checkpoints; bf16 without checkpointing, as above
    for geometry, quant, gc, attn, targets, dtype, shape, savers in (
        ("llama-128", "nf4-dq", False, "sdpa", "qv", "fp32", (4, 512), ("chunked",)),
        ("opt-128", "nf4-dq", True, "sdpa", "all-linear", "fp32", (3, 512), ("chunked",)),
        ("llama-256", "nf4-dq", False, "sdpa", "all-linear", "bf16", (2, 64), ("selective",)),
        ("opt-256", "nf4", False, "sdpa", "qv", "bf16", (2, 64), ("selective",)),
        ("opt-128", "nf4-dq", False, "sdpa", "all-linear", "bf16", (3, 400), ("selective", "chunked")),
        ("llama-128", "nf4", True, "eager", "qv", "fp32", (2, 96), ("offload",)),
        ("opt-128", "int8", True, "sdpa", "qv", "fp32", (2, 64), ("offload", "chunked")),
    ):
        out.append(Case(geometry, quant, gc, attn, 8, targets, 0.05, "adamw", shape, dtype, savers=savers))
    return out


CASES = _cases()


def _id(case: Case) -> str:
    gc = "gc" if case.grad_ckpt else "nogc"
    b, s = case.shape
    return (
        f"{case.geometry}-{case.quant}-{case.dtype}-{gc}-{case.attn}-r{case.rank}-{case.targets}"
        f"-p{case.lora_dropout}-{case.optimizer}-b{b}s{s}"
        + ("-lorafa" if case.lora_fa else "")
        + ("-runlora" if case.runlora else "")
        + "".join(f"-{x}" for x in case.savers)
    )


def arch(geometry: str) -> ArchSpec:
    return arch_from_config(GEOMETRIES[geometry], geometry)


def setup_for(case: Case) -> TrainSetup:
    a = arch(case.geometry)
    names = a.linear_names() if case.targets == "all-linear" else ("q_proj", "v_proj")
    q, dq = QUANTS[case.quant]
    b, s = case.shape
    return TrainSetup(
        quant=q,
        double_quant=dq,
        dtype=case.dtype,
        rank=case.rank,
        targets=names,
        optimizer=case.optimizer,
        batch_size=b,
        seq_len=s,
        grad_ckpt=case.grad_ckpt,
        attn=case.attn,
        lora_dropout=case.lora_dropout,
        lora_fa=case.lora_fa,
        runlora=case.runlora,
        upcast="selective" if "selective" in case.savers else "all",
        chunked_loss="chunked" in case.savers,
        offload_ckpt="offload" in case.savers,
    )


# -- measuring (a loaded model per case, a report per point) --------------------------------------------

_MODELS: dict[Case, Any] = {}
_REPORTS: dict[Case, Any] = {}
_SAVED: dict[Case, int] = {}


@pytest.fixture(autouse=True, scope="module")
def _one_thread_and_cleanup() -> Any:
    """One torch thread (two OpenMP threads on a busy 2-core machine spin for seconds); drop the loaded
    models and measurements when the module is done."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
    _MODELS.clear()
    _REPORTS.clear()
    _SAVED.clear()


def _model(tiny_model_dir: Any, case: Case) -> Any:
    from qlora_kit.measure import steps as measure

    key = case._replace(shape=(0, 0))
    if key not in _MODELS:
        _MODELS.clear()  # one model alive at a time (cases arrive in order)
        path = tiny_model_dir(GEOMETRIES[case.geometry], "float32")
        _MODELS[key] = measure.load_for_training(path, setup_for(case), "cpu")
    return _MODELS[key]


def report(tiny_model_dir: Any, case: Case) -> Any:
    from qlora_kit.measure import report as measure

    if case not in _REPORTS:
        model = _model(tiny_model_dir, case)
        _REPORTS[case] = measure.measure_and_compare(model, arch(case.geometry), setup_for(case), "cpu", steps=2)
    return _REPORTS[case]


def _explain(rep: Any) -> str:
    rows = "; ".join(f"{r.term} {r.measured} vs {r.predicted} ({r.error:+.2%})" for r in rep.rows)
    return f"planner's peak moment: {rep.moment}; {rows}"


# -- the grid -------------------------------------------------------------------------------------------


def test_the_grid_covers_every_knob():
    def values(field: str) -> set[Any]:
        return {getattr(c, field) for c in CASES}

    assert {g.split("-")[0] for g in values("geometry")} == {"llama", "opt"}
    assert values("geometry") == set(GEOMETRIES)
    assert values("quant") == set(QUANTS)
    assert values("grad_ckpt") == {False, True} and values("attn") == {"sdpa", "eager"}
    assert values("rank") == {8, 16} and values("targets") == {"qv", "all-linear"}
    assert values("lora_dropout") == {0.0, 0.05} and values("optimizer") == set(OPTIMIZERS)
    assert values("shape") >= {s for pair in SHAPES for s in pair}
    assert values("dtype") == {"fp32", "bf16"}
    assert {(c.lora_fa, c.runlora) for c in CASES} == {(False, False), (True, False), (False, True), (True, True)}
    assert {x for c in CASES for x in c.savers} == {"selective", "chunked", "offload"}
    assert len(CASES) >= 70


@pytest.mark.parametrize("case", CASES, ids=[_id(c) for c in CASES])
def test_static_terms_are_exact(tiny_model_dir, case):
    rep = report(tiny_model_dir, case)
    for term in ("linear_weights", "quant_state", "other_params", "lora_params", "lora_grads", "optimizer_state"):
        row = rep.row(term)
        assert row.measured == row.predicted, _explain(rep)


@pytest.mark.parametrize("case", CASES, ids=[_id(c) for c in CASES])
def test_saved_for_backward_within_tolerance(tiny_model_dir, case):
    rep = report(tiny_model_dir, case)
    assert abs(rep.row("saved").error) <= TOLERANCE, _explain(rep)
    assert abs(rep.row("saved_ctx").error) <= TOLERANCE, _explain(rep)
    runlora = case.runlora and case.lora_dropout == 0  # (with dropout, peft's layer runs)
    if case.quant == "int8" and not runlora:  # LLM.int8 keeps its inputs on ctx whenever they require grad
        assert rep.row("saved_ctx").measured > 0
    if case.quant == "int8" and runlora:  # the runlora layer dequantizes again in backward instead
        assert rep.row("saved_ctx").measured == 0


@pytest.mark.parametrize("case", CASES, ids=[_id(c) for c in CASES])
def test_peak_within_tolerance(tiny_model_dir, case):
    rep = report(tiny_model_dir, case)
    assert abs(rep.row("dynamic").error) <= TOLERANCE, _explain(rep)
    assert abs(rep.row("peak").error) <= TOLERANCE, _explain(rep)
    assert all(loss == loss and loss < 20 for loss in rep.measurement.losses)  # finite, sane


def test_the_grid_exercises_every_kind_of_peak(tiny_model_dir):
    """The grid's points peak at backward's start, in the last block's backward (checkpointed or not),
    and in the forward's dequantized weight: every moment of the model is measured somewhere."""
    moments = {report(tiny_model_dir, c).moment.split(",")[0] for c in CASES}
    assert {"backward start", "forward", "backward"} <= moments
    kinds = {report(tiny_model_dir, c).moment for c in CASES}
    assert len(kinds) >= 5, kinds


# -- scaling laws ---------------------------------------------------------------------------------------


def saved(tiny_model_dir: Any, geometry: str, quant: str, attn: str, b: int, s: int) -> tuple[int, int]:
    """(measured, planned) bytes kept for backward after one forward pass."""
    from qlora_kit.measure import steps as measure
    from qlora_kit.plan.activations import saved_bytes

    case = Case(geometry, quant, False, attn, 8, "qv", 0.05, "adamw", (b, s))
    if case not in _SAVED:
        model = _model(tiny_model_dir, case)
        _SAVED[case] = measure.saved_after_forward(model, setup_for(case), GEOMETRIES[geometry]["vocab_size"])
    planned = int(saved_bytes(arch(geometry), setup_for(case), "cpu")["total"])  # type: ignore[call-overload]
    return _SAVED[case], planned


@pytest.mark.parametrize("quant", ["nf4", "int8"])
def test_saved_bytes_are_linear_in_batch(tiny_model_dir, quant):
    """Every piece is per token; steps of one sequence in the batch add the same bytes."""
    points = [saved(tiny_model_dir, "llama-128", quant, "sdpa", b, 64) for b in (2, 3, 4)]
    (m2, p2), (m3, p3), (m4, p4) = points
    assert m4 - m3 == m3 - m2 > 0
    assert (m3 - m2, m4 - m3) == (p3 - p2, p4 - p3)


@pytest.mark.parametrize("geometry", ["llama-128", "opt-128"])
def test_saved_bytes_are_linear_in_tokens_with_sdpa(tiny_model_dir, geometry):
    """SDPA's fused kernels keep no s x s tensor: equal steps in sequence length add equal bytes."""
    (m1, p1), (m2, p2), (m3, p3) = (saved(tiny_model_dir, geometry, "nf4", "sdpa", 2, s) for s in (32, 64, 96))
    assert m3 - m2 == m2 - m1 > 0
    assert (m2 - m1, m3 - m2) == (p2 - p1, p3 - p2)


@pytest.mark.parametrize("geometry", ["llama-128", "opt-128"])
def test_saved_bytes_are_quadratic_in_sequence_with_eager_attention(tiny_model_dir, geometry):
    """Eager attention keeps its b x heads x s x s softmax: the second difference in s is the planner's,
    and it is that term alone (2 x dS^2 x heads x 4 B per block)."""
    a = arch(geometry)
    (m1, p1), (m2, p2), (m3, p3) = (saved(tiny_model_dir, geometry, "nf4", "eager", 1, s) for s in (64, 128, 192))
    second = (m3 - m2) - (m2 - m1)
    assert second == (p3 - p2) - (p2 - p1)
    assert second == a.num_layers * 2 * 64 * 64 * a.num_heads * 4
    (n1, _), (n2, _), (n3, _) = (saved(tiny_model_dir, geometry, "nf4", "sdpa", 1, s) for s in (64, 128, 192))
    assert (n3 - n2) - (n2 - n1) == 0


# -- on a GPU (deselected by default; run with `-m gpu`) ------------------------------------------------

GPU_LLAMA = {
    "model_type": "llama",
    "hidden_size": 2048,
    "intermediate_size": 5632,
    "num_hidden_layers": 4,
    "num_attention_heads": 16,
    "num_key_value_heads": 4,
    "vocab_size": 32000,
    "tie_word_embeddings": False,
    "max_position_embeddings": 4096,
}


def _gpu_report(config: dict[str, Any], name: str, **knobs: Any) -> Any:
    import torch

    from qlora_kit.measure import report as measure

    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")
    a = arch_from_config(config, name)
    setup = TrainSetup(dtype="bf16", targets=a.linear_names()).with_(**knobs)
    torch.cuda.empty_cache()
    return measure.run(config, setup, "cuda", steps=3, grad_accum=2, name=name)


@pytest.mark.gpu
@pytest.mark.parametrize("quant", ["nf4", "int8", "none"])
@pytest.mark.parametrize("grad_ckpt", [False, True])
def test_gpu_peak_allocated_within_tolerance(quant, grad_ckpt):
    """A 4-layer Llama of 1B-model width in bf16 compute (autocast for k-bit bases): saved bytes and
    max_memory_allocated against the planner's CUDA semantics."""
    rep = _gpu_report(
        GPU_LLAMA, "gpu-llama", quant=quant, double_quant=quant == "nf4", batch_size=2, seq_len=512, grad_ckpt=grad_ckpt
    )
    for term in ("linear_weights", "quant_state", "other_params", "lora_params", "lora_grads", "optimizer_state"):
        assert rep.row(term).measured == rep.row(term).predicted, _explain(rep)
    assert abs(rep.row("saved").error) <= TOLERANCE, _explain(rep)
    assert abs(rep.row("dynamic").error) <= TOLERANCE, _explain(rep)
    assert abs(rep.row("peak_allocated").error) <= TOLERANCE, _explain(rep)


@pytest.mark.gpu
@pytest.mark.slow
def test_gpu_real_size_7b():
    """Llama-2-7B at real size (random weights, built on the GPU, saved and loaded back in NF4)."""
    from qlora_kit.catalog.models import catalog_configs

    name = "meta-llama/Llama-2-7b-hf"
    rep = _gpu_report(dict(catalog_configs()[name]), name, quant="nf4", batch_size=1, seq_len=1024)
    assert abs(rep.row("peak_allocated").error) <= TOLERANCE, _explain(rep)
    assert abs(rep.row("peak_reserved").error) <= 2 * TOLERANCE, _explain(rep)
