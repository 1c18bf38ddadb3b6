"""The search page of `sh run.sh serve` (Gradio, served by evaluation/web.py): a query box, a caption selector, one row of hits per run, and a
larger view of an image on click.

Each hit is a button holding its thumbnail (`thumb/<gallery index>`) and "#rank score", framed green when it shows
the query's identity, red when it shows another one, grey when that is unknown (free text, or a folder gallery): the
colours of retrieve.py's picture. The larger view (`img/<gallery index>`) is drawn by a few lines of JavaScript from
the hit's data attributes: its path as retrieve.py prints it and, for split galleries, its identity and captions.
The query text reaches the page only as escaped text.
"""
from __future__ import annotations

import html
import json
import random
from typing import Optional, Sequence, Tuple

import gradio as gr

from evaluation.visualize import GREEN, GREY, RED
from utils.errors import UserError

MAX_K = 100  # hits per run on the page (the endpoint has no such cap)
SYSTEM_FONTS = ["system-ui", "-apple-system", "Segoe UI", "Roboto", "Helvetica", "Arial", "sans-serif"]
MONO_FONTS = ["ui-monospace", "Menlo", "Consolas", "monospace"]


def theme() -> gr.themes.Base:
    # The system's fonts: Gradio's default theme names web fonts, which a page without internet cannot load.
    return gr.themes.Base(font=SYSTEM_FONTS, font_mono=MONO_FONTS)


def _rgb(colour: Tuple[int, int, int]) -> str:
    return f"rgb({colour[0]}, {colour[1]}, {colour[2]})"


CSS = f"""
.ps-run {{ margin: 0 0 14px 0; }}
.ps-run h4 {{ margin: 4px 0; font-size: 14px; }}
.ps-hits {{ display: flex; flex-wrap: wrap; gap: 8px; }}
.ps-hit {{ display: flex; flex-direction: column; align-items: center; padding: 0; background: white;
          border: 4px solid {_rgb(GREY)}; border-radius: 3px; cursor: zoom-in; }}
.ps-hit.ps-ok {{ border-color: {_rgb(GREEN)}; }}
.ps-hit.ps-bad {{ border-color: {_rgb(RED)}; }}
.ps-hit img {{ height: 160px; width: auto; display: block; }}
.ps-label {{ font-size: 12px; color: #222; padding: 2px 4px; font-variant-numeric: tabular-nums; }}
.ps-note {{ margin: 2px 0 8px 0; color: #444; }}
.ps-message {{ padding: 10px; border-left: 4px solid {_rgb(RED)}; background: #fff4f4; color: #222; }}
.ps-viewer {{ position: fixed; inset: 0; background: rgba(0, 0, 0, 0.6); z-index: 1000; display: flex;
             align-items: center; justify-content: center; }}
.ps-viewer[hidden] {{ display: none; }}
.ps-box {{ background: white; padding: 16px; border-radius: 6px; display: flex; gap: 16px; max-width: 90vw;
          max-height: 90vh; overflow: auto; color: #222; }}
.ps-large {{ height: min(70vh, 512px); max-width: 45vw; object-fit: contain; }}
.ps-info {{ max-width: 40vw; font-size: 14px; }}
.ps-info code {{ word-break: break-all; }}
"""

# `element` is the results component's root, whose content every search replaces; the viewer lives on the body.
VIEWER_JS = """
const viewer = document.createElement('div');
viewer.className = 'ps-viewer';
viewer.hidden = true;
viewer.setAttribute('role', 'dialog');
viewer.setAttribute('aria-modal', 'true');
viewer.innerHTML = '<div class="ps-box"><img class="ps-large" alt="the selected image"><div class="ps-info">' +
  '<button type="button" class="ps-close">Close</button><p>Path: <code class="ps-path"></code></p>' +
  '<p class="ps-rank"></p><p class="ps-id"></p><ul class="ps-captions"></ul></div></div>';
document.body.appendChild(viewer);
const close = () => { viewer.hidden = true; };
viewer.addEventListener('click', (ev) => {
  if (ev.target === viewer || ev.target.closest('.ps-close')) close();
});
document.addEventListener('keydown', (ev) => { if (ev.key === 'Escape') close(); });
element.addEventListener('click', (ev) => {
  const hit = ev.target.closest('.ps-hit');
  if (!hit) return;
  const d = hit.dataset;
  viewer.querySelector('.ps-large').src = 'img/' + d.index;
  viewer.querySelector('.ps-path').textContent = d.path;
  viewer.querySelector('.ps-rank').textContent = d.run + ': rank ' + d.rank + ', score ' + d.score;
  viewer.querySelector('.ps-id').textContent = d.pid === undefined ? '' : 'Identity ' + d.pid;
  const list = viewer.querySelector('.ps-captions');
  list.replaceChildren();
  for (const caption of JSON.parse(d.captions || '[]')) {
    const item = document.createElement('li');
    item.textContent = caption;
    list.appendChild(item);
  }
  viewer.hidden = false;
});
"""


def message_html(text: str) -> str:
    return f'<div class="ps-message" role="alert">{html.escape(text)}</div>'


def _attrs(**values) -> str:
    return " ".join(f'data-{name}="{html.escape(str(value), quote=True)}"' for name, value in values.items()
                    if value is not None)


def hit_html(service, run: str, hit) -> str:
    i = service.index[hit.path]
    frame = {True: "ps-ok", False: "ps-bad", None: "ps-unknown"}[hit.correct]
    pid = service.pids[i] if service.pids is not None else None
    captions = json.dumps(service.image_captions.get(hit.path, []))
    data = _attrs(index=i, path=service.shown[i], run=run, rank=hit.rank, score=f"{hit.score:.4f}", pid=pid,
                  captions=captions)
    return (f'<button type="button" class="ps-hit {frame}" {data}><img src="thumb/{i}" alt="rank {hit.rank}" '
            f'loading="lazy"><span class="ps-label">#{hit.rank} {hit.score:.4f}</span></button>')


def results_html(service, text: str, k, runs: Optional[Sequence[str]]) -> str:
    """The hits of each selected run for `text`, or a message saying what is wrong with the input."""
    try:
        k = int(k) if k is not None else 10
    except (TypeError, ValueError):
        k = 10
    note = ""
    if not 1 <= k <= MAX_K:
        note = f" (k is kept between 1 and {MAX_K} on this page; /api/search takes any k)"
        k = min(max(k, 1), MAX_K)
    try:
        text, rows = service.search(text, k, runs)
    except UserError as e:
        return message_html(str(e))
    pid = service.identity(text)
    known = "identity unknown (free text): grey frames" if pid is None else \
        f"a caption of identity {pid}: green = same identity, red = another"
    parts = [f'<p class="ps-note">Top {k} of {len(service.paths)} images for <q>{html.escape(text)}</q>, '
             f'{known}.{html.escape(note)} Click an image for a larger view.</p>']
    for name, hits in rows:
        parts.append(f'<section class="ps-run" data-run="{html.escape(name, quote=True)}"><h4>{html.escape(name)}'
                     f'</h4><div class="ps-hits">{"".join(hit_html(service, name, hit) for hit in hits)}</div>'
                     f'</section>')
    return "".join(parts)


def build_page(service, default_k: int = 10) -> gr.Blocks:
    """The page's layout and events; `service` is evaluation.web.Service."""
    chooser = random.Random()
    names = service.names
    default_k = min(default_k, MAX_K)

    def show(text, k, runs):
        return results_html(service, text, k, runs)

    def pick(index, k, runs):
        if index is None:
            return gr.update(), gr.update()
        text = service.captions[int(index)]
        return text, results_html(service, text, k, runs)

    def pick_random(k, runs):
        index = chooser.randrange(len(service.captions))
        return (index, *pick(index, k, runs))

    def pick_failure(current, k, runs):
        if not runs:
            return gr.update(), gr.update(), message_html("no run selected: pick at least one run")
        index = service.next_failure(None if current is None else int(current), runs)
        if index is None:
            return gr.update(), gr.update(), message_html(f"no caption of the {service.split_name} split has a "
                                                          f"first hit of another identity")
        return (index, *pick(index, k, runs))

    with gr.Blocks(title="Person search", analytics_enabled=False) as page:
        gr.Markdown(f"## Person search\nGallery: {service.description}. Runs: {', '.join(names)}.")
        with gr.Row():
            query = gr.Textbox(label="Describe the person", placeholder="a woman in a red coat and blue jeans",
                               max_lines=1, scale=5, elem_id="query")
            k = gr.Number(value=default_k, label="hits per run", precision=0, scale=1, elem_id="k")
            search = gr.Button("Search", variant="primary", scale=1, elem_id="search")
        runs = gr.CheckboxGroup(names, value=names, label="runs", visible=len(names) > 1, elem_id="runs")
        caption = None
        if service.captions:
            with gr.Row():
                caption = gr.Dropdown([(f"{i}: {text}", i) for i, text in enumerate(service.captions)], value=None,
                                      label=f"or a caption of the {service.split_name} split", scale=5,
                                      elem_id="caption")
                lucky = gr.Button("Random caption", scale=1, elem_id="random-caption")
                failure = gr.Button("Next failure", scale=1, elem_id="next-failure")
        results = gr.HTML('<p class="ps-note">Type a description and press Enter.</p>', js_on_load=VIEWER_JS,
                          elem_id="results")

        common = {"concurrency_limit": 1, "show_progress": "minimal"}
        for event in (search.click, query.submit):
            event(show, [query, k, runs], results, **common)
        runs.input(show, [query, k, runs], results, **common)
        if caption is not None:
            caption.input(pick, [caption, k, runs], [query, results], **common)
            lucky.click(pick_random, [k, runs], [caption, query, results], **common)
            failure.click(pick_failure, [caption, k, runs], [caption, query, results], **common)
    return page
