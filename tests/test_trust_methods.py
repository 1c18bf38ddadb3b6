"""`sh run.sh methods` and friends as reported: two commands writing one table, Ctrl-C with --jobs, a killed worker,
`--methods ,`, a run's exit code kept, seeds beyond the generators' range, and a TBPS-CLIP run's label in `sh run.sh
serve`. Each ends with the right behaviour or one `error:` line and a non-zero exit."""
import csv
import os
import signal
import subprocess
import sys
import time

import pytest

from helpers import ROOT, SMOKE_CONFIG, assert_one_error_line, run_entry
from processor import methods as M
from processor.parallel_runs import Run, run_side_by_side
import train
from tools import methods as tool
from tools import run_preset

TINY_RUN = ["--pretrain_choice", "ViT-Tiny", "--img_size", "32", "16", "--text_length", "32", "--num_epoch", "1",
            "--warmup_epochs", "0", "--batch_size", "8", "--test_batch_size", "64", "--precision", "fp32",
            "--eval_period", "1"]
BIG = "99999999999999999999"  # beyond 2**64: torch.manual_seed raised OverflowError once training began
SEED_MAX = str(2 ** 63 - 1)

# Plug-ins (custom_imports) imported by every run, in the worker processes too: a NaN loss from the first step;
# a run of any method but PHP that never ends (until interrupted); a worker that is killed as it starts its run.
NAN_LOSS = """
from processor import training
_build = training.build_model

def build_model(cfg, num_classes, **kw):
    model = _build(cfg, num_classes, **kw)
    forward = model.forward

    def poisoned(batch):
        out = forward(batch)
        if model.training:
            for key in [k for k in out if k.endswith("_loss")]:
                out[key] = out[key] * float("nan")
        return out
    model.forward = poisoned
    return model
training.build_model = build_model
"""
ONLY_PHP_ENDS = """
import time
from processor import presets
_train = presets.train

def train(cfg, *args):
    if not cfg.name.startswith("php"):
        time.sleep(600)
    return _train(cfg, *args)
presets.train = train
"""
KILLED = "import os, signal\nos.kill(os.getpid(), signal.SIGKILL)\n"


def plugin(folder, name, text):
    path = folder / f"{name}.py"
    path.write_text(text)
    return str(path)


def read_csv(path):
    with open(path, newline="") as f:
        return {r["method"]: r for r in csv.DictReader(f)}


def methods_command(*args):
    return [sys.executable, "-m", "tools.methods", *args]


# ------------------------------------------------------------------------- 1. two commands, one table
def test_rows_another_command_wrote_meanwhile_are_kept(tiny_root, tmp_path):
    out = tmp_path / "logs"
    configs = M.method_configs(os.path.join(ROOT, "configs"), M.select_methods(["PHP"]), None,
                               {"root_dir": tiny_root, "output_dir": str(out)})
    older = M.MethodRow("RDE", "rde_demo", 1, note="an earlier table's row")
    M.write_tables([older], str(out), "methods", [])
    os.utime(out / "methods.csv", (time.time() - 60, time.time() - 60))
    table = M._Table(configs, [[configs[0][2]]], "sh run.sh methods --methods PHP", "methods", 1)
    table.finish(0, 2, "some failure")
    assert list(read_csv(out / "methods.csv")) == ["PHP"]  # a table older than this command is replaced
    other = M.MethodRow("IRRA", "irra_demo", 2, mean={"R1": 50.0}, std={"R1": 1.5}, epochs=1, wall_seconds=60,
                        note="")
    M.write_tables([other], str(out), "methods", [])  # another command, while this one runs
    table.finish(0, 2, "some failure")
    rows = read_csv(out / "methods.csv")
    assert list(rows) == ["IRRA", "PHP"]
    assert rows["IRRA"]["R1_mean"] == "50.0000" and rows["IRRA"]["R1_std"] == "1.5000" and rows["IRRA"]["seeds"] == "2"
    assert "Rows of IRRA: from another `sh run.sh methods`" in (out / "methods.md").read_text()


@pytest.mark.slow
def test_two_commands_at_once_both_table_the_run_one_of_them_trained(tiny_root, tmp_path):
    out = tmp_path / "logs"
    argv = methods_command("--methods", "PHP", "--jobs", "1", "--root_dir", tiny_root, "--output_dir", str(out),
                           *TINY_RUN)
    first, second = (subprocess.Popen(argv, cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
                     for _ in range(2))
    done = [p.communicate(timeout=300) + (p.returncode,) for p in (first, second)]
    assert [code for _, _, code in done] == [0, 0], done
    assert sum("in use by" in stdout for stdout, _, _ in done) >= 1  # one of them waited for the other
    row = read_csv(out / "methods.csv")["PHP"]
    assert row["note"] == "" and row["seeds"] == "1" and float(row["R1_mean"]) >= 0


# ------------------------------------------------------------------------------------- 2. Ctrl-C
def live_processes(group):
    """The processes of process group `group` that are still running (not zombies)."""
    found = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{pid}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[2]) == group and fields[0] != "Z":
            found.append(int(pid))
    return found


def wait_for(condition, seconds):
    deadline = time.time() + seconds
    while not condition():
        assert time.time() < deadline, "timed out"
        time.sleep(0.2)


@pytest.mark.slow
@pytest.mark.parametrize("to_group", [True, False], ids=["group", "parent"])
def test_ctrl_c_stops_every_run_and_writes_the_rows_done(tiny_root, tmp_path, to_group):
    """IRRA, RDE and TBPS-CLIP never end; at --jobs 2 TBPS-CLIP is still queued when Ctrl-C comes after PHP's row.
    With Ctrl-C to the parent alone, PHP is not waited for: nothing was done, so no table is written."""
    out = tmp_path / "logs"
    hang = plugin(tmp_path, "only_php_ends", ONLY_PHP_ENDS if to_group else ONLY_PHP_ENDS.replace('"php"', '"-"'))
    command = subprocess.Popen(methods_command("--jobs", "2", "--root_dir", tiny_root, "--output_dir", str(out),
                                               "--custom_imports", hang, *TINY_RUN),
                               cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                               start_new_session=True)
    try:
        if to_group:
            wait_for(lambda: (out / "methods.csv").exists(), 120)
        else:
            wait_for(lambda: len(list((out / "methods_console").glob("*.txt"))) == 2, 120)
            time.sleep(1)  # both runs under way
        sent = time.time()
        (os.killpg if to_group else os.kill)(command.pid, signal.SIGINT)
        stdout, stderr = command.communicate(timeout=60)
        assert time.time() - sent < 20
    finally:
        if command.poll() is None or live_processes(command.pid):
            os.killpg(command.pid, signal.SIGKILL)
    assert command.returncode == 130 and stderr.strip().splitlines()[-1] == "interrupted", stderr
    wait_for(lambda: not live_processes(command.pid), 10)  # no worker outlives the command
    if not to_group:
        assert not (out / "methods.csv").exists()
        return
    rows = read_csv(out / "methods.csv")
    assert float(rows["PHP"]["R1_mean"]) >= 0 and rows["PHP"]["note"] == ""
    assert [rows[m]["note"] for m in ("IRRA", "RDE", "TBPS-CLIP")] == ["interrupted: 0 of 1 runs ended"] * 3
    assert not (out / "methods_console" / "tbps_demo.txt").exists()  # never started


# ------------------------------------------------------------------------------------ 3. a killed worker
@pytest.mark.slow
def test_a_killed_worker_fails_its_run_alone(tmp_path):
    runs = [Run("killed", {"custom_imports": [plugin(tmp_path, "killed", KILLED)]}, "", str(tmp_path / "k.txt")),
            Run("bad lr", {"lr": "fast"}, "", str(tmp_path / "lr.txt")),
            Run("bad name", {"name": "../x"}, "", str(tmp_path / "name.txt"))]
    results = run_side_by_side(runs, 2, lambda i, r: None, cores=2)
    assert [r.code for r in results] == [137, 2, 2]
    assert "killed by SIGKILL" in results[0].error
    assert "option 'lr'" in results[1].error and "option 'name'" in results[2].error


# ----------------------------------------------------------------------------------- 4. --methods ,
@pytest.mark.parametrize("names", ["", ",", " , "])
def test_methods_naming_no_method_is_one_line(tmp_path, capsys, names):
    out = tmp_path / "logs"
    code, err = run_entry(tool.main, ["--methods", names, "--paper", "rstp", "--root_dir", str(tmp_path),
                                      "--output_dir", str(out)], capsys)
    assert_one_error_line(code, err, "--methods names no method", "IRRA, PHP, RDE, TBPS-CLIP")
    assert not out.exists()


# ----------------------------------------------------------------------------- 5. a run's exit code
@pytest.mark.parametrize("jobs", ["1", pytest.param("2", marks=pytest.mark.slow)])
def test_a_non_finite_loss_exits_4_as_train_py_does(tiny_root, tmp_path, jobs, monkeypatch):
    from processor import training
    monkeypatch.setattr(training, "build_model", training.build_model)  # the plug-in's patch ends with the test
    out = tmp_path / "logs"
    nan = plugin(tmp_path, "nan_loss", NAN_LOSS)
    code = tool.main(["--methods", "PHP", "--jobs", jobs, "--root_dir", tiny_root, "--output_dir", str(out),
                      "--custom_imports", nan, *TINY_RUN])
    note = read_csv(out / "methods.csv")["PHP"]["note"]
    assert code == 4 and note.startswith("exit code 4: non-finite loss at epoch 1, iteration 1"), note


# --------------------------------------------------------------------------- 6. seeds beyond the range
@pytest.mark.parametrize("main, argv, option", [
    (train.main, ["--config_file", SMOKE_CONFIG, "--seed", BIG], "--seed"),
    (run_preset.main, ["--config_file", SMOKE_CONFIG, "--seed", BIG], "--seed"),
    (run_preset.main, ["--config_file", SMOKE_CONFIG, "--seeds", "1", BIG], "--seeds"),
    (tool.main, ["--methods", "PHP", "--jobs", "1", "--seed", BIG], "--seed"),
    (tool.main, ["--methods", "PHP", "--jobs", "1", f"--seeds={str(2 ** 63)}"], "--seeds"),
])
def test_a_seed_beyond_the_generators_range_is_one_line(tiny_root, tmp_path, capsys, main, argv, option):
    out = tmp_path / "logs"
    code, err = run_entry(main, [*argv, "--root_dir", tiny_root, "--output_dir", str(out), *TINY_RUN], capsys)
    assert_one_error_line(code, err, f"{option} takes seeds from 0 to {SEED_MAX} (2**63 - 1); got ")
    assert not out.exists()
    from utils.cli import parse_command_line
    accepted = parse_command_line(train.COMMAND, ["--seed", SEED_MAX])
    assert M.build_config(SMOKE_CONFIG, accepted.overrides).seed == 2 ** 63 - 1


# -------------------------------------------------------------------------- 7. serve's label of a run
def test_a_tbps_clip_reference_run_is_labelled_by_its_method(tmp_path):
    from evaluation.search import load_runs
    from test_tbps import write_reference_run
    folder = tmp_path / "CUHK-PEDES" / "tbps_reference"
    write_reference_run(str(folder))
    [run] = load_runs([str(folder / "config.yaml")], device="cpu", no_cache=True)
    assert run.name == "TBPS-CLIP" and run.loaded.cfg.name == "run"  # the option's default, which it never set
    [named] = load_runs([str(folder / "config.yaml")], device="cpu", overrides={"name": "mine"}, no_cache=True)
    assert named.name == "mine"
