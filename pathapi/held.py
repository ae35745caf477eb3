"""Which version of each fetched Path a consumer holds, so a fallback never goes backwards.

After every ``get`` the consumer records, in its state folder, the :class:`Version` of the
tree it now holds at that path. When the origin is gone and the artifact store holds an
*older* version than this (the origin ran again after its last persist finished, say), the
fallback would silently replace good files with older ones; :mod:`pathapi.transfer` checks
:meth:`HeldVersions.held` first.

A record covers its path and everything under it, so a version held for ``ckpt`` protects
``ckpt/model.bin`` and the other way round. The file is small JSON, replaced atomically
(format "Held versions" in docs/format.md). A damaged file is treated as empty: it can only
make a later fallback less cautious, never corrupt a tree, and the next get rewrites it.
"""

from __future__ import annotations

import json
import os
import threading

from .version import Version

FORMAT = "pathapi-held"
FORMAT_VERSION = 1
FILE_NAME = "held-versions.json"


def _related(a: str, b: str) -> bool:
    """Whether one of two root-relative paths is the other or lies under it."""
    return a == b or a.startswith(b + "/") or b.startswith(a + "/") or a == "." or b == "."


class HeldVersions:
    """The versions held in one work's filesystem, per (origin work, path)."""

    def __init__(self, state_dir: str) -> None:
        self.path = os.path.join(state_dir, FILE_NAME)
        self._lock = threading.Lock()

    def _load(self) -> dict[str, str]:
        try:
            with open(self.path, encoding="utf-8") as f:
                doc = json.load(f)
        except (OSError, ValueError, RecursionError):
            return {}
        held = doc.get("held") if isinstance(doc, dict) and doc.get("format") == FORMAT else None
        if not isinstance(held, dict):
            return {}
        return {k: v for k, v in held.items() if isinstance(k, str) and isinstance(v, str)}

    def held(self, origin: str, rel: str) -> Version | None:
        """The newest version held at ``rel`` (or at a path above or below it) from ``origin``."""
        rel = os.path.normpath(rel)
        best: Version | None = None
        with self._lock:
            records = self._load()
        for key, text in records.items():
            who, _, where = key.partition("\x00")
            if who != origin or not _related(where, rel):
                continue
            try:
                v = Version.parse(text)
            except ValueError:
                continue
            if best is None or v > best:
                best = v
        return best

    def record(self, origin: str, rel: str, version: Version) -> None:
        """``rel`` now holds ``version`` of ``origin``'s tree (records below it are replaced)."""
        rel = os.path.normpath(rel)
        with self._lock:
            records = self._load()
            for key in list(records):
                who, _, where = key.partition("\x00")
                if who == origin and (where == rel or where.startswith(rel + "/") or rel == "."):
                    del records[key]
            records[f"{origin}\x00{rel}"] = str(version)
            tmp = f"{self.path}.{os.getpid()}.{threading.get_native_id()}.tmp"
            try:
                with open(tmp, "w", encoding="utf-8") as f:
                    json.dump({"format": FORMAT, "version": FORMAT_VERSION, "held": records}, f, sort_keys=True)
                os.replace(tmp, self.path)
            except OSError:
                # A full disk after a finished get: the get stands; only this safeguard is lost.
                try:
                    os.unlink(tmp)
                except OSError:
                    pass
