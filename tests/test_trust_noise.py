"""Noisy correspondence and RDE, as an adversarial review reported them: the noise file a run resumes with, the rate
a noise file gives (CCD's settings, the summary's noise column), a published RDE config's loss_names, CCD on a
split it cannot divide, noise files that are no permutation, and back-translations that are not text. Each ends
with the right behaviour or one `error:` line and a non-zero exit, leaving an existing run's files unchanged."""
import csv
import hashlib
import json
import os
import shutil

import numpy as np
import pytest

from datasets.noise import read_noise_file
from evaluation.runs import noise_of
from helpers import assert_one_error_line, build_dataset, run_dir, run_entry, run_tool, train_argv, tree, plain_smoke
from model import load_model
from published_layout import write_published_run
import methods.rde.ccd
import test as test_entry
import train
from utils.checkpoint import read_checkpoint, save_checkpoint
from utils.config import Config
from utils.errors import UserError

PAIRS = 32  # training pairs of the tiny Demo-PEDES: 8 identities x 2 images x 2 captions


def tal_argv(root, out, *extra, epochs=1):
    """`epochs` epochs of RDE's loss (TAL, CCD on) on the tiny Demo-PEDES."""
    return train_argv(root, out, "--loss_names", "tal", "--warmup_epochs", "0", "--num_epoch", str(epochs), *extra,
                      config=plain_smoke())


def half_noise(path, swaps=PAIRS // 4):
    """A permutation that swaps `swaps` pairs of neighbours: 2 x swaps of the pairs carry another's caption."""
    permutation = np.arange(PAIRS)
    for k in range(swaps):
        permutation[[2 * k, 2 * k + 1]] = permutation[[2 * k + 1, 2 * k]]
    np.save(path, permutation)
    return str(path)


# ------------------------------------------------------------------------------------ 1. resuming
def test_a_noise_file_changed_before_a_resume_stops_it(tiny_root, tmp_path, capsys):
    noise = half_noise(tmp_path / "half.npy")
    out = str(tmp_path / "out")
    code, err = run_entry(train.main, tal_argv(tiny_root, out, "--noisy_file", noise), capsys)
    assert code == 0, err
    run = run_dir(out)
    with open(os.path.join(run, "history.json")) as f:
        [record] = json.load(f)
    with open(noise, "rb") as f:
        assert record["noisy_file_sha256"] == hashlib.sha256(f.read()).hexdigest()
    np.save(noise, np.arange(PAIRS))  # a clean file in its place
    before = tree(run)
    resume = tal_argv(tiny_root, out, "--noisy_file", noise, "--resume", epochs=3)
    code, err = run_entry(train.main, resume, capsys)
    assert_one_error_line(code, err, "--resume:", f"noisy_file {noise}", "changed since")
    assert tree(run) == before
    # A run from before the record: its noisy_pairs.npy is what the new file contradicts.
    checkpoint = read_checkpoint(os.path.join(run, "last.pth"))
    del checkpoint["provenance"]["noisy_file_sha256"]
    save_checkpoint(checkpoint, os.path.join(run, "last.pth"))
    before = tree(run)
    code, err = run_entry(train.main, resume, capsys)
    assert_one_error_line(code, err, "--resume:", "noisy_pairs.npy", "16 of 32 pairs differ")
    assert tree(run) == before


# ------------------------------------------------------------------------------------ 2. the rate of a noise file
def test_a_noise_file_alone_sets_ccds_settings_and_the_noise_column(tiny_root, tmp_path, capsys, monkeypatch):
    """--noisy_file alone, noisy_rate left at 0 (docs/options.md's form): the file's rate, 20 of 32 noisy pairs, gives
    CCD's mixture the settings of noise above 0.4, and the summary's noise column says 0.625."""
    noise = half_noise(tmp_path / "n625.npy", swaps=PAIRS // 4 + 2)
    strong = []
    fit = methods.rde.ccd.clean_probability
    monkeypatch.setattr(methods.rde.ccd, "clean_probability",
                        lambda losses, settings: strong.append(settings) or fit(losses, settings))
    work = tmp_path / "work"
    code, err = run_entry(train.main, tal_argv(tiny_root, str(work / "logs"), "--noisy_file", noise), capsys)
    assert code == 0, err
    assert strong == [True, True]
    with open(os.path.join(run_dir(str(work / "logs")), "train_log.txt")) as f:
        assert "20 of 32 training pairs carry another pair's caption" in f.read()
    assert run_tool([], str(work), monkeypatch) == 0
    with open(work / "logs" / "summary.csv", newline="") as f:
        [row] = list(csv.DictReader(f))
    assert row["noise"] == "0.625 (n625.npy)"


def test_the_noise_column_of_older_runs(tmp_path):
    """A run whose checkpoint predates the record: the share of its noisy_pairs.npy; without one, '?'."""
    cfg = Config(noisy_file="/elsewhere/half.npy", output_dir=str(tmp_path), name="run")
    assert noise_of(cfg, str(tmp_path), {}) == "? (half.npy)"
    permutation = np.arange(10)
    permutation[:4] = [1, 0, 3, 2]
    np.save(tmp_path / "noisy_pairs.npy", permutation)
    assert noise_of(cfg, str(tmp_path), {}) == "0.4 (half.npy)"
    assert noise_of(cfg, str(tmp_path), {"noisy_rate": 0.25}) == "0.25 (half.npy)"
    assert noise_of(Config(noisy_rate=0.5)) == "0.5" and noise_of(Config()) == ""


# ------------------------------------------------------------------------------------ 3. RDE's loss_names
def published_rde(folder, drop=(), **updates):
    config = write_published_run(str(folder), "rde", dataset_name="Demo-PEDES", **updates)
    with open(config) as f:
        lines = [line for line in f if not line.startswith(tuple(f"{key}:" for key in drop))]
    with open(config, "w") as f:
        f.writelines(lines)
    return config


def test_rde_loss_names_give_the_options_its_config_lacks(tmp_path):
    config = published_rde(tmp_path / "rde", drop=("select_ratio", "tau", "noisy_rate"),
                           loss_names="TAL+sr0.9_tau0.02_margin0.1_n0.5")
    cfg = load_model(config, compat="none").cfg
    assert (cfg.select_ratio, cfg.tau, cfg.margin, cfg.noisy_rate) == (0.9, 0.02, 0.1, 0.5)
    assert noise_of(cfg) == "0.5"


@pytest.mark.parametrize("loss_names, culprits", [
    ("TAL+sr0.9_tau0.015_margin0.1_n0.0", ["option 'select_ratio' is 0.3", "says select_ratio 0.9"]),
    ("TAL+sr0.3_tau0.015_margin0.2_n0.0", ["option 'margin' is 0.1", "says margin 0.2"]),
    ("TAL+sr0.3_tau0.015_margin0.1_x7", ["option 'loss_names'", "'x7'"]),
    ("ITC+sr0.3", ["option 'loss_names'", "only TAL runs"]),
])
def test_rde_loss_names_that_contradict_the_config_are_one_line(tiny_root, tmp_path, capsys, loss_names, culprits):
    config = published_rde(tmp_path / "rde", loss_names=loss_names)
    with pytest.raises(UserError) as raised:
        load_model(config, compat="none")
    assert str(raised.value).startswith(f"{config}: ")
    code, err = run_entry(test_entry.main, ["--config_file", config, "--root_dir", tiny_root], capsys)
    assert_one_error_line(code, err, config, *culprits)


# ------------------------------------------------------------------------------------ 4. CCD on one identity
def test_ccd_refuses_a_training_split_of_one_identity(tiny_root, tmp_path, capsys):
    with open(os.path.join(tiny_root, "Demo-PEDES", "reid_raw.json")) as f:
        entries = json.load(f)
    first = next(e["id"] for e in entries if e["split"] == "train")
    path = tmp_path / "one.csv"
    with open(path, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(("file_path", "id", "caption", "split"))
        for e in entries:
            for caption in e["captions"]:
                writer.writerow((os.path.join(tiny_root, "Demo-PEDES", "imgs", e["file_path"]),
                                 first if e["split"] == "train" else e["id"], caption, e["split"]))
    out = tmp_path / "out"
    code, err = run_entry(train.main, tal_argv(tiny_root, str(out), "--dataset_name", "custom", "--annotation_file",
                                               str(path)), capsys)
    assert_one_error_line(code, err, str(path), "a single identity (32 pairs)", "rde_ccd")
    assert not out.exists()


# ------------------------------------------------------------------------------------ 5, 6. noise files
@pytest.mark.parametrize("kind, message", [("empty", "the file is empty"), ("npz", "a .npz archive")])
def test_a_noise_file_that_is_not_one_npy_array_is_one_line(tiny_root, tmp_path, capsys, kind, message):
    path = tmp_path / f"noise.{'npz' if kind == 'npz' else 'npy'}"
    if kind == "npz":
        np.savez(path, np.arange(PAIRS))
    else:
        path.write_text("")
    out = tmp_path / "out"
    code, err = run_entry(train.main, tal_argv(tiny_root, str(out), "--noisy_file", str(path)), capsys)
    assert_one_error_line(code, err, f"noisy_file {path}", message)
    assert not out.exists()


def test_a_noise_file_that_repeats_an_index_names_it(tmp_path):
    permutation = np.arange(PAIRS)
    permutation[20] = 3
    np.save(tmp_path / "dup.npy", permutation)
    with pytest.raises(UserError, match=r"index 3 occurs 2 times, at positions 3 and 20 \(counting from 0\); index "
                                        r"20 never occurs"):
        read_noise_file(str(tmp_path / "dup.npy"), PAIRS)
    permutation[20] = PAIRS + 5
    np.save(tmp_path / "out.npy", permutation)
    with pytest.raises(UserError, match=r"position 20 \(counting from 0\) holds 37, outside 0\.\.31"):
        read_noise_file(str(tmp_path / "out.npy"), PAIRS)


# ------------------------------------------------------------------------------------ 7. back-translations
def test_a_lone_surrogate_in_a_back_translation_is_named(tiny_root, tmp_path):
    shutil.copytree(os.path.join(tiny_root, "Demo-PEDES"), tmp_path / "Demo-PEDES")
    path = tmp_path / "Demo-PEDES" / "reid_raw.json"
    entries = json.loads(path.read_text())
    for e in entries:
        e["captions_bt"] = [c + " again" for c in e["captions"]]
    entries[3]["captions_bt"][1] = "a man\ud800 in red"
    path.write_text(json.dumps(entries))  # valid JSON: "\\ud800"
    with pytest.raises(UserError, match=r"reid_raw.json: entry 3 \(counting from 0\): 'captions_bt' text 1 "
                                        r"\(counting from 0\), the back-translation of caption 1, holds a lone "
                                        r"surrogate") as raised:
        build_dataset("Demo-PEDES", str(tmp_path))
    assert "list of" not in str(raised.value)
