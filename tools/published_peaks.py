"""The planner next to published GPU memory measurements, as a markdown table.

    python tools/published_peaks.py            # print the table
    python tools/published_peaks.py --write    # refresh it in README.md (between the markers)
    python tools/published_peaks.py --check    # exit 1 if README.md's table is stale

Rows and sources: qlora_kit/data/published_peaks.csv (a copy of shared/reference/published_peaks.csv).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from qlora_kit.published import compare, median_abs_error

README = Path(__file__).resolve().parent.parent / "README.md"
START, END = "<!-- published:start -->", "<!-- published:end -->"


def table() -> str:
    rows = compare()
    lines = ["| id | model | setting | quantity | measured | planner | error |", "|---|---|---|---|---:|---:|---:|"]
    for r in rows:
        lines.append(
            f"| {r.row_id} | {r.model} | {r.setting} | {r.quantity} | {r.measured:g} {r.unit} | "
            f"{r.predicted:.2f} {r.unit} | {r.error:+.1%} |"
        )
    lines.append(f"\nMedian absolute error over {len(rows)} rows: **{median_abs_error(rows):.1%}**.")
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    group = parser.add_mutually_exclusive_group()
    group.add_argument("--write", action="store_true")
    group.add_argument("--check", action="store_true")
    args = parser.parse_args()
    text = table()
    if not (args.write or args.check):
        print(text)
        return 0
    readme = README.read_text()
    head, _, rest = readme.partition(START)
    _, _, tail = rest.partition(END)
    fresh = f"{head}{START}\n{text}\n{END}{tail}"
    if args.check:
        if fresh != readme:
            print("README.md's published-measurements table is stale: run tools/published_peaks.py --write")
            return 1
        return 0
    README.write_text(fresh)
    return 0


if __name__ == "__main__":
    sys.exit(main())
