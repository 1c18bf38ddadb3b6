"""The order of a model's parameters, and of its optimizer's groups, is the one of the checkpoints written before the
methods became packages (tests/data/parameter_order.json, recorded by that code): a saved optimizer state lists
parameters by position, so an old run resumes onto the same tensors. It follows each head's declared `order`, not
the order in which the methods' modules were imported."""
import hashlib
import json
import os

import pytest

from helpers import ROOT
from model import build_model
from solver import build_optimizer
from utils.config import build_config

RECORD = os.path.join(ROOT, "tests", "data", "parameter_order.json")
CASES = {"smoke": ("smoke", {}), "demo": ("demo", {}), "irra_demo": ("irra_demo", {}), "rde_demo": ("rde_demo", {}),
         "tbps_demo": ("tbps_demo", {}), "php+irra": ("demo", {"loss_names": "sdm+itc+aux+id+mlm"}),
         "rde+irra": ("rde_demo", {"loss_names": "tal+id+mlm"}),
         "tbps+irra": ("tbps_demo", {"loss_names": "nitc+ritc+citc+ss+id+mlm"})}


def order_of(preset, extra):
    cfg = build_config(os.path.join(ROOT, "configs", f"{preset}.yaml"),
                       {"pretrain_choice": "ViT-Tiny", "img_size": [32, 16], "text_length": 16, **extra})
    model = build_model(cfg, 8)
    names = [n for n, _ in model.named_parameters()]
    ids = {id(p): n for n, p in model.named_parameters()}
    groups = [[ids[id(p)] for p in g["params"]] for g in build_optimizer(cfg, model).param_groups]
    text = json.dumps({"params": names, "groups": groups})
    return {"sha256": hashlib.sha256(text.encode()).hexdigest(), "params": len(names),
            "groups": [len(g) for g in groups]}


@pytest.mark.parametrize("case", list(CASES))
def test_parameters_keep_the_order_checkpoints_were_written_in(case):
    with open(RECORD) as f:
        recorded = json.load(f)["cases"][case]
    assert order_of(*CASES[case]) == recorded


def test_the_order_follows_the_heads_declared_order(monkeypatch):
    """Declaring another order for a head moves its parameters: the record would catch a change of it."""
    import dataclasses
    from model.registry import HEADS
    before = order_of(*CASES["php+irra"])
    monkeypatch.setitem(HEADS, "php", dataclasses.replace(HEADS["php"], order=1000))
    assert order_of(*CASES["php+irra"])["sha256"] != before["sha256"]
