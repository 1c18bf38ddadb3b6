"""Train and test a preset, once or once per seed: what `sh run.sh <preset> [--seeds N ...] [--key value ...]` runs.

    python tools/run_preset.py configs/smoke.yaml --seeds 1 2 3 --lr 1e-4

For each seed (or once, without --seeds) it checks that the data set and the weights are where the config says
(tools/preflight.py), trains the run (named `<name>_seed<N>` with --seeds), and tests it. A run that already has
a last.pth is never overwritten: a finished one is only tested again, a partly trained one resumes. It stops at the
first run that fails, with that run's exit code.
"""
from __future__ import annotations

import os
import sys
from typing import List, Optional, Sequence, Tuple

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import test as test_entry  # noqa: E402
import train  # noqa: E402
from tools.preflight import problems  # noqa: E402
from utils.cli import run_main, split_argv, take_option  # noqa: E402
from utils.config import build_config  # noqa: E402
from utils.errors import UserError, short_repr  # noqa: E402


def split_seeds(argv: Sequence[str]) -> Tuple[Optional[List[int]], List[str]]:
    """(the seeds after --seeds, or None without it; the other arguments). The seeds run up to the next option."""
    tokens, rest = take_option(argv, "--seeds")
    if tokens is None:
        return None, rest
    if "--seeds" in rest:
        raise UserError("command line: --seeds is given twice; give every seed after one --seeds")
    if not tokens:
        raise UserError("command line: --seeds needs at least one seed, e.g. --seeds 1 2 3")
    seeds = []
    for token in tokens:
        try:
            seed = int(token)
        except ValueError:
            raise UserError(f"command line: --seeds takes integers; got {short_repr(token)}") from None
        if seed < 0:
            raise UserError(f"command line: --seeds takes seeds of 0 or more; got {seed}")
        if seed in seeds:
            raise UserError(f"command line: --seeds lists seed {seed} twice")
        seeds.append(seed)
    return seeds, rest


def train_and_test(config_file: str, argv: List[str]) -> int:
    """One run: check what it needs, train it (or resume it), test it; the first non-zero exit code, else 0."""
    args, overrides = split_argv(train.parser(), ["--config_file", config_file, *argv])
    cfg = build_config(args.config_file, overrides)
    missing = problems(cfg)
    if missing:
        raise UserError("; ".join(f"missing: {line}" for line in missing))
    command = ["--config_file", config_file, *argv]
    if os.path.isfile(os.path.join(cfg.run_dir, "last.pth")):
        print(f"note: {cfg.run_dir} already holds a run; continuing it (use another --name for a new one)",
              flush=True)
        command.append("--resume")
    code = train.main(command)
    if code:
        return code
    return test_entry.main(["--config_file", os.path.join(cfg.run_dir, "configs.yaml")])


def main(argv: Sequence[str]) -> int:
    if not argv or argv[0].startswith("--"):
        raise UserError("usage: run_preset.py CONFIG_FILE [--seeds N ...] [--key value ...]")
    config_file, rest = argv[0], list(argv[1:])
    seeds, rest = split_seeds(rest)
    if seeds is None:
        return train_and_test(config_file, rest)
    _, overrides = split_argv(train.parser(), ["--config_file", config_file, *rest])
    name = build_config(config_file, overrides, check=False).name
    for seed in seeds:
        print(f"== seed {seed}: run {name}_seed{seed}", flush=True)
        code = train_and_test(config_file, [*rest, "--seed", str(seed), "--name", f"{name}_seed{seed}"])
        if code:
            return code
    return 0


if __name__ == "__main__":
    run_main(main)
