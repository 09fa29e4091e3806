"""The layout: layers that import only downwards, no import cycles, no imports hidden in functions, and modules
of a readable size. docs/architecture.md draws the same layers."""
from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = {"selfdraft": "ctxdraft.selfdraft", "triton_kernels": "ctxdraft.triton_kernels",
            "export": "ctxdraft.export", "cli": "ctxdraft.cli"}


def module_files() -> dict[str, Path]:
    out = {}
    for folder, package in PACKAGES.items():
        for path in (ROOT / folder).rglob("*.py"):
            parts = list(path.relative_to(ROOT / folder).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts = parts[:-1]
            out[".".join([package, *parts])] = path
    return out


def _is_type_checking(node: ast.If) -> bool:
    test = node.test
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


def imports_of(name: str, path: Path, modules: dict[str, Path], inside_functions: bool = False) -> set[str]:
    """Every project module ``name`` imports, at module level or inside functions (a lazy import is still a
    dependency), except under ``if TYPE_CHECKING:`` (never run). ``inside_functions``: only those imported
    inside a function body."""
    is_package = path.name == "__init__.py"
    found: set[str] = set()

    def resolve(target: str) -> None:
        while target and target not in modules:  # `from pkg.mod import name`: the module, not the name
            target = target.rpartition(".")[0]
        if target and target != name:
            found.add(target)

    def visit(node: ast.AST, in_function: bool = False) -> None:
        if isinstance(node, ast.If) and _is_type_checking(node):
            return
        in_function = in_function or isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda))
        if inside_functions and not in_function:
            pass
        elif isinstance(node, ast.Import):
            for alias in node.names:
                resolve(alias.name)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = name.split(".") if is_package else name.split(".")[:-1]
                base = base[: len(base) - (node.level - 1)]
                module = ".".join(base + ([node.module] if node.module else []))
            else:
                module = node.module or ""
            for alias in node.names:
                resolve(f"{module}.{alias.name}" if f"{module}.{alias.name}" in modules else module)
        for child in ast.iter_child_nodes(node):
            visit(child, in_function)

    visit(ast.parse(path.read_text()))
    return found


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}
    stack: list[str] = []

    def dfs(node: str) -> list[str] | None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                return stack[stack.index(nxt):] + [nxt]
            if nxt not in state:
                cycle = dfs(nxt)
                if cycle:
                    return cycle
        stack.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state:
            cycle = dfs(node)
            if cycle:
                return cycle
    return None


def test_find_cycle_finds_one():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": set()}) is None


def test_no_import_cycles():
    modules = module_files()
    graph = {name: imports_of(name, path, modules) for name, path in modules.items()}
    assert graph["ctxdraft.selfdraft.serving.bundle"] >= {"ctxdraft.selfdraft.drafting.pool", "ctxdraft.export.router"}  # the walk sees edges
    cycle = find_cycle(graph)
    assert cycle is None, " -> ".join(cycle)


def test_export_router_needs_no_torch():
    modules = module_files()
    graph = {name: imports_of(name, path, modules) for name, path in modules.items()}
    seen, todo = set(), ["ctxdraft.export.router"]
    while todo:
        node = todo.pop()
        if node not in seen:
            seen.add(node)
            todo += graph[node]
    assert seen <= {"ctxdraft.export.router", "ctxdraft.selfdraft.base.errors", "ctxdraft.selfdraft.base.features"}, seen


def test_library_modules_stay_readable():
    """A module past 400 lines has probably taken on a second job: split it by job."""
    too_long = {name: path.read_text().count("\n") for name, path in module_files().items()}
    too_long = {name: n for name, n in too_long.items() if n > 400}
    assert not too_long, too_long


# The layers, lowest first. A module may import modules of its own layer (acyclically, checked above) and of
# layers below it, never above. triton_kernels and export sit beside the runtime: they know nothing of models or
# bundles (export reads only base's feature schema and errors).
LAYERS = [
    ("ctxdraft.selfdraft.base",),
    ("ctxdraft.triton_kernels", "ctxdraft.export"),
    ("ctxdraft.selfdraft.runtime",),
    ("ctxdraft.selfdraft.drafting",),
    ("ctxdraft.selfdraft.learning",),
    ("ctxdraft.selfdraft.serving",),
    ("ctxdraft.selfdraft.commands",),
    ("ctxdraft.selfdraft.entrypoints",),  # HTTP servers over the library (protocol types live here only)
    ("ctxdraft.cli", "ctxdraft.selfdraft"),  # the CLI and the package's public names (resolved on first use)
]


def layer_of(module: str) -> int:
    best = None
    for rank, prefixes in enumerate(LAYERS):
        for prefix in prefixes:
            if (module == prefix or module.startswith(prefix + ".")) and (best is None or len(prefix) > best[1]):
                best = (rank, len(prefix))
    assert best is not None, f"{module} is in no layer; add its folder to LAYERS"
    return best[0]


def test_layer_of():
    assert layer_of("ctxdraft.selfdraft.base.errors") == 0
    assert layer_of("ctxdraft.selfdraft.serving.bundle") > layer_of("ctxdraft.selfdraft.drafting.pool")
    assert layer_of("ctxdraft.selfdraft") == len(LAYERS) - 1


def test_imports_point_down_the_layers():
    modules = module_files()
    upward = [f"{name} (layer {layer_of(name)}) imports {dep} (layer {layer_of(dep)})"
              for name, path in modules.items() for dep in sorted(imports_of(name, path, modules))
              if layer_of(dep) > layer_of(name)]
    assert not upward, "\n".join(upward)


def test_upward_import_is_caught(tmp_path):
    """The check above can fail: a drafting module importing a serving one is reported."""
    fake = tmp_path / "pool.py"
    fake.write_text("from ..serving.bundle import Bundle\n")
    modules = dict(module_files(), **{"ctxdraft.selfdraft.drafting.fake": fake})
    deps = imports_of("ctxdraft.selfdraft.drafting.fake", fake, modules)
    assert deps == {"ctxdraft.selfdraft.serving.bundle"}
    assert layer_of("ctxdraft.selfdraft.serving.bundle") > layer_of("ctxdraft.selfdraft.drafting.fake")


def test_no_project_imports_inside_functions():
    """A project module imported inside a function is an upward dependency in hiding (or a cycle dodged): the
    code is in the wrong layer. Lazy imports of heavy optional third-party packages stay allowed."""
    modules = module_files()
    hidden = {name: sorted(deps) for name, path in modules.items()
              if (deps := imports_of(name, path, modules, inside_functions=True))}
    assert not hidden, hidden


def test_function_local_import_is_caught(tmp_path):
    fake = tmp_path / "fake.py"
    fake.write_text("import json\n\ndef f():\n    from ..base.errors import CtxdraftError\n    import torch\n")
    modules = dict(module_files(), **{"ctxdraft.selfdraft.drafting.fake": fake})
    assert imports_of("ctxdraft.selfdraft.drafting.fake", fake, modules, inside_functions=True) == {
        "ctxdraft.selfdraft.base.errors"}


def test_few_modules_left_at_the_top_of_the_library():
    top = sorted(p.name for p in (ROOT / "selfdraft").glob("*.py"))
    assert len(top) <= 4, top
