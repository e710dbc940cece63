"""Argument checks, one home for all of jaxdl, with one message format:
``owner: name=value is out of range; expected ...`` (ValueError) and ``owner: name must be ...,
got ... of type ...`` (TypeError).

Hyperparameters may be Python numbers, concrete arrays, or traced values (a vmapped sweep builds
its optimizer inside the traced function). Concrete values are checked at construction; traced
values cannot be inspected and are accepted as they are.
"""

from __future__ import annotations

import math
from typing import Any

import jax
import numpy as np


def concrete(value: Any) -> np.ndarray | None:
    """`value` as a float64 numpy array, or None when it is traced (unknown until run time)."""
    if isinstance(value, jax.core.Tracer):
        return None
    if isinstance(value, (bool, np.bool_)) or isinstance(value, str) or value is None:
        raise TypeError(f"expected a number, got {value!r} of type {type(value).__name__}")
    try:
        return np.asarray(value, dtype=np.float64)
    except (TypeError, ValueError) as err:
        raise TypeError(f"expected a number, got {value!r} of type {type(value).__name__}") from err


def check_number(
    owner: str,
    name: str,
    value: Any,
    *,
    low: float = -math.inf,
    high: float = math.inf,
    low_open: bool = False,
    high_open: bool = False,
) -> None:
    """Raise ValueError unless every element of `value` is finite and inside the interval.

    The message names `owner` (the constructor), the argument, the value and the allowed range,
    e.g. ``momentum: decay=1.5 is out of range; expected 0 <= decay < 1``.
    """
    try:
        arr = concrete(value)
    except TypeError as err:
        raise TypeError(f"{owner}: {name} {err}") from None
    if arr is None:
        return
    lo = "" if low == -math.inf else f"{low:g} {'<' if low_open else '<='} "
    hi = "" if high == math.inf else f" {'<' if high_open else '<='} {high:g}"
    expected = f"finite {name} with {lo}{name}{hi}" if (lo or hi) else f"finite {name}"
    ok = np.all(np.isfinite(arr))
    ok &= np.all(arr > low) if low_open else np.all(arr >= low)
    ok &= np.all(arr < high) if high_open else np.all(arr <= high)
    if not ok:
        shown = value if arr.ndim == 0 else arr
        raise ValueError(f"{owner}: {name}={shown!r} is out of range; expected {expected}")


def check_int(
    owner: str, name: str, value: Any, *, low: int = 1, high: int | None = None, allow_none: bool = False
) -> int | None:
    """Return ``int(value)``; raise unless it is an integer in ``[low, high]`` (None where allowed).

    The one check of every count in jaxdl (sizes, steps, periods, devices). A value of another
    type is a TypeError, ``owner: name must be an int, got 1.5 of type float``; one outside the
    range a ValueError, ``owner: name=0 is out of range; expected an integer >= 1``.
    """
    if value is None and allow_none:
        return None
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, (int, np.integer)):
        kind = "an int or None" if allow_none else "an int"
        raise TypeError(f"{owner}: {name} must be {kind}, got {value!r} of type {type(value).__name__}")
    if value < low or (high is not None and value > high):
        expected = f"an integer >= {low}" if high is None else f"an integer in [{low}, {high}]"
        raise ValueError(
            f"{owner}: {name}={value!r} is out of range; expected {expected}"
            + (" or None" if allow_none else "")
        )
    return int(value)


def check_positive_int(owner: str, name: str, value: Any) -> int:
    """`check_int` with ``low=1``: steps, periods and other counts."""
    return check_int(owner, name, value, low=1)


def check_tree_match(
    owner: str,
    expected: Any,
    got: Any,
    what: str = "updates",
    hint: str = "Call init again with params of the same structure as the gradients.",
) -> None:
    """Raise ValueError when `got` differs from `expected` in structure or leaf shapes.

    Runs at trace time (structures and shapes are static), so it costs nothing under jit. The
    message names the first differing path, which is what a user needs to find the mistake.
    """
    exp_def = jax.tree_util.tree_structure(expected)
    got_def = jax.tree_util.tree_structure(got)
    exp_leaves = jax.tree_util.tree_flatten_with_path(expected)[0]
    got_leaves = jax.tree_util.tree_flatten_with_path(got)[0]
    if exp_def != got_def:
        exp_paths = [jax.tree_util.keystr(p) for p, _ in exp_leaves]
        got_paths = [jax.tree_util.keystr(p) for p, _ in got_leaves]
        for e, g in zip(exp_paths, got_paths):
            if e != g:
                detail = f"first difference: expected a leaf at {e or '<root>'}, found {g or '<root>'}"
                break
        else:
            if len(exp_paths) > len(got_paths):
                detail = f"missing leaf at {exp_paths[len(got_paths)] or '<root>'}"
            elif len(got_paths) > len(exp_paths):
                detail = f"unexpected leaf at {got_paths[len(exp_paths)] or '<root>'}"
            else:
                detail = f"containers differ: expected {exp_def}, got {got_def}"
        raise ValueError(f"{owner}: {what} tree does not match the expected tree ({detail}). {hint}")
    for (path, e), (_, g) in zip(exp_leaves, got_leaves):
        if np.shape(e) != np.shape(g):
            raise ValueError(
                f"{owner}: {what} leaf {jax.tree_util.keystr(path) or '<root>'} has shape "
                f"{np.shape(g)}, but init saw shape {np.shape(e)}. {hint}"
            )


def check_scalar(owner: str, name: str, value: Any) -> None:
    """Raise ValueError unless `value` (a number, or a concrete or traced array) has shape ().

    A learning rate of shape (n,) would broadcast against the last axis of every leaf and scale
    each column by its own rate; ``torch.optim`` refuses it too. Shapes are static, so traced
    scalars (vmapped sweeps, ``optax.inject_hyperparams``) pass and traced vectors are caught.
    """
    shape = np.shape(value)
    if shape != ():
        shown = "a traced array" if isinstance(value, jax.core.Tracer) else repr(np.asarray(value))
        raise ValueError(
            f"{owner}: {name}={shown} has shape {shape}; expected a scalar {name} (a number or a "
            f"0-d array{', or a schedule' if name == 'lr' else ''})"
        )
