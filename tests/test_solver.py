"""Tests of the solver: parameter groups against the reference rules, optimizers, schedules, resuming."""
import math

import pytest
import torch
from torch import nn

from solver import (LRSchedulerWithWarmup, build_lr_scheduler, build_optimizer, describe_param_groups, lr_at_epoch,
                    param_lr_and_decay)
from utils.config import Config
from utils.errors import UserError


class Toy(nn.Module):
    """Tiny layers under the model's real submodule names."""

    def __init__(self):
        super().__init__()
        self.backbone = nn.Module()
        self.backbone.visual = nn.Module()
        self.backbone.visual.proj = nn.Linear(4, 4)
        self.backbone.visual.frozen_ln = nn.LayerNorm(4)
        self.backbone.visual.frozen_ln.requires_grad_(False)
        self.mlm = nn.Module()
        self.mlm.cross_attn = nn.MultiheadAttention(4, 1)
        self.mlm.ln_pre_t = nn.LayerNorm(4)
        self.mlm.mlm_head = nn.Module()
        self.mlm.mlm_head.fc = nn.Linear(4, 6)
        self.classifier = nn.Linear(4, 3)
        self.php = nn.Module()
        self.php.crfm = nn.Module()
        self.php.crfm.part_tokens = nn.Parameter(torch.randn(2, 4))
        self.php.crfm.ffn = nn.Linear(4, 4)

    def forward(self, x):
        out = self.backbone.visual.proj(x) + self.php.crfm.ffn(x) + self.mlm.ln_pre_t(x)
        out = out + self.mlm.cross_attn(x, x, x)[0] + (self.php.crfm.part_tokens.sum() * x)
        return self.classifier(out).sum() + self.mlm.mlm_head.fc(out).sum()


def make_cfg(**kw) -> Config:
    base = dict(lr=1e-5, bias_lr_factor=2.0, lr_factor=5.0, php_lr_factor=1.0, weight_decay=4e-5,
                weight_decay_bias=0.0)
    base.update(kw)
    return Config().copy(**base)  # copy() sets the methods' options too


# (lr, weight decay) per trainable parameter, worked out by hand from the rules with lr 1e-5, wd 4e-5
EXPECTED = {
    "backbone.visual.proj.weight": (1e-5, 4e-5),
    "backbone.visual.proj.bias": (2e-5, 0.0),
    "mlm.cross_attn.in_proj_weight": (5e-5, 4e-5),  # `cross` -> lr_factor
    "mlm.cross_attn.in_proj_bias": (2e-5, 0.0),  # bias under `cross` -> the bias factor wins
    "mlm.cross_attn.out_proj.weight": (5e-5, 4e-5),
    "mlm.cross_attn.out_proj.bias": (2e-5, 0.0),
    "mlm.ln_pre_t.weight": (1e-5, 4e-5),  # no `cross` in the name -> base lr
    "mlm.ln_pre_t.bias": (2e-5, 0.0),
    "mlm.mlm_head.fc.weight": (5e-5, 4e-5),
    "mlm.mlm_head.fc.bias": (5e-5, 0.0),  # head bias: lr_factor lr, bias decay
    "classifier.weight": (5e-5, 4e-5),
    "classifier.bias": (5e-5, 0.0),
    "php.crfm.part_tokens": (1e-5, 4e-5),
    "php.crfm.ffn.weight": (1e-5, 4e-5),
    "php.crfm.ffn.bias": (2e-5, 0.0),
}


def test_param_lr_and_decay_follows_reference_rules():
    cfg = make_cfg()
    names = [n for n, p in Toy().named_parameters() if p.requires_grad]
    assert sorted(names) == sorted(EXPECTED)
    for name in names:
        assert param_lr_and_decay(name, cfg) == pytest.approx(EXPECTED[name], rel=1e-12), name


def test_php_lr_factor_scales_only_the_php_head():
    cfg = make_cfg(php_lr_factor=3.0)
    assert param_lr_and_decay("php.crfm.part_tokens", cfg) == pytest.approx((3e-5, 4e-5))
    assert param_lr_and_decay("php.crfm.ffn.bias", cfg) == pytest.approx((6e-5, 0.0))
    assert param_lr_and_decay("backbone.visual.proj.weight", cfg) == pytest.approx((1e-5, 4e-5))
    assert param_lr_and_decay("classifier.bias", cfg) == pytest.approx((5e-5, 0.0))


def _group_members(optimizer, model):
    names = {id(p): n for n, p in model.named_parameters()}
    return {g["name"]: sorted(names[id(p)] for p in g["params"]) for g in optimizer.param_groups}


def test_groups_are_merged_and_frozen_params_left_out():
    model = Toy()
    opt = build_optimizer(make_cfg(), model)
    members = _group_members(opt, model)
    assert members == {
        "base+php": ["backbone.visual.proj.weight", "mlm.ln_pre_t.weight", "php.crfm.ffn.weight",
                     "php.crfm.part_tokens"],
        "bias+php_bias": ["backbone.visual.proj.bias", "mlm.cross_attn.in_proj_bias",
                          "mlm.cross_attn.out_proj.bias", "mlm.ln_pre_t.bias", "php.crfm.ffn.bias"],
        "lr_factor": ["classifier.weight", "mlm.cross_attn.in_proj_weight", "mlm.cross_attn.out_proj.weight",
                      "mlm.mlm_head.fc.weight"],
        "lr_factor_bias": ["classifier.bias", "mlm.mlm_head.fc.bias"],
    }
    for group in opt.param_groups:
        name = _group_members(opt, model)[group["name"]][0]
        assert (group["lr"], group["weight_decay"]) == pytest.approx(EXPECTED[name])
    in_groups = {id(p) for g in opt.param_groups for p in g["params"]}
    assert all(id(p) not in in_groups for p in model.backbone.visual.frozen_ln.parameters())


def test_php_factor_splits_php_into_own_groups():
    model = Toy()
    opt = build_optimizer(make_cfg(php_lr_factor=0.5), model)
    members = _group_members(opt, model)
    assert members["php"] == ["php.crfm.ffn.weight", "php.crfm.part_tokens"]
    assert members["php_bias"] == ["php.crfm.ffn.bias"]
    lrs = {g["name"]: g["lr"] for g in opt.param_groups}
    assert lrs["php"] == pytest.approx(5e-6) and lrs["php_bias"] == pytest.approx(1e-5)
    assert len(opt.param_groups) == 6


@pytest.mark.parametrize("name, cls, eps_in, eps_out", [
    ("Adam", torch.optim.Adam, None, 1e-3),
    ("AdamW", torch.optim.AdamW, None, 1e-8),
    ("Adam", torch.optim.Adam, 1e-6, 1e-6),
])
def test_adam_family(name, cls, eps_in, eps_out):
    opt = build_optimizer(make_cfg(optimizer=name, optimizer_eps=eps_in, alpha=0.8, beta=0.99), Toy())
    assert type(opt) is cls
    assert opt.defaults["betas"] == (0.8, 0.99)
    assert opt.defaults["eps"] == eps_out
    # float parameters all on the CPU: the fused kernel
    assert opt.defaults["fused"] is True and not opt.defaults["foreach"]


def test_sgd_and_a_real_step():
    model = Toy()
    opt = build_optimizer(make_cfg(optimizer="SGD", momentum=0.7), model)
    assert type(opt) is torch.optim.SGD
    assert opt.defaults["momentum"] == 0.7 and opt.defaults["fused"] is True  # skips non-finite steps on the device
    before = model.classifier.bias.detach().clone()
    model(torch.randn(3, 4)).backward()
    grad = model.classifier.bias.grad.clone()
    opt.step()
    # first SGD step with momentum: p -= lr * (g + wd * p); classifier bias: lr 5e-5, wd 0
    assert torch.allclose(model.classifier.bias.detach(), before - 5e-5 * grad, atol=1e-9)


def _table_rows(text):
    return {line.split("|")[1].strip(): [c.strip() for c in line.split("|")[2:-1]]
            for line in text.splitlines() if line.startswith("|")}


def test_describe_param_groups():
    opt = build_optimizer(make_cfg(), Toy())
    text = describe_param_groups(opt)
    for word in ("group", "lr", "weight decay", "#params", "#tensors", "base+php", "lr_factor_bias", "total"):
        assert word in text
    rows = _table_rows(text)
    # classifier.bias (3) + mlm_head.fc.bias (6)
    assert rows["lr_factor_bias"] == ["5e-05", "0", "9", "2"]
    assert rows["total"][2:] == [str(sum(p.numel() for p in Toy().parameters() if p.requires_grad)), "15"]


PHP = dict(lr=3e-6, num_epoch=60, warmup_epochs=5, warmup_factor=0.1, warmup_method="linear",
           lrscheduler="cosine", target_lr=0.0)


def sched_cfg(**kw) -> Config:
    values = dict(PHP)
    values.update(kw)
    return Config(**values)


@pytest.mark.parametrize("kw, epoch, expected", [
    # the PHP paper's schedule
    ({}, 1, 3e-7),
    ({}, 2, 3e-6 * 0.28),
    ({}, 5, 3e-6 * (0.1 * 0.2 + 0.8)),
    ({}, 6, 3e-6),
    ({}, 33, 3e-6 * 0.5 * (1 + math.cos(math.pi * 27 / 55))),
    ({}, 60, 3e-6 * 0.5 * (1 + math.cos(math.pi * 54 / 55))),
    ({}, 61, 0.0),  # past the end the schedule holds its final value
    ({"warmup_epochs": 0}, 1, 3e-6),
    ({"target_lr": 1e-7}, 60, 1e-7 + 2.9e-6 * 0.5 * (1 + math.cos(math.pi * 54 / 55))),
    # warm-up shapes
    ({"warmup_method": "constant"}, 3, 3e-7),
    ({"warmup_method": "exp"}, 1, 3e-7),
    ({"warmup_method": "exp"}, 3, 3e-6 * 0.1 ** 0.6),
    # step: milestones count once t = epoch - 1 reaches them
    ({"lrscheduler": "step", "milestones": [20, 50], "gamma": 0.1}, 20, 3e-6),
    ({"lrscheduler": "step", "milestones": [20, 50], "gamma": 0.1}, 21, 3e-7),
    ({"lrscheduler": "step", "milestones": [20, 50], "gamma": 0.1}, 51, 3e-8),
    ({"lrscheduler": "step", "milestones": [20, 50], "gamma": 0.1}, 3, 3e-6 * 0.46),
    ({"lrscheduler": "linear", "target_lr": 1e-7}, 17, 1e-7 + 2.9e-6 * 0.8),
])
def test_lr_at_epoch(kw, epoch, expected):
    assert lr_at_epoch(sched_cfg(**kw), 3e-6, epoch) == pytest.approx(expected, rel=1e-9, abs=1e-20)


# Epoch e after the 5 warm-up epochs of 60 has r = (e - 6) / 55: epoch 6 -> 0, 17 -> 0.2, 28 -> 0.4, 39 -> 0.6,
# 60 -> 54/55, 61 -> 1 (held). gamma and power always differ, so a formula reading the wrong one fails. The
# expected lrs were worked out apart from the code (decimal powers, 3e-6 base) and are written out.
@pytest.mark.parametrize("kw, epoch, expected", [
    # poly: target_lr + (b - target_lr) * power ** (1 - r)
    ({"lrscheduler": "poly", "power": 0.9, "gamma": 0.5}, 6, 2.7e-6),  # 3e-6 * 0.9
    ({"lrscheduler": "poly", "power": 0.9, "gamma": 0.5}, 39, 2.87619454654e-6),  # 3e-6 * 0.9 ** 0.4
    ({"lrscheduler": "poly", "power": 0.9, "gamma": 0.5}, 60, 2.99425856382e-6),  # 3e-6 * 0.9 ** (1 / 55)
    ({"lrscheduler": "poly", "power": 0.9, "gamma": 0.5}, 61, 3e-6),
    ({"lrscheduler": "poly", "power": 0.5, "gamma": 0.1, "target_lr": 1e-7}, 17,
     1.76561261475e-6),  # 1e-7 + 2.9e-6 * 0.5 ** 0.8
    # exp: b * power ** r
    ({"lrscheduler": "exp", "power": 0.9, "gamma": 0.5}, 6, 3e-6),
    ({"lrscheduler": "exp", "power": 0.9, "gamma": 0.5}, 39, 2.81622118008e-6),  # 3e-6 * 0.9 ** 0.6
    ({"lrscheduler": "exp", "power": 0.9, "gamma": 0.5}, 60, 2.70517720075e-6),  # 3e-6 * 0.9 ** (54 / 55)
    ({"lrscheduler": "exp", "power": 0.9, "gamma": 0.5}, 61, 2.7e-6),
    ({"lrscheduler": "exp", "power": 0.1, "gamma": 0.9, "target_lr": 1e-7}, 28,
     1.19432151166e-6),  # 3e-6 * 0.1 ** 0.4; target_lr plays no part
    # polynomial: target_lr + (b - target_lr) * (1 - r) ** power
    ({"lrscheduler": "polynomial", "power": 0.9, "gamma": 0.5}, 6, 3e-6),
    ({"lrscheduler": "polynomial", "power": 0.9, "gamma": 0.5}, 28, 1.89433760247e-6),  # 3e-6 * 0.6 ** 0.9
    ({"lrscheduler": "polynomial", "power": 2.0, "gamma": 0.5, "target_lr": 1e-7}, 28,
     1.144e-6),  # 1e-7 + 2.9e-6 * 0.36
    ({"lrscheduler": "polynomial", "power": 0.9, "gamma": 0.5, "target_lr": 1e-7}, 61, 1e-7),
    # exp_gamma: b * gamma ** r
    ({"lrscheduler": "exp_gamma", "gamma": 0.1, "power": 0.9}, 6, 3e-6),
    ({"lrscheduler": "exp_gamma", "gamma": 0.1, "power": 0.9}, 39, 7.53565929453e-7),  # 3e-6 * 0.1 ** 0.6
    ({"lrscheduler": "exp_gamma", "gamma": 0.1, "power": 0.9, "target_lr": 1e-7}, 61, 3e-7),
])
def test_decay_formulas(kw, epoch, expected):
    assert lr_at_epoch(sched_cfg(**kw), 3e-6, epoch) == pytest.approx(expected, rel=1e-10)


@pytest.mark.parametrize("kw, key", [
    ({"warmup_epochs": 60}, "warmup_epochs"),
    ({"lrscheduler": "poly", "warmup_epochs": 70}, "warmup_epochs"),
    ({"lrscheduler": "step", "milestones": [50, 20]}, "milestones"),
    ({"warmup_epochs": -1}, "warmup_epochs"),
    ({"lrscheduler": "cosinus"}, "lrscheduler"),
])
def test_invalid_schedules_name_the_option(kw, key):
    with pytest.raises(UserError, match=f"'{key}'"):
        lr_at_epoch(sched_cfg(**kw), 3e-6, 1)
    with pytest.raises(UserError, match=f"'{key}'"):
        build_lr_scheduler(sched_cfg(**kw), build_optimizer(make_cfg(), Toy()))


def test_step_schedule_allows_warmup_to_the_end():
    assert lr_at_epoch(sched_cfg(lrscheduler="step", warmup_epochs=60), 3e-6, 60) == pytest.approx(
        3e-6 * (0.1 * 1 / 60 + 59 / 60))


def _train(model, opt, sched, epochs, seed):
    gen = torch.Generator().manual_seed(seed)
    seen = []
    for _ in range(epochs):
        seen.append([g["lr"] for g in opt.param_groups])
        opt.zero_grad()
        model(torch.randn(3, 4, generator=gen)).backward()
        opt.step()
        sched.step()
    return seen


def test_scheduler_applies_the_formula_to_every_group():
    cfg = make_cfg(lr=3e-6, **{k: v for k, v in PHP.items() if k != "lr"})
    model = Toy()
    opt = build_optimizer(cfg, model)
    sched = build_lr_scheduler(cfg, opt)
    assert isinstance(sched, LRSchedulerWithWarmup) and isinstance(sched, torch.optim.lr_scheduler.LRScheduler)
    lrs = {g["name"]: g["lr"] for g in opt.param_groups}
    assert lrs["base+php"] == pytest.approx(3e-7) and lrs["lr_factor_bias"] == pytest.approx(1.5e-6)
    seen = _train(model, opt, sched, 8, seed=0)
    for epoch, lrs in enumerate(seen, start=1):
        assert lrs == pytest.approx([lr_at_epoch(cfg, g["initial_lr"], epoch) for g in opt.param_groups])
    assert seen[5] == pytest.approx([g["initial_lr"] for g in opt.param_groups])  # epoch 6: warm-up done
    assert sched.last_epoch == 8
    assert _table_rows(describe_param_groups(opt))["base+php"][0] == "3e-06"  # base lr, not the current one


@pytest.mark.parametrize("order", ["optimizer_first", "scheduler_first", "scheduler_only"])
def test_state_dict_round_trip_mid_training(tmp_path, order):
    cfg = make_cfg(lr=3e-6, **{k: v for k, v in PHP.items() if k != "lr"})
    torch.manual_seed(0)
    model = Toy()
    opt = build_optimizer(cfg, model)
    sched = build_lr_scheduler(cfg, opt)
    _train(model, opt, sched, 3, seed=1)
    path = tmp_path / "ckpt.pth"
    torch.save({"model": model.state_dict(), "optimizer": opt.state_dict(), "scheduler": sched.state_dict()},
               path)
    ckpt = torch.load(path, weights_only=True)

    torch.manual_seed(5)
    model2 = Toy()
    model2.load_state_dict(ckpt["model"])
    opt2 = build_optimizer(cfg, model2)
    sched2 = build_lr_scheduler(cfg, opt2)
    assert opt2.param_groups[0]["lr"] == pytest.approx(3e-7)  # fresh: epoch 1
    if order == "optimizer_first":
        opt2.load_state_dict(ckpt["optimizer"])
    sched2.load_state_dict(ckpt["scheduler"])
    if order == "scheduler_first":
        opt2.load_state_dict(ckpt["optimizer"])
    assert sched2.last_epoch == 3
    assert [g["lr"] for g in opt2.param_groups] == pytest.approx([g["lr"] for g in opt.param_groups])
    assert opt2.param_groups[0]["lr"] == pytest.approx(3e-6 * (0.1 * 0.4 + 0.6))  # epoch 4
    assert sched2.get_last_lr() == pytest.approx(sched.get_last_lr())

    if order == "scheduler_only":  # a fresh optimizer state: only the lrs are checked
        return
    seen = _train(model, opt, sched, 4, seed=2)
    seen2 = _train(model2, opt2, sched2, 4, seed=2)
    assert seen2 == seen
    for p, p2 in zip(model.parameters(), model2.parameters()):
        assert torch.equal(p, p2)


def test_loading_a_state_with_other_groups_fails_clearly():
    opt = build_optimizer(make_cfg(), Toy())
    state = build_lr_scheduler(sched_cfg(), opt).state_dict()
    other = build_optimizer(make_cfg(php_lr_factor=2.0), Toy())
    with pytest.raises(UserError, match="parameter groups"):
        build_lr_scheduler(sched_cfg(), other).load_state_dict(state)
