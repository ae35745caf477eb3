"""The Ray runner on a real cluster (the session's: a head and 3 one-CPU worker nodes on
loopback, SeaweedFS as the store), beyond the semantics every runner shares
(test_runner_semantics.py): the cluster argument and its errors, the store rule, placement
and its log, the original page's checkpoint example, the CLI, and the faults: an actor that
crashes, a node lost while it hosts an origin, and the whole cluster going away mid-run.
"""

from __future__ import annotations

import json
import logging
import os
import pickle
import socket
import subprocess
import sys
import textwrap
import time
import uuid
from pathlib import Path as FsPath

import pytest

pytest.importorskip("ray", reason="Ray is not installed: pip install -e '.[test]' (or '.[ray]')")

from test_app import CheckpointFlow  # noqa: E402
from test_runner_semantics import Keeper, LateReader, pid_alive, where  # noqa: E402

from pathapi import App, ClusterError, Compute, Flow, SharedFolder, Work, WorkError  # noqa: E402

TESTS = FsPath(__file__).resolve().parent
REPO = TESTS.parent


def s3_store(label: str) -> str:
    return f"s3://pathapi-test/{label}-{uuid.uuid4().hex}"


def dead_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class Noop(Work):
    def run(self) -> None:
        self.where = where()


class NoopFlow(Flow):
    def __init__(self, n: int = 1) -> None:
        super().__init__()
        self.works = [Noop() for _ in range(n)]

    def run(self) -> None:
        for w in self.works:
            w.run()


# -- the cluster argument, the store rule ------------------------------------------------
def test_no_reachable_cluster_is_a_clear_error_naming_the_address(tmp_path: FsPath, monkeypatch: pytest.MonkeyPatch) -> None:
    port = dead_port()
    with pytest.raises(ClusterError, match=f"ray://127.0.0.1:{port}") as info:
        App(NoopFlow(), root=tmp_path, store=s3_store("dead"), cluster=f"ray://127.0.0.1:{port}").run()
    assert isinstance(info.value, ConnectionError)
    monkeypatch.setenv("RAY_ADDRESS", f"127.0.0.1:{port}")
    with pytest.raises(ClusterError, match=f"no Ray cluster reachable at 127.0.0.1:{port}"):
        App(NoopFlow(), root=tmp_path, store=s3_store("dead"), cluster="ray").run()


def test_a_local_folder_store_is_refused_on_a_cluster_unless_declared_shared(tmp_path: FsPath) -> None:
    for store in (None, tmp_path / "store", f"file://{tmp_path}/store"):
        with pytest.raises(ValueError, match="only this machine sees"):
            App(NoopFlow(), root=tmp_path, store=store, cluster="ray")
    with pytest.raises(ValueError, match="cluster='yarn'"):
        App(NoopFlow(), root=tmp_path, cluster="yarn")
    App(NoopFlow(), root=tmp_path, store=SharedFolder(tmp_path / "store"), cluster="ray")  # accepted


# -- faults: an actor that crashes; works sharing nodes are logged ----------------------------
class Crasher(Work):
    def run(self) -> None:
        os._exit(1)


class CrashFlow(Flow):
    def __init__(self) -> None:
        super().__init__()
        self.crasher = Crasher()
        self.others = [Noop(), Noop(), Noop()]

    def run(self) -> None:
        for w in self.others:
            w.run()
        try:
            self.crasher.run()
        except WorkError as e:
            self.crash = {"work": e.work_name, "message": str(e)}
        try:
            self.crasher.run()
        except WorkError as e:
            self.again = str(e)


def test_a_crashing_actor_is_a_work_error_naming_the_work_and_sharing_nodes_is_logged(
        ray_cluster: object, tmp_path: FsPath, caplog: pytest.LogCaptureFixture) -> None:
    flow = CrashFlow()
    with caplog.at_level(logging.WARNING, logger="pathapi.ray"):
        App(flow, root=tmp_path / "app", store=SharedFolder(tmp_path / "store"), cluster="ray").run()
    assert flow.crash["work"] == "root.crasher"
    assert "root.crasher" in flow.crash["message"] and "died" in flow.crash["message"]
    assert "root.crasher" in flow.again and "gone" in flow.again
    assert any("4 works on 3 nodes: works share nodes" in r.getMessage() for r in caplog.records)


# -- faults: a node lost while it hosts an origin ------------------------------------------
NODE_KILLER: list[object] = []


class NodeLossFlow(Flow):
    def __init__(self) -> None:
        super().__init__()
        self.origin = Keeper(parallel=True)
        object.__setattr__(self.origin, "_compute", Compute(cpus=1, resources={"doomed": 1}))
        self.reader = LateReader()
        self.errors: dict[str, str] = {}

    def run(self) -> None:
        self.origin.run()
        self.origin.wait()  # persisted before the next run may change the files
        self.origin.run(hold=600)
        while not self.origin.is_running:
            time.sleep(0.05)
        time.sleep(0.5)
        kill = NODE_KILLER[0]
        assert callable(kill)
        kill()
        # The node is lost once Ray says the actor died and its process is gone (all the
        # nodes share this machine: a dying node's processes may answer for a moment).
        deadline = time.monotonic() + 60
        while (self.origin.is_running or pid_alive(int(self.origin.where["pid"]))) and time.monotonic() < deadline:
            time.sleep(0.05)
        self.reader.run(self.origin.ckpt)
        try:
            self.origin.wait()
        except WorkError as e:
            self.errors["origin"] = str(e)


def test_a_lost_node_hosting_an_origin_falls_back_to_the_artifacts_and_names_the_work(ray_cluster, tmp_path: FsPath) -> None:
    node = ray_cluster.add_node(resources={"doomed": 1})
    ray_cluster.cluster.wait_for_nodes()
    NODE_KILLER[:] = [lambda: ray_cluster.remove_node(node)]
    flow = NodeLossFlow()
    try:
        App(flow, root=tmp_path / "app", store=s3_store("nodeloss"), cluster="ray").run()
    finally:
        NODE_KILLER.clear()
    assert flow.origin.where["node"] == node.node_id
    assert flow.reader.auto["transfer"]["source"] == "artifacts"
    assert flow.reader.auto["listing"] == flow.origin.listing
    assert "root.origin" in flow.errors["origin"] and "was lost" in flow.errors["origin"]


# -- faults: the whole cluster goes away mid-run ---------------------------------------------
def test_a_cluster_that_goes_away_mid_run_is_a_clear_error_never_a_hang(tmp_path: FsPath) -> None:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(TESTS), str(REPO)])}
    env.pop("RAY_ADDRESS", None)
    proc = subprocess.run([sys.executable, str(TESTS / "_ray_cluster_loss_child.py"), str(tmp_path / "store"), str(tmp_path / "app")],
                          capture_output=True, text=True, timeout=300, env=env, cwd=tmp_path)
    lines = [line for line in proc.stdout.splitlines() if line.startswith("{")]
    assert proc.returncode == 0 and lines, proc.stderr[-3000:]
    got = json.loads(lines[-1])
    flow_got = got["flow_got"]
    assert flow_got, got
    assert flow_got["type"] == "WorkError" and flow_got["work"] == "root.holder"
    assert "went away" in flow_got["message"] and got["address"] in flow_got["message"]


# -- the original page's example, and the CLI -----------------------------------------------
def test_page_example_model_checkpoint_runs_on_the_cluster(ray_cluster, tmp_path: FsPath) -> None:
    flow = CheckpointFlow()
    App(flow, root=tmp_path / "app", store=s3_store("page"), cluster="ray").run()
    got = tmp_path / "app" / "works" / "root.deploy" / "outputs" / "checkpoints"
    assert sorted(os.listdir(got)) == ["checkpoint_1.ckpt", "checkpoint_2.ckpt"]
    assert pickle.loads((got / "checkpoint_1.ckpt").read_bytes()) == [0, 1, 2, 3, 4]


APP_FILE = """
    import os
    from pathlib import Path as FsPath
    from pathapi import App, Flow, Work

    class Writer(Work):
        def __init__(self):
            super().__init__()
            self.out = "lit://out.txt"

        def run(self):
            import ray
            FsPath(self.out).write_text(ray.get_runtime_context().get_node_id())

    class Reader(Work):
        def run(self, out):
            import ray
            FsPath("got.txt").write_text(FsPath(out).read_text() + " " + ray.get_runtime_context().get_node_id())

    class Main(Flow):
        def __init__(self):
            super().__init__()
            self.writer = Writer()
            self.reader = Reader()

        def run(self):
            self.writer.run()
            self.reader.run(self.writer.out)

    app = App(Main())
"""


def test_cli_runs_an_app_on_the_cluster(ray_cluster, s3_server, tmp_path: FsPath) -> None:
    (tmp_path / "app.py").write_text(textwrap.dedent(APP_FILE))
    env = {**os.environ, **s3_server.env()}
    cmd = [sys.executable, "-m", "pathapi", "run", str(tmp_path / "app.py"), "--root", str(tmp_path / "root"), "--cluster", "ray"]
    refused = subprocess.run(cmd, capture_output=True, text=True, timeout=120, env=env, cwd=tmp_path)
    assert refused.returncode != 0 and "only this machine sees" in refused.stderr
    done = subprocess.run([*cmd, "--store", s3_store("cli")], capture_output=True, text=True, timeout=300, env=env, cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    writer_node, reader_node = (tmp_path / "root" / "works" / "root.reader" / "got.txt").read_text().split()
    assert writer_node != reader_node and {writer_node, reader_node} <= ray_cluster.worker_node_ids()
