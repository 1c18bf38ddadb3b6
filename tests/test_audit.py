"""`test.py --audit`: exit 0 and a stored table for this project's runs, exit 3 for a published PHP run."""
import json
import os

import pytest

from evaluation.audit import ORDERS, TOLERANCE
from published_layout import write_published_run
import test as test_entry
from utils.cli import run_main


def run_audit_cli(config_file, *extra):
    with pytest.raises(SystemExit) as done:
        run_main(test_entry.main, ["--config_file", config_file, "--audit", *extra])
    return done.value.code


def stored_audit(config_file):
    with open(os.path.join(os.path.dirname(config_file), "test_results.json")) as f:
        return json.load(f)["audit"]


def test_audit_passes_on_this_projects_run(smoke_run, tmp_path, capsys):
    run = tmp_path / "run"
    run.mkdir()
    for name in ("configs.yaml", "best.pth"):
        (run / name).write_bytes(open(os.path.join(smoke_run, name), "rb").read())
    config = str(run / "configs.yaml")
    assert run_audit_cli(config, "--test_batch_size", "16") == 0
    assert "batch-independent" in capsys.readouterr().out
    audit = stored_audit(config)
    assert set(audit["modes"]) == set(ORDERS)
    assert audit["batch_independent"] and audit["max_change"] < TOLERANCE
    assert audit["batch_size"] == 16
    # Same embeddings, so the same metrics in every order.
    r1 = {order: m["R1"] for order, m in audit["modes"].items()}
    assert len(set(r1.values())) == 1, r1


def test_audit_flags_a_published_php_run(demo_root, tmp_path, capsys):
    config = write_published_run(str(tmp_path / "php_published"), "php_v1", dataset_name="Demo-PEDES")
    with pytest.warns(Warning):
        code = run_audit_cli(config, "--root_dir", demo_root, "--test_batch_size", "16")
    assert code == 3
    assert "DEPEND ON THE BATCH" in capsys.readouterr().out
    audit = stored_audit(config)
    assert not audit["batch_independent"]
    assert audit["modes"]["file"]["max_change"] > TOLERANCE
    assert audit["modes"]["single"]["max_change"] == 0.0
