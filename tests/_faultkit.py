"""Shared machinery of the fault-injection tests (test_kill_consumer, test_kill_origin,
test_origin_files, test_torn): real origin processes, real consumer processes, trees.

- :class:`OriginProc` runs ``_origin_child.py`` (a real OriginService) and reads its log of
  what it served;
- :class:`GetChild` runs ``_get_child.py`` (a consumer work's ``Path.get``), started ahead of
  time so that a test's clock starts when the job is sent, not when Python starts;
- :class:`Tally` counts cases per fault class and prints a summary at the end of a module
  (visible with ``pytest -s``; also appended as JSON lines to ``$PATHAPI_FAULT_REPORT``).
"""

from __future__ import annotations

import json
import os
import queue
import random
import secrets
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from trees import Dir, File, Link, Model

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
ORIGIN_CHILD = HERE / "_origin_child.py"
GET_CHILD = HERE / "_get_child.py"
SOURCE = "root.source"
CONSUMER = "root.consumer"
KiB = 1024
MiB = 1024 * KiB
SOAK = os.environ.get("PATHAPI_SOAK", "") not in ("", "0")


def _env() -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))}


# -- trees ------------------------------------------------------------------------------
def state_leftovers(state: str | os.PathLike[str]) -> list[str]:
    """What a consumer's state folder holds besides its lock and stat cache: after a get that
    succeeded, nothing (no transaction, no staging, no resume folder)."""
    state = os.fspath(state)
    if not os.path.isdir(state):
        return []
    return sorted(n for n in os.listdir(state) if n not in ("lock", "statcache"))


def randbytes(rng: random.Random, n: int) -> bytes:
    """``n`` random bytes (in pieces: ``Random.randbytes`` refuses 1 GiB at once)."""
    return b"".join(rng.randbytes(min(64 * MiB, n - off)) for off in range(0, n, 64 * MiB))


def checkpoint_versions(rng: random.Random, big: int) -> tuple[Model, Model]:
    """Two versions of a checkpoint folder, as models for :func:`trees.write_tree`: from the
    first to the second, ``big.bin`` (``big`` bytes) is replaced whole, ``model.bin`` (6 MiB) has three
    edited regions (a sync patches it in place), small files change, appear and disappear,
    a link moves, an exec bit is dropped, a folder goes and an empty one comes."""
    model = bytearray(rng.randbytes(6 * MiB))
    old: Model = {
        "big.bin": File(randbytes(rng, big)),
        "model.bin": File(bytes(model)),
        "run.sh": File(b"#!/bin/sh\necho v1\n", executable=True),
        "latest": Link("model.bin"),
        "olddir/x.txt": File(b"only in v1"),
    }
    for i in range(16):
        old[f"small/f{i:02d}"] = File(rng.randbytes(rng.randrange(1, 60 * KiB)))
    for i in range(3):
        old[f"small/gone{i}"] = File(rng.randbytes(2000))
    new = {k: v for k, v in old.items() if not k.startswith(("olddir", "small/gone"))}
    new["big.bin"] = File(randbytes(rng, big))
    for off in (1 * MiB, 3 * MiB, 5 * MiB):  # three edited regions: patched in place
        model[off : off + 200 * KiB] = rng.randbytes(200 * KiB)
    new["model.bin"] = File(bytes(model))
    new["run.sh"] = File(b"#!/bin/sh\necho v1\n")  # exec bit dropped
    new["latest"] = Link("big.bin")
    new["newdir"] = Dir()
    for i in range(0, 16, 2):
        new[f"small/f{i:02d}"] = File(rng.randbytes(rng.randrange(1, 60 * KiB)))
    for i in range(5):
        new[f"small/sub/new{i}"] = File(rng.randbytes(rng.randrange(1, 90 * KiB)))
    return old, new



# -- processes ----------------------------------------------------------------------------
class OriginProc:
    """A real origin service in its own process (``_origin_child.py``)."""

    def __init__(self, base: Path, root: Path, *, state: Path | None = None, secret: str | None = None,
                 log: bool = True, **options: Any) -> None:
        base.mkdir(parents=True, exist_ok=True)
        self.secret = secret or secrets.token_urlsafe(24)
        self.log = base / "served.jsonl" if log else None
        if self.log is not None:
            self.log.touch()
        job = {"name": SOURCE, "root": str(root), "state": str(state or base / "state"), "secret": self.secret,
               "log": str(self.log) if self.log else None, **options}
        (base / "origin.json").write_text(json.dumps(job))
        self.stderr = open(base / "origin.stderr", "w")  # noqa: SIM115
        self.proc = subprocess.Popen(
            [sys.executable, str(ORIGIN_CHILD), str(base / "origin.json")],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self.stderr, text=True, env=_env(),
        )
        self._base = base
        self._url: str | None = None
        self.dac_dropped = False
        self._seen = 0

    @property
    def url(self) -> str:
        if self._url is None:
            assert self.proc.stdout is not None
            line = self.proc.stdout.readline()
            if not line.startswith("url "):
                self.kill()
                raise AssertionError(f"origin did not start: {line!r} {(self._base / 'origin.stderr').read_text()}")
            self._url = line.split()[1]
            self.dac_dropped = self.proc.stdout.readline().split() == ["dac_dropped", "1"]
        return self._url

    @property
    def pid(self) -> int:
        return self.proc.pid

    def served(self) -> list[dict[str, Any]]:
        """Batches served since the last call (each: hex ids sent, payload bytes)."""
        assert self.log is not None
        with open(self.log) as f:
            lines = f.read().splitlines()
        new, self._seen = lines[self._seen :], len(lines)
        return [json.loads(line) for line in new]

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(30)
        self.stderr.close()

    def signal(self, sig: int) -> None:
        os.kill(self.proc.pid, sig)

    def close(self) -> None:
        if self.proc.poll() is None:
            try:
                assert self.proc.stdin is not None
                self.proc.stdin.close()
                self.proc.wait(15)
            except (OSError, subprocess.TimeoutExpired):
                pass
        self.kill()


@dataclass
class GetResult:
    code: int  # the child's exit code (-9: killed)
    records: list[dict[str, Any]] = field(default_factory=list)  # one per get that succeeded
    errors: list[dict[str, Any]] = field(default_factory=list)  # one per get that raised
    chunks: list[tuple[int, int, str]] = field(default_factory=list)  # (n, bytes so far, id) written
    phases: list[str] = field(default_factory=list)
    phase_times: dict[str, float] = field(default_factory=dict)  # phase -> seconds after the job was sent
    apply_events: int | None = None
    stderr: str = ""
    elapsed: float = 0.0  # seconds from the job being sent to its end (or the process's)
    last_chunk_at: float = 0.0  # seconds from the job being sent to the last chunk written

    @property
    def killed(self) -> bool:
        return self.code == -signal.SIGKILL

    @property
    def written(self) -> set[str]:
        """Hex ids of the chunks materialize had written when the process ended."""
        return {cid for _, _, cid in self.chunks}


class GetChild:
    """A consumer process (``_get_child.py``), started ahead of time. :meth:`go` sends a job,
    :meth:`finish` collects its outcome; the process then takes the next job (a killed one
    takes none)."""

    def __init__(self, base: Path) -> None:
        base.mkdir(parents=True, exist_ok=True)
        self._stderr_path = base / f"get-{time.monotonic_ns()}.stderr"
        self._stderr = open(self._stderr_path, "w")  # noqa: SIM115
        self.proc = subprocess.Popen(
            [sys.executable, str(GET_CHILD)], stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self._stderr,
            text=True, env=_env(),
        )
        self.lines: queue.Queue[str | None] = queue.Queue()
        self.result = GetResult(code=0)
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()
        self.t_go = 0.0
        self._eof = False
        self._job_over = False

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self.lines.put(line.rstrip("\n"))
        self.lines.put(None)

    def _next(self, t_end: float) -> str | None:
        """The next output line, parsed into ``result``; None at the end of the output."""
        if self._eof:
            return None
        left = t_end - time.monotonic()
        try:
            line = self.lines.get(timeout=max(left, 0.001))
        except queue.Empty:
            raise TimeoutError from None
        if line is None:
            self._eof = True
            return None
        r = self.result
        if line.startswith("chunk "):
            _, n, nbytes, cid = line.split()
            r.chunks.append((int(n), int(nbytes), cid))
            r.last_chunk_at = time.monotonic() - self.t_go
        elif line.startswith("phase "):
            parts = line.split()
            r.phases.append(parts[1])
            r.phase_times.setdefault(parts[1], time.monotonic() - self.t_go)
            if parts[1] == "cleanup" and len(parts) > 2:
                r.apply_events = int(parts[2])
        elif line.startswith("done "):
            r.records.append(json.loads(line[5:]))
        elif line.startswith("error "):
            r.errors.append(json.loads(line[6:]))
        return line

    def go(self, job: dict[str, Any]) -> None:
        try:
            first = self._next(time.monotonic() + 120)
        except TimeoutError:
            first = "(nothing within 120 s)"
        if first != "ready":
            self.proc.kill()
            raise AssertionError(f"consumer child is not ready: {first!r} {self._stderr_path.read_text()}")
        assert self.proc.stdin is not None
        self.result = GetResult(code=0)
        self._job_over = False
        self.t_go = time.monotonic()
        self.proc.stdin.write(json.dumps(job) + "\n")
        self.proc.stdin.flush()

    def wait_for(self, pred: Any, limit: float) -> str | None:
        """The first output line satisfying ``pred`` (None if the job or process ended first)."""
        t_end = time.monotonic() + limit
        while True:
            try:
                line = self._next(t_end)
            except TimeoutError:
                raise AssertionError("timed out waiting for the consumer's output") from None
            if line is None or line == "end":
                self._job_over = True
                return None
            if pred(line):
                return line

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)

    def finish(self, timeout: float = 120) -> GetResult:
        """Wait for the job's end (or the process's); the outcome of the job."""
        t_end = time.monotonic() + timeout
        try:
            while not self._job_over:
                line = self._next(t_end)
                if line is None or line == "end":
                    break
        except TimeoutError:
            self.proc.kill()
            raise AssertionError(f"the consumer did not finish within {timeout} s (it hangs)") from None
        self.result.elapsed = time.monotonic() - self.t_go
        if self._eof:
            self.proc.wait(30)
            self.result.code = self.proc.returncode
        self.result.stderr = self._stderr_path.read_text()
        return self.result

    def close(self) -> None:
        if self.proc.poll() is None and self.proc.stdin is not None:
            try:
                self.proc.stdin.close()
                self.proc.wait(15)
            except (OSError, subprocess.TimeoutExpired):
                pass
        self.kill()
        self.proc.wait(30)
        self._stderr.close()


def consumer_job(base: Path, origin_url: str, secret: str, rel: str, *, timeout: float = 30.0, **extra: Any) -> dict[str, Any]:
    """The job for a consumer work whose folders live under ``base``."""
    return {
        "name": CONSUMER, "root": str(base / "works" / CONSUMER), "state": str(base / "state" / CONSUMER),
        "artifacts": str(base / "artifacts"), "secret": secret, "timeout": timeout, "origin_name": SOURCE,
        "origin_url": origin_url, "rel": rel, **extra,
    }


class Pool:
    """Consumer children kept started ahead of time (Python and aiohttp take a while to load)."""

    def __init__(self, base: Path, size: int = 2) -> None:
        self.base = base
        self.size = size
        self._ready: list[GetChild] = []
        self._fill()

    def _fill(self) -> None:
        while len(self._ready) < self.size:
            self._ready.append(GetChild(self.base))

    def take(self) -> GetChild:
        child = self._ready.pop(0)
        self._fill()
        return child

    def close(self) -> None:
        for c in self._ready:
            c.close()
        self._ready = []


def run_get(pool: Pool, job: dict[str, Any], timeout: float = 120) -> GetResult:
    """One job on a child of ``pool``, which is then closed."""
    child = pool.take()
    try:
        child.go(job)
        return child.finish(timeout)
    finally:
        child.close()


# -- counting ---------------------------------------------------------------------------
class Tally:
    """Per fault class: cases run, cases passed, bytes lost (chunks already received that had
    to be fetched again), torn files seen. Printed at the end of the module."""

    def __init__(self, module: str) -> None:
        self.module = module
        self.rows: dict[str, dict[str, int]] = {}

    def case(self, fault: str, *, passed: bool, bytes_lost: int = 0, torn: int = 0) -> None:
        row = self.rows.setdefault(fault, {"cases": 0, "passed": 0, "bytes_lost": 0, "torn": 0})
        row["cases"] += 1
        row["passed"] += int(passed)
        row["bytes_lost"] += bytes_lost
        row["torn"] += torn

    def check(self, fault: str, check: Callable[[], object]) -> None:
        """Run ``check`` (it asserts) and count it as one case of ``fault``, passed or not."""
        try:
            check()
        except AssertionError:
            self.case(fault, passed=False)
            raise
        self.case(fault, passed=True)

    def report(self) -> None:
        if not self.rows:
            return
        width = max(len(k) for k in self.rows)
        print(f"\n[{self.module}] fault summary")
        print(f"{'fault'.ljust(width)}  cases  passed  bytes_lost  torn")
        for fault, r in self.rows.items():
            print(f"{fault.ljust(width)}  {r['cases']:5d}  {r['passed']:6d}  {r['bytes_lost']:10d}  {r['torn']:4d}")
        out = os.environ.get("PATHAPI_FAULT_REPORT")
        if out:
            with open(out, "a") as f:
                for fault, r in self.rows.items():
                    f.write(json.dumps({"module": self.module, "fault": fault, **r}) + "\n")

