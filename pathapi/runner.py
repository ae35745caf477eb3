"""Work processes: the flow-side handle and the work-side main loop.

Each work runs in a process of its own (``spawn``: nothing inherited but what is sent), with
its root folder as working directory, its origin service on a loopback port, and a persister
thread. Messages over a pipe:

    flow -> work: ("run", args, kwargs, state, registry)   ("stop",)
    work -> flow: ("ready", url)   ("done", state, result)   ("error", message, traceback)
                  ("stopped", persist_errors)
"""

from __future__ import annotations

import multiprocessing as mp
import os
import pickle
import queue
import sys
import threading
import traceback
from collections.abc import Callable, Iterator
from concurrent.futures import Future
from dataclasses import dataclass
from typing import Any

from cas.workspace import Workspace

from .aio import io_loop
from .artifacts import ArtifactStore
from .client import close_sessions
from .context import WorkContext, set_current
from .errors import WorkError
from .origin import OriginService
from .path import Path
from .transfer import get
from .work import Work, public_state

_SPAWN = mp.get_context("spawn")


@dataclass(frozen=True)
class AppConfig:
    root: str  # absolute app folder
    store: str | None
    secret: str
    timeout: float
    host: str = "127.0.0.1"

    def work_root(self, name: str) -> str:
        return os.path.join(self.root, "works", name)

    def state_dir(self, name: str) -> str:
        return os.path.join(self.root, "state", name)


def iter_paths(value: Any) -> Iterator[Path]:
    """Every Path inside ``value`` (lists, tuples, dicts and sets searched)."""
    if isinstance(value, Path):
        yield value
    elif isinstance(value, (list, tuple, set, frozenset)):
        for v in value:
            yield from iter_paths(v)
    elif isinstance(value, dict):
        for v in value.values():
            yield from iter_paths(v)


# -- flow side ------------------------------------------------------------------------
class WorkHandle:
    """The flow's end of one work process."""

    def __init__(self, work: Work, name: str, config: AppConfig, registry: Callable[[], dict[str, str | None]]) -> None:
        self.work = work
        self.name = name
        self.config = config
        self._registry = registry
        self._conn, child_conn = _SPAWN.Pipe()
        self.process = _SPAWN.Process(
            target=_child_main, args=(child_conn, work, name, config), name=f"pathapi-work:{name}"
        )
        self._child_conn = child_conn
        self._current: Future[tuple[Any, ...]] | None = None
        self._lock = threading.Lock()
        self.url: str | None = None
        self.stopped = False

    def start(self) -> None:
        self.process.start()
        self._child_conn.close()

    def wait_ready(self, timeout: float) -> str:
        if not self._conn.poll(timeout):
            self.process.kill()
            raise WorkError(self.name, f"did not start within {timeout:g} s")
        try:
            msg = self._conn.recv()
        except EOFError:
            raise WorkError(self.name, f"process exited while starting (exit code {self.process.exitcode})") from None
        if msg[0] != "ready":
            raise WorkError(self.name, msg[1], msg[2])
        self.url = msg[1]
        return msg[1]

    @property
    def is_running(self) -> bool:
        fut = self._current
        return fut is not None and not fut.done()

    def call_run(self, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        if self.stopped:
            raise WorkError(self.name, "run() called after the work was stopped")
        if self.is_running:
            self.wait()
        state = public_state(self.work)
        try:
            self._conn.send(("run", args, kwargs, state, self._registry()))
        except (pickle.PicklingError, TypeError, AttributeError) as e:
            raise WorkError(self.name, f"cannot send run() arguments or state to the work: {e}") from None
        except (BrokenPipeError, EOFError, OSError):
            raise WorkError(self.name, f"the work's process is gone (exit code {self.process.exitcode})") from None
        fut: Future[tuple[Any, ...]] = Future()
        self._current = fut
        threading.Thread(target=self._receive, args=(fut,), name=f"pathapi-wait:{self.name}", daemon=True).start()
        if self.work.parallel:
            return None
        return self._finish(fut)

    def _receive(self, fut: Future[tuple[Any, ...]]) -> None:
        try:
            msg = self._conn.recv()
        except (EOFError, OSError):
            self.process.join(5)
            fut.set_result(("error", f"the work's process died (exit code {self.process.exitcode})", ""))
            return
        if msg[0] == "done":
            for key, value in msg[1].items():
                setattr(self.work, key, value)
        fut.set_result(msg)

    def _finish(self, fut: Future[tuple[Any, ...]], timeout: float | None = None) -> Any:
        msg = fut.result(timeout)
        if msg[0] == "error":
            raise WorkError(self.name, msg[1], msg[2])
        return msg[2]

    def wait(self, timeout: float | None = None) -> None:
        fut = self._current
        if fut is not None:
            self._finish(fut, timeout)

    def stop(self, timeout: float = 600.0) -> None:
        """Stop the process: a running work is terminated; an idle one first finishes persisting."""
        with self._lock:
            if self.stopped:
                return
            self.stopped = True
        if self.is_running:
            self.process.terminate()
            self.process.join(10)
        else:
            try:
                self._conn.send(("stop",))
                if self._conn.poll(timeout):
                    msg = self._conn.recv()
                    for err in msg[1]:
                        print(f"pathapi: work {self.name}: persisting failed: {err}", file=sys.stderr)
            except (EOFError, OSError):
                pass
            self.process.join(30)
        if self.process.is_alive():
            self.process.kill()
            self.process.join()
        self._conn.close()


# -- work side ------------------------------------------------------------------------
class _Persister:
    """Persists a work's Paths in the background, one job at a time, in order."""

    def __init__(self, ctx: WorkContext) -> None:
        self.ctx = ctx
        self.errors: list[str] = []
        self._q: queue.Queue[list[str] | None] = queue.Queue()
        self._thread = threading.Thread(target=self._loop, name="pathapi-persist", daemon=True)
        self._thread.start()

    def schedule(self, rels: list[str]) -> None:
        if rels:
            self._q.put(rels)

    def _loop(self) -> None:
        # Persisting is background work: on a shared machine it yields the CPU to the work's
        # run and to transfers (Linux applies a thread id's niceness to that thread alone;
        # I/O schedulers that honour priorities derive the I/O class from it).
        try:
            os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), 10)
        except (AttributeError, OSError):
            pass
        while True:
            rels = self._q.get()
            try:
                if rels is None:
                    return
                for rel in rels:
                    try:
                        self.ctx.artifacts.persist_in_root(self.ctx.name, rel, self.ctx.root, self.ctx.workspace, version=self.ctx.version)
                    except Exception as e:  # reported to the flow at stop; the run itself succeeded
                        self.errors.append(f"{rel}: {type(e).__name__}: {e}")
            finally:
                self._q.task_done()

    def wait(self) -> None:
        self._q.join()

    def close(self) -> None:
        self._q.put(None)
        self._thread.join()


def _child_main(conn: Any, work: Work, name: str, config: AppConfig) -> None:
    try:
        root = config.work_root(name)
        os.makedirs(root, exist_ok=True)
        os.chdir(root)
        workspace = Workspace(config.state_dir(name))
        artifacts = ArtifactStore.open(config.store, config.root)
        ctx = WorkContext(name, root, workspace, artifacts, config.secret, config.timeout)
        set_current(ctx)
        origin = OriginService(name, root, config.secret, workspace, host=config.host, version=lambda: ctx.version)
        url = io_loop().run(origin.start(), timeout=60)
        persister = _Persister(ctx)
    except BaseException as e:
        conn.send(("error", f"could not start: {type(e).__name__}: {e}", traceback.format_exc()))
        return
    conn.send(("ready", url))
    while True:
        try:
            msg = conn.recv()
        except (EOFError, OSError):
            break  # the flow is gone
        if msg[0] == "stop":
            persister.wait()
            conn.send(("stopped", persister.errors))
            break
        _, args, kwargs, state, registry = msg
        ctx.registry = registry
        try:
            for key, value in state.items():
                setattr(work, key, value)
            # Paths this work holds that another work owns: this work is their consumer.
            for p in iter_paths((args, kwargs, state)):
                if p.origin_name != name:
                    p._consumer = name
            ctx.in_run = True
            for p in iter_paths((args, kwargs)):
                if p.origin_name is not None and p.origin_name != name:
                    p._last_transfer = get(p, overwrite=True, missing_ok=True, keep_newer=True)
            result = work.run(*args, **kwargs)
            ctx.in_run = False
            new_state = public_state(work)
            persister.schedule(sorted({os.fspath(p) for p in iter_paths(new_state) if p.origin_name == name}))
            try:
                conn.send(("done", new_state, result))
            except (pickle.PicklingError, TypeError, AttributeError) as e:
                conn.send(("error", f"run() returned or left state that cannot be sent to the flow: {e}", traceback.format_exc()))
        except BaseException as e:
            ctx.in_run = False
            conn.send(("error", f"{type(e).__name__}: {e}", traceback.format_exc()))
    persister.close()
    try:
        io_loop().run(origin.stop(), timeout=10)
        io_loop().run(close_sessions(), timeout=10)
    finally:
        workspace.close()
        artifacts.close()
