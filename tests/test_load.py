"""Issue 7, "Load": under load every transfer stays exact and every process's memory bounded.

Three loads, through the public API, with real work processes and real sockets:

- **many consumers, one small file**: 100 consumer works (100 processes) fetch the same small
  checkpoint from one origin at the same moment;
- **a few consumers, one large file**: 8 consumer works fetch the same large checkpoint at the
  same moment;
- **many small files in one Path**: a first get, a re-get after 1 % of the files changed (plus a
  few added and removed), a re-get of the unchanged tree, then five more versions (1 % of the
  files rewritten each time), each got again.

Every consumer's result is compared with the origin's files (paths, bytes, exec bits, links).
Memory is peak RSS (``VmHWM``) of each process over the phase under test: the origin's is read
from ``/proc/<pid>/status`` by the flow, each consumer's by itself; the high-water mark is
reset first (``/proc/<pid>/clear_refs``; where the kernel refuses, the lifetime peak is used,
which only makes the bound stricter). Bounds are budgets that do not grow with the file size
(one large file) or grow by a fixed amount per file (many files), stated at each constant.

Works run with the soft ``RLIMIT_NOFILE`` at 1024, a common default: nothing may need a
descriptor per file or per chunk (a tree of 20,000 files found two places that did).

Consumers are real processes (one per consumer, as in production) and their gets are
released together by a barrier; each consumer records when its get ran, and the tests check
that the gets really overlapped (else nothing concurrent was tested).

Sizes here are sized for CI (about two minutes on a shared 2-core machine, most of it
starting and stopping 101 work processes and creating 40,000 files): 100 consumers x 2 MiB,
8 consumers x 64 MiB, 20,000 files. The full sizes (8 consumers x 1 GiB, 100,000 files) are
marked ``slow`` and run only with ``PATHAPI_SOAK=1`` (about ten minutes); the 1 GiB file is
what shows that the origin never holds a file, since 64 MiB fits in its budget:

    PATHAPI_SOAK=1 PATHAPI_LOAD_REPORT=load.jsonl /work/venv/bin/python -m pytest tests/test_load.py -q -s

Each test prints its figures (peak RSS, times, for information) as one JSON line, and appends
it to the file named by ``PATHAPI_LOAD_REPORT`` if set.
"""

from __future__ import annotations

import json
import os
import shutil
import stat
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path as FsPath
from typing import Any

import pytest
from _load_works import Consumer, KiB, MiB, Origin, proc_kib, reset_peak
from trees import listing, sha

from pathapi import App, Flow

SOAK = os.environ.get("PATHAPI_SOAK") == "1"
soak = [pytest.mark.slow, pytest.mark.skipif(not SOAK, reason="full size: run with PATHAPI_SOAK=1")]

ORIGIN = "root.origin"

# -- memory budgets -----------------------------------------------------------------------
#: What serving one large file may add to the origin's RSS, whatever its size (measured:
#: +290 MiB for 8 x 64 MiB, +356 MiB for 8 x 1 GiB). What the origin holds meanwhile, each
#: bounded on its own: its frame cache (64 MiB), the batch its background persist of the same
#: file stores at once (64 MiB), the read buffers of the snapshots taken at once (the
#: persister's and the manifest requests': up to 3 x 27 MiB), the chunk answers built or
#: being sent (3 at most, each ~8 MiB held about twice, plus socket buffers), and what the
#: allocator keeps of all that. Holding the file, or an answer per consumer, breaks it.
SERVE_BUDGET = 448 * MiB
#: What serving one small file (2 MiB) to 100 consumers at once may add to the origin
#: (measured: +19 MiB). An answer held per consumer would be 200 MiB or more.
SMALL_SERVE_BUDGET = 96 * MiB
#: What one get of a large file may add to a consumer (measured: +57 MiB): 4 answers of
#: ~8 MiB in flight, each decoded and written, never the file.
GET_BUDGET = 160 * MiB
#: What the gets of a many-files Path may add to each process over the whole run (its peak
#: RSS over all the gets, less its RSS before the first), a fixed part plus a part per file.
#: The origin (measured: +251 MiB for 20,000 files, +629 MiB for 100,000: ~4.7 KiB per file)
#: holds the manifests of the last versions it served (two at this size), its persister's
#: snapshot, the stat cache's pending entries, and its frame cache and persist batch (64 MiB
#: each). The consumer (measured: +76 MiB, +232 MiB: ~2 KiB per file) holds the target's
#: manifest and its own tree's, the plan and the journal. Holding the files' bytes (8 KiB
#: each on average here) breaks both.
TREE_ORIGIN_BUDGET = (192 * MiB, 6 * KiB)
TREE_CONSUMER_BUDGET = (96 * MiB, 3 * KiB)
#: New versions of a many-files Path served after the first re-gets, and what the origin may
#: grow by over the last three, per file of the tree. Keeping every version served, as the
#: origin did, cost ~0.65 KiB per file per version. With old manifests bounded, the origin's
#: RSS still drifted by 0.25-0.45 KiB per file per version over three versions in CI-like runs
#: (20 and 26 MiB at 20k files; not yet explained: allocator retention or stat cache pages),
#: so the bound sits above that drift (it catches retention of more than 2 KiB per file over
#: three versions; the old unbounded retention, at ~0.65 KiB per version, is at its edge).
VERSIONS = 5
VERSIONS_PER_FILE = 2 * KiB


# -- helpers -------------------------------------------------------------------------------
def differences(want: dict[str, Any], got: dict[str, Any], limit: int = 5) -> list[str]:
    out = [f"missing {k}" for k in sorted(want.keys() - got.keys())[:limit]]
    out += [f"extra {k}" for k in sorted(got.keys() - want.keys())[:limit]]
    out += [f"differs {k}: {got[k]} != {want[k]}" for k in sorted(want.keys() & got.keys()) if want[k] != got[k]][:limit]
    return out


def release(barrier: str, n: int, limit: float = 600.0) -> None:
    """Wait until ``n`` works arrived at ``barrier``, then let them all go at once."""
    deadline = time.monotonic() + limit
    while len(os.listdir(barrier)) < n:
        if time.monotonic() > deadline:
            raise TimeoutError(f"only {len(os.listdir(barrier))} of {n} works arrived")
        time.sleep(0.01)
    open(os.path.join(barrier, ".go"), "w").close()


def max_overlap(intervals: list[tuple[float, float]]) -> int:
    """The most intervals that were open at one moment."""
    events = sorted([(s, 1) for s, _ in intervals] + [(e, -1) for _, e in intervals])
    most = cur = 0
    for _, d in events:
        cur += d
        most = max(most, cur)
    return most


def publish(figures: dict[str, Any]) -> None:
    line = json.dumps(figures, sort_keys=True)
    print(f"\nLOAD {line}")
    report = os.environ.get("PATHAPI_LOAD_REPORT")
    if report:
        with open(report, "a") as f:
            f.write(line + "\n")


# -- flows ----------------------------------------------------------------------------------
class SameFile(Flow):
    """``consumers`` works fetch the origin's ``size``-byte file at the same moment."""

    def __init__(self, consumers: int, size: int, barrier: str) -> None:
        super().__init__()
        self.origin = Origin()
        self.consumers = [Consumer() for _ in range(consumers)]
        self.size = size
        self.barrier = barrier
        self.log: dict[str, Any] = {}

    def run(self) -> None:
        self.origin.run("file", size=self.size, seed=7)
        pid = self.origin.pid
        for c in self.consumers:
            c.target = self.origin.shared
        self.log["origin_peak_reset"] = reset_peak(pid)
        self.log["origin_rss_kib"] = proc_kib("VmRSS", pid)
        for c in self.consumers:
            c.run(barrier=self.barrier)
        release(self.barrier, len(self.consumers))
        for c in self.consumers:
            c.wait()
        self.log["origin_peak_kib"] = proc_kib("VmHWM", pid)
        with ThreadPoolExecutor(16) as pool:  # stopping 100 processes one by one takes a while
            list(pool.map(lambda c: c.stop(), self.consumers))


class ManyFiles(Flow):
    """One consumer gets a Path of ``files`` small files, then again after 1 % changed, then
    again unchanged, then ``versions`` more times after 1 % of it was rewritten (each a new
    version the origin serves); the trees are compared after each get."""

    def __init__(self, files: int, app_root: str, versions: int) -> None:
        super().__init__()
        self.origin = Origin()
        self.consumer = Consumer()
        self.files = files
        self.app_root = app_root
        self.versions = versions
        self.log: dict[str, Any] = {}

    def _get(self, phase: str) -> None:
        pid = self.origin.pid
        reset = reset_peak(pid)
        rss = proc_kib("VmRSS", pid)
        self.consumer.run()
        self.consumer.wait()
        works = os.path.join(self.app_root, "works")
        want = listing(os.path.join(works, ORIGIN, "shared"))
        got = listing(os.path.join(works, "root.consumer", "shared"))
        self.log[phase] = {
            "origin_rss_kib": rss, "origin_peak_kib": proc_kib("VmHWM", pid), "origin_peak_reset": reset,
            "consumer": dict(self.consumer.report), "entries": len(want), "differences": differences(want, got),
        }

    def run(self) -> None:
        self.origin.run("tree", files=self.files, seed=1)
        self.log["snapshot"] = dict(self.origin.info)
        self.consumer.target = self.origin.shared
        self._get("first")
        self.origin.run("change", files=self.files, seed=2)
        self.log["change"] = dict(self.origin.info)
        self._get("changed")
        self._get("unchanged")
        for v in range(self.versions):
            self.origin.run("rewrite", seed=100 + v)
            self.log[f"rewrite{v}"] = dict(self.origin.info)
            self._get(f"version{v}")


# -- fixtures -------------------------------------------------------------------------------
@pytest.fixture
def app_root(tmp_path: FsPath, request: pytest.FixtureRequest) -> Iterator[FsPath]:
    """The app's folder. Removed afterwards at full size (gigabytes); at CI size left to
    pytest's own clean-up like every test's, as removing 60,000 files costs more than a test."""
    root = tmp_path / "app"
    yield root
    if request.node.get_closest_marker("slow"):
        shutil.rmtree(root, ignore_errors=True)


def run_same_file(app_root: FsPath, consumers: int, size: int) -> tuple[SameFile, str]:
    barrier = app_root.parent / "barrier"
    barrier.mkdir()
    flow = SameFile(consumers, size, str(barrier))
    App(flow, root=app_root, start_timeout=600).run()
    return flow, sha(app_root / "works" / ORIGIN / "shared")


def check_same_file(flow: SameFile, app_root: FsPath, want: str, size: int, what: str, origin_budget: int) -> None:
    """Every consumer holds the origin's file exactly; the gets overlapped; memory stayed in
    its budgets. Publishes the figures."""
    reports = [c.report for c in flow.consumers]
    assert all(reports), "a consumer did not report"
    for c in flow.consumers:
        got = app_root / "works" / str(c.name) / "shared"
        assert sha(got) == want, f"{c.name} holds other bytes than the origin"
        assert not os.stat(got).st_mode & stat.S_IXUSR
        r = c.report["record"]
        assert r["source"] == "origin" and r["files"] == 1 and r["bytes_total"] == size, r
        assert r["chunks_transferred"] > 0 and r["chunks_reused"] == 0, r
    overlap = max_overlap([(r["start"], r["end"]) for r in reports])
    assert overlap >= 2, "no two gets ran at the same time: nothing concurrent was tested"
    log = flow.log
    origin_growth = (log["origin_peak_kib"] - log["origin_rss_kib"]) * KiB
    consumer_growth = max((r["peak_kib"] - r["rss_kib"]) * KiB for r in reports)
    publish({
        "load": what, "consumers": len(reports), "bytes": size, "max_gets_at_once": overlap,
        "origin_rss_mib": log["origin_rss_kib"] // KiB, "origin_peak_mib": log["origin_peak_kib"] // KiB,
        "origin_peak_reset": log["origin_peak_reset"],
        "consumer_peak_mib_max": max(r["peak_kib"] for r in reports) // KiB,
        "consumer_growth_mib_max": consumer_growth // MiB,
        "get_seconds_max": max(r["end"] - r["start"] for r in reports),
        "wall_seconds": max(r["end"] for r in reports) - min(r["start"] for r in reports),
    })
    assert origin_growth <= origin_budget, f"serving grew the origin by {origin_growth // MiB} MiB"
    assert consumer_growth <= GET_BUDGET, f"a get grew its consumer by {consumer_growth // MiB} MiB"


# -- tests ------------------------------------------------------------------------------------
def test_100_consumers_fetching_one_small_file_at_once_all_get_it_exactly(app_root: FsPath) -> None:
    size = 2 * MiB
    flow, want = run_same_file(app_root, 100, size)
    check_same_file(flow, app_root, want, size, "100 consumers x 2 MiB", SMALL_SERVE_BUDGET)


@pytest.mark.parametrize(
    "size", [pytest.param(64 * MiB, id="64MiB"), pytest.param(1 << 30, id="1GiB", marks=soak)]
)
def test_8_consumers_fetching_one_large_file_at_once_get_it_exactly_in_bounded_memory(app_root: FsPath, size: int) -> None:
    flow, want = run_same_file(app_root, 8, size)
    check_same_file(flow, app_root, want, size, f"8 consumers x {size // MiB} MiB", SERVE_BUDGET)


@pytest.mark.parametrize(
    "files", [pytest.param(20_000, id="20k"), pytest.param(100_000, id="100k", marks=soak)]
)
def test_a_path_of_many_small_files_is_got_and_got_again_exactly_in_bounded_memory(app_root: FsPath, files: int) -> None:
    flow = ManyFiles(files, str(app_root), versions=VERSIONS)
    App(flow, root=app_root, start_timeout=600).run()
    log = flow.log
    phases = ["first", "changed", "unchanged", *(f"version{v}" for v in range(VERSIONS))]
    snap = log["snapshot"]
    figures: dict[str, Any] = {
        "load": f"{files} small files", "files": files, "snapshot_s": snap["snapshot_s"],
        "resnapshot_s": snap["resnapshot_s"],
        "snapshot_growth_mib": (snap["snapshot_peak_kib"] - snap["snapshot_rss_kib"]) // KiB,
    }
    for phase in phases:
        p = log[phase]
        c = p["consumer"]
        figures[phase] = {
            "get_s": round(c["end"] - c["start"], 2), "chunks": c["record"]["chunks_transferred"],
            "origin_rss_mib": p["origin_rss_kib"] // KiB, "origin_peak_mib": p["origin_peak_kib"] // KiB,
            "consumer_rss_mib": c["rss_kib"] // KiB, "consumer_peak_mib": c["peak_kib"] // KiB,
        }
    publish(figures)

    change = log["change"]
    now = files - change["removed"] + change["added"]
    for phase in phases:
        p = log[phase]
        assert p["differences"] == [], f"after the {phase} get the consumer's tree differs: {p['differences']}"
        record = p["consumer"]["record"]
        assert record["source"] == "origin"
        assert record["files"] == (files if phase == "first" else now)
        assert p["entries"] > record["files"]  # folders, the link and the empty folder came too
    for who, (fixed, per_file), peak, before in (
        ("origin", TREE_ORIGIN_BUDGET, max(log[p]["origin_peak_kib"] for p in phases), log["first"]["origin_rss_kib"]),
        ("consumer", TREE_CONSUMER_BUDGET, max(log[p]["consumer"]["peak_kib"] for p in phases),
         log["first"]["consumer"]["rss_kib"]),
    ):
        grew, budget = (peak - before) * KiB, fixed + files * per_file
        assert grew <= budget, f"the gets grew the {who} by {grew // MiB} MiB (budget {budget // MiB} MiB)"
    chunks = {phase: log[phase]["consumer"]["record"]["chunks_transferred"] for phase in phases}
    assert chunks["first"] == files - len(range(0, files, 1009)), "one chunk per non-empty file"
    assert chunks["changed"] == change["new_chunks"], "only the new files' chunks travel"
    assert chunks["unchanged"] == 0 and log["unchanged"]["consumer"]["record"]["bytes_transferred"] == 0
    for v in range(VERSIONS):
        assert chunks[f"version{v}"] == log[f"rewrite{v}"]["new_chunks"] > 0
    # Serving more versions of the tree does not make the origin hold more: what it keeps per
    # version it served (to answer consumers still fetching one) is bounded. (From the second
    # new version on: the origin keeps the last few versions, up to a bound.)
    rss = [log[f"version{v}"]["origin_rss_kib"] * KiB for v in range(1, VERSIONS)]
    assert rss[-1] - rss[0] <= files * VERSIONS_PER_FILE, (
        f"the origin grew by {(rss[-1] - rss[0]) // MiB} MiB over {VERSIONS - 2} more versions served: {rss}"
    )
