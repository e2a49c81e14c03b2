"""Memory sizes and the GPU table: binary units everywhere, loose card names, clear errors."""

from __future__ import annotations

import csv
from importlib import resources

import pytest

from qlora_kit.catalog.gpus import GIB, MIB, DeviceSpec, gpu_table, parse_binary_bytes, resolve_gpu
from qlora_kit.errors import UsageError

# -- parse_binary_bytes (GPU sizes) ----------------------------------------------------------------


def test_units_are_binary() -> None:
    assert GIB == 2**30
    assert MIB == 2**20


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("24GB", 24 * 2**30),
        ("24 GiB", 24 * 2**30),
        ("24576MiB", 24 * 2**30),
        ("80G", 80 * 2**30),
        ("24", 24 * 2**30),
        ("24gb", 24 * 2**30),
        (" 16 GB ", 16 * 2**30),
        ("1.5GB", 3 * 2**29),
        ("512MB", 512 * 2**20),
        ("1TB", 2**40),
    ],
)
def test_parse_binary_bytes(text: str, expected: int) -> None:
    assert parse_binary_bytes(text) == expected
    assert isinstance(parse_binary_bytes(text), int)


@pytest.mark.parametrize("text", ["abc", "24XB", "", "   ", "GB", "24 G B", "-24GB", "24GB GPU", "1e3GB"])
def test_parse_binary_bytes_malformed(text: str) -> None:
    with pytest.raises(UsageError) as info:
        parse_binary_bytes(text)
    assert repr(text) in info.value.message
    assert "24GB" in info.value.hint


@pytest.mark.parametrize("text", ["0GB", "1MB", "0", "255MiB", "0.1GB"])
def test_parse_binary_bytes_too_small(text: str) -> None:
    with pytest.raises(UsageError) as info:
        parse_binary_bytes(text)
    assert "too small" in info.value.message


def test_parse_binary_bytes_smallest_accepted() -> None:
    assert parse_binary_bytes("256MiB") == 256 * 2**20


# -- the GPU table ---------------------------------------------------------------------------------


def csv_rows() -> list[dict[str, str]]:
    text = resources.files("qlora_kit").joinpath("resources/gpus.csv").read_text()
    return list(csv.DictReader(text.splitlines()))


def test_table_size_and_sanity() -> None:
    table = gpu_table()
    assert len(table) >= 25
    names = [d.name for d in table]
    assert len(set(names)) == len(names)
    for dev in table:
        assert isinstance(dev, DeviceSpec)
        assert 4 * GIB <= dev.memory_bytes <= 256 * GIB, dev
        assert dev.memory_bytes % MIB == 0
        assert dev.family


def test_bf16_follows_the_architecture() -> None:
    """bf16 needs compute capability 8.0 (Ampere) or newer; Pascal, Volta and Turing lack it."""
    for dev in gpu_table():
        if dev.family in ("Pascal", "Volta", "Turing"):
            assert not dev.bf16, dev.name
        elif dev.family in ("Ampere", "Ada", "Hopper", "Blackwell"):
            assert dev.bf16, dev.name


@pytest.mark.parametrize(
    ("text", "name", "memory_gib"),
    [
        ("rtx4090", "RTX 4090", 24),
        ("RTX 4090", "RTX 4090", 24),
        ("NVIDIA GeForce RTX 4090", "RTX 4090", 24),
        ("4090", "RTX 4090", 24),
        ("A100-SXM4-80GB", "A100 80GB", 80),
        ("NVIDIA A100-SXM4-80GB", "A100 80GB", 80),
        ("a100", "A100 40GB", 40),
        ("t4", "T4", 16),
        ("Tesla T4", "T4", 16),
        ("Tesla V100", "V100 16GB", 16),
        ("v100_32gb", "V100 32GB", 32),
        ("NVIDIA H100 80GB", "H100", 80),
        ("h100 pcie", "H100", 80),
        ("H200", "H200", 141),
        ("l4", "L4", 24),
        ("rtx 3090 ti", "RTX 3090", 24),
    ],
)
def test_resolve_gpu_names(text: str, name: str, memory_gib: int) -> None:
    dev = resolve_gpu(text)
    assert dev.name == name
    assert dev.memory_bytes == memory_gib * GIB
    assert dev.memory_gib == memory_gib


@pytest.mark.parametrize("text", ["T4", "V100", "V100 32GB", "P100", "RTX 2080 Ti"])
def test_no_bf16_before_ampere(text: str) -> None:
    assert resolve_gpu(text).bf16 is False


@pytest.mark.parametrize("text", ["rtx4090", "A100 80GB", "H100", "L4", "RTX 3060"])
def test_bf16_on_ampere_and_newer(text: str) -> None:
    assert resolve_gpu(text).bf16 is True


def test_every_name_and_alias_resolves_to_its_own_row() -> None:
    """An alias shared by two rows would silently resolve to whichever comes first."""
    for row in csv_rows():
        for alias in [row["name"], *filter(None, row["aliases"].split("|"))]:
            assert resolve_gpu(alias).name == row["name"], alias
            assert resolve_gpu(alias.upper()).name == row["name"], alias
            assert resolve_gpu(f"NVIDIA {alias}").name == row["name"], alias


def test_resolve_gpu_size() -> None:
    dev = resolve_gpu("24GB")
    assert dev.memory_bytes == 24 * GIB
    assert dev.memory_gib == 24
    assert resolve_gpu("12 GiB").memory_bytes == 12 * GIB
    assert resolve_gpu("40").memory_bytes == 40 * GIB


def test_resolve_gpu_size_too_small() -> None:
    with pytest.raises(UsageError):
        resolve_gpu("1MB")


@pytest.mark.parametrize(("text", "suggested"), [("rtx 4095", "RTX 4090"), ("A100-90GB", "A100 80GB")])
def test_unknown_gpu_suggests(text: str, suggested: str) -> None:
    with pytest.raises(UsageError) as info:
        resolve_gpu(text)
    assert repr(text) in info.value.message
    assert suggested in info.value.hint
    assert "24GB" in info.value.hint  # and says a plain size works too


def test_unknown_gpu_without_close_match() -> None:
    with pytest.raises(UsageError) as info:
        resolve_gpu("potato")
    assert "potato" in info.value.message
    assert "did you mean" not in info.value.hint
    assert "24GB" in info.value.hint


# -- the card train detects: one DeviceSpec, planned like --gpu -------------------------------------


@pytest.mark.parametrize(
    ("capability", "family"),
    [
        ((6, 1), "Pascal"),
        ((7, 0), "Volta"),
        ((7, 5), "Turing"),
        ((8, 0), "Ampere"),
        ((8, 6), "Ampere"),
        ((8, 9), "Ada"),
        ((9, 0), "Hopper"),
        ((10, 0), "Blackwell"),
        ((12, 0), "Blackwell"),
        ((5, 2), ""),
    ],
)
def test_a_compute_capability_names_the_generation_the_gpu_table_uses(capability, family) -> None:
    from qlora_kit.catalog.gpus import family_of_capability

    assert family_of_capability(*capability) == family
    assert not family or family in {card.family for card in gpu_table()}


class _Messages:
    def __init__(self) -> None:
        self.lines: list[str] = []

    def message(self, text: str) -> None:
        self.lines.append(text)


def test_train_plans_the_recipe_on_the_detected_card_and_refuses_what_will_not_fit() -> None:
    from pathlib import Path

    from qlora_kit.recipe import load_recipe
    from qlora_kit.train.preflight import Device, check_fits

    recipe = load_recipe(Path(__file__).parent.parent / "recipes" / "llama" / "3.1-8b_qlora_24gb.yaml")
    model = recipe.model.name
    big = Device(DeviceSpec("NVIDIA H100 80GB HBM3", 80 * GIB, True, "Hopper"))
    said = _Messages()
    check_fits(recipe, model, big, said, force=False)  # type: ignore[arg-type]
    assert (
        len(said.lines) == 1 and said.lines[0].startswith("plan: ") and "of 80.00 GiB on NVIDIA H100" in said.lines[0]
    )
    small = Device(DeviceSpec("NVIDIA RTX A2000", 4 * GIB, True, "Ampere"))
    with pytest.raises(UsageError, match=r"needs about [0-9.]+ GiB on NVIDIA RTX A2000, which has 4.0 GiB"):
        check_fits(recipe, model, small, _Messages(), force=False)  # type: ignore[arg-type]
    check_fits(recipe, model, small, _Messages(), force=True)  # type: ignore[arg-type]
    cpu = _Messages()
    check_fits(recipe, model, Device(), cpu, force=False)  # type: ignore[arg-type]
    assert cpu.lines == ["no CUDA GPU found: training on the CPU (fine for the tiny demo, slow for real models)"]
