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
- ``summary.json``: test accuracy and loss, wall time, configuration.

docs/cli.md lists every option, the outputs and the measured figures.
"""

from __future__ import annotations

import argparse
import datetime
import math
import os
import sys
import time
from typing import Any, NamedTuple

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
from jaxdl.train_step import TrainState, check_labels, supervised_loss
from jaxdl.trainer import chunk_bounds, default_block_size, read_metrics  # noqa: F401  (public here too)

__all__ = ["main", "build_parser", "build_model", "build_optimizer", "build_schedule", "load_run"]


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


def _add_train_options(p: argparse.ArgumentParser) -> None:
    """The options of ``jaxdl train`` (docs/cli.md describes each). Their defaults come from
    `DEFAULTS`/`MODEL_DEFAULTS`, not argparse, so the options given explicitly can be told apart."""

    def add(group, flag, text, **kwargs):
        name = flag[2:].replace("-", "_")
        per_model = {m: v[name] for m, v in MODEL_DEFAULTS.items() if name in v}
        if per_model:
            text += " (default: " + ", ".join(f"{v} for {m}" for m, v in per_model.items()) + ")"
        elif name in DEFAULTS and "(default" not in text:
            text += f" (default: {DEFAULTS[name]})"
        group.add_argument(flag, help=text, **kwargs)

    g = p.add_argument_group("data")
    add(
        g,
        "--dataset",
        "mnist5k (bundled, 3,500/500/1,000), digits (8x8), mnist:DIR (IDX files) or "
        "npz:PATH (x_train, y_train, x_test, y_test)",
        type=_dataset_name,
    )
    add(g, "--split-seed", "seed of the stratified train/val/test split", type=_nonneg_int)
    g.add_argument("--limit-train", type=_positive_int, help=argparse.SUPPRESS)  # tests
    add(
        g,
        "--augment",
        "random shift of training images by up to SHIFT pixels; 0 is off",
        type=_nonneg_int,
        metavar="SHIFT",
    )

    g = p.add_argument_group("model")
    add(
        g,
        "--model",
        "mlp: DEPTH x [Dense(WIDTH), (BatchNorm), activation, (Dropout)]; cnn: CHANNELS x "
        "[Conv 3x3, (BatchNorm), activation, MaxPool 2], then the mlp's layers",
        choices=MODELS,
    )
    add(g, "--depth", "hidden Dense layers", type=_nonneg_int)
    add(g, "--width", "units per hidden Dense layer", type=_positive_int)
    add(
        g,
        "--channels",
        "cnn: channels of the 3x3 convolutions, comma separated (default: 32,64)",
        type=_channels,
    )
    add(g, "--activation", "", choices=sorted(ACTIVATIONS))
    add(g, "--init", "initializer of every Dense and Conv kernel", choices=sorted(INITS))
    add(
        g, "--batchnorm", "BatchNorm after every hidden Dense and Conv", action=argparse.BooleanOptionalAction
    )
    add(
        g,
        "--dropout",
        "drop probability after every hidden Dense activation; 0 is off",
        type=_rate,
        metavar="RATE",
    )
    add(g, "--conv-impl", "jaxdl.layers.Conv's algorithm", choices=("auto", "im2col", "xla"))

    g = p.add_argument_group("optimization")
    add(g, "--optimizer", "momentum and nesterov are sgd with --momentum", choices=OPTIMIZERS)
    add(
        g,
        "--lr",
        "(initial) learning rate (default: "
        + ", ".join(f"{v:g} for {k}" for k, v in OPTIMIZER_LR.items())
        + ")",
        type=_positive_float,
    )
    add(g, "--momentum", "of momentum/nesterov", type=_number(float, low=0, high=1, high_open=True))
    add(
        g,
        "--schedule",
        "over the whole run: cosine/linear to --lr-final, step (x --step-factor every "
        "--step-every epochs), lr/(1 + decay_rate*t), lr/sqrt(1 + t)",
        choices=SCHEDULES,
    )
    add(g, "--warmup", "linear warm-up steps from 0", type=_nonneg_int, metavar="STEPS")
    add(g, "--lr-final", "cosine/linear: final rate", type=_nonneg_float)
    add(
        g,
        "--step-every",
        "step: epochs between drops (default: a third of the epochs)",
        type=_positive_int,
        metavar="EPOCHS",
    )
    add(g, "--step-factor", "step: factor of each drop", type=_number(float, low=0, high=1, low_open=True))
    add(g, "--decay-rate", "inverse-time: decay per step", type=_nonneg_float)
    add(
        g,
        "--precision",
        "fp32, or float32 master weights with bf16/fp16 compute (fp16: dynamic loss scale)",
        choices=("fp32", "bf16", "fp16"),
    )
    add(
        g,
        "--accumulate",
        "gradient accumulation over K micro-batches per step",
        type=_positive_int,
        metavar="K",
    )
    add(
        g,
        "--ema",
        "exponential moving average of the weights, evaluated too (default: off)",
        type=_rate,
        metavar="DECAY",
    )
    add(
        g,
        "--clip",
        "clip every gradient entry to [-MAX_ABS, MAX_ABS] (default: off)",
        type=_positive_float,
        metavar="MAX_ABS",
    )
    add(
        g,
        "--clip-norm",
        "clip the gradient's global norm (default: off)",
        type=_positive_float,
        metavar="MAX_NORM",
    )
    add(g, "--noise-eta", "annealed gradient noise N(0, eta/(1+t)^gamma); 0 is off", type=_nonneg_float)
    add(g, "--noise-gamma", "", type=_nonneg_float)
    add(
        g,
        "--weight-decay",
        "L2 decay, decoupled for adamw (default: 0.01 for adamw, else 0)",
        type=_nonneg_float,
    )

    g = p.add_argument_group("training")
    add(g, "--epochs", "", type=_positive_int)
    add(g, "--batch-size", "", type=_positive_int)
    add(
        g,
        "--early-stopping",
        "stop after PATIENCE epochs without a lower validation loss, keep the best (default: off)",
        type=_positive_int,
        metavar="PATIENCE",
    )
    add(g, "--seed", "of initialization, data order, dropout, augmentation and noise", type=_nonneg_int)
    add(
        g,
        "--block-size",
        "steps per compiled lax.scan call (default: a divisor of the epoch near 16)",
        type=_positive_int,
        metavar="STEPS",
    )
    add(
        g,
        "--devices",
        "data parallel over N local devices (default: one; on a CPU set XLA_FLAGS="
        "--xla_force_host_platform_device_count=N)",
        type=_positive_int,
        metavar="N",
    )

    g = p.add_argument_group("output")
    add(g, "--config", "start from a run's config.json; options given override it", metavar="JSON")
    add(
        g,
        "--out",
        "run directory (default: runs/<time>-<model>-<dataset>); doctor: the report's",
        metavar="DIR",
    )
    add(
        g,
        "--checkpoint-every",
        "checkpoint interval (default: every epoch)",
        type=_positive_int,
        metavar="STEPS",
    )
    add(g, "--keep", "checkpoints kept", type=_positive_int, metavar="K")
    add(g, "--resume", "continue the run in --out from its newest good checkpoint", action="store_true")
    add(g, "--quiet", "no progress bar, no per-epoch lines", action="store_true")
    add(
        g,
        "--no-compile-cache",
        "neither read nor write JAX's persistent compilation cache (default: "
        "~/.cache/jaxdl/xla; JAXDL_COMPILE_CACHE=0 or DIR)",
        action="store_true",
    )


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
        description="Run seed 004's recipe on the model, optimizer and data that "
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


def train_config(explicit: dict) -> tuple[dict, bool]:
    """`jaxdl.config.train_config`, its errors as the command's."""
    try:
        return config.train_config(explicit)
    except ValueError as err:
        raise UsageError(str(err)) from None
    except OSError as err:
        raise RunError(str(err)) from None


def load_run(run_dir: str) -> tuple[dict, dict, Any, dict]:
    """`jaxdl.config.load_run`, its errors as the command's."""
    try:
        return config.load_run(run_dir)
    except ValueError as err:
        raise UsageError(str(err)) from None
    except OSError as err:
        raise RunError(str(err)) from None


def default_out_dir(cfg: dict) -> str:
    """``runs/<UTC time>-<model>-<dataset>`` (a suffix is added if it exists)."""
    stamp = datetime.datetime.now(datetime.timezone.utc).strftime("%Y%m%d-%H%M%S")
    name = cfg["dataset"].split(":")[0]
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
            raise UsageError(
                f"--out {path} already holds a run; pass --resume to continue it or choose another directory"
            )
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


class Setup(NamedTuple):
    """Everything built from a config before training."""

    model: Any
    optimizer: Any
    schedule: Any
    steps_per_epoch: int


def setup(cfg: dict, ds: data.Dataset) -> Setup:
    """Build model, schedule and optimizer; check what `fit` would refuse, before anything is
    written (their constructors check the hyperparameters)."""
    n_train = len(ds.train.y)
    if cfg["batch_size"] > n_train:
        raise UsageError(f"--batch-size {cfg['batch_size']} exceeds the {n_train} training examples")
    if cfg.get("devices"):
        if cfg["devices"] > jax.local_device_count():
            raise UsageError(
                f"--devices {cfg['devices']}: only {jax.local_device_count()} local devices "
                f"({jax.default_backend()}); on a CPU set XLA_FLAGS="
                f"--xla_force_host_platform_device_count={cfg['devices']}"
            )
        if cfg["batch_size"] % cfg["devices"]:
            raise UsageError(
                f"--batch-size {cfg['batch_size']} is not divisible by --devices {cfg['devices']}"
            )
    k = cfg.get("accumulate", 1)
    if cfg["batch_size"] % (k * (cfg.get("devices") or 1)):
        raise UsageError(
            f"--batch-size {cfg['batch_size']} is not divisible by --accumulate {k}"
            + (f" times --devices {cfg['devices']}" if cfg.get("devices") else "")
        )
    if cfg["augment"] and ds.train.x.ndim != 4:
        raise UsageError(
            f"--augment {cfg['augment']}: shifts images, but --dataset {cfg['dataset']} "
            f"has examples of shape {ds.train.x.shape[1:]}"
        )
    steps = n_train // cfg["batch_size"]
    noise_key = trainer.run_keys(cfg["seed"])[2]
    try:
        model = build_model(cfg, ds.num_classes)
        sched = build_schedule(cfg, steps)
        optimizer = build_optimizer(cfg, sched, noise_key)
    except (ValueError, TypeError) as err:
        raise UsageError(str(err)) from None
    return Setup(model, optimizer, sched, steps)


def _fit(cfg: dict, ds: data.Dataset, s: Setup, out: str, resume: bool, quiet: bool, log):
    from jaxdl.checkpoint import CorruptCheckpointError  # orbax: imported when a run needs it

    try:
        return trainer.fit(
            s.model,
            s.optimizer,
            ds.train,
            validation=ds.val,
            epochs=cfg["epochs"],
            batch_size=cfg["batch_size"],
            seed=cfg["seed"],
            augment=cfg["augment"] or None,
            early_stopping=cfg["early_stopping"],
            out_dir=out,
            resume=resume,
            checkpoint_every=cfg["checkpoint_every"],
            keep=cfg["keep"],
            devices=cfg["devices"],
            progress=not quiet,
            block_size=cfg["block_size"],
            learning_rate=s.schedule,
            log=log,
            **_step_options(cfg),
        )
    except CorruptCheckpointError as err:
        raise RunError(f"cannot resume: {err}") from None
    except OSError as err:
        raise RunError(str(err)) from None


def _step_options(cfg: dict) -> dict:
    """`fit`'s precision, micro_batches, loss_scale and ema of a configuration (``--precision
    fp16`` trains with a dynamic loss scale); a config.json older than these options has none."""
    precision = cfg.get("precision", "fp32")
    return {
        "precision": None if precision == "fp32" else precision,
        "micro_batches": cfg.get("accumulate", 1),
        "loss_scale": "dynamic" if precision == "fp16" else None,
        "ema": cfg.get("ema"),
    }


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
    s = setup(cfg, ds)
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
    if not resuming:
        trainer.write_json(os.path.join(out, "config.json"), {"config": cfg, "data": info})
    log(
        f"run directory {out}: {cfg['model']} on {cfg['dataset']} ({info['train_examples']} train "
        f"examples, {s.steps_per_epoch} steps per epoch), {cfg['optimizer']} lr {cfg['lr']:g}"
    )
    result = _fit(cfg, ds, s, out, explicit.get("resume", False), quiet, log)
    precision = _step_options(cfg)["precision"]
    test = trainer.evaluate(s.model, result.state, ds.test, precision=precision)
    n_test = len(ds.test.y)
    ema_test = {}
    if cfg.get("ema") is not None:
        m = trainer.evaluate(s.model, result.state, ds.test, precision=precision, use_ema=True)
        ema_test = {"ema_test_accuracy": m["accuracy"], "ema_test_loss": m["loss"]}
    summary = {
        "test_accuracy": test["accuracy"],
        "test_loss": test["loss"],
        "test_examples": n_test,
        "test_correct": int(round(test["accuracy"] * n_test)),
        **ema_test,
        "dataset": cfg["dataset"],
        "steps": result.steps,
        "epochs_completed": len(result.history),
        "stopped_early": result.stopped_early,
        "best_epoch": result.best_epoch if cfg["early_stopping"] else None,
        "resumed_from_step": result.resumed_from_step,
        "train_time_s": result.train_time_s,
        "wall_time_s": round(time.perf_counter() - t_start, 3),
        "parameters": int(sum(np.size(x) for x in jax.tree.leaves(result.state.params))),
        "jax_version": jax.__version__,
        "backend": jax.default_backend(),
        "config": cfg,
        "data": info,
    }
    trainer.write_json(os.path.join(out, "summary.json"), summary)
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
        report.write(out)
        print(f"report written to {out}")
    return 0 if report.ok else 1


def _split_to_score(name: str, split: str, split_seed: int) -> tuple[data.Split, int]:
    """The split to score and the dataset's class count; ``mnist:DIR``'s test split needs only
    the t10k files."""
    if name.startswith("mnist:") and split == "test":
        try:
            part = data.load_mnist_test(name[len("mnist:") :])
        except (OSError, ValueError) as err:
            raise UsageError(f"--dataset {name}: {err}") from None
        return part, 10
    ds = load_data(name, split_seed)
    return getattr(ds, split), ds.num_classes


def cmd_evaluate(run_dir: str, dataset: str | None, split: str) -> dict:
    """``jaxdl evaluate``: rebuild the run's model, restore its parameters, score a split."""
    cfg, info, model, restored = load_run(run_dir)
    name = dataset or cfg["dataset"]
    part, num_classes = _split_to_score(name, split, cfg["split_seed"])
    shape = list(part.x.shape[1:])
    if shape != info["input_shape"] or num_classes > info["num_classes"]:
        raise UsageError(
            f"--dataset {name}: images {tuple(shape)} with {num_classes} classes, "
            f"but the run's model takes {tuple(info['input_shape'])} with "
            f"{info['num_classes']} classes"
        )
    state = _eval_state(restored["params"], restored["model_state"], shape)
    metrics = trainer.evaluate(model, state, part)
    loss, acc = metrics["loss"], metrics["accuracy"]
    correct = int(round(acc * len(part.y)))
    print(f"{split} accuracy {acc:.4f} ({correct}/{len(part.y)} on {name}), {split} loss {loss:.4f}")
    return {"accuracy": acc, "loss": loss, "examples": len(part.y), "dataset": name}


def main(argv=None) -> int:
    """Entry point of the ``jaxdl`` console script and ``python -m jaxdl``.

    Returns 0 on success (``doctor``: 1 when a check fails). Bad arguments print one line and
    exit with status 2 before anything is written; a failure while running (e.g. no good
    checkpoint to resume) exits with status 1.
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
