"""Data-parallel steps (pmap, shard_map), device helpers, one-bit gradient exchange, collective bytes.

Runs on the 4 fake CPU devices of conftest.py. Every data-parallel step is awaited with
`jax.block_until_ready`: on 2 cores, un-awaited collective programs can miss XLA's rendezvous.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from jax import lax
from jax.sharding import PartitionSpec as P

import jaxdl as dl
from jaxdl import layers as L
from jaxdl import parallel as par
from jaxdl import train_step as ts

D = 4


def _data(steps=4, n=64, d=8, classes=4, seed=0):
    kx, kw = jax.random.split(jax.random.key(seed))
    x = np.asarray(jax.random.normal(kx, (steps, n, d)))
    y = np.argmax(x @ np.asarray(jax.random.normal(kw, (d, classes))), -1).astype(np.int32)
    return x, y


def _mlp(axis_name="batch", width=32):
    # No bias on the Dense before BatchNorm: its true gradient is 0 and its float noise would
    # depend on the reduction order (DESIGN.md, Conventions). Tanh, not ReLU: the gradient must be
    # continuous in the inputs. With ReLU, after one sgd(0.1, momentum=0.9) step on _data() a
    # pre-activation of 7.5e-8 sits at the kink, its sign is float rounding, and the reference's
    # own gradient moves by 3e-3 under a 1e-8 change of the params.
    return L.Sequential(
        L.Dense(width, use_bias=False),
        L.BatchNorm(axis_name=axis_name),
        L.Tanh(),
        L.Dense(width, use_bias=False),
        L.BatchNorm(axis_name=axis_name),
        L.Tanh(),
        L.Dense(4),
    )


def _run(step, state, batch):
    out = step(state, batch)
    jax.block_until_ready(out)
    return out


# ----------------------------------------------------------------------------- helpers


def test_replicate_puts_one_copy_per_device_and_unreplicate_inverts_it():
    tree = {"w": jnp.arange(6.0).reshape(2, 3), "step": jnp.int32(7), "key": jax.random.key(3)}
    rep = par.replicate(tree)
    assert rep["w"].shape == (D, 2, 3) and rep["step"].shape == (D,) and rep["key"].shape == (D,)
    assert {s.device for s in rep["w"].addressable_shards} == set(jax.local_devices())
    for d in range(D):
        np.testing.assert_array_equal(rep["w"][d], tree["w"])
    back = par.unreplicate(rep)
    np.testing.assert_array_equal(back["w"], tree["w"])
    assert int(back["step"]) == 7
    np.testing.assert_array_equal(jax.random.key_data(back["key"]), jax.random.key_data(tree["key"]))
    assert par.replicate(tree, 2)["w"].shape == (2, 2, 3)


def test_shard_batch_splits_in_order_and_refuses_uneven_batches():
    x, y = np.arange(24.0).reshape(12, 2), np.arange(12)
    xs, ys = par.shard_batch((x, y), D)
    assert xs.shape == (D, 3, 2) and ys.shape == (D, 3)
    np.testing.assert_array_equal(ys[1], [3, 4, 5])
    with pytest.raises(ValueError, match=r"30 examples does not split evenly over 4 devices"):
        par.shard_batch((np.zeros((30, 2)), np.zeros(30)), D)
    with pytest.raises(ValueError, match="disagree on the batch size"):
        par.shard_batch((np.zeros((8, 2)), np.zeros(12)), D)
    mesh = par.data_mesh()
    with pytest.raises(ValueError, match=r"30 examples does not split evenly over 4 devices"):
        par.put_batch((np.zeros((30, 2)), np.zeros(30)), mesh)
    xb = par.put_batch(x, mesh)
    assert xb.shape == (12, 2) and xb.sharding.spec == P("batch")
    np.testing.assert_array_equal(xb.addressable_shards[1].data, x[3:6])


def test_asking_for_more_devices_than_exist_is_an_error():
    for make in (par.local_devices, par.data_mesh, lambda n: par.replicate({"a": 1.0}, n)):
        with pytest.raises(ValueError, match=r"asked for 8 devices, but only 4 exist"):
            make(8)
    with pytest.raises(ValueError, match=r"asked for 8 devices, but only 4 exist"):
        par.make_pmap_train_step(ts.supervised_loss(_mlp()), dl.sgd(0.1), devices=8)
    assert len(par.local_devices(2)) == 2 and par.data_mesh(2).shape == {"batch": 2}


# ----------------------------------------------------------------------------- equivalence


@pytest.mark.parametrize(
    "make_tx", [lambda: dl.adam(1e-2), lambda: dl.sgd(0.1, momentum=0.9)], ids=["adam", "sgd_momentum"]
)
def test_pmap_and_sharded_steps_match_single_device_steps_on_the_global_batch(make_tx):
    tx, steps = make_tx(), 4
    x, y = _data(steps)
    # Reference: one device, BatchNorm over the global batch (no axis_name); same init.
    reference = ts.TrainState.create(_mlp(None), tx, jax.random.key(1), (8,))
    ref_step = ts.make_train_step(ts.supervised_loss(_mlp(None)), tx)
    mesh = par.data_mesh()
    loss_fn = ts.supervised_loss(_mlp("batch"))
    pmap_step = par.make_pmap_train_step(loss_fn, tx)
    sharded_step = par.make_sharded_train_step(loss_fn, tx, mesh)
    pmapped, sharded = par.replicate(reference), par.put_state(reference, mesh)
    for i in range(steps):
        reference, m_ref = ref_step(reference, (x[i], y[i]))
        pmapped, m_pmap = _run(pmap_step, pmapped, par.shard_batch((x[i], y[i]), D))
        sharded, m_sharded = _run(sharded_step, sharded, par.put_batch((x[i], y[i]), mesh))
        np.testing.assert_allclose(m_pmap["loss"], np.full(D, m_ref["loss"]), rtol=1e-5)
        np.testing.assert_allclose(m_sharded["loss"], m_ref["loss"], rtol=1e-5)
        np.testing.assert_allclose(m_sharded["grad_norm"], m_ref["grad_norm"], rtol=1e-5)

    assert not np.allclose(reference.model_state["batchnorm_1"]["mean"], 0.0)
    ref_leaves = jax.tree.leaves((reference.params, reference.model_state, reference.opt_state))
    for name, got in (("pmap", pmapped), ("sharded", sharded)):
        # Every replica holds the same state, and it is the single-device state.
        for leaf in jax.tree.leaves(got if name == "pmap" else ()):
            data = jax.random.key_data(leaf) if jnp.issubdtype(leaf.dtype, jax.dtypes.prng_key) else leaf
            np.testing.assert_array_equal(data, np.broadcast_to(data[0], data.shape))
        got = par.unreplicate(got) if name == "pmap" else got
        assert int(got.step) == steps
        np.testing.assert_array_equal(jax.random.key_data(got.key), jax.random.key_data(reference.key))
        got_leaves = jax.tree.leaves((got.params, got.model_state, got.opt_state))
        assert len(got_leaves) == len(ref_leaves)
        for a, b in zip(got_leaves, ref_leaves):
            np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5, err_msg=name)


def test_step_key_is_folded_with_the_device_index_and_the_state_key_stays_replicated():
    # loss = sum(w * u), u ~ U(0,1) drawn from the step key: the gradient on device d is
    # u_d = uniform(fold_in(step_key, d)), and sgd(1) moves w by -mean_d u_d.
    traces = []

    def loss_fn(params, model_state, batch, key):
        traces.append(1)
        return jnp.sum(params["w"] * jax.random.uniform(key, (5,))) + 0.0 * jnp.sum(batch), (model_state, {})

    tx = dl.sgd(1.0)
    state = ts.TrainState(
        step=jnp.int32(0),
        params={"w": jnp.zeros(5)},
        model_state={},
        opt_state=tx.init({"w": jnp.zeros(5)}),
        key=jax.random.key(11),
    )
    next_key, step_key = state.key, jax.random.fold_in(state.key, 0)  # step 0's key; the state's stays
    draws = np.stack([jax.random.uniform(jax.random.fold_in(step_key, d), (5,)) for d in range(D)])
    assert not np.allclose(draws[0], draws[1])
    batch = np.zeros((D * 2, 3), np.float32)
    mesh = par.data_mesh()

    pmap_step = par.make_pmap_train_step(loss_fn, tx)
    new, _ = _run(pmap_step, par.replicate(state), par.shard_batch(batch, D))
    keys = np.asarray(jax.random.key_data(new.key))
    np.testing.assert_array_equal(keys, np.broadcast_to(jax.random.key_data(next_key), keys.shape))
    np.testing.assert_allclose(new.params["w"][0], -draws.mean(0), rtol=1e-6)
    _run(pmap_step, new, par.shard_batch(batch, D))  # the state pmap returned: no new trace
    assert len(traces) == 1

    sharded_step = par.make_sharded_train_step(loss_fn, tx, mesh)
    new, _ = _run(sharded_step, par.put_state(state, mesh), par.put_batch(batch, mesh))
    np.testing.assert_array_equal(jax.random.key_data(new.key), jax.random.key_data(next_key))
    np.testing.assert_allclose(new.params["w"], -draws.mean(0), rtol=1e-6)
    _run(sharded_step, new, par.put_batch(batch, mesh))
    assert len(traces) == 2


# ----------------------------------------------------------------------------- bad input


def test_pmap_step_refuses_an_unreplicated_state_or_unsplit_batch_naming_the_leaf():
    model = _mlp()
    tx = dl.sgd(0.1)
    state = ts.TrainState.create(model, tx, jax.random.key(0), (8,))
    step = par.make_pmap_train_step(ts.supervised_loss(model), tx)
    x, y = _data(1)
    with pytest.raises(
        ValueError,
        match=r"state leaf \.step has shape \(\).*leading device axis of 4"
        r".*replicate",
    ):
        step(state, par.shard_batch((x[0], y[0]), D))
    two = par.replicate(state, 2)
    with pytest.raises(ValueError, match=r"state leaf \.step has shape \(2,\)"):
        step(two, par.shard_batch((x[0], y[0]), D))
    with pytest.raises(ValueError, match=r"batch leaf \[0\] has shape \(64, 8\).*shard_batch"):
        step(par.replicate(state), (x[0], y[0]))


@pytest.mark.parametrize("axis_name", [None, "data"])
def test_a_batchnorm_that_does_not_sync_over_the_data_axis_is_refused(axis_name):
    model = _mlp(axis_name)
    tx = dl.sgd(0.1)
    state = ts.TrainState.create(model, tx, jax.random.key(0), (8,))
    loss_fn = ts.supervised_loss(model)
    x, y = _data(1)
    mesh = par.data_mesh()
    match = r"diverge across replicas.*axis_name='batch'" if axis_name is None else r"axis_name='batch'"
    with pytest.raises(ValueError, match=match):
        par.make_pmap_train_step(loss_fn, tx)(par.replicate(state), par.shard_batch((x[0], y[0]), D))
    with pytest.raises(ValueError, match=match):
        par.make_sharded_train_step(loss_fn, tx, mesh)(
            par.put_state(state, mesh), par.put_batch((x[0], y[0]), mesh)
        )


def test_sharded_step_refuses_uneven_batches_and_unplaced_per_device_state():
    model = _mlp()
    mesh = par.data_mesh()
    tx = par.onebit_allreduce(dl.sgd(0.1))
    state = ts.TrainState.create(model, tx, jax.random.key(0), (8,))
    step = par.make_sharded_train_step(ts.supervised_loss(model), tx, mesh)
    x, y = _data(1, n=30)
    with pytest.raises(ValueError, match=r"30 examples does not split evenly over 4 devices"):
        step(par.put_state(state, mesh), (x[0], y[0]))
    x, y = _data(1)
    with pytest.raises(
        ValueError,
        match=r"per-device state leaf \.opt_state\.residual\['batchnorm_1'\]"
        r"\['beta'\] has shape \(1, 32\).*put_state",
    ):
        step(state, (x[0], y[0]))
    with pytest.raises(ValueError, match="exchanges gradients over axis_name='data'"):
        par.make_sharded_train_step(
            ts.supervised_loss(model), par.onebit_allreduce(dl.sgd(0.1), "data"), mesh
        )
    with pytest.raises(ValueError, match="mode="):
        par.onebit_allreduce(dl.sgd(0.1), mode="two_bit")


# ----------------------------------------------------------------------------- one-bit exchange

_pack = jax.jit(par.pack_signs)
_unpack = jax.jit(par.unpack_signs, static_argnums=1)


def _numpy_pack(x):
    bits = np.packbits(~np.signbit(np.asarray(x, np.float32).ravel()), bitorder="little")
    return np.pad(bits, (0, -len(bits) % 4)).view("<u4")


@settings(max_examples=40, deadline=None)
@given(
    st.sampled_from([0, 1, 7, 31, 32, 33, 95]).flatmap(
        lambda n: st.lists(st.floats(width=32), min_size=n, max_size=n)
    )
)
def test_pack_signs_matches_numpy_packbits_and_unpacks_exactly(values):
    # Any float32, subnormals, +-0, +-inf and NaN included: the bit is the IEEE sign bit.
    x = np.asarray(values, np.float32)
    packed = _pack(x)
    assert packed.dtype == jnp.uint32 and packed.shape == (-(-len(x) // 32),)
    np.testing.assert_array_equal(packed, _numpy_pack(x))
    np.testing.assert_array_equal(_unpack(packed, len(x)), np.where(np.signbit(x), -1.0, 1.0))


def test_pack_signs_exhaustively_on_every_sign_pattern_of_small_sizes():
    for n in (1, 5, 10):  # every pattern
        bits = (np.arange(2**n)[:, None] >> np.arange(n)) & 1
        _check_patterns(bits)
    rng = np.random.default_rng(0)
    for n in (31, 32, 33, 65):  # all-negative, all-positive and random patterns
        _check_patterns(
            np.concatenate([np.zeros((1, n), int), np.ones((1, n), int), rng.integers(0, 2, (200, n))])
        )


def _check_patterns(bits):
    x = np.where(bits, 0.5, -0.5).astype(np.float32)
    packed = jax.jit(jax.vmap(par.pack_signs))(x)
    np.testing.assert_array_equal(packed, np.stack([_numpy_pack(row) for row in x]))
    unpacked = _unpack(packed, x.shape[1])
    np.testing.assert_array_equal(unpacked, 2.0 * bits - 1)


@pytest.mark.parametrize("mode", ["error_feedback", "sign", "majority_vote"])
def test_onebit_step_applies_the_decoded_mean_and_keeps_the_residual_per_device(mode):
    # A model without BatchNorm, so each device's gradient is that of its own shard alone.
    model = L.Sequential(L.Dense(16), L.Tanh(), L.Dense(4))
    lr = 0.1
    tx = par.onebit_allreduce(dl.sgd(lr), mode=mode)
    loss_fn = ts.supervised_loss(model)
    mesh = par.data_mesh()
    state = ts.TrainState.create(model, tx, jax.random.key(2), (8,))
    step = par.make_sharded_train_step(loss_fn, tx, mesh)
    sharded = par.put_state(state, mesh)
    x, y = _data(2)
    residual = [np.zeros((D, *np.shape(p))) for p in jax.tree.leaves(state.params)]
    for i in range(2):
        params = [np.asarray(p, np.float64) for p in jax.tree.leaves(sharded.params)]
        # Each device's gradient on its own 16 examples, computed here on one device.
        grad_of = jax.grad(lambda p, xb, yb: loss_fn(p, {}, (xb, yb))[0])
        per_device = [
            jax.tree.leaves(grad_of(sharded.params, x[i][16 * d : 16 * (d + 1)], y[i][16 * d : 16 * (d + 1)]))
            for d in range(D)
        ]
        grads = [np.stack(leaf) for leaf in zip(*per_device)]
        sharded, metrics = _run(step, sharded, par.put_batch((x[i], y[i]), mesh))
        got_residual = jax.tree.leaves(sharded.opt_state.residual.value)
        for j, (p, g, e_old) in enumerate(zip(params, grads, residual)):
            pre = g + e_old if mode == "error_feedback" else g
            signs = np.where(np.signbit(pre.astype(np.float32)), -1.0, 1.0)
            scale = np.abs(pre).reshape(D, -1).mean(1).reshape(D, *[1] * (pre.ndim - 1))
            own = scale * signs  # what each device's message decodes to
            mean = np.sign(signs.sum(0)) if mode == "majority_vote" else own.mean(0)
            new_param = jax.tree.leaves(sharded.params)[j]
            np.testing.assert_allclose(new_param, p - lr * mean, rtol=1e-5, atol=1e-6)
            if mode == "error_feedback":
                e_new = np.asarray(got_residual[j])
                assert e_new.shape == (D, *p.shape)
                # g + e_old = decoded_own + e_new, on every device separately.
                np.testing.assert_allclose(g + e_old, own + e_new, rtol=1e-5, atol=1e-6)
                assert not np.allclose(e_new[0], e_new[1])
                residual[j] = e_new
            else:
                assert got_residual == []
        assert int(metrics["nonfinite"]) == 0


def test_onebit_nonfinite_gradient_on_one_device_skips_the_step_on_every_device():
    # d sqrt(|w b|)/dw at b = 0 is inf * 0 = NaN while the loss stays finite: only device 0's
    # gradient is non-finite. A NaN sign still packs to a bit, so without the shared flag the
    # other devices would apply the step and the replicas would diverge.
    def loss_fn(params, model_state, batch, key):
        return jnp.mean(jnp.sqrt(jnp.abs(batch * params["w"]))), (model_state, {})

    tx = par.onebit_allreduce(dl.sgd(0.1), mode="majority_vote")
    state = ts.TrainState(
        step=jnp.int32(0),
        params={"w": jnp.ones(3)},
        model_state={},
        opt_state=tx.init({"w": jnp.ones(3)}),
        key=jax.random.key(0),
    )
    batch = np.ones((D * 2, 3), np.float32)
    batch[0, 1] = 0.0  # device 0's shard
    pstate = par.replicate(state)
    new, metrics = _run(par.make_pmap_train_step(loss_fn, tx), pstate, par.shard_batch(batch, D))
    assert np.all(np.isfinite(metrics["loss"]))
    np.testing.assert_array_equal(metrics["nonfinite"], np.ones(D))
    np.testing.assert_array_equal(new.params["w"], pstate.params["w"])
    batch[0, 1] = 1.0
    new, metrics = _run(par.make_pmap_train_step(loss_fn, tx), pstate, par.shard_batch(batch, D))
    np.testing.assert_array_equal(metrics["nonfinite"], np.zeros(D))
    np.testing.assert_allclose(new.params["w"], np.full((D, 3), 0.9), rtol=1e-6)


def _mnist(flat=True):
    ds = dl.data.load_dataset("mnist5k")
    return [(s.x.reshape(len(s.x), -1), s.y) for s in (ds.train, ds.test)]


@pytest.mark.slow
def test_onebit_error_feedback_trains_mnist5k_to_within_half_a_point_of_full_precision():
    (x, y), (x_test, y_test) = _mnist()
    model = L.Sequential(L.Dense(128, use_bias=False), L.BatchNorm(axis_name="batch"), L.Relu(), L.Dense(10))
    loss_fn = ts.supervised_loss(model)
    evaluate = ts.make_eval_step(loss_fn)
    mesh = par.data_mesh()

    def train(tx, epochs=10):  # an epoch (27 steps) per call of the sharded loop
        state = par.put_state(ts.TrainState.create(model, tx, jax.random.key(0), (784,)), mesh)
        loop = par.make_sharded_train_loop(loss_fn, tx, mesh)
        for epoch in range(epochs):
            for block in dl.data.batch_blocks(x, y, 128, 27, jax.random.key(1), epoch):
                state, _ = _run(loop, state, par.put_batch(block, mesh, batch_axis=1))
        return float(evaluate(state, (x_test, y_test))["accuracy"])

    full = train(dl.sgd(0.05, momentum=0.9))
    onebit = train(par.onebit_allreduce(dl.sgd(0.05, momentum=0.9)))
    print(f"mnist5k test accuracy: full precision {full:.3f}, one-bit with error feedback {onebit:.3f}")
    assert full > 0.9
    assert onebit >= full - 0.005


# ----------------------------------------------------------------------------- collective bytes


def test_collective_bytes_counts_the_operands_of_each_collective():
    mesh = par.data_mesh()

    def body(a, b, c):
        return (
            lax.psum(a, "batch"),
            lax.all_gather(b, "batch"),
            lax.psum_scatter(c, "batch", tiled=True),
            lax.ppermute(a, "batch", [(i, (i + 1) % D) for i in range(D)]),
        )

    f = jax.jit(
        jax.shard_map(
            body, mesh=mesh, in_specs=P(), out_specs=(P(), P(), P("batch"), P("batch")), check_vma=False
        )
    )
    args = (jnp.ones(1000, jnp.float32), jnp.ones(10, jnp.uint32), jnp.ones(16, jnp.float32))
    got = par.collective_bytes(f.lower(*args))
    assert got["all-reduce"] == 4000 and got["all-gather"] == 40
    assert got["reduce-scatter"] == 64 and got["collective-permute"] == 4000
    assert got["total"] == 8104
    assert par.collective_bytes(f.lower(*args).compile()) == got

    text = """
  %p.1 = f32[256,4]{1,0} parameter(0)
  %p.2 = s8[100]{0} parameter(1)
  %ars = (f32[256,4]{1,0}, s8[100]{0}) all-reduce-start(%p.1, %p.2), channel_id=3, to_apply=%add
  %ard = (f32[256,4]{1,0}, s8[100]{0}) all-reduce-done(%ars)
  ROOT %a2a = s8[100]{0} all-to-all(%p.2), dimensions={0}
"""
    got = par.collective_bytes(text)
    assert got["all-reduce"] == 256 * 4 * 4 + 100 and got["all-to-all"] == 100


def _big_model():
    # 1.25M parameters; BatchNorm on a 256-wide layer (its statistics are exchanged in fp32).
    return L.Sequential(
        L.Dense(256, use_bias=False),
        L.BatchNorm(axis_name="batch"),
        L.Relu(),
        L.Dense(2048),
        L.Relu(),
        L.Dense(256),
        L.Relu(),
        L.Dense(10),
    )


@pytest.mark.slow
def test_onebit_step_exchanges_at_most_a_thirtieth_of_the_fp32_all_reduce_bytes():
    model = _big_model()
    mesh = par.data_mesh()
    x = np.random.default_rng(0).normal(size=(64, 784)).astype(np.float32)
    y = np.arange(64) % 10
    batch = par.put_batch((x, y), mesh)
    loss_fn = ts.supervised_loss(model)
    total = {}
    for name, tx in (("fp32", dl.sgd(0.1)), ("onebit", par.onebit_allreduce(dl.sgd(0.1)))):
        state = par.put_state(ts.TrainState.create(model, tx, jax.random.key(0), (784,)), mesh)
        step = par.make_sharded_train_step(loss_fn, tx, mesh)
        _run(step, state, batch)
        total[name] = par.collective_bytes(step.lower(state, batch))
        if name == "fp32":
            n = sum(p.size for p in jax.tree.leaves(state.params))
    assert n >= 1_000_000
    print(f"{n} params; bytes per device per step: fp32 {total['fp32']}, one-bit {total['onebit']}")
    assert total["fp32"]["all-reduce"] >= 4 * n and total["fp32"]["all-gather"] == 0
    leaves = jax.tree.leaves(state.params)
    assert total["onebit"]["all-gather"] == sum(4 * -(-p.size // 32) for p in leaves) + 4 * (len(leaves) + 1)
    assert total["onebit"]["total"] * 30 <= total["fp32"]["total"]


# ----------------------------------------------------------------------------- placement


def test_shard_batch_defaults_to_the_local_device_count_like_flax_common_utils_shard():
    from flax.training.common_utils import shard

    assert jax.local_device_count() == D
    batch = {"x": np.arange(48.0).reshape(8, 6), "y": np.arange(8)}
    got = par.shard_batch(batch)
    assert got["x"].shape == (D, 2, 6)
    for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(shard(batch))):
        np.testing.assert_array_equal(a, b)
    with pytest.raises(ValueError, match=r"6 examples does not split evenly over 4 devices"):
        par.shard_batch(np.zeros((6, 2)))


def test_put_batch_along_axis_1_shards_each_stacked_batch_over_the_devices():
    mesh = par.data_mesh()
    x, y = np.arange(3 * 8 * 2.0).reshape(3, 8, 2), np.arange(24).reshape(3, 8)
    xb, yb = par.put_batch((x, y), mesh, batch_axis=1)
    assert xb.shape == (3, 8, 2) and xb.sharding.spec == P(None, "batch")
    for shard in xb.addressable_shards:
        d = mesh.devices.tolist().index(shard.device)
        np.testing.assert_array_equal(shard.data, x[:, 2 * d : 2 * (d + 1)])
    np.testing.assert_array_equal(yb, y)
    with pytest.raises(ValueError, match=r"10 examples does not split evenly over 4 devices"):
        par.put_batch(np.zeros((3, 10)), mesh, batch_axis=1)
    with pytest.raises(
        ValueError, match=r"disagree on the number of stacked batches: \[0\] has 3, \[1\] has 2"
    ):
        par.put_batch((np.zeros((3, 8)), np.zeros((2, 8))), mesh, batch_axis=1)
    with pytest.raises(ValueError, match=r"batch leaf \[1\] has shape \(8,\); every leaf needs axes \(K"):
        par.put_batch((np.zeros((3, 8)), np.zeros(8)), mesh, batch_axis=1)
    with pytest.raises(ValueError, match=r"batch_axis=2; expected 0 .* or 1"):
        par.put_batch(x, mesh, batch_axis=2)


@pytest.mark.parametrize("batch_axis", [0, 1])
def test_put_batch_moves_a_device_array_without_a_round_trip_through_the_host(batch_axis):
    mesh = par.data_mesh()
    host = np.random.default_rng(0).normal(size=(2, 8, 3)).astype(np.float32)
    host = host[0] if batch_axis == 0 else host
    prefetched = jax.device_put(host, jax.devices()[0])  # e.g. from a prefetch queue
    # The old put_batch called np.asarray on it: a device-to-host copy, which this guard refuses.
    with jax.transfer_guard_device_to_host("disallow"):
        placed = par.put_batch(prefetched, mesh, batch_axis=batch_axis)
        jax.block_until_ready(placed)
    assert placed.sharding.spec == P(*[None] * batch_axis, "batch")
    np.testing.assert_array_equal(placed, host)


# ----------------------------------------------------------------------------- scan-fused sharded loop


def test_sharded_loop_equals_sharded_steps_and_single_device_steps_on_the_global_batches():
    # Adam only: the loop carries any optimizer state the same way (SGD with momentum, under the
    # one-bit wrapper, in the next test); the steps test above runs both optimizers.
    tx, steps = dl.adam(1e-2), 4
    x, y = _data(steps)
    reference = ts.TrainState.create(_mlp(None), tx, jax.random.key(1), (8,))
    ref_step = ts.make_train_step(ts.supervised_loss(_mlp(None)), tx)
    mesh = par.data_mesh()
    loss_fn = ts.supervised_loss(_mlp("batch"))
    sharded_step = par.make_sharded_train_step(loss_fn, tx, mesh)
    loop = par.make_sharded_train_loop(loss_fn, tx, mesh)
    sharded = par.put_state(reference, mesh)
    looped, m_loop = _run(loop, sharded, par.put_batch((x, y), mesh, batch_axis=1))
    ref_metrics = []
    for i in range(steps):
        reference, m_ref = ref_step(reference, (x[i], y[i]))
        sharded, m_step = _run(sharded_step, sharded, par.put_batch((x[i], y[i]), mesh))
        ref_metrics.append(m_ref)
        for name in ("loss", "grad_norm", "update_ratio", "accuracy"):
            np.testing.assert_allclose(m_loop[name][i], m_step[name], rtol=1e-5, err_msg=name)
            np.testing.assert_allclose(m_loop[name][i], m_ref[name], rtol=1e-5, err_msg=name)

    assert m_loop["loss"].shape == (steps,) and m_loop["loss"].sharding.is_fully_replicated
    assert not np.allclose(m_loop["loss"][0], m_loop["loss"][-1])  # the steps really differ
    assert int(looped.step) == steps
    assert not np.allclose(reference.model_state["batchnorm_1"]["mean"], 0.0)
    for other in (sharded, reference):
        a_leaves = jax.tree.leaves((looped.params, looped.model_state, looped.opt_state))
        b_leaves = jax.tree.leaves((other.params, other.model_state, other.opt_state))
        assert len(a_leaves) == len(b_leaves)
        for a, b in zip(a_leaves, b_leaves):
            np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)


def test_sharded_loop_carries_dropout_keys_and_the_onebit_residual_like_single_sharded_steps():
    # Dropout: step k draws from fold_in(fold_in(key, k), device) in both; one-bit: the per-device
    # residual (P(axis)) is carried through the scan.
    model = L.Sequential(L.Dense(16), L.BatchNorm(axis_name="batch"), L.Relu(), L.Dropout(0.5), L.Dense(4))
    tx = par.onebit_allreduce(dl.sgd(0.1, momentum=0.9))
    mesh = par.data_mesh()
    loss_fn = ts.supervised_loss(model)
    state = par.put_state(ts.TrainState.create(model, tx, jax.random.key(3), (8,)), mesh)
    x, y = _data(3)
    looped, m_loop = _run(
        par.make_sharded_train_loop(loss_fn, tx, mesh), state, par.put_batch((x, y), mesh, batch_axis=1)
    )
    step = par.make_sharded_train_step(loss_fn, tx, mesh)
    for i in range(3):
        state, m = _run(step, state, par.put_batch((x[i], y[i]), mesh))
        np.testing.assert_allclose(m_loop["loss"][i], m["loss"], rtol=1e-5)
    residual = jax.tree.leaves(looped.opt_state.residual.value)
    assert residual[0].shape[0] == D and not np.allclose(residual[0][0], residual[0][1])
    for a, b in zip(
        jax.tree.leaves((looped.params, looped.opt_state)), jax.tree.leaves((state.params, state.opt_state))
    ):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)


def test_sharded_loop_refuses_uneven_batches_unplaced_state_and_unsynced_batchnorm():
    mesh = par.data_mesh()
    tx = par.onebit_allreduce(dl.sgd(0.1))
    model = _mlp()
    state = ts.TrainState.create(model, tx, jax.random.key(0), (8,))
    loop = par.make_sharded_train_loop(ts.supervised_loss(model), tx, mesh)
    x, y = _data(2, n=30)
    with pytest.raises(
        ValueError,
        match=r"make_sharded_train_loop: the global batch of 30 examples "
        r"does not split evenly over 4 devices",
    ):
        loop(par.put_state(state, mesh), (x, y))
    x, y = _data(2)
    with pytest.raises(ValueError, match=r"per-device state leaf \.opt_state\.residual.*put_state"):
        loop(state, (x, y))
    with pytest.raises(ValueError, match=r"batch leaf \[1\] has shape \(64,\); every leaf needs axes"):
        loop(par.put_state(state, mesh), (x[0], y[0]))
    unsynced = _mlp(None)
    plain = ts.TrainState.create(unsynced, dl.sgd(0.1), jax.random.key(0), (8,))
    with pytest.raises(ValueError, match=r"diverge across replicas.*axis_name='batch'"):
        par.make_sharded_train_loop(ts.supervised_loss(unsynced), dl.sgd(0.1), mesh)(
            par.put_state(plain, mesh), par.put_batch((x, y), mesh, batch_axis=1)
        )
    with pytest.raises(ValueError, match="exchanges gradients over axis_name='data'"):
        par.make_sharded_train_loop(
            ts.supervised_loss(model), par.onebit_allreduce(dl.sgd(0.1), "data"), mesh
        )
    with pytest.raises(TypeError, match="mesh must be a jax.sharding.Mesh"):
        par.make_sharded_train_loop(ts.supervised_loss(model), tx, "batch")


def test_sharded_loop_lowers_to_one_program_whose_collectives_are_the_steps():
    model = L.Sequential(L.Dense(16), L.Relu(), L.Dense(4))
    tx = dl.sgd(0.1)
    mesh = par.data_mesh()
    loss_fn = ts.supervised_loss(model)
    state = par.put_state(ts.TrainState.create(model, tx, jax.random.key(0), (8,)), mesh)
    x, y = _data(5)
    one = par.collective_bytes(
        par.make_sharded_train_step(loss_fn, tx, mesh).lower(state, par.put_batch((x[0], y[0]), mesh))
    )
    block = par.collective_bytes(
        par.make_sharded_train_loop(loss_fn, tx, mesh).lower(state, par.put_batch((x, y), mesh, batch_axis=1))
    )
    n = sum(p.size for p in jax.tree.leaves(state.params))
    # The scan body holds one step's collectives (run K times): the gradient all-reduce included.
    assert one["all-reduce"] >= 4 * n and block["all-reduce"] == one["all-reduce"]


# ----------------------------------------------------------------------------- module layout


def test_parallel_steps_are_its_public_names_and_are_documented():
    # The direction of imports (train_step never imports parallel): tests/test_imports.py.
    for name in ("make_pmap_train_step", "make_sharded_train_step", "make_sharded_train_loop"):
        assert getattr(dl, name) is getattr(par, name) is getattr(par.steps, name)
    for name in par.__all__:
        assert getattr(par, name).__doc__, name


def test_data_parallel_steps_refuse_a_batch_of_strings_by_name():
    model = L.Sequential(L.Dense(4))
    loss_fn, tx = ts.supervised_loss(model), dl.sgd(0.1)
    state = ts.TrainState.create(model, tx, jax.random.key(0), (3,))
    x, y = np.full((4, 3), "a"), np.zeros(4, np.int32)
    mesh = par.data_mesh(2)
    with pytest.raises(
        TypeError, match=r"make_sharded_train_step: batch\[0\] must be an array of numbers, got dtype <U1"
    ):
        par.make_sharded_train_step(loss_fn, tx, mesh)(par.put_state(state, mesh), (x, y))
    with pytest.raises(
        TypeError, match=r"make_pmap_train_step: batch\[0\] must be an array of numbers, got dtype <U1"
    ):
        par.make_pmap_train_step(loss_fn, tx, devices=2)(
            par.replicate(state, 2), (x.reshape(2, 2, 3), y.reshape(2, 2))
        )
