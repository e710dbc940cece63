"""Small-CNN training step: jaxdl vs flax.linen + optax vs PyTorch eager (NCHW, channels_last).

Model: 32x32x3 -> Conv3x3-32 -> BN -> ReLU -> Conv3x3-64 stride 2 -> BN -> ReLU -> global average
pool -> Dense 10; batch 128; softmax cross-entropy; SGD lr 0.01, momentum 0.9 (PyTorch's rule
v <- 0.9 v + g, p <- p - lr v, written inline for jaxdl; optax.sgd for flax). One step = forward,
backward and update. jaxdl runs with two Conv lowerings: 'xla' (lax.conv_general_dilated
everywhere) and 'auto' (the default; on the CPU it picks im2col for both convolutions of this
model: the 3x3 RGB input layer and the 3x3 stride-2 layer, so it equals impl='im2col' here).

Timing: after warm-up (compilation), ROUNDS rounds; in each round every contender runs STEPS
steps back to back, in a rotating order, so that load from other processes hits all of them
alike. A sample is the mean step time of one round; we print the median, min and max over
rounds and each contender's median relative to PyTorch eager (NCHW).

    python benchmarks/layers_cnn.py            # about 1-2 minutes on a 2-core CPU
"""

import os
import platform
import time

os.environ.setdefault("JAX_PLATFORMS", "cpu")

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import torch

import jaxdl.layers as L
from jaxdl.losses import softmax_cross_entropy

BATCH, ROUNDS, STEPS, LR, MU = 128, 6, 4, 0.01, 0.9


def jaxdl_step_fn(impl):
    model = L.Sequential(
        L.Conv(32, 3, impl=impl),
        L.BatchNorm(),
        L.Relu(),
        L.Conv(64, 3, strides=2, impl=impl),
        L.BatchNorm(),
        L.Relu(),
        L.AvgPool(16),
        L.Flatten(),
        L.Dense(10),
    )
    _, params, state = model.init(jax.random.key(0), (32, 32, 3))
    velocity = jax.tree.map(jnp.zeros_like, params)

    def loss_fn(params, state, x, y):
        logits, state = model.apply(params, state, x, train=True)
        return softmax_cross_entropy(logits, y), state

    @jax.jit
    def step(carry, x, y):
        params, state, velocity = carry
        (loss, state), grads = jax.value_and_grad(loss_fn, has_aux=True)(params, state, x, y)
        velocity = jax.tree.map(lambda v, g: MU * v + g, velocity, grads)
        params = jax.tree.map(lambda p, v: p - LR * v, params, velocity)
        return (params, state, velocity), loss

    return step, (params, state, velocity)


class FlaxCNN(nn.Module):
    @nn.compact
    def __call__(self, x, train: bool):
        bn = lambda: nn.BatchNorm(use_running_average=not train, momentum=0.9)  # noqa: E731
        x = nn.relu(bn()(nn.Conv(32, (3, 3))(x)))
        x = nn.relu(bn()(nn.Conv(64, (3, 3), strides=(2, 2))(x)))
        return nn.Dense(10)(jnp.mean(x, axis=(1, 2)))


def flax_step_fn():
    module, tx = FlaxCNN(), optax.sgd(LR, momentum=MU)
    variables = module.init(jax.random.key(0), jnp.zeros((1, 32, 32, 3)), train=False)
    params, stats = variables["params"], variables["batch_stats"]

    def loss_fn(params, stats, x, y):
        logits, upd = module.apply(
            {"params": params, "batch_stats": stats}, x, train=True, mutable=["batch_stats"]
        )
        return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean(), upd["batch_stats"]

    @jax.jit
    def step(carry, x, y):
        params, stats, opt_state = carry
        (loss, stats), grads = jax.value_and_grad(loss_fn, has_aux=True)(params, stats, x, y)
        updates, opt_state = tx.update(grads, opt_state, params)
        return (optax.apply_updates(params, updates), stats, opt_state), loss

    return step, (params, stats, tx.init(params))


def torch_step_fn(channels_last):
    model = torch.nn.Sequential(
        torch.nn.Conv2d(3, 32, 3, padding=1),
        torch.nn.BatchNorm2d(32),
        torch.nn.ReLU(),
        torch.nn.Conv2d(32, 64, 3, stride=2, padding=1),
        torch.nn.BatchNorm2d(64),
        torch.nn.ReLU(),
        torch.nn.AdaptiveAvgPool2d(1),
        torch.nn.Flatten(),
        torch.nn.Linear(64, 10),
    )
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    opt = torch.optim.SGD(model.parameters(), lr=LR, momentum=MU)

    def step(carry, x, y):
        opt.zero_grad(set_to_none=True)
        loss = torch.nn.functional.cross_entropy(model(x), y)
        loss.backward()
        opt.step()
        return carry, loss

    return step, None


def main():
    rng = np.random.default_rng(0)
    x_np = rng.normal(size=(BATCH, 32, 32, 3)).astype(np.float32)
    y_np = rng.integers(0, 10, BATCH)
    xj, yj = jnp.asarray(x_np), jnp.asarray(y_np)
    xt = torch.tensor(np.transpose(x_np, (0, 3, 1, 2))).contiguous()
    xt_cl = xt.to(memory_format=torch.channels_last)
    yt = torch.tensor(y_np)

    contenders = {}
    for impl in ("xla", "auto"):
        contenders[f"jaxdl (Conv impl={impl})"] = (*jaxdl_step_fn(impl), xj, yj, True)
    contenders["flax.linen + optax"] = (*flax_step_fn(), xj, yj, True)
    contenders["torch eager NCHW"] = (*torch_step_fn(False), xt, yt, False)
    contenders["torch eager channels_last"] = (*torch_step_fn(True), xt_cl, yt, False)

    carries = {}
    for name, (step, carry, x, y, is_jax) in contenders.items():
        for _ in range(3):  # compile / warm up
            carry, loss = step(carry, x, y)
        jax.block_until_ready(carry) if is_jax else loss.item()
        carries[name] = carry

    names = list(contenders)
    samples = {n: [] for n in names}
    for r in range(ROUNDS):
        for name in names[r % len(names) :] + names[: r % len(names)]:
            step, _, x, y, is_jax = contenders[name]
            carry = carries[name]
            t0 = time.perf_counter()
            for _ in range(STEPS):
                carry, loss = step(carry, x, y)
            jax.block_until_ready(carry) if is_jax else loss.item()
            samples[name].append((time.perf_counter() - t0) / STEPS * 1e3)
            carries[name] = carry

    ref = np.median(samples["torch eager NCHW"])
    print(
        f"jax {jax.__version__} (backend {jax.default_backend()}), flax {flax.__version__}, "
        f"optax {optax.__version__}, torch {torch.__version__} "
        f"({torch.get_num_threads()} threads), numpy {np.__version__}, "
        f"python {platform.python_version()}, {os.cpu_count()} CPUs"
    )
    print(
        f"batch {BATCH}, {ROUNDS} rounds x {STEPS} steps; ms per step "
        "(forward + backward + SGD-momentum update)"
    )
    print(f"{'':30s} {'median':>8s} {'min':>8s} {'max':>8s}  {'torch NCHW / this':>18s}")
    for name in names:
        s = np.asarray(samples[name])
        print(f"{name:30s} {np.median(s):8.1f} {s.min():8.1f} {s.max():8.1f}  {ref / np.median(s):17.2f}x")


if __name__ == "__main__":
    main()
