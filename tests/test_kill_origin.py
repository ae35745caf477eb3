"""kill -9 of the origin during a ``get``: the consumer's tree is old or new, never mixed;
the error names the origin work that was lost and says what became of the transfer; the
next get, from the origin started again, finishes without fetching again what had arrived.

Real processes: origin services (``_origin_child.py``) that all serve one folder and share
one cas state folder (so an origin killed while it writes its stat cache leaves that cache
to the next one, which must open it and serve correctly); consumer processes
(``_get_child.py``) run ``Path.get`` as a work does. The consumer holds version 1 of a
checkpoint folder and gets version 2 (a big file replaced, a file patched in place, small
files, links, folders: see ``checkpoint_versions``). The origin is SIGKILLed:

- at ``KILLS`` instants (default 20), one in each slice of the origin's part of a get
  (manifest, chunk batches, up to the last chunk), its length measured and re-estimated as
  the run goes;
- when the consumer has received given shares of the bytes, from an origin that delays each
  chunk batch (so the kill surely falls inside the transfer);
- while it answers slowly (each chunk batch delayed): the kill then lands mid-request.

The existing App-level test (tests/test_transfer_faults.py) kills the origin *work* once
and checks the fallback to the artifact store; this module checks many instants, the
"never mixed" property across files, the error's wording, and the resume.

Soak: ``PATHAPI_SOAK=1 /work/venv/bin/python -m pytest tests/test_kill_origin.py -s -q``
(a 256 MiB file and 60 instants; ``PATHAPI_KILLS`` overrides the count).
"""

from __future__ import annotations

import os
import random
import shutil
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from _faultkit import (
    CONSUMER,
    SOAK,
    SOURCE,
    GetChild,
    GetResult,
    MiB,
    OriginProc,
    Pool,
    Tally,
    checkpoint_versions,
    consumer_job,
    state_leftovers,
)
from trees import listing, write_tree

from cas.workspace import Workspace

BIG = (256 if SOAK else 20) * MiB
KILLS = int(os.environ.get("PATHAPI_KILLS", "60" if SOAK else "20"))


@pytest.fixture(autouse=True, scope="module")
def over_the_network() -> Iterator[None]:
    """Transfers here cross the socket: the kills are timed by the HTTP origin's answers. The resume
    logic is the materializer's, whatever the source; the same-host path's kills are in
    test_samehost.py."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("PATHAPI_SAME_HOST", "0")
        yield
TIMEOUT = 10.0  # the consumer's configured timeout
REL = "ckpt"
TALLY = Tally("test_kill_origin")


@pytest.fixture(scope="module", autouse=True)
def _summary() -> Iterator[None]:
    yield
    TALLY.report()


@dataclass
class Env:
    base: Path
    root: Path  # the origin work's folder
    v1: Path
    v1_state: dict[str, Any]
    v2_state: dict[str, Any]
    needed: dict[str, int]
    pool: Pool
    resumer: GetChild
    origins: list[OriginProc] = field(default_factory=list)  # [current, started ahead]
    n: int = 0

    def _start(self, **options: Any) -> OriginProc:
        self.n += 1
        return OriginProc(self.base / f"origin{self.n:03d}", self.root, state=self.base / "origin-state", **options)

    def origin(self) -> OriginProc:
        """The origin now serving (a new one is started ahead to take over after a kill)."""
        while len(self.origins) < 2:
            self.origins.append(self._start())
        return self.origins[0]

    def killed(self) -> OriginProc:
        """Kill the current origin; the one started ahead takes over."""
        dead = self.origins.pop(0)
        dead.kill()
        return self.origin()


@pytest.fixture(scope="module")
def env(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Env]:
    base = tmp_path_factory.mktemp("killo")
    old, new = checkpoint_versions(random.Random(5), BIG)
    root = base / "origin" / "works" / SOURCE
    write_tree(root / REL, new)
    write_tree(base / "v1", old)
    with Workspace(base / "scratch-state") as ws:
        m1, m2 = ws.snapshot(base / "v1"), ws.snapshot(root / REL)
    held = m1.chunk_ids()
    needed = {cid.hex(): n for cid, n in m2.chunk_sizes().items() if cid not in held}
    pool = Pool(base / "children", size=1)
    resumer = GetChild(base / "children")
    e = Env(base, root, base / "v1", listing(base / "v1"), listing(root / REL), needed, pool, resumer)
    try:
        e.origin().url  # noqa: B018 - started
        yield e
    finally:
        resumer.close()
        pool.close()
        for o in e.origins:
            o.close()


@dataclass
class Trial:
    first: GetResult
    second: GetResult
    requested: list[str]


def check_error(err: dict[str, Any], dest: Path) -> None:
    """The error of a get whose origin died: the type users catch for a lost peer, naming
    the work that was lost, and saying what became of the transfer."""
    assert err["type"] == "OriginUnreachableError" and "ConnectionError" in err["mro"], err
    assert err["work_name"] == SOURCE, err
    message = err["message"]
    assert repr(SOURCE) in message and f"The files at {dest} are unchanged" in message, message
    if message.startswith("lost origin work"):  # lost mid-transfer: says what became of what had arrived
        assert message.startswith(f"lost origin work {SOURCE!r} during the get of {REL!r}"), message
        assert "are kept: the next get fetches only the rest" in message or "no chunk had arrived" in message, message
    else:  # lost before its manifest came: nothing moved
        assert "moved nothing" in message, message


def trial(env: Env, fault: str, *, kill_after: float | None = None, kill_at_bytes: int | None = None,
          slow: float = 0.0) -> Trial:
    c = env.base / "trials" / f"t{env.n:03d}"
    dest = c / "works" / CONSUMER / REL
    state = c / "state" / CONSUMER
    shutil.copytree(env.v1, dest, symlinks=True)
    origin = env.origin()
    if slow:  # this trial's origin answers each chunk batch after a delay
        env.origins[0].close()
        origin = env.origins[0] = env._start(delay=slow)
    child = env.pool.take()
    child.go(consumer_job(c, origin.url, origin.secret, REL, timeout=TIMEOUT))
    if kill_after is not None:
        time.sleep(kill_after)
    elif kill_at_bytes is not None:
        child.wait_for(lambda line: line.startswith("chunk ") and int(line.split()[2]) >= kill_at_bytes, 120)
    t_kill = time.monotonic()
    fresh = env.killed()
    first = child.finish(TIMEOUT * 4 + 30)
    child.close()
    lost = torn = 0
    try:
        assert first.code == 0 and len(first.records) + len(first.errors) == 1, first.stderr[-3000:]
        now = listing(dest)
        if first.errors:
            torn = int(now != env.v1_state)
            assert now == env.v1_state, "the origin died mid-get and the consumer's tree is not the old one"
            check_error(first.errors[0], dest)
            assert time.monotonic() - t_kill < TIMEOUT + 5, "the consumer noticed the death only after its timeout"
        else:
            torn = int(now != env.v2_state)
            assert now == env.v2_state
        assert not (state / "txn").exists()
        # The origin is back (a new process on the same folder and state): the get finishes.
        env.resumer.go(consumer_job(c, fresh.url, fresh.secret, REL, timeout=TIMEOUT))
        second = env.resumer.finish()
        requested = [cid for batch in fresh.served() for cid in batch["ids"]]
        lost = sum(env.needed.get(cid, 0) for cid in set(requested) & first.written)
        assert second.records and not second.errors, (second.errors, second.stderr[-2000:])
        assert listing(dest) == env.v2_state
        assert state_leftovers(state) == []
        assert set(requested) <= set(env.needed) and len(requested) == len(set(requested))
        assert not set(requested) & first.written, f"{lost} bytes that had arrived were fetched again"
        if first.records:
            assert requested == []
    except AssertionError:
        TALLY.case(fault, passed=False, bytes_lost=lost, torn=torn)
        raise
    TALLY.case(fault, passed=True, bytes_lost=lost, torn=torn)
    shutil.rmtree(c, ignore_errors=True)
    return Trial(first, second, requested)


@pytest.fixture(scope="module")
def duration(env: Env) -> float:
    """Seconds of the origin's part of an uninterrupted get: from the job being sent to the
    last chunk written (the consumer then only fsyncs and applies)."""
    times = []
    for _ in range(2):
        c = env.base / "baseline" / str(len(times))
        shutil.copytree(env.v1, c / "works" / CONSUMER / REL, symlinks=True)
        env.resumer.go(consumer_job(c, env.origin().url, env.origin().secret, REL, timeout=TIMEOUT))
        r = env.resumer.finish()
        assert r.records and listing(c / "works" / CONSUMER / REL) == env.v2_state, r.errors
        times.append(r.last_chunk_at)
        env.origin().served()
    return max(times)


def test_origin_killed_at_random_instants_leaves_old_or_new_never_mixed(env: Env, duration: float) -> None:
    """One kill in each of KILLS slices of the origin's part of a get (until the last chunk
    is written), re-estimated from each get that finished before its kill (a shared
    machine's speed drifts)."""
    rng = random.Random(os.environ.get("PATHAPI_KILL_SEED", "31"))
    span = duration
    outcomes: dict[str, int] = {"finished": 0, "failed, tree old": 0}
    for i in range(KILLS):
        t = trial(env, "origin SIGKILL at a random instant", kill_after=(i + rng.random()) * 1.05 * span / KILLS)
        outcomes["finished" if t.first.records else "failed, tree old"] += 1
        if t.first.records:  # it was faster than thought
            span = t.first.last_chunk_at
    print(f"get takes ~{duration:.2f}s (last {span:.2f}s); {KILLS} origin kills in it: {outcomes}")
    assert outcomes["failed, tree old"] >= KILLS // 2, outcomes


@pytest.mark.parametrize("fraction", [0.02, 0.3])
def test_origin_killed_mid_transfer_fails_naming_the_lost_work_and_resumes(env: Env, fraction: float) -> None:
    total = sum(env.needed.values())
    # Each chunk batch waits 1 s at the origin: otherwise a small tree is sent whole (all its
    # batches in flight at once) before the consumer has written 2 % of it. The third batch
    # (of ~8 MiB each) is then still to come when the consumer has written 30 %.
    t = trial(env, "origin SIGKILL at a byte count", kill_at_bytes=int(total * fraction), slow=1.0)
    assert t.first.errors, "the get finished although its origin was killed mid-transfer"
    assert 0 < len(t.first.written) < len(env.needed)
    assert len(t.requested) <= len(env.needed) - len(t.first.written)


def test_origin_killed_while_answering_slowly(env: Env) -> None:
    """Each chunk batch waits 0.5 s at the origin: the kill lands inside a request."""
    t = trial(env, "origin SIGKILL while slow", kill_after=1.0, slow=0.5)
    assert t.first.errors
    message = t.first.errors[0]["message"]
    assert "within" not in message  # a dead peer is reported as such, not as a timeout
