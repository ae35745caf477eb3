"""The command lines under bad input and faults (issue 11, items 13 and 14).

Every case runs the real ``pathapi`` / ``cas`` command in a child process and checks what a
user sees: one line on stderr saying what failed and where, and the exit code (1 for an
error, 130 after SIGINT, 143 after SIGTERM); ``--debug`` adds the traceback. Faults are real:
a real syntax error, a real file where a folder must go, a real SIGTERM, a real file
rewritten (by this process, through inotify, while the push is SIGSTOPped) between the
snapshot of a push and the read of its chunks; ``pathapi demo`` runs with a private TMPDIR,
which must be empty after it, whether it finished, failed or was interrupted.
"""

from __future__ import annotations

import ctypes
import os
import select
import signal
import struct
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
TIMEOUT = 120  # seconds any one command may take here (a 2-core shared machine)


def _env(**extra: str) -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])),
            **extra}


def command(prog: str, *args: str, cwd: Path, **env: str) -> subprocess.CompletedProcess[str]:
    """``python -m <prog> args...`` run to its end."""
    return subprocess.run([sys.executable, "-m", prog, *args], cwd=cwd, env=_env(**env),
                          capture_output=True, text=True, timeout=TIMEOUT)


def one_line(err: str) -> str:
    """The single line a failed command printed on stderr (asserts it is one, no traceback)."""
    lines = err.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in err, f"want one line on stderr, got:\n{err}"
    return lines[0]


APP_HEAD = """
import os, time
from pathapi import App, Flow, Work
"""

FAILING_APP = APP_HEAD + """
class Boom(Work):
    def run(self):
        raise ValueError("boom in the work")

class Root(Flow):
    def __init__(self):
        super().__init__()
        self.boom = Boom()
    def run(self):
        self.boom.run()

app = App(Root())
"""

OK_APP = APP_HEAD + """
class Fine(Work):
    def run(self):
        self.done = True

class Root(Flow):
    def __init__(self):
        super().__init__()
        self.fine = Fine()
    def run(self):
        self.fine.run()

app = App(Root())
"""


def write_app(folder: Path, name: str, text: str) -> Path:
    path = folder / name
    path.write_text(textwrap.dedent(text))
    return path


# ======================================================================================
# pathapi run: the app file
# ======================================================================================
def test_a_syntax_error_in_the_app_file_is_one_line_with_file_and_line(tmp_path: Path) -> None:
    app = write_app(tmp_path, "broken.py", "from pathapi import App\n\nx = (1,\n")
    out = command("pathapi", "run", str(app), cwd=tmp_path)
    assert out.returncode == 1
    line = one_line(out.stderr)
    assert line.startswith(f"pathapi: {app}:3: SyntaxError:"), line
    assert "never closed" in line


def test_a_missing_app_file_is_named_not_reported_as_a_missing_module(tmp_path: Path) -> None:
    out = command("pathapi", "run", "nowhere.py", cwd=tmp_path)
    assert out.returncode == 1
    line = one_line(out.stderr)
    assert line.startswith(f"pathapi: no such file: {tmp_path / 'nowhere.py'}"), line
    assert "No module named" not in line


def test_an_app_file_that_fails_while_imported_says_what_and_where(tmp_path: Path) -> None:
    app = write_app(tmp_path, "needs_dep.py", "import os\nimport no_such_dependency_here\n")
    out = command("pathapi", "run", str(app), cwd=tmp_path)
    assert out.returncode == 1
    line = one_line(out.stderr)
    assert "ModuleNotFoundError: No module named 'no_such_dependency_here'" in line
    assert f"{app}:2" in line


def test_an_app_file_named_like_an_imported_module_is_refused_by_name(tmp_path: Path) -> None:
    (tmp_path / "apps").mkdir()  # not the current folder, which Python puts first on sys.path itself
    app = write_app(tmp_path / "apps", "json.py", OK_APP)  # `import json` gives the standard library's
    out = command("pathapi", "run", str(app), "--root", str(tmp_path / "app"), cwd=tmp_path)
    assert out.returncode == 1
    line = one_line(out.stderr)
    assert f"{app} cannot be imported as module 'json'" in line and "rename the app file" in line
    assert not (tmp_path / "app").exists()


# ======================================================================================
# pathapi run: the other arguments, refused before any work starts
# ======================================================================================
def test_a_root_that_is_a_file_is_refused_before_any_work_starts(tmp_path: Path) -> None:
    app = write_app(tmp_path, "okapp.py", OK_APP)
    (tmp_path / "taken").write_text("a file, not a folder")
    out = command("pathapi", "run", str(app), "--root", "taken", cwd=tmp_path)
    assert out.returncode == 1
    line = one_line(out.stderr)
    assert line.startswith("pathapi: --root taken:") and "is a file, not a folder" in line
    assert (tmp_path / "taken").read_text() == "a file, not a folder"


def test_a_root_below_a_file_names_the_file_in_the_way(tmp_path: Path) -> None:
    app = write_app(tmp_path, "okapp.py", OK_APP)
    (tmp_path / "taken").write_text("x")
    out = command("pathapi", "run", str(app), "--root", "taken/app", cwd=tmp_path)
    assert out.returncode == 1
    assert f"{tmp_path / 'taken'}, on its way, is a file" in one_line(out.stderr)


@pytest.mark.parametrize("url, says", [
    ("ftp://x", "unsupported store scheme 'ftp'"),
    ("s3://", "not an S3 URL"),
])
def test_a_store_url_no_store_reads_is_refused_once_before_any_work_starts(tmp_path: Path, url: str, says: str) -> None:
    app = write_app(tmp_path, "okapp.py", OK_APP)
    out = command("pathapi", "run", str(app), "--root", str(tmp_path / "app"), "--store", url, cwd=tmp_path)
    assert out.returncode == 1
    line = one_line(out.stderr)
    assert line.startswith(f"pathapi: --store {url}:") and says in line
    assert not (tmp_path / "app" / "works").exists()  # no work process was started


def test_a_relative_store_is_the_current_folders_for_every_work(tmp_path: Path) -> None:
    app = write_app(tmp_path, "persisting.py", APP_HEAD + """
class Writer(Work):
    def __init__(self):
        super().__init__()
        self.out = "lit://out"
    def run(self):
        os.makedirs(self.out, exist_ok=True)
        with open(os.path.join(self.out, "f.txt"), "w") as f:
            f.write("kept")

class Root(Flow):
    def __init__(self):
        super().__init__()
        self.writer = Writer()
    def run(self):
        self.writer.run()

app = App(Root())
""")
    out = command("pathapi", "run", str(app), "--root", "app", "--store", "shared-store", cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    from pathapi.artifacts import ArtifactStore

    store = ArtifactStore.open(str(tmp_path / "shared-store"), str(tmp_path / "app"))
    try:
        assert store.manifest("root.writer", "out") is not None  # persisted where the user said
    finally:
        store.close()
    assert list((tmp_path / "app").rglob("shared-store")) == []  # not in a work's own folder


# ======================================================================================
# pathapi run: a work that raises
# ======================================================================================
def test_a_failing_work_is_one_line_naming_the_work_and_the_exception(tmp_path: Path) -> None:
    app = write_app(tmp_path, "failing.py", FAILING_APP)
    out = command("pathapi", "run", str(app), "--root", str(tmp_path / "app"), cwd=tmp_path)
    assert out.returncode == 1
    line = one_line(out.stderr)
    assert line.startswith("pathapi: work 'root.boom' failed: ValueError: boom in the work"), line
    assert "--debug" in line


@pytest.mark.parametrize("where", ["before", "after"])
def test_debug_adds_the_local_and_the_works_traceback(tmp_path: Path, where: str) -> None:
    app = write_app(tmp_path, "failing.py", FAILING_APP)
    rest = ["run", str(app), "--root", str(tmp_path / "app")]
    out = command("pathapi", *(["--debug", *rest] if where == "before" else [*rest, "--debug"]), cwd=tmp_path)
    assert out.returncode == 1
    assert "Traceback (most recent call last)" in out.stderr
    assert "--- traceback in root.boom ---" in out.stderr
    assert f'File "{app}", line 7, in run' in out.stderr  # the raise, in the work's process
    assert out.stderr.strip().splitlines()[-1] == "pathapi: work 'root.boom' failed: ValueError: boom in the work"


def test_sigterm_while_the_app_file_is_imported_is_one_line_and_exit_143(tmp_path: Path) -> None:
    marker = tmp_path / "importing"
    app = write_app(tmp_path, "slow_import.py", f"""
        import pathlib, time
        pathlib.Path({str(marker)!r}).write_text("x")
        time.sleep(60)
    """)
    proc = subprocess.Popen([sys.executable, "-m", "pathapi", "run", str(app)], cwd=tmp_path, env=_env(),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + TIMEOUT
        while not marker.exists():
            assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()
            time.sleep(0.02)
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=TIMEOUT)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 128 + signal.SIGTERM, err
    assert one_line(err) == "pathapi: interrupted"


# ======================================================================================
# pathapi demo leaves nothing in the temp folder
# ======================================================================================
def leftovers(tmpdir: Path) -> list[str]:
    return sorted(str(p.relative_to(tmpdir)) for p in tmpdir.rglob("*"))


def test_the_demo_removes_its_temporary_app_folder_and_says_where_it_was(tmp_path: Path) -> None:
    tmpdir = tmp_path / "tmp"
    tmpdir.mkdir()
    out = command("pathapi", "demo", "--size-mib", "2", cwd=tmp_path, TMPDIR=str(tmpdir))
    assert out.returncode == 0, out.stderr
    last = out.stdout.strip().splitlines()[-1]
    assert "identical to the trainer's" in last
    assert f"app folder {tmpdir}/pathapi-demo-" in last and "removed when the demo ends" in last
    assert leftovers(tmpdir) == []


def test_the_demo_removes_its_temporary_app_folder_when_it_fails(tmp_path: Path) -> None:
    tmpdir = tmp_path / "tmp"
    tmpdir.mkdir()
    (tmp_path / "store" / "chunks").mkdir(parents=True)  # a store of a format no work reads: fails in the works
    (tmp_path / "store" / "chunks" / "FORMAT").write_text("cas-chunkstore 99\n")
    out = command("pathapi", "demo", "--size-mib", "1", "--store", str(tmp_path / "store"), cwd=tmp_path,
                  TMPDIR=str(tmpdir))
    assert out.returncode == 1
    last = out.stderr.strip().splitlines()[-1]
    assert last.startswith("pathapi: work 'root.") and "could not start" in last and "Traceback" not in out.stderr
    assert leftovers(tmpdir) == []


def test_the_demo_refuses_a_root_that_is_a_file_and_leaves_nothing(tmp_path: Path) -> None:
    tmpdir = tmp_path / "tmp"
    tmpdir.mkdir()
    (tmp_path / "taken").write_text("x")
    out = command("pathapi", "demo", "--size-mib", "1", "--root", "taken", cwd=tmp_path, TMPDIR=str(tmpdir))
    assert out.returncode == 1
    assert one_line(out.stderr).startswith("pathapi: --root taken: it is a file, not a folder")
    assert leftovers(tmpdir) == [] and (tmp_path / "taken").read_text() == "x"


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_the_demo_removes_its_temporary_app_folder_when_interrupted(tmp_path: Path, sig: int) -> None:
    """Interrupted once the trainer has written its first checkpoint: the works have put
    files in the folder. The demo process is SIGSTOPped while the signal is sent, so that
    the demo is surely still running when the signal arrives."""
    tmpdir = tmp_path / "tmp"
    tmpdir.mkdir()
    proc = subprocess.Popen([sys.executable, "-m", "pathapi", "demo", "--size-mib", "16"], cwd=tmp_path,
                            env=_env(TMPDIR=str(tmpdir)), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)
    try:
        deadline = time.monotonic() + TIMEOUT
        while not list(tmpdir.glob("pathapi-demo-*/works/root.train/outputs/checkpoints/checkpoint_1.ckpt")):
            assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()
            time.sleep(0.005)
        os.kill(proc.pid, signal.SIGSTOP)
        if sig == signal.SIGINT:
            os.killpg(proc.pid, sig)  # Ctrl-C: the whole foreground process group
        else:
            os.kill(proc.pid, sig)
        os.kill(proc.pid, signal.SIGCONT)
        out, err = proc.communicate(timeout=TIMEOUT)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    assert proc.returncode == 128 + sig, (out, err)
    assert err.strip().splitlines()[-1] == "pathapi: interrupted", err
    assert leftovers(tmpdir) == []


# ======================================================================================
# cas sync refuses a store that is not there
# ======================================================================================
def pushed_tree(tmp_path: Path) -> tuple[Path, Path, Path]:
    """A small tree pushed to a store: (tree, store, manifest file)."""
    src = tmp_path / "src"
    src.mkdir()
    (src / "a.bin").write_bytes(os.urandom(300_000))
    (src / "b.txt").write_text("hello\n")
    store, manifest = tmp_path / "store", tmp_path / "tree.manifest"
    out = command("cas", "push", str(src), str(store), str(manifest), "--state", str(tmp_path / "state"), cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    return src, store, manifest


def test_cas_sync_refuses_a_missing_store_instead_of_creating_it(tmp_path: Path) -> None:
    _, _, manifest = pushed_tree(tmp_path)
    mistyped = tmp_path / "stroe"
    out = command("cas", "sync", str(manifest), str(mistyped), str(tmp_path / "dest"),
                  "--state", str(tmp_path / "state2"), cwd=tmp_path)
    assert out.returncode == 1
    assert one_line(out.stderr) == (f"cas: error: no chunk store at {mistyped} (no such folder): "
                                    "give the folder `cas push` stored the chunks in")
    assert not mistyped.exists() and not (tmp_path / "dest").exists()


def test_cas_sync_refuses_a_folder_that_is_not_a_store_and_leaves_it_alone(tmp_path: Path) -> None:
    _, _, manifest = pushed_tree(tmp_path)
    other = tmp_path / "photos"
    other.mkdir()
    out = command("cas", "sync", str(manifest), str(other), str(tmp_path / "dest"),
                  "--state", str(tmp_path / "state2"), cwd=tmp_path)
    assert out.returncode == 1
    assert "is not a chunk store" in one_line(out.stderr)
    assert list(other.iterdir()) == [] and not (tmp_path / "dest").exists()


def test_cas_sync_of_a_file_that_is_no_manifest_names_it(tmp_path: Path) -> None:
    _, store, _ = pushed_tree(tmp_path)
    junk = tmp_path / "notes.txt"
    junk.write_text("not a manifest")
    out = command("cas", "sync", str(junk), str(store), str(tmp_path / "dest"), cwd=tmp_path)
    assert out.returncode == 1
    assert one_line(out.stderr).startswith(f"cas: error: {junk} is not a valid manifest:")


# ======================================================================================
# cas push never writes a manifest naming chunks it did not store
# ======================================================================================
_IN_OPEN, _IN_CLOSE_NOWRITE = 0x20, 0x10
_EVENT = struct.Struct("iIII")


class RewriteAfterSnapshot(threading.Thread):
    """Rewrites ``victim`` (in place, same size, other bytes) right after a push process
    closed it following its snapshot, before the push reads the chunks back.

    Real mechanism: inotify tells when the push closes the file; the push is SIGSTOPped,
    the file rewritten (its mtime set back to an old value, so the snapshot never re-reads
    it for being recent), and the push continued. The push opens the victim twice per
    attempt (snapshot, then chunk read), so every other close is a snapshot's. The files of
    ``slow`` are touched too (same times, new ctime): the next snapshot hashes them again,
    after the victim, which gives this thread time to act before the push reads the victim
    back. ``lost`` counts rewrites that came too late (the push had already opened the file
    again): such a run proves nothing, and the test runs it again.
    """

    def __init__(self, victim: Path, slow: list[Path], proc: subprocess.Popen[str], times: int) -> None:
        super().__init__(daemon=True)
        self.victim, self.slow, self.proc, self.times = victim, slow, proc, times
        self.rewrites = self.lost = 0
        self.error: BaseException | None = None
        self._pending: list[int] = []  # events read but not handled yet
        libc = ctypes.CDLL(None, use_errno=True)
        self.fd = libc.inotify_init1(os.O_CLOEXEC | os.O_NONBLOCK)
        if self.fd < 0 or libc.inotify_add_watch(self.fd, os.fsencode(victim), _IN_OPEN | _IN_CLOSE_NOWRITE) < 0:
            raise OSError(ctypes.get_errno(), "inotify is not available")

    def _read(self, wait: float) -> list[int]:
        """The masks of the events queued now (waiting up to ``wait`` s for the first)."""
        if not select.select([self.fd], [], [], wait)[0]:
            return []
        try:
            data = os.read(self.fd, 65536)
        except BlockingIOError:
            return []
        masks, at = [], 0
        while at < len(data):
            _, mask, _, length = _EVENT.unpack_from(data, at)
            masks.append(mask)
            at += _EVENT.size + length
        return masks

    def _drain(self) -> list[int]:
        masks: list[int] = []
        while batch := self._read(0):
            masks += batch
        return masks

    def _wait_stopped(self) -> None:
        deadline = time.monotonic() + 30
        while open(f"/proc/{self.proc.pid}/stat").read().rsplit(")", 1)[1].split()[0] not in ("T", "t"):
            assert time.monotonic() < deadline, "the push did not stop"
            time.sleep(0.001)

    def _rewrite(self) -> None:
        os.kill(self.proc.pid, signal.SIGSTOP)
        try:
            self._wait_stopped()
            self._pending += self._drain()  # every event of the push until it stopped
            if any(m & _IN_OPEN for m in self._pending):  # it opened the victim again already
                self.lost += 1
                return
            old = self.victim.stat()
            with open(self.victim, "r+b") as f:
                f.write(os.urandom(old.st_size))
            for p in [self.victim, *self.slow]:
                st = p.stat()
                os.utime(p, ns=(st.st_atime_ns, old.st_mtime_ns if p == self.victim else st.st_mtime_ns))
            self._drain()  # our own open of the victim
            self.rewrites += 1
        finally:
            os.kill(self.proc.pid, signal.SIGCONT)

    def run(self) -> None:
        try:
            closes = 0
            deadline = time.monotonic() + TIMEOUT
            while self.proc.poll() is None and time.monotonic() < deadline:
                self._pending += self._read(0.05)
                while self._pending:
                    mask = self._pending.pop(0)
                    if mask & _IN_CLOSE_NOWRITE:
                        if closes % 2 == 0 and self.rewrites + self.lost < self.times:
                            self._rewrite()
                        closes += 1
        except BaseException as e:  # reported by the test
            self.error = e
        finally:
            os.close(self.fd)


def tree_for_push(base: Path) -> Path:
    """``victim.bin`` at the top (snapshotted first: a folder's files are read before its
    sub-folders), then 16 MiB in ``z/`` to snapshot after it; all with old mtimes."""
    src = base / "src"
    (src / "z").mkdir(parents=True)
    (src / "victim.bin").write_bytes(os.urandom(1 << 20))
    for i in range(2):
        (src / "z" / f"part{i}.bin").write_bytes(os.urandom(8 << 20))
    for p in [src / "victim.bin", *(src / "z").iterdir()]:
        os.utime(p, (time.time() - 3600, time.time() - 3600))
    return src


def push_while_rewritten(tmp_path: Path, times: int) -> tuple[subprocess.CompletedProcess[str], Path, Path, Path]:
    """``cas push`` of a fresh tree whose victim file is rewritten after ``times`` snapshots;
    (the push's result, tree, store, manifest file). Runs again (at most 5 times) while a
    rewrite came too late to prove anything."""
    for attempt in range(5):
        base = tmp_path / f"try{attempt}"
        src, store, manifest = tree_for_push(base), base / "store", base / "tree.manifest"
        manifest.write_bytes(b"the previous manifest")
        proc = subprocess.Popen([sys.executable, "-m", "cas", "push", str(src), str(store), str(manifest),
                                 "--state", str(base / "state")], cwd=base, env=_env(),
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        saboteur = RewriteAfterSnapshot(src / "victim.bin", sorted((src / "z").iterdir()), proc, times)
        saboteur.start()
        try:
            out, err = proc.communicate(timeout=TIMEOUT)
        finally:
            if proc.poll() is None:
                proc.kill()
            saboteur.join(TIMEOUT)
        if saboteur.error is not None:
            raise saboteur.error
        if saboteur.lost == 0:
            assert saboteur.rewrites >= 1, "the push never read the victim file"
            return subprocess.CompletedProcess(proc.args, proc.returncode, out, err), src, store, manifest
    pytest.fail("every rewrite came after the push had read the file again (5 runs)")


def test_cas_push_of_a_file_changed_after_its_snapshot_stores_what_it_names(tmp_path: Path) -> None:
    pushed, src, store, manifest = push_while_rewritten(tmp_path, times=1)
    assert pushed.returncode == 0, pushed.stderr
    dest = tmp_path / "dest"
    synced = command("cas", "sync", str(manifest), str(store), str(dest), "--state", str(tmp_path / "rstate"),
                     cwd=tmp_path)
    assert synced.returncode == 0, synced.stderr  # every chunk the manifest names is stored
    for rel in ("victim.bin", "z/part0.bin", "z/part1.bin"):
        assert (dest / rel).read_bytes() == (src / rel).read_bytes(), rel  # the file as rewritten


def test_cas_push_of_a_file_that_keeps_changing_refuses_and_keeps_the_old_manifest(tmp_path: Path) -> None:
    pushed, src, _, manifest = push_while_rewritten(tmp_path, times=1000)
    assert pushed.returncode == 1, (pushed.stdout, pushed.stderr)
    line = one_line(pushed.stderr)
    assert line.startswith(f"cas: error: {src} kept changing while it was pushed") and "no manifest written" in line
    assert manifest.read_bytes() == b"the previous manifest"
    assert sorted(p.name for p in manifest.parent.iterdir()) == ["src", "state", "store", "tree.manifest"]
