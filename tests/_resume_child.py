"""Child process for tests/test_resume.py: a sync from a slow store, to be SIGKILLed mid-fetch.

Usage: python tests/_resume_child.py STATE DEST STORE MANIFEST. Prints ``got N`` (flushed)
after the N-th chunk has been handed to materialize and the next one is asked for (so N-1
chunks are surely written), and sleeps a little per chunk so the parent can kill it mid-way.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from cas.manifest import Manifest  # noqa: E402
from cas.store.local import LocalChunkStore  # noqa: E402
from cas.workspace import Workspace  # noqa: E402


class Slow:
    def __init__(self, inner: LocalChunkStore) -> None:
        self.inner = inner
        self.n = 0

    def has_many(self, ids):  # type: ignore[no-untyped-def]
        return self.inner.has_many(ids)

    def get_many(self, ids):  # type: ignore[no-untyped-def]
        for cid, data in self.inner.get_many(ids):
            yield cid, data
            self.n += 1
            print(f"got {self.n}", flush=True)
            time.sleep(0.02)


def main() -> None:
    state, dest, store, manifest = sys.argv[1:5]
    m = Manifest.decode(Path(manifest).read_bytes())
    with Workspace(state, m.params) as ws, LocalChunkStore(store) as s:
        ws.sync(m, dest, remote=Slow(s))
    print("done", flush=True)


if __name__ == "__main__":
    main()
