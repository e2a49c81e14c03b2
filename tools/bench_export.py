"""Peak memory and time of `qlora-kit export` against the usual peft merge, on one model, in one run.

    python tools/bench_export.py [--layers 12] [--hidden 1024] [--shard-size 50MB] [--repeats 3]

The model is a llama-style fp16 checkpoint built from a config (hidden 1024, 12 layers, vocab 32000:
~220M parameters, ~440 MB) and saved in several shards, with an all-linear rank-16 LoRA adapter
(random B, so the merge is not a no-op). Each path runs in a fresh interpreter, the paths alternate
(drift hits all alike), and the child's peak RSS comes from ``wait4`` (``ru_maxrss``):

- peft: ``from_pretrained`` (fp16) + ``PeftModel.from_pretrained`` + ``merge_and_unload`` + ``save_pretrained``;
- qlora-kit original: ``export(merge_into="original", verify=False)``, the same math as peft's merge;
- qlora-kit dequantized: ``export(verify=False)`` with the adapter recorded as trained on an NF4
  double-quant base (every linear weight through bitsandbytes' rounding, :mod:`qlora_kit.export.rounding`);
- qlora-kit dequantized + verify (once): the default, which also loads the adapter model and the export;
- qlora-kit gguf f16 / q8_0: ``export_gguf(verify=False)``, the same dequantized merge written as one
  GGUF file (the base carries the demo's 512-token BPE tokenizer, padded to the 32000 rows).

Time is the child's wall time from start to exit, imports included (``work s`` leaves them out).

Results (with the machine, versions and load they were taken under) are in docs/benchmarks.md, "qlora-kit export".
The export's own peak is a constant (torch + transformers imports, ~250 MiB, and ~100 MiB more that
building the model skeleton on the meta device imports: torch._dynamo, sympy) plus one 16-bit source
tensor and a few 4 MiB slices; the peft path's grows with the model.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

PATHS = ("peft", "qlora-kit original", "qlora-kit dequantized", "qlora-kit gguf f16", "qlora-kit gguf q8_0")
DEMO_TOKENIZER = Path(__file__).resolve().parents[1] / "qlora_kit" / "resources" / "tiny-demo"


def build(workdir: Path, layers: int, hidden: int, shard_size: str) -> tuple[Path, Path]:
    """The base checkpoint and its adapter (built once, reused while the config is the same)."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoConfig, AutoModelForCausalLM

    from qlora_kit.adapter import config_fingerprint

    base, adapter = workdir / "base", workdir / "adapter"
    stamp = json.dumps({"layers": layers, "hidden": hidden, "shard": shard_size, "tokenizer": True})
    if (workdir / "stamp.json").is_file() and (workdir / "stamp.json").read_text() == stamp:
        return base, adapter
    shutil.rmtree(workdir, ignore_errors=True)
    workdir.mkdir(parents=True)
    config = AutoConfig.for_model(
        "llama",
        hidden_size=hidden,
        intermediate_size=hidden * 11 // 4 // 64 * 64,
        num_hidden_layers=layers,
        num_attention_heads=hidden // 64,
        num_key_value_heads=hidden // 64,
        vocab_size=32000,
        max_position_embeddings=2048,
        tie_word_embeddings=False,
    )
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float16)
    model.save_pretrained(base, max_shard_size=shard_size)
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        shutil.copy(DEMO_TOKENIZER / name, base / name)
    peft_model = get_peft_model(model, LoraConfig(r=16, lora_alpha=32, target_modules="all-linear"))
    gen = torch.Generator().manual_seed(1)
    for name, param in peft_model.named_parameters():
        if "lora_B" in name:
            param.data = (torch.randn(param.shape, generator=gen) * 0.01).to(param.dtype)
    peft_model.save_pretrained(adapter)
    meta = {
        "base_model": str(base),
        "base_config_sha256": config_fingerprint(str(base)),
        "quant": {"mode": "nf4", "double_quant": True, "compute_dtype": "fp16"},
    }
    (adapter / "qlora_kit.json").write_text(json.dumps(meta))
    (workdir / "stamp.json").write_text(stamp)
    return base, adapter


def _rss_mib() -> float:
    with open("/proc/self/status") as fh:
        return int(fh.read().split("VmRSS:")[1].split()[0]) / 1024


def child(path: str, base: str, adapter: str, out: str, shard_size: str) -> None:
    """One merge in this fresh process. Prints the resident set after the path's imports (the baseline
    the merge starts from) and the seconds spent after them."""
    import logging

    import torch
    from transformers import AutoModelForCausalLM
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    hf_logging.set_verbosity_error()
    logging.getLogger("bitsandbytes").setLevel(logging.ERROR)
    if path == "peft":
        from peft import PeftModel

        print(f"IMPORTED {_rss_mib():.1f}")
        started = time.perf_counter()
        model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float16)
        model = PeftModel.from_pretrained(model, adapter).merge_and_unload()
        model.save_pretrained(out, max_shard_size=shard_size)
    elif path.startswith("qlora-kit gguf"):
        from qlora_kit.export.gguf import export_gguf

        print(f"IMPORTED {_rss_mib():.1f}")
        started = time.perf_counter()
        export_gguf(adapter, out, gguf_type=path.split()[-1], verify=False, force=True)
    else:
        from qlora_kit.export.run import export

        into = "original" if path.endswith("original") else "dequantized"
        if path.endswith("verify"):
            import peft  # noqa: F401
        print(f"IMPORTED {_rss_mib():.1f}")
        started = time.perf_counter()
        summary = export(
            adapter, out, merge_into=into, max_shard_size=shard_size, verify=path.endswith("verify"), force=True
        )
        if summary["verification"]:
            v = summary["verification"]
            print(f"VERIFY {v['max_abs_diff']:.4g} {v['tolerance']:.4g} {v['logit_scale']:.4g} {v['kl']:.3g}")
    print(f"WORK {time.perf_counter() - started:.3f}")


def run_child(path: str, base: Path, adapter: Path, out: Path, shard_size: str) -> dict[str, float | str]:
    shutil.rmtree(out, ignore_errors=True)
    cmd = [sys.executable, __file__, "--child", path, "--base", str(base), "--adapter", str(adapter)]
    cmd += ["--out", str(out), "--shard-size", shard_size]
    env = {**os.environ, "TORCH_COMPILE_DISABLE": "1"}  # bitsandbytes' CPU kernels skip torch.compile
    started = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    _, status, usage = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - started
    stdout, stderr = proc.stdout.read(), proc.stderr.read()  # type: ignore[union-attr]
    proc.stdout.close()  # type: ignore[union-attr]
    proc.stderr.close()  # type: ignore[union-attr]
    if os.waitstatus_to_exitcode(status) != 0:
        raise SystemExit(f"{path} failed:\n{stderr[-3000:]}")
    result: dict[str, float | str] = {"wall_s": wall, "rss_mib": usage.ru_maxrss / 1024}
    for line in stdout.splitlines():
        if line.startswith("WORK "):
            result["work_s"] = float(line.split()[1])
        if line.startswith("IMPORTED "):
            result["imported_mib"] = float(line.split()[1])
        if line.startswith("VERIFY "):
            result["verify"] = line[len("VERIFY ") :]
    result["out_mib"] = sum(p.stat().st_size for p in out.iterdir()) / 2**20
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workdir", default="/tmp/qlora-kit-bench-export")
    parser.add_argument("--layers", type=int, default=12)
    parser.add_argument("--hidden", type=int, default=1024)
    parser.add_argument("--shard-size", default="50MB", help="shard size of the base and of both outputs")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--build", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--base", help=argparse.SUPPRESS)
    parser.add_argument("--adapter", help=argparse.SUPPRESS)
    parser.add_argument("--out", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(args.child, args.base, args.adapter, args.out, args.shard_size)
        return

    if args.build:
        build(Path(args.workdir), args.layers, args.hidden, args.shard_size)
        return

    # Build in a child too: a forked child inherits its parent's peak RSS (Linux copies hiwater_rss at
    # fork), so the parent must never hold a model, or every child's ru_maxrss reads as the parent's.
    workdir = Path(args.workdir)
    cmd = [sys.executable, __file__, "--build", "--workdir", str(workdir), "--layers", str(args.layers)]
    subprocess.run([*cmd, "--hidden", str(args.hidden), "--shard-size", args.shard_size], check=True)
    base, adapter = workdir / "base", workdir / "adapter"
    base_mib = sum(p.stat().st_size for p in base.glob("*.safetensors")) / 2**20
    shards = len(list(base.glob("*.safetensors")))
    print(f"base: {base_mib:.0f} MiB fp16 in {shards} shards; adapter: {adapter}; {os.cpu_count()} CPUs")
    results: dict[str, list[dict[str, float | str]]] = {p: [] for p in PATHS}
    for i in range(args.repeats):
        for path in PATHS if i % 2 == 0 else reversed(PATHS):
            results[path].append(run_child(path, base, adapter, workdir / "out", args.shard_size))
            print(f"  {path}: {results[path][-1]}", file=sys.stderr)
    verified = run_child("qlora-kit dequantized + verify", base, adapter, workdir / "out", args.shard_size)
    print(f"  dequantized + verify: {verified}", file=sys.stderr)

    def med(path: str, key: str) -> float:
        return statistics.median(float(r[key]) for r in results[path])

    def row(name: str, rss: float, base_rss: float, wall: float, work: float, out_mib: float) -> str:
        merge = rss - base_rss
        return (
            f"| {name} | {rss:,.0f} | {rss / peft_rss:.2f} | {base_rss:,.0f} | {merge:,.0f} | {merge / peft_merge:.2f} "
            f"| {wall:.1f} | {wall / peft_wall:.2f} | {work:.1f} | {out_mib:,.0f} |"
        )

    peft_rss, peft_wall = med("peft", "rss_mib"), med("peft", "wall_s")
    peft_merge = peft_rss - med("peft", "imported_mib")
    print()
    print(f"{args.repeats} runs each, alternating; medians; ratios against the peft path. 'after imports' is the")
    print("resident set once the path's libraries are imported; 'merge' is the peak above it.")
    print()
    print(
        "| path | peak RSS MiB | ratio | after imports MiB | merge MiB | ratio | wall s | ratio | work s | output MiB |"
    )
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for path in PATHS:
        print(
            row(
                path,
                med(path, "rss_mib"),
                med(path, "imported_mib"),
                med(path, "wall_s"),
                med(path, "work_s"),
                med(path, "out_mib"),
            )
        )
    v = {k: float(verified[k]) for k in ("rss_mib", "imported_mib", "wall_s", "work_s", "out_mib")}
    print(
        row(
            "qlora-kit dequantized + verify (1 run)",
            v["rss_mib"],
            v["imported_mib"],
            v["wall_s"],
            v["work_s"],
            v["out_mib"],
        )
    )
    if "verify" in verified:
        diff, tol, scale, kl = verified["verify"].split()  # type: ignore[union-attr]
        print(f"\nverification: max |logit diff| {diff} (tolerance {tol}, logit scale {scale}), KL {kl}")


if __name__ == "__main__":
    main()
