"""Every bad input ends with a non-zero exit, one `error: ...` line on stderr that names the culprit, and no
traceback (unless --debug). The entry points run in-process through `run_main`, as their `__main__` does.
"""
import json
import os
import shutil
import traceback

import pytest
import torch

from helpers import SMOKE, assert_one_error_line, run_dir, run_entry, train_argv, tree
import test as test_entry
import train
from utils.checkpoint import read_checkpoint, save_checkpoint
from utils.cli import run_main
from utils.config import build_config, save_config
from utils.errors import UserError


@pytest.fixture
def run_folder(tmp_path, tiny_root):
    """A run folder holding only configs.yaml (of the smoke config on the tiny set)."""
    folder = tmp_path / "run"
    save_config(build_config(SMOKE, {"root_dir": tiny_root}), str(folder / "configs.yaml"))
    return folder


class Payload:
    """Unpickling this object calls open(marker, 'w'): proof of execution if the marker file appears."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return open, (self.marker, "w")


def test_missing_data_root(tmp_path, capsys):
    missing = str(tmp_path / "no_such_root")
    code, err = run_entry(train.main, train_argv(missing, str(tmp_path), "--dataset_name", "CUHK-PEDES"), capsys)
    assert_one_error_line(code, err, f"data root {missing} does not exist")


@pytest.mark.parametrize("where", ["command line", "file"])
def test_unknown_option(tmp_path, capsys, where):
    if where == "file":
        config = str(tmp_path / "typo.yaml")
        with open(SMOKE) as f, open(config, "w") as g:
            g.write(f.read() + "lrr: 1.0e-4\n")
        code, err = run_entry(train.main, ["--config_file", config], capsys)
        assert_one_error_line(code, err, f"{config}: unknown option 'lrr'; did you mean 'lr'?")
    else:
        code, err = run_entry(train.main, ["--config_file", SMOKE, "--lrr", "1e-4"], capsys)
        assert_one_error_line(code, err, "command line: unknown option '--lrr'; did you mean 'lr'?")
        code, err = run_entry(train.main, ["--confg_file", SMOKE], capsys)
        assert_one_error_line(code, err, "unknown option '--confg_file'; did you mean '--config_file'?")


def test_missing_config_file_and_debug(tmp_path, capsys):
    missing = str(tmp_path / "nope.yaml")
    code, err = run_entry(train.main, ["--config_file", missing], capsys)
    assert_one_error_line(code, err, f"config file not found: {missing}")
    with pytest.raises(UserError, match="config file not found"):  # --debug: the exception and its traceback
        run_main(train.main, ["--config_file", missing, "--debug"])


def test_missing_pretrained_weights(tiny_root, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("HOME", str(tmp_path))  # so ~/.cache/clip holds nothing either
    empty = tmp_path / "pretrained"
    empty.mkdir()
    code, err = run_entry(train.main, train_argv(tiny_root, str(tmp_path / "out"), "--pretrain_choice", "ViT-B/16",
                                                 "--pretrained_dir", str(empty)), capsys)
    assert_one_error_line(code, err, "pretrained CLIP weights for 'ViT-B/16' not found",
                          os.path.join(str(empty), "ViT-B-16.pt"), "--pretrain_choice")


def test_run_folder_without_best_pth(run_folder, capsys):
    code, err = run_entry(test_entry.main, ["--config_file", str(run_folder / "configs.yaml")], capsys)
    assert_one_error_line(code, err, f"run folder {run_folder} has no best.pth")


@pytest.mark.parametrize("content", ["text", "truncated", "empty"])
def test_best_pth_that_is_not_a_checkpoint(run_folder, capsys, content):
    best = str(run_folder / "best.pth")
    if content == "truncated":  # a half-copied checkpoint
        save_checkpoint({"model": {"w": torch.zeros(1000)}, "epoch": 1}, best)
        with open(best, "rb") as f:
            data = f.read()
        with open(best, "wb") as f:
            f.write(data[:len(data) // 2])
    else:
        with open(best, "w") as f:
            f.write("" if content == "empty" else "weights are on the shared drive\n")
    code, err = run_entry(test_entry.main, ["--config_file", str(run_folder / "configs.yaml")], capsys)
    expected = {"text": "not a PyTorch checkpoint", "truncated": "damaged or incomplete checkpoint",
                "empty": "empty file, not a checkpoint"}[content]
    assert_one_error_line(code, err, f"{best}: {expected}")


def test_checkpoint_needing_arbitrary_unpickling_is_refused(run_folder, tmp_path, capsys):
    marker = str(tmp_path / "payload_ran")
    best = str(run_folder / "best.pth")
    torch.save({"model": Payload(marker), "epoch": 1}, best)
    code, err = run_entry(test_entry.main, ["--config_file", str(run_folder / "configs.yaml")], capsys)
    assert_one_error_line(code, err, best, "refused", "--trust_checkpoint")
    assert not os.path.exists(marker)
    read_checkpoint(best, trusted=True)  # the opt-in really unpickles: the payload was live
    assert os.path.exists(marker)


@pytest.fixture(scope="module")
def corrupt_root(tiny_root, tmp_path_factory):
    """The tiny set with one training image overwritten by bytes that start like a JPEG and are not one."""
    root = str(tmp_path_factory.mktemp("corrupt"))
    shutil.copytree(os.path.join(tiny_root, "Demo-PEDES"), os.path.join(root, "Demo-PEDES"))
    with open(os.path.join(root, "Demo-PEDES", "reid_raw.json")) as f:
        entry = next(e for e in json.load(f) if e["split"] == "train")
    image = os.path.join(root, "Demo-PEDES", "imgs", entry["file_path"])
    with open(image, "wb") as f:
        f.write(b"\xff\xd8\xff\xe0" + b"half-copied" * 20)
    return root, image


@pytest.mark.parametrize("workers", [0, 2])
def test_corrupt_training_image(corrupt_root, tmp_path, capsys, workers):
    """With loader workers, torch re-raises a worker's error with the worker's traceback in its message; the user
    still gets the one line."""
    root, image = corrupt_root
    code, err = run_entry(train.main, train_argv(root, str(tmp_path), "--num_workers", str(workers)), capsys)
    assert_one_error_line(code, err, f"cannot read image {image}")
    assert not os.path.exists(os.path.join(run_dir(str(tmp_path)), "last.pth"))


def test_worker_error_keeps_its_traceback_for_debug():
    class Broken(torch.utils.data.Dataset):
        def __len__(self):
            return 2

        def __getitem__(self, i):
            raise UserError(f"cannot read image /data/{i}.jpg: broken")
    try:  # not pytest.raises, see run_entry
        next(iter(torch.utils.data.DataLoader(Broken(), num_workers=1)))
    except UserError as e:
        message, notes = str(e), "".join(e.__notes__)
        traceback.clear_frames(e.__traceback__)  # as run_main does: the worker stops now, not at a GC
    assert message == "cannot read image /data/0.jpg: broken"
    assert "Original Traceback" in notes and "in DataLoader worker process 0" in notes


def test_malformed_dataset_json(tmp_path, capsys):
    folder = tmp_path / "CUHK-PEDES"
    (folder / "imgs").mkdir(parents=True)
    (folder / "reid_raw.json").write_text('[\n {"id": 1, "file_path": "a.jpg",\n  "captions": ["x"] "split": '
                                          '"train"}\n]\n')
    code, err = run_entry(train.main, train_argv(str(tmp_path), str(tmp_path / "out"), "--dataset_name",
                                                 "CUHK-PEDES"), capsys)
    assert_one_error_line(code, err, f"{folder / 'reid_raw.json'}: not valid JSON at line 3, column 21")


# ------------------------------------------------------------------ options that used to give tracebacks
@pytest.mark.parametrize("extra, culprit", [
    (["--device", "gpu"], "option 'device' must be auto, cpu, cuda or cuda:N; got 'gpu'"),
    (["--lr", "nan"], "option 'lr' expects a finite number, got 'nan'"),
    (["--lr", "-1"], "option 'lr' must be positive; got -1.0"),
    (["--num_workers", "-1"], "option 'num_workers' must be 0 or more; got -1"),
    (["--name", "../../../escaped"], "option 'name' must be a plain folder name"),
    (["--name", ".."], "option 'name' must be a plain folder name"),
    (["--batch_size", "5000"], "the training split gives no full batch: 32 samples for batch_size 5000"),
], ids=["device", "lr-nan", "lr-negative", "workers", "name-escapes", "name-dotdot", "batch-too-large"])
def test_bad_option_values_write_nothing(tiny_root, tmp_path, capsys, extra, culprit):
    out = tmp_path / "out"
    code, err = run_entry(train.main, train_argv(tiny_root, str(out), *extra), capsys)
    assert_one_error_line(code, err, culprit)
    assert not out.exists()


@pytest.mark.parametrize("extra, culprit", [(["--device", "gpu"], "option 'device' must be"),
                                            (["--num_workers", "-1"], "option 'num_workers' must be 0 or more")])
def test_bad_options_of_test_py(smoke_run, capsys, extra, culprit):
    before = tree(smoke_run)
    code, err = run_entry(test_entry.main, ["--config_file", os.path.join(smoke_run, "configs.yaml"), *extra], capsys)
    assert_one_error_line(code, err, culprit)
    assert tree(smoke_run) == before


@pytest.mark.parametrize("text, culprit", [
    (b"name: null\n", "option 'name' expects a string, got nothing (null)"),
    (b"lr: 3.0e-4\nname: caf\xe9\n", "not UTF-8 text (byte offset"),
    (b"", "the config file is empty"),
    (b"# only a comment\n", "the config file is empty"),
    (b"lr: 1.0e-4\nbatch_size: 8\nlr: 2.0e-4\n", "option 'lr' is given twice (first at line 1)"),
], ids=["name-null", "not-utf8", "empty", "comment-only", "duplicate-key"])
def test_bad_config_files_write_nothing(tiny_root, tmp_path, capsys, text, culprit):
    config = tmp_path / "bad.yaml"
    config.write_bytes(text)
    out = tmp_path / "out"
    code, err = run_entry(train.main, ["--config_file", str(config), "--root_dir", tiny_root, "--output_dir",
                                       str(out)], capsys)
    assert_one_error_line(code, err, str(config), culprit)
    assert not out.exists()


def test_yaml_alias_bomb_is_quoted_in_bounded_form(tmp_path, capsys):
    """Nine levels of nine aliases: 9^9 (387 million) numbers if walked; the message quotes a prefix only."""
    levels = ["&l0 [1, 2, 3, 4, 5, 6, 7, 8, 9]"]
    for i in range(1, 9):
        levels.append(f"&l{i} [" + ", ".join([f"*l{i - 1}"] * 9) + "]")
    config = tmp_path / "bomb.yaml"
    config.write_text("lr: [" + ", ".join(levels) + "]\n")
    code, err = run_entry(train.main, ["--config_file", str(config), "--output_dir", str(tmp_path / "out")], capsys)
    line = assert_one_error_line(code, err, "option 'lr' expects a number, got [[1, 2, 3, 4, ...], [[")
    assert len(line) < 300 and not (tmp_path / "out").exists()


def test_plain_pickle_needing_code_names_what_it_would_run(run_folder, capsys):
    """A `pickle.dump` file (protocol 4 frames, which torch's safe loader cannot read at all) is refused with what
    it would import and the opt-in flag, not as 'not a PyTorch checkpoint'."""
    import pickle
    best = str(run_folder / "best.pth")
    with open(best, "wb") as f:
        pickle.dump({"model": Payload(str(run_folder / "ran"))}, f, protocol=4)
    code, err = run_entry(test_entry.main, ["--config_file", str(run_folder / "configs.yaml")], capsys)
    assert_one_error_line(code, err, best, "refused, loading it would import and run 'io.open'", "--trust_checkpoint")
    assert not (run_folder / "ran").exists()
