"""Functional layers: immutable configurations with two pure methods.

    init(key, input_shape) -> (output_shape, params, state)      # input_shape: one example
    apply(params, state, x, *, train=False, key=None) -> (y, state) # x: leading batch axis

``params`` and ``state`` are dicts of arrays (empty for layers without any); ``state`` holds
what training updates but gradients do not (BatchNorm's running statistics). In the spirit of
`jax.example_libraries.stax`, but with running statistics, ``Dropout(rate)`` as the probability
of *dropping* (stax's ``rate`` is the keep probability), and checked inputs.

Checking: ``apply`` compares ``params``, ``state`` and the shape of ``x`` with what ``init``
would produce for ``x.shape[1:]`` (via `jax.eval_shape`, cached per layer and input shape; shapes
are static, so this costs nothing under `jax.jit`) and raises a ValueError/TypeError naming the
layer, the entry and the expected shape, instead of a JAX internal error later on.

Conventions: images are NHWC with HWIO kernels (as flax; PyTorch is NCHW/OIHW). Dense kernels
are (in, out) (PyTorch's Linear stores (out, in)). Parameter names: ``w``, ``b`` (Dense, Conv,
Maxout), ``alpha`` (PRelu), ``gamma``, ``beta`` and state ``mean``, ``var`` (BatchNorm),
``gamma``, ``beta`` (LayerNorm, RMSNorm), ``w`` (Embedding, PositionalEmbedding), ``wq``, ``wk``, ``wv``, ``wo`` and
``bq``, ``bk``, ``bv``, ``bo`` (MultiHeadAttention). `Residual` has its layer's params and state; `Add` keys its branches'
as `Sequential` does.
"""

from __future__ import annotations

import dataclasses
import functools
import inspect
import math
import numbers
from collections.abc import Mapping
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from jaxdl import init as initializers
from jaxdl._checks import (
    as_key,
    check_int,
    check_layer,
    check_number,
    check_numeric,
    check_positive_int,
    check_shape,
)

__all__ = [
    "Dense",
    "Conv",
    "MaxPool",
    "AvgPool",
    "GlobalAvgPool",
    "Flatten",
    "Relu",
    "LeakyRelu",
    "PRelu",
    "Sigmoid",
    "Tanh",
    "Elu",
    "Gelu",
    "Maxout",
    "Dropout",
    "BatchNorm",
    "LayerNorm",
    "RMSNorm",
    "Embedding",
    "PositionalEmbedding",
    "MultiHeadAttention",
    "Sequential",
    "Residual",
    "Add",
    "Remat",
    "remat_layers",
    "FlaxModule",
    "fold_batchnorm",
    "from_flax",
]

Initializer = Callable[..., jax.Array]
_frozen = dataclasses.dataclass(frozen=True)


# ----------------------------------------------------------------------------- argument checks


def _int_pair(layer, name, value):
    """An int or a pair of ints -> a pair of positive ints."""
    pair = (value, value) if isinstance(value, (int, np.integer)) else value
    if not isinstance(pair, (tuple, list)) or len(pair) != 2:
        raise ValueError(
            f"{layer}: {name}={value!r} is not an int or a pair; expected a positive int or a pair of them"
        )
    return tuple(check_positive_int(layer, name, v) for v in pair)


def _check_real(layer, name, value, **interval):
    """A layer hyperparameter is a Python real number (a static field) inside the interval."""
    if not isinstance(value, numbers.Real) or isinstance(value, bool):
        raise TypeError(
            f"{layer}: {name} must be a real number, got {value!r} of type {type(value).__name__}"
        )
    check_number(layer, name, value, **interval)


def _bool(layer, name, value):
    if not isinstance(value, (bool, np.bool_)):
        raise TypeError(f"{layer}: {name} must be a bool, got {value!r} of type {type(value).__name__}")


def _padding(layer, value):
    if not isinstance(value, str) or value.upper() not in ("SAME", "VALID"):
        raise ValueError(f"{layer}: padding must be 'SAME' or 'VALID', got {value!r}")
    return value.upper()


def _callable(layer, name, value):
    if not callable(value):
        raise TypeError(f"{layer}: {name} must be an initializer (key, shape, dtype) -> array, got {value!r}")


def _rank(layer, input_shape, rank, meaning):
    """Per-example rank check; ``rank=None`` means at least 1 (a feature axis)."""
    shape = tuple(input_shape)
    if (rank is None and len(shape) < 1) or (rank is not None and len(shape) != rank):
        want = "at least 1 (..., features)" if rank is None else f"{rank} {meaning}"
        raise ValueError(
            f"{layer}: input_shape must have rank {want} (one example, no batch axis), got {shape}"
        )
    return shape


def _set(obj, **fields):
    """Normalize fields of a frozen dataclass in __post_init__."""
    for k, v in fields.items():
        object.__setattr__(obj, k, v)


def _window_out(layer, size, window, stride, padding):
    """Output length of a window of ``window`` sliding by ``stride`` (lax's SAME/VALID rule)."""
    if padding == "SAME":
        return -(-size // stride)
    if window > size:
        raise ValueError(
            f"{layer}: window/kernel {window} is larger than the input size {size} with padding='VALID'"
        )
    return (size - window) // stride + 1


# ------------------------------------------------------------------ params/state tree checking


@functools.lru_cache(maxsize=4096)
def _expected_cached(layer, input_shape):
    return jax.eval_shape(lambda: layer.init(jax.random.key(0), input_shape)[1:])


def _expected(layer, input_shape):
    """(params, state) as ShapeDtypeStructs: what ``layer.init`` makes for ``input_shape``."""
    try:
        hash(layer)
    except TypeError:
        return jax.eval_shape(lambda: layer.init(jax.random.key(0), input_shape)[1:])
    return _expected_cached(layer, input_shape)


def _path(path):
    return "".join(f"[{k!r}]" for k in path)


def _compare(where, what, got, expected, x_shape, path=()):
    if isinstance(expected, Mapping):
        if not isinstance(got, Mapping):
            raise TypeError(
                f"{where}: {what}{_path(path)} must be a dict with entries "
                f"{sorted(expected)}, got {type(got).__name__}"
            )
        for k in expected:
            if k not in got:
                raise ValueError(
                    f"{where}: {what}{_path(path)} has no entry {k!r} (expected entries "
                    f"{sorted(expected)}, got {sorted(got)}); pass the {what} that init returned "
                    "for this model"
                )
        extra = sorted(set(got) - set(expected), key=str)
        if extra:
            raise ValueError(
                f"{where}: {what}{_path(path)} has unexpected entries {extra} (expected {sorted(expected)})"
            )
        for k in expected:
            _compare(where, what, got[k], expected[k], x_shape, path + (k,))
        return
    shape = getattr(got, "shape", None)
    if shape is None:
        raise TypeError(f"{where}: {what}{_path(path)} must be an array, got {type(got).__name__}")
    if tuple(shape) != tuple(expected.shape):
        raise ValueError(
            f"{where}: {what}{_path(path)} has shape {tuple(shape)}, but an input x of shape "
            f"{tuple(x_shape)} needs {tuple(expected.shape)}: the input (e.g. its last dimension) "
            f"differs from the input_shape given to init, or the {what} belong to another layer"
        )


def _check_call(layer, params, state, x):
    """Validate an ``apply`` call against ``init`` (static shapes only; free under jit)."""
    where = type(layer).__name__
    if x.ndim < 1:
        raise ValueError(f"{where}: x must have a leading batch axis, got a scalar")
    try:
        exp_params, exp_state = _expected(layer, tuple(x.shape[1:]))
    except (ValueError, TypeError) as err:
        if type(err) not in (ValueError, TypeError):
            raise
        raise type(err)(
            f"{where}.apply: x has shape {tuple(x.shape)} (batch axis first), so "
            f"one example has shape {tuple(x.shape[1:])}: {err}"
        ) from None
    _compare(where, "params", params, exp_params, x.shape)
    _compare(where, "state", state, exp_state, x.shape)


class Layer:
    """Shared ``init`` and ``apply``: validate the call, then run the layer's ``_init`` /
    ``_apply``."""

    def init(self, key, input_shape):
        """``(output_shape, params, state)`` for examples of shape ``input_shape`` (no batch axis).

        ``key`` must be a PRNG key (``jax.random.key`` or ``jax.random.PRNGKey``) and
        ``input_shape`` a tuple of sizes >= 1; anything else is refused here, naming the layer and
        the argument, instead of deep inside JAX.
        """
        where = f"{type(self).__name__}.init"
        as_key(where, "key", key, allow_int=False)
        return self._init(key, check_shape(where, "input_shape", input_shape))

    def apply(self, params, state, x, *, train=False, key=None):
        """Run the layer on the batch ``x``; returns ``(y, new_state)``."""
        if not isinstance(x, jax.Array):  # host data: strings and objects are refused by name
            check_numeric(f"{type(self).__name__}.apply", "x", x)
        x = jnp.asarray(x)
        _check_call(self, params, state, x)
        return self._apply(params, state, x, train, key)

    def with_batch_statistics(self):
        """``(layer, n)``: this layer with each of its n `BatchNorm` layers at momentum 0, so
        that a training-mode ``apply`` returns the batch's statistics as the new state
        (``mean <- 0 * mean + 1 * mu``), what `jaxdl.recalibrate_batchnorm` averages (Izmailov
        et al. 2018, "Averaging weights leads to wider optima and better generalization",
        sec. 3.2). A layer without BatchNorm returns itself and 0; combinators return a copy
        built from their children's. An optional method of the layer protocol: a model
        without it counts as having no BatchNorm."""
        return self, 0


class _Stateless(Layer):
    """A layer with no params, no state and an elementwise map; ``_fn(x)`` gives the output."""

    def _init(self, key, input_shape):
        """Returns ``(input_shape, {}, {})``."""
        del key
        return tuple(input_shape), {}, {}

    def _apply(self, params, state, x, train, key):
        return self._fn(x), state


# ----------------------------------------------------------------------------- affine layers


@_frozen
class Dense(Layer):
    """Fully connected layer over the last axis.

    y = x W + b, W of shape (in, features). Defaults: ``w_init=xavier_normal``, ``b_init=zeros``.
    Differs from flax (lecun_normal, truncated) and PyTorch (U(+-1/sqrt(in)) for W and b, and
    W stored as (out, in)).

    Args:
      features: the output size.
      w_init, b_init: initializers ``(key, shape) -> array`` (`jaxdl.init`).
      use_bias: False leaves ``b`` out (e.g. before BatchNorm).

    Returns (``init``): ``(output_shape, {"w": (in, features), "b": (features,)}, {})``;
    (``apply``): ``(y, state)``.

    Source: Tips and Tricks notes (Xavier initialization); Glorot & Bengio 2010.

    >>> import jax, jax.numpy as jnp
    >>> layer = Dense(3)
    >>> shape, params, state = layer.init(jax.random.key(0), (2,))
    >>> shape, params["w"].shape, params["b"].shape
    ((3,), (2, 3), (3,))
    >>> layer.apply(params, state, jnp.zeros((5, 2)))[0].shape
    (5, 3)
    """

    features: int
    w_init: Initializer = initializers.xavier_normal
    b_init: Initializer = initializers.zeros
    use_bias: bool = True

    def __post_init__(self):
        check_positive_int("Dense", "features", self.features)
        _callable("Dense", "w_init", self.w_init)
        _callable("Dense", "b_init", self.b_init)
        _bool("Dense", "use_bias", self.use_bias)

    def _init(self, key, input_shape):
        shape = _rank("Dense", input_shape, None, "")
        kw, kb = jax.random.split(key)
        params = {"w": self.w_init(kw, (shape[-1], self.features))}
        if self.use_bias:
            params["b"] = self.b_init(kb, (self.features,))
        return shape[:-1] + (self.features,), params, {}

    def _apply(self, params, state, x, train, key):
        y = x @ params["w"]
        return (y + params["b"] if self.use_bias else y), state


def _conv_padding(x_shape, kernel, strides, padding):
    """Explicit (low, high) padding per spatial axis for lax's SAME/VALID rule."""
    return lax.padtype_to_pads(x_shape, kernel, strides, padding)


def _conv_im2col(x, w, strides, padding):
    """Convolution as one matmul: gather the kh*kw shifted (strided) views of the padded input
    along the channel axis ("im2col"), then multiply by the kernel reshaped to (kh*kw*I, O).

    The views are plain strided slices, so autodiff gives exact gradients made of pads, slices
    and two more large matmuls. Equals `lax.conv_general_dilated` up to float summation order.
    """
    kh, kw, cin, cout = w.shape
    n, h, wd, _ = x.shape
    pads = _conv_padding((h, wd), (kh, kw), strides, padding)
    xp = jnp.pad(x, ((0, 0), *pads, (0, 0)))
    (sh, sw) = strides
    ho = (xp.shape[1] - kh) // sh + 1
    wo = (xp.shape[2] - kw) // sw + 1
    views = [
        lax.slice(xp, (0, i, j, 0), (n, i + (ho - 1) * sh + 1, j + (wo - 1) * sw + 1, cin), (1, sh, sw, 1))
        for i in range(kh)
        for j in range(kw)
    ]
    patches = jnp.concatenate(views, axis=-1) if len(views) > 1 else views[0]
    return patches @ w.reshape(kh * kw * cin, cout)


def _conv_xla(x, w, strides, padding):
    return lax.conv_general_dilated(x, w, strides, padding, dimension_numbers=("NHWC", "HWIO", "NHWC"))


@_frozen
class Conv(Layer):
    """2-D convolution, NHWC input, HWIO kernel.

    y[n,i,j,o] = sum_{a,b,c} x[n, s*i+a, s*j+b, c] * W[a,b,c,o] + b[o] (cross-correlation, as
    every framework).

    ``padding``: 'SAME' (output size ceil(H/s)) or 'VALID' (floor((H-k)/s)+1), lax's rule (for
    even kernels SAME pads more at the end, unlike PyTorch's symmetric ``padding=k//2``).
    Defaults ``w_init=he_normal`` (He et al. 2015), ``b_init=zeros``.

    ``impl``: 'xla' uses `lax.conv_general_dilated`; 'im2col' gathers the kh*kw shifted views of
    the input with strided slices and does one large matmul (exact; gradients equal up to float
    rounding); 'auto' (default) decides at trace time: on GPU/TPU (`jax.default_backend()` is
    not 'cpu') always 'xla'; on the CPU 'im2col' where the patch matrix is at most 9x the input,
    kh*kw <= 9*sh*sw (every 1x1 and 3x3 convolution), or the input is shallow, kh*kw*I <= 27 (a
    3x3 RGB input layer), else 'xla'. Reason: XLA:CPU's convolution *gradients* (dilated
    convolutions) are slow: the default CNN of ``jaxdl train`` (3x3 convolutions with 1 and 32
    input channels) trains several times faster with im2col than with XLA's convolution for both
    layers (figures in benchmarks/RESULTS.md). This is the one rule for the algorithm; `jaxdl.models.cnn` and the
    CLI use it.

    Args:
      features: output channels O.
      kernel_size: an int or (kh, kw).
      strides: an int or (sh, sw).
      padding: 'SAME' or 'VALID'.
      w_init, b_init: initializers (`jaxdl.init`).
      use_bias: False leaves ``b`` out.
      impl: 'auto', 'xla' or 'im2col'.

    Returns (``init``): ``(output_shape, params, state)``; (``apply``): ``(y, state)``.

    Source: He et al. 2015 (initialization).
    """

    features: int
    kernel_size: Any
    strides: Any = 1
    padding: str = "SAME"
    w_init: Initializer = initializers.he_normal
    b_init: Initializer = initializers.zeros
    use_bias: bool = True
    impl: str = "auto"

    # Class constants of the 'auto' rule (not fields), measured on a 2-core x86 CPU.
    im2col_max_blowup = 9.0  # kh*kw/(sh*sw): size of the patch matrix relative to the input
    im2col_max_depth = 27  # kh*kw*I: shallow inputs, where XLA's kernel gradient is slow

    def __post_init__(self):
        check_positive_int("Conv", "features", self.features)
        _set(
            self,
            kernel_size=_int_pair("Conv", "kernel_size", self.kernel_size),
            strides=_int_pair("Conv", "strides", self.strides),
            padding=_padding("Conv", self.padding),
        )
        _callable("Conv", "w_init", self.w_init)
        _callable("Conv", "b_init", self.b_init)
        _bool("Conv", "use_bias", self.use_bias)
        if self.impl not in ("auto", "xla", "im2col"):
            raise ValueError(f"Conv: impl must be 'auto', 'xla' or 'im2col', got {self.impl!r}")

    def _init(self, key, input_shape):
        h, w, c = _rank("Conv", input_shape, 3, "(H, W, C)")
        out = tuple(
            _window_out("Conv", n, k, s, self.padding)
            for n, k, s in zip((h, w), self.kernel_size, self.strides)
        )
        kw, kb = jax.random.split(key)
        params = {"w": self.w_init(kw, (*self.kernel_size, c, self.features))}
        if self.use_bias:
            params["b"] = self.b_init(kb, (self.features,))
        return out + (self.features,), params, {}

    def _impl(self, in_channels):
        if self.impl != "auto":
            return self.impl
        if jax.default_backend() != "cpu":
            return "xla"
        window = self.kernel_size[0] * self.kernel_size[1]
        small = window <= self.im2col_max_blowup * self.strides[0] * self.strides[1]
        shallow = window * in_channels <= self.im2col_max_depth
        return "im2col" if small or shallow else "xla"

    def _apply(self, params, state, x, train, key):
        conv = _conv_im2col if self._impl(x.shape[-1]) == "im2col" else _conv_xla
        y = conv(x, params["w"], self.strides, self.padding)
        return (y + params["b"] if self.use_bias else y), state


@_frozen
class Maxout(Layer):
    """Maxout: y = max_k (x W_k + b_k), k = 1..pieces.

    ``pieces`` separate affine maps of the last axis, each initialized like a Dense layer
    (``w_init=xavier_normal`` with fans (in, features)); params ``w`` (pieces, in, features)
    and ``b`` (pieces, features).

    Args:
      features: outputs per piece.
      pieces: k, the number of affine maps.
      w_init, b_init: initializers (`jaxdl.init`).

    Returns (``init``): ``(output_shape, params, state)``; (``apply``): ``(y, state)``.

    Source: Goodfellow et al. 2013; CSE 176 Lecture 11.
    """

    features: int
    pieces: int = 2
    w_init: Initializer = initializers.xavier_normal
    b_init: Initializer = initializers.zeros

    def __post_init__(self):
        check_positive_int("Maxout", "features", self.features)
        check_positive_int("Maxout", "pieces", self.pieces)
        _callable("Maxout", "w_init", self.w_init)
        _callable("Maxout", "b_init", self.b_init)

    def _init(self, key, input_shape):
        shape = _rank("Maxout", input_shape, None, "")
        kws, kbs = jnp.split(jax.random.split(key, 2 * self.pieces), 2)
        w = jnp.stack([self.w_init(k, (shape[-1], self.features)) for k in kws])
        b = jnp.stack([self.b_init(k, (self.features,)) for k in kbs])
        return shape[:-1] + (self.features,), {"w": w, "b": b}, {}

    def _apply(self, params, state, x, train, key):
        z = jnp.einsum("...i,kio->...ko", x, params["w"]) + params["b"]
        return jnp.max(z, axis=-2), state


# ----------------------------------------------------------------------------- pooling, shape


@_frozen
class _Pool(Layer):
    """Shared by the pooling layers: NHWC windows, ``strides`` defaulting to ``window``."""

    window: Any
    strides: Any = None
    padding: str = "VALID"

    def __post_init__(self):
        name = type(self).__name__
        window = _int_pair(name, "window", self.window)
        strides = window if self.strides is None else _int_pair(name, "strides", self.strides)
        _set(self, window=window, strides=strides, padding=_padding(name, self.padding))

    def _init(self, key, input_shape):
        """Returns ``(output_shape, {}, {})``: the pooled (H', W', C)."""
        name = type(self).__name__
        h, w, c = _rank(name, input_shape, 3, "(H, W, C)")
        return (
            tuple(
                _window_out(name, n, k, s, self.padding) for n, k, s in zip((h, w), self.window, self.strides)
            )
            + (c,),
            {},
            {},
        )

    def _reduce(self, x, init, op):
        return lax.reduce_window(x, init, op, (1, *self.window, 1), (1, *self.strides, 1), self.padding)


@_frozen
class MaxPool(_Pool):
    """Max over each (window) patch of an NHWC input; ``strides`` defaults to ``window``.

    Padded positions never win (they hold -inf), like flax and PyTorch.

    Args:
      window: an int or (wh, ww).
      strides: an int or (sh, sw); None: the window.
      padding: 'VALID' or 'SAME'.

    Returns (``init``): ``(output_shape, params, state)``; (``apply``): ``(y, state)``.
    """

    def _apply(self, params, state, x, train, key):
        return self._reduce(x, -jnp.inf, lax.max), state


@_frozen
class AvgPool(_Pool):
    """Mean over each (window) patch of an NHWC input; ``strides`` defaults to ``window``.

    With padding='SAME' the padded zeros count in the mean (divisor = window size), as flax's
    and PyTorch's default ``count_include_pad=True``. A window equal to (H, W) is global average
    pooling.

    Args:
      window: an int or (wh, ww).
      strides: an int or (sh, sw); None: the window.
      padding: 'VALID' or 'SAME'.

    Returns (``init``): ``(output_shape, params, state)``; (``apply``): ``(y, state)``.
    """

    def _apply(self, params, state, x, train, key):
        size = self.window[0] * self.window[1]
        return self._reduce(x, 0.0, lax.add) / size, state


@_frozen
class GlobalAvgPool(Layer):
    """Mean over the spatial axes of an NHWC input: (B, H, W, C) -> (B, C).

    `AvgPool` with a window of (H, W) then `Flatten`, without knowing H and W when the layer is
    built (the head of a ResNet, He et al. 2016, sec. 4.2; PyTorch's
    ``AdaptiveAvgPool2d(1)`` then ``flatten(1)``).

    >>> import jax, jax.numpy as jnp
    >>> GlobalAvgPool().apply({}, {}, jnp.arange(8.0).reshape(1, 2, 2, 2))[0]
    Array([[3., 4.]], dtype=float32)
    """

    def _init(self, key, input_shape):
        """Returns ``((C,), {}, {})``."""
        _, _, c = _rank("GlobalAvgPool", input_shape, 3, "(H, W, C)")
        return (c,), {}, {}

    def _apply(self, params, state, x, train, key):
        return jnp.mean(x, axis=(1, 2)), state


@_frozen
class Flatten(Layer):
    """Reshape each example to a vector: (B, d1, ..., dk) -> (B, d1*...*dk)."""

    def _init(self, key, input_shape):
        return (math.prod(input_shape),), {}, {}

    def _apply(self, params, state, x, train, key):
        return x.reshape(x.shape[0], -1), state


# ----------------------------------------------------------------------------- activations


@_frozen
class Relu(_Stateless):
    """ReLU: y = max(0, x); gradient 0 at x = 0.

    Source: CSE 176 Lecture 11; Kira, CS 7643; Krizhevsky et al. 2012.

    Returns (``init``): ``(output_shape, params, state)``; (``apply``): ``(y, state)``.
    """

    def _fn(self, x):
        return jax.nn.relu(x)


@_frozen
class LeakyRelu(_Stateless):
    """Leaky ReLU: y = x for x > 0, alpha*x otherwise.

    Args:
      alpha: the slope for x <= 0.

    Returns (``init``): ``(output_shape, params, state)``; (``apply``): ``(y, state)``.

    Source: Maas et al. 2013; CSE 176 Lecture 11.
    """

    alpha: float = 0.01

    def __post_init__(self):
        _check_real("LeakyRelu", "alpha", self.alpha)

    def _fn(self, x):
        return jnp.where(x > 0, x, self.alpha * x)


@_frozen
class PRelu(Layer):
    """Parametric ReLU: y = x for x > 0, alpha*x otherwise, alpha learned.

    One scalar ``alpha`` shared by all channels (PyTorch's default num_parameters=1),
    initialized to ``alpha_init`` = 0.25 as in the paper and PyTorch.

    Args:
      alpha_init: the initial slope.

    Returns (``init``): ``(output_shape, {"alpha": ()}, {})``; (``apply``): ``(y, state)``.

    Source: He et al. 2015; CSE 176 Lecture 11.
    """

    alpha_init: float = 0.25

    def __post_init__(self):
        _check_real("PRelu", "alpha_init", self.alpha_init)

    def _init(self, key, input_shape):
        return tuple(input_shape), {"alpha": jnp.asarray(self.alpha_init, jnp.float32)}, {}

    def _apply(self, params, state, x, train, key):
        return jnp.where(x > 0, x, params["alpha"] * x), state


@_frozen
class Sigmoid(_Stateless):
    """Logistic sigmoid: y = 1 / (1 + exp(-x)).

    Returns (``init``): ``(output_shape, params, state)``; (``apply``): ``(y, state)``.

    Source: CSE 176 Lecture 11; Kira, CS 7643.
    """

    def _fn(self, x):
        return jax.nn.sigmoid(x)


@_frozen
class Tanh(_Stateless):
    """Hyperbolic tangent: y = tanh(x).

    Returns (``init``): ``(output_shape, params, state)``; (``apply``): ``(y, state)``.

    Source: CSE 176 Lecture 11; Kira, CS 7643; LeCun et al. 1991.
    """

    def _fn(self, x):
        return jnp.tanh(x)


@_frozen
class Elu(_Stateless):
    """ELU: y = x for x > 0, alpha*(exp(x) - 1) otherwise.

    Args:
      alpha: the negative saturation value.

    Returns (``init``): ``(output_shape, params, state)``; (``apply``): ``(y, state)``.

    Source: Clevert et al. 2016.
    """

    alpha: float = 1.0

    def __post_init__(self):
        _check_real("Elu", "alpha", self.alpha)

    def _fn(self, x):
        return jax.nn.elu(x, self.alpha)


@_frozen
class Gelu(_Stateless):
    """GELU (Hendrycks & Gimpel 2016): y = x * Phi(x) = x/2 * (1 + erf(x/sqrt(2))), Phi the
    standard normal CDF; with ``approximate=True`` the tanh form
    y = x/2 * (1 + tanh(sqrt(2/pi) * (x + 0.044715 x^3))).

    Args:
      approximate: False (default) for the exact form, as ``torch.nn.functional.gelu``'s default
        ``approximate='none'``; True for ``approximate='tanh'``. `jax.nn.gelu` and
        ``flax.linen.gelu`` default to the tanh form; the two differ by up to about 5e-4.

    Returns ``y`` of the shape and dtype of ``x``; no params.
    """

    approximate: bool = False

    def __post_init__(self):
        _bool("Gelu", "approximate", self.approximate)

    def _fn(self, x):
        return jax.nn.gelu(x, approximate=bool(self.approximate))


# ----------------------------------------------------------------------------- regularizers


@_frozen
class Dropout(Layer):
    """Inverted dropout: drop units in training, scale the kept ones by 1/(1-rate).

    In training each unit is dropped with probability ``rate`` and the kept ones are scaled by
    1/(1-rate), so E[y] = x; in evaluation y = x. Training needs ``key`` (a different key gives a
    different mask).

    ``rate`` is the probability of *dropping*, as in PyTorch and flax; the Tips and Tricks notes
    write p for the keep probability and rescale at test time instead, and stax's
    ``Dropout(rate)`` keeps with probability ``rate``.

    Args:
      rate: the probability of dropping a unit, in [0, 1).

    Returns (``init``): ``(output_shape, params, state)``; (``apply``): ``(y, state)``.

    Source: Srivastava et al. 2014; Tips and Tricks notes.

    >>> import jax, jax.numpy as jnp
    >>> drop = Dropout(0.5)
    >>> drop.apply({}, {}, jnp.ones((1, 4)))[0].tolist()  # evaluation: the identity
    [[1.0, 1.0, 1.0, 1.0]]
    >>> y = drop.apply({}, {}, jnp.ones((1, 1000)), train=True, key=jax.random.key(0))[0]
    >>> sorted(set(y.ravel().tolist()))  # kept units scaled by 1 / (1 - rate)
    [0.0, 2.0]
    """

    rate: float

    def __post_init__(self):
        _check_real("Dropout", "rate", self.rate, low=0.0, high=1.0, high_open=True)  # drop probability

    def _init(self, key, input_shape):
        return tuple(input_shape), {}, {}

    def _apply(self, params, state, x, train, key):
        if not train or self.rate == 0:
            return x, state
        if key is None:
            raise ValueError(
                "Dropout: apply(..., train=True) needs a PRNG key: pass key=... "
                "(Sequential splits the key it is given among its layers)"
            )
        keep = jax.random.bernoulli(key, 1.0 - self.rate, x.shape)
        return jnp.where(keep, x / (1.0 - self.rate), 0.0).astype(x.dtype), state


@_frozen
class BatchNorm(Layer):
    """Batch normalization over every axis but the last.

    Training: mu, s2 = mean and (biased) variance of the batch over all axes but the last;
    y = gamma * (x - mu) / sqrt(s2 + eps) + beta, and the running statistics become
    mean <- momentum*mean + (1-momentum)*mu, var <- momentum*var + (1-momentum)*s2*n/(n-1),
    the unbiased variance as PyTorch (n = values per channel in the whole batch).
    Evaluation: the same map with (mean, var), state unchanged; a linear map, which
    `fold_batchnorm` merges into the preceding Dense/Conv.

    ``momentum`` is the weight of the *old* value (flax's convention): PyTorch's
    ``BatchNorm1d(momentum=0.1)`` is ``BatchNorm(momentum=0.9)``. Flax keeps the biased
    variance in its running average; we keep the unbiased one, as PyTorch.
    Params ``gamma`` (init 1), ``beta`` (init 0); state ``mean`` (0), ``var`` (1). Statistics
    are computed in float32 (or wider) whatever the input's dtype; the output has the input's.

    ``axis_name``: under `jax.pmap`/`shard_map`/`vmap` with that axis, mu and s2 are those of
    the global batch (mu = pmean of local means, s2 = pmean of local means of (x - mu)^2: two
    passes, exact and stable, one all-reduce more than the one-pass E[x^2] - mu^2), and n is the
    global count, so every replica holds identical statistics. Without it each replica uses its
    own shard and replicas drift apart.

    Args:
      momentum: the weight of the old running statistics.
      eps: added to the variance.
      axis_name: the mapped axis to average the statistics over (data parallelism).

    Returns (``init``): ``(output_shape, params, state)``; (``apply``): ``(y, state)``.

    Source: Ioffe & Szegedy 2015; CSE 176 Lecture 11.
    """

    momentum: float = 0.9
    eps: float = 1e-5
    axis_name: Any = None

    def __post_init__(self):
        _check_real("BatchNorm", "momentum", self.momentum, low=0.0, high=1.0)  # weight of the old value
        _check_real("BatchNorm", "eps", self.eps, low=0.0, low_open=True)

    def with_batch_statistics(self):
        """``(BatchNorm at momentum 0, 1)``: its running statistics become the batch's."""
        return dataclasses.replace(self, momentum=0.0), 1

    def _init(self, key, input_shape):
        shape = _rank("BatchNorm", input_shape, None, "")
        c = shape[-1]
        params = {"gamma": jnp.ones((c,)), "beta": jnp.zeros((c,))}
        state = {"mean": jnp.zeros((c,)), "var": jnp.ones((c,))}
        return shape, params, state

    def _apply(self, params, state, x, train, key):
        # Statistics and normalization in at least float32 (a bf16/fp16 input would round the
        # mean and variance); the output keeps the input's dtype, so the next layer's matmul
        # runs in the compute dtype of a mixed-precision policy.
        dtype = x.dtype
        x = x.astype(jnp.promote_types(dtype, jnp.float32))
        if not train:
            mean, var = state["mean"], state["var"]
        else:
            mean, var, n = self._batch_stats(x)
            m = self.momentum
            state = {
                "mean": m * state["mean"] + (1 - m) * lax.stop_gradient(mean),
                "var": m * state["var"] + (1 - m) * lax.stop_gradient(var) * (n / (n - 1)),
            }
        y = (x - mean) * lax.rsqrt(var + self.eps) * params["gamma"] + params["beta"]
        return y.astype(dtype), state

    def _batch_stats(self, x):
        axes = tuple(range(x.ndim - 1))
        n = math.prod(x.shape[:-1])
        mean = jnp.mean(x, axes)
        if self.axis_name is not None:
            n *= lax.axis_size(self.axis_name)
            mean = lax.pmean(mean, self.axis_name)
        var = jnp.mean(jnp.square(x - mean), axes)
        if self.axis_name is not None:
            var = lax.pmean(var, self.axis_name)
        if n < 2:
            raise ValueError(
                f"BatchNorm: training needs more than one value per channel, got x of shape {tuple(x.shape)}"
            )
        return mean, var, n


def _float32(x):
    """``x`` in at least float32: normalization statistics of bf16/fp16 inputs (see BatchNorm)."""
    return x.astype(jnp.promote_types(x.dtype, jnp.float32))


@_frozen
class LayerNorm(Layer):
    """Layer normalization (Ba, Kiros & Hinton 2016) over the last axis of each example:

        mu = mean(x), s2 = mean((x - mu)^2) over the last axis (the biased variance),
        y = gamma * (x - mu) / sqrt(s2 + eps) + beta.

    The same map in training and evaluation; no state. Numbers of
    ``torch.nn.LayerNorm(normalized_shape=x.shape[-1], eps=eps)``. ``flax.linen.LayerNorm``
    defaults to ``eps=1e-6`` and takes s2 = mean(x^2) - mu^2 (``use_fast_variance``), which
    loses digits when |mu| >> std; we subtract the mean first, as PyTorch. Statistics are
    computed in float32 (or wider) whatever the input's dtype; the output has the input's.

    Args:
      eps: added to the variance, > 0 (PyTorch's default 1e-5).
      use_scale: learn ``gamma`` (shape (features,), init 1); without it gamma = 1.
      use_bias: learn ``beta`` (shape (features,), init 0); without it beta = 0.

    Returns ``y`` of the shape and dtype of ``x``.
    """

    eps: float = 1e-5
    use_scale: bool = True
    use_bias: bool = True

    def __post_init__(self):
        _check_real("LayerNorm", "eps", self.eps, low=0.0, low_open=True)
        _bool("LayerNorm", "use_scale", self.use_scale)
        _bool("LayerNorm", "use_bias", self.use_bias)

    def _init(self, key, input_shape):
        shape = _rank("LayerNorm", input_shape, None, "")
        params = {"gamma": jnp.ones(shape[-1:])} if self.use_scale else {}
        if self.use_bias:
            params["beta"] = jnp.zeros(shape[-1:])
        return shape, params, {}

    def _apply(self, params, state, x, train, key):
        x32 = _float32(x)
        mean = jnp.mean(x32, axis=-1, keepdims=True)
        var = jnp.mean(jnp.square(x32 - mean), axis=-1, keepdims=True)
        y = (x32 - mean) * lax.rsqrt(var + self.eps)
        y = y * params["gamma"] if self.use_scale else y
        y = y + params["beta"] if self.use_bias else y
        return y.astype(x.dtype), state


@_frozen
class RMSNorm(Layer):
    """Root-mean-square normalization (Zhang & Sennrich 2019) over the last axis of each example:

        y = gamma * x / sqrt(mean(x^2) + eps)    (mean over the last axis; no centering, no beta)

    Numbers of ``torch.nn.RMSNorm(x.shape[-1], eps=eps)``. Defaults differ: PyTorch's
    ``eps=None`` means ``torch.finfo(x.dtype).eps`` (1.2e-7 in float32); ours is 1e-6, as
    ``flax.linen.RMSNorm``'s. Statistics in float32 (or wider) whatever the input's dtype; the
    output has the input's. No state.

    Args:
      eps: added to the mean square, > 0.

    Returns ``y`` of the shape and dtype of ``x``; params ``gamma`` (shape (features,), init 1).
    """

    eps: float = 1e-6

    def __post_init__(self):
        _check_real("RMSNorm", "eps", self.eps, low=0.0, low_open=True)

    def _init(self, key, input_shape):
        shape = _rank("RMSNorm", input_shape, None, "")
        return shape, {"gamma": jnp.ones(shape[-1:])}, {}

    def _apply(self, params, state, x, train, key):
        x32 = _float32(x)
        ms = jnp.mean(jnp.square(x32), axis=-1, keepdims=True)
        return (x32 * lax.rsqrt(ms + self.eps) * params["gamma"]).astype(x.dtype), state


# ----------------------------------------------------------------------------- sequences


@_frozen
class Embedding(Layer):
    """A lookup table: integer ids -> learned vectors, y[..., :] = W[x[...], :]; W has shape
    (num_embeddings, features).

    Numbers of ``torch.nn.Embedding(num_embeddings, features)``, whose weight is initialized
    N(0, 1), as our default ``w_init=normal(1.0)`` (flax's ``nn.Embed`` uses variance scaling,
    std 1/sqrt(features)). The gradient of W sums over repeated ids, as PyTorch's.

    ``x`` must have an integer dtype: float ids are refused by name when the layer is traced.
    Ids outside [0, num_embeddings) cannot be checked under jit; their vectors are NaN (PyTorch
    raises an IndexError; `jnp.take` would clamp silently), so the loss becomes NaN and the train
    step skips the step.

    Args:
      num_embeddings: size of the vocabulary, >= 1.
      features: length of each vector, >= 1.
      w_init: initializer of W.

    Returns ``y`` of shape ``x.shape + (features,)``, W's dtype; params ``w``.
    """

    num_embeddings: int
    features: int
    w_init: Initializer = initializers.normal(1.0)

    def __post_init__(self):
        check_positive_int("Embedding", "num_embeddings", self.num_embeddings)
        check_positive_int("Embedding", "features", self.features)
        _callable("Embedding", "w_init", self.w_init)

    def _init(self, key, input_shape):
        params = {"w": self.w_init(key, (self.num_embeddings, self.features))}
        return tuple(input_shape) + (self.features,), params, {}

    def _apply(self, params, state, x, train, key):
        if not jnp.issubdtype(x.dtype, jnp.integer):
            raise TypeError(
                f"Embedding: x must hold integer ids in [0, {self.num_embeddings}), got dtype "
                f"{x.dtype.name}; cast the ids with x.astype(jnp.int32)"
            )
        n = self.num_embeddings
        y = jnp.take(params["w"], jnp.clip(x, 0, n - 1), axis=0)
        return jnp.where(((x >= 0) & (x < n))[..., None], y, jnp.nan), state


@_frozen
class PositionalEmbedding(Layer):
    """A learned position embedding added to a sequence of vectors: y[b, t] = x[b, t] + P[t]
    for x of shape (batch, seq, features), seq <= max_len; P has shape (max_len, features).

    The learned variant of Vaswani et al. 2017 (sec. 3.5: "nearly identical results" to their
    sinusoids), as GPT (Radford et al. 2018) and GPT-2 (Radford et al. 2019) use it: GPT-2's
    ``wpe``, flax's lm1b ``AddPositionEmbs``. A sequence shorter than ``max_len`` uses the first
    rows of P; a longer one is refused at ``init``. Default ``w_init=normal(0.01)``, GPT-2's.

    Args:
      max_len: the most positions, >= 1.
      w_init: initializer of P.

    Returns ``x + P[:seq]`` of the shape of ``x``; params ``w`` (max_len, features).
    """

    max_len: int
    w_init: Initializer = initializers.normal(0.01)

    def __post_init__(self):
        check_positive_int("PositionalEmbedding", "max_len", self.max_len)
        _callable("PositionalEmbedding", "w_init", self.w_init)

    def _init(self, key, input_shape):
        seq, features = _rank("PositionalEmbedding", input_shape, 2, "(seq, features)")
        if seq > self.max_len:
            raise ValueError(
                f"PositionalEmbedding: input_shape {tuple(input_shape)} has {seq} positions, more "
                f"than max_len={self.max_len}; expected seq <= max_len"
            )
        return (seq, features), {"w": self.w_init(key, (self.max_len, features))}, {}

    def _apply(self, params, state, x, train, key):
        return x + params["w"][: x.shape[1]].astype(x.dtype), state


@_frozen
class MultiHeadAttention(Layer):
    """Multi-head scaled dot-product self-attention (Vaswani et al. 2017) over inputs of shape
    (batch, seq, features):

        q, k, v = x Wq + bq, x Wk + bk, x Wv + bv, each split into num_heads heads of d = qkv/heads
        head_h = softmax(q_h k_h^T / sqrt(d) + mask) v_h,   mask[t, s] = -inf for s > t if causal
        y = concat(head_1, ..., head_H) Wo + bo

    Numbers of ``torch.nn.MultiheadAttention(features, num_heads, batch_first=True)`` with its
    ``in_proj_weight`` = concat(Wq, Wk, Wv)^T and ``out_proj.weight`` = Wo^T (PyTorch stores (out,
    in); ``attn_mask`` = the causal mask), and of ``torch.nn.functional.scaled_dot_product_attention``
    on the same projections. Logits and softmax are computed in float32 (or wider).
    ``dropout`` drops attention weights in training (inverted scaling, as PyTorch's and flax's
    ``dropout_rate``) and needs ``key`` then. Initialization as Dense: ``w_init=xavier_normal``
    (PyTorch: xavier_uniform for Wq, Wk, Wv and U(+-1/sqrt(in)) for Wo), ``b_init=zeros``.

    Args:
      num_heads: number of heads, >= 1; must divide qkv_features.
      qkv_features: width of q, k and v over all heads (default: the input's features).
      out_features: width of y (default: the input's features).
      causal: position t attends to positions <= t only.
      dropout: probability of dropping an attention weight in training, in [0, 1).
      w_init, b_init, use_bias: as Dense, for the four projections.

    Returns ``y`` of shape (batch, seq, out_features); params ``wq``, ``wk``, ``wv`` (features,
    qkv), ``wo`` (qkv, out) and biases ``bq``, ``bk``, ``bv`` (qkv,), ``bo`` (out,).
    """

    num_heads: int
    qkv_features: int | None = None
    out_features: int | None = None
    causal: bool = False
    dropout: float = 0.0
    w_init: Initializer = initializers.xavier_normal
    b_init: Initializer = initializers.zeros
    use_bias: bool = True

    def __post_init__(self):
        name = "MultiHeadAttention"
        check_positive_int(name, "num_heads", self.num_heads)
        check_int(name, "qkv_features", self.qkv_features, allow_none=True)
        check_int(name, "out_features", self.out_features, allow_none=True)
        if self.qkv_features is not None:
            self._check_heads("qkv_features", self.qkv_features)
        _bool(name, "causal", self.causal)
        _check_real(name, "dropout", self.dropout, low=0.0, high=1.0, high_open=True)
        _callable(name, "w_init", self.w_init)
        _callable(name, "b_init", self.b_init)
        _bool(name, "use_bias", self.use_bias)

    def _check_heads(self, name, width):
        if width % self.num_heads:
            raise ValueError(
                f"MultiHeadAttention: {name}={width} is not divisible by num_heads={self.num_heads}; "
                "expected a multiple of num_heads (each head gets an equal share)"
            )

    def _init(self, key, input_shape):
        seq, features = _rank("MultiHeadAttention", input_shape, 2, "(seq, features)")
        qkv = self.qkv_features or features
        if self.qkv_features is None:
            self._check_heads("qkv_features (the input's features)", qkv)
        out = self.out_features or features
        keys = jax.random.split(key, 8)
        shapes = {"q": (features, qkv), "k": (features, qkv), "v": (features, qkv), "o": (qkv, out)}
        params = {f"w{n}": self.w_init(k, s) for (n, s), k in zip(shapes.items(), keys[:4])}
        if self.use_bias:
            params |= {f"b{n}": self.b_init(k, s[-1:]) for (n, s), k in zip(shapes.items(), keys[4:])}
        return (seq, out), params, {}

    def _apply(self, params, state, x, train, key):
        b, t, _ = x.shape

        def project(name, z):
            y = z @ params[f"w{name}"]
            return y + params[f"b{name}"] if self.use_bias else y

        q, k, v = (project(n, x).reshape(b, t, self.num_heads, -1) for n in "qkv")
        logits = jnp.einsum("bthd,bshd->bhts", _float32(q), _float32(k)) / math.sqrt(q.shape[-1])
        if self.causal:
            logits = jnp.where(jnp.tril(jnp.ones((t, t), bool)), logits, -jnp.inf)
        weights = jax.nn.softmax(logits, axis=-1)
        if train and self.dropout > 0:
            if key is None:
                raise ValueError(
                    "MultiHeadAttention: apply(..., train=True) with dropout > 0 needs a PRNG key: "
                    "pass key=... (Sequential splits the key it is given among its layers)"
                )
            keep = jax.random.bernoulli(key, 1.0 - self.dropout, weights.shape)
            weights = jnp.where(keep, weights / (1.0 - self.dropout), 0.0)
        heads = jnp.einsum("bhts,bshd->bthd", weights.astype(v.dtype), v)
        return project("o", heads.reshape(b, t, -1)), state


# ----------------------------------------------------------------------------- combinators


def _kind(layer):
    """``dense``, ``batchnorm``, ...: the lowercased class name; a `Remat` is named after the
    layer it wraps, so that wrapping layers keeps the params' names."""
    while isinstance(layer, Remat):
        layer = layer.layer
    return type(layer).__name__.lower()


def _run(layer, params, state, x, train, key):
    """Apply a child without re-checking (Sequential checked the whole tree already)."""
    if isinstance(layer, Layer):
        return layer._apply(params, state, x, train, key)
    return layer.apply(params, state, x, train=train, key=key)


def _with_batch_statistics(layers):
    """The children's `Layer.with_batch_statistics` (a layer of the protocol without the
    method has no BatchNorm): ``(new children, total count)``."""
    pairs = [
        layer.with_batch_statistics() if hasattr(layer, "with_batch_statistics") else (layer, 0)
        for layer in layers
    ]
    return tuple(layer for layer, _ in pairs), sum(n for _, n in pairs)


def _layer_objects(owner, layers):
    """``layers`` as a tuple, each checked to be a layer object (not a class) with init and apply."""
    for i, layer in enumerate(layers):
        check_layer(owner, f"layer {i}", layer)
    return tuple(layers)


@dataclasses.dataclass(frozen=True, init=False)
class Sequential(Layer):
    """Layers applied one after the other.

    y = f_n(...f_2(f_1(x))). Params and state are dicts keyed ``f"{kind}_{index}"`` (kind =
    lowercased class name, index = position: ``dense_0``, ``batchnorm_1``, ...), leaving out
    layers that have none. With a key, each layer gets its own
    ``jax.random.split(key, len(layers))[index]``. Any object with ``init``/``apply`` of this
    protocol can be a layer.

    ``remat=True``: gradient checkpointing: each layer, together with the parameter-free
    elementwise layers that follow it (activation, Dropout), runs under `jax.checkpoint`, so the
    backward pass recomputes the group's inner activations (a Dense's pre-activation) from the
    group's input instead of keeping them. The same params, state and numbers. (Checkpointing
    each layer alone would keep every layer's input, i.e. every activation: nothing saved.) For
    larger blocks, wrap them in `Remat`.

    Args:
      *layers: the layers, first applied first.
      remat: recompute each layer's activations in the backward pass (keyword only).

    Returns (``init``): ``(output_shape, params, state)``, dicts keyed by layer name;
    (``apply``): ``(y, state)``.

    Source: Chen et al. 2016 (``remat``).

    >>> import jax, jax.numpy as jnp
    >>> model = Sequential(Dense(4), Relu(), Dense(2))
    >>> shape, params, state = model.init(jax.random.key(0), (3,))
    >>> shape, sorted(params)
    ((2,), ['dense_0', 'dense_2'])
    >>> model.apply(params, state, jnp.ones((5, 3)))[0].shape
    (5, 2)
    """

    layers: tuple
    remat: bool = dataclasses.field(default=False, repr=False)

    def __init__(self, *layers, remat: bool = False):
        object.__setattr__(self, "layers", _layer_objects("Sequential", layers))
        _bool("Sequential", "remat", remat)
        object.__setattr__(self, "remat", bool(remat))

    def _names(self):
        return [f"{_kind(layer)}_{i}" for i, layer in enumerate(self.layers)]

    def with_batch_statistics(self):
        """See `Layer.with_batch_statistics`."""
        layers, n = _with_batch_statistics(self.layers)
        if getattr(self, "remat", False):  # `Add` shares this method and has no remat
            return type(self)(*layers, remat=True), n
        return type(self)(*layers), n

    def _groups(self):
        """Index ranges of the layers `remat` checkpoints together: each layer with the
        parameter-free elementwise layers after it (activations, Dropout)."""
        starts = [
            i for i, layer in enumerate(self.layers) if i == 0 or not isinstance(layer, (_Stateless, Dropout))
        ]
        return [range(a, b) for a, b in zip(starts, [*starts[1:], len(self.layers)])]

    def _apply_remat(self, params, state, x, train, key):
        """`_apply` with each of `_groups` under `jax.checkpoint` (Chen et al. 2016)."""
        names = self._names()
        keys = [None] * len(self.layers) if key is None else list(jax.random.split(key, len(self.layers)))
        new_state = {}
        for group in self._groups():

            def run(params, state, x, keys, group=group):
                out = {}
                for i in group:
                    x, s = _run(
                        self.layers[i], params.get(names[i], {}), state.get(names[i], {}), x, train, keys[i]
                    )
                    if s:
                        out[names[i]] = s
                return x, out

            mine = {names[i] for i in group}
            sub = [{k: v for k, v in tree.items() if k in mine} for tree in (params, state)]
            x, s = jax.checkpoint(run)(
                *sub, x, [keys[i] if keys[i] is not None else None for i in range(len(keys))]
            )
            new_state.update(s)
        return x, new_state

    def _init(self, key, input_shape):
        shape, params, state = tuple(input_shape), {}, {}
        keys = jax.random.split(key, max(len(self.layers), 1))
        for name, layer, k in zip(self._names(), self.layers, keys):
            try:
                shape, p, s = layer.init(k, shape)
            except (ValueError, TypeError) as err:
                if type(err) not in (ValueError, TypeError):
                    raise
                raise type(err)(f"Sequential: layer {name!r} with input shape {shape}: {err}") from None
            shape = tuple(shape)
            if p:
                params[name] = p
            if s:
                state[name] = s
        return shape, params, state

    def _walk(self, params, state, x, train, key):
        """Yields ``(name, output, new_state)`` layer by layer: the one walk over the layers'
        outputs, which `apply` and `intermediates` share."""
        keys = [None] * len(self.layers) if key is None else jax.random.split(key, len(self.layers))
        for name, layer, k in zip(self._names(), self.layers, keys):
            x, s = _run(layer, params.get(name, {}), state.get(name, {}), x, train, k)
            yield name, x, s

    def _apply(self, params, state, x, train, key):
        if self.remat:
            return self._apply_remat(params, state, x, train, key)
        y, new_state = x, {}
        for name, y, s in self._walk(params, state, x, train, key):  # noqa: B007 (y: the last output)
            if s:
                new_state[name] = s
        return y, new_state

    def intermediates(self, params, state, x, *, train=False, key=None) -> dict:
        """Every layer's output on the batch ``x``: ``{name: f_i(...f_1(x))}``, keyed like the
        params (``dense_0``, ``relu_1``, ...), in layer order; the last value is ``apply``'s
        output. Each layer runs as in ``apply`` (the same keys, ``train`` mode and state), so
        these are the activations that training sees. `jaxdl.diagnostics.activation_stats` and
        `jaxdl.doctor` read a model's layers through it (the per-layer statistics of Glorot &
        Bengio 2010, "Understanding the difficulty of training deep feedforward neural
        networks", sec. 3).

        >>> import jax.numpy as jnp
        >>> outs = Sequential(Relu(), Flatten()).intermediates({}, {}, jnp.array([[-1.0, 2.0]]))
        >>> list(outs), outs["relu_0"]
        (['relu_0', 'flatten_1'], Array([[0., 2.]], dtype=float32))
        """
        if not isinstance(x, jax.Array):
            check_numeric("Sequential.intermediates", "x", x)
        x = jnp.asarray(x)
        _check_call(self, params, state, x)
        return {name: y for name, y, _ in self._walk(params, state, x, train, key)}


@_frozen
class Residual(Layer):
    """A residual connection (He et al. 2016): y = x + layer(x).

    ``params`` and ``state`` are ``layer``'s own (not nested under a key), and the state is
    threaded through as Sequential does; ``key`` is passed on to ``layer``. ``layer`` must keep
    the shape of its input: a mismatch is refused at ``init``, naming the shapes.

    Args:
      layer: any layer of this protocol (often a Sequential, e.g. LayerNorm then attention).

    Returns ``x + layer(x)`` and ``layer``'s new state.
    """

    layer: Any

    def __post_init__(self):
        check_layer("Residual", "layer", self.layer)

    def with_batch_statistics(self):
        """See `Layer.with_batch_statistics`."""
        (layer,), n = _with_batch_statistics((self.layer,))
        return Residual(layer), n

    def _init(self, key, input_shape):
        shape, params, state = self.layer.init(key, input_shape)
        if tuple(shape) != tuple(input_shape):
            raise ValueError(
                f"Residual: layer {type(self.layer).__name__} maps input_shape {tuple(input_shape)} "
                f"to {tuple(shape)}; y = x + layer(x) needs the output shape to equal the input shape"
            )
        return tuple(shape), params, state

    def _apply(self, params, state, x, train, key):
        y, state = _run(self.layer, params, state, x, train, key)
        return x + y, state


@_frozen
class Remat(Layer):
    """``layer`` whose activations are recomputed in the backward pass instead of kept.

    Gradient checkpointing: the forward pass keeps only the input of ``layer``; the backward
    pass runs ``layer``'s forward again to get what its gradient needs (`jax.checkpoint`, JAX
    docs page "Gradient checkpointing with jax.checkpoint"). The same numbers, fewer activations
    alive at once, one more forward pass of the wrapped layers. Wrap blocks of a `Sequential`,
    e.g. two layers at a time: ``Sequential(Remat(Sequential(Dense(512), Relu())), ...)``;
    `remat_layers` wraps each layer of a Sequential.

    Args:
      layer: any layer of this protocol.

    Returns ``layer``'s output and new state; its params and state are ``layer``'s own (not
    nested under a key), and inside a Sequential it is named after ``layer`` (``dense_0``), so a
    model keeps its params' tree when its layers are wrapped.

    Source: Chen et al. 2016.

    >>> import jax, jax.numpy as jnp
    >>> layer = Remat(Dense(3))
    >>> _, params, state = layer.init(jax.random.key(0), (2,))
    >>> sorted(params)
    ['b', 'w']
    """

    layer: Any

    def __post_init__(self):
        check_layer("Remat", "layer", self.layer)

    def with_batch_statistics(self):
        """See `Layer.with_batch_statistics`."""
        (layer,), n = _with_batch_statistics((self.layer,))
        return Remat(layer), n

    def _init(self, key, input_shape):
        return self.layer.init(key, input_shape)

    def _apply(self, params, state, x, train, key):
        if key is None:
            return jax.checkpoint(lambda p, s, x: _run(self.layer, p, s, x, train, None))(params, state, x)
        return jax.checkpoint(lambda p, s, x, k: _run(self.layer, p, s, x, train, k))(params, state, x, key)


def remat_layers(owner: str, model) -> "Sequential":
    """``model`` (a `Sequential`) with ``remat=True``: each top-level layer, with the activation
    and Dropout after it, under `jax.checkpoint`; the same params' tree and the same numbers.

    Args:
      owner: the caller, named in errors.
      model: a `Sequential`.

    Returns:
      ``Sequential(*model.layers, remat=True)``. A model that is not a Sequential is a
      ValueError naming ``owner``.

    Source: Chen et al. 2016.
    """
    if not isinstance(model, Sequential):
        raise ValueError(
            f"{owner}: remat=True checkpoints each top-level layer of a jaxdl.layers.Sequential "
            f"(Sequential(..., remat=True)), but the model is a {type(model).__name__}; wrap "
            f"its blocks in jaxdl.layers.Remat yourself"
        )
    return Sequential(*model.layers, remat=True)


@dataclasses.dataclass(frozen=True, init=False)
class Add(Layer):
    """Parallel branches on the same input, summed: y = f_1(x) + ... + f_n(x).

    The residual block whose shortcut is not the identity (He et al. 2016, "Deep Residual
    Learning for Image Recognition", eq. 2: y = F(x) + W_s x, the projection shortcut, e.g.
    ``Add(block, Sequential(Conv(c, 1, strides=2), BatchNorm()))``); where the shortcut is the
    identity, `Residual` says so. Params and state are keyed as `Sequential`'s
    (``f"{kind}_{index}"``, leaving out branches that have none); with a key each branch gets
    ``jax.random.split(key, n)[index]``. Every branch must map the input to the same shape: a
    mismatch is refused at ``init``, naming the branches and their shapes.

    >>> import jax, jax.numpy as jnp
    >>> add = Add(Relu(), Flatten())
    >>> add.apply({}, {}, jnp.array([[-1.0, 0.0, 2.0]]))[0]
    Array([[-1.,  0.,  4.]], dtype=float32)
    """

    layers: tuple

    def __init__(self, *layers):
        if not layers:
            raise ValueError("Add: expected at least one branch, got none")
        object.__setattr__(self, "layers", _layer_objects("Add", layers))

    _names = Sequential._names
    with_batch_statistics = Sequential.with_batch_statistics

    def _init(self, key, input_shape):
        params, state, shapes = {}, {}, {}
        for name, layer, k in zip(self._names(), self.layers, jax.random.split(key, len(self.layers))):
            shape, p, s = layer.init(k, input_shape)
            shapes[name] = tuple(shape)
            if p:
                params[name] = p
            if s:
                state[name] = s
        if len(set(shapes.values())) > 1:
            raise ValueError(
                f"Add: the branches map input_shape {tuple(input_shape)} to different shapes {shapes}; "
                "a sum needs them equal"
            )
        return next(iter(shapes.values())), params, state

    def _apply(self, params, state, x, train, key):
        keys = [None] * len(self.layers) if key is None else jax.random.split(key, len(self.layers))
        total, new_state = None, {}
        for name, layer, k in zip(self._names(), self.layers, keys):
            y, s = _run(layer, params.get(name, {}), state.get(name, {}), x, train, k)
            total = y if total is None else total + y
            if s:
                new_state[name] = s
        return total, new_state


@dataclasses.dataclass(frozen=True, eq=False)
class FlaxModule(Layer):
    """A `flax.linen.Module` as a layer (made by `from_flax`): ``params`` is the 'params'
    collection, ``state`` every other collection the module keeps ('batch_stats', 'cache', any
    name), all of them mutable in training and returned as the new state.

    What the wrapper passes, so that flax's own example models run unmodified:

    - **Mode**: ``train`` goes to the module's ``__call__`` as ``train=train`` or
      ``training=train`` when it has such an argument; else a module with a bool
      ``deterministic`` attribute is cloned with ``deterministic=not train``; else a
      ``deterministic`` argument gets ``not train``; else a ``config`` attribute with a
      ``deterministic`` field (flax's lm1b/wmt ``TransformerConfig``) is replaced in a clone.
      Eval mode needs no key.
    - **Randomness**: ``rngs`` names the rng streams the module draws from (default
      ``("dropout",)``). From the layer's ``key`` (the train step's key, `jaxdl.train_step.step_key`)
      the first stream gets ``key`` itself and stream ``i >= 1`` gets ``fold_in(key, i)``, so a
      hand-written flax loop passes ``rngs={rngs[0]: key, rngs[1]: fold_in(key, 1), ...}`` to
      reproduce it. A stream not named is refused by name.
    - **Metadata boxes**: parameters boxed by ``nn.with_logical_partitioning`` /
      ``nn.with_partitioning`` (flax's lm1b) are unboxed (`flax.linen.unbox`): params and state
      hold plain arrays. `partition_names` returns their logical names for sharding.
    - **Axis names on one device**: a module whose layers name an axis (flax's ImageNet ResNet
      hard-codes ``nn.BatchNorm(axis_name='batch')``) runs, where that axis is not bound (one
      device, no ``shard_map``/``pmap``), inside ``jax.vmap(..., axis_name=name, axis_size=1)``:
      a mean over one device is the value itself, so the result is the one-device one. Where
      the axis is bound (``fit(..., devices=N)`` binds ``'batch'``), the statistics are
      averaged across devices as flax's examples do; under ``devices=N`` name the axis
      ``'batch'``: another name is bound per device, and each device keeps its own statistics.
    - **Inputs at init**: ``init`` calls ``module.init`` on a batch of one zero example (in eval
      mode), float32, or int32 when the module refuses floats (token ids for ``nn.Embed``).

    The wrapper compares and hashes by the identity of its module: jaxdl's caches (compiled
    eval steps, shape checks) never hash a user's module, which may hold lists (flax's
    ``ResNet(stage_sizes=[2, 2, 2, 2])``) and so be unhashable.
    """

    module: Any
    rngs: tuple = ("dropout",)

    def __eq__(self, other):
        return type(other) is type(self) and other.module is self.module and other.rngs == self.rngs

    def __hash__(self):
        return hash((type(self), id(self.module), self.rngs))

    def _bound(self, train):
        """The module and the keyword arguments that put it in train or eval mode."""
        module = self.module
        params = inspect.signature(type(module).__call__).parameters
        for name in ("train", "training"):
            if name in params:
                return module, {name: train}
        if isinstance(getattr(module, "deterministic", None), bool):  # before the argument:
            return module.clone(deterministic=not train), {}  # nn.merge_param refuses both set
        if "deterministic" in params:
            return module, {"deterministic": not train}
        config = getattr(module, "config", None)
        if dataclasses.is_dataclass(config) and isinstance(getattr(config, "deterministic", None), bool):
            return module.clone(config=dataclasses.replace(config, deterministic=not train)), {}
        return module, {}

    def _keys(self, key):
        if key is None:
            return None
        return {name: key if i == 0 else jax.random.fold_in(key, i) for i, name in enumerate(self.rngs)}

    def _call(self, fn):
        """``fn()``, inside a size-1 ``vmap`` for each axis name the module's layers use that
        no enclosing ``shard_map``/``pmap``/``vmap`` binds (see the class docstring)."""
        import flax.linen as nn

        names = set()

        def record(next_fun, args, kwargs, context):
            axis = getattr(context.module, "axis_name", None)
            names.update(axis if isinstance(axis, (tuple, list)) else [axis])
            return next_fun(*args, **kwargs)

        try:
            with nn.intercept_methods(record):
                return fn()
        except NameError as err:
            unbound = sorted(n for n in names if isinstance(n, str) and not _axis_bound(n))
            if not unbound and "axis name" in str(err):
                raise NameError(
                    f"FlaxModule: {err} No layer of the module declares that axis as its "
                    "axis_name, so it cannot be bound for one device; run the model under "
                    "jax.shard_map with that axis, or fit(..., devices=N) for the axis 'batch'"
                ) from None
            if not unbound:
                raise
        for name in unbound:
            fn = _size1_vmap(fn, name)
        return jax.tree.map(lambda a: a[(0,) * len(unbound)], fn())

    def _flax_errors(self, fn):
        import flax.errors

        try:
            return self._call(fn)
        except flax.errors.InvalidRngError as err:
            raise ValueError(
                f"FlaxModule: {str(err).splitlines()[0]}, but rngs={self.rngs!r}; name every rng "
                "stream the module draws from: from_flax(module, rngs=('dropout', 'other'))"
            ) from None

    def _init_variables(self, key, input_shape):
        module, kwargs = self._bound(False)
        rngs = {"params": key, **self._keys(key)}
        try:
            x = jnp.zeros((1, *input_shape))
            return self._flax_errors(lambda: module.init_with_output(rngs, x, **kwargs))
        except (TypeError, ValueError) as err:
            try:  # token ids (nn.Embed refuses floats)
                x = jnp.zeros((1, *input_shape), jnp.int32)
                return self._flax_errors(lambda: module.init_with_output(rngs, x, **kwargs))
            except (TypeError, ValueError):
                raise err from None

    def _init(self, key, input_shape):
        import flax.linen as nn

        y, variables = self._init_variables(key, input_shape)
        variables = nn.unbox(dict(variables))
        params = dict(variables.pop("params", {}))
        if not hasattr(y, "shape"):
            raise TypeError(f"FlaxModule: the module must return one array, got {type(y).__name__}")
        return tuple(y.shape[1:]), params, {k: dict(v) for k, v in variables.items()}

    def partition_names(self, input_shape):
        """``(params, state)`` trees of `jax.sharding.PartitionSpec`: the logical axis names of
        each leaf boxed by ``nn.with_logical_partitioning``/``nn.with_partitioning`` (an empty
        ``PartitionSpec()`` for a leaf without names), as ``flax.linen.get_partition_spec`` gives
        them. Nothing runs (`jax.eval_shape`); map them to a mesh with
        ``nn.logical_to_mesh_sharding``."""
        import flax.linen as nn

        check_shape("FlaxModule.partition_names", "input_shape", input_shape)
        _, variables = jax.eval_shape(lambda: self._init_variables(jax.random.key(0), tuple(input_shape)))
        names = nn.get_partition_spec(dict(variables))
        params = dict(names.pop("params", {}))
        return params, {k: dict(v) for k, v in names.items()}

    def _apply(self, params, state, x, train, key):
        import flax.linen as nn

        module, kwargs = self._bound(train)
        variables = {**state, "params": params} if params else dict(state)
        rngs = self._keys(key)
        if train and state:
            y, updates = self._flax_errors(
                lambda: module.apply(variables, x, rngs=rngs, mutable=list(state), **kwargs)
            )
            updates = nn.unbox(dict(updates))
            return y, {**state, **{k: dict(v) for k, v in updates.items()}}
        return self._flax_errors(lambda: module.apply(variables, x, rngs=rngs, **kwargs)), state


def _axis_bound(name):
    """Whether an enclosing ``shard_map``/``pmap``/``vmap`` binds the axis ``name``."""
    try:
        lax.axis_index(name)
    except NameError:
        return False
    return True


def _size1_vmap(fn, name):
    return lambda: jax.vmap(fn, axis_name=name, axis_size=1)()


def from_flax(module, *, rngs=("dropout",)):
    """Wrap a `flax.linen.Module` as a jaxdl layer (see `FlaxModule`: modes, rng streams,
    metadata boxes, axis names). ``rngs``: the names of the rng streams the module draws from
    in training.

    Args:
      module: a `flax.linen.Module`.
      rngs: the names of its rng streams.

    Returns:
      A `FlaxModule` layer.
    """
    import flax.linen as nn  # flax is needed only here

    if not isinstance(module, nn.Module):
        from flax import nnx  # imported here, not jaxdl.nnx: that module builds on this one

        if isinstance(module, nnx.Module):
            raise TypeError(
                f"from_flax: module must be a flax.linen.Module, got a flax.nnx.Module "
                f"({type(module).__name__}); pass an nnx module to fit, evaluate or "
                f"TrainState.create as it is, or wrap it with jaxdl.from_nnx"
            )
        raise TypeError(
            f"from_flax: module must be a flax.linen.Module, got an object of type {type(module).__name__}"
        )
    if isinstance(rngs, str) or not (
        isinstance(rngs, (tuple, list)) and rngs and all(isinstance(r, str) for r in rngs)
    ):
        raise TypeError(
            f"from_flax: rngs must be a tuple of rng stream names such as ('dropout',), got {rngs!r}"
        )
    return FlaxModule(module, tuple(rngs))


# ----------------------------------------------------------------------------- BN folding


def _fold_branches(model, params, state):
    """`fold_batchnorm` inside each branch of an `Add` (keys keep their names: a folded branch
    keeps its kind)."""
    layers, new_params, new_state = [], {}, {}
    for name, layer in zip(model._names(), model.layers):
        layer, p, s = fold_batchnorm(layer, params.get(name, {}), state.get(name, {}))
        layers.append(layer)
        new_params.update({name: p} if p else {})
        new_state.update({name: s} if s else {})
    return Add(*layers), new_params, new_state


def fold_batchnorm(model, params, state):
    """Fold each BatchNorm that directly follows a Dense or Conv into that layer.

    At test time BN is the linear map y = a*z + c, a = gamma/sqrt(var + eps), c = beta - a*mean.

    The preceding layer's kernel becomes W * a (per output channel) and its bias a*b + c (c
    alone without bias; the folded layer always has a bias). Works through nested Sequentials,
    inside `Residual` and inside each branch of `Add` (a `jaxdl.models.resnet` folds entirely);
    other layers, and BatchNorms not after a Dense/Conv, stay. Returns a new
    ``(model, params, state)`` whose *evaluation* outputs equal the original's (keys of a
    Sequential are renumbered, since the BatchNorms are gone). The folded model is for
    inference: training it no longer normalizes. PyTorch's counterpart is
    ``torch.ao.quantization.fuse_modules``.

    Args:
      model: a jaxdl layer (e.g. a Sequential).
      params, state: its parameters and state.

    Returns:
      ``(model, params, state)`` of the folded model.

    Source: CSE 176 Lecture 11 (BatchNorm at test time).
    """
    if isinstance(model, Residual):
        layer, params, state = fold_batchnorm(model.layer, params, state)
        return Residual(layer), params, state
    if isinstance(model, Add):
        return _fold_branches(model, params, state)
    if not isinstance(model, Sequential):
        return model, params, state
    layers, new_params, new_state = [], [], []
    for name, layer in zip(model._names(), model.layers):
        p, s = params.get(name, {}), state.get(name, {})
        layer, p, s = fold_batchnorm(layer, p, s)
        prev = layers[-1] if layers else None
        if isinstance(layer, BatchNorm) and isinstance(prev, (Dense, Conv)):
            a = p["gamma"] * lax.rsqrt(s["var"] + layer.eps)
            c = p["beta"] - a * s["mean"]
            pp = new_params[-1]
            b = a * pp["b"] + c if prev.use_bias else c
            layers[-1] = dataclasses.replace(prev, use_bias=True)
            new_params[-1] = {"w": pp["w"] * a, "b": b}
            continue
        layers.append(layer)
        new_params.append(p)
        new_state.append(s)
    folded = Sequential(*layers)
    names = folded._names()
    return (
        folded,
        {n: p for n, p in zip(names, new_params) if p},
        {n: s for n, s in zip(names, new_state) if s},
    )
