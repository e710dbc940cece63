"""Learning-rate and noise schedules: jit-safe callables ``step -> value``.

Each constructor checks its arguments and returns a pure function of the step count ``k``
(an int or an int array, starting at 0). Values may be traced, so a schedule can sit inside
`jax.jit`, `jax.vmap` and `lax.scan`; a changed step never recompiles.

Each schedule also carries ``end = (step, value)``: the value it settles at and the step from
which it holds (``step`` None for a limit approached forever; for `warmup` around a schedule of
the user's, the value where the warm-up ends). Every built-in schedule lies between its value at
step 0 and its end value, so an optimizer checks both when it is built
(`jaxdl._checks.check_schedule`: a learning rate must be finite and >= 0) and refuses
``sgd(constant(-0.1))`` as it refuses ``sgd(-0.1)``.
"""

from __future__ import annotations

from typing import Callable

import jax.numpy as jnp
import numpy as np

from jaxdl._checks import check_number, check_positive_int, concrete

Schedule = Callable[[jnp.ndarray], jnp.ndarray]

__all__ = [
    "Schedule",
    "constant",
    "linear_decay",
    "inverse_time_decay",
    "inverse_sqrt_decay",
    "step_decay",
    "cosine_decay",
    "warmup",
]


def _with_end(schedule: Schedule, name: str, step, value) -> Schedule:
    """Name ``schedule`` and attach its end value ``(step, value)`` (module docstring)."""
    schedule.__name__ = schedule.__qualname__ = name
    schedule.end = (step, value)
    return schedule


def _step(k):
    # The default float dtype: float32, or float64 when jax_enable_x64 is on.
    return jnp.asarray(k, dtype=jnp.result_type(float))


def _is_zero(value) -> bool:
    """Whether a concrete hyperparameter is exactly 0 (False when traced)."""
    arr = concrete(value)
    return arr is not None and bool(np.all(arr == 0))


def _is_one(value) -> bool:
    """Whether a concrete hyperparameter is exactly 1 (False when traced)."""
    arr = concrete(value)
    return arr is not None and bool(np.all(arr == 1))


def constant(value: float) -> Schedule:
    """A constant learning rate.

    .. math:: \\epsilon_k = v

    Args:
      value: the rate ``v``.

    Returns:
      A schedule ``k -> eps_k`` (a float32 scalar for an int or traced step ``k``).

    >>> float(constant(0.1)(1000))
    0.1...
    """
    check_number("constant", "value", value)
    return _with_end(lambda k: jnp.asarray(value, dtype=jnp.result_type(float)), "constant", 0, value)


def linear_decay(init: float, final: float, tau: int) -> Schedule:
    """Linear decay from ``init`` to ``final`` at step ``tau``, constant after.

    .. math:: \\epsilon_k = (1 - \\alpha)\\epsilon_0 + \\alpha\\epsilon_\\tau,
              \\quad \\alpha = \\min(k / \\tau, 1)

    Args:
      init: ``eps_0``.
      final: ``eps_tau``, kept after step ``tau``.
      tau: the step at which the decay ends (>= 1).

    Returns:
      A schedule ``k -> eps_k``.

    Source: CSE 176 Lecture 11, "Learning Rate Decay".

    >>> s = linear_decay(0.1, 0.01, tau=10)
    >>> [round(float(s(k)), 4) for k in (0, 5, 10, 20)]
    [0.1, 0.055, 0.01, 0.01]
    """
    check_number("linear_decay", "init", init)
    check_number("linear_decay", "final", final)
    check_positive_int("linear_decay", "tau", tau)

    def schedule(k):
        alpha = jnp.clip(_step(k) / tau, 0.0, 1.0)
        return (1.0 - alpha) * init + alpha * final

    return _with_end(schedule, "linear_decay", tau, final)


def inverse_time_decay(init: float, decay: float) -> Schedule:
    """Inverse-time decay, the Keras ``SGD(decay=...)`` rule.

    .. math:: \\epsilon_k = \\epsilon_0 / (1 + d\\,k)

    Args:
      init: ``eps_0``.
      decay: ``d`` (>= 0).

    Returns:
      A schedule ``k -> eps_k``.

    Source: CSE 176 Lecture 11, "Learning Rate Decay".

    >>> s = inverse_time_decay(0.1, decay=1.0)
    >>> [round(float(s(k)), 4) for k in (0, 1, 3)]
    [0.1, 0.05, 0.025]
    """
    check_number("inverse_time_decay", "init", init)
    check_number("inverse_time_decay", "decay", decay, low=0.0)
    end = init if _is_zero(decay) else 0.0
    return _with_end(lambda k: init / (1.0 + decay * _step(k)), "inverse_time_decay", None, end)


def inverse_sqrt_decay(init: float) -> Schedule:
    """Step sizes that shrink like ``1/sqrt(k)``.

    .. math:: \\epsilon_k = \\epsilon_0 / \\sqrt{1 + k}

    Args:
      init: ``eps_0``.

    Returns:
      A schedule ``k -> eps_k``.

    Source: Tips and Tricks notes.

    >>> round(float(inverse_sqrt_decay(0.1)(3)), 4)
    0.05
    """
    check_number("inverse_sqrt_decay", "init", init)
    return _with_end(lambda k: init / jnp.sqrt(1.0 + _step(k)), "inverse_sqrt_decay", None, 0.0)


def step_decay(init: float, factor: float, every: int) -> Schedule:
    """Drop the rate by ``factor`` every ``every`` steps.

    .. math:: \\epsilon_k = \\epsilon_0 \\, \\gamma^{\\lfloor k / n \\rfloor}

    Same as ``torch.optim.lr_scheduler.StepLR(step_size=every, gamma=factor)`` stepped per update.

    Args:
      init: ``eps_0``.
      factor: ``gamma`` in (0, 1].
      every: ``n``, steps between drops (>= 1).

    Returns:
      A schedule ``k -> eps_k``.

    >>> s = step_decay(0.1, factor=0.5, every=10)
    >>> [round(float(s(k)), 4) for k in (0, 9, 10, 25)]
    [0.1, 0.1, 0.05, 0.025]
    """
    check_number("step_decay", "init", init)
    check_number("step_decay", "factor", factor, low=0.0, low_open=True, high=1.0)
    check_positive_int("step_decay", "every", every)
    end = init if _is_one(factor) else 0.0
    return _with_end(lambda k: init * factor ** jnp.floor(_step(k) / every), "step_decay", None, end)


def cosine_decay(init: float, steps: int, final: float = 0.0) -> Schedule:
    """Cosine annealing from ``init`` to ``final`` over ``steps``, then ``final``.

    .. math:: \\epsilon_k = f + \\tfrac12 (\\epsilon_0 - f)(1 + \\cos(\\pi \\min(k, T) / T))

    Without restarts; equals ``optax.cosine_decay_schedule(init, steps, alpha=final/init)``.

    Args:
      init: ``eps_0``.
      steps: ``T``, the length of the decay (>= 1).
      final: ``f``, kept after step ``T``.

    Returns:
      A schedule ``k -> eps_k``.

    Source: Loshchilov & Hutter 2017 (SGDR).

    >>> s = cosine_decay(0.1, steps=10)
    >>> [round(float(s(k)), 4) for k in (0, 5, 10, 20)]
    [0.1, 0.05, 0.0, 0.0]
    """
    check_number("cosine_decay", "init", init)
    check_number("cosine_decay", "final", final)
    check_positive_int("cosine_decay", "steps", steps)

    def schedule(k):
        frac = jnp.clip(_step(k) / steps, 0.0, 1.0)
        return final + 0.5 * (init - final) * (1.0 + jnp.cos(jnp.pi * frac))

    return _with_end(schedule, "cosine_decay", steps, final)


def warmup(schedule: Schedule, steps: int) -> Schedule:
    """Linear warm-up from 0 to ``schedule(0)`` over ``steps``, then ``schedule(k - steps)``.

    .. math:: \\epsilon_k = \\epsilon'_0 \\, k / W \\;(k < W), \\qquad \\epsilon'_{k - W} \\;(k \\ge W)

    Like optax's ``warmup_*`` schedules with ``init_value=0``: the wrapped schedule starts its own
    clock when the warm-up ends.

    Args:
      schedule: the schedule ``k -> eps'_k`` that follows the warm-up.
      steps: ``W``, the warm-up's length (>= 1).

    Returns:
      A schedule ``k -> eps_k``.

    Source: Goyal et al. 2017, "gradual warmup".

    >>> s = warmup(constant(0.1), steps=4)
    >>> [round(float(s(k)), 4) for k in (0, 2, 4, 100)]
    [0.0, 0.05, 0.1, 0.1]
    """
    if not callable(schedule):
        raise TypeError(f"warmup: schedule must be a callable step -> value, got {schedule!r}")
    check_positive_int("warmup", "steps", steps)

    def warmed(k):
        kf = _step(k)
        after = schedule(jnp.maximum(jnp.asarray(k) - steps, 0))
        return jnp.where(kf < steps, schedule(0) * kf / steps, after)

    inner_end = getattr(schedule, "end", None)
    if inner_end is None:  # a user's schedule: its value at step 0 is the peak of the warm-up
        return _with_end(warmed, "warmup", steps, schedule(jnp.asarray(0, jnp.int32)))
    step, value = inner_end
    return _with_end(warmed, "warmup", None if step is None else steps + step, value)
