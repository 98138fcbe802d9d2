"""GPU check: the CuPy op set against the NumPy reference, then speed.

    python mpi_examples/gpu_check.py            (from the repository root; ~1-3 minutes)

1. every CupyOps method against NumpyOps: float32 and float64, odd shapes and
   one row, every activation, both losses, every optimizer variant with and
   without weight decay (max abs / rel error, PASS or FAIL per case);
2. 20 training steps with numpy, numba and cupy from the same seed: the
   weights must agree with numpy within float32 tolerance;
3. samples/s at batch 256, 1024 and 4096 for cupy, numpy (all CPU cores) and
   PyTorch on CUDA when it is there — the bench's own runners, medians of
   timed blocks, warm-up excluded.

Exits non-zero when a check fails. Needs only numpy, numba and cupy (SciPy,
threadpoolctl and torch are used when present).
"""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout

from mpnn import bench  # noqa: E402
from mpnn.kernels import get_ops  # noqa: E402
from mpnn.kernels.cupy_ops import gpu_available  # noqa: E402
from mpnn.kernels.numpy_ops import NumpyOps  # noqa: E402
from mpnn.nn.model import MLP, Context  # noqa: E402
from mpnn.nn.optim import make_optimizer  # noqa: E402

TOL = {np.float32: (3e-5, 3e-6), np.float64: (1e-11, 1e-12)}
failures = []


def check(label, got, expected, dtype, scale=1.0):
    rtol, atol = TOL[np.dtype(dtype).type]
    got, expected = np.asarray(got, np.float64), np.asarray(expected, np.float64)
    err = np.abs(got - expected)
    ok = bool(np.all(err <= (atol + rtol * np.abs(expected)) * scale)) and got.shape == expected.shape
    rel = float((err / np.maximum(np.abs(expected), 1e-30)).max()) if err.size else 0.0
    if not ok:
        failures.append(label)
    print(f"  {'PASS' if ok else 'FAIL'} {label:60s} max abs {err.max() if err.size else 0:.2e} "
          f"max rel {rel:.2e}")


def op_checks(ops, ref):
    for dtype in (np.float32, np.float64):
        for section in (layer_checks, loss_checks, optimizer_checks):
            guarded(f"{section.__name__} {np.dtype(dtype).name}", lambda: section(ops, ref, dtype))
    a = np.arange(12, dtype=np.float32)
    dev = ops.to_device(a)
    ops.synchronize()
    check("to_device / synchronize / to_host round trip", ops.to_host(dev), a, np.float32)


def layer_checks(ops, ref, dtype):
    h, d = ops.to_host, ops.to_device
    rng = np.random.default_rng(0)
    for B, I, O in ((1, 7, 5), (17, 33, 10), (256, 784, 256), (129, 13, 127)):
        x = rng.uniform(-1, 1, (B, I)).astype(dtype)
        W = rng.uniform(-1, 1, (I, O)).astype(dtype)
        b = rng.uniform(-1, 1, O).astype(dtype)
        tag = f"{np.dtype(dtype).name} B={B} I={I} O={O}"
        for act in ("identity", "relu", "tanh", "sigmoid"):
            out = d(np.zeros((B, O), dtype))
            ops.linear_act(d(x), d(W), d(b), act, out)
            check(f"linear_act {act} {tag}", h(out), ref.linear_act(x, W, b, act, np.empty((B, O), dtype)),
                  dtype, max(1, I / 16))
            y = ref.linear_act(x, W, b, act, np.empty((B, O), dtype))
            dy = rng.uniform(-1, 1, (B, O)).astype(dtype)
            db0 = rng.uniform(-1, 1, O).astype(dtype)
            dz_r, db_r = dy.copy(), db0.copy()
            ref.act_bias_backward(dz_r, y, act, db_r)
            dz, db = d(dy), d(db0)
            ops.act_bias_backward(dz, d(y), act, db)
            check(f"act_bias_backward {act} dz {tag}", h(dz), dz_r, dtype)
            check(f"act_bias_backward {act} db {tag}", h(db), db_r, dtype, max(1, B / 8))
        dz = rng.uniform(-1, 1, (B, O)).astype(dtype)
        dW0 = rng.uniform(-1, 1, (I, O)).astype(dtype)
        dW_r = dW0.copy()
        ref.weight_grad(x, dz, dW_r)
        flat = d(np.concatenate([dW0.ravel(), np.zeros(3, dtype)]))
        ops.weight_grad(d(x), d(dz), flat[:I * O].reshape(I, O))
        check(f"weight_grad {tag}", h(flat)[:I * O].reshape(I, O), dW_r, dtype, max(1, B / 8))
        check(f"weight_grad leaves the rest of the buffer {tag}", h(flat)[I * O:], np.zeros(3), dtype)
        out = d(np.zeros((B, I), dtype))
        ops.input_grad(d(dz), d(W), out)
        check(f"input_grad {tag}", h(out), ref.input_grad(dz, W, np.empty((B, I), dtype)), dtype,
              max(1, O / 8))


def loss_checks(ops, ref, dtype):
    h, d = ops.to_host, ops.to_device
    rng = np.random.default_rng(1)
    for B, C in ((1, 10), (64, 10), (257, 17)):
        logits = rng.uniform(-8, 8, (B, C)).astype(dtype)
        labels = rng.integers(0, C, B)
        for loss in ("cross_entropy", "mse"):
            d_r = np.empty_like(logits)
            l_r = ref.loss(loss, logits, labels, 1 / B, d_r)
            out = d(np.zeros_like(logits))
            got = ops.loss(loss, d(logits), d(labels), 1 / B, out)
            tag = f"{loss} {np.dtype(dtype).name} B={B} C={C}"
            check(f"loss value {tag}", got, l_r, dtype, 10)
            check(f"loss gradient {tag}", h(out), d_r, dtype)
            s, c = ops.predict_stats(d(logits), d(labels), loss)
            s_r, c_r = ref.predict_stats(logits, labels, loss)
            check(f"predict_stats {tag}", [s, c], [s_r, c_r], dtype, 10)


def optimizer_checks(ops, ref, dtype):
    h, d = ops.to_host, ops.to_device
    rng = np.random.default_rng(2)
    n = 100_003
    p = rng.uniform(-1, 1, n).astype(dtype)
    g = rng.uniform(-0.1, 0.1, n).astype(dtype)
    for wd in (0.0, 0.01):
        tag = f"{np.dtype(dtype).name} wd={wd}"
        p_r, pd = p.copy(), d(p)
        ref.sgd_step(p_r, g, 0.1, wd)
        ops.sgd_step(pd, d(g), 0.1, wd)
        check(f"sgd_step {tag}", h(pd), p_r, dtype)
        for nesterov in (False, True):
            p_r, v_r, pd, vd = p.copy(), np.zeros_like(p), d(p), d(np.zeros_like(p))
            for _ in range(3):
                ref.momentum_step(p_r, g, v_r, 0.05, 0.9, nesterov, wd)
                ops.momentum_step(pd, d(g), vd, 0.05, 0.9, nesterov, wd)
            check(f"momentum_step nesterov={nesterov} {tag}", h(pd), p_r, dtype)
            check(f"momentum_step velocity nesterov={nesterov} {tag}", h(vd), v_r, dtype)
        p_r, m_r, v_r = p.copy(), np.zeros_like(p), np.zeros_like(p)
        pd, md, vd = d(p), d(np.zeros_like(p)), d(np.zeros_like(p))
        for t in (1, 2, 3):
            ref.adam_step(p_r, g, m_r, v_r, 1e-3, 0.9, 0.999, 1e-8, wd, t)
            ops.adam_step(pd, d(g), md, vd, 1e-3, 0.9, 0.999, 1e-8, wd, t)
        check(f"adam_step {tag}", h(pd), p_r, dtype, 20)
        check(f"adam_step moments {tag}", np.concatenate([h(md), h(vd)]),
              np.concatenate([m_r, v_r]), dtype)


def train(backend, optimizer, steps=20, batch=128):
    ops = get_ops(backend)
    model = MLP(bench.SIZES, "relu", np.float32, seed=0, ops=ops)
    opt = make_optimizer(optimizer, model.flat, ops, lr=0.01 if optimizer == "sgd" else 1e-3,
                         momentum=0.9 if optimizer == "sgd" else 0.0, weight_decay=1e-4)
    x, labels = bench.synthetic(steps * batch, seed=3)
    x, labels = ops.to_device(x), ops.to_device(labels)
    ctx, dlogits = Context(), ops.xp.empty((batch, bench.SIZES[-1]), np.float32)
    for s in range(steps):
        rows = slice(s * batch, (s + 1) * batch)
        model.zero_grad()
        logits = model.forward(x[rows], ctx)
        ops.loss("cross_entropy", logits, labels[rows], 1 / batch, dlogits)
        model.backward(dlogits, ctx)
        opt.step()
    return ops.to_host(model.flat.data)


def main():
    t0 = time.perf_counter()
    if not gpu_available():
        print("no usable GPU (or cupy is not installed): nothing to check")
        return 2
    import cupy

    name = cupy.cuda.runtime.getDeviceProperties(cupy.cuda.Device().id)["name"]
    name = name.decode() if isinstance(name, bytes) else name
    print(f"GPU: {name}, cupy {cupy.__version__}, numpy {np.__version__}, "
          f"python {sys.version.split()[0]}")
    print("\n1. CupyOps against NumpyOps")
    guarded("op checks", lambda: op_checks(get_ops("cupy"), NumpyOps()))

    print("\n2. training 20 steps, weights against numpy (float32)")
    for optimizer in ("sgd", "adam"):
        ref = train("numpy", optimizer)
        for backend in ("numba", "cupy"):
            guarded(f"{backend} {optimizer} training", lambda: check(
                f"{backend} weights after 20 {optimizer} steps", train(backend, optimizer), ref,
                np.float32, 30))

    print("\n3. samples/s (MLP 784-256-128-64-10, SGD momentum, float32)")
    guarded("throughput", throughput)

    print(f"\n{'all checks passed' if not failures else f'{len(failures)} FAILED: ' + '; '.join(failures)}"
          f" ({time.perf_counter() - t0:.0f} s)")
    return 1 if failures else 0


def guarded(label, fn):
    """Run one section; a crash is reported and counted, and the next section still runs."""
    try:
        fn()
    except Exception:
        import traceback

        traceback.print_exc()
        failures.append(f"{label} crashed")


def throughput():
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    backends = ["numpy", "numba", "cupy"]
    try:
        import torch

        if torch.cuda.is_available():
            backends.append("torch-cuda")
    except ImportError:
        pass
    bench.set_threads(cores, torch="torch-cuda" in backends)
    print(f"   (CPU backends with {cores} threads)")
    print("batch".ljust(8) + "".join(f"{b:>14s}" for b in backends) + "   cupy/numpy")
    for batch in (256, 1024, 4096):
        r = bench.measure_throughput(backends, batch, repeats=5, block_s=0.3)
        print(f"{batch:<8d}" + "".join(f"{r[b]:>14,.0f}" for b in backends)
              + f"   {r['cupy'] / r['numpy']:9.1f}x", flush=True)


if __name__ == "__main__":
    sys.exit(main())
