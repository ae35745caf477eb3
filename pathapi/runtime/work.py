"""``Work``: a component that runs in its own process, with its own filesystem root.

In the flow's process a Work object is a handle: calling ``run`` sends the call (with the
work's current public attributes) to the work's process and brings the updated attributes
back. In the work's own process the same class runs the user's code.
"""

from __future__ import annotations

import functools
import os
from typing import Any, Protocol

from ..drive import Drive
from ..path import LIT, Path
from .compute import Compute, as_compute
from .context import current


class RunHandle(Protocol):
    """What a Work in the flow's process needs of its handle (the runner's end of the work's
    process): a runner implementation provides at least this (see :mod:`.runner`)."""

    @property
    def is_running(self) -> bool: ...

    def call_run(self, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any: ...

    def wait(self, timeout: float | None = None) -> None: ...

    def stop(self) -> None: ...


def _report_own(work: Work, path: Path) -> None:
    """In a work's process, during its run: tell the flow this work now holds a Path of its
    own, so that ``stop()`` persists it even if the run never returns."""
    ctx = current()
    if ctx is not None and ctx.in_run and ctx.report_path is not None and path.origin_name == ctx.name:
        ctx.report_path(os.fspath(path))


class Work:
    """Subclass and define ``run``. ``parallel=True`` makes ``run`` return at once in the flow;
    ``compute=Compute(...)`` (or the original's ``cloud_compute=CloudCompute(...)``) says what
    it asks of the machine it runs on (read by cluster runners)."""

    _name: str | None
    _parallel: bool
    _handle: RunHandle | None
    _compute: Compute | None

    def __init__(self, *args: Any, parallel: bool = False, compute: Compute | None = None,
                 cloud_compute: Compute | None = None, **kwargs: Any) -> None:
        object.__setattr__(self, "_name", None)
        object.__setattr__(self, "_parallel", parallel)
        object.__setattr__(self, "_handle", None)
        object.__setattr__(self, "_compute", as_compute(compute, cloud_compute))

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        user_run = cls.__dict__.get("run")
        if user_run is None or getattr(user_run, "_pathapi_dispatch", False):
            return

        @functools.wraps(user_run)
        def run(self: Work, *args: Any, **kw: Any) -> Any:
            handle = self.__dict__.get("_handle")
            if handle is not None:  # in the flow's process: run it in the work's process
                return handle.call_run(args, kw)
            return user_run(self, *args, **kw)

        run._pathapi_dispatch = True  # type: ignore[attr-defined]
        cls.run = run  # type: ignore[method-assign]

    def run(self, *args: Any, **kwargs: Any) -> Any:
        raise NotImplementedError(f"{type(self).__name__} must define run()")

    # -- state -------------------------------------------------------------------
    def __setattr__(self, name: str, value: Any) -> None:
        if isinstance(value, str) and value.startswith(LIT):
            value = Path(value)
            value.attach_origin(self)
        elif isinstance(value, Path) and not value.has_origin:
            value.attach_origin(self)
        elif isinstance(value, Drive):  # a Drive held by a work is that work's (its component)
            value.attach_owner(self)
        object.__setattr__(self, name, value)
        if isinstance(value, Path) and not name.startswith("_"):
            _report_own(self, value)

    def __getstate__(self) -> dict[str, Any]:
        state = dict(self.__dict__)
        state["_handle"] = None
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)

    @property
    def name(self) -> str | None:
        """The attribute path from the root flow, e.g. ``root.train`` (None until attached)."""
        return self._name

    @property
    def parallel(self) -> bool:
        return self._parallel

    @property
    def compute(self) -> Compute | None:
        """What the work asks of its machine (None: the default, see :class:`Compute`)."""
        return self.__dict__.get("_compute")

    # -- lifecycle, from the flow ------------------------------------------------
    # -- set by the runtime (private: a Work's public names are the user's) -----------
    def _attach(self, name: str) -> None:
        """Name this work by its attribute path from the root flow."""
        object.__setattr__(self, "_name", name)

    def _set_handle(self, handle: RunHandle | None) -> None:
        """While an app runs, ``run`` and friends in the flow's process go to ``handle``."""
        object.__setattr__(self, "_handle", handle)

    def _require_handle(self, what: str) -> RunHandle:
        handle = self.__dict__.get("_handle")
        if handle is None:
            raise RuntimeError(f"{what}: work {self._name or type(self).__name__} is not running in an app")
        return handle

    @property
    def is_running(self) -> bool:
        """Whether a ``run`` of this work is in progress (for ``parallel=True`` works)."""
        handle = self.__dict__.get("_handle")
        return handle is not None and handle.is_running

    def wait(self, timeout: float | None = None) -> None:
        """Block until the current run finishes; re-raise its error as WorkError."""
        self._require_handle("wait()").wait(timeout)

    def stop(self) -> None:
        """Stop this work's process (after its Paths are persisted)."""
        handle = self.__dict__.get("_handle")
        if handle is not None:
            handle.stop()
