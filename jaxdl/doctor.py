"""`examine`: seed 004's training recipe as one call that says what is wrong, and why.

Seed 004 (with seeds 001 and 003) teaches what to do with a network that does not train: check
the initial loss, overfit a tiny subset, find the learning rate with a range test, watch the
update/weight ratio (about 1e-3), look at per-layer activation and gradient histograms, beware
constant initialization, saturated sigmoid/tanh units and dead ReLUs, preprocess the data.
`examine` runs all of it on a model, an optimizer and a dataset and returns a `Report` whose
`Finding` s say what was measured (the numbers, the layer names), how bad it is and what to do.

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

One compiled training scan serves the probe run, the overfit run and the range test: each step
multiplies the optimizer's update by a per-step factor (1 for the probe and the overfit run,
``m_k`` for the range test) and can be switched off (padding), so the three share one program.
"""

from __future__ import annotations

import dataclasses
import inspect
import json
import math
import os
import re
import time
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
import optax

from jaxdl import layers as L
from jaxdl._checks import check_int, check_tree_match
from jaxdl.diagnostics import initial_loss_check, lr_range_test
from jaxdl.losses import binary_cross_entropy, mse
from jaxdl.nnx import as_layer
from jaxdl.train_step import TrainState, accepts_train, supervised_loss

__all__ = ["examine", "Report", "Finding", "CHECKS", "SEVERITIES", "THRESHOLDS", "estimate_learning_rate"]

CHECKS = (
    "data",
    "initial_loss",
    "gradient_check",
    "symmetry",
    "overfit",
    "learning_rate",
    "update_ratio",
    "activations",
    "gradients",
    "batchnorm",
)
SEVERITIES = ("ok", "warn", "fail")

# Every threshold in one place; docs/doctor.md says where each comes from.
THRESHOLDS: dict[str, float] = {
    "data_mean": 1.0,  # warn when |mean of the inputs| exceeds this (seed 001: centre)
    "data_std_low": 0.1,  # warn when the inputs' std is outside [low, high] (unit scale)
    "data_std_high": 10.0,
    "data_rare_class": 0.2,  # warn when a class has fewer than this x the median count
    "data_duplicates": 0.01,  # warn when this fraction of validation examples is in train
    "initial_loss_warn": 0.25,  # |loss / ln C - 1| above: warn
    "initial_loss_high": 3.0,  # loss / ln C above: fail (He init of the output layer gives ~2)
    "initial_loss_low": 0.5,  # loss / ln C below: fail (below the label entropy: a leak)
    "gradient_check_fail": 1e-2,  # relative error per leaf: a wrong gradient is off by O(1)
    "gradient_check_warn": 1e-4,  # kinks (ReLU, max pool) crossed by +-eps reach ~1e-3
    "gradient_check_eps": 1e-6,  # finite-difference step (float64)
    "symmetry_tol": 1e-3,  # units closer than this (relative) count as identical
    "symmetry_frac": 0.1,  # fail when this fraction of a layer's units are clones
    "overfit_ok": 0.99,  # training accuracy on the subset: ok at or above
    "overfit_fail": 0.9,  # fail below (warn in between)
    "lr_suggest_warn": 100.0,  # warn when the suggestion is this many times the configured rate
    "update_ratio_low": 1e-4,  # warn when a layer's median ratio leaves [low, high]
    "update_ratio_high": 1e-2,
    "dead_warn": 0.25,  # fraction of ReLU units that never activate
    "dead_fail": 0.5,
    "saturated_warn": 0.1,  # fraction of sigmoid/tanh outputs in the flat tails
    "saturated_fail": 0.5,
    "scale_ratio": 100.0,  # std of the last hidden pre-activation vs the first: warn beyond
    "grad_ratio_warn": 1e2,  # RMS gradient, last layer vs first (or first vs last): warn
    "grad_ratio_fail": 1e4,  # fail
    "batchnorm_warn": 0.5,  # (eval loss - train loss) / train loss: warn
    "batchnorm_fail": 2.0,  # fail
}

_ACTIVATION_KINDS = ("relu", "sigmoid", "tanh", "leakyrelu", "prelu", "elu", "maxout")


# ----------------------------------------------------------------------------- report


@dataclasses.dataclass(frozen=True)
class Finding:
    """One check's verdict: ``severity`` ("ok", "warn", "fail"), what was measured (``message``),
    what to change (``advice``) and the numbers behind it (``evidence``, JSON-able)."""

    check: str
    severity: str
    message: str
    advice: str = ""
    evidence: dict = dataclasses.field(default_factory=dict)

    def __post_init__(self):
        if self.check not in CHECKS:
            raise ValueError(f"Finding: check={self.check!r}; expected one of {CHECKS}")
        if self.severity not in SEVERITIES:
            raise ValueError(f"Finding: severity={self.severity!r}; expected one of {SEVERITIES}")
        object.__setattr__(self, "evidence", _jsonable(self.evidence))


@dataclasses.dataclass
class Report:
    """What `examine` found: ``findings`` (one `Finding` per check run, in `CHECKS` order),
    ``info`` (sizes, configured rate, wall times) and the data behind the figures
    (``curves``: range test and probe run; ``histograms``: per-layer activations and gradients
    at initialization and after the probe run)."""

    findings: list
    info: dict = dataclasses.field(default_factory=dict)
    curves: dict = dataclasses.field(default_factory=dict)
    histograms: dict = dataclasses.field(default_factory=dict)

    @property
    def ok(self) -> bool:
        """True when no finding has severity "fail"."""
        return all(f.severity != "fail" for f in self.findings)

    def __getitem__(self, check: str) -> Finding:
        """The finding of ``check`` (KeyError when it was not run)."""
        for f in self.findings:
            if f.check == check:
                return f
        raise KeyError(
            f"Report: no finding for check {check!r}; checks run: {[f.check for f in self.findings]}"
        )

    def summary(self) -> str:
        """The plain-text report: one line per check, advice under each problem."""
        n_fail = sum(f.severity == "fail" for f in self.findings)
        n_warn = sum(f.severity == "warn" for f in self.findings)
        i = self.info
        head = (
            f"jaxdl doctor: {'OK' if self.ok else 'PROBLEMS FOUND'}: {len(self.findings)} checks, "
            f"{n_fail} fail, {n_warn} warn"
        )
        lines = [head]
        if i:
            lines.append(
                f"  model: {i.get('layers', '?')} layers, {i.get('parameters', 0):,} parameters, "
                f"{i.get('num_classes', '?')} classes; {i.get('train_examples', 0):,} training / "
                f"{i.get('validation_examples', 0):,} validation examples; "
                f"{i.get('wall_time_s', 0):.1f} s"
            )
        for f in self.findings:
            tag = {"ok": " ok ", "warn": "WARN", "fail": "FAIL"}[f.severity]
            lines.append(f"[{tag}] {f.check:<15} {f.message}")
            if f.severity != "ok" and f.advice:
                lines.append(f"{'':22}-> {f.advice}")
        return "\n".join(lines)

    def to_dict(self) -> dict:
        """Everything as JSON-able values (non-finite numbers become None)."""
        return _jsonable(
            {
                "ok": self.ok,
                "info": self.info,
                "findings": [dataclasses.asdict(f) for f in self.findings],
                "curves": self.curves,
            }
        )

    def write(self, out_dir: str) -> list[str]:
        """Write ``report.md``, ``report.json`` and the PNG figures into ``out_dir`` (created if
        needed); returns the paths written. Figures: ``activations.png`` and ``gradients.png``
        (per-layer histograms at initialization and after the probe run), ``lr_range.png`` (the
        range test's loss against the rate), ``update_ratios.png`` (per layer, over the probe)."""
        os.makedirs(out_dir, exist_ok=True)
        figures = _write_figures(self, out_dir)
        paths = [os.path.join(out_dir, "report.json"), os.path.join(out_dir, "report.md")]
        with open(paths[0], "w") as fh:
            json.dump(self.to_dict(), fh, indent=1, allow_nan=False)
        with open(paths[1], "w") as fh:
            fh.write(_markdown(self, [os.path.basename(p) for p in figures]))
        return paths + figures


def _jsonable(value):
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, (np.ndarray, jax.Array)):
        return _jsonable(np.asarray(value).tolist())
    if isinstance(value, (bool, np.bool_)):
        return bool(value)
    if isinstance(value, (int, np.integer)):
        return int(value)
    if isinstance(value, (float, np.floating)):
        return float(value) if math.isfinite(value) else None
    return value


# ----------------------------------------------------------------------------- the run


_PROGRAMS: dict = {}  # compiled programs, keyed by the (hashable) objects they close over


def _cached(kind: str, make: Callable, *key):
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
    """
    return float(jax.jit(_unit_step, static_argnums=0)(optimizer, params))


def _path_name(path) -> str:
    """``dense_1.w`` for the tree path ``['dense_1']['w']``."""
    return (
        ".".join(str(getattr(k, "key", getattr(k, "idx", getattr(k, "name", k)))) for k in path) or "params"
    )


def _layer_index(name: str) -> tuple:
    m = re.search(r"_(\d+)$", name)
    return (int(m.group(1)), name) if m else (1 << 30, name)


def _layer_groups(tree) -> dict[str, list]:
    """Leaves grouped by their top-level key (the layer, ``dense_0``), in layer order."""
    groups: dict[str, list] = {}
    for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]:
        key = path[0] if path else None
        name = str(getattr(key, "key", getattr(key, "idx", "params"))) if key is not None else "params"
        groups.setdefault(name, []).append(leaf)
    return {k: groups[k] for k in sorted(groups, key=_layer_index)}


def _layer_norms(tree) -> dict:
    return {
        k: jnp.sqrt(sum(jnp.sum(jnp.square(x.astype(jnp.float32))) for x in v))
        for k, v in _layer_groups(tree).items()
    }


def _make_scan(loss_fn, optimizer):
    """``run(carry, xs) -> (carry, metrics)``: a jitted scan of training steps; ``xs`` =
    ``(x, y, multiplier, active)`` stacked per step. Non-finite or inactive steps change nothing."""

    def body(carry, xs):
        params, model_state, opt_state, key, step = carry
        x, y, mult, active = xs
        k = jax.random.fold_in(key, step)
        (loss, (new_ms, aux)), grads = jax.value_and_grad(
            lambda p: loss_fn(p, model_state, (x, y), k, train=True), has_aux=True
        )(params)
        updates, new_opt = optimizer.update(grads, opt_state, params)
        updates = jax.tree.map(lambda u: (u * mult).astype(u.dtype), updates)
        new_params = optax.apply_updates(params, updates)
        finite = (
            jnp.isfinite(loss) & jnp.isfinite(optax.tree.norm(grads)) & jnp.isfinite(optax.tree.norm(updates))
        )
        keep = finite & active
        sel = lambda new, old: jax.tree.map(lambda a, b: jnp.where(keep, a, b), new, old)  # noqa: E731
        pn, un, gn = _layer_norms(params), _layer_norms(updates), _layer_norms(grads)
        metrics = {
            "loss": loss,
            "accuracy": aux.get("accuracy", jnp.nan) if isinstance(aux, dict) else jnp.nan,
            "update_ratio": {k: un[k] / jnp.maximum(pn[k], 1e-30) for k in pn},
            "grad_norm": gn,
            "nonfinite": (~finite & active).astype(jnp.int32),
        }
        carry = (
            sel(new_params, params),
            sel(new_ms, model_state),
            sel(new_opt, opt_state),
            key,
            step + active.astype(step.dtype),
        )
        return carry, metrics

    return jax.jit(lambda carry, xs: jax.lax.scan(body, carry, xs))


def _hist(v, bins=30):
    v = np.ravel(v).astype(np.float64)
    v = v[np.isfinite(v)]
    return np.histogram(v if v.size else np.zeros(1), bins=bins)


def _make_inspect(model, loss_fn, sequential: bool):
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
        loss, eval_loss, grads, acts = _np(raw(params, model_state, x, y, key))
        res = {"loss": float(loss), "eval_loss": float(eval_loss), "grads": {}, "acts": {}}
        for name, leaves in _layer_groups(grads).items():
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


def _kind(name: str) -> str:
    return re.sub(r"_\d+$", "", name)


def _np(tree):
    return jax.tree.map(np.asarray, tree)


@dataclasses.dataclass(frozen=True)
class _TrainKeyword:
    """A loss that takes ``train=`` only through ``**kwargs``, with ``train`` named (the train
    step passes ``train=True`` to a loss whose signature shows it)."""

    inner: Any

    def __call__(self, params, model_state, batch, key=None, train=True):
        return self.inner(params, model_state, batch, key, train=train)


class _Run:
    """Shared state of one `examine` call: data, the compiled functions, cached results."""

    def __init__(
        self,
        model,
        optimizer,
        loss_fn,
        train,
        validation,
        batch_size,
        seed,
        steps,
        overfit_size,
        overfit_steps,
        range_steps,
        range_multipliers,
        inspect_size,
        learning_rate,
        params=None,
        model_state=None,
    ):
        self.model, self.optimizer, self.loss_fn = model, optimizer, loss_fn
        self.step_loss = loss_fn if accepts_train(loss_fn) else _TrainKeyword(loss_fn)
        self.x, self.y = train
        self.validation = validation
        self.batch_size, self.seed, self.steps = batch_size, seed, steps
        self.overfit_size, self.overfit_steps, self.range_steps = overfit_size, overfit_steps, range_steps
        self.range_multipliers = range_multipliers
        self.rng = np.random.default_rng(seed)
        self.input_shape = tuple(self.x.shape[1:])
        init_key, self.key = jax.random.split(jax.random.key(seed))  # as TrainState.create
        init, out_shape = _cached("init", _make_init, model, self.input_shape)
        if params is None:
            self.params0, self.ms0 = init(init_key)
        else:
            self.params0, self.ms0 = params, model_state
        self.opt0, lr_hat = _cached("opt_setup", _make_opt_setup, optimizer)(self.params0)
        self.num_classes = int(out_shape[-1]) if len(out_shape) else 1
        self.sequential = hasattr(model, "intermediates")
        self.learning_rate = float(learning_rate) if learning_rate is not None else float(lr_hat)
        self.lr_source = "given" if learning_rate is not None else "estimated"
        self.inspect_size = inspect_size
        self.chunk = max(1, min(10, steps, overfit_steps, range_steps))
        self._scan = self._inspect = self._probe = None
        self._inspected: dict = {}
        self.usable = None  # indices of finite, in-range training examples (set by the data check)

    # -- data
    def indices(self, n):
        pool = self.usable if self.usable is not None else np.arange(len(self.y))
        reps = -(-n // len(pool))
        return np.concatenate([self.rng.permutation(pool) for _ in range(reps)])[:n]

    def inspect_batch(self):
        if "batch" not in self._inspected:
            idx = self.indices(
                min(self.inspect_size, len(self.usable if self.usable is not None else self.y))
            )
            self._inspected["batch"] = (jnp.asarray(self.x[idx]), jnp.asarray(self.y[idx]))
        return self._inspected["batch"]

    # -- compiled pieces
    def scan(self, params, ms, idx, mult, active):
        """Run the training scan over the examples ``idx`` (steps x batch), chunk by chunk."""
        if self._scan is None:
            self._scan = _cached("scan", _make_scan, self.loss_fn, self.optimizer)
        carry = (params, ms, self.opt0, self.key, jnp.zeros([], jnp.int32))
        return self._run_chunks(carry, idx, mult, active)

    def _run_chunks(self, carry, idx, mult, active, stop=None):
        n, c, metrics = len(idx), self.chunk, []
        for start in range(0, n, c):
            sl = slice(start, start + c)
            ix, m, a = idx[sl], mult[sl], active[sl]
            pad = c - len(ix)
            if pad:
                ix = np.concatenate([ix, np.repeat(ix[-1:], pad, 0)])
                m, a = np.concatenate([m, np.zeros(pad)]), np.concatenate([a, np.zeros(pad, bool)])
            xs = (
                jnp.asarray(self.x[ix]),
                jnp.asarray(self.y[ix]),
                jnp.asarray(m, jnp.float32),
                jnp.asarray(a),
            )
            carry, met = self._scan(carry, xs)
            met = _np(met)
            metrics.append(jax.tree.map(lambda v, n=c - pad: v[:n], met))
            if stop is not None and stop(carry):
                break
        return carry, jax.tree.map(lambda *v: np.concatenate(v), *metrics)

    def inspect(self, when):
        """Activation/gradient statistics on the inspection batch, at ``when`` = "init" or "probe"."""
        if when not in self._inspected:
            if self._inspect is None:
                self._inspect = _cached("inspect", _make_inspect, self.model, self.loss_fn, self.sequential)
            params, ms = (self.params0, self.ms0) if when == "init" else self.probe()[0][:2]
            x, y = self.inspect_batch()
            self._inspected[when] = self._inspect(params, ms, x, y, jax.random.fold_in(self.key, 10**6))
        return self._inspected[when]

    def probe(self):
        """``steps`` steps of the configured optimizer from initialization: (carry, metrics)."""
        if self._probe is None:
            idx = self.indices(self.steps * self.batch_size).reshape(self.steps, self.batch_size)
            self._probe = self.scan(
                self.params0, self.ms0, idx, np.ones(self.steps), np.ones(self.steps, bool)
            )
        return self._probe


# ----------------------------------------------------------------------------- the checks


def _check_data(run: _Run) -> Finding:
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
                "split (jaxdl.data.fit_standardization / standardize; seed 001)"
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


def _check_initial_loss(run: _Run) -> Finding:
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
            "the initial outputs are confidently wrong: scale the initial weights down (Xavier/He, "
            "seed 003) or normalize the inputs (seed 001)"
        )
    else:
        advice = (
            "too low for an untrained model: look for labels leaking into the inputs, or a loss that "
            "is not the mean cross-entropy"
        )
    return Finding("initial_loss", severity, msg, advice if severity != "ok" else "", ev)


def _check_gradients_fd(run: _Run) -> Finding:
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

    p64, ms64 = to64(_np(run.params0), True), to64(_np(run.ms0), False)
    paths = [_path_name(path) for path, _ in jax.tree_util.tree_flatten_with_path(p64)[0]]
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
        program = _cached("fd", _make_fd_program, run.loss_fn, sig, k, eps)
        loss0, ad, fd, idx = _np(program(flat, ms64, x64, y, key, rand))
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


def _check_symmetry(run: _Run) -> Finding:
    t = THRESHOLDS
    after = _np(run.probe()[0][0])
    g0, g1 = _layer_groups(_np(run.params0)), _layer_groups(after)
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
            "initialize the weights randomly (He for ReLU, Xavier for tanh; seed 003: constant "
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
            "initialize the weights randomly (He/Xavier, seed 003)",
            ev,
        )
    return Finding(
        "symmetry", "ok", f"no identical units in {len(ev)} layers at init or after the probe run", "", ev
    )


def _make_predict(model):
    """Jitted eval-mode accuracy ``predict(params, model_state, x, y)``."""
    return jax.jit(lambda p, s, x, y: jnp.mean(jnp.argmax(model.apply(p, s, x, train=False)[0], -1) == y))


def _check_overfit(run: _Run) -> Finding:
    t = THRESHOLDS
    B = run.batch_size
    n = min(run.overfit_size, B, len(run.usable if run.usable is not None else run.y))
    subset = run.indices(n)
    idx = np.tile(subset[np.arange(B) % n], (run.overfit_steps, 1))
    xs, ys = jnp.asarray(run.x[subset[np.arange(B) % n]]), jnp.asarray(run.y[subset[np.arange(B) % n]])
    model = run.model
    predict = _cached("predict", _make_predict, model)
    if run._scan is None:
        run._scan = _cached("scan", _make_scan, run.loss_fn, run.optimizer)
    carry = (run.params0, run.ms0, run.opt0, run.key, jnp.zeros([], jnp.int32))
    accs = []

    def done(c):
        accs.append(float(predict(c[0], c[1], xs, ys)))
        return accs[-1] >= t["overfit_ok"]

    carry, met = run._run_chunks(
        carry, idx, np.ones(run.overfit_steps), np.ones(run.overfit_steps, bool), done
    )
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
    run.curves_overfit = {"loss": losses}
    msg = (
        f"{acc:.0%} training accuracy on {n} examples after {steps} steps "
        f"(loss {losses[0]:.3g} -> {losses[-1]:.3g})"
    )
    severity = "ok" if acc >= t["overfit_ok"] else "warn" if acc >= t["overfit_fail"] else "fail"
    advice = (
        (
            "a model that cannot overfit a few dozen examples has a bug, too little capacity or a broken "
            "optimization (seed 004): look at the other findings (learning rate, symmetry, dead units, "
            "gradients) before any hyperparameter search"
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


@dataclasses.dataclass(frozen=True)
class _Multiplied:
    """The range test's ``make_optimizer`` for a configured optimizer: its update times the
    schedule's value (a multiple of its own rate, whatever the optimizer)."""

    optimizer: Any

    def __call__(self, schedule):
        return optax.chain(self.optimizer, optax.scale_by_schedule(schedule))


def _range_test(run: _Run, lo: float, hi: float):
    """`jaxdl.diagnostics.lr_range_test` over the multiples ``lo..hi`` of the configured
    optimizer's update, from the initialization, NaN/Inf steps skipped: ``(multiples, losses)``."""
    K = run.range_steps
    idx = run.indices(K * run.batch_size).reshape(K, run.batch_size)
    state = TrainState(
        step=jnp.zeros([], jnp.int32),
        params=run.params0,
        model_state=run.ms0,
        opt_state=run.opt0,
        key=run.key,
    )
    batches = (jnp.asarray(run.x[idx]), jnp.asarray(run.y[idx]))
    result = lr_range_test(
        run.step_loss, _Multiplied(run.optimizer), state, batches, lo, hi, skip_nonfinite=True
    )
    return result.lrs, result.losses


def _falls(losses) -> bool:
    """Whether the smoothed loss ever drops 20% below its start (else the range was too low)."""
    vals = np.asarray(losses, np.float64)
    w = max(3, (len(vals) // 10) | 1)
    smooth = np.convolve(
        np.pad(np.where(np.isfinite(vals), vals, np.inf), w // 2, mode="edge"), np.ones(w) / w, mode="valid"
    )
    return bool(np.nanmin(smooth) < 0.8 * smooth[0])


def _check_learning_rate(run: _Run) -> Finding:
    t = THRESHOLDS
    lo, hi = run.range_multipliers
    mult, losses = _range_test(run, lo, hi)
    div = _divergence_index(losses)
    extended = False
    if div is None and not _falls(losses):  # nothing happened: go on upwards (same program, no compile)
        extended = True
        lo, hi = hi, hi * (hi / lo)
        mult, losses = _range_test(run, lo, hi)
        div = _divergence_index(losses)
    falls = _falls(losses[:div] if div else losses)
    m_sugg = _suggest(mult[:div] if div else mult, losses[:div] if div else losses) if falls else None
    m_div = float(mult[div]) if div is not None else None
    lr = run.learning_rate
    run.curves_lr = {
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
            f"lower the learning rate to {fix} (seed 004: loss exploding means the rate is too high)",
            ev,
        )
    if m_sugg is None:
        return Finding(
            "learning_rate",
            "warn",
            base + f", even at {hi:g} x the configured rate",
            "the rate is far too low, or nothing can learn (see overfit, symmetry, gradients): "
            "raise the learning rate by orders of magnitude (seed 004: loss not going down means "
            "the rate is too low)",
            ev,
        )
    if m_sugg >= t["lr_suggest_warn"]:
        return Finding(
            "learning_rate",
            "warn",
            base + f": the configured rate is {m_sugg:.0f}x below the suggestion",
            f"raise the learning rate towards {m_sugg * lr:.2g} (seed 004: a loss that "
            "does not go down means the rate is too low)",
            ev,
        )
    return Finding("learning_rate", "ok", base, "", ev)


def _check_update_ratio(run: _Run) -> Finding:
    t = THRESHOLDS
    met = run.probe()[1]
    ok_steps = met["nonfinite"] == 0
    half = np.arange(len(ok_steps)) >= len(ok_steps) // 2
    use = ok_steps & half if (ok_steps & half).any() else ok_steps
    ratios = {
        k: float(np.median(v[use])) if use.any() else float("nan") for k, v in met["update_ratio"].items()
    }
    run.curves_update = {k: v for k, v in met["update_ratio"].items()}
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
        ) + " (seed 004: want ~1e-3)"
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


def _check_activations(run: _Run) -> Finding:
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
        pre = [n for n in acts if _kind(n) in ("dense", "conv", "maxout")][:-1]  # hidden pre-activations
        for name, s in acts.items():
            kind = _kind(name)
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
        "dead ReLUs: a negative bias or too high a learning rate pushed them off (seed 003/001: use "
        "He init, zero biases, a lower rate or leaky ReLU); saturated sigmoid/tanh: the weights are too "
        "large (seed 003: Xavier init; seed 001: prefer ReLU); shrinking/growing scales: use the "
        "fan-in-scaled init of the activation (Xavier/He) or BatchNorm"
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


def _check_gradients(run: _Run) -> Finding:
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
            "divergent learning rate (gradient clipping bounds the step, seed 004)",
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
            f"the gradients {kind} (seed 000/003: a product of per-layer Jacobians): use Xavier/He init, "
            "ReLU instead of saturating units, BatchNorm, or gradient clipping for explosions (seed 004); "
            "a layer with exactly zero gradient is cut off (dead or symmetric units)"
        )
        if sev != "ok"
        else ""
    )
    return Finding("gradients", sev, desc, advice, ev)


def _check_batchnorm(run: _Run) -> Finding:
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
            "the running statistics do not describe the activations the model was trained on (seed 001: at "
            "test time BatchNorm uses running averages): check BatchNorm's momentum (weight of the old "
            "value, e.g. 0.9; 1.0 never updates), use larger batches, or train longer before "
            "evaluating"
        )
        if sev != "ok"
        else ""
    )
    return Finding("batchnorm", sev, msg, advice, ev)


_RUNNERS: dict[str, Callable[[_Run], Finding]] = {
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


# ----------------------------------------------------------------------------- entry point


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
    """Run seed 004's training recipe on ``model``, ``optimizer`` and ``train = (x, y)``.

    Returns a `Report` with one `Finding` per check in ``checks`` (default: all of `CHECKS`):

    - ``data`` (seed 001): NaN/Inf inputs or labels outside the model's C classes fail; inputs
      with |mean| > 1 or std outside [0.1, 10], a class with < 0.2 x the median count, or >= 1%
      of the validation set repeated from train warn. Later checks use only the finite,
      in-range examples.
    - ``initial_loss`` (seed 004): loss at init vs ``ln C``; warn when the ratio is off by more
      than 25%, fail when it leaves [0.5, 3].
    - ``gradient_check`` (seeds 000, 003): autodiff vs central differences
      ``(L(t + e) - L(t - e)) / 2e`` in float64 (e = 1e-6) on 3 random and the 3 largest entries
      of every parameter array, 16 examples; per entry ``|g_ad - g_fd| / (|g_ad| + |g_fd|)``;
      fail when most entries of an array exceed 1e-4 (naming it).
    - ``symmetry`` (seed 003, seed 000): >= 10% of a layer's units identical (relative distance
      <= 1e-3) at init and still after the probe run fails.
    - ``overfit`` (seed 004): ``overfit_size`` examples, up to ``overfit_steps`` steps of the
      configured optimizer; eval-mode training accuracy >= 99% ok, < 90% fail.
    - ``learning_rate`` (seed 004; Smith 2017): ``range_steps`` steps with the optimizer's update
      multiplied by ``m_k`` growing geometrically over ``range_multipliers``; fail when the loss
      diverges at ``m <= 1``, warn when the suggestion (a tenth of the rate at the smoothed
      loss's minimum) is >= 100 x or the loss falls nowhere (the range is then extended once).
    - ``update_ratio`` (seed 004): median per-layer ``||u|| / ||theta||`` over the second half of
      a ``steps``-step probe run; warn outside [1e-4, 1e-2].
    - ``activations`` (seeds 001, 003, 004): at init and after the probe, dead ReLU units (never
      positive on ``inspect_size`` examples; warn > 25%, fail > 50% at init), saturated
      sigmoid/tanh outputs (warn > 10%, fail > 50%), pre-activation std of the last hidden layer
      vs the first beyond 100x (warn).
    - ``gradients`` (seeds 000, 004): NaN/Inf gradients fail; RMS gradient of the first layer vs
      the last beyond 1e2 warns, beyond 1e4 (or a layer with exactly zero gradient) fails.
    - ``batchnorm`` (seed 001): after the probe, ``(L_eval - L_train) / L_train`` above 0.5 warns,
      above 2 fails.

    ``loss_fn(params, model_state, (x, y), key, train=...) -> (loss, (model_state, aux))``
    defaults to ``supervised_loss(model)`` (a wrapper with ``.model``, e.g. the CLI's
    augmentation, works too). ``learning_rate`` only labels the rates (else
    `estimate_learning_rate`). ``checks`` runs a subset. ``params``/``model_state`` start from
    given parameters instead of ``model.init`` (a pretrained model, a custom initialization).
    Thresholds: `THRESHOLDS`; each one's source and reason: docs/doctor.md. Every run starts from
    the same initialization (``seed``) with a fresh optimizer state.

    Example::

        report = jaxdl.doctor.examine(jaxdl.models.mlp(10), jaxdl.adam(1e-3), (x, y))
        print(report.summary()); report.write("runs/doctor")
    """
    t0, c0 = time.perf_counter(), time.process_time()
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
    batch_size = check_int("examine", "batch_size", batch_size, low=1)
    if batch_size > len(y):
        raise ValueError(f"examine: batch_size={batch_size} exceeds the {len(y)} training examples")
    steps = check_int("examine", "steps", steps, low=2)
    overfit_size = check_int("examine", "overfit_size", overfit_size, low=1)
    overfit_steps = check_int("examine", "overfit_steps", overfit_steps, low=1)
    range_steps = check_int("examine", "range_steps", range_steps, low=3)
    inspect_size = check_int("examine", "inspect_size", inspect_size, low=2)
    check_int("examine", "seed", seed, low=0)
    lo, hi = (
        range_multipliers
        if isinstance(range_multipliers, (tuple, list)) and len(range_multipliers) == 2
        else (None, None)
    )
    if lo is None or not (0 < lo < 1 < hi):
        raise ValueError(
            f"examine: range_multipliers={range_multipliers!r}; expected (low, high) with "
            "0 < low < 1 < high (multiples of the configured rate)"
        )
    if learning_rate is not None and not (isinstance(learning_rate, (int, float)) and learning_rate > 0):
        raise ValueError(f"examine: learning_rate={learning_rate!r}; expected a number > 0 or None")
    checks = tuple(checks)
    unknown = [c for c in checks if c not in CHECKS]
    if unknown:
        raise ValueError(f"examine: checks={unknown!r} unknown; expected a subset of {CHECKS}")
    if loss_fn is None:
        loss_fn = supervised_loss(model)
    elif not callable(loss_fn):
        raise TypeError(f"examine: loss_fn must be callable, got {loss_fn!r}")
    else:
        try:
            params_ok = "train" in inspect.signature(loss_fn).parameters or any(
                p.kind is p.VAR_KEYWORD for p in inspect.signature(loss_fn).parameters.values()
            )
        except (TypeError, ValueError):
            params_ok = True
        if not params_ok:
            raise TypeError(
                "examine: loss_fn must accept a train= keyword (train and eval mode), "
                "like jaxdl.supervised_loss(model)"
            )

    if params is not None:
        if model_state is None:
            model_state = {}
        _, exp_params, exp_state = jax.eval_shape(lambda: model.init(jax.random.key(0), x.shape[1:]))
        hint = "Pass params and model_state as model.init returns them for this input shape."
        check_tree_match("examine", exp_params, params, "params (against the model)", hint)
        check_tree_match("examine", exp_state, model_state, "model_state (against the model)", hint)
    elif model_state is not None:
        raise ValueError("examine: model_state given without params; pass both or neither")
    run = _Run(
        model,
        optimizer,
        loss_fn,
        (x, y),
        validation,
        batch_size,
        seed,
        steps,
        overfit_size,
        overfit_steps,
        range_steps,
        (float(lo), float(hi)),
        inspect_size,
        learning_rate,
        params,
        model_state,
    )
    findings, timings, cpu = [], {"setup": time.perf_counter() - t0}, {"setup": time.process_time() - c0}
    t1, c1 = time.perf_counter(), time.process_time()
    data_finding = _check_data(run)  # always: the other checks use only the usable examples
    if "data" in checks:
        findings.append(data_finding)
    timings["data"], cpu["data"] = time.perf_counter() - t1, time.process_time() - c1
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
        findings.append(_RUNNERS[check](run))
        timings[check], cpu[check] = time.perf_counter() - t1, time.process_time() - c1
    n_params = sum(int(np.size(v)) for v in jax.tree.leaves(run.params0))
    info = {
        "layers": len(model.layers) if run.sequential else None,
        "parameters": n_params,
        "num_classes": run.num_classes,
        "input_shape": list(run.input_shape),
        "train_examples": len(y),
        "validation_examples": 0 if validation is None else len(validation[1]),
        "usable_train_examples": usable,
        "batch_size": batch_size,
        "probe_steps": steps,
        "seed": seed,
        "learning_rate": run.learning_rate,
        "learning_rate_source": run.lr_source,
        "check_seconds": timings,
        "check_cpu_seconds": cpu,
        "wall_time_s": time.perf_counter() - t0,
        "cpu_time_s": time.process_time() - c0,
    }
    curves, hists = {}, {}
    if hasattr(run, "curves_lr"):
        curves["lr_range"] = run.curves_lr
    if run._probe is not None:
        met = run._probe[1]
        curves["probe"] = {"loss": met["loss"], "update_ratio": met["update_ratio"]}
    for when in ("init", "probe"):
        if when in run._inspected:
            s = run._inspected[when]
            hists[when] = {
                "activations": {k: (v["hist_counts"], v["hist_edges"]) for k, v in s["acts"].items()},
                "gradients": {k: (v["hist_counts"], v["hist_edges"]) for k, v in s["grads"].items()},
            }
    order = {c: i for i, c in enumerate(CHECKS)}
    findings.sort(key=lambda f: order[f.check])
    return Report(findings, _jsonable(info), curves, hists)


# ----------------------------------------------------------------------------- output


def _write_figures(report: Report, out_dir: str) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    paths = []

    def save(fig, name):
        path = os.path.join(out_dir, name)
        fig.tight_layout()
        fig.savefig(path, dpi=80)
        plt.close(fig)
        paths.append(path)

    for what in ("activations", "gradients"):
        names = []
        for when in ("init", "probe"):
            for k in sorted(report.histograms.get(when, {}).get(what, {}), key=_layer_index):
                if k not in names and (
                    what == "gradients"
                    or _kind(k) in ("dense", "conv", "batchnorm", "maxout")
                    or _kind(k) in _ACTIVATION_KINDS
                ):
                    names.append(k)
        if not names:
            continue
        cols = min(4, len(names))
        rows = -(-len(names) // cols)
        fig, axes = plt.subplots(rows, cols, figsize=(3.2 * cols, 2.4 * rows), squeeze=False)
        for ax, name in zip(axes.ravel(), names, strict=False):
            for when, color in (("init", "tab:blue"), ("probe", "tab:orange")):
                h = report.histograms.get(when, {}).get(what, {}).get(name)
                if h is not None:
                    counts, edges = np.asarray(h[0]), np.asarray(h[1])
                    ax.stairs(counts, edges, color=color, label="init" if when == "init" else "after probe")
            ax.set_title(name, fontsize=9)
            ax.tick_params(labelsize=7)
        for ax in axes.ravel()[len(names) :]:
            ax.axis("off")
        axes.ravel()[0].legend(fontsize=7)
        fig.suptitle(
            f"per-layer {'activation' if what == 'activations' else 'gradient'} histograms", fontsize=10
        )
        save(fig, f"{what}.png")
    lr = report.curves.get("lr_range")
    if lr is not None:
        fig, ax = plt.subplots(figsize=(6, 4))
        losses = np.asarray(lr["losses"], np.float64)
        ax.plot(lr["lrs"], np.where(np.isfinite(losses), losses, np.nan), color="tab:blue")
        ax.set_xscale("log")
        ax.axvline(lr["configured"], color="k", ls="--", label=f"configured {lr['configured']:.2g}")
        if lr["suggested"] is not None:
            ax.axvline(lr["suggested"], color="tab:green", ls=":", label=f"suggested {lr['suggested']:.2g}")
        if lr["diverged"] is not None:
            ax.axvline(lr["diverged"], color="tab:red", ls="-.", label=f"diverges {lr['diverged']:.2g}")
        finite = losses[np.isfinite(losses)]
        if finite.size:
            ax.set_ylim(0, min(finite.max(), 3 * finite[0]) * 1.05 + 1e-9)
        ax.set_xlabel("learning rate")
        ax.set_ylabel("training loss")
        ax.set_title("learning-rate range test")
        ax.legend(fontsize=8)
        save(fig, "lr_range.png")
    probe = report.curves.get("probe")
    if probe is not None:
        fig, ax = plt.subplots(figsize=(6, 4))
        for name, r in probe["update_ratio"].items():
            ax.plot(np.maximum(np.asarray(r, np.float64), 1e-12), label=name)
        ax.set_yscale("log")
        ax.axhspan(
            THRESHOLDS["update_ratio_low"], THRESHOLDS["update_ratio_high"], color="tab:green", alpha=0.1
        )
        ax.axhline(1e-3, color="k", ls="--", lw=0.8)
        ax.set_xlabel("probe step")
        ax.set_ylabel("||update|| / ||weights||")
        ax.set_title("update/weight ratio per layer (want ~1e-3)")
        ax.legend(fontsize=7, ncol=2)
        save(fig, "update_ratios.png")
    return paths


def _markdown(report: Report, figures: list[str]) -> str:
    lines = [
        "# jaxdl doctor report",
        "",
        "```",
        report.summary(),
        "```",
        "",
        "| check | severity | finding | advice |",
        "| --- | --- | --- | --- |",
    ]
    for f in report.findings:
        cell = lambda s: s.replace("|", "\\|").replace("\n", " ")  # noqa: E731
        lines.append(f"| `{f.check}` | {f.severity} | {cell(f.message)} | {cell(f.advice)} |")
    lines.append("")
    for f in report.findings:
        lines += [f"## {f.check}: {f.severity}", "", f.message, ""]
        if f.advice:
            lines += [f"*What to do:* {f.advice}", ""]
        lines += ["```json", json.dumps(f.evidence, indent=1, allow_nan=False), "```", ""]
    if figures:
        lines += ["## Figures", ""] + [f"![{p}]({p})" for p in figures] + [""]
    return "\n".join(lines)
