"""The ``pathapi`` command: ``pathapi run app.py``, ``pathapi demo``, ``pathapi gc``."""

from __future__ import annotations

import argparse
import importlib
import os
import sys

from cas.errors import CasError, StoreBusyError

from . import demo
from .app import App
from .artifacts import ArtifactStore


def _load_app(path: str) -> App:
    """Import ``path`` as a module (by its name, from its folder, so work processes can
    import it too) and return its ``app``."""
    path = os.path.abspath(path)
    folder, name = os.path.split(path)
    sys.path.insert(0, folder)
    module = importlib.import_module(os.path.splitext(name)[0])
    app = getattr(module, "app", None)
    if not isinstance(app, App):
        raise SystemExit(f"pathapi: {path} defines no `app = App(...)`")
    return app


def _gc(args: argparse.Namespace) -> int:
    if args.store is None and not os.path.isdir(os.path.join(args.root, "artifacts")):
        print(f"pathapi gc: no artifact store under {os.path.abspath(args.root)} (give --root or --store)", file=sys.stderr)
        return 2
    try:
        store = ArtifactStore.open(args.store, os.path.abspath(args.root))
    except (CasError, ValueError) as e:
        print(f"pathapi gc: {e}", file=sys.stderr)
        return 2
    try:
        report = store.gc(dry_run=args.dry_run, min_garbage=args.min_garbage)
    except StoreBusyError as e:
        print(f"pathapi gc: {e}", file=sys.stderr)
        return 75  # EX_TEMPFAIL: try again later
    except CasError as e:
        print(f"pathapi gc: {e}", file=sys.stderr)
        return 1
    finally:
        store.close()
    print(f"pathapi gc {store.location}: {report}")
    return 0


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["demo"]:
        demo.main(argv[1:])
        return 0
    ap = argparse.ArgumentParser(prog="pathapi", description="run apps of works that share files by lit:// paths")
    sub = ap.add_subparsers(dest="cmd", required=True)
    r = sub.add_parser("run", help="run the `app` defined in a Python file")
    r.add_argument("file")
    r.add_argument("--root", default=None, help="app folder (default ./.pathapi)")
    r.add_argument("--store", default=None, help="artifact store (default a folder under the app folder)")
    sub.add_parser("demo", help="the checkpoint-sharing example, end to end")
    g = sub.add_parser("gc", help="delete stored chunks that no persisted manifest names, reclaim their space")
    g.add_argument("--root", default=".pathapi", help="app folder (default ./.pathapi)")
    g.add_argument("--store", default=None, help="artifact store (default a folder under the app folder)")
    g.add_argument("--dry-run", action="store_true", help="count what would be deleted, delete nothing")
    g.add_argument("--min-garbage", type=float, default=0.2,
                   help="rewrite a local pack once this fraction of it is garbage (default 0.2; 0 reclaims all)")
    args = ap.parse_args(argv)
    if args.cmd == "gc":
        return _gc(args)
    app = _load_app(args.file)
    if args.root is not None:
        app.root = os.path.abspath(args.root)
    if args.store is not None:
        app.store = args.store
    app.run()
    return 0


if __name__ == "__main__":
    sys.exit(main())
