"""`fit` on random-access sources of examples (jaxdl/sources.py): the same run as on arrays,
bad examples refused by index before their step, a grain MapDataset. A real SIGTERM/SIGKILL
and resume of a source run is tests/test_trainer.py's process test."""

import os

import jax
import numpy as np
import pytest

import jaxdl as dl
from jaxdl import data, sources

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")

RUN = dict(epochs=2, batch_size=64, block_size=3, progress=False)  # 19 steps per epoch


class Source:
    """A random-access source: ``len`` and ``source[i] -> (x, y)``, nothing else."""

    def __init__(self, x, y):
        self.x, self.y = x, y

    def __len__(self):
        return len(self.y)

    def __getitem__(self, i):
        return self.x[i], self.y[i]


@pytest.fixture(scope="module")
def digits():
    return data.load_dataset("digits")


@pytest.fixture(scope="module")
def from_arrays(digits):
    """The reference: the run on the arrays themselves."""
    return dl.fit(small_mlp(), dl.adam(1e-2), digits.train, validation=digits.val, **RUN)


def small_mlp():
    return dl.models.mlp(10, depth=1, width=32, dropout=0.1)


def bits(tree):
    return [np.asarray(x).view(np.uint8) for x in jax.tree.leaves(tree)]


def without_timing(history):
    return [{k: v for k, v in r.items() if k not in ("seconds", "examples_per_s")} for r in history]


def test_a_source_of_the_same_examples_trains_bitwise_as_the_arrays(digits, from_arrays):
    result = dl.fit(small_mlp(), dl.adam(1e-2), Source(*digits.train), validation=Source(*digits.val), **RUN)
    assert without_timing(result.history) == without_timing(from_arrays.history)
    for a, b in zip(bits(result.state.params), bits(from_arrays.state.params)):
        np.testing.assert_array_equal(a, b)


def test_a_grain_map_dataset_trains_bitwise_as_the_arrays(digits, from_arrays):
    grain = pytest.importorskip("grain")
    train = grain.MapDataset.source(list(zip(*digits.train))).map(lambda e: (e[0], e[1]))
    result = dl.fit(small_mlp(), dl.adam(1e-2), train, validation=digits.val, **RUN)
    assert without_timing(result.history) == without_timing(from_arrays.history)
    for a, b in zip(bits(result.state.params), bits(from_arrays.state.params)):
        np.testing.assert_array_equal(a, b)


def spoiled(digits, what):
    x, y = digits.train.x.copy(), digits.train.y.copy()
    examples = [(x[i], y[i]) for i in range(len(y))]
    if what == "nan":
        x[700, 3, 3, 0] = np.nan
    elif what == "label":
        y[700] = 10
    elif what == "shape":
        examples[700] = (x[700, :4], y[700])
    elif what == "dtype":
        examples[700] = (x[700].astype(np.float64), y[700])
    return [(x[i], y[i]) if what in ("nan", "label") else examples[i] for i in range(len(y))]


class ListSource(Source):
    def __init__(self, examples):
        self.examples = examples

    def __len__(self):
        return len(self.examples)

    def __getitem__(self, i):
        return self.examples[i]


@pytest.mark.parametrize(
    "what, message",
    [
        ("nan", r"fit: train example 700: x has NaN or Inf values; expected finite inputs"),
        ("label", r"fit: train example 700: labels=\[10\] is out of range; expected integer class indices"),
        (
            "shape",
            r"fit: train example 700: x has shape \(4, 8, 1\) and dtype float32; expected shape \(8, 8, 1\)",
        ),
        ("dtype", r"fit: train example 700: x has shape \(8, 8, 1\) and dtype float64; expected .* float32"),
    ],
)
def test_a_bad_example_is_refused_by_index_before_its_step_and_the_run_stays_resumable(
    digits, tmp_path, what, message
):
    from jaxdl.checkpoint import MANIFEST, verify_checkpoint

    out = tmp_path / "run"
    bad = ListSource(spoiled(digits, what))
    if what != "nan":  # the run's files: once is enough
        with pytest.raises(ValueError, match=message):
            dl.fit(small_mlp(), dl.adam(1e-2), bad, **RUN)
        return
    with pytest.raises(ValueError, match=message):
        dl.fit(small_mlp(), dl.adam(1e-2), bad, out_dir=str(out), checkpoint_every=3, **RUN)
    # every checkpoint is whole and precedes the step that would train on example 700
    steps = [
        int(s) for s in os.listdir(out / "checkpoints") if (out / "checkpoints" / s / MANIFEST).is_file()
    ]
    assert steps and not (out / "model").exists()
    for step in steps:
        verify_checkpoint(out / "checkpoints" / str(step))
    assert max(steps) < first_step_using(700, len(digits.train.y))
    dl.trainer.read_metrics(str(out / "metrics.jsonl"))


def first_step_using(index, n, steps_per_epoch=19, batch_size=64):
    """The step (counted from 1) whose batch holds example ``index``: fit's order of seed 0."""
    key = dl.trainer.run_keys(0)[1]
    for epoch in range(RUN["epochs"]):
        order = data.epoch_permutation(n, key, epoch)[: steps_per_epoch * batch_size]
        (where,) = np.nonzero(order == index)
        if where.size:
            return epoch * steps_per_epoch + int(where[0]) // batch_size + 1
    return RUN["epochs"] * steps_per_epoch + 1


def test_views_of_a_source_gather_stacked_examples_once(digits):
    reads = []

    class Counting(Source):
        def __getitem__(self, i):
            reads.append(i)
            return super().__getitem__(i)

    examples = sources.Examples(Counting(*digits.train), "train")
    reads.clear()
    index = np.array([[5, 1], [2, 9]])
    x, y = examples.x[index], examples.y[index]
    assert x.shape == (2, 2, 8, 8, 1) and y.shape == (2, 2) and reads == [5, 1, 2, 9]
    np.testing.assert_array_equal(x, digits.train.x[index])
    np.testing.assert_array_equal(y, digits.train.y[index])
    assert examples.x.shape == digits.train.x.shape and examples.y.dtype == digits.train.y.dtype
