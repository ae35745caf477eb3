"""The messages between the flow's end of a work (its handle) and the work's process.

Each is a small frozen dataclass, pickled over the pipe between two processes of the same
app run (same code on both ends: nothing here is a stored or versioned format).

    flow -> work: CertIssued (TLS only, the answer to CertRequest)   Run   Stop
    work -> flow: CertRequest (TLS only, before Ready)   Ready   Failed (start failed)
                  then per run: PathAssigned*, Done | Failed
                  Stopped (after Stop: the persist errors)
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


@dataclass(frozen=True)
class Run:
    """Run ``n`` (1 for the first of this app run) with these arguments, after setting the
    work's public ``state`` as the flow sees it; ``registry`` maps work names to origin URLs."""

    n: int
    args: tuple[Any, ...]
    kwargs: dict[str, Any]
    state: dict[str, Any]
    registry: dict[str, str | None]


@dataclass(frozen=True)
class Stop:
    """Finish persisting, answer :class:`Stopped`, exit."""


@dataclass(frozen=True)
class CertRequest:
    """With TLS, before its origin serves: the work's certificate signing request (PEM) for
    the key it made and keeps (pathapi.wire.tls.OriginCredentials); the flow signs it."""

    csr_pem: bytes


@dataclass(frozen=True)
class CertIssued:
    """The flow's answer to :class:`CertRequest`: the origin's certificate (PEM), signed by
    the app run's CA."""

    cert_pem: bytes


@dataclass(frozen=True)
class Ready:
    """The work's process started; its origin service listens at ``url``."""

    url: str


@dataclass(frozen=True)
class PathAssigned:
    """During a run, the work assigned a Path of its own at ``rel``: ``stop()`` of a run that
    never returns still persists it."""

    rel: str


@dataclass(frozen=True)
class Done:
    """The run returned ``result``, leaving the work's public ``state``."""

    state: dict[str, Any]
    result: Any


@dataclass(frozen=True)
class Failed:
    """The run (or the start) failed: the error as one line and its traceback."""

    message: str
    traceback: str = ""


@dataclass(frozen=True)
class Stopped:
    """The work stopped (after a Stop, or when ``stop()`` ended it); persist errors, one line each."""

    persist_errors: list[str] = field(default_factory=list)


#: What the flow's end waits for at the end of a run.
RunEnd = Done | Failed | Stopped
