"""Initializers: sample moments against the closed-form variances, bounds, orthogonality.

N = 200k samples: the sample variance has relative std sqrt(2/N) ~ 0.3%, so a 3% tolerance
never fails by chance yet rejects any wrong constant factor (the nearest wrong ones are 2x or
1.5x) and a wrong fan (conv HWIO fans differ by factors of H*W or 2).
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxdl import init

KEY = jax.random.key(0)
DENSE = (400, 500)  # fan_in = 400, fan_out = 500
CONV = (3, 3, 64, 96)  # HWIO: fan_in = 9*64 = 576, fan_out = 9*96 = 864

NORMAL_CASES = [
    # name, shape, closed-form variance
    ("xavier_normal", DENSE, 2.0 / (400 + 500)),
    ("xavier_normal", CONV, 2.0 / (576 + 864)),
    ("he_normal", DENSE, 2.0 / 400),
    ("he_normal", CONV, 2.0 / 576),
    ("lecun_normal", DENSE, 1.0 / 400),
    ("lecun_normal", CONV, 1.0 / 576),
]
UNIFORM_CASES = [
    # name, shape, closed-form bound a of U(-a, a)
    ("xavier_uniform", DENSE, np.sqrt(6.0 / (400 + 500))),
    ("xavier_uniform", CONV, np.sqrt(6.0 / (576 + 864))),
    ("he_uniform", DENSE, np.sqrt(6.0 / 400)),
    ("he_uniform", CONV, np.sqrt(6.0 / 576)),
    ("lecun_uniform", DENSE, np.sqrt(3.0 / 400)),
    ("lecun_uniform", CONV, np.sqrt(3.0 / 576)),
]


def _draw(fn, shape, dtype=jnp.float32):
    w = fn(KEY, shape, dtype)
    assert w.shape == shape and w.dtype == dtype
    return np.asarray(w, np.float64).ravel()


@pytest.mark.parametrize("name,shape,var", NORMAL_CASES)
def test_gaussian_initializers_have_closed_form_variance_and_are_untruncated(name, shape, var):
    w = _draw(getattr(init, name), shape)
    std = np.sqrt(var)
    assert abs(w.mean()) < 0.02 * std
    assert w.var() == pytest.approx(var, rel=0.03)
    # Untruncated Gaussian: P(|w| > 2 std) = 4.55% and P(|w| > 3 std) = 0.27%; a truncated
    # normal (jax.nn.initializers.glorot_normal) has none beyond 2 std.
    assert np.mean(np.abs(w) > 2 * std) == pytest.approx(0.0455, abs=0.004)
    assert np.mean(np.abs(w) > 3 * std) > 0.0015


@pytest.mark.parametrize("name,shape,bound", UNIFORM_CASES)
def test_uniform_initializers_fill_their_bounds(name, shape, bound):
    w = _draw(getattr(init, name), shape)
    assert np.all(np.abs(w) <= bound)
    assert np.max(np.abs(w)) > 0.999 * bound
    assert abs(w.mean()) < 0.02 * bound
    assert w.var() == pytest.approx(bound**2 / 3, rel=0.03)


def test_glorot_names_are_aliases_of_xavier():
    assert init.glorot_normal is init.xavier_normal
    assert init.glorot_uniform is init.xavier_uniform


def test_normal_default_is_seed_003_small_gaussian():
    w = _draw(init.normal(), DENSE)
    assert w.std() == pytest.approx(0.01, rel=0.03)
    w = _draw(init.normal(stddev=0.5), DENSE)
    assert w.std() == pytest.approx(0.5, rel=0.03)


def test_uniform_is_symmetric_in_plus_minus_scale():
    w = _draw(init.uniform(0.2), DENSE)
    assert w.min() < -0.199 and w.max() > 0.199 and np.all(np.abs(w) <= 0.2)
    assert w.var() == pytest.approx(0.04 / 3, rel=0.03)


def test_zeros_ones_constant():
    np.testing.assert_array_equal(init.zeros(KEY, (2, 3)), np.zeros((2, 3)))
    np.testing.assert_array_equal(init.ones(KEY, (4,)), np.ones(4))
    np.testing.assert_array_equal(init.constant(0.25)(KEY, (3,)), np.full(3, 0.25))
    assert init.zeros(KEY, (2,), jnp.float16).dtype == jnp.float16


@pytest.mark.parametrize("shape", [(64, 32), (32, 64), (50, 50)])
@pytest.mark.parametrize("gain", [1.0, 1.7])
def test_orthogonal_columns_or_rows_are_orthonormal_times_gain(shape, gain):
    w = np.asarray(init.orthogonal(gain)(KEY, shape), np.float64)
    gram = w.T @ w if shape[0] >= shape[1] else w @ w.T
    np.testing.assert_allclose(gram, gain**2 * np.eye(min(shape)), atol=1e-5)


def test_orthogonal_conv_kernel_flattens_leading_axes():
    w = np.asarray(init.orthogonal()(KEY, (3, 3, 8, 16)), np.float64).reshape(72, 16)
    np.testing.assert_allclose(w.T @ w, np.eye(16), atol=1e-5)


def test_different_keys_give_different_draws():
    a = init.he_normal(jax.random.key(1), (10, 10))
    b = init.he_normal(jax.random.key(2), (10, 10))
    assert not np.allclose(a, b)


@pytest.mark.parametrize("name", ["xavier_normal", "he_uniform", "lecun_normal"])
def test_fan_initializers_reject_vectors_with_a_clear_error(name):
    with pytest.raises(ValueError, match=rf"{name}.*rank >= 2"):
        getattr(init, name)(KEY, (10,))


def test_orthogonal_rejects_vectors():
    with pytest.raises(ValueError, match="orthogonal.*rank >= 2"):
        init.orthogonal()(KEY, (10,))


@pytest.mark.parametrize("factory,arg", [(init.normal, 0.0), (init.uniform, -1.0), (init.orthogonal, 0.0)])
def test_factories_reject_non_positive_hyperparameters(factory, arg):
    with pytest.raises(ValueError, match=factory.__name__):
        factory(arg)


def test_initializers_work_inside_flax_and_jit():
    import flax.linen as nn

    m = nn.Dense(7, kernel_init=init.he_normal, bias_init=init.zeros)
    v = m.init(KEY, jnp.ones((1, 5)))
    assert v["params"]["kernel"].shape == (5, 7)
    w = jax.jit(init.xavier_uniform, static_argnums=1)(KEY, (5, 7))
    assert w.shape == (5, 7)


@pytest.mark.parametrize(
    "make,error,match",
    [
        (lambda: init.normal("0.01"), TypeError, r"normal: stddev must be a number, got '0.01' of type str"),
        (
            lambda: init.normal(float("nan")),
            ValueError,
            r"normal: stddev=nan is out of range; expected finite stddev with 0 < stddev",
        ),
        (lambda: init.normal(-0.01), ValueError, r"normal: stddev=-0.01 is out of range"),
        (
            lambda: init.uniform(None),
            TypeError,
            r"uniform: scale must be a number, got None of type NoneType",
        ),
        (lambda: init.uniform(float("inf")), ValueError, r"uniform: scale=inf is out of range"),
        (lambda: init.orthogonal("1"), TypeError, r"orthogonal: gain must be a number, got '1' of type str"),
        (lambda: init.constant("a"), TypeError, r"constant: c must be a number, got 'a' of type str"),
        (
            lambda: init.constant(float("nan")),
            ValueError,
            r"constant: c=nan is out of range; expected finite c",
        ),
    ],
)
def test_every_factory_refuses_a_bad_hyperparameter_by_name_when_called(make, error, match):
    with pytest.raises(error, match=match):
        make()
