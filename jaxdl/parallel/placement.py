"""Where the data-parallel state and batches live: devices, the pmap layout, the mesh layout.

Two layouts (the steps that use them live in `jaxdl.parallel.steps`):

* `jax.pmap`: every leaf of the state carries a leading device axis (`replicate`, `unreplicate`)
  and the batch is split along a new leading axis (`shard_batch`).
* `jax.shard_map` over a `jax.sharding.Mesh` with one data axis (`data_mesh`): state leaves are
  replicated, ``P()``, the batch is sharded along its batch axis, ``P(axis)`` (`put_state`,
  `put_batch`; a block of K stacked batches ``P(None, axis)``). This is the recommended path, and
  the one that spans many hosts.

State that is *not* identical across devices (the error-feedback residual of
`jaxdl.parallel.onebit_allreduce`) sits in a `PerDevice` node and always holds one slice per
device along a leading axis: fresh from ``init`` that axis has length 1 (the same slice for
every device); `put_state` expands it to D slices sharded ``P(axis)``; under pmap, `replicate`
adds the device axis as for every leaf, and each device sees its own slice of length 1.

The checks other modules share (`pick_devices`, `data_axis`, `batch_size_of`, `check_divisible`,
`is_per_device`) are public here, so that the steps need no private helper of this module.
This module knows nothing of `TrainState`; it works on pytrees.
"""

from __future__ import annotations

from typing import Any, NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from jaxdl._checks import check_int
from jaxdl._tree import is_key

__all__ = [
    "local_devices",
    "replicate",
    "unreplicate",
    "shard_batch",
    "data_mesh",
    "put_state",
    "put_batch",
    "state_specs",
    "fsdp_shardings",
    "FSDP_MIN_SIZE",
    "check_shard",
    "PerDevice",
    "pick_devices",
    "data_axis",
    "batch_size_of",
    "check_divisible",
    "is_per_device",
]


def _path(path) -> str:
    return jax.tree_util.keystr(path) or "<root>"


# ----------------------------------------------------------------------------- devices


def pick_devices(owner: str, devices, available: Sequence) -> list:
    """The devices a data-parallel function of ``owner`` runs on.

    ``devices``: None (all of ``available``), a count ``n`` (the first ``n`` of ``available``),
    or a sequence of devices (taken as given). A count outside ``1 .. len(available)`` or an
    empty sequence is a ValueError naming ``owner`` and both counts; on CPU the message says how
    to make fake devices.
    """
    if devices is None:
        return list(available)
    if isinstance(devices, (int, np.integer)) and not isinstance(devices, bool):
        if devices < 1:
            raise ValueError(f"{owner}: num_devices={devices} is out of range; expected an integer >= 1")
        if devices > len(available):
            raise ValueError(
                f"{owner}: asked for {devices} devices, but only {len(available)} exist "
                f"({[str(d) for d in available]}). On CPU, set "
                f"XLA_FLAGS=--xla_force_host_platform_device_count={devices} before jax is imported."
            )
        return list(available)[:devices]
    devices = list(devices)
    if not devices:
        raise ValueError(f"{owner}: devices is empty")
    return devices


def local_devices(num_devices: int | None = None) -> list:
    """The first ``num_devices`` of `jax.local_devices()` (all of them for None).

    Raises ValueError naming both counts when more devices are asked for than exist.
    """
    return pick_devices("local_devices", num_devices, jax.local_devices())


def replicate(tree, devices=None, axis_name: str = "batch"):
    """One copy of every leaf per device, stacked along a new leading axis: the pmap layout.

    ``x`` of shape ``s`` becomes an array of shape ``(D, *s)`` whose slice ``d`` lives on device
    ``d``. ``devices``: None (all local devices), a count, or a list of devices (the ones given
    to the pmap step). PRNG keys are replicated like any other leaf. The arrays are sharded
    ``P(axis_name)`` over a mesh of ``devices`` with that axis name, exactly as `jax.pmap`
    returns its outputs; give the pmap step's ``axis_name``, so that its second call reuses the
    first call's compilation instead of compiling again for another input sharding.
    (`flax.jax_utils.replicate` does the same with `jax.device_put_replicated`.)
    """
    devs = pick_devices("replicate", devices, jax.local_devices())
    sharding = NamedSharding(Mesh(np.array(devs), (axis_name,)), P(axis_name))

    def rep(x):
        x = jnp.asarray(x) if not is_key(x) else x
        return jax.make_array_from_single_device_arrays(
            (len(devs), *x.shape), sharding, [jax.device_put(x[None], d) for d in devs]
        )

    return jax.tree.map(rep, tree)


def unreplicate(tree):
    """The copy on the first device: ``x[0]`` for every leaf (inverse of `replicate`).

    For state that differs across devices (a `PerDevice` residual) this keeps device 0's slice.
    """
    return jax.tree.map(lambda x: x[0], tree)


# ----------------------------------------------------------------------------- batch checks


def batch_size_of(owner: str, batch, axis: int = 0) -> int:
    """The batch size of ``batch``: the length of axis ``axis`` (0 for one batch, 1 for K stacked
    batches), which every leaf must share.

    A batch without arrays, a leaf with too few axes, or leaves that disagree (on the batch size,
    or for ``axis=1`` on the number K of stacked batches) is a ValueError naming ``owner`` and
    the leaves.
    """
    leaves = jax.tree_util.tree_flatten_with_path(batch)[0]
    if not leaves:
        raise ValueError(f"{owner}: the batch has no arrays")
    what = "a leading batch axis" if axis == 0 else "axes (K stacked batches, batch, ...)"
    for lead in range(axis + 1):
        sizes = {}
        for path, x in leaves:
            if np.ndim(x) <= axis:
                raise ValueError(
                    f"{owner}: batch leaf {_path(path)} has shape {np.shape(x)}; every leaf needs {what}"
                )
            sizes.setdefault(int(np.shape(x)[lead]), _path(path))
        if len(sizes) > 1:
            name = "batch size" if lead == axis else "number of stacked batches"
            raise ValueError(
                f"{owner}: batch leaves disagree on the {name}: "
                + ", ".join(f"{p} has {n}" for n, p in sizes.items())
            )
    return next(iter(sizes))


def check_divisible(owner: str, batch_size: int, num_devices: int, what: str = "global batch") -> None:
    """Raise ValueError unless ``num_devices`` divides ``batch_size``: the message names both
    numbers, the remainder and the nearest sizes that split evenly (no example is ever dropped)."""
    if batch_size % num_devices:
        lo = batch_size // num_devices * num_devices
        hint = f"{lo} or {lo + num_devices}" if lo else f"{num_devices}"
        raise ValueError(
            f"{owner}: the {what} of {batch_size} examples does not split evenly over "
            f"{num_devices} devices ({batch_size} = {num_devices} * {batch_size // num_devices} + "
            f"{batch_size % num_devices}); use a batch size divisible by {num_devices}, e.g. {hint}. "
            f"Examples are never dropped silently."
        )


def shard_batch(batch, num_devices: int | None = None):
    """Split every leaf ``(B, ...)`` into ``(D, B / D, ...)``: the pmap layout (CSE 176 Lecture 11: "split
    minibatch into chunks & distribute to GPUs").

    ``num_devices`` (D) defaults to `jax.local_device_count()`, as in `flax.training.common_utils.shard`.
    Device ``d`` gets examples ``d*B/D .. (d+1)*B/D - 1``. A batch size that D does not divide is
    an error naming both numbers (nothing is dropped). numpy leaves stay numpy, so the transfer
    happens once, when the pmap step scatters the shards.
    """
    if num_devices is None:
        num_devices = jax.local_device_count()
    check_int("shard_batch", "num_devices", num_devices)
    size = batch_size_of("shard_batch", batch)
    check_divisible("shard_batch", size, num_devices)
    return jax.tree.map(lambda x: x.reshape(num_devices, size // num_devices, *x.shape[1:]), batch)


# ----------------------------------------------------------------------------- mesh placement


def data_mesh(num_devices: int | None = None, axis_name: str = "batch") -> Mesh:
    """A one-axis `jax.sharding.Mesh` over the first ``num_devices`` of `jax.devices()`.

    In a multi-process run `jax.devices()` lists every process's devices, so the default mesh
    spans all hosts. ``axis_name`` names the data axis: the collectives of the sharded step and
    the ``axis_name`` of the model's `BatchNorm` must use the same name.
    """
    if not isinstance(axis_name, str) or not axis_name:
        raise ValueError(f"data_mesh: axis_name must be a non-empty str, got {axis_name!r}")
    devs = pick_devices("data_mesh", num_devices, jax.devices())
    return Mesh(np.array(devs), (axis_name,))


class PerDevice(NamedTuple):
    """Marks a subtree that differs across devices: one slice per device along a leading axis.

    Fresh from an optimizer's ``init`` the leading axis has length 1; `put_state` expands it to
    one slice per device and shards it along the data axis (``P(axis)``), where each device sees
    its own slice of length 1. Everything outside a `PerDevice` node is replicated (``P()``).
    """

    value: Any


def is_per_device(x) -> bool:
    """Whether ``x`` is a `PerDevice` node (use as ``is_leaf=`` to stop a tree map there)."""
    return isinstance(x, PerDevice)


def data_axis(owner: str, mesh: Mesh, axis_name: str | None) -> str:
    """The name of ``mesh``'s data axis: ``axis_name``, or the mesh's only axis for None.

    A ``mesh`` that is not a `jax.sharding.Mesh` is a TypeError; a name that is not an axis of
    the mesh, or None for a mesh of several axes, a ValueError naming ``owner`` and the axes.
    """
    if not isinstance(mesh, Mesh):
        raise TypeError(f"{owner}: mesh must be a jax.sharding.Mesh (see data_mesh), got {mesh!r}")
    if axis_name is None:
        if len(mesh.axis_names) != 1:
            raise ValueError(
                f"{owner}: the mesh has axes {mesh.axis_names}; pass axis_name= to "
                f"say which one is the data axis"
            )
        return mesh.axis_names[0]
    if axis_name not in mesh.axis_names:
        raise ValueError(f"{owner}: axis_name={axis_name!r} is not an axis of the mesh {mesh.axis_names}")
    return axis_name


def state_specs(tree, axis_name: str):
    """`PartitionSpec` of every leaf of a data-parallel state: ``P(axis_name)`` inside a
    `PerDevice` node, ``P()`` (replicated) elsewhere."""

    def spec(node):
        if is_per_device(node):
            return PerDevice(jax.tree.map(lambda _: P(axis_name), node.value))
        return P()

    return jax.tree.map(spec, tree, is_leaf=is_per_device)


FSDP_MIN_SIZE = 1 << 12
"""Leaves with fewer elements than this stay replicated under `fsdp_shardings` (4096 elements,
16 KiB in float32): splitting them saves little memory and costs a gather each step."""

SHARD_MODES = ("replicate", "fsdp")


def check_shard(owner: str, shard) -> str:
    """``shard`` if it is ``"replicate"`` or ``"fsdp"``, else a ValueError naming ``owner``."""
    if shard not in SHARD_MODES:
        raise ValueError(f"{owner}: shard={shard!r}; expected one of {SHARD_MODES}")
    return shard


def _fsdp_spec(shape, n: int, axis: str, min_size: int) -> P:
    """``P`` splitting the largest dimension of ``shape`` that ``n`` divides (the first of equal
    ones), or ``P()`` for a leaf under ``min_size`` elements or without such a dimension."""
    if n == 1 or int(np.prod(shape, dtype=np.int64)) < min_size:
        return P()
    for dim in sorted(range(len(shape)), key=lambda d: -shape[d]):
        if shape[dim] % n == 0:
            return P(*[None] * dim, axis)
    return P()


def fsdp_shardings(tree, mesh: Mesh, axis_name: str | None = None, *, min_size: int = FSDP_MIN_SIZE):
    """The `NamedSharding` of every leaf of a state under fully sharded data parallelism (FSDP).

    ZeRO stage 3: instead of a copy of every parameter, optimizer moment and EMA on each of the
    D devices of the data axis, each device keeps 1/D of each. The rule, by shape alone (so a
    parameter, its Adam moments and its EMA always get the same layout):

    * a leaf of at least ``min_size`` elements (default `FSDP_MIN_SIZE`, 4096) is split along
      its largest dimension that D divides (the first of equal sizes): ``P(None, .., axis)``;
    * a smaller leaf, one with no dimension D divides, a scalar (step count, loss scale) or a
      PRNG key stays replicated, ``P()``;
    * a `PerDevice` leaf (one slice per device) is split along its leading axis, as in
      `state_specs`.

    Args:
      tree: a `jaxdl.TrainState` or any pytree of arrays (or of ``jax.ShapeDtypeStruct``).
      mesh: the `jax.sharding.Mesh` (e.g. `data_mesh`).
      axis_name: the data axis (default: the mesh's only axis).
      min_size: the smallest leaf, in elements, that is split.

    Returns:
      A pytree like ``tree`` whose leaves are `jax.sharding.NamedSharding` (usable as
      ``jax.jit``'s ``in_shardings`` or with ``jax.device_put``).

    Source: Rajbhandari et al. 2020.

    >>> import jax, jax.numpy as jnp
    >>> from jaxdl.parallel import data_mesh, fsdp_shardings
    >>> mesh = data_mesh(1)  # with D devices, "w" would be split along its 8192 rows
    >>> shardings = fsdp_shardings({"w": jnp.zeros((8192, 2)), "b": jnp.zeros(2)}, mesh)
    >>> shardings["b"].spec == jax.sharding.PartitionSpec()
    True
    """
    axis = data_axis("fsdp_shardings", mesh, axis_name)
    check_int("fsdp_shardings", "min_size", min_size, low=0)
    n = mesh.shape[axis]

    def one(x):
        if is_key(x):
            return NamedSharding(mesh, P())
        return NamedSharding(mesh, _fsdp_spec(np.shape(x), n, axis, min_size))

    def node(x):
        if is_per_device(x):
            return PerDevice(jax.tree.map(lambda _: NamedSharding(mesh, P(axis)), x.value))
        return one(x)

    return jax.tree.map(node, tree, is_leaf=is_per_device)


def _global_array(x, sharding: NamedSharding, shape=None):
    """A global array of ``sharding`` from the host value ``x``, which every process holds."""
    if is_key(x):
        data = _global_array(
            jax.random.key_data(x),
            sharding,
            None if shape is None else (*shape, *jax.random.key_data(x).shape[x.ndim :]),
        )
        return jax.random.wrap_key_data(data, impl=jax.random.key_impl(x))
    x = np.asarray(x)
    if shape is not None and shape != x.shape:
        x = np.broadcast_to(x, shape)
    return jax.make_array_from_callback(x.shape, sharding, lambda index: x[index])


def put_state(
    tree,
    mesh: Mesh,
    axis_name: str | None = None,
    *,
    shard: str = "replicate",
    min_shard_size: int = FSDP_MIN_SIZE,
):
    """Place a data-parallel state on ``mesh``: replicated leaves ``P()``, `PerDevice` leaves
    sharded ``P(axis_name)`` with one slice per device.

    ``shard="fsdp"``: every leaf goes where `fsdp_shardings` says (large parameters, their
    optimizer moments and their EMA split over the data axis), the layout of
    ``make_sharded_train_step(..., shard="fsdp")`` (give both the same ``min_shard_size``, the
    ``min_size`` of `fsdp_shardings`).

    A `PerDevice` leaf with a leading axis of 1 (fresh from ``init``) is broadcast to every
    device; one whose leading axis already equals the number of devices is split as it is.
    Every process of a multi-host run calls this with the same ``tree``.
    """
    axis = data_axis("put_state", mesh, axis_name)
    if check_shard("put_state", shard) == "fsdp":
        shardings = fsdp_shardings(tree, mesh, axis, min_size=min_shard_size)
        return jax.tree.map(
            lambda x, s: _global_array(x, s) if not is_per_device(x) else put_state(x, mesh, axis),
            tree,
            shardings,
            is_leaf=is_per_device,
        )
    n = mesh.shape[axis]
    replicated = NamedSharding(mesh, P())
    split = NamedSharding(mesh, P(axis))

    def put_per_device(path, x):
        lead = np.shape(x)[0] if np.ndim(x) else None
        if lead not in (1, n):
            raise ValueError(
                f"put_state: per-device leaf {_path(path)} has shape {np.shape(x)}; it needs a "
                f"leading axis of 1 (fresh) or {n} (one slice per device)"
            )
        return _global_array(x, split, (n, *np.shape(x)[1:]))

    def put(node):
        if is_per_device(node):
            return PerDevice(jax.tree_util.tree_map_with_path(put_per_device, node.value))
        return _global_array(node, replicated)

    return jax.tree.map(put, tree, is_leaf=is_per_device)


def put_batch(batch, mesh: Mesh, axis_name: str | None = None, *, batch_axis: int = 0):
    """Shard a batch along its batch axis over the mesh's data axis.

    ``batch_axis=0``: one batch, leaves ``(B, ...)``, sharded ``P(axis)`` (the input of
    `make_sharded_train_step`). ``batch_axis=1``: a block of K batches stacked along a new
    leading axis, leaves ``(K, B, ...)``, sharded ``P(None, axis)`` (the input of
    `make_sharded_train_loop`); device d holds examples ``d*B/D .. (d+1)*B/D - 1`` of each.

    ``batch`` is this process's part of the global batch: the whole batch in a single-process
    run; in a run over H hosts, process h passes its own B/H examples (rows
    ``h*B/H .. (h+1)*B/H - 1`` of the global batch when processes own consecutive devices, as in
    `data_mesh`), through `jax.make_array_from_process_local_data`. The global batch must split
    evenly over the devices; otherwise a ValueError names both numbers.

    Every leaf travels once: host (numpy) leaves go straight to their shards, and a `jax.Array`
    (e.g. one prefetched to the default device) moves between devices without a round trip
    through the host (`jax.device_put` to the `NamedSharding` when the process owns every device
    of the mesh; else its shards are sliced on the device).
    """
    if batch_axis not in (0, 1) or isinstance(batch_axis, bool):
        raise ValueError(
            f"put_batch: batch_axis={batch_axis!r}; expected 0 (one batch, leaves "
            f"(B, ...)) or 1 (K stacked batches, leaves (K, B, ...))"
        )
    axis = data_axis("put_batch", mesh, axis_name)
    n = mesh.shape[axis]
    local = batch_size_of("put_batch", batch, batch_axis)
    sharding = NamedSharding(mesh, P(*[None] * batch_axis, axis))
    mine = sum(d.process_index == jax.process_index() for d in mesh.devices.flat)
    if mine == 0:
        raise ValueError(f"put_batch: process {jax.process_index()} owns no device of the mesh")
    check_divisible("put_batch", local, mine, what="global batch" if mine == n else "process-local batch")
    if mine == n:  # every shard is this process's: one direct transfer per shard
        return jax.tree.map(
            lambda x: jax.device_put(
                x if isinstance(x, (jax.Array, np.ndarray)) else np.asarray(x), sharding
            ),
            batch,
        )
    global_size = local // mine * n

    def put(x):
        shape = np.shape(x)
        global_shape = (*shape[:batch_axis], global_size, *shape[batch_axis + 1 :])
        local_data = x if isinstance(x, jax.Array) else np.asarray(x)  # a device array stays there
        return jax.make_array_from_process_local_data(sharding, local_data, global_shape)

    return jax.tree.map(put, batch)
