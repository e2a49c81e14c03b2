"""qlora-kit eval on CPU with a real NF4 base: perplexity is exp of the token-weighted mean loss over the
learned tokens (checked against transformers' own loss, example by example), the held-out figure is the
one training reported, the base's figures sit beside the adapter's, and bad input is one line."""

from __future__ import annotations

import json
import math

import pytest

from qlora_kit.errors import UsageError

ROWS = [
    {"prompt": "Q: Who said it?\nA:", "response": " Someone wise, long ago."},
    {"prompt": "Finish the quote: Two things are infinite:", "response": " the universe and human stupidity."},
    {"prompt": "Say hello.", "response": " Hello!"},
    {"prompt": "A short one:", "response": " Less is more, and more is less when it is too much."},
    {"prompt": "What is the sea?", "response": " Salt water, mostly, and a great deal of it."},
]


pytestmark = pytest.mark.usefixtures("quiet_hf")


@pytest.fixture()
def qa_file(tmp_path):
    path = tmp_path / "qa.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in ROWS))
    return path


def independent_loss(model, tokenizer, rows) -> tuple[float, int]:
    """Token-weighted mean of transformers' own loss, one example at a time, prompt tokens masked."""
    import torch

    total, tokens = 0.0, 0
    with torch.no_grad():
        for row in rows:
            prompt = tokenizer(row["prompt"])["input_ids"]  # with BOS
            response = tokenizer(row["response"], add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
            ids = torch.tensor([prompt + response])
            labels = torch.tensor([[-100] * len(prompt) + response])
            n = len(response)  # the first response token is predicted from the prompt's last
            total += float(model(input_ids=ids, labels=labels).loss) * n
            tokens += n
    return total / tokens, tokens


def test_perplexity_is_exp_of_the_mean_token_loss_for_adapter_and_base(loaded, qa_file):
    from qlora_kit.infer.evaluate import eval_data, score

    model, tokenizer, info = loaded
    recipe = {"data": {"path": "unused", "format": "prompt_response", "max_seq_len": 64, "eval_fraction": 0.5}}
    what = eval_data(info, str(qa_file), None, recipe)
    assert what.spec.path == str(qa_file) and what.spec.format == "prompt_response" and not what.held_out
    result = score(model, tokenizer, info, what, batch_size=2)  # padded batches of unequal length
    assert result["samples"] == len(ROWS) and set(result["models"]) == {"adapter", "base"}
    want_loss, want_tokens = independent_loss(model, tokenizer, ROWS)
    with model.disable_adapter():
        want_base, _ = independent_loss(model, tokenizer, ROWS)
    assert result["tokens"] == want_tokens
    for name, want in (("adapter", want_loss), ("base", want_base)):
        got = result["models"][name]
        assert got["loss"] == pytest.approx(want, rel=1e-5)
        assert got["perplexity"] == pytest.approx(math.exp(want), rel=1e-5)
    assert abs(want_loss - want_base) > 1e-3  # the adapter moved the loss, so the two columns differ


def test_held_out_split_gives_the_eval_loss_training_reported(loaded, demo_adapter, tmp_path):
    from qlora_kit.adapter import read_metadata
    from qlora_kit.data import load as datalib
    from qlora_kit.export.run import export
    from qlora_kit.infer.evaluate import eval_data, score
    from qlora_kit.infer.load import load_for_inference

    model, tokenizer, info = loaded
    what = eval_data(info)
    assert what.held_out and what.spec.path == "builtin:quotes" and what.spec.packing
    result = score(model, tokenizer, info, what)
    metadata = read_metadata(demo_adapter)
    assert result["models"]["adapter"]["loss"] == pytest.approx(metadata.summary["eval_loss"], rel=1e-5)
    assert result["models"]["base"]["loss"] > result["models"]["adapter"]["loss"]  # 8 steps of training helped
    spec = what.spec
    held = datalib.tokenize(spec, datalib.load_raw(spec), tokenizer, seed=info.recipe["train"]["seed"]).eval
    assert result["samples"] == len(held) and not any("not held out" in n for n in result["notes"])
    fewer = score(model, tokenizer, info, what, max_samples=3)
    assert fewer["samples"] == 3 and fewer["tokens"] < result["tokens"]
    # the merged export, told the recipe, scores the same held-out rows to within its fp16 rounding
    export(demo_adapter, tmp_path / "merged", verify=False)
    merged, merged_tok, merged_info = load_for_inference(model=str(tmp_path / "merged"))
    with pytest.raises(UsageError, match="pass --data"):
        eval_data(merged_info)
    alone = score(merged, merged_tok, merged_info, eval_data(merged_info, recipe=metadata.recipe))
    assert set(alone["models"]) == {"model"} and alone["tokens"] == result["tokens"]
    assert alone["models"]["model"]["loss"] == pytest.approx(result["models"]["adapter"]["loss"], rel=1e-3)


def test_training_data_without_a_held_out_split_is_flagged(loaded):
    from qlora_kit.infer.evaluate import eval_data, score

    model, tokenizer, info = loaded
    what = eval_data(info, split="train")  # an explicit split: the whole file, not held out
    assert not what.held_out and what.spec.eval_fraction == 0
    result = score(model, tokenizer, info, what, max_samples=8)
    assert "trained on, not held out" in result["notes"][0]


def test_cli_json_and_table(demo_adapter, qa_file, tmp_path, capsys):
    from qlora_kit.cli import main

    recipe = tmp_path / "qa.yaml"
    recipe.write_text("model:\n  name: x\ndata:\n  path: unused\n  format: prompt_response\n  max_seq_len: 64\n")
    args = ["eval", "--adapter", str(demo_adapter), "--data", str(qa_file), "--recipe", str(recipe)]
    assert main([*args, "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["samples"] == len(ROWS) and result["format"] == "prompt_response"
    adapter, base = result["models"]["adapter"], result["models"]["base"]
    assert adapter["perplexity"] == pytest.approx(math.exp(adapter["loss"]), rel=1e-9)
    from qlora_kit.ui import render_scores

    render_scores(result)
    table = capsys.readouterr().out
    assert f"{len(ROWS)} samples" in table and f"{adapter['loss']:.4f}" in table and f"{base['loss']:.4f}" in table


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--adapter", "{tmp}/nope"], "adapter directory {tmp}/nope does not exist"),
        (["--adapter", "{run}", "--data", "{tmp}/missing.jsonl"], "data file {tmp}/missing.jsonl does not exist"),
        (["--adapter", "{run}", "--max-samples", "0"], "--max-samples must be at least 1"),
        (["--model", "{tmp}"], "is not a model directory"),
    ],
    ids=["missing-adapter", "missing-data", "zero-samples", "not-a-model"],
)
def test_cli_bad_input_is_one_line(demo_adapter, tmp_path, capsys, args, message):
    from qlora_kit.cli import main

    fill = {"tmp": str(tmp_path), "run": str(demo_adapter)}
    code = main(["eval", *(a.format(**fill) for a in args)])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1 and "Traceback" not in err, err
    assert err.startswith("error: ") and message.format(**fill) in err
