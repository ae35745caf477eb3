"""How the suite measures: wall time, peak RSS of every process involved, a settled disk.

Peak RSS is ``VmHWM`` (the kernel's high-water mark of a process's resident set):

- processes that live through a measurement (the works of an App) have it reset at the start
  by writing ``5`` to ``/proc/PID/clear_refs``, so a work that moved a big file in an earlier
  scenario does not carry that peak into this one, and it is read at the end;
- commands the suite starts (``cp``, ``rsync`` and its two children, the Lightning model) are
  polled every ``interval`` s with their descendants (found through
  ``/proc/PID/task/*/children``, not a scan of every process), keeping the last VmHWM seen.

Not ``ru_maxrss``/``wait4``: Linux carries it over fork and exec, so a command started by this
(100 MiB) process would report at least 100 MiB. Not psutil's process-tree walk either: it
reads every process on the machine per sample, and on two shared cores that cost showed up
as a third of a core in the profiles of the first version of this file.
"""

from __future__ import annotations

import glob
import os
import re
import subprocess
import threading
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

MiB = 1 << 20


def cpu_seconds(pid: int) -> float:
    """CPU time (user + system, all threads) process ``pid`` has used so far: what a
    measurement costs in CPU, which a loaded machine changes far less than wall time."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def settle(pause: float = 1.0) -> None:
    """Flush dirty pages and let the disk go quiet, so one measurement does not pay for the
    writeback of the one before it (this VM's disk swings by 3x with its recent history)."""
    os.sync()
    time.sleep(pause)


def _vmhwm(pid: int) -> int | None:
    try:
        with open(f"/proc/{pid}/status") as f:
            m = re.search(r"VmHWM:\s+(\d+) kB", f.read())
    except OSError:
        return None
    return int(m.group(1)) * 1024 if m else None


def _reset_hwm(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


@dataclass
class RssReport:
    """Peak resident bytes per process seen during one measurement."""

    peaks: dict[int, tuple[str, int]] = field(default_factory=dict)  # pid -> (name, bytes)

    def add(self, pid: int, name: str, rss: int) -> None:
        old = self.peaks.get(pid)
        if old is None or rss > old[1]:
            self.peaks[pid] = (name if old is None else old[0], rss)

    @property
    def max_process(self) -> int:
        return max((v for _, v in self.peaks.values()), default=0)

    @property
    def total(self) -> int:
        """Sum of the per-process peaks: an upper bound of the peak of the sum."""
        return sum(v for _, v in self.peaks.values())

    def as_dict(self) -> dict[str, object]:
        return {
            "peak_rss_max_process_MiB": round(self.max_process / MiB, 1),
            "peak_rss_total_MiB": round(self.total / MiB, 1),
            "processes": {f"{n}[{pid}]": round(v / MiB, 1) for pid, (n, v) in sorted(self.peaks.items())},
        }


def _children(pid: int) -> list[int]:
    out: list[int] = []
    for f in glob.glob(f"/proc/{pid}/task/*/children"):
        try:
            with open(f) as fh:
                out.extend(int(x) for x in fh.read().split())
        except OSError:
            continue
    return out


def _name(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/comm") as f:
            return f.read().strip()
    except OSError:
        return "?"


class PeakRss:
    """Context manager: the peak RSS of ``pids`` (reset at entry, read at exit) and of the
    commands registered with :meth:`watch` and their descendants (polled)."""

    def __init__(self, pids: Iterable[int] = (), interval: float = 0.05, names: dict[int, str] | None = None) -> None:
        self.fixed = list(pids)
        self.interval = interval
        self.names = dict(names or {})
        self.report = RssReport()
        self._watched: list[int] = []
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()

    def watch(self, pid: int, name: str | None = None) -> None:
        with self._lock:
            self._watched.append(pid)
            if name:
                self.names[pid] = name
        # No poll right away: between fork and exec the child still shows this process's memory.

    def _record(self, pid: int) -> None:
        hwm = _vmhwm(pid)
        if hwm is not None:
            self.report.add(pid, self.names.get(pid) or _name(pid), hwm)

    def _poll(self) -> None:
        with self._lock:
            todo = list(self._watched)
        seen: set[int] = set()
        while todo:
            pid = todo.pop()
            if pid in seen:
                continue
            seen.add(pid)
            self._record(pid)
            todo.extend(_children(pid))

    def _loop(self) -> None:
        while not self._stop.wait(self.interval):
            self._poll()

    def __enter__(self) -> PeakRss:
        for pid in self.fixed:
            _reset_hwm(pid)
        self._thread = threading.Thread(target=self._loop, name="bench-rss", daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        assert self._thread is not None
        self._thread.join()
        self._poll()
        for pid in self.fixed:
            self._record(pid)


def run_command(argv: Sequence[str], rss: PeakRss | None = None, name: str | None = None,
                capture: bool = False) -> tuple[float, str]:
    """Run ``argv`` to completion; (wall seconds, stdout if captured). Its peak RSS (and its
    descendants') goes into ``rss``. Raises CalledProcessError on failure."""
    t = time.perf_counter()
    p = subprocess.Popen(argv, stdout=subprocess.PIPE if capture else subprocess.DEVNULL)
    if rss is not None:
        rss.watch(p.pid, name or os.path.basename(argv[0]))
    out = p.stdout.read().decode(errors="replace") if capture and p.stdout is not None else ""
    p.wait()  # VmHWM only grows: the last poll before the exit holds the peak up to then
    dt = time.perf_counter() - t
    if p.returncode != 0:
        raise subprocess.CalledProcessError(p.returncode, list(argv), out)
    return dt, out


def median(xs: Sequence[float]) -> float:
    s = sorted(xs)
    n = len(s)
    if not n:
        return float("nan")
    return s[n // 2] if n % 2 else (s[n // 2 - 1] + s[n // 2]) / 2
