"""Benchmark: data-parallel train steps on fake CPU devices, and one-bit vs fp32 gradient exchange.

Step time (median of ``--repeats`` awaited steps) of an MLP on MNIST-sized inputs (784 -> 1024,
no bias -> BatchNorm -> ReLU -> 1024 -> ReLU -> 10; 1.87M float32 params), global batch 256:

* one device, `make_train_step` on the whole batch;
* `make_pmap_train_step` and `make_sharded_train_step` (fp32 `lax.pmean` of the gradients)
  on ``--devices`` fake CPU devices (64 examples each for 4);
* the sharded step with `onebit_allreduce` (error feedback; majority vote),

and the bytes each device hands to collectives per step, read from the compiled HLO
(`jaxdl.parallel.collective_bytes`). The fake devices of
``--xla_force_host_platform_device_count`` share the machine's cores, so on a CPU this measures
the overhead of data parallelism (collectives, packing), not a speedup.

``--case loop`` (issue 10) times a block of ``--block`` K steps on the same model and batch size,
batches prefetched to the default device, two ways: (a) per step, `put_batch` after the old host
round trip (``np.asarray`` of the device array, then placement) and `make_sharded_train_step`,
each step awaited; (b) the block placed once with ``put_batch(block, mesh, batch_axis=1)``
(device to device) and one `make_sharded_train_loop` call. Reported: the median of the
pair-by-pair ratios a/b (`_timing.round_robin` pairs them by round).

    python benchmarks/data_parallel.py [--repeats 30] [--devices 4] [--case steps|loop|all]
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import time


def _parse():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=30)
    ap.add_argument("--devices", type=int, default=4)
    ap.add_argument("--batch", type=int, default=256)
    ap.add_argument("--case", choices=("steps", "loop", "all"), default="all")
    ap.add_argument("--block", type=int, default=8, help="K steps per block (--case loop)")
    return ap.parse_args()


ARGS = _parse()
# Fake devices must be requested before jax is imported.
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ["XLA_FLAGS"] = (
    os.environ.get("XLA_FLAGS", "") + f" --xla_force_host_platform_device_count={ARGS.devices}"
).strip()

import jax  # noqa: E402
import numpy as np  # noqa: E402
from jax.sharding import NamedSharding  # noqa: E402
from jax.sharding import PartitionSpec as P

import jaxdl as dl  # noqa: E402
from jaxdl import layers as L  # noqa: E402
from jaxdl import parallel as par  # noqa: E402
from jaxdl import train_step as ts  # noqa: E402


def model(axis_name):
    return L.Sequential(
        L.Dense(1024, use_bias=False),
        L.BatchNorm(axis_name=axis_name),
        L.Relu(),
        L.Dense(1024),
        L.Relu(),
        L.Dense(10),
    )


class Case:
    """One step function with its own evolving state and a fixed, already placed batch."""

    def __init__(self, label, devices, step, state, batch, nbytes=None):
        self.label, self.devices, self.step, self.state, self.batch = label, devices, step, state, batch
        self.nbytes, self.times = nbytes, []

    def run(self):
        self.state, metrics = self.step(self.state, self.batch)
        jax.block_until_ready((self.state, metrics))  # every data-parallel step is awaited


def interleaved(cases, repeats):
    """Median-friendly timing on a shared machine: compile and warm every case, then time them
    round-robin, so that a change in the machine's load hits all cases alike."""
    for case in cases:
        case.run()
        case.run()
    for _ in range(repeats):
        for case in cases:
            t0 = time.perf_counter()
            case.run()
            case.times.append(time.perf_counter() - t0)


def machine_line(n_dev):
    return (
        f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores "
        f"(shared with other jobs; load average {os.getloadavg()[0]:.1f} at start); python "
        f"{sys.version.split()[0]}, jax {jax.__version__} ({jax.default_backend()}), "
        f"{n_dev} fake devices"
    )


def loop_vs_steps():
    """Issue 10: a block of K sharded steps, per-step placement + steps vs one placement + one loop."""
    sys.path.insert(0, os.path.dirname(__file__))
    from _timing import round_robin

    n_dev, k, repeats = ARGS.devices, ARGS.block, ARGS.repeats
    ds = dl.data.load_dataset("mnist5k")
    need = k * ARGS.batch
    x = ds.train.x[:need].reshape(k, ARGS.batch, -1)
    y = ds.train.y[:need].reshape(k, ARGS.batch)
    mesh = par.data_mesh(n_dev)
    tx = dl.sgd(0.01, momentum=0.9)
    loss_fn = ts.supervised_loss(model("batch"))
    state0 = par.put_state(ts.TrainState.create(model(None), tx, jax.random.key(0), (784,)), mesh)
    print(machine_line(n_dev))
    print(
        f"model: MLP 784-1024(BN)-1024-10; block of K={k} steps of global batch {ARGS.batch} "
        f"({ARGS.batch // n_dev} per device); sgd(0.01, momentum=0.9); {repeats} timed blocks each"
    )

    # Both paths start from batches already on the default device (as a prefetch queue leaves them).
    default = jax.devices()[0]
    steps_in = [jax.device_put((x[i], y[i]), default) for i in range(k)]
    block_in = jax.device_put((x, y), default)
    step = par.make_sharded_train_step(loss_fn, tx, mesh)
    loop = par.make_sharded_train_loop(loss_fn, tx, mesh)
    states = {"old": state0, "new": state0}

    def old():  # per step: device -> host (np.asarray) -> devices, then the step, awaited
        state = states["old"]
        for batch in steps_in:
            placed = par.put_batch(jax.tree.map(np.asarray, batch), mesh)
            state, metrics = step(state, placed)
            jax.block_until_ready((state, metrics))
        states["old"] = state

    def new():  # the block, device -> devices once, then one scan-fused program
        state, metrics = loop(states["new"], par.put_batch(block_in, mesh, batch_axis=1))
        jax.block_until_ready((state, metrics))
        states["new"] = state

    times = round_robin({"old": old, "new": new}, repeats)
    ratios = [a / b for a, b in zip(times["old"], times["new"])]
    print(f"\n| path (K={k} steps) | median ms / block | min ms / block | median ms / step |")
    print("| --- | ---: | ---: | ---: |")
    for name, label in (
        ("old", "(a) per step: np.asarray + put_batch + sharded step"),
        ("new", "(b) put_batch(batch_axis=1) once + sharded loop"),
    ):
        med = statistics.median(times[name])
        print(f"| {label} | {med * 1e3:.1f} | {min(times[name]) * 1e3:.1f} | {med / k * 1e3:.2f} |")
    print(
        f"\nratio (a)/(b), median of {repeats} pair-by-pair ratios: {statistics.median(ratios):.2f} "
        f"(quartiles {statistics.quantiles(ratios, n=4)[0]:.2f}-{statistics.quantiles(ratios, n=4)[2]:.2f}); "
        f"load average {os.getloadavg()[0]:.1f} at the end"
    )
    same = jax.tree.map(
        lambda a, b: float(np.max(np.abs(np.asarray(a) - np.asarray(b)))),
        states["old"].params,
        states["new"].params,
    )
    print(
        f"after {repeats + 2} blocks both paths differ by at most {max(jax.tree.leaves(same)):.1e} in any param"
    )


def main():
    if ARGS.case in ("loop", "all"):
        loop_vs_steps()
    if ARGS.case == "loop":
        return
    n_dev, repeats = ARGS.devices, ARGS.repeats
    ds = dl.data.load_dataset("mnist5k")
    x = ds.train.x[: ARGS.batch].reshape(ARGS.batch, -1)
    y = ds.train.y[: ARGS.batch]
    mesh = par.data_mesh(n_dev)
    tx = dl.sgd(0.01, momentum=0.9)
    state0 = ts.TrainState.create(model(None), tx, jax.random.key(0), (784,))
    n_params = sum(p.size for p in jax.tree.leaves(state0.params))
    load_before = os.getloadavg()
    print(
        f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores "
        f"(shared with other jobs; load average {load_before[0]:.1f} at start); python "
        f"{sys.version.split()[0]}, jax {jax.__version__} ({jax.default_backend()}), "
        f"{n_dev} fake devices"
    )
    print(
        f"model: MLP 784-1024(BN)-1024-10, {n_params / 1e6:.2f}M params; global batch "
        f"{ARGS.batch} ({ARGS.batch // n_dev} per device); optimizer sgd(0.01, momentum=0.9); "
        f"{repeats} timed steps each"
    )

    cases = []
    single = ts.make_train_step(ts.supervised_loss(model(None)), tx)
    cases.append(Case("single device (jit)", 1, single, state0, (jax.numpy.asarray(x), jax.numpy.asarray(y))))

    loss_fn = ts.supervised_loss(model("batch"))
    pmap_step = par.make_pmap_train_step(loss_fn, tx, devices=n_dev)
    pmap_mesh = jax.sharding.Mesh(np.array(par.local_devices(n_dev)), ("batch",))
    pmap_batch = jax.device_put(par.shard_batch((x, y), n_dev), NamedSharding(pmap_mesh, P("batch")))
    pstate = par.replicate(state0, n_dev)
    cases.append(
        Case(
            "pmap, fp32 pmean",
            n_dev,
            pmap_step,
            pstate,
            pmap_batch,
            par.collective_bytes(pmap_step.lower(pstate, pmap_batch)),
        )
    )

    batch = par.put_batch((x, y), mesh)
    for label, opt in (
        ("sharded, fp32 pmean", tx),
        ("sharded, one-bit EF", par.onebit_allreduce(tx)),
        ("sharded, one-bit sign (no EF)", par.onebit_allreduce(tx, mode="sign")),
        (
            "sharded, one-bit majority vote",
            par.onebit_allreduce(dl.sgd(1e-4, momentum=0.9), mode="majority_vote"),
        ),
    ):
        state = par.put_state(ts.TrainState.create(model(None), opt, jax.random.key(0), (784,)), mesh)
        step = par.make_sharded_train_step(loss_fn, opt, mesh)
        cases.append(Case(label, n_dev, step, state, batch, par.collective_bytes(step.lower(state, batch))))

    interleaved(cases, repeats)
    base = statistics.median(cases[0].times)
    fp32 = cases[2].nbytes
    print(
        "\n| step | devices | median ms | min ms | x single | all-reduce B | all-gather B | total B | "
        "fp32 / total |"
    )
    print("| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
    for case in cases:
        med = statistics.median(case.times)
        nbytes = case.nbytes
        cols = (
            ["-"] * 4
            if nbytes is None
            else [
                f"{nbytes['all-reduce']:,}",
                f"{nbytes['all-gather']:,}",
                f"{nbytes['total']:,}",
                f"{fp32['total'] / nbytes['total']:.2f}",
            ]
        )
        print(
            f"| {case.label} | {case.devices} | {med * 1e3:.2f} | {min(case.times) * 1e3:.2f} | "
            f"{med / base:.2f} | " + " | ".join(cols) + " |"
        )
    onebit = cases[3].nbytes
    grads_fp32 = 4 * n_params  # the rest of the all-reduces: BatchNorm statistics, loss, metrics
    print(
        f"\ngradient exchange alone: fp32 all-reduce {grads_fp32:,} B (4 B x {n_params:,} params) vs "
        f"one-bit all-gather {onebit['all-gather']:,} B: 1/{grads_fp32 / onebit['all-gather']:.2f}; "
        f"load average {os.getloadavg()[0]:.1f} at the end"
    )


if __name__ == "__main__":
    main()
