"""fit's callbacks: a user's logger and stop rules beside fit's own, EarlyStopping against flax's
rule, bitwise resume of a callback's state, and FitConfig's refusals."""

import math

import jax
import numpy as np
import pytest
from flax.training.early_stopping import EarlyStopping as FlaxEarlyStopping

import jaxdl as dl
from jaxdl import layers as L


def _data(n, seed):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, 4)).astype(np.float32)
    return x, (x @ np.array([[1, 0, -1], [0, 1, 1], [1, -1, 0], [0, 0, 1]])).argmax(1).astype(np.int32)


TRAIN, VAL = _data(48, 0), _data(24, 1)
S = 6  # steps per epoch: 48 // 8, in blocks of 3
OPTIONS = dict(batch_size=8, block_size=3, progress=False, compile_cache=False)


def _fit(epochs=3, **kw):
    return dl.fit(
        L.Sequential(L.Dense(3)), dl.sgd(0.3), TRAIN, validation=VAL, epochs=epochs, **{**OPTIONS, **kw}
    )


def _leaves(state):
    return [np.asarray(a) for a in jax.tree.leaves((state.params, state.opt_state))]


class Recorder(dl.Callback):
    """Logs every hook to a user's own function."""

    def __init__(self, log):
        self.log = log

    def on_train_begin(self, loop):
        self.log(("begin", loop.step, loop.epochs, loop.steps_per_epoch))

    def on_block_end(self, step, metrics, loop):
        self.log(("block", step, np.asarray(metrics["loss"], np.float64)))

    def on_epoch_end(self, epoch, logs, loop):
        self.log(("epoch", epoch, dict(logs)))

    def on_train_end(self, loop):
        self.log(("end", loop.step))


def test_a_users_logger_sees_every_block_and_epoch_beside_fits_own_callbacks():
    lines = []
    result = _fit(callbacks=[Recorder(lines.append)], early_stopping=5)
    assert [line[0] for line in lines] == ["begin"] + ["block", "block", "epoch"] * 3 + ["end"]
    assert lines[0] == ("begin", 0, 3, S) and lines[-1] == ("end", 3 * S)
    blocks = [line for line in lines if line[0] == "block"]
    assert [b[1] for b in blocks] == [3, 6, 9, 12, 15, 18]
    epochs = [line for line in lines if line[0] == "epoch"]
    assert [e[2] for e in epochs] == result.history and [e[1] for e in epochs] == [1, 2, 3]
    for e, record in enumerate(result.history):  # the epoch's train_loss: the mean of its 6 steps
        steps = np.concatenate([blocks[2 * e][2], blocks[2 * e + 1][2]])
        np.testing.assert_allclose(record["train_loss"], steps.mean(), rtol=1e-12)


class StopAfterEpoch(dl.Callback):
    def __init__(self, epoch):
        self.epoch = epoch

    def on_epoch_end(self, epoch, logs, loop):
        return epoch >= self.epoch


class StopAtStep(dl.Callback):
    def __init__(self, step):
        self.step = step

    def on_block_end(self, step, metrics, loop):
        return step >= self.step


def test_a_custom_stop_rule_ends_the_run_where_a_shorter_run_ends():
    stopped = _fit(epochs=5, callbacks=[StopAfterEpoch(2)])
    shorter = dl.fit(
        L.Sequential(L.Dense(3)), dl.sgd(0.3), TRAIN, validation=VAL, config=dl.FitConfig(epochs=2, **OPTIONS)
    )
    assert stopped.stopped_early and stopped.steps == 2 * S and len(stopped.history) == 2
    assert [r["val_loss"] for r in stopped.history] == [r["val_loss"] for r in shorter.history]
    for a, b in zip(_leaves(stopped.state), _leaves(shorter.state)):
        np.testing.assert_array_equal(a, b)
    inside = _fit(epochs=5, callbacks=[StopAtStep(9)])  # from a block: at once, no partial record
    assert inside.stopped_early and inside.steps == 9 and len(inside.history) == 1


@pytest.mark.parametrize("patience, min_delta", [(1, 0.0), (2, 0.0), (3, 0.05)])
def test_early_stopping_stops_where_flaxs_rule_with_one_less_patience_stops(patience, min_delta):
    # flax tests patience_count >= patience before counting the update, so it stops one
    # non-improving epoch later than fit(early_stopping=p), which stops after exactly p.
    values = np.random.default_rng(patience).normal(size=40).cumsum() * 0.1
    ours, flax = dl.EarlyStopping(patience, min_delta=min_delta), FlaxEarlyStopping(min_delta, patience - 1)
    for epoch, v in enumerate(values, 1):
        flax = flax.update(float(v))
        assert ours.on_epoch_end(epoch, {"val_loss": float(v)}, None) == flax.should_stop
        assert ours.best_metric == flax.best_metric and ours.patience_count == flax.patience_count
        if flax.should_stop:
            break
    assert flax.should_stop, "the sequence never stopped: the test checked too little"
    most = dl.EarlyStopping(1, monitor="val_accuracy", mode="max")
    assert [most.on_epoch_end(e, {"val_accuracy": a}, None) for e, a in enumerate([0.5, 0.6, 0.6], 1)] == [
        False,
        False,
        True,
    ]
    with pytest.raises(KeyError, match=r"monitor='val_acc' is not among the epoch's logs \['val_loss'\]"):
        dl.EarlyStopping(1, monitor="val_acc").on_epoch_end(1, {"val_loss": 1.0}, None)
    with pytest.raises(ValueError, match="EarlyStopping: patience=0 is out of range"):
        dl.EarlyStopping(0)
    with pytest.raises(ValueError, match="EarlyStopping: mode='low' is unknown"):
        dl.EarlyStopping(1, mode="low")


class LossAverage(dl.Callback):
    """A callback with state: a moving average of the block losses, and how many blocks it saw."""

    def __init__(self):
        self.average, self.blocks = np.array(0.0), np.array(0, np.int64)

    def on_block_end(self, step, metrics, loop):
        self.average = 0.5 * self.average + 0.5 * np.mean(metrics["loss"], dtype=np.float64)
        self.blocks = self.blocks + 1

    def state_dict(self):
        return {"average": np.asarray(self.average, np.float64), "blocks": np.asarray(self.blocks)}

    def load_state_dict(self, state):
        self.average, self.blocks = np.asarray(state["average"]), np.asarray(state["blocks"])


class Crash(dl.Callback):
    def on_block_end(self, step, metrics, loop):
        if step == 9:  # before the checkpoint of this block: a kill between two saves
            raise RuntimeError("killed")


def test_resume_restores_a_callbacks_state_and_ends_bitwise_equal(tmp_path):
    kw = dict(epochs=2, early_stopping=2)  # checkpoints at each epoch end: steps 6 and 12
    whole_cb = LossAverage()
    whole = _fit(out_dir=str(tmp_path / "whole"), callbacks=[whole_cb], **kw)
    with pytest.raises(RuntimeError, match="killed"):
        _fit(out_dir=str(tmp_path / "cut"), callbacks=[LossAverage(), Crash()], **kw)
    resumed_cb = LossAverage()
    resumed = _fit(out_dir=str(tmp_path / "cut"), resume=True, callbacks=[resumed_cb], **kw)
    assert resumed.resumed_from_step == 6 and int(resumed_cb.blocks) == int(whole_cb.blocks) == 4
    assert resumed_cb.average.tobytes() == whole_cb.average.tobytes()

    def timeless(history):
        return [{k: v for k, v in r.items() if k not in ("seconds", "examples_per_s")} for r in history]

    assert timeless(resumed.history) == timeless(whole.history)
    for a, b in zip(_leaves(resumed.state), _leaves(whole.state)):
        np.testing.assert_array_equal(a, b)
    differs = r"configuration differs .*callbacks: None \(the run has \['LossAverage_1'\]\)"
    with pytest.raises(ValueError, match=differs):
        _fit(out_dir=str(tmp_path / "whole"), resume=True, **kw)


@pytest.mark.parametrize(
    "kwargs, error, message",
    [
        (dict(epochs=0), ValueError, r"FitConfig: epochs=0 is out of range; expected an integer >= 1"),
        (dict(resume=True), ValueError, r"FitConfig: resume and checkpoint_every need out_dir"),
        (dict(micro_batches=3), ValueError, r"FitConfig: batch_size=8 is not divisible by micro_batches=3"),
        (dict(devices=64), ValueError, r"FitConfig: devices=64: only \d+ local devices"),
        (dict(ema=1.5), ValueError, r"FitConfig: ema=1.5 is out of range"),
        (dict(augment=-1), ValueError, r"FitConfig: augment=-1 is out of range"),
        (dict(keep=0), ValueError, r"FitConfig: keep=0 is out of range"),
        (dict(shard="zero"), ValueError, r"FitConfig: shard='zero'; expected 'replicate' or 'fsdp'"),
        (dict(shard="fsdp"), ValueError, r"FitConfig: shard='fsdp' splits the state over devices"),
        (dict(remat="yes"), TypeError, r"FitConfig: remat must be True or False, got 'yes'"),
    ],
)
def test_fit_config_refuses_bad_values_at_construction(kwargs, error, message):
    with pytest.raises(error, match=message):
        dl.FitConfig(**{"epochs": 1, "batch_size": 8, **kwargs})


def test_fit_refuses_config_with_keywords_bad_callbacks_and_data_the_config_cannot_take():
    config = dl.FitConfig(epochs=1, batch_size=8)
    model = L.Sequential(L.Dense(3))
    with pytest.raises(TypeError, match=r"fit: pass the options either as config= or as keywords.*epochs=2"):
        dl.fit(model, dl.sgd(0.1), TRAIN, config=config, epochs=2)
    with pytest.raises(TypeError, match=r"fit\(\) missing required keyword-only argument: 'epochs'"):
        dl.fit(model, dl.sgd(0.1), TRAIN, batch_size=8)
    with pytest.raises(TypeError, match=r"fit: callbacks\[0\] \(int\) has no on_train_begin"):
        dl.fit(model, dl.sgd(0.1), TRAIN, config=config, callbacks=[1])
    with pytest.raises(ValueError, match=r"fit: batch_size=64 exceeds the 48 training examples"):
        dl.fit(model, dl.sgd(0.1), TRAIN, config=config.replace(batch_size=64))
    assert math.isinf(dl.EarlyStopping(1).best_metric)
