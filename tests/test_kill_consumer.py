"""kill -9 of the consumer during a ``get``: the next get completes, the tree is exact, no
temporary file is left, and no chunk the killed get had already written is fetched again.

Real processes throughout: an origin service in its own process (``_origin_child.py``)
serves a checkpoint folder; a consumer process (``_get_child.py``) runs ``Path.get`` exactly
as a work does and is SIGKILLed; a second consumer process then gets again, from a second
origin process serving the same files (so what that origin logs is what the *resumed* get
asked for, counted on the origin's side, independently of the consumer's own figures).

The consumer holds version 1 of the folder and gets version 2, in which a big file is
replaced (staged whole), a smaller one is patched in place (ranges journaled), small files
change, appear and disappear, a link moves, an exec bit flips, folders come and go. Kills:

- at ``KILLS`` instants (default 30), one in each slice of the get's own work, timed from
  the moment it begins staging (fetch, fsync, commit, apply, clean-up), and at three
  instants before it (manifest, snapshot of the local copy);
- when the consumer reports having received given byte counts (killed from outside);
- at exact points (self-inflicted SIGKILL): after K chunks were written, just before the
  journal's commit, at operations of the apply phase, while the finished transaction is
  removed; and repeatedly, the resumed get itself killed again.

After each kill, before the next get: no journal committed means the tree is exactly
version 1 (or 2 if the kill came during clean-up); a committed journal leaves each entry old
or new. After the next get: the tree is exactly version 2; the consumer's state folder holds
no transaction, staging or resume folder; the origin sent only chunks the consumer lacked,
each once, and none that the killed get had written ("bytes lost", goal 0).

The consumer's disk fills up: a real 16 MiB tmpfs, mounted by the test (skipped, saying
why, where mounting is not permitted; CI runs as root), holds the consumer's files and
state. A get that does not fit fails with ``MaterializeError`` (ENOSPC, naming the
destination) and leaves the previous tree and the free space as they were; a sweep of
nearly full disks (1 KiB steps around "just fits") never fails a sync that put its files in
place. (EFBIG from RLIMIT_FSIZE: tests/test_materialize_faults.py.)

Soak (a 1 GiB file, 60 random instants):
``PATHAPI_SOAK=1 /work/venv/bin/python -m pytest tests/test_kill_consumer.py -s -q``
(``PATHAPI_KILLS`` sets the number of random instants; ``-s`` shows the fault summary).
"""

from __future__ import annotations

import errno
import json
import os
import random
import shutil
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from _faultkit import (
    CONSUMER,
    SOAK,
    SOURCE,
    GetChild,
    GetResult,
    KiB,
    MiB,
    OriginProc,
    Pool,
    Tally,
    checkpoint_versions,
    consumer_job,
    state_leftovers,
)
from trees import File, listing, write_tree

from cas import LocalChunkStore, MaterializeError, SeedSource
from cas.plan import Action, plan_update
from cas.workspace import Workspace

BIG = (1024 if SOAK else 20) * MiB
KILLS = int(os.environ.get("PATHAPI_KILLS", "60" if SOAK else "30"))


@pytest.fixture(autouse=True, scope="module")
def over_the_network() -> Iterator[None]:
    """Transfers here cross the socket: what the origin sent is counted on its HTTP side, and the consumer's
    progress by its HTTP source. The resume
    logic is the materializer's, whatever the source; the same-host path's kills are in
    test_samehost.py."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("PATHAPI_SAME_HOST", "0")
        yield
REL = "ckpt"
TALLY = Tally("test_kill_consumer")


@pytest.fixture(scope="module", autouse=True)
def _summary() -> Iterator[None]:
    yield
    TALLY.report()


@dataclass
class Env:
    base: Path
    v1: Path  # pristine copy of version 1 (what each consumer starts from)
    v1_state: dict[str, Any]
    v2_state: dict[str, Any]
    needed: dict[str, int]  # hex id -> size of every chunk of v2 the consumer lacks
    origin_a: OriginProc  # serves the gets that are killed
    origin_b: OriginProc  # serves the gets that follow them
    pool: Pool  # children started ahead for the gets that are killed
    resumer: GetChild  # one long-lived child runs every get that must finish
    trials: int = 0
    apply_events: int | None = None  # file system operations of an uninterrupted apply phase


@pytest.fixture(scope="module")
def env(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Env]:
    base = tmp_path_factory.mktemp("killc")
    old, new = checkpoint_versions(random.Random(11), BIG)
    root = base / "origin" / "works" / SOURCE
    write_tree(root / REL, new)
    write_tree(base / "v1", old)
    with Workspace(base / "scratch-state") as ws:
        m1, m2 = ws.snapshot(base / "v1"), ws.snapshot(root / REL)
    held = m1.chunk_ids()
    needed = {cid.hex(): n for cid, n in m2.chunk_sizes().items() if cid not in held}
    actions = {s.path: s.action for s in plan_update(m1, m2).steps}
    assert actions["big.bin"] == Action.PLACE and actions["model.bin"] == Action.PATCH, actions
    a = OriginProc(base / "origin-a", root)
    b = OriginProc(base / "origin-b", root)
    pool = Pool(base / "children", size=1)
    resumer = GetChild(base / "children")
    a.url, b.url  # noqa: B018 - both have started
    try:
        yield Env(base, base / "v1", listing(base / "v1"), listing(root / REL), needed, a, b, pool, resumer)
    finally:
        resumer.close()
        pool.close()
        a.close()
        b.close()


@dataclass
class Trial:
    first: GetResult  # the get that was killed (or finished before the kill)
    second: GetResult  # the get after it
    committed: bool  # the killed get had committed its journal
    requested: list[str]  # ids the second get was sent (origin B's log)
    bytes_served: int
    kill_delay: float | None = None


def _consumer(env: Env, name: str) -> tuple[Path, Path, Path]:
    c = env.base / "trials" / name
    dest = c / "works" / CONSUMER / REL
    shutil.copytree(env.v1, dest, symlinks=True)
    return c, dest, c / "state" / CONSUMER


def _journal(state: Path) -> list[Any] | None:
    try:
        return json.loads((state / "txn" / "ops").read_text())["ops"]  # type: ignore[no-any-return]
    except FileNotFoundError:
        return None


def check_after_kill(env: Env, dest: Path, state: Path) -> bool:
    """The tree the killed get left: never torn. Returns whether a journal is committed."""
    now = listing(dest)
    ops = _journal(state)
    if ops is None:
        assert now in (env.v1_state, env.v2_state), "no journal committed, yet the tree is neither version"
        return False
    in_flight = {op[1] for op in ops if op[0] == "patch"}  # finished by the next get's recover
    assert now is not None
    for rel, node in now.items():
        if rel in in_flight:
            assert node[0] == "file"
        else:
            assert node in (env.v1_state.get(rel), env.v2_state.get(rel)), f"{rel} is neither old nor new: {node}"
    return True


def trial(env: Env, fault: str, *, kill_after: float | None = None, kill_after_stage: float | None = None,
          kill_at_bytes: int | None = None, die_at: dict[str, Any] | None = None,
          chain: list[dict[str, Any]] | None = None) -> Trial:
    """One consumer get of v2 over v1, interrupted as told (SIGKILL ``kill_after`` seconds
    after the job was sent, or ``kill_after_stage`` seconds after the get began staging, or
    once it received ``kill_at_bytes``, or at ``die_at``), then a get that must finish.
    ``chain``: die_at points of further gets, each killed again before the last one runs."""
    env.trials += 1
    c, dest, state = _consumer(env, f"t{env.trials:03d}")
    job = consumer_job(c, env.origin_a.url, env.origin_a.secret, REL, die_at=die_at)
    child = env.pool.take()
    child.go(job)
    if kill_after is not None:
        time.sleep(kill_after)
        child.kill()
    elif kill_after_stage is not None:
        if child.wait_for(lambda line: line == "phase stage", 120) is not None:
            time.sleep(kill_after_stage)
        child.kill()
    elif kill_at_bytes is not None:
        child.wait_for(lambda line: line.startswith("chunk ") and int(line.split()[2]) >= kill_at_bytes, 120)
        child.kill()
    first = child.finish()
    child.close()
    assert first.code in (0, -9), first.stderr
    assert not first.errors, first.errors
    written = set(first.written)
    committed = check_after_kill(env, dest, state)
    for point in chain or []:  # the next gets are killed too
        again = env.pool.take()
        again.go(consumer_job(c, env.origin_a.url, env.origin_a.secret, REL, die_at=point))
        got = again.finish()
        again.close()
        assert got.killed and not got.errors, (point, got.errors, got.stderr)
        refetched = got.written & written
        assert not refetched, f"{len(refetched)} chunk(s) written by an earlier, killed get were fetched again"
        written |= got.written
        committed = check_after_kill(env, dest, state)
    env.origin_b.served()  # (nothing yet: B serves only the gets that finish)
    env.resumer.go(consumer_job(c, env.origin_b.url, env.origin_b.secret, REL))
    second = env.resumer.finish()
    served = env.origin_b.served()
    requested = [cid for batch in served for cid in batch["ids"]]
    t = Trial(first, second, committed, requested, sum(b["bytes"] for b in served), kill_after)
    lost = sum(env.needed.get(cid, 0) for cid in set(requested) & written)
    torn = 0
    try:
        assert second.code == 0 and len(second.records) == 1, (second.errors, second.stderr[-2000:])
        now = listing(dest)
        torn = int(now != env.v2_state)
        assert now == env.v2_state, "the get after the kill did not produce version 2 exactly"
        assert state_leftovers(state) == [], "the consumer's state folder kept a transaction or staging"
        assert os.listdir(c / "works") == [CONSUMER] and os.listdir(dest.parent) == [REL], "files left next to the tree"
        assert len(requested) == len(set(requested)), "a chunk was sent twice in one get"
        assert set(requested) <= set(env.needed), "a chunk the consumer already held was fetched"
        assert not set(requested) & written, f"{lost} bytes written before the kill were fetched again"
        record = second.records[0]
        assert record["chunks_transferred"] == len(requested)
        assert record["bytes_transferred"] == t.bytes_served
        if committed:
            assert requested == [], "a committed get was fetched again instead of finished"
        elif first.code == 0:
            assert requested == []  # it had finished: the next get moves nothing
        else:
            # Everything the killed gets had not written, at most the one chunk being written
            # at the kill (it may have landed whole in the staging) and nothing else.
            rest = set(env.needed) - written - set(requested)
            assert len(rest) <= (0 if die_at or chain else 1), f"{len(rest)} needed chunk(s) never fetched"
    except AssertionError:
        TALLY.case(fault, passed=False, bytes_lost=lost, torn=torn)
        raise
    TALLY.case(fault, passed=True, bytes_lost=lost, torn=torn)
    shutil.rmtree(c, ignore_errors=True)
    return t


@pytest.fixture(scope="module")
def timing(env: Env) -> tuple[float, float]:
    """(seconds from the job being sent to staging, seconds from staging to the get's end)
    of an uninterrupted get (the slower of two)."""
    before, after = [], []
    for _ in range(2):
        t = trial(env, "no kill (baseline)")
        assert t.first.code == 0 and t.first.records
        assert t.first.records[0]["chunks_transferred"] == len(env.needed)
        before.append(t.first.phase_times["stage"])
        after.append(t.first.elapsed - t.first.phase_times["stage"])
    return max(before), max(after)


def test_consumer_killed_at_random_instants_resumes_exact_and_fetches_nothing_twice(env: Env, timing: tuple[float, float]) -> None:
    """KILLS kills, one in each slice of the get's own work, timed from the moment it begins
    staging (fetch, fsync, commit, apply, clean-up), plus three before it (manifest, snapshot
    of the local copy). The length of that work is re-estimated from each get that finished
    before its kill: a shared machine's speed drifts, and the instants must follow it."""
    rng = random.Random(os.environ.get("PATHAPI_KILL_SEED", "23"))
    to_stage, span = timing
    outcomes = {"finished": 0, "killed before commit": 0, "killed after commit": 0}
    written_before_kill = []
    for i in range(3):
        trial(env, "consumer SIGKILL at a random instant", kill_after=(i + rng.random()) * to_stage / 3)
    for i in range(KILLS):
        t = trial(env, "consumer SIGKILL at a random instant", kill_after_stage=(i + rng.random()) * 1.05 * span / KILLS)
        outcomes["finished" if t.first.code == 0 else "killed after commit" if t.committed else "killed before commit"] += 1
        written_before_kill.append(len(t.first.written))
        if t.first.code == 0:  # it was faster than thought
            span = t.first.elapsed - t.first.phase_times["stage"]
    print(f"staging starts ~{to_stage:.2f}s after the job, the get's work takes ~{timing[1]:.2f}s (last {span:.2f}s); "
          f"{KILLS} kills in it: {outcomes}; chunks written before each kill (of {len(env.needed)}): {written_before_kill}")
    # Most kills did land inside the get, many of them mid-fetch.
    assert outcomes["finished"] <= KILLS // 2, outcomes
    assert sum(1 for n in written_before_kill if 0 < n < len(env.needed)) >= KILLS // 5, written_before_kill


@pytest.mark.parametrize("fraction", [0.05, 0.3, 0.6, 0.9])
def test_consumer_killed_after_receiving_a_share_of_the_bytes_resumes_from_there(env: Env, fraction: float) -> None:
    total = sum(env.needed.values())
    t = trial(env, "consumer SIGKILL at a byte count", kill_at_bytes=int(total * fraction))
    assert t.first.killed
    got = sum(env.needed[c] for c in t.first.written)
    assert got >= total * fraction - 2 * MiB  # it was killed past that point, and
    assert t.bytes_served <= total - got + 2 * MiB  # only what it had not yet received was sent again


def test_consumer_killed_after_exactly_k_chunks_fetches_exactly_the_rest(env: Env) -> None:
    """Self-inflicted SIGKILL once K chunks are written: the next get fetches the other
    chunks, all of them, each once: also those of the file patched in place."""
    n = len(env.needed)
    for k in (0, 1, n // 2, n - 1):
        t = trial(env, "consumer SIGKILL after K chunks", die_at={"event": "fetch", "n": k})
        assert t.first.killed and len(t.first.written) == k
        assert set(t.requested) == set(env.needed) - t.first.written, k


@pytest.mark.parametrize("point", ["commit", "apply:1", "apply:mid", "apply:last", "cleanup"])
def test_consumer_killed_around_and_inside_the_apply_phase_is_finished_without_fetching(
    env: Env, point: str
) -> None:
    if env.apply_events is None:
        env.apply_events = trial(env, "no kill (baseline)").first.apply_events
    events = env.apply_events
    assert events is not None and events > 10
    if point.startswith("apply:"):
        where = {"1": 1, "mid": events // 2, "last": events}[point.split(":")[1]]
        die_at = {"event": "apply", "n": where}
    else:
        die_at = {"event": point}
    t = trial(env, f"consumer SIGKILL at {point.split(':')[0]}", die_at=die_at)
    assert t.first.killed
    assert len(t.first.written) == len(env.needed)
    assert t.committed == (point != "commit")  # at clean-up the applied journal is still there
    assert t.requested == []  # everything was staged: nothing crosses the socket again


def test_a_get_killed_again_and_again_still_never_fetches_a_chunk_twice(env: Env) -> None:
    n = len(env.needed)
    t = trial(env, "consumer SIGKILL repeatedly", die_at={"event": "fetch", "n": n // 4},
              chain=[{"event": "fetch", "n": n // 4}, {"event": "fetch", "n": 3}, {"event": "commit"}])
    assert t.requested == []  # the last killed get had staged everything (killed at its commit)


# -- the consumer's disk is full ------------------------------------------------------------
@pytest.fixture
def small_disk(tmp_path: Path) -> Iterator[Path]:
    """A real 16 MiB filesystem (tmpfs) for the consumer's files and state, or a skip saying
    why it cannot be had (mounting needs root or CAP_SYS_ADMIN; CI runs as root)."""
    disk = tmp_path / "disk"
    disk.mkdir()
    out = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=16m", "tmpfs", str(disk)], capture_output=True, text=True, check=False)
    if out.returncode != 0:
        pytest.skip(f"ENOSPC case: cannot mount a 16 MiB tmpfs here ({out.stderr.strip() or out.returncode})")
    try:
        yield disk
    finally:
        subprocess.run(["umount", "-l", str(disk)], check=False)


def free_bytes(path: Path) -> int:
    st = os.statvfs(path)
    return st.f_bavail * st.f_frsize


def test_a_full_disk_fails_the_get_clearly_and_keeps_the_previous_tree(env: Env, small_disk: Path) -> None:
    rng = random.Random(3)
    root = env.base / "disk-origin" / "works" / SOURCE
    write_tree(root / "data", {"a.bin": File(rng.randbytes(4 * MiB)), "b.bin": File(rng.randbytes(2 * MiB)), "c.txt": File(b"v1")})
    origin = OriginProc(env.base / "disk-origin-proc", root)
    dest = small_disk / "works" / CONSUMER / "data"
    state = small_disk / "state" / CONSUMER

    def get() -> GetResult:
        env.resumer.go(consumer_job(small_disk, origin.url, origin.secret, "data"))
        return env.resumer.finish()

    try:
        assert get().records
        v1 = listing(dest)
        assert v1 == listing(root / "data")
        free = free_bytes(small_disk)
        (root / "data" / "a.bin").write_bytes(rng.randbytes(12 * MiB))  # old and new do not fit side by side
        (root / "data" / "c.txt").write_bytes(b"v2")
        r = get()

        def check_full() -> None:
            assert r.errors and not r.records, r.records
            err = r.errors[0]
            assert err["type"] == "MaterializeError" and "OSError" in err["mro"] and err["errno"] == errno.ENOSPC, err
            assert str(dest) in err["message"] and "No space left on device" in err["message"], err
            assert f"nothing at {dest} was changed" in err["message"], err
            assert listing(dest) == v1
            assert not (state / "txn").exists()
            assert free_bytes(small_disk) >= free - 256 * KiB, "the failed get left its staging on the full disk"

        TALLY.check("consumer disk full (ENOSPC)", check_full)
        (root / "data" / "a.bin").write_bytes(rng.randbytes(7 * MiB))  # now it fits

        def check_fits() -> None:
            assert get().records
            assert listing(dest) == listing(root / "data")
            assert state_leftovers(state) == []

        TALLY.check("consumer disk full (ENOSPC)", check_fits)
    finally:
        origin.close()


def test_a_disk_that_fills_up_as_the_sync_ends_never_fails_a_finished_get(small_disk: Path, tmp_path: Path) -> None:
    """The disk is filled with ballast so that what remains is just about what the new files
    need, from too little to enough: each sync either fails cleanly (ENOSPC, nothing written)
    or succeeds; never another error, never an error after the files were put in place (the
    stat cache written after them is only an accelerator)."""
    rng = random.Random(4)
    src = tmp_path / "src"
    write_tree(src, {f"f{i:02d}": File(rng.randbytes(100_000)) for i in range(40)})
    with Workspace(tmp_path / "ostate") as ows, LocalChunkStore(tmp_path / "store") as store:
        m = ows.snapshot(src)
        store.put_many(SeedSource(m, src).get_many(sorted(m.chunk_ids())))
        need = sum(e.size for e in m.files())
        outcomes: dict[str, int] = {}

        def attempt(slack: int) -> str:
            for p in small_disk.iterdir():
                if p.is_dir():
                    shutil.rmtree(p)
                else:
                    p.unlink()
            ws = Workspace(small_disk / "state")
            with open(small_disk / "ballast", "wb") as f:
                f.write(bytes(max(0, free_bytes(small_disk) - need - slack)))
            try:
                ws.sync(m, small_disk / "dest", remote=store)
                got = "synced"
            except MaterializeError as e:
                got = f"MaterializeError errno {e.errno}"
            except Exception as e:  # noqa: BLE001 - any other error is the finding
                got = f"{type(e).__module__}.{type(e).__name__}: {e}"
            finally:
                ws.close()
            now = listing(small_disk / "dest")
            ok = (got == "synced" and now == listing(src)) or (got == f"MaterializeError errno {errno.ENOSPC}" and now is None)
            TALLY.case("consumer disk fills up as the sync ends", passed=ok)
            outcomes[got] = outcomes.get(got, 0) + 1
            assert ok, f"with {slack} bytes to spare: {got}; tree: {sorted(now or {})}"
            return got

        # Coarse steps up to the first space that suffices, then 1 KiB steps around it: the
        # window where the files fit but nothing else does is a few KiB wide.
        first = next(s for s in range(0, 4 * MiB, 16 * KiB) if attempt(s) == "synced")
        for slack in range(max(0, first - 32 * KiB), first + 32 * KiB, KiB):
            attempt(slack)
    print(f"disk nearly full: {outcomes}")
    assert outcomes.get("synced") and outcomes.get(f"MaterializeError errno {errno.ENOSPC}"), outcomes


