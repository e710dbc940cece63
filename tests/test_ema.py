"""Weight averaging: the EMA of the parameters in the TrainState, its evaluation, and
recalibrate_batchnorm against torch.optim.swa_utils.update_bn."""

import jax
import numpy as np
import pytest

import jaxdl as dl
from jaxdl import layers as L
from jaxdl import train_step as ts

try:
    import torch
except ImportError:  # Python 3.12+: no torch; the tests marked `torch` skip (conftest.py)
    torch = None


def _data(n=32, d=6, classes=3, seed=0):
    rng = np.random.default_rng(seed)
    return rng.normal(size=(n, d)).astype(np.float32), rng.integers(0, classes, n).astype(np.int32)


def _mlp():
    return L.Sequential(L.Dense(8), L.Tanh(), L.Dense(3))


def test_ema_follows_the_warmed_up_recurrence_over_the_param_history():
    model, tx, decay = _mlp(), dl.adam(0.05), 0.8
    loss = ts.supervised_loss(model)
    state = ts.TrainState.create(model, tx, jax.random.key(0), (6,), ema=decay)
    step = ts.make_train_step(loss, tx, ema=decay)
    x, y = _data(96)
    expected = jax.tree.map(lambda p: np.asarray(p, np.float64), state.params)
    for t in range(6):  # warm-up: d_t = min(decay, (1+t)/(10+t)) takes over from t = 3
        state, _ = step(state, (x[16 * t : 16 * t + 16], y[16 * t : 16 * t + 16]))
        d = min(decay, (1 + t) / (10 + t))
        expected = jax.tree.map(
            lambda e, p: d * e + (1 - d) * np.asarray(p, np.float64), expected, state.params
        )
    for e, got in zip(jax.tree.leaves(expected), jax.tree.leaves(state.ema_params)):
        np.testing.assert_allclose(got, e, rtol=1e-5, atol=1e-6)
    loop_state, _ = ts.make_train_loop(loss, tx, ema=decay)(
        ts.TrainState.create(model, tx, jax.random.key(0), (6,), ema=decay),
        (x.reshape(6, 16, 6), y.reshape(6, 16)),
    )
    for a, b in zip(jax.tree.leaves(loop_state.ema_params), jax.tree.leaves(state.ema_params)):
        np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7)


def test_eval_step_with_use_ema_scores_the_averaged_weights():
    model, tx = _mlp(), dl.sgd(0.5)
    loss = ts.supervised_loss(model)
    state = ts.TrainState.create(model, tx, jax.random.key(0), (6,), ema=0.5)
    state, _ = ts.make_train_loop(loss, tx, ema=0.5)(
        state, (np.stack([_data()[0]] * 3), np.stack([_data()[1]] * 3))
    )
    ema = ts.make_eval_step(loss, use_ema=True)(state, _data(seed=1))
    swapped = ts.make_eval_step(loss)(state.replace(params=state.ema_params), _data(seed=1))
    raw = ts.make_eval_step(loss)(state, _data(seed=1))
    assert float(ema["loss"]) == float(swapped["loss"]) != float(raw["loss"])
    with pytest.raises(ValueError, match="use_ema=True, but state.ema_params is None"):
        ts.make_eval_step(loss, use_ema=True)(
            ts.TrainState.create(model, tx, jax.random.key(0), (6,)), _data()
        )


def test_bad_decays_and_mismatched_states_are_refused():
    loss, tx = ts.supervised_loss(_mlp()), dl.sgd(0.1)
    with pytest.raises(
        ValueError, match=r"make_train_step: ema=1.0 is out of range; expected finite ema with 0 <= ema < 1"
    ):
        ts.make_train_step(loss, tx, ema=1.0)
    with pytest.raises(ValueError, match=r"make_train_loop: ema=-0.1 is out of range"):
        ts.make_train_loop(loss, tx, ema=-0.1)
    with pytest.raises(TypeError, match="ema must be a decay in"):
        ts.make_train_step(loss, tx, ema=True)
    with pytest.raises(ValueError, match=r"fit: ema=1.5 is out of range"):
        dl.fit(_mlp(), tx, _data(), epochs=1, batch_size=8, ema=1.5, progress=False)
    plain = ts.TrainState.create(_mlp(), tx, jax.random.key(0), (6,))
    with pytest.raises(ValueError, match=r"ema= is set but state.ema_params is None"):
        ts.make_train_step(loss, tx, ema=0.9)(plain, _data())
    with pytest.raises(ValueError, match="the state has ema_params but the step was built without ema="):
        ts.make_train_step(loss, tx)(
            ts.TrainState.create(_mlp(), tx, jax.random.key(0), (6,), ema=0.9), _data()
        )


def test_a_skipped_step_leaves_the_average_unchanged():
    model, tx = _mlp(), dl.sgd(0.1)
    loss = ts.supervised_loss(model)
    state = ts.TrainState.create(model, tx, jax.random.key(0), (6,), ema=0.9)
    state, _ = ts.make_train_step(loss, tx, ema=0.9)(state, _data())
    x, y = _data()
    x[0, 0] = np.nan
    new, metrics = ts.make_train_step(loss, tx, ema=0.9)(state, (x, y))
    assert int(metrics["nonfinite"]) == 1
    assert all(
        np.array_equal(a, b)
        for a, b in zip(jax.tree.leaves(state.ema_params), jax.tree.leaves(new.ema_params))
    )


def test_sweep_over_decays_compiles_once_and_equals_single_runs():
    from jaxdl.sweep import _run, sweep

    model = _mlp()
    loss = ts.supervised_loss(model)
    x, y = _data(48)
    batches = (x.reshape(3, 16, 6), y.reshape(3, 16))

    def make(lr):
        return dl.sgd(lr)

    res = sweep(
        loss,
        make,
        model,
        (6,),
        batches,
        hparams={"lr": 0.3, "ema": [0.0, 0.5, 0.9]},
        eval_batch=_data(seed=1),
        return_state=True,
    )
    size = _run._cache_size()
    sweep(
        loss,
        make,
        model,
        (6,),
        batches,
        hparams={"lr": 0.3, "ema": [0.1, 0.2, 0.3]},
        eval_batch=_data(seed=1),
        return_state=True,
    )
    assert _run._cache_size() == size
    assert "ema_eval_accuracy" in res and res["ema_eval_loss"].shape == (3,)
    tx = make(0.3)
    single = ts.TrainState.create(model, tx, jax.random.key(0), (6,), ema=0.5)
    single, _ = ts.make_train_loop(loss, tx, ema=0.5)(single, batches)
    np.testing.assert_allclose(
        res["state"].ema_params["dense_0"]["w"][1], single.ema_params["dense_0"]["w"], rtol=1e-6, atol=1e-7
    )


@pytest.mark.torch
def test_recalibrate_batchnorm_matches_torch_update_bn():
    model = L.Sequential(L.Dense(5), L.BatchNorm(), L.Relu(), L.Dense(4), L.BatchNorm(), L.Dense(3))
    _, params, state = model.init(jax.random.key(0), (6,))
    rng = np.random.default_rng(0)
    batches = [rng.normal(1.0, 2.0, size=(n, 6)).astype(np.float32) for n in (16, 7, 30)]
    got = dl.recalibrate_batchnorm(model, params, state, [(b, None) for b in batches])

    t = torch.nn.Sequential(
        torch.nn.Linear(6, 5),
        torch.nn.BatchNorm1d(5),
        torch.nn.ReLU(),
        torch.nn.Linear(5, 4),
        torch.nn.BatchNorm1d(4),
        torch.nn.Linear(4, 3),
    )
    with torch.no_grad():
        for i, name in ((0, "dense_0"), (3, "dense_3"), (5, "dense_5")):
            t[i].weight.copy_(torch.tensor(np.asarray(params[name]["w"]).T))
            t[i].bias.copy_(torch.tensor(np.asarray(params[name]["b"])))
        for i, name in ((1, "batchnorm_1"), (4, "batchnorm_4")):
            t[i].weight.copy_(torch.tensor(np.asarray(params[name]["gamma"])))
            t[i].bias.copy_(torch.tensor(np.asarray(params[name]["beta"])))
            t[i].running_mean.fill_(7.0)  # stale statistics: update_bn resets them
    torch.optim.swa_utils.update_bn([torch.tensor(b) for b in batches], t)
    for i, name in ((1, "batchnorm_1"), (4, "batchnorm_4")):
        np.testing.assert_allclose(got[name]["mean"], t[i].running_mean.numpy(), rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(got[name]["var"], t[i].running_var.numpy(), rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="recalibrate_batchnorm: the model has no jaxdl.layers.BatchNorm"):
        dl.recalibrate_batchnorm(_mlp(), params, {}, batches)


def test_fit_reports_validation_of_raw_and_averaged_weights():
    x, y = _data(64)
    result = dl.fit(
        _mlp(),
        dl.sgd(0.2),
        (x, y),
        validation=_data(16, seed=1),
        epochs=2,
        batch_size=16,
        ema=0.5,
        micro_batches=2,
        progress=False,
    )
    for record in result.history:
        assert {"val_loss", "val_accuracy", "ema_val_loss", "ema_val_accuracy"} <= set(record)
    score = dl.evaluate(_mlp(), result.state, _data(16, seed=1), use_ema=True)
    assert score["loss"] == pytest.approx(result.history[-1]["ema_val_loss"], rel=1e-6)
