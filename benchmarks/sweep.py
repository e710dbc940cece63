"""Benchmark: a 16-learning-rate sweep, vmapped (jaxdl.sweep) vs sequential, in one run.

Task: 16 learning rates x 200 steps of a tiny MLP 64-128-128-10 (ReLU), batch 32, Adam, on
random data (the same 200 batches for every run). Contenders:

1. ``jaxdl.sweep.sweep``: all 16 runs in one compiled, vmapped call (init + scan-fused loop +
   final metrics).
2. The best sequential way in JAX: one compiled function ``run(seed, lr)`` (init + the same
   scan-fused `make_train_loop`, lr a traced argument so it compiles once) called 16 times.
3. PyTorch eager, sequential: 16 x (fresh model, ``torch.optim.Adam``, 200 steps).

Steady-state times are medians over ``--repeats`` repeats of the whole sweep, each time with new
learning rates (to show that the vmapped sweep does not recompile). The two JAX contenders are
timed round-robin (one whole sweep of each in turn), so machine load hits them alike; PyTorch is
timed in a block of its own (interleaved with XLA, the two spin-waiting thread pools starve each
other on 2 cores; see `_timing.round_robin`). Compile time (first call minus a steady call) is
reported apart.

    python benchmarks/sweep.py [--repeats 7] [--runs 16] [--steps 200]
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _timing import round_robin, timeit  # noqa: E402

import jaxdl as dl  # noqa: E402
from jaxdl import layers as L  # noqa: E402
from jaxdl import train_step as ts  # noqa: E402
from jaxdl.sweep import sweep  # noqa: E402

D, WIDTHS, BATCH = 64, (128, 128, 10), 32


def _model():
    layers = []
    for w in WIDTHS[:-1]:
        layers += [L.Dense(w), L.Relu()]
    return L.Sequential(*layers, L.Dense(WIDTHS[-1]))


def _data(steps, seed=0):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(steps, BATCH, D)).astype(np.float32)
    y = rng.integers(0, WIDTHS[-1], (steps, BATCH)).astype(np.int32)
    return x, y


def _lrs(runs, repeat):
    """A fresh set of learning rates per repeat (log-spaced, shifted), so no value is reused."""
    return np.geomspace(1e-4, 1e-1, runs) * (1.0 + 0.01 * repeat)


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--runs", type=int, default=16)
    ap.add_argument("--steps", type=int, default=200)
    args = ap.parse_args()
    torch.set_num_threads(os.cpu_count() or 1)
    print(
        f"machine: {platform.machine()}, {os.cpu_count()} cores, load average {os.getloadavg()[0]:.1f}; "
        f"jax {jax.__version__} ({jax.default_backend()}), torch {torch.__version__}"
    )
    print(
        f"{args.runs} learning rates x {args.steps} steps, MLP {D}-{'-'.join(map(str, WIDTHS))}, "
        f"batch {BATCH}, Adam"
    )

    x, y = _data(args.steps)
    xj, yj = jnp.asarray(x), jnp.asarray(y)
    model = _model()
    loss_fn = ts.supervised_loss(model)
    counter = {"repeat": 0}

    # 1. vmapped sweep
    def run_sweep():
        lrs = _lrs(args.runs, counter["repeat"])
        res = sweep(loss_fn, dl.adam, model, (D,), (xj, yj), hparams={"lr": lrs})
        return res["final_loss"]

    # 2. one compiled single run, called once per learning rate
    @jax.jit
    def single(seed, lr, batches):
        tx = dl.adam(lr)
        state = ts.TrainState.create(model, tx, jax.random.key(seed), (D,))
        state, metrics = ts.make_train_loop(loss_fn, tx)(state, batches)
        return metrics["loss"][-1]

    def run_sequential():
        out = [single(0, jnp.float32(lr), (xj, yj)) for lr in _lrs(args.runs, counter["repeat"])]
        return np.asarray(jax.block_until_ready(out))

    # 3. PyTorch eager
    xt, yt = torch.from_numpy(x), torch.from_numpy(y).long()

    def run_torch():
        losses = []
        for i, lr in enumerate(_lrs(args.runs, counter["repeat"])):
            torch.manual_seed(i)
            mods, last = [], D
            for w in WIDTHS[:-1]:
                mods += [torch.nn.Linear(last, w), torch.nn.ReLU()]
                last = w
            net = torch.nn.Sequential(*mods, torch.nn.Linear(last, WIDTHS[-1]))
            opt = torch.optim.Adam(net.parameters(), lr=float(lr))
            lossf = torch.nn.CrossEntropyLoss()
            for k in range(args.steps):
                opt.zero_grad(set_to_none=True)
                loss = lossf(net(xt[k]), yt[k])
                loss.backward()
                opt.step()
            losses.append(loss.item())
        return np.array(losses)

    # compile (first call) vs steady state, for the two JAX contenders
    compile_s = {}
    for name, fn in (("vmapped sweep", run_sweep), ("sequential (1 compiled scan x runs)", run_sequential)):
        t0 = time.perf_counter()
        fn()
        first = time.perf_counter() - t0
        counter["repeat"] += 1  # new learning rates: must not recompile
        t0 = time.perf_counter()
        fn()
        compile_s[name] = first - (time.perf_counter() - t0)

    # the two JAX ways compute the same runs (up to float rounding, which 200 Adam steps on
    # random labels can amplify to ~1e-4 relative in an odd run)
    a, b = run_sweep(), run_sequential()
    np.testing.assert_allclose(a, b, rtol=2e-3)
    print(
        f"sweep vs sequential final losses: max relative difference {np.max(np.abs(a - b) / np.abs(b)):.1e}"
    )

    def bump(fn):
        def wrapped():
            counter["repeat"] += 1
            fn()

        return wrapped

    times = round_robin(
        {"vmapped sweep": bump(run_sweep), "sequential (1 compiled scan x runs)": bump(run_sequential)},
        args.repeats,
        warmup=1,
    )
    times["torch eager sequential"] = timeit(bump(run_torch), args.repeats, warmup=1)
    ref = "sequential (1 compiled scan x runs)"
    med = {k: statistics.median(v) for k, v in times.items()}
    print(
        f"\n  {'contender':<38} {'median s':>9} {'min s':>8} {'max s':>8}   {'x best sequential':>17}   compile s"
    )
    for k, v in times.items():
        comp = f"{compile_s[k]:9.2f}" if k in compile_s else "        -"
        print(f"  {k:<38} {med[k]:9.3f} {min(v):8.3f} {max(v):8.3f}   {med[k] / med[ref]:17.2f}   {comp}")
    per_step = {k: med[k] / (args.runs * args.steps) * 1e6 for k in med}
    print("\n  per run-step (us): " + ", ".join(f"{k}: {v:.1f}" for k, v in per_step.items()))
    print(f"  load average after: {os.getloadavg()[0]:.1f}")


if __name__ == "__main__":
    main()
