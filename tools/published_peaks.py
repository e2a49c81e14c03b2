"""The planner next to published GPU memory measurements, as a markdown table.

    python tools/published_peaks.py            # print the table
    python tools/published_peaks.py --write    # refresh it in docs/published.md (between the markers)
    python tools/published_peaks.py --check    # exit 1 if docs/published.md's table is stale

Rows and sources: qlora_kit/resources/published_peaks.csv (a copy of shared/reference/published_peaks.csv).
"""

from __future__ import annotations

import sys

import doc_section

from qlora_kit.measure.published import compare, markdown_table

PAGE = "docs/published.md"
START, END = "<!-- published:start -->", "<!-- published:end -->"


def main() -> int:
    return doc_section.main(
        "published_peaks", PAGE, START, END, lambda: markdown_table(compare()), (__doc__ or "").splitlines()[0]
    )


if __name__ == "__main__":
    sys.exit(main())
