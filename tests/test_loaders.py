"""Samplers, transforms, the torch Datasets, collate and the loaders end to end on tiny PNGs."""
from collections import Counter
import json
import os
import re

from PIL import Image
import pytest
import torch

from datasets.image_text import ImageDataset, ImageTextDataset, TextDataset, read_image
from datasets.loaders import build_eval_loaders, build_train_loader, collate, per_process_batch_size, set_loader_epoch
from datasets.samplers import RandomIdentitySampler, ShuffleSampler
from datasets.augment import token_inputs
from datasets.transforms import CLIP_MEAN, CLIP_STD, build_transforms
from helpers import build_dataset
from utils.config import Config
from utils.errors import UserError
from utils.tokenizer import MASK_ID, tokenize


def write_pngs(root, n_train_ids=4, per_id=2):
    """A CUHK-PEDES-format set of tiny distinct PNGs: `n_train_ids` x `per_id` train images, 2 val, 2 test."""
    base = os.path.join(root, "CUHK-PEDES")
    os.makedirs(os.path.join(base, "imgs", "cam"), exist_ok=True)
    rows = [(pid, "train") for pid in range(1, n_train_ids + 1) for _ in range(per_id)]
    rows += [(50, "val"), (51, "val"), (60, "test"), (61, "test")]
    entries = []
    for i, (pid, split) in enumerate(rows):
        rel = f"cam/{i}.png"
        img = Image.new("RGB", (12, 24), (10 * i % 256, 40, 200))
        img.putpixel((0, 0), (255, 255, 255))  # asymmetric, so a flip is visible
        img.save(os.path.join(base, "imgs", rel))
        entries.append({"split": split, "captions": [f"a person number {i}", f"someone in blue {i}"],
                        "file_path": rel, "id": pid})
    with open(os.path.join(base, "reid_raw.json"), "w") as f:
        json.dump(entries, f)
    return build_dataset("CUHK-PEDES", root)


def small_cfg(**overrides):
    cfg = Config()
    cfg.img_size, cfg.batch_size, cfg.num_workers, cfg.test_batch_size, cfg.text_length = [32, 16], 4, 0, 3, 16
    for key, value in overrides.items():
        setattr(cfg, key, value)
    return cfg


def test_shuffle_sampler_permutation_determinism_and_shards():
    s = ShuffleSampler(10, seed=1)
    first = list(s)
    assert sorted(first) == list(range(10)) and len(s) == 10
    assert list(ShuffleSampler(10, seed=1)) == first
    s.set_epoch(1)
    assert list(s) != first
    shards = [list(ShuffleSampler(10, seed=1, num_replicas=3, rank=r)) for r in range(3)]
    assert [len(x) for x in shards] == [4, 4, 4]
    flat = sum(shards, [])
    assert set(flat) == set(range(10)) and len(flat) - len(set(flat)) == 2  # padded by wrapping
    shards = [list(ShuffleSampler(10, seed=1, num_replicas=3, rank=r, drop_last=True)) for r in range(3)]
    flat = sum(shards, [])
    assert [len(x) for x in shards] == [3, 3, 3] and len(set(flat)) == 9


def test_identity_sampler_pk_structure():
    # 6 identities: 5 with 8 items, one with only 2 (sampled with replacement to K=4).
    pids = [p for p in range(5) for _ in range(8)] + [5, 5]
    s = RandomIdentitySampler(pids, batch_size=8, num_instance=4, seed=0)
    order = list(s)
    assert len(order) == len(s) and len(order) % 8 == 0
    # Groups: 2 per full identity + 1 for the small one = 11; P = 2, so 5 batches.
    assert len(s) == 5 * 8
    for b in range(0, len(order), 8):
        batch = [pids[i] for i in order[b:b + 8]]
        counts = Counter(batch)
        assert len(counts) == 2 and set(counts.values()) == {4}
        assert batch[:4] == [batch[0]] * 4 and batch[4:] == [batch[4]] * 4
    small = [i for i in order if pids[i] == 5]
    assert not small or set(small) <= {40, 41}


def test_identity_sampler_seed_epoch_and_shards():
    pids = [p for p in range(12) for _ in range(4)]
    a = RandomIdentitySampler(pids, 8, 4, seed=3)
    assert list(a) == list(RandomIdentitySampler(pids, 8, 4, seed=3))
    e0 = list(a)
    a.set_epoch(1)
    assert list(a) != e0 and sorted(list(a)) == sorted(e0)
    ranks = [RandomIdentitySampler(pids, 8, 4, seed=3, num_replicas=2, rank=r) for r in range(2)]
    orders = [list(r) for r in ranks]
    assert len(orders[0]) == len(orders[1]) == len(ranks[0]) == 24
    assert not set(orders[0]) & set(orders[1])  # disjoint shards
    for step in range(0, 24, 8):  # a global batch holds distinct identities
        assert not {pids[i] for i in orders[0][step:step + 8]} & {pids[i] for i in orders[1][step:step + 8]}
    with pytest.raises(UserError, match="needs at least 13 identities .* has 12"):
        RandomIdentitySampler(pids, 52, 4, seed=0)
    with pytest.raises(UserError, match="multiple of num_instance"):
        RandomIdentitySampler(pids, 6, 4, seed=0)


def test_transforms_shape_and_normalisation():
    red = Image.new("RGB", (20, 50), (255, 0, 0))
    out = build_transforms((32, 16), is_train=False)(red)
    assert out.shape == (3, 32, 16)
    expected = [(1 - CLIP_MEAN[0]) / CLIP_STD[0], -CLIP_MEAN[1] / CLIP_STD[1], -CLIP_MEAN[2] / CLIP_STD[2]]
    assert torch.allclose(out.mean(dim=(1, 2)), torch.tensor(expected), atol=1e-5)
    assert abs(expected[0] - 1.9303) < 1e-3
    img = Image.new("RGB", (16, 32), (0, 0, 0))
    img.putpixel((0, 0), (255, 255, 255))
    plain = build_transforms((32, 16), is_train=False)(img)
    flips = set()
    for seed in range(20):
        torch.manual_seed(seed)
        got = build_transforms((32, 16), is_train=True, aug=False)(img)
        assert got.equal(plain) or got.equal(plain.flip(-1))
        flips.add(got.equal(plain))
    assert flips == {True, False}
    torch.manual_seed(0)
    assert build_transforms((32, 16), is_train=True, aug=True)(img).shape == (3, 32, 16)


def test_random_erasing_fills_with_the_mean():
    # On a white image only erased pixels can be exactly 0 in every channel (white is positive, padding negative).
    white = Image.new("RGB", (16, 32), (255, 255, 255))
    t = build_transforms((32, 16), is_train=True, aug=True)
    erased = []
    for seed in range(20):
        torch.manual_seed(seed)
        out = t(white)
        zero = (out == 0).all(dim=0)
        assert ((out == 0) == zero).all()  # never some channels only
        erased.append(int(zero.sum()))
    assert 0 < sum(e > 0 for e in erased) < 20 and max(erased) >= 0.02 * 32 * 16


def test_corrupt_image_raises_naming_it(tmp_path):
    bad = tmp_path / "broken.png"
    bad.write_bytes(b"\x89PNG\r\n\x1a\n not really a png")
    with pytest.raises(UserError, match="cannot read image .*broken.png"):
        read_image(str(bad))
    with pytest.raises(UserError, match="broken.png"):
        ImageDataset([1], [str(bad)], build_transforms((32, 16)))[0]


def test_collate_keys_and_dtypes():
    items = [{"pids": 3, "images": torch.zeros(3, 4, 2), "caption_ids": torch.ones(5, dtype=torch.long)},
             {"pids": 4, "images": torch.ones(3, 4, 2), "caption_ids": torch.zeros(5, dtype=torch.long)}]
    batch = collate(items)
    assert batch["pids"].tolist() == [3, 4] and batch["pids"].dtype == torch.long
    assert batch["images"].shape == (2, 3, 4, 2) and batch["caption_ids"].shape == (2, 5)


def test_text_dataset_tokenises_lazily():
    ds = TextDataset([7, 8], ["a man", "a woman"], text_length=8)
    assert ds[1]["pids"] == 8 and ds[1]["caption_ids"].equal(tokenize("a woman", 8)[0])


def test_train_loader_end_to_end(tmp_path):
    ds = write_pngs(str(tmp_path))
    loader = build_train_loader(small_cfg(loss_names="itc+mlm"), ds)
    batches = list(loader)
    assert len(batches) == len(loader) == 4  # 16 pairs, batch 4
    b = batches[0]
    assert set(b) == {"pids", "image_ids", "indices", "images", "caption_ids", "mlm_ids", "mlm_labels"}
    assert b["images"].shape == (4, 3, 32, 16) and b["images"].dtype == torch.float32
    assert b["caption_ids"].shape == (4, 16) and b["caption_ids"].dtype == torch.long
    chosen = b["mlm_labels"] != 0
    assert chosen.any(dim=1).all() and b["mlm_labels"][chosen].equal(b["caption_ids"][chosen])
    assert (b["mlm_ids"] == MASK_ID).any()
    assert sorted(torch.cat([x["image_ids"] for x in batches]).tolist()) == sorted(p[1] for p in ds.train)
    # Every item carries its index in the training set: the one that gives its pair.
    for x in batches:
        assert [ds.train[i][1] for i in x["indices"].tolist()] == x["image_ids"].tolist()
    plain = build_train_loader(small_cfg(loss_names="sdm+itc", sampler="identity", num_instance=2), ds)
    b = next(iter(plain))
    assert "mlm_ids" not in b and Counter(b["pids"].tolist()).most_common(1)[0][1] == 2


def test_augmentation_reproducible_across_workers_and_epochs(tmp_path):
    ds = write_pngs(str(tmp_path))
    runs = {}
    for workers in (0, 2):
        loader = build_train_loader(small_cfg(loss_names="itc+mlm", num_workers=workers), ds)
        set_loader_epoch(loader, 1)
        state = torch.get_rng_state()
        runs[workers] = list(loader)
        assert torch.get_rng_state().equal(state)  # the global RNG (dropout) is untouched
    for a, b in zip(runs[0], runs[2]):
        assert all(a[k].equal(b[k]) for k in a)
    loader = build_train_loader(small_cfg(loss_names="itc+mlm"), ds)
    set_loader_epoch(loader, 2)
    assert loader.dataset.epoch == 2 and loader.sampler.epoch == 2
    assert not all(a["images"].equal(b["images"]) for a, b in zip(runs[0], loader))
    # The same (seed, epoch, index) gives the same item whatever was drawn before.
    item = ImageTextDataset(ds.train, build_transforms((32, 16), True, True), 16, seed=1,
                            token_inputs=token_inputs(small_cfg(loss_names="itc+mlm")))
    item.set_epoch(1)
    first = item[3]
    item[5]
    torch.rand(10)
    again = item[3]
    assert first["images"].equal(again["images"]) and first["mlm_ids"].equal(again["mlm_ids"])


def test_an_item_seeds_only_the_cpu_generator(tmp_path, monkeypatch):
    """Seeding an item must not reach an accelerator's generator, which fork_rng(devices=[]) does not restore (a GPU's
    dropout would follow the last item's seed), and costs a formatted stack trace per call where none is set up."""
    ds = write_pngs(str(tmp_path))
    calls = []
    monkeypatch.setattr(torch.cuda, "manual_seed_all", lambda seed: calls.append(seed))
    item = ImageTextDataset(ds.train, build_transforms((32, 16), True, True), 16, seed=1,
                            token_inputs=token_inputs(small_cfg(loss_names="itc+mlm")))
    item.set_epoch(1)
    first = item[2]
    item[0]
    assert calls == [] and item[2]["images"].equal(first["images"])


def test_eval_loaders_keep_file_order(tmp_path):
    ds = write_pngs(str(tmp_path))
    img_loader, txt_loader = build_eval_loaders(small_cfg(), ds.test)
    imgs = list(img_loader)
    assert [b["pids"].tolist() for b in imgs] == [[60, 61]]
    assert imgs[0]["images"].shape == (2, 3, 32, 16)
    txts = list(txt_loader)
    assert [b["pids"].tolist() for b in txts] == [[60, 60, 61], [61]]
    assert txts[0]["caption_ids"].equal(tokenize(ds.test["captions"][:3], 16))
    empty_img, empty_txt = build_eval_loaders(small_cfg(), {"image_pids": [], "img_paths": [], "caption_pids": [],
                                                            "captions": []})
    assert list(empty_img) == [] and list(empty_txt) == []


def test_per_process_batch_size():
    assert per_process_batch_size(small_cfg(batch_size=64), 4) == 16
    assert per_process_batch_size(small_cfg(batch_size=64, batch_size_scope="per_process"), 4) == 64
    with pytest.raises(UserError, match="divisible"):
        per_process_batch_size(small_cfg(batch_size=64), 3)


@pytest.mark.parametrize("aug", [True, False])
def test_cache_images_gives_the_same_batches(tmp_path, aug):
    ds = write_pngs(str(tmp_path), n_train_ids=6)
    batches = {}
    for cache in (False, True):
        loader = build_train_loader(small_cfg(loss_names="itc+mlm", img_aug=aug, cache_images=cache), ds)
        set_loader_epoch(loader, 3)
        batches[cache] = list(loader)
    preloaded = loader.dataset.images
    assert len(preloaded.index) == 12 and preloaded.data.dtype == torch.uint8  # each distinct image once
    assert preloaded.data.shape == (12, 3, 32, 16) and preloaded.nbytes == 12 * 3 * 32 * 16
    assert len(batches[True]) == len(batches[False]) == 6
    for a, b in zip(batches[False], batches[True]):
        assert a.keys() == b.keys() and all(a[k].equal(b[k]) for k in a)


def test_cache_images_names_an_unreadable_image(tmp_path):
    ds = write_pngs(str(tmp_path))
    bad = ds.train[2][2]
    with open(bad, "wb") as f:
        f.write(b"not an image")
    with pytest.raises(UserError, match="cannot read image " + re.escape(bad)):
        build_train_loader(small_cfg(cache_images=True), ds)
