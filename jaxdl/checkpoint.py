"""Save and restore any pytree with orbax-checkpoint, checked by a sha256 manifest. No pickle.

A checkpoint is an orbax checkpoint directory (arrays in tensorstore/OCDBT, metadata in JSON)
plus ``jaxdl_manifest.json``, written last, which lists every leaf (its key path, shape and
dtype) and the sha256 of every file of the checkpoint. A directory without the manifest is an
unfinished save; a file whose hash differs is corruption. Orbax alone does not catch the
latter: a flipped byte in an OCDBT data file can restore without error and with wrong values
(orbax-checkpoint 0.12.8), so restore verifies the hashes before it reads anything.

Leaves are saved as a flat dict (``"000000"``, ``"000001"``, ...) in the tree's flattening order,
so any pytree works (dicts, NamedTuples such as optax states, dataclasses, empty nodes), and
the restored tree takes the target's structure and leaf types. Typed PRNG keys
(`jax.random.key`) are saved as their `jax.random.key_data` and re-wrapped with their
implementation; raw uint32 keys (`jax.random.PRNGKey`) are ordinary arrays. Restoring is
bitwise exact: every leaf keeps its dtype (bfloat16, integers, keys) and its bits (NaN
payloads, -0.0).
"""

import hashlib
import json
import os
import shutil
import warnings

import jax
import numpy as np
import orbax.checkpoint as ocp

from jaxdl._checks import check_int
from jaxdl._tree import is_key

MANIFEST = "jaxdl_manifest.json"
_FORMAT = "jaxdl-checkpoint-1"
_ITEM = "state"  # the orbax item name inside a manager step directory


class CorruptCheckpointError(ValueError):
    """A checkpoint is unfinished, corrupt or truncated; the message names the file."""


# ----------------------------------------------------------------------------- leaves


def _key_impl(leaf) -> str:
    """Name of a key array's implementation; for an abstract key, read it while tracing."""
    if isinstance(leaf, jax.Array):
        return str(jax.random.key_impl(leaf))
    found = []
    jax.eval_shape(lambda k: found.append(str(jax.random.key_impl(k))), leaf)
    return found[0]


def _leaves(tree):
    """(key path strings, leaves, treedef) of a pytree."""
    with_paths, treedef = jax.tree_util.tree_flatten_with_path(tree)
    return [jax.tree_util.keystr(p) for p, _ in with_paths], [x for _, x in with_paths], treedef


def _spec(path: str, leaf) -> dict:
    """The manifest entry of one leaf: path, shape, dtype (and the key implementation)."""
    if is_key(leaf):
        return {
            "path": path,
            "shape": list(leaf.shape),
            "dtype": str(leaf.dtype),
            "key_impl": _key_impl(leaf),
        }
    if isinstance(leaf, (jax.Array, np.ndarray, np.generic, jax.ShapeDtypeStruct)):
        return {"path": path, "shape": list(leaf.shape), "dtype": str(leaf.dtype)}
    if isinstance(leaf, (bool, int, float, complex)):
        return {"path": path, "shape": [], "dtype": str(np.asarray(leaf).dtype)}
    raise ValueError(
        f"leaf {path or '(root)'} is a {type(leaf).__name__}; checkpoints hold arrays, numbers and PRNG keys"
    )


def _to_savable(leaf):
    if is_key(leaf):
        return jax.random.key_data(leaf)
    return leaf if isinstance(leaf, jax.Array) else np.asarray(leaf)


def _default_sharding():
    return jax.sharding.make_single_device_sharding(jax.devices()[0])


def _abstract(leaf):
    """What orbax restores a target leaf from: jax targets become jax arrays on the target's
    sharding (or the default device), numpy and Python targets become numpy."""
    if is_key(leaf):
        data = jax.eval_shape(jax.random.key_data, leaf)
        sharding = jax.random.key_data(leaf).sharding if isinstance(leaf, jax.Array) else _default_sharding()
        return jax.ShapeDtypeStruct(data.shape, data.dtype, sharding=sharding)
    if isinstance(leaf, (jax.Array, jax.ShapeDtypeStruct)):
        sharding = getattr(leaf, "sharding", None) or _default_sharding()
        return jax.ShapeDtypeStruct(leaf.shape, leaf.dtype, sharding=sharding)
    array = np.asarray(leaf)
    return jax.ShapeDtypeStruct(array.shape, array.dtype)


def _from_restored(value, target, spec: dict):
    if is_key(target):
        return jax.random.wrap_key_data(value, impl=spec["key_impl"])
    if isinstance(target, np.generic):
        return np.asarray(value)[()]
    if isinstance(target, (bool, int, float, complex)):
        return type(target)(np.asarray(value).item())
    return value


def _check_structure(specs: list, target_specs: list, where: str) -> None:
    """A ValueError listing how the target differs from the saved tree."""
    saved = {s["path"]: s for s in specs}
    wanted = {s["path"]: s for s in target_specs}
    problems = [f"in the checkpoint but not in the target: {p}" for p in saved if p not in wanted]
    problems += [f"in the target but not in the checkpoint: {p}" for p in wanted if p not in saved]
    for path in saved.keys() & wanted.keys():
        a, b = saved[path], wanted[path]
        fields = ("shape", "dtype", "key_impl")
        if [a.get(f) for f in fields] != [b.get(f) for f in fields]:
            problems.append(
                f"{path}: checkpoint has {a['dtype']}{a['shape']}, target has {b['dtype']}{b['shape']}"
            )
    if not problems and [s["path"] for s in specs] != [s["path"] for s in target_specs]:
        problems.append("the leaves are the same but in a different order")
    if problems:
        shown = "; ".join(sorted(problems)[:10]) + ("; ..." if len(problems) > 10 else "")
        raise ValueError(f"the target's structure does not match the checkpoint {where}: {shown}")


# ----------------------------------------------------------------------------- manifest


def _sha256(path: str) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _files(directory: str) -> list:
    found = []
    for root, _, names in os.walk(directory):
        found += [os.path.relpath(os.path.join(root, n), directory) for n in names]
    return sorted(f for f in found if f != MANIFEST)


def _write_manifest(directory: str, specs: list) -> None:
    """Hash every file and write the manifest atomically (temp file, fsync, rename)."""
    manifest = {
        "format": _FORMAT,
        "leaves": specs,
        "files": {f: _sha256(os.path.join(directory, f)) for f in _files(directory)},
    }
    tmp = os.path.join(directory, MANIFEST + ".tmp")
    with open(tmp, "w") as f:
        json.dump(manifest, f, indent=1)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, os.path.join(directory, MANIFEST))
    dir_fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


def verify_checkpoint(directory) -> dict:
    """Check a checkpoint directory against its manifest; return the manifest.

    Raises `CorruptCheckpointError` naming the directory or file when the manifest is missing
    (unfinished save) or unreadable, or a listed file is missing or its sha256 differs.
    """
    directory = os.fspath(directory)
    if not os.path.isdir(directory):
        raise FileNotFoundError(f"checkpoint not found: {directory}")
    path = os.path.join(directory, MANIFEST)
    if not os.path.isfile(path):
        raise CorruptCheckpointError(
            f"{directory}: no {MANIFEST}, so the save did not finish (or this is not a jaxdl checkpoint)"
        )
    try:
        with open(path) as f:
            manifest = json.load(f)
        files, leaves = manifest["files"], manifest["leaves"]
        if manifest["format"] != _FORMAT or not isinstance(files, dict):
            raise ValueError(f"unknown format {manifest['format']!r}")
    except (ValueError, KeyError, TypeError, UnicodeDecodeError) as err:
        raise CorruptCheckpointError(f"{path}: unreadable manifest ({err})") from err
    for name, digest in files.items():
        file = os.path.join(directory, name)
        if not os.path.isfile(file):
            raise CorruptCheckpointError(f"{file}: file missing from checkpoint {directory}")
        if _sha256(file) != digest:
            raise CorruptCheckpointError(
                f"{file}: sha256 differs from the manifest, the "
                f"checkpoint {directory} is corrupt or truncated"
            )
    return {"leaves": leaves, "files": files}


def _restore_verified(directory: str, target, read):
    """Verify ``directory``, check ``target`` against it, and restore with ``read(abstract)``."""
    manifest = verify_checkpoint(directory)
    paths, leaves, treedef = _leaves(target)
    _check_structure(manifest["leaves"], [_spec(p, x) for p, x in zip(paths, leaves)], directory)
    abstract = {f"{i:06d}": _abstract(x) for i, x in enumerate(leaves)}
    try:
        restored = read(abstract)
    except (ValueError, OSError) as err:  # tensorstore errors; hashes matched, so rare
        raise CorruptCheckpointError(f"{directory}: orbax could not read it ({err})") from err
    specs = manifest["leaves"]
    return treedef.unflatten(
        [_from_restored(restored[f"{i:06d}"], x, specs[i]) for i, x in enumerate(leaves)]
    )


def _savable(tree):
    paths, leaves, _ = _leaves(tree)
    if not leaves:
        raise ValueError("tree has no leaves; there is nothing to checkpoint")
    specs = [_spec(p, x) for p, x in zip(paths, leaves)]
    return {f"{i:06d}": _to_savable(x) for i, x in enumerate(leaves)}, specs


# ----------------------------------------------------------------------------- one checkpoint


def save_checkpoint(path, tree, *, overwrite: bool = False) -> None:
    """Save ``tree`` to directory ``path`` synchronously; the manifest is written last.

    Orbax writes into a temporary directory and renames it, so ``path`` either holds a whole
    checkpoint or none; a kill between the rename and the manifest leaves a checkpoint that
    restore refuses as unfinished. An existing ``path`` is an error unless ``overwrite``.
    """
    path = os.path.abspath(os.fspath(path))
    if os.path.exists(path):
        if not overwrite:
            raise ValueError(f"path already exists: {path}; pass overwrite=True to replace it")
        shutil.rmtree(path)
    flat, specs = _savable(tree)
    with ocp.Checkpointer(ocp.StandardCheckpointHandler()) as checkpointer:
        checkpointer.save(path, args=ocp.args.StandardSave(flat))
    _write_manifest(path, specs)


def restore_checkpoint(path, target):
    """Restore the tree saved at ``path`` into the structure of ``target``, bitwise exact.

    ``target`` is a tree of the same structure: concrete arrays (restored onto their
    shardings), `jax.ShapeDtypeStruct` (e.g. from `jax.eval_shape`; restored onto their
    sharding or the default device), numpy arrays or Python numbers (restored as such).
    Raises `CorruptCheckpointError` (naming the file) if the checkpoint fails its manifest,
    and ValueError listing the differences if the target's structure, shapes or dtypes differ.
    """
    path = os.path.abspath(os.fspath(path))

    def read(abstract):
        with ocp.Checkpointer(ocp.StandardCheckpointHandler()) as checkpointer:
            return checkpointer.restore(path, args=ocp.args.StandardRestore(abstract))

    return _restore_verified(path, target, read)


# ----------------------------------------------------------------------------- manager


class CheckpointManager:
    """Numbered checkpoints in one directory: save every N steps, keep the last K, restore the
    newest good one. A thin wrapper over `orbax.checkpoint.CheckpointManager` (synchronous
    saves, atomic step directories), adding the sha256 manifest.

    ``save(step, tree)`` writes when ``step % save_interval_steps == 0`` or ``force`` (use it
    for the final step); when it returns the checkpoint is complete on disk, so a kill right
    after cannot leave a half-written latest step. After each save only the ``max_to_keep``
    newest steps remain (None keeps all). A step that is already saved is not written again.

    Example::

        with CheckpointManager("ckpt", max_to_keep=3, save_interval_steps=100) as mngr:
            if mngr.latest_step() is not None:
                state = mngr.restore(state)       # newest good checkpoint
            for step in range(start, steps):
                state = train(state)
                mngr.save(step + 1, state)
            mngr.save(steps, state, force=True)
    """

    def __init__(self, directory, max_to_keep=3, save_interval_steps: int = 1):
        check_int("CheckpointManager", "max_to_keep", max_to_keep, allow_none=True)
        check_int("CheckpointManager", "save_interval_steps", save_interval_steps)
        self.directory = os.path.abspath(os.fspath(directory))
        self.max_to_keep = max_to_keep
        self.save_interval_steps = int(save_interval_steps)
        self.restored_step = None  # the step the last `restore` read
        options = ocp.CheckpointManagerOptions(
            enable_async_checkpointing=False,
            cleanup_tmp_directories=True,  # leftovers of a save that was killed
            max_to_keep=None,  # retention is ours, after the manifest is written
            create=True,
        )
        self._manager = ocp.CheckpointManager(self.directory, options=options, item_names=(_ITEM,))

    def step_directory(self, step: int) -> str:
        """The directory of one step: ``<directory>/<step>``."""
        return os.path.join(self.directory, str(step))

    def _orbax_steps(self) -> list:
        return sorted(self._manager.all_steps())

    def all_steps(self) -> list:
        """Steps whose save finished (manifest present), ascending; data is checked on restore."""
        return [
            s for s in self._orbax_steps() if os.path.isfile(os.path.join(self.step_directory(s), MANIFEST))
        ]

    def latest_step(self):
        """The newest finished step, or None."""
        steps = self.all_steps()
        return steps[-1] if steps else None

    def _is_good(self, step: int) -> bool:
        try:
            verify_checkpoint(self.step_directory(step))
            return True
        except CorruptCheckpointError:
            return False

    def save(self, step: int, tree, force: bool = False) -> bool:
        """Save ``tree`` as ``step`` if the interval says so or ``force``; return whether it did.

        A step that exists and verifies is kept as it is (returns False); one that exists but
        is unfinished or corrupt is replaced.
        """
        if isinstance(step, bool) or not isinstance(step, (int, np.integer)) or step < 0:
            raise ValueError(f"step must be a non-negative integer, got {step!r}")
        step = int(step)
        if not force and step % self.save_interval_steps:
            return False
        if step in self._orbax_steps():
            if self._is_good(step):
                return False
            warnings.warn(
                f"replacing unfinished or corrupt checkpoint {self.step_directory(step)}", stacklevel=2
            )
            self._manager.delete(step)
        flat, specs = _savable(tree)
        self._manager.save(step, args=ocp.args.Composite(**{_ITEM: ocp.args.StandardSave(flat)}), force=True)
        self._manager.wait_until_finished()
        _write_manifest(self.step_directory(step), specs)
        if self.max_to_keep is not None:
            for old in self._orbax_steps()[: -self.max_to_keep]:
                self._manager.delete(old)
        return True

    def restore(self, target, step=None):
        """Restore ``step`` (default: the newest good one) into the structure of ``target``.

        With ``step=None`` a checkpoint that is unfinished or fails its manifest is skipped
        with a warning and the next older one is tried. An explicit bad step raises
        `CorruptCheckpointError` naming the file. See `restore_checkpoint` for ``target``.
        The step read is left in ``self.restored_step``.
        """
        self._manager.reload()  # the directory may have changed since this manager listed it
        steps = self._orbax_steps()
        if not steps:
            raise FileNotFoundError(f"no checkpoint in {self.directory}")
        if step is not None:
            if step not in steps:
                raise FileNotFoundError(
                    f"no checkpoint for step {step} in {self.directory}; saved steps: {steps}"
                )
            tree = self._restore_step(step, target)
            self.restored_step = step
            return tree
        failures = []
        for candidate in reversed(steps):
            try:
                tree = self._restore_step(candidate, target)
            except CorruptCheckpointError as err:
                warnings.warn(f"skipping checkpoint step {candidate}: {err}", stacklevel=2)
                failures.append(f"step {candidate}: {err}")
                continue
            self.restored_step = candidate
            return tree
        raise CorruptCheckpointError(f"no good checkpoint in {self.directory}: " + "; ".join(failures))

    def _restore_step(self, step: int, target):
        def read(abstract):
            args = ocp.args.Composite(**{_ITEM: ocp.args.StandardRestore(abstract)})
            return self._manager.restore(step, args=args)[_ITEM]

        return _restore_verified(self.step_directory(step), target, read)

    def wait(self) -> None:
        """Block until pending work is done (saves are already synchronous)."""
        self._manager.wait_until_finished()

    def close(self) -> None:
        """Finish pending work and release orbax's threads; the manager is unusable after."""
        self._manager.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
