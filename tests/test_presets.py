"""Every preset of configs/ reads, validates and sets only options of the components it uses, so that `sh run.sh
<preset>` cannot fail on its own file after minutes of data preparation."""
import os

import pytest

import model  # noqa: F401  (registers the methods' heads and losses, whose options the presets set)
from helpers import ROOT
from processor.components import check_unused_options
from utils.config import build_config

CONFIGS = os.path.join(ROOT, "configs")
PRESETS = sorted(name[:-len(".yaml")] for name in os.listdir(CONFIGS) if name.endswith(".yaml"))


def test_the_presets_are_found():
    assert {"demo", "smoke", "clip_demo", "irra_demo", "rde_demo", "tbps_demo", "php_cuhk", "tbps_rstp"} <= set(PRESETS)


@pytest.mark.parametrize("preset", PRESETS)
def test_a_preset_reads_and_uses_every_option_it_sets(preset):
    cfg = build_config(os.path.join(CONFIGS, f"{preset}.yaml"))
    check_unused_options(cfg)
    assert cfg.num_epoch > cfg.warmup_epochs


def test_clip_demo_trains_on_a_set_of_its_own():
    """The CLIP-like start of the Demo presets must not have seen their training pairs."""
    start = build_config(os.path.join(CONFIGS, "clip_demo.yaml"))
    for preset in ("demo", "irra_demo", "rde_demo", "tbps_demo"):
        cfg = build_config(os.path.join(CONFIGS, f"{preset}.yaml"))
        assert (cfg.dataset_name, cfg.demo_seed) == ("Demo-PEDES", 0) and start.demo_seed != cfg.demo_seed
        assert (cfg.img_size, cfg.text_length, cfg.pretrain_choice) == (start.img_size, start.text_length,
                                                                        start.pretrain_choice)
