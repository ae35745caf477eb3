"""Exceptions raised by pathapi. One base class; each also subclasses the builtin users catch."""

from __future__ import annotations


class PathapiError(Exception):
    """Base class of every error raised by pathapi itself."""


class WorkError(PathapiError, RuntimeError):
    """A work's ``run`` raised: ``work_name`` names it, ``remote_traceback`` is its traceback."""

    def __init__(self, work_name: str, message: str, remote_traceback: str = "") -> None:
        super().__init__(f"work {work_name!r} failed: {message}")
        self.work_name = work_name
        self.remote_traceback = remote_traceback

    def __str__(self) -> str:
        base = super().__str__()
        return f"{base}\n\n--- traceback in {self.work_name} ---\n{self.remote_traceback}" if self.remote_traceback else base


class OriginUnreachableError(PathapiError, ConnectionError):
    """The work that owns a path could not be reached in time, and nothing was persisted for it."""

    def __init__(self, message: str, work_name: str | None = None) -> None:
        super().__init__(message)
        self.work_name = work_name

    def __str__(self) -> str:
        return str(self.args[0])


class OriginError(PathapiError, OSError):
    """The origin answered, but could not serve the request (it says why)."""

    def __init__(self, message: str, work_name: str | None = None) -> None:
        super().__init__(message)
        self.work_name = work_name

    def __str__(self) -> str:
        return str(self.args[0])


class StaleManifestError(OriginError):
    """A file changed at the origin after its manifest was taken; a new manifest is needed."""


class AuthenticationError(OriginError, PermissionError):
    """The origin refused the request: wrong or missing app secret."""


class OlderVersionError(PathapiError, RuntimeError):
    """A get could only have replaced this work's files by an older version of them (the
    origin is gone and its last persist predates them): nothing was changed."""

    def __init__(self, message: str, work_name: str | None = None) -> None:
        super().__init__(message)
        self.work_name = work_name

    def __str__(self) -> str:
        return str(self.args[0])


class LitPathError(PathapiError, ValueError):
    """A ``lit://`` string that does not name a place inside its work's root."""
