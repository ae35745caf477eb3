"""Exceptions raised by pathapi.

One base class, :class:`PathapiError`; each concrete error also subclasses the builtin a
user catches (``ConnectionError`` for an unreachable origin, ``PermissionError`` for a
refused secret, ...). Every error carries ``where`` (the work, or path, it is about) and
``errno``; storing them, ``str()`` and pickling are :class:`cas.errors.LocatedError`'s,
written once for both packages.

A ``Path.get`` that fails on a cas error raises a :class:`TransferError` built by
:func:`transfer_error`: it is still an instance of that cas error's class (and so of the
builtin it subclasses), and names the get it broke.
"""

from __future__ import annotations

from typing import Any

from cas.errors import CasError, LocatedError, restore


class PathapiError(LocatedError):
    """Base class of every error raised by pathapi itself."""


class _OfWork(LocatedError):
    """An error about one work; ``work_name`` is ``where``, the name it had first."""

    @property
    def work_name(self) -> str | None:
        return self.where


class WorkError(PathapiError, RuntimeError):
    """A work's ``run`` raised: ``work_name`` (and ``where``) names it, ``remote_traceback``
    is its traceback."""

    def __init__(self, work_name: str, message: str, remote_traceback: str = "") -> None:
        super().__init__(f"work {work_name!r} failed: {message}", work_name)
        self.work_name = work_name
        self.remote_traceback = remote_traceback

    def __str__(self) -> str:
        base = super().__str__()
        return f"{base}\n\n--- traceback in {self.work_name} ---\n{self.remote_traceback}" if self.remote_traceback else base


class OriginUnreachableError(PathapiError, _OfWork, ConnectionError):
    """The work that owns a path could not be reached in time, and nothing was persisted for it."""


class ClusterError(PathapiError, ConnectionError):
    """The cluster that runs the works cannot be reached, or went away while the app ran;
    ``where`` is the address tried."""


class OriginError(PathapiError, _OfWork, OSError):
    """The origin answered, but could not serve the request (it says why)."""


class StaleManifestError(OriginError):
    """A file changed at the origin after its manifest was taken; a new manifest is needed."""


class AuthenticationError(OriginError, PermissionError):
    """The origin refused the request: wrong or missing app secret."""


class OriginTLSError(OriginError, ConnectionError):
    """TLS with the origin failed: it does not speak TLS, or its certificate does not chain
    to this app run's CA, names another host, or is outside its validity window. Never
    answered by falling back to the artifacts: it means a misconfiguration or an impostor."""


class TlsError(PathapiError, ValueError):
    """A certificate or certificate request that the app run's TLS profile refuses."""


class OlderVersionError(PathapiError, _OfWork, RuntimeError):
    """A get could only have replaced this work's files by an older version of them (the
    origin is gone and its last persist predates them): nothing was changed."""


class LitPathError(PathapiError, ValueError):
    """A ``lit://`` string that does not name a place inside its work's root."""


class DriveNameError(LitPathError):
    """A Drive name that is not ``lit://`` followed by one plain name (no ``/``)."""


class DriveDuplicateError(PathapiError, FileExistsError):
    """A ``Drive.put`` refused: another component already put files at that path, and the
    Drive was made without ``allow_duplicates``. Nothing was changed."""


class DriveAmbiguousError(PathapiError, LookupError):
    """A ``Drive.get`` matched the files of several components: name one (``component_name``)."""


class DriveFileNotFoundError(PathapiError, FileNotFoundError):
    """The Drive holds nothing at that path (for that component, or put by this work)."""


class DriveTimeoutError(DriveFileNotFoundError, TimeoutError):
    """``Drive.get(timeout=...)``: nothing appeared at that path before the timeout."""


class TransferError(PathapiError):
    """A ``Path.get`` failed on an error of cas (a store, a manifest, the materialize).

    Raised only as the class :func:`transfer_error` makes for that cas error, which is also
    a subclass of the cas error's class: ``except MaterializeError`` or ``except OSError``
    catch it as before. ``where`` and ``errno`` (and ``chunk_id``...) are the cas error's;
    ``work_name`` is the origin work, ``rel`` the Path, ``dest`` the local destination; the
    cas error itself is ``__cause__``.
    """

    #: the cas class this transfer error class stands for
    wrapped: type[CasError] = CasError
    work_name: str
    rel: str
    dest: str

    def __reduce__(self) -> tuple[Any, ...]:  # its class is made at run time: rebuilt, not looked up
        return _restore_transfer, (self.wrapped, self.args, self.errno), self.__dict__


_TRANSFER_CLASSES: dict[type[CasError], type[TransferError]] = {}


def transfer_class(wrapped: type[CasError]) -> type[TransferError]:
    """The one :class:`TransferError` class standing for ``wrapped``; it keeps its name, so a
    message that says the error's type still says ``MaterializeError``."""
    known = _TRANSFER_CLASSES.get(wrapped)
    if known is not None:
        return known
    made = type(wrapped.__name__, (TransferError, wrapped), {
        "wrapped": wrapped, "__module__": __name__, "__qualname__": f"TransferError[{wrapped.__qualname__}]",
        "__doc__": f"A get failed on a {wrapped.__name__}: {wrapped.__doc__ or ''}",
    })
    return _TRANSFER_CLASSES.setdefault(wrapped, made)  # two threads making one: both get the first


def _restore_transfer(wrapped: type[CasError], args: tuple[Any, ...], errno: int | None) -> TransferError:
    return restore(transfer_class(wrapped), args, errno)


def transfer_error(e: CasError, work_name: str, rel: str, dest: str) -> TransferError:
    """``e``, met by the get of ``rel`` from the work ``work_name`` into ``dest``, as the
    transfer error a user sees: the same message after the get it broke, the same fields."""
    if isinstance(e, TransferError):  # already names its get
        return e
    err = restore(transfer_class(type(e)), (f"the get of {rel!r} from work {work_name!r} failed: {e}",), e.errno)
    err.__dict__.update(e.__dict__)
    err.work_name, err.rel, err.dest = work_name, rel, dest
    return err
