"""``pathapi ls``, ``log``, ``diff``, ``cat``: the storage browser's data on a terminal.

Each view asks :mod:`.catalog` (the browser's query module) and prints text, or with
``--json`` the same data as one JSON document (the browser's ``/api`` answers hold the same
fields). ``cat`` writes a file's bytes to stdout (a folder as a tar), streamed from verified
chunks.
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

from ..transfer_log import human_bytes
from .catalog import Catalog, to_json
from .pages import when


def add_arguments(sub: Any, parents: list[argparse.ArgumentParser]) -> None:
    """The four sub-commands, on ``pathapi``'s sub-parsers."""
    def common(p: argparse.ArgumentParser) -> None:
        p.add_argument("--root", default=None, help="app folder (default ./.pathapi)")
        p.add_argument("--store", default=None, help="artifact store: a folder or s3://bucket/prefix")
        p.add_argument("--json", action="store_true", help="print JSON instead of text")

    p = sub.add_parser("ls", parents=parents, help="works, their persisted Paths, and the files of a Path")
    p.add_argument("path", nargs="?", default=None, help="WORK, or WORK/PATH[/SUB] to list files")
    p.add_argument("-v", "--version", default=None, help="which version (1 = oldest kept, -1 = newest)")
    common(p)
    p = sub.add_parser("log", parents=parents, help="a Path's kept versions and the transfers of it")
    p.add_argument("path", help="WORK/PATH")
    common(p)
    p = sub.add_parser("diff", parents=parents, help="what changed between two versions of a Path")
    p.add_argument("path", help="WORK/PATH")
    p.add_argument("v1", nargs="?", default="-2", help="older version (default the one before the newest)")
    p.add_argument("v2", nargs="?", default="-1", help="newer version (default the newest)")
    common(p)
    p = sub.add_parser("cat", parents=parents, help="a stored file's bytes on stdout (a folder as a tar)")
    p.add_argument("path", help="WORK/PATH/FILE")
    p.add_argument("-v", "--version", default=None, help="which version (1 = oldest kept, -1 = newest)")
    common(p)


def run(args: argparse.Namespace) -> int:
    with Catalog.open(args.root, args.store) as cat:
        view = {"ls": ls, "log": log, "diff": diff, "cat": cat_file}[args.cmd]
        return view(cat, args)


def _print_json(data: Any) -> None:
    json.dump(to_json(data), sys.stdout, indent=1, ensure_ascii=False)
    sys.stdout.write("\n")


def _rows(rows: list[list[str]]) -> None:
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    for r in rows:
        print("  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip())


def ls(cat: Catalog, args: argparse.Namespace) -> int:
    spec = args.path.strip("/") if args.path else ""
    if "/" not in spec:
        works = [w for w in cat.works() if not spec or w.name == spec]
        if spec and not works:
            cat.resolve(spec)  # raises the error naming the works there are
        if args.json:
            _print_json({"store": cat.location, "works": works, "drives": [] if spec else cat.drives()})
            return 0
        for w in works:
            print(w.name)
            rows = [["  " + p.path, p.kind, human_bytes(p.size), f"{p.files} files", f"{p.chunks} chunks",
                     f"{p.versions} versions", when(p.last_change)] for p in w.paths]
            _rows(rows)
        if not works:
            print(f"nothing persisted in {cat.location}")
        return 0
    t = cat.resolve(spec, args.version)
    prefix = t.sub + "/" if t.sub else ""
    nodes: list[dict[str, Any]] = [{"path": prefix + e.path if e.path else t.sub, "kind": e.kind.name.lower(), "size": e.size,
              "mode": "" if e.kind.name == "SYMLINK" else f"{e.perm:04o}", "chunks": e.chunk_count, "target": e.target}
             for e in t.tree.entries]
    if args.json:
        _print_json({"work": t.work, "path": t.path, "sub": t.sub, "version": t.version, "entries": nodes})
        return 0
    rows = [[n["mode"] or "link", human_bytes(n["size"]) if n["kind"] == "file" else "-",
             n["path"] + ("/" if n["kind"] == "dir" else "") + (f" -> {n['target']}" if n["target"] else "")]
            for n in nodes]
    if rows:
        _rows(rows)
    return 0


def log(cat: Catalog, args: argparse.Namespace) -> int:
    t = cat.resolve(args.path)
    versions = cat.versions(t.work, t.path)
    transfers = cat.transfers(t.work, t.path)
    if args.json:
        _print_json({"work": t.work, "path": t.path, "versions": versions, "transfers": transfers})
        return 0
    print(f"{t.work}/{t.path}: {len(versions)} version(s) kept")
    _rows([[f"  #{v.number}", v.version, f"run {v.run}", f"persisted {when(v.persisted)}", f"{v.files} files",
            human_bytes(v.size), f"+{v.new_chunks} chunks ({human_bytes(v.new_bytes)})",
            v.manifest_id[:12] + (" (current)" if v.current else "")] for v in versions])
    print(f"transfers: {len(transfers)}")
    if transfers:
        _rows([[f"  {when(r.get('at'), seconds=True)}", str(r.get("consumer")), f"from {r.get('source')}",
                str(r.get("path")), f"moved {r.get('chunks_transferred')} chunks ({human_bytes(r.get('bytes_transferred') or 0)})",
                f"reused {r.get('chunks_reused')} chunks ({human_bytes(r.get('bytes_reused') or 0)})",
                f"{float(r.get('seconds') or 0):.2f} s"] for r in transfers])
    return 0


def diff(cat: Catalog, args: argparse.Namespace) -> int:
    t = cat.resolve(args.path)
    d = cat.diff(t.work, t.path, args.v1, args.v2)
    if args.json:
        _print_json(d)
        return 0
    print(f"{d.work}/{d.path}: version {d.a.number} ({d.a.version}) -> {d.b.number} ({d.b.version}): "
          f"{len(d.changes)} changed paths, {d.unchanged} unchanged, {d.chunks_added} new chunks "
          f"({human_bytes(d.bytes_added)})")
    sign = {"added": "+", "removed": "-", "changed": "~"}
    for c in d.changes:
        print(f"{sign[c.status]} {c.path}  {human_bytes(c.old_size)} -> {human_bytes(c.new_size)}  "
              f"+{c.chunks_added} chunks ({human_bytes(c.bytes_added)}) -{c.chunks_removed} chunks "
              f"({human_bytes(c.bytes_removed)}){'  ' + c.note if c.note else ''}")
        for x in c.tensors or []:
            if x.status != "same":
                print(f"    {sign.get(x.status, '~')} tensor {x.name} {x.dtype} {list(x.shape)}: "
                      f"{human_bytes(x.changed_bytes)} of {human_bytes(x.size)} differ {x.note}".rstrip())
    return 0


def cat_file(cat: Catalog, args: argparse.Namespace) -> int:
    t = cat.resolve(args.path, args.version)
    if args.json:
        if t.entry is None:
            _print_json({"work": t.work, "path": t.path, "sub": t.sub, "kind": "dir",
                         "entries": [e.path for e in t.tree.entries]})
        else:
            _print_json({"work": t.work, "path": t.path, "sub": t.sub, "version": t.version,
                         "preview": cat.preview(t)})
        return 0
    out = sys.stdout.buffer
    if t.entry is not None:
        for data in cat.iter_file(t.entry):
            out.write(data)
    else:
        def write(data: bytes) -> None:
            out.write(data)

        cat.write_tar(t, write)
    out.flush()
    return 0
