"""retrieve.py: printed hits, the picture's layout, frames and size cap, its atomic write, the gallery cache
(written, reused, invalidated; tests/test_gallery_cache.py checks its integrity). Several runs side by side:
tests/test_retrieve_runs.py."""
import contextlib
import errno
import glob
import os
import shutil

from PIL import Image
import pytest
import torch

from evaluation.visualize import (BACKGROUND, GREEN, GREY, RED, Hit, ResultRow, Style, draw_results, left_out,
                                  left_out_note, panel_box, picture_size, wrap_text)
from helpers import build_dataset, parse_output, pixel, retrieve_cli, small_images
import retrieve
from utils.errors import UserError


def test_split_query_prints_hits_and_draws_frames(run_copy, demo_root, tmp_path, capsys):
    test = build_dataset("Demo-PEDES", demo_root).test
    pid_of = {os.path.abspath(p): pid for p, pid in zip(test["img_paths"], test["image_pids"])}
    out = str(tmp_path / "results.png")
    code, lines, _ = retrieve_cli(capsys, run_copy, "--root_dir", demo_root, "--query", "a man in a blue jacket",
                                  "--caption", "0", "--caption", "7", "--topk", "5", "--out", out)
    assert code == 0
    queries = parse_output(lines)
    assert len(queries) == 3
    assert "free text" in queries[0][0] and test["captions"][7] in queries[2][0]
    for _, hits in queries:
        assert [h[0] for h in hits] == [1, 2, 3, 4, 5]
        assert all(a[1] >= b[1] for a, b in zip(hits, hits[1:]))  # best first
        assert all(-1.0001 <= h[1] <= 1.0001 and os.path.isfile(h[2]) for h in hits)
        assert all(not os.path.isabs(h[2]) or not h[2].startswith(os.getcwd()) for h in hits)

    with Image.open(out) as img:
        assert img.size == picture_size(3, 5)
    for col, (_, _, path) in enumerate(queries[0][1]):
        assert pixel(out, panel_box(0, col)[:2]) == GREY
    for row, caption in ((1, 0), (2, 7)):
        for col, (_, _, path) in enumerate(queries[row][1]):
            expected = GREEN if pid_of[os.path.abspath(path)] == test["caption_pids"][caption] else RED
            assert pixel(out, panel_box(row, col)[:2]) == expected


def test_cache_is_written_reused_and_invalidated_by_the_checkpoint(run_copy, demo_root, tmp_path, capsys,
                                                                   encode_calls):
    args = ("--root_dir", demo_root, "--query", "a woman in a red coat", "--topk", "3",
            "--out", str(tmp_path / "r.png"))
    code, first, _ = retrieve_cli(capsys, run_copy, *args)
    assert code == 0 and encode_calls["images"] == 80  # the whole test gallery, once
    cache_files = glob.glob(os.path.join(run_copy, "cache", "gallery-*.pt"))
    assert len(cache_files) == 1
    assert "embedded now, cache written" in first[-1]

    encode_calls["images"] = 0
    code, second, _ = retrieve_cli(capsys, run_copy, *args)
    assert code == 0 and encode_calls["images"] == 0
    assert second[:-1] == first[:-1] and "cached embeddings" in second[-1]

    # Rewriting the checkpoint (here with the same weights) makes the cache stale: it is not used, and replaced.
    path = os.path.join(run_copy, "best.pth")
    torch.save(torch.load(path, weights_only=True), path)
    code, third, _ = retrieve_cli(capsys, run_copy, *args)
    assert code == 0 and encode_calls["images"] == 80
    assert third[:-1] == first[:-1]
    assert glob.glob(os.path.join(run_copy, "cache", "gallery-*.pt")) not in ([], cache_files)

    # Another checkpoint or compat mode is another cache entry, never a reuse.
    encode_calls["images"] = 0
    code, _, _ = retrieve_cli(capsys, run_copy, *args, "--compat", "php_v1")
    assert code == 0 and encode_calls["images"] == 80


def make_folder_gallery(demo_root, folder, count):
    test = build_dataset("Demo-PEDES", demo_root).test
    os.makedirs(os.path.join(folder, "nested"))
    for i, src in enumerate(test["img_paths"][:count]):
        dst = os.path.join(folder, "nested" if i % 2 else "", f"img{i}.jpg")
        shutil.copy(src, dst)
    with Image.open(test["img_paths"][count]) as img:
        img.save(os.path.join(folder, "nested", "extra.png"))
    with open(os.path.join(folder, "notes.txt"), "w") as f:
        f.write("not an image")
    return test["img_paths"]


def test_folder_gallery_and_its_cache(run_copy, demo_root, tmp_path, capsys, encode_calls):
    folder = str(tmp_path / "gallery")
    sources = make_folder_gallery(demo_root, folder, 6)
    out = str(tmp_path / "folder.png")
    args = ("--gallery", folder, "--query", "a person with a backpack", "--topk", "10", "--out", out)
    code, lines, _ = retrieve_cli(capsys, run_copy, *args)
    assert code == 0 and encode_calls["images"] == 7  # 6 jpg + 1 png, the .txt ignored
    queries = parse_output(lines)
    assert [h[0] for h in queries[0][1]] == list(range(1, 8))  # fewer images than --topk
    assert all(os.path.abspath(h[2]).startswith(folder) for h in queries[0][1])
    with Image.open(out) as img:
        assert img.size == picture_size(1, 7)
    assert pixel(out, panel_box(0, 0)[:2]) == GREY

    encode_calls["images"] = 0
    assert retrieve_cli(capsys, run_copy, *args)[0] == 0 and encode_calls["images"] == 0

    # A changed image (new content, new mtime) and an added one: the cache is stale.
    shutil.copy(sources[10], os.path.join(folder, "img0.jpg"))
    os.utime(os.path.join(folder, "img0.jpg"), ns=(1, 1))
    shutil.copy(sources[11], os.path.join(folder, "nested", "new.jpg"))
    code, lines, _ = retrieve_cli(capsys, run_copy, *args)
    assert code == 0 and encode_calls["images"] == 8
    assert len(parse_output(lines)[0][1]) == 8
    assert len(glob.glob(os.path.join(run_copy, "cache", "gallery-*.pt"))) == 1  # the stale file was removed


def test_no_cache_and_corrupt_cache(run_copy, demo_root, tmp_path, capsys, encode_calls):
    args = ("--root_dir", demo_root, "--caption", "3", "--topk", "2", "--out", str(tmp_path / "r.png"))
    assert retrieve_cli(capsys, run_copy, *args, "--no_cache")[0] == 0
    assert encode_calls["images"] == 80 and not os.path.exists(os.path.join(run_copy, "cache"))
    cache_dir = str(tmp_path / "elsewhere")
    assert retrieve_cli(capsys, run_copy, *args, "--cache_dir", cache_dir)[0] == 0
    [cache_file] = glob.glob(os.path.join(cache_dir, "gallery-*.pt"))
    with open(cache_file, "wb") as f:
        f.write(b"torn")
    encode_calls["images"] = 0
    code, lines, err = retrieve_cli(capsys, run_copy, *args, "--cache_dir", cache_dir)
    assert code == 0 and encode_calls["images"] == 80 and "unreadable gallery cache" in err
    # A cache folder that cannot be made: the answer still comes, with a warning.
    blocker = tmp_path / "a_file"
    blocker.write_text("")
    code, lines, err = retrieve_cli(capsys, run_copy, *args, "--cache_dir", str(blocker / "cache"))
    assert code == 0 and "cannot write the gallery cache" in err and len(parse_output(lines)[0][1]) == 2
    assert "embedded now;" in err


@pytest.mark.parametrize("args, message", [
    ((), "nothing to search for"),
    (("--query", "x", "--topk", "0"), "--topk"),
    (("--query", "   "), "empty"),
    (("--query", "x", "--split", "test", "--gallery", "."), "either --split or --gallery"),
    (("--caption", "100000"), "captions 0 to 159"),
    (("--caption", "1", "--gallery", "GALLERY"), "cannot be used with --gallery"),
    (("--query", "x", "--gallery", "EMPTY"), "no .jpg or .png images"),
])
def test_bad_input_is_one_line(run_copy, demo_root, tmp_path, capsys, args, message):
    (tmp_path / "empty").mkdir()
    make_folder_gallery(demo_root, str(tmp_path / "gallery"), 2)
    args = [str(tmp_path / "empty") if a == "EMPTY" else str(tmp_path / "gallery") if a == "GALLERY" else a
            for a in args]
    code, lines, err = retrieve_cli(capsys, run_copy, "--root_dir", demo_root, "--out", str(tmp_path / "r.png"),
                                    *args)
    assert code == 2 and lines[0] == []
    assert err.startswith("error: ") and message in err and "Traceback" not in err


def test_query_equal_to_a_caption_has_its_identity():
    from evaluation.gallery_cache import gallery_from_split
    from evaluation.search import resolve_queries
    split = {"image_pids": [7, 9], "img_paths": ["a.jpg", "b.jpg"], "caption_pids": [7, 9],
             "captions": ["A man in a  Red coat.", "a woman"]}
    gallery = gallery_from_split(split, "test split")
    resolved = resolve_queries([("text", "a MAN in a red   coat."), ("caption", 1), ("text", "someone")],
                                        gallery, split["captions"], "test")
    assert resolved == [("a MAN in a red coat.", 7), ("a woman", 9), ("someone", None)]


def test_shown_path(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert retrieve.shown_path(str(tmp_path / "a" / "b.jpg")) == os.path.join("a", "b.jpg")
    outside = os.path.abspath(os.path.join(str(tmp_path), os.pardir, "c.jpg"))
    assert retrieve.shown_path(outside) == outside


def test_picture_layout_with_odd_image_sizes(tmp_path):
    paths = []
    for i, size in enumerate([(30, 200), (300, 50), (64, 192)]):
        paths.append(str(tmp_path / f"{i}.png"))
        Image.new("RGB", size, (0, 0, 255)).save(paths[-1])
    rows = [ResultRow("word " * 200, [Hit(p, 0.5, c) for p, c in zip(paths, (True, False, None))], "note"),
            ResultRow("short", [Hit(paths[0], 0.1)])]
    out = draw_results(rows, str(tmp_path / "grid.png"))
    with Image.open(out) as img:
        assert img.size == picture_size(2, 3)
    assert [pixel(out, panel_box(0, c)[:2]) for c in range(3)] == [GREEN, RED, GREY]
    assert pixel(out, panel_box(1, 0)[:2]) == GREY
    assert pixel(out, panel_box(1, 1)[:2]) == (255, 255, 255)  # no hit there: an empty slot
    x0, y0, x1, y1 = panel_box(0, 1)
    assert pixel(out, ((x0 + x1) // 2, (y0 + y1) // 2)) == (0, 0, 255)  # the image is inside its panel


def test_wrap_text_limits_lines():
    from evaluation.visualize import _font
    font = _font(13)
    lines = wrap_text("a long description " * 50, font, 300, 3)
    assert len(lines) == 3 and lines[-1].endswith("...")
    assert all(font.getlength(line) <= 300 for line in lines)
    assert wrap_text("short text", font, 300, 3) == ["short text"]


@pytest.mark.slow
def test_topk_beyond_the_gallery_and_the_picture_cap(run_copy, demo_root, tmp_path, capsys):
    out = str(tmp_path / "many.png")
    captions = [arg for i in range(40) for arg in ("--caption", str(i))]
    code, lines, err = retrieve_cli(capsys, run_copy, "--root_dir", demo_root, *captions, "--topk", "100",
                                    "--out", out)
    assert code == 0
    queries = parse_output(lines)
    assert len(queries) == 40 and all([h[0] for h in hits] == list(range(1, 81)) for _, hits in queries)
    notes = [line for line in err.splitlines()
             if line.startswith("# ") and not line.startswith(("# query ", "# answered in "))]
    style = Style()
    shown = style.max_rows * style.max_cols
    assert notes == ["# --topk 100 is more than the gallery's 80 images: giving all 80",
                     f"# the picture is capped at {style.max_rows} queries x {style.max_cols} hits: "
                     f"{40 - style.max_rows} of 40 queries and {40 * 80 - shown} hits are not drawn "
                     f"(stdout lists them all)"]
    with Image.open(out) as img:
        assert img.size == picture_size(style.max_rows, style.max_cols, style, footer=True)
        assert img.size[0] <= style.pad + 12 * (style.panel_w + style.pad) and img.size[1] < 21 * style.row_h
        # The line counting what is left out sits under the last row.
        footer = img.convert("RGB").crop((0, img.size[1] - style.header_h, img.size[0], img.size[1]))
        assert any(colour != BACKGROUND for _, colour in footer.getcolors(1 << 16))
    assert pixel(out, panel_box(style.max_rows - 1, style.max_cols - 1)[:2]) in (GREEN, RED)


def test_picture_cap_counts_what_is_left_out(tmp_path):
    [path] = small_images(str(tmp_path), 1)
    style = Style(max_rows=2, max_cols=4)
    rows = [ResultRow(f"q{r}", [Hit(path, 0.5)] * n) for r, n in enumerate((15, 3, 6))]
    assert left_out(rows, style) == (1, 15 + 3 + 6 - 4 - 3)
    assert left_out_note(rows, style) == "Not drawn: 1 of 3 queries and 17 of 24 hits (a picture shows at most 2 " \
                                         "queries x 4 hits)."
    assert left_out_note(rows[1:2], style) is None and left_out(rows[1:2], style) == (0, 0)
    out = draw_results(rows, str(tmp_path / "capped.png"), style)
    with Image.open(out) as img:
        assert img.size == picture_size(2, 4, style, footer=True)
    assert pixel(out, panel_box(1, 2, style)[:2]) == GREY and pixel(out, panel_box(1, 3, style)[:2]) == BACKGROUND


@pytest.mark.parametrize("failure, raised", [(OSError(errno.ENOSPC, os.strerror(errno.ENOSPC)), UserError),
                                             (KeyboardInterrupt(), KeyboardInterrupt)], ids=["disk-full", "ctrl-c"])
def test_picture_is_written_whole_or_not_at_all(tmp_path, monkeypatch, failure, raised):
    folder = tmp_path / "pictures"
    folder.mkdir()
    rows = [ResultRow("q", [Hit(p, 0.5) for p in small_images(str(tmp_path), 3)])]
    out = draw_results(rows, str(folder / "r.png"))
    assert os.listdir(folder) == ["r.png"]  # no temporary file left
    before = (folder / "r.png").read_bytes()

    def failing_save(self, fp, *args, **kwargs):
        with (open(fp, "wb") if isinstance(fp, str) else contextlib.nullcontext(fp)) as f:
            f.write(before[:100])
        raise failure

    monkeypatch.setattr(Image.Image, "save", failing_save)
    with pytest.raises(raised) as error:
        draw_results(rows + rows, out)
    assert os.listdir(folder) == ["r.png"] and (folder / "r.png").read_bytes() == before
    if raised is UserError:
        assert str(error.value) == f"cannot write the picture {out} (No space left on device); the previous file is kept"


def test_picture_in_a_missing_folder_is_one_line(tmp_path):
    rows = [ResultRow("q", [Hit(small_images(str(tmp_path), 1)[0], 0.5)])]
    with pytest.raises(UserError, match=r"^cannot write the picture .*missing.* \(No such file or directory\)"):
        draw_results(rows, str(tmp_path / "missing" / "r.png"))
