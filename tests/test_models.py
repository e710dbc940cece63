"""jaxdl.models.resnet: its layers, parameter count, shortcuts, BatchNorm state, gradients and
argument checks, on a tiny network (8 and 16 channels, one block per stage, 8x8 inputs)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxdl as dl
from jaxdl import layers as L
from jaxdl import models

KEY = jax.random.key(0)
SHAPE = (8, 8, 1)


@pytest.fixture(scope="module")
def tiny():
    net = models.resnet(10, channels=(8, 16))
    shape, params, state = net.init(KEY, SHAPE)
    assert shape == (10,)
    x = jax.random.normal(jax.random.key(1), (4, *SHAPE))
    return net, params, state, x


def test_resnet_layers_and_parameter_count_match_a_hand_count(tiny):
    net, params, state, x = tiny
    kinds = [type(layer).__name__ for layer in net.layers]
    assert kinds == ["Conv", "BatchNorm", "Relu", "Residual", "Relu", "Add", "Relu", "GlobalAvgPool", "Dense"]
    bn = lambda c: 2 * c  # gamma, beta  # noqa: E731
    stem = 3 * 3 * 1 * 8 + bn(8)
    stage1 = 2 * (3 * 3 * 8 * 8 + bn(8))  # identity shortcut: no parameters
    stage2 = 3 * 3 * 8 * 16 + 3 * 3 * 16 * 16 + 2 * bn(16) + (1 * 1 * 8 * 16 + bn(16))  # + projection
    head = 16 * 10 + 10
    assert sum(p.size for p in jax.tree.leaves(params)) == stem + stage1 + stage2 + head == 5122
    # every BatchNorm (stem, 2 + 2 in the blocks, 1 in the projection) has mean and var
    assert sum(s.size for s in jax.tree.leaves(state)) == 2 * (8 + 2 * 8 + 2 * 16 + 16)
    assert all(not conv.use_bias for conv in _convs(net))  # BatchNorm follows each


def _convs(layer):
    if isinstance(layer, L.Conv):
        return [layer]
    inner = getattr(layer, "layers", None) or ([layer.layer] if isinstance(layer, L.Residual) else [])
    return [c for child in inner for c in _convs(child)]


def test_resnet_projects_the_shortcut_where_the_shape_changes_and_keeps_the_identity_elsewhere(tiny):
    net, params, state, x = tiny
    identity, projection = net.layers[3], net.layers[5]
    main, shortcut = projection.layers
    assert [c.strides for c in _convs(main)] == [(2, 2), (1, 1)]
    assert params["add_5"]["sequential_1"]["conv_0"]["w"].shape == (1, 1, 8, 16)
    assert [c.kernel_size for c in _convs(identity)] == [(3, 3), (3, 3)]
    # With the main branch's last BatchNorm zeroed, each block is its shortcut alone.
    zero = lambda bn: {"gamma": 0 * bn["gamma"], "beta": 0 * bn["beta"]}  # noqa: E731
    h = jax.nn.relu(jax.random.normal(jax.random.key(2), (4, 8, 8, 8)))  # a block's input is >= 0
    p_identity = {**params["residual_3"], "batchnorm_4": zero(params["residual_3"]["batchnorm_4"])}
    p_projection = dict(params["add_5"])
    p_projection["sequential_0"] = {
        **p_projection["sequential_0"],
        "batchnorm_4": zero(p_projection["sequential_0"]["batchnorm_4"]),
    }

    @jax.jit
    def run(p_identity, p_projection, h):
        return (
            identity.apply(p_identity, state["residual_3"], h)[0],
            projection.apply(p_projection, state["add_5"], h)[0],
            shortcut.apply(params["add_5"]["sequential_1"], state["add_5"]["sequential_1"], h)[0],
        )

    y_identity, y, expected = run(p_identity, p_projection, h)
    np.testing.assert_array_equal(y_identity, h)
    assert y.shape == (4, 4, 4, 16)
    np.testing.assert_allclose(y, expected, atol=1e-6)


def test_resnet_training_updates_every_batchnorm_and_gradients_are_finite(tiny):
    net, params, state, x = tiny
    labels = jnp.arange(4) % 10

    def loss(params):
        logits, new_state = net.apply(params, state, x, train=True)
        assert logits.shape == (4, 10)
        return dl.softmax_cross_entropy(logits, labels), new_state

    (value, new_state), grads = jax.jit(jax.value_and_grad(loss, has_aux=True))(params)
    changed = jax.tree.map(lambda a, b: bool(jnp.any(a != b)), new_state, state)
    assert all(jax.tree.leaves(changed)) and len(jax.tree.leaves(changed)) == 12
    assert np.isfinite(value) and all(bool(jnp.all(jnp.isfinite(g))) for g in jax.tree.leaves(grads))
    assert all(float(jnp.abs(g).max()) > 0 for g in jax.tree.leaves(grads))  # every parameter learns


def test_recalibrate_batchnorm_reaches_the_batchnorms_inside_the_blocks(tiny):
    net, params, state, x = tiny
    shifted = jax.tree.map(lambda s: s + 3.0, state)
    a = dl.train_step.recalibrate_batchnorm(net, params, state, [x])
    b = dl.train_step.recalibrate_batchnorm(net, params, shifted, [x])
    jax.tree.map(lambda u, v: np.testing.assert_allclose(u, v, rtol=1e-5, atol=1e-6), a, b)


def _kinds(layer):
    inner = getattr(layer, "layers", None) or ([layer.layer] if isinstance(layer, L.Residual) else [])
    return [type(layer).__name__] + [k for child in inner for k in _kinds(child)]


def test_fold_batchnorm_folds_every_batchnorm_of_the_resnet_and_keeps_its_eval_outputs(tiny):
    """Inside Residual and inside both branches of Add; running statistics made non-trivial."""
    net, params, state, x = tiny
    rng = np.random.default_rng(0)
    state = jax.tree.map(lambda s: s + rng.uniform(0.2, 0.8, s.shape).astype(np.float32), state)
    folded, fparams, fstate = L.fold_batchnorm(net, params, state)
    assert "BatchNorm" in _kinds(net) and "BatchNorm" not in _kinds(folded) and fstate == {}
    want = jax.jit(lambda p, s, x: net.apply(p, s, x)[0])(params, state, x)
    got = jax.jit(lambda p, x: folded.apply(p, {}, x)[0])(fparams, x)
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-4, atol=1e-5)


def test_resnet_axis_name_reaches_every_batchnorm():
    net = models.resnet(10, channels=(8, 16), blocks=2, axis_name="data")
    bns = []

    def walk(layer):
        if isinstance(layer, L.BatchNorm):
            bns.append(layer)
        for child in getattr(layer, "layers", ()) or ([layer.layer] if isinstance(layer, L.Residual) else []):
            walk(child)

    walk(net)
    assert len(bns) == 1 + 2 * 2 * 2 + 1 and all(bn.axis_name == "data" for bn in bns)
    assert [type(layer).__name__ for layer in net.layers].count("Residual") == 3  # + 1 Add


@pytest.mark.parametrize(
    "kwargs, error, match",
    [
        ({"num_classes": 0}, ValueError, r"resnet: num_classes=0 is out of range"),
        ({"channels": ()}, ValueError, r"resnet: channels=\(\) is empty"),
        ({"channels": (8, -1)}, ValueError, r"resnet: channels=-1 is out of range"),
        ({"blocks": 0}, ValueError, r"resnet: blocks=0 is out of range"),
        ({"blocks": 1.5}, TypeError, r"resnet: blocks must be an int.*1\.5"),
        ({"activation": "swish"}, ValueError, r"resnet: activation='swish' is not one of"),
        ({"init": 3}, TypeError, r"resnet: init must be a name in .* or a callable, got 3"),
    ],
)
def test_resnet_refuses_bad_arguments_by_name(kwargs, error, match):
    kwargs = {"num_classes": 10, **kwargs}
    with pytest.raises(error, match=match):
        models.resnet(kwargs.pop("num_classes"), **kwargs)
