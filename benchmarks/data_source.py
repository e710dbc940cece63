"""Benchmark: `jaxdl.fit` from a random-access source (a grain ``MapDataset``) against `fit` from
the same examples as arrays in memory.

The same run three ways: ``jaxdl train``'s default MLP (Flatten, 2 x [Dense 512, ReLU, Dropout
0.2], Dense 10; Adam), or with ``--model cnn`` its CNN, on the bundled 8x8 digits (1,257 training images, batch 32: 39 steps per
epoch), no validation, ``--epochs`` epochs; ``train`` given as

- arrays: the `jaxdl.data.Split` of numpy arrays (gathered by fancy indexing);
- grain: ``grain.MapDataset.source(examples)`` (each example read by ``__getitem__``, gathered
  and checked by `jaxdl.sources`' background thread);
- source: a plain Python class with ``__len__`` and ``__getitem__`` over the arrays.

The three end in bitwise the same parameters (checked). Steps per second of a run: its steps
after epoch 1 (compilation) over the history's ``seconds`` of those epochs. The runs alternate
``--rounds`` times (the order rotating) so machine load hits all alike; the figure is the median
over rounds of (grain steps/s) / (arrays steps/s), and likewise for the plain source.

    python benchmarks/data_source.py [--epochs 6] [--rounds 5] [--model mlp|cnn]
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics

import jax
import numpy as np

import jaxdl as dl
from jaxdl import data


class Source:
    """A random-access source over arrays: ``len`` and ``source[i] -> (x, y)``."""

    def __init__(self, x, y):
        self.x, self.y = x, y

    def __len__(self):
        return len(self.y)

    def __getitem__(self, i):
        return self.x[i], self.y[i]


MODELS = {"mlp": lambda: dl.models.mlp(10, dropout=0.2), "cnn": lambda: dl.models.cnn(10)}


def steps_per_s(train, epochs: int, model: str):
    result = dl.fit(MODELS[model](), dl.adam(1e-3), train, epochs=epochs, batch_size=32, progress=False)
    later = result.history[1:]
    steps = result.steps - result.history[0]["step"]
    return steps / sum(r["seconds"] for r in later), result


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=6)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--model", choices=sorted(MODELS), default="mlp")
    args = parser.parse_args()
    import grain

    ds = data.load_dataset("digits")
    inputs = {
        "arrays": ds.train,
        "grain": grain.MapDataset.source(list(zip(ds.train.x, ds.train.y))),
        "source": Source(ds.train.x, ds.train.y),
    }
    print(
        f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores, "
        f"load {os.getloadavg()[0]:.1f}; jax {jax.__version__} ({jax.default_backend()}), "
        f"grain {grain.__version__}; model {args.model}"
    )
    rates = {name: [] for name in inputs}
    params = {}
    names = list(inputs)
    for r in range(args.rounds):
        for name in names[r % len(names) :] + names[: r % len(names)]:
            rate, result = steps_per_s(inputs[name], args.epochs, args.model)
            rates[name].append(rate)
            params[name] = [np.asarray(a).view(np.uint8) for a in jax.tree.leaves(result.state.params)]
        print(
            f"round {r + 1}: "
            + ", ".join(f"{n} {rates[n][-1]:.0f} steps/s" for n in names)
            + f" (load {os.getloadavg()[0]:.1f})"
        )
    for name in ("grain", "source"):
        assert all(np.array_equal(a, b) for a, b in zip(params[name], params["arrays"])), name
        ratios = [s / a for s, a in zip(rates[name], rates["arrays"])]
        print(
            f"{name} / arrays steps/s: median {statistics.median(ratios):.3f} "
            f"(rounds: {', '.join(f'{x:.3f}' for x in ratios)}); "
            f"median {statistics.median(rates[name]):.0f} vs {statistics.median(rates['arrays']):.0f} steps/s"
        )
    print("parameters: bitwise equal across the three")


if __name__ == "__main__":
    main()
