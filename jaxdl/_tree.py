"""Small pytree helpers shared by transforms and the train step."""

import jax
import jax.numpy as jnp


def is_key(x) -> bool:
    """Whether ``x`` is an array of typed PRNG keys (``jax.random.key``)."""
    dtype = getattr(x, "dtype", None)
    return dtype is not None and jax.dtypes.issubdtype(dtype, jax.dtypes.prng_key)


def select(pred: jax.Array, new, old):
    """``new`` where the scalar ``pred`` is true, else ``old``, leaf by leaf (PRNG keys included)."""

    def pick(n, o):
        if is_key(n):
            data = jnp.where(pred, jax.random.key_data(n), jax.random.key_data(o))
            return jax.random.wrap_key_data(data, impl=jax.random.key_impl(n))
        return jnp.where(pred, n, o)

    return jax.tree.map(pick, new, old)
