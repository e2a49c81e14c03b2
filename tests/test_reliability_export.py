"""Hostile, broken and interrupted inputs to export, generate and eval, through the CLI: no file runs
code, nothing is lost or half-written, and each ends in one line naming the problem and the fix."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from test_export import adapter_for

pytestmark = pytest.mark.usefixtures("quiet_hf")


@pytest.fixture()
def adapter(llama_adapter, tmp_path, llama):
    """A qlora-kit style adapter (qlora_kit.json, NF4 double quant) on the tiny llama, ours to break."""
    return adapter_for(llama_adapter, tmp_path, llama, "nf4", True)


def one_line(capsys, code: int, *needles: str, exit_code: int = 2) -> str:
    _, err = capsys.readouterr()
    assert code == exit_code, err
    assert err.startswith("error: ") and err.count("\n") == 1 and "Traceback" not in err, err
    for needle in needles:
        assert needle in err, err
    return err


def cli(*args: str) -> int:
    from qlora_kit.cli import main

    return main([str(a) for a in args])


def infer(verb: str, adapter: Path, *extra: str) -> int:
    rest = ["--prompt", "hi", "--max-new-tokens", "2"] if verb == "generate" else ["--data", "builtin:quotes"]
    return cli(verb, "--adapter", adapter, *rest, *extra)


# -- remote code runs only from the user's flag -----------------------------------------------------------


def test_a_file_asking_for_remote_code_is_refused_without_the_flag(adapter, tmp_path, capsys):
    meta = json.loads((adapter / "qlora_kit.json").read_text())
    meta["recipe"] = {"model": {"name": meta["base_model"], "trust_remote_code": True}}
    (adapter / "qlora_kit.json").write_text(json.dumps(meta))
    for run in (
        lambda: cli("export", "--adapter", adapter, "--out", tmp_path / "out"),
        lambda: infer("generate", adapter),
        lambda: infer("eval", adapter),
    ):
        one_line(capsys, run(), "trust_remote_code", "--trust-remote-code")
    assert not (tmp_path / "out").exists()
    # the user's own flag is the only way in; the base here needs no code, so the export just runs
    assert cli("export", "--adapter", adapter, "--out", tmp_path / "out", "--trust-remote-code", "--no-verify") == 0


def test_a_base_with_custom_code_names_the_flag(adapter, llama, tmp_path, capsys):
    base = tmp_path / "custom-base"
    shutil.copytree(llama, base)
    config = json.loads((base / "config.json").read_text())
    config["auto_map"] = {"AutoModelForCausalLM": "evil.Model"}
    (base / "config.json").write_text(json.dumps(config))
    (base / "evil.py").write_text(f"open({str(tmp_path / 'ran')!r}, 'w').write('x')\n")
    meta = json.loads((adapter / "qlora_kit.json").read_text())
    meta.pop("base_config_sha256")
    (adapter / "qlora_kit.json").write_text(json.dumps(meta))
    code = cli("export", "--adapter", adapter, "--base", base, "--out", tmp_path / "out")
    one_line(capsys, code, "auto_map", "--trust-remote-code")
    one_line(capsys, infer("generate", adapter, "--base", base), "auto_map", "--trust-remote-code")
    one_line(capsys, cli("generate", "--model", base, "--prompt", "x"), "auto_map", "--trust-remote-code")
    assert not (tmp_path / "ran").exists()


def test_the_flag_is_on_every_command_that_loads_a_model():
    from qlora_kit.cli import build_parser

    parser = build_parser()
    for argv in (
        ["train", "r.yaml"],
        ["export", "--adapter", "a", "--out", "o"],
        ["generate", "--adapter", "a", "--prompt", "x"],
        ["eval", "--adapter", "a"],
    ):
        assert parser.parse_args([*argv, "--trust-remote-code"]).trust_remote_code is True
        assert parser.parse_args(argv).trust_remote_code is False


# -- pickle adapters ------------------------------------------------------------------------------------


class _Hostile:
    """Unpickling this runs ``open(path, 'w')``: the side effect a safe loader must never let happen."""

    def __init__(self, path: str) -> None:
        self.path = path

    def __reduce__(self):
        return (open, (self.path, "w"))


def _pickled_adapter(adapter: Path, payload: object) -> None:
    import torch

    (adapter / "adapter_model.safetensors").unlink()
    torch.save(payload, adapter / "adapter_model.bin")


@pytest.mark.parametrize("verb", ["generate", "eval", "export"])
def test_pickle_adapters_are_refused_unless_allowed(adapter, tmp_path, capsys, verb):
    from safetensors.torch import load_file

    _pickled_adapter(adapter, load_file(adapter / "adapter_model.safetensors"))
    one_line(capsys, run_verb(verb, adapter, tmp_path), "is a pickle file", "--allow-pickle")
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("verb", ["generate", "eval", "export"])
def test_a_hostile_pickle_gets_one_line_and_never_runs(adapter, tmp_path, capsys, verb):
    marker = tmp_path / "pwned"
    _pickled_adapter(adapter, {"x": _Hostile(str(marker))})
    args = ["--allow-pickle"]
    if verb == "export":
        code = cli("export", "--adapter", adapter, "--out", tmp_path / "out", *args)
    else:
        code = infer(verb, adapter, *args)
    one_line(capsys, code, "adapter_model.bin", "refused to load it (it would call io.open)")
    assert not marker.exists()
    assert not (tmp_path / "out").exists()


def test_an_allowed_plain_pickle_adapter_generates(demo_adapter, tmp_path, capsys):
    import torch
    from safetensors.torch import load_file

    adapter = tmp_path / "run"
    shutil.copytree(demo_adapter, adapter, ignore=shutil.ignore_patterns("checkpoints"))
    weights = load_file(adapter / "adapter_model.safetensors")
    _pickled_adapter(adapter, weights)
    assert infer("generate", adapter) == 2
    capsys.readouterr()
    assert infer("generate", adapter, "--allow-pickle") == 0
    assert torch.load(adapter / "adapter_model.bin", weights_only=True).keys() == weights.keys()


# -- export --out never destroys the adapter or the base --------------------------------------------------


def test_out_inside_the_adapter_or_holding_it_is_refused_even_with_force(adapter, llama, tmp_path, capsys):
    shutil.copytree(llama, tmp_path / "b" / "base")
    (adapter / "checkpoints").mkdir()
    (adapter / "checkpoints" / "keep").write_text("earlier work")
    before = sorted(p.name for p in adapter.rglob("*"))
    for out, needle in (
        (adapter / "checkpoints", "would overwrite files inside the adapter directory"),
        (adapter / "new", "would overwrite files inside the adapter directory"),
        (adapter, "would overwrite files inside the adapter directory"),
        (tmp_path, "would overwrite the adapter"),
        (tmp_path / "b", "would overwrite the base model"),
    ):
        code = cli("export", "--adapter", adapter, "--base", tmp_path / "b" / "base", "--out", out, "--force")
        one_line(capsys, code, needle)
    assert sorted(p.name for p in adapter.rglob("*")) == before
    assert (adapter / "checkpoints" / "keep").read_text() == "earlier work"


# -- Ctrl-C ----------------------------------------------------------------------------------------------


def test_ctrl_c_during_export_says_so_and_leaves_nothing(adapter, tmp_path, capsys, monkeypatch):
    from qlora_kit.export import merge

    calls = []
    real = merge.ShardWriter.write

    def write(self, name, pieces):
        calls.append(name)
        if len(calls) == 3:
            raise KeyboardInterrupt
        real(self, name, pieces)

    monkeypatch.setattr(merge.ShardWriter, "write", write)
    code = cli("export", "--adapter", adapter, "--out", tmp_path / "out")
    one_line(capsys, code, "interrupted, nothing written", exit_code=130)
    assert sorted(p.name for p in tmp_path.iterdir()) == [adapter.name]


# -- broken files: one line each ------------------------------------------------------------------------

VERBS = ["export", "generate", "eval"]


def run_verb(verb: str, adapter: Path, tmp_path: Path) -> int:
    if verb == "export":
        return cli("export", "--adapter", adapter, "--out", tmp_path / "out")
    return infer(verb, adapter)


def _corrupt_config(adapter: Path) -> None:
    (adapter / "adapter_config.json").write_text('{"r": 8,')


def _list_config(adapter: Path) -> None:
    (adapter / "adapter_config.json").write_text("[1, 2]")


def _corrupt_metadata(adapter: Path) -> None:
    (adapter / "qlora_kit.json").write_bytes(b"\xff\xfe{")


def _list_metadata(adapter: Path) -> None:
    (adapter / "qlora_kit.json").write_text('["nf4"]')


def _truncated_weights(adapter: Path) -> None:
    path = adapter / "adapter_model.safetensors"
    path.write_bytes(path.read_bytes()[:-100])


def _deleted_weights(adapter: Path) -> None:
    (adapter / "adapter_model.safetensors").unlink()


def _mismatched_rank(adapter: Path) -> None:
    from safetensors.torch import load_file, save_file

    path = adapter / "adapter_model.safetensors"
    tensors = load_file(path)
    key = next(k for k in sorted(tensors) if k.endswith("lora_A.weight"))
    tensors[key] = tensors[key][:4].contiguous()
    save_file(tensors, path)


@pytest.mark.parametrize("verb", VERBS)
@pytest.mark.parametrize(
    ("breaking", "needle"),
    [
        (_corrupt_config, "adapter_config.json is not valid JSON"),
        (_list_config, "adapter_config.json holds a JSON list, not an object"),
        (_corrupt_metadata, "qlora_kit.json is not valid JSON"),
        (_list_metadata, "qlora_kit.json holds a JSON list, not an object"),
        (_truncated_weights, "adapter_model.safetensors is truncated or corrupt"),
        (_deleted_weights, "no adapter_model.safetensors"),
        (_mismatched_rank, "disagree on the rank"),
    ],
    ids=["config", "config-list", "metadata", "metadata-list", "truncated", "deleted", "rank"],
)
def test_broken_adapter_files_get_one_line(adapter, tmp_path, capsys, verb, breaking, needle):
    breaking(adapter)
    one_line(capsys, run_verb(verb, adapter, tmp_path), needle)
    assert not (tmp_path / "out").exists()


def test_corrupt_base_config_gets_one_line(adapter, llama, tmp_path, capsys):
    base = tmp_path / "base"
    shutil.copytree(llama, base)
    (base / "config.json").write_text("{not json")
    for verb in VERBS:
        extra = ["--base", str(base)]
        code = (
            cli("export", "--adapter", adapter, "--out", tmp_path / "out", *extra)
            if verb == "export"
            else infer(verb, adapter, *extra)
        )
        one_line(capsys, code, "config.json is not valid JSON")


def test_non_utf8_prompt_file(adapter, tmp_path, capsys):
    (tmp_path / "p.txt").write_bytes(b"caf\xe9 \xff")
    code = cli("generate", "--adapter", adapter, "--prompt-file", tmp_path / "p.txt")
    one_line(capsys, code, "is not UTF-8 text", "save it as UTF-8")


@pytest.mark.parametrize("size", ["0", "0GB", "-1", "-5GB", "lots", "0.0000001B"])
def test_max_shard_size_must_be_a_positive_size(adapter, tmp_path, capsys, size):
    code = cli("export", "--adapter", adapter, "--out", tmp_path / "out", f"--max-shard-size={size}")
    one_line(capsys, code, "--max-shard-size" if size[0] in "0" else "size")
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize(
    ("flag", "value", "needle"),
    [
        ("--temperature", "nan", "--temperature must be >= 0 and finite"),
        ("--temperature", "inf", "--temperature must be >= 0 and finite"),
        ("--temperature", "-inf", "--temperature must be >= 0 and finite"),
        ("--top-p", "nan", "--top-p must be in (0, 1]"),
        ("--top-p", "1.5", "--top-p must be in (0, 1]"),
        ("--top-p", "0", "--top-p must be in (0, 1]"),
    ],
)
def test_sampling_values_must_be_real(adapter, capsys, flag, value, needle):
    code = cli("generate", "--adapter", adapter, "--prompt", "x", f"{flag}={value}")
    one_line(capsys, code, needle)
