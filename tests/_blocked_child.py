"""Child process for tests/test_materialize_blocked.py: one Workspace.sync as another user.

Usage: python tests/_blocked_child.py JOB.json. The job names ``state``, ``dest``, ``store``
(a LocalChunkStore folder), ``manifest`` (a file holding an encoded manifest), and
optionally ``drop_dac`` (drop the capabilities that let root ignore folder modes: tests
run as root, and root is stopped by no mode bit otherwise) and ``pause_after_commit`` (SIGSTOP this process just before the first operation
after the journal's commit rename, so the parent can change the tree at exactly that
moment, then SIGCONT it; the operations are seen through audit hooks, nothing is mocked).

Prints one JSON line: ``{"ok": true}`` or ``{"ok": false, "type": ..., "message": ...,
"path": ...}``.
"""

from __future__ import annotations

import json
import os
import signal
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repo, for cas

from cas.manifest import Manifest  # noqa: E402
from cas.store.local import LocalChunkStore  # noqa: E402
from _origin_child import drop_dac  # noqa: E402
from trees import make_workspace  # noqa: E402

APPLY_EVENTS = {"open", "os.rename", "os.remove", "os.rmdir", "os.mkdir", "os.symlink", "os.chmod", "shutil.rmtree"}


def main() -> None:
    with open(sys.argv[1]) as f:
        job = json.load(f)
    if job.get("drop_dac") and not drop_dac():
        print(json.dumps({"ok": False, "type": "Setup", "message": "could not drop capabilities"}), flush=True)
        return
    ops_path = os.path.join(job["state"], "txn", "ops")
    seen = {"committed": False, "paused": False}

    def hook(event: str, args: tuple) -> None:  # type: ignore[type-arg]
        if event == "os.rename" and os.fspath(args[1]) == ops_path:
            seen["committed"] = True
        elif seen["committed"] and not seen["paused"] and event in APPLY_EVENTS:
            seen["paused"] = True
            os.kill(os.getpid(), signal.SIGSTOP)

    if job.get("pause_after_commit"):
        sys.addaudithook(hook)
    store = LocalChunkStore(job["store"])
    with open(job["manifest"], "rb") as f:
        target = Manifest.decode(f.read())
    ws = make_workspace(job["state"])
    try:
        ws.sync(target, job["dest"], remote=store)
        print(json.dumps({"ok": True}), flush=True)
    except Exception as e:  # reported to the test, which asserts on it
        print(json.dumps({"ok": False, "type": type(e).__name__, "message": str(e),
                          "path": getattr(e, "path", None)}), flush=True)
    finally:
        ws.close()
        store.close()


if __name__ == "__main__":
    main()
