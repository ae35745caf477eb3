"""Where works run on a cluster (pure: no cluster), and what ``Compute``/``CloudCompute`` ask."""

from __future__ import annotations

import pytest

from pathapi import CloudCompute, Compute, Work
from pathapi.runtime.placement import Node, plan


def nodes(n: int, **extra: dict[str, float]) -> list[Node]:
    out = [Node(f"n{i}", "127.0.0.1", {"CPU": 1.0, "memory": 8e9}) for i in range(n)]
    for nid, resources in extra.items():
        out.append(Node(nid, "127.0.0.1", {"CPU": 1.0, **resources}))
    return out


def test_each_work_gets_a_node_of_its_own_when_there_are_enough() -> None:
    p = plan([("a", None), ("b", None), ("c", None)], nodes(3))
    assert sorted(p.nodes.values()) == ["n0", "n1", "n2"]
    assert p.shared == {} and p.unplaceable == {}


def test_with_fewer_nodes_works_share_and_the_sharing_is_said() -> None:
    p = plan([(w, None) for w in "abcde"], nodes(3))
    assert len(p.nodes) == 5 and set(p.nodes.values()) == {"n0", "n1", "n2"}
    assert sorted(len(ws) for ws in p.shared.values()) == [2, 2]
    assert "5 works on 3 nodes: works share nodes" in p.describe_sharing(nodes(3))


def test_a_work_goes_to_a_node_with_the_resources_it_asks_for() -> None:
    ns = nodes(2, gpu={"GPU": 1.0}, doomed={"doomed": 1.0})
    p = plan([("train", Compute(gpus=1)), ("origin", Compute(resources={"doomed": 1})), ("x", None)], ns)
    assert p.nodes["train"] == "gpu" and p.nodes["origin"] == "doomed"
    assert p.nodes["x"] in {"n0", "n1"}


def test_a_head_without_cpus_hosts_no_work() -> None:
    ns = [Node("head", "127.0.0.1", {"memory": 1e9}), *nodes(1)]
    assert plan([("a", None), ("b", None)], ns).nodes == {"a": "n0", "b": "n0"}


def test_a_work_no_node_can_host_is_named_with_what_it_asks() -> None:
    p = plan([("big", Compute(cpus=64)), ("ok", None)], nodes(2))
    assert p.unplaceable == {"big": {"CPU": 64.0}} and p.nodes == {"ok": "n0"}


def test_compute_refuses_negative_amounts() -> None:
    with pytest.raises(ValueError, match="negative"):
        Compute(cpus=-1)
    with pytest.raises(ValueError, match="memory"):
        Compute(memory=0)


def test_cloud_compute_maps_the_original_names_onto_compute() -> None:
    assert CloudCompute("gpu") == Compute(cpus=1, gpus=1)
    assert CloudCompute("default") is None and CloudCompute("cpu", disk_size=10, idle_timeout=60) is None
    with pytest.raises(ValueError, match="unknown machine name"):
        CloudCompute("tpu-pod")


class W(Work):
    def run(self) -> None:
        pass


def test_a_work_takes_compute_or_the_originals_cloud_compute() -> None:
    assert W().compute is None
    assert W(compute=Compute(cpus=2)).compute == Compute(cpus=2)
    assert W(cloud_compute=CloudCompute("gpu")).compute == Compute(cpus=1, gpus=1)
    with pytest.raises(ValueError, match="not both"):
        W(compute=Compute(), cloud_compute=Compute())
