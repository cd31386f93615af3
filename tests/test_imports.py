"""Imports point downward (STYLE.md's rule, checked on the source, top-level and function-level
imports alike): each folder of the package has a layer, a module imports only from its own folder
or from folders of lower layers, and no modules import each other in a circle. On top of that:
the data package knows no model, evaluation or training; models and losses read no config, data
or evaluation."""

import ast
import os

import pytest

from tests.conftest import ROOT, run_python

# The package's folders, bottom up (docs/README.md, "The layout"); "" is the package root, where
# the commands live. Folders of one layer do not import each other.
LAYERS = {
    "infra": 0,
    "parallel": 1,
    "data": 1,
    "models": 2,
    "weights": 3,
    "evals": 4,
    "training": 5,
    "inference": 6,
    "tools": 6,
    "": 7,
}
# Package or module -> what it must not import (prefixes of module names).
FORBIDDEN = {
    "clip_jax.data": ("clip_jax.evals", "clip_jax.models", "clip_jax.training"),
    "clip_jax.models": ("clip_jax.data", "clip_jax.evals", "clip_jax.training", "configs"),
    "clip_jax.training.losses": ("clip_jax.models", "clip_jax.data", "clip_jax.evals", "configs"),
    "clip_jax.evals": ("clip_jax.training", "configs"),
    "clip_jax.infra": ("configs",),
}


def modules() -> dict[str, str]:
    """Every module of the package -> its file."""
    out = {}
    for folder, _, files in os.walk(os.path.join(ROOT, "clip_jax")):
        for f in sorted(files):
            if f.endswith(".py"):
                rel = os.path.relpath(os.path.join(folder, f), ROOT)[: -len(".py")]
                out[rel.replace(os.sep, ".").removesuffix(".__init__")] = rel + ".py"
    return out


MODULES = modules()


def imported(path: str) -> set[str]:
    """Every module name `path` imports, at the top or inside a function."""
    with open(os.path.join(ROOT, path)) as f:
        tree = ast.parse(f.read())
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
            names.add(node.module)
            names.update(f"{node.module}.{a.name}" for a in node.names)
    return names


def package_imports(module: str) -> set[str]:
    """The package's modules that `module` imports (a name resolved to its module)."""
    out = set()
    for name in imported(MODULES[module]):
        while name and name not in MODULES:
            name = name.rpartition(".")[0]
        own_package = MODULES.get(name, "").endswith("__init__.py") and module.startswith(name)
        if name and name not in (module, "clip_jax") and not own_package:
            out.add(name)
    return out


def folder(module: str) -> str:
    parts = module.split(".")
    is_package = MODULES[module].endswith("__init__.py")
    return parts[1] if len(parts) > 2 or (len(parts) == 2 and is_package) else ""


def test_every_folder_has_a_layer():
    assert {folder(m) for m in MODULES if m != "clip_jax"} == set(LAYERS)


@pytest.mark.parametrize("module", sorted(MODULES))
def test_imports_point_downward(module):
    if module == "clip_jax":  # the public API names its modules as strings, loaded lazily
        return
    imports = package_imports(module)
    mine = folder(module)
    upward = sorted(
        d
        for d in imports
        if LAYERS[folder(d)] > LAYERS[mine]
        or (LAYERS[folder(d)] == LAYERS[mine] and folder(d) != mine)
    )
    assert not upward, f"{module} (in {mine or 'the root'}) imports {upward}"
    for owner, banned in FORBIDDEN.items():
        if module == owner or module.startswith(owner + "."):
            names = imported(MODULES[module])
            bad = sorted(n for n in names if n.startswith(banned))
            assert not bad, f"{module} imports {bad}"


def test_no_modules_import_each_other_in_a_circle():
    graph = {m: package_imports(m) for m in MODULES if m != "clip_jax"}
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    circles = []

    def visit(v: str) -> None:  # Tarjan's strongly connected components
        index[v] = low[v] = len(index)
        stack.append(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                circles.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    assert not circles, circles


def test_the_library_imports_no_tensorflow_until_data_is_read():
    """TensorFlow imported before torch's triton (open_clip) makes that import crash the process:
    the trainer, the eval types and the batch jobs import TensorFlow only once they read data, so
    a program (or a test's child process) may import clip_jax first and open_clip after it."""
    modules = (
        "clip_jax.training.trainer",
        "clip_jax.evals.registry",
        "clip_jax.inference.load",
        "clip_jax.inference.jobs",
    )
    code = f"import sys\nimport {', '.join(modules)}\nprint('tensorflow' in sys.modules)"
    result = run_python(["-c", code], timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.strip().splitlines()[-1] == "False"
