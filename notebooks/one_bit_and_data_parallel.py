# ---
# jupyter:
#   jupytext:
#     formats: ipynb,py:percent
#     text_representation:
#       extension: .py
#       format_name: percent
#       format_version: '1.3'
#       jupytext_version: 1.19.7
#   kernelspec:
#     display_name: Python 3
#     language: python
#     name: python3
# ---

# %% [markdown]
# # Data parallelism and one-bit gradients
#
# **Question.** In data-parallel training (CSE 176 Lecture 11: "split the minibatch into chunks and
# distribute them to GPUs") every device sends its gradient to every other at each step.
# How much accuracy do we lose if each device sends one *bit* per gradient element
# instead of 32 (Sarkar, CS60010: "one-bit gradients", Seide et al. 2014), with and without error
# feedback, or with a majority vote of the signs (signSGD, Bernstein et al. 2018), and how
# many bytes does it save?
#
# **Setup.** Four fake CPU devices (`--xla_force_host_platform_device_count=4`, set in the
# first cell, before jax is imported; they share this machine's cores, so this shows the
# algorithms and their traffic, not a speedup). MNIST (the 5,000 bundled digits), an MLP
# 784-256-BatchNorm-ReLU-256-BatchNorm-ReLU-10 (`jaxdl.models.mlp(10, depth=2, width=256,
# batchnorm=True, axis_name="batch")`), global batch 128 (32 per device), SGD with momentum
# 0.9. The recommended data-parallel step, `make_sharded_train_step` (`jax.jit` over a
# `jax.shard_map` on a one-axis mesh), with four ways of averaging the gradients across
# devices:
#
# * **fp32**: `lax.pmean` of the float32 gradients (exact);
# * **one-bit, error feedback**: `jaxdl.parallel.onebit_allreduce(tx)`: each device sends the
#   signs of gradient + residual packed 32 to a word, and one scale per tensor; the residual
#   keeps what the quantization lost;
# * **one-bit, no error feedback**: `mode="sign"`, the same without the residual;
# * **majority vote**: `mode="majority_vote"`, the update is the sign of the sum of the
#   devices' signs (no scales, so it needs its own, smaller learning rate).
#
# Every step is awaited with `jax.block_until_ready` (on a 2-core machine, un-awaited
# collective programs can miss XLA's rendezvous).

# %%
import os
os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=4").strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")
import jax
assert jax.device_count() >= 4, "restart the kernel: jax was imported before XLA_FLAGS was set"

# %%
import time

import jax
import matplotlib.pyplot as plt
import numpy as np

import jaxdl as dl
from nbsetup import FAST, mnist5k, setup

setup()

# %%
from jaxdl import models
from jaxdl import parallel as par

N_DEV, GLOBAL_BATCH = 4, 128
STEPS = 20 if FAST else 500
EVAL_EVERY = 10 if FAST else 50
data = mnist5k(flat=True)
x_train, y_train = data.train
val, test = tuple(data.val), tuple(data.test)
idx = np.random.default_rng(0).integers(0, len(x_train), (STEPS, GLOBAL_BATCH))


def mlp(axis_name=None):  # BatchNorm after both hidden Dense layers, whose bias it replaces
    return models.mlp(10, depth=2, width=256, init="xavier_normal", batchnorm=True, axis_name=axis_name)


mesh = par.data_mesh(N_DEV)  # one axis, "batch"
model = mlp("batch")  # BatchNorm statistics of the global batch, identical on every device
loss_fn = dl.supervised_loss(model)
evaluate = dl.make_eval_step(loss_fn)
tx = dl.sgd(0.05, momentum=0.9)
METHODS = {
    "fp32 pmean": tx,
    "one-bit, error feedback": par.onebit_allreduce(tx, mode="error_feedback"),
    "one-bit, no error feedback": par.onebit_allreduce(tx, mode="sign"),
    "majority vote (lr 1e-4)": par.onebit_allreduce(dl.sgd(1e-4, momentum=0.9), mode="majority_vote"),
}
print(f"{jax.device_count()} devices; mesh {dict(mesh.shape)}; {STEPS} steps of global batch {GLOBAL_BATCH}")

# %% [markdown]
# ## Check: the data-parallel step is the single-device step
#
# With fp32 averaging, equal shards and BatchNorm synchronized over the device axis, four
# devices take exactly the step that one device takes on the whole global batch (up to
# float rounding in the order of the sums).

# %%
single = dl.make_train_step(dl.supervised_loss(mlp()), tx)
sharded = dl.make_sharded_train_step(loss_fn, tx, mesh)
s1 = dl.TrainState.create(mlp(), tx, jax.random.key(0), (784,))
s4 = par.put_state(dl.TrainState.create(model, tx, jax.random.key(0), (784,)), mesh)
for k in range(5):
    batch = (x_train[idx[k]], y_train[idx[k]])
    s1, m1 = single(s1, batch)
    s4, m4 = sharded(s4, par.put_batch(batch, mesh))
    jax.block_until_ready((s1, s4))
diff = max(float(np.abs(np.asarray(a) - np.asarray(b)).max()) for a, b in zip(jax.tree.leaves(s1.params), jax.tree.leaves(s4.params)))
print(f"after 5 steps: max |params(1 device) - params(4 devices)| = {diff:.2e}; losses {float(m1['loss']):.5f} vs {float(m4['loss']):.5f}")
assert diff < 1e-4

# %% [markdown]
# ## Training with each gradient exchange
#
# Same initialization, same batches; validation accuracy every few steps; the bytes each
# device hands to collectives per step are read from the compiled program
# (`jaxdl.parallel.collective_bytes`).

# %%
runs = {}
for name, opt in METHODS.items():
    step = dl.make_sharded_train_step(loss_fn, opt, mesh)
    state = par.put_state(dl.TrainState.create(model, opt, jax.random.key(0), (784,)), mesh)
    first = par.put_batch((x_train[idx[0]], y_train[idx[0]]), mesh)
    nbytes = par.collective_bytes(step.lower(state, first))
    losses, curve = [], []
    t0 = time.perf_counter()
    for k in range(STEPS):
        state, metrics = step(state, par.put_batch((x_train[idx[k]], y_train[idx[k]]), mesh))
        jax.block_until_ready((state, metrics))  # await every data-parallel step
        losses.append(float(metrics["loss"]))
        if (k + 1) % EVAL_EVERY == 0:
            curve.append((k + 1, float(evaluate(state, val)["accuracy"])))
    seconds = time.perf_counter() - t0
    test_acc = float(evaluate(state, test)["accuracy"])
    runs[name] = dict(loss=np.array(losses), curve=np.array(curve), bytes=nbytes, test=test_acc, seconds=seconds)
    print(f"{name:28s} test accuracy {test_acc:.3f}   bytes/device/step: total {nbytes['total']:>9,}"
          f" (all-reduce {nbytes['all-reduce']:,}, all-gather {nbytes['all-gather']:,})   {seconds:.1f} s")

n_params = sum(p.size for p in jax.tree.leaves(state.params))
fp32 = runs["fp32 pmean"]["bytes"]["total"]
print(f"\n{n_params:,} parameters: a float32 gradient is {4 * n_params:,} bytes")
for name, r in runs.items():
    print(f"  {name:28s} sends {fp32 / r['bytes']['total']:6.1f}x fewer bytes than fp32")

# %%
fig, axes = plt.subplots(1, 3, figsize=(15, 4), gridspec_kw={"width_ratios": [1.2, 1, 1]})
w = max(STEPS // 25, 1)
for name, r in runs.items():
    smooth = np.convolve(r["loss"], np.ones(w) / w, mode="valid")
    axes[0].plot(np.arange(len(smooth)) + w, smooth, label=name)
    axes[1].plot(r["curve"][:, 0], r["curve"][:, 1], "o-", ms=3, label=name)
axes[0].set(xlabel="step", ylabel=f"training loss (moving average of {w})", yscale="log", title="training loss")
axes[1].set(xlabel="step", ylabel="validation accuracy", title="validation accuracy", ylim=(0.5, 1))
axes[0].legend(fontsize=8)
names = list(runs)
totals = [runs[n]["bytes"]["total"] for n in names]
bars = axes[2].barh(range(len(names)), totals, color=[f"C{i}" for i in range(len(names))])
axes[2].set_yticks(range(len(names)), [f"{n}\n(test acc {runs[n]['test']:.3f})" for n in names], fontsize=8)
axes[2].set(xscale="log", xlabel="bytes per device per step", title="collective traffic")
axes[2].invert_yaxis()
fig.tight_layout()

# %% [markdown]
# **What the plots show.** The one-bit exchanges send about 26 times fewer bytes than the
# float32 all-reduce (one bit instead of 32 per element, plus one scale per tensor; the
# statistics of the two BatchNorm layers, the loss and the metrics are still averaged in
# float32, about 8 kilobytes). With error feedback, one-bit training follows the fp32 run
# closely (95.5% vs 95.3% test accuracy): the residual carries what each step's
# quantization left out into the next step, so no part of the gradient is lost for good
# (Seide et al. 2014; Karimireddy et al. 2019). Without error feedback the scaled signs are
# a biased estimate of the gradient; here it still trains, a little behind (94.1%). The
# majority vote throws away the magnitudes altogether: every parameter moves by the same
# step, so it needs a much smaller learning rate, and even at 1e-4 its fixed step does not
# let it settle: its training loss stops falling after about 200 steps and creeps up, and
# its validation accuracy swings widely (below 50% at step 300, 92% at the end; 90.6% on
# the test set). A decaying learning rate is the usual remedy.
# Its attractions are elsewhere: the vote is robust (one bad device cannot dominate it),
# and the result is itself one bit per element, so the return traffic compresses too.
