"""Specification of the training engine `jaxdl.fit` / `jaxdl.evaluate` (jaxdl/trainer.py).

References are independent of the engine: a hand-written loop of `make_train_step` over the same
batches, a direct forward pass for evaluation, the single-device run for data parallel, and a
real SIGKILL for resumption."""

import importlib.util
import json
import os
import signal
import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import jaxdl as dl
from jaxdl import data

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")


@pytest.fixture(scope="module")
def digits():
    return data.load_dataset("digits")


def small_mlp(**kwargs):
    return dl.models.mlp(10, depth=1, width=32, **kwargs)


def leaves(tree):
    return [np.asarray(x) for x in jax.tree.leaves(tree)]


def assert_bitwise_equal(a, b):
    a, b = leaves(a), leaves(b)
    assert len(a) == len(b)
    for i, (x, y) in enumerate(zip(a, b)):
        assert x.dtype == y.dtype and x.shape == y.shape
        assert np.array_equal(x.view(np.uint8), y.view(np.uint8)), f"leaf {i} differs"


def without_timing(history):
    return [{k: v for k, v in r.items() if k not in ("seconds", "examples_per_s")} for r in history]


# ----------------------------------------------------------------------------- numbers


def test_fit_takes_the_same_steps_as_a_hand_loop_of_make_train_step(digits):
    """fit = TrainState.create from the run's model key + make_train_step over the batches of
    data.batches(fold_in(data_key, epoch)), in blocks of scan: the same parameters."""
    model, tx = small_mlp(dropout=0.1), dl.adam(3e-3)
    x, y = digits.train.x[:320], digits.train.y[:320]
    result = dl.fit(model, tx, (x, y), epochs=2, batch_size=32, seed=3, block_size=4, progress=False)

    model_key, data_key, _ = dl.trainer.run_keys(3)
    state = dl.TrainState.create(model, tx, model_key, x.shape[1:])
    step = dl.make_train_step(dl.supervised_loss(model), tx)
    losses = []
    for epoch in range(2):
        for xb, yb in data.batches(x, y, 32, data_key, epoch):
            state, metrics = step(state, (xb, yb))
            losses.append(float(metrics["loss"]))
    assert result.steps == int(state.step) == 20
    for got, want in zip(leaves(result.state.params), leaves(state.params)):
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
    assert result.history[0]["train_loss"] == pytest.approx(np.mean(losses[:10]), rel=1e-5)
    assert result.history[1]["train_loss"] == pytest.approx(np.mean(losses[10:]), rel=1e-5)


def test_evaluate_is_the_example_weighted_mean_over_a_last_partial_batch(digits):
    model = small_mlp(batchnorm=True, dropout=0.5)
    result = dl.fit(model, dl.adam(1e-2), digits.train, epochs=1, batch_size=64, progress=False)
    x, y = digits.test.x[:250], digits.test.y[:250]
    got = dl.evaluate(model, result.state, (x, y), batch_size=100)  # 100 + 100 + 50

    logits, _ = model.apply(result.state.params, result.state.model_state, jnp.asarray(x))  # eval mode
    logp = jax.nn.log_softmax(logits)
    want_loss = -float(jnp.mean(logp[jnp.arange(len(y)), y]))
    want_acc = float(np.mean(np.argmax(np.asarray(logits), -1) == y))
    assert got["loss"] == pytest.approx(want_loss, rel=1e-5)
    assert got["accuracy"] == pytest.approx(want_acc, abs=1e-7)
    assert dl.evaluate(model, result.state, data.Split(x, y), batch_size=250)["loss"] == pytest.approx(
        want_loss, rel=1e-5
    )


class _UnhashableLoss:
    """A user's loss that must never be hashed (as a flax module with a list attribute)."""

    def __init__(self, model):
        self.model = model

    def __hash__(self):
        raise AssertionError("the trainer hashed a user's loss")

    def __call__(self, params, model_state, batch, key=None, train=True):
        return dl.supervised_loss(self.model)(params, model_state, batch, key, train=train)


def test_evaluate_caches_a_users_loss_by_identity_without_hashing_it(monkeypatch):
    from jaxdl import trainer

    monkeypatch.setattr(trainer, "_EVAL_STEPS", {})  # an empty dict's pop hashes nothing
    model = dl.layers.Dense(3)
    state = dl.TrainState.create(model, dl.sgd(0.1), jax.random.key(0), (4,))
    x, y = np.ones((4, 4), np.float32), np.zeros(4, np.int32)
    loss = _UnhashableLoss(model)
    first = dl.evaluate(model, state, (x, y), loss_fn=loss)
    assert dl.evaluate(model, state, (x, y), loss_fn=loss) == first
    assert len(trainer._EVAL_STEPS) == 1  # one compiled step for the one loss object


def test_fit_history_records_every_epoch_and_learns(digits):
    sched = dl.schedules.cosine_decay(1e-2, 3 * 39)
    result = dl.fit(
        small_mlp(),
        dl.adam(sched),
        digits.train,
        validation=digits.val,
        epochs=3,
        batch_size=32,
        learning_rate=sched,
        progress=False,
    )
    assert isinstance(result, dl.FitResult)
    assert [r["epoch"] for r in result.history] == [1, 2, 3]
    assert [r["step"] for r in result.history] == [39, 78, 117]
    for r in result.history:
        for key in (
            "train_loss",
            "train_accuracy",
            "val_loss",
            "val_accuracy",
            "lr",
            "update_ratio",
            "grad_norm",
            "seconds",
        ):
            assert np.isfinite(r[key]) and r[key] >= 0, key
        assert r["nonfinite_steps"] == 0 and 0 < r["update_ratio"] < 1
    assert [r["lr"] for r in result.history] == pytest.approx([float(sched(s - 1)) for s in (39, 78, 117)])
    assert result.history[-1]["val_accuracy"] > 0.85  # chance is 0.1
    assert result.best_epoch == 1 + int(np.argmin([r["val_loss"] for r in result.history]))


def test_learning_rate_is_read_from_inject_hyperparams(digits):
    tx = optax.inject_hyperparams(optax.sgd)(learning_rate=0.05)
    result = dl.fit(small_mlp(), tx, digits.train, epochs=1, batch_size=64, progress=False)
    assert result.history[0]["lr"] == pytest.approx(0.05)
    assert (
        "lr"
        not in dl.fit(
            small_mlp(), optax.sgd(0.05), digits.train, epochs=1, batch_size=64, progress=False
        ).history[0]
    )


def test_early_stopping_returns_the_parameters_of_the_lowest_validation_loss(digits):
    # 64 examples and a large constant rate: validation loss bottoms out, then rises.
    x, y = digits.train.x[:64], digits.train.y[:64]
    model = dl.models.mlp(10, depth=1, width=64)
    result = dl.fit(
        model,
        dl.adam(0.01),
        (x, y),
        validation=digits.val,
        epochs=40,
        batch_size=32,
        early_stopping=3,
        progress=False,
    )
    val_losses = [r["val_loss"] for r in result.history]
    best = int(np.argmin(val_losses)) + 1
    assert result.best_epoch == best and result.stopped_early
    assert len(result.history) == best + 3 < 40
    assert dl.evaluate(model, result.state, digits.val)["loss"] == pytest.approx(
        val_losses[best - 1], rel=1e-6
    )


def test_augment_shifts_training_images_inside_the_step(digits):
    seen = []

    def augment(key, x):
        seen.append(x.shape)
        return jnp.roll(x, 1, axis=1)

    result = dl.fit(
        small_mlp(), dl.adam(1e-2), digits.train, epochs=1, batch_size=64, augment=augment, progress=False
    )
    plain = dl.fit(small_mlp(), dl.adam(1e-2), digits.train, epochs=1, batch_size=64, progress=False)
    assert seen and seen[0] == (64, 8, 8, 1)  # traced once, on a training batch
    assert not np.allclose(leaves(result.state.params)[0], leaves(plain.state.params)[0])


def test_progress_false_prints_nothing(digits, capfd):
    dl.fit(
        small_mlp(),
        dl.adam(1e-2),
        digits.train,
        validation=digits.val,
        epochs=1,
        batch_size=64,
        progress=False,
    )
    out, err = capfd.readouterr()
    assert out == "" and err == ""
    dl.fit(small_mlp(), dl.adam(1e-2), digits.train, validation=digits.val, epochs=1, batch_size=64)
    _, err = capfd.readouterr()
    assert "epoch 1/1: train loss" in err


def test_initial_params_start_the_run_and_stay_valid_for_the_caller(digits):
    model, tx = small_mlp(), optax.sgd(0.0)  # lr 0: the parameters must come back unchanged
    _, params, _ = model.init(jax.random.key(7), (8, 8, 1))
    result = dl.fit(model, tx, digits.train, epochs=1, batch_size=64, initial_params=params, progress=False)
    assert_bitwise_equal(result.state.params, params)
    assert all(not x.is_deleted() for x in jax.tree.leaves(params))  # copied, not donated
    trained = dl.fit(
        model, dl.adam(1e-2), digits.train, epochs=1, batch_size=64, initial_params=params, progress=False
    )
    fresh = dl.fit(model, dl.adam(1e-2), digits.train, epochs=1, batch_size=64, progress=False)
    assert not np.allclose(leaves(trained.state.params)[0], leaves(fresh.state.params)[0])
    with pytest.raises(ValueError, match=r"fit: initial_params tree does not match"):
        dl.fit(
            model,
            tx,
            digits.train,
            epochs=1,
            batch_size=64,
            initial_params={"dense_1": params["dense_1"]},
            progress=False,
        )


# ----------------------------------------------------------------------------- data parallel


def test_devices_4_gives_the_single_device_result_with_synced_batchnorm(digits):
    assert jax.local_device_count() >= 4
    x, y = digits.train.x[:512], digits.train.y[:512]
    results = {}
    for devices in (None, 4):
        model = small_mlp(batchnorm=True, axis_name="batch" if devices else None)
        results[devices] = dl.fit(
            model,
            dl.adam(1e-2),
            (x, y),
            validation=digits.val,
            epochs=2,
            batch_size=64,
            devices=devices,
            progress=False,
        )
    one, four = results[None].state, results[4].state
    for a, b in zip(
        leaves((one.params, one.model_state, one.opt_state)),
        leaves((four.params, four.model_state, four.opt_state)),
    ):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)
    for ra, rb in zip(results[None].history, results[4].history):
        assert ra["val_loss"] == pytest.approx(rb["val_loss"], rel=1e-5)


# ----------------------------------------------------------------------------- outputs and resume


def test_out_dir_receives_metrics_curves_checkpoints_model_summary_and_tensorboard(digits, tmp_path):
    out = tmp_path / "run"
    result = dl.fit(
        small_mlp(),
        dl.adam(1e-2),
        digits.train,
        validation=digits.val,
        epochs=2,
        batch_size=64,
        out_dir=str(out),
        checkpoint_every=7,
        keep=2,
        progress=False,
    )
    records = dl.trainer.read_metrics(str(out / "metrics.jsonl"))
    assert records == json.loads(json.dumps(result.history))
    assert (out / "curves.png").stat().st_size > 1000
    assert sorted(int(s) for s in os.listdir(out / "checkpoints")) == [35, 38]  # the last 2 of 7, 14, ..., 38
    summary = json.loads((out / "summary.json").read_text())
    assert summary["steps"] == 38 and summary["epochs_completed"] == 2
    assert [p for p in os.listdir(out) if p.startswith("events.out.tfevents")], os.listdir(out)
    from jaxdl.checkpoint import restore_checkpoint

    restored = restore_checkpoint(
        str(out / "model"), {"params": result.state.params, "model_state": result.state.model_state}
    )
    assert_bitwise_equal(restored["params"], result.state.params)


def run_python(script, *argv, **env):
    """Run ``python -c script *argv`` in a fresh process (environment updated by ``env``); its
    stdout, after checking that it succeeded."""
    out = subprocess.run(
        [sys.executable, "-c", script, *argv],
        env={**os.environ, "JAX_PLATFORMS": "cpu", **env},
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    return out.stdout


def test_a_run_with_tensorboard_on_digits_imports_neither_torch_nor_sklearn(tmp_path):
    # Both take seconds to import, and torch is installed beside tensorboardX on Python 3.11 (the
    # parity tests use it); the TensorBoard writer and the digits loader do without them, and
    # torch stays importable where it is installed.
    script = textwrap.dedent("""
        import importlib.util, sys
        from jaxdl import data, trainer
        ds = data.load_dataset("digits")
        writer = trainer._tensorboard_writer(sys.argv[1])
        writer.add_scalar("loss", 1.5, 1)
        writer.close()
        loaded = [m for m in ("torch", "sklearn") if m in sys.modules]
        assert not loaded, loaded
        if importlib.util.find_spec("torch") is None:
            print(len(ds.train.y), "no-torch")
        else:
            import torch
            print(len(ds.train.y), torch.ones(2).sum().item())
    """)
    assert run_python(script, str(tmp_path)).split() == [
        "1257",
        "2.0" if importlib.util.find_spec("torch") else "no-torch",
    ]
    assert [p for p in os.listdir(tmp_path) if p.startswith("events.out.tfevents")]


@pytest.mark.torch
def test_a_tensorboardx_that_needs_torch_is_imported_with_it(tmp_path):
    # A stand-in tensorboardX whose import fails without torch: the writer is still made.
    package = tmp_path / "fake" / "tensorboardX"
    package.mkdir(parents=True)
    (package / "__init__.py").write_text(
        "import torch\nclass SummaryWriter:\n    def __init__(self, logdir):\n        self.logdir = logdir\n"
    )
    script = "import sys\nfrom jaxdl import trainer\nprint(trainer._tensorboard_writer(sys.argv[1]).logdir)"
    assert run_python(script, "run", PYTHONPATH=str(tmp_path / "fake")).split() == ["run"]


FIT_SCRIPT = textwrap.dedent("""
    import json, sys
    import numpy as np
    import jaxdl as dl
    ds = dl.data.load_dataset("digits")
    class Source:  # a random-access source of (x, y) examples, read one by one
        def __len__(self):
            return len(ds.train.y)
        def __getitem__(self, i):
            return ds.train.x[i], ds.train.y[i]
    train = Source() if "--source" in sys.argv else ds.train
    result = dl.fit(dl.models.mlp(10, depth=1, width=64, dropout=0.2), dl.adam(3e-3), train,
                    validation=ds.val, epochs=3, batch_size=32, augment=1, out_dir=sys.argv[1],
                    resume="--resume" in sys.argv, checkpoint_every=15, block_size=5, progress=False)
    np.savez(sys.argv[1] + "/final.npz", *[np.asarray(x) for x in dl.jax.tree.leaves(result.state.params)])
    print(json.dumps({"resumed": result.resumed_from_step, "history": result.history}))
""").replace("dl.jax", "__import__('jax')")


def fit_process(*argv, compile_cache="0"):
    """``compile_cache="0"``: no compilation cache at all, not even the suite's (conftest.py)."""
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "JAXDL_COMPILE_CACHE": compile_cache}
    if compile_cache == "0":
        env["JAX_ENABLE_COMPILATION_CACHE"] = "false"
    return subprocess.Popen(
        [sys.executable, "-c", FIT_SCRIPT, *argv],
        env=env,
        text=True,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )


def saved_steps(checkpoints) -> list[int]:
    """The steps of the complete checkpoints (manifest written) under ``checkpoints``."""
    return sorted(
        int(s) for s in os.listdir(checkpoints) if (checkpoints / s / "jaxdl_manifest.json").is_file()
    )


@pytest.mark.slow
def test_fit_preempted_then_killed_midway_resumes_to_bitwise_the_same_state_and_history_from_arrays_or_a_source(
    tmp_path, wait_for_first_checkpoint
):
    # The uninterrupted run goes first and writes every program it compiles to a compilation
    # cache; the interrupted and the resumed runs build the same programs and read them all from
    # it. A process writes only what it compiles, so the killed run writes nothing there and the
    # kill cannot tear a cache file. The second run is preempted (SIGTERM: it finishes its block,
    # saves, exits with 143), the third is SIGKILLed after a checkpoint past that, the fourth ends.
    # The uninterrupted run reads arrays, the others a random-access source of the same examples.
    cache = str(tmp_path / "xla")
    whole = fit_process(str(tmp_path / "whole"), compile_cache=cache)
    out_w, err_w = whole.communicate(timeout=300)
    assert whole.returncode == 0, err_w[-2000:]
    run_dir = tmp_path / "run"
    preempted = fit_process(str(run_dir), "--source", compile_cache=cache)
    wait_for_first_checkpoint(preempted, run_dir / "checkpoints")
    preempted.send_signal(signal.SIGTERM)
    _, err_p = preempted.communicate(timeout=300)
    assert preempted.returncode == 143, err_p[-2000:]
    assert not (run_dir / "final.npz").exists(), "preempted too late: the run had finished"
    at = saved_steps(run_dir / "checkpoints")[-1]
    assert at % 5 == 0 and 0 < at < 3 * 39  # the end of the block in flight (block_size=5)
    assert err_p.strip().splitlines()[-1] == (
        f"fit: interrupted by SIGTERM at step {at}: checkpoint saved in {run_dir / 'checkpoints'}; "
        "to continue, run it again with resume=True (jaxdl train: the same command with --resume)"
    )

    killed = fit_process(str(run_dir), "--source", "--resume", compile_cache=cache)
    wait_for_first_checkpoint(killed, run_dir / "checkpoints", after=at)
    killed.send_signal(signal.SIGKILL)
    killed.communicate()
    assert killed.returncode == -signal.SIGKILL
    assert not (run_dir / "final.npz").exists(), "killed too late: the run had finished"

    resumed = fit_process(str(run_dir), "--source", "--resume", compile_cache=cache)
    out_r, err_r = resumed.communicate(timeout=300)
    assert resumed.returncode == 0, err_r[-2000:]
    r, w = json.loads(out_r), json.loads(out_w)
    assert r["resumed"] is not None and at < r["resumed"] < 3 * 39
    assert r["resumed"] % 15 == 0 or r["resumed"] % 39 == 0  # checkpoint_every=15, epoch ends
    assert without_timing(r["history"]) == without_timing(w["history"])
    a, b = np.load(run_dir / "final.npz"), np.load(tmp_path / "whole" / "final.npz")
    assert_bitwise_equal([a[k] for k in sorted(a.files)], [b[k] for k in sorted(b.files)])


class SendSignal(dl.Callback):
    """Sends ``signum`` to this process after the block that ends at ``step``."""

    def __init__(self, step, signum):
        self.step, self.signum = step, signum

    def on_block_end(self, step, metrics, loop):
        if step == self.step:
            os.kill(os.getpid(), self.signum)


def test_sigint_saves_the_block_in_flight_and_a_second_one_abandons_the_save_keeping_the_older(
    digits, tmp_path, monkeypatch
):
    from jaxdl import checkpoint

    kw = dict(epochs=1, batch_size=64, checkpoint_every=6, block_size=3, progress=False)  # 19 steps
    whole = dl.fit(small_mlp(), dl.adam(1e-2), digits.train, out_dir=str(tmp_path / "whole"), **kw)
    run_dir, lines = tmp_path / "run", []
    handlers = signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM)
    with pytest.raises(dl.Preempted) as stop:  # SIGINT after step 9: that block's end is saved
        dl.fit(small_mlp(), dl.adam(1e-2), digits.train, out_dir=str(run_dir), log=lines.append,
               callbacks=[SendSignal(9, signal.SIGINT)], **kw)  # fmt: skip
    assert (stop.value.code, stop.value.step, saved_steps(run_dir / "checkpoints")) == (130, 9, [6, 9])
    assert lines[-1].startswith("fit: interrupted by SIGINT at step 9: checkpoint saved in ")
    assert (signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM)) == handlers
    assert not (run_dir / "model").exists()

    def manifest_interrupted(directory, specs):  # a second SIGINT while step 15 is being saved
        if os.path.basename(directory) == "15":
            os.kill(os.getpid(), signal.SIGINT)
        write_manifest(directory, specs)

    write_manifest = checkpoint._write_manifest
    monkeypatch.setattr(checkpoint, "_write_manifest", manifest_interrupted)
    with pytest.raises(dl.Preempted) as stop:
        dl.fit(small_mlp(), dl.adam(1e-2), digits.train, out_dir=str(run_dir), resume=True,
               log=lines.append, callbacks=[SendSignal(15, signal.SIGINT)], **kw)  # fmt: skip
    assert (stop.value.code, stop.value.step, saved_steps(run_dir / "checkpoints")) == (130, None, [6, 9, 12])
    assert "the save was abandoned and the newest complete checkpoint" in lines[-1]
    monkeypatch.undo()

    resumed = dl.fit(small_mlp(), dl.adam(1e-2), digits.train, out_dir=str(run_dir), resume=True, **kw)
    assert resumed.resumed_from_step == 12
    assert without_timing(resumed.history) == without_timing(whole.history)
    assert_bitwise_equal(leaves(resumed.state.params), leaves(whole.state.params))


def test_resume_with_another_configuration_is_refused_naming_what_differs(digits, tmp_path):
    out = str(tmp_path / "run")
    dl.fit(small_mlp(), dl.adam(1e-2), digits.train, epochs=1, batch_size=64, out_dir=out, progress=False)
    with pytest.raises(
        ValueError, match=r"resume=True, but the configuration differs .*batch_size: 32 \(the run has 64\)"
    ):
        dl.fit(
            small_mlp(),
            dl.adam(1e-2),
            digits.train,
            epochs=1,
            batch_size=32,
            out_dir=out,
            resume=True,
            progress=False,
        )
    with pytest.raises(ValueError, match="model: "):
        dl.fit(
            dl.models.mlp(10, depth=1, width=16),
            dl.adam(1e-2),
            digits.train,
            epochs=1,
            batch_size=64,
            out_dir=out,
            resume=True,
            progress=False,
        )
    with pytest.raises(ValueError, match="already holds a run"):
        dl.fit(small_mlp(), dl.adam(1e-2), digits.train, epochs=1, batch_size=64, out_dir=out, progress=False)


# ----------------------------------------------------------------------------- bad input


@pytest.mark.parametrize(
    "change, error, message",
    [
        (dict(train="short_y"), ValueError, r"train: x and y must hold as many examples, got 1257 and 100"),
        (
            dict(train="bad_labels"),
            ValueError,
            r"fit: train labels=\[10\] is out of range; expected integer class indices in \[0, 10\)",
        ),
        (dict(train="negative_labels"), ValueError, r"fit: train labels=\[-1\] is out of range"),
        (
            dict(train="float_labels"),
            TypeError,
            r"fit: train: softmax_cross_entropy: labels must be integer class indices "
            r"\(dtype int\), got dtype float32",
        ),
        (dict(train="string_x"), TypeError, r"fit: train x must be an array of numbers, got dtype <U1"),
        (
            dict(train="three"),
            TypeError,
            r"fit: train must be \(x, y\) arrays, a random-access source of \(x, y\) examples or a "
            r"jaxdl.data.Split, got a tuple of 3 items",
        ),
        (dict(train="dict"), TypeError, r"fit: train must be \(x, y\) arrays.*, got dict"),
        (
            dict(validation="negative_labels"),
            ValueError,
            r"fit: validation labels=\[-1, -1, -1, -1, -1, ...\] is out",
        ),
        (dict(validation="float_labels"), TypeError, r"fit: validation: softmax_cross_entropy: labels"),
        (dict(seed=-1), ValueError, r"fit: seed=-1 is out of range; expected an integer >= 0"),
        (
            dict(model="batchnorm", batch_size=1),
            ValueError,
            r"fit: train step: .*BatchNorm: training needs more than one value per channel",
        ),
        (
            dict(optimizer="uncalled"),
            TypeError,
            r"fit: optimizer must be an optax.GradientTransformation, got <function adam.*without calling",
        ),
        (dict(batch_size=0), ValueError, r"fit: batch_size=0 is out of range; expected an integer >= 1"),
        (dict(batch_size=5000), ValueError, r"fit: batch_size=5000 exceeds the 1257 training examples"),
        (dict(epochs=0), ValueError, r"fit: epochs=0 is out of range; expected an integer >= 1"),
        (
            dict(validation="wide"),
            ValueError,
            r"validation examples have shape x \(8, 9, 1\).*training examples x \(8, 8, 1\)",
        ),
        (dict(early_stopping=2), ValueError, r"early_stopping=2 needs validation data"),
        (dict(devices=3), ValueError, r"batch_size=64 is not divisible by devices=3"),
        (dict(augment=-1), ValueError, r"augment=-1 is out of range"),
        (dict(optimizer="adam"), TypeError, r"optimizer must be an optax.GradientTransformation"),
    ],
)
def test_bad_input_is_refused_before_anything_is_trained_or_written(digits, tmp_path, change, error, message):
    x, y = digits.train
    args = {"train": (x, y), "epochs": 1, "batch_size": 64, "optimizer": dl.adam(1e-2)}
    if change.get("train") == "short_y":
        change = {"train": (x, y[:100])}
    elif change.get("train") == "bad_labels":
        change = {"train": (x, np.where(np.arange(len(y)) == 5, 10, y))}
    elif change.get("train") == "negative_labels":
        change = {"train": (x, np.where(np.arange(len(y)) == 5, -1, y))}
    elif change.get("train") == "float_labels":
        change = {"train": (x, y.astype(np.float32))}
    elif change.get("train") == "string_x":
        change = {"train": (np.full(x.shape, "a"), y)}
    elif change.get("train") == "three":
        change = {"train": (x, y, y)}
    elif change.get("train") == "dict":
        change = {"train": {"x": x, "y": y}}
    elif change.get("validation") == "wide":
        change = {"validation": (np.zeros((10, 8, 9, 1), np.float32), np.zeros(10, np.int32))}
    elif change.get("validation") == "negative_labels":
        change = {"validation": (x[:10], np.full(10, -1, np.int32))}
    elif change.get("validation") == "float_labels":
        change = {"validation": (x[:10], np.zeros(10, np.float32))}
    elif change.get("optimizer") == "uncalled":
        change = {"optimizer": dl.adam}
    model = small_mlp()
    if change.get("model") == "batchnorm":
        model = dl.layers.Sequential(
            dl.layers.Flatten(), dl.layers.Dense(8), dl.layers.BatchNorm(), dl.layers.Dense(10)
        )
        change = {k: v for k, v in change.items() if k != "model"}
    args.update(change)
    out = tmp_path / "run"
    optimizer = args.pop("optimizer")
    train = args.pop("train")
    with pytest.raises(error, match=message):
        dl.fit(model, optimizer, train, out_dir=str(out), progress=False, **args)
    assert not out.exists()


@pytest.mark.parametrize(
    "data_, error, message",
    [
        (
            "negative_labels",
            ValueError,
            r"evaluate: data labels=\[-1\] is out of range; expected .* \[0, 10\)",
        ),
        (
            "too_large_labels",
            ValueError,
            r"evaluate: data labels=\[10, 10, 10, 10, 10, ...\] is out of range",
        ),
        (
            "float_labels",
            TypeError,
            r"evaluate: data: softmax_cross_entropy: labels must be integer class indices",
        ),
        ("string_x", TypeError, r"evaluate: data x must be an array of numbers, got dtype <U1"),
        ("three", TypeError, r"evaluate: data must be \(x, y\) arrays .*, got a tuple of 3 items"),
    ],
)
def test_evaluate_refuses_bad_data_by_name_before_scoring(digits, data_, error, message):
    x, y = digits.test.x[:20], digits.test.y[:20]
    state = dl.TrainState.create(small_mlp(), dl.sgd(0.1), jax.random.key(0), x.shape[1:])
    bad = {
        "negative_labels": (x, np.where(np.arange(20) == 3, -1, y)),
        "too_large_labels": (x, np.full(20, 10)),
        "float_labels": (x, y.astype(np.float32)),
        "string_x": (np.full(x.shape, "a"), y),
        "three": (x, y, y),
    }[data_]
    with pytest.raises(error, match=message):
        dl.evaluate(small_mlp(), state, bad)
    assert set(dl.evaluate(small_mlp(), state, (x, y))) == {"loss", "accuracy"}
