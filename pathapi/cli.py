"""The ``pathapi`` command: ``pathapi run app.py``, ``pathapi demo``."""

from __future__ import annotations

import argparse
import importlib
import os
import sys

from . import demo
from .app import App


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
    args = ap.parse_args(argv)
    app = _load_app(args.file)
    if args.root is not None:
        app.root = os.path.abspath(args.root)
    if args.store is not None:
        app.store = args.store
    app.run()
    return 0


if __name__ == "__main__":
    sys.exit(main())
