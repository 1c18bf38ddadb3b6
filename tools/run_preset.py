"""Train and test a preset, once or once per seed: what `sh run.sh <preset> [--seeds N ...] [--key value ...]` runs.

    python -m tools.run_preset --config_file configs/smoke.yaml --seeds 1 2 3 --lr 1e-4

For each seed (or once, without --seeds) it checks that the data set and the weights are where the config says,
trains the run (named `<name>_seed<N>` with --seeds), and tests it. A run that already has a last.pth is never
overwritten: a finished one is only tested again, a partly trained one resumes. It stops at the first run that
fails, with that run's exit code. The job itself is processor.presets.run_preset.
"""
from __future__ import annotations

from processor.presets import run_preset
from utils.cli import add_shared, command, integer, parse_command_line, run_main
from utils.config import build_config

COMMAND = command("sh run.sh <preset>", __doc__)
COMMAND.add_argument("--config_file", required=True, metavar="FILE", help="the preset's YAML")
COMMAND.add_argument("--seeds", nargs="+", type=integer, metavar="N", expects="integers",
                     needs="at least one seed, e.g. --seeds 1 2 3", help="one run per seed, named <name>_seed<N>")
add_shared(COMMAND, "debug")


def main(argv) -> int:
    args = parse_command_line(COMMAND, argv)
    cfg = build_config(args.config_file, args.overrides)
    return run_preset(cfg, args.seeds, args.config_file, seed_given="seed" in args.overrides)


if __name__ == "__main__":
    run_main(main)
