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
# # A training recipe, end to end
#
# **Question.** The recipe of Sarkar, CS60010 (Training) for training a network, step by step, on one problem:
# do the checks catch what they are meant to catch, and where does each step leave us?
#
# 1. Check that the initial loss is reasonable (about $\ln C$), and that it goes up with
#    regularization.
# 2. Make sure the model can overfit a very small part of the training data.
# 3. Find a learning rate that makes the loss go down (a learning-rate range test).
# 4. Coarse-to-fine search of the learning rate and weight decay, in stages: short runs
#    first, longer runs on a narrowed range (`jaxdl.sweep.coarse_to_fine`).
# 5. Track the ratio of update to weight magnitudes (want about $10^{-3}$).
# 6. Monitor validation accuracy and stop early.
# 7. Transfer learning: freeze the body, re-initialize the head (CSE 176 Lecture 11).
#
# **Setup.** MNIST (the 5,000 bundled digits: 3,500 train / 500 validation / 1,000 test),
# standardized with the training set's statistics; an MLP 784-128-128-10 with ReLU and He
# initialization; SGD with momentum 0.9 and L2 weight decay, batch 64.

# %%
import dataclasses
import time

import jax
import jax.numpy as jnp
import matplotlib.pyplot as plt
import numpy as np

import jaxdl as dl
from nbsetup import FAST, mnist5k, setup

setup()

# %%
from jaxdl import diagnostics, init, models
from jaxdl.sweep import coarse_to_fine, sweep

data = mnist5k()
(x_train, y_train), (x_val, y_val), (x_test, y_test) = data.train, data.val, data.test
BATCH = 64


def random_batches(steps, x=x_train, y=y_train, seed=0):
    """``steps`` minibatches drawn with replacement, stacked for the scan-fused loops below."""
    idx = np.random.default_rng(seed).integers(0, len(x), (steps, BATCH))
    return x[idx], y[idx]


model = models.mlp(10, depth=2, width=128)  # He init
loss_fn = dl.supervised_loss(model)
state0 = dl.TrainState.create(model, dl.sgd(0.1, momentum=0.9), jax.random.key(0), (28, 28, 1))

# %% [markdown]
# ## 1. The initial loss

# %%
loss0 = dl.evaluate(model, state0, (x_train[:1000], y_train[:1000]))["loss"]
print(diagnostics.initial_loss_check(loss0, num_classes=10).message)
penalty = float(dl.l2_penalty(state0.params))
for lam in (0.0, 1e-4, 1e-3, 1e-2):
    print(f"  with weight decay {lam:<6g}: loss + lam * ||w||^2 / 2 = {loss0 + lam * penalty:.4f}")

bad = models.mlp(10, depth=2, width=128, init=init.normal(1.0))
bad_state = dl.TrainState.create(bad, dl.sgd(0.1), jax.random.key(0), (28, 28, 1))
bad_loss = dl.evaluate(bad, bad_state, (x_train[:1000], y_train[:1000]))["loss"]
print("and with N(0, 1) weights instead:", diagnostics.initial_loss_check(bad_loss, num_classes=10).message)

# %% [markdown]
# The He-initialized network starts close to $\ln 10 \approx 2.30$: every class gets a
# probability of about 1/10. Weights of scale 1 make the outputs huge and confidently
# wrong, and the check says so. The regularization term adds to the loss in proportion to
# its weight.
#
# ## 2. Overfit a tiny subset
#
# Twenty examples, no regularization, 200 steps of Adam: a working model drives the loss
# to about zero. If it cannot, no hyperparameter search will help: look for a bug.

# %%
report = diagnostics.overfit_check(loss_fn, dl.adam(1e-3), state0.replace(opt_state=dl.adam(1e-3).init(state0.params)),
                                   (x_train[:20], y_train[:20]), steps=100 if FAST else 200)
print(report.message)

# %% [markdown]
# ## 3. Learning-rate range test
#
# One run in which the learning rate grows exponentially from $10^{-4}$ to 10 over the
# steps (Smith 2017): where the loss falls fastest is a good rate; where it blows up is
# too high (Sarkar, CS60010: "loss not going down: learning rate too low; loss exploding: too
# high").

# %%
RANGE_STEPS = 60 if FAST else 300
lr_test = diagnostics.lr_range_test(loss_fn, lambda lr: dl.sgd(lr, momentum=0.9), state0,
                                    random_batches(RANGE_STEPS, seed=1), min_lr=1e-4, max_lr=10.0)
losses = np.where(np.isfinite(lr_test.losses), lr_test.losses, np.inf)
window = max(RANGE_STEPS // 30, 3)
smooth = np.convolve(np.minimum(losses, 1e6), np.ones(window) / window, mode="same")
valid = slice(window // 2, RANGE_STEPS - window // 2)  # where the moving average is complete
lowest = lr_test.lrs[valid][np.argmin(smooth[valid])]
print(f"lowest smoothed loss at lr = {lowest:.3g}; the loss explodes a little above it.")
print(f"a tenth of that, {lowest / 10:.2g}, is a common safe choice; the search below starts from a wide range around both.")
print(f"lr_range_test's own suggestion, the steepest descent before the minimum: {lr_test.suggested_lr:.3g}")
fig, ax = plt.subplots(figsize=(6, 3.5))
ax.semilogx(lr_test.lrs, lr_test.losses, lw=1, label="loss per step")
ax.semilogx(lr_test.lrs[valid], smooth[valid], lw=2, label="moving average")
ax.axvline(lowest, color="k", ls="--", lw=1, label="lowest moving average")
ax.set(xlabel="learning rate", ylabel="training loss", ylim=(0, 5), title="learning-rate range test")
ax.legend();

# %% [markdown]
# ## 4. Coarse-to-fine search
#
# Random search (Bergstra & Bengio 2012) over the learning rate and the weight decay,
# both log-uniform. Stage 1 trains 16 settings for 100 steps (under two epochs) from a
# wide range; each later stage keeps the best quarter, narrows every range to the span of
# the kept values and trains 16 new settings for longer (Sarkar, CS60010: "first stage: only a few
# epochs ... second stage: longer running time, finer search"). Each stage is one vmapped
# `sweep`; the score is the validation loss after training.

# %%
STAGES, SAMPLES = (2, 6) if FAST else (3, 16)
stage_steps = [30, 30] if FAST else [100, 300, 300]
long_batches = random_batches(max(stage_steps), seed=2)


def make_optimizer(lr, weight_decay):
    return dl.sgd(lr, momentum=0.9, weight_decay=weight_decay)


t0 = time.perf_counter()
search = coarse_to_fine(
    loss_fn, make_optimizer, model, (28, 28, 1),
    lambda stage: jax.tree.map(lambda b: b[:stage_steps[stage]], long_batches),
    ranges={"lr": (1e-4, 3.0), "weight_decay": (1e-6, 1e-1)},
    stages=STAGES, num_samples=SAMPLES, keep=0.25, eval_batch=(x_val, y_val), key=0)
print(f"{STAGES} stages x {SAMPLES} settings in {time.perf_counter() - t0:.1f} s")
for i, (table, ranges) in enumerate(zip(search.stages, search.ranges)):
    span = ", ".join(f"{k} in [{lo:.2g}, {hi:.2g}]" for k, (lo, hi) in ranges.items())
    best = table[np.nanargmin(np.where(np.isfinite(table["score"]), table["score"], np.inf))]
    print(f"stage {i + 1} ({stage_steps[i]} steps): {span}; best val loss {best['score']:.3f} "
          f"at lr {best['lr']:.3g}, weight decay {best['weight_decay']:.2g}")
BEST = search.best
print("best overall:", {k: float(f"{v:.3g}") for k, v in BEST.items()})

# %%
fig, axes = plt.subplots(1, 2, figsize=(12, 4))
markers = "os^"
for i, table in enumerate(search.stages):
    score = np.where(np.isfinite(table["score"]), table["score"], np.nan)
    sc = axes[0].scatter(table["lr"], table["weight_decay"], c=np.minimum(score, 2.5), cmap="viridis_r",
                         vmin=0, vmax=2.5, marker=markers[i], s=50, edgecolors=np.where(table["kept"], "r", "none"),
                         label=f"stage {i + 1}")
    axes[1].scatter(table["lr"], np.minimum(score, 4.0), marker=markers[i], label=f"stage {i + 1} ({stage_steps[i]} steps)")
fig.colorbar(sc, ax=axes[0], label="validation loss (clipped at 2.5)")
axes[0].set(xscale="log", yscale="log", xlabel="learning rate", ylabel="weight decay",
            title="tried settings (red edge: kept for the next stage)")
axes[1].set(xscale="log", yscale="log", xlabel="learning rate", ylabel="validation loss",
            title="score per setting (diverged runs clipped at 4)", ylim=(0.1, 5))
axes[0].legend(fontsize=8)
axes[1].legend(fontsize=8)
fig.tight_layout()

# %% [markdown]
# ## 5. The update/weight ratio
#
# Sarkar, CS60010: track $\lVert \Delta\theta \rVert / \lVert \theta \rVert$ per step; about
# $10^{-3}$ is healthy, much lower means the learning rate is too low, much higher that it
# is too high. The train step reports the ratio over all parameters in its metrics
# (`update_ratio`), so one sweep over three learning rates (the best one, and ten times
# lower and higher) gives the curves; `diagnostics.layer_report` gives it per layer.

# %%
TRAIN_STEPS = 40 if FAST else 600
train_batches = random_batches(TRAIN_STEPS, seed=3)
lrs = BEST["lr"] * np.array([0.1, 1.0, 10.0])
ratio_runs = sweep(loss_fn, make_optimizer, model, (28, 28, 1), train_batches,
                   hparams={"lr": lrs, "weight_decay": BEST["weight_decay"]}, eval_batch=(x_val, y_val))

tx = make_optimizer(BEST["lr"], BEST["weight_decay"])
state = dl.TrainState.create(model, tx, jax.random.key(0), (28, 28, 1))
loop, report = dl.make_train_loop(loss_fn, tx), jax.jit(lambda s, b: diagnostics.layer_report(loss_fn, tx, s, b))
chunk, layer_ratios = TRAIN_STEPS // 20, []
for k in range(0, TRAIN_STEPS, chunk):
    batch = jax.tree.map(lambda b: b[k], train_batches)
    layer_ratios.append({name: float(r["w"]) for name, r in report(state, batch)["update_ratios"].items()})
    state, _ = loop(state, jax.tree.map(lambda b: b[k:k + chunk], train_batches))

fig, axes = plt.subplots(1, 2, figsize=(12, 3.8))
for i, lr in enumerate(lrs):
    axes[0].semilogy(ratio_runs["update_ratio"][i],
                     label=f"lr {lr:.2g}: val acc {ratio_runs['eval_accuracy'][i]:.3f}", lw=1)
for name in layer_ratios[0]:
    axes[1].semilogy(np.arange(0, TRAIN_STEPS, chunk), [r[name] for r in layer_ratios], "o-", label=f"{name} kernel")
for ax in axes:
    ax.axhline(1e-3, color="k", ls="--", lw=1)
    ax.set(xlabel="step")
    ax.legend(fontsize=8)
axes[0].set(title="update / weight ratio, all parameters")
axes[1].set(title=f"per layer, lr {BEST['lr']:.2g}")
fig.tight_layout()

# %% [markdown]
# The best learning rate of the search sits within a factor of a few of the $10^{-3}$ rule
# (momentum makes a step several gradient steps long, so the ratio settles somewhat above
# the rule of thumb for plain SGD); ten times lower sits at about half the rule's value and
# learns a little more slowly (94.6% vs 95.6% validation accuracy after 600 steps); ten
# times higher is far above it and diverges. The ratio is highest at the start,
# while the velocity builds up and the weights are still at their initial scale, and it
# differs between layers: early on the output layer, with the fewest weights, moves fastest.
#
# ## 6. Early stopping
#
# To make overfitting show up within a few minutes, we train a wider network (784-512-512-10)
# on only 1,000 training examples with Adam and no weight decay, evaluate the validation
# loss after every epoch, keep the parameters of the best epoch and stop after 5 epochs
# without improvement (Tips and Tricks notes): `dl.fit(..., validation=(x_val, y_val), early_stopping=5)`.

# %%
small = (x_train[:1000], y_train[:1000])
big = models.mlp(10, depth=2, width=128 if FAST else 512)
MAX_EPOCHS, PATIENCE = (4, 2) if FAST else (60, 5)
run = dl.fit(big, dl.adam(1e-3), small, epochs=MAX_EPOCHS, batch_size=BATCH, validation=(x_val, y_val),
             early_stopping=PATIENCE, seed=1, progress=False)
epochs_run = len(run.history)
# fit is deterministic: the same run without early stopping, for as many epochs, ends in the last epoch's state
last = dl.fit(big, dl.adam(1e-3), small, epochs=epochs_run, batch_size=BATCH, seed=1, progress=False)
print(f"stopped after epoch {epochs_run}; best validation loss at epoch {run.best_epoch}")
for name, st in (("best epoch", run.state), ("last epoch", last.state)):
    m = dl.evaluate(big, st, (x_test, y_test))
    print(f"  {name}: test accuracy {m['accuracy']:.3f}, test loss {m['loss']:.3f}")
epochs = np.arange(1, epochs_run + 1)
fig, ax = plt.subplots(figsize=(6.5, 3.5))
ax.plot(epochs, [h["train_loss"] for h in run.history], "o-", label="training loss (mean over the epoch)")
ax.plot(epochs, [h["val_loss"] for h in run.history], "o-", label="validation loss")
ax.axvline(run.best_epoch, color="k", ls="--", lw=1, label="best epoch (kept)")
ax.set(xlabel="epoch", yscale="log", title="early stopping")
ax.legend();

# %% [markdown]
# The training loss keeps falling by orders of magnitude while the validation loss stops
# improving after about three epochs and then stays nearly flat (its lowest value, at epoch
# 8, is barely below its neighbours): from there on the network memorizes the 1,000
# examples. Early stopping keeps the parameters of the best validation epoch, which makes
# the number of epochs a hyperparameter chosen on the validation set (Tips and Tricks notes). Here the
# effect on the test set is small (compare the printed test losses and accuracies; a
# difference of under a point of accuracy is within the noise of 1,000 test examples), but
# the search costs nothing and it stops the wasted epochs.
#
# ## 7. Transfer learning: freeze the body, re-initialize the head
#
# CSE 176 Lecture 11: with little data for a new task, keep the layers learned on a related task and
# train only a new output layer. Here the "big" task is classifying the digits 0-4 (all
# their training examples); the new task is the digits 5-9 with only a few labeled
# examples per class. We compare, for 5, 10 and 50 examples per class:
#
# * **from scratch**: the same network trained only on the new examples;
# * **frozen body, new head**: the body (both hidden layers) from the 0-4 network, frozen,
#   and a freshly initialized head, trained with
#   `dl.chain(dl.freeze(body), dl.masked(dl.adam(lr), head))`: frozen leaves get a zero
#   update and no optimizer state;
# * **fine-tune all**: the 0-4 body and a fresh head, everything trained with a smaller
#   learning rate.
#
# Every network is trained with `dl.fit` for about 500 steps. `fit` initializes the model
# itself (from `model.init` and its seed), so the two transferred networks are given as a
# small wrapper, `StartFrom(model, params)`, whose `init` returns the transferred parameters.

# %%
@dataclasses.dataclass(frozen=True, eq=False)
class StartFrom:
    """``model`` whose initial parameters are ``params``: `dl.fit` starts every run from ``model.init``."""

    model: object
    params: dict

    def init(self, key, input_shape):
        out_shape, _, model_state = self.model.init(key, input_shape)
        # a copy: fit hands the initial state's buffers to its compiled loop (donation), which deletes them
        return out_shape, jax.tree.map(jnp.copy, self.params), model_state

    def apply(self, params, model_state, x, *, train=False, key=None):
        return self.model.apply(params, model_state, x, train=train, key=key)


old = y_train < 5
new_test = (x_test[y_test >= 5], y_test[y_test >= 5])
STEPS = 50 if FAST else 500  # optimizer steps on the new task, whatever its size
PRE_EPOCHS = 2 if FAST else 18  # about 500 steps on the 1,750 training digits 0-4
PER_CLASS = [10] if FAST else [5, 10, 50]

# 1. pretrain on the digits 0-4
pre = dl.fit(model, dl.adam(1e-3), (x_train[old], y_train[old]), epochs=PRE_EPOCHS, batch_size=BATCH,
             seed=4, progress=False).state
print(f"pretrained on 0-4: accuracy on the test digits 0-4 "
      f"{dl.evaluate(model, pre, (x_test[y_test < 5], y_test[y_test < 5]))['accuracy']:.3f}")

# 2. the new task: re-initialize the head (the last Dense, "dense_5"); freeze the body or not
body = {name: name != "dense_5" for name in pre.params}  # a prefix mask of the params: True = body
head = {name: not in_body for name, in_body in body.items()}
_, head_params, _ = dl.Dense(10, w_init=init.he_normal).init(jax.random.key(42), (128,))
transferred = StartFrom(model, {**pre.params, "dense_5": head_params})
methods = {
    "from scratch": (dl.adam(1e-3), model),
    "frozen body, new head": (dl.chain(dl.freeze(body), dl.masked(dl.adam(1e-3), head)), transferred),
    "fine-tune all": (dl.adam(1e-4), transferred),
}
table = {}
for per in PER_CLASS:
    rng = np.random.default_rng(0)
    few = np.concatenate([rng.choice(np.flatnonzero(y_train == c), per, replace=False) for c in range(5, 10)])
    batch = min(BATCH, len(few))
    epochs = max(STEPS // (len(few) // batch), 1)
    for name, (tx, start) in methods.items():
        st = dl.fit(start, tx, (x_train[few], y_train[few]), epochs=epochs, batch_size=batch, seed=5,
                    progress=False).state
        table[per, name] = dl.evaluate(model, st, new_test)["accuracy"]
        if name == "frozen body, new head":
            unchanged = all(np.array_equal(st.params[k][w], pre.params[k][w])
                            for k in body if body[k] for w in pre.params[k])
            assert unchanged, "a frozen parameter changed"

print("accuracy on the test digits 5-9; the frozen body stayed bit for bit as pretrained")
print(f"{'examples per class':>20s}" + "".join(f"{name:>24s}" for name in methods))
for per in PER_CLASS:
    print(f"{per:>20d}" + "".join(f"{table[per, name]:>24.3f}" for name in methods))
n_head = sum(x.size for x in jax.tree.leaves(head_params))
n_all = sum(x.size for x in jax.tree.leaves(pre.params))
print(f"parameters trained with the frozen body: {n_head:,} of {n_all:,}")

# %% [markdown]
# **What the table shows, honestly.** The mechanics work: the frozen parameters never
# change, and the frozen-body model trains only 1,290 of 118,282 parameters. But in this
# small setting the features of an MLP trained to tell 0-4 apart transfer *worse* than
# starting from scratch: a linear head on them scores 4 to 10 points below a network
# trained on the new examples alone, because MNIST is easy enough that even 5-50 examples
# per class train a decent MLP, and features learned to separate five classes discard
# some of what separates the other five. Fine-tuning the whole pretrained network does
# about as well as training from scratch (within 3 points either way), not better.
# Transfer pays off when the body was trained on far more, and more varied, data than
# the new task has (features learned on ImageNet, in CSE 176 Lecture 11), which this toy setup
# cannot imitate.
