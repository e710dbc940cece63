"""Benchmark: what the train step's guarantees cost, against flax.linen + optax, in one run.

1. Tiny MLP 64-128-128-10, batch 32, Adam: jaxdl's scan loop (`make_train_loop`, default metrics
   and non-finite skip) vs flax+optax one jitted step per call, per step; plus scan loops of the
   same step with the metrics added one at a time (what each one costs).
2. Big MLP 784-1024-1024-10, batch 256, Adam: steady-state step, jaxdl vs flax+optax, and the
   step's achieved FLOP/s as a fraction of a large jnp.dot's in the same run; plus single steps
   with the metrics added one at a time, as for the tiny loop (each returns its metrics, which
   would otherwise be dead code); and the donated scan loop `fit`
   runs, against the donated flax+optax step.
3. First call of the big MLP step (trace + compile + one step), jaxdl vs flax+optax, with the
   compile time and the number of fusions of each program; plus the step without the skip, and
   without the skip and the norms (what each costs in compile time).
4. (``--only alternatives``) two other ways to build the same step, tried for issue 14, against
   `step_body` on both models: runtime, fusions, compile time.

Every comparison is timed round-robin (`_timing.round_robin`: one call of each in turn) and
reported as the median of the pair-by-pair ratios (same round), with quartiles, because the
machine is shared.

    python benchmarks/step_overhead.py [--repeats 30] [--only tiny,big,first,alternatives]
"""

from __future__ import annotations

import argparse
import os
import platform
import re
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
from _timing import round_robin
from train_step import _data, flax_step_fn, jaxdl_model

import jaxdl as dl
from jaxdl import train_step as ts
from jaxdl.transforms import global_norm


def ratios(times, a, b):
    """Median and quartiles of times[a][i] / times[b][i] over the rounds."""
    r = sorted(x / y for x, y in zip(times[a], times[b], strict=True))
    q = statistics.quantiles(r, n=4) if len(r) > 1 else [r[0]] * 3
    return q[1], q[0], q[2]


def fusions(compiled) -> int:
    return len(re.findall(r"^\s*(?:ROOT )?\S+ = \S+ fusion\(", compiled.as_text(), re.M))


def ablation_body(level):
    """A scan body (carry: state and the parameter norm) of the train step keeping only what
    ``level`` names, to show what each part costs: "bare" (loss and the loss's aux),
    "+grad_norm", "+update_ratio" (|u| over the carried |params|, as `scan_steps`),
    "+nonfinite" (the select-based skip, its optimizer state traced again as the library's:
    the library's step rebuilt), and
    "before issue 14" (the step as it was: `global_norm`s, the old-params norm, a select per leaf)."""

    def body(loss_fn, tx, carry, batch):
        state, pn = carry
        key = ts.step_key(state)
        (loss, (ms, aux)), g = jax.value_and_grad(
            lambda p: loss_fn(p, state.model_state, batch, key, train=True), has_aux=True
        )(state.params)
        u, opt = tx.update(g, state.opt_state, state.params)
        metrics = {"loss": loss, **aux}
        if level == "before issue 14":
            gn, un, pn = global_norm(g), global_norm(u), global_norm(state.params)
            finite = jnp.isfinite(loss) & jnp.isfinite(gn) & jnp.isfinite(un)
            pick = lambda new, old: jax.tree.map(lambda n, o: jnp.where(finite, n, o), new, old)  # noqa: E731
            params = pick(dl.apply_updates(state.params, u), state.params)
            ms, opt = pick(ms, state.model_state), pick(opt, state.opt_state)
            metrics.update(grad_norm=gn, update_ratio=un / pn, nonfinite=(~finite).astype(jnp.int32))
            return (
                state.replace(step=state.step + 1, params=params, model_state=ms, opt_state=opt),
                pn,
            ), metrics
        if level != "bare":
            metrics["grad_norm"] = ts.tree_norm(g)
        if level in ("+update_ratio", "+nonfinite"):
            un = ts.tree_norm(u)
            metrics["update_ratio"] = un / pn
        if level == "+nonfinite":
            finite = jnp.isfinite(loss) & jnp.isfinite(metrics["grad_norm"]) & jnp.isfinite(un)
            metrics["nonfinite"] = (~finite).astype(jnp.int32)
        params = dl.apply_updates(state.params, u)
        if level == "+nonfinite":
            pick = lambda new, old: jax.tree.map(lambda n, o: jnp.where(finite, n, o), new, old)  # noqa: E731
            params, ms, opt = (
                pick(params, state.params),
                pick(ms, state.model_state),
                pick(ts._state_to_keep(tx, g, state, opt), state.opt_state),
            )
        if level in ("+update_ratio", "+nonfinite"):
            pn = ts.tree_norm(params)
        return (state.replace(step=state.step + 1, params=params, model_state=ms, opt_state=opt), pn), metrics

    return body


def loop_runners(loops, s0, batches):
    """One runner per compiled loop, each on its own copy of ``s0`` (updated in place, as `fit`
    does): a call runs the loop over ``batches`` and waits for its metrics."""
    holders = {name: jax.tree.map(jnp.copy, s0) for name in loops}
    runners = {}
    for name, loop in loops.items():

        def run(name=name, loop=loop):
            holders[name], m = loop(holders[name], batches)
            jax.block_until_ready(m["loss"])

        runners[name] = run
    return runners


def ablation_loop(level, loss_fn, tx):
    body = ablation_body(level)

    def loop(s, b):
        (s, _), m = jax.lax.scan(lambda c, x: body(loss_fn, tx, c, x), (s, ts.tree_norm(s.params)), b)
        return s, m

    return jax.jit(loop, donate_argnums=0)


def ablation_step(level, loss_fn, tx):
    """One jitted step of `ablation_body` (|params| taken in the step), returning its state and
    its metrics: a metric that is not an output would be dead code, removed by XLA, and the
    level would measure nothing."""
    body = ablation_body(level)

    def step(s, b):
        (s, _), metrics = body(loss_fn, tx, (s, ts.tree_norm(s.params)), b)
        return s, metrics

    return jax.jit(step)


def _stacked_norms(g, u, p):
    """|g|, |u|, |p| with one reduction per leaf over the three (stacked) arrays."""
    total = sum(
        jnp.sum(jnp.stack([a * a, b * b, c * c]).reshape(3, -1), axis=1)
        for a, b, c in zip(*map(jax.tree.leaves, (g, u, p)), strict=True)
    )
    return tuple(jnp.sqrt(total))


def alternative_body(kind):
    """The full step (same metrics, same skip guarantee) built other ways, tried for issue 14:
    "stacked norms" (one reduction per leaf instead of three, selects as the step),
    "cond+recompute" (stacked norms; the skip is a `lax.cond` whose taken branch recomputes the
    update and writes the new state, so no select runs on a finite step)."""

    def body(loss_fn, tx, state, batch):
        key = ts.step_key(state)
        (loss, (ms, aux)), g = jax.value_and_grad(
            lambda p: loss_fn(p, state.model_state, batch, key, train=True), has_aux=True
        )(state.params)
        u, opt = tx.update(g, state.opt_state, state.params)
        gn, un, pn = _stacked_norms(g, u, state.params)
        finite = jnp.isfinite(loss) & jnp.isfinite(gn) & jnp.isfinite(un)
        if kind == "stacked norms":
            pick = lambda new, old: jax.tree.map(lambda n, o: jnp.where(finite, n, o), new, old)  # noqa: E731
            params = pick(dl.apply_updates(state.params, u), state.params)
            ms, opt = pick(ms, state.model_state), pick(opt, state.opt_state)
        else:

            def apply():
                u2, opt2 = tx.update(g, state.opt_state, state.params)
                return dl.apply_updates(state.params, u2), ms, opt2

            params, ms, opt = jax.lax.cond(
                finite, apply, lambda: (state.params, state.model_state, state.opt_state)
            )
        metrics = {
            "loss": loss,
            "grad_norm": gn,
            "update_ratio": un / pn,
            "nonfinite": (~finite).astype(jnp.int32),
            **aux,
        }
        return state.replace(step=state.step + 1, params=params, model_state=ms, opt_state=opt), metrics

    return body


def bench_alternatives(repeats, k=100):
    """The step as built today vs `alternative_body`'s, on the tiny loop and the big step."""
    _alternatives_case("Tiny MLP scan loop (100 steps per call)", 64, (128, 128, 10), 32, k, repeats)
    _alternatives_case("Big MLP step (a scan of 1)", 784, (1024, 1024, 10), 256, 1, repeats)


def _alternatives_case(title, d, widths, batch, steps, repeats):
    tx = dl.adam(1e-3)
    xs, ys = _data(batch * steps, d, 10)
    xj, yj = jnp.asarray(xs.reshape(steps, batch, d)), jnp.asarray(ys.reshape(steps, batch))
    model = jaxdl_model(widths)
    loss_fn = ts.supervised_loss(model)
    s0 = ts.TrainState.create(model, tx, jax.random.key(0), (d,))
    bodies = {
        "jaxdl step_body": lambda lf, t, c, x: ts.step_body(lf, t, True, c, x, ts.step_key(c)),
        **{kind: alternative_body(kind) for kind in ("stacked norms", "cond+recompute")},
    }
    holders = dict.fromkeys(bodies, s0)
    runners, compile_s, counts = {}, {}, {}
    for name, body in bodies.items():
        fn = jax.jit(lambda s, b, body=body: jax.lax.scan(lambda c, x: body(loss_fn, tx, c, x), s, b))
        t0 = time.process_time()
        compiled = fn.lower(s0, (xj, yj)).compile()
        compile_s[name], counts[name] = time.process_time() - t0, fusions(compiled)

        def run(name=name, fn=fn):
            holders[name], m = fn(holders[name], (xj, yj))
            jax.block_until_ready(m["loss"])

        runners[name] = run
    times = round_robin(runners, repeats)
    print(f"\nAlternatives, {title}, {repeats} rounds")
    for name in bodies:
        med, lo, hi = ratios(times, name, "jaxdl step_body")
        print(
            f"  {name:<16} {statistics.median(times[name]) / steps * 1e6:9.1f} us/step   x step_body "
            f"{med:.3f} ({lo:.2f}-{hi:.2f})   {counts[name]} fusions, compile {compile_s[name]:.2f} s CPU"
        )


def bench_tiny(repeats, k=100):
    d, widths, batch = 64, (128, 128, 10), 32
    xs, ys = _data(batch * k, d, 10)
    xj, yj = jnp.asarray(xs.reshape(k, batch, d)), jnp.asarray(ys.reshape(k, batch))
    tx = dl.adam(1e-3)
    model = jaxdl_model(widths)
    loss_fn = ts.supervised_loss(model)
    s0 = ts.TrainState.create(model, tx, jax.random.key(0), (d,))
    loops = {
        "jaxdl scan loop": ts.make_train_loop(loss_fn, tx),
        "jaxdl scan, donated": ts.make_train_loop(loss_fn, tx, donate=True),
    }
    for level in ("bare", "+grad_norm", "+update_ratio", "+nonfinite", "before issue 14"):
        loops[f"scan, {level}"] = ablation_loop(level, loss_fn, tx)
    runners = loop_runners(loops, s0, (xj, yj))
    counts = {name: fusions(loop.lower(s0, (xj, yj)).compile()) for name, loop in loops.items()}

    finit, fstep = flax_step_fn(widths, optax.adam(1e-3))
    fstep_donated = jax.jit(fstep.__wrapped__, donate_argnums=(0, 1))
    fx, fy = [xj[i] for i in range(k)], [yj[i] for i in range(k)]
    for name, fn in (("flax+optax loop", fstep), ("flax+optax, donated", fstep_donated)):
        fh = dict(zip(("p", "s"), finit(xj[0]), strict=True))

        def run_flax(fh=fh, fn=fn):
            for i in range(k):
                fh["p"], fh["s"], loss = fn(fh["p"], fh["s"], fx[i], fy[i])
            jax.block_until_ready(loss)

        runners[name] = run_flax
        counts[name] = fusions(fn.lower(fh["p"], fh["s"], fx[0], fy[0]).compile())
    times = round_robin(runners, repeats)
    print(f"\nTiny MLP 64-128-128-10, batch 32, Adam, {k} steps per call, {repeats} rounds (us per step)")
    print(
        f"  {'contender':<22} {'median':>8} {'min':>8}  {'fusions':>7}   flax time / this (median, quartiles)"
    )
    for name in runners:
        med, lo, hi = ratios(times, "flax+optax loop", name)
        print(
            f"  {name:<22} {statistics.median(times[name]) / k * 1e6:8.1f} {min(times[name]) / k * 1e6:8.1f}"
            f"  {counts[name]:7d}   {med:5.2f}  ({lo:.2f}-{hi:.2f})"
        )
    med, lo, hi = ratios(times, "flax+optax, donated", "jaxdl scan, donated")
    print(f"  donated against donated: flax time / jaxdl time {med:.2f} ({lo:.2f}-{hi:.2f})")
    base = "scan, bare"
    print("  cost over the bare scan, per step (median of pair-by-pair differences):")
    for name in [n for n in runners if n.startswith("scan, ") and n != base or n.startswith("jaxdl")]:
        diff = statistics.median((a - b) / k * 1e6 for a, b in zip(times[name], times[base], strict=True))
        print(f"    {name:<22} {diff:+7.1f} us")


def matmul_peak(repeats, n=2048, dtype=jnp.float32):
    """FLOP/s of an n x n matmul in ``dtype``: (at the fastest call, at the median call)."""
    a = jnp.asarray(np.random.default_rng(0).normal(size=(n, n)), dtype)
    f = jax.jit(lambda a: a @ a)
    times = round_robin({"dot": lambda: jax.block_until_ready(f(a))}, repeats)["dot"]
    return 2 * n**3 / min(times), 2 * n**3 / statistics.median(times)


def bench_big(repeats):
    d, widths, batch = 784, (1024, 1024, 10), 256
    x, y = _data(batch, d, 10)
    xj, yj = jnp.asarray(x), jnp.asarray(y)
    tx = dl.adam(1e-3)
    model = jaxdl_model(widths)
    s0 = ts.TrainState.create(model, tx, jax.random.key(0), (d,))
    loss_fn = ts.supervised_loss(model)
    steps = {
        "jaxdl": ts.make_train_step(loss_fn, tx),
        "jaxdl, donated": ts.make_train_step(loss_fn, tx, donate=True),
        "before issue 14": ablation_step("before issue 14", loss_fn, tx),
    }
    levels = ("bare", "+grad_norm", "+update_ratio", "+nonfinite")
    for level in levels:  # the step built up one part at a time, |params| taken in the step
        steps[f"step, {level}"] = ablation_step(level, loss_fn, tx)
    holders = {name: jax.tree.map(jnp.copy, s0) for name in steps}
    runners = {}
    for name, step in steps.items():

        def run(name=name, step=step):
            out = step(holders[name], (xj, yj))
            holders[name] = out[0]  # every step returns (state, metrics)
            jax.block_until_ready(out)

        runners[name] = run
    counts = {name: fusions(step.lower(s0, (xj, yj)).compile()) for name, step in steps.items()}

    finit, fstep = flax_step_fn(widths, optax.adam(1e-3))
    fstep_donated = jax.jit(fstep.__wrapped__, donate_argnums=(0, 1))
    for name, fn in (("flax+optax", fstep), ("flax+optax, donated", fstep_donated)):
        fh = dict(zip(("p", "s"), finit(xj), strict=True))

        def run_flax(fh=fh, fn=fn):
            fh["p"], fh["s"], loss = fn(fh["p"], fh["s"], xj, yj)
            jax.block_until_ready(loss)

        runners[name] = run_flax
        counts[name] = fusions(fn.lower(fh["p"], fh["s"], xj, yj).compile())

    times = round_robin(runners, repeats)
    dims = (d, *widths)
    fwd = sum(2 * batch * a * b for a, b in zip(dims[:-1], dims[1:], strict=True))
    flops = 3 * fwd - 2 * batch * dims[0] * dims[1]  # forward, weight grads, input grads but the first
    peak_best, peak_med = matmul_peak(max(repeats // 3, 5))
    med, lo, hi = ratios(times, "jaxdl", "flax+optax")
    print(f"\nBig MLP 784-1024-1024-10, batch 256, Adam: one step, {repeats} rounds")
    for name, t in times.items():
        print(
            f"  {name:<20} median {statistics.median(t) * 1e3:7.2f} ms  min {min(t) * 1e3:7.2f} ms  "
            f"{flops / min(t) / 1e9:6.1f} GFLOP/s at the min  {counts.get(name, '')} fusions"
        )
    print(f"  jaxdl / flax+optax: {med:.3f} (quartiles {lo:.3f}-{hi:.3f})")
    for a, b in (("jaxdl, donated", "flax+optax, donated"), ("before issue 14", "flax+optax")):
        med, lo, hi = ratios(times, a, b)
        print(
            f"  {a} / {b}: {med:.3f} (quartiles {lo:.3f}-{hi:.3f}); ratio of the mins {min(times[a]) / min(times[b]):.3f}"
        )
    print("  the step built up one part at a time: cost over the bare step (median of pair-by-pair")
    print("  differences) and time over flax+optax's (median of pair-by-pair ratios):")
    for level in levels[1:]:
        name = f"step, {level}"
        diff = statistics.median(a - b for a, b in zip(times[name], times["step, bare"], strict=True))
        print(
            f"    {level:<14} {diff * 1e3:+6.2f} ms   x flax+optax {ratios(times, name, 'flax+optax')[0]:.3f}"
        )
    print(f"    (bare          x flax+optax {ratios(times, 'step, bare', 'flax+optax')[0]:.3f})")
    print(
        f"  step FLOPs {flops / 1e9:.2f} G; matmul peak (2048^3 jnp.dot): {peak_best / 1e9:.1f} GFLOP/s best, "
        f"{peak_med / 1e9:.1f} median; jaxdl step at its min = {flops / min(times['jaxdl']) / peak_best:.2f} "
        f"of the best peak, at its median = {flops / statistics.median(times['jaxdl']) / peak_med:.2f} of the "
        "median peak"
    )


def bench_big_loop(repeats, k=4):
    """What `fit` runs on the big MLP: the donated scan loop (k steps per call) against the
    donated flax+optax step called k times, and the old step's loop (per step)."""
    d, widths, batch = 784, (1024, 1024, 10), 256
    x, y = _data(batch * k, d, 10)
    xj, yj = jnp.asarray(x.reshape(k, batch, d)), jnp.asarray(y.reshape(k, batch))
    tx = dl.adam(1e-3)
    model = jaxdl_model(widths)
    s0 = ts.TrainState.create(model, tx, jax.random.key(0), (d,))
    loss_fn = ts.supervised_loss(model)
    loops = {
        "jaxdl scan loop, donated": ts.make_train_loop(loss_fn, tx, donate=True),
        "scan, before issue 14": ablation_loop("before issue 14", loss_fn, tx),
        "scan, bare": ablation_loop("bare", loss_fn, tx),
    }
    runners = loop_runners(loops, s0, (xj, yj))
    finit, fstep = flax_step_fn(widths, optax.adam(1e-3))
    fstep = jax.jit(fstep.__wrapped__, donate_argnums=(0, 1))
    fh = dict(zip(("p", "s"), finit(xj[0]), strict=True))
    fx, fy = [xj[i] for i in range(k)], [yj[i] for i in range(k)]

    def run_flax():
        for i in range(k):
            fh["p"], fh["s"], loss = fstep(fh["p"], fh["s"], fx[i], fy[i])
        jax.block_until_ready(loss)

    runners["flax+optax, donated"] = run_flax
    times = round_robin(runners, repeats)
    print(f"\nBig MLP, {k} steps per call, donated (what fit runs), {repeats} rounds (ms per step)")
    for name, t in times.items():
        med, lo, hi = ratios(times, name, "flax+optax, donated")
        print(
            f"  {name:<26} median {statistics.median(t) / k * 1e3:6.2f}  min {min(t) / k * 1e3:6.2f}"
            f"   x flax+optax {med:.3f} ({lo:.3f}-{hi:.3f})"
        )


def bench_first(repeats):
    """First call (trace + lower + compile + one step) of the big MLP step, round-robin with
    `jax.clear_caches()` before each: the library's step, the same without the skip
    (``skip_nonfinite=False``), the step with neither the skip nor the norms (`ablation_step`
    "bare": loss and accuracy only), and flax+optax."""
    d, widths, batch = 784, (1024, 1024, 10), 256
    x, y = _data(batch, d, 10)
    xj, yj = jnp.asarray(x), jnp.asarray(y)
    jaxdl_steps = {
        "jaxdl": lambda loss_fn, tx: ts.make_train_step(loss_fn, tx),
        "jaxdl, skip_nonfinite=False": lambda loss_fn, tx: ts.make_train_step(
            loss_fn, tx, skip_nonfinite=False
        ),
        "jaxdl bare step (no norms, no skip)": lambda loss_fn, tx: ablation_step("bare", loss_fn, tx),
    }
    names = [*jaxdl_steps, "flax+optax"]
    out = {name: [] for name in names}
    parts = {name: [] for name in names}
    count = {}
    for r in range(repeats):
        for name in names if r % 2 == 0 else names[::-1]:
            jax.clear_caches()
            if name in jaxdl_steps:
                tx = dl.adam(1e-3)
                model = jaxdl_model(widths)
                state = ts.TrainState.create(model, tx, jax.random.key(0), (d,))
                jax.block_until_ready(state)
                fn, args = jaxdl_steps[name](ts.supervised_loss(model), tx), (state, (xj, yj))
            else:
                finit, fn = flax_step_fn(widths, optax.adam(1e-3))
                p, s = finit(xj)
                jax.block_until_ready(p)
                args = (p, s, xj, yj)
            t0 = time.perf_counter()
            lowered = fn.trace(*args).lower()
            t1 = time.perf_counter()
            compiled = lowered.compile()
            t2 = time.perf_counter()
            jax.block_until_ready(compiled(*args))
            t3 = time.perf_counter()
            out[name].append(t3 - t0)
            parts[name].append((t1 - t0, t2 - t1, t3 - t2))
            count[name] = fusions(compiled)
    print(f"\nFirst call of the big MLP step (trace + compile + one step), {repeats} rounds")
    for name in out:
        tr, co, ru = (statistics.median(p) for p in zip(*parts[name], strict=True))
        med, lo, hi = ratios(out, name, "flax+optax")
        print(
            f"  {name:<36} median {statistics.median(out[name]):6.2f} s (trace+lower {tr:.2f}, compile {co:.2f}, "
            f"run {ru:.2f}); {count[name]} fusions; x flax+optax {med:.2f} (quartiles {lo:.2f}-{hi:.2f})"
        )


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=30)
    ap.add_argument("--only", default="tiny,big,first")
    args = ap.parse_args()
    only = args.only.split(",")
    print(
        f"machine: {platform.machine()}, {os.cpu_count()} cores; jax {jax.__version__} ({jax.default_backend()}), "
        f"optax {optax.__version__}; load average {os.getloadavg()[0]:.1f}"
    )
    if "tiny" in only:
        bench_tiny(args.repeats)
    if "big" in only:
        bench_big(args.repeats)
        bench_big_loop(max(args.repeats // 2, 5))
    if "first" in only:
        bench_first(max(args.repeats // 6, 3))
    if "alternatives" in only:
        bench_alternatives(args.repeats)
    print(f"load average at the end: {' '.join(f'{v:.1f}' for v in os.getloadavg())}")


if __name__ == "__main__":
    main()
