"""The batch-leak experiment (SPEC 8): what cross-batch EFP attention is worth on a test set in identity order.

Trains PHP twice on Demo-PEDES with the same seed and config, once with this project's attention within each
sample (`efp_attention: tokens`) and once with the reference release's attention across the batch
(`efp_attention: batch`). Each is evaluated with the test lists in identity order, shuffled, and one sample per
batch, on the Demo-PEDES test split as annotated (two captions per image) and on an ICFG-like version of it (one
caption per image, both lists in identity order, so query batch k and gallery batch k hold the same people).
Writes the table to docs/batch_leak.md.

    python tools/leak_study.py            (or: sh run.sh leak-study)
"""
from __future__ import annotations

import argparse
import datetime
import os
import platform
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import torch  # noqa: E402

import train  # noqa: E402
from datasets import dataset_from_config  # noqa: E402
from evaluation.audit import ORDERS, audit  # noqa: E402
from model import load_model  # noqa: E402
from utils.cli import run_main, split_argv  # noqa: E402
from utils.config import build_config  # noqa: E402
from utils.errors import UserError  # noqa: E402
from utils.logger import setup_logger  # noqa: E402

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


def train_run(config_file: str, mode: str, overrides: dict) -> str:
    cfg = build_config(config_file, {**overrides, "name": f"leak_{mode}", "efp_attention": mode})
    argv = ["--config_file", config_file, "--name", cfg.name, "--efp_attention", mode]
    for key, value in overrides.items():
        argv += [f"--{key}", str(value)]
    if os.path.isfile(os.path.join(cfg.run_dir, "last.pth")):
        argv += ["--resume"]  # a finished run returns at once; an interrupted one continues
    code = train.main(argv)
    if code:
        raise UserError(f"training the {mode} model failed (exit {code})")
    return cfg.run_dir


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


def main(argv) -> int:
    p = argparse.ArgumentParser(description=__doc__, allow_abbrev=False,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config_file", default=os.path.join(ROOT, "configs", "demo.yaml"))
    p.add_argument("--out", default=os.path.join(ROOT, "docs", "batch_leak.md"), help="markdown table to write")
    p.add_argument("--eval_batch_size", type=int, default=64, help="test batch size (the PHP release used 64)")
    p.add_argument("--debug", action="store_true")
    args, overrides = split_argv(p, argv)
    overrides.setdefault("output_dir", os.path.join("logs", "leak_study"))
    start = time.time()
    run_dirs = {mode: train_run(args.config_file, mode, overrides) for mode in MODES}
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
    command = "python tools/leak_study.py " + " ".join(argv)
    text = markdown(rows, command.strip(), time.time() - start, args.eval_batch_size)
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "w", encoding="utf-8") as f:
        f.write(text)
    print(text)
    return 0


if __name__ == "__main__":
    run_main(main)
