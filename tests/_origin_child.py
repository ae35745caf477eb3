"""Child process for the fault tests: one real origin service, as a work's process runs it.

Usage: python tests/_origin_child.py JOB.json. The job names ``name`` (the work), ``root``
(the folder it serves), ``state`` (its cas state folder) and ``secret``; optional:

- ``log``: a file to which one JSON line is appended (and flushed) per chunk batch served:
  ``{"ids": [hex ids sent, whole or as a delta], "bytes": payload bytes sent}``, so a test
  counts what crossed the socket from the origin's side, independently of the consumer;
- ``delay``: seconds to sleep before each chunk batch is read (a slow origin);
- ``manifest_delay``: seconds to sleep before each manifest is answered;
- ``on_first_read``: ``{"action": ..., "path": rel (under root), "target": abs}``, done
  once, just before the first chunk batch is read (between snapshot and serve): ``delete``
  the file, ``link_outside`` (replace it by a symlink to ``target``), ``chmod_000``, or
  ``swap_dir_outside`` (move a folder away and put a symlink to ``target`` in its place);
- ``drop_dac``: when running as root, drop CAP_DAC_OVERRIDE and CAP_DAC_READ_SEARCH (a
  real capset(2)), so file permission bits bind this process as they bind any other user.

Prints ``url <url>`` once serving, then ``dac_dropped <0|1>``; serves until its stdin
closes (or it is killed). Nothing is mocked: the hooks only wrap the service's own chunk
reader to add a delay, a file change or a log line around it.
"""

from __future__ import annotations

import ctypes
import json
import os
import sys
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from cas.workspace import Workspace  # noqa: E402
from pathapi.aio import io_loop  # noqa: E402
from pathapi.wire.origin import OriginService  # noqa: E402
from pathapi.wire.protocol import FRAME, STATUS_DELTA, STATUS_OK  # noqa: E402

CAP_DAC_OVERRIDE = 1
CAP_DAC_READ_SEARCH = 2
_LINUX_CAPABILITY_VERSION_3 = 0x20080522


class _CapHeader(ctypes.Structure):
    _fields_ = [("version", ctypes.c_uint32), ("pid", ctypes.c_int)]


class _CapData(ctypes.Structure):
    _fields_ = [("effective", ctypes.c_uint32), ("permitted", ctypes.c_uint32), ("inheritable", ctypes.c_uint32)]


def drop_dac() -> bool:
    """Drop the two capabilities that let root ignore permission bits; True if dropped."""
    if os.geteuid() != 0:
        return False
    libc = ctypes.CDLL(None, use_errno=True)
    head = _CapHeader(_LINUX_CAPABILITY_VERSION_3, 0)
    data = (_CapData * 2)()
    if libc.capget(ctypes.byref(head), data) != 0:
        raise OSError(ctypes.get_errno(), "capget failed")
    mask = ~((1 << CAP_DAC_OVERRIDE) | (1 << CAP_DAC_READ_SEARCH)) & 0xFFFFFFFF
    data[0].effective &= mask
    data[0].permitted &= mask
    data[0].inheritable &= mask
    if libc.capset(ctypes.byref(head), data) != 0:
        raise OSError(ctypes.get_errno(), "capset failed")
    return True


def frames_summary(body: bytes) -> tuple[list[str], int]:
    """(hex ids of the chunks an answer carries, payload bytes) of a frames body."""
    ids: list[str] = []
    pos = total = 0
    while pos < len(body):
        status, _codec, cid, _raw, stored = FRAME.unpack_from(body, pos)
        pos += FRAME.size + stored
        if status in (STATUS_OK, STATUS_DELTA):
            ids.append(cid.hex())
            total += stored
    return ids, total


def main() -> None:
    with open(sys.argv[1]) as f:
        job = json.load(f)
    dropped = drop_dac() if job.get("drop_dac") else False
    original = OriginService._read_frames
    log = open(job["log"], "a") if job.get("log") else None  # noqa: SIM115 - lives as long as the process
    log_lock = threading.Lock()
    first_read = job.get("on_first_read")
    done_first = threading.Event()

    def read_frames(self, served, ids, *rest):  # type: ignore[no-untyped-def]
        if job.get("delay"):
            time.sleep(job["delay"])
        if first_read and not done_first.is_set():
            done_first.set()
            change(first_read, job["root"])
        body = original(self, served, ids, *rest)
        if log is not None:
            sent, nbytes = frames_summary(body)
            with log_lock:
                log.write(json.dumps({"ids": sent, "bytes": nbytes}) + "\n")
                log.flush()
        return body

    OriginService._read_frames = read_frames  # type: ignore[method-assign]
    if job.get("manifest_delay"):
        snapshot = Workspace.snapshot

        def slow_snapshot(self, path):  # type: ignore[no-untyped-def]
            time.sleep(job["manifest_delay"])
            return snapshot(self, path)

        Workspace.snapshot = slow_snapshot  # type: ignore[method-assign]
    workspace = Workspace(job["state"])
    service = OriginService(job["name"], job["root"], job["secret"], workspace)
    url = io_loop().run(service.start(), timeout=60)
    print(f"url {url}", flush=True)
    print(f"dac_dropped {int(dropped)}", flush=True)
    sys.stdin.read()  # until the parent closes our stdin
    io_loop().run(service.stop(), timeout=10)
    workspace.close()


def change(what: dict, root: str) -> None:  # type: ignore[type-arg]
    path = os.path.join(root, what["path"])
    if what["action"] == "delete":
        os.unlink(path)
    elif what["action"] == "link_outside":
        tmp = path + ".swap"
        os.symlink(what["target"], tmp)
        os.replace(tmp, path)
    elif what["action"] == "chmod_000":
        os.chmod(path, 0)
    elif what["action"] == "swap_dir_outside":  # a folder on the way becomes a link out of the root
        os.rename(path, path + ".moved")
        os.symlink(what["target"], path)
    else:
        raise ValueError(what)


if __name__ == "__main__":
    main()
