"""Jit-compiled training: `TrainState`, train/eval steps, scan-fused loops.

One training step (DESIGN.md):

    batch -> loss_fn(params, model_state, batch, key) -> (loss, (model_state, aux))
          -> jax.value_and_grad -> grads -> [mean across devices] -> optimizer.update
          -> apply_updates -> new TrainState, metrics

Everything the step needs is in its arguments: the `TrainState` (a pytree) and the batch. The PRNG
key of step t is ``fold_in(state.key, t)`` (`step_key`), so dropout masks never repeat. A step
whose loss, gradients or updates hold a NaN or Inf leaves params, model state and optimizer
state as they were (seed 004: divergence is worse than a lost step) and reports ``nonfinite = 1``; the check
is on the loss and the norms of the gradients and updates, so a norm beyond float32's range
(about 1.8e38) counts as non-finite too.

The data-parallel steps (`jaxdl.parallel.steps`: pmap, shard_map, and a scan-fused sharded loop)
are built from the same pieces, which are public for that reason: `step_body` (the math of one
step, the one body every step runs), `step_key`, `check_batch`, `check_state` and
`accepts_train`. This module does not import `jaxdl.parallel`; `make_pmap_train_step` and
`make_sharded_train_step` are still reachable here, loaded from there on first use.
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

from jaxdl._checks import check_tree_match
from jaxdl._tree import select as select_tree
from jaxdl.losses import accuracy, softmax_cross_entropy
from jaxdl.optimizers import apply_updates
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
    "check_batch",
    "check_state",
    "accepts_train",
]

Batch = Any
LossFn = Callable[..., tuple[jax.Array, tuple[Any, dict]]]


class TrainState(struct.PyTreeNode):
    """Everything that changes during training, as one pytree.

    ``step`` counts the batches seen (int32), ``params`` and ``model_state`` (e.g. BatchNorm's
    running statistics) are the model's, ``opt_state`` the optimizer's, ``key`` the PRNG key from
    which step t draws ``fold_in(key, t)``. ``input_shape`` (one example, no batch axis) is static metadata used to
    check batches; it is not a leaf.
    """

    step: jax.Array
    params: Any
    model_state: Any
    opt_state: Any
    key: jax.Array
    input_shape: tuple = struct.field(pytree_node=False, default=())

    @classmethod
    def create(cls, model, optimizer: optax.GradientTransformation, key: jax.Array, input_shape) -> "TrainState":
        """Initialize ``model`` for ``input_shape`` (one example) and ``optimizer`` for its params.

        ``key`` is split in two: one half initializes the model, the other seeds training.
        """
        if isinstance(key, int):
            key = jax.random.key(key)
        init_key, train_key = jax.random.split(key)
        input_shape = tuple(int(d) for d in input_shape)
        _, params, model_state = model.init(init_key, input_shape)
        return cls(
            step=jnp.zeros([], jnp.int32),
            params=params,
            model_state=model_state,
            opt_state=optimizer.init(params),
            key=train_key,
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
        x, y = batch
        out, model_state = self.model.apply(params, model_state, x, train=train, key=key)
        aux = {name: fn(out, y) for name, fn in self.metrics}
        return self.loss(out, y), (model_state, aux)


def supervised_loss(model, loss: Callable = softmax_cross_entropy, metrics: dict | None = None) -> SupervisedLoss:
    """Turn ``model`` into the general loss function of the train step; batch = ``(x, y)``.

    ``metrics`` maps names to ``fn(outputs, y)``; by default ``{"accuracy": accuracy}`` when
    ``loss`` is `softmax_cross_entropy`, else none.
    """
    if not callable(getattr(model, "apply", None)):
        raise TypeError(f"supervised_loss: model must have init/apply, got {model!r}")
    if metrics is None:
        metrics = {"accuracy": accuracy} if loss is softmax_cross_entropy else {}
    return SupervisedLoss(model, loss, tuple(sorted(metrics.items())))


def check_labels(labels, num_classes: int) -> None:
    """Raise ValueError if any integer label lies outside ``[0, num_classes)``.

    Runs on the host, outside jit. Inside jit label values cannot be checked: an out-of-range
    label makes `softmax_cross_entropy` gather outside the logits, which gives a NaN loss, so the
    train step skips that step and reports it as ``nonfinite``.
    """
    labels = np.asarray(labels)
    if labels.size and (labels.min() < 0 or labels.max() >= num_classes):
        bad = labels[(labels < 0) | (labels >= num_classes)]
        raise ValueError(
            f"labels must lie in [0, {num_classes}) for {num_classes} classes; got {bad.size} "
            f"out of range, e.g. {bad.ravel()[:5].tolist()}"
        )


def accepts_train(loss_fn) -> bool:
    """Whether ``loss_fn`` takes a ``train=`` keyword (then the steps call it with ``train=True``
    and `make_eval_step` with ``train=False``); False when its signature cannot be read."""
    try:
        return "train" in inspect.signature(loss_fn).parameters
    except (TypeError, ValueError):
        return False


def check_batch(state: TrainState, batch) -> None:
    """Trace-time check that a batch fits the model the state was built for.

    For a batch ``(x, ...)`` and a state with ``input_shape``: ``x.shape[1:]`` must equal
    ``state.input_shape``, else a ValueError gives both shapes. Other batches pass unchecked.
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
    """
    model = getattr(loss_fn, "model", None)
    if model is not None and state.input_shape:
        _, params, model_state = jax.eval_shape(lambda: model.init(jax.random.key(0), state.input_shape))
        hint = "The state was built for another model: build it with TrainState.create(model, ...)."
        check_tree_match("train step", params, state.params, "state.params (against the model)", hint)
        check_tree_match("train step", model_state, state.model_state, "state.model_state (against the model)", hint)
    expected = jax.eval_shape(optimizer.init, state.params)
    hint = "The state was built for another optimizer: build it with the optimizer given to this step."
    check_tree_match("train step", expected, state.opt_state, "state.opt_state (against the optimizer)", hint)


def step_body(loss_fn, optimizer, skip_nonfinite, state: TrainState, batch, key, reduce_grads=None):
    """One step of pure math: the body of the single-device, scan, pmap and sharded steps.

    With ``(loss, (model_state', aux)) = loss_fn(params, model_state, batch, key[, train=True])``
    and ``g = grad loss``: ``(u, opt_state') = optimizer.update(g, opt_state, params)``,
    ``params' = params + u``, ``step' = step + 1``. ``reduce_grads((loss, g, aux))``, when given,
    runs between the gradient and the update: the data-parallel steps average over devices there
    (``lax.pmean``). Returns ``(new_state, metrics)`` with ``loss``, ``grad_norm`` = ``|g|``,
    ``update_ratio`` = ``|u| / |params|`` (seed 004), ``nonfinite`` and ``aux``; with
    ``skip_nonfinite``, a step whose loss, ``|g|`` or ``|u|`` is NaN/Inf keeps params, model
    state and optimizer state (only ``step`` advances).
    """
    kwargs = {"train": True} if accepts_train(loss_fn) else {}
    grad_fn = jax.value_and_grad(lambda p: loss_fn(p, state.model_state, batch, key, **kwargs), has_aux=True)
    (loss, (model_state, aux)), grads = grad_fn(state.params)
    if reduce_grads is not None:
        loss, grads, aux = reduce_grads((loss, grads, aux))
    updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
    params = apply_updates(state.params, updates)
    # The norms reported as metrics double as the finiteness check: a norm is NaN/Inf exactly
    # when some element is (or when it overflows float32, a divergence all the same), so
    # skipping costs no extra pass over the gradients and updates.
    grad_norm, update_norm, param_norm = global_norm(grads), global_norm(updates), global_norm(state.params)
    finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm) & jnp.isfinite(update_norm)
    if skip_nonfinite:
        params = select_tree(finite, params, state.params)
        model_state = select_tree(finite, model_state, state.model_state)
        opt_state = select_tree(finite, opt_state, state.opt_state)
    metrics = {
        "loss": loss,
        "grad_norm": grad_norm,
        "update_ratio": update_norm / jnp.maximum(param_norm, jnp.finfo(jnp.float32).tiny),
        "nonfinite": jnp.logical_not(finite).astype(jnp.int32),
        **aux,
    }
    new_state = state.replace(step=state.step + 1, params=params, model_state=model_state, opt_state=opt_state)
    return new_state, metrics


def step_key(state: TrainState) -> jax.Array:
    """The PRNG key of the step ``state.step``: ``fold_in(state.key, state.step)``.

    A fresh key every step (dropout masks and noise never repeat), derived from the state's key
    and the step counter, so the state's key itself never changes. It is a counter-based split:
    XLA drops it entirely when the loss draws no random numbers, where splitting and carrying a
    new key would cost a hash every step.
    """
    return jax.random.fold_in(state.key, state.step)


def make_train_step(
    loss_fn: LossFn,
    optimizer: optax.GradientTransformation,
    *,
    skip_nonfinite: bool = True,
    donate: bool = False,
) -> Callable[[TrainState, Batch], tuple[TrainState, dict]]:
    """A jit-compiled ``step(state, batch) -> (state, metrics)``.

    ``metrics``: ``loss``, ``grad_norm`` (of the raw gradients), ``update_ratio`` (norm of the
    update over norm of the params, seed 004's ~1e-3 rule), ``nonfinite`` (1 when the step was
    skipped for a NaN/Inf; ``skip_nonfinite=False`` applies such steps anyway) and what the loss
    returns in ``aux``. The step compiles once per batch shape; schedules run on the traced step
    count and never recompile. ``donate=True`` lets XLA reuse the old state's buffers.
    """
    if not isinstance(optimizer, optax.GradientTransformation):
        raise TypeError(f"make_train_step: optimizer must be an optax.GradientTransformation, got {optimizer!r}")

    def step(state: TrainState, batch):
        check_batch(state, batch)
        check_state(state, loss_fn, optimizer)
        key = step_key(state)
        return step_body(loss_fn, optimizer, skip_nonfinite, state, batch, key)

    return jax.jit(step, donate_argnums=(0,) if donate else ())


def make_eval_step(loss_fn: LossFn) -> Callable[[TrainState, Batch], dict]:
    """A jit-compiled ``evaluate(state, batch) -> metrics`` in eval mode.

    Eval mode: running statistics instead of batch statistics, no dropout (``train=False`` and no
    key). The state is never changed. ``metrics`` holds ``loss`` and the loss's ``aux``.
    """
    if not accepts_train(loss_fn):
        raise TypeError("make_eval_step: loss_fn must accept a train= keyword to run in eval mode")

    @jax.jit
    def evaluate(state: TrainState, batch):
        check_batch(state, batch)
        loss, (_, aux) = loss_fn(state.params, state.model_state, batch, None, train=False)
        return {"loss": loss, **aux}

    return evaluate


def make_train_loop(
    loss_fn: LossFn, optimizer: optax.GradientTransformation, *, skip_nonfinite: bool = True
) -> Callable[[TrainState, Batch], tuple[TrainState, dict]]:
    """A jit-compiled ``loop(state, batches) -> (state, metrics)`` fusing K steps in one `lax.scan`.

    ``batches`` stacks K batches along a new leading axis; the metrics come back stacked per step.
    Each iteration is exactly `make_train_step`'s step, so K loop iterations end in the same state
    as K single steps, with one dispatch instead of K.
    """

    def body(state, batch):
        key = step_key(state)
        return step_body(loss_fn, optimizer, skip_nonfinite, state, batch, key)

    @jax.jit
    def loop(state: TrainState, batches):
        check_batch(state, jax.tree.map(lambda b: b[0], batches))
        check_state(state, loss_fn, optimizer)
        return jax.lax.scan(body, state, batches)

    return loop


def __getattr__(name):
    # The data-parallel steps moved to jaxdl.parallel.steps, which imports this module; loading
    # them on first use keeps `jaxdl.train_step.make_sharded_train_step` working without a cycle.
    if name in ("make_pmap_train_step", "make_sharded_train_step", "make_sharded_train_loop"):
        from jaxdl.parallel import steps

        return getattr(steps, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
