"""The op set on an NVIDIA GPU: cuBLAS GEMMs and fused CuPy kernels.

Same interface (``base.OpSet``) and results as ``numpy_ops.NumpyOps`` (the
specification), on ``cupy`` arrays:

* GEMMs go to cuBLAS: ``cupy.matmul(..., out=)`` forward and for the input
  gradient; ``weight_grad`` calls ``cupy.cublas.gemm`` with ``beta = 1`` so
  ``dW += xᵀ·dz`` accumulates in place.
* Fused ``ElementwiseKernel``s: bias + activation over the GEMM output,
  activation backward over ``dy`` (the bias gradient is then one column-sum
  reduction), and each optimizer update in one pass over the flat buffers.
* A ``RawKernel`` for softmax cross-entropy / MSE: one thread per row writes
  ``dlogits`` in place and adds its loss (and whether its argmax is right)
  into a 3-number device accumulator; the only host sync of a step is the
  read of that accumulator, because the op set returns the loss as a float.
* ``synchronize()`` waits for the current stream: MPI reads device memory
  directly (CUDA-aware MPI) or after a copy, and must not see a half-written
  gradient, so data-parallel code calls it before every Allreduce.

Importing this module never needs CuPy; ``gpu_available()`` answers False,
quietly, when CuPy is missing or no GPU can be used.

Shapes: B rows, I in features, O out features, C classes, N flat parameters.
"""

from __future__ import annotations

import functools

import numpy as np

from ..nn.functional import ACTIVATIONS, LOSS_NAMES
from .base import OpSet, flush_bound, grad_factor, typed


@functools.lru_cache(maxsize=1)
def gpu_available():
    """True when CuPy imports and at least one CUDA device answers; never raises."""
    try:
        import cupy

        if cupy.cuda.runtime.getDeviceCount() < 1:
            return False
        cupy.zeros(1).sum().item()  # a kernel actually runs (driver, arch, NVRTC)
        return True
    except Exception:  # ImportError, CUDARuntimeError, missing libraries, ...
        return False


# ------------------------------------------------------------------ kernel text

_ACT_FORWARD = {
    "identity": "y = z;",
    "relu": "y = z < (T)0 ? (T)0 : z;",  # NaN stays NaN, as np.maximum
    "tanh": "y = tanh(z);",
    "sigmoid": "T e = exp(-fabs(z)); y = z >= (T)0 ? (T)1 / ((T)1 + e) : e / ((T)1 + e);",
}

_ACT_BACKWARD = {  # dz = dy ⊙ act'(y), act' written with the output y
    "relu": "dy = y > (T)0 ? dy : (T)0;",
    "tanh": "dy = dy * ((T)1 - y * y);",
    "sigmoid": "dy = dy * y * ((T)1 - y);",
}
assert set(_ACT_FORWARD) == set(ACTIVATIONS), "every activation needs a forward kernel"
assert set(_ACT_BACKWARD) == set(ACTIVATIONS) - {"identity"}, "and a backward (identity: none)"

_LOSS_SOURCE = r"""
typedef REAL T;

// One thread per row i of logits (B, C). Adds into acc[0] the row's loss,
// into acc[1] 1 if its argmax (first maximum) is the label, into acc[2] 1 if
// the label is out of range. If write_grad, writes out[i, :] = dL/dlogits.
extern "C" __global__ void softmax_xent(const T* z, const long long* labels, int B, int C,
                                        T scale, T* out, int write_grad, double* acc)
{
    int i = blockDim.x * blockIdx.x + threadIdx.x;
    if (i >= B) return;
    const T* zi = z + (long long)i * C;
    long long y = labels[i];
    if (y < 0 || y >= C) { atomicAdd(acc + 2, 1.0); return; }
    T m = zi[0]; int arg = 0;
    for (int c = 1; c < C; ++c) if (zi[c] > m) { m = zi[c]; arg = c; }
    T s = 0;
    for (int c = 0; c < C; ++c) s += exp(zi[c] - m);
    atomicAdd(acc, (double)m + (double)log(s) - (double)zi[y]);
    if (arg == y) atomicAdd(acc + 1, 1.0);
    if (write_grad) {
        T* oi = out + (long long)i * C;
        T inv = scale / s;
        for (int c = 0; c < C; ++c) oi[c] = exp(zi[c] - m) * inv;
        oi[y] -= scale;
    }
}

// MSE against one-hot targets: row loss (1/C) Σ_c (p_c − t_c)², out = g·(p − t), g = 2·scale/C.
extern "C" __global__ void mse(const T* z, const long long* labels, int B, int C,
                               T g, T* out, int write_grad, double* acc)
{
    int i = blockDim.x * blockIdx.x + threadIdx.x;
    if (i >= B) return;
    const T* zi = z + (long long)i * C;
    long long y = labels[i];
    if (y < 0 || y >= C) { atomicAdd(acc + 2, 1.0); return; }
    T m = zi[0]; int arg = 0; double row = 0;
    for (int c = 0; c < C; ++c) {
        T p = zi[c];
        if (p > m) { m = p; arg = c; }
        T diff = c == y ? p - (T)1 : p;
        row += (double)diff * (double)diff;
        if (write_grad) out[(long long)i * C + c] = diff * g;
    }
    atomicAdd(acc, row / C);
    if (arg == y) atomicAdd(acc + 1, 1.0);
}
"""

_LOSS_KERNELS = {"cross_entropy": "softmax_xent", "mse": "mse"}  # names in _LOSS_SOURCE
assert set(_LOSS_KERNELS) == set(LOSS_NAMES), "every loss needs a kernel"

_REAL = {np.dtype(np.float32): "float", np.dtype(np.float64): "double"}


class CupyOps(OpSet):
    """GPU op set (see the module docstring). Needs CuPy and a usable GPU."""

    name = "cupy"

    def __init__(self):
        if not gpu_available():
            raise RuntimeError("--backend cupy needs CuPy and a CUDA GPU, and none is usable "
                               "here; use --backend numba (or auto)")
        import cupy
        import cupy.cublas

        self.xp = cupy
        self._cublas = cupy.cublas
        self._acc = cupy.zeros(3, dtype=np.float64)  # loss, correct, bad labels
        self._forward = {act: cupy.ElementwiseKernel(
            "T b", "T y", f"T z = y + b; {src}", f"mpnn_bias_{act}")
            for act, src in _ACT_FORWARD.items()}
        self._backward = {act: cupy.ElementwiseKernel(
            "T y", "T dy", src, f"mpnn_{act}_backward")
            for act, src in _ACT_BACKWARD.items()}
        self._sgd = cupy.ElementwiseKernel(
            "T g, T lr, T wd", "T p", "p -= lr * (g + wd * p);", "mpnn_sgd")
        self._momentum = cupy.ElementwiseKernel(
            "T g, T lr, T mu, T wd, T tiny, int32 nesterov", "T p, T v",
            """
            T gk = g + wd * p;
            T vk = mu * v + gk;
            if (fabs(vk) < tiny) vk = (T)0;   // flush subnormals, as the CPU kernel
            v = vk;
            p -= lr * (nesterov ? gk + mu * vk : vk);
            """, "mpnn_momentum")
        self._adam = cupy.ElementwiseKernel(
            "T g, T lr_t, T beta1, T beta2, T c1, T c2, T inv_bc2, T eps, T decay, T tiny",
            "T p, T m, T v",
            """
            T mk = beta1 * m + c1 * g;
            T vk = beta2 * v + c2 * (g * g);
            if (fabs(mk) < tiny) mk = (T)0;
            if (vk < tiny) vk = (T)0;
            m = mk;
            v = vk;
            p = p * decay - lr_t * (mk / (sqrt(vk * inv_bc2) + eps));
            """, "mpnn_adam")
        self._loss_kernels = {}

    # ------------------------------------------------------------ forward

    def linear_act(self, x, W, b, act, out):
        """out = act(x·W + b): x (B, I), W (I, O), b (O,) -> out (B, O)."""
        self.xp.matmul(x, W, out=out)  # (B, O) cuBLAS
        return self.bias_act(out, b, act)

    def bias_act(self, z, b, act):
        """z = act(z + b) in place, one elementwise kernel: z (B, O), b (O,)."""
        self._forward[act](b, z)
        return z

    # ----------------------------------------------------------- backward

    def act_bias_backward(self, dy, y, act, db):
        """dz = dy ⊙ act'(y) (in place over dy); db += Σ_rows dz.  dy, y (B, O)."""
        if act != "identity":
            self._backward[act](y, dy)  # (B, O)
        db += dy.sum(axis=0)  # (O,)
        return dy

    def weight_grad(self, x, dz, dW):
        """dW += xᵀ·dz: x (B, I), dz (B, O) -> dW (I, O), cuBLAS with beta = 1."""
        self._cublas.gemm("T", "N", x, dz, out=dW, alpha=1.0, beta=1.0)

    def input_grad(self, dz, W, out):
        """out = dz·Wᵀ: dz (B, O), W (I, O) -> out (B, I)."""
        return self.xp.matmul(dz, W.T, out=out)

    # --------------------------------------------------------------- loss

    def _loss_rows(self, name, logits, labels, scale, out, write_grad):
        """(loss_sum, n_correct; -1: a bad label), one thread per row; out (B, C) if write_grad."""
        cp = self.xp
        B, C = logits.shape
        factor = grad_factor(name, scale, C, logits.dtype)
        logits = cp.ascontiguousarray(logits)
        labels = cp.ascontiguousarray(cp.asarray(labels), dtype=cp.int64)
        kernel = self._loss_kernel(name, logits.dtype)
        self._acc.fill(0)
        threads = 128
        kernel(((B + threads - 1) // threads,), (threads,),
               (logits, labels, np.int32(B), np.int32(C), factor, out,
                np.int32(bool(write_grad)), self._acc))
        loss_sum, correct, bad = self._acc.get()  # the step's one host sync
        return loss_sum, -1 if bad else correct

    def _loss_kernel(self, name, dtype):
        key = (name, np.dtype(dtype))
        if key not in self._loss_kernels:
            real = _REAL.get(np.dtype(dtype))
            if real is None:
                raise TypeError(f"the cupy backend supports float32 and float64, not {dtype}")
            module = self.xp.RawModule(code=_LOSS_SOURCE.replace("REAL", real))
            self._loss_kernels[key] = module.get_function(_LOSS_KERNELS[name])
        return self._loss_kernels[key]

    # ---------------------------------------------------------- optimizer

    def sgd_step(self, p, g, lr, weight_decay):
        """p -= lr·(g + wd·p)."""
        self._sgd(g, *typed(p.dtype, lr, weight_decay), p)

    def momentum_step(self, p, g, v, lr, momentum, nesterov, weight_decay):
        """v = μ·v + (g + wd·p);  p -= lr·v   (Nesterov: p -= lr·(g + wd·p + μ·v))."""
        self._momentum(g, *typed(p.dtype, lr, momentum, weight_decay, flush_bound(p.dtype)),
                       np.int32(bool(nesterov)), p, v)

    def _adam_update(self, p, g, m, v, s):
        """AdamW in one pass with the step's scalars ``s`` (see ``base.AdamScalars``)."""
        self._adam(g, *s.kernel_args(p.dtype), p, m, v)

    # -------------------------------------------------------------- misc

    def to_device(self, a):
        return self.xp.asarray(a)

    def to_host(self, a):
        return self.xp.asnumpy(a)

    def synchronize(self):
        """Wait until the current stream's work is done (before MPI reads device memory)."""
        self.xp.cuda.get_current_stream().synchronize()
