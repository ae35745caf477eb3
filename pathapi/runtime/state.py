"""The state tree of a flow: which works it holds, what a work's state is, which Paths it holds.

Kept apart from :mod:`.work` and :mod:`.flow` so that neither imports the other: the walks
that need both classes live here.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from typing import Any

from ..path import Path
from .flow import Flow
from .work import Work


def public_state(obj: object) -> dict[str, Any]:
    """The state of a work: its public attributes, other works and flows excluded."""
    return {
        k: v for k, v in vars(obj).items()
        if not k.startswith("_") and not isinstance(v, (Work, Flow))
    }


def walk_works(obj: Any, name: str) -> Iterator[tuple[str, Work]]:
    """(name, work) for every work under ``obj``: attributes, and items of lists, tuples and
    dicts, named by their attribute path (``root.stages.0.train``). Flows met on the way are
    given their name."""
    if isinstance(obj, Work):
        yield name, obj
        return
    if isinstance(obj, Flow):
        obj._attach_name(name)
        for key, value in vars(obj).items():
            if not key.startswith("_"):
                yield from walk_works(value, f"{name}.{key}")
    elif isinstance(obj, (list, tuple)):
        for i, value in enumerate(obj):
            yield from walk_works(value, f"{name}.{i}")
    elif isinstance(obj, dict):
        for key, value in obj.items():
            yield from walk_works(value, f"{name}.{key}")


def iter_paths(value: Any) -> Iterator[Path]:
    """Every Path inside ``value`` (lists, tuples, dicts and sets searched)."""
    if isinstance(value, Path):
        yield value
    elif isinstance(value, (list, tuple, set, frozenset)):
        for v in value:
            yield from iter_paths(v)
    elif isinstance(value, dict):
        for v in value.values():
            yield from iter_paths(v)


def own_paths(value: Any, name: str) -> list[str]:
    """The relative paths of the Paths in ``value`` whose origin is work ``name``, sorted."""
    return sorted({os.fspath(p) for p in iter_paths(value) if p.origin_name == name})
