"""``App``: starts every work of a flow in its own process (here or on a cluster), runs the
flow once, stops them."""

from __future__ import annotations

import contextlib
import multiprocessing as mp
import os
import secrets
import signal
import ssl
import sys
import threading
import time
from collections.abc import Iterator
from typing import Any

from ..errors import WorkError
from ..wire.tls import TlsConfig, tls_enabled
from .cluster import LOCAL, SharedFolder, check_store, runner_for
from .flow import Flow
from .process import EXIT_UNGUARDED_MAIN, UNGUARDED_MAIN_MESSAGE
from .runner import IN_WORK_ENV, AppConfig, Runner, WorkHandle
from .state import walk_works
from .work import Work

DEFAULT_TIMEOUT = float(os.environ.get("PATHAPI_TIMEOUT", "30"))


class App:
    """``App(flow, root=None, store=None).run()``; ``root`` defaults to ``./.pathapi``.

    ``timeout`` bounds every wait on another work's origin (seconds); ``host`` is the address
    origin services bind to (loopback unless configured; on a cluster each binds to its
    node's address); ``cluster`` says where works run: ``"local"`` (the default: each in a
    local process), ``"ray"`` (each as an actor on the Ray cluster ``RAY_ADDRESS`` names) or
    ``"ray://HOST:PORT"``; ``runner`` gives a :class:`~.runner.Runner` of one's own instead.
    On a cluster the ``store`` must be one every node reaches: ``s3://...``, or a
    :class:`~.cluster.SharedFolder` (ValueError otherwise). ``ui=True`` serves the storage
    browser (:mod:`pathapi.ui`) on 127.0.0.1 while the app runs and prints its URL;
    ``report_transfers`` prints one line per get (``pathapi run`` sets it unless ``-q``).

    ``tls``: whether the works' origins speak TLS, with a certificate authority made for each
    run and pinned by every consumer (pathapi.wire.tls). None (the default) means on
    whenever the works may be on other machines (the runner is not local), off for local
    processes, which talk over loopback; True forces it on, False off.
    """

    def __init__(self, flow: Flow, root: str | os.PathLike[str] | None = None, store: str | os.PathLike[str] | None = None,
                 *, timeout: float = DEFAULT_TIMEOUT, host: str = "127.0.0.1", start_timeout: float = 120.0,
                 runner: Runner | None = None, cluster: str = LOCAL, ui: bool = False,
                 report_transfers: bool = False, tls: bool | None = None) -> None:
        if runner is not None and cluster != LOCAL:
            raise ValueError(f"give App a runner= or a cluster= ({cluster!r}), not both")
        self.flow = flow
        self.root = os.path.abspath(os.fspath(root) if root is not None else ".pathapi")
        self.cluster = cluster
        self.runner: Runner = runner if runner is not None else runner_for(cluster)
        check_store(store, self.runner)
        self.store = _store_location(store)
        #: the store was declared shared by the nodes of a cluster (a SharedFolder)
        self.store_shared = isinstance(store, SharedFolder)
        self.timeout = timeout
        self.host = host
        self.start_timeout = start_timeout
        self.handles: dict[str, WorkHandle] = {}
        self._secret: str | None = None
        self.tls = tls
        self._tls: TlsConfig | None = None
        self.ui = ui
        self.report_transfers = report_transfers
        #: the storage browser's URL (with its token) while it runs (``ui=True``)
        self.ui_url: str | None = None

    def use_cluster(self, cluster: str) -> None:
        """Run the works on ``cluster`` instead (as ``App(cluster=...)``; the ``pathapi run
        --cluster`` option): ValueError if the app's store is not one its nodes share."""
        runner = runner_for(cluster)
        check_store(SharedFolder(self.store) if self.store_shared and self.store else self.store, runner)
        self.cluster, self.runner = cluster, runner

    def _registry(self) -> dict[str, str | None]:
        # A work that stopped or died serves nothing: its Paths come from the artifact store.
        return {name: (h.url if h.serving else None) for name, h in self.handles.items()}

    def handle(self, work: Work) -> WorkHandle:
        """The runner's handle of ``work`` while the app runs (its origin ``url``, its ``pid``):
        for tools such as the benchmarks that watch a work from the flow. KeyError if
        ``work`` is not one of this app's running works."""
        if work.name is None or work.name not in self.handles:
            raise KeyError(f"{work!r} is not a work of this app's run")
        return self.handles[work.name]

    @property
    def secret(self) -> str:
        """The secret of the current run (every origin request carries it); RuntimeError
        before the app runs."""
        if self._secret is None:
            raise RuntimeError("the app has not started: it has no secret yet")
        return self._secret

    @property
    def tls_on(self) -> bool:
        """Whether this app's runs speak TLS between works (``tls`` and the runner decide)."""
        return tls_enabled(self.tls, cluster_is_local=self.runner.is_local)

    def client_ssl_context(self) -> ssl.SSLContext | None:
        """A client context that trusts only the current run's CA (None when the run does
        not speak TLS), for tools that ask a work's origin from the flow; RuntimeError
        before the app runs."""
        if self._secret is None:
            raise RuntimeError("the app has not started: it has no certificate authority yet")
        return self._tls.client_context() if self._tls is not None else None

    def run(self) -> Any:
        """Start the works, run the flow once, stop the works (persisting their Paths).

        Raises ``WorkError`` if a work could not start, or if a parallel work's run failed and
        the flow never waited for it (all such errors are named). SIGTERM stops the app as
        Ctrl-C does: ``KeyboardInterrupt`` after the works are stopped
        (:data:`INTERRUPTED_BY` then says which signal).
        """
        if getattr(mp.current_process(), "_inheriting", False):
            # A spawned process is importing the main module, which calls app.run() again.
            print(f"pathapi: {UNGUARDED_MAIN_MESSAGE}", file=sys.stderr)
            raise SystemExit(EXIT_UNGUARDED_MAIN)
        if os.environ.get(IN_WORK_ENV):
            # A work's actor is importing the app file to load its work (see ray_actor).
            raise RuntimeError(UNGUARDED_MAIN_MESSAGE)
        works = list(walk_works(self.flow, "root"))
        seen: dict[int, str] = {}
        for name, w in works:
            if id(w) in seen:
                raise ValueError(f"the same work object is attached twice: {seen[id(w)]} and {name}")
            seen[id(w)] = name
            w._attach(name)
        app_run = time.time_ns()
        # A new CA per run: nothing issued for an earlier run is trusted by this one.
        self._tls = TlsConfig.new(str(app_run)) if self.tls_on else None
        self._secret = secrets.token_urlsafe(32)
        config = AppConfig(self.root, self.store, self._secret, self.timeout, self.host, app_run=app_run, tls=self._tls,
                           report_transfers=self.report_transfers)
        os.makedirs(self.root, exist_ok=True)
        with _sigterm_as_interrupt(), self._browser():
            try:
                self.runner.open(works, config)
                self.handles = {name: self.runner.handle(w, name, config, self._registry) for name, w in works}
                try:
                    for h in self.handles.values():
                        h.start()
                    for h in self.handles.values():
                        h.wait_ready(self.start_timeout)
                    for name, w in works:
                        w._set_handle(self.handles[name])
                    result = self.flow.run()
                finally:
                    for h in self.handles.values():
                        h.stop()
                    for _, w in works:
                        w._set_handle(None)
            finally:
                self.runner.close()
        errors = [e for e in (h.unobserved_error() for h in self.handles.values()) if e is not None]
        if errors:
            raise _combined(errors)
        return result

    @contextlib.contextmanager
    def _browser(self) -> Iterator[None]:
        """With ``ui=True``: the storage browser on this app's store while the block runs."""
        if not self.ui:
            yield
            return
        from ..ui.catalog import Catalog
        from ..ui.server import BackgroundUi

        browser = BackgroundUi(Catalog.open(self.root, self.store, create=True))
        self.ui_url = browser.url
        print(f"pathapi ui: {browser.url}", flush=True)
        try:
            yield
        finally:
            self.ui_url = None
            browser.stop()


def _store_location(store: str | os.PathLike[str] | None) -> str | None:
    """A local store as an absolute path: each work runs in a folder of its own, so a relative
    one would name a different store in each."""
    if store is None:
        return None
    text = os.fspath(store)
    return text if "://" in text else os.path.abspath(text)


def _combined(errors: list[WorkError]) -> WorkError:
    """One WorkError for the failures nobody waited for (the first's traceback kept)."""
    first = errors[0]
    if len(errors) == 1:
        return first
    others = "; ".join(f"{e.work_name}: {e.args[0]}" for e in errors[1:])
    combined = WorkError(first.work_name, f"{first.args[0]} (and {len(errors) - 1} more: {others})",
                         first.remote_traceback)
    combined.errors = errors  # type: ignore[attr-defined]
    return combined


#: The signal that interrupted the last ``App.run`` (SIGINT or SIGTERM), or None.
INTERRUPTED_BY: int | None = None


@contextlib.contextmanager
def _sigterm_as_interrupt() -> Iterator[None]:
    """While the app runs, SIGTERM raises KeyboardInterrupt in the main thread (so the works
    are stopped as for Ctrl-C); the previous handler is restored after."""
    global INTERRUPTED_BY
    INTERRUPTED_BY = None
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def on_term(signum: int, frame: object) -> None:
        global INTERRUPTED_BY
        INTERRUPTED_BY = signum
        raise KeyboardInterrupt(f"signal {signum}")

    previous = signal.signal(signal.SIGTERM, on_term)
    try:
        yield
    except KeyboardInterrupt:
        if INTERRUPTED_BY is None:
            INTERRUPTED_BY = signal.SIGINT
        raise
    finally:
        signal.signal(signal.SIGTERM, previous)
