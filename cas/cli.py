"""The ``cas`` command: snapshot, store, sync, and the round-trip demo."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from . import demo
from .errors import CasError
from .manifest import Manifest
from .sources import SeedSource
from .store.local import LocalChunkStore
from .workspace import Workspace


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="cas", description="content-addressed snapshots and syncs of file trees")
    sub = ap.add_subparsers(dest="cmd", required=True)
    d = sub.add_parser("demo", help="round trip on a generated checkpoint tree: first sync, edits, re-sync")
    d.add_argument("--size-mib", type=int, default=64)
    p = sub.add_parser("push", help="snapshot PATH, store its chunks in STORE, write the manifest to MANIFEST")
    p.add_argument("path")
    p.add_argument("store")
    p.add_argument("manifest")
    s = sub.add_parser("sync", help="make DEST equal to MANIFEST, with chunks from STORE")
    s.add_argument("manifest")
    s.add_argument("store")
    s.add_argument("dest")
    for q in (p, s):
        q.add_argument("--state", default=".cas", help="state folder (stat cache, journal); default ./.cas")
    args = ap.parse_args(argv)
    try:
        if args.cmd == "demo":
            demo.run(size=args.size_mib << 20)
        elif args.cmd == "push":
            with Workspace(args.state) as ws, LocalChunkStore(args.store) as store:
                m = ws.snapshot(args.path)
                missing = m.chunk_ids() - store.has_many(m.chunk_ids())
                added = store.put_many(SeedSource(m, args.path).get_many(sorted(missing)))
                Path(args.manifest).write_bytes(m.encode())
                print(f"{m.id.hex()}  {m.total_size} bytes, {len(m.entries)} entries, {added} new chunks")
        elif args.cmd == "sync":
            m = Manifest.decode(Path(args.manifest).read_bytes())
            with Workspace(args.state) as ws, LocalChunkStore(args.store) as store:
                r = ws.sync(m, args.dest, remote=store)
                print(f"{r.chunks_fetched} chunks ({r.bytes_fetched} bytes) fetched, {r.chunks_reused} reused, {r.seconds:.3f} s")
    except (CasError, OSError) as e:
        print(f"cas: error: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
