"""Per-epoch learning-rate schedules with warm-up, stepped as the reference codebases step them.

The trainer calls `scheduler.step()` once at the END of every epoch, so epoch e (1-based) trains with the lr
at step count t = e - 1 (`scheduler.last_epoch`). For a parameter group with base lr b (its lr when the
scheduler was built), with W = `warmup_epochs`, N = `num_epoch`, f = `warmup_factor`:

Warm-up, t < W, with a = t / W (`warmup_method`):
    constant   lr = b * f
    linear     lr = b * (f * (1 - a) + a)
    exp        lr = b * f ** (1 - a)

After warm-up, t >= W, with r = (t - W) / (N - W), held at 1 beyond the last epoch (`lrscheduler`):
    step        lr = b * gamma ** (number of milestones <= t)
    cosine      lr = target_lr + (b - target_lr) * 0.5 * (1 + cos(pi * r))
    linear      lr = target_lr + (b - target_lr) * (1 - r)
    poly        lr = target_lr + (b - target_lr) * power ** (1 - r)
    exp         lr = b * power ** r
    polynomial  lr = target_lr + (b - target_lr) * (1 - r) ** power
    exp_gamma   lr = b * gamma ** r

poly and exp are the reference codebases' formulas, so that their configs train as they did there, oddities
included: with power < 1, poly does not decay but rises from target_lr + power * (b - target_lr) right after
warm-up to b at the end. polynomial and exp_gamma are the textbook decays.

Example (the PHP paper: lr 3e-6, 60 epochs, 5 linear warm-up epochs from 0.1, cosine): epoch 1 trains at 3e-7,
epoch 2 at 3e-6 * 0.28, epoch 6 at 3e-6, epoch 60 at 3e-6 * 0.5 * (1 + cos(pi * 54 / 55)) ~ 2.4e-9.

Per iteration (`lr_step: iteration`, TBPS-CLIP's schedule), with n iterations an epoch, the scheduler steps after
every iteration and iteration k (0-based) trains with: during warm-up, k < W n, a = k / (W n - 1) in the formulas
above (the warm-up ends exactly at b, as numpy's linspace); after it, r = (k - W n) / (N n - W n), and the step
schedule's milestones count epochs of k / n.

`lr_at_epoch` is the pure formula; `LRSchedulerWithWarmup` applies it to every group of an optimizer.
"""
from __future__ import annotations

import math
from bisect import bisect_right
from typing import Any, Dict, List, Mapping, Union

import torch
from torch.optim.lr_scheduler import LRScheduler

from utils.config import Config, check_options
from utils.errors import UserError

# The config keys a schedule depends on; kept as plain values so a scheduler state stays weights_only-loadable.
SCHEDULE_KEYS = ("num_epoch", "lrscheduler", "milestones", "gamma", "warmup_factor", "warmup_epochs",
                 "warmup_method", "target_lr", "power", "lr_step")

ScheduleConfig = Union[Config, Mapping[str, Any]]


def schedule_options(cfg: ScheduleConfig) -> Dict[str, Any]:
    """The schedule options of `cfg` (a Config or a mapping) as a plain dict, checked; UserError names the key."""
    get = cfg.get if isinstance(cfg, Mapping) else (lambda key: getattr(cfg, key))
    opts = {key: get(key) for key in SCHEDULE_KEYS}
    opts["lr_step"] = opts["lr_step"] or "epoch"  # (a schedule written before the option existed)
    opts["milestones"] = [int(m) for m in opts["milestones"]]
    check_options(opts)
    return opts


def _warmup_lr(opts: Mapping[str, Any], base_lr: float, a: float) -> float:
    factor = opts["warmup_factor"]
    if opts["warmup_method"] == "constant":
        return base_lr * factor
    if opts["warmup_method"] == "linear":
        return base_lr * (factor * (1 - a) + a)
    return base_lr * factor ** (1 - a)


def _decay_lr(opts: Mapping[str, Any], base_lr: float, epochs: float, r: float) -> float:
    """The lr after warm-up at `epochs` done (for the step schedule) and share `r` of the decay."""
    mode = opts["lrscheduler"]
    if mode == "step":
        return base_lr * opts["gamma"] ** bisect_right(opts["milestones"], epochs)
    # past the last epoch the schedule holds its end value (polynomial would otherwise take a root of a negative)
    r = min(1.0, r)
    target = opts["target_lr"]
    if mode == "cosine":
        return target + (base_lr - target) * 0.5 * (1 + math.cos(math.pi * r))
    if mode == "linear":
        return target + (base_lr - target) * (1 - r)
    if mode == "poly":
        return target + (base_lr - target) * opts["power"] ** (1 - r)
    if mode == "exp":
        return base_lr * opts["power"] ** r
    if mode == "polynomial":
        return target + (base_lr - target) * (1 - r) ** opts["power"]
    return base_lr * opts["gamma"] ** r


def _lr_at_step(opts: Mapping[str, Any], base_lr: float, t: int) -> float:
    warmup = opts["warmup_epochs"]
    if t < warmup:
        return _warmup_lr(opts, base_lr, t / warmup)
    return _decay_lr(opts, base_lr, t, (t - warmup) / (opts["num_epoch"] - warmup))


def lr_at_iteration(cfg: ScheduleConfig, base_lr: float, k: int, iters_per_epoch: int) -> float:
    """The lr of 0-based training iteration `k` with `lr_step: iteration` (the module docstring)."""
    opts = schedule_options(cfg)
    warmup, total = opts["warmup_epochs"] * iters_per_epoch, opts["num_epoch"] * iters_per_epoch
    if k < warmup:
        return _warmup_lr(opts, base_lr, k / (warmup - 1) if warmup > 1 else 1.0)
    return _decay_lr(opts, base_lr, k / iters_per_epoch, (k - warmup) / max(total - warmup, 1))


def lr_at_epoch(cfg: ScheduleConfig, base_lr: float, epoch: int) -> float:
    """The lr that 1-based training epoch `epoch` uses for a group whose base lr is `base_lr`.

    `cfg` is a Config or a mapping holding the keys in SCHEDULE_KEYS; the formulas are in the module docstring.
    """
    if epoch < 1:
        raise ValueError(f"epochs are counted from 1; got {epoch}")
    return _lr_at_step(schedule_options(cfg), base_lr, epoch - 1)


class LRSchedulerWithWarmup(LRScheduler):
    """Warm-up followed by one of the decays of the option `lrscheduler`, one `step()` per epoch, or per iteration
    when `per_iteration` (`lr_step: iteration`; `last_epoch` then counts iterations).

    The schedule's options come from the config the scheduler is built with; `state_dict()` holds only the
    progress (`last_epoch`, base lrs), so a resumed run follows its current config, and `load_state_dict()`
    puts the lrs of the restored epoch back into the optimizer whatever the loading order.
    """

    def __init__(self, optimizer: torch.optim.Optimizer, cfg: ScheduleConfig, last_epoch: int = -1,
                 iters_per_epoch: int = 1):
        self.options = schedule_options(cfg)
        self.per_iteration = self.options["lr_step"] == "iteration"
        self.iters_per_epoch = max(int(iters_per_epoch), 1)
        super().__init__(optimizer, last_epoch)

    def get_lr(self) -> List[float]:
        """The lrs of every group at `last_epoch` (the closed form; nothing depends on the previous lrs)."""
        if self.per_iteration:
            return [lr_at_iteration(self.options, float(base), self.last_epoch, self.iters_per_epoch)
                    for base in self.base_lrs]
        return [lr_at_epoch(self.options, float(base), self.last_epoch + 1) for base in self.base_lrs]

    def _get_closed_form_lr(self) -> List[float]:
        return self.get_lr()

    def state_dict(self) -> Dict[str, Any]:
        """The scheduler's progress, plain Python values only (loads with `torch.load(weights_only=True)`)."""
        return {key: value for key, value in super().state_dict().items() if key != "options"}

    def load_state_dict(self, state_dict: Dict[str, Any]) -> None:
        """Restore the progress and set the optimizer's lrs for the restored epoch."""
        super().load_state_dict({k: v for k, v in state_dict.items() if k != "options"})
        if len(self.base_lrs) != len(self.optimizer.param_groups):
            raise UserError(f"resume: the saved scheduler has {len(self.base_lrs)} parameter groups, the "
                            f"optimizer {len(self.optimizer.param_groups)}; the model or the lr options (lr, "
                            f"bias_lr_factor, lr_factor, php_lr_factor, weight_decay*) changed since it was saved")
        for group, lr in zip(self.optimizer.param_groups, self.get_lr()):
            group["lr"] = lr
        self._last_lr = [group["lr"] for group in self.optimizer.param_groups]


def build_lr_scheduler(cfg: Config, optimizer: torch.optim.Optimizer,
                       iters_per_epoch: int = 1) -> LRSchedulerWithWarmup:
    """The scheduler of `cfg` over `optimizer` (per epoch, or per iteration of `iters_per_epoch` an epoch); sets
    every group's lr to that of the first epoch or iteration."""
    return LRSchedulerWithWarmup(optimizer, cfg, iters_per_epoch=iters_per_epoch)
