"""Schedules: closed-form values, optax agreement, jit safety and bad arguments."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from jaxdl import schedules as S

STEPS = np.arange(0, 60)


def _values(schedule):
    return np.array([float(schedule(k)) for k in STEPS])


def _closed(f):
    return np.array([f(k) for k in STEPS], dtype=np.float64)


@pytest.mark.parametrize(
    "schedule, closed_form",
    [
        (S.constant(0.3), lambda k: 0.3),
        (S.linear_decay(1.0, 0.1, tau=20), lambda k: (1 - min(k / 20, 1)) * 1.0 + min(k / 20, 1) * 0.1),
        (S.inverse_time_decay(0.5, decay=0.1), lambda k: 0.5 / (1 + 0.1 * k)),
        (S.inverse_sqrt_decay(0.2), lambda k: 0.2 / math.sqrt(1 + k)),
        (S.step_decay(1.0, 0.5, every=7), lambda k: 0.5 ** (k // 7)),
        (
            S.cosine_decay(1.0, 40, final=0.1),
            lambda k: 0.1 + 0.45 * (1 + math.cos(math.pi * min(k, 40) / 40)),
        ),
        (
            S.warmup(S.inverse_time_decay(0.5, 0.1), 10),
            lambda k: 0.5 * k / 10 if k < 10 else 0.5 / (1 + 0.1 * (k - 10)),
        ),
    ],
    ids=["constant", "linear", "inverse_time", "inverse_sqrt", "step", "cosine", "warmup"],
)
def test_schedule_matches_closed_form(schedule, closed_form):
    np.testing.assert_allclose(_values(schedule), _closed(closed_form), rtol=1e-6, atol=1e-7)


def test_linear_decay_reaches_final_at_tau_and_stays():
    s = S.linear_decay(1.0, 0.01, tau=100)
    assert float(s(100)) == pytest.approx(0.01) and float(s(10_000)) == pytest.approx(0.01)
    assert float(s(50)) == pytest.approx(0.505)


def test_cosine_decay_agrees_with_optax():
    ours = S.cosine_decay(0.8, 50, final=0.08)
    theirs = optax.cosine_decay_schedule(0.8, 50, alpha=0.1)
    np.testing.assert_allclose(_values(ours), [float(theirs(k)) for k in STEPS], rtol=1e-6)


def test_schedules_are_jit_safe_and_compile_once():
    s = S.warmup(S.cosine_decay(1.0, 100), 10)
    traces = []

    @jax.jit
    def f(k):
        traces.append(1)
        return s(k)

    got = [float(f(jnp.int32(k))) for k in range(0, 120, 7)]
    assert len(traces) == 1
    np.testing.assert_allclose(got, [float(s(k)) for k in range(0, 120, 7)], rtol=1e-6)


def test_schedules_vmap_over_steps_and_traced_init():
    ks = jnp.arange(5)
    np.testing.assert_allclose(
        jax.vmap(S.inverse_sqrt_decay(1.0))(ks), 1 / np.sqrt(1 + np.arange(5)), rtol=1e-6
    )
    inits = jnp.array([0.1, 1.0])
    out = jax.vmap(lambda i: S.inverse_time_decay(i, 1.0)(3))(inits)
    np.testing.assert_allclose(out, inits / 4, rtol=1e-6)


@pytest.mark.parametrize(
    "make, arg",
    [
        (lambda: S.linear_decay(1.0, 0.0, tau=0), "tau"),
        (lambda: S.linear_decay(1.0, 0.0, tau=-5), "tau"),
        (lambda: S.cosine_decay(1.0, 0), "steps"),
        (lambda: S.warmup(S.constant(1.0), 0), "steps"),
        (lambda: S.step_decay(1.0, 0.5, every=0), "every"),
        (lambda: S.step_decay(1.0, 1.5, every=3), "factor"),
        (lambda: S.step_decay(1.0, 0.0, every=3), "factor"),
        (lambda: S.inverse_time_decay(1.0, -0.1), "decay"),
        (lambda: S.constant(float("nan")), "value"),
    ],
)
def test_bad_schedule_arguments(make, arg):
    with pytest.raises(ValueError, match=f"{arg}="):
        make()


def test_non_integer_steps_is_a_type_error():
    with pytest.raises(TypeError, match="tau must be an int"):
        S.linear_decay(1.0, 0.0, tau=2.5)
    with pytest.raises(TypeError, match="schedule must be a callable"):
        S.warmup(0.1, 10)


def test_schedules_report_their_end_value():
    assert S.constant(0.3).end == (0, 0.3)
    assert S.linear_decay(1.0, 0.1, tau=20).end == (20, 0.1)
    assert S.cosine_decay(1.0, 50, final=0.2).end == (50, 0.2)
    assert S.inverse_time_decay(1.0, 0.1).end == (None, 0.0)
    assert S.inverse_time_decay(1.0, 0.0).end == (None, 1.0)
    assert S.inverse_sqrt_decay(1.0).end == (None, 0.0)
    assert S.step_decay(1.0, 0.5, every=3).end == (None, 0.0)
    assert S.step_decay(1.0, 1.0, every=3).end == (None, 1.0)
    assert S.warmup(S.linear_decay(1.0, 0.1, tau=20), 5).end == (25, 0.1)
    assert S.warmup(S.inverse_sqrt_decay(1.0), 5).end == (None, 0.0)
