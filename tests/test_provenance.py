"""Provenance: test results and training history name the code, files and versions they came from, and every look
at a run's test split is logged."""
import datetime
import hashlib
import json
import os
import shutil
import subprocess

import pytest
import torch

from evaluation.eval_log import LOG_NAME, append_evaluation, count_test_evaluations, read_log
from evaluation.testing import write_results
from processor import training
import test as test_entry
import train
from utils.cli import run_main
from utils.provenance import PROJECT_ROOT, code_and_data, git_state, sha256_file

PROVENANCE_KEYS = {"commit", "dirty", "checkpoint_sha256", "config_sha256", "annotations_sha256", "torch",
                   "open_clip", "device", "precision", "date", "seconds", "plugins_sha256"}
needs_git = pytest.mark.skipif(shutil.which("git") is None, reason="git is not installed")


def file_sha256(path):
    with open(path, "rb") as f:
        return hashlib.sha256(f.read()).hexdigest()


def project_head():
    return subprocess.run(["git", "-C", PROJECT_ROOT, "rev-parse", "HEAD"], capture_output=True, text=True,
                          check=True).stdout.strip()


def annotations_of(demo_root):
    return os.path.join(demo_root, "Demo-PEDES", "reid_raw.json")


def copy_run(smoke_run, folder):
    """A copy of the smoke run without the results other tests may have left in it."""
    shutil.copytree(smoke_run, folder)
    for name in (LOG_NAME, "test_results.json"):
        if os.path.exists(os.path.join(folder, name)):
            os.unlink(os.path.join(folder, name))
    return str(folder)


def run_test_py(run_dir, demo_root, *extra):
    with pytest.raises(SystemExit) as done:
        run_main(test_entry.main, ["--config_file", os.path.join(run_dir, "configs.yaml"), "--root_dir", demo_root,
                                   *extra])
    assert done.value.code == 0
    with open(os.path.join(run_dir, "test_results.json")) as f:
        return json.load(f)


@pytest.fixture(scope="module")
def tested_run(smoke_run, demo_root, tmp_path_factory):
    """A copy of the smoke run (fp32) after one `test.py --precision bf16` and one `test.py --audit`."""
    run_dir = copy_run(smoke_run, tmp_path_factory.mktemp("tested") / "run")
    run_test_py(run_dir, demo_root, "--precision", "bf16")
    return run_dir, run_test_py(run_dir, demo_root, "--audit")


def check_provenance(provenance, run_dir, demo_root, precision):
    assert set(provenance) == PROVENANCE_KEYS
    assert provenance["checkpoint_sha256"] == file_sha256(os.path.join(run_dir, "best.pth"))
    assert provenance["config_sha256"] == file_sha256(os.path.join(run_dir, "configs.yaml"))
    assert provenance["annotations_sha256"] == file_sha256(annotations_of(demo_root))
    assert provenance["torch"] == torch.__version__ and provenance["open_clip"]
    assert provenance["device"] == "cpu" and provenance["precision"] == precision
    date = datetime.datetime.fromisoformat(provenance["date"])
    assert date.utcoffset() == datetime.timedelta(0)
    assert abs((datetime.datetime.now(datetime.timezone.utc) - date).total_seconds()) < 600
    assert 0 < provenance["seconds"] < 600
    if shutil.which("git"):
        assert provenance["commit"] == project_head() and isinstance(provenance["dirty"], bool)


def test_test_results_carry_their_provenance(tested_run, demo_root):
    run_dir, results = tested_run
    check_provenance(results["provenance"], run_dir, demo_root, "bf16")
    # The audit keeps its own (it may be of another checkpoint or code than the plain test beside it), and it
    # embeds in fp32 whatever the run's precision.
    check_provenance(results["audit"]["provenance"], run_dir, demo_root, "fp32")
    assert results["checkpoint"] == os.path.join(run_dir, "best.pth")


@needs_git
def test_commit_is_the_checkouts_head():
    commit, dirty = git_state()
    assert commit == project_head() and len(commit) == 40
    assert isinstance(dirty, bool)


def test_each_look_at_the_test_split_is_logged(tested_run, smoke_run, demo_root, tmp_path):
    run_dir, results = tested_run
    entries = read_log(run_dir)
    assert [e["kind"] for e in entries] == ["test", "audit"]
    checkpoint = file_sha256(os.path.join(run_dir, "best.pth"))
    for entry in entries:
        assert entry["checkpoint_sha256"] == checkpoint and entry["compat"] == "none"
        datetime.datetime.fromisoformat(entry["time"])
    assert entries[0]["results"]["t2i"] == results["t2i"]
    assert entries[1]["results"] == results["audit"]["modes"]

    # --split val is no look at the test split; --i2t is one more.
    run_dir = copy_run(smoke_run, tmp_path / "run")
    run_test_py(run_dir, demo_root, "--split", "val")
    run_test_py(run_dir, demo_root, "--split", "val", "--audit")
    assert count_test_evaluations(run_dir) == 0 and not os.path.exists(os.path.join(run_dir, LOG_NAME))
    results = run_test_py(run_dir, demo_root, "--i2t")
    assert count_test_evaluations(run_dir) == 1
    assert read_log(run_dir)[0]["results"] == {"t2i": results["t2i"], "i2t": results["i2t"]}


def test_a_plain_test_replaces_an_earlier_ones_keys(tmp_path):
    path = str(tmp_path / "test_results.json")
    write_results(path, {"t2i": 1, "i2t": 2, "provenance": "old"})
    write_results(path, {"audit": {"provenance": "audit"}})
    write_results(path, {"t2i": 3, "provenance": "new"}, keep=("audit",))
    with open(path) as f:
        assert json.load(f) == {"t2i": 3, "provenance": "new", "audit": {"provenance": "audit"}}


def test_test_log_skips_corrupt_lines_and_never_joins_one(tmp_path):
    run_dir = str(tmp_path)
    log = tmp_path / LOG_NAME
    assert count_test_evaluations(run_dir) == 0
    append_evaluation(run_dir, kind="test", checkpoint_sha256="a" * 64, compat="none", results={"t2i": {"R1": 1}})
    # A torn last line (no newline): the next entry starts a line of its own.
    with open(log, "ab") as f:
        f.write(b'{"kind": "te\xff')
    entry = append_evaluation(run_dir, kind="audit", checkpoint_sha256="b" * 64, compat="php_v1", results={})
    lines = log.read_bytes().split(b"\n")
    assert len(lines) == 4 and lines[-1] == b""
    assert count_test_evaluations(run_dir) == 2
    assert read_log(run_dir)[1] == entry and entry["kind"] == "audit"
    log.write_text('[1]\n"x"\n{}\n\n{"nested": ' + "[" * 100000 + "\n")
    assert count_test_evaluations(run_dir) == 1
    with pytest.raises(ValueError):
        append_evaluation(run_dir, kind="val", checkpoint_sha256="", compat="none", results={})


def test_sha256_file_streams_the_whole_file(tmp_path):
    data = os.urandom(3 * 2**20 + 17)
    (tmp_path / "blob").write_bytes(data)
    assert sha256_file(str(tmp_path / "blob")) == hashlib.sha256(data).hexdigest()


@needs_git
def test_dirty_flag(tmp_path, monkeypatch):
    # Outside a checkout means: git must not find one above tmp_path either.
    monkeypatch.setenv("GIT_CEILING_DIRECTORIES", str(tmp_path))
    repo = tmp_path / "repo"
    repo.mkdir()
    assert git_state(str(repo)) == (None, None)

    def git(*args):
        subprocess.run(["git", "-C", str(repo), "-c", "user.name=t", "-c", "user.email=t@t",
                        "-c", "commit.gpgsign=false", *args],
                       check=True, capture_output=True)

    git("init", "-q")
    (repo / "code.py").write_text("x = 1\n")
    (repo / ".gitignore").write_text("*.log\n")
    git("add", "code.py", ".gitignore")
    git("commit", "-q", "-m", "one")
    head = subprocess.run(["git", "-C", str(repo), "rev-parse", "HEAD"], capture_output=True, text=True,
                          check=True).stdout.strip()
    assert git_state(str(repo)) == (head, False)
    (repo / "ignored.log").write_text("ignored files are not code\n")
    assert git_state(str(repo)) == (head, False)
    (repo / "code.py").write_text("x = 2\n")
    assert git_state(str(repo)) == (head, True)
    (repo / "code.py").write_text("x = 1\n")
    assert git_state(str(repo)) == (head, False)
    (repo / "my_loss.py").write_text("# a plug-in beside the code\n")
    assert git_state(str(repo)) == (head, True)


def test_no_git_fails_nothing(tmp_path, monkeypatch):
    monkeypatch.setenv("PATH", str(tmp_path))
    assert git_state() == (None, None)
    assert code_and_data(None) == {"commit": None, "dirty": None, "annotations_sha256": None, "plugins_sha256": {}}


def test_history_records_code_and_data_per_epoch(smoke_run, demo_root, tmp_path, monkeypatch):
    with open(os.path.join(smoke_run, "history.json")) as f:
        history = json.load(f)
    annotations = file_sha256(annotations_of(demo_root))
    for record in history:
        assert record["annotations_sha256"] == annotations
        if shutil.which("git"):
            assert record["commit"] == project_head() and isinstance(record["dirty"], bool)

    # Resumed on other code: the new epoch says so, the earlier ones keep what they were trained with.
    run_dir = copy_run(smoke_run, tmp_path / "logs" / "Demo-PEDES" / "smoke")
    other = {"commit": "0" * 40, "dirty": True, "annotations_sha256": annotations}
    monkeypatch.setattr(training, "code_and_data", lambda annotation_file, plugins=(): dict(other))
    with pytest.raises(SystemExit) as done:
        run_main(train.main, ["--config_file", os.path.join(run_dir, "configs.yaml"), "--root_dir", demo_root,
                              "--output_dir", str(tmp_path / "logs"), "--resume", "--num_epoch", "3",
                              "--tensorboard", "false"])
    assert done.value.code == 0
    with open(os.path.join(run_dir, "history.json")) as f:
        resumed = json.load(f)
    assert resumed[:2] == history
    assert resumed[2]["epoch"] == 3 and {k: resumed[2][k] for k in other} == other
