"""Nothing gives a silently wrong result: the cases of the issue "trust the new surfaces", each as it was reported
(runs, plug-ins, custom data, seed groups, busy folders; the search page's are in tests/test_serve.py). Each ends
with the right behaviour or one `error:` line and a non-zero exit, and leaves an existing run's files unchanged."""
import csv
import json
import os
import shutil
import subprocess
import sys
import textwrap
import zipfile

import pytest

from datasets import dataset_from_config
from evaluation.summary import Row, with_groups
from helpers import (SMOKE_CONFIG, assert_one_error_line, build_dataset, run_entry, run_entry_output, run_tool,
                     run_variant, train_argv, tree)
import test as test_entry
import train
from utils.cli import run_main
from utils.config import Config, build_config
from utils.errors import UserError
from utils.plugins import import_plugins, module_name


def write_csv(path, rows, header=("file_path", "id", "caption", "split"), bom=False):
    with open(path, "w", newline="", encoding="utf-8-sig" if bom else "utf-8") as f:
        writer = csv.writer(f)
        writer.writerow(header)
        writer.writerows(rows)
    return str(path)


def demo_rows(root, prefix="imgs/"):
    """The rows of a CSV of the tiny Demo-PEDES, image paths relative to <root>/Demo-PEDES."""
    with open(os.path.join(root, "Demo-PEDES", "reid_raw.json")) as f:
        entries = json.load(f)
    return [(prefix + e["file_path"], e["id"], c, e["split"]) for e in entries for c in e["captions"]]


def custom(path, check_images=True):
    return dataset_from_config(Config(dataset_name="custom", annotation_file=str(path)), check_images=check_images)


# ------------------------------------------------------------------------------------ 1. paths of a run
def test_a_run_means_the_same_files_from_any_folder(tiny_root, tmp_path, capsys, monkeypatch):
    """Trained with a relative annotation file and plug-in, tested from another folder: the same files, the same
    numbers; an annotation file changed since training is named."""
    work, elsewhere = tmp_path / "work", tmp_path / "elsewhere"
    (work / "cds").mkdir(parents=True)
    elsewhere.mkdir()
    write_csv(work / "cds" / "base.csv", demo_rows(tiny_root, prefix=f"{tiny_root}/Demo-PEDES/imgs/"))
    (work / "plug.py").write_text("X = 1\n")
    monkeypatch.chdir(work)
    code, err = run_entry(train.main, train_argv(tiny_root, "logs", "--dataset_name", "custom", "--annotation_file",
                                                 "cds/base.csv", "--custom_imports", "plug.py", "--num_epoch", "1",
                                                 "--warmup_epochs", "0"), capsys)
    assert code == 0, err
    run = work / "logs" / "custom" / "smoke"
    config = build_config(str(run / "configs.yaml"))
    assert config.annotation_file == str(work / "cds" / "base.csv")
    assert config.custom_imports == [str(work / "plug.py")] and config.root_dir == tiny_root
    code, _ = run_entry(test_entry.main, ["--config_file", str(run / "configs.yaml")], capsys)
    first = json.loads((run / "test_results.json").read_text())
    # The same relative names from another folder would name other files (or none): the run does not care.
    (elsewhere / "cds").mkdir()
    write_csv(elsewhere / "cds" / "base.csv", demo_rows(tiny_root, prefix=f"{tiny_root}/Demo-PEDES/imgs/")[:40])
    monkeypatch.chdir(elsewhere)
    code, err = run_entry(test_entry.main, ["--config_file", str(run / "configs.yaml")], capsys)
    again = json.loads((run / "test_results.json").read_text())
    assert code == 0 and again["t2i"] == first["t2i"] and "changed since training" not in err
    assert list(again["provenance"]["plugins_sha256"]) == [str(work / "plug.py")]


def test_a_changed_annotation_file_is_named(tiny_root, tmp_path, capsys):
    write_csv(tmp_path / "data.csv", demo_rows(tiny_root, prefix=f"{tiny_root}/Demo-PEDES/imgs/"))
    out = str(tmp_path / "out")
    code, err = run_entry(train.main, train_argv(tiny_root, out, "--dataset_name", "custom", "--annotation_file",
                                                 str(tmp_path / "data.csv"), "--num_epoch", "1", "--warmup_epochs",
                                                 "0"), capsys)
    assert code == 0, err
    with open(tmp_path / "data.csv", "a") as f:
        f.write("\n")  # the same rows, another file
    config = os.path.join(out, "custom", "smoke", "configs.yaml")
    code, out, _ = run_entry_output(test_entry.main, ["--config_file", config], capsys)
    assert code == 0 and f"annotation file {tmp_path / 'data.csv'} changed since training (sha256" in out


# ------------------------------------------------------------------------------------ 2. seed groups
def row(run, experiment, seed, checkpoint, r1):
    return Row(run, "Demo-PEDES", "none", {k: r1 for k in ("R1", "R5", "R10", "mAP", "mINP")},
               experiment=experiment, name=run, seed=seed, checkpoint_sha256=checkpoint)


def test_a_group_holds_one_experiment_of_distinct_seeds():
    rows = with_groups([row("a_seed1", "e", 1, "c1", 10.0), row("a_seed2", "e", 2, "c2", 12.0),
                        row("copy", "e", 1, "c1", 10.0), row("same_seed", "e", 2, "c3", 30.0),
                        row("longer", "e3", 3, "c4", 50.0)])
    groups = [r for r in rows if not isinstance(r, Row)]
    assert len(groups) == 1 and groups[0].n == 2 and groups[0].mean["R1"] == 11.0
    notes = {r.run: r.note for r in rows if isinstance(r, Row)}
    assert notes["copy"] == "same the checkpoint as a_seed1: not a second sample of its group"
    assert notes["same_seed"] == "same seed 2 as a_seed2: not a second sample of its group"
    assert notes["longer"] == "" and notes["a_seed1"] == ""


@pytest.mark.slow
def test_run_sh_test_groups_no_copies_and_no_other_epochs(smoke_run, demo_root, tmp_path, monkeypatch):
    work = tmp_path / "work"
    logs = work / "logs" / "Demo-PEDES"
    shutil.copytree(smoke_run, logs / "smoke", ignore=shutil.ignore_patterns("test_log.jsonl", ".lock"))
    shutil.copytree(logs / "smoke", logs / "smoke_copy")  # byte-identical
    run_variant(str(logs / "smoke"), str(logs / "smoke_e3"), noise=0.01, num_epoch=3)
    assert run_tool(["--root_dir", demo_root], str(work), monkeypatch) == 0
    with open(work / "logs" / "summary.csv", newline="") as f:
        rows = {r["run"]: r for r in csv.DictReader(f)}
    assert not any("(n=" in name for name in rows)
    assert "same the checkpoint as logs/Demo-PEDES/smoke" in rows[os.path.join("logs", "Demo-PEDES", "smoke_copy")][
        "note"]


# ------------------------------------------------------------------------------------ 3. changed plug-ins
HEAD = """
    import torch
    from torch import nn
    from model import Head, register_head

    SCALE = {scale}

    class Shift(Head):
        def __init__(self, dim):
            super().__init__()
            self.proj = nn.Linear(dim, dim)

        def embed(self, tokens, modality, padding_mask=None):
            return SCALE * self.proj(tokens[:, 0]), {{}}

    @register_head("shift_head", lr_factor=1.0)
    def build(cfg, ctx):
        return Shift(ctx.dim)
"""


def test_a_plugin_changed_after_training_is_named_and_stops_a_resume(tiny_root, tmp_path, capsys):
    plugin = tmp_path / "shift.py"
    plugin.write_text(textwrap.dedent(HEAD.format(scale=1.0)))
    out = str(tmp_path / "out")
    argv = train_argv(tiny_root, out, "--custom_imports", str(plugin), "--heads", "shift_head", "--num_epoch", "1",
                      "--warmup_epochs", "0")
    code, err = run_entry(train.main, argv, capsys)
    assert code == 0, err
    run = os.path.join(out, "Demo-PEDES", "smoke")
    plugin.write_text(textwrap.dedent(HEAD.format(scale=9.0)))
    code, out, _ = run_entry_output(test_entry.main, ["--config_file", os.path.join(run, "configs.yaml")], capsys)
    assert code == 0 and f"plug-in {plugin} changed since training (sha256" in out
    before = tree(run)
    code, err = run_entry(train.main, [*argv[:-4], "--num_epoch", "2", "--warmup_epochs", "0", "--resume"], capsys)
    assert_one_error_line(code, err, "--resume:", f"{plugin} changed since training", "--allow_changed_plugins")
    assert tree(run) == before
    code, err = run_entry(train.main, [*argv[:-4], "--num_epoch", "2", "--warmup_epochs", "0", "--resume",
                                       "--allow_changed_plugins"], capsys)
    assert code == 0, err


# ------------------------------------------------------------------------------------ 4. damaged checkpoints
def flip_low_bits(path, count=64):
    """Flip the lowest bit of `count` bytes in the middle of every tensor record of a torch.save archive."""
    with zipfile.ZipFile(path) as z:
        records = [(i.header_offset, i.file_size, len(i.filename), len(i.extra)) for i in z.infolist()
                   if "/data/" in i.filename and i.compress_type == zipfile.ZIP_STORED and i.file_size >= 4 * count]
    with open(path, "r+b") as f:
        for offset, size, name_len, _ in records:
            f.seek(offset + 26)
            extra_len = int.from_bytes(f.read(2), "little")
            start = offset + 30 + name_len + extra_len + size // 2
            f.seek(start)
            data = bytearray(f.read(count))
            f.seek(start)
            f.write(bytes(b ^ 1 for b in data))
    return len(records)


def test_a_damaged_checkpoint_is_one_line(smoke_run, demo_root, tmp_path, capsys):
    run = tmp_path / "run"
    shutil.copytree(smoke_run, run, ignore=shutil.ignore_patterns("test_log.jsonl", ".lock", "cache"))
    assert flip_low_bits(str(run / "best.pth")) > 10
    before = tree(str(run))
    code, err = run_entry(test_entry.main, ["--config_file", str(run / "configs.yaml"), "--root_dir", demo_root],
                          capsys)
    assert_one_error_line(code, err, f"{run / 'best.pth'}: damaged checkpoint: weight ", "does not match")
    assert tree(str(run)) == before


# ------------------------------------------------------------------------------------ 5. custom CSV data
@pytest.mark.parametrize("rows, header, message", [
    ([("imgs/a.jpg", "1", "a man", "train", "the same text")], ("file_path", "id", "caption", "split", "caption"),
     "the header names the column 'caption' twice (columns 3 and 5)"),
    ([("imgs/a.jpg", "1_23", "a man", "train")], None, "row 2: 'id' must be a decimal integer (digits only), got '1_23'"),
    ([("imgs/a.jpg", " 1_0 ", "a man", "train")], None, "row 2: 'id' must be a decimal integer (digits only), got "
                                                        "' 1_0 '"),
    ([("imgs/a.jpg", "1", "a man", "train"), ("./imgs/a.jpg", "1", "a man again", "train")], None,
     "row 3: image './imgs/a.jpg' is the file of row 2 written another way ('imgs/a.jpg')"),
    ([("imgs/a.jpg", "1", "a man", "train"), ("imgs/b.jpg", str(2 ** 70), "a woman", "train")], None,
     f"row 3: 'id' '{2 ** 70}' does not fit a signed 64-bit integer"),
], ids=["column-twice", "underscore", "spaces", "two-spellings", "id-2^70"])
def test_custom_csv_changes_nothing_silently(tmp_path, rows, header, message):
    (tmp_path / "imgs").mkdir()
    for name in ("a.jpg", "b.jpg"):
        (tmp_path / "imgs" / name).write_bytes(b"")
    path = write_csv(tmp_path / "data.csv", rows, **({"header": header} if header else {}))
    with pytest.raises(UserError, match="^" + str(tmp_path / "data.csv").replace(".", r"\.") + ": ") as info:
        custom(path, check_images=False)
    assert message in str(info.value)


def test_duplicate_rows_count_once_with_one_warning(tiny_root, tmp_path, php_log):
    rows = demo_rows(tiny_root, prefix=f"{tiny_root}/Demo-PEDES/imgs/")
    plain = custom(write_csv(tmp_path / "plain.csv", rows))
    doubled = custom(write_csv(tmp_path / "doubled.csv", rows + rows[:5]))
    assert doubled.test == plain.test and doubled.train == plain.train
    assert [m for m in php_log if "exact duplicate row" in m] == [f"{tmp_path / 'doubled.csv'}: 5 exact duplicate "
                                                                  f"row(s) ignored (each caption of an image counts "
                                                                  f"once)"]


def test_a_csv_with_a_bom_and_images_outside_its_folder(tiny_root, tmp_path):
    """Excel's "CSV UTF-8" starts with a BOM; image paths may leave the file's folder (documented)."""
    (tmp_path / "lists").mkdir()
    rel = os.path.relpath(os.path.join(tiny_root, "Demo-PEDES"), tmp_path / "lists")
    path = write_csv(tmp_path / "lists" / "bom.csv", demo_rows(tiny_root, prefix=f"{rel}/imgs/"), bom=True)
    with open(path, "rb") as f:
        assert f.read(3) == b"\xef\xbb\xbf"
    dataset, demo = custom(path), build_dataset("Demo-PEDES", tiny_root)
    assert dataset.test["captions"] == demo.test["captions"] and dataset.test["image_pids"] == demo.test["image_pids"]
    assert [os.path.realpath(p) for p in dataset.test["img_paths"]] == [os.path.realpath(p) for p in
                                                                         demo.test["img_paths"]]


# ------------------------------------------------------------------------------------ 6. busy run folders
HOLD = textwrap.dedent("""
    import sys, time
    from utils.runlock import RunLock
    with RunLock(sys.argv[1], "train.py"):
        print("locked", flush=True)
        time.sleep(300)
""")


def test_a_busy_run_is_not_evaluated(smoke_run, demo_root, tmp_path, monkeypatch):
    work = tmp_path / "work"
    run = work / "logs" / "Demo-PEDES" / "smoke"
    shutil.copytree(smoke_run, run, ignore=shutil.ignore_patterns("test_log.jsonl", ".lock"))
    holder = subprocess.Popen([sys.executable, "-c", HOLD, str(run)], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        before = {k: v for k, v in tree(str(run)).items() if k != ".lock"}
        assert run_tool(["--root_dir", demo_root], str(work), monkeypatch) == 1
    finally:
        holder.kill()
        holder.wait()
    with open(work / "logs" / "summary.csv", newline="") as f:
        [entry] = list(csv.DictReader(f))
    assert entry["R1"] == "" and entry["note"].startswith("error: busy, not evaluated: run folder ") and \
        "is in use by train.py (pid" in entry["note"]
    assert {k: v for k, v in tree(str(run)).items() if k != ".lock"} == before  # no look logged, nothing written


# ------------------------------------------------------------------------------------ the data sets
def test_a_lone_surrogate_in_a_caption_is_refused(tiny_root, tmp_path):
    shutil.copytree(os.path.join(tiny_root, "Demo-PEDES"), tmp_path / "Demo-PEDES")
    path = tmp_path / "Demo-PEDES" / "reid_raw.json"
    entries = json.loads(path.read_text())
    entries[3]["captions"][1] = "a man\ud800 in red"
    path.write_text(json.dumps(entries))  # valid JSON: "\\ud800"
    with pytest.raises(UserError, match=r"reid_raw.json: entry 3 \(counting from 0\): caption 1 \(counting from 0\) "
                                        r"holds a lone surrogate"):
        build_dataset("Demo-PEDES", str(tmp_path))
    # The same in a custom JSON list.
    (tmp_path / "list.json").write_text(json.dumps([{**e, "file_path": "imgs/" + e["file_path"]} for e in entries]))
    shutil.copytree(tmp_path / "Demo-PEDES" / "imgs", tmp_path / "imgs")
    with pytest.raises(UserError, match=r"list.json: entry 3 .* holds a lone surrogate"):
        custom(tmp_path / "list.json")


def test_only_training_generates_demo_pedes(smoke_run, tmp_path, capsys):
    nowhere = tmp_path / "nonexistent"
    code, err = run_entry(test_entry.main, ["--config_file", os.path.join(smoke_run, "configs.yaml"), "--root_dir",
                                            str(nowhere)], capsys)
    assert_one_error_line(code, err, f"no Demo-PEDES (demo_seed 0) under {nowhere}", "python -m datasets.demo_pedes")
    assert not nowhere.exists()


def test_a_run_without_best_pth_names_what_takes_another_checkpoint(smoke_run, tmp_path):
    from model import load_model
    os.makedirs(tmp_path / "run")
    shutil.copy(os.path.join(smoke_run, "configs.yaml"), tmp_path / "run")
    with pytest.raises(UserError, match=r"has no best.pth \(train the run first; test.py and retrieve.py also take "
                                        r"another checkpoint with --checkpoint\)"):
        load_model(str(tmp_path / "run" / "configs.yaml"))


# ------------------------------------------------------------------------------------ plug-ins
@pytest.mark.parametrize("body, messages", [
    ("import sys\nsys.exit(0)\n", ["importing it called exit(0); a plug-in must only define and register things"]),
    ("from model import register_loss\nfrom utils.schema import Option\n\n"
     "@register_loss('typed', options=[Option('typed_m', int, 'abc', 'm')])\ndef f(out, cfg):\n    return 0\n",
     ["option 'typed_m' of ", "declares the type int but its default 'abc' is not one"]),
    ("from model import register_loss\nfrom utils.schema import Option\n\n"
     "@register_loss('twice', weight=0.5, options=[Option('twice_loss_weight', float, 2.0, 'w')])\n"
     "def f(out, cfg):\n    return 0\n", ["loss 'twice' declares its weight twice"]),
], ids=["exit", "default-type", "weight-twice"])
def test_a_plugin_that_misbehaves_at_import_is_one_line(tmp_path, capsys, body, messages):
    path = tmp_path / f"bad_{len(body)}.py"
    path.write_text(body)
    out = tmp_path / "out"
    code, err = run_entry(train.main, ["--config_file", SMOKE_CONFIG, "--custom_imports", str(path), "--output_dir",
                                       str(out)], capsys)
    assert_one_error_line(code, err, f"custom_imports {path}", *messages)
    assert not out.exists()


def test_two_plugin_files_of_one_name_are_two_plugins(tmp_path):
    for folder, name in (("a", "good_a"), ("b", "good_b")):
        (tmp_path / folder).mkdir()
        (tmp_path / folder / "good_loss.py").write_text(
            f"from model import register_loss\n\n@register_loss('{name}')\ndef f(out, cfg):\n    return 0\n")
    paths = [str(tmp_path / "a" / "good_loss.py"), str(tmp_path / "b" / "good_loss.py")]
    resolved, options = import_plugins(paths)
    assert resolved == paths and {"good_a_loss_weight", "good_b_loss_weight"} <= set(options)
    assert module_name(paths[0]) != module_name(paths[1]) and {module_name(p) for p in paths} <= set(sys.modules)


# ------------------------------------------------------------------------------------ seeds
@pytest.mark.parametrize("extra, message", [
    (["--seeds", "1", "--seed", "3"], "--seed and --seeds both given"),
    (["--seed", "3", "--seed", "4"], "option '--seed' is given twice"),
], ids=["seeds-and-seed", "seed-twice"])
def test_seed_options_are_not_dropped(tmp_path, capsys, extra, message):
    from tools import run_preset
    code, err = run_entry(run_preset.main, ["--config_file", SMOKE_CONFIG, *extra, "--output_dir",
                                            str(tmp_path / "o")], capsys)
    assert_one_error_line(code, err, message)
    assert not (tmp_path / "o").exists()


# ------------------------------------------------------------------------------------ check_dataset on custom data
def test_check_dataset_checks_a_custom_set(tiny_root, tmp_path, capsys):
    from tools import check_dataset
    rows = demo_rows(tiny_root, prefix=f"{tiny_root}/Demo-PEDES/imgs/")
    (tmp_path / "notes.txt").write_text("not an image")
    rows.append((str(tmp_path / "notes.txt"), 7, "a note", "test"))
    path = write_csv(tmp_path / "mine.csv", rows)
    def check(*extra):
        with pytest.raises(SystemExit) as done:
            run_main(check_dataset.main, ["--dataset_name", "custom", "--annotation_file", path, *extra])
        return done.value.code, capsys.readouterr().out

    code, out = check()
    assert code == 0 and "all checks passed" in out
    code, out = check("--decode")
    assert code == 1 and "1 problem(s)" in out and f"cannot read image {tmp_path / 'notes.txt'}" in out


# ------------------------------------------------------------------------------------ sh run.sh test on any data
PLUGIN_DATA = """
import csv, os
from datasets import Annotations, register_dataset
from utils.schema import Option

@register_dataset("plugdata", options=[Option("plugdata_file", str, "", "A CSV list.", path=True)])
def plugdata(cfg):
    with open(cfg.plugdata_file, newline="") as f:
        rows = list(csv.DictReader(f))
    entries = {}
    for r in rows:
        entries.setdefault(r["file_path"], {"file_path": r["file_path"], "id": int(r["id"]), "split": r["split"],
                                            "captions": []})["captions"].append(r["caption"])
    return Annotations(list(entries.values()), image_dir=os.path.dirname(cfg.plugdata_file), source=cfg.plugdata_file)
"""


@pytest.mark.parametrize("kind", ["custom", "plugin"])
def test_run_sh_test_evaluates_runs_on_their_own_data(tiny_root, tmp_path, capsys, monkeypatch, kind):
    """A run trained on `dataset_name: custom` or a plug-in's data set is evaluated with its own data options
    and plug-ins, by `sh run.sh test` as by test.py."""
    rows = demo_rows(tiny_root, prefix=f"{tiny_root}/Demo-PEDES/imgs/")
    path = write_csv(tmp_path / "data.csv", rows)
    extra = ["--dataset_name", "custom", "--annotation_file", path]
    if kind == "plugin":
        (tmp_path / "plugdata.py").write_text(PLUGIN_DATA)
        extra = ["--custom_imports", str(tmp_path / "plugdata.py"), "--dataset_name", "plugdata", "--plugdata_file",
                 path]
    work = tmp_path / "work"
    code, err = run_entry(train.main, train_argv(tiny_root, str(work / "logs"), *extra, "--num_epoch", "1",
                                                 "--warmup_epochs", "0"), capsys)
    assert code == 0, err
    assert run_tool([], str(work), monkeypatch) == 0
    with open(work / "logs" / "summary.csv", newline="") as f:
        [entry] = list(csv.DictReader(f))
    run = work / "logs" / ("custom" if kind == "custom" else "plugdata") / "smoke"
    code, _ = run_entry(test_entry.main, ["--config_file", str(run / "configs.yaml")], capsys)
    tested = json.loads((run / "test_results.json").read_text())["t2i"]
    assert float(entry["R1"]) == pytest.approx(tested["R1"], abs=1e-3)
