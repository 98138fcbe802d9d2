"""How the benchmark times: interleaved blocks, medians, ranges, paired ratios.

A runner is anything with a ``name`` and ``run(steps) -> samples`` that has
finished its work when it returns (``runners`` and ``GemmReference`` below).

* ``interleaved`` warms every runner up (compiles, caches, allocator), sizes
  each one's block to ``block_s`` seconds, then times one block of every
  runner per repeat, in turn, so a noisy neighbour on a shared machine hits
  them all alike. It returns every repeat's samples/s.
* ``summary`` is the median over repeats with the min–max range next to it;
  ``paired_ratios`` divide repeat by repeat (each pair ran back to back, so a
  slowdown that hit both cancels) and their median is the reported ratio.
* ``GemmReference`` is the machine's float32 GEMM rate, timed the same way
  among the runners: BLAS sgemm of the step's largest shape. ``gemm_rate``
  measures it alone, at any shape.
* ``step_flops`` counts a training step's FLOPs, nominal and executed.
"""

from __future__ import annotations

import time

import numpy as np

from .runners import SIZES


def timed(fn):
    """Seconds ``fn()`` takes."""
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


def step_flops(batch):
    """(nominal, executed) FLOPs of one training step of ``batch`` rows.

    nominal = 6·B·Σ I·O: forward, input gradient and weight gradient of every
    layer; executed leaves out the first layer's input gradient (2·B·784·256),
    which nobody computes.
    """
    macs = sum(i * o for i, o in zip(SIZES[:-1], SIZES[1:], strict=True))
    nominal = 6 * batch * macs
    return nominal, nominal - 2 * batch * SIZES[0] * SIZES[1]


def gemm_rate(repeats, shape=(1024, SIZES[0], SIZES[1])):
    """Median float32 GFLOP/s of NumPy's BLAS sgemm (M, K) @ (K, N)."""
    m, k, n = shape
    rng = np.random.default_rng(0)
    a = rng.random((m, k), dtype=np.float32)  # (M, K)
    b = rng.random((k, n), dtype=np.float32)  # (K, N)
    c = np.empty((m, n), np.float32)  # (M, N)
    for _ in range(3):
        np.matmul(a, b, out=c)
    reps = max(5, int(0.1 / max(1e-6, timed(lambda: np.matmul(a, b, out=c)))))
    times = [timed(lambda: [np.matmul(a, b, out=c) for _ in range(reps)]) / reps
             for _ in range(repeats * 3)]
    return 2 * m * k * n / np.median(times) / 1e9


class GemmReference:
    """BLAS sgemm of the step's largest shape, (B, 784) @ (784, 256), timed as a runner.

    One "sample" is one row of it: 2·784·256 FLOPs (``flops_per_sample``).
    """

    name = "gemm"
    flops_per_sample = 2 * SIZES[0] * SIZES[1]

    def __init__(self, batch):
        rng = np.random.default_rng(0)
        self.batch = batch
        self.a = rng.random((batch, SIZES[0]), dtype=np.float32)  # (B, 784)
        self.b = rng.random((SIZES[0], SIZES[1]), dtype=np.float32)  # (784, 256)
        self.c = np.empty((batch, SIZES[1]), np.float32)  # (B, 256)

    def run(self, steps):
        for _ in range(steps):
            np.matmul(self.a, self.b, out=self.c)
        return steps * self.batch


def interleaved(runners, repeats, block_s):
    """{name: [samples/s of each repeat]}: one block per runner per repeat, in turn.

    Warm-up (3 steps, then 3 single steps to size the block) is not timed; a
    block is at least 3 steps."""
    steps = {}
    for r in runners:
        r.run(3)
        one = min(timed(lambda r=r: r.run(1)) for _ in range(3))
        steps[r.name] = max(3, int(block_s / max(one, 1e-6)))
    samples = {r.name: [] for r in runners}
    for _ in range(repeats):
        for r in runners:
            t = time.perf_counter()
            n = r.run(steps[r.name])
            samples[r.name].append(n / (time.perf_counter() - t))
    return samples


def summary(values):
    """{"median", "min", "max"} of a list of per-repeat figures."""
    return {"median": float(np.median(values)), "min": float(np.min(values)),
            "max": float(np.max(values))}


def paired_ratios(samples, a, b, scale=1.0):
    """scale·a_i / b_i for each repeat i (a and b timed back to back)."""
    return [scale * x / y for x, y in zip(samples[a], samples[b], strict=True)]


def paired_ratio(samples, a, b, scale=1.0):
    """The median of ``paired_ratios``: a noisy neighbour that slowed both cancels out
    better than in a ratio of medians."""
    return float(np.median(paired_ratios(samples, a, b, scale)))


def step_rate(samples, batch, name="numba"):
    """GFLOP/s of runner ``name``'s training step at ``batch`` rows, and its fraction of
    the GEMM rate timed alongside it (``samples`` from ``interleaved``, with "gemm"):
    executed and nominal counts (``step_flops``), fractions paired per repeat."""
    nominal, executed = step_flops(batch)
    steps_s = float(np.median(samples[name])) / batch
    per_gemm_sample = GemmReference.flops_per_sample * batch
    executed_frac = summary(paired_ratios(samples, name, "gemm", executed / per_gemm_sample))
    return {"executed_gflops": executed * steps_s / 1e9, "nominal_gflops": nominal * steps_s / 1e9,
            "gemm_gflops": float(np.median(samples["gemm"])) * GemmReference.flops_per_sample / 1e9,
            "executed_fraction": executed_frac["median"],
            "executed_fraction_range": [executed_frac["min"], executed_frac["max"]],
            "nominal_fraction": paired_ratio(samples, name, "gemm", nominal / per_gemm_sample)}
