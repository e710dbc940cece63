"""Benchmark: per-device bytes and step time of FSDP against the replicated sharded step.

An MLP ``--width`` wide (default 4096: 4096 -> 4096 -> 4096 -> 4096 -> 10, 50.4M float32
params) with Adam, initialized, not trained. For each of 1, 2, 4 and 8 fake CPU devices
(``--xla_force_host_platform_device_count=8``, meshes over the first N):

* the bytes device 0 holds of params + optimizer state, summed over the ``addressable_shards``
  of every leaf placed on it: ``put_state(state, mesh)`` (replicated) against
  ``put_state(state, mesh, shard="fsdp")``, and their ratio beside the goal 1/N + 5%;
* the compiled step's ``memory_analysis()``: arguments and temporaries per device;
* the step time (median of ``--repeats`` awaited steps, the two steps alternating,
  `_timing.round_robin`) of ``make_sharded_train_step(..., shard="replicate" | "fsdp")`` on a
  global batch of ``--batch`` examples, both with ``donate=True``.

The fake devices share the machine's cores: the times say what FSDP's gathers and scatters cost
on top of the same arithmetic, not a speedup.

    python benchmarks/fsdp.py [--width 4096] [--batch 32] [--repeats 5] [--devices 1 2 4 8]
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics


def _parse():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--width", type=int, default=4096)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--devices", type=int, nargs="+", default=[1, 2, 4, 8])
    return ap.parse_args()


ARGS = _parse()
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ["XLA_FLAGS"] = (
    os.environ.get("XLA_FLAGS", "") + f" --xla_force_host_platform_device_count={max(ARGS.devices)}"
).strip()

import jax  # noqa: E402
import numpy as np  # noqa: E402
from _timing import round_robin  # noqa: E402

import jaxdl as dl  # noqa: E402
from jaxdl import layers as L  # noqa: E402
from jaxdl import parallel as par  # noqa: E402
from jaxdl import train_step as ts  # noqa: E402


def device0_bytes(tree) -> int:
    """Bytes of ``tree``'s leaves that live on the first device of their sharding."""
    total = 0
    for leaf in jax.tree.leaves(tree):
        first = leaf.sharding._device_assignment[0]
        total += sum(s.data.nbytes for s in leaf.addressable_shards if s.device == first)
    return total


def main():
    w = ARGS.width
    model = L.Sequential(L.Dense(w), L.Relu(), L.Dense(w), L.Relu(), L.Dense(w), L.Relu(), L.Dense(10))
    tx = dl.adam(1e-3)
    state = ts.TrainState.create(model, tx, jax.random.key(0), (w,))
    state = jax.device_get(state)  # host copy: each layout is placed from it
    n_params = sum(x.size for x in jax.tree.leaves(state.params))
    rng = np.random.RandomState(0)
    batch = (rng.randn(ARGS.batch, w).astype(np.float32), rng.randint(0, 10, ARGS.batch).astype(np.int32))
    loss_fn = ts.supervised_loss(model)
    print(
        f"jax {jax.__version__}, {platform.machine()} {os.cpu_count()} cores, fake CPU devices; "
        f"MLP {w} wide, {n_params / 1e6:.1f}M params, Adam, global batch {ARGS.batch}"
    )
    print(
        "| devices | replicated MB/device | FSDP MB/device | ratio | goal 1/N+5% | "
        "FSDP step args/temp MB | replicated step ms | FSDP step ms | FSDP/replicated |"
    )
    print("|---|---|---|---|---|---|---|---|---|")
    for n in ARGS.devices:
        mesh = par.data_mesh(n)
        placed, steps, mem = {}, {}, {}
        for shard in ("replicate", "fsdp"):
            s = par.put_state(state, mesh, shard=shard)
            placed[shard] = device0_bytes((s.params, s.opt_state))
            step = par.make_sharded_train_step(loss_fn, tx, mesh, shard=shard, donate=True)
            b = par.put_batch(batch, mesh)
            if shard == "fsdp":
                m = step.lower(s, b).compile().memory_analysis()
                mem = (m.argument_size_in_bytes / 1e6, m.temp_size_in_bytes / 1e6) if m else (0, 0)
            box = {"state": s}

            def run(step=step, box=box, b=b):
                box["state"], metrics = step(box["state"], b)
                jax.block_until_ready((box["state"], metrics))

            steps[shard] = run
        times = round_robin(steps, ARGS.repeats, warmup=1)
        t_rep, t_fsdp = (statistics.median(times[k]) * 1e3 for k in ("replicate", "fsdp"))
        ratio = placed["fsdp"] / placed["replicate"]
        print(
            f"| {n} | {placed['replicate'] / 1e6:.1f} | {placed['fsdp'] / 1e6:.1f} | {ratio:.4f} | "
            f"{1 / n + 0.05:.4f} | {mem[0]:.0f} / {mem[1]:.0f} | {t_rep:.0f} | {t_fsdp:.0f} | "
            f"{t_fsdp / t_rep:.2f} |",
            flush=True,
        )
        assert ratio <= 1 / n + 0.05, f"FSDP holds {ratio:.4f} of the replicated bytes on {n} devices"
        del steps, placed


if __name__ == "__main__":
    main()
