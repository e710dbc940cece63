"""jaxdl on the JAX it runs on: no deprecated JAX name in its code.

JAX deprecates a module attribute through the module's ``_deprecations`` table and warns at the
first access only, once per process (`jax._src.deprecations.deprecation_getattr` is cached): if a
dependency such as orbax touched the name first, the suite's ``error::DeprecationWarning:jaxdl``
filter never sees jaxdl's own access. So this test reads the tables of the installed JAX and
looks for their names in jaxdl's code (its syntax tree: names in docstrings and comments are
only words).
"""

import ast
import importlib
import pathlib
import pkgutil
import sys

import jaxdl

SOURCE = pathlib.Path(jaxdl.__file__).parent


def _deprecated_names():
    """``{"jax.sharding.SingleDeviceSharding": message, ...}`` over the jax modules loaded once
    every jaxdl module is imported (the only ones jaxdl's code can reach)."""
    for m in pkgutil.walk_packages(jaxdl.__path__, "jaxdl."):
        importlib.import_module(m.name)
    names = {}
    for modname, module in list(sys.modules.items()):
        if modname == "jax" or modname.startswith("jax.") and "._" not in modname:
            for name, (message, _) in (getattr(module, "_deprecations", None) or {}).items():
                names[f"{modname}.{name}"] = message
    return names


def _names_used(tree):
    """Every dotted name the code reads (``jnp.x`` as ``jax.numpy.x``) or imports."""
    aliases = {}
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for a in node.names:
                if a.asname:
                    aliases[a.asname] = a.name
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            for a in node.names:
                aliases[a.asname or a.name] = f"{node.module}.{a.name}"
                yield f"{node.module}.{a.name}"
    for node in ast.walk(tree):
        if isinstance(node, ast.Attribute):
            parts = []
            while isinstance(node, ast.Attribute):
                parts.append(node.attr)
                node = node.value
            if isinstance(node, ast.Name):
                head = aliases.get(node.id, node.id)
                for i in range(1, len(parts) + 1):  # jax.sharding.X.y reads jax.sharding.X
                    yield ".".join([head, *reversed(parts)][: i + 1])


def test_the_check_finds_a_deprecated_name_through_an_alias():
    code = "import jax.numpy as jnp\nfrom jax import sharding as s\nx = jnp.zeros(1); y = s.Mesh\n"
    used = set(_names_used(ast.parse(code)))
    assert {"jax.numpy.zeros", "jax.sharding.Mesh"} <= used


def test_jaxdl_uses_no_name_the_installed_jax_deprecates():
    deprecated = _deprecated_names()
    assert deprecated, "found no deprecation table in jax: the test would check nothing"
    found = [
        f"{path.relative_to(SOURCE.parent)}: {name} ({deprecated[name]})"
        for path in sorted(SOURCE.rglob("*.py"))
        for name in sorted(set(_names_used(ast.parse(path.read_text()))) & deprecated.keys())
    ]
    assert not found, "\n".join(found)
