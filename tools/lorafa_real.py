"""LoRA, LoRA-FA and LoRA-FA with the paper's gradient correction on a real model, same seed and steps.

Usage:
    python tools/real_model.py                    # once: ./models/smollm2-135m
    python tools/lorafa_real.py [--steps 20]      # the table on stdout (each variant in its own process)

Each variant trains ``recipes/smollm2/135m_text.yaml`` (SmolLM2-135M-Instruct, NF4, r=16 all-linear, the
bundled quotes, 5% held out) through ``qlora_kit.train.loop`` for ``--steps`` steps with the same seed,
data order and learning-rate schedule, evaluating the held-out split once at the end, in a fresh process
so that its peak RSS is its own. Step time: the median of the per-step wall times (the evaluation excluded).
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
RECIPE = ROOT / "recipes" / "smollm2" / "135m_text.yaml"
VARIANTS = {
    "LoRA": {"lora.variant": "lora"},
    "LoRA-FA": {"lora.variant": "lora-fa"},
    "LoRA-FA + correction": {"lora.variant": "lora-fa", "lora.fa_correction": "true"},
}


def run_one(variant: str, steps: int, out: Path) -> dict[str, float]:
    """Train one variant in this process; its held-out loss, median step time and peak RSS."""
    from qlora_kit.recipe import load_recipe
    from qlora_kit.train.loop import train
    from qlora_kit.train.outputs import SilentReporter

    sets = {
        **VARIANTS[variant],
        "train.output_dir": str(out),
        "train.max_steps": steps,
        "train.eval_steps": steps,
        "train.save_steps": 0,
        "train.logging_steps": 1,
    }
    recipe = load_recipe(RECIPE, [f"{k}={v}" for k, v in sets.items()])
    train(recipe, SilentReporter())
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    elapsed = [r["elapsed_s"] for r in rows]
    return {
        "eval_loss": next(r["eval_loss"] for r in reversed(rows) if "eval_loss" in r),
        "train_loss": rows[-1]["loss"],
        "step_s": statistics.median(b - a for a, b in itertools.pairwise(elapsed)),
        "peak_rss_gib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=20, help="training steps per variant (default 20)")
    parser.add_argument("--one", choices=list(VARIANTS), help=argparse.SUPPRESS)
    parser.add_argument("--out", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.one:
        print(json.dumps(run_one(args.one, args.steps, args.out)))
        return 0
    if not (ROOT / "models" / "smollm2-135m" / "config.json").is_file():
        print("error: ./models/smollm2-135m is missing: run python tools/real_model.py first", file=sys.stderr)
        return 1
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        for i, variant in enumerate(VARIANTS):
            cmd = [sys.executable, __file__, "--one", variant, "--steps", str(args.steps), "--out", f"{tmp}/{i}"]
            done = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, env={**os.environ})
            if done.returncode != 0:
                print(f"error: {variant} failed: {(done.stderr.strip().splitlines() or ['?'])[-1]}", file=sys.stderr)
                return 1
            results[variant] = json.loads(done.stdout.strip().splitlines()[-1])
            print(f"{variant}: {results[variant]}", file=sys.stderr)
    print(
        f"`python tools/lorafa_real.py --steps {args.steps}` (SmolLM2-135M-Instruct, NF4, r=16 all-linear, seed 42):\n"
    )
    print("| variant | held-out loss | train loss (last step) | median step time | peak RSS |")
    print("|---|---:|---:|---:|---:|")
    for variant, r in results.items():
        print(
            f"| {variant} | {r['eval_loss']:.4f} | {r['train_loss']:.4f} | {r['step_s']:.2f} s "
            f"| {r['peak_rss_gib']:.2f} GiB |"
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
