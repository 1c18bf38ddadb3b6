"""build_dataset on annotation files written here: the three formats, pid remapping, hold-out, every check."""
import json
import os

import pytest

from datasets import DATASETS, demo_pedes
from datasets.base import DirectoryListing
from helpers import TINY, build_dataset
from utils.cli import run_main
from utils.errors import UserError

# (original id, file name, split) for a small CUHK-style set; ids deliberately unsorted and non-contiguous.
ROWS = [(7, "cam_a/a.jpg", "train"), (3, "cam_a/b.jpg", "train"), (7, "cam_b/c.jpg", "train"),
        (12, "cam_b/d.jpg", "val"), (20, "cam_a/e.jpg", "test"), (20, "cam_b/f.jpg", "test")]


def write_set(root, folder="CUHK-PEDES", ann="reid_raw.json", rows=ROWS, path_key="file_path", images=True,
              content=None):
    """Write `root/folder/imgs/...` (empty files) and the annotation file; return the annotation path."""
    base = os.path.join(root, folder)
    os.makedirs(os.path.join(base, "imgs"), exist_ok=True)
    entries = []
    for pid, rel, split in rows:
        entries.append({"split": split, "captions": [f"{rel} one", f"{rel} two"], path_key: rel, "id": pid})
        if images:
            os.makedirs(os.path.join(base, "imgs", os.path.dirname(rel)), exist_ok=True)
            open(os.path.join(base, "imgs", rel), "wb").close()
    path = os.path.join(base, ann)
    with open(path, "w", encoding="utf-8") as f:
        f.write(content if content is not None else json.dumps(entries, indent=1))
    return path


def test_cuhk_pairs_pids_and_splits(tmp_path):
    write_set(tmp_path)
    ds = build_dataset("CUHK-PEDES", str(tmp_path))
    img = os.path.join(str(tmp_path), "CUHK-PEDES", "imgs")
    assert ds.name == "CUHK-PEDES" and ds.dataset_dir == os.path.join(str(tmp_path), "CUHK-PEDES")
    # Original ids 3 and 7 become 0 and 1 (sorted by original id); image ids follow file order.
    def pair(pid, image_id, rel, which):
        return (pid, image_id, os.path.join(img, rel), f"{rel} {which}")

    assert ds.train == [pair(1, 0, "cam_a/a.jpg", "one"), pair(1, 0, "cam_a/a.jpg", "two"),
                        pair(0, 1, "cam_a/b.jpg", "one"), pair(0, 1, "cam_a/b.jpg", "two"),
                        pair(1, 2, "cam_b/c.jpg", "one"), pair(1, 2, "cam_b/c.jpg", "two")]
    assert ds.num_classes == 2 and ds.train_id_map == {0: 3, 1: 7}
    assert ds.val == {"image_pids": [12], "img_paths": [os.path.join(img, "cam_b/d.jpg")],
                      "caption_pids": [12, 12], "captions": ["cam_b/d.jpg one", "cam_b/d.jpg two"],
                      "caption_img_index": [0, 0]}
    assert ds.test["image_pids"] == [20, 20] and ds.test["caption_pids"] == [20, 20, 20, 20]
    assert ds.test["caption_img_index"] == [0, 0, 1, 1]
    assert ds.statistics() == {"train": (2, 3, 6), "val": (1, 1, 2), "test": (1, 2, 4)}
    table = ds.summary()
    assert table.field_names == ["subset", "ids", "images", "captions"]
    assert [r[0] for r in table.rows] == ["train", "val", "test"] and table.rows[2] == ["test", 1, 2, 4]


@pytest.mark.parametrize("ann", ["ICFG-PEDES.json", "ICFG_PEDES.json"])
def test_icfg_accepts_both_file_names_and_has_empty_val(tmp_path, ann):
    rows = [(0, "train/0/a.jpg", "train"), (1, "train/1/b.jpg", "train"), (5, "test/5/c.jpg", "test")]
    write_set(tmp_path, "ICFG-PEDES", ann, rows)
    ds = build_dataset("ICFG-PEDES", str(tmp_path))
    assert ds.num_classes == 2 and len(ds.train) == 4
    assert ds.val == {"image_pids": [], "img_paths": [], "caption_pids": [], "captions": [],
                      "caption_img_index": []}
    assert ds.test["image_pids"] == [5]


def test_rstpreid_uses_img_path(tmp_path):
    rows = [(1, "1_a.jpg", "train"), (2, "2_a.jpg", "val"), (3, "3_a.jpg", "test")]
    write_set(tmp_path, "RSTPReid", "data_captions.json", rows, path_key="img_path")
    ds = build_dataset("RSTPReid", str(tmp_path))
    assert ds.train[0][2] == os.path.join(str(tmp_path), "RSTPReid", "imgs", "1_a.jpg")
    assert ds.statistics() == {"train": (1, 1, 2), "val": (1, 1, 2), "test": (1, 1, 2)}
    with pytest.raises(UserError, match="entry 0 .* lacks the key 'img_path'"):
        write_set(tmp_path, "RSTPReid", "data_captions.json", rows, path_key="file_path")
        build_dataset("RSTPReid", str(tmp_path))


def test_val_holdout_moves_last_ids(tmp_path):
    rows = [(4, "a/1.jpg", "train"), (1, "a/2.jpg", "train"), (9, "a/3.jpg", "train"), (2, "a/4.jpg", "train"),
            (9, "a/5.jpg", "train"), (30, "a/6.jpg", "test")]
    write_set(tmp_path, "ICFG-PEDES", "ICFG-PEDES.json", rows)
    ds = build_dataset("ICFG-PEDES", str(tmp_path), val_holdout_ids=2)
    assert ds.train_id_map == {0: 1, 1: 2}
    assert sorted({p[0] for p in ds.train}) == [0, 1] and [p[1] for p in ds.train] == [0, 0, 1, 1]
    assert ds.val["image_pids"] == [4, 9, 9]  # ids 4 and 9 (the two largest), in file order
    assert ds.val["img_paths"][0].endswith("a/1.jpg")
    assert ds.test["image_pids"] == [30]
    with pytest.raises(UserError, match=r"val_holdout_ids \(4\) must be smaller .* \(4\)"):
        build_dataset("ICFG-PEDES", str(tmp_path), val_holdout_ids=4)
    write_set(tmp_path)  # CUHK-PEDES has a val split already
    with pytest.raises(UserError, match="already has a val split"):
        build_dataset("CUHK-PEDES", str(tmp_path), val_holdout_ids=1)


def test_unknown_name_lists_valid_ones(tmp_path):
    with pytest.raises(UserError) as info:
        build_dataset("CUHK_PEDES", str(tmp_path))
    assert all(name in str(info.value) for name in DATASETS)


def test_layout_errors_show_expected_layout(tmp_path):
    root = str(tmp_path / "nowhere")
    expected = f"expected {root}/CUHK-PEDES/imgs/ and {root}/CUHK-PEDES/reid_raw.json"
    with pytest.raises(UserError, match="data root .*nowhere does not exist") as info:
        build_dataset("CUHK-PEDES", root)
    assert expected in str(info.value)
    os.makedirs(root)
    with pytest.raises(UserError, match="data set folder .*CUHK-PEDES does not exist"):
        build_dataset("CUHK-PEDES", root)
    os.makedirs(os.path.join(root, "CUHK-PEDES"))
    with pytest.raises(UserError, match="image folder .*imgs does not exist"):
        build_dataset("CUHK-PEDES", root)
    os.makedirs(os.path.join(root, "CUHK-PEDES", "imgs"))
    with pytest.raises(UserError, match="annotation file .*reid_raw.json does not exist") as info:
        build_dataset("CUHK-PEDES", root)
    assert expected in str(info.value)
    os.makedirs(os.path.join(root, "ICFG-PEDES", "imgs"))
    with pytest.raises(UserError, match=r"ICFG-PEDES.json \(or ICFG_PEDES.json\)"):
        build_dataset("ICFG-PEDES", root)


def test_malformed_json_names_line_and_column(tmp_path):
    path = write_set(tmp_path, content='[\n  {"id": 1,\n   "split": }\n]')
    with pytest.raises(UserError, match="not valid JSON at line 3, column 13") as info:
        build_dataset("CUHK-PEDES", str(tmp_path))
    assert path in str(info.value)
    write_set(tmp_path, content='{"id": 1}')
    with pytest.raises(UserError, match="reid_raw.json: expected a JSON list .* got a mapping"):
        build_dataset("CUHK-PEDES", str(tmp_path))


@pytest.mark.parametrize("entry, message", [
    ([1, 2], r"entry 1 \(counting from 0\) is a list, expected a mapping"),
    ({"split": "train", "file_path": "x.jpg", "id": 1}, r"entry 1 .* lacks the key 'captions'"),
    ({"split": "train", "captions": ["a"], "file_path": "x.jpg", "id": "1"}, r"entry 1 .*'id' must be an integer"),
    ({"split": "train", "captions": ["a"], "file_path": "x.jpg", "id": True}, r"'id' must be an integer"),
    ({"split": "train", "captions": "a man", "file_path": "x.jpg", "id": 1}, r"'captions' must be a list of str"),
    ({"split": "train", "captions": ["a", 3], "file_path": "x.jpg", "id": 1}, r"list holding a integer \(3\)"),
    ({"split": "train", "captions": ["a"], "file_path": 5, "id": 1}, r"'file_path' must be a non-empty string"),
    ({"split": "dev", "captions": ["a"], "file_path": "x.jpg", "id": 1}, r"unknown split 'dev'; expected one of"),
    ({"split": "train", "captions": ["a"], "file_path": "x.jpg", "id": "7" * 100_000}, r"got string '777.*\.\.\."),
    ({"split": "train", "captions": ["a", ["b"] * 100_000], "file_path": "x.jpg", "id": 1}, r"list holding a list"),
])
def test_bad_entries_name_file_index_and_key(tmp_path, entry, message):
    good = {"split": "train", "captions": ["a"], "file_path": "x.jpg", "id": 1}
    path = write_set(tmp_path, content=json.dumps([good, entry]))
    open(os.path.join(str(tmp_path), "CUHK-PEDES", "imgs", "x.jpg"), "wb").close()
    with pytest.raises(UserError, match=message) as info:
        build_dataset("CUHK-PEDES", str(tmp_path))
    assert str(info.value).startswith(path + ": entry 1")
    assert len(str(info.value)) < len(path) + 200  # a huge value in the file is quoted in part only


def test_missing_images_error_or_skip(tmp_path):
    write_set(tmp_path)
    img = os.path.join(str(tmp_path), "CUHK-PEDES", "imgs")
    for rel in ("cam_a/a.jpg", "cam_a/b.jpg", "cam_b/c.jpg", "cam_b/f.jpg"):
        os.remove(os.path.join(img, rel))
    with pytest.raises(UserError, match="4 image") as info:
        build_dataset("CUHK-PEDES", str(tmp_path))
    msg = str(info.value)
    assert os.path.join(img, "cam_a/a.jpg") in msg and os.path.join(img, "cam_b/c.jpg") in msg
    assert "cam_b/f.jpg" not in msg and "skip_missing_images" in msg  # only the first three are listed
    with pytest.warns(UserWarning, match="dropping 4 image"):
        ds = build_dataset("CUHK-PEDES", str(tmp_path), skip_missing_images=True)
    assert ds.train == [] and ds.val["image_pids"] == [12]
    assert ds.test["img_paths"] == [os.path.join(img, "cam_a/e.jpg")]
    assert len(build_dataset("CUHK-PEDES", str(tmp_path), check_images=False).train) == 6


def test_directory_listing(tmp_path):
    (tmp_path / "d").mkdir()
    (tmp_path / "d" / "x.png").write_bytes(b"")
    (tmp_path / "d" / "sub").mkdir()
    listing = DirectoryListing()
    assert listing.exists(str(tmp_path / "d" / "x.png"))
    assert not listing.exists(str(tmp_path / "d" / "y.png"))
    assert not listing.exists(str(tmp_path / "d" / "sub"))  # a folder is not an image
    assert not listing.exists(str(tmp_path / "nope" / "x.png"))


def test_directory_listing_judges_each_link_on_its_own(tmp_path):
    (tmp_path / "x.png").write_bytes(b"")
    os.symlink(str(tmp_path / "x.png"), str(tmp_path / "good.png"))
    os.symlink(str(tmp_path / "loop.png"), str(tmp_path / "loop.png"))
    os.symlink(str(tmp_path / "gone.png"), str(tmp_path / "broken.png"))
    listing = DirectoryListing()
    assert [listing.exists(str(tmp_path / n)) for n in ("x.png", "good.png", "loop.png", "broken.png")] == \
        [True, True, False, False]


def test_demo_pedes_generated_once_per_seed(tmp_path, monkeypatch):
    calls = []
    real = demo_pedes.generate_demo_pedes

    def tiny_generate(dataset_dir, seed=0):
        calls.append((dataset_dir, seed))
        real(dataset_dir, seed=seed, **TINY)

    monkeypatch.setattr(demo_pedes, "generate_demo_pedes", tiny_generate)
    root = str(tmp_path / "fresh" / "data")
    seed3, seed0 = os.path.join(root, "Demo-PEDES_seed3"), os.path.join(root, "Demo-PEDES")
    with pytest.raises(UserError, match="no Demo-PEDES .* it is generated by training"):
        build_dataset("Demo-PEDES", root, demo_seed=3)  # evaluating, serving, checking never write a data set
    assert calls == [] and not os.path.exists(root)
    ds = build_dataset("Demo-PEDES", root, demo_seed=3, generate=True)
    assert calls == [(seed3, 3)]
    assert ds.name == "Demo-PEDES" and ds.dataset_dir == seed3 and ds.num_classes == TINY["num_train_ids"]
    assert all(p.startswith(seed3 + os.sep) for p in ds.val["img_paths"])
    build_dataset("Demo-PEDES", root, demo_seed=3, generate=True)
    assert len(calls) == 1  # an existing set is parsed, not regenerated
    assert build_dataset("Demo-PEDES", root, generate=True).dataset_dir == seed0 and calls[1:] == [(seed0, 0)]
    assert sorted(os.listdir(root)) == ["Demo-PEDES", "Demo-PEDES_seed3"]


def test_check_dataset_tool_exit_codes(tmp_path, capsys):
    from tools import check_dataset

    def main(argv):
        with pytest.raises(SystemExit) as done:
            run_main(check_dataset.main, argv)
        return done.value.code

    write_set(tmp_path)
    assert main(["--dataset_name", "CUHK-PEDES", "--root_dir", str(tmp_path)]) == 1
    out = capsys.readouterr().out
    assert "train ids: 2 (published: 11,003)" in out and "total captions: 12 (published: 80,412 or 80,440)" in out
    assert main(["--dataset_name", "CUHK-PEDES", "--root_dir", str(tmp_path / "none")]) == 2
    assert "data root" in capsys.readouterr().err
    write_set(tmp_path, "Demo-PEDES")  # no published statistics: only the files are checked
    assert main(["--dataset_name", "Demo-PEDES", "--root_dir", str(tmp_path)]) == 0
    # The images written by write_set are empty files, so decoding flags every one, naming it.
    assert main(["--dataset_name", "Demo-PEDES", "--root_dir", str(tmp_path), "--decode"]) == 1
    out = capsys.readouterr().out
    assert "6 problem(s)" in out and "cannot read image " + os.path.join(str(tmp_path), "Demo-PEDES", "imgs",
                                                                           "cam_a/a.jpg") in out
