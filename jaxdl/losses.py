"""Losses and metrics. Each returns a scalar: the mean over every example (every leading axis).

Shapes and dtypes are checked when the function is traced (they are static under `jax.jit`).
Label *values* cannot be checked inside jit, so a class index outside ``[0, C)`` (negative
included) is not an error here but cannot go unnoticed: `softmax_cross_entropy` is NaN (the
train step then skips the step and counts it in ``nonfinite``) and `accuracy` counts it as
wrong. Where labels are host arrays (`jaxdl.fit`, `jaxdl.evaluate`, the data loaders) they are
checked before anything runs (`jaxdl.train_step.check_labels`).

Padding: `softmax_cross_entropy` and `accuracy` leave out every target equal to
``ignore_index`` (default `IGNORE_INDEX` = -100, PyTorch's ``F.cross_entropy`` rule) and average
over the others, so sequences of different lengths padded to one length T train as if unpadded:
set the targets of padding positions to -100 (e.g. ``y = np.where(y == pad_id, -100, y)``).
"""

import jax
import jax.numpy as jnp

__all__ = ["IGNORE_INDEX", "softmax_cross_entropy", "binary_cross_entropy", "mse", "l2_penalty", "accuracy"]

IGNORE_INDEX = -100  # a target left out of the loss and the accuracy (PyTorch's ignore_index)


def _check_class_labels(fn, logits, labels):
    if logits.ndim < 1:
        raise ValueError(f"{fn}: logits must have a class axis (last), got a scalar")
    if not jnp.issubdtype(labels.dtype, jnp.integer):
        raise TypeError(
            f"{fn}: labels must be integer class indices (dtype int), got dtype {labels.dtype}; "
            "for one-hot targets use optax.softmax_cross_entropy"
        )
    if labels.shape != logits.shape[:-1]:
        raise ValueError(
            f"{fn}: labels must have shape logits.shape[:-1] = {logits.shape[:-1]}, got {labels.shape}"
        )


def _counted(labels, ignore_index):
    """The targets that count (not ``ignore_index``) and their number, at least 1."""
    counted = jnp.ones(labels.shape, bool) if ignore_index is None else labels != ignore_index
    return counted, jnp.maximum(jnp.sum(counted), 1)


def softmax_cross_entropy(logits, labels, *, ignore_index=IGNORE_INDEX):
    """Mean negative log-likelihood of integer labels under softmax(logits).

    L = sum_{i: y_i != ignore} [ logsumexp(z_i) - z_i[y_i] ] / #{i: y_i != ignore}.

    Args:
      logits: (..., C) floats.
      labels: (...) integers in [0, C), or ``ignore_index`` for a target to leave out (padding
        of token sequences: logits (B, T, V), labels (B, T)).
      ignore_index: the label value left out (default -100); None counts every label.

    Returns:
      The scalar mean L over the counted labels.

    A batch whose labels are all ignored gives L = 0 and no gradient (PyTorch gives NaN). A label outside [0, C) that is not ignored,
    negative included, makes L NaN (numpy indexing would read class C-1 for label -1 and train
    on it silently; optax gives no error either), so the train step skips such a step and counts
    it in ``nonfinite``, as PyTorch's ``F.cross_entropy`` raises on it. At initialization a
    C-class classifier with small weights gives L ~ ln C (the sanity check of Sarkar, CS60010).
    Equals `optax.softmax_cross_entropy_with_integer_labels` averaged over the counted labels and
    PyTorch's ``F.cross_entropy(reduction='mean', ignore_index=-100)`` for valid labels.

    >>> round(float(softmax_cross_entropy([[0.0, 0.0], [0.0, 0.0]], [0, 1])), 4)  # ln 2
    0.6931
    >>> round(float(softmax_cross_entropy([[0.0, 0.0], [9.0, 0.0]], [1, -100])), 4)  # padding
    0.6931
    """
    logits, labels = jnp.asarray(logits), jnp.asarray(labels)
    _check_class_labels("softmax_cross_entropy", logits, labels)
    logp = jax.nn.log_softmax(logits, axis=-1)
    valid = (labels >= 0) & (labels < logits.shape[-1])
    picked = jnp.take_along_axis(logp, jnp.where(valid, labels, 0)[..., None], axis=-1)[..., 0]
    counted, n = _counted(labels, ignore_index)
    nll = jnp.where(counted, jnp.where(valid, -picked, jnp.nan), 0.0)
    return jnp.sum(nll) / n.astype(nll.dtype)


def binary_cross_entropy(logits, labels):
    """Mean binary cross-entropy from logits, stable for any finite logit.

    L = mean[ -y log sigmoid(z) - (1-y) log(1 - sigmoid(z)) ]
      = mean[ max(z, 0) - z*y + log(1 + exp(-|z|)) ],
    the second form never exponentiates a positive number. Equals
    `optax.sigmoid_binary_cross_entropy(...).mean()` and PyTorch's
    `F.binary_cross_entropy_with_logits`.

    Args:
      logits: floats ``z``, any shape.
      labels: 0/1 (or probabilities) ``y``, the shape of ``logits``.

    Returns:
      The scalar mean L.

    >>> round(float(binary_cross_entropy([0.0, 0.0], [0.0, 1.0])), 4)  # ln 2
    0.6931
    """
    logits, labels = jnp.asarray(logits), jnp.asarray(labels)
    if labels.shape != logits.shape:
        raise ValueError(
            f"binary_cross_entropy: labels must have the shape of logits {logits.shape}, got {labels.shape}"
        )
    labels = labels.astype(logits.dtype)
    return jnp.mean(jnp.maximum(logits, 0) - logits * labels + jnp.log1p(jnp.exp(-jnp.abs(logits))))


def mse(pred, target):
    """Mean squared error over every element.

    L = mean((pred - target)^2). No factor 1/2 (unlike `optax.l2_loss`); equals PyTorch's
    `F.mse_loss`.

    Args:
      pred: predictions, any shape.
      target: targets, the shape of ``pred``.

    Returns:
      The scalar mean L.

    >>> float(mse([1.0, 2.0], [1.0, 4.0]))
    2.0
    """
    pred, target = jnp.asarray(pred), jnp.asarray(target)
    if pred.shape != target.shape:
        raise ValueError(f"mse: target must have the shape of pred {pred.shape}, got {target.shape}")
    return jnp.mean(jnp.square(pred - target))


def l2_penalty(params):
    """Half the squared L2 norm of every leaf: 0.5 * sum_w w^2, weight decay as a loss term.

    With the factor 1/2 the gradient is the parameters themselves, so adding
    ``rate * l2_penalty(params)`` to the loss gives the same gradient as the
    `add_weight_decay(rate)` transform (g + rate * w) and PyTorch's ``weight_decay=rate``.
    Every leaf counts, biases and BatchNorm scales included; pass a sub-tree (e.g.
    ``{k: v for k, v in params.items() if ...}``) to exclude some.

    Args:
      params: a pytree of arrays.

    Returns:
      The scalar penalty (0 for an empty tree).

    Source: Tips and Tricks notes (weight decay).

    >>> float(l2_penalty({"w": [1.0, 2.0], "b": [2.0]}))
    4.5
    """
    leaves = jax.tree.leaves(params)
    if not leaves:
        return jnp.zeros(())
    return 0.5 * sum(jnp.sum(jnp.square(w)) for w in leaves)


def accuracy(logits, labels, *, ignore_index=IGNORE_INDEX):
    """Fraction of the counted labels whose arg-max logit is the label.

    acc = sum_{i: y_i != ignore} [argmax(z_i) == y_i] / #{i: y_i != ignore}.

    Per token for sequences (logits (B, T, V), labels (B, T)); 0 when every label is ignored.
    A label outside [0, C) that is not ignored, negative included, never equals an arg-max, so
    it counts as wrong (numpy-style wrapping of -1 to the last class never happens here).

    Args:
      logits: (..., C) floats.
      labels: (...) integers; ``ignore_index`` marks a label left out.
      ignore_index: the label value left out (default -100); None counts every label.

    Returns:
      The scalar fraction in [0, 1].

    >>> float(accuracy([[2.0, 0.0], [0.0, 1.0], [5.0, 0.0]], [0, 0, -100]))
    0.5
    """
    logits, labels = jnp.asarray(logits), jnp.asarray(labels)
    _check_class_labels("accuracy", logits, labels)
    counted, n = _counted(labels, ignore_index)
    return jnp.sum(counted & (jnp.argmax(logits, axis=-1) == labels)) / n
