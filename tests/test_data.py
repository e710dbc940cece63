"""Specification of jaxdl.data: bundled datasets, splits, the IDX reader, batching,
preprocessing (CSE 176 Lecture 11) and augmentation (Tips and Tricks notes)."""

import gzip
import os
import re
import struct

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from jaxdl import data


@pytest.fixture(scope="module")
def mnist5k():
    return data.load_mnist5k()


@pytest.fixture(scope="module")
def dataset():
    return data.load_dataset("mnist5k", seed=0)


# ----------------------------------------------------------------------------- bundled data


def test_mnist5k_matches_the_csv_rows_parsed_by_hand(mnist5k):
    x, y = mnist5k
    assert x.shape == (5000, 28, 28, 1) and x.dtype == np.float32
    assert y.shape == (5000,) and y.dtype == np.int32
    np.testing.assert_array_equal(y, np.repeat(np.arange(10), 500))  # the file is sorted by class
    with gzip.open(data.mnist5k_path(), "rt") as f:
        lines = f.read().splitlines()
    for i in (0, 1234, 4999):
        values = [int(v) for v in lines[i].split(",")]
        np.testing.assert_array_equal(x[i].reshape(-1), np.float32(values[:784]) / np.float32(255))
        assert y[i] == values[784]
    assert x.min() == 0.0 and x.max() == 1.0


def test_mnist5k_split_is_stratified_with_exact_counts(dataset):
    assert dataset.num_classes == 10
    for split, per_class in ((dataset.train, 350), (dataset.val, 50), (dataset.test, 100)):
        assert split.x.shape == (10 * per_class, 28, 28, 1) and split.x.dtype == np.float32
        assert split.y.dtype == np.int32
        np.testing.assert_array_equal(np.bincount(split.y, minlength=10), [per_class] * 10)


def test_split_parts_are_disjoint_and_cover_every_example(mnist5k):
    train, val, test = data.stratified_split(mnist5k.y, test_size=1000, val_size=500, seed=3)
    everything = np.concatenate([train, val, test])
    np.testing.assert_array_equal(np.sort(everything), np.arange(5000))


def test_split_images_are_the_rows_of_the_file(mnist5k, dataset):
    # Rows of mnist5k are all distinct, so matching bytes identifies each example.
    row_of = {r.tobytes(): i for i, r in enumerate(mnist5k.x.reshape(5000, -1))}
    seen = [row_of[r.tobytes()] for s in dataset[:3] for r in s.x.reshape(len(s.x), -1)]
    assert sorted(seen) == list(range(5000))
    labels = np.concatenate([s.y for s in dataset[:3]])
    np.testing.assert_array_equal(mnist5k.y[seen], labels)


def test_split_is_seeded(dataset):
    same = data.load_dataset("mnist5k", seed=0)
    other = data.load_dataset("mnist5k", seed=1)
    for a, b in zip(dataset[:3], same[:3]):
        np.testing.assert_array_equal(a.x, b.x)
        np.testing.assert_array_equal(a.y, b.y)
    assert not np.array_equal(dataset.test.x, other.test.x)
    # Shuffled within each split, so an unshuffled pass does not see one class at a time.
    assert len(np.unique(dataset.test.y[:50])) > 5


def test_split_sizes_accept_fractions_and_zero():
    labels = np.repeat(np.arange(4), 25)
    train, val, test = data.stratified_split(labels, test_size=0.2, val_size=0, seed=0)
    assert (len(train), len(val), len(test)) == (80, 0, 20)
    np.testing.assert_array_equal(np.bincount(labels[test]), [5, 5, 5, 5])


def test_uneven_classes_split_in_proportion_with_exact_totals():
    labels = np.repeat(np.arange(3), [50, 30, 20])
    train, val, test = data.stratified_split(labels, test_size=10, val_size=20, seed=0)
    np.testing.assert_array_equal(np.bincount(labels[test]), [5, 3, 2])
    np.testing.assert_array_equal(np.bincount(labels[val]), [10, 6, 4])
    assert len(train) == 70


@settings(max_examples=60, deadline=None)
@given(
    counts=st.lists(st.integers(1, 40), min_size=1, max_size=6),
    test_frac=st.floats(0.0, 0.5),
    val_frac=st.floats(0.0, 0.4),
    seed=st.integers(0, 99),
)
def test_split_is_a_proportional_partition_for_any_labels(counts, test_frac, val_frac, seed):
    labels = np.random.default_rng(seed).permutation(np.repeat(np.arange(len(counts)), counts))
    n = len(labels)
    n_test, n_val = round(test_frac * n), round(val_frac * n)
    if n_test + n_val >= n:
        with pytest.raises(ValueError, match="leaves no training data"):
            data.stratified_split(labels, n_test, n_val, seed)
        return
    train, val, test = data.stratified_split(labels, n_test, n_val, seed)
    np.testing.assert_array_equal(np.sort(np.concatenate([train, val, test])), np.arange(n))
    assert (len(test), len(val)) == (n_test, n_val)
    per_class_test = np.bincount(labels[test], minlength=len(counts))
    assert np.all(np.abs(per_class_test - n_test * np.array(counts) / n) < 1)
    per_class_val = np.bincount(labels[val], minlength=len(counts))
    remaining = np.array(counts) - per_class_test
    assert np.all(np.abs(per_class_val - n_val * remaining / remaining.sum()) < 1)


def test_digits_are_scikit_learns_read_without_importing_it():
    from sklearn.datasets import load_digits

    ref = load_digits()
    split = data.load_digits()
    np.testing.assert_array_equal(split.x, (ref.images.astype(np.float32) / 16.0)[..., None])
    np.testing.assert_array_equal(split.y, ref.target)
    assert split.x.dtype == np.float32 and split.y.dtype == np.int32


def test_digits_dataset():
    ds = data.load_dataset("digits", seed=0)
    assert ds.train.x.shape[1:] == (8, 8, 1) and ds.train.x.max() == 1.0
    assert (len(ds.train.y), len(ds.val.y), len(ds.test.y)) == (1257, 180, 360)
    counts = np.bincount(np.concatenate([s.y for s in ds[:3]]))
    np.testing.assert_allclose(np.bincount(ds.test.y), counts * 360 / 1797, atol=1)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(name="cifar10"), "name must be one of .*'cifar10'"),
        (dict(name="mnist:"), "name must be one of"),
        (dict(name="mnist5k", val_size=-1), "val_size must be .* got -1"),
        (dict(name="mnist5k", val_size=1.5), "val_size .* got 1.5"),
        (dict(name="mnist5k", test_size=2500, val_size=2500), "leaves no training data"),
    ],
)
def test_load_dataset_rejects_bad_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        data.load_dataset(**kwargs)


# ----------------------------------------------------------------------------- IDX files


def write_idx(path, array, magic=None, gz=False):
    """Write an IDX file by the spec: 0, 0, type 0x08, ndim, big-endian sizes, uint8 data."""
    array = np.asarray(array, np.uint8)
    header = bytes([0, 0, 0x08, array.ndim]) if magic is None else magic
    header += struct.pack(f">{array.ndim}I", *array.shape)
    payload = header + array.tobytes()
    with (gzip.open if gz else open)(path, "wb") as f:
        f.write(payload)


def make_mnist_folder(folder, n_train=20, n_test=7, gz=False, seed=0):
    rng = np.random.default_rng(seed)
    arrays = {
        "train-images-idx3-ubyte": rng.integers(0, 256, (n_train, 28, 28)),
        "train-labels-idx1-ubyte": np.arange(n_train) % 10,
        "t10k-images-idx3-ubyte": rng.integers(0, 256, (n_test, 28, 28)),
        "t10k-labels-idx1-ubyte": np.arange(n_test) % 10,
    }
    for name, array in arrays.items():
        write_idx(os.path.join(folder, name + (".gz" if gz else "")), array, gz=gz)
    return arrays


@pytest.mark.parametrize("gz", [False, True])
def test_load_mnist_reads_idx_files(tmp_path, gz):
    arrays = make_mnist_folder(tmp_path, gz=gz)
    train, test = data.load_mnist(str(tmp_path))
    assert train.x.shape == (20, 28, 28, 1) and train.x.dtype == np.float32
    np.testing.assert_array_equal(train.x[..., 0] * 255, arrays["train-images-idx3-ubyte"])
    np.testing.assert_array_equal(test.x[..., 0] * 255, arrays["t10k-images-idx3-ubyte"])
    np.testing.assert_array_equal(train.y, arrays["train-labels-idx1-ubyte"])
    np.testing.assert_array_equal(test.y, arrays["t10k-labels-idx1-ubyte"])
    assert train.y.dtype == np.int32


def test_load_dataset_from_mnist_folder_keeps_t10k_as_test(tmp_path):
    arrays = make_mnist_folder(tmp_path)
    ds = data.load_dataset(f"mnist:{tmp_path}", val_size=10)
    assert (len(ds.train.y), len(ds.val.y), len(ds.test.y)) == (10, 10, 7)
    np.testing.assert_array_equal(ds.test.x[..., 0] * 255, arrays["t10k-images-idx3-ubyte"])
    np.testing.assert_array_equal(np.bincount(ds.val.y), [1] * 10)
    with pytest.raises(ValueError, match="test_size must be None"):
        data.load_dataset(f"mnist:{tmp_path}", test_size=3)


def test_read_idx_other_dtypes(tmp_path):
    values = np.array([[1.5, -2.0], [3.25, 0.0]], ">f4")
    path = tmp_path / "floats"
    path.write_bytes(bytes([0, 0, 0x0D, 2]) + struct.pack(">2I", 2, 2) + values.tobytes())
    np.testing.assert_array_equal(data.read_idx(str(path)), values.astype(np.float32))


def corrupt(folder, name, how):
    path = os.path.join(folder, name)
    raw = open(path, "rb").read()
    if how == "magic":
        raw = bytes([8, 0, 0, 3]) + raw[4:]
    elif how == "truncate":
        raw = raw[:-5]
    elif how == "trailing":
        raw = raw + b"\x00"
    open(path, "wb").write(raw)
    return path


@pytest.mark.parametrize("name", ["train-images-idx3-ubyte", "t10k-labels-idx1-ubyte"])
@pytest.mark.parametrize(
    "how, match",
    [
        ("magic", "bad IDX magic number 08000003"),
        ("truncate", "truncated"),
        ("trailing", "trailing data"),
    ],
)
def test_malformed_idx_file_is_an_error_naming_it(tmp_path, name, how, match):
    make_mnist_folder(tmp_path)
    path = corrupt(tmp_path, name, how)
    with pytest.raises(ValueError, match=match) as err:
        data.load_mnist(str(tmp_path))
    assert path in str(err.value)


def test_label_count_differing_from_image_count_is_an_error(tmp_path):
    make_mnist_folder(tmp_path)
    write_idx(tmp_path / "t10k-labels-idx1-ubyte", np.arange(6))
    with pytest.raises(ValueError, match="6 labels, but .*t10k-images-idx3-ubyte holds 7 images"):
        data.load_mnist(str(tmp_path))


def test_truncated_gzip_is_an_error_naming_the_file(tmp_path):
    make_mnist_folder(tmp_path, gz=True)
    path = corrupt(tmp_path, "train-images-idx3-ubyte.gz", "truncate")
    with pytest.raises(ValueError, match="cannot read") as err:
        data.load_mnist(str(tmp_path))
    assert path in str(err.value)


def test_missing_folder_or_file_is_an_error_naming_the_path(tmp_path):
    with pytest.raises(FileNotFoundError, match=str(tmp_path / "nope")):
        data.load_mnist(str(tmp_path / "nope"))
    make_mnist_folder(tmp_path)
    os.remove(tmp_path / "t10k-images-idx3-ubyte")
    with pytest.raises(FileNotFoundError, match=str(tmp_path / "t10k-images-idx3-ubyte")):
        data.load_dataset(f"mnist:{tmp_path}")


# ----------------------------------------------------------------------------- batching


def small_xy(n=10):
    return np.arange(n, dtype=np.float32)[:, None] * np.ones((1, 3), np.float32), np.arange(n)


def test_batches_cover_every_example_once_per_epoch():
    x, y = small_xy()
    out = list(data.batches(x, y, 4, jax.random.key(0), epoch=0, drop_last=False))
    assert [len(b[1]) for b in out] == [4, 4, 2]
    ys = np.concatenate([b[1] for b in out])
    np.testing.assert_array_equal(np.sort(ys), np.arange(10))
    assert not np.array_equal(ys, np.arange(10))  # shuffled
    for bx, by in out:
        np.testing.assert_array_equal(bx[:, 0], by)  # x and y stay paired


def test_batches_drop_last_and_no_shuffle():
    x, y = small_xy()
    out = list(data.batches(x, y, 4, jax.random.key(0), drop_last=True))
    assert [len(b[1]) for b in out] == [4, 4]
    plain = list(data.batches(x, y, 4, jax.random.key(0), drop_last=False, shuffle=False))
    np.testing.assert_array_equal(np.concatenate([b[1] for b in plain]), np.arange(10))


def test_batches_are_deterministic_per_key_and_epoch():
    x, y = small_xy(50)
    order = lambda key, epoch: np.concatenate(  # noqa: E731
        [b[1] for b in data.batches(x, y, 10, key, epoch)]
    )
    key = jax.random.key(7)
    np.testing.assert_array_equal(order(key, 3), order(key, 3))
    np.testing.assert_array_equal(order(key, 3), order(jax.random.PRNGKey(7), 3))  # raw key
    np.testing.assert_array_equal(
        order(key, 3), np.asarray(jax.random.permutation(jax.random.fold_in(key, 3), 50))
    )
    assert not np.array_equal(order(key, 3), order(key, 4))
    assert not np.array_equal(order(key, 3), order(jax.random.key(8), 3))


@pytest.mark.parametrize(
    "batch_size, drop_last, match",
    [
        (0, True, "batches: batch_size=0 is out of range; expected an integer >= 1"),
        (-3, False, "batches: batch_size=-3 is out of range; expected an integer >= 1"),
        (2.5, False, "batches: batch_size must be an int, got 2.5 of type float"),
        (11, True, r"batch_size=11 exceeds the number of examples \(10\) with drop_last=True"),
    ],
)
def test_bad_batch_size_is_a_clear_error(batch_size, drop_last, match):
    x, y = small_xy()
    with pytest.raises((ValueError, TypeError), match=match):
        list(data.batches(x, y, batch_size, jax.random.key(0), drop_last=drop_last))


def test_batch_larger_than_data_without_drop_last_is_one_batch():
    x, y = small_xy()
    ((bx, by),) = data.batches(x, y, 64, jax.random.key(0), drop_last=False)
    assert len(by) == 10


def test_batch_blocks_stack_the_epoch_batches():
    x, y = small_xy(23)
    key = jax.random.key(1)
    blocks = list(data.batch_blocks(x, y, 4, 2, key, epoch=5))
    assert [b[0].shape for b in blocks] == [(2, 4, 3), (2, 4, 3), (1, 4, 3)]
    flat = [b[1] for b in data.batches(x, y, 4, key, epoch=5)]
    np.testing.assert_array_equal(np.concatenate([b[1] for b in blocks]), np.stack(flat))
    with pytest.raises(
        ValueError, match="batch_blocks: block_size=0 is out of range; expected an integer >= 1"
    ):
        list(data.batch_blocks(x, y, 4, 0, key))


def test_prefetch_to_device_keeps_two_batches_in_flight():
    pulled = []

    def source():
        for i in range(5):
            pulled.append(i)
            yield np.full((2,), i), np.int32(i)

    stream = data.prefetch_to_device(source(), size=2)
    first = next(stream)
    assert pulled == [0, 1]
    assert isinstance(first[0], jax.Array) and int(first[1]) == 0
    rest = list(stream)
    assert [int(b[1]) for b in rest] == [1, 2, 3, 4]
    np.testing.assert_array_equal(rest[-1][0], [4, 4])
    with pytest.raises(
        ValueError, match="prefetch_to_device: size=0 is out of range; expected an integer >= 1"
    ):
        next(data.prefetch_to_device(source(), size=0))


# ----------------------------------------------------------------------------- preprocessing


def test_mean_image_is_fitted_on_train_only(dataset):
    mean = data.fit_mean_image(dataset.train.x)
    assert mean.shape == (28, 28, 1)
    np.testing.assert_allclose(mean, dataset.train.x.astype(np.float64).mean(axis=0), atol=1e-7)
    centred = np.asarray(data.subtract_mean_image(dataset.train.x, mean))
    np.testing.assert_allclose(centred.astype(np.float64).mean(axis=0), 0.0, atol=1e-6)
    test_centred = np.asarray(data.subtract_mean_image(dataset.test.x, mean))
    assert np.abs(test_centred.mean(axis=0)).max() > 1e-3  # test keeps its own offset


def test_standardized_train_data_has_zero_mean_unit_std_per_channel():
    rng = np.random.default_rng(0)
    train = rng.normal([1.0, -2.0, 5.0], [0.5, 3.0, 0.1], (200, 6, 6, 3)).astype(np.float32)
    test = rng.normal(0.0, 1.0, (50, 6, 6, 3)).astype(np.float32)
    stats = data.fit_standardization(train)
    np.testing.assert_allclose(stats.mean, train.reshape(-1, 3).mean(0), rtol=1e-5)
    np.testing.assert_allclose(stats.std, train.reshape(-1, 3).std(0), rtol=1e-5)
    out = np.asarray(jax.jit(data.standardize)(train, stats)).reshape(-1, 3)
    np.testing.assert_allclose(out.mean(0), 0.0, atol=1e-5)
    np.testing.assert_allclose(out.std(0), 1.0, atol=1e-5)
    # Test data is mapped with the training statistics, not its own.
    out_test = np.asarray(data.standardize(test, stats)).reshape(-1, 3)
    np.testing.assert_allclose(out_test.mean(0), -stats.mean / stats.std, rtol=0.1)


def test_standardization_guards_a_constant_channel():
    x = np.zeros((4, 2, 2, 1), np.float32)
    assert np.all(np.isfinite(data.standardize(x, data.fit_standardization(x))))


def correlated_gaussian(n=4000, d=6, seed=0):
    rng = np.random.default_rng(seed)
    mixing = rng.normal(size=(d, d))
    return (rng.normal(size=(n, d)) @ mixing + rng.normal(size=d)).astype(np.float32)


def test_pca_whitened_train_data_has_identity_covariance():
    x = correlated_gaussian()
    stats = data.fit_pca_whitening(x)
    white = np.asarray(jax.jit(data.pca_whiten)(x, stats), np.float64)
    np.testing.assert_allclose(white.mean(0), 0.0, atol=1e-4)
    np.testing.assert_allclose(white.T @ white / len(x), np.eye(6), atol=1e-3)


def test_pca_whitening_matches_the_cs231n_svd_recipe():
    x = correlated_gaussian(n=500, d=5, seed=1).astype(np.float64)
    centred = x - x.mean(0)
    u, s, _ = np.linalg.svd(centred.T @ centred / len(x))
    reference = centred @ u / np.sqrt(s + 1e-5)
    ours = np.asarray(data.pca_whiten(x.astype(np.float32), data.fit_pca_whitening(x)))
    # Eigenvectors are defined up to sign.
    np.testing.assert_allclose(np.abs(ours), np.abs(reference), atol=1e-3)


def test_pca_whitening_of_mnist_keeps_top_components(dataset):
    stats = data.fit_pca_whitening(dataset.train.x, num_components=40)
    white = np.asarray(data.pca_whiten(dataset.train.x, stats), np.float64)
    assert white.shape == (3500, 40)
    np.testing.assert_allclose(white.T @ white / len(white), np.eye(40), atol=1e-3)
    with pytest.raises(ValueError, match="num_components must be an int in \\[1, 784\\]"):
        data.fit_pca_whitening(dataset.train.x, num_components=0)


# ----------------------------------------------------------------------------- augmentation


def images(n=16, h=6, w=5, c=2, seed=0):
    # Strictly positive distinct values, so a zero marks padding and every shift is unique.
    return jnp.asarray(np.random.default_rng(seed).uniform(0.1, 1.0, (n, h, w, c)), jnp.float32)


def test_flip_with_prob_one_and_zero():
    x = images()
    key = jax.random.key(0)
    np.testing.assert_array_equal(data.random_flip(key, x, prob=1.0), jnp.flip(x, axis=2))
    np.testing.assert_array_equal(data.random_flip(key, x, prob=0.0), x)


def test_flip_flips_some_images_and_keeps_others():
    x = images(n=64)
    out = data.random_flip(jax.random.key(1), x)
    flipped = np.all(out == jnp.flip(x, axis=2), axis=(1, 2, 3))
    kept = np.all(out == x, axis=(1, 2, 3))
    assert np.all(flipped ^ kept)
    assert 10 < flipped.sum() < 54


def shifted(image, dy, dx):
    """Reference translation with zero fill: out[i, j] = image[i - dy, j - dx]."""
    h, w, _ = image.shape
    out = np.zeros_like(image)
    out[max(dy, 0) : h + min(dy, 0), max(dx, 0) : w + min(dx, 0)] = image[
        max(-dy, 0) : h - max(dy, 0), max(-dx, 0) : w - max(dx, 0)
    ]
    return out


def test_shift_is_a_zero_filled_translation_within_range():
    x = np.asarray(images(n=32))
    out = np.asarray(data.random_shift(jax.random.key(2), x, max_shift=2))
    used = set()
    for image, result in zip(x, out):
        matches = [
            (dy, dx)
            for dy in range(-2, 3)
            for dx in range(-2, 3)
            if np.array_equal(result, shifted(image, dy, dx))
        ]
        assert len(matches) == 1
        used.add(matches[0])
    assert len(used) > 5
    np.testing.assert_array_equal(data.random_shift(jax.random.key(2), x, max_shift=0), x)


def test_shift_per_axis_range():
    x = np.asarray(images(n=32))
    out = np.asarray(data.random_shift(jax.random.key(3), x, max_shift=(0, 1)))
    for image, result in zip(x, out):
        assert any(np.array_equal(result, shifted(image, 0, dx)) for dx in (-1, 0, 1))


@pytest.mark.parametrize("mode", ["constant", "reflect", "edge"])
def test_crop_is_a_window_of_the_padded_image(mode):
    x = np.asarray(images(n=8))
    out = np.asarray(data.random_crop(jax.random.key(4), x, padding=2, pad_mode=mode))
    assert out.shape == x.shape
    for image, result in zip(x, out):
        padded = np.pad(image, ((2, 2), (2, 2), (0, 0)), mode=mode)
        assert any(np.array_equal(result, padded[i : i + 6, j : j + 5]) for i in range(5) for j in range(5))


@pytest.mark.parametrize(
    "augment",
    [
        lambda k, x: data.random_flip(k, x),
        lambda k, x: data.random_shift(k, x, 2),
        lambda k, x: data.random_crop(k, x, 2),
    ],
)
def test_augmentation_is_deterministic_per_key_and_works_under_jit_and_vmap(augment):
    x = images(n=32)
    key, other = jax.random.key(5), jax.random.key(6)
    out = augment(key, x)
    assert out.shape == x.shape and out.dtype == x.dtype
    np.testing.assert_array_equal(augment(key, x), out)
    assert not np.array_equal(augment(other, x), out)
    np.testing.assert_array_equal(jax.jit(augment)(key, x), out)
    keys = jax.random.split(key, 3)
    stacked = jax.vmap(augment, in_axes=(0, None))(keys, x)
    assert stacked.shape == (3,) + x.shape
    for i in range(3):
        np.testing.assert_array_equal(stacked[i], augment(keys[i], x))
    raw = jax.random.PRNGKey(5)  # raw uint32 keys work too
    assert augment(raw, x).shape == x.shape


@pytest.mark.parametrize(
    "call, match",
    [
        (lambda k, x: data.random_flip(k, x[0]), r"images must be a batch shaped \(N, H, W, C\)"),
        (lambda k, x: data.random_flip(k, x, prob=1.5), "prob must be in \\[0, 1\\], got 1.5"),
        (
            lambda k, x: data.random_shift(k, x, -1),
            "random_shift: max_shift=-1 is out of range; expected an integer >= 0",
        ),
        (
            lambda k, x: data.random_crop(k, x, 1.5),
            "random_crop: padding must be an int, got 1.5 of type float",
        ),
        (lambda k, x: data.random_crop(k, x, 2, "wrap"), "pad_mode must be .* got 'wrap'"),
    ],
)
def test_bad_augmentation_arguments_are_clear_errors(call, match):
    with pytest.raises((ValueError, TypeError), match=match):
        call(jax.random.key(0), images(n=2))


# ----------------------------------------------------------------------------- bad files and seeds


def _good_npz(path, compressed=False):
    rng = np.random.default_rng(0)
    arrays = {
        "x_train": rng.integers(0, 255, (20, 4, 4), dtype=np.uint8),
        "y_train": np.arange(20) % 2,
        "x_test": rng.integers(0, 255, (6, 4, 4), dtype=np.uint8),
        "y_test": np.arange(6) % 2,
    }
    (np.savez_compressed if compressed else np.savez)(path, **arrays)
    return path


def _member_offset(path, name):
    """Where the bytes of the archive member ``name`` (an array) start in the file."""
    import zipfile

    with zipfile.ZipFile(path) as z:
        info = z.getinfo(name)
    with open(path, "rb") as f:
        f.seek(info.header_offset + 26)
        n, m = np.frombuffer(f.read(4), "<u2")
    return info.header_offset + 30 + int(n) + int(m)


def _broken(kind, tmp_path):
    good = _good_npz(tmp_path / "good.npz", compressed=kind == "corrupted_compressed")
    raw = bytearray(good.read_bytes())
    path = tmp_path / f"{kind}.npz"
    if kind == "empty":
        raw = b""
    elif kind == "text":
        raw = b"x_train,y_train\n1,2\n"
    elif kind == "truncated":
        raw = raw[: len(raw) // 2]
    elif kind == "truncated_tail":
        raw = raw[:-10]
    elif kind in ("corrupted", "corrupted_compressed"):
        inside = 4 if kind == "corrupted_compressed" else 130  # past the .npy header when stored
        start = _member_offset(good, "y_train.npy") + inside
        raw[start : start + 8] = b"\xff" * 8
    elif kind == "missing":
        np.savez(path, x_train=np.zeros((4, 3, 3)), y_train=np.zeros(4, int), x_test=np.zeros((2, 3, 3)))
        return path
    elif kind == "pickled":
        np.savez(
            path, x_train=np.zeros((4, 3, 3)), y_train=np.array([0, 1, None, 1], dtype=object),
            x_test=np.zeros((2, 3, 3)), y_test=np.zeros(2, int),
        )  # fmt: skip
        return path
    path.write_bytes(bytes(raw))
    return path


@pytest.mark.parametrize(
    "kind,match",
    [
        ("empty", r"the file is empty; expected an .npz archive written by numpy.savez"),
        ("text", r"not an .npz file \(no zip header\)"),
        ("truncated", r"not a readable .npz file, truncated or corrupted \(File is not a zip file\)"),
        ("truncated_tail", r"not a readable .npz file, truncated or corrupted"),
        ("corrupted", r"array 'y_train' cannot be read, the file is truncated or corrupted \(Bad CRC-32"),
        ("corrupted_compressed", r"array 'y_train' cannot be read, the file is truncated or corrupted"),
        ("missing", r"missing arrays \['y_test'\]; expected \['x_train', 'y_train', 'x_test', 'y_test'\]"),
        ("pickled", r"array 'y_train' cannot be read.*allow_pickle=False"),
    ],
)
def test_a_broken_npz_is_a_value_error_naming_the_file_and_array(tmp_path, kind, match):
    path = _broken(kind, tmp_path)
    for load in (lambda: data.load_npz(str(path)), lambda: data.load_dataset(f"npz:{path}")):
        with pytest.raises(ValueError, match=rf"^{re.escape(str(path))}: {match}"):
            load()
    assert data.load_npz(str(tmp_path / "good.npz")).num_classes == 2


@pytest.mark.parametrize(
    "load,owner",
    [
        (lambda seed: data.load_dataset("digits", seed=seed), "load_dataset"),
        (lambda seed: data.stratified_split(np.arange(10) % 2, 2, 2, seed), "stratified_split"),
        (lambda seed: data.load_npz("/no/such.npz", seed=seed), "load_npz"),
    ],
)
def test_a_negative_or_non_integer_data_seed_is_refused_by_name(load, owner):
    with pytest.raises(ValueError, match=rf"{owner}: seed=-1 is out of range; expected an integer >= 0"):
        load(-1)
    with pytest.raises(TypeError, match=rf"{owner}: seed must be an int, got 0.5 of type float"):
        load(0.5)


@pytest.mark.parametrize(
    "call,owner",
    [
        (lambda x, y, key: list(data.batches(x, y, 4, key)), "batches"),
        (lambda x, y, key: list(data.batch_blocks(x, y, 4, 2, key)), "batch_blocks"),
        (lambda x, y, key: data.epoch_permutation(len(x), key), "epoch_permutation"),
    ],
)
def test_batching_refuses_a_key_that_is_not_a_prng_key(call, owner):
    x, y = small_xy()
    for key in ("abc", 0, -1):
        with pytest.raises(TypeError, match=rf"{owner}: key must be a jax.random.key, got {key!r} of type"):
            call(x, y, key)
    call(x, y, jax.random.PRNGKey(0))


@pytest.mark.parametrize("name", ["y_train", "y_test"])
def test_npz_labels_below_zero_are_refused_on_the_host_naming_the_array(tmp_path, name):
    arrays = dict(np.load(_good_npz(tmp_path / "good.npz")))
    arrays[name] = np.where(np.arange(len(arrays[name])) == 1, -1, arrays[name])
    np.savez(tmp_path / "neg.npz", **arrays)
    with pytest.raises(ValueError, match=rf"neg.npz: {name} holds negative labels, e.g. -1; expected 0, 1"):
        data.load_npz(str(tmp_path / "neg.npz"))
