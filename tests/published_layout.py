"""Synthetic published run folders, built from the key listings in ../shared/reference (or a copy in tests/data).

`published_state_dict(kind, scale=...)` returns a state dict with every key, shape and dtype of the listing;
scaled down, each ViT-B/16 size is replaced consistently by a small one so the model is cheap to run.
"""
from __future__ import annotations

import os
from typing import Dict, Optional

import torch
import yaml

HERE = os.path.dirname(os.path.abspath(__file__))
# rde_*: written here from SPEC 12 (the base_model.* keys of IRRA's listing, then the TSE layers in the reference's
# spelling, Linear weights fp16, BatchNorm fp32), as no listing of a published RDE checkpoint ships with the spec.
LISTINGS = {"php_v1": "php_v1_state_dict_keys.tsv", "irra": "irra_state_dict_keys.tsv",
            "rde": "rde_state_dict_keys.tsv"}
CONFIGS = {"php_v1": "php_v1_configs.yaml", "irra": "irra_configs.yaml", "rde": "rde_configs.yaml"}
_DTYPES = {"float16": torch.float16, "float32": torch.float32, "int64": torch.int64}


def reference_file(name: str) -> str:
    return os.path.join(HERE, "data", "reference", name)


def read_listing(kind: str):
    with open(reference_file(LISTINGS[kind])) as f:
        rows = [line.rstrip("\n").split("\t") for line in f][1:]
    return [(k, () if s == "scalar" else tuple(int(x) for x in s.split("x")), _DTYPES[d]) for k, s, d in rows]


# Small sizes: vision width 128, text/joint width 64, 2 layers per tower, 1 EFP block, a 64x32 image, 5 classes.
SMALL = {"vision_width": 128, "text_width": 64, "layers": 2, "moe_layers": 1, "img_size": (64, 32),
         "num_classes": 5}


def _small_size(dim: int, small: dict) -> int:
    wv, wt = small["vision_width"], small["text_width"]
    grid = (small["img_size"][0] // 16) * (small["img_size"][1] // 16)
    table = {768: wv, 3072: 4 * wv, 2304: 3 * wv, 512: wt, 2048: 4 * wt, 1536: 3 * wt, 64: wt // 8,
             193: 1 + grid, 11003: small["num_classes"], 1024: 2 * wt}
    return table.get(dim, dim)


def published_state_dict(kind: str, small: Optional[dict] = None, device: str = "cpu",
                         seed: int = 0) -> Dict[str, torch.Tensor]:
    """Every key of the listing; values random (normal * 0.02, LayerNorm weights near 1) unless on `meta`."""
    gen = torch.Generator().manual_seed(seed)
    out = {}
    for key, shape, dtype in read_listing(kind):
        if small is not None:
            parts = key.split(".")
            if "resblocks" in parts:
                index = int(parts[parts.index("resblocks") + 1])
                limit = small["moe_layers"] if key.startswith("shared_transformer") else small["layers"]
                if index >= limit:
                    continue
            shape = tuple(_small_size(d, small) for d in shape)
        if device == "meta":
            out[key] = torch.empty(shape, dtype=dtype, device="meta")
        elif dtype == torch.int64:
            out[key] = torch.zeros(shape, dtype=dtype)
        else:
            value = torch.randn(shape, generator=gen) * 0.02
            if key.endswith(("ln_1.weight", "ln_2.weight", "ln_3.weight", "ln_pre.weight", "ln_post.weight",
                             "ln_final.weight", "norm.weight", "feed.0.weight", "ln.weight",
                             "ln_pre_t.weight", "ln_pre_i.weight")):
                value = value + 1.0
            if key.endswith("feed_forward.alpha"):
                value = torch.tensor(0.5)
            if ".bns." in key and key.endswith(".weight"):
                value = value + 1.0
            if key.endswith("running_var"):
                value = value.abs() + 0.5
            out[key] = value.to(dtype)
    return out


def write_published_run(run_dir: str, kind: str, small: Optional[dict] = None, seed: int = 0,
                        **config_updates) -> str:
    """A run folder as the reference publishes it: configs.yaml (with its tuple tags) and best.pth."""
    small = small or SMALL
    os.makedirs(run_dir, exist_ok=True)
    with open(reference_file(CONFIGS[kind])) as f:
        text = f.read()
    h, w = small["img_size"]
    text = text.replace("img_size: !!python/tuple\n- 384\n- 128", f"img_size: !!python/tuple\n- {h}\n- {w}")
    for key, value in config_updates.items():
        lines = [ln for ln in text.splitlines() if not ln.startswith(f"{key}:")]
        text = "\n".join(lines + [yaml.safe_dump({key: value}).strip()]) + "\n"
    with open(os.path.join(run_dir, "configs.yaml"), "w") as f:
        f.write(text)
    state = published_state_dict(kind, small, seed=seed)
    torch.save({"model": state, "optimizer": None, "scheduler": None, "num_epoch": 60, "iteration": 0,
                "epoch": 60}, os.path.join(run_dir, "best.pth"))
    return os.path.join(run_dir, "configs.yaml")
