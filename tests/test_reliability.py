"""Reliability (issue 8): a SIGKILLed run resumes bit for bit, checkpoint files survive a kill during their write or
a full disk, non-finite losses stop the run (or are skipped as configured), and the output folder is checked
before training. The bad inputs are in tests/test_bad_inputs.py.
"""
from collections import namedtuple
import io
import itertools
import multiprocessing
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time

import pytest
import torch

from helpers import ITERS, ROOT, assert_one_error_line, run_dir, run_entry, train_argv
from processor import training
import train
from utils.checkpoint import read_checkpoint, remove_partial_checkpoints, save_checkpoint
from utils.cli import run_main
from utils.errors import UserError


# ------------------------------------------------------------------------------------------ kill and resume
class Run:
    """A `train.py` subprocess of the tiny 3-epoch run; its stdout and stderr go to files in its output folder.

    With `when_told`, the process starts (and imports) now but trains only after `go()`.
    """

    def __init__(self, root, out, workers, *extra, when_told=False):
        os.makedirs(out, exist_ok=True)
        self.out, self.folder, self.name = out, run_dir(out), f"workers{workers}{''.join(extra)}"
        self.logs = [open(os.path.join(out, f"{self.name}.{k}"), "w+") for k in ("stdout", "stderr")]
        script = os.path.join(ROOT, "tests", "train_when_told.py") if when_told else os.path.join(ROOT, "train.py")
        cmd = [sys.executable, script, *train_argv(root, out, "--num_epoch", "3", "--num_workers", str(workers),
                                                   *extra)]
        self.proc = subprocess.Popen(cmd, cwd=ROOT, stdout=self.logs[0], stderr=self.logs[1],
                                     stdin=subprocess.PIPE if when_told else None)

    def go(self):
        self.proc.stdin.write(b"go\n")
        self.proc.stdin.close()
        return self

    def finish(self, timeout=900):
        """(exit code, stdout, stderr) once the process has ended."""
        try:
            code = self.proc.wait(timeout)
        finally:
            if self.proc.poll() is None:
                self.proc.kill()
                self.proc.wait()
        texts = []
        for log in self.logs:
            log.seek(0)
            texts.append(log.read())
            log.close()
        return code, texts[0], texts[1]


def kill_after_epoch(run, epoch, timeout=900):
    """SIGKILL `run` as soon as its last.pth of `epoch` appears; returns (exit code, stdout, stderr, {name: epoch}
    of its best.pth and last.pth as read back after the kill)."""
    last, seen, deadline = os.path.join(run.folder, "last.pth"), None, time.time() + timeout
    while run.proc.poll() is None and time.time() < deadline:
        stamp = os.stat(last).st_mtime_ns if os.path.exists(last) else None
        if stamp != seen:
            seen = stamp
            if read_checkpoint(last)["epoch"] >= epoch:
                break
        time.sleep(0.01)
    run.proc.send_signal(signal.SIGKILL)
    code, out, err = run.finish(60)
    saved = {n: read_checkpoint(os.path.join(run.folder, f"{n}.pth"))["epoch"] for n in ("best", "last")}
    return code, out, err, saved


@pytest.fixture(scope="module")
def resume_chain(tiny_root, tmp_path_factory):
    """An uninterrupted run (0 loader workers) and, beside it, the same run SIGKILLed twice: after epoch 1 (with 2
    workers), then, resumed with 0 workers, after epoch 2; then resumed with 2 workers to the end."""
    base = str(tmp_path_factory.mktemp("resume"))
    reference = Run(tiny_root, os.path.join(base, "reference"), 0)
    chain = os.path.join(base, "killed")
    # The resumed runs start up while the runs before them train, and train once those have been killed.
    runs = [reference, Run(tiny_root, chain, 2), Run(tiny_root, chain, 0, "--resume", when_told=True),
            Run(tiny_root, chain, 2, "--resume", when_told=True)]
    try:
        kills = [kill_after_epoch(runs[1], 1), kill_after_epoch(runs[2].go(), 2)]
        resumed = runs[3].go().finish()
        code, _, err = reference.finish()
        assert code == 0, f"the uninterrupted run failed: {err}"
    finally:
        for run in runs:
            if run.proc.poll() is None:
                run.proc.kill()
                run.proc.wait()
    return {"reference": reference.folder, "folder": run_dir(chain), "kills": kills, "resumed": resumed}


@pytest.mark.slow
def test_kills_leave_loadable_checkpoints(resume_chain):
    for (code, out, err, saved), epoch in zip(resume_chain["kills"], (1, 2)):
        assert code == -signal.SIGKILL, err
        assert saved["last"] == epoch and 1 <= saved["best"] <= epoch  # both read back without error
    assert "after epoch 1" in resume_chain["kills"][1][1]  # the second part resumed from the first kill


def test_resume_after_sigkill_is_bit_exact(resume_chain):
    """The twice-killed run ends with exactly the weights of the uninterrupted one; its parts used 2, 0 and 2
    loader workers, the uninterrupted run none, so the worker count is shown to change nothing as well."""
    code, out, err = resume_chain["resumed"]
    assert code == 0, err
    assert "resumed from" in out and "after epoch 2" in out
    want, got = (read_checkpoint(os.path.join(folder, "last.pth"))
                 for folder in (resume_chain["reference"], resume_chain["folder"]))
    assert got["epoch"] == want["epoch"] == 3
    assert list(got["model"]) == list(want["model"])
    differing = [k for k in want["model"] if not torch.equal(want["model"][k], got["model"][k])]
    assert differing == [], f"{len(differing)} of {len(want['model'])} tensors differ, e.g. {differing[:3]}"
    assert [h["losses"] for h in got["history"]] == [h["losses"] for h in want["history"]]


# ------------------------------------------------------------------------------------------ kill during a write
def _in_child(target, *args):
    """Start `target(*args)` in a forked process (which the tests kill, or which kills itself); returns it."""
    child = multiprocessing.get_context("fork").Process(target=target, args=args)
    child.start()
    return child


def _torn_write(path, obj):
    real_save = torch.save

    def half_then_die(o, f):
        buffer = io.BytesIO()
        real_save(o, buffer)
        f.write(buffer.getvalue()[:len(buffer.getvalue()) // 2])
        f.flush()
        os.kill(os.getpid(), signal.SIGKILL)
    torch.save = half_then_die  # only in this child process
    save_checkpoint(obj, path)


def _written_not_renamed(path, obj):
    os.replace = lambda *a: os.kill(os.getpid(), signal.SIGKILL)  # only in this child process
    save_checkpoint(obj, path)


def _write_forever(folder, states):
    # The states come made: a forked child must not use torch's (OpenMP) thread pool, which fill kernels do.
    for epoch in itertools.count(2):
        save_checkpoint(states[epoch % 2], os.path.join(folder, "best.pth" if epoch % 2 else "last.pth"))


def _writing(folder, min_bytes):
    """Whether a temporary checkpoint file of at least `min_bytes` is in `folder` right now."""
    for entry in os.scandir(folder):
        try:
            if entry.name.endswith(".tmp") and entry.stat().st_size >= min_bytes:
                return True
        except FileNotFoundError:  # renamed meanwhile
            pass
    return False


def _stuck_write(path, obj):
    def write_then_wait(o, f):
        f.write(b"PK partial")
        f.flush()
        time.sleep(600)
    torch.save = write_then_wait  # only in this child process
    save_checkpoint(obj, path)


def state(epoch, numel=1000):
    return {"model": {"w": torch.arange(numel, dtype=torch.float32) + epoch}, "epoch": epoch}


def assert_intact(folder, epochs=(1,)):
    for name in ("best.pth", "last.pth"):
        ckpt = read_checkpoint(os.path.join(folder, name))
        assert ckpt["epoch"] in epochs
        assert torch.equal(ckpt["model"]["w"], state(ckpt["epoch"], ckpt["model"]["w"].numel())["model"]["w"])


@pytest.mark.parametrize("how", [_torn_write, _written_not_renamed])
@pytest.mark.parametrize("name", ["best.pth", "last.pth"])
def test_kill_during_checkpoint_write_keeps_both_files(tmp_path, how, name):
    for n in ("best.pth", "last.pth"):
        save_checkpoint(state(1), str(tmp_path / n))
    child = _in_child(how, str(tmp_path / name), state(2))
    child.join(60)
    assert child.exitcode == -signal.SIGKILL
    assert_intact(str(tmp_path))
    partial = [n for n in os.listdir(tmp_path) if n not in ("best.pth", "last.pth")]
    assert len(partial) == 1 and partial[0].startswith(f".{name}.")
    if how is _torn_write:
        with pytest.raises(UserError, match="damaged or incomplete checkpoint"):
            read_checkpoint(str(tmp_path / partial[0]))
    assert remove_partial_checkpoints(str(tmp_path)) == partial
    assert sorted(os.listdir(tmp_path)) == ["best.pth", "last.pth"]


def test_partial_checkpoint_of_a_running_save_is_kept(tmp_path):
    child = _in_child(_stuck_write, str(tmp_path / "last.pth"), state(1))
    try:
        deadline = time.time() + 60
        while time.time() < deadline and not _writing(str(tmp_path), 1):
            time.sleep(0.01)
        [live] = os.listdir(tmp_path)
        assert live.startswith(f".last.pth.{child.pid}-") and live.endswith(".tmp")
        # Left by an earlier process that had this process's pid (a restarted container's processes get the same
        # pids), and a file of no writer of this project's (no pid in its name): only the first goes.
        leftover, foreign = f".best.pth.{os.getpid()}-0a1b2c3d.tmp", ".best.pth.0a1b2c3d.tmp"
        for name in (leftover, foreign):
            (tmp_path / name).write_bytes(b"PK partial")
        assert remove_partial_checkpoints(str(tmp_path)) == [leftover]
        assert sorted(os.listdir(tmp_path)) == sorted([live, foreign])
    finally:
        child.kill()
        child.join(60)


def test_kill_at_a_random_moment_of_large_writes(tmp_path):
    """A real SIGKILL from outside while torch.save is writing a 32 MB checkpoint (no patching)."""
    numel = 8 * 2**20
    for n in ("best.pth", "last.pth"):
        save_checkpoint(state(1, numel), str(tmp_path / n))
    child = _in_child(_write_forever, str(tmp_path), [state(2, numel), state(3, numel)])
    deadline = time.time() + 120
    while time.time() < deadline and not _writing(str(tmp_path), 2**20):
        time.sleep(0.002)
    os.kill(child.pid, signal.SIGKILL)
    child.join(60)
    assert child.exitcode == -signal.SIGKILL and time.time() < deadline
    assert_intact(str(tmp_path), epochs=range(1, 10**6))
    assert len(remove_partial_checkpoints(str(tmp_path))) == 1


def test_full_disk_during_a_checkpoint_write(tmp_path, monkeypatch):
    path = str(tmp_path / "last.pth")
    save_checkpoint(state(1), path)

    def no_space(obj, f):
        raise OSError(28, "No space left on device")
    monkeypatch.setattr(torch, "save", no_space)
    with pytest.raises(UserError, match=r"cannot write checkpoint .*last.pth \(No space left on device\); the "
                                        r"previous file is kept"):
        save_checkpoint(state(2), path)
    monkeypatch.undo()
    assert os.listdir(tmp_path) == ["last.pth"] and read_checkpoint(path)["epoch"] == 1


# ------------------------------------------------------------------------------------------ non-finite losses
def poison(monkeypatch, steps, term="sdm_loss"):
    """Make the model's loss `term` NaN at the given training steps (counted from 1 over the whole run)."""
    build = training.build_model

    def build_poisoned(cfg, num_classes):
        model = build(cfg, num_classes)
        forward, calls = model.forward, itertools.count(1)

        def poisoned(batch):
            out = forward(batch)
            if model.training and next(calls) in steps:
                out[term] = out[term] * float("nan")
            return out
        model.forward = poisoned
        return model
    monkeypatch.setattr(training, "build_model", build_poisoned)


@pytest.mark.parametrize("tolerated,steps,stops_at", [(0, {ITERS + 2}, (2, 2)), (1, {2, ITERS + 3}, (2, 3)),
                                                      (2, {2, ITERS + 3}, None)])
def test_non_finite_loss(tiny_root, tmp_path, monkeypatch, capsys, tolerated, steps, stops_at):
    poison(monkeypatch, steps)
    out = str(tmp_path)
    code, err = run_entry(train.main, train_argv(tiny_root, out, "--skip_nonfinite_steps", str(tolerated)), capsys)
    last = read_checkpoint(os.path.join(run_dir(out), "last.pth"))
    if stops_at is None:
        assert code == 0 and last["epoch"] == 2 and last["nonfinite_steps"] == 2
        return
    line = assert_one_error_line(code, err, f"epoch {stops_at[0]}, iteration {stops_at[1]}", "sdm_loss=nan",
                                 run_dir(out))
    assert code == 4 and line.startswith("error: non-finite loss")
    # The epoch-1 checkpoints are kept, and hold finite weights.
    assert last["epoch"] == 1 and read_checkpoint(os.path.join(run_dir(out), "best.pth"))["epoch"] == 1
    assert all(torch.isfinite(v).all() for v in last["model"].values() if v.is_floating_point())


# ------------------------------------------------------------------------------------------ the output folder
def _train_as_nobody(argv, conn):
    if os.geteuid() == 0:  # root writes anywhere; an ordinary user is who a read-only folder stops
        os.setgid(65534)
        os.setuid(65534)
    sys.stderr = io.StringIO()
    try:
        run_main(train.main, argv)
    except BaseException as e:  # noqa: BLE001 - whatever happens, the parent must hear of it
        conn.send((getattr(e, "code", repr(e)), sys.stderr.getvalue()))


@pytest.fixture
def open_tmp():
    """A temporary folder that other users may enter (pytest's tmp_path is private to its owner)."""
    folder = tempfile.mkdtemp(prefix="reliability-")
    os.chmod(folder, 0o755)
    yield folder
    shutil.rmtree(folder, ignore_errors=True)


def test_read_only_output_folder(tiny_root, open_tmp):
    out = os.path.join(open_tmp, "read_only")
    os.mkdir(out, 0o555)
    # The user the child becomes may not be able to read a checkout in a private folder: give it a copy.
    argv = train_argv(tiny_root, out)
    config = os.path.join(open_tmp, "smoke.yaml")
    shutil.copy(argv[argv.index("--config_file") + 1], config)
    os.chmod(config, 0o644)
    argv[argv.index("--config_file") + 1] = config
    receive, send = multiprocessing.get_context("fork").Pipe(duplex=False)
    child = _in_child(_train_as_nobody, argv, send)
    assert receive.poll(300), "the training process did not report"
    code, err = receive.recv()
    child.join(60)
    assert_one_error_line(code, err, f"output folder {run_dir(out)} is not writable", "Permission denied")
    assert os.listdir(out) == []


def test_output_folder_without_space(tiny_root, tmp_path, monkeypatch, capsys):
    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(shutil, "disk_usage", lambda path: usage(2**40, 2**40 - 50 * 2**20, 50 * 2**20))
    out = str(tmp_path)
    code, err = run_entry(train.main, train_argv(tiny_root, out), capsys)
    assert_one_error_line(code, err, f"output folder {run_dir(out)} has 0.05 GiB free but checkpoints need about")
    assert not os.path.exists(run_dir(out))  # stopped before anything was written
