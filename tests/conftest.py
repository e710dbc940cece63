import os
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
# The suite compiles hundreds of tiny programs and runs each a few times: compiling, not running,
# is most of its time. LLVM optimization level 0 for the CPU code (XLA's HLO passes, fusion
# included, are unchanged; matmuls and convolutions are library calls either way) took the CPU
# time of test_accumulation + test_ema from 103 s to 72 s. Float results may differ from the
# default build's in the last bits; every reference a test compares against (closed forms, numpy,
# optax, torch, a second jaxdl run under the same flags) is unaffected. Subprocesses, notebook
# kernels and the multihost workers inherit the flags.
os.environ["XLA_FLAGS"] = (
    os.environ.get("XLA_FLAGS", "")
    + " --xla_force_host_platform_device_count=4 --xla_backend_optimization_level=0"
).strip()


def pytest_collection_modifyitems(items):
    """Tests marked slow (20 s to over a minute on 2 cores) run first, so that with -n 2 neither
    worker is left running one alone at the end. A stable sort: xdist needs the same order on
    every worker, and the rest keep theirs."""
    items.sort(key=lambda item: item.get_closest_marker("slow") is None)


def _wait_for_first_checkpoint(proc, checkpoints, timeout_s=240):
    """Poll until the run ``proc`` has finished writing a checkpoint under ``checkpoints`` (its
    ``jaxdl_manifest.json`` is written last). Fails if the run ends first or after ``timeout_s``."""
    deadline = time.monotonic() + timeout_s
    while not (
        checkpoints.is_dir()
        and any((checkpoints / s / "jaxdl_manifest.json").is_file() for s in os.listdir(checkpoints))
    ):
        assert proc.poll() is None, "the run ended before its first checkpoint"
        assert time.monotonic() < deadline, f"no checkpoint after {timeout_s} s"
        time.sleep(0.02)


@pytest.fixture
def wait_for_first_checkpoint():
    """For the SIGKILL-and-resume tests: ``wait_for_first_checkpoint(proc, checkpoints_dir)``."""
    return _wait_for_first_checkpoint
