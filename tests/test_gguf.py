"""GGUF export: q8_0 bytes against gguf-py's reference, round trips through transformers' GGUF reader
(logits against the adapter model, the tokenizer's ids), the metadata llama.cpp reads, and refusals."""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import pytest
from conftest import TINY_LLAMA
from test_export import make_adapter, write_metadata

pytest.importorskip("gguf")

DEMO = Path(__file__).resolve().parents[1] / "qlora_kit" / "resources" / "tiny-demo"
TOKENIZER = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json")


@pytest.fixture(autouse=True)
def _quiet(quiet_hf):
    pass


def base_with_tokenizer(tiny_model_dir, config: dict, tmp_path: Path) -> Path:
    """A tiny random-init base (vocab 512) with the demo's byte-level BPE tokenizer beside it."""
    base = tmp_path / "base"
    shutil.copytree(tiny_model_dir({**config, "vocab_size": 512}), base)
    for name in TOKENIZER:
        shutil.copy(DEMO / name, base / name)
    return base


def reader(out: Path, gguf_type: str):
    import gguf

    return gguf.GGUFReader(out / f"model-{gguf_type}.gguf")


def field(r, key: str):
    f = r.fields[key]
    return f.contents()


def test_q8_0_is_bit_exact_with_gguf_py_and_within_its_step():
    import gguf
    import numpy as np
    import torch

    from qlora_kit.export.gguf import dequantize_q8_0, quantize_q8_0

    x = torch.randn(64, 96, generator=torch.Generator().manual_seed(0)) * 0.05
    x[0, :32] = 0  # an all-zero block: scale 0
    x[1, :32] = (torch.arange(32) + 0.5) / 31  # quotients at exact halves: rounded away from zero
    mine = quantize_q8_0(x.reshape(-1)).numpy()
    ref = gguf.quants.quantize(x.numpy(), gguf.GGMLQuantizationType.Q8_0).reshape(-1)
    assert mine.nbytes == x.numel() // 32 * 34
    assert np.array_equal(mine, ref)
    back = dequantize_q8_0(torch.from_numpy(mine)).reshape(-1, 32)
    blocks = x.reshape(-1, 32)
    step = blocks.abs().amax(1, keepdim=True) / 127
    # half a step, plus the fp16 rounding of the scale (2^-11 relative) times up to 127 steps
    assert ((back - blocks).abs() <= step * (0.5 + 127 * 2.0**-11) * 1.0001).all()
    assert (back[0] == 0).all()


@pytest.mark.parametrize("gguf_type", ["f16", "q8_0"])
def test_demo_run_round_trips_through_transformers(tmp_path, demo_adapter, gguf_type):
    """An NF4 double-quant run of the demo recipe: the GGUF read back by transformers computes the
    adapter model's logits within the type's rounding, and its tokenizer encodes like the original."""
    from qlora_kit.export.gguf import export_gguf

    out = tmp_path / "gguf"
    summary = export_gguf(demo_adapter, out, gguf_type=gguf_type, verify=True)
    v = summary["verification"]
    assert v["passed"] and v["reference"] == "adapter on the nf4 double-quant base"
    assert v["tokenizer"] == {"same_ids": True, "tokens": v["tokenizer"]["tokens"]}
    assert v["max_abs_diff"] > 0  # rounded to the type, not a copy of the fp32 weights
    assert summary["files"] == ["README.md", f"model-{gguf_type}.gguf"]
    card = (out / "README.md").read_text()
    assert f"max |logit diff| {v['max_abs_diff']:.4g}" in card and "chat template included" in card
    r = reader(out, gguf_type)
    assert field(r, "general.architecture") == "llama"
    assert field(r, "llama.block_count") == 4 and field(r, "llama.attention.head_count_kv") == 2
    assert field(r, "tokenizer.ggml.model") == "gpt2" and len(field(r, "tokenizer.ggml.merges")) == 250
    assert field(r, "tokenizer.ggml.bos_token_id") == 0 and field(r, "tokenizer.ggml.eos_token_id") == 1
    assert "<|assistant|>" in field(r, "tokenizer.chat_template")
    types = {t.name: t.tensor_type.name for t in r.tensors}
    assert types["output_norm.weight"] == "F32"
    assert types["blk.0.attn_q.weight"] == types["token_embd.weight"] == gguf_type.upper()
    assert set(types) >= {"output.weight", "blk.3.ffn_down.weight", "blk.0.attn_norm.weight"}


def test_without_llamas_row_order_the_round_trip_fails_and_nothing_is_written(tmp_path, tiny_model_dir, monkeypatch):
    """The query/key rows must be in llama.cpp's order (transformers undoes it on reading). A model
    with weights large enough for attention to matter (init 0.2, logits ~11): the right order passes
    well inside the tolerance, the checkpoint's own order misses it by orders of magnitude."""
    from qlora_kit.export import gguf
    from qlora_kit.export.verify import VerificationError

    base = base_with_tokenizer(tiny_model_dir, {**TINY_LLAMA, "initializer_range": 0.2}, tmp_path)
    adapter = write_metadata(make_adapter(base, tmp_path / "adapter"), base, "none")
    v = gguf.export_gguf(adapter, tmp_path / "ok", verify=True)["verification"]
    assert v["max_abs_diff"] < v["tolerance"] / 2
    monkeypatch.setitem(gguf.ARCHITECTURES, "llama", ("llama", False))
    with pytest.raises(VerificationError):
        gguf.export_gguf(adapter, tmp_path / "out", verify=True)
    assert not (tmp_path / "out").exists() and not (tmp_path / ".out.qlora-kit-partial").exists()


@pytest.mark.parametrize(
    ("model_type", "extra", "quant"),
    [("qwen2", {}, "int8"), ("qwen3", {"head_dim": 128}, "none"), ("mistral", {}, "fp4")],
)
def test_other_families_round_trip(tmp_path, tiny_model_dir, model_type, extra, quant):
    """Qwen2 (q/k/v biases, no row reordering), Qwen3 (q/k norms; head_dim 128, the only one transformers
    reads back from a GGUF: it takes Qwen3Config's default) and Mistral (llama's layout), with a
    plain peft adapter on int8, 16-bit and FP4 bases."""
    from qlora_kit.export.gguf import export_gguf

    base = base_with_tokenizer(tiny_model_dir, {**TINY_LLAMA, "model_type": model_type, **extra}, tmp_path)
    adapter = write_metadata(make_adapter(base, tmp_path / "adapter"), base, quant)
    summary = export_gguf(adapter, tmp_path / "out", gguf_type="q8_0", verify=True)
    assert summary["verification"]["passed"] and summary["merged_tensors"] == 14
    arch = "llama" if model_type == "mistral" else model_type
    r = reader(tmp_path / "out", "q8_0")
    assert field(r, "general.architecture") == arch
    names = {t.name for t in r.tensors}
    if model_type == "qwen2":
        assert "blk.1.attn_k.bias" in names
    if model_type == "qwen3":
        assert "blk.1.attn_q_norm.weight" in names


def test_unsupported_architectures_and_rope_scaling_get_one_line(tmp_path, tiny_model_dir):
    from qlora_kit.errors import UsageError
    from qlora_kit.export.gguf import export_gguf

    gpt2 = {"model_type": "gpt2", "n_embd": 64, "n_layer": 1, "n_head": 2, "vocab_size": 512}
    base = base_with_tokenizer(tiny_model_dir, gpt2, tmp_path)
    adapter = write_metadata(make_adapter(base, tmp_path / "adapter", fan_in_fan_out=True), base, "none")
    with pytest.raises(UsageError, match="supports llama, mistral, qwen2, qwen3 models, not gpt2"):
        export_gguf(adapter, tmp_path / "out")
    scaled = {**TINY_LLAMA, "rope_scaling": {"rope_type": "linear", "factor": 2.0}}
    base2 = base_with_tokenizer(tiny_model_dir, scaled, tmp_path / "scaled")
    adapter2 = write_metadata(make_adapter(base2, tmp_path / "adapter2"), base2, "none")
    with pytest.raises(UsageError, match="scales its rotary embedding"):
        export_gguf(adapter2, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_cli_writes_the_file_and_refuses_without_gguf(tmp_path, demo_adapter, monkeypatch, capsys):
    from qlora_kit.cli import main

    out = tmp_path / "out"
    assert (
        main(["export", "--adapter", str(demo_adapter), "--out", str(out), "--format", "gguf", "--gguf-type", "q8_0"])
        == 0
    )
    printed, err = capsys.readouterr()
    assert "Converting" not in err and "it/s" not in err, err  # transformers' tqdm bar, under ours
    assert (
        "into one GGUF file" in printed and "model-q8_0.gguf" in printed and "verification: max |logit diff|" in printed
    )
    assert (out / "model-q8_0.gguf").stat().st_size > 0
    monkeypatch.setitem(sys.modules, "gguf", None)
    code = main(["export", "--adapter", str(demo_adapter), "--out", str(tmp_path / "o2"), "--format", "gguf"])
    err = capsys.readouterr().err
    assert code != 0 and "pip install 'qlora-kit[gguf]'" in err and "Traceback" not in err
    assert not (tmp_path / "o2").exists()


def test_missing_tokenizer_json_is_refused(tmp_path, tiny_model_dir):
    from qlora_kit.errors import UsageError
    from qlora_kit.export.gguf import export_gguf

    base = base_with_tokenizer(tiny_model_dir, TINY_LLAMA, tmp_path)
    (base / "tokenizer.json").unlink()
    adapter = write_metadata(make_adapter(base, tmp_path / "adapter"), base, "none")
    with pytest.raises(UsageError, match=r"no tokenizer\.json"):
        export_gguf(adapter, tmp_path / "out")
    assert json.loads((adapter / "adapter_config.json").read_text())["peft_type"] == "LORA"
