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
# # Initialization and activations
#
# **Question.** How does the scale of the initial weights shape the activations of a deep
# network, layer by layer, and why can the weights not all start equal (Kira, CS 7643; Tips and Tricks notes;
# Glorot & Bengio 2010; He et al. 2015)?
#
# **Setup.** A fully connected network with 10 hidden layers (width 500; 200 in the fast
# setting; `jaxdl.models.mlp(10, depth=10, width=500, activation=..., init=...)`), no
# biases to speak of (they start at zero), with tanh or ReLU after every hidden layer, fed
# with 1,000 MNIST training images, flattened and standardized. Three initializations of the
# kernels $W$ (fan-in $n_{in}$, fan-out $n_{out}$):
#
# * `dl.init.normal(0.01)`: $N(0, 0.01^2)$, "small random numbers" (Kira, CS 7643);
# * `dl.init.xavier_normal`: $N(0, 2/(n_{in}+n_{out}))$ (Tips and Tricks notes, Glorot & Bengio);
# * `dl.init.he_normal`: $N(0, 2/n_{in})$ (Kira, CS 7643, He et al.).
#
# `dl.diagnostics.activation_stats` runs the network layer by layer and returns, for every
# layer, the mean, standard deviation, the fraction of exact zeros and of saturated units
# and a histogram of the outputs.

# %%

import jax
import matplotlib.pyplot as plt
import numpy as np

import jaxdl as dl
from nbsetup import FAST, mnist5k, setup

setup()

# %%
from jaxdl import diagnostics, init, models

WIDTH, DEPTH, N = (200, 10, 500) if FAST else (500, 10, 1000)
data = mnist5k(flat=True)
x = data.train.x[:N]

INITS = {"N(0, 0.01²)": init.normal(0.01), "Xavier": init.xavier_normal, "He": init.he_normal}
ACTIVATIONS = {"tanh": "tanh", "ReLU": "relu"}

runs = {}
for act_name, act in ACTIVATIONS.items():
    for init_name, w_init in INITS.items():
        # DEPTH hidden layers of WIDTH units; we look at the output of each hidden activation
        model = models.mlp(10, depth=DEPTH, width=WIDTH, activation=act, init=w_init)
        _, params, state = model.init(jax.random.key(0), x.shape[1:])
        st = diagnostics.activation_stats(model, params, state, x, bins=40)
        runs[act_name, init_name] = [jax.device_get(v) for k, v in st.items() if k.startswith(act)]

print("std of the activations, layer 1 ... 10")
for (act_name, init_name), layers in runs.items():
    print(f"  {act_name:5s} {init_name:12s}" + "".join(f"{l['std']:9.2g}" for l in layers))

# %% [markdown]
# ## Activation histograms per layer
#
# One panel per (activation, initialization); one curve per layer, light to dark from the
# first layer to the tenth. Each histogram is normalized to a density over the layer's own
# range, and the x-axis is symmetric-log so that the collapse to zero is visible.

# %%
fig, axes = plt.subplots(2, 3, figsize=(13, 6.5))
shades = plt.cm.viridis(np.linspace(0.9, 0.0, DEPTH))
for (act_name, init_name), layers in runs.items():
    ax = axes[list(ACTIVATIONS).index(act_name), list(INITS).index(init_name)]
    for i, layer in enumerate(layers):
        counts, edges = layer["hist_counts"], layer["hist_edges"]
        width = np.maximum(np.diff(edges), 1e-30)
        ax.stairs(counts / counts.sum() / width, edges, color=shades[i], lw=1.2,
                  label=f"layer {i + 1}" if i in (0, DEPTH - 1) else None)
    ax.set(title=f"{act_name}, {init_name}", xscale="symlog", yscale="log")
    ax.set_xscale("symlog", linthresh=1e-3)
    ax.set_xlabel("activation value")
axes[0, 0].legend(fontsize=8)
fig.tight_layout()

fig, axes = plt.subplots(1, 2, figsize=(11, 3.5))
for (act_name, init_name), layers in runs.items():
    ax = axes[list(ACTIVATIONS).index(act_name)]
    ax.semilogy(range(1, DEPTH + 1), [l["std"] for l in layers], "o-", label=init_name)
    ax.set(title=f"{act_name}: std of the activations", xlabel="layer")
axes[0].legend()
fig.tight_layout()

# %% [markdown]
# **What the plots show** (compare Glorot & Bengio 2010, figures 3 and 6, and the
# CS231n demonstration in Kira, CS 7643):
#
# * **N(0, 0.01²)**: every layer multiplies the standard deviation by about
#   $0.01\sqrt{n_{in}} \approx 0.22$ (tanh is linear near zero; $0.01\sqrt{n_{in}/2}$ for
#   ReLU), so by the tenth layer the
#   activations are all but zero. The backward pass multiplies by the same small matrices,
#   so the gradients of the lower layers vanish too: the network does not learn.
# * **Xavier** keeps the variance of a linear (or tanh) layer constant,
#   $n\,\mathrm{Var}(W) = 1$ when $n_{in} = n_{out}$: the tanh activations keep a healthy
#   spread, slowly narrowing with depth. For ReLU, which zeroes half of its inputs, the same
#   scale halves the variance at every layer, and the activations shrink geometrically.
# * **He** doubles the variance to $2/n_{in}$, which exactly offsets ReLU's halving: the
#   ReLU histograms look alike in every layer. For tanh the larger scale pushes units into
#   saturation (the mass piles up near $\pm 1$, where the gradient vanishes).
#
# Match the initialization to the nonlinearity: Xavier for tanh (and sigmoid), He for ReLU.

# %% [markdown]
# ## Constant initialization: the symmetry problem
#
# **Question.** What goes wrong if every weight starts at the same value (Kira, CS 7643:
# "constant init is degenerate")?
#
# **Setup.** A 784-64-64-10 ReLU network (`jaxdl.models.mlp(10, depth=2, width=64)`) on
# MNIST, trained with `dl.fit` and SGD (lr 0.1, batch 64) for 10 epochs (540 steps), once
# with every kernel at 0.01 (`dl.init.constant(0.01)`) and once with He init. We look at
# the gradient of the second layer's kernel after the first epoch, and at how many distinct
# hidden units the first layer has at the start, after one epoch and at the end (columns of
# $W_1$ that differ by more than $10^{-6}$).

# %%
EPOCHS, BATCH = (2, 64) if FAST else (10, 64)
STEPS_PER_EPOCH = len(data.train.x) // BATCH


def distinct_columns(w, tol=1e-6):
    w = np.asarray(w)
    keep = []
    for j in range(w.shape[1]):
        if all(np.abs(w[:, j] - w[:, k]).max() > tol for k in keep):
            keep.append(j)
    return len(keep)


def grad_w2(model, params, model_state):
    loss_fn = dl.supervised_loss(model)
    batch = (data.train.x[:BATCH], data.train.y[:BATCH])
    grads = jax.grad(lambda p: loss_fn(p, model_state, batch, None)[0])(params)
    return np.asarray(grads["dense_3"]["w"])  # the second hidden layer's kernel


sym = {}
for name, w_init in {"constant 0.01": init.constant(0.01), "He": init.he_normal}.items():
    model = models.mlp(10, depth=2, width=64, init=w_init)
    model_key, _, _ = dl.trainer.run_keys(0)  # the key fit(seed=0) initializes the model with
    _, params0, model_state0 = model.init(model_key, data.train.x.shape[1:])
    # fit is deterministic: the first epoch of the long run is this one-epoch run
    first = dl.fit(model, dl.sgd(0.1), data.train, epochs=1, batch_size=BATCH, progress=False).state
    state = dl.fit(model, dl.sgd(0.1), data.train, epochs=EPOCHS, batch_size=BATCH, progress=False).state
    grad0 = grad_w2(model, params0, model_state0)
    grad1 = grad_w2(model, first.params, first.model_state)
    distinct = [distinct_columns(p["dense_1"]["w"]) for p in (params0, first.params, state.params)]
    acc = dl.evaluate(model, state, data.test)["accuracy"]
    sym[name] = dict(grad=grad1, distinct=distinct, acc=float(acc))
    print(f"{name:14s}: |dL/dW2| at step 0 = {np.abs(grad0).max():.2g}, after epoch 1 ({STEPS_PER_EPOCH} steps): "
          f"values in [{grad1.min():.3g}, {grad1.max():.3g}]; distinct units of hidden layer 1 at epochs "
          f"0, 1, {EPOCHS}: {distinct}; test accuracy {acc:.3f}")

# %%
fig, axes = plt.subplots(1, 3, figsize=(13, 3.8))
for ax, (name, r) in zip(axes[:2], sym.items()):
    g = r["grad"]
    im = ax.imshow(g, cmap="RdBu", vmin=-np.abs(g).max(), vmax=np.abs(g).max())
    ax.set(title=f"{name}: dL/dW2 after epoch 1", xlabel="unit of layer 2", ylabel="unit of layer 1")
    ax.grid(False)
    fig.colorbar(im, ax=ax, shrink=0.8)
ax = axes[2]
for name, r in sym.items():
    ax.plot([0, 1, EPOCHS], r["distinct"], "o-", label=f"{name} (test acc {r['acc']:.2f})")
ax.set(title="distinct units in hidden layer 1", xlabel="epoch", yscale="log")
ax.legend()
fig.tight_layout()

# %% [markdown]
# **What the plots show.** With a constant kernel every unit of a layer computes the same
# function of its inputs and has the same outgoing weights, so every unit receives the same
# gradient. At step 0 the gradient reaching the hidden layers is even exactly zero (up to
# rounding): all logits are equal, and $\sum_c (p_c - y_c)\,w = 0$ when every output
# weight is the same $w$. Once the output layer has learned, the gradient of $W_2$ is one
# value repeated in every row and every column (left), and gradient descent keeps the units
# identical forever. The 64 units of each hidden layer act as one, whatever the training
# time (right: one distinct unit all along), and the test accuracy is that of a network
# with a single hidden unit per layer. Random initialization breaks the symmetry: He init
# starts with 64 different units and keeps them. (With every weight at *zero* it is worse
# still: in a ReLU network all hidden activations and their gradients are zero, and only
# the output bias learns; notebook `gradient_noise` shows that added gradient
# noise can break that symmetry.)
