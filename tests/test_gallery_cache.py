"""The gallery cache file is checked, not trusted: edited or damaged features are re-embedded, never used; the
temporary files of killed cache writers are removed, those of running writers kept."""
import glob
import os
import signal
import sys
import time

import pytest
import torch
import torch.nn.functional as F

from evaluation import gallery_cache
from evaluation.gallery_cache import Gallery, features_sha256
from helpers import retrieve_cli
from utils import files

ARGS = ("--caption", "3", "--query", "a man in a blue jacket", "--topk", "5")


def only_cache_file(folder):
    [path] = glob.glob(os.path.join(folder, "gallery-*.pt"))
    return path


def consistent(data, feats):
    """`data` with `feats` and their matching checksum, shape and dtype: only the checks of the features' content
    (not of their bookkeeping) can tell."""
    data.update(feats=feats, sha256=features_sha256(feats), shape=list(feats.shape),
                dtype=str(feats.dtype).replace("torch.", ""))


def other_width(data):
    feats = data["feats"]
    consistent(data, F.normalize(torch.randn(feats.shape[0], feats.shape[1] + 3), dim=-1))


def float64(data):
    consistent(data, data["feats"].double())


def nan_row(data):
    feats = data["feats"].clone()
    feats[5] = float("nan")
    consistent(data, feats)


def reordered_rows(data):
    data["feats"] = data["feats"].flip(0).contiguous()  # same bytes, other rows: only the checksum can tell


def flip_bits(path, feats):
    """Flip the lowest mantissa bit of 10 stored feature values in the file itself (a change of about 1e-7)."""
    raw = bytearray(open(path, "rb").read())
    start = raw.find(feats.numpy().tobytes())
    assert start > 0
    for i in range(10):
        raw[start + 4 * 37 * i] ^= 1
    with open(path, "wb") as f:
        f.write(raw)


@pytest.mark.parametrize("edit, reason", [
    pytest.param(other_width, "expected [80, {width}] (the gallery's 80 images x the model's feature width "
                 "{width})", id="other-width"),
    pytest.param(float64, "its features are float64, expected float32", id="float64"),
    pytest.param(nan_row, "{width} of its feature values are NaN or infinite", id="nan"),
    pytest.param(reordered_rows, "do not match their sha256 checksum", id="reordered"),
    pytest.param("flip_bits", "do not match their sha256 checksum", id="bits-flipped"),
])
def test_edited_cache_is_rebuilt_with_a_warning(run_copy, demo_root, tmp_path, capsys, encode_calls, edit, reason):
    args = ("--root_dir", demo_root, *ARGS, "--out", str(tmp_path / "r.png"))
    code, (fresh, _), _ = retrieve_cli(capsys, run_copy, *args)
    assert code == 0 and encode_calls["images"] == 80
    path = only_cache_file(os.path.join(run_copy, "cache"))
    data = torch.load(path, weights_only=True)
    width = data["feats"].shape[1]
    if edit == "flip_bits":
        flip_bits(path, data["feats"])
    else:
        edit(data)
        torch.save(data, path)  # the key, paths and file name stay right

    encode_calls["images"] = 0
    code, (lines, _), err = retrieve_cli(capsys, run_copy, *args)
    assert code == 0 and encode_calls["images"] == 80
    assert lines == fresh  # the hits and scores of a fresh embedding
    assert f"ignoring gallery cache {path}: " in err and reason.format(width=width) in err
    assert "embedded now, cache written" in err

    # The rewritten cache is intact: used without a warning.
    encode_calls["images"] = 0
    code, (lines, _), err = retrieve_cli(capsys, run_copy, *args)
    assert code == 0 and encode_calls["images"] == 0 and lines == fresh
    assert "ignoring" not in err and only_cache_file(os.path.join(run_copy, "cache")) == path


def start_writer(folder, die):
    """Fork a process that starts a real cache write in `folder` and, mid-write, is killed with SIGKILL (`die`)
    or waits to be killed. Returns its pid once its temporary file exists; a killed writer is reaped."""
    ready_r, ready_w = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child never returns into pytest
        try:
            def interrupted_save(obj, f):
                f.write(b"PK partial")
                f.flush()
                os.write(ready_w, b"1")
                if die:
                    os.kill(os.getpid(), signal.SIGKILL)
                time.sleep(60)

            gallery_cache.torch.save = interrupted_save
            gallery_cache._write(os.path.join(folder, "gallery-000000000000-0.pt"), "key",
                                 Gallery(["a.jpg"], "test"), torch.zeros(1, 4))
        finally:
            os._exit(1)
    os.close(ready_w)
    assert os.read(ready_r, 1) == b"1"
    os.close(ready_r)
    if die:
        _, status = os.waitpid(pid, 0)
        assert os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGKILL
    return pid


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs os.fork")
def test_temp_files_of_killed_writers_are_removed(run_copy, demo_root, tmp_path, capsys):
    folder = str(tmp_path / "cache")
    os.makedirs(folder)
    dead = start_writer(folder, die=True)
    live = start_writer(folder, die=False)
    try:
        [dead_tmp] = glob.glob(os.path.join(folder, f".gallery-000000000000-0.pt.{dead}-*.tmp"))
        [live_tmp] = glob.glob(os.path.join(folder, f".gallery-000000000000-0.pt.{live}-*.tmp"))
        # Names that are not temporaries of a cache write: kept, whatever their age.
        other_file, unrelated = (os.path.join(folder, name) for name in (f".notes.pt.{dead}-ab12.tmp", "notes.tmp"))
        for path in (other_file, unrelated):
            open(path, "wb").close()

        code, _, err = retrieve_cli(capsys, run_copy, "--root_dir", demo_root, *ARGS, "--cache_dir", folder,
                                    "--out", str(tmp_path / "r.png"))
        assert code == 0
        left = set(glob.glob(os.path.join(folder, "*")) + glob.glob(os.path.join(folder, ".*")))
        assert left == {live_tmp, other_file, unrelated, only_cache_file(folder)}
        assert f"removed {dead_tmp}, left by an interrupted gallery cache write (its writer, process {dead}, " \
               f"is gone)" in err
        assert live_tmp not in err and other_file not in err
    finally:
        os.kill(live, signal.SIGKILL)
        os.waitpid(live, 0)


def test_pid_check():
    assert files._pid_alive(os.getpid())
    assert not files._pid_alive(0) and not files._pid_alive(10 ** 30)
    if sys.platform.startswith("linux"):
        with open("/proc/sys/kernel/pid_max") as f:
            assert not files._pid_alive(int(f.read()) + 1)
