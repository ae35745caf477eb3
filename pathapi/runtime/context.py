"""What a work process knows about itself while it runs: its name, root, stores, peers.

There is one context per work process (set by the runner); in a flow's process there is
none, which is how ``Path.get`` and friends know to refuse being called there.
"""

from __future__ import annotations

import ssl
from collections.abc import Callable
from dataclasses import dataclass, field

from cas.workspace import Workspace

from ..artifacts import ArtifactStore
from ..version import UNKNOWN, Version


@dataclass
class WorkContext:
    name: str
    root: str  # absolute; the work's filesystem root and working directory
    workspace: Workspace
    artifacts: ArtifactStore
    secret: str
    timeout: float
    #: work name -> origin service URL (None once that work has stopped)
    registry: dict[str, str | None] = field(default_factory=dict)
    in_run: bool = False
    #: which run of this work produced its files' current state (the runner advances it at
    #: the start and end of each run; the origin stamps served manifests with it)
    version: Version = UNKNOWN
    #: tells the flow that the running work assigned a Path of its own (so that stop() of a
    #: run that never returns still persists it); set by the runner
    report_path: Callable[[str], None] | None = None
    #: print one line per get (``pathapi run`` without ``-q``); set by the runner
    report_transfers: bool = False
    #: the client context that pins the app run's CA when its works speak TLS (else None):
    #: every request to another work's origin goes over TLS with it
    tls: ssl.SSLContext | None = None


_current: WorkContext | None = None


def current() -> WorkContext | None:
    return _current


def set_current(ctx: WorkContext | None) -> None:
    global _current
    _current = ctx


def require_run(what: str) -> WorkContext:
    """The context of the running work; RuntimeError outside a work's ``run``."""
    ctx = _current
    if ctx is None or not ctx.in_run:
        raise RuntimeError(
            f"{what} can only be called inside a work's run(): flows do no filesystem work, "
            "and outside an app there is no origin to ask"
        )
    return ctx
