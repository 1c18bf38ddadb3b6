"""Helper of tests/test_distributed.py, run as `torchrun --standalone --nproc_per_node=2 tests/ddp_worker.py
OUT.pt`. One launch (each costs seconds of start-up) does two things:
  1. every scenario of SCENARIOS for STEPS steps through the project's Trainer; rank 0 saves {scenario: (losses,
     state)} to OUT.pt (`run_scenario(name)` in one process gives the reference);
  2. rank 1 raises a UserError alone while rank 0 waits in a barrier, so the launch ends with a non-zero exit
     once rank 0 is stopped (by gloo's broken connection or by torchrun) instead of hanging.

Each step sees its own global batch of GLOBAL_BATCH pairs; rank r of W takes rows r*b:(r+1)*b (b = GLOBAL_BATCH
/ W). Identities repeat across the two halves, so SDM positives span ranks. Dropout is off (p = 0): its draws
cannot match between one and two processes.
"""
from __future__ import annotations

import os
from typing import Dict, List, Tuple

import torch
from torch import nn

from model import build_model
from processor.trainer import Trainer
from utils import distributed as dist_utils
from utils.cli import run_main
from utils.config import build_config
from utils.errors import UserError
from utils.tokenizer import EOT_ID, SOT_ID

SMOKE_CONFIG = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "configs", "smoke.yaml")
GLOBAL_BATCH = 8
STEPS = 3
NUM_CLASSES = 4
# name: (loss_names, what is made global under DDP: "all" = use_global_batch, "features" = the contrastive
# losses only (MoE balancing per process, averaged by DDP), "none" = every loss per process).
SCENARIOS: Dict[str, Tuple[str, str]] = {
    "sdm+itc+id": ("sdm+itc+id", "all"),
    "sdm+itc+aux": ("sdm+itc+aux", "all"),
    "sdm+itc+aux, per-process aux": ("sdm+itc+aux", "features"),
    "sdm+itc+aux, per-process losses": ("sdm+itc+aux", "none"),
}


class FixedBatches:
    """Stands in for the training DataLoader: epoch e yields this rank's share of global batch e."""

    def __init__(self, rank: int, world_size: int):
        self.rank, self.world_size, self.epoch = rank, world_size, 0
        self.dataset = self.sampler = self

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return 1

    def __iter__(self):
        batch = global_batch(self.epoch)
        b = GLOBAL_BATCH // self.world_size
        return iter([{k: v[self.rank * b:(self.rank + 1) * b] for k, v in batch.items()}])


def global_batch(step: int, text_length: int = 16) -> Dict[str, torch.Tensor]:
    """Random images, captions of varying length (SOT ... EOT, zero padding) and identities, from `step`."""
    g = torch.Generator().manual_seed(1000 + step)
    ids = torch.zeros(GLOBAL_BATCH, text_length, dtype=torch.long)
    for i in range(GLOBAL_BATCH):
        n = int(torch.randint(2, text_length - 2, (1,), generator=g))
        ids[i, 0], ids[i, n + 1] = SOT_ID, EOT_ID
        ids[i, 1:n + 1] = torch.randint(1, 40000, (n,), generator=g)
    half = torch.randperm(NUM_CLASSES, generator=g)
    return {"images": torch.randn(GLOBAL_BATCH, 3, 64, 32, generator=g), "caption_ids": ids,
            "pids": torch.cat([half, half.roll(1)])}


def run_scenario(name: str, rank: int = 0, world_size: int = 1) -> Tuple[List[Dict[str, float]], dict]:
    """Train scenario `name` for STEPS steps; returns the per-step losses and the final state dict."""
    loss_names, scope = SCENARIOS[name]
    cfg = build_config(SMOKE_CONFIG, {"loss_names": loss_names, "text_length": "16", "device": "cpu",
                                      "max_grad_norm": "5.0", "optimizer": "SGD", "lr": "0.05",
                                      "warmup_epochs": "0", "num_epoch": str(STEPS + 1), "tensorboard": "false"})
    torch.manual_seed(cfg.seed)
    model = build_model(cfg, NUM_CLASSES)
    for module in model.modules():
        if isinstance(module, nn.Dropout):
            module.p = 0.0
    if world_size > 1 and scope == "all":
        dist_utils.use_global_batch(model, world_size)
    elif world_size > 1 and scope == "features":
        model.gather = dist_utils.feature_gatherer(world_size)
    trainer = Trainer(cfg, model, FixedBatches(rank, world_size), None, "", torch.device("cpu"), rank,
                      world_size)
    losses = [trainer.train_epoch(step) for step in range(1, STEPS + 1)]
    return losses, {k: v.detach().clone() for k, v in model.state_dict().items()}


def main(argv: List[str]) -> int:
    """The two stages of the module docstring, as one rank of torchrun; argv = [OUT.pt]."""
    rank, world_size, _ = dist_utils.init_distributed("cpu")
    results = {name: run_scenario(name, rank, world_size) for name in SCENARIOS}
    if rank == 0:
        torch.save(results, argv[0])
    dist_utils.barrier()  # rank 0 has saved
    if rank == 1:
        raise UserError("rank 1 fails alone")
    dist_utils.barrier()  # never completes
    return 0


if __name__ == "__main__":
    run_main(main)
