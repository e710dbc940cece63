"""Linen modules shaped like flax's own examples train through `jaxdl.fit` unmodified, via
`jaxdl.layers.from_flax`: examples/imagenet's ResNet (a list attribute, BatchNorm with
``axis_name='batch'``), examples/lm1b's TransformerLM (params boxed by
``nn.with_logical_partitioning``, dropout switched by ``config.deterministic``), and a module
with two rng streams and an extra mutable collection. Tiny sizes: one compile each."""

from functools import partial
from typing import Any, Sequence

import flax.linen as nn
import flax.struct
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import jaxdl as dl
from jaxdl import trainer
from jaxdl.layers import from_flax

RNG = np.random.default_rng(0)


@pytest.fixture(autouse=True)
def _fresh_rng():
    """Each test draws the same data whichever tests ran before it on its worker."""
    global RNG
    RNG = np.random.default_rng(0)


# ----------------------------------------------------------------------------- imagenet's ResNet


class ResNetBlock(nn.Module):
    filters: int
    axis_name: Any = "batch"

    @nn.compact
    def __call__(self, x, train: bool = True):
        norm = partial(
            nn.BatchNorm, use_running_average=not train, momentum=0.9, epsilon=1e-5, axis_name=self.axis_name
        )
        y = nn.relu(norm()(nn.Conv(self.filters, (3, 3), use_bias=False)(x)))
        return nn.relu(x + norm()(nn.Conv(self.filters, (3, 3), use_bias=False)(y)))


class ResNet(nn.Module):
    stage_sizes: Sequence[int]  # a list in flax's ResNet18 = partial(ResNet, stage_sizes=[2, 2, 2, 2])
    num_classes: int = 3
    axis_name: Any = "batch"

    @nn.compact
    def __call__(self, x, train: bool = True):
        x = nn.Conv(4, (3, 3))(x)
        for size in self.stage_sizes:
            for _ in range(size):
                x = ResNetBlock(4, self.axis_name)(x, train=train)
        return nn.Dense(self.num_classes)(jnp.mean(x, axis=(1, 2)))


def test_resnet_with_a_list_attribute_and_axis_name_trains_on_one_device_as_on_two(monkeypatch):
    monkeypatch.setattr(trainer, "_EVAL_STEPS", {})  # the first fit of a process hashed the module
    x = RNG.normal(size=(32, 4, 4, 1)).astype(np.float32)
    y = (x.mean(axis=(1, 2, 3)) > 0).astype(np.int32) + (x[:, 0, 0, 0] > 1)
    model = from_flax(ResNet(stage_sizes=[1]))
    result = dl.fit(model, optax.adam(0.02), (x, y), epochs=3, batch_size=16, progress=False)
    losses = [h["train_loss"] for h in result.history]
    assert losses[-1] < 0.8 * losses[0]
    stats = result.state.model_state["batch_stats"]
    assert not np.allclose(stats["ResNetBlock_0"]["BatchNorm_0"]["mean"], 0)
    dl.evaluate(model, result.state, (x, y))
    assert len(trainer._EVAL_STEPS) == 1  # fit and evaluate share one compiled eval step

    # the size-1 axis on one device gives what the bound axis of two devices gives (averaged
    # statistics): the same run, data-parallel
    sharded = dl.fit(model, optax.adam(0.02), (x, y), epochs=3, batch_size=16, progress=False, devices=2)
    jax.tree.map(
        lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5),
        (result.state.params, result.state.model_state),
        (sharded.state.params, sharded.state.model_state),
    )


class _PmeanOverData(nn.Module):
    @nn.compact
    def __call__(self, x):
        return jax.lax.pmean(nn.Dense(2)(x), "data")


def test_an_axis_no_layer_declares_is_refused_with_what_to_do():
    with pytest.raises(NameError, match="FlaxModule: .*data.* run the model under jax.shard_map"):
        from_flax(_PmeanOverData()).init(jax.random.key(0), (3,))


# ----------------------------------------------------------------------------- lm1b's TransformerLM


@flax.struct.dataclass
class TransformerConfig:
    vocab_size: int = 8
    emb_dim: int = 8
    mlp_dim: int = 16
    dropout_rate: float = 0.2
    deterministic: bool = False


def _dense(features, names):
    return nn.Dense(
        features, kernel_init=nn.with_logical_partitioning(nn.initializers.xavier_uniform(), names)
    )


class TransformerLM(nn.Module):
    config: TransformerConfig

    @nn.compact
    def __call__(self, inputs):
        cfg = self.config
        embed = nn.Embed(
            cfg.vocab_size,
            cfg.emb_dim,
            embedding_init=nn.with_logical_partitioning(nn.initializers.normal(1.0), ("vocab", "embed")),
        )
        x = embed(inputs)
        y = _dense(cfg.mlp_dim, ("embed", "mlp"))(nn.LayerNorm()(x))
        y = nn.Dropout(cfg.dropout_rate)(nn.relu(y), deterministic=cfg.deterministic)
        x = x + _dense(cfg.emb_dim, ("mlp", "embed"))(y)
        return _dense(cfg.vocab_size, ("embed", "vocab"))(nn.LayerNorm()(x))


def test_transformer_lm_with_logical_partitioning_equals_a_flax_optax_loop():
    cfg = TransformerConfig()
    tokens = RNG.integers(0, cfg.vocab_size, size=(32, 5)).astype(np.int32)
    x, y = tokens[:, :-1], tokens[:, 1:]  # next-token prediction
    module = TransformerLM(cfg)
    model = from_flax(module)
    params_names, state_names = model.partition_names((4,))
    assert params_names["Embed_0"]["embedding"] == jax.sharding.PartitionSpec("vocab", "embed")
    assert params_names["Dense_0"]["kernel"] == jax.sharding.PartitionSpec("embed", "mlp")
    assert state_names == {}

    tx = optax.adam(0.05)
    epochs, batch = 3, 16
    result = dl.fit(model, tx, (x, y), epochs=epochs, batch_size=batch, progress=False)
    losses = [h["train_loss"] for h in result.history]
    assert losses[-1] < losses[0]

    # flax's own loop: the keys and batches fit documents (run_keys, step_key, epoch_permutation)
    model_key, data_key, _ = trainer.run_keys(0)
    init_key, train_key = jax.random.split(model_key)
    eval_module = TransformerLM(cfg.replace(deterministic=True))
    boxed = eval_module.init({"params": init_key, "dropout": init_key}, jnp.zeros((1, 4), jnp.int32))
    params = nn.unbox(boxed)["params"]
    opt_state = tx.init(params)

    @jax.jit
    def step(params, opt_state, xb, yb, key):
        def loss(p):
            logits = module.apply({"params": p}, xb, rngs={"dropout": key})
            return optax.softmax_cross_entropy_with_integer_labels(logits, yb).mean()

        grads = jax.grad(loss)(params)
        updates, opt_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state

    t = 0
    for epoch in range(epochs):
        order = dl.data.epoch_permutation(len(y), data_key, epoch)
        for i in range(len(y) // batch):
            idx = order[i * batch : (i + 1) * batch]
            params, opt_state = step(params, opt_state, x[idx], y[idx], jax.random.fold_in(train_key, t))
            t += 1
    jax.tree.map(
        lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5), result.state.params, params
    )


# ----------------------------------------------------------------------------- rng streams, collections


class NoisyCounter(nn.Module):
    """Two rng streams ('dropout', 'noise') and a collection 'counts' besides the params."""

    @nn.compact
    def __call__(self, x, training: bool = False):
        seen = self.variable("counts", "steps", lambda: jnp.zeros((), jnp.int32))
        if training:
            seen.value += 1
            x = x + 0.1 * jax.random.normal(self.make_rng("noise"), x.shape)
        x = nn.Dropout(0.1, deterministic=not training)(nn.relu(nn.Dense(8)(x)))
        return nn.Dense(3)(x)


def test_two_rng_streams_and_an_extra_collection():
    module = NoisyCounter()
    model = from_flax(module, rngs=("dropout", "noise"))
    shape, params, state = model.init(jax.random.key(0), (4,))
    assert shape == (3,) and state == {"counts": {"steps": 0}}

    x = RNG.normal(size=(32, 4)).astype(np.float32)
    key = jax.random.key(7)
    y_ours, s_ours = model.apply(params, state, x, train=True, key=key)
    y_ref, s_ref = module.apply(
        {"params": params, **state},
        x,
        training=True,
        rngs={"dropout": key, "noise": jax.random.fold_in(key, 1)},  # the documented derivation
        mutable=["counts"],
    )
    np.testing.assert_array_equal(y_ours, y_ref)
    assert int(s_ours["counts"]["steps"]) == 1 == int(s_ref["counts"]["steps"])

    y = np.argmax(x[:, :3], axis=1)
    result = dl.fit(model, optax.adam(0.02), (x, y), epochs=3, batch_size=8, progress=False)
    losses = [h["train_loss"] for h in result.history]
    assert losses[-1] < losses[0]
    assert int(result.state.model_state["counts"]["steps"]) == 12  # every step, none in eval

    with pytest.raises(ValueError, match=r"rngs=\('dropout',\); name every rng stream .*from_flax"):
        from_flax(module).apply(params, state, x, train=True, key=key)
    with pytest.raises(TypeError, match="from_flax: rngs must be a tuple"):
        from_flax(module, rngs="noise")


class _DropAttr(nn.Module):
    deterministic: bool = False

    @nn.compact
    def __call__(self, x, deterministic: bool | None = None):
        deterministic = nn.merge_param("deterministic", self.deterministic, deterministic)
        return nn.Dropout(0.5)(x, deterministic=deterministic)


class _DropArg(nn.Module):
    @nn.compact
    def __call__(self, x, deterministic: bool):
        return nn.Dropout(0.5)(x, deterministic=deterministic)


@pytest.mark.parametrize("module", [_DropAttr(), _DropArg()], ids=["attribute", "argument"])
def test_deterministic_attribute_or_argument_switches_dropout(module):
    layer = from_flax(module)
    x = jnp.ones((2, 8))
    _, params, state = layer.init(jax.random.key(0), (8,))
    np.testing.assert_array_equal(layer.apply(params, state, x)[0], x)  # eval: no key needed
    y = layer.apply(params, state, x, train=True, key=jax.random.key(1))[0]
    assert set(np.unique(y)) == {0.0, 2.0}
