"""Gallery embeddings for `retrieve.py`: computed once, cached on disk, reused while nothing they depend on changed.

A cache file holds the L2-normalised image embeddings of one gallery under one checkpoint. Its key is a hash of
- the checkpoint: absolute path, size, modification time (ns) and a hash of its first and last MiB;
- the gallery: every image's absolute path, size and modification time (ns), in gallery order;
- what else changes the numbers: compat mode, image size, precision, the cache format version.
The file name carries a short id of (checkpoint path, gallery source) plus the key, so a stale file (any input
changed) is never read, and it is deleted when the fresh one is written.

The right key does not make the features right: a file can be edited or damaged after it was written. So the
features are stored with their sha256, shape and dtype, and a file is used only when its features are float32
of shape [len(gallery), the model's embedding width], finite, and match their checksum; otherwise it is
re-embedded and rewritten, with a warning naming the file and the reason.

A cache write goes to a temporary file named with the writer's pid (utils.files.write_atomic) and is renamed into
place. A writer killed before the rename leaves that file behind; it is removed the next time the folder is used,
once its pid is no longer alive.
"""
from __future__ import annotations

import glob
import hashlib
import json
import logging
import os
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Sequence, Tuple

import torch

from datasets.loaders import image_loader
from evaluation.embed import embed_loaders
from utils.errors import UserError, short_repr
from utils.files import remove_orphan_temps, write_atomic

logger = logging.getLogger("php")

# 2: the features carry their sha256, shape and dtype. Older files have another key, so they are never read.
CACHE_VERSION = 2
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png")
_EDGE_BYTES = 1 << 20
# The cache files, whose temporaries are ".gallery-<slot>-<key>.pt.<pid>-<random>.tmp".
_CACHE_NAMES = r"gallery-\w+-\w+\.pt"


@dataclass
class Gallery:
    """The images to search: absolute paths, their identities when known, and where they came from."""

    paths: List[str]
    source: str  # e.g. "Demo-PEDES/test under /abs/data" or "folder /abs/dir": names the cache file
    pids: Optional[List[int]] = None
    query_pids: Dict[str, int] = field(default_factory=dict)  # normalised caption -> pid (split galleries)

    def __len__(self) -> int:
        return len(self.paths)


def normalise_caption(text: str) -> str:
    """The form in which a query is matched against a split's captions: lower case, single spaces."""
    return " ".join(text.lower().split())


def gallery_from_split(split: Dict[str, list], source: str) -> Gallery:
    """A split of a data set (datasets.PedesDataset.split) (its images with pids; its captions give the pid of a matching query)."""
    query_pids: Dict[str, int] = {}
    for pid, caption in zip(split["caption_pids"], split["captions"]):
        query_pids.setdefault(normalise_caption(caption), int(pid))
    return Gallery([os.path.abspath(p) for p in split["img_paths"]], source,
                   [int(p) for p in split["image_pids"]], query_pids)


def gallery_from_folder(folder: str) -> Gallery:
    """Every .jpg / .jpeg / .png under `folder` (recursively, sorted by path); identities unknown."""
    if not os.path.isdir(folder):
        raise UserError(f"--gallery {short_repr(folder)}: not a folder (expected a folder of .jpg / .png images)")
    folder = os.path.abspath(folder)
    paths = []
    for parent, dirs, files in os.walk(folder):
        dirs.sort()
        paths.extend(os.path.join(parent, f) for f in sorted(files) if f.lower().endswith(IMAGE_SUFFIXES))
    if not paths:
        raise UserError(f"--gallery {short_repr(folder)}: no .jpg or .png images found (searched recursively)")
    return Gallery(paths, f"folder {folder}")


def _sha(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True).encode("utf-8")).hexdigest()


def checkpoint_fingerprint(path: str) -> Dict[str, Any]:
    """Path, size, mtime and a hash of the first and last MiB: changes whenever the file is rewritten."""
    path = os.path.abspath(path)
    st = os.stat(path)
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        digest.update(f.read(_EDGE_BYTES))
        if st.st_size > _EDGE_BYTES:
            f.seek(max(_EDGE_BYTES, st.st_size - _EDGE_BYTES))
            digest.update(f.read(_EDGE_BYTES))
    return {"path": path, "size": st.st_size, "mtime_ns": st.st_mtime_ns, "edges": digest.hexdigest()}


def gallery_fingerprint(paths: Sequence[str]) -> str:
    """A hash of every image's path, size and mtime, in order; a missing image is an error naming it."""
    digest = hashlib.sha256()
    for path in paths:
        try:
            st = os.stat(path)
        except OSError as e:
            raise UserError(f"gallery image {path} cannot be read ({e.strerror or e})") from None
        digest.update(f"{path}\0{st.st_size}\0{st.st_mtime_ns}\n".encode("utf-8", "surrogateescape"))
    return digest.hexdigest()


def cache_key(checkpoint_path: str, gallery: Gallery, settings: Dict[str, Any]) -> str:
    """The full key of a gallery's embeddings (see the module docstring)."""
    return _sha({"version": CACHE_VERSION, "checkpoint": checkpoint_fingerprint(checkpoint_path),
                 "gallery": gallery_fingerprint(gallery.paths), "settings": settings})


def cache_path(cache_dir: str, checkpoint_path: str, gallery: Gallery, key: str) -> str:
    slot = _sha({"checkpoint": os.path.abspath(checkpoint_path), "source": gallery.source})[:12]
    return os.path.join(cache_dir, f"gallery-{slot}-{key[:24]}.pt")


def embed_images(model: torch.nn.Module, paths: Sequence[str], img_size: Sequence[int], precision: str = "fp32",
                 batch_size: int = 256, num_workers: int = 0, image_recipe: str = "clip") -> torch.Tensor:
    """L2-normalised float32 CPU embeddings [N, D] of the images at `paths`, in order (the recipe's eval
    transform)."""
    loader = image_loader(paths, img_size, batch_size, num_workers, image_recipe=image_recipe)
    return embed_loaders(model, loader, precision=precision, desc="gallery")["image_feats"]


def features_sha256(feats: torch.Tensor) -> str:
    """sha256 of the bytes of a float32 tensor, in row-major order."""
    return hashlib.sha256(feats.detach().contiguous().numpy().data).hexdigest()


def _problem(data: Any, key: str, gallery: Gallery, embed_dim: int) -> Optional[str]:
    """Why the loaded cache `data` cannot serve this key and gallery; None when it can."""
    if not isinstance(data, dict) or data.get("key") != key or data.get("paths") != list(gallery.paths):
        return "it does not match this gallery"
    feats = data.get("feats")
    if not torch.is_tensor(feats) or feats.layout != torch.strided:
        return "it holds no feature tensor"
    if feats.dtype != torch.float32:
        return f"its features are {str(feats.dtype).replace('torch.', '')}, expected float32"
    shape, expected = list(feats.shape), [len(gallery), embed_dim]
    if shape != expected:
        return (f"its features have shape {shape}, expected {expected} (the gallery's {len(gallery)} images x "
                f"the model's feature width {embed_dim})")
    if data.get("shape") != shape or data.get("dtype") != "float32":
        return (f"its features do not match their recorded shape and dtype ({short_repr(data.get('shape'))}, "
                f"{short_repr(data.get('dtype'))})")
    bad = int((~torch.isfinite(feats)).sum())
    if bad:
        return f"{bad} of its feature values are NaN or infinite"
    if data.get("sha256") != features_sha256(feats):
        return "its features do not match their sha256 checksum (the file was modified or damaged)"
    return None


def _read(path: str, key: str, gallery: Gallery, embed_dim: int) -> Optional[torch.Tensor]:
    """The cached embeddings if `path` holds exactly this key and gallery, intact; None (with a warning)
    otherwise."""
    try:
        data = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - a torn or foreign file is rebuilt, whatever torch raised
        logger.warning("ignoring unreadable gallery cache %s (%s); re-embedding", path, type(e).__name__)
        return None
    problem = _problem(data, key, gallery, embed_dim)
    if problem:
        logger.warning("ignoring gallery cache %s: %s; re-embedding", path, problem)
        return None
    return data["feats"]


def _write(path: str, key: str, gallery: Gallery, feats: torch.Tensor) -> bool:
    folder = os.path.dirname(path)
    prefix = os.path.basename(path).rsplit("-", 1)[0]
    data = {"version": CACHE_VERSION, "key": key, "paths": list(gallery.paths), "source": gallery.source,
            "feats": feats, "sha256": features_sha256(feats), "shape": list(feats.shape), "dtype": "float32"}
    try:
        write_atomic(path, lambda f: torch.save(data, f), what="the gallery cache", make_folder=True)
    except UserError as e:
        # A read-only run folder (e.g. a published one) still answers queries, just without a cache.
        logger.warning("%s; pass --cache_dir to cache elsewhere", e)
        return False
    for stale in glob.glob(os.path.join(folder, f"{prefix}-*.pt")):
        if stale != path:
            try:
                os.unlink(stale)
            except OSError:
                pass
    return True


def gallery_embeddings(model: torch.nn.Module, gallery: Gallery, checkpoint_path: str, cache_dir: Optional[str],
                       settings: Dict[str, Any], num_workers: int = 0) -> Tuple[torch.Tensor, bool, Optional[str]]:
    """The gallery's embeddings, from the cache when it is valid: (feats [N, D], came from the cache, the cache
    file read or written, None if neither).

    `settings` holds whatever besides the checkpoint and the images changes the embeddings: `img_size`,
    `precision`, `batch_size` (it matters in the batch-dependent compat mode), `compat` and, when not the
    default 'clip', `image_recipe`; all go into the key. `cache_dir=None` disables the cache; `num_workers` are the image loader's worker processes. A cache
    file is checked against `model.feature_dim`, the width of the retrieval features.
    """
    def embed() -> torch.Tensor:
        return embed_images(model, gallery.paths, settings["img_size"], settings["precision"],
                            settings["batch_size"], num_workers, settings.get("image_recipe", "clip"))

    if cache_dir is None:
        return embed(), False, None
    for tmp, why in remove_orphan_temps(cache_dir, _CACHE_NAMES):
        logger.info("removed %s, left by an interrupted gallery cache write (%s)", tmp, why)
    key = cache_key(checkpoint_path, gallery, settings)
    path = cache_path(cache_dir, checkpoint_path, gallery, key)
    if os.path.isfile(path):
        feats = _read(path, key, gallery, model.feature_dim)
        if feats is not None:
            return feats, True, path
    feats = embed()
    return feats, False, path if _write(path, key, gallery, feats) else None
