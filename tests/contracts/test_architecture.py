"""The house keeps its shape: floors, no import circles, private names kept private, short functions.

The floors (DESIGN.md, "Layout and floors"): a module imports only from units on lower floors
(a unit is a top-level module or a sub-package of qkv); units on one floor are independent.
Nothing in the library imports the root package `qkv` (only the tools and the command line,
which stand on everything, may). A leading-underscore name is private to its own unit; `qkv._util`
is the library's shared toolbox (private to qkv, public inside it). No function is over 100
lines, no module over 1,050 (masks.py and backends/tiled.py are one algorithm each and may be
longer). Every import counts, at the top or inside a function.

`check(root)` returns the violations as sentences; the last tests show it catches an upward
import and a private name planted in a copy of the package.
"""

from __future__ import annotations

import ast
import shutil
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[2] / "src" / "qkv"

FLOORS = {
    "qkv._util": 0, "qkv.hooks": 0, "qkv.testing": 0, "qkv.kernels": 0,
    "qkv.reference": 1, "qkv.positional": 1, "qkv.masks": 1, "qkv.data": 1,
    "qkv.scores": 2,
    "qkv.backends": 3,
    "qkv.attention": 4, "qkv.fused": 4,
    "qkv.decode": 5, "qkv.distributed": 5,
    "qkv.layers": 6, "qkv.nn": 6, "qkv.cache": 6,
    "qkv.models": 7,
    "qkv.generate": 8, "qkv.inspect": 8, "qkv.checkpoint": 8, "qkv.integrations": 8,
    "qkv.train": 9, "qkv.embed": 9, "qkv.viz": 9,
    "qkv.tools": 10,
    "qkv.cli": 11, "qkv.__main__": 12,
    "qkv": 13,                      # the root package: the public face, above everything
}
ROOT_USERS = 10                     # floors from which the root package may be imported (tools, cli)
SHARED_PRIVATE = ("qkv._util",)     # private packages every unit may use
MAX_FUNCTION_LINES = 100
MAX_MODULE_LINES = 1050
LONG_MODULES = ("masks.py", "backends/tiled.py")


def modules(root: Path) -> dict[str, Path]:
    """{dotted name: path} of every module under the package directory `root`."""
    out = {}
    for path in sorted(root.rglob("*.py")):
        parts = (root.name, *path.relative_to(root).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        out[".".join(parts)] = path
    return out


def unit(name: str) -> str:
    return ".".join(name.split(".")[:2])


def _imports(name: str, path: Path, tree: ast.AST, known: dict) -> list[tuple[str, list[str], int]]:
    """(target module, names imported from it, line) for every qkv import in a module."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.split(".")[0] == "qkv":
                    found.append((alias.name, [], node.lineno))
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[:len(package.split(".")) - node.level + 1]
                source = ".".join(base + ([node.module] if node.module else []))
            else:
                source = node.module or ""
            if source.split(".")[0] != "qkv":
                continue
            plain = []
            for alias in node.names:
                sub = f"{source}.{alias.name}"
                if sub in known:
                    found.append((sub, [], node.lineno))      # a submodule: an import of that module
                else:
                    plain.append(alias.name)
            if plain:
                found.append((source, plain, node.lineno))
    return found


def _floor(u: str) -> int | None:
    return FLOORS.get(u)


def _private_defs(trees: dict) -> dict[str, set[str]]:
    """Leading-underscore names each unit defines (functions, classes, assigned names and attributes)."""
    defs: dict[str, set[str]] = {}
    for name, tree in trees.items():
        for node in ast.walk(tree):
            got = None
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
                got = node.name
            elif isinstance(node, ast.Attribute) and isinstance(node.ctx, ast.Store):
                got = node.attr
            elif isinstance(node, ast.Name) and isinstance(node.ctx, ast.Store):
                got = node.id
            if got and got.startswith("_") and not got.startswith("__"):
                defs.setdefault(got, set()).add(unit(name))
    return defs


def _module_aliases(tree: ast.AST, known) -> dict[str, str]:
    """Local names bound to qkv modules: {alias: module}."""
    aliases = {}
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.split(".")[0] == "qkv":
                    aliases[alias.asname or "qkv"] = alias.name if alias.asname else "qkv"
        elif isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] == "qkv":
            for alias in node.names:
                sub = f"{node.module}.{alias.name}"
                if sub in known:
                    aliases[alias.asname or alias.name] = sub
    return aliases


def _private_uses(name: str, tree: ast.AST, imports, known: dict, defs: dict) -> list[str]:
    me = unit(name)
    out = []
    for target, plain, line in imports:
        theirs = unit(target)
        if theirs == me:
            continue
        private_path = [p for p in target.split(".")[1:] if p.startswith("_") and not p.startswith("__")]
        if private_path and not target.startswith(SHARED_PRIVATE):
            out.append(f"{name}:{line} imports the private module {target}")
        for n in plain:
            if n.startswith("_") and not n.startswith("__"):
                out.append(f"{name}:{line} imports the private name {target}.{n}")
    aliases = _module_aliases(tree, known)
    for node in ast.walk(tree):
        if not (isinstance(node, ast.Attribute) and node.attr.startswith("_") and not node.attr.startswith("__")):
            continue
        chain, base = [], node.value
        while isinstance(base, ast.Attribute):
            chain.append(base.attr)
            base = base.value
        if not isinstance(base, ast.Name) or base.id in ("self", "cls"):
            continue
        if base.id in aliases:
            owner = ".".join([aliases[base.id], *reversed(chain)])
            if owner in known and unit(owner) != me and not owner.startswith(SHARED_PRIVATE):
                out.append(f"{name}:{node.lineno} uses the private name {owner}.{node.attr}")
                continue
        owners = defs.get(node.attr)
        if owners and me not in owners:
            out.append(f"{name}:{node.lineno} uses .{node.attr}, private to {', '.join(sorted(owners))}")
    return out


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan)."""
    index, low, stack, on, out = {}, {}, [], set(), []
    counter = [0]

    def visit(v):
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in graph.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return out


def check(root: Path) -> list[str]:
    """Every violation of the house rules in the package directory `root`, as sentences."""
    known = modules(root)
    trees = {name: ast.parse(path.read_text(), str(path)) for name, path in known.items()}
    defs = _private_defs(trees)
    problems, graph = [], {}
    for name, path in known.items():
        tree, me = trees[name], unit(name)
        mine = _floor(me)
        if mine is None:
            problems.append(f"{name} is on no floor: add its unit {me} to FLOORS (and DESIGN.md)")
            continue
        imports = _imports(name, path, tree, known)
        for target, _plain, line in imports:
            graph.setdefault(name, set()).add(target)
            theirs = unit(target)
            if theirs == me:
                continue
            floor = _floor(theirs)
            if theirs == "qkv" and mine >= ROOT_USERS:
                continue
            if floor is None or floor >= mine:
                how = "the same floor" if floor == mine else "a higher floor"
                problems.append(f"{name}:{line} (floor {mine}) imports {target} on {how} ({floor})")
        problems += _private_uses(name, tree, imports, known, defs)
        lines = len(path.read_text().splitlines())
        rel = path.relative_to(root).as_posix()
        if lines > MAX_MODULE_LINES and rel not in LONG_MODULES:
            problems.append(f"{name} has {lines} lines (at most {MAX_MODULE_LINES}): split it by concept")
        for node in ast.walk(tree):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                n = node.end_lineno - node.lineno + 1
                if n > MAX_FUNCTION_LINES:
                    problems.append(f"{name}:{node.lineno} {node.name} has {n} lines (at most {MAX_FUNCTION_LINES})")
    for comp in _cycles({k: {t for t in v if t in known} for k, v in graph.items()}):
        problems.append(f"import circle: {' <-> '.join(comp)}")
    return problems


@pytest.fixture(scope="module")
def library_problems():
    return check(SRC)


def test_the_library_keeps_its_floors(library_problems):
    assert not library_problems, "\n".join(library_problems)


@pytest.fixture()
def copy_of_qkv(tmp_path, library_problems):
    dst = tmp_path / "qkv"
    shutil.copytree(SRC, dst, ignore=shutil.ignore_patterns("__pycache__"))
    assert check(dst) == library_problems
    return dst


def test_an_upward_import_fails_the_contract(copy_of_qkv):
    masks = copy_of_qkv / "masks.py"
    masks.write_text(masks.read_text() + "\n\ndef _planted():\n    from qkv.layers import Block\n    return Block\n")
    problems = check(copy_of_qkv)
    assert any("qkv.masks:" in p and "imports qkv.layers on a higher floor" in p for p in problems), problems


def test_a_same_floor_import_and_a_circle_fail_the_contract(copy_of_qkv):
    for planted, target in (("layers.py", "qkv.nn"), ("nn.py", "qkv.layers")):
        path = copy_of_qkv / planted
        path.write_text(path.read_text() + f"\nimport {target}  # planted\n")
    problems = check(copy_of_qkv)
    assert any("imports qkv.nn on the same floor" in p for p in problems), problems
    assert any(p.startswith("import circle:") and "qkv.layers" in p and "qkv.nn" in p for p in problems), problems


def test_a_private_name_across_units_fails_the_contract(copy_of_qkv):
    decode = copy_of_qkv / "decode.py"
    decode.write_text(decode.read_text() + "\n\ndef _planted(cache):\n    return cache._lengths\n")
    problems = check(copy_of_qkv)
    assert any("qkv.decode:" in p and "._lengths" in p for p in problems), problems


def test_a_long_function_fails_the_contract(copy_of_qkv):
    path = copy_of_qkv / "scores.py"
    body = "".join(f"    x{i} = {i}\n" for i in range(101))
    path.write_text(path.read_text() + f"\n\ndef planted():\n{body}")
    problems = check(copy_of_qkv)
    assert any("planted has 102 lines" in p for p in problems), problems
