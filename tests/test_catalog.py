"""The catalog against the real thing: every entry built by transformers on the meta device.

The planner's arithmetic starts from ``ArchSpec.param_groups()``; if a group is off, every byte the
planner predicts is off. So each catalog entry is instantiated (no memory: ``torch.device("meta")``)
and its parameters are classified module by module into the same groups. Also covered: the LoRA
target names, name resolution, local ``config.json`` files and the hub fallback (against a loopback
HTTP server on 127.0.0.1 only; nothing here touches the network).
"""

from __future__ import annotations

import dataclasses
import http.server
import json
import socket
import threading
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn
from transformers import AutoConfig, AutoModelForCausalLM, PreTrainedModel
from transformers.pytorch_utils import Conv1D

from qlora_kit.catalog.arch import ArchSpec
from qlora_kit.catalog.models import catalog_configs, catalog_names, lookup, resolve_model
from qlora_kit.catalog.readers import DEFAULT_TARGETS, arch_from_config, supported_model_types
from qlora_kit.errors import UsageError

GROUPS = ("linear_weight", "expert_weight", "linear_bias", "embedding", "lm_head", "norm", "router")
LINEAR_TYPES = (nn.Linear, Conv1D)

# The smallest configs a user could write per model_type: only the keys the readers require, in the
# model type's own spelling; everything else is left to the defaults. 32 heads of width 32: a
# num_key_value_heads or head_dim default that differs between the reader and transformers changes a
# count. The vocabulary is large enough for every default pad_token_id (Phi-3's is 32000).
_LLAMA_STYLE_KEYS = ("llama", "mistral", "mixtral", "qwen2", "qwen3", "gemma", "gemma2", "stablelm", "phi", "phi3")
MINIMAL_CONFIGS: dict[str, dict[str, Any]] = {
    **{
        mt: {
            "model_type": mt,
            "hidden_size": 1024,
            "num_attention_heads": 32,
            "num_hidden_layers": 2,
            "vocab_size": 32064,
            "intermediate_size": 384,
        }
        for mt in (*_LLAMA_STYLE_KEYS, "gpt_neox")
    },
    # transformers' MinistralConfig defaults head_dim to None and then cannot build a model.
    "ministral": {
        "model_type": "ministral",
        "hidden_size": 1024,
        "num_attention_heads": 32,
        "head_dim": 32,
        "num_hidden_layers": 2,
        "vocab_size": 32064,
        "intermediate_size": 384,
    },
    "opt": {
        "model_type": "opt",
        "hidden_size": 1024,
        "num_attention_heads": 32,
        "num_hidden_layers": 2,
        "vocab_size": 32064,
        "ffn_dim": 384,
    },
    "bloom": {"model_type": "bloom", "hidden_size": 1024, "n_head": 32, "n_layer": 2, "vocab_size": 32064},
    "falcon": {
        "model_type": "falcon",
        "hidden_size": 1024,
        "num_attention_heads": 32,
        "num_hidden_layers": 2,
        "vocab_size": 32064,
    },
    "gpt2": {"model_type": "gpt2", "n_embd": 1024, "n_head": 32, "n_layer": 2, "vocab_size": 32064},
}


# -- helpers -------------------------------------------------------------------------------------


def build_meta(config: Mapping[str, Any]) -> PreTrainedModel:
    """The transformers model of a config dict, with every parameter on the meta device (no memory)."""
    rest = dict(config)
    model_type = rest.pop("model_type")
    cfg = AutoConfig.for_model(model_type, **rest)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(cfg)
    return model


def classify(model: PreTrainedModel) -> dict[str, int]:
    """Parameter counts of a real model in ``ArchSpec.param_groups()``'s groups (unique parameters)."""
    out_emb = model.get_output_embeddings()
    groups = dict.fromkeys(GROUPS, 0)
    unclassified = []
    for full_name, param in model.named_parameters():  # deduplicated: a tied head is not listed
        prefix, _, leaf = full_name.rpartition(".")
        module = model.get_submodule(prefix)
        if module is out_emb:
            group = "lm_head"
        elif isinstance(module, nn.Embedding):
            group = "embedding"
        elif isinstance(module, LINEAR_TYPES):
            assert leaf in ("weight", "bias"), full_name
            group = "linear_weight" if leaf == "weight" else "linear_bias"
        elif param.ndim == 3:
            group = "expert_weight"
        elif "Router" in type(module).__name__ or prefix.endswith(".gate"):
            group = "router"
        elif "Norm" in type(module).__name__:
            group = "norm"
        else:
            unclassified.append(f"{full_name} ({type(module).__name__}, {tuple(param.shape)})")
            continue
        groups[group] += param.numel()
    assert not unclassified, f"parameters in no group: {unclassified}"
    return groups


def decoder_layers(model: PreTrainedModel, num_layers: int) -> nn.ModuleList:
    lists = [mod for mod in model.modules() if isinstance(mod, nn.ModuleList) and len(mod) == num_layers]
    assert len(lists) == 1, f"cannot find the one ModuleList of {num_layers} decoder layers"
    return lists[0]


def layer_linears(layer: nn.Module) -> dict[str, nn.Module]:
    """Dotted names (relative to the layer) of its nn.Linear / Conv1D modules."""
    return {name: mod for name, mod in layer.named_modules() if isinstance(mod, LINEAR_TYPES)}


def match_name(spec_name: str, real_names: list[str]) -> str:
    """The one real module a catalog name denotes: equal, or equal to its last components."""
    hits = [r for r in real_names if r == spec_name or r.endswith("." + spec_name)]
    assert len(hits) == 1, f"catalog name {spec_name!r} matches {hits} among {real_names}"
    return hits[0]


def linear_shape(mod: nn.Module) -> tuple[int, int, bool]:
    """(d_in, d_out, has_bias); Conv1D stores its weight transposed, (d_in, d_out)."""
    if isinstance(mod, Conv1D):
        d_in, d_out = mod.weight.shape
    else:
        assert isinstance(mod, nn.Linear)
        d_in, d_out = mod.in_features, mod.out_features
    return int(d_in), int(d_out), mod.bias is not None


def model_type_example(model_type: str) -> dict[str, Any]:
    """A catalog config of this model_type if there is one, else the minimal one."""
    for cfg in catalog_configs().values():
        if cfg["model_type"] == model_type:
            return cfg
    return MINIMAL_CONFIGS[model_type]


def check_against_transformers(spec: ArchSpec, model: PreTrainedModel) -> None:
    # Layer 0, linear by linear (shape and bias), and the MoE expert tensors: the precise failure.
    layer = decoder_layers(model, spec.num_layers)[0]
    real_linears = layer_linears(layer)
    for ls in spec.layer_linears:
        if ls.experts:
            tensors = [p for n, p in layer.named_parameters() if n.rsplit(".", 1)[-1] == ls.name and p.ndim == 3]
            assert len(tensors) == 1, f"{spec.name}: expert tensor {ls.name!r} not found"
            assert tensors[0].shape[0] == ls.count
            assert tensors[0].numel() == ls.weight_numel
        else:
            mod = real_linears[match_name(ls.name, list(real_linears))]
            real_shape = linear_shape(mod)
            catalog_shape = (ls.d_in, ls.d_out, ls.bias)
            assert real_shape == catalog_shape, f"{spec.name}: {ls.name} (d_in, d_out, bias) transformers vs catalog"

    # The whole model, group by group.
    real = classify(model)
    expected = spec.param_groups()
    assert set(expected) == set(GROUPS)
    mismatched = {g: (expected[g], real[g]) for g in GROUPS if expected[g] != real[g]}
    assert not mismatched, f"{spec.name}: group -> (catalog, transformers): {mismatched}"
    total = sum(p.numel() for p in model.parameters())
    assert spec.num_params == total
    assert sum(expected.values()) == total


# -- every catalog entry against transformers ----------------------------------------------------


def test_catalog_is_not_trivial() -> None:
    names = catalog_names()
    assert len(names) >= 40
    assert len(set(names)) == len(names)
    assert {catalog_configs()[n]["model_type"] for n in names} <= set(supported_model_types())


@pytest.mark.parametrize("name", catalog_names())
def test_param_groups_match_transformers(name: str) -> None:
    spec = lookup(name)
    assert spec.name == name
    check_against_transformers(spec, build_meta(catalog_configs()[name]))


@pytest.mark.parametrize("model_type", sorted(MINIMAL_CONFIGS))
def test_reader_defaults_match_transformers(model_type: str) -> None:
    """A config that omits optional keys: the reader must fill in what transformers fills in."""
    cfg = MINIMAL_CONFIGS[model_type]
    check_against_transformers(arch_from_config(cfg, f"minimal-{model_type}"), build_meta(cfg))


def test_minimal_configs_cover_every_reader() -> None:
    assert set(MINIMAL_CONFIGS) == set(supported_model_types())


@pytest.mark.parametrize("name", catalog_names())
def test_linear_names_are_the_layer_linears(name: str) -> None:
    spec = lookup(name)
    layer = decoder_layers(build_meta(catalog_configs()[name]), spec.num_layers)[0]
    real = list(layer_linears(layer))
    names = spec.linear_names()
    assert len(set(names)) == len(names)
    matched = [match_name(n, real) for n in names]
    assert sorted(matched) == sorted(real)  # a bijection: every real linear named exactly once


# -- default LoRA targets --------------------------------------------------------------------------


def peft_default_targets() -> dict[str, list[str]]:
    from peft.utils.constants import TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING

    return dict(TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING)


def test_every_reader_has_default_targets() -> None:
    assert set(DEFAULT_TARGETS) == set(supported_model_types())
    assert all(DEFAULT_TARGETS.values())


@pytest.mark.parametrize("model_type", sorted(DEFAULT_TARGETS))
def test_default_targets_exist_in_the_layer(model_type: str) -> None:
    cfg = model_type_example(model_type)
    spec = arch_from_config(cfg, model_type)
    layer = decoder_layers(build_meta(cfg), spec.num_layers)[0]
    leaf_names = {name.rsplit(".", 1)[-1] for name in layer_linears(layer)}
    targets = DEFAULT_TARGETS[model_type]
    assert set(targets) <= leaf_names, f"{model_type}: {set(targets) - leaf_names} not in {leaf_names}"
    assert set(targets) <= set(spec.linear_names()) | {n.rsplit(".", 1)[-1] for n in spec.linear_names()}


@pytest.mark.parametrize("model_type", sorted(DEFAULT_TARGETS))
def test_default_targets_agree_with_peft(model_type: str) -> None:
    peft_map = peft_default_targets()
    if model_type not in peft_map:
        pytest.skip(f"peft has no default LoRA targets for {model_type!r}")
    assert set(DEFAULT_TARGETS[model_type]) == set(peft_map[model_type])


def test_peft_mapping_covers_most_types() -> None:
    """Guards the comparison above against a renamed peft constant silently skipping everything."""
    peft_map = peft_default_targets()
    assert sum(mt in peft_map for mt in DEFAULT_TARGETS) >= 10


# -- name resolution -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("query", "expected"),
    [
        ("opt-6.7b", "facebook/opt-6.7b"),
        ("facebook/opt-6.7b", "facebook/opt-6.7b"),
        ("FACEBOOK/OPT-6.7B", "facebook/opt-6.7b"),
        ("  opt-6.7b ", "facebook/opt-6.7b"),
        ("llama-2-7b", "meta-llama/Llama-2-7b-hf"),
        ("Llama-2-7b-hf", "meta-llama/Llama-2-7b-hf"),
        ("meta-llama/Llama-2-7b-hf", "meta-llama/Llama-2-7b-hf"),
        ("llama-3-8b", "meta-llama/Meta-Llama-3-8B"),
        ("qwen2.5-7b", "Qwen/Qwen2.5-7B"),
    ],
)
def test_lookup_resolves_aliases(query: str, expected: str) -> None:
    assert lookup(query).name == expected
    assert resolve_model(query).name == expected


@pytest.mark.parametrize("name", catalog_names())
def test_every_catalog_name_resolves_to_itself(name: str) -> None:
    """No two entries share a lookup key (one would silently shadow the other)."""
    assert lookup(name).name == name
    assert lookup(name.rsplit("/", 1)[-1]).name == name
    assert lookup(name.upper()).name == name


def test_opt_67b_numbers() -> None:
    spec = lookup("opt-6.7b")
    assert (spec.hidden_size, spec.num_layers, spec.vocab_size) == (4096, 32, 50272)
    assert spec.tie_embeddings
    assert 6.6e9 < spec.num_params < 6.7e9


def test_unknown_name_suggests_close_matches() -> None:
    with pytest.raises(UsageError) as info:
        lookup("opt-6.8b")
    assert "opt-6.8b" in info.value.message
    assert "facebook/opt-6.7b" in info.value.hint
    with pytest.raises(UsageError) as info:
        resolve_model("opt-6.8b")
    assert "facebook/opt-6.7b" in info.value.hint


def test_unknown_name_without_close_match() -> None:
    with pytest.raises(UsageError) as info:
        lookup("zzzzqqqq")
    assert "zzzzqqqq" in info.value.message
    assert info.value.hint  # still tells the user what to do


# -- local config.json -------------------------------------------------------------------------------


def write_config(directory: Path, cfg: Mapping[str, Any]) -> Path:
    path = directory / "config.json"
    path.write_text(json.dumps(cfg))
    return path


def test_resolve_local_directory(tmp_path: Path) -> None:
    write_config(tmp_path, catalog_configs()["meta-llama/Llama-2-7b-hf"])
    spec = resolve_model(str(tmp_path))
    assert spec.name == str(tmp_path)
    assert dataclasses.replace(spec, name="meta-llama/Llama-2-7b-hf") == lookup("llama-2-7b")


def test_resolve_config_json_path(tmp_path: Path) -> None:
    path = write_config(tmp_path, catalog_configs()["openai-community/gpt2"])
    spec = resolve_model(str(path))
    assert spec.model_type == "gpt2"
    assert spec.param_groups() == lookup("gpt2").param_groups()


def test_directory_without_config(tmp_path: Path) -> None:
    with pytest.raises(UsageError) as info:
        resolve_model(str(tmp_path))
    assert "config.json" in info.value.message


def test_missing_json_path(tmp_path: Path) -> None:
    with pytest.raises(UsageError):
        resolve_model(str(tmp_path / "nope" / "config.json"))


def test_unsupported_model_type(tmp_path: Path) -> None:
    write_config(tmp_path, {"model_type": "t5", "d_model": 512, "num_heads": 8, "num_layers": 6, "vocab_size": 32128})
    with pytest.raises(UsageError) as info:
        resolve_model(str(tmp_path))
    assert "t5" in info.value.message
    for mt in ("llama", "gpt2", "opt", "mixtral"):
        assert mt in info.value.hint


def test_malformed_json(tmp_path: Path) -> None:
    (tmp_path / "config.json").write_text('{"model_type": "llama", ')
    with pytest.raises(UsageError):
        resolve_model(str(tmp_path))


def test_json_not_an_object(tmp_path: Path) -> None:
    write_config(tmp_path, [1, 2, 3])  # type: ignore[arg-type]
    with pytest.raises(UsageError):
        resolve_model(str(tmp_path))


def test_missing_required_key(tmp_path: Path) -> None:
    cfg = dict(catalog_configs()["huggyllama/llama-7b"])
    del cfg["hidden_size"]
    write_config(tmp_path, cfg)
    with pytest.raises(UsageError) as info:
        resolve_model(str(tmp_path))
    assert "hidden_size" in info.value.message


# -- hub fallback, against a loopback server ---------------------------------------------------------

TINY_LLAMA = {
    "model_type": "llama",
    "hidden_size": 128,
    "num_hidden_layers": 3,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "intermediate_size": 352,
    "vocab_size": 1000,
    "max_position_embeddings": 512,
    "tie_word_embeddings": False,
}


class FakeHub:
    """A loopback HTTP server that serves ``/<org>/<name>/resolve/main/config.json`` from a dict."""

    def __init__(self, files: dict[str, bytes]) -> None:
        self.files = files
        self.requests: list[str] = []
        hub = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                hub.requests.append(self.path)
                body = hub.files.get(self.path)
                if body is None:
                    self.send_error(404)
                    return
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, format: str, *args: Any) -> None:
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()
        self.thread.join(timeout=5)


@pytest.fixture
def hub_env(monkeypatch: pytest.MonkeyPatch) -> pytest.MonkeyPatch:
    """No proxy, no token, not offline: requests go straight to 127.0.0.1."""
    for var in ("HF_HUB_OFFLINE", "HF_TOKEN", "ALL_PROXY", "all_proxy", "HTTP_PROXY", "http_proxy"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("NO_PROXY", "127.0.0.1,localhost")
    monkeypatch.setenv("no_proxy", "127.0.0.1,localhost")
    return monkeypatch


@pytest.fixture
def fake_hub(hub_env: pytest.MonkeyPatch) -> Iterator[FakeHub]:
    hub = FakeHub({"/someorg/tiny-llama/resolve/main/config.json": json.dumps(TINY_LLAMA).encode()})
    hub_env.setenv("HF_ENDPOINT", hub.url)
    try:
        yield hub
    finally:
        hub.close()


def test_hub_fetch(fake_hub: FakeHub) -> None:
    spec = resolve_model("someorg/tiny-llama")
    assert fake_hub.requests == ["/someorg/tiny-llama/resolve/main/config.json"]
    assert spec.name == "someorg/tiny-llama"
    assert spec == arch_from_config(TINY_LLAMA, "someorg/tiny-llama")
    assert (spec.hidden_size, spec.num_layers, spec.num_kv_heads, spec.vocab_size) == (128, 3, 2, 1000)
    check_against_transformers(spec, build_meta(TINY_LLAMA))


def test_hub_404(fake_hub: FakeHub) -> None:
    with pytest.raises(UsageError) as info:
        resolve_model("someorg/missing")
    assert "someorg/missing" in info.value.message
    assert "404" in info.value.message
    assert fake_hub.requests == ["/someorg/missing/resolve/main/config.json"]


def test_hub_offline_makes_no_request(fake_hub: FakeHub, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(UsageError) as info:
        resolve_model("someorg/tiny-llama")
    assert "HF_HUB_OFFLINE" in info.value.message
    assert fake_hub.requests == []


def test_hub_catalog_name_needs_no_request(fake_hub: FakeHub) -> None:
    assert resolve_model("facebook/opt-125m").name == "facebook/opt-125m"
    assert fake_hub.requests == []


def test_hub_connection_refused(hub_env: pytest.MonkeyPatch) -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    # The socket is closed and never listened on: connecting to it is refused at once.
    hub_env.setenv("HF_ENDPOINT", f"http://127.0.0.1:{port}")
    with pytest.raises(UsageError) as info:
        resolve_model("someorg/tiny-llama")
    assert "someorg/tiny-llama" in info.value.message
    assert "could not be fetched" in info.value.message
