"""The doctor's checks: one function per check id, ``check(run) -> Finding``.

Each reads what it needs from the shared `jaxdl.doctor.probe.Run` (the data, the probe run, the
inspections, the range test) and says what was measured, how bad it is and what to do. `RUNNERS`
maps each id of `jaxdl.doctor.report.CHECKS` to its function. The sources, thresholds and reasons
are in docs/doctor.md.
"""

from __future__ import annotations

import math
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np

from jaxdl import layers as L
from jaxdl.diagnostics import initial_loss_check
from jaxdl.doctor.probe import Run, cached, layer_groups, path_name, to_numpy
from jaxdl.doctor.report import THRESHOLDS, Finding, layer_kind
from jaxdl.losses import binary_cross_entropy, mse
from jaxdl.transforms import schedule_free_eval_params

__all__ = ["RUNNERS"]


def _check_data(run: Run) -> Finding:
    t = THRESHOLDS
    x, y, C = run.x, run.y, run.num_classes
    flat = x.reshape(len(x), -1)
    finite_rows = np.all(np.isfinite(flat), axis=1)
    in_range = (y >= 0) & (y < C)
    run.usable = np.flatnonzero(finite_rows & in_range)
    ev: dict[str, Any] = {
        "examples": len(y),
        "nonfinite_examples": int((~finite_rows).sum()),
        "labels_out_of_range": int((~in_range).sum()),
        "num_classes": C,
    }
    fails, warns, advice = [], [], []
    if (~finite_rows).any():
        fails.append(
            f"{ev['nonfinite_examples']} of {len(y)} training examples hold NaN/Inf "
            f"(first at index {int(np.flatnonzero(~finite_rows)[0])})"
        )
        advice.append(
            "remove or repair the non-finite examples (a NaN input makes the loss and every gradient NaN)"
        )
    if (~in_range).any():
        bad = np.unique(y[~in_range])[:5].tolist()
        fails.append(
            f"{ev['labels_out_of_range']} labels outside [0, {C}) for a model with {C} outputs, e.g. {bad}"
        )
        advice.append(f"give the last layer one output per class, or map the labels to 0..{C - 1}")
    vals = flat[finite_rows].astype(np.float64)
    if vals.size:
        mean, std = float(vals.mean()), float(vals.std())
        ev.update(mean=mean, std=std, min=float(vals.min()), max=float(vals.max()))
        if abs(mean) > t["data_mean"] or not t["data_std_low"] <= std <= t["data_std_high"]:
            warns.append(
                f"inputs have mean {mean:.3g} and std {std:.3g} (range [{vals.min():.3g}, "
                f"{vals.max():.3g}]), far from zero mean / unit scale"
            )
            advice.append(
                "preprocess: subtract the mean and divide by the std, fitted on the training "
                "split (jaxdl.data.fit_standardization / standardize; CSE 176 Lecture 11)"
            )
    counts = np.bincount(y[in_range], minlength=C)
    ev["class_counts"] = counts.tolist()
    median = float(np.median(counts))
    rare = np.flatnonzero(counts < t["data_rare_class"] * median)
    if median > 0 and rare.size:
        warns.append(
            f"class(es) {rare[:5].tolist()} have {counts[rare[:5]].tolist()} examples against a "
            f"median of {median:g} per class"
        )
        advice.append("collect or augment more examples of the rare classes, or weight the loss by class")
    if run.validation is not None:
        vx, vy = run.validation
        vflat = vx.reshape(len(vx), -1)
        vbad = int((~np.all(np.isfinite(vflat), axis=1)).sum())
        vout = int(((vy < 0) | (vy >= C)).sum())
        ev.update(validation_nonfinite_examples=vbad, validation_labels_out_of_range=vout)
        if vbad:
            fails.append(f"{vbad} of {len(vy)} validation examples hold NaN/Inf")
            advice.append("repair the validation inputs")
        if vout:
            fails.append(f"{vout} validation labels outside [0, {C})")
            advice.append(f"map the validation labels to 0..{C - 1}")
        seen = {r.tobytes() for r in np.ascontiguousarray(flat)}
        dup = sum(r.tobytes() in seen for r in np.ascontiguousarray(vflat))
        ev["validation_duplicates"] = dup
        if len(vy) and dup / len(vy) >= t["data_duplicates"]:
            warns.append(
                f"{dup} of {len(vy)} validation examples ({dup / len(vy):.1%}) are copies of "
                "training examples"
            )
            advice.append(
                "deduplicate before splitting: repeated examples make the validation score optimistic"
            )
    if fails:
        return Finding("data", "fail", "; ".join(fails + warns), " ".join(advice), ev)
    if warns:
        return Finding("data", "warn", "; ".join(warns), " ".join(advice), ev)
    return Finding(
        "data",
        "ok",
        f"{len(y)} finite examples, labels in [0, {C}), mean {ev.get('mean', 0):.3g}, "
        f"std {ev.get('std', 0):.3g}, smallest class {int(counts.min())} / median {median:g}",
        "",
        ev,
    )


def _is_cross_entropy(loss_fn) -> bool:
    """False only for a loss known not to be softmax cross-entropy (mse, binary cross-entropy)."""
    fn = loss_fn
    while fn is not None:
        if getattr(fn, "loss", None) in (mse, binary_cross_entropy):
            return False
        fn = getattr(fn, "inner", None)
    return True


def _check_initial_loss(run: Run) -> Finding:
    t = THRESHOLDS
    C = run.num_classes
    if C < 2 or not _is_cross_entropy(run.loss_fn):
        return Finding(
            "initial_loss",
            "ok",
            f"not applicable: the loss is not a softmax cross-entropy over {C} classes, so ln C says nothing",
            "",
            {"num_classes": C},
        )
    loss = float(run.inspect("init")["loss"])
    rep = initial_loss_check(loss, C)
    ratio = loss / rep.expected
    ev = {"loss": loss, "expected": rep.expected, "ratio": ratio, "num_classes": C}
    msg = f"initial loss {loss:.4g} vs ln({C}) = {rep.expected:.4f} (ratio {ratio:.2f})"
    if not math.isfinite(loss):
        return Finding(
            "initial_loss", "fail", msg + ": not finite", "check the inputs and the initialization", ev
        )
    severity = (
        "fail"
        if ratio > t["initial_loss_high"] or ratio < t["initial_loss_low"]
        else "warn"
        if abs(ratio - 1) > t["initial_loss_warn"]
        else "ok"
    )
    if ratio > 1:
        advice = (
            "the initial outputs are confidently wrong: scale the initial weights down (Xavier/He; "
            "Kira, CS 7643) or normalize the inputs (CSE 176 Lecture 11)"
        )
    else:
        advice = (
            "too low for an untrained model: look for labels leaking into the inputs, or a loss that "
            "is not the mean cross-entropy"
        )
    return Finding("initial_loss", severity, msg, advice if severity != "ok" else "", ev)


def _check_gradients_fd(run: Run) -> Finding:
    t = THRESHOLDS
    eps, k = t["gradient_check_eps"], 3
    x, y = run.inspect_batch()
    x, y = np.asarray(x[:16]), np.asarray(y[:16])
    key = jax.random.fold_in(run.key, 2 * 10**6)
    rng = np.random.default_rng(run.seed)

    def to64(tree, noise):  # on the host, so that nothing here compiles but the program below
        def leaf(v):
            v = np.asarray(v)
            if not np.issubdtype(v.dtype, np.floating):
                return v
            v = v.astype(np.float64)
            # off the kinks: zero biases and zero (background) inputs put ReLUs exactly at 0
            return v + 1e-3 * rng.standard_normal(v.shape) if noise else v

        return jax.tree.map(leaf, tree)

    p64, ms64 = to64(to_numpy(run.params0), True), to64(to_numpy(run.ms0), False)
    paths = [path_name(path) for path, _ in jax.tree_util.tree_flatten_with_path(p64)[0]]
    sizes = [int(np.size(v)) for v in jax.tree.leaves(p64)]
    offsets = np.cumsum([0] + sizes)
    rand = np.concatenate(
        [
            rng.integers(lo, hi, size=min(k, hi - lo))
            for lo, hi in zip(offsets[:-1], offsets[1:], strict=True)
            if hi > lo
        ]
    ).astype(np.int64)
    sig = (jax.tree.structure(p64), tuple((v.shape, str(v.dtype)) for v in jax.tree.leaves(p64)))
    with jax.enable_x64(True):
        flat = np.concatenate([np.ravel(v) for v in jax.tree.leaves(p64)])  # ravel_pytree's order
        x64 = np.asarray(x, np.float64) if np.issubdtype(x.dtype, np.floating) else x
        program = cached("fd", _make_fd_program, run.loss_fn, sig, k, eps)
        loss0, ad, fd, idx = to_numpy(program(flat, ms64, x64, y, key, rand))
    loss0 = float(loss0)
    owner = np.asarray(paths)[np.searchsorted(offsets, idx, side="right") - 1]
    floor = 1e-5 * (1 + abs(loss0))  # ~1e4 x the float64 rounding of the differences
    entry_err = np.abs(ad - fd) / np.maximum(np.abs(ad) + np.abs(fd), floor)
    errors, disagree = {}, {}
    for name in dict.fromkeys(owner):
        e = entry_err[owner == name]
        errors[name] = float(np.median(e))
        disagree[name] = float(np.mean(~(e <= t["gradient_check_fail"])))
    ev = {
        "median_relative_error": errors,
        "fraction_disagreeing": disagree,
        "entries_checked": int(len(idx)),
        "eps": eps,
        "examples": len(y),
        "threshold": t["gradient_check_fail"],
    }
    # a majority vote per array: one entry whose +-eps straddles a ReLU/max kink is not a bug
    bad = {k: errors[k] for k, v in disagree.items() if v > 0.5}
    rough = {k: e for k, e in errors.items() if k not in bad and not e <= t["gradient_check_warn"]}
    worst = max(errors, key=lambda k: errors[k] if math.isfinite(errors[k]) else math.inf)
    if bad:
        names = ", ".join(f"{k} ({v:.2g})" for k, v in list(bad.items())[:6])
        return Finding(
            "gradient_check",
            "fail",
            f"autodiff and float64 central differences disagree on {names} (median relative error "
            f"per array; above {t['gradient_check_fail']:g} on most checked entries of {len(bad)} of "
            f"{len(errors)} parameter arrays)",
            "a custom layer, loss or jax.custom_vjp computes a wrong gradient there (or a "
            "non-differentiable op such as a rounding sits in the model): test that function's "
            "gradient against finite differences (jax.test_util.check_grads)",
            ev,
        )
    if rough:
        names = ", ".join(f"{k} ({v:.2g})" for k, v in list(rough.items())[:6])
        return Finding(
            "gradient_check",
            "warn",
            f"autodiff and float64 central differences differ by more than {t['gradient_check_warn']:g} "
            f"but less than {t['gradient_check_fail']:g} on {names} (median relative error per array)",
            "usually ReLU or max-pool kinks that the +-eps steps cross (a bias shared by every position "
            "of a convolution crosses many); a wrong gradient is off by far more. If the layer is "
            "custom, test it with jax.test_util.check_grads",
            ev,
        )
    return Finding(
        "gradient_check",
        "ok",
        f"autodiff matches float64 central differences on {len(idx)} entries of {len(errors)} "
        f"parameter arrays (largest median relative error {errors[worst]:.1g}, in {worst})",
        "",
        ev,
    )


def _make_fd_program(loss_fn, sig, k, eps):
    """Jitted (float64) ``program(flat, model_state, x, y, key, rand) -> (loss, g_ad[idx], g_fd[idx],
    idx)``: autodiff gradient, its ``k`` largest entries per parameter array plus the entries
    ``rand``, and central differences ``(L(t + eps e_i) - L(t - eps e_i)) / (2 eps)`` there."""
    treedef, shapes = sig
    sizes = [int(np.prod(shape)) for shape, _ in shapes]
    offsets = np.cumsum([0] + sizes)

    def unravel(v):
        leaves = [
            v[lo:hi].reshape(shape)
            for (shape, _), lo, hi in zip(shapes, offsets[:-1], offsets[1:], strict=True)
        ]
        return jax.tree.unflatten(treedef, leaves)

    @jax.jit
    def program(flat, ms, x, y, key, rand):
        def f(v):
            return loss_fn(unravel(v), ms, (x, y), key, train=True)[0]

        loss, grad = jax.value_and_grad(f)(flat)
        top = [
            lo + jax.lax.top_k(jnp.abs(grad[lo:hi]), min(k, hi - lo))[1]
            for lo, hi in zip(offsets[:-1], offsets[1:], strict=True)
            if hi > lo
        ]
        idx = jnp.concatenate(top + [rand])
        fd = jax.lax.map(lambda i: (f(flat.at[i].add(eps)) - f(flat.at[i].add(-eps))) / (2 * eps), idx)
        return loss, grad[idx], fd, idx

    return program


def _unit_columns(leaves):
    """The units of a layer as columns: kernel reshaped to (fan_in, units), bias as one more row."""
    kernels = [np.asarray(v, np.float64) for v in leaves if np.ndim(v) >= 2]
    if not kernels:
        return None
    units = kernels[0].shape[-1]
    cols = [k.reshape(-1, units) for k in kernels if k.shape[-1] == units]
    cols += [
        np.asarray(v, np.float64).reshape(1, units) for v in leaves if np.ndim(v) == 1 and np.size(v) == units
    ]
    return np.concatenate(cols, axis=0) if units >= 2 else None


def _clone_fraction(cols, tol):
    """Fraction of units (columns) equal to another unit within ``tol`` relative distance."""
    norms = np.linalg.norm(cols, axis=0)
    gram = cols.T @ cols
    d2 = np.maximum(norms[:, None] ** 2 + norms[None, :] ** 2 - 2 * gram, 0.0)
    scale = np.maximum(np.maximum(norms[:, None], norms[None, :]), 1e-12)
    close = np.sqrt(d2) <= tol * scale
    np.fill_diagonal(close, False)
    return float(np.mean(close.any(axis=1)))


def _check_symmetry(run: Run) -> Finding:
    t = THRESHOLDS
    after = to_numpy(run.probe()[0].params)
    g0, g1 = layer_groups(to_numpy(run.params0)), layer_groups(after)
    ev, bad, noisy = {}, [], []
    for name, leaves in g0.items():
        c0, c1 = _unit_columns(leaves), _unit_columns(g1[name])
        if c0 is None:
            continue
        f0, f1 = _clone_fraction(c0, t["symmetry_tol"]), _clone_fraction(c1, t["symmetry_tol"])
        ev[name] = {"units": c0.shape[1], "identical_at_init": f0, "identical_after_probe": f1}
        if f0 >= t["symmetry_frac"] and f1 >= t["symmetry_frac"]:
            bad.append(
                f"{name} ({f0:.0%} of {c0.shape[1]} units identical at init, "
                f"{f1:.0%} after {run.steps} steps)"
            )
        elif f0 >= t["symmetry_frac"]:
            noisy.append(f"{name} ({f0:.0%} identical at init)")
    if bad:
        return Finding(
            "symmetry",
            "fail",
            "units start identical and stay identical in " + ", ".join(bad),
            "initialize the weights randomly (He for ReLU, Xavier for tanh; Kira, CS 7643: constant "
            "initialization is degenerate, every unit gets the same gradient)",
            ev,
        )
    if noisy:
        return Finding(
            "symmetry",
            "warn",
            "units start identical in "
            + ", ".join(noisy)
            + "; only noise (e.g. dropout) told them apart during the probe run",
            "initialize the weights randomly (He/Xavier; Kira, CS 7643)",
            ev,
        )
    return Finding(
        "symmetry", "ok", f"no identical units in {len(ev)} layers at init or after the probe run", "", ev
    )


def _make_predict(model):
    """Jitted eval-mode accuracy ``predict(params, model_state, x, y)``."""
    return jax.jit(lambda p, s, x, y: jnp.mean(jnp.argmax(model.apply(p, s, x, train=False)[0], -1) == y))


def _check_overfit(run: Run) -> Finding:
    t = THRESHOLDS
    B = run.batch_size
    n = min(run.overfit_size, B, len(run.usable if run.usable is not None else run.y))
    subset = run.indices(n)
    idx = np.tile(subset[np.arange(B) % n], (run.overfit_steps, 1))
    xs, ys = jnp.asarray(run.x[subset[np.arange(B) % n]]), jnp.asarray(run.y[subset[np.arange(B) % n]])
    predict = cached("predict", _make_predict, run.model)
    accs = []

    def done(state):
        params = schedule_free_eval_params(state.opt_state, state.params)
        accs.append(float(predict(params, state.model_state, xs, ys)))
        return accs[-1] >= t["overfit_ok"]

    _, met = run.train(idx, stop=done)
    steps, acc = len(met["loss"]), accs[-1]
    losses = met["loss"]
    ev = {
        "examples": n,
        "steps": steps,
        "max_steps": run.overfit_steps,
        "accuracy": acc,
        "first_loss": float(losses[0]),
        "last_loss": float(losses[-1]),
    }
    msg = (
        f"{acc:.0%} training accuracy on {n} examples after {steps} steps "
        f"(loss {losses[0]:.3g} -> {losses[-1]:.3g})"
    )
    severity = "ok" if acc >= t["overfit_ok"] else "warn" if acc >= t["overfit_fail"] else "fail"
    advice = (
        (
            "a model that cannot overfit a few dozen examples has a bug, too little capacity or a "
            "broken optimization (Sarkar, CS60010): look at the other findings (learning rate, "
            "symmetry, dead units, gradients) before any hyperparameter search"
        )
        if severity != "ok"
        else ""
    )
    return Finding("overfit", severity, msg, advice, ev)


def _divergence_index(losses):
    """First step where the loss is non-finite, or its 3-step mean exceeds both 4x the lowest
    3-step mean so far and the first loss (Smith 2017's stopping rule, made robust to noise)."""
    vals = np.asarray(losses, np.float64)
    finite = np.isfinite(vals)
    filled = np.where(finite, vals, np.inf)
    smooth = np.convolve(
        np.pad(
            np.where(finite, vals, np.nanmax(np.where(finite, vals, np.nan)) if finite.any() else 0.0),
            1,
            mode="edge",
        ),
        np.ones(3) / 3,
        "valid",
    )
    best = np.minimum.accumulate(smooth)
    for k in range(len(vals)):
        if not finite[k] or (smooth[k] > 4 * best[k] and smooth[k] > filled[0]):
            return k
    return None


def _suggest(mult, losses):
    """A tenth of the multiple where the loss, smoothed over a tenth of the run, is lowest (the
    minimum-over-ten rule of the fastai/Smith range test: a rate safely below the point where the
    loss stops improving). The steepest-descent rule of `jaxdl.diagnostics.suggest_lr` picked
    batch noise at tiny rates on these short runs (Adam moves the loss even at 1e-6 x)."""
    vals = np.asarray(losses, np.float64)
    finite = np.isfinite(vals)
    vals = np.where(finite, vals, vals[finite].max() if finite.any() else 0.0)
    w = max(3, (len(vals) // 10) | 1)
    smooth = np.convolve(np.pad(vals, w // 2, mode="edge"), np.ones(w) / w, mode="valid")
    return float(mult[int(np.argmin(smooth))] / 10)


def _falls(losses) -> bool:
    """Whether the smoothed loss ever drops 20% below its start (else the range was too low)."""
    vals = np.asarray(losses, np.float64)
    w = max(3, (len(vals) // 10) | 1)
    smooth = np.convolve(
        np.pad(np.where(np.isfinite(vals), vals, np.inf), w // 2, mode="edge"), np.ones(w) / w, mode="valid"
    )
    return bool(np.nanmin(smooth) < 0.8 * smooth[0])


def _check_learning_rate(run: Run) -> Finding:
    t = THRESHOLDS
    lo, hi = run.range_multipliers
    mult, losses = run.range_test(lo, hi)
    div = _divergence_index(losses)
    extended = False
    if div is None and not _falls(losses):  # nothing happened: go on upwards (same program, no compile)
        extended = True
        lo, hi = hi, hi * (hi / lo)
        mult, losses = run.range_test(lo, hi)
        div = _divergence_index(losses)
    falls = _falls(losses[:div] if div else losses)
    m_sugg = _suggest(mult[:div] if div else mult, losses[:div] if div else losses) if falls else None
    m_div = float(mult[div]) if div is not None else None
    lr = run.learning_rate
    run.curves["lr_range"] = {
        "multipliers": mult,
        "lrs": mult * lr,
        "losses": losses,
        "suggested": None if m_sugg is None else m_sugg * lr,
        "diverged": None if m_div is None else m_div * lr,
        "configured": lr,
    }
    ev = {
        "configured_lr": lr,
        "configured_lr_source": run.lr_source,
        "suggested_lr": None if m_sugg is None else m_sugg * lr,
        "suggested_multiple": m_sugg,
        "diverges_at_lr": None if m_div is None else m_div * lr,
        "diverges_at_multiple": m_div,
        "range_multiples": [lo, hi],
        "extended": extended,
        "steps": run.range_steps,
    }
    where = "estimated from the optimizer's first update" if run.lr_source == "estimated" else "given"
    base = f"range test over {lo:g}..{hi:g} x the configured rate {lr:.3g} ({where}): "
    base += (
        f"suggested {m_sugg * lr:.3g} ({m_sugg:.3g} x, a tenth of the lowest loss's rate)"
        if m_sugg is not None
        else "the loss does not fall anywhere in the range"
    )
    base += (
        f" and diverges at {m_div * lr:.3g} ({m_div:.3g} x)"
        if m_div is not None
        else "; no divergence up to the largest rate tried"
    )
    if m_div is not None and m_div <= 1:
        fix = f"about {m_sugg * lr:.2g}" if m_sugg is not None else f"well below {m_div * lr:.2g}"
        return Finding(
            "learning_rate",
            "fail",
            base + ": the configured rate is past the divergence point",
            f"lower the learning rate to {fix} (Sarkar, CS60010: loss exploding means the rate is too high)",
            ev,
        )
    if m_sugg is None:
        return Finding(
            "learning_rate",
            "warn",
            base + f", even at {hi:g} x the configured rate",
            "the rate is far too low, or nothing can learn (see overfit, symmetry, gradients): "
            "raise the learning rate by orders of magnitude (Sarkar, CS60010: loss not going down means "
            "the rate is too low)",
            ev,
        )
    if m_sugg >= t["lr_suggest_warn"]:
        return Finding(
            "learning_rate",
            "warn",
            base + f": the configured rate is {m_sugg:.0f}x below the suggestion",
            f"raise the learning rate towards {m_sugg * lr:.2g} (Sarkar, CS60010: a loss that "
            "does not go down means the rate is too low)",
            ev,
        )
    return Finding("learning_rate", "ok", base, "", ev)


def _check_update_ratio(run: Run) -> Finding:
    t = THRESHOLDS
    met = run.probe()[1]
    ok_steps = met["nonfinite"] == 0
    half = np.arange(len(ok_steps)) >= len(ok_steps) // 2
    use = ok_steps & half if (ok_steps & half).any() else ok_steps
    ratios = {
        k: float(np.median(v[use])) if use.any() else float("nan") for k, v in met["update_ratio"].items()
    }
    lo, hi = t["update_ratio_low"], t["update_ratio_high"]
    ev = {"median_ratio": ratios, "steps": run.steps, "window": [lo, hi]}
    low = {k: v for k, v in ratios.items() if v < lo}
    high = {k: v for k, v in ratios.items() if not v <= hi and not v < lo}
    fmt = lambda d: ", ".join(f"{k} {v:.1e}" for k, v in d.items())  # noqa: E731
    if high or low:
        parts = ([f"too large in {fmt(high)}"] if high else []) + (
            [f"too small in {fmt(low)}"] if low else []
        )
        advice = (
            "above ~1e-2 the layer is rewritten every step: lower the learning rate"
            if high
            else "below ~1e-4 the layer barely moves: raise the learning rate"
        ) + " (Sarkar, CS60010: want ~1e-3)"
        return Finding(
            "update_ratio",
            "warn",
            f"median ||update||/||weights|| over the last {use.sum()} of "
            f"{run.steps} probe steps is " + "; ".join(parts) + f" (want about 1e-3, [{lo:g}, {hi:g}])",
            advice,
            ev,
        )
    return Finding(
        "update_ratio",
        "ok",
        "median ||update||/||weights|| per layer: "
        + fmt(ratios)
        + f" (want about 1e-3, within [{lo:g}, {hi:g}])",
        "",
        ev,
    )


def _check_activations(run: Run) -> Finding:
    t = THRESHOLDS
    if not run.sequential:
        return Finding(
            "activations",
            "warn",
            "not run: the model has no .layers (not a Sequential), so its "
            "layers' outputs cannot be inspected",
            "inspect the model's layers by hand",
            {},
        )
    ev, fails, warns = {}, [], []
    for when in ("init", "probe"):
        acts = run.inspect(when)["acts"]
        label = "at init" if when == "init" else f"after {run.steps} steps"
        pre = [n for n in acts if layer_kind(n) in ("dense", "conv", "maxout")][:-1]  # hidden pre-activations
        for name, s in acts.items():
            kind = layer_kind(name)
            rec = {"mean": float(s["mean"]), "std": float(s["std"])}
            if s["nonfinite"]:
                fails.append(f"{name} outputs {int(s['nonfinite'])} NaN/Inf values {label}")
            if kind == "relu":
                rec["dead_units"] = dead = float(s["dead_units"])
                if (
                    dead > t["dead_warn"]
                ):  # fail only at init: training that kills units is wasteful, not broken
                    (fails if dead > t["dead_fail"] and when == "init" else warns).append(
                        f"{name}: {dead:.0%} of the units never activate {label} (dead ReLUs)"
                    )
            if kind in ("sigmoid", "tanh"):
                rec["saturated"] = sat = float(s["sat_" + kind])
                if sat > t["saturated_warn"]:
                    (fails if sat > t["saturated_fail"] else warns).append(
                        f"{name}: {sat:.0%} of the outputs saturated {label}"
                    )
            ev.setdefault(when, {})[name] = rec
        if len(pre) >= 2:
            s0, s1 = float(acts[pre[0]]["std"]), float(acts[pre[-1]]["std"])
            if s0 > 0 and math.isfinite(s0) and math.isfinite(s1):
                r = s1 / s0
                ev[when]["scale_ratio"] = r
                if r < 1 / t["scale_ratio"] or r > t["scale_ratio"]:
                    warns.append(
                        f"the std of the pre-activations {'shrinks' if r < 1 else 'grows'} from "
                        f"{s0:.3g} ({pre[0]}) to {s1:.3g} ({pre[-1]}) {label}"
                    )
    advice = (
        "dead ReLUs: a negative bias or too high a learning rate pushed them off (Kira, CS 7643; "
        "CSE 176 Lecture 11: use He init, zero biases, a lower rate or leaky ReLU); saturated "
        "sigmoid/tanh: the weights are too large (Kira, CS 7643: Xavier init; CSE 176 Lecture 11: "
        "prefer ReLU); shrinking/growing scales: use the fan-in-scaled init of the activation "
        "(Xavier/He) or BatchNorm"
    )
    if fails:
        return Finding("activations", "fail", "; ".join(fails + warns), advice, ev)
    if warns:
        return Finding("activations", "warn", "; ".join(warns), advice, ev)
    n = len(ev.get("init", {}))
    worst = []
    for key, what in (("dead_units", "dead ReLU units"), ("saturated", "saturated outputs")):
        vals = [
            (r[key], name, w)
            for w, layers in ev.items()
            for name, r in layers.items()
            if isinstance(r, dict) and key in r
        ]
        if vals:
            v, name, w = max(vals)
            worst.append(
                f"at most {v:.0%} {what} ({name}, {'at init' if w == 'init' else 'after the probe'})"
            )
    return Finding(
        "activations",
        "ok",
        f"{n} layers inspected at init and after the probe run: "
        + "; ".join(worst + ["no shrinking or growing scale across the hidden layers"]),
        "",
        ev,
    )


def _check_gradients(run: Run) -> Finding:
    t = THRESHOLDS
    g = run.inspect("init")["grads"]
    probe = run.probe()[1]
    skipped = int(probe["nonfinite"].sum())
    rms = {k: float(v["rms"]) for k, v in g.items()}
    ev = {
        "rms_at_init": rms,
        "norm_at_init": {k: float(v["norm"]) for k, v in g.items()},
        "nonfinite_at_init": int(sum(int(v["nonfinite"]) for v in g.values())),
        "nonfinite_probe_steps": skipped,
    }
    if ev["nonfinite_at_init"] or skipped:
        return Finding(
            "gradients",
            "fail",
            f"non-finite gradients: {ev['nonfinite_at_init']} NaN/Inf entries at "
            f"init, {skipped} of {run.steps} probe steps with a NaN/Inf loss or gradient",
            "find the first NaN: the inputs, a log/sqrt/division without a guard, or a "
            "divergent learning rate (gradient clipping bounds the step; Sarkar, CS60010)",
            ev,
        )
    names = list(rms)
    if len(names) < 2:
        return Finding("gradients", "ok", f"one layer with parameters, RMS gradient {rms}", "", ev)
    first, last = names[0], names[-1]
    ratio = rms[first] / max(rms[last], 1e-30)
    ev.update(first=first, last=last, first_over_last=ratio)
    zero = [k for k in rms if rms[k] == 0]
    desc = f"RMS gradient at init: {first} {rms[first]:.2e}, {last} {rms[last]:.2e} (first/last {ratio:.2g})"
    if zero:  # a layer that gets no gradient at all cannot learn: the extreme of vanishing
        desc += f"; exactly zero in {', '.join(zero)}"
    sev = "ok"
    if ratio < 1 / t["grad_ratio_warn"] or ratio > t["grad_ratio_warn"]:
        sev = "warn"
    if ratio < 1 / t["grad_ratio_fail"] or ratio > t["grad_ratio_fail"] or zero:
        sev = "fail"
    kind = "vanish towards the input" if ratio < 1 else "explode towards the input"
    advice = (
        (
            f"the gradients {kind} (Tips and Tricks notes; Kira, CS 7643: a product of per-layer "
            "Jacobians): use Xavier/He init, ReLU instead of saturating units, BatchNorm, or gradient "
            "clipping for explosions (Sarkar, CS60010); "
            "a layer with exactly zero gradient is cut off (dead or symmetric units)"
        )
        if sev != "ok"
        else ""
    )
    return Finding("gradients", sev, desc, advice, ev)


def _check_batchnorm(run: Run) -> Finding:
    t = THRESHOLDS
    has_bn = run.sequential and any(isinstance(layer, L.BatchNorm) for layer in run.model.layers)
    if not has_bn:
        return Finding(
            "batchnorm", "ok", "not applicable: the model has no BatchNorm layer", "", {"batchnorm": False}
        )
    s = run.inspect("probe")
    tr, ev_loss = float(s["loss"]), float(s["eval_loss"])
    gap = (ev_loss - tr) / max(abs(tr), 1e-8)
    ev = {"train_mode_loss": tr, "eval_mode_loss": ev_loss, "relative_gap": gap, "after_steps": run.steps}
    msg = (
        f"after {run.steps} steps, on {len(run.inspect_batch()[1])} training examples: eval-mode loss "
        f"{ev_loss:.4g} (running statistics) vs train-mode loss {tr:.4g} (batch statistics), gap {gap:+.0%}"
    )
    sev = "fail" if not gap <= t["batchnorm_fail"] else "warn" if gap > t["batchnorm_warn"] else "ok"
    advice = (
        (
            "the running statistics do not describe the activations the model was trained on "
            "(CSE 176 Lecture 11: at test time BatchNorm uses running averages): check BatchNorm's "
            "momentum (weight of the old value, e.g. 0.9; 1.0 never updates), use larger batches, "
            "or train longer before evaluating"
        )
        if sev != "ok"
        else ""
    )
    return Finding("batchnorm", sev, msg, advice, ev)


RUNNERS: dict[str, Callable[[Run], Finding]] = {
    "data": _check_data,
    "initial_loss": _check_initial_loss,
    "gradient_check": _check_gradients_fd,
    "symmetry": _check_symmetry,
    "overfit": _check_overfit,
    "learning_rate": _check_learning_rate,
    "update_ratio": _check_update_ratio,
    "activations": _check_activations,
    "gradients": _check_gradients,
    "batchnorm": _check_batchnorm,
}
