"""Docstring examples are run, so they cannot rot."""

import doctest
import importlib
import pkgutil

import pytest

import slimfx

MODULES = sorted(m.name for m in pkgutil.walk_packages(slimfx.__path__, "slimfx.")
                 if not m.name.endswith("__main__"))
MODULES += sorted(f"slimfx.{sub}.{m.name}" for sub in ("ir", "passes", "lowering", "runtime")
                  for m in pkgutil.iter_modules(importlib.import_module(f"slimfx.{sub}").__path__))


@pytest.mark.parametrize("name", sorted(set(MODULES)))
def test_docstring_examples(name):
    module = importlib.import_module(name)
    result = doctest.testmod(module, optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE)
    assert result.failed == 0


def test_examples_exist():
    counts = [doctest.testmod(importlib.import_module(n), report=False).attempted for n in
              ("slimfx.ir.graph", "slimfx.ir.capture", "slimfx.passes.manager")]
    assert all(c > 0 for c in counts)
