"""Names people type: version-less and hyphen-free catalog names, ambiguity, and the `models` table."""

from __future__ import annotations

import subprocess
import sys

import pytest

from qlora_kit.catalog import shortnames
from qlora_kit.catalog.models import (
    ambiguous_names,
    catalog_names,
    lookup,
    resolve_model,
    short_names,
)
from qlora_kit.errors import UsageError


@pytest.mark.parametrize(
    ("typed", "expected"),
    [
        ("mistral-7b", "mistralai/Mistral-7B-v0.1"),
        ("Mistral-7B", "mistralai/Mistral-7B-v0.1"),
        ("mistralai/mistral-7b", "mistralai/Mistral-7B-v0.1"),  # the entry's own organisation
        ("mixtral-8x7b", "mistralai/Mixtral-8x7B-v0.1"),
        ("qwen2.5-7b", "Qwen/Qwen2.5-7B"),
        ("qwen-2.5-7b", "Qwen/Qwen2.5-7B"),
        ("qwen-7b", "Qwen/Qwen2.5-7B"),  # the only Qwen 7B in the catalog
        ("qwen-8b", "Qwen/Qwen3-8B"),
        ("llama-3-8b", "meta-llama/Meta-Llama-3-8B"),
        ("llama3-8b", "meta-llama/Meta-Llama-3-8B"),
        ("llama3.1-8b", "meta-llama/Llama-3.1-8B"),
        ("llama-1b", "meta-llama/Llama-3.2-1B"),
        ("gemma2-9b", "google/gemma-2-9b"),
        ("gemma-9b", "google/gemma-2-9b"),
        ("ministral-8b-instruct", "mistralai/Ministral-8B-Instruct-2410"),
        ("llama-7b", "huggyllama/llama-7b"),  # a key means its own entry, not Llama 2's version-less form
    ],
)
def test_short_names_resolve_to_the_one_entry(typed: str, expected: str) -> None:
    assert lookup(typed).name == expected
    assert resolve_model(typed).name == expected


@pytest.mark.parametrize(
    ("typed", "versions"),
    [
        ("llama-8b", ("llama-3-8b", "llama-3.1-8b")),
        ("llama-70b", ("llama-2-70b", "llama-3-70b", "llama-3.1-70b")),
        ("qwen-14b", ("qwen2.5-14b", "qwen3-14b")),
    ],
)
def test_an_ambiguous_name_lists_the_versions(typed: str, versions: tuple[str, ...]) -> None:
    for resolve in (lookup, resolve_model):
        with pytest.raises(UsageError) as info:
            resolve(typed)
        assert typed in info.value.message and "could mean" in info.value.message
        for v in versions:
            assert v in info.value.hint
        assert "\n" not in info.value.message + info.value.hint


def test_another_organisation_is_not_the_catalog_entry() -> None:
    """``someone/mistral-7b`` is a hub id: a short form never captures another organisation's model."""
    with pytest.raises(UsageError) as info:
        lookup("someone/mistral-7b")
    assert "unknown model" in info.value.message
    names = shortnames.build([("mistral-7b-v0.1", "mistralai/Mistral-7B-v0.1")])
    assert names.candidates("mistral-7b", "someone") == ()
    assert names.candidates("mistral-7b", "MistralAI") == ("mistralai/Mistral-7B-v0.1",)
    assert names.candidates("mistral-7b-v0.1", "someone") == ("mistralai/Mistral-7B-v0.1",)  # the key, as before


def test_forms_drop_the_release_then_the_version_but_never_the_size() -> None:
    assert shortnames.short_forms("mistral-7b-v0.1") == ["mistral-7b"]
    assert shortnames.short_forms("ministral-8b-instruct-2410") == ["ministral-8b-instruct"]
    assert shortnames.short_forms("llama-3.1-8b") == ["llama-8b"]
    assert shortnames.short_forms("qwen2.5-0.5b") == ["qwen-0.5b"]
    assert shortnames.short_forms("gpt2-medium") == []  # "gpt-medium" names no size
    assert shortnames.short_forms("opt-6.7b") == []
    assert shortnames.squash("llama-3.1-8b") == shortnames.squash("llama3.1-8b")
    assert shortnames.squash("opt-1.3b") != shortnames.squash("opt-13b")


def test_every_entry_keeps_its_own_names() -> None:
    """No squashed key is shared, and every name the table shows resolves to its row."""
    squashed = [shortnames.squash(short_names(n)[0]) for n in catalog_names()]
    assert len(set(squashed)) == len(squashed)
    for hf_id in catalog_names():
        for name in short_names(hf_id):
            assert lookup(name).name == hf_id, name
    shown = {form for n in catalog_names() for form in short_names(n)[1:]}
    assert {"mistral-7b", "mixtral-8x7b", "qwen-7b"} <= shown
    assert not shown & set(ambiguous_names())


def test_models_lists_the_short_names_and_the_ambiguous_ones() -> None:
    out = subprocess.run(
        [sys.executable, "-m", "qlora_kit", "models"], capture_output=True, text=True, timeout=60, check=True
    )
    row = next(line for line in out.stdout.splitlines() if "mistralai/Mistral-7B-v0.1" in line)
    assert "mistral-7b " in row and "7.24B" in row
    assert "llama-8b (llama-3-8b or llama-3.1-8b)" in " ".join(out.stdout.split())


def test_plan_takes_a_short_name_and_refuses_an_ambiguous_one_in_one_line() -> None:
    def plan(model: str) -> subprocess.CompletedProcess[str]:
        cmd = [sys.executable, "-m", "qlora_kit", "plan", "--model", model, "--gpu", "24GB", "--json"]
        return subprocess.run(cmd, capture_output=True, text=True, timeout=60)

    ok = plan("mistral-7b")
    assert ok.returncode == 0 and '"model": "mistralai/Mistral-7B-v0.1"' in ok.stdout
    bad = plan("llama-8b")
    assert bad.returncode == 2 and bad.stdout == ""
    assert len(bad.stderr.strip().splitlines()) == 1 and "llama-3.1-8b" in bad.stderr
