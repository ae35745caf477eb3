"""``App``: starts every work of a flow in its own process, runs the flow once, stops them."""

from __future__ import annotations

import os
import secrets
from typing import Any

from .flow import Flow, walk_works
from .runner import AppConfig, WorkHandle

DEFAULT_TIMEOUT = float(os.environ.get("PATHAPI_TIMEOUT", "30"))


class App:
    """``App(flow, root=None, store=None).run()``; ``root`` defaults to ``./.pathapi``.

    ``timeout`` bounds every wait on another work's origin (seconds); ``host`` is the address
    origin services bind to (loopback unless configured).
    """

    def __init__(self, flow: Flow, root: str | os.PathLike[str] | None = None, store: str | os.PathLike[str] | None = None,
                 *, timeout: float = DEFAULT_TIMEOUT, host: str = "127.0.0.1", start_timeout: float = 120.0) -> None:
        self.flow = flow
        self.root = os.path.abspath(os.fspath(root) if root is not None else ".pathapi")
        self.store = os.fspath(store) if store is not None else None
        self.timeout = timeout
        self.host = host
        self.start_timeout = start_timeout
        self.handles: dict[str, WorkHandle] = {}

    def _registry(self) -> dict[str, str | None]:
        # A work that stopped or died serves nothing: its Paths come from the artifact store.
        return {name: (None if h.stopped or not h.process.is_alive() else h.url) for name, h in self.handles.items()}

    def run(self) -> Any:
        works = list(walk_works(self.flow, "root"))
        seen: dict[int, str] = {}
        for name, w in works:
            if id(w) in seen:
                raise ValueError(f"the same work object is attached twice: {seen[id(w)]} and {name}")
            seen[id(w)] = name
            object.__setattr__(w, "_name", name)
        config = AppConfig(self.root, self.store, secrets.token_urlsafe(32), self.timeout, self.host)
        os.makedirs(self.root, exist_ok=True)
        self.handles = {name: WorkHandle(w, name, config, self._registry) for name, w in works}
        try:
            for h in self.handles.values():
                h.start()
            for h in self.handles.values():
                h.wait_ready(self.start_timeout)
            for name, w in works:
                object.__setattr__(w, "_handle", self.handles[name])
            return self.flow.run()
        finally:
            for h in self.handles.values():
                h.stop()
            for _, w in works:
                object.__setattr__(w, "_handle", None)
