"""torchrun / DDP on CPU with two gloo processes: exactness against one process, the smoke run, resume, errors.

The identity sampler's sharding (whole P x K groups per rank, a different reproducible shard each epoch) is
tested in tests/test_loaders.py.
"""
import glob
import json
import os
import subprocess
import sys

import pytest
import torch
import torch.distributed as dist
import yaml

import ddp_worker
from helpers import plain_smoke
from model import build_model
from methods.php.moe import load_balancing_loss
import train
from utils import distributed as dist_utils
from utils.config import build_config
from utils.errors import UserError

# Trains, compiles or starts processes: not in the quick subset (pytest -m "not slow").
pytestmark = pytest.mark.slow

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SMOKE_CONFIG = os.path.join(ROOT, "configs", "smoke.yaml")
TIMEOUT = 240  # a hang (e.g. ranks waiting on each other) fails instead of blocking the suite


def torchrun(*args: str, timeout: int = TIMEOUT) -> subprocess.CompletedProcess:
    """`python -m torch.distributed.run --standalone --nproc_per_node=2 ARGS` from the repository root."""
    env = dict(os.environ, OMP_NUM_THREADS="1")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", *args]
    return subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)


@pytest.mark.parametrize("overrides", [
    {},
    {"php_modules": "efp", "efp_attention": "batch", "gate_context": "per_modality"},
    {"php_modules": "crfm", "loss_names": "cmpm+itc"},
    {"php_modules": "none", "loss_names": "sdm+id+mlm"},
])
def test_every_parameter_gets_a_gradient(overrides, ):
    # DDP runs without find_unused_parameters; a parameter outside the loss graph would stall its reduction.
    cfg = build_config(SMOKE_CONFIG, dict(overrides, text_length="16"))
    torch.manual_seed(0)
    model = build_model(cfg, ddp_worker.NUM_CLASSES)
    batch = ddp_worker.global_batch(1)
    batch["mlm_ids"], batch["mlm_labels"] = batch["caption_ids"].clone(), torch.zeros(8, 16, dtype=torch.long)
    batch["mlm_ids"][:, 1], batch["mlm_labels"][:, 1] = 49405, batch["caption_ids"][:, 1]
    out = model(batch)
    sum(v for k, v in out.items() if k.endswith("_loss")).backward()
    assert [n for n, p in model.named_parameters() if p.grad is None] == []


def test_reduced_load_balancing_loss_is_the_global_one():
    torch.manual_seed(0)
    logits = torch.randn(10, 4)
    chosen = torch.zeros(10, 4, dtype=torch.bool).scatter(1, logits.topk(2, dim=1).indices, True)
    whole = load_balancing_loss(logits, chosen)
    # Two "processes" holding 6 and 4 tokens; the reducer adds the other's statistics.
    stats = [torch.cat([lg.softmax(-1).sum(0), ch.float().sum(0), torch.tensor([float(len(lg))])])
             for lg, ch in ((logits[:6], chosen[:6]), (logits[6:], chosen[6:]))]
    first = load_balancing_loss(logits[:6], chosen[:6], reduce=lambda s: s + stats[1])
    assert torch.allclose(first, whole, rtol=1e-6)
    assert not torch.allclose(load_balancing_loss(logits[:6], chosen[:6]), whole, rtol=1e-3)


@pytest.fixture(scope="module")
def worker_launch(tmp_path_factory):
    """One torchrun launch of tests/ddp_worker.py: (completed process, its saved results)."""
    tmp = tmp_path_factory.mktemp("ddp_worker")
    out = str(tmp / "results.pt")
    done = torchrun(os.path.join("tests", "ddp_worker.py"), out)
    assert os.path.isfile(out), done.stderr[-3000:]
    return done, torch.load(out, weights_only=False)


def test_two_processes_match_one_on_the_global_batch(worker_launch, ):
    _, results = worker_launch
    for name, (loss_names, scope) in ddp_worker.SCENARIOS.items():
        ref_losses, ref_state = ddp_worker.run_scenario(name)
        losses, state = results[name]
        keys = [f"{n}_loss" for n in loss_names.split("+")]
        same_losses = all(abs(a[k] - b[k]) <= 1e-5 * abs(a[k]) for a, b in zip(ref_losses, losses) for k in keys)
        same_weights = all(torch.allclose(state[k], v, rtol=1e-5, atol=1e-6)
                           for k, v in ref_state.items() if v.is_floating_point())
        if scope == "all":
            assert same_losses and same_weights, (name, ref_losses, losses)
        else:
            # Controls (the test can fail): a per-process loss differs from its global-batch value, so does the
            # update; with per-process aux alone by about 0.5% in aux and 4e-5 in the weights.
            assert not same_losses and not same_weights, name


def test_user_error_on_one_rank_stops_the_other(worker_launch):
    done, _ = worker_launch
    assert done.returncode != 0 and "error: rank 1 fails alone" in done.stderr, done.stderr[-3000:]


def test_train_py_leaves_the_process_group_after_an_error(tmp_path, monkeypatch):
    # Every rank raises the same UserError (the checks are deterministic); each must leave its process group.
    def init_one_process(device_name):
        dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
        return 0, 1, 0

    monkeypatch.setattr(dist_utils, "init_distributed", init_one_process)
    with pytest.raises(UserError, match="--resume: .* does not exist"):
        train.main(["--config_file", SMOKE_CONFIG, "--output_dir", str(tmp_path / "logs"), "--resume"])
    assert not dist.is_initialized()


def test_torchrun_smoke_run_then_resume(demo_root, tmp_path):
    out = str(tmp_path / "logs")
    common = ["train.py", "--config_file", SMOKE_CONFIG, "--root_dir", demo_root, "--output_dir", out,
              "--warmup_epochs", "0"]
    first = torchrun(*common, "--num_epoch", "1")
    assert first.returncode == 0, first.stderr[-3000:]
    run_dir = os.path.join(out, "Demo-PEDES", "smoke")
    with open(os.path.join(run_dir, "configs.yaml")) as f:
        config = yaml.safe_load(f)
    assert config["num_epoch"] == 1 and "world_size" not in config
    last = torch.load(os.path.join(run_dir, "last.pth"), weights_only=True)
    assert last["epoch"] == 1 and last["world_size"] == 2
    second = torchrun(*common, "--num_epoch", "2", "--resume")
    assert second.returncode == 0, second.stderr[-3000:]
    assert torch.load(os.path.join(run_dir, "last.pth"), weights_only=True)["epoch"] == 2
    with open(os.path.join(run_dir, "train_log.txt")) as f:
        log = f.read()
    # Rank 0 alone writes: one line per event, one TensorBoard file per launch, no stray files of rank 1.
    assert log.count("2 process(es)") == 2 and log.count("epoch 1 done") == 1 and log.count("epoch 2 done") == 1
    assert "resumed from" in log and log.count("validation after epoch") == 2
    assert len(glob.glob(os.path.join(run_dir, "tensorboard", "events.*"))) == 2
    assert not [n for n in os.listdir(run_dir) if n.startswith(".") or n.endswith(".tmp")]


PROBE = """
import hashlib, os
from processor.callbacks import EpochCallback, register_callback

@register_callback("probe")
class Probe(EpochCallback):
    def on_epoch_start(self, ctx):
        weights = ctx._runner.weights["ccd"].cpu().numpy().tobytes()
        path = os.path.join(self.cfg.output_dir, f"rank{ctx.rank}_epoch{ctx.epoch}.txt")
        with open(path, "w") as f:
            f.write(hashlib.sha256(weights).hexdigest())
"""


def test_torchrun_processes_take_the_same_selection(demo_root, tmp_path):
    """RDE's selection under two processes: each scores its share, the scores are gathered, and both processes
    hold the same sample weights before every epoch."""
    (tmp_path / "probe.py").write_text(PROBE)
    out = str(tmp_path / "logs")
    done = torchrun("train.py", "--config_file", plain_smoke(), "--root_dir", demo_root, "--output_dir", out,
                    "--warmup_epochs", "0", "--num_epoch", "2", "--loss_names", "tal", "--noisy_rate", "0.5",
                    "--custom_imports", str(tmp_path / "probe.py"), "--callbacks", "probe")
    assert done.returncode == 0, done.stderr[-3000:]
    for epoch in (1, 2):
        hashes = {open(os.path.join(out, f"rank{r}_epoch{epoch}.txt")).read() for r in (0, 1)}
        assert len(hashes) == 1, epoch
    history = json.load(open(os.path.join(out, "Demo-PEDES", "smoke", "history.json")))
    assert [set(h["callbacks"]) for h in history] == [{"ccd"}, {"ccd"}]
