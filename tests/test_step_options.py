"""StepOptions: the seven options of every train step and loop as one checked, frozen object; the
builders' keywords stay as sugar for it."""

import dataclasses

import jax
import numpy as np
import pytest

import jaxdl as dl
from jaxdl import layers as L
from jaxdl import train_step as ts
from jaxdl.precision import DynamicLossScale, LossScale, Policy


@pytest.mark.parametrize(
    "kwargs, error, message",
    [
        ({"micro_batches": 0}, ValueError, "StepOptions: micro_batches=0 is out of range"),
        (
            {"ema": 1.0},
            ValueError,
            "StepOptions: ema=1.0 is out of range; expected finite ema with 0 <= ema < 1",
        ),
        ({"ema": True}, TypeError, "StepOptions: ema must be a decay in [0, 1) or None, got True"),
        ({"precision": "fp8"}, ValueError, "StepOptions: precision='fp8' is unknown"),
        ({"loss_scale": -1.0}, ValueError, "StepOptions: loss_scale=-1.0 is out of range"),
        (
            {"skip_nonfinite": "yes"},
            TypeError,
            "StepOptions: skip_nonfinite must be True or False, got 'yes'",
        ),
        ({"donate": 1}, TypeError, "StepOptions: donate must be True or False, got 1"),
        ({"remat": "yes"}, TypeError, "StepOptions: remat must be True or False, got 'yes'"),
    ],
)
def test_bad_options_are_refused_at_construction_by_name(kwargs, error, message):
    with pytest.raises(error, match=message.replace("(", r"\(").replace("[", r"\[").replace(")", r"\)")):
        dl.StepOptions(**kwargs)


def test_options_are_normalized_frozen_and_replace_checks_again():
    options = dl.StepOptions(precision="bf16", loss_scale="dynamic", micro_batches=2)
    assert isinstance(options.precision, Policy) and options.policy is options.precision
    assert isinstance(options.loss_scale, DynamicLossScale)
    assert dl.StepOptions(precision="fp32").precision is None and dl.StepOptions().plain
    assert isinstance(dl.StepOptions(loss_scale=8).loss_scale, LossScale)
    assert not options.plain
    with pytest.raises(dataclasses.FrozenInstanceError):
        options.micro_batches = 3
    with pytest.raises(ValueError, match="micro_batches=0"):
        options.replace(micro_batches=0)
    assert options.replace(ema=0.5).ema == 0.5 and options.ema is None


def test_options_and_keywords_together_are_refused_naming_the_keyword():
    model, tx = L.Sequential(L.Dense(3)), dl.sgd(0.1)
    loss = ts.supervised_loss(model)
    with pytest.raises(TypeError, match=r"make_train_step: .*not both \(got options= and ema=0.5\)"):
        ts.make_train_step(loss, tx, options=dl.StepOptions(), ema=0.5)
    with pytest.raises(TypeError, match="make_train_loop: options must be a jaxdl.StepOptions"):
        ts.make_train_loop(loss, tx, options={"ema": 0.5})
    with pytest.raises(TypeError, match=r"TrainState.create: .*not both \(got options= and loss_scale="):
        ts.TrainState.create(model, tx, 0, (4,), options=dl.StepOptions(), loss_scale="dynamic")
    with pytest.raises(ValueError, match="make_pmap_train_step: options.donate=True"):
        dl.parallel.make_pmap_train_step(loss, tx, options=dl.StepOptions(donate=True))


def test_a_loop_built_from_options_is_the_loop_built_from_keywords():
    """Sugar: options=StepOptions(...) builds the same program as the keywords (the state
    too: TrainState.create(options=...) starts the EMA and the loss scale)."""
    model, tx = L.Sequential(L.Dense(3)), dl.sgd(0.1)
    loss = ts.supervised_loss(model)
    rng = np.random.default_rng(0)
    batches = (rng.normal(size=(3, 8, 5)).astype(np.float32), rng.integers(0, 3, (3, 8)).astype(np.int32))
    options = dl.StepOptions(micro_batches=2, ema=0.5)
    by_object = ts.make_train_loop(loss, tx, options=options)(
        ts.TrainState.create(model, tx, jax.random.key(1), (5,), options=options), batches
    )
    by_keywords = ts.make_train_loop(loss, tx, micro_batches=2, ema=0.5)(
        ts.TrainState.create(model, tx, jax.random.key(1), (5,), ema=0.5), batches
    )
    assert by_object[0].ema_params is not None
    strip = lambda out: (out[0].replace(key=jax.random.key_data(out[0].key)), out[1])  # noqa: E731
    for a, b in zip(jax.tree.leaves(strip(by_object)), jax.tree.leaves(strip(by_keywords))):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_remat_as_an_option_is_remat_as_a_keyword_and_fit_config_passes_it_on():
    """``StepOptions(remat=True)`` wraps the loss's Sequential as ``remat=True`` does (the same
    step); `FitConfig`'s ``remat`` reaches its ``options``."""
    model, tx = L.Sequential(L.Dense(4), L.Relu(), L.Dense(3)), dl.sgd(0.1)
    loss = ts.supervised_loss(model)
    rng = np.random.default_rng(0)
    batch = (rng.normal(size=(8, 5)).astype(np.float32), rng.integers(0, 3, 8).astype(np.int32))
    state = ts.TrainState.create(model, tx, jax.random.key(1), (5,))
    by_object = ts.make_train_step(loss, tx, options=dl.StepOptions(remat=True))(state, batch)
    by_keyword = ts.make_train_step(loss, tx, remat=True)(state, batch)
    for a, b in zip(jax.tree.leaves(by_object[1]), jax.tree.leaves(by_keyword[1])):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    with pytest.raises(TypeError, match=r"make_train_loop: .*not both \(got options= and remat=True\)"):
        ts.make_train_loop(loss, tx, options=dl.StepOptions(), remat=True)
    with pytest.raises(ValueError, match="remat=True checkpoints each top-level layer"):
        ts.make_train_step(ts.supervised_loss(L.Dense(3)), tx, options=dl.StepOptions(remat=True))
    assert dl.FitConfig(epochs=1, batch_size=8, remat=True).options.remat
