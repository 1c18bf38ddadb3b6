"""Text-to-image search over one gallery with one or more trained runs: what retrieve.py prints and draws, and
what a web page calls.

    from evaluation.search import Searcher, load_runs
    runs = load_runs(["A/configs.yaml", "B/configs.yaml"], device="cpu")  # once: the models (slow)
    searcher = Searcher(runs, split="test")        # once: the gallery, each run's embeddings (cached on disk)
    results = searcher.search(["a woman in a red coat"], k=10)  # per request: cheap
    for name, hits in zip(searcher.names, results[0]):  # results[query][run] = hits, best first
        for hit in hits:
            print(name, hit.rank, f"{hit.score:.4f}", hit.path, hit.correct)

load_runs(config_files, checkpoints=None, device="auto", compat="auto", overrides=None, trusted=False,
          cache_dir=None, no_cache=False) -> [SearchRun]
    Loads each run (model.load_model; `overrides` are config options applied to every run) and names it: its
    `name` option with spaces replaced by '_' (a published run whose config names none: its method, see run_name);
    runs that share a name are named by their folder instead (see shown_path), numbered '#1', '#2', ... if even
    that is shared. Each run caches its gallery embeddings in `<its folder>/cache`, or in `cache_dir` (file names
    tell runs apart), or nowhere with `no_cache`.
Searcher(runs, split="test", folder=None)
    The gallery is the first run's `split` (of its data set under its root_dir), or every image under `folder`.
    Every run embeds that same gallery (evaluation/gallery_cache.py: read from its cache when valid, else embedded
    and written) and keeps the embeddings in memory, so search() reads no file.
    Attributes: runs, names (list of str, no spaces, unique), gallery (gallery_cache.Gallery), captions (the split's
    captions; empty for a folder), caption_image (each caption's image, an index into gallery.paths), embedded (per
    run: (came from the cache, cache file or None)).
Searcher.search(texts, k) -> results[query][run] = [SearchHit(rank, score, path, correct), ...]
    The top min(k, len(gallery)) images per text and run, best first: rank from 1, cosine score (a float, exactly
    what retrieve.py prints to 4 decimals), absolute path, and whether the image shows the query's identity
    (None when unknown: a free-text query or a folder gallery).
Searcher.identity(text) -> the person id when `text` is one of the split's captions (up to case and spacing).

search() encodes one query at a time on one CPU thread (see single_cpu_thread and top_k), a process-wide setting:
call it from one thread at a time (in Gradio, a concurrency limit of 1).
"""
from __future__ import annotations

import collections
import contextlib
import os
from dataclasses import dataclass
from typing import Iterator, List, Optional, Sequence, Tuple

import torch

from evaluation.gallery_cache import Gallery, gallery_embeddings, gallery_from_folder, gallery_from_split, \
    normalise_caption
from evaluation.visualize import Hit, ResultRow
from evaluation.scoring import similarity
from model import load_model
from model.similarity import DEFAULT
from model.layouts import LAYOUTS
from model.loading import LoadedRun
from utils.config import read_yaml
from utils.env import autocast, resolve_device
from utils.errors import UserError
from utils.tokenizer import tokenize

@dataclass(frozen=True)
class SearchRun:
    """A loaded run, the name it is shown by, and where its gallery embeddings are cached (None: nowhere)."""

    name: str
    loaded: LoadedRun
    cache_dir: Optional[str]


@dataclass(frozen=True)
class SearchHit:
    rank: int  # from 1
    score: float  # cosine similarity
    path: str  # absolute
    correct: Optional[bool]  # the image shows the query's identity; None when that is unknown


def shown_path(path: str) -> str:
    """`path` relative to the current folder when it lies below it, otherwise absolute."""
    path = os.path.abspath(path)
    rel = os.path.relpath(path)
    return path if rel == os.pardir or rel.startswith(os.pardir + os.sep) else rel


def unique_names(names: Sequence[str], folders: Sequence[str]) -> List[str]:
    """Names without spaces (stdout's columns are split on them), told apart by folder, then by number."""
    def bare(text: str) -> str:
        return "_".join(text.split())

    out = [bare(name) or bare(shown_path(folder)) for name, folder in zip(names, folders)]
    counts = collections.Counter(out)
    out = [bare(shown_path(folder)) if counts[name] > 1 else name for name, folder in zip(out, folders)]
    counts, seen = collections.Counter(out), collections.Counter()
    for i, name in enumerate(out):
        if counts[name] > 1:  # the same folder twice, e.g. with two checkpoints
            seen[name] += 1
            out[i] = f"{name}#{seen[name]}"
    return out


def run_name(run: LoadedRun, config_file: str, overrides: Optional[dict] = None) -> str:
    """The run's `name` option; a published run whose config gives none (TBPS-CLIP's config.yaml never does) is
    named by its layout's method (model/layouts.py), since the option's default names no run."""
    method = LAYOUTS[run.layout].method
    if method and "name" not in (overrides or {}) and "name" not in read_yaml(config_file):
        return method
    return run.cfg.name


def load_runs(config_files: Sequence[str], checkpoints: Optional[Sequence[Optional[str]]] = None,
              device: str = "auto", compat: str = "auto", overrides: Optional[dict] = None, trusted: bool = False,
              cache_dir: Optional[str] = None, no_cache: bool = False) -> List[SearchRun]:
    """The runs of `config_files` (checkpoint: best.pth beside each, or `checkpoints[i]`), named; see the module
    docstring."""
    if not config_files:
        raise UserError("no run to search with: give at least one --config_file")
    checkpoints = list(checkpoints or [None] * len(config_files))
    device = str(resolve_device(device))
    loaded = [load_model(config_file, checkpoint, device=device, compat=compat, overrides=dict(overrides or {}),
                         trusted=trusted) for config_file, checkpoint in zip(config_files, checkpoints)]
    tokenize("")  # reads the BPE vocabulary: part of loading, not of answering
    folders = [os.path.dirname(os.path.abspath(config_file)) for config_file in config_files]
    names = unique_names([run_name(run, config_file, overrides) for run, config_file in zip(loaded, config_files)],
                         folders)
    return [SearchRun(name, run, None if no_cache else (cache_dir or os.path.join(folder, "cache")))
            for name, run, folder in zip(names, loaded, folders)]


def build_gallery(cfg, split_name: Optional[str], folder: Optional[str]) -> Tuple[Gallery, List[str], List[int]]:
    """The gallery to search, the split's captions and each caption's image (its index in the gallery); both empty
    for a folder gallery."""
    if folder is not None:
        return gallery_from_folder(folder), [], []
    from datasets import dataset_from_config
    # The gallery's own images are checked when they are fingerprinted; checking every split's is not needed.
    split = dataset_from_config(cfg, check_images=cfg.skip_missing_images).split(split_name)
    source = f"{cfg.dataset_name}/{split_name} under {os.path.abspath(cfg.root_dir)}"
    return gallery_from_split(split, source), split["captions"], split["caption_img_index"]


@contextlib.contextmanager
def single_cpu_thread(device: torch.device) -> Iterator[None]:
    """Run one caption's worth of CPU work at a time on one thread.

    Intra-op parallelism does not pay for matrices this small, and on a busy machine the threads' hand-offs
    dominate: measured here (2 cores, shared), one query took 1-3 s with 2 threads and 0.06 s with one.
    """
    if device.type != "cpu":
        yield
        return
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def top_k(model: torch.nn.Module, texts: List[str], gallery_feats: torch.Tensor, k: int, text_length: int,
          precision: str = "fp32") -> Tuple[torch.Tensor, torch.Tensor]:
    """Scores (the model's similarity: a cosine by default) and gallery indices [Q, k] of the top-k images per
    text, best first."""
    device = next(model.parameters()).device
    ids = tokenize(texts, text_length, truncate=True).to(device)
    model.eval()
    # One text at a time: in bf16 / fp16 the kernels' rounding depends on how many rows a product has, and a
    # query's scores must not depend on the queries asked with it (retrieve.py and the web page agree to 1e-4).
    with torch.inference_mode(), autocast(device, precision), single_cpu_thread(device):
        feats = torch.cat([model.features("text", ids[i:i + 1]) for i in range(len(texts))])
    return similarity(feats.float().cpu(), gallery_feats).topk(min(k, gallery_feats.shape[0]), dim=1)


class Searcher:
    """One gallery, embedded by each of several runs; see the module docstring."""

    def __init__(self, runs: Sequence[SearchRun], split: str = "test", folder: Optional[str] = None):
        if not runs:
            raise UserError("no run to search with")
        self.runs = list(runs)
        self.names = [run.name for run in self.runs]
        first = self.runs[0].loaded.cfg
        self.gallery, self.captions, self.caption_image = build_gallery(first, split if folder is None else None,
                                                                        folder)
        self._feats: List[torch.Tensor] = []
        self.embedded: List[Tuple[bool, Optional[str]]] = []
        for run in self.runs:
            cfg = run.loaded.cfg
            settings = {"compat": run.loaded.compat, "img_size": list(cfg.img_size), "precision": cfg.precision,
                        "batch_size": cfg.test_batch_size}
            if cfg.image_recipe != "clip":  # (likewise)
                settings["image_recipe"] = cfg.image_recipe
            if run.loaded.model.similarity != DEFAULT:  # (the key of every cache written before it existed)
                settings["similarity"] = [list(w) for w in run.loaded.model.similarity.weights]
            feats, cached, cache_file = gallery_embeddings(run.loaded.model, self.gallery,
                                                           run.loaded.checkpoint_path, run.cache_dir, settings,
                                                           cfg.num_workers)
            self._feats.append(feats)
            self.embedded.append((cached, cache_file))

    def identity(self, text: str) -> Optional[int]:
        return self.gallery.query_pids.get(normalise_caption(text))

    def search(self, texts: Sequence[str], k: int) -> List[List[List[SearchHit]]]:
        if k < 1:
            raise UserError(f"k (hits per query) must be at least 1; got {k}")
        texts = list(texts)
        if not texts:
            return []
        pids = [self.identity(text) if self.gallery.pids is not None else None for text in texts]
        results: List[List[List[SearchHit]]] = [[] for _ in texts]
        paths, gallery_pids = self.gallery.paths, self.gallery.pids
        for run, feats in zip(self.runs, self._feats):
            cfg = run.loaded.cfg
            scores, index = top_k(run.loaded.model, texts, feats, k, cfg.text_length, cfg.precision)
            for q, pid in enumerate(pids):
                results[q].append([
                    SearchHit(rank, score, paths[i], None if pid is None else gallery_pids[i] == pid)
                    for rank, (score, i) in enumerate(zip(scores[q].tolist(), index[q].tolist()), start=1)])
        return results


def resolve_queries(queries: List[Tuple[str, object]], gallery: Gallery, captions: List[str],
                    split_name: str) -> List[Tuple[str, Optional[int]]]:
    """(text, pid or None) per query, in command-line order."""
    out: List[Tuple[str, Optional[int]]] = []
    for kind, value in queries:
        if kind == "caption":
            if not captions:
                raise UserError("--caption N picks a caption of a split; it cannot be used with --gallery")
            if not 0 <= value < len(captions):
                raise UserError(f"--caption {value}: the {split_name} split has captions 0 to {len(captions) - 1}")
            text = captions[value]
        else:
            text = " ".join(str(value).split())
            if not text:
                raise UserError("--query: the text is empty")
        out.append((text, gallery.query_pids.get(normalise_caption(text))))
    return out


def answer(runs: Sequence[SearchRun], queries: List[Tuple[str, object]], split_name: str, folder: Optional[str],
           topk: int) -> Tuple[Searcher, List[ResultRow]]:
    """Everything between the input and the printed answer: the gallery, each run's embeddings (cached), the search.

    `queries` are ("text", TEXT) or ("caption", INDEX) pairs. Returns the Searcher (its gallery, and per run
    whether the embeddings came from the cache) and one ResultRow per query and run, query-major (the row's note
    says whether the query's identity is known).
    """
    searcher = Searcher(runs, split_name, folder)
    resolved = resolve_queries(queries, searcher.gallery, searcher.captions, split_name)
    results = searcher.search([text for text, _ in resolved], topk)
    rows = []
    for (text, pid), per_run in zip(resolved, results):
        note = f"caption of id {pid}: green = same id, red = other" if pid is not None else \
            "free text: identities unknown"
        rows.extend(ResultRow(text, [Hit(hit.path, hit.score, hit.correct) for hit in hits], note, name)
                    for name, hits in zip(searcher.names, per_run))
    return searcher, rows
