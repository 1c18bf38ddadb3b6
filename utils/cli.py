"""What every entry point shares: flags vs. config overrides, and turning UserError into one line + exit code."""
from __future__ import annotations

import argparse
import difflib
import errno
import os
import re
import shutil
import sys
import traceback
from typing import Callable, List, Optional, Sequence, Tuple

from utils.config import build_config, describe_options, option_names, parse_overrides
from utils.errors import UserError


def split_argv(parser: argparse.ArgumentParser, argv: Optional[Sequence[str]]) -> Tuple[argparse.Namespace, dict]:
    """Entry-point flags via `parser`; every other `--key value` is a config override (checked by name).

    `-h` / `--help` prints the entry point's flags and every config option, a plug-in's included when
    `--config_file` or `--custom_imports` names it, and exits.
    """
    argv = list(sys.argv[1:] if argv is None else argv)
    if "-h" in argv or "--help" in argv:
        print_help(parser, [a for a in argv if a not in ("-h", "--help")])
        raise SystemExit(0)
    args, rest = parser.parse_known_args(argv)
    _check_misspelt_flags(parser, rest)
    return args, parse_overrides(list(rest))


def print_help(parser: argparse.ArgumentParser, argv: Sequence[str]) -> None:
    parser.print_help()
    cfg = None
    try:
        config_file = (take_option(argv, "--config_file")[0] or [])[:1]
        imports = take_option(argv, "--custom_imports")[0] or []
        cfg = build_config(config_file[0] if config_file and os.path.isfile(config_file[0]) else None,
                           {"custom_imports": imports} if imports else None, check=False)
    except UserError as e:
        print(f"\n(plug-in options not listed: {e})")
    print()
    print(describe_options(cfg))


def take_option(argv: Sequence[str], flag: str) -> Tuple[Optional[List[str]], List[str]]:
    """(the tokens after the first `flag` up to the next option, or None without the flag; `argv` without the flag
    and those tokens), for what the argument parser does not handle (--help, run.sh's --seeds)."""
    if flag not in argv:
        return None, list(argv)
    start = list(argv).index(flag)
    end = start + 1
    while end < len(argv) and not argv[end].startswith("--"):
        end += 1
    return list(argv[start + 1:end]), [*argv[:start], *argv[end:]]


def _check_misspelt_flags(parser: argparse.ArgumentParser, rest: Sequence[str]) -> None:
    """An unknown `--key` closest to one of the entry point's own flags is named with that flag (config keys get
    their suggestion from parse_overrides)."""
    flags = sorted(set(re.findall(r"--(\w+)", parser.format_usage())))
    for token in rest:
        key = token[2:].split("=", 1)[0] if token.startswith("--") else ""
        if key and key not in option_names():
            close = difflib.get_close_matches(key, flags + option_names(), n=1, cutoff=0.5)
            if close and close[0] in flags:
                raise UserError(f"command line: unknown option '--{key}'; did you mean '--{close[0]}'?")


def run_main(main: Callable[[List[str]], int], argv: Optional[List[str]] = None) -> None:
    """Call `main(argv)`; a UserError becomes 'error: <message>' on stderr and its exit code, unless --debug."""
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        code = main(argv)
    except UserError as e:
        if "--debug" in argv:
            raise
        print(f"error: {e}", file=sys.stderr)
        code = getattr(e, "exit_code", 2)
        # Release what the failed call held (e.g. data-loader workers) now: torch re-raises a worker's error from
        # a frame that refers to it, a cycle that the garbage collector would otherwise meet much later and then
        # stop each worker only after a 5 s timeout.
        traceback.clear_frames(e.__traceback__)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        code = 130
    sys.exit(code or 0)


def check_output_dir(path: str, needed_bytes: int = 0) -> None:
    """The run folder exists or can be created, is writable, and its disk has room for `needed_bytes` more.

    Writes nothing, creates nothing: a command that fails later must leave no folder behind.
    """
    existing = os.path.abspath(path)
    while not os.path.exists(existing) and os.path.dirname(existing) != existing:
        existing = os.path.dirname(existing)
    if not os.path.isdir(existing):
        raise UserError(f"output folder {path} cannot be created: {existing} is a file, not a folder")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise UserError(f"output folder {path} is not writable ({existing}: {os.strerror(errno.EACCES)})")
    free = shutil.disk_usage(existing).free
    if needed_bytes and free < needed_bytes:
        raise UserError(f"output folder {path} has {free / 2**30:.2f} GiB free but checkpoints need about "
                        f"{needed_bytes / 2**30:.2f} GiB; free some space or set --output_dir elsewhere")
