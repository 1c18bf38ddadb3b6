"""An existing run folder is changed by nothing that fails: a refused resume, a start refused on a later check, a
second writer, a full disk during a save. Each case hashes the run's files before and after."""
import os
import shutil
import signal
import subprocess
import sys
import textwrap

import pytest
import torch

from helpers import assert_one_error_line, run_entry, train_argv, tree
import train
from utils.checkpoint import read_checkpoint, save_checkpoint
from utils.errors import UserError


@pytest.fixture(scope="module")
def finished(tiny_root, tmp_path_factory):
    """A finished 2-epoch smoke run on the tiny set: (data root, output folder)."""
    out = str(tmp_path_factory.mktemp("finished"))
    code = train.main(train_argv(tiny_root, out))
    assert code == 0
    return tiny_root, out


@pytest.fixture
def copy_of(finished, tmp_path):
    """copy_of(name): the finished run copied to <tmp>/logs/Demo-PEDES/<name> (its configs.yaml still says 'smoke')."""
    root, out = finished

    def copy(name):
        target = tmp_path / "logs" / "Demo-PEDES" / name
        shutil.copytree(os.path.join(out, "Demo-PEDES", "smoke"), target)
        return str(target)
    return copy


def test_resume_with_a_changed_model_option_is_refused(finished, copy_of, tmp_path, capsys):
    root = finished[0]
    out = str(tmp_path / "logs")
    original, copy = copy_of("smoke"), copy_of("smokeR")
    before = {original: tree(original), copy: tree(copy)}
    code, err = run_entry(train.main, train_argv(root, out, "--name", "smokeR", "--resume", "--cnum", "8"), capsys)
    assert_one_error_line(code, err, "--resume: the options differ from", "cnum (4 -> 8)")
    # The folder's own resume command: its configs.yaml names the run 'smoke', which is finished.
    code, err = run_entry(train.main, ["--config_file", os.path.join(copy, "configs.yaml"), "--root_dir", root,
                                       "--output_dir", out, "--resume"], capsys)
    assert code == 0
    assert before == {original: tree(original), copy: tree(copy)}


def test_resume_from_a_config_outside_the_run_folder_is_refused(finished, copy_of, tmp_path, capsys):
    root = finished[0]
    copy = copy_of("smokeX")
    with open(os.path.join(copy, "configs.yaml")) as f:
        text = f.read().replace("name: smoke\n", "name: smokeX\n")
    with open(os.path.join(copy, "configs.yaml"), "w") as f:
        f.write(text)
    other = tmp_path / "otherrun"
    other.mkdir()
    (other / "configs.yaml").write_text(text.replace("lr: 0.0003\n", "lr: 1.0e-05\n"))
    before = tree(copy)
    code, err = run_entry(train.main, ["--config_file", str(other / "configs.yaml"), "--root_dir", root,
                                       "--output_dir", str(tmp_path / "logs"), "--resume", "--num_epoch", "3"], capsys)
    assert_one_error_line(code, err, "lr (0.0003 -> 1e-05)", os.path.join(copy, "configs.yaml"))
    assert tree(copy) == before


def test_a_start_refused_on_a_later_check_changes_nothing(finished, copy_of, tmp_path, capsys):
    root = finished[0]
    copy = copy_of("smoke")
    before = tree(copy)
    code, err = run_entry(train.main, train_argv(root, str(tmp_path / "logs"), "--overwrite", "--num_epoch", "1"), capsys)
    assert_one_error_line(code, err, "option 'warmup_epochs' (1) must be smaller than num_epoch (1)")
    assert tree(copy) == before


def test_resume_extends_a_run_with_a_mutable_option(finished, copy_of, tmp_path, capsys):
    root = finished[0]
    copy = copy_of("smoke")
    code, _ = run_entry(train.main, train_argv(root, str(tmp_path / "logs"), "--resume", "--num_epoch", "3",
                                         "--log_period", "1"), capsys)
    assert code == 0 and read_checkpoint(os.path.join(copy, "last.pth"))["epoch"] == 3
    with open(os.path.join(copy, "configs.yaml")) as f:
        assert "num_epoch: 3\n" in f.read()
    assert not os.path.exists(os.path.join(copy, ".lock"))  # released


HOLD = textwrap.dedent("""
    import os, sys, time
    from utils.runlock import RunLock
    with RunLock(sys.argv[1], "holder.py"):
        if sys.argv[2] == "fork" and os.fork() == 0:
            time.sleep(300)  # a forked child (a data-loader worker) that outlives its parent, the lock's fd inherited
            os._exit(0)
        print("locked", flush=True)
        time.sleep(300)
""")


def hold_lock(folder, fork=False):
    proc = subprocess.Popen([sys.executable, "-c", HOLD, folder, "fork" if fork else "-"],
                            stdout=subprocess.PIPE, text=True, start_new_session=True)
    assert proc.stdout.readline().strip() == "locked"
    return proc


def test_a_killed_holder_releases_the_lock_even_if_its_forked_children_live_on(tmp_path):
    from utils.runlock import RunLock
    folder = str(tmp_path / "run")
    holder = hold_lock(folder, fork=True)
    try:
        with pytest.raises(UserError, match="is in use by holder.py"):
            with RunLock(folder, "second"):
                pass
        holder.send_signal(signal.SIGKILL)
        holder.wait()
        with RunLock(folder, "second"):  # the child still has the file open, but holds no lock
            assert "second" in open(os.path.join(folder, ".lock")).read()
    finally:
        os.killpg(holder.pid, signal.SIGKILL)


def test_a_second_writer_is_refused_and_a_dead_holder_taken_over(finished, copy_of, tmp_path, capsys):
    root = finished[0]
    copy = copy_of("smoke")
    holder = hold_lock(copy)
    try:
        before = tree(copy)
        code, err = run_entry(train.main, train_argv(root, str(tmp_path / "logs"), "--resume", "--num_epoch", "3"), capsys)
        assert_one_error_line(code, err, f"run folder {copy} is in use by holder.py (pid {holder.pid}")
        assert tree(copy) == before
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
    # The holder died holding the lock: the next writer takes it over and says so.
    code, err = run_entry(train.main, train_argv(root, str(tmp_path / "logs"), "--resume", "--num_epoch", "3"), capsys)
    out = capsys.readouterr().out
    assert code == 0 and read_checkpoint(os.path.join(copy, "last.pth"))["epoch"] == 3
    log = open(os.path.join(copy, "train_log.txt")).read()
    assert f"taking over the lock of holder.py (pid {holder.pid}" in log + out + err


def test_a_full_disk_during_a_save_keeps_the_previous_checkpoints(tiny_root, tmp_path, monkeypatch, capsys):
    """torch reports a full disk as RuntimeError from its zip writer; the run stops with one line and the files of
    epoch 1 stay whole (best.pth and last.pth are written as one)."""
    real_save, calls = torch.save, []

    def fills_up(obj, f, *args, **kwargs):
        calls.append(obj.get("epoch"))
        if obj.get("epoch") == 2:
            f.write(b"PK\x03\x04" + b"\0" * 1000)
            raise RuntimeError("[enforce fail at inline_container.cc:672] . PytorchStreamWriter failed writing file "
                               "data/12: file write failed")
        return real_save(obj, f, *args, **kwargs)
    monkeypatch.setattr(torch, "save", fills_up)
    out = str(tmp_path)
    folder = os.path.join(out, "Demo-PEDES", "smoke")
    code, err = run_entry(train.main, train_argv(tiny_root, out), capsys)
    assert_one_error_line(code, err, f"cannot write checkpoint {folder}/last.pth (", "PytorchStreamWriter failed",
                          "the previous file is kept")
    assert calls == [1, 2]
    assert sorted(n for n in os.listdir(folder) if n.endswith(".pth") or n.endswith(".tmp")) == ["best.pth",
                                                                                                "last.pth"]
    assert read_checkpoint(os.path.join(folder, "last.pth"))["epoch"] == 1
    assert read_checkpoint(os.path.join(folder, "best.pth"))["epoch"] == 1


FILL = textwrap.dedent("""
    import os, resource, signal, sys
    import torch
    from utils.checkpoint import save_checkpoint
    from utils.errors import UserError
    folder = sys.argv[1]
    save_checkpoint({"epoch": 1, "w": torch.zeros(1000)}, os.path.join(folder, "last.pth"))
    # From here on no file may grow beyond 64 KB: writes fail with EFBIG, as on a full disk.
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    resource.setrlimit(resource.RLIMIT_FSIZE, (65536, resource.RLIM_INFINITY))
    try:
        save_checkpoint({"epoch": 2, "w": torch.zeros(10**6)}, os.path.join(folder, "last.pth"),
                        also=[os.path.join(folder, "best.pth")])
    except UserError as e:
        print(e)
""")


@pytest.mark.slow
def test_a_real_failing_write_inside_the_serializer(tmp_path):
    """No patching: the file-size limit makes torch's own writer fail midway, as a full disk does."""
    done = subprocess.run([sys.executable, "-c", FILL, str(tmp_path)], capture_output=True,
                          text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith(f"cannot write checkpoint {tmp_path}/last.pth (")
    assert done.stdout.rstrip().endswith("; the previous file is kept")
    assert os.listdir(tmp_path) == ["last.pth"] and read_checkpoint(str(tmp_path / "last.pth"))["epoch"] == 1


def test_write_failure_message_is_one_line():
    with pytest.raises(UserError) as e:
        save_checkpoint({"w": torch.zeros(2)}, "/proc/no/such/place/last.pth")
    assert "\n" not in str(e.value) and "nothing was written" in str(e.value)


def test_a_full_disk_for_tensorboard_and_the_log_only_warns(tmp_path, capsys):
    """The events and the log file are conveniences: when their writes fail, training goes on (its checkpoint
    saves decide), with one warning each instead of a traceback per line."""
    import errno
    import logging

    from utils.event_log import EventLog
    from utils.logger import setup_logger

    logger = setup_logger(str(tmp_path / "train_log.txt"))
    file_handler = next(h for h in logger.handlers if hasattr(h, "baseFilename"))

    def no_space(*args, **kwargs):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
    file_handler.stream.write = no_space
    logger.info("first line")
    logger.info("second line")
    events = EventLog(str(tmp_path / "tensorboard"))
    events._writer.add_scalar = no_space
    events.scalar("train/loss", 1.0, 1)
    events.scalar("train/loss", 0.5, 2)
    events.close()
    out, err = capsys.readouterr()
    assert "Traceback" not in out + err and "Logging error" not in err
    assert out.count("cannot write the log file") == 1 and out.count("cannot write TensorBoard events") == 1
    assert "second line" in out and file_handler not in logger.handlers
    logging.getLogger("php").handlers.clear()


def test_a_run_made_before_options_were_retired_resumes(finished, copy_of, tmp_path, capsys):
    """configs.yaml and the checkpoint of an earlier version carry options since retired (world_size, training,
    MLM, ...); such a run resumes, the retired options dropped with a note."""
    import yaml
    root = finished[0]
    copy = copy_of("smoke")
    retired = {"training": True, "vocab_size": 49408, "MLM": False, "moe_lr_factor": 2.0,
               "transformer_lr_factor": 1.0, "distributed": False, "world_size": 1, "local_rank": 0}
    with open(os.path.join(copy, "configs.yaml")) as f:
        config = yaml.safe_load(f)
    config.pop("custom_imports"), config.pop("heads"), config.pop("annotation_file")
    with open(os.path.join(copy, "configs.yaml"), "w") as f:
        yaml.safe_dump({**config, **retired}, f)
    for name in ("last.pth", "best.pth"):
        ckpt = torch.load(os.path.join(copy, name), weights_only=True)
        ckpt["config"] = {**config, **retired}
        ckpt.pop("world_size")
        torch.save(ckpt, os.path.join(copy, name))
    code, err = run_entry(train.main, train_argv(root, str(tmp_path / "logs"), "--resume", "--num_epoch", "3"),
                          capsys)
    assert code == 0, err
    assert read_checkpoint(os.path.join(copy, "last.pth"))["epoch"] == 3
    with open(os.path.join(copy, "train_log.txt")) as f:
        assert "ignoring option(s) that mean nothing here: training (always true)" in f.read()
