"""The tokenizer as GGUF metadata: vocabulary, merges, token types, special tokens and chat template.

Read from the export's ``tokenizer.json`` (a safe JSON format; nothing is executed). Byte-level BPE
(GPT-2, Llama 3, Qwen2, SmolLM) is written as GGUF's ``gpt2`` tokenizer model, sentencepiece-style
BPE with byte fallback (Llama 2, Mistral, TinyLlama) as its ``llama`` model. A vocabulary shorter
than the embedding is padded with unused ``[PAD<i>]`` tokens (llama.cpp needs one token per row).
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from qlora_kit.errors import UsageError

# GGUF's token types (gguf.TokenType): 1 normal, 2 unknown, 3 control, 4 user-defined, 5 unused, 6 byte
NORMAL, UNKNOWN, CONTROL, USER_DEFINED, UNUSED, BYTE = 1, 2, 3, 4, 5, 6
_BYTE_TOKEN = re.compile(r"^<0x[0-9A-Fa-f]{2}>$")


@dataclass
class Vocab:
    model: str  # "gpt2" (byte-level BPE) or "llama" (sentencepiece-style BPE)
    pre: str  # the pre-tokenizer's name in llama.cpp's list ("default" when none is known)
    tokens: list[str]
    types: list[int]
    merges: list[str]
    scores: list[float] | None = None
    special: dict[str, int] = field(default_factory=dict)  # bos/eos/unk/pad -> id
    add_bos: bool | None = None
    add_eos: bool | None = None
    add_space_prefix: bool | None = None
    chat_template: str | None = None


def read_vocab(tokenizer_dir: Path, rows: int) -> Vocab:
    """The tokenizer in ``tokenizer_dir`` for an embedding of ``rows`` rows."""
    path = tokenizer_dir / "tokenizer.json"
    if not path.is_file():
        raise UsageError(
            f"{tokenizer_dir} has no tokenizer.json, which the GGUF export reads the vocabulary from",
            "save the tokenizer with a fast (tokenizers) backend next to the base or the adapter",
        )
    data = json.loads(path.read_text())
    model = data.get("model") or {}
    if model.get("type") != "BPE":
        raise UsageError(
            f"the tokenizer is a {model.get('type')} model; the GGUF export writes BPE tokenizers only",
            "export with --format hf and convert with llama.cpp's convert_hf_to_gguf.py",
        )
    byte_level = "ByteLevel" in json.dumps(data.get("pre_tokenizer"))
    if not byte_level and not model.get("byte_fallback"):
        raise UsageError(
            "the tokenizer is BPE without byte-level pre-tokenization or byte fallback",
            "export with --format hf and convert with llama.cpp's convert_hf_to_gguf.py",
        )
    vocab: dict[str, int] = dict(model["vocab"])
    added = {t["content"]: t for t in data.get("added_tokens") or []}
    for content, token in added.items():
        vocab[content] = int(token["id"])
    size = max(rows, max(vocab.values()) + 1)
    if size > rows:
        raise UsageError(
            f"the tokenizer has {size} tokens, the embedding {rows} rows",
            "export the tokenizer the model was trained with",
        )
    tokens = [f"[PAD{i}]" for i in range(size)]
    types = [UNUSED] * size
    unk = model.get("unk_token")
    for content, index in vocab.items():
        tokens[index] = content
        if content in added:
            types[index] = CONTROL if added[content].get("special") else USER_DEFINED
        elif content == unk:
            types[index] = UNKNOWN
        elif not byte_level and _BYTE_TOKEN.match(content):
            types[index] = BYTE
        else:
            types[index] = NORMAL
    merges = [m if isinstance(m, str) else " ".join(m) for m in model.get("merges") or []]
    config = _tokenizer_config(tokenizer_dir)
    out = Vocab("gpt2" if byte_level else "llama", _pre_name(data) if byte_level else "default", tokens, types, merges)
    if not byte_level:
        out.scores = [-float(i) for i in range(size)]  # sentencepiece-BPE pieces rank in id order
        out.add_space_prefix = '"prepend_scheme": "never"' not in json.dumps(data.get("pre_tokenizer"))
    for role in ("bos", "eos", "unk", "pad"):
        name = _token_name(config.get(f"{role}_token"))
        if name is not None and name in vocab:
            out.special[role] = vocab[name]
    out.add_bos, out.add_eos = _adds(data, out.special)
    if "add_bos_token" in config:
        out.add_bos = bool(config["add_bos_token"])
    if "add_eos_token" in config:
        out.add_eos = bool(config["add_eos_token"])
    out.chat_template = _chat_template(tokenizer_dir, config)
    return out


def _tokenizer_config(tokenizer_dir: Path) -> dict[str, Any]:
    path = tokenizer_dir / "tokenizer_config.json"
    config: dict[str, Any] = json.loads(path.read_text()) if path.is_file() else {}
    special = tokenizer_dir / "special_tokens_map.json"
    if special.is_file():
        for key, value in json.loads(special.read_text()).items():
            config.setdefault(key, value)
    return config


def _token_name(value: Any) -> str | None:
    if isinstance(value, dict):
        return str(value.get("content")) if value.get("content") is not None else None
    return value if isinstance(value, str) else None


def _adds(data: dict[str, Any], special: dict[str, int]) -> tuple[bool | None, bool | None]:
    """Whether the post-processor puts BOS first / EOS last on a single sequence."""
    post = data.get("post_processor") or {}
    processors = post.get("processors", [post]) if post.get("type") == "Sequence" else [post]
    template = next((p for p in processors if p.get("type") == "TemplateProcessing"), None)
    if template is None or not template.get("single"):
        return None, None
    names = template.get("special_tokens") or {}

    def is_role(item: dict[str, Any], role: str) -> bool:
        tok = (item.get("SpecialToken") or {}).get("id")
        return tok is not None and special.get(role) in (names.get(tok) or {}).get("ids", [])

    single = template["single"]
    return is_role(single[0], "bos"), is_role(single[-1], "eos")


def _pre_name(data: dict[str, Any]) -> str:
    """llama.cpp's name for the split regex of a byte-level tokenizer, by the regex itself (transformers'
    GGUF reader keeps the table that maps names to regexes); ``default`` for GPT-2's built-in one."""
    text = json.dumps(data.get("pre_tokenizer"))
    patterns = re.findall(r'"Regex": ("(?:[^"\\]|\\.)*")', text)
    if not patterns:
        return "default"
    try:
        from transformers.integrations.gguf.gguf_tokenizer_mapping import GGUF_PRE_TOKENIZER_SPLITS
    except ImportError:
        return "default"
    wanted = json.loads(patterns[0])
    return next((name for name, regex in GGUF_PRE_TOKENIZER_SPLITS.items() if regex == wanted), "default")


def _chat_template(tokenizer_dir: Path, config: dict[str, Any]) -> str | None:
    jinja = tokenizer_dir / "chat_template.jinja"
    if jinja.is_file():
        return jinja.read_text()
    template = config.get("chat_template")
    if isinstance(template, list):  # named templates: GGUF holds the default one
        named = {t.get("name"): t.get("template") for t in template if isinstance(t, dict)}
        template = named.get("default")
    return template if isinstance(template, str) else None


def add_vocab(writer: Any, vocab: Vocab) -> None:
    """Write ``vocab`` into a ``gguf.GGUFWriter``'s key-value section."""
    writer.add_tokenizer_model(vocab.model)
    writer.add_tokenizer_pre(vocab.pre)
    writer.add_token_list(vocab.tokens)
    writer.add_token_types(vocab.types)
    if vocab.scores is not None:
        writer.add_token_scores(vocab.scores)
    if vocab.merges:
        writer.add_token_merges(vocab.merges)
    adders = {
        "bos": writer.add_bos_token_id,
        "eos": writer.add_eos_token_id,
        "unk": writer.add_unk_token_id,
        "pad": writer.add_pad_token_id,
    }
    for role, index in vocab.special.items():
        adders[role](index)
    if vocab.add_bos is not None:
        writer.add_add_bos_token(vocab.add_bos)
    if vocab.add_eos is not None:
        writer.add_add_eos_token(vocab.add_eos)
    if vocab.add_space_prefix is not None:
        writer.add_add_space_prefix(vocab.add_space_prefix)
    if vocab.chat_template:
        writer.add_chat_template(vocab.chat_template)
