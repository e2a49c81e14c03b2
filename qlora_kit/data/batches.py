"""Micro-batches for training: deterministic, resumable, packed or padded.

Tokenized examples (``qlora_kit.data.load``) in, batches of tensors out; ``state_dict`` is the position
of the next batch, so a resumed run sees exactly the batches the uninterrupted one would have.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterator, Mapping, Sequence
from typing import TYPE_CHECKING

from qlora_kit.data.load import IGNORE_INDEX
from qlora_kit.errors import UsageError

if TYPE_CHECKING:
    import torch


class BatchStream:
    """Micro-batches of ``examples``, forever, epoch after epoch; deterministic and resumable.

    Each epoch visits the examples in a permutation drawn from a ``torch.Generator`` seeded with
    ``(seed, epoch)``. Without packing, a batch is ``micro_batch`` examples padded on the right to the
    longest (``pad_id``, labels -100, ``attention_mask`` 0). With packing, the epoch's examples are
    concatenated (labels and all) and cut into ``max_seq_len`` chunks, ``micro_batch`` chunks a batch,
    no padding and no ``attention_mask``; the tail shorter than a chunk is left out of that epoch.
    The last batch of an epoch may be smaller.

    ``state_dict()`` is the position of the next batch; a stream built from the same arguments that
    loads it yields exactly the batches the original would have yielded next.
    """

    def __init__(
        self,
        examples: Sequence[Mapping[str, Sequence[int]]],
        micro_batch: int,
        max_seq_len: int,
        packing: bool,
        pad_id: int,
        seed: int = 0,
    ) -> None:
        import torch

        if micro_batch < 1 or max_seq_len < 1:
            raise ValueError(f"micro_batch ({micro_batch}) and max_seq_len ({max_seq_len}) must be positive")
        if not examples:
            raise UsageError("there are no examples to batch", "check the data and data.eval_fraction")
        lengths = [len(e["input_ids"]) for e in examples]
        if any(len(e["labels"]) != n for e, n in zip(examples, lengths, strict=True)):
            raise ValueError("every example needs as many labels as input_ids")
        if not packing and max(lengths) > max_seq_len:
            raise ValueError(f"an example has {max(lengths)} tokens, more than max_seq_len={max_seq_len}")
        self.micro_batch, self.max_seq_len, self.packing, self.pad_id, self.seed = (
            micro_batch,
            max_seq_len,
            packing,
            pad_id,
            seed,
        )
        self._lengths = torch.tensor(lengths, dtype=torch.long)
        self._starts = torch.cumsum(self._lengths, 0) - self._lengths
        self._ids = torch.tensor([t for e in examples for t in e["input_ids"]], dtype=torch.long)
        self._labels = torch.tensor([t for e in examples for t in e["labels"]], dtype=torch.long)
        units = int(self._lengths.sum()) // max_seq_len if packing else len(examples)
        if units == 0:
            raise UsageError(
                f"packing needs at least max_seq_len={max_seq_len} tokens, the data has {int(self._lengths.sum())}",
                "turn data.packing off or lower data.max_seq_len",
            )
        self._units = units  # chunks (packing) or examples per epoch
        self._epoch = self._index = 0
        self._layout_epoch = -1
        self._layout: tuple[torch.Tensor, ...] = ()

    @property
    def epoch_batches(self) -> int:
        return -(-self._units // self.micro_batch)

    @property
    def epoch_float(self) -> float:
        """Progress in epochs: the batches yielded so far over ``epoch_batches``."""
        return self._epoch + self._index / self.epoch_batches

    def state_dict(self) -> dict[str, int]:
        return {"epoch": self._epoch, "index": self._index}

    def load_state_dict(self, state: Mapping[str, int]) -> None:
        epoch, index = int(state["epoch"]), int(state["index"])
        if epoch < 0 or not 0 <= index < self.epoch_batches:
            raise ValueError(
                f"batch position {dict(state)} is outside this data ({self.epoch_batches} batches an epoch)"
            )
        self._epoch, self._index = epoch, index

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        return self

    def __next__(self) -> dict[str, torch.Tensor]:
        batch = self._batch(self._epoch, self._index)
        self._index += 1
        if self._index == self.epoch_batches:
            self._epoch, self._index = self._epoch + 1, 0
        return batch

    def _order(self, epoch: int) -> torch.Tensor:
        import torch

        digest = hashlib.sha256(json.dumps([self.seed, epoch]).encode()).digest()
        generator = torch.Generator().manual_seed(int.from_bytes(digest[:8], "little") >> 1)
        return torch.randperm(len(self._lengths), generator=generator)

    def _epoch_layout(self, epoch: int) -> tuple[torch.Tensor, ...]:
        """Packing: the epoch's (ids, labels) chunks; else the epoch's example order. Cached per epoch."""
        import torch

        if epoch != self._layout_epoch:
            order = self._order(epoch)
            if self.packing:
                lengths = self._lengths[order]
                # token positions of the permuted examples, laid end to end, as indices into the flat store
                shift = self._starts[order] - (torch.cumsum(lengths, 0) - lengths)
                index = torch.repeat_interleave(shift, lengths) + torch.arange(int(lengths.sum()))
                index = index[: self._units * self.max_seq_len].view(self._units, self.max_seq_len)
                self._layout = (self._ids[index], self._labels[index])
            else:
                self._layout = (order,)
            self._layout_epoch = epoch
        return self._layout

    def _batch(self, epoch: int, index: int) -> dict[str, torch.Tensor]:
        import torch

        lo, hi = index * self.micro_batch, (index + 1) * self.micro_batch
        layout = self._epoch_layout(epoch)
        if self.packing:
            return {"input_ids": layout[0][lo:hi].clone(), "labels": layout[1][lo:hi].clone()}
        rows = layout[0][lo:hi].tolist()
        width = max(int(self._lengths[r]) for r in rows)
        input_ids = torch.full((len(rows), width), self.pad_id, dtype=torch.long)
        labels = torch.full((len(rows), width), IGNORE_INDEX, dtype=torch.long)
        attention_mask = torch.zeros((len(rows), width), dtype=torch.long)
        for i, r in enumerate(rows):
            start, n = int(self._starts[r]), int(self._lengths[r])
            input_ids[i, :n] = self._ids[start : start + n]
            labels[i, :n] = self._labels[start : start + n]
            attention_mask[i, :n] = 1
        return {"input_ids": input_ids, "labels": labels, "attention_mask": attention_mask}
