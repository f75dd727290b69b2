"""No import cycles in detr_lab, and no function-level imports that would hide one.

The checks:
- the module-level import graph of detr_lab (read with `ast`, including the implicit import of every
  package above an imported module) has no cycle; a module that reads names from its own package
  (`from detr_lab.checkpoints import x` inside `detr_lab.checkpoints.official`) depends on that
  package's `__init__`, which usually imports the module back;
- the package-level graph (package P imports package Q when any module of P imports any module of
  Q) has no cycle either, and packages of one layer do not import each other;
- every module imports on its own in a fresh interpreter (one subprocess that forgets all detr_lab
  modules before each import, so import order cannot mask a cycle);
- no `import` runs inside a function or method, except the few optional accelerator dependencies
  listed in `FUNCTION_LEVEL_ALLOWED`, each with its reason.
"""

from __future__ import annotations

import ast
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
PACKAGE = REPO / "detr_lab"

# (file relative to the repository, imported module as written) -> why it is imported in a function.
FUNCTION_LEVEL_ALLOWED = {
    ("detr_lab/models/attention/kernels/__init__.py", "triton"): (
        "optional GPU dependency: probing whether Triton imports must not fail on machines without it"
    ),
    ("detr_lab/models/attention/kernels/__init__.py", ".triton_ms_deform"): (
        "the Triton kernels import Triton at module level; loaded only when the Triton core is used"
    ),
    ("detr_lab/export/dependencies.py", "name"): (
        "the optional export extra (onnx, onnxruntime): imported by name when an export or onnxruntime "
        "function runs, so detr_lab imports without the extra and the tools can say what to install"
    ),
    ("detr_lab/config.py", "timm"): (
        "timm imports torch; config.py stays torch-free and checks a timm model name only when a "
        "config selects a timm backbone"
    ),
    ("detr_lab/models/builders.py", "module_name"): (
        "the part tables (attention variants, necks, query sources) name each builder as "
        "'module:function', imported with importlib when the first part of that kind is built (the "
        "tables are pure data read by config.py); not a cycle workaround"
    ),
}


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(REPO).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _modules() -> dict[str, Path]:
    return {_module_name(path): path for path in sorted(PACKAGE.rglob("*.py"))}


def _resolve(module: str, path: Path, node: ast.ImportFrom) -> str:
    """The absolute module name of a `from ... import` (relative imports resolved)."""
    if not node.level:
        return node.module or ""
    package = module.split(".") if path.name == "__init__.py" else module.split(".")[:-1]
    base = package[: len(package) - (node.level - 1)]
    return ".".join(base + ([node.module] if node.module else []))


def _top_level_imports(tree: ast.Module) -> list[ast.Import | ast.ImportFrom]:
    """Imports that run when the module is imported: module body, also inside if/try blocks, but not
    under `if TYPE_CHECKING:`, and not inside functions or classes' methods."""
    found: list[ast.Import | ast.ImportFrom] = []

    def visit(statements: list[ast.stmt]) -> None:
        for node in statements:
            if isinstance(node, (ast.Import, ast.ImportFrom)):
                found.append(node)
            elif isinstance(node, ast.If):
                if "TYPE_CHECKING" not in ast.unparse(node.test):
                    visit(node.body)
                visit(node.orelse)
            elif isinstance(node, ast.Try):
                for block in (node.body, node.orelse, node.finalbody, *[h.body for h in node.handlers]):
                    visit(block)
            elif isinstance(node, (ast.With, ast.ClassDef)):
                visit(node.body)

    visit(tree.body)
    return found


def _ancestors(name: str) -> list[str]:
    parts = name.split(".")
    return [".".join(parts[:i]) for i in range(1, len(parts))]


def import_graph() -> dict[str, set[str]]:
    """detr_lab module -> the detr_lab modules importing it runs (packages above a target included)."""
    modules = _modules()
    graph: dict[str, set[str]] = {name: set() for name in modules}
    for name, path in modules.items():
        targets: set[str] = set()
        # Importing a submodule runs the __init__ of every package above it, the module's own
        # packages included; those implicit edges are left out (else every package whose __init__
        # re-exports a submodule would be a cycle). `from <own package> import name` reads the
        # package's namespace, possibly half-initialised: that edge is kept.
        own_packages = set(_ancestors(name))
        named_own_packages: set[str] = set()
        for node in _top_level_imports(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                targets.update(alias.name for alias in node.names)
                continue
            base = _resolve(name, path, node)
            if base in own_packages:
                named_own_packages.add(base)
            for alias in node.names:
                submodule = f"{base}.{alias.name}"
                targets.add(submodule if submodule in modules else base)
        for target in list(targets):
            targets.update(_ancestors(target))
        kept = {t for t in targets if t not in own_packages} | named_own_packages
        graph[name] = {t for t in kept if t in modules and t != name}
    return graph


def package_of(module: str) -> str:
    """The first-level part of detr_lab a module belongs to: `detr_lab.engine.cli` -> `detr_lab.engine`,
    `detr_lab.config` -> itself."""
    return ".".join(module.split(".")[:2])


def package_graph(graph: dict[str, set[str]]) -> dict[str, set[str]]:
    """First-level package -> the first-level packages its modules import (see `package_of`)."""
    packages: dict[str, set[str]] = {package_of(name): set() for name in graph if name != "detr_lab"}
    for importer, targets in graph.items():
        if importer == "detr_lab":
            continue
        source = package_of(importer)
        packages[source].update(package_of(t) for t in targets if t != "detr_lab" and package_of(t) != source)
    return packages


def find_cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan's algorithm)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    cycles: list[list[str]] = []

    def connect(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for target in sorted(graph[node]):
            if target not in index:
                connect(target)
                low[node] = min(low[node], low[target])
            elif target in on_stack:
                low[node] = min(low[node], index[target])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.append(member)
                if member == node:
                    break
            if len(component) > 1:
                cycles.append(sorted(component))

    for node in sorted(graph):
        if node not in index:
            connect(node)
    return cycles


def test_cycle_finder_finds_a_planted_cycle():
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}, "e": set()}
    assert find_cycles(graph) == [["a", "b", "c"]]
    assert find_cycles({"a": {"b"}, "b": set()}) == []


def test_import_graph_reads_relative_and_package_imports():
    graph = import_graph()
    # `from . import x` and `from .kernels import y` inside detr_lab.models.attention
    assert "detr_lab.models.attention.kernels" in graph["detr_lab.models.attention.deformable"]
    # importing detr_lab.checkpoints.official runs detr_lab.data (the package of data.categories)
    assert {"detr_lab.data", "detr_lab.data.categories"} <= graph["detr_lab.checkpoints.official"]
    # a module's own package only when it names it
    assert "detr_lab.checkpoints" not in graph["detr_lab.checkpoints.official"]


def test_import_graph_sees_a_submodule_reading_its_own_package(tmp_path, monkeypatch):
    """The planted shape of the cycle checkpoints/__init__ -> official -> checkpoints/__init__."""
    package = tmp_path / "detr_lab" / "pkg"
    package.mkdir(parents=True)
    (tmp_path / "detr_lab" / "__init__.py").write_text("")
    (package / "__init__.py").write_text("from detr_lab.pkg.user import value\n")
    (package / "helper.py").write_text("value = 1\n")
    (package / "user.py").write_text("from detr_lab.pkg import helper\nvalue = helper.value\n")
    (package / "clean.py").write_text("import detr_lab.pkg.helper\nfrom detr_lab.pkg.helper import value\n")
    monkeypatch.setattr(sys.modules[__name__], "REPO", tmp_path)
    monkeypatch.setattr(sys.modules[__name__], "PACKAGE", tmp_path / "detr_lab")
    graph = import_graph()
    assert graph["detr_lab.pkg.clean"] == {"detr_lab.pkg.helper"}
    assert find_cycles(graph) == [["detr_lab.pkg", "detr_lab.pkg.user"]]


def test_package_graph_finds_a_cycle_between_packages():
    graph = {"detr_lab": set(), "detr_lab.a.x": {"detr_lab.b.y"}, "detr_lab.b.y": set(),
             "detr_lab.b.z": {"detr_lab.a"}, "detr_lab.a": set(), "detr_lab.c": {"detr_lab.a.x"}}
    packages = package_graph(graph)
    assert packages == {
        "detr_lab.a": {"detr_lab.b"}, "detr_lab.b": {"detr_lab.a"}, "detr_lab.c": {"detr_lab.a"},
    }
    assert find_cycles(packages) == [["detr_lab.a", "detr_lab.b"]]


def test_no_import_cycles_in_detr_lab():
    cycles = find_cycles(import_graph())
    assert not cycles, "import cycles: " + "; ".join(" <-> ".join(c) for c in cycles)


# Package-level cycles that are known and being removed -> why they exist today.
KNOWN_PACKAGE_CYCLES: dict[tuple[str, str], str] = {}  # (package, package) -> why; none today


def test_no_import_cycles_between_packages():
    cycles = [tuple(cycle) for cycle in find_cycles(package_graph(import_graph()))]
    unknown = [cycle for cycle in cycles if cycle not in KNOWN_PACKAGE_CYCLES]
    assert not unknown, "package import cycles: " + "; ".join(" <-> ".join(c) for c in unknown)
    stale = set(KNOWN_PACKAGE_CYCLES) - set(cycles)
    assert not stale, f"known package cycles that no longer occur (remove them): {stale}"


@pytest.mark.slow  # one fresh interpreter importing every module
def test_every_module_imports_on_its_own():
    names = sorted(_modules())
    script = textwrap.dedent(
        f"""
        import importlib, sys, traceback
        failed = []
        for name in {names!r}:
            for loaded in [m for m in sys.modules if m == "detr_lab" or m.startswith("detr_lab.")]:
                del sys.modules[loaded]
            try:
                importlib.import_module(name)
            except Exception as err:
                failed.append(f"{{name}}: {{type(err).__name__}}: {{err}}")
        print("\\n".join(failed))
        sys.exit(1 if failed else 0)
        """
    )
    result = subprocess.run(
        [sys.executable, "-c", script], cwd=REPO, capture_output=True, text=True, timeout=300,
        env={**os.environ, "PYTHONPATH": str(REPO)},
    )
    assert result.returncode == 0, result.stdout + result.stderr[-2000:]


def test_no_function_level_imports():
    found: set[str] = set()
    used = set()
    for path in sorted(PACKAGE.rglob("*.py")):
        relative = path.relative_to(REPO).as_posix()
        tree = ast.parse(path.read_text(), str(path))
        for function in ast.walk(tree):
            if not isinstance(function, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)):
                continue
            for node in ast.walk(function):
                if isinstance(node, ast.Import):
                    written = [alias.name for alias in node.names]
                elif isinstance(node, ast.ImportFrom):
                    written = ["." * node.level + (node.module or "")]
                elif (
                    isinstance(node, ast.Call)
                    and ast.unparse(node.func) in ("__import__", "importlib.import_module", "import_module")
                ):
                    written = [ast.unparse(node.args[0]) if node.args else "?"]
                else:
                    continue
                for module in written:
                    key = (relative, module)
                    if key in FUNCTION_LEVEL_ALLOWED:
                        used.add(key)
                    else:
                        found.add(f"{relative}:{node.lineno} imports {module}")
    assert not found, "function-level imports (move them to the module top):\n" + "\n".join(sorted(found))
    stale = set(FUNCTION_LEVEL_ALLOWED) - used
    assert not stale, f"allowlist entries that no longer occur: {stale}"


def test_config_and_the_file_writer_load_without_torch():
    """`detr_lab.config` (and the atomic writer it uses) stay free of torch, so a tool can report a
    config error before paying for the torch import."""
    script = "import sys, detr_lab.config, detr_lab.files; print('torch' in sys.modules)"
    result = subprocess.run(
        [sys.executable, "-c", script], cwd=REPO, capture_output=True, text=True, timeout=120,
        env={**os.environ, "PYTHONPATH": str(REPO)},
    )
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.strip() == "False"


# The one direction data flows (detr_lab/__init__.py): a module may import modules of its own layer
# or an earlier one. A new package belongs in this list.
# The packages of one layer are independent: neither imports the other.
LAYERS = [
    ("detr_lab.files", "detr_lab.errors"),  # leaves: standard library only
    ("detr_lab.io", "detr_lab.boxes", "detr_lab.timer"),  # leaves (io re-exports files)
    ("detr_lab.config_migration",),  # earlier configs -> today's (OmegaConf only)
    ("detr_lab.config",),
    ("detr_lab.data",),
    ("detr_lab.models",),
    ("detr_lab.checkpoints", "detr_lab.visualize"),
    ("detr_lab.engine", "detr_lab.export", "detr_lab.zoo"),  # training / evaluation, ONNX export, model zoo
    ("detr_lab.predict", "detr_lab.benchmark"),  # what needs both engine and export
]
# (importer, imported) -> why an earlier layer imports a later one.
UPWARD_ALLOWED = {
    ("detr_lab.config", "detr_lab.models.attention"): (
        "the config's attention choices come from the spec table, which is pure data (no torch, no variant)"
    ),
    ("detr_lab.config", "detr_lab.models.necks"): "the config's neck choices: the registry (pure data)",
    ("detr_lab.config", "detr_lab.models.queries"): (
        "the config's query-source choices and checks come from the spec table (pure data)"
    ),
    ("detr_lab.config", "detr_lab.models"): "the package above the spec table (its __init__ is a docstring)",
}


def _layer(module: str) -> int | None:
    for rank, prefixes in enumerate(LAYERS):
        if any(module == prefix or module.startswith(prefix + ".") for prefix in prefixes):
            return rank
    return None


def test_packages_import_only_their_own_or_earlier_layers():
    upward = []
    for importer, targets in import_graph().items():
        for target in targets:
            source_rank, target_rank = _layer(importer), _layer(target)
            if source_rank is None or target_rank is None or target_rank <= source_rank:
                continue
            prefixes = {prefix for prefix in LAYERS[source_rank] if importer.startswith(prefix)}
            if not any((prefix, target) in UPWARD_ALLOWED for prefix in prefixes):
                upward.append(f"{importer} -> {target}")
    assert not upward, "imports against the data flow:\n" + "\n".join(sorted(upward))
    assert "detr_lab.models" in import_graph()["detr_lab.config"]  # the allowance above is still needed


def test_every_package_has_a_layer():
    missing = sorted(package for package in package_graph(import_graph()) if _layer(package) is None)
    assert not missing, f"packages missing from LAYERS: {missing}"


def test_packages_of_one_layer_do_not_import_each_other():
    packages = package_graph(import_graph())
    sideways = [
        f"{source} -> {target}"
        for source, targets in packages.items()
        for target in targets
        if _layer(source) is not None and _layer(source) == _layer(target)
    ]
    assert not sideways, "imports between packages of one layer:\n" + "\n".join(sorted(sideways))


def test_the_library_never_raises_the_tools_error():
    """`ToolError` belongs to the command line (engine/cli.py and tools/); the library raises
    `detr_lab.errors` and its other error types, which the tools translate."""
    found = []
    for path in sorted(PACKAGE.rglob("*.py")):
        relative = path.relative_to(REPO).as_posix()
        if relative == "detr_lab/engine/cli.py":
            continue
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            names = [alias.name for alias in node.names] if isinstance(node, ast.ImportFrom) else [
                getattr(node, "id", None) or getattr(node, "attr", None)]
            if "ToolError" in names:
                found.append(f"{relative}:{node.lineno}")
    assert not found, "ToolError in library code: " + ", ".join(found)
    importers = sorted(name for name, targets in import_graph().items() if "detr_lab.engine.cli" in targets)
    assert not importers, f"library modules importing the command-line helpers: {importers}"


def test_the_errors_module_is_a_standard_library_leaf():
    tree = ast.parse((PACKAGE / "errors.py").read_text())
    imported = {alias.name for node in ast.walk(tree) if isinstance(node, ast.Import) for alias in node.names}
    imported |= {node.module or "" for node in ast.walk(tree) if isinstance(node, ast.ImportFrom)}
    assert imported <= {"__future__"} | set(sys.stdlib_module_names), imported
