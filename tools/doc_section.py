"""Print a generated section, or keep it up to date in a docs page between two markers (shared by the tools
whose results the docs show: each tool names its page, e.g. ``docs/published.md``)."""

from __future__ import annotations

import argparse
from collections.abc import Callable
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def between(page: str, start: str, end: str) -> tuple[str, str, str] | None:
    """The page's text before ``start``, between the markers, and after ``end``; None when a marker is missing."""
    text = (ROOT / page).read_text()
    if start not in text or end not in text.partition(start)[2]:
        return None
    head, _, rest = text.partition(start)
    body, _, tail = rest.partition(end)
    return head, body, tail


def write(page: str, text: str) -> None:
    """The whole page, written to a temporary file and renamed into place (never half-written)."""
    path = ROOT / page
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(text)
    tmp.replace(path)


def main(name: str, page: str, start: str, end: str, make_text: Callable[[], str], description: str) -> int:
    """``--write`` puts ``make_text()`` between ``start`` and ``end`` in ``page`` (relative to the repository);
    ``--check`` fails when it is stale; neither prints it."""
    parser = argparse.ArgumentParser(description=description)
    group = parser.add_mutually_exclusive_group()
    group.add_argument("--write", action="store_true", help=f"update {page} between the markers")
    group.add_argument("--check", action="store_true", help=f"exit 1 if {page}'s section is stale")
    args = parser.parse_args()
    if not (args.write or args.check):
        print(make_text())
        return 0
    parts = between(page, start, end)
    if parts is None:
        print(f"{page} has no {start} ... {end} markers: put them back where the section belongs")
        return 1
    head, body, tail = parts
    text = make_text()
    if args.check:
        if body != f"\n{text}\n":
            print(f"{page}'s {name} section is stale: run tools/{name}.py --write")
            return 1
        return 0
    write(page, f"{head}{start}\n{text}\n{end}{tail}")
    return 0
