"""Jit-compiled training: `TrainState`, train/eval steps, scan-fused loops.

One training step (docs/design.md, "The path of one batch"):

    batch -> loss_fn(params, model_state, batch, key) -> (loss, (model_state, aux))
          -> jax.value_and_grad -> grads -> [mean across devices] -> optimizer.update
          -> apply_updates -> new TrainState, metrics

Everything the step needs is in its arguments: the `TrainState` (a pytree) and the batch. The PRNG
key of step t is ``fold_in(state.key, t)`` (`step_key`), so dropout masks never repeat. A step
whose loss, gradients or updates hold a NaN or Inf leaves params, model state and optimizer state
as they were (Sarkar, CS60010: divergence is worse than a lost step) and reports
``nonfinite = 1``; the check is on the loss and the norms of the gradients and updates, so a norm beyond
float32's range (about 1.8e38) counts as non-finite too.

The data-parallel steps (`jaxdl.parallel.steps`: pmap, shard_map, and a scan-fused sharded loop)
are built from the same pieces, which are public for that reason: `step_body` (the math of one
step, the one body every step runs), `step_key`, `check_batch`, `check_state` and
`accepts_train`. This module does not import `jaxdl.parallel` (the data-parallel steps import
it), and knows models only through their ``init``/``apply`` protocol.

Options of every train step and loop, one frozen `StepOptions` (``options=StepOptions(...)``;
the builders' keywords of the same names are sugar for it). Besides ``skip_nonfinite`` (the skip
above, on by default) and ``donate`` (let XLA reuse the state's buffers), four change the math;
off by default, and then the step is the float32 program above with no extra state:

- ``precision``: a `jaxdl.precision.Policy` or ``"bf16"``/``"fp16"``: float32 master weights and
  optimizer state, forward and backward in the compute dtype (Micikevicius et al. 2018);
- ``loss_scale``: ``"dynamic"`` (PyTorch GradScaler's rule) or a number, kept in
  ``state.loss_scale``; an overflowing step is skipped and counted in ``nonfinite``;
- ``micro_batches=K``: gradient accumulation, the mean gradient of K micro-batches in a
  `lax.scan`, one optimizer step per batch (`accumulate_gradients`);
- ``ema=decay``: an exponential moving average of the parameters in ``state.ema_params``
  (Polyak & Juditsky 1992), evaluated with ``make_eval_step(..., use_ema=True)``.

and ``remat`` (gradient checkpointing, `remat_loss`) trades memory for a second forward pass
without changing the numbers.
"""

from __future__ import annotations

import dataclasses
import inspect
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import struct

from jaxdl._checks import (
    as_key,
    check_labels,
    check_number,
    check_pair,
    check_positive_int,
    check_shape,
    check_transform,
    check_tree_match,
    explain_batch_errors,
)
from jaxdl._tree import select as select_tree
from jaxdl.layers import remat_layers
from jaxdl.losses import accuracy, softmax_cross_entropy
from jaxdl.nnx import as_layer
from jaxdl.optimizers import apply_updates
from jaxdl.precision import Policy, get_loss_scale, get_policy, with_policy
from jaxdl.transforms import global_norm

__all__ = [
    "TrainState",
    "SupervisedLoss",
    "supervised_loss",
    "make_train_step",
    "make_eval_step",
    "make_train_loop",
    "check_labels",
    "step_key",
    "step_body",
    "scan_steps",
    "step_body_with_norm",
    "tree_norm",
    "check_batch",
    "check_state",
    "accepts_train",
    "StepOptions",
    "resolve_options",
    "step_options",
    "accumulate_gradients",
    "ema_update",
    "recalibrate_batchnorm",
    "remat_loss",
]

Batch = Any
LossFn = Callable[..., tuple[jax.Array, tuple[Any, dict]]]


class TrainState(struct.PyTreeNode):
    """Everything that changes during training, as one pytree.

    ``step`` counts the batches seen (int32), ``params`` and ``model_state`` (e.g. BatchNorm's
    running statistics) are the model's, ``opt_state`` the optimizer's, ``key`` the PRNG key from
    which step t draws ``fold_in(key, t)``. ``input_shape`` (one example, no batch axis) is static metadata used to
    check batches; it is not a leaf. Optional, None unless the steps use them (`step_options`):
    ``ema_params``, the moving average of the params (``ema=``), and ``loss_scale``, a
    `jaxdl.precision.LossScaleState` (``loss_scale=``).
    """

    step: jax.Array
    params: Any
    model_state: Any
    opt_state: Any
    key: jax.Array
    ema_params: Any = None
    loss_scale: Any = None
    input_shape: tuple = struct.field(pytree_node=False, default=())

    @classmethod
    def create(
        cls,
        model,
        optimizer: optax.GradientTransformation,
        key: jax.Array,
        input_shape,
        *,
        options: "StepOptions | None" = None,
        ema=None,
        loss_scale=None,
    ) -> "TrainState":
        """Initialize ``model`` for ``input_shape`` (one example) and ``optimizer`` for its params.

        ``key`` (a ``jax.random.key`` or an int seed) is split in two: one half initializes the
        model, the other seeds training. Pass the steps' `StepOptions` here too (``options=``,
        or its ``ema`` and ``loss_scale`` as keywords): ``ema`` (a decay, not None) starts
        ``ema_params`` as a copy of the params;
        ``loss_scale`` (``"dynamic"``, a number, a `jaxdl.precision.LossScale`) starts
        ``loss_scale`` at its initial scale. A model without ``init``/``apply``, an optimizer
        that is not a ``GradientTransformation`` (e.g. ``dl.adam`` not called), a bad key or an
        ``input_shape`` that is not a tuple of sizes >= 1 is refused by name before anything is
        built.

        Args:
          model: a jaxdl layer (``init``/``apply``).
          optimizer: an optax ``GradientTransformation``.
          key: a ``jax.random.key`` or an int seed.
          input_shape: the shape of one example (no batch axis).
          options: the steps' `StepOptions` (or ``ema`` and ``loss_scale`` as keywords).

        Returns:
          A `TrainState` at step 0.

        >>> import jax
        >>> import jaxdl as dl
        >>> state = TrainState.create(dl.layers.Dense(2), dl.sgd(0.1), jax.random.key(0), (3,))
        >>> int(state.step), state.params["w"].shape, state.input_shape
        (0, (3, 2), (3,))
        """
        owner = "TrainState.create"
        model = as_layer(owner, model)
        check_transform(owner, "optimizer", optimizer)
        key = as_key(owner, "key", key)
        input_shape = check_shape(owner, "input_shape", input_shape)
        if options is not None:
            resolve_options(owner, options, ema=ema, loss_scale=loss_scale)  # one way, not both
            ema, loss_scale = options.ema, options.loss_scale
        init_key, train_key = jax.random.split(key)
        _, params, model_state = model.init(init_key, input_shape)
        scaler = get_loss_scale(loss_scale, "TrainState.create")
        return cls(
            step=jnp.zeros([], jnp.int32),
            params=params,
            model_state=model_state,
            opt_state=optimizer.init(params),
            key=train_key,
            ema_params=None if ema is None or ema is False else jax.tree.map(jnp.copy, params),
            loss_scale=None if scaler is None else scaler.init(),
            input_shape=input_shape,
        )


@dataclasses.dataclass(frozen=True)
class SupervisedLoss:
    """``loss_fn(params, model_state, (x, y), key, train=True) -> (loss, (model_state, aux))``
    for a model of the layer protocol; ``aux`` holds the values of ``metrics`` on the batch."""

    model: Any
    loss: Callable = softmax_cross_entropy
    metrics: tuple = ()

    def __call__(self, params, model_state, batch, key=None, train=True):
        check_pair("supervised_loss", "batch", batch)  # at trace time: free under jit
        x, y = batch
        out, model_state = self.model.apply(params, model_state, x, train=train, key=key)
        loss = self.loss(out, y)  # first, so that a bad label speaks through the loss's check
        aux = {name: fn(out, y) for name, fn in self.metrics}
        return loss, (model_state, aux)


def supervised_loss(
    model, loss: Callable = softmax_cross_entropy, metrics: dict | None = None
) -> SupervisedLoss:
    """Turn ``model`` into the general loss function of the train step; batch = ``(x, y)``.

    ``metrics`` maps names to ``fn(outputs, y)``; by default ``{"accuracy": accuracy}`` when
    ``loss`` is `softmax_cross_entropy`, else none.

    Args:
      model: a jaxdl layer.
      loss: ``loss(outputs, y) -> scalar`` (default `jaxdl.losses.softmax_cross_entropy`).
      metrics: name -> ``fn(outputs, y)``.

    Returns:
      A `SupervisedLoss` (hashable: a step built from it compiles once).

    >>> import jax, jax.numpy as jnp
    >>> import jaxdl as dl
    >>> model = dl.layers.Dense(2, w_init=dl.init.zeros)
    >>> params = model.init(jax.random.key(0), (3,))[1]
    >>> batch = (jnp.ones((4, 3)), jnp.zeros(4, int))
    >>> loss, (state, aux) = supervised_loss(model)(params, {}, batch, None)
    >>> round(float(loss), 4), sorted(aux)  # ln 2: zero weights give equal probabilities
    (0.6931, ['accuracy'])
    """
    model = as_layer("supervised_loss", model)
    if metrics is None:
        metrics = {"accuracy": accuracy} if loss is softmax_cross_entropy else {}
    return SupervisedLoss(model, loss, tuple(sorted(metrics.items())))


def remat_loss(owner: str, loss_fn, remat: bool = True):
    """``loss_fn`` whose model recomputes each top-level layer's activations in the backward pass.

    Gradient checkpointing: a loss with a ``model`` field (`supervised_loss`) gets its
    `jaxdl.layers.Sequential` model with ``remat=True`` (`jaxdl.layers.remat_layers`: each
    layer with its activation and Dropout under `jax.checkpoint`); a loss wrapping another in
    ``inner`` is changed inside. The params' tree and the numbers stay the same.
    ``remat=False`` returns ``loss_fn``. The steps' ``remat=True`` (`StepOptions`) calls this.

    Args:
      owner: the caller, named in errors.
      loss_fn: the loss of the train step.
      remat: whether to rematerialize.

    Returns:
      The loss to differentiate. A loss without a Sequential model is a ValueError.

    Source: Chen et al. 2016.
    """
    if not isinstance(remat, (bool, np.bool_)):
        raise TypeError(f"{owner}: remat must be a bool, got {remat!r}")
    if not remat:
        return loss_fn
    if dataclasses.is_dataclass(loss_fn) and any(f.name == "model" for f in dataclasses.fields(loss_fn)):
        return dataclasses.replace(loss_fn, model=remat_layers(owner, loss_fn.model))
    if hasattr(loss_fn, "_replace") and hasattr(loss_fn, "inner"):
        return loss_fn._replace(inner=remat_loss(owner, loss_fn.inner))
    raise ValueError(
        f"{owner}: remat=True needs a loss with a Sequential model (supervised_loss(model)), got "
        f"{loss_fn!r}; in a loss of your own, wrap blocks of the model in jaxdl.layers.Remat"
    )


def accepts_train(loss_fn) -> bool:
    """Whether ``loss_fn`` takes a ``train=`` keyword (then the steps call it with ``train=True``
    and `make_eval_step` with ``train=False``); False when its signature cannot be read.

    Args:
      loss_fn: a loss function.

    Returns:
      A bool.
    """
    try:
        return "train" in inspect.signature(loss_fn).parameters
    except (TypeError, ValueError):
        return False


def check_batch(state: TrainState, batch) -> None:
    """Trace-time check that a batch fits the model the state was built for.

    For a batch ``(x, ...)`` and a state with ``input_shape``: ``x.shape[1:]`` must equal
    ``state.input_shape``, else a ValueError gives both shapes. Other batches pass unchecked.

    Args:
      state: a `TrainState`.
      batch: the step's batch.
    """
    x = batch[0] if isinstance(batch, (tuple, list)) else None
    if x is None or not state.input_shape:
        return
    if tuple(x.shape[1:]) != tuple(state.input_shape):
        raise ValueError(
            f"batch x has shape {tuple(x.shape)}, i.e. examples of shape {tuple(x.shape[1:])}, but "
            f"the model was built for input_shape {tuple(state.input_shape)} (batch axis first)"
        )


def check_state(state: TrainState, loss_fn, optimizer) -> None:
    """Trace-time check that ``state`` was built for this model and optimizer.

    Compares (by `jax.eval_shape`, nothing runs) ``state.params`` and ``state.model_state`` with
    what ``loss_fn.model.init`` builds (when the loss has a ``model``), and ``state.opt_state``
    with ``optimizer.init(state.params)``; a mismatch is a ValueError naming the first differing
    path.

    Args:
      state: a `TrainState`.
      loss_fn: the step's loss.
      optimizer: the step's optimizer.
    """
    model = getattr(loss_fn, "model", None)
    if model is not None and state.input_shape:
        _, params, model_state = jax.eval_shape(lambda: model.init(jax.random.key(0), state.input_shape))
        hint = "The state was built for another model: build it with TrainState.create(model, ...)."
        check_tree_match("train step", params, state.params, "state.params (against the model)", hint)
        check_tree_match(
            "train step", model_state, state.model_state, "state.model_state (against the model)", hint
        )
    expected = jax.eval_shape(optimizer.init, state.params)
    hint = "The state was built for another optimizer: build it with the optimizer given to this step."
    check_tree_match("train step", expected, state.opt_state, "state.opt_state (against the optimizer)", hint)


_OPTION_DEFAULTS = {
    "skip_nonfinite": True,
    "donate": False,
    "precision": None,
    "micro_batches": 1,
    "loss_scale": None,
    "ema": None,
    "remat": False,
}


def _check_options(owner: str, values: dict) -> dict:
    """The seven step options checked and normalized (a `Policy` or None, an int, a `LossScale` or
    None); the error names ``owner``, the argument and the value."""
    for name in ("skip_nonfinite", "donate", "remat"):
        if not isinstance(values[name], (bool, np.bool_)):
            raise TypeError(f"{owner}: {name} must be True or False, got {values[name]!r}")
    ema = values["ema"]
    if ema is not None:
        if isinstance(ema, bool):
            raise TypeError(f"{owner}: ema must be a decay in [0, 1) or None, got {ema!r}")
        check_number(owner, "ema", ema, low=0, high=1, high_open=True)
    return {
        "skip_nonfinite": bool(values["skip_nonfinite"]),
        "donate": bool(values["donate"]),
        "precision": get_policy(values["precision"], owner),
        "micro_batches": check_positive_int(owner, "micro_batches", values["micro_batches"]),
        "loss_scale": get_loss_scale(values["loss_scale"], owner),
        "ema": ema,
        "remat": bool(values["remat"]),
    }


@dataclasses.dataclass(frozen=True)
class StepOptions:
    """The seven options of every train step and loop, as one frozen object checked once.

    Every step builder (`make_train_step`, `make_train_loop`, the data-parallel steps of
    `jaxdl.parallel`, `jaxdl.sweep.sweep`) and `TrainState.create` take ``options=StepOptions(...)``;
    their keywords of the same names are sugar for it. Off by default, and then the step is the
    plain float32 program (module docstring):

    - ``skip_nonfinite``: a step whose loss, gradient norm or update norm is NaN/Inf keeps the
      params, model state and optimizer state (only ``step`` advances);
    - ``donate``: let XLA reuse the old state's buffers (the caller gives up the state it passes);
    - ``precision``: ``"bf16"``, ``"fp16"``, ``"fp32"`` or a `jaxdl.precision.Policy`, stored as
      the `Policy` (None for float32; Micikevicius et al. 2018);
    - ``micro_batches``: K >= 1, gradient accumulation over K micro-batches (`accumulate_gradients`);
    - ``loss_scale``: ``"dynamic"``, a number > 0 or a `jaxdl.precision.LossScale`, stored as the
      `LossScale`;
    - ``ema``: an EMA decay in [0, 1) (Polyak & Juditsky 1992), or None; it may be traced, so that
      a vmapped sweep over decays compiles once;
    - ``remat``: gradient checkpointing (Chen et al. 2016): the loss's `jaxdl.layers.Sequential`
      model recomputes each layer's activations in the backward pass (`remat_loss`); the same
      numbers, less memory, one more forward pass.

    A bad value is refused at construction, naming the argument (``StepOptions: micro_batches=0
    is out of range ...``). ``policy`` is ``precision`` under the name the step bodies read;
    ``replace(**changes)`` returns a checked copy.

    >>> StepOptions(micro_batches=2).micro_batches
    2
    """

    skip_nonfinite: bool = True
    donate: bool = False
    precision: Any = None
    micro_batches: int = 1
    loss_scale: Any = None
    ema: Any = None
    remat: bool = False

    def __post_init__(self):
        values = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        for name, value in _check_options("StepOptions", values).items():
            object.__setattr__(self, name, value)

    @property
    def policy(self) -> Policy | None:
        """The precision `Policy` (None: float32)."""
        return self.precision

    @property
    def plain(self) -> bool:
        """True when no option changes the math of the float32 step (precision, micro-batches,
        loss scale and EMA all off)."""
        return (
            self.precision is None
            and self.micro_batches == 1
            and self.loss_scale is None
            and self.ema is None
        )

    def replace(self, **changes) -> "StepOptions":
        """A copy with ``changes``, checked as a new `StepOptions`."""
        return dataclasses.replace(self, **changes)


def resolve_options(owner: str, options: StepOptions | None = None, **keywords) -> StepOptions:
    """The `StepOptions` of a builder called with ``options=`` or with the option keywords (sugar).

    ``keywords``: the builder's option keywords as given (any of the seven names); with
    ``options`` they must all be at their defaults, else a TypeError names them (one way per
    call). Without ``options`` they are checked here, the errors naming ``owner``.

    Args:
      owner: the builder's name, for the error messages.
      options: a `StepOptions`, or None.
      **keywords: the builder's option keywords.

    Returns:
      A `StepOptions`.
    """
    unknown = sorted(set(keywords) - set(_OPTION_DEFAULTS))
    if unknown:
        raise TypeError(f"{owner}: unknown step option {unknown[0]!r}")
    if options is None:
        return StepOptions(**_check_options(owner, {**_OPTION_DEFAULTS, **keywords}))
    if not isinstance(options, StepOptions):
        raise TypeError(f"{owner}: options must be a jaxdl.StepOptions or None, got {type(options).__name__}")
    given = [name for name, value in keywords.items() if value is not _OPTION_DEFAULTS[name]]
    if given:
        raise TypeError(
            f"{owner}: pass the step options either as options= or as keywords, not both "
            f"(got options= and {', '.join(f'{n}={keywords[n]!r}' for n in given)})"
        )
    return options


def step_options(owner: str, precision=None, micro_batches: int = 1, loss_scale=None, ema=None):
    """Check the options that change the step's math and bundle them in a `StepOptions`; None
    when every one is off (then the step is the plain float32 program, with no extra state or ops).

    Refused here, naming the argument: an unknown ``precision``, ``micro_batches`` not an int
    >= 1, a ``loss_scale`` other than None/"dynamic"/a number > 0, ``ema`` outside [0, 1).

    Args:
      owner: the caller's name, for the error messages.
      precision, micro_batches, loss_scale, ema: as in `make_train_step`.

    Returns:
      A `StepOptions`, or None.
    """
    options = resolve_options(
        owner, precision=precision, micro_batches=micro_batches, loss_scale=loss_scale, ema=ema
    )
    return None if options.plain else options


def _math_options(options: StepOptions | None) -> StepOptions | None:
    """``options`` for a step body: None when they leave the float32 step as it is."""
    return None if options is None or options.plain else options


def _check_options_state(state, options) -> None:
    """Trace-time: the state carries exactly the optional leaves the step updates."""
    want_ema = options is not None and options.ema is not None
    want_scale = options is not None and options.loss_scale is not None
    if want_ema and state.ema_params is None:
        raise ValueError(
            "train step: ema= is set but state.ema_params is None; build the state with "
            "TrainState.create(..., ema=decay)"
        )
    if not want_ema and state.ema_params is not None:
        raise ValueError(
            "train step: the state has ema_params but the step was built without ema=; "
            "pass the same ema= to the step, or drop them (state.replace(ema_params=None))"
        )
    if want_scale and state.loss_scale is None:
        raise ValueError(
            "train step: loss_scale= is set but state.loss_scale is None; build the state "
            "with TrainState.create(..., loss_scale=...)"
        )
    if not want_scale and state.loss_scale is not None:
        raise ValueError(
            "train step: the state has a loss_scale but the step was built without "
            "loss_scale=; pass the same loss_scale= to the step"
        )


def accumulate_gradients(
    loss_fn, params, model_state, batch, key, micro_batches: int = 1, scale=None, kwargs=None
):
    """``((loss, (model_state', aux)), g)``: the gradient of the mean loss over K micro-batches.

    The batch (every leaf, along its first axis) is cut into K equal micro-batches b_k, and

    .. math:: g = \\frac{1}{K} \\sum_{k=1}^{K} \\nabla L(b_k), \\qquad
              \\text{loss} = \\frac{1}{K} \\sum_k L(b_k)

    summed in float32 in a `lax.scan`, so the activations held are those of one micro-batch. For
    a loss that is a mean over examples this is the gradient of the whole batch (the single
    step's), but the model state is threaded through the micro-batches in order: BatchNorm
    normalizes each micro-batch with its own statistics and updates its running statistics K
    times, once per micro-batch (as PyTorch under accumulation). Micro-batch k's key is
    ``fold_in(key, k)`` (K = 1: ``key`` itself). ``scale`` (a loss scale S): differentiate
    ``S * L`` and divide the gradient by S (Micikevicius et al. 2018). ``aux`` is the mean over
    micro-batches. A batch whose size K does not divide is a ValueError.

    Args:
      loss_fn: the step's loss.
      params, model_state, batch, key: its arguments.
      micro_batches: K, which must divide the batch.
      scale: the loss scale S (None: none).
      kwargs: a dict of keywords passed on to ``loss_fn`` (e.g. ``{"train": True}``).

    Returns:
      ``((loss, (model_state', aux)), g)``, as ``jax.value_and_grad(..., has_aux=True)``.
    """
    kwargs = kwargs or {}

    def value_and_grad(model_state, b, k):
        def scaled(p):
            loss, (ms, aux) = loss_fn(p, model_state, b, k, **kwargs)
            return (loss if scale is None else loss * scale.astype(loss.dtype)), (loss, ms, aux)

        (_, (loss, ms, aux)), g = jax.value_and_grad(scaled, has_aux=True)(params)
        return loss, ms, aux, g

    if micro_batches == 1:
        loss, model_state, aux, grads = value_and_grad(model_state, batch, key)
    else:
        k_ = micro_batches
        for path, x in jax.tree_util.tree_flatten_with_path(batch)[0]:
            if np.ndim(x) == 0 or np.shape(x)[0] % k_:
                raise ValueError(
                    f"train step: batch leaf {jax.tree_util.keystr(path) or '<root>'} has shape "
                    f"{np.shape(x)}; micro_batches={k_} needs a leading batch axis divisible by {k_}"
                )
        split = jax.tree.map(lambda x: x.reshape(k_, x.shape[0] // k_, *x.shape[1:]), batch)

        def body(carry, xs):
            total, ms = carry
            i, b = xs
            loss, ms, aux, g = value_and_grad(ms, b, jax.random.fold_in(key, i))
            return (jax.tree.map(lambda t, x: t + x.astype(t.dtype), total, g), ms), (loss, aux)

        zeros = jax.tree.map(lambda p: jnp.zeros(p.shape, jnp.promote_types(p.dtype, jnp.float32)), params)
        (total, model_state), (losses, auxs) = jax.lax.scan(
            body, (zeros, model_state), (jnp.arange(k_), split)
        )
        grads = jax.tree.map(lambda t, p: (t / k_).astype(p.dtype), total, params)
        loss, aux = jnp.mean(losses), jax.tree.map(lambda a: jnp.mean(a, 0), auxs)
    if scale is not None:
        grads = jax.tree.map(lambda g: (g / scale).astype(g.dtype), grads)
    return (loss, (model_state, aux)), grads


def ema_update(ema_params, params, decay, count):
    """One step of the exponential moving average of the parameters, with warm-up.

    .. math:: \\bar\\theta_{t+1} = d_t \\bar\\theta_t + (1 - d_t)\\, \\theta_{t+1}, \\qquad
              d_t = \\min\\left(d, \\frac{1 + t}{10 + t}\\right)

    (Polyak & Juditsky 1992 average the iterates; the exponential form with this warm-up of the
    decay is TensorFlow's ``ExponentialMovingAverage(num_updates=t)``.) ``ema_params`` starts as a
    copy of the initial params (`TrainState.create`), so no bias correction is needed, and the
    warm-up keeps the first updates from weighing the random initialization for ~1/(1-d) steps.
    ``count`` = t is the step counter before the update (0 at the first). Differs from
    ``torch.optim.swa_utils.AveragedModel(multi_avg_fn=get_ema_multi_avg_fn(d))``, whose decay is
    d from the first update, and from ``optax.ema(debias=True)``, which starts at zero and divides
    by 1 - d^t. Leaves keep their dtype.

    Args:
      ema_params: the average so far.
      params: the new parameters.
      decay: ``d`` in [0, 1).
      count: ``t``, the steps taken.

    Returns:
      The new average, in the dtypes of ``ema_params``.

    Source: Polyak & Juditsky 1992.
    """
    t = jnp.asarray(count, jnp.float32)
    d = jnp.minimum(jnp.asarray(decay, jnp.float32), (1.0 + t) / (10.0 + t))
    return jax.tree.map(lambda e, p: (d * e + (1.0 - d) * p).astype(e.dtype), ema_params, params)


def _with_batch_statistics(model):
    """``model.with_batch_statistics()`` (the layer protocol's optional method: the model with
    every BatchNorm at momentum 0, so that its new state is the batch's statistics, and the
    count of them); ``(model, 0)`` for a model without the method."""
    method = getattr(model, "with_batch_statistics", None)
    return (model, 0) if method is None else method()


def recalibrate_batchnorm(model, params, model_state, batches, *, key=None):
    """BatchNorm running statistics recomputed for ``params`` (e.g. averaged weights) over ``batches``.

    The semantics of ``torch.optim.swa_utils.update_bn`` (Izmailov et al. 2018, "Averaging
    weights leads to wider optima and better generalization", sec. 3.2): run the model in
    training mode on each batch n = 1..N and set every BatchNorm's running mean and (unbiased)
    variance to the cumulative average of the batch statistics,

    .. math:: \\bar\\mu_n = \\bar\\mu_{n-1} + \\frac{1}{n}(\\mu_n - \\bar\\mu_{n-1}),
              \\quad\\text{i.e.}\\quad \\bar\\mu_N = \\frac{1}{N}\\sum_n \\mu_n

    (each batch weighs the same, whatever its size, as in PyTorch's ``momentum=None``). The
    average weights of an EMA or SWA have no running statistics of their own; those trained
    with the raw weights do not fit them. ``batches``: an iterable of ``x`` or ``(x, ...)``
    batches (a stacked array ``(N, B, ...)`` works). Dropout, if any, draws from ``key`` (default
    ``key(0)``) as in training, like ``update_bn`` in ``model.train()``. Returns the new model
    state; ``model_state`` gives its structure. A model without `jaxdl.layers.BatchNorm` is a
    ValueError (there is nothing to recalibrate).

    Args:
      model: the model.
      params: the parameters to compute the statistics for.
      model_state: the state holding the BatchNorm statistics.
      batches: an iterable of ``x`` or ``(x, ...)`` batches.
      key: the PRNG key for dropout (None: ``key(0)``).

    Returns:
      The new ``model_state``.

    Source: Izmailov et al. 2018.
    """
    zero, count = _with_batch_statistics(model)
    if count == 0:
        raise ValueError(f"recalibrate_batchnorm: the model has no jaxdl.layers.BatchNorm, got {model!r}")
    key = jax.random.key(0) if key is None else key

    @jax.jit
    def stats(x, k):
        return zero.apply(params, model_state, x, train=True, key=k)[1]

    average = None
    for i, batch in enumerate(batches):
        x = batch[0] if isinstance(batch, (tuple, list)) else batch
        new = stats(jnp.asarray(x), jax.random.fold_in(key, i))
        average = new if average is None else jax.tree.map(lambda a, b: a + (b - a) / (i + 1), average, new)
    if average is None:
        raise ValueError("recalibrate_batchnorm: batches is empty")
    return average


def step_body(
    loss_fn,
    optimizer,
    skip_nonfinite,
    state: TrainState,
    batch,
    key,
    reduce_grads=None,
    options: StepOptions | None = None,
):
    """One step of pure math: the body of the single-device, scan, pmap and sharded steps.

    With ``(loss, (model_state', aux)) = loss_fn(params, model_state, batch, key[, train=True])``
    and ``g = grad loss``: ``(u, opt_state') = optimizer.update(g, opt_state, params)``,
    ``params' = params + u``, ``step' = step + 1``. ``reduce_grads((loss, g, aux))``, when given,
    runs between the gradient and the update: the data-parallel steps average over devices there
    (``lax.pmean``). Returns ``(new_state, metrics)`` with ``loss``, ``grad_norm`` = ``|g|``,
    ``update_ratio`` = ``|u| / |params|`` (Sarkar, CS60010), ``nonfinite`` and ``aux``; with
    ``skip_nonfinite``, a step whose loss, ``|g|`` or ``|u|`` is NaN/Inf keeps params, model
    state and optimizer state (only ``step`` advances). ``options`` (`step_options`): the
    precision policy, micro-batches and loss scale act on the gradient (`accumulate_gradients`),
    the EMA and the loss scale's update follow the step (`_finish_options`); with a loss scale an
    overflowing step is always skipped. `scan_steps` runs it K times in a `lax.scan`.
    The skip's select costs no kernel of its own: the kept optimizer state is a second trace of
    the update (`_state_to_keep`), so XLA fuses it into the moments' update.

    Args:
      loss_fn, optimizer: as in `make_train_step`.
      skip_nonfinite: skip a step with a NaN/Inf.
      state: the `TrainState`.
      batch: the step's batch.
      key: the step's PRNG key (`step_key`).
      reduce_grads: ``(loss, g, aux) -> (loss, g, aux)``, e.g. a ``lax.pmean``.
      options: a `StepOptions`, or None.

    Returns:
      ``(new_state, metrics)``.
    """
    new_state, metrics, _ = step_body_with_norm(
        loss_fn, optimizer, skip_nonfinite, state, batch, key, None, reduce_grads, options
    )
    return new_state, metrics


def scan_steps(step, state: TrainState, batches):
    """``lax.scan`` of ``step(state, batch, param_norm) -> (state, metrics, param_norm')`` (a
    `step_body_with_norm` with its other arguments bound) over ``batches`` (K batches stacked on
    a leading axis): ``(state after K steps, metrics stacked per step)``.

    The parameter norm is carried: ``update_ratio``'s denominator at step t, the norm of the
    parameters before it, is the norm step t-1 computed after its update, so the old parameters
    need not outlive their in-place update. Only the first comes from the state the scan starts
    from. `make_train_loop` and the sharded loop both run it.

    Args:
      step: ``step(state, batch, param_norm) -> (state, metrics, param_norm')``.
      state: the `TrainState`.
      batches: K batches stacked on a leading axis.

    Returns:
      ``(state, metrics)``, the metrics stacked per step.
    """

    def body(carry, batch):
        state, metrics, param_norm = step(carry[0], batch, carry[1])
        return (state, param_norm), metrics

    (state, _), metrics = jax.lax.scan(body, (state, tree_norm(state.params)), batches)
    return state, metrics


def step_body_with_norm(
    loss_fn,
    optimizer,
    skip_nonfinite,
    state,
    batch,
    key,
    param_norm,
    reduce_grads=None,
    options=None,
    layer_metrics=None,
):
    """`step_body` for a loop that carries the parameter norm: ``(new_state, metrics, norm')``.

    ``param_norm`` is ``tree_norm(state.params)``, known from the step before. It is used as
    ``update_ratio``'s denominator, and ``norm'`` is the norm of the new params, computed after
    the update, for the next step. A norm of the old params taken after their in-place update
    would make XLA copy every parameter first. With ``param_norm=None`` the step computes it
    itself and ``norm'`` is None (that is `step_body`). `scan_steps` and the sharded loop carry it.
    ``layer_metrics(params, grads, updates) -> dict``, when given, sees the step's parameters
    before the update, its gradients (after ``reduce_grads``) and its updates; its entries join
    the metrics (`jaxdl.doctor` reads per-layer norms through it).

    Args:
      loss_fn, optimizer, skip_nonfinite, state, batch, key, reduce_grads, options: as in
        `step_body`.
      param_norm: ``tree_norm(state.params)``, or None.
      layer_metrics: ``(params, grads, updates) -> dict``, or None.

    Returns:
      ``(new_state, metrics, norm')``.
    """
    kwargs = {"train": True} if accepts_train(loss_fn) else {}
    options = _math_options(options)
    _check_options_state(state, options)
    if options is None:
        grad_fn = jax.value_and_grad(
            lambda p: loss_fn(p, state.model_state, batch, key, **kwargs), has_aux=True
        )
        (loss, (model_state, aux)), grads = grad_fn(state.params)
    else:
        scale = None if options.loss_scale is None else state.loss_scale.scale
        (loss, (model_state, aux)), grads = accumulate_gradients(
            with_policy(loss_fn, options.policy),
            state.params,
            state.model_state,
            batch,
            key,
            options.micro_batches,
            scale,
            kwargs,
        )
    if reduce_grads is not None:
        loss, grads, aux = reduce_grads((loss, grads, aux))
    updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
    # The norms reported as metrics double as the finiteness check: a norm is NaN/Inf exactly
    # when some element is (or when it overflows float32, a divergence all the same), so
    # skipping costs no extra pass over the gradients and updates.
    grad_norm, update_norm = tree_norm(grads), tree_norm(updates)
    carried = param_norm is not None
    finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm) & jnp.isfinite(update_norm)
    if not carried:
        param_norm = tree_norm(state.params)
        # Always true (a norm is >= 0 or NaN), but it makes the select that writes the new
        # params wait for the old params' norm: with donation, XLA otherwise copies every
        # parameter so the norm can read it after its in-place update.
        finite = finite & jnp.logical_not(param_norm < 0)
    params = apply_updates(state.params, updates)
    if skip_nonfinite or (options is not None and options.loss_scale is not None):
        params = select_tree(finite, params, state.params)
        model_state = select_tree(finite, model_state, state.model_state)
        opt_state = select_tree(finite, _state_to_keep(optimizer, grads, state, opt_state), state.opt_state)
    metrics = {
        "loss": loss,
        "grad_norm": grad_norm,
        "update_ratio": update_norm / jnp.maximum(param_norm, jnp.finfo(jnp.float32).tiny),
        "nonfinite": jnp.logical_not(finite).astype(jnp.int32),
        **aux,
    }
    if layer_metrics is not None:
        metrics.update(layer_metrics(state.params, grads, updates))
    new_state = state.replace(
        step=state.step + 1, params=params, model_state=model_state, opt_state=opt_state
    )
    if options is not None:
        new_state, metrics = _finish_options(options, skip_nonfinite, state, new_state, finite, metrics)
    return new_state, metrics, tree_norm(new_state.params) if carried else None


def _state_to_keep(optimizer, grads, state: TrainState, opt_state):
    """The optimizer's new state for the skip's select: ``optimizer.update(g, opt_state, params)``
    traced a second time, on the same values passed through ``lax.optimization_barrier`` so XLA
    does not merge the two (the numbers are the same).

    Why: the select's predicate depends on ``|u|``, which is computed from the new
    moments, so XLA:CPU will not fuse the moments' update into the select (a producer of two
    inputs is fused only when it fuses "on all paths") and writes each moment twice: once
    updated, once selected, 4 extra passes per moment (figures in benchmarks/RESULTS.md). Traced again, the update feeding the select has the select as its only
    user and fuses into it, and the one feeding ``u`` fuses into ``u``'s kernel: one kernel per
    moment, as without the skip. Everything of the second trace that the state does not need
    (the update itself, e.g. sampled noise) is dead code, removed by XLA; a host callback in
    ``update`` (``jax.debug.print``) would run twice. An optimizer that names an ``axis_name``
    (`jaxdl.parallel.CrossDeviceTransformation`: its update runs collectives over that axis)
    keeps its one state: traced twice, its collectives would run twice.
    """
    if getattr(optimizer, "axis_name", None) is not None:  # its update runs collectives
        return opt_state
    grads, old_state, params = jax.lax.optimization_barrier((grads, state.opt_state, state.params))
    return optimizer.update(grads, old_state, params)[1]


def _finish_options(options: StepOptions, skip_nonfinite, state, new_state, finite, metrics):
    """The EMA update (kept on a skipped step) and the loss scale's update; reports ``loss_scale``
    (the scale this step used)."""
    if options.ema is not None:
        ema = ema_update(state.ema_params, new_state.params, options.ema, state.step)
        if skip_nonfinite or options.loss_scale is not None:
            ema = select_tree(finite, ema, state.ema_params)
        new_state = new_state.replace(ema_params=ema)
    if options.loss_scale is not None:
        metrics = {**metrics, "loss_scale": state.loss_scale.scale}
        new_state = new_state.replace(loss_scale=options.loss_scale.update(state.loss_scale, finite))
    return new_state, metrics


_SMALL_LEAF = 1 << 14


def tree_norm(tree) -> jax.Array:
    """``sqrt(sum over leaves of sum |x|^2)``, accumulated in float32 at least: the value of
    `jaxdl.transforms.global_norm`, in fewer kernels.

    Each leaf of more than 2^14 elements is one dot product ``x . x``; the smaller leaves are
    concatenated into one vector and take one dot product. On XLA:CPU a per-leaf ``sum(x * x)``
    is two or three kernels for a small leaf and a reduction about half as fast as the dot for
    a large one; the train step takes three such norms per step. Complex trees go to
    `global_norm` (``|x|^2 = x conj(x)``). Only the rounding differs from `global_norm`.

    Args:
      tree: a pytree of arrays.

    Returns:
      The scalar norm, float32 or wider.
    """
    leaves = jax.tree.leaves(tree)
    if not leaves:
        return jnp.zeros([], jnp.float32)
    if any(jnp.iscomplexobj(x) for x in leaves):
        return global_norm(tree)
    flat = [jnp.ravel(x).astype(jnp.promote_types(x.dtype, jnp.float32)) for x in leaves]
    small = [x for x in flat if x.size <= _SMALL_LEAF]
    large = [x for x in flat if x.size > _SMALL_LEAF]
    if small:
        large.append(jnp.concatenate(small) if len(small) > 1 else small[0])
    highest = jax.lax.Precision.HIGHEST  # no reduced-precision passes on TPU/GPU
    return jnp.sqrt(sum(jnp.dot(x, x, precision=highest) for x in large))


def step_key(state: TrainState) -> jax.Array:
    """The PRNG key of the step ``state.step``: ``fold_in(state.key, state.step)``.

    A fresh key every step (dropout masks and noise never repeat), derived from the state's key
    and the step counter, so the state's key itself never changes. It is a counter-based split:
    XLA drops it entirely when the loss draws no random numbers, where splitting and carrying a
    new key would cost a hash every step.

    Args:
      state: a `TrainState`.

    Returns:
      The step's PRNG key.
    """
    return jax.random.fold_in(state.key, state.step)


def make_train_step(
    loss_fn: LossFn,
    optimizer: optax.GradientTransformation,
    *,
    options: StepOptions | None = None,
    skip_nonfinite: bool = True,
    donate: bool = False,
    precision=None,
    micro_batches: int = 1,
    loss_scale=None,
    ema=None,
    remat: bool = False,
) -> Callable[[TrainState, Batch], tuple[TrainState, dict]]:
    """A jit-compiled ``step(state, batch) -> (state, metrics)``.

    ``metrics``: ``loss``, ``grad_norm`` (of the raw gradients), ``update_ratio`` (norm of the
    update over norm of the params, the ~1e-3 rule of Sarkar, CS60010), ``nonfinite`` (1 when the step was
    skipped for a NaN/Inf; ``skip_nonfinite=False`` applies such steps anyway) and what the loss
    returns in ``aux``. The step compiles once per batch shape; schedules run on the traced step
    count and never recompile. ``donate=True`` lets XLA reuse the old state's buffers. A step is
    ``theta <- theta + optimizer.update(grad_theta L(theta; batch))``.

    Options: ``options=StepOptions(...)`` (build the state with ``TrainState.create(...,
    options=options)``), or its seven keywords as sugar (module docstring): ``skip_nonfinite``,
    ``donate``, ``precision`` (``"bf16"``, ``"fp16"``, a `Policy`), ``micro_batches`` (gradient
    accumulation over K micro-batches), ``loss_scale`` (``"dynamic"`` or a number; reports
    ``loss_scale``), ``ema`` (a decay in [0, 1)), ``remat`` (recompute each layer's
    activations in the backward pass; the loss's model must be a `jaxdl.layers.Sequential`,
    `remat_loss`).

    Args:
      loss_fn: ``loss_fn(params, model_state, batch, key, train=True) -> (loss, (model_state,
        aux))``, e.g. `supervised_loss` (the contract is `jaxdl.fit`'s).
      optimizer: an optax ``GradientTransformation``.
      options: a `StepOptions`, or its keywords.

    Returns:
      The jitted ``step(state, batch) -> (state, metrics)``.

    >>> import jax, jax.numpy as jnp
    >>> import jaxdl as dl
    >>> model = dl.layers.Dense(2)
    >>> state = TrainState.create(model, dl.sgd(0.1), jax.random.key(0), (3,))
    >>> step = make_train_step(supervised_loss(model), dl.sgd(0.1))
    >>> state, metrics = step(state, (jnp.ones((4, 3)), jnp.array([0, 1, 0, 1])))
    >>> int(state.step), sorted(metrics)
    (1, ['accuracy', 'grad_norm', 'loss', 'nonfinite', 'update_ratio'])
    """
    check_transform("make_train_step", "optimizer", optimizer)
    options = resolve_options(
        "make_train_step",
        options,
        skip_nonfinite=skip_nonfinite,
        donate=donate,
        precision=precision,
        micro_batches=micro_batches,
        loss_scale=loss_scale,
        ema=ema,
        remat=remat,
    )
    loss_fn = remat_loss("make_train_step", loss_fn, options.remat)

    def step(state: TrainState, batch):
        check_batch(state, batch)
        check_state(state, loss_fn, optimizer)
        key = step_key(state)
        return step_body(loss_fn, optimizer, options.skip_nonfinite, state, batch, key, options=options)

    donate_argnums = (0,) if options.donate else ()
    return explain_batch_errors("train step", "batch", jax.jit(step, donate_argnums=donate_argnums))


def make_eval_step(
    loss_fn: LossFn, *, use_ema: bool = False, precision=None
) -> Callable[[TrainState, Batch], dict]:
    """A jit-compiled ``evaluate(state, batch) -> metrics`` in eval mode.

    Eval mode: running statistics instead of batch statistics, no dropout (``train=False`` and no
    key). The state is never changed. ``metrics`` holds ``loss`` and the loss's ``aux``.
    ``use_ema=True`` evaluates ``state.ema_params`` (the moving average) instead of
    ``state.params``, with the same running statistics (those of the raw weights; see
    `jaxdl.recalibrate_batchnorm` for BatchNorm); ``precision`` runs the model as the train
    step's policy does.

    Args:
      loss_fn: the loss (it must accept ``train=``).
      use_ema: evaluate ``state.ema_params``.
      precision: the policy to run the model under.

    Returns:
      The jitted ``evaluate(state, batch) -> metrics``.
    """
    if not accepts_train(loss_fn):
        raise TypeError("make_eval_step: loss_fn must accept a train= keyword to run in eval mode")
    if not isinstance(use_ema, bool):
        raise TypeError(f"make_eval_step: use_ema must be a bool, got {use_ema!r}")
    policy = get_policy(precision, "make_eval_step")
    run = with_policy(loss_fn, policy)

    @jax.jit
    def evaluate(state: TrainState, batch):
        check_batch(state, batch)
        if use_ema and state.ema_params is None:
            raise ValueError(
                "make_eval_step: use_ema=True, but state.ema_params is None; train with "
                "ema= and TrainState.create(..., ema=decay)"
            )
        params = state.ema_params if use_ema else state.params
        loss, (_, aux) = run(params, state.model_state, batch, None, train=False)
        return {"loss": loss, **aux}

    return explain_batch_errors("eval step", "batch", evaluate)


def make_train_loop(
    loss_fn: LossFn,
    optimizer: optax.GradientTransformation,
    *,
    options: StepOptions | None = None,
    skip_nonfinite: bool = True,
    donate: bool = False,
    precision=None,
    micro_batches: int = 1,
    loss_scale=None,
    ema=None,
    remat: bool = False,
) -> Callable[[TrainState, Batch], tuple[TrainState, dict]]:
    """A jit-compiled ``loop(state, batches) -> (state, metrics)`` fusing K steps in one `lax.scan`.

    ``batches`` stacks K batches along a new leading axis; the metrics come back stacked per step.
    Each iteration is exactly `make_train_step`'s step (with the same options: ``precision``,
    ``micro_batches``, ``loss_scale``, ``ema``), so K loop iterations end in the same state as K
    single steps, with one dispatch instead of K (`scan_steps`; ``update_ratio``'s parameter norm
    is carried from one iteration to the next, so it equals the single steps' to rounding).
    ``donate=True`` lets XLA reuse the old state's buffers (what `jaxdl.fit` does: it owns the
    state). ``options=StepOptions(...)`` or its keywords, as in `make_train_step`. What each
    metric and the skip cost per step: docs/design.md.

    Args:
      loss_fn, optimizer, options: as in `make_train_step`.

    Returns:
      The jitted ``loop(state, batches) -> (state, metrics)``, metrics stacked per step.

    >>> import jax, jax.numpy as jnp
    >>> import jaxdl as dl
    >>> model = dl.layers.Dense(2)
    >>> state = TrainState.create(model, dl.sgd(0.1), jax.random.key(0), (3,))
    >>> loop = make_train_loop(supervised_loss(model), dl.sgd(0.1))
    >>> batches = (jnp.ones((5, 4, 3)), jnp.zeros((5, 4), jnp.int32))  # K = 5 batches of 4
    >>> state, metrics = loop(state, batches)
    >>> int(state.step), metrics["loss"].shape
    (5, (5,))
    """
    check_transform("make_train_loop", "optimizer", optimizer)
    options = resolve_options(
        "make_train_loop",
        options,
        skip_nonfinite=skip_nonfinite,
        donate=donate,
        precision=precision,
        micro_batches=micro_batches,
        loss_scale=loss_scale,
        ema=ema,
        remat=remat,
    )
    loss_fn = remat_loss("make_train_loop", loss_fn, options.remat)
    skip = options.skip_nonfinite

    def loop(state: TrainState, batches):
        check_batch(state, jax.tree.map(lambda b: b[0], batches))
        check_state(state, loss_fn, optimizer)

        def step(state, batch, param_norm):
            return step_body_with_norm(
                loss_fn, optimizer, skip, state, batch, step_key(state), param_norm, options=options
            )

        return scan_steps(step, state, batches)

    donate_argnums = (0,) if options.donate else ()
    return explain_batch_errors("train loop", "batches", jax.jit(loop, donate_argnums=donate_argnums))
