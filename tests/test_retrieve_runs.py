"""retrieve.py with several runs side by side (`--config_file A --config_file B`), and evaluation/search.py, the
search it and the web page share."""
import os
import re
import shutil

from PIL import Image
import pytest
import torch

from evaluation.search import Searcher, load_runs, shown_path, unique_names
from evaluation.visualize import (BACKGROUND, GREEN, GREY, RED, Hit, ResultRow, Style, draw_results, left_out,
                                  left_out_note, panel_box, picture_size, row_top)
from helpers import build_dataset, parse_output, pixel, retrieve_cli, run_variant, small_images

RUN_HIT = re.compile(r"^(\S+) (\d+ .*)$")


def parse_runs(output):
    """{run: that run's hits as parse_output gives them}, and the runs in stdout order (each query's in turn)."""
    lines, err = output
    per_run, order = {}, []
    for line in lines:
        match = RUN_HIT.match(line)
        assert match, f"unexpected output line {line!r}"
        per_run.setdefault(match.group(1), []).append(match.group(2))
        if match.group(2).startswith("1 "):
            order.append(match.group(1))
    return {run: parse_output((hits, err)) for run, hits in per_run.items()}, order


def test_two_runs_side_by_side(run_copy, demo_root, tmp_path, capsys):
    test = build_dataset("Demo-PEDES", demo_root).test
    pid_of = {os.path.abspath(p): pid for p, pid in zip(test["img_paths"], test["image_pids"])}
    other = run_variant(run_copy, str(tmp_path / "other"), noise=0.05, name="smoke b")
    args = ("--root_dir", demo_root, "--caption", "0", "--query", "a man in a blue jacket", "--topk", "4")
    alone = [parse_output(retrieve_cli(capsys, run, *args, "--out", str(tmp_path / "alone.png"))[1])
             for run in (run_copy, other)]
    out = str(tmp_path / "both.png")
    code, output, _ = retrieve_cli(capsys, run_copy, "--config_file", os.path.join(other, "configs.yaml"), *args,
                                   "--out", out)
    assert code == 0
    runs, order = parse_runs(output)
    assert order == ["smoke", "smoke_b"] * 2  # query after query, each run's hits in turn
    assert [runs["smoke"], runs["smoke_b"]] == alone and alone[0] != alone[1]  # each its own model

    style = Style()
    with Image.open(out) as img:
        assert img.size == picture_size(4, 4, style, runs=2) != picture_size(4, 4, style)
        for row in range(4):  # each row's label: the run's name, drawn above its hits
            top = row_top(row, style, runs=2)
            label = img.convert("RGB").crop((style.pad, top, img.size[0] - style.pad, top + style.run_label_h))
            assert any(colour != BACKGROUND for _, colour in label.getcolors(1 << 16))
    for run, row in (("smoke", 0), ("smoke_b", 1)):
        for col, (_, _, path) in enumerate(runs[run][0][1]):
            expected = GREEN if pid_of[os.path.abspath(path)] == test["caption_pids"][0] else RED
            assert pixel(out, panel_box(row, col, style, runs=2)[:2]) == expected
            assert pixel(out, panel_box(row + 2, col, style, runs=2)[:2]) == GREY  # the free-text query


@pytest.mark.slow
def test_the_gallery_is_the_first_runs_and_names_are_unique(run_copy, demo_root, tmp_path, capsys, monkeypatch):
    other_root = str(tmp_path / "data")
    shutil.copytree(demo_root, other_root)
    second = run_variant(run_copy, str(tmp_path / "second"), root_dir=other_root)  # named "smoke" too
    monkeypatch.chdir(tmp_path)
    captions = [arg for i in range(11) for arg in ("--caption", str(i))]
    for first, then, root in ((run_copy, second, demo_root), (second, run_copy, other_root)):
        code, output, err = retrieve_cli(capsys, first, "--config_file", os.path.join(then, "configs.yaml"),
                                         *captions, "--topk", "13", "--out", "r.png")
        assert code == 0
        runs, order = parse_runs(output)
        assert order == [os.path.basename(first), os.path.basename(then)] * 11
        assert all(os.path.abspath(path).startswith(root + os.sep)
                   for queries in runs.values() for _, hits in queries for _, _, path in hits)
    # 11 queries x 2 runs = 22 rows of 13 hits; the picture draws 20 rows of 12.
    assert f"# the picture is capped at 20 rows x 12 hits (a row per query and run): 2 of 22 rows and " \
           f"{22 * 13 - 20 * 12} hits are not drawn (stdout lists them all)" in err
    with Image.open(tmp_path / "r.png") as img:
        assert img.size == picture_size(20, 12, footer=True, runs=2)


def test_unique_run_names(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    names = ["smoke", "my run", "smoke", "", "php", "php"]
    folders = [str(tmp_path / "a"), "b", "/elsewhere/c d", "e", "f", "f"]
    assert unique_names(names, folders) == ["a", "my_run", "/elsewhere/c_d", "e", "f#1", "f#2"]


def test_picture_cap_with_several_runs_counts_rows(tmp_path):
    [path] = small_images(str(tmp_path), 1)
    style = Style(max_rows=3, max_cols=2)
    rows = [ResultRow(f"q{q}", [Hit(path, 0.5)] * 3, run=run) for q in range(2) for run in ("a", "b")]
    assert left_out(rows, style) == (1, 12 - 3 * 2)
    assert left_out_note(rows, style, runs=2) == "Not drawn: 1 of 4 rows and 6 of 12 hits (a picture shows at " \
                                                 "most 3 rows x 2 hits, a row per query and run)."
    out = draw_results(rows, str(tmp_path / "capped.png"), style, runs=2)
    with Image.open(out) as img:
        assert img.size == picture_size(3, 2, style, footer=True, runs=2)
    # The second query's text and its first run's hits are drawn; its second run is left out.
    assert pixel(out, panel_box(2, 1, style, runs=2)[:2]) == GREY
    assert panel_box(2, 0, style, runs=2)[1] == row_top(2, style, runs=2) + style.run_label_h
    assert row_top(2, style, runs=2) - row_top(1, style, runs=2) == style.header_h + style.run_label_h + style.hits_h


def test_searcher_loads_once_and_gives_the_printed_scores(run_copy, demo_root, tmp_path, capsys, encode_calls,
                                                          monkeypatch):
    code, output, _ = retrieve_cli(capsys, run_copy, "--root_dir", demo_root, "--caption", "5", "--topk", "3",
                                   "--out", str(tmp_path / "r.png"))  # writes the cache
    [(_, printed)] = parse_output(output)
    searcher = Searcher(load_runs([os.path.join(run_copy, "configs.yaml")], overrides={"root_dir": demo_root}))
    assert code == 0 and searcher.embedded[0][0] and encode_calls["images"] == 80  # the CLI's embedding only
    reads = []
    monkeypatch.setattr(torch, "load", lambda *args, **kwargs: reads.append(args))
    for _ in range(2):  # a web page's requests: no file read, no image embedded
        [[hits]] = searcher.search([searcher.captions[5]], 3)
        assert [(hit.rank, float(f"{hit.score:.4f}"), shown_path(hit.path)) for hit in hits] == printed
        assert all(hit.correct is not None for hit in hits)
    assert reads == [] and encode_calls["images"] == 80
