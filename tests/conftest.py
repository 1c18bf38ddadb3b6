"""Shared fixtures: a small generated Demo-PEDES set and one smoke training run, made once per test session."""
import os
import sys

# The tests run tiny models that gain nothing from a second thread, while on a busy machine OpenMP threads that
# wait for each other slowed the suite by 10x and more. Set before torch is imported; subprocesses inherit it.
os.environ.setdefault("OMP_NUM_THREADS", "1")

import pytest  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
for path in (ROOT, os.path.join(ROOT, "tests")):
    if path not in sys.path:
        sys.path.insert(0, path)

SMOKE_CONFIG = os.path.join(ROOT, "configs", "smoke.yaml")
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
    out = str(tmp_path_factory.mktemp("logs"))
    with pytest.raises(SystemExit) as done:
        from utils.cli import run_main
        run_main(train.main, ["--config_file", SMOKE_CONFIG, "--root_dir", demo_root, "--output_dir", out])
    assert done.value.code == 0
    return os.path.join(out, "Demo-PEDES", "smoke")


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
