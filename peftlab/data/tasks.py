"""Batches for multi-task runs: the tasks' splits side by side, each batch drawn from one task and tagged with it.

One task per batch is the simplest scheme that keeps training on peft's path: a batch runs its task's adapter alone
(`set_adapter`), where a mixed batch would need peft's per-example routing, which peft allows at inference only. Which
task the next batch comes from is the sampler's choice (`multitask.sampling`):
- `proportional`: every task's batches exactly once per epoch, in a shuffled order (a task's share of the steps is its
  share of the training examples);
- `temperature`: task t with probability n_t^(1/T) / sum_s n_s^(1/T) at each step (T5's temperature-scaled mixing,
  Raffel et al. 2020, Sec. 3.5.2), for as many steps as proportional has; a task's batches cycle through reshuffled
  passes over its examples, so a small task may repeat within an epoch and a large one leave some unseen.
With `train.group_by_length`, each pass over a task's examples is length-grouped as the single-task sampler groups
them (transformers' `get_length_grouped_indices`), so a batch pads to texts of similar length; evaluation takes each
task's examples longest first (peftlab.data.ordering), and `evaluate` puts the outputs back in order.
Each epoch's order is a pure function of (seed, epoch), as the single-task samplers' are, so a resumed run continues
the same sequence. Evaluation loaders go through each task in order.
Image tasks (`make_task_image_dataloader`) batch the same way, each task's images through its own transform; they are
evaluated in split order (no lengths).
"""

from __future__ import annotations

import bisect
import math
from typing import Callable, Iterator, Optional, Sequence

import datasets
import torch
from torch.utils.data import ConcatDataset, DataLoader
from transformers import PreTrainedTokenizerBase
from transformers.trainer_pt_utils import get_length_grouped_indices

from peftlab.data.image import TransformedImages
from peftlab.data.ordering import longest_first
from peftlab.data.text import padding_collator, tokenized_lengths

TASK_IDS = "task_ids"
"""The batch key holding each example's task index (its position in the run's task list)."""


def sampling_shares(sizes: Sequence[int], sampling: str, temperature: float) -> list[float]:
    """Each task's expected share of the training batches: n_t / sum n (proportional) or n_t^(1/T) / sum n^(1/T).

    e.g. sizes 8,000 and 2,000 with T=2: sqrt -> 89.4 and 44.7, shares 0.67 and 0.33 (proportional: 0.8 and 0.2).
    """
    power = 1.0 if sampling == "proportional" else 1.0 / temperature
    weights = [n ** power if n > 0 else 0.0 for n in sizes]
    return [w / sum(weights) for w in weights]


class TaskBatchSampler:
    """Batches of indices into the tasks' splits concatenated in task order, each batch from one task.

    Args:
        lengths: each task's examples' token lengths: training groups by length, evaluation goes longest first
            (None: plain shuffles, and the examples in order).
    """

    def __init__(self, sizes: Sequence[int], batch_size: int, *, shuffle: bool, sampling: str = "proportional",
                 temperature: float = 1.0, seed: int = 0, lengths: Optional[Sequence[Sequence[int]]] = None):
        self.sizes, self.batch_size, self.shuffle, self.lengths = list(sizes), batch_size, shuffle, lengths
        self.sampling, self.temperature, self.seed, self.epoch = sampling, temperature, seed, 0
        self.offsets = [sum(self.sizes[:t]) for t in range(len(self.sizes))]
        self.batches_per_task = [math.ceil(n / batch_size) for n in self.sizes]

    def set_epoch(self, epoch: int) -> None:
        """Choose the epoch whose order the next iteration yields (accelerate calls this each epoch)."""
        self.epoch = epoch

    def __len__(self) -> int:
        return sum(self.batches_per_task)

    @property
    def order(self) -> Optional[list[int]]:
        """Evaluation by length: the dataset positions in the order the batches hold them, which `evaluate` puts
        back (peftlab.data.ordering.loader_order); None when the examples come in dataset order or shuffled."""
        if self.shuffle or self.lengths is None:
            return None
        return [index for task in range(len(self.sizes)) for index in self._indices(task, self._eval_order(task))]

    def _eval_order(self, task: int) -> Sequence[int]:
        return range(self.sizes[task]) if self.lengths is None else longest_first(self.lengths[task])

    def __iter__(self) -> Iterator[list[int]]:
        if not self.shuffle:
            for task in range(len(self.sizes)):
                order = self._eval_order(task)
                for start in range(0, len(order), self.batch_size):
                    yield self._indices(task, order[start:start + self.batch_size])
            return
        generator = torch.Generator().manual_seed(self.seed + self.epoch)
        if self.sampling == "proportional":
            order = [task for task, count in enumerate(self.batches_per_task) for _ in range(count)]
            order = [order[i] for i in torch.randperm(len(order), generator=generator).tolist()]
        else:
            shares = torch.tensor(sampling_shares(self.sizes, self.sampling, self.temperature))
            order = torch.multinomial(shares, len(self), replacement=True, generator=generator).tolist()
        streams = [self._task_batches(task, generator) for task in range(len(self.sizes))]
        for task in order:
            yield next(streams[task])
        self.epoch += 1  # a plain loop that never calls set_epoch still gets a fresh order each epoch

    def _task_batches(self, task: int, generator: torch.Generator) -> Iterator[list[int]]:
        """Task `task`'s batches over reshuffled passes of its examples, without end (the order stops drawing)."""
        while True:
            if self.lengths is None:
                order = torch.randperm(self.sizes[task], generator=generator).tolist()
            else:
                order = get_length_grouped_indices(list(self.lengths[task]), self.batch_size, generator=generator)
            for start in range(0, len(order), self.batch_size):
                yield self._indices(task, order[start:start + self.batch_size])

    def _indices(self, task: int, positions) -> list[int]:
        return [self.offsets[task] + position for position in positions]


def tag_with_task(split: datasets.Dataset, task_index: int) -> datasets.Dataset:
    """The split with a `task_ids` column holding `task_index` for every example."""
    return split.add_column(TASK_IDS, [task_index] * len(split))


def make_task_text_dataloader(splits: Sequence[datasets.Dataset], tokenizer: PreTrainedTokenizerBase,
                              batch_size: int, *, shuffle: bool, sampling: str = "proportional",
                              temperature: float = 1.0, seed: int = 0, group_by_length: bool = False,
                              task_ids: Optional[Sequence[int]] = None) -> DataLoader:
    """Batch the tokenized splits of the tasks (in task order), each batch from one task, padded to its own longest
    text, with `task_ids`.

    Args:
        shuffle: training order by `sampling` (see the module docstring); False: each task's examples in order.
        group_by_length: as `make_text_dataloader`'s: training groups each task's batches by length, evaluation takes
            each task's examples longest first (`evaluate` returns the outputs in order all the same).
        task_ids: the task index of each split's examples (default: its position; a run that extends an earlier
            one trains its new tasks, which come after the earlier ones).
    """
    task_ids = list(range(len(splits))) if task_ids is None else list(task_ids)
    tagged = [tag_with_task(split, index) for index, split in zip(task_ids, splits)]
    lengths = [tokenized_lengths(split) for split in splits] if group_by_length else None
    sampler = TaskBatchSampler([len(split) for split in tagged], batch_size, shuffle=shuffle, sampling=sampling,
                               temperature=temperature, seed=seed, lengths=lengths)
    return DataLoader(ConcatDataset(tagged), batch_sampler=sampler, collate_fn=padding_collator(tokenizer))


class TaskImages(TransformedImages):
    """One task's split as `TransformedImages` rows ({"pixel_values", "labels"}) with its task index (`task_ids`)."""

    def __init__(self, split: datasets.Dataset, transform: Callable, task_id: int):
        super().__init__(split, transform)
        self.task_id = task_id

    def __getitems__(self, indices: list[int]) -> list[dict]:
        return [{**row, TASK_IDS: self.task_id} for row in super().__getitems__(indices)]


class TaskConcatDataset(ConcatDataset):
    """The tasks' datasets end to end; a batch, which holds one task (`TaskBatchSampler`), is read in one batched call
    to that task's dataset, as a single-task image loader reads it (ConcatDataset alone would read row by row)."""

    def __getitems__(self, indices: list[int]) -> list[dict]:
        task = bisect.bisect_right(self.cumulative_sizes, indices[0])
        offset = self.cumulative_sizes[task - 1] if task else 0
        return self.datasets[task].__getitems__([index - offset for index in indices])


def make_task_image_dataloader(splits: Sequence[datasets.Dataset], transforms: Sequence[Callable], batch_size: int, *,
                               shuffle: bool, sampling: str = "proportional", temperature: float = 1.0, seed: int = 0,
                               task_ids: Optional[Sequence[int]] = None) -> DataLoader:
    """Batch the image splits of the tasks (in task order) as {"pixel_values", "labels", "task_ids"}, each batch from
    one task, each task's images through its own transform (`make_image_dataloader`'s, one per task).

    Args:
        shuffle, sampling, temperature, seed, task_ids: as `make_task_text_dataloader`'s.
    """
    task_ids = list(range(len(splits))) if task_ids is None else list(task_ids)
    tasks = [TaskImages(split, transform, index) for split, transform, index in zip(splits, transforms, task_ids)]
    sampler = TaskBatchSampler([len(split) for split in splits], batch_size, shuffle=shuffle, sampling=sampling,
                               temperature=temperature, seed=seed)
    return DataLoader(TaskConcatDataset(tasks), batch_sampler=sampler)
