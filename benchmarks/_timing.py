"""Timing helper shared by the benchmarks."""

import time


def timeit(fn, repeats: int, warmup: int = 2) -> list[float]:
    """Seconds per call of ``fn`` (which must block until its work is done), after ``warmup`` calls."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return times


def round_robin(runners: dict, repeats: int, warmup: int = 2) -> dict[str, list[float]]:
    """Time each runner ``repeats`` times, one call of each in turn (the order rotating), so that
    a changing machine load (other processes) hits every contender alike; seconds per call.

    Use it for contenders that share one runtime (JAX programs): interleaving XLA with PyTorch
    makes their spin-waiting thread pools starve each other on a small machine.
    """
    for fn in runners.values():
        for _ in range(warmup):
            fn()
    times = {name: [] for name in runners}
    names = list(runners)
    for r in range(repeats):
        for name in names[r % len(names) :] + names[: r % len(names)]:  # rotate who goes first
            t0 = time.perf_counter()
            runners[name]()
            times[name].append(time.perf_counter() - t0)
    return times
