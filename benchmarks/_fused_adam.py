"""Fused Adam through the XLA FFI: the issue-14 contenders of optimizer_update.py (not library code).

``fused_adam.cc`` is compiled at first use with the system C++ compiler (``$CXX``, else ``g++``)
against jaxlib's FFI headers (``jax.ffi.include_dir()``) into ``$XDG_CACHE_HOME/jaxdl/kernels``
(default ``~/.cache/jaxdl/kernels``). The file name is a hash of the source, the compiler and its
version, the flags, jaxlib's version and headers and the CPU's feature flags (``-march=native``);
the compiler writes a temporary file that is renamed into place (``os.replace``), so processes
building at once never load a half-written library.

Two shapes (Kingma & Ba 2015; the formula is in fused_adam.cc):

- `adam` (a): optax's protocol. A ``GradientTransformation`` with ``jaxdl.adam``'s state, whose
  update is one FFI call reading g, m, v and writing u, m, v; ``apply_updates`` then adds u to p.
- `adam_step` (b): PyTorch's ``Adam(fused=True)``: one call reading p, g, m, v and writing p, m,
  v in place. It returns no update ``u``, so it cannot be an optax transform.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import os
import platform
import shutil
import subprocess
import tempfile
from pathlib import Path

import jax
import jax.numpy as jnp
import jaxlib
import numpy as np
import optax

import jaxdl as dl

TARGET = "jaxdl_fused_adam"
SOURCE = Path(__file__).with_name("fused_adam.cc")
FLAGS = (
    "-O3",
    "-march=native",
    "-ffp-contract=off",  # no implicit FMAs: the kernel writes the ones XLA:CPU emits
    "-fno-math-errno",  # sqrt as one instruction (IEEE sqrt either way)
    "-std=c++17",
    "-shared",
    "-fPIC",
    "-fvisibility=hidden",
    "-Wno-return-type",  # warnings inside jaxlib's FFI headers
)


def _cpu_flags() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            return next((line for line in f if line.startswith(("flags", "Features"))), "")
    except OSError:
        return platform.processor()


def build() -> Path:
    """The compiled library's path, compiling it first when the cache has no current copy."""
    cxx = next(
        (shutil.which(c) for c in (os.environ.get("CXX"), "g++", "c++") if c and shutil.which(c)), None
    )
    if cxx is None:
        raise RuntimeError("fused Adam: no C++ compiler found (tried $CXX, g++, c++)")
    version = subprocess.run([cxx, "--version"], capture_output=True, text=True, check=False).stdout
    h = hashlib.sha256()
    for part in (SOURCE.read_bytes(), cxx, version, " ".join(FLAGS), jaxlib.__version__, _cpu_flags()):
        h.update(part if isinstance(part, bytes) else part.encode())
    for header in sorted(Path(jax.ffi.include_dir()).rglob("*.h")):
        h.update(header.read_bytes())
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    folder = Path(base) / "jaxdl" / "kernels"
    target = folder / f"fused_adam-{platform.machine()}-{h.hexdigest()[:20]}.so"
    if target.exists():
        return target
    folder.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=folder, prefix=".fused_adam-", suffix=".so.tmp")
    os.close(fd)
    try:
        cmd = [cxx, *FLAGS, "-I", jax.ffi.include_dir(), str(SOURCE), "-o", tmp]
        done = subprocess.run(cmd, capture_output=True, text=True, check=False)
        if done.returncode != 0:
            raise RuntimeError(f"fused Adam: {' '.join(cmd)} failed:\n{done.stderr[-2000:]}")
        os.replace(tmp, target)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return target


@functools.cache
def load() -> ctypes.CDLL:
    """Build (or find) the library and register its handler with XLA:CPU; once per process."""
    lib = ctypes.CDLL(str(build()))
    jax.ffi.register_ffi_target(TARGET, jax.ffi.pycapsule(lib.JaxdlFusedAdam), platform="cpu")
    return lib


def _scalars(count, lr, b1, b2, eps):
    """f32[8] (b1, 1-b1, b2, 1-b2, eps, 1/bc1, 1/bc2, -lr), each rounded as in jaxdl's compiled
    scale_by_adam (XLA turns the division by bc into a multiplication by 1/bc, computed in f32)."""
    t = count.astype(jnp.float32)
    vals = (b1, 1.0 - b1, b2, 1.0 - b2, eps, 1.0 / (1.0 - b1**t), 1.0 / (1.0 - b2**t), -lr)
    return jnp.stack([jnp.asarray(x).astype(jnp.float32) for x in vals])


def _call(scalars, leaves, apply: bool, alias_grads: bool = False):
    """One FFI call over all leaves: operands (g, m, v) or (p, g, m, v) per leaf, results
    (u or p', m', v') per leaf, updated in place where aliased."""
    k = 4 if apply else 3
    n = len(leaves) // k
    aliases = {}
    for i in range(n):
        first = 1 + k * i  # operand 0 is the scalars
        aliases.update({first + k - 2: 3 * i + 1, first + k - 1: 3 * i + 2})  # m, v
        if apply or alias_grads:
            aliases[first] = 3 * i  # p -> p' (mode 1) or g -> u (mode 0)
    results = [jax.ShapeDtypeStruct(x.shape, jnp.float32) for x in leaves[k - 1 :: k] for _ in range(3)]
    call = jax.ffi.ffi_call(TARGET, results, input_output_aliases=aliases, vmap_method="sequential")
    return call(scalars, *leaves, mode=np.int64(1 if apply else 0))


def adam(lr: float, b1: float = 0.9, b2: float = 0.999, eps: float = 1e-8, alias_grads: bool = False):
    """Shape (a): ``jaxdl.adam(lr, b1, b2, eps)`` (same state) with the update from the kernel.

    ``alias_grads`` writes u over g's buffer: free when g is a temporary of the step (a train
    step's gradients), a copy of g when g is an argument of the jitted function.
    """
    load()
    default = dl.adam(lr, b1, b2, eps)

    def update(updates, state, params=None):
        del params
        adam_state, lr_state = state
        g, treedef = jax.tree.flatten(updates)
        m, v = treedef.flatten_up_to(adam_state.mu), treedef.flatten_up_to(adam_state.nu)
        count = optax.safe_increment(adam_state.count)
        leaves = [x for trio in zip(g, m, v) for x in trio]
        out = _call(_scalars(count, lr, b1, b2, eps), leaves, apply=False, alias_grads=alias_grads)
        mu, nu = treedef.unflatten(out[1::3]), treedef.unflatten(out[2::3])
        return treedef.unflatten(out[0::3]), (adam_state._replace(count=count, mu=mu, nu=nu), lr_state)

    return optax.GradientTransformation(default.init, update)


def adam_step(params, grads, mu, nu, count, lr, b1=0.9, b2=0.999, eps=1e-8):
    """Shape (b): lists of float32 leaves -> new (params, mu, nu), written in place when donated;
    ``count`` is this step's count (1 at the first step)."""
    load()
    leaves = [x for quad in zip(params, grads, mu, nu) for x in quad]
    out = _call(_scalars(count, lr, b1, b2, eps), leaves, apply=True)
    return out[0::3], out[1::3], out[2::3]
