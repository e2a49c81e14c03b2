"""``qlora-kit generate``: complete a prompt with an adapter (or a merged model), streaming the text.

The model comes from :func:`qlora_kit.infer.load.load_for_inference`; this module builds the prompt,
checks it fits the model's context, runs transformers' ``generate`` and hands each finished piece of
text to a callback as it is produced. It never prints.

Chat template: used when the adapter was trained on ``format: chat`` data (its recipe says so), or,
without a recipe, when the tokenizer has a template and the model's name says it is a chat model
(chat, instruct, ``-it``). A tokenizer's template alone is not enough: base models ship templates too,
and the demo model's tokenizer has one but was trained on plain text. ``chat`` overrides.
"""

from __future__ import annotations

import copy
import math
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from qlora_kit.errors import UsageError

if TYPE_CHECKING:
    from qlora_kit.infer.load import LoadedInfo

_CHAT_NAME = re.compile(r"(chat|instruct|(^|[-_/])it($|[-_]))", re.IGNORECASE)


@dataclass(frozen=True)
class GenerateSpec:
    max_new_tokens: int = 128
    temperature: float = 0.0  # 0: greedy
    top_p: float = 1.0
    seed: int = 0


@dataclass
class Completion:
    text: str
    token_ids: list[int]
    prompt_tokens: int
    notes: list[str] = field(default_factory=list)


def check_spec(spec: GenerateSpec) -> None:
    if spec.max_new_tokens < 1:
        raise UsageError(f"--max-new-tokens must be at least 1, got {spec.max_new_tokens}", "e.g. 64")
    if not math.isfinite(spec.temperature) or spec.temperature < 0:
        raise UsageError(f"--temperature must be >= 0 and finite, got {spec.temperature}", "0 is greedy decoding")
    if not (math.isfinite(spec.top_p) and 0 < spec.top_p <= 1):
        raise UsageError(f"--top-p must be in (0, 1], got {spec.top_p}", "1.0 keeps every token")


def uses_chat_template(tokenizer: Any, info: LoadedInfo, chat: bool | None = None) -> bool:
    """Whether the prompt goes through the tokenizer's chat template (see the module docstring)."""
    has_template = bool(getattr(tokenizer, "chat_template", None))
    if chat is not None:
        if chat and not has_template:
            raise UsageError("--chat: the tokenizer has no chat template", "leave out --chat")
        return chat
    if info.recipe is not None:
        return (info.recipe.get("data") or {}).get("format") == "chat" and has_template
    return has_template and bool(_CHAT_NAME.search(info.base))


def prompt_ids(tokenizer: Any, text: str, chat: bool) -> list[int]:
    """The prompt as token ids: the chat template with a generation prompt, else the text with the
    tokenizer's special tokens (BOS), as ``data.tokenize`` tokenizes a prompt for training."""
    if chat:
        rendered = tokenizer.apply_chat_template(
            [{"role": "user", "content": text}], tokenize=False, add_generation_prompt=True
        )
        return list(tokenizer(rendered, add_special_tokens=False)["input_ids"])
    return list(tokenizer(text, add_special_tokens=True)["input_ids"])


def context_length(model: Any) -> int | None:
    config = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
    for name in ("max_position_embeddings", "n_positions", "max_sequence_length", "seq_length"):
        value = getattr(config, name, None)
        if isinstance(value, int) and value > 0:
            return value
    return None


def generate(
    model: Any,
    tokenizer: Any,
    ids: list[int],
    spec: GenerateSpec,
    on_text: Callable[[str], None] | None = None,
) -> Completion:
    """Complete ``ids``: greedy when ``spec.temperature`` is 0, else sampled (seeded by ``spec.seed``).

    Raises :class:`UsageError` when the prompt does not fit the model's context; when prompt plus
    ``max_new_tokens`` does not, generates what fits and says so in ``notes``.
    """
    import torch

    check_spec(spec)
    if not ids:
        raise UsageError("the prompt is empty", "pass --prompt TEXT or --prompt-file FILE")
    notes: list[str] = []
    max_new = spec.max_new_tokens
    context = context_length(model)
    if context is not None:
        if len(ids) >= context:
            raise UsageError(
                f"the prompt is {len(ids):,} tokens, the model's context is {context:,}",
                "shorten the prompt",
            )
        if len(ids) + max_new > context:
            max_new = context - len(ids)
            notes.append(f"generated at most {max_new} tokens: prompt + --max-new-tokens exceed the context {context}")
    sample = spec.temperature > 0
    # the model's own generation config (its end-of-turn ids, repetition penalty), our decoding on top
    config = copy.deepcopy(model.generation_config)
    config.update(
        max_new_tokens=max_new,
        max_length=None,
        do_sample=sample,
        temperature=spec.temperature if sample else None,
        top_p=spec.top_p if sample else None,
        top_k=None,
        use_cache=True,
    )
    config.pad_token_id = tokenizer.pad_token_id
    if config.eos_token_id is None:
        config.eos_token_id = tokenizer.eos_token_id
    streamer = _streamer(tokenizer, on_text) if on_text is not None else None
    device = next(model.parameters()).device
    input_ids = torch.tensor([ids], device=device)
    torch.manual_seed(spec.seed)
    with torch.no_grad():
        out = model.generate(
            input_ids=input_ids,
            attention_mask=torch.ones_like(input_ids),
            generation_config=config,
            streamer=streamer,
        )
    new = out[0, len(ids) :].tolist()
    return Completion(tokenizer.decode(new, skip_special_tokens=True), new, len(ids), notes)


def compare(
    model: Any,
    tokenizer: Any,
    ids: list[int],
    spec: GenerateSpec,
    on_text: Callable[[str, str], None] | None = None,
) -> dict[str, Completion]:
    """The adapter's completion, then the base's (peft's ``disable_adapter``), same settings and seed.

    ``on_text(label, piece)`` gets an empty piece when each completion starts."""
    if not hasattr(model, "disable_adapter"):
        raise UsageError("--compare-base needs an adapter on its base", "use --adapter DIR, not --model")

    def sink(label: str) -> Callable[[str], None] | None:
        if on_text is None:
            return None
        on_text(label, "")  # a completion may be empty: announce each one
        return lambda piece: on_text(label, piece)

    adapted = generate(model, tokenizer, ids, spec, sink("adapter"))
    with model.disable_adapter():
        base = generate(model, tokenizer, ids, spec, sink("base"))
    return {"adapter": adapted, "base": base}


def _streamer(tokenizer: Any, on_text: Callable[[str], None]) -> Any:
    """transformers' ``TextStreamer`` (it decodes whole words and holds back partial characters),
    handing the finished text to a callback instead of printing it."""
    from transformers import TextStreamer

    class CallbackStreamer(TextStreamer):
        def on_finalized_text(self, text: str, stream_end: bool = False) -> None:
            if text:
                on_text(text)

    return CallbackStreamer(tokenizer, skip_prompt=True, skip_special_tokens=True)
