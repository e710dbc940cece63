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
