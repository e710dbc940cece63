"""Fully sharded data parallelism (FSDP) on the suite's 4 fake CPU devices, against one device.

Every compiled program is built once per module (fixtures) and every step's result is awaited
(`jax.block_until_ready`): on 2 cores an un-awaited collective program can miss XLA's rendezvous.
"""

import shutil

import jax
import numpy as np
import pytest
from jax.sharding import NamedSharding, SingleDeviceSharding
from jax.sharding import PartitionSpec as P

import jaxdl as dl
import jaxdl.layers as L
import jaxdl.parallel as par
import jaxdl.train_step as ts
from jaxdl import checkpoint

D = 4
STEPS = 3


def _data(steps=STEPS, n=32, d=8, classes=4):
    rng = np.random.RandomState(0)
    x = rng.randn(steps, n, d).astype(np.float32)
    y = np.argmax(x @ rng.randn(d, classes), -1).astype(np.int32)
    return x, y


def _mlp(axis_name="batch", dropout=0.0):
    # No bias before BatchNorm (its true gradient is 0); Tanh: gradients continuous in the inputs.
    layers = [L.Dense(16, use_bias=False), L.BatchNorm(axis_name=axis_name), L.Tanh()]
    layers += [L.Dropout(dropout)] if dropout else []
    return L.Sequential(*layers, L.Dense(4))


def _run(step, state, batch):
    out = step(state, batch)
    jax.block_until_ready(out)
    return out


def _leaves(state):
    return jax.tree.leaves((state.params, state.model_state, state.opt_state, state.ema_params))


def _assert_close(got, want, tol=1e-5):
    a, b = _leaves(got), _leaves(want)
    assert len(a) == len(b)
    for u, v in zip(a, b):
        np.testing.assert_allclose(np.asarray(u), np.asarray(v), rtol=tol, atol=tol)


# ----------------------------------------------------------------------------- the layout rule


def test_fsdp_shardings_split_the_largest_divisible_dimension_and_replicate_the_rest():
    mesh = par.data_mesh(D)
    tree = {
        "w": np.zeros((6, 8)),  # 8 is the largest dimension 4 divides
        "tall": np.zeros((12, 6)),  # 12 before 6
        "odd": np.zeros((5, 7)),  # nothing 4 divides
        "small": np.zeros((4,)),  # under min_size
        "step": np.int32(0),
        "key": jax.random.key(0),
    }
    specs = jax.tree.map(lambda s: s.spec, par.fsdp_shardings(tree, mesh, min_size=8))
    assert specs == {
        "w": P(None, "batch"),
        "tall": P("batch"),
        "odd": P(),
        "small": P(),
        "step": P(),
        "key": P(),
    }
    default = par.fsdp_shardings({"w": np.zeros((64, 32)), "big": np.zeros((64, 64))}, mesh)
    assert default["w"].spec == P() and default["big"].spec == P("batch")  # 2048 < 4096 <= 4096
    with pytest.raises(ValueError, match="shard='zero'"):
        par.make_sharded_train_step(ts.supervised_loss(_mlp()), dl.sgd(0.1), mesh, shard="zero")
    with pytest.raises(ValueError, match="shard='fsdp' cannot run a cross-device optimizer"):
        par.make_sharded_train_step(
            ts.supervised_loss(_mlp()), par.onebit_allreduce(dl.sgd(0.1)), mesh, shard="fsdp"
        )


# ----------------------------------------------------------------------------- against one device


@pytest.fixture(scope="module")
def adam_runs():
    """3 steps of Adam with an EMA and 2 micro-batches: one device on the global batch, and FSDP."""
    tx, kw = dl.adam(1e-2), dict(micro_batches=2, ema=0.9)
    x, y = _data()
    mesh = par.data_mesh(D)
    reference = ts.TrainState.create(_mlp(None), tx, jax.random.key(1), (8,), ema=0.9)
    ref_step = ts.make_train_step(ts.supervised_loss(_mlp(None)), tx, **kw)
    step = par.make_sharded_train_step(
        ts.supervised_loss(_mlp()), tx, mesh, shard="fsdp", min_shard_size=0, **kw
    )
    state = par.put_state(reference, mesh, shard="fsdp", min_shard_size=0)
    placed = state
    ref_metrics, metrics = [], []
    for i in range(STEPS):
        reference, m_ref = ref_step(reference, (x[i], y[i]))
        state, m = _run(step, state, (x[i], y[i]))
        ref_metrics.append(m_ref)
        metrics.append(m)
    return dict(reference=reference, state=state, placed=placed, m_ref=ref_metrics, m=metrics, mesh=mesh)


def test_fsdp_step_with_batchnorm_ema_and_micro_batches_matches_one_device(adam_runs):
    for m_ref, m in zip(adam_runs["m_ref"], adam_runs["m"]):
        for name in ("loss", "grad_norm", "update_ratio"):
            np.testing.assert_allclose(np.asarray(m[name]), np.asarray(m_ref[name]), rtol=1e-5)
    assert not np.allclose(adam_runs["reference"].model_state["batchnorm_1"]["mean"], 0.0)
    _assert_close(adam_runs["state"], adam_runs["reference"])


def test_fsdp_state_is_split_over_the_devices_and_stays_split(adam_runs):
    for state in (adam_runs["placed"], adam_runs["state"]):
        w = state.params["dense_0"]["w"]  # (8, 16): split along 16
        mu = state.opt_state[0].mu["dense_0"]["w"]
        ema = state.ema_params["dense_0"]["w"]
        for leaf in (w, mu, ema):
            assert leaf.sharding.spec == P(None, "batch")
            assert {s.data.shape for s in leaf.addressable_shards} == {(8, 16 // D)}
        assert state.step.sharding.is_fully_replicated


@pytest.fixture(scope="module")
def dropout_bf16_runs():
    """3 steps with dropout in bfloat16: the replicated sharded step and FSDP, same devices."""
    model, tx = _mlp(dropout=0.3), dl.sgd(0.1, momentum=0.9)
    loss_fn, mesh = ts.supervised_loss(model), par.data_mesh(D)
    x, y = _data()
    start = ts.TrainState.create(model, tx, jax.random.key(2), (8,))
    out = {}
    for shard in ("replicate", "fsdp"):
        step = par.make_sharded_train_step(loss_fn, tx, mesh, shard=shard, min_shard_size=0, precision="bf16")
        state = par.put_state(start, mesh, shard=shard, min_shard_size=0)
        for i in range(STEPS):
            state, _ = _run(step, state, par.put_batch((x[i], y[i]), mesh))
        out[shard] = state
    return out


def test_fsdp_step_with_dropout_in_bf16_matches_the_replicated_sharded_step(dropout_bf16_runs):
    # Dropout draws per device from fold_in(key, device) in both steps, so one device cannot be
    # the reference here; the replicated step is (test_parallel ties it to one device).
    _assert_close(dropout_bf16_runs["fsdp"], dropout_bf16_runs["replicate"])


def test_fsdp_loop_equals_one_device_steps():
    tx = dl.sgd(0.1, momentum=0.9)
    x, y = _data()
    mesh = par.data_mesh(D)
    reference = ts.TrainState.create(_mlp(None), tx, jax.random.key(1), (8,))
    ref_step = ts.make_train_step(ts.supervised_loss(_mlp(None)), tx)
    loop = par.make_sharded_train_loop(ts.supervised_loss(_mlp()), tx, mesh, shard="fsdp", min_shard_size=0)
    state, metrics = _run(loop, reference, par.put_batch((x, y), mesh, batch_axis=1))
    for i in range(STEPS):
        reference, m_ref = ref_step(reference, (x[i], y[i]))
        np.testing.assert_allclose(np.asarray(metrics["loss"][i]), np.asarray(m_ref["loss"]), rtol=1e-5)
    assert state.params["dense_0"]["w"].sharding.spec == P(None, "batch")
    _assert_close(state, reference)


# ----------------------------------------------------------------------------- checkpoints


def test_a_4_device_fsdp_checkpoint_restores_bitwise_onto_2_devices_1_device_and_replicated(
    adam_runs, tmp_path
):
    state = adam_runs["state"]
    path = tmp_path / "fsdp4"
    checkpoint.save_checkpoint(path, state)  # orbax writes each device's shard; nothing gathered
    saved = [np.asarray(x) for x in _leaves(state)]
    layouts = {
        "fsdp, 2 devices": par.fsdp_shardings(state, par.data_mesh(2), min_size=0),
        "1 device": jax.tree.map(lambda _: SingleDeviceSharding(jax.devices()[1]), state),
        "replicated, 4 devices": jax.tree.map(lambda _: NamedSharding(adam_runs["mesh"], P()), state),
    }
    for name, shardings in layouts.items():
        target = jax.tree.map(
            lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), state, shardings
        )
        restored = checkpoint.restore_checkpoint(path, target)
        w = restored.params["dense_0"]["w"]
        assert w.sharding == shardings.params["dense_0"]["w"], name
        for a, b in zip(_leaves(restored), saved):
            np.testing.assert_array_equal(np.asarray(a), b, err_msg=name)


# ----------------------------------------------------------------------------- fit


def test_fit_with_fsdp_resumed_on_2_devices_with_remat_ends_where_the_uninterrupted_run_ends(tmp_path):
    # fit runs make_sharded_train_loop, which test_fsdp_loop_equals_one_device_steps ties to one
    # device; here the checkpoint of a 4-device run resumes on 2 devices with remat.
    rng = np.random.RandomState(1)
    x = rng.randn(128, 64).astype(np.float32)
    y = np.argmax(x[:, :4], -1).astype(np.int32)

    def model():  # its first kernel, 64 x 64 = 4096 elements, is split with the default min size
        return L.Sequential(L.Dense(64), L.Tanh(), L.Dense(4))

    def run(epochs, **kw):
        return dl.fit(model(), dl.adam(1e-2), (x, y), epochs=epochs, batch_size=32, progress=False, **kw)

    first = run(2, devices=4, shard="fsdp", out_dir=str(tmp_path))
    assert first.state.params["dense_0"]["w"].sharding.spec == P("batch")
    shutil.rmtree(tmp_path / "checkpoints" / "8")  # as if stopped after epoch 1 (step 4)
    said = []
    resumed = run(2, devices=2, shard="fsdp", out_dir=str(tmp_path), resume=True, log=said.append, remat=True)
    assert any("resumed from checkpoint step 4" in m for m in said), said
    assert resumed.steps == first.steps == 8
    assert resumed.state.params["dense_0"]["w"].sharding.mesh.size == 2
    _assert_close(resumed.state, first.state)
    # The model the 2-device run saved reads back onto one device, as `jaxdl evaluate` reads it.
    _, params, model_state = model().init(jax.random.key(0), (64,))
    saved = checkpoint.restore_checkpoint(tmp_path / "model", {"params": params, "model_state": model_state})
    for a, b in zip(jax.tree.leaves(saved["params"]), jax.tree.leaves(resumed.state.params)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    with pytest.raises(ValueError, match="shard='fsdp' splits the state over devices"):
        run(1, shard="fsdp")


# ----------------------------------------------------------------------------- rematerialization


def test_remat_checkpoints_each_layer_with_its_activation_and_takes_the_same_step():
    model = L.Sequential(L.Dense(16), L.BatchNorm(), L.Relu(), L.Dropout(0.2), L.Dense(4))
    tx = dl.sgd(0.1, momentum=0.9)
    state = ts.TrainState.create(model, tx, jax.random.key(0), (8,))
    x, y = _data(1)
    loss_fn = ts.supervised_loss(model)
    remat_fn = ts.remat_loss("test", loss_fn)
    assert jax.tree.structure(remat_fn.model.init(jax.random.key(0), (8,))[1]) == jax.tree.structure(
        state.params
    )
    jaxpr = str(
        jax.make_jaxpr(jax.grad(lambda p: remat_fn(p, state.model_state, (x[0], y[0]), state.key)[0]))(
            state.params
        )
    )
    # One jax.checkpoint per layer with its activation and dropout: [Dense], [BN, Relu, Dropout], [Dense].
    assert jaxpr.count("checkpoint[") + jaxpr.count("remat2[") == 3, jaxpr
    plain, _ = ts.make_train_step(loss_fn, tx)(state, (x[0], y[0]))
    remat, _ = ts.make_train_step(loss_fn, tx, remat=True)(state, (x[0], y[0]))
    _assert_close(remat, plain, tol=1e-6)
    with pytest.raises(
        ValueError, match="remat=True checkpoints each top-level layer of a jaxdl.layers.Sequential"
    ):
        ts.make_train_step(ts.supervised_loss(L.Dense(3)), tx, remat=True)


def test_remat_blocks_give_the_gradients_of_the_unwrapped_blocks():
    def block():
        return L.Sequential(L.Dense(8), L.Tanh())

    plain = L.Sequential(block(), block(), L.Dense(2))
    wrapped = L.Sequential(L.Remat(block()), L.Remat(block()), L.Dense(2))
    _, params, _ = plain.init(jax.random.key(0), (8,))
    assert jax.tree.structure(wrapped.init(jax.random.key(0), (8,))[1]) == jax.tree.structure(params)
    x = np.random.RandomState(0).randn(4, 8).astype(np.float32)

    @jax.jit  # one program for both models: fewer dispatches than eager, one compile
    def grads(params):
        return [jax.grad(lambda p, m=m: m.apply(p, {}, x)[0].sum())(params) for m in (wrapped, plain)]

    got, want = grads(params)
    for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-6, atol=1e-7)
