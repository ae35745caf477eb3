"""Versions of a Path, and what is persisted for it (issue 11: items 1, 5 and 9).

- Every manifest says which run of its origin produced it; a consumer records what it holds,
  and a fallback to the artifact store never silently replaces its files by older ones.
- A sub-path of a persisted Path can be fetched once its origin stopped.
- ``lit://`` strings that leave the work's root are refused where they become Paths, and no
  byte from outside a work's root reaches the store, whatever derived Path a work holds.

Real work processes throughout; the origin is lost by a real SIGKILL.
"""

from __future__ import annotations

import os
import random
import signal
import time
from pathlib import Path as FsPath

import pytest

from pathapi import App, Flow, LitPathError, OlderVersionError, Path, Work, WorkError
from pathapi.artifacts import ArtifactStore, SubPathError, decode_ref, encode_ref, subtree
from pathapi.held import HeldVersions
from pathapi.version import UNKNOWN, Version
from cas import Kind, Manifest
from cas.errors import ManifestError
from cas.workspace import Workspace

from test_app import pid_alive, version_of, versioned, wait_until_persisted

SIZE = 300_000


# ======================================================================================
# A fallback never goes back to an older version
# ======================================================================================
class Trainer(Work):
    def __init__(self) -> None:
        super().__init__(parallel=True)
        self.ckpt = "lit://ckpt"
        self.pid = 0

    def run(self, step: int) -> None:
        self.pid = os.getpid()
        if step > 1:  # test-only: the previous step's end state is in the store
            wait_until_persisted(self.name, "ckpt")
        os.makedirs(self.ckpt, exist_ok=True)
        (self.ckpt / "model.bin").write_bytes(versioned(step, SIZE))
        if step > 1:
            time.sleep(120)  # still training when the test kills it


class Deployer(Work):
    def __init__(self) -> None:
        super().__init__()
        self.seen: list[dict[str, object]] = []

    def run(self, ckpt: Path, explicit: bool = False, fresh: bool = False) -> None:
        entry: dict[str, object] = {}
        if fresh:
            import shutil

            shutil.rmtree(ckpt)
        if explicit or fresh:
            try:
                ckpt.get(overwrite=True)
            except OlderVersionError as e:
                entry["error"] = f"{type(e).__name__}: {e}"
        t = ckpt.last_transfer
        if t is not None:
            entry.update(source=t.source, kept_local=t.kept_local, note=t.note,
                         version=str(t.version) if t.version else None)
        entry["holds"] = version_of((ckpt / "model.bin").read_bytes())
        self.seen.append(entry)


class FallbackFlow(Flow):
    def __init__(self) -> None:
        super().__init__()
        self.trainer = Trainer()
        self.deployer = Deployer()
        self.trainer_error = ""

    def run(self) -> None:
        self.trainer.run(1)
        self.trainer.wait()
        self.trainer.run(2)  # parallel: writes step 2, then keeps training
        deadline = time.monotonic() + 60
        self.deployer.run(self.trainer.ckpt)  # from the origin, during run 2
        while self.deployer.seen[-1]["holds"] != 2 and time.monotonic() < deadline:
            self.deployer.run(self.trainer.ckpt)
        os.kill(self.trainer.pid, signal.SIGKILL)  # the origin is lost before run 2 ends
        while pid_alive(self.trainer.pid) and time.monotonic() < deadline:
            time.sleep(0.05)
        try:
            self.trainer.wait()
        except WorkError as e:
            self.trainer_error = str(e)
        self.deployer.run(self.trainer.ckpt)  # automatic get: the store holds step 1 only
        self.deployer.run(self.trainer.ckpt, explicit=True)  # get(overwrite=True)
        self.deployer.run(self.trainer.ckpt, fresh=True)  # nothing held here: take the stored one


@pytest.fixture(scope="module")
def fallback(tmp_path_factory: pytest.TempPathFactory) -> FallbackFlow:
    flow = FallbackFlow()
    App(flow, root=tmp_path_factory.mktemp("fallback") / "app").run()
    return flow


def test_a_get_from_the_origin_records_the_run_that_produced_the_tree(fallback: FallbackFlow) -> None:
    during = fallback.deployer.seen[-4]
    assert during["source"] == "origin" and during["holds"] == 2
    v = Version.parse(str(during["version"]))
    assert (v.run, v.phase) == (2, Version.DURING)


def test_the_automatic_get_keeps_newer_local_files_and_says_so(fallback: FallbackFlow) -> None:
    assert "root.trainer" in fallback.trainer_error
    auto = fallback.deployer.seen[-3]
    assert auto["holds"] == 2, "the fallback replaced step 2 by the older step 1"
    assert auto["source"] == "artifacts" and auto["kept_local"] is True
    assert "older" in str(auto["note"]) and "run 1" in str(auto["note"]) and "run 2" in str(auto["note"])
    v = Version.parse(str(auto["version"]))
    assert (v.run, v.phase) == (1, Version.ENDED)


def test_an_explicit_get_of_an_older_version_raises_and_keeps_the_files(fallback: FallbackFlow) -> None:
    explicit = fallback.deployer.seen[-2]
    assert explicit["holds"] == 2
    assert str(explicit["error"]).startswith("OlderVersionError: ")
    assert "root.trainer" in str(explicit["error"]) and "kept" in str(explicit["error"])


def test_with_nothing_held_locally_the_stored_version_is_taken(fallback: FallbackFlow) -> None:
    fresh = fallback.deployer.seen[-1]
    assert "error" not in fresh and fresh["source"] == "artifacts" and fresh["holds"] == 1


# ======================================================================================
# Sub-paths of a persisted Path, after the origin stopped
# ======================================================================================
class Keeper(Work):
    def __init__(self) -> None:
        super().__init__()
        self.ckpt = "lit://outputs/ckpt"

    def run(self) -> None:
        os.makedirs(self.ckpt / "sub", exist_ok=True)
        (self.ckpt / "model.bin").write_bytes(random.Random(1).randbytes(SIZE))
        (self.ckpt / "sub" / "opt.bin").write_bytes(random.Random(2).randbytes(SIZE))
        os.symlink("sub", self.ckpt / "latest")


class SubReader(Work):
    """Gets sub-paths of ``self.ckpt`` (set by the flow: state, so not fetched at run start)."""

    def __init__(self) -> None:
        super().__init__()
        self.ckpt: Path | None = None
        self.got: dict[str, dict[str, object]] = {}

    def run(self) -> None:
        assert self.ckpt is not None
        for name in ("model.bin", "sub", "latest/opt.bin", "missing.bin"):
            p = self.ckpt / name
            entry: dict[str, object] = {"exists_remote": p.exists_remote()}
            try:
                p.get()
            except FileNotFoundError:
                entry["get"] = "FileNotFoundError"
            else:
                t = p.last_transfer
                assert t is not None
                entry.update(get="ok", source=t.source, files=t.files)
                target = FsPath(p)
                if target.is_dir():
                    entry["tree"] = sorted(str(q.relative_to(target)) for q in target.rglob("*"))
                else:
                    seed = 1 if name == "model.bin" else 2
                    entry["bytes_ok"] = target.read_bytes() == random.Random(seed).randbytes(SIZE)
            self.got[name] = entry


class SubFlow(Flow):
    def __init__(self) -> None:
        super().__init__()
        self.keeper = Keeper()
        self.reader = SubReader()

    def run(self) -> None:
        self.keeper.run()
        self.keeper.stop()  # persisted, then gone: only the store can answer
        self.reader.ckpt = self.keeper.ckpt
        self.reader.run()


@pytest.fixture(scope="module")
def sub_paths(tmp_path_factory: pytest.TempPathFactory) -> dict[str, dict[str, object]]:
    flow = SubFlow()
    App(flow, root=tmp_path_factory.mktemp("sub") / "app").run()
    return flow.reader.got


def test_a_file_under_a_persisted_path_is_fetched_after_the_origin_stopped(sub_paths: dict[str, dict[str, object]]) -> None:
    got = sub_paths["model.bin"]
    assert got == {"exists_remote": True, "get": "ok", "source": "artifacts", "files": 1, "bytes_ok": True}


def test_a_folder_under_a_persisted_path_is_fetched_alone(sub_paths: dict[str, dict[str, object]]) -> None:
    got = sub_paths["sub"]
    assert got["exists_remote"] is True and got["get"] == "ok" and got["tree"] == ["opt.bin"]


def test_a_sub_path_through_a_link_of_the_persisted_tree_resolves_as_the_kernel_would(
        sub_paths: dict[str, dict[str, object]]) -> None:
    got = sub_paths["latest/opt.bin"]
    assert got["get"] == "ok" and got["bytes_ok"] is True


def test_a_sub_path_the_persisted_tree_lacks_does_not_exist(sub_paths: dict[str, dict[str, object]]) -> None:
    assert sub_paths["missing.bin"] == {"exists_remote": False, "get": "FileNotFoundError"}


# ======================================================================================
# lit:// paths stay inside their work's root
# ======================================================================================
class Holder(Work):
    def run(self) -> None:
        pass


@pytest.mark.parametrize("text", ["lit://../other_work/x", "lit:///etc/passwd", "lit://a/../../b", "lit://a/../b"])
def test_a_lit_string_leaving_the_root_is_refused_when_it_becomes_a_path(text: str) -> None:
    with pytest.raises(LitPathError, match="lit://"):
        Path(text)
    w = Holder()
    with pytest.raises(LitPathError):
        w.target = text
    assert not hasattr(w, "target")


class Escaper(Work):
    """Holds Paths derived from a good one that leave the root: the persister must refuse them."""

    def __init__(self, secret: str) -> None:
        super().__init__()
        self.data = "lit://data"
        self.secret = secret
        self.error = ""

    def run(self) -> None:
        os.makedirs(self.data, exist_ok=True)
        (self.data / "ok.bin").write_bytes(b"inside the root")
        depth = len(FsPath(os.getcwd()).relative_to(FsPath(self.secret).parent).parts)
        self.up = self.data / ("../" * (depth + 1) + FsPath(self.secret).name)
        self.absolute = self.data / self.secret  # joining an absolute path gives that path
        try:
            self.typed = "lit://../" + FsPath(self.secret).name
        except LitPathError as e:
            self.error = str(e)


class EscapeFlow(Flow):
    def __init__(self, secret: str) -> None:
        super().__init__()
        self.w = Escaper(secret)

    def run(self) -> None:
        self.w.run()
        self.w.stop()  # waits for the persist


def test_no_byte_from_outside_the_works_root_reaches_the_store(tmp_path: FsPath, capfd: pytest.CaptureFixture[str]) -> None:
    secret = tmp_path / "host-secret.bin"
    payload = random.Random(7).randbytes(100_000)
    secret.write_bytes(payload)
    flow = EscapeFlow(str(secret))
    App(flow, root=tmp_path / "app").run()
    assert "'..' component" in flow.w.error
    store = ArtifactStore.open(None, tmp_path / "app")
    try:
        # the Path's ref, and its version history (pathapi.history) naming the same tree
        names = sorted(n for n in store.refs.names() if not n.startswith("pathapi:history/"))
        assert names == ["root.w/data"], names
        stored = b"".join(bytes(data) for _, data in store.chunks.get_many(list(store.chunks.iter_ids())))
        assert payload[:4096] not in stored and b"inside the root" in stored
    finally:
        store.close()
    err = capfd.readouterr().err
    assert "not persisted" in err and "root.w" in err


# ======================================================================================
# The formats under it
# ======================================================================================
def _tree(tmp_path: FsPath) -> Manifest:
    root = tmp_path / "t"
    (root / "a" / "b").mkdir(parents=True)
    (root / "a" / "b" / "f").write_bytes(b"x" * 1000)
    (root / "top").write_bytes(b"y" * 10)
    os.symlink("a/b", root / "link")
    os.symlink("../top", root / "a" / "up")
    with Workspace(tmp_path / "state") as ws:
        return ws.snapshot(root)


def test_a_persisted_ref_round_trips_its_manifest_and_version(tmp_path: FsPath) -> None:
    m = _tree(tmp_path)
    v = Version(time.time_ns(), 3, Version.ENDED)
    assert decode_ref(encode_ref(m, v)) == (m, v)
    assert decode_ref(m.encode()) == (m, UNKNOWN)  # refs written before versions


@pytest.mark.parametrize("head", [b"", b"PRE", b"PREF\x02\x00\x05\x001.1.1", b"PREF\x01\x00\x05\x00x.1.1",
                                  b"PREF\x01\x00\xff\x001.1.1", b"XXXX" * 8])
def test_a_malformed_persisted_ref_is_a_manifest_error(tmp_path: FsPath, head: bytes) -> None:
    with pytest.raises(ManifestError):
        decode_ref(head + (_tree(tmp_path).encode() if head.startswith(b"PREF") else b""))


def test_subtree_follows_links_and_refuses_links_that_leave_it(tmp_path: FsPath) -> None:
    m = _tree(tmp_path)
    f = subtree(m, "link/f")
    assert f is not None and f.root_kind == Kind.FILE and f.total_size == 1000
    b = subtree(m, "a/b")
    assert b is not None and [e.path for e in b.entries] == ["f"]
    assert subtree(m, "nothing") is None and subtree(m, "top/x") is None
    with pytest.raises(SubPathError, match="a/up"):
        subtree(m, "a")


def test_held_versions_cover_paths_above_and_below(tmp_path: FsPath) -> None:
    held = HeldVersions(str(tmp_path))
    v1, v2 = Version(5, 1, Version.ENDED), Version(5, 2, Version.DURING)
    held.record("root.a", "ckpt", v1)
    held.record("root.a", "ckpt/model.bin", v2)
    assert held.held("root.a", "ckpt") == v2
    assert held.held("root.a", "ckpt/model.bin") == v2
    assert held.held("root.a", "ckpt/other") == v1
    assert held.held("root.b", "ckpt") is None and held.held("root.a", "ckptx") is None
    held.record("root.a", "ckpt", v1)  # a get of the whole folder replaces what was under it
    assert held.held("root.a", "ckpt/model.bin") == v1
    (tmp_path / "held-versions.json").write_bytes(b"\xff{not json")
    assert held.held("root.a", "ckpt") is None  # damaged: as if nothing was recorded


def test_versions_order_runs_and_phases() -> None:
    a = Version(10, 1, Version.ENDED)
    assert Version(10, 1, Version.DURING) < a < Version(10, 2, Version.DURING) < Version(11, 0, Version.ENDED)
    assert Version.parse(str(a)) == a
    for bad in ["", "1.2", "1.2.3", "a.b.c", "1.2.1 ", "-1.2.1"]:
        with pytest.raises(ValueError):
            Version.parse(bad)
