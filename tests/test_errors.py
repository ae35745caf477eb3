"""The error tree (docs/design.md, "Errors"): one base per package, the builtin a user
catches, ``where`` and ``errno`` on every error, and pickling with every field (errors cross
the pipe between a work's process and the flow's). ``Path.get`` turns a cas error into a
transfer error that is still that cas error.
"""

from __future__ import annotations

import errno
import importlib
import inspect
import pickle
import pkgutil
from collections.abc import Iterator
from pathlib import Path as FsPath

import pytest

from cas.errors import (
    BadRefNameError,
    BadStoreUrlError,
    CasError,
    ChunkCorruptError,
    ChunkError,
    ChunkNotFoundError,
    FileChangedError,
    GcError,
    LocatedError,
    ManifestError,
    MaterializeError,
    SnapshotError,
    StoreBusyError,
    StoreError,
    UnsafePathError,
    UnsupportedVersionError,
)
from cas.store.s3.bucket import S3AccessDeniedError
from cas.workspace import Workspace
from pathapi import Path
from pathapi.artifacts import ArtifactStore, SubPathError
from pathapi.cli import UsageError
from pathapi.runtime.context import WorkContext, current, set_current
from pathapi.errors import (
    AuthenticationError,
    DriveAmbiguousError,
    DriveDuplicateError,
    DriveFileNotFoundError,
    DriveNameError,
    DriveTimeoutError,
    ClusterError,
    LitPathError,
    OlderVersionError,
    OriginError,
    OriginTLSError,
    OriginUnreachableError,
    PathapiError,
    StaleManifestError,
    TlsError,
    TransferError,
    WorkError,
    transfer_error,
)
from pathapi.paths import PathOutsideRootError
from pathapi.ui.catalog import CatalogError, NotFoundError
from pathapi.ui.safetensors import NotSafetensorsError
from pathapi.version import Version

#: Every public error class and the builtins a user catches it by today: the contract. A new
#: error class fails test_every_public_error_class_is_listed until it is added here.
BUILTINS: dict[type[LocatedError], tuple[type[Exception], ...]] = {
    CasError: (),
    ManifestError: (ValueError,),
    UnsafePathError: (ValueError,),
    UnsupportedVersionError: (ValueError,),
    ChunkError: (),
    ChunkCorruptError: (ValueError,),
    ChunkNotFoundError: (FileNotFoundError, OSError),
    StoreError: (OSError,),
    BadStoreUrlError: (OSError, ValueError),
    BadRefNameError: (ValueError,),
    StoreBusyError: (OSError,),
    GcError: (OSError,),
    S3AccessDeniedError: (PermissionError, OSError),
    SnapshotError: (OSError,),
    FileChangedError: (OSError,),
    MaterializeError: (OSError,),
    PathapiError: (),
    WorkError: (RuntimeError,),
    OriginUnreachableError: (ConnectionError, OSError),
    ClusterError: (ConnectionError, OSError),
    OriginError: (OSError,),
    StaleManifestError: (OSError,),
    AuthenticationError: (PermissionError, OSError),
    OriginTLSError: (ConnectionError, OSError),
    TlsError: (ValueError,),
    OlderVersionError: (RuntimeError,),
    LitPathError: (ValueError,),
    TransferError: (),
    UsageError: (ValueError,),
    PathOutsideRootError: (ValueError,),
    SubPathError: (ValueError,),
    DriveNameError: (ValueError,),
    CatalogError: (ValueError,),
    NotFoundError: (LookupError, ValueError),
    NotSafetensorsError: (ValueError,),
    DriveDuplicateError: (FileExistsError, OSError),
    DriveAmbiguousError: (LookupError,),
    DriveFileNotFoundError: (FileNotFoundError, OSError),
    DriveTimeoutError: (FileNotFoundError, TimeoutError, OSError),
}
#: The older names of ``where``, kept for the code and users that read them.
ALIASES = {UnsafePathError: "path", SnapshotError: "path", MaterializeError: "path", StoreError: "location",
           OriginError: "work_name", OriginUnreachableError: "work_name", OlderVersionError: "work_name",
           WorkError: "work_name"}
CID = "ab" * 32


def public_error_classes(package: str) -> Iterator[type[BaseException]]:
    """The exception classes the modules of ``package`` define under a public name (but
    LocatedError, the machinery both bases share)."""
    root = importlib.import_module(package)
    for info in pkgutil.walk_packages(root.__path__, f"{package}."):
        if info.name.rsplit(".", 1)[-1] == "__main__":
            continue
        module = importlib.import_module(info.name)
        for name, obj in vars(module).items():
            if (inspect.isclass(obj) and issubclass(obj, BaseException) and obj.__module__ == info.name
                    and not name.startswith("_") and obj is not LocatedError):  # the shared machinery, never raised
                yield obj


def make(cls: type[LocatedError]) -> LocatedError:
    """An instance with every field set (``errno`` only where an OS error applies)."""
    if cls is WorkError:
        return WorkError("root.w", "boom", "Traceback (most recent call last):\n  ...")
    if issubclass(cls, ChunkError):
        return cls("chunk ab.. is bad", CID, where="/store", errno=errno.EIO)
    return cls(f"{cls.__name__} at /some/where", "/some/where", errno=errno.EIO)


def fields(e: BaseException) -> dict[str, object]:
    return {"type": type(e), "args": e.args, "str": str(e), "where": getattr(e, "where", "-"),
            "errno": getattr(e, "errno", "-"), "dict": dict(vars(e))}


@pytest.mark.parametrize("package, base", [("cas", CasError), ("pathapi", PathapiError)])
def test_every_public_error_class_has_its_package_base(package: str, base: type[LocatedError]) -> None:
    classes = list(public_error_classes(package))
    assert classes
    assert [c.__name__ for c in classes if not issubclass(c, base)] == []


def test_every_public_error_class_is_listed() -> None:
    found = {*public_error_classes("cas"), *public_error_classes("pathapi")}
    assert found == set(BUILTINS), f"new: {found - set(BUILTINS)}, gone: {set(BUILTINS) - found}"


@pytest.mark.parametrize("cls", list(BUILTINS), ids=lambda c: c.__name__)
def test_each_error_subclasses_the_builtin_a_user_catches(cls: type[LocatedError]) -> None:
    e = make(cls)
    for builtin in BUILTINS[cls]:
        assert isinstance(e, builtin), f"{cls.__name__} is no longer a {builtin.__name__}"
    concrete = cls not in (CasError, ChunkError, PathapiError, TransferError)
    assert not concrete or BUILTINS[cls], f"{cls.__name__} subclasses no builtin a user could catch"


@pytest.mark.parametrize("cls", list(BUILTINS), ids=lambda c: c.__name__)
def test_each_error_carries_where_and_errno_and_says_its_message(cls: type[LocatedError]) -> None:
    e = make(cls)
    if cls is WorkError:
        assert (e.where, e.errno) == ("root.w", None)
        assert str(e).startswith("work 'root.w' failed: boom") and "--- traceback in root.w ---" in str(e)
    else:
        assert (e.where, e.errno) == (("/store" if issubclass(cls, ChunkError) else "/some/where"), errno.EIO)
        assert str(e) == e.args[0]  # the message, never OSError's "[Errno 5] ..." form
    if cls in ALIASES:
        assert getattr(e, ALIASES[cls]) == e.where
    if issubclass(cls, ChunkError):
        assert e.chunk_id == CID


@pytest.mark.parametrize("cls", list(BUILTINS), ids=lambda c: c.__name__)
def test_each_error_survives_pickle_with_its_fields(cls: type[LocatedError]) -> None:
    e = make(cls) if cls is not TransferError else transfer_error(make(StoreError), "root.src", "d", "/w/d")
    back = pickle.loads(pickle.dumps(e))
    assert fields(back) == fields(e)


def test_an_error_without_errno_pickles_with_none() -> None:
    back = pickle.loads(pickle.dumps(StoreError("store gone", "s3://b/p")))
    assert (back.errno, back.location, str(back)) == (None, "s3://b/p", "store gone")


@pytest.mark.parametrize("cls", [c for c in BUILTINS if issubclass(c, CasError) and c is not CasError],
                         ids=lambda c: c.__name__)
def test_a_transfer_error_is_still_the_cas_error_it_wraps(cls: type[CasError]) -> None:
    inner = make(cls)
    e = transfer_error(inner, "root.src", "ckpt", "/works/root.dst/ckpt")
    assert isinstance(e, TransferError) and isinstance(e, PathapiError)
    assert isinstance(e, cls) and isinstance(e, CasError)
    for builtin in BUILTINS[cls]:
        assert isinstance(e, builtin)
    assert type(e).__name__ == cls.__name__  # "MaterializeError: ..." in a WorkError's message
    assert (e.where, e.errno) == (inner.where, inner.errno)
    assert (e.work_name, e.rel, e.dest) == ("root.src", "ckpt", "/works/root.dst/ckpt")
    assert str(e) == f"the get of 'ckpt' from work 'root.src' failed: {inner}"
    assert transfer_error(e, "root.other", "x", "/y") is e
    back = pickle.loads(pickle.dumps(e))
    assert fields(back) == fields(e) and type(back) is type(e)


def test_path_get_raises_a_transfer_error_for_a_cas_error(tmp_path: FsPath) -> None:
    """The consumer's destination cannot be made (a file stands where its folder goes): the
    MaterializeError of the sync reaches the user as a TransferError naming the get."""
    src = tmp_path / "src" / "ckpt"
    src.mkdir(parents=True)
    (src / "weights.bin").write_bytes(b"w" * 1000)
    root = tmp_path / "works" / "root.dst"
    root.mkdir(parents=True)
    (root / "sub").write_bytes(b"a file where the folder sub/ must be")
    artifacts = ArtifactStore.open(None, tmp_path)
    with Workspace(tmp_path / "state" / "src") as ws_src:
        artifacts.persist("root.src", "sub/ckpt", str(src), ws_src, version=Version(1, 1, Version.ENDED))
    workspace = Workspace(tmp_path / "state" / "dst")
    previous = current()
    set_current(WorkContext("root.dst", str(root), workspace, artifacts, "secret", 10.0, in_run=True))
    try:
        with pytest.raises(MaterializeError) as info:
            Path("sub/ckpt", origin="root.src", consumer="root.dst").get()
    finally:
        set_current(previous)
        workspace.close()
        artifacts.close()
    e = info.value
    assert isinstance(e, TransferError) and isinstance(e, OSError)
    assert e.errno == errno.ENOTDIR and e.work_name == "root.src" and e.dest == str(root / "sub" / "ckpt")
    assert "the get of 'sub/ckpt' from work 'root.src' failed" in str(e) and str(root / "sub") in str(e)
    assert isinstance(e.__cause__, MaterializeError) and not isinstance(e.__cause__, TransferError)
