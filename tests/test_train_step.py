"""Trainer.train_step: no host synchronisation between log points, a non-finite step skipped without one (also
under DDP), and the logged values, means and TensorBoard points of the former per-step read-back."""
import collections
import copy
import itertools
import os

import pytest
import torch
import torch.distributed as dist
from torch.utils._python_dispatch import TorchDispatchMode

from datasets import dataset_from_config
from datasets.loaders import build_train_loader, set_loader_epoch
import ddp_worker
from helpers import ITERS, SMOKE
from model import build_model
from processor.trainer import Trainer
from solver import build_lr_scheduler, build_optimizer
from utils.config import build_config
from utils.env import epoch_seed

# Tensor methods that hand a value to Python: on a GPU each waits for the device.
HOST_READS = ("item", "tolist", "cpu", "numpy", "__float__", "__int__", "__bool__", "__index__", "__complex__",
              "__array__")
# Operations whose result's size or value the host needs before it can go on (`item` and `bool` end in the first).
SYNCING_OPS = {"_local_scalar_dense", "is_nonzero", "equal", "nonzero", "masked_select", "_unique2", "unique_dim",
               "unique_consecutive", "bincount", "repeat_interleave"}


class HostReads(TorchDispatchMode):
    """Counts, per step, what makes the host wait for the device: calls of HOST_READS (patched while the test
    runs) and SYNCING_OPS or indexing with a boolean mask (seen by this dispatch mode), while `step` is set."""

    def __init__(self, monkeypatch):
        super().__init__()
        self.step = None
        self.calls = collections.defaultdict(collections.Counter)
        for name in HOST_READS:
            monkeypatch.setattr(torch.Tensor, name, self._counted(name, getattr(torch.Tensor, name)))

    def _counted(self, name, method):
        def counted(tensor, *args, **kwargs):
            if self.step is not None:
                self.calls[self.step][name] += 1
            return method(tensor, *args, **kwargs)
        return counted

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func.overloadpacket.__name__
        masks = name.startswith("index") and any(
            isinstance(i, torch.Tensor) and i.dtype in (torch.bool, torch.uint8)
            for a in args if isinstance(a, (list, tuple)) for i in a)
        if self.step is not None and (name in SYNCING_OPS or masks):
            self.calls[self.step][f"aten.{name}"] += 1
        return func(*args, **(kwargs or {}))


class Watched:
    """A training loader that sets `reads.step` to the iteration the trainer runs, from when it hands out a batch
    until the trainer asks for the next one (never while the loader itself works), then to "end"."""

    def __init__(self, loader, reads):
        self.loader, self.reads = loader, reads
        self.dataset, self.sampler = loader.dataset, loader.sampler

    def __len__(self):
        return len(self.loader)

    def __iter__(self):
        for it, batch in enumerate(self.loader, start=1):
            self.reads.step = it
            yield batch
            self.reads.step = None
        self.reads.step = "end"


class Scalars:
    """Stands in for the trainer's EventLog: {(tag, step): value}."""

    def __init__(self):
        self.points = {}

    def scalar(self, tag, value, step):
        assert (tag, step) not in self.points
        self.points[(tag, step)] = value


def tiny_config(root, **overrides):
    values = {"root_dir": root, "batch_size": "8", "tensorboard": "false", **overrides}
    return build_config(SMOKE, {k: str(v) for k, v in values.items()})


def seeded_model(cfg, num_classes):
    torch.manual_seed(0)
    return build_model(cfg, num_classes)


def poison(model, steps, term="sdm_loss"):
    """Make `term` NaN in the model's training forwards number `steps` (counted from 1)."""
    calls = itertools.count(1)

    def make_nan(module, inputs, out):
        if module.training and next(calls) in steps:
            out[term] = out[term] * float("nan")
    model.register_forward_hook(make_nan)


def snapshot(trainer):
    return (copy.deepcopy(trainer.module.state_dict()), copy.deepcopy(trainer.optimizer.state_dict()["state"]))


def assert_same(before, after):
    (weights, state), (weights2, state2) = before, after
    assert [k for k in weights if not torch.equal(weights[k], weights2[k])] == []
    assert state.keys() == state2.keys()
    for index, entry in state.items():
        assert entry.keys() == state2[index].keys()
        for name, value in entry.items():
            assert torch.equal(value, state2[index][name]), (index, name)


@pytest.fixture(scope="module")
def tiny_data(tiny_root):  # noqa: F811
    cfg = tiny_config(tiny_root)
    return tiny_root, dataset_from_config(cfg)


# ------------------------------------------------------------------------------------------ host synchronisation
@pytest.mark.parametrize("precision", ["fp32", "bf16", "fp16"])
@pytest.mark.parametrize("log_period", [2, 3])
def test_steps_between_log_points_never_read_the_device(tiny_data, monkeypatch, precision, log_period):
    root, dataset = tiny_data
    cfg = tiny_config(root, precision=precision, log_period=log_period)
    reads = HostReads(monkeypatch)
    trainer = Trainer(cfg, seeded_model(cfg, dataset.num_classes), Watched(build_train_loader(cfg, dataset), reads),
                      device=torch.device("cpu"))
    assert trainer.skips_on_device
    with reads:
        trainer.train_epoch(1)
        reads.step = None
    # Nothing is read but at the log points and the epoch's end, each of which reads all values since the last at
    # once; with 4 steps, log_period 3 leaves step 4 to the end, log_period 2 leaves nothing.
    log_points = [it for it in range(1, ITERS + 1) if it % log_period == 0] + ["end"] * (ITERS % log_period > 0)
    assert {it: dict(c) for it, c in reads.calls.items() if c} == {it: {"tolist": 1} for it in log_points}


# ------------------------------------------------------------------------------------------ skipping on the device
@pytest.mark.parametrize("optimizer,precision,on_device", [("AdamW", "fp32", True), ("Adam", "bf16", True),
                                                           ("AdamW", "fp16", True), ("SGD", "fp32", True),
                                                           ("SGD", "fp32", False)])
def test_a_non_finite_step_changes_no_weight_and_no_optimizer_state(tiny_data, optimizer, precision, on_device):
    root, dataset = tiny_data
    cfg = tiny_config(root, optimizer=optimizer, precision=precision, max_grad_norm=1.0)
    model = seeded_model(cfg, dataset.num_classes).train()
    trainer = Trainer(cfg, model, device=torch.device("cpu"))
    if not on_device:
        # An optimizer without a fused kernel (e.g. parameters on several devices) is checked on the host.
        trainer.optimizer = torch.optim.SGD(trainer.optimizer.param_groups, foreach=True)
        trainer.skips_on_device = False
    assert trainer.skips_on_device == on_device  # the fused Adam, AdamW and SGD skip on the device
    if precision == "fp16":
        # A scale that does not overflow this model's gradients, so that only the poisoned step is skipped.
        trainer.scaler = torch.amp.GradScaler("cpu", init_scale=1024.0)
    loader = build_train_loader(cfg, dataset)
    set_loader_epoch(loader, 1)
    batches = list(itertools.islice(loader, 3))
    poison(model, {2})
    trainer.train_step(batches[0])  # the optimizer state exists from here on
    before = snapshot(trainer)
    values = dict(zip(trainer.log_names, trainer.train_step(batches[1]).tolist()))
    assert values["sdm_loss"] != values["sdm_loss"] and values["itc_loss"] == values["itc_loss"]
    assert_same(before, snapshot(trainer))
    if precision == "fp16":
        assert trainer.scaler.get_scale() == 512.0  # the GradScaler skipped it, for its non-finite gradients
    # The control: the next, finite step changes weights and state (and counts a step, for Adam/AdamW).
    trainer.train_step(batches[2])
    weights, state = snapshot(trainer)
    assert any(not torch.equal(v, weights[k]) for k, v in before[0].items())
    if optimizer != "SGD":
        assert all(entry["step"] == before[1][i]["step"] + 1 for i, entry in state.items())


def _skip_under_ddp(rank, folder):
    """One of two gloo processes: a finite step, then one whose loss is NaN on rank 0 only; saves what changed."""
    dist.init_process_group("gloo", init_method=f"file://{folder}/store", rank=rank, world_size=2)
    try:
        cfg = build_config(SMOKE, {"text_length": "16", "tensorboard": "false"})
        model = seeded_model(cfg, ddp_worker.NUM_CLASSES).train()
        trainer = Trainer(cfg, model, device=torch.device("cpu"), rank=rank, world_size=2)
        if rank == 0:
            poison(model, {2})
        half = ddp_worker.GLOBAL_BATCH // 2
        batches = [{k: v[rank * half:(rank + 1) * half] for k, v in ddp_worker.global_batch(step).items()}
                   for step in (1, 2)]
        trainer.train_step(batches[0])
        before = snapshot(trainer)
        values = trainer.train_step(batches[1])
        after = snapshot(trainer)
        changed = [k for k in before[0] if not torch.equal(before[0][k], after[0][k])]
        changed += [f"state {i}.{n}" for i, e in before[1].items() for n in e if not torch.equal(e[n], after[1][i][n])]
        torch.save({"changed": changed, "values": dict(zip(trainer.log_names, values.tolist()))},
                   os.path.join(folder, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
def test_processes_skip_a_step_together_when_one_has_a_non_finite_loss(tmp_path):
    torch.multiprocessing.spawn(_skip_under_ddp, args=(str(tmp_path),), nprocs=2)
    for rank in (0, 1):
        result = torch.load(tmp_path / f"rank{rank}.pt")
        # Rank 1's own loss was finite: it skips because the mean over processes is not.
        assert result["values"]["sdm_loss"] != result["values"]["sdm_loss"]
        assert result["changed"] == [], rank


# ------------------------------------------------------------------------------------------ what is logged
def per_step_reference(cfg, dataset, epochs):
    """The logged values of every step, read back as each step ends (the trainer's former way), from the same
    seeded model, optimizer and loader: [(epoch, iteration, {name: value})]."""
    model = seeded_model(cfg, dataset.num_classes)
    optimizer = build_optimizer(cfg, model)
    build_lr_scheduler(cfg, optimizer)  # sets the first epoch's learning rate, as the trainer's does
    loader = build_train_loader(cfg, dataset)
    steps = []
    for epoch in epochs:
        model.train()
        torch.manual_seed(epoch_seed(cfg.seed, epoch))
        set_loader_epoch(loader, epoch)
        for it, batch in enumerate(loader, start=1):
            out = model(batch)
            loss = sum(v for k, v in out.items() if k.endswith("_loss"))
            values = {k: v.item() for k, v in out.items()}
            values["loss"] = sum(v for k, v in values.items() if k.endswith("_loss"))
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            steps.append((epoch, it, values))
    return steps, optimizer.param_groups[0]["lr"]


def test_logged_values_are_those_of_a_per_step_read_back(tiny_data, php_log):
    root, dataset = tiny_data
    cfg = tiny_config(root, log_period=3)
    steps, lr = per_step_reference(cfg, dataset, (1, 2))
    trainer = Trainer(cfg, seeded_model(cfg, dataset.num_classes), build_train_loader(cfg, dataset),
                      device=torch.device("cpu"))
    trainer.writer = Scalars()
    means = [trainer.train_epoch(epoch) for epoch in (1, 2)]
    points, lines = {}, []
    for epoch in (1, 2):
        mine = [values for e, _, values in steps if e == epoch]
        assert means[epoch - 1] == {k: sum(v[k] for v in mine) / len(mine) for k in mine[0]}
        for it, values in enumerate(mine, start=1):
            points.update({(f"train/{k}", (epoch - 1) * ITERS + it): v for k, v in values.items()})
            points[("train/lr", (epoch - 1) * ITERS + it)] = lr
            if it % 3 == 0 or it == ITERS:
                shown = " ".join(f"{k} {sum(v[k] for v in mine[:it]) / it:.4f}" for k in sorted(mine[0]))
                lines.append(f"epoch {epoch} iter {it}/{ITERS} {shown} lr {lr:.3e}")
    assert trainer.writer.points == points
    assert [message for message in php_log if " iter " in message] == lines
