"""Loading the base model and tokenizer: ``BitsAndBytesConfig`` from a spec, then transformers.

The one place that turns a recipe's ``model`` and ``quant`` sections into a loaded model; train,
export, generate and the measurement tool all load through here.
"""

from __future__ import annotations

import dataclasses
import json
import shutil
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from qlora_kit.errors import UsageError, writing
from qlora_kit.files import staged_dir
from qlora_kit.recipe import ModelSpec, QuantSpec

if TYPE_CHECKING:
    from transformers import BitsAndBytesConfig, PreTrainedModel

TORCH_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def resolve_model_spec(spec: ModelSpec) -> ModelSpec:
    """The spec with a ``builtin:`` model name replaced by its path inside the package."""
    from qlora_kit.catalog.bundled import resolve

    return dataclasses.replace(spec, name=resolve(spec.name))


def torch_dtype(name: str) -> torch.dtype:
    return TORCH_DTYPES[name]


def bnb_config(quant: QuantSpec) -> BitsAndBytesConfig | None:
    """The bitsandbytes quantization a spec asks for (``None`` for a 16-bit base)."""
    from transformers import BitsAndBytesConfig

    if quant.mode == "none":
        return None
    if quant.mode == "int8":
        return BitsAndBytesConfig(load_in_8bit=True)
    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type=quant.mode,
        bnb_4bit_use_double_quant=quant.double_quant,
        bnb_4bit_compute_dtype=torch_dtype(quant.compute_dtype),
    )


def _check_local(name: str, revision: str | None = None, trust_remote_code: bool = False) -> None:
    """What can be said about a model source before transformers reads it, each in one line.

    A name written as a path must be a directory (else transformers mistakes it for a hub id); a
    directory's config.json must be a JSON object, and custom code (``auto_map``) needs the user's
    ``--trust-remote-code``; a hub id must be in the local cache when the hub is out of reach."""
    if name.startswith(("/", "./", "../", "~")) and not Path(name).expanduser().is_dir():
        raise UsageError(f"model directory {name} does not exist", "check model.name")
    local = Path(name).expanduser()
    if local.is_dir():
        if not (local / "config.json").exists():
            return  # a tokenizer-only directory (an adapter's); loading the model says what is missing
        config = read_config(local / "config.json")
        if config.get("auto_map") and not trust_remote_code:
            raise UsageError(
                f"model {name} ships its own Python code (auto_map in config.json), which runs only if you allow it",
                "pass --trust-remote-code if you trust that code, or use a model transformers supports natively",
            )
        return
    from qlora_kit.hub import cached, offline_reason

    if not cached(name, "config.json", revision):
        reason = offline_reason()
        if reason:
            raise UsageError(
                f"model {name!r} is not in the local hub cache and the hub cannot be reached: {reason}",
                "download it where there is network, or point model.name at a local directory",
            )


def read_config(path: Path) -> dict[str, Any]:
    """A model's config.json as a dict; one line if it is missing, unreadable or not a JSON object."""
    try:
        config = json.loads(path.read_text())
    except FileNotFoundError:
        raise UsageError(f"{path} does not exist", "a model directory needs its config.json") from None
    except (OSError, UnicodeDecodeError, ValueError) as exc:
        raise UsageError(
            f"{path} is not valid JSON ({str(exc).splitlines()[0][:120]})", "restore the model's config.json"
        ) from None
    if not isinstance(config, dict):
        raise UsageError(f"{path} is not a JSON object", "restore the model's config.json")
    return config


def stretched_config(model: ModelSpec, seq_len: int | None) -> Any:
    """The model's transformers config with RoPE stretched to ``seq_len`` as ``model.rope_scaling`` says, or
    ``None`` when there is nothing to stretch (no scaling asked, no length given, or it fits the native context).

    The factor is ``seq_len`` over the native ``max_position_embeddings``, which stays as it is: dynamic NTK
    scaling reads it as the original length (``qlora_kit.catalog.context``)."""
    from transformers import AutoConfig

    from qlora_kit.catalog import context

    if model.rope_scaling == "none" or seq_len is None:
        return None
    config = AutoConfig.from_pretrained(model.name, revision=model.revision, trust_remote_code=model.trust_remote_code)
    text = config.get_text_config()
    native = getattr(text, "max_position_embeddings", None)
    if not isinstance(native, int) or seq_len <= native or getattr(text, "alibi", False):
        return None
    current = getattr(text, "rope_parameters", None)
    if not isinstance(current, dict) or "rope_theta" not in current:
        raise UsageError(
            f"model.rope_scaling={model.rope_scaling}: {model.name} has no rotary position embeddings to stretch",
            f"set data.max_seq_len to {native} or less",
        )
    if current.get("rope_type", "default") != "default":
        raise UsageError(
            f"model.rope_scaling={model.rope_scaling}: {model.name} already scales RoPE ({current['rope_type']}) "
            f"to its {native} tokens",
            f"set data.max_seq_len to {native} or less",
        )
    text.rope_parameters = context.rope_parameters(model.rope_scaling, seq_len, native, current)
    text.validate_rope()
    return config


def load_base(
    model: ModelSpec,
    quant: QuantSpec,
    attn: str = "sdpa",
    device_map: Any = None,
    quant_storage: str | None = None,
    seq_len: int | None = None,
) -> PreTrainedModel:
    """Load the base model quantized as the spec says, with ``use_cache`` off for training.

    ``quant_storage`` packs 4-bit codes into that float dtype instead of uint8, so FSDP can shard them
    (``qlora_kit.train.distributed``); the packed bytes are the same. ``seq_len`` is the longest sequence the
    model will see: past the native context, ``model.rope_scaling`` stretches RoPE to it."""
    from transformers import AutoModelForCausalLM

    _check_local(model.name, model.revision, model.trust_remote_code)

    kwargs: dict[str, Any] = {
        "dtype": torch_dtype(quant.compute_dtype),
        "attn_implementation": attn,
        "revision": model.revision,
        "trust_remote_code": model.trust_remote_code,
    }
    config = bnb_config(quant)
    if config is not None:
        if quant_storage is not None and config.load_in_4bit:
            config.bnb_4bit_quant_storage = torch_dtype(quant_storage)
        kwargs["quantization_config"] = config
    if device_map is not None:
        kwargs["device_map"] = device_map
    try:
        stretched = stretched_config(model, seq_len)
        if stretched is not None:
            kwargs["config"] = stretched
        base = AutoModelForCausalLM.from_pretrained(model.name, **kwargs)
    except OSError as exc:
        raise UsageError(
            f"cannot load model {model.name!r}: {str(exc).splitlines()[0]}",
            "check the name or path (no network: use a local directory)",
        ) from None
    except Exception as exc:  # safetensors' SafetensorError on a truncated file, a bad config value
        if type(exc).__name__ != "SafetensorError" and not isinstance(exc, (ValueError, KeyError)):
            raise
        raise UsageError(
            f"cannot load model {model.name!r}: its weights or config are damaged "
            f"({str(exc).splitlines()[0][:160] if str(exc) else type(exc).__name__})",
            "restore the model files (a truncated download? fetch it again)",
        ) from None
    base.config.use_cache = False
    keep_4bit_weights_as_trained(base)
    return base


def keep_4bit_weights_as_trained(model: Any) -> None:
    """Stop bitsandbytes from repacking 4-bit weights on the first CPU inference forward.

    On CPUs with AVX512-BF16, ``Linear4bit.forward`` in eval mode without grad permanently repacks
    the weight and rounds its absmax to bf16 (``_convert_weight_packed_for_cpu``): an evaluation in
    the middle of training would change the base the adapter trains against, and the adapter model
    would no longer compute what export merges. The layer's own switch turns it off.
    """
    for module in model.modules():
        if hasattr(module, "support_avx512bf16_for_cpu"):
            module.support_avx512bf16_for_cpu = False


def materialize_random_init(model: ModelSpec, target: Path, seed: int) -> ModelSpec:
    """Write a random-init checkpoint of ``model``'s config (and its tokenizer files) to ``target``.

    The weights are a function of the config and ``seed``, so an existing ``target`` made from the same
    config is reused; export later loads the base from there.
    """
    from transformers import AutoConfig, AutoModelForCausalLM

    source = Path(model.name)
    if not (source / "config.json").is_file():
        raise UsageError(
            f"model.random_init needs a directory with config.json, got {model.name!r}",
            "point model.name at a config directory",
        )
    stamp = json.dumps({"config": read_config(source / "config.json"), "seed": seed}, sort_keys=True)
    if not (
        target.is_dir()
        and (target / ".random-init.json").is_file()
        and (target / ".random-init.json").read_text() == stamp
    ):
        with writing(target, "the random-init base"), staged_dir(target, f".tmp-{target.name}") as tmp:
            with torch.random.fork_rng(devices=[]):  # the caller's random state is left as it was
                torch.manual_seed(seed)
                config = AutoConfig.from_pretrained(source)
                AutoModelForCausalLM.from_config(config).save_pretrained(tmp)
            for item in source.iterdir():
                if item.is_file() and item.name != "config.json":
                    shutil.copy(item, tmp / item.name)
            (tmp / ".random-init.json").write_text(stamp)
    return dataclasses.replace(model, name=str(target), random_init=False)


def load_tokenizer(model: ModelSpec) -> Any:
    from transformers import AutoTokenizer

    _check_local(model.name, model.revision, model.trust_remote_code)

    try:
        tokenizer = AutoTokenizer.from_pretrained(
            model.name, revision=model.revision, trust_remote_code=model.trust_remote_code
        )
    except OSError as exc:
        raise UsageError(
            f"cannot load the tokenizer of {model.name!r}: {str(exc).splitlines()[0]}",
            "the model directory needs tokenizer files",
        ) from None
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer
