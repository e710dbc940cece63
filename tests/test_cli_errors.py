"""Every user error of the `jaxdl` command is one line on stderr and exit status 2, with no
traceback, and a refused run writes nothing: bad data files, values in --config files (checked
as the command line's are), fit's refusals, and broken run folders (jaxdl.cli's docstring lists
which exceptions are user errors). A bug keeps its traceback.

Every test runs `main` in this process and fails before anything compiles, except the one that
runs ``python -m jaxdl`` to see the real process print no traceback.
"""

import json
import os
import subprocess
import sys

import numpy as np
import pytest
from _cli_helpers import run_main  # tests/_cli_helpers.py

from jaxdl import cli, config, trainer

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")

# A tiny run on digits (a few 100 ms to build; no test here trains).
TINY = {"dataset": "digits", "depth": 1, "width": 8, "batch_size": 32, "augment": 0, "dropout": 0.0}


def snapshot(folder):
    """Every path under ``folder`` with its bytes and modification time."""
    return {
        str(p.relative_to(folder)): (p.read_bytes() if p.is_file() else None, p.stat().st_mtime_ns)
        for p in sorted(folder.rglob("*"))
    }


def assert_one_line_error(code, stdout, err, prog, *words):
    assert code == 2, (code, err)
    assert stdout == "" and "Traceback" not in err
    assert len(err.splitlines()) == 1 and err.endswith("\n"), err
    assert err.startswith(f"jaxdl {prog}: error: "), err
    for word in words:
        assert word in err, (word, err)


def write_run(folder, edit=lambda saved: None, text=None):
    """A run folder's config.json as `jaxdl train` writes it (TINY on digits), changed by ``edit``
    or replaced by ``text``; the folder has no model/, which no test here reaches."""
    folder.mkdir()
    saved = {
        "config": config.resolve_defaults({**config.DEFAULTS, **TINY}),
        "data": {"input_shape": [8, 8, 1], "num_classes": 10, "train_examples": 1257},
    }
    edit(saved)
    (folder / "config.json").write_text(json.dumps(saved) if text is None else text)
    return folder


def write_npz(path, kind):
    """A broken .npz: empty, cut in half, or with flipped bytes inside an array."""
    arrays = {
        f"{a}_{s}": np.zeros((20, 4, 4) if a == "x" else 20, np.uint8)
        for a in "xy"
        for s in ("train", "test")
    }
    np.savez(path, **arrays)
    raw = bytearray(path.read_bytes())
    if kind == "empty":
        raw = b""
    elif kind == "truncated":
        raw = raw[: len(raw) // 2]
    else:
        raw[len(raw) // 4 : len(raw) // 4 + 8] = bytes(8)  # inside x_test's data: a bad CRC
    path.write_bytes(bytes(raw))
    return path


# ----------------------------------------------------------------------------- data files


@pytest.mark.parametrize("kind", ["empty", "truncated", "corrupted", "missing"])
def test_train_refuses_a_broken_npz_naming_it_and_writes_nothing(tmp_path, capsys, kind):
    data_file = tmp_path / "mine.npz"
    if kind != "missing":
        write_npz(data_file, kind)
    before = snapshot(tmp_path)
    code, out, err = run_main(
        capsys, "train", "--dataset", f"npz:{data_file}", "--out", str(tmp_path / "run")
    )
    assert_one_line_error(code, out, err, "train", f"--dataset npz:{data_file}: ")
    assert snapshot(tmp_path) == before


@pytest.mark.parametrize("kind", ["empty", "truncated", "corrupted"])
def test_evaluate_refuses_a_broken_npz_naming_it(tmp_path, capsys, kind):
    run = write_run(tmp_path / "run")
    data_file = write_npz(tmp_path / "mine.npz", kind)
    before = snapshot(tmp_path)
    code, out, err = run_main(capsys, "evaluate", str(run), "--dataset", f"npz:{data_file}")
    assert_one_line_error(code, out, err, "evaluate", f"--dataset npz:{data_file}: ")
    assert snapshot(tmp_path) == before


def test_python_dash_m_jaxdl_prints_a_user_error_in_one_line_without_traceback(tmp_path):
    data_file = write_npz(tmp_path / "mine.npz", "truncated")
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "jaxdl",
            "train",
            "--dataset",
            f"npz:{data_file}",
            "--out",
            str(tmp_path / "run"),
        ],
        env={**os.environ, "JAX_PLATFORMS": "cpu"},
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert_one_line_error(proc.returncode, proc.stdout, proc.stderr, "train", f"npz:{data_file}")
    assert sorted(os.listdir(tmp_path)) == ["mine.npz"]


# ----------------------------------------------------------------------------- --config files


@pytest.mark.parametrize(
    "options, message",
    [
        ({"lr": "0.1"}, 'argument --lr: expected a number, got "0.1"'),
        ({"epochs": 1.5}, "argument --epochs: expected an integer, got 1.5"),
        ({"epochs": True}, "argument --epochs: expected an integer, got true"),
        ({"batch_size": None}, "argument --batch-size: expected an integer, got null"),
        ({"batchnorm": "yes"}, 'argument --batchnorm: expected true or false, got "yes"'),
        ({"channels": [32, "64"]}, 'argument --channels: expected a list of positive ints, got [32, "64"]'),
        ({"model": "resnet50"}, "argument --model: invalid choice: 'resnet50'"),
        ({"model": "resnet", "blocks": 0}, "argument --blocks: must be 1 <= value, got 0"),
        ({"optimizer": "adamax"}, "argument --optimizer: invalid choice: 'adamax'"),
        (
            {"dataset": "cifar10"},
            "argument --dataset: must be mnist5k, digits, mnist:DIR or npz:PATH, got 'cifar10'",
        ),
        ({"lr": -0.1}, "argument --lr: must be 0 < value, got -0.1"),
        ({"dropout": 1.5}, "argument --dropout: must be 0 <= value < 1, got 1.5"),
        ({"epochs": 0}, "argument --epochs: must be 1 <= value, got 0"),
        ({"channels": []}, "argument --channels: expected positive ints separated by commas, got ''"),
        ({"learning_rate": 0.1}, "unknown option 'learning_rate' in 'config'; known options: dataset, "),
    ],
)
def test_config_file_values_are_checked_as_options_are(tmp_path, capsys, options, message):
    path = tmp_path / "config.json"
    path.write_text(json.dumps({"config": {**TINY, **options}}))
    before = snapshot(tmp_path)
    code, out, err = run_main(capsys, "train", "--config", str(path), "--out", str(tmp_path / "run"))
    assert_one_line_error(code, out, err, "train", f"--config {path}: {message}")
    assert snapshot(tmp_path) == before


@pytest.mark.parametrize(
    "text, message",
    [
        ("{", "not JSON (Expecting property name"),
        ("[1, 2]", "not a jaxdl run's config.json (expected an object with a 'config' object)"),
        ('{"config": {}, "comment": 1}', "unknown key 'comment'; known keys: config, data"),
        (None, "a directory, not a file"),
    ],
)
def test_config_file_that_is_not_a_config_is_refused(tmp_path, capsys, text, message):
    path = tmp_path / "config.json"
    path.mkdir() if text is None else path.write_text(text)
    code, out, err = run_main(capsys, "doctor", "--config", str(path))
    assert_one_line_error(code, out, err, "doctor", f"--config {path}: {message}")


def test_null_in_a_config_file_is_the_options_default(tmp_path):
    path = tmp_path / "config.json"
    path.write_text(json.dumps({"config": {"lr": None, "clip": None, "optimizer": "sgd"}}))
    cfg, resuming = cli.train_config({"config": str(path)})
    assert cfg["lr"] == config.OPTIMIZER_LR["sgd"] and cfg["clip"] is None and not resuming


# ----------------------------------------------------------------------------- fit's refusals


def test_a_resume_that_fit_refuses_is_one_line_and_leaves_the_run_as_it_was(tmp_path, capsys):
    # The run's fit_config.json records other training data than the digits it is resumed on
    # (the user's npz changed, say): fit refuses before it writes anything.
    run = write_run(tmp_path / "run")
    fit_config = {"train": "0123456789abcdef", "epochs": 15, "batch_size": 32}
    (run / "fit_config.json").write_text(json.dumps(fit_config))
    (run / "metrics.jsonl").write_text('{"epoch": 1}\n')
    before = snapshot(tmp_path)
    code, out, err = run_main(capsys, "train", "--out", str(run), "--resume")  # no --quiet: no header
    assert_one_line_error(
        code,
        out,
        err,
        "train",
        "--resume: fit: resume=True, but the configuration differs",
        "0123456789abcdef",
    )
    assert snapshot(tmp_path) == before


def test_a_run_that_fit_refuses_leaves_no_config_json_and_no_folder(tmp_path, monkeypatch):
    # The command checks every value with fit's own checks (FitConfig) before it writes anything:
    # called with one argparse would have refused (epochs=0), it refuses in its own words. What
    # only fit's trace of the train step finds (BatchNorm on batches of one example) comes after
    # config.json is written: cmd_train removes it and the folders it had made.
    monkeypatch.chdir(tmp_path)
    with pytest.raises(cli.UsageError, match=r"^--epochs 0 is out of range"):
        cli.cmd_train({**TINY, "epochs": 0, "quiet": True, "out": "a/b/run"}, log=lambda message: None)
    assert os.listdir(tmp_path) == []
    with pytest.raises(cli.UsageError, match=r"^fit: train step: .*BatchNorm"):
        run = {**TINY, "batchnorm": True, "batch_size": 1, "quiet": True, "out": "a/b/run"}
        cli.cmd_train(run, log=lambda message: None)
    assert os.listdir(tmp_path) == []


def test_a_value_error_after_fit_started_is_a_bug_and_keeps_its_traceback(tmp_path, monkeypatch):
    def broken_fit(model, optimizer, train, *, out_dir, **kwargs):
        trainer.write_json(os.path.join(out_dir, "fit_config.json"), {})  # fit has started
        raise ValueError("a bug")

    monkeypatch.setattr(trainer, "fit", broken_fit)
    argv = ["train", "--dataset", "digits", "--quiet", "--out", str(tmp_path / "run")]
    with pytest.raises(ValueError, match="^a bug$"):
        cli.main(argv)


# ----------------------------------------------------------------------------- run folders


BROKEN_RUNS = {
    "no folder": (None, None, "{run}: no such directory"),
    "no config.json": (None, "", "{run}: not a jaxdl run directory (no config.json)"),
    "not JSON": (None, "{", "{run}/config.json: not JSON"),
    "a missing option": (lambda s: s["config"].pop("width"), None, "{run}/config.json: no option 'width'"),
    "an unknown model": (
        lambda s: s["config"].update(model="resnet50"),
        None,
        "{run}/config.json: argument --model: invalid choice: 'resnet50'",
    ),
    "a bad value": (
        lambda s: s["config"].update(batch_size="32"),
        None,
        '{run}/config.json: argument --batch-size: expected an integer, got "32"',
    ),
    "an unknown option": (
        lambda s: s["config"].update(colour="red"),
        None,
        "{run}/config.json: unknown option 'colour'",
    ),
    "no data": (lambda s: s.pop("data"), None, "{run}/config.json: no 'data' object"),
    "a bad input shape": (
        lambda s: s["data"].update(input_shape=[8, 0]),
        None,
        "{run}/config.json: data.input_shape must be a list of positive ints, got [8, 0]",
    ),
}


def broken_run(tmp_path, case):
    edit, text, message = BROKEN_RUNS[case]
    run = tmp_path / "run"
    if case == "no config.json":
        run.mkdir()
    elif case != "no folder":
        write_run(run, edit or (lambda saved: None), text)
    return run, message.format(run=run)


@pytest.mark.parametrize("case", list(BROKEN_RUNS))
def test_evaluate_refuses_a_broken_run_folder_naming_the_file(tmp_path, capsys, case):
    run, message = broken_run(tmp_path, case)
    before = snapshot(tmp_path)
    code, out, err = run_main(capsys, "evaluate", str(run))
    assert_one_line_error(code, out, err, "evaluate", message)
    assert snapshot(tmp_path) == before


@pytest.mark.parametrize("case", ["not JSON", "a missing option", "an unknown model", "no data"])
def test_resume_refuses_a_broken_run_folder_and_leaves_it_as_it_was(tmp_path, capsys, case):
    run, message = broken_run(tmp_path, case)
    before = snapshot(tmp_path)
    code, out, err = run_main(capsys, "train", "--out", str(run), "--resume")
    assert_one_line_error(code, out, err, "train", message)
    assert snapshot(tmp_path) == before


def test_fits_names_are_the_commands_too_and_its_refusals_speak_the_commands_words():
    args = vars(cli.build_parser().parse_args(["train", "--micro-batches", "2", "--out-dir", "runs/x"]))
    old = vars(cli.build_parser().parse_args(["train", "--accumulate", "2", "--out", "runs/x"]))
    assert args == old and args["accumulate"] == 2 and args["out"] == "runs/x"
    assert (
        config.command_words("FitConfig: batch_size=32 is not divisible by micro_batches=3 times devices=2")
        == "--batch-size 32 is not divisible by --accumulate 3 times --devices 2"
    )


def test_resnet_refuses_the_mlp_options_instead_of_ignoring_them(tmp_path, capsys):
    argv = ["--model", "resnet", "--depth", "3", "--batchnorm", "--out", str(tmp_path / "run")]
    code, out, err = run_main(capsys, "train", *argv)
    assert_one_line_error(
        code, out, err, "train", "--model resnet does not take --depth 3, --batchnorm", "--blocks"
    )
    assert not (tmp_path / "run").exists()
