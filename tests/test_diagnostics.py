"""Diagnostics: per-layer norms and ratios, activation statistics, and the checks of Sarkar, CS60010."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxdl as dl
from jaxdl import diagnostics as D
from jaxdl import layers as L
from jaxdl import train_step as ts


def _data(n=64, d=6, classes=3, seed=0):
    kx, kw = jax.random.split(jax.random.key(seed))
    x = jax.random.normal(kx, (n, d))
    return x, jnp.argmax(x @ jax.random.normal(kw, (d, classes)), -1).astype(jnp.int32)


def test_leaf_norms_and_update_ratios_are_keyed_like_params():
    params = {"dense_0": {"w": jnp.full((2, 2), 3.0), "b": jnp.array([0.0, 4.0])}}
    updates = {"dense_0": {"w": jnp.full((2, 2), 0.003), "b": jnp.array([0.0, 0.04])}}
    norms = D.leaf_norms(params)
    np.testing.assert_allclose(norms["dense_0"]["w"], 6.0)
    np.testing.assert_allclose(norms["dense_0"]["b"], 4.0)
    ratios = D.update_ratios(params, updates)
    np.testing.assert_allclose(ratios["dense_0"]["w"], 1e-3, rtol=1e-5)
    np.testing.assert_allclose(ratios["dense_0"]["b"], 1e-2, rtol=1e-5)


def test_activation_stats_match_a_manual_forward_pass():
    model = L.Sequential(
        L.Dense(16, w_init=dl.init.normal(1.0)), L.Relu(), L.Dense(8), L.Tanh(), L.Dense(3), L.Sigmoid()
    )
    _, params, state = model.init(jax.random.key(0), (6,))
    x, _ = _data()
    stats = jax.jit(lambda p, s, x: D.activation_stats(model, p, s, x, bins=10))(params, state, x)
    assert set(stats) == {"dense_0", "relu_1", "dense_2", "tanh_3", "dense_4", "sigmoid_5"}
    h0 = np.asarray(x @ params["dense_0"]["w"] + params["dense_0"]["b"])
    h1 = np.maximum(h0, 0)
    np.testing.assert_allclose(stats["dense_0"]["mean"], h0.mean(), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(stats["dense_0"]["std"], h0.std(), rtol=1e-5)
    np.testing.assert_allclose(stats["relu_1"]["frac_zero"], (h1 == 0).mean())
    assert 0.2 < float(stats["relu_1"]["frac_zero"]) < 0.8
    h3 = np.tanh(h1 @ params["dense_2"]["w"] + params["dense_2"]["b"])
    np.testing.assert_allclose(stats["tanh_3"]["frac_saturated"], (np.abs(h3) > 0.99).mean(), atol=1e-6)
    assert np.isnan(stats["dense_0"]["frac_saturated"])
    sizes = {"dense_0": 16, "relu_1": 16, "dense_2": 8, "tanh_3": 8, "dense_4": 3, "sigmoid_5": 3}
    for name, width in sizes.items():
        assert int(stats[name]["hist_counts"].sum()) == x.shape[0] * width
    counts, _ = np.histogram(h0, bins=10)
    np.testing.assert_array_equal(stats["dense_0"]["hist_counts"], counts)


def test_saturation_shows_for_large_tanh_weights():
    """Kira, CS 7643 / Glorot & Bengio: N(0, 1) weights saturate tanh units, Xavier weights do not."""
    x = jax.random.normal(jax.random.key(1), (256, 100))
    sat = {}
    for name, w_init in [("big", dl.init.normal(1.0)), ("xavier", dl.init.xavier_normal)]:
        model = L.Sequential(*[m for _ in range(4) for m in (L.Dense(100, w_init=w_init), L.Tanh())])
        _, params, state = model.init(jax.random.key(2), (100,))
        stats = D.activation_stats(model, params, state, x)
        sat[name] = float(stats["tanh_7"]["frac_saturated"])
    assert sat["big"] > 0.5 and sat["xavier"] < 0.05


def test_layer_report_does_not_change_the_step_and_matches_it():
    model = L.Sequential(L.Dense(16), L.BatchNorm(), L.Relu(), L.Dropout(0.3), L.Dense(3))
    tx = dl.sgd(0.1)
    state = ts.TrainState.create(model, tx, jax.random.key(3), (6,))
    loss_fn = ts.supervised_loss(model)
    batch = _data()
    report = jax.jit(lambda s, b: D.layer_report(loss_fn, tx, s, b))(state, batch)
    new, metrics = ts.make_train_step(loss_fn, tx)(state, batch)
    # The report used the same key as the step: its per-leaf gradient norms combine to the
    # step's global gradient norm, and its ratios to the actual parameter change.
    total = math.sqrt(sum(float(v) ** 2 for v in jax.tree.leaves(report["grad_norms"])))
    np.testing.assert_allclose(total, metrics["grad_norm"], rtol=1e-5)
    w_old, w_new = state.params["dense_4"]["w"], new.params["dense_4"]["w"]
    np.testing.assert_allclose(
        report["update_ratios"]["dense_4"]["w"],
        np.linalg.norm(w_new - w_old) / np.linalg.norm(w_old),
        rtol=1e-4,
    )
    assert set(report["activations"]) == {"dense_0", "batchnorm_1", "relu_2", "dropout_3", "dense_4"}
    assert 0.2 < float(report["activations"]["dropout_3"]["frac_zero"]) < 0.9


def test_initial_loss_check_passes_small_init_and_flags_large_init():
    x, y = _data(n=512, classes=10)
    reports = {}
    for name, scale in [("small", 0.01), ("large", 10.0)]:
        model = L.Sequential(
            L.Dense(32, w_init=dl.init.normal(scale)), L.Relu(), L.Dense(10, w_init=dl.init.normal(scale))
        )
        _, params, state = model.init(jax.random.key(4), (6,))
        logits, _ = model.apply(params, state, x)
        reports[name] = D.initial_loss_check(dl.losses.softmax_cross_entropy(logits, y), 10)
    assert reports["small"].ok and abs(reports["small"].loss - math.log(10)) < 0.01
    assert not reports["large"].ok and "too high" in reports["large"].message
    assert not D.initial_loss_check(0.5, 10).ok
    with pytest.raises(ValueError, match="num_classes"):
        D.initial_loss_check(1.0, 1)


def test_overfit_check_passes_for_a_working_model_and_fails_when_nothing_learns():
    x, y = _data(n=16)
    model = L.Sequential(L.Dense(64), L.Relu(), L.Dense(3))
    loss_fn = ts.supervised_loss(model)
    good = D.overfit_check(
        loss_fn,
        dl.adam(1e-2),
        ts.TrainState.create(model, dl.adam(1e-2), jax.random.key(5), (6,)),
        (x, y),
        steps=150,
    )
    assert good.passed and good.final_loss < 0.05 and good.losses.shape == (150,)
    frozen = dl.sgd(0.0)
    bad = D.overfit_check(
        loss_fn, frozen, ts.TrainState.create(model, frozen, jax.random.key(5), (6,)), (x, y), steps=20
    )
    assert not bad.passed and "cannot" in bad.message


def test_lr_range_test_spans_an_exponential_range_and_explodes_at_the_top():
    x, y = _data(n=64)
    model = L.Sequential(L.Dense(32), L.Relu(), L.Dense(3))
    state = ts.TrainState.create(model, dl.sgd(0.1), jax.random.key(6), (6,))
    k = 40
    batches = (jnp.broadcast_to(x, (k, *x.shape)), jnp.broadcast_to(y, (k, *y.shape)))
    result = D.lr_range_test(ts.supervised_loss(model), lambda lr: dl.sgd(lr), state, batches, 1e-4, 1e2)
    np.testing.assert_allclose(result.lrs[[0, -1]], [1e-4, 1e2], rtol=1e-6)
    np.testing.assert_allclose(np.diff(np.log(result.lrs)), np.log(1e6) / (k - 1), rtol=1e-6)
    assert result.losses.shape == (k,)
    assert abs(result.losses[5] - result.losses[0]) < 1e-2, "at tiny rates the loss barely moves"
    assert not np.isfinite(result.losses[-1]) or result.losses[-1] > 2 * result.losses[0], "it should blow up"
    assert 1e-3 < result.suggested_lr < 1e2
    finite = np.where(np.isfinite(result.losses), result.losses, np.inf)
    assert result.suggested_lr <= result.lrs[int(np.argmin(finite))], "suggested a rate past the minimum"
    i = int(np.searchsorted(result.lrs, result.suggested_lr))
    assert result.losses[i] < result.losses[0], "the loss should still be going down there"


def test_suggested_lr_is_the_steepest_descent_before_the_minimum_not_the_blow_up():
    lrs = np.logspace(-4, 1, 12)
    # Flat, then falling (steepest between 1e-2 and 3e-2), lowest near 0.1, then exploding.
    losses = np.array([2.3, 2.3, 2.29, 2.2, 1.6, 0.9, 0.6, 0.5, 3.0, 40.0, 1e4, np.nan])
    got = D.suggest_lr(lrs, losses)
    assert lrs[3] <= got <= lrs[5], got
    # A steadily falling curve has no steepest point at its end (zero-padded smoothing fakes one).
    assert D.suggest_lr(lrs, np.linspace(3.0, 0.1, 12)) < lrs[-2]
