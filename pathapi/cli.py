"""The ``pathapi`` command: ``pathapi run app.py [--cluster ray]``, ``pathapi demo``, ``pathapi gc``,
and the views of what is stored: ``pathapi ui`` (the storage browser), ``ls``, ``log``, ``diff``,
``cat`` (:mod:`pathapi.ui`).

Errors a user can act on end the command with exactly one line on stderr,
``pathapi: <what failed, where, what to do>``, and a non-zero exit code: 1 for an error,
130 after Ctrl-C (SIGINT), 143 after SIGTERM. ``--debug`` (before or after the
sub-command) prints the full traceback too, a work's remote traceback included.
"""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import os
import signal
import sys
import threading
import traceback
from types import ModuleType

from cas.errors import BadStoreUrlError, CasError, StoreBusyError
from cas.repository import Repository

from . import demo
from .artifacts import ArtifactStore
from .errors import PathapiError, WorkError
from .runtime import app as app_module
from .runtime.app import App

EXIT_ERROR = 1
EXIT_USAGE = 2
EXIT_TEMPFAIL = 75  # EX_TEMPFAIL: try again later


class UsageError(PathapiError, ValueError):
    """An argument of the command line that cannot work (a missing app file, a store URL
    no store reads, a folder argument that names a file); the message says which and why."""


# -- loading the app file -------------------------------------------------------------------
def _load_app(path: str) -> App:
    """Import ``path`` as a module (by its name, from its folder, so work processes can
    import it too) and return its ``app``.

    Raises UsageError for a path that is no Python file, a file whose module name another
    module already holds, or a module without ``app``; a SyntaxError or any exception the
    module raises while it is imported propagates (the caller reports where).
    """
    path = os.path.abspath(path)
    _check_app_file(path)
    folder, base = os.path.split(path)
    name = os.path.splitext(base)[0]
    if not name.isidentifier():
        raise UsageError(f"{path}: {name!r} is not a valid Python module name (the works import the app by it); "
                         "rename the file, e.g. to app.py")
    sys.path.insert(0, folder)
    module = importlib.import_module(name)
    _check_module_is(module, path)
    app = getattr(module, "app", None)
    if not isinstance(app, App):
        raise UsageError(f"{path} defines no `app = App(...)`")
    return app


def _check_app_file(path: str) -> None:
    """The app file must exist and be a file (otherwise the import reports a confusing
    "No module named ..." or imports a package of the same name)."""
    if not os.path.lexists(path):
        raise UsageError(f"no such file: {path} (give the Python file that defines `app = App(...)`)")
    if not os.path.isfile(path):
        raise UsageError(f"{path} is not a file (give the Python file that defines `app = App(...)`)")


def _check_module_is(module: ModuleType, path: str) -> None:
    """An app file named like a module imported already (``json.py``, ``cas.py``) would be
    shadowed by it, here and in every work process: say so instead of "defines no app"."""
    got = getattr(module, "__file__", None)
    if got is None or os.path.realpath(got) != os.path.realpath(path):
        raise UsageError(f"{path} cannot be imported as module {module.__name__!r}: that name is taken by "
                         f"{got or 'a built-in module'}; rename the app file")


# -- checking the other arguments before any work starts -------------------------------------
def _check_folder_arg(flag: str, value: str) -> str:
    """The absolute path of a folder argument (created later if missing). UsageError if a
    file is where it, or one of the folders above it, must go: ``os.makedirs`` would fail
    only after the works started, with a bare "File exists"."""
    path = os.path.abspath(value)
    probe = path
    while not os.path.lexists(probe):
        probe = os.path.dirname(probe)
    if not os.path.isdir(probe):
        where = "it" if probe == path else f"{probe}, on its way,"
        raise UsageError(f"{flag} {value}: {where} is a file, not a folder; give a folder (it is created if missing)")
    return path


def _store_arg(value: str, flag: str = "--store") -> str:
    """The store URL to hand to the app: a local folder made absolute (the works resolve
    paths from their own folders, so a relative ``--store`` would give each work a store of
    its own). UsageError, before any work starts, for a URL no store reads (each work would
    fail to start with it, reporting the same error once per work)."""
    try:
        url = Repository.resolve_url(value)
    except BadStoreUrlError as e:
        raise UsageError(f"{flag} {e}") from None  # the message starts with the URL
    if url.startswith("s3://"):
        if importlib.util.find_spec("boto3") is None:
            raise UsageError(f"{flag} {value}: s3:// stores need boto3, which is not installed: pip install 'pathapi[s3]'")
        return url
    return _check_folder_arg(flag, url)


# -- sub-commands ---------------------------------------------------------------------------
def _run(args: argparse.Namespace) -> int:
    root = _check_folder_arg("--root", args.root) if args.root is not None else None
    store = _store_arg(args.store) if args.store is not None else None
    app = _load_app(args.file)
    if root is not None:
        app.root = root
    else:
        _check_folder_arg("the app folder", app.root)
    if store is not None:
        app.store = store
        app.store_shared = False
    elif app.store is not None:
        app.store = _store_arg(app.store, "the app's store")
    app.report_transfers = not args.quiet
    if args.cluster is not None:
        try:
            app.use_cluster(args.cluster)
        except (ValueError, ImportError) as e:
            raise UsageError(f"--cluster {args.cluster}: {e}") from None
    app.run()
    return 0


def _views(args: argparse.Namespace) -> int:
    """``ui``, ``ls``, ``log``, ``diff``, ``cat``: read-only views of an app's store."""
    from .ui import views
    from .ui.catalog import Catalog, CatalogError

    if args.store is not None:
        args.store = _store_arg(args.store)
    try:
        if args.cmd == "ui":
            from .ui.server import serve

            serve(Catalog.open(args.root, args.store), args.port, announce=lambda url: print(url, flush=True))
            return 0
        return views.run(args)
    except CatalogError as e:
        print(f"pathapi {args.cmd}: {e}", file=sys.stderr)
        return EXIT_ERROR
    except BrokenPipeError:  # `pathapi cat ... | head`
        return 0


def _gc(args: argparse.Namespace) -> int:
    if args.store is None and not os.path.isdir(os.path.join(args.root, "artifacts")):
        print(f"pathapi gc: no artifact store under {os.path.abspath(args.root)} (give --root or --store)", file=sys.stderr)
        return EXIT_USAGE
    try:
        store = ArtifactStore.open(args.store, os.path.abspath(args.root))
    except (CasError, ValueError) as e:
        print(f"pathapi gc: {e}", file=sys.stderr)
        return EXIT_USAGE
    try:
        report = store.gc(dry_run=args.dry_run, min_garbage=args.min_garbage)
    except StoreBusyError as e:
        print(f"pathapi gc: {e}", file=sys.stderr)
        return EXIT_TEMPFAIL
    except CasError as e:
        print(f"pathapi gc: {e}", file=sys.stderr)
        return EXIT_ERROR
    finally:
        store.close()
    print(f"pathapi gc {store.location}: {report}")
    return 0


def _parser() -> argparse.ArgumentParser:
    # --debug is accepted before and after the sub-command; SUPPRESS keeps a sub-parser's
    # default from overwriting a --debug given before it.
    debug = argparse.ArgumentParser(add_help=False)
    debug.add_argument("--debug", action="store_true", default=argparse.SUPPRESS,
                       help="on an error, print the full traceback (the work's too)")
    ap = argparse.ArgumentParser(prog="pathapi", description="run apps of works that share files by lit:// paths")
    ap.add_argument("--debug", action="store_true", help="on an error, print the full traceback (the work's too)")
    sub = ap.add_subparsers(dest="cmd", required=True)
    r = sub.add_parser("run", parents=[debug], help="run the `app` defined in a Python file")
    r.add_argument("file")
    r.add_argument("--root", default=None, help="app folder (default ./.pathapi)")
    r.add_argument("--store", default=None, help="artifact store (default a folder under the app folder)")
    r.add_argument("--cluster", default=None,
                   help="where works run: local (processes here, the default), ray (the Ray cluster RAY_ADDRESS "
                        "names, or the one `ray start` started here) or ray://HOST:PORT; a cluster needs --store s3://...")
    r.add_argument("-q", "--quiet", action="store_true", help="print no line per transfer")
    u = sub.add_parser("ui", parents=[debug], help="serve a read-only storage browser on 127.0.0.1 (prints its URL)")
    u.add_argument("--root", default=None, help="app folder (default ./.pathapi)")
    u.add_argument("--store", default=None, help="artifact store: a folder or s3://bucket/prefix")
    u.add_argument("--port", type=int, default=0, help="port on 127.0.0.1 (default: a free one)")
    from .ui import views

    views.add_arguments(sub, [debug])
    d = sub.add_parser("demo", parents=[debug], help="the checkpoint-sharing example, end to end")
    demo.add_arguments(d)
    g = sub.add_parser("gc", parents=[debug], help="delete stored chunks that no persisted manifest names, reclaim their space")
    g.add_argument("--root", default=".pathapi", help="app folder (default ./.pathapi)")
    g.add_argument("--store", default=None, help="artifact store (default a folder under the app folder)")
    g.add_argument("--dry-run", action="store_true", help="count what would be deleted, delete nothing")
    g.add_argument("--min-garbage", type=float, default=0.2,
                   help="rewrite a local pack once this fraction of it is garbage (default 0.2; 0 reclaims all)")
    return ap


def _dispatch(args: argparse.Namespace) -> int:
    if args.cmd == "gc":
        return _gc(args)
    if args.cmd in ("ui", "ls", "log", "diff", "cat"):
        return _views(args)
    if args.cmd == "demo":
        if args.root is not None:
            _check_folder_arg("--root", args.root)
        if args.store is not None:
            args.store = _store_arg(args.store)
        demo.run(args)
        return 0
    return _run(args)


# -- reporting ------------------------------------------------------------------------------
def _where(e: BaseException) -> str | None:
    """``file:line`` of the innermost frame of ``e``'s traceback outside Python's import
    machinery, or None without a traceback."""
    frames = [f for f in traceback.extract_tb(e.__traceback__) if not f.filename.startswith("<frozen")]
    return f"{frames[-1].filename}:{frames[-1].lineno}" if frames else None


def describe(e: BaseException) -> str:
    """One line saying what failed and where, for an exception that ended the command."""
    if isinstance(e, SyntaxError):
        where = f"{e.filename}:{e.lineno}" if e.filename else "the app file"
        return f"{where}: {type(e).__name__}: {e.msg}"
    if isinstance(e, WorkError):
        return str(e.args[0])  # "work 'root.x' failed: ValueError: ..." (str() adds the traceback)
    if isinstance(e, (UsageError, PathapiError, CasError)):
        return str(e)
    message = f"{type(e).__name__}: {e}" if str(e) else type(e).__name__
    if isinstance(e, OSError):
        return message
    at = _where(e)
    return f"{message} (at {at})" if at else message


def _report(e: BaseException, debug: bool) -> None:
    """The one line on stderr; with ``debug`` the local traceback first (a WorkError's
    message carries the work's remote traceback there)."""
    if debug:
        traceback.print_exception(e, file=sys.stderr)
    hint = "" if debug or isinstance(e, (UsageError, SyntaxError)) else " [--debug shows the traceback]"
    print(f"pathapi: {describe(e)}{hint}", file=sys.stderr)


def interrupted_exit_code() -> int:
    """128 + the signal that interrupted the app (SIGTERM or SIGINT; SIGINT when unknown)."""
    signum = getattr(app_module, "INTERRUPTED_BY", None)
    return 128 + (signum if signum == signal.SIGTERM else signal.SIGINT)


_terminated = False  # SIGTERM arrived outside App.run (while the app file is imported, say)


def _on_sigterm(signum: int, frame: object) -> None:
    global _terminated
    _terminated = True
    raise KeyboardInterrupt(f"signal {signum}")


def main(argv: list[str] | None = None) -> int:
    """Run the command; return its exit code (errors reported, never raised).

    SIGTERM is handled as Ctrl-C is, for the whole command (``App.run`` installs its own
    handler while it runs, which also stops the works first): one line, exit code 143.
    """
    global _terminated
    argv = sys.argv[1:] if argv is None else argv
    args = _parser().parse_args(argv)
    debug = bool(getattr(args, "debug", False))
    _terminated = False
    in_main = threading.current_thread() is threading.main_thread()  # signal() works only there
    previous = signal.signal(signal.SIGTERM, _on_sigterm) if in_main else None
    try:
        return _dispatch(args)
    except KeyboardInterrupt:
        code = 128 + signal.SIGTERM if _terminated else interrupted_exit_code()
        if debug:
            traceback.print_exc(file=sys.stderr)
        print("pathapi: interrupted", file=sys.stderr)
        return code
    except Exception as e:  # noqa: BLE001 - every error ends in one readable line (SystemExit passes)
        _report(e, debug)
        return EXIT_ERROR
    finally:
        if in_main:
            signal.signal(signal.SIGTERM, previous)


if __name__ == "__main__":
    sys.exit(main())
