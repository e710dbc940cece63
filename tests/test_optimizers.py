"""Adam's moment dtypes (issue 12): storage in mu_dtype / nu_dtype, arithmetic in float32."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import jaxdl as dl
from jaxdl import transforms as T

PARAMS = {"w": jnp.linspace(-1.0, 1.0, 12).reshape(4, 3), "b": jnp.zeros(3), "s": jnp.array(0.5)}


def _grads(seed, like=PARAMS):
    leaves, treedef = jax.tree.flatten(like)
    keys = jax.random.split(jax.random.key(seed), len(leaves))
    return treedef.unflatten([jax.random.normal(k, x.shape, jnp.float32) for k, x in zip(keys, leaves)])


def _trajectory(tx, steps, params=PARAMS):
    state, update, us = tx.init(params), jax.jit(tx.update), []
    for i in range(steps):
        u, state = update(_grads(i, params), state, params)
        us.append(u)
    return us, state


def _adam_state(state):
    return state[0]  # chain(scale_by_adam, ...)


@pytest.mark.parametrize("make", [dl.adam, dl.adamw])
@pytest.mark.parametrize(
    "mu_dtype, nu_dtype",
    [(jnp.bfloat16, None), (None, jnp.bfloat16), (jnp.bfloat16, jnp.bfloat16), (jnp.float16, jnp.float32)],
)
def test_moments_are_stored_in_the_requested_dtypes(make, mu_dtype, nu_dtype):
    tx = make(1e-3, mu_dtype=mu_dtype, nu_dtype=nu_dtype)
    for state in (tx.init(PARAMS), _trajectory(tx, 2)[1]):
        s = _adam_state(state)
        for m, v, p in zip(jax.tree.leaves(s.mu), jax.tree.leaves(s.nu), jax.tree.leaves(PARAMS)):
            assert m.dtype == (mu_dtype or p.dtype) and v.dtype == (nu_dtype or p.dtype)
            assert m.shape == v.shape == p.shape


def test_one_step_computes_in_float32_and_rounds_only_the_stored_moments():
    # From the same (bfloat16-representable) state, the update equals the float32 run's exactly
    # and the stored moments are the float32 moments rounded to bfloat16. Arithmetic done in
    # bfloat16 fails this: b2 = 0.999 rounds to 1.0 in bfloat16.
    f32, bf = T.scale_by_adam(), T.scale_by_adam(mu_dtype=jnp.bfloat16, nu_dtype=jnp.bfloat16)
    _, s = _trajectory(f32, 3)
    s = s._replace(
        mu=jax.tree.map(lambda x: x.astype(jnp.bfloat16).astype(jnp.float32), s.mu),
        nu=jax.tree.map(lambda x: x.astype(jnp.bfloat16).astype(jnp.float32), s.nu),
    )
    s_bf = s._replace(
        mu=jax.tree.map(lambda x: x.astype(jnp.bfloat16), s.mu),
        nu=jax.tree.map(lambda x: x.astype(jnp.bfloat16), s.nu),
    )
    g = _grads(10)
    u32, n32 = jax.jit(f32.update)(g, s)
    ubf, nbf = jax.jit(bf.update)(g, s_bf)
    for a, b in zip(jax.tree.leaves(ubf), jax.tree.leaves(u32)):
        np.testing.assert_allclose(a, b, rtol=1e-6)
    for a, b in zip(jax.tree.leaves((nbf.mu, nbf.nu)), jax.tree.leaves((n32.mu, n32.nu))):
        assert a.dtype == jnp.bfloat16
        np.testing.assert_array_equal(
            np.asarray(a, np.float32), np.asarray(b.astype(jnp.bfloat16), np.float32)
        )


def test_bfloat16_moments_stay_within_bfloat16_rounding_of_the_float32_run():
    steps = 20
    ref, _ = _trajectory(dl.adam(1e-2), steps)
    low, _ = _trajectory(dl.adam(1e-2, mu_dtype=jnp.bfloat16, nu_dtype=jnp.bfloat16), steps)
    worst = 0.0
    for a, b in zip(low, ref):
        for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
            worst = max(worst, float(jnp.max(jnp.abs(x - y)) / 1e-2))
    # Each step's update is lr * (m_hat / sqrt(v_hat)), and the carried moments lose 2^-9
    # relative per write; after 20 steps the update is off by a few bfloat16 ulps of lr.
    assert 0 < worst < 4 * 2.0**-8, worst


def test_mu_dtype_agrees_with_optax_and_is_closer_to_float32():
    # optax.adam(mu_dtype=bf16) multiplies b1 * m in bfloat16 before promoting; we cast m up
    # first. Same state layout and dtypes, updates within bfloat16 rounding of each other, and
    # ours nearer the float32 run.
    lr, steps = 1e-2, 10
    ours, s_ours = _trajectory(dl.adam(lr, mu_dtype=jnp.bfloat16), steps)
    theirs, s_theirs = _trajectory(optax.adam(lr, mu_dtype=jnp.bfloat16), steps)
    ref, _ = _trajectory(dl.adam(lr), steps)
    assert jax.tree.map(lambda x: x.dtype, _adam_state(s_ours).mu) == jax.tree.map(
        lambda x: x.dtype, s_theirs[0].mu
    )
    flat = lambda us: np.concatenate([np.ravel(x) for u in us for x in jax.tree.leaves(u)])  # noqa: E731
    a, b, r = flat(ours), flat(theirs), flat(ref)
    assert np.max(np.abs(a - b)) < 4 * 2.0**-8 * lr  # a few bfloat16 ulps of the step size
    assert np.mean(np.abs(a - r)) < np.mean(np.abs(b - r))


def test_moment_dtypes_work_under_vmap_and_jit():
    tx = dl.adam(1e-2, mu_dtype=jnp.bfloat16, nu_dtype=jnp.bfloat16)
    state = tx.init(PARAMS)
    g1, g2 = _grads(1), _grads(2)
    batched = jax.tree.map(lambda a, b: jnp.stack([a, b]), g1, g2)
    ub, sb = jax.jit(jax.vmap(tx.update, in_axes=(0, None, None)))(batched, state, PARAMS)
    for i, g in enumerate((g1, g2)):
        u, s = tx.update(g, state, PARAMS)  # eager
        for x, y in zip(jax.tree.leaves(ub), jax.tree.leaves(u)):
            np.testing.assert_allclose(x[i], y, rtol=1e-6)
        for x, y in zip(jax.tree.leaves(_adam_state(sb).mu), jax.tree.leaves(_adam_state(s).mu)):
            assert x.dtype == jnp.bfloat16
            np.testing.assert_array_equal(np.asarray(x[i], np.float32), np.asarray(y, np.float32))


@pytest.mark.parametrize("arg", ["mu_dtype", "nu_dtype"])
@pytest.mark.parametrize(
    "value, shown", [(jnp.int32, "int32"), ("foo", "'foo'"), (jnp.complex64, "complex64"), (bool, "bool")]
)
def test_bad_moment_dtype_is_refused_at_construction(arg, value, shown):
    for make in (dl.adam, dl.adamw, lambda lr, **kw: T.scale_by_adam(**kw)):
        with pytest.raises(ValueError) as info:
            make(1e-3, **{arg: value})
        msg = str(info.value)
        assert f"{arg}={shown}" in msg and "expected None or a real floating dtype" in msg, msg


def test_mu_dtype_with_complex_params_is_refused_at_init():
    tx = dl.adam(1e-3, mu_dtype=jnp.bfloat16)
    with pytest.raises(ValueError, match=r"scale_by_adam: leaf \['z'\] is complex .*mu_dtype=bfloat16"):
        tx.init({"z": jnp.ones(2, jnp.complex64)})


# ----------------------------------------------------------------------------- bad inputs

from jaxdl import schedules as S  # noqa: E402

# Every optimizer alias, in each of its shapes (the chains differ).
ALIASES = [
    ("sgd", lambda lr: dl.sgd(lr)),
    ("sgd", lambda lr: dl.sgd(lr, momentum=0.9, nesterov=True, weight_decay=1e-4)),
    ("adagrad", lambda lr: dl.adagrad(lr)),
    ("rmsprop", lambda lr: dl.rmsprop(lr, centered=True, momentum=0.9)),
    ("adam", lambda lr: dl.adam(lr)),
    ("adamw", lambda lr: dl.adamw(lr)),
    ("signsgd", lambda lr: dl.signsgd(lr)),
    ("signsgd", lambda lr: dl.signsgd(lr, error_feedback=True)),
    ("muon", lambda lr: dl.muon(lr)),
    ("schedule_free_adamw", lambda lr: dl.schedule_free_adamw(lr, weight_decay=1e-4)),
    ("schedule_free_sgd", lambda lr: dl.schedule_free_sgd(lr)),
]
ALIAS_IDS = [f"{name}{i}" for i, (name, _) in enumerate(ALIASES)]


def test_aliases_cover_every_optimizer():
    assert {name for name, _ in ALIASES} == set(dl.optimizers.__all__) - {"apply_updates"}


@pytest.mark.parametrize("name,make", ALIASES, ids=ALIAS_IDS)
@pytest.mark.parametrize("dtype", [jnp.int32, jnp.uint8, jnp.bool_])
@pytest.mark.parametrize("lr", [0.1, S.constant(0.1)], ids=["number", "schedule"])
def test_every_optimizer_refuses_integer_or_boolean_params_at_init(name, make, dtype, lr):
    params = {"b": jnp.zeros(3), "n": jnp.zeros(2, dtype)}
    with pytest.raises(
        TypeError,
        match=rf"{name}: params leaf \['n'\] must be a floating-point \(or complex\) array, "
        rf"got dtype {jnp.dtype(dtype).name}",
    ):
        make(lr).init(params)


@pytest.mark.parametrize("name,make", ALIASES, ids=ALIAS_IDS)
def test_every_optimizer_refuses_python_int_params_and_accepts_every_float_dtype(name, make):
    with pytest.raises(TypeError, match=rf"{name}: params leaf \['n'\] .* got dtype int32"):
        make(0.1).init({"n": 3})
    make(0.1).init({"h": jnp.zeros(2, jnp.bfloat16), "s": jnp.zeros(2, jnp.float16), "f": jnp.zeros(2)})


# A schedule of each kind whose value at step 0 or at its end is negative or not finite.
BAD_SCHEDULES = [
    (S.constant(-0.1), "0", "-0.1"),
    (S.linear_decay(-0.1, 0.0, tau=10), "0", "-0.1"),
    (S.linear_decay(0.1, -0.1, tau=10), "10", "-0.1"),
    (S.inverse_time_decay(-0.1, 0.5), "0", "-0.1"),
    (S.inverse_sqrt_decay(-0.1), "0", "-0.1"),
    (S.step_decay(-0.1, 0.5, every=10), "0", "-0.1"),
    (S.cosine_decay(-0.1, 100), "0", "-0.1"),
    (S.cosine_decay(0.1, 100, final=-0.01), "100", "-0.01"),
    (S.warmup(S.constant(-0.1), 5), "5", "-0.1"),
    (S.warmup(S.cosine_decay(0.1, 100, final=-0.01), 5), "105", "-0.01"),
    (S.warmup(lambda k: -0.1 + 0.0 * k, 5), "5", "-0.1"),
    (lambda k: -0.1 * jnp.ones(()), "0", "-0.1"),
    (lambda k: jnp.nan * jnp.ones(()), "0", "nan"),
    (lambda k: jnp.inf + 0.0 * k, "0", "inf"),
]


def test_bad_schedules_cover_every_built_in_schedule():
    names = {schedule.__name__ for schedule, _, _ in BAD_SCHEDULES}
    assert set(S.__all__) - {"Schedule"} <= names


@pytest.mark.parametrize("schedule,where,value", BAD_SCHEDULES)
def test_a_negative_or_non_finite_schedule_is_refused_like_a_negative_lr(schedule, where, value):
    pattern = rf"lr\({where}\)={value} is out of range; expected finite lr\({where}\) with 0 <= lr\({where}\)"
    with pytest.raises(ValueError, match=rf"sgd: {pattern}"):
        dl.sgd(schedule)
    with pytest.raises(ValueError, match=rf"scale_by_learning_rate: {pattern}"):
        T.scale_by_learning_rate(schedule)


@pytest.mark.parametrize("name,make", ALIASES, ids=ALIAS_IDS)
def test_every_optimizer_refuses_a_negative_schedule(name, make):
    with pytest.raises(ValueError, match=rf"{name}: lr\(0\)=-0.1 is out of range"):
        make(S.constant(-0.1))
    with pytest.raises(ValueError, match=rf"{name}: lr=-0.1 is out of range"):
        make(-0.1)


def test_schedules_of_traced_values_are_accepted_inside_a_vmapped_sweep():
    def run(init_lr, final_lr):
        tx = dl.sgd(S.cosine_decay(init_lr, 10, final=final_lr))
        u, _ = tx.update(jnp.ones(2), tx.init(jnp.zeros(2)))
        return u

    u = jax.vmap(run)(jnp.array([0.1, 0.2]), jnp.array([-0.5, 0.0]))  # traced: not checked
    np.testing.assert_allclose(u, [[-0.1, -0.1], [-0.2, -0.2]], rtol=1e-6)
