"""Snapshot pipeline against its physical limit, in one run (ratios, not absolute seconds).

    python -m bench --scenarios snapshot [--size 1G]      (part of the suite)
    python -m bench.snapshot [--size-gib 1] [--rss-gib 4] [--dir DIR]   (alone, prints JSON)

Reports: read+chunk+hash throughput of a file in page cache vs FastCDC alone and BLAKE3 alone
on the same in-memory buffer, and vs FastCDC and BLAKE3 running *at the same time on two
threads* over that buffer: the pipeline must do both to every byte, so that is this machine's
real ceiling (its two vCPUs do not give two cores' worth of work: ~1.5 here). Also the
re-snapshot time of the unchanged tree (stat cache) and the peak RSS of a child process
snapshotting a larger file.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import shutil
import tempfile
import threading
import time
from pathlib import Path

import blake3
from pyfastcdc import FastCDC

from cas.chunking import DEFAULT_PARAMS
from cas.workspace import Workspace

GiB = 1 << 30


def _make_file(path: Path, size: int) -> None:
    with open(path, "wb") as f:  # random bytes throughout: no chunk repeats
        for i in range(0, size, 64 << 20):
            f.write(os.urandom(min(64 << 20, size - i)))
    old = time.time() - 3600
    os.utime(path, (old, old))  # not "racy": the stat cache may remember it


def _best(fn, repeat: int = 3) -> float:
    best = float("inf")
    for _ in range(repeat):
        t = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t)
    return best


def _both(cdc: FastCDC, mv: memoryview) -> None:
    """FastCDC over the buffer on this thread while BLAKE3 hashes it on another (both
    release the GIL): the work a two-stage pipeline does, with nothing but the CPUs in the way."""
    t = threading.Thread(target=lambda: blake3.blake3(mv).digest())
    t.start()
    sum(1 for _ in cdc.cut_buf(mv))
    t.join()


def _stage_times(path: Path) -> tuple[float, float, float, float]:
    """FastCDC alone, BLAKE3 alone (1 and 2 threads), and FastCDC + BLAKE3 concurrently on
    two threads, on the file's bytes in memory."""
    buf = bytearray(path.stat().st_size)
    with open(path, "rb", buffering=0) as f:
        f.readinto(buf)
    mv = memoryview(buf)
    p = DEFAULT_PARAMS
    cdc = FastCDC(p.avg_size, min_size=p.min_size, max_size=p.max_size, normalized_chunking=1)
    return (
        _best(lambda: sum(1 for _ in cdc.cut_buf(mv))),
        _best(lambda: blake3.blake3(mv).digest()),
        _best(lambda: blake3.blake3(mv, max_threads=2).digest()),
        _best(lambda: _both(cdc, mv)),
    )


def bench_throughput(path: Path) -> dict[str, float]:
    size = path.stat().st_size
    t_cdc, t_b3, t_b3_2, t_both = _stage_times(path)
    state = Path(tempfile.mkdtemp(prefix="bench-snap-", dir=path.parent))

    def snap() -> None:
        with Workspace(state / str(time.perf_counter_ns())) as ws:  # fresh stat cache: full read+chunk+hash
            ws.snapshot(path)

    t_snap = _best(snap)
    shutil.rmtree(state, ignore_errors=True)
    gb = size / 1e9
    return {
        "size_bytes": size,
        "fastcdc_GBps": gb / t_cdc,
        "blake3_1t_GBps": gb / t_b3,
        "blake3_2t_GBps": gb / t_b3_2,
        "fastcdc_and_blake3_concurrently_GBps": gb / t_both,
        "snapshot_GBps": gb / t_snap,
        # A two-stage pipeline (cut on one core, hash on the other) is bounded by its slower
        # stage on two real cores; on this VM, by both stages sharing ~1.5 cores' worth.
        "snapshot_vs_slower_stage": (gb / t_snap) / min(gb / t_cdc, gb / t_b3),
        "snapshot_vs_concurrent_ceiling": (gb / t_snap) / (gb / t_both),
    }


def bench_resnapshot(root: Path) -> dict[str, float]:
    state = Path(tempfile.mkdtemp(prefix="bench-resnap-", dir=root.parent))
    with Workspace(state) as ws:
        m1 = ws.snapshot(root)
        t = _best(lambda: ws.snapshot(root), repeat=5)
        assert ws.snapshot(root) == m1
    return {"resnapshot_ms": t * 1000, "tree_bytes": m1.total_size, "files": sum(1 for _ in m1.files())}


# VmHWM, not ru_maxrss: Linux carries ru_maxrss over fork and exec, so a child of a process
# that once held a 1 GiB buffer would report 1 GiB.
_CHILD = """
import re, sys, time
from cas.workspace import Workspace
with Workspace(sys.argv[2]) as ws:
    t = time.perf_counter(); m = ws.snapshot(sys.argv[1]); dt = time.perf_counter() - t
hwm = int(re.search(r"VmHWM:\\s+(\\d+) kB", open("/proc/self/status").read()).group(1)) * 1024
print(hwm, dt, m.total_size)
"""


def bench_rss(path: Path) -> dict[str, float]:
    state = tempfile.mkdtemp(prefix="bench-rss-")
    out = subprocess.run([sys.executable, "-c", _CHILD, str(path), state], check=True, capture_output=True, text=True)
    rss, dt, size = out.stdout.split()
    return {"rss_file_bytes": int(size), "peak_rss_MiB": int(rss) / (1 << 20), "seconds": float(dt)}


def run(base: Path, size: int) -> dict[str, object]:
    """The suite's ``snapshot`` scenario: throughput and re-snapshot of a ``size`` file of
    random bytes (in page cache: the pipeline, not the disk, is measured)."""
    tree = base / "tree"
    tree.mkdir(parents=True)
    one = tree / "weights.bin"
    _make_file(one, size)
    try:
        out = {"throughput": bench_throughput(one), "resnapshot": bench_resnapshot(tree)}
    finally:
        shutil.rmtree(base, ignore_errors=True)
    t = out["throughput"]
    print(f"  snapshot: pipeline {t['snapshot_GBps']:.2f} GB/s; FastCDC {t['fastcdc_GBps']:.2f}, BLAKE3 "
          f"{t['blake3_1t_GBps']:.2f}, both at once {t['fastcdc_and_blake3_concurrently_GBps']:.2f} GB/s", file=sys.stderr)
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--size-gib", type=float, default=1.0)
    ap.add_argument("--rss-gib", type=float, default=4.0)
    ap.add_argument("--dir", default=None, help="where to write the test files (default: a temp dir)")
    args = ap.parse_args()
    base = Path(tempfile.mkdtemp(prefix="bench-", dir=args.dir))
    tree = base / "tree"
    tree.mkdir()
    one = tree / "weights.bin"
    _make_file(one, int(args.size_gib * GiB))
    results: dict[str, object] = {"throughput": bench_throughput(one), "resnapshot": bench_resnapshot(tree)}
    if args.rss_gib:
        big = base / "big.bin"
        _make_file(big, int(args.rss_gib * GiB))
        results["rss"] = bench_rss(big)
        big.unlink()
    one.unlink()
    print(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
