import gc
import importlib.metadata
import importlib.util
import os
import runpy
import shutil
import sys
import tempfile
import time

import pytest

# One OpenMP thread for PyTorch (the parity tests) and any BLAS loaded after this point. torch's
# worker threads spin between operations; beside XLA's threads and the other pytest-xdist worker
# on 2 cores they made each torch trajectory test 9-10 s instead of under 1 s (three test files:
# 90 s -> 66 s).
# Set before anything imports torch; subprocesses inherit it.
os.environ.setdefault("OMP_NUM_THREADS", "1")
# Tests run on the CPU; data-parallel tests get 4 fake devices. Both must be set before jax is imported.
os.environ.setdefault("JAX_PLATFORMS", "cpu")
# `fit` and the CLI turn on JAX's persistent compilation cache in ~/.cache; tests must not write
# there (tests/test_compile_cache.py turns it on in temporary folders, in subprocesses).
os.environ["JAXDL_COMPILE_CACHE"] = "0"
# One persistent compilation cache for this run of the suite, shared by the pytest-xdist workers
# and every subprocess (CLI runs, notebook kernels, the multihost workers, a resumed run after its
# kill): a program compiled once in the run is read from disk by the next process that builds it.
# Made by the first process that loads this file (the xdist controller, before it starts the
# workers, which inherit the variable) and removed when that process ends the session. Every
# program is written (JAX's default skips those under 1 s, which is all of the suite's).
if "JAXDL_SUITE_CACHE" not in os.environ:
    os.environ["JAXDL_SUITE_CACHE"] = tempfile.mkdtemp(prefix="jaxdl-suite-xla-")
    _OWN_CACHE = True
else:
    _OWN_CACHE = False
os.environ["JAX_COMPILATION_CACHE_DIR"] = os.environ["JAXDL_SUITE_CACHE"]
os.environ["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"] = "0"
os.environ["JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES"] = "0"
# The suite compiles thousands of tiny programs and runs each a few times: compiling, not running,
# is most of its time (JAX's monitoring events, the tests not marked slow on jax 0.10.2: 325 s of
# backend compiles in 540 s of worker time). So the suite asks XLA:CPU for its fastest compiles:
# - LLVM optimization level 0 for the CPU code (XLA's HLO passes, fusion included, are unchanged;
#   matmuls and convolutions are library calls either way);
# - on jaxlib 0.10 only, the older loop emitters instead of the fusion emitters, and no expensive
#   LLVM passes: test_train_step, test_transforms and test_parallel compile in 27 s instead of
#   63-77 s. jaxlib 0.11+ has no fusion-emitter flag, and compiles those three files in 43 s
#   with or without the other (benchmarks/RESULTS.md).
# Float results may differ from the default build's in the last bits; every reference a test
# compares against (closed forms, numpy, optax, torch, a second jaxdl run under the same flags)
# is unaffected. Subprocesses, notebook kernels and the multihost workers inherit the flags.
_FAST_COMPILES = " --xla_backend_optimization_level=0"
if tuple(int(p) for p in importlib.metadata.version("jaxlib").split(".")[:2]) < (0, 11):
    _FAST_COMPILES += " --xla_cpu_use_fusion_emitters=false --xla_llvm_disable_expensive_passes=true"
os.environ["XLA_FLAGS"] = (
    os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=4" + _FAST_COMPILES
).strip()


# Python's garbage collector ran about a tenth of a worker's CPU time (test_train_step.py, jax
# 0.12.1: 4.8 s in 948 collections of 42 s): each collection walks every object that JAX, flax,
# torch and the compiled programs keep alive, and the default threshold (700 allocations) starts
# one every few traces. tests/_site/sitecustomize.py raises the threshold, and everything
# imported by the end of collection is frozen (never walked again): 0.08 s in 23 collections of
# 32.5 s. Cyclic garbage is still collected, only later. The processes the suite starts (and the
# pytest-xdist workers) run that file at start-up, from PYTHONPATH; this process runs it here.
_SITE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "_site")
if _SITE not in os.environ.get("PYTHONPATH", "").split(os.pathsep):
    os.environ["PYTHONPATH"] = os.pathsep.join(p for p in (_SITE, os.environ.get("PYTHONPATH")) if p)
runpy.run_path(os.path.join(_SITE, "sitecustomize.py"))


def pytest_collection_finish(session):
    gc.freeze()


def pytest_unconfigure(config):
    if _OWN_CACHE:
        shutil.rmtree(os.environ["JAXDL_SUITE_CACHE"], ignore_errors=True)


NO_TORCH = (
    "torch is not installed: on Python 3.12+ the dev extra leaves it out (pip would pull its "
    "multi-GB CUDA build); the PyTorch parity tests run on Python 3.11 (.ci/run's first leg)"
)


def pytest_collection_modifyitems(config, items):
    """Tests marked slow (20 s to over a minute on 2 cores) run first, so that with -n 2 neither
    worker is left running one alone at the end. A stable sort: xdist needs the same order on
    every worker, and the rest keep theirs.

    Tests marked torch (the PyTorch parity tests) skip where torch is not installed, which the dev
    extra allows on Python 3.12+ only: on 3.11 its absence is an error, not a skip."""
    items.sort(key=lambda item: item.get_closest_marker("slow") is None)
    if importlib.util.find_spec("torch") is None:
        if sys.version_info < (3, 12):
            raise pytest.UsageError(
                "torch is not installed; on Python 3.11 `pip install -e '.[dev]'` installs it"
            )
        for item in items:
            if item.get_closest_marker("torch"):
                item.add_marker(pytest.mark.skip(reason=NO_TORCH))


def _wait_for_first_checkpoint(proc, checkpoints, timeout_s=240, after=-1):
    """Poll until the run ``proc`` has finished writing a checkpoint of a step over ``after``
    under ``checkpoints`` (its ``jaxdl_manifest.json`` is written last). Fails if the run ends
    first or after ``timeout_s``."""
    deadline = time.monotonic() + timeout_s
    while not (
        checkpoints.is_dir()
        and any(
            s.isdigit() and int(s) > after and (checkpoints / s / "jaxdl_manifest.json").is_file()
            for s in os.listdir(checkpoints)
        )
    ):
        assert proc.poll() is None, "the run ended before its first checkpoint"
        assert time.monotonic() < deadline, f"no checkpoint after {timeout_s} s"
        time.sleep(0.02)


@pytest.fixture
def wait_for_first_checkpoint():
    """For the kill-and-resume tests: ``wait_for_first_checkpoint(proc, checkpoints_dir, after=-1)``."""
    return _wait_for_first_checkpoint
