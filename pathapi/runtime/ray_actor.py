"""The work side of the Ray runner: a Ray actor that runs one work's main loop.

The actor is a process of its own on its node; it runs :func:`.main.serve` (the same loop
a local work process runs) on a thread, behind a pair of queues that stand for the pipe:
the flow's handle (:mod:`.ray_runner`) calls :meth:`WorkActor.send` and long-polls
:meth:`WorkActor.recv`. Messages cross as pickled bytes, pickled by the sender, so that an
unpicklable state fails where it fails on a pipe (in ``send``), not inside Ray.

The work arrives pickled too, and is unpickled only once the flow's import path is set:
the work's class lives in the user's module (the app file, a test module), which the
actor's process imports from the folders the flow imported it from.
"""

from __future__ import annotations

import dataclasses
import os
import pickle
import queue
import sys
import threading
import traceback
from typing import Any

import ray
from ray import cloudpickle

from .main import persist_here, serve
from .messages import Failed, Stopped
from .runner import IN_WORK_ENV, AppConfig


class QueueChannel:
    """The work's end of the pipe: ``send`` pickles (raising as a pipe would), ``recv``
    raises EOFError once the flow closed its end."""

    def __init__(self, inbox: queue.Queue[bytes | None], outbox: queue.Queue[bytes | None]) -> None:
        self._in = inbox
        self._out = outbox

    def send(self, obj: Any) -> None:
        self._out.put(cloudpickle.dumps(obj))

    def recv(self) -> Any:
        data = self._in.get()
        if data is None:
            raise EOFError("the flow closed the channel")
        return pickle.loads(data)


class WorkActor:
    """One work, as a Ray actor (made remote by the runner with its resources and node)."""

    def __init__(self, sys_path: list[str], work: bytes, name: str, config: AppConfig) -> None:
        for entry in reversed(sys_path):
            if entry not in sys.path:
                sys.path.insert(0, entry)
        self._in: queue.Queue[bytes | None] = queue.Queue()
        self._out: queue.Queue[bytes | None] = queue.Queue()
        self._thread = threading.Thread(target=self._main, args=(work, name, config), name=f"pathapi-work:{name}", daemon=True)
        self._thread.start()

    def _main(self, blob: bytes, name: str, config: AppConfig) -> None:
        channel = QueueChannel(self._in, self._out)
        try:
            os.environ[IN_WORK_ENV] = name  # an app file that starts the app at import is refused
            work = pickle.loads(blob)
            # The origin service listens on this node's address, which the flow passes on.
            config = dataclasses.replace(config, host=ray.util.get_node_ip_address())
        except BaseException as e:
            channel.send(Failed(f"could not start: its actor cannot load it: {type(e).__name__}: {e}", traceback.format_exc()))
            self._out.put(None)
            return
        try:
            serve(channel, work, name, config)
        finally:
            self._out.put(None)  # end of the channel: the flow's recv raises EOFError

    def send(self, data: bytes) -> None:
        self._in.put(data)

    def recv(self, timeout: float) -> list[bytes | None]:
        """What the work sent, waiting up to ``timeout`` for the first; None marks the end."""
        try:
            items = [self._out.get(timeout=timeout)]
        except queue.Empty:
            return []
        while True:
            try:
                items.append(self._out.get_nowait())
            except queue.Empty:
                return items

    def close(self) -> None:
        """The flow is gone: the loop ends as on a closed pipe."""
        self._in.put(None)

    def where(self) -> tuple[str, str, int]:
        """(node id, node address, pid) of this actor."""
        return ray.get_runtime_context().get_node_id(), ray.util.get_node_ip_address(), os.getpid()


def persist_task(name: str, config: AppConfig, rels: list[str], run: int) -> Stopped:
    """The persist-only process of a work that ``stop()`` ended mid-run, run as a Ray task on
    the work's node (only there are its files)."""
    return persist_here(name, config, rels, run)
