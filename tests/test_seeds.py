"""`sh run.sh <preset> --seeds 1 2 3`: one run per seed, resumed or only tested when it exists; then `sh run.sh test`
groups them into a mean ± std row."""
import csv
import hashlib
import json
import os
import statistics
import subprocess

import pytest

from helpers import ROOT, SMOKE_CONFIG, assert_one_error_line, run_entry
from tools import run_preset

# Trains, compiles or starts processes: not in the quick subset (pytest -m "not slow").
pytestmark = pytest.mark.slow

METRICS = ("R1", "R5", "R10", "mAP", "mINP")


@pytest.fixture(scope="module")
def seeded(tiny_root, tmp_path_factory):
    """A work folder whose ./logs holds the smoke preset trained with --seeds 1 2 3 on the tiny set."""
    work = tmp_path_factory.mktemp("seeds")
    common = ["--root_dir", tiny_root, "--output_dir", str(work / "logs"), "--batch_size", "8", "--warmup_epochs", "0"]
    # Seed 2 first stops after one epoch, as an interrupted run would; the --seeds run resumes it.
    assert run_preset.main(["--config_file", SMOKE_CONFIG, *common, "--seed", "2", "--name", "smoke_seed2", "--num_epoch", "1"]) == 0
    assert run_preset.main(["--config_file", SMOKE_CONFIG, "--seeds", "1", "2", "3", *common]) == 0
    return work, tiny_root, common


def history(work, seed):
    with open(work / "logs" / "Demo-PEDES" / f"smoke_seed{seed}" / "history.json") as f:
        return json.load(f)


def test_one_run_per_seed_and_a_partial_one_resumes(seeded):
    work, _, _ = seeded
    for seed in (1, 2, 3):
        folder = work / "logs" / "Demo-PEDES" / f"smoke_seed{seed}"
        with open(folder / "configs.yaml") as f:
            assert f"seed: {seed}\n" in f.read()
        assert [h["epoch"] for h in history(work, seed)] == [1, 2]
        assert os.path.isfile(folder / "test_results.json")
    log = (work / "logs" / "Demo-PEDES" / "smoke_seed2" / "train_log.txt").read_text()
    assert "resumed from" in log and log.count("epoch 1 done") == 1


def test_finished_runs_are_only_tested_again(seeded, capsys):
    work, root, common = seeded
    last = work / "logs" / "Demo-PEDES" / "smoke_seed3" / "last.pth"
    before = last.stat().st_mtime_ns
    assert run_preset.main(["--config_file", SMOKE_CONFIG, "--seeds", "3", *common]) == 0
    out = capsys.readouterr().out
    assert last.stat().st_mtime_ns == before and "already finished all 2 epochs" in out and "| t2i " in out


def test_run_sh_test_adds_the_mean_and_std_of_the_seeds(seeded):
    work, root, _ = seeded
    done = subprocess.run(["sh", os.path.join(ROOT, "run.sh"), "test", "--root_dir", root, "--num_workers", "0"],
                          cwd=work, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    with open(work / "logs" / "summary.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert [r["run"] for r in rows] == [f"logs/Demo-PEDES/smoke_seed{s}" for s in (1, 2, 3)] + ["smoke (n=3)"]
    results = []
    for seed in (1, 2, 3):
        with open(work / "logs" / "Demo-PEDES" / f"smoke_seed{seed}" / "test_results.json") as f:
            results.append(json.load(f)["t2i"])
    group = rows[-1]
    assert group["n"] == "3" and group["R1"] == "" and all(r["n"] == "" and r["R1_mean"] == "" for r in rows[:3])
    for k in METRICS:
        assert abs(float(group[f"{k}_mean"]) - statistics.fmean(r[k] for r in results)) < 0.01
        assert abs(float(group[f"{k}_std"]) - statistics.stdev(r[k] for r in results)) < 0.01
    head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True).stdout.strip()
    for seed, row in zip((1, 2, 3), rows):
        with open(work / "logs" / "Demo-PEDES" / f"smoke_seed{seed}" / "best.pth", "rb") as f:
            assert row["checkpoint"] == hashlib.sha256(f.read()).hexdigest()[:12]
        assert row["commit"].startswith(head[:12]) and int(row["tested"]) >= 2  # test.py's look, then this one
    markdown = (work / "logs" / "summary.md").read_text()
    mean, std = statistics.fmean(r["R1"] for r in results), statistics.stdev(r["R1"] for r in results)
    assert f"| smoke (n=3) | Demo-PEDES | none | {mean:.2f} ± {std:.2f} |" in markdown
    assert "smoke (n=3)" in done.stdout


@pytest.mark.parametrize("seeds, message", [
    ([], "--seeds needs at least one seed, e.g. --seeds 1 2 3"),
    (["1", "x"], "--seeds takes integers; got 'x'"),
    (["1", "2", "1"], "--seeds lists seed 1 twice"),
    (["-3"], "--seeds takes seeds of 0 or more; got -3"),
], ids=["none", "not-an-integer", "repeated", "negative"])
def test_bad_seeds_are_one_line(tmp_path, capsys, seeds, message):
    code, err = run_entry(run_preset.main, ["--config_file", SMOKE_CONFIG, "--seeds", *seeds, "--output_dir", str(tmp_path / "o")],
                          capsys)
    assert_one_error_line(code, err, message)
    assert not (tmp_path / "o").exists()


def test_run_sh_passes_seeds_through(tmp_path):
    done = subprocess.run(["sh", os.path.join(ROOT, "run.sh"), "smoke", "--seeds", "1", "1"], cwd=tmp_path,
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 2 and done.stderr.strip() == "error: command line: --seeds lists seed 1 twice"
