"""One asyncio loop per process, on a daemon thread: hosts the origin service and the
HTTP client, so synchronous user code (``Path.get``) can drive async I/O."""

from __future__ import annotations

import asyncio
import os
import threading
from collections.abc import Coroutine
from concurrent.futures import Future
from typing import Any, TypeVar

T = TypeVar("T")


class LoopThread:
    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self.loop.run_forever, name="pathapi-io", daemon=True)
        self._thread.start()

    def submit(self, coro: Coroutine[Any, Any, T]) -> Future[T]:
        return asyncio.run_coroutine_threadsafe(coro, self.loop)

    def run(self, coro: Coroutine[Any, Any, T], timeout: float | None = None) -> T:
        return self.submit(coro).result(timeout)


_lock = threading.Lock()
_instance: tuple[int, LoopThread] | None = None


def io_loop() -> LoopThread:
    """This process's loop (a forked child gets its own)."""
    global _instance
    with _lock:
        if _instance is None or _instance[0] != os.getpid():
            _instance = (os.getpid(), LoopThread())
        return _instance[1]
