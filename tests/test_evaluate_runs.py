"""`sh run.sh test` (tools/evaluate_runs.py): this project's run and published-layout runs, made by the tests."""
import csv
import json
import os
import shutil
import subprocess

import pytest

from helpers import run_tool
from published_layout import write_published_run
from evaluation.runs import check_overrides, discover_runs
from model.layouts import check_compat
from tools import evaluate_runs
from utils.cli import parse_command_line
from utils.cli import run_main
from utils.config import read_yaml
from utils.errors import UserError

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

PHP = os.path.join("logs", "CUHK-PEDES", "sdm+itc+aux_cnum9")
IRRA = os.path.join("logs", "ICFG-PEDES", "irra_icfg")
SMOKE = os.path.join("logs", "Demo-PEDES", "smoke")
BROKEN = os.path.join("logs", "Demo-PEDES", "broken")
MISSING = os.path.join("logs", "RSTPReid", "irra_rstp")
# The small published layouts use 64x32 images; Demo-PEDES stands in for the data sets they were trained on.
DEMO = {"dataset_name": "Demo-PEDES"}


@pytest.fixture(scope="module")
def workdir(tmp_path_factory, smoke_run):
    """A folder whose ./logs holds the smoke run, a published PHP and IRRA run, a broken run and one whose data
    set is missing."""
    work = str(tmp_path_factory.mktemp("evaluate_runs"))
    os.makedirs(os.path.join(work, SMOKE))
    for name in ("configs.yaml", "best.pth"):
        shutil.copy(os.path.join(smoke_run, name), os.path.join(work, SMOKE, name))
    write_published_run(os.path.join(work, PHP), "php_v1", **DEMO)
    write_published_run(os.path.join(work, IRRA), "irra", **DEMO)
    write_published_run(os.path.join(work, MISSING), "irra", dataset_name="RSTPReid")
    os.makedirs(os.path.join(work, BROKEN))
    shutil.copy(os.path.join(smoke_run, "configs.yaml"), os.path.join(work, BROKEN, "configs.yaml"))
    with open(os.path.join(work, BROKEN, "best.pth"), "w") as f:
        f.write("not a checkpoint\n")
    os.makedirs(os.path.join(work, "logs", "no_checkpoint"))  # not a run folder: no best.pth
    shutil.copy(os.path.join(smoke_run, "configs.yaml"), os.path.join(work, "logs", "no_checkpoint"))
    return work


def read_summary(cwd):
    with open(os.path.join(cwd, "logs", "summary.csv"), newline="") as f:
        rows = list(csv.reader(f))
    with open(os.path.join(cwd, "logs", "summary.md")) as f:
        markdown = f.read()
    return rows[0], [dict(zip(rows[0], r)) for r in rows[1:]], markdown


@pytest.fixture(scope="module")
def discovered(workdir, demo_root):
    """`sh run.sh test --root_dir <demo>` in workdir: every run under ./logs, options before no run folder."""
    mp = pytest.MonkeyPatch()
    try:
        code = run_tool(["--root_dir", demo_root, "--num_workers", "0"], workdir, mp)
    finally:
        mp.undo()
    return code, read_summary(workdir)


def test_discovers_every_run_and_reports_failures(discovered, demo_root):
    code, (header, rows, markdown) = discovered
    assert code == 1  # the broken run and the missing data set
    metrics = ["R1", "R5", "R10", "mAP", "mINP"]
    assert header == ["run", "dataset", "compat", *metrics, "n", *(f"{k}_{s}" for k in metrics for s in ("mean", "std")),
                      "noise", "commit", "checkpoint", "tested", "note"]
    assert [(r["run"], r["compat"]) for r in rows] == [
        (PHP, "php_v1"), (PHP, "none"), (BROKEN, "auto"), (SMOKE, "none"), (IRRA, "none"), (MISSING, "auto")]
    by_run = {(r["run"], r["compat"]): r for r in rows}
    for key in ((PHP, "php_v1"), (PHP, "none"), (SMOKE, "none"), (IRRA, "none")):
        row = by_run[key]
        assert row["dataset"] == "Demo-PEDES"
        assert all(0.0 <= float(row[m]) <= 100.0 for m in ("R1", "R5", "R10", "mAP", "mINP")), row
        assert float(row["R1"]) <= float(row["R5"]) <= float(row["R10"])
    assert "batch-dependent" in by_run[(PHP, "php_v1")]["note"]
    assert "test_batch_size 64" in by_run[(PHP, "php_v1")]["note"]
    broken = by_run[(BROKEN, "auto")]
    assert broken["R1"] == "" and broken["note"].startswith("error: ") and "best.pth" in broken["note"]
    assert "checkpoint" in broken["note"]
    missing = by_run[(MISSING, "auto")]
    assert missing["dataset"] == "RSTPReid" and missing["R1"] == ""
    assert missing["note"].startswith("error: ") and demo_root in missing["note"]
    assert markdown.startswith("| run | dataset | compat |")
    assert len(markdown.strip().splitlines()) == 2 + len(rows)
    assert "| - | - |" in markdown  # failed rows show '-' for their metrics


def test_project_run_matches_test_py(discovered, workdir, demo_root, monkeypatch):
    import test as test_entry
    run_dir = os.path.join(workdir, SMOKE)
    monkeypatch.chdir(workdir)
    with pytest.raises(SystemExit) as done:
        run_main(test_entry.main, ["--config_file", os.path.join(run_dir, "configs.yaml"), "--root_dir", demo_root])
    assert done.value.code == 0
    with open(os.path.join(run_dir, "test_results.json")) as f:
        expected = json.load(f)["t2i"]
    row = next(r for r in discovered[1][1] if r["run"] == SMOKE)
    for key, value in expected.items():
        assert float(row[key]) == pytest.approx(value, abs=1e-4), key


def test_php_rows_follow_their_protocol(discovered, workdir, demo_root, monkeypatch, tmp_path):
    """The php_v1 row depends on the test batch size (batch attention); the none row does not."""
    rows = {r["compat"]: r for r in discovered[1][1] if r["run"] == PHP}
    php_dir = os.path.join(workdir, PHP)
    # Run folder first, then options; the summary lands in the current folder's logs/, created for it.
    code = run_tool([php_dir, "--test_batch_size", "40", "--root_dir", demo_root], str(tmp_path), monkeypatch)
    assert code == 0
    _, again, _ = read_summary(str(tmp_path))
    again = {r["compat"]: r for r in again}
    assert [r["run"] for r in again.values()] == [php_dir, php_dir]  # outside the current folder: absolute
    metrics = ("R1", "R5", "R10", "mAP", "mINP")
    assert [again["none"][m] for m in metrics] == [rows["none"][m] for m in metrics]
    assert [again["php_v1"][m] for m in metrics] != [rows["php_v1"][m] for m in metrics]
    assert "test_batch_size 40" in again["php_v1"]["note"]


def test_compat_option_selects_one_mode(workdir, demo_root, monkeypatch, tmp_path):
    config = os.path.join(workdir, PHP, "configs.yaml")  # a run may be named by its configs.yaml too
    code = run_tool(["--compat", "none", config, "--root_dir", demo_root], str(tmp_path),
                    monkeypatch)
    assert code == 0
    _, rows, _ = read_summary(str(tmp_path))
    assert [(r["run"], r["compat"]) for r in rows] == [(os.path.join(workdir, PHP), "none")]


def parse(argv):
    """`sh run.sh test ARGV` parsed and checked as the tool does it before evaluating anything."""
    args = parse_command_line(evaluate_runs.COMMAND, argv)
    check_overrides(args.overrides)
    check_compat(args.compat or "auto")
    return args


def test_argument_order():
    args = parse(["A", "--root_dir", "X", "B", "--test_batch_size=5", "--debug", "C", "--img_aug", "--device", "cpu"])
    assert args.positionals == ["A", "B", "C"]
    assert args.overrides == {"root_dir": "X", "test_batch_size": "5", "img_aug": "true", "device": "cpu"}
    assert args.debug and not args.trust_checkpoint
    # The token after an option is its value, even when it looks like a run folder.
    assert parse(["--root_dir", "logs/x"]).positionals == []
    with pytest.raises(UserError, match="root_dri"):
        parse(["--root_dri", "X"])
    with pytest.raises(UserError, match="test_batch_size"):
        parse(["--test_batch_size", "many", "RUN"])
    with pytest.raises(UserError, match="compat"):
        parse(["--compat", "php_v2"])


def test_no_runs_is_an_error(tmp_path, monkeypatch, capsys):
    assert run_tool([], str(tmp_path), monkeypatch) == 2
    assert "no run folders under ./logs" in capsys.readouterr().err
    assert run_tool([str(tmp_path / "nowhere")], str(tmp_path), monkeypatch) == 1
    _, rows, _ = read_summary(str(tmp_path))
    assert rows[0]["note"] == f"error: run folder not found: {tmp_path / 'nowhere'}"


def test_discovery_needs_config_and_checkpoint(workdir, monkeypatch):
    monkeypatch.chdir(workdir)
    found = discover_runs()
    assert found == sorted([PHP, IRRA, SMOKE, BROKEN, MISSING])
    assert read_yaml(os.path.join(workdir, PHP, "configs.yaml"))["img_size"] == [64, 32]


@pytest.mark.slow
def test_run_sh_exit_status(workdir, demo_root, tmp_path):
    """Through `sh run.sh test`: a failing run makes the exit status 1, the table is still printed and written."""
    done = subprocess.run(["sh", os.path.join(ROOT, "run.sh"), "test", os.path.join(workdir, BROKEN),
                           "--root_dir", demo_root], cwd=str(tmp_path), capture_output=True, text=True,
                          timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert done.returncode == 1, done.stderr
    assert "| run | dataset | compat |" in done.stdout and "error: " in done.stdout
    assert (tmp_path / "logs" / "summary.md").is_file() and (tmp_path / "logs" / "summary.csv").is_file()
