"""Synthetic training batches: random inputs of a run's shapes, for timing a step without data (the benchmarks, and
timing the precision modes before a run); `synthetic_setup` pairs one with a preset's random-weight model."""
from __future__ import annotations

from typing import Any, Callable, Dict, Mapping, Optional, Sequence, Tuple

import torch

from datasets.augment import token_inputs
from model import build_model
from model.registry import loss_views
from utils.config import Config, build_config
from utils.tokenizer import EOT_ID, SOT_ID


def synthetic_batch(batch_size: int, img_size: Sequence[int], text_length: int, device: torch.device,
                    seed: int = 0) -> Dict[str, torch.Tensor]:
    """Random images, captions of 10..text_length-2 tokens (SOT ... EOT, then padding), two samples per pid."""
    gen = torch.Generator().manual_seed(seed)
    images = torch.randn(batch_size, 3, *img_size, generator=gen)
    ids = torch.zeros(batch_size, text_length, dtype=torch.long)
    for b in range(batch_size):
        n = int(torch.randint(10, max(11, text_length - 1), (1,), generator=gen))
        n = min(n, text_length - 1)
        ids[b, 0] = SOT_ID
        ids[b, 1:n] = torch.randint(1, 49405, (n - 1,), generator=gen)
        ids[b, n] = EOT_ID
    pids = torch.arange(batch_size) // 2
    return {"images": images.to(device), "caption_ids": ids.to(device), "pids": pids.to(device)}


def training_batch(cfg, batch_size: int, device: torch.device) -> Dict[str, torch.Tensor]:
    """A synthetic batch of the run's shapes with every key a training loader gives it (sample indices, the token
    inputs the config enables, the extra image views its losses ask for), so that any loss finds what it reads."""
    batch = synthetic_batch(batch_size, cfg.img_size, cfg.text_length, device)
    batch["indices"] = torch.arange(batch_size, device=device)
    batch["image_ids"] = torch.arange(batch_size, device=device)
    gen = torch.Generator().manual_seed(0)
    inputs = token_inputs(cfg)
    if inputs:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(0)
            items = [{k: v for fn in inputs for k, v in fn(ids).items()} for ids in batch["caption_ids"].cpu()]
        batch.update({key: torch.stack([item[key] for item in items]).to(device) for key in items[0]})
    for name in loss_views(cfg):
        batch[f"view_{name}"] = torch.randn(batch_size, 3, *cfg.img_size, generator=gen).to(device)
    return batch


def synthetic_setup(config_file: Optional[str], overrides: Mapping[str, Any], batch_size: int, device: torch.device,
                    backbone: Optional[Callable[[Config], torch.nn.Module]] = None
                    ) -> Tuple[Config, torch.nn.Module, Dict[str, torch.Tensor]]:
    """A preset's model with random weights drawn after torch.manual_seed(0), on `device`, and a training batch of its
    shapes: what the benchmarks time. `backbone(cfg)`, when given, builds the backbone (after the seed, so its
    weights are seeded too)."""
    cfg = build_config(config_file, {**overrides, "batch_size": batch_size})
    torch.manual_seed(0)
    model = build_model(cfg, num_classes=max(2, batch_size // 2),
                        backbone=backbone(cfg) if backbone else None).to(device)
    return cfg, model, training_batch(cfg, batch_size, device)


def stepped_checkpoint(config: str, overrides: Optional[Dict[str, Any]] = None) -> Tuple[Config, Dict[str, Any]]:
    """(the config, the checkpoint a run of it writes) for the preset's random-weight model after one optimizer
    step with zero gradients: Adam's moments exist, as in a real checkpoint (the checkpoint benchmarks)."""
    from processor.trainer import Trainer  # the trainer imports this module
    cfg = build_config(config, {"pretrain_choice": "ViT-B-16", "name": "bench", **(overrides or {})})
    model = build_model(cfg)
    trainer = Trainer(cfg, model)
    for p in model.parameters():
        p.grad = torch.zeros_like(p)
    trainer.optimizer.step()
    return cfg, trainer.state(1)
