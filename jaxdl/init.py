"""Initializers with the signature of `jax.nn.initializers`: ``init(key, shape, dtype=jnp.float32)``.

Convention (one rule, used everywhere in jaxdl):

* An initializer **without hyperparameters is itself the initializer**: ``zeros``, ``ones``,
  ``xavier_normal``, ``xavier_uniform``, ``he_normal``, ``he_uniform``, ``lecun_normal``,
  ``lecun_uniform`` (and the ``glorot_*`` aliases). Pass them uncalled: ``Dense(10,
  w_init=xavier_normal)``.
* An initializer **with hyperparameters is a factory** that returns one: ``constant(c)``,
  ``normal(stddev=0.01)``, ``uniform(scale)``, ``orthogonal(gain=1.0)``. A factory checks its
  hyperparameter when called (a finite number, > 0 for a scale): ``normal("0.01")`` is a
  TypeError and ``normal(-1)`` a ValueError naming the argument and the value.

This differs from `jax.nn.initializers` and flax, where ``glorot_normal()`` is a factory (because
it also takes ``in_axis``/``out_axis``); jaxdl fixes the axes (below), so there is nothing to pass.
Every initializer here is also a valid `jax.nn.initializers` initializer and works in flax.

Fans: a dense kernel has shape ``(fan_in, fan_out)``; a conv kernel is HWIO, so for shape
``(H, W, I, O)`` fan_in = H*W*I and fan_out = H*W*O (every leading axis is receptive field).
Fan-based initializers need a shape of rank >= 2.

Sources: Tips and Tricks notes (Xavier, Gaussian with variance 2/(n_in+n_out)); Kira, CS 7643
(N(0, 0.01) small random init, Xavier uniform, He N(0,1)*sqrt(2/n)); Glorot & Bengio 2010; He et al. 2015;
LeCun et al. 1998 (efficient backprop); Saxe et al. 2014 (orthogonal).
"""

import jax
import jax.numpy as jnp

from jaxdl._checks import check_number

__all__ = [
    "zeros",
    "ones",
    "constant",
    "normal",
    "uniform",
    "xavier_normal",
    "xavier_uniform",
    "glorot_normal",
    "glorot_uniform",
    "he_normal",
    "he_uniform",
    "lecun_normal",
    "lecun_uniform",
    "orthogonal",
]

_vs = jax.nn.initializers.variance_scaling


def zeros(key, shape, dtype=jnp.float32):
    """All zeros (biases, BatchNorm offset). The key is unused.

    Args:
      key: unused.
      shape: the array's shape.
      dtype: its dtype (default float32).

    Returns:
      An array of zeros.
    """
    del key
    return jnp.zeros(shape, dtype)


def ones(key, shape, dtype=jnp.float32):
    """All ones (BatchNorm scale). The key is unused.

    Args:
      key: unused.
      shape: the array's shape.
      dtype: its dtype (default float32).

    Returns:
      An array of ones.
    """
    del key
    return jnp.ones(shape, dtype)


def constant(c):
    """Factory: every entry equals ``c``.

    The lecture warns that constant *weights* are degenerate (all units get the same gradient and
    stay equal); use it for biases or scales.

    Args:
      c: the value.

    Returns:
      An initializer ``(key, shape, dtype=float32) -> array``.

    Source: Kira, CS 7643 (constant initialization).
    """
    check_number("constant", "c", c)

    def init(key, shape, dtype=jnp.float32):
        del key
        return jnp.full(shape, c, dtype)

    return init


def normal(stddev=0.01):
    """Factory: w ~ N(0, stddev^2), untruncated; e.g. the "small random numbers" N(0, 0.01).

    Args:
      stddev: the standard deviation.

    Returns:
      An initializer ``(key, shape, dtype=float32) -> array``.

    Source: Kira, CS 7643 (small random numbers).

    >>> import jax
    >>> w = normal(0.01)(jax.random.key(0), (256, 256))
    >>> w.shape, round(float(w.std()), 3)
    ((256, 256), 0.01)
    """
    check_number("normal", "stddev", stddev, low=0.0, low_open=True)
    return jax.nn.initializers.normal(stddev)


def uniform(scale):
    """Factory: w ~ U(-scale, +scale).

    Differs from `jax.nn.initializers.uniform(scale)`, which samples U[0, scale).

    Args:
      scale: the half-width of the interval.

    Returns:
      An initializer ``(key, shape, dtype=float32) -> array``.
    """
    check_number("uniform", "scale", scale, low=0.0, low_open=True)

    def init(key, shape, dtype=jnp.float32):
        return jax.random.uniform(key, shape, dtype, -scale, scale)

    return init


def _fan_init(name, scale, mode, distribution, doc):
    inner = _vs(scale, mode, distribution)

    def init(key, shape, dtype=jnp.float32):
        if len(shape) < 2:
            raise ValueError(
                f"{name}: needs a kernel shape of rank >= 2 ((fan_in, fan_out) or HWIO), "
                f"got shape {tuple(shape)}; use zeros/constant/normal for vectors"
            )
        return inner(key, shape, dtype)

    init.__name__ = init.__qualname__ = name
    init.__doc__ = doc
    return init


# variance_scaling(scale, mode, "normal") draws sqrt(scale/denominator) * N(0, 1), untruncated;
# "uniform" draws U(-1, 1) * sqrt(3 * scale/denominator). With mode="fan_avg" the denominator is
# (fan_in + fan_out)/2, so scale=1 gives variance 2/(fan_in + fan_out).
xavier_normal = _fan_init(
    "xavier_normal",
    1.0,
    "fan_avg",
    "normal",
    """\
Xavier/Glorot normal: w ~ N(0, 2 / (fan_in + fan_out)), a plain (untruncated) Gaussian.

Tips and Tricks notes; Glorot & Bengio 2010. Differs from flax's default kernel init (lecun_normal, truncated)
and from `jax.nn.initializers.glorot_normal()`, which is *truncated* at 2 std and rescaled.""",
)

xavier_uniform = _fan_init(
    "xavier_uniform",
    1.0,
    "fan_avg",
    "uniform",
    """\
Xavier/Glorot uniform: w ~ U(-a, a), a = sqrt(6 / (fan_in + fan_out)); variance 2/(fan_in+fan_out).

Kira, CS 7643 (which prints the bound as sqrt(6)/(n_j+n_{j+1}); the paper's bound, used here and by
PyTorch's `xavier_uniform_`, has the root over the whole fraction); Glorot & Bengio 2010.""",
)

he_normal = _fan_init(
    "he_normal",
    2.0,
    "fan_in",
    "normal",
    """\
He/Kaiming normal: w ~ N(0, 2 / fan_in), untruncated; Kira, CS 7643's N(0,1)*sqrt(2/n) for ReLU.

He et al. 2015. Equals PyTorch's `kaiming_normal_(mode='fan_in', nonlinearity='relu')`; differs
from `jax.nn.initializers.he_normal()`, which is truncated.""",
)

he_uniform = _fan_init(
    "he_uniform",
    2.0,
    "fan_in",
    "uniform",
    """\
He/Kaiming uniform: w ~ U(-a, a), a = sqrt(6 / fan_in); variance 2/fan_in. He et al. 2015.""",
)

lecun_normal = _fan_init(
    "lecun_normal",
    1.0,
    "fan_in",
    "normal",
    """\
LeCun normal: w ~ N(0, 1 / fan_in), untruncated; Kira, CS 7643's N(0,1)*sqrt(1/n) for tanh.

LeCun et al. 1998. Differs from `jax.nn.initializers.lecun_normal()` (flax's default kernel
init), which is truncated.""",
)

lecun_uniform = _fan_init(
    "lecun_uniform",
    1.0,
    "fan_in",
    "uniform",
    """\
LeCun uniform: w ~ U(-a, a), a = sqrt(3 / fan_in); variance 1/fan_in. LeCun et al. 1998.""",
)

glorot_normal = xavier_normal
glorot_uniform = xavier_uniform


def orthogonal(gain=1.0):
    """Factory: a (semi-)orthogonal matrix times ``gain``.

    The kernel is viewed as a matrix of shape (prod(shape[:-1]), shape[-1]) (all leading axes
    are rows, so HWIO conv kernels work); its columns are orthonormal when there are at least
    as many rows as columns, else its rows are: W^T W = gain^2 I or W W^T = gain^2 I. Uses
    `jax.nn.initializers.orthogonal` (a Haar-random Q from a QR decomposition).

    Args:
      gain: the scale of the (semi-)orthogonal matrix.

    Returns:
      An initializer ``(key, shape, dtype=float32) -> array`` for shapes of rank >= 2.

    Source: Saxe et al. 2014.
    """
    check_number("orthogonal", "gain", gain, low=0.0, low_open=True)
    inner = jax.nn.initializers.orthogonal(gain)

    def init(key, shape, dtype=jnp.float32):
        if len(shape) < 2:
            raise ValueError(f"orthogonal: needs a shape of rank >= 2, got {tuple(shape)}")
        return inner(key, shape, dtype)

    return init
