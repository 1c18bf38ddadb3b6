"""Demo-PEDES as a registered data set: the set of `demo_seed` under `root_dir`, generated on first use.

It is written in the CUHK-PEDES layout by datasets/demo_pedes.py: seed 0 in `<root>/Demo-PEDES`, seed N in
`<root>/Demo-PEDES_seed<N>`; an existing set must have been generated with that seed (its generator.json says so;
a set without one predates the record and counts as seed 0).
"""
from __future__ import annotations

import os
from dataclasses import replace

from datasets import cuhkpedes
from datasets.base import Annotations, read_annotation_file
from datasets.registry import register_dataset

FORMAT = replace(cuhkpedes.FORMAT, name="Demo-PEDES", folder="Demo-PEDES")


@register_dataset("Demo-PEDES", layout=FORMAT)
def demo_annotations(cfg) -> Annotations:
    # Imported here: loading any other data set should not pull in the generator and its renderer.
    from datasets import demo_pedes

    fmt = replace(FORMAT, folder=demo_pedes.folder_name(cfg.demo_seed))
    dataset_dir = os.path.join(cfg.root_dir, fmt.folder)
    if os.path.isfile(os.path.join(dataset_dir, fmt.annotation_files[0])):
        demo_pedes.check_generated(dataset_dir, cfg.demo_seed)
    else:
        os.makedirs(dataset_dir, exist_ok=True)
        demo_pedes.generate_demo_pedes(dataset_dir, seed=cfg.demo_seed)
    return read_annotation_file(fmt, cfg.root_dir)
