"""End to end: the smoke run trains, writes its files, lowers the loss, and test.py evaluates it."""
import json
import os

import pytest
import torch
import yaml

from helpers import SMOKE_CONFIG
from model.backbone import residual_blocks
import test as test_entry
from utils.cli import run_main


def test_smoke_run_writes_its_files(smoke_run):
    for name in ("configs.yaml", "best.pth", "last.pth", "train_log.txt", "history.json"):
        assert os.path.isfile(os.path.join(smoke_run, name)), name
    assert os.path.isdir(os.path.join(smoke_run, "tensorboard"))
    with open(os.path.join(smoke_run, "configs.yaml")) as f:
        config = yaml.safe_load(f)
    assert config["name"] == "smoke" and "world_size" not in config and config["resume"] is False
    ckpt = torch.load(os.path.join(smoke_run, "last.pth"), weights_only=True)
    assert ckpt["epoch"] == 2 and ckpt["world_size"] == 1
    assert all(v.dtype != torch.float16 for v in ckpt["model"].values())


def test_smoke_run_loss_falls_and_is_evaluated(smoke_run):
    with open(os.path.join(smoke_run, "history.json")) as f:
        history = json.load(f)
    assert [h["epoch"] for h in history] == [1, 2]
    assert history[1]["losses"]["loss"] < history[0]["losses"]["loss"]
    assert all("R1" in h["val"] for h in history)


def test_test_py_writes_results(smoke_run, demo_root):
    with pytest.raises(SystemExit) as done:
        run_main(test_entry.main, ["--config_file", os.path.join(smoke_run, "configs.yaml"),
                                   "--root_dir", demo_root, "--i2t"])
    assert done.value.code == 0
    with open(os.path.join(smoke_run, "test_results.json")) as f:
        results = json.load(f)
    assert set(results["t2i"]) == {"R1", "R5", "R10", "mAP", "mINP"} and "i2t" in results
    assert results["split"] == "test" and results["compat"] == "none" and results["dataset"] == "Demo-PEDES"
    assert results["num_gallery"] == 80 and results["num_queries"] == 160
    assert len(results["expert_usage"]["image"]) == 1
    assert os.path.isfile(os.path.join(smoke_run, "experts.png"))


def test_a_new_run_never_replaces_an_existing_one(smoke_run, demo_root, capsys):
    import train
    out = os.path.dirname(os.path.dirname(smoke_run))
    before = os.path.getmtime(os.path.join(smoke_run, "best.pth"))
    args = ["--config_file", os.path.join(smoke_run, "configs.yaml"), "--root_dir", demo_root, "--output_dir", out]
    with pytest.raises(SystemExit) as done:
        run_main(train.main, args)
    assert done.value.code == 2
    assert "already holds best.pth and last.pth" in capsys.readouterr().err
    # Resuming a finished run trains nothing and exits 0.
    with pytest.raises(SystemExit) as done:
        run_main(train.main, args + ["--resume"])
    assert done.value.code == 0
    assert os.path.getmtime(os.path.join(smoke_run, "best.pth")) == before


@pytest.mark.slow
def test_torch_compile_run_trains_evaluates_and_keeps_checkpoint_names(smoke_run, demo_root, tmp_path,
                                                                        monkeypatch):
    import train
    compiled = []

    def record(clip):
        real_compile_blocks(clip)
        compiled.extend(residual_blocks(clip))

    from processor import trainer
    real_compile_blocks = trainer.compile_blocks
    monkeypatch.setattr(trainer, "compile_blocks", record)
    with pytest.raises(SystemExit) as done:
        run_main(train.main, ["--config_file", SMOKE_CONFIG, "--root_dir", demo_root, "--output_dir", str(tmp_path),
                              "--torch_compile", "--num_epoch", "1", "--warmup_epochs", "0", "--precision", "bf16"])
    assert done.value.code == 0
    assert compiled and all(b._compiled_call_impl is not None for b in compiled)
    run = os.path.join(str(tmp_path), "Demo-PEDES", "smoke")
    with open(os.path.join(run, "history.json")) as f:
        history = json.load(f)
    assert torch.isfinite(torch.tensor(history[0]["losses"]["loss"])) and "R1" in history[0]["val"]
    # Compiling in place leaves parameter names alone: the checkpoint loads into an uncompiled model.
    names = list(torch.load(os.path.join(run, "best.pth"), weights_only=True)["model"])
    assert names == list(torch.load(os.path.join(smoke_run, "best.pth"), weights_only=True)["model"])
