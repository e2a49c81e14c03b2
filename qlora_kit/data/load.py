"""Data: a recipe's ``data`` section -> tokenized examples -> deterministic, resumable micro-batches.

    raw = load_raw(spec)                          # datasets.Dataset, columns checked
    data = tokenize(spec, raw, tokenizer)         # TokenizedData: train/eval examples + counts
    stream = BatchStream(data.train, micro_batch, spec.max_seq_len, spec.packing, pad_id, seed)
    batch = next(stream)                          # {"input_ids", "labels"[, "attention_mask"]}

An example is ``{"input_ids": [...], "labels": [...]}`` of equal length; a label of -100 is not
learned (the prompt of a prompt/response pair, the non-assistant turns of a chat, padding). The
model shifts labels itself, so ``labels[0]`` is never a target.

Never touches the model. ``datasets`` and ``torch`` are imported where used: importing this module
is cheap.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from qlora_kit.errors import UsageError
from qlora_kit.recipe import DataSpec

if TYPE_CHECKING:
    from datasets import Dataset
    from transformers import PreTrainedTokenizerBase

IGNORE_INDEX = -100  # the label transformers' causal-LM loss skips
# file suffix -> datasets builder
BUILDERS = {".jsonl": "json", ".json": "json", ".csv": "csv", ".parquet": "parquet", ".txt": "text"}
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[\w.-]+)?$")

Example = dict[str, list[int]]


# -- loading ------------------------------------------------------------------------------------------


def resolve_data_path(path: str) -> str:
    """``builtin:<name>`` -> the packaged file; any other path or hub id unchanged."""
    from qlora_kit.catalog.bundled import resolve

    return resolve(path, kind="dataset")


def load_raw(spec: DataSpec) -> Dataset:
    """Load ``spec.path`` (a local file, ``builtin:quotes`` or a hub dataset id) and check its columns.

    Raises :class:`UsageError` for a missing or unreadable file, an unsupported extension, an empty
    dataset, an unknown split, a missing column or a column of the wrong type, and for a hub id when
    offline.
    """
    if not spec.path:
        raise UsageError(
            "data.path is not set", "set data.path to a .jsonl/.json/.csv/.parquet/.txt file or builtin:quotes"
        )
    path = resolve_data_path(spec.path)
    raw = _load_local(path, spec.split) if _is_local(path) else _load_hub(path, spec.split)
    if len(raw) == 0:
        raise UsageError(f"dataset {spec.path!r} (split {spec.split!r}) has no rows", "point data.path at data")
    _check_columns(spec, raw)
    return raw


def _is_local(path: str) -> bool:
    return Path(path).suffix.lower() in BUILDERS or os.path.exists(path) or not _HUB_ID.match(path)


def _load_local(path: str, split: str) -> Dataset:
    file = Path(path).expanduser()
    if not file.exists():
        raise UsageError(
            f"data file {path} does not exist", "check data.path (relative paths start at the working directory)"
        )
    if file.is_dir():
        raise UsageError(f"data path {path} is a directory", f"name one file: {', '.join(BUILDERS)}")
    builder = BUILDERS.get(file.suffix.lower())
    if builder is None:
        raise UsageError(
            f"data file {path} has an unsupported extension {file.suffix or '(none)'!r}",
            f"convert it to one of {', '.join(BUILDERS)}",
        )
    if _blank(file):
        raise UsageError(f"data file {path} is empty", "add samples, one per line for .jsonl/.txt")
    with _quiet_datasets():
        ds = _call_datasets(path, data_files=str(file), builder=builder, split=split)
        if builder == "text":  # one sample per line: blank lines are separators, not samples
            ds = ds.filter(lambda row: bool(row["text"].strip()))
    return ds


def _blank(file: Path, chunk_bytes: int = 1 << 16) -> bool:
    """Whether the file holds only whitespace (reads no further than its first non-blank chunk)."""
    with file.open("rb") as fh:
        while chunk := fh.read(chunk_bytes):
            if chunk.strip():
                return False
    return True


def _load_hub(name: str, split: str) -> Dataset:
    from qlora_kit.hub import offline_reason

    reason = offline_reason(("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE"))
    if reason:
        raise UsageError(
            f"cannot load hub dataset {name!r}: {reason}",
            "download it where there is network and point data.path at a local .jsonl or .parquet file",
        )
    with _quiet_datasets():
        return _call_datasets(name, split=split)


def _call_datasets(source: str, *, split: str, builder: str | None = None, data_files: str | None = None) -> Dataset:
    """``datasets.load_dataset``, its errors turned into one UsageError each."""
    import datasets

    try:
        if builder is not None:
            return datasets.load_dataset(builder, data_files=data_files, split=split)
        return datasets.load_dataset(source, split=split)
    except ValueError as exc:
        if "corresponds to no data" in str(exc):  # datasets' ArrowReader on a split of zero rows
            raise UsageError(f"dataset {source} (split {split!r}) has no rows", "point data.path at data") from exc
        if "split" in str(exc).lower():
            raise UsageError(f"{source}: {exc}", "set data.split to one of those splits") from exc
        raise UsageError(f"cannot load {source}: {exc}", "check the file's format") from exc
    except Exception as exc:  # datasets, pyarrow and hub errors: one line the user can act on
        if builder == "json" and data_files:
            _first_bad_line(data_files)
        cause = exc.__cause__ or exc
        first = str(cause).strip().splitlines()[0] if str(cause).strip() else type(cause).__name__
        raise UsageError(f"cannot load {source}: {first}", "check the file's format (or the dataset id)") from exc


def _first_bad_line(path: str) -> None:
    """Raise one line naming where a JSON or JSON Lines file stops being UTF-8 JSON.

    Runs only after datasets failed to read the file, so the common case reads the file once."""
    fix = "data.path must be UTF-8 JSON: one object per line for .jsonl"
    with open(path, "rb") as fh:
        lines = [(1, fh.read())] if not path.endswith(".jsonl") else list(enumerate(fh, 1))
    for number, raw in lines:
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError as exc:
            at = number if path.endswith(".jsonl") else raw[: exc.start].count(b"\n") + 1
            raise UsageError(f"data file {path}: line {at} is not UTF-8 text (a binary file?)", fix) from None
        if not text.strip():
            continue
        try:
            json.loads(text)
        except ValueError as exc:
            at = number if path.endswith(".jsonl") else getattr(exc, "lineno", 1)
            msg = getattr(exc, "msg", str(exc))
            raise UsageError(f"data file {path}: line {at} is not valid JSON ({msg})", f"fix it; {fix}") from None


@contextmanager
def _quiet_datasets() -> Iterator[None]:
    """datasets' progress bars and its log lines off (the CLI shows its own), restored afterwards."""
    import datasets

    bars = datasets.is_progress_bar_enabled()
    level = datasets.logging.get_verbosity()
    datasets.disable_progress_bars()
    datasets.logging.set_verbosity(datasets.logging.CRITICAL)  # its JSON reader logs the error it raises
    try:
        yield
    finally:
        datasets.logging.set_verbosity(level)
        if bars:
            datasets.enable_progress_bars()


_FIELDS = {"text": ("text_field",), "prompt_response": ("prompt_field", "response_field"), "chat": ("messages_field",)}


def _check_columns(spec: DataSpec, raw: Dataset) -> None:
    features = raw.features
    for setting in _FIELDS[spec.format]:
        name = getattr(spec, setting)
        if name not in features:
            raise UsageError(
                f"column {name!r} (data.{setting}, format {spec.format}) is not in the dataset; "
                f"columns: {', '.join(features) or '(none)'}",
                f"set data.{setting} to one of the columns",
            )
        feature = features[name]
        if spec.format == "chat":
            inner = _list_item(feature)
            if not (isinstance(inner, Mapping) and {"role", "content"} <= set(inner)):
                raise UsageError(
                    f"column {name!r} must be a list of {{role, content}} messages, got {feature}",
                    'chat data looks like {"messages": [{"role": "user", "content": "..."}, ...]}',
                )
        elif getattr(feature, "dtype", None) not in ("string", "large_string"):
            raise UsageError(f"column {name!r} must hold text, got {feature}", "pick a text column or fix the data")


def _list_item(feature: Any) -> Any:
    """The element feature of a list feature (``List``/``LargeList``/``Sequence``, or ``[x]``), else None."""
    if isinstance(feature, list) and len(feature) == 1:
        return feature[0]
    if type(feature).__name__ in ("List", "LargeList", "Sequence"):
        return feature.feature
    return None


# -- tokenizing ---------------------------------------------------------------------------------------


@dataclass
class TokenizedData:
    """Tokenized examples and what happened to the rows on the way.

    ``samples``/``tokens`` count the kept examples (train + eval); ``truncated`` the examples cut to
    ``max_seq_len``; ``dropped`` the rows removed: too long under ``too_long: drop``, or with nothing left
    to learn (every label -100, e.g. a prompt longer than ``max_seq_len``); ``unmasked`` the chats whose
    template could not be split into turns, trained on every token.
    """

    train: list[Example]
    eval: list[Example] | None
    samples: int
    tokens: int
    truncated: int = 0
    dropped: int = 0
    unmasked: int = 0


def tokenize(
    spec: DataSpec, raw: Dataset | Sequence[Mapping[str, Any]], tokenizer: PreTrainedTokenizerBase, seed: int = 0
) -> TokenizedData:
    """Tokenize ``raw`` as ``spec.format`` says, append EOS, apply ``too_long``, split off the eval set.

    - ``text``: labels = input_ids.
    - ``prompt_response``: prompt (with the tokenizer's BOS) then response; the prompt's labels are -100.
    - ``chat``: ``tokenizer.apply_chat_template``; only assistant turns (with their end-of-turn tokens)
      are learned. That needs a fast tokenizer (offsets) and a template whose rendering of a prefix of
      the conversation is a prefix of the full rendering; a chat that fails this is learned whole and
      counted in ``unmasked``.

    ``eval_fraction`` of the kept examples (at least one) goes to ``eval``, chosen by a permutation
    seeded with ``seed``; both splits keep the data's order.
    """
    eos = tokenizer.eos_token_id
    if eos is None:
        raise UsageError("the tokenizer has no eos token", "use a tokenizer with an eos_token (or set one)")
    unmasked = 0
    if spec.format == "text":
        pairs = _text_examples(_strings(raw, spec.text_field), tokenizer)
    elif spec.format == "prompt_response":
        pairs = _prompt_response_examples(
            _strings(raw, spec.prompt_field), _strings(raw, spec.response_field), tokenizer
        )
    else:
        if not getattr(tokenizer, "chat_template", None):
            raise UsageError(
                "format chat needs a tokenizer with a chat_template",
                "use a chat model's tokenizer or format prompt_response",
            )
        pairs = []
        for i, messages in enumerate(_column(raw, spec.messages_field)):
            ids, labels, masked = _chat_example(_messages(messages, i, spec.messages_field), tokenizer, i)
            pairs.append((ids, labels))
            unmasked += not masked
    kept, truncated, dropped = _fit(pairs, eos, spec.max_seq_len, spec.too_long == "truncate")
    if not kept:
        raise UsageError(
            f"every one of the {len(pairs)} samples was dropped (longer than data.max_seq_len={spec.max_seq_len} "
            f"with too_long={spec.too_long}, or nothing left to learn)",
            "raise data.max_seq_len or set data.too_long=truncate",
        )
    train, evals = _split(kept, spec.eval_fraction, seed)
    return TokenizedData(
        train=train,
        eval=evals,
        samples=len(kept),
        tokens=sum(len(e["input_ids"]) for e in kept),
        truncated=truncated,
        dropped=dropped,
        unmasked=unmasked,
    )


def _column(raw: Any, name: str) -> list[Any]:
    if hasattr(raw, "column_names"):
        if name not in raw.column_names:
            raise UsageError(
                f"column {name!r} is not in the dataset; columns: {', '.join(raw.column_names)}", "fix data.*_field"
            )
        return list(raw[name])
    try:
        return [row[name] for row in raw]
    except KeyError:
        raise UsageError(f"column {name!r} is missing from a row", "every row needs the same fields") from None


def _strings(raw: Any, name: str) -> list[str]:
    values = _column(raw, name)
    for i, v in enumerate(values):
        if not isinstance(v, str):
            raise UsageError(f"row {i}: column {name!r} must be text, got {type(v).__name__} {v!r:.60}", "fix the data")
    return values


def _messages(value: Any, row: int, name: str) -> list[dict[str, str]]:
    ok = (
        isinstance(value, list)
        and value
        and all(
            isinstance(m, Mapping) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str)
            for m in value
        )
    )
    if not ok:
        raise UsageError(
            f"row {row}: column {name!r} must be a non-empty list of {{role, content}} strings, got {value!r:.80}",
            "fix the data",
        )
    return [{"role": m["role"], "content": m["content"]} for m in value]


def _text_examples(texts: list[str], tokenizer: Any) -> list[tuple[list[int], list[int]]]:
    ids = tokenizer(texts, add_special_tokens=True)["input_ids"] if texts else []
    return [(list(x), list(x)) for x in ids]


def _prompt_response_examples(
    prompts: list[str], responses: list[str], tokenizer: Any
) -> list[tuple[list[int], list[int]]]:
    # tokenized apart so the boundary is exact: no token straddles prompt and response
    p_ids = tokenizer(prompts, add_special_tokens=True)["input_ids"] if prompts else []
    r_ids = tokenizer(responses, add_special_tokens=False)["input_ids"] if responses else []
    return [(list(p) + list(r), [IGNORE_INDEX] * len(p) + list(r)) for p, r in zip(p_ids, r_ids, strict=True)]


def _render(tokenizer: Any, messages: list[dict[str, str]], generation_prompt: bool = False) -> str:
    text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=generation_prompt)
    return str(text)


def _assistant_spans(tokenizer: Any, messages: list[dict[str, str]], full: str) -> list[tuple[int, int]] | None:
    """Character spans of the assistant turns in ``full`` (header excluded), or None if the template
    does not render prefixes as prefixes."""
    spans = []
    for i, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        try:
            upto = _render(tokenizer, messages[: i + 1])
            heads = [_render(tokenizer, messages[:i], True)] + ([_render(tokenizer, messages[:i])] if i else [])
        except Exception:  # a template may refuse a partial conversation: fall back to learning it whole
            return None
        start = next((len(head) for head in heads if upto.startswith(head)), None)
        if start is None or not full.startswith(upto):
            return None
        spans.append((start, len(upto)))
    return spans


def _chat_example(messages: list[dict[str, str]], tokenizer: Any, row: int) -> tuple[list[int], list[int], bool]:
    try:
        full = _render(tokenizer, messages)
    except Exception as exc:  # templates raise (jinja2 errors) on conversations they do not accept
        raise UsageError(f"row {row}: the chat template refused the conversation: {exc}", "fix the data") from exc
    spans = _assistant_spans(tokenizer, messages, full) if getattr(tokenizer, "is_fast", False) else None
    if spans is None:
        ids = list(tokenizer(full, add_special_tokens=False)["input_ids"])
        return ids, list(ids), False
    enc = tokenizer(full, add_special_tokens=False, return_offsets_mapping=True)
    ids = list(enc["input_ids"])
    labels = [
        t if any(a <= s < b for a, b in spans) else IGNORE_INDEX
        for t, (s, _) in zip(ids, enc["offset_mapping"], strict=True)
    ]
    return ids, labels, True


def _fit(
    pairs: list[tuple[list[int], list[int]]], eos: int, max_len: int, truncate: bool
) -> tuple[list[Example], int, int]:
    """Append EOS (unless the sample already ends with it), then truncate or drop what is too long."""
    kept: list[Example] = []
    truncated = dropped = 0
    for ids, labels in pairs:
        if not ids or ids[-1] != eos:
            ids, labels = [*ids, eos], [*labels, eos]
        if len(ids) > max_len:
            if not truncate:
                dropped += 1
                continue
            ids, labels = ids[:max_len], labels[:max_len]
            truncated += 1
        if all(label == IGNORE_INDEX for label in labels[1:]):
            dropped += 1
            continue
        kept.append({"input_ids": ids, "labels": labels})
    return kept, truncated, dropped


def _split(examples: list[Example], fraction: float, seed: int) -> tuple[list[Example], list[Example] | None]:
    if fraction <= 0:
        return examples, None
    import torch

    n_eval = max(1, round(len(examples) * fraction))
    if n_eval >= len(examples):
        raise UsageError(
            f"data.eval_fraction={fraction} of {len(examples)} samples leaves nothing to train on",
            "lower data.eval_fraction or add data",
        )
    perm = torch.randperm(len(examples), generator=torch.Generator().manual_seed(seed)).tolist()
    eval_rows = set(perm[:n_eval])
    train = [e for i, e in enumerate(examples) if i not in eval_rows]
    return train, [e for i, e in enumerate(examples) if i in eval_rows]
