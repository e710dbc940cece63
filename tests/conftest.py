import os

# Tests run on the CPU; data-parallel tests get 4 fake devices. Both must be set before jax is imported.
os.environ.setdefault("JAX_PLATFORMS", "cpu")
# `fit` and the CLI turn on JAX's persistent compilation cache in ~/.cache; tests must not write
# there (tests/test_compile_cache.py turns it on in temporary folders, in subprocesses).
os.environ["JAXDL_COMPILE_CACHE"] = "0"
os.environ["XLA_FLAGS"] = (
    os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=4"
).strip()
