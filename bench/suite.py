"""The transfer scenarios: pathapi through its public API, and its peers, in one run.

One :class:`App` holds an origin work that owns the checkpoint folder (``lit://ckpt``),
another that owns a tree of small files (``lit://small``), a consumer work, and eight
parallel consumer works. The flow drives every scenario; each of pathapi's gets is a
consumer's ``run`` that receives the Path (fetched before ``run`` starts, as for any user),
and right next to it the flow runs every peer (:mod:`bench.peers`) on the same bytes, with
the disk settled (``sync`` + a pause) between any two measurements.

pathapi's seconds are the ``get`` itself (``Path.last_transfer.seconds``, measured in the
consumer: the manifest request, the origin's snapshot of changed files, the transfer and
the durable write); a peer's are its commands' wall time, process start included.
Its bytes are payload bytes that crossed the socket (``bytes_transferred``).

Edits are applied by the flow process straight to the origin's files (the bench plays the
trainer) so that no background persist competes with a measured get; the ``persist``
scenario measures that competition on purpose.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
import threading
import time
import urllib.parse
import urllib.request
from pathlib import Path as FsPath
from typing import Any

from cas.store import LocalRefStore
from pathapi import App, Flow, Path, SharedFolder, Work
from pathapi.artifacts import decode_ref
from pathapi.wire.codec import request_headers
from pathapi.wire.protocol import ROUTE_MANIFEST, ROUTE_STATS

from . import data as gen
from . import peers
from .measure import PeakRss, cpu_seconds, run_command, settle

ORIGIN = "root.origin"
SMALL_ORIGIN = "root.smallorigin"
FAN = 8


# -- works (module level: work processes are spawned and import them from here) -------------
class Origin(Work):
    """Owns a folder. Its ``run`` changes nothing; after a run the work persists its Paths
    in the background, which the ``persist`` scenario uses."""

    def __init__(self, rel: str) -> None:
        super().__init__()
        self.data = f"lit://{rel}"

    def run(self) -> None:
        pass


class Consumer(Work):
    """Receives Paths. ``run("get", path)``: the Path was fetched before run started; keep
    what that get did. ``run("clear", rel=...)``: remove the local copy (and make the removal
    durable, so its writeback does not land in the next measurement)."""

    def __init__(self, parallel: bool = False) -> None:
        super().__init__(parallel=parallel)
        self.record: dict[str, Any] = {}

    def run(self, action: str, data: Path | None = None, rel: str = "") -> None:
        if action == "get":
            assert data is not None
            rec = data.last_transfer
            self.record = dict(vars(rec)) if rec is not None else {}
        elif action == "clear":
            shutil.rmtree(rel, ignore_errors=True)
            os.sync()


class Bench(Flow):
    def __init__(self, cfg: dict[str, Any]) -> None:
        super().__init__()
        self.origin = Origin("ckpt")
        self.smallorigin = Origin("small")
        self.consumer = Consumer()
        self.fan = [Consumer(parallel=True) for _ in range(FAN)]
        self._cfg = cfg
        #: the App running this flow (set by run_transfers): its handles give pids and URLs
        self._app: App | None = None
        object.__setattr__(self, "rows", [])
        object.__setattr__(self, "notes", {})

    # -- plumbing ------------------------------------------------------------------
    @property
    def cfg(self) -> dict[str, Any]:
        return self._cfg

    @property
    def app(self) -> App:
        assert self._app is not None, "the bench flow runs only under run_transfers"
        return self._app

    def _pid(self, work: Work) -> int:
        handle = self.app.handle(work)
        pid = handle.pid
        actor = getattr(getattr(handle, "process", None), "actor", None)
        if pid is None and actor is not None:  # a Ray actor: on this machine, a local process too
            import ray

            pid = int(ray.get(actor.where.remote(), timeout=30)[2])
        assert pid is not None, f"{work.name} runs in no local process"
        return pid

    def _ask(self, work: Work, path: str, timeout: float = 10) -> bytes:
        """One GET to ``work``'s origin service, with the app's secret, as any consumer asks."""
        url = self.app.handle(work).url
        assert url is not None, f"{work.name} serves nothing"
        req = urllib.request.Request(url + path, headers=request_headers(self.app.secret))
        with urllib.request.urlopen(req, timeout=timeout, context=self.app.client_ssl_context()) as r:
            return r.read()

    def origin_stats(self, work: Work) -> dict[str, Any]:
        """The origin service's counters (``GET /v1/stats``): chunk reads from disk and its
        chunk cache."""
        try:
            return json.loads(self._ask(work, ROUTE_STATS))
        except OSError as e:
            return {"error": str(e)}

    def warm_origin(self, work: Work, rel: str) -> float:
        """Have the origin snapshot ``rel`` once (``GET /v1/manifest``), as its first persist
        would have after its run: later manifests come from its stat cache. Seconds taken."""
        t = time.perf_counter()
        self._ask(work, f"{ROUTE_MANIFEST}?{urllib.parse.urlencode({'path': rel})}", timeout=3600)
        return time.perf_counter() - t

    def row(self, scenario: str, tool: str, rep: int, seconds: float, moved: int, rss: dict[str, Any], **extra: Any) -> None:
        r = {"scenario": scenario, "tool": tool, "rep": rep, "seconds": seconds, "bytes_moved": moved, **rss, **extra}
        self.rows.append(r)
        cpu = f"  cpu {extra['cpu_s_origin']:.2f} s origin + {extra['cpu_s_consumer']:.2f} s consumer" if "cpu_s_origin" in extra else ""
        print(f"  {scenario:<10} {tool:<10} rep {rep}: {seconds:8.3f} s  {moved / 2**20:10.1f} MiB moved  "
              f"peak RSS {rss.get('peak_rss_max_process_MiB', 0):6.1f} MiB/process{cpu}", file=sys.stderr, flush=True)

    def ours(self, scenario: str, rep: int, consumer: Consumer, path: Path, origin: Work, **extra: Any) -> dict[str, Any]:
        settle(self.cfg["pause"])
        pids = (self._pid(origin), self._pid(consumer))
        with PeakRss(pids, names={pids[0]: origin.name, pids[1]: consumer.name}) as rss:
            cpu0 = [cpu_seconds(p) for p in pids]
            t = time.perf_counter()
            consumer.run("get", path)
            wall = time.perf_counter() - t
            cpu = [cpu_seconds(p) - c for p, c in zip(pids, cpu0, strict=True)]
        rec = consumer.record
        self.row(scenario, "pathapi", rep, rec["seconds"], rec["bytes_transferred"], rss.report.as_dict(),
                 wall=wall, chunks_transferred=rec["chunks_transferred"], chunks_reused=rec["chunks_reused"],
                 bytes_total=rec["bytes_total"], files=rec["files"], cpu_s_origin=cpu[0], cpu_s_consumer=cpu[1], **extra)
        return rec

    def peers(self, scenario: str, rep: int, rel: str, files: int, *, fresh_rsync: bool = False,
              only: tuple[str, ...] = ("cp", "rsync", "lightning")) -> None:
        src = os.path.join(self.cfg["small_root" if rel == "small" else "origin_root"], rel)
        base = self.cfg["peers"]
        size = peers.tree_bytes(src)
        if "cp" in only:
            settle(self.cfg["pause"])
            r = peers.cp(src, os.path.join(base, "cp", rel), files, size)
            self.row(scenario, "cp", rep, r.seconds, r.bytes_moved, r.rss)
        if "rsync" in only:
            settle(self.cfg["pause"])
            r = peers.rsync(src, os.path.join(base, "rsync", rel), files, fresh=fresh_rsync)
            self.row(scenario, "rsync", rep, r.seconds, r.bytes_moved, r.rss)
        if "lightning" in only:
            settle(self.cfg["pause"])
            r = peers.lightning(src, os.path.join(base, "lightning", "shared", rel),
                                os.path.join(base, "lightning", "dst", rel), size)
            self.row(scenario, "lightning", rep, r.seconds, r.bytes_moved, r.rss)

    def clear(self, consumer: Consumer, rel: str) -> None:
        consumer.run("clear", rel=rel)

    # -- scenarios -------------------------------------------------------------------
    def run(self) -> None:
        want = self.cfg["scenarios"]
        ckpt = os.path.join(self.cfg["origin_root"], "ckpt")
        nfiles = lambda p: sum(len(fs) for _, _, fs in os.walk(p))
        reps = self.cfg["repeat"]
        if "first" in want:
            print("scenario 1: first get (empty receiver)", file=sys.stderr)
            # rep 0: the origin has never read these files (no stat cache): its snapshot
            # reads, cuts and hashes them all inside the get.
            self.ours("first_cold", 0, self.consumer, self.origin.data, self.origin)
            self.peers("first_cold", 0, "ckpt", nfiles(ckpt), fresh_rsync=True, only=("cp",))
            for rep in range(reps):
                self.clear(self.consumer, "ckpt")
                self.ours("first", rep, self.consumer, self.origin.data, self.origin)
                self.peers("first", rep, "ckpt", nfiles(ckpt), fresh_rsync=True)
        if "reget" in want:
            print("scenario 2: unchanged re-get", file=sys.stderr)
            for rep in range(reps):
                self.ours("reget", rep, self.consumer, self.origin.data, self.origin)
                self.peers("reget", rep, "ckpt", nfiles(ckpt))
        if "fanout" in want:
            print(f"scenario 7: {FAN} consumers at once", file=sys.stderr)
            for rep in range(self.cfg["fan_repeat"]):
                self.fanout(rep, nfiles(ckpt))
        if "edits" in want:
            print("scenario 3: 1% scattered edits", file=sys.stderr)
            for rep in range(reps):
                written = gen.scattered_edits(FsPath(ckpt) / "model.f32", seed=rep)
                self.ours("edits", rep, self.consumer, self.origin.data, self.origin, bytes_changed=written)
                self.peers("edits", rep, "ckpt", nfiles(ckpt))
        if "insert" in want:
            print("scenario 4: 100-byte insert in the middle of a file", file=sys.stderr)
            for rep in range(reps):
                gen.insert_middle(FsPath(ckpt) / "model.f32", 100, seed=rep)
                self.ours("insert", rep, self.consumer, self.origin.data, self.origin, bytes_changed=100)
                self.peers("insert", rep, "ckpt", nfiles(ckpt))
        if "nextstep" in want:
            print("scenario 5: next training step (a tensor file perturbed, a new file)", file=sys.stderr)
            for rep in range(reps):
                _, changed = gen.training_step(FsPath(ckpt), step=rep + 1)
                self.ours("nextstep", rep, self.consumer, self.origin.data, self.origin, bytes_changed=changed)
                self.peers("nextstep", rep, "ckpt", nfiles(ckpt))
        if "small" in want:
            self.small(self.cfg["small_repeat"])
        if "persist" in want:
            self.persist_contention(nfiles(ckpt))

    def fanout(self, rep: int, files: int) -> None:
        """One consumer, then FAN consumers at once, all from empty; the origin's chunk reads
        counted for each. Timed from the flow: from the first ``run`` call to the last return."""
        origin = self.origin
        for c in [self.consumer, *self.fan]:
            self.clear(c, "ckpt")
        settle(self.cfg["pause"])
        before = self.origin_stats(origin)
        rec = self.ours("fan_1", rep, self.consumer, origin.data, origin)
        mid = self.origin_stats(origin)
        distinct = rec["chunks_transferred"] + rec["chunks_reused"]
        self.rows[-1].update(origin_chunk_reads=_delta(before, mid, "chunks_read"), distinct_chunks=distinct,
                             origin_stats=mid)
        self.rows[-1]["seconds"] = self.rows[-1]["wall"]  # flow-observed, as for the fan below
        settle(self.cfg["pause"])
        pids = [self._pid(origin), *[self._pid(c) for c in self.fan]]
        with PeakRss(pids, names={p: n for p, n in zip(pids, [origin.name, *[c.name for c in self.fan]])}) as rss:
            t = time.perf_counter()
            for c in self.fan:
                c.run("get", origin.data)
            for c in self.fan:
                c.wait()
            wall = time.perf_counter() - t
        after = self.origin_stats(origin)
        recs = [c.record for c in self.fan]
        self.row("fan_8", "pathapi", rep, wall, sum(r["bytes_transferred"] for r in recs), rss.report.as_dict(),
                 wall=wall, per_consumer_seconds=[r["seconds"] for r in recs],
                 origin_chunk_reads=_delta(mid, after, "chunks_read"), distinct_chunks=distinct, origin_stats=after)
        for c in self.fan:
            self.clear(c, "ckpt")
        self.fan_peers(rep, files)

    def fan_peers(self, rep: int, files: int) -> None:
        """FAN copies at once, by each peer, into fresh folders (removed after)."""
        src = os.path.join(self.cfg["origin_root"], "ckpt")
        base = os.path.join(self.cfg["peers"], "fan")
        size = peers.tree_bytes(src)
        dsts = [os.path.join(base, f"c{i}") for i in range(FAN)]
        kinds: dict[str, list[list[str]]] = {
            "cp": [["cp", "-r", "--reflink=never", src, d] for d in dsts],
            "rsync": [["rsync", "-a", "--no-whole-file", src + "/", d + "/"] for d in dsts],
            "lightning": [[sys.executable, "-m", "bench.lightning_model", src,
                           os.path.join(base, "shared"), *dsts]],
        }
        for tool, cmds in kinds.items():
            shutil.rmtree(base, ignore_errors=True)
            os.makedirs(base)
            settle(self.cfg["pause"])
            with PeakRss() as rss:
                t = time.perf_counter()
                threads = [threading.Thread(target=run_command, args=(c, rss, tool)) for c in cmds]
                for th in threads:
                    th.start()
                for th in threads:
                    th.join()
                if tool != "lightning":  # the model makes its copies durable itself
                    run_command(["sync", "-f", base], rss, "sync")
                wall = time.perf_counter() - t
            moved = size * FAN + (size if tool == "lightning" else 0)
            self.row("fan_8", tool, rep, wall, moved, rss.report.as_dict())
        shutil.rmtree(base, ignore_errors=True)

    def small(self, reps: int) -> None:
        root = os.path.join(self.cfg["small_root"], "small")
        files = sum(len(fs) for _, _, fs in os.walk(root))
        print(f"scenario 6: {files} small files, first get", file=sys.stderr)
        # First gets from an origin that has snapshotted the tree before (its stat cache warm),
        # as in scenario 1; the cold snapshot is timed on its own.
        settle(self.cfg["pause"])
        self.notes["small_origin_first_snapshot_s"] = self.warm_origin(self.smallorigin, "small")
        print(f"  small origin's first snapshot of the tree: {self.notes['small_origin_first_snapshot_s']:.2f} s",
              file=sys.stderr)
        for rep in range(reps):
            self.clear(self.consumer, "small")
            self.ours("small_first", rep, self.consumer, self.smallorigin.data, self.smallorigin)
            self.peers("small_first", rep, "small", files, fresh_rsync=True)
        print("scenario 6: re-get after 1% of the small files changed", file=sys.stderr)
        for rep in range(reps):
            changed = gen.change_small_files(FsPath(root), 0.01, seed=rep)
            self.ours("small_1pct", rep, self.consumer, self.smallorigin.data, self.smallorigin, files_changed=changed)
            self.peers("small_1pct", rep, "small", files)

    def persist_contention(self, files: int) -> None:
        """A first get while the origin persists the checkpoint to the artifact store (its
        first persist: every chunk read and written to the store): what a consumer sees when
        it asks right after the origin's run returned. Next to it: a quiet first get, and
        ``cp`` while the same persist runs."""
        print("persist: a first get while the origin persists", file=sys.stderr)
        refs = LocalRefStore(os.path.join(self.cfg["app_root"], "artifacts", "refs"))
        name = f"{ORIGIN}/ckpt"
        self.clear(self.consumer, "ckpt")
        self.ours("persist_quiet", 0, self.consumer, self.origin.data, self.origin)
        self.clear(self.consumer, "ckpt")
        settle(self.cfg["pause"])
        t0 = time.perf_counter()
        self.origin.run()  # returns at once; the work persists lit://ckpt in the background
        rec = self.ours("persist_busy", 0, self.consumer, self.origin.data, self.origin)
        done = _wait_ref(refs, name, rec["manifest_id"], timeout=600)
        persist_s = time.perf_counter() - t0 if done else float("nan")
        self.rows[-1]["persist_seconds_from_run"] = persist_s
        self.notes["persist_seconds"] = persist_s
        # cp while a persist of the same size runs: a second, fresh persist is not possible
        # (the store now holds every chunk), so cp is measured quiet only, next to it.
        self.peers("persist_quiet", 0, "ckpt", files, only=("cp",))


def _delta(a: dict[str, Any], b: dict[str, Any], key: str) -> int | None:
    if key in a and key in b:
        return int(b[key]) - int(a[key])
    return None


def _wait_ref(refs: LocalRefStore, name: str, manifest_hex: str, timeout: float) -> bool:
    """Until the artifact store's ref ``name`` names ``manifest_hex`` (persist finished)."""
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        raw = refs.get(name)
        if raw is not None and decode_ref(raw)[0].id.hex() == manifest_hex:
            return True
        time.sleep(0.05)
    return False


def run_transfers(cfg: dict[str, Any]) -> dict[str, Any]:
    """Make the data, run the App, return rows and notes. ``cfg``: size, files, repeat,
    scenarios, dir, pause."""
    base = FsPath(cfg["base"])
    app_root = base / "app"
    origin_root = app_root / "works" / ORIGIN
    small_root = app_root / "works" / SMALL_ORIGIN
    origin_root.mkdir(parents=True, exist_ok=True)
    small_root.mkdir(parents=True, exist_ok=True)
    t = time.perf_counter()
    sizes = gen.make_checkpoint(origin_root / "ckpt", cfg["size"])
    small_bytes = 0
    if "small" in cfg["scenarios"]:
        small_bytes = gen.make_small_files(small_root / "small", cfg["files"])
    os.sync()
    print(f"data made in {time.perf_counter() - t:.1f} s: checkpoint {sizes}, small files {small_bytes} B",
          file=sys.stderr)
    flow = Bench({**cfg, "origin_root": str(origin_root), "small_root": str(small_root), "app_root": str(app_root),
                  "peers": str(base / "peers")})
    cluster = None
    where: dict[str, Any] = {}
    if cfg.get("cluster") == "ray":
        # Works on the nodes of a Ray cluster on this machine (a head and three one-CPU
        # nodes, loopback only: tests/raycluster.py), the artifact store a folder they share.
        sys.path.insert(0, str(FsPath(__file__).resolve().parent.parent / "tests"))
        from raycluster import RayTestCluster

        cluster = RayTestCluster(workers=3).start()
        os.environ["RAY_ADDRESS"] = cluster.address
        where = {"cluster": "ray", "store": SharedFolder(app_root / "artifacts")}
    # tls: on when asked, else the default (off for local processes, on on a cluster).
    app = App(flow, root=app_root, tls=True if cfg.get("tls") else None, **where)
    flow._app = app
    try:
        app.run()
    finally:
        if cluster is not None:
            cluster.shutdown()
    notes = {**flow.notes, "runner": cfg.get("cluster") or "local", "tls": app.tls_on,
             "same_host": os.environ.get("PATHAPI_SAME_HOST", "1") != "0"}
    return {"checkpoint_files": sizes, "small_files_bytes": small_bytes, "rows": flow.rows, "notes": notes}


__all__ = ["Bench", "Consumer", "Origin", "run_transfers"]
