"""Child process for tests/test_materialize_crash.py: one Workspace.sync, to be killed.

Usage: python tests/_sync_child.py JOB.json, where the job names ``state``, ``dest``,
``store`` (a LocalChunkStore folder), ``manifest`` (a file holding an encoded manifest),
``params`` ([min, avg, max] chunk sizes) and optionally ``die_at_apply_event``: N and
``recover_only``: true (run Workspace.recover() on a committed journal instead of a sync).

Prints ``ready`` once everything is open, then waits for ``go`` on stdin (the parent starts
its kill timer then), and on success prints ``done <seconds> <apply events>``. With ``die_at_apply_event`` = N the process
SIGKILLs itself just before the N-th file system operation after the journal's commit
rename (N = 1: right after the commit, before anything is applied; the removal of the
finished transaction is not counted). The operations are
seen through audit hooks (PEP 578) of the real code, nothing is mocked.
"""

from __future__ import annotations

import json
import os
import signal
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repo, for cas (this folder is on the path)

from cas.chunking import ChunkerParams  # noqa: E402
from cas.manifest import Manifest  # noqa: E402
from cas.store.local import LocalChunkStore  # noqa: E402
from trees import make_workspace  # noqa: E402

#: Audit events of the operations that apply a journal (os.open covers patching, fsyncs).
APPLY_EVENTS = {
    "open", "os.rename", "os.remove", "os.rmdir", "os.mkdir", "os.symlink", "os.chmod",
    "os.truncate", "shutil.rmtree",
}


def main() -> None:
    with open(sys.argv[1]) as f:
        job = json.load(f)
    die_at = job.get("die_at_apply_event")
    txn = os.path.join(job["state"], "txn")
    ops_path = os.path.join(txn, "ops")
    seen = {"armed": False, "committed": bool(job.get("recover_only")), "applied": False, "events": 0}

    def hook(event: str, args: tuple) -> None:  # type: ignore[type-arg]
        if not seen["armed"]:
            return
        if event == "os.rename" and os.fspath(args[1]) == ops_path:
            seen["committed"] = True
        elif event == "shutil.rmtree" and os.fspath(args[0]) == txn:
            seen["applied"] = True  # what follows is clean-up, not apply
        elif seen["committed"] and not seen["applied"] and event in APPLY_EVENTS:
            seen["events"] += 1
            if seen["events"] == die_at:
                os.kill(os.getpid(), signal.SIGKILL)

    sys.addaudithook(hook)
    store = LocalChunkStore(job["store"])
    with open(job["manifest"], "rb") as f:
        target = Manifest.decode(f.read())
    ws = make_workspace(job["state"], ChunkerParams(1, *job["params"]))
    print("ready", flush=True)
    if sys.stdin.readline() != "go\n":  # the parent starts us ahead of time, then says go
        sys.exit(3)
    seen["armed"] = True
    t0 = time.perf_counter()
    if job.get("recover_only"):
        assert ws.recover()
    else:
        ws.sync(target, job["dest"], remote=store)
    print(f"done {time.perf_counter() - t0:.6f} {seen['events']}", flush=True)


if __name__ == "__main__":
    main()
