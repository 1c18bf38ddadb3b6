"""`sh run.sh methods`: every method's Demo preset trained and tested under one protocol, one row per method in
logs/methods.md and .csv, rebuilt from the runs' own files."""
import csv
import json
import os
import statistics
import subprocess

import pytest

from helpers import ROOT, assert_one_error_line, run_entry
from processor import methods as M
from tools import methods as tool

# Trains four methods: not in the quick subset (pytest -m "not slow").
pytestmark = pytest.mark.slow

# Every Demo preset shrunk to seconds: the tiny backbone and image, one epoch, no warm-up.
TINY_RUN = ["--pretrain_choice", "ViT-Tiny", "--img_size", "32", "16", "--text_length", "32", "--num_epoch", "1",
            "--warmup_epochs", "0", "--batch_size", "8", "--test_batch_size", "64", "--precision", "fp32",
            "--eval_period", "1"]


@pytest.fixture(scope="module")
def table(tiny_root, tmp_path_factory):
    """The methods table of the four Demo presets, two seeds each, on the tiny Demo-PEDES."""
    out = tmp_path_factory.mktemp("methods") / "logs"
    argv = ["--seeds", "1", "2", "--jobs", "2", "--root_dir", tiny_root, "--output_dir", str(out), *TINY_RUN]
    assert tool.main(argv) == 0
    return out, argv


def read_csv(path):
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def test_one_row_per_method_with_the_mean_and_std_of_its_seeds(table):
    out, _ = table
    rows = read_csv(out / "methods.csv")
    assert [r["method"] for r in rows] == ["IRRA", "PHP", "RDE", "TBPS-CLIP"]
    assert [r["preset"] for r in rows] == ["irra_demo", "demo", "rde_demo", "tbps_demo"]
    for row, method in zip(rows, M.table_methods()):
        name = M.build_config(os.path.join(ROOT, "configs", f"{method.demo}.yaml")).name
        tests = []
        for seed in (1, 2):
            with open(out / "Demo-PEDES" / f"{name}_seed{seed}" / "test_results.json") as f:
                tests.append(json.load(f)["t2i"])
        for key in ("R1", "R5", "R10", "mAP", "mINP"):
            values = [t[key] for t in tests]
            assert float(row[f"{key}_mean"]) == pytest.approx(statistics.fmean(values), abs=1e-4)
            assert float(row[f"{key}_std"]) == pytest.approx(statistics.stdev(values), abs=1e-4)
        assert row["seeds"] == "2" and row["epochs"] == "1" and row["precision"] == "fp32"
        assert float(row["epoch_seconds"]) > 0 and float(row["params_m"]) > 0


def test_the_embedding_column_names_each_embedding_and_the_fused_similarity(table):
    out, _ = table
    rows = {r["method"]: r for r in read_csv(out / "methods.csv")}
    # ViT-Tiny embeds in 64; RDE adds TSE's own embedding and averages the two cosines (SPEC 12).
    assert rows["PHP"]["embedding"] == "global 64"
    assert rows["RDE"]["embedding"].startswith("global 64 + tse ")
    assert "0.5 cos(global) + 0.5 cos(tse)" in rows["RDE"]["embedding"]
    assert float(rows["RDE"]["params_m"]) > float(rows["TBPS-CLIP"]["params_m"]) - 1  # both built, both counted


def test_the_markdown_table_names_the_command_and_the_machine(table):
    out, _ = table
    text = (out / "methods.md").read_text()
    assert text.startswith("# Methods on Demo-PEDES")
    assert "`sh run.sh methods --seeds 1 2" in text and "2 runs side by side" in text and "torch " in text
    assert "| IRRA | irra_demo | 2 |" in text and " ± " in text


def test_finished_runs_are_only_tested_again(table, capsys):
    out, argv = table
    before = {p: p.stat().st_mtime_ns for p in out.glob("Demo-PEDES/*/best.pth")}
    assert len(before) == 8
    one_by_one = [a if a != "2" or argv[i - 1] != "--jobs" else "1" for i, a in enumerate(argv)]
    assert tool.main(one_by_one + ["--methods", "PHP,rde"]) == 0  # one job, in this process: its output is captured
    assert {p: p.stat().st_mtime_ns for p in out.glob("Demo-PEDES/*/best.pth")} == before
    assert [r["method"] for r in read_csv(out / "methods.csv")] == ["PHP", "RDE"]
    assert "already holds a run" in capsys.readouterr().out


def test_runs_side_by_side_write_their_console_to_a_file_each(table):
    out, _ = table
    consoles = sorted(p.name for p in (out / "methods_console").glob("*.txt"))
    assert consoles == sorted(f"{name}_seed{seed}.txt" for name in ("irra_demo", "php_demo", "rde_demo", "tbps_demo")
                              for seed in (1, 2))
    text = (out / "methods_console" / "rde_demo_seed2.txt").read_text()
    assert "results written to" in text and "rde_demo_seed2" in text


def test_a_tag_names_new_runs_and_a_table_of_their_own(tiny_root, tmp_path):
    out = tmp_path / "logs"
    argv = ["--methods", "PHP", "--tag", "noise50", "--noisy_rate", "0.5", "--root_dir", tiny_root,
            "--output_dir", str(out), *TINY_RUN]
    assert tool.main(argv) == 0
    assert (out / "Demo-PEDES" / "php_demo_noise50" / "best.pth").is_file()
    rows = read_csv(out / "methods_noise50.csv")
    assert [(r["method"], r["noise"], r["seeds"], r["R1_std"]) for r in rows] == [("PHP", "0.5", "1", "")]


@pytest.mark.parametrize("args, message", [
    (["--methods", "PHP,BERT"], "unknown method 'BERT'"),
    (["--name", "x"], "--name does not apply to the methods table"),
    (["--paper", "market"], "--paper"),
    (["--seeds", "1", "1"], "--seeds lists seed 1 twice"),
    (["--rde_similarity", "bge"], "option 'rde_similarity' is set"),  # RDE's alone: IRRA would train, then fail
])
def test_bad_requests_are_one_line_and_train_nothing(tmp_path, tiny_root, capsys, args, message):
    out = tmp_path / "logs"
    code, err = run_entry(tool.main, [*args, "--root_dir", tiny_root, "--output_dir", str(out), *TINY_RUN], capsys)
    assert_one_error_line(code, err, message)
    assert not out.exists()


def test_paper_presets_without_their_data_say_what_is_missing_once(tmp_path, capsys):
    code, err = run_entry(tool.main, ["--paper", "rstp", "--root_dir", str(tmp_path)], capsys)
    assert_one_error_line(code, err, "missing (IRRA, PHP, RDE, TBPS-CLIP): data set folder")
    assert err.count("RSTPReid does not exist") == 1


def test_run_sh_methods_reaches_the_tool(tmp_path):
    done = subprocess.run(["sh", os.path.join(ROOT, "run.sh"), "methods", "--methods", "nothing"], cwd=tmp_path,
                          capture_output=True, text=True)
    assert done.returncode == 2
    assert "unknown method 'nothing'" in done.stderr
