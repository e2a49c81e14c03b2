"""The tools that keep tables in docs/ pages: each finds its markers, and the shared writer replaces only what
lies between them, refuses a page without them, and reports a stale section."""

from __future__ import annotations

import importlib
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tools"))

import doc_section  # noqa: E402

TOOLS = ("published_peaks", "published_multigpu", "bench_plan", "bench_train")


@pytest.mark.parametrize("name", TOOLS)
def test_each_tool_finds_its_markers_in_its_docs_page(name):
    tool = importlib.import_module(name)
    assert tool.PAGE.startswith("docs/") and (ROOT / tool.PAGE).is_file()
    assert doc_section.between(tool.PAGE, tool.START, tool.END) is not None, f"{tool.PAGE} lost its markers"


def test_no_section_markers_are_left_in_the_readme():
    readme = (ROOT / "README.md").read_text()
    for name in TOOLS:
        tool = importlib.import_module(name)
        assert tool.START not in readme and tool.END not in readme


def _run(monkeypatch, tmp_path, flag, text="| a |"):
    monkeypatch.setattr(doc_section, "ROOT", tmp_path)
    monkeypatch.setattr(sys, "argv", ["tool", *([flag] if flag else [])])
    return doc_section.main("tool", "page.md", "<!-- s -->", "<!-- e -->", lambda: text, "a tool")


def test_write_replaces_only_the_text_between_the_markers_and_check_then_passes(monkeypatch, tmp_path):
    (tmp_path / "page.md").write_text("intro\n<!-- s -->\nold\n<!-- e -->\noutro\n")
    assert _run(monkeypatch, tmp_path, "--check") == 1
    assert _run(monkeypatch, tmp_path, "--write") == 0
    assert (tmp_path / "page.md").read_text() == "intro\n<!-- s -->\n| a |\n<!-- e -->\noutro\n"
    assert _run(monkeypatch, tmp_path, "--check") == 0
    assert _run(monkeypatch, tmp_path, "--check", text="| b |") == 1
    assert not list(tmp_path.glob("*.tmp"))


def test_a_page_without_its_markers_is_left_untouched(monkeypatch, tmp_path, capsys):
    (tmp_path / "page.md").write_text("intro\n<!-- e -->\n<!-- s -->\n")  # end before start: not a section
    assert _run(monkeypatch, tmp_path, "--write") == 1
    assert "page.md has no <!-- s --> ... <!-- e --> markers" in capsys.readouterr().out
    assert (tmp_path / "page.md").read_text() == "intro\n<!-- e -->\n<!-- s -->\n"
