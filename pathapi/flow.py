"""``Flow``: orchestrates works (and other flows) held as attributes. Does no file work."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

from .work import Work


class Flow:
    """Subclass, hold works and flows as attributes, call their ``run`` from ``run``."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        object.__setattr__(self, "_name", "root")

    def run(self, *args: Any, **kwargs: Any) -> Any:
        raise NotImplementedError(f"{type(self).__name__} must define run()")

    @property
    def name(self) -> str:
        return self.__dict__.get("_name", "root")


def walk_works(obj: Any, name: str) -> Iterator[tuple[str, Work]]:
    """(name, work) for every work under ``obj``: attributes, and items of lists, tuples and
    dicts, named by their attribute path (``root.stages.0.train``)."""
    if isinstance(obj, Work):
        yield name, obj
        return
    if isinstance(obj, Flow):
        object.__setattr__(obj, "_name", name)
        for key, value in vars(obj).items():
            if not key.startswith("_"):
                yield from walk_works(value, f"{name}.{key}")
    elif isinstance(obj, (list, tuple)):
        for i, value in enumerate(obj):
            yield from walk_works(value, f"{name}.{i}")
    elif isinstance(obj, dict):
        for key, value in obj.items():
            yield from walk_works(value, f"{name}.{key}")
