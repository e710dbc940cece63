"""The model families of ``jaxdl train``, as functions that return a `jaxdl.layers.Sequential`.

The CLI, the notebooks, the doctor and the benchmarks build their classifiers here, so there is
one definition of each:

- `mlp`: ``Flatten, depth x [Dense(width), (BatchNorm), activation, (Dropout)], Dense(classes)``
  (the Tips and Tricks notes' fully connected network; CSE 176 Lecture 11's BatchNorm after the
  affine layer, whose bias it makes redundant, so the bias is dropped).
- `cnn`: for each entry of ``channels`` ``[Conv 3x3, (BatchNorm), activation, MaxPool 2]``, then
  the mlp's layers on the flattened features.
- `resnet`: a 3x3 convolution, then ``blocks`` residual blocks per entry of ``channels`` (He et
  al. 2016's small ResNet for 32 px images), global average pooling and ``Dense(classes)``.
- `transformer_lm`: a decoder-only language model (GPT-2's pre-LayerNorm blocks of causal
  attention and a GELU MLP), integer tokens (B, T) to next-token logits (B, T, V).

``activation`` and ``init`` accept a name (the CLI's choices: `ACTIVATIONS`, `INITS`) or the
layer class / initializer itself. ``axis_name`` is given to every BatchNorm: data-parallel
training needs it equal to the mesh's data axis so that statistics cover the global batch.
"""

from __future__ import annotations

from typing import Any, Callable, Sequence

from jaxdl import init, layers
from jaxdl._checks import check_number, check_positive_int

__all__ = ["mlp", "cnn", "resnet", "transformer_lm", "ACTIVATIONS", "INITS"]

ACTIVATIONS: dict[str, type] = {
    "relu": layers.Relu,
    "leaky_relu": layers.LeakyRelu,
    "elu": layers.Elu,
    "tanh": layers.Tanh,
    "sigmoid": layers.Sigmoid,
    "prelu": layers.PRelu,
}
INITS: dict[str, Callable] = {
    "he_normal": init.he_normal,
    "he_uniform": init.he_uniform,
    "xavier_normal": init.xavier_normal,
    "xavier_uniform": init.xavier_uniform,
    "lecun_normal": init.lecun_normal,
    "lecun_uniform": init.lecun_uniform,
    "orthogonal": init.orthogonal(),
    "normal": init.normal(0.01),
}


def _lookup(owner: str, name: str, value: Any, table: dict) -> Any:
    if isinstance(value, str):
        if value not in table:
            raise ValueError(f"{owner}: {name}={value!r} is not one of {sorted(table)}")
        return table[value]
    if not callable(value):
        raise TypeError(f"{owner}: {name} must be a name in {sorted(table)} or a callable, got {value!r}")
    return value


def _hidden(owner, depth, width, act, w_init, batchnorm, dropout, axis_name) -> list:
    if isinstance(depth, bool) or not isinstance(depth, int) or depth < 0:
        raise ValueError(f"{owner}: depth={depth!r} is out of range; expected an integer >= 0")
    check_positive_int(owner, "width", width)
    check_number(owner, "dropout", dropout, low=0.0, high=1.0, high_open=True)
    stack = []
    for _ in range(depth):
        stack.append(layers.Dense(width, w_init=w_init, use_bias=not batchnorm))
        stack += [layers.BatchNorm(axis_name=axis_name)] if batchnorm else []
        stack.append(act())
        stack += [layers.Dropout(dropout)] if dropout else []
    return stack


def mlp(
    num_classes: int,
    *,
    depth: int = 2,
    width: int = 512,
    activation: str | type = "relu",
    init: str | Callable = "he_normal",
    batchnorm: bool = False,
    dropout: float = 0.0,
    axis_name: str | None = None,
) -> layers.Sequential:
    """A multilayer perceptron classifier.

    ``Flatten, depth x [Dense(width), (BatchNorm), activation, (Dropout(dropout))], Dense(num_classes)``.

    Every Dense layer's kernel is drawn from ``init`` (default He normal, Kira, CS 7643:
    ``N(0, 1) * sqrt(2 / n_in)``); with ``batchnorm`` the hidden Dense layers have no bias.
    ``dropout`` is the drop probability after each hidden activation (0 leaves Dropout out).
    The CLI's default MLP is ``mlp(10, dropout=0.2)``.

    Args:
      num_classes: outputs of the last Dense layer.
      depth: hidden layers (>= 0).
      width: units per hidden layer.
      activation: the hidden layers' activation, a name (``"relu"``, ``"tanh"``, ...) or a layer
        class.
      init: the kernels' initializer, a name of `jaxdl.init` or a callable (default He normal).
      batchnorm: BatchNorm after each hidden Dense layer (which then has no bias).
      dropout: drop probability after each hidden activation (0 leaves Dropout out).
      axis_name: BatchNorm's axis for data-parallel statistics.

    Returns:
      A `jaxdl.layers.Sequential`.

    Source: Tips and Tricks notes (fully connected networks); CSE 176 Lecture 11 (BatchNorm);
    Kira, CS 7643 (He initialization).

    >>> import jax
    >>> net = mlp(10, depth=2, width=16)
    >>> shape, params, state = net.init(jax.random.key(0), (28, 28, 1))
    >>> shape, sorted(params)
    ((10,), ['dense_1', 'dense_3', 'dense_5'])
    """
    owner = "mlp"
    check_positive_int(owner, "num_classes", num_classes)
    act = _lookup(owner, "activation", activation, ACTIVATIONS)
    w_init = _lookup(owner, "init", init, INITS)
    stack = [layers.Flatten()]
    stack += _hidden(owner, depth, width, act, w_init, batchnorm, dropout, axis_name)
    stack.append(layers.Dense(num_classes, w_init=w_init))
    return layers.Sequential(*stack)


def _channels(owner, channels):
    channels = tuple(channels)
    if not channels:
        raise ValueError(f"{owner}: channels={channels!r} is empty; expected at least one convolution")
    for c in channels:
        check_positive_int(owner, "channels", c)
    return channels


def cnn(
    num_classes: int,
    *,
    channels: Sequence[int] = (32, 64),
    depth: int = 1,
    width: int = 128,
    activation: str | type = "relu",
    init: str | Callable = "he_normal",
    batchnorm: bool = False,
    dropout: float = 0.0,
    conv_impl: str = "auto",
    axis_name: str | None = None,
) -> layers.Sequential:
    """A small convolutional classifier.

    For each ``c`` in ``channels``: ``Conv(c, 3), (BatchNorm), activation, MaxPool(2)``; then
    ``Flatten`` and the `mlp` head (``depth`` hidden layers of ``width``, ``Dense(num_classes)``).

    Input NHWC. ``conv_impl`` is `jaxdl.layers.Conv`'s ``impl`` ('auto' picks the algorithm per
    backend). The CLI's default CNN is ``cnn(10, depth=1, width=128, dropout=0.25)``.

    Args:
      num_classes: outputs of the last Dense layer.
      channels: the convolutions' output channels, one 3x3 convolution (and 2x2 max pool) each.
      depth, width, activation, init, batchnorm, dropout, axis_name: as in `mlp`.
      conv_impl: `jaxdl.layers.Conv`'s ``impl``.

    Returns:
      A `jaxdl.layers.Sequential`.
    """
    owner = "cnn"
    check_positive_int(owner, "num_classes", num_classes)
    channels = _channels(owner, channels)
    act = _lookup(owner, "activation", activation, ACTIVATIONS)
    w_init = _lookup(owner, "init", init, INITS)
    stack = []
    for c in channels:
        stack.append(layers.Conv(c, 3, w_init=w_init, use_bias=not batchnorm, impl=conv_impl))
        stack += [layers.BatchNorm(axis_name=axis_name)] if batchnorm else []
        stack += [act(), layers.MaxPool(2)]
    stack.append(layers.Flatten())
    stack += _hidden(owner, depth, width, act, w_init, batchnorm, dropout, axis_name)
    stack.append(layers.Dense(num_classes, w_init=w_init))
    return layers.Sequential(*stack)


def resnet(
    num_classes: int,
    *,
    channels: Sequence[int] = (16, 32, 64),
    blocks: int = 1,
    activation: str | type = "relu",
    init: str | Callable = "he_normal",
    conv_impl: str = "auto",
    axis_name: str | None = None,
) -> layers.Sequential:
    """The small ResNet of He et al. 2016 for 28-32 px images, with BatchNorm.

    Architecture (input NHWC; ``act`` = ``activation``; every convolution without bias, as the
    BatchNorm after it makes the bias redundant)::

        Conv(channels[0], 3), BatchNorm, act                                     # stem
        for each stage s, c = channels[s]; for each block b < blocks:
            main = Conv(c, 3, strides), BatchNorm, act, Conv(c, 3), BatchNorm
            Residual(main), act                        if the shape is kept
            Add(main, [Conv(c, 1, strides), BatchNorm]), act   if it changes
        GlobalAvgPool, Dense(num_classes)

    ``strides`` is 2 in the first block of every stage after the first (the feature map halves
    and the width changes), else 1. With the defaults on 32x32 inputs the maps are 32, 16 and 8
    pixels wide; ``blocks=n`` gives the paper's 6n+2 layers (n=3: ResNet-20). Kernels are drawn
    from ``init`` (default He normal), BatchNorm has ``axis_name`` (set it to the data axis in
    data-parallel training so that the statistics are those of the global batch).

    Differences from the paper: where the shape changes, the shortcut is the 1x1 convolution and
    BatchNorm projection (the paper's option B, used for ImageNet in sec. 3.3 and PyTorch's
    torchvision ResNets) instead of the zero-padded identity (option A) of its CIFAR-10 models
    (sec. 4.2).

    Source: K. He, X. Zhang, S. Ren, J. Sun, "Deep Residual Learning for Image Recognition",
    CVPR 2016 (arXiv:1512.03385), sec. 3.3 and 4.2.

    Args:
      num_classes: outputs of the Dense head.
      channels: width of each stage (and of the stem: ``channels[0]``).
      blocks: basic blocks per stage, >= 1.
      activation, init, conv_impl, axis_name: as `cnn`.

    Returns:
      A `jaxdl.layers.Sequential` of ``Conv, BatchNorm, act``, the blocks each followed by
      ``act``, ``GlobalAvgPool, Dense``.

    >>> import jax
    >>> net = resnet(10, channels=(8, 16), blocks=1)
    >>> net.init(jax.random.key(0), (8, 8, 1))[0]
    (10,)
    """
    owner = "resnet"
    check_positive_int(owner, "num_classes", num_classes)
    channels = _channels(owner, channels)
    check_positive_int(owner, "blocks", blocks)
    act = _lookup(owner, "activation", activation, ACTIVATIONS)
    w_init = _lookup(owner, "init", init, INITS)

    def conv(c, size, strides=1):
        return layers.Conv(c, size, strides=strides, w_init=w_init, use_bias=False, impl=conv_impl)

    def bn():
        return layers.BatchNorm(axis_name=axis_name)

    stack = [conv(channels[0], 3), bn(), act()]
    width = channels[0]
    for stage, c in enumerate(channels):
        for block in range(blocks):
            strides = 2 if stage > 0 and block == 0 else 1
            main = layers.Sequential(conv(c, 3, strides), bn(), act(), conv(c, 3), bn())
            if strides == 1 and c == width:
                stack.append(layers.Residual(main))
            else:
                stack.append(layers.Add(main, layers.Sequential(conv(c, 1, strides), bn())))
            stack.append(act())
            width = c
    stack += [layers.GlobalAvgPool(), layers.Dense(num_classes, w_init=w_init)]
    return layers.Sequential(*stack)


def transformer_lm(
    vocab_size: int,
    *,
    seq_len: int,
    depth: int,
    width: int,
    heads: int,
    mlp_ratio: int = 4,
    dropout: float = 0.0,
) -> layers.Sequential:
    """A decoder-only transformer language model: tokens (B, T) -> next-token logits (B, T, V).

    The decoder of Vaswani et al. 2017 without cross-attention, with GPT-2's pre-LayerNorm
    blocks (Radford et al. 2019, sec. 2.3: LayerNorm at the input of each sub-block and after
    the last block)::

        h = Embedding(V, width)(tokens) + P[:T]                # PositionalEmbedding(seq_len)
        h = Dropout(h)
        depth x:
            h = h + Dropout(MultiHeadAttention(heads, causal)(LayerNorm(h)))
            h = h + Dropout(Dense(width)(Gelu(Dense(mlp_ratio * width)(LayerNorm(h)))))
        logits = Dense(V)(LayerNorm(h))

    Position t attends to positions <= t only, so the logits at t depend on tokens 0..t alone:
    train with ``y[:, t] = x[:, t + 1]`` (the next token) and the default per-token
    cross-entropy of `jaxdl.fit` (targets -100 are padding, left out). The block is
    ``torch.nn.TransformerEncoderLayer(width, heads, mlp_ratio * width, norm_first=True,
    activation='gelu', batch_first=True)`` run with a causal mask (exact GELU, LayerNorm eps
    1e-5). ``dropout`` is also the attention weights' dropout. Initialization: token and position
    embeddings N(0, 0.02^2) and N(0, 0.01^2) (GPT-2's), the Dense and attention kernels jaxdl's
    default (Xavier normal); GPT-2 draws every kernel from N(0, 0.02^2) and scales the residual
    projections by 1/sqrt(2 depth), and ties the head to the token embedding (here it is a
    separate Dense).

    Sources: A. Vaswani et al., "Attention Is All You Need", NeurIPS 2017 (arXiv:1706.03762);
    A. Radford, J. Wu, R. Child, D. Luan, D. Amodei, I. Sutskever, "Language Models are
    Unsupervised Multitask Learners" (GPT-2), OpenAI 2019.

    Args:
      vocab_size: V, the number of token ids (inputs in [0, V)) and of logits.
      seq_len: the longest sequence (positions of the position embedding); inputs may be shorter.
      depth: number of blocks, >= 1.
      width: the model's width (features of every position), divisible by ``heads``.
      heads: attention heads, >= 1.
      mlp_ratio: hidden width of the MLP over ``width``, >= 1.
      dropout: drop probability, in [0, 1) (0 leaves Dropout out).

    Returns:
      A `jaxdl.layers.Sequential`: ``Embedding, PositionalEmbedding, (Dropout)``, ``depth`` pairs
      of `jaxdl.layers.Residual` blocks, ``LayerNorm, Dense(vocab_size)``.

    >>> import jax
    >>> lm = transformer_lm(50, seq_len=16, depth=1, width=32, heads=4)
    >>> lm.init(jax.random.key(0), (16,))[0]
    (16, 50)
    """
    owner = "transformer_lm"
    check_positive_int(owner, "vocab_size", vocab_size)
    check_positive_int(owner, "seq_len", seq_len)
    check_positive_int(owner, "depth", depth)
    check_positive_int(owner, "width", width)
    check_positive_int(owner, "heads", heads)
    check_positive_int(owner, "mlp_ratio", mlp_ratio)
    check_number(owner, "dropout", dropout, low=0.0, high=1.0, high_open=True)
    if width % heads:
        raise ValueError(
            f"{owner}: width={width} is not divisible by heads={heads}; expected a multiple of heads"
        )
    drop = [layers.Dropout(dropout)] if dropout else []
    stack = [
        layers.Embedding(vocab_size, width, w_init=init.normal(0.02)),
        layers.PositionalEmbedding(seq_len, w_init=init.normal(0.01)),
        *drop,
    ]
    for _ in range(depth):
        attention = layers.MultiHeadAttention(heads, causal=True, dropout=dropout)
        mlp_ = [layers.Dense(mlp_ratio * width), layers.Gelu(), layers.Dense(width)]
        stack.append(layers.Residual(layers.Sequential(layers.LayerNorm(), attention, *drop)))
        stack.append(layers.Residual(layers.Sequential(layers.LayerNorm(), *mlp_, *drop)))
    stack += [layers.LayerNorm(), layers.Dense(vocab_size)]
    return layers.Sequential(*stack)
