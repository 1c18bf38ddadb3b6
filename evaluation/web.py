"""The search server behind `sh run.sh serve`: a local web page and a JSON endpoint over evaluation/search.py.

Routes:
  /                      the page (evaluation/search_page.py)
  /api/search?q=TEXT&k=N[&run=NAME]
                         {"query": TEXT, "runs": [{"run": NAME, "hits": [{"rank", "score", "path"}, ...]}, ...]}:
                         the ranking and scores retrieve.py prints for the same run and query, `path` as it prints it;
                         bad input gets 400 (an unknown run 404) with {"error": MESSAGE}
  /img/<i>, /thumb/<i>   gallery image i (from 0, gallery order) and a small JPEG of it
  Gradio's page assets and queue.
Any other path is answered 404 by an allow-list, Gradio's own file, upload and proxy routes included, so no route
takes a file path. An image is served only while the file, symlinks resolved, lies inside the gallery's folder (the
--gallery folder, or the folder that holds the split's images). Nothing is fetched from the network: Gradio's
analytics (and with them its version check) are off, the theme uses the system's fonts and the page loads only
this server's assets (tests/test_serve.py records them).
"""
from __future__ import annotations

import collections
import errno
import functools
import io
import os
import re
import socket
import threading
from typing import Dict, Iterable, List, Optional, Sequence, Set, Tuple

# Before anything imports gradio: without analytics Gradio also skips its version check against the network.
os.environ["GRADIO_ANALYTICS_ENABLED"] = "False"

from evaluation.search import shown_path  # noqa: E402
from utils.errors import UserError, short_repr  # noqa: E402

# The text encoder reads a query's first text_length tokens (77 for CLIP: about 300 characters); a query longer
# than this is a mistake, not a search.
MAX_QUERY_CHARS = 1000
FAILURE_SCAN_CHUNK = 64  # captions encoded per step of "next failure"
THUMB_BOX = (128, 256)
# Exactly the paths the page, its assets, Gradio's queue and this server's own routes use; everything else is 404.
OPEN_PATHS = {"/", "/config", "/theme.css", "/favicon.ico", "/manifest.json", "/api/search", "/gradio_api/queue/join",
              "/gradio_api/queue/data", "/gradio_api/cancel"}
OPEN_PREFIXES = ("/assets/", "/static/", "/svelte/", "/img/", "/thumb/", "/gradio_api/heartbeat/")
LOCAL_NAMES = {"localhost", "127.0.0.1", "::1"}
# Longer names than a file system takes (255 bytes per name) are no asset of the page: 404, not an OSError.
MAX_NAME_BYTES, MAX_PATH_BYTES = 255, 2048
_WHOLE_NUMBER = re.compile(r"\s*([0-9]{1,9})\s*", re.ASCII)


def whole_number(text: str) -> Optional[int]:
    """The value of a decimal number of ASCII digits (at most 9), else None: str.isdigit() would take '²' and
    '５', which int() refuses or reads as 5."""
    match = _WHOLE_NUMBER.fullmatch(text)
    return int(match.group(1)) if match else None


def is_open_path(path: str) -> bool:
    """Whether the server answers `path` (percent-decoded, as routes see it) at all."""
    if ".." in path.split("/") or "\\" in path or "\0" in path:
        return False
    encoded = path.encode("utf-8", "surrogateescape")
    if len(encoded) > MAX_PATH_BYTES or any(len(part) > MAX_NAME_BYTES for part in encoded.split(b"/")):
        return False
    return path in OPEN_PATHS or path.rstrip("/") in OPEN_PATHS or path.startswith(OPEN_PREFIXES)


def host_name(header: str) -> str:
    """The name in a Host header, without its port ("[::1]:7860" -> "::1")."""
    if header.startswith("["):
        return header[1:].split("]", 1)[0]
    return header.rsplit(":", 1)[0] if header.count(":") == 1 else header


def listening_socket(host: str, port: int) -> socket.socket:
    """A socket bound to (host, port) and listening: the check that the port is free, made before minutes of loading.

    Listening at once also settles a race between two servers started together; requests that arrive while the
    models load wait in the backlog.
    """
    try:
        family, kind, proto, _, address = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM,
                                                             flags=socket.AI_PASSIVE)[0]
    except socket.gaierror as e:
        raise UserError(f"--host {short_repr(host)}: not an address of this machine ({e.strerror})") from None
    sock = socket.socket(family, kind, proto)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as uvicorn: a restart may follow a stop
        sock.bind(address)
        sock.listen(128)
    except OSError as e:
        sock.close()
        hint = "; another server is using it (stop it or choose another --port)" if e.errno == errno.EADDRINUSE \
            else ""
        raise UserError(f"cannot listen on {host} port {port}: {e.strerror or e}{hint}") from None
    return sock


def gallery_folder(paths: Sequence[str], folder: Optional[str]) -> str:
    """The folder (symlinks resolved) that every served image must lie in."""
    root = folder if folder is not None else os.path.commonpath([os.path.dirname(p) for p in paths])
    return os.path.realpath(root)


@functools.lru_cache(maxsize=4096)
def thumbnail(path: str, mtime_ns: int) -> bytes:  # noqa: ARG001 - mtime_ns keys the cache: a changed file is redone
    from PIL import Image
    with Image.open(path) as img:
        img = img.convert("RGB")
    img.thumbnail(THUMB_BOX)
    out = io.BytesIO()
    img.save(out, format="JPEG", quality=88)
    return out.getvalue()


def bad_k(value) -> UserError:
    return UserError(f"k (hits per run) must be a whole number of at least 1; got {short_repr(value)}")


class Service:
    """What the page and the endpoint ask of the searcher, one search at a time: Searcher.search sets torch's thread
    count process-wide, and Gradio's queue and the endpoint's thread pool would otherwise call it together."""

    def __init__(self, searcher, split_name: str, folder: Optional[str]):
        self.searcher = searcher
        self.split_name = split_name
        self.names: List[str] = list(searcher.names)
        self.captions: List[str] = list(searcher.captions)
        gallery = searcher.gallery
        self.paths: List[str] = list(gallery.paths)
        self.shown: List[str] = [shown_path(p) for p in self.paths]
        self.pids = gallery.pids
        self.index: Dict[str, int] = {}
        for i, path in enumerate(self.paths):
            self.index.setdefault(path, i)
        self.root = gallery_folder(self.paths, folder)
        split = f"the {split_name} split of {searcher.runs[0].loaded.cfg.dataset_name}, " if folder is None else ""
        self.description = f"{split}{len(self.paths)} images under {shown_path(self.root)}"
        # Each split image's own captions, by absolute path, for the larger view.
        self.image_captions: Dict[str, List[str]] = collections.defaultdict(list)
        for caption, i in zip(self.captions, searcher.caption_image):
            self.image_captions[searcher.gallery.paths[i]].append(caption)
        self.text_length = min(run.loaded.cfg.text_length for run in searcher.runs)
        self._lock = threading.Lock()
        self._top1: Dict[int, Tuple[Optional[bool], ...]] = {}

    def identity(self, text: str) -> Optional[int]:
        return self.searcher.identity(text) if self.pids is not None else None

    def search(self, text: str, k: int, runs: Optional[Sequence[str]] = None) -> Tuple[str, list]:
        """(the query as searched, [(run name, [SearchHit, ...]), ...]) for the `runs` named (default: all)."""
        text = " ".join(str(text).split())  # as retrieve.py reads --query
        if not text:
            raise UserError("the query is empty: describe the person to search for")
        if len(text) > MAX_QUERY_CHARS:
            raise UserError(f"the query has {len(text):,} characters; at most {MAX_QUERY_CHARS:,} are searched (the "
                            f"models read only its first {self.text_length} tokens)")
        if not isinstance(k, int) or k < 1:
            raise bad_k(k)
        wanted = set(self.names if runs is None else runs)
        if not wanted & set(self.names):
            raise UserError("no run selected: pick at least one run")
        with self._lock:
            per_run = self.searcher.search([text], k)[0]
        return text, [(name, hits) for name, hits in zip(self.names, per_run) if name in wanted]

    def as_json(self, q: str, k: str, run: Optional[str]) -> dict:
        """The endpoint's answer; a bad value raises UserError (an unknown run: LookupError)."""
        if run is not None and run not in self.names:
            raise LookupError(f"unknown run {short_repr(run)}; runs: {', '.join(self.names)}")
        number = whole_number(k)
        if number is None:
            raise bad_k(k)
        text, rows = self.search(q, number, None if run is None else [run])
        return {"query": text, "runs": [{"run": name, "hits": [
            {"rank": hit.rank, "score": hit.score, "path": self.shown[self.index[hit.path]]} for hit in hits]}
            for name, hits in rows]}

    def next_failure(self, after: Optional[int], runs: Sequence[str]) -> Optional[int]:
        """The first caption after `after` (wrapping around) whose first hit shows another identity in one of the
        `runs`; None when there is none. Scanned a chunk at a time, each caption's top-1 remembered (the searcher
        encodes every query alone, so a chunk's top-1 is the page's)."""
        chosen = set(runs)
        selected = [i for i, name in enumerate(self.names) if name in chosen]
        n = len(self.captions)
        order = [((-1 if after is None else after) + 1 + j) % n for j in range(n)]
        for start in range(0, n, FAILURE_SCAN_CHUNK):
            chunk = order[start:start + FAILURE_SCAN_CHUNK]
            todo = [i for i in chunk if i not in self._top1]
            if todo:
                with self._lock:
                    results = self.searcher.search([self.captions[i] for i in todo], 1)
                self._top1.update((i, tuple(hits[0].correct for hits in per_run))
                                  for i, per_run in zip(todo, results))
            for i in chunk:
                if any(self._top1[i][r] is False for r in selected):
                    return i
        return None

    def image_file(self, index: str) -> str:
        """The file of gallery image `index` (symlinks resolved); FileNotFoundError for no such image,
        PermissionError for one that lies outside the gallery's folder."""
        i = whole_number(index) if index.isascii() and index.isdigit() else None
        i = -1 if i is None else i
        if not 0 <= i < len(self.paths):
            raise FileNotFoundError(index)
        real = os.path.realpath(self.paths[i])
        if os.path.commonpath([real, self.root]) != self.root or not os.path.isfile(real):
            raise PermissionError(index)
        return real


def build_app(service: Service, default_k: int, blocked: Sequence[str], hosts: Set[str] = frozenset(LOCAL_NAMES)):
    """The server: this module's routes, then the page mounted at / (Gradio), behind the allow-list; it answers only
    requests whose Host names one of `hosts` (lower case; see allowed_hosts)."""
    import gradio as gr
    from fastapi import FastAPI
    from fastapi.responses import FileResponse, JSONResponse, PlainTextResponse, Response
    from evaluation import search_page

    # No /docs, /redoc or /openapi.json: FastAPI's docs pages load their scripts from a CDN.
    app = FastAPI(docs_url=None, redoc_url=None, openapi_url=None)

    @app.middleware("http")
    async def allow_list(request, call_next):
        if not is_open_path(request.scope["path"]):
            return PlainTextResponse("not found", status_code=404)
        # A web page whose name an attacker points at 127.0.0.1 (DNS rebinding) still sends its own name.
        if host_name(request.headers.get("host", "")).lower() not in hosts:
            return PlainTextResponse("this server answers to requests that name this machine only", status_code=403)
        return await call_next(request)

    @app.get("/api/search")
    def api_search(q: str = "", k: str = "10", run: Optional[str] = None):
        try:
            return service.as_json(q, k, run)
        except UserError as e:
            return JSONResponse({"error": str(e)}, status_code=400)
        except LookupError as e:
            return JSONResponse({"error": str(e.args[0])}, status_code=404)

    def image_or_error(index: str):
        try:
            return service.image_file(index)
        except FileNotFoundError:
            return PlainTextResponse("no such image", status_code=404)
        except PermissionError:
            return PlainTextResponse("outside the gallery", status_code=403)

    @app.get("/img/{index}")
    def image(index: str):
        path = image_or_error(index)
        return path if isinstance(path, Response) else FileResponse(path, headers={"Cache-Control": "no-cache"})

    @app.get("/thumb/{index}")
    def thumb(index: str):
        path = image_or_error(index)
        if isinstance(path, Response):
            return path
        try:
            data = thumbnail(path, os.stat(path).st_mtime_ns)
        except (OSError, ValueError) as e:  # PIL's errors for a damaged image are OSErrors
            return PlainTextResponse(f"unreadable image ({type(e).__name__})", status_code=404)
        return Response(data, media_type="image/jpeg", headers={"Cache-Control": "no-cache"})

    page = search_page.build_page(service, default_k)
    return gr.mount_gradio_app(app, page, path="/", footer_links=[], run_history=False, ssr_mode=False,
                               mcp_server=False, enable_monitoring=False, allowed_paths=[],
                               blocked_paths=list(blocked), theme=search_page.theme(), css=search_page.CSS)


def shown_url(sock: socket.socket) -> str:
    host, port = sock.getsockname()[:2]
    return f"http://{'[' + host + ']' if ':' in host else host}:{port}/"


def allowed_hosts(sock: socket.socket, extra: Iterable[str] = ()) -> Set[str]:
    """The names a request's Host may give (lower case): this machine's local names; when the server listens
    beyond the loopback interface, also its host names, the addresses they resolve to and the bound address, and
    the `extra` names (--allow_host). A page elsewhere that points its own name at this machine (DNS rebinding)
    is still refused."""
    import ipaddress
    hosts = set(LOCAL_NAMES)
    bound = sock.getsockname()[0]
    if not ipaddress.ip_address(bound).is_loopback:
        names = {socket.gethostname(), socket.getfqdn()}
        hosts |= names
        for name in names:
            try:
                hosts |= {info[4][0] for info in socket.getaddrinfo(name, None)}
            except OSError:
                pass
        if not ipaddress.ip_address(bound).is_unspecified:
            hosts.add(bound)
    return {h.lower() for h in hosts | set(extra)}

