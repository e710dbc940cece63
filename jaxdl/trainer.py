"""The training engine: `fit` a model to arrays, `evaluate` it. Scripts, notebooks and the
``jaxdl`` command all train through `fit`.

What one `fit` call does (docs/design.md has the path of one batch):

- The data: ``(x, y)`` arrays, or a random-access source of examples (`jaxdl.sources`: ``len``
  and ``__getitem__``, e.g. a grain ``MapDataset``), read in the same order.

- Each epoch's data order is a function of ``fold_in(data_key, epoch)`` (`jaxdl.data.batch_blocks`;
  the last partial batch is dropped, as ``drop_last=True`` in PyTorch's DataLoader); the epoch's
  ``steps = n // batch_size`` batches run as blocks of stacked batches, each block one call of the
  scan-fused `jaxdl.train_step.make_train_loop` (with ``devices``, the sharded scan loop
  `jaxdl.parallel.make_sharded_train_loop`). NaN/Inf steps are skipped and counted. The block
  cuts depend on the global step alone (`chunk_bounds`), so a resumed run runs exactly the
  blocks the uninterrupted run ran.
- The `TrainState` is donated to the compiled loop (fit owns it), so XLA updates the
  parameters and optimizer state in place; metrics come back to the host once per block.
- After each epoch: validation loss and accuracy in eval mode (running statistics, no dropout),
  one record in ``history``; early stopping (Tips and Tricks notes: "stop training when validation error
  starts to rise") keeps the parameters of the epoch with the lowest validation loss.
- Everything around the loop is a callback (`jaxdl.callbacks`): the progress bar, metrics.jsonl,
  TensorBoard, early stopping (`jaxdl.callbacks.EarlyStopping`), checkpoints, and the user's
  own (``callbacks=[...]``); a hook returning True stops the run. `fit` itself is a short
  sequence of named parts: `FitConfig` (the options, checked once), `_initial_state`,
  `_make_engine`, `_Engine.run` (the loop).
- With ``out_dir``: ``metrics.jsonl`` (one record per epoch), ``curves.png``, ``checkpoints/``
  (`jaxdl.checkpoint.CheckpointManager`, sha256 manifests: every ``checkpoint_every`` steps and at
  each epoch end, the last ``keep``), ``model/`` (the final or best ``{"params",
  "model_state"}``), ``summary.json`` and ``fit_config.json`` (what a resumption must match); a
  TensorBoard event file beside metrics.jsonl when ``tensorboardX`` is installed. A checkpoint
  holds the state and the host-side bookkeeping (the epoch's running metric sums, the
  early-stopping record), so ``resume=True`` after a kill, at any point, ends in bitwise the same
  state and history as the uninterrupted run.
- SIGTERM or SIGINT finishes the block in flight, saves a checkpoint and raises
  `jaxdl.Preempted` (exit status 143 or 130; `jaxdl.preemption`).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import re
import signal
import sys
import time
import warnings
from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from jaxdl import compile_cache as _compile_cache
from jaxdl import data, sources
from jaxdl._checks import (
    check_int,
    check_labels,
    check_numeric,
    check_positive_int,
    check_transform,
    check_tree_match,
)
from jaxdl.callbacks import (
    CallbackList,
    Checkpointing,
    EarlyStopping,
    Loop,
    MetricsFile,
    ProgressBar,
    TensorBoard,
    check_callbacks,
)
from jaxdl.callbacks import tensorboard_writer as _tensorboard_writer  # noqa: F401  (its old name)
from jaxdl.losses import IGNORE_INDEX
from jaxdl.nnx import as_layer
from jaxdl.precision import get_policy
from jaxdl.preemption import Preempted, catch_signals
from jaxdl.train_step import (
    StepOptions,
    SupervisedLoss,
    TrainState,
    make_eval_step,
    make_train_loop,
    resolve_options,
    supervised_loss,
)
from jaxdl.transforms import schedule_free_eval_params, schedule_free_restart

__all__ = [
    "fit",
    "evaluate",
    "FitConfig",
    "FitResult",
    "write_summary",
    "AugmentedLoss",
    "augmented_loss",
    "run_keys",
    "chunk_bounds",
    "default_block_size",
    "read_metrics",
    "write_json",
    "plot_curves",
]

DATA_AXIS = "batch"  # the mesh axis of devices=N; BatchNorm needs axis_name equal to it
EVAL_BATCH = 500  # examples per evaluation call


class FitResult(NamedTuple):
    """What `fit` returns.

    ``state``: the final `TrainState` (with early stopping, its params and model state are those
    of the epoch with the lowest validation loss); ``history``: one dict per epoch (see `fit`);
    ``best_epoch``: the epoch (from 1) with the lowest validation loss, None without validation;
    ``steps``: optimizer steps taken; ``stopped_early``; ``resumed_from_step``: the checkpoint
    step a resumed run started from (None otherwise); ``train_time_s``: seconds spent in the
    compiled loop over all sessions of the run.
    """

    state: TrainState
    history: list
    best_epoch: int | None
    steps: int = 0
    stopped_early: bool = False
    resumed_from_step: int | None = None
    train_time_s: float = 0.0


# ----------------------------------------------------------------------------- building blocks


def run_keys(seed: int) -> tuple[jax.Array, jax.Array, jax.Array]:
    """``(model_key, data_key, extra_key)`` of a run: ``split(key(seed), 3)``.

    `fit` initializes the model (and seeds dropout, augmentation) from ``model_key`` and orders
    the data with ``data_key``; ``extra_key`` is free for the caller (the CLI seeds
    `jaxdl.transforms.add_noise` with it).

    Args:
      seed: an int >= 0.

    Returns:
      ``(model_key, data_key, extra_key)``.
    """
    model_key, data_key, extra_key = jax.random.split(jax.random.key(seed), 3)
    return model_key, data_key, extra_key


class AugmentedLoss(NamedTuple):
    """A loss whose training batches are augmented inside the compiled step.

    ``augment(key, x) -> x`` draws from the step's key (`jaxdl.train_step.step_key`), so
    augmentation is reproducible from the `TrainState` (bitwise resume) and costs no host work.
    `fit` builds it from ``augment=SHIFT`` (`jaxdl.data.random_shift`, translation augmentation)
    or from a callable.
    """

    inner: Any
    augment: Callable

    @property
    def model(self):
        """The wrapped loss's model (the train step checks states against it)."""
        return self.inner.model

    def __call__(self, params, model_state, batch, key=None, train=True):
        """The inner loss on ``batch``, its inputs augmented in training."""
        x, y = batch
        if train and key is not None:
            aug_key, key = jax.random.split(key)
            x = self.augment(aug_key, x)
        return self.inner(params, model_state, (x, y), key, train=train)


class _Shift(NamedTuple):
    max_shift: int

    def __call__(self, key, x):
        return data.random_shift(key, x, self.max_shift)


def augmented_loss(loss_fn, augment):
    """``loss_fn`` with its training inputs augmented (an `AugmentedLoss`), or ``loss_fn`` itself
    when ``augment`` is None or 0. ``augment``: an int ``s``, a random translation of every image
    by up to ``s`` pixels with zero fill (`jaxdl.data.random_shift`), or ``augment(key, x) -> x``.

    Args:
      loss_fn: the train step's loss.
      augment: None, an int shift or ``augment(key, x) -> x``.

    Returns:
      An `AugmentedLoss` or ``loss_fn``.

    Source: Tips and Tricks notes (data augmentation).
    """
    if isinstance(augment, bool) or not (
        augment is None or callable(augment) or isinstance(augment, (int, np.integer))
    ):
        raise TypeError(f"augment must be None, a max shift in pixels or augment(key, x), got {augment!r}")
    if not augment:
        return loss_fn
    if not callable(augment) and augment < 0:
        raise ValueError(f"augment={augment!r} is out of range; expected a shift >= 0 pixels")
    return AugmentedLoss(loss_fn, augment if callable(augment) else _Shift(int(augment)))


def default_block_size(steps_per_epoch: int, target: int = 16) -> int:
    """A divisor of ``steps_per_epoch`` near ``target``, so that every block of an epoch has the
    same length and the loop compiles once; ``target`` when none lies in [target/2, 2*target].

    Args:
      steps_per_epoch: the epoch's optimizer steps.
      target: the preferred block length.

    Returns:
      The block size, an int.

    >>> default_block_size(100), default_block_size(7)
    (20, 7)
    """
    near = [d for d in range(target // 2, 2 * target + 1) if steps_per_epoch % d == 0]
    return min(near, key=lambda d: (abs(d - target), d)) if near else min(target, steps_per_epoch)


def chunk_bounds(
    epoch: int, steps_per_epoch: int, block_size: int, checkpoint_every: int, start: int = 0
) -> list[tuple[int, int]]:
    """The ``[a, b)`` step ranges (positions within the epoch) that one scan call each runs.

    The epoch is cut into segments at every global step that is a multiple of
    ``checkpoint_every`` (where a checkpoint may be saved); each segment runs as blocks of
    ``block_size`` steps, then single steps for what is left. So the loop compiles for two
    lengths at most (one when ``block_size`` divides the segments), and the cuts depend on the
    global step alone: a run resumed from a checkpoint runs exactly the blocks that the
    uninterrupted run ran from there on.

    Args:
      epoch: the epoch (from 0).
      steps_per_epoch: its optimizer steps.
      block_size: steps per scan call.
      checkpoint_every: the checkpoint interval in global steps.
      start: the first position to run (a resumed epoch's).

    Returns:
      A list of ``(a, b)`` pairs.

    >>> chunk_bounds(0, steps_per_epoch=10, block_size=4, checkpoint_every=100)
    [(0, 4), (4, 8), (8, 9), (9, 10)]
    """
    first = epoch * steps_per_epoch
    anchors = sorted(
        {0, steps_per_epoch} | {p for p in range(steps_per_epoch) if (first + p) % checkpoint_every == 0}
    )
    bounds = []
    for a, b in zip(anchors[:-1], anchors[1:]):
        while a < b:
            size = block_size if a + block_size <= b else 1
            bounds.append((a, a + size))
            a += size
    return [(a, b) for a, b in bounds if a >= start]


def _arrays(name: str, split, owner: str = "fit") -> tuple[np.ndarray, np.ndarray]:
    """``(x, y)`` of a `jaxdl.data.Split` or a pair of arrays, as host numpy arrays of numbers;
    of a random-access source (for ``owner`` fit), its lazy `jaxdl.sources.ExampleView`s."""
    if owner == "fit" and sources.is_source(split):
        examples = sources.Examples(split, name, owner)
        return examples.x, examples.y
    if isinstance(split, data.Split):
        x, y = split.x, split.y
    elif isinstance(split, (tuple, list)) and len(split) == 2:
        x, y = split
    else:
        shown = (
            f"a {type(split).__name__} of {len(split)} items" if isinstance(split, (tuple, list)) else None
        )
        source = ", a random-access source of (x, y) examples" if owner == "fit" else ""
        raise TypeError(
            f"{owner}: {name} must be (x, y) arrays{source} or a jaxdl.data.Split, got "
            f"{shown or type(split).__name__}"
        )
    check_numeric(owner, f"{name} x", x)
    check_numeric(owner, f"{name} y", y)
    x, y = np.asarray(x), np.asarray(y)
    if x.ndim == 0 or y.ndim == 0:
        raise ValueError(f"{name}: x and y need a leading example axis, got shapes {x.shape} and {y.shape}")
    if len(x) != len(y):
        raise ValueError(f"{name}: x and y must hold as many examples, got {len(x)} and {len(y)}")
    if len(x) == 0:
        raise ValueError(f"{name}: no examples")
    return x, y


def _check_split(owner: str, name: str, model, eval_step, state: TrainState, x, y) -> None:
    """Refuse data the model and its loss cannot take, before anything runs or is written.

    The eval step is traced (`jax.eval_shape`: nothing compiles or runs) on the first batch, so
    the loss's and the model's own checks speak now, e.g. float labels given to
    `softmax_cross_entropy`; then integer labels of a classifier (outputs (C,), labels (N,))
    or of a sequence model (outputs (T, C), targets (N, T)) are checked on the host to lie in
    ``[0, C)`` or be the ignored target `IGNORE_INDEX` (`check_labels`).
    """
    head = (x[:EVAL_BATCH], y[:EVAL_BATCH])  # a source's examples are read (and checked) here
    try:
        jax.eval_shape(eval_step, _eval_state(state), head)
        out = jax.eval_shape(
            lambda p, s, xb: model.apply(p, s, xb)[0],
            state.params,
            state.model_state,
            jax.ShapeDtypeStruct((1, *x.shape[1:]), x.dtype),
        )
    except (TypeError, ValueError) as err:
        if type(err) not in (TypeError, ValueError):
            raise
        raise type(err)(f"{owner}: {name}: {err}") from None
    if np.issubdtype(y.dtype, np.integer) and len(out.shape) >= 2 and y.shape[1:] == out.shape[1:-1]:
        if isinstance(y, sources.ExampleView):  # a source's labels are checked as they are read
            y.examples.num_classes = out.shape[-1]
        else:
            check_labels(y, out.shape[-1], owner, f"{name} labels", ignore_index=IGNORE_INDEX)


def _eval_state(state: TrainState) -> TrainState:
    """``state`` as the eval step takes it: no optimizer state, and the params a schedule-free
    optimizer is evaluated at (`jaxdl.transforms.schedule_free_eval_params`; others unchanged)."""
    return state.replace(params=schedule_free_eval_params(state.opt_state, state.params), opt_state=())


_EVAL_STEPS: dict = {}  # loss -> compiled eval step; the last few, so evaluate() compiles once


class _ByIdentity:
    """A cache key that compares by identity and holds its object (so its id is not reused)."""

    __slots__ = ("obj",)

    def __init__(self, obj):
        self.obj = obj

    def __eq__(self, other):
        return isinstance(other, _ByIdentity) and other.obj is self.obj

    def __hash__(self):
        return id(self.obj)


def _loss_key(loss_fn):
    """``loss_fn`` itself for jaxdl's own losses (`supervised_loss`, `AugmentedLoss`: equal
    losses share one compiled step; their models hash by value, a `from_flax` model by the
    identity of its module), else the loss by identity: a user's object is never hashed."""
    if isinstance(loss_fn, (SupervisedLoss, AugmentedLoss)):
        try:
            hash(loss_fn)
            return loss_fn
        except TypeError:  # e.g. a layer of the protocol holding a list
            pass
    return _ByIdentity(loss_fn)


def _eval_step(loss_fn, use_ema=False, precision=None):
    """The compiled eval step of ``loss_fn``, cached: an `evaluate` each epoch compiles once.

    Keyed by `_loss_key` and the options; the last 8 are kept."""
    cache_key = (_loss_key(loss_fn), use_ema, precision)
    step = _EVAL_STEPS.pop(cache_key, None) or make_eval_step(loss_fn, use_ema=use_ema, precision=precision)
    _EVAL_STEPS[cache_key] = step
    while len(_EVAL_STEPS) > 8:
        _EVAL_STEPS.pop(next(iter(_EVAL_STEPS)))
    return step


def _weight(y) -> int:
    """How much a batch of targets ``y`` weighs in a mean over batches: its examples, or for
    integer targets those not equal to `IGNORE_INDEX` (each token of a sequence counts once)."""
    if np.issubdtype(y.dtype, np.integer):
        return int(np.count_nonzero(y != IGNORE_INDEX))
    return len(y)


def _evaluate_arrays(eval_step, state: TrainState, x, y, batch_size: int) -> dict:
    """Weighted means of the eval metrics over all of ``(x, y)`` in batches of ``batch_size``,
    each batch weighted by `_weight` (the mean over every counted target of the data)."""
    totals: dict = {}
    weight = 0
    for start in range(0, len(y), batch_size):
        xb, yb = x[start : start + batch_size], y[start : start + batch_size]
        metrics = jax.device_get(eval_step(state, (xb, yb)))
        w = _weight(yb)
        weight += w
        for name, value in metrics.items():
            totals[name] = totals.get(name, 0.0) + w * float(value)
    return {name: total / max(weight, 1) for name, total in totals.items()}


def evaluate(
    model,
    state: TrainState,
    data_,
    *,
    batch_size: int = EVAL_BATCH,
    loss_fn=None,
    use_ema: bool = False,
    precision=None,
) -> dict:
    """Loss and accuracy of ``state``'s parameters on ``data_`` in eval mode.

    Eval mode: BatchNorm uses its running statistics, Dropout is off ("at test time BatchNorm
    ... uses the fixed empirical mean and variance from training"). ``data_``: ``(x,
    y)`` arrays or a `jaxdl.data.Split`, scored in batches of ``batch_size``; the result is the
    mean over examples, each batch weighted by its size, so a last partial batch counts exactly
    as much as its examples; for integer targets each batch weighs as many as its targets not
    equal to `jaxdl.losses.IGNORE_INDEX` (-100), so token targets (N, T) with padding give the
    mean over every non-padding token. Returns ``{"loss": ..., "accuracy": ...}`` (and any other
    metric the loss reports; ``loss_fn`` default ``supervised_loss(model)``: softmax
    cross-entropy; the ``loss_fn`` contract is `fit`'s).
    ``use_ema=True`` scores ``state.ema_params`` (the moving average of `fit`'s ``ema=``);
    ``precision`` runs the model under that policy (as `fit` trained it). Data the model or loss
    cannot take (strings, float labels for softmax cross-entropy, class labels outside [0, C)
    for a model of C outputs) is refused by name before anything runs, as in `fit`.

    Args:
      model: the model that ``state`` holds the parameters of.
      state: a `TrainState` (e.g. ``fit(...).state``).
      data_: ``(x, y)`` arrays or a `jaxdl.data.Split`.
      batch_size: examples per compiled evaluation call.
      loss_fn, use_ema, precision: as in `fit`.

    Returns:
      A dict of float metrics: ``loss``, ``accuracy`` and any other metric of the loss.

    Source: CSE 176 Lecture 11 (BatchNorm at test time).

    >>> import jax, numpy as np
    >>> import jaxdl as dl
    >>> model = dl.layers.Dense(2)
    >>> state = dl.TrainState.create(model, dl.sgd(0.1), jax.random.key(0), (3,))
    >>> x, y = np.ones((10, 3), np.float32), np.zeros(10, np.int32)
    >>> sorted(evaluate(model, state, (x, y)))
    ['accuracy', 'loss']
    """
    model = as_layer("evaluate", model)
    x, y = _arrays("data", data_, "evaluate")
    check_positive_int("evaluate", "batch_size", batch_size)
    if not isinstance(state, TrainState):
        raise TypeError(f"evaluate: state must be a TrainState, got {type(state).__name__}")
    loss_fn = loss_fn if loss_fn is not None else supervised_loss(model)
    policy = get_policy(precision, "evaluate")
    eval_step = _eval_step(loss_fn, use_ema, policy)
    _check_split("evaluate", "data", model, eval_step, state, x, y)
    return _evaluate_arrays(eval_step, _eval_state(state), x, y, batch_size)


# ----------------------------------------------------------------------------- outputs


def write_json(path: str, obj) -> None:
    """Write JSON atomically (temp file, rename).

    Args:
      path: the file.
      obj: a JSON-serializable object.
    """
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(obj, f, indent=1)
        f.write("\n")
    os.replace(tmp, path)


def read_metrics(path: str) -> list[dict]:
    """The epoch records of a ``metrics.jsonl`` (none if it does not exist). A last line cut
    short by a kill is dropped; the resumed run writes that epoch again.

    Args:
      path: the ``metrics.jsonl`` file.

    Returns:
      A list of dicts, one per epoch.
    """
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
                raise ValueError(f"{path}: line {i + 1} is not JSON") from None
    return records


def plot_curves(records: list[dict], path: str) -> None:
    """Loss and accuracy per epoch, train vs validation, as a PNG (matplotlib, Agg backend).

    Args:
      records: `fit`'s history (or `read_metrics`' records).
      path: the PNG file to write.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    epochs = [r["epoch"] for r in records]
    whats = [w for w in ("loss", "accuracy") if records and f"train_{w}" in records[0]]
    fig, axes = plt.subplots(1, max(len(whats), 1), figsize=(5 * max(len(whats), 1), 4), squeeze=False)
    for ax, what in zip(axes[0], whats):
        for split, label in (("train", "train"), ("val", "validation")):
            if f"{split}_{what}" in records[0]:
                ax.plot(epochs, [r[f"{split}_{what}"] for r in records], "o-", label=label)
        ax.set_xlabel("epoch")
        ax.set_ylabel(what)
        ax.grid(alpha=0.3)
        ax.legend()
    if whats and whats[0] == "loss":
        axes[0][0].set_yscale("log")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


# ----------------------------------------------------------------------------- the run's bookkeeping


class Progress(NamedTuple):
    """Host-side bookkeeping saved in every checkpoint next to the `TrainState`.

    ``sums``: the current epoch's sums of the per-step metrics over its steps so far (a dict);
    ``best_val_loss``/``best_epoch``: the lowest validation loss so far and its epoch (0: none);
    ``train_time``: seconds spent in the compiled loop over all sessions of the run;
    ``stopped``: whether a callback has stopped the run (a resumed run that had stopped stays so).
    """

    sums: dict
    best_val_loss: np.ndarray
    best_epoch: np.ndarray
    train_time: np.ndarray
    stopped: np.ndarray

    @classmethod
    def fresh(cls, metric_names=()) -> "Progress":
        """The bookkeeping of a run that has not started."""
        sums = {name: np.zeros((), np.float64) for name in metric_names}
        return cls(sums, np.array(np.inf), np.array(0, np.int64), np.array(0.0), np.array(0, np.int64))


class Run(NamedTuple):
    """What a checkpoint holds: the `TrainState`, the `Progress`, with early stopping the best
    epoch's ``{"params", "model_state"}`` (else None), and the states of the callbacks that have
    one (`jaxdl.callbacks.CallbackList.states`)."""

    state: TrainState
    progress: Progress
    best: Any
    callbacks: dict

    def tree(self) -> dict:
        """The pytree saved in a checkpoint."""
        tree = {"state": self.state, "progress": self.progress._asdict()}
        tree = tree if self.best is None else {**tree, "best": self.best}
        return {**tree, "callbacks": self.callbacks} if self.callbacks else tree

    @classmethod
    def from_tree(cls, tree: dict) -> "Run":
        """The inverse of `tree`."""
        p = tree["progress"]
        progress = Progress(
            {k: np.asarray(v) for k, v in p["sums"].items()},
            *(np.asarray(p[k]) for k in ("best_val_loss", "best_epoch", "train_time", "stopped")),
        )
        return cls(tree["state"], progress, tree.get("best"), tree.get("callbacks", {}))


def _restore_latest(manager, run: Run, log) -> tuple[Run, Any]:
    """The newest good checkpoint as a `Run` (structure of ``run``) and its step, falling back past
    corrupt ones (each reported through ``log``); ``(run, None)`` when there is none."""
    if manager.latest_step() is None:
        return run, None
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            tree = manager.restore(run.tree())  # CorruptCheckpointError (a ValueError) when none is good
        except ValueError as err:
            if "['progress']['stopped']" not in str(err) or run.callbacks.keys() - {"EarlyStopping_0"}:
                raise
            tree = _restore_before_callbacks(manager, run)
    for w in caught:
        log(f"warning: {w.message}")
    return Run.from_tree(tree), manager.restored_step


def _restore_before_callbacks(manager, run: Run) -> dict:
    """A checkpoint written before fit had callbacks (no stop flag, no callbacks' states),
    restored; its ``callbacks`` are None (`_Engine._start` rebuilds them)."""
    tree = run.tree()
    del tree["progress"]["stopped"]
    tree.pop("callbacks", None)
    tree = manager.restore(tree)
    return {**tree, "progress": {**tree["progress"], "stopped": np.array(0, np.int64)}, "callbacks": None}


def _host_copy(tree):
    """A host (numpy) copy: what survives the donation of the device buffers it came from."""
    return jax.tree.map(np.asarray, jax.device_get(tree))


_RATE_METRICS = ("grad_norm", "update_ratio", "loss_scale")  # reported under their own name, not train_*


def _epoch_record(epoch, step, sums, steps, val, lr, seconds, examples, ema_val=None) -> dict:
    """One line of metrics.jsonl / one entry of ``history``."""
    record = {"epoch": epoch, "step": step}
    means = {name: float(total) / steps for name, total in sums.items()}
    for name in sorted(means, key=lambda n: (n != "loss", n)):  # loss first, then the loss's metrics
        if name not in _RATE_METRICS and name != "nonfinite":
            record[f"train_{name}"] = means[name]
    record.update(
        {f"val_{name}": (val or {})[name] for name in sorted(val or {}, key=lambda n: (n != "loss", n))}
    )
    record.update(
        {f"ema_val_{name}": ema_val[name] for name in sorted(ema_val or {}, key=lambda n: (n != "loss", n))}
    )
    if lr is not None:
        record["lr"] = lr
    record.update({name: means[name] for name in _RATE_METRICS if name in means})
    if "nonfinite" in means:
        record["nonfinite_steps"] = int(round(means["nonfinite"] * steps))
    record["seconds"] = round(seconds, 3)
    record["examples_per_s"] = round(examples / max(seconds, 1e-9), 1)
    return record


def _learning_rate(learning_rate, opt_state, step: int):
    """The learning rate of step ``step`` for the history: ``learning_rate`` (a number or a
    schedule) when given, else an `optax.inject_hyperparams` state's ``learning_rate``, else None."""
    if learning_rate is not None:
        return float(learning_rate(step) if callable(learning_rate) else learning_rate)

    def injected(s):  # optax's InjectHyperparamsState / InjectStatefulHyperparamsState
        return isinstance(getattr(s, "hyperparams", None), dict) and "learning_rate" in s.hyperparams

    for s in jax.tree.leaves(opt_state, is_leaf=injected):
        if injected(s):
            return float(np.asarray(s.hyperparams["learning_rate"]).reshape(-1)[0])
    return None


# ----------------------------------------------------------------------------- checks


def _describe(obj) -> str:
    """A repr without memory addresses (stable across processes), for fit_config.json."""
    return re.sub(r" at 0x[0-9a-fA-F]+", "", repr(obj))


def _digest(*arrays) -> str:
    if isinstance(arrays[0], sources.ExampleView):
        return arrays[0].examples.fingerprint()
    h = hashlib.sha256()
    for a in arrays:
        h.update(str((a.shape, a.dtype.str)).encode())
        h.update(np.ascontiguousarray(a).tobytes())
    return h.hexdigest()


def _check_out_dir(out_dir: str, resume: bool) -> None:
    """Refuse an out_dir that is a file or that holds another run (without ``resume``)."""
    if os.path.exists(out_dir) and not os.path.isdir(out_dir):
        raise ValueError(f"fit: out_dir={out_dir!r} exists and is not a directory")
    has_run = os.path.isfile(os.path.join(out_dir, "fit_config.json"))
    if has_run and not resume:
        raise ValueError(
            f"fit: out_dir={out_dir!r} already holds a run (fit_config.json); pass "
            "resume=True to continue it or choose another directory"
        )


# Where the state lives and what is recomputed: a resumed run may change them (same numbers).
_LAYOUT_KEYS = ("devices", "shard", "remat")


def _check_same_config(out_dir: str, config: dict) -> None:
    path = os.path.join(out_dir, "fit_config.json")
    with open(path) as f:
        saved = json.load(f)
    differ = [
        f"{k}: {config.get(k)!r} (the run has {saved.get(k)!r})"
        for k in sorted(set(saved) | set(config))
        if saved.get(k) != config.get(k) and k not in _LAYOUT_KEYS
    ]
    if differ:
        raise ValueError(
            f"fit: resume=True, but the configuration differs from {path}: "
            + "; ".join(differ)
            + ". Start a new out_dir or pass what the run used."
        )


def _make_loop(loss_fn, optimizer, devices, options: StepOptions, shard: str = "replicate"):
    """``(loop, place_state, block_sharding)``: the scan loop over a block of stacked batches
    with ``options`` (fit's: NaN/Inf steps skipped, the state donated), how to place a (fresh or
    restored) state, and where a block goes (None: default device). With ``devices`` the loop is
    the sharded scan loop over a `data_mesh` of them, the state laid out as ``shard`` says
    (``"replicate"`` or ``"fsdp"``)."""
    if not devices:
        return make_train_loop(loss_fn, optimizer, options=options), (lambda s: s), None
    from jaxdl import parallel

    mesh = parallel.data_mesh(devices, axis_name=DATA_AXIS)
    loop = parallel.make_sharded_train_loop(loss_fn, optimizer, mesh, options=options, shard=shard)
    block_sharding = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec(None, DATA_AXIS))
    return loop, (lambda s: parallel.put_state(s, mesh, shard=shard)), block_sharding


# ----------------------------------------------------------------------------- the configuration


def _count(low: int = 1, **kwargs):
    """A `FitConfig` field holding an integer ``>= low`` (None where its default is None): the
    bound `_check_config` checks, and the ``jaxdl train`` option of the field parses by."""
    return dataclasses.field(metadata={"low": low}, **kwargs)


@dataclasses.dataclass(frozen=True, kw_only=True)
class FitConfig:
    """The options of one `fit` run, checked once, frozen (``fit(..., config=FitConfig(...))``;
    `fit`'s keywords of the same names build it, and so does the ``jaxdl train`` command).

    Fields (each as `fit`'s keyword of that name): ``epochs``, ``batch_size``, ``seed``,
    ``augment``, ``early_stopping``, ``out_dir``, ``resume``, ``checkpoint_every``, ``keep``,
    ``devices``, ``shard``, ``progress``, ``block_size``, ``learning_rate``, the step options
    ``precision``, ``micro_batches``, ``loss_scale``, ``ema``, ``remat`` (`options` bundles
    them, with fit's NaN/Inf skip and donation, as a `jaxdl.StepOptions`) and ``compile_cache``.

    A bad value is refused at construction with a ValueError or TypeError naming the field and
    the value (``FitConfig: batch_size=0 is out of range; expected an integer >= 1``), as is a
    combination that cannot run: ``resume``/``checkpoint_every`` without ``out_dir``, more
    ``devices`` than exist, a ``batch_size`` that ``devices * micro_batches`` does not divide,
    ``shard="fsdp"`` without ``devices``.
    What depends on the data is `check_data`'s. Minibatch SGD's settings, as in Sarkar, CS60010
    Deep Learning (IIT Kharagpur), 2018, lecture "Training".

    >>> FitConfig(epochs=2, batch_size=32, micro_batches=2).options.micro_batches
    2
    """

    epochs: int = _count()
    batch_size: int = _count()
    seed: int = _count(low=0, default=0)
    augment: Any = None
    early_stopping: int | None = _count(default=None)
    out_dir: str | None = None
    resume: bool = False
    checkpoint_every: int | None = _count(default=None)
    keep: int = _count(default=3)
    devices: int | None = _count(default=None)
    shard: str = "replicate"
    progress: bool = True
    block_size: int | None = _count(default=None)
    learning_rate: Any = None
    precision: Any = None
    micro_batches: int = _count(default=1)
    loss_scale: Any = None
    ema: Any = None
    remat: bool = False
    compile_cache: bool | str = True

    def __post_init__(self):
        _check_config("FitConfig", {f.name: getattr(self, f.name) for f in dataclasses.fields(self)})

    @property
    def options(self) -> StepOptions:
        """The train loop's `StepOptions`: NaN/Inf steps skipped, the state donated (fit owns it),
        and the precision, micro-batches, loss scale, EMA and remat of this configuration."""
        return StepOptions(
            donate=True,
            precision=self.precision,
            micro_batches=self.micro_batches,
            loss_scale=self.loss_scale,
            ema=self.ema,
            remat=self.remat,
        )

    def replace(self, **changes) -> "FitConfig":
        """A copy with ``changes``, checked as a new `FitConfig`."""
        return dataclasses.replace(self, **changes)

    def check_data(self, owner: str, x: np.ndarray, y: np.ndarray, val) -> None:
        """Refuse what this configuration cannot do with training data ``(x, y)`` and validation
        data ``val`` (None or a pair): a ``batch_size`` over the examples, ``early_stopping``
        without validation, validation examples of another shape, ``augment`` (a shift) on
        inputs that are not images (N, H, W, C)."""
        if self.batch_size > len(y):
            raise ValueError(f"{owner}: batch_size={self.batch_size} exceeds the {len(y)} training examples")
        if self.early_stopping and val is None:
            raise ValueError(f"{owner}: early_stopping={self.early_stopping} needs validation data")
        if val is not None and (val[0].shape[1:] != x.shape[1:] or val[1].shape[1:] != y.shape[1:]):
            raise ValueError(
                f"{owner}: validation examples have shape x {val[0].shape[1:]}, y {val[1].shape[1:]}, "
                f"but training examples x {x.shape[1:]}, y {y.shape[1:]}"
            )
        if isinstance(self.augment, (int, np.integer)) and self.augment and x.ndim != 4:
            raise ValueError(
                f"{owner}: augment={self.augment} shifts images (N, H, W, C), but x has shape {x.shape}"
            )


def _check_config(owner: str, c: dict) -> None:
    """The checks of `FitConfig`, with errors naming ``owner`` (``fit`` or ``FitConfig``)."""
    for field in dataclasses.fields(FitConfig):
        if "low" in field.metadata:
            check_int(
                owner, field.name, c[field.name], low=field.metadata["low"], allow_none=field.default is None
            )
    devices, batch_size = c["devices"], c["batch_size"]
    if c["shard"] not in ("replicate", "fsdp"):
        raise ValueError(f"{owner}: shard={c['shard']!r}; expected 'replicate' or 'fsdp'")
    if c["shard"] == "fsdp" and not devices:
        raise ValueError(f"{owner}: shard='fsdp' splits the state over devices; pass devices=N as well")
    if devices:
        if devices > jax.device_count():  # every process's devices in a multi-process run
            raise ValueError(
                f"{owner}: devices={devices}: only {jax.device_count()} "
                f"{'local ' if jax.process_count() == 1 else ''}devices "
                f"exist ({jax.default_backend()}); on a CPU set XLA_FLAGS="
                f"--xla_force_host_platform_device_count={devices} before jax is imported"
            )
        if batch_size % devices:
            raise ValueError(f"{owner}: batch_size={batch_size} is not divisible by devices={devices}")
    if (c["resume"] or c["checkpoint_every"]) and c["out_dir"] is None:
        raise ValueError(f"{owner}: resume and checkpoint_every need out_dir")
    options = resolve_options(
        owner,
        donate=True,
        precision=c["precision"],
        micro_batches=c["micro_batches"],
        loss_scale=c["loss_scale"],
        ema=c["ema"],
        remat=c["remat"],
    )
    if batch_size % ((devices or 1) * options.micro_batches):
        raise ValueError(
            f"{owner}: batch_size={batch_size} is not divisible by micro_batches={options.micro_batches}"
            + (f" times devices={devices}" if devices else "")
        )
    try:
        augmented_loss(None, c["augment"])
    except (TypeError, ValueError) as err:
        raise type(err)(f"{owner}: {err}") from None


def _fit_config(config: FitConfig | None, keywords: dict) -> FitConfig:
    """``config``, or the `FitConfig` of `fit`'s keywords (checked with errors naming fit); with
    ``config`` the keywords must be at their defaults (one way per call)."""
    defaults = {f.name: f.default for f in dataclasses.fields(FitConfig)} | {
        "epochs": None,
        "batch_size": None,
    }
    if config is None:
        for name in ("epochs", "batch_size"):
            if keywords[name] is None:
                raise TypeError(f"fit() missing required keyword-only argument: '{name}' (or pass config=)")
        _check_config("fit", keywords)
        return FitConfig(**keywords)
    if not isinstance(config, FitConfig):
        raise TypeError(f"fit: config must be a jaxdl.FitConfig or None, got {type(config).__name__}")
    given = [n for n, v in keywords.items() if v is not defaults.get(n)]
    if given:
        raise TypeError(
            f"fit: pass the options either as config= or as keywords, not both "
            f"(got config= and {', '.join(f'{n}={keywords[n]!r}' for n in given)})"
        )
    return config


# ----------------------------------------------------------------------------- fit: state and record


def _initial_state(model, optimizer, x, config: FitConfig, initial_params) -> tuple[TrainState, jax.Array]:
    """The run's first `TrainState` (from ``initial_params`` when given) and its data key."""
    model_key, data_key, _ = run_keys(config.seed)
    state = TrainState.create(model, optimizer, model_key, x.shape[1:], options=config.options)
    if initial_params is not None:
        check_tree_match(
            "fit",
            state.params,
            initial_params,
            "initial_params",
            "Pass parameters of the tree that model.init returns for these inputs.",
        )
        params = jax.tree.map(
            lambda new, old: jnp.array(new, dtype=old.dtype, copy=True), initial_params, state.params
        )
        state = state.replace(params=params, opt_state=optimizer.init(params))
        if getattr(state, "ema_params", None) is not None:  # the average starts at the start
            state = state.replace(ema_params=jax.tree.map(jnp.copy, params))
    return state, data_key


def _fit_record(engine: "_Engine", model, optimizer, state, initial_params, stateful: list) -> dict:
    """What ``fit_config.json`` records: what a resumed run must match (model, loss, optimizer
    state's shapes, digests of the data, the options, the callbacks that keep a state)."""
    config, options = engine.config, engine.config.options
    record = {
        "model": _describe(model),
        "loss_fn": _describe(engine.loss_fn),
        "optimizer_state": _describe(
            jax.tree.map(lambda a: (a.shape, a.dtype.name), jax.eval_shape(optimizer.init, state.params))
        ),
        "train": _digest(engine.x, engine.y),
        "validation": None if engine.val is None else _digest(*engine.val),
        "initial_params": None
        if initial_params is None
        else _digest(*map(np.asarray, jax.tree.leaves(state.params))),
        "epochs": config.epochs,
        "batch_size": config.batch_size,
        "seed": config.seed,
        "early_stopping": config.early_stopping,
        "checkpoint_every": engine.checkpoint_every,
        "keep": config.keep,
        "block_size": engine.block_size,
        "devices": config.devices,
        **({"shard": config.shard} if config.shard != "replicate" else {}),
    }
    for name in ("precision", "micro_batches", "loss_scale", "ema"):
        value = getattr(options, name)
        if value is not None and not (name == "micro_batches" and value == 1):
            record[name] = _describe(value) if name in ("precision", "loss_scale") else value
    if "ema" in record:
        record["ema"] = float(record["ema"])
    if options.remat:
        record["remat"] = True
    if stateful:
        record["callbacks"] = stateful
    return record


def _make_engine(model, optimizer, loss_fn, x, y, val, state, config: FitConfig, data_key, log) -> "_Engine":
    """The `_Engine` of a run, after the model, the loss and the train step have been traced on
    the data (their refusals come now, before anything is written)."""
    eval_step = _eval_step(loss_fn, False, config.options.policy)
    _check_split("fit", "train", model, eval_step, state, x, y)
    if val is not None:
        _check_split("fit", "validation", model, eval_step, state, *val)
    steps_per_epoch = len(y) // config.batch_size
    if log is None:
        log = (
            (lambda message: print(message, file=sys.stderr, flush=True))
            if config.progress
            else (lambda message: None)
        )
    engine = _Engine(
        config,
        loss_fn,
        x,
        y,
        val,
        steps_per_epoch,
        config.block_size or default_block_size(steps_per_epoch),
        config.checkpoint_every or steps_per_epoch,
        data_key,
        log,
        _make_loop(loss_fn, optimizer, config.devices, config.options, config.shard),
    )
    try:  # what the train step refuses (a trace, nothing runs) is refused before out_dir is written
        engine.metrics_like(state)
    except (TypeError, ValueError) as err:
        if type(err) not in (TypeError, ValueError):
            raise
        raise type(err)(f"fit: train step: {err}") from None
    return engine


# ----------------------------------------------------------------------------- fit


def fit(
    model,
    optimizer: optax.GradientTransformation,
    train,
    *,
    epochs: int | None = None,
    batch_size: int | None = None,
    validation=None,
    seed: int = 0,
    loss_fn=None,
    augment=None,
    early_stopping: int | None = None,
    out_dir: str | None = None,
    resume: bool = False,
    checkpoint_every: int | None = None,
    keep: int = 3,
    devices: int | None = None,
    shard: str = "replicate",
    remat: bool = False,
    progress: bool = True,
    block_size: int | None = None,
    learning_rate=None,
    log: Callable[[str], None] | None = None,
    precision=None,
    micro_batches: int = 1,
    loss_scale=None,
    ema=None,
    compile_cache: bool | str = True,
    initial_params=None,
    callbacks=None,
    config: FitConfig | None = None,
) -> FitResult:
    """Train ``model`` with ``optimizer`` on ``train`` for ``epochs`` epochs of minibatch SGD.

    Minibatch SGD: each epoch visits the ``n // batch_size`` batches of a fresh random order
    (``fold_in(data_key, epoch)``; `run_keys` gives the keys of ``seed``), one optimizer step
    each, ``params <- params + optimizer.update(grad L(batch))``; a step with a NaN/Inf loss,
    gradient or update is skipped and counted (``nonfinite_steps``).

    Args:

    - ``model``: a jaxdl layer (e.g. `jaxdl.models.mlp`, `jaxdl.layers.Sequential`) or
      `jaxdl.layers.from_flax`; ``optimizer``: any jaxdl or optax ``GradientTransformation``.
    - ``train``, ``validation``: ``(x, y)`` arrays (numpy or jax) or `jaxdl.data.Split`, or a
      random-access source of ``(x, y)`` examples (``len`` and ``source[i]``, e.g. a grain
      ``MapDataset``; `jaxdl.sources`): read in the arrays' order (the same examples give
      bitwise the same run; the position is the step count, so resume stays bitwise), gathered
      by a background thread a few blocks ahead, every example checked as it is read (shape
      and dtype as example 0's, finite inputs, labels in range: a bad one is refused with its
      index before its step). A validation source is read in batches at each epoch's end.
      Sequences: integer tokens ``x`` (N, T) and targets ``y`` (N, T) for a model giving logits
      (N, T, V) (`jaxdl.models.transformer_lm`); the default loss is then per token, and a
      target equal to `jaxdl.losses.IGNORE_INDEX` (-100, PyTorch's ``ignore_index`` rule) is
      padding: left out of the loss (the mean over the other tokens of the batch), of the
      accuracy and of validation's weights. Integer targets outside [0, V) that are not -100 are
      refused before training.
    - ``loss_fn``: default ``supervised_loss(model)`` (softmax cross-entropy, reports accuracy).
      The contract of a custom one: ``loss_fn(params, model_state, batch, key, train=True) ->
      (loss, (model_state, aux))``. fit passes the trainable ``params`` (the tree
      ``model.init`` returns), the ``model_state`` (e.g. BatchNorm statistics; ``{}`` if
      none), ``batch = (x, y)``: one batch of the data (``x[B, ...]``, ``y[B, ...]``; a
      micro-batch with ``micro_batches``; augmented when ``augment`` is set), ``key``: the
      step's PRNG key (`jaxdl.train_step.step_key`: ``fold_in(state.key, step)``; None in
      evaluation) and ``train``: True in training, False in validation and `evaluate` (a
      ``train=`` keyword is required: validation calls it with ``train=False``). It returns a
      scalar ``loss`` (float; its gradient trains ``params``), the new ``model_state`` (the
      input one where nothing changes) and ``aux``: a dict of scalar metrics (e.g.
      ``{"accuracy": ...}``) that the history reports as ``train_NAME`` and ``val_NAME``. It
      is traced once per shape under `jax.jit`, so it must be a pure function of its inputs.
    - ``augment``: an int ``s`` (random translation by up to ``s`` pixels, zero fill; images
      NHWC) or ``augment(key, x) -> x``, applied to training batches inside the compiled step.
    - ``early_stopping``: patience in epochs: stop after that many epochs without a lower
      validation loss and return the best epoch's parameters (needs ``validation``).
    - ``out_dir``/``resume``/``checkpoint_every`` (steps; default every epoch)/``keep``: see the
      module docstring. ``resume=True`` with an ``out_dir`` that holds no checkpoint starts from
      the beginning; one that holds a run of another configuration is refused.
    - ``devices``: train data-parallel over that many devices with the sharded scan loop (in a
      run of several processes joined by `jax.distributed.initialize`, the devices of all of
      them: every process passes the same data and places its own devices' part of each block);
      ``batch_size`` must be divisible by it and the model's BatchNorm layers need
      ``axis_name="batch"`` (`jaxdl.models.mlp(..., axis_name="batch")`). Same result as one
      device up to float reduction order. ``shard``: ``"replicate"`` (every device holds the
      whole state) or ``"fsdp"`` (large params, optimizer moments and EMA split over the
      devices, `jaxdl.parallel.fsdp_shardings`; needs ``devices``). A run resumed with another
      ``devices`` or ``shard`` restores its checkpoint onto the new layout.
    - ``remat``: each top-level layer with its activation under `jax.checkpoint` (the model
      must be a `jaxdl.layers.Sequential`; `jaxdl.train_step.remat_loss`): less memory for
      activations, one more forward pass, the same numbers. For blocks, wrap them in
      `jaxdl.layers.Remat` instead.
    - ``initial_params``: start from these parameters (e.g. a pretrained body for transfer
      learning, CSE 176 Lecture 11) instead of the model's initialization; the same tree as
      ``model.init``'s. fit copies them (its state is donated to the compiled loop), so the
      caller's arrays stay valid.
    - ``progress``: a `tqdm.auto` bar (a widget in notebooks) and one line per epoch on stderr;
      False prints nothing. ``log``: where messages go (resumption, skipped corrupt checkpoints);
      default: stderr when ``progress``, else nowhere.
    - ``block_size``: steps per compiled scan call (default: a divisor of the steps per epoch
      near 16); ``learning_rate``: the number or schedule to report as ``lr`` in the history
      (default: read from an `optax.inject_hyperparams` state, else not reported).
    - ``precision``: ``"bf16"``/``"fp16"`` or a `jaxdl.precision.Policy` (float32 master
      weights, 16-bit forward and backward; validation runs under the same policy);
      ``loss_scale``: ``"dynamic"`` or a number (use it with ``"fp16"``), kept in the state and
      checkpointed; the history reports its mean as ``loss_scale``.
    - ``micro_batches``: K, gradient accumulation: each optimizer step averages the gradients of
      K micro-batches of ``batch_size / K`` examples (``batch_size`` must be divisible by K,
      and by ``devices * K`` with devices); BatchNorm uses each micro-batch's statistics.
    - ``ema``: a decay in [0, 1): keep an exponential moving average of the params in the
      state (`jaxdl.train_step.ema_update`); validation is scored with both, and the history
      adds ``ema_val_loss``, ``ema_val_accuracy``. The returned state carries ``ema_params``
      (score it with ``evaluate(..., use_ema=True)``); early stopping and ``model/`` use the raw
      params.
    - ``compile_cache``: turn on JAX's persistent compilation cache (`jaxdl.compile_cache`;
      a str: its folder), so a rerun loads the compiled loop instead of compiling it;
      ``JAXDL_COMPILE_CACHE=0`` keeps it off. False leaves JAX's setting as it is.

    - ``callbacks``: a list of `jaxdl.Callback` (`jaxdl.callbacks`: ``on_train_begin``,
      ``on_block_end``, ``on_epoch_end`` with the epoch's record, ``on_train_end``; a hook that
      returns True stops training). They run after fit's own (progress bar, metrics.jsonl,
      TensorBoard, early stopping) and before the checkpoint; a callback's ``state_dict()`` is
      saved in every checkpoint, so ``resume=True`` stays bitwise.
    - Preemption (`jaxdl.preemption`): while fit runs in the main thread, SIGTERM or SIGINT
      (Ctrl-C) makes it finish the block of steps in flight, save a checkpoint of that step
      (with ``out_dir``), print one line saying so and how to continue (to ``log``, default
      stderr), and raise `jaxdl.Preempted`: a `SystemExit` with ``code`` 143 (SIGTERM) or 130
      (SIGINT), so a script that does not catch it exits with that status and no traceback.
      ``resume=True`` then ends bitwise as the uninterrupted run. A second signal raises at
      once; a save it interrupts is abandoned and the checkpoint before stays the newest.
    - ``config``: a `FitConfig` holding the options above (``epochs`` to ``compile_cache``)
      instead of the keywords.

    ``history`` entries: ``epoch``, ``step``, ``train_loss``, ``train_accuracy``, ``val_loss``,
    ``val_accuracy`` (with validation), ``lr``, ``update_ratio`` (mean over the epoch's steps of
    ||update|| / ||params||; Sarkar, CS60010 wants about 1e-3), ``grad_norm``, ``nonfinite_steps``,
    ``seconds``, ``examples_per_s``. Bad arguments are refused with a ValueError or TypeError
    naming the argument and the value before anything is trained or written.

    Returns:
      A `FitResult`: the final ``state``, the ``history``, ``best_epoch``, ``steps``,
      ``stopped_early``, ``resumed_from_step``, ``train_time_s``.

    Source: CSE 176 Lecture 11 (minibatch SGD); Tips and Tricks notes and Prechelt 1998 (early
    stopping).

    >>> import numpy as np
    >>> import jaxdl as dl
    >>> x = np.random.default_rng(0).normal(size=(32, 3)).astype(np.float32)
    >>> y = (x[:, 0] > 0).astype(np.int32)
    >>> result = dl.fit(dl.layers.Dense(2), dl.sgd(0.1), (x, y), epochs=2, batch_size=8, progress=False)
    >>> [r["epoch"] for r in result.history], result.steps
    ([1, 2], 8)
    >>> result.history[-1]["train_loss"] < result.history[0]["train_loss"]
    True
    """

    config = _fit_config(
        config,
        dict(
            epochs=epochs,
            batch_size=batch_size,
            seed=seed,
            augment=augment,
            early_stopping=early_stopping,
            out_dir=out_dir,
            resume=resume,
            checkpoint_every=checkpoint_every,
            keep=keep,
            devices=devices,
            shard=shard,
            progress=progress,
            block_size=block_size,
            learning_rate=learning_rate,
            precision=precision,
            micro_batches=micro_batches,
            loss_scale=loss_scale,
            ema=ema,
            remat=remat,
            compile_cache=compile_cache,
        ),
    )
    x, y = _arrays("train", train)
    val = _arrays("validation", validation) if validation is not None else None
    model = as_layer("fit", model)
    check_transform("fit", "optimizer", optimizer)
    config.check_data("fit", x, y, val)
    users = check_callbacks("fit", callbacks)
    loss_fn = augmented_loss(loss_fn if loss_fn is not None else supervised_loss(model), config.augment)
    if config.out_dir is not None:
        _check_out_dir(config.out_dir, config.resume)
    if config.compile_cache:
        _compile_cache.enable(config.compile_cache if isinstance(config.compile_cache, str) else None)
    state, data_key = _initial_state(model, optimizer, x, config, initial_params)
    engine = _make_engine(model, optimizer, loss_fn, x, y, val, state, config, data_key, log)
    own = [ProgressBar()] if config.progress else []
    stopping = [EarlyStopping(config.early_stopping)] if config.early_stopping else []
    stateful = list(CallbackList(own + stopping + users).states())[len(stopping) :]  # the user's
    record = _fit_record(engine, model, optimizer, state, initial_params, stateful)
    if config.resume and os.path.isfile(os.path.join(config.out_dir, "fit_config.json")):
        _check_same_config(config.out_dir, record)
    try:
        if config.out_dir is None:
            return engine.run(state, own + stopping + users, None)
        return _run_in_folder(engine, state, record, own, stopping + users)
    except Preempted as stop:
        stop.message = _preempted_line(stop, config.out_dir)
        (log or (lambda line: print(line, file=sys.stderr, flush=True)))(stop.message)
        raise


def _preempted_line(stop: Preempted, out_dir: str | None) -> str:
    """The one line `fit` prints when a signal ended it: what was saved and how to continue."""
    name = signal.Signals(stop.signum).name
    if out_dir is None:
        return f"fit: interrupted by {name}; nothing saved (no out_dir), the run cannot be resumed"
    where = os.path.join(out_dir, "checkpoints")
    again = "to continue, run it again with resume=True (jaxdl train: the same command with --resume)"
    if stop.step is None:
        return (
            f"fit: interrupted by a second {name} during the save: the save was abandoned and the "
            f"newest complete checkpoint in {where} is kept; {again}"
        )
    return f"fit: interrupted by {name} at step {stop.step}: checkpoint saved in {where}; {again}"


def _run_in_folder(engine: "_Engine", state, record: dict, first: list, rest: list) -> FitResult:
    """`_Engine.run` writing the run folder: ``fit_config.json`` first, then metrics.jsonl and
    TensorBoard (callbacks after ``first``), checkpoints (the last callback), and at the end
    ``model/``, ``curves.png`` and ``summary.json``."""
    out_dir = engine.config.out_dir
    os.makedirs(out_dir, exist_ok=True)
    write_json(os.path.join(out_dir, "fit_config.json"), record)
    from jaxdl.checkpoint import CheckpointManager, save_checkpoint

    with CheckpointManager(
        os.path.join(out_dir, "checkpoints"),
        max_to_keep=engine.config.keep,
        save_interval_steps=engine.checkpoint_every,
    ) as manager:
        files = [MetricsFile(os.path.join(out_dir, "metrics.jsonl")), TensorBoard(out_dir)]
        outputs = _Outputs(out_dir, manager)
        result = engine.run(state, first + files + rest + [Checkpointing(manager)], outputs)
    best = {"params": result.state.params, "model_state": result.state.model_state}
    save_checkpoint(os.path.join(out_dir, "model"), best, overwrite=True)
    plot_curves(result.history, os.path.join(out_dir, "curves.png"))
    write_summary(out_dir, result)
    return result


def write_summary(out_dir: str, result: FitResult, **extra) -> dict:
    """Write (atomically) and return a run's ``summary.json``: steps, epochs completed, whether
    it stopped early, the best epoch, the resumption step, the training time, the final record,
    then ``extra`` (what a caller adds, e.g. the command's test accuracy). The one writer of the
    file: `fit` writes it, and the ``jaxdl train`` command writes it again with its ``extra``.

    Args:
      out_dir: the run's folder.
      result: `fit`'s `FitResult`.
      **extra: entries added at the end.

    Returns:
      The summary, a dict.
    """
    summary = {
        "steps": result.steps,
        "epochs_completed": len(result.history),
        "stopped_early": result.stopped_early,
        "best_epoch": result.best_epoch,
        "resumed_from_step": result.resumed_from_step,
        "train_time_s": result.train_time_s,
        "final": result.history[-1] if result.history else None,
        **extra,
    }
    write_json(os.path.join(out_dir, "summary.json"), summary)
    return summary


class _Outputs(NamedTuple):
    out_dir: str
    manager: Any

    @property
    def metrics_path(self) -> str:
        return os.path.join(self.out_dir, "metrics.jsonl")


class _Engine(NamedTuple):
    """The epoch loop of `fit`, with everything fixed before it starts."""

    config: FitConfig
    loss_fn: Any
    x: np.ndarray
    y: np.ndarray
    val: Any
    steps_per_epoch: int
    block_size: int
    checkpoint_every: int
    data_key: jax.Array
    log: Callable
    loop_parts: tuple  # `_make_loop`'s (loop, place_state, block_sharding)

    def run(self, state: TrainState, callbacks: list, outputs: _Outputs | None) -> FitResult:
        """Train from ``state`` (or the newest checkpoint in ``outputs``) to the last epoch or a
        callback's stop: the loop of `fit`."""
        hooks = CallbackList(callbacks)
        run, resumed, history = self._start(state, hooks, outputs)
        step, total = int(run.state.step), self.config.epochs * self.steps_per_epoch
        hooks.call("on_train_begin", self._loop(run, step, hooks, resumed))
        with catch_signals() as signals:
            try:
                while step < total and not hooks.stop:
                    run, step, record = self._epoch(run, step, hooks, resumed, signals)
                    if record is not None:
                        history.append(record)
                    if signals.signum is not None and step < total and not hooks.stop:
                        self._preempt(run, step, hooks, resumed, outputs, signals.signum)
            finally:
                hooks.call("on_train_end", self._loop(run, step, hooks, resumed))
        return self._result(run, history, step, hooks.stop, resumed)

    def _preempt(self, run: Run, step: int, hooks: CallbackList, resumed, outputs, signum: int):
        """After a SIGTERM or SIGINT (`jaxdl.preemption`): save the checkpoint of ``step`` (with
        ``outputs``; an epoch end is saved already) and raise `Preempted`."""
        saved = None
        if outputs is not None:
            outputs.manager.save(step, self._loop(run, step, hooks, resumed).checkpoint(), force=True)
            saved = step
        raise Preempted(signum, saved)

    def _start(self, state: TrainState, hooks: CallbackList, outputs: _Outputs | None):
        """``(run, resumed_from_step, history)``: a fresh `Run`, or with ``outputs`` the newest good
        checkpoint's (the callbacks' states loaded, metrics.jsonl cut to its epochs)."""
        best = (
            _host_copy({"params": _eval_state(state).params, "model_state": state.model_state})
            if self.config.early_stopping
            else None
        )
        run, resumed, history = Run(state, Progress.fresh(), best, hooks.states()), None, []
        if outputs is not None:
            progress = Progress.fresh(self.metrics_like(state))
            run, resumed = _restore_latest(outputs.manager, run._replace(progress=progress), self.log)
            step, S = int(run.state.step), self.steps_per_epoch
            if run.callbacks is None:
                run = self._states_before_callbacks(run, step)
            hooks.load_states(run.callbacks)
            hooks.stop = bool(run.progress.stopped)
            if resumed is not None:
                self.log(
                    f"resumed from checkpoint step {resumed} (epoch {step // S + 1}, step {step % S} of {S})"
                )
            history = [r for r in read_metrics(outputs.metrics_path) if r["epoch"] <= step // S]
        return run._replace(state=self.loop_parts[1](run.state)), resumed, history

    def _states_before_callbacks(self, run: Run, step: int) -> Run:
        """A checkpoint from before fit had callbacks: fit's early stopping kept its record in
        the progress (best validation loss and epoch; stop when ``epochs - best_epoch >=
        patience`` at an epoch's end). Rebuild `EarlyStopping`'s state and the stop flag from it."""
        if not self.config.early_stopping:
            return run._replace(callbacks={})
        epoch, best_epoch = step // self.steps_per_epoch, int(run.progress.best_epoch)
        state = {
            "best_metric": np.array(run.progress.best_val_loss, np.float64),
            "best_epoch": np.array(best_epoch, np.int64),
            "patience_count": np.array(epoch - best_epoch, np.int64),
        }
        stop = step % self.steps_per_epoch == 0 and epoch - best_epoch >= self.config.early_stopping
        progress = run.progress._replace(stopped=np.array(int(stop), np.int64))
        return run._replace(progress=progress, callbacks={"EarlyStopping_0": state})

    def _epoch(self, run: Run, step: int, hooks: CallbackList, resumed, signals=None):
        """The rest of the epoch at ``step``, block by block, then its record: ``(run, step,
        record)``; record None when a callback stopped the run inside the epoch, or a signal
        came (``signals``: a `jaxdl.preemption.catch_signals`) before its last block."""
        S = self.steps_per_epoch
        epoch, start = divmod(step, S)
        t_epoch = time.perf_counter()
        bounds = chunk_bounds(epoch, S, self.block_size, self.checkpoint_every, start)
        order = self._batch_order(epoch)
        blocks = sources.blocks(self.x, self.y, order, bounds)
        for batches in data.prefetch_to_device(blocks, device=self.loop_parts[2]):
            run, metrics, seconds = self._train_block(run, batches)
            step += len(metrics["loss"])
            running = {n: float(v) / (step - epoch * S) for n, v in run.progress.sums.items()}
            if hooks.call(
                "on_block_end", step, metrics, self._loop(run, step, hooks, resumed, running, seconds)
            ):
                return run, step, None
            if signals is not None and signals.signum is not None and step % S:
                return run, step, None
        record = self._record(run, epoch, step, start, time.perf_counter() - t_epoch)
        run = self._end_epoch(run, epoch + 1, record.get("val_loss"))
        hooks.call("on_epoch_end", epoch + 1, record, self._loop(run, step, hooks, resumed))
        return run, step, record

    def _record(self, run: Run, epoch: int, step: int, start: int, seconds: float) -> dict:
        """Epoch ``epoch``'s record: validation (and EMA validation) in eval mode, the rate."""
        policy, val = self.config.options.policy, self.val
        val_metrics = ema_val = None
        if val is not None:
            val_metrics = _evaluate_arrays(
                _eval_step(self.loss_fn, False, policy), _eval_state(run.state), *val, EVAL_BATCH
            )
            if self.config.options.ema is not None:
                ema_step = _eval_step(self.loss_fn, True, policy)
                ema_val = _evaluate_arrays(ema_step, _eval_state(run.state), *val, EVAL_BATCH)
        lr = _learning_rate(self.config.learning_rate, run.state.opt_state, step - 1)
        S, bs = self.steps_per_epoch, self.config.batch_size
        examples = (step - epoch * S - start) * bs
        return _epoch_record(
            epoch + 1, step, run.progress.sums, S, val_metrics, lr, seconds, examples, ema_val
        )

    def _loop(self, run: Run, step: int, hooks: CallbackList, resumed, running=None, seconds=0.0) -> Loop:
        """What the callbacks see now (`jaxdl.callbacks.Loop`)."""

        def checkpoint() -> dict:
            progress = run.progress._replace(stopped=np.array(int(hooks.stop), np.int64))
            return run._replace(progress=progress, callbacks=hooks.states()).tree()

        c = self.config
        return Loop(
            run.state,
            step,
            c.epochs,
            self.steps_per_epoch,
            c.batch_size,
            running or {},
            seconds,
            resumed,
            checkpoint,
        )

    def _result(self, run: Run, history: list, step: int, stop: bool, resumed) -> FitResult:
        """The `FitResult`; with early stopping, the best epoch's params and model state."""
        final = run.state
        if run.best is not None:  # the scored (evaluation) params; a schedule-free run restarts there
            best_params = jax.tree.map(jnp.asarray, run.best["params"])
            final = final.replace(
                params=best_params,
                model_state=jax.tree.map(jnp.asarray, run.best["model_state"]),
                opt_state=schedule_free_restart(final.opt_state, best_params),
            )
        best_epoch = int(run.progress.best_epoch) if self.val is not None and history else None
        stopped_early = bool(stop) and step < self.config.epochs * self.steps_per_epoch
        train_time = round(float(run.progress.train_time), 3)
        return FitResult(final, history, best_epoch, step, stopped_early, resumed, train_time)

    def metrics_like(self, state: TrainState) -> dict:
        """The per-step metrics of the train loop as shapes: `jax.eval_shape` of the loop on the
        first block of one batch (a trace, cached by the loop; nothing compiles or runs)."""
        first = self._batch_order(0)[:1]
        return jax.eval_shape(self.loop_parts[0], state, (self.x[first], self.y[first]))[1]

    def _batch_order(self, epoch: int) -> np.ndarray:
        """Epoch ``epoch``'s batches as example indices, shape (steps_per_epoch, batch_size): the
        order of `jaxdl.data.batch_blocks` (the last partial batch dropped)."""
        order = data.epoch_permutation(len(self.y), self.data_key, epoch)
        bs = self.config.batch_size
        return order[: self.steps_per_epoch * bs].reshape(self.steps_per_epoch, bs)

    def _train_block(self, run: Run, batches) -> tuple[Run, dict, float]:
        """One compiled block: ``(run, the block's per-step metrics on the host, seconds)``."""
        t0 = time.perf_counter()
        state, metrics = self.loop_parts[0](run.state, batches)
        metrics = jax.device_get(metrics)
        seconds = time.perf_counter() - t0
        sums = dict(run.progress.sums)
        for name, values in metrics.items():
            sums[name] = sums.get(name, np.zeros((), np.float64)) + np.sum(values, dtype=np.float64)
        progress = run.progress._replace(sums=sums, train_time=run.progress.train_time + seconds)
        return run._replace(state=state, progress=progress), metrics, seconds

    def _end_epoch(self, run: Run, epoch: int, val_loss) -> Run:
        """Reset the epoch sums and update the best-epoch record (lower validation loss wins)."""
        sums = {name: np.zeros((), np.float64) for name in run.progress.sums}
        progress, best = run.progress._replace(sums=sums), run.best
        if val_loss is not None and val_loss < progress.best_val_loss:
            progress = progress._replace(
                best_val_loss=np.array(val_loss), best_epoch=np.array(epoch, np.int64)
            )
            if best is not None:
                best = _host_copy(
                    {"params": _eval_state(run.state).params, "model_state": run.state.model_state}
                )
        return run._replace(progress=progress, best=best)
