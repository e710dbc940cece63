"""Benchmark: jaxdl train steps vs flax.linen + optax vs PyTorch eager, in one run.

1. MLP 784-1024-1024-10, batch 256, Adam, float32: one step each (jaxdl and flax+optax whole
   step jitted; PyTorch eager with Adam(fused=True)).
2. Tiny MLP 64-128-128-10, batch 32, Adam: jaxdl's scan-fused loop (K steps per call) vs
   flax+optax one jitted step per call vs PyTorch eager; reported per step.
3. First-call time (trace + compile + run) of the big MLP step, jaxdl vs flax+optax.

JAX contenders are timed round-robin (one call of each in turn), so machine load hits them
alike; PyTorch is timed in a block of its own (interleaved with XLA, the two spin-waiting thread
pools starve each other on 2 cores).

    python benchmarks/train_step.py [--repeats 30]
    python benchmarks/train_step.py --case issue12   # fp32 vs bf16; accumulation memory (issue 12)
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import time

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
from _timing import round_robin, timeit

import jaxdl as dl
from jaxdl import layers as L
from jaxdl import train_step as ts

try:
    import torch
except ImportError:  # Python 3.12+ in this project: no torch; its rows are left out
    torch = None


def _data(batch, d, classes, seed=0):
    rng = np.random.default_rng(seed)
    return rng.normal(size=(batch, d)).astype(np.float32), rng.integers(0, classes, batch).astype(np.int32)


class FlaxMLP(nn.Module):
    widths: tuple

    @nn.compact
    def __call__(self, x):
        for w in self.widths[:-1]:
            x = nn.relu(nn.Dense(w)(x))
        return nn.Dense(self.widths[-1])(x)


def flax_step_fn(widths, tx):
    model = FlaxMLP(widths)

    def loss(p, x, y):
        return optax.softmax_cross_entropy_with_integer_labels(model.apply({"params": p}, x), y).mean()

    @jax.jit
    def step(p, s, x, y):
        l, g = jax.value_and_grad(loss)(p, x, y)
        u, s = tx.update(g, s, p)
        return optax.apply_updates(p, u), s, l

    def init(x):
        p = model.init(jax.random.key(0), x)["params"]
        return p, tx.init(p)

    return init, step


def jaxdl_model(widths):
    layers = []
    for w in widths[:-1]:
        layers += [L.Dense(w), L.Relu()]
    return L.Sequential(*layers, L.Dense(widths[-1]))


def torch_model(d, widths):
    mods, last = [], d
    for w in widths[:-1]:
        mods += [torch.nn.Linear(last, w), torch.nn.ReLU()]
        last = w
    return torch.nn.Sequential(*mods, torch.nn.Linear(last, widths[-1]))


def torch_step_fn(d, widths):
    model = torch_model(d, widths)
    opt = torch.optim.Adam(model.parameters(), lr=1e-3, fused=True)
    loss_fn = torch.nn.CrossEntropyLoss()

    def step(x, y):
        opt.zero_grad(set_to_none=True)
        loss = loss_fn(model(x), y)
        loss.backward()
        opt.step()
        return loss

    return step


def bench_big(repeats):
    d, widths, batch = 784, (1024, 1024, 10), 256
    x, y = _data(batch, d, 10)
    xj, yj = jnp.asarray(x), jnp.asarray(y)
    tx = dl.adam(1e-3)
    model = jaxdl_model(widths)
    holder = {"s": ts.TrainState.create(model, tx, jax.random.key(0), (d,))}
    step = ts.make_train_step(ts.supervised_loss(model), tx)

    def run_jaxdl():
        holder["s"], m = step(holder["s"], (xj, yj))
        jax.block_until_ready(m["loss"])

    finit, fstep = flax_step_fn(widths, optax.adam(1e-3))
    fh = dict(zip(("p", "s"), finit(xj)))

    def run_flax():
        fh["p"], fh["s"], loss = fstep(fh["p"], fh["s"], xj, yj)
        jax.block_until_ready(loss)

    times = round_robin({"jaxdl": run_jaxdl, "flax+optax": run_flax}, repeats)
    if torch is not None:
        tstep = torch_step_fn(d, widths)
        xt, yt = torch.from_numpy(x), torch.from_numpy(y).long()
        times["torch eager"] = timeit(lambda: tstep(xt, yt), repeats)  # apart: see _timing.round_robin
    return times


def bench_tiny(repeats, k=100):
    d, widths, batch = 64, (128, 128, 10), 32
    xs, ys = _data(batch * k, d, 10)
    xs, ys = xs.reshape(k, batch, d), ys.reshape(k, batch)
    xj, yj = jnp.asarray(xs), jnp.asarray(ys)
    tx = dl.adam(1e-3)
    model = jaxdl_model(widths)
    holder = {"s": ts.TrainState.create(model, tx, jax.random.key(0), (d,))}
    loop = ts.make_train_loop(ts.supervised_loss(model), tx)

    def run_jaxdl():
        holder["s"], m = loop(holder["s"], (xj, yj))
        jax.block_until_ready(m["loss"])

    finit, fstep = flax_step_fn(widths, optax.adam(1e-3))
    fh = dict(zip(("p", "s"), finit(xj[0])))
    fx = [xj[i] for i in range(k)]
    fy = [yj[i] for i in range(k)]

    def run_flax():
        for i in range(k):
            fh["p"], fh["s"], loss = fstep(fh["p"], fh["s"], fx[i], fy[i])
        jax.block_until_ready(loss)

    times = round_robin({"jaxdl scan loop": run_jaxdl, "flax+optax loop": run_flax}, repeats)
    if torch is not None:
        tstep = torch_step_fn(d, widths)
        tx_, ty_ = torch.from_numpy(xs), torch.from_numpy(ys).long()

        def run_torch():
            for i in range(k):
                tstep(tx_[i], ty_[i])

        times["torch eager"] = timeit(run_torch, repeats)
    return {name: [t / k for t in ts_] for name, ts_ in times.items()}


def bench_compile(repeats=5):
    d, widths, batch = 784, (1024, 1024, 10), 256
    x, y = _data(batch, d, 10)
    xj, yj = jnp.asarray(x), jnp.asarray(y)
    out = {"jaxdl": [], "flax+optax": []}
    for _ in range(repeats):
        jax.clear_caches()
        tx = dl.adam(1e-3)
        model = jaxdl_model(widths)
        state = ts.TrainState.create(model, tx, jax.random.key(0), (d,))
        jax.block_until_ready(state)
        t0 = time.perf_counter()
        _, m = ts.make_train_step(ts.supervised_loss(model), tx)(state, (xj, yj))
        jax.block_until_ready(m["loss"])
        out["jaxdl"].append(time.perf_counter() - t0)

        jax.clear_caches()
        finit, fstep = flax_step_fn(widths, optax.adam(1e-3))
        p, s = finit(xj)
        jax.block_until_ready(p)
        t0 = time.perf_counter()
        jax.block_until_ready(fstep(p, s, xj, yj)[2])
        out["flax+optax"].append(time.perf_counter() - t0)
    return out


def _memory(step, *args):
    """``(temp, argument, output)`` bytes of the compiled program (``memory_analysis``)."""
    m = jax.jit(step).lower(*args).compile().memory_analysis()
    return m.temp_size_in_bytes, m.argument_size_in_bytes, m.output_size_in_bytes


def bench_precision(repeats=10):
    """Issue 12: one step in float32 vs bfloat16 compute (float32 master weights), time and the
    compiled program's memory; the big MLP at batch 256 and the default CNN at batch 64."""
    from jaxdl import models

    cases = {
        "MLP 784-1024-1024-10, batch 256": (jaxdl_model((1024, 1024, 10)), (784,), 256),
        "default CNN (models.cnn), batch 64": (models.cnn(10, dropout=0.25), (28, 28, 1), 64),
    }
    out = {}
    for title, (model, shape, batch) in cases.items():
        rng = np.random.default_rng(0)
        x = jnp.asarray(rng.normal(size=(batch, *shape)).astype(np.float32))
        y = jnp.asarray(rng.integers(0, 10, batch).astype(np.int32))
        tx = dl.adam(1e-3)
        loss = ts.supervised_loss(model)
        runners, mem = {}, {}
        for prec in ("fp32", "bf16"):
            step = ts.make_train_step(loss, tx, precision=None if prec == "fp32" else prec)
            st = {"s": ts.TrainState.create(model, tx, jax.random.key(0), shape)}
            mem[prec] = _memory(step, st["s"], (x, y))

            def run(step=step, st=st):
                st["s"], m = step(st["s"], (x, y))
                jax.block_until_ready(m["loss"])

            runners[prec] = run
        times = round_robin(runners, repeats)
        out[title] = (times, mem)
    return out


def bench_accumulation_memory():
    """Issue 12: peak temporary memory of one optimizer step on a global batch of 2048 (MLP
    784-1024-1024-10, Adam): the whole batch (K=1), 8 micro-batches in a scan (K=8), and
    optax.MultiSteps(every_k_schedule=8) fed 8 calls of 256 (its accumulator lives in the state)."""
    model, d, gb = jaxdl_model((1024, 1024, 10)), 784, 2048
    loss = ts.supervised_loss(model)
    x, y = _data(gb, d, 10)
    tx = dl.adam(1e-3)
    state = ts.TrainState.create(model, tx, jax.random.key(0), (d,))
    rows = {}
    for k in (1, 8):
        rows[f"jaxdl micro_batches={k}, batch {gb}"] = _memory(
            ts.make_train_step(loss, tx, micro_batches=k), state, (x, y)
        )
    multi = optax.MultiSteps(optax.adam(1e-3), every_k_schedule=8).gradient_transformation()
    mstate = ts.TrainState.create(model, multi, jax.random.key(0), (d,))
    rows["optax.MultiSteps(k=8), batch 256 per call"] = _memory(
        ts.make_train_step(loss, multi), mstate, (x[:256], y[:256])
    )
    return rows


def report(title, results, ref, unit="ms", scale=1e3):
    print(f"\n{title}")
    med = {k: statistics.median(v) for k, v in results.items()}
    print(f"  {'impl':<18} {'median':>9} {'min':>9} {'max':>9}   {'time / ' + ref:>14}   throughput x torch")
    for k, v in results.items():
        vs_torch = f"{med['torch eager'] / med[k]:8.2f}" if "torch eager" in med else "       -"
        print(
            f"  {k:<18} {med[k] * scale:7.2f}{unit} {min(v) * scale:7.2f}{unit} {max(v) * scale:7.2f}{unit}"
            f"   {med[k] / med[ref]:14.2f}   {vs_torch}"
        )


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=30)
    ap.add_argument(
        "--case",
        choices=("compare", "issue12"),
        default="compare",
        help="compare: jaxdl vs flax+optax vs torch; issue12: fp32 vs bf16 step time and "
        "memory, accumulation memory vs optax.MultiSteps",
    )
    args = ap.parse_args()
    if torch is not None:
        torch.set_num_threads(os.cpu_count() or 1)
    print(
        f"machine: {platform.machine()}, {os.cpu_count()} cores; jax {jax.__version__} ({jax.default_backend()}), "
        f"flax {flax.__version__}, optax {optax.__version__}, torch {torch.__version__ if torch else 'not installed'}"
    )
    if args.case == "issue12":
        for title, (times, mem) in bench_precision(max(args.repeats // 3, 5)).items():
            print(f"\n{title}, Adam: one step, float32 vs bf16 compute (float32 master weights)")
            for prec, t in times.items():
                temp, arg, outb = mem[prec]
                print(
                    f"  {prec}: median {statistics.median(t) * 1e3:8.2f} ms (min {min(t) * 1e3:.2f}), "
                    f"temp {temp:,} B, arguments {arg:,} B, outputs {outb:,} B"
                )
        print("\nOne optimizer step on a global batch of 2048, MLP 784-1024-1024-10, Adam (memory_analysis)")
        for name, (temp, arg, _outb) in bench_accumulation_memory().items():
            print(f"  {name:<44} temp {temp:>13,} B   arguments (state + batch) {arg:>12,} B")
        return
    report("MLP 784-1024-1024-10, batch 256, Adam: one step", bench_big(args.repeats), "flax+optax")
    report(
        "Tiny MLP 64-128-128-10, batch 32, Adam: per step (100 steps per call)",
        bench_tiny(max(args.repeats // 3, 5)),
        "flax+optax loop",
        unit="us",
        scale=1e6,
    )
    report(
        "First call (trace + compile + one step) of the big MLP step",
        bench_compile(),
        "flax+optax",
        unit="s ",
        scale=1,
    )


if __name__ == "__main__":
    main()
