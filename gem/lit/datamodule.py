"""DataLoaders over a sampled task: seeded shuffling, one collate function for every split."""

from __future__ import annotations

from typing import Callable

import lightning as L
import torch
from torch.utils.data import DataLoader


class TaskDataModule(L.LightningDataModule):
    def __init__(self, task, collate: Callable, *, batch_size: int, eval_batch_size: int, seed: int,
                 num_workers: int = 0):
        super().__init__()
        self.task = task
        self.collate = collate
        self.batch_size = batch_size
        self.eval_batch_size = eval_batch_size
        self.seed = seed
        self.num_workers = num_workers

    def _loader(self, examples, batch_size: int, shuffle: bool) -> DataLoader:
        generator = torch.Generator().manual_seed(self.seed) if shuffle else None
        return DataLoader(examples, batch_size=batch_size, shuffle=shuffle, generator=generator,
                          collate_fn=self.collate, num_workers=self.num_workers)

    def train_dataloader(self) -> DataLoader:
        return self._loader(self.task.train, self.batch_size, shuffle=True)

    def val_dataloader(self) -> DataLoader:
        return self._loader(self.task.dev, self.eval_batch_size, shuffle=False)

    def test_dataloader(self) -> DataLoader:
        return self._loader(self.task.test, self.eval_batch_size, shuffle=False)

    def gradient_pass_dataloader(self, num_examples: int, rank: int = 0, world_size: int = 1) -> DataLoader:
        """The first `num_examples` of the (already seeded-sampled) training set, in order.

        GEM's gradient pass uses the training loss on training data; taking a prefix of
        the seeded sample keeps the mask a function of the seed alone. Under DDP each rank
        takes every `world_size`-th example, so the all-reduced sum covers the prefix once.
        """
        return self._loader(self.task.train[:num_examples][rank::world_size], self.batch_size, shuffle=False)
