"""The work side of a work process: its main loop, and the persist-only process.

A work's process (``spawn``: nothing inherited but what is sent) runs with its root folder
as working directory, its origin service on a port of the configured host, and a persister
thread; it answers the messages of :mod:`.messages` from its handle (:mod:`.process`).
:func:`serve` is that loop for any runner (a Ray actor runs it too, :mod:`.ray_actor`).

Guarantees kept here:

- what is persisted is a state at the end of a run: a :class:`~.messages.Run` is applied
  only once the persist of the previous run's end state has read the files;
- a work process never outlives its app: it dies with its parent (``PR_SET_PDEATHSIG`` on
  Linux, and a watchdog on the parent's sentinel everywhere);
- with TLS, the origin's private key is made here and never leaves this process: the flow
  gets a certificate request and answers with the certificate (:func:`origin_tls`).
"""

from __future__ import annotations

import ctypes
import multiprocessing as mp
import multiprocessing.connection
import os
import pickle
import signal
import ssl
import sys
import threading
import traceback
from collections.abc import Callable, Sequence
from typing import Any

from cas.workspace import Workspace

from ..aio import io_loop
from ..artifacts import ArtifactStore
from ..version import Version
from ..wire.client import close_sessions
from ..wire.origin import OriginService
from ..wire.tls import OriginCredentials
from .context import WorkContext, set_current
from .messages import CertIssued, CertRequest, Done, Failed, PathAssigned, Ready, Run, Stop, Stopped
from .persist import Persister, persist_all
from .runner import AppConfig
from .state import iter_paths, own_paths, public_state
from .work import Work


def die_with_parent() -> None:
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
    ctx.report_transfers = config.report_transfers
    ctx.tls = config.tls.client_context() if config.tls is not None else None
    return ctx


def origin_tls(name: str, config: AppConfig, ask_flow: Callable[[bytes], bytes],
               hosts: Sequence[str] | None = None) -> ssl.SSLContext | None:
    """The origin's server context when the app run speaks TLS (else None): a key made
    here, and the certificate the flow signs for it (``ask_flow`` sends the CSR over the
    runner's channel and returns the flow's answer), for ``hosts``: what the origin's URL
    names (default: the configured host; a runner that binds 0.0.0.0 names the node's address)."""
    if config.tls is None:
        return None
    creds = OriginCredentials(name, list(hosts) if hosts is not None else [config.host])
    return creds.server_context(ask_flow(creds.csr_pem), spill_dir=config.state_dir(name))


def _ask_over_pipe(conn: Any) -> Callable[[bytes], bytes]:
    """``ask_flow`` for a local work process: CertRequest on its pipe, CertIssued back."""

    def ask(csr_pem: bytes) -> bytes:
        conn.send(CertRequest(csr_pem))
        answer = conn.recv()
        if not isinstance(answer, CertIssued):
            raise RuntimeError(f"the flow answered the certificate request with {type(answer).__name__}")
        return answer.cert_pem

    return ask


def persist_main(conn: Any, name: str, config: AppConfig, rels: list[str], run: int) -> None:
    """The process ``stop()`` starts after ending a running work: persist, report, exit."""
    die_with_parent()
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the flow decides when to stop
    conn.send(persist_here(name, config, rels, run))


def persist_here(name: str, config: AppConfig, rels: list[str], run: int) -> Stopped:
    """Persist ``rels`` of work ``name`` as its files are now, as the end of run ``run``
    (on the work's machine, with its state folder: any runner's persist-only process)."""
    try:
        ctx = _open_context(name, config)
    except BaseException as e:
        return Stopped([f"{', '.join(rels)}: could not open the work's stores: {type(e).__name__}: {e}"])
    try:
        return Stopped(persist_all(ctx, rels, Version(config.app_run, run, Version.ENDED)))
    finally:
        ctx.workspace.close()
        ctx.artifacts.close()


def work_main(conn: Any, work: Work, name: str, config: AppConfig) -> None:
    """The main loop of a work's process: start the origin, answer Run and Stop, clean up."""
    die_with_parent()
    # Ctrl-C reaches the whole process group: the flow stops its works; they ignore it.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    serve(conn, work, name, config)


def serve(conn: Any, work: Work, name: str, config: AppConfig) -> None:
    """The work's end of its handle, for any runner: ``conn`` (``send``/``recv``, EOFError or
    OSError when the flow is gone) carries the messages of :mod:`.messages`. Returns once
    the work stopped (or the flow is gone) and its origin service is closed."""
    try:
        ctx = _open_context(name, config)
        set_current(ctx)
        origin = OriginService(name, ctx.root, config.secret, ctx.workspace, host=config.host,
                               version=lambda: ctx.version, tls=origin_tls(name, config, _ask_over_pipe(conn)))
        url = io_loop().run(origin.start(), timeout=60)
        persister = Persister(ctx)
    except BaseException as e:
        conn.send(Failed(f"could not start: {type(e).__name__}: {e}", traceback.format_exc()))
        return
    send_lock = threading.Lock()

    def send(msg: object) -> None:  # the run's own threads may report Paths too
        with send_lock:
            conn.send(msg)

    ctx.report_path = lambda rel: send(PathAssigned(rel))
    send(Ready(url))
    while True:
        try:
            msg = conn.recv()
        except (EOFError, OSError):
            break  # the flow is gone
        if isinstance(msg, Stop):
            persister.wait()
            send(Stopped(persister.errors))
            break
        assert isinstance(msg, Run), msg
        # The previous run's end state is being persisted: this run may rewrite those files.
        persister.wait()
        answer = _run(work, name, config, ctx, persister, msg)
        try:
            send(answer)
        except (pickle.PicklingError, TypeError, AttributeError) as e:
            send(Failed(f"run() returned or left state that cannot be sent to the flow: {e}", traceback.format_exc()))
    persister.close()
    try:
        io_loop().run(origin.stop(), timeout=10)
        io_loop().run(close_sessions(), timeout=10)
    finally:
        ctx.workspace.close()
        ctx.artifacts.close()


def _run(work: Work, name: str, config: AppConfig, ctx: WorkContext, persister: Persister, msg: Run) -> Done | Failed:
    """One run of ``work``: set its state, get the Paths it receives, run, schedule the
    persist of its end state; what to answer the flow."""
    ctx.registry = msg.registry
    ctx.version = Version(config.app_run, msg.n, Version.DURING)
    try:
        for key, value in msg.state.items():
            setattr(work, key, value)
        # Paths this work holds that another work owns: this work is their consumer.
        for p in iter_paths((msg.args, msg.kwargs, msg.state)):
            if p.origin_name != name:
                p.held_by(name)
        ctx.in_run = True
        for p in iter_paths((msg.args, msg.kwargs)):
            if p.origin_name is not None and p.origin_name != name:
                p.get_for_run()
        result = work.run(*msg.args, **msg.kwargs)
        ctx.in_run = False
        ctx.version = Version(config.app_run, msg.n, Version.ENDED)
        new_state = public_state(work)
        persister.schedule(own_paths(new_state, name), ctx.version)
        return Done(new_state, result)
    except BaseException as e:
        ctx.in_run = False
        ctx.version = Version(config.app_run, msg.n, Version.ENDED)
        return Failed(f"{type(e).__name__}: {e}", traceback.format_exc())

