"""``Flow``: orchestrates works (and other flows) held as attributes. Does no file work."""

from __future__ import annotations

from typing import Any


class Flow:
    """Subclass, hold works and flows as attributes, call their ``run`` from ``run``."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        object.__setattr__(self, "_name", "root")

    def run(self, *args: Any, **kwargs: Any) -> Any:
        raise NotImplementedError(f"{type(self).__name__} must define run()")

    @property
    def name(self) -> str:
        return self.__dict__.get("_name", "root")

    def _attach_name(self, name: str) -> None:
        """Name this flow by its attribute path from the root flow (the runtime does, when an
        app starts; private, as a Flow's public names are the user's)."""
        object.__setattr__(self, "_name", name)
