"""The layer rule of docs/ARCHITECTURE.md ("Layers and imports"), checked on the source.

Every `import shoal.…` in src/shoal is read with ast (nothing is imported), then: no package
imports one above its own layer, engines depend only on the bottom layer, nothing but the
entry point imports `node` or `cli`, no two modules import each other at load time, and the pure
modules import no I/O, clock or concurrency.
"""

import ast
from collections.abc import Iterator
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[2] / "src" / "shoal"

# bottom first; a package may import its own layer and the ones below
LAYERS: list[set[str]] = [
    {"shoal", "types", "errors", "paths", "log", "settings", "dashboard"},  # dashboard: files
    {"models", "engines"},
    {"state", "net", "inference", "placement", "profile"},
    {"election", "master", "worker", "cluster", "reporter", "placer"},
    {"serving", "api"},
    {"node", "cli", "bench"},
]
LAYER = {name: i for i, names in enumerate(LAYERS) for name in names}
PURE = [
    "types",
    "state/apply.py",
    "election/rules.py",
    "placement",
    "worker/plan.py",
    "inference/sampling.py",
    "inference/stops.py",
    "serving/failover.py",
]
IMPURE = {"asyncio", "socket", "subprocess", "threading", "time", "random", "os", "sqlite3"}


def module_name(path: Path) -> str:
    parts = list(path.relative_to(SRC.parent).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports(path: Path, *, top_level_only: bool = False) -> Iterator[str]:
    """Absolute module names path imports (at module level only, if asked)."""
    tree = ast.parse(path.read_text())
    nodes = tree.body if top_level_only else list(ast.walk(tree))
    for node in nodes:
        if isinstance(node, ast.Import):
            yield from (alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            yield node.module
            for alias in node.names:  # `from shoal.x import y`: y may be a module of its own
                name = f"{node.module}.{alias.name}"
                where = SRC.parent / name.replace(".", "/")
                if where.is_dir() or where.with_suffix(".py").exists():
                    yield name


def package(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "shoal"


FILES = sorted(SRC.rglob("*.py"))


def test_every_package_has_a_layer() -> None:
    missing = {package(module_name(f)) for f in FILES} - set(LAYER)
    assert not missing, f"add {missing} to LAYERS (and to ARCHITECTURE.md's layer rule)"


@pytest.mark.parametrize("path", FILES, ids=lambda p: str(p.relative_to(SRC)))
def test_imports_point_down(path: Path) -> None:
    mine = package(module_name(path))
    for name in imports(path):
        if not name.startswith("shoal."):
            continue
        theirs = package(name)
        assert LAYER[theirs] <= LAYER[mine], f"{mine} (layer {LAYER[mine]}) imports {name}"
        if mine == "engines":  # settings and paths: where environment and files are read
            allowed = ("engines", "types", "errors", "settings", "paths")
            assert theirs in allowed, f"an engine imports {name}"
        if theirs in ("node", "cli"):
            assert mine == "cli", f"{mine} imports {name}: nothing but cli imports node or cli"


def test_no_two_modules_import_each_other_at_load_time() -> None:
    known = {module_name(f): f for f in FILES}
    graph = {
        m: {n for n in imports(f, top_level_only=True) if n in known and n != m}
        for m, f in known.items()
    }
    state: dict[str, int] = {}  # 1 on the current path, 2 done

    def visit(m: str, path: list[str]) -> None:
        state[m] = 1
        for n in sorted(graph[m]):
            if state.get(n) == 1:
                cycle = path[path.index(n) :] + [n] if n in path else [m, n]
                raise AssertionError(" -> ".join(cycle))
            if n not in state:
                visit(n, [*path, n])
        state[m] = 2

    for m in sorted(graph):
        if m not in state:
            visit(m, [m])


@pytest.mark.parametrize("pure", PURE)
def test_pure_modules_do_no_io(pure: str) -> None:
    target = SRC / pure
    files = sorted(target.rglob("*.py")) if target.is_dir() else [target]
    assert files, pure
    for path in files:
        bad = {n for n in imports(path) if n.split(".")[0] in IMPURE}
        assert not bad, f"{path.relative_to(SRC)} imports {bad}"
