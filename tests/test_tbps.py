"""TBPS-CLIP (SPEC 13): each loss against a direct transcription of its formula, the clamped learnable scale, the
soft-label ramp, the image and text recipes and the views (made only when a loss asks), the per-iteration
schedule and the decay groups, a checkpoint in the reference's layout (EasyDict config, numpy scalars) loaded
safely and reproducing its similarity, and a TBPS run that resumes exactly."""
import json
import math
import os
import sys
import types

import numpy as np
import pytest
import torch
import torch.nn.functional as F
import torchvision.transforms as T
import yaml
from PIL import Image

import test as test_entry
import train
from methods.tbps.augment import tbps_text
from datasets.image_text import ImageTextDataset
from datasets.transforms import build_transforms, image_transforms, recipe, VIEWS
from helpers import same_final_weights, run_entry, run_tool, train_argv, plain_smoke
from model import build_model, load_model
from methods.tbps.head import clamped_exp
from methods.tbps.losses import citc_loss, nitc_loss, ritc_loss, ss_loss
from methods.tbps.transforms import IMAGENET_MEAN, IMAGENET_STD
from solver import build_lr_scheduler, build_optimizer
from utils.checkpoint import read_checkpoint
from utils.config import build_config

TINY_TBPS = {"pretrain_choice": "ViT-Tiny", "img_size": [32, 32], "text_length": 16,
             "loss_names": "nitc+ritc+citc+ss", "image_recipe": "tbps"}


def features(seed, n=6, d=8):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, d, generator=g, dtype=torch.float64)


PIDS = torch.tensor([0, 0, 1, 2, 2, 2])


# ------------------------------------------------------------------------------------------------ losses
def unit(x):
    return x / x.norm(dim=1, keepdim=True)


def softmax_row(row):
    e = [math.exp(v - max(row)) for v in row]
    return [v / sum(e) for v in e]


def q_matrix(pids):
    n = len(pids)
    return [[(pids[i] == pids[j]) / sum(pids[i] == pids[k] for k in range(n)) for j in range(n)] for i in range(n)]


def nitc_by_the_formula(i, t, i_d, t_d, pids, s, alpha):
    """SPEC 13's N-ITC, element by element in float64."""
    i, t, i_d, t_d = unit(i).tolist(), unit(t).tolist(), unit(i_d).tolist(), unit(t_d).tolist()
    pids, n = pids.tolist(), len(pids)
    q = q_matrix(pids)
    dot = lambda a, b: sum(x * y for x, y in zip(a, b))  # noqa: E731
    total = 0.0
    for a, b, a_d, b_d in ((i, t, i_d, t_d), (t, i, t_d, i_d)):
        for r in range(n):
            soft = softmax_row([s * dot(a_d[r], b_d[c]) for c in range(n)])
            target = [alpha * soft[c] + (1 - alpha) * q[r][c] for c in range(n)]
            logits = [s * dot(a[r], b[c]) for c in range(n)]
            log_p = [v - math.log(sum(math.exp(x) for x in logits)) for v in logits]
            total += -sum(tg * lp for tg, lp in zip(target, log_p)) / n
    return total / 2


def test_nitc_equals_its_formula():
    i, t, i_d, t_d = (features(k) for k in range(4))
    for alpha in (0.0, 0.25, 0.5):
        ours = nitc_loss(i, t, i_d, t_d, PIDS, torch.tensor(14.0, dtype=torch.float64), alpha)
        assert ours.item() == pytest.approx(nitc_by_the_formula(i, t, i_d, t_d, PIDS, 14.0, alpha), rel=1e-9)


def test_ritc_equals_its_formula():
    i, t = features(5), features(6)
    s, eps, n = 20.0, 0.01, len(PIDS)
    q = q_matrix(PIDS.tolist())
    total = 0.0
    for a, b in ((unit(i), unit(t)), (unit(t), unit(i))):
        logits = (s * a @ b.t()).tolist()
        for r in range(n):
            p = softmax_row(logits[r])
            total += sum(pc * (math.log(pc) - math.log(q[r][c] + eps)) for c, pc in enumerate(p)) / n
    ours = ritc_loss(i, t, PIDS, torch.tensor(s, dtype=torch.float64), eps)
    assert ours.item() == pytest.approx(0.5 * total, rel=1e-9)


def test_citc_equals_its_formula():
    i, t = unit(features(7)).tolist(), unit(features(8)).tolist()
    n = len(i)
    dot = lambda a, b: sum(x * y for x, y in zip(a, b))  # noqa: E731
    in_modal = sum((dot(i[a], i[b]) - dot(t[a], t[b])) ** 2 for a in range(n) for b in range(n)) / n ** 2
    cross = sum((dot(i[a], t[b]) - dot(t[a], i[b])) ** 2 for a in range(n) for b in range(n)) / n ** 2
    ours = citc_loss(features(7), features(8), 0.25, 0.25)
    assert ours.item() == pytest.approx(0.25 * in_modal + 0.25 * cross, rel=1e-9)


def test_ss_equals_nt_xent():
    a, b = unit(features(9)).tolist(), unit(features(10)).tolist()
    n, tau = len(a), 0.1
    dot = lambda x, y: sum(u * v for u, v in zip(x, y))  # noqa: E731
    total = 0.0
    for x, y in ((a, b), (b, a)):
        for r in range(n):
            positive = dot(x[r], y[r]) / tau
            others = [dot(x[r], y[c]) / tau for c in range(n)] + [dot(x[r], x[c]) / tau for c in range(n) if c != r]
            total += -(positive - math.log(sum(math.exp(v) for v in others))) / n
    assert ss_loss(features(9), features(10), tau).item() == pytest.approx(total / 2, rel=1e-9)


def test_the_logit_scale_is_clamped_with_the_references_gradient():
    for start in (math.log(1 / 0.07), math.log(150.0)):
        ours = torch.tensor(start, requires_grad=True)
        (clamped_exp(ours) * 3).backward()
        theirs = torch.tensor(start, requires_grad=True)
        scale = theirs.exp()
        scale.data = torch.clamp(scale.data, max=100)  # what the reference does
        (scale * 3).backward()
        assert clamped_exp(ours).item() == pytest.approx(scale.item())
        assert ours.grad.item() == pytest.approx(theirs.grad.item())


def test_the_soft_label_share_ramps_over_the_first_epoch():
    model = build_model(build_config(None, TINY_TBPS), 4)
    assert [model.tbps.alpha({"progress": p}) for p in (0.0, 0.5, 1.0, 3.2)] == [0.0, 0.25, 0.5, 0.5]
    assert model.tbps.alpha({}) == 0.5
    assert model.tbps.logit_scale.item() == pytest.approx(math.log(1 / 0.07))


def test_a_step_gives_every_loss_and_trains_the_scale():
    cfg = build_config(None, {**TINY_TBPS, "freeze_patch_embed": True, "text_attn_dropout": 0.05})
    model = build_model(cfg, 4)
    from helpers import captions
    g = torch.Generator().manual_seed(0)
    batch = {"images": torch.randn(4, 3, 32, 32, generator=g), "caption_ids": captions(4),
             "pids": torch.tensor([0, 0, 1, 2]), "progress": 0.5,
             **{f"view_{v}": torch.randn(4, 3, 32, 32, generator=g) for v in ("mvs", "ss_1", "ss_2")}}
    model.eval()  # without dropout, the loss sees exactly the model's embeddings
    with torch.no_grad():
        out = model(batch)
        image, text = model.encode_image(batch["images"]), model.encode_text(batch["caption_ids"])
    assert {"nitc_loss", "ritc_loss", "citc_loss", "ss_loss"} <= set(out)
    assert out["citc_loss"].item() == pytest.approx(0.1 * citc_loss(image, text).item(), rel=1e-5)
    assert out["ritc_loss"].item() == pytest.approx(ritc_loss(image, text, batch["pids"], torch.tensor(1 / 0.07)).item(),
                                                    rel=1e-5)
    model.train()
    out = model(batch)
    assert out["temperature"].item() == pytest.approx(0.07, rel=1e-5)
    sum(v for k, v in out.items() if k.endswith("_loss")).backward()
    assert model.tbps.logit_scale.grad is not None and model.tbps.simclr_mlp[0].weight.grad is not None
    assert not model.backbone.visual.conv1.weight.requires_grad
    assert all(b.attn.attn_drop.p == 0.05 for b in model.backbone.transformer.resblocks)
    assert all(b.attn.attn_drop.p == 0.0 for b in model.backbone.visual.transformer.resblocks)
    model.eval()
    with torch.no_grad():  # no dropout at test time: the embedding depends on its input only
        assert torch.equal(model.encode_text(batch["caption_ids"]), model.encode_text(batch["caption_ids"]))


# ---------------------------------------------------------------------------------------------- the data
def picture(seed, size=(40, 24)):
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (*size, 3), dtype=np.uint8))


def test_the_tbps_eval_transform_is_bicubic_with_imagenet_statistics():
    img = picture(0)
    expected = T.Compose([T.Resize((32, 32), interpolation=T.InterpolationMode.BICUBIC, antialias=True),
                          T.ToTensor(), T.Normalize(IMAGENET_MEAN, IMAGENET_STD)])(img)
    assert torch.allclose(build_transforms((32, 32), is_train=False, image_recipe="tbps")(img), expected, atol=1e-6)
    load, finish = image_transforms((32, 32), is_train=True, image_recipe="tbps")
    out = finish(load(img))
    assert out.shape == (3, 32, 32) and out.dtype == torch.float32


def test_the_pool_draws_two_with_replacement():
    pool_draws = []
    r = recipe("tbps", (32, 32))
    draw_two = r.train.transforms[1]
    for seed in range(200):
        torch.manual_seed(seed)
        pool_draws.append(tuple(torch.randint(len(draw_two.pool), (2,)).tolist()))
    assert len(draw_two.pool) == 6 and any(a == b for a, b in pool_draws)
    assert {a for a, _ in pool_draws} == set(range(6))


def pairs_of(folder, n=4):
    os.makedirs(folder, exist_ok=True)
    out = []
    for k in range(n):
        path = os.path.join(folder, f"{k}.jpg")
        picture(k).save(path)
        out.append((k // 2, k, path, f"a person in a red coat number {k}"))
    return out


def test_views_are_made_only_when_asked_and_change_nothing_else(tmp_path):
    pairs = pairs_of(str(tmp_path))
    r = recipe("tbps", (32, 32))
    plain = ImageTextDataset(pairs, T.Compose([r.train_load, r.train]), 16, seed=3)
    viewed = ImageTextDataset(pairs, T.Compose([r.train_load, r.train]), 16, seed=3,
                              views={v: T.Compose([r.train_load, VIEWS[v](r)]) for v in ("mvs", "ss_1", "ss_2")})
    a, b = plain[1], viewed[1]
    assert not any(k.startswith("view_") for k in a)
    assert {"view_mvs", "view_ss_1", "view_ss_2"} <= set(b)
    assert torch.equal(a["images"], b["images"]) and torch.equal(a["caption_ids"], b["caption_ids"])
    assert not torch.equal(b["view_ss_1"], b["view_ss_2"])
    assert torch.equal(viewed[1]["view_ss_2"], b["view_ss_2"])  # a function of (seed, epoch, index)


def test_back_translation_and_word_deletion_rates():
    torch.manual_seed(0)
    caption = " ".join(f"w{k}" for k in range(20))
    outs = [tbps_text(caption, {"captions_bt": "the back translation"}) for _ in range(3000)]
    translated = sum(o.startswith("the") for o in outs) / len(outs)
    assert 0.08 < translated < 0.12
    kept = [len(o.split()) / 20 for o in outs if o.startswith("w")]
    assert 0.94 < sum(kept) / len(kept) < 0.96
    assert all(tbps_text(caption, {}) .startswith("w") for _ in range(200))
    assert tbps_text("alone", {"captions_bt": ""}) == "alone"


def test_captions_bt_are_read_checked_and_travel_with_noise(tmp_path):
    from datasets.base import Annotations, dataset_from_annotations
    from datasets.noise import apply_noise
    from utils.errors import UserError
    entries = [{"id": k // 2, "file_path": f"{k}.jpg", "captions": [f"cap {k} a", f"cap {k} b"],
                "captions_bt": [f"bt {k} a", f"bt {k} b"], "split": "train"} for k in range(8)]
    ds = dataset_from_annotations("x", Annotations(entries, str(tmp_path), "ann.json"), check_images=False)
    assert ds.train_alternatives["captions_bt"] == [f"bt {k} {s}" for k in range(8) for s in "ab"]
    apply_noise(ds, 0.5, seed=1)
    assert all(bt.replace("bt", "cap") == pair[3] for bt, pair in zip(ds.train_alternatives["captions_bt"], ds.train))
    entries[3]["captions_bt"] = ["only one"]
    with pytest.raises(UserError, match=r"ann.json: entry 3 .*'captions_bt' must be a list of 2"):
        dataset_from_annotations("x", Annotations(entries, str(tmp_path), "ann.json"), check_images=False)


# -------------------------------------------------------------------------------------------- the solver
def test_the_per_iteration_schedule_is_linspace_then_cosine():
    cfg = build_config(None, {**TINY_TBPS, "lr": 1e-4, "num_epoch": 3, "warmup_epochs": 1, "warmup_factor": 0.01,
                              "target_lr": 5e-6, "lr_step": "iteration", "optimizer": "AdamW"})
    model = build_model(cfg, 4)
    optimizer = build_optimizer(cfg, model)
    n = 7
    scheduler = build_lr_scheduler(cfg, optimizer, iters_per_epoch=n)
    expected = np.concatenate([np.linspace(1e-6, 1e-4, n),
                               5e-6 + 0.5 * (1e-4 - 5e-6) * (1 + np.cos(np.pi * np.arange(2 * n) / (2 * n)))])
    seen = []
    for _ in range(3 * n):
        seen.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    assert np.allclose(seen, expected, rtol=1e-12)


def test_parameters_of_fewer_than_two_dimensions_are_not_decayed():
    cfg = build_config(None, {**TINY_TBPS, "optimizer": "AdamW", "weight_decay": 0.02, "no_decay_1d": True,
                              "bias_lr_factor": 1.0, "freeze_patch_embed": True})
    model = build_model(cfg, 4)
    optimizer = build_optimizer(cfg, model)
    decay = {id(p): g["weight_decay"] for g in optimizer.param_groups for p in g["params"]}
    params = dict(model.named_parameters())
    assert decay[id(params["tbps.logit_scale"])] == 0.0
    assert decay[id(params["backbone.ln_final.weight"])] == 0.0
    assert decay[id(params["backbone.visual.class_embedding"])] == 0.0
    assert decay[id(params["tbps.simclr_mlp.0.bias"])] == 0.0
    assert decay[id(params["backbone.token_embedding.weight"])] == 0.02
    assert decay[id(params["backbone.visual.positional_embedding"])] == 0.02
    assert id(params["backbone.visual.conv1.weight"]) not in decay
    assert {g["lr"] for g in optimizer.param_groups} == {cfg.lr}


# ---------------------------------------------------------------------- a checkpoint of the reference's code
class _EasyDict(dict):
    """What easydict.EasyDict pickles as: a dict subclass whose attributes mirror its items."""

    def __init__(self, d=None):
        super().__init__()
        for k, v in (d or {}).items():
            setattr(self, k, v)

    def __setattr__(self, k, v):
        v = _EasyDict(v) if isinstance(v, dict) and not isinstance(v, _EasyDict) else v
        super().__setattr__(k, v)
        super().__setitem__(k, v)


_EasyDict.__module__, _EasyDict.__name__, _EasyDict.__qualname__ = "easydict", "EasyDict", "EasyDict"

REFERENCE_CONFIG = {
    "misc": {"seed": 1},
    "experiment": {"input_resolution": [32, 32], "simclr_mlp": [64, 128, 64], "simclr_temperature": 0.1,
                   "dropout": 0.05, "eda_alpha": 0.05, "back_trans": True, "backtrans_p": 0.1, "text_length": 16,
                   "mvs_image": True, "nitc_ratio": 1.0, "ss": True, "ss_ratio": 0.4, "ritc": True,
                   "ritc_eps": 0.01, "ritc_ratio": 1.0, "mlm": False, "citc": True, "citc_lambda1": 0.25,
                   "citc_lambda2": 0.25, "citc_ratio": 0.1, "id": False},
    "schedule": {"lr": 1e-4, "epoch": 5, "epoch_warmup": 1, "lr_start": 1e-6, "lr_end": 5e-6,
                 "weight_decay": 0.02, "betas": [0.9, 0.98], "eps": 1e-8},
    "model": {"ckpt_type": "original_clip", "use_gather": True, "softlabel_ratio": 0.5, "embed_dim": 64},
    "data": {"batch_size": 80, "test_batch_size": 256, "num_workers": 8},
    "anno_dir": "data/CUHK-PEDES", "image_dir": "/their/images", "device": 0,
}


def reference_state_dict(seed=0):
    """Random weights in TBPS-CLIP's names (SPEC 13: `visual.*`, `encode_text.*`, `logit_scale`, `simclr_mlp`),
    for a ViT-Tiny-sized CLIP at 32x32 with a 16-token context."""
    ours = build_model(build_config(None, TINY_TBPS), 0).state_dict()
    g = torch.Generator().manual_seed(seed)
    state = {}
    for key, value in ours.items():
        if key.startswith("backbone.visual."):
            name = "visual." + key[len("backbone.visual."):]
        elif key.startswith("backbone."):
            name = "encode_text." + key[len("backbone."):]
        else:
            name = key[len("tbps."):]
        state[name] = value + 0.02 * torch.randn(value.shape, generator=g) if value.is_floating_point() else value
    state["logit_scale"] = torch.tensor(math.log(60.0))
    return state


def write_reference_run(folder, seed=0):
    """A run folder as TBPS-CLIP's code leaves it: config.yaml and checkpoint_best.pth = {model, optimizer (per-
    parameter groups, lr as numpy.float64), config (an EasyDict)}."""
    os.makedirs(folder, exist_ok=True)
    state = reference_state_dict(seed)
    params = [torch.nn.Parameter(v.clone()) for v in state.values()]
    optimizer = torch.optim.AdamW([{"params": [p], "ratio": 1.0} for p in params], lr=1e-4)
    for group in optimizer.param_groups:
        group["lr"] = np.float64(3.3e-5)
    module = types.ModuleType("easydict")
    module.EasyDict = _EasyDict
    sys.modules["easydict"] = module
    try:
        torch.save({"model": state, "optimizer": optimizer.state_dict(), "config": _EasyDict(REFERENCE_CONFIG)},
                   os.path.join(folder, "checkpoint_best.pth"))
    finally:
        del sys.modules["easydict"]
    with open(os.path.join(folder, "config.yaml"), "w") as f:
        yaml.safe_dump(REFERENCE_CONFIG, f)
    return state


def _ln(x, st, p):
    return F.layer_norm(x, (x.shape[-1],), st[p + ".weight"], st[p + ".bias"], 1e-5)


def _block(x, st, p, mask=None):
    """A residual attention block of CLIP, from its weights (heads of width 64, QuickGELU)."""
    n, length, width = x.shape
    heads = max(1, width // 64)
    h = _ln(x, st, p + ".ln_1")
    q, k, v = (h @ st[p + ".attn.in_proj_weight"].t() + st[p + ".attn.in_proj_bias"]).chunk(3, dim=-1)
    split = lambda t: t.view(n, length, heads, -1).transpose(1, 2)  # noqa: E731
    scores = split(q) @ split(k).transpose(-1, -2) / math.sqrt(width // heads)
    if mask is not None:
        scores = scores + mask
    attended = (scores.softmax(dim=-1) @ split(v)).transpose(1, 2).reshape(n, length, width)
    x = x + attended @ st[p + ".attn.out_proj.weight"].t() + st[p + ".attn.out_proj.bias"]
    h = _ln(x, st, p + ".ln_2") @ st[p + ".mlp.c_fc.weight"].t() + st[p + ".mlp.c_fc.bias"]
    return x + (h * torch.sigmoid(1.702 * h)) @ st[p + ".mlp.c_proj.weight"].t() + st[p + ".mlp.c_proj.bias"]


def _layers(st, prefix):
    return len({k[len(prefix):].split(".")[0] for k in st if k.startswith(prefix)})


def reference_image(st, images):
    conv = st["visual.conv1.weight"]
    x = F.conv2d(images, conv, stride=conv.shape[-1]).flatten(2).transpose(1, 2)
    x = torch.cat([st["visual.class_embedding"].expand(x.shape[0], 1, -1), x], dim=1)
    x = _ln(x + st["visual.positional_embedding"], st, "visual.ln_pre")
    for i in range(_layers(st, "visual.transformer.resblocks.")):
        x = _block(x, st, f"visual.transformer.resblocks.{i}")
    return _ln(x, st, "visual.ln_post")[:, 0] @ st["visual.proj"]


def reference_text(st, ids):
    length = ids.shape[1]
    x = st["encode_text.token_embedding.weight"][ids] + st["encode_text.positional_embedding"][:length]
    mask = torch.full((length, length), float("-inf")).triu(1)
    for i in range(_layers(st, "encode_text.transformer.resblocks.")):
        x = _block(x, st, f"encode_text.transformer.resblocks.{i}", mask)
    x = _ln(x, st, "encode_text.ln_final") @ st["encode_text.text_projection"]
    return x[torch.arange(len(ids)), ids.argmax(dim=-1)]


@pytest.fixture(scope="module")
def reference_run(tmp_path_factory):
    folder = str(tmp_path_factory.mktemp("tbps") / "CUHK-PEDES" / "tbps_reference")
    return folder, write_reference_run(folder)


def test_the_reference_checkpoint_is_refused_by_torch_and_read_safely_here(reference_run):
    folder, _ = reference_run
    path = os.path.join(folder, "checkpoint_best.pth")
    import pickle
    with pytest.raises(pickle.UnpicklingError):
        torch.load(path, weights_only=True)
    ckpt = read_checkpoint(path)
    assert type(ckpt["config"]) is dict and type(ckpt["config"]["experiment"]) is dict
    assert {type(g["lr"]) for g in ckpt["optimizer"]["param_groups"]} == {float}
    assert ckpt["optimizer"]["param_groups"][0]["lr"] == 3.3e-5


def test_an_arbitrary_global_beside_them_is_still_refused(tmp_path):
    from utils.errors import UserError
    module = types.ModuleType("easydict")
    module.EasyDict = _EasyDict
    sys.modules["easydict"] = module
    try:
        torch.save({"config": _EasyDict({"a": 1}), "run": os.system}, tmp_path / "bad.pth")
    finally:
        del sys.modules["easydict"]
    with pytest.raises(UserError, match=r"refused, loading it would import and run '(posix|os)\.system'"):
        read_checkpoint(str(tmp_path / "bad.pth"))


def test_a_reference_run_reproduces_its_similarity(reference_run):
    """Cosine of CLS and EOS features written out from the reference's weights, against the loaded model's: to
    1e-4 relative."""
    folder, state = reference_run
    run = load_model(os.path.join(folder, "config.yaml"), compat="none")
    assert run.layout == "tbps" and run.cfg.image_recipe == "tbps" and run.cfg.loss_names == "nitc+ritc+citc+ss"
    assert run.cfg.img_size == [32, 32] and run.cfg.text_length == 16 and run.cfg.dataset_name == "CUHK-PEDES"
    assert run.cfg.lr_step == "iteration" and run.cfg.warmup_factor == pytest.approx(0.01)
    assert run.model.tbps.logit_scale.item() == pytest.approx(math.log(60.0))
    from helpers import captions
    images = torch.randn(5, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    ids = captions(6)
    with torch.no_grad():
        ours = run.model.features("text", ids) @ run.model.features("image", images).t()
        expected = F.normalize(reference_text(state, ids), dim=-1) @ F.normalize(reference_image(state, images),
                                                                                 dim=-1).t()
    assert ((ours - expected).abs() / expected.abs().clamp(min=1e-3)).max() < 1e-4


def test_run_sh_test_finds_and_evaluates_a_reference_folder(reference_run, demo_root, tmp_path, monkeypatch):
    import shutil
    folder, _ = reference_run
    work = tmp_path / "work"
    shutil.copytree(folder, work / "logs" / "CUHK-PEDES" / "tbps_reference")
    code = run_tool(["--root_dir", demo_root, "--dataset_name", "Demo-PEDES", "--test_batch_size", "32"], str(work),
                    monkeypatch)
    assert code == 0
    with open(work / "logs" / "summary.md") as f:
        assert "| logs/CUHK-PEDES/tbps_reference | Demo-PEDES |" in f.read()


# ------------------------------------------------------------------------------------------------ training
def tbps_argv(root, out, *extra):
    return train_argv(root, out, "--loss_names", "nitc+ritc+citc+ss", "--image_recipe",
                      "tbps", "--caption_augment", "tbps", "--lr_step", "iteration", "--warmup_epochs", "1",
                      "--warmup_factor", "0.01", "--optimizer", "AdamW", "--no_decay_1d", "true",
                      "--text_attn_dropout", "0.05", *extra, config=plain_smoke())


def test_a_tbps_run_trains_and_resumes_exactly(tiny_root, tmp_path, capsys, monkeypatch):
    from processor.trainer import Trainer
    from utils.errors import UserError
    straight, chained = str(tmp_path / "straight"), str(tmp_path / "chained")
    code, err = run_entry(train.main, tbps_argv(tiny_root, straight, "--num_epoch", "3"), capsys)
    assert code == 0, err
    original = Trainer.train_epoch

    def stop_at_epoch_2(self, epoch):
        if epoch == 2:  # the per-iteration schedule spans all epochs: interrupt the run of 3, do not shorten it
            raise UserError("interrupted")
        return original(self, epoch)

    monkeypatch.setattr(Trainer, "train_epoch", stop_at_epoch_2)
    code, err = run_entry(train.main, tbps_argv(tiny_root, chained, "--num_epoch", "3"), capsys)
    assert code != 0 and "interrupted" in err
    monkeypatch.setattr(Trainer, "train_epoch", original)
    code, err = run_entry(train.main, tbps_argv(tiny_root, chained, "--num_epoch", "3", "--resume"), capsys)
    assert code == 0, err
    runs = [os.path.join(out, "Demo-PEDES", "smoke") for out in (straight, chained)]
    same_final_weights(straight, chained)
    history = json.load(open(os.path.join(runs[0], "history.json")))
    lrs = [h["lr"] for h in history]
    assert lrs[0] > lrs[1] > lrs[2]  # the cosine per iteration, read at each epoch's end
    assert all(math.isfinite(v) for h in history for v in h["losses"].values())
    with open(os.path.join(runs[0], "configs.yaml")) as f:
        config = yaml.safe_load(f)
    assert config["softlabel_ratio"] == 0.5 and config["simclr_temperature"] == 0.1 and "tau" not in config
    code, err = run_entry(test_entry.main, ["--config_file", os.path.join(runs[0], "configs.yaml"), "--root_dir",
                                            tiny_root, "--audit"], capsys)
    assert code == 0, err
