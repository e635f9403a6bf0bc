"""Evaluation in length order: batch examples longest first, so each batch pads to about its own length, then put
what the model said back in the data's order.

The one home of that order, for every pass that only reads the model: the text evaluation loaders (validation, test,
and so cross-validation's out-of-fold predictions, which are a fold's validation outputs), the frozen-feature
extraction (peftlab.caching) and `predict` / `fuse` scoring (peftlab.inputs). Training batches are grouped by
length elsewhere (`SeededLengthGroupedSampler`, a seeded shuffle).

Why it is exact: a model that masks padding (attention masks, masked-mean pooling) gives each example the same
output whatever else shares its batch; only the amount of padding changes, and with it the work. Longest first puts
the batch that needs the most memory at the start, where a run that cannot afford it fails at once.
"""

from __future__ import annotations

from typing import Iterator, Optional, Sequence

import torch
from torch.utils.data import Sampler


def longest_first(lengths: Sequence[int], indices: Optional[Sequence[int]] = None) -> list[int]:
    """`indices` (default: all of `lengths`) ordered by their length, longest first; equal lengths keep their order."""
    indices = range(len(lengths)) if indices is None else indices
    return sorted(indices, key=lambda index: -lengths[index])  # sorted() is stable


class LengthSortedSampler(Sampler[int]):
    """Every index once, longest first: consecutive batches hold examples of about one length. No seed and no
    epoch: evaluation reads the same batches every time. `order` is what `evaluate` puts back."""

    def __init__(self, lengths: Sequence[int]):
        self.order = longest_first(lengths)

    def __iter__(self) -> Iterator[int]:
        return iter(self.order)

    def __len__(self) -> int:
        return len(self.order)


def loader_order(loader) -> Optional[list[int]]:
    """The positions in the dataset of what `loader` yields, in the order it yields them, when its sampler is a
    LengthSortedSampler (or its batch sampler says, as a multi-task evaluation's does); None when it reads the dataset
    in order.

    Works through accelerate's prepared loaders: on one process the sampler sits in the loader's batch sampler, on
    several inside the sharding batch sampler, which deals whole batches out in turn, so the outputs gathered with
    `gather_for_metrics` come back in the sampler's order.
    """
    batch_sampler = getattr(loader, "batch_sampler", None)
    own = getattr(batch_sampler, "order", None)  # a batch sampler that orders its batches itself (peftlab.data.tasks)
    if own is not None:
        return list(own)
    while batch_sampler is not None and not hasattr(batch_sampler, "sampler"):
        batch_sampler = getattr(batch_sampler, "batch_sampler", None)  # accelerate's BatchSamplerShard wraps one
    sampler = getattr(batch_sampler, "sampler", None) or getattr(loader, "sampler", None)
    return sampler.order if isinstance(sampler, LengthSortedSampler) else None


def put_back(rows: torch.Tensor, positions: Sequence[int]) -> torch.Tensor:
    """Rows in their places: row j of `rows` goes to position `positions[j]` (a permutation of range(len(rows)))."""
    if len(positions) != len(rows):
        raise ValueError(f"{len(rows)} rows for {len(positions)} positions")
    index = torch.as_tensor(list(positions), dtype=torch.long, device=rows.device)
    return torch.empty_like(rows).index_copy_(0, index, rows)
