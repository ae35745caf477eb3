"""The storage browser's HTML: one function per page, from :mod:`.catalog` data.

Every string that comes from the store (work names, paths, file names, link targets,
previews, tensor names, notes) is attacker-controlled and goes through :func:`e` (HTML
escaping, quotes included) or :func:`href` (URL-encoded, then escaped); nothing is ever put
into a script or a style. Pages load one script and one style sheet from ``/static/`` and the
server's Content-Security-Policy allows nothing else, so even a missed escape could not run
inline script.
"""

from __future__ import annotations

import html
import time
from collections.abc import Iterable
from urllib.parse import urlencode

from ..transfer_log import human_bytes
from .catalog import Diff, FileChange, PathDetail, Preview, Target, TreeNode, WorkSummary


def e(value: object) -> str:
    """``value`` as text safe inside HTML elements and quoted attributes."""
    return html.escape(str(value), quote=True)


def href(page: str, **params: object) -> str:
    """An escaped link to ``page`` with ``params`` URL-encoded (None values left out)."""
    query = urlencode({k: str(v) for k, v in params.items() if v is not None})
    return e(f"{page}?{query}" if query else page)


def when(ns: int | float | None, *, seconds: bool = False) -> str:
    if ns is None:
        return "not recorded"
    t = float(ns) if seconds else ns / 1e9
    return time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(t))


def size(n: int | float | None) -> str:
    return human_bytes(n or 0)


def layout(title: str, body: str, crumbs: Iterable[tuple[str, str | None]] = (), location: str = "") -> str:
    nav = " / ".join(f'<a href="{link}">{e(label)}</a>' if link else e(label) for label, link in
                     [("Stored", "/"), *crumbs])
    return f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>{e(title)} — pathapi</title>
<meta name="viewport" content="width=device-width, initial-scale=1">
<link rel="stylesheet" href="/static/style.css"><script src="/static/app.js" defer></script></head>
<body><header><span class="brand">pathapi</span> <nav>{nav}</nav>
<span class="live" id="live" title="updates as gets and persists happen">live</span></header>
<main id="main"><h1>{e(title)}</h1>
{body}</main>
<footer>read-only view of <code>{e(location)}</code></footer></body></html>"""


def table(head: Iterable[str], rows: Iterable[Iterable[str]], cls: str = "", id_: str = "") -> str:
    """A table; ``rows`` hold HTML already escaped by the caller."""
    attrs = (f' class="{cls}"' if cls else "") + (f' id="{id_}"' if id_ else "")
    th = "".join(f"<th>{e(h)}</th>" for h in head)
    trs = "".join("<tr>" + "".join(f"<td>{c}</td>" for c in row) + "</tr>" for row in rows)
    return f"<table{attrs}><thead><tr>{th}</tr></thead><tbody>{trs}</tbody></table>"


# -- the landing page --------------------------------------------------------------------
def landing(works: list[WorkSummary], drives: list[dict[str, object]], location: str) -> str:
    if not works:
        body = '<p id="works" class="empty">Nothing is persisted here yet. Paths appear once a work\'s run returns.</p>'
    else:
        parts = ['<div id="works">']
        for w in works:
            rows = [[f'<a class="path-link" href="{href("/path", work=p.work, rel=p.path)}">{e(p.path)}</a>',
                     e(p.kind), e(size(p.size)), e(p.files), e(p.chunks), e(p.versions), e(when(p.last_change)),
                     e(p.consumers)] for p in w.paths]
            parts.append(f'<section class="work"><h2>{e(w.name)}</h2>'
                         + table(["Path", "kind", "size", "files", "chunks", "versions", "last change", "consumers"],
                                 rows, "paths") + "</section>")
        parts.append("</div>")
        body = "".join(parts)
    if drives:  # hook: Drive support fills Catalog.drives(); each row a name and its size
        body += '<section id="drives"><h2>Drives</h2>' + table(
            ["Drive", "files", "size"], [[e(d.get("name", "")), e(d.get("files", "")), e(size(d.get("size", 0)))]  # type: ignore[arg-type]
                                         for d in drives]) + "</section>"
    return layout("What is stored", body, location=location)


# -- a Path ------------------------------------------------------------------------------
def _tree_rows(d: PathDetail, nodes: list[TreeNode]) -> list[list[str]]:
    s = d.summary
    rows = []
    sizes: dict[str, int] = {}
    for n in nodes:
        if n.kind == "file":
            parts = n.path.split("/")
            for i in range(1, len(parts)):
                key = "/".join(parts[:i])
                sizes[key] = sizes.get(key, 0) + n.size
    for n in nodes:
        pad = "&nbsp;" * (4 * n.depth)
        if n.kind == "file":
            name = f'{pad}<a class="file-link" href="{href("/file", work=s.work, rel=s.path, f=n.path)}">{e(n.name)}</a>'
            action = f'<a href="{href("/download", work=s.work, rel=s.path, f=n.path)}" download>download</a>'
            shown = size(n.size)
        elif n.kind == "dir":
            name = f'{pad}<span class="dir">{e(n.name)}/</span>'
            action = f'<a href="{href("/download", work=s.work, rel=s.path, f=n.path)}" download>download .tar</a>'
            shown = size(sizes.get(n.path, 0))
        else:
            name = f'{pad}<span class="link">{e(n.name)}</span> → {e(n.target)}'
            action, shown = "", ""
        rows.append([name, e(shown), f"<code>{e(n.mode)}</code>", e(n.chunks if n.kind == "file" else ""), action])
    return rows


def path_page(d: PathDetail, location: str) -> str:
    s = d.summary
    whole = "download .tar" if s.kind == "dir" else "download"
    stats = (f'<p id="summary">{e(s.files)} files, {e(size(s.size))} in {e(s.chunks)} chunks · '
             f'{e(s.versions)} version(s) kept · last change {e(when(s.last_change))} · '
             f'<a id="download-all" href="{href("/download", work=s.work, rel=s.path)}" download>{whole}</a></p>'
             f'<p id="dedup">Dedup: {d.dedup:.2f}× in this version ({e(size(s.size))} of files in '
             f'{e(size(d.unique_bytes))} of distinct chunks); {d.dedup_history:.2f}× over the {e(len(d.versions))} kept '
             f'versions ({e(size(d.history_logical_bytes))} in {e(size(d.history_unique_bytes))}).</p>')
    tree = ("" if s.kind == "file" else
            "<h2>Files</h2>" + table(["name", "size", "mode", "chunks", ""], _tree_rows(d, d.tree), "tree", "tree"))
    vrows = [[e(v.number), f"<code>{e(v.version)}</code>", e(f"run {v.run}" + ("" if v.ended else " (in progress)")),
              e(when(v.app_run)), e(when(v.persisted)), e(v.files), e(size(v.size)),
              e(f"{v.new_chunks} ({size(v.new_bytes)})"), f"<code>{e(v.manifest_id[:12])}</code>",
              "current" if v.current else ""] for v in d.versions]
    versions = "<h2>Versions</h2>" + table(
        ["#", "version", "run", "app run started", "persisted", "files", "size", "new chunks", "manifest", ""],
        vrows, "versions", "versions")
    if len(d.versions) > 1:
        def options(selected: int) -> str:
            return "".join(f'<option value="{e(v.number)}"{" selected" if v.number == selected else ""}>'
                           f'{e(v.number)}: {e(v.version)}</option>' for v in d.versions)

        versions += (f'<form id="diff-form" action="/diff" method="get"><input type="hidden" name="work" value="{e(s.work)}">'
                     f'<input type="hidden" name="rel" value="{e(s.path)}">Compare <select name="a" id="diff-a">'
                     f'{options(d.versions[-2].number)}</select> with <select name="b" id="diff-b">'
                     f'{options(d.versions[-1].number)}</select> <button type="submit" id="diff-go">diff</button></form>')
    trows = [[e(t.get("consumer", "")), e(when(t.get("at"), seconds=True)), e(t.get("source", "")),
              e(t.get("path", "")), e(f"{t.get('chunks_transferred', 0)} chunks, {size(t.get('bytes_transferred'))}"),
              e(f"{t.get('chunks_reused', 0)} chunks, {size(t.get('bytes_reused'))}"),
              e(f"{float(t.get('seconds') or 0):.2f} s"), e(t.get("note") or "")] for t in reversed(d.transfers)]
    transfers = "<h2>Transfers</h2>" + (
        table(["who got it", "when", "from", "path", "moved", "reused", "took", "note"], trows, "transfers", "transfers")
        if trows else '<p id="transfers" class="empty">No work has got this Path yet.</p>')
    return layout(f"{s.work}/{s.path}", stats + tree + versions + transfers,
                  [(s.work, None), (s.path, None)], location)


# -- a file ------------------------------------------------------------------------------
def file_page(t: Target, p: Preview, location: str) -> str:
    v = t.version
    head = (f'<p id="summary">{e(size(p.size))} · version {e(v.number)} (<code>{e(v.version)}</code>) · '
            f'<a id="download" href="{href("/download", work=t.work, rel=t.path, f=t.sub, v=v.number)}" download>'
            f'download</a></p>')
    cut = '<p class="note">Preview of the first bytes only.</p>' if p.truncated else ""
    if p.kind == "safetensors":
        rows = [[f"<code>{e(x.name)}</code>", e(x.dtype), e("×".join(map(str, x.shape)) or "scalar"), e(size(x.size))]
                for x in p.tensors]
        body = (f'<h2>Tensors</h2><p>{e(len(p.tensors))} tensors, read from the header alone.</p>'
                + table(["name", "dtype", "shape", "bytes"], rows, "tensors", "tensors"))
        if p.metadata:
            body += "<h3>Metadata</h3>" + table(["key", "value"], [[e(k), e(val)] for k, val in p.metadata.items()])
    elif p.kind == "image":
        body = f'<img id="preview" alt="{e(t.name)}" src="{href("/raw", work=t.work, rel=t.path, f=t.sub, v=v.number)}">'
    elif p.kind == "csv":
        rows = p.rows[1:] if p.rows else []
        width = max((len(r) for r in p.rows), default=0)
        body = table([*p.rows[0], *[""] * (width - len(p.rows[0]))] if p.rows else [],
                     ([e(c) for c in r] for r in rows), "csv", "preview") + cut
    elif p.kind in ("text", "json", "binary"):
        note = f'<p class="note">{e(p.error)}</p>' if p.error else ""
        body = note + f'<pre id="preview" class="{e(p.kind)}">{e(p.text)}</pre>' + cut
    elif p.kind == "empty":
        body = '<p id="preview" class="empty">An empty file.</p>'
    else:
        body = f'<p id="preview" class="note">{e(p.error)}</p>'
    return layout(t.name, head + body, [(t.work, None), (t.path, href("/path", work=t.work, rel=t.path)), (t.sub, None)],
                  location)


# -- a diff ------------------------------------------------------------------------------
def _change_row(c: FileChange) -> list[str]:
    mode = f"{c.old_mode} → {c.new_mode}" if c.old_mode and c.new_mode and c.old_mode != c.new_mode else ""
    sizes = (size(c.new_size) if c.status == "added" else size(c.old_size) if c.status == "removed"
             else f"{size(c.old_size)} → {size(c.new_size)}")
    return [f'<span class="status {e(c.status)}">{e(c.status)}</span>', f"<code>{e(c.path)}</code>", e(sizes),
            e(f"+{c.chunks_added} ({size(c.bytes_added)})"), e(f"−{c.chunks_removed} ({size(c.bytes_removed)})"),
            e(mode), e(c.note)]


def diff_page(d: Diff, location: str) -> str:
    a, b = d.a, d.b
    counts = {s: len(d.by_status(s)) for s in ("added", "removed", "changed")}
    head = (f'<p id="diff-summary">Version {e(a.number)} (<code>{e(a.version)}</code>) → version {e(b.number)} '
            f'(<code>{e(b.version)}</code>): {counts["added"]} added, {counts["removed"]} removed, '
            f'{counts["changed"]} changed, {e(d.unchanged)} unchanged; {e(d.chunks_added)} new chunks '
            f'({e(size(d.bytes_added))}) would move to a holder of version {e(a.number)}.</p>')
    body = head + (table(["", "path", "size", "chunks added", "chunks removed", "mode", "note"],
                         (_change_row(c) for c in d.changes), "diff", "diff")
                   if d.changes else '<p id="diff" class="empty">The two versions hold the same files.</p>')
    for c in d.changes:
        if c.tensors is None:
            continue
        rows = [[f'<span class="status {e(x.status)}">{e(x.status)}</span>', f"<code>{e(x.name)}</code>", e(x.dtype),
                 e("×".join(map(str, x.shape))), e(size(x.size)), e(size(x.changed_bytes) if x.status != "same" else ""),
                 e(x.note)] for x in c.tensors]
        changed = sum(1 for x in c.tensors if x.status != "same")
        body += (f'<h2>Tensors of <code>{e(c.path)}</code></h2><p>{changed} of {len(c.tensors)} tensors differ.</p>'
                 + table(["", "tensor", "dtype", "shape", "bytes", "bytes that differ", "note"], rows, "tensor-diff"))
    return layout(f"{d.work}/{d.path}: version {a.number} → {b.number}", body,
                  [(d.work, None), (d.path, href("/path", work=d.work, rel=d.path)), ("diff", None)], location)


def error_page(status: int, message: str, location: str) -> str:
    return layout(f"{status}", f'<p id="error">{e(message)}</p>', location=location)
