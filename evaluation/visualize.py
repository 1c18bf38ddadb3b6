"""The retrieval picture: one row per query, the query text above its top-k gallery images; with several runs, one
row per query and run, each labelled with the run's name, under the query's text.

Each image sits in a framed panel with "#rank score" under it. The frame is green when the hit shows the query's
identity, red when it does not, and grey when that is unknown (a free-text query, or a folder gallery without
identities). The geometry is fixed by `Style`, so the picture's size and every panel's position follow from
(rows, columns, runs per query) alone.

A picture holds at most `Style.max_rows` rows of `Style.max_cols` hits (with several runs the rows are counted
in reading order, so the last query drawn may show only its first runs): uncapped, 40 queries of 800 hits each
made an image 83,208 px wide that was still being written (406 MB) after 5 minutes. What is left out is counted in
a line under the last row. The file is written to a temporary file beside it and renamed into place, so an existing
picture is replaced whole or not at all.
"""
from __future__ import annotations

from dataclasses import dataclass, replace
from typing import List, Optional, Sequence, Tuple

from PIL import Image, ImageDraw, ImageFont, ImageOps

from datasets.image_text import read_image
from utils.files import write_atomic

GREEN = (20, 160, 40)
RED = (215, 30, 30)
GREY = (160, 160, 160)
BACKGROUND = (255, 255, 255)
TEXT = (20, 20, 20)
RUN_TEXT = (30, 60, 160)  # a run's name, told apart from the query text above it

Box = Tuple[int, int, int, int]  # x0, y0, x1, y1 (x1, y1 exclusive)


@dataclass(frozen=True)
class Style:
    """Sizes in pixels. A panel is `panel_w` x `panel_h` including its frame of `frame` pixels."""

    panel_w: int = 96
    panel_h: int = 208
    frame: int = 4
    pad: int = 8
    text_lines: int = 3
    line_h: int = 16
    label_h: int = 18
    run_label_h: int = 16  # the run's name above its hits; only with several runs
    font_size: int = 13
    max_cols: int = 12  # hits drawn per query
    max_rows: int = 20  # rows drawn: queries, or (query, run) pairs with several runs

    @property
    def header_h(self) -> int:
        return self.text_lines * self.line_h + self.pad // 2

    @property
    def hits_h(self) -> int:
        return self.panel_h + self.label_h + self.pad

    @property
    def row_h(self) -> int:
        """A query with one run."""
        return self.header_h + self.hits_h


@dataclass
class Hit:
    """One retrieved image: its path, cosine score, and whether it shows the query's identity (None: unknown)."""

    path: str
    score: float
    correct: Optional[bool] = None


@dataclass
class ResultRow:
    """One query's hits by one run, best first; `note` is appended to the query text (e.g. its identity), `run`
    labels the row when a picture shows several runs."""

    query: str
    hits: List[Hit]
    note: str = ""
    run: str = ""


def _run_label_h(style: Style, runs: int) -> int:
    return style.run_label_h if runs > 1 else 0


def row_top(row: int, style: Style = Style(), runs: int = 1) -> int:
    """The y where row `row` (query row // runs, run row % runs) starts under its query's text: at its run label
    with several runs, else at its panels."""
    return style.pad + (row // runs + 1) * style.header_h + row * (_run_label_h(style, runs) + style.hits_h)


def picture_size(rows: int, cols: int, style: Style = Style(), footer: bool = False,
                 runs: int = 1) -> Tuple[int, int]:
    """(width, height) of a picture of `rows` rows of `runs` runs per query (the last query may have fewer) with
    `cols` hits each; `footer`: with the line that counts what was left out (as tall as a query's text)."""
    queries = -(-rows // runs)
    return (style.pad + cols * (style.panel_w + style.pad),
            style.pad + queries * style.header_h + rows * (_run_label_h(style, runs) + style.hits_h)
            + (style.header_h if footer else 0))


def left_out(rows: Sequence[ResultRow], style: Style = Style()) -> Tuple[int, int]:
    """(rows, hits) of `rows` that a picture in `style` does not draw; the hits include those of the rows left
    out."""
    drawn = sum(min(len(row.hits), style.max_cols) for row in rows[:style.max_rows])
    return max(0, len(rows) - style.max_rows), sum(len(row.hits) for row in rows) - drawn


def left_out_note(rows: Sequence[ResultRow], style: Style = Style(), runs: int = 1) -> Optional[str]:
    """The line under a capped picture, None when everything is drawn."""
    skipped, hits = left_out(rows, style)
    if not skipped and not hits:
        return None
    unit = "queries" if runs == 1 else "rows"
    parts = ([f"{skipped} of {len(rows)} {unit}"] if skipped else []) + \
        [f"{hits} of {sum(len(row.hits) for row in rows)} hits"]
    return (f"Not drawn: {' and '.join(parts)} (a picture shows at most {style.max_rows} {unit} x "
            f"{style.max_cols} hits{'' if runs == 1 else ', a row per query and run'}).")


def panel_box(row: int, col: int, style: Style = Style(), runs: int = 1) -> Box:
    """The box of the panel (frame included) of hit `col` of row `row` (see row_top), both counted from 0."""
    x0 = style.pad + col * (style.panel_w + style.pad)
    y0 = row_top(row, style, runs) + _run_label_h(style, runs)
    return x0, y0, x0 + style.panel_w, y0 + style.panel_h


def frame_colour(correct: Optional[bool]) -> Tuple[int, int, int]:
    return GREY if correct is None else (GREEN if correct else RED)


def _font(size: int) -> ImageFont.ImageFont:
    try:
        return ImageFont.load_default(size)
    except (TypeError, OSError):  # Pillow built without FreeType: the fixed bitmap font
        return ImageFont.load_default()


def wrap_text(text: str, font: ImageFont.ImageFont, width: int, max_lines: int) -> List[str]:
    """Greedy word wrap to `width` pixels; beyond `max_lines` the last line ends with an ellipsis."""
    lines: List[str] = []
    current = ""
    for word in text.split():
        candidate = f"{current} {word}".strip()
        if current and font.getlength(candidate) > width:
            lines.append(current)
            current = word
        else:
            current = candidate
    if current:
        lines.append(current)
    if len(lines) > max_lines:
        last = lines[max_lines - 1]
        while last and font.getlength(last + " ...") > width:
            last = last[:-1]
        lines = lines[:max_lines - 1] + [last.rstrip() + " ..."]
    return lines


def _paste_image(canvas: Image.Image, path: str, box: Box, style: Style) -> None:
    inner_w, inner_h = box[2] - box[0] - 2 * style.frame, box[3] - box[1] - 2 * style.frame
    img = ImageOps.contain(read_image(path), (inner_w, inner_h))
    x = box[0] + style.frame + (inner_w - img.width) // 2
    y = box[1] + style.frame + (inner_h - img.height) // 2
    canvas.paste(img, (x, y))


def _draw_lines(draw: ImageDraw.ImageDraw, text: str, font: ImageFont.ImageFont, top: int, width: int,
                style: Style, max_lines: int, fill: Tuple[int, int, int] = TEXT) -> None:
    for i, line in enumerate(wrap_text(text, font, width - 2 * style.pad, max_lines)):
        draw.text((style.pad, top + i * style.line_h), line, fill=fill, font=font)


def draw_results(rows: Sequence[ResultRow], path: str, style: Style = Style(), runs: int = 1) -> str:
    """Draw the picture of `rows` to `path` (PNG), at most `style.max_rows` rows of `style.max_cols` hits;
    columns = the largest number of hits drawn in a row. With `runs` > 1, `rows` hold each query's rows of its
    `runs` runs in turn (query-major), each labelled by its `run`."""
    if not rows:
        raise ValueError("draw_results needs at least one row")
    note = left_out_note(rows, style, runs)
    shown = [replace(row, hits=row.hits[:style.max_cols]) for row in rows[:style.max_rows]]
    cols = max(1, max(len(r.hits) for r in shown))
    width, height = picture_size(len(shown), cols, style, footer=note is not None, runs=runs)
    canvas = Image.new("RGB", (width, height), BACKGROUND)
    draw = ImageDraw.Draw(canvas)
    font = _font(style.font_size)
    for r, row in enumerate(shown):
        top = row_top(r, style, runs)
        if r % runs == 0:
            text = f"{r // runs + 1}. {row.query}" + (f"  [{row.note}]" if row.note else "")
            _draw_lines(draw, text, font, top - style.header_h, width, style, style.text_lines)
        if runs > 1:
            _draw_lines(draw, row.run, font, top, width, style, 1, fill=RUN_TEXT)
        for c, hit in enumerate(row.hits):
            box = panel_box(r, c, style, runs)
            draw.rectangle((box[0], box[1], box[2] - 1, box[3] - 1), fill=BACKGROUND,
                           outline=frame_colour(hit.correct), width=style.frame)
            _paste_image(canvas, hit.path, box, style)
            draw.text((box[0] + 2, box[3] + 2), f"#{c + 1}  {hit.score:.3f}", fill=TEXT, font=font)
    if note is not None:
        _draw_lines(draw, note, font, height - style.header_h, width, style, style.text_lines)
    write_atomic(path, lambda f: canvas.save(f, format="PNG", optimize=True), fsync=True, what="the picture")
    return path
