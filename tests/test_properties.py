"""Property tests: every transform and optimizer works under jit and vmap on arbitrary pytrees.

Trees mix nested dicts, lists and tuples, scalars, empty containers, and float32/bfloat16 leaves.
"""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import jaxdl as dl
from jaxdl import schedules
from jaxdl import transforms as T

SHAPES = st.sampled_from([(), (1,), (3,), (2, 3), (4, 1, 2)])
DTYPES = st.sampled_from([jnp.float32, jnp.bfloat16])


@dataclasses.dataclass(frozen=True)
class Leaf:  # a leaf's description; not a pytree container, so it cannot be confused with a tuple
    shape: tuple
    dtype: object


LEAF = st.builds(Leaf, SHAPES, DTYPES)
TREES = st.recursive(
    LEAF,
    lambda children: st.one_of(
        st.dictionaries(st.sampled_from("abcde"), children, max_size=3),
        st.lists(children, max_size=3),
        st.lists(children, max_size=3).map(tuple),
    ),
    max_leaves=6,
)

TRANSFORMS = {
    "identity": T.identity,
    "scale": lambda: T.scale(0.5),
    "scale_by_learning_rate": lambda: T.scale_by_learning_rate(0.1),
    "scheduled_lr": lambda: T.scale_by_learning_rate(schedules.cosine_decay(0.1, 10)),
    "momentum": lambda: T.momentum(0.9),
    "nesterov": lambda: T.nesterov(0.9),
    "scale_by_adagrad": T.scale_by_adagrad,
    "scale_by_rms": T.scale_by_rms,
    "scale_by_rms_centered": lambda: T.scale_by_rms(centered=True),
    "scale_by_adam": T.scale_by_adam,
    "clip": lambda: T.clip(0.5),
    "clip_by_global_norm": lambda: T.clip_by_global_norm(0.5),
    "sign": T.sign,
    "sign_with_error_feedback": T.sign_with_error_feedback,
    "add_noise": lambda: T.add_noise(0.1, 0.55, key=1),
    "add_weight_decay": lambda: T.add_weight_decay(0.1),
    "skip_nonfinite": lambda: T.skip_nonfinite(T.scale_by_adam()),
    "masked": lambda: T.masked(T.momentum(0.9), lambda p: jax.tree.map(lambda x: x.ndim > 0, p)),
    "freeze": lambda: T.freeze(lambda p: jax.tree.map(lambda x: x.ndim == 0, p)),
    "chain": lambda: T.chain(
        T.clip_by_global_norm(1.0), T.add_noise(0.01), T.scale_by_adam(), T.scale_by_learning_rate(0.1)
    ),
    "sgd": lambda: dl.sgd(0.1, momentum=0.9, nesterov=True, weight_decay=1e-4),
    "adagrad": lambda: dl.adagrad(0.1),
    "rmsprop": lambda: dl.rmsprop(0.1, centered=True, momentum=0.5),
    "adam": lambda: dl.adam(0.1),
    "adam_bf16_moments": lambda: dl.adam(0.1, mu_dtype=jnp.bfloat16, nu_dtype=jnp.bfloat16),
    "adamw": lambda: dl.adamw(0.1),
    "signsgd_ef": lambda: dl.signsgd(0.1, error_feedback=True),
}


def _materialize(spec, seed):
    leaves, treedef = jax.tree.flatten(spec)
    keys = jax.random.split(jax.random.key(seed), max(len(leaves), 1))
    return treedef.unflatten([jax.random.normal(k, leaf.shape, leaf.dtype) for k, leaf in zip(keys, leaves)])


def _close(a, b):
    assert jax.tree.structure(a) == jax.tree.structure(b)
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
        assert x.dtype == y.dtype and x.shape == y.shape
        tol = 2e-2 if x.dtype == jnp.bfloat16 else 1e-5
        np.testing.assert_allclose(np.asarray(x, np.float32), np.asarray(y, np.float32), rtol=tol, atol=tol)


@pytest.mark.parametrize("name", sorted(TRANSFORMS))
@settings(max_examples=4, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(spec=TREES, seed=st.integers(0, 2**16))
def test_transform_under_jit_and_vmap_on_arbitrary_pytrees(name, spec, seed):
    tx = TRANSFORMS[name]()
    params = _materialize(spec, seed)
    grads = _materialize(spec, seed + 1)
    state = tx.init(params)

    # Two steps under jit: same tree, dtypes and shapes out; finite; the state keeps its types.
    step = jax.jit(tx.update)
    u1, s1 = step(grads, state, params)
    u2, s2 = step(grads, s1, params)
    for u in (u1, u2):
        assert jax.tree.structure(u) == jax.tree.structure(grads)
        for x, g in zip(jax.tree.leaves(u), jax.tree.leaves(grads)):
            assert x.dtype == g.dtype and x.shape == g.shape
            assert np.all(np.isfinite(np.asarray(x, np.float32)))
    assert jax.tree.structure(s2) == jax.tree.structure(state)
    for a, b in zip(jax.tree.leaves(s2), jax.tree.leaves(state)):
        assert a.dtype == b.dtype and a.shape == b.shape

    # Eager (no jit) gives the same numbers.
    _close(tx.update(grads, state, params)[0], u1)

    # vmap over a batch of two gradient trees equals the two updates done one by one.
    other = _materialize(spec, seed + 2)
    batched = jax.tree.map(lambda a, b: jnp.stack([a, b]), grads, other)
    ub, _ = jax.jit(jax.vmap(tx.update, in_axes=(0, None, None), axis_size=2))(batched, state, params)
    _close(jax.tree.map(lambda x: x[0], ub), u1)
    _close(jax.tree.map(lambda x: x[1], ub), step(other, state, params)[0])


@settings(max_examples=10, deadline=None)
@given(spec=TREES, seed=st.integers(0, 2**16))
def test_jaxdl_adam_equals_optax_adam_on_arbitrary_pytrees(spec, seed):
    params = jax.tree.map(lambda x: x.astype(jnp.float32), _materialize(spec, seed))
    grads = jax.tree.map(lambda x: x.astype(jnp.float32), _materialize(spec, seed + 1))
    ours, theirs = dl.adam(0.01), optax.adam(0.01)
    a, _ = ours.update(grads, ours.init(params), params)
    b, _ = theirs.update(grads, theirs.init(params), params)
    _close(a, b)
