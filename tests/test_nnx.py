"""flax.nnx modules everywhere a jaxdl layer is accepted (jaxdl/nnx.py).

Tiny widths and few steps: each test proves one path (fit, evaluate, the step builders, dropout
keys, precision/micro-batches/EMA/resume, 4-device BatchNorm) on an nnx model.
"""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

import jaxdl as dl
from jaxdl import train_step as ts


class Net(nnx.Module):
    """Linear + BatchNorm + Dropout + Linear: params, batch statistics and an RNG stream."""

    def __init__(self, rate=0.0, axis_name=None, seed=0):
        rngs = nnx.Rngs(seed)
        self.l1 = nnx.Linear(5, 8, rngs=rngs)
        self.bn = nnx.BatchNorm(8, momentum=0.9, axis_name=axis_name, rngs=rngs)
        self.drop = nnx.Dropout(rate, rngs=rngs)
        self.l2 = nnx.Linear(8, 3, rngs=rngs)

    def __call__(self, x):
        return self.l2(self.drop(nnx.relu(self.bn(self.l1(x)))))


def _data(n=32, seed=0):
    rng = np.random.default_rng(seed)
    return rng.normal(size=(n, 5)).astype(np.float32), rng.integers(0, 3, size=n).astype(np.int32)


def _pure(module, kind):
    return nnx.to_pure_dict(nnx.state(module, kind))


def _assert_trees_close(a, b, tol=1e-5):
    assert jax.tree.structure(a) == jax.tree.structure(b)
    for u, v in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
        np.testing.assert_allclose(u, v, rtol=tol, atol=tol)


def test_fit_matches_a_hand_written_nnx_optax_loop_and_leaves_the_module_untouched():
    x, y = _data()
    model, ref = Net(), Net()  # the same seed: the same initial values
    before = _pure(model, nnx.Param)
    result = dl.fit(model, dl.sgd(0.1, momentum=0.9), (x, y), epochs=3, batch_size=32, progress=False)

    # the reference: nnx.split/merge and optax, one full batch per step (fit's shuffling of one
    # batch changes only the order of the mean's terms)
    graphdef, params, rest = nnx.split(ref, nnx.Param, ...)
    tx = optax.sgd(0.1, momentum=0.9)
    opt_state = tx.init(params)

    def loss_fn(params, rest):
        m = nnx.merge(graphdef, params, rest, copy=True)
        m.train()
        logits = m(x)
        loss = optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()
        return loss, nnx.state(m, nnx.Not(nnx.Param))

    @jax.jit
    def step(params, rest, opt_state):
        grads, rest = jax.grad(loss_fn, has_aux=True)(params, rest)
        updates, opt_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), rest, opt_state

    for _ in range(3):
        params, rest, opt_state = step(params, rest, opt_state)
    _assert_trees_close(result.state.params, nnx.to_pure_dict(params))
    _assert_trees_close(result.state.model_state, nnx.to_pure_dict(nnx.state(rest, nnx.BatchStat)))
    # fit is pure: the module keeps its values until update_module writes them
    _assert_trees_close(_pure(model, nnx.Param), before, tol=0)
    dl.update_module(model, result.state.params, result.state.model_state)
    _assert_trees_close(_pure(model, nnx.Param), result.state.params, tol=0)
    _assert_trees_close(_pure(model, nnx.BatchStat), result.state.model_state, tol=0)


def test_train_state_step_and_evaluate_on_an_nnx_module_match_the_module_itself():
    x, y = _data()
    model = Net()
    tx = dl.adam(1e-2)
    state = ts.TrainState.create(model, tx, 0, (5,))
    step = ts.make_train_step(ts.supervised_loss(model), tx)
    state, metrics = step(state, (x, y))
    assert np.isfinite(metrics["loss"])
    scores = dl.evaluate(model, state, (x, y), batch_size=16)
    dl.update_module(model, state.params, state.model_state)
    model.eval()  # running statistics, no dropout: what evaluate runs
    logits = model(jnp.asarray(x))
    loss = optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()
    assert scores["loss"] == pytest.approx(float(loss), rel=1e-5)
    assert scores["accuracy"] == pytest.approx(float(np.mean(np.argmax(logits, -1) == y)))


def test_dropout_masks_come_from_jaxdls_key_and_are_off_in_eval():
    layer = dl.from_nnx(Net(rate=0.5))
    assert dl.from_nnx(layer.module) is layer  # one adapter per module: compiled steps are reused
    _, params, state = layer.init(jax.random.key(0), (5,))
    x = jnp.asarray(_data(8)[0])
    run = jax.jit(lambda k: layer.apply(params, state, x, train=True, key=k)[0])
    a, b, c = run(jax.random.key(1)), run(jax.random.key(1)), run(jax.random.key(2))
    np.testing.assert_array_equal(a, b)
    assert not np.allclose(a, c)
    y1, s1 = layer.apply(params, state, x)
    y2, _ = layer.apply(params, state, x, key=jax.random.key(3))
    np.testing.assert_array_equal(y1, y2)  # eval: deterministic, running statistics kept
    _assert_trees_close(s1, state, tol=0)
    with pytest.raises(ValueError, match="RNG streams.*needs a key"):
        layer.apply(params, state, x, train=True)


def test_bf16_micro_batches_ema_and_a_checkpoint_resume_bitwise(tmp_path):
    from jaxdl.checkpoint import restore_checkpoint, save_checkpoint

    model, tx = Net(rate=0.5), dl.adam(1e-2)
    kw = dict(precision="bf16", micro_batches=2, ema=0.9)
    loop = ts.make_train_loop(ts.supervised_loss(model), tx, **kw)  # fit's engine
    state = ts.TrainState.create(model, tx, 0, (5,), ema=0.9)
    x, y = _data(64)
    first, second = ((x[i : i + 32].reshape(2, 16, 5), y[i : i + 32].reshape(2, 16)) for i in (0, 32))
    half, metrics = loop(state, first)
    assert np.all(np.isfinite(metrics["loss"]))
    whole, _ = loop(half, second)
    assert all(a.dtype == jnp.float32 for a in jax.tree.leaves(whole.params))  # float32 master weights
    assert not np.allclose(whole.ema_params["l2"]["kernel"], whole.params["l2"]["kernel"])
    save_checkpoint(str(tmp_path / "ckpt"), half)
    resumed, _ = loop(restore_checkpoint(str(tmp_path / "ckpt"), half), second)
    for a, b in zip(jax.tree.leaves(whole), jax.tree.leaves(resumed)):
        if jnp.issubdtype(a.dtype, jax.dtypes.prng_key):
            a, b = jax.random.key_data(a), jax.random.key_data(b)
        np.testing.assert_array_equal(a, b)


def test_devices_4_syncs_nnx_batchnorm_through_its_axis_name():
    assert jax.local_device_count() >= 4
    x, y = _data(64)
    results = {
        devices: dl.fit(
            Net(axis_name="batch" if devices else None),
            dl.sgd(0.1),
            (x, y),
            epochs=1,
            batch_size=32,
            devices=devices,
            progress=False,
        ).state
        for devices in (None, 4)
    }
    _assert_trees_close(results[None].params, results[4].params)
    _assert_trees_close(results[None].model_state, results[4].model_state)
    with pytest.raises(
        ValueError, match=r"would differ across devices.*nnx.BatchNorm\(\.\.\., axis_name='batch'\)"
    ):
        dl.fit(Net(), dl.sgd(0.1), (x, y), epochs=1, batch_size=32, devices=4, progress=False)


def test_a_model_of_neither_kind_is_refused_naming_both():
    with pytest.raises(TypeError, match=r"fit: model must be .*from_flax.* or a flax.nnx.Module, got 'mlp'"):
        dl.fit("mlp", dl.sgd(0.1), _data(), epochs=1, batch_size=8, progress=False)
    with pytest.raises(TypeError, match="from_nnx: module must be a flax.nnx.Module"):
        dl.from_nnx(dl.Dense(3))
    with pytest.raises(
        TypeError, match=r"from_flax: .* got a flax.nnx.Module \(Net\); pass an nnx module"
    ) as err:
        dl.from_flax(Net())
    assert len(str(err.value)) < 300  # not the module's repr


def test_sweep_and_examine_take_an_nnx_module():
    from jaxdl.sweep import sweep

    model = Net(rate=0.5)
    x, y = _data(32)
    res = sweep(
        ts.supervised_loss(model),
        dl.sgd,
        model,
        (5,),
        (x.reshape(2, 16, 5), y.reshape(2, 16)),
        seeds=(0, 1),
        hparams={"lr": 0.1},
    )
    loss = res["final_loss"]
    assert np.all(np.isfinite(loss)) and loss[0] != loss[1]  # seeds draw other dropout masks
    report = dl.doctor.examine(model, dl.sgd(0.1), (x, y), batch_size=16, checks=("initial_loss",))
    assert [f.check for f in report.findings] == ["initial_loss"]
