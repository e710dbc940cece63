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
# # A small transformer language model on Python's own sources
#
# **Question.** Can a small decoder-only transformer, built from jaxdl's own layers and trained
# with `dl.fit` on the CPU for a few minutes, predict the next byte of Python source code it
# has never seen much better than the byte frequencies alone?
#
# **Yardstick.** The unigram entropy of the held-out text, $H = -\sum_b p_b \ln p_b$ with $p_b$
# the frequency of byte $b$ in it, is the loss (in nats per byte) of the best model that
# ignores context. We want a held-out cross-entropy at least 30% below it: $L \le 0.7\,H$.
#
# **Setup.** Text: ten modules of the standard library of the Python that runs this notebook
# (read from `sysconfig.get_paths()["stdlib"]`, nothing downloaded) for training, two other
# modules held out. Byte-level tokens (vocabulary 256), windows of $T = 64$ bytes, the target of
# position $t$ the byte at $t + 1$. Model: `models.transformer_lm` (GPT-2's pre-LayerNorm blocks:
# Vaswani et al. 2017, Radford et al. 2019), 2 blocks of width 64 with 4 heads; AdamW with a
# warm-up and cosine decay; batch 32.

# %%
import os
import sysconfig
import time

import jax
import matplotlib.pyplot as plt
import numpy as np

import jaxdl as dl
from jaxdl import models, schedules
from nbsetup import FAST, setup

setup()

# %%
STDLIB = sysconfig.get_paths()["stdlib"]
TRAIN_FILES = ["argparse.py", "dataclasses.py", "functools.py", "inspect.py", "typing.py",
               "enum.py", "ast.py", "subprocess.py", "tarfile.py", "pickle.py"]
HELD_OUT_FILES = ["textwrap.py", "shutil.py"]
T, WIDTH, DEPTH, HEADS = (16, 16, 1, 2) if FAST else (64, 64, 2, 4)
EPOCHS, BATCH = (2, 32) if FAST else (5, 32)


def read_bytes(names):
    """The files' bytes, one after the other, as int32 token ids in [0, 256)."""
    text = b"\n".join(open(os.path.join(STDLIB, name), "rb").read() for name in names)
    return np.frombuffer(text, np.uint8).astype(np.int32)


def windows(tokens):
    """Non-overlapping windows: inputs x[i] = tokens[iT : iT + T], targets y[i] = the next bytes."""
    n = (len(tokens) - 1) // T
    return tokens[: n * T].reshape(n, T), tokens[1 : n * T + 1].reshape(n, T)


train_tokens, held_tokens = read_bytes(TRAIN_FILES), read_bytes(HELD_OUT_FILES)
x_train, y_train = windows(train_tokens)
x_val, y_val = windows(held_tokens)
if FAST:
    x_train, y_train, x_val, y_val = x_train[:256], y_train[:256], x_val[:64], y_val[:64]

freq = np.bincount(y_val.ravel(), minlength=256) / y_val.size
H = -np.sum(freq[freq > 0] * np.log(freq[freq > 0]))
print(f"train: {len(train_tokens):,} bytes -> {len(x_train):,} windows of {T}; "
      f"held out: {len(held_tokens):,} bytes -> {len(x_val):,} windows")
print(f"unigram entropy of the held-out targets H = {H:.3f} nats/byte ({H / np.log(2):.2f} bits); "
      f"goal: loss <= 0.7 H = {0.7 * H:.3f}")

# %% [markdown]
# ## The model
#
# `transformer_lm` maps tokens (B, T) to logits (B, T, 256). Its attention is causal, so the
# logits at position $t$ see bytes $0..t$ only and the model cannot read the answer. Before
# training every byte is about equally likely: the loss should be near $\ln 256 \approx 5.55$.

# %%
lm = models.transformer_lm(256, seq_len=T, depth=DEPTH, width=WIDTH, heads=HEADS)
steps = EPOCHS * (len(x_train) // BATCH)
lr = schedules.warmup(schedules.cosine_decay(3e-3, steps), min(100, steps // 4))
optimizer = dl.adamw(lr, weight_decay=0.01)
state0 = dl.TrainState.create(lm, optimizer, dl.trainer.run_keys(0)[0], (T,))
n_params = sum(a.size for a in jax.tree.leaves(state0.params))
loss0 = dl.evaluate(lm, state0, (x_val, y_val))["loss"]
print(f"{n_params:,} parameters; {steps} steps; held-out loss at initialization {loss0:.3f} (ln 256 = {np.log(256):.3f})")

# %% [markdown]
# ## Training
#
# `dl.fit` takes the token arrays as they are: the default loss is the softmax cross-entropy per
# token (a target of -100 would be padding, left out; these windows have none), and accuracy is
# per token. Validation on the held-out windows after every epoch.

# %%
start = time.time()
result = dl.fit(lm, optimizer, (x_train, y_train), validation=(x_val, y_val), epochs=EPOCHS,
                batch_size=BATCH, learning_rate=lr, progress=False)
minutes = (time.time() - start) / 60
final = result.history[-1]
print(f"{minutes:.1f} min; held-out loss {final['val_loss']:.3f} nats/byte = "
      f"{final['val_loss'] / H:.2f} H ({1 - final['val_loss'] / H:.0%} below the unigram entropy); "
      f"held-out next-byte accuracy {final['val_accuracy']:.1%}")
if not FAST:
    assert final["val_loss"] <= 0.7 * H, "the model did not reach 30% below the unigram entropy"

# %%
epochs = [0] + [r["epoch"] for r in result.history]
fig, ax = plt.subplots(figsize=(6, 3.5))
ax.plot(epochs[1:], [r["train_loss"] for r in result.history], "o-", label="train (mean over the epoch)")
ax.plot(epochs, [loss0] + [r["val_loss"] for r in result.history], "o-", label="held out (end of epoch)")
ax.axhline(H, color="k", ls="--", lw=1, label="unigram entropy H")
ax.axhline(0.7 * H, color="k", ls=":", lw=1, label="0.7 H")
ax.set(xlabel="epoch", ylabel="loss (nats / byte)", title="byte-level transformer LM")
ax.legend();

# %% [markdown]
# ## What it writes
#
# Sampling, one byte at a time, from the model's distribution sharpened by a temperature of
# 0.7, continuing the first $T$ bytes of a held-out module (the window slides: the model always
# sees the last $T$ bytes).

# %%
forward = jax.jit(lambda params, x: lm.apply(params, {}, x)[0][0, -1])
rng = np.random.default_rng(0)
context = list(held_tokens[:T])
generated = []
for _ in range(20 if FAST else 400):
    logits = np.asarray(forward(result.state.params, np.array([context[-T:]], np.int32)), np.float64) / 0.7
    p = np.exp(logits - logits.max())
    generated.append(int(rng.choice(256, p=p / p.sum())))
    context.append(generated[-1])
print(bytes(held_tokens[:T].tolist()).decode("utf-8", "replace") + "<<<")
print(bytes(generated).decode("utf-8", "replace"))

# %% [markdown]
# ## What we found
#
# Recorded from a full run (Python 3.11, jax 0.10.2, on a 2-core CPU shared with other work,
# load average about 6; the standard library differs a little between Python versions, and so do
# the numbers):
#
# - held-out unigram entropy H = 3.114 nats/byte (4.49 bits);
# - held-out loss after 5 epochs (2,050 steps of batch 32, 137,216 parameters, 3.9 minutes of
#   `fit` including compilation): 1.670 nats/byte = 0.54 H, **46% below the unigram entropy**
#   (the goal was 30%; the curve is near 0.7 H after the first epoch); next-byte accuracy on
#   the held-out text 56.7%.
#
# The samples show what that loss means: indentation, line structure, keywords (`def`,
# `return`, `else:`) and `self.` come out right; names, brackets and logic do not. The training
# loss falls below the held-out loss from the second epoch on: the held-out modules use names
# and idioms the ten training modules do not, and the model starts to fit its training text;
# more text (or dropout) would narrow the gap.
