"""SPEC "Public API" / Path: the pure part (no processes, no app).

A ``pathapi.Path`` is a ``pathlib.Path`` whose str is the plain relative path, that carries an
origin and a consumer through every derived path, compares and hashes by path and origin,
pickles, and refuses filesystem transfers outside a work's ``run``.
"""

from __future__ import annotations

import os
import pathlib
import pickle
import subprocess
import sys

import pytest

from pathapi import LightningWork, Path, Work

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def shared(path: str = "lit://outputs/ckpt", origin: str | None = "root.train", consumer: str | None = "root.deploy") -> Path:
    return Path(path, origin=origin, consumer=consumer)


def name_work(work: Work, name: str) -> None:
    """What ``App.run`` does when it attaches a work to the flow tree (there is no public setter)."""
    object.__setattr__(work, "_name", name)


# -- pathlib drop-in --------------------------------------------------------------------
def test_path_is_a_pathlib_path():
    p = Path("lit://outputs/ckpt")
    assert isinstance(p, pathlib.Path)
    assert isinstance(p, pathlib.PurePath)


def test_str_and_fspath_give_the_plain_relative_path():
    p = Path("lit://outputs/ckpt")
    assert str(p) == "outputs/ckpt"
    assert os.fspath(p) == "outputs/ckpt"
    assert not p.is_absolute()
    assert p.parts == ("outputs", "ckpt")
    assert p.name == "ckpt"


def test_plain_string_without_lit_is_the_same_relative_path():
    assert os.fspath(Path("outputs/ckpt")) == "outputs/ckpt"


def test_os_and_pathlib_operations_work_on_the_plain_path(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    p = Path("lit://outputs/ckpt")
    os.makedirs(p)
    (p / "a.bin").write_bytes(b"abc")
    with open(os.path.join(p, "b.txt"), "w") as f:
        f.write("b")
    assert os.path.isdir(p)
    assert sorted(os.listdir(p)) == ["a.bin", "b.txt"]
    assert (tmp_path / "outputs" / "ckpt" / "a.bin").read_bytes() == b"abc"
    assert sorted(q.name for q in p.iterdir()) == ["a.bin", "b.txt"]


# -- derived paths keep origin and consumer --------------------------------------------
DERIVATIONS = {
    "truediv": lambda p: p / "a.ckpt",
    "truediv_nested": lambda p: p / "a" / "b.ckpt",
    "parent": lambda p: p.parent,
    "with_suffix": lambda p: (p / "model.ckpt").with_suffix(".bak"),
    "with_name": lambda p: p.with_name("other"),
    "with_stem": lambda p: (p / "model.ckpt").with_stem("model2"),
    "joinpath": lambda p: p.joinpath("a", "b"),
    "relative_to": lambda p: (p / "a" / "b").relative_to("outputs"),
    "parents_0": lambda p: (p / "a").parents[0],
    "parents_last": lambda p: (p / "a").parents[-1],
    "copy_constructor": lambda p: Path(p),
}


@pytest.mark.parametrize("derive", DERIVATIONS.values(), ids=DERIVATIONS.keys())
def test_derived_paths_keep_origin_and_consumer(derive):
    p = shared()
    q = derive(p)
    assert isinstance(q, Path)
    assert q.origin_name == "root.train"
    assert q.consumer_name == "root.deploy"


def test_derived_paths_have_the_plain_pathlib_values():
    p = shared()
    assert os.fspath(p / "a.ckpt") == "outputs/ckpt/a.ckpt"
    assert os.fspath(p.parent) == "outputs"
    assert os.fspath((p / "m.ckpt").with_suffix(".bak")) == "outputs/ckpt/m.bak"
    assert os.fspath(p.with_name("x")) == "outputs/x"
    assert os.fspath(p.joinpath("a", "b")) == "outputs/ckpt/a/b"
    assert os.fspath((p / "a").relative_to("outputs")) == "ckpt/a"
    assert [os.fspath(q) for q in (p / "a").parents] == ["outputs/ckpt", "outputs", "."]
    assert [os.fspath(q) for q in p.parents] == [os.fspath(q) for q in pathlib.Path("outputs/ckpt").parents]


def test_every_parent_keeps_the_origin():
    p = shared() / "a" / "b"
    assert len(p.parents) == 4
    assert all(q.origin_name == "root.train" and q.consumer_name == "root.deploy" for q in p.parents)


def test_origin_and_consumer_default_to_none():
    p = Path("lit://outputs/ckpt")
    assert p.origin_name is None
    assert p.consumer_name is None


# -- equality and hashing --------------------------------------------------------------
def test_equal_path_and_origin_are_equal_with_equal_hash():
    a, b = shared(consumer="root.a"), shared(consumer="root.b")
    assert a == b
    assert hash(a) == hash(b)
    assert len({a, b}) == 1


def test_different_origin_is_not_equal():
    a = shared(origin="root.train")
    b = shared(origin="root.other")
    assert a != b
    assert len({a, b}) == 2
    assert shared(origin=None) != a


def test_different_path_is_not_equal():
    assert shared("lit://outputs/a") != shared("lit://outputs/b")


def test_lit_prefix_does_not_change_identity():
    assert Path("lit://outputs/ckpt", origin="root.w") == Path("outputs/ckpt", origin="root.w")


def test_path_without_origin_equals_the_pathlib_path_and_hashes_alike():
    p = Path("lit://outputs/ckpt")
    q = pathlib.PurePosixPath("outputs/ckpt")
    assert p == q and q == p
    assert hash(p) == hash(q)
    assert len({p, q}) == 1


def test_path_with_origin_differs_from_the_plain_pathlib_path():
    p = shared()
    q = pathlib.PurePosixPath("outputs/ckpt")
    assert p != q and q != p


# -- serialization ---------------------------------------------------------------------
def test_pickle_round_trip_keeps_path_origin_and_consumer():
    p = shared()
    q = pickle.loads(pickle.dumps(p))
    assert isinstance(q, Path)
    assert q == p
    assert os.fspath(q) == "outputs/ckpt"
    assert q.origin_name == "root.train"
    assert q.consumer_name == "root.deploy"


def test_to_dict_from_dict_round_trip():
    p = shared()
    d = p.to_dict()
    assert isinstance(d, dict)
    q = Path.from_dict(d)
    assert isinstance(q, Path)
    assert q == p
    assert os.fspath(q) == os.fspath(p)
    assert (q.origin_name, q.consumer_name) == ("root.train", "root.deploy")


def test_to_dict_is_json_able():
    import json

    d = shared().to_dict()
    assert Path.from_dict(json.loads(json.dumps(d))) == shared()


def test_pickled_path_in_a_container_round_trips():
    value = {"ckpts": [shared("lit://a"), (shared("lit://b"),)]}
    assert pickle.loads(pickle.dumps(value)) == value


# -- p.hash ------------------------------------------------------------------------------
def test_hash_is_a_stable_string_equal_for_equal_paths():
    assert isinstance(shared().hash, str)
    assert shared().hash == shared(consumer="someone.else").hash
    assert shared().hash == shared().hash


def test_hash_differs_by_origin_and_by_path():
    assert shared(origin="root.a").hash != shared(origin="root.b").hash
    assert shared("lit://a").hash != shared("lit://b").hash


def test_hash_is_stable_across_processes():
    code = (
        "from pathapi import Path;"
        "print(Path('lit://outputs/ckpt', origin='root.train', consumer='root.deploy').hash)"
    )
    env = {**os.environ, "PYTHONHASHSEED": "12345", "PYTHONPATH": REPO}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, check=True, cwd=REPO)
    assert out.stdout.strip() == shared().hash


# -- lit:// strings on a Work ------------------------------------------------------------
class Holder(Work):
    def __init__(self) -> None:
        super().__init__()
        self.checkpoint_dir = "lit://outputs/checkpoints"
        self.log_dir = "outputs/logs"

    def run(self) -> None:
        pass


def test_lit_string_assigned_in_init_becomes_a_path_of_that_work():
    w = Holder()
    assert isinstance(w.checkpoint_dir, Path)
    assert os.fspath(w.checkpoint_dir) == "outputs/checkpoints"
    assert w.checkpoint_dir.origin_name is None  # not yet part of an app
    name_work(w, "root.holder")
    assert w.checkpoint_dir.origin_name == "root.holder"


def test_lit_string_assigned_later_becomes_a_path_of_that_work():
    w = Holder()
    name_work(w, "root.holder")
    w.later = "lit://outputs/later"
    assert isinstance(w.later, Path)
    assert w.later.origin_name == "root.holder"


def test_plain_string_stays_a_string():
    w = Holder()
    assert type(w.log_dir) is str
    w.other = "outputs/other"
    assert type(w.other) is str


def test_assigning_a_path_without_origin_makes_the_work_its_origin():
    w = Holder()
    name_work(w, "root.holder")
    w.p = Path("lit://outputs/x")
    assert isinstance(w.p, Path)
    assert w.p.origin_name == "root.holder"


def test_assigning_a_path_keeps_its_existing_origin():
    w = Holder()
    name_work(w, "root.holder")
    w.p = shared(origin="root.train")
    assert isinstance(w.p, Path)
    assert w.p.origin_name == "root.train"


def test_path_of_another_unnamed_work_keeps_that_work_as_origin():
    src, dst = Holder(), Holder()
    dst.ckpt = src.checkpoint_dir  # before either work is named, as in a flow's __init__
    name_work(src, "root.src")
    name_work(dst, "root.dst")
    assert dst.ckpt.origin_name == "root.src"


def test_lightning_work_alias_converts_lit_strings_too():
    class Legacy(LightningWork):
        def __init__(self) -> None:
            super().__init__()
            self.checkpoint_dir = "lit://outputs/checkpoints"

        def run(self) -> None:
            pass

    w = Legacy()
    name_work(w, "root.legacy")
    assert isinstance(w.checkpoint_dir, Path)
    assert w.checkpoint_dir.origin_name == "root.legacy"


def test_pickled_work_keeps_the_origin_of_its_paths():
    w = Holder()
    name_work(w, "root.holder")
    w2 = pickle.loads(pickle.dumps(w))
    assert w2.checkpoint_dir.origin_name == "root.holder"
    assert w2.name == "root.holder"


# -- transfers need a running work -------------------------------------------------------
@pytest.mark.parametrize("call", [
    lambda p: p.get(),
    lambda p: p.get(overwrite=True),
    lambda p: p.exists_local(),
    lambda p: p.exists_remote(),
], ids=["get", "get_overwrite", "exists_local", "exists_remote"])
def test_transfers_raise_runtime_error_outside_a_works_run(call):
    with pytest.raises(RuntimeError, match="run"):
        call(shared())


def test_transfers_raise_runtime_error_on_a_work_attribute_outside_run():
    w = Holder()
    name_work(w, "root.holder")
    with pytest.raises(RuntimeError):
        w.checkpoint_dir.get()
    with pytest.raises(RuntimeError):
        w.checkpoint_dir.exists_remote()


def test_last_transfer_is_none_before_any_get():
    assert shared().last_transfer is None
