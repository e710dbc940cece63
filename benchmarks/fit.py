"""Benchmark: the overhead of `jaxdl.fit` per epoch against a hand loop of `make_train_step`.

The default MLP of ``jaxdl train`` (Flatten, 2 x [Dense 512, ReLU, Dropout 0.2], Dense 10; Adam)
on mnist5k (3,500 training images, batch 64: 54 steps per epoch), in one process:

- fit: `jaxdl.fit(..., epochs=E, validation=val)`; an epoch's time is its history ``seconds``
  (the scan-fused blocks, the transfers, the host-side bookkeeping and the validation pass);
- hand loop: ``for x, y in data.batches(...): state, m = step(state, (x, y))`` with the jitted
  `make_train_step` (one dispatch per step), then the same validation pass, timed per epoch.

Epoch 1 (compilation) is left out. The two runs alternate ``--rounds`` times so that machine load
hits both alike; the figure is the median over rounds of (fit epoch / hand-loop epoch), each the
median of that run's epochs.

    python benchmarks/fit.py [--epochs 6] [--rounds 3]
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import time

import jax

import jaxdl as dl
from jaxdl import data


def hand_loop(model, tx, ds, epochs, batch_size, seed):
    model_key, data_key, _ = dl.trainer.run_keys(seed)
    state = dl.TrainState.create(model, tx, model_key, ds.train.x.shape[1:])
    loss_fn = dl.supervised_loss(model)
    step, evaluate = dl.make_train_step(loss_fn, tx), dl.make_eval_step(loss_fn)
    seconds = []
    for epoch in range(epochs):
        t0 = time.perf_counter()
        for xb, yb in data.batches(ds.train.x, ds.train.y, batch_size, data_key, epoch):
            state, metrics = step(state, (xb, yb))
        jax.block_until_ready(metrics)
        val = evaluate(state, (ds.val.x, ds.val.y))
        float(val["loss"])
        seconds.append(time.perf_counter() - t0)
    return seconds, float(val["accuracy"])


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=6)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    ds = data.load_dataset("mnist5k")
    print(
        f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores, "
        f"load {os.getloadavg()[0]:.1f}; jax {jax.__version__} ({jax.default_backend()})"
    )
    ratios, fit_epochs, hand_epochs = [], [], []
    for r in range(args.rounds):
        model = dl.models.mlp(10, dropout=0.2)
        result = dl.fit(
            model,
            dl.adam(2e-3),
            ds.train,
            validation=ds.val,
            epochs=args.epochs,
            batch_size=64,
            progress=False,
        )
        f = statistics.median(h["seconds"] for h in result.history[1:])
        h, _ = hand_loop(dl.models.mlp(10, dropout=0.2), dl.adam(2e-3), ds, args.epochs, 64, 0)
        h = statistics.median(h[1:])
        fit_epochs.append(f)
        hand_epochs.append(h)
        ratios.append(f / h)
        print(
            f"round {r + 1}: fit {f * 1e3:.0f} ms/epoch, hand loop {h * 1e3:.0f} ms/epoch, "
            f"ratio {f / h:.2f} (load {os.getloadavg()[0]:.1f})"
        )
    print(
        f"median fit/hand-loop epoch time: {statistics.median(ratios):.2f} "
        f"(range {min(ratios):.2f}-{max(ratios):.2f}); fit {statistics.median(fit_epochs) * 1e3:.0f} ms, "
        f"hand loop {statistics.median(hand_epochs) * 1e3:.0f} ms per 54-step epoch"
    )


if __name__ == "__main__":
    main()
