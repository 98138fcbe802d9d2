"""GPU check for model parallelism: CuPy pipeline stages equal serial NumPy training.

    mpirun -n 2 python mpi_examples/gpu_pipeline_check.py    (from the repository root; ~1 minute)
    mpirun -n 4 python mpi_examples/gpu_pipeline_check.py    (adds --pp 4 and --dp 2 --pp 2)

Every rank trains the digits MLP in float64 with ``--backend cupy`` under each
pipeline schedule, twice: with messages staged through host buffers (what the
PyPI mpich wheel needs) and with the engine's own choice (device buffers
straight to MPI when the library says it is CUDA-aware). The weights each
stage ends with must equal a serial NumPy run's within 1e-9, and the metrics
must agree. Prints PASS or FAIL per case on rank 0; exits non-zero on a failure.
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout

from mpi4py import MPI  # noqa: E402

from mpnn.parallel import staging  # noqa: E402
from mpnn.train import build_parser, setup, train  # noqa: E402

BASE = ["--dataset", "digits", "--hidden", "24,16,12", "--epochs", "2", "--batch-size", "100",
        "--dtype", "float64", "--quiet", "--optimizer", "sgd", "--momentum", "0.9", "--lr", "0.05"]


def run(argv, comm):
    args = build_parser().parse_args(argv)
    grid, data, model, _, _ = setup(args, comm)
    history = train(args, comm, grid, data, model, log=lambda *a: None)
    state = {k: model.ops.to_host(v) for k, v in model.state_dict().items()}
    return state, history


def main():
    world = MPI.COMM_WORLD
    rank, size = world.Get_rank(), world.Get_size()
    ref, ref_hist = run(BASE + ["--backend", "numpy"], None)  # every rank, serially
    grids = [["--pp", str(size)]] + ([["--dp", "2", "--pp", "2"]] if size == 4 else [])
    cuda_aware = staging.mpi_cuda_aware()
    failures = 0
    for grid in grids:
        for schedule in ("naive", "gpipe", "1f1b"):
            for staged in (True, False):
                staging.mpi_cuda_aware = (lambda: False) if staged else (lambda: cuda_aware)
                argv = BASE + ["--backend", "cupy", "--micro-batches", "4",
                               "--schedule", schedule] + grid
                state, hist = run(argv, world)
                diff = max(float(np.max(np.abs(v - ref[k]))) for k, v in state.items())
                acc = max(abs(a["test_accuracy"] - b["test_accuracy"])
                          for a, b in zip(hist, ref_hist))
                ok = diff <= 1e-9 and acc <= 1e-12
                worst = world.allreduce(diff, op=MPI.MAX)
                bad = world.allreduce(0 if ok else 1)
                failures += bad > 0
                if rank == 0:
                    path = "host-staged" if staged else ("cuda-aware" if cuda_aware else
                                                         "host-staged (MPI not CUDA-aware)")
                    print(f"{'PASS' if not bad else 'FAIL'} {' '.join(grid):16s} {schedule:6s} "
                          f"{path:34s} max |w - serial| {worst:.2e}", flush=True)
    if rank == 0:
        print(f"{failures} failure(s)")
    sys.exit(1 if failures else 0)


if __name__ == "__main__":
    main()
