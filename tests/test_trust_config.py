"""Trusting what a run is configured with: the `precision: auto` cache (PHP_PRECISION_CACHE) neither replaces a
file that is not its own, nor stops a run when it cannot be read, nor is believed when its figures do not add up;
a TBPS-CLIP config.yaml with a broken schedule is one `error:` line naming the file and the key; and an invalid
value is named where it was given (the command line or the file)."""
import copy
import json
import os
import shutil

import pytest
import torch
import yaml

import test as test_entry
import train
from helpers import ROOT, assert_one_error_line, run_entry, run_tool, tree
from processor import precision
from processor.precision import choose_precision
from test_precision_auto import cache, timed, tiny  # noqa: F401 - fixtures
from test_tbps import REFERENCE_CONFIG, write_reference_run

CPU = torch.device("cpu")
RDE_DEMO = os.path.join(ROOT, "configs", "rde_demo.yaml")


# ------------------------------------------------------------------------------------ A. the precision cache
# The precision tests' fixtures: a cache file of each test's own, a tiny model, timings where bf16 is faster.


@pytest.mark.parametrize("content", [b"my notes, not a cache\n", b'{"entries": {}}', b"[]", b"{not json"])
def test_a_cache_path_naming_another_file_leaves_it_as_it_is(tiny, timed, tmp_path, monkeypatch, php_log, content):
    notes = tmp_path / "notes.txt"
    notes.write_bytes(content)
    monkeypatch.setenv(precision.CACHE_ENV, str(notes))
    cfg, model = tiny
    choice = choose_precision(cfg, model, CPU, 8)
    assert (choice.precision, choice.source) == ("bf16", "timed") and len(timed) == 1
    assert notes.read_bytes() == content
    assert any("ignoring the precision cache" in m and str(notes) in m for m in php_log)
    assert not choose_precision(cfg, model, CPU, 8).cached and len(timed) == 2  # still nothing cached


def test_the_cache_carries_its_marker_and_a_cache_written_before_it_stays_in_use(tiny, timed, cache):
    cfg, model = tiny
    choose_precision(cfg, model, CPU, 8)
    data = json.loads(cache.read_text())
    assert data["format"] == precision.CACHE_MARKER and len(data["entries"]) == 1
    # What version 1 wrote before the marker: its entries are used, and it is extended.
    del data["format"]
    cache.write_text(json.dumps(data))
    assert choose_precision(cfg, model, CPU, 8).cached and len(timed) == 1
    choose_precision(cfg, model, CPU, 4)
    data = json.loads(cache.read_text())
    assert data["format"] == precision.CACHE_MARKER and len(data["entries"]) == 2 and len(timed) == 2


def test_a_cache_too_deep_to_parse_does_not_stop_the_run(tiny, timed, cache, php_log):
    cfg, model = tiny
    cache.parent.mkdir(parents=True)
    deep = "[" * 100_000 + "]" * 100_000
    cache.write_text(deep)
    choice = choose_precision(cfg, model, CPU, 8)
    assert (choice.precision, choice.source) == ("bf16", "timed")
    assert any("ignoring the precision cache" in m and "RecursionError" in m for m in php_log)
    assert cache.read_text() == deep


def cached(cfg, model, precision_name, timings):
    """A cache of this project holding one entry for (cfg, model, batch 8)."""
    key = precision.cache_key(cfg, model, 8)
    entry = {"key": key, "precision": precision_name, "timings": timings, "date": "2024-01-01T00:00:00Z"}
    return {"format": precision.CACHE_MARKER, "version": precision.CACHE_VERSION,
            "entries": {precision._entry_id(key): entry}}


@pytest.mark.parametrize("name,timings,problem", [
    ("bf16", {"fp32": 0.1, "bf16": 1.0}, "where its own timings choose fp32"),  # bf16 10x slower, yet chosen
    ("bf16", {"fp32": float("nan"), "bf16": 0.1}, "fp32 time nan"),
    ("bf16", {}, "not one for each"),
    ("bf16", {"fp32": True, "bf16": True}, "fp32 time True"),
    ("bf16", {"fp32": 0.2, "bf16": -0.1}, "bf16 time -0.1"),
    ("bf16", {"fp32": "0.2", "bf16": 0.1}, "fp32 time '0.2'"),
    ("bf16", {"bf16": 0.1}, "not one for each"),
    ("fp16", {"fp32": 0.1, "bf16": 0.2}, "it says 'fp16'"),
])
def test_a_cached_entry_that_does_not_add_up_is_timed_again(tiny, timed, cache, php_log, name, timings, problem):
    cfg, model = tiny
    cache.parent.mkdir(parents=True)
    cache.write_text(json.dumps(cached(cfg, model, name, timings)))
    choice = choose_precision(cfg, model, CPU, 8)
    assert (choice.precision, choice.source, choice.cached) == ("bf16", "timed", False) and len(timed) == 1
    assert any("ignoring the cached precision choice" in m and problem in m for m in php_log), php_log
    again = choose_precision(cfg, model, CPU, 8)  # the entry timed again replaced it
    assert again.cached and again.timings == {"fp32": 0.2, "bf16": 0.1} and len(timed) == 1


# -------------------------------------------------------------------------- B. a TBPS-CLIP config.yaml
@pytest.fixture(scope="module")
def reference_checkpoint(tmp_path_factory):
    folder = str(tmp_path_factory.mktemp("tbps_reference"))
    write_reference_run(folder)
    return os.path.join(folder, "checkpoint_best.pth")


def tbps_run(folder, checkpoint, **schedule):
    """A TBPS-CLIP run folder whose config.yaml has `schedule` changed; returns its config.yaml."""
    os.makedirs(folder)
    config = copy.deepcopy(REFERENCE_CONFIG)
    config["schedule"].update(schedule)
    shutil.copy(checkpoint, os.path.join(folder, "checkpoint_best.pth"))
    path = os.path.join(folder, "config.yaml")
    with open(path, "w") as f:
        yaml.safe_dump(config, f)
    return path


@pytest.mark.parametrize("key,value", [("betas", 0.9), ("betas", []), ("betas", [0.9, 1.5]), ("lr", 0),
                                       ("lr", "fast"), ("lr", None), ("lr_start", "x")])
def test_a_broken_tbps_schedule_is_one_line_naming_the_file_and_key(reference_checkpoint, tmp_path, capsys, key,
                                                                    value):
    folder = str(tmp_path / "CUHK-PEDES" / "tbps_run")
    path = tbps_run(folder, reference_checkpoint, **{key: value})
    before = tree(folder)
    code, err = run_entry(test_entry.main, ["--config_file", path, "--root_dir", str(tmp_path / "data")], capsys)
    assert_one_error_line(code, err, path, f"schedule.{key}")
    assert tree(folder) == before


def test_evaluating_runs_names_the_broken_tbps_schedule_and_goes_on(reference_checkpoint, tmp_path, monkeypatch):
    work = tmp_path / "work"
    tbps_run(str(work / "logs" / "CUHK-PEDES" / "tbps_run"), reference_checkpoint, lr=0)
    code = run_tool(["--root_dir", str(tmp_path / "data")], str(work), monkeypatch)
    assert code == 1
    row = next(line for line in (work / "logs" / "summary.md").read_text().splitlines() if "tbps_run" in line)
    assert "logs/CUHK-PEDES/tbps_run/config.yaml: schedule.lr must be a positive number; got 0" in row
    assert "Error" not in row  # a user's line, not an exception's name


# ----------------------------------------------------------------------------- C. where a bad value came from
@pytest.mark.parametrize("argv,culprit", [(["--noisy_rate", "-0.1"], "option 'noisy_rate' must be 0 or more"),
                                          (["--noisy_rate", "1.5"], "option 'noisy_rate'"),
                                          (["--alpha", "1"], "option 'alpha'"),
                                          (["--lr", "0"], "option 'lr' must be positive"),
                                          (["--device", "gpu"], "option 'device'")])
def test_a_bad_value_from_the_command_line_names_the_command_line(tmp_path, capsys, argv, culprit):
    out = tmp_path / "out"
    code, err = run_entry(train.main, ["--config_file", RDE_DEMO, "--root_dir", str(tmp_path / "data"),
                                       "--output_dir", str(out), *argv], capsys)
    line = assert_one_error_line(code, err, "command line", culprit)
    assert "rde_demo.yaml" not in line
    assert not out.exists()


def test_a_bad_value_from_the_file_names_the_file_and_a_rule_names_both_sources(tmp_path, capsys):
    with open(RDE_DEMO) as f:
        config = yaml.safe_load(f)
    path = str(tmp_path / "preset.yaml")
    with open(path, "w") as f:
        yaml.safe_dump({**config, "noisy_rate": -0.1}, f)
    argv = ["--config_file", path, "--root_dir", str(tmp_path / "data"), "--output_dir", str(tmp_path / "out")]
    code, err = run_entry(train.main, [*argv, "--lr", "1e-4"], capsys)
    line = assert_one_error_line(code, err, f"{path}: option 'noisy_rate' must be 0 or more")
    assert "command line" not in line
    # warmup_epochs from the file, num_epoch from the command line: the rule relating them names both.
    with open(path, "w") as f:
        yaml.safe_dump({**config, "warmup_epochs": 5}, f)
    code, err = run_entry(train.main, [*argv, "--num_epoch", "3"], capsys)
    assert_one_error_line(code, err, f"{path} and command line: option 'warmup_epochs' (5) must be smaller")


def test_a_seed_beyond_the_generators_range_in_a_file_is_one_line(tmp_path, capsys):
    path = str(tmp_path / "preset.yaml")
    with open(RDE_DEMO) as f:
        config = yaml.safe_load(f)
    with open(path, "w") as f:
        yaml.safe_dump({**config, "seed": 99999999999999999999}, f)
    code, err = run_entry(train.main, ["--config_file", path, "--root_dir", str(tmp_path / "data"), "--output_dir",
                                       str(tmp_path / "out")], capsys)
    assert_one_error_line(code, err, f"{path}: option 'seed' must be 9223372036854775807 or less")
