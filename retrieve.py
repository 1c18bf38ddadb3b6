"""Text-to-image search with one or more trained runs, from the command line.

    python retrieve.py --config_file RUN/configs.yaml [--config_file RUN2/configs.yaml ...]
                       --query "a woman in a red coat ..." [--query ...]
                       [--split test | --gallery DIR] [--caption N ...] --topk 10 --out results.png

The gallery is a split of the first run's data set (default: the test split) or any folder of .jpg / .png images
(`--gallery`, searched recursively). Every run searches that same gallery with its own model: its embeddings are
computed once and cached under each run's `<run>/cache/`, keyed by the checkpoint file and the gallery's files (see
evaluation/gallery_cache.py); a later query reuses them. The search itself is evaluation/search.py.

Output: stdout holds only the hits, one line each, `rank score path` (cosine score, path relative to the current
folder when it lies below it, otherwise absolute, unquoted), query after query, ranks restarting at 1. With
several runs each line is `run rank score path`, each query's hits run after run; `run` is the run's `name`
option without spaces (runs that share a name are named by their folder). stderr holds a `# query N: TEXT [...]`
line before each query's hits and finally `# answered in S s`, timed from the moment the input is known to the
printed answer (model loading excluded), and the log. `--topk` beyond the gallery's size gives every image, with a
note on stderr. The picture (`--out`, default `<first run>/retrieval.png`) has one row per query and run, labelled
with the run's name when there are several, at most 20 rows of 12 hits (evaluation/visualize.py Style); what it
leaves out is counted in it and in a note on stderr, and stdout still lists every hit.

Frames in the picture: with a split gallery, a query that is one of the split's captions (`--caption N` picks
caption N; a `--query` equal to a caption up to case and spacing counts too) has a known identity, and its hits
are framed green (same identity) or red (another one). Free-text queries and folder galleries have no known
identity: grey frames.
"""
from __future__ import annotations

import logging
import os
import sys
import time
from typing import Tuple

from evaluation.search import Searcher, answer, load_runs, shown_path
from evaluation.visualize import Style, draw_results, left_out
from utils.cli import add_shared, command, integer, parse_command_line, run_main
from utils.errors import UserError
from utils.logger import setup_logger


def _caption_query(value: str) -> Tuple[str, int]:
    return "caption", integer(value)


def _text_query(value: str) -> Tuple[str, str]:
    return "text", value


COMMAND = command("retrieve.py", __doc__, epilog="Config options can follow as --key value, e.g. --root_dir /data "
                                                 "--device cpu; they apply to every run.")
COMMAND.add_argument("--config_file", dest="config_files", action="append", required=True, metavar="CONFIG_FILE",
                     help="the run's configs.yaml; repeat to compare runs (the gallery is the first run's)")
COMMAND.add_argument("--query", dest="queries", action="append", type=_text_query, metavar="TEXT",
                     help="a description to search for; repeat for several queries (one picture row each)")
COMMAND.add_argument("--caption", dest="queries", action="append", type=_caption_query, metavar="N",
                     expects="a caption index (an integer)",
                     help="use caption N (from 0) of the split as a query; its identity frames the hits")
COMMAND.add_argument("--split", choices=("test", "val"), help="search this split (default: test)")
COMMAND.add_argument("--gallery", metavar="DIR", help="search the images in DIR instead of a split")
COMMAND.add_argument("--topk", type=integer, default=10, help="hits per query")
COMMAND.add_argument("--out", help="the picture to write (default: <first run>/retrieval.png)")
COMMAND.add_argument("--checkpoint", dest="checkpoints", action="append",
                     help="checkpoint to use (default: best.pth beside the config); with several runs, one per "
                          "--config_file, in the same order")
COMMAND.add_argument("--cache_dir", help="where gallery embeddings are cached (default: <run>/cache)")
COMMAND.add_argument("--no_cache", action="store_true", help="neither read nor write the gallery cache")
add_shared(COMMAND, "compat", "trust_checkpoint", "debug")


def _log_to_stderr(logger: logging.Logger) -> None:
    # stdout carries only the answer, so that scripts can read it.
    for handler in logger.handlers:
        if isinstance(handler, logging.StreamHandler) and getattr(handler, "stream", None) is sys.stdout:
            handler.setStream(sys.stderr)


def _embedded(searcher: Searcher) -> str:
    """Where each run's gallery embeddings came from, for the timing line."""
    how = ["cached embeddings" if cached else "embedded now" + (", cache written" if cache_file else "")
           for cached, cache_file in searcher.embedded]
    return how[0] if len(how) == 1 else "; ".join(f"{name}: {h}" for name, h in zip(searcher.names, how))


def main(argv) -> int:
    args = parse_command_line(COMMAND, argv)
    overrides = args.overrides
    if not args.queries:
        raise UserError("nothing to search for: give --query TEXT (or --caption N), repeatable")
    if args.topk < 1:
        raise UserError(f"--topk must be at least 1; got {args.topk}")
    if args.gallery is not None and args.split is not None:
        raise UserError("give either --split or --gallery, not both")
    if args.checkpoints and len(args.checkpoints) != len(args.config_files):
        raise UserError(f"give one --checkpoint per --config_file, in the same order (got {len(args.checkpoints)} "
                        f"for {len(args.config_files)} runs), or none")
    split_name = args.split or "test"
    logger = setup_logger()
    _log_to_stderr(logger)
    load_start = time.perf_counter()
    runs = load_runs(args.config_files, args.checkpoints, overrides.get("device", "auto"), args.compat, overrides,
                     args.trust_checkpoint, args.cache_dir, args.no_cache)
    load_seconds = time.perf_counter() - load_start

    # The input is known from here on: this is what the answer time measures.
    start = time.perf_counter()
    searcher, rows = answer(runs, args.queries, split_name, args.gallery, args.topk)
    size = len(searcher.gallery)
    if args.topk > size:
        print(f"# --topk {args.topk} is more than the gallery's {size} images: giving all {size}",
              file=sys.stderr, flush=True)
    several = len(runs) > 1
    for i, row in enumerate(rows):
        if i % len(runs) == 0:
            print(f"# query {i // len(runs) + 1}: {row.query} [{row.note}]", file=sys.stderr, flush=True)
        prefix = f"{row.run} " if several else ""
        for rank, hit in enumerate(row.hits, start=1):
            print(f"{prefix}{rank} {hit.score:.4f} {shown_path(hit.path)}", flush=True)
    print(f"# answered in {time.perf_counter() - start:.3f} s (gallery of {size} images, {_embedded(searcher)}; "
          f"model loading {load_seconds:.2f} s not counted)", file=sys.stderr, flush=True)

    out = args.out or os.path.join(os.path.dirname(os.path.abspath(args.config_files[0])), "retrieval.png")
    draw_results(rows, out, runs=len(runs))
    rows_left, hits_left = left_out(rows)
    if hits_left:
        style, unit = Style(), "queries" if not several else "rows"
        print(f"# the picture is capped at {style.max_rows} {unit} x {style.max_cols} hits"
              + (" (a row per query and run)" if several else "") + ": "
              + (f"{rows_left} of {len(rows)} {unit} and " if rows_left else "")
              + f"{hits_left} hits are not drawn (stdout lists them all)", file=sys.stderr, flush=True)
    logger.info("picture: %s", out)
    return 0


if __name__ == "__main__":
    run_main(main)
