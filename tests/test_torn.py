"""A writer rewrites a file at the origin in a loop while consumers ``get`` it: every get
that completes yields a state the file really had; none is torn.

Real processes: the origin service (``_origin_child.py``), a writer (``_writer_child.py``)
rewriting ``data.bin`` in the origin's folder as fast as it can (a new version every few
tens of milliseconds), and two consumer works (``_get_child.py``) each calling
``Path.get(overwrite=True)`` over and over, reporting the size, hash and first bytes of
every file they got. Each version names itself in a 64-byte header (number, body size,
BLAKE3 of the body), and successive versions share most of their chunks, so consumers
patch their copies in place and fetch only what changed (the fast, journaled path is the
one raced).

What is promised (docs/guide.md, "Get again, and only what changed"; cas/snapshot.py):

- a writer that writes aside and renames: every completed get is exactly one whole version;
- a writer that rewrites in place (truncate, then write): a reader "can catch a file the
  writer has just truncated (a state the file really had)": every completed get is a whole
  version, or empty, or the first N bytes of one version (the writer writes front to back);
  never bytes of two versions, never bytes no version had;
- a get may give up (``StaleManifestError``: the file kept changing for 5 attempts), and
  then leaves the previous copy whole; no other error.

Soak: ``PATHAPI_SOAK=1 /work/venv/bin/python -m pytest tests/test_torn.py -s -q`` runs each
writer for 120 s instead of 5 s (``PATHAPI_TORN_SECONDS`` sets it).
"""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
from collections.abc import Iterator
from functools import lru_cache
from pathlib import Path
from typing import Any

import pytest

from _faultkit import CONSUMER, HERE, SOAK, SOURCE, GetChild, OriginProc, Tally, _env, consumer_job
from _writer_child import HEADER, parse_header, version_bytes

SECONDS = float(os.environ.get("PATHAPI_TORN_SECONDS", "120" if SOAK else "5"))
CONSUMERS = 2
TALLY = Tally("test_torn")


@pytest.fixture(scope="module", autouse=True)
def _summary() -> Iterator[None]:
    yield
    TALLY.report()


@lru_cache(maxsize=64)
def _version(v: int) -> bytes:
    return version_bytes(v)


def classify(f: dict[str, Any], in_place: bool) -> str:
    """``whole``, ``empty``, ``prefix`` (the first bytes of one version) or ``torn``."""
    size, digest, head = f["size"], f["sha256"], bytes.fromhex(f["head"])
    if size == 0:
        return "empty" if in_place else "torn"
    parsed = parse_header(head)
    if parsed is None:  # shorter than a header: must be the start of some version's header
        if not in_place or size != len(head) or not b"TORNTEST v".startswith(head[:10]):
            return "torn"
        if size < 18:  # the version number is not complete yet
            return "prefix" if head[10:].isdigit() or size <= 10 else "torn"
        return "prefix" if _version(int(head[10:18]))[:size] == head else "torn"
    v, body, _ = parsed
    data = _version(v)
    if size == HEADER + body and hashlib.sha256(data).hexdigest() == digest:
        return "whole"
    if in_place and size < len(data) and hashlib.sha256(data[:size]).hexdigest() == digest:
        return "prefix"
    return "torn"


def race(tmp_path: Path, mode: str) -> dict[str, int]:
    root = tmp_path / "origin" / "works" / SOURCE
    root.mkdir(parents=True)
    path = root / "data.bin"
    path.write_bytes(version_bytes(1))
    origin = OriginProc(tmp_path / "origin-proc", root, log=False)
    consumers = [GetChild(tmp_path / "children") for _ in range(CONSUMERS)]
    writer = subprocess.Popen(
        [sys.executable, str(HERE / "_writer_child.py"), mode, str(path), "1", str(SECONDS * 3 + 60)],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=_env(),
    )
    counts = {"gets": 0, "whole": 0, "empty": 0, "prefix": 0, "torn": 0, "gave up": 0}
    seen: set[int] = set()
    try:
        assert writer.stdout is not None and writer.stdout.readline() == "started\n"
        for i, c in enumerate(consumers):
            c.go(consumer_job(tmp_path / f"consumer{i}", origin.url, origin.secret, "data.bin", timeout=30,
                              gets=1, seconds=SECONDS, report_file=True))
        results = [c.finish(SECONDS * 4 + 120) for c in consumers]
    finally:
        assert writer.stdin is not None and writer.stdout is not None
        writer.stdin.close()
        last = writer.stdout.read()
        writer.wait(60)
        for c in consumers:
            c.close()
        origin.close()
    for i, r in enumerate(results):
        assert r.code == 0, r.stderr[-3000:]
        for e in r.errors:
            assert e["type"] == "StaleManifestError" and "kept changing" in e["message"], e
            counts["gave up"] += 1
        for rec in r.records:
            kind = classify(rec["file"], mode == "in_place")
            counts["gets"] += 1
            counts[kind] += 1
            parsed = parse_header(bytes.fromhex(rec["file"]["head"]))
            if parsed is not None:
                seen.add(parsed[0])
        # After the last get (even one that gave up) the consumer's copy is a state it got.
        final = tmp_path / f"consumer{i}" / "works" / CONSUMER / "data.bin"
        if final.exists():
            with open(final, "rb") as f:
                data = f.read()
            desc = {"size": len(data), "sha256": hashlib.sha256(data).hexdigest(), "head": data[:64].hex()}
            kind = classify(desc, mode == "in_place")
            counts[kind] += kind == "torn"
    print(f"{mode} writer ({last.strip()}): {counts}; {len(seen)} distinct versions got")
    counts["versions"] = len(seen)
    return counts


@pytest.mark.parametrize("mode", ["rename", "in_place"])
def test_gets_racing_a_writer_only_ever_yield_states_the_file_had(tmp_path: Path, mode: str) -> None:
    counts = race(tmp_path, mode)
    fault = f"writer rewrites the file ({'temp + rename' if mode == 'rename' else 'in place'})"
    ok = counts["torn"] == 0 and counts["gets"] >= 5 and counts["versions"] >= 2
    TALLY.case(fault, passed=ok, torn=counts["torn"])
    for _ in range(counts["gets"] + counts["gave up"] - 1):  # one row per get in the summary
        TALLY.case(fault, passed=True)
    assert counts["torn"] == 0, f"a get produced a state the file never had: {counts}"
    assert counts["gets"] >= 5 and counts["versions"] >= 2, f"the race hardly happened: {counts}"
    if mode == "rename":
        assert counts["whole"] == counts["gets"]
