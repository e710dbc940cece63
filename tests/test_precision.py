"""Mixed precision (Policy: float32 master weights, bf16/fp16 compute) and loss scaling."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxdl as dl
from jaxdl import layers as L
from jaxdl import parallel
from jaxdl import precision as P
from jaxdl import train_step as ts
from jaxdl.checkpoint import restore_checkpoint, save_checkpoint

try:
    import torch
except ImportError:  # Python 3.12+: no torch; the tests marked `torch` skip (conftest.py)
    torch = None


def _data(n=32, d=6, classes=3, seed=0):
    rng = np.random.default_rng(seed)
    return rng.normal(size=(n, d)).astype(np.float32), rng.integers(0, classes, n).astype(np.int32)


def _mlp():
    return L.Sequential(L.Dense(8), L.Tanh(), L.Dense(3))


def _state(model, tx, shape=(6,), **kw):
    return ts.TrainState.create(model, tx, jax.random.key(0), shape, **kw)


def test_named_policies():
    bf16 = P.get_policy("bf16")
    assert (bf16.param_dtype, bf16.compute_dtype, bf16.output_dtype) == (
        jnp.float32,
        jnp.bfloat16,
        jnp.float32,
    )
    assert bf16 == dl.Policy(jnp.float32, jnp.bfloat16, jnp.float32)
    assert P.get_policy("fp16").compute_dtype == jnp.float16
    assert P.get_policy("fp32") is None and P.get_policy(None) is None


def test_bad_settings_are_refused_at_construction():
    loss, tx = ts.supervised_loss(_mlp()), dl.sgd(0.1)
    with pytest.raises(
        ValueError, match=r"make_train_step: precision='int8' is unknown; expected one of fp32, bf16, fp16"
    ):
        ts.make_train_step(loss, tx, precision="int8")
    with pytest.raises(ValueError, match=r"make_train_loop: loss_scale='static' is unknown"):
        ts.make_train_loop(loss, tx, loss_scale="static")
    with pytest.raises(
        ValueError,
        match=r"make_train_step: loss_scale=-1.0 is out of range; expected finite loss_scale with 0 < loss_scale",
    ):
        ts.make_train_step(loss, tx, loss_scale=-1.0)
    with pytest.raises(ValueError, match=r"Policy: compute_dtype=.*int32.* is not a floating dtype"):
        dl.Policy(compute_dtype=jnp.int32)
    with pytest.raises(ValueError, match=r"DynamicLossScale: backoff_factor=1.5 is out of range"):
        dl.DynamicLossScale(backoff_factor=1.5)
    with pytest.raises(ValueError, match=r"fit: precision='bf32' is unknown"):
        dl.fit(_mlp(), tx, _data(), epochs=1, batch_size=8, precision="bf32", progress=False)
    with pytest.raises(ValueError, match=r"loss_scale= is set but state.loss_scale is None"):
        ts.make_train_step(loss, tx, loss_scale="dynamic")(_state(_mlp(), tx), _data())


def test_default_path_adds_no_state_leaves():
    tx = dl.adam(0.1)
    state = _state(_mlp(), tx)
    assert state.ema_params is None and state.loss_scale is None
    plain = (state.step, state.params, state.model_state, state.opt_state, state.key)
    assert len(jax.tree.leaves(state)) == len(jax.tree.leaves(plain))
    assert ts.step_options("x") is None and ts.step_options("x", "fp32") is None


def test_bf16_step_computes_in_bf16_and_keeps_float32_master_weights():
    model, tx = _mlp(), dl.adam(0.01)
    loss = ts.supervised_loss(model)
    state = _state(model, tx)
    step = ts.make_train_step(loss, tx, precision="bf16")
    text = jax.jit(step).lower(state, _data()).as_text()
    # forward and backward matmuls; the scalar-valued dots are the metrics' norms (float32)
    dots = [line for line in text.splitlines() if "dot_general" in line and "-> tensor<f32>" not in line]
    assert dots and all("bf16" in line for line in dots)
    new, metrics = step(state, _data())
    for tree in (new.params, new.opt_state):
        assert {x.dtype for x in jax.tree.leaves(tree) if x.ndim} == {jnp.dtype(jnp.float32)}
    assert metrics["loss"].dtype == jnp.float32
    ref, ref_metrics = ts.make_train_step(loss, tx)(state, _data())
    np.testing.assert_allclose(metrics["loss"], ref_metrics["loss"], rtol=1e-2)
    fp32_text = jax.jit(ts.make_train_step(loss, tx)).lower(state, _data()).as_text()
    assert "bf16" not in fp32_text


def test_bf16_convolution_and_float32_loss_and_batchnorm_state():
    model = L.Sequential(L.Conv(4, 3, impl="xla"), L.BatchNorm(), L.Relu(), L.Flatten(), L.Dense(3))
    tx = dl.sgd(0.1)
    loss = ts.supervised_loss(model)
    state = _state(model, tx, (6, 6, 1))
    x = np.random.default_rng(0).normal(size=(8, 6, 6, 1)).astype(np.float32)
    y = np.arange(8, dtype=np.int32) % 3
    step = ts.make_train_step(loss, tx, precision="bf16")
    text = jax.jit(step).lower(state, (x, y)).as_text()
    convs = [line for line in text.splitlines() if "stablehlo.convolution" in line]
    assert convs and all("bf16" in line for line in convs)
    # the model's outputs reach the loss (log-softmax) as float32
    logits, _ = P.PolicyModel(model, P.get_policy("bf16")).apply(state.params, state.model_state, x)
    assert logits.dtype == jnp.float32
    new, _ = step(state, (x, y))
    assert {v.dtype for v in jax.tree.leaves(new.model_state)} == {jnp.dtype(jnp.float32)}
    assert not np.allclose(new.model_state["batchnorm_1"]["mean"], 0.0)


def test_static_loss_scale_gives_the_unscaled_gradient():
    model, tx = _mlp(), dl.sgd(0.1)
    loss = ts.supervised_loss(model)
    ref, _ = ts.make_train_step(loss, tx)(_state(model, tx), _data())
    new, metrics = ts.make_train_step(loss, tx, loss_scale=1024.0)(
        _state(model, tx, loss_scale=1024.0), _data()
    )
    for a, b in zip(jax.tree.leaves(ref.params), jax.tree.leaves(new.params)):
        np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7)
    assert float(metrics["loss_scale"]) == 1024.0 and float(new.loss_scale.scale) == 1024.0


def _overflow_loss(params, model_state, batch, key=None, train=True):
    """Mean squared error whose batch carries a flag: flag 1 makes the loss +inf (an overflow)."""
    x, t, flag = batch
    pred = x @ params["w"]
    loss = jnp.mean(jnp.square(pred - t))
    return jnp.where(flag[0] > 0, jnp.inf, loss), (model_state, {})


@pytest.mark.torch
def test_dynamic_loss_scale_follows_torch_gradscaler_and_skips_overflows():
    pattern = [0, 0, 0, 1, 0, 0, 1, 1, 0, 0, 0, 0]  # 1 = overflow
    rule = dl.DynamicLossScale(scale=8.0, growth_interval=2)
    tx = dl.adam(0.1)
    rng = np.random.default_rng(0)
    x, t = rng.normal(size=(8, 3)).astype(np.float32), rng.normal(size=(8, 2)).astype(np.float32)
    w0 = rng.normal(size=(3, 2)).astype(np.float32)
    state = ts.TrainState(
        step=jnp.int32(0),
        params={"w": jnp.asarray(w0)},
        model_state={},
        opt_state=tx.init({"w": jnp.asarray(w0)}),
        key=jax.random.key(0),
        loss_scale=rule.init(),
    )
    step = ts.make_train_step(_overflow_loss, tx, loss_scale=rule)
    scales, skipped = [], []
    for flag in pattern:
        before = state
        state, metrics = step(state, (x, t, np.full(8, flag, np.float32)))
        scales.append(float(state.loss_scale.scale))
        skipped.append(int(metrics["nonfinite"]))
        if flag:  # parameters and optimizer state are those before the step
            assert all(
                np.array_equal(a, b)
                for a, b in zip(
                    jax.tree.leaves((before.params, before.opt_state)),
                    jax.tree.leaves((state.params, state.opt_state)),
                )
            )
    assert skipped == pattern
    # PyTorch's GradScaler with the same rule and the same overflow pattern
    w = torch.nn.Parameter(torch.tensor(w0))
    opt = torch.optim.Adam([w], lr=0.1)
    scaler = torch.amp.GradScaler(
        "cpu", init_scale=8.0, growth_interval=2, growth_factor=2.0, backoff_factor=0.5
    )
    torch_scales = []
    for flag in pattern:
        opt.zero_grad()
        loss = torch.mean((torch.tensor(x) @ w - torch.tensor(t)) ** 2)
        if flag:
            loss = loss * float("inf")
        scaler.scale(loss).backward()
        scaler.step(opt)
        scaler.update()
        torch_scales.append(float(scaler.get_scale()))
    assert scales == torch_scales
    # the same 8 Adam steps (float rounding of lr 0.1 Adam near the optimum, as in test_optimizers_torch)
    np.testing.assert_allclose(state.params["w"], w.detach().numpy(), rtol=1e-4, atol=2e-5)


def test_loss_scale_and_ema_are_checkpointed_and_resume_bitwise(tmp_path):
    model, tx = _mlp(), dl.adam(0.01)
    loss = ts.supervised_loss(model)
    kw = {"loss_scale": dl.DynamicLossScale(growth_interval=2), "ema": 0.9}
    loop = ts.make_train_loop(loss, tx, precision="fp16", **kw)
    x, y = _data(64)
    batches = (x.reshape(4, 16, 6), y.reshape(4, 16))
    state = _state(model, tx, **kw)
    full, _ = loop(state, batches)
    half, _ = loop(state, jax.tree.map(lambda b: b[:2], batches))
    save_checkpoint(str(tmp_path / "ckpt"), half)
    restored = restore_checkpoint(str(tmp_path / "ckpt"), half)
    resumed, _ = loop(restored, jax.tree.map(lambda b: b[2:], batches))
    assert float(full.loss_scale.scale) == 2.0**17  # grew twice: 4 finite steps, interval 2
    for a, b in zip(jax.tree.leaves(full), jax.tree.leaves(resumed)):
        a, b = (
            (jax.random.key_data(a), jax.random.key_data(b))
            if jnp.issubdtype(a.dtype, jax.dtypes.prng_key)
            else (a, b)
        )
        assert np.array_equal(a, b)


def test_sweep_over_initial_loss_scales_compiles_once_and_equals_single_runs():
    from jaxdl.sweep import _run, sweep

    model = _mlp()
    loss = ts.supervised_loss(model)
    x, y = _data(32)
    batches = (x.reshape(2, 16, 6), y.reshape(2, 16))

    def make(lr):
        return dl.sgd(lr)

    kw = dict(seeds=0, loss_scale="dynamic", precision="bf16", return_state=True)
    res = sweep(loss, make, model, (6,), batches, hparams={"lr": [0.1, 0.1], "loss_scale": [4.0, 64.0]}, **kw)
    size = _run._cache_size()
    sweep(loss, make, model, (6,), batches, hparams={"lr": [0.2, 0.1], "loss_scale": [8.0, 2.0]}, **kw)
    assert _run._cache_size() == size  # new values, same program
    np.testing.assert_array_equal(res["loss_scale"], [4.0, 64.0])  # the setting, not the curve
    np.testing.assert_array_equal(res["state"].loss_scale.scale, [4.0, 64.0])  # 2 finite steps of 2000
    tx = make(0.1)
    single = ts.TrainState.create(model, tx, jax.random.key(0), (6,), loss_scale="dynamic")
    single = single.replace(loss_scale=single.loss_scale.replace(scale=jnp.float32(64.0)))
    single, _ = ts.make_train_loop(loss, tx, precision="bf16", loss_scale="dynamic")(single, batches)
    np.testing.assert_allclose(
        res["state"].params["dense_0"]["w"][1], single.params["dense_0"]["w"], rtol=1e-6, atol=1e-7
    )


def test_sharded_step_with_precision_loss_scale_and_ema_equals_the_single_step():
    model, tx = _mlp(), dl.adam(0.01)
    loss = ts.supervised_loss(model)
    kw = {"precision": "bf16", "loss_scale": "dynamic", "ema": 0.5}
    state = _state(model, tx, loss_scale="dynamic", ema=0.5)
    ref, ref_metrics = ts.make_train_step(loss, tx, **kw)(state, _data())
    mesh = parallel.data_mesh(2)
    new, metrics = parallel.make_sharded_train_step(loss, tx, mesh, **kw)(
        parallel.put_state(state, mesh), _data()
    )
    for a, b in zip(
        jax.tree.leaves((ref.params, ref.ema_params, ref.loss_scale)),
        jax.tree.leaves((new.params, new.ema_params, new.loss_scale)),
    ):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
    assert float(metrics["loss_scale"]) == float(ref_metrics["loss_scale"]) == 2.0**15
