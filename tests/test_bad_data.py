"""Bad data never corrupts a run: each problem in a data set (a link loop among the images, an empty caption, an
annotation file nested too deep, an id too large for int64, a Demo-PEDES folder generated with another seed) stops
train.py with one `error:` line naming the file and entry at fault, before anything is written to the run folder;
the healthy files around the bad one stay usable.
"""
import json
import os
import re
import shutil

import pytest

from datasets import demo_pedes
from helpers import TINY, assert_one_error_line, build_dataset, run_dir, run_entry, train_argv, tree
import train
from utils.errors import UserError

ONE_EPOCH = ["--num_epoch", "1", "--warmup_epochs", "0"]  # the runs that succeed: only their data matters


@pytest.fixture
def data_root(tiny_root, tmp_path):
    """A private copy of the tiny Demo-PEDES (seed 0) to damage; returns (root, annotation path, its entries)."""
    root = str(tmp_path / "data")
    shutil.copytree(os.path.join(tiny_root, "Demo-PEDES"), os.path.join(root, "Demo-PEDES"))
    ann = os.path.join(root, "Demo-PEDES", "reid_raw.json")
    with open(ann, encoding="utf-8") as f:
        return root, ann, json.load(f)


@pytest.fixture
def tiny_generator(monkeypatch):
    """Generation as build_dataset does it (seed and folder), at the tiny size; returns the calls it got."""
    real, calls = demo_pedes.generate_demo_pedes, []

    def generate(dataset_dir, seed=0):
        calls.append((dataset_dir, seed))
        real(dataset_dir, seed=seed, **TINY)

    monkeypatch.setattr(demo_pedes, "generate_demo_pedes", generate)
    return calls


def write_entries(ann, entries):
    with open(ann, "w", encoding="utf-8") as f:
        json.dump(entries, f)


def train_fails(root, tmp_path, capsys, *culprits):
    """train.py on `root` exits with one error line naming `culprits`, having written nothing."""
    out = str(tmp_path / "out")
    code, err = run_entry(train.main, train_argv(root, out), capsys)
    line = assert_one_error_line(code, err, *culprits)
    assert not os.path.exists(out)  # no run folder: no configs.yaml describing a run that never was
    return line, out


def image_path(root, entry):
    return os.path.join(root, "Demo-PEDES", "imgs", entry["file_path"])


# --------------------------------------------------------------------------------------------- link loops
@pytest.mark.parametrize("link", ["loop", "broken"])
def test_bad_link_is_the_only_missing_image(data_root, tmp_path, capsys, link):
    root, _, entries = data_root
    bad = image_path(root, entries[1])
    os.remove(bad)
    os.symlink(bad if link == "loop" else bad + ".gone", bad)  # `ln -s $PWD/x.jpg x.jpg`: a link to itself
    line, _ = train_fails(root, tmp_path, capsys, f"1 image(s) listed in {root}", f": {bad};")
    assert line.count(".jpg") == 1  # its healthy neighbours in imgs/train are not listed


def test_skip_missing_images_drops_only_the_looping_link(data_root, tmp_path, capsys):
    root, _, entries = data_root
    bad = image_path(root, entries[1])
    os.remove(bad)
    os.symlink(bad, bad)
    out = str(tmp_path / "out")
    with pytest.warns(UserWarning, match=f"dropping 1 image.*{re.escape(bad)}"):
        code, err = run_entry(train.main, train_argv(root, out, "--skip_missing_images", "true", *ONE_EPOCH),
                              capsys)
    assert code == 0, err
    with open(os.path.join(run_dir(out), "train_log.txt"), encoding="utf-8") as f:
        log = f.read()
    # 8 training identities, 2 images each: 15 images and 30 captions are left of 16 and 32.
    assert re.search(r"\|\s*train\s*\|\s*8\s*\|\s*15\s*\|\s*30\s*\|", log), log
    with pytest.warns(UserWarning, match="dropping 1 image"):
        ds = build_dataset("Demo-PEDES", root, skip_missing_images=True)
    assert bad not in {p[2] for p in ds.train} and len({p[2] for p in ds.train}) == 15


# -------------------------------------------------------------------------------------------- annotations
@pytest.mark.parametrize("caption", ["", " \t\n"])
def test_blank_caption_names_file_entry_and_caption(data_root, tmp_path, capsys, caption):
    root, ann, entries = data_root
    entries[5]["captions"][1] = caption
    write_entries(ann, entries)
    line, _ = train_fails(root, tmp_path, capsys, f"{ann}: entry 5 (counting from 0): caption 1 (counting from 0)")
    assert ("is empty" if caption == "" else "is only white space") in line


@pytest.mark.parametrize("pid", [2 ** 63, -2 ** 63 - 1, 10 ** 30])
def test_id_beyond_int64_names_the_entry(data_root, tmp_path, capsys, pid):
    root, ann, entries = data_root
    entries[3]["id"] = pid
    write_entries(ann, entries)
    train_fails(root, tmp_path, capsys, f"{ann}: entry 3 (counting from 0): 'id'", "signed 64-bit")


def test_ids_at_the_int64_limits_are_accepted(data_root):
    root, ann, entries = data_root
    test = [e for e in entries if e["split"] == "test"]
    for e, pid in zip(test, (2 ** 63 - 1, 2 ** 63 - 1, -2 ** 63, -2 ** 63)):
        e["id"] = pid
    write_entries(ann, entries)
    assert sorted(set(build_dataset("Demo-PEDES", root).test["image_pids"])) == [-2 ** 63, 2 ** 63 - 1]


@pytest.mark.parametrize("content, problem", [
    ("[" * 100_000 + "]" * 100_000, "JSON nested too deeply"),
    ('[{"id": ' + "9" * 5000 + "}]", "not usable JSON: Exceeds the limit (4300 digits)"),
], ids=["nested_100000_deep", "integer_of_5000_digits"])
def test_unparsable_annotation_file_is_one_line(data_root, tmp_path, capsys, content, problem):
    root, ann, _ = data_root
    with open(ann, "w", encoding="utf-8") as f:
        f.write(content)
    line, _ = train_fails(root, tmp_path, capsys, f"{ann}: {problem}")
    assert len(line) < 400


# ---------------------------------------------------------------------------------------- Demo-PEDES seed
def test_another_demo_seed_gets_its_own_set(data_root, tmp_path, capsys, tiny_generator):
    root, ann, _ = data_root
    with open(ann, "rb") as f:
        seed0 = f.read()
    out = str(tmp_path / "out")
    code, err = run_entry(train.main, train_argv(root, out, "--demo_seed", "7", *ONE_EPOCH), capsys)
    assert code == 0, err
    seed7 = os.path.join(root, "Demo-PEDES_seed7")
    assert tiny_generator == [(seed7, 7)]
    with open(os.path.join(seed7, "generator.json"), encoding="utf-8") as f:
        assert json.load(f)["seed"] == 7
    with open(ann, "rb") as f:
        assert f.read() == seed0  # the seed-0 set is left as it was
    with open(os.path.join(run_dir(out), "configs.yaml"), encoding="utf-8") as f:
        assert "demo_seed: 7\n" in f.read()
    ds = build_dataset("Demo-PEDES", root, demo_seed=7)
    assert ds.dataset_dir == seed7 and all(p.startswith(seed7 + os.sep) for p in ds.test["img_paths"])
    assert tiny_generator == [(seed7, 7)]  # found, not generated again


def test_set_generated_with_another_seed_is_refused(tmp_path, capsys, tiny_generator):
    root = str(tmp_path / "data")
    folder = os.path.join(root, "Demo-PEDES_seed7")
    demo_pedes.generate_demo_pedes(folder, seed=3)  # e.g. a folder renamed by hand
    out = str(tmp_path / "out")
    code, err = run_entry(train.main, train_argv(root, out, "--demo_seed", "7"), capsys)
    assert_one_error_line(code, err, folder, "demo_seed 3", "not 7")
    assert not os.path.exists(out)
    assert tiny_generator == [(folder, 3)]  # the folder is refused, not regenerated over


def test_set_without_generation_record_counts_as_seed_0(data_root, tiny_generator):
    root, ann, _ = data_root
    os.remove(os.path.join(root, "Demo-PEDES", "generator.json"))  # as sets generated before the record
    assert build_dataset("Demo-PEDES", root).dataset_dir == os.path.join(root, "Demo-PEDES")
    shutil.copytree(os.path.join(root, "Demo-PEDES"), os.path.join(root, "Demo-PEDES_seed2"))
    with pytest.raises(UserError, match="Demo-PEDES_seed2 holds Demo-PEDES generated with demo_seed 0 .*, not 2"):
        build_dataset("Demo-PEDES", root, demo_seed=2)
    assert tiny_generator == []


@pytest.mark.parametrize("record", ["{", '{"seed": "7"}', "[]"])
def test_unreadable_generation_record_is_one_line(data_root, record):
    root, _, _ = data_root
    path = os.path.join(root, "Demo-PEDES", "generator.json")
    with open(path, "w", encoding="utf-8") as f:
        f.write(record)
    with pytest.raises(UserError, match=f"^{re.escape(path)}: .*; delete .*Demo-PEDES to regenerate it$"):
        build_dataset("Demo-PEDES", root)


def test_negative_demo_seed_is_refused(tmp_path, tiny_generator):
    with pytest.raises(UserError, match="demo_seed = -1; expected a non-negative integer"):
        build_dataset("Demo-PEDES", str(tmp_path), demo_seed=-1, generate=True)
    assert tiny_generator == [] and os.listdir(tmp_path) == []


def test_bad_data_leaves_a_resumed_run_as_it_was(data_root, tmp_path, capsys):
    root, ann, entries = data_root
    out = str(tmp_path / "out")
    code, err = run_entry(train.main, train_argv(root, out, *ONE_EPOCH), capsys)
    assert code == 0, err
    before = tree(run_dir(out))
    assert {"configs.yaml", "train_log.txt", "last.pth"} <= set(before)
    entries[0]["captions"][0] = ""
    write_entries(ann, entries)
    code, err = run_entry(train.main, train_argv(root, out, "--resume", "true", "--num_epoch", "2",
                                                 "--warmup_epochs", "0"), capsys)
    assert_one_error_line(code, err, f"{ann}: entry 0 (counting from 0): caption 0")
    assert tree(run_dir(out)) == before  # configs.yaml, train_log.txt, checkpoints: all as they were
