"""torch_compile: full (the whole training forward and backward compiled; CUDA graphs on a GPU) gives eager's
losses and gradients within bf16 tolerance, and leaves checkpoints and resume as they are. On the CPU, where these
tests run, inductor compiles without graphs; the GPU's speed is measured by benchmarks/gpu_all.sh."""
import copy
import os

import pytest
import torch

from helpers import SMOKE_CONFIG, run_dir, train_argv
from model import build_model
from processor.trainer import compile_for_training
import train
from utils.checkpoint import read_checkpoint
from utils.config import build_config

# Trains, compiles or starts processes: not in the quick subset (pytest -m "not slow").
pytestmark = pytest.mark.slow


def losses_and_grads(model, forward, batch, precision):
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision == "bf16"):
        out = forward(batch)
    total = sum(v for k, v in out.items() if k.endswith("_loss"))
    total.backward()
    return ({k: float(v) for k, v in out.items() if k.endswith("_loss")},
            {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None})


def worst(grads, reference):
    return max(float((grads[k] - g).norm() / g.norm().clamp(min=1e-12)) for k, g in reference.items())


def test_full_compile_equals_eager_within_bf16_tolerance():
    cfg = build_config(SMOKE_CONFIG, {"precision": "bf16", "torch_compile": "full"})
    torch.manual_seed(0)
    eager = build_model(cfg).train()
    for module in eager.modules():  # dropout draws differ between eager and compiled code: compare without it
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.0
    compiled, reference = copy.deepcopy(eager), copy.deepcopy(eager)
    batch = {"images": torch.randn(8, 3, 64, 32), "pids": torch.tensor([0, 0, 1, 1, 2, 3, 4, 5]),
             "caption_ids": torch.randint(1, 1000, (8, 48))}
    batch["caption_ids"][:, 12], batch["caption_ids"][:, 13:] = 49407, 0
    forward = compile_for_training(compiled, compiled, cfg.torch_compile, torch.device("cpu"))
    assert forward is not compiled
    eager_losses, eager_grads = losses_and_grads(eager, eager, batch, "bf16")
    compiled_losses, compiled_grads = losses_and_grads(compiled, forward, batch, "bf16")
    fp32_losses, fp32_grads = losses_and_grads(reference, reference, batch, "fp32")
    assert set(compiled_grads) == set(eager_grads) == set(fp32_grads)
    # The compiled step's error against fp32 is of the size of eager bf16's own (fused kernels round differently).
    bf16_error = worst(eager_grads, fp32_grads)
    assert worst(compiled_grads, fp32_grads) <= 1.5 * bf16_error
    for name, value in fp32_losses.items():
        eager_off = abs(eager_losses[name] - value)
        assert abs(compiled_losses[name] - value) <= 2 * eager_off + 1e-3 * abs(value), name
    # ... and not of the size of a wrong gradient: the test can tell.
    assert worst({k: -g for k, g in compiled_grads.items()}, fp32_grads) > 1.5


def test_full_compile_keeps_checkpoints_and_resume(tiny_root, tmp_path):
    out = str(tmp_path)
    assert train.main(train_argv(tiny_root, out, "--torch_compile", "full", "--num_epoch", "1",
                                 "--warmup_epochs", "0", "--precision", "bf16")) == 0
    first = read_checkpoint(os.path.join(run_dir(out), "last.pth"))
    names = list(build_model(build_config(SMOKE_CONFIG, {"pretrain_choice": "ViT-Tiny"})).state_dict())
    assert list(first["model"]) == names  # no '_orig_mod.' prefix: loads into an uncompiled model
    # torch_compile may change on resume (utils.schema.RESUME_MUTABLE).
    assert train.main(train_argv(tiny_root, out, "--torch_compile", "none", "--num_epoch", "2",
                                 "--warmup_epochs", "0", "--precision", "bf16", "--resume")) == 0
    assert read_checkpoint(os.path.join(run_dir(out), "last.pth"))["epoch"] == 2
