"""Mixed precision: a dtype `Policy` (float32 master weights, bfloat16/float16 compute) and
loss scaling for float16, as pure functions of explicit state.

Mixed-precision training (Micikevicius et al. 2018, "Mixed precision training", ICLR): keep a
float32 *master copy* of the weights and the optimizer state, run the forward and backward passes
in a 16-bit compute dtype, and apply the (float32) gradient to the master weights. One step::

    params (f32) --cast--> params (compute) --forward/backward (compute)--> grads --cast--> f32
    loss, softmax: float32 (the model's outputs are cast to ``output_dtype`` before the loss)

With bfloat16 (8 exponent bits, float32's range) this is all; float16 (5 exponent bits) flushes
small gradients to zero, so the loss is multiplied by a scale S before the backward pass and the
gradient divided by S after it (`LossScale`, `DynamicLossScale`):

.. math:: g = \\frac{1}{S} \\nabla (S \\cdot L)

A step whose scaled gradient overflows (NaN/Inf) is skipped: parameters, model state and
optimizer state are kept (the train step's ``nonfinite`` metric counts it). The dynamic scale
follows PyTorch's ``torch.amp.GradScaler`` (init 2**15, growth_interval 2000, growth factor 2,
backoff 0.5): ``S <- S/2`` on an overflow, ``S <- 2 S`` after ``growth_interval`` finite steps
in a row. The scale is a leaf of the `TrainState` (``state.loss_scale``), so it is checkpointed,
resumes bitwise and can be vmapped over in a sweep.

This is what jmp (DeepMind) and flax's examples do; the difference from PyTorch's autocast is
that the *whole* model runs in the compute dtype (autocast picks per op) except what the layers
compute in float32 themselves (the loss on float32 outputs; `jaxdl.layers.BatchNorm` reduces its
statistics with float32 accumulation).
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
from flax import struct

from jaxdl._checks import check_number, check_positive_int

__all__ = [
    "Policy",
    "get_policy",
    "with_policy",
    "PolicyModel",
    "LossScale",
    "DynamicLossScale",
    "LossScaleState",
    "get_loss_scale",
    "PRECISIONS",
]

PRECISIONS = ("fp32", "bf16", "fp16")


def _float_dtype(owner: str, name: str, value) -> jnp.dtype:
    try:
        dtype = jnp.dtype(value)
    except TypeError:
        dtype = None
    if dtype is None or not jnp.issubdtype(dtype, jnp.floating):
        raise ValueError(
            f"{owner}: {name}={value!r} is not a floating dtype; expected e.g. "
            "jnp.float32, jnp.bfloat16 or jnp.float16"
        )
    return dtype


def _cast_floats(tree, dtype):
    """Every floating leaf of ``tree`` as ``dtype``; integer leaves (labels) and keys unchanged."""

    def cast(x):
        if hasattr(x, "dtype") and jnp.issubdtype(x.dtype, jnp.floating):
            return x.astype(dtype)
        return x

    return jax.tree.map(cast, tree)


@dataclasses.dataclass(frozen=True)
class Policy:
    """Which dtype the parameters are kept in, the model computes in, and its outputs have.

    ``Policy(param_dtype=float32, compute_dtype=bfloat16, output_dtype=float32)``: float32
    master weights and optimizer state, forward and backward in bfloat16, outputs (logits) cast
    to float32 before the loss. ``get_policy("bf16")`` builds exactly this one. Hashable (a static
    argument of compiled functions).

    Args:
      param_dtype: the parameters' (and optimizer state's) dtype.
      compute_dtype: the dtype the model runs in.
      output_dtype: the dtype of the model's outputs.

    Source: Micikevicius et al. 2018.
    """

    param_dtype: Any = jnp.float32
    compute_dtype: Any = jnp.float32
    output_dtype: Any = jnp.float32

    def __post_init__(self):
        for name in ("param_dtype", "compute_dtype", "output_dtype"):
            object.__setattr__(self, name, _float_dtype("Policy", name, getattr(self, name)))

    def cast_to_compute(self, tree):
        """Floating leaves as ``compute_dtype``."""
        return _cast_floats(tree, self.compute_dtype)

    def cast_to_param(self, tree):
        """Floating leaves as ``param_dtype``."""
        return _cast_floats(tree, self.param_dtype)

    def cast_to_output(self, tree):
        """Floating leaves as ``output_dtype``."""
        return _cast_floats(tree, self.output_dtype)


_NAMED = {
    "fp32": None,
    "bf16": Policy(jnp.float32, jnp.bfloat16, jnp.float32),
    "fp16": Policy(jnp.float32, jnp.float16, jnp.float32),
}


def get_policy(precision, owner: str = "precision") -> Policy | None:
    """A `Policy` from ``precision``: None or ``"fp32"`` (no policy: the float32 program),
    ``"bf16"`` / ``"fp16"`` (float32 master weights, bfloat16 / float16 compute, float32
    outputs), or a `Policy` itself.

    Args:
      precision: None, ``"fp32"``, ``"bf16"``, ``"fp16"`` or a `Policy`.
      owner: the caller's name, for the error messages.

    Returns:
      A `Policy`, or None for float32.

    >>> str(get_policy("bf16").compute_dtype)
    'bfloat16'
    """
    if precision is None or isinstance(precision, Policy):
        return precision
    if isinstance(precision, str) and precision in _NAMED:
        return _NAMED[precision]
    raise ValueError(
        f"{owner}: precision={precision!r} is unknown; expected one of "
        f"{', '.join(PRECISIONS)}, None or a jaxdl.precision.Policy"
    )


@dataclasses.dataclass(frozen=True)
class PolicyModel:
    """``model`` run under ``policy``: parameters and floating inputs cast to the compute dtype,
    outputs cast to the output dtype, model state (BatchNorm's running statistics) kept in its
    own dtype (float32). ``init`` is the model's (float32 master parameters).

    Args:
      model: a jaxdl layer.
      policy: a `Policy`.
    """

    model: Any
    policy: Policy

    def init(self, key, input_shape):
        """The wrapped model's ``init``."""
        return self.model.init(key, input_shape)

    def with_batch_statistics(self):
        """The wrapped model's ``with_batch_statistics`` (see `jaxdl.layers.Layer`), kept under
        the policy; ``(self, 0)`` for a model without the method."""
        method = getattr(self.model, "with_batch_statistics", None)
        if method is None:
            return self, 0
        model, n = method()
        return dataclasses.replace(self, model=model), n

    def apply(self, params, state, x, *, train=False, key=None):
        """``cast_to_output(model.apply(cast_to_compute(params), state, cast_to_compute(x)))``."""
        p = self.policy
        y, new_state = self.model.apply(
            p.cast_to_compute(params), state, p.cast_to_compute(x), train=train, key=key
        )
        new_state = jax.tree.map(lambda n, o: n.astype(o.dtype), new_state, state)
        return p.cast_to_output(y), new_state


class _PolicyLoss:
    """A loss of the train-step protocol whose params and batch are cast to the compute dtype and
    whose loss and aux are cast to float32 (for losses without a ``model`` to wrap)."""

    def __init__(self, inner, policy):
        self.inner, self.policy = inner, policy
        self.model = getattr(inner, "model", None)

    def __call__(self, params, model_state, batch, key=None, **kwargs):
        p = self.policy
        loss, (model_state_new, aux) = self.inner(
            p.cast_to_compute(params), model_state, p.cast_to_compute(batch), key, **kwargs
        )
        model_state_new = jax.tree.map(lambda n, o: n.astype(o.dtype), model_state_new, model_state)
        return loss.astype(jnp.float32), (model_state_new, _cast_floats(aux, jnp.float32))

    def __hash__(self):
        return hash((type(self), self.inner, self.policy))

    def __eq__(self, other):
        return type(other) is type(self) and (self.inner, self.policy) == (other.inner, other.policy)


def with_policy(loss_fn, policy: Policy | None):
    """``loss_fn`` run under ``policy`` (``loss_fn`` itself when ``policy`` is None).

    A loss with a ``model`` field (`jaxdl.train_step.SupervisedLoss`) gets its model wrapped in
    `PolicyModel`, so the loss and softmax run on float32 outputs; a loss wrapping another in
    ``inner`` (`jaxdl.trainer.AugmentedLoss`) is wrapped inside; any other loss gets its params
    and batch cast to the compute dtype and its loss cast to float32. Gradients with respect to
    the float32 params come back float32 (the cast's transpose).

    Args:
      loss_fn: the train step's loss.
      policy: a `Policy` or None.

    Returns:
      The loss run under ``policy``.
    """
    if policy is None:
        return loss_fn
    if isinstance(getattr(loss_fn, "model", None), PolicyModel):
        return loss_fn
    if dataclasses.is_dataclass(loss_fn) and any(f.name == "model" for f in dataclasses.fields(loss_fn)):
        return dataclasses.replace(loss_fn, model=PolicyModel(loss_fn.model, policy))
    if hasattr(loss_fn, "_replace") and hasattr(loss_fn, "inner"):
        return loss_fn._replace(inner=with_policy(loss_fn.inner, policy))
    return _PolicyLoss(loss_fn, policy)


# ----------------------------------------------------------------------------- loss scaling


class LossScaleState(struct.PyTreeNode):
    """The loss scale's state in the `TrainState`: ``scale`` (float32) and ``good_steps`` (int32,
    finite steps in a row since the last change)."""

    scale: jax.Array
    good_steps: jax.Array


@dataclasses.dataclass(frozen=True)
class LossScale:
    """A static loss scale S: ``g = grad(S L) / S``; a step that overflows is skipped, S stays.

    ``scale`` is only the initial value of ``state.loss_scale.scale``: a sweep can vmap over it.

    Args:
      scale: the initial scale S.

    Source: Micikevicius et al. 2018.
    """

    scale: float = 2.0**15

    def __post_init__(self):
        check_number("LossScale", "scale", self.scale, low=0, low_open=True)

    def init(self) -> LossScaleState:
        """The initial `LossScaleState`."""
        return LossScaleState(jnp.asarray(self.scale, jnp.float32), jnp.zeros([], jnp.int32))

    def update(self, state: LossScaleState, finite) -> LossScaleState:
        """Static: unchanged."""
        del finite
        return state


@dataclasses.dataclass(frozen=True)
class DynamicLossScale(LossScale):
    """PyTorch's ``GradScaler`` rule (Micikevicius et al. 2018, sec. 3.2; dynamic variant):

    .. math:: S \\leftarrow \\begin{cases} S \\cdot \\text{backoff} & \\text{overflow (step skipped)} \\\\
              S \\cdot \\text{growth} & \\text{after growth\\_interval finite steps in a row} \\\\
              S & \\text{otherwise} \\end{cases}

    Defaults are GradScaler's: ``scale=2**15``, ``growth_interval=2000``, ``growth_factor=2``,
    ``backoff_factor=0.5``. Like GradScaler, the scale is not bounded below; unlike it, the
    skipped step is still counted in ``state.step`` (the schedules advance).

    Args:
      growth_interval: finite steps in a row before S grows.
      growth_factor: the growth multiplier.
      backoff_factor: the multiplier on overflow.

    Source: Micikevicius et al. 2018.
    """

    growth_interval: int = 2000
    growth_factor: float = 2.0
    backoff_factor: float = 0.5

    def __post_init__(self):
        super().__post_init__()
        check_positive_int("DynamicLossScale", "growth_interval", self.growth_interval)
        check_number("DynamicLossScale", "growth_factor", self.growth_factor, low=1, low_open=True)
        check_number(
            "DynamicLossScale",
            "backoff_factor",
            self.backoff_factor,
            low=0,
            high=1,
            low_open=True,
            high_open=True,
        )

    def update(self, state: LossScaleState, finite) -> LossScaleState:
        """The next scale after a step that was ``finite`` (or overflowed)."""
        good = jnp.where(finite, state.good_steps + 1, 0)
        grow = good >= self.growth_interval
        scale = jnp.where(
            finite,
            jnp.where(grow, state.scale * self.growth_factor, state.scale),
            state.scale * self.backoff_factor,
        )
        return LossScaleState(scale.astype(jnp.float32), jnp.where(grow, 0, good).astype(jnp.int32))


def get_loss_scale(loss_scale, owner: str = "loss_scale") -> LossScale | None:
    """None (no scaling), ``"dynamic"`` (`DynamicLossScale` with GradScaler's defaults), a
    number (a static `LossScale`), or a `LossScale`/`DynamicLossScale` itself.

    Args:
      loss_scale: None, ``"dynamic"``, a number > 0, a `LossScale` or a `DynamicLossScale`.
      owner: the caller's name, for the error messages.

    Returns:
      A loss scale object, or None.
    """
    if loss_scale is None or isinstance(loss_scale, LossScale):
        return loss_scale
    if isinstance(loss_scale, str):
        if loss_scale == "dynamic":
            return DynamicLossScale()
        raise ValueError(
            f"{owner}: loss_scale={loss_scale!r} is unknown; expected None, "
            "'dynamic', a number > 0 or a jaxdl.precision.LossScale"
        )
    if isinstance(loss_scale, bool):
        raise TypeError(f"{owner}: loss_scale must be None, 'dynamic' or a number > 0, got {loss_scale!r}")
    try:
        check_number(owner, "loss_scale", loss_scale, low=0, low_open=True)
    except TypeError as err:
        raise TypeError(f"{owner}: loss_scale must be None, 'dynamic' or a number > 0; {err}") from None
    return LossScale(float(loss_scale))
