"""Training samplers whose order is a function of (seed, epoch), sharded over processes.

`ShuffleSampler` is a seeded random permutation (torch's DistributedSampler behaviour, padded by wrapping).
`RandomIdentitySampler` yields P x K batches: P distinct identities, K items each.
"""
from __future__ import annotations

from collections import defaultdict
from typing import Dict, Iterator, List, Sequence

import numpy as np
import torch
from torch.utils.data import Sampler

from utils.config import check_options
from utils.errors import UserError


def _check_shard(num_replicas: int, rank: int) -> None:
    if num_replicas < 1 or not 0 <= rank < num_replicas:
        raise ValueError(f"rank {rank} is not in [0, {num_replicas})")


class ShuffleSampler(Sampler[int]):
    """A random permutation of range(n) from (seed, epoch); rank r takes every num_replicas-th index.

    The permutation is padded by wrapping (or, with `drop_last`, cut) to a multiple of `num_replicas`, so all
    ranks get the same number of indices and, without padding, disjoint ones.
    """

    def __init__(self, n: int, seed: int, num_replicas: int = 1, rank: int = 0, drop_last: bool = False):
        _check_shard(num_replicas, rank)
        self.n, self.seed, self.num_replicas, self.rank, self.drop_last = n, seed, num_replicas, rank, drop_last
        self.epoch = 0
        if drop_last:
            self.num_samples = n // num_replicas
        else:
            self.num_samples = -(-n // num_replicas)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return self.num_samples

    def __iter__(self) -> Iterator[int]:
        g = torch.Generator()
        g.manual_seed(int(np.random.SeedSequence([self.seed % 2**63, self.epoch]).generate_state(1)[0]))
        order = torch.randperm(self.n, generator=g).tolist()
        total = self.num_samples * self.num_replicas
        if total > len(order) and order:
            order = (order * (-(-total // len(order))))[:total]
        order = order[:total]
        return iter(order[self.rank::self.num_replicas])


class RandomIdentitySampler(Sampler[int]):
    """P x K sampling: each batch holds P = batch_size // num_instance distinct identities, K items each.

    Per epoch, each identity's items are shuffled and cut into groups of K (an identity with fewer than K items
    is filled up by sampling its items with replacement; a remainder smaller than K is dropped, as in the
    reference). The groups are then dealt into batches so that no identity appears twice in a batch. The number
    of batches is the largest number for which that is possible, so it is fixed for the data set, the same in
    every epoch and on every rank. With several processes `batch_size` is the per-process batch: each global
    batch holds P x num_replicas distinct identities and rank r takes the r-th block of P whole groups.
    """

    def __init__(self, pids: Sequence[int], batch_size: int, num_instance: int, seed: int, num_replicas: int = 1,
                 rank: int = 0):
        _check_shard(num_replicas, rank)
        check_options({"sampler": "identity", "batch_size": batch_size, "num_instance": num_instance})
        self.batch_size, self.num_instance = batch_size, num_instance
        self.seed, self.num_replicas, self.rank = seed, num_replicas, rank
        self.epoch = 0
        self.p = batch_size // num_instance
        items: Dict[int, List[int]] = defaultdict(list)
        for index, pid in enumerate(pids):
            items[int(pid)].append(index)
        self.pids = sorted(items)
        self.items = [items[p] for p in self.pids]
        self.groups_per_pid = [max(len(v), num_instance) // num_instance for v in self.items]
        self.num_batches = self._max_batches(self.p * num_replicas)
        if self.num_batches == 0:
            raise UserError(f"the identity sampler needs at least {self.p * num_replicas} identities "
                            f"(batch_size // num_instance per process x {num_replicas} processes); the "
                            f"training split has {len(self.pids)}")

    def _max_batches(self, width: int) -> int:
        """Largest B with sum(min(groups, B)) >= width * B: each identity gives at most one group per batch."""
        counts = np.asarray(self.groups_per_pid, dtype=np.int64)
        lo, hi = 0, int(counts.sum()) // width if width else 0
        while lo < hi:
            mid = (lo + hi + 1) // 2
            if np.minimum(counts, mid).sum() >= width * mid:
                lo = mid
            else:
                hi = mid - 1
        return lo

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return self.num_batches * self.batch_size

    def __iter__(self) -> Iterator[int]:
        rng = np.random.default_rng(np.random.SeedSequence([self.seed % 2**63, self.epoch]))
        k, batches, width = self.num_instance, self.num_batches, self.p * self.num_replicas
        # Lay each identity's groups (at most `batches` of them) out consecutively, identities in random order.
        # Reading the layout column-wise (position j, j + B, j + 2B, ...) gives batch j; an identity's groups
        # span at most B consecutive positions, so they land in distinct batches.
        layout: List[List[int]] = []
        for i in rng.permutation(len(self.items)):
            idx = np.asarray(self.items[i])
            if len(idx) < k:
                idx = np.concatenate([idx, rng.choice(idx, k - len(idx), replace=True)])
            idx = rng.permutation(idx)
            n_groups = min(self.groups_per_pid[i], batches)
            layout.extend(idx[g * k:(g + 1) * k].tolist() for g in range(n_groups))
            if len(layout) >= width * batches:
                break
        layout = layout[:width * batches]
        order: List[int] = []
        for j in rng.permutation(batches):
            groups = layout[j::batches]
            groups = [groups[g] for g in rng.permutation(width)]
            for group in groups[self.rank * self.p:(self.rank + 1) * self.p]:
                order.extend(group)
        return iter(order)
