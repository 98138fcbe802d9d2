# GPU acceptance: what a session on a machine with an NVIDIA GPU and CuPy runs, from the
# repository root (without a usable GPU every test here skips and says why):
#
#   python -m pytest tests/test_kernels.py tests/test_gpu.py
#       every CuPy op against the NumPy reference, op by op (test_kernels.py's cupy cases),
#       then serial training on CuPy against NumPy (this file)
#   mpirun -n 2 python -m pytest --with-mpi -m mpi tests/test_gpu_mpi.py
#   mpirun -n 4 python -m pytest --with-mpi -m mpi tests/test_gpu_mpi.py
#       data-parallel and pipeline training on CuPy, device buffers straight to MPI and
#       staged through host buffers, against serial NumPy (-n 4 adds 4 stages and 2 x 2)
#   python -m mpnn.bench --backends numpy,cupy --batches 1024,4096 --threads $(nproc)
#       samples/s, NumPy on every core (the benchmark's job; nothing here times anything)
"""Serial training on CuPy ends where training on NumPy ends.

* ``python -m mpnn.train --backend cupy`` in float64 saves the weights, and
  writes the metrics, of the same run with ``--backend numpy`` (to 1e-9),
  for SGD with momentum and for Adam;
* the benchmark's model (784-256-128-64-10) in float32, 20 steps of the
  trainer's own step (``runtime.loop.train_batch``): the weights agree with
  NumPy's within float32 rounding.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest

from mpnn.kernels.cupy_ops import gpu_available

pytestmark = pytest.mark.skipif(not gpu_available(),
                                reason="no usable GPU: CuPy is not installed or no CUDA device "
                                       "answers (the GPU acceptance tests need one)")

# digits: 1437 training rows, so --batch-size 100 ends each epoch with a batch of 37
CLI_RUN = ["--dataset", "digits", "--hidden", "24,16,12", "--epochs", "2", "--batch-size", "100",
           "--dtype", "float64", "--quiet", "--seed", "3"]


def train_cli(tmp_path, backend, *argv):
    """``python -m mpnn.train`` in a fresh process; returns (weights, metrics records)."""
    save, metrics = tmp_path / f"{backend}.npz", tmp_path / f"{backend}.jsonl"
    cmd = [sys.executable, "-m", "mpnn.train", *CLI_RUN, *argv, "--backend", backend,
           "--save", str(save), "--metrics", str(metrics)]
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=300, check=False,
                       env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert p.returncode == 0, p.stdout + p.stderr
    with np.load(save, allow_pickle=False) as z:
        weights = {name: z[name] for name in z.files}
    return weights, [json.loads(line) for line in metrics.read_text().splitlines()]


@pytest.mark.parametrize("optimizer", [["--optimizer", "sgd", "--momentum", "0.9", "--lr", "0.05"],
                                       ["--optimizer", "adam", "--weight-decay", "1e-4"]],
                         ids=["sgd-momentum", "adam"])
def test_cli_on_cupy_saves_the_numpy_weights(tmp_path, optimizer):
    ref, ref_metrics = train_cli(tmp_path, "numpy", *optimizer)
    got, metrics = train_cli(tmp_path, "cupy", *optimizer)
    assert sorted(got) == sorted(ref)
    for name in ref:
        assert got[name].dtype == np.float64 and got[name].shape == ref[name].shape, name
        diff = float(np.max(np.abs(got[name] - ref[name])))
        assert diff <= 1e-9, f"{name}: max |cupy - numpy| = {diff:.2e}"
    assert len(metrics) == len(ref_metrics) == 2
    for a, b in zip(metrics, ref_metrics, strict=True):
        assert a["test_accuracy"] == pytest.approx(b["test_accuracy"], abs=1e-12)
        assert a["train_loss"] == pytest.approx(b["train_loss"], rel=1e-9)
        assert a["test_loss"] == pytest.approx(b["test_loss"], rel=1e-9)


SIZES = [784, 256, 128, 64, 10]  # the benchmark's model


def train_steps(backend, optimizer, steps=20, batch=128):
    """``steps`` trainer steps of the benchmark model in float32; the flat weights."""
    from mpi4py import MPI

    from mpnn.data import load_dataset
    from mpnn.kernels import get_ops
    from mpnn.nn.model import MLP
    from mpnn.nn.optim import make_optimizer
    from mpnn.parallel.data_parallel import DataParallelEngine
    from mpnn.parallel.grid import make_grid
    from mpnn.runtime.loop import train_batch

    ops = get_ops(backend)
    data = load_dataset("synthetic", dtype=np.float32, synthetic_size=(steps * batch, 1))
    grid = make_grid(MPI.COMM_SELF)  # a serial run is a grid of one
    model = MLP(SIZES, "relu", np.float32, seed=0, ops=ops)
    engine = DataParallelEngine(model, "cross_entropy", grid.dp_comm)
    lr = 0.01 if optimizer == "sgd" else 1e-3
    opt = make_optimizer(optimizer, model.flat, ops, lr,
                         momentum=0.9 if optimizer == "sgd" else 0.0, weight_decay=1e-4)
    for s in range(steps):
        train_batch(engine, opt, ops, data, np.arange(s * batch, (s + 1) * batch), batch, lr)
    ops.synchronize()
    return np.asarray(ops.to_host(model.flat.data))


@pytest.mark.parametrize("optimizer", ["sgd", "adam"])
def test_benchmark_model_float32_trains_like_numpy(optimizer):
    ref = train_steps("numpy", optimizer)
    got = train_steps("cupy", optimizer)
    assert got.dtype == np.float32
    # float32 op tolerance (rtol 3e-5, atol 3e-6) x 30 for 20 steps of accumulated rounding
    np.testing.assert_allclose(got, ref, rtol=9e-4, atol=9e-5)


def test_auto_backend_is_cupy():
    from mpnn.kernels import get_ops

    assert get_ops("auto").name == "cupy"
