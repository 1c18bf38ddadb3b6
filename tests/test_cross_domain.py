"""`sh run.sh test --cross` (evaluation/cross_domain.py): the smoke run on copies of the small Demo-PEDES laid out as
other data sets, which must score exactly what it scores in-domain."""
import csv
import os
import shutil

import pytest

from datasets.loaders import build_eval_loaders
from evaluation.evaluator import Evaluator
from helpers import build_dataset
from helpers import run_tool  # `sh run.sh test ARGV` in-process; --cross is handed over from there
from model import load_model

SMOKE = os.path.join("logs", "Demo-PEDES", "smoke")
BROKEN = os.path.join("logs", "Demo-PEDES", "broken")
METRICS = ("R1", "R5", "R10", "mAP", "mINP")
HEADER = ["run", "trained_on", "test_set", *METRICS, "in_domain"]


def read_outputs(cwd):
    """(CSV header, CSV rows as dicts, markdown) of the matrix written under `cwd`."""
    logs = os.path.join(cwd, "logs")
    with open(os.path.join(logs, "cross_domain.csv"), newline="") as f:
        header, *rows = csv.reader(f)
    with open(os.path.join(logs, "cross_domain.md")) as f:
        return header, [dict(zip(header, row)) for row in rows], f.read()


def write_test_split_csv(path, split):
    """The test split as a custom annotation CSV (one row per caption, absolute image paths)."""
    with open(path, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["file_path", "id", "caption", "split"])
        for pid, caption, image in zip(split["caption_pids"], split["captions"], split["caption_img_index"]):
            writer.writerow([split["img_paths"][image], pid, caption, "test"])


@pytest.fixture(scope="module")
def workdir(tmp_path_factory, smoke_run, demo_root):
    """./logs with a copy of the smoke run; ./data with Demo-PEDES and a copy of it as CUHK-PEDES; demo_test.csv
    with Demo-PEDES's test split."""
    work = str(tmp_path_factory.mktemp("cross_domain"))
    os.makedirs(os.path.join(work, SMOKE))
    for name in ("configs.yaml", "best.pth"):
        shutil.copy(os.path.join(smoke_run, name), os.path.join(work, SMOKE, name))
    for folder in ("Demo-PEDES", "CUHK-PEDES"):
        shutil.copytree(os.path.join(demo_root, "Demo-PEDES"), os.path.join(work, "data", folder))
    write_test_split_csv(os.path.join(work, "demo_test.csv"), build_dataset("Demo-PEDES", demo_root).test)
    return work


@pytest.fixture(scope="module")
def matrix(workdir):
    """The matrix of every run under ./logs on every set under ./data (the default root) and demo_test.csv."""
    mp = pytest.MonkeyPatch()
    try:
        code = run_tool(["--cross", "--cross_datasets", "demo_test.csv", "--num_workers", "0"], workdir, mp)
    finally:
        mp.undo()
    return code, read_outputs(workdir)


def test_copies_score_what_the_run_scores_in_domain(matrix):
    code, (header, rows, _) = matrix
    assert code == 0
    assert header == HEADER
    assert [(r["run"], r["trained_on"], r["test_set"], r["in_domain"]) for r in rows] == [
        (SMOKE, "Demo-PEDES", "CUHK-PEDES", "false"),
        (SMOKE, "Demo-PEDES", "Demo-PEDES", "true"),
        (SMOKE, "Demo-PEDES", "demo_test", "false")]
    scores = [[r[m] for m in METRICS] for r in rows]
    assert scores[0] == scores[1] == scores[2]
    assert all(0.0 <= float(v) <= 100.0 for v in scores[0])
    assert float(scores[0][0]) <= float(scores[0][1]) <= float(scores[0][2])


def test_in_domain_cell_matches_the_evaluator(matrix, workdir, demo_root):
    """The reference is the Evaluator that test.py and training's validation use, on the run's own data set."""
    run = load_model(os.path.join(workdir, SMOKE, "configs.yaml"), compat="none")
    split = build_dataset("Demo-PEDES", demo_root).test
    results, _ = Evaluator(*build_eval_loaders(run.cfg, split), precision=run.cfg.precision).evaluate(run.model)
    row = next(r for r in matrix[1][1] if r["test_set"] == "Demo-PEDES")
    assert [float(row[m]) for m in METRICS] == pytest.approx([results["t2i"][m] for m in METRICS], abs=1e-4)


def test_markdown_marks_the_in_domain_cell(matrix, workdir, capsys):
    _, (_, rows, markdown) = matrix
    r1 = f"{float(rows[0]['R1']):.2f}"
    lines = markdown.splitlines()
    assert lines[0] == "| run | trained on | CUHK-PEDES | Demo-PEDES | demo_test |"
    assert lines[2] == f"| {SMOKE} | Demo-PEDES | {r1} | **{r1}** | {r1} |"
    assert any("**bold**: in-domain" in line for line in lines)
    assert any("compat none" in line for line in lines)
    assert f"demo_test = {os.path.join(workdir, 'demo_test.csv')}" in markdown
    assert os.path.join(workdir, "data") in markdown


def test_failed_cells_are_empty_with_a_note(workdir, demo_root, tmp_path, monkeypatch):
    broken = os.path.join(str(tmp_path), BROKEN)
    os.makedirs(broken)
    shutil.copy(os.path.join(workdir, SMOKE, "configs.yaml"), broken)
    with open(os.path.join(broken, "best.pth"), "w") as f:
        f.write("not a checkpoint\n")
    missing = os.path.join(str(tmp_path), "missing.csv")
    with open(missing, "w") as f:
        f.write("file_path,id,caption,split\nnowhere.jpg,1,a person in a red coat,test\n")
    smoke = os.path.join(workdir, SMOKE)
    code = run_tool([smoke, BROKEN, "--cross", "--root_dir", demo_root, "--cross_datasets", missing,
                     "--num_workers", "0"], str(tmp_path), monkeypatch)
    assert code == 1
    _, rows, markdown = read_outputs(str(tmp_path))
    cells = {(r["run"], r["test_set"]): r for r in rows}
    assert set(cells) == {(smoke, "Demo-PEDES"), (smoke, "missing"), (BROKEN, "Demo-PEDES"), (BROKEN, "missing")}
    assert float(cells[smoke, "Demo-PEDES"]["R1"]) >= 0.0
    for key in ((smoke, "missing"), (BROKEN, "Demo-PEDES"), (BROKEN, "missing")):
        assert [cells[key][m] for m in METRICS] == [""] * len(METRICS), key
    assert cells[BROKEN, "Demo-PEDES"]["trained_on"] == "Demo-PEDES"
    notes = markdown.split("Notes (empty cells):\n", 1)[1].splitlines()
    assert len(notes) == 2
    assert notes[0].startswith("- missing: ") and "nowhere.jpg" in notes[0]
    assert notes[1].startswith(f"- {BROKEN}: ") and "best.pth" in notes[1]
    assert f"| {BROKEN} | Demo-PEDES |  |  |" in markdown


def test_bad_input_is_one_line(tmp_path, monkeypatch, capsys):
    empty = tmp_path / "empty"
    empty.mkdir()
    assert run_tool(["--cross", "--root_dir", "empty"], str(tmp_path), monkeypatch) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("error: --cross: no data set found under ")
    assert str(empty) in err
    assert all(name in err for name in ("CUHK-PEDES", "ICFG-PEDES", "RSTPReid", "Demo-PEDES"))

    assert run_tool(["--cross", "--cross_datasets", "absent.csv"], str(tmp_path), monkeypatch) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "absent.csv does not exist" in err
    assert not os.path.exists(tmp_path / "logs")
