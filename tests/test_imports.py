"""Imports point downward (STYLE.md's rule, checked on the source): the data package knows no
model, evaluation or training; models and losses read no config, data or evaluation; evaluation
may use the data package, never the other way round, so the two never import each other."""

import ast
import os

import pytest

from tests.conftest import ROOT

# Package or module -> what it must not import (prefixes of module names).
FORBIDDEN = {
    "clip_jax.data": (
        "clip_jax.evals",
        "clip_jax.models",
        "clip_jax.training.trainer",
        "clip_jax.training.state",
    ),
    "clip_jax.models": ("clip_jax.data", "clip_jax.evals", "clip_jax.training.trainer", "configs"),
    "clip_jax.training.losses": ("clip_jax.models", "clip_jax.data", "clip_jax.evals", "configs"),
    "clip_jax.evals": ("clip_jax.training.trainer", "configs"),
}


def imported(path: str) -> set[str]:
    """Every module `path` imports, at the top or inside a function."""
    with open(path) as f:
        tree = ast.parse(f.read())
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
            names.add(node.module)
            names.update(f"{node.module}.{a.name}" for a in node.names)
    return names


def modules() -> list[tuple[str, str]]:
    out = []
    for folder, _, files in os.walk(os.path.join(ROOT, "clip_jax")):
        for f in sorted(files):
            if f.endswith(".py"):
                rel = os.path.relpath(os.path.join(folder, f), ROOT)[: -len(".py")]
                out.append((rel.replace(os.sep, ".").removesuffix(".__init__"), rel + ".py"))
    return out


@pytest.mark.parametrize("module,path", modules())
def test_imports_point_downward(module, path):
    for owner, banned in FORBIDDEN.items():
        if module == owner or module.startswith(owner + "."):
            bad = sorted(n for n in imported(os.path.join(ROOT, path)) if n.startswith(banned))
            assert not bad, f"{module} imports {bad}"
