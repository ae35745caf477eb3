"""Resuming an interrupted sync: what it staged is kept as ``<state>/resume/`` and read
back, verified, as a chunk source by the next one (docs/format.md, "Materialize journal")."""

from __future__ import annotations

import json
import os
import shutil
import stat

from ..chunking import pack_chunks
from ..hashing import ChunkId
from ..manifest import Kind, Manifest
from ..sources import SeedSource
from .journal import JOURNAL_VERSION, is_stage_name

RESUME_FORMAT = "cas-resume"
RESUME_INDEX = "resume.json"


def write_resume_index(txn: str, target: Manifest, stages: dict[str, str], data: list[ChunkId]) -> None:
    """What the staged files (and the journal data file: ``data``, its chunks in order) are
    meant to hold, so an interrupted sync can be resumed. Not fsynced: it only ever saves
    work, and every chunk read back through it is verified."""
    with open(os.path.join(txn, "target"), "wb") as f:
        f.write(target.encode())
    index: dict[str, object] = {"format": RESUME_FORMAT, "version": JOURNAL_VERSION, "stages": stages}
    if data:
        index["data"] = [cid.hex() for cid in data]
    body = json.dumps(index, ensure_ascii=False)
    tmp = os.path.join(txn, RESUME_INDEX + ".tmp")
    with open(tmp, "wb") as f:
        f.write(body.encode("utf-8", "surrogateescape"))
    os.rename(tmp, os.path.join(txn, RESUME_INDEX))


def keep_for_resume(state: str) -> None:
    """Keep an uncommitted transaction's staged files as ``resume/``: the next sync reads
    the chunks they already hold (each verified) instead of fetching them again."""
    txn = os.path.join(state, "txn")
    resume = os.path.join(state, "resume")
    if not os.path.exists(os.path.join(txn, RESUME_INDEX)):
        shutil.rmtree(txn, ignore_errors=True)
        return
    shutil.rmtree(resume, ignore_errors=True)
    os.rename(txn, resume)


def resume_source(state: str) -> SeedSource | None:
    """The chunks an interrupted sync left staged, or None. Anything unreadable is dropped:
    resuming only ever saves work, it is never needed for correctness."""
    resume = os.path.join(state, "resume")
    try:
        with open(os.path.join(resume, RESUME_INDEX), "rb") as f:
            index = json.loads(f.read().decode("utf-8", "surrogateescape"))
        with open(os.path.join(resume, "target"), "rb") as f:
            target = Manifest.decode(f.read())
        if index.get("format") != RESUME_FORMAT or index.get("version") != JOURNAL_VERSION:
            raise ValueError("unknown resume index")
        by_path = target.by_path
        files = [
            (os.path.join(resume, "stage", name), by_path[rel].chunks)
            for name, rel in index["stages"].items()
            if is_stage_name(name) and rel in by_path and by_path[rel].kind == Kind.FILE
        ]
        if index.get("data"):  # the journal data file: the chunks of in-place patches, end to end
            sizes = target.chunk_sizes()
            ids = [bytes.fromhex(h) for h in index["data"]]
            files.append((os.path.join(resume, "data"), pack_chunks([(cid, sizes[cid]) for cid in ids])))
    except FileNotFoundError:
        return None
    except (OSError, ValueError, KeyError, TypeError, AttributeError, RecursionError):
        shutil.rmtree(resume, ignore_errors=True)
        return None
    # Only regular files are read (opening a FIFO left there would block the sync forever).
    return SeedSource.from_files([(p, c) for p, c in files if _is_regular(p)], f"resume:{resume}")


def discard_resume(state: str) -> None:
    """Drop what an earlier interrupted sync staged (a sync that completed needs none of it)."""
    shutil.rmtree(os.path.join(state, "resume"), ignore_errors=True)


def _is_regular(path: str) -> bool:
    try:
        return stat.S_ISREG(os.lstat(path).st_mode)
    except OSError:
        return False
