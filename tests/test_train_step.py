"""TrainState, jit train/eval steps and scan-fused loops."""

import re

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import jaxdl as dl
from jaxdl import layers as L
from jaxdl import train_step as ts


def _data(n=128, d=8, classes=4, seed=0):
    kx, kw = jax.random.split(jax.random.key(seed))
    x = jax.random.normal(kx, (n, d))
    w = jax.random.normal(kw, (d, classes))
    return x, jnp.argmax(x @ w, axis=-1).astype(jnp.int32)


def _mlp(dropout=0.1, bias_before_bn=False):
    return L.Sequential(
        L.Dense(32, use_bias=bias_before_bn),
        L.BatchNorm(),
        L.Relu(),
        L.Dropout(dropout),
        L.Dense(32),
        L.Relu(),
        L.Dense(4),
    )


def _leaves_equal(a, b):
    la, lb = jax.tree.leaves(a), jax.tree.leaves(b)
    return len(la) == len(lb) and all(
        np.array_equal(
            jax.random.key_data(x) if jnp.issubdtype(x.dtype, jax.dtypes.prng_key) else x,
            jax.random.key_data(y) if jnp.issubdtype(y.dtype, jax.dtypes.prng_key) else y,
        )
        for x, y in zip(la, lb)
    )


def test_train_state_is_a_pytree_built_from_model_and_optimizer():
    model, tx = _mlp(), dl.adam(1e-3)
    state = ts.TrainState.create(model, tx, jax.random.key(0), (8,))
    _, params, model_state = model.init(jax.random.split(jax.random.key(0))[0], (8,))
    assert _leaves_equal(state.params, params) and _leaves_equal(state.model_state, model_state)
    assert jax.tree.structure(state.opt_state) == jax.tree.structure(tx.init(params))
    assert int(state.step) == 0 and state.input_shape == (8,)
    doubled = jax.tree.map(lambda x: x, state)
    assert isinstance(doubled, ts.TrainState) and doubled.input_shape == (8,)


def test_step_metrics_match_independent_computation():
    model = L.Sequential(L.Dense(16), L.Tanh(), L.Dense(4))
    lr = 0.05
    state = ts.TrainState.create(model, dl.sgd(lr), jax.random.key(1), (8,))
    loss_fn = ts.supervised_loss(model)
    x, y = _data()
    new, m = ts.make_train_step(loss_fn, dl.sgd(lr))(state, (x, y))

    def ref_loss(p):
        logits, _ = model.apply(p, {}, x)
        return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()

    loss, g = jax.value_and_grad(ref_loss)(state.params)
    gnorm = np.sqrt(sum(float(jnp.sum(v**2)) for v in jax.tree.leaves(g)))
    pnorm = np.sqrt(sum(float(jnp.sum(v**2)) for v in jax.tree.leaves(state.params)))
    np.testing.assert_allclose(m["loss"], loss, rtol=1e-6)
    np.testing.assert_allclose(m["grad_norm"], gnorm, rtol=1e-5)
    np.testing.assert_allclose(m["update_ratio"], lr * gnorm / pnorm, rtol=1e-5)
    logits, _ = model.apply(state.params, {}, x)
    np.testing.assert_allclose(m["accuracy"], np.mean(np.argmax(logits, -1) == y), rtol=1e-6)
    assert int(m["nonfinite"]) == 0 and int(new.step) == 1
    for a, b, gg in zip(jax.tree.leaves(new.params), jax.tree.leaves(state.params), jax.tree.leaves(g)):
        np.testing.assert_allclose(a, b - lr * gg, rtol=1e-5, atol=1e-7)


def test_key_is_split_every_step_so_dropout_never_repeats():
    seen = []

    def loss_fn(params, model_state, batch, key, train=True):
        mask = jax.random.bernoulli(key, 0.5, (64,))
        return jnp.sum(params["w"] ** 2), (model_state, {"mask": mask})

    state = ts.TrainState(
        step=jnp.int32(0),
        params={"w": jnp.ones(3)},
        model_state={},
        opt_state=dl.sgd(0.1).init({"w": jnp.ones(3)}),
        key=jax.random.key(0),
    )
    step = ts.make_train_step(loss_fn, dl.sgd(0.1))
    for _ in range(4):
        state, m = step(state, None)
        seen.append(np.asarray(m["mask"]))
    assert all(not np.array_equal(seen[i], seen[j]) for i in range(4) for j in range(i))


def test_batchnorm_state_flows_and_eval_uses_running_statistics():
    model = _mlp(dropout=0.0)
    state = ts.TrainState.create(model, dl.sgd(0.1), jax.random.key(2), (8,))
    loss_fn = ts.supervised_loss(model)
    x, y = _data()
    new, _ = ts.make_train_step(loss_fn, dl.sgd(0.1))(state, (x, y))
    # One step of running = 0.9 * 0 + 0.1 * batch mean of the first Dense's output.
    h, _ = model.layers[0].apply(state.params["dense_0"], {}, x)
    np.testing.assert_allclose(new.model_state["batchnorm_1"]["mean"], 0.1 * h.mean(0), rtol=1e-5, atol=1e-7)

    before = jax.tree.map(jnp.copy, new)
    metrics = ts.make_eval_step(loss_fn)(new, (x, y))
    assert _leaves_equal(before, new)
    logits, _ = model.apply(new.params, new.model_state, x, train=False)
    np.testing.assert_allclose(metrics["loss"], dl.losses.softmax_cross_entropy(logits, y), rtol=1e-6)


@pytest.mark.parametrize("bad", [np.nan, np.inf])
def test_nonfinite_gradient_leaves_state_unchanged_and_is_counted(bad):
    model = _mlp(dropout=0.0)
    tx = dl.adam(1e-2)
    state = ts.TrainState.create(model, tx, jax.random.key(3), (8,))
    x, y = _data()
    step = ts.make_train_step(ts.supervised_loss(model), tx)
    state, _ = step(state, (x, y))
    x_bad = x.at[3, 2].set(bad)
    new, m = step(state, (x_bad, y))
    assert int(m["nonfinite"]) == 1
    assert _leaves_equal(new.params, state.params)
    assert _leaves_equal(new.model_state, state.model_state)
    assert _leaves_equal(new.opt_state, state.opt_state)
    assert int(new.step) == int(state.step) + 1
    after, m2 = step(new, (x, y))
    assert int(m2["nonfinite"]) == 0 and np.isfinite(float(m2["loss"]))

    unsafe = ts.make_train_step(ts.supervised_loss(model), tx, skip_nonfinite=False)
    broken, _ = unsafe(state, (x_bad, y))
    assert not all(np.all(np.isfinite(v)) for v in jax.tree.leaves(broken.params))


def test_skip_keeps_the_state_when_only_the_update_is_nonfinite_and_matches_the_unskipped_step():
    # The skip's select takes the optimizer's new state from a second trace of its update
    # (_state_to_keep). Finite gradients that the optimizer turns into a NaN update (a NaN
    # learning rate) must still leave params and Adam's moments and count as they were; on a
    # finite step the state must be the unskipped step's, bit for bit, and optax's.
    model = L.Sequential(L.Dense(16), L.Relu(), L.Dense(4))
    x, y = _data()
    lr = optax.inject_hyperparams(optax.adam)(learning_rate=1e-2)
    state = ts.TrainState.create(model, lr, jax.random.key(5), (8,))
    loss_fn = ts.supervised_loss(model)
    safe, unsafe = ts.make_train_step(loss_fn, lr), ts.make_train_step(loss_fn, lr, skip_nonfinite=False)
    one, m = safe(state, (x, y))
    two, _ = unsafe(state, (x, y))
    assert int(m["nonfinite"]) == 0
    assert _leaves_equal((one.params, one.opt_state), (two.params, two.opt_state))
    grads = jax.jit(jax.grad(lambda p: loss_fn(p, state.model_state, (x, y), None)[0]))(state.params)
    u, ref = optax.adam(1e-2).update(grads, optax.adam(1e-2).init(state.params), state.params)
    for a, b in zip(jax.tree.leaves(one.opt_state.inner_state), jax.tree.leaves(ref)):
        np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-9)
    for a, b in zip(jax.tree.leaves(one.params), jax.tree.leaves(optax.apply_updates(state.params, u))):
        np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7)

    one.opt_state.hyperparams["learning_rate"] = jnp.float32(jnp.nan)
    new, m = safe(one, (x, y))
    assert int(m["nonfinite"]) == 1 and np.isfinite(float(m["grad_norm"]))
    assert _leaves_equal((new.params, new.opt_state.inner_state), (one.params, one.opt_state.inner_state))
    assert int(new.opt_state.count) == int(one.opt_state.count)


@pytest.mark.xfail(
    jax.__version_info__ >= (0, 11),
    reason="XLA:CPU of jaxlib 0.11+ copies every donated parameter at the start of the step (the "
    "ordering that keeps jaxlib 0.10 from copying no longer does; benchmarks/RESULTS.md)",
    strict=True,
)
def test_compiled_steps_copy_no_parameter_and_the_skip_adds_no_kernel_per_moment():
    # Issue 14: the donated loop (what fit runs) and the donated step update params and Adam's
    # moments in place, and the NaN/Inf skip fuses into the update: the compiled program has
    # no copy of any parameter-shaped array, and no more fusions than the step without the skip
    # but for a couple of scalar ones (before: two more per moment leaf).
    model = L.Sequential(L.Dense(24), L.Relu(), L.Dense(24), L.Relu(), L.Dense(4))
    tx = dl.adam(1e-3)
    state = ts.TrainState.create(model, tx, jax.random.key(0), (8,))
    loss_fn = ts.supervised_loss(model)
    x, y = _data(n=96)
    shapes = {tuple(p.shape) for p in jax.tree.leaves(state.params)}

    def compiled(maker, skip, batch):
        text = maker(loss_fn, tx, donate=True, skip_nonfinite=skip).lower(state, batch).compile().as_text()
        copied = [
            tuple(int(d) for d in dims.split(",") if d)
            for dims in re.findall(r"= f32\[([0-9,]*)\][^ ]* copy\(", text)
        ]
        return copied, len(re.findall(r"^\s*(?:ROOT )?\S+ = \S+ fusion\(", text, re.M))

    blocks = (x.reshape(3, 32, 8), y.reshape(3, 32))
    copied, fusions = compiled(ts.make_train_loop, True, blocks)
    assert not shapes & set(copied), copied
    assert fusions <= compiled(ts.make_train_loop, False, blocks)[1] + 2
    copied, _ = compiled(ts.make_train_step, True, (x, y))  # the step's fusions follow the loop's
    assert not shapes & set(copied), copied


def test_scan_loop_ends_in_the_same_state_as_single_steps():
    model = _mlp(dropout=0.2)
    tx = dl.chain(dl.add_noise(0.01, key=1), dl.adam(1e-2))
    state = ts.TrainState.create(model, tx, jax.random.key(4), (8,))
    loss_fn = ts.supervised_loss(model)
    x, y = _data(n=160)
    k = 5
    xs, ys = x.reshape(k, 32, 8), y.reshape(k, 32)
    step = ts.make_train_step(loss_fn, tx)
    single, losses = state, []
    for i in range(k):
        single, m = step(single, (xs[i], ys[i]))
        losses.append(float(m["loss"]))
    looped, metrics = ts.make_train_loop(loss_fn, tx)(state, (xs, ys))
    assert metrics["loss"].shape == (k,)
    np.testing.assert_allclose(metrics["loss"], losses, rtol=1e-6)
    np.testing.assert_array_equal(jax.random.key_data(looped.key), jax.random.key_data(single.key))
    assert int(looped.step) == k
    for a, b in zip(
        jax.tree.leaves((looped.params, looped.model_state, looped.opt_state)),
        jax.tree.leaves((single.params, single.model_state, single.opt_state)),
    ):
        if jnp.issubdtype(a.dtype, jax.dtypes.prng_key):
            a, b = jax.random.key_data(a), jax.random.key_data(b)
        np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7)


def test_scan_loop_update_ratio_uses_the_norm_of_the_params_before_each_step():
    # The loop carries |params| from one step to the next (scan_steps); checked against
    # |p_{t+1} - p_t| / |p_t| from single steps' params in numpy, across a skipped NaN step.
    model = _mlp(dropout=0.0)
    tx = dl.adam(1e-2)
    state = ts.TrainState.create(model, tx, jax.random.key(3), (8,))
    loss_fn = ts.supervised_loss(model)
    x, y = _data(n=128)
    k = 4
    xs, ys = np.array(x).reshape(k, 32, 8), np.asarray(y).reshape(k, 32)
    xs[1, 0, 0] = np.nan
    looped, metrics = ts.make_train_loop(loss_fn, tx)(state, (xs, ys))
    flat = [np.concatenate([np.ravel(v) for v in jax.tree.leaves(state.params)]).astype(np.float64)]
    step = ts.make_train_step(loss_fn, tx)
    single = state
    for i in range(k):
        single, _ = step(single, (xs[i], ys[i]))
        flat.append(np.concatenate([np.ravel(v) for v in jax.tree.leaves(single.params)]).astype(np.float64))
    expected = [np.linalg.norm(flat[i + 1] - flat[i]) / np.linalg.norm(flat[i]) for i in range(k)]
    np.testing.assert_array_equal(metrics["nonfinite"], [0, 1, 0, 0])
    assert np.isnan(metrics["update_ratio"][1])  # the skipped step's update held a NaN
    for i in (0, 2, 3):
        np.testing.assert_allclose(metrics["update_ratio"][i], expected[i], rtol=1e-4)
    np.testing.assert_allclose(flat[2], flat[1])  # the NaN step left the params as they were


def test_tree_norm_is_the_global_norm():
    rng = np.random.default_rng(0)
    tree = {
        "big": jnp.asarray(rng.normal(size=(200, 100)), jnp.float32),  # one dot of its own
        "small": [jnp.asarray(rng.normal(size=(7,)), jnp.float32), jnp.ones((3, 3), jnp.bfloat16)],
        "count": jnp.arange(4, dtype=jnp.int32),
    }
    ref = np.sqrt(sum(np.sum(np.asarray(v, np.float64) ** 2) for v in jax.tree.leaves(tree)))
    np.testing.assert_allclose(ts.tree_norm(tree), ref, rtol=1e-6)
    assert ts.tree_norm({}) == 0.0
    z = {"w": jnp.array([3 + 4j, 1j], jnp.complex64)}
    np.testing.assert_allclose(ts.tree_norm(z), optax.tree.norm(z), rtol=1e-6)  # |z|^2 = z conj(z)
    assert np.isinf(ts.tree_norm({"a": jnp.array([jnp.inf, 1.0])}))
    assert np.isnan(ts.tree_norm({"a": jnp.array([jnp.nan, 1.0]), "b": jnp.ones(20000)}))
    assert np.isinf(ts.tree_norm({"a": jnp.full(3, 1e20)}))  # squares beyond float32 count as overflow


def test_step_works_with_optax_transforms():
    # optax.flatten (the moments in one vector: the README's trade for models of many small
    # leaves) goes through the same step, its skip included.
    model = _mlp(dropout=0.0)
    x, y = _data()
    ours = dl.adam(1e-2)
    theirs = optax.adam(1e-2)
    flat = optax.flatten(dl.adam(1e-2))
    s1 = ts.TrainState.create(model, ours, jax.random.key(5), (8,))
    s2 = ts.TrainState.create(model, theirs, jax.random.key(5), (8,))
    s3 = ts.TrainState.create(model, flat, jax.random.key(5), (8,))
    step1 = ts.make_train_step(ts.supervised_loss(model), ours)
    step2 = ts.make_train_step(ts.supervised_loss(model), theirs)
    step3 = ts.make_train_step(ts.supervised_loss(model), flat)
    for _ in range(5):
        s1, _ = step1(s1, (x, y))
        s2, _ = step2(s2, (x, y))
        s3, _ = step3(s3, (x, y))
    for a, b, c in zip(jax.tree.leaves(s1.params), jax.tree.leaves(s2.params), jax.tree.leaves(s3.params)):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(c, b, rtol=1e-5, atol=1e-6)
    kept, metrics = step3(s3, (x.at[0, 0].set(jnp.nan), y))
    assert int(metrics["nonfinite"]) == 1
    assert _leaves_equal((kept.params, kept.opt_state), (s3.params, s3.opt_state))


class _FlaxMLP(nn.Module):
    @nn.compact
    def __call__(self, x, train: bool = False):
        x = nn.Dense(16)(x)
        x = nn.BatchNorm(use_running_average=not train, momentum=0.9)(x)
        return nn.Dense(4)(nn.relu(x))


def test_step_trains_a_model_wrapped_from_flax():
    model = L.from_flax(_FlaxMLP())
    tx = dl.adam(1e-2)
    state = ts.TrainState.create(model, tx, jax.random.key(6), (8,))
    x, y = _data()
    step = ts.make_train_step(ts.supervised_loss(model), tx)
    first = None
    for _ in range(30):
        state, m = step(state, (x, y))
        first = first if first is not None else float(m["loss"])
    assert float(m["loss"]) < 0.5 * first
    assert not np.allclose(state.model_state["batch_stats"]["BatchNorm_0"]["mean"], 0.0)


def _train_to_accuracy(tx, steps=150):
    model = L.Sequential(
        L.Dense(64), L.BatchNorm(), L.Relu(), L.Dropout(0.1), L.Dense(64), L.Relu(), L.Dense(4)
    )
    x, y = _data(n=256, seed=7)
    state = ts.TrainState.create(model, tx, jax.random.key(8), (8,))
    loss_fn = ts.supervised_loss(model)
    loop = ts.make_train_loop(loss_fn, tx)
    batches = (jnp.broadcast_to(x, (steps, *x.shape)), jnp.broadcast_to(y, (steps, *y.shape)))
    state, _ = loop(state, batches)
    return float(ts.make_eval_step(loss_fn)(state, (x, y))["accuracy"])


def test_end_to_end_mlp_with_batchnorm_and_dropout_reaches_full_training_accuracy_with_adam():
    assert _train_to_accuracy(dl.adam(1e-2)) >= 0.99


def test_end_to_end_with_a_hand_built_chain():
    tx = dl.chain(
        dl.clip_by_global_norm(1.0),
        dl.add_noise(0.001, key=3),
        dl.momentum(0.9),
        dl.scale_by_learning_rate(0.05),
    )
    assert _train_to_accuracy(tx) >= 0.99


def test_compiles_once_for_same_shaped_batches_and_schedule_values():
    traces = []
    model = L.Sequential(L.Dense(8), L.Relu(), L.Dense(4))
    base = ts.supervised_loss(model)

    def loss_fn(params, model_state, batch, key, train=True):
        traces.append(1)
        return base(params, model_state, batch, key, train=train)

    tx = optax.inject_hyperparams(dl.sgd)(lr=0.1, momentum=0.9)
    state = ts.TrainState.create(model, tx, jax.random.key(9), (8,))
    step = ts.make_train_step(loss_fn, tx)
    x, y = _data()
    for i in range(4):
        state, _ = step(state, (x + i, y))
    assert len(traces) == 1
    state.opt_state.hyperparams["lr"] = jnp.asarray(0.01, jnp.float32)
    state, _ = step(state, (x, y))
    assert len(traces) == 1, "changing the learning rate value recompiled the step"
    sched_tx = dl.sgd(dl.schedules.cosine_decay(0.1, 10))
    s2 = ts.TrainState.create(model, sched_tx, jax.random.key(9), (8,))
    step2 = ts.make_train_step(loss_fn, sched_tx)
    for _ in range(3):
        s2, _ = step2(s2, (x, y))
    assert len(traces) == 2


def test_batch_of_the_wrong_shape_names_expected_and_received():
    model = L.Sequential(L.Dense(8), L.Relu(), L.Dense(4))
    state = ts.TrainState.create(model, dl.sgd(0.1), jax.random.key(0), (784,))
    step = ts.make_train_step(ts.supervised_loss(model), dl.sgd(0.1))
    with pytest.raises(ValueError, match=r"\(32, 783\).*input_shape \(784,\)"):
        step(state, (jnp.zeros((32, 783)), jnp.zeros(32, jnp.int32)))
    with pytest.raises(ValueError, match=r"input_shape \(784,\)"):
        ts.make_eval_step(ts.supervised_loss(model))(
            state, (jnp.zeros((32, 28, 28)), jnp.zeros(32, jnp.int32))
        )


@pytest.mark.parametrize("bad", [-1, 4, -5])
def test_labels_out_of_range_are_an_error_outside_jit_and_a_skipped_step_inside(bad):
    with pytest.raises(ValueError, match=rf"labels=\[{bad}\] is out of range; expected .* in \[0, 4\)"):
        ts.check_labels(np.array([0, 3, bad]), 4)
    ts.check_labels(np.array([0, 3]), 4)
    model = L.Sequential(L.Dense(4))
    state = ts.TrainState.create(model, dl.sgd(0.1), jax.random.key(0), (8,))
    new, m = ts.make_train_step(ts.supervised_loss(model), dl.sgd(0.1))(
        state, (jnp.ones((4, 8)), jnp.array([0, 1, 2, bad], jnp.int32))
    )
    assert int(m["nonfinite"]) == 1 and _leaves_equal(new.params, state.params)
    assert np.isnan(float(m["loss"]))


def test_state_for_another_model_or_optimizer_names_the_first_differing_path():
    model_a = L.Sequential(L.Dense(8), L.Relu(), L.Dense(4))
    model_b = L.Sequential(L.Dense(8), L.Relu(), L.Dense(8), L.Relu(), L.Dense(4))
    state_b = ts.TrainState.create(model_b, dl.sgd(0.1), jax.random.key(0), (8,))
    x, y = _data()
    with pytest.raises(ValueError, match=r"state.params .*\['dense_4'\]"):
        ts.make_train_step(ts.supervised_loss(model_a), dl.sgd(0.1))(state_b, (x, y))
    state_a = ts.TrainState.create(model_a, dl.sgd(0.1), jax.random.key(0), (8,))
    with pytest.raises(ValueError, match=r"state.opt_state .*\[0\]"):
        ts.make_train_step(ts.supervised_loss(model_a), dl.adam(0.1))(state_a, (x, y))


# ----------------------------------------------------------------------------- bad inputs (issue 22)


def _tiny():
    model = L.Sequential(L.Dense(4))
    return model, ts.TrainState.create(model, dl.sgd(0.1), jax.random.key(0), (3,))


@pytest.mark.parametrize(
    "args,error,match",
    [
        (
            dict(optimizer=dl.adam),
            TypeError,
            r"TrainState.create: optimizer must be an optax.GradientTransformation, got <function adam"
            r".*did you pass a constructor without calling it",
        ),
        (
            dict(model=dl.layers.Dense),
            TypeError,
            r"TrainState.create: model must be a layer object with init and apply \(.*\) or a flax.nnx.Module, got <class .*Dense.*did you mean Dense\(...\)\?",
        ),
        (
            dict(model="mlp"),
            TypeError,
            r"TrainState.create: model must be a layer object with init and apply \(.*\) or a flax.nnx.Module, got 'mlp' of type str",
        ),
        (
            dict(key="abc"),
            TypeError,
            r"TrainState.create: key must be an int seed or a jax.random.key, got 'abc'",
        ),
        (
            dict(input_shape="ab"),
            TypeError,
            r"TrainState.create: input_shape must be a tuple of ints, got 'ab'",
        ),
        (dict(input_shape=(3.0,)), TypeError, r"TrainState.create: input_shape must be a tuple of ints"),
        (dict(input_shape=(-3,)), ValueError, r"TrainState.create: input_shape=\(-3,\) is out of range"),
        (dict(input_shape=(0,)), ValueError, r"TrainState.create: input_shape=\(0,\) is out of range"),
        (
            dict(params_dtype=jnp.int32),
            TypeError,
            r"sgd: params leaf \['dense_0'\]\['w'\] must be a floating-point .* got dtype int32",
        ),
    ],
)
def test_train_state_create_refuses_bad_arguments_by_name(args, error, match):
    kw = dict(model=L.Sequential(L.Dense(4)), optimizer=dl.sgd(0.1), key=0, input_shape=(3,))
    dtype = args.pop("params_dtype", None)
    kw.update(args)
    if dtype is not None:
        kw["model"] = L.Sequential(L.Dense(4, w_init=lambda k, s, d=jnp.float32: jnp.zeros(s, dtype)))
    with pytest.raises(error, match=match):
        ts.TrainState.create(kw["model"], kw["optimizer"], kw["key"], kw["input_shape"])


@pytest.mark.parametrize(
    "batch,match",
    [
        (
            (np.full((2, 3), "a"), np.zeros(2, np.int32)),
            r"train step: batch\[0\] must be an array of numbers, got dtype <U1",
        ),
        (
            (np.ones((2, 3)), np.array(["0", "1"])),
            r"train step: batch\[1\] must be an array of numbers, got dtype <U1",
        ),
        (
            (np.ones((2, 3)), np.array([object(), 1])),
            r"train step: batch\[1\] must be an array of numbers, got dtype object",
        ),
        (
            {"x": np.ones((2, 3)), "y": np.zeros(2, np.int32)},
            r"supervised_loss: batch must be a pair \(x, y\), got a dict with keys \['x', 'y'\]",
        ),
        (
            (np.ones((2, 3)), np.zeros(2, np.int32), np.ones(2)),
            r"supervised_loss: batch must be a pair \(x, y\), got a tuple of 3 items",
        ),
    ],
)
def test_a_batch_that_is_not_a_pair_of_number_arrays_is_refused_by_name(batch, match):
    model, state = _tiny()
    loss_fn = ts.supervised_loss(model)
    with pytest.raises(TypeError, match=match):
        ts.make_train_step(loss_fn, dl.sgd(0.1))(state, batch)
    with pytest.raises(TypeError, match=match.replace("train step", "eval step")):
        ts.make_eval_step(loss_fn)(state, batch)
    stacked = jax.tree.map(lambda a: a[None], batch)
    with pytest.raises(TypeError, match=match.replace("train step: batch", r"train loop: batches")):
        ts.make_train_loop(loss_fn, dl.sgd(0.1))(state, stacked)


def test_steps_refuse_an_uncalled_optimizer_and_keep_the_jitted_functions_attributes():
    model, state = _tiny()
    for make in (ts.make_train_step, ts.make_train_loop):
        with pytest.raises(TypeError, match=rf"{make.__name__}: optimizer must be .*without calling it"):
            make(ts.supervised_loss(model), dl.sgd)
    step = ts.make_train_step(ts.supervised_loss(model), dl.sgd(0.1))
    batch = (jnp.ones((2, 3)), jnp.zeros(2, jnp.int32))
    assert "dot_general" in step.lower(state, batch).as_text()
