"""The split rule (DDP and DataLoader workers), see :func:`epoch_order` and :func:`rank_range`.

The epoch's global sample order is the shards in manifest order (shuffle: in a seeded
permutation of ``(seed, epoch)``) with each shard's samples in tar order. Rank ``r`` of ``R``
takes the contiguous slice ``[r * n, (r + 1) * n)`` of it, with ``n = ceil(N / R)`` under
``rule="repeat"`` (the order is read cyclically, so the last ranks repeat the first samples of
the epoch) or ``n = floor(N / R)`` under ``rule="drop"`` (the last ``N mod R`` samples of the
epoch order are left out). Every rank therefore gets the same number of samples however the
shards are sized, also with fewer shards than ranks or workers. Inside a rank, worker ``w`` of
``W`` takes the ``w``-th of ``W`` contiguous parts (sizes differ by at most one, larger first;
a worker may get none, which a DataLoader handles). Shuffling then permutes each worker's part
with a seeded buffer of ``buffer`` samples (seed ``(seed, epoch, rank, worker)``); reading
stays sequential. Each item carries ``position = {"epoch", "offset"}`` (the rank's samples
consumed in DataLoader order); resuming from it deals the rest of the rank's sequence out to
the workers again, so the resumed stream is exactly the rest of the interrupted one.

Plain numpy, no torch: the PyTorch dataset (:mod:`datagen.data.torch_dataset`) and
:meth:`datagen.data.Dataset.iter` apply these rules.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

SPLIT_RULES = ("repeat", "drop")


def epoch_order(
    counts: Sequence[int], epoch: int = 0, seed: int = 0, shuffle: bool = False
) -> tuple[np.ndarray, np.ndarray]:
    """The epoch's global sample order as (shard numbers, positions), int64 (N,) each.

    Shards in order (``shuffle``: permuted with ``default_rng([seed, epoch])``), each shard's
    samples in tar order."""
    counts_arr = np.asarray(counts, dtype=np.int64)
    shard_order = np.arange(len(counts_arr))
    if shuffle:
        shard_order = np.random.default_rng([seed, epoch]).permutation(len(counts_arr))
    c = counts_arr[shard_order]
    shards = np.repeat(shard_order, c)
    positions = np.arange(int(c.sum()), dtype=np.int64) - np.repeat(np.cumsum(c) - c, c)
    return shards, positions


def rank_range(total: int, rank: int, world: int, rule: str = "repeat") -> np.ndarray:
    """Indices into the epoch order for ``rank`` of ``world``: ``n = ceil(total / world)``
    (repeat: cyclic, so the tail ranks repeat the first samples) or ``floor`` (drop)."""
    if rule not in SPLIT_RULES:
        raise ValueError(f"rule={rule!r}: choose one of {', '.join(SPLIT_RULES)}")
    if not 0 <= rank < world:
        raise ValueError(f"rank {rank} is not in [0, {world})")
    if total == 0:
        return np.zeros(0, dtype=np.int64)
    n = -(-total // world) if rule == "repeat" else total // world
    return np.arange(rank * n, (rank + 1) * n, dtype=np.int64) % total


def worker_range(n: int, worker: int, workers: int) -> tuple[int, int]:
    """[start, stop) of worker ``worker``'s contiguous part of ``n`` samples (sizes differ
    by at most one, larger parts first)."""
    base, extra = divmod(n, workers)
    start = worker * base + min(worker, extra)
    return start, start + base + (1 if worker < extra else 0)


def buffer_order(n: int, buffer: int, seed: Any) -> list[int]:
    """The order a shuffle buffer of ``buffer`` items gives a stream of ``n`` items:
    fill to ``buffer``, then yield a random one for each new item, then drain at random.
    Item ``i`` comes out no earlier than ``i - buffer``, so reading stays sequential."""
    if buffer <= 1 or n <= 1:
        return list(range(n))
    rng = np.random.default_rng(seed)
    picks = rng.random(n)
    buf: list[int] = []
    out: list[int] = []
    for i in range(n):
        buf.append(i)
        if len(buf) >= buffer:
            j = int(picks[len(out)] * len(buf))
            buf[j], buf[-1] = buf[-1], buf[j]
            out.append(buf.pop())
    while buf:
        j = int(picks[len(out)] * len(buf))
        buf[j], buf[-1] = buf[-1], buf[j]
        out.append(buf.pop())
    return out


def offset_after(parts: Sequence[int], batch: int, worker: int, delivered: int) -> int:
    """Rank samples consumed, in DataLoader order, once worker ``worker`` has delivered
    ``delivered`` samples (a batch boundary of its own)."""
    j = -(-delivered // batch) - 1  # round of the batch just delivered
    total = sum(min(j * batch, n) for n in parts)
    total += sum(min((j + 1) * batch, n) - min(j * batch, n) for n in parts[: worker + 1])
    return total
