"""Noisy correspondence as a benchmark (SPEC 12): training pairs whose caption describes someone else.

`noisy_rate` R permutes the captions among a random share R of the training pairs, as the RDE reference does:
pair i then carries the caption of pair pi(i), pi a permutation of that share (so a few of them keep their own,
pi(i) = i, and stay clean). Here pi is drawn from `seed`, so a run is reproducible; `noisy_file` reads the
reference's published permutations (`noiseindex/<data set>_<R>.npy`, an int array over the training pairs in
annotation order: entries in file order, captions in order within an entry, as this project lists them).
"""
from __future__ import annotations

import hashlib
import io
from dataclasses import dataclass
from typing import List, Optional, Tuple

import numpy as np

from datasets.base import PedesDataset, TrainPair
from utils.errors import UserError

_STREAM = 0x6E6F697379  # "noisy": a generator of its own, apart from the samplers' and the items'


@dataclass(frozen=True)
class NoisyPairs:
    """The permutation applied to the training pairs' captions, and which pairs stayed clean (pi(i) = i)."""

    permutation: np.ndarray  # int64 [N]
    # The rate the run trained at: noisy_rate for a permutation drawn here; for a file, the share of its pairs
    # that carry another pair's caption (the file decides, whatever noisy_rate says).
    rate: float
    source: str  # "seed N" or the file read
    sha256: Optional[str] = None  # of the noisy_file read; None when drawn from the seed

    @property
    def clean(self) -> np.ndarray:
        return self.permutation == np.arange(len(self.permutation))

    def to_bytes(self) -> bytes:
        """The permutation as a .npy file (the reference's format: a noisy_file of a later run)."""
        out = io.BytesIO()
        np.save(out, self.permutation)
        return out.getvalue()


def noisy_share(permutation: np.ndarray) -> float:
    """The share of pairs that carry another pair's caption (pi(i) != i): a noise file's rate."""
    return float(np.mean(permutation != np.arange(len(permutation)))) if len(permutation) else 0.0


def noise_permutation(num_pairs: int, rate: float, seed: int) -> np.ndarray:
    """pi over `num_pairs`: a random share `rate` of the pairs permuted among themselves, the rest fixed."""
    rng = np.random.default_rng(np.random.SeedSequence([seed % 2 ** 63, _STREAM]))
    chosen = rng.permutation(num_pairs)[:int(rate * num_pairs)]
    permutation = np.arange(num_pairs, dtype=np.int64)
    permutation[chosen] = rng.permutation(chosen)
    return permutation


def read_noise_file(path: str, num_pairs: int) -> np.ndarray:
    """A published permutation, checked: a 1-D int array over exactly the training pairs, a permutation."""
    return load_noise_file(path, num_pairs)[0]


def load_noise_file(path: str, num_pairs: int) -> Tuple[np.ndarray, str]:
    """read_noise_file's permutation and the sha256 of the bytes it was read from: a run records it, so that a
    file replaced before a resume is noticed (hashing the bytes read, not the file again, leaves no gap)."""
    try:
        with open(path, "rb") as f:
            data = f.read()
    except OSError as e:
        raise UserError(f"noisy_file {path}: cannot be read ({e.strerror or e})") from None
    if not data:
        raise UserError(f"noisy_file {path}: the file is empty; expected a .npy array of pair indices (np.save)")
    if data.startswith(b"PK"):  # np.load would hand back an NpzFile, whose arrays are not a permutation
        raise UserError(f"noisy_file {path}: a .npz archive; expected one .npy array of pair indices (np.save)")
    try:
        permutation = np.load(io.BytesIO(data), allow_pickle=False)
    except (OSError, ValueError, EOFError) as e:
        raise UserError(f"noisy_file {path}: not a .npy array of pair indices ({e})") from None
    if not isinstance(permutation, np.ndarray) or permutation.ndim != 1 or \
            not np.issubdtype(permutation.dtype, np.integer):
        what = (f"{permutation.dtype} of shape {permutation.shape}" if isinstance(permutation, np.ndarray)
                else type(permutation).__name__)
        raise UserError(f"noisy_file {path}: expected a 1-D integer array, got {what}")
    if len(permutation) != num_pairs:
        raise UserError(f"noisy_file {path}: it permutes {len(permutation)} pairs but the training split has "
                        f"{num_pairs} (annotation order, one pair per caption); is it the file of this data set?")
    problem = permutation_problem(permutation.astype(np.int64))
    if problem:
        raise UserError(f"noisy_file {path}: not a permutation of 0..{num_pairs - 1}: {problem}")
    return permutation.astype(np.int64), hashlib.sha256(data).hexdigest()


def permutation_problem(permutation: np.ndarray) -> str:
    """Why `permutation` is not one of 0..N-1 (an index out of range, or the first index given twice and where),
    '' when it is one."""
    n = len(permutation)
    outside = np.flatnonzero((permutation < 0) | (permutation >= n))
    if len(outside):
        more = f" ({len(outside)} such positions)" if len(outside) > 1 else ""
        return (f"position {int(outside[0])} (counting from 0) holds {int(permutation[outside[0]])}, outside "
                f"0..{n - 1}{more}")
    counts = np.bincount(permutation, minlength=n)
    repeated = np.flatnonzero(counts > 1)
    if not len(repeated):
        return ""
    index = int(repeated[0])
    where = [str(p) for p in np.flatnonzero(permutation == index)[:3].tolist()]
    more = f"; {len(repeated)} indices repeat in all" if len(repeated) > 1 else ""
    return (f"index {index} occurs {int(counts[index])} times, at positions {', '.join(where[:-1])} and {where[-1]}"
            f"{' and more' if counts[index] > 3 else ''} (counting from 0){more}; index {int(np.argmin(counts))} "
            f"never occurs")


def apply_noise(dataset: PedesDataset, rate: float, seed: int, noisy_file: str = "") -> Optional[NoisyPairs]:
    """Give the training pairs of `dataset` permuted captions (in place); the permutation, None for clean data."""
    if rate <= 0 and not noisy_file:
        return None
    n = len(dataset.train)
    if noisy_file:
        permutation, sha256 = load_noise_file(noisy_file, n)
        noisy = NoisyPairs(permutation, noisy_share(permutation), noisy_file, sha256)
    else:
        noisy = NoisyPairs(noise_permutation(n, rate, seed), rate, f"seed {seed}")
    captions = [pair[3] for pair in dataset.train]
    train: List[TrainPair] = [(pid, image_id, path, captions[j])
                              for (pid, image_id, path, _), j in zip(dataset.train, noisy.permutation.tolist())]
    dataset.train = train
    for name, texts in dataset.train_alternatives.items():  # a caption's other texts go with it
        dataset.train_alternatives[name] = [texts[j] for j in noisy.permutation.tolist()]
    return noisy
