"""The sequence-model layers (LayerNorm, RMSNorm, Embedding, Gelu, MultiHeadAttention,
Residual) against PyTorch (forward and gradients) and against torch-free references: closed forms
in numpy and finite differences, which also run on Python 3.12+ where torch is absent."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.test_util import check_grads

import jaxdl as dl
from jaxdl import layers as L

try:
    import torch
except ImportError:  # Python 3.12+: no torch; the tests marked `torch` skip (conftest.py)
    torch = None

KEY = jax.random.key(0)
RNG = np.random.default_rng(0)


@pytest.fixture(autouse=True)
def _fresh_rng():
    """Each test draws the same data whichever tests ran before it on its worker."""
    global RNG
    RNG = np.random.default_rng(0)


def _randn(*shape, scale=1.0, shift=0.0):
    return (RNG.normal(size=shape) * scale + shift).astype(np.float32)


def _t(a, grad=False):
    return torch.tensor(np.asarray(a), requires_grad=grad)


def _params(layer, input_shape, scale=0.5, shift=0.0):
    """N(shift, scale^2) float32 params of the shapes ``layer.init`` makes."""
    params = jax.eval_shape(lambda: layer.init(KEY, input_shape)[1])
    return jax.tree.map(lambda a: _randn(*a.shape, scale=scale, shift=shift), params)


def _value_and_grads(layer, params, x, ct, **kw):
    """y and the gradients of sum(y * ct) with respect to params and x (float0 for integer x),
    in one compiled program (eager dispatch compiles every operation separately: slower)."""

    def loss(p, x):
        y = layer.apply(p, {}, x, **kw)[0]
        return jnp.sum(y * ct), y

    grad = jax.value_and_grad(loss, argnums=(0, 1), has_aux=True, allow_int=True)
    (_, y), grads = jax.jit(grad)(params, x)
    return y, grads


def _torch_grads(y, ct, *tensors):
    (y * _t(ct)).sum().backward()
    return [t.grad.numpy() for t in tensors]


def _close(a, b, tol=1e-5):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=tol, atol=tol)


# ----------------------------------------------------------------------------- norms


def _layer_norm_np(x, gamma, beta, eps):
    x = np.asarray(x, np.float64)
    mu = x.mean(-1, keepdims=True)
    return (x - mu) / np.sqrt(x.var(-1, keepdims=True) + eps) * gamma + beta


def _rms_norm_np(x, gamma, eps):
    x = np.asarray(x, np.float64)
    return x / np.sqrt(np.mean(x**2, -1, keepdims=True) + eps) * gamma


@pytest.mark.torch
@pytest.mark.parametrize("eps", [1e-5, 0.1])
def test_layernorm_matches_torch_forward_and_gradients(eps):
    layer = L.LayerNorm(eps=eps)
    x, ct = _randn(2, 3, 5, scale=2, shift=1), _randn(2, 3, 5)
    params = _params(layer, (3, 5), shift=1.0)
    y, (gp, gx) = _value_and_grads(layer, params, x, ct)
    tx, tg, tb = _t(x, True), _t(params["gamma"], True), _t(params["beta"], True)
    ty = torch.nn.functional.layer_norm(tx, (5,), tg, tb, eps)
    _close(y, ty.detach().numpy())
    for got, want in zip((gx, gp["gamma"], gp["beta"]), _torch_grads(ty, ct, tx, tg, tb)):
        _close(got, want, 1e-4)


@pytest.mark.torch
def test_rmsnorm_matches_torch_forward_and_gradients():
    layer = L.RMSNorm(eps=1e-3)
    x, ct = _randn(2, 3, 6, shift=0.5), _randn(2, 3, 6)
    params = _params(layer, (3, 6), shift=1.0)
    y, (gp, gx) = _value_and_grads(layer, params, x, ct)
    tx, tg = _t(x, True), _t(params["gamma"], True)
    rms = torch.nn.RMSNorm(6, eps=1e-3)
    with torch.no_grad():
        rms.weight.copy_(tg)
    ty = rms(tx)
    _close(y, ty.detach().numpy())
    for got, want in zip((gx, gp["gamma"]), _torch_grads(ty, ct, tx, rms.weight)):
        _close(got, want, 1e-4)


def test_norms_match_numpy_closed_forms_and_have_no_state():
    x = _randn(4, 7, scale=3, shift=-2)
    ln, rms, bare = L.LayerNorm(eps=1e-3), L.RMSNorm(eps=1e-3), L.LayerNorm(use_scale=False, use_bias=False)
    out, p, state = ln.init(KEY, (7,))
    assert out == (7,) and state == {} and set(p) == {"gamma", "beta"}
    np.testing.assert_array_equal(p["gamma"], np.ones(7))
    np.testing.assert_array_equal(p["beta"], np.zeros(7))
    assert bare.init(KEY, (7,))[1] == {} and set(L.LayerNorm(use_bias=False).init(KEY, (7,))[1]) == {"gamma"}
    assert rms.init(KEY, (7,))[2] == {}
    p, g = _params(ln, (7,)), _params(rms, (7,))

    @jax.jit
    def run(p, g, x):
        ys = [ln.apply(p, {}, x, train=train) for train in (False, True)]  # the same map in both modes
        return ys, bare.apply({}, {}, x)[0], rms.apply(g, {}, x)

    ys, y_bare, (y_rms, rms_state) = run(p, g, x)
    for y, new_state in ys:
        _close(y, _layer_norm_np(x, p["gamma"], p["beta"], 1e-3))
        assert new_state == {}
    _close(y_bare, _layer_norm_np(x, 1.0, 0.0, 1e-5))
    _close(y_rms, _rms_norm_np(x, g["gamma"], 1e-3))
    assert rms_state == {}


@pytest.mark.parametrize("layer", [L.LayerNorm(), L.RMSNorm()], ids=lambda m: type(m).__name__)
def test_norms_of_bf16_inputs_take_float32_statistics_and_return_bf16(layer):
    # Values near 64 with a spread of about 1: bf16 has 8 bits of mantissa, so a mean or a
    # mean square formed in bf16 is off by about 0.25, which is a quarter of the spread.
    x = (jax.random.normal(KEY, (8, 16)) + 64.0).astype(jnp.bfloat16)
    params = _params(layer, (16,), shift=1.0)
    y = jax.jit(lambda p, x: layer.apply(p, {}, x)[0])(params, x)
    assert y.dtype == jnp.bfloat16
    x64 = np.asarray(x.astype(jnp.float32), np.float64)
    if isinstance(layer, L.LayerNorm):
        ref = _layer_norm_np(x64, params["gamma"], params["beta"], layer.eps)
    else:
        ref = _rms_norm_np(x64, params["gamma"], layer.eps)
    # float32 statistics: only the output's rounding to bf16 (relative 2^-8) remains
    np.testing.assert_allclose(np.asarray(y, np.float64), ref, rtol=2**-8, atol=2**-8)


# ----------------------------------------------------------------------------- Gelu


def _gelu_np(x, approximate):
    x = np.asarray(x, np.float64)
    if approximate:
        return 0.5 * x * (1 + np.tanh(math.sqrt(2 / math.pi) * (x + 0.044715 * x**3)))
    return 0.5 * x * (1 + np.vectorize(math.erf)(x / math.sqrt(2)))


@pytest.mark.torch
@pytest.mark.parametrize("approximate", [False, True])
def test_gelu_matches_torch_forward_and_gradients(approximate):
    layer = L.Gelu(approximate=approximate)
    x, ct = _randn(3, 8, scale=3), _randn(3, 8)
    y, (_, gx) = _value_and_grads(layer, {}, x, ct)
    tx = _t(x, True)
    ty = torch.nn.functional.gelu(tx, approximate="tanh" if approximate else "none")
    _close(y, ty.detach().numpy())  # float32: torch's and XLA's tanh/erf differ by a few ulp
    _close(gx, _torch_grads(ty, ct, tx)[0])


def test_gelu_matches_its_closed_forms_and_defaults_to_the_exact_one():
    x = np.append(_randn(20, scale=3), 1.5).astype(np.float32)[None]  # at 1.5 the forms differ by 2.2e-4
    exact, tanh, default = jax.jit(
        lambda x: [g.apply({}, {}, x)[0] for g in (L.Gelu(False), L.Gelu(True), L.Gelu())]
    )(x)
    _close(exact, _gelu_np(x, False), 1e-6)
    _close(tanh, _gelu_np(x, True), 1e-6)
    np.testing.assert_array_equal(default, exact)
    assert abs(float(default[0, -1]) - _gelu_np(x, True)[0, -1]) > 5e-5


# ----------------------------------------------------------------------------- Embedding


@pytest.mark.torch
def test_embedding_matches_torch_forward_and_weight_gradient():
    layer = L.Embedding(6, 4)
    ids = np.array([[0, 5, 2], [2, 2, 3]], np.int32)  # repeated ids: their gradients add up
    params = _params(layer, (3,))
    ct = _randn(2, 3, 4)
    y, (gp, _) = _value_and_grads(layer, params, jnp.asarray(ids), ct)
    tw = _t(params["w"], True)
    ty = torch.nn.functional.embedding(torch.tensor(ids, dtype=torch.long), tw)
    _close(y, ty.detach().numpy(), 0)
    _close(gp["w"], _torch_grads(ty, ct, tw)[0], 1e-6)


def test_embedding_looks_up_rows_sums_gradients_and_inits_like_torch():
    layer = L.Embedding(5, 3)
    ids = np.array([[4, 0, 4, 1]], np.int32)
    out, params, state = layer.init(KEY, (4,))
    assert out == (4, 3) and params["w"].shape == (5, 3) and state == {}
    w = _params(layer, (4,))["w"]
    y, (grad, _) = _value_and_grads(layer, {"w": w}, ids, np.ones((1, 4, 3), np.float32))
    np.testing.assert_array_equal(y, w[ids])
    np.testing.assert_array_equal(grad["w"], np.array([1, 1, 0, 0, 2])[:, None] * np.ones((1, 3)))
    big = jax.jit(lambda k: L.Embedding(1000, 50).init(k, (1,))[1]["w"])(KEY)
    assert float(jnp.std(big)) == pytest.approx(1.0, rel=0.03)  # torch's N(0, 1)
    assert abs(float(jnp.mean(big))) < 0.02


def test_embedding_refuses_float_ids_by_name_and_gives_nan_outside_the_vocabulary():
    layer = L.Embedding(5, 3)
    _, params, _ = layer.init(KEY, (2,))
    for x in (np.zeros((1, 2), np.float32), jnp.zeros((1, 2), jnp.bfloat16), np.zeros((1, 2), bool)):
        with pytest.raises(TypeError, match=r"Embedding: x must hold integer ids in \[0, 5\), got dtype"):
            layer.apply(params, {}, x)
    with pytest.raises(TypeError, match="Embedding: x must hold integer ids"):  # under jit too
        jax.jit(lambda x: layer.apply(params, {}, x))(np.zeros((1, 2), np.float32))
    y = jax.jit(lambda x: layer.apply(params, {}, x)[0])(np.array([[-1, 5], [0, 4]], np.int32))
    assert np.isnan(y[0]).all() and np.isfinite(y[1]).all()


# ----------------------------------------------------------------------------- attention


def _attention_np(p, x, heads, causal):
    """Multi-head self-attention written out with loops over heads, in float64."""
    p = {k: np.asarray(v, np.float64) for k, v in p.items()}
    x = np.asarray(x, np.float64)
    q, k, v = (x @ p[f"w{n}"] + p[f"b{n}"] for n in "qkv")
    t, d = x.shape[1], q.shape[-1] // heads
    out = []
    for h in range(heads):
        s = slice(h * d, (h + 1) * d)
        logits = q[..., s] @ np.swapaxes(k[..., s], 1, 2) / np.sqrt(d)
        if causal:
            logits = np.where(np.tril(np.ones((t, t))) > 0, logits, -np.inf)
        w = np.exp(logits - logits.max(-1, keepdims=True))
        out.append(w / w.sum(-1, keepdims=True) @ v[..., s])
    return np.concatenate(out, -1) @ p["wo"] + p["bo"]


@pytest.mark.torch
@pytest.mark.parametrize("causal", [False, True])
def test_attention_matches_torch_multiheadattention_forward_and_gradients(causal):
    heads, t, e = 2, 4, 6
    layer = L.MultiHeadAttention(heads, causal=causal)
    params = _params(layer, (t, e))
    x, ct = _randn(2, t, e), _randn(2, t, e)
    y, (gp, gx) = _value_and_grads(layer, params, x, ct)

    mha = torch.nn.MultiheadAttention(e, heads, batch_first=True)
    with torch.no_grad():  # PyTorch stores (out, in) and packs q, k, v in one matrix
        mha.in_proj_weight.copy_(_t(np.concatenate([params[f"w{n}"] for n in "qkv"], 1).T))
        mha.in_proj_bias.copy_(_t(np.concatenate([params[f"b{n}"] for n in "qkv"])))
        mha.out_proj.weight.copy_(_t(params["wo"].T))
        mha.out_proj.bias.copy_(_t(params["bo"]))
    tx = _t(x, True)
    mask = torch.triu(torch.ones(t, t, dtype=torch.bool), 1) if causal else None
    ty = mha(tx, tx, tx, attn_mask=mask, need_weights=False)[0]
    _close(y, ty.detach().numpy())
    gin, gin_b, gout, gout_b, gx_t = _torch_grads(
        ty, ct, mha.in_proj_weight, mha.in_proj_bias, mha.out_proj.weight, mha.out_proj.bias, tx
    )
    _close(gx, gx_t)
    _close(np.concatenate([gp[f"w{n}"] for n in "qkv"], 1).T, gin)
    _close(np.concatenate([gp[f"b{n}"] for n in "qkv"]), gin_b)
    _close(gp["wo"].T, gout)
    _close(gp["bo"], gout_b)


@pytest.mark.torch
def test_attention_with_other_widths_matches_torch_scaled_dot_product_attention():
    heads, t, e, qkv, out = 3, 5, 4, 6, 2
    layer = L.MultiHeadAttention(heads, qkv_features=qkv, out_features=out, causal=True)
    params = _params(layer, (t, e))
    x, ct = _randn(2, t, e), _randn(2, t, out)
    y, (gp, gx) = _value_and_grads(layer, params, x, ct)

    tp = {k: _t(v, True) for k, v in params.items()}
    tx = _t(x, True)
    q, k, v = ((tx @ tp[f"w{n}"] + tp[f"b{n}"]).reshape(2, t, heads, -1).transpose(1, 2) for n in "qkv")
    heads_out = torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True)
    ty = heads_out.transpose(1, 2).reshape(2, t, qkv) @ tp["wo"] + tp["bo"]
    assert y.shape == (2, t, out)
    _close(y, ty.detach().numpy())
    names = sorted(tp)
    for name, want in zip(names + ["x"], _torch_grads(ty, ct, *[tp[n] for n in names], tx)):
        _close(gp[name] if name != "x" else gx, want)


def test_attention_matches_a_numpy_reference():
    layers = [L.MultiHeadAttention(2, qkv_features=4, out_features=3, causal=c) for c in (False, True)]
    params = _params(layers[0], (3, 5))
    x = _randn(2, 3, 5)
    ys = jax.jit(lambda p, x: [m.apply(p, {}, x)[0] for m in layers])(params, x)
    for y, causal in zip(ys, (False, True)):
        _close(y, _attention_np(params, x, 2, causal))


def test_attention_gradients_match_finite_differences():
    layer = L.MultiHeadAttention(2, qkv_features=4, causal=True)
    params = jax.tree.map(lambda a: np.asarray(a, np.float64), _params(layer, (3, 2), scale=0.7))
    with jax.enable_x64(True):
        x = jnp.asarray(_randn(2, 3, 2), jnp.float64)
        f = jax.jit(lambda p, x: layer.apply(p, {}, x)[0])
        check_grads(f, (params, x), order=1, modes=("rev",), eps=1e-5, atol=1e-5, rtol=1e-5)


def test_causal_attention_output_at_t_does_not_depend_on_inputs_after_t():
    t = 5
    layers = [L.MultiHeadAttention(2, causal=c) for c in (True, False)]
    params = _params(layers[0], (t, 4))
    x = _randn(1, t, 4)
    x2 = x.copy()
    x2[0, -1] += 1.0

    @jax.jit
    def run(x, x2):
        fs = [lambda x, m=m: m.apply(params, {}, x)[0] for m in layers]
        return [(jax.jacobian(f)(x), f(x2) - f(x)) for f in fs]

    later = np.triu(np.ones((t, t), bool), 1)  # s > t
    for (jac, change), causal in zip(run(x, x2), (True, False)):
        dependence = np.abs(np.asarray(jac)[0, :, :, 0]).sum(axis=(1, 3))  # |d y[t] / d x[s]|: (t, s)
        changed = np.abs(np.asarray(change)).max(-1)[0] > 0  # changing the last input changes ...
        if causal:
            assert np.all(dependence[later] == 0) and np.all(dependence[~later] > 0)
            assert changed.tolist() == [False] * (t - 1) + [True]  # ... only the last output
        else:
            assert np.all(dependence > 0) and changed.all()


def test_attention_dropout_drops_weights_in_training_only_and_needs_a_key():
    layer = L.MultiHeadAttention(2, dropout=0.5)
    params = _params(layer, (4, 4))
    x = _randn(3, 4, 4)

    @jax.jit
    def run(p, x):
        return [
            layer.apply(p, {}, x, train=False, key=KEY)[0],
            layer.apply(p, {}, x, train=True, key=jax.random.key(1))[0],
            layer.apply(p, {}, x, train=True, key=jax.random.key(2))[0],
            L.MultiHeadAttention(2).apply(p, {}, x, train=True)[0],
        ]

    y_eval, a, b, no_drop = run(params, x)
    np.testing.assert_array_equal(no_drop, y_eval)
    assert not np.allclose(a, y_eval) and not np.allclose(a, b)
    with pytest.raises(ValueError, match=r"MultiHeadAttention: apply\(..., train=True\) .* needs a PRNG key"):
        layer.apply(params, {}, x, train=True)


# ----------------------------------------------------------------------------- Residual


def test_residual_adds_its_input_and_threads_state():
    dense, bn = L.Dense(4), L.BatchNorm(momentum=0.5)
    res = L.Residual(bn)
    out, rp, rs = res.init(KEY, (4,))
    _, bp, bs = bn.init(KEY, (4,))
    assert out == (4,) and rp.keys() == bp.keys() and rs.keys() == bs.keys()  # bn's own, not nested
    model = L.Sequential(L.Dense(4), L.Residual(L.Sequential(L.BatchNorm(), L.Relu())))
    _, params, state = jax.eval_shape(lambda: model.init(KEY, (3,)))
    assert set(state) == {"residual_1"} and set(state["residual_1"]) == {"batchnorm_0"}
    p, x = _params(dense, (4,)), _randn(3, 4)

    @jax.jit
    def run(p, x):
        return (
            L.Residual(dense).apply(p, {}, x)[0],
            res.apply(bp, bs, x, train=True),
            bn.apply(bp, bs, x, train=True),
        )

    y_dense, (y, new_state), (y_bn, bn_state) = run(p, x)
    _close(y_dense, x + x @ p["w"] + p["b"])
    _close(y, x + y_bn, 0)
    jax.tree.map(lambda a, b: _close(a, b, 0), new_state, bn_state)
    assert not np.allclose(new_state["mean"], bs["mean"])


def test_residual_refuses_a_shape_change_and_non_layers_by_name():
    with pytest.raises(
        ValueError, match=r"Residual: layer Dense maps input_shape \(4,\) to \(3,\); y = x \+ layer\(x\)"
    ):
        jax.eval_shape(lambda: L.Residual(L.Dense(3)).init(KEY, (4,)))
    with pytest.raises(
        TypeError, match=r"Residual: layer must be a layer object .* \(did you mean Relu\(\)\?\)"
    ):
        L.Residual(L.Relu)
    with pytest.raises(TypeError, match="Residual: layer must be a layer object"):
        L.Residual(jnp.tanh)


# ----------------------------------------------------------------------------- Add, GlobalAvgPool


def test_add_sums_its_branches_and_keys_them_like_sequential():
    dense, bn = L.Dense(4), L.BatchNorm(momentum=0.5)
    add = L.Add(dense, L.Relu(), bn)
    out, params, state = add.init(KEY, (4,))
    assert out == (4,) and set(params) == {"dense_0", "batchnorm_2"} and set(state) == {"batchnorm_2"}
    x = _randn(3, 4)
    y, new_state = jax.jit(lambda p, s, x: add.apply(p, s, x, train=True))(params, state, x)
    p, bp = params["dense_0"], params["batchnorm_2"]
    y_bn, bn_state = bn.apply(bp, state["batchnorm_2"], x, train=True)
    _close(y, x @ p["w"] + p["b"] + jnp.maximum(x, 0) + y_bn)
    jax.tree.map(_close, new_state["batchnorm_2"], bn_state)


def test_add_refuses_branches_of_different_shapes_by_name():
    with pytest.raises(ValueError, match=r"Add: the branches map input_shape \(4,\) to different shapes"):
        jax.eval_shape(lambda: L.Add(L.Dense(3), L.Relu()).init(KEY, (4,)))
    with pytest.raises(
        TypeError, match=r"Add: layer 1 must be a layer object .* \(did you mean Relu\(\)\?\)"
    ):
        L.Add(L.Dense(3), L.Relu)
    with pytest.raises(ValueError, match="Add: expected at least one branch"):
        L.Add()


def test_global_avg_pool_is_avg_pool_over_the_whole_map():
    x = _randn(2, 3, 5, 4)
    y, _ = L.GlobalAvgPool().apply({}, {}, x)
    pooled, _ = L.AvgPool((3, 5)).apply({}, {}, x)
    assert L.GlobalAvgPool().init(KEY, (3, 5, 4))[0] == (4,)
    _close(y, pooled.reshape(2, 4))


# ----------------------------------------------------------------------------- together


def _tiny_lm(vocab=7, width=4):
    return L.Sequential(
        L.Embedding(vocab, width),
        L.Residual(L.Sequential(L.LayerNorm(), L.MultiHeadAttention(2, causal=True))),
        L.Residual(L.Sequential(L.RMSNorm(), L.Dense(8), L.Gelu(), L.Dense(width))),
        L.LayerNorm(),
        L.Dense(vocab),
    )


def _tiny_lm_np(p, ids):
    """`_tiny_lm` written out in numpy with the references above."""
    x = np.asarray(p["embedding_0"]["w"], np.float64)[ids]
    r = p["residual_1"]
    ln = r["layernorm_0"]
    x = x + _attention_np(
        r["multiheadattention_1"], _layer_norm_np(x, ln["gamma"], ln["beta"], 1e-5), 2, True
    )
    r = p["residual_2"]
    h = _rms_norm_np(x, r["rmsnorm_0"]["gamma"], 1e-6) @ r["dense_1"]["w"] + r["dense_1"]["b"]
    x = x + _gelu_np(h, False) @ r["dense_3"]["w"] + r["dense_3"]["b"]
    x = _layer_norm_np(x, p["layernorm_3"]["gamma"], p["layernorm_3"]["beta"], 1e-5)
    return x @ p["dense_4"]["w"] + p["dense_4"]["b"]


def test_a_tiny_transformer_works_under_jit_and_vmap_over_models():
    model = _tiny_lm()
    ids = np.array([[1, 2, 3], [6, 0, 0]], np.int32)
    out = []
    jax.eval_shape(lambda: out.append(model.init(KEY, (3,))))  # shapes only: nothing compiled
    assert out[0][0] == (3, 7) and out[0][2] == {}
    models = [_params(model, (3,)) for _ in range(2)]
    stacked = jax.tree.map(lambda *a: np.stack(a), *models)

    @jax.jit
    def run(stacked, ids):  # one compilation for both
        apply = lambda p, x: model.apply(p, {}, x)[0]  # noqa: E731
        p0 = jax.tree.map(lambda a: a[0], stacked)
        return jax.vmap(apply, (0, None))(stacked, ids), jax.vmap(lambda x: apply(p0, x[None])[0])(ids)

    (y0, y1), over_examples = run(stacked, ids)
    _close(y0, _tiny_lm_np(models[0], ids), 1e-4)
    _close(y1, _tiny_lm_np(models[1], ids), 1e-4)
    _close(over_examples, y0)
    assert not np.allclose(y0, y1)


def test_new_layers_are_exported_from_jaxdl():
    for name in ("LayerNorm", "RMSNorm", "Embedding", "Gelu", "MultiHeadAttention", "Residual"):
        assert getattr(dl, name) is getattr(L, name) and name in L.__all__


# ----------------------------------------------------------------------------- bad arguments


@pytest.mark.parametrize(
    "make,error,match",
    [
        (
            lambda: L.LayerNorm(eps=0.0),
            ValueError,
            r"LayerNorm: eps=0.0 is out of range; expected finite eps",
        ),
        (lambda: L.LayerNorm(use_scale=1), TypeError, r"LayerNorm: use_scale must be a bool, got 1"),
        (lambda: L.RMSNorm(eps=-1e-6), ValueError, r"RMSNorm: eps=-1e-06 is out of range"),
        (lambda: L.RMSNorm(eps="a"), TypeError, r"RMSNorm: eps must be a real number, got 'a'"),
        (lambda: L.Embedding(0, 3), ValueError, r"Embedding: num_embeddings=0 is out of range"),
        (lambda: L.Embedding(5, 2.0), TypeError, r"Embedding: features must be an int, got 2.0"),
        (lambda: L.Embedding(5, 2, w_init=1.0), TypeError, r"Embedding: w_init must be an initializer"),
        (lambda: L.Gelu("tanh"), TypeError, r"Gelu: approximate must be a bool, got 'tanh' of type str"),
        (lambda: L.MultiHeadAttention(0), ValueError, r"MultiHeadAttention: num_heads=0 is out of range"),
        (
            lambda: L.MultiHeadAttention(4, qkv_features=6),
            ValueError,
            r"MultiHeadAttention: qkv_features=6 is not divisible by num_heads=4",
        ),
        (
            lambda: L.MultiHeadAttention(2, out_features=0),
            ValueError,
            r"MultiHeadAttention: out_features=0 is out of range; expected an integer >= 1 or None",
        ),
        (
            lambda: L.MultiHeadAttention(2, dropout=1.0),
            ValueError,
            r"MultiHeadAttention: dropout=1.0 is out of range; expected finite dropout with 0 <= dropout < 1",
        ),
        (
            lambda: L.MultiHeadAttention(2, causal="yes"),
            TypeError,
            r"MultiHeadAttention: causal must be a bool",
        ),
    ],
)
def test_bad_hyperparameters_are_refused_by_name_when_built(make, error, match):
    with pytest.raises(error, match=match):
        make()


def test_attention_refuses_indivisible_features_and_wrong_ranks_at_init():
    with pytest.raises(
        ValueError, match=r"qkv_features \(the input's features\)=5 is not divisible by num_heads=2"
    ):
        L.MultiHeadAttention(2).init(KEY, (3, 5))
    with pytest.raises(
        ValueError, match=r"MultiHeadAttention: input_shape must have rank 2 \(seq, features\)"
    ):
        L.MultiHeadAttention(2).init(KEY, (4,))
    with pytest.raises(ValueError, match=r"LayerNorm: input_shape must have rank at least 1"):
        L.LayerNorm().init(KEY, ())
