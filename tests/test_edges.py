"""The rough edges a new user hits trying every command: --write-recipe's file, output that repeats or
runs together, help text, closed pipes, and what the README's commands leave in the working tree."""

from __future__ import annotations

import argparse
import io
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from qlora_kit.cli import build_parser, main
from qlora_kit.recipe import load_recipe

ROOT = Path(__file__).resolve().parent.parent
DEMO = ROOT / "recipes" / "tiny" / "cpu_demo.yaml"


def run(*args: str, **kw) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    return subprocess.run(
        [sys.executable, "-m", "qlora_kit", *args], capture_output=True, text=True, timeout=300, env=env, **kw
    )


# -- plan --write-recipe ----------------------------------------------------------------------------------


def test_written_recipe_is_block_yaml_that_saves_checkpoints_and_holds_data_out(tmp_path, capsys):
    path = tmp_path / "opt.yaml"
    assert main(["plan", "--model", "opt-6.7b", "--gpu", "24GB", "--write-recipe", str(path)]) == 0
    assert f"recipe written to {path}" in capsys.readouterr().out
    text = path.read_text()
    body = [line for line in text.splitlines() if not line.startswith("#")]
    flow = [line for line in body if ("{" in line or "[" in line) and not line.endswith(": []")]
    assert not flow  # block style, as recipes/ are written (an empty list has no block form)
    assert [line for line in body if not line.startswith(" ")] == ["model:", "quant:", "lora:", "data:", "train:"]
    assert "(fits)" in text.splitlines()[0]
    recipe = load_recipe(path)
    # the bundled quotes (555 rows), 5% held out, micro-batch x accumulation 16: 33 steps, saved every 8
    assert recipe.data.path == "builtin:quotes" and recipe.data.eval_fraction == 0.05
    steps = -(-(555 - 28) // (recipe.train.micro_batch * recipe.train.grad_accum))
    assert 0 < recipe.train.save_steps < steps and recipe.train.eval_steps == recipe.train.save_steps


def test_small_data_holds_nothing_out_and_a_hub_dataset_saves_every_100_steps(tmp_path):
    few = tmp_path / "few.jsonl"
    few.write_text("".join(json.dumps({"text": f"row {i}"}) + "\n" for i in range(5)))
    for data, fraction, save in ((str(few), 0.0, None), ("yahma/alpaca-cleaned", 0.05, 100)):
        path = tmp_path / "r.yaml"
        assert main(["plan", "--model", "opt-125m", "--write-recipe", str(path), "--data", data]) == 0
        recipe = load_recipe(path)
        assert recipe.data.eval_fraction == fraction and recipe.train.save_steps >= 1
        assert save is None or recipe.train.save_steps == save
        assert recipe.train.eval_steps == (recipe.train.save_steps if fraction else 0)


@pytest.mark.parametrize(("umask", "mode"), [(0o022, 0o644), (0o027, 0o640), (0o002, 0o664)])
def test_written_recipe_has_a_plain_files_mode(tmp_path, umask, mode):
    path = tmp_path / "r.yaml"
    old = os.umask(umask)
    try:
        assert main(["plan", "--model", "opt-125m", "--write-recipe", str(path)]) == 0
    finally:
        os.umask(old)
    assert path.stat().st_mode & 0o777 == mode


def test_rewriting_a_recipe_keeps_its_mode(tmp_path):
    path = tmp_path / "r.yaml"
    path.write_text("old\n")
    path.chmod(0o600)  # the user made it private
    assert main(["plan", "--model", "opt-125m", "--write-recipe", str(path)]) == 0
    assert path.stat().st_mode & 0o777 == 0o600 and path.read_text() != "old\n"


def test_a_plan_that_does_not_fit_writes_no_recipe(tmp_path, capsys):
    path = tmp_path / "r.yaml"
    path.write_text("earlier work\n")
    assert main(["plan", "--model", "opt-6.7b", "--gpu", "4GB", "--write-recipe", str(path)]) == 3
    out = capsys.readouterr()
    assert "nothing fits" in out.out and "recipe written" not in out.out  # the plan and its advice, first
    [line] = out.err.splitlines()
    assert "does not fit on 4 GiB GPU, so no recipe was written to" in line and "a bigger card" in line
    assert path.read_text() == "earlier work\n" and [p.name for p in tmp_path.iterdir()] == ["r.yaml"]
    assert main(["plan", "--model", "opt-6.7b", "--gpu", "4GB", "--json", "--write-recipe", str(tmp_path / "n")]) == 3
    assert json.loads(capsys.readouterr().out)["fits"] is False and not (tmp_path / "n").exists()


def test_a_recipe_written_from_a_recipe_keeps_its_keys_and_trains_with_checkpoints(tmp_path, monkeypatch):
    from test_train import Quiet

    from qlora_kit.train.checkpoint import complete
    from qlora_kit.train.loop import train

    path, out = tmp_path / "w.yaml", tmp_path / "run"
    sets = ["train.max_steps=4", "train.save_steps=0", "data.eval_fraction=0", f"train.output_dir={out}"]
    argv = ["plan", "--recipe", str(DEMO), "--gpu", "8GB", "--write-recipe", str(path)]
    assert main(argv + [x for s in sets for x in ("--set", s)]) == 0
    recipe = load_recipe(path)
    assert recipe.model.random_init and recipe.train.lr == 3e-3 and recipe.train.max_steps == 4
    assert recipe.train.save_steps == 1 and recipe.data.eval_fraction == 0.05
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    result = train(recipe, Quiet())
    assert [p.name for p in complete(out)] and result.summary["eval_loss"] is not None


# -- output ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("chat", "shown"), [(True, "adapter\nHi there\nHello!\n"), (False, "adapter\nHi thereHello!\n")]
)
def test_a_chat_reply_starts_on_a_line_of_its_own(capsys, chat, shown):
    from qlora_kit import ui

    printer = ui.StreamPrinter("Hi there", chat)
    printer.labelled("adapter", "")
    printer.labelled("adapter", "Hello")
    printer.labelled("adapter", "!")
    printer.finish({})
    assert capsys.readouterr().out == shown


def test_generate_separates_the_chat_reply_from_the_prompt(demo_adapter):
    out = run("generate", "--adapter", str(demo_adapter), "--prompt", "Say hi", "--chat", "--max-new-tokens", "4")
    assert out.returncode == 0, out.stderr
    lines = out.stdout.splitlines()
    assert lines[:2] == ["adapter", "Say hi"] and len(lines) >= 3  # the reply below the prompt


def test_export_says_verification_once_below_the_bars(demo_adapter, tmp_path):
    out = run("export", "--adapter", str(demo_adapter), "--out", str(tmp_path / "merged"))
    assert out.returncode == 0, out.stderr
    lines = out.stdout.splitlines()
    said = [i for i, line in enumerate(lines) if line.startswith(("verification", "verified", "not verified"))]
    bars = [i for i, line in enumerate(lines) if line.startswith(("merge ", "verify "))]
    assert len(said) == 1 and bars and said[0] > max(bars), out.stdout
    assert lines[said[0]].startswith("verification: max |logit diff|")
    assert [i for i, line in enumerate(lines) if line.startswith("merged 28 tensors")] > said  # the last word


def test_export_says_once_why_it_did_not_verify(demo_adapter, tmp_path, capsys):
    assert main(["export", "--adapter", str(demo_adapter), "--out", str(tmp_path / "m"), "--no-verify"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert [line for line in lines if "verif" in line] == ["verification skipped: --no-verify"]


@pytest.mark.parametrize(
    ("knob", "values", "column"),
    [
        ("quant", "nf4,none", "quant"),
        ("grad-ckpt", "on,off", "grad_ckpt"),
        ("optimizer", "adamw,paged_adamw", "optimizer"),
    ],
)
def test_a_sweep_shows_the_swept_knob_once(capsys, knob, values, column):
    assert main(["plan", "--model", "opt-1.3b", "--sweep", f"{knob}={values}"]) == 0
    out = capsys.readouterr().out
    header = next(line for line in out.splitlines() if "peak allocated GiB" in line)
    cells = [c.strip() for c in re.split(r"[┃|]", header) if c.strip()]
    assert cells[0] == knob and column not in cells[1:]
    if knob == "quant":  # the swept value with the double quant the planner chose
        assert "nf4+dq" in out


def test_gpus_title_is_one_line_at_80_columns(monkeypatch):
    from rich.console import Console

    from qlora_kit import ui
    from qlora_kit.catalog.gpus import gpu_table

    screen = io.StringIO()
    monkeypatch.setattr(ui, "console", Console(file=screen, width=80, highlight=False))
    ui.render_gpus(gpu_table())
    lines = screen.getvalue().splitlines()
    assert lines[0].strip() == f"{len(gpu_table())} GPUs" and all(len(line) <= 80 for line in lines)
    assert lines[-1] == "memory in GiB; --gpu also takes any size, e.g. --gpu 24GB"


# -- help -----------------------------------------------------------------------------------------------

DANGLING = re.compile(r"\b(of|the|a|an|to|for|with|and|or|in|by)\s*(\(|$)")  # help cut off mid-phrase


def _verbs(parser: argparse.ArgumentParser, name: str = "qlora-kit"):
    yield name, parser
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            helps = {a.dest: a.help for a in action._choices_actions}
            for verb, sub in action.choices.items():
                assert helps.get(verb), f"{name} {verb} has no one-line help in the verb list"
                yield from _verbs(sub, f"{name} {verb}")


def test_every_verb_has_a_description_and_every_option_help():
    problems = []
    for name, parser in _verbs(build_parser()):
        if not parser.description:
            problems.append(f"{name}: no description")
        for action in parser._actions:
            if isinstance(action, argparse._SubParsersAction):
                continue
            flag = "/".join(action.option_strings) or action.dest
            if not action.help:
                problems.append(f"{name} {flag}: no help")
            elif DANGLING.search(action.help):
                problems.append(f"{name} {flag}: help looks cut off: {action.help!r}")
        parser.format_help()  # a stray % in a help string fails here
    assert not problems, "\n".join(problems)


# -- pipes ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("args", [["plan", "--model", "opt-6.7b"], ["plan", "--model", "opt-6.7b", "--json"], ["gpus"]])
def test_a_closed_pipe_ends_quietly_with_status_0(args):
    read, write = os.pipe()
    os.close(read)  # the reader is gone before the first line: every write meets a closed pipe
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    try:
        proc = subprocess.run(
            [sys.executable, "-m", "qlora_kit", *args], stdout=write, stderr=subprocess.PIPE, env=env, timeout=120
        )
    finally:
        os.close(write)
    assert (proc.returncode, proc.stderr.decode()) == (0, "")


def test_plan_piped_into_head_ends_with_status_0():
    if shutil.which("head") is None:
        pytest.skip("no head")
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.Popen(
        [sys.executable, "-m", "qlora_kit", "models"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env
    )
    head = subprocess.run(["head", "-1"], stdin=proc.stdout, capture_output=True, text=True, timeout=120)
    assert proc.stdout is not None
    proc.stdout.close()
    assert proc.wait(timeout=120) == 0 and proc.stderr is not None and proc.stderr.read() == b""
    assert "models in the catalog" in head.stdout


# -- the working tree -----------------------------------------------------------------------------------


def _written_by_the_docs() -> set[str]:
    """The paths the README's and docs' commands write (directories end in /): export's --out (and the
    partial directory a killed export leaves), plan's --write-recipe, every shipped recipe's output_dir."""
    text = "\n".join(p.read_text() for p in [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))])
    outs = {m.rstrip("/`") for m in re.findall(r"--out ([\w./-]+)", text) if m != "DIR"}
    paths = {f"{o}/" for o in outs} | {f".{Path(o).name}.qlora-kit-partial/" for o in outs}
    paths |= {m.rstrip("`") for m in re.findall(r"--write-recipe ([\w./-]+\.yaml)", text)}
    for recipe in (ROOT / "recipes").rglob("*.yaml"):
        paths.add(yaml.safe_load(recipe.read_text())["train"]["output_dir"].rstrip("/") + "/")
    return paths


def test_what_the_readme_commands_write_stays_out_of_git_status():
    if shutil.which("git") is None or not (ROOT / ".git").exists():
        pytest.skip("not a git checkout")
    paths = sorted(_written_by_the_docs())
    assert {"merged/", "runs/cpu-demo/", "recipes/mine.yaml", ".merged.qlora-kit-partial/"} <= set(paths)
    out = subprocess.run(["git", "check-ignore", "--no-index", *paths], cwd=ROOT, capture_output=True, text=True)
    assert sorted(out.stdout.split()) == paths, out.stderr
