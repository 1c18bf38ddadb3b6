"""Time `retrieval_metrics` against the plain full-sort computation on an ICFG-PEDES-sized similarity matrix.

    python -m benchmarks.eval_metrics [--size 19848] [--repeats 3] [--threads T] [--alpha 2.3] [--seed 0]

Builds a random case like the ICFG-PEDES test split (`--size` captions x `--size` images, one caption per image,
1,000 identities at full size, scaled with the size), scores = Gaussian noise + alpha for a same-identity pair
(alpha 2.3 gives R1 near 60), and saves it to a temporary .pt file. Then, each in its own process so that peak
memory is its own, it runs (a) `retrieval_metrics` and (b) the plain vectorised approach (argsort of the whole
matrix, gathered pids, a matches matrix, cumulative sums). Each process loads the file, resets its peak-memory
mark, then times the metric step only (median of `--repeats`). The fast process also times one plain pass over
the matrix (`similarity.max(dim=1)`): the "read once" floor. Printed: seconds, peak resident memory
(ru_maxrss) and its increase over the memory right after loading, both sets of values, the speed ratio, and
whether the values agree to 1e-3 points. Targets: >= 10x faster, <= 1 GB beyond the matrix, equal values.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from typing import Callable, Dict, List, Tuple

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

from evaluation.metrics import retrieval_metrics
from utils.cli import command

FULL_SIZE, FULL_IDS = 19848, 1000
KEYS = ("R1", "R5", "R10", "mAP", "mINP")
TOLERANCE = 1e-3


def build_case(size: int, alpha: float, seed: int, path: str) -> None:
    """Write {similarity [size, size] float32, query_pids, gallery_pids} to `path` (query i describes image i)."""
    gen = torch.Generator().manual_seed(seed)
    num_ids = max(2, round(FULL_IDS * size / FULL_SIZE))
    pids = torch.randint(0, num_ids, (size,), generator=gen)
    similarity = torch.randn(size, size, generator=gen)
    for start in range(0, size, 1024):
        block = similarity[start:start + 1024]
        block += alpha * (pids[start:start + 1024, None] == pids[None, :])
    torch.save({"similarity": similarity, "query_pids": pids.clone(), "gallery_pids": pids.clone()}, path)


def full_sort_metrics(similarity: torch.Tensor, query_pids: torch.Tensor,
                      gallery_pids: torch.Tensor) -> Dict[str, float]:
    """The plain computation: sort every row, mark matches, cumulative counts give CMC, AP and INP."""
    order = torch.argsort(similarity, dim=1, descending=True)
    ranked_pids = gallery_pids[order]
    del order
    matches = ranked_pids == query_pids[:, None]
    del ranked_pids
    has_match = matches.any(dim=1)
    matches = matches[has_match]
    num_rel = matches.sum(dim=1)
    cum = matches.cumsum(dim=1)
    cmc = (cum[:, :10] > 0).float().mean(dim=0) * 100
    positions = torch.arange(1, matches.shape[1] + 1, dtype=torch.float32)
    ap = ((cum / positions) * matches).sum(dim=1) / num_rel
    last = matches.shape[1] - torch.argmax(matches.flip(1).to(torch.uint8), dim=1)
    inp = num_rel / last
    return {"R1": float(cmc[0]), "R5": float(cmc[4]), "R10": float(cmc[9]), "mAP": float(ap.mean() * 100),
            "mINP": float(inp.mean() * 100), "num_queries": int(has_match.sum())}


def _status_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    return 0


def _timed(fn: Callable[[], object], repeats: int) -> Tuple[List[float], object]:
    times, out = [], None
    for _ in range(repeats):
        t0 = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - t0)
    return times, out


def worker(method: str, path: str, repeats: int, threads: int) -> None:
    """One measured process: load, reset the peak-memory mark, time, print one JSON line."""
    if threads:
        torch.set_num_threads(threads)
    case = torch.load(path, weights_only=True)
    sim, qp, gp = case["similarity"], case["query_pids"], case["gallery_pids"]
    try:
        # Resets the kernel's peak-RSS mark (and so ru_maxrss) to the current RSS, so the load does not count.
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        reset = True
    except OSError:
        reset = False
    rss_after_load = _status_kib("VmRSS")
    report = {"method": method, "threads": torch.get_num_threads(), "peak_reset": reset}
    if method == "fast":
        floor, _ = _timed(lambda: sim.max(dim=1), repeats)
        report["floor_s"] = floor
        times, values = _timed(lambda: retrieval_metrics(sim, qp, gp), repeats)
    else:
        times, values = _timed(lambda: full_sort_metrics(sim, qp, gp), repeats)
    report.update(seconds=times, values=values, rss_after_load_kib=rss_after_load,
                  ru_maxrss_kib=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)
    print("RESULT " + json.dumps(report), flush=True)


def _run_worker(method: str, path: str, args: argparse.Namespace) -> Dict:
    cmd = [sys.executable, "-m", "benchmarks.eval_metrics", "--worker", method, "--input", path,
           "--repeats", str(args.repeats), "--threads", str(args.threads or 0)]
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
    if proc.returncode != 0:
        raise RuntimeError(f"{method} worker failed (exit {proc.returncode}):\n{proc.stderr[-2000:]}")
    line = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")][-1]
    return json.loads(line[len("RESULT "):])


def main() -> None:
    parser = command("python -m benchmarks.eval_metrics", __doc__.split("\n")[0], options=False)
    parser.add_argument("--size", type=int, default=FULL_SIZE, help="queries = gallery items (default ICFG test)")
    parser.add_argument("--repeats", type=int, default=3, help="timed runs per method; the median is reported")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: torch default)")
    parser.add_argument("--alpha", type=float, default=2.3, help="same-identity score bonus (noise std 1)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--worker", choices=("fast", "sort"), help=argparse.SUPPRESS)
    parser.add_argument("--input", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        worker(args.worker, args.input, args.repeats, args.threads)
        return

    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "case.pt")
        t0 = time.perf_counter()
        build_case(args.size, args.alpha, args.seed, path)
        print(f"case: {args.size} x {args.size}, {max(2, round(FULL_IDS * args.size / FULL_SIZE))} identities, "
              f"alpha {args.alpha}, matrix {args.size ** 2 * 4 / 2 ** 30:.2f} GiB, built in "
              f"{time.perf_counter() - t0:.1f} s")
        fast = _run_worker("fast", path, args)
        ref = _run_worker("sort", path, args)

    rows = []
    for name, rep in (("retrieval_metrics", fast), ("full sort", ref)):
        med = statistics.median(rep["seconds"])
        peak, base = rep["ru_maxrss_kib"] / 2 ** 20, rep["rss_after_load_kib"] / 2 ** 20
        rows.append(med)
        values = " ".join(f"{k} {rep['values'][k]:.4f}" for k in KEYS)
        print(f"{name:>17}: {med:7.2f} s (runs {', '.join(f'{s:.2f}' for s in rep['seconds'])}, "
              f"{rep['threads']} threads)  peak RSS {peak:.2f} GiB, +{peak - base:.2f} GiB over the loaded "
              f"matrix{'' if rep['peak_reset'] else ' (peak mark not reset: includes loading)'}\n"
              f"{'':>19}{values}  queries {rep['values']['num_queries']}")
    floor = statistics.median(fast["floor_s"])
    print(f"{'read once floor':>17}: {floor:7.2f} s (similarity.max(dim=1))")
    diff = max(abs(fast["values"][k] - ref["values"][k]) for k in KEYS)
    same = diff <= TOLERANCE and fast["values"]["num_queries"] == ref["values"]["num_queries"]
    print(f"speed ratio: {rows[1] / rows[0]:.1f}x   max |difference|: {diff:.2e} points -> "
          f"{'values agree' if same else 'VALUES DIFFER'} (tolerance {TOLERANCE})")
    if not same:
        sys.exit(1)


if __name__ == "__main__":
    main()
