"""Child process for the fault tests: a consumer work's ``Path.get``, to be killed or timed.

Usage: python tests/_get_child.py. Prints ``ready`` once imported, then reads one JSON job
line on stdin (the parent starts children ahead of time and starts its clock when it sends
the job), runs it, prints ``end``, and is ready for the next job until stdin closes. The
job names the consumer work (``name``, ``root``, ``state``, ``artifacts``), the app
``secret`` and ``timeout``, the origin (``origin_name``, ``origin_url``) and the path
``rel``. The get runs exactly as in a work process: a WorkContext as the runner builds
it, then ``Path.get(overwrite=True)`` (``gets``: that many gets in a row; ``seconds``: gets
until that much time has passed; ``report_file``: each record tells the size, sha256 and
first 64 bytes of the file the get produced).

Output lines (flushed): ``chunk N BYTES ID`` each time materialize asks for the next chunk
after having written the N-th (BYTES: payload bytes received so far; ID: the N-th chunk's
hex id), ``phase stage`` / ``phase commit`` / ``phase cleanup EVENTS`` when the sync starts
staging, renames its journal into place, and removes its finished transaction (EVENTS: the
file system operations it applied in between); then ``done <json record>`` or
``error <json>`` per get.

``die_at`` makes the process SIGKILL itself at an exact point: ``{"event": "fetch", "n": K}``
when chunk K+1 has arrived (K chunks written), ``{"event": "commit"}`` just before the
journal's commit rename, ``{"event": "apply", "n": K}`` before the K-th file system
operation after it, ``{"event": "cleanup"}`` before the finished transaction is removed.
Points are observed through audit hooks (PEP 578) and a pass-through wrapper around the
origin source's chunk iterator; nothing is mocked.
"""

from __future__ import annotations

import hashlib
import json
import os
import signal
import sys
import time
from pathlib import Path as FsPath

sys.path.insert(0, str(FsPath(__file__).resolve().parents[1]))

from cas.workspace import Workspace  # noqa: E402
from pathapi import Path  # noqa: E402
from pathapi.aio import io_loop  # noqa: E402
from pathapi.artifacts import ArtifactStore  # noqa: E402
from pathapi.wire.client import OriginSource, close_sessions  # noqa: E402
from pathapi.runtime.context import WorkContext, set_current  # noqa: E402

APPLY_EVENTS = {
    "open", "os.rename", "os.remove", "os.rmdir", "os.mkdir", "os.symlink", "os.chmod", "os.truncate", "shutil.rmtree",
}


def die() -> None:
    os.kill(os.getpid(), signal.SIGKILL)


def main() -> None:
    seen = {"stage": False, "committed": False, "events": 0}
    die_at: dict[str, object] = {}
    paths = {"txn": "", "stage": "", "ops": ""}

    def hook(event: str, args: tuple) -> None:  # type: ignore[type-arg]
        if not paths["txn"]:
            return
        if event == "open" and not seen["stage"] and isinstance(args[0], str) and args[0].startswith(paths["stage"]):
            seen["stage"] = True
            print("phase stage", flush=True)
        elif event == "os.rename" and os.fspath(args[1]) == paths["ops"]:
            if die_at.get("event") == "commit":
                die()
            seen["committed"] = True
            print("phase commit", flush=True)
        elif event == "shutil.rmtree" and os.fspath(args[0]) == paths["txn"]:
            if die_at.get("event") == "cleanup":
                die()
            print(f"phase cleanup {seen['events']}", flush=True)
            seen["committed"] = False
            seen["events"] = 0
        elif seen["committed"] and event in APPLY_EVENTS:
            seen["events"] += 1
            if die_at.get("event") == "apply" and seen["events"] == die_at["n"]:
                die()

    sys.addaudithook(hook)
    original = OriginSource.get_many

    def get_many(self, ids, bases=None):  # type: ignore[no-untyped-def]
        n = 0
        for item in original(self, ids, bases):
            if die_at.get("event") == "fetch" and n == die_at["n"]:
                die()
            yield item
            n += 1  # materialize asked for the next chunk: it has written this one
            print(f"chunk {n} {self.bytes_received} {item[0].hex()}", flush=True)

    OriginSource.get_many = get_many  # type: ignore[method-assign]

    while True:
        print("ready", flush=True)
        line = sys.stdin.readline()
        if not line:
            break
        job = json.loads(line)
        die_at = job.get("die_at") or {}
        state = os.path.abspath(job["state"])
        paths["txn"] = os.path.join(state, "txn")
        paths["stage"] = os.path.join(state, "txn", "stage") + os.sep
        paths["ops"] = os.path.join(state, "txn", "ops")
        seen.update(stage=False, committed=False, events=0)
        run_job(job)
        print("end", flush=True)
    io_loop().run(close_sessions(), timeout=10)


def run_job(job: dict) -> None:  # type: ignore[type-arg]
    root = os.path.abspath(job["root"])
    os.makedirs(root, exist_ok=True)
    os.chdir(root)
    workspace = Workspace(job["state"])
    artifacts = ArtifactStore.open(job["artifacts"], root)
    ctx = WorkContext(job["name"], root, workspace, artifacts, job["secret"], float(job["timeout"]))
    ctx.registry = {job["origin_name"]: job["origin_url"]}
    set_current(ctx)
    ctx.in_run = True
    p = Path(job["rel"], origin=job["origin_name"], consumer=job["name"])
    t_end = time.monotonic() + float(job.get("seconds", 0))
    n_gets = 0
    while n_gets < int(job.get("gets", 1)) or time.monotonic() < t_end:
        n_gets += 1
        t0 = time.monotonic()
        try:
            p.get(overwrite=True)
        except Exception as e:  # noqa: BLE001 - reported to the test
            out = {
                "type": type(e).__name__, "mro": [c.__name__ for c in type(e).__mro__], "message": str(e),
                "errno": getattr(e, "errno", None), "work_name": getattr(e, "work_name", None),
                "seconds": time.monotonic() - t0,
            }
            print("error " + json.dumps(out), flush=True)
        else:
            lt = p.last_transfer
            rec = {k: getattr(lt, k) for k in lt.__dataclass_fields__}
            rec["wall"] = time.monotonic() - t0
            if job.get("report_file"):
                rec["file"] = describe(os.path.join(root, job["rel"]))
            print("done " + json.dumps(rec), flush=True)
    ctx.in_run = False
    set_current(None)
    workspace.close()
    artifacts.close()


def describe(path: str) -> dict[str, object]:
    """Size, sha256 and first 64 bytes (hex) of the file a get produced."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        head = f.read(64)
        h.update(head)
        while block := f.read(1 << 20):
            h.update(block)
    return {"size": os.path.getsize(path), "sha256": h.hexdigest(), "head": head.hex()}


if __name__ == "__main__":
    main()
