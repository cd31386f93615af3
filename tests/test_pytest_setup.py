"""The suite's own settings, where the interpreter needs them."""

import ast
import gc
import pathlib
import sys

from tests.conftest import ROOT


class _RaisesWhenCollected:
    """An object in a reference cycle whose finalizer raises, as orbax's abandoned coroutines do
    after a failed restore ("Exception ignored in ...: RuntimeError: Event loop is closed")."""

    def __init__(self):
        self.cycle = self

    def __del__(self):
        raise RuntimeError("Event loop is closed")


def test_a_finalizers_error_during_ast_parse_leaves_the_parse_whole():
    """CPython 3.11 keeps one AST-building depth counter per interpreter. A garbage collection
    inside `ast.parse` runs the finalizers of cycles; one that raises goes to
    `sys.unraisablehook`, and a hook written in Python that formats the traceback (pytest's
    unraisableexception plugin's: Python 3.11's tracebacks parse each line for their carets)
    parses again, nested, and the outer parse fails: "SystemError: AST constructor recursion
    depth mismatch". In CI (2026-12-02) it broke pytest's own report of a failed test
    (INTERNALERROR), which ended the run; any traceback formatted in Python (logging's exc_info)
    can meet it too. pyproject.toml turns the plugin off; the default hook is written in C and
    builds no Python AST."""
    assert sys.unraisablehook is sys.__unraisablehook__
    source = pathlib.Path(ROOT, "clip_jax", "training", "trainer.py").read_text()
    threshold = gc.get_threshold()
    gc.set_threshold(50)  # a collection inside every parse
    try:
        for _ in range(20):
            _RaisesWhenCollected()
            ast.parse(source)
    finally:
        gc.set_threshold(*threshold)
        gc.collect()
