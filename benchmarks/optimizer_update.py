"""Benchmark: one jitted optimizer update + apply on a ResNet-50-shaped parameter tree.

jaxdl vs optax (same process, same tree, timed round-robin) vs torch.optim (Adam(fused=True), SGD(foreach=True)),
read against the machine's copy bandwidth: Adam reads p, g, m, v and writes p, m, v (28 bytes per
float32 parameter); SGD with momentum reads p, g, v and writes p, v (20 bytes).

Adam also runs three layouts that might move fewer bytes or launch fewer kernels (issue 14):
``optax.flatten(adam)`` (flat moments: the gradients are concatenated into one buffer and the
update split back per leaf), ``adam`` on the parameters raveled into one buffer
(``jax.flatten_util.ravel_pytree``; the best case of a flat layout: one leaf, gradients already
flat) and ``adam(mu_dtype=bf16, nu_dtype=bf16)`` (20 B/param floor of its own), and two fused
CPU kernels called through the XLA FFI (``_fused_adam.py``, ``fused_adam.cc``; compiled at first
use, skipped without a C++ compiler): (a) optax's protocol, one pass reading g, m, v and writing
u, m, v, then ``apply_updates``; (b) PyTorch's fused shape, one pass reading p, g, m, v and
writing p, m, v in place. The ratio columns are medians of pair-by-pair ratios: round r of one
contender against round r of the reference (contenders run round-robin, so a load change hits
both alike); PyTorch runs in a block of its own.

``--temp-grads`` makes each jitted Adam step produce its gradients as a temporary (a
``lax.cond`` on the input gradients that XLA cannot fuse into the update, as a train step's
backward pass does), where fused (a) can write u over the gradients' buffer.

    python benchmarks/optimizer_update.py [--repeats 30] [--only adam] [--temp-grads]
"""

from __future__ import annotations

import argparse
import os
import platform
import resource
import statistics

import jax
import jax.numpy as jnp
import numpy as np
import optax
from _timing import round_robin, timeit
from jax.flatten_util import ravel_pytree

try:
    import torch
except ImportError:  # Python 3.12+ in this project: no torch; no torch row, "x torch" is nan
    torch = None

try:
    import _fused_adam

    _fused_adam.load()
except RuntimeError as err:  # no C++ compiler, or the build failed: the fused rows are skipped
    print(f"fused Adam kernels unavailable: {err}")
    _fused_adam = None

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


def temp_grads(g, flag):
    """``g`` rescaled by 1 +- 1e-4 inside a ``lax.cond``: a temporary XLA cannot fuse away."""
    return jax.lax.cond(
        flag, lambda: jax.tree.map(lambda x: x * 1.0001, g), lambda: jax.tree.map(lambda x: x * 0.9999, g)
    )


def jax_runner(tx, params, grads, donate=False, in_step=False):
    state = tx.init(params)

    def step(p, s, g, flag):
        if in_step:
            g = temp_grads(g, flag)
        u, s = tx.update(g, s, p)
        return optax.apply_updates(p, u), s

    jitted = jax.jit(step, donate_argnums=(0, 1) if donate else ())
    holder = {"p": jax.tree.map(jnp.copy, params), "s": state}
    flag = jnp.array(True)

    def run():
        holder["p"], holder["s"] = jitted(holder["p"], holder["s"], grads, flag)
        jax.block_until_ready(holder["p"])

    return run


def fused_step_runner(params, grads, in_step=False):
    """Fused (b): ``_fused_adam.adam_step`` on donated p, m, v (jaxdl.adam(1e-3)'s numbers)."""

    def step(p, m, v, count, g, flag):
        if in_step:
            g = temp_grads(g, flag)
        count = optax.safe_increment(count)
        p, m, v = _fused_adam.adam_step(p, g, m, v, count, 1e-3)
        return p, m, v, count

    jitted = jax.jit(step, donate_argnums=(0, 1, 2))
    zeros = [jnp.zeros_like(x) for x in params]
    holder = {
        "s": ([jnp.copy(x) for x in params], zeros, [jnp.copy(z) for z in zeros], jnp.zeros([], jnp.int32))
    }
    flag = jnp.array(True)

    def run():
        holder["s"] = jitted(*holder["s"], grads, flag)
        jax.block_until_ready(holder["s"][0])

    return run


def faults_per_call(run, calls: int = 5) -> float:
    """Minor page faults per call of ``run`` (first touches of freshly mapped memory)."""
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    for _ in range(calls):
        run()
    return (resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before) / calls


def fused_difference(params, grads, steps=3) -> tuple[float, float]:
    """Max |p_fused - p_jaxdl| after ``steps`` steps of (a) and of (b) on the benchmark's tree."""
    ref = jax_step(dl.adam(1e-3))
    fa = jax_step(_fused_adam.adam(1e-3))
    pr, sr = list(params), dl.adam(1e-3).init(params)
    pa, sa = list(params), sr
    pb, mb, vb = list(params), sr[0].mu, sr[0].nu
    for t in range(1, steps + 1):
        pr, sr = ref(pr, sr, grads)
        pa, sa = fa(pa, sa, grads)
        pb, mb, vb = _fused_adam.adam_step(pb, grads, mb, vb, jnp.array(t, jnp.int32), 1e-3)
    diff = lambda a, b: max(float(jnp.max(jnp.abs(x - y))) for x, y in zip(a, b))  # noqa: E731
    return diff(pa, pr), diff(pb, pr)


def jax_step(tx):
    return jax.jit(lambda p, s, g: (lambda u, s: (optax.apply_updates(p, u), s))(*tx.update(g, s, p)))


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
    ap.add_argument(
        "--temp-grads", action="store_true", help="gradients as a temporary of each JAX step (adam)"
    )
    args = ap.parse_args()

    shapes = resnet50_shapes()
    n = sum(int(np.prod(s)) for s in shapes)
    keys = jax.random.split(jax.random.key(0), 2 * len(shapes))
    params = [jax.random.normal(k, s) for k, s in zip(keys[: len(shapes)], shapes)]
    grads = [1e-3 * jax.random.normal(k, s) for k, s in zip(keys[len(shapes) :], shapes)]
    print(f"load average (1, 5, 15 min) at the start: {os.getloadavg()}")
    bw_np, bw_xla = copy_bandwidth()
    bw = max(bw_np, bw_xla)
    print(
        f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores; "
        f"jax {jax.__version__} ({jax.default_backend()}), optax {optax.__version__}, "
        f"torch {torch.__version__ if torch else 'not installed'}"
    )
    print(
        f"tree: {len(shapes)} leaves, {n / 1e6:.2f}M float32 params; copy bandwidth {bw / 1e9:.2f} GB/s "
        f"(numpy memcpy {bw_np / 1e9:.2f}, XLA in-place stream {bw_xla / 1e9:.2f})"
    )
    if torch is not None:
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
        if args.only and not name.startswith(args.only) or args.temp_grads and name != "adam":
            continue
        floor = n * bytes_per_param / bw
        runners = {
            "jaxdl": jax_runner(ours, params, grads),
            "jaxdl (donated)": jax_runner(ours, params, grads, donate=True),
            "optax": jax_runner(theirs, params, grads),
            "optax (donated)": jax_runner(theirs, params, grads, donate=True),
        }
        if name == "adam" and args.temp_grads:
            runners = {
                "jaxdl (donated)": jax_runner(ours, params, grads, donate=True, in_step=True),
                "optax (donated)": jax_runner(theirs, params, grads, donate=True, in_step=True),
            }
            if _fused_adam is not None:
                for alias in (False, True):
                    tx = _fused_adam.adam(1e-3, alias_grads=alias)
                    label = "fused (a), u over g" if alias else "fused (a)"
                    runners[f"{label} (donated)"] = jax_runner(tx, params, grads, donate=True, in_step=True)
                runners["fused (b) p,m,v (donated)"] = fused_step_runner(params, grads, in_step=True)
        elif name == "adam":
            runners["optax.flatten(adam) (donated)"] = jax_runner(
                optax.flatten(theirs), params, grads, donate=True
            )
            runners["jaxdl 1 raveled leaf (donated)"] = jax_runner(
                ours, [flat_params], [flat_grads], donate=True
            )
            bf16 = dl.adam(1e-3, mu_dtype=jnp.bfloat16, nu_dtype=jnp.bfloat16)
            runners["jaxdl bf16 moments (donated)"] = jax_runner(bf16, params, grads, donate=True)
            if _fused_adam is not None:
                runners["fused (a) (donated)"] = jax_runner(
                    _fused_adam.adam(1e-3), params, grads, donate=True
                )
                runners["fused (b) p,m,v (donated)"] = fused_step_runner(params, grads)
                da, db = fused_difference(params, grads)
                print(f"fused vs jaxdl after 3 steps: max |dp| (a) {da:.2e}, (b) {db:.2e}")
        results = round_robin(runners, args.repeats)
        # XLA:CPU maps each large temporary afresh per call: a 100 MB one costs ~25,000 faults.
        faults = {k: faults_per_call(run) for k, run in runners.items()}
        print("minor page faults per call: " + ", ".join(f"{k} {v:.0f}" for k, v in faults.items()))
        # PyTorch runs in a block of its own: interleaved with XLA, the two thread pools (both
        # spin-waiting) starve each other on 2 cores and PyTorch's times jump 20x.
        if torch is not None:
            results["torch"] = timeit(torch_runner(make_torch, shapes), args.repeats)
        med = {k: statistics.median(v) for k, v in results.items()}

        def paired(impl, ref):  # median of round-by-round ratios; PyTorch is not interleaved
            if ref not in results:
                return float("nan")
            if "torch" in (impl, ref):
                return med[impl] / med[ref]
            return statistics.median(a / b for a, b in zip(results[impl], results[ref]))

        for impl, times in results.items():
            # Compare like with like: donated runs against optax's / jaxdl's donated run.
            donated = "donated" in impl or "optax" not in results  # (--temp-grads runs donated only)
            ref_optax = "optax (donated)" if donated else "optax"
            ref_ours = "jaxdl (donated)" if donated else "jaxdl"
            print(
                f"{name:<18} {impl:<30} {med[impl] * 1e3:9.2f} {min(times) * 1e3:7.2f} {max(times) * 1e3:7.2f} "
                f"{paired(impl, ref_optax):8.2f} {paired(impl, ref_ours):8.2f} {paired(impl, 'torch'):8.2f} "
                f"{med[impl] / floor:8.2f}"
            )
        print(f"{name:<18} {'floor':<30} {floor * 1e3:9.2f}  ({bytes_per_param} B/param at copy bandwidth)")
    print(f"load average (1, 5, 15 min) at the end: {os.getloadavg()}")


if __name__ == "__main__":
    main()
