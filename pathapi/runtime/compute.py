"""What a work asks of the machine it runs on: :class:`Compute`, and the original API's
:func:`CloudCompute` mapped onto it.

A runner that places works on a cluster reads it (the Ray runner turns it into actor
resources and uses it to pick each work's node); the local runner runs every work on this
machine whatever it asks. Kept apart from :mod:`.work` so that the placement code needs no
Work class.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any


@dataclass(frozen=True)
class Compute:
    """Resources a work holds while it runs: ``cpus`` and ``gpus`` (may be fractions),
    ``memory`` in bytes (None: no reservation), and custom cluster ``resources`` by name
    (e.g. ``{"doomed": 1}`` for nodes started with ``ray start --resources``).

    A work with no ``compute`` holds nothing: it is placed as if it asked for one CPU (so
    that works spread over the nodes), then releases it, as Ray's own default for actors
    does; so an app of more works than the cluster has CPUs still runs.
    """

    cpus: float = 1
    gpus: float = 0
    memory: int | None = None
    resources: Mapping[str, float] = field(default_factory=dict)

    def __post_init__(self) -> None:
        for label, value in (("cpus", self.cpus), ("gpus", self.gpus), *self.resources.items()):
            if value < 0:
                raise ValueError(f"Compute({label}={value}): a resource amount cannot be negative")
        if self.memory is not None and self.memory <= 0:
            raise ValueError(f"Compute(memory={self.memory}): give a positive number of bytes, or None")
        object.__setattr__(self, "resources", dict(self.resources))

    def demands(self) -> dict[str, float]:
        """The amounts asked for, in the names a Ray node reports its resources under."""
        out: dict[str, float] = {"CPU": float(self.cpus)}
        if self.gpus:
            out["GPU"] = float(self.gpus)
        if self.memory is not None:
            out["memory"] = float(self.memory)
        out.update({k: float(v) for k, v in self.resources.items()})
        return {k: v for k, v in out.items() if v}


#: What a work without ``compute`` is placed by (one CPU to spread by; none held).
PLACEMENT_DEFAULT = Compute()

#: The original API's machine names, as resources (its default is a small CPU machine).
CLOUD_COMPUTE_NAMES: dict[str, Compute | None] = {
    "default": None,
    "cpu": None,
    "cpu-small": Compute(cpus=2),
    "cpu-medium": Compute(cpus=8),
    "gpu": Compute(cpus=1, gpus=1),
    "gpu-fast": Compute(cpus=1, gpus=1),
    "gpu-fast-multi": Compute(cpus=1, gpus=4),
}


def CloudCompute(name: str = "default", disk_size: int = 0, idle_timeout: int | None = None,  # noqa: N802 - the original's name
                 shm_size: int | None = None, mounts: Any = None, colocation_group_id: str | None = None,
                 interruptible: bool = False, **kwargs: Any) -> Compute | None:
    """The original API's ``CloudCompute(name, ...)``: ``name`` maps onto :class:`Compute`
    ("default" and "cpu" onto a work's default, "gpu" onto one GPU; the table is
    :data:`CLOUD_COMPUTE_NAMES`). The other arguments described cloud machines the
    cluster's own nodes now decide (disk, idle shutdown, shared memory, mounts, spot
    instances): accepted, so that code runs unchanged, and otherwise unused."""
    try:
        return CLOUD_COMPUTE_NAMES[name]
    except KeyError:
        raise ValueError(f"CloudCompute({name!r}): unknown machine name; known: {', '.join(CLOUD_COMPUTE_NAMES)}") from None


def as_compute(compute: Compute | None, cloud_compute: Compute | None) -> Compute | None:
    """A work's ``compute`` from its constructor's ``compute=`` or (the original's name)
    ``cloud_compute=``: one of the two at most."""
    if compute is not None and cloud_compute is not None:
        raise ValueError("give a work compute= or cloud_compute=, not both (they are the same setting)")
    chosen = compute if compute is not None else cloud_compute
    if chosen is not None and not isinstance(chosen, Compute):
        raise TypeError(f"compute must be a Compute (or CloudCompute(...)), not {type(chosen).__name__}")
    return chosen
