"""The layering docs/design.md states ("Packages and what each may import"), checked on the
source: an import that runs upward fails here, not in review.

The package rules look at module-level imports; the cycle check looks at every import of a
pathapi module (inside functions and ``if TYPE_CHECKING:`` blocks too), so that no cycle can
come back hidden in a function.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent

#: cas modules that may import only these of cas (the pure and low layers).
CAS_LOW = {
    "errors": set(),
    "fsutil": set(),
    "hashing": {"errors"},
    "compress": {"errors"},
    "delta": {"errors"},
    "header": {"errors"},
    "chunking": {"hashing"},
    "manifest": {"chunking", "errors", "hashing"},
    "plan": {"chunking", "hashing", "manifest"},  # pure: no I/O either (below)
}
#: What the modules of the cas.materialize package may import of cas outside it.
MATERIALIZE_USES = {"plan", "sources", "fsutil", "manifest", "store", "chunking", "hashing", "errors"}
#: Which modules of cas.materialize each of them may import (docs/design.md): the phases
#: build on the journal and the leaves, never the reverse. A new module gets its row here.
MATERIALIZE_INNER = {
    "journal": set(), "files": set(), "lock": set(), "paths": set(),
    "fill": {"files"},
    "resume": {"journal"},
    "checks": {"journal", "paths"},
    "apply": {"files", "journal", "paths"},
    "recover": {"apply", "journal", "resume"},
    "staging": {"files", "fill", "journal", "paths", "resume"},
    "run": {"apply", "checks", "journal", "paths", "resume", "staging"},
}
#: pathapi modules that import no other pathapi module but the error tree (leaves others build on).
PATHAPI_LEAVES = {"errors", "version", "wire/protocol", "aio", "chunkcache", "paths", "driveindex"}
#: pathapi modules that import nothing of the runtime (the wire layer serves both sides).
PATHAPI_NO_RUNTIME = ["wire/codec", "wire/client", "wire/origin", "wire/tls", "artifacts", "held"]


def top_level_imports(path: Path, package: str) -> set[str]:
    """Absolute dotted names of what ``path`` imports at module level."""
    tree = ast.parse(path.read_text(), str(path))
    rel_parts = path.relative_to(ROOT).with_suffix("").parts
    here = list(rel_parts[:-1]) if rel_parts[-1] != "__init__" else list(rel_parts[:-1])
    out: set[str] = set()
    for node in tree.body:
        if isinstance(node, ast.Import):
            out |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = here[: len(here) - (node.level - 1)]
                mod = ".".join([*base, node.module] if node.module else base)
            else:
                mod = node.module or ""
            out.add(mod)
            out |= {f"{mod}.{a.name}" for a in node.names}
    return out


def modules(package: str) -> list[Path]:
    return sorted((ROOT / package).rglob("*.py"))


@pytest.mark.parametrize("path", modules("cas"), ids=lambda p: str(p.relative_to(ROOT)))
def test_cas_never_imports_pathapi(path: Path) -> None:
    tree = ast.parse(path.read_text(), str(path))
    names = {a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
    names |= {n.module or "" for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and not n.level}
    assert not {n for n in names if n == "pathapi" or n.startswith("pathapi.")}


@pytest.mark.parametrize("name", sorted(CAS_LOW))
def test_the_low_layers_of_cas_import_only_what_is_below_them(name: str) -> None:
    got = {m.split(".")[1] for m in top_level_imports(ROOT / "cas" / f"{name}.py", "cas")
           if m.startswith("cas.") and m.count(".") >= 1}
    assert got <= CAS_LOW[name], f"cas.{name} imports {sorted(got - CAS_LOW[name])}"


def test_every_materialize_module_has_its_place_in_the_map() -> None:
    got = {p.stem for p in (ROOT / "cas" / "materialize").glob("*.py")} - {"__init__"}
    assert got == set(MATERIALIZE_INNER)


@pytest.mark.parametrize("name", sorted(MATERIALIZE_INNER))
def test_materialize_modules_import_only_what_the_map_allows(name: str) -> None:
    got = {m for m in top_level_imports(ROOT / "cas" / "materialize" / f"{name}.py", "cas") if m.startswith("cas.")}
    inner = {m.split(".")[2] for m in got if m.startswith("cas.materialize.")}
    outer = {m.split(".")[1] for m in got if not m.startswith("cas.materialize")}
    assert inner <= MATERIALIZE_INNER[name], f"cas.materialize.{name} imports {sorted(inner - MATERIALIZE_INNER[name])}"
    assert outer <= MATERIALIZE_USES, f"cas.materialize.{name} imports cas.{sorted(outer - MATERIALIZE_USES)}"


def test_the_planner_does_no_io() -> None:
    got = top_level_imports(ROOT / "cas" / "plan.py", "cas")
    assert not got & {"os", "io", "shutil", "socket", "subprocess", "pathlib", "lmdb"}


@pytest.mark.parametrize("name", sorted(PATHAPI_LEAVES))
def test_pathapi_leaves_import_no_other_pathapi_module(name: str) -> None:
    got = {m for m in top_level_imports(ROOT / "pathapi" / f"{name}.py", "pathapi") if m.startswith("pathapi")}
    assert not {m for m in got if m != "pathapi.errors" and not m.startswith("pathapi.errors.")}


#: What the persist side of pathapi may take from cas: the repository pushes and opens stores.
ARTIFACTS_FROM_CAS = {"cas", "cas.errors", "cas.gc", "cas.header", "cas.manifest", "cas.repository", "cas.workspace"}


def test_artifacts_names_refs_and_leaves_stores_and_pushes_to_the_repository() -> None:
    tree = ast.parse((ROOT / "pathapi" / "artifacts.py").read_text())
    got = {n.module or "" for n in tree.body if isinstance(n, ast.ImportFrom) and not n.level}
    got |= {a.name for n in tree.body if isinstance(n, ast.Import) for a in n.names}
    got = {m for m in got if m == "cas" or m.startswith("cas.")}
    assert got <= ARTIFACTS_FROM_CAS, f"pathapi.artifacts imports {sorted(got - ARTIFACTS_FROM_CAS)}"


@pytest.mark.parametrize("name", ["gc", "leases"])
def test_gc_and_leases_sit_below_the_repository(name: str) -> None:
    got = {m for m in top_level_imports(ROOT / "cas" / f"{name}.py", "cas") if m.startswith("cas.")}
    assert not {m for m in got if m.split(".")[1] in {"repository", "workspace", "cli", "demo"}}


def _calls(path: Path) -> set[str]:
    tree = ast.parse(path.read_text(), str(path))
    return {n.func.attr for n in ast.walk(tree) if isinstance(n, ast.Call) and isinstance(n.func, ast.Attribute)}


@pytest.mark.parametrize("path", modules("cas") + modules("pathapi"), ids=lambda p: str(p.relative_to(ROOT)))
def test_only_the_repository_pushes(path: Path) -> None:
    """A push is "which chunks does the store lack, then put them": one copy, the careful one."""
    if path == ROOT / "cas" / "repository.py" or path.parent.name == "store" or path.name == "testing.py":
        return
    assert not {"has_many", "put_many"} <= _calls(path), f"{path.name} pushes on its own: use Repository.push"


@pytest.mark.parametrize("name", PATHAPI_NO_RUNTIME)
def test_the_wire_layer_and_the_stores_import_nothing_of_the_runtime(name: str) -> None:
    got = {m for m in top_level_imports(ROOT / "pathapi" / f"{name}.py", "pathapi") if m.startswith("pathapi.runtime")}
    assert not got


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def all_imports(path: Path, known: set[str]) -> set[str]:
    """The modules of ``known`` that ``path`` imports anywhere (a function, a TYPE_CHECKING
    block); ``from pkg import name`` counts as an import of ``pkg.name`` when that is a module."""
    tree = ast.parse(path.read_text(), str(path))
    rel_parts = path.relative_to(ROOT).with_suffix("").parts
    here = list(rel_parts[:-1])
    out: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = here[: len(here) - (node.level - 1)]
                mod = ".".join([*base, node.module] if node.module else base)
            else:
                mod = node.module or ""
            out |= {f"{mod}.{a.name}" for a in node.names if f"{mod}.{a.name}" in known}
            out.add(mod)
    return out & known


def import_graph(package: str) -> dict[str, set[str]]:
    """module -> the modules of ``package`` it imports. A package's ``__init__`` is left out
    as a target: importing ``a.b`` runs ``a/__init__`` first whatever ``a.b`` imports."""
    paths = {module_name(p): p for p in modules(package)}
    inits = {m for m, p in paths.items() if p.name == "__init__.py"}
    known = set(paths) - inits
    return {m: all_imports(p, known) - {m} for m, p in paths.items()}


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import cycle of ``graph`` (as a list of modules, first repeated last), or None."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    stack: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                return [*stack[stack.index(nxt):], nxt]
            if nxt not in state:
                found = visit(nxt)
                if found:
                    return found
        stack.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state:
            found = visit(node)
            if found:
                return found
    return None


@pytest.mark.parametrize("package", ["pathapi"])  # cas: cli <-> demo remains (cas/cli.py)
def test_no_import_cycle_not_even_inside_functions(package: str) -> None:
    cycle = find_cycle(import_graph(package))
    assert cycle is None, f"import cycle: {' -> '.join(cycle)}"


def test_the_cycle_check_finds_a_cycle() -> None:
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set(), "c": {"a", "b"}}) is None
