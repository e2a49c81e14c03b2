"""``qlora-kit eval``: loss and perplexity of an adapter (and of its base, beside it) on held-out data.

The data is read, formatted and masked exactly as training did (``data.tokenize`` with the adapter's
recipe, ``BatchStream`` with its packing and sequence length), so the adapter's figure on its own
held-out split is the ``eval_loss`` training reported. The loss is the token-weighted mean over the
labelled tokens (labels != -100 after the causal shift); perplexity is its exponential. Never prints.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from qlora_kit.errors import UsageError
from qlora_kit.recipe import DataSpec

if TYPE_CHECKING:
    from qlora_kit.infer.load import LoadedInfo


@dataclass(frozen=True)
class EvalData:
    """What to score: the data section, whether it is the recipe's held-out split, and the recipe's
    seed (which picks the held-out rows) and micro-batch."""

    spec: DataSpec
    held_out: bool
    seed: int = 0
    micro_batch: int = 8
    trained_on: str | None = None  # the recipe's data path, to flag scoring the training samples


def eval_data(
    info: LoadedInfo, data: str | None = None, split: str | None = None, recipe: dict[str, Any] | None = None
) -> EvalData:
    """The data to score: formatted as ``recipe`` (a recipe's dict, e.g. for a merged model) or else the
    adapter's training recipe says, else plain text; ``data`` and ``split`` replace its path and split.
    With neither, and an ``eval_fraction`` in the recipe, it is the held-out split training used."""
    recipe = recipe if recipe is not None else info.recipe
    known = {f.name for f in dataclasses.fields(DataSpec)}
    section = (recipe or {}).get("data") or {}
    spec = DataSpec(**{k: v for k, v in section.items() if k in known})
    if data is None and not spec.path:
        raise UsageError("eval needs data: this model records no training data", "pass --data FILE_OR_DATASET")
    held_out = recipe is not None and data is None and split is None and spec.eval_fraction > 0
    spec = dataclasses.replace(
        spec, path=data or spec.path, split=split or spec.split, eval_fraction=spec.eval_fraction if held_out else 0.0
    )
    train = (recipe or {}).get("train") or {}
    return EvalData(spec, held_out, int(train.get("seed", 0)), int(train.get("micro_batch", 8)), section.get("path"))


def score(
    model: Any,
    tokenizer: Any,
    info: LoadedInfo,
    what: EvalData,
    max_samples: int | None = None,
    batch_size: int | None = None,
) -> dict[str, Any]:
    """Loss and perplexity on ``what``'s data: the loaded model's and, for an adapter, its base's."""
    from qlora_kit.data import load as datalib
    from qlora_kit.data.batches import BatchStream

    check_counts(max_samples, batch_size)
    spec = what.spec
    tokenized = datalib.tokenize(spec, datalib.load_raw(spec), tokenizer, seed=what.seed)
    examples = tokenized.eval if what.held_out and tokenized.eval else tokenized.train
    if max_samples is not None:
        examples = examples[:max_samples]
    batch = batch_size or what.micro_batch

    def stream() -> BatchStream:  # the same batches for every model scored
        return BatchStream(examples, batch, spec.max_seq_len, spec.packing, tokenizer.pad_token_id, what.seed)

    notes = []
    if not what.held_out and spec.path == what.trained_on:
        notes.append("these are the samples the adapter was trained on, not held out")
    if tokenized.truncated:
        notes.append(
            f"{tokenized.truncated} of the data's {tokenized.samples} samples were truncated to "
            f"{spec.max_seq_len} tokens, as in training"
        )
    models: dict[str, dict[str, float]] = {}
    label = "adapter" if info.adapter else "model"
    loss, tokens = mean_token_loss(model, stream())
    models[label] = {"loss": loss, "perplexity": math.exp(min(loss, 700))}
    if info.adapter and hasattr(model, "disable_adapter"):
        with model.disable_adapter():
            base_loss, _ = mean_token_loss(model, stream())
        models["base"] = {"loss": base_loss, "perplexity": math.exp(min(base_loss, 700))}
    return {
        "data": spec.path,
        "split": spec.split,
        "format": spec.format,
        "held_out": what.held_out,
        "samples": len(examples),
        "tokens": tokens,
        "packing": spec.packing,
        "max_seq_len": spec.max_seq_len,
        "adapter": info.adapter,
        "base": info.base,
        "models": models,
        "notes": notes,
    }


def check_counts(max_samples: int | None, batch_size: int | None) -> None:
    """--max-samples and --batch-size, checked before any model loads."""
    for flag, value in (("--max-samples", max_samples), ("--batch-size", batch_size)):
        if value is not None and value < 1:
            raise UsageError(f"{flag} must be at least 1, got {value}", "or leave it out")


def mean_token_loss(model: Any, batches: Any) -> tuple[float, int]:
    """Token-weighted mean cross-entropy over one pass of ``batches`` and the number of tokens scored.

    Summed per batch in float64 (not a mean of batch means): batches hold different numbers of
    labelled tokens.
    """
    import torch

    device = next(model.parameters()).device
    total, tokens = 0.0, 0
    with torch.no_grad():
        for _ in range(batches.epoch_batches):
            batch = {k: v.to(device) for k, v in next(batches).items()}
            labels = batch.pop("labels")
            logits = model(**batch).logits[:, :-1].float()
            targets = labels[:, 1:]
            loss = torch.nn.functional.cross_entropy(
                logits.reshape(-1, logits.shape[-1]), targets.reshape(-1), ignore_index=-100, reduction="sum"
            )
            total += float(loss.double())
            tokens += int((targets != -100).sum())
    if tokens == 0:
        raise UsageError("no labelled tokens to score", "check the data (every label masked?)")
    return total / tokens, tokens
