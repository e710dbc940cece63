"""Gradient transformations on optax's protocol.

Each constructor returns an ``optax.GradientTransformation(init, update)``:
``init(params) -> state`` and ``update(updates, state, params=None) -> (updates, state)``.
They compose with each other through `chain` and with optax's own transforms (either way round),
and work under `jax.jit`, `jax.vmap` and `lax.scan` on any pytree of float arrays.

Notation of the docstrings: ``g`` is the incoming update of one leaf, ``u`` the outgoing one,
``t`` the step count starting at 0. Constructors check their hyperparameters and raise
`ValueError` naming the argument, its value and the allowed range; stateful transforms check
at trace time that ``update`` gets a tree of the structure and shapes that ``init`` saw.
Hyperparameters may also be (traced) arrays, so a vmapped sweep can vary them.
"""

from __future__ import annotations

from typing import Any, Callable, NamedTuple, Union

import jax
import jax.numpy as jnp
import numpy as np
import optax

from jaxdl._checks import (
    as_key,
    check_float_params,
    check_int,
    check_number,
    check_scalar,
    check_schedule,
    check_transform,
    check_tree_match,
)
from jaxdl._tree import select as select_tree

__all__ = [
    "chain",
    "identity",
    "scale",
    "scale_by_learning_rate",
    "momentum",
    "nesterov",
    "scale_by_adagrad",
    "scale_by_rms",
    "scale_by_adam",
    "clip",
    "clip_by_global_norm",
    "sign",
    "sign_with_error_feedback",
    "add_noise",
    "add_weight_decay",
    "skip_nonfinite",
    "masked",
    "freeze",
    "global_norm",
    "orthogonalize",
    "scale_by_muon",
    "decay_mask",
    "partition",
    "schedule_free",
    "schedule_free_eval_params",
    "schedule_free_restart",
    "MUON_NS_COEFFICIENTS",
    "MuonState",
    "ScheduleFreeState",
    "MomentumState",
    "AdagradState",
    "RmsState",
    "AdamState",
    "ScheduleState",
    "ErrorFeedbackState",
    "NoiseState",
    "SkipNonfiniteState",
]

GradientTransformation = optax.GradientTransformation
ScalarOrSchedule = Union[float, jax.Array, Callable[[jax.Array], jax.Array]]
Mask = Union[Any, Callable[[Any], Any]]


class MomentumState(NamedTuple):
    velocity: Any


class AdagradState(NamedTuple):
    sum_of_squares: Any


class RmsState(NamedTuple):
    mean_square: Any
    mean_grad: Any  # None unless centered


class AdamState(NamedTuple):
    count: jax.Array
    mu: Any
    nu: Any


class ScheduleState(NamedTuple):
    count: jax.Array


class ErrorFeedbackState(NamedTuple):
    error: Any


class NoiseState(NamedTuple):
    count: jax.Array
    key: jax.Array


class SkipNonfiniteState(NamedTuple):
    inner_state: Any
    skipped: jax.Array  # total number of steps skipped so far
    last_finite: jax.Array  # whether the latest step was applied


def _zeros_like(tree):
    return jax.tree.map(jnp.zeros_like, tree)


def _count0():
    return jnp.zeros([], jnp.int32)


def _cast_like(tree, like):
    return jax.tree.map(lambda x, y: x.astype(y.dtype), tree, like)


def _real_dtype(dtype):
    """The real counterpart of a complex dtype (float32 for complex64); real dtypes unchanged."""
    return jnp.finfo(dtype).dtype


def _abs_sq(x: jax.Array) -> jax.Array:
    """``|x|^2 = x * conj(x)``, real (optax's ``numerics.abs_sq``); ``x * x`` for real ``x``."""
    return (x * jnp.conj(x)).real if jnp.iscomplexobj(x) else x * x


def _check_real(owner: str, tree, why: str) -> None:
    """Raise ValueError (at trace time) naming the first complex leaf of `tree`."""
    for path, x in jax.tree_util.tree_flatten_with_path(tree)[0]:
        if jnp.iscomplexobj(x):
            raise ValueError(
                f"{owner}: leaf {jax.tree_util.keystr(path) or '<root>'} is complex ({x.dtype}); {why}"
            )


def _check_dtype(owner: str, name: str, dtype: Any):
    """``dtype`` canonicalized (float64 -> float32 without x64), or None; raise unless a real float."""
    if dtype is None:
        return None
    try:
        dt = jnp.dtype(dtype)
    except TypeError:
        dt = None
    if dt is None or not jnp.issubdtype(dt, jnp.floating):
        shown = dtype.__name__ if isinstance(dtype, type) else repr(dtype)
        raise ValueError(
            f"{owner}: {name}={shown} is not allowed; expected None or a real floating dtype "
            f"such as jnp.float32 or jnp.bfloat16"
        )
    return jax.dtypes.canonicalize_dtype(dt)


def _map_unzip(fn, n: int, tree, *rest):
    """``jax.tree.map`` for an ``fn`` returning ``n`` arrays per leaf: ``n`` trees like ``tree``."""
    leaves, treedef = jax.tree.flatten(tree)
    others = [treedef.flatten_up_to(r) for r in rest]
    outs = [fn(*args) for args in zip(leaves, *others)]
    return tuple(treedef.unflatten([o[i] for o in outs]) for i in range(n))


def global_norm(tree) -> jax.Array:
    """``sqrt(sum over leaves of sum |g|^2)``, accumulated in float32 at least.

    For complex leaves ``|g|^2 = g conj(g)``, as ``optax.global_norm``.

    Args:
      tree: a pytree of arrays (real or complex).

    Returns:
      The scalar norm, float32 or wider.

    >>> import jax.numpy as jnp
    >>> float(global_norm({"a": jnp.array([3.0]), "b": jnp.array([4.0])}))
    5.0
    """
    leaves = jax.tree.leaves(tree)
    if not leaves:
        return jnp.zeros([], jnp.float32)
    sq = [jnp.sum(_abs_sq(x.astype(jnp.promote_types(x.dtype, jnp.float32)))) for x in leaves]
    return jnp.sqrt(sum(sq))


def chain(*transforms: GradientTransformation) -> GradientTransformation:
    """Apply ``transforms`` left to right; the state is the tuple of their states.

    ``u = t_n(...t_2(t_1(g)))``. Accepts jaxdl and optax transforms alike (it is
    ``optax.chain`` after a type check).

    Args:
      *transforms: ``GradientTransformation`` s, applied in order.

    Returns:
      One ``GradientTransformation``.

    >>> import jax.numpy as jnp
    >>> opt = chain(clip(1.0), scale_by_learning_rate(0.1))  # clip elementwise, then -0.1 g
    >>> g = {"w": jnp.array([3.0, -0.5])}
    >>> updates, state = opt.update(g, opt.init(g))
    >>> [round(v, 4) for v in updates["w"].tolist()]
    [-0.1, 0.05]
    """
    for i, tx in enumerate(transforms):
        check_transform("chain", f"argument {i}", tx)
    return optax.chain(*transforms)


def identity() -> GradientTransformation:
    """``u = g``.

    Returns:
      A ``GradientTransformation``.
    """
    return optax.identity()


def scale(factor: float) -> GradientTransformation:
    """``u = factor * g``.

    Args:
      factor: the constant multiplier.

    Returns:
      A ``GradientTransformation``.
    """
    check_number("scale", "factor", factor)

    def update(updates, state, params=None):
        del params
        return jax.tree.map(lambda g: (factor * g).astype(g.dtype), updates), state

    return GradientTransformation(lambda params: optax.EmptyState(), update)


def scale_by_learning_rate(lr: ScalarOrSchedule) -> GradientTransformation:
    """``u = -lr(t) * g``: gradient *descent* with a constant or scheduled step size.

    ``lr`` is a scalar >= 0 (a number, or a 0-d array, concrete or traced as in a vmapped sweep),
    or a schedule ``t -> lr`` (see `jaxdl.schedules`); with a schedule the state holds the step
    count ``t``. A non-scalar ``lr`` is refused (at construction, or at trace time for a schedule's
    output), as ``torch.optim`` does: it would silently scale each column by its own rate. So is
    a negative or non-finite one, a schedule's too: its value at step 0 and, for jaxdl's
    schedules, its end value are checked at construction (`jaxdl._checks.check_schedule`; traced
    values pass). ``init`` refuses integer or boolean params (`jaxdl._checks.check_float_params`).

    Args:
      lr: a number or 0-d array >= 0, or a schedule ``t -> lr``.

    Returns:
      A ``GradientTransformation``.
    """
    if not callable(lr):
        check_scalar("scale_by_learning_rate", "lr", lr)
        check_number("scale_by_learning_rate", "lr", lr, low=0.0)

        def init_const(params):
            check_float_params("scale_by_learning_rate", params)
            return optax.EmptyState()

        def update_const(updates, state, params=None):
            del params
            return jax.tree.map(lambda g: (-lr * g).astype(g.dtype), updates), state

        return GradientTransformation(init_const, update_const)
    check_schedule("scale_by_learning_rate", "lr", lr)

    def init(params):
        check_float_params("scale_by_learning_rate", params)
        return ScheduleState(count=_count0())

    def update(updates, state, params=None):
        del params
        step_size = -lr(state.count)
        if jnp.shape(step_size) != ():
            raise ValueError(
                f"scale_by_learning_rate: the schedule returned lr of shape {jnp.shape(step_size)}; "
                "expected a scalar"
            )
        new = jax.tree.map(lambda g: (step_size * g).astype(g.dtype), updates)
        return new, ScheduleState(count=optax.safe_increment(state.count))

    return GradientTransformation(init, update)


def momentum(decay: float = 0.9, nesterov: bool = False) -> GradientTransformation:
    """Heavy-ball momentum, or Nesterov's in its standard reformulation.

    .. math:: v \\leftarrow \\mu v + g, \\qquad u = v \\;\\text{or}\\; u = g + \\mu v

    Followed by ``scale_by_learning_rate(lr)`` this is CSE 176 Lecture 11's ``v <- a v - eps g,
    theta <- theta + v`` with v rescaled by 1/eps, and exactly ``torch.optim.SGD(momentum=mu,
    nesterov=...)`` (dampening 0). Equals ``optax.trace(decay, nesterov)``, complex leaves included.

    Args:
      decay: ``mu`` in [0, 1).
      nesterov: Nesterov's form ``u = g + mu v``.

    Returns:
      A ``GradientTransformation``.

    Source: CSE 176 Lecture 11 (heavy ball); Sarkar, CS60010 (Nesterov).
    """
    check_number("momentum", "decay", decay, low=0.0, high=1.0, high_open=True)
    if not isinstance(nesterov, bool):
        raise TypeError(f"momentum: nesterov must be a bool, got {nesterov!r}")

    def init(params):
        check_float_params("momentum", params)
        return MomentumState(velocity=_zeros_like(params))

    def update(updates, state, params=None):
        del params
        check_tree_match("momentum", state.velocity, updates)
        velocity = jax.tree.map(lambda g, v: (decay * v + g).astype(v.dtype), updates, state.velocity)
        if nesterov:
            out = jax.tree.map(lambda g, v: (g + decay * v).astype(g.dtype), updates, velocity)
        else:
            out = _cast_like(velocity, updates)
        return out, MomentumState(velocity=velocity)

    return GradientTransformation(init, update)


def nesterov(decay: float = 0.9) -> GradientTransformation:
    """Nesterov momentum: ``momentum(decay, nesterov=True)``.

    The lecture (Sarkar, CS60010) evaluates the gradient at the look-ahead point ``theta + a v``;
    with the change of variable ``theta' = theta + a v`` (Sutskever et al. 2013; Bengio et al. 2013) that becomes
    ``v <- a v + g, u = g + a v``, which needs only the gradient at the current parameters.

    Args:
      decay: ``mu`` in [0, 1).

    Returns:
      A ``GradientTransformation``.

    Source: Sarkar, CS60010; Sutskever et al. 2013; Bengio et al. 2013.
    """
    return momentum(decay, nesterov=True)


def scale_by_adagrad(eps: float = 1e-7, initial_accumulator: float = 0.0) -> GradientTransformation:
    """AdaGrad's scaling by the root of the summed squared gradients, delta outside the root.

    .. math:: r \\leftarrow r + g \\odot g, \\qquad u = g / (\\delta + \\sqrt{r})

    Same as ``torch.optim.Adagrad`` (whose ``eps`` also sits outside the root; its default is
    1e-10, ours is the lecture's 1e-7). optax's ``adagrad`` starts ``r`` at 0.1 and puts eps
    inside the root; ours starts at ``initial_accumulator`` = 0.

    Complex parameters: ``g * g`` is ``|g|^2 = g * conj(g)``, real, and ``r`` is stored in the
    real dtype (float32 for complex64), as in ``optax.scale_by_rss``. (``torch.optim`` instead
    treats the real and imaginary parts as two separate parameters.)

    Args:
      eps: ``delta`` > 0, outside the root.
      initial_accumulator: the starting value of ``r`` (>= 0).

    Returns:
      A ``GradientTransformation``.

    Source: Duchi et al. 2011; CSE 176 Lecture 11.
    """
    check_number("scale_by_adagrad", "eps", eps, low=0.0, low_open=True)
    check_number("scale_by_adagrad", "initial_accumulator", initial_accumulator, low=0.0)

    def init(params):
        check_float_params("scale_by_adagrad", params)
        return AdagradState(
            sum_of_squares=jax.tree.map(
                lambda p: jnp.full_like(p, initial_accumulator, dtype=_real_dtype(p.dtype)), params
            )
        )

    def update(updates, state, params=None):
        del params
        check_tree_match("scale_by_adagrad", state.sum_of_squares, updates)
        r = jax.tree.map(lambda g, r: (r + _abs_sq(g)).astype(r.dtype), updates, state.sum_of_squares)
        out = jax.tree.map(lambda g, r: (g / (eps + jnp.sqrt(r))).astype(g.dtype), updates, r)
        return out, AdagradState(sum_of_squares=r)

    return GradientTransformation(init, update)


def scale_by_rms(decay: float = 0.9, eps: float = 1e-8, centered: bool = False) -> GradientTransformation:
    """RMSProp's scaling by a running root mean square, eps outside the root as in PyTorch.

    .. math:: s \\leftarrow \\rho s + (1-\\rho) g^2, \\qquad u = g / (\\sqrt{s} + \\epsilon)

    ``centered`` also tracks ``m <- rho m + (1-rho) g`` and uses ``sqrt(s - m^2) + eps``
    (Graves 2013). This is ``torch.optim.RMSprop(alpha=decay)``; optax's ``scale_by_rms`` puts
    eps inside the root (``1/sqrt(s + eps)``) by default; ours equals its
    ``scale_by_rms(decay, eps, initial_scale=0, eps_in_sqrt=False)`` and, centered,
    ``scale_by_stddev(decay, eps, eps_in_sqrt=False)``.

    Complex parameters follow optax: ``g^2`` is ``|g|^2 = g * conj(g)`` (``s`` is real and stored in
    the real dtype), ``m`` stays complex and the centered root is ``sqrt(s - |m|^2)``.

    Args:
      decay: ``rho``.
      eps: ``epsilon``, outside the root.
      centered: divide by the root of ``s - m^2`` (Graves 2013).

    Returns:
      A ``GradientTransformation``.

    Source: Tieleman & Hinton 2012; Graves 2013; Sarkar, CS60010.
    """
    check_number("scale_by_rms", "decay", decay, low=0.0, high=1.0, high_open=True)
    check_number("scale_by_rms", "eps", eps, low=0.0, low_open=True)

    def init(params):
        check_float_params("scale_by_rms", params)
        mean_square = jax.tree.map(lambda p: jnp.zeros_like(p, dtype=_real_dtype(p.dtype)), params)
        return RmsState(mean_square=mean_square, mean_grad=_zeros_like(params) if centered else None)

    def update(updates, state, params=None):
        del params
        check_tree_match("scale_by_rms", state.mean_square, updates)
        ema = lambda x, s: (decay * s + (1.0 - decay) * x).astype(s.dtype)  # noqa: E731
        s = jax.tree.map(lambda g, s: ema(_abs_sq(g), s), updates, state.mean_square)
        if centered:
            m = jax.tree.map(ema, updates, state.mean_grad)
            denom = jax.tree.map(lambda s, m: jnp.sqrt(s - _abs_sq(m)) + eps, s, m)
        else:
            m = None
            denom = jax.tree.map(lambda s: jnp.sqrt(s) + eps, s)
        out = jax.tree.map(lambda g, d: (g / d).astype(g.dtype), updates, denom)
        return out, RmsState(mean_square=s, mean_grad=m)

    return GradientTransformation(init, update)


def scale_by_adam(
    b1: float = 0.9,
    b2: float = 0.999,
    eps: float = 1e-8,
    *,
    mu_dtype: Any = None,
    nu_dtype: Any = None,
) -> GradientTransformation:
    """Adam's scaling: bias-corrected first moment over the root of the second.

    .. math::
        m \\leftarrow \\beta_1 m + (1-\\beta_1) g, \\quad v \\leftarrow \\beta_2 v + (1-\\beta_2) |g|^2,
        \\quad u = \\frac{m / (1-\\beta_1^{t+1})}{\\sqrt{v / (1-\\beta_2^{t+1})} + \\epsilon}

    Same numbers as ``optax.scale_by_adam`` and ``torch.optim.Adam``. The state is optax's
    ``(count, mu, nu)``.

    ``mu_dtype`` / ``nu_dtype`` (e.g. ``jnp.bfloat16``) set the dtype ``m`` / ``v`` are stored in;
    None keeps each parameter's dtype. The arithmetic runs in at least float32 whatever the
    storage: moments are cast up when read and rounded to their dtype when written, and this
    step's update uses the unrounded values. With bfloat16 moments the state takes half the
    memory and the updates differ from a float32 run by the rounding of the carried moments
    (2^-9 relative per write; a few bfloat16 ulps of ``lr`` after 20 steps, tested).
    ``optax.scale_by_adam(mu_dtype=...)`` has the same state, but computes ``b1 * m`` in the
    storage dtype before promoting, so its numbers differ from ours by bfloat16 rounding (ours
    are nearer the float32 run); optax has no ``nu_dtype`` (its ``nu`` follows the params).
    bfloat16 storage saves memory, not time, on XLA:CPU: the update is slower than with float32
    moments (element-wise converts; figures in benchmarks/RESULTS.md).

    Complex parameters follow optax (``torch.optim.Adam`` instead treats the real and imaginary
    parts as separate parameters): ``|g|^2 = g * conj(g)``, so ``v`` is real and stored in the
    real dtype (float32 for complex64), while ``m`` stays complex. ``mu_dtype`` must then be None.

    Args:
      b1, b2: decays ``beta_1``, ``beta_2`` of the two moments.
      eps: ``epsilon``, outside the root.
      mu_dtype, nu_dtype: storage dtypes of ``m`` and ``v`` (None: the params').

    Returns:
      A ``GradientTransformation``. Its state is optax's ``ScaleByAdamState(count, mu, nu)``.

    Source: Kingma & Ba 2015; Tips and Tricks notes; Sarkar, CS60010.
    """
    check_number("scale_by_adam", "b1", b1, low=0.0, high=1.0, high_open=True)
    check_number("scale_by_adam", "b2", b2, low=0.0, high=1.0, high_open=True)
    check_number("scale_by_adam", "eps", eps, low=0.0, low_open=True)
    mu_dtype = _check_dtype("scale_by_adam", "mu_dtype", mu_dtype)
    nu_dtype = _check_dtype("scale_by_adam", "nu_dtype", nu_dtype)

    def init(params):
        check_float_params("scale_by_adam", params)
        if mu_dtype is not None:
            _check_real(
                "scale_by_adam",
                params,
                f"mu_dtype={jnp.dtype(mu_dtype).name} cannot hold a complex first moment; use mu_dtype=None",
            )
        mu = jax.tree.map(lambda p: jnp.zeros_like(p, dtype=mu_dtype), params)
        nu = jax.tree.map(
            lambda p: jnp.zeros_like(p, dtype=_real_dtype(p.dtype) if nu_dtype is None else nu_dtype), params
        )
        return AdamState(count=_count0(), mu=mu, nu=nu)

    def update(updates, state, params=None):
        del params
        check_tree_match("scale_by_adam", state.mu, updates)
        count = optax.safe_increment(state.count)
        t = count.astype(jnp.result_type(float))  # bias corrections in float32 (float64 with x64)
        bc1, bc2 = 1.0 - b1**t, 1.0 - b2**t

        def leaf(g, m, v):
            ct = jnp.result_type(g.dtype, m.dtype, jnp.float32)  # computed in float32 at least
            m32 = b1 * m.astype(ct) + (1.0 - b1) * g.astype(ct)
            v32 = b2 * v.astype(_real_dtype(ct)) + (1.0 - b2) * _abs_sq(g.astype(ct))
            u = (m32 / bc1) / (jnp.sqrt(v32 / bc2) + eps)
            return u.astype(g.dtype), m32.astype(m.dtype), v32.astype(v.dtype)

        u, mu, nu = _map_unzip(leaf, 3, updates, state.mu, state.nu)
        return u, AdamState(count=count, mu=mu, nu=nu)

    return GradientTransformation(init, update)


def clip(max_abs: float) -> GradientTransformation:
    """Elementwise clipping: ``u = min(g_max, max(-g_max, g))``, so ``|u| <= g_max``.

    Equals ``optax.clip(max_abs)``. Complex updates are refused (ValueError naming the leaf, at
    trace time): complex numbers have no order, and optax's ``clip`` fails on them too; use
    `clip_by_global_norm`, which is defined for them.

    Args:
      max_abs: ``g_max`` >= 0.

    Returns:
      A ``GradientTransformation``.

    Source: Sarkar, CS60010 (gradient clipping).

    >>> import jax.numpy as jnp
    >>> u, _ = clip(1.0).update({"w": jnp.array([3.0, -0.5, -2.0])}, None)
    >>> u["w"].tolist()
    [1.0, -0.5, -1.0]
    """
    check_number("clip", "max_abs", max_abs, low=0.0, low_open=True)

    def update(updates, state, params=None):
        del params
        _check_real(
            "clip",
            updates,
            "expected real updates (complex numbers have no order); "
            "use clip_by_global_norm for complex parameters",
        )
        return jax.tree.map(lambda g: jnp.clip(g, -max_abs, max_abs).astype(g.dtype), updates), state

    return GradientTransformation(lambda params: optax.EmptyState(), update)


def clip_by_global_norm(max_norm: float) -> GradientTransformation:
    """Rescale the whole update so its norm is at most ``max_norm``.

    .. math:: u = g \\cdot \\min(1, \\text{max\\_norm} / \\lVert g \\rVert_2),
              \\quad \\lVert g \\rVert_2 = \\sqrt{\\textstyle\\sum_{\\text{leaves}} \\sum |g|^2}

    Equals ``optax.clip_by_global_norm``, complex leaves included (``|g|^2 = g * conj(g)``).

    Args:
      max_norm: the largest norm of the update (> 0).

    Returns:
      A ``GradientTransformation``.

    Source: Pascanu et al. 2013; Sarkar, CS60010 (gradient clipping).
    """
    check_number("clip_by_global_norm", "max_norm", max_norm, low=0.0, low_open=True)

    def update(updates, state, params=None):
        del params
        norm = global_norm(updates)
        factor = jnp.minimum(1.0, max_norm / jnp.maximum(norm, jnp.finfo(jnp.float32).tiny))
        return jax.tree.map(lambda g: (g * factor).astype(g.dtype), updates), state

    return GradientTransformation(lambda params: optax.EmptyState(), update)


def sign(scale: float = 1.0) -> GradientTransformation:
    """One-bit gradients, "extreme clipping": the sign of each coordinate.

    .. math:: u = s \\cdot \\operatorname{sign}(g)

    With ``s = 1`` equals ``optax.scale_by_sign()``. ``sign(0) = 0``. For complex ``g`` it is
    ``jnp.sign``'s ``g / |g|`` (the unit phase), as in optax.

    Args:
      scale: ``s``, the step of each coordinate.

    Returns:
      A ``GradientTransformation``.

    Source: Seide et al. 2014; Bernstein et al. 2018; Sarkar, CS60010 (one-bit gradients).
    """
    check_number("sign", "scale", scale, low=0.0, low_open=True)

    def update(updates, state, params=None):
        del params
        return jax.tree.map(lambda g: (scale * jnp.sign(g)).astype(g.dtype), updates), state

    return GradientTransformation(lambda params: optax.EmptyState(), update)


def sign_with_error_feedback() -> GradientTransformation:
    """One-bit gradients with error feedback.

    .. math::
        p = g + e, \\qquad u = \\operatorname{mean}(|p|) \\operatorname{sign}(p)
        \\;\\text{(per leaf)}, \\qquad e \\leftarrow p - u

    The residual ``e`` carries exactly what the one-bit update left out, so ``g + e_old = u +
    e_new`` and nothing of the gradient is lost over time (EF-signSGD).

    Returns:
      A ``GradientTransformation``. Its state holds the residual ``e``.

    Source: Seide et al. 2014; Karimireddy et al. 2019.
    """

    def init(params):
        check_float_params("sign_with_error_feedback", params)
        return ErrorFeedbackState(error=_zeros_like(params))

    def update(updates, state, params=None):
        del params
        check_tree_match("sign_with_error_feedback", state.error, updates)
        corrected = jax.tree.map(lambda g, e: g + e.astype(g.dtype), updates, state.error)
        out = jax.tree.map(
            lambda p: (jnp.mean(jnp.abs(p)) * jnp.sign(p)).astype(p.dtype) if p.size else p, corrected
        )
        error = jax.tree.map(lambda p, u, e: (p - u).astype(e.dtype), corrected, out, state.error)
        return out, ErrorFeedbackState(error=error)

    return GradientTransformation(init, update)


def add_noise(eta: float = 0.3, gamma: float = 0.55, key: int | jax.Array = 0) -> GradientTransformation:
    """Annealed Gaussian gradient noise.

    .. math:: u = g + N(0, \\sigma_t^2), \\qquad \\sigma_t^2 = \\eta / (1 + t)^\\gamma

    The PRNG key lives in the state (an int seed or a ``jax.random.key``); each step splits it
    and draws independent noise for every leaf. For the same key the noise is identical to
    ``optax.add_noise(eta, gamma, key)``; for complex leaves it is ``jax.random.normal``'s
    circular complex normal (real and imaginary parts each of variance ``sigma_t^2 / 2``), as in
    optax.

    Args:
      eta: ``eta`` >= 0, the noise scale at step 0.
      gamma: the annealing exponent (Neelakantan et al. use 0.55).
      key: an int seed or a ``jax.random.key``.

    Returns:
      A ``GradientTransformation``.

    Source: Neelakantan et al. 2016; Sarkar, CS60010 (gradient noise).
    """
    check_number("add_noise", "eta", eta, low=0.0)
    check_number("add_noise", "gamma", gamma, low=0.0)
    typed_key = as_key("add_noise", "key", key)

    def init(params):
        del params
        return NoiseState(count=_count0(), key=typed_key)

    def update(updates, state, params=None):
        del params
        count = optax.safe_increment(state.count)
        std = jnp.sqrt(eta / count.astype(jnp.float32) ** gamma)
        next_key, sample_key = jax.random.split(state.key)
        noise = optax.tree.random_like(sample_key, updates, jax.random.normal)
        out = jax.tree.map(lambda g, n: (g + std * n).astype(g.dtype), updates, noise)
        return out, NoiseState(count=count, key=next_key)

    return GradientTransformation(init, update)


def add_weight_decay(rate: float, mask: Mask | None = None) -> GradientTransformation:
    """L2 weight decay added to the gradient: ``u = g + rate * params``.

    ``mask`` (a pytree of bools like the params, or a callable of the params) limits the decay to
    the leaves where it is true, e.g. ``lambda p: jax.tree.map(lambda w: w.ndim > 1, p)`` to
    leave biases and BatchNorm scales alone. Placed before ``scale_by_adam`` this is Adam's L2
    (``torch.optim.Adam(weight_decay=...)``); after it, AdamW's decoupled decay.

    Args:
      rate: the decay ``rate`` >= 0.
      mask: a pytree of bools like the params, or a callable ``params -> mask``; None decays
        every leaf.

    Returns:
      A ``GradientTransformation``. Its ``update`` needs ``params``.

    Source: Tips and Tricks notes (weight decay); Loshchilov & Hutter 2019 (decoupled).
    """
    check_number("add_weight_decay", "rate", rate, low=0.0)

    def update(updates, state, params=None):
        if params is None:
            raise ValueError("add_weight_decay: update needs params; call update(grads, state, params)")
        check_tree_match("add_weight_decay", params, updates, what="updates (against params)")
        return jax.tree.map(lambda g, p: (g + rate * p).astype(g.dtype), updates, params), state

    tx = GradientTransformation(lambda params: optax.EmptyState(), update)
    return tx if mask is None else masked(tx, mask)


def _finite(tree) -> jax.Array:
    leaves = [jnp.all(jnp.isfinite(x)) for x in jax.tree.leaves(tree)]
    return jnp.all(jnp.stack(leaves)) if leaves else jnp.array(True)


def skip_nonfinite(inner: GradientTransformation) -> GradientTransformation:
    """Skip steps whose gradient (or ``inner``'s result) holds a NaN or Inf.

    On such a step ``u = 0`` and the inner state (moments, counts, keys) stays exactly as it was,
    so the next finite step proceeds as if the bad one never happened; ``skipped`` counts them.
    Like ``optax.apply_if_finite`` with no limit on consecutive skips.

    Args:
      inner: the transformation to guard.

    Returns:
      A ``GradientTransformation``. Its state holds ``inner``'s and the count ``skipped``.
    """
    check_transform("skip_nonfinite", "inner", inner)

    def init(params):
        return SkipNonfiniteState(inner.init(params), _count0(), jnp.array(True))

    def update(updates, state, params=None):
        new_updates, new_inner = inner.update(updates, state.inner_state, params)
        ok = jnp.logical_and(_finite(updates), _finite(new_updates))
        out = jax.tree.map(lambda u: jnp.where(ok, u, jnp.zeros_like(u)), new_updates)
        inner_state = select_tree(ok, new_inner, state.inner_state)
        skipped = state.skipped + jnp.where(ok, 0, 1).astype(state.skipped.dtype)
        return out, SkipNonfiniteState(inner_state, skipped, ok)

    return GradientTransformation(init, update)


def masked(inner: GradientTransformation, mask: Mask) -> GradientTransformation:
    """Apply ``inner`` where ``mask`` is true; elsewhere pass ``g`` through unchanged.

    ``mask`` is a pytree of bools with the structure of the params (or a prefix of it), or a
    callable returning one. ``inner`` keeps state only for the masked-in leaves. This is
    ``optax.masked``; combine with `freeze` to zero the leaves left out.

    Args:
      inner: the transformation applied to the masked-in leaves.
      mask: a pytree of bools (or a callable ``params -> mask``).

    Returns:
      A ``GradientTransformation``.
    """
    check_transform("masked", "inner", inner)
    if mask is None:
        raise TypeError("masked: mask must be a pytree of bools or a callable of the params, got None")
    return optax.masked(inner, mask)


def freeze(mask: Mask) -> GradientTransformation:
    """Freeze the leaves where ``mask`` is true: ``u = 0`` there, ``u = g`` elsewhere; no state.

    To train only part of a model with an optimizer that keeps no state for frozen leaves
    (transfer learning), put the optimizer under `masked` with the opposite mask::

        tx = chain(freeze(body), masked(adam(1e-3), head))

    The frozen leaves then never change, whatever the optimizer (weight decay included).

    Args:
      mask: a pytree of bools (or a callable ``params -> mask``): the frozen leaves.

    Returns:
      A ``GradientTransformation``.

    Source: CSE 176 Lecture 11 (transfer learning).
    """
    if mask is None:
        raise TypeError("freeze: mask must be a pytree of bools or a callable of the params, got None")

    def update(updates, state, params=None):
        del params
        m = mask(updates) if callable(mask) else mask
        return jax.tree.map(lambda f, g: jax.tree.map(jnp.zeros_like, g) if f else g, m, updates), state

    return GradientTransformation(lambda params: optax.EmptyState(), update)


# ----------------------------------------------------------------------------- Muon

MUON_NS_COEFFICIENTS = (3.4445, -4.7750, 2.0315)


class MuonState(NamedTuple):
    momentum_buffer: Any


def _check_ns(owner: str, coefficients, steps, eps, dtype):
    """Validate the Newton-Schulz settings; return the storage dtype of the iteration."""
    if not (isinstance(coefficients, (tuple, list)) and len(coefficients) == 3):
        raise ValueError(
            f"{owner}: ns_coefficients={coefficients!r} is not allowed; expected a tuple (a, b, c) of 3 numbers"
        )
    for name, value in zip("abc", coefficients):
        check_number(owner, f"ns_coefficients[{name}]", value)
    if isinstance(steps, (int, np.integer)) or not hasattr(steps, "dtype"):
        check_int(owner, "ns_steps", steps, low=1, high=99)
    elif not (jnp.issubdtype(steps.dtype, jnp.integer) and np.shape(steps) == ()):
        raise TypeError(f"{owner}: ns_steps must be an int, got an array of shape {np.shape(steps)}")
    check_number(owner, "eps", eps, low=0.0, low_open=True)
    return _check_dtype(owner, "ns_dtype", dtype)


def orthogonalize(
    g: jax.Array,
    ns_coefficients: tuple = MUON_NS_COEFFICIENTS,
    ns_steps: int = 5,
    eps: float = 1e-7,
    ns_dtype: Any = "bfloat16",
) -> jax.Array:
    """The nearest semi-orthogonal matrix to ``g``, approximately: a quintic Newton-Schulz
    iteration (Jordan et al. 2024, "Muon: An optimizer for hidden layers in neural networks").

    .. math:: X_0 = G / \\max(\\lVert G \\rVert_F, \\epsilon), \\quad A_k = X_k X_k^\\top, \\quad
              X_{k+1} = a X_k + (b A_k + c A_k^2) X_k

    run on the wide orientation of ``g`` (``g^T`` when it has more rows than columns; the
    iteration commutes with the transpose). With ``(a, b, c) = (3.4445, -4.7750, 2.0315)``,
    coefficients tuned by Keller Jordan to maximize the slope at zero (github.com/KellerJordan/Muon,
    ``zeropower_via_newtonschulz5``; also ``torch.optim.Muon``'s and ``optax.contrib.muon``'s),
    five steps map each singular value of ``g / |g|_F`` of at least 0.002 into [0.68, 1.14]
    (in exact arithmetic; the iteration is the odd polynomial ``a s + b s^3 + c s^5`` on each
    one): ``U S' V^T`` for ``g = U S V^T``, not exactly ``U V^T``.

    The iterates are stored in ``ns_dtype`` (bfloat16 by default, as ``torch.optim.Muon`` and
    the reference code do), each product accumulated in float32 and rounded once, as
    ``torch.addmm`` does; pass ``ns_dtype="float32"`` for an iteration in float32 (as
    ``optax.contrib.muon``, whose ``eps`` is added to the norm instead: ``1e-8``).

    Args:
      g: a 2-D array.
      ns_coefficients: ``(a, b, c)``.
      ns_steps: number of iterations (an int, or an integer array under
        ``optax.inject_hyperparams``).
      eps: floor of the Frobenius norm.
      ns_dtype: dtype the iterates are stored in.

    Returns:
      An array of ``g``'s shape, in ``ns_dtype``.
    """
    dtype = _check_ns("orthogonalize", ns_coefficients, ns_steps, eps, ns_dtype)
    if g.ndim != 2:
        raise ValueError(f"orthogonalize: g must be a 2-D array, got shape {g.shape}")
    a, b, c = ns_coefficients
    f32 = jnp.float32
    x = g.astype(dtype)
    tall = x.shape[0] > x.shape[1]
    x = x.T if tall else x
    norm = jnp.sqrt(jnp.sum(jnp.square(x.astype(f32)))).astype(dtype)
    x = (x.astype(f32) / jnp.maximum(norm, jnp.asarray(eps, dtype)).astype(f32)).astype(dtype)

    def mm(p, q):
        return jnp.matmul(p, q, preferred_element_type=f32)

    def step(_, x):
        gram = mm(x, x.T).astype(dtype)
        poly = (b * gram.astype(f32) + c * mm(gram, gram)).astype(dtype)
        return (a * x.astype(f32) + mm(poly, x)).astype(dtype)

    if isinstance(ns_steps, (int, np.integer)):
        for i in range(int(ns_steps)):
            x = step(i, x)
    else:  # a traced count (optax.inject_hyperparams): a loop XLA runs, not unrolled
        x = jax.lax.fori_loop(0, ns_steps, step, x)
    return x.T if tall else x


def scale_by_muon(
    momentum: float = 0.95,
    nesterov: bool = True,
    *,
    ns_coefficients: tuple = MUON_NS_COEFFICIENTS,
    ns_steps: int = 5,
    eps: float = 1e-7,
    adjust_lr: str = "original",
    ns_dtype: Any = "bfloat16",
) -> GradientTransformation:
    """Muon's direction for 2-D weights: momentum, then `orthogonalize` (Jordan et al. 2024,
    "Muon: An optimizer for hidden layers in neural networks"), then a shape factor.

    .. math::
        B \\leftarrow \\mu B + (1-\\mu) G, \\quad \\tilde B = (1-\\mu) G + \\mu B \\;
        (\\text{nesterov}) \\text{ or } B, \\quad U = s \\cdot \\mathrm{NS}(\\tilde B)

    with ``s = sqrt(max(1, fan_out / fan_in))`` (``adjust_lr="original"``, Jordan's) or ``0.2
    sqrt(max(fan_in, fan_out))`` (``"match_rms_adamw"``, Liu et al. 2025, "Muon is Scalable for
    LLM Training": an update of AdamW's RMS, so AdamW's lr and decay carry over). jaxdl kernels
    are (fan_in, fan_out) (PyTorch's Linear weight is (out, in)); the factor is the same.
    Followed by ``add_weight_decay`` and ``scale_by_learning_rate`` this is ``torch.optim.Muon``
    step for step (its momentum buffer is this EMA, not SGD's sum). ``optax.contrib.scale_by_muon``
    differs: it bias-corrects the momentum and iterates in float32.

    Every leaf must be 2-D: ``init`` refuses others, naming the leaf (``torch.optim.Muon`` refuses
    them too). Give biases, norm scales and conv kernels their own transform with `partition`,
    as `jaxdl.optimizers.muon` does.

    Args:
      momentum: ``mu`` in [0, 1).
      nesterov: use the Nesterov combination ``(1-mu) G + mu B``.
      ns_coefficients, ns_steps, eps, ns_dtype: see `orthogonalize`.
      adjust_lr: ``"original"`` or ``"match_rms_adamw"``.

    Returns:
      A ``GradientTransformation`` with state ``MuonState(momentum_buffer)``.
    """
    owner = "scale_by_muon"
    check_number(owner, "momentum", momentum, low=0.0, high=1.0, high_open=True)
    if not isinstance(nesterov, bool):
        raise TypeError(f"{owner}: nesterov must be a bool, got {nesterov!r}")
    _check_ns(owner, ns_coefficients, ns_steps, eps, ns_dtype)
    if adjust_lr not in ("original", "match_rms_adamw"):
        raise ValueError(
            f"{owner}: adjust_lr={adjust_lr!r} is not allowed; expected 'original' or 'match_rms_adamw'"
        )

    def init(params):
        check_float_params(owner, params)
        _check_real(owner, params, "Muon orthogonalizes real matrices (torch.optim.Muon refuses complex too)")
        for path, p in jax.tree_util.tree_flatten_with_path(params)[0]:
            if p.ndim != 2:
                raise ValueError(
                    f"{owner}: leaf {jax.tree_util.keystr(path) or '<root>'} has shape {p.shape}; Muon "
                    "takes 2-D weights only. Give the other leaves their own transform with "
                    "jaxdl.partition (jaxdl.muon does: AdamW)"
                )
        return MuonState(momentum_buffer=_zeros_like(params))

    def shape_factor(shape):
        fan_in, fan_out = shape
        if adjust_lr == "original":
            return max(1.0, fan_out / fan_in) ** 0.5
        return 0.2 * max(fan_in, fan_out) ** 0.5

    def leaf(g, buf):
        buf = (buf + (1.0 - momentum) * (g - buf)).astype(buf.dtype)
        direction = buf - (buf - g) * (1.0 - momentum) if nesterov else buf
        o = orthogonalize(direction, ns_coefficients, ns_steps, eps, ns_dtype)
        return (shape_factor(g.shape) * o.astype(jnp.float32)).astype(g.dtype), buf

    def update(updates, state, params=None):
        del params
        check_tree_match(owner, state.momentum_buffer, updates)
        out, buf = _map_unzip(leaf, 2, updates, state.momentum_buffer)
        return out, MuonState(momentum_buffer=buf)

    return GradientTransformation(init, update)


# ----------------------------------------------------------------------------- parameter groups


def decay_mask(params) -> Any:
    """``True`` for the leaves weight decay should reach, ``False`` for 1-D and 0-D leaves.

    .. math:: \\text{mask}(\\theta) = (\\operatorname{ndim}\\theta \\ge 2)

    Biases, BatchNorm/LayerNorm/RMSNorm scales and offsets (``gamma``, ``beta``, flax's
    ``scale``, ``bias``) and PReLU slopes are 1-D, so they get no decay; kernels and embeddings
    (2-D and up) do. This is the usual rule, the one PyTorch users write as two
    ``param_groups``: Karpathy's nanoGPT (``configure_optimizers``: "any parameters that is 2D
    will be weight decayed, otherwise no") and timm's ``param_groups_weight_decay`` (no decay for
    ``ndim <= 1``) use it.

    Args:
      params: a pytree of arrays (or of ``jax.ShapeDtypeStruct``).

    Returns:
      A pytree of bools of the same structure: the ``mask`` of `adamw`, `add_weight_decay`,
      `masked`, or a labelling for `partition`.

    >>> import jax.numpy as jnp
    >>> decay_mask({"w": jnp.ones((3, 2)), "b": jnp.zeros(2)})
    {'b': False, 'w': True}
    """
    return jax.tree.map(lambda p: len(p.shape) >= 2, params)


def partition(transforms: dict, labels: Mask) -> GradientTransformation:
    """Parameter groups: each leaf gets the transform its label names (``optax.partition``).

    .. math:: u_i = T_{\\ell(i)}(g_i), \\quad \\ell(i) = \\text{labels}[i]

    ``labels`` is a pytree like the params whose leaves are keys of ``transforms`` (or a prefix
    of one, or a callable of the params returning one). Each transform sees only its own leaves
    and keeps state for those only; so a group can have its own learning rate, weight decay or
    optimizer, as ``torch.optim``'s ``param_groups`` (Paszke et al. 2019) do. E.g. AdamW without
    decay on biases and norm scales::

        partition({"decay": adamw(1e-3, weight_decay=0.1), "no_decay": adamw(1e-3, weight_decay=None)},
                  lambda p: jax.tree.map(lambda d: "decay" if d else "no_decay", decay_mask(p)))

    (for that case alone ``adamw(1e-3, mask=decay_mask)`` is shorter and keeps one state).

    Args:
      transforms: ``{label: GradientTransformation}``.
      labels: a pytree of labels, or a callable ``params -> labels``.

    Returns:
      A ``GradientTransformation``; ``init`` refuses a label missing from ``transforms``,
      naming it and the leaf.
    """
    if not isinstance(transforms, dict) or not transforms:
        raise TypeError(
            f"partition: transforms must be a non-empty dict of label -> transform, got {transforms!r}"
        )
    for name, tx in transforms.items():
        check_transform("partition", f"transforms[{name!r}]", tx)
    if labels is None:
        raise TypeError("partition: labels must be a pytree of labels or a callable of the params, got None")
    tx = optax.partition(transforms, labels)

    def init(params):
        resolved = labels(params) if callable(labels) else labels
        for path, label in jax.tree_util.tree_flatten_with_path(resolved)[0]:
            if label not in transforms:
                raise ValueError(
                    f"partition: label {label!r} at {jax.tree_util.keystr(path) or '<root>'} is not a key "
                    f"of transforms; expected one of {sorted(map(str, transforms))}"
                )
        return tx.init(params)

    return GradientTransformation(init, tx.update)


# ----------------------------------------------------------------------------- schedule-free


class ScheduleFreeState(NamedTuple):
    """The state of `schedule_free`; its fields are ``optax.contrib.ScheduleFreeState``'s."""

    b1: jax.Array
    weight_sum: jax.Array  # sum of the averaging weights so far
    step_count: jax.Array  # t + 1
    max_lr: jax.Array
    base_optimizer_state: Any
    z: Any  # the base optimizer's iterate


def schedule_free(
    base: GradientTransformation,
    lr: ScalarOrSchedule,
    b1: float = 0.9,
    weight_lr_power: float = 2.0,
) -> GradientTransformation:
    """Schedule-free learning (Defazio et al. 2024, "The Road Less Scheduled"): the base
    optimizer's momentum replaced by interpolation and averaging, no decaying schedule needed.

    .. math::
        z_{t+1} = z_t + \\mathrm{base}(\\nabla f(y_t)), \\quad
        c_{t+1} = \\frac{\\gamma_{\\max}^{p}}{\\sum_{i \\le t} \\gamma_{\\max,i}^{p}}, \\quad
        x_{t+1} = (1 - c_{t+1}) x_t + c_{t+1} z_{t+1}, \\quad
        y_{t+1} = (1-\\beta_1) z_{t+1} + \\beta_1 x_{t+1}

    The params the step sees and returns are ``y`` (where gradients are taken); the state holds
    ``z``; ``x``, the average to evaluate, is ``(y - (1-b1) z) / b1``
    (`schedule_free_eval_params`; `jaxdl.fit`, `jaxdl.evaluate` and the doctor use it
    automatically). ``gamma_max`` is the largest ``lr`` so far; with a schedule the weight uses
    ``lr(t + 1)`` while ``base``'s own ``scale_by_learning_rate`` uses ``lr(t)``, as
    ``optax.contrib.schedule_free`` does (the authors' code uses one value for both). ``base``
    must hold no momentum (e.g. AdamW with ``b1=0``). Same numbers as ``optax.contrib.schedule_free``.

    Args:
      base: the transform whose output steps ``z`` (its learning rate included).
      lr: the learning rate or schedule, for the averaging weights.
      b1: interpolation ``beta_1`` in (0, 1].
      weight_lr_power: ``p`` >= 0.

    Returns:
      A ``GradientTransformation`` with `ScheduleFreeState`; ``update`` needs params.
    """
    owner = "schedule_free"
    check_transform(owner, "base", base)
    if callable(lr):
        check_schedule(owner, "lr", lr)
    else:
        check_scalar(owner, "lr", lr)
        check_number(owner, "lr", lr, low=0.0)
    check_number(owner, "b1", b1, low=0.0, high=1.0, low_open=True)
    check_number(owner, "weight_lr_power", weight_lr_power, low=0.0)

    def init(params):
        check_float_params(owner, params)
        # the scalars in float32 at least: a bfloat16 sum of weights would stop growing after a
        # few hundred steps (optax.contrib uses the params' lowest dtype, and fails on mixed trees)
        dtype = jnp.result_type(jnp.float32, *(p.dtype for p in jax.tree.leaves(params)))
        return ScheduleFreeState(
            b1=jnp.asarray(b1, dtype=dtype),
            weight_sum=jnp.zeros([], dtype),
            step_count=jnp.ones([], jnp.int32),
            max_lr=jnp.zeros([], dtype),
            base_optimizer_state=base.init(params),
            z=jax.tree.map(jnp.copy, params),
        )

    def update(updates, state, params=None):
        if params is None:
            raise ValueError(f"{owner}: update needs params; call update(grads, state, params)")
        check_tree_match(owner, params, updates, what="updates (against params)")
        rate = jnp.asarray(lr(state.step_count) if callable(lr) else lr, state.max_lr.dtype)
        max_lr = jnp.maximum(state.max_lr, rate)
        weight = max_lr**weight_lr_power
        weight_sum = state.weight_sum + weight
        ck = jnp.where(
            jnp.isnan(weight) | jnp.isnan(weight_sum),
            jnp.nan,
            jnp.nan_to_num(weight / weight_sum, nan=0.0, posinf=jnp.inf),
        )
        steps, base_state = base.update(updates, state.base_optimizer_state, params)
        z = jax.tree.map(lambda zi, si: (zi + si).astype(zi.dtype), state.z, steps)

        def leaf(y, z_old, z_new):
            x = (y - (1.0 - b1) * z_old) / b1
            x = (1.0 - ck) * x + ck * z_new
            return (b1 * x + (1.0 - b1) * z_new - y).astype(y.dtype)

        out = jax.tree.map(leaf, params, state.z, z)
        new = ScheduleFreeState(
            state.b1, weight_sum, optax.safe_increment(state.step_count), max_lr, base_state, z
        )
        return out, new

    return GradientTransformation(init, update)


def _is_schedule_free(s) -> bool:
    """jaxdl's or optax's schedule-free state (both NamedTuples with fields ``b1`` and ``z``)."""
    return type(s).__name__ == "ScheduleFreeState" and hasattr(s, "_fields") and {"b1", "z"} <= set(s._fields)


def schedule_free_eval_params(opt_state, params):
    """The params to evaluate a schedule-free run at, ``x = (y - (1 - b1) z) / b1``
    (Defazio et al. 2024, "The Road Less Scheduled"), or ``params`` unchanged when
    ``opt_state`` holds no schedule-free state.

    ``opt_state`` may hold the state anywhere (inside `chain`, `skip_nonfinite`,
    ``optax.inject_hyperparams``), jaxdl's `schedule_free` or ``optax.contrib.schedule_free``.
    Same numbers as ``optax.contrib.schedule_free_eval_params``.

    Args:
      opt_state: an optimizer state.
      params: the params of the run (``y``).

    Returns:
      A pytree like ``params``.
    """
    found = [s for s in jax.tree.leaves(opt_state, is_leaf=_is_schedule_free) if _is_schedule_free(s)]
    if not found:
        return params
    if len(found) > 1:
        raise ValueError(
            f"schedule_free_eval_params: opt_state holds {len(found)} schedule-free states; expected one"
        )
    b1, z = found[0].b1, found[0].z
    check_tree_match(
        "schedule_free_eval_params",
        z,
        params,
        what="params (against the schedule-free state's z)",
        hint="Schedule-free must run on all the params (not inside partition or masked).",
    )
    return jax.tree.map(lambda y, zi: ((y - (1.0 - b1) * zi) / b1).astype(y.dtype), params, z)


def schedule_free_restart(opt_state, params):
    """``opt_state`` with its schedule-free ``z`` set to ``params``, so the run continues from
    ``x = y = z = params`` (as `schedule_free`'s ``init`` starts), keeping the base optimizer's
    state and the averaging weights; ``opt_state`` unchanged when it holds no schedule-free
    state. `jaxdl.fit` uses it to return the best epoch's evaluation params with a state whose
    `schedule_free_eval_params` are those params.

    Args:
      opt_state: an optimizer state.
      params: the params to restart at (a tree like the state's ``z``).

    Returns:
      An optimizer state of the same structure.
    """
    return jax.tree.map(
        lambda s: (
            s._replace(z=jax.tree.map(lambda p, z: jnp.asarray(p, z.dtype), params, s.z))
            if _is_schedule_free(s)
            else s
        ),
        opt_state,
        is_leaf=_is_schedule_free,
    )
