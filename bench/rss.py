"""Peak memory moving a big checkpoint: the goal is <= 256 MiB per process at 4 GiB.

One App (an origin work, a consumer work), one first get of a checkpoint folder of
``size`` bytes with the origin never having read it: the origin's snapshot (read + chunk +
hash of every byte), its serving, the consumer's receiving, verifying and durable writing
all happen inside the measured window. Peak RSS of both processes (VmHWM, reset at the start); ``cp`` of the same folder next to it for the time.
"""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path as FsPath
from typing import Any

from pathapi import App, Flow

from . import data as gen
from . import peers
from .measure import PeakRss, settle
from .suite import ORIGIN, Consumer, Origin


class RssFlow(Flow):
    def __init__(self, pause: float, peer_dst: str) -> None:
        super().__init__()
        self.origin = Origin("ckpt")
        self.consumer = Consumer()
        self._pause = pause
        self._peer_dst = peer_dst
        #: the App running this flow (set by run): its handles give the works' pids
        self._app: App | None = None
        object.__setattr__(self, "result", {})

    def run(self) -> None:
        app = self._app
        assert app is not None, "RssFlow runs only under run()"
        po, pc = app.handle(self.origin).pid, app.handle(self.consumer).pid
        assert po is not None and pc is not None, "the works run in no local process"
        settle(self._pause)
        with PeakRss([po, pc], names={po: self.origin.name, pc: self.consumer.name}) as rss:
            self.consumer.run("get", self.origin.data)
        rec = self.consumer.record
        src = os.path.join(app.root, "works", ORIGIN, "ckpt")
        settle(self._pause)
        cp = peers.cp(src, self._peer_dst, 6, peers.tree_bytes(src))
        self.result.update(
            seconds=rec["seconds"], bytes_moved=rec["bytes_transferred"], bytes_total=rec["bytes_total"],
            **rss.report.as_dict(), cp_seconds=cp.seconds, cp_rss=cp.rss,
        )
        print(f"  rss: first get of {rec['bytes_total'] / 2**30:.2f} GiB in {rec['seconds']:.2f} s (cp {cp.seconds:.2f} s); "
              f"peak RSS per process {self.result['peak_rss_max_process_MiB']} MiB", file=sys.stderr)


def run(base: FsPath, size: int, pause: float) -> dict[str, Any]:
    app_root = base / "app"
    src = app_root / "works" / ORIGIN / "ckpt"
    t = time.perf_counter()
    gen.make_checkpoint(src, size)
    os.sync()
    print(f"rss: {size / 2**30:.2f} GiB checkpoint made in {time.perf_counter() - t:.1f} s", file=sys.stderr)
    flow = RssFlow(pause, str(base / "cp" / "ckpt"))
    app = App(flow, root=app_root)
    flow._app = app
    app.run()
    return {"size": size, **flow.result}
