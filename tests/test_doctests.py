"""The ``>>>`` examples in jaxdl's docstrings run, and print what they say.

One test per module: `doctest.testmod` over it, no failures allowed; the modules in `EXAMPLES`
must have at least one example (the main public functions: fit, evaluate, TrainState.create, the
step builders, the optimizers, chain, the schedules, the losses, Sequential/Dense, sweep, examine).
Examples are tiny (a few compiles each): this file should take a few seconds.
"""

import doctest
import importlib
import pkgutil

import pytest

import jaxdl

# Every module of the package (examples anywhere run); __main__ would run the command.
MODULES = sorted(
    m.name for m in pkgutil.walk_packages(jaxdl.__path__, "jaxdl.") if not m.name.endswith("__main__")
)
# Modules whose docstrings must hold at least one example.
EXAMPLES = {
    "jaxdl.callbacks",
    "jaxdl.data",
    "jaxdl.diagnostics",
    "jaxdl.doctor",
    "jaxdl.init",
    "jaxdl.layers",
    "jaxdl.losses",
    "jaxdl.models",
    "jaxdl.optimizers",
    "jaxdl.schedules",
    "jaxdl.sweep",
    "jaxdl.train_step",
    "jaxdl.trainer",
    "jaxdl.transforms",
}


@pytest.mark.parametrize("name", MODULES)
def test_docstring_examples(name):
    module = importlib.import_module(name)
    result = doctest.testmod(module, optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE)
    assert result.failed == 0, f"{result.failed} of {result.attempted} examples in {name} failed"
    if name in EXAMPLES:
        assert result.attempted > 0, f"{name} has no runnable example"
