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
import jax.numpy as jnp
import numpy as np


def concrete(value: Any) -> np.ndarray | None:
    """`value` as a float64 numpy array, or None when it is traced (unknown until run time)."""
    if isinstance(value, jax.core.Tracer):
        return None
    if isinstance(value, (bool, np.bool_)) or isinstance(value, str) or value is None:
        raise TypeError(f"must be a number, got {value!r} of type {type(value).__name__}")
    try:
        return np.asarray(value, dtype=np.float64)
    except (TypeError, ValueError) as err:
        raise TypeError(f"must be a number, got {value!r} of type {type(value).__name__}") from err


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


def _shown(value: Any) -> str:
    """A short repr for messages: arrays as lists of at most 5 entries (never their buffers)."""
    if isinstance(value, (np.ndarray, jax.Array)) and not isinstance(value, jax.core.Tracer):
        arr = np.asarray(value)
        if arr.ndim == 0:
            return repr(arr.item())
        flat = arr.ravel()
        return repr(flat[:5].tolist())[:-1] + (", ...]" if flat.size > 5 else "]")
    return repr(value)


def check_transform(owner: str, name: str, tx: Any) -> None:
    """Raise TypeError unless `tx` is an ``optax.GradientTransformation``.

    The usual slip is an optimizer factory passed without calling it (``dl.adam`` for
    ``dl.adam(1e-3)``); the message says so.
    """
    import optax  # optax imports jax only; kept local so this module stays import-light

    if not isinstance(tx, optax.GradientTransformation):
        hint = (
            " (did you pass a constructor without calling it, e.g. dl.adam instead of dl.adam(1e-3)?)"
            if callable(tx)
            else ""
        )
        raise TypeError(
            f"{owner}: {name} must be an optax.GradientTransformation, got {tx!r} of type "
            f"{type(tx).__name__}{hint}"
        )


def check_layer(
    owner: str,
    name: str,
    value: Any,
    *,
    expected: str = "a layer object with init and apply",
    call: str = "()",
) -> None:
    """Raise TypeError unless `value` is an object with callable ``init`` and ``apply`` (a jaxdl
    layer or one of its protocol). A layer class passed without calling it gets a hint,
    ``(did you mean Relu()?)`` (``call`` is what follows the class name there). The one check of
    a model or a combinator's layers (`check_model`, ``Sequential``, ``Add``, ``Residual``)."""
    if isinstance(value, type) or not (
        callable(getattr(value, "init", None)) and callable(getattr(value, "apply", None))
    ):
        hint = f" (did you mean {value.__name__}{call}?)" if isinstance(value, type) else ""
        raise TypeError(
            f"{owner}: {name} must be {expected}, got {value!r} of type {type(value).__name__}{hint}"
        )


def check_model(owner: str, model: Any) -> None:
    """Raise TypeError unless `model` is an object with ``init`` and ``apply`` (a jaxdl layer or
    one of its protocol; `check_layer`). A ``flax.nnx.Module`` is converted before this check
    (`jaxdl.nnx.as_layer`); the message names it as the other kind of model accepted."""
    check_layer(
        owner,
        "model",
        model,
        expected=(
            "a layer object with init and apply (a jaxdl layer, a flax.linen module through "
            "jaxdl.from_flax) or a flax.nnx.Module"
        ),
        call="(...)",
    )


def leaf_dtype(x: Any):
    """The dtype of a pytree leaf without moving it to the host (Python numbers: JAX's)."""
    dtype = getattr(x, "dtype", None)
    if dtype is not None:
        return dtype
    if isinstance(x, (bool, int, float, complex)):
        return np.dtype(jax.dtypes.canonicalize_dtype(type(x)))
    return np.asarray(x).dtype


def check_float_params(owner: str, params: Any, what: str = "params") -> None:
    """Raise TypeError naming the first leaf of `params` that is not floating point (or complex).

    Gradient descent is defined for real (or complex) parameters only: an update cast to an
    integer dtype truncates to zero, so integer parameters never move, and adaptive optimizers
    fail deep inside numpy. ``torch.optim`` refuses them too (integer tensors cannot require
    grad). Runs in every optimizer's ``init`` (host, on dtypes only: free under jit).
    """
    for path, x in jax.tree_util.tree_flatten_with_path(params)[0]:
        dtype = leaf_dtype(x)
        if not jnp.issubdtype(dtype, jnp.inexact):
            where = jax.tree_util.keystr(path) or "<root>"
            raise TypeError(
                f"{owner}: {what} leaf {where} must be a floating-point (or complex) array, got "
                f"dtype {dtype.name}; an optimizer cannot update integer or boolean parameters "
                f"(cast them, e.g. jnp.asarray(p, jnp.float32), or keep them out of the params)"
            )


def check_numeric(owner: str, name: str, value: Any) -> None:
    """Raise TypeError unless `value` (an array, a scalar or a pytree of them) holds numbers.

    Numbers are the integer, floating, complex and boolean dtypes JAX supports; strings and
    Python objects are refused here, by name, instead of deep inside JAX.
    """
    for path, x in jax.tree_util.tree_flatten_with_path(value)[0]:
        try:
            dtype = leaf_dtype(x)
        except (TypeError, ValueError):
            dtype = None
        ok = dtype is not None and (jnp.issubdtype(dtype, jnp.number) or jnp.issubdtype(dtype, jnp.bool_))
        if not ok:
            where = name + jax.tree_util.keystr(path)
            got = f"dtype {dtype}" if dtype is not None else "no dtype"
            raise TypeError(
                f"{owner}: {where} must be an array of numbers, got {got}: {_shown(x)} of type "
                f"{type(x).__name__}"
            )


def check_shape(owner: str, name: str, shape: Any, *, low: int = 1) -> tuple[int, ...]:
    """Return `shape` as a tuple of ints; raise unless it is a sequence of integers >= `low`.

    A string, a float or a negative size would otherwise fail deep inside JAX (``int('a')``, an
    MLIR "invalid tensor dimension size", a division by zero in an initializer's fan).
    """
    if isinstance(shape, (int, np.integer)) and not isinstance(shape, (bool, np.bool_)):
        shape = (shape,)
    if isinstance(shape, (str, bytes)) or not isinstance(shape, (tuple, list)):
        raise TypeError(
            f"{owner}: {name} must be a tuple of ints, got {shape!r} of type {type(shape).__name__}"
        )
    for d in shape:
        if isinstance(d, (bool, np.bool_)) or not isinstance(d, (int, np.integer)):
            raise TypeError(
                f"{owner}: {name} must be a tuple of ints, got {tuple(shape)!r} with an entry "
                f"{d!r} of type {type(d).__name__}"
            )
        if d < low:
            raise ValueError(f"{owner}: {name}={tuple(shape)!r} is out of range; expected sizes >= {low}")
    return tuple(int(d) for d in shape)


def as_key(owner: str, name: str, key: Any, *, allow_int: bool = True) -> jax.Array:
    """A typed PRNG key from an int seed (where allowed), a ``jax.random.key`` or a raw
    ``jax.random.PRNGKey`` (uint32, shape (..., 2)); TypeError naming the argument otherwise."""
    dtype = getattr(key, "dtype", None)
    if dtype is not None and jax.dtypes.issubdtype(dtype, jax.dtypes.prng_key):
        return key
    if dtype is not None and dtype == np.uint32 and np.shape(key)[-1:] == (2,):
        return jax.random.wrap_key_data(key)
    is_int = isinstance(key, (int, np.integer)) and not isinstance(key, (bool, np.bool_))
    is_int |= dtype is not None and np.shape(key) == () and jnp.issubdtype(dtype, jnp.integer)
    if allow_int and is_int:  # an int, or an int array of shape () (traced in a sweep)
        return jax.random.key(key)
    kind = "an int seed or a jax.random.key" if allow_int else "a jax.random.key"
    raise TypeError(f"{owner}: {name} must be {kind}, got {key!r} of type {type(key).__name__}")


def check_labels(
    labels: Any,
    num_classes: int,
    owner: str | None = None,
    name: str = "labels",
    *,
    ignore_index: int | None = None,
) -> None:
    """Raise ValueError if any integer label lies outside ``[0, num_classes)`` and is not
    ``ignore_index``.

    ``labels`` has any shape: (N,) class labels, or (N, T) token targets of a sequence model.
    ``ignore_index`` (e.g. `jaxdl.losses.IGNORE_INDEX`, -100: padding that the loss leaves out)
    is accepted wherever it appears. Runs on the host, on concrete labels (`jaxdl.fit`,
    `jaxdl.evaluate`, the data loaders). Inside compiled code label values cannot be checked;
    there `softmax_cross_entropy` gives a NaN loss for such a label (so the train step skips the
    step and counts it in ``nonfinite``) and `accuracy` counts it as wrong. The message names the
    labels, e.g. ``fit: train labels=[-1, 10] is out of range; expected integer class indices in
    [0, 10) ...``.
    """
    labels = np.asarray(labels)
    bad = (labels < 0) | (labels >= num_classes)
    if ignore_index is not None:
        bad &= labels != ignore_index
    if bad.any():
        prefix = f"{owner}: " if owner else ""
        ignored = "" if ignore_index is None else f" (or {ignore_index}: a target left out)"
        raise ValueError(
            f"{prefix}{name}={_shown(labels[bad])} is out of range; expected integer class indices in "
            f"[0, {num_classes}) for {num_classes} classes{ignored} ({int(bad.sum())} of "
            f"{labels.size} labels out of range)"
        )


def check_pair(owner: str, name: str, value: Any) -> None:
    """Raise TypeError unless `value` is a pair ``(x, y)`` (a tuple or list of two)."""
    if isinstance(value, (tuple, list)) and len(value) == 2:
        return
    if isinstance(value, dict):
        got = f"a dict with keys {sorted(map(str, value))}"
    elif isinstance(value, (tuple, list)):
        got = f"a {type(value).__name__} of {len(value)} items"
    else:
        got = f"{_shown(value)} of type {type(value).__name__}"
    raise TypeError(f"{owner}: {name} must be a pair (x, y), got {got}")


def check_schedule(owner: str, name: str, schedule: Any, *, low: float = 0.0) -> None:
    """Check a schedule's values where they are known: ``schedule(0)``, and for jaxdl's own
    schedules their end value (``schedule.end``: ``(step, value)``; the limit for those that
    decay forever). Each must be a finite scalar >= `low`.

    A value that is traced (a schedule of traced hyperparameters built inside a vmapped sweep)
    cannot be inspected and is accepted, as `check_number` does. A non-negative step 0 and end
    bound every built-in schedule (each is monotone, or warms up from 0 to its start).
    """
    first = schedule(jnp.asarray(0, jnp.int32))
    check_scalar(owner, f"{name}(0)", first)
    points = [("0", first)]
    end = getattr(schedule, "end", None)
    if end is not None:
        step, value = end
        points.append(("end" if step is None else str(step), value))
    for step, value in points:
        if concrete(value) is not None and np.ndim(value) == 0:
            value = float(str(np.asarray(value)))  # shortest repr in its own dtype: -0.1, not -0.100000001
        check_number(owner, f"{name}({step})", value, low=low)


class _BatchErrorsExplained:
    """``fn(state, batch)`` whose failure on a batch of non-numbers names the argument (see
    `explain_batch_errors`); attributes (``lower``, ``trace``, ...) are ``fn``'s."""

    def __init__(self, owner: str, name: str, fn):
        self._owner, self._name, self._fn = owner, name, fn

    def __call__(self, state, batch):
        try:
            return self._fn(state, batch)
        except (TypeError, ValueError):
            try:
                check_numeric(self._owner, self._name, batch)
            except TypeError as clear:
                raise clear from None
            raise

    def __getattr__(self, name):
        return getattr(self._fn, name)


def explain_batch_errors(owner: str, name: str, fn):
    """Wrap a compiled ``fn(state, batch)`` so that a batch of strings (or other non-numbers)
    is refused by name: ``owner: name[0] must be an array of numbers, got dtype <U1 ...``.

    JAX refuses such arguments before tracing, with an error that names neither the dtype nor
    what was expected. The call runs in a ``try``, which costs nothing on the normal path; only
    after a failure is the batch checked on the host (`check_numeric`), and the original error
    re-raised when the batch holds numbers.
    """
    return _BatchErrorsExplained(owner, name, fn)
