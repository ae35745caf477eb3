"""Work processes: the flow-side handle and the work-side main loop.

Each work runs in a process of its own (``spawn``: nothing inherited but what is sent), with
its root folder as working directory, its origin service on a loopback port, and a persister
thread. Messages over a pipe:

    flow -> work: ("run", n, args, kwargs, state, registry)   ("stop",)
    work -> flow: ("ready", url)   ("path", rel)   ("done", state, result)
                  ("error", message, traceback)   ("stopped", persist_errors)

``n`` counts the runs of the work in this app run (1 for the first): with the app run's start
it makes the :class:`~pathapi.version.Version` the work's files have (``DURING`` run ``n``
while it runs, ``ENDED`` once it returned). ``("path", rel)`` tells the flow, during a run,
that the work assigned a Path of its own, so that ``stop()`` of a run that never returns
still persists it.

Guarantees kept here:

- what is persisted is a state at the end of a run: the next ``run`` message is applied only
  once the persist of the previous run's end state has read the files;
- a work process never outlives its app: it dies with its parent (``PR_SET_PDEATHSIG`` on
  Linux, and a watchdog on the parent's sentinel everywhere);
- a work that cannot start (cannot be pickled, or the app file starts the app at import time)
  is reported within seconds, naming the work and the cause.
"""

from __future__ import annotations

import ctypes
import multiprocessing as mp
import multiprocessing.connection
import os
import pickle
import queue
import signal
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
from .version import Version
from .work import Work, public_state

_SPAWN = mp.get_context("spawn")

#: Exit code of a spawned process whose import of the main module started an app again.
EXIT_UNGUARDED_MAIN = 78  # EX_CONFIG

UNGUARDED_MAIN_MESSAGE = (
    "the app file starts the app when it is imported: a work process imports it again and "
    "would start the app once more. Put the call under a main guard:\n\n"
    "    if __name__ == \"__main__\":\n        app.run()\n\n"
    "(or define `app = App(...)` without calling run() and use `pathapi run FILE`)"
)


@dataclass(frozen=True)
class AppConfig:
    root: str  # absolute app folder
    store: str | None
    secret: str
    timeout: float
    host: str = "127.0.0.1"
    #: when this app run started (ns since the epoch): the first field of every Version
    app_run: int = 0

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


def own_paths(value: Any, name: str) -> list[str]:
    """The relative paths of the Paths in ``value`` whose origin is work ``name``, sorted."""
    return sorted({os.fspath(p) for p in iter_paths(value) if p.origin_name == name})


def unpicklable_part(work: Work) -> str:
    """What of ``work`` cannot be sent to a spawned process, for an error message."""
    cls = type(work)
    if "<locals>" in cls.__qualname__:
        return (f"its class {cls.__qualname__} is defined inside a function; define Work "
                "classes at module level so the work's process can import them")
    for key, value in vars(work).items():
        try:
            pickle.dumps(value)
        except Exception as e:
            return (f"its attribute {key!r} ({type(value).__name__}) cannot be pickled: "
                    f"{type(e).__name__}: {e}. A work's attributes are sent to its process: "
                    "use module-level functions and classes, or set it inside run()")
    return "it cannot be pickled"


# -- flow side ------------------------------------------------------------------------
class WorkHandle:
    """The flow's end of one work process.

    Every error of a run is delivered once: to ``run()``/``wait()`` if the flow asks, else to
    :meth:`unobserved_error`, which ``App.run`` raises after the flow returns.
    """

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
        self._observed = False
        self._lock = threading.Lock()
        self.url: str | None = None
        self.started = False
        self.stopped = False
        self.runs = 0
        #: Paths of its own the work assigned during the current run (see ("path", rel))
        self._reported: set[str] = set()

    def start(self) -> None:
        try:
            self.process.start()
        except Exception as e:
            self.stopped = True
            self._conn.close()
            self._child_conn.close()
            raise WorkError(self.name, f"cannot start its process: {unpicklable_part(self.work)}") from e
        self.started = True
        self._child_conn.close()

    def wait_ready(self, timeout: float) -> str:
        if not self._conn.poll(timeout):
            self.process.kill()
            raise WorkError(self.name, f"did not start within {timeout:g} s")
        try:
            msg = self._conn.recv()
        except EOFError:
            self.process.join(5)
            code = self.process.exitcode
            if code == EXIT_UNGUARDED_MAIN:
                raise WorkError(self.name, f"could not start: {UNGUARDED_MAIN_MESSAGE}") from None
            raise WorkError(self.name, f"process exited while starting (exit code {code}); "
                                       "its error output above says why") from None
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
        error = self.unobserved_error()  # a parallel run failed and the flow did not wait()
        if error is not None:
            raise error
        state = public_state(self.work)
        n = self.runs + 1
        try:
            self._conn.send(("run", n, args, kwargs, state, self._registry()))
        except (pickle.PicklingError, TypeError, AttributeError) as e:
            raise WorkError(self.name, f"cannot send run() arguments or state to the work: {e}") from None
        except (BrokenPipeError, EOFError, OSError):
            raise WorkError(self.name, f"the work's process is gone (exit code {self.process.exitcode})") from None
        self.runs = n
        self._reported = set()
        fut: Future[tuple[Any, ...]] = Future()
        self._current = fut
        self._observed = False
        threading.Thread(target=self._receive, args=(fut,), name=f"pathapi-wait:{self.name}", daemon=True).start()
        if self.work.parallel:
            return None
        return self._finish(fut)

    def _receive(self, fut: Future[tuple[Any, ...]]) -> None:
        while True:
            try:
                msg = self._conn.recv()
            except (EOFError, OSError):
                self.process.join(5)
                if self.stopped:  # ended by stop(): not an error of the work's
                    fut.set_result(("stopped",))
                else:
                    fut.set_result(("error", f"the work's process died (exit code {self.process.exitcode})", ""))
                return
            if msg[0] == "path":
                self._reported.add(msg[1])
                continue
            if msg[0] == "done":
                for key, value in msg[1].items():
                    setattr(self.work, key, value)
            fut.set_result(msg)
            return

    def _finish(self, fut: Future[tuple[Any, ...]], timeout: float | None = None) -> Any:
        msg = fut.result(timeout)
        self._observed = True
        if msg[0] == "error":
            raise WorkError(self.name, msg[1], msg[2])
        return msg[2] if msg[0] == "done" else None

    def wait(self, timeout: float | None = None) -> None:
        fut = self._current
        if fut is not None:
            self._finish(fut, timeout)

    def unobserved_error(self) -> WorkError | None:
        """The error of the last run if it failed and neither ``run()`` nor ``wait()`` raised it."""
        fut = self._current
        if fut is None or self._observed or not fut.done():
            return None
        msg = fut.result()
        if msg[0] != "error":
            return None
        self._observed = True
        return WorkError(self.name, msg[1], msg[2])

    def stop(self, timeout: float = 600.0) -> None:
        """Stop the process and return once its Paths are persisted.

        An idle work finishes persisting its last run, then exits. A running work is
        terminated; then a short-lived process of the same work persists its Paths as the
        run left them (as the end state of that run), since only a process on the work's
        machine can read its files.
        """
        with self._lock:
            if self.stopped:
                return
            self.stopped = True
        if not self.started:
            return
        if self.is_running:
            self.process.terminate()
            self.process.join(10)
            if self.process.is_alive():
                self.process.kill()
                self.process.join()
            rels = sorted(set(own_paths(public_state(self.work), self.name)) | self._reported)
            self._report(persist_as_left(self.name, self.config, rels, self.runs, timeout))
        else:
            try:
                self._conn.send(("stop",))
                while self._conn.poll(timeout):  # skip what it sent that nobody read (a start error)
                    msg = self._conn.recv()
                    if msg[0] == "stopped":
                        self._report(msg[1])
                        break
            except (EOFError, OSError):
                pass
            self.process.join(30)
        if self.process.is_alive():
            self.process.kill()
            self.process.join()
        self._conn.close()

    def _report(self, errors: list[str]) -> None:
        for err in errors:
            print(f"pathapi: work {self.name}: persisting failed: {err}", file=sys.stderr)


def persist_as_left(name: str, config: AppConfig, rels: list[str], run: int, timeout: float) -> list[str]:
    """Persist ``rels`` of work ``name`` as its files are now, as the end of run ``run``, in a
    process of its own (the work's machine, its state folder); the persist errors."""
    if not rels:
        return []
    conn, child_conn = _SPAWN.Pipe()
    proc = _SPAWN.Process(target=_persist_main, args=(child_conn, name, config, rels, run),
                          name=f"pathapi-persist:{name}")
    proc.start()
    child_conn.close()
    try:
        if conn.poll(timeout):
            return list(conn.recv()[1])
        return [f"{', '.join(rels)}: not persisted within {timeout:g} s"]
    except EOFError:
        proc.join(5)
        return [f"{', '.join(rels)}: the persisting process died (exit code {proc.exitcode})"]
    finally:
        conn.close()
        proc.join(5)
        if proc.is_alive():
            proc.kill()
            proc.join()


# -- work side ------------------------------------------------------------------------
class _Persister:
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


def _die_with_parent() -> None:
    """End this process when the flow's process ends, however it ends (even SIGKILL)."""
    if sys.platform.startswith("linux"):
        try:
            libc = ctypes.CDLL(None, use_errno=True)
            libc.prctl(1, signal.SIGKILL, 0, 0, 0)  # PR_SET_PDEATHSIG
        except (OSError, AttributeError):
            pass
    parent = mp.parent_process()
    if parent is None:
        return

    def watch() -> None:
        mp.connection.wait([parent.sentinel])
        os._exit(1)

    threading.Thread(target=watch, name="pathapi-parent-watch", daemon=True).start()


def _open_context(name: str, config: AppConfig) -> WorkContext:
    root = config.work_root(name)
    os.makedirs(root, exist_ok=True)
    os.chdir(root)
    workspace = Workspace(config.state_dir(name))
    artifacts = ArtifactStore.open(config.store, config.root)
    ctx = WorkContext(name, root, workspace, artifacts, config.secret, config.timeout)
    ctx.version = Version(config.app_run, 0, Version.ENDED)
    return ctx


def _persist_main(conn: Any, name: str, config: AppConfig, rels: list[str], run: int) -> None:
    """The process ``stop()`` starts after ending a running work: persist, report, exit."""
    _die_with_parent()
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the flow decides when to stop
    try:
        ctx = _open_context(name, config)
    except BaseException as e:
        conn.send(("stopped", [f"{', '.join(rels)}: could not open the work's stores: {type(e).__name__}: {e}"]))
        return
    try:
        conn.send(("stopped", persist_all(ctx, rels, Version(config.app_run, run, Version.ENDED))))
    finally:
        ctx.workspace.close()
        ctx.artifacts.close()


def _child_main(conn: Any, work: Work, name: str, config: AppConfig) -> None:
    _die_with_parent()
    # Ctrl-C reaches the whole process group: the flow stops its works; they ignore it.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        ctx = _open_context(name, config)
        set_current(ctx)
        origin = OriginService(name, ctx.root, config.secret, ctx.workspace, host=config.host,
                               version=lambda: ctx.version)
        url = io_loop().run(origin.start(), timeout=60)
        persister = _Persister(ctx)
    except BaseException as e:
        conn.send(("error", f"could not start: {type(e).__name__}: {e}", traceback.format_exc()))
        return
    send_lock = threading.Lock()

    def send(msg: tuple[Any, ...]) -> None:  # the run's own threads may report Paths too
        with send_lock:
            conn.send(msg)

    ctx.report_path = lambda rel: send(("path", rel))
    send(("ready", url))
    while True:
        try:
            msg = conn.recv()
        except (EOFError, OSError):
            break  # the flow is gone
        if msg[0] == "stop":
            persister.wait()
            send(("stopped", persister.errors))
            break
        _, n, args, kwargs, state, registry = msg
        # The previous run's end state is being persisted: this run may rewrite those files.
        persister.wait()
        ctx.registry = registry
        ctx.version = Version(config.app_run, n, Version.DURING)
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
            ctx.version = Version(config.app_run, n, Version.ENDED)
            new_state = public_state(work)
            persister.schedule(own_paths(new_state, name), ctx.version)
            try:
                send(("done", new_state, result))
            except (pickle.PicklingError, TypeError, AttributeError) as e:
                send(("error", f"run() returned or left state that cannot be sent to the flow: {e}", traceback.format_exc()))
        except BaseException as e:
            ctx.in_run = False
            ctx.version = Version(config.app_run, n, Version.ENDED)
            send(("error", f"{type(e).__name__}: {e}", traceback.format_exc()))
    persister.close()
    try:
        io_loop().run(origin.stop(), timeout=10)
        io_loop().run(close_sessions(), timeout=10)
    finally:
        ctx.workspace.close()
        ctx.artifacts.close()
