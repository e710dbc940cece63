"""Gradient transformations: agreement with optax, closed forms, statistics and bad input."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import jaxdl as dl
from jaxdl import transforms as T


def _grads(seed, tree_like):
    leaves, treedef = jax.tree.flatten(tree_like)
    keys = jax.random.split(jax.random.key(seed), len(leaves))
    return treedef.unflatten([3.0 * jax.random.normal(k, x.shape, x.dtype) for k, x in zip(keys, leaves)])


PARAMS = {"w": jnp.ones((4, 3)), "b": jnp.zeros(3), "nested": [jnp.full((2,), 0.5), {"s": jnp.array(2.0)}]}


def _run(tx, steps=5, params=PARAMS):
    state = tx.init(params)
    update = jax.jit(tx.update)
    outs = []
    for i in range(steps):
        u, state = update(_grads(i, params), state, params)
        outs.append(u)
    return outs, state


def _assert_trees_close(a, b, rtol=1e-6, atol=1e-7):
    assert jax.tree.structure(a) == jax.tree.structure(b)
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
        np.testing.assert_allclose(np.asarray(x, np.float64), np.asarray(y, np.float64), rtol=rtol, atol=atol)


@pytest.mark.parametrize(
    "ours, theirs",
    [
        (lambda: T.momentum(0.9), lambda: optax.trace(0.9)),
        (lambda: T.nesterov(0.8), lambda: optax.trace(0.8, nesterov=True)),
        (lambda: T.scale_by_adam(0.8, 0.95, 1e-6), lambda: optax.scale_by_adam(0.8, 0.95, 1e-6)),
        (lambda: T.clip(1.5), lambda: optax.clip(1.5)),
        (lambda: T.clip_by_global_norm(2.0), lambda: optax.clip_by_global_norm(2.0)),
        (lambda: T.clip_by_global_norm(1e3), lambda: optax.clip_by_global_norm(1e3)),
        (lambda: T.sign(), lambda: optax.scale_by_sign()),
        (lambda: T.scale(-0.3), lambda: optax.scale(-0.3)),
        (lambda: T.scale_by_learning_rate(0.1), lambda: optax.scale_by_learning_rate(0.1)),
        (lambda: T.add_noise(0.3, 0.55, key=7), lambda: optax.add_noise(0.3, 0.55, key=7)),
        (lambda: T.add_weight_decay(0.1), lambda: optax.add_decayed_weights(0.1)),
    ],
    ids=[
        "momentum",
        "nesterov",
        "adam",
        "clip",
        "clip_global_active",
        "clip_global_inactive",
        "sign",
        "scale",
        "lr",
        "add_noise",
        "weight_decay",
    ],
)
def test_transform_agrees_with_optax(ours, theirs):
    a, _ = _run(ours())
    b, _ = _run(theirs())
    for x, y in zip(a, b):
        _assert_trees_close(x, y, rtol=2e-6)


def test_scale_by_learning_rate_follows_a_schedule():
    sched = dl.schedules.linear_decay(1.0, 0.1, tau=4)
    outs, state = _run(T.scale_by_learning_rate(sched), steps=6)
    for k, u in enumerate(outs):
        g = _grads(k, PARAMS)
        _assert_trees_close(u, jax.tree.map(lambda x: -float(sched(k)) * x, g))
    assert int(state.count) == 6


# --- add_noise -----------------------------------------------------------------------------


@pytest.mark.parametrize("t", [0, 10, 1000])
def test_add_noise_variance_follows_annealing_schedule(t):
    eta, gamma, n = 0.3, 0.55, 400_000
    tx = T.add_noise(eta, gamma, key=3)
    zeros = {"a": jnp.zeros(n // 2), "b": jnp.zeros((n // 4, 2))}
    state = tx.init(zeros)._replace(count=jnp.int32(t))
    noise, _ = jax.jit(tx.update)(zeros, state)
    sample = np.concatenate([np.ravel(x) for x in jax.tree.leaves(noise)]).astype(np.float64)
    expected = eta / (1 + t) ** gamma
    # The sample variance of n normals has relative std sqrt(2/n) = 0.22%; 1.5% is ~7 sigma, and
    # the neighbouring mistakes (t instead of 1+t: 5.5% off at t=10; std for variance) are far out.
    assert abs(sample.var() / expected - 1) < 0.015
    assert abs(sample.mean()) < 6 * math.sqrt(expected / n)


def test_add_noise_counts_steps_when_stepped():
    tx = T.add_noise(1.0, 0.55, key=0)
    zeros = jnp.zeros(300_000)
    state = tx.init(zeros)
    step = jax.jit(tx.update)
    for _ in range(10):
        _, state = step(zeros, state)
    noise, state = step(zeros, state)
    assert int(state.count) == 11
    assert abs(float(jnp.var(noise)) / (1.0 / 11**0.55) - 1) < 0.02


def test_add_noise_differs_per_leaf_and_per_step_and_repeats_for_a_key():
    tx = T.add_noise(0.5, 0.55, key=jax.random.key(11))
    zeros = {"a": jnp.zeros(64), "b": jnp.zeros(64)}
    state = tx.init(zeros)
    n1, state = tx.update(zeros, state)
    n2, _ = tx.update(zeros, state)
    assert not np.allclose(n1["a"], n1["b"]), "two leaves of the same shape got the same noise"
    assert not np.allclose(n1["a"], n2["a"]), "two steps got the same noise"
    again, _ = T.add_noise(0.5, 0.55, key=jax.random.key(11)).update(zeros, tx.init(zeros))
    np.testing.assert_array_equal(again["a"], n1["a"])
    other, _ = T.add_noise(0.5, 0.55, key=12).update(zeros, T.add_noise(0.5, 0.55, key=12).init(zeros))
    assert not np.allclose(other["a"], n1["a"])


def test_add_noise_accepts_raw_uint32_key():
    zeros = jnp.zeros(8)
    a, _ = T.add_noise(key=jax.random.PRNGKey(5)).update(
        zeros, T.add_noise(key=jax.random.PRNGKey(5)).init(zeros)
    )
    b, _ = T.add_noise(key=5).update(zeros, T.add_noise(key=5).init(zeros))
    np.testing.assert_array_equal(a, b)


# --- one-bit gradients -----------------------------------------------------------------------


def test_sign_with_error_feedback_residual_holds_what_the_update_left_out():
    with jax.enable_x64(True):
        tx = T.sign_with_error_feedback()
        params = {"a": jnp.zeros((5, 3), jnp.float64), "b": jnp.zeros(7, jnp.float64)}
        state = tx.init(params)
        for i in range(20):
            g = _grads(i, params)
            u, new_state = tx.update(g, state)
            lhs = jax.tree.map(jnp.add, g, state.error)
            rhs = jax.tree.map(jnp.add, u, new_state.error)
            _assert_trees_close(lhs, rhs, rtol=0, atol=1e-13)
            for leaf_u, leaf_p in zip(jax.tree.leaves(u), jax.tree.leaves(lhs)):
                np.testing.assert_allclose(jnp.abs(leaf_u), jnp.mean(jnp.abs(leaf_p)), rtol=1e-12)
                np.testing.assert_array_equal(jnp.sign(leaf_u), jnp.sign(leaf_p))
            state = new_state


def _quadratic_losses(tx, steps=400):
    a = jnp.linspace(1.0, 10.0, 10)
    x = jnp.linspace(-3.0, 3.0, 10)
    state = tx.init(x)
    losses = []
    for _ in range(steps):
        u, state = tx.update(a * x, state, x)
        x = x + u
        losses.append(float(0.5 * jnp.sum(a * x * x)))
    return np.array(losses)


def test_error_feedback_converges_on_a_quadratic_where_plain_sign_stalls():
    plain = _quadratic_losses(dl.signsgd(0.05))
    ef = _quadratic_losses(dl.signsgd(0.05, error_feedback=True))
    assert plain[0] > 1.0 and ef[0] > 1.0
    assert plain[-100:].min() > 1e-2, "plain sign with a fixed step should stall at the step size"
    assert ef[-100:].max() < 1e-8, "error feedback should converge"


# --- skip_nonfinite, masked, freeze -----------------------------------------------------------


@pytest.mark.parametrize("bad", [jnp.nan, jnp.inf, -jnp.inf])
def test_skip_nonfinite_zeroes_update_and_keeps_inner_state(bad):
    tx = T.skip_nonfinite(dl.adam(0.1))
    ref = dl.adam(0.1)
    g1, g3 = _grads(1, PARAMS), _grads(3, PARAMS)
    g_bad = jax.tree.map(lambda x: x, _grads(2, PARAMS))
    g_bad["nested"][0] = g_bad["nested"][0].at[1].set(bad)
    state, ref_state = tx.init(PARAMS), ref.init(PARAMS)
    update = jax.jit(tx.update)
    _, state = update(g1, state, PARAMS)
    _, ref_state = ref.update(g1, ref_state, PARAMS)
    before = state.inner_state
    u, state = update(g_bad, state, PARAMS)
    assert all(np.all(np.asarray(x) == 0) for x in jax.tree.leaves(u))
    for x, y in zip(jax.tree.leaves(before), jax.tree.leaves(state.inner_state)):
        np.testing.assert_array_equal(x, y)
    assert int(state.skipped) == 1 and not bool(state.last_finite)
    u3, state = update(g3, state, PARAMS)
    r3, _ = ref.update(g3, ref_state, PARAMS)
    _assert_trees_close(u3, r3)
    assert int(state.skipped) == 1 and bool(state.last_finite)


def test_skip_nonfinite_keeps_noise_key_on_a_skipped_step():
    tx = T.skip_nonfinite(T.add_noise(0.1, 0.55, key=0))
    zeros = jnp.zeros(4)
    state = tx.init(zeros)
    _, skipped = tx.update(jnp.array([0.0, jnp.nan, 0.0, 0.0]), state)
    np.testing.assert_array_equal(
        jax.random.key_data(skipped.inner_state.key), jax.random.key_data(state.inner_state.key)
    )


def _transfer_params():
    return {
        "body": {"w": jnp.ones((3, 3)), "b": jnp.ones(3)},
        "head": {"w": jnp.ones((3, 2)), "b": jnp.ones(2)},
    }


def test_freeze_with_masked_optimizer_never_changes_frozen_leaves_and_keeps_no_state_for_them():
    params = _transfer_params()
    body = {"body": True, "head": False}
    head = {"body": False, "head": True}
    tx = T.chain(T.freeze(body), T.masked(dl.adamw(0.1, weight_decay=0.5), head))
    state = tx.init(params)
    adam_state = state[1].inner_state[0]
    assert isinstance(adam_state.mu["body"], optax.MaskedNode)
    assert {x.shape for x in jax.tree.leaves(state)} == {(), (3, 2), (2,)}
    p = params
    for i in range(5):
        u, state = jax.jit(tx.update)(_grads(i, p), state, p)
        p = dl.apply_updates(p, u)
    for k in ("w", "b"):
        np.testing.assert_array_equal(p["body"][k], params["body"][k])
        assert not np.allclose(p["head"][k], params["head"][k])


def test_masked_passes_unmasked_leaves_through_like_optax():
    params = _transfer_params()

    def mask(p):
        return {
            "body": jax.tree.map(lambda _: False, p["body"]),
            "head": jax.tree.map(lambda _: True, p["head"]),
        }

    a, _ = _run(T.masked(T.scale_by_adam(), mask), params=params)
    b, _ = _run(optax.masked(optax.scale_by_adam(), mask), params=params)
    for x, y in zip(a, b):
        _assert_trees_close(x, y)
    g0 = _grads(0, params)
    _assert_trees_close(a[0]["body"], g0["body"])


def test_add_weight_decay_mask_limits_decay():
    params = _transfer_params()
    tx = T.add_weight_decay(0.5, mask=lambda p: jax.tree.map(lambda x: x.ndim > 1, p))
    g = jax.tree.map(jnp.zeros_like, params)
    u, _ = tx.update(g, tx.init(params), params)
    np.testing.assert_allclose(u["head"]["w"], 0.5 * params["head"]["w"])
    np.testing.assert_array_equal(u["head"]["b"], 0.0)


# --- composition with optax -------------------------------------------------------------------


def test_jaxdl_transforms_inside_optax_chain_and_optax_inside_jaxdl_chain():
    all_optax = optax.chain(
        optax.clip_by_global_norm(2.0), optax.scale_by_adam(), optax.scale_by_learning_rate(0.1)
    )
    all_ours = dl.chain(dl.clip_by_global_norm(2.0), dl.scale_by_adam(), dl.scale_by_learning_rate(0.1))
    ours_in_optax = optax.chain(
        dl.clip_by_global_norm(2.0), optax.scale_by_adam(), dl.scale_by_learning_rate(0.1)
    )
    optax_in_ours = dl.chain(
        optax.clip_by_global_norm(2.0), dl.scale_by_adam(), optax.scale_by_learning_rate(0.1)
    )
    ref, _ = _run(all_optax, steps=8)
    for tx in (all_ours, ours_in_optax, optax_in_ours):
        outs, _ = _run(tx, steps=8)
        for x, y in zip(outs, ref):
            _assert_trees_close(x, y, rtol=2e-6)


def test_readme_chain_runs_and_descends():
    tx = dl.chain(dl.clip(10.0), dl.add_noise(0.01), dl.scale_by_adam(), dl.scale_by_learning_rate(1e-1))
    x = jnp.array([3.0, -2.0])
    state = tx.init(x)
    for _ in range(100):
        u, state = tx.update(2 * x, state, x)
        x = dl.apply_updates(x, u)
    assert float(jnp.sum(x**2)) < 0.1


def test_chain_rejects_uncalled_constructor():
    with pytest.raises(TypeError, match=r"chain: argument 1 .*without calling"):
        dl.chain(dl.clip(1.0), optax.adam)


# --- bad input --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "make, arg, value",
    [
        (lambda: dl.sgd(-0.1), "lr", "-0.1"),
        (lambda: dl.adam(float("nan")), "lr", "nan"),
        (lambda: dl.adam(float("inf")), "lr", "inf"),
        (lambda: T.scale_by_learning_rate(-1.0), "lr", "-1.0"),
        (lambda: dl.sgd(0.1, momentum=1.0), "decay", "1.0"),
        (lambda: T.momentum(-0.1), "decay", "-0.1"),
        (lambda: dl.rmsprop(0.1, decay=1.5), "decay", "1.5"),
        (lambda: dl.rmsprop(0.1, momentum=-0.5), "decay", "-0.5"),
        (lambda: dl.adam(0.1, b1=1.0), "b1", "1.0"),
        (lambda: dl.adam(0.1, b2=-0.1), "b2", "-0.1"),
        (lambda: dl.adam(0.1, eps=0.0), "eps", "0.0"),
        (lambda: dl.adagrad(0.1, eps=-1e-8), "eps", "-1e-08"),
        (lambda: T.scale_by_rms(eps=0), "eps", "0"),
        (lambda: T.clip(0.0), "max_abs", "0.0"),
        (lambda: T.clip_by_global_norm(-1.0), "max_norm", "-1.0"),
        (lambda: T.add_noise(eta=-0.1), "eta", "-0.1"),
        (lambda: T.add_noise(gamma=-1.0), "gamma", "-1.0"),
        (lambda: T.add_weight_decay(-1e-4), "rate", "-0.0001"),
        (lambda: T.sign(0.0), "scale", "0.0"),
        (lambda: dl.sgd(0.1, nesterov=True), "nesterov", "True"),
        (lambda: dl.adam(jnp.array([0.1, -0.2])), "lr", "-0.2"),
    ],
)
def test_bad_hyperparameter_is_a_clear_value_error(make, arg, value):
    with pytest.raises(ValueError) as info:
        make()
    msg = str(info.value)
    assert f"{arg}=" in msg and value in msg, msg
    assert "expected" in msg or "needs" in msg, msg


def test_non_numeric_hyperparameter_is_a_type_error():
    with pytest.raises(TypeError, match="lr"):
        dl.adam("0.1")


@pytest.mark.parametrize(
    "tx",
    [
        dl.adam(0.1),
        dl.sgd(0.1, momentum=0.9),
        dl.adagrad(0.1),
        dl.rmsprop(0.1, centered=True),
        T.sign_with_error_feedback(),
    ],
)
def test_update_with_a_different_tree_names_the_first_differing_path(tx):
    state = tx.init(PARAMS)
    other = {"w": jnp.ones((4, 3)), "b": jnp.zeros(3), "nested": [jnp.full((2,), 0.5), {"t": jnp.array(2.0)}]}
    with pytest.raises(ValueError, match=r"\['nested'\]\[1\]\['s'\]"):
        tx.update(other, state, PARAMS)
    wrong_shape = dict(PARAMS, b=jnp.zeros(4))
    with pytest.raises(ValueError, match=r"\['b'\] has shape \(4,\), but init saw shape \(3,\)"):
        jax.jit(tx.update)(wrong_shape, state, PARAMS)


def test_traced_hyperparameters_are_accepted_under_vmap():
    lrs = jnp.array([0.1, 0.2, 0.4])

    def one(lr):
        tx = dl.sgd(lr, momentum=0.9)
        u, _ = tx.update(jnp.ones(2), tx.init(jnp.zeros(2)))
        return u

    np.testing.assert_allclose(jax.vmap(one)(lrs), -lrs[:, None] * jnp.ones((3, 2)), rtol=1e-6)


# --- learning rates must be scalars (issue 14) -----------------------------------------------


@pytest.mark.parametrize(
    "make",
    [
        dl.sgd,
        dl.adagrad,
        dl.rmsprop,
        dl.adam,
        dl.adamw,
        dl.signsgd,
        T.scale_by_learning_rate,
        lambda lr: dl.sgd(lr, momentum=0.9),
        lambda lr: dl.signsgd(lr, error_feedback=True),
    ],
    ids=[
        "sgd",
        "adagrad",
        "rmsprop",
        "adam",
        "adamw",
        "signsgd",
        "scale_by_learning_rate",
        "sgd_momentum",
        "signsgd_ef",
    ],
)
@pytest.mark.parametrize("lr", [jnp.array([1e-3, 1e-3]), np.full((1,), 0.1), [0.1, 0.2], jnp.ones((2, 2))])
def test_non_scalar_learning_rate_is_refused_at_construction(make, lr):
    # Before issue 14 a (2,) lr broadcast against the last axis: each column got its own rate.
    with pytest.raises(ValueError) as info:
        make(lr)
    msg = str(info.value)
    assert "lr=" in msg and f"shape {np.shape(lr)}" in msg and "expected a scalar" in msg, msg


def test_non_scalar_learning_rate_names_the_optimizer():
    with pytest.raises(ValueError, match=r"^adamw: lr=array\(\[0.001, 0.001\]"):
        dl.adamw(np.array([1e-3, 1e-3]))


def test_schedule_returning_a_vector_is_refused_when_built():
    with pytest.raises(
        ValueError, match=r"adam: lr\(0\)=array\(\[0.001, .*has shape \(3,\); expected a scalar"
    ):
        dl.adam(lambda t: jnp.full((3,), 1e-3))


def test_traced_scalar_learning_rate_works_under_jit_and_a_traced_vector_is_refused():
    def one(lr):
        tx = dl.adam(lr)
        u, _ = tx.update(jnp.ones(3), tx.init(jnp.zeros(3)))
        return u

    np.testing.assert_allclose(jax.jit(one)(jnp.float32(0.01)), -0.01 * np.ones(3), rtol=1e-5)
    with pytest.raises(ValueError, match=r"adam: lr=a traced array has shape \(2,\)"):
        jax.jit(one)(jnp.ones(2))


@pytest.mark.parametrize("make", [dl.adam, dl.sgd, dl.rmsprop, dl.adagrad])
def test_inject_hyperparams_scalar_learning_rate_still_works(make):
    params = {"w": jnp.ones((3, 2)), "b": jnp.zeros(2)}
    grads = _grads(0, params)
    injected = optax.inject_hyperparams(make)(lr=0.05)
    plain = make(0.05)
    a, _ = jax.jit(injected.update)(grads, injected.init(params), params)
    b, _ = jax.jit(plain.update)(grads, plain.init(params), params)
    # inject_hyperparams turns b2 into a float32 array too, so 1 - b2 is rounded in float32
    # rather than in float64: 1e-5 relative in Adam's first step, the same as optax shows.
    _assert_trees_close(a, b, rtol=2e-5)


# --- complex parameters follow optax (issue 14) ----------------------------------------------

CPARAMS = {
    "w": (1.0 + 0.5j) * jnp.ones((4, 3), jnp.complex64),
    "r": jnp.ones(3),
    "s": jnp.array(2.0 - 1.0j, jnp.complex64),
}


def _complex_run(tx, steps=6, params=CPARAMS):
    state = tx.init(params)
    update = jax.jit(tx.update)
    outs = []
    for i in range(steps):
        g = jax.tree.map(
            lambda x, re, im: (re + 1j * im).astype(x.dtype) if jnp.iscomplexobj(x) else re,
            params,
            _grads(2 * i, params),
            _grads(2 * i + 1, params),
        )
        u, state = update(g, state, params)
        outs.append(u)
    return outs, state


def _assert_complex_close(a, b, rtol=2e-5, atol=1e-6):
    assert jax.tree.structure(a) == jax.tree.structure(b)
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
        assert x.dtype == y.dtype, (x.dtype, y.dtype)
        np.testing.assert_allclose(
            np.asarray(x, np.complex128), np.asarray(y, np.complex128), rtol=rtol, atol=atol
        )


@pytest.mark.parametrize(
    "ours, theirs",
    [
        (lambda: T.scale_by_adam(0.8, 0.95, 1e-6), lambda: optax.scale_by_adam(0.8, 0.95, 1e-6)),
        (lambda: dl.adam(0.1), lambda: optax.adam(0.1)),
        (lambda: dl.adamw(0.1, weight_decay=0.05), lambda: optax.adamw(0.1, weight_decay=0.05)),
        (lambda: T.scale_by_rms(0.9, 1e-3), lambda: optax.scale_by_rms(0.9, 1e-3, 0.0, eps_in_sqrt=False)),
        (
            lambda: T.scale_by_rms(0.9, 1e-3, centered=True),
            lambda: optax.scale_by_stddev(0.9, 1e-3, eps_in_sqrt=False),
        ),
        # optax's AdaGrad puts eps inside the root: compare with eps -> 0 (eps itself is checked
        # in closed form below and against torch on real parameters).
        (lambda: T.scale_by_adagrad(1e-30), lambda: optax.scale_by_rss(0.0, 0.0)),
        (lambda: T.momentum(0.9), lambda: optax.trace(0.9)),
        (lambda: T.nesterov(0.9), lambda: optax.trace(0.9, nesterov=True)),
        (lambda: T.clip_by_global_norm(1.0), lambda: optax.clip_by_global_norm(1.0)),
        (lambda: T.sign(), lambda: optax.scale_by_sign()),
        (lambda: T.add_noise(0.3, 0.55, key=7), lambda: optax.add_noise(0.3, 0.55, key=7)),
        (lambda: T.add_weight_decay(0.1), lambda: optax.add_decayed_weights(0.1)),
    ],
    ids=[
        "scale_by_adam",
        "adam",
        "adamw",
        "rms",
        "rms_centered",
        "adagrad",
        "momentum",
        "nesterov",
        "clip_by_global_norm",
        "sign",
        "add_noise",
        "weight_decay",
    ],
)
def test_complex_parameters_follow_optax(ours, theirs):
    a, _ = _complex_run(ours())
    b, _ = _complex_run(theirs())
    for x, y in zip(a, b):
        _assert_complex_close(x, y)


def test_complex_second_moments_are_real_and_first_moments_complex():
    _, s = _complex_run(dl.adam(0.1))
    assert s[0].nu["w"].dtype == jnp.float32 and s[0].mu["w"].dtype == jnp.complex64
    _, s = _complex_run(T.scale_by_rms(centered=True))
    assert s.mean_square["w"].dtype == jnp.float32 and s.mean_grad["w"].dtype == jnp.complex64
    _, s = _complex_run(T.scale_by_adagrad())
    assert s.sum_of_squares["s"].dtype == jnp.float32


def test_complex_adagrad_and_rmsprop_match_closed_form():
    rng = np.random.default_rng(0)
    gs = rng.normal(size=(5, 3)) + 1j * rng.normal(size=(5, 3))
    eps, rho = 0.5, 0.8
    ada, rms = T.scale_by_adagrad(eps), T.scale_by_rms(rho, eps, centered=True)
    sa, sr = ada.init(jnp.zeros(3, jnp.complex64)), rms.init(jnp.zeros(3, jnp.complex64))
    r, s, m = np.zeros(3), np.zeros(3), np.zeros(3, complex)
    for g in gs:
        ua, sa = ada.update(jnp.asarray(g, jnp.complex64), sa)
        ur, sr = rms.update(jnp.asarray(g, jnp.complex64), sr)
        r = r + np.abs(g) ** 2
        s, m = rho * s + (1 - rho) * np.abs(g) ** 2, rho * m + (1 - rho) * g
        np.testing.assert_allclose(ua, g / (eps + np.sqrt(r)), rtol=1e-5)
        np.testing.assert_allclose(ur, g / (np.sqrt(s - np.abs(m) ** 2) + eps), rtol=1e-4)


def test_clip_refuses_complex_updates_naming_the_leaf():
    tx = T.clip(1.0)
    with pytest.raises(ValueError, match=r"clip: leaf \['s'\] is complex \(complex64\).*clip_by_global_norm"):
        jax.jit(tx.update)(CPARAMS, tx.init(CPARAMS))


# ----------------------------------------------------------------------------- bad inputs (issue 22)

# The transforms that keep float state, and the descent itself (its update is cast to the
# parameter's dtype: an int parameter would never move).
FLOAT_STATE = [
    ("momentum", lambda: T.momentum(0.9)),
    ("scale_by_adagrad", lambda: T.scale_by_adagrad()),
    ("scale_by_rms", lambda: T.scale_by_rms(centered=True)),
    ("scale_by_adam", lambda: T.scale_by_adam()),
    ("sign_with_error_feedback", lambda: T.sign_with_error_feedback()),
    ("scale_by_learning_rate", lambda: T.scale_by_learning_rate(0.1)),
    ("scale_by_learning_rate", lambda: T.scale_by_learning_rate(dl.schedules.constant(0.1))),
]


@pytest.mark.parametrize("name,make", FLOAT_STATE, ids=lambda c: c if isinstance(c, str) else "")
@pytest.mark.parametrize("dtype", [jnp.int8, jnp.int32, jnp.bool_])
def test_transforms_with_float_state_refuse_integer_params_naming_the_leaf(name, make, dtype):
    params = {"layer": {"w": jnp.zeros((2, 2)), "count": jnp.zeros((), dtype)}}
    with pytest.raises(
        TypeError,
        match=rf"{name}: params leaf \['layer'\]\['count'\] must be a floating-point .* got dtype "
        rf"{jnp.dtype(dtype).name}",
    ):
        make().init(params)
    make().init({"w": jnp.zeros(2, jnp.bfloat16), "z": jnp.zeros(2, jnp.complex64)})


@pytest.mark.parametrize(
    "key,match",
    [
        ("abc", r"add_noise: key must be an int seed or a jax.random.key, got 'abc' of type str"),
        (1.5, r"add_noise: key must be an int seed or a jax.random.key, got 1.5 of type float"),
        (True, r"add_noise: key must be an int seed or a jax.random.key, got True of type bool"),
        (None, r"add_noise: key must be an int seed or a jax.random.key, got None of type NoneType"),
    ],
)
def test_add_noise_refuses_a_bad_key_when_built(key, match):
    with pytest.raises(TypeError, match=match):
        T.add_noise(key=key)


def test_add_noise_takes_an_int_seed_a_typed_key_a_raw_key_or_a_traced_seed():
    draws = [
        T.add_noise(key=k).update(jnp.zeros(3), T.add_noise(key=k).init(jnp.zeros(3)))[0]
        for k in (3, jax.random.key(3), jax.random.PRNGKey(3))
    ]
    np.testing.assert_array_equal(draws[0], draws[1])
    np.testing.assert_array_equal(draws[0], draws[2])
    traced = jax.jit(lambda s: T.add_noise(key=s).init(jnp.zeros(3)).key)(3)
    assert jax.random.key_data(traced).tolist() == jax.random.key_data(jax.random.key(3)).tolist()


@pytest.mark.parametrize(
    "make,match",
    [
        (
            lambda: T.chain(dl.adam),
            r"chain: argument 0 must be an optax.GradientTransformation, got <function adam",
        ),
        (lambda: T.skip_nonfinite(dl.sgd), r"skip_nonfinite: inner must be .*without calling it"),
        (
            lambda: T.masked(3, {}),
            r"masked: inner must be an optax.GradientTransformation, got 3 of type int$",
        ),
    ],
)
def test_transform_arguments_that_are_not_transforms_are_named(make, match):
    with pytest.raises(TypeError, match=match):
        make()
