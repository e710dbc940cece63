"""Data parallelism: device helpers, mesh placement, one-bit gradient exchange, collective bytes.

Data parallelism (seed 001): "split minibatch into chunks & distribute to GPUs/nodes". Every
device holds the same parameters, computes the gradient of the mean loss on its chunk, and the
devices average their gradients, so that with equal chunks

.. math:: \\frac{1}{D}\\sum_{d=1}^{D} \\nabla \\frac{1}{m}\\sum_{i \\in B_d} L_i
          = \\nabla \\frac{1}{Dm}\\sum_{i \\in B} L_i ,

the gradient of the global batch B: D devices take the step one device would take on B.

Two layouts (the steps themselves live in `jaxdl.train_step`):

* `jax.pmap`: every leaf of the state carries a leading device axis (`replicate`, `unreplicate`)
  and the batch is split along a new leading axis (`shard_batch`).
* `jax.shard_map` over a `jax.sharding.Mesh` with one data axis (`data_mesh`): state leaves are
  replicated, ``P()``, the batch is sharded along its first axis, ``P(axis)`` (`put_state`,
  `put_batch`). This is the recommended path, and the one that spans many hosts.

The mesh axis name is also the axis name of the collectives: a model's `BatchNorm` must be built
with ``axis_name`` equal to it (default ``"batch"`` everywhere) to normalize over the global batch.

State that is *not* identical across devices (the error-feedback residual of `onebit_allreduce`)
sits in a `PerDevice` node and always holds one slice per device along a leading axis: fresh from
``init`` that axis has length 1 (the same slice for every device); `put_state` expands it to D
slices sharded ``P(axis)``; under pmap, `replicate` adds the device axis as for every leaf, and
each device sees its own slice of length 1.

This module knows nothing of `TrainState`; it works on pytrees.
"""

from __future__ import annotations

import math
import re
from typing import Any, NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax import lax
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

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
    "PerDevice",
    "CrossDeviceTransformation",
    "OneBitState",
    "onebit_allreduce",
    "pack_signs",
    "unpack_signs",
    "collective_bytes",
]


# ----------------------------------------------------------------------------- devices

def _path(path) -> str:
    return jax.tree_util.keystr(path) or "<root>"


def _pick_devices(owner: str, devices, available: Sequence) -> list:
    """``devices``: None (all of ``available``), a count, or a sequence of devices."""
    if devices is None:
        return list(available)
    if isinstance(devices, (int, np.integer)) and not isinstance(devices, bool):
        if devices < 1:
            raise ValueError(f"{owner}: num_devices={devices} is out of range; expected an integer >= 1")
        if devices > len(available):
            raise ValueError(
                f"{owner}: asked for {devices} devices, but only {len(available)} exist "
                f"({[str(d) for d in available]}). On CPU, set "
                f"XLA_FLAGS=--xla_force_host_platform_device_count={devices} before jax is imported.")
        return list(available)[:devices]
    devices = list(devices)
    if not devices:
        raise ValueError(f"{owner}: devices is empty")
    return devices


def local_devices(num_devices: int | None = None) -> list:
    """The first ``num_devices`` of `jax.local_devices()` (all of them for None).

    Raises ValueError naming both counts when more devices are asked for than exist.
    """
    return _pick_devices("local_devices", num_devices, jax.local_devices())


def replicate(tree, devices=None, axis_name: str = "batch"):
    """One copy of every leaf per device, stacked along a new leading axis: the pmap layout.

    ``x`` of shape ``s`` becomes an array of shape ``(D, *s)`` whose slice ``d`` lives on device
    ``d``. ``devices``: None (all local devices), a count, or a list of devices (the ones given
    to the pmap step). PRNG keys are replicated like any other leaf. The arrays are sharded
    ``P(axis_name)`` over a mesh of ``devices`` with that axis name, exactly as `jax.pmap`
    returns its outputs; give the pmap step's ``axis_name``, so that its second call reuses the
    first call's compilation instead of compiling again for another input sharding.
    """
    devs = _pick_devices("replicate", devices, jax.local_devices())
    sharding = NamedSharding(Mesh(np.array(devs), (axis_name,)), P(axis_name))

    def rep(x):
        x = jnp.asarray(x) if not is_key(x) else x
        return jax.make_array_from_single_device_arrays(
            (len(devs), *x.shape), sharding, [jax.device_put(x[None], d) for d in devs])

    return jax.tree.map(rep, tree)


def unreplicate(tree):
    """The copy on the first device: ``x[0]`` for every leaf (inverse of `replicate`).

    For state that differs across devices (a `PerDevice` residual) this keeps device 0's slice.
    """
    return jax.tree.map(lambda x: x[0], tree)


def _batch_size(owner: str, batch) -> int:
    leaves = jax.tree_util.tree_flatten_with_path(batch)[0]
    if not leaves:
        raise ValueError(f"{owner}: the batch has no arrays")
    sizes = {}
    for path, x in leaves:
        if np.ndim(x) == 0:
            raise ValueError(f"{owner}: batch leaf {_path(path)} is a scalar; every leaf needs a "
                             f"leading batch axis")
        sizes.setdefault(int(np.shape(x)[0]), _path(path))
    if len(sizes) > 1:
        raise ValueError(f"{owner}: batch leaves disagree on the batch size: "
                         + ", ".join(f"{p} has {n}" for n, p in sizes.items()))
    return next(iter(sizes))


def _check_divisible(owner: str, batch_size: int, num_devices: int, what="global batch") -> None:
    if batch_size % num_devices:
        lo = batch_size // num_devices * num_devices
        hint = f"{lo} or {lo + num_devices}" if lo else f"{num_devices}"
        raise ValueError(
            f"{owner}: the {what} of {batch_size} examples does not split evenly over "
            f"{num_devices} devices ({batch_size} = {num_devices} * {batch_size // num_devices} + "
            f"{batch_size % num_devices}); use a batch size divisible by {num_devices}, e.g. {hint}. "
            f"Examples are never dropped silently.")


def shard_batch(batch, num_devices: int):
    """Split every leaf ``(B, ...)`` into ``(num_devices, B / num_devices, ...)``: the pmap layout
    (seed 001: "split minibatch into chunks & distribute to GPUs").

    Device ``d`` gets examples ``d*B/D .. (d+1)*B/D - 1``. A batch size that ``num_devices`` does
    not divide is an error naming both numbers (nothing is dropped). numpy leaves stay numpy, so
    the transfer happens once, when the pmap step scatters the shards.
    """
    if isinstance(num_devices, bool) or not isinstance(num_devices, (int, np.integer)) or num_devices < 1:
        raise ValueError(f"shard_batch: num_devices must be an integer >= 1, got {num_devices!r}")
    size = _batch_size("shard_batch", batch)
    _check_divisible("shard_batch", size, num_devices)
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
    devs = _pick_devices("data_mesh", num_devices, jax.devices())
    return Mesh(np.array(devs), (axis_name,))


class PerDevice(NamedTuple):
    """Marks a subtree that differs across devices: one slice per device along a leading axis.

    Fresh from an optimizer's ``init`` the leading axis has length 1; `put_state` expands it to
    one slice per device and shards it along the data axis (``P(axis)``), where each device sees
    its own slice of length 1. Everything outside a `PerDevice` node is replicated (``P()``).
    """

    value: Any


def _is_per_device(x) -> bool:
    return isinstance(x, PerDevice)


def _data_axis(owner: str, mesh: Mesh, axis_name: str | None) -> str:
    if not isinstance(mesh, Mesh):
        raise TypeError(f"{owner}: mesh must be a jax.sharding.Mesh (see data_mesh), got {mesh!r}")
    if axis_name is None:
        if len(mesh.axis_names) != 1:
            raise ValueError(f"{owner}: the mesh has axes {mesh.axis_names}; pass axis_name= to "
                             f"say which one is the data axis")
        return mesh.axis_names[0]
    if axis_name not in mesh.axis_names:
        raise ValueError(f"{owner}: axis_name={axis_name!r} is not an axis of the mesh "
                         f"{mesh.axis_names}")
    return axis_name


def state_specs(tree, axis_name: str):
    """`PartitionSpec` of every leaf of a data-parallel state: ``P(axis_name)`` inside a
    `PerDevice` node, ``P()`` (replicated) elsewhere."""
    def spec(node):
        if _is_per_device(node):
            return PerDevice(jax.tree.map(lambda _: P(axis_name), node.value))
        return P()

    return jax.tree.map(spec, tree, is_leaf=_is_per_device)


def _global_array(x, sharding: NamedSharding, shape=None):
    """A global array of ``sharding`` from the host value ``x``, which every process holds."""
    if is_key(x):
        data = _global_array(jax.random.key_data(x), sharding, None if shape is None else
                             (*shape, *jax.random.key_data(x).shape[x.ndim:]))
        return jax.random.wrap_key_data(data, impl=jax.random.key_impl(x))
    x = np.asarray(x)
    if shape is not None and shape != x.shape:
        x = np.broadcast_to(x, shape)
    return jax.make_array_from_callback(x.shape, sharding, lambda index: x[index])


def put_state(tree, mesh: Mesh, axis_name: str | None = None):
    """Place a data-parallel state on ``mesh``: replicated leaves ``P()``, `PerDevice` leaves
    sharded ``P(axis_name)`` with one slice per device.

    A `PerDevice` leaf with a leading axis of 1 (fresh from ``init``) is broadcast to every
    device; one whose leading axis already equals the number of devices is split as it is.
    Every process of a multi-host run calls this with the same ``tree``.
    """
    axis = _data_axis("put_state", mesh, axis_name)
    n = mesh.shape[axis]
    replicated = NamedSharding(mesh, P())
    split = NamedSharding(mesh, P(axis))

    def put_per_device(path, x):
        lead = np.shape(x)[0] if np.ndim(x) else None
        if lead not in (1, n):
            raise ValueError(
                f"put_state: per-device leaf {_path(path)} has shape {np.shape(x)}; it needs a "
                f"leading axis of 1 (fresh) or {n} (one slice per device)")
        return _global_array(x, split, (n, *np.shape(x)[1:]))

    def put(node):
        if _is_per_device(node):
            return PerDevice(jax.tree_util.tree_map_with_path(put_per_device, node.value))
        return _global_array(node, replicated)

    return jax.tree.map(put, tree, is_leaf=_is_per_device)


def put_batch(batch, mesh: Mesh, axis_name: str | None = None):
    """Shard a batch along its first axis over the mesh's data axis (``P(axis_name)``).

    ``batch`` is this process's part of the global batch: the whole batch in a single-process
    run; in a run over H hosts, process h passes its own B/H examples (rows
    ``h*B/H .. (h+1)*B/H - 1`` of the global batch when processes own consecutive devices, as in
    `data_mesh`), through `jax.make_array_from_process_local_data`. The global batch must split
    evenly over the devices; otherwise a ValueError names both numbers.
    """
    axis = _data_axis("put_batch", mesh, axis_name)
    n = mesh.shape[axis]
    local = _batch_size("put_batch", batch)
    sharding = NamedSharding(mesh, P(axis))
    mine = sum(d.process_index == jax.process_index() for d in mesh.devices.flat)
    if mine == 0:
        raise ValueError(f"put_batch: process {jax.process_index()} owns no device of the mesh")
    _check_divisible("put_batch", local, mine,
                     what="global batch" if mine == n else "process-local batch")
    global_size = local // mine * n
    return jax.tree.map(
        lambda x: jax.make_array_from_process_local_data(sharding, np.asarray(x),
                                                         (global_size, *np.shape(x)[1:])), batch)


# ----------------------------------------------------------------------------- one-bit exchange

def pack_signs(x: jax.Array) -> jax.Array:
    """The sign bits of ``x`` (flattened, as float32), packed 32 to a ``uint32``.

    Bit ``i`` of word ``k`` is 1 where ``x[32k + i]`` has its sign bit clear (decoded as +1:
    positive numbers and +0) and 0 where it is set (decoded as -1: negative numbers and -0).
    Reading the IEEE sign bit, rather than comparing ``x >= 0``, makes the bit exact on every
    backend: XLA on CPU flushes subnormals to zero in comparisons. The last word is padded with
    zero bits. Output: ``uint32[ceil(n / 32)]`` in little-endian bit order, so its bytes equal
    ``np.packbits(~np.signbit(x), bitorder="little")``.
    """
    flat = jnp.ravel(x).astype(jnp.float32)
    n = flat.shape[0]
    words = -(-n // 32)
    bits = jnp.uint32(1) - (lax.bitcast_convert_type(flat, jnp.uint32) >> 31)
    bits = jnp.pad(bits, (0, words * 32 - n)).reshape(words, 32)
    # Distinct powers of two never carry, so the sum is the bitwise OR.
    return jnp.sum(bits << jnp.arange(32, dtype=jnp.uint32), axis=1, dtype=jnp.uint32)


def _signs(x: jax.Array) -> jax.Array:
    """+1 / -1 from the sign bit of each element, as `pack_signs` encodes it."""
    return jnp.where(jnp.signbit(x.astype(jnp.float32)), -1.0, 1.0)


def unpack_signs(packed: jax.Array, size: int, dtype=jnp.float32) -> jax.Array:
    """Inverse of `pack_signs`: ``size`` values of +1 / -1 from ``uint32`` words (leading axes of
    ``packed`` are kept: ``(..., W) -> (..., size)``)."""
    packed = jnp.asarray(packed)
    bits = (packed[..., None] >> jnp.arange(32, dtype=jnp.uint32)) & jnp.uint32(1)
    bits = bits.reshape(*packed.shape[:-1], packed.shape[-1] * 32)[..., :size]
    return (2 * bits.astype(dtype) - 1).astype(dtype)


class CrossDeviceTransformation(optax.GradientTransformation):
    """A gradient transformation whose ``update`` takes each device's *local* gradients and
    returns their cross-device mean itself, with collectives over ``self.axis_name``.

    It only runs inside a data-parallel step (pmap or shard_map with that axis). The steps of
    `jaxdl.train_step` recognize it and leave out their own full-precision ``lax.pmean`` of the
    gradients.
    """

    axis_name: str  # set on the instance (a NamedTuple subclass keeps a __dict__)


class OneBitState(NamedTuple):
    """State of `onebit_allreduce`: this device's residual (a `PerDevice` node; empty without
    error feedback) and the inner optimizer's state (replicated)."""

    residual: PerDevice
    inner: Any


_ONEBIT_MODES = ("error_feedback", "sign", "majority_vote")


def onebit_allreduce(
    optimizer: optax.GradientTransformation,
    axis_name: str = "batch",
    *,
    mode: str = "error_feedback",
) -> CrossDeviceTransformation:
    """Average gradients across devices with one bit per element, then apply ``optimizer``.

    Each device d packs the signs of ``p_d`` 32 to a ``uint32`` (`pack_signs`) and sends them with
    one float scale per leaf; every device decodes all D messages and averages them. Per leaf:

    * ``"error_feedback"`` (1-bit SGD, Seide et al. 2014; EF-SGD, Karimireddy et al. 2019):
      ``p_d = g_d + e_d``, ``s_d = mean|p_d|``, ``u = (1/D) sum_d s_d sign(p_d)``,
      ``e_d <- p_d - s_d sign(p_d)``. The residual keeps what quantization lost, so
      ``g_d + e_old = s_d sign(p_d) + e_new`` exactly and nothing is lost over time.
    * ``"sign"``: the same exchange without error feedback (``p_d = g_d``, no residual).
    * ``"majority_vote"`` (signSGD with majority vote, Bernstein et al. 2018):
      ``u = sign(sum_d sign(g_d))`` (0 on a tie); no scales, no residual. Use with a small ``lr``
      (e.g. ``sgd(1e-3)``), as signSGD.

    ``optimizer`` then turns ``u`` into the update, as it would the full-precision mean (seed 004
    calls one-bit gradients "extreme clipping"). Here ``sign(x)`` is +1 or -1 by the IEEE sign
    bit (`pack_signs`), so +0 counts as positive. The bytes a device sends per step are
    ``4*sum_i ceil(n_i/32) + 4*(L+1)`` for L leaves of n_i elements (``... + 4`` with majority
    vote), against ``4*sum_i n_i`` for a float32 all-reduce (`collective_bytes`). Seide et al.
    keep two reconstruction values per column; one mean magnitude per leaf (as
    ``jaxdl.transforms.sign_with_error_feedback``) is simpler and costs less. In the steps'
    metrics, ``grad_norm`` is the mean over devices of each device's local gradient norm.

    Storage: the residual differs across devices, so it sits in a `PerDevice` node of the state
    (``OneBitState.residual``), shape ``(1, *leaf.shape)`` per device: under pmap it gets the
    leading device axis like every leaf; under shard_map `put_state` shards it ``P(axis)``.
    If any device's gradient holds a NaN/Inf, every device's update does, so a step that skips
    non-finite updates skips on all devices alike.

    Give it to a data-parallel step as the optimizer itself (not nested in a chain), which then
    leaves out its own fp32 mean of the gradients::

        tx = onebit_allreduce(jaxdl.sgd(0.05, momentum=0.9))
        state = put_state(TrainState.create(model, tx, key, input_shape), mesh)
        step = make_sharded_train_step(loss_fn, tx, mesh)
    """
    if not isinstance(optimizer, optax.GradientTransformation):
        raise TypeError(f"onebit_allreduce: optimizer must be an optax.GradientTransformation, "
                        f"got {optimizer!r}")
    if mode not in _ONEBIT_MODES:
        raise ValueError(f"onebit_allreduce: mode={mode!r}; expected one of {_ONEBIT_MODES}")
    feedback = mode == "error_feedback"

    def init(params):
        residual = jax.tree.map(lambda p: jnp.zeros((1, *jnp.shape(p)), jnp.result_type(p)), params) \
            if feedback else None
        return OneBitState(PerDevice(residual), optimizer.init(params))

    def update(grads, state, params=None):
        leaves, treedef = jax.tree.flatten(grads)
        errors = treedef.flatten_up_to(state.residual.value) if feedback else None
        if feedback:
            leaves = [g + e[0].astype(g.dtype) for g, e in zip(leaves, errors)]
        # Each leaf is packed on its own (<= 31 padding bits per leaf) and only the small packed
        # words are concatenated: no pass over a concatenated copy of all the gradients.
        packed = [pack_signs(g) for g in leaves]
        words = np.cumsum([0] + [w.shape[0] for w in packed])
        scales = jnp.stack([jnp.mean(jnp.abs(g)).astype(jnp.float32) if g.size else jnp.float32(0)
                            for g in leaves]) if leaves else jnp.zeros((0,), jnp.float32)
        # A NaN/Inf anywhere in a leaf makes its mean magnitude non-finite: one flag per device.
        flag = jnp.where(jnp.all(jnp.isfinite(scales)), 0.0, jnp.nan)[None]
        message = flag if mode == "majority_vote" else jnp.concatenate([scales, flag])
        all_packed = lax.all_gather(jnp.concatenate(packed) if packed else jnp.zeros((0,), jnp.uint32),
                                    axis_name)  # (D, sum ceil(n_i/32)) uint32
        all_scales = lax.all_gather(message, axis_name)  # (D, L+1), or (D, 1) for majority vote
        poison = jnp.where(jnp.any(jnp.isnan(all_scales[:, -1])), jnp.nan, 0.0)
        num_devices = all_packed.shape[0]
        out, new_errors = [], []
        for i, g in enumerate(leaves):
            # A Python loop over the D messages: XLA:CPU runs a fused reduction over the leading
            # axis of an unpacked (D, n) array about 200 times slower than these D fused adds.
            s = [unpack_signs(all_packed[d, words[i]:words[i + 1]], g.size) for d in range(num_devices)]
            if mode == "majority_vote":
                u = jnp.sign(sum(s))
            else:
                u = sum(all_scales[d, i] * sd for d, sd in enumerate(s)) / num_devices
            if feedback:
                own = scales[i] * _signs(g)  # what this device's own message decodes to
                new_errors.append((g - own).astype(errors[i].dtype)[None])
            out.append((u + poison).reshape(g.shape).astype(g.dtype))
        inner_updates, inner_state = optimizer.update(treedef.unflatten(out), state.inner, params)
        residual = treedef.unflatten(new_errors) if feedback else None
        return inner_updates, OneBitState(PerDevice(residual), inner_state)

    tx = CrossDeviceTransformation(init, update)
    tx.axis_name = axis_name
    return tx


# ----------------------------------------------------------------------------- collective bytes

_DTYPE_BYTES = {
    "pred": 1, "s8": 1, "u8": 1, "s16": 2, "u16": 2, "f16": 2, "bf16": 2, "s32": 4, "u32": 4,
    "f32": 4, "s64": 8, "u64": 8, "f64": 8, "c64": 8, "c128": 16, "s4": 0.5, "u4": 0.5,
    "s2": 0.25, "u2": 0.25, "s1": 0.125, "u1": 0.125, "token": 0,
}
_COLLECTIVES = ("all-reduce", "all-gather", "reduce-scatter", "all-to-all", "collective-permute",
                "collective-broadcast", "ragged-all-to-all")
_SHAPE = re.compile(r"\b([a-z]+[0-9]*[a-z0-9]*)\[([0-9,]*)\]")
_INSTR = re.compile(r"^\s*(?:ROOT\s+)?%?([\w.\-]+)\s*=\s*(.+?)\s+([a-z][a-z0-9\-]*)\((.*)$")


def _shape_bytes(shape_text: str) -> float:
    total = 0.0
    for dtype, dims in _SHAPE.findall(shape_text):
        if dtype.startswith("f8") or dtype.startswith("f4"):
            size = 1 if dtype.startswith("f8") else 0.5
        elif dtype in _DTYPE_BYTES:
            size = _DTYPE_BYTES[dtype]
        else:
            continue  # not a dtype (e.g. a layout tag)
        total += size * math.prod(int(d) for d in dims.split(",") if d)
    return total


def _operand_names(args: str) -> list[str]:
    depth, end = 0, len(args)
    for i, ch in enumerate(args):  # the operand list ends at the ")" that closes the call
        if ch in "([{":
            depth += 1
        elif ch in ")]}":
            if depth == 0:
                end = i
                break
            depth -= 1
    return re.findall(r"%([\w.\-]+)", args[:end])


def collective_bytes(program) -> dict[str, int]:
    """Bytes each device hands to collectives in one run of a compiled program, by kind.

    Parses the compiled HLO text (`jax.stages.Compiled`; a `Lowered` is compiled first; or the
    text itself): for every ``all-reduce``, ``all-gather``, ``reduce-scatter``, ``all-to-all`` and
    ``collective-permute`` (and their async ``-start`` forms), it sums the sizes of the operands
    (shape x dtype width, looked up where each operand is defined). That is the data a device
    contributes: n*4 bytes for a float32 all-reduce of n values, n/32*4 for an all-gather of the
    n/32 packed words of `onebit_allreduce`. (What travels on the wire also depends on the
    algorithm, e.g. a ring all-reduce moves 2(D-1)/D of its operand.) Returns
    ``{kind: bytes, ..., "total": bytes}``.
    """
    if hasattr(program, "compile"):  # a Lowered (a Compiled has no .compile)
        program = program.compile()
    text = program if isinstance(program, str) else program.as_text()
    shapes, calls = {}, []
    for line in text.splitlines():
        m = _INSTR.match(line)
        if not m:
            continue
        name, shape, opcode, args = m.groups()
        shapes[name] = shape
        kind = opcode[:-len("-start")] if opcode.endswith("-start") else opcode
        if kind in _COLLECTIVES:
            calls.append((kind, args))
    out = {kind: 0 for kind in _COLLECTIVES}
    for kind, args in calls:
        out[kind] += int(sum(_shape_bytes(shapes.get(op, "")) for op in _operand_names(args)))
    out["total"] = sum(out.values())
    return out
