"""Configurations of ``jaxdl train``: its options as one dict, their defaults, and the model,
learning-rate schedule, optimizer and `jaxdl.FitConfig` a configuration builds (`setup`; fit's
own checks, their refusals in the command's words).

A configuration is plain JSON data (``config.json`` of a run records it), so a run can be
repeated (``jaxdl train --config``), resumed and examined (``jaxdl doctor``) from it alone.
"""

from __future__ import annotations

import dataclasses
import datetime
import json
import os
import re
from collections.abc import Callable
from typing import Any, NamedTuple

import jax

from jaxdl import data, models, optimizers, schedules, transforms
from jaxdl.train_step import check_labels
from jaxdl.trainer import DATA_AXIS, FitConfig, run_keys  # DATA_AXIS: BatchNorm's axis_name with devices

__all__ = [
    "DEFAULTS",
    "MODEL_DEFAULTS",
    "OPTIMIZER_LR",
    "resolve_defaults",
    "train_config",
    "build_model",
    "build_schedule",
    "build_optimizer",
    "read_run",
    "restore_run",
    "load_run",
]

RUNTIME_OPTIONS = ("out", "resume", "quiet", "config", "no_compile_cache")  # may differ on resumption

OPTIMIZERS = ("sgd", "momentum", "nesterov", "adagrad", "rmsprop", "adam", "adamw", "signsgd")
SCHEDULES = ("constant", "cosine", "linear", "step", "inverse-time", "inverse-sqrt")
MODELS = ("mlp", "cnn", "resnet")

# Training options and their defaults. ``None`` is resolved by `resolve_defaults` (per model, or
# from the data); the resolved values are what config.json records.
DEFAULTS: dict[str, Any] = {
    "dataset": "mnist5k",
    "split_seed": 0,
    "limit_train": None,
    "model": "mlp",
    "depth": None,
    "width": None,
    "channels": None,
    "blocks": 1,
    "activation": "relu",
    "init": "he_normal",
    "batchnorm": False,
    "dropout": None,
    "conv_impl": "auto",
    "optimizer": "adam",
    "lr": None,
    "momentum": 0.9,
    "schedule": "cosine",
    "warmup": 0,
    "lr_final": 0.0,
    "step_every": None,
    "step_factor": 0.1,
    "decay_rate": 1e-3,
    "clip": None,
    "clip_norm": None,
    "noise_eta": 0.0,
    "noise_gamma": 0.55,
    "weight_decay": None,
    "epochs": None,
    "batch_size": 64,
    "augment": 1,
    "early_stopping": None,
    "seed": 0,
    "checkpoint_every": None,
    "keep": 3,
    "block_size": None,
    "devices": None,
    "shard": "replicate",
    "precision": "fp32",
    "accumulate": 1,
    "ema": None,
}
# Per-model defaults, measured on mnist5k (docs/cli.md): MLP >= 95% in < 1 min, CNN >= 98% in < 3 min.
# The resnet has no hidden Dense layers and no dropout: its depth, width and dropout stay null.
MODEL_DEFAULTS = {
    "mlp": {"depth": 2, "width": 512, "dropout": 0.2, "epochs": 15},
    "cnn": {"depth": 1, "width": 128, "dropout": 0.25, "epochs": 12, "channels": [32, 64]},
    "resnet": {"epochs": 10, "channels": [16, 32, 64]},
}
# Default learning rate per optimizer: a starting point that trains the default MLP (docs/cli.md).
OPTIMIZER_LR = {
    "sgd": 0.2,
    "momentum": 0.05,
    "nesterov": 0.05,
    "adagrad": 0.01,
    "rmsprop": 1e-3,
    "adam": 2e-3,
    "adamw": 2e-3,
    "signsgd": 1e-3,
}


def _check_model_options(cfg: dict) -> None:
    """Refuse the options that ``cfg``'s model does not take, instead of ignoring them: the
    resnet has no hidden Dense layers (``depth``, ``width``), no dropout, and BatchNorm always."""
    if cfg["model"] != "resnet":
        return
    given = [f"--{name} {cfg[name]}" for name in ("depth", "width", "dropout") if cfg[name] is not None]
    given += ["--batchnorm"] if cfg["batchnorm"] else []
    if given:
        raise ValueError(
            f"--model resnet does not take {', '.join(given)}: it has no hidden Dense layers and no "
            "dropout, and BatchNorm after every convolution; set its size with --channels and --blocks"
        )


def resolve_defaults(cfg: dict) -> dict:
    """Fill in the defaults that depend on the model or on other options; refuse options the
    model does not take (`_check_model_options`)."""
    _check_model_options(cfg)
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


def build_model(cfg: dict, num_classes: int):
    """The model of ``cfg``: `jaxdl.models.mlp`, `~jaxdl.models.cnn` or `~jaxdl.models.resnet` (see
    ``jaxdl train --help``)."""
    axis_name = DATA_AXIS if cfg.get("devices") else None  # global-batch statistics
    if cfg["model"] == "resnet":
        return models.resnet(
            num_classes,
            channels=cfg["channels"],
            blocks=cfg["blocks"],
            activation=cfg["activation"],
            init=cfg["init"],
            conv_impl=cfg["conv_impl"],
            axis_name=axis_name,
        )
    common = {
        "depth": cfg["depth"],
        "width": cfg["width"],
        "activation": cfg["activation"],
        "init": cfg["init"],
        "batchnorm": cfg["batchnorm"],
        "dropout": cfg["dropout"] or 0.0,
        "axis_name": axis_name,
    }
    if cfg["model"] == "cnn":
        return models.cnn(num_classes, channels=cfg["channels"], conv_impl=cfg["conv_impl"], **common)
    return models.mlp(num_classes, **common)


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
        return optimizers.sgd(
            lr,
            momentum=0.0 if name == "sgd" else cfg["momentum"],
            nesterov=name == "nesterov",
            weight_decay=wd,
        )
    if name == "adamw":
        return optimizers.adamw(lr, weight_decay=wd)
    make = {
        "adagrad": optimizers.adagrad,
        "rmsprop": optimizers.rmsprop,
        "adam": optimizers.adam,
        "signsgd": optimizers.signsgd,
    }[name]
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


# ----------------------------------------------------------------------------- run directories


# Options a config.json written before they existed lacks; such a run used their defaults.
ADDED_LATER = ("precision", "accumulate", "ema", "blocks", "shard")
# The keys of a run's config.json: the options, and the data facts (input shape, classes, ...).
RUN_FILE_KEYS = ("config", "data")

# A function that checks option values read from a file as the command line's are checked:
# ``check(options, source) -> options`` (the parsed values), raising an error whose message
# starts with ``source``. The command passes `jaxdl.cli.check_options` (its argparse types).
Check = Callable[[dict, str], dict]


def _json_object(path: str, what: str) -> dict:
    """The JSON object in ``path``; ValueError naming ``what`` (how the user named the file)
    when it is missing, unreadable, not JSON, or not an object."""
    if not os.path.isfile(path):
        raise ValueError(f"{what}: {'a directory, not a file' if os.path.isdir(path) else 'no such file'}")
    try:
        with open(path) as f:
            value = json.load(f)
    except OSError as err:
        raise ValueError(f"{what}: cannot read it ({err.strerror or err})") from None
    except ValueError as err:  # json.JSONDecodeError, UnicodeDecodeError
        raise ValueError(f"{what}: not JSON ({err})") from None
    if not isinstance(value, dict) or not isinstance(value.get("config"), dict):
        raise ValueError(f"{what}: not a jaxdl run's config.json (expected an object with a 'config' object)")
    unknown = sorted(set(value) - set(RUN_FILE_KEYS))
    if unknown:
        raise ValueError(f"{what}: unknown key {unknown[0]!r}; known keys: {', '.join(RUN_FILE_KEYS)}")
    unknown = sorted(set(value["config"]) - set(DEFAULTS))
    if unknown:
        raise ValueError(
            f"{what}: unknown option {unknown[0]!r} in 'config'; known options: {', '.join(DEFAULTS)}"
        )
    return value


def read_config_file(path: str, check: Check) -> dict:
    """The options of ``--config FILE`` (a run's config.json, or any JSON object whose ``config``
    object holds some of the train options), checked by ``check`` as the same options given on
    the command line would be; an error naming the file, the option and the value."""
    where = f"--config {path}"
    return check(_json_object(path, where)["config"], where)


def read_run(run_dir: str, check: Check) -> tuple[dict, dict]:
    """``(config, data_info)`` of a run directory's config.json, the options checked by ``check``
    and resolved. A missing folder or file, a file that is not JSON, lacks an option (other than
    those `ADDED_LATER`) or a data field is a ValueError naming the file; a bad value, ``check``'s
    error naming it."""
    if not os.path.isdir(run_dir):
        raise ValueError(f"{run_dir}: no such directory")
    path = os.path.join(run_dir, "config.json")
    if not os.path.isfile(path):
        raise ValueError(f"{run_dir}: not a jaxdl run directory (no config.json)")
    saved = _json_object(path, path)
    missing = [k for k in DEFAULTS if k not in saved["config"] and k not in ADDED_LATER]
    if missing:
        raise ValueError(
            f"{path}: no option {missing[0]!r} in 'config' (a run's config.json records every option)"
        )
    info = saved.get("data")
    if not isinstance(info, dict):
        raise ValueError(f"{path}: no 'data' object (the input shape and classes of the run)")
    shape, classes = info.get("input_shape"), info.get("num_classes")
    if not (isinstance(shape, list) and shape and all(type(n) is int and n >= 1 for n in shape)):
        raise ValueError(f"{path}: data.input_shape must be a list of positive ints, got {shape!r}")
    if type(classes) is not int or classes < 2:
        raise ValueError(f"{path}: data.num_classes must be an int >= 2, got {classes!r}")
    cfg = check(saved["config"], path)
    return resolve_defaults({**DEFAULTS, **cfg}), info


def train_config(explicit: dict, check: Check) -> tuple[dict, bool]:
    """The run's configuration and whether it resumes one: `DEFAULTS` updated with ``--config``'s
    options and then the explicit ones, or with ``--resume`` the saved config.json, whose values
    the given options must equal. ``explicit``: the options given on the command line (dashes as
    underscores); ``check`` checks the options read from files (`read_config_file`, `read_run`).
    Every refusal is a ValueError in the command's words."""
    out = explicit.get("out")
    given = {k: v for k, v in explicit.items() if k not in RUNTIME_OPTIONS}
    if explicit.get("config"):
        given = {**read_config_file(explicit["config"], check), **given}
    if explicit.get("resume"):
        if not out:
            raise ValueError("--resume needs --out DIR, the run to continue")
        saved_path = os.path.join(out, "config.json")
        if os.path.isfile(saved_path):
            saved, _ = read_run(out, check)
            differ = [
                f"--{k.replace('_', '-')} {v} (the run has {saved.get(k)})"
                for k, v in given.items()
                if saved.get(k) != v
            ]
            if differ:
                raise ValueError(
                    f"--resume: options differ from {saved_path}: {'; '.join(differ)}; "
                    "drop them or start a new --out"
                )
            return saved, True
    return resolve_defaults({**DEFAULTS, **given}), False


def restore_run(run_dir: str, cfg: dict, info: dict) -> tuple[Any, dict]:
    """``(model, {"params", "model_state"})``: the model of ``cfg`` and the run's final (or best)
    parameters from ``model/``; OSError when the run has not finished or ``model/`` is corrupt."""
    from jaxdl.checkpoint import restore_checkpoint

    model_dir = os.path.join(run_dir, "model")
    if not os.path.isdir(model_dir):
        raise OSError(
            f"{run_dir}: no model/ yet, the run has not finished; resume it with "
            f"jaxdl train --out {run_dir} --resume"
        )
    model = build_model(cfg, info["num_classes"])
    _, params, state = jax.eval_shape(lambda: model.init(jax.random.key(0), tuple(info["input_shape"])))
    try:
        restored = restore_checkpoint(model_dir, {"params": params, "model_state": state})
    except (OSError, ValueError) as err:
        raise OSError(f"cannot restore the model: {err}") from None
    return model, restored


def load_run(run_dir: str, check: Check) -> tuple[dict, dict, Any, dict]:
    """``(config, data_info, model, {"params", "model_state"})`` of a finished run: `read_run`,
    then `restore_run`."""
    cfg, info = read_run(run_dir, check)
    return (cfg, info, *restore_run(run_dir, cfg, info))


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
    """Raise ValueError unless ``path`` can become this run's directory (``--out``); creates nothing."""
    path = os.path.abspath(path)
    if os.path.exists(path):
        if not os.path.isdir(path):
            raise ValueError(f"--out {path}: exists and is not a directory")
        if not os.access(path, os.W_OK | os.X_OK):
            raise ValueError(f"--out {path}: directory is not writable")
        has_run = os.path.isfile(os.path.join(path, "config.json"))
        if has_run and not resume:
            raise ValueError(
                f"--out {path} already holds a run; pass --resume to continue it or choose another directory"
            )
        if not has_run and os.listdir(path):
            raise ValueError(f"--out {path}: directory is not empty and holds no jaxdl run")
        return
    parent = os.path.dirname(path)
    while not os.path.exists(parent):
        parent = os.path.dirname(parent)
    if not os.path.isdir(parent):
        raise ValueError(f"--out {path}: cannot create it, {parent} is not a directory")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise ValueError(f"--out {path}: cannot create it, {parent} is not writable")


# What reading a user's data file raises (`jaxdl.data.READ_ERRORS`). The command reports these
# in one line; anything else is a bug.
DATA_ERRORS = data.READ_ERRORS


def data_error_text(err: BaseException) -> str:
    """The message of a `DATA_ERRORS` error, with its type where the message alone is unclear
    (``EOFError: No data left in file``)."""
    text = str(err) or type(err).__name__
    return text if isinstance(err, (OSError, ValueError)) else f"{type(err).__name__}: {text}"


def load_data(name: str, split_seed: int, limit_train=None) -> data.Dataset:
    """Load and split a dataset, keep the first ``limit_train`` training examples (a random
    subset: the split is shuffled), and check every split's labels on the host."""
    try:
        ds = data.load_dataset(name, seed=split_seed)
    except DATA_ERRORS as err:
        raise ValueError(f"--dataset {name}: {data_error_text(err)}") from None
    if limit_train:
        ds = ds._replace(train=data.Split(ds.train.x[:limit_train], ds.train.y[:limit_train]))
    for split_name, split in zip(("train", "val", "test"), (ds.train, ds.val, ds.test)):
        try:
            check_labels(split.y, ds.num_classes)
        except ValueError as err:
            raise ValueError(f"--dataset {name}: {split_name} split: {err}") from None
    return ds


class Setup(NamedTuple):
    """Everything built from a config before training: ``fit`` is `fit`'s `FitConfig`."""

    model: Any
    optimizer: Any
    schedule: Any
    steps_per_epoch: int
    fit: FitConfig


# The configuration's keys (the command's flags) where `fit` names an option otherwise.
COMMAND_NAMES = {"micro_batches": "accumulate", "out_dir": "out"}


def command_words(message: str) -> str:
    """A `FitConfig` refusal in the command's words: ``FitConfig: batch_size=32 is not divisible
    by micro_batches=3`` -> ``--batch-size 32 is not divisible by --accumulate 3``."""
    names = "|".join(f.name for f in dataclasses.fields(FitConfig))

    def flag(match):
        name = COMMAND_NAMES.get(match[1], match[1])
        return f"--{name.replace('_', '-')} {match[2]}"

    return re.sub(rf"\b({names})=([^\s,;:]+)", flag, message.removeprefix("FitConfig: "))


def fit_config(cfg: dict, out_dir=None, resume=False, progress=True, learning_rate=None) -> FitConfig:
    """The `jaxdl.trainer.FitConfig` of a configuration (fit's checks, once): ``--accumulate``
    is ``micro_batches``, ``--precision fp16`` trains with a dynamic loss scale (`fit_options`),
    ``--augment 0`` is no augmentation; ``checkpoint_every`` only with an ``out_dir``."""
    return FitConfig(
        epochs=cfg["epochs"],
        batch_size=cfg["batch_size"],
        seed=cfg["seed"],
        augment=cfg["augment"] or None,
        early_stopping=cfg["early_stopping"],
        out_dir=out_dir,
        resume=resume,
        checkpoint_every=cfg["checkpoint_every"] if out_dir else None,
        keep=cfg["keep"],
        devices=cfg["devices"],
        shard=cfg.get("shard") or "replicate",
        progress=progress,
        block_size=cfg["block_size"],
        learning_rate=learning_rate,
        **fit_options(cfg),
    )


def setup(cfg: dict, ds: data.Dataset, out_dir=None, resume=False, progress=True) -> Setup:
    """Build fit's configuration (`fit_config`; its refusals, and those of the data it cannot
    take, in the command's words: `command_words`), the model, schedule and optimizer (their
    constructors check the hyperparameters), before anything is written."""
    try:
        fit = fit_config(cfg, out_dir, resume, progress)
        fit.check_data("FitConfig", ds.train.x, ds.train.y, (ds.val.x, ds.val.y))
    except (ValueError, TypeError) as err:
        raise ValueError(command_words(str(err))) from None
    steps = len(ds.train.y) // cfg["batch_size"]
    noise_key = run_keys(cfg["seed"])[2]
    try:
        model = build_model(cfg, ds.num_classes)
        sched = build_schedule(cfg, steps)
        optimizer = build_optimizer(cfg, sched, noise_key)
    except (ValueError, TypeError) as err:
        raise ValueError(str(err)) from None
    return Setup(model, optimizer, sched, steps, fit.replace(learning_rate=sched))


def fit_options(cfg: dict) -> dict:
    """`fit`'s precision, micro_batches, loss_scale and ema of a configuration (``--precision
    fp16`` trains with a dynamic loss scale); a config.json older than these options has none."""
    precision = cfg.get("precision", "fp32")
    return {
        "precision": None if precision == "fp32" else precision,
        "micro_batches": cfg.get("accumulate", 1),
        "loss_scale": "dynamic" if precision == "fp16" else None,
        "ema": cfg.get("ema"),
    }
