"""The memory savers (``qlora_kit.model.savers``) on real tiny NF4 models: each computes what the default path
computes, keeps what the planner says it keeps, and trains through ``qlora_kit.train.loop.train``."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from qlora_kit.catalog.readers import arch_from_config
from qlora_kit.knobs import TrainSetup

LLAMA = {
    "model_type": "llama",
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "vocab_size": 512,
    "tie_word_embeddings": False,
    "max_position_embeddings": 128,
}
OPT = {
    "model_type": "opt",
    "hidden_size": 64,
    "ffn_dim": 128,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "vocab_size": 512,
    "word_embed_proj_dim": 64,
    "max_position_embeddings": 128,
    "dropout": 0.0,
}
CONFIGS = {"llama": LLAMA, "opt": OPT}


@pytest.fixture(autouse=True, scope="module")
def _one_thread() -> Any:
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def setup(**knobs: Any) -> TrainSetup:
    base = TrainSetup(quant="nf4", dtype="fp32", rank=8, targets=("q_proj", "v_proj"), lora_dropout=0.0)
    return base.with_(batch_size=2, seq_len=32, **knobs)


def load(tiny_model_dir: Any, family: str, s: TrainSetup) -> Any:
    """The model ``train`` builds, its LoRA weights seeded (two loads compare gradient for gradient)."""
    import torch

    from qlora_kit.measure import steps as measure

    torch.manual_seed(0)
    return measure.load_for_training(tiny_model_dir(CONFIGS[family], "float32"), s)


def loss_and_grads(model: Any, batch: dict[str, Any], chunked: bool, chunk_tokens: int = 1024) -> tuple[float, list]:
    from qlora_kit.model.savers import causal_lm_loss

    model.zero_grad(set_to_none=True)
    loss = causal_lm_loss(model, batch, chunked, chunk_tokens)
    loss.backward()
    return float(loss.detach()), [p.grad.clone() for p in model.parameters() if p.requires_grad]


def masked_batch(vocab: int, s: TrainSetup) -> dict[str, Any]:
    """A random batch whose first tokens (a "prompt") are masked out of the loss."""
    from qlora_kit.measure.steps import random_batch

    batch = random_batch(vocab, s)
    labels = batch["input_ids"].clone()
    labels[:, :5] = -100
    return {"input_ids": batch["input_ids"], "labels": labels}


# -- chunked cross-entropy ------------------------------------------------------------------------------


@pytest.mark.parametrize("family", ["llama", "opt"])
def test_chunked_loss_equals_the_models_loss_and_gradients(tiny_model_dir, family):
    """Chunks of 24 rows (not dividing the 2 x 32 tokens), masked prompt tokens: same loss, same LoRA
    gradients as ``model(**batch).loss``."""
    import torch

    s = setup()
    model = load(tiny_model_dir, family, s)
    batch = masked_batch(512, s)
    ref_loss, ref_grads = loss_and_grads(model, batch, chunked=False)
    loss, grads = loss_and_grads(model, batch, chunked=True, chunk_tokens=24)
    assert loss == pytest.approx(ref_loss, rel=1e-6)
    assert len(grads) == len(ref_grads) == 8
    for g, r in zip(grads, ref_grads, strict=True):
        torch.testing.assert_close(g, r, rtol=1e-5, atol=1e-7)


def test_chunked_loss_keeps_no_logits_for_backward(tiny_model_dir):
    """What forward keeps loses the b x s x vocab fp32 log-softmax, and equals the planner's saved bytes
    with and without chunking."""
    from qlora_kit.measure import steps as measure
    from qlora_kit.plan.activations import saved_bytes

    arch = arch_from_config(LLAMA, "tiny")
    measured = {}
    for chunked in (False, True):
        s = setup(chunked_loss=chunked)
        measured[chunked] = measure.saved_after_forward(load(tiny_model_dir, "llama", s), s, 512)
        assert measured[chunked] == saved_bytes(arch, s, "cpu")["total"]
    # chunked keeps the final hidden state and its labels instead
    log_softmax, hidden, labels = 2 * 32 * 512 * 4, 2 * 32 * 64 * 4, 2 * 32 * 8
    assert measured[False] - measured[True] >= log_softmax - hidden - labels


def test_chunked_loss_refuses_models_that_scale_their_logits(tiny_model_dir):
    """A causal LM that rescales the head's output (Cohere's ``logit_scale``) gets one clear error."""
    from qlora_kit.errors import UsageError
    from qlora_kit.measure.steps import random_batch
    from qlora_kit.model.savers import causal_lm_loss

    s = setup()
    model = load(tiny_model_dir, "llama", s)
    model.get_base_model().config.logit_scale = 0.0625
    with pytest.raises(UsageError, match="scales its logits"):
        causal_lm_loss(model, random_batch(512, s), chunked=True)


# -- selective upcast -----------------------------------------------------------------------------------


@pytest.mark.parametrize("family", ["llama", "opt"])
def test_selective_upcast_casts_only_layernorms(tiny_model_dir, family):
    """bf16 base: peft's preparation makes every unquantized parameter fp32; the selective one only
    ``nn.LayerNorm``'s (OPT), none of Llama's (its RMSNorm computes in fp32 by itself). The parameter
    bytes are the planner's, and the step's loss is the fp32-upcast step's to bf16 precision."""
    import torch

    from qlora_kit.measure import steps as measure
    from qlora_kit.measure.tensors import static_bytes
    from qlora_kit.plan.memory import other_param_bytes

    arch = arch_from_config(CONFIGS[family], family)
    results = {}
    for upcast in ("all", "selective"):
        s = setup(dtype="bf16", upcast=upcast)
        model = load(tiny_model_dir, family, s)
        fp32 = {n for n, p in model.named_parameters() if p.dtype == torch.float32 and ".lora_" not in n}
        assert static_bytes(model)["other_params"] == other_param_bytes(arch, s)
        ac = torch.bfloat16 if measure.uses_autocast(s) else None
        loss = measure.forward_loss(model, measure.random_batch(512, s), ac, "cpu")
        results[upcast] = (fp32, float(loss.detach()))
    all_fp32, sel_fp32 = results["all"][0], results["selective"][0]
    assert {n for n in all_fp32 if "embed" in n or "lm_head" in n}  # peft upcasts those
    layernorms = {n for n in all_fp32 if "layer_norm" in n}
    assert sel_fp32 == layernorms and (bool(layernorms) == (family == "opt"))
    assert results["selective"][1] == pytest.approx(results["all"][1], rel=2e-2)


# -- offloaded checkpoints ------------------------------------------------------------------------------


def test_offloaded_checkpoints_equal_plain_checkpointing_and_pack_the_layer_inputs(tiny_model_dir):
    """Same loss and gradients as plain checkpointing; the layer inputs leave the saved tensors the
    (outer) hooks see, exactly the planner's ``offloaded`` bytes: they went through ``save_on_cpu``."""
    import torch

    from qlora_kit.measure import steps as measure
    from qlora_kit.plan.activations import saved_bytes

    arch = arch_from_config(LLAMA, "tiny")
    runs = {}
    for offload in (False, True):
        s = setup(grad_ckpt=True, offload_ckpt=offload)
        model = load(tiny_model_dir, "llama", s)
        batch = measure.random_batch(512, s)
        runs[offload] = (*loss_and_grads(model, batch, chunked=False), measure.saved_after_forward(model, s, 512))
        assert runs[offload][2] == saved_bytes(arch, s, "cpu")["total"]
    (l0, g0, saved0), (l1, g1, saved1) = runs[False], runs[True]
    assert l1 == l0
    for a, b in zip(g1, g0, strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    offloaded = saved_bytes(arch, setup(grad_ckpt=True, offload_ckpt=True), "cpu")["offloaded"]
    assert saved0 - saved1 == offloaded == 2 * 2 * 32 * 64 * 4


# -- through the training loop --------------------------------------------------------------------------


def test_train_with_every_saver_matches_the_default_path(tmp_path: Path):
    """``qlora_kit.train.loop.train`` with the recipe keys: the savers' run reproduces the default run's losses
    (fp32 compute on CPU: the selective upcast changes no dtype there)."""
    from test_train import DEMO, Quiet, losses

    from qlora_kit.recipe import load_recipe
    from qlora_kit.train.loop import train

    def run(out: Path, *extra: str) -> tuple[dict[int, float], float]:
        sets = [
            f"train.output_dir={out}",
            "train.max_steps=3",
            "train.logging_steps=1",
            "train.micro_batch=2",
            "train.save_steps=0",
            "train.eval_steps=0",
            "train.warmup_steps=0",
            "data.max_seq_len=32",
            "data.eval_fraction=0.1",
            "train.grad_ckpt=true",
        ]
        result = train(load_recipe(DEMO, [*sets, *extra]), Quiet())
        return losses(out), result.summary["eval_loss"]

    default, default_eval = run(tmp_path / "default")
    savers, savers_eval = run(
        tmp_path / "savers", "quant.upcast=selective", "train.chunked_loss=true", "train.offload_ckpt=true"
    )
    assert list(savers) == list(default) == [1, 2, 3]
    for step, loss in default.items():
        assert savers[step] == pytest.approx(loss, rel=1e-4)
    assert savers_eval == pytest.approx(default_eval, rel=1e-4)  # the chunked evaluation: the same loss


def test_offload_needs_grad_ckpt_in_a_recipe():
    from qlora_kit.errors import UsageError
    from qlora_kit.recipe import build_recipe

    with pytest.raises(UsageError, match=r"train\.offload_ckpt needs train\.grad_ckpt"):
        build_recipe({"model": {"name": "x"}, "train": {"offload_ckpt": True}})
    with pytest.raises(UsageError, match=r"quant\.upcast must be one of all, selective"):
        build_recipe({"model": {"name": "x"}, "quant": {"upcast": "some"}})


# -- the planner ----------------------------------------------------------------------------------------


def test_planner_models_each_saver_on_a_real_size_model():
    """Llama-2-7B, NF4, batch 4 x 2048: the chunked loss drops the b x s x vocab fp32 terms to one chunk's,
    the selective upcast halves the embeddings' and head's bytes, offloading moves every checkpoint to host."""
    from qlora_kit.catalog.models import resolve_model
    from qlora_kit.knobs import LOSS_CHUNK_TOKENS
    from qlora_kit.plan.memory import estimate
    from qlora_kit.plan.moments import peak_moment, peak_moments

    arch = resolve_model("meta-llama/Llama-2-7b-hf")
    base = TrainSetup(batch_size=4, seq_len=2048)
    plain, chunked = (peak_moments(arch, base.with_(chunked_loss=c))["backward start"] for c in (False, True))
    v = arch.vocab_size
    assert plain["logits_loss"] == 3 * 4 * v * 4 * 2048
    assert chunked["logits_loss"] == 3 * 4 * v * LOSS_CHUNK_TOKENS
    groups = arch.param_groups()
    sel = estimate(arch, base.with_(upcast="selective"))
    saved = estimate(arch, base).breakdown["other_params"] - sel.breakdown["other_params"]
    assert saved == 2 * (arch.num_params - groups["linear_weight"])  # RMSNorms stay bf16 too
    ck, off = estimate(arch, base.with_(grad_ckpt=True)), estimate(arch, base.with_(grad_ckpt=True, offload_ckpt=True))
    assert off.host_bytes == 32 * 4 * 2048 * 4096 * 4 and ck.host_bytes == 0
    # the peak sits at backward's start here, before any layer's input is copied back for its recomputation
    assert peak_moment(arch, base.with_(grad_ckpt=True, offload_ckpt=True)) == "backward start"
    assert ck.peak_allocated_bytes - off.peak_allocated_bytes == off.host_bytes


def test_a_selective_upcast_bf16_adapter_exports_and_verifies(tmp_path: Path):
    """The export's reference loads the base as training did (selective upcast leaves the embeddings and
    head 16-bit), then computes in fp32: the merged fp32 export matches it within fp32 noise."""
    from test_train import Quiet, demo_recipe

    from qlora_kit.export.run import export
    from qlora_kit.train.loop import train

    run = tmp_path / "run"
    sets = {"quant.upcast": "selective", "quant.compute_dtype": "bf16", "max_steps": 2, "save_steps": 0}
    train(demo_recipe(run, **sets), Quiet())
    summary = export(run, tmp_path / "merged", dtype="fp32")
    check = summary["verification"]
    assert check["passed"] and check["max_abs_diff"] < 1e-3, check
