"""JAX's persistent compilation cache, on by default for ``jaxdl train``, ``jaxdl doctor`` and `fit`.

XLA compiles every jitted program the first time a process calls it; on a CPU the train loop of
the default MLP takes seconds to compile, longer than an epoch of training. With the cache on,
the compiled executables are written to disk and a later process with the same program, JAX
version, backend and XLA flags loads them instead of compiling
(https://docs.jax.dev/en/latest/persistent_compilation_cache.html).

Where: ``$JAXDL_COMPILE_CACHE`` when it holds a path, else ``$XDG_CACHE_HOME/jaxdl/xla``, else
``~/.cache/jaxdl/xla``. ``JAXDL_COMPILE_CACHE=0`` (or ``off``, ``false``, ``no``) turns it off
for the process, whatever the code asks for; so do ``jaxdl train --no-compile-cache`` and
``fit(..., compile_cache=False)`` (the latter leaves JAX's own setting alone).

JAX writes only programs that took at least ``jax_persistent_cache_min_compile_time_secs`` (1 s
by default) to compile; `enable` lowers that to ``min_compile_time_s`` (0 s), so that every
program is cached: the train loop, the eval step and the doctor's programs, and also the small
programs of eager ops (the model's initialization draws: about 20 programs and 1.1 s of a warm
`jaxdl train` start on a 2-core CPU, a few kB each). benchmarks/RESULTS.md has the figures.
"""

from __future__ import annotations

import os

import jax

__all__ = ["ENV", "enable", "disable", "directory", "default_directory"]

ENV = "JAXDL_COMPILE_CACHE"
_OFF = ("0", "off", "false", "no")


def default_directory() -> str:
    """``$XDG_CACHE_HOME/jaxdl/xla`` or ``~/.cache/jaxdl/xla`` (``$JAXDL_COMPILE_CACHE`` ignored).

    Returns:
      The folder, a str.
    """
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(base, "jaxdl", "xla")


def _env_off() -> bool:
    return os.environ.get(ENV, "").strip().lower() in _OFF


def directory() -> str | None:
    """The folder JAX's persistent compilation cache uses now, or None when it is off.

    Returns:
      A str, or None.
    """
    if not jax.config.jax_enable_compilation_cache:
        return None
    return jax.config.jax_compilation_cache_dir or None


def _reset() -> None:
    # JAX opens its cache once, at the first compilation; a new folder needs a fresh start.
    from jax.experimental.compilation_cache import compilation_cache

    compilation_cache.reset_cache()


def enable(path: str | None = None, *, min_compile_time_s: float = 0.0) -> str | None:
    """Turn on the persistent compilation cache and return its folder (None: turned off by
    ``JAXDL_COMPILE_CACHE=0``, which wins over everything).

    The folder is ``path`` when given, else ``$JAXDL_COMPILE_CACHE`` when it holds a path, else
    the folder already set in JAX (``JAX_COMPILATION_CACHE_DIR``), else `default_directory`. It is
    created if needed. Programs that compile in at least ``min_compile_time_s`` seconds are
    written (JAX's default threshold of 1 s would skip the CPU's train loops; 0 writes all); any
    cached program is read. Safe to call again: the same folder changes nothing, another one takes over.

    Args:
      path: the cache folder (None: see above).
      min_compile_time_s: cache programs that took at least this long to compile.

    Returns:
      The folder, or None when the cache stays off.
    """
    if _env_off():
        return None
    if min_compile_time_s < 0:
        raise ValueError(f"enable: min_compile_time_s={min_compile_time_s!r} is out of range; expected >= 0")
    env_path = os.environ.get(ENV, "").strip()
    path = path or env_path or jax.config.jax_compilation_cache_dir or default_directory()
    path = os.path.abspath(os.path.expanduser(path))
    os.makedirs(path, exist_ok=True)
    if directory() != path:
        jax.config.update("jax_enable_compilation_cache", True)
        jax.config.update("jax_compilation_cache_dir", path)
        _reset()
    jax.config.update("jax_persistent_cache_min_compile_time_secs", float(min_compile_time_s))
    return path


def disable() -> None:
    """Turn the persistent compilation cache off for this process.

    Sets ``JAXDL_COMPILE_CACHE=0`` too, so that later `enable` calls (`fit`'s) keep it off;
    ``jaxdl train --no-compile-cache`` does this.
    """
    os.environ[ENV] = "0"
    if directory() is not None:
        jax.config.update("jax_compilation_cache_dir", None)
        _reset()
