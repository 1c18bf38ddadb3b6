"""Search trained runs from a browser: a local web page and a JSON endpoint on one server.

    sh run.sh serve [RUN_DIR ...] [--port 7860] [--host 127.0.0.1] [--gallery DIR | --split val] [--key value ...]

With no RUN_DIR, every run folder under ./logs (configs.yaml + best.pth, any depth) is served. The gallery is the
first run's test split (`--split val`: its val split) or every image under `--gallery DIR`, as in retrieve.py, and
every run searches it with its cached embeddings (evaluation/search.py). `--key value` config options apply to every
run (`--root_dir /data/reid`, `--device cpu`, `--compat none`); `--topk` is the page's initial k (default 10).

The server, its routes and what it refuses are evaluation/web.py; the page is evaluation/search_page.py. It binds
127.0.0.1 unless --host says otherwise, and loads nothing from the network.
"""
from __future__ import annotations

import ipaddress
import os
import sys
import time

from evaluation.runs import LOGS, config_path, discover_runs
from evaluation.web import Service, allowed_hosts, build_app, listening_socket, shown_url
from utils.cli import add_shared, command, integer, parse_command_line, run_main
from utils.errors import UserError
from utils.logger import setup_logger

COMMAND = command("sh run.sh serve", __doc__, positionals="RUN_DIR",
                  epilog="Config options as --key value apply to every run.")
COMMAND.add_argument("--port", type=integer, default=7860, help="port to listen on (0: any free one)")
COMMAND.add_argument("--host", default="127.0.0.1",
                     help="address to bind (127.0.0.1: this machine only; 0.0.0.0 opens it to the network)")
COMMAND.add_argument("--gallery", metavar="DIR", help="search the images in DIR instead of a split")
COMMAND.add_argument("--split", choices=("test", "val"), help="search this split (default: test)")
COMMAND.add_argument("--topk", type=integer, default=10, help="the page's initial k, hits per run")
COMMAND.add_argument("--cache_dir", help="where gallery embeddings are cached (default: <run>/cache)")
COMMAND.add_argument("--no_cache", action="store_true", help="neither read nor write the gallery cache")
COMMAND.add_argument("--allow_host", action="append", metavar="NAME",
                     help="another name requests may address this server by (with --host beyond 127.0.0.1)")
add_shared(COMMAND, "compat", "trust_checkpoint", "debug")


def main(argv) -> int:
    started = time.perf_counter()
    args = parse_command_line(COMMAND, argv)
    if not 0 <= args.port <= 65535:
        raise UserError(f"--port must be between 0 and 65535; got {args.port}")
    if args.topk < 1:
        raise UserError(f"--topk must be at least 1; got {args.topk}")
    if args.gallery is not None and args.split is not None:
        raise UserError("give either --split or --gallery, not both")
    runs = args.positionals or discover_runs(LOGS)
    if not runs:
        raise UserError(f"no run to serve: ./{LOGS} holds no folder with configs.yaml and best.pth "
                        f"(train one with `sh run.sh`, or name RUN_DIRs)")
    config_files = [config_path(run) for run in runs]
    setup_logger()
    sock = listening_socket(args.host, args.port)
    try:
        from evaluation.search import Searcher, load_runs
        overrides = dict(args.overrides)
        loaded = load_runs(config_files, None, overrides.get("device", "auto"), args.compat, overrides,
                           args.trust_checkpoint, args.cache_dir, args.no_cache)
        split_name = args.split or "test"
        service = Service(Searcher(loaded, split_name, args.gallery), split_name, args.gallery)
        # Belt and braces behind the allow-list: Gradio itself must never serve a run folder's files.
        blocked = [os.path.dirname(os.path.abspath(path)) for path in config_files]
        hosts = allowed_hosts(sock, args.allow_host)
        if not ipaddress.ip_address(sock.getsockname()[0]).is_loopback:
            print(f"warning: serving on {args.host}, beyond this machine: anyone who can reach it can search the runs "
                  f"and see the gallery's images; requests must name it as one of {', '.join(sorted(hosts))} "
                  f"(--allow_host adds names)", file=sys.stderr, flush=True)
        app = build_app(service, args.topk, blocked, hosts)
        import uvicorn
        server = uvicorn.Server(uvicorn.Config(app, log_level="warning", access_log=False, lifespan="on",
                                               timeout_graceful_shutdown=2))
        print(f"serving {shown_url(sock)} ({service.description}; runs: {', '.join(service.names)}; ready in "
              f"{time.perf_counter() - started:.1f} s)", flush=True)
        server.run(sockets=[sock])
    finally:
        sock.close()
    return 0


if __name__ == "__main__":
    run_main(main)
