"""Text-to-image search with a trained run, from the command line.

    python retrieve.py --config_file RUN/configs.yaml --query "a woman in a red coat ..." [--query ...]
                       [--split test | --gallery DIR] [--caption N ...] --topk 10 --out results.png

The gallery is a split of the run's data set (default: the test split) or any folder of .jpg / .png images
(`--gallery`, searched recursively). Its embeddings are computed once and cached under `<run>/cache/`, keyed by
the checkpoint file and the gallery's files (see evaluation/gallery_cache.py); a later query reuses them.

Output: stdout holds only the hits, one line each, `rank score path` (cosine score, path relative to the current
folder when it lies below it, otherwise absolute, unquoted), query after query, ranks restarting at 1. stderr
holds a `# query N: TEXT [...]` line before each query's hits and finally `# answered in S s`, timed from the
moment the input is known to the printed answer (model loading excluded), and the log. `--topk` beyond the
gallery's size gives every image, with a note on stderr. The picture (`--out`, default `<run>/retrieval.png`) has
one row per query, at most 20 queries of 12 hits (evaluation/visualize.py Style); what it leaves out is counted in it
and in a note on stderr, and stdout still lists every hit.

Frames in the picture: with a split gallery, a query that is one of the split's captions (`--caption N` picks
caption N; a `--query` equal to a caption up to case and spacing counts too) has a known identity, and its hits
are framed green (same identity) or red (another one). Free-text queries and folder galleries have no known
identity: grey frames.
"""
from __future__ import annotations

import argparse
import contextlib
import logging
import os
import sys
import time
from typing import Iterator, List, Optional, Tuple

import torch
import torch.nn.functional as F

from evaluation.gallery_cache import (Gallery, gallery_embeddings, gallery_from_folder, gallery_from_split,
                                      normalise_caption)
from evaluation.visualize import Hit, ResultRow, Style, draw_results, left_out
from model import load_model
from model.loading import LoadedRun
from utils.cli import run_main, split_argv
from utils.env import autocast, resolve_device
from utils.errors import UserError
from utils.logger import setup_logger
from utils.tokenizer import tokenize


def _text_query(value: str) -> Tuple[str, str]:
    return "text", value


def _caption_query(value: str) -> Tuple[str, int]:
    try:
        return "caption", int(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a caption index (an integer), got {value!r}") from None


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, allow_abbrev=False,
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog="Config options can follow as --key value, e.g. --root_dir /data "
                                       "--compat none|php_v1|auto --device cpu.")
    p.add_argument("--config_file", required=True, help="the run's configs.yaml")
    p.add_argument("--query", dest="queries", action="append", type=_text_query, default=[], metavar="TEXT",
                   help="a description to search for; repeat for several queries (one picture row each)")
    p.add_argument("--caption", dest="queries", action="append", type=_caption_query, metavar="N",
                   help="use caption N (from 0) of the split as a query; its identity frames the hits")
    p.add_argument("--split", default=None, choices=("test", "val"), help="search this split (default: test)")
    p.add_argument("--gallery", default=None, metavar="DIR", help="search the images in DIR instead of a split")
    p.add_argument("--topk", type=int, default=10, help="hits per query (default 10)")
    p.add_argument("--out", default=None, help="the picture to write (default: <run>/retrieval.png)")
    p.add_argument("--checkpoint", default=None, help="checkpoint to use (default: best.pth beside the config)")
    p.add_argument("--cache_dir", default=None, help="where gallery embeddings are cached (default: <run>/cache)")
    p.add_argument("--no_cache", action="store_true", help="neither read nor write the gallery cache")
    p.add_argument("--trust_checkpoint", action="store_true",
                   help="allow checkpoints that need full unpickling (only for files you trust)")
    p.add_argument("--debug", action="store_true", help="show Python tracebacks for errors")
    return p


def shown_path(path: str) -> str:
    """`path` relative to the current folder when it lies below it, otherwise absolute."""
    path = os.path.abspath(path)
    rel = os.path.relpath(path)
    return path if rel == os.pardir or rel.startswith(os.pardir + os.sep) else rel


def build_gallery(cfg, split_name: Optional[str], folder: Optional[str]) -> Tuple[Gallery, List[str]]:
    """The gallery to search and the split's captions (empty for a folder gallery)."""
    if folder is not None:
        return gallery_from_folder(folder), []
    from datasets import dataset_from_config
    # The gallery's own images are checked when they are fingerprinted; checking every split's is not needed.
    split = getattr(dataset_from_config(cfg, check_images=cfg.skip_missing_images), split_name)
    if not split["img_paths"]:
        raise UserError(f"{cfg.dataset_name} has no {split_name} split under {cfg.root_dir}")
    source = f"{cfg.dataset_name}/{split_name} under {os.path.abspath(cfg.root_dir)}"
    return gallery_from_split(split, source), split["captions"]


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


# Up to this many queries are encoded on one CPU thread (see single_cpu_thread).
FEW_QUERIES = 32


@contextlib.contextmanager
def single_cpu_thread(device: torch.device, enabled: bool = True) -> Iterator[None]:
    """Run a few captions' worth of CPU work on one thread.

    Intra-op parallelism does not pay for matrices this small, and on a busy machine the threads' hand-offs
    dominate: measured here (2 cores, shared), one query took 1-3 s with 2 threads and 0.06 s with one.
    """
    if device.type != "cpu" or not enabled:
        yield
        return
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def search(model: torch.nn.Module, texts: List[str], gallery_feats: torch.Tensor, topk: int, text_length: int,
           precision: str = "fp32") -> Tuple[torch.Tensor, torch.Tensor]:
    """Cosine scores and gallery indices [Q, k] of the top-k images per text, best first."""
    device = next(model.parameters()).device
    ids = tokenize(texts, text_length, truncate=True).to(device)
    model.eval()
    with torch.inference_mode(), autocast(device, precision), \
            single_cpu_thread(device, len(texts) <= FEW_QUERIES):
        feats = model.encode_text(ids)
    feats = F.normalize(feats.float(), dim=-1).cpu()
    scores, index = (feats @ gallery_feats.T).topk(min(topk, gallery_feats.shape[0]), dim=1)
    return scores, index


def answer(run: LoadedRun, queries: List[Tuple[str, object]], split_name: str, folder: Optional[str],
           topk: int, cache_dir: Optional[str]) -> Tuple[Gallery, List[ResultRow], bool, Optional[str]]:
    """Everything between the input and the printed answer: the gallery, its embeddings (cached), the search.

    `queries` are ("text", TEXT) or ("caption", INDEX) pairs. Returns the gallery, one ResultRow per query (the
    row's note says whether the query's identity is known), whether the embeddings came from the cache, and the
    cache file (None without one).
    """
    cfg = run.cfg
    gallery, captions = build_gallery(cfg, split_name if folder is None else None, folder)
    resolved = resolve_queries(queries, gallery, captions, split_name)
    settings = {"compat": run.compat, "img_size": list(cfg.img_size), "precision": cfg.precision,
                "batch_size": cfg.test_batch_size}
    gallery_feats, cached, cache_file = gallery_embeddings(run.model, gallery, run.checkpoint_path, cache_dir,
                                                           settings, cfg.num_workers)
    scores, index = search(run.model, [text for text, _ in resolved], gallery_feats, topk, cfg.text_length,
                           cfg.precision)
    rows = []
    for q, (text, pid) in enumerate(resolved):
        known = pid is not None and gallery.pids is not None
        hits = [Hit(gallery.paths[i], score, gallery.pids[i] == pid if known else None)
                for score, i in zip(scores[q].tolist(), index[q].tolist())]
        note = f"caption of id {pid}: green = same id, red = other" if pid is not None else \
            "free text: identities unknown"
        rows.append(ResultRow(text, hits, note))
    return gallery, rows, cached, cache_file


def _log_to_stderr(logger: logging.Logger) -> None:
    # stdout carries only the answer, so that scripts can read it.
    for handler in logger.handlers:
        if isinstance(handler, logging.StreamHandler) and getattr(handler, "stream", None) is sys.stdout:
            handler.setStream(sys.stderr)


def main(argv) -> int:
    args, overrides = split_argv(parser(), argv)
    if not args.queries:
        raise UserError("nothing to search for: give --query TEXT (or --caption N), repeatable")
    if args.topk < 1:
        raise UserError(f"--topk must be at least 1; got {args.topk}")
    if args.gallery is not None and args.split is not None:
        raise UserError("give either --split or --gallery, not both")
    split_name = args.split or "test"
    logger = setup_logger()
    _log_to_stderr(logger)
    compat = overrides.pop("compat", "auto")
    device = resolve_device(overrides.get("device", "auto"))
    load_start = time.perf_counter()
    run = load_model(args.config_file, args.checkpoint, device=str(device), compat=compat, overrides=overrides,
                     trusted=args.trust_checkpoint)
    tokenize("")  # reads the BPE vocabulary: part of loading the model, not of answering
    load_seconds = time.perf_counter() - load_start
    run_dir = os.path.dirname(os.path.abspath(args.config_file))
    cache_dir = None if args.no_cache else (args.cache_dir or os.path.join(run_dir, "cache"))

    # The input is known from here on: this is what the answer time measures.
    start = time.perf_counter()
    gallery, rows, cached, cache_file = answer(run, args.queries, split_name, args.gallery, args.topk, cache_dir)
    if args.topk > len(gallery):
        print(f"# --topk {args.topk} is more than the gallery's {len(gallery)} images: giving all {len(gallery)}",
              file=sys.stderr, flush=True)
    for q, row in enumerate(rows):
        print(f"# query {q + 1}: {row.query} [{row.note}]", file=sys.stderr, flush=True)
        for rank, hit in enumerate(row.hits, start=1):
            print(f"{rank} {hit.score:.4f} {shown_path(hit.path)}", flush=True)
    how = "cached embeddings" if cached else "embedded now" + (", cache written" if cache_file else "")
    print(f"# answered in {time.perf_counter() - start:.3f} s (gallery of {len(gallery)} images, {how}; "
          f"model loading {load_seconds:.2f} s not counted)", file=sys.stderr, flush=True)

    out = args.out or os.path.join(run_dir, "retrieval.png")
    draw_results(rows, out)
    queries_left, hits_left = left_out(rows)
    if hits_left:
        style = Style()
        print(f"# the picture is capped at {style.max_rows} queries x {style.max_cols} hits: "
              + (f"{queries_left} of {len(rows)} queries and " if queries_left else "")
              + f"{hits_left} hits are not drawn (stdout lists them all)", file=sys.stderr, flush=True)
    logger.info("picture: %s", out)
    return 0


if __name__ == "__main__":
    run_main(main)
