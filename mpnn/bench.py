"""``python -m mpnn.bench``: how fast mpnn trains, side by side with PyTorch.

Trains the 784-256-128-64-10 ReLU MLP (cross-entropy, SGD with momentum 0.9,
float32) on synthetic data of MNIST's shape and prints, measured in one run:

* samples/s of each backend (numpy, numba, cupy when a GPU is usable) and of
  PyTorch on the CPU when it is installed, at each batch size, all with the
  same thread count (threadpoolctl, numba, ``torch.set_num_threads``) and
  preloaded data; the backends take turns within every repeat so a noisy
  neighbour hits them alike; medians over repeats, warm-up (and numba's
  first compile) excluded;
* the achieved GFLOP/s of a numba training step against this machine's
  float32 GEMM rate measured alongside it (BLAS sgemm of the step's largest
  shape, timed in the same interleaved rounds);
* data-parallel efficiency at ``mpirun -n 2`` with 256 samples per rank
  (launched here as a subprocess running ``--dp-worker``), and how much of the
  gradient Allreduce the overlapped bucketed sync hides behind backward.

FLOPs of a step: the nominal count is 6·B·Σ I·O (forward, input gradient,
weight gradient of every layer); the executed count leaves out the first
layer's input gradient, which nobody computes (2·B·784·256 of the nominal).
Both are printed; the GEMM-rate target is judged on the executed count.

    python -m mpnn.bench [--threads 1] [--repeats 5] [--batches 64,256,1024] [--json PATH]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

SIZES = (784, 256, 128, 64, 10)
LR, MOMENTUM = 0.01, 0.9
TARGETS = {"numba/torch at batch 64": 1.5, "numba/torch at batch 256": 1.2,
           "step/GEMM rate at batch 1024": 0.70, "DP -n 2 per-rank efficiency": 0.85}


def parse_args(argv=None):
    p = argparse.ArgumentParser(prog="python -m mpnn.bench", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--threads", type=int, default=1, help="threads for every backend (default 1)")
    p.add_argument("--repeats", type=int, default=9, help="timed repeats per measurement (median)")
    p.add_argument("--batches", default="64,256,1024", help="comma-separated batch sizes")
    p.add_argument("--backends", default="auto",
                   help="comma-separated from numpy,numba,cupy,torch (auto: all that are usable)")
    p.add_argument("--block-s", type=float, default=0.15,
                   help="seconds of training per timed block (sets the steps per repeat)")
    p.add_argument("--bucket-mb", type=float, default=0.1,
                   help="bucket size of the overlapped Allreduce in the DP measurement")
    p.add_argument("--no-dp", action="store_true", help="skip the mpirun -n 2 measurement")
    p.add_argument("--dp-ranks", type=int, default=2, help="ranks of the DP measurement")
    p.add_argument("--dp-batch", type=int, default=256, help="samples per rank in the DP measurement")
    p.add_argument("--json", metavar="PATH", help="also write the figures as JSON")
    p.add_argument("--dp-worker", metavar="JSON", help=argparse.SUPPRESS)
    return p.parse_args(argv)


# ---------------------------------------------------------------- set-up


def set_threads(n, torch=False):
    """Same thread count for BLAS (all loaded libraries), numba and (if asked) torch."""
    try:
        import scipy.linalg.blas  # noqa: F401  (load SciPy's BLAS before limiting it)
    except ImportError:
        pass
    try:
        from threadpoolctl import threadpool_limits

        threadpool_limits(limits=n)
    except ImportError:  # e.g. a GPU machine with a bare environment
        print("warning: threadpoolctl is not installed; BLAS threads follow OMP_NUM_THREADS")
    import numba

    numba.set_num_threads(min(n, numba.config.NUMBA_NUM_THREADS))
    if torch:
        import torch as _torch

        _torch.set_num_threads(n)


def synthetic(n, seed=0):
    """n MNIST-shaped rows: pixels in [0, 1) (float32), labels 0..9."""
    rng = np.random.default_rng(seed)
    x = rng.random((n, SIZES[0]), dtype=np.float32)
    return x, rng.integers(0, SIZES[-1], size=n)


def step_flops(batch):
    """(nominal 6·B·Σ I·O, executed: without the first layer's input gradient)."""
    macs = sum(i * o for i, o in zip(SIZES[:-1], SIZES[1:]))
    nominal = 6 * batch * macs
    return nominal, nominal - 2 * batch * SIZES[0] * SIZES[1]


def gemm_rate(repeats, shape=(1024, SIZES[0], SIZES[1])):
    """Median float32 GFLOP/s of NumPy's BLAS sgemm (M, K) @ (K, N)."""
    m, k, n = shape
    rng = np.random.default_rng(0)
    a = rng.random((m, k), dtype=np.float32)
    b = rng.random((k, n), dtype=np.float32)
    c = np.empty((m, n), np.float32)
    for _ in range(3):
        np.matmul(a, b, out=c)
    reps = max(5, int(0.1 / max(1e-6, _time(lambda: np.matmul(a, b, out=c)))))
    times = []
    for _ in range(repeats * 3):
        times.append(_time(lambda: [np.matmul(a, b, out=c) for _ in range(reps)]) / reps)
    return 2 * m * k * n / np.median(times) / 1e9


def _time(fn):
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


# --------------------------------------------------------------- runners


class MpnnRunner:
    """One mpnn training set-up: model, optimizer, buffers, preloaded batches."""

    def __init__(self, backend, batch, x, labels):
        from .kernels import get_ops
        from .nn.model import MLP
        from .nn.optim import make_optimizer
        from .parallel.data_parallel import DataParallelEngine

        self.name, self.batch = backend, batch
        self.ops = ops = get_ops(backend)
        self.model = MLP(SIZES, "relu", np.float32, seed=0, ops=ops)
        self.opt = make_optimizer("sgd", self.model.flat, ops, lr=LR, momentum=MOMENTUM)
        self.engine = DataParallelEngine(self.model, "cross_entropy", None)  # serial: no sum
        n = x.shape[0] // batch
        self.x = ops.to_device(np.ascontiguousarray(x[:n * batch]))
        self.labels = ops.to_device(labels[:n * batch])
        self.n_batches, self.k = n, 0

    def step(self):
        """One training step on the next preloaded batch: the trainer's own step."""
        s = self.k * self.batch
        self.k = (self.k + 1) % self.n_batches
        loss = self.engine.train_step(self.x[s:s + self.batch], self.labels[s:s + self.batch],
                                      1.0 / self.batch)
        self.opt.step()
        return loss

    def run(self, steps):
        for _ in range(steps):
            self.step()
        self.ops.synchronize()


class TorchRunner:
    """The same model and optimizer in PyTorch on the CPU, preloaded tensors."""

    def __init__(self, batch, x, labels, device="cpu"):
        import torch

        self.name = "torch" if device == "cpu" else f"torch-{device}"
        self.device = device
        torch.manual_seed(0)
        layers = []
        for i, (fan_in, fan_out) in enumerate(zip(SIZES[:-1], SIZES[1:])):
            layers.append(torch.nn.Linear(fan_in, fan_out))
            if i < len(SIZES) - 2:
                layers.append(torch.nn.ReLU())
        self.net = torch.nn.Sequential(*layers).to(device)
        self.opt = torch.optim.SGD(self.net.parameters(), lr=LR, momentum=MOMENTUM)
        self.loss = torch.nn.CrossEntropyLoss()
        n = x.shape[0] // batch
        self.x = torch.from_numpy(np.ascontiguousarray(x[:n * batch])).to(device)
        self.labels = torch.from_numpy(labels[:n * batch].astype(np.int64)).to(device)
        self.batch, self.n_batches, self.k = batch, n, 0

    def step(self):
        s = self.k * self.batch
        self.k = (self.k + 1) % self.n_batches
        self.opt.zero_grad()
        loss = self.loss(self.net(self.x[s:s + self.batch]), self.labels[s:s + self.batch])
        loss.backward()
        self.opt.step()
        return loss

    def run(self, steps):
        for _ in range(steps):
            self.step()
        if self.device != "cpu":
            import torch

            torch.cuda.synchronize()


class GemmRunner:
    """The reference: BLAS sgemm of the step's largest shape, (B, 784) @ (784, 256).

    Timed like a backend, interleaved with them, so the same noise hits the
    step and the rate it is compared with. One "sample" = 2·784·256 FLOPs.
    """

    name = "gemm"
    flops_per_sample = 2 * SIZES[0] * SIZES[1]

    def __init__(self, batch):
        rng = np.random.default_rng(0)
        self.a = rng.random((batch, SIZES[0]), dtype=np.float32)
        self.b = rng.random((SIZES[0], SIZES[1]), dtype=np.float32)
        self.c = np.empty((batch, SIZES[1]), np.float32)

    def run(self, steps):
        for _ in range(steps):
            np.matmul(self.a, self.b, out=self.c)


def available_backends(requested):
    from .kernels.cupy_ops import gpu_available

    if requested != "auto":
        names = [b.strip() for b in requested.split(",") if b.strip()]
        bad = [b for b in names if b not in ("numpy", "numba", "cupy", "torch", "torch-cuda")]
        if bad:
            raise SystemExit(f"unknown backend(s) {', '.join(bad)}; "
                             "choose from numpy,numba,cupy,torch,torch-cuda")
        return names
    names = ["numpy", "numba"] + (["cupy"] if gpu_available() else [])
    try:
        import torch  # noqa: F401

        names.append("torch")
    except ImportError:
        pass
    return names


def measure_throughput(backends, batch, repeats, block_s, per_repeat=None):
    """samples/s per backend: median over repeats of timed blocks, backends interleaved.

    The backend "gemm" is the reference GEMM (``GemmRunner``). ``per_repeat``
    (a dict) receives every repeat's figures, for ratios taken pairwise."""
    x, labels = synthetic(8 * batch, seed=batch)
    runners = [GemmRunner(batch) if b == "gemm"
               else TorchRunner(batch, x, labels, b.partition("-")[2] or "cpu") if b.startswith("torch")
               else MpnnRunner(b, batch, x, labels) for b in backends]
    steps = {}
    for r in runners:  # warm-up: compile, caches, allocator; then size the block
        r.run(3)
        t = min(_time(lambda: r.run(1)) for _ in range(3))
        steps[r.name] = max(3, int(block_s / max(t, 1e-6)))
    samples = {r.name: [] for r in runners}
    for _ in range(repeats):
        for r in runners:
            t = _time(lambda: r.run(steps[r.name]))
            samples[r.name].append(steps[r.name] * batch / t)
    if per_repeat is not None:
        per_repeat.update(samples)
    return {name: float(np.median(v)) for name, v in samples.items()}


def paired_ratio(samples, a, b, scale=1.0):
    """Median over repeats of scale·a_i / b_i: each pair was timed back to back, so a
    noisy neighbour that slows both cancels out better than in a ratio of medians."""
    return float(np.median([scale * x / y for x, y in zip(samples[a], samples[b])]))


# ------------------------------------------------------------- data parallel


class _WaitTimer:
    """A tracer for the engines that keeps the length of the last "allreduce" span."""

    last = 0.0

    @contextlib.contextmanager
    def span(self, name, **_args):
        t = time.perf_counter()
        yield
        if name == "allreduce":
            self.last = time.perf_counter() - t


def dp_worker(args):
    """Under mpirun: per-rank throughput with overlapped, blocking and no gradient sum,
    and rank 0 alone ("single") while the others sleep, all interleaved per repeat."""
    from mpi4py import MPI

    from .parallel.data_parallel import DataParallelEngine

    comm = MPI.COMM_WORLD
    rank, size = comm.Get_rank(), comm.Get_size()
    set_threads(args.threads)
    batch = args.dp_batch
    x, labels = synthetic(8 * batch * size, seed=7)
    share = slice(rank * 8 * batch, (rank + 1) * 8 * batch)  # this rank's rows
    runner = MpnnRunner("numba", batch, x[share], labels[share])
    model = runner.model
    timer = _WaitTimer()
    engines = {"single": runner.engine, "none": runner.engine,  # the trainer's step, no sum
               "blocking": DataParallelEngine(model, "cross_entropy", comm, 0.0, timer),
               "overlapped": DataParallelEngine(model, "cross_entropy", comm, args.bucket_mb,
                                                timer)}
    scale = 1.0 / (batch * size)  # the global batch's mean

    def step(engine):
        """The trainer's step; returns the seconds spent waiting for the gradient sum."""
        s = runner.k * batch
        runner.k = (runner.k + 1) % runner.n_batches
        timer.last = 0.0
        engine.train_step(runner.x[s:s + batch], runner.labels[s:s + batch], scale)
        runner.opt.step()
        return timer.last

    for engine in engines.values():  # warm-up
        for _ in range(5):
            step(engine)
    t1 = _time(lambda: step(engines["blocking"]))
    steps = comm.allreduce(max(5, int(args.block_s / max(t1, 1e-6))), op=MPI.MAX)
    result = {m: {"block_s": [], "wait_s": []} for m in engines}
    for _ in range(args.repeats):
        for mode, engine in engines.items():
            comm.Barrier()
            t = time.perf_counter()
            if mode != "single" or rank == 0:
                waits = [step(engine) for _ in range(steps)]
            block = time.perf_counter() - t
            if mode == "single":  # the other ranks sleep (not spin) until rank 0 is done
                done = comm.Ibarrier()
                while not done.Test():
                    time.sleep(0.001)
                block = comm.bcast(block, root=0)
            else:
                block = comm.allreduce(block, op=MPI.MAX)  # the slowest rank sets the pace
            result[mode]["block_s"].append(block)
            result[mode]["wait_s"].append(float(np.median(waits)) if mode != "single" or rank == 0
                                          else 0.0)
    # the overlapped sum must leave every replica with the same gradient
    step(engines["overlapped"])
    digest = float(np.abs(model.flat.grad.astype(np.float64)).sum())
    same = comm.allreduce(digest, op=MPI.MAX) == comm.allreduce(digest, op=MPI.MIN)
    if rank == 0:
        out = {"ranks": size, "rows_per_rank": batch, "steps_per_block": steps,
               "bucket_mb": args.bucket_mb, "grad_mb": model.flat.grad.nbytes / 1e6,
               "buckets": [list(b.layers) for b in engines["overlapped"].sync.buckets],
               "replicas_identical": bool(same)}
        for mode, r in result.items():
            per_repeat = [steps * batch / b for b in r["block_s"]]
            out[mode] = {"per_rank_samples_s": float(np.median(per_repeat)),
                         "per_repeat_samples_s": per_repeat,
                         "wait_ms": 1e3 * float(np.median(r["wait_s"]))}
        Path(args.dp_worker).write_text(json.dumps(out))


def dp_threads(args):
    """Threads per DP rank: --threads, but never more than this rank's share of the cores."""
    from .runtime.threads import available_cores, threads_per_rank

    return min(args.threads, threads_per_rank(available_cores(), args.dp_ranks))


def run_dp(args):
    """Launch the DP worker under mpirun; returns its figures or an error string."""
    here = Path(sys.executable).parent
    mpirun = next((str(p) for p in (here / "mpirun", here / "mpiexec") if p.exists()),
                  shutil.which("mpirun") or shutil.which("mpiexec"))
    if mpirun is None:
        return "mpirun not found"
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "dp.json"
        cmd = [mpirun, "-n", str(args.dp_ranks), sys.executable, "-m", "mpnn.bench",
               "--dp-worker", str(out), "--threads", str(dp_threads(args)),
               "--repeats", str(args.repeats), "--block-s", str(args.block_s),
               "--bucket-mb", str(args.bucket_mb), "--dp-batch", str(args.dp_batch)]
        env = dict(os.environ, OMP_NUM_THREADS=str(dp_threads(args)))
        try:
            proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
        except subprocess.TimeoutExpired:
            return "mpirun timed out after 600 s"
        if proc.returncode != 0 or not out.exists():
            return f"mpirun failed ({proc.returncode}): {(proc.stderr or proc.stdout)[-400:]}"
        return json.loads(out.read_text())


# --------------------------------------------------------------------- report


def main(argv=None):
    args = parse_args(argv)
    if args.dp_worker:
        return dp_worker(args)
    batches = [int(b) for b in args.batches.split(",")]
    backends = available_backends(args.backends)
    set_threads(args.threads, torch=any(b.startswith("torch") for b in backends))
    print(f"mpnn bench: MLP {'-'.join(map(str, SIZES))}, relu, cross-entropy, SGD momentum "
          f"{MOMENTUM}, float32, {args.threads} thread(s) everywhere, synthetic MNIST-shaped data; "
          f"medians of {args.repeats} repeats (ratios: median of the per-repeat ratios, "
          f"each pair timed back to back), warm-up excluded", flush=True)
    report = {"threads": args.threads, "repeats": args.repeats, "sizes": list(SIZES),
              "backends": backends}

    gemm = gemm_rate(args.repeats)
    square = gemm_rate(args.repeats, (1024, 1024, 1024))
    report["gemm_gflops"] = {"1024x784x256": gemm, "1024x1024x1024": square}
    print(f"float32 GEMM rate (NumPy BLAS sgemm, {args.threads} thread(s)): {gemm:.1f} GFLOP/s "
          f"at 1024x784 @ 784x256 (the step's largest), {square:.1f} at 1024^3", flush=True)

    throughput, gemm_at, raw = {}, {}, {}
    for batch in batches:
        raw[batch] = {}
        throughput[batch] = measure_throughput(backends + ["gemm"], batch, args.repeats, args.block_s,
                                               raw[batch])
        gemm_at[batch] = throughput[batch].pop("gemm") * GemmRunner.flops_per_sample / 1e9
        print(f"  batch {batch}: " + ", ".join(f"{k} {v:,.0f}/s" for k, v in throughput[batch].items())
              + f"; sgemm ({batch}x784 @ 784x256) {gemm_at[batch]:.1f} GFLOP/s", flush=True)
    report["samples_per_s"] = {str(b): v for b, v in throughput.items()}
    report["samples_per_s_per_repeat"] = {str(b): v for b, v in raw.items()}
    report["gemm_gflops_interleaved"] = {str(b): v for b, v in gemm_at.items()}

    col = 12
    print("\nsamples/s".ljust(18) + "".join(f"batch {b}".rjust(col) for b in batches))
    for name in backends:
        print(f"{name:17s}" + "".join(f"{throughput[b][name]:>{col},.0f}" for b in batches))
    ratios = {}
    fast = "cupy" if "cupy" in backends else "numba"
    for other in ("torch", "numpy"):
        if other in backends and fast in backends:
            ratios[f"{fast}/{other}"] = {str(b): paired_ratio(raw[b], fast, other) for b in batches}
            print(f"{fast + '/' + other:17s}" + "".join(
                f"{ratios[f'{fast}/{other}'][str(b)]:>{col - 1}.2f}x" for b in batches))
    report["ratios"] = ratios

    flops = {}
    if "numba" in backends:
        print("\nnumba training step: GFLOP/s and fraction of the sgemm rate measured alongside it")
        for b in batches:
            nominal, executed = step_flops(b)
            steps_s = throughput[b]["numba"] / b
            ex, nom = executed * steps_s / 1e9, nominal * steps_s / 1e9
            fps = GemmRunner.flops_per_sample
            ex_frac = paired_ratio(raw[b], "numba", "gemm", executed / b / fps)
            nom_frac = paired_ratio(raw[b], "numba", "gemm", nominal / b / fps)
            flops[str(b)] = {"executed_gflops": ex, "nominal_gflops": nom, "gemm_gflops": gemm_at[b],
                             "executed_fraction": ex_frac, "nominal_fraction": nom_frac}
            print(f"  batch {b:5d}: executed {ex:6.1f} = {ex_frac:5.1%} of {gemm_at[b]:.1f}; "
                  f"nominal 6·B·ΣIO {nom:6.1f} = {nom_frac:5.1%}")
    report["numba_step_flops"] = flops

    dp = None
    if not args.no_dp and "numba" in backends:
        print(f"\ndata parallel: mpirun -n {args.dp_ranks}, {args.dp_batch} samples per rank, "
              f"numba, {dp_threads(args)} thread(s) per rank ...", flush=True)
        dp = run_dp(args)
        if isinstance(dp, str):
            print(f"  skipped: {dp}")
        else:
            table = throughput.get(args.dp_batch, {}).get("numba")
            single = dp["single"]["per_rank_samples_s"]
            print(f"  single rank, batch {args.dp_batch}, measured in the same job while the other "
                  f"rank sleeps: {single:,.0f} samples/s"
                  + (f" (main table: {table:,.0f})" if table else ""))
            dp["main_table_single_samples_s"] = table
            for mode, label in (("overlapped", f"overlapped bucketed ({args.bucket_mb} MB buckets)"),
                                ("blocking", "one blocking Allreduce"),
                                ("none", "no gradient sum (compute only)")):
                r = dp[mode]  # paired per repeat, like the ratios of the main table
                r["efficiency"] = paired_ratio({"mode": r["per_repeat_samples_s"],
                                                "single": dp["single"]["per_repeat_samples_s"]},
                                               "mode", "single")
                print(f"  per rank, {label:38s} {r['per_rank_samples_s']:>9,.0f} samples/s "
                      f"= {r['efficiency']:6.1%}   wait after backward {r['wait_ms']:.3f} ms")
            blocking, exposed = dp["blocking"]["wait_ms"], dp["overlapped"]["wait_ms"]
            dp["hidden_ms"] = blocking - exposed
            print(f"  Allreduce of {dp['grad_mb']:.2f} MB: {blocking:.3f} ms blocking, {exposed:.3f} ms "
                  f"left after backward when overlapped (buckets {dp['buckets']}): "
                  f"{blocking - exposed:.3f} ms hidden behind backward"
                  + (f" ({(blocking - exposed) / blocking:.0%})" if blocking > 0 else ""))
            if not dp["replicas_identical"]:
                print("  ERROR: replicas ended with different gradient sums")
    report["data_parallel"] = dp

    report["targets"] = targets = check_targets(raw, flops, dp)
    if targets:
        print("\ntargets (issue 5)")
        for name, t in targets.items():
            print(f"  {name:32s} {t['value']:.2f} (target {t['target']:.2f}): "
                  f"{'met' if t['met'] else 'MISSED'}")
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=2))
        print(f"\nwrote {args.json}")
    return report


def check_targets(raw, flops, dp):
    targets = {}

    def add(name, value):
        targets[name] = {"value": float(value), "target": TARGETS[name],
                         "met": bool(value >= TARGETS[name])}

    for b in (64, 256):
        if b in raw and {"numba", "torch"} <= raw[b].keys():
            add(f"numba/torch at batch {b}", paired_ratio(raw[b], "numba", "torch"))
    if "1024" in flops:
        add("step/GEMM rate at batch 1024", flops["1024"]["executed_fraction"])
    if isinstance(dp, dict):
        add("DP -n 2 per-rank efficiency", dp["overlapped"]["efficiency"])
    return targets


if __name__ == "__main__":
    main()
