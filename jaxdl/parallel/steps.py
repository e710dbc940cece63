"""Data-parallel train steps: `jax.pmap`, `jax.shard_map`, and a scan-fused sharded loop.

Data parallelism (CSE 176 Lecture 11): "split minibatch into chunks & distribute to GPUs/nodes". Every
device holds the same parameters, computes the gradient of the mean loss on its chunk, and the
devices average their gradients, so that with equal chunks

.. math:: \\frac{1}{D}\\sum_{d=1}^{D} \\nabla \\frac{1}{m}\\sum_{i \\in B_d} L_i
          = \\nabla \\frac{1}{Dm}\\sum_{i \\in B} L_i ,

the gradient of the global batch B: D devices take the step one device would take on B.

Every step here runs one per-device body around `jaxdl.train_step.step_body` (the body of the
single-device step too): fold the device index into the step key (different dropout masks per
device; the state's key stays identical everywhere), take the gradient of the local mean loss,
and average loss, metrics and gradients over the data axis with ``lax.pmean`` -- unless the
optimizer is a `CrossDeviceTransformation` (e.g. `onebit_allreduce`), which averages the local
gradients itself. BatchNorm with ``axis_name`` equal to the data axis uses the global batch
statistics, so D devices take the single-device step on the global batch.
"""

from __future__ import annotations

from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax import lax
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from jaxdl._checks import explain_batch_errors
from jaxdl.parallel.onebit import CrossDeviceTransformation
from jaxdl.parallel.placement import (
    FSDP_MIN_SIZE,
    batch_size_of,
    check_divisible,
    check_shard,
    data_axis,
    fsdp_shardings,
    is_per_device,
    pick_devices,
    state_specs,
)
from jaxdl.precision import with_policy
from jaxdl.train_step import (
    StepOptions,
    TrainState,
    accepts_train,
    check_batch,
    check_state,
    remat_loss,
    resolve_options,
    scan_steps,
    step_body_with_norm,
    step_key,
)

__all__ = ["make_pmap_train_step", "make_sharded_train_step", "make_sharded_train_loop"]

Batch = Any
LossFn = Callable[..., tuple[jax.Array, tuple[Any, dict]]]


def _parallel_body(
    loss_fn, optimizer, skip_nonfinite, axis_name, state: TrainState, batch, options=None, param_norm=None
):
    """`step_body` on this device's shard, averaged over ``axis_name`` (runs inside pmap/shard_map).

    With ``options.micro_batches = K`` each device accumulates the gradient of its shard's K
    micro-batches first; the average over devices follows, once per optimizer step. Returns
    ``(state, metrics, norm')`` as `step_body_with_norm`: ``norm'`` is the new params' norm when
    ``param_norm`` is given (the sharded loop carries it), else None."""
    check_batch(state, batch)
    check_state(state, loss_fn, optimizer)
    exchange = isinstance(optimizer, CrossDeviceTransformation)

    def mean(x):
        return lax.pmean(x, axis_name) if jnp.issubdtype(x.dtype, jnp.inexact) else x

    def reduce_grads(args):
        loss, grads, aux = args
        return mean(loss), grads if exchange else jax.tree.map(mean, grads), jax.tree.map(mean, aux)

    key = jax.random.fold_in(step_key(state), lax.axis_index(axis_name))
    state, metrics, new_norm = step_body_with_norm(
        loss_fn, optimizer, skip_nonfinite, state, batch, key, param_norm, reduce_grads, options
    )
    if exchange:  # each device saw its own local gradients
        metrics["grad_norm"] = mean(metrics["grad_norm"])
    return state, metrics, new_norm


def _check_exchange_axis(owner: str, optimizer, axis_name) -> None:
    if not isinstance(optimizer, optax.GradientTransformation):
        raise TypeError(f"{owner}: optimizer must be an optax.GradientTransformation, got {optimizer!r}")
    if isinstance(optimizer, CrossDeviceTransformation) and optimizer.axis_name != axis_name:
        raise ValueError(
            f"{owner}: the optimizer exchanges gradients over axis_name="
            f"{optimizer.axis_name!r}, but this step maps over {axis_name!r}"
        )


def _avals(tree):
    return jax.tree.map(lambda x: jax.ShapeDtypeStruct(np.shape(x), x.dtype), tree)


def _check_synced_model_state(owner, loss_fn, mesh, axis_name, params, model_state, batch, key):
    """Refuse a model whose state would differ across devices (a BatchNorm without ``axis_name``).

    Traces (never runs) the loss under `jax.shard_map` with ``check_vma=True``, which proves
    statically whether each returned model-state leaf is the same on every device.
    """
    if not jax.tree.leaves(model_state):
        return
    kwargs = {"train": True} if accepts_train(loss_fn) else {}

    def probe(params, model_state, batch, key):
        key = jax.random.fold_in(key, lax.axis_index(axis_name))
        return loss_fn(params, model_state, batch, key, **kwargs)[1][0]

    f = jax.shard_map(
        probe,
        mesh=mesh,
        in_specs=(P(), P(), P(axis_name), P()),
        out_specs=jax.tree.map(lambda _: P(), model_state),
        check_vma=True,
    )
    why = (
        f"Give every BatchNorm axis_name={axis_name!r} (BatchNorm(axis_name={axis_name!r}); "
        f"flax: nn.BatchNorm(axis_name={axis_name!r}), nnx.BatchNorm(..., axis_name={axis_name!r})) so "
        f"that it normalizes with the statistics of the global batch."
    )
    try:
        jax.eval_shape(f, params, model_state, batch, key)
    except ValueError as err:
        if "replicat" not in str(err):
            raise
        raise ValueError(
            f"{owner}: the model state returned by the loss would differ across devices: each "
            f"device would normalize with its own shard's batch statistics and the running "
            f"statistics would silently diverge across replicas. {why}\n{err}"
        ) from None
    except (NameError, AssertionError) as err:
        raise ValueError(
            f"{owner}: tracing the loss over the data axis {axis_name!r} failed, most likely "
            f"because a layer (e.g. BatchNorm) reduces over another axis name. {why}"
        ) from err


def _check_leading_axis(owner: str, tree, n: int, what: str, hint: str) -> None:
    for path, x in jax.tree_util.tree_flatten_with_path(tree)[0]:
        shape = np.shape(x)
        if not shape or shape[0] != n:
            raise ValueError(
                f"{owner}: {what} leaf {jax.tree_util.keystr(path) or '<root>'} has shape {shape}, "
                f"but the pmap step needs a leading device axis of {n} on every {what} leaf. {hint}"
            )


def make_pmap_train_step(
    loss_fn: LossFn,
    optimizer: optax.GradientTransformation,
    axis_name: str = "batch",
    *,
    devices=None,
    options: StepOptions | None = None,
    skip_nonfinite: bool = True,
    precision=None,
    micro_batches: int = 1,
    loss_scale=None,
    ema=None,
    remat: bool = False,
) -> Callable[[TrainState, Batch], tuple[TrainState, dict]]:
    """A `jax.pmap` ``step(state, batch) -> (state, metrics)`` over the local devices.

    ``state`` is replicated (`replicate`: a leading device axis on every leaf) and ``batch``
    split along a leading device axis (`shard_batch`). Each device takes the gradient of the mean
    loss on its shard; gradients, loss and metrics are averaged with ``lax.pmean(x, axis_name)``:

    .. math:: g = \\frac{1}{D}\\sum_d \\nabla \\bar L(B_d) = \\nabla \\bar L(B)
              \\quad (|B_d| = |B|/D)

    (CSE 176 Lecture 11's data parallelism), so the result equals `make_train_step` on the global batch
    when the model's `BatchNorm` layers have ``axis_name=axis_name`` (statistics of the global
    batch, identical running statistics on every device). A model whose state would differ
    across devices is refused at the first call. The state's key stays identical on all devices;
    the step key is ``fold_in(key, axis_index(axis_name))``, so dropout masks differ per device.
    With `onebit_allreduce` as optimizer, the one-bit exchange replaces the gradient pmean.
    ``devices``: None (all local devices), a count, or a list. Metrics come back with the
    leading device axis (equal values); ``step.lower(state, batch)`` gives the lowered program.
    `jax.pmap` is in maintenance mode since JAX 0.8: prefer `make_sharded_train_step`.
    ``precision``, ``micro_batches`` (per device: each shard is cut into K micro-batches),
    ``loss_scale``, ``ema`` and ``remat`` as in `jaxdl.train_step.make_train_step` (or ``options=
    StepOptions(...)``; the pmap step does not donate, so ``donate=True`` there is refused).
    """
    owner = "make_pmap_train_step"
    options = resolve_options(
        owner,
        options,
        skip_nonfinite=skip_nonfinite,
        precision=precision,
        micro_batches=micro_batches,
        loss_scale=loss_scale,
        ema=ema,
        remat=remat,
    )
    if options.donate:
        raise ValueError(f"{owner}: options.donate=True, but the pmap step does not donate its state")
    skip_nonfinite = options.skip_nonfinite
    loss_fn = remat_loss(owner, loss_fn, options.remat)
    _check_exchange_axis(owner, optimizer, axis_name)
    devs = pick_devices(owner, devices, jax.local_devices())
    n = len(devs)
    mesh = Mesh(np.array(devs), (axis_name,))
    pstep = jax.pmap(
        lambda state, batch: _parallel_body(
            loss_fn, optimizer, skip_nonfinite, axis_name, state, batch, options
        )[:2],
        axis_name=axis_name,
        devices=devs,
    )
    checked = set()

    def step(state: TrainState, batch):
        _check_leading_axis(
            owner, state, n, "state", f"Replicate it first: state = jaxdl.parallel.replicate(state, {n})."
        )
        _check_leading_axis(
            owner,
            batch,
            n,
            "batch",
            f"Split the global batch first: batch = jaxdl.parallel.shard_batch(batch, {n}).",
        )
        local = jax.tree.map(
            lambda x: jax.ShapeDtypeStruct(x.shape[1:], x.dtype), (state.params, state.model_state, state.key)
        )
        glob = jax.tree.map(
            lambda x: jax.ShapeDtypeStruct((x.shape[0] * x.shape[1], *x.shape[2:]), x.dtype), batch
        )
        signature = jax.tree.structure((local, glob)), tuple(jax.tree.leaves((local, glob)))
        if signature not in checked:
            _check_synced_model_state(owner, loss_fn, mesh, axis_name, *local[:2], glob, local[2])
            checked.add(signature)
        return pstep(state, batch)

    step.lower = pstep.lower  # e.g. collective_bytes(step.lower(state, batch))
    return explain_batch_errors(owner, "batch", step)


def _data_parallel_loss(loss_fn, mesh: Mesh, axis: str, policy):
    """``loss_fn`` on each device's shard of the batch, averaged over ``axis``: a loss of the
    global batch for the FSDP step, whose gradient GSPMD and `jax.shard_map` take together.

    The params, model state and key enter replicated, ``P()`` (XLA gathers FSDP-split params
    here), the batch ``P(axis)``; each device draws with ``fold_in(key, axis_index)`` as in the
    replicated step, and the loss and inexact metrics are ``lax.pmean``-ed. Traced with
    ``check_vma=True``, so the gradient of the replicated params is the psum of the devices'
    cotangents, i.e. the gradient of the global mean loss. ``policy`` (a precision policy) runs
    inside, on each device, as in the single-device step.
    """
    inner = with_policy(loss_fn, policy)
    kwargs_ok = accepts_train(loss_fn)

    def mean(x):
        if jnp.issubdtype(x.dtype, jnp.inexact):
            return lax.pmean(x, axis)
        return lax.pmean(x.astype(jnp.float32), axis).astype(x.dtype)

    def local(params, model_state, batch, key, train):
        # Varying before the policy's cast: the gradients' psum (this cast's transpose) then
        # sums the float32 gradients, as the replicated step's pmean does, not bfloat16 ones.
        params = lax.pcast(params, axis, to="varying")
        key = jax.random.fold_in(key, lax.axis_index(axis))
        loss, (model_state, aux) = inner(params, model_state, batch, key, **train)
        return mean(loss), (model_state, jax.tree.map(mean, aux))

    def global_loss(params, model_state, batch, key, train=True):
        train = {"train": train} if kwargs_ok else {}
        f = jax.shard_map(
            lambda p, m, b, k: local(p, m, b, k, train),
            mesh=mesh,
            in_specs=(P(), P(), P(axis), P()),
            out_specs=P(),
            check_vma=True,
        )
        return f(params, model_state, batch, key)

    return global_loss


def _fsdp_body(loss_fn, optimizer, mesh, axis, skip_nonfinite, options, shardings):
    """The FSDP step's body under `jax.jit` (GSPMD partitions it): `step_body_with_norm` on the
    global arrays with the data-parallel loss; the gradients are constrained to the params'
    layout (on XLA:CPU an all-reduce and a slice; a reduce-scatter where XLA fuses the two) so
    that the optimizer update and the EMA run on each device's part only."""
    policy = options.policy
    outer = options.replace(precision=None)  # the policy runs inside, per device
    dp_loss = _data_parallel_loss(loss_fn, mesh, axis, policy)

    def reduce_grads(args):
        loss, grads, aux = args
        return loss, lax.with_sharding_constraint(grads, shardings.params), aux

    def one_step(state, batch, param_norm=None):
        check_batch(state, batch)
        check_state(state, loss_fn, optimizer)
        new_state, metrics, norm = step_body_with_norm(
            dp_loss, optimizer, skip_nonfinite, state, batch, step_key(state), param_norm, reduce_grads, outer
        )
        return lax.with_sharding_constraint(new_state, shardings), metrics, norm

    return one_step


def _check_call(owner, loss_fn, mesh, axis, state, batch, batch_axis, options, checked):
    """The checks of a sharded step's call: the batch splits over the devices (and each shard
    into micro-batches), `PerDevice` state is placed, the model state stays in sync."""
    n = mesh.shape[axis]
    size = batch_size_of(owner, batch, batch_axis)
    check_divisible(owner, size, n)
    k = 1 if options is None else options.micro_batches
    if k > 1 and size // n % k:
        raise ValueError(
            f"{owner}: each of the {n} devices gets {size // n} examples, which micro_batches={k} does not divide"
        )
    for outer, node in jax.tree_util.tree_flatten_with_path(state, is_leaf=is_per_device)[0]:
        if is_per_device(node):
            for path, x in jax.tree_util.tree_flatten_with_path(node.value)[0]:
                if np.ndim(x) == 0 or np.shape(x)[0] != n:
                    where = jax.tree_util.keystr((*outer, *path))
                    raise ValueError(
                        f"{owner}: per-device state leaf {where} has shape {np.shape(x)}; it "
                        f"needs one slice per device along a leading axis of {n}. Place the "
                        f"state first: state = jaxdl.parallel.put_state(state, mesh)."
                    )
    one_batch = jax.tree.map(lambda x: jax.ShapeDtypeStruct(np.shape(x)[batch_axis:], x.dtype), batch)
    avals = (*_avals((state.params, state.model_state)), one_batch, _avals(state.key))
    signature = jax.tree.structure(avals), tuple(jax.tree.leaves(avals))
    if signature not in checked:
        _check_synced_model_state(owner, loss_fn, mesh, axis, *avals)
        checked.add(signature)


def _make_sharded(
    owner,
    loss_fn,
    optimizer,
    mesh,
    axis_name,
    stacked,
    options: StepOptions,
    shard="replicate",
    min_size=FSDP_MIN_SIZE,
):
    """`jax.jit` of the sharded step over ``mesh``, with the checks both sharded makers share.

    ``shard="replicate"``: `jax.shard_map` of the per-device body, the state ``P()``.
    ``shard="fsdp"``: `jax.jit` with `NamedSharding` in/out shardings from `fsdp_shardings`
    around the global step body (`_fsdp_body`). ``stacked=False``: one step, batch sharded
    ``P(axis)``. ``stacked=True``: `lax.scan` of that step over the leading axis of a block of
    K batches, sharded ``P(None, axis)``; the per-step metrics come back stacked, ``(K,)``.
    ``options.remat`` wraps the loss's model (`remat_loss`).
    """
    loss_fn = remat_loss(owner, loss_fn, options.remat)
    skip_nonfinite, donate = options.skip_nonfinite, options.donate
    axis = data_axis(owner, mesh, axis_name)
    _check_exchange_axis(owner, optimizer, axis)
    fsdp = check_shard(owner, shard) == "fsdp"
    if fsdp and isinstance(optimizer, CrossDeviceTransformation):
        raise ValueError(
            f"{owner}: shard='fsdp' cannot run a cross-device optimizer ({optimizer!r}, e.g. "
            f"onebit_allreduce): it exchanges each device's local gradients itself, while under "
            f"FSDP the optimizer runs on the devices' parts of the averaged gradients. Use "
            f"shard='replicate' with it."
        )
    batch_axis = 1 if stacked else 0
    batch_spec = P(None, axis) if stacked else P(axis)
    compiled, checked = {}, set()

    def one_step(state, batch, param_norm=None):
        return _parallel_body(loss_fn, optimizer, skip_nonfinite, axis, state, batch, options, param_norm)

    def wrap(step):
        if stacked:
            return lambda state, batches: scan_steps(step, state, batches)
        return lambda state, batch: step(state, batch)[:2]

    def run(state: TrainState, batch):
        _check_call(owner, loss_fn, mesh, axis, state, batch, batch_axis, options, checked)
        prog, shardings = program(state)
        if shardings is not None and jax.process_count() == 1:
            state = jax.device_put(state, shardings)  # a no-op for a placed state
        return prog(state, batch)

    def program(state):
        key = jax.tree.structure(state), tuple(np.shape(x) for x in jax.tree.leaves(state)) if fsdp else ()
        if key not in compiled:
            if fsdp:
                shardings = fsdp_shardings(_avals(state), mesh, axis, min_size=min_size)
                body = _fsdp_body(loss_fn, optimizer, mesh, axis, skip_nonfinite, options, shardings)
                prog = jax.jit(
                    wrap(body),
                    in_shardings=(shardings, NamedSharding(mesh, batch_spec)),
                    out_shardings=(shardings, NamedSharding(mesh, P())),
                    donate_argnums=(0,) if donate else (),
                )
            else:
                specs, shardings = state_specs(state, axis), None
                prog = jax.jit(
                    jax.shard_map(
                        wrap(one_step),
                        mesh=mesh,
                        in_specs=(specs, batch_spec),
                        out_specs=(specs, P()),
                        check_vma=False,
                    ),
                    donate_argnums=(0,) if donate else (),
                )
            compiled[key] = prog, shardings
        return compiled[key]

    run.lower = lambda state, batch: program(state)[0].lower(state, batch)
    run.shardings = lambda state: (
        fsdp_shardings(_avals(state), mesh, axis, min_size=min_size) if fsdp else None
    )
    return explain_batch_errors(owner, "batches" if stacked else "batch", run)


def make_sharded_train_step(
    loss_fn: LossFn,
    optimizer: optax.GradientTransformation,
    mesh: Mesh,
    *,
    axis_name: str | None = None,
    options: StepOptions | None = None,
    skip_nonfinite: bool = True,
    donate: bool = False,
    precision=None,
    micro_batches: int = 1,
    loss_scale=None,
    ema=None,
    shard: str = "replicate",
    min_shard_size: int = FSDP_MIN_SIZE,
    remat: bool = False,
) -> Callable[[TrainState, Batch], tuple[TrainState, dict]]:
    """The recommended data-parallel step: `jax.jit` of `jax.shard_map` over ``mesh``.

    The data axis is ``axis_name`` (default: the mesh's only axis, ``"batch"`` for `data_mesh`);
    it is also the axis name of the collectives, so the model's `BatchNorm` layers must have
    ``axis_name`` equal to it. The state is replicated, ``P()`` (`PerDevice` parts such as a
    one-bit residual sharded ``P(axis)``: place it with `put_state`), the batch sharded along its
    first axis, ``P(axis)`` (a global batch, or `put_batch`); each device takes the gradient of
    its shard's mean loss and the gradients are averaged with ``lax.pmean`` over the data axis
    (or by the one-bit exchange of `onebit_allreduce`):

    .. math:: g = \\frac{1}{D}\\sum_d \\nabla \\bar L(B_d) = \\nabla \\bar L(B)

    (CSE 176 Lecture 11's data parallelism), the same math as `make_pmap_train_step`, and the same result
    as `make_train_step` on the global batch. Spans hosts when ``mesh`` does (every process runs
    the step with its `put_batch` part of the global batch; `jax.distributed.initialize`).
    Metrics are replicated scalars. A global batch that the data axis does not divide, or a model
    whose state would differ across devices, is an error. ``step.lower(state, batch)`` gives
    the `jax.stages.Lowered` program (e.g. for `collective_bytes`). ``precision``,
    ``micro_batches`` (per device: each device accumulates its shard's K micro-batches, then one
    all-reduce per optimizer step), ``loss_scale`` and ``ema`` as in
    `jaxdl.train_step.make_train_step`, as keywords or as ``options=StepOptions(...)``;
    ``remat=True`` (or ``options.remat``): each layer's inner activations recomputed in the
    backward pass (`jaxdl.train_step.remat_loss`).

    ``shard="fsdp"``: fully sharded data parallelism (ZeRO stage 3, Rajbhandari et al. 2020):
    the state lives split over the data axis as `fsdp_shardings` says (``min_shard_size``: its
    ``min_size``; place it with ``put_state(state, mesh, shard="fsdp")``, or let the first call
    move it), and the step is `jax.jit` of the global step with `NamedSharding` in/out
    shardings: GSPMD gathers the params for the forward and backward pass, which run per
    device on the batch's shards (`jax.shard_map`, so BatchNorm with ``axis_name`` and dropout
    behave as in the replicated step), reduces the gradients onto each device's part, and the
    optimizer update and EMA run on the parts. The math is the replicated step's; with
    ``micro_batches=K`` the K micro-batches are cut from the global batch (as on one device,
    BatchNorm included) and each is split over the devices. A cross-device optimizer
    (`onebit_allreduce`) is refused. ``step.shardings(state)`` gives the layout.
    """
    options = resolve_options(
        "make_sharded_train_step",
        options,
        skip_nonfinite=skip_nonfinite,
        donate=donate,
        precision=precision,
        micro_batches=micro_batches,
        loss_scale=loss_scale,
        ema=ema,
        remat=remat,
    )
    return _make_sharded(
        "make_sharded_train_step", loss_fn, optimizer, mesh, axis_name, False, options, shard, min_shard_size
    )


def make_sharded_train_loop(
    loss_fn: LossFn,
    optimizer: optax.GradientTransformation,
    mesh: Mesh,
    *,
    axis_name: str | None = None,
    options: StepOptions | None = None,
    skip_nonfinite: bool = True,
    donate: bool = False,
    precision=None,
    micro_batches: int = 1,
    loss_scale=None,
    ema=None,
    shard: str = "replicate",
    min_shard_size: int = FSDP_MIN_SIZE,
    remat: bool = False,
) -> Callable[[TrainState, Batch], tuple[TrainState, dict]]:
    """K sharded steps in one program: ``loop(state, batches) -> (state, metrics)``.

    ``jax.jit(jax.shard_map(lax.scan(step)))`` over ``mesh``, where ``step`` is exactly the step
    of `make_sharded_train_step`: ``batches`` stacks K global batches along a new leading axis
    (leaves ``(K, B, ...)``), sharded along the batch axis, ``P(None, axis)`` (place a block
    with ``put_batch(batches, mesh, batch_axis=1)``), and iteration k takes the data-parallel
    step on ``batches[k]``:

    .. math:: s_{k+1} = \\mathrm{step}(s_k, B_k), \\quad k = 0 .. K-1,

    so K iterations end in the state of K sharded steps, and of K `make_train_step` steps on
    the global batches (the data-parallel version of `make_train_loop`), with one dispatch and
    one transfer per block instead of K. Metrics come back stacked per step, ``(K,)``,
    replicated. The checks are the sharded step's: a batch size the data axis does not divide,
    an unplaced `PerDevice` state, or a model whose state would differ across devices (a
    `BatchNorm` without ``axis_name``) is an error. ``loop.lower(state, batches)`` gives the
    `jax.stages.Lowered` program; ``donate=True`` lets XLA reuse the old state's buffers.
    ``precision``, ``micro_batches``, ``loss_scale``, ``ema``, ``remat`` (or
    ``options=StepOptions(...)``), ``shard`` and ``min_shard_size`` as in
    `make_sharded_train_step`.
    """
    options = resolve_options(
        "make_sharded_train_loop",
        options,
        skip_nonfinite=skip_nonfinite,
        donate=donate,
        precision=precision,
        micro_batches=micro_batches,
        loss_scale=loss_scale,
        ema=ema,
        remat=remat,
    )
    return _make_sharded(
        "make_sharded_train_loop", loss_fn, optimizer, mesh, axis_name, True, options, shard, min_shard_size
    )
