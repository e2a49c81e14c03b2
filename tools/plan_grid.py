"""Dump the planner's JSON over a grid of settings (51 models x 4 GPUs x 10 constraint sets), for before/after diffs.

python tools/plan_grid.py OUT.json   # then: cmp BEFORE.json OUT.json
"""

from __future__ import annotations

import json
import sys

from qlora_kit.catalog.gpus import resolve_gpu
from qlora_kit.catalog.models import catalog_names, lookup
from qlora_kit.errors import UsageError
from qlora_kit.plan.search import Constraints, plan, plan_json

COMBOS = [
    {},
    {"quant": "nf4"},
    {"quant": "int8"},
    {"quant": "none"},
    {"quant": "nf4", "rank": 64, "targets": "all-linear", "grad_ckpt": True, "batch_size": 2, "seq_len": 1024},
    {"lora_fa": True, "upcast": "selective", "chunked_loss": True},
    {"kernel": "runlora", "lora_dropout": 0.0, "quant": "fp4", "double_quant": True, "optimizer": "paged_adamw8bit"},
    {"gpus": 4},
    {"gpus": 2, "strategy": "fsdp"},
    {"attn": "eager", "dtype": "fp16", "offload_ckpt": True, "grad_ckpt": True},
]
out = {}
for name in catalog_names():
    arch = lookup(name)
    for gpu in ("8GB", "12GB", "24GB", "80GB"):
        dev = resolve_gpu(gpu)
        for i, c in enumerate(COMBOS):
            key = f"{name}|{gpu}|{i}"
            try:
                out[key] = plan_json(plan(arch, dev, Constraints(**c)))
            except UsageError as e:
                out[key] = {"error": str(e)}
with open(sys.argv[1], "w") as fh:
    json.dump(out, fh, sort_keys=True, default=str, indent=0)
print(len(out), "settings")
