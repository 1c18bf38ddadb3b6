"""The training loop: autocast with fp32 master weights, per-epoch evaluation, crash-safe checkpoints, resume.

Reproducibility: the sampler order and every augmentation / masking draw are functions of (seed, epoch, index)
(see datasets/), and the global RNG (dropout) is re-seeded from (seed, epoch, rank) at the start of each epoch.
A run resumed from `last.pth` therefore continues bit for bit as if it had never stopped (on the same device
and number of processes).

Host synchronisation: a training step (`Trainer.train_step`) never waits for the device. It leaves its logged values
(every output of the model) on the device; those of all steps since the last log point are read back together
every `log_period` steps and at the end of an epoch, where their total `loss` and the epoch's means are added up,
they are logged, shown and written to TensorBoard (one point per step), and the rule on non-finite losses is
applied. A step whose loss is not finite must therefore be skipped without the host knowing: fused optimizers
(`_step_supports_amp_scaling`: fused Adam/AdamW, fused SGD) take a `found_inf` tensor and then leave weights,
moments and step count untouched; with other optimizers the host still checks the loss every step.

Checkpoints keep the reference layout (`ckpt["model"]` is the state dict) plus what resuming needs.
"""
from __future__ import annotations

import json
import logging
import math
import os
import time
from collections import defaultdict
from typing import Dict, List, Optional, Tuple

import numpy as np
import torch
from tqdm import tqdm

from datasets.loaders import per_process_batch_size, set_loader_epoch
from evaluation.metrics import METRIC_KEYS
from model.backbone import compile_blocks
from processor.callbacks import CallbackRunner
from solver import build_lr_scheduler, build_optimizer, describe_param_groups
from utils import distributed as dist_utils
from utils.checkpoint import CHECKSUMS, save_checkpoint, weight_checksums
from utils.config import Config
from utils.env import autocast, epoch_seed
from utils.errors import UserError
from utils.event_log import EventLog
from utils.files import write_atomic

logger = logging.getLogger("php")
FORMAT_VERSION = 1


class NonFiniteLossError(UserError):
    exit_code = 4


class Trainer:
    """Trains `model` as `cfg` says. `fit` needs the training loader, the evaluator and the run folder; `train_step`
    alone (the benchmarks) needs none of them. `provenance` (`commit`, `dirty`, `annotations_sha256`: see
    utils.provenance.code_and_data) goes into every epoch record of history.json."""

    def __init__(self, cfg: Config, model: torch.nn.Module, train_loader=None, evaluator=None,
                 run_dir: Optional[str] = None, device: Optional[torch.device] = None, rank: int = 0,
                 world_size: int = 1, provenance: Optional[dict] = None, clean: Optional[np.ndarray] = None,
                 describe: bool = True):
        device = device if device is not None else next(model.parameters()).device
        self.cfg, self.train_loader, self.evaluator = cfg, train_loader, evaluator
        self.run_dir, self.device, self.rank, self.world_size = run_dir, device, rank, world_size
        # Per epoch, not per run: a run resumed on other code or data shows from which epoch on.
        self.provenance = dict(provenance or {})
        self.module = model
        # What runs the training forward: the module itself, its DDP wrapper, compiled as torch_compile says.
        self.model = compile_for_training(dist_utils.wrap_model(model, device) if world_size > 1 else model,
                                          model, cfg.torch_compile, device)
        self.optimizer = build_optimizer(cfg, model)
        self.skips_on_device = getattr(self.optimizer, "_step_supports_amp_scaling", False)
        self.scheduler = build_lr_scheduler(cfg, self.optimizer, len(train_loader) if train_loader is not None else 1)
        self.scaler = torch.amp.GradScaler(device.type, enabled=cfg.precision == "fp16")
        self.log_names: Tuple[str, ...] = ()
        self.start_epoch = 1
        self.best_r1, self.best_epoch = -1.0, 0
        self.nonfinite_steps = 0
        self.history: List[dict] = []
        self.writer = None
        # Per-epoch callbacks (RDE's sample selection, plug-ins') and the sample weights they set.
        self.callbacks = CallbackRunner(cfg, model, device, getattr(train_loader, "dataset", None), rank, world_size,
                                        clean)
        if rank == 0 and describe:
            logger.info("parameter groups:\n%s", describe_param_groups(self.optimizer))

    # ------------------------------------------------------------------------------------------ state
    def state(self, epoch: int) -> dict:
        model = self.module.state_dict()
        return {"model": model, CHECKSUMS: weight_checksums(model), "optimizer": self.optimizer.state_dict(),
                "scheduler": self.scheduler.state_dict(), "scaler": self.scaler.state_dict(), "epoch": epoch,
                "best_r1": self.best_r1, "best_epoch": self.best_epoch, "nonfinite_steps": self.nonfinite_steps,
                "history": self.history, "config": self.cfg.to_dict(), "format_version": FORMAT_VERSION,
                "world_size": self.world_size, "rng": {"torch": torch.get_rng_state()},
                "provenance": self.provenance, "callbacks": self.callbacks.state_dict()}

    def restore(self, ckpt: dict, path: str) -> bool:
        """Restore everything from checkpoint `ckpt` (read from `path`), in memory only; returns False when that run
        already finished all its epochs. A checkpoint that does not fit this model or optimizer is a UserError."""
        if not isinstance(ckpt, dict) or ckpt.get("format_version") != FORMAT_VERSION or "optimizer" not in ckpt:
            raise UserError(f"{path}: not a resumable checkpoint of this project (use a last.pth it wrote)")
        check_state_fits(self.module, ckpt["model"], path)
        self.module.load_state_dict(ckpt["model"])
        try:
            self.optimizer.load_state_dict(ckpt["optimizer"])
        except (ValueError, KeyError) as e:
            raise UserError(f"{path}: its optimizer state does not fit this model's parameter groups ({e})") from None
        self.scheduler.load_state_dict(ckpt["scheduler"])
        self.scaler.load_state_dict(ckpt["scaler"])
        torch.set_rng_state(ckpt["rng"]["torch"])
        self.best_r1, self.best_epoch = ckpt["best_r1"], ckpt["best_epoch"]
        self.nonfinite_steps, self.history = ckpt["nonfinite_steps"], list(ckpt["history"])
        self.callbacks.load_state_dict(ckpt.get("callbacks"))
        self.start_epoch = int(ckpt["epoch"]) + 1
        saved_world = ckpt.get("world_size", self.world_size)
        if saved_world != self.world_size and self.rank == 0:
            logger.warning("resuming with %d process(es) a run trained with %d: training goes on, but no longer "
                           "exactly as an uninterrupted run would", self.world_size, saved_world)
        if self.rank == 0:
            logger.info("resumed from %s after epoch %d (best R1 %.2f at epoch %d)", path, ckpt["epoch"],
                        self.best_r1, self.best_epoch)
        return self.start_epoch <= self.cfg.num_epoch

    def _save(self, epoch: int, improved: bool) -> None:
        if self.rank != 0:
            return
        # One write: best.pth (when improved) is the same data as last.pth, and either both change or neither does.
        also = [os.path.join(self.run_dir, "best.pth")] if improved else []
        save_checkpoint(self.state(epoch), os.path.join(self.run_dir, "last.pth"), also=also)
        write_atomic(os.path.join(self.run_dir, "history.json"), json.dumps(self.history, indent=1),
                     what="training history")

    # ------------------------------------------------------------------------------------------ loop
    def fit(self) -> Dict[str, float]:
        cfg = self.cfg
        if self.rank == 0 and cfg.tensorboard:
            # On resume, hide the steps that the interrupted run logged after its last checkpoint (they are redone).
            purge = (self.start_epoch - 1) * len(self.train_loader) + 1 if self.start_epoch > 1 else None
            self.writer = EventLog(os.path.join(self.run_dir, "tensorboard"), purge_step=purge)
        try:
            for epoch in range(self.start_epoch, cfg.num_epoch + 1):
                start = time.time()
                reports = self.callbacks.before_epoch(epoch)
                callback_seconds = time.time() - start
                means = self.train_epoch(epoch)
                lr = self.optimizer.param_groups[0]["lr"]
                if not self.scheduler.per_iteration:
                    self.scheduler.step()
                seconds = time.time() - start
                global_batch = per_process_batch_size(cfg, self.world_size) * self.world_size
                record = {"epoch": epoch, "lr": lr, "seconds": round(seconds, 2),
                          "samples_per_s": round(len(self.train_loader) * global_batch / max(seconds, 1e-9), 2),
                          "losses": means, **self.provenance}
                if self.callbacks:
                    record.update(callbacks=reports, callback_seconds=round(callback_seconds, 2))
                improved = False
                if epoch % cfg.eval_period == 0 or epoch == cfg.num_epoch:
                    results = self.evaluate(epoch)
                    if results is not None:
                        record["val"] = results["t2i"]
                        improved = results["t2i"]["R1"] > self.best_r1
                        if improved:
                            self.best_r1, self.best_epoch = results["t2i"]["R1"], epoch
                self.history.append(record)
                self._save(epoch, improved)
                if self.rank == 0:
                    logger.info("epoch %d done in %.1f s; best R1 %.2f at epoch %d", epoch, record["seconds"],
                                self.best_r1, self.best_epoch)
                dist_utils.barrier()
        finally:
            if self.writer is not None:
                self.writer.close()
        return {"best_r1": self.best_r1, "best_epoch": self.best_epoch}

    def train_epoch(self, epoch: int) -> Dict[str, float]:
        cfg = self.cfg
        self.model.train()
        # Offset by rank so that processes draw different dropout masks (rank 0 matches a single-process run).
        torch.manual_seed(epoch_seed(cfg.seed, epoch) + self.rank)
        set_loader_epoch(self.train_loader, epoch)
        means = RunningMeans()
        num_iters = len(self.train_loader)
        bar = tqdm(self.train_loader, desc=f"epoch {epoch}/{cfg.num_epoch}", disable=self.rank != 0 or None,
                   dynamic_ncols=True, mininterval=1.0, leave=False)
        rows: List[torch.Tensor] = []
        for it, batch in enumerate(bar, start=1):
            rows.append(self.train_step(batch, progress=epoch - 1 + (it - 1) / num_iters))
            if self.scheduler.per_iteration:
                self.scheduler.step()
            if it % cfg.log_period == 0:
                self._read_back(rows, epoch, it, num_iters, means, bar)
                rows = []
        if rows:
            self._read_back(rows, epoch, it, num_iters, means, bar)
        bar.close()
        return means.means()

    def train_step(self, batch: Dict[str, torch.Tensor], progress: Optional[float] = None) -> torch.Tensor:
        """One optimisation step on `batch` that does not wait for the device (see the module docstring).
        `progress`, the epochs done before this step (fractional, from 0), reaches the model as batch["progress"]
        (TBPS-CLIP's soft-label ramp reads it).

        Returns the step's logged values on the device: the model's outputs named by `self.log_names` (its `*_loss`
        terms first), float32, averaged over processes. When the sum of the terms is not finite, no weight and no
        optimizer state changes."""
        cfg = self.cfg
        if cfg.torch_compile == "full" and self.device.type == "cuda":
            # The captured graph's outputs of the previous step may be overwritten from here on (this step only
            # keeps its own values, copied out by torch.stack below).
            torch.compiler.cudagraph_mark_step_begin()
        batch = {k: v.to(self.device, non_blocking=True) if torch.is_tensor(v) else v for k, v in batch.items()}
        batch = self.callbacks.annotate(batch)
        if progress is not None:
            batch["progress"] = float(progress)
        with autocast(self.device, cfg.precision):
            out = self.model(batch)
        terms = [k for k in out if k.endswith("_loss")]
        self.log_names = (*terms, *(k for k in out if k not in terms))
        values = torch.stack([out[k].detach().float() for k in self.log_names])
        if self.world_size > 1:
            # Logged values are global-batch values: the gathered losses are so already, per-sample ones
            # (id, accuracies) become so by averaging over processes (equal shares). A loss that is not finite on
            # one process makes the mean non-finite on all of them, so they skip the step together.
            values = dist_utils.mean_over_processes(values)
        total = values[:len(terms)].sum(dtype=torch.float64)
        self.optimizer.zero_grad(set_to_none=True)
        found_inf = None
        if self.skips_on_device and not self.scaler.is_enabled():
            # What GradScaler hands a fused optimizer: 1 skips the step. x - x is NaN exactly when x is not finite:
            # 3 operations where isfinite and where take 7, and on a GPU the step is bound by launching them. With
            # fp16 the scaler hands its own, from the gradients, which a non-finite loss makes non-finite.
            found_inf = (total - total).isnan().float()
        elif not self.skips_on_device and not torch.isfinite(total):
            return values
        self.scaler.scale(sum(out[k] for k in terms)).backward()
        if cfg.max_grad_norm > 0:
            self.scaler.unscale_(self.optimizer)
            torch.nn.utils.clip_grad_norm_(self.module.parameters(), cfg.max_grad_norm)
        if found_inf is None:
            self.scaler.step(self.optimizer)
        else:
            self.optimizer.found_inf = found_inf
            try:
                self.optimizer.step()
            finally:
                del self.optimizer.found_inf
        self.scaler.update()
        return values

    def _read_back(self, rows: List[torch.Tensor], epoch: int, last_it: int, num_iters: int,
                   means: RunningMeans, bar) -> None:
        """The log point after iteration `last_it`: the logged values of the steps since the previous one (`rows`)
        come back in one transfer; then the non-finite rule, the means, the log line, the postfix, TensorBoard."""
        lr = self.optimizer.param_groups[0]["lr"]
        shown = None
        for it, row in enumerate(torch.stack(rows).tolist(), start=last_it - len(rows) + 1):
            values = dict(zip(self.log_names, row))
            values["loss"] = sum(v for k, v in values.items() if k.endswith("_loss"))
            if not math.isfinite(values["loss"]):
                self._skipped(values, epoch, it)
                continue
            means.add(values)
            shown = values
            if self.writer is not None:
                step = (epoch - 1) * num_iters + it
                for k, v in values.items():
                    self.writer.scalar(f"train/{k}", v, step)
                self.writer.scalar("train/lr", lr, step)
        if self.rank != 0:
            return
        if shown is not None:
            bar.set_postfix({k.replace("_loss", ""): f"{v:.3f}" for k, v in shown.items() if k.endswith("loss")}
                            | {"lr": f"{lr:.2e}"}, refresh=False)
        logger.info("epoch %d iter %d/%d %s lr %.3e", epoch, last_it, num_iters, means.line(), lr)

    def _skipped(self, values: Dict[str, float], epoch: int, it: int) -> None:
        """Step `it` of `epoch` was skipped for its non-finite `values`: tolerated with a warning, or the end."""
        self.nonfinite_steps += 1
        terms = ", ".join(f"{k}={v}" for k, v in values.items() if k.endswith("_loss") and not math.isfinite(v))
        if self.nonfinite_steps > self.cfg.skip_nonfinite_steps:
            raise NonFiniteLossError(
                f"non-finite loss at epoch {epoch}, iteration {it}: {terms}; the last good checkpoints in "
                f"{self.run_dir} are kept (skip_nonfinite_steps lets a run tolerate a few such steps)")
        logger.warning("skipped step at epoch %d, iteration %d: non-finite %s (%d of %d tolerated)", epoch, it,
                       terms, self.nonfinite_steps, self.cfg.skip_nonfinite_steps)

    def evaluate(self, epoch: int) -> Optional[dict]:
        if self.rank != 0:
            return None
        results, table = self.evaluator.evaluate(self.module)
        logger.info("validation after epoch %d:\n%s", epoch, table)
        if self.writer is not None:
            for k in METRIC_KEYS:
                self.writer.scalar(f"val/{k}", results["t2i"][k], epoch)
        return results


def compile_for_training(forward: torch.nn.Module, model: torch.nn.Module, mode: str,
                         device: torch.device) -> torch.nn.Module:
    """What the training step calls, as `torch_compile` says: `forward` itself ('none'), with each backbone block of
    `model` compiled in place ('blocks'), or compiled whole ('full': on CUDA as CUDA graphs, so that the host
    launches the step's few thousand kernels as one replay instead of one by one). `model`'s parameters, and so
    checkpoints, keep their names; evaluation uses `model` uncompiled."""
    if mode == "blocks":
        compile_blocks(model.backbone)
    elif mode == "full":
        # dynamic=False: the training batch keeps its shape (drop_last, fixed text length), one graph serves.
        return torch.compile(forward, mode="reduce-overhead" if device.type == "cuda" else None, dynamic=False)
    return forward


class RunningMeans:
    """Means of the logged values over an epoch's completed steps. Added on the host, one step after the other, as
    Python floats: the means do not depend on how often the values are read back."""

    def __init__(self):
        self.sums: Dict[str, float] = defaultdict(float)
        self.steps = 0

    def add(self, values: Dict[str, float]) -> None:
        for k, v in values.items():
            self.sums[k] += v
        self.steps += 1

    def means(self) -> Dict[str, float]:
        return {k: v / max(self.steps, 1) for k, v in self.sums.items()}

    def line(self) -> str:
        return " ".join(f"{k} {v:.4f}" for k, v in sorted(self.means().items()))


def check_state_fits(module: torch.nn.Module, state: Dict[str, torch.Tensor], path: str) -> None:
    """`state` has exactly the weights, of the same shapes, that `module` has; else one line naming the first few."""
    own = module.state_dict()
    problems = [f"{k}: {tuple(state[k].shape)} in the checkpoint, {tuple(v.shape)} here"
                for k, v in own.items() if k in state and tuple(state[k].shape) != tuple(v.shape)]
    problems += [f"{k} missing from the checkpoint" for k in own if k not in state]
    problems += [f"{k} not in this model" for k in state if k not in own]
    if problems:
        more = f" (and {len(problems) - 3} more)" if len(problems) > 3 else ""
        raise UserError(f"{path} does not fit the model these options build: {'; '.join(problems[:3])}{more}")
