"""tools/serve.py (`sh run.sh serve`): the JSON endpoint against retrieve.py, the page in headless Chromium, the paths
it refuses over HTTP, bad input, and a port in use.

Two servers run on private copies of the smoke run and of the small Demo-PEDES: one searches the test split, one of
whose images is a symlink that leaves the split's folder; the other a folder gallery with such a symlink. The
browser test writes its screenshot into its temporary folder, or where SEARCH_PAGE_SCREENSHOT says: the README's
picture is made with `SEARCH_PAGE_SCREENSHOT=docs/images/search_page.png python -m pytest tests/test_serve.py -k
browser` (tools/make_readme_images.sh runs it), so no test writes a tracked file.
"""
import http.client
import io
import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import threading
import time
from types import SimpleNamespace
import urllib.parse

from PIL import Image, ImageChops
import pytest

from helpers import build_dataset, run_variant
import retrieve
from utils.cli import run_main
from utils.files import write_atomic

# Trains, compiles or starts processes: not in the quick subset (pytest -m "not slow").
pytestmark = pytest.mark.slow

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SERVE = ["-m", "tools.serve"]
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
HIT = re.compile(r"^(\d+) (-?\d+\.\d{4}) (\S.*)$")
FREE_TEXT = "a man in a black jacket and blue jeans"


class Server:
    """tools/serve.py in a subprocess on a free port; its output is read by a thread so that it never blocks."""

    def __init__(self, args, log_path, cwd):
        self.log = open(log_path, "w")
        self.proc = subprocess.Popen([sys.executable, *SERVE, *args, "--port", "0"], stdout=subprocess.PIPE,
                                     stderr=self.log, text=True, cwd=cwd)
        self.lines = []
        threading.Thread(target=lambda: self.lines.extend(self.proc.stdout), daemon=True).start()
        self.url = None

    def wait_ready(self, timeout=180):
        deadline = time.time() + timeout
        while time.time() < deadline:
            found = [m for m in (re.match(r"serving (http://\S+/) ", line) for line in list(self.lines)) if m]
            if found:
                self.url = found[0].group(1)
                self.port = int(self.url.rsplit(":", 1)[1].strip("/"))
                return self
            if self.proc.poll() is not None:
                break
            time.sleep(0.1)
        self.stop()
        with open(self.log.name) as f:
            pytest.fail(f"the server did not start: {''.join(self.lines)}{f.read()[-3000:]}")

    def get(self, path, host=None):
        """(status, content type, body) of a GET of `path`, sent exactly as written (no '..' folding)."""
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=30)
        try:
            conn.request("GET", path, headers={"Host": host} if host else {})
            response = conn.getresponse()
            return response.status, response.getheader("content-type") or "", response.read()
        finally:
            conn.close()

    def search(self, q, k=10, **more):
        status, _, body = self.get("/api/search?" + urllib.parse.urlencode({"q": q, "k": k, **more}))
        return status, json.loads(body)

    def stop(self):
        self.proc.terminate()
        try:
            self.proc.wait(20)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        self.log.close()


@pytest.fixture(scope="module")
def setup(smoke_run, demo_root, tmp_path_factory):
    """The two servers (`split`, `folder`), the data root, run folder and folder gallery they search, the test
    split, and the gallery index of each server's symlinked image (`outside`)."""
    tmp = tmp_path_factory.mktemp("serve")
    run = tmp / "run"
    run.mkdir()
    for name in ("configs.yaml", "best.pth"):
        shutil.copy2(os.path.join(smoke_run, name), run / name)
    # A second run to compare with: the same model with noise on its weights, named smoke_b.
    other = run_variant(str(run), str(tmp / "other"), noise=0.05, name="smoke_b")
    data = tmp / "data"
    shutil.copytree(os.path.join(demo_root, "Demo-PEDES"), data / "Demo-PEDES")
    imgs = data / "Demo-PEDES" / "imgs"
    # A test image that is really a training image: a symlink that leaves the split's folder.
    inside = sorted((imgs / "test").iterdir())[5]
    inside.unlink()
    os.symlink(sorted((imgs / "train").iterdir())[0], inside)
    folder = tmp / "folder"
    folder.mkdir()
    for path in sorted((imgs / "val").iterdir())[:12]:
        shutil.copy2(path, folder / path.name)
    os.symlink(sorted((imgs / "train").iterdir())[1], folder / "zz_outside.jpg")  # sorts last in the gallery
    common = [str(run), "--root_dir", str(data), "--device", "cpu"]
    # Run from `tmp`, the paths the servers show are relative ("data/..."): the screenshot does not change with it.
    split_server = Server([*common, other], tmp / "split.log", tmp)
    folder_server = Server([*common, "--gallery", str(folder)], tmp / "folder.log", tmp)
    test = build_dataset("Demo-PEDES", str(data)).test
    outside = {"split": [os.path.abspath(p) for p in test["img_paths"]].index(str(inside)), "folder": 12}
    try:
        yield SimpleNamespace(split=split_server.wait_ready(), folder=folder_server.wait_ready(), data=str(data),
                              run=str(run), gallery=str(folder), test=test, outside=outside, cwd=str(tmp))
    finally:
        split_server.stop()
        folder_server.stop()


def retrieve_hits(capsys, monkeypatch, setup, *args):
    """retrieve.py's printed hits, one list of (rank, score, path) per query, run where the servers run."""
    monkeypatch.chdir(setup.cwd)
    with pytest.raises(SystemExit) as done:
        run_main(retrieve.main, ["--config_file", os.path.join(setup.run, "configs.yaml"), "--topk", "10", *args])
    out, err = capsys.readouterr()
    assert done.value.code == 0, err
    queries = []
    for line in out.splitlines():
        rank, score, path = HIT.match(line).groups()
        if rank == "1":
            queries.append([])
        queries[-1].append((int(rank), float(score), path))
    return queries


def assert_same(api_runs, printed):
    # One retrieve.py call for many queries is comparable because the smoke run is fp32: under bf16 autocast a
    # query's scores move by up to ~3e-4 with the other queries of its batch (the endpoint searches one at a time).
    (run,) = api_runs
    assert [(h["rank"], h["path"]) for h in run["hits"]] == [(rank, path) for rank, _, path in printed]
    for hit, (_, score, _) in zip(run["hits"], printed):
        assert abs(hit["score"] - score) <= 1e-4


def test_endpoint_gives_retrieve_rankings_and_answers_within_a_second(setup, tmp_path, capsys, monkeypatch):
    test = setup.test
    indices = list(range(0, len(test["captions"]), len(test["captions"]) // 20))[:20]
    printed = retrieve_hits(capsys, monkeypatch, setup, "--root_dir", setup.data, "--out", str(tmp_path / "r.png"),
                            *[arg for i in indices for arg in ("--caption", str(i))])
    times = []
    for i, hits in zip(indices, printed):
        start = time.perf_counter()
        status, answer = setup.split.search(test["captions"][i])
        times.append(time.perf_counter() - start)
        assert status == 200 and answer["query"] == test["captions"][i]
        assert [run["run"] for run in answer["runs"]] == ["smoke", "smoke_b"]
        assert_same(answer["runs"][:1], hits)
    assert statistics.median(times) < 1.0, times

    queries = (FREE_TEXT, "a woman with a red bag")
    printed = retrieve_hits(capsys, monkeypatch, setup, "--gallery", setup.gallery, "--out", str(tmp_path / "f.png"),
                            *[arg for query in queries for arg in ("--query", query)])
    for query, hits in zip(queries, printed):
        status, answer = setup.folder.search(f"  {query.replace(' ', '   ')} ", run="smoke")
        assert status == 200 and answer["query"] == query  # spaces are folded, as retrieve.py does
        assert_same(answer["runs"], hits)


def test_bad_queries_get_a_message(setup):
    server = setup.split
    for params, status, words in [({"q": ""}, 400, "empty"), ({"q": "   "}, 400, "empty"),
                                  ({"q": "a" * 10_000}, 400, "10,000 characters"),
                                  ({"q": FREE_TEXT, "k": 0}, 400, "must be a whole number"),
                                  ({"q": FREE_TEXT, "k": "ten"}, 400, "must be a whole number"),
                                  ({"q": FREE_TEXT, "run": "nope"}, 404, "unknown run")]:
        code, answer = server.search(**{"k": 10, **params})
        assert code == status and words in answer["error"], (params, answer)
    code, answer = server.search(FREE_TEXT, k=10_000)
    assert code == 200 and len(answer["runs"][0]["hits"]) == len(setup.test["img_paths"])  # the whole gallery


def test_only_gallery_images_and_assets_are_served(setup):
    config, checkpoint = os.path.join(setup.run, "configs.yaml"), os.path.join(setup.run, "best.pth")
    for name in ("split", "folder"):
        server, outside = getattr(setup, name), setup.outside[name]
        for path in ("/", "/img/0", "/thumb/0"):
            status, kind, body = server.get(path)
            assert status == 200 and kind.startswith("text/html" if path == "/" else "image/"), path
        # The symlink that leaves the gallery's folder: its image is searched but never served.
        assert server.get(f"/img/{outside}")[0] == 403 and server.get(f"/thumb/{outside}")[0] == 403
        for path in ["/img/../configs.yaml", "/img/%2e%2e/%2e%2e/run/configs.yaml", "/img/-1",
                     f"/img/{10 ** 6}", "/img/0/../1", "/thumb/..%2f..%2fbest.pth", config, checkpoint,
                     f"/{config}", f"/gradio_api/file={config}", f"/gradio_api/file={checkpoint}",
                     f"/gradio_api/file/{config}", f"/file={config}", "/gradio_api/file=../../run/configs.yaml",
                     "/gradio_api/file=/etc/passwd", "/static/../../../../../etc/passwd",
                     "/assets/%2e%2e/%2e%2e/%2e%2e/%2e%2e/etc/passwd", "/gradio_api/upload",
                     "/gradio_api/proxy=http://127.0.0.1/", "/docs", "/openapi.json", "/monitoring"]:
            status, _, body = server.get(path)
            assert status in (403, 404), (path, status)
            assert b"root_dir" not in body and b"root:" not in body and len(body) < 100, path
        # Bound to 127.0.0.1, it answers only to local names (a rebound DNS name is refused).
        assert server.get("/img/0", host=f"localhost:{server.port}")[0] == 200
        assert server.get("/img/0", host=f"attacker.example:{server.port}")[0] == 403


def test_numbers_are_ascii_digits_and_long_names_are_404(setup):
    """'²', '①' and '５' are digits to str.isdigit(): an index or k must be ASCII digits (400 or 404, never 500,
    and '５' is no 5); a name too long for a file system is 404 under every asset prefix, not an OSError."""
    server = setup.split
    for k in ("²", "５", "٣", "1e3", " "):
        code, answer = server.search(FREE_TEXT, k=k)
        assert code == 400 and "must be a whole number" in answer["error"], k
    assert server.search(FREE_TEXT, k=" 3 ")[0] == 200
    for path in ("/img/²", "/thumb/①", "/img/５", "/thumb/%EF%BC%95"):
        assert server.get(urllib.parse.quote(path, safe="/%"))[0] == 404, path
    for prefix in ("/assets/", "/static/", "/svelte/", "/img/", "/thumb/"):
        for name in ("a" * 300, "b/" * 1200):
            status, _, body = server.get(prefix + name)
            assert status == 404 and len(body) < 100, (prefix, len(name), status)


def test_serving_beyond_this_machine_warns_and_keeps_the_host_check(setup, tmp_path):
    server = Server([setup.run, "--root_dir", setup.data, "--device", "cpu", "--host", "0.0.0.0", "--allow_host",
                     "search.example"], tmp_path / "open.log", setup.cwd).wait_ready()
    try:
        assert server.get("/img/0", host=f"localhost:{server.port}")[0] == 200
        assert server.get("/img/0", host=f"search.example:{server.port}")[0] == 200
        assert server.get("/img/0", host=f"attacker.example:{server.port}")[0] == 403
    finally:
        server.stop()
    with open(tmp_path / "open.log") as f:
        log = f.read()
    assert "warning: serving on 0.0.0.0, beyond this machine: anyone who can reach it can search the runs" in log
    assert "search.example" in log


def test_a_port_in_use_is_one_line_and_exit_2(setup):
    server = setup.split
    assert server.url.startswith("http://127.0.0.1:")  # the default host
    done = subprocess.run(["sh", os.path.join(ROOT, "run.sh"), "serve", setup.run, "--port", str(server.port)],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 2, done.stderr
    assert done.stderr.count("\n") == 1 and done.stderr.startswith("error: cannot listen on 127.0.0.1 port")
    assert "in use" in done.stderr and done.stdout == ""


def save_screenshot(png, folder):
    """Write the page's picture to $SEARCH_PAGE_SCREENSHOT (unless that file already shows it: the browser's
    rasterising varies by a level or two between runs, no reason to change a picture), else into `folder`; the
    path written."""
    path = os.environ.get("SEARCH_PAGE_SCREENSHOT") or os.path.join(folder, "search_page.png")
    if os.path.isfile(path):
        with Image.open(path) as old, Image.open(io.BytesIO(png)) as new:
            old, new = old.convert("RGB"), new.convert("RGB")
        if old.size == new.size and max(high for _, high in ImageChops.difference(old, new).getextrema()) <= 8:
            return path
    write_atomic(path, png, what="the screenshot")
    return path


def test_the_page_in_a_browser(setup, tmp_path):
    if CHROMIUM is None:
        pytest.skip("no chromium binary: install Debian's chromium (apt-get install chromium; .ci/run does)")
    from playwright.sync_api import expect, sync_playwright
    server = setup.split
    requests, failures = [], []
    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=CHROMIUM, args=["--disable-dev-shm-usage"])
        try:
            page = browser.new_page(viewport={"width": 1280, "height": 980})
            page.on("request", lambda r: requests.append(r.url))
            page.on("response", lambda r: failures.append((r.status, r.url)) if r.status >= 400 else None)
            page.goto(server.url)
            query = page.locator("#query textarea, #query input").first
            query.fill(FREE_TEXT)
            query.press("Enter")
            expect(page.locator(".ps-hit")).to_have_count(20, timeout=30_000)  # two runs, ten hits each
            _, answer = server.search(FREE_TEXT)
            for run in answer["runs"]:
                row = page.locator(f".ps-run[data-run={run['run']}] .ps-hit")
                assert [h.get_attribute("data-path") for h in row.all()] == [h["path"] for h in run["hits"]]
            shown = page.locator(".ps-run[data-run=smoke] .ps-hit")
            assert set(page.locator(".ps-hit").evaluate_all("hs => hs.map(h => h.className)")) == \
                {"ps-hit ps-unknown"}
            page.wait_for_function("() => [...document.querySelectorAll('.ps-hit img')]"
                                   ".every(i => i.complete && i.naturalWidth > 0)")

            page.locator("#next-failure").click()  # a caption whose first hit, in some run, is another identity
            firsts = page.locator(".ps-run .ps-hit:first-child")
            expect(firsts.first).to_have_class(re.compile("ps-good|ps-bad"), timeout=30_000)
            assert any("ps-bad" in c for c in firsts.evaluate_all("hs => hs.map(h => h.className)"))
            caption = query.input_value()
            _, answer = server.search(caption)
            for run in answer["runs"]:
                row = page.locator(f".ps-run[data-run={run['run']}] .ps-hit")
                assert [h.get_attribute("data-path") for h in row.all()] == [h["path"] for h in run["hits"]]
            page.wait_for_function("() => [...document.querySelectorAll('.ps-hit img')]"
                                   ".every(i => i.complete && i.naturalWidth > 0)")
            page.evaluate("document.activeElement.blur()")  # no focus ring: the same search gives the same picture
            shot = save_screenshot(page.screenshot(full_page=True, animations="disabled", caret="hide"), str(tmp_path))
            with Image.open(shot) as picture:
                assert picture.size[0] > 400 and picture.size[1] > 300

            first = shown.first
            first.click()  # the larger view: image, path, identity, captions
            viewer = page.locator(".ps-viewer")
            expect(viewer).to_be_visible()
            page.wait_for_function("() => document.querySelector('.ps-large').naturalWidth > 0")
            assert page.locator(".ps-path").text_content() == first.get_attribute("data-path")
            assert page.locator(".ps-id").text_content() == f"Identity {first.get_attribute('data-pid')}"
            assert page.locator(".ps-captions li").count() >= 1
            page.keyboard.press("Escape")
            expect(viewer).to_be_hidden()

            for text, words in (("", "empty"), ("x" * 10_000, "10,000 characters")):
                query.fill(text)
                page.locator("#search").click()
                expect(page.locator(".ps-message")).to_contain_text(words, timeout=30_000)
            query.fill('<img src=x onerror="window.injected = 1"> a man')  # the query is shown as text only
            page.locator("#search").click()
            expect(page.locator(".ps-note q")).to_have_text('<img src=x onerror="window.injected = 1"> a man')
            assert page.evaluate("window.injected") is None
        finally:
            browser.close()
    assert requests and all(url.startswith(server.url) for url in requests), \
        [url for url in requests if not url.startswith(server.url)]
    assert not failures, failures
