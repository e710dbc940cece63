"""Benchmark: one jitted optimizer update + apply on a ResNet-50-shaped parameter tree.

jaxdl vs optax (same process, same tree, timed round-robin) vs torch.optim (Adam(fused=True), SGD(foreach=True)),
read against the machine's copy bandwidth: Adam reads p, g, m, v and writes p, m, v (28 bytes per
float32 parameter); SGD with momentum reads p, g, v and writes p, v (20 bytes).

Adam also runs three layouts that might move fewer bytes or launch fewer kernels (issue 14):
``optax.flatten(adam)`` (flat moments: the gradients are concatenated into one buffer and the
update split back per leaf), ``adam`` on the parameters raveled into one buffer
(``jax.flatten_util.ravel_pytree``; the best case of a flat layout: one leaf, gradients already
flat) and ``adam(mu_dtype=bf16, nu_dtype=bf16)`` (20 B/param floor of its own). The ratio columns
are medians of pair-by-pair ratios: round r of one contender against round r of the reference
(contenders run round-robin, so a load change hits both alike); PyTorch runs in a block of its own.

    python benchmarks/optimizer_update.py [--repeats 30] [--only adam]
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics

import jax
import jax.numpy as jnp
import numpy as np
import optax
import torch
from _timing import round_robin, timeit
from jax.flatten_util import ravel_pytree

import jaxdl as dl


def resnet50_shapes() -> list[tuple[int, ...]]:
    """Parameter shapes of ResNet-50 (He et al. 2016): HWIO convs, BatchNorm scale/offset, fc."""
    shapes = [(7, 7, 3, 64), (64,), (64,)]
    cin = 64
    for width, blocks in zip((64, 128, 256, 512), (3, 4, 6, 3)):
        for b in range(blocks):
            for k, cout in ((1, width), (3, width), (1, 4 * width)):
                shapes += [(k, k, cin if k == 1 and cout == width else width, cout), (cout,), (cout,)]
            if b == 0:
                shapes += [(1, 1, cin, 4 * width), (4 * width,), (4 * width,)]
            cin = 4 * width
    return shapes + [(2048, 1000), (1000,)]


def copy_bandwidth(n_bytes: int = 512 << 20, repeats: int = 10) -> tuple[float, float]:
    """Bytes per second (read + write counted) of a large numpy memcpy and of XLA streaming
    ``x * c`` in place (donated, all threads). The larger is the floor for an update."""
    src = np.ones(n_bytes // 4, np.float32)
    dst = np.empty_like(src)
    t_np = statistics.median(timeit(lambda: np.copyto(dst, src), repeats))  # noqa: F821 (del below)
    del src, dst
    scale = jax.jit(lambda x: x * 1.0000001, donate_argnums=0)
    holder = {"x": jnp.ones(n_bytes // 4, jnp.float32)}

    def run():
        holder["x"] = scale(holder["x"])
        holder["x"].block_until_ready()

    t_xla = statistics.median(timeit(run, repeats))
    return 2 * n_bytes / t_np, 2 * n_bytes / t_xla


def jax_runner(tx, params, grads, donate=False):
    state = tx.init(params)

    def step(p, s, g):
        u, s = tx.update(g, s, p)
        return optax.apply_updates(p, u), s

    jitted = jax.jit(step, donate_argnums=(0, 1) if donate else ())
    holder = {"p": jax.tree.map(jnp.copy, params), "s": state}

    def run():
        holder["p"], holder["s"] = jitted(holder["p"], holder["s"], grads)
        jax.block_until_ready(holder["p"])

    return run


def torch_runner(make_opt, shapes):
    gen = torch.Generator().manual_seed(0)
    ps = [torch.randn(s, generator=gen).requires_grad_() for s in shapes]
    for p in ps:
        p.grad = torch.randn(p.shape, generator=gen) * 1e-3
    opt = make_opt(ps)

    def run():
        with torch.no_grad():
            opt.step()

    return run


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=30)
    ap.add_argument("--only", choices=["adam", "sgd"], help="run one optimizer's rows")
    args = ap.parse_args()

    shapes = resnet50_shapes()
    n = sum(int(np.prod(s)) for s in shapes)
    keys = jax.random.split(jax.random.key(0), 2 * len(shapes))
    params = [jax.random.normal(k, s) for k, s in zip(keys[: len(shapes)], shapes)]
    grads = [1e-3 * jax.random.normal(k, s) for k, s in zip(keys[len(shapes) :], shapes)]
    bw_np, bw_xla = copy_bandwidth()
    bw = max(bw_np, bw_xla)
    print(
        f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores; "
        f"jax {jax.__version__} ({jax.default_backend()}), optax {optax.__version__}, torch {torch.__version__}"
    )
    print(
        f"tree: {len(shapes)} leaves, {n / 1e6:.2f}M float32 params; copy bandwidth {bw / 1e9:.2f} GB/s "
        f"(numpy memcpy {bw_np / 1e9:.2f}, XLA in-place stream {bw_xla / 1e9:.2f})"
    )
    torch.set_num_threads(os.cpu_count() or 1)

    cases = {
        "adam": (
            dl.adam(1e-3),
            optax.adam(1e-3),
            28,
            lambda ps: torch.optim.Adam(ps, lr=1e-3, fused=True),
        ),
        "sgd(momentum=0.9)": (
            dl.sgd(1e-3, momentum=0.9),
            optax.sgd(1e-3, momentum=0.9),
            20,
            lambda ps: torch.optim.SGD(ps, lr=1e-3, momentum=0.9, foreach=True),
        ),
    }
    flat_params, flat_grads = ravel_pytree(params)[0], ravel_pytree(grads)[0]
    print(
        f"{'optimizer':<18} {'impl':<30} {'median ms':>9} {'min':>7} {'max':>7} {'x optax':>8} {'x jaxdl':>8} "
        f"{'x torch':>8} {'x floor':>8}"
    )
    for name, (ours, theirs, bytes_per_param, make_torch) in cases.items():
        if args.only and not name.startswith(args.only):
            continue
        floor = n * bytes_per_param / bw
        runners = {
            "jaxdl": jax_runner(ours, params, grads),
            "jaxdl (donated)": jax_runner(ours, params, grads, donate=True),
            "optax": jax_runner(theirs, params, grads),
            "optax (donated)": jax_runner(theirs, params, grads, donate=True),
        }
        if name == "adam":
            runners["optax.flatten(adam) (donated)"] = jax_runner(
                optax.flatten(theirs), params, grads, donate=True
            )
            runners["jaxdl 1 raveled leaf (donated)"] = jax_runner(
                ours, [flat_params], [flat_grads], donate=True
            )
            bf16 = dl.adam(1e-3, mu_dtype=jnp.bfloat16, nu_dtype=jnp.bfloat16)
            runners["jaxdl bf16 moments (donated)"] = jax_runner(bf16, params, grads, donate=True)
        results = round_robin(runners, args.repeats)
        # PyTorch runs in a block of its own: interleaved with XLA, the two thread pools (both
        # spin-waiting) starve each other on 2 cores and PyTorch's times jump 20x.
        results["torch"] = timeit(torch_runner(make_torch, shapes), args.repeats)
        med = {k: statistics.median(v) for k, v in results.items()}

        def paired(impl, ref):  # median of round-by-round ratios; PyTorch is not interleaved
            if "torch" in (impl, ref):
                return med[impl] / med[ref]
            return statistics.median(a / b for a, b in zip(results[impl], results[ref]))

        for impl, times in results.items():
            # Compare like with like: donated runs against optax's / jaxdl's donated run.
            donated = "donated" in impl
            ref_optax = "optax (donated)" if donated else "optax"
            ref_ours = "jaxdl (donated)" if donated else "jaxdl"
            print(
                f"{name:<18} {impl:<30} {med[impl] * 1e3:9.2f} {min(times) * 1e3:7.2f} {max(times) * 1e3:7.2f} "
                f"{paired(impl, ref_optax):8.2f} {paired(impl, ref_ours):8.2f} {paired(impl, 'torch'):8.2f} "
                f"{med[impl] / floor:8.2f}"
            )
        print(f"{name:<18} {'floor':<30} {floor * 1e3:9.2f}  ({bytes_per_param} B/param at copy bandwidth)")


if __name__ == "__main__":
    main()
