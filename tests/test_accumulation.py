"""Gradient accumulation (``micro_batches=K``): one optimizer step per batch, the mean gradient of
K micro-batches computed in a `lax.scan`; checked against the single step on the whole batch."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxdl as dl
from jaxdl import layers as L
from jaxdl import parallel
from jaxdl import train_step as ts

# Accumulation averages the gradients before the optimizer sees them, the same code whatever the
# optimizer: SGD shows the averaged gradient directly in the parameters, Adam in its moments and
# its step count (bias correction), compared through opt_state.
OPTIMIZERS = {
    "sgd": lambda: dl.sgd(0.1),
    "adam": lambda: dl.adam(0.01),
}


def _data(n=32, d=6, classes=3, seed=0):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, d)).astype(np.float32)
    return x, rng.integers(0, classes, n).astype(np.int32)


def _tanh_mlp():
    return L.Sequential(L.Dense(8), L.Tanh(), L.Dense(3))


def _max_diff(a, b):
    return max(
        (
            float(np.max(np.abs(np.asarray(x, np.float64) - np.asarray(y, np.float64))))
            for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b))
        ),
        default=0.0,
    )


@pytest.mark.parametrize("name", sorted(OPTIMIZERS))
def test_accumulated_steps_equal_the_single_step_on_the_whole_batch(name):
    model, tx = _tanh_mlp(), OPTIMIZERS[name]()
    loss = ts.supervised_loss(model)
    x, y = _data(96)
    batches = (x.reshape(3, 32, 6), y.reshape(3, 32))  # 3 optimizer steps of 32 examples
    state = ts.TrainState.create(model, tx, jax.random.key(0), (6,))
    whole, m1 = ts.make_train_loop(loss, tx)(state, batches)
    accumulated, m4 = ts.make_train_loop(loss, tx, micro_batches=4)(state, batches)
    assert int(accumulated.step) == 3  # one optimizer step per batch, not per micro-batch
    assert _max_diff(whole.params, accumulated.params) < 1e-6
    assert _max_diff(whole.opt_state, accumulated.opt_state) < 1e-6
    np.testing.assert_allclose(m4["loss"], m1["loss"], rtol=1e-6)
    np.testing.assert_allclose(m4["accuracy"], m1["accuracy"], rtol=1e-6)


def test_accumulation_sums_in_float32_and_keeps_param_dtypes():
    model, tx = _tanh_mlp(), dl.sgd(0.1)
    loss = ts.supervised_loss(model)
    state = ts.TrainState.create(model, tx, jax.random.key(0), (6,))
    (value, _), grads = ts.accumulate_gradients(
        loss, state.params, state.model_state, _data(32), jax.random.key(1), 8, kwargs={"train": True}
    )
    assert {g.dtype for g in jax.tree.leaves(grads)} == {jnp.dtype(jnp.float32)}
    (ref, _), ref_grads = jax.value_and_grad(loss, has_aux=True)(state.params, state.model_state, _data(32))
    assert _max_diff(grads, ref_grads) < 1e-6
    np.testing.assert_allclose(value, ref, rtol=1e-6)


def test_batchnorm_running_statistics_update_once_per_micro_batch():
    """As PyTorch under accumulation: each micro-batch is normalized with its own statistics and
    the running statistics take K sequential updates, mean <- m*mean + (1-m)*mu_k."""
    model = L.Sequential(L.Dense(4), L.BatchNorm(momentum=0.9), L.Relu(), L.Dense(3))
    tx = dl.sgd(0.1)  # every micro-batch sees the step's params, whatever the update
    loss = ts.supervised_loss(model)
    x, y = _data(24)
    state = ts.TrainState.create(model, tx, jax.random.key(0), (6,))
    new, _ = ts.make_train_step(loss, tx, micro_batches=3)(state, (x, y))
    w = np.asarray(state.params["dense_0"]["w"], np.float64)
    b = np.asarray(state.params["dense_0"]["b"], np.float64)
    mean, var = np.zeros(4), np.ones(4)
    for h in np.split(x.astype(np.float64) @ w + b, 3):  # closed form, micro-batch by micro-batch
        mean = 0.9 * mean + 0.1 * h.mean(0)
        var = 0.9 * var + 0.1 * h.var(0, ddof=1)
    np.testing.assert_allclose(new.model_state["batchnorm_1"]["mean"], mean, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(new.model_state["batchnorm_1"]["var"], var, rtol=1e-5, atol=1e-6)
    # and not the one update with the whole batch's statistics
    whole, _ = ts.make_train_step(loss, tx)(state, (x, y))
    assert _max_diff(whole.model_state, new.model_state) > 1e-4


def test_micro_batches_draw_different_dropout_masks():
    model = L.Sequential(L.Dense(8), L.Dropout(0.5), L.Dense(3))
    loss, tx = ts.supervised_loss(model), dl.sgd(0.1)
    x, y = _data(8)
    x2 = np.concatenate([x[:4], x[:4]])  # the same examples in both micro-batches
    state = ts.TrainState.create(model, tx, jax.random.key(0), (6,))
    (_, (_, _)), g_same = ts.accumulate_gradients(
        loss,
        state.params,
        state.model_state,
        (x2, np.concatenate([y[:4], y[:4]])),
        jax.random.key(3),
        2,
        kwargs={"train": True},
    )
    (_, (_, _)), g_one = ts.accumulate_gradients(
        loss,
        state.params,
        state.model_state,
        (x2[:4], y[:4]),
        jax.random.fold_in(jax.random.key(3), 0),
        1,
        kwargs={"train": True},
    )
    assert _max_diff(g_same, g_one) > 1e-6  # micro-batch 1 repeating micro-batch 0's mask: equal


def test_bad_micro_batches_are_refused():
    loss, tx = ts.supervised_loss(_tanh_mlp()), dl.sgd(0.1)
    with pytest.raises(
        ValueError, match=r"make_train_step: micro_batches=0 is out of range; expected an integer >= 1"
    ):
        ts.make_train_step(loss, tx, micro_batches=0)
    with pytest.raises(TypeError, match="make_train_loop: micro_batches must be an int"):
        ts.make_train_loop(loss, tx, micro_batches=2.0)
    state = ts.TrainState.create(_tanh_mlp(), tx, jax.random.key(0), (6,))
    with pytest.raises(ValueError, match=r"micro_batches=3 needs a leading batch axis divisible by 3"):
        ts.make_train_step(loss, tx, micro_batches=3)(state, _data(32))
    with pytest.raises(ValueError, match=r"fit: batch_size=30 is not divisible by micro_batches=4"):
        dl.fit(_tanh_mlp(), tx, _data(64), epochs=1, batch_size=30, micro_batches=4, progress=False)


def test_sharded_accumulation_equals_the_single_step_with_one_all_reduce_per_step():
    model, tx = _tanh_mlp(), dl.adam(0.01)
    loss = ts.supervised_loss(model)
    x, y = _data(32)
    state = ts.TrainState.create(model, tx, jax.random.key(0), (6,))
    ref, _ = ts.make_train_step(loss, tx)(state, (x, y))
    mesh = parallel.data_mesh(2)
    placed = parallel.put_state(state, mesh)
    step2 = parallel.make_sharded_train_step(loss, tx, mesh, micro_batches=4)
    new, _ = step2(placed, parallel.put_batch((x, y), mesh))
    assert _max_diff(ref.params, new.params) < 1e-6
    step1 = parallel.make_sharded_train_step(loss, tx, mesh)
    count = [step.lower(placed, (x, y)).as_text().count("all_reduce") for step in (step1, step2)]
    assert count[0] == count[1] > 0  # the micro-batch scan adds no collective
    with pytest.raises(ValueError, match="each of the 2 devices gets 16 examples, which micro_batches=3"):
        parallel.make_sharded_train_step(loss, tx, mesh, micro_batches=3)(placed, (x, y))


def test_accumulation_composes_with_bf16():
    model, tx = _tanh_mlp(), dl.sgd(0.1)
    loss = ts.supervised_loss(model)
    state = ts.TrainState.create(model, tx, jax.random.key(0), (6,))
    one, m1 = ts.make_train_step(loss, tx, precision="bf16")(state, _data(32))
    four, m4 = ts.make_train_step(loss, tx, precision="bf16", micro_batches=4)(state, _data(32))
    assert {p.dtype for p in jax.tree.leaves(four.params)} == {jnp.dtype(jnp.float32)}
    assert _max_diff(one.params, four.params) < 1e-3  # bf16 rounding of the micro-batch sums
    np.testing.assert_allclose(m4["loss"], m1["loss"], rtol=1e-2)
