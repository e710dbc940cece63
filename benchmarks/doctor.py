"""Wall time of `jaxdl.doctor.examine` on the two default configurations of ``jaxdl train``.

    python benchmarks/doctor.py [mlp|cnn ...] [--out DIR]

mlp: ``models.mlp(10, dropout=0.2)``; cnn: ``models.cnn(10, dropout=0.25)`` (Conv's 'auto'
rule; on the CPU im2col for every 3x3 convolution since da5c991); cnn-im2col: the same with
``conv_impl="im2col"`` explicitly; all with
``adam`` under a cosine schedule from 2e-3 over 15 (12) epochs of batch 64, on mnist5k (pixels
in [0, 1], then standardized with the training split's statistics), the CLI's augmentation
wrapper around ``supervised_loss`` as the loss. Prints each check's seconds, the total and the
report; ``--out`` also writes the reports (report.md, report.json, figures).
"""

import argparse
import os
import sys
import time

os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402

import jaxdl as dl  # noqa: E402
from jaxdl import data, doctor, models, schedules  # noqa: E402

EPOCHS = {"mlp": 15, "cnn": 12, "cnn-im2col": 12}


class ShiftedLoss:
    """The CLI's augmentation wrapper (a loss with ``.model`` and ``train=``): training images
    shifted by up to ``max_shift`` pixels with a key drawn from the step key."""

    def __init__(self, inner, max_shift: int):
        self.inner, self.max_shift, self.model = inner, max_shift, inner.model

    def __call__(self, params, model_state, batch, key=None, train=True):
        x, y = batch
        if train and key is not None:
            shift_key, key = jax.random.split(key)
            x = data.random_shift(shift_key, x, self.max_shift)
        return self.inner(params, model_state, (x, y), key, train=train)


def configuration(name: str):
    """(model, optimizer, train, validation, loss_fn) of ``jaxdl train --model name``."""
    ds = data.load_dataset("mnist5k")
    stats = data.fit_standardization(ds.train.x)
    train = (jax.device_get(data.standardize(ds.train.x, stats)), ds.train.y)
    val = (jax.device_get(data.standardize(ds.val.x, stats)), ds.val.y)
    model = {
        "mlp": lambda: models.mlp(10, dropout=0.2),
        "cnn": lambda: models.cnn(10, dropout=0.25),
        "cnn-im2col": lambda: models.cnn(10, dropout=0.25, conv_impl="im2col"),
    }[name]()
    steps = EPOCHS[name] * (len(ds.train.y) // 64)
    optimizer = dl.adam(schedules.cosine_decay(2e-3, steps))
    loss_fn = ShiftedLoss(dl.supervised_loss(model), 1)
    return model, optimizer, train, val, loss_fn


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("models", nargs="*", default=["mlp", "cnn"], choices=sorted(EPOCHS))
    p.add_argument("--out", help="write each report to OUT/<model>")
    args = p.parse_args(argv)
    print(
        f"jax {jax.__version__}, {jax.default_backend()}, {os.cpu_count()} CPUs, "
        f"load average {os.getloadavg()[0]:.1f}"
    )
    for name in args.models:
        model, optimizer, train, val, loss_fn = configuration(name)
        t0 = time.perf_counter()
        report = doctor.examine(model, optimizer, train, validation=val, loss_fn=loss_fn, batch_size=64)
        wall = time.perf_counter() - t0
        secs, cpu = report.info["check_seconds"], report.info["check_cpu_seconds"]
        print(
            f"\n{name}: examine {wall:.1f} s wall, {report.info['cpu_time_s']:.1f} s CPU "
            f"(load average {os.getloadavg()[0]:.1f}); per check, wall/CPU s: "
            + ", ".join(f"{k} {secs[k]:.1f}/{cpu[k]:.1f}" for k in secs)
        )
        print(report.summary())
        if args.out:
            report.write(os.path.join(args.out, name))
    return 0


if __name__ == "__main__":
    sys.exit(main())
