"""Benchmark: first-step latency of ``jaxdl train`` with an empty and a warm compilation cache.

Latency = from just before the process is started to the end of its first training block (the
first scan-fused call of `fit`'s loop, its metrics on the host): Python start-up, imports, data
loading, building and compiling the loop, running it once. Measured from outside: the command
runs in a child process whose `jaxdl.trainer` prints the wall-clock time when the first block
returns (a wrapper around ``_Engine._train_block``; the library itself is not instrumented).

Each round runs, in a rotating order, three processes with the same options: "cold" (a fresh,
empty cache folder), "warm" (the folder the cold run of the round filled) and "off"
(``--no-compile-cache``); the warm/cold ratio is taken pair by pair within a round.

    python benchmarks/first_step.py [--rounds 5] [-- extra jaxdl train options]
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

_CHILD = r"""
import sys, time
from jaxdl import trainer
_block = trainer._Engine._train_block
def _first(self, *args, **kwargs):
    out = _block(self, *args, **kwargs)
    if not getattr(_first, "seen", False):
        _first.seen = True
        print(f"FIRST_BLOCK_END {time.time():.6f}", file=sys.stderr, flush=True)
    return out
trainer._Engine._train_block = _first
from jaxdl.cli import main
main(sys.argv[1:])
"""


def run_once(args, cache_dir, workdir, tag):
    env = {**os.environ, "JAXDL_COMPILE_CACHE": cache_dir or "0"}
    out = os.path.join(workdir, f"run-{tag}")
    cmd = [sys.executable, "-c", _CHILD, "train", "--quiet", "--out", out, *args]
    if cache_dir is None:
        cmd.append("--no-compile-cache")
    t0 = time.time()
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
    total = time.time() - t0
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed:\n{proc.stderr[-2000:]}")
    marks = [line for line in proc.stderr.splitlines() if line.startswith("FIRST_BLOCK_END ")]
    first = float(marks[0].split()[1]) - t0
    accuracy = proc.stdout.strip().splitlines()[-1].split()[2]
    return first, total, accuracy


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("train_args", nargs="*", help="extra jaxdl train options (after --)")
    a = ap.parse_args()
    train_args = ["--epochs", "1", *a.train_args]
    print(
        f"jaxdl train {' '.join(train_args)}; {os.cpu_count()} cores; load average "
        f"{' '.join(f'{v:.1f}' for v in os.getloadavg())}"
    )
    workdir = tempfile.mkdtemp(prefix="jaxdl-first-step-")
    results = {"cold": [], "warm": [], "off": []}
    try:
        for r in range(a.rounds):
            cache = os.path.join(workdir, f"cache-{r}")
            order = ["cold", "warm", "off"] if r % 2 == 0 else ["off", "cold", "warm"]  # warm after cold
            for kind in order:
                folder = None if kind == "off" else cache
                first, total, acc = run_once(train_args, folder, workdir, f"{r}-{kind}")
                results[kind].append((first, total))
                print(
                    f"  round {r} {kind:<4}: first block at {first:6.2f} s, process {total:6.2f} s, "
                    f"test acc {acc}"
                )
            files = [os.path.join(cache, f) for f in os.listdir(cache)]
            print(f"    cache: {len(files)} entries, {sum(map(os.path.getsize, files)) / 1e6:.1f} MB")
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    print("\nmedians (s)     first block   whole process")
    for kind, v in results.items():
        first, total = (statistics.median(x) for x in zip(*v, strict=True))
        print(f"  {kind:<5}        {first:8.2f}      {total:8.2f}")
    for what, i in (("first block", 0), ("whole process", 1)):
        r = sorted(w[i] / c[i] for w, c in zip(results["warm"], results["cold"], strict=True))
        print(
            f"warm / cold, {what}: median {statistics.median(r):.2f} (min {r[0]:.2f}, max {r[-1]:.2f}; goal <= 0.5)"
        )
    print(f"load average at the end: {' '.join(f'{v:.1f}' for v in os.getloadavg())}")


if __name__ == "__main__":
    main()
