"""Tests of the generated Demo-PEDES set: determinism, format, caption truth, image statistics, atomic write."""
import json
import os
import re

from PIL import Image
import numpy as np
import pytest

from datasets import demo_pedes, demo_render
from datasets.demo_pedes import generate_demo_pedes, main, sample_identity, tokenize_caption
from helpers import tree
from utils.errors import UserError

SMALL = dict(num_train_ids=6, num_val_ids=3, num_test_ids=3, images_per_id=2)
COLOUR_WORDS = set(demo_render.COLOURS) | set(demo_render.HAIR_COLOURS)


@pytest.fixture(scope="module")
def small_set(tmp_path_factory):
    root = str(tmp_path_factory.mktemp("demo") / "Demo-PEDES")
    generate_demo_pedes(root, seed=0, **SMALL)
    with open(os.path.join(root, "reid_raw.json"), encoding="utf-8") as f:
        return root, json.load(f)


@pytest.fixture(scope="module")
def larger_set(tmp_path_factory):
    root = str(tmp_path_factory.mktemp("demo40") / "Demo-PEDES")
    generate_demo_pedes(root, seed=3, num_train_ids=30, num_val_ids=5, num_test_ids=5, images_per_id=3)
    with open(os.path.join(root, "reid_raw.json"), encoding="utf-8") as f:
        return root, json.load(f)


def test_same_seed_gives_identical_bytes_and_another_seed_differs(small_set, tmp_path):
    root, _ = small_set
    again, other = str(tmp_path / "again"), str(tmp_path / "other")
    generate_demo_pedes(again, seed=0, **SMALL)
    generate_demo_pedes(other, seed=1, **SMALL)
    first, second, third = tree(root), tree(again), tree(other)
    assert len(first) == 12 * 2 + 2
    assert first == second
    assert first["reid_raw.json"] != third["reid_raw.json"]
    assert first["imgs/train/0001_0.jpg"] != third["imgs/train/0001_0.jpg"]


def test_json_format_splits_andtree(small_set):
    root, entries = small_set
    assert len(entries) == 12 * 2
    ids = {"train": set(), "val": set(), "test": set()}
    for e in entries:
        assert set(e) == {"split", "captions", "file_path", "processed_tokens", "id"}
        ids[e["split"]].add(e["id"])
        assert re.fullmatch(rf"{e['split']}/{e['id']:04d}_[01]\.jpg", e["file_path"])
        with Image.open(os.path.join(root, "imgs", e["file_path"])) as im:
            assert im.size == (64, 192) and im.mode == "RGB"
        assert len(e["captions"]) == 2 and e["captions"][0] != e["captions"][1]
        assert e["processed_tokens"] == [tokenize_caption(c) for c in e["captions"]]
        assert all(c[0].isupper() and c.endswith(".") for c in e["captions"])
    assert ids == {"train": set(range(1, 7)), "val": {7, 8, 9}, "test": {10, 11, 12}}


def test_generation_is_recorded(small_set):
    root, _ = small_set
    with open(os.path.join(root, "generator.json"), encoding="utf-8") as f:
        assert json.load(f) == {"generator": "datasets/demo_pedes.py", "seed": 0, "num_train_ids": 6,
                                "num_val_ids": 3, "num_test_ids": 3, "images_per_id": 2, "image_size": [192, 64]}
    assert demo_pedes.recorded_seed(root) == 0


def test_each_seed_has_its_folder():
    assert [demo_pedes.folder_name(s) for s in (0, 1, 12)] == ["Demo-PEDES", "Demo-PEDES_seed1", "Demo-PEDES_seed12"]
    for bad in (-1, 1.5, "3"):
        with pytest.raises(UserError, match="expected a non-negative integer"):
            demo_pedes.folder_name(bad)


def test_tokenize_caption_splits_off_punctuation():
    assert tokenize_caption("The man's T-shirt is blue, his shoes: white.") == \
        ["the", "man's", "t-shirt", "is", "blue", "his", "shoes", "white"]


def test_captions_name_the_true_attributes(larger_set):
    _, entries = larger_set
    upper_named = lower_named = lower_total = 0
    for e in entries:
        person = sample_identity(3, e["id"])
        for tokens in e["processed_tokens"]:
            named = COLOUR_WORDS & set(tokens)
            assert named <= person.colours(), (tokens, person)
            other_gender = {"she", "her", "woman", "lady", "girl"} if person.gender == "man" else \
                {"he", "his", "man", "guy", "boy", "gentleman"}
            assert not other_gender & set(tokens), tokens
            upper_named += person.upper_colour in tokens
            if person.lower:
                lower_total += 1
                lower_named += person.lower_colour in tokens
            assert len(named) >= 1
    n_captions = 2 * len(entries)
    assert upper_named >= 0.8 * n_captions
    assert lower_named >= 0.75 * lower_total


def test_identity_attributes_are_fixed_and_varied():
    people = [sample_identity(0, pid) for pid in range(1, 41)]
    assert sample_identity(0, 7) == people[6]
    assert len({p.upper_colour for p in people}) >= 8
    assert {p.gender for p in people} == {"woman", "man"}
    assert all(p.lower is None for p in people if p.upper == "dress")
    assert all(p.lower in ("trousers", "jeans") for p in people if p.upper == "coat")


def test_images_of_one_identity_share_the_upper_garment_colour(larger_set):
    root, entries = larger_set
    # A window that lies on the torso for every scale and position the generator draws.
    means, pids = [], []
    for e in entries:
        arr = np.asarray(Image.open(os.path.join(root, "imgs", e["file_path"])), dtype=np.float32)
        means.append(arr[int(0.37 * 192):int(0.43 * 192), int(0.42 * 64):int(0.58 * 64)].reshape(-1, 3).mean(0))
        pids.append(e["id"])
    means, pids = np.stack(means), np.array(pids)
    dist = np.linalg.norm(means[:, None] - means[None], axis=-1)
    same = (pids[:, None] == pids[None]) & ~np.eye(len(pids), dtype=bool)
    different = pids[:, None] != pids[None]
    assert dist[same].mean() < 0.5 * dist[different].mean()


def test_interrupted_generation_leaves_nothing_behind(tmp_path, monkeypatch):
    calls = {"n": 0}
    real = demo_render.render_pedestrian

    def failing(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] > 5:
            raise RuntimeError("injected failure")
        return real(*args, **kwargs)

    monkeypatch.setattr(demo_render, "render_pedestrian", failing)
    with pytest.raises(RuntimeError, match="injected"):
        generate_demo_pedes(str(tmp_path / "Demo-PEDES"), **SMALL)
    assert calls["n"] == 6
    assert os.listdir(tmp_path) == []


def test_interrupted_regeneration_keeps_the_previous_set(tmp_path, monkeypatch):
    target = str(tmp_path / "Demo-PEDES")
    generate_demo_pedes(target, **SMALL)
    before = tree(target)

    def failing(*args, **kwargs):
        raise RuntimeError("injected failure")

    monkeypatch.setattr(demo_render, "render_pedestrian", failing)
    with pytest.raises(RuntimeError):
        generate_demo_pedes(target, seed=5, **SMALL)
    assert os.listdir(tmp_path) == ["Demo-PEDES"]
    assert tree(target) == before


def test_bad_arguments_and_foreign_folders_are_refused(tmp_path):
    with pytest.raises(UserError, match="num_val_ids"):
        generate_demo_pedes(str(tmp_path / "x"), num_val_ids=0)
    foreign = tmp_path / "mine"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("keep me")
    with pytest.raises(UserError, match="not a Demo-PEDES folder"):
        generate_demo_pedes(str(foreign), **SMALL)
    assert (foreign / "notes.txt").read_text() == "keep me"


def test_command_line_skips_an_existing_set(tmp_path, capsys):
    existing = tmp_path / demo_pedes.DATASET_NAME
    existing.mkdir()
    (existing / "reid_raw.json").write_text("[]")
    assert main(["--root_dir", str(tmp_path)]) == 0
    assert "already exists" in capsys.readouterr().out
    assert (existing / "reid_raw.json").read_text() == "[]"


def test_command_line_writes_each_seed_to_its_folder(tmp_path, capsys, monkeypatch):
    real = demo_pedes.generate_demo_pedes
    monkeypatch.setattr(demo_pedes, "generate_demo_pedes", lambda target, seed: real(target, seed=seed, **SMALL))
    assert main(["--root_dir", str(tmp_path), "--seed", "7"]) == 0
    assert os.listdir(tmp_path) == ["Demo-PEDES_seed7"]
    assert demo_pedes.recorded_seed(str(tmp_path / "Demo-PEDES_seed7")) == 7
    (tmp_path / "Demo-PEDES_seed7" / "generator.json").write_text('{"seed": 3}')
    assert main(["--root_dir", str(tmp_path), "--seed", "7"]) == UserError.exit_code
    assert "generated with demo_seed 3" in capsys.readouterr().err
    assert main(["--root_dir", str(tmp_path), "--seed", "-2"]) == UserError.exit_code
    assert "demo_seed = -2" in capsys.readouterr().err
