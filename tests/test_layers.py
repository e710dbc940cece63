"""Layers against independent references: closed forms, PyTorch, flax, finite differences."""

import dataclasses

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import lax
from jax.test_util import check_grads

from jaxdl import layers as L

try:
    import torch
except ImportError:  # Python 3.12+: no torch; the tests marked `torch` skip (conftest.py)
    torch = None

KEY = jax.random.key(0)
RNG = np.random.default_rng(0)


def _randn(*shape, scale=1.0, shift=0.0):
    return (RNG.normal(size=shape) * scale + shift).astype(np.float32)


def _away_from_zero(*shape):
    """Normal samples with |x| >= 0.2, so finite differences never straddle a kink at 0."""
    x = RNG.normal(size=shape)
    return (np.sign(x) * (np.abs(x) + 0.2)).astype(np.float32)


def _t(a):
    return torch.tensor(np.asarray(a))


def _nchw(a):
    return _t(np.transpose(np.asarray(a), (0, 3, 1, 2)))


def _nhwc(t):
    return np.transpose(t.detach().numpy(), (0, 2, 3, 1))


def _random_params(layer, input_shape):
    """Output shape and N(0, 0.5^2) float32 params of the shapes ``layer.init`` makes (eval_shape:
    no random-initializer compilation per shape, which dominates the test time on a CPU)."""
    out = []
    params = jax.eval_shape(lambda: out.append(layer.init(KEY, input_shape)) or out[0][1])
    return out[0][0], jax.tree.map(lambda a: _randn(*a.shape, scale=0.5), params)


# ----------------------------------------------------------------------------- forward values


def test_dense_is_x_w_plus_b():
    layer = L.Dense(5)
    out_shape, params, state = layer.init(KEY, (3,))
    assert out_shape == (5,) and params["w"].shape == (3, 5) and state == {}
    params = {"w": _randn(3, 5), "b": _randn(5)}
    x = _randn(4, 3)
    y, _ = layer.apply(params, state, x)
    np.testing.assert_allclose(y, x @ params["w"] + params["b"], rtol=1e-5, atol=1e-6)
    _, p, _ = L.Dense(5, use_bias=False).init(KEY, (3,))
    assert set(p) == {"w"}


def test_dense_default_init_is_xavier_normal_and_zero_bias():
    _, p, _ = L.Dense(300).init(KEY, (500,))
    assert float(jnp.var(p["w"])) == pytest.approx(2 / 800, rel=0.05)
    np.testing.assert_array_equal(p["b"], np.zeros(300))


CONV_CASES = [  # kernel, strides, padding, torch padding (symmetric cases only)
    (3, 1, "SAME", 1),
    (3, 2, "SAME", 1),
    (3, 1, "VALID", 0),
    ((5, 3), (2, 1), "VALID", 0),
    (1, 1, "SAME", 0),
]


@pytest.mark.torch
@pytest.mark.parametrize("impl", ["xla", "im2col"])
@pytest.mark.parametrize("kernel,strides,padding,tpad", CONV_CASES)
def test_conv_matches_torch_conv2d(impl, kernel, strides, padding, tpad):
    layer = L.Conv(4, kernel, strides=strides, padding=padding, impl=impl)
    x = _randn(2, 9, 9, 3)
    out_shape, params = _random_params(layer, (9, 9, 3))
    y, _ = layer.apply(params, {}, x)
    ref = torch.nn.functional.conv2d(
        _nchw(x),
        _t(np.transpose(np.asarray(params["w"]), (3, 2, 0, 1))),
        _t(params["b"]),
        stride=layer.strides,
        padding=tpad,
    )
    assert y.shape[1:] == out_shape
    np.testing.assert_allclose(y, _nhwc(ref), rtol=1e-5, atol=1e-5)


def test_conv_same_padding_output_size_is_ceil_of_input_over_stride():
    out_shape, params = _random_params(L.Conv(8, 3, strides=2), (15, 16, 3))
    assert out_shape == (8, 8, 8) and params["w"].shape == (3, 3, 3, 8)


@pytest.mark.parametrize(
    "kernel,strides,padding", [(3, 2, "SAME"), (4, 1, "SAME"), ((3, 5), (2, 3), "VALID")]
)
def test_conv_im2col_equals_lax_conv_including_gradients(kernel, strides, padding):
    x = jnp.asarray(_randn(3, 11, 10, 5))
    xla = L.Conv(6, kernel, strides=strides, padding=padding, impl="xla")
    im2col = dataclasses.replace(xla, impl="im2col")
    out_shape, params = _random_params(xla, (11, 10, 5))
    ct = jnp.asarray(_randn(3, *out_shape))

    def loss(layer):
        return lambda p, x: jnp.sum(layer.apply(p, {}, x)[0] * ct)

    ref = (
        lax.conv_general_dilated(
            x, params["w"], xla.strides, padding, dimension_numbers=("NHWC", "HWIO", "NHWC")
        )
        + params["b"]
    )
    np.testing.assert_allclose(im2col.apply(params, {}, x)[0], ref, rtol=1e-5, atol=1e-5)
    g_xla = jax.jit(jax.grad(loss(xla), argnums=(0, 1)))(params, x)
    g_im2col = jax.jit(jax.grad(loss(im2col), argnums=(0, 1)))(params, x)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-4), g_im2col, g_xla)


def test_conv_auto_impl_uses_im2col_only_on_cpu_for_small_patches_or_shallow_inputs(monkeypatch):
    assert L.Conv(8, 3)._impl(3) == "im2col"  # 3x3 RGB input layer: kh*kw*I = 27
    assert L.Conv(8, 3)._impl(32) == "im2col"  # 3x3, stride 1: patches 9x the input
    assert L.Conv(8, 5)._impl(4) == "xla"  # 5x5, stride 1: 25x the input
    assert L.Conv(8, 3, strides=2)._impl(64) == "im2col"  # patches 9/4 of the input
    assert L.Conv(8, 1)._impl(64) == "im2col"  # 1x1: a plain matmul
    assert L.Conv(8, 7, strides=2)._impl(3) == "xla"  # 49/4 of the input
    monkeypatch.setattr(jax, "default_backend", lambda: "gpu")
    for conv, c in [(L.Conv(8, 3), 3), (L.Conv(8, 3, strides=2), 64), (L.Conv(8, 1), 64)]:
        assert conv._impl(c) == "xla"
    assert L.Conv(8, 3, impl="im2col")._impl(64) == "im2col"  # an explicit impl always wins


@pytest.mark.torch
@pytest.mark.parametrize("window,strides,padding", [(2, None, "VALID"), (3, 2, "VALID"), (3, 1, "SAME")])
def test_pools_match_torch(window, strides, padding):
    x = _randn(2, 8, 8, 3)
    s = window if strides is None else strides
    tpad = window // 2 if padding == "SAME" else 0
    for cls, ref_fn in [
        (L.MaxPool, torch.nn.functional.max_pool2d),
        (L.AvgPool, torch.nn.functional.avg_pool2d),
    ]:
        layer = cls(window, strides, padding)
        out_shape, _, _ = layer.init(KEY, (8, 8, 3))
        y, _ = layer.apply({}, {}, x)
        ref = ref_fn(_nchw(x), window, s, padding=tpad)
        assert y.shape[1:] == out_shape
        np.testing.assert_allclose(y, _nhwc(ref), rtol=1e-6, atol=1e-6)


def test_global_average_pool_and_flatten():
    x = _randn(2, 4, 4, 3)
    y, _ = L.Sequential(L.AvgPool(4), L.Flatten()).apply({}, {}, x)
    np.testing.assert_allclose(y, x.mean(axis=(1, 2)), rtol=1e-6)
    assert L.Flatten().init(KEY, (2, 3, 4))[0] == (24,)


@pytest.mark.torch
@pytest.mark.parametrize(
    "layer,ref",
    [
        (L.Relu(), lambda x: torch.relu(x)),
        (L.LeakyRelu(), lambda x: torch.nn.functional.leaky_relu(x, 0.01)),
        (L.LeakyRelu(0.2), lambda x: torch.nn.functional.leaky_relu(x, 0.2)),
        (L.Sigmoid(), lambda x: torch.sigmoid(x)),
        (L.Tanh(), lambda x: torch.tanh(x)),
        (L.Elu(), lambda x: torch.nn.functional.elu(x, 1.0)),
        (L.Elu(0.5), lambda x: torch.nn.functional.elu(x, 0.5)),
        (L.PRelu(), lambda x: torch.nn.functional.prelu(x, torch.tensor([0.25]))),
    ],
)
def test_activations_match_torch(layer, ref):
    x = _randn(4, 7, scale=3)
    _, params, state = layer.init(KEY, (7,))
    y, _ = layer.apply(params, state, x)
    np.testing.assert_allclose(y, ref(_t(x)).numpy(), rtol=1e-6, atol=1e-7)


def test_maxout_is_the_max_over_pieces_separate_affine_maps():
    layer = L.Maxout(4, pieces=3)
    out_shape, params, _ = layer.init(KEY, (5,))
    assert out_shape == (4,) and params["w"].shape == (3, 5, 4) and params["b"].shape == (3, 4)
    params = {"w": _randn(3, 5, 4), "b": _randn(3, 4)}
    x = _randn(6, 5)
    maps = [x @ params["w"][k] + params["b"][k] for k in range(3)]  # in numpy
    y, _ = layer.apply(params, {}, x)
    np.testing.assert_allclose(y, np.maximum(np.maximum(maps[0], maps[1]), maps[2]), rtol=1e-5)


def test_maxout_pieces_are_initialized_like_dense_layers():
    _, params, _ = L.Maxout(300, pieces=2).init(KEY, (500,))
    for k in range(2):
        assert float(jnp.var(params["w"][k])) == pytest.approx(2 / 800, rel=0.05)
    assert not np.allclose(params["w"][0], params["w"][1])


# ----------------------------------------------------------------------------- gradients

GRAD_CASES = [
    # layer, per-example input shape
    (L.Dense(3), (4,)),
    (L.Conv(3, 3, strides=2, impl="xla"), (5, 5, 2)),
    (L.Conv(3, (2, 3), padding="VALID", impl="im2col"), (5, 5, 2)),
    (L.MaxPool(2), (4, 4, 2)),
    (L.AvgPool(3, 1, "SAME"), (4, 4, 2)),
    (L.Flatten(), (2, 3)),
    (L.Relu(), (5,)),
    (L.LeakyRelu(0.1), (5,)),
    (L.PRelu(), (5,)),
    (L.Sigmoid(), (5,)),
    (L.Tanh(), (5,)),
    (L.Elu(), (5,)),
    (L.Maxout(3, pieces=2), (4,)),
    (L.Dropout(0.5), (6,)),
    (L.BatchNorm(), (5,)),
    (L.BatchNorm(), (3, 3, 2)),
    (L.Sequential(L.Conv(2, 3), L.BatchNorm(), L.Relu(), L.Flatten(), L.Dropout(0.3), L.Dense(2)), (4, 4, 1)),
]


@pytest.mark.parametrize("layer,shape", GRAD_CASES, ids=lambda c: type(c).__name__)
def test_gradients_match_finite_differences_in_train_and_eval_mode(layer, shape):
    # Random float64 params and running statistics (variances > 0) of the shapes init makes;
    # eval_shape avoids compiling the random initializers for every shape.
    _, params, state = jax.eval_shape(lambda: layer.init(KEY, shape))
    params = jax.tree.map(lambda a: 0.7 * RNG.normal(size=a.shape), params)
    state = jax.tree.map(lambda a: np.abs(RNG.normal(size=a.shape)) + 0.5, state)
    with jax.enable_x64(True):
        x = jnp.asarray(_away_from_zero(3, *shape), jnp.float64)
        key = jax.random.key(1)

        @jax.jit
        def f(params, x):  # both modes in one function: one compilation
            return tuple(layer.apply(params, state, x, train=train, key=key)[0] for train in (False, True))

        check_grads(f, (params, x), order=1, modes=("rev",), eps=1e-5, atol=1e-5, rtol=1e-5)


def test_flax_wrapper_gradients_match_finite_differences():
    layer = L.from_flax(_FlaxNet(dropout=0.0))
    with jax.enable_x64(True):
        _, params, state = layer.init(KEY, (4,))
        params = jax.tree.map(lambda a: jnp.asarray(a, jnp.float64), params)
        x = jnp.asarray(_away_from_zero(5, 4), jnp.float64)
        f = jax.jit(lambda p, x: tuple(layer.apply(p, state, x, train=train)[0] for train in (False, True)))
        check_grads(f, (params, x), order=1, modes=("rev",), eps=1e-5, atol=1e-5, rtol=1e-5)


# ----------------------------------------------------------------------------- dropout


def test_dropout_drops_a_fraction_rate_and_keeps_the_mean():
    x = jnp.full((200, 500), 2.0)
    for rate in (0.2, 0.5, 0.8):
        y, _ = L.Dropout(rate).apply({}, {}, x, train=True, key=KEY)
        y = np.asarray(y)
        assert np.mean(y == 0) == pytest.approx(rate, abs=0.01)
        np.testing.assert_allclose(y[y != 0], 2.0 / (1 - rate), rtol=1e-6)
        assert y.mean() == pytest.approx(2.0, rel=0.02)


def test_dropout_is_identity_in_eval_and_with_rate_zero():
    x = _randn(4, 8)
    np.testing.assert_array_equal(L.Dropout(0.5).apply({}, {}, x)[0], x)
    np.testing.assert_array_equal(L.Dropout(0.0).apply({}, {}, x, train=True, key=KEY)[0], x)


def test_dropout_masks_differ_across_keys():
    x = jnp.ones((10, 100))
    a, _ = L.Dropout(0.5).apply({}, {}, x, train=True, key=jax.random.key(1))
    b, _ = L.Dropout(0.5).apply({}, {}, x, train=True, key=jax.random.key(2))
    assert np.mean(np.asarray(a) != np.asarray(b)) > 0.3


def test_dropout_training_without_key_is_a_clear_error():
    with pytest.raises(ValueError, match="Dropout: .*train=True.* needs a PRNG key"):
        L.Dropout(0.5).apply({}, {}, jnp.ones((2, 3)), train=True)


def test_sequential_gives_each_layer_its_own_key():
    # With one shared key both Dropouts would drop the same units: half survive. With split keys
    # the masks are independent: a quarter survive.
    y, _ = L.Sequential(L.Dropout(0.5), L.Dropout(0.5)).apply(
        {}, {}, jnp.ones((100, 100)), train=True, key=KEY
    )
    assert np.mean(np.asarray(y) != 0) == pytest.approx(0.25, abs=0.02)


# ----------------------------------------------------------------------------- BatchNorm


def _bn_train_steps(layer, params, state, x, steps):
    outs = []
    for _ in range(steps):
        y, state = layer.apply(params, state, x, train=True)
        outs.append(y)
    return outs, state


@pytest.mark.torch
@pytest.mark.parametrize("momentum", [0.9, 0.5])
def test_batchnorm1d_matches_torch_over_several_steps(momentum):
    x = _randn(16, 6, scale=2.0, shift=3.0)
    gamma, beta = _randn(6, shift=1.0), _randn(6)
    layer = L.BatchNorm(momentum=momentum)
    _, params, state = layer.init(KEY, (6,))
    params = {"gamma": jnp.asarray(gamma), "beta": jnp.asarray(beta)}
    ref = torch.nn.BatchNorm1d(6, momentum=1 - momentum, eps=1e-5)
    with torch.no_grad():
        ref.weight.copy_(_t(gamma))
        ref.bias.copy_(_t(beta))
    outs, state = _bn_train_steps(layer, params, state, x, 4)
    for y in outs:
        np.testing.assert_allclose(y, ref(_t(x)).detach().numpy(), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(state["mean"], ref.running_mean.numpy(), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(state["var"], ref.running_var.numpy(), rtol=1e-5, atol=1e-5)
    ref.eval()
    y_eval, state_after = layer.apply(params, state, x)
    np.testing.assert_allclose(y_eval, ref(_t(x)).detach().numpy(), rtol=1e-5, atol=1e-5)
    assert state_after is state


@pytest.mark.torch
def test_batchnorm2d_matches_torch_over_several_steps():
    x = _randn(4, 5, 5, 3, scale=1.5, shift=-2.0)
    layer = L.BatchNorm(momentum=0.8, eps=1e-3)
    _, params, state = layer.init(KEY, (5, 5, 3))
    ref = torch.nn.BatchNorm2d(3, momentum=0.2, eps=1e-3)
    outs, state = _bn_train_steps(layer, params, state, x, 3)
    for y in outs:
        np.testing.assert_allclose(y, _nhwc(ref(_nchw(x))), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(state["mean"], ref.running_mean.numpy(), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(state["var"], ref.running_var.numpy(), rtol=1e-5, atol=1e-5)
    ref.eval()
    np.testing.assert_allclose(layer.apply(params, state, x)[0], _nhwc(ref(_nchw(x))), rtol=1e-5, atol=1e-5)


@pytest.mark.torch
def test_batchnorm_running_var_is_unbiased_like_torch():
    x = np.array([[1.0], [2.0], [4.0]], np.float32)  # mean 7/3, unbiased var 7/3
    _, state = L.BatchNorm(momentum=0.0).apply(
        {"gamma": jnp.ones(1), "beta": jnp.zeros(1)},
        {"mean": jnp.zeros(1), "var": jnp.ones(1)},
        x,
        train=True,
    )
    np.testing.assert_allclose(state["var"], [7 / 3], rtol=1e-6)
    np.testing.assert_allclose(state["mean"], [7 / 3], rtol=1e-6)


def test_batchnorm_params_are_gamma_one_beta_zero_and_state_mean_zero_var_one():
    _, params, state = L.BatchNorm().init(KEY, (4, 4, 3))
    np.testing.assert_array_equal(params["gamma"], np.ones(3))
    np.testing.assert_array_equal(params["beta"], np.zeros(3))
    np.testing.assert_array_equal(state["mean"], np.zeros(3))
    np.testing.assert_array_equal(state["var"], np.ones(3))


def _pmap_bn(axis_name, x, momentum=0.9):
    layer = L.BatchNorm(momentum=momentum, axis_name=axis_name)
    _, params, state = layer.init(KEY, x.shape[2:])
    rep = lambda t: jax.tree.map(lambda a: jnp.stack([a] * x.shape[0]), t)  # noqa: E731
    step = jax.pmap(lambda p, s, x: layer.apply(p, s, x, train=True), axis_name="devices")
    y, state = jax.block_until_ready(step(rep(params), rep(state), x))
    return np.asarray(y), jax.tree.map(np.asarray, state)


def test_batchnorm_axis_name_synchronizes_statistics_across_pmap_replicas():
    assert jax.device_count() == 4
    # Each device holds a shard with a different mean: per-shard statistics differ a lot.
    x = np.stack([_randn(8, 3, shift=2.0 * d) for d in range(4)])  # (devices, batch, features)
    flat = x.reshape(32, 3).astype(np.float64)
    mean, var = flat.mean(0), flat.var(0)
    y, state = _pmap_bn("devices", x)
    for d in range(4):  # every replica: the statistics of the whole global batch
        np.testing.assert_allclose(state["mean"][d], 0.1 * mean, rtol=1e-5)
        np.testing.assert_allclose(state["var"][d], 0.9 + 0.1 * var * 32 / 31, rtol=1e-5)
    np.testing.assert_allclose(y.reshape(32, 3), (flat - mean) / np.sqrt(var + 1e-5), rtol=1e-4, atol=1e-4)

    y, state = _pmap_bn(None, x)
    assert not np.allclose(state["mean"][0], state["mean"][3])  # replicas drift apart
    for d in range(4):  # ... each holding its own shard's statistics
        np.testing.assert_allclose(state["mean"][d], 0.1 * x[d].mean(0), rtol=1e-5)
        np.testing.assert_allclose(state["var"][d], 0.9 + 0.1 * x[d].var(0, ddof=1), rtol=1e-5)


def test_batchnorm_needs_more_than_one_value_per_channel_in_training():
    layer = L.BatchNorm()
    _, params, state = layer.init(KEY, (3,))
    with pytest.raises(ValueError, match="BatchNorm: training needs more than one value"):
        layer.apply(params, state, jnp.ones((1, 3)), train=True)


# ----------------------------------------------------------------------------- PReLU learning


def test_prelu_learns_alpha_with_sgd():
    layer = L.PRelu()
    _, params, state = layer.init(KEY, (10,))
    x = jnp.asarray(-np.abs(_randn(32, 10)))  # negative inputs: only alpha matters
    target = 0.7 * x  # reachable with alpha = 0.7

    def loss(p):
        return jnp.mean((layer.apply(p, state, x)[0] - target) ** 2)

    g = jax.grad(loss)(params)
    assert abs(float(g["alpha"])) > 1e-3
    for _ in range(50):
        params = jax.tree.map(lambda p, g: p - 0.3 * g, params, jax.grad(loss)(params))
    assert float(params["alpha"]) == pytest.approx(0.7, abs=1e-3)


# ----------------------------------------------------------------------------- Sequential


def test_sequential_keys_params_and_state_by_kind_and_index():
    model = L.Sequential(L.Dense(8), L.BatchNorm(), L.Relu(), L.Dropout(0.1), L.Dense(2))
    out_shape, params, state = model.init(KEY, (4,))
    assert out_shape == (2,)
    assert list(params) == ["dense_0", "batchnorm_1", "dense_4"]
    assert list(state) == ["batchnorm_1"]
    y, new_state = model.apply(params, state, _randn(5, 4), train=True, key=KEY)
    assert y.shape == (5, 2) and list(new_state) == ["batchnorm_1"]
    assert not np.allclose(new_state["batchnorm_1"]["mean"], 0)


def test_sequential_equals_composition_of_its_layers():
    a, b = L.Dense(6), L.Tanh()
    model = L.Sequential(a, b)
    _, params, _ = model.init(KEY, (3,))
    x = _randn(4, 3)
    h, _ = a.apply(params["dense_0"], {}, x)
    np.testing.assert_allclose(model.apply(params, {}, x)[0], np.tanh(np.asarray(h)), rtol=1e-6)
    # every layer's output, keyed like the params: numpy's forward pass
    outs = model.intermediates(params, {}, x)
    w, bias, xn = (np.asarray(v) for v in (params["dense_0"]["w"], params["dense_0"]["b"], x))
    assert list(outs) == ["dense_0", "tanh_1"]
    np.testing.assert_allclose(outs["dense_0"], xn @ w + bias, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(outs["tanh_1"], np.tanh(xn @ w + bias), rtol=1e-5, atol=1e-6)


def test_sequential_works_under_jit_and_vmap_over_models():
    model = L.Sequential(L.Dense(4), L.Relu(), L.Dense(2))
    keys = jax.random.split(KEY, 3)
    params = jax.jit(jax.vmap(lambda k: model.init(k, (3,))[1]))(keys)
    x = _randn(5, 3)
    ys = jax.jit(jax.vmap(lambda p: model.apply(p, {}, x)[0]))(params)
    assert ys.shape == (3, 5, 2)
    p1 = jax.tree.map(lambda a: a[1], params)
    np.testing.assert_allclose(ys[1], model.apply(p1, {}, x)[0], rtol=1e-5)


# ----------------------------------------------------------------------------- BN folding


def _trained_bn_state(model, params, state, x):
    """A few training steps, so the running statistics are far from (0, 1)."""
    step = jax.jit(lambda p, s: model.apply(p, s, x, train=True)[1])
    for _ in range(3):
        state = step(params, state)
    return state


def _randomize_bn_params(params):
    """Random BatchNorm gamma/beta and random (non-zero) biases, so that folding must get both
    right (init leaves beta and every bias at 0)."""

    def leaf(path, a):
        name = path[-1].key
        if name in ("gamma", "b", "beta"):
            return jnp.asarray(_randn(*a.shape, shift=1.0 if name == "gamma" else 0.0))
        return a

    return jax.tree.map_with_path(leaf, params)


def test_fold_batchnorm_dense_and_conv_with_and_without_bias_keeps_eval_outputs():
    model = L.Sequential(
        L.Conv(6, 3),
        L.BatchNorm(),
        L.Relu(),
        L.Conv(4, 3, strides=2, use_bias=False),
        L.BatchNorm(momentum=0.5),
        L.Flatten(),
        L.Dense(8, use_bias=False),
        L.BatchNorm(eps=1e-3),
        L.Tanh(),
        L.BatchNorm(),  # after an activation: cannot be folded, must stay
        L.Dense(3),
        L.BatchNorm(),
    )
    x = _randn(16, 6, 6, 2, scale=2.0, shift=1.0)
    _, params, state = model.init(KEY, (6, 6, 2))
    params = _randomize_bn_params(params)
    state = _trained_bn_state(model, params, state, x)
    folded, fparams, fstate = L.fold_batchnorm(model, params, state)

    kinds = [type(layer).__name__ for layer in folded.layers]
    assert kinds == ["Conv", "Relu", "Conv", "Flatten", "Dense", "Tanh", "BatchNorm", "Dense"]
    assert all(layer.use_bias for layer in folded.layers if hasattr(layer, "use_bias"))
    assert list(fstate) == ["batchnorm_6"]
    y = jax.jit(lambda p, s: model.apply(p, s, x)[0])(params, state)
    y_folded = jax.jit(lambda p, s: folded.apply(p, s, x)[0])(fparams, fstate)
    np.testing.assert_allclose(y_folded, y, rtol=1e-5, atol=1e-5)


def test_fold_batchnorm_recurses_into_nested_sequentials():
    inner = L.Sequential(L.Dense(5), L.BatchNorm())
    model = L.Sequential(inner, L.Relu(), L.Dense(2))
    x = _randn(8, 3)
    _, params, state = model.init(KEY, (3,))
    params = {**params, "sequential_0": _randomize_bn_params(params["sequential_0"])}
    state = _trained_bn_state(model, params, state, x)
    folded, fparams, fstate = L.fold_batchnorm(model, params, state)
    assert [type(layer).__name__ for layer in folded.layers[0].layers] == ["Dense"]
    assert fstate == {}
    np.testing.assert_allclose(
        folded.apply(fparams, fstate, x)[0], model.apply(params, state, x)[0], rtol=1e-5, atol=1e-5
    )


# ----------------------------------------------------------------------------- flax adapter


class _FlaxNet(nn.Module):
    dropout: float = 0.5

    @nn.compact
    def __call__(self, x, train: bool = False):
        x = nn.Dense(8)(x)
        x = nn.BatchNorm(use_running_average=not train, momentum=0.9)(x)
        x = nn.relu(x)
        x = nn.Dropout(self.dropout, deterministic=not train)(x)
        return nn.Dense(3)(x)


def test_from_flax_trains_like_flax_itself():
    module = _FlaxNet()
    layer = L.from_flax(module)
    out_shape, params, state = layer.init(KEY, (4,))
    variables = module.init({"params": KEY, "dropout": KEY}, jnp.zeros((1, 4)))
    assert out_shape == (3,) and set(state) == {"batch_stats"}
    jax.tree.map(np.testing.assert_array_equal, params, dict(variables["params"]))

    x, labels = _randn(16, 4), RNG.integers(0, 3, 16)

    def ours(p, s, key):
        y, s = layer.apply(p, s, x, train=True, key=key)
        return -jnp.mean(jax.nn.log_softmax(y)[jnp.arange(16), labels]), (y, s)

    def flax_direct(p, s, key):
        y, upd = module.apply(
            {"params": p, **s}, x, train=True, rngs={"dropout": key}, mutable=["batch_stats"]
        )
        return -jnp.mean(jax.nn.log_softmax(y)[jnp.arange(16), labels]), (y, dict(upd))

    p_ours, s_ours = params, state
    p_ref, s_ref = dict(variables["params"]), {"batch_stats": variables["batch_stats"]}
    grad_ours = jax.jit(jax.value_and_grad(ours, has_aux=True))
    grad_ref = jax.jit(jax.value_and_grad(flax_direct, has_aux=True))
    for step in range(3):
        key = jax.random.key(step + 10)
        (l1, (y1, s_ours)), g1 = grad_ours(p_ours, s_ours, key)
        (l2, (y2, s_ref)), g2 = grad_ref(p_ref, s_ref, key)
        np.testing.assert_allclose(y1, y2, rtol=1e-6)
        p_ours = jax.tree.map(lambda p, g: p - 0.1 * g, p_ours, g1)
        p_ref = jax.tree.map(lambda p, g: p - 0.1 * g, p_ref, g2)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6), p_ours, p_ref)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6), s_ours, s_ref)
    assert not np.allclose(s_ours["batch_stats"]["BatchNorm_0"]["mean"], 0)
    y_eval, s_eval = layer.apply(p_ours, s_ours, x)
    ref_eval = module.apply({"params": p_ref, **s_ref}, x, train=False)
    np.testing.assert_allclose(y_eval, ref_eval, rtol=1e-6)
    assert s_eval is s_ours


def test_from_flax_composes_in_sequential():
    model = L.Sequential(L.from_flax(nn.Dense(5)), L.Relu(), L.Dense(2))
    out_shape, params, state = model.init(KEY, (3,))
    assert out_shape == (2,) and list(params) == ["flaxmodule_0", "dense_2"] and state == {}
    assert model.apply(params, state, _randn(4, 3))[0].shape == (4, 2)


def test_from_flax_rejects_non_modules():
    with pytest.raises(TypeError, match="from_flax: module must be a flax.linen.Module"):
        L.from_flax(L.Dense(3))


# ----------------------------------------------------------------------------- bad input


def test_dense_applied_to_a_different_last_dimension_is_a_clear_error():
    layer = L.Dense(10)
    _, params, state = layer.init(KEY, (784,))
    msg = (
        r"Dense: params\['w'\] has shape \(784, 10\), but an input x of shape \(2, 783\) "
        r"needs \(783, 10\)"
    )
    with pytest.raises(ValueError, match=msg):
        layer.apply(params, state, jnp.ones((2, 783)))
    with pytest.raises(ValueError, match=msg):  # shapes are static: the check works under jit
        jax.jit(lambda p, x: layer.apply(p, state, x)[0])(params, jnp.ones((2, 783)))


def test_conv_applied_to_other_channels_is_a_clear_error():
    layer = L.Conv(4, 3)
    _, params, _ = layer.init(KEY, (8, 8, 3))
    with pytest.raises(
        ValueError,
        match=r"Conv: params\['w'\] has shape \(3, 3, 3, 4\).*needs "
        r"\(3, 3, 1, 4\)",
    ):
        layer.apply(params, {}, jnp.ones((2, 8, 8, 1)))


@pytest.mark.parametrize(
    "layer,shape,match",
    [
        (L.Conv(4, 3), (8, 8), r"Conv: input_shape must have rank 3 \(H, W, C\).*got \(8, 8\)"),
        (L.MaxPool(2), (8, 8, 3, 1), r"MaxPool: input_shape must have rank 3"),
        (L.AvgPool(2), (8,), r"AvgPool: input_shape must have rank 3"),
        (L.Dense(3), (), r"Dense: input_shape must have rank at least 1"),
        (L.BatchNorm(), (), r"BatchNorm: input_shape must have rank at least 1"),
        (L.Maxout(3), (), r"Maxout: input_shape must have rank at least 1"),
        (L.Conv(4, 5, padding="VALID"), (4, 4, 3), r"Conv: window/kernel 5 is larger than the input"),
    ],
)
def test_wrong_rank_or_too_small_input_is_a_clear_error(layer, shape, match):
    with pytest.raises(ValueError, match=match):
        layer.init(KEY, shape)


def test_apply_without_batch_axis_is_a_clear_error():
    layer = L.Conv(4, 3)
    _, params, _ = layer.init(KEY, (8, 8, 3))
    with pytest.raises(
        ValueError,
        match=r"Conv.apply: x has shape \(8, 8, 3\) \(batch axis first"
        r"\).*rank 3",
    ):
        layer.apply(params, {}, jnp.ones((8, 8, 3)))
    with pytest.raises(ValueError, match="Relu: x must have a leading batch axis"):
        L.Relu().apply({}, {}, jnp.float32(1.0))


@pytest.mark.parametrize(
    "make,match",
    [
        (lambda: L.Dense(0), r"Dense: features=0 is out of range; expected an integer >= 1"),
        (lambda: L.Dense(-3), r"Dense: features=-3 is out of range; expected an integer >= 1"),
        (lambda: L.Dense(2.5), r"Dense: features must be an int, got 2.5 of type float"),
        (lambda: L.Conv(0, 3), r"Conv: features=0 is out of range"),
        (lambda: L.Conv(4, 0), r"Conv: kernel_size=0 is out of range; expected an integer >= 1"),
        (lambda: L.Conv(4, (3, -1)), r"Conv: kernel_size=-1 is out of range"),
        (
            lambda: L.Conv(4, (3, 3, 3)),
            r"Conv: kernel_size=\(3, 3, 3\) is not an int or a pair; expected a positive int or a pair",
        ),
        (lambda: L.Conv(4, 3, strides=0), r"Conv: strides=0 is out of range; expected an integer >= 1"),
        (lambda: L.Conv(4, 3, padding="FULL"), r"Conv: padding must be 'SAME' or 'VALID', got 'FULL'"),
        (lambda: L.Conv(4, 3, padding=1), r"Conv: padding must be 'SAME' or 'VALID', got 1"),
        (lambda: L.Conv(4, 3, impl="cudnn"), r"Conv: impl must be 'auto', 'xla' or 'im2col'"),
        (lambda: L.MaxPool(0), r"MaxPool: window=0 is out of range"),
        (lambda: L.AvgPool(2, strides=-1), r"AvgPool: strides=-1 is out of range"),
        (lambda: L.MaxPool(2, padding="full"), r"MaxPool: padding must be 'SAME' or 'VALID'"),
        (lambda: L.Maxout(3, pieces=0), r"Maxout: pieces=0 is out of range"),
        (
            lambda: L.Dropout(1.0),
            r"Dropout: rate=1.0 is out of range; expected finite rate with 0 <= rate < 1",
        ),
        (lambda: L.Dropout(-0.1), r"Dropout: rate=-0.1 is out of range"),
        (lambda: L.Dropout("0.5"), r"Dropout: rate must be a real number, got '0.5' of type str"),
        (
            lambda: L.BatchNorm(momentum=1.5),
            r"BatchNorm: momentum=1.5 is out of range; expected finite momentum with 0 <= momentum <= 1",
        ),
        (lambda: L.BatchNorm(momentum=-0.1), r"BatchNorm: momentum=-0.1 is out of range"),
        (
            lambda: L.BatchNorm(eps=0.0),
            r"BatchNorm: eps=0.0 is out of range; expected finite eps with 0 < eps",
        ),
        (lambda: L.BatchNorm(eps=-1e-5), r"BatchNorm: eps=-1e-05 is out of range"),
    ],
)
def test_bad_hyperparameters_are_clear_errors(make, match):
    with pytest.raises((ValueError, TypeError), match=match):
        make()


def test_bad_initializer_is_a_type_error():
    with pytest.raises(TypeError, match="Dense: w_init must be an initializer"):
        L.Dense(3, w_init=0.01)


def test_padding_is_case_insensitive():
    assert L.Conv(4, 3, padding="valid").padding == "VALID"


def test_sequential_with_missing_or_misshapen_params_names_the_layer_key():
    model = L.Sequential(L.Dense(8), L.BatchNorm(), L.Dense(4))
    _, params, state = model.init(KEY, (3,))
    x = jnp.ones((2, 3))
    missing = {k: v for k, v in params.items() if k != "dense_2"}
    with pytest.raises(ValueError, match=r"Sequential: params has no entry 'dense_2'"):
        model.apply(missing, state, x)
    with pytest.raises(ValueError, match=r"Sequential: state has no entry 'batchnorm_1'"):
        model.apply(params, {}, x)
    bad = {**params, "dense_2": {**params["dense_2"], "w": jnp.ones((5, 4))}}
    with pytest.raises(
        ValueError,
        match=r"Sequential: params\['dense_2'\]\['w'\] has shape "
        r"\(5, 4\).*needs \(8, 4\)",
    ):
        model.apply(bad, state, x)
    no_b = {**params, "dense_0": {"w": params["dense_0"]["w"]}}
    with pytest.raises(ValueError, match=r"Sequential: params\['dense_0'\] has no entry 'b'"):
        model.apply(no_b, state, x)
    with pytest.raises(ValueError, match=r"Sequential: params has unexpected entries \['dense_9'\]"):
        model.apply({**params, "dense_9": {}}, state, x)
    with pytest.raises(TypeError, match=r"Sequential: params must be a dict"):
        model.apply(None, state, x)


def test_sequential_init_errors_name_the_layer_key():
    with pytest.raises(
        ValueError,
        match=r"Sequential: layer 'conv_2' with input shape \(8,\): "
        r"Conv: input_shape must have rank 3",
    ):
        L.Sequential(L.Dense(8), L.Relu(), L.Conv(4, 3)).init(KEY, (3,))


def test_sequential_rejects_layer_classes_and_non_layers():
    with pytest.raises(TypeError, match=r"Sequential: layer 1 .* \(did you mean Relu\(\)\?\)"):
        L.Sequential(L.Dense(3), L.Relu)
    with pytest.raises(TypeError, match="Sequential: layer 0 must be a layer object"):
        L.Sequential(jnp.tanh)


def test_batchnorm_takes_float32_statistics_of_bf16_inputs_and_returns_bf16():
    bn = L.BatchNorm(momentum=0.0)  # the running statistics become the batch's
    _, params, state = bn.init(KEY, (4,))
    x = (jax.random.normal(KEY, (64, 4)) * 3 + 1).astype(jnp.bfloat16)
    y, new_state = bn.apply(params, state, x, train=True)
    x32 = np.asarray(x.astype(jnp.float32), np.float64)
    np.testing.assert_allclose(new_state["mean"], x32.mean(0), rtol=1e-6)  # not rounded to bf16
    np.testing.assert_allclose(new_state["var"], x32.var(0, ddof=1), rtol=1e-5)
    assert y.dtype == jnp.bfloat16 and new_state["mean"].dtype == jnp.float32
    y_eval, _ = bn.apply(params, new_state, x)
    assert y_eval.dtype == jnp.bfloat16  # float32 statistics do not promote the next layer to float32


# ----------------------------------------------------------------------------- bad inputs

# One instance of every layer of jaxdl.layers with the shape of one example it takes.
ALL_LAYERS = [
    (L.Dense(3), (4,)),
    (L.Conv(2, 3), (5, 5, 1)),
    (L.MaxPool(2), (4, 4, 1)),
    (L.AvgPool(2), (4, 4, 1)),
    (L.Flatten(), (2, 3)),
    (L.Relu(), (4,)),
    (L.LeakyRelu(), (4,)),
    (L.PRelu(), (4,)),
    (L.Sigmoid(), (4,)),
    (L.Tanh(), (4,)),
    (L.Elu(), (4,)),
    (L.Maxout(3), (4,)),
    (L.Dropout(0.5), (4,)),
    (L.BatchNorm(), (4,)),
    (L.Sequential(L.Dense(3), L.Relu()), (4,)),
    (L.Gelu(), (4,)),
    (L.LayerNorm(), (4,)),
    (L.RMSNorm(), (4,)),
    (L.Embedding(5, 3), (4,)),
    (L.MultiHeadAttention(2), (3, 4)),
    (L.PositionalEmbedding(4), (3, 4)),
    (L.Residual(L.Dense(4)), (4,)),
    (L.Add(L.Dense(4), L.Relu()), (4,)),
    (L.GlobalAvgPool(), (4, 4, 1)),
]


def test_all_layers_lists_every_layer_class():
    classes = {name for name in L.__all__ if isinstance(getattr(L, name), type)} - {"FlaxModule"}
    assert {type(layer).__name__ for layer, _ in ALL_LAYERS} == classes


@pytest.mark.parametrize("layer,shape", ALL_LAYERS, ids=lambda c: type(c).__name__)
@pytest.mark.parametrize(
    "bad,error,match",
    [
        ("ab", TypeError, r"input_shape must be a tuple of ints, got 'ab' of type str"),
        ((4, "a"), TypeError, r"input_shape must be a tuple of ints, got \(4, 'a'\) with an entry 'a'"),
        (
            (4.0,),
            TypeError,
            r"input_shape must be a tuple of ints, got \(4.0,\) with an entry 4.0 of type float",
        ),
        ((-3,), ValueError, r"input_shape=\(-3,\) is out of range; expected sizes >= 1"),
        ((4, 0), ValueError, r"input_shape=\(4, 0\) is out of range; expected sizes >= 1"),
    ],
)
def test_every_layer_refuses_a_bad_input_shape_by_name(layer, shape, bad, error, match):
    with pytest.raises(error, match=rf"{type(layer).__name__}\.init: {match}"):
        layer.init(KEY, bad)


@pytest.mark.parametrize("layer,shape", ALL_LAYERS, ids=lambda c: type(c).__name__)
def test_every_layer_refuses_a_non_key_and_non_numeric_inputs_by_name(layer, shape):
    name = type(layer).__name__
    with pytest.raises(
        TypeError, match=rf"{name}\.init: key must be a jax.random.key, got 'abc' of type str"
    ):
        layer.init("abc", shape)
    _, params, state = layer.init(KEY, shape)
    x = np.full((2, *shape), "a")
    with pytest.raises(
        TypeError, match=rf"{name}\.apply: x must be an array of numbers, got dtype <U1: \['a'"
    ):
        layer.apply(params, state, x)
    dtype = np.int32 if isinstance(layer, L.Embedding) else np.float32  # Embedding takes integer ids
    y, _ = layer.apply(params, state, np.ones((2, *shape), dtype))  # numpy input still works
    assert y.shape[0] == 2


@pytest.mark.parametrize(
    "make,error,match",
    [
        (lambda: L.LeakyRelu("x"), TypeError, r"LeakyRelu: alpha must be a real number, got 'x' of type str"),
        (
            lambda: L.LeakyRelu(float("nan")),
            ValueError,
            r"LeakyRelu: alpha=nan is out of range; expected finite",
        ),
        (lambda: L.Elu("x"), TypeError, r"Elu: alpha must be a real number, got 'x' of type str"),
        (
            lambda: L.PRelu([0.1]),
            TypeError,
            r"PRelu: alpha_init must be a real number, got \[0.1\] of type list",
        ),
        (
            lambda: L.Dense(3, use_bias="no"),
            TypeError,
            r"Dense: use_bias must be a bool, got 'no' of type str",
        ),
        (lambda: L.Conv(3, 3, use_bias=1), TypeError, r"Conv: use_bias must be a bool, got 1 of type int"),
    ],
)
def test_activation_and_bias_hyperparameters_are_checked_when_built(make, error, match):
    with pytest.raises(error, match=match):
        make()


def test_with_batch_statistics_sets_every_batchnorm_to_momentum_zero_through_wrappers():
    from jaxdl.precision import PolicyModel, get_policy

    model = L.Sequential(
        L.Dense(3), L.Residual(L.BatchNorm(momentum=0.9)), L.Add(L.BatchNorm(momentum=0.5), L.Relu())
    )
    zero, n = PolicyModel(model, get_policy("bf16")).with_batch_statistics()
    inner = zero.model
    assert n == 2 and isinstance(zero, PolicyModel)
    assert inner.layers[1].layer.momentum == 0.0 and inner.layers[2].layers[0].momentum == 0.0
    assert model.layers[1].layer.momentum == 0.9  # the original is left as it was
    assert L.Sequential(L.Dense(3), L.Relu()).with_batch_statistics()[1] == 0
