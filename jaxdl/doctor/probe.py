"""The doctor's probe run: one model, optimizer and dataset, trained with the library's step.

`Run` holds what every check measures on: the initialization (``seed``), the first optimizer
state, the training data, and, computed once when a check first asks, the probe run (``steps``
steps of the configured optimizer, `make_probe_scan`), the inspection of one batch at
initialization and after the probe (`make_inspect`) and the learning-rate range test
(`jaxdl.diagnostics.lr_range_test`). Compiled programs are kept per model, loss and optimizer
object (`cached`), so a second look at the same setup compiles nothing.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
import optax

from jaxdl._tree import select as select_tree
from jaxdl.diagnostics import lr_range_test
from jaxdl.doctor.report import layer_index
from jaxdl.train_step import TrainState, accepts_train, step_body_with_norm, step_key

__all__ = [
    "Run",
    "RunConfig",
    "cached",
    "estimate_learning_rate",
    "layer_groups",
    "layer_metrics",
    "make_inspect",
    "make_probe_scan",
    "path_name",
    "to_numpy",
]

_PROGRAMS: dict = {}  # compiled programs, keyed by the (hashable) objects they close over


def cached(kind: str, make: Callable, *key):
    """``make(*key)``, reused across `examine` calls with the same model / loss / optimizer, so
    that a second look at the same setup (new data, a new seed) compiles nothing. Unhashable
    keys are not cached; the cache holds the 32 latest programs."""
    try:
        k = (kind, *key)
        hash(k)
    except TypeError:
        return make(*key)
    if k not in _PROGRAMS:
        if len(_PROGRAMS) >= 32:
            _PROGRAMS.pop(next(iter(_PROGRAMS)))
        _PROGRAMS[k] = make(*key)
    return _PROGRAMS[k]


def _make_init(model, input_shape):
    """Jitted ``init(key) -> (params, model_state)`` (one compile instead of one per eager op)
    and the model's output shape."""
    box = {}

    @jax.jit
    def init(key):
        box["out_shape"], params, model_state = model.init(key, input_shape)
        return params, model_state

    jax.eval_shape(init, jax.random.key(0))
    return init, tuple(box["out_shape"])


def _make_opt_setup(optimizer):
    """Jitted ``setup(params) -> (opt_state, lr_hat)``: the first optimizer state and
    `estimate_learning_rate`."""
    return jax.jit(lambda params: (optimizer.init(params), _unit_step(optimizer, params)))


def _unit_step(optimizer, params):
    zeros = jax.tree.map(jnp.zeros_like, params)
    ones = jax.tree.map(jnp.ones_like, params)
    updates, _ = optimizer.update(ones, optimizer.init(zeros), zeros)
    return jnp.mean(
        jnp.concatenate([jnp.abs(jnp.ravel(u)).astype(jnp.float32) for u in jax.tree.leaves(updates)])
    )


def estimate_learning_rate(optimizer: optax.GradientTransformation, params) -> float:
    """The step size of ``optimizer``'s first update for a gradient of ones at zero parameters:
    ``lr_hat = mean(|u|)`` with ``u = update(1, init(0), 0)``.

    Exact at step 0 for `jaxdl.optimizers` ``sgd`` (with or without momentum), ``adam``,
    ``adamw``, ``adagrad``, ``signsgd`` and their optax counterparts, schedules included (their
    value at step 0); ``rmsprop`` gives ``lr / sqrt(1 - decay)``, Nesterov ``(1 + decay) lr``, a
    global-norm clip or gradient noise distort it. An optax optimizer does not expose its rate,
    so this probe is the best general answer; pass ``learning_rate=`` to `examine` to override.
    It only labels the figures: the range test's verdict is in multiples of the optimizer's own
    step and does not depend on it.

    Args:
      optimizer: an optax ``GradientTransformation``.
      params: a parameter tree (only its shapes and dtypes count).

    Returns:
      ``lr_hat``, a float.

    >>> import jax.numpy as jnp
    >>> import jaxdl as dl
    >>> round(estimate_learning_rate(dl.adam(3e-4), {"w": jnp.zeros(3)}), 6)
    0.0003
    """
    return float(jax.jit(_unit_step, static_argnums=0)(optimizer, params))


def path_name(path) -> str:
    """``dense_1.w`` for the tree path ``['dense_1']['w']``."""
    return (
        ".".join(str(getattr(k, "key", getattr(k, "idx", getattr(k, "name", k)))) for k in path) or "params"
    )


def layer_groups(tree) -> dict[str, list]:
    """Leaves grouped by their top-level key (the layer, ``dense_0``), in layer order."""
    groups: dict[str, list] = {}
    for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]:
        key = path[0] if path else None
        name = str(getattr(key, "key", getattr(key, "idx", "params"))) if key is not None else "params"
        groups.setdefault(name, []).append(leaf)
    return {k: groups[k] for k in sorted(groups, key=layer_index)}


def _layer_norms(tree) -> dict:
    return {
        k: jnp.sqrt(sum(jnp.sum(jnp.square(x.astype(jnp.float32))) for x in v))
        for k, v in layer_groups(tree).items()
    }


def layer_metrics(params, grads, updates) -> dict:
    """The train step's per-layer hook (`jaxdl.train_step.step_body_with_norm`'s
    ``layer_metrics``): per layer (top-level key, ``dense_0``),

    .. math:: r_l = \\frac{\\lVert u_l \\rVert}{\\lVert \\theta_l \\rVert}, \\qquad
              \\lVert g_l \\rVert

    the update/weight ratio over the layer's arrays (Sarkar, CS60010 Deep Learning (IIT
    Kharagpur), 2018, lecture "Training": want about 1e-3) and its gradient norm.

    Args:
      params: the parameters before the step.
      grads: the step's gradients.
      updates: the step's updates.

    Returns:
      ``{"layer_update_ratio": {layer: r_l}, "layer_grad_norm": {layer: |g_l|}}``.
    """
    pn, un, gn = _layer_norms(params), _layer_norms(updates), _layer_norms(grads)
    return {
        "layer_update_ratio": {k: un[k] / jnp.maximum(pn[k], 1e-30) for k in pn},
        "layer_grad_norm": gn,
    }


def _times(optimizer, multiple):
    """``optimizer`` with its update multiplied by ``multiple`` (same state)."""

    def update(grads, state, params=None):
        updates, state = optimizer.update(grads, state, params)
        return jax.tree.map(lambda u: (u * multiple).astype(u.dtype), updates), state

    return optax.GradientTransformation(optimizer.init, update)


def make_probe_scan(loss_fn, optimizer):
    """A scan of the library's train step with the `layer_metrics` hook, jitted.

    Step k is `jaxdl.train_step.step_body_with_norm` (NaN/Inf steps skipped) on batch
    ``(x[k], y[k])`` with the optimizer's update multiplied by ``multiple[k]``,

    .. math:: \\theta_{k+1} = \\theta_k + m_k\\, u_k

    and a step with ``active[k]`` false (padding of a run's last chunk) changes nothing, its
    step counter included, so runs of any length share one program.

    Args:
      loss_fn: the train step's loss (it takes ``train=``).
      optimizer: the configured optimizer.

    Returns:
      ``run(state, xs) -> (state, metrics)`` for a `jaxdl.TrainState` and ``xs = (x, y,
      multiple, active)`` stacked per step; ``metrics`` per step: ``loss``, ``accuracy`` (NaN
      when the loss reports none), ``nonfinite``, and per layer ``update_ratio`` and
      ``grad_norm`` (`layer_metrics`).
    """

    def body(state, xs):
        x, y, multiple, active = xs
        new, met, _ = step_body_with_norm(
            loss_fn,
            _times(optimizer, multiple),
            True,
            state,
            (x, y),
            step_key(state),
            None,
            layer_metrics=layer_metrics,
        )
        metrics = {
            "loss": met["loss"],
            "accuracy": met.get("accuracy", jnp.nan),
            "update_ratio": met["layer_update_ratio"],
            "grad_norm": met["layer_grad_norm"],
            "nonfinite": met["nonfinite"] * active.astype(jnp.int32),
        }
        return select_tree(active, new, state), metrics

    return jax.jit(lambda state, xs: jax.lax.scan(body, state, xs))


def _hist(v, bins=30):
    v = np.ravel(v).astype(np.float64)
    v = v[np.isfinite(v)]
    return np.histogram(v if v.size else np.zeros(1), bins=bins)


def make_inspect(model, loss_fn, sequential: bool):
    """``inspect(params, model_state, x, y, key)``: per-layer activation statistics, per-layer
    gradients (norms, RMS, histograms), train- and eval-mode losses on one batch. The compiled
    part returns raw outputs and gradients; the statistics are numpy (cheaper than compiling
    a histogram per layer)."""

    @jax.jit
    def raw(params, model_state, x, y, key):
        (loss, _), grads = jax.value_and_grad(
            lambda p: loss_fn(p, model_state, (x, y), key, train=True), has_aux=True
        )(params)
        eval_loss = loss_fn(params, model_state, (x, y), None, train=False)[0]
        acts = model.intermediates(params, model_state, x, train=True, key=key) if sequential else {}
        return loss, eval_loss, grads, acts

    def inspect_fn(params, model_state, x, y, key):
        loss, eval_loss, grads, acts = to_numpy(raw(params, model_state, x, y, key))
        res = {"loss": float(loss), "eval_loss": float(eval_loss), "grads": {}, "acts": {}}
        for name, leaves in layer_groups(grads).items():
            flat = np.concatenate([np.ravel(g).astype(np.float64) for g in leaves])
            counts, edges = _hist(flat)
            res["grads"][name] = {
                "norm": float(np.linalg.norm(flat)),
                "rms": float(np.sqrt(np.mean(flat**2))),
                "nonfinite": int(np.sum(~np.isfinite(flat))),
                "size": flat.size,
                "hist_counts": counts,
                "hist_edges": edges,
            }
        for name, h in acts.items():
            hf = np.asarray(h, np.float32)
            axes = tuple(range(hf.ndim - 1))
            counts, edges = _hist(hf)
            res["acts"][name] = {
                "mean": float(hf.mean(dtype=np.float64)),
                "std": float(hf.std(dtype=np.float64)),
                "dead_units": float(1.0 - np.mean(np.any(hf > 0, axis=axes))),
                "sat_sigmoid": float(np.mean((hf < 0.01) | (hf > 0.99))),
                "sat_tanh": float(np.mean(np.abs(hf) > 0.99)),
                "nonfinite": int(np.sum(~np.isfinite(hf))),
                "hist_counts": counts,
                "hist_edges": edges,
            }
        return res

    return inspect_fn


def to_numpy(tree):
    """Every leaf of ``tree`` as a numpy array (one transfer per leaf)."""
    return jax.tree.map(np.asarray, tree)


@dataclasses.dataclass(frozen=True)
class _TrainKeyword:
    """A loss that takes ``train=`` only through ``**kwargs``, with ``train`` named (the train
    step passes ``train=True`` to a loss whose signature shows it)."""

    inner: Any

    def __call__(self, params, model_state, batch, key=None, train=True):
        return self.inner(params, model_state, batch, key, train=train)


@dataclasses.dataclass(frozen=True)
class _Multiplied:
    """The range test's ``make_optimizer`` for a configured optimizer: its update times the
    schedule's value (a multiple of its own rate, whatever the optimizer)."""

    optimizer: Any

    def __call__(self, schedule):
        return optax.chain(self.optimizer, optax.scale_by_schedule(schedule))


@dataclasses.dataclass(frozen=True, eq=False, kw_only=True)
class RunConfig:
    """What `jaxdl.doctor.examine` was asked to examine, its arguments checked: the model
    (a layer), the optimizer, the loss (``train=`` keyword), ``train = (x, y)`` and
    ``validation`` (numpy), and the sizes of the runs (see `examine` for each). ``params`` /
    ``model_state``: a given starting point instead of ``model.init`` (None: initialize).
    Built by keyword only."""

    model: Any
    optimizer: optax.GradientTransformation
    loss_fn: Callable
    train: tuple
    validation: tuple | None
    batch_size: int
    seed: int
    steps: int
    overfit_size: int
    overfit_steps: int
    range_steps: int
    range_multipliers: tuple
    inspect_size: int
    learning_rate: float | None = None
    params: Any = None
    model_state: Any = None


class Run:
    """Shared state of one `examine` call: the data, the initialization, the compiled programs,
    and the results computed once (`probe`, `inspect`) for every check that reads them.

    Every run starts from the same initialization (``seed``; ``init_key, key = split(key(seed))``
    as `jaxdl.TrainState.create`) with a fresh optimizer state.
    """

    def __init__(self, config: RunConfig):
        c = self.config = config
        self.model, self.optimizer, self.loss_fn = c.model, c.optimizer, c.loss_fn
        self.step_loss = c.loss_fn if accepts_train(c.loss_fn) else _TrainKeyword(c.loss_fn)
        self.x, self.y = c.train
        self.validation = c.validation
        self.batch_size, self.seed, self.steps = c.batch_size, c.seed, c.steps
        self.overfit_size, self.overfit_steps = c.overfit_size, c.overfit_steps
        self.range_steps, self.range_multipliers = c.range_steps, c.range_multipliers
        self.inspect_size = c.inspect_size
        self.rng = np.random.default_rng(c.seed)
        self.input_shape = tuple(self.x.shape[1:])
        init_key, self.key = jax.random.split(jax.random.key(c.seed))  # as TrainState.create
        init, out_shape = cached("init", _make_init, c.model, self.input_shape)
        if c.params is None:
            self.params0, self.ms0 = init(init_key)
        else:
            self.params0, self.ms0 = c.params, c.model_state
        self.opt0, lr_hat = cached("opt_setup", _make_opt_setup, c.optimizer)(self.params0)
        self.num_classes = int(out_shape[-1]) if len(out_shape) else 1
        self.sequential = hasattr(c.model, "intermediates")
        self.learning_rate = float(c.learning_rate if c.learning_rate is not None else lr_hat)
        self.lr_source = "given" if c.learning_rate is not None else "estimated"
        self.chunk = max(1, min(10, c.steps, c.overfit_steps, c.range_steps))
        self._scan = self._inspect = None
        self.probed = None  # the probe run's (state, metrics), once run
        self.inspected: dict = {}  # "batch", "init", "probe": the inspection batch and results
        self.curves: dict = {}  # what the checks leave for the report's figures
        self.usable = None  # indices of finite, in-range training examples (set by the data check)

    # -- data
    def indices(self, n):
        """``n`` indices of usable training examples, each pass over them a fresh permutation."""
        pool = self.usable if self.usable is not None else np.arange(len(self.y))
        reps = -(-n // len(pool))
        return np.concatenate([self.rng.permutation(pool) for _ in range(reps)])[:n]

    def inspect_batch(self):
        """The batch of ``inspect_size`` usable examples the inspections look at (drawn once)."""
        if "batch" not in self.inspected:
            idx = self.indices(
                min(self.inspect_size, len(self.usable if self.usable is not None else self.y))
            )
            self.inspected["batch"] = (jnp.asarray(self.x[idx]), jnp.asarray(self.y[idx]))
        return self.inspected["batch"]

    # -- runs
    def start(self) -> TrainState:
        """The `TrainState` every run starts from: the initialization, a fresh optimizer state."""
        return TrainState(
            step=jnp.zeros([], jnp.int32),
            params=self.params0,
            model_state=self.ms0,
            opt_state=self.opt0,
            key=self.key,
        )

    def train(self, idx, multiple=None, stop=None):
        """Train from `start` on the examples ``idx`` (steps x batch), ``multiple`` times the
        optimizer's update (default 1), chunk by chunk through one compiled `make_probe_scan`;
        ``stop(state)`` after a chunk ends the run early. Returns ``(state, metrics)``, the
        metrics (numpy) of the steps run."""
        if self._scan is None:
            self._scan = cached("scan", make_probe_scan, self.step_loss, self.optimizer)
        n, c, state, metrics = len(idx), self.chunk, self.start(), []
        multiple = np.ones(n) if multiple is None else multiple
        for begin in range(0, n, c):
            ix, m = idx[begin : begin + c], multiple[begin : begin + c]
            pad = c - len(ix)
            active = np.arange(c) < len(ix)
            if pad:
                ix = np.concatenate([ix, np.repeat(ix[-1:], pad, 0)])
                m = np.concatenate([m, np.zeros(pad)])
            xs = (
                jnp.asarray(self.x[ix]),
                jnp.asarray(self.y[ix]),
                jnp.asarray(m, jnp.float32),
                jnp.asarray(active),
            )
            state, met = self._scan(state, xs)
            metrics.append(jax.tree.map(lambda v, n=c - pad: v[:n], to_numpy(met)))
            if stop is not None and stop(state):
                break
        return state, jax.tree.map(lambda *v: np.concatenate(v), *metrics)

    def probe(self):
        """``steps`` steps of the configured optimizer from `start`: ``(state, metrics)``."""
        if self.probed is None:
            idx = self.indices(self.steps * self.batch_size).reshape(self.steps, self.batch_size)
            self.probed = self.train(idx)
        return self.probed

    def inspect(self, when):
        """Activation/gradient statistics on the inspection batch, at ``when`` = "init" or "probe"."""
        if when not in self.inspected:
            if self._inspect is None:
                self._inspect = cached("inspect", make_inspect, self.model, self.loss_fn, self.sequential)
            if when == "init":
                params, ms = self.params0, self.ms0
            else:
                params, ms = self.probe()[0].params, self.probe()[0].model_state
            x, y = self.inspect_batch()
            self.inspected[when] = self._inspect(params, ms, x, y, jax.random.fold_in(self.key, 10**6))
        return self.inspected[when]

    def range_test(self, lo: float, hi: float):
        """`jaxdl.diagnostics.lr_range_test` over the multiples ``lo..hi`` of the configured
        optimizer's update, from `start`, NaN/Inf steps skipped: ``(multiples, losses)``."""
        K = self.range_steps
        idx = self.indices(K * self.batch_size).reshape(K, self.batch_size)
        batches = (jnp.asarray(self.x[idx]), jnp.asarray(self.y[idx]))
        result = lr_range_test(
            self.step_loss, _Multiplied(self.optimizer), self.start(), batches, lo, hi, skip_nonfinite=True
        )
        return result.lrs, result.losses
