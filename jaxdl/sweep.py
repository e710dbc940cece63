"""Vmapped seed and hyperparameter sweeps, and coarse-to-fine search (Sarkar, CS60010).

`sweep` trains R runs of one model in one compiled call: ``jax.vmap`` over the runs of a
``lax.scan`` over the training batches (`jaxdl.train_step.make_train_loop`). A run is a pair
(seed, setting):

- ``seeds`` (S ints) vary everything random: the model's initialization, dropout masks and, when
  ``make_optimizer`` takes a ``key`` argument, the optimizer's own randomness (`add_noise`).
- ``hparams`` (H settings) are the values handed to ``make_optimizer(**setting)`` (learning
  rate, momentum, noise eta, weight decay, ...), plus the reserved names ``init_scale``,
  ``ema`` (the EMA decay of the train loop) and ``loss_scale`` (the initial loss scale).

Grid semantics: the settings are *zipped* (setting h takes ``hparams[name][h]`` for every name;
build a Cartesian product with `grid`), and the runs are the *product* seeds x settings, seed
major: run ``r = s * H + h``. Every output has a leading run axis of length R = S * H, so
``result["loss"].reshape(S, H, K)`` separates seeds from settings.

The hyperparameters are traced values (docs/design.md, the path of one batch): ``make_optimizer`` is called inside
the vmapped function with float32 scalars, so one compilation serves every setting, and a
second sweep with other values (same names, sizes and shapes) reuses the compiled program.

Each run is exactly the single run::

    key = jax.random.key(seed)
    tx = make_optimizer(**setting)           # plus key=jax.random.fold_in(key, 1) if accepted
    state = TrainState.create(model, tx, key, input_shape)
    state = state.replace(params=p := scale_init(state.params, init_scale), opt_state=tx.init(p))
    state, metrics = make_train_loop(loss_fn, tx, precision=..., micro_batches=...,
                                     loss_scale=..., ema=...)(state, batches)

(the ``scale_init`` line only when ``init_scale`` is swept; ``ema`` and ``loss_scale`` from the
setting when swept, else from `sweep`'s arguments; the state built with them). Tests check the
sweep against a Python loop of these runs.
"""

from __future__ import annotations

import functools
import inspect
import math
from typing import Any, Callable, Mapping, NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from jaxdl._checks import check_int, check_number
from jaxdl.nnx import as_layer
from jaxdl.train_step import StepOptions, TrainState, make_eval_step, make_train_loop, resolve_options

__all__ = ["sweep", "grid", "scale_init", "coarse_to_fine", "SearchResult", "INIT_SCALE", "EMA", "LOSS_SCALE"]

INIT_SCALE = "init_scale"
"""The reserved hyperparameter name: multiplies the initial kernels (see `scale_init`)."""
EMA = "ema"
"""The reserved hyperparameter name of the train loop's EMA decay (a vmapped sweep over decays)."""
LOSS_SCALE = "loss_scale"
"""The reserved hyperparameter name of the initial loss scale (``state.loss_scale.scale``)."""


def scale_init(params, scale):
    """Multiply every kernel (every leaf with ``ndim >= 2``: Dense and Conv weights) by ``scale``.

    .. math:: W_0 \\leftarrow s \\, W_0

    With a layer initialized by ``normal(1.0)`` this draws ``N(0, s^2)``; with ``s = 0`` it is
    zero init (the degenerate constant init). Biases, BatchNorm's gamma/beta and PReLU's
    alpha are left alone. ``scale`` may be traced, which is how a sweep varies the init scale
    without recompiling (an initializer's ``stddev`` is a Python number fixed at trace time).

    Args:
      params: the model's parameters.
      scale: ``s``, a number or a traced scalar.

    Returns:
      The parameters with every leaf of ``ndim >= 2`` scaled.

    Source: Kira, CS 7643 (initialization).

    >>> import jax.numpy as jnp
    >>> p = scale_init({"w": jnp.ones((2, 2)), "b": jnp.ones(2)}, 0.5)
    >>> p["w"].tolist(), p["b"].tolist()
    ([[0.5, 0.5], [0.5, 0.5]], [1.0, 1.0])
    """
    return jax.tree.map(lambda p: (p * scale).astype(p.dtype) if jnp.ndim(p) >= 2 else p, params)


def grid(**axes) -> dict[str, np.ndarray]:
    """The Cartesian product of hyperparameter axes, as zipped 1-D arrays for `sweep`.

    ``grid(lr=[0.1, 0.01], momentum=[0.0, 0.9])`` gives ``{"lr": [0.1, 0.1, 0.01, 0.01],
    "momentum": [0.0, 0.9, 0.0, 0.9]}``: the first axis varies slowest (``np.meshgrid`` with
    ``indexing="ij"``).

    Args:
      **axes: name -> a 1-D sequence of values.

    Returns:
      A dict name -> 1-D numpy array, all of length ``prod(len(axis))``.

    >>> {k: v.tolist() for k, v in grid(lr=[0.1, 0.01], momentum=[0.0, 0.9]).items()}
    {'lr': [0.1, 0.1, 0.01, 0.01], 'momentum': [0.0, 0.9, 0.0, 0.9]}
    """
    if not axes:
        raise ValueError("grid: give at least one axis, e.g. grid(lr=[1e-3, 1e-2])")
    values = []
    for name, v in axes.items():
        arr = np.asarray(v, np.float64).reshape(-1)
        if arr.size == 0:
            raise ValueError(f"grid: axis {name!r} is empty")
        values.append(arr)
    mesh = np.meshgrid(*values, indexing="ij")
    return {name: m.reshape(-1) for name, m in zip(axes, mesh)}


def _accepts_key(make_optimizer) -> bool:
    try:
        return "key" in inspect.signature(make_optimizer).parameters
    except (TypeError, ValueError):
        return False


def _settings(hparams: Mapping[str, Any] | None) -> tuple[tuple[str, ...], np.ndarray]:
    """Names and a (H, len(names)) float32 table of the zipped settings; scalars broadcast."""
    if hparams is None:
        return (), np.zeros((1, 0), np.float32)
    if not isinstance(hparams, Mapping):
        raise TypeError(f"sweep: hparams must be a dict name -> values, got {type(hparams).__name__}")
    names = tuple(hparams)
    cols = {}
    for name in names:
        if not isinstance(name, str) or not name.isidentifier():
            raise ValueError(f"sweep: hyperparameter names must be identifiers, got {name!r}")
        arr = np.asarray(hparams[name], np.float64)
        if arr.ndim > 1:
            raise ValueError(
                f"sweep: hparams[{name!r}] must be a scalar or a 1-D array, got shape {arr.shape}"
            )
        if not np.all(np.isfinite(arr)):
            raise ValueError(f"sweep: hparams[{name!r}] holds a non-finite value: {arr}")
        cols[name] = arr
    sizes = {a.size for a in cols.values() if a.ndim == 1}
    if len(sizes) > 1:
        lens = {n: a.size for n, a in cols.items() if a.ndim == 1}
        raise ValueError(
            f"sweep: hyperparameter arrays are zipped and need one length, got {lens}; "
            "use jaxdl.sweep.grid(...) for a Cartesian product"
        )
    h = sizes.pop() if sizes else 1
    if h == 0:
        raise ValueError("sweep: hyperparameter arrays are empty")
    table = np.stack([np.broadcast_to(cols[n], (h,)) for n in names], axis=1) if names else np.zeros((h, 0))
    return names, table.astype(np.float32)


def _seeds(seeds) -> np.ndarray:
    arr = np.asarray(seeds)
    if arr.ndim == 0:
        arr = arr.reshape(1)
    if arr.ndim != 1 or arr.size == 0 or not np.issubdtype(arr.dtype, np.integer):
        raise ValueError(f"sweep: seeds must be an int or a non-empty 1-D sequence of ints, got {seeds!r}")
    return arr.astype(np.int32)


def _init_run(model, input_shape, make_optimizer, pass_key, names, seed, values, ema=None, loss_scale=None):
    """The per-run optimizer, initial state and EMA decay, from a (traced) seed and setting."""
    key = jax.random.key(seed)
    setting = {n: values[i] for i, n in enumerate(names)}
    init_scale = setting.pop(INIT_SCALE, None)
    ema = setting.pop(EMA, ema)
    initial_loss_scale = setting.pop(LOSS_SCALE, None)
    if pass_key:
        setting["key"] = jax.random.fold_in(key, 1)
    tx = make_optimizer(**setting)
    state = TrainState.create(model, tx, key, input_shape, ema=ema, loss_scale=loss_scale)
    if init_scale is not None:
        params = scale_init(state.params, init_scale)
        state = state.replace(
            params=params,
            opt_state=tx.init(params),
            ema_params=None if ema is None else jax.tree.map(jnp.copy, params),
        )
    if initial_loss_scale is not None:
        state = state.replace(
            loss_scale=state.loss_scale.replace(scale=jnp.asarray(initial_loss_scale, jnp.float32))
        )
    return tx, state, ema


@functools.partial(
    jax.jit,
    static_argnames=(
        "loss_fn",
        "make_optimizer",
        "model",
        "input_shape",
        "names",
        "chunk_size",
        "return_state",
        "options",
    ),
)
def _run(
    seeds,
    table,
    batches,
    eval_batch,
    *,
    loss_fn,
    make_optimizer,
    model,
    input_shape,
    names,
    chunk_size,
    return_state,
    options,
):
    pass_key = _accepts_key(make_optimizer)
    precision, loss_scale, ema = options.precision, options.loss_scale, options.ema
    evaluate = None if eval_batch is None else make_eval_step(loss_fn, precision=precision)
    evaluate_ema = (
        None
        if eval_batch is None or (ema is None and EMA not in names)
        else make_eval_step(loss_fn, precision=precision, use_ema=True)
    )

    def one(args):
        seed, values = args
        tx, state, decay = _init_run(
            model, input_shape, make_optimizer, pass_key, names, seed, values, ema, loss_scale
        )
        loop = make_train_loop(loss_fn, tx, options=options.replace(ema=decay))
        state, metrics = loop(state, batches)
        out = dict(metrics)
        out.update({f"final_{k}": v[-1] for k, v in metrics.items()})
        if evaluate is not None:
            out.update({f"eval_{k}": v for k, v in evaluate(state, eval_batch).items()})
        if evaluate_ema is not None:
            out.update({f"ema_eval_{k}": v for k, v in evaluate_ema(state, eval_batch).items()})
        if return_state:
            out["state"] = state
        return out

    if chunk_size >= seeds.shape[0]:
        return jax.vmap(one)((seeds, table))
    return jax.lax.map(one, (seeds, table), batch_size=chunk_size)


def sweep(
    loss_fn,
    make_optimizer: Callable[..., Any],
    model,
    input_shape: Sequence[int],
    batches,
    *,
    seeds=(0,),
    hparams: Mapping[str, Any] | None = None,
    eval_batch=None,
    chunk_size: int | None = None,
    return_state: bool = False,
    options: StepOptions | None = None,
    skip_nonfinite: bool = True,
    precision=None,
    micro_batches: int = 1,
    loss_scale=None,
    ema=None,
) -> dict[str, Any]:
    """Train every (seed, setting) run of one model in one compiled, vmapped call.

    ``loss_fn``: the train step's loss (`jaxdl.train_step.supervised_loss`); ``model`` and
    ``input_shape`` (one example) build each run's `TrainState`. ``make_optimizer(**setting)``
    returns the optax transformation for one setting, whose values arrive as traced float32
    scalars (``lambda lr, momentum: dl.sgd(lr, momentum)``); if it has a ``key`` parameter it
    also gets a per-run PRNG key, ``fold_in(key(seed), 1)``, e.g. for
    ``add_noise(eta, key=key)``. ``batches`` stacks the K training batches (leading axis K),
    shared by all runs. ``hparams`` maps names to scalars or 1-D arrays of one length H (zipped;
    `grid` builds products); ``init_scale`` is reserved: it multiplies the initial kernels
    (`scale_init`) instead of going to ``make_optimizer``; ``ema`` sweeps the EMA decay and
    ``loss_scale`` the initial loss scale (one compilation for every value). ``seeds``: an int or
    S ints. ``skip_nonfinite``, ``precision``, ``micro_batches``, ``loss_scale`` (needed to sweep
    its initial value) and ``ema`` are the train loop's options (`jaxdl.train_step.make_train_loop`),
    the same for every run; ``options=StepOptions(...)`` gives them as one object.

    Runs are seeds x settings, seed major (run ``r = s*H + h``), R = S*H. Returns a dict of
    numpy arrays with a leading run axis:

    - ``seed`` (R,) and every hyperparameter (R,): what run r used (a swept ``loss_scale`` replaces
      the step metric of that name; ``final_loss_scale`` remains);
    - every step metric of `make_train_loop` (``loss``, ``grad_norm``, ``update_ratio``,
      ``nonfinite``, ``accuracy``, ...) as a curve (R, K), and its last value ``final_<name>`` (R,);
    - with ``eval_batch``: ``eval_<name>`` (R,) from `make_eval_step` after training, and with an
      EMA ``ema_eval_<name>`` (R,) of the averaged weights;
    - with ``return_state``: ``state``, the final `TrainState` of every run (leading axis R).

    ``chunk_size`` vmaps that many runs at a time (``lax.map(..., batch_size=chunk_size)``) to
    bound memory; the default runs all R at once. Recompiles only when the static configuration
    (loss, ``make_optimizer`` object, model, names, R, K and batch shapes) changes, never for
    new hyperparameter values or seeds; ``loss_fn``, ``make_optimizer`` and ``model`` are
    static, so they must be hashable (jaxdl layers and `supervised_loss` are), and a new
    ``lambda`` per call is a new configuration: define ``make_optimizer`` once. Run r equals the
    single run spelled out in the module docstring to float rounding.

    Args:
      loss_fn: the train step's loss.
      make_optimizer: ``(**setting[, key]) -> GradientTransformation``.
      model, input_shape: build each run's `TrainState`.
      batches: the K stacked training batches.
      seeds: an int or S ints.
      hparams: names -> scalars or 1-D arrays of one length H.
      eval_batch, chunk_size, return_state, options: as above.

    Returns:
      A dict of numpy arrays with a leading run axis R = S*H (above).

    >>> import jax.numpy as jnp
    >>> import jaxdl as dl
    >>> model = dl.layers.Dense(2)
    >>> batches = (jnp.ones((3, 4, 2)), jnp.zeros((3, 4), jnp.int32))  # K = 3 batches of 4
    >>> make_sgd = lambda lr: dl.sgd(lr)
    >>> out = sweep(dl.supervised_loss(model), make_sgd, model, (2,), batches,
    ...             seeds=(0, 1), hparams={"lr": [0.01, 0.1]})
    >>> out["seed"].tolist(), out["lr"].astype(float).round(4).tolist(), out["loss"].shape
    ([0, 0, 1, 1], [0.01, 0.1, 0.01, 0.1], (4, 3))
    """
    model = as_layer("sweep", model)
    names, table = _settings(hparams)
    seed_arr = _seeds(seeds)
    s, h = seed_arr.size, table.shape[0]
    run_seeds = np.repeat(seed_arr, h)
    run_table = np.tile(table, (s, 1))
    check_int("sweep", "chunk_size", chunk_size, allow_none=True)
    if not callable(make_optimizer):
        raise TypeError(
            f"sweep: make_optimizer must be callable (**hparams) -> optimizer, got {make_optimizer!r}"
        )
    options = resolve_options(
        "sweep",
        options,
        skip_nonfinite=skip_nonfinite,
        precision=precision,
        micro_batches=micro_batches,
        loss_scale=loss_scale,
        ema=ema,
    )
    if options.donate:
        raise ValueError("sweep: options.donate=True, but a sweep builds its states itself and keeps none")
    if options.ema is not None:
        options = options.replace(ema=float(options.ema))  # a static argument: hashable
    if EMA in names:
        check_number("sweep", "hparams['ema']", table[:, names.index(EMA)], low=0, high=1, high_open=True)
    if LOSS_SCALE in names:
        if options.loss_scale is None:
            raise ValueError(
                "sweep: hparams['loss_scale'] sweeps the initial loss scale; pass "
                "loss_scale='dynamic' or a number to choose the rule"
            )
        check_number(
            "sweep", "hparams['loss_scale']", table[:, names.index(LOSS_SCALE)], low=0, low_open=True
        )
    out = _run(
        jnp.asarray(run_seeds),
        jnp.asarray(run_table),
        batches,
        eval_batch,
        loss_fn=loss_fn,
        make_optimizer=make_optimizer,
        model=model,
        input_shape=tuple(int(d) for d in input_shape),
        names=names,
        chunk_size=min(chunk_size or s * h, s * h),
        return_state=bool(return_state),
        options=options,
    )
    state = out.pop("state", None)
    result = {"seed": run_seeds}
    result.update(jax.device_get(out))
    result.update({n: run_table[:, i] for i, n in enumerate(names)})  # a swept loss_scale: the setting
    if state is not None:
        result["state"] = state
    return result


# ----------------------------------------------------------------------------- coarse to fine


class SearchResult(NamedTuple):
    """What `coarse_to_fine` tried.

    ``stages``: one structured numpy array per stage, a row per sampled setting, with a float
    field per hyperparameter, ``score`` (mean over seeds; NaN for diverged runs) and ``kept``
    (chosen to define the next stage's range). ``ranges``: the ``{name: (low, high)}`` each stage
    sampled from. ``best``: the best row of all stages as a dict (names and ``score``).
    """

    stages: list
    ranges: list
    best: dict


def _parse_ranges(ranges: Mapping[str, Any]) -> dict[str, tuple[float, float, bool]]:
    if not isinstance(ranges, Mapping) or not ranges:
        raise ValueError(
            "coarse_to_fine: ranges must be a non-empty dict name -> (low, high[, 'log'|'linear'])"
        )
    out = {}
    for name, spec in ranges.items():
        spec = tuple(spec)
        if len(spec) not in (2, 3) or (len(spec) == 3 and spec[2] not in ("log", "linear")):
            raise ValueError(
                f"coarse_to_fine: ranges[{name!r}]={spec!r}; expected (low, high) or "
                "(low, high, 'log' | 'linear')"
            )
        low, high = float(spec[0]), float(spec[1])
        log = len(spec) == 2 or spec[2] == "log"
        if not (math.isfinite(low) and math.isfinite(high) and low <= high) or (log and low <= 0):
            raise ValueError(
                f"coarse_to_fine: ranges[{name!r}]=({low!r}, {high!r}); expected finite "
                f"low <= high{' and low > 0 for a log range' if log else ''}"
            )
        out[name] = (low, high, log)
    return out


def coarse_to_fine(
    loss_fn,
    make_optimizer: Callable[..., Any],
    model,
    input_shape: Sequence[int],
    batches,
    *,
    ranges: Mapping[str, Any],
    stages: int = 3,
    num_samples: int = 16,
    keep: float = 0.25,
    seeds=(0,),
    fixed: Mapping[str, float] | None = None,
    eval_batch=None,
    score: str | None = None,
    maximize: bool = False,
    key: int = 0,
    chunk_size: int | None = None,
) -> SearchResult:
    """Coarse-to-fine random search: sample, keep the best, narrow the ranges, repeat.

    Stage 1 samples ``num_samples`` settings, each hyperparameter independently and
    log-uniformly from its range, ``x = exp(U(ln low, ln high))`` (``(low, high, "linear")``:
    uniformly), and trains them all in one `sweep` (with every seed in ``seeds``). The settings
    are ranked by ``score`` averaged over seeds (default ``eval_loss`` with an ``eval_batch``,
    else ``final_loss``; lower is better unless ``maximize``; NaN ranks last); the best
    ``ceil(keep * num_samples)`` are kept, and each range narrows to the span of the kept values.
    Repeat for ``stages`` stages. ``batches`` is the stacked training block of every stage, or a
    callable ``stage -> batches`` (Sarkar, CS60010: a few epochs first, longer runs later). ``fixed``
    hyperparameters are passed unchanged to every run. Stages of equal shapes share one
    compilation. Sampling uses ``numpy.random.default_rng(key)``.

    Args:
      loss_fn, make_optimizer, model, input_shape, batches, seeds, eval_batch, chunk_size: as in
        `sweep`.
      ranges: name -> ``(low, high)`` or ``(low, high, "linear")``.
      stages, num_samples, keep: the search's shape (above).
      fixed: hyperparameters passed unchanged.
      score, maximize: the ranking (above).
      key: the sampling key.

    Returns:
      A `SearchResult` ``(stages, ranges, best)``.

    Source: Sarkar, CS60010 (coarse-to-fine cross-validation); Bergstra & Bengio 2012.
    """
    spec = _parse_ranges(ranges)
    if isinstance(stages, bool) or not isinstance(stages, int) or stages < 1:
        raise ValueError(f"coarse_to_fine: stages={stages!r}; expected an int >= 1")
    if isinstance(num_samples, bool) or not isinstance(num_samples, int) or num_samples < 1:
        raise ValueError(f"coarse_to_fine: num_samples={num_samples!r}; expected an int >= 1")
    if not 0 < keep <= 1:
        raise ValueError(f"coarse_to_fine: keep={keep!r}; expected 0 < keep <= 1 (a fraction)")
    fixed = dict(fixed or {})
    clash = set(fixed) & set(spec)
    if clash:
        raise ValueError(f"coarse_to_fine: {sorted(clash)} are both searched and fixed")
    score = score or ("eval_loss" if eval_batch is not None else "final_loss")
    rng = np.random.default_rng(key)
    n_keep = max(1, math.ceil(keep * num_samples))
    names = list(spec)
    dtype = [(n, "f8") for n in names] + [("score", "f8"), ("kept", "?")]
    tables, used_ranges, current = [], [], dict(spec)
    for stage in range(stages):
        used_ranges.append({n: (lo, hi) for n, (lo, hi, _) in current.items()})
        samples = {}
        for n, (lo, hi, log) in current.items():
            u = rng.uniform(size=num_samples)
            samples[n] = np.exp(np.log(lo) + u * (np.log(hi) - np.log(lo))) if log else lo + u * (hi - lo)
        stage_batches = batches(stage) if callable(batches) else batches
        res = sweep(
            loss_fn,
            make_optimizer,
            model,
            input_shape,
            stage_batches,
            seeds=seeds,
            hparams={**samples, **fixed},
            eval_batch=eval_batch,
            chunk_size=chunk_size,
        )
        if score not in res:
            raise KeyError(
                f"coarse_to_fine: score {score!r} is not among the sweep's outputs "
                f"{sorted(k for k in res if k != 'state')}"
            )
        per_run = np.asarray(res[score], np.float64).reshape(-1, num_samples)  # (S, H)
        scores = per_run.mean(axis=0)
        rank_key = np.where(np.isfinite(scores), -scores if maximize else scores, np.inf)
        kept = np.zeros(num_samples, bool)
        kept[np.argsort(rank_key, kind="stable")[:n_keep]] = True
        table = np.zeros(num_samples, dtype)
        for n in names:
            table[n] = samples[n].astype(np.float32)  # the values the runs actually used
        table["score"], table["kept"] = scores, kept
        tables.append(table)
        current = {
            n: (float(table[n][kept].min()), float(table[n][kept].max()), log)
            for n, (_, _, log) in current.items()
        }
    rows = np.concatenate(tables)
    finite = np.isfinite(rows["score"])
    if not finite.any():
        best = {n: float("nan") for n in names} | {"score": float("nan")}
    else:
        vals = np.where(finite, -rows["score"] if maximize else rows["score"], np.inf)
        row = rows[int(np.argmin(vals))]
        best = {n: float(row[n]) for n in names} | {"score": float(row["score"])}
    return SearchResult(tables, used_ranges, best)
