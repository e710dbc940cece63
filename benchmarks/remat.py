"""Benchmark: temporaries and step time of rematerialization (gradient checkpointing).

`jaxdl.models.mlp(10, depth=D, width=512)` on a batch of 2048 examples of 512 features, SGD,
one compiled `make_train_step` per variant:

* ``none``: every activation kept for the backward pass;
* ``remat=True``: each top-level layer of the Sequential in `jaxdl.layers.Remat`;
* ``blocks of 2``: ``Remat(Sequential(Dense, Relu, Dense, Relu))`` per two hidden layers.

Reported: ``compiled.memory_analysis().temp_size_in_bytes`` (XLA's temporaries: the activations
kept for the backward pass and the scratch of the step) and the step time (median of
``--repeats`` awaited steps, variants alternating, `_timing.round_robin`). jax 0.10.2's XLA:CPU
folds the recomputation back into the forward pass (no saving shows there); measure on 0.12.

    python benchmarks/remat.py [--depths 8 16] [--batch 2048] [--width 512] [--repeats 5]
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics

os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402
import numpy as np  # noqa: E402
from _timing import round_robin  # noqa: E402

import jaxdl as dl  # noqa: E402
from jaxdl import layers as L  # noqa: E402
from jaxdl import models  # noqa: E402
from jaxdl import train_step as ts  # noqa: E402


def blocks_of_two(model: L.Sequential) -> L.Sequential:
    """``mlp``'s layers (Flatten, D x [Dense, Relu], Dense) with each two hidden layers in a Remat."""
    flatten, *hidden, head = model.layers
    pairs = [hidden[i : i + 2] for i in range(0, len(hidden), 2)]  # [Dense, Relu] per hidden layer
    blocks = [L.Remat(L.Sequential(*pairs[i], *pairs[i + 1])) for i in range(0, len(pairs) - 1, 2)]
    if len(pairs) % 2:
        blocks.append(L.Remat(L.Sequential(*pairs[-1])))
    return L.Sequential(flatten, *blocks, head)


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--depths", type=int, nargs="+", default=[8, 16])
    ap.add_argument("--batch", type=int, default=2048)
    ap.add_argument("--width", type=int, default=512)
    ap.add_argument("--repeats", type=int, default=5)
    args = ap.parse_args()
    print(
        f"jax {jax.__version__}, {platform.machine()} {os.cpu_count()} cores, batch {args.batch}, width {args.width}"
    )
    print("| depth | variant | temporaries MB | of none | step ms | of none |")
    print("|---|---|---|---|---|---|")
    rng = np.random.RandomState(0)
    batch = (
        rng.randn(args.batch, args.width).astype(np.float32),
        rng.randint(0, 10, args.batch).astype(np.int32),
    )
    tx = dl.sgd(0.01)
    for depth in args.depths:
        model = models.mlp(10, depth=depth, width=args.width)
        blocks = blocks_of_two(model)
        state = ts.TrainState.create(model, tx, jax.random.key(0), (args.width,))
        block_state = ts.TrainState.create(blocks, tx, jax.random.key(0), (args.width,))
        variants = {
            "none": (ts.make_train_step(ts.supervised_loss(model), tx), state),
            "remat=True": (ts.make_train_step(ts.supervised_loss(model), tx, remat=True), state),
            "blocks of 2": (ts.make_train_step(ts.supervised_loss(blocks), tx), block_state),
        }
        temp, runners = {}, {}
        for name, (step, state) in variants.items():
            temp[name] = step.lower(state, batch).compile().memory_analysis().temp_size_in_bytes

            def run(step=step, state=state):
                jax.block_until_ready(step(state, batch))

            runners[name] = run
        times = {k: statistics.median(v) for k, v in round_robin(runners, args.repeats, warmup=1).items()}
        for name in variants:
            print(
                f"| {depth} | {name} | {temp[name] / 1e6:.1f} | {temp[name] / temp['none']:.2f} | "
                f"{times[name] * 1e3:.0f} | {times[name] / times['none']:.2f} |",
                flush=True,
            )


if __name__ == "__main__":
    main()
