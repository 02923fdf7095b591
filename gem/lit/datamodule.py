"""DataLoaders over a sampled task: seeded shuffling, one collate function for every split."""

from __future__ import annotations

import itertools
from typing import Callable, Iterator

import lightning as L
import torch
from torch.utils.data import DataLoader, Sampler


class EpochSeededSampler(Sampler[int]):
    """A random order that is a function of (seed, epoch) alone.

    Lightning calls `set_epoch` before every epoch, so a run resumed at epoch e sees the
    same order as an uninterrupted one (a generator seeded once would not). Under DDP,
    Lightning's DistributedSamplerWrapper lists this order, permutes it once more with
    (its seed, epoch) and gives each rank a shard, again a function of (seed, epoch).
    """

    def __init__(self, size: int, seed: int):
        self.size, self.seed, self.epoch = size, seed, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __iter__(self) -> Iterator[int]:
        generator = torch.Generator().manual_seed(self.seed * 100_003 + self.epoch)
        return iter(torch.randperm(self.size, generator=generator).tolist())

    def __len__(self) -> int:
        return self.size


class _ResumeAt:
    """A batch sampler that, when iterated, first asks how many leading batches to drop.

    The answer comes at the first draw, after Lightning has set the epoch, so only the
    checkpoint's own epoch skips anything; the dropped batches' examples are never loaded.
    """

    def __init__(self, batch_sampler, batches_to_skip: Callable[[], int]):
        self.batch_sampler, self.batches_to_skip = batch_sampler, batches_to_skip
        self.skip: int | None = None

    def __iter__(self):
        if self.skip is None:  # asked once: a DataLoader iterator may iterate its sampler twice on creation
            self.skip = self.batches_to_skip()
        return itertools.islice(iter(self.batch_sampler), self.skip, None)

    def __len__(self) -> int:
        return len(self.batch_sampler)


class ResumableDataLoader(DataLoader):
    """A training loader whose position inside an epoch travels in Lightning's checkpoints.

    Lightning saves `state_dict()` of stateful loaders with its checkpoints and hands it back
    through `load_state_dict()` on resume, before it creates the epoch's iterator. That
    iterator then drops the batches of indices this process had already trained on in that
    epoch, after any DDP sharding, so every rank resumes exactly where it stopped. `len()`
    stays a whole epoch's batches: Lightning reads it once for the whole fit and counts the
    restored batches towards it.
    """

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.batches_yielded = 0
        self._resume: tuple[int, int] | None = None  # (epoch, batches trained) from a checkpoint
        self._creating_iterator = False

    @property
    def _index_sampler(self):
        sampler = super()._index_sampler
        if self._creating_iterator and self._resume is not None:
            return _ResumeAt(sampler, self._take_resume)
        return sampler

    def _take_resume(self) -> int:
        (epoch, trained), self._resume = self._resume, None
        if getattr(self.sampler, "epoch", epoch) != epoch:
            return 0  # not the checkpoint's epoch: it starts from its beginning
        self.batches_yielded = trained  # a resumed epoch counts on
        return trained

    def __iter__(self):
        # A generator: the DataLoader iterator (and any workers, which draw indices at once) is
        # made at the first batch, after Lightning has set the epoch. Lightning makes this
        # iterator before it sets the epoch, and on a resume it keeps it for the first epoch.
        self.batches_yielded = 0
        self._creating_iterator = True
        try:
            batches = super().__iter__()  # takes the index sampler now
        finally:
            self._creating_iterator = False
        for batch in batches:
            self.batches_yielded += 1
            yield batch

    def state_dict(self) -> dict:
        return {"epoch": getattr(self.sampler, "epoch", 0), "batches_yielded": self.batches_yielded}

    def load_state_dict(self, state: dict) -> None:
        epoch, trained = int(state["epoch"]), int(state["batches_yielded"])
        if trained >= len(super()._index_sampler):
            epoch, trained = epoch + 1, 0  # saved at the epoch's end: the run goes on with the next
        if callable(getattr(self.sampler, "set_epoch", None)):
            # Lightning sets the epoch again before the epoch starts; workers that prefetch
            # indices as soon as the iterator exists need it now.
            self.sampler.set_epoch(epoch)
        self._resume = (epoch, trained)


EVAL_ORDERS = ("dataset", "length")


def check_eval_order(eval_order: str) -> str:
    if eval_order not in EVAL_ORDERS:
        raise ValueError(f"eval_order={eval_order!r} is not one of {', '.join(EVAL_ORDERS)}: `dataset` "
                         f"evaluates in the sampled order, `length` batches examples longest first")
    return eval_order


def longest_first(examples: list, length: Callable[[dict], int]) -> list:
    """`examples` reordered by decreasing `length` (ties keep their order).

    Evaluation batches then hold examples of similar length, so little of each batch is
    padding, and the longest batch comes first, so running out of memory shows at once.
    Every example is still evaluated exactly once; the metrics do not depend on the order.
    """
    lengths = [length(example) for example in examples]
    return [examples[i] for i in sorted(range(len(examples)), key=lambda i: -lengths[i])]


class TaskDataModule(L.LightningDataModule):
    """Train, dev and test loaders over a sampled task, plus the gradient pass's loader.

    `eval_order`: `dataset` keeps the dev and test examples in their sampled order; `length`
    batches them longest first (the collate function must then have `length(example)`).
    """

    def __init__(self, task, collate: Callable, *, batch_size: int, eval_batch_size: int, seed: int,
                 num_workers: int = 0, eval_order: str = "dataset"):
        super().__init__()
        check_eval_order(eval_order)
        if eval_order == "length" and not callable(getattr(collate, "length", None)):
            raise ValueError(f"eval_order=length needs a collate function with a length(example) method; "
                             f"{type(collate).__name__} has none (use eval_order=dataset)")
        self.task = task
        self.collate = collate
        self.batch_size = batch_size
        self.eval_batch_size = eval_batch_size
        self.seed = seed
        self.num_workers = num_workers
        self.eval_order = eval_order
        self._eval_examples: dict[str, list] = {}

    def _eval_split(self, split: str) -> list:
        examples = getattr(self.task, split)
        if self.eval_order == "dataset":
            return examples
        if split not in self._eval_examples:  # tokenizing once per split is enough
            self._eval_examples[split] = longest_first(list(examples), self.collate.length)
        return self._eval_examples[split]

    def _loader(self, examples, batch_size: int, shuffle: bool) -> DataLoader:
        # A private generator: a DataLoader without one draws its workers' base seed from the global
        # generator at every new iterator, which would shift dropout's random stream after a resume.
        generator = torch.Generator().manual_seed(self.seed)
        if not shuffle:
            return DataLoader(examples, batch_size=batch_size, collate_fn=self.collate, num_workers=self.num_workers,
                              generator=generator)
        return ResumableDataLoader(examples, batch_size=batch_size, sampler=EpochSeededSampler(len(examples), self.seed),
                                   collate_fn=self.collate, num_workers=self.num_workers, generator=generator)

    def train_dataloader(self) -> DataLoader:
        return self._loader(self.task.train, self.batch_size, shuffle=True)

    def val_dataloader(self) -> DataLoader:
        return self._loader(self._eval_split("dev"), self.eval_batch_size, shuffle=False)

    def test_dataloader(self) -> DataLoader:
        return self._loader(self._eval_split("test"), self.eval_batch_size, shuffle=False)

    def gradient_pass_dataloader(self, num_examples: int, rank: int = 0, world_size: int = 1) -> DataLoader:
        """The first `num_examples` of the (already seeded-sampled) training set, in order.

        GEM's gradient pass uses the training loss on training data; taking a prefix of
        the seeded sample keeps the mask a function of the seed alone. Under DDP each rank
        takes every `world_size`-th *batch* of the single-process batching, so the
        all-reduced sum holds the same per-batch gradients whatever the number of ranks
        (only the order of the floating-point additions differs).
        """
        return self._loader(gradient_pass_share(self.task.train[:num_examples], self.batch_size, rank, world_size),
                            self.batch_size, shuffle=False)


def gradient_pass_share(examples: list, batch_size: int, rank: int, world_size: int) -> list:
    """This rank's examples: every `world_size`-th batch of `examples` cut into `batch_size` runs.

    Re-batched with the same batch size they give exactly those batches, because only the
    last batch of the whole prefix can be short and it ends whichever share holds it.
    """
    starts = range(rank * batch_size, len(examples), world_size * batch_size)
    return [example for start in starts for example in examples[start:start + batch_size]]
