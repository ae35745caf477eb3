"""The storage browser in a real headless Chromium (Debian's ``chromium``, driven by
Playwright): what a user clicks through and what the page shows, read from the DOM.

One app run (tests/_ui_app.py, via ``pathapi run``) feeds the module; ``pathapi ui`` serves it
as a real process. Checked: no page, API, download or event stream without the token; landing
page -> a Path -> a version diff -> downloads (a file, a folder as a tar, byte for byte); the
previews; a file named like an XSS payload shows as text and runs nothing; the page updates
live when a persist lands; ``App(ui=True)`` serves the running app.

``PATHAPI_UI_SCREENSHOTS=docs/ui`` saves a screenshot of each page there (docs/ui/*.png).
In CI (``CI`` set) a missing browser fails the module; elsewhere it skips it.
"""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
import tarfile
import tempfile
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from _ui_app import XSS_NAME, version_files

from pathapi import App, Flow, Work

CHROMIUM = "/usr/bin/chromium"
if not os.path.exists(CHROMIUM) and not os.environ.get("CI"):
    pytest.skip("Debian's chromium is not installed (.ci/run installs it)", allow_module_level=True)
sync_api = pytest.importorskip("playwright.sync_api") if not os.environ.get("CI") else __import__(
    "playwright.sync_api", fromlist=["sync_playwright"])

REPO = Path(__file__).resolve().parent.parent
APP_FILE = REPO / "tests" / "_ui_app.py"
CKPT = "outputs/ckpt"
SHOTS = os.environ.get("PATHAPI_UI_SCREENSHOTS")
ARGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking",
        "--disable-component-update", "--disable-sync"]


def _env() -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))}


@pytest.fixture(scope="module")
def app_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("uiapp")
    subprocess.run([sys.executable, "-m", "pathapi", "run", str(APP_FILE), "--root", str(root), "-q"], cwd=REPO,
                   env=_env(), check=True, timeout=120, capture_output=True)
    return root


@pytest.fixture(scope="module")
def ui(app_root: Path) -> Iterator[str]:
    """``pathapi ui --root`` as a user starts it; its first stdout line is the URL."""
    proc = subprocess.Popen([sys.executable, "-m", "pathapi", "ui", "--root", str(app_root)], cwd=REPO, env=_env(),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert proc.stdout is not None
        url = proc.stdout.readline().strip()
        assert url.startswith("http://127.0.0.1:") and "/?token=" in url, (url, proc.stderr and proc.stderr.read())
        yield url
    finally:
        proc.terminate()
        proc.wait(30)


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    with sync_api.sync_playwright() as p, tempfile.TemporaryDirectory() as profile:
        ctx = p.chromium.launch_persistent_context(profile, executable_path=CHROMIUM, headless=True, args=ARGS,
                                                   accept_downloads=True, viewport={"width": 1200, "height": 900})
        yield ctx
        ctx.close()


@pytest.fixture
def page(browser: Any, ui: str) -> Iterator[Any]:
    pg = browser.new_page()
    dialogs: list[str] = []
    pg.on("dialog", lambda d: (dialogs.append(d.message), d.dismiss()))
    pg.goto(ui)  # the token once: a cookie from then on
    yield pg
    assert not dialogs, f"a script ran: {dialogs}"
    pg.close()


def base(url: str) -> str:
    return url.split("/?token=")[0]


def shot(pg: Any, name: str) -> None:
    if SHOTS:
        os.makedirs(SHOTS, exist_ok=True)
        pg.screenshot(path=os.path.join(SHOTS, f"{name}.png"), full_page=True)


# -- the token ---------------------------------------------------------------------------
@pytest.mark.parametrize("where", ["/", "/api/works", f"/path?work=root.train&rel={CKPT}",
                                   f"/download?work=root.train&rel={CKPT}", "/events", "/static/app.js"])
def test_without_the_token_everything_answers_401(ui: str, where: str) -> None:
    for headers in ({}, {"Cookie": "pathapi_ui_1=wrong"}, {"Authorization": "Bearer wrong"}):
        with pytest.raises(urllib.error.HTTPError) as e:
            urllib.request.urlopen(urllib.request.Request(base(ui) + where, headers=headers), timeout=30)
        assert e.value.code == 401
    token = ui.split("token=")[1]
    if where != "/events":
        with urllib.request.urlopen(urllib.request.Request(base(ui) + where, headers={"X-Pathapi-Token": token}),
                                    timeout=30) as r:
            assert r.status == 200


def test_a_browser_without_the_token_gets_401(browser: Any, ui: str) -> None:
    fresh = browser.browser.new_context() if browser.browser else None
    pg = (fresh or browser).new_page()
    pg.context.clear_cookies()
    assert pg.goto(base(ui) + "/").status == 401
    assert "token" in pg.inner_text("body")
    pg.close()


# -- landing -> Path -> diff -> download -------------------------------------------------
def test_landing_page_lists_works_and_their_paths(page: Any) -> None:
    assert page.url.endswith("/") and "token" not in page.url  # the token left the address bar
    shot(page, "landing")
    assert page.inner_text("#works h2") == "root.train"
    cells = page.locator("#works table.paths tbody tr").first.locator("td").all_inner_texts()
    files = version_files(1)
    assert cells[0] == CKPT and cells[1] == "dir" and cells[3] == str(len(files)) and cells[5] == "2"
    assert "UTC" in cells[6] and cells[7] == "1"


def test_a_paths_page_shows_tree_versions_transfers_and_dedup(page: Any) -> None:
    page.click(f"text={CKPT}")
    page.wait_for_selector("#tree")
    shot(page, "path")
    assert page.inner_text("h1") == f"root.train/{CKPT}"
    names = [n.strip() for n in page.locator("#tree tbody tr td:first-child").all_inner_texts()]
    for rel in version_files(1):
        assert rel.rsplit("/", 1)[-1] in names
    assert "latest → model.safetensors" in names and "empty/" in names and "sub/" in names
    run_sh = page.locator("#tree tbody tr", has_text="run.sh").locator("td").all_inner_texts()
    assert run_sh[1] == "18 B" and run_sh[2] == "0755"
    versions = page.locator("#versions tbody tr")
    assert versions.count() == 2 and "run 1" in versions.nth(0).inner_text() and "current" in versions.nth(1).inner_text()
    transfers = page.locator("#transfers tbody tr")
    assert transfers.count() == 2
    newest = transfers.nth(0).locator("td").all_inner_texts()
    assert newest[0] == "root.deploy" and newest[2] == "origin" and newest[3] == CKPT and "5 chunks" in newest[5]
    assert page.inner_text("#dedup").startswith("Dedup: ")


def test_the_diff_of_two_versions_shows_files_and_tensors(page: Any) -> None:
    page.click(f"text={CKPT}")
    page.click("#diff-go")
    page.wait_for_selector("#diff")
    shot(page, "diff")
    rows = {r.locator("td").nth(1).inner_text(): r.locator("td").nth(0).inner_text()
            for r in page.locator("#diff tbody tr").all()}
    assert rows == {"added.txt": "added", "notes.txt": "removed", "config.json": "changed",
                    "metrics.csv": "changed", "model.safetensors": "changed"}
    tensors = {r.locator("td").nth(1).inner_text(): r.locator("td").nth(0).inner_text()
               for r in page.locator("table.tensor-diff tbody tr").all()}
    assert tensors == {"embed.weight": "same", "layer.0.weight": "changed", "head.weight": "same"}
    assert "16 B" in page.locator("table.tensor-diff tbody tr", has_text="layer.0.weight").inner_text()


def test_a_file_downloads_byte_for_byte(page: Any) -> None:
    page.click(f"text={CKPT}")
    page.click("a.file-link:text-is('model.safetensors')")
    page.wait_for_selector("#tensors")
    shot(page, "file")
    rows = [r.locator("td").all_inner_texts() for r in page.locator("#tensors tbody tr").all()]
    assert [r[0] for r in rows] == ["embed.weight", "layer.0.weight", "head.weight"]
    assert rows[0][1:] == ["F32", "75000", "293.0 KiB"]
    with page.expect_download() as d:
        page.click("#download")
    assert d.value.suggested_filename == "model.safetensors"
    assert Path(d.value.path()).read_bytes() == version_files(1)["model.safetensors"]


def test_a_folder_downloads_as_a_tar_with_exact_contents(page: Any) -> None:
    page.click(f"text={CKPT}")
    with page.expect_download() as d:
        page.click("#download-all")
    assert d.value.suggested_filename == "ckpt.tar"
    with tarfile.open(d.value.path()) as tar:
        got = {m.name: m for m in tar.getmembers()}
        files = {f"ckpt/{rel}": data for rel, data in version_files(1).items()}
        assert set(got) == {"ckpt", "ckpt/sub", "ckpt/empty", "ckpt/latest", *files}
        for name, data in files.items():
            assert tar.extractfile(got[name]).read() == data, name  # type: ignore[union-attr]
        assert got["ckpt/sub/run.sh"].mode == 0o755 and got["ckpt/config.json"].mode == 0o644
        assert got["ckpt/latest"].issym() and got["ckpt/latest"].linkname == "model.safetensors"


def test_previews_text_json_csv_and_an_image(page: Any, ui: str) -> None:
    def open_file(name: str) -> None:
        page.goto(base(ui) + f"/path?work=root.train&rel={CKPT}")
        page.click(f"a.file-link:text-is('{name}')")
        page.wait_for_selector("#preview")

    open_file("config.json")
    assert json.loads(page.inner_text("#preview")) == json.loads(version_files(1)["config.json"])
    open_file("metrics.csv")
    assert page.locator("#preview thead th").all_text_contents() == ["step", "loss"]
    assert page.locator("#preview tbody tr").count() == 4
    open_file("logo.png")
    page.wait_for_function("document.getElementById('preview').complete")
    assert page.evaluate("document.getElementById('preview').naturalWidth") == 4
    shot(page, "image")


def test_a_hostile_file_name_is_shown_as_text_and_runs_nothing(page: Any) -> None:
    page.click(f"text={CKPT}")
    assert page.locator("img[src=x]").count() == 0
    link = page.locator("a.file-link", has_text="onerror")
    assert link.inner_text() == XSS_NAME
    link.click()
    page.wait_for_selector("#preview")
    assert page.inner_text("h1") == XSS_NAME and page.locator("img[src=x]").count() == 0
    assert page.inner_text("#preview").strip() == version_files(1)[XSS_NAME].decode().strip()
    # the fixture's dialog handler fails the test if alert() ever ran


def test_the_page_updates_live_when_a_persist_lands(page: Any, app_root: Path, tmp_path: Path) -> None:
    from cas.workspace import Workspace
    from pathapi.artifacts import ArtifactStore
    from pathapi.version import Version

    page.wait_for_selector("#live.on")
    (tmp_path / "late").mkdir()
    (tmp_path / "late" / "x.txt").write_text("late\n")
    store = ArtifactStore.open(None, app_root)
    try:
        with Workspace(tmp_path / "ws") as ws:
            store.persist("root.late", "late", str(tmp_path / "late"), ws, version=Version(2, 1, 1))
    finally:
        store.close()
    page.wait_for_selector("#works h2:text-is('root.late')", timeout=30_000)
    assert page.locator("#works h2").all_inner_texts() == ["root.late", "root.train"]


# -- App(ui=True) ------------------------------------------------------------------------
class Writer(Work):
    def __init__(self) -> None:
        super().__init__()
        self.out = "lit://out"

    def run(self) -> None:
        os.makedirs(self.out, exist_ok=True)
        (self.out / "a.txt").write_text("hello\n")


class WatchingFlow(Flow):
    def __init__(self) -> None:
        super().__init__()
        self.writer = Writer()
        self.seen: list[Any] = []

    def run(self) -> None:
        self.writer.run()
        self.writer.stop()  # waits for the persist
        url = APP.ui_url if APP is not None else None
        assert url is not None
        base_url, token = url.split("/?token=")
        req = urllib.request.Request(base_url + "/api/works", headers={"X-Pathapi-Token": token})
        with urllib.request.urlopen(req, timeout=30) as r:
            self.seen.append(json.loads(r.read()))


APP: App | None = None


def test_app_with_ui_serves_the_running_apps_store(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    global APP
    flow = WatchingFlow()
    APP = App(flow, root=tmp_path, ui=True)
    try:
        APP.run()
    finally:
        url, APP = APP.ui_url, None
    assert url is None  # stopped with the app
    printed = capsys.readouterr().out
    assert "pathapi ui: http://127.0.0.1:" in printed and "/?token=" in printed
    (doc,) = flow.seen
    assert [(p["work"], p["path"]) for w in doc["works"] for p in w["paths"]] == [("root.writer", "out")]
