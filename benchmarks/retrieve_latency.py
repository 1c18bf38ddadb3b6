"""Answer time of retrieve.py: one query against a split, with and without the gallery cache.

    python -m benchmarks.retrieve_latency --config_file RUN/configs.yaml [--repeats 7] [--key value ...]

Times `retrieve.answer` (everything between the known input and the printed answer: reading the split, the
cache lookup or the gallery embedding, the text encoding and the ranking) in this one process, after loading
the model once. The cache lives in a temporary folder. Prints the medians and their ratio; the target is a
cached answer under 2 s.
"""
from __future__ import annotations

import shutil
import statistics
import tempfile
import time


from evaluation.search import SearchRun, answer
from model import load_model
from utils.cli import add_shared, command, integer, parse_command_line, run_main

QUERY = ("text", "a woman with long black hair in a red coat and blue jeans, carrying a backpack")


def timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def main(argv=None) -> None:
    parser = command("python -m benchmarks.retrieve_latency", __doc__)
    parser.add_argument("--config_file", required=True)
    parser.add_argument("--split", choices=("test", "val"), default="test")
    parser.add_argument("--repeats", type=integer, default=7,
                        help="cached answers timed (uncached: half as many, >= 2)")
    add_shared(parser, "compat")
    args = parse_command_line(parser, argv)
    run = load_model(args.config_file, compat=args.compat, overrides=args.overrides)
    cache_dir = tempfile.mkdtemp(prefix="retrieve-bench-")
    try:
        def query(cache):
            return answer([SearchRun(run.cfg.name, run, cache)], [QUERY], args.split, None, 10)

        uncached = [timed(lambda: query(None)) for _ in range(max(2, args.repeats // 2))]
        first = timed(lambda: query(cache_dir))  # embeds the gallery and writes the cache
        cached = [timed(lambda: query(cache_dir)) for _ in range(args.repeats)]
        searcher, _ = query(cache_dir)
        gallery, reused = searcher.gallery, searcher.embedded[0][0]
        assert reused, "the cache was not reused"
    finally:
        shutil.rmtree(cache_dir, ignore_errors=True)
    print(f"{run.cfg.dataset_name}/{args.split}: gallery of {len(gallery)} images, device "
          f"{next(run.model.parameters()).device}, precision {run.cfg.precision}")
    print(f"without cache  (embeds the gallery): median {statistics.median(uncached):.3f} s over {len(uncached)} "
          f"(min {min(uncached):.3f})")
    print(f"first cached run (embed + write):    {first:.3f} s")
    print(f"with cache     (the target, < 2 s):  median {statistics.median(cached):.3f} s over {len(cached)} "
          f"(min {min(cached):.3f}, max {max(cached):.3f})")
    print(f"speed-up from the cache: {statistics.median(uncached) / statistics.median(cached):.1f}x")


if __name__ == "__main__":
    run_main(main)
