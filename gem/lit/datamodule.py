"""DataLoaders over a sampled task: seeded shuffling, one collate function for every split."""

from __future__ import annotations

import logging
import math
from typing import Callable, Iterator

import lightning as L
import torch
from torch.utils.data import DataLoader, DistributedSampler, Sampler

log = logging.getLogger(__name__)


class EpochSeededSampler(Sampler[int]):
    """A random order that is a function of (seed, epoch) alone.

    Lightning calls `set_epoch` before every epoch, so a run resumed at epoch e sees the
    same order as an uninterrupted one (a generator seeded once would not).
    """

    def __init__(self, size: int, seed: int):
        self.size, self.seed, self.epoch = size, seed, 0
        # Examples of this epoch already trained on before a resume. It holds for the whole
        # epoch (a DDP wrapper lists the order and asks its length more than once) and is
        # cleared when the next epoch is set.
        self.skip = 0

    def set_epoch(self, epoch: int) -> None:
        if epoch != self.epoch:
            self.skip = 0
        self.epoch = epoch

    def __iter__(self) -> Iterator[int]:
        generator = torch.Generator().manual_seed(self.seed * 100_003 + self.epoch)
        order = torch.randperm(self.size, generator=generator).tolist()
        return iter(order[self.skip:])

    def __len__(self) -> int:
        return self.size - self.skip


def seeded_sampler(sampler) -> tuple[EpochSeededSampler | None, int]:
    """The `EpochSeededSampler` behind a loader's sampler, and how many ranks share its order.

    Under DDP Lightning wraps our sampler in a `DistributedSamplerWrapper`: it lists our order
    (`sampler.dataset._sampler`) and gives rank r the entries r, r + W, r + 2W, ... of it.
    """
    if isinstance(sampler, EpochSeededSampler):
        return sampler, 1
    inner = getattr(getattr(sampler, "dataset", None), "_sampler", None)
    if isinstance(sampler, DistributedSampler) and isinstance(inner, EpochSeededSampler):
        return inner, int(sampler.num_replicas)
    return None, 1


def fit_shards_to(sampler: DistributedSampler, size: int) -> None:
    """Size a DistributedSampler's shards for `size` entries, as its constructor would have.

    It sizes them once, for a whole epoch; a resumed epoch has fewer entries left, and the
    sampler would otherwise pad them back to a whole epoch with repeats.
    """
    ranks = sampler.num_replicas
    uneven = sampler.drop_last and size % ranks
    sampler.num_samples = math.ceil((size - ranks) / ranks) if uneven else math.ceil(size / ranks)
    sampler.total_size = sampler.num_samples * ranks


class ResumableDataLoader(DataLoader):
    """A training loader whose position inside an epoch travels in Lightning's checkpoints.

    Lightning saves `state_dict()` of stateful loaders with its checkpoints and hands it back
    through `load_state_dict()` on resume; the sampler then skips what the killed run had
    already trained on in that epoch, so a mid-epoch resume sees exactly the remaining batches.
    Under DDP every rank has yielded the same number of batches, and the ranks' shards
    interleave, so together they consumed the first `batches x batch_size x ranks` entries of
    the shared order: skipping those gives each rank exactly its remaining batches.
    """

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.batches_yielded = 0

    def __iter__(self):
        # Eager, not a generator: Lightning reads len() right after iter(), so the shards must
        # already be sized for this epoch's remaining entries by then.
        seeded, ranks = seeded_sampler(self.sampler)
        skip = seeded.skip if seeded is not None else 0
        if ranks > 1:
            fit_shards_to(self.sampler, len(seeded))
        self.batches_yielded = skip // (int(self.batch_size) * ranks)  # a resumed epoch counts on
        return self._counted(super().__iter__())

    def _counted(self, batches):
        for batch in batches:
            self.batches_yielded += 1
            yield batch

    def state_dict(self) -> dict:
        return {"epoch": getattr(self.sampler, "epoch", 0), "batches_yielded": self.batches_yielded}

    def load_state_dict(self, state: dict) -> None:
        seeded, ranks = seeded_sampler(self.sampler)
        if seeded is None:
            log.warning("resuming with a sampler of type %s: the interrupted epoch restarts from its first batch",
                        type(self.sampler).__name__)
            return
        seeded.set_epoch(int(state["epoch"]))
        seeded.skip = int(state["batches_yielded"]) * int(self.batch_size) * ranks


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
        takes every `world_size`-th example, so the all-reduced sum covers the prefix once.
        """
        return self._loader(self.task.train[:num_examples][rank::world_size], self.batch_size, shuffle=False)
