"""The direction of imports inside jaxdl (docs/design.md, "Direction of imports").

Each module's imports are read with `ast` from its source, at module level and inside
functions alike (a lazy import is still an edge), so nothing is imported or compiled here.
"""

import ast
import pathlib

import pytest

ROOT = pathlib.Path(__file__).resolve().parent.parent / "jaxdl"

# Lowest first: a module may import only modules listed before it (the package `jaxdl`
# itself, which re-exports everything, comes last). `jaxdl.doctor.*` and `jaxdl.parallel.*`
# are listed module by module.
ORDER = [
    "jaxdl._checks",
    "jaxdl._tree",
    "jaxdl.compile_cache",
    "jaxdl.losses",
    "jaxdl.init",
    "jaxdl.schedules",
    "jaxdl.transforms",
    "jaxdl.optimizers",
    "jaxdl.precision",
    "jaxdl.data",
    "jaxdl.sources",
    "jaxdl.checkpoint",
    "jaxdl.callbacks",
    "jaxdl.preemption",
    "jaxdl.layers",
    "jaxdl.nnx",
    "jaxdl.models",
    "jaxdl.train_step",
    "jaxdl.parallel.placement",
    "jaxdl.parallel.hlo",
    "jaxdl.parallel.onebit",
    "jaxdl.parallel.steps",
    "jaxdl.parallel",
    "jaxdl.diagnostics",
    "jaxdl.doctor.report",
    "jaxdl.doctor.probe",
    "jaxdl.doctor.checks",
    "jaxdl.doctor",
    "jaxdl.sweep",
    "jaxdl.trainer",
    "jaxdl.config",
    "jaxdl.cli",
    "jaxdl.__main__",
    "jaxdl",
]


def _module_name(path: pathlib.Path) -> str:
    parts = ("jaxdl",) + path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imported(path: pathlib.Path) -> set:
    """The jaxdl modules ``path`` imports, anywhere in it (relative imports resolved;
    ``from jaxdl.parallel import x`` counts as ``jaxdl.parallel.x`` where that is a module,
    else as ``jaxdl.parallel``)."""
    name = _module_name(path)
    package = name.split(".") if path.name == "__init__.py" else name.split(".")[:-1]
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = package[: len(package) - node.level + 1] if node.level else []
            module = ".".join(base + ([node.module] if node.module else []))
            for alias in node.names:  # a submodule, else a name of the module
                sub = f"{module}.{alias.name}"
                found.add(sub if sub in ORDER else module)
    return {m for m in found if m in ORDER and m != name}


MODULES = {_module_name(p): p for p in sorted(ROOT.rglob("*.py"))}


def test_every_module_has_a_place_in_the_order():
    missing = sorted(set(MODULES) - set(ORDER))
    assert not missing, f"add {missing} to ORDER in tests/test_imports.py (and docs/design.md)"


@pytest.mark.parametrize("name", [n for n in ORDER if n in MODULES])
def test_imports_point_down(name):
    rank = {m: i for i, m in enumerate(ORDER)}
    upward = sorted(m for m in _imported(MODULES[name]) if rank[m] > rank[name])
    assert not upward, f"{name} imports {upward}, which sit above it in ORDER"


def test_train_step_sits_between_parallel_and_layers():
    # parallel -> train_step -> layers' init/apply, never back
    train_step = _imported(MODULES["jaxdl.train_step"])
    assert not {m for m in train_step if m.startswith("jaxdl.parallel")}
    assert "jaxdl.train_step" in _imported(MODULES["jaxdl.parallel.steps"])
    for name in ("jaxdl.layers", "jaxdl.nnx", "jaxdl.precision"):
        assert not {
            m for m in _imported(MODULES[name]) if m.startswith(("jaxdl.train_step", "jaxdl.parallel"))
        }


def test_no_module_imports_another_modules_private_names():
    for name, path in MODULES.items():
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("jaxdl"):
                private = [a.name for a in node.names if a.name.startswith("_")]
                assert not private, f"{name} imports {private} from {node.module}"


def test_no_module_imports_grain():
    """grain is an optional extra (jaxdl[data]): fit reads its datasets through ``len`` and
    ``__getitem__`` (and an iterator's ``get_state``) alone, so no module imports it."""
    for name, path in MODULES.items():
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else []
            names += [node.module or ""] if isinstance(node, ast.ImportFrom) else []
            assert not [n for n in names if n.split(".")[0] == "grain"], f"{name} imports grain"
