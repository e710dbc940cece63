"""Muon, schedule-free AdamW/SGD, parameter groups and `optax.inject_hyperparams`, each against
its reference: ``torch.optim.Muon`` / ``torch.optim.AdamW`` (tests marked ``torch``),
``optax.contrib``'s schedule-free optimizers, numpy's SVD and forward pass."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import optax.contrib
import pytest

import jaxdl as dl
from jaxdl import layers as L
from jaxdl import transforms as T

try:
    import torch
except ImportError:  # Python 3.12+: no torch; the tests marked `torch` skip (conftest.py)
    torch = None

STEPS = 6


def _matrices(seed=0):
    """A least-squares problem on a wide and a tall kernel (jaxdl layout (in, out)) and a bias."""
    rng = np.random.default_rng(seed)
    params = {
        "w1": rng.normal(0, 0.5, (6, 4)).astype(np.float32),
        "w2": rng.normal(0, 0.5, (4, 9)).astype(np.float32),
        "b": rng.normal(0, 0.1, (9,)).astype(np.float32),
    }
    xs = rng.normal(size=(STEPS, 8, 6)).astype(np.float32)
    ys = rng.normal(size=(STEPS, 8, 9)).astype(np.float32)
    return params, xs, ys


def _np_grads(p, x, y):
    """Gradients of ``0.5 |(x w1) w2 + b - y|^2 / n`` in numpy (the same function feeds torch)."""
    h = x @ p["w1"]
    r = (h @ p["w2"] + p["b"] - y) / len(x)
    return {"w1": x.T @ (r @ p["w2"].T), "w2": h.T @ r, "b": r.sum(0)}


def _run_jax(tx, params, xs, ys):
    update = jax.jit(tx.update)
    p = jax.tree.map(jnp.asarray, params)
    state = tx.init(p)
    for x, y in zip(xs, ys):
        g = _np_grads(jax.tree.map(np.asarray, p), x, y)
        u, state = update(jax.tree.map(jnp.asarray, g), state, p)
        p = dl.apply_updates(p, u)
    return jax.tree.map(np.asarray, p)


# ----------------------------------------------------------------------------- Muon


@pytest.mark.torch
@pytest.mark.parametrize(("nesterov", "adjust_lr"), [(True, "original"), (False, "match_rms_adamw")])
def test_muon_matches_torch_muon_on_kernels_and_adamw_on_the_bias(nesterov, adjust_lr):
    """Step for step: both get the same gradients at the same params each step (torch's params
    are reset to ours after the comparison), while each keeps its own momentum and moments. Over
    a free-running trajectory a last-bit difference in a gradient can flip a bfloat16 rounding of
    the Newton-Schulz iterates, and the two runs then part by about ``lr * 2^-8`` per step."""
    params, xs, ys = _matrices()
    lr, wd = 0.02, 0.1
    tx = dl.muon(lr, nesterov=nesterov, weight_decay=wd, adjust_lr=adjust_lr)
    update = jax.jit(tx.update)
    p = jax.tree.map(jnp.asarray, params)
    state = tx.init(p)
    # torch: Linear weights are (out, in), so the kernels go in transposed
    to_torch = lambda v: np.ascontiguousarray(v.T) if v.ndim == 2 else np.asarray(v)  # noqa: E731
    t = {k: torch.tensor(to_torch(v), requires_grad=True) for k, v in params.items()}
    muon = torch.optim.Muon(
        [t["w1"], t["w2"]], lr=lr, weight_decay=wd, nesterov=nesterov, adjust_lr_fn=adjust_lr
    )
    adamw = torch.optim.AdamW([t["b"]], lr=lr, weight_decay=0.0)
    for x, y in zip(xs, ys):
        g = _np_grads(jax.tree.map(np.asarray, p), x, y)
        u, state = update(jax.tree.map(jnp.asarray, g), state, p)
        p = dl.apply_updates(p, u)
        for k in t:
            t[k].grad = torch.tensor(to_torch(g[k]))
        muon.step()
        adamw.step()
        for k in t:
            want = t[k].detach().numpy()
            np.testing.assert_allclose(to_torch(np.asarray(p[k])), want, rtol=1e-5, atol=1e-6, err_msg=k)
            with torch.no_grad():
                t[k].copy_(torch.tensor(to_torch(np.asarray(p[k]))))
    assert np.abs(np.asarray(p["w1"]) - params["w1"]).max() > 2 * lr  # it moved


def test_orthogonalize_keeps_the_singular_vectors_and_maps_singular_values_near_one():
    rng = np.random.default_rng(1)
    g = rng.normal(size=(7, 4)).astype(np.float32) * np.array([10.0, 1.0, 0.1, 0.01], np.float32)
    o = np.asarray(jax.jit(lambda g: dl.orthogonalize(g, ns_dtype="float32"))(g))
    u, _, vt = np.linalg.svd(g, full_matrices=False)
    core = u.T @ o @ vt.T  # U^T O V: diagonal with entries in Jordan's band when O = U S' V^T
    np.testing.assert_allclose(core - np.diag(np.diag(core)), 0.0, atol=1e-4)
    s = np.diag(core)
    assert s[:3].min() > 0.6 and s.max() < 1.25, s  # the 0.01 direction grows, but from far below
    assert s[3] > 0.05


def test_scale_by_muon_refuses_leaves_that_are_not_matrices_and_bad_settings():
    with pytest.raises(ValueError, match=r"scale_by_muon: leaf \['b'\] has shape \(3,\); Muon takes 2-D"):
        dl.scale_by_muon().init({"w": jnp.ones((2, 3)), "b": jnp.ones(3)})
    with pytest.raises(ValueError, match="adjust_lr='spectral' is not allowed"):
        dl.muon(0.02, adjust_lr="spectral")
    with pytest.raises(ValueError, match=r"ns_steps=0 is out of range; expected an integer in \[1, 99\]"):
        dl.muon(0.02, ns_steps=0)
    with pytest.raises(ValueError, match="ns_coefficients=\\(1.0, 2.0\\) is not allowed"):
        dl.scale_by_muon(ns_coefficients=(1.0, 2.0))
    with pytest.raises(ValueError, match=r"scale_by_muon: momentum=1.0 is out of range"):
        dl.muon(0.02, momentum=1.0)
    with pytest.raises(ValueError, match=r"muon: lr=-1.0 is out of range"):
        dl.muon(-1.0)
    with pytest.raises(TypeError, match="muon: others must be an optax.GradientTransformation"):
        dl.muon(0.02, others=dl.adam)


# ----------------------------------------------------------------------------- schedule-free


@pytest.mark.parametrize(
    ("ours", "ref"),
    [
        (
            lambda: dl.schedule_free_adamw(0.1, b2=0.99, weight_decay=0.01),
            lambda: optax.contrib.schedule_free_adamw(0.1, b2=0.99, weight_decay=0.01),
        ),
        (
            lambda: dl.schedule_free_adamw(optax.warmup_constant_schedule(0.0, 0.1, 3)),
            lambda: optax.contrib.schedule_free_adamw(0.1, warmup_steps=3),
        ),
        (
            lambda: dl.schedule_free_sgd(0.05, b1=0.8, weight_decay=0.1),
            lambda: optax.contrib.schedule_free_sgd(0.05, b1=0.8, weight_decay=0.1),
        ),
    ],
    ids=["adamw", "adamw-warmup", "sgd"],
)
def test_schedule_free_matches_optax_contrib_params_and_eval_params(ours, ref):
    params, xs, ys = _matrices()
    results = []
    for tx in (ours(), ref()):

        @jax.jit
        def run(p, xs, ys, tx=tx):
            def body(carry, xy):
                p, s = carry
                h = xy[0] @ p["w1"]
                r = (h @ p["w2"] + p["b"] - xy[1]) / xy[0].shape[0]
                g = {"w1": xy[0].T @ (r @ p["w2"].T), "w2": h.T @ r, "b": r.sum(0)}
                u, s = tx.update(g, s, p)
                return (optax.apply_updates(p, u), s), None

            (p, s), _ = jax.lax.scan(body, (p, tx.init(p)), (xs, ys))
            return p, s

        p, s = run(params, xs, ys)
        results.append((p, s))
    (p1, s1), (p2, s2) = results
    for k in params:
        np.testing.assert_allclose(np.asarray(p1[k]), np.asarray(p2[k]), rtol=1e-6, atol=1e-7, err_msg=k)
    x1, x2 = dl.schedule_free_eval_params(s1, p1), optax.contrib.schedule_free_eval_params(s2, p2)
    for k in params:
        np.testing.assert_allclose(np.asarray(x1[k]), np.asarray(x2[k]), rtol=1e-6, atol=1e-7, err_msg=k)
        assert np.abs(np.asarray(x1[k]) - np.asarray(p1[k])).max() > 1e-4  # x differs from y


def test_schedule_free_refuses_bad_settings_and_an_update_without_params():
    with pytest.raises(
        ValueError, match=r"schedule_free: b1=0.0 is out of range; expected finite b1 with 0 < b1"
    ):
        dl.schedule_free_adamw(0.1, b1=0.0)
    with pytest.raises(ValueError, match=r"schedule_free_sgd: lr=-0.1 is out of range"):
        dl.schedule_free_sgd(-0.1)
    with pytest.raises(ValueError, match=r"scale_by_adam: b2=1.0 is out of range"):
        dl.schedule_free_adamw(0.1, b2=1.0)
    tx = dl.schedule_free_sgd(0.1)
    p = {"w": jnp.ones(2)}
    with pytest.raises(ValueError, match="schedule_free: update needs params"):
        tx.update(p, tx.init(p))


def _forward_loss(params, x, y):
    """Mean softmax cross-entropy of Dense-Tanh-Dense in numpy: the reference forward pass."""
    h = np.tanh(x @ params["dense_0"]["w"] + params["dense_0"]["b"])
    logits = h @ params["dense_2"]["w"] + params["dense_2"]["b"]
    logits = logits - logits.max(1, keepdims=True)
    logp = logits - np.log(np.exp(logits).sum(1, keepdims=True))
    return float(-np.mean(logp[np.arange(len(y)), y]))


def _data(n, seed):
    rng = np.random.default_rng(seed)
    return rng.normal(size=(n, 6)).astype(np.float32), rng.integers(0, 3, n).astype(np.int32)


def _mlp():
    return L.Sequential(L.Dense(8), L.Tanh(), L.Dense(3))


def test_fit_validates_schedule_free_at_its_evaluation_params():
    val, train, tx = _data(16, seed=1), _data(64, seed=0), dl.schedule_free_adamw(0.05)
    result = dl.fit(_mlp(), tx, train, validation=val, epochs=2, batch_size=16, progress=False)
    is_sf = lambda s: isinstance(s, T.ScheduleFreeState)  # noqa: E731
    sf = [s for s in jax.tree.leaves(result.state.opt_state, is_leaf=is_sf) if is_sf(s)]
    y = jax.tree.map(np.asarray, result.state.params)
    x = jax.tree.map(np.asarray, optax.contrib.schedule_free_eval_params(sf[0], result.state.params))
    want = _forward_loss(x, *val)
    assert abs(_forward_loss(y, *val) - want) > 1e-4  # the test can tell x from y
    assert result.history[-1]["val_loss"] == pytest.approx(want, rel=1e-5)
    assert dl.evaluate(_mlp(), result.state, val)["loss"] == pytest.approx(want, rel=1e-5)

    # early stopping returns the best epoch's evaluation params, in a state that evaluates to them
    best = dl.fit(
        _mlp(), tx, train, validation=val, epochs=2, batch_size=16, early_stopping=2, progress=False
    )
    assert best.best_epoch == 2  # the same run: its last epoch is the best
    for leaf, ref in zip(jax.tree.leaves(best.state.params), jax.tree.leaves(x)):
        np.testing.assert_allclose(np.asarray(leaf), ref, rtol=1e-6)
    assert dl.evaluate(_mlp(), best.state, val)["loss"] == pytest.approx(want, rel=1e-5)


# ----------------------------------------------------------------------------- parameter groups


def _torch_adamw(init, x, yl, lr, epochs, groups):
    """torch.optim.AdamW on Dense-Tanh-Dense, full batch, with ``groups`` (leaf names -> decay)."""
    t = {
        f"{layer}/{k}": torch.tensor(v, requires_grad=True) for layer, d in init.items() for k, v in d.items()
    }
    opt = torch.optim.AdamW(
        [{"params": [t[n] for n in names], "weight_decay": wd} for names, wd in groups], lr=lr
    )
    for _ in range(epochs):
        opt.zero_grad()
        h = torch.tanh(torch.tensor(x) @ t["dense_0/w"] + t["dense_0/b"])
        logits = h @ t["dense_2/w"] + t["dense_2/b"]
        torch.nn.functional.cross_entropy(logits, torch.tensor(yl).long()).backward()
        opt.step()
    return {n: v.detach().numpy() for n, v in t.items()}


@pytest.mark.torch
def test_fit_with_adamw_groups_without_decay_on_biases_matches_torch_param_groups():
    x, yl = _data(32, seed=2)
    rng = np.random.default_rng(3)
    init = {
        "dense_0": {"w": rng.normal(0, 0.5, (6, 8)), "b": rng.normal(0, 0.1, 8)},
        "dense_2": {"w": rng.normal(0, 0.5, (8, 3)), "b": rng.normal(0, 0.1, 3)},
    }
    init = jax.tree.map(lambda a: a.astype(np.float32), init)
    lr, wd, epochs = 0.05, 0.3, 4
    labels = lambda p: jax.tree.map(lambda d: "decay" if d else "no_decay", dl.decay_mask(p))  # noqa: E731
    tx = dl.partition(
        {"decay": dl.adamw(lr, weight_decay=wd), "no_decay": dl.adamw(lr, weight_decay=None)}, labels
    )
    # one full batch per epoch: the order of the examples is irrelevant, so torch sees the same steps
    got = dl.fit(_mlp(), tx, (x, yl), epochs=epochs, batch_size=32, initial_params=init, progress=False)
    kernels, biases = ["dense_0/w", "dense_2/w"], ["dense_0/b", "dense_2/b"]
    want = _torch_adamw(init, x, yl, lr, epochs, [(kernels, wd), (biases, 0.0)])
    every = _torch_adamw(init, x, yl, lr, epochs, [(kernels + biases, wd)])  # decay on the biases too
    for name, v in want.items():
        layer, k = name.split("/")
        mine = np.asarray(got.state.params[layer][k])
        np.testing.assert_allclose(mine, v, rtol=1e-5, atol=1e-5, err_msg=name)
        if name in biases:
            assert np.abs(mine - every[name]).max() > 1e-4  # the test tells the groups apart


def test_partition_names_a_label_it_has_no_transform_for():
    tx = dl.partition({"a": dl.sgd(0.1)}, {"w": "a", "b": "bias"})
    with pytest.raises(
        ValueError,
        match=r"partition: label 'bias' at \['b'\] is not a key of transforms; expected one of \['a'\]",
    ):
        tx.init({"w": jnp.ones(2), "b": jnp.ones(2)})
    with pytest.raises(
        TypeError, match=r"partition: transforms\['a'\] must be an optax.GradientTransformation"
    ):
        dl.partition({"a": dl.sgd}, {"w": "a"})


def test_decay_mask_leaves_out_biases_and_norm_scales():
    model = L.Sequential(L.Dense(4), L.LayerNorm(), L.Dense(2))
    params = jax.eval_shape(lambda: model.init(jax.random.key(0), (3,))[1])
    mask = dl.decay_mask(params)
    assert {jax.tree_util.keystr(p): m for p, m in jax.tree_util.tree_flatten_with_path(mask)[0]} == {
        "['dense_0']['b']": False,
        "['dense_0']['w']": True,
        "['layernorm_1']['beta']": False,
        "['layernorm_1']['gamma']": False,
        "['dense_2']['b']": False,
        "['dense_2']['w']": True,
    }


# ----------------------------------------------------------------------------- inject_hyperparams

_OPTIMIZERS = {
    "sgd": (dl.sgd, {"momentum": 0.9}),
    "adagrad": (dl.adagrad, {}),
    "rmsprop": (dl.rmsprop, {}),
    "adam": (dl.adam, {}),
    "adamw": (dl.adamw, {"weight_decay": None}),
    "signsgd": (dl.signsgd, {}),
    "muon": (dl.muon, {"weight_decay": None}),
    "schedule_free_adamw": (dl.schedule_free_adamw, {}),
    "schedule_free_sgd": (dl.schedule_free_sgd, {}),
}


@pytest.mark.parametrize("name", sorted(_OPTIMIZERS))
def test_inject_hyperparams_gives_the_optimizers_own_updates_with_and_without_params(name):
    factory, kwargs = _OPTIMIZERS[name]
    params = {"w": jnp.asarray(np.linspace(-1, 1, 6, dtype=np.float32).reshape(3, 2)), "b": jnp.zeros(2)}
    grads = {"w": jnp.asarray(np.linspace(0.5, -0.7, 6, dtype=np.float32).reshape(3, 2)), "b": jnp.ones(2)}
    injected, plain = optax.inject_hyperparams(factory)(0.1, **kwargs), factory(0.1, **kwargs)
    needs_params = name.startswith("schedule_free")

    @jax.jit
    def both(params, grads):
        out = {"plain": plain.update(grads, plain.init(params), params)[0]}
        out["with"] = injected.update(grads, injected.init(params), params)[0]
        if not needs_params:
            out["without"] = injected.update(grads, injected.init(params))[0]
        return out

    out = jax.tree.map(np.asarray, both(params, grads))
    assert np.abs(out["plain"]["w"]).max() > 0
    for case in ("with", "without") if not needs_params else ("with",):
        for k in params:
            np.testing.assert_allclose(
                out[case][k], out["plain"][k], rtol=1e-5, atol=1e-7, err_msg=f"{case} {k}"
            )
    if needs_params:
        with pytest.raises(ValueError, match="update needs params"):
            injected.update(grads, injected.init(params))


def test_sgd_and_adamw_leave_weight_decay_out_unless_set():
    params = {"w": jnp.ones(2)}
    assert len(jax.eval_shape(dl.sgd(0.1).init, params)) == 1  # only the learning rate
    assert len(jax.eval_shape(dl.sgd(0.1, weight_decay=1e-4).init, params)) == 2
    assert len(jax.eval_shape(dl.adamw(0.1, weight_decay=None).init, params)) == 2
    tx = dl.adamw(0.1)
    with pytest.raises(ValueError, match="add_weight_decay: update needs params"):
        jax.eval_shape(lambda p: tx.update(p, tx.init(p)), params)
