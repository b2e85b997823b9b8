"""The PyTorch side: an IterableDataset that applies the split rule (:mod:`datagen.data.split`),
batching with padding (:func:`collate_samples`), and arrays to tensors.

Importing this module does not import torch: the ``TorchDataset`` class is built on first use
(:func:`torch_dataset_class`, or ``datagen.data.TorchDataset``), so that ``import datagen``
stays light for consumers without torch.
"""

from __future__ import annotations

import functools
import os
from collections.abc import Callable, Iterable, Iterator
from typing import TYPE_CHECKING, Any

import numpy as np

from datagen.data.split import (
    SPLIT_RULES,
    buffer_order,
    epoch_order,
    offset_after,
    rank_range,
    worker_range,
)
from datagen.errors import UserError

if TYPE_CHECKING:  # pragma: no cover
    from datagen.data.reader import Dataset


def _rank_world(rank: int | None, world: int | None) -> tuple[int, int]:
    if rank is not None and world is not None:
        return rank, world
    try:
        import torch.distributed as dist

        if dist.is_available() and dist.is_initialized():
            return dist.get_rank(), dist.get_world_size()
    except ImportError:  # pragma: no cover
        pass
    return int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))


class _TorchDatasetImpl:
    """An IterableDataset over a :class:`Dataset`, split by the rule of
    :mod:`datagen.data.split`. Use it with ``DataLoader(ds, batch_size=None, num_workers=W)``
    when it batches (``batch_size``), or as a plain sample stream otherwise.

    Every item (a sample, or a batch from ``collate``) carries ``position``:
    ``{"epoch": e, "offset": o}`` where ``o`` counts this rank's samples consumed so far in
    DataLoader order. Resume with ``load_state_dict(item["position"])`` (same world size,
    workers, batch size and seed). Call ``set_epoch(e)`` before each epoch (workers are
    copies: not with ``persistent_workers``), or pass ``resampled=True`` for an endless
    stream of epochs ``epoch, epoch + 1, ...``, each reshuffled.
    """

    def __init__(
        self,
        dataset: Dataset,
        *,
        batch_size: int | None = None,
        shuffle: bool = False,
        seed: int = 0,
        buffer: int = 64,
        rule: str = "repeat",
        resampled: bool = False,
        rank: int | None = None,
        world_size: int | None = None,
        collate: Callable[[list[dict[str, Any]]], dict[str, Any]] | None = None,
        tensors: bool = True,
        epoch: int = 0,
    ):
        if rule not in SPLIT_RULES:
            raise UserError(f"rule={rule!r}: choose one of {', '.join(SPLIT_RULES)}")
        if batch_size is not None and batch_size < 1:
            raise UserError(f"batch_size must be >= 1, got {batch_size}")
        self.dataset = dataset
        self.batch_size, self.shuffle, self.seed, self.buffer = batch_size, shuffle, seed, buffer
        self.rule, self.resampled = rule, resampled
        self.rank, self.world_size = _rank_world(rank, world_size)
        self.collate = collate or collate_samples
        self.tensors = tensors
        self.epoch, self.offset = epoch, 0
        self._counts: list[int] | None = None
        self.worker: tuple[int, int] | None = None
        """(worker id, workers) to simulate a DataLoader worker; None: ask torch."""

    def set_epoch(self, epoch: int) -> None:
        self.epoch, self.offset = epoch, 0

    def state_dict(self) -> dict[str, int]:
        return {"epoch": self.epoch, "offset": self.offset}

    def load_state_dict(self, state: dict[str, int]) -> None:
        """Resume from an item's ``position``: the next item is the one after it."""
        self.epoch, self.offset = int(state["epoch"]), int(state["offset"])

    def counts(self) -> list[int]:
        if self._counts is None:
            self._counts = self.dataset.counts()
        return self._counts

    def samples_per_rank(self) -> int:
        """Samples every rank gets per epoch (the same for all ranks)."""
        return len(rank_range(sum(self.counts()), self.rank, self.world_size, self.rule))

    def __len__(self) -> int:
        """Items per epoch for this rank without workers: samples, or batches when batching
        (with W DataLoader workers each worker's last batch may be short, so there can be
        more batches; see ``batches_per_rank``)."""
        n = self.samples_per_rank()
        return n if self.batch_size is None else -(-n // self.batch_size)

    def batches_per_rank(self, workers: int) -> int:
        """Batches this rank yields per epoch with ``workers`` DataLoader workers."""
        n = self.samples_per_rank()
        b = self.batch_size or 1
        return sum(
            -(-(e - s) // b)
            for s, e in (worker_range(n, w, workers) for w in range(max(1, workers)))
        )

    def plan(self, epoch: int, workers: int) -> tuple[np.ndarray, np.ndarray, list[np.ndarray]]:
        """(shard numbers, positions) of the epoch order, and for each worker the indices
        into it that the worker yields, in order (its part, buffer-shuffled)."""
        shards, positions = epoch_order(self.counts(), epoch, self.seed, self.shuffle)
        idx = rank_range(len(shards), self.rank, self.world_size, self.rule)
        plans = []
        for w in range(workers):
            start, stop = worker_range(len(idx), w, workers)
            part = idx[start:stop]
            if self.shuffle:
                part = part[buffer_order(len(part), self.buffer, [self.seed, epoch, self.rank, w])]
            plans.append(part)
        return shards, positions, plans

    def _worker(self) -> tuple[int, int]:
        if self.worker is not None:
            return self.worker
        from torch.utils.data import get_worker_info

        info = get_worker_info()
        return (0, 1) if info is None else (info.id, info.num_workers)

    def _assignment(
        self, plans: list[np.ndarray], worker: int, offset: int
    ) -> tuple[np.ndarray, list[int]]:
        """What ``worker`` yields (indices into the epoch order) and the rank offset after
        each of its batches. From the start of an epoch a worker yields its own part; after
        a resume, the rest of the rank's sequence (in DataLoader order) is dealt out again in
        batches, worker ``w`` taking batches ``w, w + W, ...``, so that the resumed stream is
        exactly the rest of the interrupted one."""
        b, workers = self.batch_size or 1, len(plans)
        if not offset:
            mine = plans[worker]
            parts = [len(p) for p in plans]
            ends = [
                offset_after(parts, b, worker, min(n + b, len(mine)))
                for n in range(0, len(mine), b)
            ]
            return mine, ends
        chunks = [p[j : j + b] for j in range(0, max(map(len, plans), default=0), b) for p in plans]
        chunks = [c for c in chunks if len(c)]
        bounds = np.cumsum([len(c) for c in chunks]).tolist()
        if offset not in bounds:
            raise ValueError(
                f"offset {offset} is not a batch boundary of this epoch "
                f"(same world size, workers and batch size as when it was saved?)"
            )
        rest = chunks[bounds.index(offset) + 1 :]
        picked = rest[worker::workers]
        total = offset
        ends = []
        for c in range(len(picked)):
            n = c * workers + worker
            ends.append(total + sum(len(x) for x in rest[: n + 1]))
        mine = np.concatenate(picked) if picked else np.zeros(0, dtype=np.int64)
        return mine, ends

    def __iter__(self) -> Iterator[dict[str, Any]]:
        worker, workers = self._worker()
        epoch, offset = self.epoch, self.offset
        b = self.batch_size or 1
        while True:
            shards, positions, plans = self.plan(epoch, workers)
            mine, ends = self._assignment(plans, worker, offset)
            # Read in epoch order (sequential within shards), yield in ``mine`` order.
            read = np.argsort(mine, kind="stable")
            order = np.empty(len(mine), dtype=np.int64)
            order[read] = np.arange(len(mine))
            refs = list(
                zip(shards[mine[read]].tolist(), positions[mine[read]].tolist(), strict=True)
            )
            after = int(mine.max()) + 1 if len(mine) else 0
            spare = functools.partial(_cyclic_refs, shards, positions, after)
            samples = self.dataset._samples(refs, order.tolist(), keep_count=True, spare=spare)
            for c, batch in enumerate(_chunks(samples, b)):
                pos = {"epoch": epoch, "offset": ends[min(c, len(ends) - 1)]}
                if self.batch_size is None:
                    item = _to_tensors(batch[0]) if self.tensors else batch[0]
                else:
                    item = self.collate(batch)
                    if self.tensors:
                        item = _to_tensors(item)
                item["position"] = pos
                yield item
            if not self.resampled:
                return
            epoch, offset = epoch + 1, 0


def _cyclic_refs(
    shards: np.ndarray, positions: np.ndarray, start: int
) -> Iterator[tuple[int, int]]:
    """The epoch order from ``start`` on, cyclically, once round."""
    for g in range(start, start + len(shards)):
        g %= len(shards)
        yield int(shards[g]), int(positions[g])


def _chunks(it: Iterable[Any], n: int) -> Iterator[list[Any]]:
    batch: list[Any] = []
    for x in it:
        batch.append(x)
        if len(batch) == n:
            yield batch
            batch = []
    if batch:
        yield batch


_PAD = {"visible": False, "confidence": float("nan")}


def _pad_stack(arrays: list[np.ndarray], fill: Any) -> np.ndarray:
    shape = tuple(max(s) for s in zip(*(a.shape for a in arrays), strict=True))
    if all(a.shape == shape for a in arrays):
        return np.stack(arrays)
    out = np.full((len(arrays), *shape), fill, dtype=arrays[0].dtype)
    for i, a in enumerate(arrays):
        out[(i, *(slice(0, d) for d in a.shape))] = a
    return out


def collate_samples(samples: list[dict[str, Any]]) -> dict[str, Any]:
    """Batch samples with varying numbers of points N.

    Arrays are stacked; where shapes differ they are padded to the largest (``visible`` with
    False, ``confidence`` with NaN, the rest with 0), so ``tracks`` is (B, Nmax, T, 2),
    ``visible`` / ``confidence`` (B, Nmax, T), ``queries`` (B, Nmax, 3). ``point_mask`` bool
    (B, Nmax) marks real points. ``frames`` (B, T, H, W, 3) (videos of one dataset share
    T, H, W; differing ones are padded with 0). ``correspondence`` / ``features``: name ->
    stacked (padded) array. ``key``, ``meta``, ``mp4``: lists.
    """
    out: dict[str, Any] = {}
    first = samples[0]
    for name in first:
        values = [s[name] for s in samples]
        if name == "position":
            continue
        if isinstance(first[name], np.ndarray):
            out[name] = _pad_stack(values, _PAD.get(name, 0))
        elif isinstance(first[name], dict) and name in ("correspondence", "features"):
            out[name] = {k: _pad_stack([v[k] for v in values], 0) for k in first[name]}
        else:
            out[name] = values
    if "tracks" in first or "visible" in first:
        counts = [s["tracks" if "tracks" in first else "visible"].shape[0] for s in samples]
        mask = np.zeros((len(samples), max(counts)), dtype=bool)
        for i, c in enumerate(counts):
            mask[i, :c] = True
        out["point_mask"] = mask
    return out


def _to_tensors(obj: Any) -> Any:
    import torch

    if isinstance(obj, np.ndarray):
        return torch.from_numpy(obj)
    if isinstance(obj, dict):
        return {k: (v if k == "meta" else _to_tensors(v)) for k, v in obj.items()}
    return obj


_TORCH_CLASS: type | None = None


def torch_dataset_class() -> type:
    """``TorchDataset``: built on first use so that ``import datagen`` does not import torch.
    Its home is ``datagen.data`` (the package's ``__getattr__`` gives it), so that pickling
    it for spawned DataLoader workers finds it there."""
    global _TORCH_CLASS
    if _TORCH_CLASS is None:
        from torch.utils.data import IterableDataset

        cls = type("TorchDataset", (_TorchDatasetImpl, IterableDataset), {})
        cls.__module__, cls.__qualname__ = "datagen.data", "TorchDataset"
        cls.__doc__ = _TorchDatasetImpl.__doc__
        _TORCH_CLASS = cls
    return _TORCH_CLASS
