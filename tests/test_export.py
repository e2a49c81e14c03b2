"""qlora-kit export on CPU with real bitsandbytes: bit-exact dequantization, merged logits, streaming
shards, ties, plain peft adapters, and every way the input can be wrong."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import types
from pathlib import Path

import pytest
from conftest import TINY_LLAMA

LLAMA = {**TINY_LLAMA, "max_position_embeddings": 64}
OPT = {  # ties lm_head to the input embeddings; the checkpoint stores the embeddings only
    "model_type": "opt",
    "hidden_size": 128,
    "ffn_dim": 256,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "vocab_size": 256,
    "word_embed_proj_dim": 128,
    "max_position_embeddings": 64,
}
GPT2 = {
    "model_type": "gpt2",
    "n_embd": 128,
    "n_layer": 2,
    "n_head": 4,
    "vocab_size": 256,
    "n_positions": 64,
    "bos_token_id": 0,
    "eos_token_id": 0,
}
FALCON = {
    "model_type": "falcon",
    "hidden_size": 128,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "vocab_size": 256,
}


@pytest.fixture(autouse=True)
def _quiet(quiet_hf):
    pass


def make_adapter(base: Path, out: Path, targets="all-linear", seed: int = 1, **lora) -> Path:
    """A peft LoRA adapter for ``base`` with random A and B (B is zero at init: the merge would be a no-op)."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    config = LoraConfig(r=lora.pop("r", 8), lora_alpha=lora.pop("lora_alpha", 16), target_modules=targets, **lora)
    peft_model = get_peft_model(model, config)
    gen = torch.Generator().manual_seed(seed)
    for name, param in peft_model.named_parameters():
        if "lora_B" in name or "lora_embedding_A" in name:
            param.data = torch.randn(param.shape, generator=gen) * 0.05
    peft_model.save_pretrained(out)
    return out


def write_metadata(adapter: Path, base: Path, mode: str, double_quant: bool = False, compute_dtype: str = "fp32"):
    """What `qlora-kit train` writes next to the adapter (train._write_final)."""
    from qlora_kit.adapter import config_fingerprint

    meta = {
        "base_model": str(base),
        "base_config_sha256": config_fingerprint(str(base)),
        "quant": {"mode": mode, "double_quant": double_quant, "compute_dtype": compute_dtype},
    }
    (adapter / "qlora_kit.json").write_text(json.dumps(meta))
    return adapter


def adapter_for(llama_adapter: Path, tmp_path: Path, llama: Path, mode: str, dq: bool = False, cd: str = "fp32"):
    copy = tmp_path / f"adapter-{mode}"
    shutil.copytree(llama_adapter, copy)
    return write_metadata(copy, llama, mode, dq, cd)


def load_tensors(out: Path) -> dict:
    from safetensors.torch import load_file

    tensors: dict = {}
    for f in sorted(out.glob("*.safetensors")):
        tensors.update(load_file(f))
    return tensors


# -- the base the adapter saw ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("config", "mode", "dq", "cd"),
    [
        (LLAMA, "nf4", False, "fp32"),
        (LLAMA, "nf4", True, "fp32"),
        (LLAMA, "nf4", True, "bf16"),
        (LLAMA, "fp4", False, "fp32"),
        (LLAMA, "int8", False, "fp32"),
        (GPT2, "nf4", True, "fp32"),  # Conv1D: stored (in, out), quantized transposed
    ],
    ids=["nf4", "nf4-dq", "nf4-dq-bf16", "fp4", "int8", "gpt2-nf4-dq"],
)
def test_trained_weight_is_bit_exact_with_what_the_loaded_base_multiplies_by(tmp_path, config, mode, dq, cd):
    import bitsandbytes as bnb
    import torch
    from conftest import build_tiny_model
    from safetensors.torch import load_file

    from qlora_kit.export.merge import trained_weight
    from qlora_kit.model.load import TORCH_DTYPES as LOAD_DTYPES
    from qlora_kit.model.load import load_base
    from qlora_kit.recipe import ModelSpec, QuantSpec

    base = build_tiny_model(config, tmp_path / "base")
    model = load_base(ModelSpec(name=str(base)), QuantSpec(mode, dq, cd))
    source = load_file(base / "model.safetensors")
    conv1d = config["model_type"] == "gpt2"
    checked = 0
    for name, module in model.named_modules():
        if not isinstance(module, (bnb.nn.Linear4bit, bnb.nn.Linear8bitLt)):
            continue
        ours = trained_weight(source[f"{name}.weight"], mode, dq, LOAD_DTYPES[cd], conv1d)
        if conv1d:
            ours = ours.T
        # the weight the layer multiplies by, read off its training forward on the identity (exact)
        module.train()
        module.bias = None
        eye = torch.eye(module.in_features, dtype=LOAD_DTYPES[cd] if mode != "int8" else torch.float32)
        with torch.no_grad():
            used = module(eye).T.float()
        assert torch.equal(ours, used), (name, (ours - used).abs().max())
        if mode != "int8":  # and bitsandbytes' own dequantization of the loaded weight
            loaded = bnb.functional.dequantize_4bit(module.weight.data, module.weight.quant_state).float()
            assert torch.equal(ours, loaded), name
        checked += 1
    assert checked == (7 if config is LLAMA else 4) * 2


# -- merged logits ----------------------------------------------------------------------------------------


@pytest.mark.parametrize(("mode", "dq"), [("nf4", False), ("nf4", True), ("fp4", False), ("int8", False)])
def test_dequantized_export_computes_what_the_adapter_model_computes(tmp_path, llama, llama_adapter, mode, dq):
    import bitsandbytes as bnb
    import torch
    from peft import PeftModel

    from qlora_kit.export.run import export
    from qlora_kit.export.verify import TOLERANCE_ULPS, UNIT_ROUNDOFF
    from qlora_kit.model.load import load_base
    from qlora_kit.recipe import ModelSpec, QuantSpec

    adapter = adapter_for(llama_adapter, tmp_path, llama, mode, dq)
    summary = export(adapter, tmp_path / "out")
    v = summary["verification"]
    assert v["passed"] and v["max_abs_diff"] <= v["tolerance"] and v["kl"] < 1e-6, v
    assert summary["merge_into"] == "dequantized" and summary["merged_tensors"] == 14
    assert {"model.safetensors", "config.json", "README.md"} <= set(summary["files"])

    # independently of the export's own check: each merged weight is, bit for bit, the fp16 rounding of
    # the loaded layer's dequantized weight plus peft's own delta
    model = PeftModel.from_pretrained(load_base(ModelSpec(name=str(llama)), QuantSpec(mode, dq, "fp32")), adapter)
    merged = load_tensors(tmp_path / "out")
    compared = 0
    for name, module in model.named_modules():
        if hasattr(module, "get_delta_weight") and hasattr(module, "base_layer"):
            layer = module.base_layer
            if isinstance(layer, bnb.nn.Linear4bit):
                deq = bnb.functional.dequantize_4bit(layer.weight.data, layer.weight.quant_state).float()
            else:  # what MatMul8bitFp, the CPU training forward, multiplies by
                state = layer.state if layer.weight.CB is None else layer.weight
                deq = state.CB.to(torch.float32).mul_(state.SCB.unsqueeze(1).mul(1.0 / 127.0))
            want = (deq + module.get_delta_weight("default")).half()
            key = name.removeprefix("base_model.model.") + ".weight"
            assert torch.equal(merged[key], want), key
            compared += 1
    assert compared == 14
    assert merged["model.embed_tokens.weight"].dtype == torch.float16
    bound = TOLERANCE_ULPS * UNIT_ROUNDOFF["fp16"]
    assert v["max_abs_diff"] / v["logit_scale"] < bound / 4, "fp16 rounding should sit well inside the tolerance"


def test_merging_into_the_wrong_base_fails_verification_and_writes_nothing(tmp_path, llama, llama_adapter, monkeypatch):
    from qlora_kit.export import merge
    from qlora_kit.export.run import export
    from qlora_kit.export.verify import VerificationError

    adapter = adapter_for(llama_adapter, tmp_path, llama, "nf4", True)
    # a bug that merges into W instead of dequant(quant(W)): the logits move by hundreds of fp16 ulps
    monkeypatch.setattr(merge, "trained_rows", lambda w, mode, dq, dtype, rows=0: [(0, w.to(dtype).float())])
    with pytest.raises(VerificationError, match="differ from the adapter model"):
        export(adapter, tmp_path / "out")
    assert not (tmp_path / "out").exists()
    assert not [p for p in tmp_path.iterdir() if "qlora-kit" in p.name]


def test_original_mode_equals_peft_merge_and_unload_on_the_16bit_base(tmp_path, llama, llama_adapter):
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from qlora_kit.export.run import export

    adapter = adapter_for(llama_adapter, tmp_path, llama, "nf4", True)
    summary = export(adapter, tmp_path / "out", merge_into="original")
    assert summary["verification"]["passed"] and "16-bit" in summary["verification"]["reference"]
    base = AutoModelForCausalLM.from_pretrained(llama, dtype=torch.float32)
    peft_merged = PeftModel.from_pretrained(base, adapter).merge_and_unload().state_dict()
    ours = load_tensors(tmp_path / "out")
    assert set(ours) == set(peft_merged)
    for key, value in peft_merged.items():
        assert torch.equal(ours[key], value.half()), key
    card = (tmp_path / "out" / "README.md").read_text()
    assert "merge mode: `original`" in card and str(llama) in card and "passed" in card


# -- streaming and shards ---------------------------------------------------------------------------------


def test_sharded_base_in_sharded_export_out(tmp_path, llama, llama_adapter):
    import torch
    from transformers import AutoModelForCausalLM

    from qlora_kit.export.run import export

    sharded = tmp_path / "sharded-base"
    AutoModelForCausalLM.from_pretrained(llama).save_pretrained(sharded, max_shard_size="150KB")
    assert len(list(sharded.glob("model-*.safetensors"))) >= 3
    adapter = adapter_for(llama_adapter, tmp_path, sharded, "nf4", True)
    summary = export(adapter, tmp_path / "out", max_shard_size="200KB")
    assert summary["verification"]["passed"]
    out = tmp_path / "out"
    index = json.loads((out / "model.safetensors.index.json").read_text())
    shards = sorted(out.glob("model-*.safetensors"))
    assert summary["shards"] == len(shards) >= 3 and set(index["weight_map"].values()) == {p.name for p in shards}
    tensors = load_tensors(out)
    assert set(index["weight_map"]) == set(tensors)
    assert index["metadata"]["total_size"] == sum(t.numel() * t.element_size() for t in tensors.values())
    for shard in shards:  # split at the limit (a single tensor bigger than it gets a shard of its own)
        assert shard.stat().st_size <= 200_000 + 4096 or len(load_tensors_of(shard)) == 1
    # the same bytes as an export of the unsharded base
    one = adapter_for(llama_adapter, tmp_path / "one", llama, "nf4", True)
    export(one, tmp_path / "out-one", verify=False)
    unsharded = load_tensors(tmp_path / "out-one")
    assert set(unsharded) == set(tensors) and all(torch.equal(unsharded[k], tensors[k]) for k in tensors)


def load_tensors_of(path: Path) -> dict:
    from safetensors.torch import load_file

    return load_file(path)


def test_shard_sizes_read_gb_as_decimal_where_gpu_sizes_read_it_as_binary():
    from qlora_kit.catalog.gpus import parse_binary_bytes
    from qlora_kit.export.shards import parse_decimal_bytes

    assert parse_decimal_bytes("5GB") == 5 * 10**9 and parse_decimal_bytes("200KB") == 200_000
    assert parse_decimal_bytes("500MiB") == 500 * 2**20 and parse_decimal_bytes("2 GiB") == 2 * 2**30
    assert parse_decimal_bytes("1234") == parse_decimal_bytes(1234) == 1234  # a bare number is bytes
    assert parse_binary_bytes("5GB") == parse_binary_bytes("5") == 5 * 2**30  # GPU labels: GB means GiB


# -- ties, other architectures ----------------------------------------------------------------------------


def test_tied_embeddings_stay_tied(tmp_path):
    from conftest import build_tiny_model

    from qlora_kit.export.run import export

    base = build_tiny_model(OPT, tmp_path / "opt")
    assert "lm_head.weight" not in load_tensors(base)
    adapter = write_metadata(make_adapter(base, tmp_path / "adapter", ["q_proj", "v_proj"]), base, "nf4", True)
    summary = export(adapter, tmp_path / "out")
    assert summary["verification"]["passed"] and not summary["notes"]
    assert "lm_head.weight" not in load_tensors(tmp_path / "out")
    assert json.loads((tmp_path / "out" / "config.json").read_text()).get("tie_word_embeddings", True) is True


def test_lora_on_a_tied_head_unties_it_and_says_so(tmp_path):
    import torch
    from conftest import build_tiny_model

    from qlora_kit.export.run import export

    base = build_tiny_model(OPT, tmp_path / "opt")
    adapter = write_metadata(make_adapter(base, tmp_path / "adapter", ["q_proj", "lm_head"]), base, "nf4", True)
    messages: list[str] = []

    class Collect:
        def message(self, text):
            messages.append(text)

        def start(self, phase, total):
            pass

        def advance(self, amount):
            pass

    summary = export(adapter, tmp_path / "out", reporter=Collect())
    assert summary["verification"]["passed"]
    assert any("lm_head.weight" in m and "tied" in m and "unties" in m for m in messages), messages
    tensors = load_tensors(tmp_path / "out")
    assert not torch.equal(tensors["lm_head.weight"], tensors["model.decoder.embed_tokens.weight"])
    assert json.loads((tmp_path / "out" / "config.json").read_text())["tie_word_embeddings"] is False


def test_peft_options_rslora_patterns_embedding_lora_modules_to_save_and_biases(tmp_path):
    from conftest import build_tiny_model

    from qlora_kit.export.run import export

    base = build_tiny_model(OPT, tmp_path / "opt")
    adapter = make_adapter(
        base,
        tmp_path / "adapter",
        ["q_proj", "fc1", "embed_tokens"],  # embed_tokens is tied to lm_head: the export unties them
        lora_alpha=8,
        use_rslora=True,
        alpha_pattern={"q_proj": 32},
        rank_pattern={"layers.1.self_attn.q_proj": 4},
        modules_to_save=["final_layer_norm"],
        bias="lora_only",
    )
    summary = export(write_metadata(adapter, base, "nf4", True), tmp_path / "out")
    assert summary["verification"]["passed"] and summary["merged_tensors"] == 5
    assert any("embed_tokens" in n and "unties" in n for n in summary["notes"])


def test_falcon_is_not_quantized_so_the_export_merges_into_its_16bit_weights(tmp_path):
    from conftest import build_tiny_model

    from qlora_kit.export.run import export

    base = build_tiny_model(FALCON, tmp_path / "falcon")
    adapter = write_metadata(make_adapter(base, tmp_path / "adapter", ["query_key_value", "dense"]), base, "nf4", True)
    summary = export(adapter, tmp_path / "out")
    assert summary["verification"]["passed"]
    assert any("quantizes none" in n for n in summary["notes"])


def test_gpt2_conv1d_export(tmp_path):
    from conftest import build_tiny_model

    from qlora_kit.export.run import export

    base = build_tiny_model(GPT2, tmp_path / "gpt2")
    adapter = write_metadata(make_adapter(base, tmp_path / "adapter", ["c_attn", "c_fc"]), base, "nf4", True)
    summary = export(adapter, tmp_path / "out")
    assert summary["verification"]["passed"] and summary["merged_tensors"] == 4


# -- adapters from other tools ----------------------------------------------------------------------------


def test_plain_peft_adapter_needs_and_takes_base_and_quant(tmp_path, llama, llama_adapter):
    from qlora_kit.errors import UsageError
    from qlora_kit.export.run import export

    adapter = tmp_path / "plain"
    shutil.copytree(llama_adapter, adapter)
    config = json.loads((adapter / "adapter_config.json").read_text())
    config["base_model_name_or_path"] = "/nowhere/base"
    (adapter / "adapter_config.json").write_text(json.dumps(config))
    with pytest.raises(UsageError, match="--quant"):
        export(adapter, tmp_path / "out", base=str(llama))
    with pytest.raises(UsageError, match="double-quant"):
        export(adapter, tmp_path / "out", base=str(llama), quant="nf4")
    with pytest.raises(UsageError, match="cannot find the base model '/nowhere/base'"):
        export(adapter, tmp_path / "out", quant="nf4", double_quant=True)
    summary = export(adapter, tmp_path / "out", base=str(llama), quant="nf4", double_quant=True, compute_dtype="fp32")
    assert summary["verification"]["passed"] and summary["quant"]["mode"] == "nf4"
    # adapter_config.json's base_model_name_or_path is the fallback base
    config["base_model_name_or_path"] = str(llama)
    (adapter / "adapter_config.json").write_text(json.dumps(config))
    summary = export(adapter, tmp_path / "out2", quant="int8", compute_dtype="fp32")
    assert summary["verification"]["passed"] and summary["base"] == str(llama)


def test_qlora_kit_metadata_wins_and_contradictions_are_refused(tmp_path, llama, llama_adapter):
    from qlora_kit.errors import UsageError
    from qlora_kit.export.run import export

    adapter = adapter_for(llama_adapter, tmp_path, llama, "nf4", True)
    with pytest.raises(UsageError, match="quant=int8 contradicts"):
        export(adapter, tmp_path / "out", quant="int8")


def test_a_qlora_kit_training_run_exports(tmp_path):
    from test_train import Quiet, demo_recipe

    from qlora_kit.export.run import export
    from qlora_kit.train.loop import train

    run = tmp_path / "run"
    train(demo_recipe(run, max_steps=1, **{"data.eval_fraction": 0}), Quiet())
    summary = export(run, tmp_path / "merged")
    assert summary["verification"]["passed"] and summary["base"] == str(run / "random-init-base")
    assert summary["quant"] == {"mode": "nf4", "double_quant": True, "compute_dtype": "fp32"}
    assert {"tokenizer.json", "tokenizer_config.json"} <= set(summary["files"])


def test_the_export_loads_without_peft_or_bitsandbytes(tmp_path, llama, llama_adapter):
    from qlora_kit.export.run import export

    export(adapter_for(llama_adapter, tmp_path, llama, "nf4", True), tmp_path / "out", verify=False)
    code = (
        "import sys; sys.modules['peft'] = None; sys.modules['bitsandbytes'] = None\n"
        "import torch; from transformers import AutoModelForCausalLM\n"
        f"m = AutoModelForCausalLM.from_pretrained({str(tmp_path / 'out')!r})\n"
        "assert m.dtype == torch.float16, m.dtype\n"
        "print(m(input_ids=torch.tensor([[1, 2, 3]])).logits.shape)\n"
    )
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert run.returncode == 0 and "torch.Size([1, 3, 256])" in run.stdout, run.stderr[-2000:]


# -- bad input --------------------------------------------------------------------------------------------


def test_missing_adapter_files(tmp_path, llama, llama_adapter):
    from qlora_kit.errors import UsageError
    from qlora_kit.export.run import export

    with pytest.raises(UsageError, match="does not exist"):
        export(tmp_path / "nope", tmp_path / "out")
    (tmp_path / "empty").mkdir()
    with pytest.raises(UsageError, match=r"adapter_config\.json is missing"):
        export(tmp_path / "empty", tmp_path / "out")
    adapter = adapter_for(llama_adapter, tmp_path, llama, "nf4", True)
    (adapter / "adapter_model.safetensors").unlink()
    with pytest.raises(UsageError, match=r"no adapter_model\.safetensors"):
        export(adapter, tmp_path / "out")


def test_adapter_base_mismatch(tmp_path, llama, llama_adapter):
    from conftest import build_tiny_model

    from qlora_kit.errors import UsageError
    from qlora_kit.export.run import export

    other = build_tiny_model({**LLAMA, "intermediate_size": 320}, tmp_path / "other")
    adapter = adapter_for(llama_adapter, tmp_path, llama, "nf4", True)
    with pytest.raises(UsageError, match="not the model the adapter was trained on"):
        export(adapter, tmp_path / "out", base=str(other))
    (adapter / "qlora_kit.json").unlink()  # a plain adapter: nothing to fingerprint, the shapes disagree
    with pytest.raises(UsageError, match="do not fit the base weight"):
        export(adapter, tmp_path / "out", base=str(other), quant="nf4", double_quant=True)
    assert not (tmp_path / "out").exists()


def test_existing_output_needs_force(tmp_path, llama, llama_adapter):
    from qlora_kit.errors import UsageError
    from qlora_kit.export.run import export

    adapter = adapter_for(llama_adapter, tmp_path, llama, "nf4", True)
    out = tmp_path / "out"
    out.mkdir()
    (out / "precious.txt").write_text("mine")
    with pytest.raises(UsageError, match="not empty"):
        export(adapter, out, verify=False)
    assert (out / "precious.txt").read_text() == "mine"
    export(adapter, out, verify=False, force=True)
    assert not (out / "precious.txt").exists() and (out / "model.safetensors").is_file()
    with pytest.raises(UsageError, match="would overwrite"):
        export(adapter, adapter, verify=False, force=True)


def test_full_disk_is_refused_before_writing(tmp_path, llama, llama_adapter, monkeypatch):
    import qlora_kit.export.run as ex
    from qlora_kit.errors import UsageError

    adapter = adapter_for(llama_adapter, tmp_path, llama, "nf4", True)
    full = types.SimpleNamespace(total=10**12, used=10**12 - 4096, free=4096)
    monkeypatch.setattr(ex.shutil, "disk_usage", lambda path: full)
    with pytest.raises(UsageError, match=r"not enough free disk space.*needs about"):
        ex.export(adapter, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_pickle_checkpoints_are_refused_unless_allowed(tmp_path, llama, llama_adapter):
    import torch
    from safetensors.torch import load_file

    from qlora_kit.errors import UsageError
    from qlora_kit.export.run import export

    pickled = tmp_path / "pickled"
    pickled.mkdir()
    shutil.copy(llama / "config.json", pickled / "config.json")
    torch.save(load_file(llama / "model.safetensors"), pickled / "pytorch_model.bin")
    adapter = adapter_for(llama_adapter, tmp_path, pickled, "nf4", True)
    with pytest.raises(UsageError, match="pickle"):
        export(adapter, tmp_path / "out")
    summary = export(adapter, tmp_path / "out", allow_pickle=True, verify=False)
    assert summary["merged_tensors"] == 14


def test_interrupted_export_leaves_nothing_at_out(tmp_path, llama, llama_adapter, monkeypatch):
    from qlora_kit.export import merge
    from qlora_kit.export.run import export

    adapter = adapter_for(llama_adapter, tmp_path, llama, "nf4", True)
    written = []
    real_write = merge.ShardWriter.write

    def write(self, name, tensor):
        written.append(name)
        if len(written) == 5:
            raise KeyboardInterrupt
        real_write(self, name, tensor)

    monkeypatch.setattr(merge.ShardWriter, "write", write)
    with pytest.raises(KeyboardInterrupt):
        export(adapter, tmp_path / "out")
    assert not (tmp_path / "out").exists()
    assert [p.name for p in tmp_path.iterdir()] == [adapter.name]


def test_verification_is_skipped_and_says_why_when_it_would_not_fit(tmp_path, llama, llama_adapter, monkeypatch):
    from qlora_kit.export import run as export_mod
    from qlora_kit.export import verify as verify_mod

    adapter = adapter_for(llama_adapter, tmp_path, llama, "nf4", True)
    monkeypatch.setattr(verify_mod, "_available_memory_bytes", lambda: 2**20)  # 1 MiB free
    summary = export_mod.export(adapter, tmp_path / "out")
    assert summary["verification"] is None
    assert "pass --verify" in summary["verification_skipped"]
    assert "verification: skipped (it loads the model twice" in (tmp_path / "out" / "README.md").read_text()
    forced = export_mod.export(adapter, tmp_path / "forced", verify=True)  # asked for: runs regardless
    assert forced["verification"]["passed"] and forced["verification_skipped"] is None
    monkeypatch.setattr(verify_mod, "_available_memory_bytes", lambda: 2**40)
    roomy = export_mod.export(adapter, tmp_path / "roomy")
    assert roomy["verification"]["passed"]
