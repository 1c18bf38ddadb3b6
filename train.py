"""Train a model: `python train.py --config_file configs/demo.yaml [--key value ...]`.

Also under torchrun: `torchrun --nproc_per_node=N train.py --config_file ...`.
"""
from __future__ import annotations

import argparse
import dataclasses
import os

import torch

from datasets import build_dataset
from datasets.loaders import build_eval_loaders, build_train_loader
from model import build_model
from model.backbone import compile_blocks
from processor.trainer import Trainer
from utils import distributed as dist_utils
from utils.checkpoint import remove_partial_checkpoints
from utils.cli import check_output_dir, run_main, split_argv
from utils.config import build_config, save_config
from utils.env import resolve_device, seed_everything
from utils.errors import UserError
from utils.evaluator import Evaluator
from utils.logger import setup_logger

DEFAULT_CONFIG = os.path.join(os.path.dirname(os.path.abspath(__file__)), "configs", "demo.yaml")


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, allow_abbrev=False,
                                epilog="Any config option can follow as --key value (see utils/config.py).")
    p.add_argument("--config_file", default=DEFAULT_CONFIG, help="YAML config (default: configs/demo.yaml)")
    p.add_argument("--debug", action="store_true", help="show Python tracebacks for errors")
    return p


def checkpoint_bytes(model: torch.nn.Module) -> int:
    # best.pth + last.pth + one temporary copy, each holding the weights and two Adam moments (fp32).
    return 3 * 3 * 4 * sum(p.numel() for p in model.parameters())


def write_curves(run_dir: str, logger) -> None:
    """curves.png of the finished run; a plotting failure is a warning, never a failed run."""
    try:
        from tools.plot_curves import plot_curves
        logger.info("training curves: %s", plot_curves(run_dir))
    except Exception as e:  # noqa: BLE001 - the checkpoints are what counts
        logger.warning("could not draw the training curves (%s: %s)", type(e).__name__, e)


def main(argv) -> int:
    args, overrides = split_argv(parser(), argv)
    cfg = build_config(args.config_file, overrides)
    rank, world_size, local_rank = dist_utils.init_distributed(cfg.device)
    try:
        return run_training(cfg, rank, world_size, local_rank)
    finally:
        # Also after an error: every rank raises the same UserError (the checks are deterministic) and leaves;
        # if only one rank fails, torchrun stops the others.
        dist_utils.cleanup()


def run_training(cfg, rank: int, world_size: int, local_rank: int) -> int:
    """Train the run of `cfg` as process `rank` of `world_size` (1 without torchrun); returns the exit code."""
    cfg.world_size, cfg.distributed, cfg.local_rank = world_size, world_size > 1, local_rank
    device = resolve_device(cfg.device, local_rank)
    run_dir = cfg.run_dir
    existing = [n for n in ("best.pth", "last.pth") if os.path.isfile(os.path.join(run_dir, n))]
    if existing and not cfg.resume and not cfg.overwrite:
        raise UserError(f"run folder {run_dir} already holds {' and '.join(existing)} of an earlier run; continue it "
                        f"with --resume, replace it with --overwrite, or choose another --name")
    partial = []
    if rank == 0:
        check_output_dir(run_dir)
        # Temporary files of checkpoint writes that a kill interrupted: never loaded, and as large as a checkpoint.
        partial = remove_partial_checkpoints(run_dir)
    dist_utils.barrier()
    logger = setup_logger(os.path.join(run_dir, "train_log.txt"), rank)
    if partial:
        logger.warning("removed %d partial checkpoint file(s) left by an interrupted run: %s", len(partial),
                       ", ".join(partial))
    resume_path = (cfg.resume_ckpt_file or os.path.join(run_dir, "last.pth")) if cfg.resume else None
    if resume_path and not os.path.isfile(resume_path):
        raise UserError(f"--resume: {resume_path} does not exist (nothing to resume in {run_dir})")
    if rank == 0:
        logger.info("run folder %s; device %s; precision %s; %d process(es)", run_dir, device, cfg.precision,
                    world_size)
        # The saved config starts a run, so it does not carry this invocation's resume request.
        save_config(dataclasses.replace(cfg, resume=False, resume_ckpt_file="", overwrite=False),
                    os.path.join(run_dir, "configs.yaml"))
    if cfg.val_dataset == "test" and rank == 0:
        logger.warning("model selection uses the TEST split (val_dataset: test); reported test numbers are then "
                       "optimistic")

    seed_everything(cfg.seed)
    dataset = build_dataset(cfg.dataset_name, cfg.root_dir, val_holdout_ids=cfg.val_holdout_ids,
                            skip_missing_images=cfg.skip_missing_images, demo_seed=cfg.demo_seed)
    if rank == 0:
        logger.info("%s:\n%s", cfg.dataset_name, dataset.summary())
    split = dataset.val if cfg.val_dataset == "val" else dataset.test
    if not split["captions"]:
        raise UserError(f"{cfg.dataset_name} has no {cfg.val_dataset} split: set --val_holdout_ids N to hold out "
                        f"N training identities for validation (or --val_dataset test, not recommended)")

    model = build_model(cfg, dataset.num_classes).to(device)
    if cfg.grad_checkpointing:
        model.backbone.set_grad_checkpointing(True)
    if cfg.torch_compile:
        compile_blocks(model.backbone)
    if world_size > 1 and cfg.gather_features:
        dist_utils.use_global_batch(model, world_size)
    if rank == 0:
        check_output_dir(run_dir, checkpoint_bytes(model))
        logger.info("model: %.2f M parameters (%s, php_modules %s, losses %s)",
                    sum(p.numel() for p in model.parameters()) / 1e6, cfg.pretrain_choice, cfg.php_modules,
                    cfg.loss_names)

    train_loader = build_train_loader(cfg, dataset, rank, world_size)
    evaluator = Evaluator(*build_eval_loaders(cfg, split), precision=cfg.precision)
    trainer = Trainer(cfg, model, train_loader, evaluator, run_dir, device, rank, world_size)
    if resume_path and not trainer.resume(resume_path):
        logger.info("%s already finished all %d epochs; nothing to do", run_dir, cfg.num_epoch)
        return 0
    result = trainer.fit()
    if rank == 0:
        logger.info("finished: best val R1 %.2f at epoch %d; checkpoints in %s", result["best_r1"],
                    result["best_epoch"], run_dir)
        write_curves(run_dir, logger)
    return 0


if __name__ == "__main__":
    run_main(main)
