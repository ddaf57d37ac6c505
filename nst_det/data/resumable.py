"""A training data stream that can be resumed exactly, at any iteration, with any worker count.

detectron2's TrainingSampler restarts its stream on resume, and augmentation randomness lives in
each worker's global RNG, so a resumed run sees different data than an uninterrupted one. Here:
- the sampler yields `(position, index)` for global stream positions `start, start+1, ...`
  (shuffled per epoch from a fixed seed); rank r takes positions p with p % world_size == r;
- each sample is mapped under RNGs seeded from (seed, position), saved and restored around the
  mapper, so augmentation depends only on the position, not on workers or on what ran before.
Resuming after iteration k therefore means starting at position (k + 1) * total batch size.
Batches are consecutive positions (no aspect-ratio grouping, whose buffers would not survive a
restart).
"""

from __future__ import annotations

import contextlib
import logging
import random
from typing import Callable, Iterator

import numpy as np
import torch
from detectron2.data.build import trivial_batch_collator, worker_init_reset_seed
from detectron2.utils import comm
from torch.utils.data import Dataset, Sampler

logger = logging.getLogger(__name__)


class ResumableTrainingSampler(Sampler):
    """Infinite shuffled stream of `(position, dataset index)` starting at global `start`."""

    def __init__(self, size: int, seed: int, start: int = 0, shuffle: bool = True):
        if size <= 0:
            raise ValueError("the training set is empty: check DATASETS.TRAIN and its files")
        self._size, self._seed, self._start, self._shuffle = size, seed, start, shuffle
        self._rank, self._world = comm.get_rank(), comm.get_world_size()

    def _epoch_order(self, epoch: int) -> torch.Tensor:
        if not self._shuffle:
            return torch.arange(self._size)
        g = torch.Generator().manual_seed(self._seed * 1_000_003 + epoch)
        return torch.randperm(self._size, generator=g)

    def __iter__(self) -> Iterator[tuple[int, int]]:
        # the first position this rank owns at or after `start`
        position = self._start + (self._rank - self._start) % self._world
        epoch, order = None, None
        while True:
            if position // self._size != epoch:
                epoch = position // self._size
                order = self._epoch_order(epoch)
            yield position, int(order[position % self._size])
            position += self._world


@contextlib.contextmanager
def _seeded_rngs(seed: int):
    """Seed python/numpy/torch's CPU RNGs for one sample, then restore the caller's states
    (the CPU generator only: torch.manual_seed would also reseed every GPU's, unrestored)."""
    states = random.getstate(), np.random.get_state(), torch.get_rng_state()
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.default_generator.manual_seed(seed)
    try:
        yield
    finally:
        random.setstate(states[0])
        np.random.set_state(states[1])
        torch.set_rng_state(states[2])


def skipped_images(skip_log: str) -> list[str]:
    """The distinct image names in a skip log, in order of first skip.

    The log has one line per skip, and a bad image is met again every epoch and by every worker
    that draws it: count images, not loads.
    """
    with open(skip_log) as f:
        return list(dict.fromkeys(line.split("\t", 1)[0] for line in f.read().splitlines()
                                  if line))


class PositionSeededDataset(Dataset):
    """Maps `dataset[index]` under RNGs seeded by (seed, position).

    A mapper that returns None (an image it cannot use) is retried on the next indices; with
    `skip_bad=False` any exception from the mapper is re-raised naming the file, with
    `skip_bad=True` the image is skipped, and its name appended to the text file `skip_log`
    (one line per skip, from whichever worker process met it).
    """

    def __init__(self, dataset, mapper: Callable, seed: int, skip_bad: bool = False,
                 skip_log: str | None = None):
        self._dataset, self._mapper, self._seed = dataset, mapper, seed
        self._skip_bad, self._skip_log = skip_bad, skip_log

    def __len__(self):
        return len(self._dataset)

    def _map(self, index: int, position: int):
        record = self._dataset[index]
        with _seeded_rngs(self._seed * 1_000_003 + position):
            try:
                return self._mapper(record)
            except Exception as e:
                name = record.get("file_name", f"index {index}") if isinstance(record, dict) \
                    else f"index {index}"
                if not self._skip_bad:
                    raise RuntimeError(
                        f"cannot load training image {name}: {type(e).__name__}: {e}. Fix or "
                        "remove the file, or set NST_DET.SKIP_BAD_IMAGES True to skip and "
                        "count such images"
                    ) from e
                logger.warning(f"skipping bad training image {name}: {e}")
                if self._skip_log:
                    with open(self._skip_log, "a") as f:
                        f.write(f"{name}\t{type(e).__name__}: {e}\n")
                return None

    def __getitem__(self, item: tuple[int, int]):
        position, index = item
        for attempt in range(len(self._dataset)):
            data = self._map((index + attempt) % len(self._dataset), position)
            if data is not None:
                return data
        raise RuntimeError("no image of the training set could be loaded")


def build_resumable_train_loader(
    dataset_dicts: list,
    mapper: Callable,
    total_batch_size: int,
    seed: int,
    start_iter: int = 0,
    num_workers: int = 0,
    skip_bad: bool = False,
    skip_log: str | None = None,
    collate_fn: Callable | None = None,
):
    """A DataLoader of per-rank batches that starts at iteration `start_iter` of the stream.

    Args:
        dataset_dicts: the records (e.g. DatasetCatalog.get(name)).
        mapper: record -> model input (e.g. detectron2's DatasetMapper), or None to skip it.
        total_batch_size: the global batch (SOLVER.IMS_PER_BATCH); divisible by world size.
    Returns:
        an iterable of lists (one list of mapped inputs per iteration and rank).
    """
    world = comm.get_world_size()
    if total_batch_size % world != 0:
        raise ValueError(
            f"SOLVER.IMS_PER_BATCH={total_batch_size} is not divisible by the {world} processes"
        )
    start = start_iter * total_batch_size
    sampler = ResumableTrainingSampler(len(dataset_dicts), seed, start=start)
    dataset = PositionSeededDataset(dataset_dicts, mapper, seed, skip_bad, skip_log)
    per_rank = total_batch_size // world
    batch_sampler = torch.utils.data.BatchSampler(sampler, per_rank, drop_last=True)
    return torch.utils.data.DataLoader(
        dataset,
        batch_sampler=batch_sampler,
        num_workers=num_workers,
        collate_fn=collate_fn or trivial_batch_collator,
        worker_init_fn=worker_init_reset_seed,
        # each new iterator draws its base seed from this generator, not from the global torch
        # RNG: upstream detectron2 creates the iterator lazily at the first step, which after a
        # resume would shift the restored RNG stream (RPN/ROI sampling) by one draw
        generator=torch.Generator().manual_seed(seed),
    )
