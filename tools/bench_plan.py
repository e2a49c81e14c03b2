"""Cold start time of `qlora-kit plan`, next to a bare Python start in the same run.

    python tools/bench_plan.py [--runs 10]

Each run is a fresh interpreter (`python -m qlora_kit plan --model opt-6.7b --gpu 24GB --json`), so
imports are paid every time, as a user pays them. The baseline is `python -c pass` and, for scale,
`python -c "import torch"` (what the planner avoids importing).
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import time

PLAN = [sys.executable, "-m", "qlora_kit", "plan", "--model", "opt-6.7b", "--gpu", "24GB"]
CASES = {
    "python -c pass (baseline)": [sys.executable, "-c", "pass"],
    "qlora-kit plan --model opt-6.7b --gpu 24GB": PLAN,
    "qlora-kit plan ... --json": [*PLAN, "--json"],
    "python -c 'import torch' (for scale)": [sys.executable, "-c", "import torch"],
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=10)
    args = parser.parse_args()
    times: dict[str, list[float]] = {name: [] for name in CASES}
    for _ in range(args.runs):  # interleaved, so drift hits every case alike
        for name, cmd in CASES.items():
            start = time.perf_counter()
            subprocess.run(cmd, check=True, capture_output=True)
            times[name].append(time.perf_counter() - start)
    base = statistics.median(times["python -c pass (baseline)"])
    print(f"| command | median of {args.runs} cold runs | ratio to bare python |")
    print("|---|---:|---:|")
    for name, ts in times.items():
        med = statistics.median(ts)
        print(f"| `{name}` | {med * 1000:.0f} ms | {med / base:.1f}x |")


if __name__ == "__main__":
    main()
