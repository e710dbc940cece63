"""Specification of the `jaxdl` command (jaxdl.cli): training end to end and its outputs,
evaluate, early stopping, resume to bitwise the same parameters (from an earlier checkpoint, past a
corrupt one and a torn metrics line; a real SIGKILL mid-run is tests/test_trainer.py's, on `fit`,
which the command runs), and bad arguments refused in one line before anything is written."""

import contextlib
import gzip
import importlib.metadata
import io
import json
import os
import shutil
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import pytest
from _cli_helpers import run_main  # tests/_cli_helpers.py

from jaxdl import cli, data

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")

# A tiny, fast configuration: 8x8 digits, one hidden layer (39 steps per epoch at batch 32).
TINY = [
    "--dataset",
    "digits",
    "--depth",
    "1",
    "--width",
    "32",
    "--batch-size",
    "32",
    "--lr",
    "0.01",
    "--augment",
    "0",
    "--dropout",
    "0",
    "--quiet",
]
TIMING_FIELDS = ("seconds", "examples_per_s")


def jaxdl_process(*argv, env=None, **kwargs):
    """``python -m jaxdl ARGV`` as a subprocess on the CPU; ``env``: variables to add or change."""
    return subprocess.Popen(
        [sys.executable, "-m", "jaxdl", *argv],
        env={**os.environ, "JAX_PLATFORMS": "cpu", **(env or {})},
        text=True,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        **kwargs,
    )


def finish(proc, timeout=240):
    out, err = proc.communicate(timeout=timeout)
    assert proc.returncode == 0, f"exit {proc.returncode}\nstdout: {out}\nstderr: {err[-3000:]}"
    return out, err


def model_leaves(run_dir):
    """The final params and model state of a run, as numpy arrays (flattened)."""
    _, _, _, restored = cli.load_run(str(run_dir))
    return [np.asarray(x) for x in jax.tree.leaves(restored)]


def assert_bitwise_equal(a, b):
    assert len(a) == len(b)
    for i, (x, y) in enumerate(zip(a, b)):
        assert x.dtype == y.dtype and x.shape == y.shape
        same = np.array_equal(x.view(np.uint8), y.view(np.uint8))
        assert same, f"leaf {i} differs, max |difference| {np.max(np.abs(x - y))}"


def metric_values(run_dir):
    """metrics.jsonl without its timing fields (which differ from run to run)."""
    records = cli.read_metrics(os.path.join(run_dir, "metrics.jsonl"))
    return [{k: v for k, v in r.items() if k not in TIMING_FIELDS} for r in records]


def corrupt(directory):
    """Flip one byte in the middle of the largest file of a checkpoint; return the file."""
    files = [
        os.path.join(root, n)
        for root, _, names in os.walk(directory)
        for n in names
        if n != "jaxdl_manifest.json"
    ]
    target = max(files, key=os.path.getsize)
    with open(target, "r+b") as f:
        f.seek(os.path.getsize(target) // 2)
        byte = f.read(1)
        f.seek(-1, os.SEEK_CUR)
        f.write(bytes([byte[0] ^ 0xFF]))
    return target


def write_idx(path, array):
    """Write a uint8 array as a gzipped IDX file (magic 00 00 08 ndim, big-endian sizes)."""
    header = bytes([0, 0, 0x08, array.ndim]) + np.array(array.shape, ">u4").tobytes()
    with gzip.open(path, "wb") as f:
        f.write(header + np.ascontiguousarray(array, np.uint8).tobytes())


@pytest.fixture(scope="module")
def digits_run(tmp_path_factory):
    """A finished 3-epoch run on digits, keeping 2 checkpoints: (directory, stdout).

    Trained once; tests that change a run work on a copy (`copy_run`).
    """
    out = tmp_path_factory.mktemp("digits") / "run"
    stdout = io.StringIO()
    with contextlib.redirect_stdout(stdout):
        code = cli.main(["train", *TINY, "--epochs", "3", "--keep", "2", "--out", str(out)])
    assert code == 0
    return out, stdout.getvalue()


# The tests that read digits_run run on one xdist worker (pyproject: --dist loadgroup), so that
# it is trained once, not once per worker.
SHARES_DIGITS_RUN = pytest.mark.xdist_group("test_cli.digits_run")


def copy_run(digits_run, tmp_path):
    return shutil.copytree(digits_run[0], tmp_path / "run")


# ----------------------------------------------------------------------------- training


@SHARES_DIGITS_RUN
def test_train_prints_test_accuracy_and_writes_metrics_curves_checkpoints_summary(digits_run):
    out, stdout = digits_run
    summary = json.loads((out / "summary.json").read_text())
    assert stdout.startswith(
        f"test accuracy {summary['test_accuracy']:.4f} ({summary['test_correct']}/360 on digits)"
    )
    assert summary["test_examples"] == 360 and summary["dataset"] == "digits"
    assert summary["test_accuracy"] > 0.8  # 3 epochs on digits: far above chance (0.1)
    assert summary["wall_time_s"] > 0 and summary["steps"] == 3 * 39
    assert summary["config"]["width"] == 32 and summary["config"]["optimizer"] == "adam"

    records = cli.read_metrics(out / "metrics.jsonl")
    assert [r["epoch"] for r in records] == [1, 2, 3]
    assert [r["step"] for r in records] == [39, 78, 117]
    for r in records:
        for key in (
            "train_loss",
            "train_accuracy",
            "val_loss",
            "val_accuracy",
            "lr",
            "update_ratio",
            "grad_norm",
        ):
            assert np.isfinite(r[key]) and r[key] >= 0, key
        assert 0 < r["update_ratio"] < 1 and r["nonfinite_steps"] == 0
    assert records[-1]["val_loss"] < records[0]["val_loss"]
    assert records[0]["lr"] > records[1]["lr"] > records[2]["lr"]  # cosine decay
    assert summary["final"] == records[-1]  # fit's part of the summary survives the command's

    image = __import__("matplotlib.image").image.imread(out / "curves.png")
    assert image.ndim == 3 and image.shape[0] > 200 and image.shape[1] > 400
    config = json.loads((out / "config.json").read_text())
    assert config["config"] == summary["config"] and config["data"]["input_shape"] == [8, 8, 1]
    assert sorted(int(s) for s in os.listdir(out / "checkpoints")) == [78, 117]  # --keep 2


@pytest.mark.slow
def test_python_dash_m_jaxdl_trains_with_a_progress_bar_and_sigterm_saves_and_exits_143(tmp_path, capsys):
    out_dir = tmp_path / "run"
    argv = ["train", "--limit-train", "256", "--depth", "1", "--width", "32", "--batch-size", "32"]
    argv += ["--epochs", "6", "--checkpoint-every", "4", "--out", str(out_dir)]
    proc = jaxdl_process(*argv)
    checkpoints = out_dir / "checkpoints"
    for _ in range(240 * 50):  # after the first epoch's end (8 steps) has been saved
        if (checkpoints / "8" / "jaxdl_manifest.json").is_file() or proc.poll() is not None:
            break
        time.sleep(0.02)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=240)
    assert proc.returncode == 143, err[-3000:]
    assert "ex/s" in err and "step/s" in err  # tqdm: speed; postfix: epoch, loss, accuracy
    assert "epoch 1/6: train loss" in err
    steps = sorted(
        int(s) for s in os.listdir(checkpoints) if (checkpoints / s / "jaxdl_manifest.json").is_file()
    )
    assert 8 <= steps[-1] < 48, steps  # the step of the block in flight (blocks of 1 step here)
    assert err.strip().splitlines()[-1] == (
        f"fit: interrupted by SIGTERM at step {steps[-1]}: checkpoint saved in {checkpoints}; "
        "to continue, run it again with resume=True (jaxdl train: the same command with --resume)"
    )
    assert not (out_dir / "summary.json").exists()

    code, stdout, _ = run_main(capsys, *argv, "--resume", "--quiet")
    assert code == 0 and stdout.startswith("test accuracy ")
    summary = json.loads((out_dir / "summary.json").read_text())
    assert (summary["resumed_from_step"], summary["steps"]) == (steps[-1], 48)


def test_console_script_is_cli_main():
    (script,) = importlib.metadata.entry_points(group="console_scripts", name="jaxdl")
    assert script.load() is cli.main


def test_help_documents_every_option(capsys):
    code, out, _ = run_main(capsys, "train", "--help")
    assert code == 0
    for option in (
        "--dataset",
        "--model",
        "--depth",
        "--width",
        "--activation",
        "--init",
        "--batchnorm",
        "--dropout",
        "--optimizer",
        "--lr",
        "--schedule",
        "--clip",
        "--clip-norm",
        "--noise-eta",
        "--noise-gamma",
        "--weight-decay",
        "--epochs",
        "--batch-size",
        "--augment",
        "--early-stopping",
        "--seed",
        "--out",
        "--resume",
        "--checkpoint-every",
        "--keep",
        "--blocks",
        "resnet",
    ):
        assert option in out, option
    assert "--limit-train" not in out  # a testing aid, hidden


# ----------------------------------------------------------------------------- evaluate


def test_evaluate_restores_the_run_and_scores_another_dataset_of_the_same_shape(tmp_path, capsys):
    out = tmp_path / "run"
    code, _, _ = run_main(
        capsys,
        "train",
        "--dataset",
        "mnist5k",
        "--limit-train",
        "640",
        "--depth",
        "1",
        "--width",
        "32",
        "--epochs",
        "1",
        "--augment",
        "0",
        "--quiet",
        "--out",
        str(out),
    )
    assert code == 0
    summary = json.loads((out / "summary.json").read_text())

    code, stdout, _ = run_main(capsys, "evaluate", str(out))
    assert code == 0
    assert stdout.startswith(
        f"test accuracy {summary['test_accuracy']:.4f} ({summary['test_correct']}/1000 on mnist5k)"
    )

    # The same 1,000 test images as MNIST IDX files: the same accuracy, from mnist:DIR.
    test = data.load_dataset("mnist5k").test
    mnist_dir = tmp_path / "mnist"
    mnist_dir.mkdir()
    pixels = np.rint(test.x[..., 0] * 255).astype(np.uint8)
    write_idx(mnist_dir / "t10k-images-idx3-ubyte.gz", pixels)  # scoring needs no training set
    write_idx(mnist_dir / "t10k-labels-idx1-ubyte.gz", test.y)
    result = cli.cmd_evaluate(str(out), f"mnist:{mnist_dir}", "test")
    assert result["examples"] == 1000
    assert result["accuracy"] == pytest.approx(summary["test_accuracy"], abs=1e-6)
    assert result["loss"] == pytest.approx(summary["test_loss"], rel=1e-5)

    code, _, err = run_main(capsys, "evaluate", str(out), "--dataset", "digits")
    assert code == 2 and len(err.strip().splitlines()) == 1
    assert "(8, 8, 1)" in err and "(28, 28, 1)" in err


@SHARES_DIGITS_RUN
def test_config_reruns_a_previous_run_with_command_line_options_overriding_it(digits_run, tmp_path, capsys):
    first, _ = digits_run
    again = tmp_path / "again"
    code, _, err = run_main(
        capsys, "train", "--config", str(first / "config.json"), "--keep", "1", "--quiet", "--out", str(again)
    )
    assert code == 0, err
    cfg_first = json.loads((first / "config.json").read_text())["config"]
    cfg_again = json.loads((again / "config.json").read_text())["config"]
    assert cfg_again == {**cfg_first, "keep": 1} and cfg_first["keep"] == 2
    assert metric_values(again) == metric_values(first)  # the same run, bit for bit
    assert_bitwise_equal(model_leaves(again), model_leaves(first))
    code, _, err = run_main(capsys, "train", "--config", str(tmp_path / "none.json"))
    assert code == 2 and "--config" in err and "no such file" in err


def write_npz(path, n_train=300, n_test=60, classes=3, shape=(10, 12)):
    """Images whose class sets the brightness of one band of rows, plus noise."""
    rng = np.random.default_rng(0)
    arrays = {}
    for split, n in (("train", n_train), ("test", n_test)):
        y = rng.integers(0, classes, n)
        x = rng.integers(0, 60, (n, *shape))
        for c in range(classes):
            x[y == c, 3 * c : 3 * c + 3] += 180
        arrays[f"x_{split}"], arrays[f"y_{split}"] = x.astype(np.uint8), y
    np.savez(path, **arrays)


def test_npz_dataset_trains_on_the_users_own_arrays(tmp_path, capsys):
    write_npz(tmp_path / "mine.npz")
    out = tmp_path / "run"
    code, stdout, err = run_main(
        capsys,
        "train",
        "--dataset",
        f"npz:{tmp_path / 'mine.npz'}",
        "--depth",
        "1",
        "--width",
        "16",
        "--epochs",
        "3",
        "--batch-size",
        "30",
        "--quiet",
        "--out",
        str(out),
    )
    assert code == 0, err
    summary = json.loads((out / "summary.json").read_text())
    assert summary["data"]["num_classes"] == 3 and summary["data"]["input_shape"] == [10, 12, 1]
    assert summary["data"]["train_examples"] == 270 and summary["test_examples"] == 60
    assert summary["test_accuracy"] > 0.9  # the classes are far apart; chance is 1/3
    assert stdout.startswith("test accuracy ")


@pytest.mark.parametrize(
    "arrays, message",
    [
        (
            {"x_train": np.zeros((4, 5, 5), np.uint8), "y_train": np.zeros(4, int)},
            "missing arrays ['x_test', 'y_test']",
        ),
        (
            {
                "x_train": np.zeros((4, 5), np.uint8),
                "y_train": np.zeros(4, int),
                "x_test": np.zeros((2, 5), np.uint8),
                "y_test": np.zeros(2, int),
            },
            "x_train has shape (4, 5); expected images (N, H, W) or (N, H, W, C)",
        ),
        (
            {
                "x_train": np.zeros((4, 5, 5), np.uint8),
                "y_train": np.zeros(3, int),
                "x_test": np.zeros((2, 5, 5), np.uint8),
                "y_test": np.zeros(2, int),
            },
            "y_train holds 3 labels for 4 images",
        ),
        (
            {
                "x_train": np.full((4, 5, 5), np.nan, np.float32),
                "y_train": np.zeros(4, int),
                "x_test": np.zeros((2, 5, 5), np.float32),
                "y_test": np.zeros(2, int),
            },
            "x_train holds 100 NaN or Inf",
        ),
    ],
)
def test_a_bad_npz_is_refused_in_one_line_naming_the_array(tmp_path, capsys, arrays, message):
    np.savez(tmp_path / "bad.npz", **arrays)
    code, _, err = run_main(
        capsys, "train", "--dataset", f"npz:{tmp_path / 'bad.npz'}", "--out", str(tmp_path / "run")
    )
    assert code == 2 and len(err.strip().splitlines()) == 1 and message in err, err
    assert not (tmp_path / "run").exists()


def test_precision_accumulate_and_ema_reach_fit_and_the_summary(tmp_path, capsys):
    out = tmp_path / "run"
    code, stdout, err = run_main(
        capsys,
        "train",
        *TINY,
        "--epochs",
        "2",
        "--precision",
        "bf16",
        "--accumulate",
        "2",
        "--ema",
        "0.9",
        "--out",
        str(out),
    )
    assert code == 0, err
    summary = json.loads((out / "summary.json").read_text())
    assert summary["config"]["precision"] == "bf16" and summary["config"]["accumulate"] == 2
    assert summary["test_accuracy"] > 0.8 and summary["ema_test_accuracy"] > 0.8  # chance: 0.1
    assert f"EMA weights {summary['ema_test_accuracy']:.4f}" in stdout
    records = cli.read_metrics(out / "metrics.jsonl")
    assert all("ema_val_loss" in r for r in records)
    code, _, err = run_main(capsys, "train", *TINY, "--accumulate", "3", "--out", str(tmp_path / "bad"))
    assert code == 2 and "--batch-size 32 is not divisible by --accumulate 3" in err


def test_doctor_examines_what_train_would_train_and_exits_by_the_report(tmp_path, capsys):
    small = ["--dataset", "digits", "--depth", "1", "--width", "64", "--batch-size", "32", "--augment", "0"]
    out = tmp_path / "report"
    code, stdout, err = run_main(capsys, "doctor", *small, "--out", str(out))
    assert code == 0, stdout + err
    for check in (
        "data",
        "initial_loss",
        "gradient_check",
        "symmetry",
        "overfit",
        "learning_rate",
        "update_ratio",
        "activations",
        "gradients",
    ):
        assert check in stdout, check
    assert (out / "report.md").is_file() and json.loads((out / "report.json").read_text())
    code, stdout, _ = run_main(capsys, "doctor", *small, "--lr", "50")  # far past divergence
    assert code == 1
    report = [line for line in stdout.splitlines() if "learning_rate" in line]
    assert report and "fail" in report[0].lower(), stdout
    code, _, err = run_main(capsys, "doctor", *small, "--lr", "-1")
    assert code == 2 and "argument --lr: must be 0 < value" in err


@SHARES_DIGITS_RUN
def test_evaluate_refuses_a_corrupt_model_naming_the_file(digits_run, tmp_path, capsys):
    out = copy_run(digits_run, tmp_path)
    bad_file = corrupt(out / "model")
    code, stdout, err = run_main(capsys, "evaluate", str(out))
    assert code == 1 and stdout == ""
    assert bad_file in err and "sha256" in err and len(err.strip().splitlines()) == 1


def test_evaluate_of_a_directory_without_a_run_fails_in_one_line(tmp_path, capsys):
    code, _, err = run_main(capsys, "evaluate", str(tmp_path))
    assert code == 2 and "no config.json" in err and len(err.strip().splitlines()) == 1


# ----------------------------------------------------------------------------- early stopping


def test_early_stopping_keeps_the_parameters_of_the_best_validation_epoch(tmp_path, capsys):
    # 64 training examples and a large constant learning rate: validation loss bottoms out
    # within a few epochs and then rises as the model overfits.
    out = tmp_path / "run"
    code, _, _ = run_main(
        capsys,
        "train",
        *TINY,
        "--limit-train",
        "64",
        "--width",
        "64",
        "--lr",
        "0.01",
        "--schedule",
        "constant",
        "--epochs",
        "40",
        "--early-stopping",
        "3",
        "--out",
        str(out),
    )
    assert code == 0
    records = cli.read_metrics(out / "metrics.jsonl")
    val_losses = [r["val_loss"] for r in records]
    best = int(np.argmin(val_losses)) + 1
    summary = json.loads((out / "summary.json").read_text())
    assert summary["stopped_early"] and summary["best_epoch"] == best
    assert len(records) == best + 3 < 40

    # model/ holds the best epoch's parameters: their validation loss is the best epoch's.
    result = cli.cmd_evaluate(str(out), None, "val")
    assert result["loss"] == pytest.approx(val_losses[best - 1], rel=1e-6)
    assert result["loss"] < val_losses[-1]


# ----------------------------------------------------------------------------- resume


@SHARES_DIGITS_RUN
def test_resume_falls_back_past_a_corrupt_checkpoint(digits_run, tmp_path, capsys):
    out = copy_run(digits_run, tmp_path)
    bad_file = corrupt(out / "checkpoints" / "117")
    code, _, err = run_main(
        capsys, "train", *TINY, "--epochs", "3", "--keep", "2", "--out", str(out), "--resume"
    )
    assert code == 0
    assert "skipping checkpoint step 117" in err and bad_file in err
    assert "resumed from checkpoint step 78" in err
    assert_bitwise_equal(model_leaves(out), model_leaves(digits_run[0]))
    assert metric_values(out) == metric_values(digits_run[0])
    assert json.loads((out / "summary.json").read_text())["resumed_from_step"] == 78


@SHARES_DIGITS_RUN
def test_resume_with_every_checkpoint_corrupt_fails_naming_the_files(digits_run, tmp_path, capsys):
    out = copy_run(digits_run, tmp_path)
    bad_files = [corrupt(out / "checkpoints" / s) for s in ("78", "117")]
    code, _, err = run_main(capsys, "train", "--out", str(out), "--resume")
    assert code == 1
    last = err.strip().splitlines()[-1]
    assert last.startswith("jaxdl train: error: cannot resume: no good checkpoint")
    assert all(f in last for f in bad_files)


@SHARES_DIGITS_RUN
def test_resume_rewrites_metrics_after_the_checkpoint_and_drops_a_torn_last_line(
    digits_run, tmp_path, capsys
):
    out = copy_run(digits_run, tmp_path)
    shutil.rmtree(out / "checkpoints" / "117")  # back to the end of epoch 2 ...
    with open(out / "metrics.jsonl", "a") as f:
        f.write('{"epoch": 4, "train_lo')  # ... with a line that a kill cut short
    code, _, err = run_main(capsys, "train", "--out", str(out), "--resume")
    assert code == 0 and "resumed from checkpoint step 78" in err
    assert metric_values(out) == metric_values(digits_run[0])
    assert_bitwise_equal(model_leaves(out), model_leaves(digits_run[0]))


@SHARES_DIGITS_RUN
def test_resume_of_a_finished_run_changes_nothing(digits_run, tmp_path, capsys):
    out = copy_run(digits_run, tmp_path)
    code, stdout, err = run_main(capsys, "train", "--out", str(out), "--resume", "--quiet")
    assert code == 0 and "resumed from checkpoint step 117" in err
    assert stdout.split(", test loss")[0] == digits_run[1].split(", test loss")[0]
    assert_bitwise_equal(model_leaves(out), model_leaves(digits_run[0]))
    assert metric_values(out) == metric_values(digits_run[0])


def test_chunk_bounds_cut_at_checkpoint_steps_into_blocks_and_single_steps():
    assert cli.chunk_bounds(0, 12, 4, 12) == [(0, 4), (4, 8), (8, 12)]
    assert cli.chunk_bounds(0, 12, 5, 12) == [(0, 5), (5, 10), (10, 11), (11, 12)]
    # Epoch 1 covers global steps 12..23; checkpoints every 10 steps fall at 20 (position 8).
    assert cli.chunk_bounds(1, 12, 3, 10) == [(0, 3), (3, 6), (6, 7), (7, 8), (8, 11), (11, 12)]
    # Resuming at the checkpoint (position 8) runs exactly the remaining blocks.
    assert cli.chunk_bounds(1, 12, 3, 10, start=8) == [(8, 11), (11, 12)]
    assert cli.default_block_size(54) == 18 and cli.default_block_size(39) == 13
    assert cli.default_block_size(53) == 16 and cli.default_block_size(5) == 5


# ----------------------------------------------------------------------------- building blocks


@pytest.mark.parametrize("optimizer", cli.OPTIMIZERS)
@pytest.mark.parametrize("schedule", cli.SCHEDULES)
def test_every_optimizer_and_schedule_takes_a_descent_step(optimizer, schedule):
    cfg = cli.resolve_defaults(
        {**cli.DEFAULTS, "optimizer": optimizer, "schedule": schedule, "lr": 0.1, "warmup": 2, "epochs": 2}
    )
    sched = cli.build_schedule(cfg, steps_per_epoch=5)
    assert float(sched(0)) == 0.0 and float(sched(2)) == pytest.approx(0.1)  # warm-up, then lr
    tx = cli.build_optimizer(cfg, sched, jax.random.key(0))
    params = {"w": np.array([1.0, -2.0], np.float32)}
    grads = {"w": np.array([0.5, -0.5], np.float32)}
    state = tx.init(params)
    for _ in range(3):
        updates, state = tx.update(grads, state, params)
    assert np.all(np.sign(updates["w"]) == -np.sign(grads["w"]))


def test_clip_clip_norm_and_noise_shape_the_update():
    base = {**cli.DEFAULTS, "optimizer": "sgd", "schedule": "constant", "lr": 1.0, "epochs": 1}
    grads = {"w": np.array([3.0, -4.0], np.float32)}
    params = {"w": np.zeros(2, np.float32)}

    def update(**options):
        cfg = cli.resolve_defaults({**base, **options})
        tx = cli.build_optimizer(cfg, cli.build_schedule(cfg, 1), jax.random.key(0))
        return np.asarray(tx.update(grads, tx.init(params), params)[0]["w"])

    np.testing.assert_allclose(update(), [-3.0, 4.0])
    np.testing.assert_allclose(update(clip=1.0), [-1.0, 1.0])
    np.testing.assert_allclose(update(clip_norm=1.0), [-0.6, 0.8], rtol=1e-6)
    assert not np.allclose(update(noise_eta=1.0), [-3.0, 4.0])
    np.testing.assert_allclose(update(weight_decay=0.5), [-3.0, 4.0])  # params are 0
    cfg = cli.resolve_defaults({**base, "optimizer": "adamw"})
    assert cfg["weight_decay"] == 0.01


@pytest.mark.parametrize("model", ["mlp", "cnn"])
def test_model_options_build_the_layers(model):
    cfg = cli.resolve_defaults(
        {
            **cli.DEFAULTS,
            "model": model,
            "depth": 2,
            "width": 16,
            "channels": [4],
            "batchnorm": True,
            "dropout": 0.5,
            "activation": "tanh",
            "init": "xavier_uniform",
        }
    )
    net = cli.build_model(cfg, 10)
    kinds = [type(layer).__name__ for layer in net.layers]
    expected = (
        (["Conv", "BatchNorm", "Tanh", "MaxPool"] if model == "cnn" else [])
        + ["Flatten"]
        + ["Dense", "BatchNorm", "Tanh", "Dropout"] * 2
        + ["Dense"]
    )
    assert kinds == expected
    assert not net.layers[kinds.index("Dense")].use_bias  # BatchNorm makes the bias redundant
    shape, params, state = net.init(jax.random.key(0), (8, 8, 1))
    assert shape == (10,) and state


def test_model_resnet_takes_channels_and_blocks_and_trains_through_the_command(tmp_path, capsys):
    assert cli.resolve_defaults({**cli.DEFAULTS, "model": "resnet"})["channels"] == [16, 32, 64]
    argv = ["--dataset", "digits", "--model", "resnet", "--channels", "4"]
    argv += ["--limit-train", "64", "--batch-size", "32", "--epochs", "1", "--augment", "0", "--quiet"]
    code, out, err = run_main(capsys, "train", *argv, "--out", str(tmp_path / "run"))
    assert code == 0, err
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert out.startswith("test accuracy ") and summary["steps"] == 2
    config = summary["config"]
    assert (config["model"], config["channels"], config["blocks"]) == ("resnet", [4], 1)
    net = cli.build_model(config, 10)
    kinds = [type(layer).__name__ for layer in net.layers]
    assert kinds.count("Residual") == 1 and kinds[-2:] == ["GlobalAvgPool", "Dense"]
    saved = json.loads((tmp_path / "run" / "config.json").read_text())
    del saved["config"]["blocks"]  # a run written before --blocks existed
    (tmp_path / "run" / "config.json").write_text(json.dumps(saved))
    assert cli.read_run(str(tmp_path / "run"))[0]["blocks"] == 1


# ----------------------------------------------------------------------------- bad arguments


def bad_run_dir(tmp_path):
    run = tmp_path / "existing"
    run.mkdir()
    saved = {"config": {**cli.DEFAULTS, "lr": 0.01}, "data": {"input_shape": [28, 28, 1], "num_classes": 10}}
    (run / "config.json").write_text(json.dumps(saved))
    return run


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--optimizer", "adamax"], "argument --optimizer: invalid choice: 'adamax'"),
        (["--lr", "-0.1"], "argument --lr: must be 0 < value, got -0.1"),
        (["--lr", "nan"], "argument --lr: must be 0 < value, got nan"),
        (["--epochs", "0"], "argument --epochs: must be 1 <= value, got 0"),
        (["--dropout", "1.5"], "argument --dropout: must be 0 <= value < 1, got 1.5"),
        (["--dataset", "cifar10"], "argument --dataset: must be mnist5k, digits, mnist:DIR or npz:PATH"),
        (["--dataset", "mnist:{tmp}/no-such-dir"], "MNIST folder not found: {tmp}/no-such-dir"),
        (["--batch-size", "5000"], "--batch-size 5000 exceeds the 3500 training examples"),
        (["--out", "{tmp}/a-file/run"], "{tmp}/a-file is not a directory"),
        (["--out", "{tmp}/a-file"], "exists and is not a directory"),
        (["--out", "{tmp}/existing"], "already holds a run; pass --resume"),
        (
            ["--out", "{tmp}/existing", "--resume", "--lr", "0.1"],
            "--resume: options differ from {tmp}/existing/config.json: --lr 0.1 (the run has 0.01)",
        ),
        (["--resume"], "--resume needs --out DIR"),
        (["--warmup", "-1"], "argument --warmup: must be 0 <= value, got -1"),
        (["--devices", "8"], "--devices 8: only 4 local devices"),
        (["--devices", "3"], "--batch-size 64 is not divisible by --devices 3"),
    ],
)
def test_bad_arguments_print_one_line_and_write_nothing(tmp_path, capsys, monkeypatch, argv, message):
    monkeypatch.chdir(tmp_path)  # the default --out (runs/...) would land here
    (tmp_path / "a-file").write_text("not a directory")
    bad_run_dir(tmp_path)
    before = sorted(str(p) for p in tmp_path.rglob("*"))
    argv = [a.replace("{tmp}", str(tmp_path)) for a in argv]
    code, stdout, err = run_main(capsys, "train", *argv)
    assert code == 2 and stdout == ""
    assert len(err.strip().splitlines()) == 1, err
    assert err.startswith("jaxdl train: error: ")
    assert message.replace("{tmp}", str(tmp_path)) in err
    assert sorted(str(p) for p in tmp_path.rglob("*")) == before  # nothing written


def test_unwritable_out_is_refused(tmp_path, capsys, monkeypatch):
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o555)
    if os.geteuid() == 0:  # root writes anywhere: show it the directory as a user would see it
        real_access = os.access
        monkeypatch.setattr(
            cli.os,
            "access",
            lambda path, mode: real_access(path, mode) and os.path.abspath(path) != str(locked),
        )
    code, _, err = run_main(capsys, "train", "--out", str(locked / "run"))
    locked.chmod(0o755)
    assert code == 2 and f"{locked} is not writable" in err and len(err.strip().splitlines()) == 1
    assert not (locked / "run").exists()


def test_train_script_is_valid_bash_that_installs_and_runs_jaxdl():
    script = os.path.join(os.path.dirname(__file__), "..", "scripts", "train.sh")
    subprocess.run(["bash", "-n", script], check=True)
    text = open(script).read()
    assert "pip install -e" in text and 'jaxdl" train "$@"' in text


def test_devices_trains_data_parallel_like_one_device(tmp_path, capsys):
    """--devices 4 (shard_map over 4 fake CPU devices, BatchNorm synced) follows the single-device
    run: without dropout and augmentation the math is the same up to float reduction order."""
    common = [*TINY, "--batchnorm", "--epochs", "1", "--limit-train", "512"]
    results = {}
    for name, extra in [("one", []), ("four", ["--devices", "4"])]:
        code, out, err = run_main(capsys, "train", *common, *extra, "--out", str(tmp_path / name))
        assert code == 0, err
        results[name] = json.loads((tmp_path / name / "summary.json").read_text())
    assert results["four"]["config"]["devices"] == 4
    assert abs(results["four"]["test_accuracy"] - results["one"]["test_accuracy"]) <= 0.01
    for a, b in zip(model_leaves(tmp_path / "one"), model_leaves(tmp_path / "four")):
        np.testing.assert_allclose(a, b, rtol=2e-3, atol=2e-4)
