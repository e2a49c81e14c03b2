"""qlora-kit generate on CPU with a real NF4 base: deterministic decoding, the adapter's effect, a merged
export that generates what its adapter generates, the chat-template rule, streaming, and bad input."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from qlora_kit.errors import UsageError

PROMPT = "Two things are infinite: "


pytestmark = pytest.mark.usefixtures("quiet_hf")


@pytest.fixture(scope="module")
def shaken_adapter(demo_adapter, tmp_path_factory):
    """The demo run with its LoRA factors replaced by seeded noise. Eight steps teach the demo model only
    to repeat one token, which any model might; a random adapter moves the logits everywhere, so equal
    greedy tokens mean equal models."""
    import torch
    from safetensors.torch import load_file, save_file

    out = tmp_path_factory.mktemp("shaken") / "run"
    shutil.copytree(demo_adapter, out, ignore=shutil.ignore_patterns("checkpoints"))
    tensors = load_file(out / "adapter_model.safetensors")
    gen = torch.Generator().manual_seed(3)
    save_file(
        {k: torch.randn(v.shape, generator=gen) * 0.1 for k, v in tensors.items()}, out / "adapter_model.safetensors"
    )
    return out


def greedy(n: int = 12):
    from qlora_kit.infer.generate import GenerateSpec

    return GenerateSpec(max_new_tokens=n, temperature=0.0)


def test_the_adapter_is_loaded_as_trained(loaded, demo_adapter):
    import bitsandbytes as bnb
    import torch

    model, _, info = loaded
    assert info.adapter == str(demo_adapter) and info.base == str(demo_adapter / "random-init-base")
    assert (info.quant.mode, info.quant.double_quant, info.quant.compute_dtype) == ("nf4", True, "fp32")
    assert info.recipe is not None and info.recipe["data"]["path"] == "builtin:quotes"
    assert not model.training and model.config.use_cache
    four_bit = [m for m in model.modules() if isinstance(m, bnb.nn.Linear4bit)]
    assert len(four_bit) == 28 and all(m.weight.quant_state.nested for m in four_bit)
    # the same k-bit preparation as training: the unquantized parameters are fp32
    assert model.get_input_embeddings().weight.dtype == torch.float32


def test_greedy_is_deterministic_streams_what_it_returns_and_the_adapter_changes_it(loaded):
    from qlora_kit.infer.generate import compare, generate, prompt_ids

    model, tokenizer, _ = loaded
    ids = prompt_ids(tokenizer, PROMPT, chat=False)
    assert ids[0] == tokenizer.bos_token_id  # as data.tokenize tokenizes text for training
    pieces: list[tuple[str, str]] = []
    first = compare(model, tokenizer, ids, greedy(), lambda label, piece: pieces.append((label, piece)))
    again = generate(model, tokenizer, ids, greedy())
    assert first["adapter"].token_ids == again.token_ids
    assert len(again.token_ids) >= 1 and first["adapter"].prompt_tokens == len(ids)
    assert first["adapter"].token_ids != first["base"].token_ids
    for label in ("adapter", "base"):
        streamed = "".join(p for lab, p in pieces if lab == label)
        assert streamed.strip() == first[label].text.strip()
    assert [lab for lab, p in pieces if p == ""][:2] == ["adapter", "base"]  # each announced before its text
    # disable_adapter restores the base exactly: the adapter's output afterwards is unchanged
    assert generate(model, tokenizer, ids, greedy()).token_ids == again.token_ids


def test_sampling_repeats_with_a_seed_and_varies_across_seeds(loaded):
    from qlora_kit.infer.generate import GenerateSpec, generate, prompt_ids

    model, tokenizer, _ = loaded
    ids = prompt_ids(tokenizer, PROMPT, chat=False)
    hot = [GenerateSpec(max_new_tokens=12, temperature=1.5, top_p=1.0, seed=s) for s in (7, 7, 8)]
    # the base's output is closer to uniform over 512 tokens: two seeds practically never agree
    with model.disable_adapter():
        a, b, c = (generate(model, tokenizer, ids, spec).token_ids for spec in hot)
    assert a == b and a != c


def test_a_merged_export_generates_the_adapters_greedy_tokens(shaken_adapter, tmp_path):
    from qlora_kit.export.run import export
    from qlora_kit.infer.generate import compare, generate, prompt_ids
    from qlora_kit.infer.load import load_for_inference

    model, tokenizer, _ = load_for_inference(adapter=str(shaken_adapter))
    export(shaken_adapter, tmp_path / "merged", verify=False)  # fp16, into the dequantized NF4 weights
    merged, merged_tok, info = load_for_inference(model=str(tmp_path / "merged"))
    assert info.adapter is None and info.quant.mode == "none"
    ids = prompt_ids(tokenizer, PROMPT, chat=False)
    assert prompt_ids(merged_tok, PROMPT, chat=False) == ids
    want = generate(model, tokenizer, ids, greedy(20)).token_ids
    assert len(want) == 20 and len(set(want)) > 4  # no early EOS, not one token repeated
    assert generate(merged, merged_tok, ids, greedy(20)).token_ids == want
    with pytest.raises(UsageError, match="--compare-base needs an adapter"):
        compare(merged, merged_tok, ids, greedy())


def test_an_int8_adapter_runs_its_training_forward_and_matches_its_export(tmp_path):
    """LLM.int8 on the CPU trains with dequantize + fp32 matmul but infers with quantized activations:
    the loader keeps the training forward, so the adapter and its merged export agree."""
    import bitsandbytes as bnb
    import torch
    from conftest import build_tiny_model
    from test_export import LLAMA, make_adapter, write_metadata

    from qlora_kit.catalog.bundled import resolve
    from qlora_kit.export.run import export
    from qlora_kit.infer.generate import generate
    from qlora_kit.infer.load import load_for_inference

    base = build_tiny_model(LLAMA, tmp_path / "base")
    adapter = write_metadata(make_adapter(base, tmp_path / "adapter"), base, "int8")
    for item in Path(resolve("builtin:tiny-demo")).iterdir():  # a tokenizer (ids below the tiny vocab)
        if item.name != "config.json":
            shutil.copy(item, adapter / item.name)
    model, tokenizer, info = load_for_inference(adapter=str(adapter))
    assert info.quant.mode == "int8"
    export(adapter, tmp_path / "merged", dtype="fp32", verify=False)
    merged, _, _ = load_for_inference(model=str(tmp_path / "merged"))
    ids = [0, 17, 42, 99, 200]
    want = generate(model, tokenizer, ids, greedy(16)).token_ids
    assert len(set(want)) > 4 and generate(merged, tokenizer, ids, greedy(16)).token_ids == want
    x = torch.tensor([ids + list(range(5, 12))])
    with torch.no_grad():
        exported, adapted = merged(input_ids=x).logits, model(input_ids=x).logits
        int8 = [m for m in model.modules() if isinstance(m, bnb.nn.Linear8bitLt)]  # not peft's wrappers
        assert len(int8) == 14 and all(m.training for m in int8)
        for m in int8:
            m.eval()  # the inference forward: activations quantized too
        quantized_activations = model(input_ids=x).logits
    assert float((adapted - exported).abs().max()) < 1e-5  # measured 5.4e-7 (logit scale 0.8)
    assert float((quantized_activations - exported).abs().max()) > 1e-3  # measured 7.2e-3


def test_chat_template_rule(loaded):
    from qlora_kit.infer.generate import prompt_ids, uses_chat_template
    from qlora_kit.infer.load import LoadedInfo

    _, tokenizer, info = loaded
    assert tokenizer.chat_template  # the demo tokenizer has a template ...
    assert not uses_chat_template(tokenizer, info)  # ... but the adapter was trained on plain text
    chat_recipe = {**info.recipe, "data": {**info.recipe["data"], "format": "chat"}}
    assert uses_chat_template(tokenizer, LoadedInfo(info.base, info.quant, info.adapter, chat_recipe))
    assert uses_chat_template(tokenizer, LoadedInfo("org/Model-7B-Instruct", info.quant))
    assert uses_chat_template(tokenizer, LoadedInfo("google/gemma-2b-it", info.quant))
    assert not uses_chat_template(tokenizer, LoadedInfo("merged/", info.quant))
    assert not uses_chat_template(tokenizer, LoadedInfo("org/Model-7B-Instruct", info.quant), chat=False)
    rendered = tokenizer.decode(prompt_ids(tokenizer, "hello", chat=True))
    assert "<|user|>" in rendered and rendered.rstrip().endswith("<|assistant|>")


def test_prompt_longer_than_the_context_is_refused_and_new_tokens_are_capped(loaded):
    from qlora_kit.infer.generate import GenerateSpec, context_length, generate, prompt_ids

    model, tokenizer, _ = loaded
    context = context_length(model)
    assert context == 256
    long = prompt_ids(tokenizer, "the sea " * 400, chat=False)
    assert len(long) > context
    with pytest.raises(UsageError, match=f"the prompt is {len(long):,} tokens, the model's context is 256"):
        generate(model, tokenizer, long, greedy())
    near = long[: context - 3]
    with model.disable_adapter():
        out = generate(model, tokenizer, near, GenerateSpec(max_new_tokens=50))
    assert len(out.token_ids) <= 3 and "at most 3 tokens" in out.notes[0]
    for bad, match in ((GenerateSpec(max_new_tokens=0), "max-new-tokens"), (GenerateSpec(top_p=0.0), "top-p")):
        with pytest.raises(UsageError, match=match):
            generate(model, tokenizer, near[:4], bad)


def test_missing_adapter_and_adapter_for_another_base(demo_adapter, tmp_path):
    from conftest import build_tiny_model

    from qlora_kit.infer.load import load_for_inference

    with pytest.raises(UsageError, match="does not exist"):
        load_for_inference(adapter=str(tmp_path / "nope"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(UsageError, match=r"adapter_config\.json is missing"):
        load_for_inference(adapter=str(tmp_path / "empty"))
    config = json.loads((demo_adapter / "random-init-base" / "config.json").read_text())
    other = build_tiny_model({**config, "intermediate_size": 512}, tmp_path / "other", dtype="float32")
    with pytest.raises(UsageError, match="not the model the adapter was trained on"):
        load_for_inference(adapter=str(demo_adapter), base=str(other))
    plain = tmp_path / "plain"  # no qlora_kit.json: nothing to fingerprint, the shapes disagree
    plain.mkdir()
    for name in ("adapter_config.json", "adapter_model.safetensors"):
        shutil.copy(demo_adapter / name, plain / name)
    with pytest.raises(UsageError, match=r"no qlora_kit\.json"):
        load_for_inference(adapter=str(plain), base=str(other))
    with pytest.raises(UsageError, match=r"does not fit the base .*: size mismatch for"):
        load_for_inference(adapter=str(plain), base=str(other), quant="nf4", double_quant=True)


# -- the command ----------------------------------------------------------------------------------------


def cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "qlora_kit", *args], capture_output=True, text=True, timeout=300)


def test_cli_streams_the_adapters_and_the_bases_completions(demo_adapter, loaded):
    from qlora_kit.infer.generate import compare, prompt_ids

    model, tokenizer, _ = loaded
    prompt = "[b]Rich markup[/b] and :x: stay as typed: "
    out = cli("generate", "--adapter", str(demo_adapter), "--prompt", prompt, "--max-new-tokens", "8", "--compare-base")
    assert out.returncode == 0, out.stderr
    want = compare(model, tokenizer, prompt_ids(tokenizer, prompt, chat=False), greedy(8))
    assert out.stdout.startswith("adapter\n") and "\nbase\n" in out.stdout
    adapted, base = out.stdout.removeprefix("adapter\n").split("\nbase\n")
    assert adapted == prompt + want["adapter"].text
    assert base == prompt + want["base"].text + "\n"


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--adapter", "{tmp}/nope", "--prompt", "x"], "adapter directory {tmp}/nope does not exist"),
        (["--adapter", "{run}", "--prompt-file", "{tmp}/long.txt"], "the prompt is"),
        (["--adapter", "{run}"], "give exactly one of --prompt and --prompt-file"),
        (["--adapter", "{run}", "--model", "{run}", "--prompt", "x"], "not allowed with argument"),
        (["--adapter", "{run}", "--prompt", "x", "--temperature", "-1"], "--temperature must be >= 0"),
    ],
    ids=["missing-adapter", "prompt-too-long", "no-prompt", "adapter-and-model", "bad-temperature"],
)
def test_cli_bad_input_is_one_line(demo_adapter, tmp_path, capsys, args, message):
    from qlora_kit.cli import main

    (tmp_path / "long.txt").write_text("the sea " * 400)
    fill = {"tmp": str(tmp_path), "run": str(demo_adapter)}
    code = main(["generate", *(a.format(**fill) for a in args)])
    out, err = capsys.readouterr()
    assert out == ""  # nothing streamed before the refusal
    assert code == 2 and err.count("\n") == 1 and "Traceback" not in err, err
    assert err.startswith("error: ") and message.format(**fill) in err


def test_help_lists_generate_and_eval():
    out = subprocess.run([sys.executable, "-m", "qlora_kit", "--help"], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0 and "generate" in out.stdout and "eval" in out.stdout
