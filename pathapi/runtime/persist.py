"""Persisting a work's Paths, in the work's process: in the background between runs.

Guarantee: what is persisted is a state at the end of a run. The work-side loop schedules
the persist of a run's end state and waits for it (:meth:`Persister.wait`) before it lets
the next run change the files.
"""

from __future__ import annotations

import os
import queue
import threading

from ..version import Version
from .context import WorkContext


class Persister:
    """Persists a work's Paths in the background, one job at a time, in order."""

    def __init__(self, ctx: WorkContext) -> None:
        self.ctx = ctx
        self.errors: list[str] = []
        self._q: queue.Queue[tuple[list[str], Version] | None] = queue.Queue()
        self._thread = threading.Thread(target=self._loop, name="pathapi-persist", daemon=True)
        self._thread.start()

    def schedule(self, rels: list[str], version: Version) -> None:
        """Persist ``rels`` as they are now, stamped ``version``; the caller must not change
        them until :meth:`wait` returns."""
        if rels:
            self._q.put((rels, version))

    def _loop(self) -> None:
        # Persisting is background work: on a shared machine it yields the CPU to the work's
        # run and to transfers (Linux applies a thread id's niceness to that thread alone;
        # I/O schedulers that honour priorities derive the I/O class from it).
        try:
            os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), 10)
        except (AttributeError, OSError):
            pass
        while True:
            job = self._q.get()
            try:
                if job is None:
                    return
                self.errors.extend(persist_all(self.ctx, *job))
            finally:
                self._q.task_done()

    def wait(self) -> None:
        self._q.join()

    def close(self) -> None:
        self._q.put(None)
        self._thread.join()


def persist_all(ctx: WorkContext, rels: list[str], version: Version) -> list[str]:
    """Persist each of ``rels`` (relative to the work's root) stamped ``version``; the errors,
    one line each (a failed persist does not fail the run that produced the files)."""
    errors = []
    for rel in rels:
        try:
            ctx.artifacts.persist_in_root(ctx.name, rel, ctx.root, ctx.workspace, version=version)
        except Exception as e:
            errors.append(f"{rel}: {type(e).__name__}: {e}")
    return errors
