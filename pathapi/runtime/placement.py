"""Which node each work of an app runs on: pure, no cluster needed (tested by itself).

The rule (the original API's model: every work on a machine of its own):

- each work goes to a node that has, in all, every resource its :class:`~.compute.Compute`
  asks for (a work without one is placed as asking for one CPU);
- works are spread: a work goes to an eligible node holding the fewest works so far (ties: the
  node listed first), so that with at least as many eligible nodes as works, each work has
  a node of its own;
- with fewer nodes, works share nodes, and :attr:`Placement.shared` says which (the runner
  logs it);
- a work that no node can host is named in :attr:`Placement.unplaceable` with what it asked.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

from .compute import PLACEMENT_DEFAULT, Compute


@dataclass(frozen=True)
class Node:
    """A node as the cluster reports it: its id, its address, its total resources."""

    node_id: str
    address: str
    resources: Mapping[str, float]

    def can_host(self, demands: Mapping[str, float]) -> bool:
        return all(self.resources.get(k, 0.0) >= v for k, v in demands.items())


@dataclass(frozen=True)
class Placement:
    #: work name -> the node id it runs on
    nodes: dict[str, str]
    #: node id -> the works it hosts, for the nodes that host more than one
    shared: dict[str, list[str]] = field(default_factory=dict)
    #: work name -> what it asked for, for the works no node can host
    unplaceable: dict[str, dict[str, float]] = field(default_factory=dict)

    def describe_sharing(self, nodes: Sequence[Node]) -> str:
        """One line saying which works share which node (empty when none do)."""
        if not self.shared:
            return ""
        address = {n.node_id: n.address for n in nodes}
        parts = "; ".join(f"node {nid[:12]} ({address.get(nid, '?')}): {', '.join(ws)}" for nid, ws in self.shared.items())
        return (f"{len(self.nodes)} works on {len(set(self.nodes.values()))} nodes: works share nodes ({parts}); "
                "add nodes for a node per work")


def plan(works: Sequence[tuple[str, Compute | None]], nodes: Sequence[Node]) -> Placement:
    """Place ``works`` (name, compute) on ``nodes`` by the rule above. Works that ask for
    the most are placed first, so that a small work does not take the only node a big one fits."""
    load: dict[str, list[str]] = {n.node_id: [] for n in nodes}
    order = {n.node_id: i for i, n in enumerate(nodes)}
    placed: dict[str, str] = {}
    unplaceable: dict[str, dict[str, float]] = {}
    demands = {name: (compute or PLACEMENT_DEFAULT).demands() for name, compute in works}
    # Most constrained first: the fewest eligible nodes, then the largest demand.
    eligible = {name: [n for n in nodes if n.can_host(demands[name])] for name, _ in works}
    for name, _ in sorted(works, key=lambda w: (len(eligible[w[0]]), -sum(demands[w[0]].values()))):
        if not eligible[name]:
            unplaceable[name] = demands[name]
            continue
        best = min(eligible[name], key=lambda n: (len(load[n.node_id]), order[n.node_id]))
        load[best.node_id].append(name)
        placed[name] = best.node_id
    names = [name for name, _ in works]
    shared = {nid: sorted(ws, key=names.index) for nid, ws in load.items() if len(ws) > 1}
    return Placement({n: placed[n] for n in names if n in placed}, shared, unplaceable)
