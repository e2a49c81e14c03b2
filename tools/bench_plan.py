"""Cold start time of `qlora-kit plan`, next to a bare Python start in the same run.

    python tools/bench_plan.py [--runs 10]            # print the table
    python tools/bench_plan.py --runs 10 --write      # ... and put it in docs/benchmarks.md (between the markers)

Each run is a fresh interpreter (`python -m qlora_kit plan --model opt-6.7b --gpu 24GB`, with and without `--json`), so
imports are paid every time, as a user pays them. The baseline is `python -c pass` and, for scale,
`python -c "import torch"` (what the planner avoids importing).
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import time

import doc_section

PLAN = [sys.executable, "-m", "qlora_kit", "plan", "--model", "opt-6.7b", "--gpu", "24GB"]
CASES = {
    "python -c pass (baseline)": [sys.executable, "-c", "pass"],
    "qlora-kit plan --model opt-6.7b --gpu 24GB": PLAN,
    "qlora-kit plan ... --json": [*PLAN, "--json"],
    "python -c 'import torch' (for scale)": [sys.executable, "-c", "import torch"],
}
PAGE = "docs/benchmarks.md"
START, END = "<!-- bench-plan:start -->", "<!-- bench-plan:end -->"


def table(runs: int) -> str:
    """Each case run ``runs`` times, interleaved so drift hits every case alike; medians as a markdown table."""
    times: dict[str, list[float]] = {name: [] for name in CASES}
    for _ in range(runs):
        for name, cmd in CASES.items():
            start = time.perf_counter()
            subprocess.run(cmd, check=True, capture_output=True)
            times[name].append(time.perf_counter() - start)
    base = statistics.median(times["python -c pass (baseline)"])
    lines = [f"| command | median of {runs} cold runs | ratio to bare python |", "|---|---:|---:|"]
    for name, ts in times.items():
        med = statistics.median(ts)
        lines.append(f"| `{name}` | {med * 1000:.0f} ms | {med / base:.1f}x |")
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=10)
    parser.add_argument("--write", action="store_true", help=f"also put the table in {PAGE} between the markers")
    args = parser.parse_args()
    found = doc_section.between(PAGE, START, END) if args.write else None
    if args.write and found is None:  # before the minutes of measuring
        print(f"{PAGE} has no {START} ... {END} markers: put them back where the table belongs")
        return 1
    text = table(args.runs)
    print(text)
    if found is not None:
        head, _, tail = found
        doc_section.write(PAGE, f"{head}{START}\n{text}\n{END}{tail}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
