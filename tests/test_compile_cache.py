"""The persistent compilation cache: written by one process, read by the next; off by env var."""

import json
import os
import subprocess
import sys

import jax
import pytest

from jaxdl import compile_cache

# One small training program, run in a fresh process: the cache is per process state of JAX.
_WORKER = r"""
import json, sys
import jax, jax.numpy as jnp
import jaxdl as dl
from jaxdl import compile_cache, train_step as ts

events = []
jax.monitoring.register_event_listener(lambda name, **kw: events.append(name))
path = compile_cache.enable()  # the default threshold (0 s): every program, eager ones too
model = dl.Sequential(dl.Dense(16), dl.Relu(), dl.Dense(3))
state = ts.TrainState.create(model, dl.adam(1e-2), jax.random.key(0), (8,))
step = ts.make_train_step(ts.supervised_loss(model), dl.adam(1e-2))
x, y = jnp.ones((4, 8)), jnp.array([0, 1, 2, 0])
state, m = step(state, (x, y))
print(json.dumps({"path": path, "loss": float(m["loss"]),
                  "requests": events.count("/jax/compilation_cache/compile_requests_use_cache"),
                  "hits": events.count("/jax/compilation_cache/cache_hits"),
                  "misses": events.count("/jax/compilation_cache/cache_misses")}))
"""


def _run(env_value, tmp_path):
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "XDG_CACHE_HOME": str(tmp_path / "xdg")}
    for name in ("JAX_COMPILATION_CACHE_DIR", "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"):
        env.pop(name, None)  # the suite's own cache (conftest): these processes start without one
    if env_value is None:
        env.pop(compile_cache.ENV, None)
    else:
        env[compile_cache.ENV] = env_value
    out = subprocess.run(
        [sys.executable, "-c", _WORKER], env=env, capture_output=True, text=True, timeout=300
    )
    assert out.returncode == 0, out.stderr[-3000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


def _entries(folder):
    return sorted(f for f in os.listdir(folder) if not f.startswith(".")) if os.path.isdir(folder) else []


def test_second_process_reads_the_programs_the_first_one_wrote(tmp_path):
    # The first process names no folder: the default one, under $XDG_CACHE_HOME. The second
    # names that folder in the environment variable, and reads every program from it.
    folder = tmp_path / "xdg" / "jaxdl" / "xla"
    first = _run(None, tmp_path)
    assert first["path"] == str(folder)
    written = _entries(folder)
    assert written and first["misses"] >= 1 and first["hits"] == 0
    second = _run(str(folder), tmp_path)
    assert second["path"] == str(folder)
    assert second["hits"] >= 1 and second["misses"] == 0
    assert second["hits"] == second["requests"], second  # every program read, eager ones too
    assert second["loss"] == first["loss"]
    assert _entries(folder) == written  # nothing new to compile


def test_env_var_turns_it_off(tmp_path, monkeypatch):
    result = _run("0", tmp_path)
    assert result["path"] is None and result["hits"] == 0
    assert not (tmp_path / "xdg").exists()
    for off in ("off", "False", " no "):
        monkeypatch.setenv(compile_cache.ENV, off)
        assert compile_cache.enable(str(tmp_path / "never")) is None
    assert not (tmp_path / "never").exists()


def test_enable_in_process_switches_folders_and_disable_sticks(tmp_path, monkeypatch):
    monkeypatch.delenv(compile_cache.ENV, raising=False)
    before = (jax.config.jax_compilation_cache_dir, jax.config.jax_persistent_cache_min_compile_time_secs)
    try:
        assert compile_cache.enable(str(tmp_path / "a")) == str(tmp_path / "a")
        assert compile_cache.directory() == str(tmp_path / "a")
        assert compile_cache.enable(str(tmp_path / "b")) == str(tmp_path / "b")
        assert compile_cache.directory() == str(tmp_path / "b") and (tmp_path / "b").is_dir()
        compile_cache.disable()
        assert compile_cache.directory() is None and os.environ[compile_cache.ENV] == "0"
        assert compile_cache.enable(str(tmp_path / "c")) is None and not (tmp_path / "c").exists()
        with pytest.raises(ValueError, match="min_compile_time_s"):
            monkeypatch.delenv(compile_cache.ENV)
            compile_cache.enable(str(tmp_path / "d"), min_compile_time_s=-1)
    finally:
        jax.config.update("jax_compilation_cache_dir", before[0])
        jax.config.update("jax_persistent_cache_min_compile_time_secs", before[1])
        compile_cache._reset()


def test_the_test_suite_never_writes_into_the_home_cache():
    assert os.environ.get(compile_cache.ENV) == "0"  # set by tests/conftest.py
    assert compile_cache.enable() is None


@pytest.mark.parametrize("flag, on", [((), True), (("--no-compile-cache",), False)])
def test_jaxdl_train_turns_it_on_unless_no_compile_cache(tmp_path, monkeypatch, flag, on):
    from jaxdl import cli

    monkeypatch.setenv(compile_cache.ENV, str(tmp_path / "cache"))
    before = jax.config.jax_compilation_cache_dir
    try:
        with pytest.raises(SystemExit) as exit_:  # refused after the cache is set: nothing trains
            cli.main(["train", *flag, "--resume"])
        assert exit_.value.code == 2
        assert compile_cache.directory() == (str(tmp_path / "cache") if on else None)
        assert (os.environ[compile_cache.ENV] == "0") == (not on)
    finally:
        jax.config.update("jax_compilation_cache_dir", before)
        compile_cache._reset()


@pytest.mark.parametrize("setting", [False, True, "folder"])
def test_fit_turns_it_on_by_default_and_leaves_it_alone_with_false(tmp_path, monkeypatch, setting):
    import numpy as np

    import jaxdl as dl

    monkeypatch.setenv(compile_cache.ENV, str(tmp_path / "env"))
    before = jax.config.jax_compilation_cache_dir
    x = np.random.default_rng(0).normal(size=(16, 4)).astype(np.float32)
    y = (x[:, 0] > 0).astype(np.int32)
    arg = str(tmp_path / "given") if setting == "folder" else setting
    try:
        dl.fit(
            dl.Sequential(dl.Dense(2)),
            dl.sgd(0.1),
            (x, y),
            epochs=1,
            batch_size=8,
            progress=False,
            compile_cache=arg,
        )
        expected = {False: before, True: str(tmp_path / "env"), "folder": str(tmp_path / "given")}[setting]
        assert compile_cache.directory() == expected
    finally:
        jax.config.update("jax_compilation_cache_dir", before)
        compile_cache._reset()
