"""The local-process runner: each work runs in a process of its own on this machine.

The first :class:`~.runner.Runner` implementation. A :class:`ProcessHandle` is the flow's
end of one work process (``spawn``); the work's end is :func:`.main.work_main`; they talk in
the typed messages of :mod:`.messages`. ``n`` of a Run counts the runs of the work in this
app run (1 for the first): with the app run's start it makes the
:class:`~pathapi.version.Version` the work's files have.

A work that cannot start (cannot be pickled, or the app file starts the app at import time)
is reported within seconds, naming the work and the cause.
"""

from __future__ import annotations

import multiprocessing as mp
import pickle
import sys
import threading
import time
from concurrent.futures import Future
from typing import Any, Protocol

from ..errors import TlsError, WorkError
from .main import persist_main, work_main
from .messages import CertIssued, CertRequest, Done, Failed, PathAssigned, Ready, Run, RunEnd, Stop, Stopped
from .runner import AppConfig, Registry, Runner
from .state import own_paths, public_state
from .work import Work

_SPAWN = mp.get_context("spawn")

#: Exit code of a spawned process whose import of the main module started an app again.
EXIT_UNGUARDED_MAIN = 78  # EX_CONFIG

UNGUARDED_MAIN_MESSAGE = (
    "the app file starts the app when it is imported: a work process imports it again and "
    "would start the app once more. Put the call under a main guard:\n\n"
    "    if __name__ == \"__main__\":\n        app.run()\n\n"
    "(or define `app = App(...)` without calling run() and use `pathapi run FILE`)"
)


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


class Channel(Protocol):
    """The flow's end of the pipe to a work (a ``multiprocessing`` connection, or a runner's
    own with the same behaviour): ``recv`` raises EOFError or OSError once the work is gone."""

    def send(self, obj: Any) -> None: ...

    def recv(self) -> Any: ...

    def poll(self, timeout: float | None = None) -> bool: ...

    def close(self) -> None: ...


class WorkProcess(Protocol):
    """What a handle needs of the process running its work (``multiprocessing.Process`` or a
    runner's stand-in for a process elsewhere)."""

    @property
    def pid(self) -> int | None: ...

    @property
    def exitcode(self) -> int | None: ...

    def start(self) -> None: ...

    def is_alive(self) -> bool: ...

    def terminate(self) -> None: ...

    def kill(self) -> None: ...

    def join(self, timeout: float | None = None) -> None: ...


class LocalProcessRunner(Runner):
    """Runs each work in a local process of its own (``spawn``)."""

    def handle(self, work: Work, name: str, config: AppConfig, registry: Registry) -> ProcessHandle:
        return ProcessHandle(work, name, config, registry)


class ProcessHandle:
    """The flow's end of one work process.

    Every error of a run is delivered once: to ``run()``/``wait()`` if the flow asks, else to
    :meth:`unobserved_error`, which ``App.run`` raises after the flow returns.

    Another runner reuses all of it by giving its own process and channel
    (:meth:`_endpoints`), its own words for a death (:meth:`_death`) and its own
    persist-only process (:meth:`_persist_as_left`).
    """

    def __init__(self, work: Work, name: str, config: AppConfig, registry: Registry) -> None:
        self.work = work
        self.name = name
        self.config = config
        self._registry = registry
        self._conn, self.process, self._child_conn = self._endpoints()
        self._current: Future[RunEnd] | None = None
        self._observed = False
        self._lock = threading.Lock()
        self.url: str | None = None
        self.started = False
        self.stopped = False
        self.runs = 0
        #: Paths of its own the work assigned during the current run (see PathAssigned)
        self._reported: set[str] = set()

    def _endpoints(self) -> tuple[Channel, WorkProcess, Channel]:
        """(the flow's end of the pipe, the work's process, the end the process inherits)."""
        conn, child_conn = _SPAWN.Pipe()
        process = _SPAWN.Process(
            target=work_main, args=(child_conn, self.work, self.name, self.config), name=f"pathapi-work:{self.name}"
        )
        return conn, process, child_conn

    def _death(self) -> str:
        """Why the work's process is gone, for an error message (after it ended)."""
        return f"exit code {self.process.exitcode}"

    def _persist_as_left(self, rels: list[str], timeout: float) -> list[str]:
        return persist_as_left(self.name, self.config, rels, self.runs, timeout)

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
        deadline = time.monotonic() + timeout
        while True:
            if not self._conn.poll(max(0.0, deadline - time.monotonic())):
                self.process.kill()
                raise WorkError(self.name, f"did not start within {timeout:g} s")
            try:
                msg = self._conn.recv()
            except EOFError:
                self.process.join(5)
                code = self.process.exitcode
                if code == EXIT_UNGUARDED_MAIN:
                    raise WorkError(self.name, f"could not start: {UNGUARDED_MAIN_MESSAGE}") from None
                raise WorkError(self.name, f"process exited while starting ({self._death()}); "
                                           "its error output above says why") from None
            if not isinstance(msg, CertRequest):
                break
            self._issue(msg)
        if not isinstance(msg, Ready):
            raise WorkError(self.name, msg.message, msg.traceback)
        self.url = msg.url
        return msg.url

    def _issue(self, request: CertRequest) -> None:
        """Sign the work's certificate request with the app run's CA (TLS): the key stays
        in the work, the CA in this process."""
        tls = self.config.tls
        try:
            if tls is None:
                raise TlsError("this app run does not speak TLS", self.name)
            cert = tls.issue(self.name, request.csr_pem)
        except TlsError as e:
            self.process.kill()
            raise WorkError(self.name, f"could not start: its origin certificate was refused: {e}") from None
        self._conn.send(CertIssued(cert))

    @property
    def pid(self) -> int | None:
        return self.process.pid

    @property
    def serving(self) -> bool:
        return not self.stopped and self.process.is_alive()

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
            self._conn.send(Run(n, args, kwargs, state, self._registry()))
        except (pickle.PicklingError, TypeError, AttributeError) as e:
            raise WorkError(self.name, f"cannot send run() arguments or state to the work: {e}") from None
        except (BrokenPipeError, EOFError, OSError):
            raise WorkError(self.name, f"the work's process is gone ({self._death()})") from None
        self.runs = n
        self._reported = set()
        fut: Future[RunEnd] = Future()
        self._current = fut
        self._observed = False
        threading.Thread(target=self._receive, args=(fut,), name=f"pathapi-wait:{self.name}", daemon=True).start()
        if self.work.parallel:
            return None
        return self._finish(fut)

    def _receive(self, fut: Future[RunEnd]) -> None:
        while True:
            try:
                msg = self._conn.recv()
            except (EOFError, OSError):
                self.process.join(5)
                if self.stopped:  # ended by stop(): not an error of the work's
                    fut.set_result(Stopped())
                else:
                    fut.set_result(Failed(f"the work's process died ({self._death()})"))
                return
            if isinstance(msg, PathAssigned):
                self._reported.add(msg.rel)
                continue
            if isinstance(msg, Done):
                for key, value in msg.state.items():
                    setattr(self.work, key, value)
            fut.set_result(msg)
            return

    def _finish(self, fut: Future[RunEnd], timeout: float | None = None) -> Any:
        msg = fut.result(timeout)
        self._observed = True
        if isinstance(msg, Failed):
            raise WorkError(self.name, msg.message, msg.traceback)
        return msg.result if isinstance(msg, Done) else None

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
        if not isinstance(msg, Failed):
            return None
        self._observed = True
        return WorkError(self.name, msg.message, msg.traceback)

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
            self._report(self._persist_as_left(rels, timeout))
        else:
            try:
                self._conn.send(Stop())
                while self._conn.poll(timeout):  # skip what it sent that nobody read (a start error)
                    msg = self._conn.recv()
                    if isinstance(msg, Stopped):
                        self._report(msg.persist_errors)
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
    proc = _SPAWN.Process(target=persist_main, args=(child_conn, name, config, rels, run),
                          name=f"pathapi-persist:{name}")
    proc.start()
    child_conn.close()
    try:
        if conn.poll(timeout):
            return list(conn.recv().persist_errors)
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


