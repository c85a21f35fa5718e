"""The package's folders are layers: a module imports only from the layers below its own.

Every import of tl_app is read from the source (imports inside functions too),
so a circle cannot hide behind a late import. Within one folder, modules may
import each other as long as no circle forms.
"""

from __future__ import annotations

import ast
import shutil
from pathlib import Path

import tl_app

# Lowest first. A module may import from its own layer (no circles) and from those before it.
LAYERS = ("core", "data", "models", "features", "training", "export", "inference", "insight", "engines", "serve",
          "api", "quickstart", "cli")
PACKAGE = Path(tl_app.__file__).parent


def module_name(path: Path, root: Path) -> str:
    parts = path.relative_to(root.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def layer_of(module: str) -> str:
    parts = module.split(".")
    if len(parts) == 1:
        return "core"  # tl_app/__init__.py holds only the version
    if parts[1] == "__main__":
        return "cli"
    return parts[1]


def under_type_checking(node: ast.AST, parents: dict) -> bool:
    while node in parents:
        node = parents[node]
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            return True
    return False


def imports_of(path: Path, root: Path):
    """(line, target module, inside a function, source line) for every tl_app import of one file."""
    source = path.read_text()
    tree = ast.parse(source)
    lines = source.splitlines()
    parents = {child: node for node in ast.walk(tree) for child in ast.iter_child_nodes(node)}
    package = module_name(path, root) if path.name == "__init__.py" else module_name(path, root).rpartition(".")[0]
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                module = ".".join(base + ([node.module] if node.module else []))
            else:
                module = node.module or ""
            targets = [module] if module != "tl_app" else [f"tl_app.{a.name}" for a in node.names]
        elif isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        else:
            continue
        if under_type_checking(node, parents):
            continue
        inside = any(isinstance(p, (ast.FunctionDef, ast.AsyncFunctionDef)) for p in ancestors(node, parents))
        for target in targets:
            if target == "tl_app" or target.startswith("tl_app."):
                if target == "tl_app.__version__" or target.endswith(".__version__"):
                    target = "tl_app"
                yield node.lineno, target, inside, lines[node.lineno - 1]


def ancestors(node, parents):
    while node in parents:
        node = parents[node]
        yield node


def existing_module(target: str, known: set[str]) -> str:
    """``from tl_app.models import weights`` names the module tl_app.models.weights."""
    while target not in known and "." in target:
        target = target.rpartition(".")[0]
    return target


def layering_problems(root: Path = PACKAGE) -> list[str]:
    files = sorted(root.rglob("*.py"))
    modules = {module_name(p, root): p for p in files}
    problems, edges = [], {}
    for module, path in modules.items():
        here = layer_of(module)
        if here not in LAYERS:
            problems.append(f"{path}: folder or module {here!r} is not a declared layer; add it to LAYERS")
            continue
        for line, target, inside, text in imports_of(path, root):
            target = existing_module(target, set(modules))
            if target == module:
                continue
            there = layer_of(target)
            where = f"{path.relative_to(root.parent)}:{line}: {text.strip()}"
            if there not in LAYERS or LAYERS.index(there) > LAYERS.index(here):
                problems.append(f"{where}  ({here} may not import {there}: it is a higher layer)")
            if inside and (here != "cli" or "#" not in text):
                problems.append(f"{where}  (an import of tl_app inside a function: move it to the top of the "
                                f"module; only the CLI defers imports, with a comment saying why)")
            edges.setdefault(module, set()).add(target)
    for cycle in circles(edges):
        problems.append("circle of imports: " + " -> ".join(cycle + [cycle[0]]))
    return problems


def circles(edges: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index, low, stack, on_stack, found = {}, {}, [], set(), []

    def visit(v):
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(edges.get(v, ())):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for v in sorted(edges):
        if v not in index:
            visit(v)
    return found


def test_every_import_goes_down_the_layers():
    assert layering_problems() == []


def test_every_folder_is_a_declared_layer():
    folders = {p.name for p in PACKAGE.iterdir() if p.is_dir() and (p / "__init__.py").is_file()}
    assert folders <= set(LAYERS), folders - set(LAYERS)


def package_copy_with(tmp_path, relative: str, extra: str) -> Path:
    """A copy of tl_app with ``extra`` appended to one module: the deliberate mistake."""
    copy = tmp_path / "tl_app"
    shutil.copytree(PACKAGE, copy, ignore=shutil.ignore_patterns("__pycache__"))
    module = copy / relative
    module.write_text(module.read_text() + extra)
    return copy


def test_an_upward_import_is_refused_with_its_line(tmp_path):
    copy = package_copy_with(tmp_path, "core/config.py", "\nfrom tl_app.serve.app import create_app  # wrong on purpose\n")
    problems = layering_problems(copy)
    assert problems[0].startswith("tl_app/core/config.py:")
    assert "create_app" in problems[0] and "core may not import serve" in problems[0]
    assert all("core/config.py" in p or p.startswith("circle of imports:") for p in problems), problems


def test_a_late_import_and_a_circle_are_refused(tmp_path):
    copy = package_copy_with(tmp_path, "data/manifest.py", "\n\ndef late():\n    from tl_app.data.scan import walk\n")
    problems = layering_problems(copy)
    assert any("tl_app/data/manifest.py:" in p and "inside a function" in p for p in problems), problems
    assert any(p.startswith("circle of imports:") and "tl_app.data.manifest" in p and "tl_app.data.scan" in p
               for p in problems), problems
