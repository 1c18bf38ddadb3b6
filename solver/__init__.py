"""Optimizer with per-name parameter groups and per-epoch learning-rate schedules with warm-up."""
from solver.lr_scheduler import LRSchedulerWithWarmup, build_lr_scheduler, lr_at_epoch, schedule_options
from solver.optimizer import build_optimizer, build_param_groups, describe_param_groups, param_lr_and_decay

__all__ = [
    "LRSchedulerWithWarmup",
    "build_lr_scheduler",
    "build_optimizer",
    "build_param_groups",
    "describe_param_groups",
    "lr_at_epoch",
    "param_lr_and_decay",
    "schedule_options",
]
