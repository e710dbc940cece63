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
# # Optimizers on loss surfaces
#
# **Question.** How do SGD, momentum, Nesterov momentum, AdaGrad, RMSProp and Adam move on
# the surfaces that make optimization hard (Sarkar, CS60010): a long narrow valley, a curved
# valley, and a saddle point?
#
# **Setup.** Three functions of two parameters, each optimizer started from the same point
# with a learning rate chosen per surface (roughly the largest that does not diverge for
# the plain methods; the adaptive ones take a step size in parameter units):
#
# * *ill-conditioned quadratic* $f(x, y) = \tfrac12(0.1x^2 + 10y^2)$: curvatures 0.1 and 10,
#   condition number 100, the "long narrow valley";
# * *Rosenbrock* $f(x, y) = (1-x)^2 + 100(y - x^2)^2$, minimum at (1, 1) at the end of a
#   curved, flat-bottomed valley;
# * *saddle* $f(x, y) = x^2 - y^2 + y^4/4$: a saddle at the origin and minima at
#   $(0, \pm\sqrt 2)$; we start almost exactly on the ridge, at $y = 10^{-3}$.
#
# Each path is one `lax.scan` of `tx.update` + `dl.apply_updates` with the jaxdl optimizer;
# the three surfaces run in one vmapped call per optimizer (the learning rate is a traced
# value, so the surfaces share one compilation).

# %%
import functools
import time

import jax
import jax.numpy as jnp
import matplotlib.pyplot as plt
import numpy as np

import jaxdl as dl
from nbsetup import FAST, setup

setup()

# %%
def valley(p):
    x, y = p[0], p[1]
    return 0.5 * (0.1 * x**2 + 10.0 * y**2)

def rosenbrock(p):
    x, y = p[0], p[1]
    return (1 - x) ** 2 + 100 * (y - x**2) ** 2

def saddle(p):
    x, y = p[0], p[1]
    return x**2 - y**2 + 0.25 * y**4

SURFACES = {"ill-conditioned quadratic": valley, "Rosenbrock": rosenbrock, "saddle": saddle}
STARTS = jnp.array([[-9.0, 1.5], [-1.2, 1.0], [1.5, 1e-3]])
OPTIMIZERS = {
    "SGD": lambda lr: dl.sgd(lr),
    "Momentum 0.9": lambda lr: dl.sgd(lr, momentum=0.9),
    "Nesterov 0.9": lambda lr: dl.sgd(lr, momentum=0.9, nesterov=True),
    "AdaGrad": lambda lr: dl.adagrad(lr),
    "RMSProp": lambda lr: dl.rmsprop(lr),
    "Adam": lambda lr: dl.adam(lr),
}
# learning rate per optimizer, for (quadratic, Rosenbrock, saddle)
LR = {"SGD": [0.15, 1.5e-3, 0.05], "Momentum 0.9": [0.02, 2e-4, 0.01],
      "Nesterov 0.9": [0.02, 2e-4, 0.01], "AdaGrad": [1.0, 0.5, 0.5],
      "RMSProp": [0.05, 0.01, 0.02], "Adam": [0.3, 0.05, 0.05]}
STEPS = 200 if FAST else 1000


@functools.partial(jax.jit, static_argnames=("name", "steps"))
def paths(name, lrs, steps):
    """Paths (3, steps+1, 2) and losses (3, steps+1) of one optimizer on the 3 surfaces."""
    fns = list(SURFACES.values())

    def one(surface, lr, start):
        f = lambda p: jax.lax.switch(surface, fns, p)
        tx = OPTIMIZERS[name](lr)

        def step(carry, _):
            p, s = carry
            u, s = tx.update(jax.grad(f)(p), s, p)
            p = dl.apply_updates(p, u)
            return (p, s), (p, f(p))

        _, (ps, ls) = jax.lax.scan(step, (start, tx.init(start)), None, length=steps)
        return jnp.concatenate([start[None], ps]), jnp.concatenate([f(start)[None], ls])

    return jax.vmap(one)(jnp.arange(len(fns)), lrs, STARTS)


t0 = time.perf_counter()
results = {name: jax.device_get(paths(name, jnp.array(LR[name]), STEPS)) for name in OPTIMIZERS}
print(f"{len(OPTIMIZERS)} optimizers x {len(SURFACES)} surfaces x {STEPS} steps in {time.perf_counter() - t0:.1f} s")
print("final loss (quadratic, Rosenbrock, saddle) and steps to leave the saddle (until f < -0.9):")
for name, (ps, ls) in results.items():
    escaped = np.flatnonzero(ls[2] < -0.9)
    print(f"  {name:13s}" + "".join(f"{l:11.3g}" for l in ls[:, -1])
          + f"   {escaped[0] if escaped.size else 'never'}")

# %% [markdown]
# ## Paths on the contours, and loss versus step
#
# Left: the paths over the contour lines (log-spaced levels). Right: the loss per step; for
# the saddle, whose minimum value is $-1$, we plot $f + 1.01$ on a log scale so that
# "escaped the saddle" shows as the drop from about 1 to 0.01.

# %%
colors = dict(zip(OPTIMIZERS, plt.cm.tab10.colors))
boxes = [((-10, 3), (-2.5, 2.5)), ((-2, 2), (-1, 3)), ((-2, 2), (-2, 2))]
fig, axes = plt.subplots(3, 2, figsize=(10, 11.5), gridspec_kw={"width_ratios": [1.25, 1]})
for row, ((title, f), (xr, yr)) in enumerate(zip(SURFACES.items(), boxes)):
    ax = axes[row, 0]
    X, Y = np.meshgrid(np.linspace(*xr, 200), np.linspace(*yr, 200))
    Z = np.asarray(jax.vmap(jax.vmap(f))(jnp.stack([X, Y], -1)))
    offset = 1.01 if f is saddle else 1e-3
    ax.contour(X, Y, np.log(Z + offset), levels=18, colors="0.6", linewidths=0.6, linestyles="solid")
    for name, (ps, ls) in results.items():
        p = ps[row]
        ax.plot(p[:, 0], p[:, 1], "-", color=colors[name], lw=1.4, label=name)
        ax.plot(*p[-1], "o", color=colors[name], ms=4)
    ax.plot(*STARTS[row], "k*", ms=12)
    ax.set(xlim=xr, ylim=yr, title=title, xlabel="x", ylabel="y")
    ax = axes[row, 1]
    for name, (ps, ls) in results.items():
        ax.semilogy(ls[row] + (1.01 if f is saddle else 0.0), color=colors[name], label=name)
    ax.set(title=f"{title}: loss" + (" + 1.01" if f is saddle else ""), xlabel="step")
    if f is valley:
        ax.set_ylim(1e-14, 1e2)  # below that float32 rounding takes over
    if f is saddle:
        ax.set_xlim(0, min(STEPS, 300))
axes[0, 0].legend(loc="lower right", fontsize=8)
fig.tight_layout()

# %% [markdown]
# **What the plots show.**
#
# * *Narrow valley.* SGD's step is capped by the steep direction ($\epsilon < 2/10$), so it
#   zig-zags across the valley and crawls along it (the flat direction contracts by only
#   $1 - 0.1\epsilon$ per step). Momentum and Nesterov accumulate velocity along the
#   consistent direction and overshoot a little; Nesterov's look-ahead damps the
#   oscillation. AdaGrad, RMSProp and Adam rescale each coordinate by its gradient
#   history, so they head almost straight for the minimum: the preconditioning of the Tips and Tricks notes.
#   RMSProp with a fixed step hovers around the minimum at a distance of about its step
#   size, since $g/\sqrt{E[g^2]}$ stays of order one.
# * *Rosenbrock.* Every method reaches the valley floor within a few dozen steps and then
#   has to follow the curved, nearly flat floor towards (1, 1). Plain SGD and AdaGrad (whose
#   accumulated squares keep shrinking its steps) are slowest; momentum and Nesterov about
#   double SGD's progress; RMSProp moves fast along the floor at first and then stalls at
#   the scale of its fixed step; Adam, with momentum and per-coordinate scaling, gets
#   closest.
# * *Saddle.* The gradient in the escaping direction $y$ starts at $2\cdot10^{-3}$. SGD and
#   momentum leave the saddle only as fast as $y$ grows geometrically (70-80 steps in the
#   table above); the adaptive methods divide by the gradient's own scale: AdaGrad's first
#   step is a unit step in every coordinate and leaves within a few steps, Adam within
#   about 30. RMSProp leaves the ridge at once as well (its path runs diagonally, straight
#   for the minimum: equal-sized steps in $x$ and $y$), but with its small fixed step it
#   needs about 60 steps to cover the distance.
#
# The learning rates are hand-picked per surface; a different choice changes the ranking
# in detail, not the qualitative behaviour.
