"""The Ray runner: each work runs as a Ray actor (a process of its own) on a node of a cluster.

Ray is the cluster engine users already run; pathapi writes no scheduler. This module is the
flow's end: :class:`RayRunner` connects to the cluster, places the works
(:mod:`.placement`: a node each when there are enough), and makes a :class:`RayHandle` per
work. A RayHandle is a :class:`~.process.ProcessHandle` whose process is an actor and whose
pipe is two actor methods (:mod:`.ray_actor`), so every guarantee of
:mod:`.runner` is kept by the same code as for local processes:

- ``start`` fails at once naming the work when it cannot be sent; ``wait_ready`` returns
  the URL of its origin service, which listens on its node's address;
- an actor that dies (it crashed, or its node was lost) fails the run it was in with
  :class:`~pathapi.errors.WorkError` saying which, delivered once;
- ``stop`` persists as the work left its files (a persist task on the work's node when the
  run had to be ended) and kills the actor;
- nothing waits forever on a cluster that went away: a watch probes the cluster's address
  every second; once it has not answered for a few seconds every wait ends with a
  WorkError (or :class:`~pathapi.errors.ClusterError`) naming the address.
"""

from __future__ import annotations

import logging
import pickle
import socket
import sys
import threading
import time
from collections import deque
from typing import Any

import ray
import ray.exceptions
from ray import cloudpickle
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

from ..errors import ClusterError, WorkError
from .compute import Compute
from .messages import Stopped
from .placement import Node, Placement, plan
from .process import Channel, ProcessHandle, WorkProcess
from .ray_actor import WorkActor, persist_task
from .runner import AppConfig, Registry, Runner
from .work import Work

log = logging.getLogger("pathapi.ray")

#: How often the watch probes the cluster, and after how many failed probes in a row it is gone.
PROBE_SECONDS = 1.0
PROBES_LOST = 3
#: One long-poll of a work's actor (bounds how late a death or a lost cluster is noticed).
POLL_SECONDS = 1.0
#: How long an actor whose connection broke may take to be reported dead or node-lost.
SETTLE_SECONDS = 20.0
#: Threads of a work's actor: the flow's send and its long-poll run side by side.
ACTOR_THREADS = 4


def _host_port(address: str) -> tuple[str, int] | None:
    """(host, port) of ``HOST:PORT`` or ``ray://HOST:PORT``; None for ``auto``."""
    text = address.removeprefix("ray://")
    host, sep, port = text.rpartition(":")
    if not sep or not port.isdigit():
        return None
    return host.strip("[]"), int(port)


def _answers(hp: tuple[str, int], timeout: float) -> str | None:
    """None if a TCP connection to ``hp`` opens within ``timeout``, else why not."""
    try:
        with socket.create_connection(hp, timeout=timeout):
            return None
    except OSError as e:
        return f"{type(e).__name__}: {e}"


class ClusterWatch:
    """Probes the cluster's address in the background; :attr:`lost` says why it is gone
    (None while it answers). Also keeps which nodes are alive, asked of Ray on another
    thread, so that no caller blocks on a cluster that does not answer."""

    def __init__(self, address: str, probe: tuple[str, int] | None) -> None:
        self.address = address
        self.lost: str | None = None
        self.alive_nodes: set[str] | None = None  # None: not known yet
        self._probe = probe
        self._stop = threading.Event()
        self._threads = [threading.Thread(target=self._probe_loop, name="pathapi-ray-probe", daemon=True),
                         threading.Thread(target=self._nodes_loop, name="pathapi-ray-nodes", daemon=True)]
        for t in self._threads:
            t.start()

    def _probe_loop(self) -> None:
        misses = 0
        while not self._stop.wait(PROBE_SECONDS):
            if self._probe is None:
                return
            why = _answers(self._probe, timeout=PROBE_SECONDS)
            misses = misses + 1 if why else 0
            if misses >= PROBES_LOST:
                self.lost = f"the Ray cluster at {self.address} went away (no answer for {misses} s: {why})"
                return

    def _nodes_loop(self) -> None:
        while self.lost is None and not self._stop.is_set():
            try:
                self.alive_nodes = {n["NodeID"] for n in ray.nodes() if n.get("Alive")}
            except Exception:  # noqa: BLE001 - a cluster going away: the probe says so
                pass
            self._stop.wait(PROBE_SECONDS / 2)

    def node_alive(self, node_id: str) -> bool:
        return self.lost is None and (self.alive_nodes is None or node_id in self.alive_nodes)

    def close(self) -> None:
        self._stop.set()


class RayRunner(Runner):
    """Runs each work as a Ray actor on the cluster at ``address`` (``auto``, ``HOST:PORT`` or
    ``ray://HOST:PORT``). A process already connected to that cluster (``ray.init``) keeps
    its connection; otherwise the runner connects in :meth:`open` and disconnects in :meth:`close`."""

    needs_shared_store = True
    #: works may be on other machines: App(tls=None) turns TLS on (pathapi.wire.tls.tls_enabled)
    is_local = False

    def __init__(self, address: str = "auto", connect_timeout: float = 10.0) -> None:
        self.address = address
        self.connect_timeout = connect_timeout
        self.placement = Placement({})
        self.nodes: list[Node] = []
        self.watch: ClusterWatch | None = None
        self._connected_here = False

    # -- the cluster -------------------------------------------------------------------
    def _connect(self) -> None:
        hp = _host_port(self.address)
        if hp is not None:
            why = _answers(hp, timeout=self.connect_timeout)
            if why is not None:
                raise ClusterError(f"no Ray cluster reachable at {self.address}: {why} "
                                   "(start one with `ray start --head`, or set RAY_ADDRESS)", self.address)
        if ray.is_initialized():
            current = ray.get_runtime_context().gcs_address
            if hp is not None and not self.address.startswith("ray://") and _host_port(current) != hp:
                raise ClusterError(f"this process is connected to the Ray cluster at {current}, not {self.address}; "
                                   "call ray.shutdown() first", self.address)
            return
        try:
            ray.init(address=self.address, logging_level=logging.WARNING, log_to_driver=True)
        except Exception as e:  # ConnectionError, RuntimeError, ValueError: ray says why
            raise ClusterError(f"cannot connect to the Ray cluster at {self.address}: {type(e).__name__}: {e}",
                               self.address) from e
        self._connected_here = True

    def _probe_address(self) -> tuple[str, int] | None:
        if self.address.startswith("ray://"):
            return _host_port(self.address)
        return _host_port(ray.get_runtime_context().gcs_address)

    def open(self, works: list[tuple[str, Work]], config: AppConfig) -> None:
        self._connect()
        self.nodes = [Node(n["NodeID"], n["NodeManagerAddress"], dict(n.get("Resources", {})))
                      for n in ray.nodes() if n.get("Alive")]
        self.placement = plan([(name, w.compute) for name, w in works], self.nodes)
        if self.placement.unplaceable:
            asked = "; ".join(f"{name} asks for {demands}" for name, demands in self.placement.unplaceable.items())
            have = "; ".join(f"{n.node_id[:12]} ({n.address}): {dict(n.resources)}" for n in self.nodes)
            self.close()
            raise ClusterError(f"no node of the Ray cluster at {self.address} has the resources some works ask for: "
                               f"{asked}. The nodes have: {have}", self.address)
        sharing = self.placement.describe_sharing(self.nodes)
        if sharing:
            log.warning("pathapi: %s", sharing)
        self.watch = ClusterWatch(self.address, self._probe_address())

    def close(self) -> None:
        watch, self.watch = self.watch, None
        lost = watch.lost if watch is not None else None
        if watch is not None:
            watch.close()
        if self._connected_here:
            self._connected_here = False
            # With the cluster gone Ray takes a while to let go (and would end this
            # process later if never told): bounded, on a thread.
            t = threading.Thread(target=ray.shutdown, name="pathapi-ray-shutdown", daemon=True)
            t.start()
            t.join(30 if lost else 60)

    @property
    def lost(self) -> str | None:
        return self.watch.lost if self.watch is not None else None

    def node_alive(self, node_id: str) -> bool:
        return self.watch is None or self.watch.node_alive(node_id)

    def node_address(self, node_id: str) -> str:
        return next((n.address for n in self.nodes if n.node_id == node_id), "?")

    def handle(self, work: Work, name: str, config: AppConfig, registry: Registry) -> RayHandle:
        return RayHandle(work, name, config, registry, self, self.placement.nodes[name])


def actor_options(compute: Compute | None, node_id: str) -> dict[str, Any]:
    """Ray actor options for a work: its node, and the resources it holds (none without a
    ``compute``: Ray's default for actors, one CPU to schedule by, none held)."""
    options: dict[str, Any] = {
        "scheduling_strategy": NodeAffinitySchedulingStrategy(node_id, soft=False),
        "max_concurrency": ACTOR_THREADS,
        "max_restarts": 0,
        "max_task_retries": 0,
    }
    if compute is not None:
        options["num_cpus"] = compute.cpus
        options["num_gpus"] = compute.gpus
        if compute.memory is not None:
            options["memory"] = compute.memory
        if compute.resources:
            options["resources"] = dict(compute.resources)
    return options


_RemoteWorkActor = ray.remote(WorkActor)
_remote_persist = ray.remote(persist_task)


class _Waiting:
    """Waits on one Ray reference in short steps, so that a lost cluster ends the wait."""

    def __init__(self, runner: RayRunner) -> None:
        self.runner = runner

    def ready(self, ref: Any, timeout: float | None) -> bool:
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            if self.runner.lost:
                return False
            step = POLL_SECONDS if deadline is None else max(0.0, min(POLL_SECONDS, deadline - time.monotonic()))
            done, _ = ray.wait([ref], timeout=step)
            if done:
                return True
            if deadline is not None and time.monotonic() >= deadline:
                return False


class ActorProcess:
    """The stand-in for a work's process: its actor, made in :meth:`start`."""

    pid: int | None = None  # it runs elsewhere
    exitcode: int | None = None

    def __init__(self, handle: RayHandle) -> None:
        self.handle = handle
        self.actor: Any = None
        self.error: BaseException | None = None  # why the actor is gone, once known
        self.ended = False  # its main loop ended (the channel's end arrived)
        self.killed = False

    def start(self) -> None:
        h = self.handle
        # Here, so that an unpicklable work fails start() at once. cloudpickle: classes of a
        # script run as __main__ go by value (an actor cannot import the script's __main__).
        blob = cloudpickle.dumps(h.work)
        path = [p for p in sys.path if p]
        self.actor = _RemoteWorkActor.options(**actor_options(h.work.compute, h.node_id)).remote(path, blob, h.name, h.config)

    def is_alive(self) -> bool:
        runner = self.handle.runner
        return (self.actor is not None and self.error is None and not self.killed and not runner.lost
                and runner.node_alive(self.handle.node_id))

    def gone(self, error: BaseException) -> None:
        if self.error is None:
            self.error = error

    def terminate(self) -> None:
        self.kill()

    def kill(self) -> None:
        if self.actor is not None and not self.killed and not self.handle.runner.lost:
            try:
                ray.kill(self.actor, no_restart=True)
            except Exception:  # noqa: BLE001 - already gone
                pass
        self.killed = True

    def join(self, timeout: float | None = None) -> None:
        """Once the work's loop ended, end its actor; return once the actor is gone (or
        ``timeout`` passed, or the cluster is gone)."""
        if self.actor is None or self.handle.runner.lost:
            return
        if self.ended and not self.killed:
            self.kill()
        if not self.killed:
            return  # still running: a join that waits is stop()'s, which kills first
        deadline = time.monotonic() + (timeout if timeout is not None else 30.0)
        waiting = _Waiting(self.handle.runner)
        while time.monotonic() < deadline:
            ref = self.actor.where.remote()
            if not waiting.ready(ref, deadline - time.monotonic()):
                return
            try:
                ray.get(ref)
            except ray.exceptions.RayActorError:
                return  # gone
            time.sleep(0.05)

    def _settle(self) -> None:
        """An actor that is only "unavailable" (its connection broke) is dead or its node is
        lost: ask until Ray says which (bounded), so the error says the right one."""
        h = self.handle
        deadline = time.monotonic() + SETTLE_SECONDS
        while isinstance(self.error, ray.exceptions.ActorUnavailableError) and time.monotonic() < deadline:
            if h.runner.lost or not h.runner.node_alive(h.node_id):
                return
            ref = self.actor.where.remote()
            if _Waiting(h.runner).ready(ref, POLL_SECONDS):
                try:
                    ray.get(ref)
                except ray.exceptions.RayActorError as e:
                    if not isinstance(e, ray.exceptions.ActorUnavailableError):
                        self.error = e
                    continue
                return  # it answers: not dead after all
            time.sleep(0.2)

    def describe(self) -> str:
        """Why the actor is gone, for ``the work's process died (...)``."""
        h = self.handle
        if h.runner.lost:
            return h.runner.lost
        self._settle()
        text = str(getattr(self.error, "error_msg", None) or self.error or "")
        node = f"{h.node_id[:12]} ({h.runner.node_address(h.node_id)})"
        if "node has died" in text or not h.runner.node_alive(h.node_id):
            return f"its node {node} was lost: the Ray node hosting the work died"
        detail = " ".join(line.strip() for line in text.splitlines()
                          if line.strip() and not line.strip().startswith(("class_name:", "actor_id:", "namespace:")))
        return f"its Ray actor on node {node} died: {detail or 'no reason given'}"


class ActorChannel:
    """The flow's end of the pipe to a work's actor, with a pipe's behaviour: ``recv``
    raises EOFError once the work's loop ended or its actor is gone; ``poll`` is True then too."""

    def __init__(self, process: ActorProcess) -> None:
        self.process = process
        self._buffer: deque[bytes] = deque()
        self._eof = False
        self._pending: Any = None  # the one outstanding recv call (never two: none is lost)
        self._waiting = _Waiting(process.handle.runner)

    def send(self, obj: Any) -> None:
        data = cloudpickle.dumps(obj)  # a PicklingError here, as on a pipe
        if self._eof or self.process.actor is None:
            raise BrokenPipeError("the work's actor is gone")
        ref = self.process.actor.send.remote(data)
        while not self._waiting.ready(ref, None):
            if self.process.handle.runner.lost:
                self._eof = True
                raise BrokenPipeError(self.process.handle.runner.lost)
        try:
            ray.get(ref)
        except ray.exceptions.RayActorError as e:
            self.process.gone(e)
            self._eof = True
            raise BrokenPipeError(str(e)) from None

    def _fetch(self, timeout: float) -> None:
        if self._eof:
            return
        if self.process.handle.runner.lost:
            self._eof = True
            return
        if self._pending is None:
            self._pending = self.process.actor.recv.remote(POLL_SECONDS)
        if not self._waiting.ready(self._pending, timeout):
            if self.process.handle.runner.lost:
                self._eof = True
            return
        ref, self._pending = self._pending, None
        try:
            items = ray.get(ref)
        except ray.exceptions.RayActorError as e:
            self.process.gone(e)
            self._eof = True
            return
        for item in items:
            if item is None:
                self._eof = True
                self.process.ended = True
            else:
                self._buffer.append(item)

    def poll(self, timeout: float | None = None) -> bool:
        deadline = None if timeout is None else time.monotonic() + timeout
        while not self._buffer and not self._eof:
            left = POLL_SECONDS if deadline is None else deadline - time.monotonic()
            if left <= 0:
                return False
            self._fetch(min(left, POLL_SECONDS + 1))
        return True

    def recv(self) -> Any:
        self.poll(None)
        if self._buffer:
            return pickle.loads(self._buffer.popleft())
        raise EOFError(self.process.describe() if self.process.error is not None else "the work's loop ended")

    def close(self) -> None:
        if self.process.actor is not None and not self._eof and not self.process.handle.runner.lost:
            try:
                self.process.actor.close.remote()
            except Exception:  # noqa: BLE001 - already gone
                pass


class _NoChannel:
    """The end a spawned process would inherit: an actor has none here."""

    def send(self, obj: Any) -> None:
        raise BrokenPipeError("not connected")

    def recv(self) -> Any:
        raise EOFError

    def poll(self, timeout: float | None = None) -> bool:
        return True

    def close(self) -> None:
        pass


class RayHandle(ProcessHandle):
    """The flow's end of one work running as a Ray actor on node ``node_id``."""

    def __init__(self, work: Work, name: str, config: AppConfig, registry: Registry, runner: RayRunner, node_id: str) -> None:
        self.runner = runner
        self.node_id = node_id
        super().__init__(work, name, config, registry)

    def _endpoints(self) -> tuple[Channel, WorkProcess, Channel]:
        process = ActorProcess(self)
        self._actor_process = process
        return ActorChannel(process), process, _NoChannel()

    def _death(self) -> str:
        return self._actor_process.describe()

    def wait_ready(self, timeout: float) -> str:
        try:
            return super().wait_ready(timeout)
        except WorkError as e:
            if self.runner.lost:
                raise WorkError(self.name, f"could not start: {self.runner.lost}") from None
            if "did not start within" in str(e):
                asked = (self.work.compute.demands() if self.work.compute is not None else "the default")
                raise WorkError(self.name, f"{e.args[0].split(': ', 1)[-1]} on node {self.node_id[:12]} "
                                           f"({self.runner.node_address(self.node_id)}): is the node busy, or short of "
                                           f"the resources it asks for ({asked})?") from None
            raise

    def _persist_as_left(self, rels: list[str], timeout: float) -> list[str]:
        """Persist on the work's node, in a task of its own (the actor was killed first)."""
        if not rels:
            return []
        what = ", ".join(rels)
        if self.runner.lost:
            return [f"{what}: not persisted: {self.runner.lost}"]
        if not self.runner.node_alive(self.node_id):
            return [f"{what}: not persisted: the work's node {self.node_id[:12]} was lost"]
        ref = _remote_persist.options(
            scheduling_strategy=NodeAffinitySchedulingStrategy(self.node_id, soft=False), num_cpus=0, max_retries=0,
        ).remote(self.name, self.config, rels, self.runs)
        if not _Waiting(self.runner).ready(ref, timeout):
            return [f"{what}: not persisted within {timeout:g} s" + (f": {self.runner.lost}" if self.runner.lost else "")]
        try:
            result: Stopped = ray.get(ref)
        except Exception as e:  # noqa: BLE001 - the task or its node died: said, not raised
            return [f"{what}: the persisting task failed: {type(e).__name__}: {e}"]
        return list(result.persist_errors)

    def location(self) -> tuple[str, str]:
        """(node id, node address) the work runs on."""
        return self.node_id, self.runner.node_address(self.node_id)
