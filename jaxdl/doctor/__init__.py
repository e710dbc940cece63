"""`examine`: the training recipe (Sarkar, CS60010) as one call that says what is wrong, and why.

Sarkar, CS60010 (with CSE 176 Lecture 11; Kira, CS 7643) teaches what to do with a network that
does not train: check the initial loss, overfit a tiny subset, find the learning rate with a range
test, watch the update/weight ratio (about 1e-3), look at per-layer activation and gradient
histograms, beware constant initialization, saturated sigmoid/tanh units and dead ReLUs,
preprocess the data. `examine` runs all of it on a model, an optimizer and a dataset and returns a
`Report` whose `Finding` s say what was measured (the numbers, the layer names), how bad it is and
what to do.

The checks (ids fixed, so that tools and tests can rely on them; docs/doctor.md gives each one's
source in the notes, its thresholds and why):

========================  ==================================================================
``data``                  non-finite inputs, labels outside the model's classes (fail); inputs
                          far from zero mean / unit scale, a rare class, training examples
                          repeated in the validation set (warn)
``initial_loss``          the loss at initialization against ln C (softmax cross-entropy)
``gradient_check``        autodiff against central finite differences in float64, per layer
``symmetry``              units of a layer that start identical and stay identical
``overfit``               a tiny subset fitted to ~100% training accuracy in a few hundred steps
``learning_rate``         a range test over multiples of the configured optimizer's step
``update_ratio``          per-layer ||update|| / ||weights|| over a short probe run, want ~1e-3
``activations``           dead ReLUs, saturated sigmoid/tanh units, shrinking/growing scales
``gradients``             vanishing / exploding per-layer gradients, non-finite gradients
``batchnorm``             the gap between eval-mode and train-mode loss
========================  ==================================================================

The package: `jaxdl.doctor.report` (the ids, thresholds, `Finding` and `Report`),
`jaxdl.doctor.probe` (the runs every check measures on: the probe and overfit runs train with
the library's step body, `jaxdl.train_step.step_body_with_norm`, through its per-layer metrics
hook; the range test is `jaxdl.diagnostics.lr_range_test`) and `jaxdl.doctor.checks` (one
function per check).
"""

from __future__ import annotations

import inspect
import time

import jax
import numpy as np
import optax

from jaxdl._checks import check_int, check_tree_match
from jaxdl.doctor.checks import RUNNERS
from jaxdl.doctor.probe import Run, RunConfig, estimate_learning_rate
from jaxdl.doctor.report import CHECKS, SEVERITIES, THRESHOLDS, Finding, Report, jsonable
from jaxdl.nnx import as_layer
from jaxdl.train_step import supervised_loss

__all__ = ["examine", "Report", "Finding", "CHECKS", "SEVERITIES", "THRESHOLDS", "estimate_learning_rate"]


def _check_split(name, split):
    if not isinstance(split, (tuple, list)) or len(split) != 2:
        raise TypeError(f"examine: {name} must be a pair (x, y) of arrays, got {type(split).__name__}")
    x, y = np.asarray(split[0]), np.asarray(split[1])
    if x.ndim < 2:
        raise ValueError(f"examine: {name} x has shape {x.shape}; expected (examples, ...features)")
    if y.ndim != 1 or len(y) != len(x):
        raise ValueError(
            f"examine: {name} y has shape {y.shape}; expected ({len(x)},), one label per example"
        )
    if not np.issubdtype(y.dtype, np.integer):
        raise TypeError(f"examine: {name} y has dtype {y.dtype}; expected integer class labels")
    return x, y


def _check_loss(loss_fn, model):
    """``loss_fn``, or ``supervised_loss(model)`` for None; one that cannot take ``train=`` is
    refused."""
    if loss_fn is None:
        return supervised_loss(model)
    if not callable(loss_fn):
        raise TypeError(f"examine: loss_fn must be callable, got {loss_fn!r}")
    try:
        parameters = inspect.signature(loss_fn).parameters
        takes_train = "train" in parameters or any(p.kind is p.VAR_KEYWORD for p in parameters.values())
    except (TypeError, ValueError):
        takes_train = True
    if not takes_train:
        raise TypeError(
            "examine: loss_fn must accept a train= keyword (train and eval mode), "
            "like jaxdl.supervised_loss(model)"
        )
    return loss_fn


def _check_start(model, input_shape, params, model_state):
    """The given starting point, checked against ``model.init``'s trees: ``(params, model_state)``."""
    if params is None:
        if model_state is not None:
            raise ValueError("examine: model_state given without params; pass both or neither")
        return None, None
    model_state = {} if model_state is None else model_state
    _, exp_params, exp_state = jax.eval_shape(lambda: model.init(jax.random.key(0), input_shape))
    hint = "Pass params and model_state as model.init returns them for this input shape."
    check_tree_match("examine", exp_params, params, "params (against the model)", hint)
    check_tree_match("examine", exp_state, model_state, "model_state (against the model)", hint)
    return params, model_state


def _check_multipliers(range_multipliers):
    """``(low, high)`` with 0 < low < 1 < high, as floats."""
    pair = isinstance(range_multipliers, (tuple, list)) and len(range_multipliers) == 2
    lo, hi = range_multipliers if pair else (None, None)
    if lo is None or not (0 < lo < 1 < hi):
        raise ValueError(
            f"examine: range_multipliers={range_multipliers!r}; expected (low, high) with "
            "0 < low < 1 < high (multiples of the configured rate)"
        )
    return float(lo), float(hi)


def _configure(model, optimizer, train, *, validation, loss_fn, sizes: dict, learning_rate, start, checks):
    """`examine`'s arguments checked, each refused by name, as one `RunConfig` (``checks`` is
    only checked: a subset of `CHECKS`)."""
    model = as_layer("examine", model)
    if not isinstance(optimizer, optax.GradientTransformation):
        raise TypeError(f"examine: optimizer must be an optax.GradientTransformation, got {optimizer!r}")
    x, y = _check_split("train", train)
    if validation is not None:
        validation = _check_split("validation", validation)
        if validation[0].shape[1:] != x.shape[1:]:
            raise ValueError(
                f"examine: validation x has examples of shape {validation[0].shape[1:]}, "
                f"train x {x.shape[1:]}; expected the same"
            )
    lows = {"batch_size": 1, "steps": 2, "overfit_size": 1, "overfit_steps": 1, "range_steps": 3}
    sizes = dict(sizes)
    for name, low in {**lows, "inspect_size": 2, "seed": 0}.items():
        sizes[name] = check_int("examine", name, sizes[name], low=low)
        if name == "batch_size" and sizes[name] > len(y):
            raise ValueError(f"examine: batch_size={sizes[name]} exceeds the {len(y)} training examples")
    multipliers = _check_multipliers(sizes.pop("range_multipliers"))
    if learning_rate is not None and not (isinstance(learning_rate, (int, float)) and learning_rate > 0):
        raise ValueError(f"examine: learning_rate={learning_rate!r}; expected a number > 0 or None")
    unknown = [c for c in checks if c not in CHECKS]
    if unknown:
        raise ValueError(f"examine: checks={unknown!r} unknown; expected a subset of {CHECKS}")
    loss_fn = _check_loss(loss_fn, model)
    params, model_state = _check_start(model, x.shape[1:], *start)
    return RunConfig(
        model=model,
        optimizer=optimizer,
        loss_fn=loss_fn,
        train=(x, y),
        validation=validation,
        range_multipliers=multipliers,
        learning_rate=learning_rate,
        params=params,
        model_state=model_state,
        **sizes,
    )


def _run_checks(run: Run, checks: tuple):
    """Every check of ``checks`` on ``run`` (the data check always: the others use only the
    usable examples): ``(findings in CHECKS order, wall seconds, CPU seconds)`` per check."""
    t1, c1 = time.perf_counter(), time.process_time()
    data_finding = RUNNERS["data"](run)
    findings = [data_finding] if "data" in checks else []
    timings, cpu = {"data": time.perf_counter() - t1}, {"data": time.process_time() - c1}
    usable = len(run.usable)
    for check in checks:
        if check == "data":
            continue
        t1, c1 = time.perf_counter(), time.process_time()
        if usable < 2:
            findings.append(
                Finding(
                    check,
                    "warn",
                    f"not run: only {usable} training examples are finite with labels in range",
                    "repair the data first",
                    {},
                )
            )
            continue
        findings.append(RUNNERS[check](run))
        timings[check], cpu[check] = time.perf_counter() - t1, time.process_time() - c1
    order = {c: i for i, c in enumerate(CHECKS)}
    findings.sort(key=lambda f: order[f.check])
    return findings, timings, cpu


def _info(run: Run) -> dict:
    """The report's sizes and settings (the timings are added by `examine`)."""
    return {
        "layers": len(run.model.layers) if run.sequential else None,
        "parameters": sum(int(np.size(v)) for v in jax.tree.leaves(run.params0)),
        "num_classes": run.num_classes,
        "input_shape": list(run.input_shape),
        "train_examples": len(run.y),
        "validation_examples": 0 if run.validation is None else len(run.validation[1]),
        "usable_train_examples": len(run.usable),
        "batch_size": run.batch_size,
        "probe_steps": run.steps,
        "seed": run.seed,
        "learning_rate": run.learning_rate,
        "learning_rate_source": run.lr_source,
    }


def _figure_data(run: Run):
    """The report's curves (range test, probe run) and histograms (init, after the probe)."""
    curves, hists = dict(run.curves), {}
    if run.probed is not None:
        met = run.probed[1]
        curves["probe"] = {"loss": met["loss"], "update_ratio": met["update_ratio"]}
    for when in ("init", "probe"):
        if when in run.inspected:
            s = run.inspected[when]
            hists[when] = {
                "activations": {k: (v["hist_counts"], v["hist_edges"]) for k, v in s["acts"].items()},
                "gradients": {k: (v["hist_counts"], v["hist_edges"]) for k, v in s["grads"].items()},
            }
    return curves, hists


def examine(
    model,
    optimizer: optax.GradientTransformation,
    train,
    *,
    validation=None,
    loss_fn=None,
    batch_size: int = 64,
    seed: int = 0,
    steps: int = 40,
    learning_rate: float | None = None,
    overfit_size: int = 32,
    overfit_steps: int = 200,
    range_steps: int = 60,
    range_multipliers: tuple = (1e-3, 1e3),
    inspect_size: int = 256,
    checks=CHECKS,
    params=None,
    model_state=None,
) -> Report:
    """Run the training recipe (Sarkar, CS60010) on ``model``, ``optimizer`` and ``train = (x, y)``.

    Returns a `Report` with one `Finding` per check in ``checks`` (default: all of `CHECKS`):

    - ``data`` (CSE 176 Lecture 11): NaN/Inf inputs or labels outside the model's C classes fail;
      inputs with |mean| > 1 or std outside [0.1, 10], a class with < 0.2 x the median count, or
      >= 1% of the validation set repeated from train warn. Later checks use only the finite,
      in-range examples.
    - ``initial_loss`` (Sarkar, CS60010): loss at init vs ``ln C``; warn when the ratio is off by
      more than 25%, fail when it leaves [0.5, 3].
    - ``gradient_check`` (Tips and Tricks notes; Kira, CS 7643): autodiff vs central differences
      ``(L(t + e) - L(t - e)) / 2e`` in float64 (e = 1e-6) on 3 random and the 3 largest entries
      of every parameter array, 16 examples; per entry ``|g_ad - g_fd| / (|g_ad| + |g_fd|)``;
      fail when most entries of an array exceed 1e-4 (naming it).
    - ``symmetry`` (Kira, CS 7643; Tips and Tricks notes): >= 10% of a layer's units identical
      (relative distance <= 1e-3) at init and still after the probe run fails.
    - ``overfit`` (Sarkar, CS60010): ``overfit_size`` examples, up to ``overfit_steps`` steps of
      the configured optimizer; eval-mode training accuracy >= 99% ok, < 90% fail.
    - ``learning_rate`` (Sarkar, CS60010; Smith 2017): ``range_steps`` steps with the optimizer's
      update multiplied by ``m_k`` growing geometrically over ``range_multipliers``; fail when the
      loss diverges at ``m <= 1``, warn when the suggestion (a tenth of the rate at the smoothed
      loss's minimum) is >= 100 x or the loss falls nowhere (the range is then extended once).
    - ``update_ratio`` (Sarkar, CS60010): median per-layer ``||u|| / ||theta||`` over the second
      half of a ``steps``-step probe run; warn outside [1e-4, 1e-2].
    - ``activations`` (CSE 176 Lecture 11; Kira, CS 7643; Sarkar, CS60010): at init and after the
      probe, dead ReLU units (never positive on ``inspect_size`` examples; warn > 25%, fail > 50%
      at init), saturated sigmoid/tanh outputs (warn > 10%, fail > 50%), pre-activation std of the
      last hidden layer vs the first beyond 100x (warn).
    - ``gradients`` (Tips and Tricks notes; Sarkar, CS60010): NaN/Inf gradients fail; RMS gradient
      of the first layer vs the last beyond 1e2 warns, beyond 1e4 (or a layer with exactly zero
      gradient) fails.
    - ``batchnorm`` (CSE 176 Lecture 11): after the probe, ``(L_eval - L_train) / L_train``
      above 0.5 warns, above 2 fails.

    ``loss_fn(params, model_state, (x, y), key, train=...) -> (loss, (model_state, aux))``
    defaults to ``supervised_loss(model)`` (a wrapper with ``.model``, e.g. the CLI's
    augmentation, works too). ``learning_rate`` only labels the rates (else
    `estimate_learning_rate`). ``checks`` runs a subset. ``params``/``model_state`` start from
    given parameters instead of ``model.init`` (a pretrained model, a custom initialization).
    Thresholds: `THRESHOLDS`; each one's source and reason: docs/doctor.md. Every run starts from
    the same initialization (``seed``) with a fresh optimizer state.

    Args:
      model, optimizer: what `jaxdl.fit` would train.
      train, validation: ``(x, y)`` arrays (``validation`` optional).
      loss_fn, learning_rate, checks, params, model_state: above.
      batch_size, seed, steps, overfit_size, overfit_steps, range_steps, range_multipliers,
        inspect_size: the sizes of the probe runs (above).

    Returns:
      A `Report`: ``report.ok``, ``report[check]`` (a `Finding`), ``report.summary()``,
      ``report.write(folder)``.

    Source: Sarkar, CS60010 (Training); CSE 176 Lecture 11; Kira, CS 7643; Tips and Tricks
    notes; Smith 2017 (the range test).

    The whole recipe on a real model::

        report = jaxdl.doctor.examine(jaxdl.models.mlp(10), jaxdl.adam(1e-3), (x, y))
        print(report.summary()); report.write("runs/doctor")

    Two cheap checks on a toy problem:

    >>> import numpy as np
    >>> import jaxdl as dl
    >>> x = np.random.default_rng(0).normal(size=(64, 3)).astype(np.float32)
    >>> y = (x[:, 0] > 0).astype(np.int32)
    >>> model = dl.layers.Dense(2, w_init=dl.init.normal(0.01))  # small weights: loss ~ ln 2
    >>> report = examine(model, dl.sgd(0.1), (x, y), batch_size=16, checks=("data", "initial_loss"))
    >>> [(f.check, f.severity) for f in report.findings]
    [('data', 'ok'), ('initial_loss', 'ok')]
    """
    t0, c0 = time.perf_counter(), time.process_time()
    checks = tuple(checks)
    sizes = {
        "batch_size": batch_size,
        "steps": steps,
        "overfit_size": overfit_size,
        "overfit_steps": overfit_steps,
        "range_steps": range_steps,
        "inspect_size": inspect_size,
        "seed": seed,
        "range_multipliers": range_multipliers,
    }
    config = _configure(
        model,
        optimizer,
        train,
        validation=validation,
        loss_fn=loss_fn,
        sizes=sizes,
        learning_rate=learning_rate,
        start=(params, model_state),
        checks=checks,
    )
    run = Run(config)
    setup = (time.perf_counter() - t0, time.process_time() - c0)
    findings, timings, cpu = _run_checks(run, checks)
    info = {
        **_info(run),
        "check_seconds": {"setup": setup[0], **timings},
        "check_cpu_seconds": {"setup": setup[1], **cpu},
        "wall_time_s": time.perf_counter() - t0,
        "cpu_time_s": time.process_time() - c0,
    }
    curves, hists = _figure_data(run)
    return Report(findings, jsonable(info), curves, hists)
