"""`models.transformer_lm` and token sequences through the engine: the forward pass against
PyTorch's pre-LN encoder layer with a causal mask, causality, the per-token loss with padding
(ignore_index -100) against optax and ``torch.nn.functional.cross_entropy``, and `fit` against a
hand-written optax loop over the same batches."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import jaxdl as dl
from jaxdl import data, models
from jaxdl import layers as L

try:
    import torch
except ImportError:  # Python 3.12+: no torch; the tests marked `torch` skip (conftest.py)
    torch = None

V, T, WIDTH, HEADS, DEPTH = 11, 6, 16, 2, 2
PAD = dl.IGNORE_INDEX


def leaves(tree):
    return [np.asarray(a) for a in jax.tree.leaves(tree)]


@pytest.fixture(scope="module")
def lm():
    """The model, parameters made less trivial than init's (biases and norms not 0/1), and its
    jitted forward pass (one compiled program for the tests of this module)."""
    model = models.transformer_lm(V, seq_len=T + 2, depth=DEPTH, width=WIDTH, heads=HEADS)
    _, params, _ = model.init(jax.random.key(0), (T,))
    rng = np.random.default_rng(1)
    params = jax.tree.map(lambda a: np.asarray(a) + 0.1 * rng.normal(size=a.shape).astype(np.float32), params)
    forward = jax.jit(lambda p, x: model.apply(p, {}, x)[0])
    return model, params, forward


def tokens(rng, n, t=T):
    return rng.integers(0, V, (n, t)).astype(np.int32)


# ----------------------------------------------------------------------------- the model


@pytest.mark.torch
def test_forward_matches_torch_pre_ln_encoder_layers_with_a_causal_mask(lm):
    model, params, forward = lm
    x = tokens(np.random.default_rng(0), 3)
    got = np.asarray(forward(params, x))

    t = lambda a: torch.tensor(np.asarray(a))  # noqa: E731
    blocks = []
    for i in range(DEPTH):
        attn, mlp = params[f"residual_{2 + 2 * i}"], params[f"residual_{3 + 2 * i}"]
        mha = attn["multiheadattention_1"]
        layer = torch.nn.TransformerEncoderLayer(
            WIDTH, HEADS, 4 * WIDTH, dropout=0.0, activation="gelu", batch_first=True, norm_first=True
        )
        sd = {
            "self_attn.in_proj_weight": t(np.concatenate([mha["wq"], mha["wk"], mha["wv"]], 1).T),
            "self_attn.in_proj_bias": t(np.concatenate([mha["bq"], mha["bk"], mha["bv"]])),
            "self_attn.out_proj.weight": t(mha["wo"].T),
            "self_attn.out_proj.bias": t(mha["bo"]),
            "linear1.weight": t(mlp["dense_1"]["w"].T),
            "linear1.bias": t(mlp["dense_1"]["b"]),
            "linear2.weight": t(mlp["dense_3"]["w"].T),
            "linear2.bias": t(mlp["dense_3"]["b"]),
            "norm1.weight": t(attn["layernorm_0"]["gamma"]),
            "norm1.bias": t(attn["layernorm_0"]["beta"]),
            "norm2.weight": t(mlp["layernorm_0"]["gamma"]),
            "norm2.bias": t(mlp["layernorm_0"]["beta"]),
        }
        layer.load_state_dict(sd)
        blocks.append(layer.eval())
    ln_f = torch.nn.LayerNorm(WIDTH)
    ln_f.load_state_dict(
        {"weight": t(params["layernorm_6"]["gamma"]), "bias": t(params["layernorm_6"]["beta"])}
    )
    mask = torch.nn.Transformer.generate_square_subsequent_mask(T)
    with torch.no_grad():
        h = torch.nn.functional.embedding(t(x).long(), t(params["embedding_0"]["w"]))
        h = h + t(params["positionalembedding_1"]["w"][:T])
        for layer in blocks:
            h = layer(h, src_mask=mask, is_causal=True)
        want = ln_f(h) @ t(params["dense_7"]["w"]) + t(params["dense_7"]["b"])
    assert got.shape == (3, T, V)
    np.testing.assert_allclose(got, want.numpy(), rtol=1e-4, atol=1e-5)


def _layer_norm_np(x, p, eps=1e-5):
    mu = x.mean(-1, keepdims=True)
    return (x - mu) / np.sqrt(((x - mu) ** 2).mean(-1, keepdims=True) + eps) * p["gamma"] + p["beta"]


def _causal_attention_np(p, x, heads):
    b, t, _ = x.shape
    q, k, v = ((x @ p[f"w{n}"] + p[f"b{n}"]).reshape(b, t, heads, -1) for n in "qkv")
    logits = np.einsum("bthd,bshd->bhts", q, k) / np.sqrt(q.shape[-1])
    logits = np.where(np.tril(np.ones((t, t), bool)), logits, -np.inf)
    w = np.exp(logits - logits.max(-1, keepdims=True))
    heads_out = np.einsum("bhts,bshd->bthd", w / w.sum(-1, keepdims=True), v)
    return heads_out.reshape(b, t, -1) @ p["wo"] + p["bo"]


def _transformer_lm_np(params, ids):
    """GPT-2's forward pass (Radford et al. 2019) written out in float64 numpy."""
    p = jax.tree.map(lambda a: np.asarray(a, np.float64), params)
    erf = np.vectorize(math.erf)
    h = p["embedding_0"]["w"][ids] + p["positionalembedding_1"]["w"][: ids.shape[1]]
    for i in range(DEPTH):
        attn, mlp = p[f"residual_{2 + 2 * i}"], p[f"residual_{3 + 2 * i}"]
        h = h + _causal_attention_np(
            attn["multiheadattention_1"], _layer_norm_np(h, attn["layernorm_0"]), HEADS
        )
        z = _layer_norm_np(h, mlp["layernorm_0"]) @ mlp["dense_1"]["w"] + mlp["dense_1"]["b"]
        h = h + (0.5 * z * (1 + erf(z / np.sqrt(2)))) @ mlp["dense_3"]["w"] + mlp["dense_3"]["b"]
    return _layer_norm_np(h, p[f"layernorm_{2 + 2 * DEPTH}"]) @ p["dense_7"]["w"] + p["dense_7"]["b"]


def test_forward_matches_a_numpy_gpt2(lm):
    _, params, forward = lm
    x = tokens(np.random.default_rng(0), 3)
    np.testing.assert_allclose(
        np.asarray(forward(params, x)), _transformer_lm_np(params, x), rtol=1e-4, atol=1e-5
    )


def test_changing_token_t_changes_no_logit_before_t(lm):
    _, params, forward = lm
    rng = np.random.default_rng(2)
    x = tokens(rng, 1)
    changed = np.repeat(x, T, axis=0)  # row t: token t replaced
    changed[np.arange(T), np.arange(T)] = (x[0] + 1) % V
    base = np.asarray(forward(params, np.repeat(x, T, axis=0)))
    out = np.asarray(forward(params, changed))
    for t in range(T):
        np.testing.assert_array_equal(out[t, :t], base[t, :t], err_msg=f"token {t} changed an earlier logit")
        assert np.abs(out[t, t] - base[t, t]).max() > 1e-4, f"token {t} changed nothing at {t}"


def test_a_shorter_sequence_uses_the_first_positions(lm):
    """PositionalEmbedding(max_len) on T' < max_len: the logits of the first T' positions of a
    causal model do not depend on the positions after them, so they equal the full run's."""
    model, params, forward = lm
    x = tokens(np.random.default_rng(3), 2)
    full = np.asarray(forward(params, x))
    short = np.asarray(jax.jit(lambda p, x: model.apply(p, {}, x)[0])(params, x[:, :4]))
    np.testing.assert_allclose(short, full[:, :4], rtol=1e-5, atol=1e-6)


def test_bad_arguments_are_refused_by_name():
    with pytest.raises(ValueError, match=r"width=10 is not divisible by heads=4"):
        models.transformer_lm(V, seq_len=8, depth=1, width=10, heads=4)
    with pytest.raises(ValueError, match=r"transformer_lm: depth=0"):
        models.transformer_lm(V, seq_len=8, depth=0, width=8, heads=2)
    with pytest.raises(ValueError, match=r"transformer_lm: dropout=1.0"):
        models.transformer_lm(V, seq_len=8, depth=1, width=8, heads=2, dropout=1.0)
    with pytest.raises(ValueError, match=r"9 positions, more than max_len=8"):
        L.PositionalEmbedding(8).init(jax.random.key(0), (9, 4))
    with pytest.raises(ValueError, match=r"PositionalEmbedding: max_len=0"):
        L.PositionalEmbedding(0)


# ----------------------------------------------------------------------------- the loss


@pytest.fixture(scope="module")
def loss_and_grad():
    return jax.jit(jax.value_and_grad(dl.softmax_cross_entropy))


def padded_targets(rng, n, pads):
    """Targets (n, T) whose row i ends in pads[i] padding targets."""
    y = tokens(rng, n)
    for i, p in enumerate(pads):
        y[i, T - p :] = PAD
    return y


def test_cross_entropy_is_the_mean_over_non_padding_tokens_as_optax(loss_and_grad):
    rng = np.random.default_rng(4)
    logits = rng.normal(size=(3, T, V)).astype(np.float32)
    y = padded_targets(rng, 3, (0, 2, 5))
    loss, grad = loss_and_grad(logits, y)
    mask = y != PAD
    per_token = np.asarray(optax.softmax_cross_entropy_with_integer_labels(logits, np.where(mask, y, 0)))
    np.testing.assert_allclose(float(loss), per_token[mask].mean(), rtol=1e-6)
    np.testing.assert_array_equal(np.asarray(grad)[~mask], 0.0)  # padding positions get no gradient
    acc = dl.accuracy(logits, y)
    np.testing.assert_allclose(float(acc), np.mean(logits.argmax(-1)[mask] == y[mask]), rtol=1e-6)
    loss, grad = loss_and_grad(logits, np.full_like(y, PAD))  # nothing counted
    assert float(loss) == 0.0 and not np.asarray(grad).any()


@pytest.mark.torch
def test_cross_entropy_and_its_gradient_match_torch_ignore_index(loss_and_grad):
    rng = np.random.default_rng(5)
    logits = rng.normal(size=(3, T, V)).astype(np.float32)
    y = padded_targets(rng, 3, (1, 0, 4))
    loss, grad = loss_and_grad(logits, y)
    z = torch.tensor(logits, requires_grad=True)
    want = torch.nn.functional.cross_entropy(
        z.reshape(-1, V), torch.tensor(y).long().reshape(-1), ignore_index=-100
    )
    want.backward()
    np.testing.assert_allclose(float(loss), want.item(), rtol=1e-6)
    np.testing.assert_allclose(np.asarray(grad), z.grad.numpy(), rtol=1e-5, atol=1e-7)


def test_check_labels_takes_token_targets_with_padding_and_refuses_out_of_range():
    y = padded_targets(np.random.default_rng(6), 2, (0, 3))
    dl.train_step.check_labels(y, V, "fit", ignore_index=PAD)
    y[0, 1] = V
    with pytest.raises(ValueError, match=rf"fit: labels=\[{V}\] is out of range.*\[0, {V}\).*\(or -100"):
        dl.train_step.check_labels(y, V, "fit", ignore_index=PAD)
    with pytest.raises(ValueError, match=r"labels=\[-100\] is out of range"):  # padding only where allowed
        dl.train_step.check_labels(np.array([[0, -100]]), V)


# ----------------------------------------------------------------------------- fit and evaluate

N, BATCH, EPOCHS, LR, SEED = 16, 4, 2, 0.3, 1


def optimizer():
    """SGD with momentum, not Adam: the key bias of attention has an exactly zero gradient
    (softmax ignores a constant added to every logit of a row), so its float noise (~1e-9) is all
    Adam would normalize, and two correct programs would take different steps there."""
    return optax.sgd(LR, momentum=0.9)


@pytest.fixture(scope="module")
def token_data():
    rng = np.random.default_rng(7)
    x = tokens(rng, N)
    y = np.concatenate([x[:, 1:], rng.integers(0, V, (N, 1))], axis=1).astype(np.int32)
    pads = rng.integers(0, 4, N)
    for i, p in enumerate(pads):
        y[i, T - p :] = PAD
    return x, y


@pytest.fixture(scope="module")
def small_lm():
    return models.transformer_lm(V, seq_len=T, depth=1, width=8, heads=2)


@pytest.fixture(scope="module")
def fitted(small_lm, token_data):
    return dl.fit(
        small_lm, optimizer(), token_data, epochs=EPOCHS, batch_size=BATCH, seed=SEED, progress=False
    )


def test_fit_on_tokens_equals_a_hand_written_optax_loop_with_a_masked_loss(small_lm, token_data, fitted):
    x, y = token_data
    model_key, data_key, _ = dl.trainer.run_keys(SEED)
    _, params, _ = small_lm.init(jax.random.split(model_key)[0], (T,))  # TrainState.create's split
    tx = optimizer()
    opt_state = tx.init(params)

    def loss(p, xb, yb):
        logits = small_lm.apply(p, {}, xb)[0]
        mask = yb != PAD
        ce = optax.softmax_cross_entropy_with_integer_labels(logits, jnp.where(mask, yb, 0))
        return jnp.sum(ce * mask) / jnp.sum(mask)

    @jax.jit
    def step(p, s, xb, yb):
        value, g = jax.value_and_grad(loss)(p, xb, yb)
        u, s = tx.update(g, s, p)
        return optax.apply_updates(p, u), s, value

    losses = []
    for epoch in range(EPOCHS):
        for xb, yb in data.batches(x, y, BATCH, data_key, epoch):
            params, opt_state, value = step(params, opt_state, xb, yb)
            losses.append(float(value))
    assert fitted.steps == EPOCHS * N // BATCH
    for got, want in zip(leaves(fitted.state.params), leaves(params)):
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
    per_epoch = N // BATCH
    for e in range(EPOCHS):
        want = np.mean(losses[e * per_epoch : (e + 1) * per_epoch])
        assert fitted.history[e]["train_loss"] == pytest.approx(want, rel=1e-5)


def test_padding_tokens_change_nothing(small_lm, token_data, fitted):
    """Inputs at positions whose target and every later target are padding do not reach a
    counted logit (causal attention), so changing them changes no parameter."""
    x, y = token_data
    other = x.copy()
    for i in range(N):
        pad = y[i] == PAD
        other[i, pad] = (x[i, pad] + 3) % V
    assert (other != x).any()
    result = dl.fit(
        small_lm, optimizer(), (other, y), epochs=EPOCHS, batch_size=BATCH, seed=SEED, progress=False
    )
    for got, want in zip(leaves(result.state.params), leaves(fitted.state.params)):
        np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-7)


def test_evaluate_is_the_mean_over_every_non_padding_token(small_lm, token_data, fitted):
    x, y = token_data
    got = dl.evaluate(small_lm, fitted.state, (x, y), batch_size=5)  # 5 + 5 + 5 + 1, unequal pads
    logits = np.asarray(jax.jit(lambda p, x: small_lm.apply(p, {}, x)[0])(fitted.state.params, x), np.float64)
    logp = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
    mask = y != PAD
    nll = -np.take_along_axis(logp, np.where(mask, y, 0)[..., None], -1)[..., 0]
    assert got["loss"] == pytest.approx(nll[mask].mean(), rel=1e-5)
    assert got["accuracy"] == pytest.approx(np.mean(logits.argmax(-1)[mask] == y[mask]), abs=1e-6)


def test_fit_refuses_token_targets_out_of_range(small_lm, token_data):
    x, y = token_data
    bad = y.copy()
    bad[2, 0] = V
    with pytest.raises(
        ValueError, match=rf"fit: train labels=\[{V}\] is out of range; expected .*\[0, {V}\)"
    ):
        dl.fit(small_lm, optimizer(), (x, bad), epochs=1, batch_size=BATCH, progress=False)
