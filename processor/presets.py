"""Train and test a preset, once or once per seed: the job of `sh run.sh <preset> [--seeds N ...] [--key value ...]`.

For each run it checks that the data set and the weights are where the config says (`problems`), trains it
(named `<name>_seed<N>` per seed), and tests it. A run that already has a last.pth is never overwritten: a
finished one is only tested again, a partly trained one resumes. It stops at the first run that fails.
"""
from __future__ import annotations

import logging
import os
from typing import List, Optional, Sequence, Tuple

from datasets import dataset_from_config
from datasets.base import PedesDataset
from evaluation.testing import TestRequest, test_run, test_trained
from model.backbone import resolve_pretrained_path
from processor.training import train
from utils.config import Config, validate
from utils.errors import UserError
from utils.logger import setup_logger

logger = logging.getLogger("php")


def problems(cfg: Config) -> List[str]:
    """What the run of `cfg` needs and does not find (its data set, its pretrained weights), one line each."""
    return prepare(cfg, check_images=False)[0]


def prepare(cfg: Config, check_images: bool = True) -> Tuple[List[str], Optional[PedesDataset]]:
    """(what the run needs and does not find, one line each; the run's data set when it could be built): the data
    set is built here once, and the run trains and tests on it (a generated one, Demo-PEDES, is built by
    training, on first use)."""
    dataset, found = None, []
    if cfg.dataset_name != "Demo-PEDES":
        try:
            dataset = dataset_from_config(cfg, check_images=check_images)
        except UserError as e:
            found.append(str(e))
    try:
        resolve_pretrained_path(cfg.pretrain_choice, cfg.pretrained_dir)
    except UserError as e:
        found.append(str(e))
    return found, dataset


def seed_runs(cfg: Config, seeds: Optional[Sequence[int]], seed_given: bool = False) -> List[Config]:
    """The runs of a preset: `cfg` itself, or one copy per seed named `<name>_seed<N>`."""
    if seeds is None:
        return [cfg]
    if seed_given:
        raise UserError("command line: --seed and --seeds both given; give the seeds after --seeds only")
    if not seeds:
        raise UserError("command line: --seeds needs at least one seed, e.g. --seeds 1 2 3")
    if len(set(seeds)) != len(seeds):
        twice = next(s for s in seeds if seeds.count(s) > 1)
        raise UserError(f"command line: --seeds lists seed {twice} twice")
    for seed in seeds:
        if seed < 0:
            raise UserError(f"command line: --seeds takes seeds of 0 or more; got {seed}")
    return [validate(cfg.copy(seed=seed, name=f"{cfg.name}_seed{seed}"), "command line") for seed in seeds]


def train_and_test(cfg: Config, config_file: str = "") -> int:
    """One run: check what it needs, train it (or resume it), test it; the test's exit code. The config, the data
    set and the model are built once: the test takes the trained model in memory (the best epoch's weights) on the
    data set it trained on; a compiled model is tested as test.py tests the run folder, uncompiled."""
    missing, dataset = prepare(cfg)
    if missing:
        raise UserError("; ".join(f"missing: {line}" for line in missing))
    if os.path.isfile(os.path.join(cfg.run_dir, "last.pth")):
        print(f"note: {cfg.run_dir} already holds a run; continuing it (use another --name for a new one)",
              flush=True)
        cfg = cfg.copy(resume=True)
    result = train(cfg, config_file, dataset)
    setup_logger()  # the test's log goes to the console, not to the run's train_log.txt
    trained = result.trained
    if trained is not None and trained.cfg.torch_compile == "none":
        return test_trained(trained.cfg, trained.model, trained.dataset, result.run_dir)
    return test_run(TestRequest(os.path.join(cfg.run_dir, "configs.yaml")))


def run_preset(cfg: Config, seeds: Optional[Sequence[int]] = None, config_file: str = "",
               seed_given: bool = False) -> int:
    """Every run of the preset in turn (see seed_runs); stops at the first non-zero exit code."""
    runs = seed_runs(cfg, seeds, seed_given)
    for run in runs:
        if seeds is not None:
            print(f"== seed {run.seed}: run {run.name}", flush=True)
        code = train_and_test(run, config_file)
        if code:
            return code
    return 0
