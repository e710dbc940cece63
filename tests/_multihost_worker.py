"""One process of the two-process data-parallel run of tests/test_multihost.py.

    python tests/_multihost_worker.py --port P --process-id I --num-processes 2 --out result.npz

The launcher sets JAX_PLATFORMS=cpu and XLA_FLAGS=--xla_force_host_platform_device_count=2, so
the processes together hold 4 CPU devices; cross-process collectives go through gloo (JAX's
default ``jax_cpu_collectives_implementation`` on CPU). Every process builds the same state,
feeds its own half of each global batch (`jaxdl.parallel.put_batch`) and runs the sharded step
over the global mesh, then once more with all steps in one `make_sharded_train_loop` call on its
half of the stacked block (``put_batch(..., batch_axis=1)``), and last trains with
``fit(..., devices=4, shard="fsdp")`` (`fit_fsdp`); process 0 writes the final states. `train`
and `fit_fsdp` are also what the test runs in a single process with 4 devices, as the reference.
"""

from __future__ import annotations

import argparse

import jax
import numpy as np

STEPS, GLOBAL_BATCH, FEATURES, CLASSES = 3, 32, 8, 4


def batches():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(STEPS, GLOBAL_BATCH, FEATURES)).astype(np.float32)
    y = np.argmax(x @ rng.normal(size=(FEATURES, CLASSES)), -1).astype(np.int32)
    return x, y


def optimizers():
    import jaxdl as dl
    from jaxdl import parallel

    return {"adam": dl.adam(1e-2), "onebit": parallel.onebit_allreduce(dl.sgd(0.1, momentum=0.9))}


def train(name: str, mesh, rows: slice, loop: bool = False) -> dict[str, np.ndarray]:
    """``STEPS`` sharded steps feeding ``rows`` of each global batch (``loop``: one sharded loop
    over the stacked block); the final state as arrays."""
    from jax.experimental import multihost_utils

    from jaxdl import layers as L
    from jaxdl import parallel
    from jaxdl import train_step as ts

    model = L.Sequential(
        L.Dense(16, use_bias=False), L.BatchNorm(axis_name="batch"), L.Relu(), L.Dense(CLASSES)
    )
    tx = optimizers()[name]
    state = parallel.put_state(ts.TrainState.create(model, tx, jax.random.key(0), (FEATURES,)), mesh)
    x, y = batches()
    if loop:
        run = parallel.make_sharded_train_loop(ts.supervised_loss(model), tx, mesh)
        state, metrics = run(state, parallel.put_batch((x[:, rows], y[:, rows]), mesh, batch_axis=1))
        jax.block_until_ready((state, metrics))
        metrics = jax.tree.map(lambda m: m[-1], metrics)
    step = parallel.make_sharded_train_step(ts.supervised_loss(model), tx, mesh)
    for i in range(0 if loop else STEPS):
        state, metrics = step(state, parallel.put_batch((x[i, rows], y[i, rows]), mesh))
        jax.block_until_ready((state, metrics))
    leaves = jax.tree_util.tree_flatten_with_path((state.params, state.model_state, state.opt_state))[0]
    out = {
        jax.tree_util.keystr(path): np.asarray(multihost_utils.process_allgather(x, tiled=True))
        for path, x in leaves
    }
    out["loss"] = np.asarray(metrics["loss"])
    return out


def fit_fsdp() -> dict[str, np.ndarray]:
    """`jaxdl.fit` with ``shard="fsdp"`` over 4 devices (of all processes) on the whole data,
    which every process passes (each places only its devices' part of every block); the final
    params, optimizer state and one epoch's loss as arrays."""
    from jax.experimental import multihost_utils

    import jaxdl as dl
    from jaxdl import layers as L

    x, y = batches()
    x, y = x.reshape(-1, FEATURES), y.reshape(-1)
    model = L.Sequential(L.Dense(512), L.Tanh(), L.Dense(CLASSES))  # an 8 x 512 kernel: split
    result = dl.fit(
        model,
        dl.adam(1e-2),
        (x, y),
        epochs=1,
        batch_size=GLOBAL_BATCH,
        devices=4,
        shard="fsdp",
        progress=False,
    )
    leaves = jax.tree_util.tree_flatten_with_path((result.state.params, result.state.opt_state))[0]
    out = {
        "fsdp/" + jax.tree_util.keystr(path): np.asarray(multihost_utils.process_allgather(x, tiled=True))
        for path, x in leaves
    }
    out["fsdp/sharded"] = np.asarray(not result.state.params["dense_0"]["w"].sharding.is_fully_replicated)
    out["fsdp/train_loss"] = np.asarray(result.history[-1]["train_loss"])
    return out


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--process-id", type=int, required=True)
    parser.add_argument("--num-processes", type=int, default=2)
    parser.add_argument("--out", required=True)
    args = parser.parse_args()

    jax.distributed.initialize(
        coordinator_address=f"127.0.0.1:{args.port}",
        num_processes=args.num_processes,
        process_id=args.process_id,
        initialization_timeout=60,
    )
    from jaxdl import parallel

    mesh = parallel.data_mesh()  # every process's devices, in process order
    assert jax.process_count() == args.num_processes and len(mesh.devices) == 2 * args.num_processes
    share = GLOBAL_BATCH // args.num_processes
    rows = slice(args.process_id * share, (args.process_id + 1) * share)
    results = {}
    for name in optimizers():
        results.update({f"{name}/{k}": v for k, v in train(name, mesh, rows).items()})
        results.update({f"{name}+loop/{k}": v for k, v in train(name, mesh, rows, loop=True).items()})
    results.update(fit_fsdp())
    if args.process_id == 0:
        np.savez(args.out, **results)
    jax.distributed.shutdown()


if __name__ == "__main__":
    main()
