"""Callbacks of `jaxdl.fit`: what happens around the compiled loop, as objects beside it.

`fit` runs a short loop (Keras' ``Model.fit``, Chollet et al. 2015; levanter's hooks): blocks of
steps, each one compiled scan call, and an epoch end with validation. Everything else is a
`Callback` called at four points:

    on_train_begin(loop)                 once, after a resumed run's checkpoint is restored
    on_block_end(step, metrics, loop)    after each compiled block; metrics: {name: (k,) per step}
    on_epoch_end(epoch, logs, loop)      after each epoch; logs: its record (``fit``'s history)
    on_train_end(loop)                   once, also when training ends with an exception

``loop`` is a `Loop`: the current `TrainState`, the global step, the run's sizes, and the running
means of the epoch. **Stopping**: a callback stops training by returning True from
``on_block_end`` (at once, after that block; the partial epoch gets no record) or from
``on_epoch_end`` (after that epoch). The request is kept in the run's checkpoints, so a resumed
run that had stopped stays stopped.

**State**: a callback whose behaviour depends on the past (e.g. `EarlyStopping`'s best value)
returns it from ``state_dict()`` as a pytree of numpy arrays of a fixed structure, and takes it
back in ``load_state_dict(tree)``. `fit` saves it in every checkpoint and restores it before
``on_train_begin``, so ``resume=True`` ends in bitwise the same state and history.

`fit` builds its own outputs from these: `ProgressBar` (``progress=True``), `MetricsFile`
(``metrics.jsonl``) and `TensorBoard` (with ``out_dir``), `EarlyStopping` (``early_stopping=``),
and `Checkpointing` (with ``out_dir``, always last, so a checkpoint holds what the callbacks
before it did); a user's ``callbacks=[...]`` run after the first four, in order.
"""

from __future__ import annotations

import json
import math
import os
import sys
from typing import Any, Callable, NamedTuple

import numpy as np

from jaxdl._checks import check_int, check_number

__all__ = [
    "Callback",
    "Loop",
    "CallbackList",
    "EarlyStopping",
    "ProgressBar",
    "MetricsFile",
    "TensorBoard",
    "Checkpointing",
    "epoch_line",
]


class Loop(NamedTuple):
    """What `fit`'s loop shows a callback at each hook (read it, do not keep it).

    ``state``: the current `jaxdl.TrainState` (donated to the next block: copy to the host what
    you keep, e.g. ``jax.device_get``); ``step``: optimizer steps done, over the whole run;
    ``epochs``, ``steps_per_epoch``, ``batch_size``: the run's sizes (``epoch`` = ``step //
    steps_per_epoch`` epochs are complete); ``running``: the means of the per-step metrics over
    the current epoch's steps so far (empty at an epoch's start); ``seconds``: the time of the
    last block; ``resumed_from_step``: the checkpoint step of a resumed run, else None;
    ``checkpoint()``: the pytree a checkpoint of the run holds now.
    """

    state: Any
    step: int
    epochs: int
    steps_per_epoch: int
    batch_size: int
    running: dict
    seconds: float
    resumed_from_step: int | None
    checkpoint: Callable[[], dict]

    @property
    def epoch(self) -> int:
        """Epochs complete."""
        return self.step // self.steps_per_epoch


class Callback:
    """The base of `fit`'s callbacks: every hook does nothing; override the ones you need.

    Hooks (module docstring): ``on_train_begin(loop)``, ``on_block_end(step, metrics, loop)``,
    ``on_epoch_end(epoch, logs, loop)`` (``epoch`` counts from 1, as ``logs["epoch"]``),
    ``on_train_end(loop)``. Return True from ``on_block_end`` or ``on_epoch_end`` to stop
    training. A callback with state returns it from ``state_dict`` (a pytree of numpy arrays,
    saved in the checkpoints) and takes it back in ``load_state_dict``.

    >>> class Log(Callback):
    ...     def on_epoch_end(self, epoch, logs, loop):
    ...         print(epoch, sorted(logs)[:2])
    >>> Log().on_epoch_end(1, {"epoch": 1, "step": 10}, None)
    1 ['epoch', 'step']
    """

    def on_train_begin(self, loop: Loop) -> None:
        """Called once before the first block (after a resumed run's state is restored)."""

    def on_block_end(self, step: int, metrics: dict, loop: Loop) -> bool | None:
        """Called after each compiled block; ``metrics``: ``{name: (k,) numpy array}``, one
        value per step of the block. Return True to stop now."""

    def on_epoch_end(self, epoch: int, logs: dict, loop: Loop) -> bool | None:
        """Called after each epoch with its record (what ``fit``'s history gets). Return True to
        stop after this epoch."""

    def on_train_end(self, loop: Loop) -> None:
        """Called once when the loop ends, also when it ends with an exception (to close files)."""

    def state_dict(self) -> Any:
        """The callback's state as a pytree of numpy arrays (saved in checkpoints), or None."""
        return None

    def load_state_dict(self, state: Any) -> None:
        """Take back what `state_dict` returned (from a checkpoint)."""


class CallbackList:
    """Callbacks called in order; ``stop`` turns True once a hook returns True.

    ``states()``/``load_states(tree)``: the states of the callbacks that have one, keyed by
    ``"<class name>_<index among them>"`` (what a checkpoint holds).

    Args:
      callbacks: the `Callback` s, called in this order.
    """

    def __init__(self, callbacks):
        self.callbacks = list(callbacks)
        self.stop = False

    def call(self, hook: str, *args) -> bool:
        """``getattr(callback, hook)(*args)`` for each callback in order; returns ``stop``."""
        for callback in self.callbacks:
            if getattr(callback, hook)(*args) is True:
                self.stop = True
        return self.stop

    def _stateful(self) -> dict:
        stateful = [c for c in self.callbacks if c.state_dict() is not None]
        return {f"{type(c).__name__}_{i}": c for i, c in enumerate(stateful)}

    def states(self) -> dict:
        """``{key: state_dict()}`` of the callbacks with a state."""
        return {key: c.state_dict() for key, c in self._stateful().items()}

    def load_states(self, states: dict) -> None:
        """Give each callback with a state its entry of ``states``."""
        for key, callback in self._stateful().items():
            callback.load_state_dict(states[key])


def check_callbacks(owner: str, callbacks) -> list:
    """``callbacks`` as a list, each checked to be a `Callback` (or to have its four hooks).

    Args:
      owner: the caller's name, for the error messages.
      callbacks: None, a `Callback` or a sequence of them.

    Returns:
      A list of the callbacks (TypeError naming a bad one).
    """
    if callbacks is None:
        return []
    if isinstance(callbacks, Callback) or not isinstance(callbacks, (list, tuple)):
        raise TypeError(
            f"{owner}: callbacks must be a list of jaxdl.Callback, got {type(callbacks).__name__}"
        )
    hooks = (
        "on_train_begin",
        "on_block_end",
        "on_epoch_end",
        "on_train_end",
        "state_dict",
        "load_state_dict",
    )
    for i, callback in enumerate(callbacks):
        missing = [h for h in hooks if not callable(getattr(callback, h, None))]
        if missing:
            raise TypeError(
                f"{owner}: callbacks[{i}] ({type(callback).__name__}) has no {missing[0]}; subclass "
                "jaxdl.Callback, whose hooks do nothing until overridden"
            )
    return list(callbacks)


class EarlyStopping(Callback):
    """Stop when a monitored value has not improved for ``patience`` epochs.

    flax's ``flax.training.early_stopping.EarlyStopping`` as a callback: stop training when the
    validation error starts to rise. After each epoch, with ``v = logs[monitor]`` (negated for ``mode="max"``):

    .. math:: \\text{improved} = v_{best} - v > \\delta, \\qquad
              c \\leftarrow 0 \\text{ if improved, else } c + 1, \\qquad \\text{stop iff } c \\ge p

    (``v_best`` starts at +inf; a NaN never improves). Unlike flax's, which tests ``c >= p``
    before counting, this stops after exactly ``patience`` epochs without improvement, as
    ``fit(early_stopping=p)`` does. ``update(value) -> improved`` is the rule alone; its state
    (``best_metric``, ``best_epoch``, ``patience_count``) is checkpointed.

    Args:
      patience: epochs without improvement before stopping (int >= 1).
      monitor: the key of the epoch's logs to watch (default ``"val_loss"``).
      min_delta: the improvement ``delta >= 0`` that counts.
      mode: ``"min"`` (lower is better) or ``"max"``.

    Source: Prechelt 1998, "Early stopping - but when?"; Tips and Tricks notes.

    >>> stop = EarlyStopping(patience=2)
    >>> [stop.on_epoch_end(e, {"val_loss": v}, None) for e, v in enumerate([3.0, 2.0, 2.5, 2.1], 1)]
    [False, False, False, True]
    """

    def __init__(self, patience: int, monitor: str = "val_loss", min_delta: float = 0.0, mode: str = "min"):
        self.patience = check_int("EarlyStopping", "patience", patience, low=1)
        if not isinstance(monitor, str):
            raise TypeError(f"EarlyStopping: monitor must be the name of a logged value, got {monitor!r}")
        check_number("EarlyStopping", "min_delta", min_delta, low=0)
        if mode not in ("min", "max"):
            raise ValueError(f"EarlyStopping: mode={mode!r} is unknown; expected 'min' or 'max'")
        self.monitor, self.min_delta, self.mode = monitor, float(min_delta), mode
        self.best_metric, self.best_epoch, self.patience_count = math.inf, 0, 0

    def update(self, value: float, epoch: int = 0) -> bool:
        """Count epoch ``epoch``'s ``value``; return whether it improved on the best."""
        v = float(value) if self.mode == "min" else -float(value)
        improved = self.best_metric - v > self.min_delta
        if improved:
            self.best_metric, self.best_epoch, self.patience_count = v, epoch, 0
        else:
            self.patience_count += 1
        return improved

    @property
    def should_stop(self) -> bool:
        """Whether ``patience`` epochs have passed without improvement."""
        return self.patience_count >= self.patience

    def on_epoch_end(self, epoch, logs, loop):
        if self.monitor not in logs:
            raise KeyError(
                f"EarlyStopping: monitor={self.monitor!r} is not among the epoch's logs "
                f"{sorted(logs)} (validation data gives val_loss)"
            )
        self.update(logs[self.monitor], epoch)
        return self.should_stop

    def state_dict(self):
        return {
            "best_metric": np.array(self.best_metric, np.float64),
            "best_epoch": np.array(self.best_epoch, np.int64),
            "patience_count": np.array(self.patience_count, np.int64),
        }

    def load_state_dict(self, state):
        self.best_metric = float(state["best_metric"])
        self.best_epoch, self.patience_count = int(state["best_epoch"]), int(state["patience_count"])


def epoch_line(record: dict, epochs: int) -> str:
    """One epoch's record as the line the progress bar prints: ``epoch 3/10: train loss 0.1234
    acc 0.9612 | val ... | lr 0.001 | update/weight 1.00e-03``.

    Args:
      record: one entry of `fit`'s history.
      epochs: the run's number of epochs.

    Returns:
      The line, a str.
    """
    parts = [f"epoch {record['epoch']}/{epochs}:"]
    for split in ("train", "val"):
        found = [
            f"{what} {record[f'{split}_{what}']:.4f}"
            for what in ("loss", "accuracy")
            if f"{split}_{what}" in record
        ]
        if found:
            parts.append(f"{split} " + " ".join(found).replace("accuracy", "acc") + " |")
    if "ema_val_accuracy" in record:
        parts.append(f"ema val acc {record['ema_val_accuracy']:.4f} |")
    if "lr" in record:
        parts.append(f"lr {record['lr']:.3g} |")
    if "update_ratio" in record:
        parts.append(f"update/weight {record['update_ratio']:.2e}")
    return " ".join(parts).rstrip(" |")


class ProgressBar(Callback):
    """A `tqdm.auto` bar over the run's steps (a widget in notebooks) with the epoch's running
    loss and accuracy and the examples per second, and one line per epoch (`epoch_line`), on
    ``file`` (default stderr).

    Args:
      file: where the bar and the lines go (default stderr).
    """

    def __init__(self, file=None):
        self.file, self.bar = file, None

    def on_train_begin(self, loop):
        from tqdm.auto import tqdm  # imported only to show a bar: without ipywidgets it warns

        self.bar = tqdm(
            total=loop.epochs * loop.steps_per_epoch,
            initial=loop.step,
            unit="step",
            dynamic_ncols=True,
            file=self.file or sys.stderr,
            leave=False,
        )

    def on_block_end(self, step, metrics, loop):
        k = len(metrics["loss"])
        self.bar.update(k)
        shown = " ".join(
            f"{n[:3] if n == 'accuracy' else n} {loop.running[n]:.4f}"
            for n in ("loss", "accuracy")
            if n in loop.running
        )
        epoch = (step - 1) // loop.steps_per_epoch + 1
        rate = k * loop.batch_size / max(loop.seconds, 1e-9)
        self.bar.set_postfix_str(f"epoch {epoch}/{loop.epochs} {shown} {rate:.0f} ex/s")

    def on_epoch_end(self, epoch, logs, loop):
        self.bar.write(epoch_line(logs, loop.epochs), file=self.file or sys.stderr)

    def on_train_end(self, loop):
        if self.bar is not None:
            self.bar.close()


class MetricsFile(Callback):
    """Append each epoch's record to ``path`` as one JSON line (``metrics.jsonl``; read it with
    `jaxdl.trainer.read_metrics`). The file's one writer: at the start of a resumed run it keeps
    only the records of the epochs complete (``loop.epoch``; the run writes the rest again) and
    a last line cut short by a kill.

    Args:
      path: the ``metrics.jsonl`` file.
    """

    def __init__(self, path: str):
        self.path = path

    def on_train_begin(self, loop):
        if not os.path.exists(self.path):
            return
        with open(self.path) as f:
            lines = [line for line in f if line.strip()]
        kept = []
        for line in lines:
            try:
                record = json.loads(line)
            except ValueError:
                continue  # the last line of a killed run (read_metrics refuses any other)
            if record["epoch"] <= loop.epoch:
                kept.append(line if line.endswith("\n") else line + "\n")
        with open(self.path + ".tmp", "w") as f:
            f.writelines(kept)
        os.replace(self.path + ".tmp", self.path)

    def on_epoch_end(self, epoch, logs, loop):
        with open(self.path, "a") as f:
            f.write(json.dumps(logs) + "\n")


def tensorboard_writer(out_dir: str):
    """A tensorboardX ``SummaryWriter`` into ``out_dir`` when tensorboardX is installed, else None.

    tensorboardX's writer module imports PyTorch, when it is installed, only to name a type in
    its annotations (``numpy_compatible = torch.Tensor``), and importing PyTorch takes about 5 s
    on a 2-core CPU. So unless torch is loaded already, ``import torch`` is made to fail while
    tensorboardX is imported (``sys.modules["torch"] = None``, Python's documented way to block
    an import); the writer then falls back to numpy's ndarray, and torch stays importable after.
    A tensorboardX that cannot load without torch is imported again, with it.

    Args:
      out_dir: the event files' folder.

    Returns:
      A ``tensorboardX.SummaryWriter``, or None.
    """
    block = "torch" not in sys.modules and "tensorboardX" not in sys.modules
    for blocked in (True, False) if block else (False,):
        if blocked:
            sys.modules["torch"] = None
        try:
            from tensorboardX import SummaryWriter

            return SummaryWriter(out_dir)
        except ImportError:
            continue
        finally:
            if blocked and sys.modules.get("torch", 0) is None:
                del sys.modules["torch"]
    return None


class TensorBoard(Callback):
    """Each epoch's numbers as TensorBoard scalars at the epoch's last step, in an event file in
    ``out_dir`` (nothing when tensorboardX is not installed; `tensorboard_writer`).

    Args:
      out_dir: the event files' folder.
    """

    def __init__(self, out_dir: str):
        self.out_dir, self.writer = out_dir, None

    def on_train_begin(self, loop):
        self.writer = tensorboard_writer(self.out_dir)

    def on_epoch_end(self, epoch, logs, loop):
        if self.writer is not None:
            for name, value in logs.items():
                if name not in ("epoch", "step"):  # a 0-d array: tensorboardX turns a Python
                    # float into a 1-element array and then warns converting it back
                    self.writer.add_scalar(name, np.asarray(value, np.float64), logs["step"])
            self.writer.flush()

    def on_train_end(self, loop):
        if self.writer is not None:
            self.writer.close()


class Checkpointing(Callback):
    """Save ``loop.checkpoint()`` with a `jaxdl.checkpoint.CheckpointManager`: inside an epoch
    where the manager's ``save_interval_steps`` says so, and at every epoch end. `fit` puts it
    last, so a checkpoint holds what the callbacks before it did (their states, a stop).

    Args:
      manager: a `jaxdl.checkpoint.CheckpointManager`.
    """

    def __init__(self, manager):
        self.manager = manager

    def on_block_end(self, step, metrics, loop):
        if step % loop.steps_per_epoch:  # an epoch's last block is saved at its end
            self.manager.save(step, loop.checkpoint())

    def on_epoch_end(self, epoch, logs, loop):
        self.manager.save(loop.step, loop.checkpoint(), force=True)
