import os
import time

import pytest

# Tests run on the CPU; data-parallel tests get 4 fake devices. Both must be set before jax is imported.
os.environ.setdefault("JAX_PLATFORMS", "cpu")
# `fit` and the CLI turn on JAX's persistent compilation cache in ~/.cache; tests must not write
# there (tests/test_compile_cache.py turns it on in temporary folders, in subprocesses).
os.environ["JAXDL_COMPILE_CACHE"] = "0"
os.environ["XLA_FLAGS"] = (
    os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=4"
).strip()


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
