"""The ``cas`` command: snapshot, store, sync, and the round-trip demo.

Guarantees: ``cas push`` is :meth:`cas.repository.Repository.push` (STORE is a repository:
a folder or ``s3://bucket/prefix``): it writes a manifest only once every chunk it names is in
the store, under a lease a garbage collection respects, and sets a ref to it so collections
keep those chunks (a file that changes between the snapshot and the read of its chunks
makes it snapshot again, then refuse). The manifest file is written atomically (a temporary
file renamed over MANIFEST). ``cas sync`` reads an existing store only: a missing or foreign
folder is refused, never created empty. Errors end in one line, ``cas: error: <what, where>``, exit code 1
(130 after Ctrl-C); ``--debug`` prints the traceback too.
"""

from __future__ import annotations

import argparse
import os
import secrets
import sys
import traceback
from pathlib import Path

from .errors import CasError, ManifestError
from .fsutil import fsync_dir
from .manifest import Manifest
from .repository import Repository
from .workspace import Workspace

EXIT_ERROR = 1
EXIT_INTERRUPTED = 130


def write_manifest(path: str | os.PathLike[str], m: Manifest) -> None:
    """Write ``m`` to ``path`` atomically and durably: a reader sees the old file or the
    whole new one, never a part (a temporary file, fsynced, renamed over ``path``)."""
    target = Path(path).absolute()
    tmp = target.with_name(f".{target.name}.{secrets.token_hex(4)}.tmp")
    try:
        with open(tmp, "xb") as f:
            f.write(m.encode())
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, target)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    fsync_dir(target.parent)


def read_manifest(path: str | os.PathLike[str]) -> Manifest:
    """The manifest in the file ``path``; ManifestError naming the file if it is not one."""
    try:
        data = Path(path).read_bytes()
    except OSError as e:
        raise ManifestError(f"cannot read manifest {os.path.abspath(path)}: {e.strerror or e}") from e
    try:
        return Manifest.decode(data)
    except ManifestError as e:
        raise type(e)(f"{os.path.abspath(path)} is not a valid manifest: {e}") from e


def default_ref(manifest: str | os.PathLike[str]) -> str:
    """The ref ``cas push`` sets when given none: named by the manifest file's absolute path,
    so two manifest files never share a ref (a shared one would let GC take the chunks of the
    file whose ref was replaced)."""
    return f"cas:{os.path.abspath(manifest)}"


def _push(args: argparse.Namespace) -> None:
    ref = args.ref or default_ref(args.manifest)
    with Workspace(args.state) as ws, Repository.open(args.store) as repo:
        pushed = repo.push(ref, args.path, ws)
        assert pushed is not None  # missing_ok is off: a missing PATH raised
        write_manifest(args.manifest, pushed.manifest)
    m = pushed.manifest
    print(f"{m.id.hex()}  {m.total_size} bytes, {len(m.entries)} entries, {pushed.added} new chunks")


def _sync(args: argparse.Namespace) -> None:
    m = read_manifest(args.manifest)
    with Repository.open(args.store, must_exist=True) as repo, Workspace(args.state) as ws:
        r = ws.sync(m, args.dest, remote=repo.chunks)
    print(f"{r.chunks_fetched} chunks ({r.bytes_fetched} bytes) fetched, {r.chunks_reused} reused, {r.seconds:.3f} s")


def _parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="cas", description="content-addressed snapshots and syncs of file trees")
    ap.add_argument("--debug", action="store_true", help="on an error, print the full traceback")
    sub = ap.add_subparsers(dest="cmd", required=True)
    d = sub.add_parser("demo", help="round trip on a generated checkpoint tree: first sync, edits, re-sync")
    d.add_argument("--size-mib", type=int, default=64)
    p = sub.add_parser("push", help="snapshot PATH, store its chunks in STORE (a folder or s3://bucket/prefix), "
                                    "name the tree by a ref there, write the manifest to MANIFEST")
    p.add_argument("path")
    p.add_argument("store")
    p.add_argument("manifest")
    p.add_argument("--ref", help="the ref naming the tree in STORE (keeps its chunks from garbage collection); "
                                 "default cas:<absolute path of MANIFEST>")
    s = sub.add_parser("sync", help="make DEST equal to MANIFEST, with chunks from STORE (an existing store)")
    s.add_argument("manifest")
    s.add_argument("store")
    s.add_argument("dest")
    for q in (p, s):
        q.add_argument("--state", default=".cas", help="state folder (stat cache, journal); default ./.cas")
    return ap


def main(argv: list[str] | None = None) -> int:
    """Run the command; return its exit code (errors reported in one line, never raised)."""
    args = _parser().parse_args(argv)
    try:
        if args.cmd == "demo":
            from . import demo  # here: the demo is not needed by other commands

            demo.run(size=args.size_mib << 20)
        elif args.cmd == "push":
            _push(args)
        elif args.cmd == "sync":
            _sync(args)
    except KeyboardInterrupt:
        if args.debug:
            traceback.print_exc(file=sys.stderr)
        print("cas: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
    except (CasError, OSError) as e:
        if args.debug:
            traceback.print_exc(file=sys.stderr)
        print(f"cas: error: {e}", file=sys.stderr)
        return EXIT_ERROR
    return 0


if __name__ == "__main__":
    sys.exit(main())
