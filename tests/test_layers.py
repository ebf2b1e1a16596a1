"""The package's shape: every module imports on its own, no module imports
one of a higher layer, no two modules import each other (directly or round
a longer loop). The layers, lowest first, are those of `orchestra/__init__.py`:

    0 errors, keras_compat, spec, net    5 driver/
    1 storage/                           6 client/
    2 build/                             7 tools/
    3 coordinator/                       8 cli
    4 worker/                            9 orchestra (its __init__: the public API)

A module may import its own layer or lower ones. Imports inside functions
and under `if TYPE_CHECKING:` count: they are dependencies all the same.
Each checker is also run on a small bad package written to tmp_path, so a
checker that cannot fail is caught too.
"""

from __future__ import annotations

import ast
import os
import pkgutil
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import orchestra

PACKAGE_DIR = Path(orchestra.__file__).parent

LAYERS: dict[str, int] = {
    "orchestra.errors": 0,
    "orchestra.keras_compat": 0,
    "orchestra.spec": 0,
    "orchestra.net": 0,  # which addresses are this machine's own: the standard library only
    "orchestra.storage": 1,
    "orchestra.build": 2,
    "orchestra.coordinator": 3,
    "orchestra.worker": 4,
    "orchestra.driver": 5,
    "orchestra.client": 6,
    "orchestra.tools": 7,
    "orchestra.cli": 8,
    "orchestra": 9,
}


# The checkers: plain functions of a package folder, so the tests below can
# run them on a fake package as well as on orchestra.


def module_files(package_dir: Path, package: str) -> dict[str, Path]:
    """Every module of the package: dotted name → file (a package is its `__init__.py`)."""
    modules = {}
    for path in sorted(package_dir.rglob("*.py")):
        parts = path.relative_to(package_dir).with_suffix("").parts
        if parts[-1] == "__init__":
            parts = parts[:-1]
        modules[".".join((package, *parts))] = path
    return modules


def layer_of(module: str, layers: dict[str, int]) -> int | None:
    """The layer of the longest prefix of `module` that `layers` names. The
    top package's own layer is its `__init__`'s only: a new module directly
    under it has no layer until one is given."""
    parts = module.split(".")
    for end in range(len(parts), 1, -1):
        prefix = ".".join(parts[:end])
        if prefix in layers:
            return layers[prefix]
    return layers.get(module)


@dataclass(frozen=True)
class Import:
    importer: str
    imported: str
    line: int


def imports_of(module: str, path: Path, modules: dict[str, Path], package: str) -> list[Import]:
    """Every import of one of the package's modules in `path`, anywhere in the
    file. `from a.b import c` is `a.b.c` when that is a module, else `a.b`."""
    is_package = path.name == "__init__.py"
    found = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative: resolved against the importing module's package
                anchor = module.split(".")
                anchor = anchor if is_package else anchor[:-1]
                anchor = anchor[: len(anchor) - (node.level - 1)]
                base = ".".join([*anchor, base] if base else anchor)
            targets = [f"{base}.{alias.name}" if f"{base}.{alias.name}" in modules else base for alias in node.names]
        else:
            continue
        for target in targets:
            if target != package and not target.startswith(package + "."):
                continue
            # `import a.b.c` names the deepest of a, a.b, a.b.c that is a module.
            while target not in modules and "." in target:
                target = target.rsplit(".", 1)[0]
            if target != module:
                found.append(Import(module, target, node.lineno))
    return found


def import_graph(package_dir: Path, package: str) -> tuple[dict[str, Path], list[Import]]:
    modules = module_files(package_dir, package)
    edges = [edge for name, path in modules.items() for edge in imports_of(name, path, modules, package)]
    return modules, edges


def layer_violations(package_dir: Path, package: str, layers: dict[str, int]) -> list[str]:
    """One line per import of a higher layer (and per module with no layer)."""
    modules, edges = import_graph(package_dir, package)
    problems = [f"{name} ({modules[name].relative_to(package_dir.parent)}) is in no layer: add it to LAYERS"
                for name in modules if layer_of(name, layers) is None]
    for edge in edges:
        low, high = layer_of(edge.importer, layers), layer_of(edge.imported, layers)
        if low is not None and high is not None and high > low:
            problems.append(f"{edge.importer} (layer {low}) imports {edge.imported} (layer {high}) "
                            f"at line {edge.line}")
    return problems


def import_cycles(package_dir: Path, package: str) -> list[list[str]]:
    """Every strongly connected group of modules that import each other,
    each reported as one loop through it: [a, b, ..., a]."""
    modules, edges = import_graph(package_dir, package)
    graph: dict[str, set[str]] = {name: set() for name in modules}
    for edge in edges:
        graph[edge.importer].add(edge.imported)

    # Tarjan's strongly connected components, iteratively.
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    components: list[list[str]] = []
    for root in sorted(graph):
        if root in index:
            continue
        work = [(root, iter(sorted(graph[root])))]
        index[root] = low[root] = len(index)
        stack.append(root)
        on_stack.add(root)
        while work:
            node, children = work[-1]
            child = next(children, None)
            if child is not None:
                if child not in index:
                    index[child] = low[child] = len(index)
                    stack.append(child)
                    on_stack.add(child)
                    work.append((child, iter(sorted(graph[child]))))
                elif child in on_stack:
                    low[node] = min(low[node], index[child])
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[node])
            if low[node] == index[node]:
                component = []
                while True:
                    member = stack.pop()
                    on_stack.discard(member)
                    component.append(member)
                    if member == node:
                        break
                if len(component) > 1:
                    components.append(sorted(component))
    return [_loop_through(sorted(component), graph) for component in components]


def _loop_through(component: list[str], graph: dict[str, set[str]]) -> list[str]:
    """A shortest import loop from the component's first module back to itself."""
    start, members = component[0], set(component)
    paths = {start: [start]}
    frontier = [start]
    while frontier:
        following = []
        for node in frontier:
            for child in sorted(graph[node] & members):
                if child == start:
                    return paths[node] + [start]
                if child not in paths:
                    paths[child] = paths[node] + [child]
                    following.append(child)
        frontier = following
    raise AssertionError(f"no loop through {component}")  # a component always has one


def failed_imports(modules: list[str], cwd: Path, env: dict[str, str] | None = None) -> dict[str, str]:
    """module → the last lines of its error, for each that fails `import` in a
    fresh interpreter (one per module, a few at a time)."""
    def attempt(module: str) -> tuple[str, subprocess.CompletedProcess]:
        return module, subprocess.run([sys.executable, "-c", f"import {module}"], check=False, cwd=cwd, env=env,
                                      capture_output=True, text=True, timeout=120)

    with ThreadPoolExecutor(max_workers=max(2, min(4, os.cpu_count() or 2))) as pool:
        results = list(pool.map(attempt, modules))
    return {module: "\n".join(result.stderr.strip().splitlines()[-3:])
            for module, result in results if result.returncode != 0}


def orchestra_modules() -> list[str]:
    return ["orchestra", *(info.name for info in pkgutil.walk_packages(orchestra.__path__, "orchestra."))]


# The package itself.


def test_every_module_is_found_by_both_the_import_system_and_the_parser():
    assert set(orchestra_modules()) == set(module_files(PACKAGE_DIR, "orchestra"))


def test_every_module_imports_in_a_fresh_interpreter():
    failures = failed_imports(orchestra_modules(), cwd=PACKAGE_DIR.parent)
    assert not failures, "\n".join(f"import {module} fails:\n{error}" for module, error in failures.items())


def test_no_module_imports_a_higher_layer():
    problems = layer_violations(PACKAGE_DIR, "orchestra", LAYERS)
    assert not problems, "\n".join(problems)


def test_no_modules_import_each_other():
    cycles = import_cycles(PACKAGE_DIR, "orchestra")
    assert not cycles, "\n".join("import cycle: " + " -> ".join(cycle) for cycle in cycles)


def test_the_parser_sees_every_form_of_import_the_package_uses():
    """Spot checks against the real source, so a parser that drops a form of
    import (in a function, `from package import module`, TYPE_CHECKING) fails."""
    _, edges = import_graph(PACKAGE_DIR, "orchestra")
    pairs = {(edge.importer, edge.imported) for edge in edges}
    assert ("orchestra.cli", "orchestra.driver.main") in pairs  # inside a function
    assert ("orchestra.driver.preflight", "orchestra.build.data") in pairs  # from orchestra.build import data
    assert ("orchestra.coordinator.protocol", "orchestra.build.images") in pairs  # under TYPE_CHECKING
    assert ("orchestra.driver.__main__", "orchestra.driver.main") in pairs


# The checkers, on a package that breaks each rule.


def write_package(root: Path, files: dict[str, str]) -> Path:
    for name, text in files.items():
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    return root / "fakepkg"


FAKE_LAYERS = {"fakepkg.low": 0, "fakepkg.mid": 1, "fakepkg.high": 2, "fakepkg": 3}


def test_a_higher_layer_imported_in_a_function_is_a_violation(tmp_path):
    package = write_package(tmp_path, {
        "fakepkg/__init__.py": "",
        "fakepkg/low.py": "def f():\n    from fakepkg.high import thing\n",
        "fakepkg/mid/__init__.py": "from fakepkg import low\n",
        "fakepkg/mid/helper.py": "import fakepkg.low\nfrom . import other\n",
        "fakepkg/mid/other.py": "from ..high import thing\n",
        "fakepkg/high.py": "from fakepkg.mid import helper\nthing = 1\n",
    })
    assert layer_violations(package, "fakepkg", FAKE_LAYERS) == [
        "fakepkg.low (layer 0) imports fakepkg.high (layer 2) at line 2",
        "fakepkg.mid.other (layer 1) imports fakepkg.high (layer 2) at line 1",
    ]


def test_a_module_in_no_layer_is_a_violation(tmp_path):
    package = write_package(tmp_path, {"fakepkg/__init__.py": "", "fakepkg/low.py": "", "fakepkg/stray.py": "",
                                       "fakepkg/mid/__init__.py": "", "fakepkg/mid/deep.py": ""})
    assert layer_violations(package, "fakepkg", FAKE_LAYERS) == [
        "fakepkg.stray (fakepkg/stray.py) is in no layer: add it to LAYERS",
    ]


def test_an_import_cycle_is_reported_as_a_loop(tmp_path):
    package = write_package(tmp_path, {
        "fakepkg/__init__.py": "",
        "fakepkg/a.py": "from fakepkg import b\n",
        "fakepkg/b.py": "def later():\n    import fakepkg.c\n",
        "fakepkg/c.py": "from fakepkg.a import name\n",
        "fakepkg/d.py": "from fakepkg import a\n",  # imports into the loop, not part of it
        "fakepkg/e.py": "import fakepkg.f\n",
        "fakepkg/f.py": "from . import e\n",
    })
    assert import_cycles(package, "fakepkg") == [
        ["fakepkg.a", "fakepkg.b", "fakepkg.c", "fakepkg.a"],
        ["fakepkg.e", "fakepkg.f", "fakepkg.e"],
    ]


def test_no_cycle_is_reported_where_imports_only_point_one_way(tmp_path):
    package = write_package(tmp_path, {
        "fakepkg/__init__.py": "from fakepkg import a\n",
        "fakepkg/a.py": "from fakepkg import b\nimport os\n",
        "fakepkg/b.py": "from fakepkg.c import x\n",
        "fakepkg/c.py": "x = 1\n",
    })
    assert import_cycles(package, "fakepkg") == []


def test_a_module_that_fails_to_import_is_named_with_its_error(tmp_path):
    write_package(tmp_path, {
        "fakepkg/__init__.py": "",
        "fakepkg/fine.py": "x = 1\n",
        "fakepkg/a.py": "from fakepkg.b import y\nx = 1\n",
        "fakepkg/b.py": "from fakepkg.a import x\ny = 2\n",
        "fakepkg/broken.py": "raise RuntimeError('broken on purpose')\n",
    })
    failures = failed_imports(["fakepkg.fine", "fakepkg.a", "fakepkg.broken"], cwd=tmp_path,
                              env={**os.environ, "PYTHONPATH": str(tmp_path)})
    assert set(failures) == {"fakepkg.a", "fakepkg.broken"}
    assert "partially initialized module 'fakepkg.a'" in failures["fakepkg.a"]
    assert "RuntimeError: broken on purpose" in failures["fakepkg.broken"]
