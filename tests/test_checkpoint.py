"""Specification of jaxdl.checkpoint: bitwise round trips of any pytree (optax states, PRNG keys,
bfloat16, integers), save interval, keep-last-K, corruption detection and fallback."""

import glob
import json
import os
import shutil
import warnings
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from jaxdl import checkpoint as ckpt
from jaxdl._tree import is_key

pytestmark = pytest.mark.filterwarnings("ignore:.*:UserWarning:orbax")


class State(NamedTuple):  # the shape of the TrainState to come
    step: jax.Array
    params: dict
    model_state: dict
    opt_state: tuple
    key: jax.Array


def make_state(seed=0, steps=3):
    keys = jax.random.split(jax.random.key(seed), 3)
    params = {
        "dense_0": {"w": jax.random.normal(keys[0], (4, 3)), "b": jnp.zeros((3,), jnp.bfloat16)},
        "prelu_1": {"alpha": jnp.full((), 0.25)},
    }
    optimizer = optax.chain(optax.clip_by_global_norm(1.0), optax.adam(1e-2))
    opt_state = optimizer.init(params)
    for i in range(steps):  # non-trivial moments and count
        grads = jax.tree.map(lambda p: jnp.full_like(p, 0.1 * (i + 1 + seed)), params)
        updates, opt_state = optimizer.update(grads, opt_state, params)
        params = optax.apply_updates(params, updates)
    model_state = {"batchnorm_2": {"mean": jnp.arange(3.0), "count": jnp.int32(7)}}
    return State(jnp.int32(steps + seed), params, model_state, opt_state, keys[2])


def odd_leaves():
    """Leaves whose bits are easy to lose: special floats, small ints, keys, Python numbers."""
    specials = np.array([np.nan, -np.nan, np.inf, -np.inf, -0.0, 1e-45, 3.4e38], np.float32)
    payload_nan = np.array([0x7FC00123], np.uint32).view(np.float32)
    return {
        "specials": jnp.asarray(specials),
        "payload_nan": payload_nan,  # numpy leaf
        "bf16": jnp.asarray([1.0, -0.0, np.nan, 3.14159], jnp.bfloat16),
        "f16": np.array([65504.0, 6e-8], np.float16),
        "f64": np.array([np.pi], np.float64),
        "int8": jnp.asarray([-128, 127], jnp.int8),
        "uint32": jnp.asarray([0, 2**32 - 1], jnp.uint32),
        "int64": np.array([-(2**62)], np.int64),
        "bool": jnp.asarray([True, False]),
        "typed_key": jax.random.key(42),
        "rbg_keys": jax.random.split(jax.random.key(1, impl="rbg"), 2),
        "raw_key": jax.random.PRNGKey(42),
        "python_int": 3,
        "python_float": 0.1,
        "np_scalar": np.float32(2.5),
        "nothing": None,
        "empty_state": optax.EmptyState(),
    }


def assert_bitwise_equal(restored, expected):
    r_leaves, r_def = jax.tree.flatten(restored)
    e_leaves, e_def = jax.tree.flatten(expected)
    assert r_def == e_def
    for r, e in zip(r_leaves, e_leaves):
        assert type(r) is type(e) or (isinstance(r, jax.Array) and isinstance(e, jax.Array))
        if is_key(e):
            assert r.dtype == e.dtype
            r, e = jax.random.key_data(r), jax.random.key_data(e)
        r, e = np.asarray(r), np.asarray(e)
        assert r.dtype == e.dtype and r.shape == e.shape
        assert np.array_equal(r, e, equal_nan=r.dtype.kind == "f" or r.dtype == jnp.bfloat16)
        assert r.tobytes() == e.tobytes()  # bitwise: NaN payloads, -0.0


def zeros_like(tree):
    def zero(x):
        if is_key(x):
            return jax.random.wrap_key_data(
                jnp.zeros_like(jax.random.key_data(x)), impl=jax.random.key_impl(x)
            )
        if isinstance(x, (int, float, np.generic)):
            return type(x)(0)
        return jnp.zeros_like(x) if isinstance(x, jax.Array) else np.zeros_like(x)

    return jax.tree.map(zero, tree)


# ----------------------------------------------------------------------------- round trips


def test_train_state_round_trip_is_bitwise(tmp_path):
    state = make_state()
    ckpt.save_checkpoint(tmp_path / "c", state)
    restored = ckpt.restore_checkpoint(tmp_path / "c", zeros_like(state))
    assert isinstance(restored, State)
    assert isinstance(restored.opt_state[1][0], optax.ScaleByAdamState)
    assert_bitwise_equal(restored, state)
    np.testing.assert_array_equal(jax.random.normal(restored.key, (5,)), jax.random.normal(state.key, (5,)))


def test_odd_leaves_round_trip_is_bitwise(tmp_path):
    tree = odd_leaves()
    ckpt.save_checkpoint(tmp_path / "c", tree)
    restored = ckpt.restore_checkpoint(tmp_path / "c", zeros_like(tree))
    assert_bitwise_equal(restored, tree)
    assert type(restored["python_int"]) is int and type(restored["np_scalar"]) is np.float32


def test_restore_into_an_abstract_target(tmp_path):
    state = make_state()
    ckpt.save_checkpoint(tmp_path / "c", state)
    abstract = jax.eval_shape(lambda: state)
    assert isinstance(abstract.key, jax.ShapeDtypeStruct)
    assert_bitwise_equal(ckpt.restore_checkpoint(tmp_path / "c", abstract), state)


def test_restore_keeps_the_target_sharding(tmp_path):
    mesh = jax.make_mesh((4,), ("data",))
    sharded = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("data"))
    tree = {"x": jax.device_put(jnp.arange(8.0), sharded), "y": jnp.ones(3)}
    ckpt.save_checkpoint(tmp_path / "c", tree)
    restored = ckpt.restore_checkpoint(tmp_path / "c", zeros_like(tree))
    assert restored["x"].sharding == sharded
    assert_bitwise_equal(restored, tree)


def test_save_checkpoint_refuses_an_existing_path(tmp_path):
    ckpt.save_checkpoint(tmp_path / "c", {"a": jnp.ones(2)})
    with pytest.raises(ValueError, match=f"path already exists: {tmp_path / 'c'}"):
        ckpt.save_checkpoint(tmp_path / "c", {"a": jnp.zeros(2)})
    ckpt.save_checkpoint(tmp_path / "c", {"a": jnp.zeros(2)}, overwrite=True)
    np.testing.assert_array_equal(
        ckpt.restore_checkpoint(tmp_path / "c", {"a": jnp.ones(2)})["a"], [0.0, 0.0]
    )


def test_unsavable_trees_are_clear_errors(tmp_path):
    with pytest.raises(ValueError, match="tree has no leaves"):
        ckpt.save_checkpoint(tmp_path / "c", {"a": None})
    with pytest.raises(ValueError, match=r"leaf \['name'\] is a str"):
        ckpt.save_checkpoint(tmp_path / "d", {"name": "adam"})


@pytest.mark.parametrize(
    "change, match",
    [
        (lambda t: {**t, "extra": jnp.ones(2)}, r"in the target but not in the checkpoint: \['extra'\]"),
        (
            lambda t: {k: v for k, v in t.items() if k != "b"},
            r"in the checkpoint but not in the target: \['b'\]",
        ),
        (
            lambda t: {**t, "a": jnp.ones((3, 3))},
            r"\['a'\]: checkpoint has float32\[2, 3\], target has float32\[3, 3\]",
        ),
        (
            lambda t: {**t, "a": jnp.ones((2, 3), jnp.bfloat16)},
            r"\['a'\]: checkpoint has float32\[2, 3\], target has bfloat16",
        ),
        (
            lambda t: {**t, "key": jax.random.PRNGKey(0)},
            r"\['key'\]: checkpoint has key<fry>\[\], target has uint32\[2\]",
        ),
        (lambda t: (t["a"], t["b"], t["key"]), r"in the target but not in the checkpoint: \[0\]"),
    ],
)
def test_restore_into_a_different_structure_is_a_clear_error(tmp_path, change, match):
    tree = {"a": jnp.ones((2, 3)), "b": jnp.arange(4), "key": jax.random.key(0)}
    ckpt.save_checkpoint(tmp_path / "c", tree)
    with pytest.raises(ValueError, match=match) as err:
        ckpt.restore_checkpoint(tmp_path / "c", change(tree))
    assert type(err.value) is ValueError  # a user error, not corruption: no fallback
    assert str(tmp_path / "c") in str(err.value)


# ----------------------------------------------------------------------------- manager


def tree_at(step):
    return {"w": jnp.full((3,), float(step)), "step": jnp.int32(step), "key": jax.random.key(step)}


def test_save_interval_and_forced_final_save(tmp_path):
    with ckpt.CheckpointManager(tmp_path, max_to_keep=None, save_interval_steps=5) as mngr:
        saved = [s for s in range(1, 13) if mngr.save(s, tree_at(s))]
        assert saved == [5, 10]
        assert mngr.save(12, tree_at(12), force=True)
        assert not mngr.save(10, tree_at(99), force=True)  # already saved: kept as it is
        assert mngr.all_steps() == [5, 10, 12] and mngr.latest_step() == 12
        restored = mngr.restore(tree_at(0), step=10)
        assert_bitwise_equal(restored, tree_at(10))


def test_keeps_the_last_k_and_survives_a_new_manager(tmp_path):
    with ckpt.CheckpointManager(tmp_path, max_to_keep=3) as mngr:
        for s in range(1, 8):
            mngr.save(s, tree_at(s))
        assert mngr.all_steps() == [5, 6, 7]
    assert sorted(os.listdir(tmp_path)) == ["5", "6", "7"]
    with ckpt.CheckpointManager(tmp_path, max_to_keep=3) as mngr:
        assert mngr.latest_step() == 7
        assert_bitwise_equal(mngr.restore(tree_at(0)), tree_at(7))
        assert mngr.restored_step == 7
        mngr.save(8, tree_at(8))
        assert mngr.all_steps() == [6, 7, 8]


def test_manager_restores_a_train_state(tmp_path):
    state = make_state(seed=2)
    with ckpt.CheckpointManager(tmp_path) as mngr:
        mngr.save(int(state.step), state)
        assert_bitwise_equal(mngr.restore(jax.eval_shape(lambda: state)), state)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (
            dict(max_to_keep=0),
            "CheckpointManager: max_to_keep=0 is out of range; expected an integer >= 1 or None",
        ),
        (
            dict(save_interval_steps=0),
            "CheckpointManager: save_interval_steps=0 is out of range; expected an integer >= 1",
        ),
        (
            dict(save_interval_steps=2.5),
            "CheckpointManager: save_interval_steps must be an int, got 2.5 of type float",
        ),
    ],
)
def test_bad_manager_arguments(tmp_path, kwargs, match):
    with pytest.raises((ValueError, TypeError), match=match):
        ckpt.CheckpointManager(tmp_path, **kwargs)


def test_restore_without_checkpoints_and_bad_step(tmp_path):
    with ckpt.CheckpointManager(tmp_path) as mngr:
        with pytest.raises(FileNotFoundError, match=f"no checkpoint in {tmp_path}"):
            mngr.restore(tree_at(0))
        with pytest.raises(ValueError, match="step must be a non-negative integer, got -1"):
            mngr.save(-1, tree_at(0))
        mngr.save(1, tree_at(1))
        with pytest.raises(FileNotFoundError, match=r"no checkpoint for step 2 .* saved steps: \[1\]"):
            mngr.restore(tree_at(0), step=2)


def test_leftover_temporary_directory_is_cleaned_up(tmp_path):
    with ckpt.CheckpointManager(tmp_path) as mngr:
        mngr.save(1, tree_at(1))
    os.makedirs(tmp_path / "2.orbax-checkpoint-tmp" / "state")  # a save killed mid-write
    with ckpt.CheckpointManager(tmp_path) as mngr:
        assert mngr.all_steps() == [1]
        mngr.save(3, tree_at(3))  # orbax removes leftovers in the background, before a save
        assert sorted(os.listdir(tmp_path)) == ["1", "3"]


# ----------------------------------------------------------------------------- corruption


def files_of(step_dir, pattern):
    found = sorted(glob.glob(os.path.join(step_dir, "**", pattern), recursive=True))
    assert found, f"no {pattern} under {step_dir}"
    return found


def biggest_data_file(step_dir):
    return max(files_of(step_dir, "*"), key=lambda f: (os.sep + "d" + os.sep in f, os.path.getsize(f)))


def flip_byte(path):
    raw = bytearray(open(path, "rb").read())
    raw[len(raw) // 2] ^= 0x01
    open(path, "wb").write(bytes(raw))


def truncate(path):
    raw = open(path, "rb").read()
    open(path, "wb").write(raw[: len(raw) // 2])


def garbage(path):
    open(path, "wb").write(b"{not json")


CORRUPTIONS = {
    "flip a byte of array data": lambda d: (biggest_data_file(d), flip_byte),
    "truncate array data": lambda d: (biggest_data_file(d), truncate),
    "overwrite orbax metadata": lambda d: (files_of(d, "_METADATA")[0], garbage),
    "truncate the ocdbt manifest": lambda d: (files_of(d, "manifest.ocdbt")[0], truncate),
    "delete a data file": lambda d: (biggest_data_file(d), os.remove),
}


@pytest.fixture
def three_steps(tmp_path):
    mngr = ckpt.CheckpointManager(tmp_path, max_to_keep=5)
    for s in (10, 20, 30):
        mngr.save(s, tree_at(s))
    yield mngr
    mngr.close()


@pytest.mark.parametrize("name", sorted(CORRUPTIONS))
def test_corrupt_checkpoint_is_refused_and_restore_falls_back(three_steps, name):
    mngr = three_steps
    victim, damage = CORRUPTIONS[name](mngr.step_directory(30))
    damage(victim)
    with pytest.raises(ckpt.CorruptCheckpointError) as err:
        mngr.restore(tree_at(0), step=30)
    assert victim in str(err.value)
    with pytest.warns(UserWarning, match="skipping checkpoint step 30"):
        restored = mngr.restore(tree_at(0))
    assert mngr.restored_step == 20
    assert_bitwise_equal(restored, tree_at(20))


def test_a_flipped_byte_in_any_file_is_detected(tmp_path):
    # Orbax alone restores some of these without an error and with wrong values.
    original = str(tmp_path / "original")
    ckpt.save_checkpoint(original, make_state())
    names = [os.path.relpath(f, original) for f in files_of(original, "*") if os.path.isfile(f)]
    names.remove(ckpt.MANIFEST)
    assert len(names) >= 5
    for i, name in enumerate(names):
        copy = str(tmp_path / f"copy{i}")
        shutil.copytree(original, copy)
        flip_byte(os.path.join(copy, name))
        with pytest.raises(ckpt.CorruptCheckpointError, match="sha256 differs") as err:
            ckpt.restore_checkpoint(copy, make_state())
        assert os.path.join(copy, name) in str(err.value)


def test_single_checkpoint_corruption_names_the_file(tmp_path):
    ckpt.save_checkpoint(tmp_path / "c", make_state())
    victim = biggest_data_file(str(tmp_path / "c"))
    flip_byte(victim)
    with pytest.raises(ckpt.CorruptCheckpointError, match="sha256 differs") as err:
        ckpt.restore_checkpoint(tmp_path / "c", make_state())
    assert victim in str(err.value)


def test_unreadable_manifest_is_corruption(three_steps):
    manifest = os.path.join(three_steps.step_directory(30), ckpt.MANIFEST)
    truncate(manifest)
    with pytest.raises(ckpt.CorruptCheckpointError, match="unreadable manifest") as err:
        three_steps.restore(tree_at(0), step=30)
    assert manifest in str(err.value)


def test_tampered_manifest_hash_is_detected(three_steps):
    manifest = os.path.join(three_steps.step_directory(20), ckpt.MANIFEST)
    content = json.load(open(manifest))
    name = sorted(content["files"])[0]
    content["files"][name] = "0" * 64
    json.dump(content, open(manifest, "w"))
    with pytest.raises(ckpt.CorruptCheckpointError, match=name):
        three_steps.restore(tree_at(0), step=20)


def test_unfinished_save_is_skipped_and_replaced(three_steps):
    mngr = three_steps
    os.remove(os.path.join(mngr.step_directory(30), ckpt.MANIFEST))  # killed before the manifest
    assert mngr.latest_step() == 20 and mngr.all_steps() == [10, 20]
    with pytest.raises(ckpt.CorruptCheckpointError, match="did not finish"):
        mngr.restore(tree_at(0), step=30)
    with pytest.warns(UserWarning, match="skipping checkpoint step 30"):
        assert_bitwise_equal(mngr.restore(tree_at(0)), tree_at(20))
    with pytest.warns(UserWarning, match="replacing unfinished or corrupt checkpoint"):
        assert mngr.save(30, tree_at(31))
    assert_bitwise_equal(mngr.restore(tree_at(0)), tree_at(31))


def test_no_good_checkpoint_lists_every_failure(three_steps):
    for s in (10, 20, 30):
        flip_byte(biggest_data_file(three_steps.step_directory(s)))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with pytest.raises(ckpt.CorruptCheckpointError, match="no good checkpoint") as err:
            three_steps.restore(tree_at(0))
    for s in (10, 20, 30):
        assert f"step {s}:" in str(err.value)


def test_step_deleted_under_an_open_manager_falls_back(three_steps):
    shutil.rmtree(three_steps.step_directory(30))
    assert_bitwise_equal(three_steps.restore(tree_at(0)), tree_at(20))
    assert three_steps.all_steps() == [10, 20]
