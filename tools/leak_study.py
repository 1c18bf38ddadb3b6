"""The batch-leak experiment (SPEC 8): what cross-batch EFP attention is worth on a test set in identity order.

Trains PHP twice on Demo-PEDES with the same seed and config, once with this project's attention within each
sample (`efp_attention: tokens`) and once with the reference release's attention across the batch
(`efp_attention: batch`). Each is evaluated with the test lists in identity order, shuffled, and one sample per
batch, on the Demo-PEDES test split as annotated (two captions per image) and on an ICFG-like version of it (one
caption per image, both lists in identity order, so query batch k and gallery batch k hold the same people).
Writes the table to docs/batch_leak.md.

    sh run.sh leak-study [--key value ...]        (or: python -m tools.leak_study)
"""
from __future__ import annotations

import datetime
import os
import platform
import time
from typing import Dict

import torch

from datasets import dataset_from_config
from evaluation.audit import ORDERS, audit
from model import load_model
from processor.training import train
from utils.cli import add_shared, command, integer, parse_command_line, run_main
from utils.config import Config, build_config
from utils.logger import setup_logger

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MODES = ("tokens", "batch")
ORDER_NAMES = {"file": "identity order", "shuffled": "shuffled", "single": "one per batch"}


def one_caption_per_image(split: dict) -> dict:
    """The ICFG-PEDES situation: one caption per image (its first), both lists sorted by identity."""
    first = {}
    for caption, index in zip(split["captions"], split["caption_img_index"]):
        first.setdefault(index, caption)
    order = sorted(first, key=lambda i: (split["image_pids"][i], i))
    pids = [split["image_pids"][i] for i in order]
    return {"image_pids": pids, "img_paths": [split["img_paths"][i] for i in order], "caption_pids": pids,
            "captions": [first[i] for i in order], "caption_img_index": list(range(len(order)))}


def study_configs(config_file: str, overrides: dict) -> Dict[str, Config]:
    """The two runs of the study, by EFP attention mode: the config file, the command line's options (as parsed,
    lists included), then the run's name and its attention; an interrupted run is continued."""
    configs = {}
    for mode in MODES:
        cfg = build_config(config_file, {**overrides, "name": f"leak_{mode}", "efp_attention": mode})
        if os.path.isfile(os.path.join(cfg.run_dir, "last.pth")):
            cfg = cfg.copy(resume=True)  # a finished run returns at once; an interrupted one continues
        configs[mode] = cfg
    return configs


def markdown(rows: list, command: str, seconds: float, batch_size: int) -> str:
    lines = [
        "# What the batch leak is worth: a study on Demo-PEDES",
        "",
        "The PHP reference release runs its EFP self-attention across the batch (SPEC section 8), so a sample's",
        "embedding depends on the other samples in its batch. When the test lists are in identity order, the",
        "samples of a batch share identities, and the batch itself leaks them. This study trains PHP twice with",
        "the same seed and config, once with attention within each sample (`efp_attention: tokens`, this",
        "project's default) and once across the batch (`efp_attention: batch`, the reference's behaviour), and",
        "evaluates each with the test lists in identity order, shuffled, and one sample per batch (batch size",
        f"{batch_size} otherwise). The ICFG-like split keeps one caption per image with both lists in identity",
        "order, as in ICFG-PEDES, where query batch k and gallery batch k hold the same people.",
        "",
        f"- Command: `{command}`",
        f"- Machine: {platform.machine()} CPU, {os.cpu_count()} cores, torch {torch.__version__}, "
        f"{seconds / 60:.1f} min in all",
        f"- Date: {datetime.date.today().isoformat()}",
        "",
        "| model | test split | order | R1 | R5 | mAP | largest embedding change |",
        "|---|---|---|---|---|---|---|",
    ]
    for row in rows:
        lines.append(f"| {row['model']} | {row['split']} | {row['order']} | {row['R1']:.2f} | {row['R5']:.2f} | "
                     f"{row['mAP']:.2f} | {row['max_change']:.1e} |")
    lines += ["", "The largest embedding change is the largest `||e - e_single|| / ||e_single||` over the test",
              "set's images and captions, against the embedding computed alone in a batch of one.", ""]
    return "\n".join(lines)


COMMAND = command("sh run.sh leak-study", __doc__)
COMMAND.add_argument("--config_file", default=os.path.join(ROOT, "configs", "demo.yaml"), metavar="FILE",
                     help="the config both runs train")
COMMAND.add_argument("--out", default=os.path.join(ROOT, "docs", "batch_leak.md"), help="markdown table to write")
COMMAND.add_argument("--eval_batch_size", type=integer, default=64, help="test batch size (the PHP release used 64)")
add_shared(COMMAND, "debug")


def main(argv) -> int:
    args = parse_command_line(COMMAND, argv)
    overrides = {"output_dir": os.path.join("logs", "leak_study"), **args.overrides}
    start = time.time()
    run_dirs = {mode: train(cfg, args.config_file).run_dir
                for mode, cfg in study_configs(args.config_file, overrides).items()}
    setup_logger()
    rows = []
    for mode, run_dir in run_dirs.items():
        run = load_model(os.path.join(run_dir, "configs.yaml"), compat="auto",
                         overrides={"test_batch_size": args.eval_batch_size})
        dataset = dataset_from_config(run.cfg)
        splits = {"Demo-PEDES test (2 captions per image)": dataset.test,
                  "ICFG-like (1 caption per image)": one_caption_per_image(dataset.test)}
        for split_name, split in splits.items():
            result = audit(run.model, run.cfg, split, batch_size=args.eval_batch_size)
            for order in ORDERS:
                m = result["modes"][order]
                rows.append({"model": f"efp_attention: {mode}", "split": split_name, "order": ORDER_NAMES[order],
                             **m})
    command = "sh run.sh leak-study " + " ".join(argv)
    text = markdown(rows, command.strip(), time.time() - start, args.eval_batch_size)
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "w", encoding="utf-8") as f:
        f.write(text)
    print(text)
    return 0


if __name__ == "__main__":
    run_main(main)
