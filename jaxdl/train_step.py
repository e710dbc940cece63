"""Jit-compiled training: `TrainState`, train/eval steps, scan-fused loops, data-parallel steps.

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

from jaxdl import parallel
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
    "make_pmap_train_step",
    "make_sharded_train_step",
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


def _accepts_train(loss_fn) -> bool:
    try:
        return "train" in inspect.signature(loss_fn).parameters
    except (TypeError, ValueError):
        return False


def _check_batch(state: TrainState, batch) -> None:
    """Trace-time check that a batch fits the model the state was built for."""
    x = batch[0] if isinstance(batch, (tuple, list)) else None
    if x is None or not state.input_shape:
        return
    if tuple(x.shape[1:]) != tuple(state.input_shape):
        raise ValueError(
            f"batch x has shape {tuple(x.shape)}, i.e. examples of shape {tuple(x.shape[1:])}, but "
            f"the model was built for input_shape {tuple(state.input_shape)} (batch axis first)"
        )


def _check_state(state: TrainState, loss_fn, optimizer) -> None:
    """Trace-time check that ``state`` was built for this model and optimizer."""
    model = getattr(loss_fn, "model", None)
    if model is not None and state.input_shape:
        _, params, model_state = jax.eval_shape(lambda: model.init(jax.random.key(0), state.input_shape))
        hint = "The state was built for another model: build it with TrainState.create(model, ...)."
        check_tree_match("train step", params, state.params, "state.params (against the model)", hint)
        check_tree_match("train step", model_state, state.model_state, "state.model_state (against the model)", hint)
    expected = jax.eval_shape(optimizer.init, state.params)
    hint = "The state was built for another optimizer: build it with the optimizer given to this step."
    check_tree_match("train step", expected, state.opt_state, "state.opt_state (against the optimizer)", hint)


def _step_body(loss_fn, optimizer, skip_nonfinite, state: TrainState, batch, key, reduce_grads=None):
    """One step of pure math: shared by the single-device, scan, pmap and sharded steps."""
    kwargs = {"train": True} if _accepts_train(loss_fn) else {}
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
        _check_batch(state, batch)
        _check_state(state, loss_fn, optimizer)
        key = step_key(state)
        return _step_body(loss_fn, optimizer, skip_nonfinite, state, batch, key)

    return jax.jit(step, donate_argnums=(0,) if donate else ())


def make_eval_step(loss_fn: LossFn) -> Callable[[TrainState, Batch], dict]:
    """A jit-compiled ``evaluate(state, batch) -> metrics`` in eval mode.

    Eval mode: running statistics instead of batch statistics, no dropout (``train=False`` and no
    key). The state is never changed. ``metrics`` holds ``loss`` and the loss's ``aux``.
    """
    if not _accepts_train(loss_fn):
        raise TypeError("make_eval_step: loss_fn must accept a train= keyword to run in eval mode")

    @jax.jit
    def evaluate(state: TrainState, batch):
        _check_batch(state, batch)
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
        return _step_body(loss_fn, optimizer, skip_nonfinite, state, batch, key)

    @jax.jit
    def loop(state: TrainState, batches):
        _check_batch(state, jax.tree.map(lambda b: b[0], batches))
        _check_state(state, loss_fn, optimizer)
        return jax.lax.scan(body, state, batches)

    return loop


# ----------------------------------------------------------------------------- data parallel
#
# Both steps run the same per-device body: split the replicated key (identical on every device),
# fold the device index into the step key (different dropout masks per device), take the
# gradient of the local mean loss, and average loss, metrics and gradients over the data axis
# with lax.pmean -- unless the optimizer is a `parallel.CrossDeviceTransformation` (e.g.
# `parallel.onebit_allreduce`), which averages the local gradients itself. With equal shards the
# mean of the local mean-loss gradients is the gradient of the global mean loss, and BatchNorm
# with `axis_name` uses the global batch statistics, so D devices take the single-device step on
# the global batch (seed 001's data parallelism).


def _parallel_body(loss_fn, optimizer, skip_nonfinite, axis_name, state: TrainState, batch):
    _check_batch(state, batch)
    _check_state(state, loss_fn, optimizer)
    exchange = isinstance(optimizer, parallel.CrossDeviceTransformation)

    def mean(x):
        return jax.lax.pmean(x, axis_name) if jnp.issubdtype(x.dtype, jnp.inexact) else x

    def reduce_grads(args):
        loss, grads, aux = args
        return mean(loss), grads if exchange else jax.tree.map(mean, grads), jax.tree.map(mean, aux)

    key = step_key(state)
    key = jax.random.fold_in(key, jax.lax.axis_index(axis_name))
    state, metrics = _step_body(loss_fn, optimizer, skip_nonfinite, state, batch, key, reduce_grads)
    if exchange:  # each device saw its own local gradients
        metrics["grad_norm"] = mean(metrics["grad_norm"])
    return state, metrics


def _check_exchange_axis(owner: str, optimizer, axis_name) -> None:
    if not isinstance(optimizer, optax.GradientTransformation):
        raise TypeError(f"{owner}: optimizer must be an optax.GradientTransformation, got {optimizer!r}")
    if isinstance(optimizer, parallel.CrossDeviceTransformation) and optimizer.axis_name != axis_name:
        raise ValueError(f"{owner}: the optimizer exchanges gradients over axis_name="
                         f"{optimizer.axis_name!r}, but this step maps over {axis_name!r}")


def _avals(tree):
    return jax.tree.map(lambda x: jax.ShapeDtypeStruct(np.shape(x), x.dtype), tree)


def _check_synced_model_state(owner, loss_fn, mesh, axis_name, params, model_state, batch, key):
    """Refuse a model whose state would differ across devices (a BatchNorm without ``axis_name``).

    Traces (never runs) the loss under `jax.shard_map` with ``check_vma=True``, which proves
    statically whether each returned model-state leaf is the same on every device.
    """
    if not jax.tree.leaves(model_state):
        return
    kwargs = {"train": True} if _accepts_train(loss_fn) else {}

    def probe(params, model_state, batch, key):
        key = jax.random.fold_in(key, jax.lax.axis_index(axis_name))
        return loss_fn(params, model_state, batch, key, **kwargs)[1][0]

    spec = jax.sharding.PartitionSpec
    f = jax.shard_map(probe, mesh=mesh, in_specs=(spec(), spec(), spec(axis_name), spec()),
                      out_specs=jax.tree.map(lambda _: spec(), model_state), check_vma=True)
    why = (f"Give every BatchNorm axis_name={axis_name!r} (BatchNorm(axis_name={axis_name!r}); "
           f"flax: nn.BatchNorm(axis_name={axis_name!r})) so that it normalizes with the "
           f"statistics of the global batch.")
    try:
        jax.eval_shape(f, params, model_state, batch, key)
    except ValueError as err:
        if "replicat" not in str(err):
            raise
        raise ValueError(
            f"{owner}: the model state returned by the loss would differ across devices: each "
            f"device would normalize with its own shard's batch statistics and the running "
            f"statistics would silently diverge across replicas. {why}\n{err}") from None
    except (NameError, AssertionError) as err:
        raise ValueError(
            f"{owner}: tracing the loss over the data axis {axis_name!r} failed, most likely "
            f"because a layer (e.g. BatchNorm) reduces over another axis name. {why}") from err


def _check_leading_axis(owner: str, tree, n: int, what: str, hint: str) -> None:
    for path, x in jax.tree_util.tree_flatten_with_path(tree)[0]:
        shape = np.shape(x)
        if not shape or shape[0] != n:
            raise ValueError(
                f"{owner}: {what} leaf {jax.tree_util.keystr(path) or '<root>'} has shape {shape}, "
                f"but the pmap step needs a leading device axis of {n} on every {what} leaf. {hint}")


def make_pmap_train_step(
    loss_fn: LossFn,
    optimizer: optax.GradientTransformation,
    axis_name: str = "batch",
    *,
    devices=None,
    skip_nonfinite: bool = True,
) -> Callable[[TrainState, Batch], tuple[TrainState, dict]]:
    """A `jax.pmap` ``step(state, batch) -> (state, metrics)`` over the local devices.

    ``state`` is replicated (`parallel.replicate`: a leading device axis on every leaf) and
    ``batch`` split along a leading device axis (`parallel.shard_batch`). Each device takes the
    gradient of the mean loss on its shard; gradients, loss and metrics are averaged with
    ``lax.pmean(x, axis_name)``:

    .. math:: g = \\frac{1}{D}\\sum_d \\nabla \\bar L(B_d) = \\nabla \\bar L(B)
              \\quad (|B_d| = |B|/D)

    (seed 001's data parallelism), so the result equals `make_train_step` on the global batch
    when the model's `BatchNorm` layers have ``axis_name=axis_name`` (statistics of the global
    batch, identical running statistics on every device). A model whose state would differ
    across devices is refused at the first call. The state's key stays identical on all devices;
    the step key is ``fold_in(key, axis_index(axis_name))``, so dropout masks differ per device.
    With `parallel.onebit_allreduce` as optimizer, the one-bit exchange replaces the gradient
    pmean. ``devices``: None (all local devices), a count, or a list. Metrics come back with the
    leading device axis (equal values); ``step.lower(state, batch)`` gives the lowered program.
    `jax.pmap` is in maintenance mode since JAX 0.8: prefer `make_sharded_train_step`.
    """
    owner = "make_pmap_train_step"
    _check_exchange_axis(owner, optimizer, axis_name)
    devs = parallel._pick_devices(owner, devices, jax.local_devices())
    n = len(devs)
    mesh = jax.sharding.Mesh(np.array(devs), (axis_name,))
    pstep = jax.pmap(
        lambda state, batch: _parallel_body(loss_fn, optimizer, skip_nonfinite, axis_name, state, batch),
        axis_name=axis_name, devices=devs)
    checked = set()

    def step(state: TrainState, batch):
        _check_leading_axis(owner, state, n, "state",
                            f"Replicate it first: state = jaxdl.parallel.replicate(state, {n}).")
        _check_leading_axis(owner, batch, n, "batch",
                            f"Split the global batch first: batch = jaxdl.parallel.shard_batch(batch, {n}).")
        local = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape[1:], x.dtype),
                             (state.params, state.model_state, state.key))
        glob = jax.tree.map(lambda x: jax.ShapeDtypeStruct((x.shape[0] * x.shape[1], *x.shape[2:]),
                                                           x.dtype), batch)
        signature = jax.tree.structure((local, glob)), tuple(jax.tree.leaves((local, glob)))
        if signature not in checked:
            _check_synced_model_state(owner, loss_fn, mesh, axis_name, *local[:2], glob, local[2])
            checked.add(signature)
        return pstep(state, batch)

    step.lower = pstep.lower  # e.g. parallel.collective_bytes(step.lower(state, batch))
    return step


def make_sharded_train_step(
    loss_fn: LossFn,
    optimizer: optax.GradientTransformation,
    mesh: jax.sharding.Mesh,
    *,
    axis_name: str | None = None,
    skip_nonfinite: bool = True,
    donate: bool = False,
) -> Callable[[TrainState, Batch], tuple[TrainState, dict]]:
    """The recommended data-parallel step: `jax.jit` of `jax.shard_map` over ``mesh``.

    The data axis is ``axis_name`` (default: the mesh's only axis, ``"batch"`` for
    `parallel.data_mesh`); it is also the axis name of the collectives, so the model's
    `BatchNorm` layers must have ``axis_name`` equal to it. The state is replicated, ``P()``
    (`PerDevice` parts such as a one-bit residual sharded ``P(axis)``: place it with
    `parallel.put_state`), the batch sharded along its first axis, ``P(axis)`` (a global batch,
    or `parallel.put_batch`); each device takes the gradient of its shard's mean loss and the
    gradients are averaged with ``lax.pmean`` over the data axis (or by the one-bit exchange of
    `parallel.onebit_allreduce`):

    .. math:: g = \\frac{1}{D}\\sum_d \\nabla \\bar L(B_d) = \\nabla \\bar L(B)

    (seed 001's data parallelism), the same math as `make_pmap_train_step`, and the same result
    as `make_train_step` on the global batch. Spans hosts when ``mesh`` does (every process runs
    the step with its `put_batch` part of the global batch; `jax.distributed.initialize`).
    Metrics are replicated scalars. A global batch that the data axis does not divide, or a model
    whose state would differ across devices, is an error. ``step.lower(state, batch)`` gives
    the `jax.stages.Lowered` program (e.g. for `parallel.collective_bytes`).
    """
    owner = "make_sharded_train_step"
    axis = parallel._data_axis(owner, mesh, axis_name)
    _check_exchange_axis(owner, optimizer, axis)
    n = mesh.shape[axis]
    spec = jax.sharding.PartitionSpec
    compiled, checked = {}, set()

    def body(state, batch):
        return _parallel_body(loss_fn, optimizer, skip_nonfinite, axis, state, batch)

    def step(state: TrainState, batch):
        parallel._check_divisible(owner, parallel._batch_size(owner, batch), n)
        for outer, node in jax.tree_util.tree_flatten_with_path(state, is_leaf=parallel._is_per_device)[0]:
            if parallel._is_per_device(node):
                for path, x in jax.tree_util.tree_flatten_with_path(node.value)[0]:
                    if np.ndim(x) == 0 or np.shape(x)[0] != n:
                        where = jax.tree_util.keystr((*outer, *path))
                        raise ValueError(
                            f"{owner}: per-device state leaf {where} has shape {np.shape(x)}; it "
                            f"needs one slice per device along a leading axis of {n}. Place the "
                            f"state first: state = jaxdl.parallel.put_state(state, mesh).")
        avals = _avals((state.params, state.model_state, batch, state.key))
        signature = jax.tree.structure(avals), tuple(jax.tree.leaves(avals))
        if signature not in checked:
            _check_synced_model_state(owner, loss_fn, mesh, axis, *avals)
            checked.add(signature)
        return program(state)(state, batch)

    def program(state):
        treedef = jax.tree.structure(state)
        if treedef not in compiled:
            specs = parallel.state_specs(state, axis)
            compiled[treedef] = jax.jit(
                jax.shard_map(body, mesh=mesh, in_specs=(specs, spec(axis)), out_specs=(specs, spec()),
                              check_vma=False),
                donate_argnums=(0,) if donate else ())
        return compiled[treedef]

    step.lower = lambda state, batch: program(state).lower(state, batch)
    return step
