"""The search page's JSON endpoint against retrieve.py: agreement, answer time, start-up time.

    python -m benchmarks.serve_latency --run logs/Demo-PEDES/php_demo [--captions 20] [--port 7861] [--key value ...]

Starts `sh run.sh serve RUN` (after one warm-up start that fills the gallery cache), times the start-up until the
endpoint answers, asks `/api/search` for `--captions` captions of the test split spread over it (k 10), and runs
retrieve.py once with the same captions. Prints the median answer time of the endpoint (measured here, from request
to parsed answer) and whether every top-10 agrees with retrieve.py: the same paths in the same order, scores within
1e-4.
"""
from __future__ import annotations

import json
import os
import re
import socket
import statistics
import subprocess
import sys
import time
import urllib.parse
import urllib.request

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

from datasets import dataset_from_config
from utils.cli import command, parse_command_line, run_main
from utils.config import build_config

HIT = re.compile(r"^(\d+) (-?\d+\.\d{4}) (\S.*)$")


def start(run: str, port: int, extra: list) -> tuple:
    """(the server process, seconds from launch until /api/search answers)."""
    began = time.perf_counter()
    proc = subprocess.Popen(["sh", os.path.join(ROOT, "run.sh"), "serve", run, "--port", str(port), *extra],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    while True:
        if proc.poll() is not None:
            raise SystemExit(f"the server stopped: {proc.stderr.read()[-2000:]}")
        try:
            ask(port, "a person", 1)
            return proc, time.perf_counter() - began
        except OSError:
            time.sleep(0.1)


def ask(port: int, text: str, k: int) -> dict:
    query = urllib.parse.urlencode({"q": text, "k": k})
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/api/search?{query}", timeout=60) as answer:
        return json.load(answer)


def main(argv=None) -> None:
    p = command("python -m benchmarks.serve_latency", __doc__)
    p.add_argument("--run", required=True, help="run folder (configs.yaml + best.pth)")
    p.add_argument("--captions", type=int, default=20)
    p.add_argument("--port", type=int, default=0, help="default: a free port")
    args = parse_command_line(p, argv)
    # The config options again, for serve and retrieve.py: one token each (a list as 384,128).
    extra = [f"--{key}={','.join(value) if isinstance(value, list) else value}"
             for key, value in args.overrides.items()]
    port = args.port
    if not port:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
    cfg = build_config(os.path.join(args.run, "configs.yaml"), args.overrides)
    captions = dataset_from_config(cfg, check_images=False).test["captions"]
    indices = [round(i * (len(captions) - 1) / max(1, args.captions - 1)) for i in range(args.captions)]

    warm, _ = start(args.run, port, extra)  # embeds the gallery and writes the cache, if not done before
    warm.terminate()
    warm.wait()
    server, startup = start(args.run, port, extra)
    try:
        times, answers = [], []
        for i in indices:
            began = time.perf_counter()
            answers.append(ask(port, captions[i], 10))
            times.append(time.perf_counter() - began)
    finally:
        server.terminate()
        server.wait()
    printed = subprocess.run([sys.executable, os.path.join(ROOT, "retrieve.py"), "--config_file",
                              os.path.join(args.run, "configs.yaml"), "--topk", "10", "--out", os.devnull, *extra,
                              *[a for i in indices for a in ("--caption", str(i))]],
                             capture_output=True, text=True, check=True).stdout.splitlines()
    expected = [printed[10 * q:10 * (q + 1)] for q in range(len(indices))]
    agree = 0
    for answer, lines in zip(answers, expected):
        hits = answer["runs"][0]["hits"]
        rows = [HIT.match(line).groups() for line in lines]
        same = [h["path"] for h in hits] == [path for _, _, path in rows] and \
            all(abs(h["score"] - float(score)) <= 1e-4 for h, (_, score, _) in zip(hits, rows))
        agree += same
    print(f"{args.run}: {len(indices)} captions of the test split ({len(captions)} in all)")
    print(f"start-up with a warm cache, launch to first answer: {startup:.2f} s")
    print(f"/api/search answer time: median {statistics.median(times) * 1000:.1f} ms, max {max(times) * 1000:.1f} ms")
    print(f"top-10 equal to retrieve.py's (paths in order, scores within 1e-4): {agree} of {len(indices)}")


if __name__ == "__main__":
    run_main(main)
