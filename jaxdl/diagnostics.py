"""Training-health checks (Sarkar, CS60010, Training), as functions.

- Sanity-check the initial loss: about ln C for C classes (`initial_loss_check`).
- Make sure the model can overfit a very small part of the training data (`overfit_check`).
- Find a learning rate that makes the loss go down (`lr_range_test`, Smith 2017).
- Track the ratio of update to weight magnitudes, want about 1e-3 (`update_ratios`).
- Look at activation and gradient statistics and histograms per layer (`activation_stats`,
  `layer_report`).

The per-layer functions are pure and jit-compatible; `layer_report` computes everything for one
batch inside one compiled call, without touching the state or the step's results.
"""

from __future__ import annotations

import math
from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from jaxdl.train_step import TrainState, check_batch, make_train_loop, step_body_with_norm, step_key

__all__ = [
    "leaf_norms",
    "update_ratios",
    "activation_stats",
    "layer_report",
    "initial_loss_check",
    "InitialLossReport",
    "overfit_check",
    "OverfitReport",
    "lr_range_test",
    "LRRangeResult",
    "suggest_lr",
]

_TINY = float(jnp.finfo(jnp.float32).tiny)


def leaf_norms(tree) -> Any:
    """The L2 norm of every leaf, keyed like ``tree`` (e.g. per-layer gradient norms).

    Args:
      tree: a pytree of arrays.

    Returns:
      A pytree of scalar norms, the structure of ``tree``.

    >>> import jax.numpy as jnp
    >>> float(leaf_norms({"w": jnp.array([3.0, 4.0])})["w"])
    5.0
    """
    return jax.tree.map(lambda x: jnp.linalg.norm(jnp.ravel(x).astype(jnp.float32)), tree)


def update_ratios(params, updates) -> Any:
    """``||u|| / ||theta||`` per leaf, keyed like the params (want about 1e-3).

    Much below 1e-3 the layer learns slowly (learning rate too low); much above, it is being
    rewritten every step (too high).

    Args:
      params: the parameters ``theta``.
      updates: the optimizer's updates ``u``, the same structure.

    Returns:
      A pytree of scalar ratios, the structure of ``params``.

    Source: Sarkar, CS60010 (track the ratio of weight updates / weight magnitudes).

    >>> import jax.numpy as jnp
    >>> r = update_ratios({"w": jnp.array([3.0, 4.0])}, {"w": jnp.array([0.003, 0.004])})
    >>> round(float(r["w"]), 6)
    0.001
    """
    return jax.tree.map(
        lambda p, u: (
            jnp.linalg.norm(jnp.ravel(u).astype(jnp.float32))
            / jnp.maximum(jnp.linalg.norm(jnp.ravel(p).astype(jnp.float32)), _TINY)
        ),
        params,
        updates,
    )


def _saturation(kind: str, y: jax.Array) -> jax.Array:
    if kind == "tanh":
        return jnp.mean(jnp.abs(y) > 0.99)
    if kind == "sigmoid":
        return jnp.mean((y < 0.01) | (y > 0.99))
    return jnp.array(jnp.nan, jnp.float32)


def activation_stats(model, params, model_state, x, *, train: bool = False, key=None, bins: int = 30) -> dict:
    """Statistics of every layer's output of a `Sequential` model on the batch ``x``.

    Per layer (keyed ``f"{kind}_{index}"`` like `Sequential`): ``mean``, ``std``,
    ``frac_zero`` (fraction of exact zeros: dead ReLUs), ``frac_saturated`` (|y| > 0.99 for
    tanh; y < 0.01 or y > 0.99 for sigmoid; NaN for other layers) and a histogram
    (``hist_counts``, ``hist_edges`` over the layer's own range). Plot these for all layers:
    with a bad scale they collapse to 0 or saturate.
    The outputs are those of `jaxdl.layers.Sequential.intermediates`.

    Args:
      model: a `jaxdl.layers.Sequential`.
      params, model_state: its parameters and state.
      x: a batch of inputs.
      train, key: the mode (and key, for dropout in training).
      bins: histogram bins.

    Returns:
      A dict ``layer name -> {statistic: value}``.

    Source: Sarkar, CS60010 (activation distributions per layer); Kira, CS 7643; Glorot &
    Bengio 2010.
    """
    walk = getattr(model, "intermediates", None)
    if walk is None:
        raise TypeError(f"activation_stats: model must be a Sequential (with .layers), got {model!r}")
    out = {}
    for name, h in walk(params, model_state, x, train=train, key=key).items():
        hf = h.astype(jnp.float32)
        counts, edges = jnp.histogram(hf, bins=bins)
        out[name] = {
            "mean": jnp.mean(hf),
            "std": jnp.std(hf),
            "frac_zero": jnp.mean(hf == 0),
            "frac_saturated": _saturation(name.rsplit("_", 1)[0], hf),
            "hist_counts": counts,
            "hist_edges": edges,
        }
    return out


def layer_report(
    loss_fn, optimizer: optax.GradientTransformation, state: TrainState, batch, *, bins: int = 30
) -> dict:
    """Gradient norms, update/weight ratios and activation statistics for one batch, per layer.

    Computes what the next train step would do (same key) without applying it; returns
    ``{"grad_norms", "update_ratios", "activations"}``, the first two keyed like the params.
    ``activations`` needs ``loss_fn`` from `supervised_loss` of a `Sequential` (else it is {}).
    Jit it for repeated use: ``jax.jit(functools.partial(layer_report, loss_fn, tx))``.

    Args:
      loss_fn: the train step's loss.
      optimizer: the optimizer.
      state: a `jaxdl.TrainState`.
      batch: one batch ``(x, y)``.
      bins: histogram bins of the activations.

    Returns:
      ``{"grad_norms", "update_ratios", "activations"}``.

    Source: Sarkar, CS60010.
    """
    key = step_key(state)
    grads, _ = jax.grad(lambda p: loss_fn(p, state.model_state, batch, key, train=True), has_aux=True)(
        state.params
    )
    updates, _ = optimizer.update(grads, state.opt_state, state.params)
    report = {"grad_norms": leaf_norms(grads), "update_ratios": update_ratios(state.params, updates)}
    model = getattr(loss_fn, "model", None)
    report["activations"] = (
        activation_stats(model, state.params, state.model_state, batch[0], train=True, key=key, bins=bins)
        if hasattr(model, "intermediates")
        else {}
    )
    return report


class InitialLossReport(NamedTuple):
    loss: float
    expected: float  # ln C
    ok: bool
    message: str


def initial_loss_check(loss: float, num_classes: int, rtol: float = 0.25) -> InitialLossReport:
    """Compare the first loss of a softmax classifier with chance level, ``ln C``.

    With small random weights every class gets probability about 1/C, so the cross-entropy is
    about ln C. Much higher means over-confident wrong outputs (weights too large, inputs not
    normalized); much lower means the model knows the labels before training (a leak, or a
    loss that is not the mean cross-entropy).

    Args:
      loss: the loss at initialization.
      num_classes: C.
      rtol: the relative distance from ``ln C`` that still passes.

    Returns:
      An `InitialLossReport` ``(loss, expected, ok, message)``.

    Source: Sarkar, CS60010 (check that the loss is reasonable).

    >>> initial_loss_check(2.31, num_classes=10).ok  # ln 10 = 2.30
    True
    """
    if not isinstance(num_classes, int) or num_classes < 2:
        raise ValueError(f"initial_loss_check: num_classes={num_classes!r}; expected an int >= 2")
    loss = float(loss)
    expected = math.log(num_classes)
    ratio = loss / expected
    if not math.isfinite(loss):
        ok, why = False, "the loss is not finite: check the inputs and the initialization"
    elif ratio > 1 + rtol:
        ok, why = (
            False,
            (
                "too high: the initial outputs are confidently wrong; scale the initial "
                "weights down (e.g. Xavier/He instead of N(0, 1)) or normalize the inputs"
            ),
        )
    elif ratio < 1 - rtol:
        ok, why = (
            False,
            (
                "too low for an untrained model: check for labels leaking into the inputs, "
                "or a loss that is not the mean cross-entropy"
            ),
        )
    else:
        ok, why = True, "as expected for an untrained classifier"
    msg = f"initial loss {loss:.4f} vs ln({num_classes}) = {expected:.4f} (ratio {ratio:.2f}): {why}"
    return InitialLossReport(loss, expected, ok, msg)


class OverfitReport(NamedTuple):
    losses: np.ndarray
    final_loss: float
    passed: bool
    message: str
    state: TrainState


def overfit_check(
    loss_fn, optimizer, state: TrainState, batch, steps: int = 200, threshold: float = 0.05
) -> OverfitReport:
    """Train on one small batch for ``steps`` steps and report whether the loss gets near zero.

    A model that cannot overfit ~20 examples has a bug (or far too little capacity),
    and no hyperparameter search will fix it. Runs as one scan-fused call.

    Args:
      loss_fn: the train step's loss.
      optimizer: the optimizer.
      state: a `jaxdl.TrainState`.
      batch: the small batch ``(x, y)``.
      steps: the steps to train.
      threshold: the final loss that counts as overfitted.

    Returns:
      An `OverfitReport`.

    Source: Sarkar, CS60010 (overfit a small portion of the training data).
    """
    if steps < 1:
        raise ValueError(f"overfit_check: steps={steps!r}; expected an int >= 1")
    loop = make_train_loop(loss_fn, optimizer)
    stacked = jax.tree.map(lambda b: jnp.broadcast_to(b, (steps, *b.shape)), batch)
    state, metrics = loop(state, stacked)
    losses = np.asarray(metrics["loss"])
    final = float(losses[-1])
    passed = bool(final < threshold)
    verdict = (
        "the model can overfit the subset"
        if passed
        else ("it cannot: check the model, the loss and the labels, or raise the learning rate")
    )
    msg = f"loss {losses[0]:.4f} -> {final:.4f} after {steps} steps on {len(jax.tree.leaves(batch)[0])} examples: {verdict}"
    return OverfitReport(losses, final, passed, msg, state)


def suggest_lr(lrs, losses) -> float:
    """The rate where the 3-step smoothed loss falls fastest *before* its minimum.

    A NaN/Inf loss counts as the largest loss seen (divergence never looks like progress), and
    the smoothing pads each end with its own value (zero padding would fake a drop at the end).

    Args:
      lrs: the rates of a range test, increasing.
      losses: the loss at each rate.

    Returns:
      The suggested rate (a float).

    Source: Smith 2017.
    """
    lrs, losses = np.asarray(lrs), np.asarray(losses, np.float64)
    finite = np.isfinite(losses)
    vals = np.where(finite, losses, losses[finite].max() if finite.any() else 0.0)
    smooth = np.convolve(np.pad(vals, 1, mode="edge"), np.ones(3) / 3, mode="valid")
    lowest = int(np.argmin(smooth))
    best = 1 + int(np.argmin(np.gradient(smooth)[1:lowest])) if lowest >= 2 else lowest
    return float(lrs[best])


class LRRangeResult(NamedTuple):
    lrs: np.ndarray
    losses: np.ndarray
    suggested_lr: float


def lr_range_test(
    loss_fn,
    make_optimizer: Callable[[Callable], optax.GradientTransformation],
    state: TrainState,
    batches,
    min_lr: float = 1e-6,
    max_lr: float = 1.0,
    *,
    skip_nonfinite: bool = False,
) -> LRRangeResult:
    """Learning-rate range test (Smith 2017, "Cyclical learning rates for training neural
    networks", sec. 3.3): one short run with the rate growing exponentially.

    Step k of K uses

    .. math:: \\eta_k = \\eta_{min} (\\eta_{max} / \\eta_{min})^{k / (K - 1)}

    on batch k of ``batches`` (K batches stacked on a leading axis), with the library's train
    step (`jaxdl.train_step.step_body_with_norm`). Sarkar, CS60010: too low, the loss does not go down;
    too high, it explodes.

    Args:
      loss_fn: the train step's loss, e.g. ``supervised_loss(model)``.
      make_optimizer: takes a schedule and returns the optimizer, e.g.
        ``lambda lr: dl.sgd(lr, momentum=0.9)``; step k's optimizer gets the constant schedule
        ``eta_k``, so the rate is that of the step's position even when a step is skipped. Its
        state starts fresh from ``state.params``.
      state: the `TrainState` to start from (its key draws the steps' keys).
      batches: K >= 2 batches stacked on a leading axis.
      min_lr, max_lr: the range, 0 < min_lr < max_lr.
      skip_nonfinite: skip a step whose loss, gradient or update is NaN/Inf (the train step's
        rule); off by default, so that a divergence shows in every later loss.

    Returns:
      `LRRangeResult`: the rates, the losses (float64) and `suggest_lr`'s suggestion. The
      compiled run is reused for the same ``loss_fn``, ``make_optimizer`` and shapes, whatever
      the range.
    """
    if not (0 < min_lr < max_lr):
        raise ValueError(f"lr_range_test: need 0 < min_lr < max_lr, got min_lr={min_lr!r}, max_lr={max_lr!r}")
    k = jax.tree.leaves(batches)[0].shape[0]
    if k < 2:
        raise ValueError(f"lr_range_test: batches must stack at least 2 batches, got {k}")
    lrs = min_lr * (max_lr / min_lr) ** (np.arange(k) / (k - 1))
    run = _cached_program(_range_program, loss_fn, make_optimizer, bool(skip_nonfinite))
    losses = np.asarray(run(state, batches, jnp.asarray(lrs, jnp.float32)), np.float64)
    return LRRangeResult(lrs, losses, suggest_lr(lrs, losses))


_PROGRAMS: dict = {}


def _cached_program(make: Callable, *key):
    """``make(*key)``, kept for the 16 latest hashable keys (an unhashable one is built anew)."""
    try:
        hash(key)
    except TypeError:
        return make(*key)
    k = (make, *key)
    if k not in _PROGRAMS:
        if len(_PROGRAMS) >= 16:
            _PROGRAMS.pop(next(iter(_PROGRAMS)))
        _PROGRAMS[k] = make(*key)
    return _PROGRAMS[k]


def _range_program(loss_fn, make_optimizer, skip_nonfinite):
    """Jitted ``run(state, batches, lrs) -> losses``: the range test's scan, the rates as data."""

    def run(state, batches, lrs):
        state = state.replace(opt_state=make_optimizer(lambda count: lrs[0]).init(state.params))
        check_batch(state, jax.tree.map(lambda b: b[0], batches))

        def body(state, xs):
            batch, lr = xs
            tx = make_optimizer(lambda count: lr)
            state, metrics, _ = step_body_with_norm(
                loss_fn, tx, skip_nonfinite, state, batch, step_key(state), None
            )
            return state, metrics["loss"]

        return jax.lax.scan(body, state, (batches, lrs))[1]

    return jax.jit(run)
