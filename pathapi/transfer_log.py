"""Transfer records that outlive the work that made them: who got which Path, when, how much
moved and how much was reused, and from where.

``Path.last_transfer`` lives in the receiving work's process; the storage browser and
``pathapi log`` need it after the app ended, possibly on another machine. After each get the
consumer appends the record to a small log in the artifact store, one ref per (Path,
consumer): ``pathapi:transfers/<origin work>/<path>#<consumer work>``. Format "Transfer
records" in docs/format.md.

What is guaranteed: at most :data:`KEEP` records per (Path, consumer), newest last; writing
a record never fails a get (a store that refuses it costs only the record); a log that
cannot be read counts as empty and the next get starts it afresh. Only the consumer writes
its own log, so one lock per process is the whole concurrency story.
"""

from __future__ import annotations

import json
import struct
import threading
from collections.abc import Mapping
from typing import Any

from cas.store.refs import RefStore

PREFIX = "pathapi:transfers/"
MAGIC = b"PXFR"
FORMAT_VERSION = 1
_HEAD = struct.Struct("<4sH")
#: Records kept per (Path, consumer).
KEEP = 50

_lock = threading.Lock()


def ref_name(origin: str, rel: str, consumer: str) -> str:
    return f"{PREFIX}{origin}/{rel}#{consumer}"


def parse_name(name: str) -> tuple[str, str, str] | None:
    """(origin, path, consumer) of a log's ref name, or None for a name that is not one."""
    if not name.startswith(PREFIX):
        return None
    path_ref, sep, consumer = name[len(PREFIX):].rpartition("#")
    origin, slash, rel = path_ref.partition("/")
    if not sep or not slash or not origin or not rel or not consumer:
        return None
    return origin, rel, consumer


def is_log(raw: bytes) -> bool:
    return raw[:4] == MAGIC


def encode(records: list[dict[str, Any]]) -> bytes:
    body = json.dumps({"records": records}, sort_keys=True, separators=(",", ":")).encode("utf-8")
    return _HEAD.pack(MAGIC, FORMAT_VERSION) + body


def decode(raw: bytes) -> list[dict[str, Any]]:
    """The records of one log; [] for anything that is not a readable log of this version."""
    if len(raw) < _HEAD.size:
        return []
    magic, fmt = _HEAD.unpack_from(raw)
    if magic != MAGIC or fmt != FORMAT_VERSION:
        return []
    try:
        doc = json.loads(raw[_HEAD.size:].decode("utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError):
        return []
    records = doc.get("records") if isinstance(doc, dict) else None
    if not isinstance(records, list):
        return []
    return [r for r in records if isinstance(r, dict)]


def append(refs: RefStore, origin: str, rel: str, consumer: str, record: Mapping[str, Any], keep: int = KEEP) -> None:
    """Add ``record`` to the log of ``consumer``'s gets of ``origin``'s ``rel``."""
    name = ref_name(origin, rel, consumer)
    with _lock:
        raw = refs.get(name)
        records = decode(raw) if raw is not None else []
        records.append({**record, "consumer": consumer})
        refs.put(name, encode(records[-keep:]))


def read(refs: RefStore, origin: str, rel: str, *, below: bool = False) -> list[dict[str, Any]]:
    """Every kept record of gets of ``origin``'s ``rel`` (and, with ``below``, of paths under
    it), by every consumer, oldest first; each says its ``path``."""
    out: list[dict[str, Any]] = []
    for name in refs.names(f"{PREFIX}{origin}/{rel}" + ("" if below else "#")):
        parsed = parse_name(name)
        if parsed is None or parsed[0] != origin:
            continue
        if not (parsed[1] == rel or (below and parsed[1].startswith(rel + "/"))):
            continue
        raw = refs.get(name)
        if raw is not None:
            out.extend({**r, "path": parsed[1]} for r in decode(raw))
    return sorted(out, key=lambda r: float(r.get("at", 0)))


def logs(refs: RefStore) -> dict[tuple[str, str], int]:
    """(origin, path) -> number of consumers with a log, for every Path anyone got."""
    out: dict[tuple[str, str], int] = {}
    for name in refs.names(PREFIX):
        parsed = parse_name(name)
        if parsed is not None:
            out[parsed[:2]] = out.get(parsed[:2], 0) + 1
    return out


#: The fields of a transfer record that a log keeps (``Path.last_transfer``'s, docs/guide.md).
FIELDS = ("files", "bytes_total", "chunks_transferred", "bytes_transferred", "chunks_reused", "bytes_reused",
          "seconds", "source", "manifest_id", "version", "kept_local", "note", "same_host_chunks")


def entry(fields: Mapping[str, Any], at: float | None = None) -> dict[str, Any]:
    """The JSON record of one get from its ``last_transfer`` fields (``vars(record)``),
    stamped ``at`` (unix seconds; now by default)."""
    import time

    out: dict[str, Any] = {"at": time.time() if at is None else at}
    for key in FIELDS:
        value = fields.get(key)
        out[key] = str(value) if key == "version" and value is not None else value
    return out


def human_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(n) < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TiB"  # pragma: no cover - the loop returns


def describe(consumer: str, origin: str, rel: str, fields: Mapping[str, Any]) -> str:
    """One line for a get: what moved, what was reused, how long it took (``pathapi run``)."""
    f = fields
    if f.get("kept_local"):
        return f"pathapi: {consumer} kept its newer {origin}/{rel}: {f.get('note', '')}"
    return (f"pathapi: {consumer} got {origin}/{rel} from {f.get('source')}: {f.get('files')} files, "
            f"{human_bytes(f.get('bytes_total') or 0)}; moved {f.get('chunks_transferred')} chunks "
            f"({human_bytes(f.get('bytes_transferred') or 0)}), reused {f.get('chunks_reused')} chunks "
            f"({human_bytes(f.get('bytes_reused') or 0)}) in {float(f.get('seconds') or 0):.2f} s")
