"""Ready optimizers: each is a `chain` of transforms from `jaxdl.transforms`, so the optimizer
*is* its composition and can be read off its body.

Every optimizer matches its reference step for step with the same hyperparameters: the PyTorch
optimizer of the same name (tests check 100+ steps of each against ``torch.optim``; `muon`
against ``torch.optim.Muon``), and for the schedule-free ones ``optax.contrib``'s.
Hyperparameters may be floats, concrete arrays or traced arrays (for vmapped sweeps); ``lr`` may
also be a schedule.

Refused when the optimizer is built, naming it: a negative or non-finite ``lr``, a schedule
whose value at step 0 (or, for jaxdl's schedules, at its end) is so, out-of-range
hyperparameters. Refused by ``init``: integer or boolean parameters (TypeError naming the first
such leaf and its dtype), which an update cast back to the parameter's dtype would never move;
``torch.optim`` refuses them too.
"""

from __future__ import annotations

import jax
import optax

from jaxdl import transforms as T
from jaxdl._checks import (
    check_float_params,
    check_number,
    check_scalar,
    check_schedule,
    check_transform,
    check_tree_match,
)
from jaxdl.transforms import GradientTransformation, Mask, ScalarOrSchedule

__all__ = [
    "sgd",
    "adagrad",
    "rmsprop",
    "adam",
    "adamw",
    "signsgd",
    "muon",
    "schedule_free_adamw",
    "schedule_free_sgd",
    "apply_updates",
]


def _descend(owner: str, lr: ScalarOrSchedule) -> GradientTransformation:
    """``scale_by_learning_rate(lr)``, with errors that name the optimizer the user called.

    A concrete or traced ``lr`` must be a scalar (shape ()) >= 0, as in ``torch.optim``; a
    schedule must be so at step 0 and, for jaxdl's schedules, at its end (`check_schedule`).
    """
    if callable(lr):
        check_schedule(owner, "lr", lr)
    else:
        check_scalar(owner, "lr", lr)
        check_number(owner, "lr", lr, low=0.0)
    return T.scale_by_learning_rate(lr)


def _optimizer(owner: str, *parts: GradientTransformation) -> GradientTransformation:
    """``chain(*parts)`` whose ``init`` first refuses integer or boolean params, naming ``owner``
    (the optimizer the user called), the first such leaf and its dtype (`check_float_params`).

    The transforms that keep float state check too, under their own names; this check runs
    first, so the message names the optimizer. Host-side, on dtypes only: free under jit.
    """
    tx = T.chain(*parts)

    def init(params):
        check_float_params(owner, params)
        return tx.init(params)

    return tx._replace(init=init)


def _maybe_zero(value) -> bool:
    """True when `value` is a Python number equal to 0, so its transform can be left out.

    Arrays (concrete or traced, e.g. from ``optax.inject_hyperparams`` or a vmapped sweep) keep
    their transform, so the state's structure never depends on a hyperparameter's value.
    """
    return isinstance(value, (int, float)) and not isinstance(value, bool) and value == 0


def sgd(
    lr: ScalarOrSchedule,
    momentum: float = 0.0,
    nesterov: bool = False,
    weight_decay: float | None = None,
) -> GradientTransformation:
    """Minibatch SGD with optional (Nesterov) momentum and L2 weight decay.

    .. math:: g' = g + \\lambda\\theta, \\quad v \\leftarrow \\mu v + g', \\quad
              \\theta \\leftarrow \\theta - \\epsilon_t v \\;(\\text{or } \\epsilon_t(g' + \\mu v))

    ``chain(add_weight_decay(wd), momentum(mu, nesterov), scale_by_learning_rate(lr))``; equals
    ``torch.optim.SGD(lr, momentum, nesterov=nesterov, weight_decay=wd)``. ``weight_decay=None``
    (the default) or ``0`` leaves the decay out of the chain, so ``update`` needs no params, also
    under ``optax.inject_hyperparams`` (which turns a number into an array of unknown value).

    Args:
      lr: learning rate ``eps_t``, a number or a schedule (`jaxdl.schedules`).
      momentum: ``mu`` in [0, 1); 0 leaves momentum out.
      nesterov: Nesterov momentum (needs ``momentum > 0``).
      weight_decay: ``lambda``, L2 decay added to the gradient; None or 0 leaves it out.

    Returns:
      An optax ``GradientTransformation``.

    Source: CSE 176 Lecture 11 (SGD, momentum); Sarkar, CS60010 (Nesterov momentum).

    >>> import jax.numpy as jnp
    >>> opt = sgd(0.1)
    >>> params = {"w": jnp.array([1.0, -2.0])}
    >>> updates, state = opt.update({"w": jnp.array([0.5, -0.5])}, opt.init(params), params)
    >>> [round(v, 4) for v in apply_updates(params, updates)["w"].tolist()]  # theta - 0.1 g
    [0.95, -1.95]
    """
    if nesterov and _maybe_zero(momentum):
        raise ValueError("sgd: nesterov=True needs momentum > 0 (got momentum=0), as in torch.optim.SGD")
    parts = []
    if weight_decay is not None and not _maybe_zero(weight_decay):
        parts.append(T.add_weight_decay(weight_decay))
    if not _maybe_zero(momentum):
        parts.append(T.momentum(momentum, nesterov=nesterov))
    else:
        T.momentum(momentum)  # validates a negative or out-of-range momentum
    parts.append(_descend("sgd", lr))
    return _optimizer("sgd", *parts)


def adagrad(lr: ScalarOrSchedule, eps: float = 1e-7) -> GradientTransformation:
    """AdaGrad: per-coordinate steps scaled by the root of the summed squared gradients.

    ``r <- r + g^2; theta <- theta - eps_t g / (delta + sqrt(r))``.

    ``chain(scale_by_adagrad(eps), scale_by_learning_rate(lr))``; equals
    ``torch.optim.Adagrad(lr, eps=eps)`` (PyTorch's default eps is 1e-10). optax's ``adagrad``
    differs: its accumulator starts at 0.1 and its eps sits inside the root.

    Args:
      lr: learning rate ``eps_t``, a number or a schedule.
      eps: ``delta``, outside the root.

    Returns:
      An optax ``GradientTransformation``.

    Source: Duchi et al. 2011; CSE 176 Lecture 11.

    >>> import jax.numpy as jnp
    >>> opt = adagrad(0.1)
    >>> params = {"w": jnp.array([1.0, -2.0])}
    >>> updates, state = opt.update({"w": jnp.array([0.5, -0.5])}, opt.init(params), params)
    >>> [round(v, 4) for v in apply_updates(params, updates)["w"].tolist()]  # the first step is lr * sign(g)
    [0.9, -1.9]
    """
    return _optimizer("adagrad", T.scale_by_adagrad(eps), _descend("adagrad", lr))


def rmsprop(
    lr: ScalarOrSchedule,
    decay: float = 0.9,
    eps: float = 1e-8,
    centered: bool = False,
    momentum: float = 0.0,
) -> GradientTransformation:
    """RMSProp, optionally centered and with momentum on the rescaled gradient.

    .. math:: s \\leftarrow \\rho s + (1-\\rho)g^2, \\quad b \\leftarrow \\mu b + g/(\\sqrt{s}+\\epsilon),
              \\quad \\theta \\leftarrow \\theta - \\epsilon_t b

    Equals ``torch.optim.RMSprop(lr, alpha=decay, eps, centered=..., momentum=...)``; note PyTorch's
    default ``alpha`` is 0.99 and ours ``decay`` is 0.9 (Hinton's lecture value). optax's
    ``rmsprop`` puts eps inside the root.

    Args:
      lr: learning rate ``eps_t``, a number or a schedule.
      decay: ``rho``, the decay of the squared-gradient average.
      eps: ``epsilon``, outside the root.
      centered: divide by the root of the variance estimate ``s - mean(g)^2`` instead.
      momentum: ``mu``; 0 leaves momentum out.

    Returns:
      An optax ``GradientTransformation``.

    Source: Tieleman & Hinton 2012; Graves 2013 (centered); Sarkar, CS60010.

    >>> import jax.numpy as jnp
    >>> opt = rmsprop(0.01)
    >>> params = {"w": jnp.array([1.0, -2.0])}
    >>> updates, state = opt.update({"w": jnp.array([0.5, -0.5])}, opt.init(params), params)
    >>> [round(v, 4) for v in apply_updates(params, updates)["w"].tolist()]
    [0.9684, -1.9684]
    """
    parts = [T.scale_by_rms(decay, eps, centered)]
    if not _maybe_zero(momentum):
        parts.append(T.momentum(momentum))
    else:
        T.momentum(momentum)
    parts.append(_descend("rmsprop", lr))
    return _optimizer("rmsprop", *parts)


def adam(
    lr: ScalarOrSchedule,
    b1: float = 0.9,
    b2: float = 0.999,
    eps: float = 1e-8,
    *,
    mu_dtype=None,
    nu_dtype=None,
) -> GradientTransformation:
    """Adam: steps by bias-corrected first and second moment estimates of the gradient.

    .. math:: \\theta \\leftarrow \\theta - \\alpha_t \\hat m / (\\sqrt{\\hat v} + \\epsilon)

    Equals ``torch.optim.Adam`` and ``optax.adam`` with the same hyperparameters. ``mu_dtype`` /
    ``nu_dtype`` store the moments in another dtype (e.g. ``jnp.bfloat16``; arithmetic stays in
    float32), see `jaxdl.transforms.scale_by_adam`, which also says how complex parameters are
    handled (as optax does; PyTorch differs). It is ``chain(scale_by_adam(b1, b2, eps,
    mu_dtype=..., nu_dtype=...), scale_by_learning_rate(lr))``.

    Args:
      lr: learning rate ``alpha_t``, a number or a schedule.
      b1, b2: decays of the first and second moments.
      eps: ``epsilon``, outside the root.
      mu_dtype, nu_dtype: storage dtypes of the moments (None: the params').

    Returns:
      An optax ``GradientTransformation``.

    Source: Kingma & Ba 2015; Tips and Tricks notes; Sarkar, CS60010.

    >>> import jax.numpy as jnp
    >>> opt = adam(0.1)
    >>> params = {"w": jnp.array([1.0, -2.0])}
    >>> updates, state = opt.update({"w": jnp.array([0.5, -0.5])}, opt.init(params), params)
    >>> [round(v, 4) for v in apply_updates(params, updates)["w"].tolist()]  # the first step is lr * sign(g)
    [0.9, -1.9]
    """
    return _optimizer(
        "adam", T.scale_by_adam(b1, b2, eps, mu_dtype=mu_dtype, nu_dtype=nu_dtype), _descend("adam", lr)
    )


def adamw(
    lr: ScalarOrSchedule,
    b1: float = 0.9,
    b2: float = 0.999,
    eps: float = 1e-8,
    weight_decay: float | None = 1e-2,
    mask: Mask | None = None,
    *,
    mu_dtype=None,
    nu_dtype=None,
) -> GradientTransformation:
    """AdamW: Adam with decoupled weight decay.

    .. math:: \\theta \\leftarrow \\theta - \\alpha_t\\,(\\hat m / (\\sqrt{\\hat v} + \\epsilon) + \\lambda\\theta)

    ``chain(scale_by_adam, add_weight_decay(weight_decay, mask), scale_by_learning_rate(lr))``;
    equals ``torch.optim.AdamW`` and ``optax.adamw`` (both default ``weight_decay`` to 1e-2 too,
    PyTorch's since 2.x; optax's is 1e-4). ``mask`` limits the decay to some leaves, e.g.
    ``mask=decay_mask`` leaves biases and norm scales alone (`jaxdl.transforms.decay_mask`).
    ``weight_decay=None`` leaves the decay out (then ``update`` needs no params; ``0.0`` keeps it
    as a zero term, so an injected or swept value can change it). ``mu_dtype`` / ``nu_dtype`` as
    in `adam`.

    Args:
      lr, b1, b2, eps, mu_dtype, nu_dtype: as in `adam`.
      weight_decay: ``lambda``, multiplied by the learning rate; None leaves it out.
      mask: a pytree of bools like the params, or a callable ``params -> mask`` (e.g.
        `jaxdl.transforms.decay_mask`): which leaves decay.

    Returns:
      An optax ``GradientTransformation``.

    Source: Loshchilov & Hutter 2019.

    >>> import jax.numpy as jnp
    >>> opt = adamw(0.1, weight_decay=0.5)
    >>> params = {"w": jnp.array([1.0, -2.0])}
    >>> updates, state = opt.update({"w": jnp.array([0.5, -0.5])}, opt.init(params), params)
    >>> [round(v, 4) for v in apply_updates(params, updates)["w"].tolist()]  # Adam's step, then - 0.1 * 0.5 theta
    [0.85, -1.8]
    """
    parts = [T.scale_by_adam(b1, b2, eps, mu_dtype=mu_dtype, nu_dtype=nu_dtype)]
    if weight_decay is not None:
        parts.append(T.add_weight_decay(weight_decay, mask))
    return _optimizer("adamw", *parts, _descend("adamw", lr))


def signsgd(lr: ScalarOrSchedule, error_feedback: bool = False) -> GradientTransformation:
    """signSGD: one-bit steps ``theta <- theta - eps_t sign(g)``.

    With ``error_feedback`` each leaf steps by ``mean|p| sign(p)`` with ``p = g + e`` and keeps the
    residual ``e`` (EF-signSGD, Karimireddy et al. 2019; Seide et al. 2014), which converges
    where plain signSGD with a fixed step oscillates.

    Args:
      lr: learning rate ``eps_t``, a number or a schedule.
      error_feedback: keep the residual of each one-bit step and add it to the next gradient.

    Returns:
      An optax ``GradientTransformation``.

    Source: Bernstein et al. 2018; Sarkar, CS60010 (one-bit gradients).

    >>> import jax.numpy as jnp
    >>> opt = signsgd(0.1)
    >>> params = {"w": jnp.array([1.0, -2.0])}
    >>> updates, state = opt.update({"w": jnp.array([0.5, -0.5])}, opt.init(params), params)
    >>> [round(v, 4) for v in apply_updates(params, updates)["w"].tolist()]
    [0.9, -1.9]
    """
    if not isinstance(error_feedback, bool):
        raise TypeError(f"signsgd: error_feedback must be a bool, got {error_feedback!r}")
    first = T.sign_with_error_feedback() if error_feedback else T.sign()
    return _optimizer("signsgd", first, _descend("signsgd", lr))


def muon(
    lr: ScalarOrSchedule,
    momentum: float = 0.95,
    nesterov: bool = True,
    weight_decay: float | None = 0.1,
    *,
    ns_coefficients: tuple = T.MUON_NS_COEFFICIENTS,
    ns_steps: int = 5,
    eps: float = 1e-7,
    adjust_lr: str = "original",
    ns_dtype: str = "bfloat16",
    others: GradientTransformation | None = None,
) -> GradientTransformation:
    """Muon (MomentUm Orthogonalized by Newton-Schulz) for the 2-D weights; ``others`` for the rest.

    .. math:: \\theta \\leftarrow \\theta - \\alpha_t\\,(s\\,\\mathrm{NS}(\\tilde B) + \\lambda\\theta)
              \\quad \\text{(2-D leaves; } \\tilde B, s, \\mathrm{NS} \\text{ as in } \\texttt{scale\\_by\\_muon})

    2-D leaves (Dense kernels, embeddings): ``chain(scale_by_muon(momentum, nesterov, ...),
    add_weight_decay(weight_decay), scale_by_learning_rate(lr))``, which is
    ``torch.optim.Muon(lr, weight_decay, momentum, nesterov, ns_coefficients, eps, ns_steps,
    adjust_lr_fn)`` step for step (the Newton-Schulz iteration in bfloat16 as there; a test
    checks it). Every other leaf (biases, norm scales and offsets, conv kernels) goes to
    ``others``, default ``adamw(lr, weight_decay=None)``: ``torch.optim.Muon`` refuses such
    leaves and its documentation sends them to AdamW; ``optax.contrib.muon`` sends them to AdamW
    too (with Nesterov momentum, without decay). To send 2-D leaves elsewhere too (Jordan keeps the embedding and the
    output layer on AdamW), build the groups with `jaxdl.transforms.partition` and
    `jaxdl.transforms.scale_by_muon`.

    Args:
      lr: learning rate or schedule (torch's default is 1e-3; Jordan uses 0.02).
      momentum, nesterov: see `jaxdl.transforms.scale_by_muon` (defaults torch's).
      weight_decay: decoupled decay of the 2-D leaves, multiplied by ``lr`` (torch's default
        0.1); None leaves it out.
      ns_coefficients, ns_steps, eps, ns_dtype, adjust_lr: see `jaxdl.transforms.scale_by_muon`.
      others: the transform of the leaves that are not 2-D.

    Returns:
      A ``GradientTransformation`` (a `jaxdl.transforms.partition` with labels ``"muon"`` and
      ``"others"``).

    Source: Jordan et al. 2024; Liu et al. 2025 (``adjust_lr="match_rms_adamw"``).
    """
    parts = [
        T.scale_by_muon(
            momentum,
            nesterov,
            ns_coefficients=ns_coefficients,
            ns_steps=ns_steps,
            eps=eps,
            adjust_lr=adjust_lr,
            ns_dtype=ns_dtype,
        )
    ]
    if weight_decay is not None:
        parts.append(T.add_weight_decay(weight_decay))
    parts.append(_descend("muon", lr))
    if others is None:
        others = adamw(lr, weight_decay=None)
    check_transform("muon", "others", others)
    labels = lambda params: jax.tree.map(lambda p: "muon" if len(p.shape) == 2 else "others", params)  # noqa: E731
    return _optimizer("muon", T.partition({"muon": T.chain(*parts), "others": others}, labels))


def _schedule_free(owner, base_parts, lr, b1, weight_decay, weight_lr_power):
    """`jaxdl.transforms.schedule_free` over ``chain(*base_parts, [add_weight_decay], lr)``."""
    parts = list(base_parts)
    if weight_decay is not None:
        parts.append(T.add_weight_decay(weight_decay))
    parts.append(_descend(owner, lr))
    return _optimizer(owner, T.schedule_free(T.chain(*parts), lr, b1, weight_lr_power))


def schedule_free_adamw(
    lr: ScalarOrSchedule,
    b1: float = 0.9,
    b2: float = 0.999,
    eps: float = 1e-8,
    weight_decay: float | None = None,
    weight_lr_power: float = 2.0,
) -> GradientTransformation:
    """Schedule-free AdamW: Adam's steps on ``z``, evaluated at an average ``x``, no decay schedule.

    .. math:: z \\leftarrow z - \\gamma_t\\,\\bigl(g / (\\sqrt{\\hat v} + \\epsilon) + \\lambda y\\bigr),
              \\quad x, y \\text{ as in } \\texttt{schedule\\_free}

    `jaxdl.transforms.schedule_free` (interpolation ``b1``, averaging weights ``lr^p``) over
    ``chain(scale_by_rms with bias correction, add_weight_decay(weight_decay),
    scale_by_learning_rate(lr))``: Adam with ``b1 = 0``, the decay taken at ``y``. Same numbers as
    ``optax.contrib.schedule_free_adamw(lr, b1=b1, b2=b2, eps=eps, weight_decay=...)`` (a test
    checks them); optax's ``warmup_steps`` is ``lr=optax.warmup_constant_schedule(0, lr, n)``
    here. Evaluate at `jaxdl.transforms.schedule_free_eval_params` (`jaxdl.fit`,
    `jaxdl.evaluate` and the doctor do). ``update`` needs params.

    Args:
      lr: learning rate or schedule (warm up; no decay needed).
      b1: interpolation ``beta_1`` in (0, 1].
      b2, eps: Adam's second-moment decay and epsilon (outside the root).
      weight_decay: decay rate, or None to leave it out.
      weight_lr_power: the averaging weight is ``max lr ** weight_lr_power``.

    Returns:
      A ``GradientTransformation`` with a `jaxdl.transforms.ScheduleFreeState`.

    Source: Defazio et al. 2024, "The Road Less Scheduled".
    """
    T.scale_by_adam(0.0, b2, eps)  # validates b2 and eps with their names
    rms = optax.scale_by_rms(decay=b2, eps=eps, eps_in_sqrt=False, bias_correction=True)
    return _schedule_free("schedule_free_adamw", [rms], lr, b1, weight_decay, weight_lr_power)


def schedule_free_sgd(
    lr: ScalarOrSchedule,
    b1: float = 0.9,
    weight_decay: float | None = None,
    weight_lr_power: float = 2.0,
) -> GradientTransformation:
    """Schedule-free SGD: SGD steps on ``z``, evaluated at an average ``x``, no decay schedule.

    .. math:: y_t = (1-\\beta_1) z_t + \\beta_1 x_t, \\quad z_{t+1} = z_t - \\gamma_t (g + \\lambda y_t),
              \\quad x_{t+1} = (1 - c_{t+1}) x_t + c_{t+1} z_{t+1}

    `jaxdl.transforms.schedule_free` over ``chain(add_weight_decay(weight_decay),
    scale_by_learning_rate(lr))``. Same numbers as ``optax.contrib.schedule_free_sgd(lr, b1=b1,
    weight_decay=...)`` (a test checks them). ``update`` needs params.

    Args:
      lr: learning rate or schedule.
      b1: interpolation ``beta_1`` in (0, 1].
      weight_decay: L2 rate added to the gradient (at ``y``), or None.
      weight_lr_power: the averaging weight is ``max lr ** weight_lr_power``.

    Returns:
      A ``GradientTransformation`` with a `jaxdl.transforms.ScheduleFreeState`.

    Source: Defazio et al. 2024, "The Road Less Scheduled".
    """
    return _schedule_free("schedule_free_sgd", [], lr, b1, weight_decay, weight_lr_power)


def apply_updates(params, updates):
    """``theta <- theta + u`` leaf by leaf, keeping each parameter's dtype (``optax.apply_updates``).

    Args:
      params: the parameter pytree ``theta``.
      updates: the optimizer's updates ``u``, a tree of the same structure.

    Returns:
      The new parameters. Raises ValueError naming the first differing path when the trees do
      not match.
    """
    check_tree_match("apply_updates", params, updates, what="updates (against params)")
    return optax.apply_updates(params, updates)
