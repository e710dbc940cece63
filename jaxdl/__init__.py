"""jaxdl: a small, purely functional deep-learning toolkit on JAX.

``import jaxdl as dl``. Every piece is a pure function of explicit values (params, model state,
optimizer state, a PRNG key, a step counter); see DESIGN.md for the public names.
"""

from jaxdl import optimizers, schedules, transforms
from jaxdl.optimizers import adagrad, adam, adamw, apply_updates, rmsprop, sgd, signsgd
from jaxdl.transforms import (
    add_noise,
    add_weight_decay,
    chain,
    clip,
    clip_by_global_norm,
    freeze,
    identity,
    masked,
    momentum,
    nesterov,
    scale,
    scale_by_adagrad,
    scale_by_adam,
    scale_by_learning_rate,
    scale_by_rms,
    sign,
    sign_with_error_feedback,
    skip_nonfinite,
)

__version__ = "0.1.0"
