"""Losses against optax, PyTorch and closed forms."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from jaxdl import init, losses

try:
    import torch
except ImportError:  # Python 3.12+: no torch; the tests marked `torch` skip (conftest.py)
    torch = None

RNG = np.random.default_rng(0)


# Each reference is a test of its own, so that the optax checks run where torch is not installed.
REFERENCES = ["optax", pytest.param("torch", marks=pytest.mark.torch)]


@pytest.mark.parametrize("reference", REFERENCES)
def test_softmax_cross_entropy_matches_optax_and_torch(reference):
    logits = RNG.normal(size=(32, 10)).astype(np.float32) * 3
    labels = RNG.integers(0, 10, size=32)
    if reference == "optax":
        ref = optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()
    else:
        ref = torch.nn.functional.cross_entropy(torch.tensor(logits), torch.tensor(labels)).item()
    np.testing.assert_allclose(losses.softmax_cross_entropy(logits, labels), ref, rtol=1e-6)


def test_softmax_cross_entropy_closed_form_for_uniform_logits():
    # softmax of equal logits is 1/C for every class: L = ln C exactly.
    np.testing.assert_allclose(
        losses.softmax_cross_entropy(jnp.zeros((4, 7)), jnp.array([0, 3, 6, 2])), np.log(7), rtol=1e-6
    )


def test_softmax_cross_entropy_averages_over_all_leading_axes():
    logits = RNG.normal(size=(3, 5, 4)).astype(np.float32)
    labels = RNG.integers(0, 4, size=(3, 5))
    ref = optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()
    np.testing.assert_allclose(losses.softmax_cross_entropy(logits, labels), ref, rtol=1e-6)


def test_softmax_cross_entropy_is_stable_for_huge_logits():
    logits = jnp.array([[1000.0, -1000.0, 0.0]])
    assert losses.softmax_cross_entropy(logits, jnp.array([0])) == 0.0
    np.testing.assert_allclose(losses.softmax_cross_entropy(logits, jnp.array([1])), 2000.0)


@pytest.mark.parametrize("num_classes", [2, 10, 100])
def test_initial_loss_of_small_weight_classifier_is_log_num_classes(num_classes):
    # The sanity check of Sarkar, CS60010: a softmax classifier with N(0, 0.01) weights starts at ~ ln C.
    kx, kw = jax.random.split(jax.random.key(0))
    x = jax.random.normal(kx, (256, 50))
    w = init.normal(0.01)(kw, (50, num_classes))
    y = jax.random.randint(jax.random.key(1), (256,), 0, num_classes)
    loss = losses.softmax_cross_entropy(x @ w, y)
    assert abs(loss - np.log(num_classes)) < 0.05


@pytest.mark.parametrize("reference", REFERENCES)
def test_binary_cross_entropy_matches_optax_and_torch(reference):
    logits = RNG.normal(size=(64,)).astype(np.float32) * 4
    labels = RNG.integers(0, 2, size=64).astype(np.float32)
    if reference == "optax":
        ref = optax.sigmoid_binary_cross_entropy(logits, labels).mean()
    else:
        ref = torch.nn.functional.binary_cross_entropy_with_logits(
            torch.tensor(logits), torch.tensor(labels)
        ).item()
    np.testing.assert_allclose(losses.binary_cross_entropy(logits, labels), ref, rtol=1e-6)


def test_binary_cross_entropy_is_stable_for_logits_of_plus_minus_1000():
    logits = jnp.array([1000.0, -1000.0, 1000.0, -1000.0])
    labels = jnp.array([1.0, 0.0, 0.0, 1.0])
    # Closed form: the right answers cost 0, the wrong ones cost |z| = 1000 each.
    np.testing.assert_allclose(losses.binary_cross_entropy(logits, labels), 500.0)
    g = jax.grad(losses.binary_cross_entropy)(logits, labels)
    assert np.all(np.isfinite(g))
    np.testing.assert_allclose(g, np.array([0.0, 0.0, 1.0, -1.0]) / 4)


def test_binary_cross_entropy_closed_form_at_zero_logit():
    np.testing.assert_allclose(
        losses.binary_cross_entropy(jnp.zeros(3), jnp.array([0.0, 1.0, 1.0])), np.log(2), rtol=1e-6
    )


def test_mse_closed_form():
    pred = jnp.array([[1.0, 2.0], [3.0, 4.0]])
    target = jnp.array([[1.0, 0.0], [0.0, 4.0]])
    np.testing.assert_allclose(losses.mse(pred, target), (4.0 + 9.0) / 4)


@pytest.mark.torch
def test_mse_matches_torch():
    pred = RNG.normal(size=(5, 3)).astype(np.float32)
    target = RNG.normal(size=(5, 3)).astype(np.float32)
    ref = torch.nn.functional.mse_loss(torch.tensor(pred), torch.tensor(target))
    np.testing.assert_allclose(losses.mse(pred, target), ref.item(), rtol=1e-6)


def test_l2_penalty_is_half_sum_of_squares_over_all_leaves():
    params = {
        "dense_0": {"w": jnp.array([[1.0, 2.0]]), "b": jnp.array([3.0])},
        "prelu_1": {"alpha": jnp.array(4.0)},
    }
    np.testing.assert_allclose(losses.l2_penalty(params), 0.5 * (1 + 4 + 9 + 16))
    # Its gradient is the parameters themselves (the weight-decay term g + rate * w).
    g = jax.grad(losses.l2_penalty)(params)
    jax.tree.map(np.testing.assert_allclose, g, params)
    assert losses.l2_penalty({}) == 0.0


def test_accuracy_closed_form():
    logits = jnp.array([[0.1, 0.9], [0.8, 0.2], [0.3, 0.7], [0.6, 0.4]])
    np.testing.assert_allclose(losses.accuracy(logits, jnp.array([1, 0, 0, 0])), 0.75)


def test_losses_work_under_jit():
    logits = jnp.array(RNG.normal(size=(8, 3)), jnp.float32)
    labels = jnp.array(RNG.integers(0, 3, size=8))
    np.testing.assert_allclose(
        jax.jit(losses.softmax_cross_entropy)(logits, labels),
        losses.softmax_cross_entropy(logits, labels),
        rtol=1e-6,
    )


@pytest.mark.parametrize("fn", [losses.softmax_cross_entropy, losses.accuracy])
def test_class_losses_reject_float_labels_and_wrong_shapes(fn):
    logits = jnp.zeros((4, 3))
    with pytest.raises(TypeError, match=f"{fn.__name__}: labels must be integer"):
        fn(logits, jnp.zeros((4,)))
    with pytest.raises(ValueError, match=rf"{fn.__name__}: labels must have shape .*\(4,\)"):
        fn(logits, jnp.zeros((4, 3), jnp.int32))


def test_elementwise_losses_reject_mismatched_shapes():
    with pytest.raises(ValueError, match="binary_cross_entropy: labels"):
        losses.binary_cross_entropy(jnp.zeros((4,)), jnp.zeros((4, 1)))
    with pytest.raises(ValueError, match="mse: target"):
        losses.mse(jnp.zeros((4,)), jnp.zeros((5,)))


# ----------------------------------------------------------------------------- out-of-range labels


@pytest.mark.parametrize("bad", [-1, -4, 4, 100])
@pytest.mark.parametrize("jit", [False, True])
def test_a_label_outside_the_classes_makes_the_loss_nan_and_the_example_wrong(bad, jit):
    logits = jnp.array([[0.0, 0.0, 0.0, 9.0], [9.0, 0.0, 0.0, 0.0], [0.0, 9.0, 0.0, 0.0]])
    labels = jnp.array([bad, 0, 1])  # -1 would be class 3, the arg-max, under numpy indexing
    ce = jax.jit(losses.softmax_cross_entropy) if jit else losses.softmax_cross_entropy
    acc = jax.jit(losses.accuracy) if jit else losses.accuracy
    assert np.isnan(float(ce(logits, labels)))
    assert float(acc(logits, labels)) == pytest.approx(2 / 3)
    assert np.isfinite(float(ce(logits, jnp.array([3, 0, 1]))))
    assert float(acc(logits, jnp.array([3, 0, 1]))) == 1.0


def test_the_nan_of_a_bad_label_reaches_the_gradient_only_through_the_loss():
    logits = jnp.zeros((2, 3))
    loss, grad = jax.value_and_grad(losses.softmax_cross_entropy)(logits, jnp.array([0, -1]))
    assert np.isnan(float(loss)) and np.all(np.isfinite(grad))  # the step skips on the loss
