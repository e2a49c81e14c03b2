"""Print a generated table, or keep it up to date in README.md between two markers (shared by the tools
whose results the README shows)."""

from __future__ import annotations

import argparse
from collections.abc import Callable
from pathlib import Path

README = Path(__file__).resolve().parent.parent / "README.md"


def main(name: str, start: str, end: str, make_text: Callable[[], str], description: str) -> int:
    """``--write`` puts ``make_text()`` between ``start`` and ``end``; ``--check`` fails when it is stale."""
    parser = argparse.ArgumentParser(description=description)
    group = parser.add_mutually_exclusive_group()
    group.add_argument("--write", action="store_true", help="update README.md between the markers")
    group.add_argument("--check", action="store_true", help="exit 1 if README.md's table is stale")
    args = parser.parse_args()
    text = make_text()
    if not (args.write or args.check):
        print(text)
        return 0
    readme = README.read_text()
    if start not in readme or end not in readme:
        print(f"README.md has no {start} ... {end} markers")
        return 1
    head, _, rest = readme.partition(start)
    _, _, tail = rest.partition(end)
    fresh = f"{head}{start}\n{text}\n{end}{tail}"
    if args.check:
        if fresh != readme:
            print(f"README.md's {name} table is stale: run tools/{name}.py --write")
            return 1
        return 0
    README.write_text(fresh)
    return 0
