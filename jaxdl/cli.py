"""The ``jaxdl`` command: argument parsing, configuration and printing over `jaxdl.fit`.

    jaxdl train [options]                    # an MLP on the bundled 5k MNIST, prints test accuracy
    jaxdl train --model cnn --out runs/cnn   # a small CNN
    jaxdl train --out runs/cnn --resume      # continue a killed run from its newest good checkpoint
    jaxdl train --config runs/cnn/config.json --seed 1   # rerun a configuration, one option changed
    jaxdl doctor --init normal --lr 5        # examine what `jaxdl train --init normal --lr 5` would train
    jaxdl evaluate runs/cnn --dataset mnist:~/data/mnist

The training itself is `jaxdl.trainer.fit` (scan-fused blocks, checkpoints, bitwise resume,
early stopping, data parallel); the models are `jaxdl.models`. A run directory (``--out``) holds
what `fit` writes (``metrics.jsonl``, ``curves.png``, ``checkpoints/``, ``model/``,
``fit_config.json``) and:

- ``config.json``: the resolved options, written before training starts; ``evaluate``,
  ``--resume`` and ``--config`` rebuild everything from it.
- ``summary.json``: fit's summary (steps, the final epoch's record, ...) with the test accuracy
  and loss, wall time and configuration added (`jaxdl.trainer.write_summary`, its one writer).

docs/cli.md lists every option, the outputs and the measured figures.

Errors. A user error prints one line, ``jaxdl COMMAND: error: ...`` (argparse's format for a bad
option), and exits with status 2 before anything is written: a refused run leaves no config.json,
checkpoint or folder, and a run folder given to ``--resume`` stays as it was. A failure while
running (no good checkpoint to resume, a corrupt ``model/``, a full disk) exits with status 1.
User errors are:

- bad options: argparse, through the types and choices of `OPTIONS`; the values of a ``--config``
  file and of a run's config.json pass through the same parser (`check_options`);
- a ValueError or TypeError of jaxdl's argument checks on the user's values: `jaxdl.config`'s
  (the configuration, the data, ``--out``, the run folder) and `fit`'s refusals, those raised
  before fit writes ``fit_config.json``, i.e. before it trains or writes anything (`_fit`;
  the command then removes the config.json and the folders it made);
- errors reading the user's files: OSError, JSON errors, and what numpy's ``.npz`` and gzip's
  readers raise on a truncated or corrupted file (`jaxdl.config.DATA_ERRORS`).

Anything else, a ValueError raised once fit has started training included, is a bug and keeps
its traceback.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

from jaxdl import compile_cache, config, data, trainer
from jaxdl.config import (  # noqa: F401  (the configuration's names are the command's too)
    DEFAULTS,
    MODEL_DEFAULTS,
    MODELS,
    OPTIMIZER_LR,
    OPTIMIZERS,
    SCHEDULES,
    build_model,
    build_optimizer,
    build_schedule,
    resolve_defaults,
)
from jaxdl.models import ACTIVATIONS, INITS
from jaxdl.train_step import TrainState, supervised_loss
from jaxdl.trainer import chunk_bounds, default_block_size, read_metrics  # noqa: F401  (public here too)

__all__ = [
    "main",
    "build_parser",
    "check_options",
    "build_model",
    "build_optimizer",
    "build_schedule",
    "load_run",
]


class UsageError(Exception):
    """A user error (see the module docstring), found before anything is written; reported in one
    line, exit status 2."""


class RunError(Exception):
    """A failure during a command (e.g. no good checkpoint); reported in one line, exit status 1."""


# ----------------------------------------------------------------------------- argument parsing


class _Parser(argparse.ArgumentParser):
    """An ArgumentParser whose errors are one line: ``prog: error: message (see prog --help)``."""

    def error(self, message):
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def _number(kind, low=None, high=None, low_open=False, high_open=False):
    """An argparse type: ``kind(text)`` checked against a range, with a message naming it."""

    def parse(text):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {kind.__name__}, got {text!r}") from None
        bad_low = low is not None and (value <= low if low_open else value < low)
        bad_high = high is not None and (value >= high if high_open else value > high)
        if not math.isfinite(value) or bad_low or bad_high:
            lo = "" if low is None else f"{low:g} {'<' if low_open else '<='} "
            hi = "" if high is None else f" {'<' if high_open else '<='} {high:g}"
            raise argparse.ArgumentTypeError(f"must be {lo}value{hi}, got {text}")
        return value

    parse.__name__ = kind.__name__
    return parse


def _dataset_name(text):
    for prefix in ("mnist:", "npz:"):
        if text.startswith(prefix) and len(text) > len(prefix):
            return text
    if text in ("mnist5k", "digits"):
        return text
    raise argparse.ArgumentTypeError(f"must be mnist5k, digits, mnist:DIR or npz:PATH, got {text!r}")


def _channels(text):
    try:
        values = [int(v) for v in text.split(",")]
    except ValueError:
        values = []
    if not values or min(values) < 1:
        raise argparse.ArgumentTypeError(f"expected positive ints separated by commas, got {text!r}")
    return values


_positive_int, _nonneg_int = _number(int, low=1), _number(int, low=0)
_positive_float, _nonneg_float = _number(float, low=0, low_open=True), _number(float, low=0)
_rate = _number(float, low=0, high=1, high_open=True)


def _fit_option(group: str, name: str, text: str, **kwargs) -> tuple:
    """The `OPTIONS` row of `fit`'s option ``name``, generated from its `jaxdl.FitConfig` field:
    the flag (the configuration's key: `jaxdl.config.COMMAND_NAMES`, else fit's name) and, for a
    count, the type that parses it with the field's bound (the bound `FitConfig` checks)."""
    field = {f.name: f for f in dataclasses.fields(trainer.FitConfig)}[name]
    if "low" in field.metadata:
        kwargs = {"type": _number(int, low=field.metadata["low"]), **kwargs}
    return group, "--" + config.COMMAND_NAMES.get(name, name).replace("_", "-"), text, kwargs


_LR = ", ".join(f"{v:g} for {k}" for k, v in OPTIMIZER_LR.items())
_UNIT = _number(float, low=0, high=1, high_open=True)
# The options of `jaxdl train` and `jaxdl doctor`: (group, flag, help, argparse keywords). docs/cli.md
# describes each in full; defaults are appended from DEFAULTS / MODEL_DEFAULTS.
OPTIONS = [
    ("data", "--dataset", "mnist5k, digits, mnist:DIR (IDX files) or npz:PATH", dict(type=_dataset_name)),
    ("data", "--split-seed", "seed of the stratified train/val/test split", dict(type=_nonneg_int)),
    ("data", "--augment", "random shift of training images by up to SHIFT pixels", dict(type=_nonneg_int, metavar="SHIFT")),
    ("model", "--model", "mlp: DEPTH x Dense(WIDTH); cnn: CHANNELS x Conv 3x3, then the mlp; resnet: CHANNELS stages of BLOCKS residual blocks", dict(choices=MODELS)),
    ("model", "--depth", "hidden Dense layers", dict(type=_nonneg_int)),
    ("model", "--width", "units per hidden Dense layer", dict(type=_positive_int)),
    ("model", "--channels", "cnn: channels of the 3x3 convolutions; resnet: width of each stage", dict(type=_channels)),
    ("model", "--blocks", "resnet: residual blocks per stage", dict(type=_positive_int)),
    ("model", "--activation", "", dict(choices=sorted(ACTIVATIONS))),
    ("model", "--init", "initializer of every Dense and Conv kernel", dict(choices=sorted(INITS))),
    ("model", "--batchnorm", "BatchNorm after every hidden layer", dict(action=argparse.BooleanOptionalAction)),
    ("model", "--dropout", "drop probability after every hidden Dense", dict(type=_rate, metavar="RATE")),
    ("model", "--conv-impl", "jaxdl.layers.Conv's algorithm", dict(choices=("auto", "im2col", "xla"))),
    ("optimization", "--optimizer", "momentum/nesterov: sgd with --momentum", dict(choices=OPTIMIZERS)),
    ("optimization", "--lr", f"(initial) learning rate (default: {_LR})", dict(type=_positive_float)),
    ("optimization", "--momentum", "of momentum and nesterov", dict(type=_UNIT)),
    ("optimization", "--schedule", "learning-rate schedule over the run", dict(choices=SCHEDULES)),
    ("optimization", "--warmup", "linear warm-up steps from 0", dict(type=_nonneg_int, metavar="STEPS")),
    ("optimization", "--lr-final", "cosine/linear: final rate", dict(type=_nonneg_float)),
    ("optimization", "--step-every", "step: epochs between drops (default: epochs/3)", dict(type=_positive_int)),
    ("optimization", "--step-factor", "step: factor of each drop", dict(type=_number(float, low=0, high=1, low_open=True))),
    ("optimization", "--decay-rate", "inverse-time: decay per step", dict(type=_nonneg_float)),
    ("optimization", "--precision", "bf16/fp16 compute, float32 master weights", dict(choices=("fp32", "bf16", "fp16"))),
    _fit_option("optimization", "micro_batches", "gradient accumulation over K micro-batches", metavar="K"),
    ("optimization", "--ema", "moving average of the weights (default: off)", dict(type=_rate, metavar="DECAY")),
    ("optimization", "--clip", "elementwise clipping (default: off)", dict(type=_positive_float, metavar="MAX_ABS")),
    ("optimization", "--clip-norm", "global-norm clipping (default: off)", dict(type=_positive_float, metavar="MAX_NORM")),
    ("optimization", "--noise-eta", "annealed gradient noise N(0, eta/(1+t)^gamma)", dict(type=_nonneg_float)),
    ("optimization", "--noise-gamma", "", dict(type=_nonneg_float)),
    ("optimization", "--weight-decay", "L2 decay (default: 0.01 for adamw, else 0)", dict(type=_nonneg_float)),
    _fit_option("training", "epochs", ""),
    _fit_option("training", "batch_size", ""),
    _fit_option("training", "early_stopping", "patience in epochs (default: off)", metavar="PATIENCE"),
    _fit_option("training", "seed", "of init, data order, dropout, augmentation, noise"),
    _fit_option("training", "block_size", "steps per compiled scan (default: near 16)", metavar="STEPS"),
    _fit_option("training", "devices", "data parallel over N local devices (default: one)", metavar="N"),
    _fit_option("training", "shard", "with --devices: replicate the state, or split it over the devices (fsdp)", choices=("replicate", "fsdp")),
    ("output", "--config", "start from a run's config.json; options given override it", dict(metavar="JSON")),
    _fit_option("output", "out_dir", "run directory (default: runs/<time>-<model>-<dataset>)", metavar="DIR"),
    _fit_option("output", "checkpoint_every", "steps (default: every epoch)", metavar="STEPS"),
    _fit_option("output", "keep", "checkpoints kept", metavar="K"),
    ("output", "--resume", "continue the run in --out from its newest good checkpoint", dict(action="store_true")),
    ("output", "--quiet", "no progress bar, no per-epoch lines", dict(action="store_true")),
    ("output", "--no-compile-cache", "no persistent compilation cache", dict(action="store_true")),
]  # fmt: skip


_LIMIT_TRAIN = dict(type=_positive_int, help=argparse.SUPPRESS)  # --limit-train: a testing aid
# `fit`'s names of the options the command first spelled otherwise; both spellings work, the
# configuration (config.json) keeps the first one's key.
FIT_NAMES = {f"--{old}": "--" + new.replace("_", "-") for new, old in config.COMMAND_NAMES.items()}


def _add_train_options(p: argparse.ArgumentParser) -> None:
    """The `OPTIONS` (with `fit`'s name beside the command's where they differ: `FIT_NAMES`).
    Their defaults come from `DEFAULTS`/`MODEL_DEFAULTS`, not argparse, so the options given
    explicitly can be told apart (``--resume``, ``--config``)."""
    groups = {}
    for group, flag, text, kwargs in OPTIONS:
        name = flag[2:].replace("-", "_")
        per_model = {m: v[name] for m, v in MODEL_DEFAULTS.items() if name in v}
        if per_model:
            text += " (default: " + ", ".join(f"{v} for {m}" for m, v in per_model.items()) + ")"
        elif name in DEFAULTS and "(default" not in text:
            text += f" (default: {DEFAULTS[name]})"
        if group not in groups:
            groups[group] = p.add_argument_group(group)
        flags = (FIT_NAMES[flag], flag) if flag in FIT_NAMES else (flag,)
        groups[group].add_argument(*flags, dest=name, help=text.strip(), **kwargs)
    groups["data"].add_argument("--limit-train", **_LIMIT_TRAIN)


class _CheckingParser(_Parser):
    """The train options' parser for values read from files: an error raises UsageError."""

    def error(self, message):
        raise UsageError(message)


def _json_kind(kwargs: dict) -> tuple[tuple[type, ...], str]:
    """The JSON type an option's value must have in a config file, and its name in messages."""
    kind = kwargs.get("type")
    if kwargs.get("action") is argparse.BooleanOptionalAction:
        return (bool,), "true or false"
    if kind is _channels:
        return (list,), "a list of positive ints"
    if kind is not None and kind.__name__ == "int":
        return (int,), "an integer"
    if kind is not None and kind.__name__ == "float":
        return (int, float), "a number"
    return (str,), "a string"


def check_options(options: dict, source: str) -> dict:
    """Train options read from a file (``--config``, a run's config.json) checked as the command
    line's are: each value, once its JSON type is right, is written as the text a user would type
    and parsed by the same argparse types and choices (`OPTIONS`). ``null`` stands for an option
    left out, where the option has no fixed default (`DEFAULTS` holds None). Returns the parsed
    values; raises UsageError ``SOURCE: argument --name: ...`` naming the option and the value.
    Keys must be options (`jaxdl.config` refuses others first)."""
    kwargs = {flag[2:].replace("-", "_"): kw for _, flag, _, kw in OPTIONS}
    kwargs["limit_train"] = _LIMIT_TRAIN
    argv = []
    for name, value in options.items():
        flag = "--" + name.replace("_", "-")
        types, expected = _json_kind(kwargs[name])
        if value is None and DEFAULTS[name] is None:
            continue
        ok = isinstance(value, types) and (bool in types or not isinstance(value, bool))
        if ok and list in types:
            ok = all(type(v) is int for v in value)
        if not ok:
            raise UsageError(f"{source}: argument {flag}: expected {expected}, got {json.dumps(value)}")
        if bool in types:
            argv.append(flag if value else f"--no-{flag[2:]}")
        else:
            text = ",".join(map(str, value)) if list in types else str(value)
            argv.append(f"{flag}={text}")
    parser = _CheckingParser(prog="jaxdl train", argument_default=argparse.SUPPRESS, add_help=False)
    _add_train_options(parser)
    try:
        parsed = vars(parser.parse_args(argv))
    except UsageError as err:
        raise UsageError(f"{source}: {err}") from None
    return {**options, **parsed}


def build_parser() -> argparse.ArgumentParser:
    """The ``jaxdl`` argument parser, with subcommands ``train``, ``doctor`` and ``evaluate``.

    Options of ``train`` have no argparse defaults (they parse to absent); `DEFAULTS` and
    `MODEL_DEFAULTS` fill them in, so ``--resume`` can tell which were given explicitly.
    """
    parser = _Parser(prog="jaxdl", description="Train, examine and evaluate jaxdl models.")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)
    train = sub.add_parser(
        "train",
        help="train a model, print its test accuracy",
        argument_default=argparse.SUPPRESS,
        description="Train a model and print its accuracy on the held-out "
        "test split. Outputs go to --out (see docs/cli.md).",
    )
    _add_train_options(train)
    doc = sub.add_parser(
        "doctor",
        help="examine a training setup, say what is wrong",
        argument_default=argparse.SUPPRESS,
        description="Run the training recipe of Sarkar, CS60010 (Training) on the model, optimizer and data that "
        "jaxdl train would use with the same options (see docs/doctor.md); print "
        "the report, write it to --out, exit 0 when no check fails, else 1.",
    )
    _add_train_options(doc)
    ev = sub.add_parser(
        "evaluate",
        help="score a run's final (or best) parameters",
        description="Restore a run's final parameters (the best ones with "
        "--early-stopping) and print accuracy and loss on a dataset's test split "
        "(mnist:DIR needs only the t10k files for the test split).",
    )
    ev.add_argument("run_dir", metavar="RUN_DIR", help="a directory written by jaxdl train --out")
    ev.add_argument(
        "--dataset",
        type=_dataset_name,
        help="dataset to score on, of the same image shape and classes (default: the run's)",
    )
    ev.add_argument(
        "--split",
        choices=("test", "val", "train"),
        default="test",
        help="which split to score (default: test)",
    )
    return parser


# ----------------------------------------------------------------------------- configuration


def _as_command_errors(fn):
    """``fn`` of `jaxdl.config` with its errors as the command's: ValueError -> UsageError (exit
    2, nothing written), OSError -> RunError (exit 1). `jaxdl.config` reports the user's bad
    files (data, config files, run folders) as ValueErrors; its OSErrors are failures of a run
    (no ``model/`` yet, one that cannot be restored)."""

    def call(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except ValueError as err:
            raise UsageError(str(err)) from None
        except OSError as err:
            raise RunError(str(err)) from None

    call.__name__, call.__doc__ = fn.__name__, fn.__doc__
    return call


load_data, setup, check_out_dir, restore_run = map(
    _as_command_errors, (config.load_data, config.setup, config.check_out_dir, config.restore_run)
)
default_out_dir, fit_options = config.default_out_dir, config.fit_options


def train_config(explicit: dict) -> tuple[dict, bool]:
    """`jaxdl.config.train_config`, the options read from files checked by `check_options`."""
    return _as_command_errors(config.train_config)(explicit, check_options)


def read_run(run_dir: str) -> tuple[dict, dict]:
    """`jaxdl.config.read_run`: a run's options, checked by `check_options`, and data info."""
    return _as_command_errors(config.read_run)(run_dir, check_options)


def load_run(run_dir: str) -> tuple[dict, dict, object, dict]:
    """``(config, data_info, model, {"params", "model_state"})`` of a finished run (see
    `jaxdl.config.load_run`), its errors as the command's."""
    return _as_command_errors(config.load_run)(run_dir, check_options)


def _fit_config_stamp(out: str):
    """The identity of ``out/fit_config.json`` (inode, mtime), None when there is none. `fit`
    writes it anew (a new file, renamed into place) right after checking its arguments, before
    it trains or writes anything else."""
    try:
        st = os.stat(os.path.join(out, "fit_config.json"))
    except FileNotFoundError:
        return None
    return st.st_ino, st.st_mtime_ns


def _fit(ds: data.Dataset, s: config.Setup, out: str, resume: bool, log):
    """`trainer.fit` on the run's options (``s.fit``, the `FitConfig` the configuration built). Its refusals (a ValueError or TypeError raised before it
    wrote ``fit_config.json``: a bad value, a resume of a run of other data or options) are
    UsageErrors; one raised later, once training has started, is a bug and keeps its traceback."""
    from jaxdl.checkpoint import CorruptCheckpointError  # orbax: imported when a run needs it

    stamp = _fit_config_stamp(out)
    try:
        options = {f.name: getattr(s.fit, f.name) for f in dataclasses.fields(s.fit)}
        return trainer.fit(s.model, s.optimizer, ds.train, validation=ds.val, log=log, **options)
    except CorruptCheckpointError as err:
        raise RunError(f"cannot resume: {err}") from None
    except OSError as err:
        raise RunError(str(err)) from None
    except (ValueError, TypeError) as err:
        if _fit_config_stamp(out) != stamp:
            raise
        raise UsageError(f"--resume: {err}" if resume else str(err)) from None


def _new_dirs(path: str) -> list[str]:
    """The folders ``os.makedirs(path)`` would create, deepest first."""
    new, path = [], os.path.abspath(path)
    while not os.path.exists(path):
        new.append(path)
        path = os.path.dirname(path)
    return new


def _undo(out: str, config_path: str | None, new_dirs: list[str]) -> None:
    """Remove what `cmd_train` wrote before `fit` refused the run: its config.json and the empty
    folders it created (never anything else)."""
    if config_path is not None:
        os.remove(config_path)
    for path in new_dirs:
        try:
            os.rmdir(path)  # only if empty
        except OSError:
            break


# ----------------------------------------------------------------------------- commands


def _eval_state(params, model_state, input_shape) -> TrainState:
    return TrainState(
        step=jnp.zeros([], jnp.int32),
        params=params,
        model_state=model_state,
        opt_state=(),
        key=jax.random.key(0),
        input_shape=tuple(input_shape),
    )


def cmd_train(explicit: dict, log) -> dict:
    """``jaxdl train``: check everything, create the run directory, `fit`, score the test split."""
    t_start = time.perf_counter()
    cfg, resuming = train_config(explicit)
    quiet = explicit.get("quiet", False)
    out = explicit.get("out") or default_out_dir(cfg)
    check_out_dir(out, explicit.get("resume", False))
    ds = load_data(cfg["dataset"], cfg["split_seed"], cfg["limit_train"])
    s = setup(cfg, ds, out, explicit.get("resume", False), not quiet)
    new_dirs = _new_dirs(out)
    try:
        os.makedirs(out, exist_ok=True)
    except OSError as err:
        raise UsageError(f"--out {out}: cannot create it: {err}") from None
    info = {
        "input_shape": list(ds.train.x.shape[1:]),
        "num_classes": ds.num_classes,
        "train_examples": len(ds.train.y),
        "val_examples": len(ds.val.y),
        "test_examples": len(ds.test.y),
        "steps_per_epoch": s.steps_per_epoch,
        "block_size": cfg["block_size"] or default_block_size(s.steps_per_epoch),
        "checkpoint_every": cfg["checkpoint_every"] or s.steps_per_epoch,
    }
    config_path = None if resuming else os.path.join(out, "config.json")
    if config_path is not None:
        trainer.write_json(config_path, {"config": cfg, "data": info})
    header = (
        f"run directory {out}: {cfg['model']} on {cfg['dataset']} ({info['train_examples']} train "
        f"examples, {s.steps_per_epoch} steps per epoch), {cfg['optimizer']} lr {cfg['lr']:g}"
    )
    if resuming:  # fit may still refuse the resume, in one line: the header waits for fit's
        pending = [header]  # first message (resumed from checkpoint step ...)

        def fit_log(message):
            while pending:
                log(pending.pop())
            log(message)

    else:
        log(header)
        fit_log = log
    try:
        result = _fit(ds, s, out, explicit.get("resume", False), fit_log)
    except UsageError:
        _undo(out, config_path, new_dirs)
        raise
    precision = fit_options(cfg)["precision"]
    test = trainer.evaluate(s.model, result.state, ds.test, precision=precision)
    n_test = len(ds.test.y)
    ema_test = {}
    if cfg.get("ema") is not None:
        m = trainer.evaluate(s.model, result.state, ds.test, precision=precision, use_ema=True)
        ema_test = {"ema_test_accuracy": m["accuracy"], "ema_test_loss": m["loss"]}
    summary = trainer.write_summary(  # fit's summary (with its final record), and the test's
        out,
        result,
        test_accuracy=test["accuracy"],
        test_loss=test["loss"],
        test_examples=n_test,
        test_correct=int(round(test["accuracy"] * n_test)),
        **ema_test,
        dataset=cfg["dataset"],
        best_epoch=result.best_epoch if cfg["early_stopping"] else None,
        wall_time_s=round(time.perf_counter() - t_start, 3),
        parameters=int(sum(np.size(x) for x in jax.tree.leaves(result.state.params))),
        jax_version=jax.__version__,
        backend=jax.default_backend(),
        config=cfg,
        data=info,
    )
    ema_line = (
        f", EMA weights {ema_test['ema_test_accuracy']:.4f} (loss {ema_test['ema_test_loss']:.4f})"
        if ema_test
        else ""
    )
    print(
        f"test accuracy {test['accuracy']:.4f} ({summary['test_correct']}/{n_test} on {cfg['dataset']}), "
        f"test loss {test['loss']:.4f}{ema_line}, {summary['wall_time_s']:.1f} s; run directory {out}"
    )
    return summary


def cmd_doctor(explicit: dict) -> int:
    """``jaxdl doctor``: examine what ``jaxdl train`` with the same options would train."""
    from jaxdl import doctor

    cfg, _ = train_config({k: v for k, v in explicit.items() if k not in ("resume", "out")})
    out = explicit.get("out")
    if out is not None and os.path.exists(out) and not os.path.isdir(out):
        raise UsageError(f"--out {out}: exists and is not a directory")
    ds = load_data(cfg["dataset"], cfg["split_seed"], cfg["limit_train"])
    s = setup(cfg, ds)
    loss_fn = trainer.augmented_loss(supervised_loss(s.model), cfg["augment"] or None)
    report = doctor.examine(
        s.model,
        s.optimizer,
        ds.train,
        validation=ds.val,
        loss_fn=loss_fn,
        batch_size=cfg["batch_size"],
        seed=cfg["seed"],
    )
    print(report.summary())
    if out is not None:
        try:
            report.write(out)
        except OSError as err:
            raise RunError(f"--out {out}: cannot write the report: {err}") from None
        print(f"report written to {out}")
    return 0 if report.ok else 1


def _split_to_score(name: str, split: str, split_seed: int) -> tuple[data.Split, int]:
    """The split to score and the dataset's class count; ``mnist:DIR``'s test split needs only
    the t10k files."""
    if name.startswith("mnist:") and split == "test":
        try:
            part = data.load_mnist_test(name[len("mnist:") :])
        except config.DATA_ERRORS as err:
            raise UsageError(f"--dataset {name}: {config.data_error_text(err)}") from None
        return part, 10
    ds = load_data(name, split_seed)
    return getattr(ds, split), ds.num_classes


def cmd_evaluate(run_dir: str, dataset: str | None, split: str) -> dict:
    """``jaxdl evaluate``: read the run's options, load the data, rebuild the run's model, restore
    its parameters, score a split."""
    cfg, info = read_run(run_dir)
    name = dataset or cfg["dataset"]
    part, num_classes = _split_to_score(name, split, cfg["split_seed"])
    shape = list(part.x.shape[1:])
    if shape != info["input_shape"] or num_classes > info["num_classes"]:
        raise UsageError(
            f"--dataset {name}: images {tuple(shape)} with {num_classes} classes, "
            f"but the run's model takes {tuple(info['input_shape'])} with "
            f"{info['num_classes']} classes"
        )
    model, restored = restore_run(run_dir, cfg, info)
    state = _eval_state(restored["params"], restored["model_state"], shape)
    metrics = trainer.evaluate(model, state, part)
    loss, acc = metrics["loss"], metrics["accuracy"]
    correct = int(round(acc * len(part.y)))
    print(f"{split} accuracy {acc:.4f} ({correct}/{len(part.y)} on {name}), {split} loss {loss:.4f}")
    return {"accuracy": acc, "loss": loss, "examples": len(part.y), "dataset": name}


def main(argv=None) -> int:
    """Entry point of the ``jaxdl`` console script and ``python -m jaxdl``.

    Returns 0 on success (``doctor``: 1 when a check fails). A user error (bad options, data
    files, ``--config`` values, run folders, fit's refusals) prints one line and exits with status
    2 before anything is written; a failure while running (e.g. no good checkpoint to resume)
    exits with status 1. Other exceptions are bugs and propagate with their traceback.
    """
    parser = build_parser()
    args = vars(parser.parse_args(argv))
    command = args.pop("command")
    if command != "evaluate":  # the cache is process-wide: off means off for fit's enable() too
        (compile_cache.disable if args.pop("no_compile_cache", False) else compile_cache.enable)()
    prog = f"jaxdl {command}"

    def log(message):
        print(message, file=sys.stderr, flush=True)

    try:
        if command == "train":
            cmd_train(args, log)
        elif command == "doctor":
            return cmd_doctor(args)
        else:
            cmd_evaluate(args["run_dir"], args.get("dataset"), args["split"])
    except UsageError as err:
        print(f"{prog}: error: {err}", file=sys.stderr)
        raise SystemExit(2) from None
    except RunError as err:
        print(f"{prog}: error: {err}", file=sys.stderr)
        raise SystemExit(1) from None
    return 0
