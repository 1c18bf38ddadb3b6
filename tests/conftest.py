"""The tests' shared fixtures: a small generated Demo-PEDES, one smoke training run (both made once per session), a
tiny Demo-PEDES per module, copies of the smoke run, and probes of the logger and of the image encoder. Plain
helpers are in tests/helpers.py."""
import os
import shutil

# The tests run tiny models that gain nothing from a second thread, while on a busy machine OpenMP threads that
# wait for each other slowed the suite by 10x and more. Set before torch is imported; subprocesses inherit it.
os.environ.setdefault("OMP_NUM_THREADS", "1")

import pytest  # noqa: E402

from helpers import ROOT, SMOKE_CONFIG, TINY  # noqa: E402

# pytest.ini puts the project on this process's import path; subprocesses (train.py in a child, torchrun workers,
# `python -c` snippets) get it the way run.sh gives it to the tools.
os.environ["PYTHONPATH"] = os.pathsep.join(p for p in (ROOT, os.environ.get("PYTHONPATH", "")) if p)

# Identities per split of the test-sized Demo-PEDES (the full set has 600 / 100 / 200).
DEMO_TEST_SIZES = {"num_train_ids": 60, "num_val_ids": 20, "num_test_ids": 20, "images_per_id": 4}


@pytest.fixture(scope="session")
def demo_root(tmp_path_factory):
    """A data root holding a small Demo-PEDES (60 / 20 / 20 identities, 4 images each)."""
    from datasets.demo_pedes import generate_demo_pedes
    root = tmp_path_factory.mktemp("data")
    generate_demo_pedes(os.path.join(str(root), "Demo-PEDES"), seed=0, **DEMO_TEST_SIZES)
    return str(root)


@pytest.fixture(scope="session")
def smoke_run(demo_root, tmp_path_factory):
    """The run folder of `configs/smoke.yaml` trained on the small Demo-PEDES (2 epochs, evaluated each)."""
    import train
    from utils.cli import run_main
    out = str(tmp_path_factory.mktemp("logs"))
    with pytest.raises(SystemExit) as done:
        run_main(train.main, ["--config_file", SMOKE_CONFIG, "--root_dir", demo_root, "--output_dir", out])
    assert done.value.code == 0
    return os.path.join(out, "Demo-PEDES", "smoke")


@pytest.fixture(scope="module")
def tiny_root(tmp_path_factory):
    """A data root holding the tiny Demo-PEDES (8 / 4 / 2 identities, 2 images each)."""
    from datasets.demo_pedes import generate_demo_pedes
    root = str(tmp_path_factory.mktemp("tiny"))
    generate_demo_pedes(os.path.join(root, "Demo-PEDES"), seed=0, **TINY)
    return root


@pytest.fixture()
def run_copy(smoke_run, tmp_path):
    """A private copy of the smoke run (configs.yaml + best.pth) that a test may modify."""
    folder = tmp_path / "run"
    folder.mkdir()
    for name in ("configs.yaml", "best.pth"):
        shutil.copy2(os.path.join(smoke_run, name), folder / name)
    return str(folder)


@pytest.fixture()
def encode_calls(monkeypatch):
    """Counts the images the model embeds (RetrievalModel.embed, which every scoring path calls)."""
    from model.retrieval_model import RetrievalModel
    calls = {"images": 0}
    original = RetrievalModel.embed

    def counting(self, modality, inputs):
        if modality == "image":
            calls["images"] += inputs.shape[0]
        return original(self, modality, inputs)

    monkeypatch.setattr(RetrievalModel, "embed", counting)
    return calls


@pytest.fixture
def php_log():
    """The messages of the project's logger 'php' during a test. (pytest's caplog watches the root logger, which
    'php' stops propagating to once an entry point has set it up, so caplog would depend on the test order.)"""
    import logging
    records = []
    handler = logging.Handler()
    handler.emit = lambda record: records.append(record.getMessage())
    logger = logging.getLogger("php")
    level = logger.level
    logger.addHandler(handler)
    logger.setLevel(logging.DEBUG)
    yield records
    logger.removeHandler(handler)
    logger.setLevel(level)
