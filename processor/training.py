"""`train(cfg)`: the training job, what `python train.py` and `sh run.sh <preset>` run.

Every check runs first (options, data, model, the checkpoint to resume); the run folder is written only after all
have passed, under its lock, so a command that fails leaves an existing run as it was. Under torchrun every process
calls it; rank 0 alone writes.
"""
from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from typing import Optional, Tuple

import numpy as np
import torch

from datasets import dataset_from_config
from datasets.loaders import build_eval_loaders, build_train_loader, per_process_batch_size
from datasets.base import PedesDataset
from datasets.noise import NoisyPairs, apply_noise
from evaluation.curves import plot_curves
from evaluation.evaluator import Evaluator
from model import build_model
from model.registry import loss_views
from processor.callbacks import check_training_data
from processor.components import check_unused_options
from processor.precision import Choice, recorded_choice, resolve_precision
from processor.trainer import Trainer
from utils import distributed as dist_utils
from utils.checkpoint import read_checkpoint, remove_partial_checkpoints
from utils.config import Config, build_config, config_from_values, save_config
from utils.env import resolve_device, seed_everything
from utils.errors import UserError
from utils.files import check_output_dir, write_atomic
from utils.logger import attach_log_file, setup_logger
from utils.plugins import changed_plugins
from utils.provenance import code_and_data
from utils.runlock import RunLock
from utils.schema import resume_differences

logger = logging.getLogger("php")
# The permutation a noisy run applied to its training pairs' captions (datasets/noise.py; RDE's .npy format).
NOISY_PAIRS = "noisy_pairs.npy"


@dataclass(frozen=True)
class Trained:
    """What a finished training process holds, for testing it without building it again: the resolved config, the
    model (its last epoch's weights) and the data set it was built on."""

    cfg: Config
    model: torch.nn.Module
    dataset: PedesDataset


@dataclass(frozen=True)
class TrainResult:
    """What a training job did: the run folder, its best val R1 and epoch (-1 and 0 when it trained nothing
    new because the run had already finished), and on the only process of a run, what it trained (`trained`)."""

    run_dir: str
    best_r1: float
    best_epoch: int
    finished_before: bool = False
    trained: Optional[Trained] = None


def train(cfg: Config, config_file: str = "", dataset: Optional[PedesDataset] = None) -> TrainResult:
    """Train (or, with cfg.resume, continue) the run of `cfg`; `config_file` names where the options came from,
    for messages; `dataset`, when given, is the run's data set already built (and checked). Joins the torchrun
    process group when there is one and leaves it afterwards."""
    rank, world_size, local_rank = dist_utils.init_distributed(cfg.device)
    try:
        return run_training(cfg, rank, world_size, local_rank, config_file, dataset)
    finally:
        # Also after an error: every rank raises the same UserError (the checks are deterministic) and leaves;
        # if only one rank fails, torchrun stops the others.
        dist_utils.cleanup()


def checkpoint_bytes(model: torch.nn.Module, run_dir: str) -> int:
    """Free space the checkpoints may still need: at most three copies exist at once (best.pth, last.pth and the
    temporary file of the next save), each the weights and two Adam moments in fp32, less what the folder's
    checkpoints already occupy (best.pth and last.pth are often one file, hard-linked)."""
    one = 3 * 4 * sum(p.numel() for p in model.parameters())
    present = {}
    for name in ("best.pth", "last.pth"):
        try:
            st = os.stat(os.path.join(run_dir, name))
            present[(st.st_dev, st.st_ino)] = st.st_size
        except OSError:
            pass
    return max(0, 3 * one - sum(present.values()))


def checkpoint_to_resume(cfg: Config, config_file: str = "") -> Tuple[Optional[str], Optional[dict]]:
    """(path, checkpoint) to resume from, or (None, None) for a fresh start; refuses what would corrupt a run.

    A fresh start in a folder holding checkpoints needs --overwrite. A resume needs the options to equal those
    the run was trained with (its configs.yaml and the checkpoint's own record), except RESUME_MUTABLE.
    """
    run_dir = cfg.run_dir
    existing = [n for n in ("best.pth", "last.pth") if os.path.isfile(os.path.join(run_dir, n))]
    if not cfg.resume:
        if existing and not cfg.overwrite:
            raise UserError(f"run folder {run_dir} already holds {' and '.join(existing)} of an earlier run; continue "
                            f"it with --resume, replace it with --overwrite, or choose another --name")
        return None, None
    if config_file and os.path.basename(config_file) == "configs.yaml" and \
            os.path.realpath(os.path.dirname(config_file)) != os.path.realpath(run_dir):
        logger.warning("%s lies outside the run folder its options name; resuming %s", config_file, run_dir)
    path = cfg.resume_ckpt_file or os.path.join(run_dir, "last.pth")
    if not os.path.isfile(path):
        raise UserError(f"--resume: {path} does not exist (nothing to resume in {run_dir})")
    ckpt = read_checkpoint(path)
    check_plugins(cfg, ckpt, path)
    records = []
    folder_config = os.path.join(run_dir, "configs.yaml")
    if os.path.isfile(folder_config):
        records.append((folder_config, build_config(folder_config, check=False)))
    if isinstance(ckpt, dict) and isinstance(ckpt.get("config"), dict):
        records.append((path, config_from_values(ckpt["config"], path, check=False)))
    for source, saved in records:
        differences = resume_differences(cfg, saved)
        if differences:
            more = f" and {len(differences) - 6} more" if len(differences) > 6 else ""
            raise UserError(f"--resume: the options differ from {source}, which trained this run, in "
                            f"{', '.join(differences[:6])}{more}; resume with the run's own options (only those "
                            f"listed under 'Resuming' in docs/reliability.md may change), or start a new run with another "
                            f"--name")
    return path, ckpt


def check_plugins(cfg: Config, ckpt: dict, path: str) -> None:
    """A resume with a plug-in file that changed since the checkpoint was written is refused (its code would train
    on silently), unless allow_changed_plugins; then it is a warning."""
    recorded = ckpt.get("provenance", {}).get("plugins_sha256") if isinstance(ckpt, dict) else None
    if recorded is None:
        return
    changes = changed_plugins(recorded, cfg.custom_imports)
    if not changes:
        return
    if not cfg.allow_changed_plugins:
        raise UserError(f"--resume: {path} was trained with other plug-in code: {'; '.join(changes)}; restore the "
                        f"file, or resume with --allow_changed_plugins to train on with the new code")
    logger.warning("resuming with changed plug-ins (allow_changed_plugins): %s", "; ".join(changes))


def check_noise(cfg: Config, ckpt: dict, path: str, noisy: Optional[NoisyPairs]) -> None:
    """A resume must apply the noise its run trained with: a noisy_file replaced since (its recorded sha256), or
    a permutation other than the run's noisy_pairs.npy (runs that predate the record), would train on other pairs
    and overwrite the record of the epochs done."""
    recorded = (ckpt.get("provenance") or {}).get("noisy_file_sha256") if isinstance(ckpt, dict) else None
    if noisy is not None and noisy.sha256 and recorded and recorded != noisy.sha256:
        raise UserError(f"--resume: {path} was trained with noisy_file {cfg.noisy_file} of sha256 {recorded[:12]}, "
                        f"which has changed since (now {noisy.sha256[:12]}); restore the file, or start a new run "
                        f"with another --name")
    saved = os.path.join(cfg.run_dir, NOISY_PAIRS)
    if noisy is None or not os.path.isfile(saved):
        return
    try:
        before = np.load(saved, allow_pickle=False)
    except (OSError, ValueError, EOFError):
        return  # unreadable: nothing to compare with, and rewriting it loses nothing
    if not np.array_equal(before, noisy.permutation):
        differ = int((before != noisy.permutation).sum()) if before.shape == noisy.permutation.shape else "all"
        raise UserError(f"--resume: the noisy pairs applied now ({noisy.source}) differ from those the run trained "
                        f"with, {saved} ({differ} of {len(noisy.permutation)} pairs differ); restore the "
                        f"noisy_file, or start a new run with another --name")


def _build(cfg: Config, rank: int, world_size: int, device: torch.device, run_dir: str,
           recorded: Optional[Choice] = None, dataset: Optional[PedesDataset] = None):
    """(the Trainer of the run, the noisy pairs it made or None, the data set): data set (`dataset` when given),
    noise, model, precision ('auto' resolved: `recorded`, a resumed run's own choice, or timed); nothing is written
    but the precision cache. The Trainer's cfg is the resolved one."""
    if cfg.val_dataset == "test" and rank == 0:
        logger.warning("model selection uses the TEST split (val_dataset: test); reported test numbers are then "
                       "optimistic")
    seed_everything(cfg.seed)
    if dataset is None:
        with dist_utils.main_process_first():  # a Demo-PEDES set is generated once, not by every process at once
            dataset = dataset_from_config(cfg, generate=True)
    if rank == 0:
        logger.info("%s:\n%s", cfg.dataset_name, dataset.summary())
    split = dataset.split(cfg.val_dataset, hint="set --val_holdout_ids N to hold out N training identities for "
                                                "validation (or --val_dataset test, not recommended)")
    check_training_data(cfg, dataset)
    noisy = apply_noise(dataset, cfg.noisy_rate, cfg.seed, cfg.noisy_file)
    if noisy is not None and rank == 0:
        logger.info("noisy correspondence (%s): %d of %d training pairs carry another pair's caption", noisy.source,
                    int((~noisy.clean).sum()), len(noisy.clean))
    model = build_model(cfg, dataset.num_classes).to(device)
    if cfg.grad_checkpointing:
        model.backbone.set_grad_checkpointing(True)
    # Before use_global_batch: timing steps of a copy that gathered features would wait for the other processes.
    cfg, choice = resolve_precision(cfg, model, device, per_process_batch_size(cfg, world_size), rank, world_size,
                                    recorded)
    if world_size > 1 and cfg.gather_features:
        dist_utils.use_global_batch(model, world_size)
    if rank == 0:
        check_output_dir(run_dir, checkpoint_bytes(model, run_dir))
        logger.info("model: %.2f M parameters (%s, heads %s, losses %s)",
                    sum(p.numel() for p in model.parameters()) / 1e6, cfg.pretrain_choice,
                    "+".join(model.head_names) or "none", cfg.loss_names)
    train_loader = build_train_loader(cfg, dataset, rank, world_size, views=loss_views(cfg))
    evaluator = Evaluator(*build_eval_loaders(cfg, split), precision=cfg.precision)
    # Once per process: the code and data this process trains with (history.json records them per epoch).
    provenance = code_and_data(dataset.annotation_file, cfg.custom_imports) if rank == 0 else None
    if provenance is not None and choice is not None:
        provenance["precision_choice"] = choice.record()
    if provenance is not None and noisy is not None:
        # The rate a noisy_file gave is in no option (noisy_rate may say 0): the summary's noise column reads it here.
        provenance.update(noisy_rate=noisy.rate, **({"noisy_file_sha256": noisy.sha256} if noisy.sha256 else {}))
    trainer = Trainer(cfg, model, train_loader, evaluator, run_dir, device, rank, world_size, provenance,
                      clean=None if noisy is None else noisy.clean)
    return trainer, noisy, dataset


def run_training(cfg: Config, rank: int, world_size: int, local_rank: int, config_file: str = "",
                 dataset: Optional[PedesDataset] = None) -> TrainResult:
    """Train the run of `cfg` as process `rank` of `world_size` (1 without torchrun)."""
    device = resolve_device(cfg.device, local_rank)
    run_dir = cfg.run_dir
    setup_logger(rank=rank, hold=True)
    resume_path, ckpt = checkpoint_to_resume(cfg, config_file)
    if rank == 0:
        check_output_dir(run_dir)
        logger.info("run folder %s; device %s; precision %s; %d process(es)", run_dir, device, cfg.precision,
                    world_size)
    unused = check_unused_options(cfg)
    trainer, noisy, dataset = _build(cfg, rank, world_size, device, run_dir, recorded_choice(ckpt), dataset)
    cfg = trainer.cfg  # 'auto' resolved: configs.yaml records the precision the run trains in
    trained = Trained(cfg, trainer.module, dataset) if world_size == 1 else None
    if ckpt is not None:
        check_noise(cfg, ckpt, resume_path, noisy)
    if ckpt is not None and not trainer.restore(ckpt, resume_path):
        logger.info("%s already finished all %d epochs; nothing to do", run_dir, cfg.num_epoch)
        return TrainResult(run_dir, trainer.best_r1, trainer.best_epoch, finished_before=True, trained=trained)
    del ckpt

    # Every check has passed: from here on the run folder is written, by this process alone.
    with dist_utils.on_main_process(lambda: RunLock(run_dir, "train.py")):
        if rank == 0:
            # Temporary files of checkpoint writes that a kill interrupted: never loaded, as large as a checkpoint.
            partial = remove_partial_checkpoints(run_dir)
            if partial:
                logger.warning("removed %d partial checkpoint file(s) left by an interrupted run: %s", len(partial),
                               ", ".join(partial))
            # The saved config starts a run, so it does not carry this invocation's resume request.
            save_config(cfg.copy(resume=False, resume_ckpt_file="", overwrite=False, allow_changed_plugins=False),
                        os.path.join(run_dir, "configs.yaml"), leave_out=unused)
            if noisy is not None:
                write_atomic(os.path.join(run_dir, NOISY_PAIRS), noisy.to_bytes(), what="the noisy pairs")
            attach_log_file(logger, os.path.join(run_dir, "train_log.txt"))
        result = trainer.fit()
    if rank == 0:
        logger.info("finished: best val R1 %.2f at epoch %d; checkpoints in %s", result["best_r1"],
                    result["best_epoch"], run_dir)
        write_curves(run_dir)
    return TrainResult(run_dir, result["best_r1"], result["best_epoch"], trained=trained)


def write_curves(run_dir: str) -> None:
    """curves.png of the finished run; a plotting failure is a warning, never a failed run."""
    try:
        logger.info("training curves: %s", plot_curves(run_dir))
    except Exception as e:  # noqa: BLE001 - the checkpoints are what counts
        logger.warning("could not draw the training curves (%s: %s)", type(e).__name__, e)
