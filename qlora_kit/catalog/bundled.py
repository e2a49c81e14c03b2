"""Files that ship inside the package, named ``builtin:NAME`` in recipes.

``builtin:tiny-demo`` is a tiny llama-style config with an offline-trained tokenizer (no weights: the
demo recipe initializes them randomly); ``builtin:quotes`` is the quotes dataset (resources/quotes.jsonl);
``builtin:instructions`` is 300 short chats written for the project (tools/make_instructions.py).
"""

from __future__ import annotations

from importlib import resources

from qlora_kit.errors import UsageError

PREFIX = "builtin:"
FILES = {
    "tiny-demo": "resources/tiny-demo",
    "quotes": "resources/quotes.jsonl",
    "instructions": "resources/instructions.jsonl",  # chats written for the project (tools/make_instructions.py)
}


def resolve(name: str, kind: str = "file") -> str:
    """The path of a ``builtin:`` name; any other name unchanged. ``kind`` names it in errors."""
    if not name.startswith(PREFIX):
        return name
    key = name[len(PREFIX) :]
    if key not in FILES:
        raise UsageError(f"unknown built-in {kind} {name!r}", f"built-in: {', '.join(PREFIX + k for k in FILES)}")
    return str(resources.files("qlora_kit").joinpath(FILES[key]))
