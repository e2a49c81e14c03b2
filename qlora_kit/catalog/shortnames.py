"""Names people type for catalog models: ``mistral-7b``, ``mixtral-8x7b``, ``llama3-8b``, ``qwen-7b``.

Pure string work on the catalog's normalized keys (lower case, no organisation, no ``-hf`` suffix or
``meta-`` prefix: :func:`qlora_kit.catalog.models.lookup` makes them). Each key answers to:

- itself, with or without a hyphen between a family and its version (:func:`squash`):
  ``llama-3.1-8b``, ``llama3.1-8b``; ``gemma-2-9b``, ``gemma2-9b``;
- itself without the release suffix ``-v0.1`` / ``-2410``: ``mistralai/Mistral-7B-v0.1`` -> ``mistral-7b``;
- that without the family's version number as well: ``Qwen/Qwen2.5-7B`` -> ``qwen-7b``,
  ``meta-llama/Llama-3.1-8B`` -> ``llama-8b``, when what is left still names a size (``phi-mini-4k-instruct``
  but never a bare family).

A key always means its own entry. A short form names a model only when exactly one entry has it; a form
several entries share (``llama-8b``: Llama 3 and Llama 3.1) is ambiguous and the error lists their keys.
No form drops a size, an ``-instruct`` or a major version by guessing (``qwen2-7b`` is another model).
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass

_RELEASE = re.compile(r"-(v\d+(\.\d+)*|\d{4})$")  # -v0.1, -v0.3, -2410
_VERSIONED = re.compile(r"^([a-z]+)-?(\d+(\.\d+)?)-(.+)$")  # llama-3.1-8b, qwen2.5-7b, gemma-2-9b
_FAMILY_HYPHEN = re.compile(r"(?<=[a-z])[-_](?=\d)")  # llama-3 -> llama3, mistral-7b -> mistral7b


def squash(name: str) -> str:
    """The form names are compared in: a hyphen (or underscore) between a letter and a digit dropped."""
    return _FAMILY_HYPHEN.sub("", name)


def short_forms(key: str) -> list[str]:
    """The short forms of a normalized catalog key (the key itself excluded), most specific first."""
    forms: list[str] = []
    bare = _RELEASE.sub("", key)
    if bare != key:
        forms.append(bare)
    m = _VERSIONED.match(bare)
    if m and any(c.isdigit() for c in m.group(4)):  # the rest still names a size: llama-8b, not llama-mini
        forms.append(f"{m.group(1)}-{m.group(4)}")
    return forms


@dataclass(frozen=True)
class ShortNames:
    """Every name that resolves: the keys as written and squashed, the forms of one entry, of several."""

    keys: dict[str, str]  # key -> hub id
    exact: dict[str, str]  # squashed key -> hub id
    unique: dict[str, str]  # squashed short form -> hub id
    several: dict[str, tuple[str, ...]]  # squashed short form -> the hub ids sharing it
    shown: dict[str, tuple[str, ...]]  # hub id -> its short forms that resolve, as written
    ambiguous: dict[str, tuple[str, ...]]  # a short form several entries share, as written -> their hub ids

    def candidates(self, key: str, org: str = "") -> tuple[str, ...]:
        """The hub ids a normalized name may mean: one, several (ambiguous) or none.

        A key as written means its entry under any organisation (``facebook/opt-6.7b``, ``FACEBOOK/OPT-6.7B``);
        any other spelling only with no organisation or the entry's own: ``someone/mistral-7b`` is
        someone's model on the hub, not the catalog's."""
        if key in self.keys:
            return (self.keys[key],)
        s = squash(key)
        one = self.exact.get(s) or self.unique.get(s)
        found = (one,) if one else self.several.get(s, ())
        return tuple(h for h in found if not org or h.lower().startswith(org.lower() + "/"))


def build(pairs: Iterable[tuple[str, str]]) -> ShortNames:
    """From (normalized key, hub id) pairs. A form that is some entry's own key is left to that entry."""
    entries = list(pairs)
    exact = {squash(k): hf_id for k, hf_id in entries}
    seen: dict[str, list[tuple[str, str]]] = {}
    for key, hf_id in entries:
        for form in short_forms(key):
            s = squash(form)
            if s not in exact and hf_id not in [h for _, h in seen.get(s, [])]:
                seen.setdefault(s, []).append((form, hf_id))
    unique = {s: found[0][1] for s, found in seen.items() if len(found) == 1}
    several = {s: tuple(h for _, h in found) for s, found in seen.items() if len(found) > 1}
    shown: dict[str, tuple[str, ...]] = {}
    for found in seen.values():
        if len(found) == 1:
            form, hf_id = found[0]
            shown[hf_id] = (*shown.get(hf_id, ()), form)
    ambiguous = {found[0][0]: several[s] for s, found in seen.items() if s in several}
    return ShortNames(dict(entries), exact, unique, several, shown, ambiguous)
