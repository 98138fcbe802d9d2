"""The op set on an NVIDIA GPU: cuBLAS GEMMs and fused CuPy kernels.

Same methods and results as ``numpy_ops.NumpyOps`` (the specification), on
``cupy`` arrays:

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

_REAL = {np.dtype(np.float32): "float", np.dtype(np.float64): "double"}


class CupyOps:
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
        self._forward[act](b, out)
        return out

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

    def loss(self, name, logits, labels, scale, out):
        """Sum of per-row losses; out = scale · dL/dlogits (B, C)."""
        return self._loss(name, logits, labels, scale, out, True)[0]

    def predict_stats(self, logits, labels, loss_name):
        """(loss_sum, n_correct) of a batch, for evaluation."""
        return self._loss(loss_name, logits, labels, 1.0, logits, False)

    def _loss(self, name, logits, labels, scale, out, write_grad):
        cp = self.xp
        if name not in ("cross_entropy", "mse"):
            raise ValueError(f"unknown loss {name!r}; choose one of cross_entropy, mse")
        B, C = logits.shape
        t = logits.dtype.type
        factor = t(scale) if name == "cross_entropy" else t(2 * scale / C)
        logits = cp.ascontiguousarray(logits)
        labels = cp.ascontiguousarray(cp.asarray(labels), dtype=cp.int64)
        kernel = self._loss_kernel(name, logits.dtype)
        self._acc.fill(0)
        threads = 128
        kernel(((B + threads - 1) // threads,), (threads,),
               (logits, labels, np.int32(B), np.int32(C), factor, out,
                np.int32(bool(write_grad)), self._acc))
        loss_sum, correct, bad = self._acc.get()  # the step's one host sync
        if bad:
            raise ValueError(f"labels must lie in [0, {C}) for {C} outputs; "
                             f"{int(bad)} rows of this batch do not")
        return float(loss_sum), int(correct)

    def _loss_kernel(self, name, dtype):
        key = (name, np.dtype(dtype))
        if key not in self._loss_kernels:
            real = _REAL.get(np.dtype(dtype))
            if real is None:
                raise TypeError(f"the cupy backend supports float32 and float64, not {dtype}")
            module = self.xp.RawModule(code=_LOSS_SOURCE.replace("REAL", real))
            self._loss_kernels[key] = module.get_function(
                "softmax_xent" if name == "cross_entropy" else "mse")
        return self._loss_kernels[key]

    # ---------------------------------------------------------- optimizer

    def sgd_step(self, p, g, lr, weight_decay):
        """p -= lr·(g + wd·p)."""
        t = p.dtype.type
        self._sgd(g, t(lr), t(weight_decay), p)

    def momentum_step(self, p, g, v, lr, momentum, nesterov, weight_decay):
        """v = μ·v + (g + wd·p);  p -= lr·v   (Nesterov: p -= lr·(g + wd·p + μ·v))."""
        t = p.dtype.type
        self._momentum(g, t(lr), t(momentum), t(weight_decay), t(np.finfo(p.dtype).tiny),
                       np.int32(bool(nesterov)), p, v)

    def adam_step(self, p, g, m, v, lr, beta1, beta2, eps, weight_decay, t):
        """AdamW: p ← p·(1 − lr·wd) − lr · m̂ / (√v̂ + ε), with bias-corrected m̂, v̂."""
        d = p.dtype.type
        self._adam(g, d(lr / (1 - beta1 ** t)), d(beta1), d(beta2), d(1 - beta1), d(1 - beta2),
                   d(1 / (1 - beta2 ** t)), d(eps), d(1 - lr * weight_decay),
                   d(np.finfo(p.dtype).tiny), p, m, v)

    # -------------------------------------------------------------- misc

    def to_device(self, a):
        return self.xp.asarray(a)

    def to_host(self, a):
        return self.xp.asnumpy(a)

    def synchronize(self):
        """Wait until the current stream's work is done (before MPI reads device memory)."""
        self.xp.cuda.get_current_stream().synchronize()
