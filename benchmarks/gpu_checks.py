"""Benchmark: issue 14's accelerator checks, as one prepared script for a lent GPU.

Run on the device (after ``pip install --no-deps -e .``), from the repository root::

    python benchmarks/gpu_checks.py --out $OUT/gpu_checks.json [--peak-tflops bf16=989,fp32=67]

``--quick`` shrinks every size so that the script can be tried on a CPU in about a minute. What it
measures, each on the default device, reported with its name:

1. Copy bandwidth: a donated in-place ``x * c`` over 1 GiB of float32; bytes read and written
   over the median time.
2. Adam update (`jaxdl.adam` and `optax.adam`, one jitted ``update`` + ``apply_updates``,
   donated) on the ResNet-50-shaped tree of ``optimizer_update.py`` (161 leaves, 25.6M params):
   28 B/param (read p, g, m, v; write p, m, v) over the median time, as a fraction of (1).
   Goal: >= 0.8.
3. Train steps (`make_train_step(donate=True)`, default metrics and NaN/Inf skip) in float32 and
   in bfloat16 compute (``precision="bf16"``): the MLP 4096-4096-4096-4096-10 at batch 4096 and
   `jaxdl.models.cnn` on 28x28x1 at batch 256. MFU = model FLOPs per second (the MLP: 6 x batch
   x weights; the CNN: XLA's cost analysis of the compiled step) over the peak: a 8192^3 matmul
   measured in the same dtype, and the datasheet figure when ``--peak-tflops`` gives one.
   Goal: >= 0.4 for the MLP in bf16.
4. Sweep: 16 learning rates x 200 steps of the tiny MLP of ``sweep.py``, vmapped
   (`jaxdl.sweep.sweep`) against one compiled run called 16 times. Goal: >= 8x.
5. First call (trace + compile + one step) of the big MLP step, jaxdl against flax+optax
   (``step_overhead.bench_first``).
6. FSDP: the MLP 4096-4096-4096-4096-10 with Adam over every visible device (`data_mesh()`):
   bytes of params + optimizer state on the first device, replicated (`put_state`) against
   FSDP (``put_state(..., shard="fsdp")``), and the step time of
   ``make_sharded_train_step(..., shard="replicate" | "fsdp", donate=True)``. Goal: FSDP's
   bytes <= 1/N + 5% of the replicated ones.
7. Rematerialization: `jaxdl.models.mlp` depth 8, width 512, batch 2048: the compiled step's
   ``memory_analysis().temp_size_in_bytes`` and step time with and without ``remat=True``.
   Goal: <= 0.6 of the temporaries.

Times are medians of ``--repeats`` calls after two warm-up calls, each call awaited.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _timing import timeit  # noqa: E402
from optimizer_update import resnet50_shapes  # noqa: E402
from step_overhead import bench_first, matmul_peak  # noqa: E402

import jaxdl as dl  # noqa: E402
from jaxdl import train_step as ts  # noqa: E402


def median_time(fn, repeats):
    """Median seconds per call of ``fn`` after two warm-up calls (`_timing.timeit`)."""
    return statistics.median(timeit(fn, repeats))


def copy_bandwidth(n_bytes, repeats):
    """Bytes read + written per second by a donated in-place ``x * c``."""
    f = jax.jit(lambda x: x * 1.0001, donate_argnums=0)
    box = [jnp.ones(n_bytes // 4, jnp.float32)]

    def run():
        box[0] = f(box[0])
        box[0].block_until_ready()

    return 2 * n_bytes / median_time(run, repeats)


def adam_update(shapes, bandwidth, repeats):
    rng = np.random.default_rng(0)
    params = [jnp.asarray(rng.normal(size=s).astype(np.float32)) for s in shapes]
    grads = [jnp.asarray(rng.normal(size=s).astype(np.float32)) * 1e-3 for s in shapes]
    n = sum(int(np.prod(s)) for s in shapes)
    out = {"params": n}
    for name, tx in (("jaxdl.adam", dl.adam(1e-3)), ("optax.adam", optax.adam(1e-3))):

        def step(p, s, g, tx=tx):
            u, s = tx.update(g, s, p)
            return optax.apply_updates(p, u), s

        f = jax.jit(step, donate_argnums=(0, 1))
        box = [jax.tree.map(jnp.copy, params), tx.init(params)]

        def run(f=f, box=box):
            box[0], box[1] = f(box[0], box[1], grads)
            jax.block_until_ready(box[0])

        t = median_time(run, repeats)
        out[name] = {"ms": t * 1e3, "fraction_of_copy_bandwidth": 28 * n / t / bandwidth}
    return out


def train_step(model, input_shape, batch, precision, repeats, model_flops=None):
    tx = dl.adam(1e-3)
    state = ts.TrainState.create(model, tx, jax.random.key(0), input_shape)
    rng = np.random.default_rng(0)
    data = (
        jnp.asarray(rng.normal(size=(batch, *input_shape)).astype(np.float32)),
        jnp.asarray(rng.integers(0, 10, batch).astype(np.int32)),
    )
    step = ts.make_train_step(ts.supervised_loss(model), tx, donate=True, precision=precision)
    t0 = time.perf_counter()
    compiled = step.lower(state, data).compile()
    compile_s = time.perf_counter() - t0
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost
    xla_flops = float((cost or {}).get("flops", float("nan")))
    box = [state]

    def run():
        box[0], m = compiled(box[0], data)
        jax.block_until_ready(m["loss"])

    t = median_time(run, repeats)
    flops = model_flops if model_flops is not None else xla_flops
    return {
        "ms": t * 1e3,
        "model_flops": flops,
        "xla_flops": xla_flops,
        "flop_per_s": flops / t,
        "compile_s": compile_s,
    }


def sweep_speedup(runs, steps, repeats):
    from sweep import D, _data, _lrs, _model

    from jaxdl.sweep import sweep

    x, y = _data(steps)
    xj, yj = jnp.asarray(x), jnp.asarray(y)
    model = _model()
    loss_fn = ts.supervised_loss(model)

    @jax.jit
    def single(seed, lr, batches):
        tx = dl.adam(lr)
        state = ts.TrainState.create(model, tx, jax.random.key(seed), (D,))
        return ts.make_train_loop(loss_fn, tx)(state, batches)[1]["loss"][-1]

    lrs = _lrs(runs, 0)

    def vmapped():
        np.asarray(sweep(loss_fn, dl.adam, model, (D,), (xj, yj), hparams={"lr": lrs})["final_loss"])

    def sequential():
        np.asarray(jax.block_until_ready([single(0, jnp.float32(lr), (xj, yj)) for lr in lrs]))

    tv, ts_ = median_time(vmapped, repeats), median_time(sequential, repeats)
    return {"vmapped_s": tv, "sequential_s": ts_, "speedup": ts_ / tv}


def _first_device_bytes(tree):
    """Bytes of ``tree``'s leaves held by the first device of each leaf's sharding."""
    total = 0
    for leaf in jax.tree.leaves(tree):
        first = leaf.sharding._device_assignment[0]
        total += sum(s.data.nbytes for s in leaf.addressable_shards if s.device == first)
    return total


def fsdp_row(width, batch, repeats):
    """Row 6: per-device bytes and step time, replicated against FSDP, over every device."""
    from jaxdl import parallel

    mesh = parallel.data_mesh()
    model = dl.models.mlp(10, depth=3, width=width)
    tx = dl.adam(1e-3)
    host = jax.device_get(ts.TrainState.create(model, tx, jax.random.key(0), (width,)))
    rng = np.random.RandomState(0)
    data = (rng.randn(batch, width).astype(np.float32), rng.randint(0, 10, batch).astype(np.int32))
    out = {"devices": mesh.size, "params": sum(x.size for x in jax.tree.leaves(host.params))}
    for shard in ("replicate", "fsdp"):
        state = parallel.put_state(host, mesh, shard=shard)
        out[f"{shard}_MB"] = _first_device_bytes((state.params, state.opt_state)) / 1e6
        step = parallel.make_sharded_train_step(ts.supervised_loss(model), tx, mesh, shard=shard, donate=True)
        b = parallel.put_batch(data, mesh)
        box = [state]

        def run(step=step, box=box, b=b):
            box[0], metrics = step(box[0], b)
            jax.block_until_ready((box[0], metrics))

        out[f"{shard}_ms"] = median_time(run, repeats) * 1e3
        del box, state
    out["ratio"] = out["fsdp_MB"] / out["replicate_MB"]
    return out


def remat_row(depth, width, batch, repeats):
    """Row 7: temporaries and step time of the MLP step with and without ``remat=True``."""
    model = dl.models.mlp(10, depth=depth, width=width)
    tx = dl.sgd(0.01)
    state = ts.TrainState.create(model, tx, jax.random.key(0), (width,))
    rng = np.random.RandomState(0)
    data = (rng.randn(batch, width).astype(np.float32), rng.randint(0, 10, batch).astype(np.int32))
    out = {}
    for name, remat in (("none", False), ("remat", True)):
        step = ts.make_train_step(ts.supervised_loss(model), tx, remat=remat)
        out[f"{name}_temp_MB"] = step.lower(state, data).compile().memory_analysis().temp_size_in_bytes / 1e6
        out[f"{name}_ms"] = (
            median_time(lambda step=step: jax.block_until_ready(step(state, data)), repeats) * 1e3
        )
    out["temp_ratio"] = out["remat_temp_MB"] / out["none_temp_MB"]
    return out


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="tiny sizes: a smoke test on a CPU")
    ap.add_argument("--repeats", type=int, default=20)
    ap.add_argument("--out", default=None, help="write the results here as JSON")
    ap.add_argument("--peak-tflops", default="", help="datasheet peaks, e.g. bf16=989,fp32=67")
    args = ap.parse_args()
    quick = args.quick
    datasheet = {k: float(v) * 1e12 for k, v in (kv.split("=") for kv in args.peak_tflops.split(",") if kv)}
    dev = jax.devices()[0]
    res = {"device": f"{dev.platform} {dev.device_kind}", "jax": jax.__version__, "quick": quick}
    print(f"device: {res['device']} ({jax.device_count()} devices); jax {jax.__version__}", flush=True)

    bw = copy_bandwidth((64 if quick else 1024) << 20, args.repeats)
    res["copy_GBps"] = bw / 1e9
    print(f"1. copy bandwidth: {bw / 1e9:.1f} GB/s (read + written)", flush=True)

    shapes = resnet50_shapes()[: 20 if quick else None]
    res["adam"] = adam_update(shapes, bw, args.repeats)
    for name in ("jaxdl.adam", "optax.adam"):
        r = res["adam"][name]
        print(
            f"2. {name} on {len(shapes)} leaves, {res['adam']['params'] / 1e6:.1f}M params: {r['ms']:.2f} ms, "
            f"{r['fraction_of_copy_bandwidth']:.2f} of the copy bandwidth (goal >= 0.8)",
            flush=True,
        )

    width, batch = (256, 256) if quick else (4096, 4096)
    res["steps"] = {}
    for precision, dtype in (("fp32", jnp.float32), ("bf16", jnp.bfloat16)):
        peak = matmul_peak(args.repeats, 1024 if quick else 8192, dtype)[1]  # at the median call
        res[f"matmul_peak_TFLOPs_{precision}"] = peak / 1e12
        dims = (784, width, width, width, width, 10)
        mlp_flops = 6 * batch * sum(a * b for a, b in zip(dims[:-1], dims[1:], strict=True))
        cases = {
            f"mlp {width}x4": (dl.models.mlp(10, depth=4, width=width), (784,), batch, mlp_flops),
            "cnn": (dl.models.cnn(10), (28, 28, 1), 32 if quick else 256, None),
        }
        for name, (model, shape, b, flops) in cases.items():
            r = train_step(model, shape, b, None if precision == "fp32" else precision, args.repeats, flops)
            r["mfu_measured_peak"] = r["flop_per_s"] / peak
            if precision in datasheet:
                r["mfu_datasheet"] = r["flop_per_s"] / datasheet[precision]
            res["steps"][f"{name} {precision}"] = r
            extra = f", {r['mfu_datasheet']:.2f} of the datasheet" if "mfu_datasheet" in r else ""
            print(
                f"3. {name} {precision}, batch {b}: {r['ms']:.2f} ms, {r['flop_per_s'] / 1e12:.3g} TFLOP/s = "
                f"{r['mfu_measured_peak']:.2f} of the measured {precision} matmul peak ({peak / 1e12:.3g}){extra}; "
                f"compile {r['compile_s']:.1f} s",
                flush=True,
            )

    res["sweep"] = sweep_speedup(16, 20 if quick else 200, max(args.repeats // 4, 3))
    print(
        f"4. sweep of 16: vmapped {res['sweep']['vmapped_s'] * 1e3:.1f} ms, sequential "
        f"{res['sweep']['sequential_s'] * 1e3:.1f} ms: {res['sweep']['speedup']:.1f}x (goal >= 8)",
        flush=True,
    )

    bench_first(2 if quick else 5)  # prints its own lines (5.)

    r = res["fsdp"] = fsdp_row(256 if quick else 4096, 64 if quick else 256, max(args.repeats // 4, 3))
    print(
        f"6. FSDP over {r['devices']} devices, {r['params'] / 1e6:.1f}M params: {r['fsdp_MB']:.1f} MB of "
        f"{r['replicate_MB']:.1f} MB replicated per device ({r['ratio']:.3f}; goal <= "
        f"{1 / r['devices'] + 0.05:.3f}); step {r['fsdp_ms']:.1f} ms against {r['replicate_ms']:.1f} ms",
        flush=True,
    )
    r = res["remat"] = remat_row(8, 512, 256 if quick else 2048, max(args.repeats // 4, 3))
    print(
        f"7. remat, MLP depth 8: temporaries {r['remat_temp_MB']:.1f} MB of {r['none_temp_MB']:.1f} MB "
        f"({r['temp_ratio']:.2f}; goal <= 0.6); step {r['remat_ms']:.1f} ms against {r['none_ms']:.1f} ms",
        flush=True,
    )

    if args.out:
        with open(args.out, "w") as f:
            json.dump(res, f, indent=1)


if __name__ == "__main__":
    main()
