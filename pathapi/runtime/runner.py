"""What runs works: the small interface an App starts its works through.

A :class:`Runner` makes one :class:`WorkHandle` per work; the App drives every handle the
same way (start, wait until ready, run, stop), whatever runs the work. The first
implementation runs each work in a local process (:class:`~.process.LocalProcessRunner`);
the second runs each as a Ray actor on a cluster (:class:`~.ray_runner.RayRunner`).

What every implementation guarantees:

- ``start`` returns at once or raises :class:`~pathapi.errors.WorkError` naming the work and
  the cause; ``wait_ready`` returns the URL of the work's origin service;
- every error of a run is delivered once: to ``call_run``/``wait`` if the flow asks, else
  to ``unobserved_error`` (which ``App.run`` raises after the flow returns);
- ``stop`` returns once the work's Paths are persisted as the work left them, and the work
  is gone; it may be called more than once.
"""

from __future__ import annotations

import os
from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

from ..errors import WorkError
from ..wire.tls import TlsConfig
from .work import RunHandle, Work

#: Set in the environment of a work's process by runners whose processes import the app's
#: module anew (a Ray actor): ``App.run`` there is the app file starting the app at import.
IN_WORK_ENV = "PATHAPI_IN_WORK"

#: work name -> the URL of its origin service (None once it stopped), asked at each run.
Registry = Callable[[], dict[str, str | None]]


@dataclass(frozen=True)
class AppConfig:
    """What every work of one app run shares (sent to each work's process)."""

    root: str  # absolute app folder
    store: str | None
    secret: str
    timeout: float
    host: str = "127.0.0.1"
    #: when this app run started (ns since the epoch): the first field of every Version
    app_run: int = 0
    #: every get prints one line saying what moved and what was reused (``pathapi run``)
    report_transfers: bool = False
    #: the app run's TLS trust when its works speak TLS (pathapi.wire.tls.tls_enabled), else
    #: None. In the flow it also signs each work's certificate request (``tls.issue``); a
    #: pickled copy (what a work receives) holds only the CA certificate.
    tls: TlsConfig | None = None

    def work_root(self, name: str) -> str:
        return os.path.join(self.root, "works", name)

    def state_dir(self, name: str) -> str:
        return os.path.join(self.root, "state", name)


class WorkHandle(RunHandle, Protocol):
    """The flow's end of one running work."""

    name: str
    #: the work's origin service, once ready (None before)
    url: str | None

    @property
    def serving(self) -> bool:
        """Whether the work's origin can be asked for its files (started, not stopped, alive)."""
        ...

    @property
    def pid(self) -> int | None:
        """The id of the local process running the work (None if it runs elsewhere or not yet)."""
        ...

    def start(self) -> None: ...

    def wait_ready(self, timeout: float) -> str: ...

    def unobserved_error(self) -> WorkError | None: ...

    def stop(self, timeout: float = 600.0) -> None: ...


class Runner(ABC):
    """Makes the handles through which an App runs its works.

    ``App.run`` calls :meth:`open` once with every work before it asks for their handles,
    and :meth:`close` once after every handle stopped (also when starting failed).

    With TLS on (``config.tls`` set), a handle's work makes its origin key and sends a
    certificate request before serving; the handle answers it with
    ``config.tls.issue(name, csr_pem)`` (the CA never leaves the flow), and the work's
    origin then serves ``https://`` only (pathapi.wire.tls).
    """

    #: True when works may run on other machines: the App then refuses an artifact store
    #: that only this machine sees (see :mod:`.cluster`)
    needs_shared_store: bool = False
    #: True when every work runs on this machine (origin traffic stays on loopback): then
    #: ``App(tls=None)`` means no TLS (pathapi.wire.tls.tls_enabled)
    is_local: bool = True

    def open(self, works: list[tuple[str, Work]], config: AppConfig) -> None:
        """Get ready to run ``works`` (connect to a cluster, place them); raises a
        :class:`~pathapi.errors.PathapiError` saying what is missing. Nothing, by default."""
        return None

    def close(self) -> None:
        """Release what :meth:`open` took; may be called more than once. Nothing, by default."""
        return None

    @abstractmethod
    def handle(self, work: Work, name: str, config: AppConfig, registry: Registry) -> WorkHandle:
        """The (not yet started) handle of ``work``, named ``name`` in the flow."""
