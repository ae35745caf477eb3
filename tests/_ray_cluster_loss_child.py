"""Child of test_ray_runner's cluster-loss test: start a Ray cluster of its own (a head and
one worker node, loopback), run an app on it whose flow waits on a parallel work, and kill
every process of the cluster while the flow waits. Prints one JSON line: what the flow got.

Its own process, because a Ray driver whose cluster died cannot connect to another one.
Usage: python _ray_cluster_loss_child.py STORE_FOLDER APP_ROOT
"""

from __future__ import annotations

import json
import os
import shutil
import sys
import threading
import time

from raycluster import RayTestCluster

from pathapi import App, Flow, SharedFolder, Work, WorkError

CLUSTER: RayTestCluster | None = None


class Holder(Work):
    def __init__(self) -> None:
        super().__init__(parallel=True)

    def run(self) -> None:
        time.sleep(600)


class LossFlow(Flow):
    def __init__(self) -> None:
        super().__init__()
        self.holder = Holder()
        self.got: dict[str, object] = {}

    def run(self) -> None:
        self.holder.run()
        while not self.holder.is_running:
            time.sleep(0.05)
        time.sleep(0.5)
        assert CLUSTER is not None and CLUSTER.cluster is not None
        nodes = [*CLUSTER.worker_nodes, CLUSTER.cluster.head_node]
        threading.Thread(target=lambda: [n.kill_all_processes(check_alive=False, allow_graceful=False, wait=True) for n in nodes],
                         daemon=True).start()
        t0 = time.monotonic()
        try:
            self.holder.wait()
        except WorkError as e:
            self.got = {"type": type(e).__name__, "message": str(e), "work": e.work_name}
        else:
            self.got = {"type": None}
        self.got["seconds"] = time.monotonic() - t0


def main() -> None:
    global CLUSTER
    store, root = sys.argv[1], sys.argv[2]
    CLUSTER = RayTestCluster(workers=1).start(connect=False)
    os.environ["RAY_ADDRESS"] = CLUSTER.address
    flow = LossFlow()
    app_error = None
    try:
        App(flow, root=root, store=SharedFolder(store), cluster="ray", timeout=10).run()
    except Exception as e:  # noqa: BLE001 - reported to the parent
        app_error = f"{type(e).__name__}: {e}"
    finally:
        shutil.rmtree(CLUSTER.temp_dir, ignore_errors=True)
    print(json.dumps({"address": CLUSTER.address, "flow_got": flow.got, "app_error": app_error}), flush=True)


if __name__ == "__main__":
    main()
