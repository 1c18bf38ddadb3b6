"""Per-epoch callbacks: code that runs before every training epoch (the first included) and may weight the samples.

A callback is registered by name, as heads and losses are, and built when its `enabled(cfg)` says so (a plug-in's
when `callbacks: [name]` lists it):

    @register_callback("my_weights", options=[Option(...)])
    class MyWeights(EpochCallback):
        def on_epoch_start(self, ctx):               # ctx: EpochContext
            losses = ...                             # e.g. per-sample losses over ctx.training_set()
            ctx.set_sample_weights("my_weights", w)  # float [N], by training-set index, kept on the device
            return {"kept": float(...)}              # into this epoch's record of history.json

Losses read the weights of their batch as `out["batch"]["sample_weights"][name]` ([B], on the device, indexed
by the batch's `indices` without a host sync). A callback's `state_dict()` and the weights are saved in every
checkpoint and restored on resume, so a resumed run continues exactly as an uninterrupted one. Under torchrun
every process runs the callback on its share of the training set (`ctx.training_set()` is sharded) and
`ctx.gather` makes every process see all of it, so that all take the same decision.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch
import torch.distributed as dist

from datasets.loaders import full_pass_loader
from utils.plugins import declare
from utils.schema import Option


class EpochCallback:
    """The base class of per-epoch callbacks; `cfg` is the run's config."""

    def __init__(self, cfg) -> None:
        self.cfg = cfg

    def on_epoch_start(self, ctx: "EpochContext") -> Optional[Dict[str, Any]]:
        """Run before epoch `ctx.epoch`; may set sample weights; returns what history.json records (or None)."""
        return None

    def state_dict(self) -> Dict[str, Any]:
        return {}

    def load_state_dict(self, state: Dict[str, Any]) -> None:
        pass


@dataclass(frozen=True)
class CallbackSpec:
    name: str
    build: Callable[[Any], EpochCallback]
    enabled: Callable[[Any], bool]
    owner: str
    # Refuses (a UserError) training data the callback cannot work with, before the run folder is written.
    check: Optional[Callable[[Any, Any], None]] = None


CALLBACKS: Dict[str, CallbackSpec] = {}


def register_callback(name: str, *, enabled: Optional[Callable[[Any], bool]] = None, options: Sequence[Option] = (),
                      check: Optional[Callable[[Any, Any], None]] = None):
    """Decorator for an EpochCallback class (or a function cfg -> EpochCallback). Without `enabled`, it is built
    when the run's `callbacks` option lists it. `check(cfg, dataset)` refuses data it cannot work with."""
    def decorator(build):
        owner = declare(CALLBACKS, "callback", name, build.__module__, options)
        CALLBACKS[name] = CallbackSpec(name, build, enabled or (lambda cfg: name in cfg.callbacks), owner, check)
        return build
    return decorator


def check_training_data(cfg, dataset) -> None:
    """Each enabled callback's check of the training data (CallbackSpec.check)."""
    for spec in CALLBACKS.values():
        if spec.check is not None and spec.enabled(cfg):
            spec.check(cfg, dataset)


class EpochContext:
    """What a callback gets before an epoch: the model, its device, the epoch, the training set, and the means to
    weight its samples and to share results between processes."""

    def __init__(self, runner: "CallbackRunner", epoch: int):
        self._runner = runner
        self.cfg, self.model, self.device = runner.cfg, runner.model, runner.device
        self.epoch, self.rank, self.world_size = epoch, runner.rank, runner.world_size
        self.num_samples = len(runner.train_set)
        # Which training pairs are clean, where the run made them noisy itself (noisy_rate): None when unknown.
        self.clean: Optional[np.ndarray] = runner.clean

    def training_set(self):
        """A loader over the whole training set, this process's share of it: the training items of this epoch
        (augmentation included) with their `indices`, in a seeded order of their own, no sample left out."""
        return full_pass_loader(self.cfg, self._runner.train_set, self.epoch, self.rank, self.world_size)

    def gather(self, indices: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
        """Values computed per sample on every process's share, as one CPU tensor [N, ...] by training-set index
        (a sample seen more than once keeps one of its values); every process gets the same."""
        indices, values = indices.detach().cpu().long(), values.detach().cpu()
        if dist.is_initialized() and self.world_size > 1:
            parts = [None] * self.world_size
            dist.all_gather_object(parts, (indices, values))
            indices = torch.cat([p[0] for p in parts])
            values = torch.cat([p[1] for p in parts])
        out = torch.zeros((self.num_samples, *values.shape[1:]), dtype=values.dtype)
        out[indices] = values
        return out

    def set_sample_weights(self, name: str, weights: torch.Tensor) -> None:
        """Weights [N] by training-set index that losses read for their batch (kept on the device)."""
        if weights.shape != (self.num_samples,):
            raise ValueError(f"sample weights {name!r} must have shape [{self.num_samples}], got {tuple(weights.shape)}")
        self._runner.weights[name] = weights.detach().float().to(self.device)


class CallbackRunner:
    """The enabled callbacks of a run, their sample weights, and their state in checkpoints."""

    def __init__(self, cfg, model: torch.nn.Module, device: torch.device, train_set, rank: int = 0,
                 world_size: int = 1, clean: Optional[np.ndarray] = None):
        self.cfg, self.model, self.device, self.train_set = cfg, model, device, train_set
        self.rank, self.world_size, self.clean = rank, world_size, clean
        self.callbacks: List[Tuple[str, EpochCallback]] = [
            (name, spec.build(cfg)) for name, spec in CALLBACKS.items() if spec.enabled(cfg)]
        self.weights: Dict[str, torch.Tensor] = {}

    def __bool__(self) -> bool:
        return bool(self.callbacks)

    def before_epoch(self, epoch: int) -> Dict[str, Any]:
        """Run every callback for `epoch`; {name: what it reports} (empty when none reports)."""
        reports = {}
        for name, callback in self.callbacks:
            training = self.model.training
            try:
                report = callback.on_epoch_start(EpochContext(self, epoch))
            finally:
                self.model.train(training)
            if report:
                reports[name] = report
        return reports

    def annotate(self, batch: Dict[str, Any]) -> Dict[str, Any]:
        """The batch (on the device) with the weights of its samples under `sample_weights`."""
        if self.weights and "indices" in batch:
            batch["sample_weights"] = {name: w[batch["indices"]] for name, w in self.weights.items()}
        return batch

    def state_dict(self) -> Dict[str, Any]:
        return {"callbacks": {name: callback.state_dict() for name, callback in self.callbacks},
                "weights": {name: w.detach().cpu() for name, w in self.weights.items()}}

    def load_state_dict(self, state: Optional[Dict[str, Any]]) -> None:
        if not state:
            return
        own = dict(self.callbacks)
        for name, callback_state in state.get("callbacks", {}).items():
            if name in own:
                own[name].load_state_dict(callback_state)
        self.weights = {name: w.to(self.device) for name, w in state.get("weights", {}).items()}
