"""Random-access data sources for `jaxdl.fit`: any object with ``len`` and ``__getitem__``
returning one ``(x, y)`` example, such as a grain ``MapDataset`` (``pip install jaxdl[data]``)
or a user's class reading files on demand. Nothing here imports grain.

`fit` reads a source the way it reads arrays: epoch e visits the examples in the order
``epoch_permutation(len(source), fold_in(data_key, e))`` (`jaxdl.data.epoch_permutation`),
batched, the last partial batch dropped. So the same examples as arrays or as a source give
bitwise the same run, and the position in the data is implied by the step count: a checkpoint
at step s resumes at epoch ``s // steps_per_epoch``, batch ``s % steps_per_epoch``, with
nothing more to save. A background thread gathers the next blocks of examples while the
current block trains (`blocks`), and `jaxdl.data.prefetch_to_device` sends them on.

Every example is checked as it is read, before the step that would use it: its shape and
dtype must equal example 0's, float inputs must be finite, and integer class labels must lie
in ``[0, C)`` (or be `jaxdl.losses.IGNORE_INDEX`); a bad one is refused with a ValueError
naming the source and the example's index, e.g. ``fit: train example 17: x has NaN or Inf
values``.
"""

from __future__ import annotations

import hashlib
import queue
import threading
import time
from typing import Any, Iterator

import numpy as np

from jaxdl._checks import check_labels, check_numeric
from jaxdl.losses import IGNORE_INDEX

__all__ = ["is_source", "Examples", "ExampleView", "blocks"]


def is_source(obj: Any) -> bool:
    """Whether ``obj`` is a random-access source of examples (``len`` and ``__getitem__``) and
    not an array or a pair of arrays (what `fit` took before).

    Args:
      obj: what `fit` was given as ``train`` or ``validation``.

    Returns:
      True for a source (e.g. a grain ``MapDataset``), False otherwise.

    >>> is_source(range(3)), is_source((np.zeros(3), np.zeros(3)))
    (True, False)
    """
    if isinstance(obj, (np.ndarray, tuple, list, dict, str, bytes)) or hasattr(obj, "__array__"):
        return False
    return hasattr(obj, "__len__") and hasattr(obj, "__getitem__")


class Examples:
    """A checked view of a random-access ``source`` of ``(x, y)`` examples.

    Args:
      source: ``len(source)`` examples, ``source[i] -> (x, y)`` (arrays or numbers).
      name: what errors call it (``train``, ``validation``).
      owner: the function whose errors these are (``fit``).

    ``x``, ``y``: `ExampleView`s, lazy arrays of shape ``(len, *example shape)`` that gather
    what is indexed. ``num_classes``: set by `fit` once the model is traced, to check labels.
    """

    def __init__(self, source, name: str, owner: str = "fit"):
        self.source, self.name, self.owner = source, name, owner
        self.n = len(source)
        if self.n == 0:
            raise ValueError(f"{owner}: {name}: no examples (len(source) == 0)")
        x0, y0 = self._read(0)
        check_numeric(owner, f"{name} example 0 x", x0)
        check_numeric(owner, f"{name} example 0 y", y0)
        self.spec = (x0.shape, x0.dtype, y0.shape, y0.dtype)
        self.num_classes: int | None = None
        self.x, self.y = ExampleView(self, 0), ExampleView(self, 1)
        self._last: tuple = (None, None)

    def _read(self, i: int) -> tuple[np.ndarray, np.ndarray]:
        example = self.source[int(i)]
        if not (isinstance(example, (tuple, list)) and len(example) == 2):
            raise TypeError(
                f"{self.owner}: {self.name} example {i}: a source must return (x, y) pairs, got "
                f"{type(example).__name__}"
            )
        return np.asarray(example[0]), np.asarray(example[1])

    def _check_spec(self, i: int, x: np.ndarray, y: np.ndarray) -> None:
        for what, a, shape, dtype in (("x", x, *self.spec[:2]), ("y", y, *self.spec[2:])):
            if a.shape != shape or a.dtype != dtype:
                raise ValueError(
                    f"{self.owner}: {self.name} example {i}: {what} has shape {a.shape} and dtype "
                    f"{a.dtype}; expected shape {shape} and dtype {dtype}, as example 0"
                )

    def _check_values(self, flat: np.ndarray, xs: np.ndarray, ys: np.ndarray) -> None:
        """Finite inputs and labels in range over stacked examples (one vectorized pass each);
        the first bad one is refused by its index."""
        if np.issubdtype(xs.dtype, np.inexact):
            finite = np.isfinite(xs.reshape(len(flat), -1)).all(axis=1)
            if not finite.all():
                i = flat[np.argmin(finite)]
                raise ValueError(
                    f"{self.owner}: {self.name} example {i}: x has NaN or Inf values; expected finite inputs"
                )
        if self.num_classes is not None:
            labels = ys.reshape(len(flat), -1)
            bad = ((labels < 0) | (labels >= self.num_classes)) & (labels != IGNORE_INDEX)
            if bad.any():
                j = int(np.argmax(bad.any(axis=1)))
                where = f"{self.owner}: {self.name} example {flat[j]}"
                check_labels(ys[j], self.num_classes, where, "labels", ignore_index=IGNORE_INDEX)

    def gather(self, indices) -> tuple[np.ndarray, np.ndarray]:
        """The examples at ``indices``, stacked and checked.

        Each is checked against example 0 (shape, dtype), for finite inputs and for labels in
        range (with ``num_classes``). The last result is kept, so ``view.x[i]`` then
        ``view.y[i]`` read the source once.

        Args:
          indices: an int array of any shape.

        Returns:
          ``(x, y)``: ``x`` of shape ``indices.shape + x's example shape``, ``y`` alike.
        """
        indices = np.asarray(indices)
        key = (indices.shape, indices.tobytes())
        if self._last[0] != key:
            flat = indices.reshape(-1)
            if flat.size and (flat.min() < 0 or flat.max() >= self.n):
                raise IndexError(f"{self.owner}: {self.name}: index out of range for {self.n} examples")
            xs, ys = [], []
            for i in flat:
                x, y = self._read(i)
                if (
                    x.shape != self.spec[0]
                    or x.dtype != self.spec[1]
                    or y.shape != self.spec[2]
                    or y.dtype != self.spec[3]
                ):
                    self._check_spec(i, x, y)
                xs.append(x)
                ys.append(y)
            xs = np.stack(xs) if xs else np.zeros((0, *self.spec[0]), self.spec[1])
            ys = np.stack(ys) if ys else np.zeros((0, *self.spec[2]), self.spec[3])
            self._check_values(flat, xs, ys)
            self._last = (
                key,
                (xs.reshape(*indices.shape, *self.spec[0]), ys.reshape(*indices.shape, *self.spec[2])),
            )
        return self._last[1]

    def fingerprint(self) -> str:
        """What ``fit_config.json`` records of the source (a resumed run must match it).

        Returns:
          A str: its type, its length, the example shapes and dtypes, and the sha256 of its
          first example. Not a digest of all the data: that would read the whole source.
        """
        x0, y0 = self._read(0)
        h = hashlib.sha256(np.ascontiguousarray(x0).tobytes() + np.ascontiguousarray(y0).tobytes())
        spec = f"x {self.spec[0]} {self.spec[1]}, y {self.spec[2]} {self.spec[3]}"
        return f"{type(self.source).__name__} of {self.n} examples ({spec}), first {h.hexdigest()[:16]}"


class ExampleView:
    """One side (x: ``k=0``, y: ``k=1``) of an `Examples` as a lazy array: ``shape``, ``dtype``,
    ``ndim``, ``len`` and indexing by an int array or a slice (which gathers the examples)."""

    def __init__(self, examples: Examples, k: int):
        self.examples, self.k = examples, k
        self.dtype = examples.spec[2 * k + 1]
        self.shape = (examples.n, *examples.spec[2 * k])
        self.ndim = len(self.shape)

    def __len__(self) -> int:
        return self.examples.n

    def __getitem__(self, index):
        if isinstance(index, slice):
            index = np.arange(self.examples.n)[index]
        return self.examples.gather(index)[self.k]


def blocks(x, y, order: np.ndarray, bounds: list, ahead: int = 2) -> Iterator[tuple]:
    """The blocks of stacked batches one epoch trains on, in order.

    For arrays, ``x[order[a:b]]`` as the loop asks; for a source (`ExampleView`s), gathered by
    a background thread up to ``ahead`` blocks ahead of the consumer, so reading examples
    overlaps the training of the previous block. An error in a read (a bad example) is raised
    here when its block is asked for; closing the generator stops the thread.

    Args:
      x, y: arrays, or a source's `ExampleView`s.
      order: the epoch's example indices as (steps, batch_size).
      bounds: the ``[a, b)`` step ranges of the blocks (`jaxdl.trainer.chunk_bounds`).
      ahead: blocks the thread may read ahead.

    Returns:
      An iterator of ``(x_block, y_block)`` of shapes ``(b - a, batch_size, ...)``.
    """
    if not isinstance(x, ExampleView):
        yield from ((x[order[a:b]], y[order[a:b]]) for a, b in bounds)
        return
    examples, ready, stop = x.examples, queue.Queue(maxsize=ahead), threading.Event()

    def gather(rows):
        """A block, batch by batch; between batches the thread lets the training loop take the
        GIL at once (else it waits up to the switch interval, 5 ms, each time it needs it)."""
        parts = []
        for row in rows:
            parts.append(examples.gather(row))
            time.sleep(0)
        return np.stack([p[0] for p in parts]), np.stack([p[1] for p in parts])

    def produce():
        for a, b in bounds:
            try:
                item = (True, gather(order[a:b]))
            except Exception as err:  # handed to the consumer, raised in its thread
                item = (False, err)
            while not stop.is_set():
                try:
                    ready.put(item, timeout=0.1)
                    break
                except queue.Full:
                    continue
            if stop.is_set() or not item[0]:
                return

    worker = threading.Thread(target=produce, name="jaxdl-source", daemon=True)
    worker.start()
    try:
        for _ in bounds:
            ok, value = ready.get()
            if not ok:
                raise value
            yield value
    finally:
        stop.set()
        worker.join()
