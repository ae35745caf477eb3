"""Shared and exclusive leases kept in a ref store: how garbage collection and writers agree.

A persist checks which chunks the store already holds and uploads only the others; a GC that
deleted one of those "already held" chunks between the check and the manifest's ref would
leave a ref pointing at a missing chunk. Deletion cannot be undone, so the two must not
overlap. Stores have no locks (an S3 bucket has none), so this is a lease protocol over any
:class:`~cas.store.refs.RefStore`, whose puts are atomic and whose listings see completed
puts (true of a local folder and of S3 since 2020):

- a writer puts ``shared/<token>``, *then* lists ``exclusive/``; while a live exclusive lease
  is listed it waits (keeping its own lease) and raises :class:`StoreBusyError` after ``wait``;
- a collector puts ``exclusive/<token>``, *then* lists ``shared/`` and ``exclusive/``; if
  any other live lease is listed it removes its own and raises :class:`StoreBusyError`.

Each side writes before it reads, so of two that overlap at least one sees the other (the
collector backs off, or the writer waits): a GC never deletes while a persist is between its
membership check and its ref. A collector never waits while holding its lease, so the two
cannot deadlock.

A lease is live while its holder renews it: a holder rewrites it every ``ttl / 4`` seconds
from a thread, and others treat it as expired ``ttl`` seconds after its last renewal (by the
holder's clock: clocks of hosts sharing a store must agree to within ``3 * ttl / 4``). On the
holder's own host a lease whose process is gone is dead at once, so a killed persist blocks
GC only from other hosts, and only for ``ttl``. The record format is in docs/format.md.

A third kind, the *mutex* (:meth:`Leases.mutex`), serializes read-modify-writes of one ref
(a Drive's index: two works putting at once must not lose each other's entries), with the
same write-then-read rule among the takers of one key.
"""

from __future__ import annotations

import json
import os
import random
import secrets
import socket
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

from .errors import CasError, StoreBusyError
from .store.refs import RefStore

LEASE_VERSION = 1
#: Seconds after its last renewal that a lease of another host counts as abandoned.
DEFAULT_TTL = 600.0
#: The same for a mutex (:meth:`Leases.mutex`): held for one read-modify-write of a ref, so a
#: holder that died on another host blocks the others for at most this long.
MUTEX_TTL = 60.0


def _boot_id() -> str:
    try:
        with open("/proc/sys/kernel/random/boot_id") as f:
            return f.read().strip()
    except OSError:
        return ""


def _start_time(pid: int) -> str:
    """The process's start time in clock ticks since boot (field 22 of /proc/<pid>/stat), or ""."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            raw = f.read()
    except OSError:
        return ""
    return raw[raw.rfind(b")") + 2 :].split()[19].decode()


#: Identifies this machine since its last boot: a pid is only meaningful within one boot.
HOST = f"{socket.gethostname()}/{_boot_id()}"


@dataclass(frozen=True)
class Lease:
    """One lease record as read back from the store."""

    name: str
    kind: str
    what: str
    host: str
    pid: int
    start: str
    renewed: float
    ttl: float

    def live(self, now: float) -> bool:
        if now >= self.renewed + self.ttl:
            return False  # not renewed in time: its holder is gone or cannot reach the store
        if self.host == HOST:
            # Same machine, same boot: a holder whose process is gone is gone now (the
            # start time tells a recycled pid apart).
            return _start_time(self.pid) == self.start and self.start != ""
        return True

    def describe(self) -> str:
        age = time.time() - self.renewed
        return f"{self.what!r} (pid {self.pid} on {self.host.split('/')[0]}, renewed {age:.0f} s ago)"


def _decode(name: str, raw: bytes) -> Lease | None:
    """The lease in ``raw``; None if unreadable (a lease this version cannot read is ignored)."""
    try:
        d = json.loads(raw)
        if d.get("v") != LEASE_VERSION:
            return None
        return Lease(name, str(d["kind"]), str(d["what"]), str(d["host"]), int(d["pid"]), str(d["start"]),
                     float(d["renewed"]), float(d["ttl"]))
    except (ValueError, KeyError, TypeError):
        return None


class Leases:
    """Lease protocol over ``refs`` (a ref store used for nothing else)."""

    def __init__(self, refs: RefStore, *, ttl: float = DEFAULT_TTL, poll: float = 0.2) -> None:
        self.refs = refs
        self.ttl = ttl
        self.poll = poll

    # -- reading ---------------------------------------------------------------------
    def all(self, kind: str | None = None) -> list[Lease]:
        """Every lease record present (live or not) of ``kind`` (``shared``/``exclusive``/``mutex``)."""
        return self.all_under(f"{kind}/" if kind else "")

    def all_under(self, prefix: str) -> list[Lease]:
        """Every lease record whose name starts with ``prefix`` (live or not)."""
        out = []
        for name in self.refs.names(prefix):
            raw = self.refs.get(name)
            if raw is not None and (lease := _decode(name, raw)) is not None:
                out.append(lease)
        return out

    def live(self, kind: str | None = None) -> list[Lease]:
        now = time.time()
        return [lease for lease in self.all(kind) if lease.live(now)]

    def break_dead(self) -> int:
        """Delete the records of leases that are no longer live; how many were deleted."""
        now = time.time()
        return sum(self.refs.delete(lease.name) for lease in self.all() if not lease.live(now))

    # -- holding ---------------------------------------------------------------------
    def _put(self, name: str, kind: str, what: str, ttl: float) -> None:
        record = {"v": LEASE_VERSION, "kind": kind, "what": what, "host": HOST, "pid": os.getpid(),
                  "start": _start_time(os.getpid()), "renewed": time.time(), "ttl": ttl}
        self.refs.put(name, json.dumps(record, sort_keys=True).encode())

    @contextmanager
    def _held(self, kind: str, what: str, *, prefix: str | None = None, ttl: float | None = None) -> Iterator[str]:
        name = f"{prefix if prefix is not None else kind + '/'}{secrets.token_hex(8)}"
        life = self.ttl if ttl is None else ttl
        self._put(name, kind, what, life)
        stop = threading.Event()

        def renew() -> None:
            while not stop.wait(life / 4):
                try:
                    self._put(name, kind, what, life)
                except CasError:
                    pass  # a store briefly unreachable: the next renewal tries again

        thread = threading.Thread(target=renew, name=f"cas-lease-{kind}", daemon=True)
        thread.start()
        try:
            yield name
        finally:
            stop.set()
            thread.join()
            try:
                self.refs.delete(name)
            except CasError:
                pass  # the store is unreachable: unrenewed, the lease expires after its ttl

    @contextmanager
    def shared(self, what: str, *, wait: float = 600.0) -> Iterator[None]:
        """Hold a shared lease: any number at once, none while an exclusive one is live.

        Waits up to ``wait`` seconds for a live exclusive lease (a GC) to go away.
        """
        with self._held("shared", what) as mine:
            deadline = time.monotonic() + wait
            while blocking := [lease for lease in self.live("exclusive") if lease.name != mine]:
                if time.monotonic() >= deadline:
                    raise StoreBusyError(
                        f"{self.refs.location}: {what} waited {wait:.0f} s for {blocking[0].describe()} to finish",
                        self.refs.location,
                    )
                time.sleep(self.poll)
            yield

    @contextmanager
    def exclusive(self, what: str) -> Iterator[None]:
        """Hold the exclusive lease, or raise StoreBusyError at once if anyone holds a lease."""
        with self._held("exclusive", what) as mine:
            others = [lease for lease in self.live() if lease.name != mine]
            if others:
                raise StoreBusyError(
                    f"{self.refs.location}: cannot start {what}: {len(others)} lease(s) held, "
                    f"e.g. {others[0].describe()}; try again when it is done",
                    self.refs.location,
                )
            yield

    @contextmanager
    def mutex(self, key: str, what: str, *, wait: float = 60.0, ttl: float = MUTEX_TTL) -> Iterator[None]:
        """Hold the mutex ``key``: while the block runs, no other process sharing the store
        holds the same one (the rule that makes a read-modify-write of a ref lose nothing).

        The record is ``mutex/<key>/<token>``. A taker puts its record, *then* lists the
        records of ``key``: if another live one is there it removes its own and tries again
        after a random pause (two that collide both back off; the jitter lets one through),
        and raises :class:`StoreBusyError` once ``wait`` seconds have passed. A holder killed
        on this host stops counting at once, on another host ``ttl`` seconds after its last
        renewal (so a holder stalled longer than ``ttl`` could overlap the next one: keep the
        block short). A garbage collection backs off while a mutex is held.
        """
        prefix = f"mutex/{key}/"
        deadline = time.monotonic() + wait
        pause = self.poll / 4
        while True:
            with self._held("mutex", what, prefix=prefix, ttl=ttl) as mine:
                now = time.time()
                others = [lease for lease in self.all_under(prefix) if lease.name != mine and lease.live(now)]
                if not others:
                    yield
                    return
            if time.monotonic() >= deadline:
                raise StoreBusyError(
                    f"{self.refs.location}: {what} waited {wait:.0f} s for {others[0].describe()} to finish",
                    self.refs.location,
                )
            time.sleep(random.uniform(0, pause))
            pause = min(pause * 2, 1.0)
