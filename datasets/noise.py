"""Noisy correspondence as a benchmark (SPEC 12): training pairs whose caption describes someone else.

`noisy_rate` R permutes the captions among a random share R of the training pairs, as the RDE reference does:
pair i then carries the caption of pair pi(i), pi a permutation of that share (so a few of them keep their own,
pi(i) = i, and stay clean). Here pi is drawn from `seed`, so a run is reproducible; `noisy_file` reads the
reference's published permutations (`noiseindex/<data set>_<R>.npy`, an int array over the training pairs in
annotation order: entries in file order, captions in order within an entry, as this project lists them).
"""
from __future__ import annotations

import io
from dataclasses import dataclass
from typing import List, Optional

import numpy as np

from datasets.base import PedesDataset, TrainPair
from utils.errors import UserError, short_repr

_STREAM = 0x6E6F697379  # "noisy": a generator of its own, apart from the samplers' and the items'


@dataclass(frozen=True)
class NoisyPairs:
    """The permutation applied to the training pairs' captions, and which pairs stayed clean (pi(i) = i)."""

    permutation: np.ndarray  # int64 [N]
    rate: float
    source: str  # "seed N" or the file read

    @property
    def clean(self) -> np.ndarray:
        return self.permutation == np.arange(len(self.permutation))

    def to_bytes(self) -> bytes:
        """The permutation as a .npy file (the reference's format: a noisy_file of a later run)."""
        out = io.BytesIO()
        np.save(out, self.permutation)
        return out.getvalue()


def noise_permutation(num_pairs: int, rate: float, seed: int) -> np.ndarray:
    """pi over `num_pairs`: a random share `rate` of the pairs permuted among themselves, the rest fixed."""
    rng = np.random.default_rng(np.random.SeedSequence([seed % 2 ** 63, _STREAM]))
    chosen = rng.permutation(num_pairs)[:int(rate * num_pairs)]
    permutation = np.arange(num_pairs, dtype=np.int64)
    permutation[chosen] = rng.permutation(chosen)
    return permutation


def read_noise_file(path: str, num_pairs: int) -> np.ndarray:
    """A published permutation, checked: a 1-D int array over exactly the training pairs, a permutation."""
    try:
        permutation = np.load(path, allow_pickle=False)
    except (OSError, ValueError) as e:
        raise UserError(f"noisy_file {path}: not a .npy array of pair indices ({e})") from None
    if permutation.ndim != 1 or not np.issubdtype(permutation.dtype, np.integer):
        raise UserError(f"noisy_file {path}: expected a 1-D integer array, got {permutation.dtype} of shape "
                        f"{permutation.shape}")
    if len(permutation) != num_pairs:
        raise UserError(f"noisy_file {path}: it permutes {len(permutation)} pairs but the training split has "
                        f"{num_pairs} (annotation order, one pair per caption); is it the file of this data set?")
    if not np.array_equal(np.sort(permutation), np.arange(num_pairs)):
        raise UserError(f"noisy_file {path}: not a permutation of 0..{num_pairs - 1} (e.g. "
                        f"{short_repr(permutation[:5].tolist())})")
    return permutation.astype(np.int64)


def apply_noise(dataset: PedesDataset, rate: float, seed: int, noisy_file: str = "") -> Optional[NoisyPairs]:
    """Give the training pairs of `dataset` permuted captions (in place); the permutation, None for clean data."""
    if rate <= 0 and not noisy_file:
        return None
    n = len(dataset.train)
    if noisy_file:
        noisy = NoisyPairs(read_noise_file(noisy_file, n), rate, noisy_file)
    else:
        noisy = NoisyPairs(noise_permutation(n, rate, seed), rate, f"seed {seed}")
    captions = [pair[3] for pair in dataset.train]
    train: List[TrainPair] = [(pid, image_id, path, captions[j])
                              for (pid, image_id, path, _), j in zip(dataset.train, noisy.permutation.tolist())]
    dataset.train = train
    if dataset.train_bt is not None:  # a back-translation goes with its caption
        dataset.train_bt = [dataset.train_bt[j] for j in noisy.permutation.tolist()]
    return noisy
