"""Check before training that a config's data set and pretrained weights are where it says; list what is missing.

`python tools/preflight.py --config_file configs/php_cuhk.yaml [--key value ...]`: exit 0 when ready, 2 with one
line per missing piece.
"""
from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from datasets import dataset_from_config  # noqa: E402
from model.backbone import resolve_pretrained_path  # noqa: E402
from utils.cli import run_main, split_argv  # noqa: E402
from utils.config import build_config  # noqa: E402
from utils.errors import UserError  # noqa: E402


def problems(cfg) -> list:
    found = []
    if cfg.dataset_name != "Demo-PEDES":  # generated on first use
        try:
            dataset_from_config(cfg, check_images=False)
        except UserError as e:
            found.append(str(e))
    try:
        resolve_pretrained_path(cfg.pretrain_choice, cfg.pretrained_dir)
    except UserError as e:
        found.append(str(e))
    return found


def main(argv) -> int:
    p = argparse.ArgumentParser(description=__doc__, allow_abbrev=False)
    p.add_argument("--config_file", required=True)
    p.add_argument("--debug", action="store_true")
    args, overrides = split_argv(p, argv)
    cfg = build_config(args.config_file, overrides)
    found = problems(cfg)
    for line in found:
        print(f"missing: {line}", file=sys.stderr)
    return 2 if found else 0


if __name__ == "__main__":
    run_main(main)
