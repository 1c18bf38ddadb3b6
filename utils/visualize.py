"""The retrieval picture: one row per query, the query text above its top-k gallery images.

Each image sits in a framed panel with "#rank score" under it. The frame is green when the hit shows the query's
identity, red when it does not, and grey when that is unknown (a free-text query, or a folder gallery without
identities). The geometry is fixed by `Style` and computed by `layout`, so the picture's size and every panel's
position follow from (rows, columns) alone.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import List, Optional, Sequence, Tuple

from PIL import Image, ImageDraw, ImageFont, ImageOps

from datasets.image_text import read_image
from utils.errors import UserError

GREEN = (20, 160, 40)
RED = (215, 30, 30)
GREY = (160, 160, 160)
BACKGROUND = (255, 255, 255)
TEXT = (20, 20, 20)

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
    font_size: int = 13

    @property
    def header_h(self) -> int:
        return self.text_lines * self.line_h + self.pad // 2

    @property
    def row_h(self) -> int:
        return self.header_h + self.panel_h + self.label_h + self.pad


@dataclass
class Hit:
    """One retrieved image: its path, cosine score, and whether it shows the query's identity (None: unknown)."""

    path: str
    score: float
    correct: Optional[bool] = None


@dataclass
class ResultRow:
    """One query and its hits, best first; `note` is appended to the query text (e.g. its identity)."""

    query: str
    hits: List[Hit]
    note: str = ""


def picture_size(rows: int, cols: int, style: Style = Style()) -> Tuple[int, int]:
    """(width, height) of a picture of `rows` queries with `cols` hits each."""
    return style.pad + cols * (style.panel_w + style.pad), style.pad + rows * style.row_h


def panel_box(row: int, col: int, style: Style = Style()) -> Box:
    """The box of the panel (frame included) of hit `col` of query `row`, both counted from 0."""
    x0 = style.pad + col * (style.panel_w + style.pad)
    y0 = style.pad + row * style.row_h + style.header_h
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


def draw_results(rows: Sequence[ResultRow], path: str, style: Style = Style()) -> str:
    """Draw the picture of `rows` to `path` (PNG); columns = the largest number of hits in a row."""
    if not rows:
        raise ValueError("draw_results needs at least one row")
    cols = max(1, max(len(r.hits) for r in rows))
    width, height = picture_size(len(rows), cols, style)
    canvas = Image.new("RGB", (width, height), BACKGROUND)
    draw = ImageDraw.Draw(canvas)
    font = _font(style.font_size)
    for r, row in enumerate(rows):
        text = f"{r + 1}. {row.query}" + (f"  [{row.note}]" if row.note else "")
        top = style.pad + r * style.row_h
        for i, line in enumerate(wrap_text(text, font, width - 2 * style.pad, style.text_lines)):
            draw.text((style.pad, top + i * style.line_h), line, fill=TEXT, font=font)
        for c, hit in enumerate(row.hits):
            box = panel_box(r, c, style)
            draw.rectangle((box[0], box[1], box[2] - 1, box[3] - 1), fill=BACKGROUND,
                           outline=frame_colour(hit.correct), width=style.frame)
            _paste_image(canvas, hit.path, box, style)
            draw.text((box[0] + 2, box[3] + 2), f"#{c + 1}  {hit.score:.3f}", fill=TEXT, font=font)
    try:
        canvas.save(path, format="PNG", optimize=True)
    except OSError as e:
        raise UserError(f"cannot write the picture {path} ({e.strerror or e})") from None
    return path
