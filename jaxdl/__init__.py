"""jaxdl: a small, purely functional deep-learning toolkit on JAX.

``import jaxdl as dl``. Every piece is a pure function of explicit values (params, model state,
optimizer state, a PRNG key, a step counter); docs/design.md has the layout, the README the names.
"""

from jaxdl import (
    callbacks,
    compile_cache,
    data,
    diagnostics,
    doctor,
    init,
    layers,
    losses,
    models,
    nnx,
    optimizers,
    parallel,
    precision,
    preemption,
    schedules,
    sources,
    sweep,
    train_step,
    trainer,
    transforms,
)
from jaxdl.callbacks import Callback, EarlyStopping
from jaxdl.layers import (
    Add,
    AvgPool,
    BatchNorm,
    Conv,
    Dense,
    Dropout,
    Elu,
    Embedding,
    Flatten,
    Gelu,
    GlobalAvgPool,
    LayerNorm,
    LeakyRelu,
    Maxout,
    MaxPool,
    MultiHeadAttention,
    PositionalEmbedding,
    PRelu,
    Relu,
    Remat,
    Residual,
    RMSNorm,
    Sequential,
    Sigmoid,
    Tanh,
    fold_batchnorm,
    from_flax,
)
from jaxdl.losses import IGNORE_INDEX, accuracy, binary_cross_entropy, l2_penalty, mse, softmax_cross_entropy
from jaxdl.nnx import from_nnx, update_module
from jaxdl.optimizers import (
    adagrad,
    adam,
    adamw,
    apply_updates,
    muon,
    rmsprop,
    schedule_free_adamw,
    schedule_free_sgd,
    sgd,
    signsgd,
)
from jaxdl.parallel import (
    collective_bytes,
    data_mesh,
    fsdp_shardings,
    make_pmap_train_step,
    make_sharded_train_loop,
    make_sharded_train_step,
    onebit_allreduce,
    put_batch,
    put_state,
    replicate,
    shard_batch,
    unreplicate,
)
from jaxdl.precision import DynamicLossScale, LossScale, Policy
from jaxdl.preemption import Preempted
from jaxdl.sweep import coarse_to_fine, grid, scale_init
from jaxdl.train_step import (
    StepOptions,
    TrainState,
    make_eval_step,
    make_train_loop,
    make_train_step,
    recalibrate_batchnorm,
    supervised_loss,
)
from jaxdl.trainer import FitConfig, FitResult, evaluate, fit
from jaxdl.transforms import (
    add_noise,
    add_weight_decay,
    chain,
    clip,
    clip_by_global_norm,
    decay_mask,
    freeze,
    identity,
    masked,
    momentum,
    nesterov,
    orthogonalize,
    partition,
    scale,
    scale_by_adagrad,
    scale_by_adam,
    scale_by_learning_rate,
    scale_by_muon,
    scale_by_rms,
    schedule_free,
    schedule_free_eval_params,
    sign,
    sign_with_error_feedback,
    skip_nonfinite,
)

# `dl.sweep` is the module; its function is `dl.sweep.sweep` (or `from jaxdl.sweep import sweep`).
# `jaxdl.checkpoint` (orbax, ~1 s to import) is imported on first use: `from jaxdl import checkpoint`.

__version__ = "0.1.0"
