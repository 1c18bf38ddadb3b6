"""docs/extending.md's three examples, taken from the page itself and run as written, in a copy of the project
(every top-level entry linked, nothing edited) whose ./data holds the small Demo-PEDES."""
import json
import os
import re
import subprocess

import pytest
import torch
import yaml

from helpers import ROOT

# Trains, compiles or starts processes: not in the quick subset (pytest -m "not slow").
pytestmark = pytest.mark.slow

DOC = os.path.join(ROOT, "docs", "extending.md")
SECTIONS = {"loss": "A new loss", "head": "A new head", "dataset": "A new data set",
            "callback": "A per-epoch sample weighting", "method": "A new method: a copy of one"}


def section_blocks(title, python=1):
    """(python block, sh block) of the section `## <title>`; exactly one of each (`python` 0: no python block,
    None is given for it), or the test fails."""
    with open(DOC, encoding="utf-8") as f:
        text = f.read()
    body = re.split(r"^## ", text, flags=re.M)
    section = next(s for s in body if s.startswith(title + "\n"))
    blocks = {kind: re.findall(rf"^```{kind}\n(.*?)^```", section, flags=re.M | re.S) for kind in ("python", "sh")}
    assert len(blocks["python"]) == python and len(blocks["sh"]) == 1, (title, {k: len(v) for k, v in blocks.items()})
    return (blocks["python"][0] if python else None), blocks["sh"][0]


@pytest.fixture
def project_copy(demo_root, tmp_path):
    """A folder that looks like a fresh clone: links to every top-level file and folder of the project, a ./data
    holding the small Demo-PEDES, no logs."""
    for name in os.listdir(ROOT):
        if name.startswith(".") or name in ("data", "logs", "pretrained"):
            continue
        os.symlink(os.path.join(ROOT, name), tmp_path / name)
    (tmp_path / "data").mkdir()
    os.symlink(os.path.join(demo_root, "Demo-PEDES"), tmp_path / "data" / "Demo-PEDES")
    return tmp_path


def run_example(kind, folder):
    code, command = section_blocks(SECTIONS[kind])
    first = code.splitlines()[0]
    match = re.fullmatch(r"# file: (\w+\.py)", first)
    assert match, first
    (folder / match.group(1)).write_text(code)
    env = {**os.environ, "PYTHONPATH": str(folder)}
    done = subprocess.run(["sh", "-c", command], cwd=folder, capture_output=True, text=True, timeout=600, env=env)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-3000:]
    return done


def read_run(folder, dataset, name):
    run = folder / "logs" / dataset / name
    with open(run / "configs.yaml") as f:
        config = yaml.safe_load(f)
    return run, config, torch.load(run / "best.pth", weights_only=True)


def test_the_loss_example_trains(project_copy):
    run_example("loss", project_copy)
    run, config, ckpt = read_run(project_copy, "Demo-PEDES", "smoke_my_loss")
    # The run records its plug-in by absolute path: it means this file from any folder the run is used in.
    assert config["custom_imports"] == [str(project_copy / "my_loss.py")] and config["my_loss_margin"] == 0.3
    assert config["my_loss_loss_weight"] == 1.0 and config["loss_names"] == "sdm+itc+aux+my_loss"
    history = json.load(open(run / "history.json"))
    assert all(h["losses"]["my_loss_loss"] >= 0 for h in history)
    assert history[-1]["losses"]["my_loss_loss"] < history[0]["losses"]["my_loss_loss"]


def test_the_head_example_trains(project_copy):
    done = run_example("head", project_copy)
    run, config, ckpt = read_run(project_copy, "Demo-PEDES", "smoke_my_head")
    assert config["heads"] == ["my_head"] and config["my_head_lr_factor"] == 5.0
    assert {"my_head.query", "my_head.proj.weight", "my_head.proj.bias"} <= set(ckpt["model"])
    assert ckpt["model"]["my_head.proj.weight"].abs().sum() > 0  # it trained
    groups = [line for line in done.stdout.splitlines() if line.startswith("| my_head")]
    assert groups and "0.0015" in groups[0]  # lr 3e-4 x 5
    assert "no learning-rate group" not in done.stdout


def test_the_dataset_example_trains(project_copy):
    run_example("dataset", project_copy)
    run, config, ckpt = read_run(project_copy, "my_dataset", "smoke_my_dataset")
    assert config["dataset_name"] == "my_dataset" and config["my_dataset_file"] == "data/my_dataset/captions.tsv"
    with open(run / "train_log.txt") as f:
        rows = [line.split("|")[1:5] for line in f if line.startswith("| train") or line.startswith("|  val")]
    # The small Demo-PEDES, read through the plug-in: 60 training identities of 4 images and 2 captions each.
    assert [[c.strip() for c in row] for row in rows[:2]] == [["train", "60", "240", "480"], ["val", "20", "80", "160"]]
    assert any(key.startswith("php.") for key in ckpt["model"])


def test_the_callback_example_trains(project_copy):
    run_example("callback", project_copy)
    run, config, ckpt = read_run(project_copy, "Demo-PEDES", "smoke_small_loss")
    assert config["callbacks"] == ["small_loss"] and config["small_loss_drop"] == 0.2
    history = json.load(open(run / "history.json"))
    kept = [h["callbacks"]["small_loss"]["kept"] for h in history]
    assert len(kept) == 2 and all(0.75 < k < 0.85 for k in kept)
    # The weights are in the checkpoint: a resume goes on with them.
    weights = ckpt["callbacks"]["weights"]["small_loss"]
    assert weights.shape == (480,) and abs(float(weights.mean()) - kept[-1]) < 1e-6


def test_a_copy_of_a_built_in_method_is_a_new_method(project_copy):
    """The copy of methods/rde under other names trains through custom_imports beside the original."""
    _, command = section_blocks(SECTIONS["method"], python=0)
    done = subprocess.run(["sh", "-c", command], cwd=project_copy, capture_output=True, text=True, timeout=600,
                          env={**os.environ, "PYTHONPATH": str(project_copy)})
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-3000:]
    run, config, ckpt = read_run(project_copy, "Demo-PEDES", "my_rde")
    assert config["custom_imports"] == [str(project_copy / "my_rde")] and config["loss_names"] == "tal2"
    assert any(k.startswith("tse2.") for k in ckpt["model"]) and not any(k.startswith("tse.") for k in ckpt["model"])
    history = json.load(open(run / "history.json"))
    assert "ccd2" in history[0]["callbacks"] and history[0]["losses"]["tal2_loss"] > 0


def test_examples_run_where_the_project_is_unchanged():
    """The examples write their plug-ins into a copy; the repository holds none of them."""
    for name in ("my_loss.py", "my_head.py", "my_dataset.py", "my_weights.py", "my_rde"):
        assert not os.path.exists(os.path.join(ROOT, name))
