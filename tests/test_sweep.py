"""Vmapped sweeps equal one-by-one runs; traced hyperparameters never recompile; coarse-to-fine."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxdl as dl
from jaxdl import init as I
from jaxdl import layers as L
from jaxdl import sweep as sw
from jaxdl import train_step as ts

K, B, D, C = 6, 16, 8, 4


def _batches(seed=0, k=K):
    kx, kw = jax.random.split(jax.random.key(seed))
    x = jax.random.normal(kx, (k, B, D))
    y = jnp.argmax(x @ jax.random.normal(kw, (D, C)), axis=-1).astype(jnp.int32)
    return x, y


def _model():
    # BatchNorm (model state) and Dropout (per-step keys) so seeds and state both matter.
    return L.Sequential(L.Dense(16, use_bias=False), L.BatchNorm(), L.Relu(), L.Dropout(0.2), L.Dense(C))


def _single_run(model, loss_fn, tx, seed, batches, init_scale=None, eval_batch=None):
    """The reference: one run with the public train-step API, no vmap."""
    state = ts.TrainState.create(model, tx, jax.random.key(seed), (D,))
    if init_scale is not None:
        params = jax.tree.map(lambda p: p * init_scale if p.ndim >= 2 else p, state.params)
        state = state.replace(params=params, opt_state=tx.init(params))
    state, metrics = ts.make_train_loop(loss_fn, tx)(state, batches)
    ev = ts.make_eval_step(loss_fn)(state, eval_batch) if eval_batch is not None else {}
    return state, metrics, ev


def _reference(model, loss_fn, make_tx):
    """`_single_run` jitted over (seed, hyperparameters), so a test's runs share one compilation
    (XLA compiles take seconds on a busy 2-core machine); still one run at a time, no vmap."""

    @jax.jit
    def run(seed, hp, batches, init_scale=None, eval_batch=None):
        return _single_run(model, loss_fn, make_tx(**hp), seed, batches, init_scale, eval_batch)

    return run


def _close(a, b, tol=1e-5):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=tol, atol=tol)


def test_grid_is_the_cartesian_product_first_axis_slowest():
    g = sw.grid(lr=[0.1, 0.01], momentum=[0.0, 0.5, 0.9])
    np.testing.assert_array_equal(g["lr"], [0.1, 0.1, 0.1, 0.01, 0.01, 0.01])
    np.testing.assert_array_equal(g["momentum"], [0.0, 0.5, 0.9, 0.0, 0.5, 0.9])
    with pytest.raises(ValueError, match="empty"):
        sw.grid(lr=[])


def test_sweep_equals_python_loop_of_single_runs():
    model = _model()
    loss_fn = ts.supervised_loss(model)
    batches, eval_batch = _batches(0), jax.tree.map(lambda a: a[0], _batches(1))
    hp = sw.grid(lr=[0.3, 0.03], momentum=[0.0, 0.9])
    res = sw.sweep(
        loss_fn,
        lambda lr, momentum: dl.sgd(lr, momentum),
        model,
        (D,),
        batches,
        seeds=[3, 7],
        hparams=hp,
        eval_batch=eval_batch,
        return_state=True,
    )
    assert (
        res["loss"].shape == (8, K) and res["final_loss"].shape == (8,) and res["eval_accuracy"].shape == (8,)
    )
    np.testing.assert_array_equal(res["seed"], [3] * 4 + [7] * 4)  # seed major
    np.testing.assert_array_equal(res["lr"], np.tile(hp["lr"].astype(np.float32), 2))
    reference = _reference(model, loss_fn, lambda lr, momentum: dl.sgd(lr, momentum))
    for r in range(8):
        hp = {"lr": float(res["lr"][r]), "momentum": float(res["momentum"][r])}
        state, metrics, ev = reference(int(res["seed"][r]), hp, batches, eval_batch=eval_batch)
        for name in ("loss", "accuracy", "grad_norm", "update_ratio"):
            _close(res[name][r], metrics[name])
            _close(res[f"final_{name}"][r], metrics[name][-1])
        _close(res["eval_loss"][r], ev["loss"])
        _close(res["eval_accuracy"][r], ev["accuracy"])
        run_state = jax.tree.map(lambda a: a[r], res["state"])
        for a, b in zip(
            jax.tree.leaves((run_state.params, run_state.model_state)),
            jax.tree.leaves((state.params, state.model_state)),
        ):
            _close(a, b)
    # also against the plain un-jitted call with Python floats, for one run
    _, metrics, _ = _single_run(model, loss_fn, dl.sgd(0.03, 0.9), 7, batches)
    _close(res["loss"][7], metrics["loss"])
    # seeds change init and dropout, settings change the trajectory
    assert not np.allclose(res["loss"][0], res["loss"][4])
    assert not np.allclose(res["loss"][0], res["loss"][2])


def test_init_scale_sweep_equals_scaled_single_runs_including_zero_init():
    model = L.Sequential(L.Dense(16, w_init=I.normal(1.0)), L.Relu(), L.Dense(C, w_init=I.normal(1.0)))
    loss_fn = ts.supervised_loss(model)
    batches = _batches(2)
    scales = np.array([0.0, 0.1, 1.0], np.float32)
    res = sw.sweep(
        loss_fn,
        lambda lr: dl.sgd(lr),
        model,
        (D,),
        batches,
        seeds=1,
        hparams={"lr": 0.1, "init_scale": scales},
        return_state=True,
    )
    reference = _reference(model, loss_fn, lambda: dl.sgd(0.1))
    for r, s in enumerate(scales):
        state, metrics, _ = reference(1, {}, batches, init_scale=float(s))
        _close(res["loss"][r], metrics["loss"])
        _close(res["state"].params["dense_2"]["w"][r], state.params["dense_2"]["w"])
    # zero init of a ReLU net: it starts at chance, ln C, and the kernels' gradients vanish
    # (only the output bias learns), so every kernel is still exactly zero after training
    _close(res["loss"][0, 0], math.log(C), tol=1e-6)
    assert np.all(res["state"].params["dense_0"]["w"][0] == 0)
    assert np.all(res["state"].params["dense_2"]["w"][0] == 0)
    assert np.any(res["state"].params["dense_2"]["b"][0] != 0)


def test_optimizer_key_gives_each_seed_its_own_gradient_noise():
    model = L.Sequential(L.Dense(C))
    loss_fn = ts.supervised_loss(model)
    batches = _batches(3)

    def make(eta, key):
        return dl.chain(dl.add_noise(eta, key=key), dl.scale_by_learning_rate(0.1))

    res = sw.sweep(
        loss_fn, make, model, (D,), batches, seeds=[0, 1], hparams={"eta": [0.0, 1.0]}, return_state=True
    )
    reference = _reference(model, loss_fn, make)
    for r in range(4):
        seed, eta = int(res["seed"][r]), float(res["eta"][r])
        key = jax.random.fold_in(jax.random.key(seed), 1)
        state, metrics, _ = reference(seed, {"eta": eta, "key": key}, batches)
        _close(res["loss"][r], metrics["loss"])
        _close(res["state"].params["dense_0"]["w"][r], state.params["dense_0"]["w"])
    # eta = 0: seeds differ only through init; eta = 1: the noise is per seed, not shared
    w = res["state"].params["dense_0"]["w"]
    noise0, noise1 = w[1] - w[0], w[3] - w[2]
    assert np.linalg.norm(noise0 - noise1) > 0.5 * np.linalg.norm(noise0)


def test_new_hyperparameter_values_and_seeds_do_not_recompile():
    model = L.Sequential(L.Dense(8), L.Tanh(), L.Dense(C))
    loss_fn = ts.supervised_loss(model)
    batches = _batches(4)
    traces = []

    def make(lr, decay, eta, key):
        traces.append(1)  # runs only while tracing
        return dl.chain(dl.add_noise(eta, key=key), dl.add_weight_decay(decay), dl.adam(lr))

    common = dict(seeds=[0, 1])
    a = sw.sweep(
        loss_fn,
        make,
        model,
        (D,),
        batches,
        hparams={"lr": [1e-3, 1e-2], "decay": [0.0, 1e-3], "eta": 0.0},
        **common,
    )
    n = len(traces)
    assert n >= 1
    b = sw.sweep(
        loss_fn,
        make,
        model,
        (D,),
        batches,
        hparams={"lr": [3e-2, 1e-1], "decay": [1e-2, 0.0], "eta": 0.01},
        **common,
    )
    c = sw.sweep(
        loss_fn,
        make,
        model,
        (D,),
        batches,
        hparams={"lr": [1e-3, 1e-2], "decay": [0.0, 1e-3], "eta": 0.0},
        seeds=[5, 6],
    )
    assert len(traces) == n, "new hyperparameter values or seeds retraced the sweep"
    # ... and the values are really used, not baked in as constants of the first trace
    assert not np.allclose(a["loss"][:, -1], b["loss"][:, -1])
    assert not np.allclose(a["loss"][:, -1], c["loss"][:, -1])
    tx = make(3e-2, 1e-2, 0.01, jax.random.fold_in(jax.random.key(0), 1))
    _, metrics, _ = _single_run(model, loss_fn, tx, 0, batches)
    _close(b["loss"][0], metrics["loss"])


def test_chunked_sweep_equals_the_all_at_once_sweep():
    model = L.Sequential(L.Dense(8), L.Relu(), L.Dense(C))
    loss_fn = ts.supervised_loss(model)
    batches = _batches(5)
    kw = dict(seeds=[0, 1], hparams={"lr": [0.01, 0.1]})
    full = sw.sweep(loss_fn, dl.adam, model, (D,), batches, **kw)
    chunked = sw.sweep(loss_fn, dl.adam, model, (D,), batches, chunk_size=3, **kw)  # 4 runs: 3 + 1
    for name in ("loss", "accuracy", "final_grad_norm"):
        _close(full[name], chunked[name])


def test_sweep_rejects_bad_arguments_with_clear_messages():
    model = L.Sequential(L.Dense(C))
    loss_fn, batches = ts.supervised_loss(model), _batches(0, k=2)
    with pytest.raises(ValueError, match="zipped"):
        sw.sweep(
            loss_fn, dl.sgd, model, (D,), batches, hparams={"lr": [0.1, 0.2], "momentum": [0.1, 0.2, 0.3]}
        )
    with pytest.raises(ValueError, match="seeds"):
        sw.sweep(loss_fn, dl.sgd, model, (D,), batches, seeds=[0.5], hparams={"lr": 0.1})
    with pytest.raises(ValueError, match="non-finite"):
        sw.sweep(loss_fn, dl.sgd, model, (D,), batches, hparams={"lr": [0.1, np.nan]})
    with pytest.raises(ValueError, match="chunk_size"):
        sw.sweep(loss_fn, dl.sgd, model, (D,), batches, hparams={"lr": 0.1}, chunk_size=0)


def _quadratic_problem(steps=4):
    # f(w) = mean((w - 3)^2) on x = 1: gradient 2(w - 3), so SGD contracts by (1 - 2 lr) per step
    # and the loss after the first step is exactly zero at lr = 0.5, growing on either side.
    model = L.Sequential(L.Dense(1, use_bias=False))
    loss_fn = ts.supervised_loss(model, loss=dl.mse)
    x = jnp.ones((steps, 4, 1))
    y = jnp.full((steps, 4, 1), 3.0)
    return model, loss_fn, (x, y)


def test_coarse_to_fine_narrows_around_the_best_learning_rate():
    model, loss_fn, batches = _quadratic_problem()
    res = sw.coarse_to_fine(
        loss_fn,
        lambda lr: dl.sgd(lr),
        model,
        (1,),
        batches,
        ranges={"lr": (1e-3, 10.0)},
        stages=3,
        num_samples=12,
        keep=0.25,
        key=0,
    )
    assert len(res.stages) == 3 and len(res.ranges) == 3
    for stage, table in enumerate(res.stages):
        lo, hi = res.ranges[stage]["lr"]
        assert table.dtype.names == ("lr", "score", "kept")
        assert np.all((table["lr"] >= lo * (1 - 1e-6)) & (table["lr"] <= hi * (1 + 1e-6)))
        assert table["kept"].sum() == 3
        finite = np.where(np.isfinite(table["score"]), table["score"], np.inf)
        assert finite[table["kept"]].max() <= finite[~table["kept"]].min()
        if stage + 1 < len(res.stages):  # the next range is the span of the kept values
            kept = table["lr"][table["kept"]]
            np.testing.assert_allclose(res.ranges[stage + 1]["lr"], (kept.min(), kept.max()))
    widths = [np.log(hi / lo) for lo, hi in (r["lr"] for r in res.ranges)]
    assert widths[0] > widths[1] > widths[2]
    assert 0.35 < res.best["lr"] < 0.65
    # the recorded score is the sweep's own final loss for that setting
    t = res.stages[0]
    again = sw.sweep(loss_fn, lambda lr: dl.sgd(lr), model, (1,), batches, hparams={"lr": t["lr"]})
    _close(t["score"], again["final_loss"], tol=1e-6)


def test_coarse_to_fine_averages_seeds_and_calls_batches_per_stage():
    model, loss_fn, batches = _quadratic_problem()
    asked = []

    def stage_batches(stage):
        asked.append(stage)
        return batches

    res = sw.coarse_to_fine(
        loss_fn,
        lambda lr, momentum: dl.sgd(lr, momentum),
        model,
        (1,),
        stage_batches,
        ranges={"lr": (0.01, 1.0)},
        fixed={"momentum": 0.5},
        stages=2,
        num_samples=4,
        keep=0.5,
        seeds=[0, 1],
    )
    assert asked == [0, 1]
    t = res.stages[0]
    per_seed = sw.sweep(
        loss_fn,
        lambda lr, momentum: dl.sgd(lr, momentum),
        model,
        (1,),
        batches,
        seeds=[0, 1],
        hparams={"lr": t["lr"], "momentum": 0.5},
    )
    _close(t["score"], per_seed["final_loss"].reshape(2, 4).mean(0), tol=1e-6)
    with pytest.raises(ValueError, match="both searched and fixed"):
        sw.coarse_to_fine(loss_fn, dl.sgd, model, (1,), batches, ranges={"lr": (0.1, 1)}, fixed={"lr": 0.1})
    with pytest.raises(ValueError, match="low > 0"):
        sw.coarse_to_fine(loss_fn, dl.sgd, model, (1,), batches, ranges={"lr": (0.0, 1)})
