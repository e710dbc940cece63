"""Ready optimizers: each is a `chain` of transforms from `jaxdl.transforms`, so the optimizer
*is* its composition and can be read off its body.

Every optimizer matches the PyTorch optimizer of the same name step for step with the same
hyperparameters (tests check 100+ steps of each against ``torch.optim``). Hyperparameters may be
floats, concrete arrays or traced arrays (for vmapped sweeps); ``lr`` may also be a schedule.

Refused when the optimizer is built, naming it: a negative or non-finite ``lr``, a schedule
whose value at step 0 (or, for jaxdl's schedules, at its end) is so, out-of-range
hyperparameters. Refused by ``init``: integer or boolean parameters (TypeError naming the first
such leaf and its dtype), which an update cast back to the parameter's dtype would never move;
``torch.optim`` refuses them too.
"""

from __future__ import annotations

import optax

from jaxdl import transforms as T
from jaxdl._checks import check_float_params, check_number, check_scalar, check_schedule, check_tree_match
from jaxdl.transforms import GradientTransformation, Mask, ScalarOrSchedule

__all__ = ["sgd", "adagrad", "rmsprop", "adam", "adamw", "signsgd", "apply_updates"]


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
    weight_decay: float = 0.0,
) -> GradientTransformation:
    """Minibatch SGD with optional (Nesterov) momentum and L2 weight decay (seeds 001, 004).

    .. math:: g' = g + \\lambda\\theta, \\quad v \\leftarrow \\mu v + g', \\quad
              \\theta \\leftarrow \\theta - \\epsilon_t v \\;(\\text{or } \\epsilon_t(g' + \\mu v))

    ``chain(add_weight_decay(wd), momentum(mu, nesterov), scale_by_learning_rate(lr))``; equals
    ``torch.optim.SGD(lr, momentum, nesterov=nesterov, weight_decay=wd)``.
    """
    if nesterov and _maybe_zero(momentum):
        raise ValueError("sgd: nesterov=True needs momentum > 0 (got momentum=0), as in torch.optim.SGD")
    parts = []
    if not _maybe_zero(weight_decay):
        parts.append(T.add_weight_decay(weight_decay))
    if not _maybe_zero(momentum):
        parts.append(T.momentum(momentum, nesterov=nesterov))
    else:
        T.momentum(momentum)  # validates a negative or out-of-range momentum
    parts.append(_descend("sgd", lr))
    return _optimizer("sgd", *parts)


def adagrad(lr: ScalarOrSchedule, eps: float = 1e-7) -> GradientTransformation:
    """AdaGrad (seed 001): ``r <- r + g^2; theta <- theta - eps_t g / (delta + sqrt(r))``.

    ``chain(scale_by_adagrad(eps), scale_by_learning_rate(lr))``; equals
    ``torch.optim.Adagrad(lr, eps=eps)`` (PyTorch's default eps is 1e-10). optax's ``adagrad``
    differs: its accumulator starts at 0.1 and its eps sits inside the root.
    """
    return _optimizer("adagrad", T.scale_by_adagrad(eps), _descend("adagrad", lr))


def rmsprop(
    lr: ScalarOrSchedule,
    decay: float = 0.9,
    eps: float = 1e-8,
    centered: bool = False,
    momentum: float = 0.0,
) -> GradientTransformation:
    """RMSProp (seed 004), optionally centered and with momentum on the rescaled gradient.

    .. math:: s \\leftarrow \\rho s + (1-\\rho)g^2, \\quad b \\leftarrow \\mu b + g/(\\sqrt{s}+\\epsilon),
              \\quad \\theta \\leftarrow \\theta - \\epsilon_t b

    Equals ``torch.optim.RMSprop(lr, alpha=decay, eps, centered=..., momentum=...)``; note PyTorch's
    default ``alpha`` is 0.99 and ours ``decay`` is 0.9 (Hinton's lecture value). optax's
    ``rmsprop`` puts eps inside the root.
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
    """Adam (Kingma & Ba 2015; seeds 000, 004): ``chain(scale_by_adam(b1, b2, eps, mu_dtype=...,
    nu_dtype=...), scale_by_learning_rate(lr))``.

    .. math:: \\theta \\leftarrow \\theta - \\alpha_t \\hat m / (\\sqrt{\\hat v} + \\epsilon)

    Equals ``torch.optim.Adam`` and ``optax.adam`` with the same hyperparameters. ``mu_dtype`` /
    ``nu_dtype`` store the moments in another dtype (e.g. ``jnp.bfloat16``; arithmetic stays in
    float32), see `jaxdl.transforms.scale_by_adam`, which also says how complex parameters are
    handled (as optax does; PyTorch differs).
    """
    return _optimizer(
        "adam", T.scale_by_adam(b1, b2, eps, mu_dtype=mu_dtype, nu_dtype=nu_dtype), _descend("adam", lr)
    )


def adamw(
    lr: ScalarOrSchedule,
    b1: float = 0.9,
    b2: float = 0.999,
    eps: float = 1e-8,
    weight_decay: float = 1e-2,
    mask: Mask | None = None,
    *,
    mu_dtype=None,
    nu_dtype=None,
) -> GradientTransformation:
    """AdamW, Adam with decoupled weight decay (Loshchilov & Hutter 2019).

    .. math:: \\theta \\leftarrow \\theta - \\alpha_t\\,(\\hat m / (\\sqrt{\\hat v} + \\epsilon) + \\lambda\\theta)

    ``chain(scale_by_adam, add_weight_decay(weight_decay, mask), scale_by_learning_rate(lr))``;
    equals ``torch.optim.AdamW`` and ``optax.adamw`` (both default ``weight_decay`` to 1e-2 too,
    PyTorch's since 2.x; optax's is 1e-4). ``mask`` limits the decay to some leaves.
    ``mu_dtype`` / ``nu_dtype`` as in `adam`.
    """
    return _optimizer(
        "adamw",
        T.scale_by_adam(b1, b2, eps, mu_dtype=mu_dtype, nu_dtype=nu_dtype),
        T.add_weight_decay(weight_decay, mask),
        _descend("adamw", lr),
    )


def signsgd(lr: ScalarOrSchedule, error_feedback: bool = False) -> GradientTransformation:
    """signSGD: one-bit steps ``theta <- theta - eps_t sign(g)`` (seed 004; Bernstein et al. 2018).

    With ``error_feedback`` each leaf steps by ``mean|p| sign(p)`` with ``p = g + e`` and keeps the
    residual ``e`` (EF-signSGD, Karimireddy et al. 2019; Seide et al. 2014), which converges
    where plain signSGD with a fixed step oscillates.
    """
    if not isinstance(error_feedback, bool):
        raise TypeError(f"signsgd: error_feedback must be a bool, got {error_feedback!r}")
    first = T.sign_with_error_feedback() if error_feedback else T.sign()
    return _optimizer("signsgd", first, _descend("signsgd", lr))


def apply_updates(params, updates):
    """``theta <- theta + u`` leaf by leaf, keeping each parameter's dtype (``optax.apply_updates``).

    Raises ValueError naming the first differing path when the trees do not match.
    """
    check_tree_match("apply_updates", params, updates, what="updates (against params)")
    return optax.apply_updates(params, updates)
