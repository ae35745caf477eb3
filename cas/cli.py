"""The ``cas`` command: snapshot, store, sync, and the round-trip demo.

Guarantees: ``cas push`` writes a manifest only once every chunk it names is in the store
(a file that changes between the snapshot and the read of its chunks makes it snapshot
again, then refuse), and writes it atomically (a temporary file renamed over MANIFEST).
``cas sync`` reads an existing store only: a missing or foreign folder is refused, never
created empty. Errors end in one line, ``cas: error: <what, where>``, exit code 1
(130 after Ctrl-C); ``--debug`` prints the traceback too.
"""

from __future__ import annotations

import argparse
import os
import secrets
import sys
import traceback
from pathlib import Path

from .errors import CasError, FileChangedError, ManifestError, StoreError
from .fsutil import fsync_dir
from .hashing import ChunkId
from .manifest import Manifest
from .sources import SeedSource
from .store.base import ChunkStore
from .store.local import LocalChunkStore
from .workspace import Workspace

PUSH_ATTEMPTS = 3
PUSH_BATCH = 64 << 20  # bytes of chunks handed to the store at once (put_many holds a batch in memory)
EXIT_ERROR = 1
EXIT_INTERRUPTED = 130


def push_tree(ws: Workspace, store: ChunkStore, path: str | os.PathLike[str], *,
              attempts: int = PUSH_ATTEMPTS) -> tuple[Manifest, int]:
    """Snapshot ``path`` and store every chunk of it the store lacks; return the manifest
    and the number of chunks added.

    Guarantee: every chunk the returned manifest names is in ``store``. Chunks are read back
    from the files after the snapshot and verified; if a file changed in between (some
    chunk no longer matches: ``SeedSource.stale``) the tree is snapshotted again, up to
    ``attempts`` times, then :class:`FileChangedError` is raised and no manifest is returned.
    """
    added = 0
    for _ in range(attempts):
        m = ws.snapshot(path)
        ids = m.chunk_ids()
        missing = sorted(ids - store.has_many(ids))
        seed = SeedSource(m, path)
        added += _store_chunks(store, seed, missing, m.chunk_sizes())
        if not seed.stale:
            return m, added
    raise FileChangedError(
        f"{os.path.abspath(path)} kept changing while it was pushed ({attempts} snapshots, each changed before "
        "its chunks were stored): no manifest written; push again once nothing writes to it",
        os.fspath(path),
    )


def _store_chunks(store: ChunkStore, seed: SeedSource, ids: list[ChunkId], sizes: dict[ChunkId, int]) -> int:
    """Copy ``ids`` from ``seed`` into ``store`` in batches of about PUSH_BATCH bytes (a
    chunk that no longer verifies is skipped and lands in ``seed.stale``)."""
    added = 0
    batch: list[ChunkId] = []
    size = 0
    for cid in ids:
        batch.append(cid)
        size += sizes[cid]
        if size >= PUSH_BATCH:
            added += store.put_many(seed.get_many(batch))
            batch, size = [], 0
    if batch:
        added += store.put_many(seed.get_many(batch))
    return added


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


def open_existing_store(path: str | os.PathLike[str]) -> LocalChunkStore:
    """Open the chunk store at ``path`` for reading; StoreError if there is none there.

    Opening a LocalChunkStore creates one, which is right for a push; for a sync an empty
    new store would only turn a mistyped path into "chunk not found" errors later.
    """
    where = os.path.abspath(path)
    if not os.path.isdir(where):
        what = "no such folder" if not os.path.lexists(where) else "not a folder"
        raise StoreError(f"no chunk store at {where} ({what}): give the folder `cas push` stored the chunks in", where)
    if not os.path.isfile(os.path.join(where, "FORMAT")):
        raise StoreError(f"{where} is not a chunk store (it has no FORMAT file): give the folder `cas push` "
                         "stored the chunks in", where)
    return LocalChunkStore(where)


def _push(args: argparse.Namespace) -> None:
    with Workspace(args.state) as ws, LocalChunkStore(args.store) as store:
        m, added = push_tree(ws, store, args.path)
        write_manifest(args.manifest, m)
    print(f"{m.id.hex()}  {m.total_size} bytes, {len(m.entries)} entries, {added} new chunks")


def _sync(args: argparse.Namespace) -> None:
    m = read_manifest(args.manifest)
    with open_existing_store(args.store) as store, Workspace(args.state) as ws:
        r = ws.sync(m, args.dest, remote=store)
    print(f"{r.chunks_fetched} chunks ({r.bytes_fetched} bytes) fetched, {r.chunks_reused} reused, {r.seconds:.3f} s")


def _parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="cas", description="content-addressed snapshots and syncs of file trees")
    ap.add_argument("--debug", action="store_true", help="on an error, print the full traceback")
    sub = ap.add_subparsers(dest="cmd", required=True)
    d = sub.add_parser("demo", help="round trip on a generated checkpoint tree: first sync, edits, re-sync")
    d.add_argument("--size-mib", type=int, default=64)
    p = sub.add_parser("push", help="snapshot PATH, store its chunks in STORE, write the manifest to MANIFEST")
    p.add_argument("path")
    p.add_argument("store")
    p.add_argument("manifest")
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
            from . import demo  # here: demo imports push_tree from this module

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
