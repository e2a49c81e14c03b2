"""Recipes and data that are hostile, broken or nonsensical: one line each, before anything heavy."""

from __future__ import annotations

import json
import resource
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
DEMO = ROOT / "recipes" / "tiny" / "cpu_demo.yaml"
TINY = ROOT / "qlora_kit" / "resources" / "tiny-demo"


def _train(tmp_path: Path, *sets: str, recipe: Path = DEMO, env: dict[str, str] | None = None, limit: int = 0):
    args = [sys.executable, "-m", "qlora_kit", "train", str(recipe), "--set", f"train.output_dir={tmp_path / 'run'}"]
    for s in sets:
        args += ["--set", s]

    def cap() -> None:  # a memory cap: a refusal must not need much
        if limit:
            resource.setrlimit(resource.RLIMIT_AS, (limit, limit))

    import os

    full_env = {**os.environ, **(env or {})}
    return subprocess.run(args, capture_output=True, text=True, timeout=300, preexec_fn=cap, env=full_env)


def _one_line(out, fragment: str, code: int = 2) -> str:
    lines = [line for line in out.stderr.splitlines() if line.strip()]
    assert out.returncode == code, out.stderr[-2000:]
    assert len(lines) == 1, out.stderr[-2000:]
    assert fragment in lines[0] and "Traceback" not in out.stderr, lines[0]
    assert len(lines[0]) < 400, len(lines[0])
    return lines[0]


BOMB = "\n".join(
    ["a: &a [x, x, x, x, x, x, x, x, x, x]"]
    + [f"{chr(98 + i)}: &{chr(98 + i)} [" + ", ".join([f"*{chr(97 + i)}"] * 10) + "]" for i in range(8)]
    + ["model: {name: *i}"]
)


def test_a_yaml_alias_bomb_is_refused_in_one_short_line_under_a_memory_cap(tmp_path):
    bomb = tmp_path / "bomb.yaml"
    bomb.write_text(BOMB)
    assert len(bomb.read_bytes()) < 1000  # 10^9 leaves once expanded
    out = _train(tmp_path, recipe=bomb, limit=1 << 30)
    _one_line(out, "anchor or alias")


def test_an_alias_in_a_set_value_is_refused(tmp_path):
    out = _train(tmp_path, "lora.targets=[&a q_proj, *a]")
    _one_line(out, "anchor or alias")


def test_a_huge_bad_value_is_quoted_short(tmp_path):
    line = _one_line(_train(tmp_path, f"quant.mode={'x' * 100_000}"), "quant.mode")
    assert "..." in line


def test_nothing_to_train_is_refused(tmp_path):
    _one_line(_train(tmp_path, "train.max_steps=0", "train.epochs=0"), "nothing to train")


def test_max_seq_len_beyond_the_context_is_refused_before_loading(tmp_path):
    context = json.loads((TINY / "config.json").read_text())["max_position_embeddings"]
    line = _one_line(_train(tmp_path, f"data.max_seq_len={context + 1}"), "the model's context")
    assert str(context) in line
    assert not (tmp_path / "run").exists()


def test_a_held_out_split_shorter_than_one_packed_sequence_is_refused_before_training(tmp_path):
    data = tmp_path / "d.jsonl"
    data.write_text("".join(json.dumps({"text": f"s{i} s{i}"}) + "\n" for i in range(200)))
    out = _train(
        tmp_path,
        f"data.path={data}",
        "data.text_field=text",
        "data.packing=true",
        "data.max_seq_len=250",
        "data.eval_fraction=0.02",
        "train.eval_steps=20",
        "train.max_steps=40",
    )
    _one_line(out, "held-out split")
    assert not (tmp_path / "run" / "metrics.jsonl").exists()


@pytest.mark.parametrize(
    ("content", "fragment"),
    [
        (b"\x00\x01\x02\xff\xfe binary\n", "line 1 is not UTF-8"),
        (b'{"quote": "a"}\n{"quote": broken\n', "line 2 is not valid JSON"),
    ],
)
def test_binary_or_broken_jsonl_gets_one_line(tmp_path, content, fragment):
    data = tmp_path / "d.jsonl"
    data.write_bytes(content)
    _one_line(_train(tmp_path, f"data.path={data}"), fragment)


def test_an_uncached_hub_model_offline_is_one_line(tmp_path):
    out = _train(
        tmp_path,
        "model.name=someone-qlora-kit-test/nope",
        "model.random_init=false",
        env={"HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf")},
    )
    _one_line(out, "not in the local hub cache")


def _model_dir(tmp_path: Path, config: str | None = None, **extra) -> Path:
    import shutil

    model = tmp_path / "model"
    shutil.copytree(TINY, model)
    if config is not None:
        (model / "config.json").write_text(config)
    if extra:
        cfg = json.loads((model / "config.json").read_text())
        (model / "config.json").write_text(json.dumps({**cfg, **extra}))
    return model


@pytest.mark.parametrize(("config", "fragment"), [("{not json", "is not valid JSON"), ("[1, 2]", "not a JSON object")])
def test_a_corrupt_base_config_is_one_line(tmp_path, config, fragment):
    model = _model_dir(tmp_path, config)
    _one_line(_train(tmp_path, f"model.name={model}"), fragment)


def test_custom_code_without_trust_names_the_flag(tmp_path):
    model = _model_dir(tmp_path, auto_map={"AutoModelForCausalLM": "modeling_evil.EvilModel"})
    (model / "modeling_evil.py").write_text(f"open({str(tmp_path / 'pwned')!r}, 'w').close()\n")
    _one_line(_train(tmp_path, f"model.name={model}"), "--trust-remote-code")
    assert not (tmp_path / "pwned").exists()


def test_a_truncated_base_checkpoint_is_one_line(tmp_path):
    from qlora_kit.model.load import materialize_random_init
    from qlora_kit.recipe import ModelSpec

    base = materialize_random_init(ModelSpec(name=str(TINY), random_init=True), tmp_path / "base", 0)
    weights = Path(base.name) / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    _one_line(_train(tmp_path, f"model.name={base.name}", "model.random_init=false"), "damaged", code=2)


def test_a_failed_random_init_leaves_no_temporary_base(tmp_path, monkeypatch):
    import errno

    import transformers

    from qlora_kit.errors import WriteFailed
    from qlora_kit.model.load import materialize_random_init
    from qlora_kit.recipe import ModelSpec

    def full_disk(self, *a, **k):
        raise OSError(errno.ENOSPC, "No space left on device", str(a[0]) if a else "")

    monkeypatch.setattr(transformers.PreTrainedModel, "save_pretrained", full_disk)
    with pytest.raises(WriteFailed):  # the ENOSPC, reported as one line
        materialize_random_init(ModelSpec(name=str(TINY), random_init=True), tmp_path / "base", 0)
    assert sorted(p.name for p in tmp_path.iterdir()) == []
